import os

import pytest

from engine.errors import UnsafeName
from engine.fsutil import check_relpath, remove_tree, write_durable


@pytest.mark.parametrize("name", [
    "a", "a/b/c", "with space/ñame.txt", "#x", "a/#clone", ".hidden", "..a", "a..",
])
def test_safe_names(name: str) -> None:
    assert check_relpath(name) == name


@pytest.mark.parametrize("name", [
    "", "/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a/", "a\x00b", "#clone/x",
    "x" * 300, "/".join(["d"] * 300), 5, None,
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
