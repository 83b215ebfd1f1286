"""Reader processes: read a block's segments from disk straight into a ring slot.

Runs in a worker process of the donor's reader :class:`~engine.stage.Pipeline`.
A descriptor ``["read", seq, slot, segments]`` comes in; the reader finds the data in
each segment with SEEK_DATA/SEEK_HOLE (holes are not sent, so sparse files stay
sparse), reads it with ``preadv`` into the shared-memory slot, checksums it (xxh3) and
answers ``[seq, slot, length, checksum, data_segments, span]`` where each data
segment is ``[file_id, offset, length]`` and span is the file range the block covers
(holes included: what clone_progress counts as data). A file removed or shrunk
since the scan sends what is
there (a live directory); the recipient sizes every file from the manifest.
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict
from typing import Any

from engine.codec import checksum
from engine.ring import RingView

SEEK_THRESHOLD = 64 << 10  #: below this a segment is read whole: holes are rare and small
FD_CACHE = 32


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


class Reader:
    def __init__(self, index: int, args: dict[str, Any]) -> None:
        self.ring = RingView(args["ring"], args["capacity"], args["slot_size"])
        self.fds: OrderedDict[str, int] = OrderedDict()
        # Fault point (tests): tear the pages of this file as a read racing a page
        # write would, keeping the first half of each page and zeroing the rest.
        self.tear = (args.get("faults") or {}).get("tear_pages_of")
        self.page_size = int((args.get("faults") or {}).get("page_size", 16384))

    def _open(self, path: str) -> int:
        fd = self.fds.get(path)
        if fd is not None:
            self.fds.move_to_end(path)
            return fd
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.fds[path] = fd
        if len(self.fds) > FD_CACHE:
            os.close(self.fds.popitem(last=False)[1])
        return fd

    def _drop_fds(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def handle(self, msg: list[Any]) -> Any:
        if msg[0] == "reset":  # a clone ended: files may be replaced before the next
            self._drop_fds()
            return None
        _, seq, slot, segments = msg
        view = self.ring.slot(slot)
        cursor = 0
        out: list[list[int]] = []
        for file_id, path, offset, length in segments:
            try:
                fd = self._open(path)
            except FileNotFoundError:
                continue  # dropped since the scan: the recipient keeps an empty file
            runs = data_extents(fd, offset, length) if length >= SEEK_THRESHOLD else [
                (offset, length)]
            for start, run in runs:
                got = 0
                while got < run:
                    n = os.preadv(fd, [view[cursor + got : cursor + run]], start + got)
                    if n == 0:  # shrunk since the scan
                        break
                    got += n
                if got:
                    if self.tear and path.endswith("/" + self.tear):
                        self._tear(view[cursor : cursor + got])
                    out.append([file_id, start, got])
                    cursor += got
        span = sum(seg[3] for seg in segments)
        return [seq, slot, cursor, checksum(view[:cursor]), out, span]

    def _tear(self, data: memoryview) -> None:
        half = self.page_size // 2
        for off in range(self.page_size, len(data) - self.page_size + 1, self.page_size):
            data[off + half : off + self.page_size] = bytes(half)  # page 0 stays whole

    def close(self) -> dict[str, Any]:
        self._drop_fds()
        self.ring.close()
        return {}
