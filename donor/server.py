"""The donor agent: one ROUTER socket, one clone session at a time, a pool of readers.

Runs in the ``serve`` process, which is the coordinator: it owns the ZeroMQ socket,
the shared-memory ring and the reader pool, and it alone handles signals (the
``should_stop`` callback). Bulk bytes go disk -> ring slot (a reader's ``preadv``) ->
network (a zero-copy ZeroMQ send from the same slot). A slot is reused only when the
recipient has acknowledged its block *and* ZeroMQ's tracker says the message is freed.

A session is torn down when the recipient sends EXIT, when it has been silent for
``idle_timeout`` seconds (it died), or when the donor stops (its streams then get
ERROR 1317, as a killed MySQL clone reports). A second recipient while one clone runs
gets ERROR 3634, MySQL's "too many concurrent clones" (the maximum is 1).
"""

from __future__ import annotations

import logging
import os
import platform
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from donor.plan import SKIP_PAGED, Entry, plan, scan
from donor.snapshot import Snapshot
from engine import protocol as P
from engine.codec import CODECS, LEGACY_BLOCK, MAX_BLOCK, valid_block_size
from engine.errors import (
    CloneError,
    NotADataDirectory,
    ProtocolError,
    QueryInterrupted,
    TooManyClones,
    UsageError,
)
from engine.pagestore import PageStore, Workload, is_paged
from engine.ring import Ring, sweep_stale
from engine.stage import Pipeline, calm_gc
from engine.transport import router, tune_allocator

log = logging.getLogger("clone_agent.donor")

AGENT_VERSION = "clone-agent 0.1"
KEEPALIVE_EVERY = 5.0  #: seconds, as MySQL's donor while it waits


def _watch(poller: zmq.Poller, pool: Pipeline) -> None:
    """Wake ``poller`` when a worker of ``pool`` replies (or ends)."""
    for fd in pool.fds:
        poller.register(fd, zmq.POLLIN)


def _unwatch(poller: zmq.Poller, pool: Pipeline) -> None:
    for fd in pool.fds:
        try:
            poller.unregister(fd)
        except KeyError:
            pass


class Stream:
    def __init__(self, ident: bytes, index: int) -> None:
        self.ident = ident
        self.index = index
        self.credit = 0
        self.sent = 0


class Session:
    """One clone in progress on the donor."""

    def __init__(self, server: DonorServer, clone_id: int, master: bytes,
                 body: dict[str, Any]) -> None:
        self.server = server
        self.clone_id = clone_id
        self.snapshot_id = secrets.token_hex(8)
        self.version = P.negotiate(P.want(body, "version", int, 0, 255))
        self.user = str(body.get("user", ""))
        self.streams: dict[bytes, Stream] = {master: Stream(master, 0)}
        self.master = master
        self.snapshot: Snapshot | None = None
        self.ddl_timeout = P.want(body, "ddl_timeout", int, 0, 2592000) \
            if "ddl_timeout" in body else 300
        if server.store is not None:
            self.snapshot = Snapshot(server.store, self.ddl_timeout, server.debug_sync,
                                     server.workload_alive)
        try:
            self.entries: list[Entry] = scan(
                server.datadir, skip=SKIP_PAGED if self.snapshot else ())
        except BaseException:
            if self.snapshot is not None:
                self.snapshot.end()
            raise
        self.total_bytes = sum(e.size for e in self.entries if e.kind == "f")
        self.ready: deque[list[Any]] = deque()
        self.inflight: dict[int, tuple[int, int, Any]] = {}
        self.to_compress: deque[list[Any]] = deque()
        self.compressing: dict[int, list[Any]] = {}
        # The recipient's block size (absent: the size before it was negotiated)
        self.block_size = body.get("block_size", LEGACY_BLOCK)
        if not valid_block_size(self.block_size):
            raise ProtocolError(f"block size {self.block_size!r} not a power of two "
                                "from 64 KiB to 4 MiB")
        compression = body.get("compression", "none")
        if compression not in CODECS:
            raise ProtocolError(f"unknown compression {compression!r}")
        self.codec = CODECS[compression]
        self.start_state("FILE COPY", plan(self.entries, self.block_size), "read")
        self.last_heard = time.monotonic()
        self.last_sent = time.monotonic()
        self._rr = 0
        log.info("clone %d: %d files, %d bytes, %d blocks, for user %r", clone_id,
                 sum(1 for e in self.entries if e.kind == "f"), self.total_bytes,
                 len(self.blocks), self.user)

    def start_state(self, name: str, blocks: list[Any], kind: str) -> None:
        """Begin a snapshot state: ``kind`` "read" (reader processes) or "pages"
        (tracked pages read fresh by the coordinator)."""
        self.state = name
        self.blocks = blocks
        self.kind = kind
        self.next_block = 0
        self.acked = 0
        self.complete_sent = False

    def config_body(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "clone_id": self.clone_id,
            "snapshot_id": self.snapshot_id,
            "server_version": AGENT_VERSION,
            "os": platform.system(),
            "machine": platform.machine(),
            "data_dir": os.path.basename(os.path.abspath(self.server.datadir)),
            "files": len(self.entries),
            "bytes": self.total_bytes,
            "blocks": len(self.blocks),
            "block_size": self.block_size,
            "files_page": P.MAX_FILES_PAGE,
            "paged": self.snapshot is not None,
            "page_size": self.snapshot.page_size if self.snapshot else 0,
        }

    def files_page(self, page: int) -> dict[str, Any]:
        start = page * P.MAX_FILES_PAGE
        chunk = self.entries[start : start + P.MAX_FILES_PAGE]
        return {"page": page, "entries": [e.wire() for e in chunk],
                "last": start + P.MAX_FILES_PAGE >= len(self.entries)}


class DonorServer:
    """Serves ``datadir`` on ``host:port`` until ``should_stop()`` says so."""

    def __init__(self, datadir: str, host: str, port: int, readers: int = 2,
                 slots: int = 16, idle_timeout: float = 60.0, url: str | None = None,
                 workload: int | None = None, debug_sync: dict[str, int] | None = None,
                 ddl_every: float = 3.0, faults: dict[str, Any] | None = None,
                 report: Callable[[str], None] | None = None) -> None:
        if not os.path.isdir(datadir):
            raise UsageError(f"'{datadir}' is not a directory", hint="serve a data directory")
        self.datadir = os.path.abspath(datadir)
        self.host = host
        self.port = port
        self.n_readers = readers
        self.slots = slots
        self.idle_timeout = idle_timeout
        self.url = url
        self.workload_rate = workload
        self.debug_sync = debug_sync or {}
        self.ddl_every = ddl_every
        self.faults = faults or {}
        self.report = report  # 4 times a second: "tps <last_txn> <clone running 0|1>"
        self._next_report = 0.0
        self.store: PageStore | None = None
        self.workload: Workload | None = None
        self._workload_thread: threading.Thread | None = None
        self._workload_stop = threading.Event()
        self._workload_error: BaseException | None = None
        self.session: Session | None = None
        self._next_clone_id = 1
        self.ctx: zmq.Context[Any] | None = None
        self.sock: zmq.Socket[Any] | None = None
        self.ring: Ring | None = None
        self.readers: Pipeline | None = None
        self._releasing: list[tuple[int, int, Any]] = []
        self.out_ring: Ring | None = None
        self.compressors: Pipeline | None = None
        self.poller = zmq.Poller()

    # -- lifetime -------------------------------------------------------------------
    def serve(self, should_stop: Callable[[], bool],
              on_ready: Callable[[str, int], None]) -> None:
        sweep_stale()
        tune_allocator()
        calm_gc()
        self.ctx = zmq.Context(io_threads=2)
        try:
            if is_paged(self.datadir):
                self.store = PageStore(self.datadir)
                self._start_workload()
            elif self.workload_rate is not None:
                raise NotADataDirectory(self.datadir, hint="--workload needs a data directory "
                                        "made by `clone-agent init`")
            self.sock, self.port = router(self.ctx, self.host, self.port, self.url)
            # Slots as large as the largest block a recipient may ask for; a clone of
            # smaller blocks touches (and so costs) only the head of each.
            self.ring = Ring(self.slots, MAX_BLOCK)
            self._start_readers()
            on_ready(self.host, self.port)
            self._loop(should_stop)
        finally:
            self._shutdown()

    def _start_workload(self) -> None:
        if self.workload_rate is None or self.store is None:
            return
        self.workload = Workload(self.store, rate=self.workload_rate,
                                 ddl_every=self.ddl_every,
                                 ddl_hold=float(self.faults.get("ddl_hold", 0)))

        def run() -> None:
            assert self.workload is not None
            try:
                self.workload.run(self._workload_stop.is_set)
            except BaseException as exc:  # noqa: BLE001 - reported by the coordinator
                self._workload_error = exc
                log.error("workload stopped: %s: %s", type(exc).__name__, exc)

        self._workload_thread = threading.Thread(target=run, name="workload", daemon=True)
        self._workload_thread.start()
        log.info("live workload running at %s", f"{self.workload_rate} TPS"
                 if self.workload_rate else "full speed")

    def workload_alive(self) -> bool:
        return self._workload_thread is not None and self._workload_thread.is_alive()

    def _stop_workload(self) -> None:
        if self._workload_thread is not None:
            self._workload_stop.set()
            self._workload_thread.join(30)
            if self.workload is not None:
                log.info("workload: %d transactions at %.0f/s", self.workload.stats.txns,
                         self.workload.stats.tps())
            self._workload_thread = None

    def _start_readers(self) -> None:
        assert self.ring is not None and self.ctx is not None
        self.readers = Pipeline(
            "reader", "donor.reader:Reader", self.n_readers,
            {"ring": self.ring.name, "capacity": self.ring.capacity,
             "slot_size": self.ring.slot_size, "faults": self.faults},
        )
        try:
            self.readers.start()
            self.readers.wait_ready(60)
        except BaseException:
            self.readers.close(abort=True)
            raise

    def _shutdown(self) -> None:
        if self.session is not None:
            self._end_session(QueryInterrupted(), send_error=True)
        self._stop_workload()
        if self.store is not None:
            try:
                self.store.close()
            finally:
                self.store = None
        if self.readers is not None:
            try:
                self.readers.close()
            except CloneError as exc:
                log.warning("reader pool ended badly: %s", exc.message)
        self._stop_compressors()
        self._wait_trackers(5.0)
        if self.sock is not None:
            self.sock.close(0)
        if self.ring is not None:
            self.ring.close()
        if self.ctx is not None:
            self.ctx.term()

    def _wait_trackers(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._releasing and time.monotonic() < deadline:
            self._reap_trackers()
            if self._releasing:
                time.sleep(0.01)  # a ZeroMQ I/O thread frees the frames; nothing to poll

    # -- the loop -------------------------------------------------------------------
    def _loop(self, should_stop: Callable[[], bool]) -> None:
        assert self.sock is not None and self.readers is not None
        self.poller = poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        _watch(poller, self.readers)
        while not should_stop():
            wait_ms = self.readers.poll_ms(100)
            if self.compressors is not None:
                wait_ms = self.compressors.poll_ms(wait_ms)
            ready = dict(poller.poll(wait_ms))
            if self.sock in ready:
                for _ in range(512):
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._on_message(frames)
            try:
                for _, _, reply in self.readers.events():
                    self._on_read(reply)
            except CloneError as exc:
                log.error("reader failed: %s", exc.message)
                if self.session is not None:
                    self._end_session(exc, send_error=True)
                self._restart_readers(poller)
            if self.compressors is not None:
                try:
                    for _, _, reply in self.compressors.events():
                        self._on_compressed(reply)
                except CloneError as exc:
                    log.error("compressor failed: %s", exc.message)
                    if self.session is not None:
                        self._end_session(exc, send_error=True)
                    self._stop_compressors()
            self._pump()
            if self.report is not None and self.store is not None and \
                    time.monotonic() >= self._next_report:
                self._next_report = time.monotonic() + 0.25
                self.report(f"tps {self.store.last_txn} {int(self.session is not None)}")

    def _start_compressors(self) -> None:
        """At the first clone that asks for compression: a send ring and the pool."""
        if self.compressors is not None:
            return
        assert self.ctx is not None and self.ring is not None
        self.out_ring = Ring(self.slots, P.MAX_PAYLOAD)
        self.compressors = Pipeline(
            "compressor", "donor.compressor:CompressorWorker", self.n_readers,
            {"ring": self.ring.name, "capacity": self.ring.capacity,
             "slot_size": self.ring.slot_size, "out_ring": self.out_ring.name,
             "out_capacity": self.out_ring.capacity, "out_slot_size": self.out_ring.slot_size})
        try:
            self.compressors.start()
            self.compressors.wait_ready(60)
        except BaseException:
            self._stop_compressors()
            raise
        _watch(self.poller, self.compressors)

    def _stop_compressors(self) -> None:
        if self.compressors is not None:
            _unwatch(self.poller, self.compressors)
            try:
                self.compressors.close()
            except CloneError as exc:
                log.warning("compressor pool ended badly: %s", exc.message)
            self.compressors = None
        self._wait_trackers(5.0)
        if self.out_ring is not None:
            self.out_ring.close()
            self.out_ring = None

    def _restart_readers(self, poller: zmq.Poller) -> None:
        assert self.readers is not None
        _unwatch(poller, self.readers)
        self.readers.close(abort=True)
        self._start_readers()
        _watch(poller, self.readers)

    # -- messages -------------------------------------------------------------------
    def _reply(self, ident: bytes, frames: list[Any], **kw: Any) -> Any:
        assert self.sock is not None
        try:
            return self.sock.send_multipart([ident, *frames], **kw)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: that peer is gone
            log.info("cannot reach a recipient: %s", exc.strerror)
            return None

    def _on_message(self, frames: list[Any]) -> None:
        ident = bytes(frames[0].buffer)
        try:
            msg = P.decode(frames[1:], P.CMD)
            self._dispatch(ident, msg)
        except CloneError as exc:
            log.warning("recipient error: %s", exc.message)
            self._reply(ident, P.error_response(exc.errno, exc.message))
            s = self.session
            if s is not None and ident in s.streams:
                self._end_session(exc, send_error=True)

    def _dispatch(self, ident: bytes, msg: P.Message) -> None:
        s = self.session
        if msg.kind == P.INIT:
            if s is not None:
                if time.monotonic() - s.last_heard < self.idle_timeout:
                    raise TooManyClones(1)
                self._end_session(QueryInterrupted(), send_error=True)
            clone_id = self._next_clone_id
            self._next_clone_id += 1
            self.session = Session(self, clone_id, ident, msg.body)
            if self.session.codec:
                try:
                    self._start_compressors()
                except CloneError:
                    self._end_session(None, send_error=False)
                    raise
            assert self.sock is not None
            try:
                self.sock.send_multipart([ident, *P.response(P.CONFIG,
                                                             self.session.config_body())])
            except zmq.ZMQError as exc:  # EHOSTUNREACH
                # The recipient left before its answer (a Ctrl-C right after INIT): end
                # the clone now rather than refuse the next one until the idle timeout.
                log.info("clone %d: the recipient left before CONFIG (%s)", clone_id,
                         exc.strerror)
                self._end_session(None, send_error=False)
            return
        if s is None or (msg.body.get("clone_id") != s.clone_id):
            raise ProtocolError("no such clone (it ended, or the donor restarted)")
        s.last_heard = time.monotonic()
        if msg.kind == P.ATTACH:
            if len(s.streams) >= P.MAX_STREAMS:
                raise ProtocolError(f"more than {P.MAX_STREAMS} streams")
            if ident not in s.streams:
                s.streams[ident] = Stream(ident, len(s.streams))
            self._reply(ident, P.response(P.LOCS, {"clone_id": s.clone_id,
                                                   "stream": s.streams[ident].index}))
            return
        stream = s.streams.get(ident)
        if stream is None:
            raise ProtocolError("a stream that did not ATTACH")
        if msg.kind == P.EXECUTE:
            what = msg.body.get("what")
            if what == "files":
                page = P.want(msg.body, "page", int, 0, P.MAX_FILES // P.MAX_FILES_PAGE)
                self._reply(ident, P.response(P.FILES, s.files_page(page)))
            elif what == "data":
                stream.credit = P.want(msg.body, "credit", int, 0, P.MAX_CREDIT)
            elif what == "state":
                self._next_state(ident, s, msg.body.get("state"))
            else:
                raise ProtocolError(f"EXECUTE of unknown work {what!r}")
        elif msg.kind == P.ACK:
            blocks = P.want(msg.body, "blocks", list)
            credit = P.want(msg.body, "credit", int, 0, P.MAX_CREDIT)
            for seq in blocks:
                held = s.inflight.pop(seq, None) if isinstance(seq, int) else None
                if held is None:
                    raise ProtocolError(f"ACK of block {seq!r} that is not in flight")
                self._releasing.append(held)
                s.acked += 1
            stream.credit = min(stream.credit + credit, P.MAX_CREDIT)
        elif msg.kind == P.EXIT:
            if not msg.body.get("ok", False):
                log.info("clone %d: recipient gave up: %s", s.clone_id,
                         msg.body.get("error_message", ""))
            else:
                log.info("clone %d completed (%d blocks)", s.clone_id, s.acked)
            self._end_session(None, send_error=False)
        else:
            raise ProtocolError(f"unexpected command {msg.name}")

    def _next_state(self, ident: bytes, s: Session, name: Any) -> None:
        if not s.complete_sent or s.inflight or s.ready or s.compressing or s.to_compress \
                or s.snapshot is None:
            raise ProtocolError(f"{name!r} asked before {s.state} completed")
        if name == "PAGE COPY" and s.state == "FILE COPY":
            blocks, grown = s.snapshot.page_copy(s.entries, s.block_size)
            s.start_state("PAGE COPY", blocks, "pages")
            body = {"clone_id": s.clone_id, "state": name, "blocks": len(blocks),
                    "bytes": sum(len(b) for b in blocks) * s.snapshot.page_size,
                    "sizes": {str(k): v for k, v in grown.items()}}
        elif name == "REDO COPY" and s.state == "PAGE COPY":
            entry, point = s.snapshot.redo_copy(len(s.entries), s.entries)
            blocks = plan([entry], s.block_size)
            s.start_state("REDO COPY", blocks, "read")
            body = {"clone_id": s.clone_id, "state": name, "blocks": len(blocks),
                    "bytes": entry.size, "redo": {"id": entry.id, "bytes": entry.size},
                    **point}
        else:
            raise ProtocolError(f"no state {name!r} after {s.state}")
        self._reply(ident, P.response(P.STATE, body))

    def _on_read(self, reply: list[Any]) -> None:
        (clone_id, seq), slot, length, xxh, segs, span = reply
        s = self.session
        if s is None or clone_id != s.clone_id:
            assert self.ring is not None
            self.ring.release(slot)  # a read for a clone that has ended
            return
        self._block_read(s, [seq, 0, slot, length, xxh, segs, span, 0, length])

    def _block_read(self, s: Session, item: list[Any]) -> None:
        """A block is in the read ring: compress it first when the clone asked for it."""
        if s.codec:
            s.to_compress.append(item)
        else:
            s.ready.append(item)

    def _on_compressed(self, reply: list[Any]) -> None:
        (clone_id, seq), in_slot, out_slot, codec, wire, xxh = reply
        assert self.ring is not None and self.out_ring is not None
        s = self.session
        item = s.compressing.pop(seq, None) if s is not None and clone_id == s.clone_id \
            else None
        if item is None or s is None:
            self.ring.release(in_slot)
            self.out_ring.release(out_slot)
            return
        if codec:  # what goes on the wire is in the send ring now
            self.ring.release(in_slot)
            item[1:5] = [1, out_slot, wire, xxh]
            item[7] = codec
        else:
            self.out_ring.release(out_slot)
        s.ready.append(item)

    # -- moving blocks --------------------------------------------------------------
    def _ring(self, which: int) -> Ring:
        ring = self.out_ring if which else self.ring
        assert ring is not None
        return ring

    def _reap_trackers(self) -> None:
        keep = []
        for which, slot, tracker in self._releasing:
            if tracker is None or tracker.done:
                self._ring(which).release(slot)
            else:
                keep.append((which, slot, tracker))
        self._releasing = keep

    def _pump(self) -> None:
        self._reap_trackers()
        s = self.session
        if s is None:
            return
        assert self.ring is not None and self.readers is not None
        now = time.monotonic()
        if now - s.last_heard > self.idle_timeout:
            log.warning("clone %d: recipient silent for %.0f s; dropping the clone",
                        s.clone_id, now - s.last_heard)
            self._end_session(None, send_error=False)
            return
        filled = 0
        while s.next_block < len(s.blocks) and filled < 8:
            slot = self.ring.acquire()
            if slot is None:
                break
            if s.kind == "pages":
                assert s.snapshot is not None
                length, xxh, segs = s.snapshot.fill_pages(s.blocks[s.next_block],
                                                           self.ring.slot(slot))
                self._block_read(s, [s.next_block, 0, slot, length, xxh, segs, length, 0,
                                     length])
                filled += 1
            else:
                w = self.readers.least_loaded()
                self.readers.submit(w, ["read", [s.clone_id, s.next_block], slot,
                                        s.blocks[s.next_block]])
            s.next_block += 1
        while s.to_compress and self.compressors is not None:
            assert self.out_ring is not None
            out_slot = self.out_ring.acquire()
            if out_slot is None:
                break
            item = s.to_compress.popleft()
            s.compressing[item[0]] = item
            self.compressors.submit(self.compressors.least_loaded(),
                                    ["compress", [s.clone_id, item[0]], item[2], out_slot,
                                     item[3], s.codec])
        streams = list(s.streams.values())
        while s.ready:
            stream = None
            for i in range(len(streams)):
                cand = streams[(s._rr + i) % len(streams)]
                if cand.credit > 0:
                    stream = cand
                    s._rr = (s._rr + i + 1) % len(streams)
                    break
            if stream is None:
                break
            seq, which, slot, length, xxh, segs, span, comp, raw = s.ready.popleft()
            body = {"seq": seq, "len": length, "xxh": xxh, "comp": comp, "raw": raw,
                    "span": span, "segs": segs}
            ring = self._ring(which)
            tracker = self._reply(stream.ident,
                                  P.response(P.DATA_DESC, body, ring.slot(slot, length)),
                                  copy=False, track=True)
            if tracker is None:
                ring.release(slot)
                self._end_session(None, send_error=False)
                return
            stream.credit -= 1
            stream.sent += 1
            s.inflight[seq] = (which, slot, tracker)
            s.last_sent = now
        if s.acked == len(s.blocks) and not s.complete_sent:
            s.complete_sent = True
            self._reply(s.master, P.response(P.COMPLETE, {"clone_id": s.clone_id,
                                                          "state": s.state,
                                                          "blocks": s.acked}))
            s.last_sent = now
        if now - s.last_sent > KEEPALIVE_EVERY:
            self._reply(s.master, P.response(P.KEEPALIVE, {"clone_id": s.clone_id}))
            s.last_sent = now

    def _end_session(self, err: CloneError | None, send_error: bool) -> None:
        s = self.session
        if s is None:
            return
        self.session = None
        if s.snapshot is not None:
            s.snapshot.end()
        if send_error and err is not None:
            for ident in s.streams:
                self._reply(ident, P.error_response(err.errno, err.message))
        assert self.ring is not None and self.readers is not None
        for which, slot, tracker in s.inflight.values():
            self._releasing.append((which, slot, tracker))
        for item in s.ready:
            self._ring(item[1]).release(item[2])
        for item in s.to_compress:
            self.ring.release(item[2])
        # blocks still in a compressor come back tagged with the old clone: released then
        self.readers.broadcast(["reset"])
