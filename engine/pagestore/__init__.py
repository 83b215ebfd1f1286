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

from engine.pagestore.bank import Workload, init_datadir, verify
from engine.pagestore.store import ARCHIVE_DIR, REDO_DIR, PageStore, is_paged, read_control

__all__ = ["ARCHIVE_DIR", "REDO_DIR", "PageStore", "Workload", "init_datadir", "is_paged",
           "read_control", "verify"]
