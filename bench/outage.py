"""``python -m bench.outage``: what a 20 s network outage costs a clone (issue 15).

Two network namespaces made here (``cao-d-<pid>``, ``cao-r-<pid>``) joined by a veth pair
whose ends are shaped with ``tc qdisc ... tbf`` (200 Mbit/s by default). A page store
(``clone-agent init --size 256MiB``) is served by ``clone-agent serve`` in one; ``clone-agent
pull --json`` clones it from the other, interleaved: once without an outage, once with
the link down for 20 s in the middle of FILE COPY (``ip link set ... down``, on the
recipient's end: nothing crosses either way), N rounds. It prints the medians of the
clone times, of the outage, of the overhead (time with the outage - (time without +
the outage)) and of the blocks sent again (``resent`` of the ``restart`` events), and
whether the overhead meets the target (at most 3 s).

Only public tools: iproute2 (``ip``, ``tc``) and the project's command line. Needs root;
otherwise it says so and exits 0. Everything it creates (namespaces, processes, files)
is removed, on error too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "clone_agent.cli"]
ROOT = Path(__file__).resolve().parent.parent
TARGET_OVERHEAD_S = 3.0


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)


def _check(*cmd: str) -> None:
    res = _run(*cmd)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2)"
    return None


class Link:
    """Two namespaces over a shaped veth pair; removed on exit."""

    def __init__(self, rate: str) -> None:
        pid = os.getpid()
        self.d, self.r = f"cao-d-{pid}", f"cao-r-{pid}"
        self.dev_d, self.dev_r = "vcaod", "vcaor"
        self.addr_d, self.addr_r = "10.199.250.1", "10.199.250.2"
        self.rate = rate
        self.made: list[str] = []

    def __enter__(self) -> Link:
        try:
            for ns in (self.d, self.r):
                _check("ip", "netns", "add", ns)
                self.made.append(ns)
            _check("ip", "-n", self.d, "link", "add", self.dev_d, "type", "veth", "peer",
                   "name", self.dev_r, "netns", self.r)
            for ns, dev, addr in ((self.d, self.dev_d, self.addr_d),
                                  (self.r, self.dev_r, self.addr_r)):
                _check("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _check("ip", "-n", ns, "link", "set", "lo", "up")
                _check("ip", "-n", ns, "link", "set", dev, "up")
                _check("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                       self.rate, "burst", "256kb", "latency", "50ms")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in self.made:
            for pid in _run("ip", "netns", "pids", ns).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ValueError, ProcessLookupError):
                    pass
        for ns in reversed(self.made):
            _run("ip", "netns", "del", ns)
        self.made.clear()

    def popen(self, ns: str, cmd: list[str], **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], text=True, cwd=ROOT,
                                start_new_session=True, **kw)

    def down(self) -> None:
        _check("ip", "-n", self.r, "link", "set", self.dev_r, "down")

    def up(self) -> None:
        _check("ip", "-n", self.r, "link", "set", self.dev_r, "up")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def serve(link: Link, datadir: Path, port: int, workload: int | None
          ) -> subprocess.Popen[str]:
    extra = ["--workload", str(workload)] if workload is not None else []
    donor = link.popen(link.d, [*CLI, "serve", str(datadir), "--bind",
                                f"{link.addr_d}:{port}", "--allow-anonymous", *extra],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    stdout = donor.stdout
    assert stdout is not None
    found: list[str] = []
    reader = threading.Thread(target=lambda: found.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(60)
    if not found or not found[0].startswith("ready"):
        _stop(donor)
        raise RuntimeError(f"the donor did not start: {found!r}")
    # drain the rest of its stdout, so that it never blocks on a full pipe
    threading.Thread(target=lambda: [None for _ in stdout], daemon=True).start()
    return donor


def one_clone(link: Link, port: int, dest: Path, outage_s: float,
              at_bytes: int) -> dict[str, Any]:
    """One pull; with ``outage_s``, the link down that long once FILE COPY has written
    ``at_bytes``. Returns its time, the outage as made, and the restart events."""
    events: list[dict[str, Any]] = []
    went_down = threading.Event()
    done = {"outage": 0.0}
    started = time.monotonic()
    pull = link.popen(link.r, [*CLI, "pull", f"anon@{link.addr_d}:{port}", "--data-dir",
                               str(dest), "--json", "--require-no-ssl"],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, errs = pull.stdout, pull.stderr
    assert out is not None and errs is not None
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(errs), daemon=True).start()

    def outage() -> None:
        began = time.monotonic()
        link.down()
        try:
            time.sleep(outage_s)  # the outage itself
        finally:
            link.up()
        done["outage"] = time.monotonic() - began

    fault: threading.Thread | None = None
    try:
        for line in out:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            events.append(ev)
            if (outage_s and not went_down.is_set() and ev.get("event") == "progress"
                    and ev.get("stage") == "FILE COPY" and ev.get("data", 0) >= at_bytes):
                went_down.set()
                fault = threading.Thread(target=outage, daemon=True)
                fault.start()
        code = pull.wait(900)
    finally:
        if pull.poll() is None:
            os.killpg(pull.pid, signal.SIGKILL)
            pull.wait(10)
        if fault is not None:
            fault.join(outage_s + 30)
    wall = time.monotonic() - started
    if code != 0:
        raise RuntimeError(f"the clone failed ({code}): {''.join(err)[-800:]}")
    if outage_s and not went_down.is_set():
        raise RuntimeError("FILE COPY ended before the outage could be made")
    restarts = [e for e in events if e.get("event") == "restart"]
    return {"time": wall, "outage": done["outage"], "restarts": restarts,
            "resent": sum(int(e.get("resent", 0)) for e in restarts
                          if e.get("phase") == "resumed")}


def run(rounds: int, size: str, rate: str, outage_s: float, workload: int | None,
        out: Path | None) -> dict[str, Any]:
    why = unavailable()
    if why:
        print(f"outage benchmark skipped: {why}", file=sys.stderr)
        return {"skipped": why}
    port = 3310
    plain: list[dict[str, Any]] = []
    broken: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="clone-agent-outage-") as tmp, Link(rate) as link:
        src = Path(tmp) / "src"
        res = subprocess.run([*CLI, "init", str(src), "--size", size], cwd=ROOT,
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"init failed: {res.stderr}")
        total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
        donor = serve(link, src, port, workload)
        try:
            for r in range(rounds):
                for with_outage in (False, True):
                    dest = Path(tmp) / "dest"
                    row = one_clone(link, port, dest, outage_s if with_outage else 0,
                                    total // 2)
                    verify = subprocess.run([*CLI, "verify", str(dest)], cwd=ROOT,
                                            capture_output=True, text=True)
                    if verify.returncode != 0:
                        raise RuntimeError(f"the clone does not verify: {verify.stdout}")
                    shutil.rmtree(dest)
                    (broken if with_outage else plain).append(row)
                    print(f"round {r + 1}/{rounds} {'outage' if with_outage else 'plain ':<6} "
                          f"{row['time']:7.2f} s  outage {row['outage']:5.2f} s  "
                          f"restarts {len(row['restarts']) // 2}  resent {row['resent']}",
                          file=sys.stderr)
        finally:
            _stop(donor)
    med_plain = statistics.median(r["time"] for r in plain)
    med_broken = statistics.median(r["time"] for r in broken)
    med_outage = statistics.median(r["outage"] for r in broken)
    overheads = [b["time"] - (p["time"] + b["outage"]) for p, b in zip(plain, broken,
                                                                        strict=True)]
    report = {"link": rate, "size": size, "bytes": total, "rounds": rounds,
              "outage_s": outage_s, "median_clone_s": med_plain,
              "median_clone_with_outage_s": med_broken, "median_outage_s": med_outage,
              "median_overhead_s": statistics.median(overheads),
              "overheads_s": overheads,
              "median_resent_blocks": statistics.median(r["resent"] for r in broken),
              "resent_blocks": [r["resent"] for r in broken],
              "target_overhead_s": TARGET_OVERHEAD_S}
    report["meets_target"] = report["median_overhead_s"] <= TARGET_OVERHEAD_S
    print(f"\n{size} page store over {rate}, {outage_s:g} s outage, medians of {rounds}:")
    print(f"  clone without an outage   {med_plain:7.2f} s")
    print(f"  clone with the outage     {med_broken:7.2f} s  (outage {med_outage:.2f} s)")
    print(f"  overhead                  {report['median_overhead_s']:7.2f} s  "
          f"(target <= {TARGET_OVERHEAD_S:g} s: "
          f"{'met' if report['meets_target'] else 'NOT met'})")
    print(f"  blocks sent again         {report['median_resent_blocks']:7.0f}")
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.outage", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--size", default="256MiB", help="clone-agent init --size (256MiB)")
    ap.add_argument("--rate", default="200mbit", help="the link's tbf rate (200mbit)")
    ap.add_argument("--outage", type=float, default=20.0, help="seconds down (20)")
    ap.add_argument("--workload", type=int, default=None,
                    help="serve --workload TPS during the clones (default: none)")
    ap.add_argument("--out", type=Path, default=None, help="also write the report as JSON")
    args = ap.parse_args(argv)
    report = run(args.rounds, args.size, args.rate, args.outage, args.workload, args.out)
    if "skipped" in report:
        return 0
    return 0 if report["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
