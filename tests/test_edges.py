"""Trees and failures at the edges of a clone: a tree with no byte of data to send,
and a reader of the donor that dies in the middle of a clone."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import CLI, ROOT, Donor, describe_faithful, run_cli


def _no_data(root: Path, case: str) -> None:
    root.mkdir()
    if case == "files":
        (root / "empty").touch()
        (root / "d" / "e").mkdir(parents=True)
        (root / "d" / "e" / "also empty").touch()
    elif case == "link":
        os.symlink("nowhere", root / "dangling")


@pytest.mark.parametrize("case", ["nothing", "files", "link"])
@pytest.mark.parametrize("how", ["clone-local", "pull"])
def test_a_tree_without_a_byte_of_data_clones(tmp_path: Path, case: str, how: str) -> None:
    """No block to send: the donor's COMPLETE must wait until the recipient has read
    the manifest and asked for data (it once came in the place of the first FILES
    page, and every such clone failed with 3863)."""
    src, dest = tmp_path / "src", tmp_path / "copy"
    _no_data(src, case)
    expected = describe_faithful(src)  # before the clone: its scan reads the atimes
    if how == "clone-local":
        res = run_cli("clone-local", str(src), "--data-dir", str(dest))
    else:
        with Donor(src) as donor:
            res = run_cli("pull", f"u@{donor.address}", "--data-dir", str(dest),
                          "--require-no-ssl")
    assert res.returncode == 0, res.stderr
    assert describe_faithful(dest) == expected


def _readers(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True)
            if p.name().startswith("ca-reader")]


def test_serve_outlives_a_reader_killed_in_the_middle_of_a_clone(tmp_path: Path) -> None:
    """The clone fails with the reader's error; serve restarts its readers and serves
    the next clone (it once ended with an error of its own while telling the dead
    reader to drop the clone's reads)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(64 << 20))
    with Donor(src) as donor:
        assert donor.proc is not None
        before = {p.pid for p in _readers(donor.proc.pid)}
        assert len(before) == 2
        # 16 MiB/s: about four seconds of FILE COPY to kill a reader in
        pull = subprocess.Popen(
            [*CLI, "pull", f"u@{donor.address}", "--data-dir", str(tmp_path / "one"),
             "--require-no-ssl"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "CLONE_AGENT_MAX_DATA_BANDWIDTH": "16"})
        deadline = time.monotonic() + 30
        big = tmp_path / "one" / "big"
        while not (big.exists() and big.stat().st_blocks) and time.monotonic() < deadline:
            assert pull.poll() is None, pull.communicate()
            time.sleep(0.05)  # polling the destination for the first bytes, bounded
        os.kill(min(before), signal.SIGKILL)
        _, err = pull.communicate(timeout=60)
        assert pull.returncode != 0 and "Traceback" not in err
        assert "ERROR" in err
        assert donor.proc.poll() is None, "serve ended with its reader"
        res = run_cli("pull", f"u@{donor.address}", "--data-dir", str(tmp_path / "two"),
                      "--require-no-ssl")
        assert res.returncode == 0, res.stderr
        assert (tmp_path / "two" / "big").read_bytes() == (src / "big").read_bytes()
        after = {p.pid for p in _readers(donor.proc.pid)}
        assert len(after) == 2 and not after & before  # a new pool
