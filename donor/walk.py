"""The donor's scan: every entry of a tree, with what a faithful copy needs.

Runs in the donor's coordinator, at INIT. The walk reads one directory at a time
through a descriptor (``os.scandir`` on it, ``fstatat`` beneath it), opening each
directory relative to the top, a piece at a time when its path is longer than one
system call takes (:func:`engine.fsutil.parent_at`): path length and depth are limited
by the file system only, and only one directory is open at a time, so depth costs no
descriptors. The order is the manifest's: the top's own entry first, then every
directory's children sorted by name, each directory before its contents.

For each entry: type, size, permission bits, owner and group (with their names, once
each, so that the recipient maps them as rsync does), the three times (ctime stays
here: a read compares it to notice a change), extended attributes and POSIX ACLs
(read through ``/proc/self/fd/N/NAME``, since the xattr calls take no directory
descriptor), a device's number, and hard links: a second name of an inode already
listed becomes an "h" entry naming the first, whose data travels once. Only inodes
with more than one link are remembered, so this costs nothing for ordinary files.

What cannot be copied (a name the clone reserves, an unreadable directory under
``skip_unreadable``, a type Linux has no call to create) becomes a :class:`Note`, sent
to the recipient as a warning; an unreadable directory is otherwise an error that
names it.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from donor.reader import LATEST_NS, times
from engine import acl
from engine.errors import LocalIOError
from engine.fsutil import PATH_PIECE, parent_at, proc_path
from engine.messages import Note
from engine.table import Table

log = logging.getLogger("clone_agent.donor")

#: Top-level folders that belong to a clone or a running server, never cloned.
SKIP_TOP = ("#clone", "#ib_archive")
#: Also not copied from a page store: the redo log travels as REDO COPY's archive, and
#: the recipient makes its own log at RECOVERY.
SKIP_PAGED = ("#ib_redo",)
#: What a FILES page's entries may add up to, under the 8 MiB body limit.
PAGE_BUDGET = 7 << 20

_KINDS = {stat.S_IFDIR: "d", stat.S_IFREG: "f", stat.S_IFLNK: "l", stat.S_IFIFO: "p",
          stat.S_IFCHR: "c", stat.S_IFBLK: "b", stat.S_IFSOCK: "s"}
#: Errors of a directory that went away while we walked: a live tree, not a failure.
_GONE = (errno.ENOENT, errno.ENOTDIR)


@dataclass
class Tree:
    """A scan's result: the manifest (column by column, :mod:`engine.table`), the
    warnings, and the largest entry's size on the wire (an estimate, from above), which
    bounds the entries of a FILES page."""

    entries: Table = field(default_factory=Table)
    notes: list[Note] = field(default_factory=list)
    widest: int = 256

    def page_entries(self, most: int) -> int:
        return max(1, min(most, PAGE_BUDGET // self.widest))


@dataclass
class _Names:
    """The names of the user and group ids met, each sent once."""

    users: dict[int, str | None] = field(default_factory=dict)
    groups: dict[int, str | None] = field(default_factory=dict)

    def first(self, uids: set[int], gids: set[int]) -> tuple[tuple[str, int, str], ...]:
        out: list[tuple[str, int, str]] = []
        for kind, ids, known in (("u", uids, self.users), ("g", gids, self.groups)):
            for ident in sorted(ids):
                if ident in known:
                    continue
                name = known[ident] = _lookup(kind, ident)
                if name is not None:
                    out.append((kind, ident, name))
        return tuple(out)


def _lookup(kind: str, ident: int) -> str | None:
    try:
        name = pwd.getpwuid(ident).pw_name if kind == "u" else grp.getgrgid(ident).gr_name
        name.encode("utf-8")
        return name
    except (KeyError, UnicodeEncodeError):  # no name here: the number alone travels
        return None


class Scanner:
    """One scan of ``root``. ``xattrs``/``acls`` False: not sent (an access ACL left
    out narrows the group bits, which hold its mask)."""

    def __init__(self, root: str, skip: tuple[str, ...] = (), xattrs: bool = True,
                 acls: bool = True, skip_unreadable: bool = False,
                 tick: Callable[[], None] | None = None) -> None:
        self.root = os.path.abspath(root)
        self.tick = tick  #: called now and then, to say the scan goes on
        self.skip = (*SKIP_TOP, *skip)
        self.paged = bool(skip)
        self.xattrs = xattrs
        self.acls = acls
        self.skip_unreadable = skip_unreadable
        self.tree = Tree(Table(self.root))
        self.names = _Names()
        self.inodes: dict[tuple[int, int], int] = {}  # (dev, ino) -> first entry's id

    def scan(self) -> Tree:
        try:
            root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise _unreadable(".", exc) from None
        try:
            self._add(".", os.fstat(root_fd), root_fd, None, self.root)
            stack = [""]
            while stack:
                stack.extend(reversed(self._read_dir(root_fd, stack.pop())))
                if self.tick is not None:
                    self.tick()
        finally:
            os.close(root_fd)
        return self.tree

    def _read_dir(self, root_fd: int, rel_dir: str) -> list[str]:
        """List one directory; returns its subdirectories' names, in order."""
        try:
            fd = root_fd if not rel_dir else _open_dir(root_fd, rel_dir)
            try:
                with os.scandir(fd) as it:
                    children = sorted(it, key=lambda e: e.name)
                subdirs = []
                for n, child in enumerate(children, 1):
                    if self.tick is not None and not n % 4096:
                        self.tick()
                    rel = f"{rel_dir}/{child.name}" if rel_dir else child.name
                    if not rel_dir and child.name in self.skip:
                        self._reserved(child.name)
                        continue
                    try:
                        st = child.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed before we saw it: not part of this copy
                    if self._add(rel, st, fd, child.name, f"{self.root}/{rel}") == "d":
                        subdirs.append(rel)
                return subdirs
            finally:
                if fd != root_fd:
                    os.close(fd)
        except OSError as exc:
            if exc.errno in _GONE:
                self.note("vanished", rel_dir, "directory removed while the donor read "
                          "the tree: its contents are not copied")
                return []
            if not self.skip_unreadable:
                raise _unreadable(rel_dir or ".", exc) from None
            self.note("unreadable", rel_dir, f"directory could not be read on the donor "
                      f"({exc.strerror}): its contents are not copied")
            return []

    def _reserved(self, name: str) -> None:
        if self.paged and name != "#clone":
            return  # the page store's own working folders
        self.note("reserved", name, f"'{name}' is not copied: the clone reserves this "
                  "name at the top of its destination")

    def note(self, kind: str, rel: str, message: str) -> None:
        self.tree.notes.append(Note(kind, rel, message))
        log.info("%s: %s", rel, message)

    def _add(self, rel: str, st: os.stat_result, dir_fd: int, name: str | None,
             path: str) -> str | None:
        """Append ``rel``'s entry; its kind, or None when it is not listed. ``name``:
        its name in ``dir_fd``; None for the top (``dir_fd`` itself). Runs once a file:
        kept lean (a scan of 20,000 small files is on the clone's path)."""
        kind = _KINDS.get(stat.S_IFMT(st.st_mode))
        if kind is None:
            self.note("type", rel, "not copied: a file type Linux cannot create")
            return None
        mtime, atime, ctime = times(st)
        if max(st.st_mtime_ns, st.st_atime_ns) > LATEST_NS:
            self.note("time", rel, "a time after 2262-04-11 (the latest a signed 64-bit "
                      "count of nanoseconds holds) is copied as that day")
        entries = self.tree.entries
        fid = len(entries)
        wide = 256 + 6 * len(rel)  # from above: a character may take 6 bytes in JSON
        if wide > self.tree.widest:
            self.tree.widest = wide
        if kind != "d" and st.st_nlink > 1:
            first = self.inodes.setdefault((st.st_dev, st.st_ino), fid)
            if first != fid:
                entries.append("h", rel, 0, stat.S_IMODE(st.st_mode), mtime, link=first)
                return "h"
        mode = stat.S_IMODE(st.st_mode)
        uid, gid = st.st_uid, st.st_gid
        names = self.names
        xattrs, acc, dflt = self._xattrs(rel, dir_fd, name, kind, path)
        if acc or dflt or xattrs:
            if acc and not self.acls:  # not sent: the mask in the group bits would widen
                mode = acl.narrow(mode, acc)
                acc = dflt = b""
            uids, gids = {uid}, {gid}
            for value in (acc, dflt):
                if value:
                    more_u, more_g = acl.named_ids(value)
                    uids |= more_u
                    gids |= more_g
            first_named = names.first(uids, gids)
            wide += 2 * (len(acc) + len(dflt) + sum(len(k) + len(v) for k, v in xattrs))
        elif uid in names.users and gid in names.groups:
            first_named = ()  # the usual case: owners named already
        else:
            first_named = names.first({uid}, {gid})
        target = ""
        if kind == "l" and name:
            target = os.readlink(name, dir_fd=dir_fd)
            wide += 6 * len(target)
        if wide > self.tree.widest:
            self.tree.widest = wide
        # (the donor's path of every entry is the table's root and its name: not given)
        if target or xattrs or acc or dflt or first_named or kind in ("c", "b"):
            entries.append(
                kind, rel, st.st_size if kind == "f" else 0, mode, mtime,
                dense=kind == "f" and st.st_blocks * 512 >= st.st_size, uid=uid, gid=gid,
                atime_ns=atime, ctime_ns=ctime, target=target,
                rdev=st.st_rdev if kind in ("c", "b") else 0, xattrs=xattrs, acl=acc,
                dacl=dflt, names=first_named)
        else:  # the usual entry: no field of the rare ones
            entries.append(
                kind, rel, st.st_size if kind == "f" else 0, mode, mtime,
                dense=kind == "f" and st.st_blocks * 512 >= st.st_size, uid=uid, gid=gid,
                atime_ns=atime, ctime_ns=ctime)
        return kind

    def _xattrs(self, rel: str, dir_fd: int, name: str | None, kind: str, path: str
                ) -> tuple[tuple[tuple[str, bytes], ...], bytes, bytes]:
        """(extended attributes, access ACL, default ACL) of one entry, named by its
        path while that is short (a third of the cost of naming it through /proc)."""
        where: str | int = dir_fd if name is None else \
            path if len(path) * 4 < PATH_PIECE else proc_path(dir_fd, name)
        try:
            names = _listxattr(where)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.ENOENT):
                self.note("xattr", rel, f"extended attributes not read ({exc.strerror})")
            return (), b"", b""
        if not names:
            return (), b"", b""
        out = []
        acc = dflt = b""
        for key in sorted(names):
            try:
                if key in (acl.ACCESS, acl.DEFAULT):  # read even under --no-acls: the
                    value = _getxattr(where, key)     # access ACL narrows the bits
                    acl.parse(value)
                    if key == acl.ACCESS:
                        acc = value
                    elif kind == "d":
                        dflt = value
                elif self.xattrs and key.startswith(("user.", "trusted.", "security.")):
                    out.append((key, _getxattr(where, key)))
                elif self.xattrs:
                    self.note("xattr", rel, f"extended attribute {key!r} not copied: "
                              "a namespace the clone does not carry")
            except (OSError, ValueError) as exc:
                self.note("xattr", rel, f"extended attribute {key!r} not read: "
                          f"{getattr(exc, 'strerror', None) or exc}")
        return tuple(out), acc, dflt


def _listxattr(where: str | int) -> list[str]:
    # a descriptor is the entry itself; a path must not be followed if it is a link
    if isinstance(where, int):
        return os.listxattr(where)
    return os.listxattr(where, follow_symlinks=False)


def _getxattr(where: str | int, key: str) -> bytes:
    if isinstance(where, int):
        return os.getxattr(where, key)
    return os.getxattr(where, key, follow_symlinks=False)


def _open_dir(root_fd: int, rel: str) -> int:
    dfd, name, owned = parent_at(root_fd, rel)
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=dfd)
    finally:
        if owned:
            os.close(dfd)


def _unreadable(rel: str, exc: OSError) -> LocalIOError:
    return LocalIOError(f"cannot read the directory '{rel}' on the donor: {exc.strerror}",
                        hint="give the donor's user read access to it, or clone with "
                        "--skip-unreadable to leave it out with a warning")


def scan(root: str, skip: tuple[str, ...] = (), xattrs: bool = True, acls: bool = True,
         skip_unreadable: bool = False, tick: Callable[[], None] | None = None) -> Tree:
    """Walk ``root`` (never following a link): see the module's docstring."""
    return Scanner(root, skip, xattrs, acls, skip_unreadable, tick).scan()
