"""The redo log: records, mini-transaction frames, log files, and a scanner.

An LSN counts bytes of the logical redo stream (as InnoDB's does). A mini-transaction
(mtr) is one frame, atomic on recovery: a frame whose checksum or LSN does not match
ends the log (a torn tail). A workload transaction is exactly one mtr ending in a
COMMIT record, so recovery applies whole transactions or nothing.

Frame: ``u32 magic 'MTR1', u32 body length, u64 start LSN, u64 xxh3_64(body)``, then
the body: records back to back. The frame's end LSN (start + 24 + length) becomes the
page_lsn of every page it changes.

Records (u8 type, then fields, little-endian):

| type | name | fields |
|---|---|---|
| 1 | WRITE | u32 space, u32 page, u16 offset, u16 length, bytes |
| 2 | INIT | u32 space, u32 page, u16 page_type |
| 3 | COMMIT | u64 txn, u32 binlog file number, u64 binlog position |
| 4 | SPACE_CREATE | u32 space, u32 pages, u16 length, path (UTF-8) |
| 5 | SPACE_DROP | u32 space, u16 length, path |
| 6 | SPACE_EXTEND | u32 space, u32 pages |
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import xxhash

MAGIC = 0x3152544D  # "MTR1"
FRAME = struct.Struct("<IIQQ")
FRAME_SIZE = FRAME.size
MAX_BODY = 4 << 20
FILE_PREFIX = "ib_redo_"
FILE_LIMIT = 32 << 20  #: bytes per redo file before a new one starts

R_WRITE, R_INIT, R_COMMIT, R_SPACE_CREATE, R_SPACE_DROP, R_SPACE_EXTEND = 1, 2, 3, 4, 5, 6

_WRITE = struct.Struct("<BIIHH")
_INIT = struct.Struct("<BIIH")
_COMMIT = struct.Struct("<BQIQ")
_CREATE = struct.Struct("<BIIH")
_DROP = struct.Struct("<BIH")
_EXTEND = struct.Struct("<BII")


def rec_write(space: int, page: int, offset: int, data: bytes) -> bytes:
    return _WRITE.pack(R_WRITE, space, page, offset, len(data)) + data


def rec_init(space: int, page: int, page_type: int) -> bytes:
    return _INIT.pack(R_INIT, space, page, page_type)


def rec_commit(txn: int, binlog_file: int, binlog_pos: int) -> bytes:
    return _COMMIT.pack(R_COMMIT, txn, binlog_file, binlog_pos)


def rec_space_create(space: int, pages: int, path: str) -> bytes:
    raw = path.encode()
    return _CREATE.pack(R_SPACE_CREATE, space, pages, len(raw)) + raw


def rec_space_drop(space: int, path: str) -> bytes:
    raw = path.encode()
    return _DROP.pack(R_SPACE_DROP, space, len(raw)) + raw


def rec_space_extend(space: int, pages: int) -> bytes:
    return _EXTEND.pack(R_SPACE_EXTEND, space, pages)


def frame(start_lsn: int, body: bytes) -> bytes:
    return FRAME.pack(MAGIC, len(body), start_lsn, xxhash.xxh3_64_intdigest(body)) + body


def parse_records(body: bytes) -> list[tuple[Any, ...]]:
    """The records of one mtr body, as tuples starting with the type."""
    out: list[tuple[Any, ...]] = []
    pos = 0
    n = len(body)
    while pos < n:
        kind = body[pos]
        if kind == R_WRITE:
            _, space, page, off, length = _WRITE.unpack_from(body, pos)
            pos += _WRITE.size
            out.append((R_WRITE, space, page, off, body[pos : pos + length]))
            pos += length
        elif kind == R_INIT:
            out.append(_INIT.unpack_from(body, pos))
            pos += _INIT.size
        elif kind == R_COMMIT:
            out.append(_COMMIT.unpack_from(body, pos))
            pos += _COMMIT.size
        elif kind == R_SPACE_CREATE:
            _, space, pages, length = _CREATE.unpack_from(body, pos)
            pos += _CREATE.size
            out.append((R_SPACE_CREATE, space, pages, body[pos : pos + length].decode()))
            pos += length
        elif kind == R_SPACE_DROP:
            _, space, length = _DROP.unpack_from(body, pos)
            pos += _DROP.size
            out.append((R_SPACE_DROP, space, body[pos : pos + length].decode()))
            pos += length
        elif kind == R_SPACE_EXTEND:
            out.append(_EXTEND.unpack_from(body, pos))
            pos += _EXTEND.size
        else:
            raise ValueError(f"unknown redo record type {kind} at {pos}")
        if pos > n:
            raise ValueError(f"redo record of type {kind} cut short at {n}")
    return out


@dataclass
class Mtr:
    start_lsn: int
    end_lsn: int
    body: bytes

    def records(self) -> list[tuple[Any, ...]]:
        return parse_records(self.body)


def scan_stream(fh: Any, first_lsn: int, stop_lsn: int | None = None) -> Iterator[Mtr]:
    """Frames from an open file positioned at ``first_lsn``, until a torn/invalid frame,
    the end, or ``stop_lsn`` (frames ending after it are not returned)."""
    expect = first_lsn
    while True:
        head = fh.read(FRAME_SIZE)
        if len(head) < FRAME_SIZE:
            return
        magic, length, start, digest = FRAME.unpack(head)
        if magic != MAGIC or start != expect or length > MAX_BODY:
            return
        body = fh.read(length)
        if len(body) < length or xxhash.xxh3_64_intdigest(body) != digest:
            return
        end = start + FRAME_SIZE + length
        if stop_lsn is not None and end > stop_lsn:
            return
        yield Mtr(start, end, body)
        expect = end


def log_files(redo_dir: str) -> list[tuple[int, str]]:
    """(start LSN, path) of every redo file, oldest first."""
    out = []
    for name in os.listdir(redo_dir):
        if name.startswith(FILE_PREFIX):
            try:
                out.append((int(name[len(FILE_PREFIX):]), os.path.join(redo_dir, name)))
            except ValueError:
                continue
    return sorted(out)


def scan_log(redo_dir: str, from_lsn: int) -> Iterator[Mtr]:
    """Every intact mtr from ``from_lsn`` on, across redo files, in order."""
    files = log_files(redo_dir)
    expect = from_lsn
    for i, (start, path) in enumerate(files):
        nxt = files[i + 1][0] if i + 1 < len(files) else None
        if nxt is not None and nxt <= expect:
            continue
        if start > expect:
            return  # a gap: nothing after it can be trusted
        with open(path, "rb") as fh:
            fh.seek(expect - start)
            for mtr in scan_stream(fh, expect):
                yield mtr
                expect = mtr.end_lsn
        if nxt is None or nxt != expect:
            return


class LogWriter:
    """Appends frames to the redo files of ``redo_dir``; owned by the store's owner."""

    def __init__(self, redo_dir: str, lsn: int) -> None:
        self.dir = redo_dir
        self.lsn = lsn
        self.flushed_lsn = lsn
        self._fd = -1
        self._file_start = 0
        self._open_for(lsn)

    def _open_for(self, lsn: int) -> None:
        files = log_files(self.dir)
        if files and files[-1][0] <= lsn and lsn - files[-1][0] < FILE_LIMIT:
            start, path = files[-1]
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            os.ftruncate(fd, lsn - start)  # drop a torn tail beyond the last good frame
        else:
            start = lsn
            path = os.path.join(self.dir, f"{FILE_PREFIX}{lsn:020d}")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
        self._fd = fd
        self._file_start = start

    def append(self, body: bytes) -> tuple[int, int, bytes]:
        """Write one mtr; returns (start LSN, end LSN, frame bytes). Not yet fsynced."""
        if self.lsn - self._file_start >= FILE_LIMIT:
            self._open_for(self.lsn)
        start = self.lsn
        data = frame(start, body)
        os.pwrite(self._fd, data, start - self._file_start)
        self.lsn = start + len(data)
        return start, self.lsn, data

    def flush(self) -> None:
        """Make the log durable up to the current LSN (group commit)."""
        if self.flushed_lsn < self.lsn:
            os.fdatasync(self._fd)
            self.flushed_lsn = self.lsn

    def sync_written(self) -> None:
        """fdatasync what is written so far without holding up writers (the LSN it
        covers is not recorded: ``flush`` under the latch makes it exact)."""
        if self._fd >= 0:
            os.fdatasync(self._fd)

    def purge(self, checkpoint_lsn: int) -> None:
        """Remove redo files that end before the checkpoint."""
        files = log_files(self.dir)
        for (start, path), (nxt, _) in zip(files, files[1:], strict=False):
            if nxt <= checkpoint_lsn and start != self._file_start:
                os.unlink(path)

    def close(self) -> None:
        if self._fd >= 0:
            self.flush()
            os.close(self._fd)
            self._fd = -1
