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
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from engine.errors import CloneError, StageCrashed
from engine.ipc import EndpointDir
from engine.stage import Pipeline

log = logging.getLogger("clone_agent.donor")

READY_TIMEOUT = 60.0  #: seconds for the server to open the directory and listen


class LocalDonorWorker:
    """The handler of the worker: a donor server in a thread, stopped by ``close``."""

    def __init__(self, index: int, args: dict[str, Any]) -> None:
        from donor.server import DonorServer

        self.stop = threading.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.server = DonorServer(args["datadir"], "local", 0, url=args["url"])
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
        self.thread.join(30)
        if self.error is not None:
            raise self.error
        return {}


class LocalDonor:
    """``with LocalDonor(datadir) as donor:`` serves ``datadir`` at ``donor.url``."""

    def __init__(self, datadir: str, timeout: float = READY_TIMEOUT) -> None:
        self.datadir = datadir
        self.timeout = timeout
        self._dir = EndpointDir()
        self.url = self._dir.endpoint("donor")
        self._pool = Pipeline("local-donor", "donor.local:LocalDonorWorker", 1,
                              {"datadir": datadir, "url": self.url}, stop_timeout=30.0)

    def __enter__(self) -> LocalDonor:
        try:
            self._pool.start()
            self._pool.wait_ready(self.timeout)
        except BaseException:
            self._close(abort=True)
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._close(abort=False)

    def _close(self, abort: bool) -> None:
        try:
            self._pool.close(abort=abort)
        except CloneError as exc:  # the clone's own outcome is what the user sees
            log.warning("local donor ended badly: %s", exc.message)
        finally:
            self._dir.close()
