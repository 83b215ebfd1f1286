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
    entries = scan(str(tmp_path))
    blocks = plan(entries)
    covered: dict[int, list[tuple[int, int]]] = {}
    for block in blocks:
        assert 0 < sum(seg[3] for seg in block) <= BLOCK_SIZE
        assert len(block) <= MAX_SEGMENTS
        for fid, _path, off, size in block:
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
    blocks = plan(scan(str(tmp_path)))
    kinds = ["batch" if "/small/" in b[0][1] else "big" for b in blocks]
    assert kinds.count("batch") >= 3 and kinds.count("big") == 4
    # not all batches at the end: a big block comes after the first batch
    first_batch = kinds.index("batch")
    assert "big" in kinds[first_batch:]
    # big blocks of a file keep their order
    offsets = [b[0][2] for b in blocks if "big" in b[0][1]]
    assert offsets == sorted(offsets)
