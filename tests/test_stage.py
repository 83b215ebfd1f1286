import time

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
