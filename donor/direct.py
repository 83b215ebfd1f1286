"""clone-local's fast path: a reader copies a segment into the destination itself.

Runs in a reader process of clone-local's donor (:mod:`donor.reader`), whose command
line gave it the destination's root (``copy_to``). Source and destination are on this
host, so the bytes need not pass through the rings, the donor's socket, the
recipient's coordinator and a writer: the reader asks the kernel to copy each run of
data with ``copy_file_range`` (a reflink where the file system shares blocks, an
in-kernel copy otherwise, as ``cp`` does), and the block it answers carries no bytes,
only its span, like a block of holes. Everything else is as on the normal path: the
plan, the snapshot's states (PAGE COPY and REDO COPY still travel through the rings
and repair what FILE COPY read fuzzily), the change checks after each segment, the
acknowledgements and the progress counters, and the metadata at FILE SYNC.

The destination is reached as the writers reach it: every open is relative to its
root, with O_NOFOLLOW (it holds no links while data flows), and a file is created
private (0600). Two orders are not the donor's to decide, so this path steps aside:

- the recipient creates directories as it checks the manifest's pages (the donor of
  this path reads nothing before the recipient's credit, which follows the last page,
  but a segment whose directory is missing all the same travels through the ring: its
  file is new, so nothing there is stale);
- where the kernel refuses to copy between the two (EXDEV: another file system;
  EOPNOTSUPP, ENOSYS, EINVAL: a file system or kernel without it), this process sends
  every later segment through the ring, the normal path.

A file sent again (it changed while read) is not emptied by the recipient on this path
(:class:`recipient.meta.Fidelity`'s ``direct_copy``), since a reader may be writing it
already: :meth:`DirectCopy.clear` removes, before a segment is copied or sent, the old
bytes where the file now has a hole, and FILE SYNC sets its size.
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict

from engine.errors import LocalIOError, from_oserror
from engine.fsutil import (
    OPEN_FLAGS,
    RESERVED_PAGED,
    open_at,
    parent_at,
    punch_hole,
    start_writeback,
)

FD_CACHE = 32
#: The kernel will not copy between these two files: the ring from now on.
REFUSED = (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
#: Failures that are the destination's, not the source's: the clone fails with them
#: as the recipient's writer would, never as a file the donor cannot read.
DESTINATION_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
ZEROS = bytes(1 << 20)
#: A run of this size or more is sent on its way to the disk as soon as it is copied
#: (the O_DIRECT writes of the normal path are on the disk when acknowledged): FILE
#: SYNC's syncfs then finds little left, instead of the whole copy at once.
WRITEBACK_MIN = 1 << 20


class DirectCopy:
    """The destination as one reader process sees it: open files, and whether the
    kernel copies into them. Owned by the reader; :meth:`close` at its end or a reset."""

    def __init__(self, root: str) -> None:
        self.root_path = root
        self._root = -1
        self.fds: OrderedDict[str, int] = OrderedDict()
        #: copy_file_range works between the source and the destination (until refused)
        self.kernel = True
        self.copied = 0  #: bytes the kernel copied (the reader's final report)

    def eligible(self, rel: str) -> bool:
        """Files under the served root that keep their name on the recipient: not the
        redo archive (REDO COPY writes it under a name of the recipient's own)."""
        return bool(rel) and rel.partition("/")[0] not in RESERVED_PAGED

    @property
    def root(self) -> int:
        if self._root < 0:
            self._root = os.open(self.root_path,
                                 os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        return self._root

    def open(self, rel: str) -> int | None:
        """``rel`` in the destination, opened for writing (created if need be); None
        while its directory is not made yet."""
        fd = self.fds.get(rel)
        if fd is not None:
            self.fds.move_to_end(rel)
            return fd
        try:
            fd = open_at(self.root, rel, OPEN_FLAGS, 0o600)
        except FileNotFoundError:
            return None
        except PermissionError:
            # A small file a writer finished (its bits set) that is now sent again, as
            # another user than root: writable again, as the recipient makes it; FILE
            # SYNC gives it its bits.
            try:
                self._chmod(rel)
                fd = open_at(self.root, rel, OPEN_FLAGS, 0o600)
            except OSError as exc:
                raise self.failed(exc, rel) from None
        except OSError as exc:
            raise self.failed(exc, rel) from None
        self.fds[rel] = fd
        if len(self.fds) > FD_CACHE:
            os.close(self.fds.popitem(last=False)[1])
        return fd

    def _chmod(self, rel: str) -> None:
        dfd, name, owned = parent_at(self.root, rel)
        try:
            os.chmod(name, 0o600, dir_fd=dfd, follow_symlinks=False)
        finally:
            if owned:
                os.close(dfd)

    def failed(self, exc: OSError, rel: str) -> LocalIOError:
        return from_oserror(exc, f"writing '{rel}' in the copy")

    def copy(self, src: int, dst: int, runs: list[tuple[int, int]], rel: str
             ) -> tuple[bool, int] | None:
        """Copy each (offset, length) run of ``src`` to the same place in ``dst``:
        (the source ended early, bytes copied); None when the kernel refuses (nothing
        is to be trusted of this segment then: it goes through the ring)."""
        copied = 0
        for start, run in runs:
            got = 0
            while got < run:
                try:
                    n = os.copy_file_range(src, dst, run - got, start + got, start + got)
                except OSError as exc:
                    if exc.errno in REFUSED:
                        self.kernel = False
                        return None
                    if exc.errno in DESTINATION_ERRNOS:
                        raise self.failed(exc, rel) from None
                    raise  # the source's: the reader reports it as it would a read
                if n == 0:  # the source is shorter than the scan saw it
                    self.copied += copied + got
                    return True, copied + got
                got += n
            copied += got
            if got >= WRITEBACK_MIN:
                start_writeback(dst, start, got)
        self.copied += copied
        return False, copied

    def clear(self, dst: int, offset: int, length: int, runs: list[tuple[int, int]],
              rel: str) -> None:
        """Leave no bytes in ``[offset, offset+length)`` of ``dst`` outside ``runs``:
        a file sent again may have a hole now where its first copy had data. A new
        file has none there, and a segment without holes has nothing to clear: one
        ``fstat`` at most, unless there is something to remove."""
        end = offset + length
        gaps = []
        pos = offset
        for start, run in runs:
            if start > pos:
                gaps.append((pos, start))
            pos = start + run
        if pos < end:
            gaps.append((pos, end))
        if not gaps:
            return
        try:
            size = os.fstat(dst).st_size
            for start, stop in gaps:
                stop = min(stop, size)
                if start >= stop:
                    continue
                try:
                    data = os.lseek(dst, start, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # no data from here to its end
                        return
                    raise
                if data >= stop:
                    continue
                if not punch_hole(dst, data, stop - data):
                    while data < stop:  # a file system without holes: zeros, then
                        data += os.pwrite(dst, ZEROS[: min(len(ZEROS), stop - data)], data)
        except OSError as exc:
            raise self.failed(exc, rel) from None

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        if self._root >= 0:
            os.close(self._root)
            self._root = -1
