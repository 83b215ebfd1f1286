"""``serve`` under systemd: READY=1 and STOPPING=1 reach a NOTIFY_SOCKET (a unix
datagram socket this test binds, as systemd does), and log lines carry level and time."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from clone_agent.systemd import Notifier, ServiceFormatter
from tests.helpers import CLI, ROOT, free_port


def _datagrams(sock: socket.socket, until: str, timeout: float = 30) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while not any(until in g for g in got):
        left = deadline - time.monotonic()
        assert left > 0, got
        sock.settimeout(left)
        got.append(sock.recv(4096).decode())
    return got


def test_serve_notifies_ready_and_stopping(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 1000)
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        port = free_port()
        proc = subprocess.Popen([*CLI, "serve", str(src), "--bind", f"127.0.0.1:{port}",
                                 "--allow-anonymous"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**os.environ, "NOTIFY_SOCKET": path})
        try:
            ready = _datagrams(sock, "READY=1")
            assert proc.stdout is not None
            assert proc.stdout.readline() == f"ready 127.0.0.1:{port}\n"
            proc.send_signal(signal.SIGTERM)
            stopping = _datagrams(sock, "STOPPING=1")
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    lines = ready[-1].splitlines()
    assert "READY=1" in lines and f"MAINPID={proc.pid}" in lines
    assert f"STATUS=serving {src} on 127.0.0.1:{port}" in lines
    assert "STOPPING=1" in stopping[-1].splitlines()
    # level and time on each log line (not under journald here)
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO    clone-agent: donor "
                     r"stopped$", err, re.M), err


def test_an_abstract_socket_and_no_socket() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        name = f"clone-agent-test-{os.getpid()}"
        sock.bind("\0" + name)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.notify("READY=1")
        notifier.close()
        sock.settimeout(5)
        assert sock.recv(100) == b"READY=1"
    quiet = Notifier({})
    quiet.notify("READY=1")  # not under systemd: nothing, and no error
    assert quiet.sock is None


def test_journald_gets_priorities() -> None:
    record = logging.LogRecord("clone_agent", logging.WARNING, __file__, 1, "careful", None,
                               None)
    assert ServiceFormatter(journal=True).format(record) == "<4>clone-agent: careful"
    plain = ServiceFormatter(journal=False).format(record)
    assert plain.endswith("Z WARNING clone-agent: careful")
