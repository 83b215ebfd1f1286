"""The recipient: ``pull`` and ``clone-local``'s coordinator, a thin sequence of stages.

Runs in the command-line process. :class:`Pull` checks what it can before anything is
created (the donor list, the destination), then runs MySQL's stages in order, each a
call into a part with one owner:

- :class:`~recipient.destination.Destination`: the directory, its status book, and the
  one ending, commit or abort (which removes what the clone created);
- :class:`~recipient.transfer.Transfer`: the streams, credit, autotuning, counters and
  the record of written blocks;
- the shared-memory ring and the writer :class:`~engine.stage.Pipeline`, whose lifetime
  is the ``with`` block of the copy stages;
- :class:`~recipient.manifest.Manifest` (FILE COPY's names, FILE SYNC) and
  :mod:`recipient.recovery` (RECOVERY).

DROP DATA (reach the donor: INIT, CONFIG) -> FILE COPY (manifest pages, then data
blocks) -> PAGE COPY and REDO COPY for a page store -> FILE SYNC -> RECOVERY -> EXIT.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from engine import messages as M
from engine import protocol as P
from engine.codec import block_size_for
from engine.config import CloneConfig, check_valid_donor
from engine.crypto import fingerprint
from engine.errors import CloneError, QueryInterrupted, from_oserror, problems_of
from engine.faults import KillPoints
from engine.fsutil import syncfs
from engine.protocol import MAX_STREAMS, PROTOCOL_VERSION
from engine.ring import Ring, sweep_stale
from engine.stage import Pipeline, calm_gc
from engine.status import COMPLETED, StatusBook
from engine.throttle import RateLimit
from engine.transport import probe, tcp_url, tune_allocator
from recipient import resume
from recipient.destination import Destination
from recipient.manifest import REDO_NAME, Manifest
from recipient.meta import Fidelity
from recipient.replace import ReplaceDestination
from recipient.resume import Interrupted
from recipient.transfer import (
    PREFER_SSL,
    START_STREAMS,
    Security,
    Timeouts,
    Transfer,
    limit_bytes,
)
from recipient.tuner import Tuner
from recipient.writer import Writer

log = logging.getLogger("clone_agent.recipient")

EventSink = Callable[[dict[str, Any]], None]
SLOT_PAD = 4096  #: room in a ring slot beyond the block: a sealed block's nonce and tag
FLUSH_EVERY = 0.5  #: seconds between write-backs of the page cache during FILE COPY

@dataclass
class PullOptions:
    user: str
    host: str
    port: int
    destination: str
    config: CloneConfig
    password: str | None = field(default=None, repr=False)
    state_dir: str | None = None
    connect_timeout: float = 10.0
    idle_timeout: float = 60.0
    writers: int = 2
    url: str | None = None  #: an ipc:// endpoint for clone-local; None: tcp to host:port
    ssl: str = PREFER_SSL  #: REQUIRE SSL, REQUIRE NO SSL, or neither (encrypted if offered)
    pinned: bytes | None = field(default=None, repr=False)  #: the donor key (--ssl-ca)
    should_stop: Callable[[], bool] = field(default=lambda: False)
    emit: EventSink = field(default=lambda event: None)
    keep: Fidelity = field(default_factory=Fidelity)  #: owners, xattrs, ACLs, changes
    replace: bool = False  #: replace the existing data directory ``destination``
    keep_old: str | None = None  #: with ``replace``: where the old data goes, not removed
    faults: dict[str, str] = field(default_factory=dict)  #: kill_at=POINT (tests)
    resume: bool = False  #: continue the interrupted clone into ``destination``


def concurrency_plan(config: CloneConfig, block_size: int) -> tuple[int, int]:
    """(streams, ring slots) from clone_max_concurrency and clone_buffer_size."""
    slots = max(8, min(256, 4 * config.buffer_size // block_size))
    streams = max(1, min(config.max_concurrency, slots, MAX_STREAMS))
    return streams, slots


class EarlyFlush:
    """Write back the destination's page cache every ``every`` seconds during FILE COPY.

    Big blocks go to disk directly (O_DIRECT), but small files and the tails of big ones
    are written through the page cache, and the kernel starts writing those back only
    after 30 s or under memory pressure: without this, FILE SYNC's syncfs would write
    them all at the end while nothing else runs. A thread, since syncfs releases the
    GIL."""

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


def _as_clone_error(exc: BaseException) -> CloneError:
    """What a failure is, in MySQL's terms, at the edge where the pull ends."""
    if isinstance(exc, CloneError):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return QueryInterrupted()
    if isinstance(exc, OSError):
        return from_oserror(exc, "writing the clone")
    return CloneError(f"{type(exc).__name__}: {exc}")


class Pull:
    """One clone into a new directory. Use :func:`pull`."""

    def __init__(self, opts: PullOptions) -> None:
        self.o = opts
        self.book = StatusBook(f"{opts.host}:{opts.port}", opts.destination, opts.state_dir)
        self.record: dict[str, Any] | None = None  #: --resume: DIR/#clone/#resume
        self.dest: Destination | ReplaceDestination = ReplaceDestination(
            opts.destination, self.book, (opts.host, opts.port), opts.keep_old, opts.emit,
            KillPoints(opts.faults.get("kill_at"))) if opts.replace \
            else Interrupted(opts.destination, self.book) if opts.resume \
            else Destination(opts.destination, self.book)
        self.transfer: Transfer | None = None
        self.manifest: Manifest | None = None
        self.point: M.ConsistentPoint | None = None
        self.recovery: dict[str, Any] | None = None
        self.started = time.monotonic()
        self._last_progress = 0.0
        self.checkpoint: resume.Checkpoint | None = None

    # -- the clone ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        o = self.o
        # Every preflight problem is reported at once (MySQL stops at the first).
        refused = problems_of(check_valid_donor, o.config, o.host, o.port) \
            if o.url is None else []
        self.dest.check(refused)
        if o.resume:
            self.record = resume.check(self.dest.root, f"{o.host}:{o.port}")
        sweep_stale()
        self.dest.create()
        try:
            result = self._clone()
        except BaseException as exc:
            err = self.dest.with_pending(_as_clone_error(exc))
            if self.transfer is not None:
                self.transfer.abort(err)
            self.dest.abort(err)
            if err is exc:
                raise
            raise err from exc
        finally:
            self._close()
        return result

    def _clone(self) -> dict[str, Any]:
        o = self.o
        rec = self.record
        if rec is not None:  # the interrupted clone's settings, not today's defaults
            o.config = CloneConfig(**rec["clone_config"])
            o.keep = Fidelity(**rec["keep"])
        block_size = block_size_for(limit_bytes(o.config)) if rec is None \
            else int(rec["config"]["block_size"])
        n_streams, slots = concurrency_plan(o.config, block_size)
        if o.keep.direct_copy:
            # clone-local's fast path: its blocks carry no bytes, so more streams (and
            # autotuning them) would add only their handshakes.
            n_streams = 1
        tune_allocator()
        calm_gc()
        # DROP DATA: nothing to drop in a new directory; this is where we reach the donor.
        self.book.begin_stage("DROP DATA")
        url = o.url
        if url is None:
            probe(o.host, o.port, o.connect_timeout)
            url = tcp_url(o.host, o.port)
        # Restart after a network failure: over a network only (clone-local has none).
        restart = 60 * o.config.donor_timeout_after_network_failure if o.url is None else 0
        t = self.transfer = Transfer(
            url, o.config, Timeouts(o.connect_timeout, o.idle_timeout, o.should_stop,
                                    restart),
            self._progress, Security(o.user, o.password, o.ssl, o.pinned),
            f"{o.host}:{o.port}", self._restarted)
        with ExitStack() as stack:
            # A slot holds a block and, in an encrypted clone, its nonce and tag: one
            # page more, so that every slot still starts on a page (O_DIRECT from it).
            ring = stack.enter_context(Ring(slots, block_size + SLOT_PAD))
            writer_args = {"ring": ring.name, "capacity": ring.capacity,
                           "slot_size": ring.slot_size, "root": self.dest.root}
            for key, mib in (("data_limit", o.config.max_data_bandwidth),
                             ("net_limit", o.config.max_network_bandwidth)):
                if mib:
                    writer_args[key] = stack.enter_context(RateLimit.create(mib)).name
            if rec is not None:
                return self._resumed(stack, t, rec, ring, writer_args, n_streams, slots)
            t.init(M.Init(
                version=PROTOCOL_VERSION, user=o.user,
                streams=n_streams, ddl_timeout=o.config.ddl_timeout, block_size=block_size,
                compression=o.config.compression_algorithm
                if o.config.enable_compression else "none",
                os=platform.system(), machine=platform.machine(), xattrs=o.keep.xattrs,
                acls=o.keep.acls, skip_unreadable=o.keep.skip_unreadable,
                restart_timeout=restart))
            self._security_status()
            if t.keys is not None:  # blocks are opened by the writers
                writer_args["data_key"] = t.keys.data
            # The writers start while the donor scans its data directory for CONFIG;
            # on clone-local's fast path, only if bytes come through the ring in earnest
            # (Transfer._on_block).
            writers = stack.enter_context(Pipeline(
                "writer", "recipient.writer:Writer", o.writers, writer_args,
                lazy=o.keep.direct_copy))
            # The coordinator writes what arrives for a writer still starting (its
            # interpreter is still importing): the first blocks need not wait for it.
            t.local = Writer(-1, writer_args)
            stack.callback(t.local.close)
            self.dest.attach_status()  # durable, while the donor scans
            self._emit_status()
            cfg = t.config()
            self.dest.admit(cfg)  # a replace's last preflight check needs the estimate
            self._end_stage("DROP DATA")

            self.book.begin_stage("FILE COPY", estimate=cfg.bytes, threads=1)
            self._emit_stage("FILE COPY")
            self.manifest = Manifest(self.dest.root, cfg.files, cfg.paged, o.keep, self._warn)
            stack.callback(self.manifest.close)
            # Autotuning starts with START_STREAMS and adds more while they pay (tuner.py).
            t.autotune = o.config.autotune_concurrency and n_streams > START_STREAMS
            t.tuner = Tuner(n_streams, limit_bytes(o.config))
            t.begin_state(M.STATE_NUMBERS["FILE COPY"], cfg.blocks)
            self._checkpoint(stack, cfg, n_streams)
            t.join(min(START_STREAMS, n_streams) if t.autotune else n_streams)
            t.read_manifest(self.manifest, cfg, slots, credit_early=not o.keep.direct_copy)
            self.book.stage("FILE COPY").estimate = self.manifest.total_bytes
            self._copy(cfg, ring, writers, None)
        return self._finish()

    def _copy(self, cfg: M.Config, ring: Ring, writers: Pipeline,
              current: M.State | None) -> None:
        """The copy stages from FILE COPY, or from the state ``current`` of a resumed
        clone (its blocks already written are in the transfer's locator)."""
        o, t = self.o, self.transfer
        assert t is not None
        at = current.state if current is not None else "FILE COPY"
        if at == "FILE COPY":
            with EarlyFlush(self.dest.root, FLUSH_EVERY):
                t.copy_files(current.blocks if current is not None else cfg.blocks, ring,
                             writers, o.keep.fail_on_change)
            self._end_copy_stage("FILE COPY")
        if cfg.paged:
            # PAGE COPY: the pages changed since FILE COPY began, read fresh.
            if at != "REDO COPY":
                self._copy_state("PAGE COPY", ring, writers,
                                 current if at == "PAGE COPY" else None)
            # REDO COPY: the archived redo up to the consistent point.
            self.point = self._copy_state("REDO COPY", ring, writers,
                                          current if at == "REDO COPY" else None).point
        writers.close()
        if self.checkpoint is not None:  # nothing left to resume: the rest is local
            self.checkpoint.close()
            self.checkpoint = None
            resume.remove(self.dest.root)

    def _finish(self) -> dict[str, Any]:
        """FILE SYNC, RECOVERY and the end."""
        t = self.transfer
        assert self.manifest is not None and t is not None
        self._file_sync()
        if self.point is not None:
            self._recover(self.point)
        try:  # the top directory's own metadata last: RECOVERY writes beneath it
            self.manifest.finish_top()
        except OSError as exc:
            raise from_oserror(exc, "FILE SYNC") from None
        self.manifest.close()
        t.finish()
        self.dest.commit()
        return self._summary()

    def _security_status(self) -> None:
        """What the handshake gave: in clone_status, the summary and the events."""
        assert self.transfer is not None
        st = self.book.status
        st.encrypted = self.transfer.encrypted
        keys = self.transfer.keys
        st.donor_key = fingerprint(keys.donor_key) if keys is not None else ""
        if keys is not None and self.o.pinned is None and self.o.url is None:
            log.debug("the donor's key is %s; pin it with --ssl-ca", st.donor_key)

    def _copy_state(self, name: str, ring: Ring, writers: Pipeline,
                    resumed: M.State | None = None) -> M.State:
        """PAGE COPY or REDO COPY: ask for the state, apply its sizes, move its blocks.
        ``resumed``: a resumed clone's current state, applied already, partly copied."""
        assert self.manifest is not None and self.transfer is not None
        state = resumed if resumed is not None else self.transfer.next_state(name)
        if resumed is None:
            self._apply(state)
        self.book.begin_stage(name, estimate=state.bytes,
                              threads=len(self.transfer.streams))
        self._emit_stage(name)
        if resumed is None:
            self.transfer.begin_state(M.STATE_NUMBERS[name], state.blocks)
        self.transfer.run(name, state.blocks, ring, writers)
        self._end_copy_stage(name)
        return state

    def _apply(self, state: M.State, fresh: bool = True) -> None:
        """What a STATE answer changes in the manifest (``fresh`` False: a resumed
        clone's earlier states, whose files are written already)."""
        assert self.manifest is not None
        if state.state == "FILE COPY":
            self.manifest.again(state.again, empty=fresh)
            return
        if state.redo is not None:
            self.manifest.add_internal(state.redo.id, REDO_NAME, state.redo.bytes)
        for fid, size in state.sizes.items():
            self.manifest.grow(fid, size)
        if state.point is not None:
            self.point = state.point

    # -- resume after the recipient died ------------------------------------------------
    def _checkpoint(self, stack: ExitStack, cfg: M.Config, streams: int) -> None:
        """Record where the clone stands, for `pull --resume` (over a network only)."""
        t, o = self.transfer, self.o
        if t is None or not t.t.restart:
            return
        self.checkpoint = stack.enter_context(resume.Checkpoint(self.dest.root, {
            "source": f"{o.host}:{o.port}", "user": o.user, "clone_id": t.clone_id,
            "secret": t.secret, "data_key": resume.b64(t.keys.data if t.keys else None),
            "donor_key": resume.b64(t.donor_key), "config": cfg.to_body(),
            "streams": streams, "clone_config": o.config.as_dict(),
            "keep": dataclasses.asdict(o.keep), "restart_timeout": t.t.restart}))

    def _offer(self) -> None:
        t = self.transfer
        now = time.monotonic()
        if self.checkpoint is None or t is None or t.written is None or \
                not self.checkpoint.due(now):
            return
        # data counts the blocks the locator names: both taken at once, so that a
        # resumed clone's counters go on from here and count nothing twice
        earlier = {row.stage: [row.data, row.network] for row in self.book.progress
                   if row.stage in M.STATE_NUMBERS and row.state == COMPLETED}
        self.checkpoint.offer({"serial": t.serial, "restarts": t.restarts,
                               "states": [st.to_body() for st in t.states],
                               "locator": t.written.copy().to_body(),
                               "data": t.data_bytes, "earlier": earlier}, now)

    def _resumed(self, stack: ExitStack, t: Transfer, rec: dict[str, Any], ring: Ring,
                 writer_args: dict[str, Any], n_streams: int, slots: int) -> dict[str, Any]:
        """`pull --resume`: the interrupted clone's record, REINIT, its manifest again,
        then the copy from where the record says."""
        o = self.o
        cfg = M.Config.from_body(rec["config"], int(rec["config"]["block_size"]))
        states = [M.State.from_body(body) for body in rec["states"]]
        data_key = resume.unb64(rec.get("data_key"))
        t.adopt(cfg, rec["secret"], data_key, resume.unb64(rec.get("donor_key")),
                int(rec["serial"]), states, P.Locator.from_body(rec["locator"]),
                int(rec.get("restarts", 0)))
        if data_key is not None:
            writer_args["data_key"] = data_key
        writers = stack.enter_context(Pipeline(
            "writer", "recipient.writer:Writer", o.writers, writer_args))
        t.local = Writer(-1, writer_args)
        stack.callback(t.local.close)
        self.dest.attach_status()
        self._emit_status()
        missed = t.resume_clone(max(1, int(rec["streams"])))
        self._security_status()
        self._end_stage("DROP DATA")
        self.book.begin_stage("FILE COPY", estimate=cfg.bytes, threads=1)
        self._emit_stage("FILE COPY")
        self.manifest = Manifest(self.dest.root, cfg.files, cfg.paged, o.keep, self._warn)
        self.manifest.resuming = True
        stack.callback(self.manifest.close)
        self._checkpoint(stack, cfg, int(rec["streams"]))
        t.read_manifest(self.manifest, cfg, slots)
        self.book.stage("FILE COPY").estimate = self.manifest.total_bytes
        for state in states:
            self._apply(state, fresh=False)
        if missed is not None:  # its answer never reached the recipient that died
            self._apply(missed)
            t.begin_state(M.STATE_NUMBERS[missed.state], missed.blocks)
        current = t.states[-1] if t.states else None
        earlier = rec.get("earlier") or {}
        for name in ("FILE COPY", "PAGE COPY"):
            if name in earlier and (current is None or current.state != name):
                if name != "FILE COPY":
                    self.book.begin_stage(name)
                self.book.update(name, *earlier[name])
                self._end_stage(name)
        if missed is None:
            t.data_bytes = int(rec.get("data") or 0)
        self._copy(cfg, ring, writers, current)
        return self._finish()

    def _file_sync(self) -> None:
        """FILE SYNC: sizes, links, modes and times; then everything durable."""
        assert self.manifest is not None
        self.book.begin_stage("FILE SYNC", estimate=self.manifest.total_bytes, threads=1)
        self._emit_stage("FILE SYNC")
        try:
            self.manifest.finalize()
        except OSError as exc:
            raise from_oserror(exc, "FILE SYNC") from None
        self.book.update("FILE SYNC", self.manifest.total_bytes, 0)
        self._end_stage("FILE SYNC")

    def _recover(self, point: M.ConsistentPoint) -> None:
        """RECOVERY: replay the archived redo up to the clone LSN (recipient/recovery.py)."""
        from recipient.recovery import recover_clone

        assert self.manifest is not None
        self.book.begin_stage("RECOVERY", estimate=point.archive_bytes, threads=1)
        self._emit_stage("RECOVERY")
        self.recovery = recover_clone(self.dest.root, point, REDO_NAME,
                                      self.manifest.files(), self.manifest.names)
        st = self.book.status
        st.binlog_file = point.binlog_file
        st.binlog_position = point.binlog_position
        st.gtid_executed = point.gtid_executed
        self.book.update("RECOVERY", point.archive_bytes, 0)
        self._end_stage("RECOVERY")

    def _summary(self) -> dict[str, Any]:
        assert self.transfer is not None
        summary = {**self.book.as_dict(), **self.dest.report()}
        summary["autotune"] = [{"t": round(t, 3), "streams": n, "speed": int(v)}
                               for t, n, v in self.transfer.tuner.history]
        if self.point is not None:  # the donor's consistent point, as it reported it
            summary["consistent_point"] = self.point.summary()
        self._emit_status()
        return summary

    def _close(self) -> None:
        if self.transfer is not None:
            self.transfer.close()

    # -- stages and events ------------------------------------------------------------------
    def _end_stage(self, stage: str) -> None:
        self.book.end_stage(stage)
        self._emit_stage(stage)

    def _end_copy_stage(self, stage: str) -> None:
        assert self.transfer is not None
        self.book.update(stage, self.transfer.data_bytes, self.transfer.net_bytes)
        self._end_stage(stage)

    def _progress(self, stage: str, data: int, network: int, threads: int) -> None:
        self.book.update(stage, data, network, threads=threads)
        self._offer()
        now = time.monotonic()
        if now - self._last_progress < 0.5:
            return
        self._last_progress = now
        st = self.book.stage(stage)
        self.o.emit({"event": "progress", "t": round(now - self.started, 3), "stage": stage,
                     "estimate": st.estimate,
                     "data": st.data, "network": st.network, "data_speed": st.data_speed,
                     "network_speed": st.network_speed, "threads": st.threads})

    def _restarted(self, event: dict[str, Any]) -> None:
        """A network failure, or the clone resumed after one: said on stderr (or as an
        event), and counted in clone_status."""
        self.book.status.restarts = event["restarts"]
        self.o.emit({**event, "t": round(time.monotonic() - self.started, 3)})

    def _emit_stage(self, stage: str) -> None:
        st = self.book.stage(stage)
        self.o.emit({"event": "stage", **st.public()})

    def _warn(self, note: M.Note) -> None:
        """Something not kept: logged in clone_status, and an event while listed."""
        shown = note.as_dict()
        if self.book.warn(shown):
            self.o.emit({"event": "warning", **shown})

    def _emit_status(self) -> None:
        self.o.emit({"event": "status", **self.book.as_dict()["clone_status"]})


def pull(opts: PullOptions) -> dict[str, Any]:
    """Clone the donor into ``opts.destination``; returns clone_status and clone_progress."""
    summary = Pull(opts).run()
    assert summary["clone_status"]["state"] == COMPLETED
    return summary
