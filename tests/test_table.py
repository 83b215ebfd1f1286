"""The manifest column by column (engine/table.py): every field of every entry comes
back as it went in, and the recipient refuses a manifest out of the scan's order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from donor.plan import scan
from engine import messages as M
from engine.errors import ProtocolError, UnsafeName
from engine.table import Table
from recipient.manifest import Manifest

_entries = st.builds(
    lambda kind, rel, size, mode, mtime, uid, gid, atime, ctime, dense, target, rdev, link,
    xattrs, acl, names: M.Entry(0, kind, rel, size, mode, mtime, target, dense, uid, gid,
                                atime, rdev, link, xattrs, acl, b"", names, "", ctime),
    st.sampled_from(M.ENTRY_KINDS), st.text(min_size=1, max_size=40),
    st.integers(0, 1 << 48), st.integers(0, 0o7777), st.integers(-(1 << 63), (1 << 63) - 1),
    st.integers(-1, 0xFFFFFFFE), st.integers(-1, 0xFFFFFFFE),
    st.none() | st.integers(-(1 << 63), (1 << 63) - 1), st.integers(0, 1 << 62),
    st.booleans(), st.text(max_size=10), st.integers(0, (1 << 64) - 1), st.integers(-1, 99),
    st.lists(st.tuples(st.text(max_size=8), st.binary(max_size=8)), max_size=2).map(tuple),
    st.binary(max_size=12),
    st.lists(st.tuples(st.sampled_from("ug"), st.integers(0, 99), st.text(max_size=5)),
             max_size=2).map(tuple))


@settings(max_examples=300, deadline=None)
@given(st.lists(_entries, max_size=8))
def test_every_field_comes_back_as_it_went_in(entries: list[M.Entry]) -> None:
    """Any name (lone surrogates too), any time an int64 holds, ids not said (-1)."""
    table = Table()
    made = []
    for i, e in enumerate(entries):
        e.id = i
        table.add(e)
        made.append(e)
    assert len(table) == len(made)
    assert table[:] == made and list(table) == made
    # what the donor sends, from the columns, is what each Entry would send
    assert table.wire(0, len(made) + 3) == [e.to_wire() for e in made]
    assert table.wire(1, 2) == [e.to_wire() for e in made[1:2]]
    for e in made:
        assert table.get(e.id) == e and table.rel(e.id) == e.rel


def test_a_scan_kept_in_columns_gives_back_its_entries_and_paths(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x" * 5000)
    os.symlink("d/f", tmp_path / "l")
    os.link(tmp_path / "d" / "f", tmp_path / "hard")
    os.setxattr(tmp_path / "d" / "f", "user.k", b"v")
    table = scan(str(tmp_path)).entries
    by_rel = {e.rel: e for e in table}
    assert by_rel["."].path == str(tmp_path)
    assert by_rel["d/f"].path == f"{tmp_path}/d/f"
    assert by_rel["hard"].size == 5000 and by_rel["hard"].dense
    assert by_rel["hard"].xattrs == (("user.k", b"v"),)
    assert by_rel["l"].target == "d/f" and by_rel["l"].kind == "l"
    assert by_rel["hard"].kind == "f" and by_rel["d/f"].kind == "h"  # "d/f" comes after
    assert by_rel["d/f"].link == by_rel["hard"].id
    assert table.count("f") == 1 and table.file_bytes() == 5000
    # a changed entry is written back; its name and type never change
    table[by_rel["hard"].id] = M.Entry(by_rel["hard"].id, "f", "hard", 7, 0o600, 5)
    assert table[by_rel["hard"].id].size == 7 and table.file_bytes() == 7
    with pytest.raises(ValueError):
        table[0] = M.Entry(0, "f", ".", 1, 0o600, 0)


def test_a_dropped_entry_keeps_its_id_and_is_skipped() -> None:
    table = Table()
    for i, rel in enumerate(("a", "b", "c")):
        table.add(M.Entry(i, "f", rel, 10 * (i + 1), 0o644, 0))
    table.drop(1)
    assert 1 not in table and table.get(1) is None
    assert [e.rel for e in table] == ["a", "c"] and table.file_bytes() == 40
    assert table.count("f") == 2 and len(table) == 3


def _page(*rels: str, ids: list[int] | None = None) -> M.FilesPage:
    wire = []
    for i, rel in enumerate(rels):
        kind = "d" if rel.endswith("/") else "f"
        wire.append(M.Entry((ids or list(range(len(rels))))[i], kind, rel.rstrip("/"), 1,
                            0o755, 0).to_wire())
    return M.FilesPage(0, wire, True)


@pytest.mark.parametrize(("rels", "ids", "error", "words"), [
    (("a", "a"), None, UnsafeName, "listed twice"),
    (("b", "a"), None, UnsafeName, "out of order"),
    (("d/", "e/", "d/x", "e/y", "d/z"), None, UnsafeName, "apart from the rest"),
    (("x/y",), None, UnsafeName, "not inside a directory"),
    (("a", "b"), [0, 0], ProtocolError, "listed twice"),
    (("a", "b"), [0, 5], ProtocolError, "where 1 was due"),
])
def test_a_manifest_out_of_the_scans_order_is_refused(
        tmp_path: Path, rels: tuple[str, ...], ids: list[int] | None,
        error: type[Exception], words: str) -> None:
    """Each directory's children come together and sorted, ids in order: a name twice
    cannot hide, without a set of every name on the recipient."""
    manifest = Manifest(str(tmp_path), len(rels))
    try:
        with pytest.raises(error, match=words):
            manifest.add_page(_page(*rels, ids=ids))
    finally:
        manifest.close()


def test_the_scans_order_is_accepted(tmp_path: Path) -> None:
    manifest = Manifest(str(tmp_path), 6)
    try:
        manifest.add_page(_page("a/", "b", "c/", "a/x", "a/y", "c/z"))
    finally:
        manifest.close()
    assert sorted(manifest.files()) == ["a/x", "a/y", "b", "c/z"]


def test_a_value_that_does_not_fit_changes_nothing() -> None:
    """All of an entry or none of it: the columns stay aligned for the entries after."""
    table = Table()
    table.add(M.Entry(0, "f", "a", 1, 0o644, 5))
    with pytest.raises(OverflowError):
        table.add(M.Entry(1, "f", "b", 1, 0o644, 1 << 63))
    assert len(table) == 1
    table.add(M.Entry(1, "f", "c", 2, 0o600, 7, uid=3))
    assert table[:] == [M.Entry(0, "f", "a", 1, 0o644, 5), M.Entry(1, "f", "c", 2, 0o600, 7, uid=3)]
    with pytest.raises(OverflowError):
        table[1] = M.Entry(1, "f", "c", 9, 0o600, 1 << 63)
    assert table[1] == M.Entry(1, "f", "c", 2, 0o600, 7, uid=3)
