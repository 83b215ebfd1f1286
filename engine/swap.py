"""Replace mode's swap: the durable journal under ``DATADIR/#clone/``, and settling what
a crash left, by whichever clone-agent command opens the directory next.

Everything lives under ``DATADIR/#clone/``, which no swap moves and no donor sends:

==============  =====================================================================
``#new/``       the clone as it is made (the pull's destination root), on DATADIR's own
                file system, so every move below is a rename: atomic, and free of space
``#pull.lock``  held (flock, exclusive) by the pull that owns ``#new/``, for its whole
                life: nothing of a live pull is ever settled by another process
``#swap``       the journal (JSON, replaced atomically and durably): the lists of
                top-level names and the state, ``swapping`` (a crash rolls back) or
                ``swapped`` (a crash rolls forward)
``#old/``       DATADIR's former top-level entries, from the swap until DROP DATA
==============  =====================================================================

The swap (:meth:`Swap.run`), once ``#new/`` is whole and checked, with the lists of
top-level names of the old tree and of the clone fixed in the journal first:

1. the journal, ``swapping``, durable; then ``#old/``;
2. every old entry ``DATADIR/N`` -> ``#old/N``; fsync of both directories;
3. every new entry ``#new/N`` -> ``DATADIR/N``; fsync of both directories;
4. the journal, ``swapped``, durable: the commit point;
5. (:func:`finish`) ``#new/`` removed, ``#old/`` removed (DROP DATA) or renamed to
   ``--keep-old``, the journal removed.

DATADIR itself (its inode, owner and mode) stays: only its entries change. A rollback
also puts back its times, which the renames moved.

Where an entry is after a crash needs no record per step: a rename is atomic, an old
entry is in ``#old/N`` once moved, a new one has left ``#new/N`` once moved, and the
two phases never overlap. So rolling back is "every new entry missing from ``#new/``
goes back there from DATADIR, then every old entry in ``#old/`` goes back", whatever
subset of the renames reached the disk; rolling forward is step 5, which is
idempotent. MySQL keeps lists of the same kind (``#new_files``, ``#old_files``,
``#replace_files``) and moves each file through ``.#clone`` and ``.#clone_save``.

Locks are flocks on DATADIR's own directory, an inode the swap never replaces. An
owner (``serve``, ``workload``, ``verify``'s reader) holds it shared while it has the
data open (:func:`open_shared`), after settling; a pull holds it exclusive to swap,
and for its whole life when no server owns DATADIR. So no one opens a half-swapped
directory, no swap starts under an owner, and a kill -9 at any point is finished or
undone by the next command that opens DATADIR.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from engine.errors import CloneInProgress, LocalIOError, from_oserror
from engine.faults import NEVER, KillPoints
from engine.fsutil import fsync_dir, remove_tree, write_durable
from engine.status import STATUS_DIR, note_settled

log = logging.getLogger("clone_agent.swap")

NEW_DIR = "#new"
OLD_DIR = "#old"
JOURNAL = "#swap"
PULL_LOCK = "#pull.lock"
SWAPPING, SWAPPED = "swapping", "swapped"
_MEDDLED = ("nothing was changed; look at DATADIR/#clone/ (#swap says which names were "
            "the old tree's and which the clone's) and put them right by hand")
LIVE_HINT = ("a `pull --replace` is replacing this data directory: wait for it to end "
             "(`clone-agent status DATADIR` shows it)")


@dataclass(frozen=True)
class SwapPaths:
    """The paths of one data directory's replace, all under ``root/#clone/``."""

    root: str

    @property
    def clone_dir(self) -> str:
        return os.path.join(self.root, STATUS_DIR)

    @property
    def new(self) -> str:
        return os.path.join(self.clone_dir, NEW_DIR)

    @property
    def old(self) -> str:
        return os.path.join(self.clone_dir, OLD_DIR)

    @property
    def journal(self) -> str:
        return os.path.join(self.clone_dir, JOURNAL)

    @property
    def pull_lock(self) -> str:
        return os.path.join(self.clone_dir, PULL_LOCK)


# -- locks ------------------------------------------------------------------------------
def _within(attempt: Callable[[], bool], timeout: float) -> bool:
    """``attempt`` until it succeeds, for ``timeout`` seconds at most (polled: the
    holders of a lock are other processes that end or release on their own clock)."""
    deadline = time.monotonic() + timeout
    while not attempt():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


class DirLock:
    """A flock on a directory's own inode, held by the process that made this object
    (never inherited: the descriptor is close-on-exec). ``close()`` releases it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.held: str | None = None

    def _try(self, how: int, name: str) -> bool:
        try:
            fcntl.flock(self.fd, how | fcntl.LOCK_NB)
        except BlockingIOError:
            # Linux converts a lock by dropping it first: a failed conversion holds none
            self.held = None
            return False
        self.held = name
        return True

    def try_shared(self) -> bool:
        return self._try(fcntl.LOCK_SH, "shared")

    def try_exclusive(self) -> bool:
        return self._try(fcntl.LOCK_EX, "exclusive")

    def wait_exclusive(self, timeout: float) -> bool:
        """Exclusive within ``timeout`` seconds; False if it did not come."""
        return _within(self.try_exclusive, timeout)

    def wait_shared(self, timeout: float) -> bool:
        """Shared within ``timeout`` seconds; False if it did not come."""
        return _within(self.try_shared, timeout)

    def share(self) -> None:
        """From exclusive to shared (nobody else can hold it meanwhile: cannot fail)."""
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        self.held = "shared"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the flock with the open file description
            self.fd = -1
            self.held = None

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PullLock:
    """``#clone/#pull.lock``: exclusive for a live pull's whole life. The file is never
    removed (a lock file unlinked while someone holds it would let a second holder in
    on a new inode); it is empty."""

    def __init__(self, paths: SwapPaths) -> None:
        self.fd = os.open(paths.pull_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def try_lock(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.try_lock():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)  # a settler holds it for the moment it looks
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- the journal ------------------------------------------------------------------------
def read_journal(paths: SwapPaths) -> dict[str, Any] | None:
    try:
        with open(paths.journal, "rb") as fh:
            data: dict[str, Any] = orjson.loads(fh.read())
    except FileNotFoundError:
        return None
    if data.get("state") not in (SWAPPING, SWAPPED):
        raise LocalIOError(f"the replace journal {paths.journal} is not one we wrote",
                           hint="move it away only if no `pull --replace` ever ran here")
    return data


def _write_journal(paths: SwapPaths, journal: dict[str, Any]) -> None:
    write_durable(paths.journal, orjson.dumps(journal, option=orjson.OPT_INDENT_2))


def top_names(path: str) -> list[str]:
    """A tree's top-level names, ``#clone`` (ours, never swapped) left out."""
    return sorted(n for n in os.listdir(path) if n != STATUS_DIR)


def _meta(path: str) -> dict[str, Any]:
    st = os.stat(path)
    return {"mode": stat.S_IMODE(st.st_mode), "times": [st.st_atime_ns, st.st_mtime_ns]}


def _apply_meta(path: str, meta: dict[str, Any]) -> None:
    """A directory's own mode and times, as they were before the swap. Best effort: not
    being its owner is no reason to fail a rollback."""
    try:
        os.chmod(path, meta["mode"])
        os.utime(path, ns=tuple(meta["times"]))
    except OSError as exc:
        log.warning("could not set the mode and times of %s: %s", path, exc.strerror)


class Swap:
    """The swap of one replace, run by the pull that owns ``#new/`` and holds DATADIR
    exclusive. ``run`` ends at the commit point; :func:`finish` or :func:`rollback`
    follows (by this process, or by the next opener after a crash)."""

    def __init__(self, datadir: str, kill: KillPoints = NEVER) -> None:
        self.paths = SwapPaths(datadir)
        self.kill = kill
        self.started = False
        self.committed = False

    def run(self, keep_old: str | None) -> None:
        p = self.paths
        journal: dict[str, Any] = {"format": 1, "state": SWAPPING, "pid": os.getpid(),
                   "old": top_names(p.root), "new": top_names(p.new), "keep_old": keep_old,
                   "old_meta": _meta(p.root)}
        if os.path.lexists(p.old):  # never ours without a journal: someone's data
            raise LocalIOError(f"{p.old} exists without a replace journal",
                               hint="move it away; it may hold data")
        self.started = True
        _write_journal(p, journal)
        self.kill.reached("journal")
        os.mkdir(p.old, 0o700)
        for name in journal["old"]:
            os.rename(os.path.join(p.root, name), os.path.join(p.old, name))
            self.kill.count("rename")
        fsync_dir(p.root)
        fsync_dir(p.old)
        for name in journal["new"]:
            os.rename(os.path.join(p.new, name), os.path.join(p.root, name))
            self.kill.count("rename")
        fsync_dir(p.new)
        fsync_dir(p.root)
        self.kill.reached("renamed")
        journal["state"] = SWAPPED
        _write_journal(p, journal)
        self.committed = True
        self.kill.reached("swapped")


def rollback(paths: SwapPaths, journal: dict[str, Any], kill: KillPoints = NEVER) -> None:
    """Undo an uncommitted swap: the old tree back in DATADIR, the clone back in
    ``#new/`` (then removed), the journal removed. Idempotent; it refuses, rather than
    guesses, where the state is not one a swap can leave (someone moved things)."""
    root = paths.root
    if not os.path.isdir(paths.new):  # a swap never removes it before its commit point
        raise LocalIOError(f"the replace journal {paths.journal} says 'swapping' but "
                           f"{paths.new} is gone", hint=_MEDDLED)
    for name in reversed(journal["new"]):
        if not os.path.lexists(os.path.join(paths.new, name)) and \
                os.path.lexists(os.path.join(root, name)):
            os.rename(os.path.join(root, name), os.path.join(paths.new, name))
    for name in reversed(journal["old"]):
        if os.path.lexists(os.path.join(paths.old, name)):
            if os.path.lexists(os.path.join(root, name)):  # rename would replace it
                raise LocalIOError(f"{name} is both in {paths.root} and in {paths.old}",
                                   hint=_MEDDLED)
            os.rename(os.path.join(paths.old, name), os.path.join(root, name))
    fsync_dir(root)
    kill.reached("undone")
    _apply_meta(root, journal["old_meta"])
    # #old/ is empty now; then the journal, then the copy: a crash between two of these
    # leaves a state that settles again (an empty #old/ with its journal, or a copy
    # without a journal, which is removed), never old data in #old/ without a journal.
    try:
        os.rmdir(paths.old)  # rmdir, not a tree removal: never old data
    except FileNotFoundError:
        pass
    _unlink_journal(paths)
    _remove_quietly(paths.new)


def finish(paths: SwapPaths, journal: dict[str, Any],
           on_bytes: Callable[[int], None] | None = None, kill: KillPoints = NEVER) -> int:
    """Step 5 of a committed swap: ``#new/`` removed, the old tree dropped (or moved to
    ``keep_old``), the journal removed. Idempotent, and safe to run while a server has
    the new data open: nothing it touches is DATADIR's content. Returns the bytes of
    old files removed."""
    _remove_quietly(paths.new)
    dropped = 0
    keep_old = journal.get("keep_old")
    if keep_old and os.path.lexists(paths.old):
        if os.path.lexists(keep_old):
            raise LocalIOError(f"--keep-old {keep_old} exists: the old data stays in "
                               f"{paths.old}", hint="move it where you want it by hand")
        os.rename(paths.old, keep_old)  # same file system, checked before the clone
        fsync_dir(os.path.dirname(keep_old))
        fsync_dir(paths.clone_dir)
    elif not keep_old:
        dropped = drop_tree(paths.old, on_bytes, kill)
    kill.reached("dropped")
    _unlink_journal(paths)
    return dropped


def _unlink_journal(paths: SwapPaths) -> None:
    try:
        os.unlink(paths.journal)
    except FileNotFoundError:
        pass
    fsync_dir(paths.clone_dir)


def _remove_quietly(path: str) -> None:
    try:
        remove_tree(path)
    except FileNotFoundError:  # another settler got there first
        pass


# -- DROP DATA --------------------------------------------------------------------------
def tree_bytes(path: str) -> int:
    """Bytes of the regular files under ``path`` (links not followed): DROP DATA's
    estimate."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def drop_tree(path: str, on_bytes: Callable[[int], None] | None = None,
              kill: KillPoints = NEVER) -> int:
    """Remove ``path`` and everything below it, never following a link, telling
    ``on_bytes`` the bytes removed so far after each file. A missing entry (another
    settler removing the same tree) is skipped, so two can run at once."""
    done = 0

    def walk(dirpath: str) -> None:
        nonlocal done
        try:
            os.chmod(dirpath, 0o700)  # a read-only directory of the old tree
            entries = list(os.scandir(dirpath))
        except FileNotFoundError:
            return
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    walk(entry.path)
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                done += st.st_size
            if on_bytes is not None:
                on_bytes(done)
            kill.count("drop")
        try:
            os.rmdir(dirpath)
        except FileNotFoundError:
            pass

    if os.path.lexists(path):
        walk(path)
    return done


# -- settling: what every opener does first -----------------------------------------------
def settle(datadir: str, strict: bool = True, held: DirLock | None = None) -> str | None:
    """Finish or undo a replace that a crash interrupted; say what was done (None:
    nothing to do, or not ours to do now).

    A live pull's work (its ``#pull.lock`` held) is left alone; if it is mid-swap,
    ``strict`` raises :class:`CloneInProgress` (for a command about to open the
    data), else returns None (``status``). Undoing a swap takes DATADIR exclusive
    (``held``: the caller's own lock, already exclusive). Never blocks."""
    paths = SwapPaths(os.path.abspath(datadir))
    if not any(os.path.lexists(p) for p in (paths.journal, paths.new, paths.old)):
        return None
    journal = read_journal(paths)
    try:
        lock = PullLock(paths)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            return None  # a reader who may not write here settles nothing
        raise
    try:
        if not lock.try_lock():
            return _live(journal, strict)
        if journal is None:
            if os.path.lexists(paths.new):
                remove_tree(paths.new)  # a copy whose pull died before its swap
                note_settled(paths.root, forward=False)
                log.info("removed the unfinished copy of a replace in %s", paths.new)
                return "removed"
            return None
        if journal["state"] == SWAPPED:
            finish(paths, journal)
            note_settled(paths.root, forward=True)
            log.info("finished the replace of %s (the new data was already in place)",
                     paths.root)
            return "finished"
        return _undo(paths, journal, strict, held)
    finally:
        lock.close()


def settle_gone(datadir: str, timeout: float) -> str | None:
    """:func:`settle` for a pull known to have ended (its control channel closed): its
    process may still hold ``#pull.lock`` or DATADIR a moment longer (a process killed
    with SIGKILL closes its descriptors in no set order), so what it left is retried
    until it is settled or ``timeout`` seconds have passed."""
    paths = SwapPaths(os.path.abspath(datadir))
    outcome: list[str | None] = [None]

    def attempt() -> bool:
        try:
            outcome[0] = settle(datadir, strict=True)
        except CloneInProgress:
            return False
        return outcome[0] is not None or not any(
            os.path.lexists(p) for p in (paths.journal, paths.new, paths.old))

    _within(attempt, timeout)
    return outcome[0]


def _live(journal: dict[str, Any] | None, strict: bool) -> str | None:
    if strict and journal is not None and journal["state"] == SWAPPING:
        raise CloneInProgress(hint=LIVE_HINT)
    return None


def _undo(paths: SwapPaths, journal: dict[str, Any], strict: bool,
          held: DirLock | None) -> str | None:
    own = held is None
    lock = DirLock(paths.root) if held is None else held
    try:
        if own and not lock.try_exclusive():
            return _live(journal, strict)  # someone has the data open: not now
        rollback(paths, journal)
        note_settled(paths.root, forward=False)
        log.info("rolled back an interrupted replace of %s: the old data is back",
                 paths.root)
        return "rolled back"
    finally:
        if own:
            lock.close()


def open_shared(datadir: str, wait: float = 0.0) -> DirLock:
    """What an owner does before it opens a data directory: settle, then hold it shared
    (released by ``close()``). Raises :class:`CloneInProgress` while a pull swaps it
    (``wait``: for that long at most, when that pull is known to be ending)."""
    try:
        settle(datadir, strict=True)
        lock = DirLock(datadir)
    except (FileNotFoundError, NotADirectoryError):
        raise  # no directory: each caller has its own words for that
    except OSError as exc:
        raise from_oserror(exc, f"opening {datadir}") from None
    if not (lock.wait_shared(wait) if wait else lock.try_shared()):
        lock.close()
        raise CloneInProgress(hint=LIVE_HINT)
    return lock
