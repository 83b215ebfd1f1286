"""A hostile donor: the real `pull` must refuse each trick, write nothing outside the
destination, remove what it created, and say what went wrong (never a traceback)."""

from __future__ import annotations

import base64
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import zmq

from engine import acl
from engine import messages as M
from engine import protocol as P
from engine.codec import checksum
from tests.helpers import free_port, run_cli


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


#: a well-formed access ACL (owner rw, group r, other nothing)
ACL = acl.pack([(acl.USER_OBJ, 6, acl.UNDEFINED_ID), (acl.GROUP_OBJ, 4, acl.UNDEFINED_ID),
                (acl.OTHER, 0, acl.UNDEFINED_ID)])


def _file(fid: int, path: str, size: int, kind: str = "f", **extra: Any) -> dict[str, Any]:
    return {"id": fid, "t": kind, "p": path, "s": size, "m": 0o644, "mt": 0, **extra}


class FakeDonor(threading.Thread):
    """Speaks just enough of the protocol to deliver ``entries`` and ``blocks``."""

    def __init__(self, entries: list[dict[str, Any]], blocks: list[tuple[dict[str, Any], bytes]],
                 announce_files: int | None = None, extra_blocks: int = 0,
                 block_size: int = 1 << 20, files_page: int = 0,
                 states: dict[str, tuple[dict[str, Any], list[tuple[dict, bytes]]]] | None = None,
                 complete: dict[str, Any] | None = None,
                 keepalive_only: bool = False) -> None:
        """``states``: a page store's clone, by state name (PAGE COPY, REDO COPY): the
        STATE body's extra fields and the blocks that follow it, each state ended by
        COMPLETE as the real donor ends it (FILE COPY too, when ``states`` is given)."""
        super().__init__(daemon=True)
        self.states = states
        self.keepalive_only = keepalive_only  #: after the manifest, keep-alives forever
        self.complete = complete  # FILE COPY's COMPLETE, with these fields, after its blocks
        self.port = free_port()
        self.entries = entries
        self.blocks = blocks
        self.announce_files = len(entries) if announce_files is None else announce_files
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.extra_blocks = extra_blocks
        self.block_size = block_size
        self.files_page = files_page  # 0: not announced, every page holds every entry

    def run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"tcp://127.0.0.1:{self.port}")
        self.ready.set()
        sent = False
        try:
            talker = b""
            while not self.stop.is_set():
                if talker:  # a donor that says it is alive, and nothing more
                    sock.send_multipart([talker, *P.response(P.KEEPALIVE, {"clone_id": 1})])
                if not sock.poll(100):
                    continue
                ident, *frames = sock.recv_multipart()
                msg = P.decode(frames, P.CMD)
                if msg.kind == P.HELLO:  # a plain donor that takes anyone: the default
                    # recipient accepts it (it asks for encryption, it does not require it)
                    reply = M.HelloReply(P.PROTOCOL_VERSION, "none")
                    sock.send_multipart([ident, *P.response(P.HELLO_REPLY, reply.to_body())])
                elif msg.kind == P.INIT:
                    body = M.Config(version=1, clone_id=1, files=self.announce_files,
                                    blocks=len(self.blocks), bytes=0,
                                    block_size=self.block_size, files_page=self.files_page,
                                    paged=self.states is not None).to_body()
                    if not self.files_page:
                        del body["files_page"]  # a donor that does not page its manifest
                    sock.send_multipart([ident, *P.response(P.CONFIG, body)])
                elif msg.kind == P.EXECUTE and msg.body["what"] == "files":
                    page, size = msg.body["page"], self.files_page or len(self.entries)
                    # paged: a page of entries, but "last" on every page
                    files = M.FilesPage(page, self.entries[page * size:][:size], True)
                    sock.send_multipart([ident, *P.response(P.FILES, files.to_body())])
                elif msg.kind == P.ATTACH:
                    locs = M.Locs(1, msg.body["stream"])
                    sock.send_multipart([ident, *P.response(P.LOCS, locs.to_body())])
                elif msg.kind == P.EXECUTE and msg.body["what"] == "data" and \
                        self.keepalive_only:
                    sent = True
                    talker = ident
                elif msg.kind == P.EXECUTE and msg.body["what"] == "data" and not sent:
                    sent = True
                    extra = [self.blocks[-1]] * self.extra_blocks if self.extra_blocks else []
                    for desc, data in self.blocks + extra:
                        sock.send_multipart([ident, *P.response(P.DATA_DESC, desc, data)])
                    if self.states is not None or self.complete is not None:
                        self._complete(sock, ident, "FILE COPY", len(self.blocks),
                                       self.complete)
                elif msg.kind == P.EXECUTE and msg.body["what"] == "state" and self.states:
                    name = msg.body["state"]
                    extra_body, blocks = self.states[name]
                    body = M.State(1, name, len(blocks), sum(len(d) for _, d in blocks)
                                   ).to_body()
                    sock.send_multipart([ident, *P.response(P.STATE, {**body, **extra_body})])
                    for desc, data in blocks:
                        sock.send_multipart([ident, *P.response(P.DATA_DESC, desc, data)])
                    self._complete(sock, ident, name, len(blocks))
        finally:
            sock.close()
            ctx.term()


    @staticmethod
    def _complete(sock: zmq.Socket[Any], ident: bytes, state: str, blocks: int,
                  extra: dict[str, Any] | None = None) -> None:
        body = {**M.Complete(1, state, blocks).to_body(), **(extra or {})}
        sock.send_multipart([ident, *P.response(P.COMPLETE, body)])


def _block(seq: int, segs: list[list[int]], data: bytes, **override: Any) -> tuple[dict, bytes]:
    """A block as the schema writes it, with ``override`` (hostile) fields on top."""
    desc = M.BlockDesc(seq, len(data), len(data), 0, checksum(data), len(data), segs)
    return {**desc.to_body(), **override}, data


def assert_refused(res: subprocess.CompletedProcess[str], dest: Path) -> None:
    """A pull from a hostile donor: 3863, no traceback, nothing left of the clone."""
    assert res.returncode == 1, res.stderr
    assert "ERROR 3863 (HY000): Clone received unexpected response from Donor" in res.stderr, \
        res.stderr
    assert "Traceback" not in res.stderr
    assert not dest.exists(), "the failed clone's directory must be removed"
    assert os.listdir(dest.parent) == []


GOOD = [_file(0, "ok", 4)]
CASES = {
    "absolute path": ([_file(0, "/tmp/evil-abs", 4)], []),
    "dot-dot": ([_file(0, "../evil-dotdot", 4)], []),
    "nested dot-dot": ([_file(0, "d", 0, "d"), _file(1, "d/../../evil", 4)], []),
    "NUL in name": ([_file(0, "a\x00b", 4)], []),
    "reserved #clone": ([_file(0, "#clone/#view_status", 4)], []),
    "parent not listed": ([_file(0, "nodir/x", 4)], []),
    "file under a link": ([_file(0, "l", 0, "l", lt=base64.b64encode(b"..").decode()),
                           _file(1, "l/evil-through-link", 4)], []),
    "duplicate name": ([_file(0, "ok", 4), _file(1, "ok", 4)], []),
    "unknown entry type": ([_file(0, "dev", 0, "D")], []),
    "too many files": (GOOD, [], {"announce_files": P.MAX_FILES + 1}),
    "more entries than announced": ([_file(0, "a", 1), _file(1, "b", 1)], [],
                                    {"announce_files": 1}),
    "write past the end": (GOOD, [_block(0, [[0, 2, 4]], b"abcd")]),
    "write to a directory": ([_file(0, "d", 0, "d")], [_block(0, [[0, 0, 4]], b"abcd")]),
    "write to an unknown file": (GOOD, [_block(0, [[7, 0, 4]], b"abcd")]),
    "bad checksum": (GOOD, [_block(0, [[0, 0, 4]], b"abcd", xxh=12345)]),
    "segments do not add up": (GOOD, [_block(0, [[0, 0, 2]], b"abcd")]),
    "negative offset": (GOOD, [_block(0, [[0, -4, 4]], b"abcd")]),
    "block number out of range": (GOOD, [_block(5, [[0, 0, 4]], b"abcd")]),
    "block sent twice": ([_file(0, "ok", 8)],
                         [_block(0, [[0, 0, 4]], b"abcd"), _block(0, [[0, 4, 4]], b"efgh")]),
    "blocks larger than asked for": (GOOD, [], {"block_size": 64 << 20}),
    "a block larger than agreed": ([_file(0, "ok", 200 << 10)],
                                   [_block(0, [[0, 0, 200 << 10]], bytes(200 << 10))],
                                   {"block_size": 128 << 10}),
    "last page too early": ([_file(0, "a", 1), _file(1, "b", 1), _file(2, "c", 1)], [],
                            {"files_page": 2}),
    "more blocks than credit": ([_file(0, "ok", 4)], [_block(0, [[0, 0, 4]], b"abcd")],
                                {"extra_blocks": 40}),
    # the faithful copy's fields: links, the top, owners, attributes, times, changes
    "hard link to a later entry": ([_file(0, "a", 0, "h", ln=1), _file(1, "b", 4)], []),
    "hard link to a directory": ([_file(0, "d", 0, "d"), _file(1, "x", 0, "h", ln=0)], []),
    "hard link to nothing": ([_file(0, "x", 0, "h")], []),
    "the top's entry not first": ([_file(0, "a", 4), _file(1, ".", 0, "d")], []),
    "the top as a file": ([_file(0, ".", 4)], []),
    "an attribute outside the namespaces": (
        [_file(0, "a", 4, x=[[_b64(b"system.evil"), _b64(b"x")]])], []),
    "an attribute that is not base64": ([_file(0, "a", 4, x=[["user.a", "%%"]])], []),
    "an ACL that is not one": ([_file(0, "a", 4, acl=_b64(b"\x01\x00\x00\x00"))], []),
    "a default ACL on a file": ([_file(0, "a", 4, dacl=_b64(ACL))], []),
    "an mtime past int64": ([_file(0, "a", 4, mt=1 << 63)], []),
    "an owner past 32 bits": ([_file(0, "a", 4, u=1 << 32)], []),
    "two names for one user": ([_file(0, "a", 4, nm=[["u", 5, "alice"]]),
                                _file(1, "b", 4, nm=[["u", 5, "mallory"]])], []),
    "a user name with a slash": ([_file(0, "a", 4, nm=[["u", 5, "../x"]])], []),
    "a device without its number": ([_file(0, "dev", 0, "c")], []),
    "a vanished directory": ([_file(0, "d", 0, "d")], [], {"complete": {"gone": [0]}}),
    "a vanished unknown file": (GOOD, [], {"complete": {"gone": [9]}}),
    "a file sent again that is a directory": (
        [_file(0, "d", 0, "d")], [],
        {"complete": {"again": 1},
         "states": {"FILE COPY": ({"again": [[0, 4, 0o644, 0, 0, 0]]}, [])}}),
}


def pull_from(donor: FakeDonor, dest: Path, *extra: str
              ) -> subprocess.CompletedProcess[str]:
    """Start ``donor``, run the real pull from it into ``dest`` (one stream), stop it."""
    donor.start()
    assert donor.ready.wait(10)
    try:
        return run_cli("pull", f"evil@127.0.0.1:{donor.port}", "--data-dir", str(dest),
                       "--max-concurrency", "1", "--connect-timeout", "5", *extra,
                       timeout=60)
    finally:
        donor.stop.set()
        donor.join(10)


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_donor(case: str, tmp_path: Path) -> None:
    entries, blocks, *kw = CASES[case]
    workdir = tmp_path / "work"
    workdir.mkdir()
    before = set(os.listdir(tmp_path))
    dest = workdir / "dest"
    res = pull_from(FakeDonor(entries, blocks, **(kw[0] if kw else {})), dest,
                    "--buffer-size", "1MiB")
    assert_refused(res, dest)
    assert set(os.listdir(tmp_path)) - {"state"} == before - {"state"}
    assert not Path("/tmp/evil-abs").exists()


def test_a_donor_that_sends_only_keepalives_fails_the_clone(tmp_path: Path) -> None:
    """Liveness is progress: keep-alives alone do not keep a clone waiting forever."""
    donor = FakeDonor(GOOD, [_block(0, [[0, 0, 4]], b"abcd")], keepalive_only=True)
    dest = tmp_path / "work" / "dest"
    dest.parent.mkdir()
    res = pull_from(donor, dest, "--idle-timeout", "2")
    assert res.returncode == 1, res.stderr
    assert "the donor has been silent for 2 s" in res.stderr
    assert not dest.exists()
