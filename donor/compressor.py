"""Compressor processes: compress and seal a block from the read ring into the send ring.

Runs in a worker process of the donor's compressor :class:`~engine.stage.Pipeline`
(started at the first clone that asks for compression or encryption, then kept). A
descriptor ``["compress", tag, in_slot, out_slot, length, codec, seal]`` comes in. With
a codec, the block is compressed (lz4 block format or a zstd frame, level 1) straight
from shared memory; a block that does not shrink goes as it is. With ``seal`` (``[key,
clone_id, state, seq, raw, span, segs]``: an encrypted clone), what goes on the wire is
sealed with AES-256-GCM (engine/crypto.py) into the out slot, so that the encryption
runs in these processes, beside the compression, and scales with them. The answer says
which slot holds what goes on the wire: ``[tag, in_slot, out_slot, codec or 0, wire
length, xxh3 of the wire bytes, in the out slot]``.
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
        self.sealers: dict[bytes, Any] = {}  #: by key: one clone's at a time, in practice
        self.raw = self.wire = 0

    def _sealer(self, key: bytes) -> Any:
        sealer = self.sealers.get(key)
        if sealer is None:
            from engine.crypto import BlockSealer  # only where a clone is encrypted

            self.sealers.clear()  # an older clone's key is never needed again
            sealer = self.sealers[key] = BlockSealer(key)
        return sealer

    def handle(self, msg: list[Any]) -> Any:
        if msg[0] == "reset":
            return None
        _, tag, in_slot, out_slot, length, codec, seal = msg
        data: Any = self.ring.slot(in_slot, length)
        self.raw += length
        used = 0
        if codec:
            comp = self.codecs.get(codec)
            if comp is None:
                comp = self.codecs[codec] = Compressor(codec)
            packed = comp.compress(data)
            if packed is not None and len(packed) <= self.out.slot_size:
                data, used = packed, codec
        if seal is not None:
            from engine.crypto import block_aad

            key, clone_id, state, seq, raw, span, segs = seal
            view = self.out.slot(out_slot, self.out.slot_size)
            wire = self._sealer(key).seal_into(
                data, view, block_aad(clone_id, state, seq, raw, span, used, segs))
            self.wire += wire
            return [tag, in_slot, out_slot, used, wire, checksum(view[:wire]), True]
        if not used:
            self.wire += length
            return [tag, in_slot, out_slot, 0, length, checksum(data), False]
        view = self.out.slot(out_slot, len(data))
        view[:] = data
        self.wire += len(data)
        return [tag, in_slot, out_slot, used, len(data), checksum(view), True]

    def close(self) -> dict[str, Any]:
        self.ring.close()
        self.out.close()
        self.sealers.clear()
        return {"raw": self.raw, "wire": self.wire}
