"""Moving blocks from the donor to the writers: streams, credit, tuning, counters.

A :class:`Transfer` runs in the recipient's coordinator and owns the ZeroMQ streams
(DEALER sockets, one TCP connection each) of one clone. It sends typed commands
(:mod:`engine.messages`), waits for answers within bounded times, grants credit, adds
streams while autotuning says they pay, and hands each block to a writer after
checking it against the manifest; a block's credit goes back in an ACK once it is on
disk. It keeps a record of which blocks of the current state are written
(:meth:`locator`), so that a restart can say where the clone stands.

Flow control is by credit: each stream is granted a share of the ring's slots, so data
in flight is bounded by the ring whatever the size of the clone. ``should_stop`` is
polled between messages; every wait is bounded (``connect_timeout`` for the handshake,
``idle_timeout`` for a donor that makes no progress).

A broken connection (a send that fails, or ``LINK_SILENT`` seconds without a word from
the donor, which says KEEPALIVE every second when it has nothing else to say) is a
:class:`LinkLost`. After CONFIG, every exchange meets it the same way (:meth:`_restart`,
MySQL's restart after a network failure): the blocks handed to the writers are
written, the streams closed, and a new master stream (HELLO, AUTH) sends REINIT with
the locator, every ``RETRY_EVERY`` seconds until the window the user gave
(clone_donor_timeout_after_network_failure) has passed; the other streams ATTACH again
and the exchange goes on where it was. A donor that refuses the connection outright is
gone (its process ended): that fails at once.

Past 600 lines: the handshake and authentication of a stream live here with the
streams they set up, and the restart with the exchanges it resumes; the handshake is
the first candidate to move out.
"""

from __future__ import annotations

import logging
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from engine import crypto
from engine import messages as M
from engine import protocol as P
from engine.auth import ClientSide
from engine.config import CloneConfig
from engine.errors import (
    AccessDenied,
    CloneError,
    CloneInProgress,
    DonorError,
    DonorUnreachable,
    InsecureTransport,
    NetworkError,
    NoPrivilege,
    ProtocolError,
    QueryInterrupted,
    SourceChanged,
    SslError,
    StageCrashed,
    TooManyClones,
    by_number,
)
from engine.ring import Ring
from engine.stage import Pipeline
from engine.throttle import MiB
from engine.transport import dealer
from recipient.manifest import Manifest
from recipient.tuner import Tuner
from recipient.writer import Piece, WriteOrder, Writer

log = logging.getLogger("clone_agent.recipient")



#: Streams open at the start of an autotuned clone: one, as MySQL.
START_STREAMS = 1
WRITERS_READY_TIMEOUT = 60.0  #: seconds for the writer processes to start
#: On clone-local's fast path, bytes of ring blocks the coordinator writes itself before
#: it starts writer processes (a few blocks: a small page store's PAGE COPY, the first
#: of a fallback to the ring; more is worth the processes).
LOCAL_BYTES = 32 << 20
#: FILES pages asked for ahead of the one being checked: the round trips overlap with
#: the checks and the directories made, and at most this many pages wait in memory.
MANIFEST_WINDOW = 4
PING_EVERY = 2.0  #: seconds between empty ACKs that tell the donor we are alive
#: Seconds without any message from the donor (it says KEEPALIVE every second when it
#: has nothing else to send) after which a connection counts as broken.
LINK_SILENT = 5.0
RETRY_EVERY = 5.0  #: seconds between attempts to reach the donor again, as MySQL
SETTLE_TIMEOUT = 60.0  #: seconds for the writers to finish what they hold, at a restart
#: Messages read from one stream before the others get a turn.
BURST = 64

#: Called as the transfer moves: (stage, data bytes, network bytes, streams).
Progress = Callable[[str, int, int, int], None]


#: Errors of the donor's that reach the user as they are (the rest are wrapped in 3862).
PASS_THROUGH = (DonorError.errno, TooManyClones.errno, CloneInProgress.errno,
                AccessDenied.errno, NoPrivilege.errno, InsecureTransport.errno, SslError.errno)

REQUIRE_SSL, PREFER_SSL, NO_SSL = "require", "prefer", "none"


@dataclass
class Security:
    """Who the recipient is and how it protects the clone (MySQL's REQUIRE [NO] SSL:
    by default encrypted when the donor offers it, which this donor always does)."""

    user: str
    password: str | None = field(default=None, repr=False)
    ssl: str = PREFER_SSL
    pinned: bytes | None = None  #: the donor's public key (--ssl-ca), or None


@dataclass
class Timeouts:
    connect: float = 10.0  #: the handshake (CONFIG, LOCS)
    idle: float = 60.0  #: a donor without progress for this long has failed
    should_stop: Callable[[], bool] = field(default=lambda: False)
    #: seconds to keep trying after a network failure (0: no restart, fail at once)
    restart: float = 0.0


class LinkLost(NetworkError):
    """A stream's connection broke or fell silent: a restart may recover it."""


#: Told of each network failure and each resumption: a ``restart`` event.
RestartSink = Callable[[dict[str, Any]], None]


def limit_bytes(config: CloneConfig) -> int:
    """The stricter of the data and network bandwidth limits, in bytes/s (0: none)."""
    mib = min((m for m in (config.max_data_bandwidth, config.max_network_bandwidth) if m),
              default=0)
    return mib * MiB


class Transfer:
    """The streams of one clone, from INIT to EXIT. ``close()`` ends them."""

    def __init__(self, url: str, config: CloneConfig, timeouts: Timeouts,
                 progress: Progress, security: Security, where: str = "",
                 on_restart: RestartSink = lambda event: None) -> None:
        self.url = url
        self.on_restart = on_restart
        self.restarts = 0
        self.serial = 0  #: states begun, as the donor counts them (REINIT's ``serial``)
        self.data_key: bytes | None = None  #: the clone's block key, kept across restarts
        self.donor_key: bytes | None = None  #: the donor's static key, pinned at the start
        self.stage = "FILE COPY"
        self.states: list[M.State] = []  #: every STATE answer so far (for a resume)
        self.last_word = time.monotonic()  #: any message from the donor, keep-alives too
        self.security = security
        self.where = where  #: HOST:PORT, for messages
        #: the control cipher of each stream (None: a plain stream)
        self.ciphers: list[crypto.ControlCipher | None] = []
        self.keys: crypto.Keys | None = None  #: stream 0's: the data key, the donor key
        self.secret = ""  #: CONFIG's, for ATTACH
        self.state_no = 0
        self.clone_config = config
        self.t = timeouts
        self.progress = progress
        self.ctx: zmq.Context[Any] | None = zmq.Context(io_threads=2)
        self.streams: list[zmq.Socket[Any]] = []
        self.clone_id = 0
        self.block_size = 0
        self.paged = False
        self.manifest: Manifest | None = None
        # counters of the current state
        self.data_bytes = 0
        self.net_bytes = 0
        self.blocks_done = 0
        self.seen: set[int] = set()
        self.written: P.Locator | None = None
        # credit
        self.granted: list[int] = []
        self.credit_total = 0
        self.autotune = False
        self.tuner = Tuner(1)
        #: writes, in this process, the blocks of a writer still starting (and, on
        #: clone-local's fast path, those without bytes)
        self.local: Writer | None = None
        self.local_bytes = 0  #: bytes of ring blocks written here while writers are lazy
        #: answers ([seq, slot]) taken before :meth:`_written`: the coordinator's own,
        #: and the writers' read while looking for a writer's "ready"
        self.answers: list[list[int]] = []
        #: the last COMPLETE: files to send again, the donor's warnings
        self.completed = M.Complete(0)

    # -- the wire ---------------------------------------------------------------------
    @property
    def encrypted(self) -> bool:
        return self.keys is not None

    @property
    def seal_overhead(self) -> int:
        return crypto.SEAL_OVERHEAD if self.keys is not None else 0

    def send(self, i: int, kind: int, msg: Any) -> None:
        cipher = self.ciphers[i] if kind not in P.UNSEALED_COMMANDS else None
        try:
            self.streams[i].send_multipart(P.command(kind, msg.to_body(), cipher),
                                           zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # no connection left (it broke), or its queue full
            raise LinkLost(f"sending to the donor: {exc.strerror}") from exc

    def _recv(self, i: int) -> P.Message:
        try:
            frames = self.streams[i].recv_multipart(copy=False)
        except zmq.ZMQError as exc:
            raise LinkLost(f"receiving from the donor: {exc.strerror}") from exc
        self.last_word = time.monotonic()
        self.net_bytes += sum(len(f.buffer) for f in frames)
        msg = P.decode(frames, P.RESP, self.ciphers[i])
        if msg.kind == P.ERROR:
            err = M.ErrorBody.from_body(msg.body)
            text = M.printable(err.error_message)
            if err.error_no in PASS_THROUGH:
                raise by_number(err.error_no, text, M.printable(err.hint, 500) or None)
            raise DonorError(f"{err.error_no} : {text.rstrip('.')}")
        return msg

    def wait(self, i: int, timeout: float, what: str, watch_master: bool = False,
             quiet: bool = False) -> P.Message:
        """The next response on stream ``i`` other than KEEPALIVE, within ``timeout``.

        ``watch_master``: stream 0 carries nothing but KEEPALIVE or ERROR now (no data
        is in flight), so read it too: a donor that ends the clone answers there, and
        never on a stream it has not seen ATTACH yet. ``quiet``: ``timeout`` counts
        from the donor's last word, KEEPALIVE included (the answer to INIT follows the
        donor's scan of its tree, seconds for a million files)."""
        deadline = time.monotonic() + timeout
        sock = self.streams[i]
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if watch_master and i:
            poller.register(self.streams[0], zmq.POLLIN)
        while True:
            if self.t.should_stop():
                raise QueryInterrupted()
            left = deadline - time.monotonic()
            if self.written is not None and time.monotonic() - self.last_word > LINK_SILENT:
                raise LinkLost(f"no word from the donor for {LINK_SILENT:g} s")
            if left <= 0:
                raise LinkLost(f"no answer from the donor to {what} within {timeout:g} s"
                               + (" of its last word" if quiet else ""),
                               hint="the donor or the network stopped; try again")
            ready = dict(poller.poll(int(min(left, 0.2) * 1000)))
            if i and self.streams[0] in ready:
                msg = self._recv(0)  # an ERROR raises
                if msg.kind != P.KEEPALIVE:
                    raise ProtocolError(f"{msg.name} on stream 0 before data was asked")
            if sock in ready:
                msg = self._recv(i)
                if msg.kind != P.KEEPALIVE:
                    return msg
                if quiet:
                    deadline = time.monotonic() + timeout

    def expect(self, i: int, kind: int, what: str, timeout: float | None = None) -> P.Message:
        """:meth:`wait` for a response of ``kind``; anything else is a protocol error."""
        msg = self.wait(i, self.t.idle if timeout is None else timeout, what)
        if msg.kind != kind:
            raise ProtocolError(f"{msg.name} instead of {P.RESPONSE_NAMES[kind]}")
        return msg

    # -- the handshake ------------------------------------------------------------------
    def _open_streams(self, first: int, count: int) -> list[M.HelloReply]:
        """Open streams ``first`` .. ``count-1`` and run each one's handshake (HELLO):
        from here each is encrypted, or plain where the user asked for it."""
        assert self.ctx is not None
        sec = self.security
        hellos = []
        for i in range(first, count):
            self.streams.append(dealer(self.ctx, self.url))
            self.ciphers.append(None)
            hello = crypto.Initiator() if sec.ssl != NO_SSL else None
            hellos.append(hello)
            self.send(i, P.HELLO, M.Hello(P.PROTOCOL_VERSION, crypto.b64(hello.hello)
                                          if hello is not None else ""))
        replies = []
        for i, hello in zip(range(first, count), hellos, strict=True):
            try:
                msg = self.wait(i, self.t.connect, "HELLO")
            except NetworkError as exc:
                if self.clone_id:  # a clone under way: the network, not a wrong address
                    raise
                raise DonorUnreachable(
                    f"Connect failed: 2003 : no clone-agent answered at '{self.where}' "
                    f"within {self.t.connect:g} s",
                    hint="is that `clone-agent serve`? check the port") from exc
            if msg.kind != P.HELLO_REPLY:
                raise ProtocolError(f"{msg.name} instead of HELLO")
            reply = M.HelloReply.from_body(msg.body)
            if reply.encrypted and hello is not None:
                keys = hello.finish(reply.e, reply.s, reply.confirm, sec.pinned)
                if i == 0 and self.donor_key not in (None, keys.donor_key):
                    raise SslError("the donor's key is not the one this clone began with")
                if i == 0:
                    self.keys = keys
                    self.donor_key = keys.donor_key
                elif self.keys is None or keys.donor_key != self.keys.donor_key:
                    raise SslError("a stream of the clone reached another donor key")
                self.ciphers[i] = crypto.ControlCipher(keys.r2d, keys.d2r)
            elif sec.ssl == REQUIRE_SSL:
                raise SslError("the donor does not encrypt this connection, and "
                               "--require-ssl was given")
            elif reply.encrypted:
                raise ProtocolError("an encrypted HELLO answer to a plain HELLO")
            elif i and self.keys is not None:
                raise ProtocolError("a plain stream in an encrypted clone")
            replies.append(reply)
        return replies

    def _authenticate(self, reply: M.HelloReply) -> None:
        """SCRAM on stream 0, bound to its handshake when it is encrypted."""
        sec = self.security
        if reply.auth == "none":
            return
        if not sec.password:
            raise AccessDenied(sec.user, self.where.rpartition(":")[0], "NO")
        scram = ClientSide(sec.user, sec.password,
                           self.keys.binding if self.keys is not None else None)
        self.send(0, P.AUTH, M.Auth("first", scram.first()))
        first = self.expect(0, P.AUTH_REPLY, "AUTH", self.t.connect)
        self.send(0, P.AUTH, M.Auth("final", scram.final(M.AuthReply.from_body(
            first.body).data)))
        final = self.expect(0, P.AUTH_REPLY, "AUTH", self.t.connect)
        try:
            scram.check(M.AuthReply.from_body(final.body).data)
        except Exception:  # scramp's own error: the donor does not know our verifier
            raise SslError("the donor could not prove that it knows this user",
                           hint="someone may be in the middle of the connection") from None

    def init(self, init: M.Init) -> None:
        """Open stream 0: handshake, authentication, then INIT (its CONFIG is read by
        :meth:`config`)."""
        self.block_size = init.block_size
        reply = self._open_streams(0, 1)[0]
        self._authenticate(reply)
        self.send(0, P.INIT, init)

    def ask_status(self) -> dict[str, Any]:
        """STATUS on a stream of its own, after the same handshake and authentication
        as a clone: the donor's running or last clone (engine/metrics.py's view)."""
        reply = self._open_streams(0, 1)[0]
        self._authenticate(reply)
        self.send(0, P.STATUS, M.StatusAsk())
        return self.expect(0, P.STATUS_REPLY, "STATUS", self.t.connect).body

    def config(self) -> M.Config:
        msg = self.wait(0, self.t.connect, "INIT", quiet=True)
        if msg.kind != P.CONFIG:
            raise ProtocolError(f"{msg.name} instead of CONFIG")
        cfg = M.Config.from_body(msg.body, self.block_size)
        self.clone_id = cfg.clone_id
        self.block_size = cfg.block_size
        self.paged = cfg.paged
        self.secret = cfg.secret
        return cfg

    def join(self, n: int) -> None:
        """The streams of the clone after CONFIG: ``n`` in all (a restart, if the
        connection breaks meanwhile, opens them all anew)."""
        try:
            self.attach(n)
        except LinkLost as exc:
            self._restart(exc, n)

    def attach(self, n: int, start: int = 1, before_data: bool = True) -> None:
        """Open streams ``start`` .. ``n-1`` (ATTACH, LOCS). ``before_data``: no data is
        in flight yet, so stream 0 is watched for an ERROR meanwhile."""
        self._open_streams(start, n)
        for i in range(start, n):
            self.send(i, P.ATTACH, M.Attach(self.clone_id, i, self.secret))
        for i in range(start, n):
            msg = self.wait(i, self.t.connect, "ATTACH", watch_master=before_data)
            if msg.kind != P.LOCS:
                raise ProtocolError(f"{msg.name} instead of LOCS")

    def read_manifest(self, manifest: Manifest, cfg: M.Config, slots: int,
                      credit_early: bool = True) -> None:
        """FILES pages, MANIFEST_WINDOW of them asked for ahead; data credit as soon as
        the last page is asked for. The donor answers a stream's commands in order, so
        every FILES page comes before the first block on stream 0, and the donor's
        first reads and sends overlap with the checks here. A donor that does not say
        its page size is asked one page at a time, and credit follows the last.

        ``credit_early`` False (clone-local's fast path): credit once the last page is
        checked, when every directory is made: a reader copies into the destination
        only where its directory exists, and the first blocks of a credit granted
        earlier would all come through the ring instead."""
        self.manifest = manifest
        pages = max(1, -(-cfg.files // cfg.files_page)) if cfg.files_page else 0
        asked = page = 0
        credited = False
        while True:
            try:
                while asked <= page or (asked < pages and asked - page < MANIFEST_WINDOW):
                    self.send(0, P.EXECUTE, M.Execute(self.clone_id, "files", page=asked))
                    asked += 1
                if credit_early and not credited and asked == pages:
                    self.grant_credit(slots)
                    credited = True
                msg = self.wait(0, self.t.idle, "EXECUTE files")
            except LinkLost as exc:
                self._restart(exc)  # credit, if granted, is granted again
                asked = page  # the pages asked for and not received are asked again
                continue
            files = M.FilesPage.from_body(msg.body) if msg.kind == P.FILES else None
            if files is None or files.page != page:
                raise ProtocolError(f"{msg.name} instead of FILES page {page}")
            last = manifest.add_page(files)
            if last != (page == pages - 1) and pages:
                raise ProtocolError(f"FILES page {page} of {pages} says last={last}")
            if last:
                break
            page += 1
        if not credited:
            self.grant_credit(slots)
        if len(manifest.items) != cfg.files:
            raise ProtocolError("manifest shorter than announced")

    def next_state(self, name: str) -> M.State:
        """Ask the donor for the next snapshot state; its STATE answer. Across a
        restart: asked again, or taken from the REINIT answer if it was lost."""
        while True:
            try:
                state = self._ask_state(name)
                break
            except LinkLost as exc:
                missed = self._restart(exc).missed
                if missed is not None:
                    state = missed
                    break
        if state.state != name:
            raise ProtocolError(f"STATE {state.state!r} instead of {name}")
        self.serial += 1
        self.states.append(state)
        return state

    def _ask_state(self, name: str) -> M.State:
        self.send(0, P.EXECUTE, M.Execute(self.clone_id, "state", state=name))
        while True:
            msg = self.wait(0, self.t.idle, f"EXECUTE {name}")
            if msg.kind != P.COMPLETE:  # a COMPLETE said again after a restart
                break
        if msg.kind != P.STATE:
            raise ProtocolError(f"{msg.name} instead of STATE {name}")
        return M.State.from_body(msg.body)

    # -- credit -------------------------------------------------------------------------
    def grant_credit(self, slots: int) -> None:
        """Credit: the ring's slots (fewer under a bandwidth limit: about a tenth of a
        second in flight), shared evenly by the streams and rebalanced as they grow."""
        limit = limit_bytes(self.clone_config)
        if limit:
            slots = min(slots, max(2, limit // 10 // self.block_size + 1))
        self.credit_total = slots
        self.granted = [0] * len(self.streams)
        for i in range(len(self.streams)):
            self.send(i, P.EXECUTE, M.Execute(self.clone_id, "data", credit=0))
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
                self.send(i, P.ACK, M.Ack(self.clone_id, acked.get(i, []), give))

    def _add_streams(self, count: int, poller: zmq.Poller) -> None:
        """Autotuning: open streams up to ``count`` (ATTACH, then data with no credit)."""
        first = len(self.streams)
        self.attach(count, start=first, before_data=False)
        for i in range(first, count):
            poller.register(self.streams[i], zmq.POLLIN)
            self.granted.append(0)
            self.send(i, P.EXECUTE, M.Execute(self.clone_id, "data", credit=0))
        log.debug("autotune: %d streams", count)

    # -- FILE COPY of a tree that changes -------------------------------------------------
    def copy_files(self, total_blocks: int, ring: Ring, writers: Pipeline,
                   fail_on_change: bool = False) -> None:
        """FILE COPY: its blocks; then, while the donor says files changed as it read
        them, FILE COPY again for those (the counters go on: one stage); then the
        donor's warnings go to the manifest's, and files that vanished are removed.
        ``fail_on_change``: a file that changed or vanished is an error (8008)."""
        assert self.manifest is not None
        self.run("FILE COPY", total_blocks, ring, writers)
        while self.completed.again:
            state = self.next_state("FILE COPY")
            if fail_on_change:
                raise SourceChanged(self._names(a.id for a in state.again))
            self.manifest.again(state.again)
            self.seen.clear()
            self.blocks_done = 0
            self.written = P.Locator(self.clone_id, "", self.written.state if self.written
                                     else 1, state.blocks)
            self.run("FILE COPY", state.blocks, ring, writers)
        final = self.completed
        changed = [n for n in final.notes if n.kind in ("changed", "vanished")]
        if fail_on_change and (changed or final.gone):
            raise SourceChanged(", ".join(repr(n.path) for n in changed[:5]) or
                                self._names(final.gone))
        self.manifest.drop(final.gone)
        for note in final.notes:
            self.manifest.notes.add(note.kind, note.path, note.message)
        if final.more:
            self.manifest.notes.add("more", "", f"{final.more} more warnings from the "
                                    "donor, not listed")

    def _names(self, ids: Any) -> str:
        assert self.manifest is not None
        rels = [self.manifest.items[i].rel for i in ids if i in self.manifest.items]
        return ", ".join(repr(r) for r in rels[:5]) + (" ..." if len(rels) > 5 else "")

    # -- blocks ---------------------------------------------------------------------------
    def begin_state(self, state: int, total_blocks: int) -> None:
        """Counters and the record of written blocks start again for a new state."""
        self.state_no = state
        self.data_bytes = self.net_bytes = self.blocks_done = 0
        self.seen.clear()
        self.written = P.Locator(self.clone_id, "", state, total_blocks)

    def locator(self) -> P.Locator | None:
        """Where the clone stands: the blocks of the current state on disk."""
        return self.written

    def run(self, stage: str, total_blocks: int, ring: Ring, writers: Pipeline) -> None:
        """Receive every block of ``stage``, hand it to a writer, acknowledge it once it
        is written; returns after COMPLETE, when the last block is on disk. A broken
        connection is restarted, and the blocks go on from where the locator says."""
        self.stage = stage
        origin: dict[int, tuple[int, int]] = {}  # block seq -> (stream index, span)
        complete = False
        while True:
            try:
                self._run(stage, total_blocks, ring, writers, origin, complete)
                break
            except LinkLost as exc:
                complete = False  # said again by the donor, once every block is written
                self._settle(writers, ring, origin)
                self._restart(exc)
        if len(self.seen) != total_blocks:
            raise ProtocolError(f"COMPLETE after {len(self.seen)} of {total_blocks} blocks")

    def _run(self, stage: str, total_blocks: int, ring: Ring, writers: Pipeline,
             origin: dict[int, tuple[int, int]], complete: bool) -> None:
        poller = zmq.Poller()
        for sock in self.streams:
            poller.register(sock, zmq.POLLIN)
        watched: set[int] = set()
        _watch(poller, writers, watched)
        unstarted = writers.started_at is None  # a lazy pool: watched once it starts
        last_heard = last_ping = self.last_word = time.monotonic()
        self.tuner.reset(last_heard, self.data_bytes, len(self.streams))
        while not (complete and self.blocks_done == total_blocks):
            if self.t.should_stop():
                raise QueryInterrupted()
            events = dict(poller.poll(writers.poll_ms(200)))
            now = time.monotonic()
            grow = self.tuner.sample(now, self.data_bytes) if self.autotune else None
            if grow is not None and not complete:
                self._add_streams(grow, poller)
                self._rebalance({})
            # Liveness is progress (a block received or written, COMPLETE), not any
            # message: a donor that sends nothing but keep-alives has stopped too.
            for i, sock in enumerate(self.streams):
                if sock in events:
                    done, progressed = self._drain(i, stage, ring, writers, origin,
                                                   total_blocks)
                    complete = complete or done
                    if progressed:
                        last_heard = now
            if unstarted and writers.started_at is not None:
                _watch(poller, writers, watched)
                unstarted = False
            if self._acknowledge(writers, ring, origin):
                last_ping = last_heard = now
            if now - last_ping > PING_EVERY:
                self.send(0, P.ACK, M.Ack(self.clone_id, [], 0))
                last_ping = now
            if now - self.last_word > LINK_SILENT:
                raise LinkLost(f"no word from the donor for {LINK_SILENT:g} s")
            if now - last_heard > self.t.idle:  # it answers, and moves nothing: no restart
                raise NetworkError(f"the donor has been silent for {self.t.idle:g} s "
                                   "(no block, at most keep-alives)")
            self.progress(stage, self.data_bytes, self.net_bytes, len(self.streams))

    def _drain(self, i: int, stage: str, ring: Ring, writers: Pipeline,
               origin: dict[int, tuple[int, int]], total: int) -> tuple[bool, bool]:
        """Read what stream ``i`` has (a burst at most): (COMPLETE came, anything but a
        keep-alive came)."""
        complete = progressed = False
        sock = self.streams[i]
        for _ in range(BURST):
            if not sock.poll(0):
                break
            msg = self._recv(i)
            if msg.kind == P.DATA_DESC:
                self._on_block(i, msg, ring, writers, origin, total)
            elif msg.kind == P.COMPLETE:
                self.completed = M.Complete.from_body(msg.body)
                complete = True
            elif msg.kind != P.KEEPALIVE:
                raise ProtocolError(f"unexpected {msg.name} during {stage}")
            progressed = progressed or msg.kind != P.KEEPALIVE
        return complete, progressed

    def _acknowledge(self, writers: Pipeline, ring: Ring,
                     origin: dict[int, tuple[int, int]], send: bool = True) -> bool:
        """Free and ACK every block written since the last call; True if any was.
        ``send``: False at a restart, where the locator says it instead."""
        acks: dict[int, list[int]] = {}
        for seq, slot in self._written(writers):
            ring.release(slot)
            self.blocks_done += 1
            stream_index, span = origin.pop(seq)
            self.data_bytes += span  # data counts what is written, as it is written
            assert self.written is not None
            self.written.block_done(seq)
            acks.setdefault(stream_index, []).append(seq)
        if acks and send:
            self._rebalance(acks)
        return bool(acks)

    def _pieces(self, desc: M.BlockDesc) -> list[Piece]:
        """The block's segments as writes into the manifest's files, each checked."""
        assert self.manifest is not None
        out = []
        for fid, off, size in desc.segs:
            item = self.manifest.file(fid)
            if off + size > item.size:
                raise ProtocolError(f"block {desc.seq} writes outside {item.rel!r}")
            finish = self.manifest.finishing(item) \
                if off == 0 and size == item.size and not self.paged else None
            if finish is not None:
                # The whole file in one segment: its writer finishes it (owner, bits,
                # times). Not in a page store's clone: PAGE COPY may write its pages
                # again; nor a file with attributes or an ACL: FILE SYNC sets those.
                mode, uid, gid, atime = finish
                out.append(Piece(item.rel, off, size, mode, item.mtime_ns, uid, gid, atime))
            else:
                out.append(Piece(item.rel, off, size))
        return out

    def _on_block(self, stream: int, msg: P.Message, ring: Ring, writers: Pipeline,
                  origin: dict[int, tuple[int, int]], total_blocks: int) -> None:
        desc = M.BlockDesc.from_body(msg.body, len(msg.payload), self.block_size,
                                     total_blocks, self.seal_overhead)
        if desc.seq in self.seen:
            raise ProtocolError(f"block {desc.seq} sent twice")
        pieces = self._pieces(desc)
        slot = ring.acquire()
        if slot is None:
            raise ProtocolError("the donor sent more blocks than its credit")
        ring.slot(slot, desc.length)[:] = msg.payload
        self.seen.add(desc.seq)
        origin[desc.seq] = (stream, desc.span)
        # A batch of small files creates files: keep a directory on one writer, so that
        # two writers do not spin on the same directory lock (ext4 holds it while it
        # allocates an inode). Blocks of big files go to the least loaded writer.
        aad = crypto.block_aad(self.clone_id, self.state_no, desc.seq, desc.raw, desc.span,
                               desc.comp, desc.segs) if self.keys is not None else b""
        order = WriteOrder(desc.seq, slot, desc.length, desc.xxh, desc.comp, desc.raw, pieces,
                           aad)
        if writers.lazy and (desc.length == 0 or (
                writers.started_at is None and self.local_bytes + desc.length <= LOCAL_BYTES)):
            # clone-local's fast path: a block without bytes (the donor's reader copied
            # them, and FILE SYNC finishes its files) has nothing to write: answered
            # here, without a hop to a writer and back; the few blocks that come through
            # the ring (a small page store's pages) too, before writers are worth
            # starting.
            self.local_bytes += desc.length
            assert self.local is not None
            self.answers.append(self.local.handle(order.to_wire()))
            return
        writers.ensure_started()
        writer = hash(pieces[0].rel.rpartition("/")[0]) % writers.n if len(pieces) > 1 \
            else writers.least_loaded()
        if not writers.is_ready(writer):
            # Its "ready" may wait unread in its channel (nothing read the writers while
            # the manifest came): read them now rather than write here for nothing.
            self.answers += [payload for _, _, payload in writers.events()]
        if writers.is_ready(writer):
            writers.submit(writer, order.to_wire())
        else:
            assert self.local is not None
            self.answers.append(self.local.handle(order.to_wire()))

    def _written(self, writers: Pipeline) -> list[list[int]]:
        """``[seq, slot]`` of every block written since the last call: by the writers,
        and by the coordinator itself for a writer still starting. Credit is granted
        before the writers are up (they boot while the handshake and the manifest
        travel), and the first blocks would otherwise wait for them in the ring."""
        done = [payload for _, _, payload in writers.events()]
        if self.answers:
            done += self.answers
            self.answers = []
        if not writers.all_ready and writers.started_at is not None and \
                time.monotonic() - writers.started_at > WRITERS_READY_TIMEOUT:
            raise StageCrashed("writer", f"not ready within {WRITERS_READY_TIMEOUT:.0f} s")
        return done

    # -- restart after a network failure --------------------------------------------------
    def adopt(self, cfg: M.Config, secret: str, data_key: bytes | None,
              donor_key: bytes | None, serial: int, states: list[M.State],
              written: P.Locator, restarts: int) -> None:
        """Take over an interrupted clone (`pull --resume`) from its record."""
        self.clone_id = cfg.clone_id
        self.block_size = cfg.block_size
        self.paged = cfg.paged
        self.secret = secret
        self.data_key = data_key
        self.donor_key = donor_key
        self.serial = serial
        self.states = list(states)
        self.restarts = restarts
        self.state_no = written.state
        self.written = written
        self.seen = {seq for seq in range(written.total_blocks) if written.is_done(seq)}
        self.blocks_done = len(self.seen)

    def resume_clone(self, streams: int) -> M.State | None:
        """REINIT for an adopted clone; the STATE its recipient never saw, if any (the
        caller begins it)."""
        missed = self._restart(LinkLost("the recipient that ran this clone ended"),
                               streams).missed
        if missed is not None:
            self.serial += 1
            self.states.append(missed)
        return missed


    def _settle(self, writers: Pipeline, ring: Ring,
                origin: dict[int, tuple[int, int]]) -> None:
        """Wait for the writers to write every block handed to them: the locator then
        names exactly what is on disk, and nothing handed over is sent twice."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while origin:
            if time.monotonic() > deadline:
                raise StageCrashed("writer", f"blocks not written within "
                                   f"{SETTLE_TIMEOUT:.0f} s")
            if self.t.should_stop():
                raise QueryInterrupted()
            select.select(writers.fds + writers.sentinels(), [], [], 0.2)
            self._acknowledge(writers, ring, origin, send=False)

    def _close_streams(self) -> None:
        for sock in self.streams:
            sock.close(linger=0)
        self.streams = []
        self.ciphers = []

    def _restart(self, err: LinkLost, count: int = 0) -> M.Resumed:
        """Reach the donor again and resume the clone (REINIT), every RETRY_EVERY
        seconds until the window passes; the streams are as many as before."""
        window = self.t.restart
        if window <= 0 or not self.clone_id:
            raise err
        if self.restarts >= M.MAX_RESTARTS:
            raise NetworkError(f"{err.message}; the clone restarted {M.MAX_RESTARTS} "
                               "times already") from err
        lost = time.monotonic()
        count = max(1, count, len(self.streams))
        self._close_streams()
        self.restarts += 1
        log.warning("connection to the donor lost in %s (%s); reconnecting for up to "
                    "%g s", self.stage, err.message, window)
        self.on_restart({"event": "restart", "phase": "lost", "stage": self.stage,
                         "error": err.message, "restarts": self.restarts,
                         "window_s": window})
        last: CloneError = err
        while True:
            if self.t.should_stop():
                raise QueryInterrupted()
            try:
                resumed = self._reconnect(count)
                break
            except (NetworkError, DonorUnreachable) as exc:
                last = exc
                self._close_streams()
            if time.monotonic() + RETRY_EVERY - lost > window:
                raise NetworkError(f"the donor could not be reached again within {window:g}"
                                   f" s of a network failure ({last.message})",
                                   hint="check the network and the donor; the clone can "
                                   "be started again") from err
            self._pause(RETRY_EVERY)
        outage = time.monotonic() - lost
        log.warning("clone resumed in %s after %.1f s (restart %d; %d blocks sent again)",
                    self.stage, outage, self.restarts, resumed.resend)
        self.on_restart({"event": "restart", "phase": "resumed", "stage": self.stage,
                         "restarts": self.restarts, "outage_s": round(outage, 3),
                         "resent": resumed.resend})
        return resumed

    def _pause(self, seconds: float) -> None:
        """The interval between two attempts (not a wait for a peer): Ctrl-C ends it."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            if self.t.should_stop():
                raise QueryInterrupted()
            time.sleep(min(0.1, max(0.0, until - time.monotonic())))

    def _check_listening(self) -> None:
        """A donor whose host refuses the connection has ended (its process died):
        nothing will resume the clone, so say so now rather than at the window's end."""
        host, _, port = self.where.rpartition(":")
        if not port.isdigit():
            return
        try:
            with socket.create_connection((host.strip("[]"), int(port)),
                                          timeout=self.t.connect):
                return
        except ConnectionRefusedError:
            raise DonorError(f"the donor at '{self.where}' is gone: nothing listens there "
                             "any more, so the clone cannot resume",
                             hint="start `clone-agent serve` again and clone again") from None
        except OSError as exc:
            raise LinkLost(f"cannot reach the donor: {exc.strerror or exc}") from None

    def _reconnect(self, count: int) -> M.Resumed:
        """One attempt: HELLO and AUTH on a new master stream, REINIT with the locator,
        the other streams ATTACH again, and credit is granted anew."""
        self._check_listening()
        self.last_word = time.monotonic()  # silence counts from this attempt
        reply = self._open_streams(0, 1)[0]
        self._authenticate(reply)
        assert self.written is not None
        self.send(0, P.REINIT, M.Reinit(self.clone_id, self.secret, self.serial,
                                        self.written, self.restarts))
        msg = self.expect(0, P.LOCS, "REINIT", self.t.connect)
        resumed = M.Resumed.from_body(msg.body)
        if resumed.clone_id != self.clone_id or \
                resumed.serial not in (self.serial, self.serial + 1):
            raise ProtocolError(f"REINIT answered for state {resumed.serial} of clone "
                                f"{resumed.clone_id}")
        if (resumed.missed is not None) != (resumed.serial != self.serial):
            raise ProtocolError("REINIT answer without the state it says was missed")
        if count > 1:
            self.attach(count, start=1, before_data=False)
        if self.credit_total:
            self.grant_credit(self.credit_total)
        return resumed

    # -- ending ---------------------------------------------------------------------------
    def finish(self) -> None:
        try:
            self.send(0, P.EXIT, M.Exit(self.clone_id, True))
        except LinkLost as exc:  # the clone is whole here; the donor ends it by itself
            log.warning("could not tell the donor that the clone completed: %s",
                        exc.message)

    def abort(self, err: CloneError) -> None:
        """Tell the donor the clone failed (best effort: the network may be the cause)."""
        if self.streams and self.clone_id:
            try:
                self.send(0, P.EXIT, M.Exit(self.clone_id, False, err.errno, err.message))
            except CloneError:
                pass

    def close(self) -> None:
        for sock in self.streams:
            sock.close(linger=200)
        self.streams = []
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None


def _watch(poller: zmq.Poller, writers: Pipeline, watched: set[int]) -> None:
    """Poll the writers' channels and process ends too (those not yet polled)."""
    for fd in writers.fds + writers.sentinels():
        if fd not in watched:
            poller.register(fd, zmq.POLLIN)
            watched.add(fd)
