"""The donor's manifest scan and block plan."""

from __future__ import annotations

from pathlib import Path

from donor.plan import plan, scan
from engine.codec import BLOCK_SIZE, MAX_SEGMENTS


def _tree(root: Path) -> None:
    (root / "big").mkdir(parents=True)
    (root / "big" / "a.ibd").write_bytes(b"a" * (3 * BLOCK_SIZE + 5))
    (root / "small").mkdir()
    for i in range(BLOCK_SIZE * 3 // (20 << 10)):  # about three blocks' worth
        (root / "small" / f"f{i:04}").write_bytes(b"s" * (20 << 10))
    (root / "empty").write_bytes(b"")


def test_every_byte_of_every_file_is_planned_once(tmp_path: Path) -> None:
    _tree(tmp_path)
    entries = scan(str(tmp_path)).entries
    blocks = plan(entries)
    covered: dict[int, list[tuple[int, int]]] = {}
    for block in blocks:
        assert 0 < sum(seg[3] for seg in block) <= BLOCK_SIZE
        assert len(block) <= MAX_SEGMENTS
        for fid, _path, off, size, _stamp in block:
            covered.setdefault(fid, []).append((off, size))
    for e in entries:
        if e.kind != "f" or e.size == 0:
            assert e.id not in covered
            continue
        runs = sorted(covered[e.id])
        assert runs[0][0] == 0 and sum(size for _, size in runs) == e.size
        assert all(a[0] + a[1] == b[0] for a, b in zip(runs, runs[1:], strict=False))


def test_small_file_batches_are_spread_among_big_blocks(tmp_path: Path) -> None:
    _tree(tmp_path)
    blocks = plan(scan(str(tmp_path)).entries)
    kinds = ["big" if len(b) == 1 and b[0][3] == BLOCK_SIZE else "batch" for b in blocks]
    assert kinds.count("batch") >= 3 and kinds.count("big") == 3
    # not all batches at the end: a big block comes after the first batch
    first_batch = kinds.index("batch")
    assert "big" in kinds[first_batch:]
    # big blocks of a file keep their order
    offsets = [b[0][2] for b, kind in zip(blocks, kinds, strict=True) if kind == "big"]
    assert offsets == sorted(offsets)


def test_a_big_files_tail_travels_in_a_batch(tmp_path: Path) -> None:
    """The 5 bytes after big/a.ibd's three whole blocks go with the small files, not
    in a block of their own."""
    _tree(tmp_path)
    blocks = plan(scan(str(tmp_path)).entries)
    pieces = [(b, seg) for b in blocks for seg in b if seg[1].endswith("a.ibd")]
    assert sorted((seg[2], seg[3]) for _, seg in pieces) == [
        (0, BLOCK_SIZE), (BLOCK_SIZE, BLOCK_SIZE), (2 * BLOCK_SIZE, BLOCK_SIZE),
        (3 * BLOCK_SIZE, 5)]
    tail_block = next(b for b, seg in pieces if seg[3] == 5)
    assert len(tail_block) > 1 and all("/small/" in seg[1] for seg in tail_block[1:])


def test_lanes_give_each_reader_files_of_its_own_in_turn(tmp_path: Path) -> None:
    """clone-local's fast path: two readers copying into one file take turns at its
    lock, so each big file is one lane's, and the lanes alternate."""
    (tmp_path / "big").mkdir()
    sizes = {"a": 6, "b": 2, "c": 2, "d": 1}  # whole blocks each
    for name, n in sizes.items():
        (tmp_path / "big" / name).write_bytes(name.encode() * (n * BLOCK_SIZE))
    (tmp_path / "small").write_bytes(b"s" * 100)
    entries = scan(str(tmp_path)).entries
    one, two = plan(entries), plan(entries, lanes=2)
    assert sorted(map(repr, two)) == sorted(map(repr, one))  # the same blocks
    assert set(one.lanes) == {-1}
    lane_of: dict[int, set[int]] = {}
    whole = []
    for b, block in enumerate(two):
        if len(block) == 1 and block[0][3] == BLOCK_SIZE:
            lane_of.setdefault(block[0][0], set()).add(two.lanes[b])
            whole.append(two.lanes[b])
        else:
            assert two.lanes[b] == -1  # a batch goes to whichever reader is free
    assert all(len(lanes) == 1 for lanes in lane_of.values())  # a file, one lane
    # "a" (6 blocks) in one lane, b, c and d (5) in the other, a block of each in turn
    assert whole[:10] == [0, 1] * 5 and whole[10:] == [0]
    for fid in lane_of:  # each file's blocks still in order
        offsets = [blk[0][2] for blk in two if blk[0][0] == fid]
        assert offsets == sorted(offsets)
