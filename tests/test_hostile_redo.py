"""A hostile donor's archived redo: RECOVERY must replay nothing outside the clone.

The fake donor of test_hostile.py speaks a page store's clone here (FILE COPY, PAGE
COPY, REDO COPY) and sends one small tablespace with an archive of redo records. A
benign archive completes, so each refusal below is RECOVERY's check and not a broken
fake; every hostile one must end in ERROR 3863 with nothing outside the destination
created, changed or removed, and the destination gone."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest

from engine.pagestore.page import file_header_page
from engine.pagestore.redo import (
    frame,
    rec_commit,
    rec_init,
    rec_space_create,
    rec_space_drop,
    rec_space_extend,
    rec_write,
)
from tests.test_hostile import FakeDonor, _block, _file, assert_refused, pull_from

PAGE = 16384
ARCHIVE_LSN = 8192
SPACE = 1


def _archive(mtrs: list[list[bytes]]) -> tuple[bytes, int]:
    """Frames from ARCHIVE_LSN; (bytes, clone LSN)."""
    out = b""
    lsn = ARCHIVE_LSN
    for records in mtrs:
        data = frame(lsn, b"".join(records))
        out += data
        lsn += len(data)
    return out, lsn


def _txn(n: int, *records: bytes) -> list[bytes]:
    return [*records, rec_commit(n, 1, 100 + n)]


def _donor(mtrs: list[list[bytes]], extra_entries: list[dict[str, Any]] | None = None,
           space_path: str = "db/t1.ibd") -> FakeDonor:
    table = bytes(file_header_page(PAGE, SPACE, 0)) + bytes(PAGE)
    entries = [_file(0, "db", 0, "d"), _file(1, space_path, len(table)),
               *(extra_entries or [])]
    archive, clone_lsn = _archive(mtrs)
    txns = sum(1 for m in mtrs if m and m[-1][0] == 3)
    redo_id = len(entries)
    point = {"clone_lsn": clone_lsn, "archive_lsn": ARCHIVE_LSN, "archive_bytes": len(archive),
             "last_txn": txns, "binlog_file": "binlog.000001", "binlog_file_no": 1,
             "binlog_position": 100 + txns, "gtid_executed": f"u:1-{txns}" if txns else "",
             "server_uuid": "u", "page_size": PAGE, "next_space_id": SPACE + 1,
             "spaces": {str(SPACE): {"path": space_path, "pages": 2}}, "accounts": 0,
             "blocked_s": 0.0}
    states = {
        "PAGE COPY": ({}, []),
        "REDO COPY": ({"redo": {"id": redo_id, "bytes": len(archive)}, **point},
                      [_block(0, [[redo_id, 0, len(archive)]], archive)]),
    }
    return FakeDonor(entries, [_block(0, [[1, 0, len(table)]], table)], states=states)


BENIGN = [_txn(1, rec_init(SPACE, 1, 2), rec_write(SPACE, 1, 32, b"balance!"))]
OUT = "OUTSIDE"  # replaced by the absolute path of the folder beside the destination

CASES: dict[str, tuple[list[list[bytes]], list[dict[str, Any]]]] = {
    "absolute SPACE_CREATE": ([_txn(1, rec_space_create(7, 1, f"{OUT}/evil.ibd"))], []),
    "SPACE_CREATE through ..": ([_txn(1, rec_space_create(7, 1, "../../outside/new/e.ibd"))],
                                []),
    "SPACE_CREATE over an outside file": (
        [_txn(1, rec_space_create(7, 1, "../../outside/passwd"),
              rec_write(7, 0, 0, b"evil::0:0::/root:/bin/sh\n"))], []),
    "SPACE_DROP of an outside file": ([_txn(1, rec_space_drop(SPACE, "../../outside/canary"))],
                                      []),
    "SPACE_DROP by an absolute path": ([_txn(1, rec_space_drop(9, f"{OUT}/canary"))], []),
    "page write to an unknown space": ([_txn(1, rec_write(77, 1, 32, b"x"))], []),
    "extend of an unknown space": ([_txn(1, rec_space_extend(77, 9))], []),
    "page write past a tablespace's end": ([_txn(1, rec_write(SPACE, 1 << 30, 32, b"x"))], []),
    "SPACE_CREATE over a manifest file": ([_txn(1, rec_space_create(7, 1, "db/plain"))],
                                          [_file(2, "db/plain", 0)]),
    "SPACE_CREATE into #ib_redo": ([_txn(1, rec_space_create(7, 1, "#ib_redo/control"))], []),
    "SPACE_CREATE under a manifest link": (
        [_txn(1, rec_space_create(7, 1, "db/lnk/evil.ibd"))],
        [_file(2, "db/lnk", 0, "l", lt=base64.b64encode(OUT.encode()).decode())]),
    "#ib_redo as a link in the manifest": (
        BENIGN, [_file(2, "#ib_redo", 0, "l", lt=base64.b64encode(OUT.encode()).decode())]),
    "#ib_redo as a directory in the manifest": (BENIGN, [_file(2, "#ib_redo", 0, "d")]),
    "#ib_archive in the manifest": (BENIGN, [_file(2, "#ib_archive", 0, "d")]),
    "unknown record type": ([[b"\x09garbage"]], []),
    "truncated record": ([[rec_write(SPACE, 1, 32, b"abcdef")[:-3]]], []),
    "write past a page's end": ([_txn(1, rec_write(SPACE, 1, PAGE - 2, b"abcdef"))], []),
}


def _resolve(value: Any, outside: str) -> Any:
    if isinstance(value, bytes):
        return value.replace(OUT.encode(), outside.encode())
    if isinstance(value, str):
        return value.replace(OUT, outside)
    if isinstance(value, list):
        return [_resolve(v, outside) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, outside) for k, v in value.items()}
    return value


def _fix_lengths(records: list[bytes], outside: str) -> list[bytes]:
    """Records built with the OUT placeholder carry its length: rebuild them."""
    out = []
    for rec in records:
        if OUT.encode() in rec:
            body = rec.replace(OUT.encode(), outside.encode())
            kind = rec[0]
            if kind == 4:  # SPACE_CREATE: u8, u32 space, u32 pages, u16 length, path
                path = body[11:].decode()
                out.append(rec_space_create(int.from_bytes(rec[1:5], "little"),
                                            int.from_bytes(rec[5:9], "little"), path))
            else:  # SPACE_DROP: u8, u32 space, u16 length, path
                out.append(rec_space_drop(int.from_bytes(rec[1:5], "little"),
                                          body[7:].decode()))
        else:
            out.append(rec)
    return out


def _pull(donor: FakeDonor, dest: Path) -> Any:
    return pull_from(donor, dest, "--buffer-size", "1MiB")


def _outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary").write_text("canary\n")
    (outside / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    return outside


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(path.rglob("*"))}


def test_benign_archive_completes(tmp_path: Path) -> None:
    """The control: the same fake donor with honest redo gives a finished clone whose
    page carries the redo's change."""
    dest = tmp_path / "dest"
    res = _pull(_donor(BENIGN), dest)
    assert res.returncode == 0, res.stderr
    page = (dest / "db/t1.ibd").read_bytes()[PAGE:2 * PAGE]
    assert page[32:40] == b"balance!"
    assert (dest / "#ib_redo").is_dir() and not (dest / "#ib_redo").is_symlink()


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_archive(case: str, tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    before = _snapshot(outside)
    mtrs, extra = CASES[case]
    mtrs = [_fix_lengths(m, str(outside)) for m in mtrs]
    workdir = tmp_path / "work"
    workdir.mkdir()
    dest = workdir / "dest"
    res = _pull(_donor(mtrs, _resolve(extra, str(outside))), dest)
    assert_refused(res, dest)
    assert _snapshot(outside) == before, "nothing outside the destination may change"
    assert set(os.listdir(tmp_path)) - {"state"} == {"outside", "work"}
