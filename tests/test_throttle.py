"""The shared rate limit, on a virtual clock (timing logic is tested without sleeping),
and across processes."""

from __future__ import annotations

from engine.stage import Pipeline
from engine.throttle import MiB, RateLimit


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def drive(limit: RateLimit, clock: Clock, block: int, seconds: float) -> list[tuple[float, int]]:
    """A greedy sender: asks for a block, sleeps what it is told (virtually), repeats."""
    log = []
    end = clock.t + seconds
    while clock.t < end:
        clock.t += limit.reserve(block)
        log.append((clock.t, block))
    return log


def window_rates(log: list[tuple[float, int]], start: float, width: float) -> list[float]:
    rates = []
    t = start
    while t + width <= log[-1][0]:
        sent = sum(n for when, n in log if t <= when < t + width)
        rates.append(sent / width)
        t += 0.25
    return rates


def test_rate_is_accurate_over_every_two_second_window() -> None:
    clock = Clock()
    with RateLimit.create(100, clock=clock) as limit:
        t0 = clock.t
        log = drive(limit, clock, 1 << 20, 20)
    rates = window_rates(log, t0 + 1.0, 2.0)
    assert rates and all(abs(r / (100 * MiB) - 1) < 0.05 for r in rates), rates


def test_no_burst_at_the_start() -> None:
    clock = Clock()
    with RateLimit.create(10, clock=clock) as limit:
        t0 = clock.t
        log = drive(limit, clock, 1 << 20, 3)
    first = sum(n for when, n in log if when < t0 + 0.5)
    assert first <= 6 * MiB  # 5 MiB in half a second at 10 MiB/s, plus one block


def test_an_idle_spell_earns_no_more_than_the_burst() -> None:
    clock = Clock()
    with RateLimit.create(10, clock=clock) as limit:
        drive(limit, clock, 1 << 20, 2)
        clock.t += 30  # idle
        t1 = clock.t
        log = drive(limit, clock, 1 << 20, 2)
    sent = sum(n for when, n in log if when < t1 + 1.0)
    assert sent <= 12 * MiB


def test_zero_means_unlimited_and_the_rate_can_change() -> None:
    clock = Clock()
    with RateLimit.create(0, clock=clock) as limit:
        assert limit.reserve(1 << 30) == 0
        limit.set_rate(1)
        assert limit.reserve(1 << 20) > 0.9


def test_one_budget_for_every_process() -> None:
    """Two processes drawing from one 20 MiB/s limit get 20 MiB/s together, not each."""
    with RateLimit.create(20) as limit, Pipeline(
            "drawer", "tests.workers:Drawer", 2, {"limit": limit.name}) as pool:
        pool.wait_ready(30)
        for i in range(2):
            pool.submit(i, ["draw", 10 * MiB, 256 << 10])
        got = []
        while len(got) < 2:
            got += list(pool.events(timeout=30))
    total_time = max(ev[2][0] for ev in got)
    # 20 MiB from a shared 20 MiB/s budget take about a second (each alone: 0.5 s)
    assert total_time > 0.8, total_time


def test_a_late_start_earns_one_burst_at_most() -> None:
    """A limit created at the start of a pull is first used after the manifest (here
    0.3 s later): the data then granted at once is one burst (0.1 s of the rate), no
    more; before, an idle spell earned two."""
    clock = Clock()
    with RateLimit.create(32, clock=clock) as limit:
        clock.t += 0.3
        t1 = clock.t
        log = drive(limit, clock, 1 << 20, 2)
    early = sum(n for when, n in log if when <= t1 + 0.2)
    assert early <= (32 * 0.3 + 1) * MiB  # 0.2 s of the rate, one burst of 0.1 s
