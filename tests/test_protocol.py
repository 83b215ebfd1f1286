import pytest

from engine import protocol as P
from engine.codec import BLOCKS_PER_CHUNK
from engine.errors import ProtocolError


def test_round_trip() -> None:
    frames = P.command(P.INIT, {"version": 1, "user": "u"})
    msg = P.decode(frames, P.CMD)
    assert (msg.kind, msg.name, msg.body) == (P.INIT, "INIT", {"version": 1, "user": "u"})
    frames = P.response(P.DATA_DESC, {"seq": 1}, b"payload")
    msg = P.decode(frames, P.RESP)
    assert msg.kind == P.DATA_DESC and bytes(msg.payload) == b"payload"


@pytest.mark.parametrize("frames", [
    [b"XX\x01\x00\x01\x00\x00\x00", b"{}"],  # bad magic
    [b"CA\x01\x00\x01\x00", b"{}"],  # short header
    [b"CA\x01\x00\x63\x00\x00\x00", b"{}"],  # unknown command
    [b"CA\x01\x00\x01\x00\x00\x00", b"[1]"],  # body not an object
    [b"CA\x01\x00\x01\x00\x00\x00", b"{nope"],  # body not JSON
    [b"CA\x01\x00\x01\x00\x00\x00", b"{}", b"data"],  # payload on a command
    [b"CA\x01\x00\x01\x00\x00\x00"],  # too few frames
])
def test_malformed_commands_are_refused(frames) -> None:
    with pytest.raises(ProtocolError):
        P.decode(frames, P.CMD)


def test_direction_and_limits() -> None:
    with pytest.raises(ProtocolError):
        P.decode(P.command(P.INIT, {}), P.RESP)
    with pytest.raises(ProtocolError):
        P.decode(P.response(P.DATA_DESC, {}), P.RESP)  # DATA_DESC without DATA
    with pytest.raises(ProtocolError):
        P.decode(P.response(P.DATA_DESC, {}, b"x" * (P.MAX_PAYLOAD + 1)), P.RESP)
    with pytest.raises(ProtocolError):
        P.decode([P.command(P.ACK, {})[0], b" " * (P.MAX_BODY + 1)], P.CMD)


def test_version_negotiation_takes_the_lower() -> None:
    assert P.negotiate(P.PROTOCOL_VERSION + 5) == P.PROTOCOL_VERSION
    assert P.negotiate(P.PROTOCOL_VERSION) == P.PROTOCOL_VERSION
    with pytest.raises(ProtocolError):
        P.negotiate(0)


def test_want_checks_type_and_range() -> None:
    assert P.want({"a": 3}, "a", int, 0, 5) == 3
    for body in ({}, {"a": "3"}, {"a": True}, {"a": 9}):
        with pytest.raises(ProtocolError):
            P.want(body, "a", int, 0, 5)


def test_locator_tracks_chunks_and_survives_the_wire() -> None:
    total = BLOCKS_PER_CHUNK * 2 + 5
    loc = P.Locator(clone_id=7, snapshot_id="s", state=1, total_blocks=total)
    for seq in range(BLOCKS_PER_CHUNK):
        loc.block_done(seq)
    loc.block_done(BLOCKS_PER_CHUNK * 2 + 1)
    assert loc.is_chunk_done(0) and not loc.is_chunk_done(1) and not loc.is_chunk_done(2)
    assert loc.in_progress == {2: 2}
    back = P.Locator.from_body(loc.to_body())
    assert back.is_chunk_done(0) and back.in_progress == {2: 2} and back.clone_id == 7
    for seq in range(BLOCKS_PER_CHUNK * 2, total):
        loc.block_done(seq)
    assert loc.is_chunk_done(2) and 2 not in loc.in_progress
    body = loc.to_body()
    body["in_progress"] = {"99": 1}
    with pytest.raises(ProtocolError):
        P.Locator.from_body(body)


def test_locator_is_exact_where_blocks_are_written_out_of_order() -> None:
    """Blocks 0 and 2 of a chunk written, 1 not: a restart must send 1 again."""
    loc = P.Locator(clone_id=1, snapshot_id="s", state=1, total_blocks=70)
    loc.block_done(0)
    loc.block_done(2)
    loc.block_done(65)
    back = P.Locator.from_body(loc.to_body())
    assert [seq for seq in range(70) if back.is_done(seq)] == [0, 2, 65]
    assert back.count() == 3
    body = loc.to_body()
    body["in_progress"] = {"1": 1 << 6}  # chunk 1 has 6 blocks: bit 6 is no block
    with pytest.raises(ProtocolError):
        P.Locator.from_body(body)
