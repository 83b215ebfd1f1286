"""The decoders take any bytes: a random frame or body is a ProtocolError (3863) or a
message, never another exception (hypothesis, a few thousand inputs in CI)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from engine import crypto
from engine import messages as M
from engine import protocol as P
from engine.errors import ProtocolError

HEADER = st.builds(lambda v, d, k, f: b"CA" + bytes([v, d, k, f, 0, 0]),
                   st.integers(0, 255), st.integers(0, 1),
                   st.sampled_from([*P.COMMAND_NAMES, *P.RESPONSE_NAMES, 0, 42, 255]),
                   st.integers(0, 3))
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=6),
    max_leaves=20)
KEYS = ["version", "user", "e", "s", "confirm", "auth", "step", "data", "clone_id", "files",
        "bytes", "blocks", "block_size", "files_page", "stream", "secret", "what", "page",
        "credit", "state", "seq", "len", "raw", "comp", "xxh", "span", "segs", "entries",
        "last", "sizes", "redo", "spaces", "clone_lsn", "archive_lsn", "page_size",
        "compression", "ddl_timeout", "ok", "error_no", "error_message", "p", "t", "id",
        "m", "mt", "s", "lt", "pb"]
BODIES = st.dictionaries(st.sampled_from(KEYS), JSONISH, max_size=12)


@settings(max_examples=500, deadline=None)
@given(header=st.one_of(HEADER, st.binary(max_size=12)), body=st.binary(max_size=200),
       payload=st.one_of(st.none(), st.binary(max_size=64)), expect=st.integers(0, 1))
def test_decode_takes_any_frames(header: bytes, body: bytes, payload: bytes | None,
                                 expect: int) -> None:
    frames: list[Any] = [header, body] + ([payload] if payload is not None else [])
    try:
        P.decode(frames, expect)
    except ProtocolError:
        pass


@settings(max_examples=150, deadline=None)
@given(header=HEADER, body=st.binary(max_size=200))
def test_a_sealed_body_that_was_not_sealed_by_the_peer(header: bytes, body: bytes) -> None:
    cipher = crypto.ControlCipher(b"k" * 32, b"k" * 32)
    try:
        P.decode([header, body], header[3] if header[3] in (0, 1) else 0, cipher)
    except ProtocolError:
        pass


SCHEMA = [M.Hello, M.HelloReply, M.Auth, M.AuthReply, M.Init, M.Attach, M.Locs,
          M.FilesPage, M.Execute, M.Ack, M.Exit, M.State, M.ConsistentPoint, M.ErrorBody]


@settings(max_examples=1200, deadline=None)
@given(cls=st.sampled_from(SCHEMA), body=BODIES)
def test_every_schema_class_takes_any_body(cls: Any, body: dict[str, Any]) -> None:
    try:
        msg = cls.from_body(body)
    except ProtocolError:
        return
    assert cls.from_body(msg.to_body()) == msg or cls is M.State  # it round-trips


@settings(max_examples=500, deadline=None)
@given(body=BODIES, payload_len=st.integers(0, 1 << 21))
def test_block_descriptors_and_config_take_any_body(body: dict[str, Any],
                                                    payload_len: int) -> None:
    for parse in (lambda: M.BlockDesc.from_body(body, payload_len, 1 << 20, 100, 28),
                  lambda: M.Config.from_body(body, 1 << 20),
                  lambda: M.Entry.from_wire(body)):
        try:
            parse()
        except ProtocolError:
            pass
