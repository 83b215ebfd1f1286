"""The server's end of the local control channel (``engine/control.py``): a
``pull --replace`` of the served directory reserves it, has it released for the swap,
and has it reopened on the clone (MySQL's RESTART stage, without a process restart).

Runs in the ``serve`` process, inside :class:`~donor.server.DonorServer`'s loop: the
listening socket and every connection are registered in the loop's poller, and
:meth:`ServeControl.handle` reads only what is ready, so the loop never waits on a
pull. A release or a reopen is done in the loop, synchronously: while it runs there is
no clone to serve (release ends it first).

:class:`ServeControl` also holds the served directory shared for the server's life
(:func:`engine.swap.open_shared`, which settles an interrupted replace first), whatever
the tree, so that a pull finds a plain tree's server as surely as a page store's, and
no swap starts under a server that has not released its directory.

A pull that dies (end of file on its connection) gives its reservation back; if it had
the directory released, the server settles what it left (rolls its swap back or
forward) and serves again on whatever is there.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from typing import Any, Protocol

import orjson
import zmq

from engine.control import INFO_NAME, MAX_LINE, SOCKET_NAME, answer_error, encode
from engine.errors import CloneError, CloneInProgress, ProtocolError
from engine.fsutil import write_durable
from engine.ipc import EndpointDir
from engine.swap import DirLock, open_shared, settle_gone

log = logging.getLogger("clone_agent.donor")
#: Seconds a pull that went away may still hold its lock on the directory (it is
#: released with the pull's last descriptor, which may close after the channel's).
LOCK_GONE_WITHIN = 5.0


class Restartable(Protocol):
    """What the control channel needs of its server."""

    workload_rate: int | None

    def describe(self) -> dict[str, Any]: ...

    def release_datadir(self) -> dict[str, Any]: ...

    def reopen_datadir(self) -> dict[str, Any]: ...


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""


class ServeControl:
    """Owned by the serve process; ``with ServeControl(server, datadir):`` holds the
    directory, :meth:`listen` opens the channel, ``close()`` removes it."""

    def __init__(self, server: Restartable, datadir: str) -> None:
        self.server = server
        self.datadir = datadir
        self.lock: DirLock | None = None
        self.endpoint: EndpointDir | None = None
        self.listener: socket.socket | None = None
        self.poller: zmq.Poller | None = None
        self.conns: dict[int, _Conn] = {}
        self.reserved: _Conn | None = None
        self.released = False
        self._fatal: CloneError | None = None  #: a failed reopen, raised once answered

    def __enter__(self) -> ServeControl:
        self.lock = open_shared(self.datadir)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def listen(self, bind: str, poller: zmq.Poller) -> None:
        """Open the channel and say where (``serve.json``), before the server says
        ready: a pull started after ``ready`` finds it."""
        self.endpoint = EndpointDir()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(os.path.join(self.endpoint.path, SOCKET_NAME))
        self.listener.listen(4)
        self.listener.setblocking(False)
        write_durable(os.path.join(self.endpoint.path, INFO_NAME), orjson.dumps(
            {"pid": os.getpid(), "datadir": self.datadir, "bind": bind}), durable=False)
        self.poller = poller
        poller.register(self.listener.fileno(), zmq.POLLIN)

    def handle(self, ready: dict[Any, int]) -> None:
        """Serve whatever the poller found ready. A reopen that fails is raised: the
        server cannot serve its directory any more, and ends with that error."""
        if self.listener is not None and self.listener.fileno() in ready:
            self._accept()
        for fd in [fd for fd in self.conns if fd in ready]:
            conn = self.conns.get(fd)
            if conn is not None:
                self._read(conn)

    def _accept(self) -> None:
        assert self.listener is not None and self.poller is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            # The 0700 directory already keeps others out; the peer's uid says so twice.
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                   struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", cred)
            if uid not in (os.geteuid(), 0):
                sock.close()
                continue
            sock.setblocking(False)
            self.conns[sock.fileno()] = _Conn(sock)
            self.poller.register(sock.fileno(), zmq.POLLIN)

    def _read(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(MAX_LINE)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk or len(conn.buf) + len(chunk) > MAX_LINE:
            self._drop(conn)
            return
        conn.buf += chunk
        while b"\n" in conn.buf:
            line, _, conn.buf = conn.buf.partition(b"\n")
            try:
                request = orjson.loads(line)
                reply = self._request(conn, request)
            except CloneError as err:
                reply = answer_error(err)
            except orjson.JSONDecodeError:
                reply = answer_error(ProtocolError("a control request that is not JSON"))
            self._send(conn, reply)
            if self._fatal is not None:
                fatal, self._fatal = self._fatal, None
                raise fatal

    def _send(self, conn: _Conn, reply: dict[str, Any]) -> None:
        try:
            conn.sock.setblocking(True)
            conn.sock.settimeout(5.0)  # a line the kernel's buffer takes at once
            conn.sock.sendall(encode(reply))
            conn.sock.setblocking(False)
        except OSError:
            self._drop(conn)

    def _request(self, conn: _Conn, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op") if isinstance(request, dict) else None
        if op == "hello":
            return {"ok": True, "pid": os.getpid(), "datadir": self.datadir,
                    "released": self.released, **self.server.describe()}
        if op == "reserve":
            if self.reserved is not None and self.reserved is not conn:
                raise CloneInProgress(hint="another `pull --replace` is replacing this "
                                      "directory; wait for it to end")
            self.reserved = conn
            return {"ok": True}
        if self.reserved is not conn:
            raise ProtocolError(f"control request {op!r} without the reservation")
        if op == "release" and not self.released:
            log.info("RESTART: releasing %s for a replace", self.datadir)
            result = self.server.release_datadir()
            if self.lock is not None:
                self.lock.close()
                self.lock = None
            self.released = True
            return {"ok": True, **result}
        if op == "reopen" and self.released:
            try:
                return {"ok": True, **self._reopen()}
            except CloneError as err:
                self._fatal = err  # answered first, then the server ends with it
                raise
        raise ProtocolError(f"unexpected control request {op!r}")

    def _reopen(self, wait: float = 0.0) -> dict[str, Any]:
        self.lock = open_shared(self.datadir, wait)
        result = self.server.reopen_datadir()
        self.released = False
        log.info("RESTART: serving %s again", self.datadir)
        return result

    def _drop(self, conn: _Conn) -> None:
        """A connection ended: the reservation it held goes with it; a directory it had
        released is settled and served again."""
        fd = conn.sock.fileno()
        self.conns.pop(fd, None)
        if self.poller is not None:
            try:
                self.poller.unregister(fd)
            except KeyError:
                pass
        conn.sock.close()
        if conn is not self.reserved:
            return
        self.reserved = None
        # A pull killed with SIGKILL: the kernel may close its end of this channel
        # before its locks on the directory and on the replace.
        done = settle_gone(self.datadir, LOCK_GONE_WITHIN)
        if done:
            log.warning("the replacing pull went away; its replace was %s", done)
        if self.released:
            self._reopen(wait=LOCK_GONE_WITHIN)

    def close(self) -> None:
        for conn in list(self.conns.values()):
            conn.sock.close()
        self.conns.clear()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
        if self.lock is not None:
            self.lock.close()
            self.lock = None
