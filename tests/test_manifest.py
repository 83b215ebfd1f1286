"""The recipient's manifest: what it creates before data arrives, and a disk too small."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from donor.plan import scan
from engine import messages as M
from recipient.manifest import PREALLOCATE_MIN, Manifest
from tests.helpers import Donor, allocated, run_cli, small_tmpfs


def _donor_tree(root: Path) -> None:
    root.mkdir()
    (root / "dense.ibd").write_bytes(os.urandom(3 * PREALLOCATE_MIN))
    with open(root / "holes.ibd", "wb") as f:
        f.truncate(16 * PREALLOCATE_MIN)
        f.seek(5 * PREALLOCATE_MIN)
        f.write(b"data in the middle")
    (root / "small.frm").write_bytes(os.urandom(10_000))


def test_big_dense_files_are_preallocated_before_any_data(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _donor_tree(src)
    entries = scan(str(src)).entries
    wire = {e.rel: e.to_wire() for e in entries}
    assert wire["dense.ibd"].get("dn") == 1 and wire["small.frm"].get("dn") == 1
    assert "dn" not in wire["holes.ibd"]  # a file with holes stays sparse on the recipient

    dest = tmp_path / "dest"
    dest.mkdir()
    manifest = Manifest(str(dest), len(entries))
    manifest.add_page(M.FilesPage(0, list(wire.values()), True))
    manifest.close()
    # the dense big file exists at its full size, its blocks allocated (reading zeros)
    assert os.path.getsize(dest / "dense.ibd") == 3 * PREALLOCATE_MIN
    assert allocated(dest / "dense.ibd") >= 3 * PREALLOCATE_MIN
    # a file with holes and a small file are left to the writers
    assert not (dest / "holes.ibd").exists()
    assert not (dest / "small.frm").exists()


def test_a_hostile_dense_flag_never_preallocates_more_than_the_size(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    manifest = Manifest(str(dest), 2)
    manifest.add_page(M.FilesPage.from_body({"page": 0, "last": True, "entries": [
        {"id": 0, "t": "f", "p": "a", "s": PREALLOCATE_MIN, "m": 0o644, "mt": 0, "dn": "yes"},
        {"id": 1, "t": "f", "p": "b", "s": PREALLOCATE_MIN, "m": 0o644, "mt": 0, "dn": 1}]}))
    manifest.close()
    assert not (dest / "a").exists()  # only the value 1 asks for it
    assert os.path.getsize(dest / "b") == PREALLOCATE_MIN


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_a_clone_bigger_than_the_disk_fails_before_its_data(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.ibd").write_bytes(os.urandom(12 << 20))
    with small_tmpfs(tmp_path / "small", "8m") as small:
        dest = small / "clone"
        with Donor(src) as donor:
            res = run_cli("pull", f"u@{donor.address}", "--data-dir", str(dest), "--json")
        assert res.returncode != 0
        assert "No space left on device" in res.stderr and "Traceback" not in res.stderr
        assert res.stderr.startswith("ERROR 8002 (HY000): ")
        assert "hint: the file system is full" in res.stderr
        assert not dest.exists()  # nothing half-written is left
        events = [line for line in res.stdout.splitlines() if '"data"' in line]
        assert all('"data":0,' in line or '"data": 0,' in line for line in events)
