"""``python -m bench.versus OLD_TREE``: this code's pull beside another checkout's.

    git worktree add /tmp/old <commit>
    python -m bench.versus /tmp/old --rounds 9 [--local]

Makes the 1 GiB mixed tree once, serves it with each checkout's ``clone-agent serve``
(the same interpreter, ``PYTHONPATH`` set to the checkout), and pulls it with each
checkout's ``clone-agent pull --require-no-ssl --max-concurrency 4``, interleaved (the
order swaps every round), ROUNDS times each. Destinations stay until the end: ext4
without a journal makes a clone that follows a removal pay for the freed inodes
(docs/bench.md, Protocol). Both checkouts are byte-compiled first. Prints every
time, the medians, and the median of the per-round ratios this/other, of the wall
time and of the CPU time (the command and the processes it waited for; with a pull,
the donor's too: its server and its readers). ``--local``: ``clone-agent
clone-local`` instead of a pull (no server).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench import datasets
from bench.demo import free_port
from bench.suite import _children_cpu, _tree_cpu
from engine.fsutil import syncfs

HERE = str(Path(__file__).resolve().parent.parent)
PACKAGES = ("engine", "donor", "recipient", "clone_agent", "bench")


def _env(tree: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": tree}


def _known(tree: str, command: str, *flags: str) -> list[str]:
    """Those of ``flags`` that ``command`` of ``tree`` has (an older checkout may
    predate them: one without security has no --allow-anonymous, nor --require-no-ssl,
    and its clone is plain like this one's with it)."""
    res = subprocess.run([sys.executable, "-m", "clone_agent.cli", command, "--help"],
                         cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=60)
    return [flag for flag in flags if flag in res.stdout]


def _serve(tree: str, src: Path) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "clone_agent.cli", "serve", str(src),
                             "--bind", f"127.0.0.1:{port}",
                             *_known(tree, "serve", "--allow-anonymous")],
                            cwd=tree, env=_env(tree), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # serve says "ready ..." once it listens, or exits
    if not line.startswith("ready"):
        proc.kill()
        proc.wait(10)
        raise SystemExit(f"{tree}: serve did not start ({line.strip()!r})")
    return proc, port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("other", help="another checkout of clone-agent (a git worktree)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--dir", default=None, help="where to make the data (default: TMPDIR)")
    ap.add_argument("--local", action="store_true", help="clone-local, not a pull")
    args = ap.parse_args()
    trees = {"this": HERE, "other": os.path.abspath(args.other)}
    for tree in trees.values():
        # Bytecode for both, as an installation has it: where PYTHONDONTWRITEBYTECODE
        # is set, a checkout without it compiles its modules in every process it starts.
        subprocess.run([sys.executable, "-m", "compileall", "-q", *PACKAGES], cwd=tree,
                       check=True, stdout=subprocess.DEVNULL, timeout=300)
    with tempfile.TemporaryDirectory(prefix="clone-agent-versus-", dir=args.dir) as tmp:
        base = Path(tmp)
        src = base / "src"
        datasets.mixed(src, 1 << 30)
        syncfs(tmp)
        serves: dict[str, tuple[subprocess.Popen[str], int]] = {}
        times: dict[str, list[float]] = {name: [] for name in trees}
        cpus: dict[str, list[float]] = {name: [] for name in trees}
        try:
            plain = {name: _known(tree, "pull", "--require-no-ssl") for name, tree in
                     trees.items()}
            for name, tree in trees.items():
                if not args.local:
                    serves[name] = _serve(tree, src)
            for r in range(args.rounds):
                for name in (("this", "other") if r % 2 else ("other", "this")):
                    tree, dest = trees[name], str(base / f"{name}-{r}")
                    cmd = ["clone-local", str(src), "--data-dir", dest] if args.local else \
                        ["pull", f"bench@127.0.0.1:{serves[name][1]}", "--data-dir", dest,
                         "--max-concurrency", "4", *plain[name]]
                    donor = psutil.Process(serves[name][0].pid) if serves else None
                    donor_cpu = _tree_cpu(donor) if donor is not None else 0.0
                    own_cpu = _children_cpu()
                    started = time.monotonic()
                    res = subprocess.run([sys.executable, "-m", "clone_agent.cli", *cmd],
                                         cwd=tree, env=_env(tree), capture_output=True,
                                         text=True, timeout=600)
                    wall = time.monotonic() - started
                    if res.returncode != 0:
                        raise SystemExit(f"{name}: {cmd[0]} failed: {res.stderr[-400:]}")
                    cpu = _children_cpu() - own_cpu + \
                        (_tree_cpu(donor) - donor_cpu if donor is not None else 0.0)
                    times[name].append(wall)
                    cpus[name].append(cpu)
                    print(f"round {r + 1}/{args.rounds} {name:<5} {wall:6.2f} s "
                          f"CPU {cpu:6.2f} s", flush=True)
        finally:
            for proc, _ in serves.values():
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
    for what, figures in (("time", times), ("CPU", cpus)):
        ratios = [a / b for a, b in zip(figures["this"], figures["other"], strict=True)]
        print(f"{what}: median this {statistics.median(figures['this']):.2f} s, "
              f"other {statistics.median(figures['other']):.2f} s")
        print(f"{what}: per-round this/other: " + " ".join(f"{x:.3f}" for x in ratios))
        print(f"{what}: median ratio {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
