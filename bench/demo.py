"""``clone-agent demo``: the main job on an embedded default, for a newcomer.

Makes a page-store data directory (a few hundred MiB) in a temporary folder, starts a
real donor (``clone-agent serve --workload``, its own process) writing bank transfers
as fast as it can, pulls it over loopback while it writes, verifies the clone (every
page, the bank invariant, K against gtid_executed), prints the stage table, the
throughput, K and the donor's transactions per second before and during the clone,
and removes everything it made.
"""

from __future__ import annotations

import secrets
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.datasets import tree_bytes
from clone_agent.progress import Reporter, human
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
        # Without a users file (named in ``extra``), anyone on this machine may clone:
        # the benchmarks serve loopback only.
        auth = [] if "--users" in extra else ["--allow-anonymous"]
        self.cmd = [sys.executable, "-m", "clone_agent.cli", "serve", str(datadir),
                    "--bind", f"127.0.0.1:{self.port}", *auth, *extra]
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


class TpsMonitor(threading.Thread):
    """Reads the donor's ``tps LAST_TXN CLONING`` lines: its TPS before and during the clone."""

    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.samples: list[tuple[float, int, int]] = []

    def run(self) -> None:
        for line in self.stream:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "tps":
                self.samples.append((time.monotonic(), int(parts[1]), int(parts[2])))

    def rate(self, cloning: int) -> float:
        pts = [(t, n) for t, n, c in self.samples if c == cloning]
        if len(pts) < 2:
            return 0.0
        return (pts[-1][1] - pts[0][1]) / max(pts[-1][0] - pts[0][0], 1e-9)

    def wait_samples(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.samples) < n and time.monotonic() < deadline:
            time.sleep(0.1)  # the donor reports 4 times a second; bounded


def run_demo(size: int, rate: int = 0) -> None:
    from engine.auth import UsersFile, make_user
    from engine.crypto import write_keypair
    from engine.pagestore import init_datadir, verify
    from recipient.client import PullOptions, pull

    with tempfile.TemporaryDirectory(prefix="clone-agent-demo-") as tmp:
        src = Path(tmp) / "donor"
        say(f"demo: init a {human(size)} data directory in {src}")
        init_datadir(str(src), size, seed=1)
        total = tree_bytes(src)
        dest = Path(tmp) / "recipient"
        load = f"{rate} TPS" if rate else "full speed"
        # A user who may clone and the donor's key, as an owner would set them up
        # (`clone-agent user add`, `clone-agent keygen`): the clone below is
        # authenticated, encrypted, and pinned to that key.
        password = secrets.token_urlsafe(18)
        users = UsersFile(str(Path(tmp) / "users.json"), {})
        users.users["demo"] = make_user("demo", password)
        users.save()
        key = write_keypair(str(Path(tmp) / "donor"))
        say(f"demo: user 'demo' in {users.path}; donor key {key.fingerprint}")
        with ServeProcess(src, "--workload", str(rate), "--report-tps", "--users", users.path,
                          "--key", str(Path(tmp) / "donor.key")) as donor:
            assert donor.proc is not None
            monitor = TpsMonitor(donor.proc.stdout)
            monitor.start()
            say(f"demo: donor serving on 127.0.0.1:{donor.port} with a live workload "
                f"({load}); measuring its rate before the clone")
            monitor.wait_samples(12, 15)
            say("demo: pulling over loopback while the donor keeps writing")
            reporter = Reporter(json_mode=False)
            started = time.monotonic()
            try:
                summary = pull(PullOptions(
                    user="demo", host="127.0.0.1", port=donor.port, destination=str(dest),
                    config=load_config({"max_concurrency": 4}), state_dir=tmp, emit=reporter,
                    password=password, ssl="require", pinned=key.public))
            finally:
                reporter.close()
            elapsed = time.monotonic() - started
        tps_before, tps_during = monitor.rate(0), monitor.rate(1)
        say("demo: verifying the clone (every page checksum, the bank invariant)")
        report = verify(str(dest))
        status = summary["clone_status"]
        if not report["ok"]:
            raise VerifyFailed("; ".join(report["problems"][:3]) or
                               f"{report['bad_pages']} bad pages")
        k = report["max_txn"]
        if not status["gtid_executed"].endswith(f":1-{k}"):
            raise VerifyFailed(f"gtid_executed {status['gtid_executed']} but K = {k}")
        print(f"\n{'STAGE':<10} {'STATE':<12} {'ESTIMATE':>12} {'DATA':>12} {'NETWORK':>12} "
              f"{'SPEED':>12}")
        for row in summary["clone_progress"]:
            print(f"{row['stage']:<10} {row['state']:<12} {human(row['estimate']):>12} "
                  f"{human(row['data']):>12} {human(row['network']):>12} "
                  f"{human(row['data_speed']) + '/s':>12}")
        print(f"\ncloned {human(total)} in {elapsed:.2f} s ({human(total / elapsed)}/s over "
              f"loopback) while the donor kept writing")
        print(f"authenticated as 'demo' (SCRAM-SHA-256-PLUS); encrypted: "
              f"{status['encrypted']}, donor key {status['donor_key']} (pinned)")
        print(f"consistent at transaction K = {k}: gtid_executed {status['gtid_executed']}, "
              f"{status['binlog_file']}:{status['binlog_position']}")
        print(f"bank balanced: {report['accounts']} accounts sum to {report['balance_total']}; "
              f"{report['pages']} pages, {report['bad_pages']} bad")
        print(f"donor transactions per second: {tps_before:,.0f} before the clone, "
              f"{tps_during:,.0f} during it")
        cp = summary.get("consistent_point", {})
        if "blocked_s" in cp:
            print(f"the consistent point held the donor's writes for "
                  f"{cp['blocked_s'] * 1000:.2f} ms; PAGE COPY sent "
                  f"{human(_stage(summary, 'PAGE COPY'))}, REDO COPY "
                  f"{human(_stage(summary, 'REDO COPY'))} of redo")


def _stage(summary: dict[str, Any], name: str) -> int:
    return next((int(r["data"]) for r in summary["clone_progress"] if r["stage"] == name), 0)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
