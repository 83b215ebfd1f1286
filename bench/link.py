"""``clone-agent bench --link``: a real, rate-limited link between two network namespaces.

Two namespaces made here (``ca-d-<pid>``, ``ca-r-<pid>``), joined by a veth pair whose
both ends are shaped with ``tc qdisc ... tbf`` (200 Mbit/s by default); the donor runs
in one, the recipient in the other, so every byte crosses the shaped link. It compares
clone-agent without compression, with lz4 and with zstd, and ``tar | socat | tar``, on a
compressible tree, interleaved; then a clone throttled with
clone_max_network_bandwidth. Needs root and iproute2; otherwise it says so and skips.
Everything it creates (namespaces, links, processes) is removed, on error too.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import datasets

MiB = 1 << 20


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Link:
    def __init__(self, rate: str = "200mbit") -> None:
        tag = os.getpid() % 100000
        self.d, self.r = f"ca-d-{tag}", f"ca-r-{tag}"
        self.rate = rate
        self.addr_d, self.addr_r = "10.231.77.1", "10.231.77.2"

    def __enter__(self) -> Link:
        try:
            _ip("netns", "add", self.d)
            _ip("netns", "add", self.r)
            _ip("link", "add", "vca-d", "type", "veth", "peer", "name", "vca-r")
            _ip("link", "set", "vca-d", "netns", self.d)
            _ip("link", "set", "vca-r", "netns", self.r)
            for ns, dev, addr in ((self.d, "vca-d", self.addr_d), (self.r, "vca-r", self.addr_r)):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf",
                                "rate", self.rate, "burst", "256kb", "latency", "50ms"],
                               check=True, capture_output=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.d, self.r):
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def run(self, ns: str, cmd: list[str], **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], text=True, **kw)


def available() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "needs iproute2 (ip, tc)"
    return None


def run_link_bench(rounds: int = 3, size: int = 128 * MiB) -> dict[str, Any]:
    why = available()
    if why:
        print(f"link benchmark skipped: {why}", file=sys.stderr)
        return {"skipped": why}
    py = [sys.executable, "-m", "clone_agent.cli"]
    results: dict[str, list[float]] = {}
    net: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="clone-agent-link-") as tmp, Link() as link:
        src = Path(tmp) / "src"
        datasets.big_compressible(src, size // 2)
        datasets.mixed(src / "mixed", size // 2)
        total = datasets.tree_bytes(src)
        port = 13310
        donor = link.run(link.d, [*py, "serve", str(src), "--bind", f"{link.addr_d}:{port}",
                                   "--allow-anonymous"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert donor.stdout is not None
            line = donor.stdout.readline()
            if not line.startswith("ready"):
                raise RuntimeError(f"donor did not start in the namespace: {line!r}")
            variants = {"clone-agent": ["--require-no-ssl"],
                        "clone-agent encrypted": ["--require-ssl"],
                        "clone-agent lz4": ["--require-no-ssl", "--enable-compression"],
                        "clone-agent zstd": ["--require-no-ssl", "--enable-compression"]}
            for r in range(rounds):
                for name, extra in variants.items():
                    dest = Path(tmp) / "dest"
                    env = {**os.environ, "CLONE_AGENT_COMPRESSION_ALGORITHM":
                           "zstd" if "zstd" in name else "lz4"}
                    started = time.monotonic()
                    p = link.run(link.r, [*py, "pull", f"b@{link.addr_d}:{port}", "--data-dir",
                                          str(dest), "--json", *extra],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
                    out, err = p.communicate(timeout=900)
                    wall = time.monotonic() - started
                    if p.returncode != 0:
                        raise RuntimeError(f"{name} failed: {err[-300:]}")
                    import orjson
                    row = orjson.loads(out.splitlines()[-1])["clone_progress"][1]
                    net[name] = row["network"]
                    results.setdefault(name, []).append(wall)
                    shutil.rmtree(dest)
                    print(f"link round {r + 1}/{rounds} {name:<18} {wall:6.2f} s", file=sys.stderr)
                dest = Path(tmp) / "dest"
                dest.mkdir()
                started = time.monotonic()
                recv = link.run(link.r, ["sh", "-c", f"socat -u TCP-LISTEN:{port + 1},reuseaddr "
                                         f"- | tar -xf - -C {dest}"])
                time.sleep(0.3)  # let the listener bind (baseline plumbing, not our tool)
                send = link.run(link.d, ["sh", "-c", f"tar -cf - -C {src} . | socat -u - "
                                         f"TCP:{link.addr_r}:{port + 1}"])
                send.wait(900)
                recv.wait(900)
                results.setdefault("tar|socat|tar", []).append(time.monotonic() - started)
                shutil.rmtree(dest)
            # throttle on the link: 10 MiB/s of network bandwidth
            dest = Path(tmp) / "dest"
            p = link.run(link.r, [*py, "pull", f"b@{link.addr_d}:{port}", "--data-dir", str(dest),
                                  "--json", "--max-network-bandwidth", "10"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, _ = p.communicate(timeout=900)
            import orjson
            row = orjson.loads(out.splitlines()[-1])["clone_progress"][1]
            throttled = row["network_speed"] / MiB
        finally:
            donor.terminate()
            donor.wait(30)
    med = {k: statistics.median(v) for k, v in results.items()}
    report = {"link": link.rate, "bytes": total, "median_s": med,
              "network_bytes": net, "throttled_network_mib_s": throttled,
              "ratio_to_uncompressed": {k: v / med["clone-agent"] for k, v in med.items()}}
    print(f"\nlink {link.rate}, {total / MiB:.0f} MiB compressible tree, medians of {rounds}:",
          file=sys.stdout)
    for k, v in med.items():
        print(f"  {k:<18} {v:6.2f} s  {total / MiB / v:6.1f} MiB/s  "
              f"time vs uncompressed clone-agent {v / med['clone-agent']:.2f}"
              + (f"  network {net[k] / MiB:.0f} MiB" if k in net else ""))
    print(f"  --max-network-bandwidth 10: network_speed {throttled:.1f} MiB/s")
    return report
