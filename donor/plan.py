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

from typing import Any

from donor.reader import stamp
from donor.walk import SKIP_PAGED, SKIP_TOP, Tree, scan
from engine.codec import BLOCK_SIZE, MAX_SEGMENTS
from engine.messages import Entry

__all__ = ["SKIP_PAGED", "SKIP_TOP", "Entry", "Tree", "plan", "scan", "stamp"]


Segment = list[Any]  # [file_id, absolute path, offset, length, stamp]


def plan(entries: list[Entry], block_size: int = BLOCK_SIZE, check: bool = True
         ) -> list[list[Segment]]:
    """Cut the files into blocks; each block is a list of segments.

    ``check``: each segment carries its file's :func:`stamp`, and its reader reports a
    file that is not as the scan saw it (a plain tree); 0 (a page store, whose
    snapshot makes its copy consistent): no check.

    A file's tail travels in a batch like a small file: as a block of its own, the few
    KiB that end a file just over a block would cost a whole block's round trip through
    six processes for almost no bytes (docs/bench.md has the gain).

    Blocks of batched small files are spread evenly among the blocks of big files
    rather than sent at the end: creating thousands of files costs the recipient CPU
    (inode allocation) while writing big blocks mostly waits on the disk, so the two
    overlap instead of running one after the other."""
    whole: list[list[Segment]] = []
    batches: list[list[Segment]] = []
    batch: list[Segment] = []
    batch_bytes = 0
    for e in entries:
        if e.kind != "f" or e.size == 0:
            continue
        tail = e.size % block_size
        mark = stamp(e.size, e.mtime_ns, e.ctime_ns) if check else 0
        for off in range(0, e.size - tail, block_size):
            whole.append([[e.id, e.path, off, block_size, mark]])
        if not tail:
            continue
        if batch and (batch_bytes + tail > block_size or len(batch) >= MAX_SEGMENTS):
            batches.append(batch)
            batch, batch_bytes = [], 0
        batch.append([e.id, e.path, e.size - tail, tail, mark])
        batch_bytes += tail
    if batch:
        batches.append(batch)
    return _interleave(whole, batches)


def _interleave(a: list[list[Segment]], b: list[list[Segment]]) -> list[list[Segment]]:
    """``a`` and ``b`` merged so that ``b``'s blocks are evenly spaced, each list
    keeping its own order."""
    if not a or not b:
        return a + b
    out: list[list[Segment]] = []
    j = 0
    for i, block in enumerate(a):
        due = (i + 1) * len(b) // len(a)
        out.extend(b[j:due])
        j = due
        out.append(block)
    out.extend(b[j:])
    return out
