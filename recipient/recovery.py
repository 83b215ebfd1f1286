"""RECOVERY on the recipient: replay the archived redo, then start a fresh redo log.

Runs in the recipient's coordinator after FILE SYNC. The donor's ``#ib_redo/`` is
never copied; instead the recipient makes its own, the way MySQL's recipient replays
the archived redo at start-up:

1. the archive (``#clone/#redo_archive``, frames from the archive LSN to the clone
   LSN, cut at a transaction boundary) becomes ``#ib_redo/ib_redo_<archive LSN>``;
2. a control file records the donor's tablespaces, server UUID, binlog position and
   last transaction at the consistent point, with the checkpoint at the archive LSN;
3. opening the page store runs ordinary crash recovery: every record is applied only
   to pages older than it (page_lsn < record LSN), whole mini-transactions only, and
   the log ends exactly at the clone LSN; a sharp checkpoint and a clean close follow.

The result is the donor's state at the clone LSN, and a data directory that the
workload continues from transaction K+1.

The archive is the donor's word, so it is checked before anything is replayed
(:func:`check_archive`): every path a record names must pass the manifest's name
checks, name a tablespace of the manifest or one the archive itself creates, and every
page a record touches must belong to such a tablespace. The page store then opens each
path beneath the destination without following links (``engine.fsutil.open_beneath``),
so that not even a link planted by the manifest can take a write outside it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Collection
from typing import Any

from engine.errors import ProtocolError, UnsafeName
from engine.fsutil import ESCAPE_ERRNOS, RESERVED_PAGED, check_relpath, fsync_dir
from engine.messages import ConsistentPoint
from engine.pagestore import REDO_DIR, PageStore
from engine.pagestore.redo import (
    FILE_PREFIX,
    R_COMMIT,
    R_INIT,
    R_SPACE_CREATE,
    R_SPACE_DROP,
    R_SPACE_EXTEND,
    R_WRITE,
    parse_records,
    scan_stream,
)
from engine.pagestore.store import write_control

#: Pages a tablespace that the archive creates may reach (1 TiB at 64 KiB pages):
#: a bound on what a record can make the recipient allocate, not a format limit.
MAX_NEW_PAGES = 1 << 24


class _Registry:
    """The tablespaces as the archive is read: those of the consistent point, and
    those the archive itself creates."""

    def __init__(self, registry: dict[int, tuple[str, int]], names: Collection[str],
                 page_size: int) -> None:
        self.live = {sid: p for sid, (p, _) in registry.items()}  # as of the record read
        self.created: dict[int, str] = {}
        self.pages_of = {sid: n for sid, (_, n) in registry.items()}
        self.names = names
        self.page_size = page_size

    def check(self, rec: tuple[Any, ...]) -> None:
        kind, sid = rec[0], rec[1]
        if kind == R_COMMIT:
            return
        if kind == R_SPACE_CREATE:
            self._create(sid, rec[2], check_relpath(rec[3], RESERVED_PAGED))
        elif kind == R_SPACE_DROP:
            if self.live.get(sid) != rec[2]:
                raise UnsafeName(f"archived redo drops {rec[2][:200]!r}, which is not "
                                 f"tablespace {sid} of the clone")
            del self.live[sid]
        elif kind in (R_WRITE, R_INIT, R_SPACE_EXTEND):
            if sid not in self.pages_of:
                raise UnsafeName(f"archived redo writes to tablespace {sid}, "
                                 "which the clone does not hold")
            if kind == R_WRITE and rec[3] + len(rec[4]) > self.page_size:
                raise ProtocolError(f"archived redo writes past the end of page "
                                    f"{rec[2]} of tablespace {sid}")
            last = rec[2] if kind == R_SPACE_EXTEND else rec[2] + 1
            if last > self.pages_of[sid]:
                raise ProtocolError(f"archived redo writes page {rec[2]} of "
                                    f"tablespace {sid}, past its {self.pages_of[sid]} pages")

    def _create(self, sid: int, pages: int, rel: str) -> None:
        known = self.live.get(sid) or self.created.get(sid)
        if known is not None:
            if known != rel:
                raise UnsafeName(f"archived redo creates tablespace {sid} as {rel!r}, "
                                 "which the clone knows by another name")
            return
        if rel in self.names or rel in self.live.values() or rel in self.created.values():
            raise UnsafeName(f"archived redo creates tablespace {sid} over {rel!r}, "
                             "a file of the clone")
        if pages > MAX_NEW_PAGES:
            raise ProtocolError(f"archived redo creates {pages} pages")
        self.created[sid] = self.live[sid] = rel
        self.pages_of[sid] = MAX_NEW_PAGES


def check_archive(path: str, archive_lsn: int, registry: dict[int, tuple[str, int]],
                  names: Collection[str], page_size: int) -> int:
    """Check every record RECOVERY would replay from the archive at ``path``.

    ``registry``: the tablespaces at the clone LSN (id -> (path, pages)), each already
    a file of the manifest; ``names``: every name of the manifest. Returns how many
    mini-transactions were checked; raises :class:`ProtocolError` (3863) at the first
    record that names a path or a page outside what the clone holds. Reads the same
    frames, in the same way, as the page store's recovery will."""
    spaces = _Registry(registry, names, page_size)
    mtrs = 0
    with open(path, "rb") as fh:
        for mtr in scan_stream(fh, archive_lsn):
            mtrs += 1
            try:
                records = parse_records(mtr.body)
            except (ValueError, struct.error) as exc:
                raise ProtocolError(f"archived redo at LSN {mtr.start_lsn}: {exc}") from None
            for rec in records:
                spaces.check(rec)
    return mtrs


def recover_clone(dest: str, point: ConsistentPoint, redo_rel: str,
                  files: set[str], names: Collection[str]) -> dict[str, Any]:
    """``files``: the names of the manifest's regular files; every tablespace must be
    one. ``names``: every name of the manifest."""
    registry: dict[int, tuple[str, int]] = {}
    for sid, space in point.spaces.items():
        if space.path not in files:
            raise ProtocolError(f"tablespace {sid} is not a file of the clone")
        registry[sid] = (space.path, space.pages)
    if len({path for path, _ in registry.values()}) != len(registry):
        raise ProtocolError("two tablespaces share a file")
    archive = os.path.join(dest, redo_rel)
    check_archive(archive, point.archive_lsn, registry, names, point.page_size)
    redo_dir = os.path.join(dest, REDO_DIR)
    try:
        os.mkdir(redo_dir, 0o750)  # ours alone: the manifest may not name it
    except FileExistsError:
        raise UnsafeName(f"{REDO_DIR} exists before RECOVERY made it") from None
    os.replace(archive, os.path.join(redo_dir, f"{FILE_PREFIX}{point.archive_lsn:020d}"))
    write_control(dest, {
        "format": 1, "page_size": point.page_size, "server_uuid": point.server_uuid,
        "checkpoint_lsn": point.archive_lsn,
        "spaces": {str(sid): {"path": path, "pages": pages}
                   for sid, (path, pages) in registry.items()},
        "next_space_id": point.next_space_id, "last_txn": point.last_txn,
        "binlog_file": point.binlog_file_no, "binlog_pos": point.binlog_position,
        "clean": False, "accounts": point.accounts,
    })
    fsync_dir(redo_dir)
    try:
        store = PageStore(dest)
    except OSError as exc:
        if exc.errno in ESCAPE_ERRNOS:
            raise UnsafeName(f"a tablespace path goes through a link or a file: "
                             f"{exc.strerror}") from None
        raise
    try:
        if store.lsn != point.clone_lsn:
            raise ProtocolError(f"redo ends at LSN {store.lsn}, not at the clone LSN "
                                f"{point.clone_lsn}")
        if store.last_txn != point.last_txn:
            raise ProtocolError(f"recovered to transaction {store.last_txn}, "
                                f"expected {point.last_txn}")
        return {"mtrs": store.recovered_mtrs, "lsn": store.lsn, "last_txn": store.last_txn}
    finally:
        store.close()
