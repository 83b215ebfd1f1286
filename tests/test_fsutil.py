import os

import pytest

from engine.errors import UnsafeName
from engine.fsutil import (
    MAX_DEPTH,
    check_relpath,
    mkdir_at,
    open_at,
    parent_at,
    remove_tree,
    write_durable,
)


@pytest.mark.parametrize("name", [
    "a", "a/b/c", "with space/ñame.txt", "#x", "a/#clone", ".hidden", "..a", "a..",
    "/".join(["d"] * 300), "/".join(["x" * 255] * 40),  # real trees: deep, long paths
])
def test_safe_names(name: str) -> None:
    assert check_relpath(name) == name


@pytest.mark.parametrize("name", [
    "", "/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a/", "a\x00b", "#clone/x",
    "x" * 300, "/".join(["d"] * (MAX_DEPTH + 1)), "/".join(["x" * 255] * 4200), 5, None,
])
def test_unsafe_names(name: object) -> None:
    with pytest.raises(UnsafeName):
        check_relpath(name)


def test_write_durable_replaces(tmp_path) -> None:
    p = tmp_path / "f"
    write_durable(str(p), b"one")
    write_durable(str(p), b"two")
    assert p.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f"]


def test_remove_tree_does_not_follow_links(tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    tree = tmp_path / "tree"
    (tree / "ro").mkdir(parents=True)
    (tree / "ro" / "f").write_text("x")
    os.chmod(tree / "ro", 0o500)
    os.symlink(outside, tree / "link")
    remove_tree(str(tree))
    assert not tree.exists() and (outside / "keep").exists()


def test_paths_longer_than_one_system_call_are_walked_in_pieces(tmp_path) -> None:
    """A tree whose paths exceed PATH_MAX: made, opened and found again beneath a
    descriptor, whatever the length."""
    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        rel = ""
        for _ in range(40):  # 40 x 256 bytes: past 10 KiB
            rel = f"{rel}/{'n' * 255}" if rel else "n" * 255
            mkdir_at(root, rel, 0o700)
        fd = open_at(root, rel + "/f", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"deep")
        os.close(fd)
        dfd, name, owned = parent_at(root, rel + "/f", split=True)
        assert owned and name == "f" and os.stat(name, dir_fd=dfd).st_size == 4
        os.close(dfd)
        assert parent_at(root, "a/b") == (root, "a/b", False)  # short: the kernel's walk
    finally:
        os.close(root)
