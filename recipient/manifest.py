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

import base64
import os
from dataclasses import dataclass
from typing import Any

from engine import protocol as P
from engine.errors import ProtocolError, UnsafeName
from engine.fsutil import (
    OPEN_FLAGS,
    RESERVED_PAGED,
    RESERVED_TOP,
    check_relpath,
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


@dataclass
class Item:
    kind: str
    rel: str
    size: int
    mode: int
    mtime_ns: int
    target: str = ""
    internal: bool = False
    done: bool = False  #: a writer set its mode and times (it came whole in one block)


class Manifest:
    """Entries by id, checked one FILES page at a time."""

    def __init__(self, root: str, expected: int, paged: bool = False) -> None:
        """``paged``: a page store's clone, whose RECOVERY writes ``#ib_redo/``: the
        donor may not send that name either."""
        if not 0 <= expected <= P.MAX_FILES:
            raise ProtocolError(f"manifest of {expected} entries exceeds {P.MAX_FILES}")
        self.root = root
        self.expected = expected
        self.items: dict[int, Item] = {}
        self.dirs: set[str] = set()
        self.names: set[str] = set()
        self.total_bytes = 0
        self.can_preallocate = True  #: until the file system refuses it
        self.reserved = RESERVED_PAGED if paged else RESERVED_TOP

    def add_page(self, body: dict[str, Any]) -> bool:
        entries = P.want(body, "entries", list)
        if len(entries) > P.MAX_FILES_PAGE:
            raise ProtocolError(f"FILES page of {len(entries)} entries")
        for raw in entries:
            self._add(raw)
        if len(self.items) > self.expected:
            raise ProtocolError("more manifest entries than announced")
        return bool(body.get("last"))

    def _add(self, raw: Any) -> None:
        if not isinstance(raw, dict):
            raise ProtocolError("manifest entry is not an object")
        fid = P.want(raw, "id", int, 0, P.MAX_FILES)
        kind = raw.get("t")
        if kind not in ("d", "f", "l"):
            raise ProtocolError(f"manifest entry of unknown type {kind!r}")
        rel: object
        if "pb" in raw:
            try:
                rel = os.fsdecode(base64.b64decode(P.want(raw, "pb", str), validate=True))
            except ValueError:
                raise UnsafeName("undecodable file name") from None
        else:
            rel = raw.get("p")
        rel = check_relpath(rel, self.reserved)
        size = P.want(raw, "s", int, 0, P.MAX_FILE_SIZE)
        mode = P.want(raw, "m", int, 0, 0o7777)
        mtime = P.want(raw, "mt", int, -(1 << 62), 1 << 62)
        if fid in self.items or rel in self.names:
            raise UnsafeName(f"file {rel!r} listed twice")
        parent = rel.rpartition("/")[0]
        if parent and parent not in self.dirs:
            raise UnsafeName(f"{rel!r} is not inside a directory listed before it")
        target = ""
        if kind == "l":
            try:
                target = os.fsdecode(base64.b64decode(P.want(raw, "lt", str), validate=True))
            except ValueError:
                raise UnsafeName("undecodable link target") from None
            if "\x00" in target or not target or len(target) > 4096:
                raise UnsafeName(f"bad link target for {rel!r}")
        self.items[fid] = Item(kind, rel, size, mode, mtime, target)
        self.names.add(rel)
        if kind == "d":
            self.dirs.add(rel)
            os.mkdir(rel, 0o700, dir_fd=self._root_fd())
        elif kind == "f":
            self.total_bytes += size
            if self.can_preallocate and size >= PREALLOCATE_MIN and raw.get("dn") == 1:
                fd = os.open(rel, OPEN_FLAGS, 0o600, dir_fd=self._root_fd())
                try:
                    self.can_preallocate = preallocate(fd, size)
                finally:
                    os.close(fd)

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
        item.size = size

    def add_internal(self, fid: int, rel: str, size: int) -> None:
        """A file of the clone's own (the redo archive) under a name we choose."""
        if fid in self.items:
            raise ProtocolError(f"file id {fid} reused for the redo archive")
        self.items[fid] = Item("f", rel, size, 0o600, 0, internal=True)

    def file(self, fid: Any) -> Item:
        item = self.items.get(fid) if isinstance(fid, int) else None
        if item is None or item.kind != "f":
            raise ProtocolError(f"data for {fid!r}, which is not a file of the manifest")
        return item

    def finalize(self) -> None:
        """FILE SYNC: sizes, links, permission bits and times; then make it all durable."""
        root = self._root_fd()
        dirs = []
        for item in self.items.values():
            if item.done:
                continue
            if item.kind == "f":
                fd = os.open(item.rel, OPEN_FLAGS, 0o600, dir_fd=root)
                try:
                    if os.fstat(fd).st_size != item.size:
                        os.ftruncate(fd, item.size)  # empty files and trailing holes
                    if not item.internal:
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
