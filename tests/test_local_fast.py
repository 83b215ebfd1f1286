"""clone-local's fast path (donor/direct.py): the donor's readers copy file data into
the destination with copy_file_range; the copy is the same tree, holes included; a
file that changed is found and sent again, exactly; where the kernel will not copy
between the two file systems (a tmpfs destination, EXDEV), the ring carries the bytes.

The path taken shows in clone_progress: a block of the fast path carries no bytes, so
FILE COPY's network count stays below its data count (the tree's), by what the kernel
copied."""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from donor.plan import plan, scan
from donor.reader import Reader
from engine import messages as M
from engine.ring import Ring
from recipient.manifest import Manifest
from recipient.meta import Fidelity
from tests.helpers import allocated, describe, make_tree, run_cli, small_tmpfs


def _file_copy(res: Any) -> dict[str, Any]:
    summary = json.loads(res.stdout.splitlines()[-1])
    return next(r for r in summary["clone_progress"] if r["stage"] == "FILE COPY")


def test_clone_local_fast_path_is_exact_with_holes(tmp_path: Path) -> None:
    tree = tmp_path / "src"
    make_tree(tree)
    # More than the donor's ring holds (16 blocks of 2 MiB), in a directory of its own.
    (tree / "sub" / "more").write_bytes(os.urandom(80 << 20))
    dest = tmp_path / "copy"
    res = run_cli("clone-local", str(tree), "--data-dir", str(dest), "--json")
    assert res.returncode == 0, res.stderr
    assert describe(dest) == describe(tree)
    assert allocated(dest / "sparse") < 1 << 20  # 16 MiB with two small runs of data
    assert allocated(dest / "sparse_tail") < 1 << 20
    row = _file_copy(res)
    assert row["data"] == sum(e["size"] for e in describe(tree).values() if "size" in e)
    # The kernel copied every byte: the donor reads nothing before the recipient has
    # made the directories (a block read earlier would come through the ring), and
    # what the network counted is the manifest and the blocks' descriptors.
    assert row["network"] < 1 << 20 < row["data"]


def test_clone_local_with_a_limit_takes_the_normal_path(tmp_path: Path) -> None:
    tree = tmp_path / "src"
    make_tree(tree, big=1 << 20)
    dest = tmp_path / "copy"
    res = run_cli("clone-local", str(tree), "--data-dir", str(dest), "--json",
                  env={"CLONE_AGENT_MAX_DATA_BANDWIDTH": "200"})
    assert res.returncode == 0, res.stderr
    assert describe(dest) == describe(tree)
    row = _file_copy(res)
    dense = sum(e["size"] for rel, e in describe(tree).items()
                if "size" in e and not rel.startswith("sparse"))
    assert row["network"] >= dense > 0  # every byte sent: the writers throttle them


def test_clone_local_onto_another_file_system_falls_back(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    tree = tmp_path / "src"
    make_tree(tree)
    # More than the coordinator writes by itself before it starts its writers
    # (recipient/transfer.py, LOCAL_BYTES): they start in the middle of FILE COPY.
    (tree / "sub" / "more").write_bytes(os.urandom(48 << 20))
    with small_tmpfs(tmp_path / "mnt", "128m") as mnt:
        dest = mnt / "copy"
        res = run_cli("clone-local", str(tree), "--data-dir", str(dest), "--json")
        assert res.returncode == 0, res.stderr
        assert describe(dest) == describe(tree)
        assert allocated(dest / "sparse") < 1 << 20
        row = _file_copy(res)
        dense = sum(e["size"] for rel, e in describe(tree).items()
                    if "size" in e and not rel.startswith("sparse"))
        assert row["network"] >= dense > 0  # EXDEV: every byte through the ring


def test_clone_local_of_a_file_that_keeps_changing_is_never_wrong_in_silence(
        tmp_path: Path) -> None:
    tree = tmp_path / "src"
    make_tree(tree)
    busy = tree / "busy.log"
    busy.write_bytes(os.urandom(6 << 20))
    stop = threading.Event()

    def append() -> None:
        with open(busy, "ab") as f:
            while not stop.wait(0.005):  # a file that never stands still
                f.write(b"x" * 4096)
                f.flush()

    writer = threading.Thread(target=append, daemon=True)
    writer.start()
    try:
        dest = tmp_path / "copy"
        res = run_cli("clone-local", str(tree), "--data-dir", str(dest), "--json")
    finally:
        stop.set()
        writer.join(5)
    assert res.returncode == 0, res.stderr
    copied, source = describe(dest), describe(tree)
    # Appended to at every moment: whichever pass last read it, the copy is the file as
    # it was then, so a prefix of it as it is now (never a zero tail, never old bytes).
    got, now = copied.pop("busy.log"), source.pop("busy.log")
    assert 6 << 20 <= got["size"] <= now["size"]
    assert now["bytes"][: got["size"]] == got["bytes"]
    assert copied == source


# -- the reader itself, in this process ----------------------------------------------------
@pytest.fixture
def ring() -> Iterator[Ring]:
    with Ring(2, 4 << 20) as r:
        yield r


def _reader(ring: Ring, src: Path, dest: Path) -> Reader:
    return Reader(0, {"ring": ring.name, "capacity": ring.capacity,
                      "slot_size": ring.slot_size, "root": str(src), "copy_to": str(dest)})


def _read_all(reader: Reader, src: Path) -> list[list[Any]]:
    """Every block of ``src``'s plan through ``reader``; the answers."""
    entries = scan(str(src)).entries
    answers = []
    for i, block in enumerate(plan(entries, 2 << 20)):
        answers.append(reader.handle(["read", i, 0, block]))
    return answers


def _sparse(path: Path, size: int, runs: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in runs:
            f.seek(offset)
            f.write(data)


def test_reader_copies_a_sparse_file_and_sends_no_bytes(tmp_path: Path, ring: Ring) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    _sparse(src / "sparse", 12 << 20, [(3 << 20, os.urandom(70000)), (9 << 20, b"end")])
    (src / "small").write_bytes(os.urandom(5000))
    reader = _reader(ring, src, dest)
    try:
        answers = _read_all(reader, src)
    finally:
        reader.close()
    for _, _, length, _, segs, span, problems in answers:
        assert (length, segs, problems) == (0, [], [])
        assert span > 0
    os.truncate(dest / "sparse", 12 << 20)  # FILE SYNC sets the size of a trailing hole
    assert (dest / "sparse").read_bytes() == (src / "sparse").read_bytes()
    assert (dest / "small").read_bytes() == (src / "small").read_bytes()
    assert allocated(dest / "sparse") < 1 << 20


def test_reader_reports_a_file_changed_since_the_scan(tmp_path: Path, ring: Ring) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    (src / "f").write_bytes(os.urandom(3 << 20))
    entries = scan(str(src)).entries
    blocks = plan(entries, 2 << 20)
    with open(src / "f", "r+b") as f:  # after the scan, before the read
        f.write(b"new")
    reader = _reader(ring, src, dest)
    try:
        problems = [reader.handle(["read", i, 0, b])[6] for i, b in enumerate(blocks)]
    finally:
        reader.close()
    fid = next(e.id for e in entries if e.rel == "f")
    assert [fid, "changed", "changed while it was read"] in sum(problems, [])


def test_a_file_sent_again_is_made_exact_without_being_emptied(tmp_path: Path,
                                                              ring: Ring) -> None:
    """Pass 2 of a changed file: the recipient does not empty it (a reader may be
    writing it already); the reader clears what became a hole, FILE SYNC the size."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    (dest / "f").write_bytes(os.urandom(6 << 20))  # what pass 1 wrote
    manifest = Manifest(str(dest), 1, keep=Fidelity(direct_copy=True))
    try:
        manifest.add_page(M.FilesPage(0, [M.Entry(0, "f", "f", 6 << 20, 0o644, 0).to_wire()],
                                      True))
        manifest.again([M.Again(0, 5 << 20, 0o644, 0, 0, False)])
    finally:
        manifest.close()
    assert (dest / "f").stat().st_size == 6 << 20  # not emptied
    # the file as it is now: shorter, with a hole where pass 1 had data
    _sparse(src / "f", 5 << 20, [(0, os.urandom(100)), ((4 << 20) + 7, os.urandom(9000))])
    reader = _reader(ring, src, dest)
    try:
        _read_all(reader, src)
    finally:
        reader.close()
    os.truncate(dest / "f", 5 << 20)  # FILE SYNC
    assert (dest / "f").read_bytes() == (src / "f").read_bytes()


def test_the_ring_carries_what_the_kernel_refuses(tmp_path: Path, ring: Ring,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    data = os.urandom(3 << 20)
    (src / "f").write_bytes(data)
    (dest / "f").write_bytes(b"\xff" * (3 << 20))  # stale: cleared before the ring's bytes

    def refused(*args: Any) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refused)
    reader = _reader(ring, src, dest)
    try:
        answers = _read_all(reader, src)
        assert reader.direct is not None and not reader.direct.kernel
    finally:
        reader.close()
    sent = sum(a[2] for a in answers)
    assert sent == len(data)  # every byte in the ring, for the writers
    assert (dest / "f").read_bytes() == bytes(len(data))  # the writer's to fill


def test_a_segment_whose_directory_is_not_made_yet_travels(tmp_path: Path,
                                                          ring: Ring) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    (src / "sub").mkdir(parents=True)
    dest.mkdir()  # the recipient has not checked the page that lists sub/ yet
    data = os.urandom(100_000)
    (src / "sub" / "f").write_bytes(data)
    reader = _reader(ring, src, dest)
    try:
        answers = _read_all(reader, src)
    finally:
        reader.close()
    assert sum(a[2] for a in answers) == len(data)
    assert not (dest / "sub").exists()
