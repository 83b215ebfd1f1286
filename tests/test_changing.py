"""A plain tree that changes while it is cloned is never copied wrong in silence, and
no tree crashes the donor: a throttled pull (1 MiB/s) while files are deleted,
truncated, grown or kept busy; a donor that may not read everything."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import CLI, ROOT, Donor, describe, run_cli

#: The donor as root without the capabilities that read past permission bits: a file
#: of mode 000 is then unreadable to it, as to any user (root would read it anyway).
WITHOUT_DAC = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")


def _slow_pull(donor: Donor, dest: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*CLI, "pull", f"u@{donor.address}", "--data-dir", str(dest),
                             "--max-data-bandwidth", "1", "--max-concurrency", "1", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)


def _wait_for_data(dest: Path, proc: subprocess.Popen[str]) -> None:
    """Until the recipient has written some of FILE COPY (bounded)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            rows = json.loads((dest / "#clone" / "#view_progress").read_bytes())
            if rows[1]["data"] > 0:
                return
        except (FileNotFoundError, ValueError):  # not yet written, or being replaced
            pass
        time.sleep(0.02)  # polling a file another process rewrites; bounded
    raise AssertionError("the clone did not start writing within 30 s")


def _status(dest: Path) -> dict[str, Any]:
    return dict(json.loads(run_cli("status", str(dest), "--json").stdout)["clone_status"])


def test_files_deleted_truncated_and_grown_during_the_clone(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    # read first (file order), for 3 s at 1 MiB/s: the changes come before the
    # victims are read, as the donor reads at most its ring (1 MiB) ahead
    (src / "a_lead").write_bytes(os.urandom(3 << 20))
    for name in ("v_deleted", "v_grown", "v_truncated"):
        (src / name).write_bytes(os.urandom(512 << 10))
    dest = tmp_path / "clone"
    with Donor(src) as donor:
        proc = _slow_pull(donor, dest)
        _wait_for_data(dest, proc)
        os.unlink(src / "v_deleted")
        with open(src / "v_truncated", "r+b") as f:
            f.truncate(100_000)
        with open(src / "v_grown", "ab") as f:
            f.write(os.urandom(300 << 10))
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert not (dest / "v_deleted").exists()  # absent, never a file of zeros
    assert describe(dest) == describe(src)  # the truncated and the grown as they are now
    warnings = _status(dest)["warnings"]
    assert [(w["kind"], w["path"]) for w in warnings] == [("vanished", "v_deleted")]
    assert "warning: v_deleted: removed on the donor while the clone read it" in err
    assert err.rstrip().splitlines()[-1].startswith("clone Completed with 1 warnings")
    assert "FILE COPY pass 2" in donor.stderr


class Busy(threading.Thread):
    """Appends to a file every 10 ms until stopped: a file that never stands still."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.stop = threading.Event()

    def run(self) -> None:
        with open(self.path, "ab") as f:
            while not self.stop.wait(0.01):  # the writer's own pace, not a wait for a peer
                f.write(os.urandom(4096))
                f.flush()

    def __enter__(self) -> Busy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join(10)


def _busy_tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "busy").write_bytes(os.urandom(2 << 20))  # 2 s a read at 1 MiB/s
    (src / "calm").write_bytes(os.urandom(100_000))
    return src


def test_a_file_that_keeps_changing_is_reported_by_name(tmp_path: Path) -> None:
    src = _busy_tree(tmp_path)
    dest = tmp_path / "clone"
    with Donor(src) as donor, Busy(src / "busy"):
        proc = _slow_pull(donor, dest)
        _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    warnings = _status(dest)["warnings"]
    assert [(w["kind"], w["path"]) for w in warnings] == [("changed", "busy")]
    assert "4 times" in warnings[0]["message"]
    assert (dest / "calm").read_bytes() == (src / "calm").read_bytes()
    assert err.rstrip().splitlines()[-1].startswith("clone Completed with 1 warnings")


def test_fail_on_change_makes_a_changed_file_an_error(tmp_path: Path) -> None:
    src = _busy_tree(tmp_path)
    dest = tmp_path / "clone"
    with Donor(src) as donor, Busy(src / "busy"):
        proc = _slow_pull(donor, dest, "--fail-on-change")
        _, err = proc.communicate(timeout=120)
        assert donor.proc is not None and donor.proc.poll() is None  # serves on
    assert proc.returncode == 1
    assert ("ERROR 8008 (HY000): Files changed on the donor while the clone read them: "
            "'busy'") in err
    assert "hint: " in err and "Traceback" not in err
    assert not dest.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="drops root's capabilities with setpriv")
def test_what_the_donor_cannot_read_fails_cleanly_and_serve_goes_on(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok").write_bytes(b"readable")
    (src / "secret").write_bytes(b"unreadable")
    (src / "closed").mkdir()
    (src / "closed" / "inside").write_bytes(b"x")
    os.chmod(src / "secret", 0)
    os.chmod(src / "closed", 0)
    with Donor(src, prefix=WITHOUT_DAC) as donor:
        assert donor.proc is not None
        res = run_cli("pull", f"u@{donor.address}", "--data-dir", str(tmp_path / "c1"))
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert ("ERROR 3862 (HY000): Clone Donor Error: 8002 : File operation failed: cannot "
                "read the directory 'closed' on the donor: Permission denied") in res.stderr
        assert donor.proc.poll() is None and not (tmp_path / "c1").exists()

        dest = tmp_path / "c2"
        res = run_cli("pull", f"u@{donor.address}", "--data-dir", str(dest),
                      "--skip-unreadable")
        assert res.returncode == 0, res.stderr
        assert sorted(os.listdir(dest)) == ["#clone", "closed", "ok"]
        assert os.listdir(dest / "closed") == []
        warnings = {(w["kind"], w["path"]) for w in _status(dest)["warnings"]}
        assert warnings == {("unreadable", "closed"), ("unreadable", "secret")}

        os.chmod(src / "closed", 0o755)  # now only the file is unreadable: its read fails
        res = run_cli("pull", f"u@{donor.address}", "--data-dir", str(tmp_path / "c3"))
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert ("ERROR 3862 (HY000): Clone Donor Error: 8002 : File operation failed: cannot "
                "read 'secret' on the donor: Permission denied") in res.stderr
        assert donor.proc.poll() is None and not (tmp_path / "c3").exists()

        res = run_cli("pull", f"u@{donor.address}", "--data-dir", str(tmp_path / "c4"),
                      "--skip-unreadable")
        assert res.returncode == 0, res.stderr
        assert (tmp_path / "c4" / "closed" / "inside").read_bytes() == b"x"
        assert not (tmp_path / "c4" / "secret").exists()
    assert "Traceback" not in donor.stderr
