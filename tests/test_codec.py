import os

import pytest

from engine.codec import (
    COMP_LZ4,
    COMP_NONE,
    COMP_ZSTD,
    Compressor,
    Decompressor,
    checksum,
    segments_length,
)


def test_checksum_is_xxh3_and_sees_one_bit() -> None:
    data = bytearray(os.urandom(1 << 16))
    a = checksum(data)
    data[100] ^= 1
    assert checksum(data) != a
    assert checksum(memoryview(data)[:10]) == checksum(bytes(data[:10]))


@pytest.mark.parametrize("codec", [COMP_LZ4, COMP_ZSTD])
def test_compression_round_trip_and_incompressible_passthrough(codec: int) -> None:
    text = b"clone-agent " * 50000
    comp = Compressor(codec).compress(text)
    assert comp is not None and len(comp) < len(text)
    assert Decompressor(codec).decompress(comp, len(text)) == text
    assert Compressor(codec).compress(os.urandom(1 << 16)) is None
    with pytest.raises(ValueError):
        Decompressor(codec).decompress(comp, len(text) - 1)


def test_none_never_compresses() -> None:
    assert Compressor(COMP_NONE).compress(b"a" * 1000) is None
    assert segments_length([[0, 0, 5], [1, 9, 7]]) == 12


def test_block_size_follows_the_bandwidth_limit() -> None:
    from engine.codec import BLOCK_SIZE, MIN_BLOCK, block_size_for, valid_block_size

    assert block_size_for(0) == BLOCK_SIZE  # unlimited
    assert block_size_for(32 << 20) == 1 << 20  # 1/32 s of 32 MiB/s
    assert block_size_for(10 << 20) == 256 << 10  # at most 1/32 s: 320 KiB -> 256 KiB
    assert block_size_for(1 << 20) == MIN_BLOCK
    assert block_size_for(1 << 40) == 1 << 20  # never above 1 MiB under a limit
    for size in (BLOCK_SIZE, block_size_for(10 << 20), MIN_BLOCK, 4 << 20):
        assert valid_block_size(size)
    for bad in (0, 3 << 20, 32 << 10, 8 << 20, True, 1.5, "1048576"):
        assert not valid_block_size(bad)
