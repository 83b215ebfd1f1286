"""``clone-agent demo``: the main job on an embedded default, for a newcomer.

Makes a sample tree in a temporary folder, starts a real donor (``clone-agent serve``
in its own process), pulls over loopback, verifies every file (content hash, size,
mode, mtime, links, empty directories), prints the stage table and the throughput,
and removes everything it made.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.datasets import mixed, tree_bytes
from clone_agent.progress import Reporter, human
from engine.codec import checksum
from engine.config import load_config
from engine.errors import StageCrashed, VerifyFailed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """``clone-agent serve`` as a child process; ready when it prints its line."""

    def __init__(self, datadir: Path, *extra: str, timeout: float = 60.0) -> None:
        self.port = free_port()
        self.cmd = [sys.executable, "-m", "clone_agent.cli", "serve", str(datadir),
                    "--bind", f"127.0.0.1:{self.port}", *extra]
        self.timeout = timeout
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> ServeProcess:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(self.timeout):
                self.__exit__()
                raise StageCrashed("donor", f"not ready within {self.timeout:g} s")
        line = self.proc.stdout.readline().strip()
        if not line.startswith("ready "):
            self.__exit__()
            raise StageCrashed("donor", f"said {line!r} instead of ready")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def fingerprint(root: Path) -> dict[str, Any]:
    """Everything a faithful copy keeps, per relative path (``#clone/`` excluded)."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, files in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d != "#clone"]
        for name in dirnames + files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    digest = checksum(f.read())
                out[rel] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = (st.st_mode, os.readlink(path))
            else:
                out[rel] = (st.st_mode, st.st_mtime_ns)
    return out


def run_demo(size: int) -> None:
    from recipient.client import PullOptions, pull

    with tempfile.TemporaryDirectory(prefix="clone-agent-demo-") as tmp:
        src = Path(tmp) / "donor"
        print(f"demo: making a {human(size)} sample tree in {src}", file=sys.stderr)
        mixed(src, size)
        (src / "empty").mkdir()
        os.symlink("big", src / "link-to-big")
        total = tree_bytes(src)
        dest = Path(tmp) / "recipient"
        with ServeProcess(src) as donor:
            print(f"demo: donor serving on 127.0.0.1:{donor.port}; pulling", file=sys.stderr)
            reporter = Reporter(json_mode=False)
            started = time.monotonic()
            try:
                summary = pull(PullOptions(
                    user="demo", host="127.0.0.1", port=donor.port, destination=str(dest),
                    config=load_config({"max_concurrency": 4}), state_dir=tmp, emit=reporter))
            finally:
                reporter.close()
            elapsed = time.monotonic() - started
        print("demo: verifying every file", file=sys.stderr)
        a, b = fingerprint(src), fingerprint(dest)
        if a != b:
            bad = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise VerifyFailed(f"{len(bad)} entries differ, e.g. {bad[:3]}")
        print(f"\n{'STAGE':<10} {'STATE':<12} {'DATA':>12} {'NETWORK':>12} {'SPEED':>14}")
        for row in summary["clone_progress"]:
            print(f"{row['stage']:<10} {row['state']:<12} {human(row['data']):>12} "
                  f"{human(row['network']):>12} {human(row['data_speed']) + '/s':>14}")
        files = sum(1 for v in a.values() if len(v) == 4)
        print(f"\ncloned {files} files, {human(total)} in {elapsed:.2f} s "
              f"({human(total / elapsed)}/s over loopback); every file verified")
