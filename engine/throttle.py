"""Cross-process rate limits for clone_max_data_bandwidth and clone_max_network_bandwidth.

One limit is shared by every process and stream: a limiter kept in each process's
memory (as rclone's global token bucket is) would silently multiply the limit by the
number of processes. The state lives in a small shared-memory file
(``/dev/shm/clone-agent-<pid>-<random>``, unlinked by its owner) and is updated under
``lockf`` on that file, so any process that attaches by name takes its share from the
same budget.

The algorithm is GCRA (virtual scheduling): a shared "theoretical arrival time" TAT
advances by ``bytes / rate`` for every grant; a caller waits until ``TAT - burst``.
Starting with TAT = now means no burst at the start; ``burst`` (0.1 s of the rate
by default) lets small blocks pass without a sleep each, and bounds any catch-up
after an idle period, so the rate over any window longer than a second stays within
a few percent of the limit. :meth:`RateLimit.reserve` returns the delay instead of
sleeping, so the logic is tested on a virtual clock.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time
from collections.abc import Callable

from engine.ring import PREFIX, SHM_DIR

_STATE = struct.Struct("<dd")  # rate in bytes/s (0: unlimited), TAT (monotonic seconds)
MiB = 1 << 20


class RateLimit:
    """A shared limiter; ``RateLimit.create`` in the owner, ``RateLimit.attach`` elsewhere."""

    def __init__(self, path: str, owner: bool, burst_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.owner = owner
        self.burst_s = burst_s
        self.clock = clock
        self._fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if owner else 0), 0o600)
        if owner:
            os.ftruncate(self._fd, mmap.PAGESIZE)
        self._map = mmap.mmap(self._fd, mmap.PAGESIZE)

    @classmethod
    def create(cls, mib_per_s: float, clock: Callable[[], float] = time.monotonic,
               burst_s: float = 0.1) -> RateLimit:
        path = os.path.join(SHM_DIR, f"{PREFIX}{os.getpid()}-{os.urandom(4).hex()}-rate")
        limit = cls(path, owner=True, burst_s=burst_s, clock=clock)
        limit.set_rate(mib_per_s)
        return limit

    @classmethod
    def attach(cls, path: str, clock: Callable[[], float] = time.monotonic) -> RateLimit:
        return cls(path, owner=False, clock=clock)

    @property
    def name(self) -> str:
        return self.path

    def set_rate(self, mib_per_s: float) -> None:
        with self._locked():  # TAT starts one burst ahead: no burst at the start
            _STATE.pack_into(self._map, 0, mib_per_s * MiB, self.clock() + self.burst_s)

    def rate(self) -> float:
        return float(_STATE.unpack_from(self._map, 0)[0])

    def reserve(self, nbytes: int) -> float:
        """Take ``nbytes`` from the shared budget; returns the seconds to wait first."""
        with self._locked():
            rate, tat = _STATE.unpack_from(self._map, 0)
            if rate <= 0:
                return 0.0
            now = self.clock()
            start = max(tat, now)  # an idle spell earns at most the burst (GCRA tolerance)
            new_tat = start + nbytes / rate
            _STATE.pack_into(self._map, 0, rate, new_tat)
            return max(0.0, new_tat - self.burst_s - now)

    def take(self, nbytes: int) -> float:
        """reserve() and sleep the delay (a rate limit, not a wait for a peer)."""
        delay = self.reserve(nbytes)
        if delay > 0:
            time.sleep(delay)
        return delay

    def _locked(self) -> _Lock:
        return _Lock(self._fd)

    def close(self) -> None:
        try:
            self._map.close()
        finally:
            os.close(self._fd)
            if self.owner:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass

    def __enter__(self) -> RateLimit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Lock:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)
