"""``clone-agent bench``: clone-agent beside plain-tool baselines, in one run, interleaved.

For each data shape, every tool copies the same source tree into a fresh destination,
round after round, in turn (A B C A B C ...), so that drift of this noisy machine hits
all tools alike; the medians and the per-round ratios are reported. Every tool ends
with its data durable (clone-agent syncs the file system at FILE SYNC, so each
baseline is followed by ``sync -f`` on the destination), and destinations are removed
outside the timed part: when the disk has room, only once the shape is done (see the
comment in ``run_bench``), otherwise after each run, the removal synced to disk.

clone-local (``clone-agent local``) is timed beside ``cp -a`` the same way: a new
process, its data synced before it ends.

Measured per run: wall seconds, CPU seconds of the donor side and the recipient side
(from the kernel's accounting of each process tree), and peak PSS of both sides
together (sampled every 20 ms).
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil

from bench import datasets
from bench.demo import ServeProcess, free_port
from engine.errors import LocalIOError, UsageError
from engine.fsutil import syncfs

GiB = 1 << 30
MiB = 1 << 20


@dataclass
class Run:
    wall: float
    cpu_donor: float
    cpu_recipient: float
    peak_pss: int


@dataclass
class Result:
    shape: str
    tool: str
    bytes: int
    runs: list[Run] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(getattr(r, key) for r in self.runs)


def _tree_cpu(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _tree_pss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        except psutil.NoSuchProcess:
            pass
    return total


class PssSampler(threading.Thread):
    def __init__(self, pids: Callable[[], list[int]]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.02):
            self.peak = max(self.peak, _tree_pss(self.pids()))


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _timed_shell(cmd: list[str] | str, dest: Path, shell: bool = False) -> Run:
    cpu0 = _children_cpu()
    started = time.monotonic()
    procs: list[int] = []
    sampler = PssSampler(lambda: procs)
    p = subprocess.Popen(cmd, shell=shell, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    procs.append(p.pid)
    sampler.start()
    p.wait()
    syncfs(str(dest))
    wall = time.monotonic() - started
    sampler.halt.set()
    sampler.join()
    if p.returncode != 0:
        raise RuntimeError(f"baseline failed: {cmd}")
    return Run(wall, 0.0, _children_cpu() - cpu0, sampler.peak)


def baselines(src: Path) -> dict[str, Callable[[Path], Run]]:
    tools: dict[str, Callable[[Path], Run]] = {}

    def cp_a(dest: Path) -> Run:
        return _timed_shell(["cp", "-a", str(src), str(dest)], dest.parent)

    tools["cp -a"] = cp_a
    if shutil.which("socat"):
        def tar_socat(dest: Path) -> Run:
            dest.mkdir()
            port = free_port()
            cmd = (f"(socat -u TCP-LISTEN:{port},reuseaddr,bind=127.0.0.1 - | "
                   f"tar -xf - -C {dest}) & pid=$!; "
                   f"until ss -ltn | grep -q ':{port} '; do sleep 0.01; done; "
                   f"tar -cf - -C {src} . | socat -u - TCP:127.0.0.1:{port}; wait $pid")
            return _timed_shell(cmd, dest, shell=True)

        tools["tar|socat|tar"] = tar_socat
        if shutil.which("zstd"):
            def tar_zstd(dest: Path) -> Run:
                dest.mkdir()
                port = free_port()
                cmd = (f"(socat -u TCP-LISTEN:{port},reuseaddr,bind=127.0.0.1 - | zstd -dq | "
                       f"tar -xf - -C {dest}) & pid=$!; "
                       f"until ss -ltn | grep -q ':{port} '; do sleep 0.01; done; "
                       f"tar -cf - -C {src} . | zstd -1 -q | socat -u - TCP:127.0.0.1:{port}; "
                       f"wait $pid")
                return _timed_shell(cmd, dest, shell=True)

            tools["tar|zstd|socat"] = tar_zstd
    if shutil.which("rsync"):
        def rsync(dest: Path) -> Run:
            return _timed_shell(["rsync", "-aW", f"{src}/", str(dest)], dest.parent)

        tools["rsync -aW"] = rsync
    return tools


def _timed_cli(args: list[str], pids: list[int]) -> tuple[float, int]:
    """Run ``clone-agent ARGS`` to its end: (wall seconds, peak PSS of ``pids`` and the
    command's process tree). Its failure is an error with its last words."""
    sampler = PssSampler(lambda: pids)
    started = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "clone_agent.cli", *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pids.append(p.pid)
    sampler.start()
    _, err = p.communicate()
    wall = time.monotonic() - started
    sampler.halt.set()
    sampler.join()
    if p.returncode != 0:
        raise RuntimeError(f"clone-agent {args[0]} failed: {err.decode()[-400:]}")
    return wall, sampler.peak


def clone_agent_tool(src: Path, extra: list[str], donor: ServeProcess | None = None
                     ) -> tuple[ServeProcess, Callable[[Path], Run]]:
    donor = donor or ServeProcess(src)

    def run(dest: Path) -> Run:
        assert donor.proc is not None
        dproc = psutil.Process(donor.proc.pid)
        d0 = _tree_cpu(dproc)
        cpu0 = _children_cpu()
        wall, peak = _timed_cli(["pull", f"bench@127.0.0.1:{donor.port}", "--data-dir",
                                 str(dest), *extra], [donor.proc.pid])
        return Run(wall, _tree_cpu(dproc) - d0, _children_cpu() - cpu0, peak)

    assert donor is not None
    return donor, run


def clone_local_tool(src: Path) -> Callable[[Path], Run]:
    """``clone-agent clone-local``: the donor and the recipient in one process tree, so
    all of its CPU is in the recipient's column."""

    def run(dest: Path) -> Run:
        cpu0 = _children_cpu()
        wall, peak = _timed_cli(["clone-local", str(src), "--data-dir", str(dest)], [])
        return Run(wall, 0.0, _children_cpu() - cpu0, peak)

    return run


def _pagestore(root: Path, size: int) -> None:
    from engine.pagestore import init_datadir

    init_datadir(str(root), size, seed=7)


SHAPES_FULL = {
    "big random 1G": lambda root: datasets.big_random(root, 1 * GiB),
    "big compressible 1G": lambda root: datasets.big_compressible(root, 1 * GiB),
    "mixed 1G": lambda root: datasets.mixed(root, 1 * GiB),
    "20k small files": lambda root: datasets.small_files(root, 20000),
    "page store 512M": lambda root: _pagestore(root, 512 * MiB),
}
SHAPES_QUICK = {
    "mixed 256M": lambda root: datasets.mixed(root, 256 * MiB),
    "5k small files": lambda root: datasets.small_files(root, 5000),
    "page store 128M": lambda root: _pagestore(root, 128 * MiB),
}


def run_bench(quick: bool, json_mode: bool, out: str | None, rounds: int | None,
              only: str | None = None, remove_each: bool = False,
              tools_only: list[str] | None = None) -> None:
    """``tools_only``: only these tools beside clone-agent (the reference row), and
    no timelines."""
    shapes = SHAPES_QUICK if quick else SHAPES_FULL
    if only:
        shapes = {name: make for name, make in shapes.items() if only in name}
        if not shapes:
            raise UsageError(f"no data shape matches {only!r}",
                             hint="shapes: " + ", ".join({**SHAPES_FULL, **SHAPES_QUICK}))
    rounds = rounds or (2 if quick else 5)
    results: list[Result] = []
    base = Path(os.environ.get("CLONE_AGENT_BENCH_DIR") or tempfile.gettempdir())
    if not base.is_dir():
        raise LocalIOError(f"the bench directory '{base}' is not a directory",
                           hint="create it, or point CLONE_AGENT_BENCH_DIR at a directory "
                                "on the file system to measure")
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="clone-agent-bench-", dir=base) as tmp:
        for shape, make in shapes.items():
            src = Path(tmp) / "src"
            make(src)
            syncfs(tmp)  # untimed: the new source written back before the first round
            size = datasets.tree_bytes(src)
            # The plain clone is the reference row (the baselines encrypt nothing either);
            # the encrypted one, the default of a pull, is measured beside it.
            donor, agent = clone_agent_tool(src, ["--max-concurrency", "4", "--require-no-ssl"])
            _, agent_enc = clone_agent_tool(src, ["--max-concurrency", "4", "--require-ssl"],
                                            donor=donor)
            _, agent_lz4 = clone_agent_tool(src, ["--max-concurrency", "4", "--require-no-ssl",
                                                  "--enable-compression"], donor=donor)
            with donor:
                tools = {"clone-agent": agent, "clone-agent encrypted": agent_enc,
                         "clone-agent lz4": agent_lz4,
                         "clone-agent local": clone_local_tool(src), **baselines(src)}
                if tools_only:
                    unknown = set(tools_only) - set(tools)
                    if unknown:
                        raise UsageError(f"no tool {sorted(unknown)[0]!r}",
                                         hint="tools: " + ", ".join(tools))
                    tools = {name: tool for name, tool in tools.items()
                             if name == "clone-agent" or name in tools_only}
                shape_results = {name: Result(shape, name, size) for name in tools}
                # Destinations stay until the shape is done when the disk has room:
                # ext4 without a journal skips inodes freed in the last 5 to 10 s at
                # every file it creates, so a tool timed right after a removal would
                # pay for its predecessor's (docs/bench.md, Protocol). A
                # kept destination leaves the page cache, so that memory pressure from
                # earlier runs does not weigh on later ones either.
                keep = not remove_each and \
                    shutil.disk_usage(tmp).free > size * len(tools) * rounds * 1.2 + 4 * GiB
                made: list[Path] = []
                order = list(tools.items())
                for r in range(rounds):
                    # Each round starts one tool later: a tool that always ran right
                    # after another (after the pull, whose write-back may still run)
                    # would always pay for it (docs/bench.md, Protocol).
                    shift = r % len(order)
                    for name, tool in order[shift:] + order[:shift]:
                        dest = Path(tmp) / f"dest-{len(made)}"
                        run = tool(dest)
                        shape_results[name].runs.append(run)
                        made.append(dest)
                        if keep:
                            _evict(dest)
                        else:
                            _remove(made.pop(), tmp)
                        _say(json_mode, f"{shape:>20} round {r + 1}/{rounds} {name:<21} "
                                        f"{run.wall:6.2f} s")
                for dest in made:
                    _remove(dest, tmp)
                if shape.startswith("mixed") and not tools_only:
                    extra = _timelines(src, donor, Path(tmp), quick, json_mode)
            results.extend(shape_results.values())
            shutil.rmtree(src)
    report = _report(results, extra)
    report["command"] = "clone-agent bench" + (" --quick" if quick else "") + \
        f" --rounds {rounds}" + (" --remove-each" if remove_each else "") + \
        (f" --shape {only!r}" if only else "") + \
        "".join(f" --tool {name!r}" for name in tools_only or ())
    _print_table(report, json_mode)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "bench.json"), "wb") as f:
            f.write(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        from bench.charts import draw

        for path in draw(report, out):
            _say(json_mode, f"wrote {path}")
    if json_mode:
        sys.stdout.write(orjson.dumps(report).decode() + "\n")


def _evict(dest: Path) -> None:
    """Drop a finished destination's (clean, synced) pages from the page cache."""
    for dirpath, _, files in os.walk(dest):
        for name in files:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue  # a link
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _remove(dest: Path, tmp: str) -> None:
    """Remove a destination outside the timed part, synced, so that the next tool does
    not pay for the removal's write-back."""
    shutil.rmtree(dest)
    syncfs(tmp)


def _pull_events(donor: ServeProcess, dest: Path, *extra: str) -> list[dict[str, Any]]:
    p = subprocess.run([sys.executable, "-m", "clone_agent.cli", "pull", "--require-no-ssl",
                        f"bench@127.0.0.1:{donor.port}", "--data-dir", str(dest), "--json",
                        *extra], capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"clone-agent pull failed: {p.stderr[-400:]}")
    return [orjson.loads(line) for line in p.stdout.splitlines()]


def _timelines(src: Path, donor: ServeProcess, tmp: Path, quick: bool,
               json_mode: bool) -> dict[str, Any]:
    """One clone's throughput over time, unthrottled and throttled; throttle accuracy.

    The throttled clone gets a tree of its own, sized for about 8 seconds at a limit
    below what a modest disk sustains once the page cache must write back: a limit
    above that would measure the disk, not the limiter."""
    out: dict[str, Any] = {}
    limit = 32
    small = tmp / "throttle-src"
    datasets.mixed(small, limit * MiB * (4 if quick else 8))
    with ServeProcess(small) as small_donor:
        for name, server, extra in (
                ("unthrottled", donor, ()),
                (f"throttled {limit} MiB/s", small_donor, ("--max-data-bandwidth", str(limit)))):
            dest = tmp / "timeline"
            events = _pull_events(server, dest, "--max-concurrency", "8", *extra)
            shutil.rmtree(dest)
            points = [(e["t"], e["data"]) for e in events
                      if e.get("event") == "progress" and e.get("stage") == "FILE COPY"]
            out.setdefault("timelines", {})[name] = {
                "points": points, "autotune": events[-1].get("autotune", [])}
            if extra:
                out["throttle"] = {"limit_mib_s": limit, **_accuracy(points, limit * MiB)}
                _say(json_mode, f"throttle at {limit} MiB/s: worst 2-second window off by "
                                f"{out['throttle']['worst_error_pct']:.1f}%")
    shutil.rmtree(small)
    return out


def _accuracy(points: list[tuple[float, int]], rate: float) -> dict[str, Any]:
    """Worst deviation from ``rate`` over 2-second windows that start after the first
    second (windows between progress samples, which come every half second)."""
    errors = []
    for i, (t0, d0) in enumerate(points):
        if t0 < points[0][0] + 1.0:
            continue
        for t1, d1 in points[i + 1:]:
            if t1 - t0 >= 2.0:
                errors.append(abs((d1 - d0) / (t1 - t0) / rate - 1) * 100)
                break
    return {"windows": len(errors), "worst_error_pct": max(errors, default=0.0),
            "median_error_pct": statistics.median(errors) if errors else 0.0}


def _say(json_mode: bool, text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _report(results: list[Result], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    rows = []
    by_shape: dict[str, dict[str, Result]] = {}
    for res in results:
        by_shape.setdefault(res.shape, {})[res.tool] = res
    for shape, tools in by_shape.items():
        agent = tools["clone-agent"]
        for name, res in tools.items():
            gib = res.bytes / GiB
            ratios = [a.wall / b.wall for a, b in zip(agent.runs, res.runs, strict=True)]
            rows.append({
                "shape": shape, "tool": name, "bytes": res.bytes,
                "wall_s": res.median("wall"),
                "gb_s": res.bytes / 1e9 / res.median("wall"),
                "agent_time_ratio": statistics.median(ratios),
                "cpu_s_per_gib_donor": res.median("cpu_donor") / gib,
                "cpu_s_per_gib_recipient": res.median("cpu_recipient") / gib,
                "peak_pss_mib": res.median("peak_pss") / MiB,
                "runs": [r.__dict__ for r in res.runs],
            })
    report: dict[str, Any] = {"rows": rows, **(extra or {})}
    report["targets"] = _targets(report)
    return report


#: The baselines clone-agent must beat on every shape where they ran (target a).
TARGET_BASELINES = ("tar|socat|tar", "rsync -aW")
#: The encrypted clone's time over the plain clone's, at most (target b).
TARGET_ENCRYPTED = 1.25
#: The throttle's worst 2-second window off its limit by at most this many % (target c).
TARGET_THROTTLE_PCT = 10.0
#: clone-local's time over cp -a's, at most (target d; both end with their data synced).
TARGET_LOCAL_CP = 1.1


def _target(name: str, value: float | None, limit: float, held: bool | None, unit: str,
            basis: str) -> dict[str, Any]:
    return {"name": name, "value": None if value is None else round(value, 4),
            "limit": limit, "held": held, "unit": unit, "basis": basis}


def _pair_ratio(base: dict[str, Any], other: dict[str, Any]) -> tuple[float, str]:
    """``other``'s time over ``base``'s: the median of per-round ratios when both have
    the same rounds (they ran interleaved), else the ratio of medians."""
    p_runs, e_runs = base.get("runs") or [], other.get("runs") or []
    if p_runs and len(p_runs) == len(e_runs):
        return (statistics.median(e["wall"] / p["wall"] for p, e in zip(p_runs, e_runs,
                                                                         strict=True)),
                "median of per-round ratios")
    return other["wall_s"] / base["wall_s"], "ratio of medians"


def _worst_pair(name: str, pairs: dict[str, tuple[float, str]], limit: float,
                missing: str) -> dict[str, Any]:
    """A ratio target from its (ratio, how) by shape: the worst shape's, or not measured."""
    if not pairs:
        return _target(name, None, limit, None, "x", missing)
    worst = max(pairs, key=lambda s: pairs[s][0])
    value, how = pairs[worst]
    return _target(name, value, limit, value <= limit, "x", f"{how}, worst shape: {worst}")


def _targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The bench's targets, each held, missed or not measured (``held`` None)."""
    by_shape: dict[str, dict[str, dict[str, Any]]] = {}
    for row in report["rows"]:
        by_shape.setdefault(row["shape"], {})[row["tool"]] = row
    out = []
    for tool in TARGET_BASELINES:
        ratios = {shape: tools[tool]["agent_time_ratio"] for shape, tools in by_shape.items()
                  if tool in tools and "clone-agent" in tools}
        name = f"clone-agent faster than {tool} on every shape"
        if not ratios:
            out.append(_target(name, None, 1.0, None, "x", f"{tool} did not run"))
            continue
        worst = max(ratios, key=lambda s: ratios[s])
        out.append(_target(name, ratios[worst], 1.0, ratios[worst] < 1.0, "x",
                           f"agent/tool, worst shape: {worst}"))
    out.append(_worst_pair(
        f"encrypted clone at most {TARGET_ENCRYPTED}x the plain clone's time",
        {shape: _pair_ratio(t["clone-agent"], t["clone-agent encrypted"])
         for shape, t in by_shape.items()
         if {"clone-agent", "clone-agent encrypted"} <= t.keys()},
        TARGET_ENCRYPTED, "no encrypted clone in this run"))
    out.append(_worst_pair(
        f"clone-local at most {TARGET_LOCAL_CP}x cp -a's time",
        {shape: _pair_ratio(t["cp -a"], t["clone-agent local"])
         for shape, t in by_shape.items() if {"cp -a", "clone-agent local"} <= t.keys()},
        TARGET_LOCAL_CP, "no clone-local beside cp -a in this run"))
    name = f"throttle within {TARGET_THROTTLE_PCT:g}% in its worst 2-second window"
    throttle = report.get("throttle")
    if throttle and throttle.get("windows"):
        value = throttle["worst_error_pct"]
        out.append(_target(name, value, TARGET_THROTTLE_PCT, value <= TARGET_THROTTLE_PCT, "%",
                           f"at {throttle['limit_mib_s']} MiB/s, "
                           f"{throttle['windows']} windows"))
    else:
        out.append(_target(name, None, TARGET_THROTTLE_PCT, None, "%",
                           "no throttled clone in this run"))
    return out


def _verdict(held: bool | None) -> str:
    return "not measured" if held is None else "held" if held else "missed"


def _columns(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """Lines of a table whose columns are sized from their contents; ``align`` has an
    "<" (left) or ">" (right) per column."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return ["  ".join(cell.ljust(w) if a == "<" else cell.rjust(w)
                      for cell, w, a in zip(line, widths, align, strict=True)).rstrip()
            for line in [header, *rows]]


def _table_lines(report: dict[str, Any]) -> list[str]:
    header = ["shape", "tool", "GB/s", "median s", "agent/tool", "cpu s/GiB donor",
              "recipient", "peak PSS MiB"]
    rows = []
    for row in report["rows"]:
        clone = row["tool"].startswith("clone")
        rows.append([
            row["shape"], row["tool"], f"{row['gb_s']:.2f}", f"{row['wall_s']:.2f}",
            "" if row["tool"] == "clone-agent" else f"{row['agent_time_ratio']:.2f}",
            f"{row['cpu_s_per_gib_donor']:.2f}" if clone else "-",
            f"{row['cpu_s_per_gib_recipient']:.2f}", f"{row['peak_pss_mib']:.1f}"])
    return _columns(header, rows, "<<>>>>>>")


def _target_lines(targets: list[dict[str, Any]]) -> list[str]:
    rows = []
    for t in targets:
        unit = t["unit"]
        shown = "-" if t["value"] is None else f"{t['value']:.2f}{unit}"
        strict = unit == "x" and t["limit"] == 1.0  # faster: below 1, not equal
        rows.append([t["name"], shown, f"{'<' if strict else '<='} {t['limit']:g}{unit}",
                     _verdict(t["held"]), t["basis"]])
    return _columns(["target", "measured", "limit", "verdict", "how"], rows, "<>><<")


def _print_table(report: dict[str, Any], json_mode: bool) -> None:
    stream = sys.stderr if json_mode else sys.stdout
    lines = ["", *_table_lines(report)]
    lines.append("(agent/tool: clone-agent's time over the tool's, median of per-round "
                 "ratios, below 1: clone-agent faster;\n baselines' CPU is all in the "
                 "recipient column)")
    if "throttle" in report:
        t = report["throttle"]
        lines.append(f"throttle accuracy at {t['limit_mib_s']} MiB/s over {t['windows']} "
                     f"two-second windows: median {t['median_error_pct']:.1f}%, worst "
                     f"{t['worst_error_pct']:.1f}%")
    lines += ["", *_target_lines(report.get("targets") or _targets(report))]
    print("\n".join(lines), file=stream)
