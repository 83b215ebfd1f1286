"""Applying a mini-transaction to pages: one code path for live writes and recovery.

The live store builds an mtr, appends it to the redo log and then applies it with
:func:`apply_mtr`; recovery reads the same frames back and applies them with the same
function. A record changes a page only when the page is older than the mtr
(``page_lsn < end_lsn``), so applying a log twice, or to a page copied after the
change, is harmless: that is what lets a clone's fuzzy copy plus redo converge.
"""

from __future__ import annotations

from typing import Any, Protocol

from engine.pagestore.page import HEADER_SIZE, page_lsn, reseal
from engine.pagestore.redo import (
    R_COMMIT,
    R_INIT,
    R_SPACE_CREATE,
    R_SPACE_DROP,
    R_SPACE_EXTEND,
    R_WRITE,
    Mtr,
)


class Target(Protocol):
    page_size: int

    def get_page(self, space: int, page_no: int) -> bytearray | None: ...

    def page_changed(self, space: int, page_no: int, start_lsn: int) -> None: ...

    def space_created(self, space: int, pages: int, path: str) -> None: ...

    def space_dropped(self, space: int, path: str) -> None: ...

    def space_extended(self, space: int, pages: int) -> None: ...

    def committed(self, txn: int, binlog_file: int, binlog_pos: int) -> None: ...


def apply_mtr(target: Target, mtr: Mtr, records: list[tuple[Any, ...]] | None = None) -> int:
    """Apply ``mtr`` to ``target``; returns how many pages it changed."""
    end = mtr.end_lsn
    changed: dict[tuple[int, int], bytearray | None] = {}
    for rec in records if records is not None else mtr.records():
        kind = rec[0]
        if kind == R_WRITE or kind == R_INIT:
            key = (rec[1], rec[2])
            if key not in changed:
                page = target.get_page(rec[1], rec[2])
                changed[key] = page if page is not None and page_lsn(page) < end else None
            page = changed[key]
            if page is None:
                continue  # the page already has this change, or its space is gone
            if kind == R_WRITE:
                off, data = rec[3], rec[4]
                page[off : off + len(data)] = data
            else:
                page[:] = bytes(len(page))
                page[0:4] = rec[1].to_bytes(4, "little")
                page[4:8] = rec[2].to_bytes(4, "little")
                page[24:26] = rec[3].to_bytes(2, "little")
        elif kind == R_COMMIT:
            target.committed(rec[1], rec[2], rec[3])
        elif kind == R_SPACE_CREATE:
            target.space_created(rec[1], rec[2], rec[3])
        elif kind == R_SPACE_DROP:
            target.space_dropped(rec[1], rec[2])
        elif kind == R_SPACE_EXTEND:
            target.space_extended(rec[1], rec[2])
    n = 0
    for (space, page_no), page in changed.items():
        if page is not None:
            reseal(page, end)
            target.page_changed(space, page_no, mtr.start_lsn)
            n += 1
    return n


__all__ = ["HEADER_SIZE", "Target", "apply_mtr"]
