"""The test suite never hurts clones that run beside it: the user's clones keep their
shared memory, and the test run's leak checks pass, while both come and go."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from tests.helpers import CLI, ROOT, Donor


def test_a_test_run_beside_running_clones(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}").write_bytes(os.urandom(4 << 20))
    results: list[subprocess.CompletedProcess[str]] = []
    done = threading.Event()

    def clones(address: str) -> None:
        """The "user's" clones, one after another: each makes its ring at its start,
        so some start while the other run's tests are looking at /dev/shm."""
        n = 0
        while not done.is_set() and n < 200:
            results.append(subprocess.run(
                [*CLI, "pull", f"u@{address}", "--data-dir", str(tmp_path / f"c{n}"),
                 "--max-concurrency", "2"],
                cwd=ROOT, capture_output=True, text=True, timeout=120))
            n += 1

    with Donor(src) as donor:
        thread = threading.Thread(target=clones, args=(donor.address,))
        thread.start()
        try:
            # Another test run: its fixtures check /dev/shm after every test, and these
            # tests make and remove segments of their own.
            env = {k: v for k, v in os.environ.items() if k != "CLONE_AGENT_TEST_TAG"}
            run = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 "tests/test_ring.py", "tests/test_ipc.py", "tests/test_throttle.py",
                 "tests/test_stage.py"],
                cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        finally:
            done.set()
            thread.join(300)
    assert run.returncode == 0, run.stdout[-3000:]
    assert len(results) >= 2
    for res in results:
        assert res.returncode == 0, res.stderr
