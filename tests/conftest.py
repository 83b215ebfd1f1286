"""Fixtures that fail a test which leaves a process or a shared-memory segment behind.

Every test runs with a unique ``CLONE_AGENT_TEST_TAG`` in its environment, which every
process it starts inherits (CLI subprocesses, their spawned workers). After the test,
any live process carrying the tag, or any new ``/dev/shm/clone-agent-*`` file (a ring)
or directory (IPC endpoints), is a leak: the test fails (and the leftovers are removed
so that the next test is clean).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator

import psutil
import pytest

SHM = "/dev/shm"


def _shm_files() -> set[str]:
    try:
        return {n for n in os.listdir(SHM) if n.startswith("clone-agent-")}
    except FileNotFoundError:
        return set()


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
    shm_before = _shm_files()
    yield
    deadline = time.monotonic() + 10
    left = _tagged(tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)  # polling for other processes to finish exiting; bounded
        left = _tagged(tag)
    leaked_shm = _shm_files() - shm_before
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
