"""The donor's scan: the top's entry, hard links, owners named once, reserved names,
paths longer than one system call."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from donor.reader import LATEST_NS
from donor.walk import scan
from tests.helpers import run_cli


def test_the_scan_lists_what_a_faithful_copy_needs(tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"data")
    os.link(root / "d" / "f", root / "g")
    os.symlink("d/f", root / "l")
    os.mkfifo(root / "p")
    (root / "#clone").mkdir()
    tree = scan(str(root))
    by_rel = {e.rel: e for e in tree.entries}
    assert tree.entries[0].rel == "." and tree.entries[0].kind == "d"
    assert [e.rel for e in tree.entries[1:]] == ["d", "g", "l", "p", "d/f"]
    # "g" comes first in the walk: the data travel under it, "d/f" is another name
    assert by_rel["g"].kind == "f" and by_rel["d/f"].kind == "h"
    assert by_rel["d/f"].link == by_rel["g"].id
    assert by_rel["l"].target == "d/f" and by_rel["p"].kind == "p"
    named = [n for e in tree.entries for n in e.names]
    assert len(named) == len(set(named))  # each id named once
    assert [(n.kind, n.path) for n in tree.notes] == [("reserved", "#clone")]
    assert by_rel["g"].to_wire()["u"] == os.getuid()


def test_paths_longer_than_path_max_are_scanned(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(20):  # 20 x 256 bytes
            os.mkdir("n" * 255, dir_fd=fd)
            nfd = os.open("n" * 255, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
    finally:
        os.close(fd)
    tree = scan(str(tmp_path))
    deepest = tree.entries[-1]
    assert deepest.rel.endswith("/f") and len(deepest.rel) > 5000
    assert tree.page_entries(2000) < 2000  # long names: fewer entries a FILES page


def _far_future(path: Path) -> None:
    """An mtime past 2262 (ext4 holds times up to 2446); skips where it cannot be set."""
    try:
        os.utime(path, ns=(0, (1 << 63) + 10**18))
    except (OSError, OverflowError) as exc:
        pytest.skip(f"this file system keeps no time past 2262: {exc}")
    if os.lstat(path).st_mtime_ns <= LATEST_NS:
        pytest.skip("this file system keeps no time past 2262")


def test_a_time_past_2262_is_carried_as_the_latest_with_a_warning(tmp_path: Path) -> None:
    """A time no signed 64-bit count of nanoseconds holds: the latest one instead, and
    a warning; never a donor that dies of it."""
    root = tmp_path / "t"
    root.mkdir()
    (root / "future").write_bytes(b"x" * 10)
    _far_future(root / "future")
    tree = scan(str(root))
    entry = next(e for e in tree.entries if e.rel == "future")
    assert entry.mtime_ns == LATEST_NS and entry.atime_ns == 0
    assert [(n.kind, n.path) for n in tree.notes] == [("time", "future")]


def test_a_clone_of_a_file_past_2262_completes_and_says_so(tmp_path: Path) -> None:
    """End to end: the readers' change check agrees with the scan (the file is not
    'changed' at every pass), and the warning reaches the recipient's status."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    (src / "future").write_bytes(os.urandom(5000))
    _far_future(src / "future")
    res = run_cli("clone-local", str(src), "--data-dir", str(dest), "--json")
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout.splitlines()[-1])["clone_status"]
    assert [(w["kind"], w["path"]) for w in status["warnings"]] == [("time", "future")]
    assert (dest / "future").read_bytes() == (src / "future").read_bytes()
    assert os.lstat(dest / "future").st_mtime_ns == LATEST_NS
