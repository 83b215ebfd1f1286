"""Autotuning on a virtual clock: grows while speed improves, stops at the limit."""

from recipient.tuner import Tuner


def run(tuner: Tuner, speed_for: dict[int, float], seconds: float) -> list[int]:
    t, total, counts = 0.0, 0, []
    tuner.reset(t, total, 1)
    while t < seconds:
        t += 0.1
        total += int(speed_for[tuner.streams] * 0.1)
        new = tuner.sample(t, total)
        if new is not None:
            counts.append(new)
    return counts


def test_grows_while_speed_improves_then_stops() -> None:
    speeds = {1: 100e6, 2: 180e6, 4: 300e6, 8: 310e6, 16: 320e6}
    tuner = Tuner(16)
    assert run(tuner, speeds, 30) == [2, 4, 8]  # 8 brought < 10%: stop there
    assert tuner.done and tuner.streams == 8


def test_first_step_always_doubles_and_never_passes_the_maximum() -> None:
    speeds = {1: 100e6, 2: 100e6, 3: 100e6}
    tuner = Tuner(3)
    assert run(tuner, speeds, 30) == [2]
    tuner = Tuner(3)
    assert run(tuner, {1: 1e6, 2: 5e6, 3: 50e6}, 30) == [2, 3]


def test_stops_near_a_bandwidth_limit() -> None:
    tuner = Tuner(16, limit_bytes_per_s=100e6)
    assert run(tuner, {1: 95e6, 2: 100e6}, 30) == []


def test_starts_over_at_each_state() -> None:
    tuner = Tuner(16)
    run(tuner, {1: 100e6, 2: 100e6, 4: 100e6}, 10)
    assert tuner.done
    tuner.reset(50.0, 0, tuner.streams)
    assert not tuner.done and tuner.prev_speed is None
