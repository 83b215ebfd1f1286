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
