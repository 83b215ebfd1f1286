"""POSIX ACLs as Linux stores them: the ``system.posix_acl_access`` and
``system.posix_acl_default`` extended attributes.

A value is a little-endian u32 version (2) followed by entries of (u16 tag, u16 perm,
u32 id); the id counts only for named users and groups. The donor reads the value
as it is and names the ids it mentions; the recipient checks it (it came from the
network), maps the named ids as it maps owners, and writes it back. The kernel wants
the entries sorted by tag, then id: a remapped ACL is sorted again.

Runs in any process; holds no state. Pure functions of bytes, so that a value that
is not an ACL raises :class:`ValueError` here and never reaches the kernel unchecked.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

ACCESS = "system.posix_acl_access"
DEFAULT = "system.posix_acl_default"
VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
TAGS = (USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER)
UNDEFINED_ID = 0xFFFFFFFF
MAX_ENTRIES = 8192  #: more than any Linux file system stores (ext4: about 500)

_HEAD = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")

Entry = tuple[int, int, int]  # (tag, perm, id)


def parse(value: bytes) -> list[Entry]:
    """The entries of an ACL value; ValueError when it is not one."""
    if len(value) < _HEAD.size or (len(value) - _HEAD.size) % _ENTRY.size:
        raise ValueError(f"an ACL of {len(value)} bytes")
    (version,) = _HEAD.unpack_from(value)
    count = (len(value) - _HEAD.size) // _ENTRY.size
    if version != VERSION or count > MAX_ENTRIES:
        raise ValueError(f"an ACL of version {version} with {count} entries")
    entries = [_ENTRY.unpack_from(value, _HEAD.size + i * _ENTRY.size) for i in range(count)]
    for tag, perm, _ in entries:
        if tag not in TAGS or perm > 7:
            raise ValueError(f"an ACL entry of tag {tag:#x}, permissions {perm:#o}")
    return entries


def pack(entries: list[Entry]) -> bytes:
    ordered = sorted(entries, key=lambda e: (e[0], e[2] if e[0] in (USER, GROUP) else 0))
    return _HEAD.pack(VERSION) + b"".join(_ENTRY.pack(*e) for e in ordered)


def named_ids(value: bytes) -> tuple[set[int], set[int]]:
    """The user and group ids an ACL names (its USER and GROUP entries)."""
    entries = parse(value)
    return ({i for t, _, i in entries if t == USER}, {i for t, _, i in entries if t == GROUP})


def remap(value: bytes, uid: Callable[[int], int], gid: Callable[[int], int]) -> bytes:
    """``value`` with its named users and groups mapped by ``uid`` and ``gid``."""
    out = []
    for tag, perm, ident in parse(value):
        if tag == USER:
            ident = uid(ident)
        elif tag == GROUP:
            ident = gid(ident)
        out.append((tag, perm, ident))
    return pack(out)


def narrow(mode: int, access: bytes) -> int:
    """The bits of ``mode`` without its access ACL ``access``: the group bits as the
    owning group's entry allows (with an ACL they hold the mask, which may allow more,
    so that dropping the ACL would widen access)."""
    group = next((perm for tag, perm, _ in parse(access) if tag == GROUP_OBJ), 0)
    return (mode & ~0o070) | ((group & (mode >> 3) & 7) << 3)
