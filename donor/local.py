"""A donor in a child process for ``clone-local``: the same snapshot, no network.

The child runs :class:`~donor.server.DonorServer` on an IPC socket file in a 0700
directory of the parent's (:class:`~engine.ipc.EndpointDir`: no TCP port, and no other
local user can connect and pull the data directory), and is stopped through a pipe;
``with LocalDonor(...)`` starts it, waits (bounded) until it is ready, and stops and
joins it and removes the directory on exit.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from multiprocessing.connection import Connection
from typing import Any

from engine.errors import StageCrashed, by_number
from engine.ipc import EndpointDir

log = logging.getLogger("clone_agent.donor")


def _child(datadir: str, url: str, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from donor.server import DonorServer
    from engine.errors import CloneError

    try:
        server = DonorServer(datadir, "local", 0, url=url)
        server.serve(should_stop=conn.poll, on_ready=lambda h, p: conn.send(["ready"]))
    except CloneError as exc:
        conn.send(["error", exc.errno, exc.message])
    except Exception as exc:  # noqa: BLE001 - reported to the parent as an outcome
        conn.send(["error", 0, f"{type(exc).__name__}: {exc}"])


class LocalDonor:
    def __init__(self, datadir: str, timeout: float = 60.0) -> None:
        self.datadir = datadir
        self._dir = EndpointDir()
        self.url = self._dir.endpoint("donor")
        self.timeout = timeout
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(datadir, self.url, child_conn),
                                 name="clone-agent-local-donor")
        self._child_conn = child_conn

    def __enter__(self) -> LocalDonor:
        try:
            self._proc.start()
        except BaseException:
            self._dir.close()
            raise
        self._child_conn.close()
        if not self._conn.poll(self.timeout):
            self._stop()
            raise StageCrashed("local donor", f"not ready within {self.timeout:g} s")
        msg: Any = self._conn.recv()
        if msg[0] != "ready":
            self._stop()
            raise by_number(msg[1], msg[2]) if msg[1] else StageCrashed("local donor", msg[2])
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        try:
            self._conn.send(["stop"])
        except OSError:
            pass
        self._proc.join(15)
        if self._proc.exitcode is None:
            log.warning("local donor did not stop; terminating it")
            self._proc.terminate()
            self._proc.join(5)
        if self._proc.exitcode is None:
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()
        self._dir.close()
