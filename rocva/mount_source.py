"""Reading a disk of a recovery plan straight from the store, a range at a time.

``PlanSource.read(offset, length)`` answers from the plan's extents (``rocva.plan``)
without building any image: the extents covering the range are found by
``np.searchsorted`` over their starts; ``ZERO`` extents and ``BASE`` extents over zero
chunks (or a disk without base) stay zeros; ``WRITE`` bytes come from the segment
block that holds them and ``BASE`` bytes from the base chunk, each a *unit* fetched by
one ranged GET and decoded and verified by the same functions a recovery uses
(``cdp.segment.fetch_blocks`` + ``unpack_blocks``: ``stored_xxh3`` and ``raw_xxh3`` of
the block; ``cdp.base_image.decode_chunk``: every sub-block and ``xxh3_128`` of the
chunk), and kept in the shared ``UnitCache``.

The cut of a range into (unit, offset in unit, length, offset in the answer) pieces is
numpy over the extents; Python only loops over pieces to copy them. Nothing is read
before a request asks for it: opening a source costs O(extents) of memory the plan
already holds, and no I/O.

A unit that cannot be fetched or does not verify fails the read with ``EIO`` and a
structured log line naming the object; other reads go on.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Hashable
from concurrent.futures import Executor

import numpy as np

from cdp.base_image import Namer, chunk_namer_of, decode_chunk
from cdp.errors import CdpError, FormatError, NotFound
from cdp.layout import chunk_key
from cdp.logs import get_logger
from cdp.segment import SegmentIndex, fetch_blocks, unpack_blocks
from cdp.store.base import ObjectStore
from rocva.mount_cache import Unit, UnitCache
from rocva.plan import SRC_BASE, SRC_WRITE, DiskPlan

logger = get_logger("rocva.mount")


def _split(start: np.ndarray, length: np.ndarray, unit_bytes: np.ndarray | int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut ranges ``[start, start + length)`` of a stream of units of ``unit_bytes`` each
    (one per range, or one for all) at unit boundaries: (row of the range, unit number,
    offset in the unit, length) per part."""
    unit_bytes = np.broadcast_to(np.asarray(unit_bytes, dtype=np.int64), start.shape)
    u0 = start // unit_bytes
    u1 = (start + length - 1) // unit_bytes
    counts = u1 - u0 + 1
    row = np.repeat(np.arange(len(start)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    unit = u0[row] + (np.arange(int(counts.sum()), dtype=np.int64) - first)
    lo = np.maximum(start[row], unit * unit_bytes[row])
    hi = np.minimum(start[row] + length[row], (unit + 1) * unit_bytes[row])
    return row, unit, lo - unit * unit_bytes[row], hi - lo


class PlanSource:
    """One disk of a plan, read from the store through ``cache``.

    Invariant: ``starts`` are the plan's extent offsets, ascending, ``starts[0] == 0``
    (the extents tile the disk), so ``searchsorted`` finds the extents of any range."""

    def __init__(self, store: ObjectStore, disk: DiskPlan, segments: list[SegmentIndex], cache: UnitCache,
                 executor: Executor) -> None:
        self.store = store
        self.disk = disk
        self.size = disk.size
        self.segments = segments
        self.cache = cache
        self.executor = executor
        ext = disk.extents
        self.starts = ext["offset"].astype(np.int64)
        self.ends = self.starts + ext["length"].astype(np.int64)
        self.kinds = ext["kind"]
        self.segs = ext["seg"].astype(np.int64)
        self.poss = ext["pos"].astype(np.int64)
        self.block_bytes = np.array([s.block_raw_size or 1 for s in segments], dtype=np.int64)
        manifest = disk.manifest
        self.zero_chunks = manifest.zero_mask() if manifest is not None else None
        assert len(self.starts) and self.starts[0] == 0 and self.ends[-1] == disk.size, disk.disk

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Exactly ``length`` bytes from ``offset`` (inside the disk)."""
        assert 0 <= offset and length > 0 and offset + length <= self.size, (offset, length)
        keys, loads, unit_of, src, dst, n = self._pieces(offset, length)
        units = await asyncio.gather(*(self.cache.get(k, load) for k, load in zip(keys, loads)))
        if len(n) == 1 and n[0] == length:  # one piece covers the range: no copy
            u = unit_of[0]
            return memoryview(units[u])[src[0] : src[0] + length]
        out = bytearray(length)  # zeros wherever no piece lands
        view = memoryview(out)
        for u, s, d, k in zip(unit_of.tolist(), src.tolist(), dst.tolist(), n.tolist()):
            view[d : d + k] = memoryview(units[u])[s : s + k]
        return out

    def _pieces(self, offset: int, length: int):
        """(unit keys, their loaders, per piece: unit number, offset in the unit, offset in
        the answer, length) for the non-zero bytes of ``[offset, offset + length)``."""
        end = offset + length
        i0 = int(np.searchsorted(self.starts, offset, side="right")) - 1
        i1 = int(np.searchsorted(self.starts, end, side="left"))
        lo = np.maximum(self.starts[i0:i1], offset)
        hi = np.minimum(self.ends[i0:i1], end)
        kinds = self.kinds[i0:i1]
        keys: list[Hashable] = []
        loads = []
        parts = []  # (unit numbers, src, dst, n) per kind

        w = kinds == SRC_WRITE
        if w.any():
            seg = self.segs[i0:i1][w]
            pos = self.poss[i0:i1][w] + (lo[w] - self.starts[i0:i1][w])
            row, block, src, n = _split(pos, hi[w] - lo[w], self.block_bytes[seg])
            seg_of = seg[row]
            dst = lo[w][row] + (block * self.block_bytes[seg_of] + src - pos[row]) - offset
            pairs = np.stack([seg_of, block], axis=1)
            uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
            for s, b in uniq.tolist():
                keys.append(("block", self.segments[s].key, b))
                loads.append(self._block_loader(self.segments[s], b))
            parts.append((inverse.ravel(), src, dst, n))

        b = kinds == SRC_BASE
        if b.any() and self.disk.manifest is not None:
            m = self.disk.manifest
            row, chunk, src, n = _split(lo[b], hi[b] - lo[b], m.chunk_size)
            dst = chunk * m.chunk_size + src - offset
            stored = ~self.zero_chunks[chunk]
            chunk, src, dst, n = chunk[stored], src[stored], dst[stored], n[stored]
            uniq, inverse = np.unique(chunk, return_inverse=True)
            first = len(keys)
            for c in uniq.tolist():
                h = m.hash_of(c)
                keys.append(("chunk", h))  # by content: a chunk repeated in the disk is fetched once
                loads.append(self._chunk_loader(chunk_key(h), h, m.chunk_len(c)))
            parts.append((inverse.ravel() + first, src, dst, n))

        if not parts:
            empty = np.zeros(0, np.int64)
            return keys, loads, empty, empty, empty, empty
        unit_of, src, dst, n = (np.concatenate(c) for c in zip(*parts))
        return keys, loads, unit_of, src, dst, n

    def _block_loader(self, index: SegmentIndex, block: int):
        async def load() -> tuple[Unit, int]:
            try:
                stored = await fetch_blocks(self.store, index, block, block)
                loop = asyncio.get_running_loop()
                raw = await loop.run_in_executor(self.executor, _decode_block, index, block, stored)
            except NotFound as exc:
                raise _unit_failed(index.key, f"block {block}", NotFound(
                    f"segment {index.key} is missing from {self.store.describe()}")) from exc
            except CdpError as exc:
                raise _unit_failed(index.key, f"block {block}", exc) from exc
            return raw, len(stored)
        return load

    def _chunk_loader(self, key: str, hash16: bytes, chunk_len: int):
        async def load() -> tuple[Unit, int]:
            try:
                stored = await self.store.get(key)
                loop = asyncio.get_running_loop()
                raw = await loop.run_in_executor(self.executor, _decode_chunk, key, stored, hash16, chunk_len,
                                                 chunk_namer_of(self.store))
            except NotFound as exc:
                raise _unit_failed(key, "chunk", NotFound(f"chunk {key} is missing from {self.store.describe()}")
                                   ) from exc
            except CdpError as exc:
                raise _unit_failed(key, "chunk", exc) from exc
            return raw, len(stored)
        return load


def _decode_block(index: SegmentIndex, block: int, stored: bytes) -> Unit:
    """One segment block verified and decompressed (a thread of the pool)."""
    (raw,) = unpack_blocks(index, block, block, stored)
    return raw


def _decode_chunk(key: str, stored: bytes, hash16: bytes, chunk_len: int, namer: Namer = None) -> Unit:
    """One base chunk verified and decoded (a thread of the pool); a sealed store's is not
    hashed whole again (its seal binds it to its name, FORMAT.md §19.6)."""
    raw = decode_chunk(key, stored, hash16, namer=namer, check_name=namer is None)
    if len(raw) != chunk_len:
        raise FormatError(f"chunk {key}: {len(raw)} bytes, the manifest needs {chunk_len}")
    return raw


def _unit_failed(key: str, part: str, exc: CdpError) -> OSError:
    """The read's error for a unit that could not be had: EIO, after a log line that names
    the object and what was wrong."""
    logger.warning("mount_object_failed", object=key, part=part, error=exc.message, kind=type(exc).__name__)
    return OSError(errno.EIO, f"{exc.message}")
