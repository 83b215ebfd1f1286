"""ZeroMQ sockets and their options; third-party errors are translated here, at the edge.

The donor binds one ROUTER socket; each recipient stream is a DEALER that connects to
it (one TCP connection per stream, as MySQL opens one connection per clone task).
High-water marks are small and explicit: flow control is by credit (the recipient
grants a bounded number of blocks in flight per stream), and the HWM only has to be
larger than the credit, never ZeroMQ's default of 1000 one-MiB messages.

ZeroMQ never fails a connect by itself, so :func:`probe` makes a plain TCP connection
first with a deadline, and the handshake has its own deadline on top.
"""

from __future__ import annotations

import errno as errno_mod
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import zmq

from engine.errors import DonorUnreachable, NetworkError, UsageError
from engine.protocol import MAX_FRAME

SOCKET_HWM = 1100  #: above protocol.MAX_CREDIT, so a credited send never meets the HWM
SOCKET_BUFFER = 4 << 20
HEARTBEAT_IVL_MS = 2000
HEARTBEAT_TIMEOUT_MS = 10000


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"'{text}' is not HOST:PORT", hint="for example 127.0.0.1:3310")
    return host, int(port)


def tcp_url(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def _tune(sock: zmq.Socket[Any]) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, SOCKET_HWM)
    sock.setsockopt(zmq.RCVHWM, SOCKET_HWM)
    sock.setsockopt(zmq.SNDBUF, SOCKET_BUFFER)
    sock.setsockopt(zmq.RCVBUF, SOCKET_BUFFER)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
    sock.setsockopt(zmq.IPV6, 1)
    # A frame larger than any message may be is refused by libzmq as it arrives, and its
    # connection dropped: it is never buffered whole before our checks see it.
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)


def router(ctx: zmq.Context[Any], host: str, port: int,
           url: str | None = None) -> tuple[zmq.Socket[Any], int]:
    """The donor's listening socket; returns it and the port it got (``port`` 0: any).

    ``url`` (an ``ipc://`` endpoint) replaces host and port for a local clone.
    """
    sock = ctx.socket(zmq.ROUTER)
    _tune(sock)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # A connection whose peer answers nothing for HEARTBEAT_TIMEOUT is closed: what was
    # queued on it is dropped, and the slots of blocks in flight come back, while the
    # clone waits for its recipient's REINIT on a new connection.
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    try:
        if url is not None:
            sock.bind(url)
        elif port == 0:
            port = sock.bind_to_random_port(tcp_url(host, 0).rsplit(":", 1)[0])
        else:
            sock.bind(tcp_url(host, port))
    except zmq.ZMQError as exc:
        sock.close(0)
        raise UsageError(
            f"cannot listen on {host}:{port}: {exc.strerror}",
            hint="choose a free port and an address of this host",
        ) from exc
    return sock, port


def dealer(ctx: zmq.Context[Any], url: str) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    _tune(sock)
    # Never reconnect by itself: a new connection would reach the donor as a stranger
    # (a new peer, without its handshake), and the messages queued on it would be
    # refused. A broken stream stays broken; the recipient restarts the clone instead.
    sock.setsockopt(zmq.RECONNECT_IVL, -1)
    sock.connect(url)
    return sock


def probe(host: str, port: int, timeout: float) -> None:
    """Fail fast, in MySQL's words, when nothing listens at the donor's address."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except TimeoutError:
        raise DonorUnreachable(
            f"Connect failed: 2003 : Can't connect to donor on '{host}:{port}' (timed out "
            f"after {timeout:g} s)",
            hint="check that `clone-agent serve` runs there and the network lets you in",
        ) from None
    except OSError as exc:
        code = exc.errno or errno_mod.ECONNREFUSED
        raise DonorUnreachable(
            f"Connect failed: 2003 : Can't connect to donor on '{host}:{port}' ({code})",
            hint="check that `clone-agent serve` runs there and the network lets you in",
        ) from None


@contextmanager
def mapped_errors(what: str) -> Iterator[None]:
    """Translate ZeroMQ errors met while talking to a peer into NetworkError."""
    try:
        yield
    except zmq.ZMQError as exc:
        raise NetworkError(f"{what}: {exc.strerror}") from exc


def tune_allocator() -> None:
    """Keep 1 MiB message buffers in the heap instead of one mmap each.

    ZeroMQ allocates every received message; at 1 MiB and more, glibc serves each with
    a fresh mmap that is faulted in page by page and unmapped again, so every block pays
    for page faults and zeroing. Raising the mmap and trim thresholds lets freed blocks
    be reused from the heap instead (docs/bench.md has the gain). Linux/glibc only;
    elsewhere a no-op. Called once by each coordinator before its sockets exist.
    """
    from engine.fsutil import libc

    try:
        mallopt = libc().mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_mmap_threshold, 8 << 20)
    mallopt(m_trim_threshold, 64 << 20)
    mallopt(m_top_pad, 16 << 20)
