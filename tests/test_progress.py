"""The progress a person reads: binary units, percent, a smoothed ETA that does not jump
(on a virtual clock), and the same fields in --json events of a real clone."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

from clone_agent.progress import Eta, Reporter, duration, human, percent, summary_line
from tests.helpers import Donor, run_cli


def test_binary_units_and_durations() -> None:
    assert human(512) == "512 B"
    assert human(1536) == "1.5 KiB"
    assert human(100 << 20) == "100.0 MiB"
    assert human(3 << 30) == "3.0 GiB"
    assert duration(None) == "-" and duration(42.4) == "42 s"
    assert duration(185) == "3 min 05 s" and duration(3720) == "1 h 02 min"
    assert percent(1, 4) == 25.0 and percent(5, 0) is None and percent(9, 4) == 100.0


def test_the_eta_is_honest_and_does_not_jump() -> None:
    total = 1000 << 20
    eta = Eta(0.0)
    assert eta.left(0.0, 0, total) is None  # no guess before there is data
    done, t = 0, 0.0
    for _ in range(20):  # 10 s at 50 MiB/s
        t += 0.5
        done += 25 << 20
        eta.sample(t, done)
    left = eta.left(t, done, total)
    assert left is not None and abs(left - (total - done) / (50 << 20)) < 0.5
    t += 1.0  # a one-second stall
    eta.sample(t, done)
    stalled = eta.left(t, done, total)
    assert stalled is not None and stalled < left * 1.4, (left, stalled)
    assert eta.left(t, total, total) == 0.0


def test_plain_lines_carry_percent_elapsed_and_eta() -> None:
    err = io.StringIO()
    rep = Reporter(False, err=err)
    rep({"event": "stage", "stage": "FILE COPY", "state": "In Progress", "estimate": 4 << 20,
         "data": 0})
    rep({"event": "progress", "stage": "FILE COPY", "estimate": 4 << 20, "data": 1 << 20,
         "data_speed": 1 << 20, "threads": 2})
    rep({"event": "stage", "stage": "FILE COPY", "state": "Completed", "estimate": 4 << 20,
         "data": 4 << 20, "data_speed": 1 << 20, "begin_time": "2026-01-01T00:00:00+00:00",
         "end_time": "2026-01-01T00:00:04+00:00"})
    lines = err.getvalue().splitlines()
    assert lines[0] == "FILE COPY: started, estimate 4.0 MiB"
    assert re.match(r"FILE COPY:  25\.0%  1\.0 MiB of 4\.0 MiB  1\.0 MiB/s  elapsed 0 s  "
                    r"ETA - {2}streams 2$", lines[1]), lines[1]
    assert lines[2] == "FILE COPY: Completed  4.0 MiB in 4.0 s (1.0 MiB/s)"
    assert lines[3].startswith("overall: 100.0%  4.0 MiB of 4.0 MiB  elapsed")


def test_the_summary_line() -> None:
    summary = {"clone_status": {"begin_time": "2026-01-01T00:00:00+00:00",
                                "end_time": "2026-01-01T00:00:02+00:00"},
               "clone_progress": [{"stage": "FILE COPY", "data": 3 << 30},
                                  {"stage": "FILE SYNC", "data": 3 << 30}]}
    assert summary_line(summary) == "3.0 GiB in 2.0 s (1.5 GiB/s)"


def test_a_real_clone_reports_percent_and_eta(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}").write_bytes(os.urandom(8 << 20))
    with Donor(src) as donor:
        res = run_cli("pull", f"u@{donor.address}", "--data-dir", str(tmp_path / "j"),
                      "--json", "--max-data-bandwidth", "12")
        assert res.returncode == 0, res.stderr
        plain = run_cli("pull", f"u@{donor.address}", "--data-dir", str(tmp_path / "p"),
                        "--max-data-bandwidth", "12")
        assert plain.returncode == 0, plain.stderr
    events = [json.loads(line) for line in res.stdout.splitlines()]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress, "a clone of about 2.7 s reports progress"
    for e in progress:
        assert 0 <= e["percent"] <= 100 and e["elapsed"] >= 0
        assert e["eta"] is None or e["eta"] >= 0
    done = [e for e in events if e["event"] == "stage" and e["stage"] == "FILE COPY"
            and e["state"] == "Completed"]
    assert done and done[0]["percent"] == 100.0 and done[0]["eta"] == 0.0
    assert re.search(r"FILE COPY: +\d+\.\d%  .* MiB of 32\.0 MiB .*elapsed .* ETA ",
                     plain.stderr), plain.stderr
    assert re.search(r"\n32\.0 MiB in \d+\.\d s \(\d+\.\d MiB/s\)\n$", plain.stderr), \
        plain.stderr


def test_a_terminal_gets_a_row_per_stage_and_an_overall_one(tmp_path: Path) -> None:
    import pty
    import select
    import subprocess

    from tests.helpers import CLI, ROOT

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(4 << 20))
    with Donor(src) as donor:
        main, sub = pty.openpty()
        proc = subprocess.Popen([*CLI, "pull", f"u@{donor.address}", "--data-dir",
                                 str(tmp_path / "c")], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=sub, cwd=ROOT,
                                env={**os.environ, "COLUMNS": "120"})
        os.close(sub)
        seen = b""
        try:
            while True:  # until the pull closes its end of the terminal
                if select.select([main], [], [], 30)[0]:
                    try:
                        chunk = os.read(main, 65536)
                    except OSError:  # EIO: closed
                        break
                    if not chunk:
                        break
                    seen += chunk
                elif proc.poll() is not None:
                    break
            assert proc.wait(timeout=60) == 0, seen
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(main)
    text = seen.decode(errors="replace")
    for row in ("DROP DATA", "FILE COPY", "FILE SYNC", "overall"):
        assert row in text, text
    assert "4.0 MiB" in text and "100.0%" in text and "MB/s" not in text
    assert re.search(r"4\.0 MiB in \d+\.\d s \(\d+\.\d [KMG]iB/s\)", text), text


def test_the_live_display_on_a_terminal_shows_an_eta(tmp_path: Path) -> None:
    """A pull whose stderr is a terminal (a pseudo-terminal here) draws one row per
    stage and an overall one, with an ETA once there is a rate to go by."""
    import pty
    import select
    import subprocess
    import time

    from tests.helpers import CLI, ROOT, Donor

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(12 << 20))
    master, slave = pty.openpty()
    out = b""
    with Donor(src) as donor:
        proc = subprocess.Popen([*CLI, "pull", f"u@{donor.address}", "--data-dir",
                                 str(tmp_path / "c"), "--max-data-bandwidth", "4"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=slave, cwd=ROOT)
        os.close(slave)
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.5)
                if ready:
                    try:
                        chunk = os.read(master, 65536)
                    except OSError:  # the terminal's other end closed: the pull is done
                        break
                    if not chunk:
                        break
                    out += chunk
                elif proc.poll() is not None:
                    break
        finally:
            os.close(master)
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))
    assert proc.returncode == 0, text[-2000:]
    assert re.search(r"FILE COPY .*ETA \d", text), text[-2000:]
    assert "overall" in text and "elapsed" in text
