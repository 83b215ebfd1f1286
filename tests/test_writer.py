"""The recipient's writer: checksum first, aligned parts direct, tails and small files
buffered, and a file system without O_DIRECT still gets every byte."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from engine.codec import BLOCK_SIZE, COMP_LZ4, Compressor, checksum
from engine.errors import ChecksumMismatch
from engine.ring import Ring
from recipient.writer import ALIGN, Writer


def _block(ring: Ring, slot: int, payload: bytes) -> int:
    ring.slot(slot, len(payload))[:] = payload
    return checksum(payload)


def _writer(ring: Ring, root: Path, **extra: Any) -> Writer:
    return Writer(0, {"ring": ring.name, "capacity": ring.capacity,
                      "slot_size": ring.slot_size, "root": str(root), **extra})


def test_aligned_part_goes_direct_and_tail_buffered(tmp_path: Path) -> None:
    big = os.urandom(BLOCK_SIZE - 100)  # an aligned head plus an unaligned tail
    small = b"tiny file"
    payload = big + small
    with Ring(2, BLOCK_SIZE) as ring:
        w = _writer(ring, tmp_path)
        xxh = _block(ring, 1, payload)
        assert w.handle(["write", 7, 1, len(payload), xxh, 0, len(payload),
                         [["big", BLOCK_SIZE, len(big)], ["small", 0, len(small)]]]) == [7, 1]
        result = w.close()
    data = (tmp_path / "big").read_bytes()
    assert data[:BLOCK_SIZE] == bytes(BLOCK_SIZE)  # never written: a hole reads as zeros
    assert data[BLOCK_SIZE:] == big
    assert (tmp_path / "small").read_bytes() == small
    # /tmp on a file system that has O_DIRECT: the whole pages went straight to disk
    if result["direct_bytes"]:
        assert result["direct_bytes"] == len(big) - len(big) % ALIGN
    assert result["bytes"] == len(payload)


def test_a_whole_file_is_finished_by_its_writer(tmp_path: Path) -> None:
    """A file that came whole in one segment gets its mode and times from the writer,
    and its descriptors are closed; a part of a file is left to FILE SYNC."""
    whole, part = os.urandom(10_000), os.urandom(5000)
    payload = whole + part
    mtime = 1_600_000_000_123_456_789
    with Ring(1, BLOCK_SIZE) as ring:
        w = _writer(ring, tmp_path)
        xxh = _block(ring, 0, payload)
        w.handle(["write", 0, 0, len(payload), xxh, 0, len(payload),
                  [["whole", 0, len(whole), 0o640, mtime], ["part", 0, len(part)]]])
        assert "whole" not in w.fds and "whole" not in w.direct_fds
        assert "part" in w.fds
        w.close()
    st = os.stat(tmp_path / "whole")
    assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o640, mtime)
    assert (tmp_path / "whole").read_bytes() == whole
    assert os.stat(tmp_path / "part").st_mtime_ns != mtime


def test_compressed_block_is_written_from_aligned_scratch(tmp_path: Path) -> None:
    raw = b"clone-agent " * (BLOCK_SIZE // 12)
    comp = Compressor(COMP_LZ4).compress(raw)
    assert comp is not None
    with Ring(1, BLOCK_SIZE) as ring:
        w = _writer(ring, tmp_path)
        xxh = _block(ring, 0, comp)
        w.handle(["write", 0, 0, len(comp), xxh, COMP_LZ4, len(raw), [["f", 0, len(raw)]]])
        w.close()
    assert (tmp_path / "f").read_bytes() == raw


def test_without_direct_io_everything_is_buffered(tmp_path: Path) -> None:
    payload = os.urandom(3 * ALIGN)
    with Ring(1, BLOCK_SIZE) as ring:
        w = _writer(ring, tmp_path, direct_io=False)
        xxh = _block(ring, 0, payload)
        w.handle(["write", 0, 0, len(payload), xxh, 0, len(payload), [["f", 0, len(payload)]]])
        assert w.close()["direct_bytes"] == 0
    assert (tmp_path / "f").read_bytes() == payload


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a tmpfs at /dev/shm")
def test_writes_on_tmpfs_too(tmp_path: Path) -> None:
    """tmpfs had no O_DIRECT before Linux 6.6 (open fails with EINVAL): the writer then
    writes buffered; with it, direct. Either way every byte lands."""
    root = Path("/dev/shm") / f"writer-test-{os.getpid()}"
    root.mkdir()
    try:
        payload = os.urandom(4 * ALIGN)
        with Ring(1, BLOCK_SIZE) as ring:
            w = _writer(ring, root)
            xxh = _block(ring, 0, payload)
            w.handle(["write", 0, 0, len(payload), xxh, 0, len(payload),
                      [["f", 0, len(payload)]]])
            result = w.close()
        assert (root / "f").read_bytes() == payload
        assert result["bytes"] == len(payload)
    finally:
        for p in root.iterdir():
            p.unlink()
        root.rmdir()


def test_checksum_mismatch_writes_nothing(tmp_path: Path) -> None:
    payload = os.urandom(2 * ALIGN)
    with Ring(1, BLOCK_SIZE) as ring:
        w = _writer(ring, tmp_path)
        xxh = _block(ring, 0, payload)
        ring.slot(0, 1)[:] = bytes([payload[0] ^ 1])
        with pytest.raises(ChecksumMismatch):
            w.handle(["write", 0, 0, len(payload), xxh, 0, len(payload),
                      [["f", 0, len(payload)]]])
        w.close()
    assert not (tmp_path / "f").exists()
