"""A donor in a worker process for ``clone-local``: the same snapshot, no network.

The worker is an ordinary stage worker (:class:`~engine.stage.Pipeline` of one, the
same process mechanism as the readers and writers): its handler runs
:class:`~donor.server.DonorServer` in a thread on an IPC socket file in a 0700
directory of the parent's (:class:`~engine.ipc.EndpointDir`: no TCP port, and no
other local user can connect and pull the data directory). The worker is "ready" only
once the server accepts clones (a server that cannot start is the worker's crash, and
its error, a data directory another process owns say, comes back as itself); the
pipeline's stop ends the server at a safe point and joins it. ``with LocalDonor(...)``
starts it and, however the block ends, stops and joins it and removes the directory.

The fast path (:mod:`donor.direct`): given ``copy_to``, the destination's root, the
server's readers copy FILE COPY's segments there with ``copy_file_range`` instead of
sending their bytes; :func:`direct_copy` says when the command line may ask for it.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from engine.errors import CloneError, StageCrashed
from engine.ipc import EndpointDir
from engine.stage import Pipeline

if TYPE_CHECKING:
    from engine.config import CloneConfig

log = logging.getLogger("clone_agent.donor")

READY_TIMEOUT = 60.0  #: seconds for the server to open the directory and listen


class LocalDonorWorker:
    """The handler of the worker: a donor server in a thread, stopped by ``close``."""

    def __init__(self, index: int, args: dict[str, Any]) -> None:
        from donor.server import DonorServer

        self.stop = threading.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        copy_to = args.get("copy_to")

        class LocalServer(DonorServer):
            """Its readers also get the destination, for the fast path."""

            def _pool(self, name: str, target: str, pool_args: dict[str, Any]) -> Any:
                if copy_to and target == "donor.reader:Reader":
                    pool_args = {**pool_args, "copy_to": copy_to}
                return super()._pool(name, target, pool_args)

        self.server = LocalServer(args["datadir"], "local", 0, url=args["url"])
        # A pipe in the server's poller: ``close`` wakes its loop at once rather than at
        # the end of its wait (a tenth of a second that every clone-local would pay).
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.server.poller.register(self._wake_r, 1)  # zmq.POLLIN
        self.thread = threading.Thread(target=self._serve, name="local-donor", daemon=True)
        self.thread.start()
        while not self.ready.wait(0.1):  # bounded by the pipeline's readiness wait
            if not self.thread.is_alive():
                break
        if self.error is not None:
            raise self.error  # the pipeline sends it back as the crash it is
        if not self.ready.is_set():
            raise StageCrashed("local donor", "the server ended before it was ready")

    def _serve(self) -> None:
        try:
            self.server.serve(should_stop=self.stop.is_set,
                              on_ready=lambda host, port: self.ready.set())
        except BaseException as exc:  # noqa: BLE001 - reported through __init__ or close
            self.error = exc

    def handle(self, msg: list[Any]) -> Any:
        raise StageCrashed("local donor", f"unexpected work {msg[0]!r}")

    def close(self) -> dict[str, Any]:
        self.stop.set()
        os.write(self._wake_w, b"x")
        self.thread.join(30)
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self.error is not None:
            raise self.error
        return {}


def direct_copy(config: CloneConfig) -> bool:
    """Whether clone-local takes the fast path (:mod:`donor.direct`): not under a
    bandwidth limit, which the writers enforce on the bytes they write (a block of the
    fast path carries none). Whether the kernel copies between the two file systems is
    found by the readers' first copy; where it does not, they use the ring."""
    return not (config.max_data_bandwidth or config.max_network_bandwidth) and \
        hasattr(os, "copy_file_range")


class LocalDonor:
    """``with LocalDonor(datadir) as donor:`` serves ``datadir`` at ``donor.url``;
    ``copy_to``: the destination's root, for the fast path.

    :meth:`start` may come earlier than the ``with`` block (the command line starts
    the donor before it imports the recipient, so that the two overlap); the block
    waits for it, and however it ends, stops it."""

    def __init__(self, datadir: str, timeout: float = READY_TIMEOUT,
                 copy_to: str | None = None) -> None:
        self.datadir = datadir
        self.timeout = timeout
        self._dir = EndpointDir()
        self.url = self._dir.endpoint("donor")
        args: dict[str, Any] = {"datadir": datadir, "url": self.url}
        if copy_to:
            args["copy_to"] = copy_to
        self._pool = Pipeline("local-donor", "donor.local:LocalDonorWorker", 1, args,
                              stop_timeout=30.0)
        self._started = False
        self._closed = False

    def start(self) -> LocalDonor:
        """Start the donor's process without waiting for it."""
        if not self._started:
            self._started = True
            try:
                self._pool.start()
            except BaseException:
                self._close(abort=True)
                raise
        return self

    def __enter__(self) -> LocalDonor:
        try:
            self.start()
            self._pool.wait_ready(self.timeout)
        except BaseException:
            self._close(abort=True)
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._close(abort=False)

    def close(self) -> None:
        """Stop and join the donor if the ``with`` block has not (a failure before
        it); nothing once it has."""
        self._close(abort=True)

    def _close(self, abort: bool) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._pool.close(abort=abort)
        except CloneError as exc:  # the clone's own outcome is what the user sees
            log.warning("local donor ended badly: %s", exc.message)
        finally:
            self._dir.close()
