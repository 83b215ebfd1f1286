"""The bank (docs/format.md): ``init`` of a data directory, the live workload, ``verify``.

Every transaction is one mini-transaction: one transfer between two accounts (both
records get ``last_txn = T``), a write to a page of another tablespace, the emulated
binary-log position advanced, and a COMMIT record with T. Now and then a tablespace
grows by a few pages (files extended while a clone runs) and, every few seconds, a
DDL creates or drops a tablespace under ``test/`` (it waits on the backup lock while a
clone runs, for at most the DDL timeout).
"""

from __future__ import annotations

import logging
import os
import random
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

from engine.errors import DatabaseExists, LockWaitTimeout, UsageError
from engine.fsutil import fsync_dir, write_durable
from engine.pagestore.page import (
    HEADER_SIZE,
    T_BANK,
    T_DATA,
    T_SYS,
    T_UNDO,
    check_page,
    file_header_page,
    header,
    page_checksum,
)
from engine.pagestore.redo import (
    rec_commit,
    rec_init,
    rec_space_extend,
    rec_write,
)
from engine.pagestore.store import (
    BINLOG_ROTATE,
    FIRST_LSN,
    REDO_DIR,
    PageStore,
    write_control,
)

log = logging.getLogger("clone_agent.workload")

RECORD = struct.Struct("<QqQ")  # account_id, balance, last_txn
BANK_PATH = "bank/accounts.ibd"
BANK_SPACE = 4
START_BALANCE = 1000
FIRST_USER_SPACE = 10


def records_per_page(page_size: int) -> int:
    return (page_size - HEADER_SIZE) // RECORD.size


def account_place(i: int, page_size: int) -> tuple[int, int]:
    """(page_no, byte offset) of account ``i``'s record."""
    n = records_per_page(page_size)
    return 1 + i // n, HEADER_SIZE + (i % n) * RECORD.size


# -- init ---------------------------------------------------------------------------------
def _write_space(path: str, sid: int, pages: int, page_size: int, kind: int,
                 rng: np.random.Generator, fill: Callable[[int, bytearray], None] | None = None
                 ) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    body = page_size - HEADER_SIZE
    with open(path, "wb") as fh:
        fh.write(file_header_page(page_size, sid, 0))
        batch = 256
        for first in range(1, pages, batch):
            count = min(batch, pages - first)
            raw = rng.integers(0, 256, size=(count, page_size), dtype="uint8")
            raw[:, HEADER_SIZE + body * 3 // 4 :] = 0  # pages are rarely full
            buf = bytearray(raw.tobytes())
            for k in range(count):
                page_no = first + k
                view = memoryview(buf)[k * page_size : (k + 1) * page_size]
                page = bytearray(view)
                if fill is not None:
                    page[HEADER_SIZE:] = bytes(body)
                    fill(page_no, page)
                struct.pack_into("<IIQQH6x", page, 0, sid, page_no, 0, 0, kind)
                struct.pack_into("<Q", page, 16, page_checksum(page))
                view[:] = page
            fh.write(buf)
        fh.flush()
        os.fsync(fh.fileno())


def init_datadir(datadir: str, size: int, page_size: int = 16384, tables: int = 4,
                 accounts: int = 10000, seed: int = 0) -> dict[str, Any]:
    """``clone-agent init``: a new data directory (DATADIR must not exist)."""
    if page_size & (page_size - 1) or not 4096 <= page_size <= 65536:
        raise UsageError(f"page size {page_size} is not a power of two from 4096 to 65536")
    if accounts < 2 or tables < 1:
        raise UsageError("need at least 2 accounts and 1 table")
    root = os.path.abspath(datadir)
    if os.path.lexists(root):
        raise DatabaseExists(root, hint="init creates a new directory; choose another path")
    # numpy here, not at the top: a donor imports this module for its Workload, and
    # numpy's import (and its BLAS threads, which spin) cost every serve and
    # clone-local at its start for nothing unless it runs init.
    import numpy as np

    rng = np.random.default_rng(seed)
    server_uuid = str(uuid.UUID(int=random.Random(seed).getrandbits(128), version=4))
    n = records_per_page(page_size)
    bank_pages = 1 + -(-accounts // n) + 4
    total_pages = max(size // page_size, bank_pages + 64 + tables * 8)
    spaces: dict[str, dict[str, Any]] = {}

    def share(frac: float) -> int:
        return max(8, int(total_pages * frac))

    os.makedirs(os.path.join(root, REDO_DIR))
    layout = [(0, "ibdata1", share(0.06), T_SYS), (1, "undo_001", share(0.04), T_UNDO),
              (2, "undo_002", share(0.04), T_UNDO), (3, "mysql.ibd", share(0.02), T_DATA)]
    used = sum(p for _, _, p, _ in layout) + bank_pages
    per_table = max(8, (total_pages - used) // tables)
    for i in range(tables):
        layout.append((FIRST_USER_SPACE + i, f"db{i % 2 + 1}/t{i + 1}.ibd", per_table, T_DATA))
    for sid, rel, pages, kind in layout:
        _write_space(os.path.join(root, rel), sid, pages, page_size, kind, rng)
        spaces[str(sid)] = {"path": rel, "pages": pages}

    def bank_fill(page_no: int, page: bytearray) -> None:
        first = (page_no - 1) * n
        for slot in range(n):
            acct = first + slot
            if acct < accounts:
                RECORD.pack_into(page, HEADER_SIZE + slot * RECORD.size, acct, START_BALANCE, 0)

    _write_space(os.path.join(root, BANK_PATH), BANK_SPACE, bank_pages, page_size, T_BANK, rng,
                 fill=bank_fill)
    spaces[str(BANK_SPACE)] = {"path": BANK_PATH, "pages": bank_pages}
    # Plain (non-paged) files, copied as they are.
    write_durable(os.path.join(root, "auto.cnf"), f"[auto]\nserver-uuid={server_uuid}\n".encode())
    write_durable(os.path.join(root, "mysqld-auto.cnf"),
                  b'{"Version": 2, "mysql_dynamic_parse_early_variables": {}}\n')
    write_durable(os.path.join(root, "ib_buffer_pool"), b"")
    control = {"format": 1, "page_size": page_size, "server_uuid": server_uuid,
               "checkpoint_lsn": FIRST_LSN, "spaces": spaces,
               "next_space_id": FIRST_USER_SPACE + tables, "last_txn": 0, "binlog_file": 1,
               "binlog_pos": 4, "clean": True, "accounts": accounts}
    write_control(root, control)
    for dirpath, _, _ in os.walk(root):
        fsync_dir(dirpath)
    fsync_dir(os.path.dirname(root))
    return control


# -- the workload --------------------------------------------------------------------------
@dataclass
class WorkloadStats:
    txns: int = 0
    ddl: int = 0
    ddl_failed: int = 0
    started: float = field(default_factory=time.monotonic)
    first_txn: int = 0

    def tps(self) -> float:
        return self.txns / max(time.monotonic() - self.started, 1e-9)


class Workload:
    """Bank transfers against an open store; ``run`` until told to stop."""

    def __init__(self, store: PageStore, rate: int = 0, seed: int = 0,
                 ddl_timeout: float | None = None,
                 ddl_every: float = 3.0, extend_every: int = 500,
                 ddl_hold: float = 0.0) -> None:
        self.store = store
        self.rate = rate
        self.rng = random.Random(seed * 1_000_003 + store.last_txn)
        self.accounts = int(store.control.get("accounts", 10000))
        self.ddl_timeout = ddl_timeout  # None: a running clone's clone_ddl_timeout
        self.ddl_every = ddl_every
        self.extend_every = extend_every
        self.ddl_hold = ddl_hold  # fault point (tests): a DDL that keeps the lock this long
        self.stats = WorkloadStats(first_txn=store.last_txn + 1)
        self.on_commit: Callable[[int], None] | None = None
        bank = store.space_by_path(BANK_PATH)
        if bank is None:
            raise UsageError("this data directory has no bank/accounts.ibd")
        self.bank = bank.id

    def transaction(self) -> int:
        """One transfer, committed; returns its number T."""
        s = self.store
        rng = self.rng
        a, b = rng.sample(range(self.accounts), 2)
        amount = rng.randint(1, 100)
        user = [sp for sp in s.spaces.values() if sp.id >= FIRST_USER_SPACE] or \
            list(s.spaces.values())
        with s.latch:
            txn = s.last_txn + 1
            records = []
            for acct, delta in ((a, -amount), (b, amount)):
                page_no, off = account_place(acct, s.page_size)
                page = s.get_page(self.bank, page_no)
                assert page is not None
                _, balance, _ = RECORD.unpack_from(page, off)
                records.append(rec_write(self.bank, page_no, off + 8,
                                         struct.pack("<qQ", balance + delta, txn)))
            sp = rng.choice(user)
            if sp.pages > 1:
                page_no = rng.randrange(1, sp.pages)
                page = s.get_page(sp.id, page_no)
                if page is not None and _page_type(page) in (T_DATA, T_SYS, T_UNDO):
                    off = rng.randrange(HEADER_SIZE, s.page_size - 64)
                    records.append(rec_write(sp.id, page_no, off, rng.randbytes(48)))
            if self.extend_every and txn % self.extend_every == 0:  # a file grows
                new = sp.pages
                records += [rec_space_extend(sp.id, new + 4), rec_init(sp.id, new, T_DATA),
                            rec_write(sp.id, new, HEADER_SIZE, rng.randbytes(128))]
            binlog_file, binlog_pos = s.binlog_file, s.binlog_pos + rng.randint(200, 600)
            if binlog_pos > BINLOG_ROTATE:
                binlog_file, binlog_pos = binlog_file + 1, 4
            records.append(rec_commit(txn, binlog_file, binlog_pos))
            s.commit(records)
        self.stats.txns += 1
        if self.on_commit is not None:
            self.on_commit(txn)
        return txn

    def ddl(self) -> None:
        s = self.store
        mine = [sp for sp in s.spaces.values() if sp.path.startswith("test/")]
        try:
            if len(mine) >= 3 or (mine and self.rng.random() < 0.5):
                s.drop_space(self.rng.choice(mine).id, self.ddl_timeout)
            else:
                s.create_space(f"test/wl_{s.next_space_id}.ibd", 8, self.ddl_timeout,
                               hold=self.ddl_hold)
            self.stats.ddl += 1
        except LockWaitTimeout as exc:
            self.stats.ddl_failed += 1
            log.warning("DDL failed while a clone runs: ERROR %d: %s", exc.errno, exc.message)

    def run(self, should_stop: Callable[[], bool], duration: float | None = None) -> None:
        """Transfers in this thread; DDL in a second one, as another session would run
        it, so a DDL waiting on a clone's backup lock does not stall the transfers."""
        try:
            self._run(should_stop, duration)
        finally:
            if self._ddl_thread is not None:
                bound = self.store.backup_lock.ddl_limit(self.ddl_timeout)
                self._ddl_thread.join(bound + self.ddl_hold + 60)

    _ddl_thread: threading.Thread | None = None

    def _run(self, should_stop: Callable[[], bool], duration: float | None) -> None:
        started = time.monotonic()
        next_due = started
        next_checkpoint = started + 1.0
        next_ddl = started + self.ddl_every
        while not should_stop():
            now = time.monotonic()
            if duration is not None and now - started >= duration:
                break
            if self.rate > 0 and now < next_due:
                time.sleep(min(next_due - now, 0.05))  # pacing to the asked rate
                continue
            next_due = max(next_due + (1.0 / self.rate if self.rate else 0), now - 1.0)
            self.transaction()
            if now >= next_checkpoint:
                self.store.flush_some(256)
                self.store.checkpoint()
                next_checkpoint = now + 1.0
            if self.ddl_every and now >= next_ddl and not (
                    self._ddl_thread is not None and self._ddl_thread.is_alive()):
                self._ddl_thread = threading.Thread(target=self.ddl, name="ddl", daemon=True)
                self._ddl_thread.start()
                next_ddl = now + self.ddl_every


def _page_type(page: bytearray) -> int:
    return int(header(page)[4])


# -- verify ------------------------------------------------------------------------------
def verify(datadir: str) -> dict[str, Any]:
    """Every page's header and checksum, and the bank invariant (offline)."""
    store = PageStore(datadir, readonly=True)
    try:
        P = store.page_size
        pages = bad = 0
        problems: list[str] = []
        for sp in sorted(store.spaces.values(), key=lambda s: s.id):
            size = os.fstat(sp.fd).st_size
            count = max(sp.pages, size // P)
            if size % P:
                problems.append(f"{sp.path}: size {size} is not a whole number of pages")
            for first in range(0, count, 256):
                chunk = os.pread(sp.fd, 256 * P, first * P)
                for k in range(min(256, count - first)):
                    page_no = first + k
                    frame = store.pool.get((sp.id, page_no))
                    page: bytes | bytearray = frame.page if frame is not None else \
                        chunk[k * P : (k + 1) * P].ljust(P, b"\0")
                    pages += 1
                    why = check_page(page, sp.id, page_no)
                    if why is not None:
                        bad += 1
                        if len(problems) < 10:
                            problems.append(f"{sp.path} page {page_no}: {why}")
        accounts = int(store.control.get("accounts", 0))
        total = 0
        max_txn = 0
        n = records_per_page(P)
        for page_no in range(1, 1 + -(-accounts // n)):
            bank_page = store.get_page(BANK_SPACE, page_no)
            assert bank_page is not None
            for slot in range(n):
                acct = (page_no - 1) * n + slot
                if acct >= accounts:
                    break
                acct_id, balance, last = RECORD.unpack_from(bank_page,
                                                            HEADER_SIZE + slot * RECORD.size)
                if acct_id != acct:
                    problems.append(f"account {acct} has id {acct_id}")
                total += balance
                max_txn = max(max_txn, last)
        if total != accounts * START_BALANCE:
            problems.append(f"balances sum to {total}, not {accounts * START_BALANCE}")
        if max_txn != store.last_txn:
            problems.append(f"largest last_txn {max_txn} != last transaction {store.last_txn}")
        return {"ok": not problems and bad == 0, "pages": pages, "bad_pages": bad,
                "accounts": accounts, "balance_total": total, "max_txn": max_txn,
                "last_txn": store.last_txn, "gtid_executed": store.gtid_executed(),
                "recovered_mtrs": store.recovered_mtrs, "problems": problems}
    finally:
        store.close()
