"""The password never shows: not in the output of a clone that succeeds or fails (with
and without -v, with and without --json), not in the donor's log, not in a status file,
and not in the environment or the command line of any process the pull starts.

A distinctive password is planted through ``CLONE_AGENT_PASSWORD`` or
``--password-stdin``, and every place is searched for it. The pull's own
``/proc/<pid>/environ`` is not searched: it is the environment the test gave it at its
start, which the kernel keeps whatever the process does later (removing the variable
from ``os.environ`` does not rewrite it). What matters is that nothing the pull starts
inherits it.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers import CLI, ROOT, Donor, free_port, run_cli

#: Plain letters and digits: written the same way in text, JSON and a repr.
PASSWORD = "pw4test" + secrets.token_hex(12)


def _password_input(how: str) -> tuple[list[str], dict[str, str], str | None]:
    """(extra pull arguments, extra environment, stdin) for each way of giving it."""
    if how == "env":
        return [], {"CLONE_AGENT_PASSWORD": PASSWORD}, None
    return ["--password-stdin"], {}, PASSWORD + "\n"


def _files(root: Path) -> Iterator[Path]:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            yield Path(dirpath, name)


def _assert_not_in_files(root: Path) -> int:
    """Search every file under ``root``; how many there were."""
    count = 0
    for path in _files(root):
        assert PASSWORD.encode() not in path.read_bytes(), f"password in {path}"
        count += 1
    return count


def _assert_not_in(where: str, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    assert PASSWORD.encode() not in data, f"password in {where}"


def _state_dir() -> Path:
    return Path(os.environ["CLONE_AGENT_STATE_DIR"])  # set for each test by conftest.py


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("secrets") / "small"
    (src / "sub").mkdir(parents=True)
    (src / "one.bin").write_bytes(os.urandom(1 << 20))
    for i in range(20):
        (src / "sub" / f"f{i}").write_bytes(os.urandom(i * 1000))
    return src


@pytest.mark.parametrize("how,extra", [
    ("env", []), ("env", ["-v"]), ("stdin", ["-v", "--json"]), ("stdin", []),
])
def test_a_succeeding_clone_shows_no_password(small: Path, tmp_path: Path, how: str,
                                              extra: list[str]) -> None:
    args, env, stdin = _password_input(how)
    dest = tmp_path / "clone"
    with Donor(small, "-v") as donor:
        res = run_cli("pull", f"u@{donor.address}", "--data-dir", str(dest), *args, *extra,
                      env=env, input=stdin)
    assert res.returncode == 0, res.stderr
    _assert_not_in("the pull's stdout", res.stdout)
    _assert_not_in("the pull's stderr", res.stderr)
    _assert_not_in("the donor's log", donor.stderr)
    assert _assert_not_in_files(dest / "#clone") >= 2  # clone_status and clone_progress
    assert _assert_not_in_files(_state_dir()) >= 1
    status = run_cli("status", str(dest), "--json")
    assert status.returncode == 0
    _assert_not_in("status --json", status.stdout)


@pytest.mark.parametrize("how,extra", [
    ("env", []), ("env", ["-v"]), ("stdin", ["-v", "--json"]), ("stdin", []),
])
def test_a_failing_clone_shows_no_password(tmp_path: Path, how: str,
                                           extra: list[str]) -> None:
    args, env, stdin = _password_input(how)
    exists = tmp_path / "exists"
    exists.mkdir()
    res = run_cli("pull", f"u@127.0.0.1:{free_port()}", "--data-dir", str(exists), *args,
                  *extra, env=env, input=stdin)
    assert res.returncode == 3 and "ERROR 1007 (HY000)" in res.stderr
    _assert_not_in("stdout (1007)", res.stdout)
    _assert_not_in("stderr (1007)", res.stderr)
    dest = tmp_path / "c"
    res = run_cli("pull", f"u@127.0.0.1:{free_port()}", "--data-dir", str(dest), *args,
                  *extra, env=env, input=stdin)
    assert res.returncode == 5 and "ERROR 3862 (HY000)" in res.stderr
    _assert_not_in("stdout (3862)", res.stdout)
    _assert_not_in("stderr (3862)", res.stderr)
    assert not dest.exists()
    assert _assert_not_in_files(_state_dir()) >= 1  # the failed clone's record


@pytest.mark.parametrize("how", ["env", "stdin"])
def test_a_password_that_is_not_utf8_is_refused_unseen(small: Path, tmp_path: Path,
                                                       how: str) -> None:
    """Bytes that are not UTF-8 reach Python as surrogates, which the protocol cannot
    encode: refused before anything starts (it was an unexpected TypeError deep in the
    clone, with the password among the local variables of its frames)."""
    dest = tmp_path / "c"
    env = {**os.environ}
    stdin = b""
    args: list[str] = []
    if how == "env":
        env["CLONE_AGENT_PASSWORD"] = PASSWORD + "\udcff"  # the byte 0xff, as os.environ keeps it
    else:
        args = ["--password-stdin"]
        stdin = PASSWORD.encode() + b"\xff\n"
    with Donor(small) as donor:
        res = subprocess.run([*CLI, "pull", f"u@{donor.address}", "--data-dir", str(dest),
                              "-v", *args], input=stdin, capture_output=True, cwd=ROOT,
                             env=env, timeout=120)
    assert res.returncode == 2
    assert res.stderr.decode().splitlines()[-2:] == [
        "ERROR 8001 (HY000): the password is not valid UTF-8",
        "hint: the password travels as UTF-8 text"]
    _assert_not_in("stdout", res.stdout)
    _assert_not_in("stderr", res.stderr)
    _assert_not_in("the donor's log", donor.stderr)
    assert not dest.exists()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _read_proc(pid: int, name: str) -> bytes | None:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as fh:
            return fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None  # it ended between the listing and the read


@pytest.mark.parametrize("how,extra", [("env", ["-v"]), ("stdin", [])])
def test_no_process_of_the_pull_holds_the_password(tmp_path: Path, how: str,
                                                   extra: list[str]) -> None:
    """A throttled pull (2 MiB/s over 16 MiB) is watched while it runs: the environment
    and command line of every process below it, until data flows into the destination
    and its workers have been seen; then SIGTERM ends it (ERROR 1317), and its output
    and status record are searched too."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(16 << 20))
    dest = tmp_path / "c"
    args, env, stdin = _password_input(how)
    seen: set[int] = set()
    stdin_file = tmp_path / "stdin"  # the test's own, outside every place searched
    stdin_file.write_text(stdin or "")
    with Donor(src) as donor, open(stdin_file, "rb") as stdin_fh:
        proc = subprocess.Popen(
            [*CLI, "pull", f"u@{donor.address}", "--data-dir", str(dest),
             "--max-data-bandwidth", "2", *args, *extra],
            stdin=stdin_fh, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=ROOT, env={**os.environ, **env})
        try:
            _assert_not_in("the pull's command line", _read_proc(proc.pid, "cmdline") or b"")
            flowing = False
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                for child in _descendants(proc.pid):
                    for name in ("environ", "cmdline"):
                        data = _read_proc(child.pid, name)
                        if data is not None:
                            _assert_not_in(f"/proc/{child.pid}/{name} "
                                           f"({' '.join(child.cmdline())[:80]})", data)
                            seen.add(child.pid)
                if flowing and len(seen) >= 2:
                    break  # data flows, and the workers have been looked at once since
                flowing = (dest / "big").exists()
                time.sleep(0.02)  # polling the running pull; bounded by the deadline
            assert flowing and len(seen) >= 2, (flowing, seen)
            assert proc.poll() is None, "the pull ended before it was watched"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate(timeout=10)
    assert proc.returncode == 143, err  # 1317 by SIGTERM
    assert "ERROR 1317 (70100): Query execution was interrupted" in err.decode()
    _assert_not_in("the pull's stdout", out)
    _assert_not_in("the pull's stderr", err)
    assert not dest.exists()
    assert _assert_not_in_files(_state_dir()) >= 1
