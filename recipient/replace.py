"""Replace mode: ``pull --replace DATADIR``, MySQL's default CLONE INSTANCE (no DATA
DIRECTORY), with nothing of the old data lost if the clone fails.

MySQL drops the recipient's data first and then copies, so a clone that fails half way
leaves the server with nothing. Here the old data stays where it is, untouched, until
the new copy is whole and checked:

1. preflight (:meth:`ReplaceDestination.check`, :meth:`ReplaceDestination.admit`):
   every problem is collected and reported at once, before anything is created; the
   last check needs the donor's estimate (room for both copies, 3873);
2. the copy goes into ``DATADIR/#clone/#new/``, every block checked, then FILE SYNC
   and, for a page store, RECOVERY, then verify's invariants (every page, the bank);
3. RESTART, when a ``serve`` owns DATADIR: it is asked (``engine/control.py``) to
   release the directory; then the swap (``engine/swap.py``: journaled renames of the
   top-level entries), and the server reopens the new data and serves again, its
   workload going on from the clone's last transaction + 1;
4. DROP DATA: the old entries, moved to ``#clone/#old/`` by the swap, are removed with
   their counters (or renamed to ``--keep-old DIR``).

Why the copy is made inside ``DATADIR/#clone/`` and not beside DATADIR: it is then on
DATADIR's file system whatever is mounted where (a data directory is often a mount
point, and a sibling would then be on another file system, where the swap could not
rename); every later step is a rename, which needs no space and cannot half happen; a
full disk fails the copy while the old data is untouched, and the copy is removed
inside the same directory; and whatever a crash leaves is found by the next command
that opens DATADIR, instead of lying forgotten beside it. ``#clone/`` is never sent by
a donor, never swapped, and holds the status, so ``status DATADIR`` works throughout.

Locks (``engine/swap.py``): when no server owns DATADIR the pull holds it exclusive
from preflight to its end (no owner can start meanwhile); when one does, the pull holds
it shared and the server's reservation keeps other pulls away, and it takes it
exclusive only for the swap, once the server has let go. ``#clone/#pull.lock`` marks
the copy as this live pull's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from engine import messages as M
from engine.control import ControlClient, ServerInfo, find_servers
from engine.errors import (
    CloneError,
    CloneInProgress,
    DataDirectoryLocked,
    DiskSpace,
    FileExists,
    NotADataDirectory,
    PathInDatadir,
    Problems,
    ReplaceRefused,
    RestartFailed,
    UsageError,
    VerifyFailed,
    problems_of,
    raise_all,
)
from engine.faults import NEVER, KillPoints
from engine.fsutil import fsync_dir, remove_tree
from engine.pagestore import REDO_DIR, is_paged
from engine.status import COMPLETED, FAILED, StatusBook
from engine.swap import (
    LIVE_HINT,
    SWAPPED,
    DirLock,
    PullLock,
    Swap,
    SwapPaths,
    finish,
    read_journal,
    rollback,
    settle,
    tree_bytes,
)

log = logging.getLogger("clone_agent.recipient")

RESTART_TIMEOUT = 120.0  #: seconds a server may take to let go, or to serve again
LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "::", "*", ""}


def _inside(path: str, parent: str) -> bool:
    return path.startswith(parent.rstrip(os.sep) + os.sep)


def _same_host(a: str, b: str) -> bool:
    return a == b or (a in LOOPBACK or a.startswith("127.")) and \
        (b in LOOPBACK or b.startswith("127."))


def _owner_pid(datadir: str) -> str:
    """The pid a page store's owner wrote in its lock file, for the message."""
    try:
        with open(os.path.join(datadir, REDO_DIR, "owner.lock"), "rb") as fh:
            return fh.read(32).decode().strip() or "unknown"
    except (OSError, UnicodeDecodeError):
        return "unknown"


def human_size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


class ReplaceDestination:
    """An existing data directory, replaced in place. Same steps as
    :class:`~recipient.destination.Destination`; owned by the pull's coordinator."""

    def __init__(self, path: str, book: StatusBook, source: tuple[str, int],
                 keep_old: str | None = None,
                 emit: Callable[[dict[str, Any]], None] = lambda event: None,
                 kill: KillPoints = NEVER, restart_timeout: float = RESTART_TIMEOUT) -> None:
        self.path = path
        self.book = book
        self.host, self.port = source
        self.keep_old = keep_old
        self.emit = emit
        self.kill = kill
        self.restart_timeout = restart_timeout
        # Kill points at the start of each stage of the copy (tests).
        book.on_begin = lambda stage: kill.reached(stage.lower().replace(" ", "_"))
        self.lock: DirLock | None = None
        self.pull_lock: PullLock | None = None
        self.owner: ServerInfo | None = None
        self.owner_hello: dict[str, Any] = {}
        self.control: ControlClient | None = None
        self.pending: list[CloneError] = []
        self.measurable = False
        self.admitted = False
        self.swap: Swap | None = None
        self.released = False
        self.restart: dict[str, Any] = {}
        self.restart_error: RestartFailed | None = None
        self.dropped = 0
        self.drop_error: str | None = None

    # -- preflight ------------------------------------------------------------------------
    def check(self, earlier: list[CloneError]) -> None:
        """Every problem that can be seen before the donor is asked, collected; raised
        now with ``earlier`` (the donor list) when the donor will not be asked, or
        there is no directory to measure; else kept for :meth:`admit`. Changes
        nothing, except that an earlier replace interrupted by a crash is settled."""
        problems = list(earlier) + self._check_path()
        if self.measurable:
            problems += self._check_keep_old()
            problems += self._check_owner()
        self.book.status.destination = self.path
        if problems and (earlier or not self.measurable):
            self._close()
            raise_all(problems)
        self.pending = problems

    def _check_path(self) -> list[CloneError]:
        path = self.path
        if not os.path.lexists(path):
            return [ReplaceRefused(path, "it does not exist", hint="--replace takes an "
                                   "existing data directory; --data-dir clones into a new one")]
        real = os.path.realpath(path)
        if not os.path.isdir(real):
            return [ReplaceRefused(path, "it is not a directory",
                                   hint="give the data directory to replace")]
        self.path = real
        self.measurable = True
        problems: list[CloneError] = []
        if not os.access(real, os.W_OK | os.X_OK):
            problems.append(ReplaceRefused(real, "this user may not write in it",
                                           hint="run as the data directory's owner"))
        clone_dir = SwapPaths(real).clone_dir
        if os.path.lexists(clone_dir) and (os.path.islink(clone_dir)
                                           or not os.path.isdir(clone_dir)):
            problems.append(ReplaceRefused(real, f"{clone_dir} is not a directory",
                                           hint="#clone/ is where a clone keeps its "
                                           "status and its copy: move that file away"))
        return problems

    def _check_keep_old(self) -> list[CloneError]:
        if self.keep_old is None:
            return []
        keep = self.keep_old
        if not os.path.isabs(keep):
            return [UsageError(f"--keep-old takes an absolute path, not '{keep}'")]
        parent = os.path.realpath(os.path.dirname(os.path.normpath(keep)))
        keep = self.keep_old = os.path.join(parent, os.path.basename(os.path.normpath(keep)))
        if os.path.lexists(keep):
            return [FileExists(keep, hint="--keep-old names a new directory for the old "
                               "data; it must not exist")]
        if not os.path.isdir(parent):
            return [ReplaceRefused(self.path, f"the parent of --keep-old {keep} does not "
                                   "exist", hint="create it first")]
        if keep == self.path or _inside(keep, self.path):
            return [PathInDatadir(self.path, hint="--keep-old must be outside the data "
                                  "directory it keeps")]
        if os.stat(parent).st_dev != os.stat(self.path).st_dev:
            return [ReplaceRefused(self.path, f"--keep-old {keep} is on another file "
                                   "system", hint="the old data is moved there by rename, "
                                   "never copied: choose a path on DATADIR's file system")]
        return []

    def _check_owner(self) -> list[CloneError]:
        """Who holds DATADIR, and whether they can be asked to let go (RESTART)."""
        servers = find_servers()
        problems: list[CloneError] = [
            PathInDatadir(s.datadir, hint=f"a `serve` (pid {s.pid}) serves {s.datadir}; "
                          f"replacing {self.path} would change what it serves")
            for s in servers if _inside(self.path, s.datadir) or _inside(s.datadir, self.path)]
        lock = self.lock = DirLock(self.path)
        if lock.try_exclusive():  # no owner: ours alone until the end
            problems += problems_of(settle, self.path, True, lock)
            paths = SwapPaths(self.path)
            if os.path.lexists(paths.old) and read_journal(paths) is None:
                problems.append(ReplaceRefused(self.path, f"{paths.old} exists without a "
                                               "replace journal", hint="move it away; it "
                                               "may hold data"))
            return problems
        if not lock.try_shared():
            return [*problems, CloneInProgress(hint=LIVE_HINT)]
        owners = [s for s in servers if s.datadir == self.path]
        if not owners:
            return [*problems, DataDirectoryLocked(
                self.path, _owner_pid(self.path), hint="a `workload` (or a server this user "
                "cannot reach) has it open and cannot be asked to let go: stop it first")]
        owner = owners[0]
        host, _, port = owner.bind.rpartition(":")
        if port == str(self.port) and _same_host(host.strip("[]"), self.host):
            return [*problems, PathInDatadir(self.path, hint=f"the donor (pid {owner.pid}) "
                                             "serves the very directory to replace")]
        try:
            client = ControlClient(owner)
        except RestartFailed as exc:
            return [*problems, DataDirectoryLocked(self.path, owner.pid, hint=exc.message)]
        try:
            self.owner_hello = client.call("hello")
            client.call("reserve", pid=os.getpid())
        except CloneError as exc:
            client.close()
            if isinstance(exc, RestartFailed):
                exc = DataDirectoryLocked(self.path, owner.pid, hint=exc.message)
            return [*problems, exc]
        self.owner, self.control = owner, client
        return problems

    def admit(self, cfg: M.Config) -> None:
        """The last checks, with the donor's CONFIG: room for the copy beside the old
        data (3873), and a workload that the new data can carry. Raises every problem
        found, these and those of :meth:`check`; else makes ``#clone/#new/`` and moves
        the status book under DATADIR."""
        problems, self.pending = self.pending, []
        st = os.statvfs(self.path)
        free = st.f_bavail * st.f_frsize
        if cfg.bytes > free:
            problems.append(DiskSpace(human_size(cfg.bytes), human_size(free), hint=(
                "free space on DATADIR's file system: the clone is made beside the old "
                "data, which stays until the new copy is whole")))
        if self.owner_hello.get("workload") is not None and not cfg.paged:
            problems.append(NotADataDirectory(
                f"the donor's data is not a page store, and the server of {self.path} "
                "runs a workload on it", hint="restart that server without --workload "
                "first, or clone a page store"))
        raise_all(problems)
        self._make_room()

    def _make_room(self) -> None:
        paths = SwapPaths(self.path)
        if not os.path.isdir(paths.clone_dir):
            os.mkdir(paths.clone_dir, 0o750)
            fsync_dir(self.path)
        self.pull_lock = PullLock(paths)
        if not self.pull_lock.wait(10.0):
            raise CloneInProgress(hint=LIVE_HINT)
        if os.path.lexists(paths.new):  # a dead pull's copy (its lock is ours now)
            remove_tree(paths.new)
        os.mkdir(paths.new, 0o700)
        # The clone's own #clone/ (REDO COPY's archive lands there), never swapped in.
        os.mkdir(SwapPaths(paths.new).clone_dir, 0o750)
        self.admitted = True
        self.book.attach(self.path)

    # -- the Destination steps ---------------------------------------------------------------
    def create(self) -> None:
        """Nothing on disk yet (that waits for :meth:`admit`). The connection runs under
        DROP DATA's row, which here counts the old data's removal, after the swap."""
        self.book.begin()
        self.book.borrow("DROP DATA")

    def attach_status(self) -> None:
        """Nothing: the status moves under DATADIR once the preflight has passed."""

    @property
    def root(self) -> str:
        return SwapPaths(self.path).new

    def with_pending(self, err: CloneError) -> CloneError:
        """A failure before :meth:`admit` (the donor cannot be reached) is reported with
        the problems already found."""
        if not self.pending:
            return err
        problems, self.pending = self.pending, []
        return Problems([*problems, err])

    def commit(self) -> None:
        """Check the copy, swap it in (restarting its server), drop the old data. Once
        the swap has committed the clone is in place whatever follows; a server that
        does not come back is raised as 3707 after DROP DATA."""
        self._check_copy()
        self.kill.reached("verified")
        self._swap()
        self._reopen()
        self._drop()
        self._close()
        self.book.complete()
        if self.restart_error is not None:
            st = self.book.status
            st.error_no, st.error_message = self.restart_error.errno, self.restart_error.message
            self.book.save(force=True, durable=True)
            raise self.restart_error

    def _check_copy(self) -> None:
        new = self.root
        if not is_paged(new):
            return  # a plain tree: every block's checksum and FILE SYNC are its checks
        from engine.pagestore import verify

        result = verify(new)
        if not result["ok"]:
            why = "; ".join(result["problems"][:3]) or f"{result['bad_pages']} bad pages"
            raise VerifyFailed(f"the clone in {new}: {why}",
                               hint="the old data is untouched; run the clone again")

    def _swap(self) -> None:
        assert self.lock is not None
        if self.control is not None:
            self.book.begin_stage("RESTART", threads=1)
            self._emit_stage("RESTART")
            try:
                self.restart["before"] = self.control.call("release", self.restart_timeout)
            except RestartFailed as exc:
                raise RestartFailed(exc.args_[0] if exc.args_ else exc.message, hint=(
                    "nothing was swapped: the old data is untouched; if its server is "
                    "gone, start it again")) from exc
            self.released = True
            self.kill.reached("released")
            if not self.lock.wait_exclusive(self.restart_timeout):
                raise DataDirectoryLocked(self.path, _owner_pid(self.path), hint=(
                    "another process opened it while its server had let go; the old "
                    "data is untouched and its server serves it again"))
        self.swap = Swap(self.path, self.kill)
        log.info("swapping the clone into %s", self.path)
        self.swap.run(self.keep_old)
        self.emit({"event": "swap", "datadir": self.path})

    def _reopen(self) -> None:
        if self.control is None:
            return
        assert self.lock is not None
        self.lock.share()  # the server holds it shared too
        try:
            self.restart["after"] = self.control.call("reopen", self.restart_timeout)
        except CloneError as exc:
            self.restart_error = RestartFailed(f"the server of {self.path} (pid "
                                               f"{self.restart_server_pid}): {exc.message}")
            self.book.end_stage("RESTART", FAILED)
        else:
            self.released = False
            self.book.end_stage("RESTART", COMPLETED)
        self._emit_stage("RESTART")
        self.kill.reached("restarted")

    @property
    def restart_server_pid(self) -> int | None:
        return self.owner.pid if self.owner is not None else None

    def _drop(self) -> None:
        """DROP DATA: the old entries removed with their counters (or kept)."""
        assert self.swap is not None
        paths = self.swap.paths
        self.book.give_back("DROP DATA")
        estimate = tree_bytes(paths.old)
        self.book.begin_stage("DROP DATA", estimate=estimate, threads=1)
        self._emit_stage("DROP DATA")
        journal = read_journal(paths)
        try:
            if journal is not None:
                self.dropped = finish(paths, journal, kill=self.kill, on_bytes=lambda n: (
                    self.book.update("DROP DATA", n, 0)))
        except (OSError, CloneError) as exc:
            # The clone is in place: a failure here leaves old files in #clone/#old/,
            # which the next command that opens DATADIR removes; nothing to undo.
            self.drop_error = getattr(exc, "message", None) or str(exc)
            log.warning("DROP DATA: %s; the old data left in %s is removed by the next "
                        "command that opens %s", self.drop_error, paths.old, self.path)
            self.book.end_stage("DROP DATA", FAILED)
        else:
            self.book.update("DROP DATA", estimate if self.keep_old else self.dropped, 0)
            self.book.end_stage("DROP DATA")
        self._emit_stage("DROP DATA")

    def abort(self, err: CloneError) -> None:
        """Before the swap's commit point: the old data as it was (the swap rolled
        back), the copy removed, the server serving the old data again, the status
        Failed with ``err``. After it: nothing to undo. Never raises."""
        if self.swap is not None and self.swap.committed:
            self._close()
            return
        paths = SwapPaths(self.path)
        if self.swap is not None and self.swap.started:
            try:
                journal = read_journal(paths)
                if journal is not None and journal["state"] == SWAPPED:
                    # Interrupted right at its commit point: the clone is in place.
                    finish(paths, journal)
                    self.book.complete()
                    self._close()
                    return
                if journal is not None:
                    rollback(paths, journal)
            except (OSError, CloneError) as exc:
                log.error("could not undo the swap (%s); the next clone-agent command that "
                          "opens %s undoes it", exc, self.path)
        if self.admitted:
            try:
                remove_tree(paths.new)
            except OSError as exc:
                log.error("could not remove %s: %s", paths.new, exc)
        self._fail(err)
        if self.released and self.control is not None:
            if self.lock is not None:  # let the server settle whatever is left
                self.lock.close()
            try:
                self.control.call("reopen", self.restart_timeout)
            except CloneError as exc:
                log.error("the server of %s did not serve again: %s", self.path, exc.message)
        self._close()

    def _fail(self, err: CloneError) -> None:
        if not self.admitted:
            self.book.detach()  # DATADIR is not ours to write in
        try:
            self.book.fail(err)
        except OSError:  # a full disk under the status: the state directory keeps it
            self.book.detach()
            try:
                self.book.fail(err)
            except OSError as exc:
                log.error("could not record the failure: %s", exc)

    def _close(self) -> None:
        """The reservation, the pull's lock and DATADIR's lock, released. Idempotent."""
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.pull_lock is not None:
            self.pull_lock.close()
            self.pull_lock = None
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    # -- the summary --------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        restarted = bool(self.restart.get("after"))
        last_txn = (self.restart.get("after") or {}).get("last_txn")
        if restarted:
            message = f"the server of {self.path} (pid {self.restart_server_pid}) serves the clone"
            if self.owner_hello.get("workload") is not None and last_txn is not None:
                message += f"; its workload goes on from transaction {last_txn + 1}"
        else:
            message = f"{self.path} holds the clone; no server owned it: it is ready to use"
        return {"replace": {
            "datadir": self.path, "restarted": restarted, "server_pid": self.restart_server_pid,
            "last_txn": last_txn, "old_data": f"kept in {self.keep_old}" if self.keep_old
            else "removed", "dropped_bytes": self.dropped, "drop_error": self.drop_error,
            "message": message}}

    def _emit_stage(self, stage: str) -> None:
        self.emit({"event": "stage", **self.book.stage(stage).public()})

