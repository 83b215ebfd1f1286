import os
import socket
import stat
import time
from contextlib import ExitStack

import pytest
import zmq

from engine.errors import ProtocolError, StageCrashed
from engine.stage import Pipeline


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


def _collect(pool: Pipeline, n: int) -> list:
    out: list = []
    deadline = time.monotonic() + 30
    while len(out) < n and time.monotonic() < deadline:
        out += list(pool.events(timeout=1))
    return out


def test_work_comes_back_and_stop_ends_every_worker(ctx) -> None:
    with Pipeline("echo", "tests.workers:Echo", 3, {}, ctx) as pool:
        pool.wait_ready(30)
        for i in range(30):
            pool.submit(pool.least_loaded(), ["work", i])
        got = _collect(pool, 30)
        assert sorted(ev[2][1] for ev in got) == list(range(30))
        finals = pool.close()
    assert sum(f["count"] for f in finals.values()) == 30
    assert pool.exitcodes == [0, 0, 0]


def test_a_crash_is_reraised_with_its_number(ctx) -> None:
    with pytest.raises(ProtocolError) as info:
        with Pipeline("echo", "tests.workers:Echo", 2, {}, ctx) as pool:
            pool.submit(0, ["clone-error", 1])
            _collect(pool, 1)
    assert "block 7" in info.value.message


def test_an_unexpected_exception_becomes_stage_crashed(ctx) -> None:
    with pytest.raises(StageCrashed) as info:
        with Pipeline("echo", "tests.workers:Echo", 1, {}, ctx) as pool:
            pool.submit(0, ["boom", 1])
            _collect(pool, 1)
    assert "boom" in info.value.message


def test_a_killed_worker_is_noticed(ctx) -> None:
    with pytest.raises(StageCrashed) as info:
        with Pipeline("echo", "tests.workers:Echo", 2, {}, ctx) as pool:
            pool.wait_ready(30)
            pool.submit(1, ["die", 1])
            _collect(pool, 1)
    assert "echo-1" in info.value.message


def test_abort_terminates_everything(ctx) -> None:
    pool = Pipeline("echo", "tests.workers:Echo", 2, {}, ctx)
    pool.start()
    pool.close(abort=True)
    assert len(pool.exitcodes) == 2 and all(code is not None for code in pool.exitcodes)


def test_the_descriptor_channel_is_a_private_directory(ctx) -> None:
    with Pipeline("echo", "tests.workers:Echo", 2, {}, ctx) as pool:
        pool.wait_ready(30)
        path = pool.ipc_dir
        assert path is not None
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
        assert sorted(os.listdir(path)) == ["in0", "in1", "out"]
        assert all(stat.S_ISSOCK(os.stat(os.path.join(path, n)).st_mode)
                   for n in os.listdir(path))
        pool.close()
    assert not os.path.exists(path)


def _connect_as(uid: int, path: str) -> int:
    """connect(2) to ``path`` from a forked child running as ``uid``: 0 if it connected,
    13 if refused for permission, 99 for anything else. The child touches no ZeroMQ
    state and leaves with os._exit."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            if uid != os.getuid():
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            socket.socket(socket.AF_UNIX).connect(path)
            code = 0
        except PermissionError:
            code = 13
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_another_user_cannot_reach_a_worker(ctx) -> None:
    with ExitStack() as stack:
        # Under umask 0 the socket files themselves are open to all (0777): the
        # directory alone must keep others out.
        old = os.umask(0)
        try:
            pool = stack.enter_context(Pipeline("echo", "tests.workers:Echo", 1, {}, ctx))
        finally:
            os.umask(old)
        pool.wait_ready(30)
        assert pool.ipc_dir is not None
        # The outbox: a stray connection there can take nothing (PULL), and a forged
        # reply is what it would carry.
        outbox = os.path.join(pool.ipc_dir, "out")
        assert stat.S_IMODE(os.stat(outbox).st_mode) == 0o777
        # The owner can connect (so the check below can fail) ...
        assert _connect_as(os.getuid(), outbox) == 0
        # ... and nobody else can: they cannot enter the directory.
        assert _connect_as(65534, outbox) == 13
        pool.submit(0, ["work", 1])
        assert [ev[2][1] for ev in _collect(pool, 1)] == [1]
