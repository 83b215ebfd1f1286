"""The contract between the two sides: the real donor, driven by a peer that speaks
only the message schema (engine/messages.py), answers every command with bodies that
the schema accepts, through every state of a page store's clone; and it refuses a
malformed command with ERROR 3863 and goes on serving.

The hostile-donor tests (test_hostile*.py) run the other direction: a fake donor built
from the same schema against the real recipient."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import zmq

from engine import crypto
from engine import messages as M
from engine import protocol as P
from engine.codec import checksum
from engine.pagestore import init_datadir
from tests.helpers import Donor

TIMEOUT_MS = 20_000


class Peer:
    """A recipient reduced to the protocol: one DEALER stream, typed bodies, and the
    handshake of engine/crypto.py (``encrypted``) or a plain stream."""

    def __init__(self, ctx: zmq.Context[Any], address: str, encrypted: bool = True) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://{address}")
        self.cipher: crypto.ControlCipher | None = None
        self.keys: crypto.Keys | None = None
        hello = crypto.Initiator() if encrypted else None
        self.send(P.HELLO, M.Hello(P.PROTOCOL_VERSION,
                                   crypto.b64(hello.hello) if hello is not None else ""))
        msg = self.recv()
        assert msg.kind == P.HELLO_REPLY, msg.body
        self.reply = M.HelloReply.from_body(msg.body)
        if hello is not None:
            self.keys = hello.finish(self.reply.e, self.reply.s, self.reply.confirm, None)
            self.cipher = crypto.ControlCipher(self.keys.r2d, self.keys.d2r)

    def send(self, kind: int, msg: Any) -> None:
        body = msg if isinstance(msg, dict) else msg.to_body()
        self.sock.send_multipart(P.command(kind, body, self.cipher))

    def recv(self) -> P.Message:
        """The next response other than KEEPALIVE (bounded)."""
        while True:
            assert self.sock.poll(TIMEOUT_MS), "the donor did not answer"
            msg = P.decode(self.sock.recv_multipart(), P.RESP, self.cipher)
            if msg.kind != P.KEEPALIVE:
                return msg

    def close(self) -> None:
        self.sock.close()


def _data(peer: Peer, clone_id: int, state: int, blocks: int, block_size: int) -> int:
    """Take every block of a state (credit 4, acknowledged one by one) until COMPLETE;
    returns the bytes received."""
    got = 0
    seen: set[int] = set()
    while True:
        msg = peer.recv()
        if msg.kind == P.COMPLETE:
            break
        assert msg.kind == P.DATA_DESC, msg.name
        desc = M.BlockDesc.from_body(msg.body, len(msg.payload), block_size, blocks,
                                     crypto.SEAL_OVERHEAD if peer.keys else 0)
        assert checksum(msg.payload) == desc.xxh
        if peer.keys is not None:  # the block opens with the clone's key, for its place
            out = memoryview(bytearray(desc.raw + 64))
            assert crypto.BlockSealer(peer.keys.data).open_into(
                memoryview(msg.payload), out, crypto.block_aad(
                    clone_id, state, desc.seq, desc.raw, desc.span, desc.comp, desc.segs)
            ) == desc.raw
        assert desc.seq not in seen
        seen.add(desc.seq)
        got += desc.raw
        peer.send(P.ACK, M.Ack(clone_id, [desc.seq], 1))
    assert len(seen) == blocks
    return got


def test_the_real_donor_speaks_the_schema(tmp_path: Path) -> None:
    datadir = tmp_path / "data"
    init_datadir(str(datadir), 8 << 20, accounts=500)
    ctx: zmq.Context[Any] = zmq.Context()
    with Donor(datadir) as donor:
        peer = Peer(ctx, donor.address)
        try:
            block = 1 << 20
            peer.send(P.INIT, M.Init(version=P.PROTOCOL_VERSION, user="u", block_size=block))
            msg = peer.recv()
            assert msg.kind == P.CONFIG
            cfg = M.Config.from_body(msg.body, block)
            assert cfg.paged and cfg.page_size == 16384 and cfg.files > 0
            entries: list[M.Entry] = []
            for page in range(-(-cfg.files // cfg.files_page)):
                peer.send(P.EXECUTE, M.Execute(cfg.clone_id, "files", page=page))
                msg = peer.recv()
                files = M.FilesPage.from_body(msg.body)
                entries += [M.Entry.from_wire(raw) for raw in files.entries]
            assert files.last and len(entries) == cfg.files
            assert {"bank/accounts.ibd", "ibdata1"} <= {e.rel for e in entries}
            peer.send(P.EXECUTE, M.Execute(cfg.clone_id, "data", credit=4))
            got = _data(peer, cfg.clone_id, 1, cfg.blocks, cfg.block_size)
            assert got == sum(e.size for e in entries if e.kind == "f")
            for name in ("PAGE COPY", "REDO COPY"):
                peer.send(P.EXECUTE, M.Execute(cfg.clone_id, "state", state=name))
                msg = peer.recv()
                assert msg.kind == P.STATE
                state = M.State.from_body(msg.body)
                assert state.state == name
                _data(peer, cfg.clone_id, M.STATE_NUMBERS[name], state.blocks,
                      cfg.block_size)
            assert state.point is not None and state.redo is not None
            assert state.point.clone_lsn >= state.point.archive_lsn
            assert {sp.path for sp in state.point.spaces.values()} <= {e.rel for e in entries}
            peer.send(P.EXIT, M.Exit(cfg.clone_id, True))
        finally:
            peer.close()
            ctx.term()
        assert donor.stop() == 0


MALFORMED = {
    "compression as a list": {"compression": ["lz4"]},
    "block size not a power of two": {"block_size": 3 << 20},
    "version as text": {"version": "1"},
    "user as a number": {"user": 12345},
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_the_real_donor_refuses_a_malformed_init_and_serves_on(case: str,
                                                               tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 1000)
    ctx: zmq.Context[Any] = zmq.Context()
    with Donor(src) as donor:
        good = M.Init(version=P.PROTOCOL_VERSION, user="u").to_body()
        peer = Peer(ctx, donor.address)
        try:
            peer.send(P.INIT, {**good, **MALFORMED[case]})
            msg = peer.recv()
            assert msg.kind == P.ERROR
            err = M.ErrorBody.from_body(msg.body)
            assert err.error_no == 3863, err
            peer.close()  # the donor dropped that connection: a new one clones
            peer = Peer(ctx, donor.address)
            peer.send(P.INIT, good)
            msg = peer.recv()
            assert msg.kind == P.CONFIG
            cfg = M.Config.from_body(msg.body, 1 << 20)
            peer.send(P.EXIT, M.Exit(cfg.clone_id, False, 1317, "test"))
        finally:
            peer.close()
            ctx.term()
        assert donor.stop() == 0
