"""The local control channel of ``serve``: how ``pull --replace`` finds the server that
owns a data directory, and has it let go of the directory and come back onto the clone
(the RESTART stage). The server's side is ``donor/control.py``.

A serve makes an :class:`~engine.ipc.EndpointDir` (mode 0700, in /dev/shm, removed at
exit and swept like a ring when its process is gone) holding ``control``, a listening
Unix stream socket, and ``serve.json`` (``{"pid", "datadir", "bind"}``), written
atomically once the socket listens. A pull finds servers by listing /dev/shm
(:func:`find_servers`); it believes only directories of its own user (or root), of
mode 0700 and not links, whose process is alive. As with clone-local's endpoint, only
their owner and root can connect: connect(2) needs search permission on the directory.

Why a stream socket and not ZeroMQ: a server released for the swap must know at once
and for certain when its pull dies, to settle what the pull left and serve again; a
stream's end of file says exactly that, where ZeroMQ reconnects and hides it.

One JSON object a line, each way. Requests ``{"op": OP, ...}`` with OP ``hello``,
``reserve``, ``release``, ``reopen``; answers ``{"ok": true, ...}`` or ``{"ok": false,
"errno": N, "message": ..., "hint": ...}``. A reservation lasts as long as the
connection that made it.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass
from typing import Any

import orjson

from engine.errors import CloneError, RestartFailed, by_number
from engine.ipc import SUFFIX
from engine.ring import PREFIX, SHM_DIR, _alive

SOCKET_NAME = "control"
INFO_NAME = "serve.json"
MAX_LINE = 1 << 16  #: bytes in one request or answer


def encode(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj) + b"\n"


def answer_error(err: CloneError) -> dict[str, Any]:
    return {"ok": False, "errno": err.errno, "message": err.message, "hint": err.hint}


@dataclass(frozen=True)
class ServerInfo:
    """A live ``serve`` on this host, as its ``serve.json`` says."""

    pid: int
    datadir: str
    bind: str
    socket: str


def _trusted(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
            and st.st_uid in (os.geteuid(), 0))


def find_servers(base: str = SHM_DIR) -> list[ServerInfo]:
    """Every live server of this user (or root) on this host; never raises."""
    try:
        names = os.listdir(base)
    except OSError:
        return []
    found = []
    for name in names:
        if not (name.startswith(PREFIX) and name.endswith(SUFFIX)):
            continue
        path = os.path.join(base, name)
        try:
            pid = int(name[len(PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if not _trusted(path) or not _alive(pid):
            continue
        try:
            with open(os.path.join(path, INFO_NAME), "rb") as fh:
                info = orjson.loads(fh.read())
            found.append(ServerInfo(int(info["pid"]), str(info["datadir"]),
                                    str(info["bind"]), os.path.join(path, SOCKET_NAME)))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # another endpoint directory (a stage, clone-local), or not ready
    return found


class ControlClient:
    """A connection to one server's control socket, owned by the pull's coordinator.
    Every call blocks at most ``timeout`` seconds (its own, or the client's). A channel
    that fails is :class:`RestartFailed` (3707), the number a server that does not come
    back gets; the preflight, which asks before anything changes, reports it as an owner
    it cannot ask."""

    def __init__(self, info: ServerInfo, timeout: float = 10.0) -> None:
        self.info = info
        self.timeout = timeout
        self._buf = b""
        self.sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(info.socket)
        except OSError as exc:
            self.close()
            raise self._lost(exc) from exc

    def _lost(self, exc: BaseException | str) -> RestartFailed:
        why = exc if isinstance(exc, str) else (getattr(exc, "strerror", None) or str(exc)
                                                or type(exc).__name__)
        return RestartFailed(f"the server of {self.info.datadir} (pid {self.info.pid}) "
                             f"does not answer: {why}")

    def call(self, op: str, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        """Send one request and return its answer; an answer that refuses is raised as
        the error it carries (its number, message and hint)."""
        if self.sock is None:
            raise self._lost("the channel is closed")
        try:
            self.sock.settimeout(timeout if timeout is not None else self.timeout)
            self.sock.sendall(encode({"op": op, **args}))
            while b"\n" not in self._buf:
                chunk = self.sock.recv(MAX_LINE)
                if not chunk:
                    raise self._lost("it closed the channel")
                self._buf += chunk
                if len(self._buf) > MAX_LINE:
                    raise self._lost("an answer too long")
        except OSError as exc:  # socket.timeout is an OSError
            raise self._lost(exc) from exc
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            reply: dict[str, Any] = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise self._lost("an answer that is not JSON") from exc
        if not reply.get("ok"):
            raise by_number(int(reply.get("errno") or 0), str(reply.get("message")),
                            reply.get("hint"))
        return reply

    def close(self) -> None:
        """Ends the reservation, if this connection holds one. Idempotent."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
