import os
import time

import pytest

from engine.errors import ProtocolError, StageCrashed
from engine.stage import Pipeline


def _collect(pool: Pipeline, n: int) -> list:
    out: list = []
    deadline = time.monotonic() + 30
    while len(out) < n and time.monotonic() < deadline:
        out += list(pool.events(timeout=1))
    return out


def test_work_comes_back_and_stop_ends_every_worker() -> None:
    with Pipeline("echo", "tests.workers:Echo", 3, {}) as pool:
        pool.wait_ready(30)
        for i in range(30):
            pool.submit(pool.least_loaded(), ["work", i])
        got = _collect(pool, 30)
        assert sorted(ev[2][1] for ev in got) == list(range(30))
        finals = pool.close()
    assert sum(f["count"] for f in finals.values()) == 30
    assert pool.exitcodes == [0, 0, 0]


def test_a_lazy_pool_starts_its_workers_only_when_asked() -> None:
    with Pipeline("echo", "tests.workers:Echo", 2, {}, lazy=True) as pool:
        assert pool.procs == [] and pool.fds == [] and not pool.all_ready
        assert list(pool.events()) == []
        assert pool.ensure_started() and not pool.ensure_started()
        assert len(pool.procs) == 2
        pool.submit(pool.least_loaded(), ["work", 1])
        assert [ev[2][1] for ev in _collect(pool, 1)] == [1]
        finals = pool.close()
    assert sum(f["count"] for f in finals.values()) == 1
    assert pool.exitcodes == [0, 0]


def test_a_lazy_pool_never_started_closes_with_nothing_to_end() -> None:
    with Pipeline("echo", "tests.workers:Echo", 2, {}, lazy=True) as pool:
        pass
    assert pool.procs == [] and pool.close() == {}


def test_finals_of_workers_that_already_exited_are_still_read() -> None:
    """A worker may send its final report and exit before close() looks: the report is
    in its channel still, and close() must return it (it once counted only the workers
    still running, and lost these)."""
    with Pipeline("echo", "tests.workers:Echo", 2, {}) as pool:
        pool.wait_ready(30)
        for i in range(6):
            pool.submit(i % 2, ["work", i])
        assert len(_collect(pool, 6)) == 6
        pool.broadcast(["stop"])
        for proc in pool.procs:
            proc.join(30)
            assert proc.exitcode == 0
        finals = pool.close()
    assert sorted(finals) == [0, 1] and sum(f["count"] for f in finals.values()) == 6


def test_a_busy_worker_does_not_hold_up_the_coordinator() -> None:
    """Descriptors for a worker that is not reading (a stalled disk) wait in the
    coordinator; submit returns at once, and they all arrive, in order, once it reads."""
    big = "x" * (256 << 10)
    with Pipeline("echo", "tests.workers:Echo", 1, {}) as pool:
        pool.wait_ready(30)
        pool.submit(0, ["nap", 1.0])
        for i in range(16):  # 4 MiB: more than the socket buffer holds
            pool.submit(0, ["work", big + str(i)])
        assert pool.poll_ms(200) < 200  # still queued here: submit did not wait
        got = _collect(pool, 17)
        assert [ev[2][1] for ev in got[1:]] == [big + str(i) for i in range(16)]
        assert pool.poll_ms(200) == 200


def test_a_crash_is_reraised_with_its_number() -> None:
    with pytest.raises(ProtocolError) as info:
        with Pipeline("echo", "tests.workers:Echo", 2, {}) as pool:
            pool.submit(0, ["clone-error", 1])
            _collect(pool, 1)
    assert "block 7" in info.value.message


def test_an_unexpected_exception_becomes_stage_crashed() -> None:
    with pytest.raises(StageCrashed) as info:
        with Pipeline("echo", "tests.workers:Echo", 1, {}) as pool:
            pool.submit(0, ["boom", 1])
            _collect(pool, 1)
    assert "boom" in info.value.message


def test_a_killed_worker_is_noticed() -> None:
    with pytest.raises(StageCrashed) as info:
        with Pipeline("echo", "tests.workers:Echo", 2, {}) as pool:
            pool.wait_ready(30)
            pool.submit(1, ["die", 1])
            _collect(pool, 1)
    assert "echo-1" in info.value.message


def test_abort_terminates_everything() -> None:
    pool = Pipeline("echo", "tests.workers:Echo", 2, {})
    pool.start()
    pool.close(abort=True)
    assert len(pool.exitcodes) == 2 and all(code is not None for code in pool.exitcodes)


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _unix_names() -> dict[int, str]:
    """inode -> path (or ``@name``) of every Unix socket of this host, '' for unnamed."""
    names = {}
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            names[int(parts[6])] = parts[7] if len(parts) > 7 else ""
    return names


def test_the_descriptor_channel_has_no_name_to_connect_to() -> None:
    """A worker's only sockets are its channel, a Unix socket with no name, in the file
    system or in the abstract namespace: no other process can connect to it to take
    a descriptor or forge a reply (as any local user could with an ``ipc://@`` one)."""
    with Pipeline("echo", "tests.workers:Echo", 2, {}) as pool:
        pool.wait_ready(30)
        names = _unix_names()
        for i, proc in enumerate(pool.procs):
            assert proc.pid is not None
            with open(f"/proc/{proc.pid}/comm") as f:  # ps and top show what it is
                assert f.read().strip() == f"ca-echo-{i}"
            # its own process group: a terminal's Ctrl-C reaches the command line only
            assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)
            inodes = _socket_inodes(proc.pid)
            assert len(inodes) == 1
            (inode,) = inodes
            assert names[inode] == ""
        pool.submit(0, ["work", 1])
        assert [ev[2][1] for ev in _collect(pool, 1)] == [1]
    assert not pool.fds


def test_work_submitted_before_the_workers_are_up_waits_for_them() -> None:
    with Pipeline("echo", "tests.workers:Echo", 2, {}) as pool:
        for i in range(40):
            pool.submit(i % 2, ["work", i])
        got = _collect(pool, 40)
        assert sorted(ev[2][1] for ev in got) == list(range(40))
        assert pool.all_ready


def test_a_descriptor_bigger_than_the_socket_buffer_goes_through() -> None:
    big = "x" * (3 << 20)
    with Pipeline("echo", "tests.workers:Echo", 1, {}) as pool:
        for i in range(3):
            pool.submit(0, ["work", big + str(i)])
        got = _collect(pool, 3)
        assert [ev[2][1] for ev in got] == [big + str(i) for i in range(3)]


def test_a_worker_boots_without_the_coordinators_modules() -> None:
    """Workers start for every clone; what only a coordinator uses (logging, subprocess,
    traceback: a third of a worker's imports) is imported where it is used."""
    import subprocess
    import sys

    from engine.stage import _worker_path

    probe = ("import sys, engine.stage, recipient.writer, donor.reader, donor.compressor; "
             "print(' '.join(m for m in ('logging', 'subprocess', 'traceback') "
             "if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(_worker_path())}
    res = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == []
