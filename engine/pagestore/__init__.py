"""The emulated InnoDB-style page store (docs/format.md).

| module   | owns                                                                         |
|----------|------------------------------------------------------------------------------|
| page     | the fixed 32-byte page header, xxh3 page checksums, file-header pages         |
| redo     | redo records, mini-transaction frames, log files, the log scanner            |
| apply    | applying an mtr to pages: one path for live writes and for recovery          |
| store    | PageStore: ownership lock, buffer pool, WAL, checkpoints, recovery, tracking, |
|          | archiving, the backup lock, DDL, the clone's consistent point                |
| bank     | init of a data directory, the bank workload, verify                          |
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.pagestore.store import ARCHIVE_DIR, REDO_DIR, PageStore, is_paged, read_control

if TYPE_CHECKING:
    from engine.pagestore.bank import Workload, init_datadir, verify

#: bank.py's names, imported when first used: bank needs numpy, whose import (and its
#: BLAS threads) a clone's recipient would pay at RECOVERY for nothing, since RECOVERY
#: needs only the store.
_FROM_BANK = ("Workload", "init_datadir", "verify")


def __getattr__(name: str) -> Any:
    if name in _FROM_BANK:
        from engine.pagestore import bank

        return getattr(bank, name)
    raise AttributeError(f"module 'engine.pagestore' has no attribute {name!r}")


__all__ = ["ARCHIVE_DIR", "REDO_DIR", "PageStore", "Workload", "init_datadir", "is_paged",
           "read_control", "verify"]
