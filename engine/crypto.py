"""Keys, the handshake and the ciphers of an encrypted clone (docs/security.md).

Only standard constructions, from the `cryptography` library: X25519, HKDF-SHA256,
HMAC-SHA256 and AES-256-GCM. The handshake is Noise's NK pattern in spirit, done with
those primitives: every stream (one ZeroMQ connection) runs it before anything else.

- The donor has a static key pair S (``keygen``, or made at ``serve`` start).
- The recipient sends a fresh ephemeral public key e_r (HELLO); the donor answers with
  its own ephemeral e_d, its static S_pub, and a confirmation.
- h = SHA-256(label || e_r || e_d || S_pub) is the transcript; the shared secret is
  HKDF(DH(e_r, e_d) || DH(e_r, S), salt=h). Only the holder of S's private key can
  compute DH(e_r, S), so the confirmation HMAC(k_confirm, h) proves the donor is the
  owner of S_pub, and a recipient that pinned S_pub (``--ssl-ca``) knows that nobody
  else is at the other end. Fresh ephemerals on both sides give every stream its own
  keys (forward secrecy: a stolen donor key does not open old captures).
- Control messages: AES-256-GCM under a key a direction, the nonce a counter that
  each side keeps (never sent, never reused), the frame header as associated data: a
  replayed, dropped, reordered or altered message does not open.
- Blocks: AES-256-GCM under the clone's data key (from stream 0's handshake), sealed
  by the donor's compressor workers and opened by the recipient's writers, with a
  random 96-bit nonce each (a clone is far below the 2^32 messages that random GCM
  nonces allow under one key) and the block's descriptor as associated data, so that
  where a block goes (file, offset, segments, state, number) is authenticated with it.
- SCRAM's channel binding is h: a relay that runs its own handshake with each side
  cannot reuse the recipient's proof (engine/auth.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.errors import LocalIOError, ProtocolError, SslError, UsageError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

# `cryptography` is imported where a key, a handshake or a cipher is made, not with
# this module: a plain clone (clone-local's above all) never needs it, and its import
# is about 35 ms of every command's start.

LABEL = b"clone-agent handshake v1"
KEY_HEADER = "clone-agent private key v1"
PUB_HEADER = "clone-agent public key v1"
NONCE = 12  #: bytes of a GCM nonce
TAG = 16  #: bytes of a GCM tag
SEAL_OVERHEAD = NONCE + TAG  #: what sealing adds to a block


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(str(text), validate=True)
    except ValueError:
        raise ProtocolError(f"{what} is not base64") from None
    if len(raw) != size:
        raise ProtocolError(f"{what} of {len(raw)} bytes, not {size}")
    return raw


def fingerprint(public: bytes) -> str:
    """ssh's form: ``SHA256:`` and the unpadded base64 of the key's SHA-256."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(public).digest()).decode().rstrip("=")


# -- key files ------------------------------------------------------------------------
@dataclass(frozen=True)
class StaticKey:
    """The donor's long-term key pair."""

    private: X25519PrivateKey
    public: bytes

    @classmethod
    def generate(cls) -> StaticKey:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        key = X25519PrivateKey.generate()
        return cls(key, _raw_public(key))

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)

    def __repr__(self) -> str:  # never the private half
        return f"StaticKey({self.fingerprint})"


def _raw_public(key: X25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def write_keypair(prefix: str) -> StaticKey:
    """``PREFIX.key`` (0600) and ``PREFIX.pub``; refuses to overwrite either."""
    from cryptography.hazmat.primitives import serialization

    key = StaticKey.generate()
    private = key.private.private_bytes(serialization.Encoding.Raw,
                                        serialization.PrivateFormat.Raw,
                                        serialization.NoEncryption())
    made: list[str] = []
    try:
        for path, text, mode in ((f"{prefix}.key", f"{KEY_HEADER}\n{b64(private)}\n", 0o600),
                                 (f"{prefix}.pub", f"{PUB_HEADER}\n{b64(key.public)}\n",
                                  0o644)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            made.append(path)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
    except FileExistsError as exc:
        for path in made:
            os.unlink(path)
        raise LocalIOError(f"'{exc.filename}' exists", hint="keygen never overwrites a key: "
                           "choose another --out, or remove the old pair first") from None
    except OSError as exc:
        for path in made:
            os.unlink(path)
        raise LocalIOError(f"writing the key pair: {exc.strerror}") from None
    return key


def _read_key_file(path: str, header: str) -> bytes:
    try:
        with open(path, encoding="ascii") as fh:
            lines = fh.read().split()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the key file '{path}': "
                         f"{getattr(exc, 'strerror', None) or exc}") from None
    if len(lines) < 2 or " ".join(lines[:-1]) != header:
        raise UsageError(f"'{path}' is not a {header.rsplit(' ', 1)[0]} file",
                         hint="make a key pair with `clone-agent keygen --out PREFIX`")
    try:
        raw = base64.b64decode(lines[-1], validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise UsageError(f"'{path}' holds a damaged key")
    return raw


def load_private(path: str) -> StaticKey:
    if os.stat(path).st_mode & 0o077:
        raise UsageError(f"the key file '{path}' may be read by others",
                         hint=f"chmod 600 {path}")
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    key = X25519PrivateKey.from_private_bytes(_read_key_file(path, KEY_HEADER))
    return StaticKey(key, _raw_public(key))


def load_public(path: str) -> bytes:
    return _read_key_file(path, PUB_HEADER)


# -- the handshake ----------------------------------------------------------------------
@dataclass(frozen=True)
class Keys:
    """What a handshake gives one stream: a key a direction, the transcript (SCRAM's
    channel binding) and the clone's data key (used from stream 0's)."""

    r2d: bytes
    d2r: bytes
    binding: bytes
    data: bytes
    donor_key: bytes  #: the donor's static public key

    def __repr__(self) -> str:
        return f"Keys(donor {fingerprint(self.donor_key)})"


def _derive(e_r: bytes, e_d: bytes, s_pub: bytes, ikm: bytes) -> tuple[Keys, bytes]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    h = hashlib.sha256(LABEL + e_r + e_d + s_pub).digest()
    okm = HKDF(algorithm=hashes.SHA256(), length=128, salt=h,
               info=b"clone-agent keys").derive(ikm)
    keys = Keys(okm[0:32], okm[32:64], h, okm[96:128], s_pub)
    confirm = hmac.new(okm[64:96], h, hashlib.sha256).digest()
    return keys, confirm


class Initiator:
    """The recipient's side of one stream's handshake."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        self._e = X25519PrivateKey.generate()
        self.hello = _raw_public(self._e)

    def finish(self, e_d: object, s_pub: object, confirm: object,
               pinned: bytes | None) -> Keys:
        """Check the donor's answer; ``pinned``: the donor key the user trusts."""
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

        e_d_raw = _unb64(e_d, 32, "the donor's ephemeral key")
        s_raw = _unb64(s_pub, 32, "the donor's key")
        if pinned is not None and not hmac.compare_digest(s_raw, pinned):
            raise SslError(f"the donor's key {fingerprint(s_raw)} is not the pinned key "
                           f"{fingerprint(pinned)}",
                           hint="someone may be in the middle; if the donor's key changed, "
                                "get its new .pub file from its owner")
        ikm = self._e.exchange(X25519PublicKey.from_public_bytes(e_d_raw)) + \
            self._e.exchange(X25519PublicKey.from_public_bytes(s_raw))
        keys, expected = _derive(self.hello, e_d_raw, s_raw, ikm)
        if not hmac.compare_digest(expected, _unb64(confirm, 32, "the confirmation")):
            raise SslError("the donor could not prove that it holds its key",
                           hint="someone may be in the middle of the connection")
        return keys


def respond(static: StaticKey, e_r: object) -> tuple[bytes, bytes, Keys]:
    """The donor's side: (its ephemeral public key, the confirmation, the keys)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )

    e_r_raw = _unb64(e_r, 32, "the recipient's ephemeral key")
    e = X25519PrivateKey.generate()
    e_pub = _raw_public(e)
    peer = X25519PublicKey.from_public_bytes(e_r_raw)
    ikm = e.exchange(peer) + static.private.exchange(peer)
    keys, confirm = _derive(e_r_raw, e_pub, static.public, ikm)
    return e_pub, confirm, keys


# -- the control channel ------------------------------------------------------------------
class ControlCipher:
    """AES-256-GCM of one stream's message bodies, a counter nonce a direction.

    Runs in a coordinator (the recipient's Transfer, the donor's server). ``seal`` and
    ``open`` must see the messages in the order they were sent: ZeroMQ keeps the order
    of one connection, so any gap or replay is an attack or a corruption."""

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._send = AESGCM(send_key)
        self._recv = AESGCM(recv_key)
        self._sent = 0
        self._received = 0

    def seal(self, header: bytes, body: bytes) -> bytes:
        nonce = struct.pack(">4xQ", self._sent)
        self._sent += 1
        return self._send.encrypt(nonce, body, header)

    def open(self, header: bytes, body: bytes) -> bytes:
        nonce = struct.pack(">4xQ", self._received)
        try:
            plain = self._recv.decrypt(nonce, bytes(body), header)
        except Exception:  # InvalidTag: altered, replayed, reordered or another key's
            raise ProtocolError("a message that does not decrypt (altered, replayed or "
                                "out of order)") from None
        self._received += 1
        return plain


# -- blocks ----------------------------------------------------------------------------
def block_aad(clone_id: int, state: int, seq: int, raw: int, span: int, comp: int,
              segs: list[list[int]]) -> bytes:
    """What a sealed block's tag covers besides its bytes: where it goes."""
    head = struct.pack("<QBQIIB", clone_id, state, seq, raw, span, comp)
    return head + b"".join(struct.pack("<IQI", *seg) for seg in segs)


class BlockSealer:
    """Seals blocks in a worker process: ``nonce || ciphertext || tag`` into a slot."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        self._alg = algorithms.AES(key)
        self._cipher = Cipher
        self._gcm = modes.GCM

    def seal_into(self, data: memoryview | bytes, out: memoryview, aad: bytes) -> int:
        """Encrypt ``data`` into ``out`` (at least ``len(data) + SEAL_OVERHEAD``);
        returns the bytes written."""
        nonce = os.urandom(NONCE)
        enc = self._cipher(self._alg, self._gcm(nonce)).encryptor()
        enc.authenticate_additional_data(aad)
        out[:NONCE] = nonce
        n = enc.update_into(data, out[NONCE:])
        enc.finalize()
        out[NONCE + n : NONCE + n + TAG] = enc.tag
        return NONCE + n + TAG

    def open_into(self, sealed: memoryview, out: memoryview, aad: bytes) -> int:
        """Decrypt and check a sealed block into ``out``; returns the plain length.
        Nothing of ``out`` may be used when this raises (ProtocolError, 3863)."""
        if len(sealed) < SEAL_OVERHEAD:
            raise ProtocolError("a sealed block shorter than its nonce and tag")
        nonce = bytes(sealed[:NONCE])
        tag = bytes(sealed[-TAG:])
        dec = self._cipher(self._alg, self._gcm(nonce, tag)).decryptor()
        dec.authenticate_additional_data(aad)
        n = dec.update_into(sealed[NONCE:-TAG], out)
        try:
            dec.finalize()
        except Exception:  # InvalidTag
            raise ProtocolError("a block that does not decrypt (altered, or sent for "
                                "another place)") from None
        return n
