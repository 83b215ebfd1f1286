"""Failure paths a new user meets: each ends in MySQL's error form with its hint, no
traceback, no secret in any output, and nothing of the clone left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lz4.block
import pytest

from engine.codec import COMP_LZ4, checksum
from tests.helpers import Donor, run_cli, small_tmpfs
from tests.test_hostile import GOOD, FakeDonor, _block, assert_refused, pull_from

SECRET = "pl4nted-Secret-9f3a"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_a_disk_that_fills_up_with_small_files(tmp_path: Path) -> None:
    """Small files are not preallocated: the disk fills while writers write. The error
    is the writer's, with its hint; the status, which cannot be written under the full
    destination, is in the state directory; nothing of the clone stays."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    chunk = os.urandom(48 << 10)
    for i in range(600):  # 28 MiB of small files into 16 MiB
        (src / "d" / f"f{i:04}").write_bytes(chunk)
    with small_tmpfs(tmp_path / "small", "16m") as small:
        dest = small / "clone"
        with Donor(src) as donor:
            res = run_cli("pull", f"u@{donor.address}", "--data-dir", str(dest),
                          env={"CLONE_AGENT_PASSWORD": SECRET})
        assert res.returncode == 1, res.stderr
        assert "\nERROR 8002 (HY000): File operation failed: writing '" in "\n" + res.stderr, \
            res.stderr[-2000:]
        assert "No space left on device" in res.stderr
        assert "hint: the file system is full" in res.stderr
        assert "Traceback" not in res.stderr and SECRET not in res.stderr + res.stdout
        assert not dest.exists()
        assert os.listdir(small) == []
        status = run_cli("status", str(dest), "--json")
        view = json.loads(status.stdout)["clone_status"]
        assert view["state"] == "Failed" and view["error_no"] == 8002


def test_a_block_that_does_not_decompress_is_the_donors_fault(tmp_path: Path) -> None:
    garbage = b"\xff" * 64
    desc, data = _block(0, [[0, 0, 4]], garbage, comp=COMP_LZ4, raw=4, len=len(garbage),
                        xxh=checksum(garbage))
    dest = tmp_path / "work" / "dest"
    dest.parent.mkdir()
    res = pull_from(FakeDonor(GOOD, [(desc, data)]), dest)
    assert_refused(res, dest)
    assert "does not decompress" in res.stderr


def test_a_real_compressed_block_still_decompresses() -> None:
    """The control for the test above: lz4 itself is fine with a real block."""
    raw = b"abcd" * 1000
    assert lz4.block.decompress(lz4.block.compress(raw, store_size=False),
                                uncompressed_size=len(raw)) == raw
