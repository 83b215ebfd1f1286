"""One process stage: a pool of worker processes with a run loop, end-of-stream and outcomes.

``with Pipeline("reader", "donor.reader:Reader", n, args) as pool:`` starts ``n``
processes (spawn start method, so no ZeroMQ context, socket or lock crosses a fork,
STYLE.md 9) and joins every one on exit (STYLE.md 7).

The descriptor channel: the coordinator binds one PUSH socket per worker (its inbox)
and one PULL socket that every worker pushes to (the outbox), on IPC socket files in a
0700 directory of its own (:class:`~engine.ipc.EndpointDir`, removed at close): no
other local user can connect to take a descriptor or forge a reply. Descriptors are
small marshal'd lists; bulk bytes stay in the :class:`~engine.ring.Ring`.

A worker runs ``handler.handle(msg)`` for each descriptor and pushes back
``["done", index, reply]``. End-of-stream is a ``["stop"]`` descriptor: the worker
calls ``handler.close()``, pushes ``["final", index, stats]`` and exits. An exception
travels back as ``["crash", index, outcome]`` (type, number, message, traceback) and
is re-raised in the coordinator as the error it was (STYLE.md 6). A worker that dies
without a word (kill -9) is seen through its process sentinel.

Shutdown escalates stop -> join(timeout) -> terminate -> kill, with a warning.
Workers ignore SIGINT: the command-line process alone decides (STYLE.md 8), and a
worker whose coordinator vanished exits by itself within a second.
"""

from __future__ import annotations

import importlib
import logging
import marshal
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import zmq

from engine.errors import CloneError, StageCrashed, by_number, outcome_of
from engine.ipc import EndpointDir

log = logging.getLogger("clone_agent.stage")

_SPAWN = multiprocessing.get_context("spawn")

# Descriptors are marshal'd, not JSON: a file name that is not UTF-8 is a str with
# surrogate escapes here (os.fsdecode), which JSON cannot carry; marshal carries any
# str, int, list and dict, and a worker need not import a JSON library to start. The
# channel links processes of one coordinator, as multiprocessing's own pickled pipes.
_pack = marshal.dumps
_unpack = marshal.loads


class Handler(Protocol):
    def handle(self, msg: list[Any]) -> Any: ...

    def close(self) -> Any: ...


@contextmanager
def _bare_main() -> Iterator[None]:
    """Start spawned workers without re-importing our ``__main__`` in each of them.

    The spawn method runs the parent's main module again in every child (the typer
    command line, with its imports: a tenth of a second per worker here) unless
    ``__main__`` names neither a module nor a file. Workers need nothing from it: their
    target is a module-level function of this module. Restored at once.
    """
    main = sys.modules.get("__main__")
    saved: dict[str, object] = {k: main.__dict__[k] for k in ("__spec__", "__file__")
             if main is not None and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__["__spec__"] = None
            main.__dict__.pop("__file__", None)
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


def calm_gc() -> None:
    """Run Python's cycle collector rarely in a process that moves blocks.

    The hot loops allocate a few small dicts and lists per block and make no cycles
    worth chasing; at the default threshold (a collection every 700 allocations) the
    collector took about 3% of a clone's CPU here, walking the same long-lived objects
    each time. What exists now (modules, the manifest) is frozen out of its view.
    Called once by each coordinator and each worker (below), after start-up."""
    import gc

    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def _child_main(
    target: str, index: int, inbox: str, outbox: str, args: dict[str, Any], parent: int
) -> None:
    """The run loop of one worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    ctx = zmq.Context(io_threads=1)
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    pull.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.LINGER, 2000)
    pull.connect(inbox)
    push.connect(outbox)
    handler: Handler | None = None
    try:
        module, _, name = target.partition(":")
        handler = getattr(importlib.import_module(module), name)(index, args)
        calm_gc()
        push.send(_pack(["ready", index, None]))
        while True:
            if not pull.poll(1000):
                if os.getppid() != parent:  # the coordinator is gone: nobody to serve
                    return
                continue
            msg = _unpack(pull.recv())
            if msg[0] == "stop":
                final = handler.close()
                handler = None
                push.send(_pack(["final", index, final]))
                return
            reply = handler.handle(msg)
            if reply is not None:
                push.send(_pack(["done", index, reply]))
    except BaseException as exc:  # noqa: BLE001 - every failure becomes an outcome
        try:
            push.send(_pack(["crash", index, outcome_of(exc)]))
        except zmq.ZMQError:
            pass
    finally:
        if handler is not None:
            try:
                handler.close()
            except Exception:  # noqa: BLE001 - already failing; the outcome was sent
                pass
        pull.close()
        push.close()
        ctx.term()


class Pipeline:
    """A pool of ``n`` worker processes running ``target`` (``"module:Class"``).

    Owned by the coordinator that creates it, in that process only. ``submit`` never
    blocks for long (inboxes are sized by the caller's own bound on outstanding
    work); ``events`` drains what workers sent back.
    """

    def __init__(
        self,
        name: str,
        target: str,
        n: int,
        args: dict[str, Any],
        ctx: zmq.Context[Any],
        stop_timeout: float = 10.0,
    ) -> None:
        self.name = name
        self.target = target
        self.n = n
        self.args = args
        self.ctx = ctx
        self.stop_timeout = stop_timeout
        self.outstanding = [0] * n
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self._inboxes: list[zmq.Socket[Any]] = []
        self._finals: dict[int, Any] = {}
        self._ready: set[int] = set()
        self.outbox: zmq.Socket[Any] | None = None
        self.exitcodes: list[int | None] = []
        self._dir: EndpointDir | None = None

    # -- lifetime -------------------------------------------------------------------
    def __enter__(self) -> Pipeline:
        try:
            self.start()
        except BaseException:
            self.close(abort=True)
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(abort=exc is not None)

    def start(self) -> None:
        with _bare_main():
            self._start()

    def _start(self) -> None:
        self._dir = EndpointDir()
        self.outbox = self.ctx.socket(zmq.PULL)
        self.outbox.setsockopt(zmq.LINGER, 0)
        out_ep = self._dir.endpoint("out")
        self.outbox.bind(out_ep)
        for i in range(self.n):
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100000)
            ep = self._dir.endpoint(f"in{i}")
            sock.bind(ep)
            self._inboxes.append(sock)
            proc = _SPAWN.Process(
                target=_child_main,
                args=(self.target, i, ep, out_ep, self.args, os.getpid()),
                name=f"clone-agent-{self.name}-{i}",
                daemon=True,
            )
            proc.start()
            self.procs.append(proc)

    def close(self, abort: bool = False) -> dict[int, Any]:
        """End every worker: stop (unless aborting), join, terminate, kill. Idempotent."""
        if not abort:
            deadline = time.monotonic() + self.stop_timeout
            crash: CloneError | None = None
            # A worker still starting has not connected to its inbox yet, and a stop
            # sent now would be dropped: wait for its "ready" first (work may have been
            # submitted before the pool was ready, see is_ready).
            try:
                while time.monotonic() < deadline and any(
                        i not in self._ready and p.exitcode is None
                        for i, p in enumerate(self.procs)):
                    for _ in self.events(timeout=0.05):
                        pass
            except CloneError as exc:
                crash = exc
            for i, sock in enumerate(self._inboxes):
                if i not in self._finals and self.procs[i].exitcode is None:
                    try:
                        sock.send(_pack(["stop"]), zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass
            while crash is None and len(self._finals) < self._alive_count() and \
                    time.monotonic() < deadline:
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

    def _alive_count(self) -> int:
        return sum(1 for i, p in enumerate(self.procs) if p.exitcode is None or i in self._finals)

    def _reap(self, timeout: float, quiet: bool = False) -> None:
        """Join every worker within ``timeout``, then terminate, then kill. ``quiet``: an
        abort, where terminating at once is the plan, not a worker's fault."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.exitcode is None:
                (log.debug if quiet else log.warning)(
                    "%s did not stop in time; terminating it", proc.name)
                proc.terminate()
                proc.join(2.0)
            if proc.exitcode is None:
                log.warning("%s ignored SIGTERM; killing it", proc.name)
                proc.kill()
                proc.join(2.0)

    def _teardown(self) -> None:
        for sock in self._inboxes:
            sock.close(0)
        self._inboxes = []
        if self.outbox is not None:
            self.outbox.close(0)
            self.outbox = None
        if self._dir is not None:
            self._dir.close()
            self._dir = None
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
        self._inboxes[index].send(_pack(msg))

    def broadcast(self, msg: list[Any]) -> None:
        for sock in self._inboxes:
            sock.send(_pack(msg))

    def events(self, timeout: float = 0.0) -> Iterator[list[Any]]:
        """Yield ``[kind, index, payload]`` for each "done"; raise a worker's crash.

        Waits up to ``timeout`` seconds for the first event, then drains without waiting.
        """
        assert self.outbox is not None
        wait_ms = int(timeout * 1000)
        while True:
            if not self.outbox.poll(wait_ms):
                self.check_alive()
                return
            wait_ms = 0
            kind, index, payload = _unpack(self.outbox.recv())
            if kind == "done":
                self.outstanding[index] -= 1
                yield [kind, index, payload]
            elif kind == "ready":
                self._ready.add(index)
            elif kind == "final":
                self._finals[index] = payload
            elif kind == "crash":
                raise self._crash_error(index, payload)

    def is_ready(self, index: int) -> bool:
        """Worker ``index`` has imported its handler (its "ready" came through
        :meth:`events`). Work submitted before that waits in the worker's inbox."""
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
                # Give a crash report already on the wire a chance to be read first.
                assert self.outbox is not None
                while self.outbox.poll(0):
                    kind, index, payload = _unpack(self.outbox.recv())
                    if kind == "crash":
                        raise self._crash_error(index, payload)
                    if kind == "final":
                        self._finals[index] = payload
                if i not in self._finals:
                    raise StageCrashed(
                        f"{self.name}-{i}", f"process exited with status {proc.exitcode}"
                    )

    def _crash_error(self, index: int, outcome: dict[str, Any]) -> CloneError:
        if outcome.get("errno"):
            err = by_number(int(outcome["errno"]), outcome["message"])
        else:
            err = StageCrashed(f"{self.name}-{index}", outcome["message"])
        log.debug("worker %s-%d traceback:\n%s", self.name, index, outcome.get("traceback"))
        return err

    @property
    def ipc_dir(self) -> str | None:
        """The 0700 directory of this pool's descriptor-channel socket files, while open."""
        return self._dir.path if self._dir is not None else None

    def sentinels(self) -> list[int]:
        return [p.sentinel for p in self.procs]


def end_resource_tracker() -> None:
    """Stop and reap multiprocessing's resource-tracker helper, which the spawn start
    method starts on first use and which would otherwise outlive us for a moment as an
    orphan. Called once, by the command line, after every pool has been joined."""
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker, "_resource_tracker", None)
    stop = getattr(tracker, "_stop", None)
    if stop is not None:
        try:
            stop()
        except (OSError, ChildProcessError):
            pass
