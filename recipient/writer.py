"""Writer processes: verify a block in a ring slot, then write its segments in place.

Runs in a worker process of the recipient's writer :class:`~engine.stage.Pipeline`.
A :class:`WriteOrder` comes in (as a plain list on the descriptor channel), its pieces
already checked by the coordinator. A :class:`Piece` that carries a mode is a whole
file: a small file of a batch is then finished here, its permission bits and times set
and its descriptor closed, in parallel with the rest of the copy rather than one by one
at FILE SYNC. The checksum is verified first: a mismatch raises ChecksumMismatch and
nothing of the block is written or acknowledged; a block that does not decompress is
the donor's fault too (3863), and a failed write is ERROR 8002 with its hint.

Files are opened relative to the destination's directory descriptor with O_NOFOLLOW
(the destination holds no links while data flows: they are made at FILE SYNC), and
holes are never written, so a sparse file stays sparse. The answer ``[seq, slot]``
lets the coordinator free the slot and acknowledge the block.

Direct I/O: the 4 KiB-aligned part of a segment (a whole block of a big file, a run of
pages) is written with O_DIRECT straight from the ring slot, as MySQL's clone writes
with O_DIRECT from aligned buffers: no copy into the page cache, almost no CPU, and the
bytes are on the device before the block is acknowledged, so FILE SYNC has little left
to flush. A file's unaligned tail and batched small files go through the page cache.
A file system that refuses O_DIRECT (tmpfs before Linux 6.6, some FUSE) gets buffered
writes throughout.
"""

from __future__ import annotations

import errno
import mmap
import os
import time
from collections import OrderedDict
from typing import Any, NamedTuple

from engine.codec import Decompressor, checksum
from engine.errors import ChecksumMismatch, ProtocolError, from_oserror
from engine.fsutil import OPEN_FLAGS, open_at
from engine.ring import RingView
from engine.throttle import RateLimit

FD_CACHE = 64
ALIGN = 4096  #: O_DIRECT alignment of memory, file offset and length (one page)


class Piece(NamedTuple):
    """``size`` bytes of ``rel`` at ``offset``; ``mode`` >= 0: the whole file, which the
    writer finishes: owner (``uid``, ``gid``; -1 leaves one as created), permission
    bits, then times (chown first: it clears setuid and setgid bits)."""

    rel: str
    offset: int
    size: int
    mode: int = -1
    mtime_ns: int = 0
    uid: int = -1
    gid: int = -1
    atime_ns: int = 0


class WriteOrder(NamedTuple):
    """One block to verify and write: ring ``slot`` holds ``length`` bytes on the wire
    (``comp`` 0: the ``raw`` bytes themselves) whose xxh3_64 is ``xxh``."""

    seq: int
    slot: int
    length: int
    xxh: int
    comp: int
    raw: int
    pieces: list[Piece]
    #: a sealed block's associated data (engine.crypto.block_aad); b"": a plain block
    aad: bytes = b""

    def to_wire(self) -> list[Any]:
        """A list marshal can carry (it refuses named tuples)."""
        return ["write", self.seq, self.slot, self.length, self.xxh, self.comp, self.raw,
                [list(p) if p.mode >= 0 else list(p[:3]) for p in self.pieces], self.aad]

    @classmethod
    def from_wire(cls, msg: list[Any]) -> WriteOrder:
        _, seq, slot, length, xxh, comp, raw, pieces, *aad = msg
        return cls(seq, slot, length, xxh, comp, raw, [Piece(*p) for p in pieces],
                   aad[0] if aad else b"")


class Writer:
    def __init__(self, index: int, args: dict[str, Any]) -> None:
        self.ring = RingView(args["ring"], args["capacity"], args["slot_size"])
        # Opened at the first write, not here: writers start while the donor scans,
        # before a replace's destination has passed its last check and been made.
        self._root_path: str = args["root"]
        self._root = -1
        self.fds: OrderedDict[str, int] = OrderedDict()
        self.direct_fds: OrderedDict[str, int] = OrderedDict()
        self.direct = bool(args.get("direct_io", True)) and hasattr(os, "O_DIRECT")
        self.direct_bytes = 0
        #: page-aligned scratch for decompressed or opened blocks, so they can go direct
        #: too (a cipher may write a block's size plus 15 bytes: one page more)
        self._scratch = mmap.mmap(-1, args["slot_size"] + ALIGN) if self.direct else None
        self._scratch_view = memoryview(self._scratch) if self._scratch is not None else None
        # A sealed clone's blocks are opened here, in the processes that touch every
        # byte anyway (engine/crypto.py); the key came in the start record, over the
        # worker's own channel, never in its arguments or environment.
        key = args.get("data_key")
        self.sealer: Any = None
        if key:
            from engine.crypto import BlockSealer  # a plain clone's writers never load it

            self.sealer = BlockSealer(key)
        #: where a sealed block that is also compressed is opened before it is inflated
        self._opened = bytearray(args["slot_size"] + ALIGN) if key else bytearray()
        self.decompressors: dict[int, Decompressor] = {}
        self.bytes = 0
        self.throttled = 0.0
        # clone_max_data_bandwidth / clone_max_network_bandwidth: budgets shared by every
        # writer process (engine/throttle.py); the credit they hold back slows the donor.
        self.limits = [(RateLimit.attach(path), key) for key, path in
                       (("raw", args.get("data_limit")), ("len", args.get("net_limit")))
                       if path]

    @property
    def root(self) -> int:
        if self._root < 0:
            self._root = os.open(self._root_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        return self._root

    def _open(self, rel: str, direct: bool = False) -> int:
        cache = self.direct_fds if direct else self.fds
        fd = cache.get(rel)
        if fd is not None:
            cache.move_to_end(rel)
            return fd
        if direct:  # the file exists: its buffered descriptor created it
            fd = open_at(self.root, rel, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC |
                         os.O_DIRECT)
        else:
            fd = open_at(self.root, rel, OPEN_FLAGS, 0o600)
        cache[rel] = fd
        if len(cache) > FD_CACHE:
            os.close(cache.popitem(last=False)[1])
        return fd

    def _write(self, rel: str, part: memoryview, offset: int, aligned: bool) -> None:
        """Write ``part`` at ``offset``: its aligned head direct when it can, the rest
        through the page cache. ``aligned``: ``part`` starts on a page boundary."""
        fd = self._open(rel)
        size = len(part)
        done = 0
        head = size - size % ALIGN
        if self.direct and aligned and head and offset % ALIGN == 0:
            try:
                dfd = self._open(rel, direct=True)
                while done < head:
                    done += os.pwrite(dfd, part[done:head], offset + done)
                self.direct_bytes += done
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # Refused (a file system without O_DIRECT, or a stricter alignment):
                # buffered from here on, for this process's every file.
                self.direct = False
                done -= done % ALIGN
        while done < size:
            done += os.pwrite(fd, part[done:], offset + done)

    def _complete(self, piece: Piece) -> None:
        """A whole file came in this block: its owner, bits and times now, its
        descriptors closed (FILE SYNC leaves it alone; its data is flushed there)."""
        rel = piece.rel
        fd = self.fds.pop(rel)
        try:
            if piece.uid != -1 or piece.gid != -1:
                os.fchown(fd, piece.uid, piece.gid)
            os.fchmod(fd, piece.mode)
            os.utime(fd, ns=(piece.atime_ns, piece.mtime_ns))
        finally:
            os.close(fd)
        direct = self.direct_fds.pop(rel, None)
        if direct is not None:
            os.close(direct)

    def handle(self, msg: list[Any]) -> Any:
        order = WriteOrder.from_wire(msg)
        seq, slot, length, xxh, comp, raw = order[:6]
        if self.limits:
            delay = max(limit.reserve(raw if key == "raw" else length)
                        for limit, key in self.limits)
            if delay > 0:
                self.throttled += delay
                time.sleep(delay)  # a rate limit, not a wait for a peer
        view = self.ring.slot(slot, length)
        if checksum(view) != xxh:
            raise ChecksumMismatch(f"block {seq} failed its xxh3 checksum; nothing was written")
        data: memoryview = view
        if order.aad or self.sealer is not None:
            data = self._open_sealed(order, view)
        if comp:
            dec = self.decompressors.get(comp)
            if dec is None:
                dec = self.decompressors[comp] = Decompressor(comp)
            try:
                out = dec.decompress(data, raw)
            except ValueError as exc:
                raise ProtocolError(f"block {seq}: {exc}") from None
            if self._scratch_view is not None and self.direct:
                self._scratch_view[:raw] = out
                data = self._scratch_view[:raw]
            else:
                data = memoryview(out)
        cursor = 0
        for piece in order.pieces:
            try:
                self._write(piece.rel, data[cursor : cursor + piece.size], piece.offset,
                            cursor % ALIGN == 0)
                if piece.mode >= 0:
                    self._complete(piece)
            except OSError as exc:
                raise from_oserror(exc, f"writing '{piece.rel}'") from None
            cursor += piece.size
        self.bytes += cursor
        return [seq, slot]

    def _open_sealed(self, order: WriteOrder, view: memoryview) -> memoryview:
        """The plain bytes of a sealed block, checked against where it goes; nothing is
        written unless they check (ProtocolError, 3863)."""
        if self.sealer is None or not order.aad:
            raise ProtocolError(f"block {order.seq}: sealed and plain blocks mixed")
        if order.comp or self._scratch_view is None or not self.direct:
            out = memoryview(self._opened)
        else:
            out = self._scratch_view
        n = self.sealer.open_into(view, out, order.aad)
        return out[:n]

    def close(self) -> dict[str, Any]:
        for fd in [*self.fds.values(), *self.direct_fds.values()]:
            os.close(fd)
        self.fds.clear()
        self.direct_fds.clear()
        if self._scratch is not None and self._scratch_view is not None:
            self._scratch_view.release()
            self._scratch.close()
        if self._root >= 0:
            os.close(self._root)
            self._root = -1
        self.ring.close()
        for limit, _ in self.limits:
            limit.close()
        return {"bytes": self.bytes, "direct_bytes": self.direct_bytes,
                "throttled_s": self.throttled}
