"""Prometheus metrics (--metrics-addr) of a real donor and a real recipient, scraped over
HTTP while a clone runs: counters only grow, and they agree with the clone's summary."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from engine.metrics import DonorStats, RecipientStats
from tests.helpers import CLI, ROOT, Donor, free_port, run_cli

PASSWORD = "metrics-Pass-1"


def scrape(port: int) -> dict[str, float]:
    """{sample name with its labels: value}, or {} while nothing answers yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_the_stats_follow_the_events() -> None:
    st = RecipientStats()
    st.observe({"event": "stage", "stage": "FILE COPY", "state": "In Progress", "data": 0,
                "network": 0, "estimate": 100, "threads": 1})
    st.observe({"event": "progress", "stage": "FILE COPY", "data": 60, "network": 30,
                "estimate": 100, "threads": 3})
    st.observe({"event": "stage", "stage": "FILE COPY", "state": "Completed", "data": 100,
                "network": 50, "estimate": 100})
    st.observe({"event": "stage", "stage": "FILE SYNC", "state": "Completed", "data": 100,
                "estimate": 100})
    st.end(True)
    assert (st.data_bytes, st.network_bytes, st.results["completed"]) == (100, 50, 1)
    donor = DonorStats()
    donor.stage(7, "FILE COPY", 10)
    donor.work(4)
    donor.end(7, True)
    donor.end(7, False)  # the first end counts
    assert donor.results == {"completed": 1, "failed": 0} and donor.com_clone == 1
    assert donor.view()["stages"] == [{"event": "stage/clone (file copy)", "stage": "FILE COPY",
                                       "work_completed": 4, "work_estimated": 10}]


def test_scrape_during_a_clone(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}").write_bytes(os.urandom(8 << 20))
    users = tmp_path / "users.json"
    assert run_cli("user", "add", "alice", "--users", str(users),
                   input=PASSWORD + "\n").returncode == 0
    donor_port, pull_port = free_port(), free_port()
    with Donor(src, "--users", str(users), "--metrics-addr",
               f"127.0.0.1:{donor_port}") as donor:
        denied = run_cli("pull", f"alice@{donor.address}", "--data-dir", str(tmp_path / "x"),
                         env={"CLONE_AGENT_PASSWORD": "wrong"})
        assert denied.returncode == 6, denied.stderr
        proc = subprocess.Popen(
            [*CLI, "pull", f"alice@{donor.address}", "--data-dir", str(tmp_path / "c"),
             "--json", "--max-data-bandwidth", "10", "--metrics-addr",
             f"127.0.0.1:{pull_port}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "CLONE_AGENT_PASSWORD": PASSWORD})
        samples = []
        try:
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                got = scrape(pull_port)
                if got:
                    samples.append(got)
                time.sleep(0.2)  # the scrape interval, not a wait for a peer
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, err
        after = scrape(donor_port)
    summary = json.loads(out.splitlines()[-1])
    total = sum(r["data"] for r in summary["clone_progress"]
                if r["stage"] in ("FILE COPY", "PAGE COPY", "REDO COPY"))
    assert total == 32 << 20
    assert len(samples) >= 3, "the clone lasts about 3 s: several scrapes"
    for name in ("clone_agent_data_bytes_total", "clone_agent_network_bytes_total"):
        values = [s[name] for s in samples]
        assert values == sorted(values), (name, values)  # monotonic
        assert values[-1] <= total + (1 << 20)
    assert any(s.get("clone_agent_stage{stage=FILE COPY}") == 1 for s in samples)
    assert any(0 < s.get("clone_agent_stage_work_completed{stage=FILE COPY}", 0)
               < s.get("clone_agent_stage_work_estimated{stage=FILE COPY}", 0)
               for s in samples)
    assert all(s["clone_agent_info{role=recipient}"] == 1 for s in samples)
    # the donor, after the clone: one clone completed, its bytes those of the summary
    assert after["clone_agent_clones_total{result=completed}"] == 1
    assert after["clone_agent_clones_total{result=failed}"] == 0
    assert after["clone_agent_com_clone_total"] == 1
    assert after["clone_agent_data_bytes_total"] == total
    assert after["clone_agent_auth_failures_total"] == 1
    assert after["clone_agent_stage_work_completed{stage=FILE COPY}"] == \
        after["clone_agent_stage_work_estimated{stage=FILE COPY}"] > 0
    assert after["clone_agent_stage{stage=FILE COPY}"] == 0  # nothing runs now


def test_a_metrics_address_in_use_is_a_usage_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        res = run_cli("pull", f"u@127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "c"),
                      "--metrics-addr", f"127.0.0.1:{port}")
    assert res.returncode == 2 and "ERROR 8001" in res.stderr, res.stderr
    assert "cannot serve metrics" in res.stderr and "Traceback" not in res.stderr
