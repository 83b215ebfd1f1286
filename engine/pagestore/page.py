"""The fixed page format (docs/format.md): a 32-byte header, xxh3 checksums, file headers.

| offset | type | field |
|---|---|---|
| 0 | u32 | space_id |
| 4 | u32 | page_no |
| 8 | u64 | page_lsn |
| 16 | u64 | checksum: xxh3_64 of the page with bytes 16..24 read as zero |
| 24 | u16 | page_type |
| 26 | 6 bytes | zero |

An all-zero page is a free page: no header, no checksum.
"""

from __future__ import annotations

import struct

import xxhash

HEADER = struct.Struct("<IIQQH6x")
HEADER_SIZE = 32
FILE_MAGIC = b"CLONEAGENT-SPACE"
FORMAT_VERSION = 1

T_FREE = 0
T_FILE_HEADER = 1
T_DATA = 2
T_BANK = 3
T_UNDO = 4  # ours: undo tablespace pages
T_SYS = 5  # ours: system tablespace pages

_ZERO8 = bytes(8)


def page_checksum(page: bytes | bytearray | memoryview) -> int:
    h = xxhash.xxh3_64()
    h.update(page[:16])
    h.update(_ZERO8)
    h.update(page[24:])
    return h.intdigest()


def seal(page: bytearray, space_id: int, page_no: int, lsn: int, page_type: int) -> None:
    """Write the header and the checksum into ``page`` in place."""
    HEADER.pack_into(page, 0, space_id, page_no, lsn, 0, page_type)
    struct.pack_into("<Q", page, 16, page_checksum(page))


def reseal(page: bytearray, lsn: int) -> None:
    """Set page_lsn and recompute the checksum, keeping the rest of the header."""
    struct.pack_into("<Q", page, 8, lsn)
    struct.pack_into("<Q", page, 16, page_checksum(page))


def header(page: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int]:
    """(space_id, page_no, page_lsn, checksum, page_type)."""
    return HEADER.unpack_from(page, 0)  # type: ignore[return-value]


def page_lsn(page: bytes | bytearray | memoryview) -> int:
    return int(struct.unpack_from("<Q", page, 8)[0])


def is_free(page: bytes | bytearray | memoryview) -> bool:
    return not any(page) if len(page) < 64 else bytes(page) == bytes(len(page))


def check_page(page: bytes | bytearray | memoryview, space_id: int, page_no: int) -> str | None:
    """None when the page is valid (or free); otherwise what is wrong with it."""
    if is_free(page):
        return None
    sid, pno, _, csum, _ = header(page)
    if sid != space_id:
        return f"space_id {sid} != {space_id}"
    if pno != page_no:
        return f"page_no {pno} != {page_no}"
    if csum != page_checksum(page):
        return "checksum mismatch"
    return None


def file_header_page(page_size: int, space_id: int, lsn: int) -> bytearray:
    page = bytearray(page_size)
    struct.pack_into("<16sIII", page, HEADER_SIZE, FILE_MAGIC, FORMAT_VERSION, page_size,
                     space_id)
    seal(page, space_id, 0, lsn, T_FILE_HEADER)
    return page


def read_file_header(page: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """(page_size, space_id) from a file-header page, or None if it is not one."""
    magic, _version, size, space_id = struct.unpack_from("<16sIII", page, HEADER_SIZE)
    if magic != FILE_MAGIC:
        return None
    return int(size), int(space_id)
