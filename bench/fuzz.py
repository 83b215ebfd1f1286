"""A long fuzz of the decoders: ``python -m bench.fuzz [N] [SEED]``.

Mutates well-formed messages of every type (flipped, dropped, inserted and repeated
bytes, swapped frames, JSON values of the wrong type or size) and feeds them to what a
peer's bytes meet first: ``engine.protocol.decode`` (plain and sealed) and each body's
``from_body``. Anything but a ProtocolError, or a message that decodes into a body the
schema then refuses with anything else, is a finding: it is printed with its input and
the run exits 1. The CI suite runs a short hypothesis version (tests/test_fuzz.py);
docs/security.md records the long runs.
"""

from __future__ import annotations

import random
import sys
import time
from typing import Any

import orjson

from engine import crypto
from engine import messages as M
from engine import protocol as P
from engine.errors import ProtocolError

PARSERS: dict[int, Any] = {
    P.HELLO: M.Hello.from_body, P.AUTH: M.Auth.from_body, P.INIT: M.Init.from_body,
    P.ATTACH: M.Attach.from_body, P.EXECUTE: M.Execute.from_body, P.ACK: M.Ack.from_body,
    P.EXIT: M.Exit.from_body}
RESPONSES: dict[int, Any] = {
    P.HELLO_REPLY: M.HelloReply.from_body, P.AUTH_REPLY: M.AuthReply.from_body,
    P.LOCS: M.Locs.from_body, P.FILES: M.FilesPage.from_body, P.STATE: M.State.from_body,
    P.ERROR: M.ErrorBody.from_body,
    P.CONFIG: lambda b: M.Config.from_body(b, 1 << 20),
    P.DATA_DESC: lambda b: M.BlockDesc.from_body(b, 4, 1 << 20, 10, 0)}

SEEDS: list[tuple[int, int, dict[str, Any]]] = [
    (P.CMD, P.HELLO, M.Hello(2, "A" * 44).to_body()),
    (P.CMD, P.AUTH, M.Auth("first", "n,,n=alice,r=abc").to_body()),
    (P.CMD, P.INIT, M.Init(2, "alice").to_body()),
    (P.CMD, P.ATTACH, M.Attach(1, 1, "c2VjcmV0").to_body()),
    (P.CMD, P.EXECUTE, M.Execute(1, "files", page=0).to_body()),
    (P.CMD, P.EXECUTE, M.Execute(1, "state", state="PAGE COPY").to_body()),
    (P.CMD, P.ACK, M.Ack(1, [0, 1, 2], 3).to_body()),
    (P.CMD, P.EXIT, M.Exit(1, False, 1317, "stopped").to_body()),
    (P.RESP, P.HELLO_REPLY, M.HelloReply(2, "scram", "A" * 44, "B" * 44, "C" * 44).to_body()),
    (P.RESP, P.CONFIG, M.Config(2, 1, 3, 100, 2, 1 << 20, 2000, True, 16384).to_body()),
    (P.RESP, P.FILES, M.FilesPage(0, [{"id": 0, "t": "f", "p": "a/b", "s": 4, "m": 420,
                                       "mt": 0}], True).to_body()),
    (P.RESP, P.DATA_DESC, M.BlockDesc(0, 4, 4, 0, 12345, 4, [[0, 0, 4]]).to_body()),
    (P.RESP, P.ERROR, M.ErrorBody(3634, "busy").to_body()),
]
ODD = [None, True, -1, 0, (1 << 64) - 1, 1.5, "", "x" * 300, [], {}, [[0, 0, 4]], {"a": 1},
       "../../etc", "\x00", [None], -(1 << 63)]


def _mutate_body(rng: random.Random, body: dict[str, Any]) -> dict[str, Any]:
    out = dict(body)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(list(out) or ["x"])
        action = rng.random()
        if action < 0.5:
            out[key] = rng.choice(ODD)
        elif action < 0.7:
            out.pop(key, None)
        else:
            out[rng.choice(["extra", key + "x", "p", "segs", "seq"])] = rng.choice(ODD)
    return out


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        pos = rng.randrange(len(buf) + 1)
        if op < 0.4 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op < 0.6:
            del buf[pos:pos + rng.randint(1, 8)]
        elif op < 0.8:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            buf += buf[pos:pos + 16]
    return bytes(buf)


def one(rng: random.Random, cipher_pair: tuple[Any, Any]) -> tuple[list[Any], int] | None:
    """Feed one mutated message; the input if it found something, else None."""
    direction, kind, body = rng.choice(SEEDS)
    sealed = rng.random() < 0.2
    seal_with, open_with = cipher_pair if sealed else (None, None)
    if rng.random() < 0.5:
        frames = P.encode(direction, kind, _mutate_body(rng, body),
                          payload=b"abcd" if kind == P.DATA_DESC else None, cipher=seal_with)
    else:
        frames = P.encode(direction, kind, body, payload=b"abcd" if kind == P.DATA_DESC
                          else None, cipher=seal_with)
        i = rng.randrange(len(frames))
        frames[i] = _mutate_bytes(rng, bytes(frames[i]))
        if rng.random() < 0.05:
            frames.append(orjson.dumps(body))
    try:
        msg = P.decode(frames, direction, open_with)
        table = PARSERS if direction == P.CMD else RESPONSES
        parse = table.get(msg.kind)
        if parse is not None:
            parse(msg.body)
    except ProtocolError:
        pass
    except Exception:  # noqa: BLE001 - a finding
        return frames, direction
    return None


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    rng = random.Random(seed)
    findings = 0
    started = time.monotonic()
    for i in range(n):
        # a fresh pair now and then: sealed messages must open only in order
        if i % 1000 == 0:
            key_a, key_b = rng.randbytes(32), rng.randbytes(32)
        pair = (crypto.ControlCipher(key_a, key_b), crypto.ControlCipher(key_b, key_a))
        found = one(rng, pair)
        if found is not None:
            findings += 1
            if findings <= 10:
                print(f"finding at input {i}: {found!r}", file=sys.stderr)
    elapsed = time.monotonic() - started
    print(f"{n} inputs (seed {seed}) in {elapsed:.0f} s: {findings} findings")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
