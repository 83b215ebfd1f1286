"""``pull --replace``: real donors, real owners, real kill -9 at every step of the copy
and of the swap, then the next command, then the tree compared with the whole old one
or the whole new one; RESTART of a served page store whose workload goes on from the
clone's K+1; a disk that fills; and every preflight problem, alone and together."""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.pagestore import init_datadir
from engine.ring import sweep_stale
from tests.helpers import CLI, ROOT, Donor, describe, run_cli, small_tmpfs

OLD_ACCOUNTS, NEW_ACCOUNTS = 300, 500


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A donor's page store and an older, different one to be replaced (copied per test)."""
    base = tmp_path_factory.mktemp("stores")
    init_datadir(str(base / "donor"), 8 << 20, accounts=NEW_ACCOUNTS, seed=1)
    init_datadir(str(base / "old"), 8 << 20, accounts=OLD_ACCOUNTS, seed=2)
    return base


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def data_view(root: Path) -> dict[str, Any]:
    """Everything but the redo log, which RECOVERY writes anew (and a server rewrites at
    each start): a clone's data files are the donor's, byte for byte."""
    return {k: v for k, v in describe(root).items()
            if k.partition("/")[0] not in ("#ib_redo", "#ib_archive")}


def leftovers(data: Path) -> list[str]:
    return [n for n in ("#new", "#old", "#swap") if (data / "#clone" / n).exists()]


def verify(data: Path) -> dict[str, Any]:
    res = run_cli("verify", str(data), "--json")
    assert res.returncode in (0, 1), res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def pull_killed(*args: str) -> tuple[int, int, str]:
    """A pull run to its kill point: (pid, return code, stderr); its shared memory
    (left by a kill -9 in the copy) swept once it is gone."""
    proc = subprocess.Popen([*CLI, "pull", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    _, err = proc.communicate(timeout=120)
    deadline = time.monotonic() + 15
    while any(n.startswith(f"clone-agent-{proc.pid}-") for n in os.listdir("/dev/shm")):
        sweep_stale()
        assert time.monotonic() < deadline, "the killed pull's segments were not swept"
        time.sleep(0.05)  # its writers, which map the ring, end on their own
    return proc.pid, proc.returncode, err


# -- kill -9 at every step --------------------------------------------------------------
#: 11 top-level entries in each store: renames 1-11 move the old ones out, 12-22 the new in
ROLLED_BACK = ["file_copy", "page_copy", "redo_copy", "file_sync", "recovery", "verified",
               "journal", "rename:1", "rename:6", "rename:11", "rename:12", "rename:21",
               "renamed"]
ROLLED_FORWARD = ["swapped", "drop_data", "drop:1", "drop:7", "dropped"]


@pytest.mark.parametrize("point", ROLLED_BACK + ROLLED_FORWARD)
def test_a_kill_9_anywhere_leaves_the_whole_old_tree_or_the_whole_new(
        templates: Path, tmp_path: Path, point: str) -> None:
    data = _copy(templates / "old", tmp_path / "data")
    old = describe(data)
    with Donor(templates / "donor", "--idle-timeout", "2") as donor:
        _, rc, err = pull_killed(f"u@{donor.address}", "--replace", str(data),
                                 "--fault", f"kill_at={point}")
    assert rc == -signal.SIGKILL, err
    # The next command that opens DATADIR finishes or undoes what the kill left.
    status = run_cli("status", str(data), "--json")
    st = json.loads(status.stdout)["clone_status"]
    # status exits 1 for a failed clone, 0 for a completed one
    assert status.returncode == (0 if st["state"] == "Completed" else 1), status.stderr
    assert leftovers(data) == []
    if point in ROLLED_FORWARD:
        assert data_view(data) == data_view(templates / "donor")
        assert st["state"] == "Completed" and st["error_no"] == 0
    else:
        assert describe(data) == old  # byte for byte, the redo log too
        assert st["state"] == "Failed" and st["error_no"] == 1317
    result = verify(data)
    assert result["ok"], result
    assert result["accounts"] == (NEW_ACCOUNTS if point in ROLLED_FORWARD else OLD_ACCOUNTS)


def test_a_kill_9_in_the_middle_of_file_copy(templates: Path, tmp_path: Path) -> None:
    data = _copy(templates / "old", tmp_path / "data")
    old = describe(data)
    with Donor(templates / "donor", "--idle-timeout", "2") as donor:
        proc = subprocess.Popen([*CLI, "pull", f"u@{donor.address}", "--replace", str(data),
                                 "--max-data-bandwidth", "2"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=ROOT)
        new = data / "#clone" / "#new"
        deadline = time.monotonic() + 30
        while not (new / "ibdata1").exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # until data flows into the copy, bounded
        assert (new / "ibdata1").exists()
        proc.kill()
        proc.communicate(timeout=10)
    deadline = time.monotonic() + 15
    while any(n.startswith(f"clone-agent-{proc.pid}-") for n in os.listdir("/dev/shm")):
        sweep_stale()
        assert time.monotonic() < deadline
        time.sleep(0.05)  # its writers end on their own, then its ring is swept
    result = verify(data)  # this time verify is the next command
    assert result["ok"] and result["accounts"] == OLD_ACCOUNTS
    assert leftovers(data) == [] and describe(data) == old


@pytest.mark.parametrize(("point", "command"), [("rename:5", "serve"), ("drop:2", "workload"),
                                                ("rename:14", "pull")])
def test_serve_workload_and_pull_settle_first(templates: Path, tmp_path: Path, point: str,
                                              command: str) -> None:
    data = _copy(templates / "old", tmp_path / "data")
    old = data_view(data)
    with Donor(templates / "donor", "--idle-timeout", "2") as donor:
        _, rc, err = pull_killed(f"u@{donor.address}", "--replace", str(data),
                                 "--fault", f"kill_at={point}")
        assert rc == -signal.SIGKILL, err
        if command == "serve":
            with Donor(data):
                assert leftovers(data) == []
        elif command == "workload":
            res = run_cli("workload", str(data), "--duration", "0")
            assert res.returncode == 0, res.stderr
        else:
            res = run_cli("pull", f"u@{donor.address}", "--replace", str(data))
            assert res.returncode == 0, res.stderr
    assert leftovers(data) == []
    forward = command != "serve"  # drop:2 was past the commit point; the pull replaced
    assert data_view(data) == (data_view(templates / "donor") if forward else old)
    assert verify(data)["ok"]


# -- RESTART ------------------------------------------------------------------------------
def reports(owner: Donor) -> Iterator[int]:
    """The last transaction a ``serve --report-tps`` reports, line by line (bounded)."""
    assert owner.proc is not None and owner.proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(owner.proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if sel.select(timeout=deadline - time.monotonic()):
                line = owner.proc.stdout.readline()
                if not line:
                    return
                if line.startswith("tps "):
                    yield int(line.split()[1])
    finally:
        sel.close()


def wait_report(owner: Donor, until: Callable[[int], bool]) -> int:
    for txn in reports(owner):
        if until(txn):
            return txn
    raise AssertionError("the server's reports did not get there in time")


def test_a_served_page_store_restarts_onto_the_clone_and_its_workload_goes_on(
        templates: Path, tmp_path: Path) -> None:
    donor_dir = _copy(templates / "donor", tmp_path / "donor")
    data = _copy(templates / "old", tmp_path / "data")
    with Donor(donor_dir, "--workload", "200", "--report-tps") as donor, \
            Donor(data, "--workload", "2", "--report-tps") as owner:
        # The old workload (2 a second) stays far below K, so a report above K comes
        # from the clone's history.
        wait_report(donor, lambda txn: txn > 400)
        res = run_cli("pull", f"u@{donor.address}", "--replace", str(data), "--json")
        assert res.returncode == 0, res.stderr
        summary = json.loads(res.stdout.splitlines()[-1])
        k = summary["consistent_point"]["last_txn"]
        assert k > 400
        wait_report(owner, lambda txn: txn > k + 2)
        status = json.loads(run_cli("status", str(data), "--json").stdout)
    assert owner.proc is not None and owner.proc.returncode == 0  # the same process
    rows = {r["stage"]: r for r in summary["clone_progress"]}
    assert all(r["state"] == "Completed" for r in rows.values()), rows
    assert rows["DROP DATA"]["data"] == rows["DROP DATA"]["estimate"] > 0
    assert rows["RESTART"]["end_time"] <= rows["DROP DATA"]["begin_time"]
    assert summary["replace"]["restarted"] and summary["replace"]["last_txn"] == k
    assert summary["replace"]["server_pid"] == owner.proc.pid
    assert f"goes on from transaction {k + 1}" in summary["replace"]["message"]
    assert status["clone_status"]["state"] == "Completed"
    assert "RESTART: releasing" in owner.stderr and "serving" in owner.stderr
    result = verify(data)
    donor_uuid = summary["clone_status"]["gtid_executed"].split(":")[0]
    assert result["ok"] and result["accounts"] == NEW_ACCOUNTS
    assert result["gtid_executed"] == f"{donor_uuid}:1-{result['last_txn']}"
    assert result["last_txn"] > k + 2  # the clone's history, continued by the workload


def pull_until_served(owner: Donor, dest: Path) -> None:
    """A clone of what the owner serves, once it serves again (3874 while it settles)."""
    deadline = time.monotonic() + 30
    while True:
        res = run_cli("pull", f"u@{owner.address}", "--data-dir", str(dest))
        if res.returncode == 0:
            return
        assert "3874" in res.stderr and time.monotonic() < deadline, res.stderr
        time.sleep(0.2)  # the owner settles and reopens on its own clock; bounded


@pytest.mark.parametrize(("point", "forward"), [("released", False), ("rename:4", False),
                                                ("swapped", True), ("restarted", True)])
def test_a_pull_killed_while_its_server_had_let_go(templates: Path, tmp_path: Path,
                                                   point: str, forward: bool) -> None:
    """The server sees the pull's channel close, settles what it left, and serves the
    whole old tree or the whole new one again."""
    data = _copy(templates / "old", tmp_path / "data")
    old = data_view(data)
    with Donor(templates / "donor", "--idle-timeout", "2") as donor, Donor(data) as owner:
        _, rc, err = pull_killed(f"u@{donor.address}", "--replace", str(data),
                                 "--fault", f"kill_at={point}")
        assert rc == -signal.SIGKILL, err
        pull_until_served(owner, tmp_path / "served")
        assert leftovers(data) == []
    assert owner.proc is not None and owner.proc.returncode == 0
    expected = data_view(templates / "donor") if forward else old
    assert data_view(tmp_path / "served") == expected == data_view(data)
    assert verify(data)["ok"]


def test_a_served_plain_tree_is_replaced_and_served_again(tmp_path: Path) -> None:
    src, data = tmp_path / "src", tmp_path / "data"
    for root, seed in ((src, b"new"), (data, b"old")):
        (root / "d").mkdir(parents=True)
        (root / "d" / "f").write_bytes(seed * 1000)
        (root / f"only_{seed.decode()}").write_bytes(os.urandom(300_000))
    with Donor(src) as donor, Donor(data) as owner:
        res = run_cli("pull", f"u@{donor.address}", "--replace", str(data))
        assert res.returncode == 0, res.stderr
        assert f"the server of {data} (pid {owner.proc.pid}) serves the clone" in res.stderr
        pull_until_served(owner, tmp_path / "again")
    assert describe(data) == describe(src) == describe(tmp_path / "again")


# -- the old data: kept, or removed with DROP DATA's counters ------------------------------
def test_keep_old_moves_the_old_data_aside(templates: Path, tmp_path: Path) -> None:
    data = _copy(templates / "old", tmp_path / "data")
    old = describe(data)
    keep = tmp_path / "kept"
    with Donor(templates / "donor") as donor:
        res = run_cli("pull", f"u@{donor.address}", "--replace", str(data), "--keep-old",
                      str(keep), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.splitlines()[-1])
    assert summary["replace"]["old_data"] == f"kept in {keep}"
    assert not summary["replace"]["restarted"]
    assert "ready to use" in summary["replace"]["message"]
    rows = {r["stage"]: r for r in summary["clone_progress"]}
    assert rows["RESTART"]["state"] == "Not Started"
    assert rows["DROP DATA"]["state"] == "Completed"
    assert rows["DROP DATA"]["data"] == rows["DROP DATA"]["estimate"] > 7 << 20
    assert describe(keep) == old
    assert data_view(data) == data_view(templates / "donor") and leftovers(data) == []
    assert verify(data)["ok"] and verify(keep)["accounts"] == OLD_ACCOUNTS


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_a_disk_that_fills_during_the_copy_leaves_the_old_data(tmp_path: Path) -> None:
    """The estimate (bytes) passes the preflight, but thousands of tiny files take a
    page each on tmpfs: the disk fills during FILE COPY. The old data is as it was."""
    src = tmp_path / "src"
    for d in range(10):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(300):
            (src / f"d{d}" / f"f{i}").write_bytes(b"x" * 100)
    with small_tmpfs(tmp_path / "small", "8m") as small:
        data = small / "data"
        data.mkdir()
        (data / "keep.bin").write_bytes(os.urandom(1 << 20))
        (data / "sub").mkdir()
        (data / "sub" / "x").write_bytes(b"old")
        old = describe(data)
        with Donor(src) as donor:
            res = run_cli("pull", f"u@{donor.address}", "--replace", str(data))
        assert res.returncode == 1, res.stderr
        assert "ERROR 8002 (HY000)" in res.stderr and "No space left on device" in res.stderr
        assert "hint: the file system is full" in res.stderr and "Traceback" not in res.stderr
        assert describe(data) == old and leftovers(data) == []
        st = json.loads(run_cli("status", str(data), "--json").stdout)["clone_status"]
        assert st["state"] == "Failed" and st["error_no"] == 8002


# -- preflight: every problem, each on its own line, before anything changes ---------------
def _errors(stderr: str) -> list[int]:
    return [int(line.split()[1]) for line in stderr.splitlines() if line.startswith("ERROR ")]


def _untouched(path: Path) -> tuple[dict[str, Any], int]:
    return describe(path), os.stat(path).st_mtime_ns


def test_preflight_problems_that_need_no_donor(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    res = run_cli("pull", "u@127.0.0.1:1", "--replace", str(missing))
    assert res.returncode == 3 and _errors(res.stderr) == [8009]
    assert f"ERROR 8009 (HY000): Cannot replace '{missing}': it does not exist" in res.stderr
    assert "hint: --replace takes an existing data directory" in res.stderr
    a_file = tmp_path / "file"
    a_file.write_bytes(b"x")
    res = run_cli("pull", "u@127.0.0.1:1", "--replace", str(a_file))
    assert _errors(res.stderr) == [8009] and "it is not a directory" in res.stderr
    # two at once: the donor list, and the directory; --json lists both
    res = run_cli("pull", "u@127.0.0.1:3310", "--replace", str(missing), "--json",
                  "--valid-donor-list", "10.0.0.5:3310")
    assert res.returncode == 3 and _errors(res.stderr) == [3869, 8009], res.stderr
    assert res.stderr.count("hint: ") == 2 and "Traceback" not in res.stderr
    last = json.loads(res.stdout.splitlines()[-1])
    assert last["error_no"] == 3869 and [e["error_no"] for e in last["errors"]] == [3869, 8009]
    assert set(os.listdir(tmp_path)) <= {"file", "state"}  # nothing made, not missing
    # the donor list alone, with an existing directory: nothing created in it
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_bytes(b"old")
    before = _untouched(data)
    res = run_cli("pull", "u@127.0.0.1:3310", "--replace", str(data),
                  "--valid-donor-list", "10.0.0.5:3310")
    assert _errors(res.stderr) == [3869] and _untouched(data) == before
    res = run_cli("pull", "u@127.0.0.1:3310", "--data-dir", str(tmp_path / "n"),
                  "--keep-old", str(tmp_path / "k"))
    assert res.returncode == 2 and "--keep-old goes with --replace" in res.stderr


def test_preflight_problems_found_with_the_donor(templates: Path, tmp_path: Path) -> None:
    data = _copy(templates / "old", tmp_path / "data")
    served = tmp_path / "served"
    (served / "sub").mkdir(parents=True)
    before = _untouched(data)
    kept = tmp_path / "kept"
    kept.mkdir()
    with Donor(templates / "donor") as donor, Donor(served) as owner:
        cases = [
            (["--keep-old", str(kept)], [1086]),
            (["--keep-old", str(data / "in")], [3632]),
            (["--keep-old", "/dev/shm/clone-agent-test-elsewhere"], [8009]),
            (["--keep-old", "relative"], [8001]),
        ]
        for extra, numbers in cases:
            res = run_cli("pull", f"u@{donor.address}", "--replace", str(data), *extra)
            assert res.returncode in (1, 2, 3) and _errors(res.stderr) == numbers, res.stderr
            assert _untouched(data) == before
        # the destination inside a served directory, and a donor serving the very one
        res = run_cli("pull", f"u@{donor.address}", "--replace", str(served / "sub"))
        assert _errors(res.stderr) == [3632], res.stderr
        assert f"Path is within the current data directory '{served}'" in res.stderr
        res = run_cli("pull", f"u@{owner.address}", "--replace", str(served))
        assert _errors(res.stderr) == [3632] and "the very directory" in res.stderr
        # a workload owns it: it cannot be asked to let go
        load = subprocess.Popen([*CLI, "workload", str(data), "--rate", "5"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            lock = data / "#ib_redo" / "owner.lock"
            deadline = time.monotonic() + 30
            while not (lock.exists() and lock.read_text().strip() == str(load.pid)):
                assert time.monotonic() < deadline
                time.sleep(0.02)  # until the workload has opened its store, bounded
            res = run_cli("pull", f"u@{donor.address}", "--replace", str(data), "--keep-old",
                          str(kept))
            assert _errors(res.stderr) == [1086, 8005], res.stderr
            assert f"is in use by another process (pid {load.pid})" in res.stderr
        finally:
            load.send_signal(signal.SIGINT)
            load.communicate(timeout=30)
    assert leftovers(data) == [] and not (data / "#clone").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_no_room_for_both_copies_is_3873_with_the_other_problems(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(12 << 20))
    with small_tmpfs(tmp_path / "small", "8m") as small:
        data = small / "data"
        data.mkdir()
        (data / "old").write_bytes(os.urandom(1 << 20))
        before = _untouched(data)
        with Donor(src) as donor:
            res = run_cli("pull", f"u@{donor.address}", "--replace", str(data))
            assert res.returncode == 3 and _errors(res.stderr) == [3873], res.stderr
            assert ("ERROR 3873 (HY000): Clone estimated database size is 12.00 MiB. "
                    "Available space 7.00 MiB is not enough.") in res.stderr
            assert "hint: free space on DATADIR's file system" in res.stderr
            res = run_cli("pull", f"u@{donor.address}", "--replace", str(data),
                          "--keep-old", str(small / "data"))
            assert _errors(res.stderr) == [1086, 3873], res.stderr
        assert _untouched(data) == before and not (data / "#clone").exists()
        st = json.loads(run_cli("status", str(data), "--json").stdout)["clone_status"]
        assert st["state"] == "Failed" and st["error_no"] == 1086


def test_one_replace_at_a_time_and_status_throughout(tmp_path: Path) -> None:
    src, data = tmp_path / "src", tmp_path / "data"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(6 << 20))
    data.mkdir()
    (data / "g").write_bytes(b"old")
    with Donor(src) as donor:
        first = subprocess.Popen([*CLI, "pull", f"u@{donor.address}", "--replace", str(data),
                                  "--max-data-bandwidth", "1"], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not (data / "#clone" / "#new" / "f").exists():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.02)  # until the first is copying, bounded
        st = json.loads(run_cli("status", str(data), "--json").stdout)
        assert st["clone_status"]["state"] == "In Progress"
        assert st["clone_status"]["pid"] == first.pid
        assert st["clone_progress"][1]["state"] == "In Progress"
        assert st["clone_progress"][0]["state"] == "Not Started"  # DROP DATA comes last
        second = run_cli("pull", f"u@{donor.address}", "--replace", str(data))
        # every problem: this directory is being replaced, and the donor is busy
        assert _errors(second.stderr) == [3874, 3634], second.stderr
        busy = run_cli("serve", str(data), "--bind", "127.0.0.1:0", "--allow-anonymous")
        assert _errors(busy.stderr) == [3874]
        _, err = first.communicate(timeout=60)
        assert first.returncode == 0, err
    st = json.loads(run_cli("status", str(data), "--json").stdout)
    assert st["clone_status"]["state"] == "Completed"
    assert describe(data) == describe(src)


def test_a_server_that_does_not_come_back_is_3707_with_the_clone_in_place(
        templates: Path, tmp_path: Path) -> None:
    data = _copy(templates / "old", tmp_path / "data")
    with Donor(templates / "donor") as donor, \
            Donor(data, "--fault", "die_at_reopen=1") as owner:
        res = run_cli("pull", f"u@{donor.address}", "--replace", str(data))
        assert owner.proc is not None and owner.proc.wait(timeout=30) == -signal.SIGKILL
    deadline = time.monotonic() + 15
    while any(n.startswith(f"clone-agent-{owner.proc.pid}-") for n in os.listdir("/dev/shm")):
        sweep_stale()  # the dead server's ring and control endpoint
        assert time.monotonic() < deadline
        time.sleep(0.05)  # its readers end on their own first
    assert res.returncode == 1 and _errors(res.stderr) == [3707], res.stderr
    assert f"ERROR 3707 (HY000): Restart server failed (the server of {data}" in res.stderr
    assert "hint: the clone is in place and whole" in res.stderr
    st = json.loads(run_cli("status", str(data), "--json").stdout)
    rows = {r["stage"]: r["state"] for r in st["clone_progress"]}
    assert st["clone_status"]["state"] == "Completed" and st["clone_status"]["error_no"] == 3707
    assert rows["RESTART"] == "Failed" and rows["DROP DATA"] == "Completed"
    assert data_view(data) == data_view(templates / "donor") and leftovers(data) == []
    assert verify(data)["ok"]
