"""systemd's notify protocol for ``serve`` (Type=notify), and log lines for a service.

The protocol (sd_notify(3)) is one datagram of ``KEY=VALUE`` lines to the unix socket
named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace): it
needs no library. Without ``$NOTIFY_SOCKET`` (not under systemd) every call does
nothing. A notification that cannot be sent is logged once and otherwise ignored: the
donor serves as well without it, and systemd's start timeout reports the rest.
Runs in the command-line process only (the environment is read here, not in engine/).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time

log = logging.getLogger("clone_agent")


class Notifier:
    """Sends READY=1, STATUS=..., STOPPING=1. ``close()`` closes its socket."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.sock: socket.socket | None = None
        self._warned = False
        self._stopping = False
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def notify(self, *lines: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", self.address.lstrip("\0"),
                            exc.strerror or exc)

    def stopping(self) -> None:
        """STOPPING=1, once."""
        if not self._stopping:
            self._stopping = True
            self.notify("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class ServiceFormatter(logging.Formatter):
    """A service's log line: under journald (``$JOURNAL_STREAM``), the syslog priority
    prefix ``<N>`` that journald turns into the entry's level (it adds the time
    itself); elsewhere the UTC time and the level in words."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                logging.CRITICAL: 2}

    def __init__(self, journal: bool) -> None:
        super().__init__("clone-agent: %(message)s")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.journal:
            return f"<{self.PRIORITY.get(record.levelno, 6)}>{text}"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z {record.levelname:<7} {text}"


def service_logging(verbose: bool) -> None:
    """Logging for ``serve``: level and time on every line (see ServiceFormatter)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ServiceFormatter(journal=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
