"""Fixtures that fail a test which leaves a process or a shared-memory segment behind,
and that never touch what another program made.

Every test runs with a unique ``CLONE_AGENT_TEST_TAG`` in its environment, which every
process it starts inherits (CLI subprocesses, their spawned workers). After the test,
any live process carrying the tag is a leak. A ``/dev/shm/clone-agent-<pid>-...`` file
(a ring, a rate limit) or directory (IPC endpoints) is the test's own only when ``<pid>``
is the test process or one of its descendants, which a sampler thread records while
the test runs (a process lives for at least its interpreter's start, some tenths of a
second, before it can make one). A segment of any other process, such as a real clone
running beside the test suite, is neither reported nor removed.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator

import psutil
import pytest

SHM = "/dev/shm"
PREFIX = "clone-agent-"
SAMPLE_EVERY = 0.02  #: seconds between two looks at the test's process tree


def _shm_pid(name: str) -> int | None:
    try:
        return int(name[len(PREFIX):].split("-", 1)[0])
    except ValueError:
        return None


def _shm_files(pids: set[int]) -> set[str]:
    """The segments in /dev/shm made by one of ``pids``."""
    try:
        names = os.listdir(SHM)
    except FileNotFoundError:
        return set()
    return {n for n in names if n.startswith(PREFIX) and _shm_pid(n) in pids}


class Descendants(threading.Thread):
    """Records the pid of every process below this one while the test runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="descendants")
        self.me = psutil.Process()
        self.pids: set[int] = {self.me.pid}
        self._done = threading.Event()

    def sample(self) -> None:
        try:
            self.pids.update(p.pid for p in self.me.children(recursive=True))
        except psutil.Error:  # a child that ends while it is listed
            pass

    def run(self) -> None:
        while not self._done.wait(SAMPLE_EVERY):
            self.sample()

    def stop(self) -> set[int]:
        self._done.set()
        self.join(5)
        self.sample()
        return self.pids


def _tagged(tag: str) -> list[psutil.Process]:
    me = os.getpid()
    out = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            if proc.environ().get("CLONE_AGENT_TEST_TAG") == tag and proc.status() != "zombie":
                cmd = " ".join(proc.cmdline())
                if "resource_tracker" not in cmd:
                    out.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


@pytest.fixture(autouse=True)
def no_leaks(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    tag = uuid.uuid4().hex
    monkeypatch.setenv("CLONE_AGENT_TEST_TAG", tag)
    monkeypatch.setenv("CLONE_AGENT_STATE_DIR", os.path.join(str(tmp_path), "state"))
    sampler = Descendants()
    shm_before = _shm_files(sampler.pids)  # this process's own, from an earlier test
    sampler.start()
    try:
        yield
    finally:
        deadline = time.monotonic() + 10
        left = _tagged(tag)
        while left and time.monotonic() < deadline:
            time.sleep(0.1)  # polling for other processes to finish exiting; bounded
            left = _tagged(tag)
        ours = sampler.stop()
    leaked_shm = _shm_files(ours) - shm_before
    for name in leaked_shm:
        path = os.path.join(SHM, name)
        if os.path.isdir(path):
            shutil.rmtree(path)  # an IPC endpoint directory (engine/ipc.py)
        else:
            os.unlink(path)
    names = [" ".join(p.cmdline())[:120] for p in left]
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    assert not left, f"test left processes behind: {names}"
    assert not leaked_shm, f"test left shared memory behind: {sorted(leaked_shm)}"
