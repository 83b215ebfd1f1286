"""The bodies of the clone protocol's messages: one frozen dataclass each.

This is the only module that reads or writes the wire keys of a body. Each class has
``to_body()`` (what is sent) and ``from_body(body, ...)`` (what is received: every
field type- and range-checked, a violation raising :class:`ProtocolError`, 3863), so
the donor, the recipient and the test peers speak one schema. Framing (header, JSON,
payload) is :mod:`engine.protocol`; docs/protocol.md is the specification.

Runs in any process; holds no state. A password is never part of a ``repr``.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine.codec import CODECS, LEGACY_BLOCK, MAX_SEGMENTS, valid_block_size
from engine.errors import ProtocolError, UnsafeName
from engine.fsutil import RESERVED_TOP, check_relpath
from engine.protocol import (
    MAX_CREDIT,
    MAX_FILE_SIZE,
    MAX_FILES,
    MAX_FILES_PAGE,
    MAX_STREAMS,
    want,
)

#: Snapshot states as locators and sealed blocks number them.
STATE_NUMBERS = {"FILE COPY": 1, "PAGE COPY": 2, "REDO COPY": 3}
MAX_DDL_TIMEOUT = 2592000  #: clone_ddl_timeout's ceiling, in seconds
MAX_NAME_FIELD = 256  #: characters in a user, agent, OS or machine name
MAX_BLOCKS = 1 << 40
MAX_BYTES = 1 << 50


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

    def to_body(self) -> dict[str, Any]:
        return {"version": self.version, "user": self.user,
                "agent": self.agent, "os": self.os, "machine": self.machine,
                "streams": self.streams, "ddl_timeout": self.ddl_timeout,
                "block_size": self.block_size, "compression": self.compression}

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
            agent=_text(body, "agent"), os=_text(body, "os"), machine=_text(body, "machine"))


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


# -- the manifest ---------------------------------------------------------------------
ENTRY_KINDS = ("d", "f", "l")  #: directory, regular file, symbolic link


@dataclass(frozen=True)
class Entry:
    """One entry of the manifest, as both sides know it: the donor makes it from a
    scan (with ``path``, where it reads the file), the recipient from the wire."""

    id: int
    kind: str
    rel: str
    size: int
    mode: int
    mtime_ns: int
    target: str = ""
    dense: bool = False  #: a regular file with no holes: the recipient may preallocate
    path: str = ""  #: the donor's absolute path; never on the wire

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "t": self.kind, "s": self.size,
                               "m": self.mode, "mt": self.mtime_ns}
        if self.dense:
            out["dn"] = 1
        try:
            self.rel.encode("utf-8")
            out["p"] = self.rel
        except UnicodeEncodeError:  # a name that is not UTF-8 travels as its raw bytes
            out["pb"] = base64.b64encode(os.fsencode(self.rel)).decode()
        if self.kind == "l":
            out["lt"] = base64.b64encode(os.fsencode(self.target)).decode()
        return out

    @classmethod
    def from_wire(cls, raw: Any, reserved: tuple[str, ...] = RESERVED_TOP) -> Entry:
        """Checks what one entry can say on its own (the manifest checks the rest:
        duplicates, parents, counts). ``reserved``: top-level names refused."""
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
        rel = check_relpath(rel, reserved)
        target = ""
        if kind == "l":
            try:
                target = os.fsdecode(base64.b64decode(want(raw, "lt", str), validate=True))
            except ValueError:
                raise UnsafeName("undecodable link target") from None
            if "\x00" in target or not target or len(target) > 4096:
                raise UnsafeName(f"bad link target for {rel!r}")
        return cls(fid, kind, rel, want(raw, "s", int, 0, MAX_FILE_SIZE),
                   want(raw, "m", int, 0, 0o7777), want(raw, "mt", int, -(1 << 62), 1 << 62),
                   target, raw.get("dn") == 1)


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


@dataclass(frozen=True)
class Complete:
    """COMPLETE: every block of ``state`` is acknowledged."""

    clone_id: int
    state: str = ""
    blocks: int = 0

    def to_body(self) -> dict[str, Any]:
        return {"clone_id": self.clone_id, "state": self.state, "blocks": self.blocks}


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

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"clone_id": self.clone_id, "state": self.state,
                                "blocks": self.blocks, "bytes": self.bytes,
                                "sizes": {str(k): v for k, v in self.sizes.items()}}
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
        return cls(want(body, "clone_id", int, 0) if "clone_id" in body else 0,
                   _text(body, "state", limit=32), want(body, "blocks", int, 0, MAX_BLOCKS),
                   want(body, "bytes", int, 0, MAX_BYTES), sizes, redo, point)


@dataclass(frozen=True)
class ErrorBody:
    """ERROR: the donor's error number and message."""

    error_no: int
    error_message: str

    def to_body(self) -> dict[str, Any]:
        return {"error_no": self.error_no, "error_message": self.error_message}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ErrorBody:
        return cls(want(body, "error_no", int, 0, 65535),
                   str(body.get("error_message", ""))[:4096])
