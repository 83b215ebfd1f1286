"""The donor of ``clone-local``: the same snapshot, no network.

:class:`LocalDonor` runs a :class:`~donor.server.DonorServer` in a thread of the
command line's own process, on an IPC socket file in a 0700 directory of its own
(:class:`~engine.ipc.EndpointDir`: no TCP port, and no other local user can connect
and pull the data directory); the recipient's :class:`~recipient.client.Pull` reaches
it there, as it would a donor on another host. The bulk work is in processes as
usual: the server's readers, the recipient's writers.

Why a thread and not a process of its own: the donor's start is most of a small
clone-local's time. A process would pay an interpreter and its own import of ZeroMQ,
the cipher and the protocol, which the command line imports anyway for the recipient;
here the two share them, and the server's readers start while the recipient imports
and shakes hands (the server does not wait for them to be ready, as ``serve`` does).
Both coordinators then share one interpreter; on the fast path (:mod:`donor.direct`)
a block costs each little.

``with LocalDonor(...)`` waits until the server accepts clones (a server that cannot
start raises its error, a data directory another process owns say) and, however the
block ends, stops it at a safe point, joins it and removes the directory.
:meth:`LocalDonor.start` may come earlier, so that the donor starts while the command
line imports the recipient.

The fast path: given ``copy_to``, the destination's root, the server's readers copy
FILE COPY's segments there with ``copy_file_range`` instead of sending their bytes;
:func:`direct_copy` says when the command line may ask for it.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from engine.errors import CloneError, StageCrashed
from engine.ipc import EndpointDir

if TYPE_CHECKING:
    from donor.server import DonorServer
    from engine.config import CloneConfig

log = logging.getLogger("clone_agent.donor")

READY_TIMEOUT = 60.0  #: seconds for the server to open the directory and listen
STOP_TIMEOUT = 30.0  #: seconds for the server to end its clone and its readers


def direct_copy(config: CloneConfig) -> bool:
    """Whether clone-local takes the fast path (:mod:`donor.direct`): not under a
    bandwidth limit, which the writers enforce on the bytes they write (a block of the
    fast path carries none). Whether the kernel copies between the two file systems is
    found by the readers' first copy; where it does not, they use the ring."""
    return not (config.max_data_bandwidth or config.max_network_bandwidth) and \
        hasattr(os, "copy_file_range")


def _server(datadir: str, url: str, copy_to: str | None) -> DonorServer:
    """A donor server whose readers also get the destination, for the fast path."""
    from donor.server import DonorServer

    class LocalServer(DonorServer):
        pools_ready_first = False

        def _pool(self, name: str, target: str, pool_args: dict[str, Any],
                  wait: bool | None = None) -> Any:
            if copy_to and target == "donor.reader:Reader":
                pool_args = {**pool_args, "copy_to": copy_to}
            return super()._pool(name, target, pool_args, wait)

    server = LocalServer(datadir, "local", 0, url=url)
    if copy_to:
        server.direct = True
        server.lanes = server.n_readers
    return server


class LocalDonor:
    """``with LocalDonor(datadir) as donor:`` serves ``datadir`` at ``donor.url``;
    ``copy_to``: the destination's root, for the fast path."""

    def __init__(self, datadir: str, timeout: float = READY_TIMEOUT,
                 copy_to: str | None = None) -> None:
        self.datadir = datadir
        self.timeout = timeout
        self.copy_to = copy_to
        self._dir = EndpointDir()
        self.url = self._dir.endpoint("donor")
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="local-donor", daemon=True)
        # A pipe in the server's poller: stopping wakes its loop at once rather than at
        # the end of its wait (a tenth of a second that every clone-local would pay).
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closed = False

    def _serve(self) -> None:
        try:
            server = _server(self.datadir, self.url, self.copy_to)
            server.poller.register(self._wake_r, 1)  # zmq.POLLIN
            server.serve(should_stop=self._stop.is_set,
                         on_ready=lambda host, port: self._ready.set())
        except BaseException as exc:  # noqa: BLE001 - raised by __enter__ or logged at close
            self._error = exc

    def start(self) -> LocalDonor:
        """Start the donor's thread without waiting for it."""
        if self._thread.ident is None and not self._closed:
            self._thread.start()
        return self

    def __enter__(self) -> LocalDonor:
        try:
            self.start()
            deadline = self.timeout
            while not self._ready.wait(min(0.1, deadline)):  # bounded
                deadline -= 0.1
                if not self._thread.is_alive() or deadline <= 0:
                    break
            if self._error is not None:
                raise self._error
            if not self._ready.is_set():
                raise StageCrashed("local donor", "the server ended before it was ready"
                                   if not self._thread.is_alive() else
                                   f"not ready within {self.timeout:g} s")
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
            self._stop.set()
            os.write(self._wake_w, b"x")
            if self._thread.is_alive():
                self._thread.join(STOP_TIMEOUT)
            if self._thread.is_alive():
                log.warning("the local donor did not stop within %g s", STOP_TIMEOUT)
            elif self._error is not None and not abort and self._ready.is_set():
                err = self._error
                # the clone's own outcome is what the user sees
                log.warning("local donor ended badly: %s",
                            err.message if isinstance(err, CloneError) else err)
        finally:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._dir.close()
