"""One process stage: a pool of worker processes with a run loop, end-of-stream and outcomes.

``with Pipeline("reader", "donor.reader:Reader", n, args) as pool:`` starts ``n``
processes and joins every one on exit, however the block ends. Each is a fresh
interpreter (fork and exec, as the spawn start method does, so no ZeroMQ context,
socket or lock crosses a fork), started directly rather than through multiprocessing:
a spawned child imports multiprocessing and pickle before it can run anything, and the
first spawn starts multiprocessing's resource-tracker process too, machinery the
workers do not use (docs/bench.md has the cost).

The descriptor channel: one Unix stream socket pair per worker, made before the worker
starts; the worker inherits its end and nothing else. It has no name, in the file
system or in the abstract namespace, so no other process can connect to it to take a
descriptor or forge a reply. The first message on it is the worker's start record
(the parent's ``sys.path``, the handler, its index and arguments). Messages are
small marshal'd lists, each after its length (:class:`Channel`); bulk bytes stay in the
:class:`~engine.ring.Ring`. A descriptor wakes the worker itself, and a reply the
coordinator: one wake-up each way, where a ZeroMQ ``ipc://`` channel woke the sender's
I/O thread, the receiver's I/O thread and then the receiver, and the workers need not
import ZeroMQ or run its threads at their start.

A worker runs ``handler.handle(msg)`` for each descriptor and sends back
``["done", index, reply]``. End-of-stream is a ``["stop"]`` descriptor: the worker
calls ``handler.close()``, sends ``["final", index, stats]`` and exits. An exception
travels back as ``["crash", index, outcome]`` (type, number, message, traceback) and
is re-raised in the coordinator as the error it was. A worker that dies
without a word (kill -9) closes its end: the coordinator reads the end of the channel
and reaps it, or sees it through its process sentinel (a pidfd).

Shutdown escalates stop -> join(timeout) -> terminate -> kill, with a warning.
Workers ignore SIGINT: the command-line process alone decides what a Ctrl-C does, and a
worker whose coordinator vanished exits by itself within a second.
"""

from __future__ import annotations

import importlib
import marshal
import os
import select
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, Protocol

from engine.errors import CloneError, StageCrashed, by_number, outcome_of


def _log() -> Any:
    """The coordinator's logger. logging and subprocess are imported where the
    coordinator uses them, not at the top: a worker imports this module first and
    needs neither (they, and engine.errors' traceback, are much of a worker's imports)."""
    import logging

    return logging.getLogger("clone_agent.stage")


# Descriptors are marshal'd, not JSON: a file name that is not UTF-8 is a str with
# surrogate escapes here (os.fsdecode), which JSON cannot carry; marshal carries any
# str, int, list and dict, and a worker need not import a JSON library to start. The
# channel links processes of one coordinator, as multiprocessing's own pickled pipes.
_pack = marshal.dumps
_unpack = marshal.loads
_LENGTH = struct.Struct("<I")
_READ = 1 << 18  #: bytes asked of the kernel per read: many descriptors at once
#: how often a worker that has nothing to do checks that its coordinator still exists
_IDLE_CHECK = struct.pack("@ll", 1, 0)  # a struct timeval of one second


class Handler(Protocol):
    def handle(self, msg: list[Any]) -> Any: ...

    def close(self) -> Any: ...


class Channel:
    """One end of a descriptor channel: marshal'd messages, each after its 4-byte length,
    on a Unix stream socket. The socket stays blocking; the coordinator's reads and
    sends pass MSG_DONTWAIT, and a worker's read waits in the kernel (SO_RCVTIMEO).

    The coordinator never waits to send: what the kernel's buffer cannot take now (a
    worker busy with a slow write, a batch descriptor of hundreds of KiB) waits in
    ``_out`` and goes at the next :meth:`flush`. Its loop must go on meanwhile: the
    network, keepalives and Ctrl-C do not wait for a disk."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.eof = False
        self._buf = bytearray()
        self._out = bytearray()

    @property
    def unsent(self) -> bool:
        """Bytes the kernel has not taken yet (:meth:`flush` sends them)."""
        return bool(self._out)

    def send(self, msg: list[Any]) -> None:
        """Queue one message and send what the kernel takes now, without waiting.
        BrokenPipeError (an OSError) if the peer is gone."""
        self._out += _frame(msg)
        self.flush()

    def flush(self) -> None:
        while self._out:
            try:
                sent = self.sock.send(self._out, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            del self._out[:sent]

    def fill(self, flags: int = socket.MSG_DONTWAIT) -> bool:
        """Read what has arrived (with ``flags=0``, wait for it up to the socket's
        receive timeout). False when nothing came; ``eof`` once the peer is gone."""
        got = False
        while True:
            try:
                chunk = self.sock.recv(_READ, flags)
            except BlockingIOError:
                return got
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
                return got
            self._buf += chunk
            got = True
            if len(chunk) < _READ:
                return True
            flags = socket.MSG_DONTWAIT

    def messages(self) -> list[list[Any]]:
        """Every whole message read so far, oldest first."""
        buf = self._buf
        out = []
        pos = 0
        while len(buf) - pos >= 4:
            (size,) = _LENGTH.unpack_from(buf, pos)
            if len(buf) - pos - 4 < size:
                break
            out.append(_unpack(bytes(buf[pos + 4:pos + 4 + size])))
            pos += 4 + size
        if pos:
            del buf[:pos]
        return out

    def close(self) -> None:
        self.sock.close()


def calm_gc() -> None:
    """Run Python's cycle collector rarely in a process that moves blocks.

    The hot loops allocate a few small dicts and lists per block and make no cycles
    worth chasing; at the default threshold (a collection every 700 allocations) the
    collector walks the same long-lived objects again and again (a few percent of a
    clone's CPU: docs/bench.md). What exists now (modules, the manifest) is frozen out of its view.
    Called once by each coordinator and each worker (below), after start-up."""
    import gc

    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def _name_thread(name: str) -> None:
    """Name this process's main thread as ps, top and perf show it (at most 15 bytes)."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:  # not Linux: the name only helps people looking at a process list
        pass


def _child_main(sock: socket.socket, target: str, index: int, args: dict[str, Any],
                parent: int, name: str) -> None:
    """The run loop of one worker process (after :func:`boot_worker`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _name_thread(f"ca-{name}-{index}")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _IDLE_CHECK)
    chan = Channel(sock)
    pending: deque[list[Any]] = deque()
    handler: Handler | None = None
    try:
        module, _, cls = target.partition(":")
        handler = getattr(importlib.import_module(module), cls)(index, args)
        calm_gc()
        sock.sendall(_frame(["ready", index, None]))
        while True:
            if not pending:
                if not chan.fill(0):
                    if chan.eof or os.getppid() != parent:
                        return  # the coordinator is gone: nobody to serve
                    continue
                pending.extend(chan.messages())
                continue
            msg = pending.popleft()
            if msg[0] == "stop":
                final = handler.close()
                handler = None
                sock.sendall(_frame(["final", index, final]))
                return
            reply = handler.handle(msg)
            if reply is not None:
                sock.sendall(_frame(["done", index, reply]))
    except BaseException as exc:  # noqa: BLE001 - every failure becomes an outcome
        try:
            sock.sendall(_frame(["crash", index, outcome_of(exc)]))
        except OSError:
            pass
    finally:
        if handler is not None:
            try:
                handler.close()
            except Exception:  # noqa: BLE001 - already failing; the outcome was sent
                pass
        sock.close()


def _frame(msg: list[Any]) -> bytes:
    data = _pack(msg)
    return _LENGTH.pack(len(data)) + data


def boot_worker(fd: int) -> None:
    """In a new worker (engine/worker.py): read the start record that :class:`Pipeline`
    sent on channel ``fd``, take the parent's ``sys.path``, run :func:`_child_main`."""
    sock = socket.socket(fileno=fd)
    head = sock.recv(_LENGTH.size, socket.MSG_WAITALL)
    if len(head) < _LENGTH.size:
        return  # the coordinator is already gone
    (size,) = _LENGTH.unpack(head)
    body = sock.recv(size, socket.MSG_WAITALL)
    if len(body) < size:
        return
    path, start = _unpack(body)
    sys.path[:] = path
    _child_main(sock, *start)


def _worker_path() -> list[str]:
    """Where a worker imports from: this package's root, then our ``sys.path`` (which
    holds what the site module added here, so the worker can skip it)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [root, *(p or os.getcwd() for p in sys.path)]


class _Worker:
    """One worker process (``subprocess.Popen``), with the handful of
    ``multiprocessing.Process`` attributes the pool uses."""

    def __init__(self, name: str, sock: socket.socket, path: list[str]) -> None:
        self.name = name
        # A process group of its own: a Ctrl-C at the terminal (sent to the foreground
        # group) reaches the command line alone, which decides; a worker still
        # starting would otherwise die of it before it could ignore it. -S: no site
        # module (its .pth files, an editable install's import hook): the path it would
        # build comes on PYTHONPATH, which makes every worker's start cheaper.
        import subprocess

        self._proc = subprocess.Popen(
            [sys.executable, "-S", "-m", "engine.worker", str(sock.fileno())],
            pass_fds=(sock.fileno(),), stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(path)},
            process_group=0)
        self.pid = self._proc.pid
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # Linux before 5.3: the channel's end suffices
            pass

    @property
    def exitcode(self) -> int | None:
        """None while it runs; else its exit status, minus the signal that ended it."""
        return self._proc.poll()

    @property
    def sentinel(self) -> int | None:
        """A descriptor that becomes readable when the process ends (None if there is none)."""
        return self._pidfd

    def join(self, timeout: float) -> None:
        import subprocess

        try:
            self._proc.wait(max(0.0, timeout))
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


class Pipeline:
    """A pool of ``n`` worker processes running ``target`` (``"module:Class"``).

    Owned by the coordinator that creates it, in that process only. ``submit`` never
    waits: what a worker's channel cannot take yet waits in the coordinator (the
    caller bounds what is outstanding) and goes at the next ``events``, which also
    drains what workers sent back. Work may be submitted before a worker is ready: it
    waits in the channel.

    ``lazy``: ``with`` starts no process; :meth:`ensure_started` does, when the owner
    first has work for one (clone-local's fast path may never have any).
    """

    def __init__(self, name: str, target: str, n: int, args: dict[str, Any],
                 stop_timeout: float = 10.0, lazy: bool = False) -> None:
        self.name = name
        self.lazy = lazy
        self.started_at: float | None = None  #: time.monotonic() when started
        self.target = target
        self.n = n
        self.args = args
        self.stop_timeout = stop_timeout
        self.outstanding = [0] * n
        self.procs: list[_Worker] = []
        self._chans: list[Channel] = []
        self._finals: dict[int, Any] = {}
        self._ready: set[int] = set()
        self._poll = select.poll()
        self._next_check = 0.0
        self.exitcodes: list[int | None] = []

    # -- lifetime -------------------------------------------------------------------
    def __enter__(self) -> Pipeline:
        if not self.lazy:
            self.ensure_started()
        return self

    def ensure_started(self) -> bool:
        """Start the workers unless started already; True if this call started them.
        On failure, none is left running."""
        if self.started_at is not None:
            return False
        try:
            self.start()
        except BaseException:
            self.close(abort=True)
            raise
        return True

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(abort=exc is not None)

    def start(self) -> None:
        self.started_at = time.monotonic()
        path = _worker_path()  # on PYTHONPATH, to find engine.worker; in the record, exact
        for i in range(self.n):
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            chan = Channel(mine)
            self._chans.append(chan)
            self._poll.register(chan.fd, select.POLLIN)
            try:
                proc = _Worker(f"clone-agent-{self.name}-{i}", theirs, path)
            finally:
                theirs.close()  # the child has its own copy now
            self.procs.append(proc)
            # Its start record waits in the channel until the interpreter is up.
            chan.send([path, [self.target, i, self.args, os.getpid(), self.name]])

    def close(self, abort: bool = False) -> dict[int, Any]:
        """End every worker: stop (unless aborting), join, terminate, kill. Idempotent."""
        if not abort:
            deadline = time.monotonic() + self.stop_timeout
            crash: CloneError | None = None
            for i, chan in enumerate(self._chans):
                if i not in self._finals and not chan.eof and self.procs[i].exitcode is None:
                    try:
                        chan.send(["stop"])
                    except OSError:  # gone: the join below sees to it
                        pass
            # Until every worker's final report is in, or its channel ended without one
            # (events() raises that as a crash). Not "while any runs": a worker that
            # already exited may have left its final in the channel, unread.
            while crash is None and time.monotonic() < deadline and any(
                    i not in self._finals and not chan.eof
                    for i, chan in enumerate(self._chans)):
                try:
                    for _ in self.events(timeout=0.2):
                        pass
                except CloneError as exc:
                    crash = crash or exc
                    break
            self._reap(timeout=max(0.1, deadline - time.monotonic()))
            if crash is not None:
                self._teardown()
                raise crash
        self._reap(timeout=0.0 if abort else 1.0, quiet=abort)
        self._teardown()
        return self._finals

    def _reap(self, timeout: float, quiet: bool = False) -> None:
        """Join every worker within ``timeout``, then terminate, then kill. ``quiet``: an
        abort, where terminating at once is the plan, not a worker's fault."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.exitcode is None:
                (_log().debug if quiet else _log().warning)(
                    "%s did not stop in time; terminating it", proc.name)
                proc.terminate()
                proc.join(2.0)
            if proc.exitcode is None:
                _log().warning("%s ignored SIGTERM; killing it", proc.name)
                proc.kill()
                proc.join(2.0)

    def _teardown(self) -> None:
        for chan in self._chans:
            chan.close()
        self._chans = []
        self._poll = select.poll()
        self.exitcodes = [proc.exitcode for proc in self.procs] or self.exitcodes
        for proc in self.procs:
            try:
                proc.close()
            except ValueError:
                pass
        self.procs = []

    # -- work -----------------------------------------------------------------------
    def least_loaded(self) -> int:
        """The worker with the least work outstanding, among those ready when any is."""
        return min(self._ready or range(self.n), key=self.outstanding.__getitem__)

    def submit(self, index: int, msg: list[Any]) -> None:
        self.outstanding[index] += 1
        self._send(index, msg)

    def broadcast(self, msg: list[Any]) -> None:
        for i in range(self.n):
            self._send(i, msg)

    def _send(self, index: int, msg: list[Any]) -> None:
        try:
            self._chans[index].send(msg)
        except OSError:  # its end is closed: it died; say how, with its own report if any
            self._on_end(index)
            raise StageCrashed(f"{self.name}-{index}", "its channel closed") from None

    @property
    def fds(self) -> list[int]:
        """The channels' descriptors, for a caller's poller: readable when a worker sent
        something (or ended). See :meth:`poll_ms` too."""
        return [chan.fd for chan in self._chans]

    def poll_ms(self, idle_ms: int) -> int:
        """How long a caller about to wait on :attr:`fds` may wait: ``idle_ms`` normally;
        a few milliseconds while descriptors wait for room in a worker's channel (sent
        by :meth:`events`), so that they go as soon as the worker takes them."""
        return min(idle_ms, 5) if any(chan.unsent for chan in self._chans) else idle_ms

    def events(self, timeout: float = 0.0) -> Iterator[list[Any]]:
        """Yield ``[kind, index, payload]`` for each "done"; raise a worker's crash.

        Waits up to ``timeout`` seconds for the first event, then drains without waiting.
        """
        deadline = time.monotonic() + timeout
        while True:
            batch: list[list[Any]] = []
            for i, chan in enumerate(self._chans):
                if chan.unsent and not chan.eof:
                    try:
                        chan.flush()
                    except OSError:  # it died: its end of file is read below
                        pass
                if not chan.eof:
                    chan.fill()
                got = chan.messages()
                if got:
                    batch += got
                elif chan.eof:
                    if i not in self._finals:
                        self._on_end(i)
                    try:  # ended well: nothing more to wait for
                        self._poll.unregister(chan.fd)
                    except KeyError:  # done already
                        pass
            if not batch:
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms > 0:
                    self._poll.poll(self.poll_ms(left_ms))
                    continue
                now = time.monotonic()
                if now >= self._next_check:  # a hang-up is seen above; this is a backstop
                    self._next_check = now + 0.5
                    self.check_alive()
                return
            deadline = 0.0  # drain what came, without waiting again
            for msg in batch:
                if self._take(msg):
                    yield msg

    def _take(self, msg: list[Any]) -> bool:
        """Account for one message from a worker; True for a "done" (the caller's).
        A "crash" is raised as the error it reports."""
        kind, index, payload = msg
        if kind == "done":
            self.outstanding[index] -= 1
            return True
        if kind == "ready":
            self._ready.add(index)
        elif kind == "final":
            self._finals[index] = payload
        elif kind == "crash":
            raise self._crash_error(index, payload)
        return False

    def _on_end(self, index: int) -> None:
        """Worker ``index``'s channel closed without its final report: raise its crash
        report if it sent one, else say how it ended."""
        chan = self._chans[index]
        if not chan.eof:
            chan.fill()
        for msg in chan.messages():
            self._take(msg)  # a crash report raises here
        if index in self._finals:
            return
        proc = self.procs[index]
        proc.join(2.0)  # it closed its end as it exited: reaped in a moment
        raise StageCrashed(f"{self.name}-{index}", f"process exited with status {proc.exitcode}")

    def is_ready(self, index: int) -> bool:
        """Worker ``index`` has imported its handler (its "ready" came through
        :meth:`events`). Work submitted before that waits in its channel."""
        return index in self._ready

    @property
    def all_ready(self) -> bool:
        return len(self._ready) == self.n

    def wait_ready(self, timeout: float) -> None:
        """Block until every worker has imported its handler (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        while len(self._ready) < self.n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StageCrashed(self.name, f"workers not ready within {timeout:.0f} s")
            for _ in self.events(timeout=min(left, 0.2)):
                raise StageCrashed(self.name, "work done before the pool was ready")

    def check_alive(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.exitcode is not None and i not in self._finals:
                self._on_end(i)

    def _crash_error(self, index: int, outcome: dict[str, Any]) -> CloneError:
        if outcome.get("errno"):
            err = by_number(int(outcome["errno"]), outcome["message"], outcome.get("hint"))
        else:
            err = StageCrashed(f"{self.name}-{index}", outcome["message"])
        _log().debug("worker %s-%d traceback:\n%s", self.name, index, outcome.get("traceback"))
        return err

    def sentinels(self) -> list[int]:
        return [p.sentinel for p in self.procs if p.sentinel is not None]


def end_resource_tracker() -> None:
    """Stop and reap multiprocessing's resource-tracker helper, which a spawn (the
    clone-local donor's) starts on first use and which would otherwise outlive us for a
    moment as an orphan. Called once, by the command line, after every process has
    been joined; nothing to do where multiprocessing was not used."""
    resource_tracker = sys.modules.get("multiprocessing.resource_tracker")
    tracker = getattr(resource_tracker, "_resource_tracker", None)
    stop = getattr(tracker, "_stop", None)
    if stop is not None:
        try:
            stop()
        except (OSError, ChildProcessError):
            pass
