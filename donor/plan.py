"""What a clone sends: the manifest of a data directory and the plan of blocks.

Runs in the donor's coordinator. The manifest lists directories before their
contents (sorted, so a plan is the same for the same tree); every regular file gets
an id. The plan cuts files into whole blocks of BLOCK_SIZE bytes; what is left (a file
smaller than a block, the tail of a bigger one) is batched with others into one block
(up to MAX_SEGMENTS pieces), so that a small piece never costs a block of its own.
Holes are found by the readers (SEEK_DATA), not here.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Any

from engine.codec import BLOCK_SIZE, MAX_SEGMENTS
from engine.messages import Entry

log = logging.getLogger("clone_agent.donor")

#: Top-level folders that belong to a clone or a running server, never cloned.
SKIP_TOP = {"#clone", "#ib_archive"}
#: Also not copied from a page store: the redo log travels as REDO COPY's archive, and
#: the recipient makes its own log at RECOVERY.
SKIP_PAGED = ("#ib_redo",)


def scan(root: str, skip: tuple[str, ...] = ()) -> list[Entry]:
    """Walk ``root`` (not following links): directories first, then their contents."""
    skip_top = SKIP_TOP | set(skip)
    entries: list[Entry] = []

    def walk(abs_dir: str, rel_dir: str) -> None:
        try:
            with os.scandir(abs_dir) as it:
                children = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:  # removed while we walked: a live directory
            return
        subdirs = []
        for child in children:
            if not rel_dir and child.name in skip_top:
                continue
            rel = f"{rel_dir}/{child.name}" if rel_dir else child.name
            try:
                st = child.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                entries.append(Entry(len(entries), "d", rel, 0, mode, st.st_mtime_ns,
                                     path=child.path))
                subdirs.append((child.path, rel))
            elif stat.S_ISREG(st.st_mode):
                entries.append(
                    Entry(len(entries), "f", rel, st.st_size, mode, st.st_mtime_ns,
                          dense=st.st_blocks * 512 >= st.st_size, path=child.path)
                )
            elif stat.S_ISLNK(st.st_mode):
                entries.append(Entry(len(entries), "l", rel, 0, mode, st.st_mtime_ns,
                                     os.readlink(child.path), path=child.path))
            else:
                log.warning("skipping %s: not a file, directory or link", rel)
        for path, rel in subdirs:
            walk(path, rel)

    walk(root, "")
    return entries


Segment = list[Any]  # [file_id, absolute path, offset, length]


def plan(entries: list[Entry], block_size: int = BLOCK_SIZE) -> list[list[Segment]]:
    """Cut the files into blocks; each block is a list of segments.

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
        for off in range(0, e.size - tail, block_size):
            whole.append([[e.id, e.path, off, block_size]])
        if not tail:
            continue
        if batch and (batch_bytes + tail > block_size or len(batch) >= MAX_SEGMENTS):
            batches.append(batch)
            batch, batch_bytes = [], 0
        batch.append([e.id, e.path, e.size - tail, tail])
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
