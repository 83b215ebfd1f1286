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
"""

from __future__ import annotations

import os
from typing import Any

from engine.errors import ProtocolError
from engine.fsutil import fsync_dir
from engine.pagestore import REDO_DIR, PageStore
from engine.pagestore.redo import FILE_PREFIX
from engine.pagestore.store import write_control


def recover_clone(dest: str, point: dict[str, Any], redo_rel: str,
                  files: set[str]) -> dict[str, Any]:
    """``files``: the checked names of the manifest; every tablespace must be one."""
    archive_lsn = int(point["archive_lsn"])
    clone_lsn = int(point["clone_lsn"])
    if not 0 < archive_lsn <= clone_lsn:
        raise ProtocolError(f"archive LSN {archive_lsn} after clone LSN {clone_lsn}")
    redo_dir = os.path.join(dest, REDO_DIR)
    os.makedirs(redo_dir, mode=0o750, exist_ok=True)
    os.replace(os.path.join(dest, redo_rel),
               os.path.join(redo_dir, f"{FILE_PREFIX}{archive_lsn:020d}"))
    spaces = point["spaces"]
    if not isinstance(spaces, dict) or len(spaces) > 100000:
        raise ProtocolError("tablespace registry is not an object")
    for sid, info in spaces.items():
        if not (sid.isdigit() and isinstance(info, dict) and info.get("path") in files
                and isinstance(info.get("pages"), int) and 0 <= info["pages"] < 1 << 40):
            raise ProtocolError(f"tablespace {sid!r} is not a file of the clone")
    page_size = point.get("page_size")
    if not isinstance(page_size, int) or page_size & (page_size - 1) or \
            not 4096 <= page_size <= 65536:
        raise ProtocolError(f"page size {page_size!r}")
    write_control(dest, {
        "format": 1, "page_size": int(point["page_size"]),
        "server_uuid": str(point["server_uuid"]), "checkpoint_lsn": archive_lsn,
        "spaces": spaces, "next_space_id": int(point["next_space_id"]),
        "last_txn": int(point["last_txn"]), "binlog_file": int(point["binlog_file_no"]),
        "binlog_pos": int(point["binlog_position"]), "clean": False,
        "accounts": int(point.get("accounts", 0)),
    })
    fsync_dir(redo_dir)
    store = PageStore(dest)
    try:
        if store.lsn != clone_lsn:
            raise ProtocolError(f"redo ends at LSN {store.lsn}, not at the clone LSN {clone_lsn}")
        if store.last_txn != int(point["last_txn"]):
            raise ProtocolError(f"recovered to transaction {store.last_txn}, "
                                f"expected {point['last_txn']}")
        return {"mtrs": store.recovered_mtrs, "lsn": store.lsn, "last_txn": store.last_txn}
    finally:
        store.close()
