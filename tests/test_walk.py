"""The donor's scan: the top's entry, hard links, owners named once, reserved names,
paths longer than one system call."""

from __future__ import annotations

import os
from pathlib import Path

from donor.walk import scan


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
