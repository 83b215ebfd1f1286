"""The recipient's view of the donor's manifest: checked, created, finalized.

Runs in the recipient's coordinator. Nothing from the network is trusted: every
entry is checked (:func:`engine.fsutil.check_relpath`, types, sizes, counts, a parent
that is a directory already listed, no duplicates, a hard link naming an earlier entry
that is not a directory, the top's own entry first) before anything is created.
Directories are created at once, private (0700), so that no later entry can be a
link we would follow. A big file without holes (the donor says so) is created at once
too, and preallocated: the writers' O_DIRECT writes then land in blocks it already
owns, never extending it, so they need no allocation and no exclusive lock of the file
(two writers in one big file then do not take turns), and a disk too small is found
before the first block. Other files are created by the writers as data arrives;
symbolic links, hard links, FIFOs, devices and sockets, and everything beyond the bytes
(owners, extended attributes, ACLs, bits, times: :mod:`recipient.meta`) are made only
at FILE SYNC, after the last byte is written, so a link can never redirect a write and
no write clears a setuid bit or a file capability set before it. The top directory's
own metadata comes last of all (:meth:`Manifest.finish_top`, after RECOVERY, which
writes beneath it). What could not be kept is a warning (:class:`~recipient.meta.Notes`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from engine import messages as M
from engine import protocol as P
from engine.errors import ProtocolError, UnsafeName
from engine.fsutil import (
    OPEN_FLAGS,
    RESERVED_PAGED,
    RESERVED_TOP,
    fsync_dir,
    mkdir_at,
    open_at,
    parent_at,
    preallocate,
    syncfs,
)
from engine.table import Table
from recipient.meta import Applier, Fidelity, Notes, Owners

#: Where REDO COPY's archived redo lands until RECOVERY replays it (our name, never the
#: donor's: names under #clone/ from the network are refused).
REDO_NAME = "#clone/#redo_archive"
#: Files from this size on are preallocated when the donor says they have no holes
#: (smaller ones come whole in one block, written once).
PREALLOCATE_MIN = 1 << 20
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Manifest:
    """Entries by id, checked one FILES page at a time."""

    def __init__(self, root: str, expected: int, paged: bool = False,
                 keep: Fidelity = Fidelity(),
                 warn: Callable[[M.Note], None] = lambda note: None) -> None:
        """``paged``: a page store's clone, whose RECOVERY writes ``#ib_redo/``: the
        donor may not send that name either. ``keep``: what to keep beyond the bytes;
        ``warn``: told of everything that could not be kept."""
        if not 0 <= expected <= P.MAX_FILES:
            raise ProtocolError(f"manifest of {expected} entries exceeds {P.MAX_FILES}")
        self.root = root
        self.expected = expected
        #: the entries by id, column by column (a million files in tens of MiB)
        self.items = Table()
        self.dirs: set[str] = set()
        #: the directory whose children are being listed (each directory's children
        #: come together and sorted, so that a name listed twice is found without a
        #: set of every name), the last of them, and the directories done with
        self._parent: str | None = None
        self._last = ""
        self._listed: set[str] = set()
        self.total_bytes = 0
        self.can_preallocate = True  #: until the file system refuses it
        self.reserved = RESERVED_PAGED if paged else RESERVED_TOP
        #: files a writer finished (mode, times): they came whole in one block; a byte
        #: an id, not a set of a million integers
        self.done = bytearray()
        #: files of the clone's own (the redo archive), under names we chose
        self.internal: set[int] = set()
        self.top: M.Entry | None = None  #: the top directory's own entry
        self.notes = Notes(warn)
        self.owners = Owners(keep.numeric_ids)
        self.apply = Applier(self.owners, keep, self.notes)
        #: a file sent again is emptied first, unless the donor writes it itself
        #: (clone-local's fast path, donor/direct.py), which may have begun already
        self._empty_again = 0 if keep.direct_copy else os.O_TRUNC
        #: entries that were not made (a device as another user, a vanished file)
        self.missing: set[int] = set()
        #: a resumed clone's manifest: its directories exist already
        self.resuming = False

    def _is_dir(self, rel: str) -> bool:
        """``rel`` is a directory of ours, not a link to one (a resumed clone's)."""
        import stat

        with self._at(rel) as (dfd, name):
            return stat.S_ISDIR(os.lstat(name, dir_fd=dfd).st_mode)

    def add_page(self, page: M.FilesPage) -> bool:
        for raw in page.entries:
            self._add(M.Entry.from_wire(raw, self.reserved))
        if len(self.items) > self.expected:
            raise ProtocolError("more manifest entries than announced")
        return page.last

    def _add(self, entry: M.Entry) -> None:
        rel = entry.rel
        if entry.id != len(self.items):
            raise ProtocolError(f"manifest entry {entry.id} where {len(self.items)} was due"
                                if entry.id > len(self.items) else
                                f"file {rel!r} listed twice (id {entry.id})")
        if rel == M.TOP:
            if self.items:
                raise UnsafeName("the top directory's entry is not the first")
            self.top = entry
        else:
            self._in_order(rel)
        if entry.kind == "h":
            first = self.items.get(entry.link)
            if first is None or first.kind in ("d", "h"):
                raise UnsafeName(f"{rel!r} is a link to an entry that is not an earlier file")
        self.owners.learn(entry.names)
        self.items.add(entry)
        self.done.append(0)
        if entry.kind == "d" and rel != M.TOP:
            self.dirs.add(rel)
            try:
                mkdir_at(self._root_fd(), rel, 0o700)
            except FileExistsError:
                if not self.resuming or not self._is_dir(rel):
                    raise

        elif entry.kind == "f":
            self.total_bytes += entry.size
            if self.can_preallocate and entry.size >= PREALLOCATE_MIN and entry.dense:
                fd = open_at(self._root_fd(), rel, OPEN_FLAGS, 0o600)
                try:
                    self.can_preallocate = preallocate(fd, entry.size)
                finally:
                    os.close(fd)

    def _in_order(self, rel: str) -> None:
        """``rel`` comes where the donor's scan puts it: in a directory listed before
        it, whose children come together, sorted by name (so never twice)."""
        parent, _, name = rel.rpartition("/")
        if parent == self._parent:
            if name <= self._last:
                raise UnsafeName(f"file {rel!r} listed twice" if name == self._last else
                                 f"{rel!r} out of order (after {self._last!r})")
        else:
            if parent and parent not in self.dirs:
                raise UnsafeName(f"{rel!r} is not inside a directory listed before it")
            if parent in self._listed:
                raise UnsafeName(f"{rel!r} listed apart from the rest of {parent or '.'!r}")
            if self._parent is not None:
                self._listed.add(self._parent)
            self._parent = parent
        self._last = name

    def files(self) -> set[str]:
        """The names of the donor's regular files."""
        return {e.rel for e in self.items if e.kind == "f" and e.id not in self.internal}

    @property
    def names(self) -> set[str]:
        """Every name of the manifest (a page store's: a set of a plain tree's million
        names is what this class avoids)."""
        return {e.rel for e in self.items}

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
        """A file of the clone's own (the redo archive) under a name we choose, with
        the id after the manifest's last."""
        if fid != len(self.items):
            raise ProtocolError(f"file id {fid} for the redo archive, not the next one "
                                f"({len(self.items)})")
        self.items.add(M.Entry(fid, "f", rel, size, 0o600, 0))
        self.done.append(0)
        self.internal.add(fid)

    def file(self, fid: Any) -> M.Entry:
        item = self.items.get(fid) if isinstance(fid, int) else None
        if item is None or item.kind != "f":
            raise ProtocolError(f"data for {fid!r}, which is not a file of the manifest")
        return item

    def finishing(self, item: M.Entry) -> tuple[int, int, int, int] | None:
        """(bits, uid, gid, atime) for a writer that finishes ``item`` (it came whole in
        one block); None when FILE SYNC must (extended attributes or an ACL)."""
        if item.xattrs or item.acl or item.id in self.internal:
            return None
        uid, gid, mode = self.owners.decide(item, self.notes)
        self.done[item.id] = 1
        return mode, uid, gid, Applier.times(item)[0]

    # -- a plain tree that changed while the donor read it -----------------------------
    def again(self, rows: list[M.Again], empty: bool = True) -> None:
        """Files the donor sends again, as they are now: emptied, to be written anew
        (on clone-local's fast path, the donor clears what is stale itself; ``empty``
        False: a resumed clone's pass already under way, whose blocks on disk stay)."""
        for row in rows:
            item = self.items.get(row.id)
            if item is None or item.kind != "f" or row.id in self.internal:
                raise ProtocolError(f"file {row.id} sent again, which is not a file")
            self.total_bytes += row.size - item.size
            self.items[row.id] = dataclasses.replace(
                item, size=row.size, mode=row.mode, mtime_ns=row.mtime_ns,
                atime_ns=row.atime_ns, dense=row.dense)
            self.done[row.id] = 0
            if not empty:
                continue
            with self._at(item.rel) as (dfd, name):
                try:
                    fd = os.open(name, OPEN_FLAGS | self._empty_again, 0o600, dir_fd=dfd)
                except PermissionError:  # a writer gave it its bits: not writable by us
                    os.chmod(name, 0o600, dir_fd=dfd)
                    fd = os.open(name, OPEN_FLAGS | self._empty_again, 0o600, dir_fd=dfd)
                os.close(fd)

    def drop(self, gone: list[int]) -> None:
        """Files that vanished on the donor: absent here too, never a file of zeros."""
        for fid in gone:
            item = self.items.get(fid)
            if item is None or item.kind != "f" or fid in self.internal:
                raise ProtocolError(f"file {fid!r} said to be gone, which is not a file")
            with self._at(item.rel) as (dfd, name):
                try:
                    os.unlink(name, dir_fd=dfd)
                except FileNotFoundError:
                    pass
            self.items.drop(fid)
            self.total_bytes -= item.size
            self.done[fid] = 0
            self.missing.add(fid)

    # -- FILE SYNC --------------------------------------------------------------------
    @contextmanager
    def _at(self, rel: str, split: bool = False) -> Iterator[tuple[int, str]]:
        """``rel``'s directory descriptor and name, for the ``*at`` calls (any length)."""
        dfd, name, owned = parent_at(self._root_fd(), rel, split)
        try:
            yield dfd, name
        finally:
            if owned:
                os.close(dfd)

    def finalize(self) -> None:
        """FILE SYNC: sizes, links, special files, owners, attributes, bits and times;
        then make it all durable. The top directory's own come with :meth:`finish_top`."""
        dirs = []
        items, done = self.items, self.done
        for fid in range(len(items)):
            # An entry is made only for what is left to do (on the normal path, most
            # files of a tree of small ones were finished as their blocks were written).
            if items.kind(fid) == "d":
                item = items.get(fid)
                if item is not None and item.rel != M.TOP:
                    dirs.append(item)
            elif not done[fid]:
                item = items.get(fid)
                if item is not None:
                    self._finish(item)
        for item in sorted(dirs, key=lambda d: d.rel.count("/"), reverse=True):
            fd = open_at(self._root_fd(), item.rel, DIR_FLAGS)
            try:
                self.apply.on_fd(fd, item)
            finally:
                os.close(fd)
        self._sync(dirs)

    def _finish(self, item: M.Entry) -> None:
        if item.kind == "f":
            fd = open_at(self._root_fd(), item.rel, OPEN_FLAGS, 0o600)
            try:
                if os.fstat(fd).st_size != item.size:
                    os.ftruncate(fd, item.size)  # empty files and trailing holes
                if item.id not in self.internal:
                    self.apply.on_fd(fd, item)
            finally:
                os.close(fd)
            return
        with self._at(item.rel, split=True) as (dfd, name):
            if item.kind == "l":
                os.symlink(item.target, name, dir_fd=dfd)
            elif item.kind == "h":
                self._link(item, dfd, name)
                return
            elif not self.apply.special(dfd, name, item):
                self.missing.add(item.id)
                return
            self.apply.at(dfd, name, item)

    def _link(self, item: M.Entry, dfd: int, name: str) -> None:
        """Another name of an earlier entry's inode (made, owned, stamped already)."""
        first = self.items.get(item.link)
        if first is None or item.link in self.missing:
            self.missing.add(item.id)
            self.notes.add("link", item.rel, "hard link not made: the entry it is another "
                           "name of was not copied")
            return
        with self._at(first.rel, split=True) as (sfd, sname):
            os.link(sname, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)

    def _sync(self, dirs: list[M.Entry]) -> None:
        root = self._root_fd()
        try:
            syncfs(self.root)
        except OSError:  # not Linux, or refused: one fsync a file instead
            for item in self.items:
                if item.kind == "f":
                    fd = open_at(root, item.rel, os.O_RDONLY | os.O_NOFOLLOW)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
        for item in dirs:
            if item.mode & 0o500 == 0o500:
                try:
                    fd = open_at(root, item.rel, DIR_FLAGS)
                except PermissionError:  # beneath a directory we may no longer search
                    continue  # (not root): syncfs made it durable already
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(self.root)
        fsync_dir(os.path.dirname(self.root))

    def finish_top(self) -> None:
        """The top directory's owner, attributes, bits and times (last: RECOVERY writes
        beneath it), made durable; then the warnings counted along the way."""
        if self.top is not None:
            self.apply.on_fd(self._root_fd(), self.top)
            os.fsync(self._root_fd())
        self.notes.flush()
