"""Autotuning of the stream count (clone_autotune_concurrency), after MySQL's rule.

Pure logic: the coordinator feeds it the total bytes written and the time; it answers
with a new stream count when one should be added. Streams start at one; after
``samples`` samples of ``interval`` seconds the first step doubles them (capped at
clone_max_concurrency); later steps double again only while the speed improved by at
least ``gain`` (10%) over the speed at the previous count. It stops at the maximum, or
when the speed reaches 90% of a bandwidth limit, never reduces the count, and starts
over (with the streams it has) at each state change. Shorter samples than MySQL's
one-second ones let a clone of a few seconds be tuned too.
"""

from __future__ import annotations

import statistics


class Tuner:
    def __init__(self, max_streams: int, limit_bytes_per_s: float = 0.0,
                 interval: float = 0.5, samples: int = 3, gain: float = 0.10) -> None:
        self.max = max_streams
        self.limit = limit_bytes_per_s
        self.interval = interval
        self.samples = samples
        self.gain = gain
        self.history: list[tuple[float, int, float]] = []  # (time, streams, speed)
        self.reset(0.0, 0, 1)

    def reset(self, now: float, total: int, streams: int) -> None:
        """A new state: tune again from the streams already open."""
        self.streams = streams
        self.rates: list[float] = []
        self.prev_speed: float | None = None
        self.done = streams >= self.max
        self._t, self._total = now, total

    def sample(self, now: float, total: int) -> int | None:
        """Feed the time and the bytes written so far; a new stream count, or None."""
        if now - self._t < self.interval:
            return None
        rate = (total - self._total) / (now - self._t)
        self._t, self._total = now, total
        self.rates.append(rate)
        self.history.append((now, self.streams, rate))
        if self.done or len(self.rates) < self.samples:
            return None
        speed = statistics.median(self.rates[-self.samples:])
        if self.limit and speed >= 0.9 * self.limit:
            self.done = True  # near the bandwidth limit: more streams cannot help
            return None
        if self.prev_speed is not None and speed < self.prev_speed * (1 + self.gain):
            self.done = True  # the last step did not pay: keep what we have
            return None
        self.prev_speed = speed
        self.rates = []
        self.streams = min(self.streams * 2, self.max)
        self.done = self.streams >= self.max
        return self.streams
