"""The recipient: ``pull`` and ``clone-local``'s coordinator.

Runs in the command-line process. It owns the ZeroMQ streams (DEALER sockets, one
TCP connection each), the shared-memory ring and the writer pool, the status book
under ``DIR/#clone/``, and the destination directory, which it removes whole if the
clone fails (MySQL's rule for DATA DIRECTORY: nothing of a failed clone stays).

Flow: check the donor list and the destination (before anything is created) ->
create DIR -> DROP DATA (connect, INIT, CONFIG) -> FILE COPY (manifest pages, then
data blocks over every stream, each block copied once from the ZeroMQ frame into a
ring slot and written by a writer process after its checksum is verified) -> FILE
SYNC (sizes, links, modes, times, syncfs) -> EXIT.

Flow control is by credit: each stream is granted a share of the ring's slots; a
block's credit comes back in an ACK once the block is on disk. ``should_stop`` is
polled between messages; every wait is bounded (``connect_timeout`` for the
handshake, ``idle_timeout`` for a donor that falls silent).
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import zmq

from engine import protocol as P
from engine.codec import LEGACY_BLOCK, MAX_SEGMENTS, block_size_for
from engine.config import CloneConfig, check_valid_donor
from engine.errors import (
    CloneError,
    CloneInProgress,
    DatabaseExists,
    DonorError,
    LocalIOError,
    NetworkError,
    ProtocolError,
    QueryInterrupted,
    StageCrashed,
    TooManyClones,
    UsageError,
    by_number,
    from_oserror,
)
from engine.fsutil import remove_tree, syncfs
from engine.ring import Ring, sweep_stale
from engine.stage import Pipeline, calm_gc
from engine.status import COMPLETED, StatusBook
from engine.throttle import MiB, RateLimit
from engine.transport import dealer, mapped_errors, probe, tcp_url, tune_allocator
from recipient.manifest import REDO_NAME, Manifest
from recipient.tuner import Tuner
from recipient.writer import Writer

log = logging.getLogger("clone_agent.recipient")

EventSink = Callable[[dict[str, Any]], None]
PROTOCOL_VERSION = P.PROTOCOL_VERSION
#: Streams open at the start of an autotuned clone: one, as MySQL. Two (one per ZeroMQ
#: I/O thread) made no measurable difference on a 1 GiB tree over loopback (8 pulls
#: each, interleaved: 1.00x).
START_STREAMS = 1
WRITERS_READY_TIMEOUT = 60.0  #: seconds for the writer processes to start
#: FILES pages asked for ahead of the one being checked: the round trips overlap with
#: the checks and the directories made, and at most this many pages wait in memory.
MANIFEST_WINDOW = 4
FLUSH_EVERY = 0.5  #: seconds between write-backs of the page cache during FILE COPY


@dataclass
class PullOptions:
    user: str
    host: str
    port: int
    destination: str
    config: CloneConfig
    password: str | None = None
    state_dir: str | None = None
    connect_timeout: float = 10.0
    idle_timeout: float = 60.0
    writers: int = 2
    url: str | None = None  #: an ipc:// endpoint for clone-local; None: tcp to host:port
    should_stop: Callable[[], bool] = field(default=lambda: False)
    emit: EventSink = field(default=lambda event: None)


def check_destination(path: str) -> str:
    """MySQL's DATA DIRECTORY rules: absolute, not existing, parent existing."""
    if not os.path.isabs(path):
        raise UsageError(f"Incorrect DATA DIRECTORY value: '{path}'",
                         hint="give an absolute path, e.g. /var/lib/clone/new")
    path = os.path.normpath(path)
    if len(os.fsencode(path)) > 4000:
        raise UsageError(f"Incorrect DATA DIRECTORY value: '{path[:60]}...' (too long)")
    if os.path.lexists(path):
        raise DatabaseExists(path)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise LocalIOError(f"the parent directory '{parent}' of the DATA DIRECTORY does not exist",
                           hint="create the parent first; the clone creates only the last part")
    return path


def concurrency_plan(config: CloneConfig, block_size: int) -> tuple[int, int]:
    """(streams, ring slots) from clone_max_concurrency and clone_buffer_size."""
    slots = max(8, min(256, 4 * config.buffer_size // block_size))
    streams = max(1, min(config.max_concurrency, slots, P.MAX_STREAMS))
    return streams, slots


class EarlyFlush:
    """Write back the destination's page cache every ``every`` seconds during FILE COPY.

    Big blocks go to disk directly (O_DIRECT), but small files and the tails of big ones
    are written through the page cache, and the kernel starts writing those back only
    after 30 s or under memory pressure: without this, FILE SYNC's syncfs would write
    them all at the end while nothing else runs (about a tenth of a second for the
    10% of small files in a 1 GiB tree). A thread, since syncfs releases the GIL."""

    def __init__(self, path: str, every: float) -> None:
        self.path = path
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="early-flush", daemon=True)

    def __enter__(self) -> EarlyFlush:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60.0)  # at most the syncfs in progress, which FILE SYNC needs

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                syncfs(self.path)
            except OSError as exc:  # not Linux, or refused: FILE SYNC does it all
                log.debug("early write-back stopped: %s", exc)
                return


class Pull:
    """One clone into a new directory. Use :func:`pull`."""

    def __init__(self, opts: PullOptions) -> None:
        self.o = opts
        self.ctx: zmq.Context[Any] | None = None
        self.streams: list[zmq.Socket[Any]] = []
        self.book = StatusBook(f"{opts.host}:{opts.port}", opts.destination, opts.state_dir)
        self.manifest: Manifest | None = None
        self.clone_id = 0
        self.data_bytes = 0
        self.net_bytes = 0
        self.blocks_done = 0
        self.seen: set[int] = set()
        self.url = ""
        self.point: dict[str, Any] | None = None
        self.started = time.monotonic()
        self.granted: list[int] = []
        self.credit_total = 0
        self.autotune = False
        self.tuner = Tuner(1)
        self.recovery: dict[str, Any] | None = None
        #: writes, in this process, the blocks of a writer still starting (_on_block)
        self.local: Writer | None = None
        #: answers, [seq, slot], taken before _written: the coordinator's own, and the
        #: writers' read while looking for a writer's "ready"
        self.answers: list[list[int]] = []
        self.block_size = 0  #: asked for in INIT, as the donor's CONFIG confirms it
        self.paged = False  #: a page store's clone: PAGE COPY and REDO COPY follow

    # -- wire helpers -----------------------------------------------------------------
    def _send(self, i: int, kind: int, body: dict[str, Any]) -> None:
        with mapped_errors("sending to the donor"):
            self.streams[i].send_multipart(P.command(kind, body), zmq.NOBLOCK)

    def _recv(self, sock: zmq.Socket[Any]) -> P.Message:
        with mapped_errors("receiving from the donor"):
            frames = sock.recv_multipart(copy=False)
        self.net_bytes += sum(len(f.buffer) for f in frames)
        msg = P.decode(frames, P.RESP)
        if msg.kind == P.ERROR:
            errno = P.want(msg.body, "error_no", int)
            text = str(msg.body.get("error_message", ""))
            if errno in (DonorError.errno, TooManyClones.errno, CloneInProgress.errno):
                raise by_number(errno, text)
            raise DonorError(f"{errno} : {text.rstrip('.')}")
        return msg

    def _wait(self, i: int, timeout: float, what: str, watch_master: bool = False) -> P.Message:
        """The next response on stream ``i`` other than KEEPALIVE, within ``timeout``.

        ``watch_master``: stream 0 carries nothing but KEEPALIVE or ERROR now (no data
        is in flight), so read it too: a donor that ends the clone answers there, and
        never on a stream it has not seen ATTACH yet."""
        deadline = time.monotonic() + timeout
        sock = self.streams[i]
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if watch_master and i:
            poller.register(self.streams[0], zmq.POLLIN)
        while True:
            if self.o.should_stop():
                raise QueryInterrupted()
            left = deadline - time.monotonic()
            if left <= 0:
                raise NetworkError(f"no answer from the donor to {what} within {timeout:g} s",
                                   hint="the donor or the network stopped; try again")
            ready = dict(poller.poll(int(min(left, 0.2) * 1000)))
            if i and self.streams[0] in ready:
                msg = self._recv(self.streams[0])  # an ERROR raises
                if msg.kind != P.KEEPALIVE:
                    raise ProtocolError(f"{msg.name} on stream 0 before data was asked")
            if sock in ready:
                msg = self._recv(sock)
                if msg.kind != P.KEEPALIVE:
                    return msg

    # -- the clone ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        o = self.o
        if o.url is None:
            check_valid_donor(o.config, o.host, o.port)
        dest = check_destination(o.destination)
        self.o.destination = dest
        self.book.status.destination = dest
        sweep_stale()
        try:
            os.mkdir(dest, 0o750)
        except FileExistsError:
            raise DatabaseExists(dest) from None
        except OSError as exc:
            raise from_oserror(exc, f"creating {dest}") from None
        try:
            self.book.begin()  # In Progress, error 1317, durable from the first save
            result = self._clone(dest)
        except BaseException as exc:
            err = exc if isinstance(exc, CloneError) else (
                QueryInterrupted() if isinstance(exc, KeyboardInterrupt) else
                from_oserror(exc, "writing the clone") if isinstance(exc, OSError) else None)
            if err is None:
                err = CloneError(f"{type(exc).__name__}: {exc}")
            self._abort(err)
            self.book.fail(err)
            self.book.detach()
            try:
                remove_tree(dest)
            except OSError as rm_exc:
                log.error("could not remove %s: %s", dest, rm_exc)
            self.book.save(force=True, durable=True)
            if err is exc:
                raise
            raise err from exc
        finally:
            self._close()
        return result

    def _clone(self, dest: str) -> dict[str, Any]:
        o = self.o
        self.block_size = block_size_for(self._limit_bytes())
        n_streams, slots = concurrency_plan(o.config, self.block_size)
        tune_allocator()
        calm_gc()
        self.ctx = zmq.Context(io_threads=2)
        # DROP DATA: nothing to drop in a new directory; this is where we reach the donor.
        self.book.begin_stage("DROP DATA")
        url = o.url
        if url is None:
            probe(o.host, o.port, o.connect_timeout)
            url = tcp_url(o.host, o.port)
        self.url = url
        with ExitStack() as stack:
            ring = stack.enter_context(Ring(slots, self.block_size))
            limits = {}
            for key, mib in (("data_limit", o.config.max_data_bandwidth),
                             ("net_limit", o.config.max_network_bandwidth)):
                if mib:
                    limits[key] = stack.enter_context(RateLimit.create(mib)).name
            writer_args = {"ring": ring.name, "capacity": ring.capacity,
                           "slot_size": ring.slot_size, "root": dest, **limits}
            self.streams.append(dealer(self.ctx, url))
            self._send(0, P.INIT, {"version": PROTOCOL_VERSION, "user": o.user,
                                   "password": o.password or "", "agent": "clone-agent",
                                   "os": platform.system(), "machine": platform.machine(),
                                   "streams": n_streams,
                                   "ddl_timeout": o.config.ddl_timeout,
                                   "block_size": self.block_size,
                                   "compression": o.config.compression_algorithm
                                   if o.config.enable_compression else "none"})
            # The writers start while the donor scans its data directory for CONFIG.
            writers = stack.enter_context(Pipeline(
                "writer", "recipient.writer:Writer", o.writers, writer_args))
            # The coordinator writes what arrives for a writer still starting (about a
            # tenth of a second of imports): the first blocks need not wait for it.
            self.local = Writer(-1, writer_args)
            stack.callback(self.local.close)
            # The status under the destination, durable (three fsyncs), while the donor
            # scans: from here a crash leaves "In Progress", error 1317, for `status`.
            self.book.attach(dest)
            self._emit_status()
            try:
                cfg = self._wait(0, o.connect_timeout, "INIT")
            except NetworkError as exc:
                raise DonorError(
                    f"Connect failed: 2003 : no clone-agent answered at '{o.host}:{o.port}' "
                    f"within {o.connect_timeout:g} s",
                    hint="is that `clone-agent serve`? check the port") from exc
            if cfg.kind != P.CONFIG:
                raise ProtocolError(f"{cfg.name} instead of CONFIG")
            self.clone_id = P.want(cfg.body, "clone_id", int, 0)
            # A donor may cut smaller blocks than asked, not larger; one that does not say
            # (before the size was negotiated) cuts 1 MiB.
            self.block_size = P.want(cfg.body, "block_size", int, 1, self.block_size) \
                if "block_size" in cfg.body else min(self.block_size, LEGACY_BLOCK)
            total_files = P.want(cfg.body, "files", int, 0, P.MAX_FILES)
            total_blocks = P.want(cfg.body, "blocks", int, 0, 1 << 40)
            per_page = P.want(cfg.body, "files_page", int, 1, P.MAX_FILES_PAGE) \
                if "files_page" in cfg.body else 0
            self.paged = bool(cfg.body.get("paged"))
            self.book.end_stage("DROP DATA")
            self._emit_stage("DROP DATA")

            st = self.book.begin_stage("FILE COPY", estimate=P.want(cfg.body, "bytes", int, 0),
                                       threads=1)
            self._emit_stage("FILE COPY")
            self.manifest = Manifest(dest, total_files, self.paged)
            # Autotuning starts with START_STREAMS and adds more while they pay (tuner.py).
            self.autotune = o.config.autotune_concurrency and n_streams > START_STREAMS
            self.tuner = Tuner(n_streams, self._limit_bytes())
            self._attach_streams(min(START_STREAMS, n_streams) if self.autotune
                                 else n_streams)
            pages = max(1, -(-total_files // per_page)) if per_page else 0
            self._read_manifest(pages, slots)
            if len(self.manifest.items) != total_files:
                raise ProtocolError("manifest shorter than announced")
            st.estimate = self.manifest.total_bytes
            with EarlyFlush(dest, FLUSH_EVERY):
                self._transfer(ring, writers, total_blocks, "FILE COPY")
            self._end_copy_stage("FILE COPY")
            point: dict[str, Any] | None = None
            if self.paged:
                # PAGE COPY: the pages changed since FILE COPY began, read fresh.
                self._copy_state("PAGE COPY", ring, writers)
                # REDO COPY: the archived redo up to the consistent point.
                point = self._copy_state("REDO COPY", ring, writers)
                self.point = point
            writers.close()

        self.book.begin_stage("FILE SYNC", estimate=self.manifest.total_bytes, threads=1)
        self._emit_stage("FILE SYNC")
        try:
            self.manifest.finalize()
        except OSError as exc:
            raise from_oserror(exc, "FILE SYNC") from None
        self.book.update("FILE SYNC", self.manifest.total_bytes, 0)
        self.book.end_stage("FILE SYNC")
        self._emit_stage("FILE SYNC")
        if point is not None:
            self._recover(dest, point)
        self._send(0, P.EXIT, {"clone_id": self.clone_id, "ok": True})
        self.book.complete()
        summary = self.book.as_dict()
        summary["autotune"] = [{"t": round(t, 3), "streams": n, "speed": int(v)}
                               for t, n, v in self.tuner.history]
        if point is not None:  # the donor's consistent point, as it reported it
            summary["consistent_point"] = {
                key: point[key] for key in ("clone_lsn", "archive_lsn", "last_txn",
                                            "archive_bytes", "blocked_s") if key in point}
        self._emit_status()
        return summary

    def _read_manifest(self, pages: int, slots: int) -> None:
        """FILES pages, MANIFEST_WINDOW of them asked for ahead; data credit as soon as the
        last page is asked for. The donor answers a stream's commands in order, so every
        FILES page comes before the first block on stream 0, and the donor's first reads
        and sends overlap with the checks here. ``pages`` 0: a donor that does not say
        its page size; one page at a time, credit after the last."""
        assert self.manifest is not None
        asked = 0
        credited = False
        page = 0
        while True:
            while asked <= page or (asked < pages and asked - page < MANIFEST_WINDOW):
                self._send(0, P.EXECUTE, {"clone_id": self.clone_id, "what": "files",
                                          "page": asked})
                asked += 1
            if not credited and asked == pages:
                self._grant_credit(slots)
                credited = True
            msg = self._wait(0, self.o.idle_timeout, "EXECUTE files")
            if msg.kind != P.FILES or msg.body.get("page") != page:
                raise ProtocolError(f"{msg.name} instead of FILES page {page}")
            last = self.manifest.add_page(msg.body)
            if last != (page == pages - 1) and pages:
                raise ProtocolError(f"FILES page {page} of {pages} says last={last}")
            if last:
                break
            page += 1
        if not credited:
            self._grant_credit(slots)

    def _next_state(self, name: str) -> dict[str, Any]:
        """Ask the donor for the next snapshot state; its STATE answer."""
        self._send(0, P.EXECUTE, {"clone_id": self.clone_id, "what": "state", "state": name})
        msg = self._wait(0, self.o.idle_timeout, f"EXECUTE {name}")
        if msg.kind != P.STATE or msg.body.get("state") != name:
            raise ProtocolError(f"{msg.name} instead of STATE {name}")
        P.want(msg.body, "blocks", int, 0, 1 << 40)
        P.want(msg.body, "bytes", int, 0, 1 << 50)
        return msg.body

    def _copy_state(self, name: str, ring: Ring, writers: Pipeline) -> dict[str, Any]:
        """PAGE COPY or REDO COPY: ask for the state, apply its sizes, move its blocks."""
        assert self.manifest is not None
        body = self._next_state(name)
        if "redo" in body:
            redo = P.want(body, "redo", dict)
            self.manifest.add_internal(P.want(redo, "id", int, 0, P.MAX_FILES), REDO_NAME,
                                       P.want(redo, "bytes", int, 0, P.MAX_FILE_SIZE))
        for fid, size in P.want(body, "sizes", dict).items():
            self.manifest.grow(int(fid), P.want({"s": size}, "s", int, 0, P.MAX_FILE_SIZE))
        self.book.begin_stage(name, estimate=body["bytes"], threads=len(self.streams))
        self._emit_stage(name)
        self._transfer(ring, writers, body["blocks"], name)
        self._end_copy_stage(name)
        return body

    def _end_copy_stage(self, stage: str) -> None:
        self.book.update(stage, self.data_bytes, self.net_bytes)
        self.book.end_stage(stage)
        self._emit_stage(stage)
        self.data_bytes = self.net_bytes = 0
        self.seen.clear()
        self.blocks_done = 0

    def _recover(self, dest: str, point: dict[str, Any]) -> None:
        """RECOVERY: replay the archived redo up to the clone LSN (recipient/recovery.py)."""
        from recipient.recovery import recover_clone

        self.book.begin_stage("RECOVERY", estimate=int(point["bytes"]), threads=1)
        self._emit_stage("RECOVERY")
        assert self.manifest is not None
        files = {i.rel for i in self.manifest.items.values() if i.kind == "f" and not i.internal}
        try:
            result = recover_clone(dest, point, REDO_NAME, files, self.manifest.names)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"consistent point malformed: {exc}") from None
        st = self.book.status
        st.binlog_file = str(point.get("binlog_file", ""))
        st.binlog_position = int(point.get("binlog_position", 0))
        st.gtid_executed = str(point.get("gtid_executed", ""))
        self.book.update("RECOVERY", int(point["bytes"]), 0)
        self.book.end_stage("RECOVERY")
        self._emit_stage("RECOVERY")
        self.recovery = result

    def _attach_streams(self, n: int, start: int = 1, before_data: bool = True) -> None:
        """Open streams ``start`` .. ``n-1`` (ATTACH, LOCS). ``before_data``: no data is
        in flight yet, so stream 0 is watched for an ERROR meanwhile."""
        assert self.ctx is not None
        for i in range(start, n):
            self.streams.append(dealer(self.ctx, self.url))
            self._send(i, P.ATTACH, {"clone_id": self.clone_id, "stream": i})
        for i in range(start, n):
            msg = self._wait(i, self.o.connect_timeout, "ATTACH", watch_master=before_data)
            if msg.kind != P.LOCS:
                raise ProtocolError(f"{msg.name} instead of LOCS")

    def _limit_bytes(self) -> int:
        mib = min((m for m in (self.o.config.max_data_bandwidth,
                               self.o.config.max_network_bandwidth) if m), default=0)
        return mib * MiB

    def _grant_credit(self, slots: int) -> None:
        """Credit: the ring's slots (fewer under a bandwidth limit: about a tenth of a
        second in flight), shared evenly by the streams and rebalanced as they grow."""
        limit = self._limit_bytes()
        if limit:
            slots = min(slots, max(2, limit // 10 // self.block_size + 1))
        self.credit_total = slots
        self.granted = [0] * len(self.streams)
        for i in range(len(self.streams)):
            self._send(i, P.EXECUTE, {"clone_id": self.clone_id, "what": "data", "credit": 0})
        self._rebalance({})

    def _rebalance(self, acked: dict[int, list[int]]) -> None:
        """ACK what was written; hand each stream credit up to its share of the total."""
        n = len(self.streams)
        share = [self.credit_total // n + (1 if i < self.credit_total % n else 0)
                 for i in range(n)]
        for i, seqs in acked.items():
            self.granted[i] -= len(seqs)
        pool = self.credit_total - sum(self.granted)
        for i in range(n):
            give = max(0, min(share[i] - self.granted[i], pool))
            pool -= give
            self.granted[i] += give
            if give or acked.get(i):
                self._send(i, P.ACK, {"clone_id": self.clone_id, "blocks": acked.get(i, []),
                                      "credit": give})

    def _add_streams(self, count: int, poller: zmq.Poller) -> None:
        """Autotuning: open streams up to ``count`` (ATTACH, then data with no credit)."""
        first = len(self.streams)
        self._attach_streams(count, start=first, before_data=False)
        for i in range(first, count):
            poller.register(self.streams[i], zmq.POLLIN)
            self.granted.append(0)
            self._send(i, P.EXECUTE, {"clone_id": self.clone_id, "what": "data", "credit": 0})
        log.debug("autotune: %d streams", count)

    def _transfer(self, ring: Ring, writers: Pipeline, total_blocks: int, stage: str) -> None:
        """Receive every block, hand it to a writer, acknowledge it once it is written."""
        assert self.manifest is not None
        poller = zmq.Poller()
        for sock in self.streams:
            poller.register(sock, zmq.POLLIN)
        for fd in writers.fds + writers.sentinels():
            poller.register(fd, zmq.POLLIN)
        origin: dict[int, tuple[int, int]] = {}  # block seq -> (stream index, span)
        acks: dict[int, list[int]] = {}
        complete = False
        last_heard = time.monotonic()
        last_ping = time.monotonic()
        self.tuner.reset(last_heard, self.data_bytes, len(self.streams))
        while not (complete and self.blocks_done == total_blocks):
            if self.o.should_stop():
                raise QueryInterrupted()
            events = dict(poller.poll(writers.poll_ms(200)))
            now = time.monotonic()
            grow = self.tuner.sample(now, self.data_bytes) if self.autotune else None
            if grow is not None and not complete:
                self._add_streams(grow, poller)
                self._rebalance({})
            for i, sock in enumerate(self.streams):
                if sock not in events:
                    continue
                for _ in range(64):
                    if not sock.poll(0):
                        break
                    msg = self._recv(sock)
                    last_heard = now
                    if msg.kind == P.DATA_DESC:
                        self._on_block(i, msg, ring, writers, origin, total_blocks)
                    elif msg.kind == P.COMPLETE:
                        complete = True
                    elif msg.kind != P.KEEPALIVE:
                        raise ProtocolError(f"unexpected {msg.name} during {stage}")
            for seq, slot in self._written(writers):
                ring.release(slot)
                self.blocks_done += 1
                stream_index, span = origin.pop(seq)
                self.data_bytes += span  # data counts what is written, as it is written
                acks.setdefault(stream_index, []).append(seq)
            if acks:
                self._rebalance(acks)
                last_ping = now
                acks.clear()
            if now - last_ping > 2.0:
                self._send(0, P.ACK, {"clone_id": self.clone_id, "blocks": [], "credit": 0})
                last_ping = now
            if now - last_heard > self.o.idle_timeout:
                raise NetworkError(f"the donor has been silent for {self.o.idle_timeout:g} s")
            self.book.update(stage, self.data_bytes, self.net_bytes,
                             threads=len(self.streams))
            self._emit_progress(stage)
        if len(self.seen) != total_blocks:
            raise ProtocolError(f"COMPLETE after {len(self.seen)} of {total_blocks} blocks")

    def _on_block(self, stream: int, msg: P.Message, ring: Ring, writers: Pipeline,
                  origin: dict[int, tuple[int, int]], total_blocks: int) -> None:
        assert self.manifest is not None
        body = msg.body
        seq = P.want(body, "seq", int, 0, total_blocks - 1)
        if seq in self.seen:
            raise ProtocolError(f"block {seq} sent twice")
        length = P.want(body, "len", int, 0, self.block_size)  # compressed: smaller
        raw = P.want(body, "raw", int, 0, self.block_size)
        comp = P.want(body, "comp", int, 0, 2)
        xxh = P.want(body, "xxh", int, 0, (1 << 64) - 1)
        span = P.want(body, "span", int, raw, self.block_size)
        segs = P.want(body, "segs", list)
        if len(segs) > MAX_SEGMENTS or length != len(msg.payload) or (
                comp == 0 and length != raw):
            raise ProtocolError(f"block {seq} is malformed")
        out = []
        total = 0
        for seg in segs:
            if not (isinstance(seg, list) and len(seg) == 3
                    and all(type(v) is int for v in seg)):
                raise ProtocolError(f"block {seq} has a malformed segment")
            fid, off, size = seg
            item = self.manifest.file(fid)
            if off < 0 or size <= 0 or off + size > item.size:
                raise ProtocolError(f"block {seq} writes outside {item.rel!r}")
            if off == 0 and size == item.size and not self.paged:
                # The whole file in one segment: its writer finishes it (mode, times).
                # Not in a page store's clone: PAGE COPY may write its pages again.
                out.append([item.rel, off, size, item.mode, item.mtime_ns])
                item.done = True
            else:
                out.append([item.rel, off, size])
            total += size
        if total != raw:
            raise ProtocolError(f"block {seq}: segments do not add up to its length")
        slot = ring.acquire()
        if slot is None:
            raise ProtocolError("the donor sent more blocks than its credit")
        ring.slot(slot, length)[:] = msg.payload
        self.seen.add(seq)
        origin[seq] = (stream, span)
        # A batch of small files creates files: keep a directory on one writer, so that
        # two writers do not spin on the same directory lock (ext4 holds it while it
        # allocates an inode). Blocks of big files go to the least loaded writer.
        writer = hash(out[0][0].rpartition("/")[0]) % writers.n if len(out) > 1 \
            else writers.least_loaded()
        work = ["write", seq, slot, length, xxh, comp, raw, out]
        if not writers.is_ready(writer):
            # Its "ready" may wait unread in its channel (nothing read the writers while
            # the manifest came): read them now rather than write here for nothing.
            self.answers += [payload for _, _, payload in writers.events()]
        if writers.is_ready(writer):
            writers.submit(writer, work)
        else:
            assert self.local is not None
            self.answers.append(self.local.handle(work))

    def _written(self, writers: Pipeline) -> list[list[int]]:
        """``[seq, slot]`` of every block written since the last call: by the writers,
        and by the coordinator itself for a writer still starting. Credit is granted
        before the writers are up (they boot while the handshake and the manifest
        travel), and the first blocks would otherwise wait for them in the ring."""
        done = [payload for _, _, payload in writers.events()]
        if self.answers:
            done += self.answers
            self.answers = []
        if not writers.all_ready and time.monotonic() - self.started > WRITERS_READY_TIMEOUT:
            raise StageCrashed("writer", f"not ready within {WRITERS_READY_TIMEOUT:.0f} s")
        return done

    # -- ending -------------------------------------------------------------------------
    def _abort(self, err: CloneError) -> None:
        if self.streams and self.clone_id:
            try:
                self.streams[0].send_multipart(
                    P.command(P.EXIT, {"clone_id": self.clone_id, "ok": False,
                                       "error_no": err.errno,
                                       "error_message": err.message}), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def _close(self) -> None:
        if self.manifest is not None:
            self.manifest.close()
        for sock in self.streams:
            sock.close(linger=200)
        self.streams = []
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None

    # -- events ---------------------------------------------------------------------------
    _last_progress = 0.0

    def _emit_progress(self, stage: str) -> None:
        now = time.monotonic()
        if now - self._last_progress < 0.5:
            return
        self._last_progress = now
        st = self.book.stage(stage)
        self.o.emit({"event": "progress", "t": round(now - self.started, 3), "stage": stage,
                     "estimate": st.estimate,
                     "data": st.data, "network": st.network, "data_speed": st.data_speed,
                     "network_speed": st.network_speed, "threads": st.threads})

    def _emit_stage(self, stage: str) -> None:
        st = self.book.stage(stage)
        self.o.emit({"event": "stage", **st.public()})

    def _emit_status(self) -> None:
        self.o.emit({"event": "status", **self.book.as_dict()["clone_status"]})


def pull(opts: PullOptions) -> dict[str, Any]:
    """Clone the donor into ``opts.destination``; returns clone_status and clone_progress."""
    summary = Pull(opts).run()
    assert summary["clone_status"]["state"] == COMPLETED
    return summary
