"""Benchmark data shapes, made deterministically from a seed.

Random bytes come from numpy's generator (fast, incompressible); compressible bytes
are text-like records with repeated structure, which lz4 shrinks about 3 to 5 times.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MiB = 1 << 20


def _random(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()


def _compressible(rng: np.random.Generator, n: int) -> bytes:
    words = [b"clone", b"agent", b"donor", b"recipient", b"page", b"redo", b"lsn", b"block",
             b"chunk", b"stream", b"%08d" % 0]
    picks = rng.integers(0, len(words), size=n // 6 + 1)
    numbers = rng.integers(0, 10**6, size=n // 6 + 1)
    out = bytearray()
    for w, num in zip(picks[: n // 48 + 1], numbers, strict=False):
        out += words[w] + b"=%d;" % num
        if len(out) >= n:
            break
    while len(out) < n:
        out += out[: n - len(out)]
    return bytes(out[:n])


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def big_random(root: Path, size: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    with open(root / "big.bin", "wb") as f:
        for _ in range(0, size, 64 * MiB):
            f.write(_random(rng, min(64 * MiB, size)))
        f.truncate(size)


def big_compressible(root: Path, size: int, seed: int = 2) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    block = _compressible(rng, 8 * MiB)
    with open(root / "big.log", "wb") as f:
        written = 0
        while written < size:
            n = min(len(block), size - written)
            f.write(block[:n])
            written += n


def mixed(root: Path, size: int, seed: int = 3) -> None:
    """Half in big files, 40% in medium files, 10% in thousands of small ones."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    big_total, medium_total = size // 2, size * 4 // 10
    small_total = size - big_total - medium_total
    n_big = max(1, big_total // (128 * MiB))
    for i in range(n_big):
        _write(root / "big" / f"table{i}.ibd", _random(rng, big_total // n_big))
    n_med = max(1, medium_total // (4 * MiB))
    for i in range(n_med):
        data = _random(rng, medium_total // n_med) if i % 2 else _compressible(
            rng, medium_total // n_med)
        _write(root / f"schema{i % 8}" / f"t{i}.ibd", data)
    avg = 24 << 10
    n_small = max(1, small_total // avg)
    sizes = rng.integers(1, 2 * avg, size=n_small)
    pool = _random(rng, 2 * avg + 1)
    for i, sz in enumerate(sizes):
        _write(root / "small" / f"d{i % 50}" / f"f{i}.frm", pool[: int(sz)])


def small_files(root: Path, count: int = 20000, seed: int = 4) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    pool = _random(rng, 16 << 10)
    sizes = rng.integers(0, 8 << 10, size=count)
    for i, sz in enumerate(sizes):
        d = root / f"d{i % 100}"
        if i < 100:
            d.mkdir()
        with open(d / f"f{i}", "wb") as f:
            f.write(pool[: int(sz)])


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
