"""The page store: one owner per data directory, a buffer pool, write-ahead redo,
checkpoints, crash recovery, and what a clone needs (page tracking, redo archiving,
a backup lock that DDL waits on, a consistent point).

Threading: one re-entrant latch guards everything; a transaction is one mtr applied
under it, so taking the latch is a transaction boundary. The owner is the process
that opened the store (``serve``, ``workload``); ``verify`` opens it read-only, which
recovers into memory and never writes.

Durability: a commit is written to the redo file before the call returns (it survives
a kill -9 of the owner); the log is fsynced before any page it covers is flushed
(write-ahead), at checkpoints and at close (innodb_flush_log_at_trx_commit = 2).

Past 600 lines: the store's state (pool, spaces, log, tracker, archiver, latch) is one
object that recovery, the workload and a clone all change under one latch; the parts
that need none of it (redo format, page format, apply) are modules of their own.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from engine.errors import (
    DataDirectoryLocked,
    LockWaitTimeout,
    NotADataDirectory,
)
from engine.fsutil import fsync_dir, open_beneath, unlink_beneath, write_durable
from engine.pagestore.apply import apply_mtr
from engine.pagestore.page import file_header_page, page_checksum
from engine.pagestore.redo import (
    R_INIT,
    R_WRITE,
    LogWriter,
    Mtr,
    rec_init,
    rec_space_create,
    rec_space_drop,
    rec_space_extend,
    rec_write,
    scan_log,
)
from engine.swap import open_shared

REDO_DIR = "#ib_redo"
ARCHIVE_DIR = "#ib_archive"
CONTROL = "control"
LOCK_FILE = "owner.lock"
FIRST_LSN = 8192
BINLOG_ROTATE = 1 << 20  #: emulated binlog file size before the next file
PREFETCH_PAGES = 1 << 16  #: pages recovery asks the kernel for ahead (1 GiB at 16 KiB)


def binlog_name(number: int) -> str:
    return f"binlog.{number:06d}"


@dataclass
class Space:
    id: int
    path: str  # relative to the data directory
    pages: int
    fd: int = -1


class Frame:
    __slots__ = ("page", "dirty", "oldest")

    def __init__(self, page: bytearray) -> None:
        self.page = page
        self.dirty = False
        self.oldest = 0


class Tracker:
    """Page tracking for a clone: every page changed or flushed from ``lsn`` on."""

    def __init__(self, root: str, lsn: int) -> None:
        self.lsn = lsn
        self.dir = os.path.join(root, ARCHIVE_DIR, f"page_group_{lsn}")
        os.makedirs(self.dir, exist_ok=True)
        self.path = os.path.join(self.dir, "tracked.bin")
        self._fh = open(self.path, "ab")  # noqa: SIM115 - closed by stop()
        self._seen: set[tuple[int, int]] = set()

    def add(self, space: int, page_no: int) -> None:
        key = (space, page_no)
        if key not in self._seen:  # the file keeps each id once; order does not matter
            self._seen.add(key)
            self._fh.write(space.to_bytes(4, "little") + page_no.to_bytes(4, "little"))

    def stop(self) -> list[tuple[int, int]]:
        """Close the tracking file and return its page ids, sorted and de-duplicated."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        with open(self.path, "rb") as fh:
            raw = fh.read()
        ids = {(int.from_bytes(raw[i : i + 4], "little"),
                int.from_bytes(raw[i + 4 : i + 8], "little")) for i in range(0, len(raw), 8)}
        return sorted(ids)


class Archiver:
    """Redo archiving for a clone: a copy of every frame written from ``lsn`` on."""

    def __init__(self, root: str, lsn: int) -> None:
        self.lsn = lsn
        self.dir = os.path.join(root, ARCHIVE_DIR, f"log_group_{lsn}")
        os.makedirs(self.dir, exist_ok=True)
        self.path = os.path.join(self.dir, "archive.log")
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                          0o640)
        self.size = 0

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)
        self.size += len(data)

    def stop(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


class BackupLock:
    """Clone holds it shared; DDL needs it free (MySQL's backup lock). A clone waits for
    a DDL at most its clone_ddl_timeout; a DDL waits for the clones at most the same
    clone_ddl_timeout of the clone holding the lock, read when it finds the lock held,
    so a DDL that asks just as a clone takes the lock still gives up in time."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.clones = 0
        self.ddl = 0
        self.clone_ddl_timeout = 0.0

    def acquire_clone(self, timeout: float) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.ddl == 0, timeout=timeout):
                raise LockWaitTimeout()
            self.clones += 1
            self.clone_ddl_timeout = max(self.clone_ddl_timeout, timeout) \
                if self.clones > 1 else timeout

    def release_clone(self) -> None:
        with self._cond:
            self.clones = max(0, self.clones - 1)
            self._cond.notify_all()

    def ddl_limit(self, timeout: float | None) -> float:
        """How long a DDL waits: ``timeout``, or (None) the holding clone's
        clone_ddl_timeout."""
        return self.clone_ddl_timeout if timeout is None else timeout

    def acquire_ddl(self, timeout: float | None = None) -> None:
        with self._cond:
            asked = time.monotonic()
            while self.clones:
                left = asked + self.ddl_limit(timeout) - time.monotonic()
                if left <= 0:
                    raise LockWaitTimeout()
                self._cond.wait(left)
            self.ddl += 1

    def release_ddl(self) -> None:
        with self._cond:
            self.ddl -= 1
            self._cond.notify_all()


def is_paged(datadir: str) -> bool:
    return os.path.isfile(os.path.join(datadir, REDO_DIR, CONTROL))


def read_control(datadir: str) -> dict[str, Any]:
    try:
        with open(os.path.join(datadir, REDO_DIR, CONTROL), "rb") as fh:
            data: dict[str, Any] = orjson.loads(fh.read())
            return data
    except (FileNotFoundError, NotADirectoryError):
        raise NotADataDirectory(datadir, hint="create one with `clone-agent init DATADIR`") \
            from None


def write_control(datadir: str, control: dict[str, Any]) -> None:
    write_durable(os.path.join(datadir, REDO_DIR, CONTROL),
                  orjson.dumps(control, option=orjson.OPT_INDENT_2))


class PageStore:
    """An open data directory. ``with PageStore(path) as store:``."""

    def __init__(self, datadir: str, readonly: bool = False, pool_pages: int = 2048) -> None:
        self.root = os.path.abspath(datadir)
        self.readonly = readonly
        self.pool_pages = pool_pages
        self.latch = threading.RLock()
        self.backup_lock = BackupLock()
        self.pool: OrderedDict[tuple[int, int], Frame] = OrderedDict()
        self.spaces: dict[int, Space] = {}
        self.tracker: Tracker | None = None
        self.archiver: Archiver | None = None
        self.log: LogWriter | None = None
        self._lock_fd = -1
        self.recovered_mtrs = 0
        self.commits = 0
        # A replace that a crash interrupted is finished or undone before anything is
        # read, and the directory is held shared so that no swap starts under us.
        try:
            self._dir_lock = open_shared(self.root)
        except (FileNotFoundError, NotADirectoryError):
            read_control(self.root)  # not a directory at all: the usual error, with its hint
            raise
        try:
            control = read_control(self.root)
        except BaseException:
            self._dir_lock.close()
            raise
        self.page_size: int = control["page_size"]
        self.server_uuid: str = control["server_uuid"]
        self.checkpoint_lsn: int = control["checkpoint_lsn"]
        self.last_txn: int = control.get("last_txn", 0)
        self.binlog_file: int = control.get("binlog_file", 1)
        self.binlog_pos: int = control.get("binlog_pos", 4)
        self.next_space_id: int = control.get("next_space_id", 100)
        self.control = control
        try:
            self._take_lock(shared=readonly)
            for sid, info in control["spaces"].items():
                self._open_space(int(sid), info["path"], info["pages"])
            self._recover()
            if not readonly:
                self.log = LogWriter(os.path.join(self.root, REDO_DIR), self.lsn)
                self.checkpoint(sharp=True)
                self._clean_archives()
        except BaseException:
            self._close_files()
            raise

    # -- ownership -------------------------------------------------------------------
    def _take_lock(self, shared: bool) -> None:
        """One owner (exclusive); a reader such as verify takes it shared, so it never
        reads a directory that an owner is changing."""
        path = os.path.join(self.root, REDO_DIR, LOCK_FILE)
        fd = os.open(path, (os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT) | os.O_CLOEXEC,
                     0o640) if not shared or os.path.exists(path) else -1
        if fd < 0:
            return
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.pread(fd, 32, 0).decode().strip() or "?"
            finally:
                os.close(fd)
            raise DataDirectoryLocked(self.root, pid) from None
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _clean_archives(self) -> None:
        """#ib_archive/ belongs to a running clone; one left by a crash is removed."""
        shutil.rmtree(os.path.join(self.root, ARCHIVE_DIR), ignore_errors=True)

    # -- spaces --------------------------------------------------------------------
    def _open_space(self, sid: int, path: str, pages: int, make_parents: bool = False
                    ) -> Space:
        # Beneath the root without following any link: the paths come from the control
        # file and the redo log, which in a clone the donor wrote (RECOVERY replays them).
        flags = os.O_RDONLY if self.readonly else os.O_RDWR | os.O_CREAT
        fd = open_beneath(self.root, path, flags, 0o640, make_parents=make_parents)
        size = os.fstat(fd).st_size
        pages = max(pages, size // self.page_size)
        space = Space(sid, path, pages, fd)
        self.spaces[sid] = space
        return space

    def space_by_path(self, path: str) -> Space | None:
        for space in self.spaces.values():
            if space.path == path:
                return space
        return None

    # -- the Target protocol (apply.py) -----------------------------------------------
    def get_page(self, space: int, page_no: int) -> bytearray | None:
        key = (space, page_no)
        frame = self.pool.get(key)
        if frame is not None:
            self.pool.move_to_end(key)
            return frame.page
        sp = self.spaces.get(space)
        if sp is None:
            return None
        data = os.pread(sp.fd, self.page_size, page_no * self.page_size)
        page = bytearray(data.ljust(self.page_size, b"\0"))
        self.pool[key] = Frame(page)
        return page

    def page_changed(self, space: int, page_no: int, start_lsn: int) -> None:
        frame = self.pool[(space, page_no)]
        if not frame.dirty:
            frame.dirty = True
            frame.oldest = start_lsn
        if self.tracker is not None:
            self.tracker.add(space, page_no)
        sp = self.spaces.get(space)
        if sp is not None and page_no >= sp.pages:
            sp.pages = page_no + 1

    def space_created(self, space: int, pages: int, path: str) -> None:
        if space in self.spaces:
            return
        if self.readonly and not os.path.lexists(os.path.join(self.root, path)):
            self.spaces[space] = Space(space, path, pages, os.open("/dev/null", os.O_RDONLY))
        else:
            self._open_space(space, path, pages, make_parents=not self.readonly)
        self.next_space_id = max(self.next_space_id, space + 1)

    def space_dropped(self, space: int, path: str) -> None:
        sp = self.spaces.pop(space, None)
        for key in [k for k in self.pool if k[0] == space]:
            del self.pool[key]
        if sp is not None:
            os.close(sp.fd)
        if not self.readonly:
            try:
                unlink_beneath(self.root, path)
            except FileNotFoundError:
                pass

    def space_extended(self, space: int, pages: int) -> None:
        sp = self.spaces.get(space)
        if sp is not None and pages > sp.pages:
            sp.pages = pages
            if not self.readonly:
                os.ftruncate(sp.fd, pages * self.page_size)

    def committed(self, txn: int, binlog_file: int, binlog_pos: int) -> None:
        self.last_txn = max(self.last_txn, txn)
        self.binlog_file, self.binlog_pos = binlog_file, binlog_pos
        self.commits += 1

    # -- recovery ------------------------------------------------------------------
    def _recover(self) -> None:
        self._prefetch(scan_log(os.path.join(self.root, REDO_DIR), self.checkpoint_lsn))
        lsn = self.checkpoint_lsn
        for mtr in scan_log(os.path.join(self.root, REDO_DIR), self.checkpoint_lsn):
            apply_mtr(self, mtr)
            lsn = mtr.end_lsn
            self.recovered_mtrs += 1
            if not self.readonly and len(self.pool) > self.pool_pages:
                self.lsn = lsn
                self._evict_clean()
        self.lsn = lsn

    def _prefetch(self, mtrs: Iterator[Mtr]) -> None:
        """Ask the kernel at once for every page the redo will touch, in file order.

        Read one at a time, pages that are not in the page cache (a clone's, written with
        O_DIRECT) cost a disk round trip each, one after another; asked for together they
        are read in parallel. A first pass over the log is cheap (it is parsed again to
        apply it); at most PREFETCH_PAGES pages are asked for."""
        wanted: set[tuple[int, int]] = set()
        for mtr in mtrs:
            for rec in mtr.records():
                if rec[0] == R_WRITE or rec[0] == R_INIT:
                    wanted.add((rec[1], rec[2]))
            if len(wanted) >= PREFETCH_PAGES:
                break
        run: tuple[int, int, int] | None = None  # space, first page, pages
        for space, page_no in sorted(wanted):
            if run is not None and run[0] == space and run[1] + run[2] == page_no:
                run = (space, run[1], run[2] + 1)
                continue
            if run is not None:
                self._willneed(*run)
            run = (space, page_no, 1)
        if run is not None:
            self._willneed(*run)

    def _willneed(self, space: int, first: int, pages: int) -> None:
        sp = self.spaces.get(space)
        if sp is not None and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(sp.fd, first * self.page_size, pages * self.page_size,
                             os.POSIX_FADV_WILLNEED)

    # -- writing -------------------------------------------------------------------
    def commit(self, records: list[bytes]) -> int:
        """Log and apply one mini-transaction atomically; returns its end LSN."""
        assert self.log is not None, "read-only store"
        body = b"".join(records)
        with self.latch:
            start, end, data = self.log.append(body)
            if self.archiver is not None:
                self.archiver.write(data)
            apply_mtr(self, Mtr(start, end, body))
            self.lsn = end
            if len(self.pool) > self.pool_pages:
                self._evict()
            return end

    def _evict(self) -> None:
        """Keep the pool bounded: flush and drop the least recently used pages."""
        excess = len(self.pool) - self.pool_pages
        victims: list[tuple[tuple[int, int], Frame]] = []
        for key, frame in self.pool.items():
            if len(victims) >= max(excess, 64):
                break
            victims.append((key, frame))
        self._flush(victims)
        for key, _ in victims:
            self.pool.pop(key, None)

    def _evict_clean(self) -> None:
        """During recovery (no log writer yet): drop clean pages, write dirty ones."""
        excess = len(self.pool) - self.pool_pages
        for key in list(itertools.islice(self.pool, max(excess, 64))):
            frame = self.pool[key]
            if frame.dirty:
                sp = self.spaces.get(key[0])
                if sp is not None:
                    os.pwrite(sp.fd, frame.page, key[1] * self.page_size)
            del self.pool[key]

    def _flush(self, frames: list[tuple[tuple[int, int], Frame]]) -> None:
        dirty = [(k, f) for k, f in frames if f.dirty]
        if not dirty:
            return
        assert self.log is not None
        self.log.flush()  # write-ahead: the redo of a page is durable before the page
        for (space, page_no), frame in sorted(dirty, key=lambda kf: kf[0]):
            sp = self.spaces.get(space)
            if sp is None:
                continue
            os.pwrite(sp.fd, frame.page, page_no * self.page_size)
            frame.dirty = False
            if self.tracker is not None:
                self.tracker.add(space, page_no)

    def flush_some(self, n: int) -> None:
        with self.latch:
            frames = [(k, f) for k, f in self.pool.items() if f.dirty]
            frames.sort(key=lambda kf: kf[1].oldest)
            self._flush(frames[:n])

    def checkpoint(self, sharp: bool = False) -> int:
        """Advance the checkpoint (flushing everything first when ``sharp``)."""
        with self.latch:
            assert self.log is not None
            if sharp:
                self._flush(list(self.pool.items()))
                for sp in self.spaces.values():
                    os.fsync(sp.fd)
            oldest = [f.oldest for f in self.pool.values() if f.dirty]
            self.log.flush()
            lsn = min(oldest) if oldest else self.lsn
            if not sharp:
                for sp in self.spaces.values():
                    os.fsync(sp.fd)
            self.checkpoint_lsn = lsn
            self._write_control(clean=False)
            self.log.purge(lsn)
            return lsn

    def _registry(self) -> dict[str, Any]:
        return {str(s.id): {"path": s.path, "pages": s.pages} for s in self.spaces.values()}

    def _write_control(self, clean: bool) -> None:
        # The log is flushed before this, so every commit up to last_txn is durable and
        # recovery (which takes the maximum) can never go below it.
        self.control.update(
            checkpoint_lsn=self.checkpoint_lsn, spaces=self._registry(),
            next_space_id=self.next_space_id, last_txn=self.last_txn,
            binlog_file=self.binlog_file, binlog_pos=self.binlog_pos, clean=clean,
        )
        write_control(self.root, self.control)

    # -- DDL -----------------------------------------------------------------------
    def create_space(self, path: str, pages: int, ddl_timeout: float | None = None,
                     hold: float = 0.0) -> int:
        """CREATE TABLESPACE: waits on the backup lock while a clone runs. ``hold`` keeps
        the lock that long first (a slow DDL, for tests)."""
        self.backup_lock.acquire_ddl(ddl_timeout)
        try:
            if hold:
                time.sleep(hold)  # fault point: the DDL itself is slow
            with self.latch:
                sid = self.next_space_id
                header = file_header_page(self.page_size, sid, 0)
                self.commit([rec_space_create(sid, pages, path), rec_init(sid, 0, 1),
                             rec_write(sid, 0, 32, bytes(header[32:60]))])
                return sid
        finally:
            self.backup_lock.release_ddl()

    def drop_space(self, sid: int, ddl_timeout: float | None = None) -> None:
        self.backup_lock.acquire_ddl(ddl_timeout)
        try:
            with self.latch:
                sp = self.spaces[sid]
                self.commit([rec_space_drop(sid, sp.path)])
        finally:
            self.backup_lock.release_ddl()

    def extend_space(self, sid: int, pages: int) -> None:
        self.commit([rec_space_extend(sid, pages)])

    # -- what a clone needs ------------------------------------------------------------
    def start_tracking(self) -> int:
        """FILE COPY: checkpoint, then track every page changed or flushed from there."""
        with self.latch:
            self.checkpoint()
            self.tracker = Tracker(self.root, self.checkpoint_lsn)
            for (space, page_no), frame in self.pool.items():
                if frame.dirty:
                    self.tracker.add(space, page_no)
            return self.checkpoint_lsn

    def start_archiving_stop_tracking(self) -> tuple[int, list[tuple[int, int]]]:
        """PAGE COPY: redo archiving starts first, then tracking stops (in one latch)."""
        with self.latch:
            assert self.log is not None and self.tracker is not None
            self.archiver = Archiver(self.root, self.lsn)
            pages = self.tracker.stop()
            self.tracker = None
            return self.archiver.lsn, pages

    def read_pages_fresh(self, pages: list[tuple[int, int]]) -> list[bytes | None]:
        """Several pages as of one moment, under one latch (PAGE COPY reads a block)."""
        with self.latch:
            return [self.read_page_fresh(space, page_no) for space, page_no in pages]

    def read_page_fresh(self, space: int, page_no: int) -> bytes | None:
        """The page as of now (the buffer pool's copy when it is there), sealed."""
        with self.latch:
            frame = self.pool.get((space, page_no))
            if frame is not None:
                return bytes(frame.page)
            sp = self.spaces.get(space)
            if sp is None:
                return None
            return os.pread(sp.fd, self.page_size, page_no * self.page_size).ljust(
                self.page_size, b"\0")

    def consistent_point(self) -> dict[str, Any]:
        """REDO COPY: the clone LSN at a transaction boundary; archiving stops there."""
        assert self.log is not None and self.archiver is not None
        # Make what is already written durable before blocking anyone, so that under
        # the latch only the last few frames remain to sync.
        os.fdatasync(self.archiver.fd)
        self.log.sync_written()
        started = time.monotonic()
        with self.latch:
            self.log.flush()
            self.archiver.stop()
            point = {
                "clone_lsn": self.lsn, "archive_lsn": self.archiver.lsn,
                "archive_path": self.archiver.path, "archive_bytes": self.archiver.size,
                "last_txn": self.last_txn, "binlog_file": binlog_name(self.binlog_file),
                "binlog_file_no": self.binlog_file, "binlog_position": self.binlog_pos,
                "gtid_executed": self.gtid_executed(), "server_uuid": self.server_uuid,
                "page_size": self.page_size, "spaces": self._registry(),
                "next_space_id": self.next_space_id,
                "sizes": {s.path: max(s.pages * self.page_size, os.fstat(s.fd).st_size)
                          for s in self.spaces.values()},
            }
            self.archiver = None
        point["blocked_s"] = time.monotonic() - started
        return point

    def end_clone(self) -> None:
        """However the clone ended: stop tracking and archiving, remove #ib_archive/."""
        with self.latch:
            if self.tracker is not None:
                self.tracker.stop()
                self.tracker = None
            if self.archiver is not None:
                self.archiver.stop()
                self.archiver = None
            self._clean_archives()

    def gtid_executed(self) -> str:
        return f"{self.server_uuid}:1-{self.last_txn}" if self.last_txn else ""

    def page_checksum_ok(self, page: bytes) -> bool:
        return int.from_bytes(page[16:24], "little") == page_checksum(page)

    # -- closing -------------------------------------------------------------------
    def close(self) -> None:
        """A clean shutdown: everything flushed, a sharp checkpoint, marked clean."""
        try:
            if self.log is not None:
                self.end_clone()
                self.checkpoint(sharp=True)
                self._write_control(clean=True)
                self.log.close()
                self.log = None
        finally:
            self._close_files()

    def _close_files(self) -> None:
        for sp in self.spaces.values():
            if sp.fd >= 0:
                os.close(sp.fd)
                sp.fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        self._dir_lock.close()

    def __enter__(self) -> PageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fsync_tree_dirs(root: str) -> None:
    for dirpath, _, _ in os.walk(root):
        fsync_dir(dirpath)
