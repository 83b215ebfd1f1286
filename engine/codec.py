"""Block framing: xxh3 checksums, compression (none / lz4 / zstd), segment lists.

A *block* is the unit of one data message (2 MiB unless negotiated smaller; MySQL's
data packets carry 1 MiB).
Its bytes are the concatenation of its *segments* (``[file_id, offset, length]``),
so that many small files share one block. The checksum is xxh3_64 of the bytes as
they travel (after compression, when compressed), and is checked before anything
is written or acknowledged.
"""

from __future__ import annotations

from typing import Any

import xxhash

BLOCK_SIZE = 2 << 20  #: bytes of file data in a full block, unless negotiated smaller
MIN_BLOCK = 64 << 10  #: the smallest block a recipient may ask for
MAX_BLOCK = 4 << 20  #: the largest
LEGACY_BLOCK = 1 << 20  #: what a peer that does not negotiate (no block_size) cuts
BLOCKS_PER_CHUNK = 64  #: a chunk is the unit of reservation and restart
MAX_SEGMENTS = 4096  #: segments in one block (small files batched)

COMP_NONE = 0
COMP_LZ4 = 1
COMP_ZSTD = 2
CODECS = {"none": COMP_NONE, "lz4": COMP_LZ4, "zstd": COMP_ZSTD}


def block_size_for(limit_bytes_per_s: int) -> int:
    """The block size a recipient asks for: BLOCK_SIZE, or under a bandwidth limit the
    largest power of two of at most 1/32 s of the limit (64 KiB .. 1 MiB), so that one
    block stays a small part of the 2-s window in which a limit must hold to 5%.
    Fewer, bigger blocks cost less CPU a GiB, since every block costs Python work and
    ZeroMQ messages in four processes; bigger than 2 MiB would raise the recipient's
    memory (its ring keeps at least 8 slots) for little gain (docs/bench.md)."""
    if not limit_bytes_per_s:
        return BLOCK_SIZE
    size = MIN_BLOCK
    while size * 2 <= min(limit_bytes_per_s // 32, 1 << 20):
        size *= 2
    return size


def valid_block_size(size: object) -> bool:
    return type(size) is int and MIN_BLOCK <= size <= MAX_BLOCK and size & (size - 1) == 0


def checksum(data: Any) -> int:
    """xxh3_64 of a buffer (bytes, memoryview, mmap slice), without copying it."""
    return xxhash.xxh3_64_intdigest(data)


def segments_length(segments: list[list[int]]) -> int:
    return sum(seg[2] for seg in segments)


class Compressor:
    """Compresses one block at a time; reuses its state between blocks."""

    def __init__(self, codec: int, level: int = 1) -> None:
        self.codec = codec
        if codec == COMP_ZSTD:
            import zstandard

            self._zc = zstandard.ZstdCompressor(level=level)
        elif codec == COMP_LZ4:
            import lz4.block

            self._lz4 = lz4.block

    def compress(self, data: Any) -> bytes | None:
        """The compressed bytes, or None when they would not be smaller (send as is)."""
        if self.codec == COMP_NONE:
            return None
        if self.codec == COMP_LZ4:
            out: bytes = self._lz4.compress(data, store_size=False)
        else:
            out = self._zc.compress(data)
        return out if len(out) < len(data) else None


class Decompressor:
    def __init__(self, codec: int) -> None:
        self.codec = codec
        if codec == COMP_ZSTD:
            import zstandard

            self._zd = zstandard.ZstdDecompressor()
        elif codec == COMP_LZ4:
            import lz4.block

            self._lz4 = lz4.block

    def decompress(self, data: Any, raw_length: int) -> bytes:
        """The block's original bytes; ValueError for anything that is not exactly that."""
        try:
            if self.codec == COMP_LZ4:
                out: bytes = self._lz4.decompress(data, uncompressed_size=raw_length)
            elif self.codec == COMP_ZSTD:
                out = self._zd.decompress(data, max_output_size=raw_length)
            else:
                return bytes(data)
        except Exception as exc:  # the libraries' own error types, translated at this edge
            raise ValueError(f"block does not decompress: {exc}") from exc
        if len(out) != raw_length:
            raise ValueError(f"decompressed {len(out)} bytes, expected {raw_length}")
        return out
