"""A tree of many small files pulled over loopback: the peak PSS of the donor's and
the recipient's process trees together (docs/bench.md, "Many files").

    python -m bench.scale --files 1000000 --dir /mnt/bench

makes FILES files of one byte in directories of 1000 under DIR (kept for later runs
when it is there already with as many), serves it, pulls it with PSS samplers on both
process trees together and on each (every 20 ms), removes the copy, and prints one
JSON line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson

from bench.demo import ServeProcess
from bench.suite import MiB, PssSampler

PER_DIR = 1000


def make_tree(root: Path, files: int) -> None:
    done = root / ".complete"
    if done.exists() and done.read_text() == str(files):
        return
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for d in range(-(-files // PER_DIR)):
        sub = root / f"d{d:05}"
        sub.mkdir()
        dfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(min(PER_DIR, files - d * PER_DIR)):
                fd = os.open(f"f{i:04}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd)
                os.write(fd, b"x")
                os.close(fd)
        finally:
            os.close(dfd)
    done.write_text(str(files))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--dir", default=os.environ.get("CLONE_AGENT_BENCH_DIR", "/tmp"))
    args = ap.parse_args()
    base = Path(args.dir)
    src = base / f"scale-{args.files}"
    dest = base / "scale-copy"
    t0 = time.monotonic()
    make_tree(src, args.files)
    made = time.monotonic() - t0
    shutil.rmtree(dest, ignore_errors=True)
    with ServeProcess(src, timeout=600) as donor:
        assert donor.proc is not None
        pids = [donor.proc.pid]
        sampler = PssSampler(lambda: pids)
        donor_side = PssSampler(lambda: pids[:1])
        recipient_side = PssSampler(lambda: pids[1:])
        started = time.monotonic()
        p = subprocess.Popen([sys.executable, "-m", "clone_agent.cli", "pull",
                              f"bench@127.0.0.1:{donor.port}", "--data-dir", str(dest),
                              "--require-no-ssl"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        pids.append(p.pid)
        samplers = (sampler, donor_side, recipient_side)
        for one in samplers:
            one.start()
        _, err = p.communicate()
        wall = time.monotonic() - started
        for one in samplers:
            one.halt.set()
            one.join()
    ok = p.returncode == 0
    shutil.rmtree(dest, ignore_errors=True)
    print(orjson.dumps({"files": args.files, "made_s": round(made, 1), "ok": ok,
                        "pull_s": round(wall, 1),
                        "peak_pss_mib": round(sampler.peak / MiB, 1),
                        "donor_peak_pss_mib": round(donor_side.peak / MiB, 1),
                        "recipient_peak_pss_mib": round(recipient_side.peak / MiB, 1),
                        "error": "" if ok else err.decode()[-400:]}).decode())


if __name__ == "__main__":
    main()
