"""The page store: page format, redo frames, recovery, ownership, and a property test of
redo apply against applying the same transactions directly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import DatabaseExists, DataDirectoryLocked, LockWaitTimeout
from engine.pagestore import PageStore, Workload, init_datadir, verify
from engine.pagestore.bank import BANK_SPACE, RECORD, START_BALANCE, account_place
from engine.pagestore.page import check_page, file_header_page, is_free, page_checksum, seal
from engine.pagestore.redo import frame, log_files, rec_commit, rec_write, scan_log
from engine.pagestore.store import REDO_DIR, BackupLock, read_control
from tests.helpers import CLI, ROOT, run_cli


def test_page_header_and_checksum() -> None:
    page = bytearray(4096)
    assert is_free(page) and check_page(page, 1, 2) is None
    page[100:104] = b"data"
    seal(page, 7, 3, 12345, 2)
    assert check_page(page, 7, 3) is None
    assert int.from_bytes(page[16:24], "little") == page_checksum(page)
    assert check_page(page, 7, 4) == "page_no 3 != 4"
    assert check_page(page, 8, 3) == "space_id 7 != 8"
    page[200] ^= 1
    assert check_page(page, 7, 3) == "checksum mismatch"
    header = file_header_page(16384, 9, 0)
    assert header[32:48] == b"CLONEAGENT-SPACE" and check_page(header, 9, 0) is None


def test_a_ddl_waits_at_most_the_holding_clones_timeout() -> None:
    """The DDL's bound is the clone's clone_ddl_timeout, read under the lock: a DDL that
    asks while a clone is taking the lock gives up in time, not after the clone."""
    lock = BackupLock()
    lock.acquire_clone(0.2)
    outcome: list[BaseException | None] = []

    def ddl() -> None:
        try:
            lock.acquire_ddl()
            outcome.append(None)
        except LockWaitTimeout as exc:
            outcome.append(exc)

    t = threading.Thread(target=ddl)
    asked = time.monotonic()
    t.start()
    t.join(30)
    waited = time.monotonic() - asked
    assert len(outcome) == 1 and isinstance(outcome[0], LockWaitTimeout)
    assert waited >= 0.2
    lock.release_clone()
    lock.acquire_ddl()  # free now: no wait at all
    with pytest.raises(LockWaitTimeout):
        lock.acquire_clone(0.05)  # and a clone waits for the DDL at most its own timeout
    lock.release_ddl()
    lock.acquire_clone(0)


def test_redo_scan_stops_at_a_torn_frame(tmp_path: Path) -> None:
    redo = tmp_path / REDO_DIR
    redo.mkdir()
    body = rec_write(1, 2, 40, b"abc") + rec_commit(1, 1, 100)
    first = frame(1000, body)
    second = frame(1000 + len(first), body)
    (redo / "ib_redo_00000000000000001000").write_bytes(first + second[:-3])
    mtrs = list(scan_log(str(redo), 1000))
    assert len(mtrs) == 1 and mtrs[0].end_lsn == 1000 + len(first)
    assert mtrs[0].records()[1][:2] == (3, 1)


def test_init_is_deterministic_and_verifies(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    init_datadir(str(a), 8 << 20, page_size=4096, accounts=500, seed=3)
    init_datadir(str(b), 8 << 20, page_size=4096, accounts=500, seed=3)
    for name in ("ibdata1", "bank/accounts.ibd", "db1/t1.ibd"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    r = verify(str(a))
    assert r["ok"] and r["accounts"] == 500 and r["balance_total"] == 500 * START_BALANCE
    assert r["max_txn"] == 0 and r["bad_pages"] == 0
    with pytest.raises(DatabaseExists):
        init_datadir(str(a), 8 << 20)
    res = run_cli("init", str(a))
    assert res.returncode == 3 and "ERROR 1007" in res.stderr


def test_workload_checkpoints_and_a_clean_close(tmp_path: Path) -> None:
    d = tmp_path / "d"
    init_datadir(str(d), 8 << 20, page_size=4096, accounts=300)
    with PageStore(str(d), pool_pages=64) as store:
        load = Workload(store, seed=1, ddl_every=0.01)
        load.run(lambda: load.stats.txns >= 3000 and load.stats.ddl > 0)
        assert store.last_txn == 3000
    r = verify(str(d))
    assert r["ok"], r["problems"]
    assert r["max_txn"] == 3000 and r["recovered_mtrs"] == 0
    assert read_control(str(d))["clean"] is True
    assert load.stats.ddl > 0, "the workload ran DDL"
    assert read_control(str(d))["next_space_id"] >= 15, "a tablespace was created"


def test_one_owner_at_a_time(tmp_path: Path) -> None:
    d = tmp_path / "d"
    init_datadir(str(d), 4 << 20, page_size=4096, accounts=100)
    with PageStore(str(d)):
        with pytest.raises(DataDirectoryLocked):
            PageStore(str(d))
        with pytest.raises(DataDirectoryLocked):
            verify(str(d))
        res = run_cli("workload", str(d), "--duration", "1")
        assert res.returncode == 3 and "ERROR 8005" in res.stderr


def test_kill_9_then_recovery(tmp_path: Path) -> None:
    d = tmp_path / "d"
    assert run_cli("init", str(d), "--size", "16MiB", "--accounts", "1000").returncode == 0
    proc = subprocess.Popen([*CLI, "workload", str(d)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until it has written some redo past init
        files = log_files(str(d / REDO_DIR))
        if files and os.path.getsize(files[-1][1]) > 2 << 20:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    assert read_control(str(d))["clean"] is False
    r = verify(str(d))  # recovers in memory, writes nothing
    assert r["ok"], r["problems"]
    assert r["recovered_mtrs"] > 0 and r["max_txn"] > 0
    k = r["max_txn"]
    res = run_cli("workload", str(d), "--duration", "0.5")
    assert res.returncode == 0, res.stderr
    assert f"transactions {k + 1}.." in res.stdout
    assert verify(str(d))["ok"]


# -- property: recovering a log cut at a transaction boundary = applying the prefix ------
@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int], list]:
    """A store after 60 transactions whose pages never left the buffer pool, copied as a
    crash would leave it; with each transaction's end LSN and transfer."""
    base = tmp_path_factory.mktemp("prop")
    d = base / "live"
    init_datadir(str(d), 2 << 20, page_size=4096, accounts=40, tables=1, seed=5)
    store = PageStore(str(d), pool_pages=100000)
    load = Workload(store, seed=9, ddl_every=0, extend_every=0)
    ends, transfers = [], []
    for _ in range(60):
        before = {i: _balance(store, i) for i in range(40)}
        load.transaction()
        after = {i: _balance(store, i) for i in range(40)}
        transfers.append({i: after[i] - before[i] for i in range(40) if after[i] != before[i]})
        ends.append(store.lsn)
    assert store.log is not None
    store.log.flush()
    snap = base / "crashed"
    shutil.copytree(d, snap)
    store.close()
    return snap, ends, transfers


def _balance(store: PageStore, acct: int) -> int:
    page_no, off = account_place(acct, store.page_size)
    page = store.get_page(BANK_SPACE, page_no)
    assert page is not None
    return int(RECORD.unpack_from(page, off)[1])


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(k=st.integers(min_value=0, max_value=60))
def test_redo_cut_at_any_transaction_boundary(crashed, tmp_path_factory, k: int) -> None:
    snap, ends, transfers = crashed
    d = tmp_path_factory.mktemp("cut") / "d"
    shutil.copytree(snap, d)
    control = read_control(str(d))
    cut = ends[k - 1] if k else control["checkpoint_lsn"]
    (start, path), = [f for f in log_files(str(d / REDO_DIR)) if f[0] <= cut][-1:]
    os.truncate(path, cut - start)
    expected = {i: START_BALANCE for i in range(40)}
    for delta in transfers[:k]:
        for acct, change in delta.items():
            expected[acct] += change
    with PageStore(str(d)) as store:
        assert store.last_txn == k
        assert {i: _balance(store, i) for i in range(40)} == expected
    r = verify(str(d))
    assert r["ok"] and r["max_txn"] == k


def test_the_recipient_and_its_recovery_run_without_numpy() -> None:
    """numpy (the bank workload's) would cost a recipient's RECOVERY its import and its
    BLAS threads, for nothing: the store alone must not pull it in."""
    code = ("import sys, recipient.client, recipient.recovery, recipient.writer; "
            "from engine.pagestore import PageStore; "
            "sys.exit(1 if 'numpy' in sys.modules else 0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr or "numpy was imported"
