"""The donor agent: one ROUTER socket, one clone session at a time, a pool of readers.

Runs in the ``serve`` process, which is the coordinator: it owns the ZeroMQ socket,
the shared-memory ring and the reader pool, and it alone handles signals (the
``should_stop`` callback). Bulk bytes go disk -> ring slot (a reader's ``preadv``) ->
network (a zero-copy ZeroMQ send from the same slot). A slot is reused only when the
recipient has acknowledged its block *and* ZeroMQ's tracker says the message is freed.

A session is torn down when the recipient sends EXIT, when it makes no progress for
``idle_timeout`` seconds, or when the donor stops (its streams then get ERROR 1317, as
a killed MySQL clone reports). A session whose recipient's connection broke (a send
failed, or nothing came for ``ORPHAN_AFTER`` s) is orphaned: it waits for a REINIT
for as long as the recipient asked in INIT (clone_donor_timeout_after_network_failure),
then ends. A second recipient while one clone runs, or waits, gets ERROR 3634, MySQL's
"too many concurrent clones" (the maximum is 1), with the time left in its hint; the
same user from the same host, starting over with a new INIT, takes an orphaned
clone's place.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import zmq

from donor.control import ServeControl
from donor.gate import Gate, _Delayed
from donor.session import ORPHAN_AFTER, Phase, ReadyBlock, Session
from engine import crypto
from engine import messages as M
from engine import protocol as P
from engine.auth import UsersFile
from engine.codec import MAX_BLOCK
from engine.errors import (
    CloneError,
    CloneInProgress,
    DonorError,
    NetworkError,
    NotADataDirectory,
    ProtocolError,
    QueryInterrupted,
    StageCrashed,
    TooManyClones,
    UsageError,
)
from engine.metrics import DonorStats
from engine.pagestore import PageStore, Workload, is_paged
from engine.ring import Ring, sweep_stale
from engine.stage import Pipeline, calm_gc
from engine.transport import router, tune_allocator

log = logging.getLogger("clone_agent.donor")

POOL_READY_TIMEOUT = 60.0  #: seconds for a pool's workers to start
#: Seconds of silence after which a new INIT finds the running clone's recipient gone
#: (it pings every 2 s while it copies).
SILENT_AT_INIT = 5.0


def _peer(frame: Any) -> str:
    """The peer's address as ZeroMQ saw it ("" for an ipc:// peer)."""
    try:
        return str(frame.get("Peer-Address") or "")
    except (zmq.ZMQError, AttributeError):
        return ""


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


class DonorServer:
    """Serves ``datadir`` on ``host:port`` until ``should_stop()`` says so."""

    #: ``serve`` is ready once its readers are: one that cannot start fails at once,
    #: not at the first clone. clone-local's donor turns it off (its readers start while
    #: the handshake and the scan run; a failure fails that clone alike).
    pools_ready_first = True
    #: clone-local's fast path: the readers copy into the destination (donor/direct.py)
    direct = False
    #: FILE COPY's plan in this many lanes, a reader each (donor/plan.py): the fast path
    #: sets it to its readers
    lanes = 1

    def __init__(self, datadir: str, host: str, port: int, readers: int = 2,
                 slots: int = 16, idle_timeout: float = 60.0, url: str | None = None,
                 workload: int | None = None, debug_sync: dict[str, int] | None = None,
                 ddl_every: float = 3.0, faults: dict[str, Any] | None = None,
                 report: Callable[[str], None] | None = None,
                 users: UsersFile | None = None, key: crypto.StaticKey | None = None,
                 require_secure_transport: bool = False) -> None:
        """``users``: who may clone (None: anyone, which the command line allows only
        with --allow-anonymous); ``key``: the donor's key pair (None: one made now, for
        this server's life)."""
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
        #: (ring, slot, tracker) of sent blocks, freed once ZeroMQ is done with them
        self._releasing: list[tuple[int, int, Any]] = []
        self.out_ring: Ring | None = None
        self.compressors: Pipeline | None = None
        self.poller = zmq.Poller()
        # No key given: one is made when first needed (serve's start names it;
        # clone-local's recipient never asks for encryption, so its donor makes none).
        self.gate = Gate(users, key, require_secure_transport)
        #: the local control channel (a `pull --replace` of this directory: RESTART)
        self.control: ServeControl | None = None
        self.released = False  #: the directory is let go for a replace
        #: counts for --metrics-addr and `status --donor` (engine/metrics.py)
        self.stats = DonorStats(auth_failures=lambda: self.gate.auth_failures)

    # -- lifetime -------------------------------------------------------------------
    def serve(self, should_stop: Callable[[], bool],
              on_ready: Callable[[str, int], None]) -> None:
        """Everything this starts is ended on the way out, in reverse order: the
        session, the workload and the store, the pools, the socket, the rings."""
        sweep_stale()
        tune_allocator()
        calm_gc()
        with ExitStack() as stack:
            # First: an interrupted replace settled, and the directory held (shared).
            self.control = stack.enter_context(ServeControl(self, self.datadir))
            self.ctx = zmq.Context(io_threads=2)
            stack.callback(self._term_context)
            stack.callback(self._close_store)
            self._open_store()
            # Slots as large as the largest block a recipient may ask for; a clone of
            # smaller blocks touches (and so costs) only the head of each.
            self.ring = stack.enter_context(Ring(self.slots, MAX_BLOCK))
            stack.callback(self._stop_pools)
            self.sock, self.port = router(self.ctx, self.host, self.port, self.url)
            stack.callback(self.sock.close, 0)
            self._start_readers()
            if self.url is None:  # clone-local's donor is its command line's alone
                self.control.listen(f"{self.host}:{self.port}", self.poller)
                log.info("donor key %s%s", self.gate.key.fingerprint,
                         "; anyone may clone (--allow-anonymous)" if self.gate.anonymous
                         else "")
            on_ready(self.host, self.port)
            try:
                self._loop(should_stop)
            finally:
                if self.session is not None:
                    self.end_session(QueryInterrupted(), send_error=True)

    def _term_context(self) -> None:
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None

    def _open_store(self, start_workload: bool = True) -> None:
        if is_paged(self.datadir):
            self.store = PageStore(self.datadir)
            self._workload_stop.clear()
            if start_workload:
                self._start_workload()
        elif self.workload_rate is not None:
            raise NotADataDirectory(self.datadir, hint="--workload needs a data directory "
                                    "made by `clone-agent init`")

    # -- RESTART: asked by donor/control.py for a `pull --replace` of this directory ------
    def describe(self) -> dict[str, Any]:
        return {"paged": self.store is not None, "workload": self.workload_rate,
                "last_txn": self.store.last_txn if self.store is not None else None}

    def release_datadir(self) -> dict[str, Any]:
        """Let go of the directory: the clone being served ends (1317, as when the donor
        stops), the workload stops, the store closes cleanly. INIT is refused (3874)
        until :meth:`reopen_datadir`."""
        self.end_session(QueryInterrupted(), send_error=True)
        last_txn = self.store.last_txn if self.store is not None else None
        self._close_store()
        self.released = True
        return {"last_txn": last_txn}

    def reopen_datadir(self) -> dict[str, Any]:
        """Serve the directory again, as at start: its store, and its workload, which
        goes on from the store's last transaction + 1."""
        if self.faults.get("die_at_reopen"):  # tests: a server that crashes coming back
            os.kill(os.getpid(), signal.SIGKILL)
        self._open_store(start_workload=False)
        self.released = False
        opened = self.describe()  # as recovered: the clone's last transaction, K
        self._start_workload()  # which the workload continues from K + 1
        return opened

    def _close_store(self) -> None:
        self._stop_workload()
        if self.store is not None:
            try:
                self.store.close()
            finally:
                self.store = None

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

    # -- the worker pools -----------------------------------------------------------------
    def _pool(self, name: str, target: str, args: dict[str, Any],
              wait: bool | None = None) -> Pipeline:
        """A started pool whose workers are ready (``wait``, by default
        :attr:`pools_ready_first`); on failure, none is left running."""
        pool = Pipeline(name, target, self.n_readers, args)
        try:
            pool.start()
            if self.pools_ready_first if wait is None else wait:
                pool.wait_ready(POOL_READY_TIMEOUT)
        except BaseException:
            pool.close(abort=True)
            raise
        _watch(self.poller, pool)
        return pool

    def _start_readers(self, wait: bool | None = None) -> None:
        assert self.ring is not None
        self.readers = self._pool(
            "reader", "donor.reader:Reader",
            {"ring": self.ring.name, "capacity": self.ring.capacity,
             "slot_size": self.ring.slot_size, "faults": self.faults, "root": self.datadir},
            wait)

    def _restart_readers(self) -> None:
        assert self.readers is not None
        _unwatch(self.poller, self.readers)
        self.readers.close(abort=True)
        self.readers = None
        # Ready before serving again, even where the first start was not awaited: a
        # reader that fails as it starts then fails the server, not a loop of restarts.
        self._start_readers(wait=True)

    def _start_compressors(self) -> None:
        """At the first clone that asks for compression: a send ring and the pool."""
        if self.compressors is not None:
            return
        assert self.ring is not None
        self.out_ring = Ring(self.slots, P.MAX_PAYLOAD)
        try:
            self.compressors = self._pool(
                "compressor", "donor.compressor:CompressorWorker",
                {"ring": self.ring.name, "capacity": self.ring.capacity,
                 "slot_size": self.ring.slot_size, "out_ring": self.out_ring.name,
                 "out_capacity": self.out_ring.capacity,
                 "out_slot_size": self.out_ring.slot_size})
        except BaseException:
            self._stop_compressors()
            raise

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

    def _stop_pools(self) -> None:
        if self.readers is not None:
            _unwatch(self.poller, self.readers)
            try:
                self.readers.close()
            except CloneError as exc:
                log.warning("reader pool ended badly: %s", exc.message)
            self.readers = None
        self._stop_compressors()
        self._wait_trackers(5.0)

    def _wait_trackers(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._releasing and time.monotonic() < deadline:
            self._reap_trackers()
            if self._releasing:
                time.sleep(0.01)  # a ZeroMQ I/O thread frees the frames; nothing to poll

    # -- the loop -------------------------------------------------------------------
    def _loop(self, should_stop: Callable[[], bool]) -> None:
        assert self.sock is not None
        self.poller.register(self.sock, zmq.POLLIN)
        while not should_stop():
            assert self.readers is not None
            wait_ms = self.readers.poll_ms(100)
            if self.compressors is not None:
                wait_ms = self.compressors.poll_ms(wait_ms)
            ready = dict(self.poller.poll(wait_ms))
            if self.sock in ready:
                self._receive()
            if self.control is not None:
                self.control.handle(ready)
            self._pool_events()
            self._pump()
            if self.report is not None and self.store is not None and \
                    time.monotonic() >= self._next_report:
                self._next_report = time.monotonic() + 0.25
                self.report(f"tps {self.store.last_txn} {int(self.session is not None)}")

    def _receive(self) -> None:
        assert self.sock is not None
        for _ in range(512):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_message(frames)

    def _pool_events(self) -> None:
        """The pools' answers; a crashed worker ends the clone it served."""
        assert self.readers is not None
        try:
            for _, _, reply in self.readers.events():
                self._on_read(reply)
        except CloneError as exc:
            log.error("reader failed: %s", exc.message)
            self.end_session(exc, send_error=True)
            self._restart_readers()
        if self.compressors is not None:
            try:
                for _, _, reply in self.compressors.events():
                    self._on_compressed(reply)
            except CloneError as exc:
                log.error("compressor failed: %s", exc.message)
                self.end_session(exc, send_error=True)
                self._stop_compressors()

    # -- messages -------------------------------------------------------------------
    def send(self, ident: bytes, kind: int, body: dict[str, Any], payload: Any = None,
             **kw: Any) -> Any:
        """Send to one peer, sealed when its connection is encrypted (HELLO's answer
        never is); None when it is gone (else the tracker of a tracked send, or True)."""
        assert self.sock is not None
        cipher = self.gate.cipher(ident) if kind not in P.UNSEALED_RESPONSES or \
            kind == P.ERROR else None
        try:
            tracker = self.sock.send_multipart(
                [ident, *P.response(kind, body, payload, cipher=cipher)], **kw)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: that peer is gone
            log.info("cannot reach a recipient: %s", exc.strerror)
            return None
        return True if tracker is None else tracker

    def _error(self, ident: bytes, err: CloneError) -> None:
        hint = err.hint if isinstance(err, TooManyClones) else ""  # when to come back
        self.send(ident, P.ERROR, M.ErrorBody(err.errno, err.message, hint or "").to_body())

    def _on_message(self, frames: list[Any]) -> None:
        ident = bytes(frames[0].buffer)
        if self.session is not None and ident in self.session.former:
            # A stream of the clone before its connection broke: its recipient learns
            # of the break by the silence, and restarts; an ERROR would end the clone.
            return
        try:
            msg = P.decode(frames[1:], P.CMD, self.gate.cipher(ident))
            if msg.kind == P.HELLO:
                reply = self.gate.hello(ident, _peer(frames[1]), M.Hello.from_body(msg.body))
                self.send(ident, P.HELLO_REPLY, reply.to_body())
            elif msg.kind == P.AUTH:
                reply_ = self.gate.auth(ident, M.Auth.from_body(msg.body))
                self.send(ident, P.AUTH_REPLY, reply_.to_body())
            elif msg.kind == P.INIT:
                self._on_init(ident, M.Init.from_body(msg.body))
            elif msg.kind == P.REINIT:
                self._on_reinit(ident, M.Reinit.from_body(msg.body))
            elif msg.kind == P.STATUS:  # who may clone may see the clones (gate.py)
                self.gate.may_clone(ident)
                self.send(ident, P.STATUS_REPLY, self.stats.view())
            else:
                self._dispatch(ident, msg)
        except _Delayed:
            return  # a failed password: the answer goes later (Gate.due)
        except CloneError as exc:
            log.warning("recipient error: %s", M.printable(exc.message, 500))
            self._error(ident, exc)
            s = self.session
            if s is not None and ident == s.master:  # only the master ends its clone
                self.end_session(exc, send_error=True)
            elif s is None or ident not in s.streams:
                self.gate.forget([ident])

    def _on_init(self, ident: bytes, init: M.Init) -> None:
        if self.released:  # being replaced: back on the new data soon
            raise CloneInProgress(hint="the donor's data directory is being replaced; "
                                  "try again when it serves again")
        conn = self.gate.may_clone(ident)
        if self.session is not None:
            self._make_way(conn, init.user)
        clone_id = self._next_clone_id
        self._next_clone_id += 1
        self.session = s = Session(self, clone_id, ident, init,
                                   conn.keys.data if conn.keys is not None else None)
        s.peer = conn.peer
        s.auth_user = conn.user or ""
        conn.in_clone = True
        self.stats.who(clone_id, s.user, conn.peer or "local")
        if self.gate.anonymous and self.url is None:
            log.warning("clone %d by an anonymous user from %s (--allow-anonymous)",
                        clone_id, conn.peer or "local")
        if s.codec or s.data_key is not None:
            try:
                self._start_compressors()
            except CloneError:
                self.end_session(None, send_error=False)
                raise
        assert self.sock is not None
        try:
            self.sock.send_multipart([ident, *P.response(
                P.CONFIG, s.config().to_body(), cipher=self.gate.cipher(ident))])
        except zmq.ZMQError as exc:  # EHOSTUNREACH
            # The recipient left before its answer (a Ctrl-C right after INIT): end
            # the clone now rather than refuse the next one until the idle timeout.
            log.info("clone %d: the recipient left before CONFIG (%s)", clone_id,
                     exc.strerror)
            self.end_session(None, send_error=False)

    def _make_way(self, conn: Any, user: str) -> None:
        """A new INIT while a clone is kept: its place is taken when its recipient is
        gone and the same user starts over from the same host (the old recipient died
        and will not resume); else ERROR 3634, with how long the slot stays taken."""
        s = self.session
        assert s is not None
        now = time.monotonic()
        if s.phase is Phase.ACTIVE:
            # A recipient that died has closed its connections: a probe tells at once.
            if self.send(s.master, P.KEEPALIVE, {"clone_id": s.clone_id}) is None:
                self.orphan("its master's connection is gone")
            elif now - s.last_any > SILENT_AT_INIT:  # a live recipient pings every 2 s
                self.orphan(f"its recipient has been silent for {now - s.last_any:.0f} s")
            elif now - s.last_heard >= self.idle_timeout:
                log.warning("clone %d: no progress for %.0f s; dropping the clone for a "
                            "new one", s.clone_id, now - s.last_heard)
                self.end_session(QueryInterrupted(), send_error=True)
                return
            else:
                raise TooManyClones(1)
        s = self.session
        if s is None:  # no restart asked: it ended as it was orphaned
            return
        if (conn.user or "") == s.auth_user and user == s.user and conn.peer == s.peer:
            log.warning("clone %d: its recipient started over; dropping the clone that "
                        "waited for it", s.clone_id)
            self.stats.end(s.clone_id, False, QueryInterrupted.errno,
                           "the recipient started a new clone")
            self.end_session(None, send_error=False)
            return
        raise TooManyClones(1, hint=f"a clone waits {max(0.0, s.deadline - now):.0f} s "
                            "more for its recipient to come back after a network failure;"
                            " try again then")

    def _on_reinit(self, ident: bytes, ask: M.Reinit) -> None:
        """A recipient back after a network failure: its clone goes on from where the
        locator says, on this new master stream (its other streams ATTACH again)."""
        conn = self.gate.may_clone(ident)
        s = self.session
        if s is None or s.clone_id != ask.clone_id:
            raise DonorError("Restart could not find existing clone",
                             hint="the donor ended it (its restart window passed, or it "
                             "restarted): clone again")
        old = [i for i in s.streams if i != ident]
        s.former.update(old)
        resumed, held = s.reinit(ident, ask, conn.user or "", conn.encrypted,
                                 time.monotonic())
        self._releasing += held
        self.gate.forget(old)
        conn.in_clone = True
        log.warning("clone %d: restart %d of its recipient from %s in %s; %d blocks to "
                    "send again", s.clone_id, ask.restarts, conn.peer or "local", s.state,
                    resumed.resend)
        self.send(ident, P.LOCS, resumed.to_body())

    def orphan(self, reason: str) -> None:
        """The recipient's connection broke: keep the clone for its REINIT (as long as
        it asked; not at all when it asked for no restart)."""
        s = self.session
        if s is None or s.phase is not Phase.ACTIVE:
            return
        if s.delivered:  # the rest (FILE SYNC, RECOVERY) is the recipient's own
            log.info("clone %d: every block delivered, and %s; the clone ends here",
                     s.clone_id, reason)
            self.stats.end(s.clone_id, True, 0, "")
            self.end_session(None, send_error=False)
            return
        if s.restart_timeout == 0:
            log.warning("clone %d: %s; no restart asked, the clone ends", s.clone_id,
                        reason)
            self.end_session(None, send_error=False)
            return
        log.warning("clone %d: %s; kept %d s for its recipient to come back", s.clone_id,
                    reason, s.restart_timeout)
        self.gate.forget(s.streams)
        s.former.update(s.streams)
        self._releasing += s.orphan(time.monotonic())

    def _dispatch(self, ident: bytes, msg: P.Message) -> None:
        s = self.session
        if s is None or (msg.body.get("clone_id") != s.clone_id):
            raise ProtocolError("no such clone (it ended, or the donor restarted)")
        if s.phase is not Phase.ACTIVE:
            # The clone waits for its recipient's REINIT: a stream that joins (or a
            # command that was on its way) meets silence, which makes it restart.
            log.debug("clone %d: %s ignored while the clone waits for a restart",
                      s.clone_id, msg.name)
            return
        if ident not in s.streams and msg.kind != P.ATTACH:
            raise ProtocolError("a stream that did not ATTACH")
        s.last_any = time.monotonic()
        # Liveness is progress: an empty ACK (the recipient's ping) does not keep the
        # one-clone slot; blocks written, and every other command, do.
        if not (msg.kind == P.ACK and not msg.body.get("blocks")):
            s.last_heard = time.monotonic()
        if msg.kind == P.ATTACH:
            conn = self.gate.conn(ident)
            locs = s.attach(ident, M.Attach.from_body(msg.body), conn.encrypted)
            conn.in_clone = True
            self.send(ident, P.LOCS, locs.to_body())
            return
        stream = s.stream(ident)
        if msg.kind == P.EXECUTE:
            ex = M.Execute.from_body(msg.body)
            if ex.what == "files":
                self.send(ident, P.FILES, s.files_page(ex.page).to_body())
            elif ex.what == "data":
                s.data(stream, ex.credit)
            else:
                self.send(ident, P.STATE, s.next_state(ex.state).to_body())
        elif msg.kind == P.ACK:
            self._releasing += s.ack(stream, M.Ack.from_body(msg.body))
        elif msg.kind == P.EXIT:
            if ident != s.master:
                raise ProtocolError("EXIT on a stream that is not the clone's master")
            ex_ = M.Exit.from_body(msg.body)
            if not ex_.ok:
                log.info("clone %d: recipient gave up: %s", s.clone_id,
                         M.printable(ex_.error_message, 500))
            else:
                log.info("clone %d completed (%d blocks)", s.clone_id, s.acked)
            self.stats.end(s.clone_id, ex_.ok, ex_.error_no, M.printable(ex_.error_message, 500))
            self.end_session(None, send_error=False)
        else:
            raise ProtocolError(f"unexpected command {msg.name}")

    def _on_read(self, reply: list[Any]) -> None:
        (tag, seq), slot, length, xxh, segs, span, problems = reply
        s = self.session
        if s is None or tag != s.tag:
            assert self.ring is not None
            self.ring.release(slot)  # a read for a clone that has ended
            return
        s.block_read(ReadyBlock(seq, 0, slot, length, xxh, segs, span, 0, length))
        if problems:
            try:  # files that changed or could not be read (donor/reader.py)
                s.problems(problems)
            except CloneError as exc:
                log.error("clone %d: %s", s.clone_id, exc.message)
                self.end_session(exc, send_error=True)

    def _on_compressed(self, reply: list[Any]) -> None:
        (tag, seq), in_slot, out_slot, codec, wire, xxh, moved = reply
        assert self.ring is not None and self.out_ring is not None
        s = self.session
        block = s.compressed(seq, out_slot, codec, wire, xxh, moved) \
            if s is not None and tag == s.tag else None
        if block is None:  # a block of a clone that has ended
            self.ring.release(in_slot)
            self.out_ring.release(out_slot)
        elif moved:  # what goes on the wire is in the send ring now
            self.ring.release(in_slot)
        else:
            self.out_ring.release(out_slot)

    # -- moving blocks --------------------------------------------------------------
    def ring_of(self, which: int) -> Ring:
        """The read ring (0) or the send ring (1)."""
        ring = self.out_ring if which else self.ring
        assert ring is not None
        return ring

    def _reap_trackers(self) -> None:
        keep = []
        for which, slot, tracker in self._releasing:
            if tracker is None or tracker.done:
                self.ring_of(which).release(slot)
            else:
                keep.append((which, slot, tracker))
        self._releasing = keep

    def _pump(self) -> None:
        self._reap_trackers()
        now = time.monotonic()
        self.gate.expire(now)
        for ident, err in self.gate.due(now):
            if isinstance(err, CloneError):
                self._error(ident, err)
        s = self.session
        if s is None:
            return
        if s.phase is Phase.ORPHANED:
            if now > s.deadline:
                log.warning("clone %d: its recipient did not come back within %d s; the "
                            "clone ends", s.clone_id, s.restart_timeout)
                self.stats.end(s.clone_id, False, NetworkError.errno, "the recipient did "
                               "not come back after a network failure")
                self.end_session(None, send_error=False)
            return
        if now - s.last_any > ORPHAN_AFTER:
            self.orphan(f"no word from its recipient for {ORPHAN_AFTER:.0f} s")
            return
        if now - s.last_heard > self.idle_timeout:
            log.warning("clone %d: recipient silent for %.0f s; dropping the clone",
                        s.clone_id, now - s.last_heard)
            self.end_session(None, send_error=False)
            return
        try:
            s.pump(now)
        except StageCrashed as exc:  # a worker's channel closed under a read: it died
            log.error("%s", exc.message)
            self.end_session(exc, send_error=True)
            self._pool_events()  # its pool restarted (or the compressors stopped)

    def end_session(self, err: CloneError | None, send_error: bool) -> None:
        s = self.session
        if s is None:
            return
        self.session = None
        self.stats.end(s.clone_id, False, *((err.errno, err.message) if err is not None
                                            else (0, "the recipient left")))
        self._releasing += s.end(err, send_error)
        self.gate.forget(s.streams)
        if self.readers is not None:
            # reads still in a reader come back tagged with the old clone: freed then
            try:
                self.readers.broadcast(["reset"])
            except CloneError:  # a reader died: the pools' events restart them
                pass
