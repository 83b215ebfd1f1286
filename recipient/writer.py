"""Writer processes: verify a block in a ring slot, then write its segments in place.

Runs in a worker process of the recipient's writer :class:`~engine.stage.Pipeline`.
A descriptor ``["write", seq, slot, length, checksum, comp, raw, segments]`` comes
in, each segment ``[relative path, offset, length]`` (already checked by the
coordinator). The checksum is verified first: a mismatch raises ChecksumMismatch and
nothing of the block is written or acknowledged. Files are opened relative to the
destination's directory descriptor with O_NOFOLLOW (the destination holds no links
while data flows: they are made at FILE SYNC), and holes are never written, so a
sparse file stays sparse. The answer ``[seq, slot]`` lets the coordinator free the
slot and acknowledge the block.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from typing import Any

from engine.codec import Decompressor, checksum
from engine.errors import ChecksumMismatch
from engine.ring import RingView
from engine.throttle import RateLimit
from recipient.manifest import OPEN_FLAGS

FD_CACHE = 64


class Writer:
    def __init__(self, index: int, args: dict[str, Any]) -> None:
        self.ring = RingView(args["ring"], args["capacity"], args["slot_size"])
        self.root = os.open(args["root"], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        self.fds: OrderedDict[str, int] = OrderedDict()
        self.decompressors: dict[int, Decompressor] = {}
        self.bytes = 0
        self.throttled = 0.0
        # clone_max_data_bandwidth / clone_max_network_bandwidth: budgets shared by every
        # writer process (engine/throttle.py); the credit they hold back slows the donor.
        self.limits = [(RateLimit.attach(path), key) for key, path in
                       (("raw", args.get("data_limit")), ("len", args.get("net_limit")))
                       if path]

    def _open(self, rel: str) -> int:
        fd = self.fds.get(rel)
        if fd is not None:
            self.fds.move_to_end(rel)
            return fd
        fd = os.open(rel, OPEN_FLAGS, 0o600, dir_fd=self.root)
        self.fds[rel] = fd
        if len(self.fds) > FD_CACHE:
            os.close(self.fds.popitem(last=False)[1])
        return fd

    def handle(self, msg: list[Any]) -> Any:
        _, seq, slot, length, xxh, comp, raw, segments = msg
        if self.limits:
            delay = max(limit.reserve(raw if key == "raw" else length)
                        for limit, key in self.limits)
            if delay > 0:
                self.throttled += delay
                time.sleep(delay)  # a rate limit, not a wait for a peer
        view = self.ring.slot(slot, length)
        if checksum(view) != xxh:
            raise ChecksumMismatch(f"block {seq} failed its xxh3 checksum; nothing was written")
        data: Any = view
        if comp:
            dec = self.decompressors.get(comp)
            if dec is None:
                dec = self.decompressors[comp] = Decompressor(comp)
            data = memoryview(dec.decompress(view, raw))
        cursor = 0
        for rel, offset, size in segments:
            fd = self._open(rel)
            part = data[cursor : cursor + size]
            done = 0
            while done < size:
                done += os.pwrite(fd, part[done:], offset + done)
            cursor += size
        self.bytes += cursor
        return [seq, slot]

    def close(self) -> dict[str, Any]:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        os.close(self.root)
        self.ring.close()
        for limit, _ in self.limits:
            limit.close()
        return {"bytes": self.bytes, "throttled_s": self.throttled}
