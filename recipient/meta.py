"""What a faithful copy keeps beyond the bytes: owners, extended attributes, ACLs,
permission bits and times, set on the recipient, and what could not be set, reported.

Runs in the recipient's coordinator (FILE SYNC) and, for :class:`Owners`' decisions,
in the coordinator as it hands a whole small file to a writer (the writer then sets
owner, bits and times itself). Nothing here blocks but the system calls.

The order is the kernel's: owner first (``chown`` clears setuid and setgid bits and
file capabilities), then extended attributes and ACLs (an access ACL rewrites the
group bits), then the permission bits, then the times. Owners go by name, as rsync
does: a donor's user or group whose name exists here gets this host's number for it,
any other keeps its number (``--numeric-ids``: numbers always). A recipient that is not
root cannot give files away: they are its own, a group it belongs to is kept, and a
setuid or setgid bit whose owner or group could not be kept is dropped with a warning,
so that a copy never holds a setuid file of someone it did not belong to on the donor.
An access ACL that is not set (``--no-acls``, or refused) leaves the group bits as the
owning group's entry allows, not as the mask did (the mask would widen access).
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass

from engine import acl
from engine.errors import ProtocolError
from engine.fsutil import proc_path
from engine.messages import Entry, Note

#: errnos that say "this cannot be kept here", reported rather than fatal
REFUSED = (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EINVAL, errno.ENOSPC,
           errno.E2BIG, errno.ERANGE, errno.EDQUOT)
_SPECIAL_TYPES = {"p": stat.S_IFIFO, "c": stat.S_IFCHR, "b": stat.S_IFBLK,
                  "s": stat.S_IFSOCK}
_SPECIAL_NAMES = {"p": "FIFO", "c": "character device", "b": "block device",
                  "s": "socket"}


@dataclass(frozen=True)
class Fidelity:
    """What the recipient keeps (its command-line options)."""

    numeric_ids: bool = False
    xattrs: bool = True
    acls: bool = True
    fail_on_change: bool = False
    skip_unreadable: bool = False
    #: clone-local's fast path: the donor's readers write file data into the
    #: destination themselves (donor/direct.py), so a file sent again is not emptied
    #: here (a reader may be writing it already); they clear its stale bytes instead
    direct_copy: bool = False


class Notes:
    """Warnings, each handed to ``sink`` (the status book and the events); conditions
    that touch many entries (owners as another user, a namespace of attributes the
    kernel refuses) are counted and given once, with their first entry, by :meth:`flush`."""

    def __init__(self, sink: Callable[[Note], None]) -> None:
        self.sink = sink
        self.groups: dict[tuple[str, str], tuple[str, int]] = {}

    def add(self, kind: str, rel: str, message: str) -> None:
        self.sink(Note(kind, rel, message))

    def group(self, kind: str, what: str, rel: str) -> None:
        first, count = self.groups.get((kind, what), (rel, 0))
        self.groups[kind, what] = first, count + 1

    def flush(self) -> None:
        for (kind, what), (rel, count) in self.groups.items():
            many = f"on {count} entries, the first of them this one" if count != 1 else \
                "on this entry"
            self.sink(Note(kind, rel, f"{what}, {many}"))
        self.groups.clear()


class Owners:
    """Who a copied entry belongs to here (see the module's docstring)."""

    def __init__(self, numeric_ids: bool) -> None:
        self.numeric = numeric_ids
        self.euid = os.geteuid()
        self.egid = os.getegid()
        self.root = self.euid == 0
        self.groups = set(os.getgroups()) | {self.egid}
        self.names: dict[str, dict[int, str]] = {"u": {}, "g": {}}
        self.local: dict[str, dict[int, int]] = {"u": {}, "g": {}}

    def learn(self, names: tuple[tuple[str, int, str], ...]) -> None:
        """The donor's names of its ids; a second, different name is refused."""
        for kind, ident, name in names:
            known = self.names[kind].setdefault(ident, name)
            if known != name:
                raise ProtocolError(f"two names for the {kind}id {ident}")

    def _map(self, kind: str, ident: int) -> int:
        cache = self.local[kind]
        local = cache.get(ident)
        if local is None:
            name = None if self.numeric else self.names[kind].get(ident)
            local = ident
            if name is not None:
                try:
                    local = pwd.getpwnam(name).pw_uid if kind == "u" else \
                        grp.getgrnam(name).gr_gid
                except KeyError:  # no such name here: the number, as rsync does
                    pass
            cache[ident] = local
        return local

    def uid(self, ident: int) -> int:
        return self._map("u", ident)

    def gid(self, ident: int) -> int:
        return self._map("g", ident)

    def decide(self, e: Entry, notes: Notes) -> tuple[int, int, int]:
        """(uid, gid, permission bits) to set for ``e``; -1: leave the id as created."""
        uid = self.uid(e.uid) if e.uid >= 0 else -1
        gid = self.gid(e.gid) if e.gid >= 0 else -1
        if self.root:
            return (-1 if uid == self.euid else uid), (-1 if gid == self.egid else gid), \
                e.mode
        mode = e.mode
        kept_u = uid in (-1, self.euid)
        kept_g = gid == -1 or gid in self.groups
        if not (kept_u and kept_g):
            notes.group("owner", f"owner or group not kept: the recipient is not root, so "
                        f"entries belong to uid {self.euid}", e.rel)
        lost = [(bit, flag) for bit, flag, kept in (("setuid", stat.S_ISUID, kept_u),
                                                    ("setgid", stat.S_ISGID, kept_g))
                if mode & flag and not kept]
        for _, flag in lost:
            mode &= ~flag
        if lost:
            bits = [bit for bit, _ in lost]
            notes.add("mode", e.rel, f"{' and '.join(bits)} bit dropped: its "
                      f"{'owner' if 'setuid' in bits else 'group'} ({e.uid}:{e.gid} on the "
                      "donor) could not be kept, as the recipient is not root")
        return -1, (gid if kept_g and gid not in (-1, self.egid) else -1), mode


class Applier:
    """Sets an entry's owner, extended attributes, ACLs, bits and times."""

    def __init__(self, owners: Owners, keep: Fidelity, notes: Notes) -> None:
        self.owners = owners
        self.keep = keep
        self.notes = notes

    def on_fd(self, fd: int, e: Entry) -> None:
        """A regular file or a directory, open as ``fd``."""
        uid, gid, mode = self.owners.decide(e, self.notes)
        if uid != -1 or gid != -1:
            self._guard(e, "owner", "owner not set", os.fchown, fd, uid, gid)
        self._xattrs(fd, e)
        mode = self._acls(fd, e, mode)
        os.fchmod(fd, mode)
        os.utime(fd, ns=self.times(e))

    def at(self, dir_fd: int, name: str, e: Entry) -> None:
        """A symbolic link or a special file ``name`` in ``dir_fd``, just made."""
        uid, gid, mode = self.owners.decide(e, self.notes)
        if uid != -1 or gid != -1:
            self._guard(e, "owner", "owner not set", os.chown, name, uid, gid,
                        dir_fd=dir_fd, follow_symlinks=False)
        path = proc_path(dir_fd, name)
        self._xattrs(path, e)
        if e.kind != "l":  # a link's bits are always 0777; it is ours, not followed
            mode = self._acls(path, e, mode)
            os.chmod(name, mode, dir_fd=dir_fd)
        os.utime(name, ns=self.times(e), dir_fd=dir_fd, follow_symlinks=False)

    def special(self, dir_fd: int, name: str, e: Entry) -> bool:
        """Make the FIFO, device or socket ``e``; False (reported) where not allowed."""
        try:
            os.mknod(name, _SPECIAL_TYPES[e.kind] | 0o600, e.rdev, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in REFUSED:
                raise
            why = " (devices need root)" if e.kind in ("c", "b") and \
                not self.owners.root else ""
            self.notes.add("special", e.rel, f"{_SPECIAL_NAMES[e.kind]} not created: "
                           f"{exc.strerror}{why}")
            return False
        return True

    @staticmethod
    def times(e: Entry) -> tuple[int, int]:
        return (e.mtime_ns if e.atime_ns is None else e.atime_ns), e.mtime_ns

    def _guard(self, e: Entry, kind: str, what: str, call: Callable[..., object],
               *args: object, **kw: object) -> bool:
        try:
            call(*args, **kw)
        except OSError as exc:
            if exc.errno not in REFUSED:
                raise
            self.notes.group(kind, f"{what} ({exc.strerror})", e.rel)
            return False
        return True

    def _xattrs(self, where: int | str, e: Entry) -> None:
        if not (e.xattrs and self.keep.xattrs):
            return
        for key, value in e.xattrs:
            space = key.partition(".")[0]
            if isinstance(where, int):
                self._guard(e, "xattr", f"{space}.* extended attributes not set",
                            os.setxattr, where, key, value)
            else:
                self._guard(e, "xattr", f"{space}.* extended attributes not set",
                            os.setxattr, where, key, value, follow_symlinks=False)

    def _acls(self, where: int | str, e: Entry, mode: int) -> int:
        """Set the ACLs; the permission bits to set after them."""
        for key, value in ((acl.ACCESS, e.acl), (acl.DEFAULT, e.dacl)):
            if not value:
                continue
            done = False
            if self.keep.acls:
                mapped = acl.remap(value, self.owners.uid, self.owners.gid)
                kw = {} if isinstance(where, int) else {"follow_symlinks": False}
                done = self._guard(e, "acl", "POSIX ACLs not set", os.setxattr, where, key,
                                   mapped, **kw)
            if not done and key == acl.ACCESS:
                mode = acl.narrow(mode, value)
        return mode

