"""The shared-memory ring: fixed slots that bulk bytes live in while they cross processes.

A :class:`Ring` is created and owned by one coordinator process. It is a file in
``/dev/shm`` (named ``clone-agent-<pid>-<random>``) mapped with mmap and cut into
``capacity`` slots of ``slot_size`` bytes. Workers attach by name with
:class:`RingView` and read or write the slots the coordinator hands them; what
travels between processes is only a small descriptor (slot index, length, file,
offset, checksum) over the stage's descriptor channel (:mod:`engine.stage`).

Slot ownership is explicit: the coordinator :meth:`Ring.acquire`\\ s a slot before it
hands it out and :meth:`Ring.release`\\ s it when nothing reads it any more (for a
zero-copy ZeroMQ send, when the message tracker says done). ``close()`` unlinks the
file; nothing is left in /dev/shm afterwards, also after an error (the owner closes
it in a ``with`` block) — a kill -9 of the owner is the one case that leaves a file,
and :func:`sweep_stale` removes those of dead processes at the next start.

We use a /dev/shm file and mmap rather than multiprocessing.shared_memory because
Python 3.11's version registers every attach with the resource tracker, which then
unlinks or warns from the wrong process.
"""

from __future__ import annotations

import mmap
import os
import shutil
from collections import deque
from typing import NamedTuple

SHM_DIR = "/dev/shm"
PREFIX = "clone-agent-"


class RingStats(NamedTuple):  # not a dataclass: workers import this, and cheaply
    capacity: int
    slot_size: int
    in_use: int
    peak_in_use: int
    acquired: int
    full_waits: int


class _Mapping:
    def __init__(self, name: str, size: int, create: bool) -> None:
        self.name = name
        self.path = os.path.join(SHM_DIR, name)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._mmap = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.size = size
        self.view: memoryview | None = memoryview(self._mmap)

    def close(self) -> None:
        if self.view is not None:
            try:
                self.view.release()
                self._mmap.close()
            except BufferError:
                # A slice still exported (e.g. a ZeroMQ frame not yet freed): the mapping
                # is dropped when the last reference goes; the name is unlinked anyway.
                pass
            self.view = None


class RingView:
    """A worker's attachment to a ring created elsewhere. Closing it does not unlink."""

    def __init__(self, name: str, capacity: int, slot_size: int) -> None:
        self.capacity = capacity
        self.slot_size = slot_size
        self._map = _Mapping(name, capacity * slot_size, create=False)

    def slot(self, index: int, length: int | None = None) -> memoryview:
        if not 0 <= index < self.capacity:
            raise IndexError(f"slot {index} outside ring of {self.capacity}")
        assert self._map.view is not None, "ring closed"
        if length is not None and length > self.slot_size:
            # a bug, never a peer's doing: it would spill into the next slot
            raise ValueError(f"{length} bytes do not fit a slot of {self.slot_size}")
        start = index * self.slot_size
        return self._map.view[start : start + (self.slot_size if length is None else length)]

    def close(self) -> None:
        self._map.close()

    def __enter__(self) -> RingView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Ring(RingView):
    """The owner's side: creates the segment, hands out slots, unlinks on close."""

    def __init__(self, capacity: int, slot_size: int) -> None:
        if capacity < 1 or slot_size < 1:
            raise ValueError("a ring needs at least one slot of at least one byte")
        self.name = f"{PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
        self.capacity = capacity
        self.slot_size = slot_size
        self._map = _Mapping(self.name, capacity * slot_size, create=True)
        self._free: deque[int] = deque(range(capacity))
        self._peak = 0
        self._acquired = 0
        self._full_waits = 0
        self._closed = False

    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self) -> int | None:
        """A free slot index, or None when every slot is in use (never blocks)."""
        if not self._free:
            self._full_waits += 1
            return None
        index = self._free.popleft()
        self._acquired += 1
        in_use = self.capacity - len(self._free)
        if in_use > self._peak:
            self._peak = in_use
        return index

    def release(self, index: int) -> None:
        if not 0 <= index < self.capacity:
            raise IndexError(f"slot {index} outside ring of {self.capacity}")
        self._free.append(index)

    def stats(self) -> RingStats:
        return RingStats(
            capacity=self.capacity,
            slot_size=self.slot_size,
            in_use=self.capacity - len(self._free),
            peak_in_use=self._peak,
            acquired=self._acquired,
            full_waits=self._full_waits,
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._map.close()
        try:
            os.unlink(self._map.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> Ring:
        return self


def sweep_stale() -> list[str]:
    """Unlink ring files, and remove IPC endpoint directories (:mod:`engine.ipc`), whose
    owner process is gone (left by a kill -9)."""
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return removed
    for name in names:
        if not name.startswith(PREFIX):
            continue
        try:
            pid = int(name[len(PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            path = os.path.join(SHM_DIR, name)
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                removed.append(name)
            except OSError:
                pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
