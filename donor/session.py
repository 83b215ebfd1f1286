"""One clone on the donor: its streams, its queues of blocks, and its sending loop.

A :class:`Session` lives in the ``serve`` process (the coordinator) from INIT to its
end. It owns the snapshot (for a page store), the manifest and the plan of the current
state, and the blocks on their way: planned -> read (a reader process fills a slot of
the read ring, or the coordinator reads fresh pages) -> compressed (optional, into the
send ring) -> ready -> in flight (a zero-copy send) -> acknowledged. It answers the
commands of its recipient (:meth:`execute`, :meth:`ack`, :meth:`next_state`) and
sends what credit allows (:meth:`pump`). The server (:mod:`donor.server`) keeps the
socket, the rings and the worker pools, and hands the session what concerns it.

Its :class:`Phase` says what it may do: ACTIVE serves; ORPHANED has lost its recipient
(a send failed, or it fell silent) and keeps the snapshot, the plan and the record of
acknowledged blocks for the restart window the recipient asked for, waiting for its
REINIT (:meth:`reinit`); ENDED is final (its slots went back to the server).
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import errno
import hmac
import logging
import os
import platform
import secrets
import stat
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from donor.plan import SKIP_PAGED, Entry, Plan, plan, scan
from donor.reader import times
from donor.snapshot import Snapshot
from engine import messages as M
from engine import protocol as P
from engine.codec import CODECS
from engine.errors import CloneError, LocalIOError, ProtocolError, from_oserror
from engine.fsutil import parent_at
from engine.table import Table

if TYPE_CHECKING:
    from donor.server import DonorServer

log = logging.getLogger("clone_agent.donor")

AGENT_VERSION = "clone-agent 0.1"
#: Seconds without any response on the master before a KEEPALIVE: short, so that a
#: recipient can tell a broken connection from a busy donor within a few seconds.
KEEPALIVE_EVERY = 1.0
#: Seconds without any message from the recipient (it pings every 2 s) after which its
#: connection counts as broken and the clone waits for a restart.
ORPHAN_AFTER = 10.0
#: Blocks of fresh pages the coordinator reads in one turn of the loop (PAGE COPY),
#: so that the socket is served between them.
PAGE_BLOCKS_A_TURN = 8
#: FILE COPY passes over a plain tree: the first, then the files that changed while they
#: were read, sent again while they keep changing, at most this many times in all
#: (tar and rsync read a file once and warn; a second look costs only what changed).
MAX_PASSES = 4
#: Files sent again in one pass: their list travels in one STATE body.
MAX_AGAIN = 20000


class Phase(enum.Enum):
    ACTIVE = "active"
    ORPHANED = "orphaned"
    ENDED = "ended"



class Blocks(Protocol):
    """A state's blocks: a :class:`~donor.plan.Plan`, or PAGE COPY's list of pages."""

    def __len__(self) -> int: ...
    def __getitem__(self, seq: int, /) -> Any: ...

@dataclass
class Stream:
    ident: bytes
    index: int
    credit: int = 0
    sent: int = 0


@dataclass(frozen=True, slots=True)
class ReadyBlock:
    """A block in a ring slot: ``ring`` 0 is the read ring, 1 the send ring (after
    compression). ``length`` bytes go on the wire, ``raw`` before compression."""

    seq: int
    ring: int
    slot: int
    length: int
    xxh: int
    segs: list[Any]
    span: int
    comp: int
    raw: int

    def desc(self) -> M.BlockDesc:
        return M.BlockDesc(self.seq, self.length, self.raw, self.comp, self.xxh, self.span,
                           self.segs)


class Session:
    """One clone in progress on the donor; made by the server at INIT."""

    def __init__(self, server: DonorServer, clone_id: int, master: bytes,
                 init: M.Init, data_key: bytes | None = None) -> None:
        self.server = server
        #: an encrypted clone's block key (from the master's handshake): the compressor
        #: workers seal every block with it
        self.data_key = data_key
        #: what an ATTACH must show: only the authenticated master receives it
        self.secret = secrets.token_bytes(32)
        self.clone_id = clone_id
        self.phase = Phase.ACTIVE
        self.snapshot_id = secrets.token_hex(8)
        self.version = P.negotiate(init.version)
        self.user = init.user
        #: where the master connected from (a new INIT from there may take an orphaned
        #: clone's place: its recipient started over)
        self.peer = ""
        self.auth_user = ""  #: who authenticated the master ("": an anonymous clone)
        self.restart_timeout = init.restart_timeout
        self.deadline = 0.0  #: ORPHANED: when the window for a REINIT closes
        self.restarts = 0
        #: states begun (0: the first FILE COPY pass); a REINIT says how many it saw
        self.serial = -1
        self.last_state: M.State | None = None  #: the last STATE answer, for a REINIT
        #: tags the reads and compressions of this clone; a restart changes it, so that
        #: what was under way before comes back as stale and is dropped
        self.tag = [clone_id, 0]
        self.streams: dict[bytes, Stream] = {master: Stream(master, 0)}
        #: streams forgotten at a break or a REINIT: what they still say is ignored
        self.former: set[bytes] = set()
        self.master = master
        self.last_sent = time.monotonic()  #: the last response on the master
        self.block_size = init.block_size
        self.codec = CODECS[init.compression]
        self.snapshot: Snapshot | None = None
        if server.store is not None:
            self.snapshot = Snapshot(server.store, init.ddl_timeout, server.debug_sync,
                                     server.workload_alive)
        try:
            tree = scan(server.datadir, skip=SKIP_PAGED if self.snapshot else (),
                        xattrs=init.xattrs, acls=init.acls,
                        skip_unreadable=init.skip_unreadable, tick=self._scanning)
        except BaseException as exc:
            if self.snapshot is not None:
                self.snapshot.end()
            if isinstance(exc, OSError):  # any tree: never a traceback, serve goes on
                raise from_oserror(exc, "reading the tree on the donor") from None
            raise
        self.entries: Table = tree.entries
        self.page_entries = tree.page_entries(P.MAX_FILES_PAGE)
        #: warnings for the recipient, sent with FILE COPY's last COMPLETE
        self.notes: list[M.Note] = tree.notes
        self.skip_unreadable = init.skip_unreadable
        #: a plain tree's files that changed while read (sent again) and that vanished
        self.changed: set[int] = set()
        self.gone: set[int] = set()
        self.passes = 1
        self.again = 0  #: files the last COMPLETE announced for another pass
        self.total_bytes = self.entries.file_bytes()
        self.ready: deque[ReadyBlock] = deque()
        self.inflight: dict[int, tuple[int, int, Any]] = {}  # seq -> (ring, slot, tracker)
        self.to_compress: deque[ReadyBlock] = deque()
        self.compressing: dict[int, ReadyBlock] = {}
        #: blocks that were in flight when the connection broke: the REINIT's locator
        #: says which of them arrived
        self.inflight_seqs: list[int] = []
        self.credited = False  #: the recipient has given credit (any)
        #: the recipient has asked for data (EXECUTE data): until then it reads the
        #: manifest, and a COMPLETE (at once, for a tree without data) would come in
        #: the place of a FILES page
        self.data_asked = False
        self.start_state("FILE COPY", plan(self.entries, self.block_size,
                                           check=self.snapshot is None,
                                           lanes=server.lanes), "read")
        self.last_heard = time.monotonic()  #: progress (blocks acknowledged, commands)
        self.last_any = time.monotonic()  #: any message, pings too
        self.last_sent = time.monotonic()
        self._rr = 0
        log.info("clone %d: %d files, %d bytes, %d blocks, for user %r", clone_id,
                 self.entries.count("f"), self.total_bytes,
                 len(self.blocks), self.user)

    def _scanning(self) -> None:
        """The scan goes on (a million files take seconds): KEEPALIVE to the master
        every second, so that its recipient, waiting for CONFIG, knows we are here."""
        now = time.monotonic()
        if now - self.last_sent >= KEEPALIVE_EVERY:
            self.last_sent = now
            self.server.send(self.master, P.KEEPALIVE, {"clone_id": self.clone_id})

    def start_state(self, name: str, blocks: Blocks, kind: str) -> None:
        """Begin a snapshot state: ``kind`` "read" (reader processes) or "pages"
        (tracked pages read fresh by the coordinator)."""
        self.state = name
        self.state_no = M.STATE_NUMBERS[name]
        self.serial += 1
        self.blocks = blocks
        self.kind = kind
        self.next_block = 0
        #: blocks to read again before ``next_block`` goes on (a restart's)
        self.todo: deque[int] = deque()
        self.done = bytearray((len(blocks) + 7) // 8)  #: a bit per block acknowledged
        self.counted = bytearray(len(self.done))  #: ... and counted in the stage's work
        self.acked = 0
        self.complete_sent = False
        # work in MySQL's units: blocks for file and redo copy, pages for page copy
        self.server.stats.stage(self.clone_id, name, sum(len(blocks[i]) for i in range(len(blocks)))
                                if kind == "pages" else len(blocks))

    @property
    def delivered(self) -> bool:
        """Every block of the last state acknowledged: the recipient needs nothing more
        (FILE SYNC and RECOVERY are its own), only to say EXIT."""
        last = self.state == "REDO COPY" if self.snapshot is not None else \
            self.state == "FILE COPY" and not self.again
        return last and self.complete_sent and self.acked == len(self.blocks)

    @property
    def busy(self) -> bool:
        """Blocks of the current state still on their way."""
        return bool(not self.complete_sent or self.inflight or self.ready or
                    self.compressing or self.to_compress)

    # -- answers ----------------------------------------------------------------------
    def config(self) -> M.Config:
        return M.Config(
            version=self.version, clone_id=self.clone_id, snapshot_id=self.snapshot_id,
            server_version=AGENT_VERSION, os=platform.system(), machine=platform.machine(),
            data_dir=os.path.basename(os.path.abspath(self.server.datadir)),
            files=len(self.entries), bytes=self.total_bytes, blocks=len(self.blocks),
            block_size=self.block_size, files_page=self.page_entries,
            paged=self.snapshot is not None,
            page_size=self.snapshot.page_size if self.snapshot else 0,
            secret=base64.b64encode(self.secret).decode())

    def files_page(self, page: int) -> M.FilesPage:
        size = self.page_entries  # fewer than 2000 where names are long
        start = page * size
        return M.FilesPage(page, self.entries.wire(start, start + size),
                           start + size >= len(self.entries))

    def attach(self, ident: bytes, attach: M.Attach, encrypted: bool) -> M.Locs:
        """A stream joins, if it shows the clone's secret (compared in constant time)
        and is encrypted exactly when the master is."""
        self._check_secret(attach.secret, encrypted)
        if ident not in self.streams:
            if len(self.streams) >= P.MAX_STREAMS:
                raise ProtocolError(f"more than {P.MAX_STREAMS} streams")
            self.streams[ident] = Stream(ident, len(self.streams))
            self.server.stats.streams = len(self.streams)
        return M.Locs(self.clone_id, self.streams[ident].index)

    def stream(self, ident: bytes) -> Stream:
        stream = self.streams.get(ident)
        if stream is None:
            raise ProtocolError("a stream that did not ATTACH")
        return stream

    def data(self, stream: Stream, credit: int) -> None:
        """EXECUTE data: the stream's credit, and the manifest read."""
        stream.credit = credit
        self.data_asked = True
        self.credited = self.credited or credit > 0

    def ack(self, stream: Stream, ack: M.Ack) -> list[tuple[int, int, Any]]:
        """Blocks written on the recipient: their slots, to free once ZeroMQ is done."""
        freed = []
        for seq in ack.blocks:
            held = self.inflight.pop(seq, None)
            if held is None:
                raise ProtocolError(f"ACK of block {seq!r} that is not in flight")
            freed.append(held)
            self._done(seq)
        stream.credit = min(stream.credit + ack.credit, P.MAX_CREDIT)
        self.credited = self.credited or ack.credit > 0
        return freed

    def _done(self, seq: int) -> None:
        """Block ``seq`` is written on the recipient: counted once, however often it
        was sent."""
        bit = 1 << (seq & 7)
        if self.done[seq >> 3] & bit:
            return
        self.done[seq >> 3] |= bit
        self.acked += 1
        if not self.counted[seq >> 3] & bit:  # a block sent again is not work again
            self.counted[seq >> 3] |= bit
            self.server.stats.work(len(self.blocks[seq]) if self.kind == "pages" else 1)

    def next_state(self, name: str) -> M.State:
        state = self._next_state(name)
        self.last_state = state
        return state

    def _next_state(self, name: str) -> M.State:
        """Move the snapshot to ``name`` (PAGE COPY after FILE COPY, REDO COPY after
        PAGE COPY) once the current state is wholly acknowledged; FILE COPY again after
        FILE COPY when its COMPLETE announced files to send again."""
        if self.busy:
            raise ProtocolError(f"{name!r} asked before {self.state} completed")
        if name == "FILE COPY" and self.state == "FILE COPY" and self.again:
            return self._again()
        if self.snapshot is None:
            raise ProtocolError(f"no state {name!r} after {self.state}")
        if name == "PAGE COPY" and self.state == "FILE COPY":
            blocks, grown = self.snapshot.page_copy(self.entries, self.block_size)
            self.start_state("PAGE COPY", blocks, "pages")
            return M.State(self.clone_id, name, len(blocks),
                           sum(len(b) for b in blocks) * self.snapshot.page_size, grown)
        if name == "REDO COPY" and self.state == "PAGE COPY":
            entry, point, sizes = self.snapshot.redo_copy(len(self.entries), self.entries)
            redo = plan([entry], self.block_size, check=False)  # the snapshot's own
            self.start_state("REDO COPY", redo, "read")
            return M.State(self.clone_id, name, len(redo), entry.size, sizes,
                           M.RedoFile(entry.id, entry.size), point)
        raise ProtocolError(f"no state {name!r} after {self.state}")

    # -- a plain tree that changes while it is read ---------------------------------------
    def problems(self, found: list[list[Any]]) -> None:
        """A reader's report of files not as the scan saw them (``[file id, kind,
        text]``): changed or removed ones are looked at again at the end of the pass;
        an unreadable one fails the clone, naming it, unless the recipient asked to
        skip it (then it is reported, and absent on the recipient)."""
        for fid, kind, text in found:
            rel = self.entries[fid].rel if 0 <= fid < len(self.entries) else "the redo archive"
            if kind != "unreadable":
                self.changed.add(fid)
            elif self.skip_unreadable and self.snapshot is None and fid not in self.gone:
                self.gone.add(fid)
                self.changed.discard(fid)
                self.notes.append(M.Note("unreadable", rel, f"could not be read on the "
                                         f"donor ({text}): not copied"))
                log.warning("%s: could not be read (%s): not copied", rel, text)
            elif fid not in self.gone:
                raise LocalIOError(f"cannot read '{rel}' on the donor: {text}",
                                   hint="give the donor's user read access to it, or "
                                   "clone with --skip-unreadable to leave it out")

    def _complete(self) -> M.Complete:
        """COMPLETE of the current state; for FILE COPY of a plain tree, with the files
        to send again, or (the last pass) the warnings and the files that vanished."""
        body = M.Complete(self.clone_id, self.state, self.acked)
        if self.state != "FILE COPY" or self.snapshot is not None:
            return body
        self.changed -= self.gone
        if self.changed and self.passes < MAX_PASSES:
            self.again = len(self.changed)
            log.info("clone %d: %d files changed while read: sending them again",
                     self.clone_id, self.again)
            return dataclasses.replace(body, again=self.again)
        self.again = 0
        for fid in sorted(self.changed):
            entry = self._restat(fid)
            if entry is not None:
                self.notes.append(M.Note("changed", entry.rel, f"changed while the donor "
                                         f"read it, {self.passes} times: the copy may not "
                                         "match any one moment of it"))
        self.changed.clear()
        return dataclasses.replace(body, notes=self.notes[:M.MAX_NOTES],
                                   more=max(0, len(self.notes) - M.MAX_NOTES),
                                   gone=sorted(self.gone))

    def _restat(self, fid: int) -> Entry | None:
        """The file ``fid`` as it is now (None: it vanished, which is noted)."""
        entry = self.entries[fid]
        try:
            st = _lstat(entry.path)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            self.gone.add(fid)
            self.notes.append(M.Note("vanished", entry.rel, "removed on the donor while "
                                     "the clone read it: not copied"))
            return None
        mtime, atime, ctime = times(st)
        entry = dataclasses.replace(
            entry, size=st.st_size, mode=stat.S_IMODE(st.st_mode), mtime_ns=mtime,
            atime_ns=atime, ctime_ns=ctime,
            dense=st.st_blocks * 512 >= st.st_size)
        self.entries[fid] = entry
        return entry

    def _again(self) -> M.State:
        """FILE COPY once more: the files that changed, as they are now."""
        todo = sorted(self.changed)[:MAX_AGAIN]
        self.changed.difference_update(todo)
        again = [e for e in map(self._restat, todo) if e is not None]
        self.passes += 1
        self.again = 0
        blocks = plan(again, self.block_size, lanes=self.server.lanes)
        self.start_state("FILE COPY", blocks, "read")
        log.info("clone %d: FILE COPY pass %d, %d files, %d blocks", self.clone_id,
                 self.passes, len(again), len(blocks))
        return M.State(self.clone_id, "FILE COPY", len(blocks), sum(e.size for e in again),
                       again=[M.Again(e.id, e.size, e.mode, e.mtime_ns, e.atime_ns or 0,
                                      e.dense) for e in again])

    # -- blocks -----------------------------------------------------------------------------
    def block_read(self, block: ReadyBlock) -> None:
        """A block is in the read ring: compress it first when the clone asked for it."""
        if self.codec or self.data_key is not None:
            self.to_compress.append(block)
        else:
            self.ready.append(block)

    def compressed(self, seq: int, out_slot: int, codec: int, wire: int, xxh: int,
                   moved: bool) -> ReadyBlock | None:
        """A compressor's answer; the block it was, if this session still has it.
        ``moved``: what goes on the wire is in the send ring (compressed or sealed);
        else the block stays in the read ring as it was (it did not shrink)."""
        block = self.compressing.pop(seq, None)
        if block is None:
            return None
        ready = dataclasses.replace(block, ring=1, slot=out_slot, length=wire, xxh=xxh,
                                    comp=codec) if moved else block
        self.ready.append(ready)
        return block

    def pump(self, now: float) -> None:
        """Start reads, compressions and sends as far as slots and credit allow."""
        if self.phase is not Phase.ACTIVE:
            return
        self._read(now)
        self._compress()
        if not self._send(now):
            return
        if self.data_asked and self.acked == len(self.blocks) and not self.complete_sent:
            self.complete_sent = True
            if self.server.send(self.master, P.COMPLETE, self._complete().to_body()) is None:
                self.complete_sent = False
                self.server.orphan("the master's connection is gone")
                return
            self.last_sent = now
        if now - self.last_sent > KEEPALIVE_EVERY:
            if self.server.send(self.master, P.KEEPALIVE,
                                {"clone_id": self.clone_id}) is None:
                self.server.orphan("the master's connection is gone")
                return
            self.last_sent = now

    def _read(self, now: float) -> None:
        server = self.server
        if server.direct and not self.credited:
            # clone-local's fast path: a reader copies into the destination only where
            # the recipient has made the directory, which it has once it gives credit
            # (after the whole manifest); blocks read ahead would come through the ring.
            return
        ring = server.ring
        assert ring is not None and server.readers is not None
        filled = 0
        while (self.todo or self.next_block < len(self.blocks)) and \
                filled < PAGE_BLOCKS_A_TURN:
            slot = ring.acquire()
            if slot is None:
                break
            if self.todo:
                seq = self.todo.popleft()
            else:
                seq = self.next_block
                self.next_block += 1
            if self.kind == "pages":
                assert self.snapshot is not None
                length, xxh, segs = self.snapshot.fill_pages(self.blocks[seq],
                                                             ring.slot(slot))
                self.block_read(ReadyBlock(seq, 0, slot, length, xxh, segs,
                                           length, 0, length))
                filled += 1
            else:
                assert isinstance(self.blocks, Plan)  # a "read" state's
                lane = self.blocks.lanes[seq]
                w = lane % server.readers.n if lane >= 0 else server.readers.least_loaded()
                server.readers.submit(w, ["read", [self.tag, seq], slot, self.blocks[seq]])

    def _compress(self) -> None:
        server = self.server
        while self.to_compress and server.compressors is not None:
            assert server.out_ring is not None
            out_slot = server.out_ring.acquire()
            if out_slot is None:
                break
            block = self.to_compress.popleft()
            self.compressing[block.seq] = block
            seal = None if self.data_key is None else [
                self.data_key, self.clone_id, self.state_no, block.seq, block.raw,
                block.span, block.segs]
            server.compressors.submit(server.compressors.least_loaded(),
                                      ["compress", [self.tag, block.seq], block.slot,
                                       out_slot, block.length, self.codec, seal])

    def _next_stream(self, streams: list[Stream]) -> Stream | None:
        """Round robin over the streams with credit left."""
        for i in range(len(streams)):
            cand = streams[(self._rr + i) % len(streams)]
            if cand.credit > 0:
                self._rr = (self._rr + i + 1) % len(streams)
                return cand
        return None

    def _send(self, now: float) -> bool:
        """Send ready blocks while credit lasts; False when the recipient is gone."""
        streams = list(self.streams.values())
        while self.ready:
            stream = self._next_stream(streams)
            if stream is None:
                break
            block = self.ready.popleft()
            ring = self.server.ring_of(block.ring)
            tracker = self.server.send(stream.ident, P.DATA_DESC, block.desc().to_body(),
                                       ring.slot(block.slot, block.length),
                                       copy=False, track=True)
            if tracker is None:
                self.ready.appendleft(block)  # read again after a restart
                self.server.orphan("a stream's connection is gone")
                return False
            stream.credit -= 1
            stream.sent += 1
            self.server.stats.sent(block.raw, block.length)
            self.inflight[block.seq] = (block.ring, block.slot, tracker)
            self.last_sent = now
        return True

    # -- restart after a network failure ---------------------------------------------------
    def orphan(self, now: float) -> list[tuple[int, int, Any]]:
        """ORPHANED: the recipient's connection broke. Its streams are forgotten and
        every block not acknowledged will be read again; the snapshot and the plan stay
        until ``deadline``. Returns the in-flight slots, to free once ZeroMQ is done."""
        self.phase = Phase.ORPHANED
        self.deadline = now + self.restart_timeout
        held = self._rewind()
        self.streams.clear()
        self.server.stats.streams = 0
        return held

    def reinit(self, ident: bytes, ask: M.Reinit, user: str, encrypted: bool,
               now: float) -> tuple[M.Resumed, list[Any]]:
        """A REINIT on a new master stream: checked like an ATTACH (the secret, the
        encryption) and against the clone's user; the blocks the locator names are
        acknowledged, the rest is sent again. Returns the answer and the slots of what
        was in flight. Works in ACTIVE too: the recipient may notice a broken
        connection before the donor does. Blocks stay sealed under the clone's data key
        (from the first master's handshake), which the recipient keeps."""
        self._check_secret(ask.secret, encrypted)
        if user != self.auth_user:
            raise ProtocolError("REINIT by another user than the clone's")
        if ask.restarts > M.MAX_RESTARTS:
            raise ProtocolError(f"more than {M.MAX_RESTARTS} restarts")
        loc = ask.locator
        missed = None
        if ask.serial == self.serial - 1 and self.last_state is not None:
            missed = self.last_state  # its answer was lost: the recipient begins it now
        elif ask.serial != self.serial or loc.state != self.state_no or \
                loc.total_blocks != len(self.blocks):
            raise ProtocolError(f"REINIT at state {ask.serial} ({loc.state}, "
                                f"{loc.total_blocks} blocks); the clone is at state "
                                f"{self.serial} ({self.state}, {len(self.blocks)} blocks)")
        held = self._rewind()
        # The locator is the recipient's word on what is on its disk, and the only one:
        # a recipient that died may have acknowledged blocks it had not made durable.
        self.done = bytearray(len(self.done))
        self.acked = 0
        for seq in range(len(self.blocks)):
            if missed is None and loc.is_done(seq):
                self._done(seq)
        self.todo = deque(seq for seq in range(self.next_block) if not self._is_done(seq))
        resend = len(self.todo)
        self.inflight_seqs = []
        self.streams = {ident: Stream(ident, 0)}
        self.master = ident
        self.server.stats.streams = 1
        self.complete_sent = False  # said again if it was lost
        self.phase = Phase.ACTIVE
        self.restarts = ask.restarts
        self.last_heard = self.last_any = self.last_sent = now
        return M.Resumed(self.clone_id, self.serial, resend, missed), held

    def _is_done(self, seq: int) -> bool:
        return bool(self.done[seq >> 3] & (1 << (seq & 7)))

    def _rewind(self) -> list[tuple[int, int, Any]]:
        """Forget every block on its way: read, compressing, ready or in flight. What
        is in a worker comes back under the old tag and is dropped; what was in flight
        is remembered (``inflight_seqs``) until the REINIT says whether it arrived."""
        self.tag = [self.clone_id, self.tag[1] + 1]
        for block in self.ready:
            self.server.ring_of(block.ring).release(block.slot)
        for block in self.to_compress:
            self.server.ring_of(0).release(block.slot)
        self.ready.clear()
        self.to_compress.clear()
        self.compressing.clear()
        self.inflight_seqs = sorted(set(self.inflight_seqs) | set(self.inflight))
        held = list(self.inflight.values())
        self.inflight.clear()
        self.todo = deque(seq for seq in range(self.next_block) if not self._is_done(seq))
        return held

    def _check_secret(self, secret: str, encrypted: bool) -> None:
        try:
            shown = base64.b64decode(secret, validate=True)
        except ValueError:
            shown = b""
        if not hmac.compare_digest(shown, self.secret):
            raise ProtocolError("ATTACH without the clone's secret")
        if encrypted != (self.data_key is not None):
            raise ProtocolError("a plain stream in an encrypted clone, or the reverse")

    # -- the end ------------------------------------------------------------------------------
    def end(self, err: CloneError | None, send_error: bool) -> list[tuple[int, int, Any]]:
        """ENDED: the snapshot ends, the recipient hears ``err`` when ``send_error``.
        Returns the in-flight slots to free once ZeroMQ is done with them; the other
        slots go back to their rings here."""
        self.phase = Phase.ENDED
        if self.snapshot is not None:
            self.snapshot.end()
        if send_error and err is not None:
            for ident in self.streams:
                self.server.send(ident, P.ERROR, M.ErrorBody(err.errno,
                                                             err.message).to_body())
        for block in self.ready:
            self.server.ring_of(block.ring).release(block.slot)
        assert self.server.ring is not None
        for block in self.to_compress:
            self.server.ring.release(block.slot)
        # blocks still in a compressor come back tagged with the old clone: freed then
        held = list(self.inflight.values())
        self.inflight.clear()
        self.ready.clear()
        self.to_compress.clear()
        return held


def _lstat(path: str) -> os.stat_result:
    """``os.lstat`` of an absolute path, however long."""
    try:
        return os.lstat(path)
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
    slash = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        dfd, name, owned = parent_at(slash, path.lstrip("/"))
        try:
            return os.lstat(name, dir_fd=dfd)
        finally:
            if owned:
                os.close(dfd)
    finally:
        os.close(slash)
