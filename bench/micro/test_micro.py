"""Micro-benchmarks of the hot pieces, under pytest-benchmark (``make bench``).

A regression in one piece shows here before it hides in an end-to-end figure:
ring hand-off (acquire, copy a block into shared memory, release), checksum, codec,
the shared throttle, and a data message's encode and decode.
"""

from __future__ import annotations

import os

import pytest

from engine import protocol as P
from engine.codec import COMP_LZ4, COMP_ZSTD, Compressor, Decompressor, checksum
from engine.ring import Ring
from engine.throttle import RateLimit

BLOCK = 1 << 20
TEXT = (b"clone-agent page store redo log block " * 30000)[:BLOCK]
RANDOM = os.urandom(BLOCK)


@pytest.fixture(scope="module")
def ring():
    with Ring(8, BLOCK) as r:
        yield r


def test_ring_handoff_1mib(benchmark, ring) -> None:
    def handoff() -> None:
        slot = ring.acquire()
        ring.slot(slot)[:] = RANDOM
        ring.release(slot)

    benchmark(handoff)


def test_xxh3_1mib(benchmark) -> None:
    benchmark(checksum, RANDOM)


@pytest.mark.parametrize("codec", [COMP_LZ4, COMP_ZSTD], ids=["lz4", "zstd"])
def test_compress_1mib_text(benchmark, codec) -> None:
    comp = Compressor(codec)
    benchmark(comp.compress, TEXT)


@pytest.mark.parametrize("codec", [COMP_LZ4, COMP_ZSTD], ids=["lz4", "zstd"])
def test_decompress_1mib_text(benchmark, codec) -> None:
    packed = Compressor(codec).compress(TEXT)
    dec = Decompressor(codec)
    benchmark(dec.decompress, packed, len(TEXT))


def test_compress_incompressible_lz4(benchmark) -> None:
    benchmark(Compressor(COMP_LZ4).compress, RANDOM)


def test_throttle_reserve(benchmark) -> None:
    with RateLimit.create(1 << 20) as limit:
        benchmark(limit.reserve, 4096)


def test_data_message_encode_decode(benchmark) -> None:
    body = {"seq": 12345, "len": BLOCK, "xxh": 2**63 + 5, "comp": 0, "raw": BLOCK,
            "span": BLOCK, "segs": [[i, i * 4096, 4096] for i in range(256)]}

    def roundtrip() -> None:
        P.decode(P.response(P.DATA_DESC, body, RANDOM), P.RESP)

    benchmark(roundtrip)
