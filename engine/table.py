"""The manifest held column by column, so that a tree of a million files fits in memory.

An :class:`~engine.messages.Entry` with its strings and integers is a Python object of
about 450 bytes; a manifest of 1,000,000 files kept as a list of them took over 600 MiB
on each side of a clone. :class:`Table` keeps the same entries in fixed-width arrays
(type, flags, size, permission bits, owner, group, the three times), their relative
names encoded one after the other in a single buffer, and the fields few entries have
(a link's target, extended attributes, ACLs, a device's number, the first name of a
hard link, owner names, a path outside the tree) in a dict by id: about 65 bytes an
entry plus its name. An :class:`Entry` is made again each time one is asked for; a
changed one is written back with ``table[i] = entry``.

Ids are positions: entry ``i`` is the ``i``-th appended, as the donor numbers them. A
removed entry (a file that vanished on the donor) keeps its place, marked gone.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from typing import Any, overload

from engine.messages import TOP, Entry

_DENSE = 1
_ATIME = 2  #: the atime is said (otherwise the recipient leaves it)
_GONE = 4
_NO_ID = 0xFFFFFFFF  #: uid/gid not said (-1 in an Entry; chown's "leave it")
#: Entry's fields kept in the dict of rare ones, with their defaults.
_RARE = {"target": "", "rdev": 0, "link": -1, "xattrs": (), "acl": b"", "dacl": b"",
         "names": ()}


def _encode(rel: str) -> bytes:
    # any str round-trips, names undecodable on the donor (lone surrogates) included
    return rel.encode("utf-8", "surrogatepass")


class Table:
    """A manifest's entries (see the module's docstring). ``root``: the absolute path
    the names are relative to, on the donor (an Entry's ``path``); "" on the recipient."""

    def __init__(self, root: str = "") -> None:
        self.root = root
        self._kind = bytearray()
        self._flags = bytearray()
        self._size = array("q")
        self._mode = array("H")
        self._mtime = array("q")
        self._atime = array("q")
        self._ctime = array("q")
        self._uid = array("I")
        self._gid = array("I")
        self._names = bytearray()
        self._ends = array("Q")
        self._rare: dict[int, dict[str, Any]] = {}
        self.gone = 0

    # -- adding -----------------------------------------------------------------------
    def append(self, kind: str, rel: str, size: int, mode: int, mtime_ns: int, *,
               uid: int = -1, gid: int = -1, atime_ns: int | None = None,
               ctime_ns: int = 0, dense: bool = False, path: str = "",
               **rare: Any) -> int:
        """Add an entry; its id. ``path``: kept only when it is not ``root``/``rel``."""
        fid = len(self._kind)
        name = _encode(rel)
        try:
            self._kind.append(ord(kind))
            self._flags.append((_DENSE if dense else 0) |
                               (_ATIME if atime_ns is not None else 0))
            self._size.append(size)
            self._mode.append(mode)
            self._mtime.append(mtime_ns)
            self._atime.append(atime_ns or 0)
            self._ctime.append(ctime_ns)
            self._uid.append(_NO_ID if uid < 0 else uid)
            self._gid.append(_NO_ID if gid < 0 else gid)
            self._ends.append(len(self._names) + len(name))
        except (OverflowError, ValueError, TypeError):
            self._truncate(fid)  # all of the entry or none of it: the columns stay aligned
            raise
        self._names += name
        kept = {k: v for k, v in rare.items() if v != _RARE[k]} if rare else {}
        if path and path != self._path(rel):
            kept["path"] = path
        if kept:
            self._rare[fid] = kept
        return fid

    def add(self, e: Entry) -> int:
        """Append ``e``, whose id must be the next."""
        if e.id != len(self._kind):
            raise ValueError(f"entry {e.id} added as the {len(self._kind)}th")
        return self.append(e.kind, e.rel, e.size, e.mode, e.mtime_ns, uid=e.uid, gid=e.gid,
                           atime_ns=e.atime_ns, ctime_ns=e.ctime_ns, dense=e.dense,
                           path=e.path, target=e.target, rdev=e.rdev, link=e.link,
                           xattrs=e.xattrs, acl=e.acl, dacl=e.dacl, names=e.names)

    def _truncate(self, n: int) -> None:
        for column in (self._kind, self._flags, self._size, self._mode, self._mtime,
                       self._atime, self._ctime, self._uid, self._gid, self._ends):
            del column[n:]

    # -- reading ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._kind)

    def __contains__(self, fid: object) -> bool:
        return isinstance(fid, int) and 0 <= fid < len(self._kind) and \
            not self._flags[fid] & _GONE

    def kind(self, fid: int) -> str:
        return chr(self._kind[fid])

    def size(self, fid: int) -> int:
        return self._size[fid]

    def rel(self, fid: int) -> str:
        start = self._ends[fid - 1] if fid else 0
        return self._names[start:self._ends[fid]].decode("utf-8", "surrogatepass")

    def _path(self, rel: str) -> str:
        if not self.root:
            return ""
        return self.root if rel == TOP else f"{self.root}/{rel}"

    def path(self, fid: int) -> str:
        """Where the donor reads entry ``fid``."""
        rare = self._rare.get(fid)
        if rare is not None and "path" in rare:
            return str(rare["path"])
        return self._path(self.rel(fid))

    def get(self, fid: object) -> Entry | None:
        """Entry ``fid``; None when there is none (or it is gone)."""
        if not isinstance(fid, int) or fid not in self:
            return None
        return self._entry(fid)

    def _entry(self, i: int) -> Entry:
        start = self._ends[i - 1] if i else 0
        rel = self._names[start:self._ends[i]].decode("utf-8", "surrogatepass")
        flags = self._flags[i]
        uid, gid = self._uid[i], self._gid[i]
        # Positional, in Entry's field order: a block's segments each make one, and
        # keywords cost a third more.
        e = Entry(i, chr(self._kind[i]), rel, self._size[i], self._mode[i], self._mtime[i],
                  "", bool(flags & _DENSE), -1 if uid == _NO_ID else uid,
                  -1 if gid == _NO_ID else gid, self._atime[i] if flags & _ATIME else None,
                  0, -1, (), b"", b"", (), self._path(rel),
                  self._ctime[i])
        rare = self._rare.get(i)
        if rare is not None:
            for key, value in rare.items():
                setattr(e, key, value)
        return e

    @overload
    def __getitem__(self, i: int) -> Entry: ...
    @overload
    def __getitem__(self, i: slice) -> list[Entry]: ...

    def __getitem__(self, i: int | slice) -> Entry | list[Entry]:
        if isinstance(i, slice):
            return [self._entry(k) for k in range(*i.indices(len(self._kind)))]
        if i < 0:
            i += len(self._kind)
        if not 0 <= i < len(self._kind):
            raise IndexError(i)
        return self._entry(i)

    def wire(self, start: int, stop: int) -> list[dict[str, Any]]:
        """Entries ``start`` to ``stop - 1`` as the manifest sends them
        (:meth:`Entry.to_wire`), made from the columns: the donor sends every entry of
        a tree once, and an Entry made only to be written out cost it a tenth of its
        scan. An entry with a rare field, of a rare type, or whose name is not UTF-8
        goes through its Entry."""
        out = []
        plain = (ord("f"), ord("d"))
        for i in range(start, min(stop, len(self._kind))):
            kind = self._kind[i]
            if kind not in plain or i in self._rare:
                out.append(self._entry(i).to_wire())
                continue
            try:
                rel = self._names[self._ends[i - 1] if i else 0:self._ends[i]].decode()
            except UnicodeDecodeError:  # a lone surrogate: sent as raw bytes
                out.append(self._entry(i).to_wire())
                continue
            flags = self._flags[i]
            row: dict[str, Any] = {"id": i, "t": chr(kind), "s": self._size[i],
                                   "m": self._mode[i], "mt": self._mtime[i]}
            if flags & _DENSE:
                row["dn"] = 1
            row["p"] = rel
            if self._uid[i] != _NO_ID:
                row["u"] = self._uid[i]
            if self._gid[i] != _NO_ID:
                row["g"] = self._gid[i]
            if flags & _ATIME:
                row["at"] = self._atime[i]
            out.append(row)
        return out

    def __iter__(self) -> Iterator[Entry]:
        """Every entry not gone, in order."""
        for i in range(len(self._kind)):
            if not self._flags[i] & _GONE:
                yield self._entry(i)

    # -- changing ---------------------------------------------------------------------
    def __setitem__(self, fid: int, e: Entry) -> None:
        """Entry ``fid`` as it is now (its name and type never change)."""
        if e.id != fid or e.kind != self.kind(fid):
            raise ValueError(f"entry {fid} replaced by another")
        for value in (e.size, e.mtime_ns, e.atime_ns or 0, e.ctime_ns):  # checked first:
            array("q", [value])  # a value that does not fit changes nothing
        array("H", [e.mode])
        array("I", [_NO_ID if e.uid < 0 else e.uid, _NO_ID if e.gid < 0 else e.gid])
        self._flags[fid] = (self._flags[fid] & _GONE) | (_DENSE if e.dense else 0) | \
            (_ATIME if e.atime_ns is not None else 0)
        self._size[fid] = e.size
        self._mode[fid] = e.mode
        self._mtime[fid] = e.mtime_ns
        self._atime[fid] = e.atime_ns or 0
        self._ctime[fid] = e.ctime_ns
        self._uid[fid] = _NO_ID if e.uid < 0 else e.uid
        self._gid[fid] = _NO_ID if e.gid < 0 else e.gid

    def drop(self, fid: int) -> None:
        """Entry ``fid`` is gone: skipped from now on, its id not reused."""
        if not self._flags[fid] & _GONE:
            self._flags[fid] |= _GONE
            self.gone += 1

    def files(self) -> Iterator[tuple[int, int, int, int]]:
        """(id, size, mtime, ctime) of each regular file not gone, in order."""
        f = ord("f")
        for i, t in enumerate(self._kind):
            if t == f and not self._flags[i] & _GONE:
                yield i, self._size[i], self._mtime[i], self._ctime[i]

    # -- sums -------------------------------------------------------------------------
    def count(self, kind: str) -> int:
        """Entries of ``kind`` not gone."""
        if not self.gone:
            return self._kind.count(ord(kind))
        k = ord(kind)
        return sum(1 for i, t in enumerate(self._kind) if t == k and not self._flags[i] & _GONE)

    def file_bytes(self) -> int:
        """The sizes of the regular files not gone, added up."""
        f = ord("f")
        return sum(s for t, s, g in zip(self._kind, self._size, self._flags, strict=True)
                   if t == f and not g & _GONE)
