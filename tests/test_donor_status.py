"""``clone-agent status --donor``: the STATUS command against a real donor, before, while
and after it serves a clone; authenticated as a clone is."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from tests.helpers import CLI, ROOT, Donor, run_cli

PASSWORD = "donor-status-Pass-2"


def _status(address: str, password: str = PASSWORD, *extra: str
            ) -> subprocess.CompletedProcess[str]:
    return run_cli("status", "--donor", f"alice@{address}", *extra,
                   env={"CLONE_AGENT_PASSWORD": password})


def test_status_of_a_donor_before_during_and_after_a_clone(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}").write_bytes(os.urandom(8 << 20))
    users = tmp_path / "users.json"
    assert run_cli("user", "add", "alice", "--users", str(users),
                   input=PASSWORD + "\n").returncode == 0
    with Donor(src, "--users", str(users)) as donor:
        res = _status(donor.address, PASSWORD, "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["clone"] is None
        denied = _status(donor.address, "wrong")
        assert denied.returncode == 6 and "ERROR 1045" in denied.stderr
        proc = subprocess.Popen(
            [*CLI, "pull", f"alice@{donor.address}", "--data-dir", str(tmp_path / "c"),
             "--max-data-bandwidth", "10"], stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "CLONE_AGENT_PASSWORD": PASSWORD})
        running = None
        try:
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                view = json.loads(_status(donor.address, PASSWORD, "--json").stdout)
                if (view["clone"] or {}).get("state") == "In Progress" and view["stages"]:
                    running = view
                    break
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, err
        assert running is not None, "the clone was seen running"
        ev = running["stages"][0]
        assert ev["event"] == "stage/clone (file copy)" and ev["work_estimated"] > 0
        assert ev["work_completed"] <= ev["work_estimated"]
        assert running["clone"]["user"] == "alice" and running["clone"]["error_no"] == 0
        after = json.loads(_status(donor.address, PASSWORD, "--json").stdout)
        plain = _status(donor.address)
    assert after["clone"]["state"] == "Completed" and after["com_clone"] == 1
    assert after["clones"] == {"completed": 1, "failed": 0}
    assert after["auth_failures"] == 1
    ev = after["stages"][0]
    assert ev["work_completed"] == ev["work_estimated"] == running["stages"][0]["work_estimated"]
    assert plain.returncode == 0, plain.stderr
    assert "Com_clone 1, completed 1" in plain.stdout
    assert "stage/clone (file copy)" in plain.stdout


def test_status_of_a_donor_that_is_not_there(tmp_path: Path) -> None:
    from tests.helpers import free_port

    res = run_cli("status", "--donor", f"127.0.0.1:{free_port()}")
    assert res.returncode == 5 and "ERROR 3862" in res.stderr, res.stderr
