"""Compressor processes: compress a block from the read ring into the send ring.

Runs in a worker process of the donor's compressor :class:`~engine.stage.Pipeline`
(started at the first clone that asks for compression, then kept). A descriptor
``["compress", tag, in_slot, out_slot, length, codec]`` comes in; the block is
compressed (lz4 block format or a zstd frame, level 1) straight from shared memory and
the result copied into the out slot. A block that does not shrink is sent as it is:
the answer says which slot holds what goes on the wire,
``[tag, in_slot, out_slot, codec or 0, wire length, xxh3 of the wire bytes]``.
"""

from __future__ import annotations

from typing import Any

from engine.codec import Compressor, checksum
from engine.ring import RingView


class CompressorWorker:
    def __init__(self, index: int, args: dict[str, Any]) -> None:
        self.ring = RingView(args["ring"], args["capacity"], args["slot_size"])
        self.out = RingView(args["out_ring"], args["out_capacity"], args["out_slot_size"])
        self.codecs: dict[int, Compressor] = {}
        self.raw = self.wire = 0

    def handle(self, msg: list[Any]) -> Any:
        if msg[0] == "reset":
            return None
        _, tag, in_slot, out_slot, length, codec = msg
        data = self.ring.slot(in_slot, length)
        comp = self.codecs.get(codec)
        if comp is None:
            comp = self.codecs[codec] = Compressor(codec)
        packed = comp.compress(data)
        self.raw += length
        if packed is None or len(packed) > self.out.slot_size:
            self.wire += length
            return [tag, in_slot, out_slot, 0, length, checksum(data)]
        view = self.out.slot(out_slot, len(packed))
        view[:] = packed
        self.wire += len(packed)
        return [tag, in_slot, out_slot, codec, len(packed), checksum(view)]

    def close(self) -> dict[str, Any]:
        self.ring.close()
        self.out.close()
        return {"raw": self.raw, "wire": self.wire}
