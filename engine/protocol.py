"""The clone protocol: message types, framing, limits, version negotiation, locators.

Modelled on MySQL's clone RPC (docs/mysql.md); docs/protocol.md is the full
specification. Every message is one ZeroMQ multipart message:

  frame 0  header, 8 bytes: b"CA", u8 protocol version, u8 direction (0 command,
           1 response), u8 type, u8 flags (bit 0: the body is sealed), 2 bytes zero
  frame 1  body: one JSON object (UTF-8), at most MAX_BODY bytes
  frame 2  payload, only in DATA_DESC: the block's bytes (MySQL's DATA, which must
           directly follow its DATA_DESC), at most MAX_PAYLOAD bytes

Decoding checks every limit before the body is parsed; a violation raises
:class:`~engine.errors.ProtocolError`.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass, field
from typing import Any

import orjson

from engine.codec import BLOCKS_PER_CHUNK, MAX_BLOCK
from engine.errors import ProtocolError

MAGIC = b"CA"
PROTOCOL_VERSION = 2  #: 2: HELLO (the handshake), AUTH (SCRAM), sealed bodies and blocks
MIN_PROTOCOL_VERSION = 2

CMD = 0
RESP = 1

# Commands, recipient -> donor (MySQL's numbers; HELLO and AUTH are our own).
INIT, ATTACH, REINIT, EXECUTE, ACK, EXIT = 1, 2, 3, 4, 5, 6
HELLO, AUTH = 7, 8
STATUS = 9  #: our own: the donor's running or last clone (``clone-agent status --donor``)
# Responses, donor -> recipient (MySQL's numbers; FILES, KEEPALIVE, STATE, HELLO and
# AUTH are our own).
LOCS, DATA_DESC, DATA, PLUGIN, CONFIG, COLLATION = 1, 2, 3, 4, 5, 6
FILES, KEEPALIVE, STATE = 7, 8, 9
HELLO_REPLY, AUTH_REPLY = 10, 11
STATUS_REPLY = 12
COMPLETE, ERROR = 99, 100

COMMAND_NAMES = {INIT: "INIT", ATTACH: "ATTACH", REINIT: "REINIT", EXECUTE: "EXECUTE",
                 ACK: "ACK", EXIT: "EXIT", HELLO: "HELLO", AUTH: "AUTH", STATUS: "STATUS"}
RESPONSE_NAMES = {LOCS: "LOCS", DATA_DESC: "DATA_DESC", CONFIG: "CONFIG", FILES: "FILES",
                  KEEPALIVE: "KEEPALIVE", STATE: "STATE", COMPLETE: "COMPLETE",
                  ERROR: "ERROR", HELLO_REPLY: "HELLO", AUTH_REPLY: "AUTH",
                  STATUS_REPLY: "STATUS"}
#: Messages that go before a stream's handshake is done: never sealed.
UNSEALED_COMMANDS = (HELLO,)
UNSEALED_RESPONSES = (HELLO_REPLY, ERROR)
SEALED = 1  #: the header's flag

# Limits (a peer that exceeds one is a protocol violation).
MAX_BODY = 8 << 20  #: bytes in a JSON body (a FILES page of long names fits easily)
MAX_PAYLOAD = MAX_BLOCK + (64 << 10)  #: the largest block plus compression and sealing
#: The most a peer may send in one message, all frames: ZeroMQ refuses more before it
#: buffers it (ZMQ_MAXMSGSIZE applies to each frame), so memory is bounded before any check.
MAX_FRAME = MAX_PAYLOAD
MAX_FILES = 10_000_000  #: entries in one manifest
MAX_FILES_PAGE = 2000  #: entries in one FILES response
MAX_FILE_SIZE = 1 << 48
MAX_STREAMS = 128  #: clone_max_concurrency's ceiling
MAX_CREDIT = 1024  #: blocks in flight on one stream

_HEADER = struct.Struct("<2sBBBBH")


@dataclass
class Message:
    direction: int
    kind: int
    body: dict[str, Any]
    payload: Any = None  # a zmq.Frame / memoryview for DATA_DESC, else None
    version: int = PROTOCOL_VERSION

    @property
    def name(self) -> str:
        names = COMMAND_NAMES if self.direction == CMD else RESPONSE_NAMES
        return names.get(self.kind, str(self.kind))


def encode(direction: int, kind: int, body: dict[str, Any], payload: Any = None,
           version: int = PROTOCOL_VERSION, cipher: Any = None) -> list[Any]:
    """The frames of one message. ``cipher``: the stream's
    :class:`~engine.crypto.ControlCipher`, which seals the body (the header, sent in
    clear, is its associated data)."""
    flags = SEALED if cipher is not None else 0
    header = _HEADER.pack(MAGIC, version, direction, kind, flags, 0)
    data = orjson.dumps(body)
    frames: list[Any] = [header, cipher.seal(header, data) if cipher is not None else data]
    if payload is not None:
        frames.append(payload)
    return frames


def command(kind: int, body: dict[str, Any], cipher: Any = None) -> list[Any]:
    return encode(CMD, kind, body, cipher=cipher)


def response(kind: int, body: dict[str, Any], payload: Any = None,
             cipher: Any = None) -> list[Any]:
    return encode(RESP, kind, body, payload, cipher=cipher)


def error_response(errno: int, message: str) -> list[Any]:
    return response(ERROR, {"error_no": errno, "error_message": message})


def _buf(frame: Any) -> Any:
    return frame.buffer if hasattr(frame, "buffer") else frame


def _check_header(header: bytes, expect: int) -> tuple[int, int, int, int]:
    """(version, direction, type, flags) of a header whose every byte is checked."""
    if len(header) != _HEADER.size:
        raise ProtocolError("bad header size")
    magic, version, direction, kind, flags, pad = _HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError("not a clone-agent message (bad magic)")
    if direction != expect:
        raise ProtocolError(f"message in the wrong direction ({direction})")
    if flags & ~SEALED or pad:
        raise ProtocolError("header with unknown flags or bytes that are not zero")
    if kind not in (COMMAND_NAMES if direction == CMD else RESPONSE_NAMES):
        raise ProtocolError(f"unknown message type {kind}")
    if not MIN_PROTOCOL_VERSION <= version <= 255:
        raise ProtocolError(f"protocol version {version} is older than the oldest "
                            f"supported ({MIN_PROTOCOL_VERSION})")
    return version, direction, kind, flags


def decode(frames: list[Any], expect: int, cipher: Any = None) -> Message:
    """Check and decode one multipart message sent in direction ``expect``.

    ``cipher``: the stream is encrypted: every body must be sealed, except those that
    go before the handshake ends (HELLO) and an ERROR (a donor may refuse a stream in
    clear at any time; an ERROR changes no state but the clone's end)."""
    if len(frames) not in (2, 3):
        raise ProtocolError(f"message of {len(frames)} frames")
    header = bytes(_buf(frames[0]))
    version, direction, kind, flags = _check_header(header, expect)
    names = COMMAND_NAMES if direction == CMD else RESPONSE_NAMES
    body_buf = _buf(frames[1])
    if len(body_buf) > MAX_BODY:
        raise ProtocolError(f"body of {len(body_buf)} bytes exceeds {MAX_BODY}")
    unsealed = UNSEALED_COMMANDS if direction == CMD else UNSEALED_RESPONSES
    if flags & SEALED:
        if cipher is None:
            raise ProtocolError(f"a sealed {names[kind]} on a stream without a handshake")
        body_buf = cipher.open(header, body_buf)
    elif cipher is not None and kind not in unsealed:
        raise ProtocolError(f"{names[kind]} in clear on an encrypted stream")
    try:
        body = orjson.loads(body_buf)
    except orjson.JSONDecodeError:
        raise ProtocolError("body is not JSON") from None
    if not isinstance(body, dict):
        raise ProtocolError("body is not a JSON object")
    payload = None
    if len(frames) == 3:
        if not (direction == RESP and kind == DATA_DESC):
            raise ProtocolError("payload on a message that carries none")
        payload = _buf(frames[2])
        if len(payload) > MAX_PAYLOAD:
            raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    elif direction == RESP and kind == DATA_DESC:
        raise ProtocolError("DATA_DESC without its DATA")
    return Message(direction, kind, body, payload, version)


def negotiate(recipient_version: int) -> int:
    """The donor answers the lower of the two versions, if it still speaks it."""
    version = min(int(recipient_version), PROTOCOL_VERSION)
    if version < MIN_PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {recipient_version} is older than the oldest supported "
            f"({MIN_PROTOCOL_VERSION})"
        )
    return version


def want(body: dict[str, Any], key: str, kind: type | tuple[type, ...], low: int | None = None,
         high: int | None = None) -> Any:
    """A field of a peer's body, type- and range-checked."""
    value: Any = body.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ProtocolError(f"field '{key}' missing or of the wrong type")
    number: Any = body[key]  # the same value, not narrowed to `object` by isinstance
    if low is not None and number < low or high is not None and number > high:
        raise ProtocolError(f"field '{key}' = {number} out of range")
    return number


@dataclass
class Locator:
    """Where a clone stands: the blocks of the current state that are written.

    A chunk is ``BLOCKS_PER_CHUNK`` consecutive blocks of the donor's plan (which is
    fixed by the snapshot): a bit per finished chunk, and for each chunk begun but not
    finished the mask of its blocks written (bit b: block chunk * 64 + b). Blocks are
    written out of order (many streams, many writers), so the mask is exact where a
    "next block" would skip a gap. The donor sends again only what it does not name.
    """

    clone_id: int
    snapshot_id: str
    state: int
    total_blocks: int
    chunks_done: bytearray = field(default_factory=bytearray)
    in_progress: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        nchunks = -(-self.total_blocks // BLOCKS_PER_CHUNK)
        if len(self.chunks_done) < (nchunks + 7) // 8:
            self.chunks_done = bytearray((nchunks + 7) // 8)

    def chunk_size(self, chunk: int) -> int:
        return min(BLOCKS_PER_CHUNK, self.total_blocks - chunk * BLOCKS_PER_CHUNK)

    def block_done(self, seq: int) -> None:
        chunk, block = divmod(seq, BLOCKS_PER_CHUNK)
        if self.is_chunk_done(chunk):
            return
        mask = self.in_progress.get(chunk, 0) | (1 << block)
        if mask == (1 << self.chunk_size(chunk)) - 1:
            self.in_progress.pop(chunk, None)
            self.chunks_done[chunk // 8] |= 1 << (chunk % 8)
        else:
            self.in_progress[chunk] = mask

    def is_chunk_done(self, chunk: int) -> bool:
        return bool(self.chunks_done[chunk // 8] & (1 << (chunk % 8)))

    def is_done(self, seq: int) -> bool:
        chunk, block = divmod(seq, BLOCKS_PER_CHUNK)
        return self.is_chunk_done(chunk) or bool(self.in_progress.get(chunk, 0) >> block & 1)

    def count(self) -> int:
        """Blocks written."""
        whole = sum(self.chunk_size(c) for c in range(-(-self.total_blocks // BLOCKS_PER_CHUNK))
                    if self.is_chunk_done(c))
        return whole + sum(bin(m).count("1") for m in self.in_progress.values())

    def copy(self) -> Locator:
        return Locator(self.clone_id, self.snapshot_id, self.state, self.total_blocks,
                       bytearray(self.chunks_done), dict(self.in_progress))

    def to_body(self) -> dict[str, Any]:
        return {
            "clone_id": self.clone_id,
            "snapshot_id": self.snapshot_id,
            "state": self.state,
            "total_blocks": self.total_blocks,
            "chunks_done": base64.b64encode(bytes(self.chunks_done)).decode(),
            "in_progress": {str(k): v for k, v in self.in_progress.items()},
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Locator:
        total = want(body, "total_blocks", int, 0, 1 << 40)
        try:
            done = bytearray(base64.b64decode(want(body, "chunks_done", str), validate=True))
            progress = {int(k): v for k, v in want(body, "in_progress", dict).items()}
        except (ValueError, TypeError):
            raise ProtocolError("malformed locator") from None
        nchunks = -(-total // BLOCKS_PER_CHUNK)
        if len(done) != (nchunks + 7) // 8 or len(progress) > nchunks or any(
            not 0 <= k < nchunks or type(v) is not int or not 0 < v < 1 << BLOCKS_PER_CHUNK
            for k, v in progress.items()
        ):
            raise ProtocolError("locator out of range")
        loc = cls(
            clone_id=want(body, "clone_id", int, 0),
            snapshot_id=want(body, "snapshot_id", str),
            state=want(body, "state", int, 0, 16),
            total_blocks=total,
            chunks_done=done,
            in_progress=progress,
        )
        if any(v >> loc.chunk_size(k) for k, v in progress.items()):
            raise ProtocolError("locator out of range")
        return loc
