"""Worker handlers used by the stage and ring tests (imported in spawned processes)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from engine.errors import ChecksumMismatch
from engine.ring import RingView


class Echo:
    def __init__(self, index: int, args: dict[str, Any]) -> None:
        self.index = index
        self.count = 0

    def handle(self, msg: list[Any]) -> Any:
        kind = msg[0]
        self.count += 1
        if kind == "boom":
            raise ValueError("boom")
        if kind == "clone-error":
            raise ChecksumMismatch("block 7 failed its xxh3 checksum")
        if kind == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "nap":  # a worker held up, as by a disk that stalls
            time.sleep(msg[1])
        return [self.index, msg[1]]

    def close(self) -> Any:
        return {"count": self.count}


class Filler:
    """Writes a byte pattern into a ring slot: shows bytes cross processes by shm."""

    def __init__(self, index: int, args: dict[str, Any]) -> None:
        self.ring = RingView(args["ring"], args["capacity"], args["slot_size"])

    def handle(self, msg: list[Any]) -> Any:
        _, slot, value = msg
        view = self.ring.slot(slot)
        view[:] = bytes([value]) * len(view)
        return [slot]

    def close(self) -> Any:
        self.ring.close()
        return None


class Drawer:
    """Takes bytes from a shared rate limit; answers how long it took."""

    def __init__(self, index: int, args: dict[str, Any]) -> None:
        from engine.throttle import RateLimit

        self.limit = RateLimit.attach(args["limit"])

    def handle(self, msg: list[Any]) -> Any:
        import time

        _, total, chunk = msg
        started = time.monotonic()
        for _ in range(total // chunk):
            self.limit.take(chunk)
        return [time.monotonic() - started]

    def close(self) -> Any:
        self.limit.close()
        return None
