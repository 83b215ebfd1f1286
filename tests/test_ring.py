import os

import pytest

from engine.ipc import EndpointDir
from engine.ring import PREFIX, SHM_DIR, Ring, RingView, sweep_stale
from engine.stage import Pipeline


def test_slots_capacity_and_stats() -> None:
    with Ring(4, 4096) as ring:
        assert os.path.exists(os.path.join(SHM_DIR, ring.name))
        slots = [ring.acquire() for _ in range(4)]
        assert sorted(slots) == [0, 1, 2, 3]
        assert ring.acquire() is None
        st = ring.stats()
        assert (st.capacity, st.in_use, st.peak_in_use, st.full_waits) == (4, 4, 4, 1)
        ring.release(2)
        assert ring.acquire() == 2
        with pytest.raises(IndexError):
            ring.release(9)
        ring.slot(1)[:5] = b"hello"
        assert bytes(ring.slot(1, 5)) == b"hello"
    assert not os.path.exists(os.path.join(SHM_DIR, ring.name))


def test_close_is_idempotent_and_unlinks_on_error() -> None:
    with pytest.raises(RuntimeError):
        with Ring(2, 1024) as ring:
            raise RuntimeError
    assert not os.path.exists(os.path.join(SHM_DIR, ring.name))
    ring.close()


def test_bytes_cross_processes_through_the_ring() -> None:
    with Ring(3, 64 << 10) as ring, Pipeline(
        "fill", "tests.workers:Filler", 2,
        {"ring": ring.name, "capacity": 3, "slot_size": 64 << 10},
    ) as pool:
        for slot in range(3):
            pool.submit(slot % 2, ["fill", slot, 10 + slot])
        done = []
        while len(done) < 3:
            done += [ev[2][0] for ev in pool.events(timeout=5)]
        for slot in range(3):
            assert bytes(ring.slot(slot)) == bytes([10 + slot]) * (64 << 10)


def test_view_attaches_by_name() -> None:
    with Ring(2, 128) as ring:
        ring.slot(1)[:3] = b"abc"
        with RingView(ring.name, 2, 128) as view:
            assert bytes(view.slot(1, 3)) == b"abc"
        assert os.path.exists(os.path.join(SHM_DIR, ring.name))  # a view never unlinks


def test_sweep_removes_rings_of_dead_processes() -> None:
    stale = os.path.join(SHM_DIR, f"{PREFIX}999999999-dead")
    open(stale, "wb").close()
    assert f"{PREFIX}999999999-dead" in sweep_stale()
    assert not os.path.exists(stale)


def test_sweep_removes_ipc_directories_of_dead_processes() -> None:
    stale = os.path.join(SHM_DIR, f"{PREFIX}999999999-gone.ipc")
    os.mkdir(stale, 0o700)
    open(os.path.join(stale, "in0"), "wb").close()
    with EndpointDir() as mine:  # ours, alive: kept
        removed = sweep_stale()
        assert f"{PREFIX}999999999-gone.ipc" in removed
        assert not os.path.exists(stale)
        assert os.path.isdir(mine.path)
    assert not os.path.exists(mine.path)
