"""The bodies of the clone protocol's messages: one frozen dataclass each.

This is the only module that reads or writes the wire keys of a body. Each class has
``to_body()`` (what is sent) and ``from_body(body, ...)`` (what is received: every
field type- and range-checked, a violation raising :class:`ProtocolError`, 3863), so
the donor, the recipient and the test peers speak one schema. Framing (header, JSON,
payload) is :mod:`engine.protocol`; docs/protocol.md is the specification.

Runs in any process; holds no state. A password is never part of a ``repr``.

It is past 600 lines on purpose: one schema in one place is what keeps the two sides
and the test peers from drifting apart, and each class is small and alike.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from engine.acl import parse as parse_acl
from engine.codec import CODECS, LEGACY_BLOCK, MAX_SEGMENTS, valid_block_size
from engine.errors import ProtocolError, UnsafeName
from engine.fsutil import RESERVED_TOP, check_relpath
from engine.protocol import (
    MAX_CREDIT,
    MAX_FILE_SIZE,
    MAX_FILES,
    MAX_FILES_PAGE,
    MAX_STREAMS,
    Locator,
    want,
)

#: Snapshot states as locators and sealed blocks number them.
STATE_NUMBERS = {"FILE COPY": 1, "PAGE COPY": 2, "REDO COPY": 3}
MAX_DDL_TIMEOUT = 2592000  #: clone_ddl_timeout's ceiling, in seconds
MAX_NAME_FIELD = 256  #: characters in a user, agent, OS or machine name
MAX_BLOCKS = 1 << 40
MAX_BYTES = 1 << 50
DEFAULT_RESTART_TIMEOUT = 300  #: seconds: clone_donor_timeout_after_network_failure's 5 min
MAX_RESTART_TIMEOUT = 1800  #: its ceiling, 30 min
MAX_RESTARTS = 100  #: restarts of one clone, as MySQL


def printable(text: str, limit: int = 2000) -> str:
    """A peer's words without control characters, cut to ``limit``: they reach a
    terminal and a log, where an escape sequence could draw what is not there."""
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


def _text(body: dict[str, Any], key: str, default: str = "", limit: int = MAX_NAME_FIELD
          ) -> str:
    value = body.get(key, default)
    if not isinstance(value, str) or len(value) > limit:
        raise ProtocolError(f"field '{key}' missing or of the wrong type")
    return value


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"field '{key}' is not a boolean")
    return value


# -- the handshake ---------------------------------------------------------------------
KEY_FIELD = 64  #: characters of a base64 key or proof field


@dataclass(frozen=True)
class Hello:
    """HELLO: the first message of every stream. ``e``: the recipient's ephemeral
    public key (base64), or "" to ask for a plain stream (--require-no-ssl)."""

    version: int
    e: str = ""

    def to_body(self) -> dict[str, Any]:
        return {"version": self.version, "e": self.e}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Hello:
        return cls(want(body, "version", int, 0, 255), _text(body, "e", limit=KEY_FIELD))


@dataclass(frozen=True)
class HelloReply:
    """HELLO's answer: the donor's ephemeral key ``e``, its static key ``s`` and the
    ``confirm``ation that it holds it (all "" for a plain stream), and ``auth``: "scram"
    (prove a password) or "none" (a donor that allows anonymous clones)."""

    version: int
    auth: str
    e: str = ""
    s: str = ""
    confirm: str = ""

    @property
    def encrypted(self) -> bool:
        return bool(self.e)

    def to_body(self) -> dict[str, Any]:
        return {"version": self.version, "auth": self.auth, "e": self.e, "s": self.s,
                "confirm": self.confirm}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> HelloReply:
        auth = body.get("auth")
        if auth not in ("scram", "none"):
            raise ProtocolError(f"unknown authentication {str(auth)[:20]!r}")
        return cls(want(body, "version", int, 0, 255), auth,
                   _text(body, "e", limit=KEY_FIELD), _text(body, "s", limit=KEY_FIELD),
                   _text(body, "confirm", limit=KEY_FIELD))


@dataclass(frozen=True)
class Auth:
    """AUTH: one SCRAM message of the recipient's (``step`` "first" or "final")."""

    step: str
    data: str

    def to_body(self) -> dict[str, Any]:
        return {"step": self.step, "data": self.data}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Auth:
        step = body.get("step")
        if step not in ("first", "final"):
            raise ProtocolError(f"AUTH step {str(step)[:20]!r}")
        return cls(step, _text(body, "data", limit=1024))


@dataclass(frozen=True)
class AuthReply:
    """AUTH's answer: the donor's SCRAM message."""

    data: str

    def to_body(self) -> dict[str, Any]:
        return {"data": self.data}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> AuthReply:
        return cls(_text(body, "data", limit=1024))


@dataclass(frozen=True)
class StatusAsk:
    """STATUS: what is the donor cloning, or what did it clone last? (an empty body;
    the answer, STATUS_REPLY, is checked by recipient/donorstatus.py)"""

    def to_body(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Init:
    """INIT: a recipient asks for a clone (stream 0, after HELLO and AUTH)."""

    version: int
    user: str
    streams: int = 1
    ddl_timeout: int = 300
    block_size: int = LEGACY_BLOCK
    compression: str = "none"
    agent: str = "clone-agent"
    os: str = ""
    machine: str = ""
    xattrs: bool = True  #: send extended attributes (--no-xattrs)
    acls: bool = True  #: send POSIX ACLs (--no-acls)
    skip_unreadable: bool = False  #: a file the donor cannot read is reported, not fatal
    #: seconds the donor keeps the clone for a REINIT after a network failure
    #: (clone_donor_timeout_after_network_failure; 0: it ends the clone at once)
    restart_timeout: int = DEFAULT_RESTART_TIMEOUT

    def to_body(self) -> dict[str, Any]:
        body = {"version": self.version, "user": self.user,
                "restart_timeout": self.restart_timeout,
                "agent": self.agent, "os": self.os, "machine": self.machine,
                "streams": self.streams, "ddl_timeout": self.ddl_timeout,
                "block_size": self.block_size, "compression": self.compression}
        if not self.xattrs:
            body["xattrs"] = False
        if not self.acls:
            body["acls"] = False
        if self.skip_unreadable:
            body["skip_unreadable"] = True
        return body

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Init:
        compression = body.get("compression", "none")
        if not isinstance(compression, str) or compression not in CODECS:
            raise ProtocolError(f"unknown compression {str(compression)[:40]!r}")
        block_size = body.get("block_size", LEGACY_BLOCK)  # absent: before negotiation
        if not valid_block_size(block_size):
            raise ProtocolError(f"block size {str(block_size)[:40]!r} not a power of two "
                                "from 64 KiB to 4 MiB")
        return cls(
            version=want(body, "version", int, 0, 255),
            user=_text(body, "user"),
            streams=want(body, "streams", int, 1, MAX_STREAMS) if "streams" in body else 1,
            ddl_timeout=want(body, "ddl_timeout", int, 0, MAX_DDL_TIMEOUT)
            if "ddl_timeout" in body else 300,
            block_size=block_size, compression=compression,
            agent=_text(body, "agent"), os=_text(body, "os"), machine=_text(body, "machine"),
            xattrs=body.get("xattrs", True) is not False, acls=body.get("acls", True) is not False,
            skip_unreadable=_flag(body, "skip_unreadable"),
            restart_timeout=want(body, "restart_timeout", int, 0, MAX_RESTART_TIMEOUT)
            if "restart_timeout" in body else DEFAULT_RESTART_TIMEOUT)


@dataclass(frozen=True)
class Config:
    """CONFIG: the donor's answer to INIT, the values checked before any data moves."""

    version: int
    clone_id: int
    files: int
    bytes: int
    blocks: int
    block_size: int
    files_page: int = 0  #: entries a FILES page; 0: not said (one page at a time)
    paged: bool = False  #: a page store: PAGE COPY and REDO COPY follow FILE COPY
    page_size: int = 0
    snapshot_id: str = ""
    server_version: str = ""
    os: str = ""
    machine: str = ""
    data_dir: str = ""
    #: what every other stream of this clone must show in its ATTACH (base64 of 32
    #: random bytes): only the authenticated master receives it
    secret: str = field(default="", repr=False)

    def to_body(self) -> dict[str, Any]:
        return {"version": self.version, "clone_id": self.clone_id, "secret": self.secret,
                "snapshot_id": self.snapshot_id, "server_version": self.server_version,
                "os": self.os, "machine": self.machine, "data_dir": self.data_dir,
                "files": self.files, "bytes": self.bytes, "blocks": self.blocks,
                "block_size": self.block_size, "files_page": self.files_page,
                "paged": self.paged, "page_size": self.page_size}

    @classmethod
    def from_body(cls, body: dict[str, Any], asked_block: int) -> Config:
        """``asked_block``: the block size INIT asked for; a donor may cut smaller
        blocks, never larger, and one that does not say cuts 1 MiB."""
        block = want(body, "block_size", int, 1, asked_block) if "block_size" in body \
            else min(asked_block, LEGACY_BLOCK)
        return cls(
            version=want(body, "version", int, 0, 255) if "version" in body else 1,
            clone_id=want(body, "clone_id", int, 0),
            files=want(body, "files", int, 0, MAX_FILES),
            bytes=want(body, "bytes", int, 0, MAX_BYTES),
            blocks=want(body, "blocks", int, 0, MAX_BLOCKS),
            block_size=block,
            files_page=want(body, "files_page", int, 1, MAX_FILES_PAGE)
            if "files_page" in body else 0,
            paged=bool(body.get("paged")),
            page_size=want(body, "page_size", int, 0, 65536) if "page_size" in body else 0,
            snapshot_id=_text(body, "snapshot_id"),
            server_version=_text(body, "server_version"), os=_text(body, "os"),
            machine=_text(body, "machine"), data_dir=_text(body, "data_dir", limit=4096),
            secret=_text(body, "secret", limit=KEY_FIELD))


@dataclass(frozen=True)
class Attach:
    """ATTACH: an extra stream joins clone ``clone_id``, showing CONFIG's secret."""

    clone_id: int
    stream: int
    secret: str = field(default="", repr=False)

    def to_body(self) -> dict[str, Any]:
        return {"clone_id": self.clone_id, "stream": self.stream, "secret": self.secret}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Attach:
        return cls(want(body, "clone_id", int, 0), want(body, "stream", int, 0, MAX_STREAMS),
                   _text(body, "secret", limit=KEY_FIELD))


@dataclass(frozen=True)
class Locs:
    """LOCS: the donor's answer to ATTACH."""

    clone_id: int
    stream: int

    def to_body(self) -> dict[str, Any]:
        return {"clone_id": self.clone_id, "stream": self.stream}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Locs:
        return cls(want(body, "clone_id", int, 0),
                   want(body, "stream", int, 0, MAX_STREAMS) if "stream" in body else 0)


@dataclass(frozen=True)
class Reinit:
    """REINIT: a recipient whose connection broke comes back to clone ``clone_id``, on a
    new master stream after HELLO and AUTH, showing CONFIG's secret. ``serial`` counts
    the states it has begun (0: the first FILE COPY pass); ``locator`` says which blocks
    of its current state are written; ``restarts`` counts its restarts, this one too."""

    clone_id: int
    secret: str = field(repr=False)
    serial: int
    locator: Locator
    restarts: int

    def to_body(self) -> dict[str, Any]:
        return {"clone_id": self.clone_id, "secret": self.secret, "serial": self.serial,
                "locator": self.locator.to_body(), "restarts": self.restarts}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Reinit:
        return cls(want(body, "clone_id", int, 0), _text(body, "secret", limit=KEY_FIELD),
                   want(body, "serial", int, 0, 64),
                   Locator.from_body(want(body, "locator", dict)),
                   want(body, "restarts", int, 1, MAX_RESTARTS))


@dataclass(frozen=True)
class Resumed:
    """The donor's answer to REINIT (type LOCS, MySQL's answer to it): the clone goes
    on. ``serial``: the states the donor has begun; when it is one more than the
    recipient's, ``missed`` is the STATE answer that never arrived, and the recipient
    begins that state. ``resend``: blocks of the current state it will send again."""

    clone_id: int
    serial: int
    resend: int
    missed: State | None = None

    def to_body(self) -> dict[str, Any]:
        return {"clone_id": self.clone_id, "stream": 0, "serial": self.serial,
                "resend": self.resend,
                "missed": self.missed.to_body() if self.missed is not None else None}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Resumed:
        missed = body.get("missed")
        if missed is not None and not isinstance(missed, dict):
            raise ProtocolError("field 'missed' is not an object")
        return cls(want(body, "clone_id", int, 0), want(body, "serial", int, 0, 64),
                   want(body, "resend", int, 0, MAX_BLOCKS),
                   State.from_body(missed) if missed is not None else None)


# -- the manifest ---------------------------------------------------------------------
#: directory, regular file, symbolic link, another name of an earlier entry (a hard
#: link), FIFO, character device, block device, socket
ENTRY_KINDS = ("d", "f", "l", "h", "p", "c", "b", "s")
SPECIAL_KINDS = ("p", "c", "b", "s")
TOP = "."  #: the name of the top directory's own entry, the first of a manifest
MAX_ID = 0xFFFFFFFE  #: a user or group id (0xFFFFFFFF means "leave it" to chown)
MAX_XATTRS = 256  #: extended attributes of one entry
MAX_XATTR_VALUE = 65536  #: bytes in one value (Linux's XATTR_SIZE_MAX)
MAX_XATTR_BYTES = 1 << 20  #: bytes in all the names and values of one entry
MAX_USER_NAME = 255
INT64 = 1 << 63


def _b64(raw: dict[str, Any], key: str, limit: int) -> bytes:
    try:
        value = base64.b64decode(want(raw, key, str), validate=True)
    except ValueError:
        raise ProtocolError(f"field '{key}' is not base64") from None
    if len(value) > limit:
        raise ProtocolError(f"field '{key}' of {len(value)} bytes")
    return value


def _enc(value: bytes) -> str:
    return base64.b64encode(value).decode()


@dataclass(slots=True)
class Entry:
    """One entry of the manifest, as both sides know it: the donor makes it from a
    scan (with ``path``, where it reads the file, and ``ctime_ns``, to notice a change
    while it reads), the recipient from the wire.

    Never changed once made (a new one comes from ``dataclasses.replace``), but not
    frozen: a frozen dataclass sets each of its 19 fields through ``object.__setattr__``,
    3.4 us an entry, which made the scan of a tree of small files half as slow again.
    Slots keep it near 200 bytes.

    ``uid``/``gid`` -1 and ``atime_ns`` None: not said (the recipient leaves them).
    ``names``: ("u" or "g", id, name) for the ids this entry mentions first (as owner
    or in an ACL), so that the recipient maps owners by name as rsync does."""

    id: int
    kind: str
    rel: str
    size: int
    mode: int
    mtime_ns: int
    target: str = ""
    dense: bool = False  #: a regular file with no holes: the recipient may preallocate
    uid: int = -1
    gid: int = -1
    atime_ns: int | None = None
    rdev: int = 0  #: a device's number ("c", "b")
    link: int = -1  #: "h": the id of the earlier entry whose inode this name shares
    xattrs: tuple[tuple[str, bytes], ...] = ()  #: (name, value), ACLs apart
    acl: bytes = b""  #: system.posix_acl_access, as the kernel stores it
    dacl: bytes = b""  #: system.posix_acl_default (a directory's)
    names: tuple[tuple[str, int, str], ...] = ()
    path: str = ""  #: the donor's absolute path; never on the wire
    ctime_ns: int = 0  #: the donor's; never on the wire

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "t": self.kind, "s": self.size,
                               "m": self.mode, "mt": self.mtime_ns}
        if self.dense:
            out["dn"] = 1
        try:
            self.rel.encode("utf-8")
            out["p"] = self.rel
        except UnicodeEncodeError:  # a name that is not UTF-8 travels as its raw bytes
            out["pb"] = _enc(os.fsencode(self.rel))
        if self.kind == "l":
            out["lt"] = _enc(os.fsencode(self.target))
        if self.uid >= 0:
            out["u"] = self.uid
        if self.gid >= 0:
            out["g"] = self.gid
        if self.atime_ns is not None:
            out["at"] = self.atime_ns
        if self.kind in ("c", "b"):
            out["rd"] = self.rdev
        if self.kind == "h":
            out["ln"] = self.link
        if self.xattrs:
            out["x"] = [[_enc(os.fsencode(k)), _enc(v)] for k, v in self.xattrs]
        if self.acl:
            out["acl"] = _enc(self.acl)
        if self.dacl:
            out["dacl"] = _enc(self.dacl)
        if self.names:
            out["nm"] = [list(n) for n in self.names]
        return out

    @classmethod
    def from_wire(cls, raw: Any, reserved: tuple[str, ...] = RESERVED_TOP) -> Entry:
        """Checks what one entry can say on its own (the manifest checks the rest:
        duplicates, parents, links, counts). ``reserved``: top-level names refused."""
        if not isinstance(raw, dict):
            raise ProtocolError("manifest entry is not an object")
        fid = want(raw, "id", int, 0, MAX_FILES)
        kind = raw.get("t")
        if kind not in ENTRY_KINDS:
            raise ProtocolError(f"manifest entry of unknown type {str(kind)[:20]!r}")
        rel: object
        if "pb" in raw:
            try:
                rel = os.fsdecode(base64.b64decode(want(raw, "pb", str), validate=True))
            except ValueError:
                raise UnsafeName("undecodable file name") from None
        else:
            rel = raw.get("p")
        if not (rel == TOP and kind == "d"):  # the top's own entry: the manifest checks it
            rel = check_relpath(rel, reserved)
        assert isinstance(rel, str)
        target = ""
        if kind == "l":
            try:
                target = os.fsdecode(base64.b64decode(want(raw, "lt", str), validate=True))
            except ValueError:
                raise UnsafeName("undecodable link target") from None
            if "\x00" in target or not target or len(target) > 4096:
                raise UnsafeName(f"bad link target for {rel!r}")
        acl = _b64(raw, "acl", MAX_XATTR_VALUE) if "acl" in raw else b""
        dacl = _b64(raw, "dacl", MAX_XATTR_VALUE) if "dacl" in raw else b""
        for value in (acl, dacl):
            if value:
                try:
                    parse_acl(value)
                except ValueError as exc:
                    raise ProtocolError(f"{rel!r}: {exc}") from None
        if dacl and kind != "d":
            raise ProtocolError(f"a default ACL on {rel!r}, which is not a directory")
        return cls(
            fid, kind, rel, want(raw, "s", int, 0, MAX_FILE_SIZE),
            want(raw, "m", int, 0, 0o7777), want(raw, "mt", int, -INT64, INT64 - 1),
            target, raw.get("dn") == 1,
            uid=want(raw, "u", int, 0, MAX_ID) if "u" in raw else -1,
            gid=want(raw, "g", int, 0, MAX_ID) if "g" in raw else -1,
            atime_ns=want(raw, "at", int, -INT64, INT64 - 1) if "at" in raw else None,
            rdev=want(raw, "rd", int, 0, (1 << 64) - 1) if kind in ("c", "b") else 0,
            link=want(raw, "ln", int, 0, MAX_FILES) if kind == "h" else -1,
            xattrs=_xattrs(raw.get("x")) if "x" in raw else (), acl=acl, dacl=dacl,
            names=_names(raw.get("nm")) if "nm" in raw else ())


def _xattrs(raw: Any) -> tuple[tuple[str, bytes], ...]:
    if not isinstance(raw, list) or len(raw) > MAX_XATTRS:
        raise ProtocolError("extended attributes malformed or too many")
    out = []
    total = 0
    for pair in raw:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ProtocolError("an extended attribute is not a pair")
        name = _b64({"k": pair[0]}, "k", 255)
        value = _b64({"v": pair[1]}, "v", MAX_XATTR_VALUE)
        total += len(name) + len(value)
        # A name has a namespace; ACLs travel apart (so that --no-acls can leave them).
        if (b"\x00" in name or not name.startswith((b"user.", b"trusted.", b"security."))
                or total > MAX_XATTR_BYTES):
            raise ProtocolError(f"extended attribute {name[:40]!r} refused")
        out.append((os.fsdecode(name), value))
    return tuple(out)


def _names(raw: Any) -> tuple[tuple[str, int, str], ...]:
    if not isinstance(raw, list) or len(raw) > 2 + 2 * MAX_XATTRS:
        raise ProtocolError("owner names malformed or too many")
    out = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3 and item[0] in ("u", "g")
                and type(item[1]) is int and 0 <= item[1] <= MAX_ID
                and isinstance(item[2], str) and 0 < len(item[2]) <= MAX_USER_NAME
                and "\x00" not in item[2] and "/" not in item[2]):
            raise ProtocolError("an owner name is malformed")
        out.append((item[0], item[1], item[2]))
    return tuple(out)


@dataclass(frozen=True)
class FilesPage:
    """FILES: one page of the manifest (MAX_FILES_PAGE entries at most)."""

    page: int
    entries: list[dict[str, Any]]  #: on the wire; checked one by one with Entry.from_wire
    last: bool

    def to_body(self) -> dict[str, Any]:
        return {"page": self.page, "entries": self.entries, "last": self.last}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> FilesPage:
        entries = want(body, "entries", list)
        if len(entries) > MAX_FILES_PAGE:
            raise ProtocolError(f"FILES page of {len(entries)} entries")
        return cls(want(body, "page", int, 0, MAX_FILES), entries, bool(body.get("last")))


# -- asking for work --------------------------------------------------------------------
@dataclass(frozen=True)
class Execute:
    """EXECUTE: ``what`` is "files" (a manifest ``page``), "data" (start sending, with
    ``credit`` blocks) or "state" (move the snapshot to ``state``)."""

    WHATS: ClassVar[tuple[str, ...]] = ("files", "data", "state")

    clone_id: int
    what: str
    page: int = 0
    credit: int = 0
    state: str = ""

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"clone_id": self.clone_id, "what": self.what}
        if self.what == "files":
            body["page"] = self.page
        elif self.what == "data":
            body["credit"] = self.credit
        else:
            body["state"] = self.state
        return body

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Execute:
        clone_id = want(body, "clone_id", int, 0)
        what = body.get("what")
        if what == "files":
            return cls(clone_id, what, page=want(body, "page", int, 0,
                                                 MAX_FILES // MAX_FILES_PAGE))
        if what == "data":
            return cls(clone_id, what, credit=want(body, "credit", int, 0, MAX_CREDIT))
        if what == "state":
            return cls(clone_id, what, state=_text(body, "state", limit=32))
        raise ProtocolError(f"EXECUTE of unknown work {str(what)[:40]!r}")


@dataclass(frozen=True)
class Ack:
    """ACK: blocks written (their credit comes back) and more credit."""

    clone_id: int
    blocks: list[int]
    credit: int = 0

    def to_body(self) -> dict[str, Any]:
        return {"clone_id": self.clone_id, "blocks": self.blocks, "credit": self.credit}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Ack:
        blocks = want(body, "blocks", list)
        if len(blocks) > MAX_CREDIT * MAX_STREAMS or \
                not all(type(b) is int for b in blocks):
            raise ProtocolError("ACK of blocks that are not block numbers")
        return cls(want(body, "clone_id", int, 0), blocks,
                   want(body, "credit", int, 0, MAX_CREDIT))


@dataclass(frozen=True)
class Exit:
    """EXIT: the recipient ends the clone, ``ok`` or with its error."""

    clone_id: int
    ok: bool
    error_no: int = 0
    error_message: str = ""

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"clone_id": self.clone_id, "ok": self.ok}
        if not self.ok:
            body.update(error_no=self.error_no, error_message=self.error_message)
        return body

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Exit:
        return cls(want(body, "clone_id", int, 0), _flag(body, "ok"),
                   body.get("error_no", 0) if type(body.get("error_no")) is int else 0,
                   _text(body, "error_message", limit=4096))


# -- data -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BlockDesc:
    """DATA_DESC: the block that follows in the payload frame.

    ``segs``: (file id, offset, length) pieces, back to back in the raw bytes; ``span``
    counts the bytes of the files the block covers (holes included); ``comp`` the codec
    (0 none); ``xxh`` the xxh3_64 of what is on the wire."""

    seq: int
    length: int
    raw: int
    comp: int
    xxh: int
    span: int
    segs: list[list[int]]

    def to_body(self) -> dict[str, Any]:
        return {"seq": self.seq, "len": self.length, "xxh": self.xxh, "comp": self.comp,
                "raw": self.raw, "span": self.span, "segs": self.segs}

    @classmethod
    def from_body(cls, body: dict[str, Any], payload_len: int, block_size: int,
                  total_blocks: int, overhead: int = 0) -> BlockDesc:
        """``overhead``: what sealing adds to every block (0: a plain clone)."""
        seq = want(body, "seq", int, 0, total_blocks - 1)
        length = want(body, "len", int, overhead, block_size + overhead)  # compressed: less
        raw = want(body, "raw", int, 0, block_size)
        comp = want(body, "comp", int, 0, 2)
        xxh = want(body, "xxh", int, 0, (1 << 64) - 1)
        span = want(body, "span", int, raw, block_size)
        segs = want(body, "segs", list)
        if len(segs) > MAX_SEGMENTS or length != payload_len or (
                comp == 0 and length != raw + overhead):
            raise ProtocolError(f"block {seq} is malformed")
        total = 0
        for seg in segs:
            if not (isinstance(seg, list) and len(seg) == 3
                    and all(type(v) is int for v in seg)):
                raise ProtocolError(f"block {seq} has a malformed segment")
            if seg[1] < 0 or seg[2] <= 0:
                raise ProtocolError(f"block {seq} has a segment out of range")
            total += seg[2]
        if total != raw:
            raise ProtocolError(f"block {seq}: segments do not add up to its length")
        return cls(seq, length, raw, comp, xxh, span, segs)


MAX_NOTES = 1000  #: warnings listed in one COMPLETE (and in clone_status); more are counted


@dataclass(frozen=True)
class Note:
    """A warning: something the clone could not reproduce, or a file that changed
    while it was read. ``kind`` says which (docs/protocol.md lists them)."""

    kind: str
    path: str
    message: str

    def to_wire(self) -> dict[str, Any]:
        out = {"w": self.kind, "m": self.message}
        try:
            self.path.encode("utf-8")
            out["p"] = self.path
        except UnicodeEncodeError:
            out["pb"] = _enc(os.fsencode(self.path))
        return out

    @classmethod
    def from_wire(cls, raw: Any) -> Note:
        if not isinstance(raw, dict):
            raise ProtocolError("a warning is not an object")
        path = os.fsdecode(_b64(raw, "pb", 1 << 20)) if "pb" in raw else \
            _text(raw, "p", limit=1 << 20)
        return cls(_text(raw, "w", limit=32), path, _text(raw, "m", limit=4096))

    def as_dict(self) -> dict[str, str]:
        """For JSON (status, events): a name that is not UTF-8 with its odd bytes escaped."""
        shown = self.path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return {"kind": self.kind, "path": shown, "message": self.message}


@dataclass(frozen=True)
class Complete:
    """COMPLETE: every block of ``state`` is acknowledged.

    FILE COPY of a plain tree: ``again`` files changed while they were read and are
    sent again (the recipient asks for the state once more); when ``again`` is 0, the
    donor's warnings (``notes``, ``more`` beyond those listed) and the files that
    vanished (``gone``: the recipient removes them)."""

    clone_id: int
    state: str = ""
    blocks: int = 0
    again: int = 0
    notes: list[Note] = field(default_factory=list)
    more: int = 0
    gone: list[int] = field(default_factory=list)

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"clone_id": self.clone_id, "state": self.state,
                                "blocks": self.blocks}
        if self.again:
            body["again"] = self.again
        if self.notes or self.more:
            body["warnings"] = [n.to_wire() for n in self.notes]
            body["more"] = self.more
        if self.gone:
            body["gone"] = self.gone
        return body

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Complete:
        notes = body.get("warnings", [])
        gone = body.get("gone", [])
        if not isinstance(notes, list) or len(notes) > MAX_NOTES:
            raise ProtocolError("COMPLETE with malformed warnings")
        if not (isinstance(gone, list) and len(gone) <= MAX_FILES
                and all(type(g) is int for g in gone)):
            raise ProtocolError("COMPLETE with malformed vanished files")
        return cls(want(body, "clone_id", int, 0) if "clone_id" in body else 0,
                   _text(body, "state", limit=32),
                   want(body, "blocks", int, 0, MAX_BLOCKS) if "blocks" in body else 0,
                   want(body, "again", int, 0, MAX_FILES) if "again" in body else 0,
                   [Note.from_wire(n) for n in notes],
                   want(body, "more", int, 0, MAX_FILES) if "more" in body else 0, gone)


# -- snapshot states ----------------------------------------------------------------------
@dataclass(frozen=True)
class Tablespace:
    path: str
    pages: int


@dataclass(frozen=True)
class ConsistentPoint:
    """Where REDO COPY stops: the clone LSN at a transaction boundary, the redo archived
    from ``archive_lsn`` up to it, the binary log position and the GTID set there, and
    the tablespaces as of that moment."""

    KEYS: ClassVar[tuple[str, ...]] = (
        "clone_lsn", "archive_lsn", "archive_bytes", "last_txn", "binlog_file",
        "binlog_file_no", "binlog_position", "gtid_executed", "server_uuid", "page_size",
        "spaces", "next_space_id", "accounts", "blocked_s")

    clone_lsn: int
    archive_lsn: int
    archive_bytes: int
    last_txn: int
    binlog_file: str
    binlog_file_no: int
    binlog_position: int
    gtid_executed: str
    server_uuid: str
    page_size: int
    spaces: dict[int, Tablespace]
    next_space_id: int
    accounts: int = 0
    blocked_s: float = 0.0

    def to_body(self) -> dict[str, Any]:
        body = {key: getattr(self, key) for key in self.KEYS}
        body["spaces"] = {str(sid): {"path": sp.path, "pages": sp.pages}
                          for sid, sp in self.spaces.items()}
        return body

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ConsistentPoint:
        spaces = want(body, "spaces", dict)
        if len(spaces) > 100000:
            raise ProtocolError("tablespace registry of more than 100000 spaces")
        registry: dict[int, Tablespace] = {}
        for sid, info in spaces.items():
            if not (sid.isdigit() and len(sid) <= 10 and int(sid) < 1 << 32
                    and isinstance(info, dict)):
                raise ProtocolError(f"tablespace {sid[:20]!r} malformed")
            registry[int(sid)] = Tablespace(check_relpath(info.get("path")),
                                            want(info, "pages", int, 0, 1 << 40))
        page_size = want(body, "page_size", int, 4096, 65536)
        if page_size & (page_size - 1):
            raise ProtocolError(f"page size {page_size}")
        archive_lsn = want(body, "archive_lsn", int, 1, 1 << 62)
        clone_lsn = want(body, "clone_lsn", int, archive_lsn, 1 << 62)
        blocked = body.get("blocked_s", 0.0)
        return cls(
            clone_lsn=clone_lsn, archive_lsn=archive_lsn,
            archive_bytes=want(body, "archive_bytes", int, 0, MAX_FILE_SIZE),
            last_txn=want(body, "last_txn", int, 0, 1 << 62),
            binlog_file=_text(body, "binlog_file"),
            binlog_file_no=want(body, "binlog_file_no", int, 0, 1 << 32),
            binlog_position=want(body, "binlog_position", int, 0, 1 << 62),
            gtid_executed=_text(body, "gtid_executed", limit=1 << 16),
            server_uuid=_text(body, "server_uuid"), page_size=page_size, spaces=registry,
            next_space_id=want(body, "next_space_id", int, 0, 1 << 32),
            accounts=want(body, "accounts", int, 0, 1 << 40) if "accounts" in body else 0,
            blocked_s=float(blocked) if isinstance(blocked, (int, float)) else 0.0)

    def summary(self) -> dict[str, Any]:
        """What a pull's summary reports of it."""
        return {"clone_lsn": self.clone_lsn, "archive_lsn": self.archive_lsn,
                "last_txn": self.last_txn, "archive_bytes": self.archive_bytes,
                "blocked_s": self.blocked_s}


@dataclass(frozen=True)
class RedoFile:
    """Where REDO COPY's archive travels: as the file ``id`` of ``bytes`` bytes."""

    id: int
    bytes: int


class Again(NamedTuple):
    """A file sent again (FILE COPY once more): what it is now."""

    id: int
    size: int
    mode: int
    mtime_ns: int
    atime_ns: int
    dense: bool

    @classmethod
    def from_wire(cls, raw: Any) -> Again:
        if not (isinstance(raw, list) and len(raw) == 6 and all(type(v) in (int, bool)
                                                                for v in raw)):
            raise ProtocolError("a file sent again is malformed")
        fid, size, mode, mtime, atime, dense = raw
        if not (0 <= fid <= MAX_FILES and 0 <= size <= MAX_FILE_SIZE and 0 <= mode <= 0o7777
                and -INT64 <= mtime < INT64 and -INT64 <= atime < INT64):
            raise ProtocolError(f"file {fid} sent again: a value out of range")
        return cls(fid, size, mode, mtime, atime, bool(dense))


@dataclass(frozen=True)
class State:
    """STATE: the donor moved the snapshot to ``state``; its blocks follow.

    ``sizes``: files that grew since FILE COPY (by id); REDO COPY also carries the
    archive (``redo``) and the consistent point (``point``)."""

    clone_id: int
    state: str
    blocks: int
    bytes: int
    sizes: dict[int, int] = field(default_factory=dict)
    redo: RedoFile | None = None
    point: ConsistentPoint | None = None
    again: list[Again] = field(default_factory=list)

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"clone_id": self.clone_id, "state": self.state,
                                "blocks": self.blocks, "bytes": self.bytes,
                                "sizes": {str(k): v for k, v in self.sizes.items()}}
        if self.again:
            body["again"] = [list(a) for a in self.again]
        if self.redo is not None:
            body["redo"] = {"id": self.redo.id, "bytes": self.redo.bytes}
        if self.point is not None:
            body.update(self.point.to_body())
        return body

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> State:
        sizes: dict[int, int] = {}
        for fid, size in want(body, "sizes", dict).items():
            if not (fid.isdigit() and len(fid) <= 10):
                raise ProtocolError(f"size of file {fid[:20]!r}")
            sizes[int(fid)] = want({"s": size}, "s", int, 0, MAX_FILE_SIZE)
        redo = point = None
        if "redo" in body:
            raw = want(body, "redo", dict)
            redo = RedoFile(want(raw, "id", int, 0, MAX_FILES),
                            want(raw, "bytes", int, 0, MAX_FILE_SIZE))
            point = ConsistentPoint.from_body(body)
        again = [Again.from_wire(a) for a in want(body, "again", list)] \
            if "again" in body else []
        return cls(want(body, "clone_id", int, 0) if "clone_id" in body else 0,
                   _text(body, "state", limit=32), want(body, "blocks", int, 0, MAX_BLOCKS),
                   want(body, "bytes", int, 0, MAX_BYTES), sizes, redo, point, again)


@dataclass(frozen=True)
class ErrorBody:
    """ERROR: the donor's error number and message."""

    error_no: int
    error_message: str
    hint: str = ""  #: optional: what the user can do (3634: when the slot frees)

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error_no": self.error_no,
                                "error_message": self.error_message}
        if self.hint:
            body["hint"] = self.hint
        return body

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ErrorBody:
        return cls(want(body, "error_no", int, 0, 65535),
                   str(body.get("error_message", ""))[:4096],
                   str(body.get("hint", ""))[:500])
