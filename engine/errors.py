"""Errors in MySQL's language: a number, a SQLSTATE, a message, a hint, an exit status.

Every expected failure is a :class:`CloneError` subclass. The command line prints
``ERROR <no> (<sqlstate>): <message>`` and, where there is one, ``hint: <hint>``, and
exits with :func:`exit_status`. Numbers follow MySQL's clone plugin where MySQL has
one (docs/mysql.md); numbers of our own start at 8000 and are listed in the
README. Retryable-or-fatal is an attribute (``retryable``), never a match on text.
"""

from __future__ import annotations

import errno as errno_
from typing import Any, ClassVar

# The exit statuses, as restic and rclone give them: a script can tell "try again
# later" (4, 5) from "this will never work as asked" (2, 3, 6) without reading stderr.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3  #: the destination or source was refused (1007, 3632, 3869, 8004, ...)
EXIT_BUSY = 4  #: the donor is busy with another clone (3634, 3874): retry later
EXIT_UNREACHABLE = 5  #: the donor could not be reached (3862 "Connect failed: 2003")
EXIT_AUTH = 6  #: authentication or encryption refused
EXIT_SIGINT = 130  #: interrupted (1317) by SIGINT: 128 + the signal, as a shell reports it
EXIT_SIGTERM = 143  #: interrupted (1317) by SIGTERM


class CloneError(Exception):
    """Base class: carries ``errno``, ``sqlstate``, a formatted message and a hint."""

    errno: ClassVar[int] = 8000
    sqlstate: ClassVar[str] = "HY000"
    template: ClassVar[str] = "%s"
    default_hint: ClassVar[str | None] = None
    exit_status: ClassVar[int] = EXIT_FAILURE
    retryable: ClassVar[bool] = False

    def __init__(self, *args: Any, hint: str | None = None) -> None:
        self.args_ = args
        try:
            message = self.template % args if args else self.template
        except TypeError:
            message = self.template + " " + " ".join(map(str, args))
        self.message = message.replace("%%", "%") if not args else message
        self.hint = hint if hint is not None else self.default_hint
        super().__init__(self.message)

    def line(self) -> str:
        return f"ERROR {self.errno} ({self.sqlstate}): {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"error_no": self.errno, "error_message": self.message}

    def each(self) -> list[CloneError]:
        """The problems this error reports, each printed as its own ERROR line with its
        own hint: itself alone (several, for :class:`Problems`)."""
        return [self]


# -- MySQL's numbers --------------------------------------------------------------------


class DatabaseExists(CloneError):
    """The clone's DATA DIRECTORY already exists (MySQL answers 1007)."""

    errno = 1007
    template = "Can't create database '%s'; database exists"
    default_hint = "choose a path that does not exist yet; the clone creates it"
    exit_status = EXIT_REFUSED


class FileExists(CloneError):
    errno = 1086
    template = "File '%s' already exists"
    exit_status = EXIT_REFUSED


class LockWaitTimeout(CloneError):
    errno = 1205
    template = "Lock wait timeout exceeded; try restarting transaction"
    retryable = True


class WrongValueForVar(CloneError):
    """A configuration value out of range or malformed: a usage error (exit 2)."""

    errno = 1231
    sqlstate = "42000"
    template = "Variable '%s' can't be set to the value of '%s'"
    exit_status = EXIT_USAGE


class QueryInterrupted(CloneError):
    errno = 1317
    sqlstate = "70100"
    template = "Query execution was interrupted"
    exit_status = EXIT_SIGINT  # 143 when SIGTERM: see interrupted_status()


class PathInDatadir(CloneError):
    errno = 3632
    template = "Path is within the current data directory '%s'"
    exit_status = EXIT_REFUSED


class DdlInProgress(CloneError):
    errno = 3633
    template = "Concurrent DDL is performed during clone operation. Please try again."
    retryable = True


class AccessDenied(CloneError):
    """A wrong password, an unknown user or no password: one message for all three, so
    that nobody can learn which users exist (MySQL's ER_ACCESS_DENIED_ERROR)."""

    errno = 1045
    sqlstate = "28000"
    template = "Access denied for user '%s'@'%s' (using password: %s)"
    default_hint = "check the user name and the password (CLONE_AGENT_PASSWORD, " \
        "--password-stdin or the prompt); the donor's owner manages users with " \
        "`clone-agent user`"
    exit_status = EXIT_AUTH


class NoPrivilege(CloneError):
    """An authenticated user without BACKUP_ADMIN (MySQL's ER_SPECIFIC_ACCESS_DENIED)."""

    errno = 1227
    sqlstate = "42000"
    template = "Access denied; you need (at least one of) the %s privilege(s) for this " \
        "operation"
    default_hint = "the donor's owner can give it: `clone-agent user add NAME --users FILE`"
    exit_status = EXIT_AUTH


class SslError(CloneError):
    """The clone cannot be encrypted as asked, or the donor's key is not the pinned one
    (MySQL's CR_SSL_CONNECTION_ERROR)."""

    errno = 2026
    template = "SSL connection error: %s"
    exit_status = EXIT_AUTH


class InsecureTransport(CloneError):
    """A plain client at a donor that requires encryption (ER_SECURE_TRANSPORT_REQUIRED)."""

    errno = 3159
    template = "Connections using insecure transport are prohibited while " \
        "--require_secure_transport=ON."
    default_hint = "leave out --require-no-ssl: the clone is then encrypted"
    exit_status = EXIT_AUTH


class TooManyClones(CloneError):
    errno = 3634
    template = "Too many concurrent clone operations. Maximum allowed - %d."
    default_hint = "wait for the running clone to finish, then try again"
    retryable = True
    exit_status = EXIT_BUSY


class RestartFailed(CloneError):
    """The server that owned a replaced data directory did not come back on the clone
    (MySQL's ER_RESTART_SERVER_FAILED, which a clone without a supervisor reports). The
    clone itself is in place."""

    errno = 3707
    template = "Restart server failed (%s)."
    default_hint = ("the clone is in place and whole: start `clone-agent serve DATADIR` "
                    "on it again")


class DonorError(CloneError):
    """Anything the donor reports or any failure to reach it (MySQL's ER_CLONE_DONOR)."""

    errno = 3862
    template = "Clone Donor Error: %s."


class DonorUnreachable(DonorError):
    """Nothing (or nothing that speaks clone-agent) answered at the donor's address:
    MySQL's 3862 with "Connect failed: 2003" inside. Its own exit status (5), so that a
    script can tell a donor that is down from one that refused."""

    exit_status = EXIT_UNREACHABLE
    default_hint = "check that `clone-agent serve` runs there and the network lets you in"


class NetworkError(DonorError):
    """The network broke under a running clone; a restart may recover (MySQL's ER_NET_*)."""

    retryable = True


class ProtocolError(CloneError):
    """The peer sent something the protocol does not allow (MySQL's ER_CLONE_PROTOCOL)."""

    errno = 3863
    template = "Clone received unexpected response from Donor : %s."


class DonorVersion(CloneError):
    errno = 3864
    template = "Clone Donor MySQL version: %s is different from Recipient MySQL version %s."


class DonorOS(CloneError):
    errno = 3865
    template = "Clone Donor OS: %s is different from Recipient OS: %s."


class DonorPlatform(CloneError):
    errno = 3866
    template = "Clone Donor platform: %s is different from Recipient platform: %s."


class ConfigMismatch(CloneError):
    errno = 3868
    template = "Clone Configuration %s: Donor value: %s is different from Recipient value: %s."


class SysConfig(CloneError):
    """Clone system configuration problems, e.g. the donor is not in clone_valid_donor_list."""

    errno = 3869
    template = "Clone system configuration: %s"
    exit_status = EXIT_REFUSED


class InvalidDonorList(SysConfig):
    """A malformed clone_valid_donor_list: a usage error (exit 2), MySQL's "Invalid Format"."""

    exit_status = EXIT_USAGE


class DiskSpace(CloneError):
    errno = 3873
    template = "Clone estimated database size is %s. Available space %s is not enough."
    exit_status = EXIT_REFUSED


class CloneInProgress(CloneError):
    errno = 3874
    template = "Concurrent clone in progress. Please try after clone is complete."
    retryable = True
    exit_status = EXIT_BUSY


# -- numbers of our own (8000+) -------------------------------------------------------


class Unexpected(CloneError):
    """An exception nobody translated (a bug, or a failure not foreseen), as the command
    line's catch-all reports it: ``<type>: <message>`` under our base number, 8000. The
    traceback is shown only with ``-v``, and never the local variables."""

    errno = 8000
    template = "%s"
    default_hint = "rerun with -v for the traceback"

    @classmethod
    def of(cls, exc: BaseException, hint: str | None = None) -> Unexpected:
        text = " ".join(str(exc).splitlines())
        name = type(exc).__name__
        return cls(f"{name}: {text}" if text else name, hint=hint)


class UsageError(CloneError):
    errno = 8001
    template = "%s"
    exit_status = EXIT_USAGE


class LocalIOError(CloneError):
    """A local file operation failed (disk full, permission, ...)."""

    errno = 8002
    template = "File operation failed: %s"


class StageCrashed(CloneError):
    """A worker process ended with an unexpected exception or died."""

    errno = 8003
    template = "Clone worker %s failed: %s"


class ChecksumMismatch(ProtocolError):
    """A block's xxh3 checksum did not match its bytes; nothing of it was written."""

    template = "Clone received unexpected response from Donor : %s."
    default_hint = "the data was damaged in transit or on the donor; run the clone again"


class UnsafeName(ProtocolError):
    """The donor named a file outside the destination or in a form we refuse."""

    default_hint = (
        "the donor is misbehaving or hostile; nothing was written outside the destination"
    )


class NotADataDirectory(CloneError):
    errno = 8004
    template = "Not a clone-agent data directory: %s"
    exit_status = EXIT_REFUSED


class DataDirectoryLocked(CloneError):
    errno = 8005
    template = "Data directory '%s' is in use by another process (pid %s)"
    default_hint = "stop the other owner (serve or workload) first; a data directory has one owner"
    exit_status = EXIT_REFUSED


class VerifyFailed(CloneError):
    errno = 8006
    template = "Verification failed: %s"


class ReplaceRefused(CloneError):
    """``pull --replace DATADIR`` cannot replace that path (it does not exist, is not a
    directory, cannot be written, or ``--keep-old`` cannot take the old data)."""

    errno = 8009
    template = "Cannot replace '%s': %s"
    exit_status = EXIT_REFUSED


class ConfigError(CloneError):
    """The configuration cannot be read: a ``--config`` file missing, unreadable or not
    TOML. Its own number, since 3869 speaks of the donor list; a usage error (exit 2),
    as mysqld refuses to start on a bad option file."""

    errno = 8010
    template = "Configuration error: %s"
    exit_status = EXIT_USAGE


class UnknownVariable(ConfigError):
    """A TOML key or ``CLONE_AGENT_*`` variable that names no setting (exit 2), as
    mysqld refuses to start on an unknown variable in its option file."""


class NoSuchClone(CloneError):
    """``kill DIR`` where no clone runs into DIR (MySQL's KILL of an unknown id)."""

    errno = 1094
    template = "Unknown thread id: %s"
    default_hint = "`clone-agent status DIR` shows whether a clone runs into it"


class NoStatus(CloneError):
    errno = 8007
    template = "No clone status found for '%s'"
    default_hint = "status reads DIR/#clone/ of a clone destination"


class SourceChanged(CloneError):
    """--fail-on-change: a file of a plain tree changed or vanished while it was read."""

    errno = 8008
    template = "Files changed on the donor while the clone read them: %s"
    default_hint = ("stop what writes to them during the clone, or clone without "
                    "--fail-on-change: a changed file is then sent again, and reported "
                    "if it keeps changing")


#: One table from error class to exit status, so that no caller picks its own; tests pin it.
EXIT_STATUS_TABLE: dict[type[CloneError], int] = {
    cls: cls.exit_status
    for cls in (
        CloneError, DatabaseExists, FileExists, LockWaitTimeout, WrongValueForVar,
        QueryInterrupted, NoSuchClone, PathInDatadir, DdlInProgress, TooManyClones, DonorError,
        NetworkError, DonorUnreachable, ProtocolError, DonorVersion, DonorOS, DonorPlatform,
        ConfigMismatch,
        SysConfig, InvalidDonorList, DiskSpace, CloneInProgress, UsageError, LocalIOError,
        StageCrashed, UnknownVariable, Unexpected, AccessDenied, NoPrivilege, SslError,
        InsecureTransport,
        ChecksumMismatch, UnsafeName, NotADataDirectory, DataDirectoryLocked, VerifyFailed,
        NoStatus, SourceChanged, RestartFailed, ReplaceRefused, ConfigError,
    )
}


class Problems(CloneError):
    """Several problems found together: a preflight reports every one of them at once,
    where MySQL stops at the first, so that one run shows everything to fix.

    Its number, SQLSTATE, message and exit status are the first problem's (so are the
    status book's error fields); :meth:`each` gives them all, each printed as its own
    ``ERROR N (...)`` line followed by its own hint; ``--json``'s error object lists
    them under ``"errors"``."""

    def __init__(self, problems: list[CloneError]) -> None:
        flat = [one for p in problems for one in p.each()]
        if not flat:
            raise ValueError("Problems of nothing")
        first = flat[0]
        super().__init__(first.message, hint=first.hint)
        self.problems = flat
        self.message = first.message
        self.errno = first.errno  # type: ignore[misc]
        self.sqlstate = first.sqlstate  # type: ignore[misc]
        self.exit_status = first.exit_status  # type: ignore[misc]

    def each(self) -> list[CloneError]:
        return list(self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {**self.problems[0].to_dict(), "errors": [p.to_dict() for p in self.problems]}


def problems_of(check: Any, *args: Any) -> list[CloneError]:
    """Run ``check(*args)``; the problems it raises (none when it returns)."""
    try:
        check(*args)
    except CloneError as err:
        return err.each()
    return []


def raise_all(problems: list[CloneError]) -> None:
    """Raise every problem at once: nothing, the one, or :class:`Problems`."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise Problems(problems)


def exit_status(exc: BaseException, signum: int | None = None) -> int:
    """The exit status of a command that failed with ``exc``; ``signum``: the signal
    that stopped it, if one did (only the command line knows, StopFlag)."""
    if isinstance(exc, QueryInterrupted):
        return interrupted_status(signum)
    if isinstance(exc, CloneError):
        return exc.exit_status
    return EXIT_FAILURE


def interrupted_status(signum: int | None) -> int:
    """128 + the signal, as a shell reports a process killed by it: 130 for SIGINT
    (also when the signal is not known, a KeyboardInterrupt), 143 for SIGTERM."""
    import signal

    return EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_SIGINT


def by_number(errno: int, message: str, hint: str | None = None) -> CloneError:
    """Rebuild an error that crossed a process or the network as (number, message)."""
    cls: type[CloneError] = _BY_NUMBER.get(errno, CloneError)
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.args_ = ()
    err.message = message
    err.hint = hint if hint is not None else cls.default_hint
    if cls is CloneError:
        err.errno = errno  # type: ignore[misc]
    return err


_BY_NUMBER: dict[int, type[CloneError]] = {}
for _cls in EXIT_STATUS_TABLE:  # the first (most general) class of each number wins
    _BY_NUMBER.setdefault(_cls.errno, _cls)


def outcome_of(exc: BaseException) -> dict[str, Any]:
    """What a crashed stage sends back to its coordinator, which re-raises it as the
    error it was (number, message, hint) with the worker's traceback for the log."""
    tb = _format(exc)
    if isinstance(exc, OSError):  # translated here as at every other edge: with its hint
        exc = from_oserror(exc, "a file operation")
    errno = exc.errno if isinstance(exc, CloneError) else 0
    return {
        "type": type(exc).__name__,
        "errno": errno,
        "message": exc.message if isinstance(exc, CloneError) else f"{type(exc).__name__}: {exc}",
        "hint": exc.hint if isinstance(exc, CloneError) else None,
        "traceback": tb,
    }


def _format(exc: BaseException) -> str:
    import traceback  # here, not at the top: a worker imports this module at every start

    return "".join(traceback.format_exception(exc))


def from_oserror(exc: OSError, what: str) -> LocalIOError:
    """Translate an OSError at the edge into a clear LocalIOError."""
    reason = exc.strerror or str(exc)
    hint = {
        errno_.ENOSPC: "the file system is full: free space there, or choose another one",
        errno_.EDQUOT: "the disk quota is used up: free space, or raise the quota",
        errno_.EACCES: "check the permissions of the directory and its parents",
        errno_.EROFS: "the file system is mounted read-only",
    }.get(exc.errno or 0)
    err = LocalIOError(f"{what}: {reason}", hint=hint)
    err.__cause__ = exc
    return err
