"""Clone users and their proof: a users file of SCRAM-SHA-256 verifiers, and both
sides of the SCRAM exchange (RFC 5802/7677, through the `scramp` library).

The users file holds, per user, the salt, the iteration count, the stored key and the
server key (never a password, from which they cannot be turned back into one) and
whether the user has BACKUP_ADMIN, MySQL's privilege for cloning from a donor. It is
JSON, mode 0600, and replaced atomically (a temporary file, fsync, rename).

The password never crosses the network: the recipient proves it knows the password
with SCRAM. When the stream is encrypted, the proof is bound to the stream's handshake
(SCRAM-SHA-256-PLUS, its transcript as the binding data), so a relay in the middle,
which must run its own handshake with each side, cannot pass the proof on.

An unknown user is answered as a known one with a made-up verifier (derived from a
secret of the server's, so the same name always gets the same salt), and fails at the
same step with the same error in the same time: the answers do not tell which users
exist.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import stat
from dataclasses import dataclass
from typing import Any

import orjson

from engine.errors import LocalIOError, UsageError

# scramp is imported where an exchange or a new user needs it, not here: every donor
# and recipient imports this module at its start, clone-local never authenticates, and
# scramp's import (about 50 ms) would sit on their start-up path for nothing.

ITERATIONS = 4096  #: RFC 7677's minimum; the verifier's cost, paid once a clone
NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
FORMAT = 1


@dataclass(frozen=True)
class User:
    name: str
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes
    backup_admin: bool = True

    def __repr__(self) -> str:
        return f"User({self.name!r}, backup_admin={self.backup_admin})"

    def to_json(self) -> dict[str, Any]:
        return {"salt": _b64(self.salt), "iterations": self.iterations,
                "stored_key": _b64(self.stored_key), "server_key": _b64(self.server_key),
                "backup_admin": self.backup_admin}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise UsageError(f"'{name[:80]}' is not a valid user name",
                         hint="1 to 64 letters, digits, '_', '.', '@' or '-'")
    return name


def make_user(name: str, password: str, backup_admin: bool = True) -> User:
    if not password:
        raise UsageError("an empty password", hint="give the user a password")
    import scramp

    salt, stored, server, iterations = scramp.ScramMechanism("SCRAM-SHA-256").make_auth_info(
        password, iteration_count=ITERATIONS)
    return User(check_name(name), salt, iterations, stored, server, backup_admin)


class UsersFile:
    """The users of a donor, read from and written to one file."""

    def __init__(self, path: str, users: dict[str, User]) -> None:
        self.path = path
        self.users = users

    @classmethod
    def load(cls, path: str, create: bool = False) -> UsersFile:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if create:
                return cls(path, {})
            raise UsageError(f"the users file '{path}' does not exist",
                             hint=f"create it with `clone-agent user add NAME --users {path}`"
                             ) from None
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"the users file '{path}' is not a regular file")
        if st.st_mode & 0o077:
            raise UsageError(f"the users file '{path}' may be read by others",
                             hint=f"chmod 600 {path}")
        try:
            with open(path, "rb") as fh:
                data = orjson.loads(fh.read())
            users = {check_name(name): User(
                name, base64.b64decode(u["salt"]), int(u["iterations"]),
                base64.b64decode(u["stored_key"]), base64.b64decode(u["server_key"]),
                bool(u.get("backup_admin", True)))
                for name, u in data["users"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"the users file '{path}' is damaged or not one: "
                             f"{type(exc).__name__}") from None
        return cls(path, users)

    def save(self) -> None:
        data = orjson.dumps({"format": FORMAT, "users": {
            name: user.to_json() for name, user in sorted(self.users.items())}},
            option=orjson.OPT_INDENT_2)
        directory = os.path.dirname(os.path.abspath(self.path))
        tmp = os.path.join(directory, f".{os.path.basename(self.path)}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, data + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise LocalIOError(f"writing the users file '{self.path}': {exc.strerror}") \
                from None


# -- the exchange ---------------------------------------------------------------------------
MECH_PLAIN = "SCRAM-SHA-256"
MECH_BOUND = "SCRAM-SHA-256-PLUS"
BINDING = "tls-unique"  #: the name SCRAM carries; the data is our handshake transcript


class ServerSide:
    """The donor's half of one SCRAM exchange. ``binding``: the stream's transcript
    (encrypted), or None (plain: no channel binding)."""

    def __init__(self, users: UsersFile, secret: bytes, binding: bytes | None) -> None:
        self.users = users
        self.secret = secret
        self.name = ""
        import scramp

        mech = scramp.ScramMechanism(MECH_BOUND if binding else MECH_PLAIN)
        self._server = mech.make_server(
            self._auth_info, channel_binding=(BINDING, binding) if binding else None)

    def _auth_info(self, name: str) -> tuple[bytes, bytes, bytes, int]:
        self.name = name
        user = self.users.users.get(name)
        if user is not None:
            return user.salt, user.stored_key, user.server_key, user.iterations
        # Unknown: a verifier no password matches, with a salt of its own that is the
        # same at every try, so the answer looks like a known user's.
        fake = hmac.new(self.secret, name.encode(), hashlib.sha256).digest()
        return fake[:16], fake, fake, ITERATIONS

    def first(self, client_first: str) -> str:
        self._server.set_client_first(client_first)
        return str(self._server.get_server_first())

    def final(self, client_final: str) -> tuple[bool, str]:
        """(proved, server-final); never raises for a wrong proof."""
        import scramp

        try:
            self._server.set_client_final(client_final)
        except scramp.ScramException:
            return False, ""
        return True, str(self._server.get_server_final())

    def user(self) -> User | None:
        return self.users.users.get(self.name)


class ClientSide:
    """The recipient's half; ``password`` stays in this process."""

    def __init__(self, name: str, password: str, binding: bytes | None) -> None:
        import scramp

        self._client = scramp.ScramClient(
            [MECH_BOUND if binding else MECH_PLAIN], name, password,
            channel_binding=(BINDING, binding) if binding else None)

    def __repr__(self) -> str:
        return "ClientSide()"

    def first(self) -> str:
        return str(self._client.get_client_first())

    def final(self, server_first: str) -> str:
        self._client.set_server_first(server_first)
        return str(self._client.get_client_final())

    def check(self, server_final: str) -> None:
        """The donor proved it knows the verifier too (mutual authentication)."""
        self._client.set_server_final(server_final)
