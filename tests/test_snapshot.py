"""Clones of a live data directory: serve --workload and pull as real processes.

The invariant under load: the clone verifies (balances sum, every page valid), holds
exactly transactions 1..K with K = gtid_executed's upper bound, and the workload run
on it continues from K+1. Named pause points land writes at each stage boundary;
fault points tear pages, extend files and hold DDL."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine.pagestore import init_datadir
from tests.helpers import Donor, run_cli


@pytest.fixture(scope="module")
def datadir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("store") / "data"
    init_datadir(str(d), 48 << 20, page_size=16384, accounts=5000, tables=3, seed=1)
    return d


def clone_and_check(donor: Donor, dest: Path, *extra: str) -> dict:
    res = run_cli("pull", f"u@{donor.address}", "--data-dir", str(dest), "--json",
                  "--max-concurrency", "4", *extra)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.splitlines()[-1])
    status = summary["clone_status"]
    ver = run_cli("verify", str(dest), "--json")
    report = json.loads(ver.stdout)
    assert ver.returncode == 0 and report["ok"], report
    k = report["max_txn"]
    assert status["gtid_executed"] == (report["gtid_executed"])
    if k:
        assert status["gtid_executed"].endswith(f":1-{k}")
    assert status["binlog_file"].startswith("binlog.") and status["binlog_position"] >= 4
    rows = {r["stage"]: r for r in summary["clone_progress"]}
    for stage in ("DROP DATA", "FILE COPY", "PAGE COPY", "REDO COPY", "FILE SYNC",
                  "RECOVERY"):
        assert rows[stage]["state"] == "Completed", stage
        assert rows[stage]["data"] == rows[stage]["estimate"], stage
    assert rows["RESTART"]["state"] == "Not Started"
    return {"k": k, "summary": summary, "report": report}


@pytest.mark.parametrize("rate", ["0", "300", "3000"])
def test_clone_under_live_writes_is_consistent(datadir: Path, tmp_path: Path, rate: str) -> None:
    src = tmp_path / "src"
    os.system(f"cp -a {datadir} {src}")
    dest = tmp_path / "clone"
    with Donor(src, "--workload", rate, "--debug-sync", "clone_page_copy=200") as donor:
        out = clone_and_check(donor, dest)
    assert "workload:" in donor.stderr and not (src / "#ib_archive").exists()
    assert out["k"] > 0
    res = run_cli("workload", str(dest), "--duration", "0.5")
    assert res.returncode == 0 and f"transactions {out['k'] + 1}.." in res.stdout
    assert json.loads(run_cli("verify", str(dest), "--json").stdout)["ok"]
    # the donor, after its clean stop, is consistent too and ran past K
    donor_report = json.loads(run_cli("verify", str(src), "--json").stdout)
    assert donor_report["ok"] and donor_report["max_txn"] >= out["k"]


@pytest.mark.parametrize("point", ["clone_file_copy", "clone_page_copy", "clone_redo_copy"])
def test_writes_at_each_stage_boundary(datadir: Path, tmp_path: Path, point: str) -> None:
    src = tmp_path / "src"
    os.system(f"cp -a {datadir} {src}")
    with Donor(src, "--workload", "2000", "--debug-sync", f"{point}=400") as donor:
        out = clone_and_check(donor, tmp_path / "clone")
    assert f"debug sync {point}: waiting for 400 transactions" in donor.stderr
    assert out["k"] >= 400
    if point == "clone_redo_copy":
        assert out["summary"]["clone_progress"][3]["data"] > 0  # the writes came as redo


def test_torn_pages_are_repaired_by_page_copy(datadir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    os.system(f"cp -a {datadir} {src}")
    with Donor(src, "--workload", "0", "--fault", "tear_pages_of=accounts.ibd",
               "--debug-sync", "clone_file_copy=3000") as donor:
        out = clone_and_check(donor, tmp_path / "clone")  # verify: every page whole
    assert out["report"]["bad_pages"] == 0 and out["k"] >= 3000


def test_the_tear_fault_is_real(datadir: Path, tmp_path: Path) -> None:
    """Without writes nothing is tracked, so a torn read would stay torn: the fault
    point does tear, and only page tracking repairs it (the test above)."""
    src = tmp_path / "src"
    os.system(f"cp -a {datadir} {src}")
    dest = tmp_path / "clone"
    with Donor(src, "--fault", "tear_pages_of=accounts.ibd") as donor:
        res = run_cli("pull", f"u@{donor.address}", "--data-dir", str(dest))
    assert res.returncode == 0, res.stderr
    report = json.loads(run_cli("verify", str(dest), "--json").stdout)
    assert not report["ok"] and report["bad_pages"] > 0


def test_files_extended_during_the_clone(datadir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    os.system(f"cp -a {datadir} {src}")
    sizes = {p: p.stat().st_size for p in src.rglob("*.ibd")}
    with Donor(src, "--workload", "0", "--debug-sync", "clone_page_copy=3000") as donor:
        clone_and_check(donor, tmp_path / "clone")
    grown = [p for p, size in sizes.items()
             if (tmp_path / "clone" / p.relative_to(src)).stat().st_size > size]
    assert grown, "the workload extends a tablespace every 500 transactions"


def test_ddl_during_a_clone_waits_then_fails(datadir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    os.system(f"cp -a {datadir} {src}")
    with Donor(src, "--workload", "500", "--ddl-every", "0.2",
               "--debug-sync", "clone_page_copy=1000") as donor:
        clone_and_check(donor, tmp_path / "clone", "--ddl-timeout", "1")
    assert "DDL failed while a clone runs: ERROR 1205: Lock wait timeout exceeded" \
        in donor.stderr


def test_clone_waits_for_ddl_at_most_ddl_timeout(datadir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    os.system(f"cp -a {datadir} {src}")
    dest = tmp_path / "clone"
    with Donor(src, "--workload", "100", "--ddl-every", "0.01", "--fault", "ddl_hold=3") as donor:
        res = run_cli("pull", f"u@{donor.address}", "--data-dir", str(dest), "--ddl-timeout", "1")
    assert res.returncode == 1
    assert ("ERROR 3862 (HY000): Clone Donor Error: 1205 : Lock wait timeout exceeded; "
            "try restarting transaction.") in res.stderr
    assert not dest.exists() and not (src / "#ib_archive").exists()


def test_clone_local_takes_the_same_snapshot(datadir: Path, tmp_path: Path) -> None:
    dest = tmp_path / "local"
    res = run_cli("clone-local", str(datadir), "--data-dir", str(dest))
    assert res.returncode == 0, res.stderr
    report = json.loads(run_cli("verify", str(dest), "--json").stdout)
    assert report["ok"]
    st = json.loads(run_cli("status", str(dest), "--json").stdout)
    assert st["clone_progress"][6]["state"] == "Completed"


def test_clone_local_of_a_directory_that_another_process_owns(datadir: Path,
                                                               tmp_path: Path) -> None:
    """The local donor is a stage worker: its refusal comes back as the error it is."""
    dest = tmp_path / "local"
    with Donor(datadir, "--workload", "50"):  # the server owns the data directory now
        res = run_cli("clone-local", str(datadir), "--data-dir", str(dest))
    assert res.returncode == 3, res.stderr  # refused
    assert f"ERROR 8005 (HY000): Data directory '{datadir}' is in use" in res.stderr
    assert "Traceback" not in res.stderr
    assert not dest.exists()
