"""What a clone sends: the manifest of a data directory and the plan of blocks.

Runs in the donor's coordinator. The manifest is the scan's (:mod:`donor.walk`:
directories before their contents, sorted, so a plan is the same for the same tree;
every entry gets an id). The plan cuts files into whole blocks of BLOCK_SIZE bytes;
what is left (a file smaller than a block, the tail of a bigger one) is batched with
others into one block (up to MAX_SEGMENTS pieces), so that a small piece never costs a
block of its own.
Holes are found by the readers (SEEK_DATA), not here.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from donor.reader import stamp
from donor.walk import SKIP_PAGED, SKIP_TOP, Tree, scan
from engine.codec import BLOCK_SIZE, MAX_SEGMENTS
from engine.messages import Entry
from engine.table import Table

__all__ = ["SKIP_PAGED", "SKIP_TOP", "Entry", "Plan", "Tree", "plan", "scan", "stamp"]


Segment = list[Any]  # [file_id, absolute path, offset, length, stamp]


class Plan:
    """The blocks of a plan, in arrays (a million small files would otherwise cost a
    list and five objects each): block ``b`` is segments ``starts[b]`` to
    ``starts[b + 1]``; ``plan[b]`` makes its list of :data:`Segment` when it is read."""

    def __init__(self, paths: Callable[[int], str]) -> None:
        self.paths = paths
        self.fid = array("q")
        self.off = array("q")
        self.len = array("q")
        self.mark = array("q")
        self.starts = array("q", [0])
        #: each block's lane (see :func:`plan`), -1 for a batch or a plan without lanes
        self.lanes = array("b")

    def add(self, fid: int, off: int, size: int, mark: int) -> None:
        """A segment of the block being made."""
        self.fid.append(fid)
        self.off.append(off)
        self.len.append(size)
        self.mark.append(mark)

    def cut(self, lane: int = -1) -> None:
        """The block being made is complete."""
        self.starts.append(len(self.fid))
        self.lanes.append(lane)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, b: int) -> list[Segment]:
        if b < 0:
            b += len(self)
        if not 0 <= b < len(self):
            raise IndexError(b)
        return [[self.fid[k], self.paths(self.fid[k]), self.off[k], self.len[k], self.mark[k]]
                for k in range(self.starts[b], self.starts[b + 1])]

    def __iter__(self) -> Iterator[list[Segment]]:
        for b in range(len(self)):
            yield self[b]


def plan(entries: Iterable[Entry], block_size: int = BLOCK_SIZE, check: bool = True,
         lanes: int = 1) -> Plan:
    """Cut the files into blocks; each block is a list of segments.

    ``entries``: a scan's :class:`~engine.table.Table` (whose paths the plan reads
    back when a block is read) or a few entries of it.
    ``check``: each segment carries its file's :func:`stamp`, and its reader reports a
    file that is not as the scan saw it (a plain tree); 0 (a page store, whose
    snapshot makes its copy consistent): no check.

    A file's tail travels in a batch like a small file: as a block of its own, the few
    KiB that end a file just over a block would cost a whole block's round trip through
    six processes for almost no bytes (docs/bench.md has the gain).

    Blocks of batched small files are spread evenly among the blocks of big files
    rather than sent at the end: creating thousands of files costs the recipient CPU
    (inode allocation) while writing big blocks mostly waits on the disk, so the two
    overlap instead of running one after the other.

    ``lanes`` > 1 (clone-local's fast path, a lane a reader): the whole blocks come
    from that many files at a time, one block of each in turn, and each block says its
    lane (:attr:`Plan.lanes`), so that each reader copies a file of its own. Two
    readers copying into one file take turns at its lock (a kernel copy writes under
    it): blocks of one big file spread over both ran barely faster than one reader."""
    paths: Callable[[int], str]
    if isinstance(entries, Table):
        paths, files = entries.path, entries.files()
    else:
        listed = [e for e in entries if e.kind == "f"]
        paths = {e.id: e.path for e in listed}.__getitem__
        files = ((e.id, e.size, e.mtime_ns, e.ctime_ns) for e in listed)
    whole: list[tuple[int, int, int]] = []  # (id, offset, stamp): a block each
    batches = Plan(paths)
    batch = batch_bytes = 0
    for fid, size, mtime_ns, ctime_ns in files:
        if size == 0:
            continue
        tail = size % block_size
        mark = stamp(size, mtime_ns, ctime_ns) if check else 0
        for off in range(0, size - tail, block_size):
            whole.append((fid, off, mark))
        if not tail:
            continue
        if batch and (batch_bytes + tail > block_size or batch >= MAX_SEGMENTS):
            batches.cut()
            batch = batch_bytes = 0
        batches.add(fid, size - tail, tail, mark)
        batch += 1
        batch_bytes += tail
    if batch:
        batches.cut()
    if lanes > 1:
        return _interleave(*_in_lanes(whole, lanes), batches, block_size)
    return _interleave(whole, [-1] * len(whole), batches, block_size)


def _in_lanes(whole: list[tuple[int, int, int]], lanes: int
              ) -> tuple[list[tuple[int, int, int]], list[int]]:
    """``whole`` (each file's blocks together) dealt into lanes, a file to the lane with
    the fewest blocks so far, then taken a block of each lane in turn; and the lane of
    each block."""
    dealt: list[list[tuple[int, int, int]]] = [[] for _ in range(lanes)]
    i = 0
    while i < len(whole):
        j = i + 1
        while j < len(whole) and whole[j][0] == whole[i][0]:
            j += 1
        min(dealt, key=len).extend(whole[i:j])
        i = j
    order: list[tuple[int, int, int]] = []
    lane_of: list[int] = []
    for k in range(max(map(len, dealt))):
        for lane, blocks in enumerate(dealt):
            if k < len(blocks):
                order.append(blocks[k])
                lane_of.append(lane)
    return order, lane_of


def _interleave(whole: list[tuple[int, int, int]], lanes: list[int], batches: Plan,
                block_size: int) -> Plan:
    """The whole blocks (each in its lane) and the batches in one plan, the batches
    evenly spaced, each keeping its own order."""
    if not whole:
        return batches
    out = Plan(batches.paths)
    j = 0
    nb = len(batches)
    for i, (fid, off, mark) in enumerate(whole):
        due = (i + 1) * nb // len(whole)
        for b in range(j, due):
            _copy(batches, b, out)
        j = due
        out.add(fid, off, block_size, mark)
        out.cut(lanes[i])
    for b in range(j, nb):
        _copy(batches, b, out)
    return out


def _copy(src: Plan, b: int, dst: Plan) -> None:
    for k in range(src.starts[b], src.starts[b + 1]):
        dst.add(src.fid[k], src.off[k], src.len[k], src.mark[k])
    dst.cut()
