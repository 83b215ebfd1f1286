"""The donor's snapshot state machine over the page store (docs/architecture.md, "The
snapshot"; MySQL's snapshot states in docs/mysql.md).

Runs in the donor's coordinator, which owns the :class:`PageStore` (and runs any live
workload in a thread of the same process, under the store's latch).

1. FILE COPY: take the backup lock (waiting at most clone_ddl_timeout: MySQL's 1205
   otherwise), start page tracking at a fresh checkpoint LSN; readers copy every file
   as it is (pages may be fuzzy or torn: each such page is tracked).
2. PAGE COPY: start redo archiving, then stop tracking (one latch, so no change falls
   between); the tracked pages, sorted and de-duplicated, are read fresh here (from
   the buffer pool when they are there) and sent as many whole pages to a block.
3. REDO COPY: the consistent point (the clone LSN at a transaction boundary, with the
   binlog position and the GTID set) ends archiving; the archive is sent as a file.

``end()`` removes ``#ib_archive/`` and releases the backup lock, however the clone ends.
Named pause points (MySQL's DEBUG_SYNC ``clone_file_copy``, ``clone_page_copy``,
``clone_redo_copy``) let tests land writes at each boundary: ``POINT=N`` waits, at
most 60 s, until the live workload has committed N more transactions.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from engine.codec import checksum
from engine.messages import ConsistentPoint, Entry, Tablespace
from engine.pagestore import PageStore

log = logging.getLogger("clone_agent.donor")

PAUSE_TIMEOUT = 60.0
REDO_NAME = "#clone/#redo_archive"


class Snapshot:
    def __init__(self, store: PageStore, ddl_timeout: float,
                 debug_sync: dict[str, int], workload_alive: Callable[[], bool]) -> None:
        self.store = store
        self.debug_sync = debug_sync
        self.workload_alive = workload_alive
        self.page_size = store.page_size
        self.tracking_lsn = 0
        self.archive_lsn = 0
        self.point: ConsistentPoint | None = None
        self.pages_sent = 0
        store.backup_lock.acquire_clone(ddl_timeout)
        self._locked = True
        try:
            self.tracking_lsn = store.start_tracking()
            log.info("FILE COPY: page tracking from LSN %d", self.tracking_lsn)
            self.pause("clone_file_copy")
        except BaseException:
            self.end()
            raise

    def pause(self, point: str) -> None:
        wanted = self.debug_sync.get(point)
        if not wanted:
            return
        target = self.store.last_txn + wanted
        deadline = time.monotonic() + PAUSE_TIMEOUT
        log.info("debug sync %s: waiting for %d transactions", point, wanted)
        while self.store.last_txn < target and time.monotonic() < deadline \
                and self.workload_alive():
            time.sleep(0.005)  # our own workload thread commits meanwhile; bounded

    # -- PAGE COPY --------------------------------------------------------------------
    def page_copy(self, entries: Iterable[Entry], block_size: int
                  ) -> tuple[list[list[list[int]]], dict[int, int]]:
        """Blocks of ``[file_id, space_id, page_no]`` and the grown sizes by file id."""
        self.archive_lsn, pages = self.store.start_archiving_stop_tracking()
        log.info("PAGE COPY: archiving redo from LSN %d; %d tracked pages", self.archive_lsn,
                 len(pages))
        self.pause("clone_page_copy")
        by_path = {e.rel: e for e in entries if e.kind == "f"}
        fid_of: dict[int, Entry] = {}
        for sp in self.store.spaces.values():
            entry = by_path.get(sp.path)
            if entry is not None:
                fid_of[sp.id] = entry
        per_block = max(1, block_size // self.page_size)
        blocks: list[list[list[int]]] = []
        current: list[list[int]] = []
        grown: dict[int, int] = {}
        for space, page_no in pages:
            entry = fid_of.get(space)
            if entry is None:
                continue  # a space dropped before the clone's lock: not part of it
            end = (page_no + 1) * self.page_size
            if end > grown.get(entry.id, entry.size):
                grown[entry.id] = end
            current.append([entry.id, space, page_no])
            if len(current) == per_block:
                blocks.append(current)
                current = []
        if current:
            blocks.append(current)
        return blocks, grown

    def fill_pages(self, block: list[list[int]], slot: memoryview) -> tuple[int, int, list[Any]]:
        """Read a page block fresh into a ring slot: (length, xxh3, data segments)."""
        P = self.page_size
        cursor = 0
        segs = []
        fresh = self.store.read_pages_fresh([(space, page_no) for _, space, page_no in block])
        for (fid, _, page_no), page in zip(block, fresh, strict=True):
            if page is None:
                continue
            slot[cursor : cursor + P] = page
            segs.append([fid, page_no * P, P])
            cursor += P
        self.pages_sent += len(segs)
        return cursor, checksum(slot[:cursor]), segs

    # -- REDO COPY --------------------------------------------------------------------
    def redo_copy(self, next_id: int, entries: Iterable[Entry]
                  ) -> tuple[Entry, ConsistentPoint, dict[int, int]]:
        """The consistent point; the archive as the file ``next_id``; the sizes of the
        files that grew, by id."""
        self.pause("clone_redo_copy")
        raw = self.store.consistent_point()
        by_path = {e.rel: e.id for e in entries if e.kind == "f"}
        sizes = {by_path[path]: size for path, size in raw["sizes"].items() if path in by_path}
        point = ConsistentPoint(
            clone_lsn=raw["clone_lsn"], archive_lsn=raw["archive_lsn"],
            archive_bytes=raw["archive_bytes"], last_txn=raw["last_txn"],
            binlog_file=raw["binlog_file"], binlog_file_no=raw["binlog_file_no"],
            binlog_position=raw["binlog_position"], gtid_executed=raw["gtid_executed"],
            server_uuid=raw["server_uuid"], page_size=raw["page_size"],
            spaces={int(sid): Tablespace(sp["path"], sp["pages"])
                    for sid, sp in raw["spaces"].items()},
            next_space_id=raw["next_space_id"],
            accounts=self.store.control.get("accounts", 0), blocked_s=raw["blocked_s"])
        self.point = point
        log.info("REDO COPY: consistent point LSN %d, transaction %d, %d bytes of redo "
                 "(blocked %.3f ms)", point.clone_lsn, point.last_txn,
                 point.archive_bytes, point.blocked_s * 1000)
        path = raw["archive_path"]
        entry = Entry(next_id, "f", REDO_NAME, os.path.getsize(path), 0o600, 0, path=path)
        return entry, point, sizes

    def end(self) -> None:
        try:
            self.store.end_clone()
        finally:
            if self._locked:
                self._locked = False
                self.store.backup_lock.release_clone()
