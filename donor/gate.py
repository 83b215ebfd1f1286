"""Who may talk to the donor: each connection's handshake and authentication.

Runs in the ``serve`` process, beside the server's socket loop. Every connection (a
ZeroMQ peer identity) starts with HELLO: the handshake of engine/crypto.py makes it
encrypted, unless the recipient asked for a plain one and the donor allows it
(``--require-secure-transport`` refuses that with MySQL's 3159). Then the master stream
of a clone proves a password with SCRAM (AUTH) unless the donor allows anonymous
clones; other streams show the clone's secret in ATTACH instead (donor/session.py).

A connection is a :class:`Conn` here until it ends; what it may do is in its fields:
no handshake, nothing but HELLO; handshake but no user, nothing but AUTH (or INIT,
anonymous); a user with BACKUP_ADMIN, INIT. Connections that do not finish within
``HANDSHAKE_DEADLINE`` are forgotten, at most ``MAX_CONNS`` are kept (the oldest
unauthenticated one goes first), and a source address whose password was wrong waits
before it hears so, longer at each failure.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from engine import crypto
from engine import messages as M
from engine import protocol as P
from engine.auth import ServerSide, UsersFile
from engine.errors import AccessDenied, InsecureTransport, NoPrivilege, ProtocolError

log = logging.getLogger("clone_agent.donor")

HANDSHAKE_DEADLINE = 10.0  #: seconds from a connection's HELLO to its clone or ATTACH
MAX_CONNS = 256  #: connections kept at once
PENALTY_BASE = 0.25  #: seconds of wait after a first failed password, doubled each time
PENALTY_MAX = 8.0
PRIVILEGE = "BACKUP_ADMIN"


@dataclass
class Conn:
    ident: bytes
    born: float
    peer: str
    cipher: crypto.ControlCipher | None = None
    keys: crypto.Keys | None = field(default=None, repr=False)
    scram: ServerSide | None = field(default=None, repr=False)
    user: str | None = None  #: authenticated ("" for an anonymous clone)
    in_clone: bool = False  #: the master or an attached stream of the running clone

    @property
    def encrypted(self) -> bool:
        return self.cipher is not None


class Gate:
    """The connections of one server and their state of trust."""

    def __init__(self, users: UsersFile | None, key: crypto.StaticKey | None,
                 require_secure_transport: bool = False) -> None:
        """``key``: the donor's key pair; None: one made at the first encrypted HELLO,
        for this server's life."""
        self.users = users
        self._key = key
        self.require_secure = require_secure_transport
        self.conns: dict[bytes, Conn] = {}
        self._secret = os.urandom(32)  #: for the verifiers of unknown users
        self._failures: dict[str, tuple[int, float]] = {}  # peer -> (count, last)
        self.auth_failures = 0  #: every failed proof since the start (metrics)
        #: replies held back for a failed password: (when, ident, error)
        self.delayed: list[tuple[float, bytes, Exception]] = []

    @property
    def key(self) -> crypto.StaticKey:
        if self._key is None:
            self._key = crypto.StaticKey.generate()
        return self._key

    @property
    def anonymous(self) -> bool:
        return self.users is None

    def cipher(self, ident: bytes) -> crypto.ControlCipher | None:
        conn = self.conns.get(ident)
        return conn.cipher if conn is not None else None

    def conn(self, ident: bytes) -> Conn:
        conn = self.conns.get(ident)
        if conn is None:
            raise ProtocolError("HELLO first: this connection has no handshake")
        return conn

    # -- HELLO --------------------------------------------------------------------------
    def hello(self, ident: bytes, peer: str, hello: M.Hello) -> M.HelloReply:
        if ident in self.conns:
            raise ProtocolError("a second HELLO on one connection")
        version = P.negotiate(hello.version)
        if not hello.e and self.require_secure:
            raise InsecureTransport()
        self._make_room()
        conn = self.conns[ident] = Conn(ident, time.monotonic(), peer)
        auth = "none" if self.anonymous else "scram"
        if not hello.e:
            return M.HelloReply(version, auth)
        e_pub, confirm, keys = crypto.respond(self.key, hello.e)
        conn.keys = keys
        conn.cipher = crypto.ControlCipher(keys.d2r, keys.r2d)
        return M.HelloReply(version, auth, crypto.b64(e_pub), crypto.b64(self.key.public),
                            crypto.b64(confirm))

    def _make_room(self) -> None:
        if len(self.conns) < MAX_CONNS:
            return
        waiting = [c for c in self.conns.values() if not c.in_clone]
        if waiting:
            oldest = min(waiting, key=lambda c: c.born)
            del self.conns[oldest.ident]

    # -- AUTH -----------------------------------------------------------------------------
    def auth(self, ident: bytes, auth: M.Auth) -> M.AuthReply:
        conn = self.conn(ident)
        if self.users is None:
            raise ProtocolError("AUTH at a donor that allows anonymous clones")
        if conn.user is not None:
            raise ProtocolError("AUTH after authentication")
        if auth.step == "first":
            if conn.scram is not None:
                raise ProtocolError("a second SCRAM first message")
            conn.scram = ServerSide(self.users, self._secret,
                                    conn.keys.binding if conn.keys is not None else None)
            try:
                return M.AuthReply(conn.scram.first(auth.data))
            except Exception as exc:  # scramp's parse errors: a malformed message
                conn.scram = None
                raise ProtocolError(f"SCRAM first message: {type(exc).__name__}") from None
        if conn.scram is None:
            raise ProtocolError("SCRAM final message before the first")
        try:
            proved, final = conn.scram.final(auth.data)
        except Exception as exc:  # malformed
            raise ProtocolError(f"SCRAM final message: {type(exc).__name__}") from None
        name = conn.scram.name
        if not proved:
            self._fail(conn, name)
        user = conn.scram.user()
        assert user is not None  # an unknown user never proves a password
        if not user.backup_admin:
            log.warning("user %r from %s lacks %s", name, conn.peer or "local", PRIVILEGE)
            raise NoPrivilege(PRIVILEGE)
        conn.user = name
        self._failures.pop(conn.peer, None)
        log.info("user %r authenticated from %s", name, conn.peer or "local")
        return M.AuthReply(final)

    def _fail(self, conn: Conn, name: str) -> None:
        """A wrong password or an unknown user: one answer, later at each failure."""
        count, _ = self._failures.get(conn.peer, (0, 0.0))
        count += 1
        self.auth_failures += 1
        now = time.monotonic()
        self._failures[conn.peer] = (count, now)
        delay = min(PENALTY_BASE * 2 ** (count - 1), PENALTY_MAX)
        log.warning("failed authentication for user %r from %s (%d in a row)",
                    name, conn.peer or "local", count)
        del self.conns[conn.ident]
        err = AccessDenied(name, conn.peer.rpartition(":")[0] or "localhost", "YES")
        self.delayed.append((now + delay, conn.ident, err))
        raise _Delayed()

    def due(self, now: float) -> list[tuple[bytes, Exception]]:
        """Held-back answers whose time has come."""
        ready = [(ident, err) for when, ident, err in self.delayed if when <= now]
        self.delayed = [d for d in self.delayed if d[0] > now]
        return ready

    # -- INIT -------------------------------------------------------------------------------
    def may_clone(self, ident: bytes) -> Conn:
        conn = self.conn(ident)
        if conn.user is None:
            if not self.anonymous:
                raise AccessDenied("", conn.peer.rpartition(":")[0] or "localhost", "NO")
            conn.user = ""
        return conn

    def expire(self, now: float) -> None:
        """Forget connections that have not come to a clone within the deadline."""
        for ident, conn in list(self.conns.items()):
            if not conn.in_clone and now - conn.born > HANDSHAKE_DEADLINE:
                del self.conns[ident]

    def forget(self, idents: Any) -> None:
        for ident in idents:
            self.conns.pop(ident, None)


class _Delayed(Exception):
    """The answer to this message is held back (a failed password): send nothing now."""
