"""``clone-agent status`` in real processes: the list of recent clones, the exit status
of a failed clone, the XDG state directory, and ``--watch`` redrawing in place on a
terminal (a pseudo-terminal the test holds)."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
from pathlib import Path

from engine.errors import StageCrashed
from engine.status import StatusBook
from tests.helpers import CLI, ROOT, free_port, run_cli


def _failed_clone(dest: Path, env: dict[str, str] | None = None) -> None:
    res = run_cli("pull", f"u@127.0.0.1:{free_port()}", "--data-dir", str(dest), env=env)
    assert res.returncode == 5, res.stderr


def test_a_failed_clone_exits_1_and_the_list_shows_it(tmp_path: Path) -> None:
    _failed_clone(tmp_path / "a")
    _failed_clone(tmp_path / "b")
    res = run_cli("status", str(tmp_path / "a"))
    assert res.returncode == 1 and "Failed" in res.stdout
    res = run_cli("status", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert {r["destination"] for r in rows} == {str(tmp_path / "a"), str(tmp_path / "b")}
    assert all(r["state"] == "Failed" and r["error_no"] == 3862 for r in rows)
    res = run_cli("status")
    assert res.returncode == 0 and str(tmp_path / "b") in res.stdout
    assert res.stdout.splitlines()[0].split()[:3] == ["STATE", "BEGIN", "ERROR"]
    res = run_cli("status", str(tmp_path / "never"))
    assert res.returncode == 1 and "ERROR 8007" in res.stderr


def test_the_state_directory_follows_xdg(tmp_path: Path) -> None:
    env = dict(os.environ)
    env.pop("CLONE_AGENT_STATE_DIR")
    env["XDG_STATE_HOME"] = str(tmp_path / "xdg")
    res = subprocess.run([*CLI, "pull", f"u@127.0.0.1:{free_port()}", "--data-dir",
                          str(tmp_path / "c")], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=60)
    assert res.returncode == 5, res.stderr
    assert len(list((tmp_path / "xdg" / "clone-agent").glob("clone-*.json"))) == 1
    env["CLONE_AGENT_STATE_DIR"] = str(tmp_path / "mine")  # ours still wins
    res = subprocess.run([*CLI, "status", "--json"], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=60)
    assert json.loads(res.stdout) == []


def test_watch_redraws_in_place_on_a_terminal(tmp_path: Path) -> None:
    dest = tmp_path / "d"
    dest.mkdir()
    book = StatusBook("h:1", str(dest))  # a running clone: this process is its owner
    book.attach(str(dest))
    book.begin()
    book.begin_stage("FILE COPY", estimate=1 << 20)
    main, sub = pty.openpty()
    proc = subprocess.Popen([*CLI, "status", str(dest), "--watch"], stdin=subprocess.DEVNULL,
                            stdout=sub, stderr=subprocess.PIPE, cwd=ROOT)
    os.close(sub)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while seen.count(b"STAGE") < 2 and time.monotonic() < deadline:
            if select.select([main], [], [], 0.2)[0]:
                seen += os.read(main, 65536)
        assert seen.count(b"STAGE") >= 2, seen
        book.end_stage("FILE COPY")
        book.complete()
        assert proc.wait(timeout=30) == 0
        while select.select([main], [], [], 0.2)[0]:
            try:
                seen += os.read(main, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
        os.close(main)
    assert b"\x1b[" in seen and b"F\x1b[J" in seen  # cursor up, erase below: in place
    text = seen.decode()
    assert "error_no: 0" in text and "1317" not in text  # running: no error shown
    assert "Completed" in text


def test_watch_elsewhere_prints_one_block_after_another(tmp_path: Path) -> None:
    dest = tmp_path / "d"
    dest.mkdir()
    book = StatusBook("h:1", str(dest))
    book.attach(str(dest))
    book.begin()
    book.begin_stage("FILE COPY", estimate=1 << 20)
    proc = subprocess.Popen([*CLI, "status", str(dest), "--watch"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        blocks = 0
        deadline = time.monotonic() + 30
        while blocks < 2 and time.monotonic() < deadline:
            if proc.stdout.readline().startswith("STAGE"):
                blocks += 1
        book.end_stage("FILE COPY")
        book.fail(StageCrashed("writer 0", "gone"))
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1  # it ended Failed
    assert "\x1b[" not in out and "Failed" in out
    res = run_cli("status", "--watch")
    assert res.returncode == 2 and "ERROR 8001" in res.stderr
