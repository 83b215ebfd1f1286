"""The recipient's view of the donor's manifest: checked, created, finalized.

Runs in the recipient's coordinator. Nothing from the network is trusted: every
entry is checked (:func:`engine.fsutil.check_relpath`, types, sizes, counts, a parent
that is a directory already listed, no duplicates) before anything is created.
Directories are created at once, private (0700), so that no later entry can be a
link we would follow. A big file without holes (the donor says so) is created at once
too, and preallocated: the writers' O_DIRECT writes then land in blocks it already
owns, never extending it, so they need no allocation and no exclusive lock of the file
(two writers in one big file then do not take turns), and a disk too small is found
before the first block. Other files are created by the writers as data arrives;
symbolic links, final permission bits and times are set only at FILE SYNC, after the
last byte is written, so a link can never redirect a write.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from engine import messages as M
from engine import protocol as P
from engine.errors import ProtocolError, UnsafeName
from engine.fsutil import (
    OPEN_FLAGS,
    RESERVED_PAGED,
    RESERVED_TOP,
    fsync_dir,
    preallocate,
    syncfs,
)

#: Where REDO COPY's archived redo lands until RECOVERY replays it (our name, never the
#: donor's: names under #clone/ from the network are refused).
REDO_NAME = "#clone/#redo_archive"
#: Files from this size on are preallocated when the donor says they have no holes
#: (smaller ones come whole in one block, written once).
PREALLOCATE_MIN = 1 << 20


class Manifest:
    """Entries by id, checked one FILES page at a time."""

    def __init__(self, root: str, expected: int, paged: bool = False) -> None:
        """``paged``: a page store's clone, whose RECOVERY writes ``#ib_redo/``: the
        donor may not send that name either."""
        if not 0 <= expected <= P.MAX_FILES:
            raise ProtocolError(f"manifest of {expected} entries exceeds {P.MAX_FILES}")
        self.root = root
        self.expected = expected
        self.items: dict[int, M.Entry] = {}
        self.dirs: set[str] = set()
        self.names: set[str] = set()
        self.total_bytes = 0
        self.can_preallocate = True  #: until the file system refuses it
        self.reserved = RESERVED_PAGED if paged else RESERVED_TOP
        #: files a writer finished (mode, times): they came whole in one block
        self.done: set[int] = set()
        #: files of the clone's own (the redo archive), under names we chose
        self.internal: set[int] = set()

    def add_page(self, page: M.FilesPage) -> bool:
        for raw in page.entries:
            self._add(M.Entry.from_wire(raw, self.reserved))
        if len(self.items) > self.expected:
            raise ProtocolError("more manifest entries than announced")
        return page.last

    def _add(self, entry: M.Entry) -> None:
        rel = entry.rel
        if entry.id in self.items or rel in self.names:
            raise UnsafeName(f"file {rel!r} listed twice")
        parent = rel.rpartition("/")[0]
        if parent and parent not in self.dirs:
            raise UnsafeName(f"{rel!r} is not inside a directory listed before it")
        self.items[entry.id] = entry
        self.names.add(rel)
        if entry.kind == "d":
            self.dirs.add(rel)
            os.mkdir(rel, 0o700, dir_fd=self._root_fd())
        elif entry.kind == "f":
            self.total_bytes += entry.size
            if self.can_preallocate and entry.size >= PREALLOCATE_MIN and entry.dense:
                fd = os.open(rel, OPEN_FLAGS, 0o600, dir_fd=self._root_fd())
                try:
                    self.can_preallocate = preallocate(fd, entry.size)
                finally:
                    os.close(fd)

    def files(self) -> set[str]:
        """The names of the donor's regular files."""
        return {e.rel for e in self.items.values()
                if e.kind == "f" and e.id not in self.internal}

    _fd: int | None = None

    def _root_fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def grow(self, fid: int, size: int) -> None:
        """A paged file that grew during the clone (PAGE COPY / REDO COPY sizes)."""
        item = self.file(fid)
        if size < item.size:
            raise ProtocolError(f"{item.rel!r} would shrink from {item.size} to {size}")
        self.total_bytes += size - item.size
        self.items[fid] = dataclasses.replace(item, size=size)

    def add_internal(self, fid: int, rel: str, size: int) -> None:
        """A file of the clone's own (the redo archive) under a name we choose."""
        if fid in self.items:
            raise ProtocolError(f"file id {fid} reused for the redo archive")
        self.items[fid] = M.Entry(fid, "f", rel, size, 0o600, 0)
        self.internal.add(fid)

    def file(self, fid: Any) -> M.Entry:
        item = self.items.get(fid) if isinstance(fid, int) else None
        if item is None or item.kind != "f":
            raise ProtocolError(f"data for {fid!r}, which is not a file of the manifest")
        return item

    def finalize(self) -> None:
        """FILE SYNC: sizes, links, permission bits and times; then make it all durable."""
        root = self._root_fd()
        dirs = []
        for item in self.items.values():
            if item.id in self.done:
                continue
            if item.kind == "f":
                fd = os.open(item.rel, OPEN_FLAGS, 0o600, dir_fd=root)
                try:
                    if os.fstat(fd).st_size != item.size:
                        os.ftruncate(fd, item.size)  # empty files and trailing holes
                    if item.id not in self.internal:
                        os.fchmod(fd, item.mode)
                        os.utime(fd, ns=(item.mtime_ns, item.mtime_ns))
                finally:
                    os.close(fd)
            elif item.kind == "l":
                os.symlink(item.target, item.rel, dir_fd=root)
                os.utime(item.rel, ns=(item.mtime_ns, item.mtime_ns), dir_fd=root,
                         follow_symlinks=False)
            else:
                dirs.append(item)
        for item in sorted(dirs, key=lambda d: d.rel.count("/"), reverse=True):
            os.chmod(item.rel, item.mode, dir_fd=root, follow_symlinks=False)
            os.utime(item.rel, ns=(item.mtime_ns, item.mtime_ns), dir_fd=root,
                     follow_symlinks=False)
        try:
            syncfs(self.root)
        except OSError:  # not Linux, or refused: one fsync a file instead
            for item in self.items.values():
                if item.kind == "f":
                    fd = os.open(item.rel, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=root)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
        for item in dirs:
            if item.mode & 0o500 == 0o500:
                fsync_dir(os.path.join(self.root, item.rel))
        fsync_dir(self.root)
        fsync_dir(os.path.dirname(self.root))
