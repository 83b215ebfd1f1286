"""Reader processes: read a block's segments from disk straight into a ring slot.

Runs in a worker process of the donor's reader :class:`~engine.stage.Pipeline`.
A descriptor ``["read", seq, slot, segments]`` comes in, each segment ``[file_id,
path, offset, length, stamp]``; the reader finds the data in each segment with
SEEK_DATA/SEEK_HOLE (holes are not sent, so sparse files stay sparse), reads it with
``preadv`` into the shared-memory slot, checksums it (xxh3) and answers ``[seq, slot,
length, checksum, data_segments, span, problems]`` where each data segment is
``[file_id, offset, length]`` and span is the file range the block covers (holes
included: what clone_progress counts as data).

A file is never sent wrong in silence: after its segment is read, the file's size,
mtime and ctime (one ``fstat``, a file's cost, not a byte's) are compared with the
scan's (``stamp``, 0: no check, a page store); a file that changed, shrank, or was
removed is a problem ``[file_id, "changed" | "gone", text]``, which the coordinator
answers by sending it again. A file that cannot be opened or read is ``"unreadable"``:
the reader reports it and goes on (the coordinator decides), never dies of it.

In clone-local, a reader given the destination (``copy_to``) copies each segment
there with ``copy_file_range`` instead and answers a block without bytes
(:mod:`donor.direct`); the checks are the same.
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from engine.codec import checksum
from engine.fsutil import PATH_PIECE, parent_at
from engine.ring import RingView

if TYPE_CHECKING:
    from donor.direct import DirectCopy

SEEK_THRESHOLD = 64 << 10  #: below this a segment is read whole: holes are rare and small
FD_CACHE = 32
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def data_extents(fd: int, offset: int, length: int) -> list[tuple[int, int]]:
    """The (offset, length) runs of real data in ``[offset, offset+length)``."""
    end = offset + length
    out = []
    pos = offset
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here to the end of file
                break
            raise
        if start >= end:
            break
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        out.append((start, stop - start))
        pos = stop
    return out


#: The latest time a manifest carries: a signed 64-bit count of nanoseconds (2262-04-11).
#: ext4 holds times up to 2446; a later one is sent as this, with a warning.
LATEST_NS = (1 << 63) - 1


def times(st: os.stat_result) -> tuple[int, int, int]:
    """mtime, atime and ctime in ns, none later than :data:`LATEST_NS`."""
    return (min(st.st_mtime_ns, LATEST_NS), min(st.st_atime_ns, LATEST_NS),
            min(st.st_ctime_ns, LATEST_NS))


def stamp(size: int, mtime_ns: int, ctime_ns: int) -> int:
    """What a file looked like, as one number (never 0): the plan puts the scan's in
    each segment, and the reader compares the file it has just read with it (the hash
    of a tuple of ints is the same in every process: only strings' hashes are salted)."""
    return hash((size, mtime_ns, ctime_ns)) or 1


def _open_long(path: str) -> int:
    """Open an absolute path longer than one system call takes, a piece at a time."""
    slash = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        dfd, name, owned = parent_at(slash, path.lstrip("/"))
        try:
            return os.open(name, READ_FLAGS, dir_fd=dfd)
        finally:
            if owned:
                os.close(dfd)
    finally:
        os.close(slash)


class Reader:
    def __init__(self, index: int, args: dict[str, Any]) -> None:
        self.ring = RingView(args["ring"], args["capacity"], args["slot_size"])
        self.fds: OrderedDict[str, int] = OrderedDict()
        #: the served directory: files under it are opened beneath it, one directory at
        #: a time with O_NOFOLLOW, so that a directory swapped for a link after the scan
        #: cannot lead a read outside it (the cache: rel dir -> descriptor)
        self.root: str = args.get("root") or ""
        self.dirs: OrderedDict[str, int] = OrderedDict()
        # Fault point (tests): tear the pages of this file as a read racing a page
        # write would, keeping the first half of each page and zeroing the rest.
        self.tear = (args.get("faults") or {}).get("tear_pages_of")
        self.page_size = int((args.get("faults") or {}).get("page_size", 16384))
        #: clone-local's fast path: segments copied into this destination by the kernel
        #: rather than read into the ring (donor/direct.py)
        self.direct: DirectCopy | None = None
        if args.get("copy_to"):
            from donor.direct import DirectCopy

            self.direct = DirectCopy(args["copy_to"])

    def _open(self, path: str) -> int:
        fd = self.fds.get(path)
        if fd is not None:
            self.fds.move_to_end(path)
            return fd
        rel = path[len(self.root) + 1:] if self.root and \
            path.startswith(self.root + "/") else ""
        if rel and len(rel) < PATH_PIECE:
            parent, _, name = rel.rpartition("/")
            # O_NONBLOCK: a FIFO put in a file's place since the scan must not hang us
            # (it reads as a change); regular files ignore it
            fd = os.open(name, READ_FLAGS, dir_fd=self._dir(parent))
        else:
            try:
                fd = os.open(path, READ_FLAGS)
            except OSError as exc:
                if exc.errno != errno.ENAMETOOLONG:
                    raise
                fd = _open_long(path)
        self.fds[path] = fd
        if len(self.fds) > FD_CACHE:
            os.close(self.fds.popitem(last=False)[1])
        return fd

    def _dir(self, rel: str) -> int:
        """A descriptor of the directory ``rel`` under the root, reached without
        following a link at any step (cached; the root is "")."""
        fd = self.dirs.get(rel)
        if fd is not None:
            self.dirs.move_to_end(rel)
            return fd
        if rel:
            parent, _, name = rel.rpartition("/")
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=self._dir(parent))
        else:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.dirs[rel] = fd
        if len(self.dirs) > FD_CACHE:
            os.close(self.dirs.popitem(last=False)[1])
        return fd

    def _drop_fds(self) -> None:
        for fd in [*self.fds.values(), *self.dirs.values()]:
            os.close(fd)
        self.fds.clear()
        self.dirs.clear()
        if self.direct is not None:
            self.direct.close()

    def handle(self, msg: list[Any]) -> Any:
        if msg[0] == "reset":  # a clone ended: files may be replaced before the next
            self._drop_fds()
            return None
        _, seq, slot, segments = msg
        view = self.ring.slot(slot)
        cursor = 0
        out: list[list[int]] = []
        problems: list[list[Any]] = []
        for file_id, path, offset, length, mark in segments:
            kept = len(out)
            try:
                cursor, problem = self._segment(view, cursor, out, file_id, path, offset,
                                                length, mark)
            except OSError as exc:  # the coordinator decides: fail the clone, or report
                del out[kept:]  # what this segment read is not sent: the bytes and the
                fd = self.fds.pop(path, None)  # segments stay in step
                if fd is not None:
                    os.close(fd)
                problem = ("gone", "removed") if isinstance(exc, FileNotFoundError) else \
                    ("unreadable", exc.strerror or str(exc))
            if problem is not None:
                problems.append([file_id, *problem])
        span = sum(seg[3] for seg in segments)
        return [seq, slot, cursor, checksum(view[:cursor]), out, span, problems]

    def _segment(self, view: memoryview, cursor: int, out: list[list[int]], file_id: int,
                 path: str, offset: int, length: int, mark: int
                 ) -> tuple[int, tuple[str, str] | None]:
        """Read one segment at ``cursor``; the new cursor, and what is wrong with the
        file (None: it is as the scan saw it, or it is not checked)."""
        fd = self._open(path)
        runs = data_extents(fd, offset, length) if length >= SEEK_THRESHOLD else [
            (offset, length)]
        short = False
        direct = self.direct
        rel = path[len(self.root) + 1:] if direct is not None and \
            path.startswith(self.root + "/") else ""
        dfd = direct.open(rel) if direct is not None and direct.eligible(rel) else None
        if direct is not None and dfd is not None:
            copied = direct.copy(fd, dfd, runs, rel) if direct.kernel else None
            if copied is not None:
                short = copied[0]
                direct.clear(dfd, offset, length, runs, rel)
                return cursor, self._check(fd, short, mark)
            # Through the ring after all: what an earlier pass left there goes first.
            direct.clear(dfd, offset, length, [], rel)
        for start, run in runs:
            got = 0
            while got < run:
                n = os.preadv(fd, [view[cursor + got : cursor + run]], start + got)
                if n == 0:  # shrunk since the scan
                    short = True
                    break
                got += n
            if got:
                if self.tear and path.endswith("/" + self.tear):
                    self._tear(view[cursor : cursor + got])
                out.append([file_id, start, got])
                cursor += got
        return cursor, self._check(fd, short, mark)

    def _check(self, fd: int, short: bool, mark: int) -> tuple[str, str] | None:
        """What is wrong with the file just read (None: as the scan saw it, or not
        checked)."""
        if not mark:
            return None
        st = os.fstat(fd)
        if st.st_nlink == 0:
            return "gone", "removed while it was read"
        mtime, _, ctime = times(st)
        if short or stamp(st.st_size, mtime, ctime) != mark:
            return "changed", "changed while it was read"
        return None

    def _tear(self, data: memoryview) -> None:
        half = self.page_size // 2
        for off in range(self.page_size, len(data) - self.page_size + 1, self.page_size):
            data[off + half : off + self.page_size] = bytes(half)  # page 0 stays whole

    def close(self) -> dict[str, Any]:
        self._drop_fds()
        self.ring.close()
        return {"copied": self.direct.copied} if self.direct is not None else {}
