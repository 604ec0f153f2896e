"""Reading a disk of a recovery plan straight from the store, a range at a time.

``PlanSource.read(offset, length)`` answers from the plan's extents (``rocva.plan``)
without building any image: the extents covering the range are found by
``np.searchsorted`` over their starts; ``ZERO`` extents and ``BASE`` extents over zero
chunks (or a disk without base) stay zeros; ``WRITE`` bytes come from the segment
block that holds them and ``BASE`` bytes from a *part* of the base chunk
(``CHUNK_PART_BYTES`` of raw bytes, the sub-blocks of FORMAT.md §6.1 that hold them),
each a *unit* fetched by one ranged GET and decoded and verified by the same functions
a recovery uses (``cdp.segment.fetch_blocks`` + ``unpack_blocks``: ``stored_xxh3`` and
``raw_xxh3`` of the block; ``ChunkTable.decode``: each sub-block's ``stored_xxh3``
and ``raw_xxh3``, behind the chunk's header and table, checked against the manifest's
hash and length once per chunk and kept: ``HEADS_KEPT``), and kept in the shared
``UnitCache``. A version-1 chunk (no table) is fetched and verified whole, and the part
copied out of it.

Why parts: a random 4 KiB read that fell in the base decoded its whole 4 MiB chunk
(6.7 ms of a pool thread), and a VM booting from the mount reads that way. With parts
of 512 KiB, cold random 4 KiB reads of a 1 GiB mount (fio, NBD, 32 deep) went from
714-892 to 1,484-1,576 a second; sequential reads stayed about as fast (1 GiB by
``nbdcopy`` in 6.45-6.93 s against 6.24-6.62). In process, parts of 4 MiB read in
order 5-10 % faster and at random 40 % slower; parts of 256 KiB read in order 5-8 %
slower and at random no faster.

The cut of a range into (unit, offset in unit, length, offset in the answer) pieces is
numpy over the extents, or plain integers for a range inside one extent (most small
reads); Python only loops over pieces to copy them. Nothing is read
before a request asks for it: opening a source costs O(extents) of memory the plan
already holds, and no I/O.

A unit that cannot be fetched or does not verify fails the read with ``EIO`` and a
structured log line naming the object; other reads go on. Whether the point may still
be read is ``rocva.point_guard``'s to say.
"""

from __future__ import annotations

import asyncio
import errno
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from typing import TYPE_CHECKING

import numpy as np

from cdp.base_image import (
    SUB_BLOCK_BYTES, ChunkTable, Namer, chunk_bytes_max, chunk_head_bytes, chunk_namer_of, decode_chunk,
    decode_chunk_head,
)
from cdp.errors import CdpError, FormatError, NotFound, TruncatedError
from cdp.layout import chunk_key
from cdp.logs import get_logger
from cdp.segment import SegmentIndex, stored_span, unpack_blocks
from cdp.store.base import Bytes, ObjectStore, get_bounded
from rocva.mount_cache import Unit, UnitCache
from rocva.plan import SRC_BASE, SRC_WRITE, DiskPlan

if TYPE_CHECKING:
    from rocva.point_guard import PointGuard

logger = get_logger("rocva.mount")

#: Raw bytes of a base chunk's part, the unit of a base read (a chunk smaller than this
#: is one part). Chunk sizes are powers of two of 64 KiB or more (FORMAT.md §6.2), so a
#: part is whole sub-blocks and a chunk whole parts.
CHUNK_PART_BYTES = 512 << 10
#: Verified chunk tables kept, by chunk hash (each about 2 KiB for a 4 MiB chunk).
HEADS_KEPT = 4096
#: A read inside one unit smaller than 1 / this of the unit's buffer is copied out, not a
#: view of it (``_slice``): a reply waiting to be sent then holds at most twice its bytes.
SLICE_COPY_BELOW = 2


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
        # A store whose GETs can run in the pool job that decodes them (``_got_and_decoded``).
        self._read_blocking = getattr(store, "read_blocking", None)
        ext = disk.extents
        self.starts = ext["offset"].astype(np.int64)
        self.ends = self.starts + ext["length"].astype(np.int64)
        self.kinds = ext["kind"]
        self.segs = ext["seg"].astype(np.int64)
        self.poss = ext["pos"].astype(np.int64)
        self.block_bytes = np.array([s.block_raw_size or 1 for s in segments], dtype=np.int64)
        manifest = disk.manifest
        self.zero_chunks = manifest.zero_mask() if manifest is not None else None
        self.part_bytes = min(manifest.chunk_size, CHUNK_PART_BYTES) if manifest is not None else CHUNK_PART_BYTES
        self._tables: OrderedDict[bytes, ChunkTable | None] = OrderedDict()  # None: version 1
        #: Whether the store still holds the point (``PointGuard``; None: not watched).
        self.guard: PointGuard | None = None
        assert len(self.starts) and self.starts[0] == 0 and self.ends[-1] == disk.size, disk.disk

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Exactly ``length`` bytes from ``offset`` (inside the disk)."""
        assert 0 <= offset and length > 0 and offset + length <= self.size, (offset, length)
        if self.guard is not None and not self.guard.trusted:
            await self.guard.wait_trusted()
        keys, loads, unit_of, src, dst, n = self._pieces(offset, length)
        if len(keys) == 1:  # one unit (most small reads): no gather around it
            units = [await self.cache.get(keys[0], loads[0])]
        else:
            units = await asyncio.gather(*(self.cache.get(k, load) for k, load in zip(keys, loads)))
        if len(n) == 1 and n[0] == length:  # one piece covers the range
            return _slice(units[unit_of[0]], src[0], length)
        out = bytearray(length)  # zeros wherever no piece lands
        view = memoryview(out)
        for u, s, d, k in zip(unit_of, src, dst, n):
            view[d : d + k] = memoryview(units[u])[s : s + k]
        return out

    def _pieces(self, offset: int, length: int):
        """(unit keys, their loaders, and per piece as lists: unit number, offset in the
        unit, offset in the answer, length) for the non-zero bytes of ``[offset, offset +
        length)``."""
        i0 = int(np.searchsorted(self.starts, offset, side="right")) - 1
        if offset + length <= int(self.ends[i0]):
            return self._pieces_in_extent(i0, offset, length)
        return self._pieces_of_extents(i0, offset, length)

    def _pieces_in_extent(self, i: int, offset: int, length: int):
        """``_pieces`` of a range inside extent ``i``, in plain integers.

        Why: most reads of a booting VM are a few KiB, inside one extent, and the numpy
        of ``_pieces_of_extents`` cost 69 µs of the event loop per 4 KiB read (a few
        dozen calls on arrays of one row); this costs 4 µs. Cold random 4 KiB reads of
        ``benchmarks.recovery``'s 1 GiB disk (fio, NBD, 32 deep) went from 1,414-1,606
        to 2,244-2,384 a second: the loop was what held them back."""
        kind = int(self.kinds[i])
        keys: list[Hashable] = []
        loads = []
        unit_of: list[int] = []
        src: list[int] = []
        dst: list[int] = []
        n: list[int] = []
        if kind == SRC_WRITE:
            seg = int(self.segs[i])
            index, unit = self.segments[seg], int(self.block_bytes[seg])
            pos = int(self.poss[i]) + offset - int(self.starts[i])
            for block in range(pos // unit, (pos + length - 1) // unit + 1):
                lo, hi = max(pos, block * unit), min(pos + length, (block + 1) * unit)
                unit_of.append(len(keys))
                keys.append(("block", index.key, block))
                loads.append(self._block_loader(index, block))
                src.append(lo - block * unit)
                dst.append(lo - pos)
                n.append(hi - lo)
        elif kind == SRC_BASE and self.disk.manifest is not None:
            m, unit = self.disk.manifest, self.part_bytes
            per_chunk = m.chunk_size // unit
            for part in range(offset // unit, (offset + length - 1) // unit + 1):
                c, k = divmod(part, per_chunk)
                if self.zero_chunks[c]:
                    continue
                lo, hi = max(offset, part * unit), min(offset + length, (part + 1) * unit)
                h = m.hash_of(c)
                unit_of.append(len(keys))
                keys.append(("chunk", h, unit, k))
                loads.append(self._chunk_part_loader(chunk_key(h), h, m.chunk_len(c), k))
                src.append(lo - part * unit)
                dst.append(lo - offset)
                n.append(hi - lo)
        return keys, loads, unit_of, src, dst, n

    def _pieces_of_extents(self, i0: int, offset: int, length: int):
        """``_pieces`` of a range over several extents, from ``i0`` (numpy over them)."""
        end = offset + length
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
            part_bytes, per_chunk = self.part_bytes, m.chunk_size // self.part_bytes
            row, part, src, n = _split(lo[b], hi[b] - lo[b], part_bytes)
            dst = part * part_bytes + src - offset
            stored = ~self.zero_chunks[part // per_chunk]
            part, src, dst, n = part[stored], src[stored], dst[stored], n[stored]
            uniq, inverse = np.unique(part, return_inverse=True)
            first = len(keys)
            for q in uniq.tolist():
                c, k = divmod(q, per_chunk)
                h = m.hash_of(c)
                keys.append(("chunk", h, part_bytes, k))  # by content: a repeated chunk is fetched once
                loads.append(self._chunk_part_loader(chunk_key(h), h, m.chunk_len(c), k))
            parts.append((inverse.ravel() + first, src, dst, n))

        if not parts:
            return keys, loads, [], [], [], []
        unit_of, src, dst, n = (np.concatenate(c).tolist() for c in zip(*parts))
        return keys, loads, unit_of, src, dst, n

    def _block_loader(self, index: SegmentIndex, block: int):
        async def load() -> tuple[Unit, int]:
            try:
                offset, length = stored_span(index, block, block)
                return await self._got_and_decoded(index.key, offset, length,
                                                   lambda stored: _decode_block(index, block, stored))
            except NotFound as exc:
                raise _unit_failed(index.key, f"block {block}", NotFound(
                    f"segment {index.key} is missing from {self.store.describe()}")) from exc
            except CdpError as exc:
                raise _unit_failed(index.key, f"block {block}", exc) from exc
        return load

    def _chunk_part_loader(self, key: str, hash16: bytes, chunk_len: int, k: int):
        """Part ``k`` of a chunk: its table (kept), then the stored bytes of the part's
        sub-blocks, decoded in the pool; a version-1 chunk whole, the part copied out."""
        lo = k * self.part_bytes
        hi = min(chunk_len, lo + self.part_bytes)

        async def load() -> tuple[Unit, int]:
            loop = asyncio.get_running_loop()
            try:
                fetched, table = await self._table(key, hash16, chunk_len)
                if table is None:
                    stored = await get_bounded(self.store, key, chunk_bytes_max(chunk_len))
                    raw = await loop.run_in_executor(self.executor, _decode_chunk_part, key, stored, hash16,
                                                     chunk_len, lo, hi, chunk_namer_of(self.store))
                    return raw, fetched + len(stored)
                first, last = lo // SUB_BLOCK_BYTES, (hi - 1) // SUB_BLOCK_BYTES
                offset, length = table.span(first, last)
                raw, got = await self._got_and_decoded(key, offset, length,
                                                       lambda stored: table.decode(first, last, stored))
                return raw, fetched + got
            except NotFound as exc:
                raise _unit_failed(key, "chunk", NotFound(f"chunk {key} is missing from {self.store.describe()}")
                                   ) from exc
            except CdpError as exc:
                raise _unit_failed(key, "chunk", exc) from exc
        return load

    async def _got_and_decoded(self, key: str, offset: int, length: int,
                               decode: Callable[[Bytes], Unit]) -> tuple[Unit, int]:
        """(``decode`` of bytes ``[offset, offset + length)`` of ``key``, bytes fetched):
        the GET and the decoding in one job of the pool when the store reads blocking (a
        file store's ``read_blocking``), else the GET and then a job.

        Why one job: every hand-off to a thread and back costs wake-ups and GIL
        transfers; with two per fetch (the store's reader, then the pool), cold random
        4 KiB reads of a mount in process took 2.2-2.6 s of CPU for 3,515 fetches, with
        one 1.5-1.9 s, and went 12-24 % faster."""
        loop = asyncio.get_running_loop()
        if self._read_blocking is not None:
            def job() -> tuple[Unit, int]:
                stored = self._read_blocking(key, offset, length)
                _check_length(key, offset, length, stored)
                return decode(stored), len(stored)
            return await loop.run_in_executor(self.executor, job)
        stored = await self.store.get(key, offset, length)
        _check_length(key, offset, length, stored)
        return await loop.run_in_executor(self.executor, decode, stored), len(stored)

    async def _table(self, key: str, hash16: bytes, chunk_len: int) -> tuple[int, ChunkTable | None]:
        """(bytes fetched for it, the chunk's verified header and table; None for a
        version-1 chunk), from the ones kept or read now (its first
        ``chunk_head_bytes`` bytes: header, table, checked against the manifest)."""
        if hash16 in self._tables:
            self._tables.move_to_end(hash16)
            return 0, self._tables[hash16]
        head = await get_bounded(self.store, key, chunk_bytes_max(chunk_len), 0, chunk_head_bytes(chunk_len))
        table = decode_chunk_head(key, head, hash16, chunk_len)
        self._tables[hash16] = table
        while len(self._tables) > HEADS_KEPT:
            self._tables.popitem(last=False)
        return len(head), table


def _slice(unit: Unit, start: int, length: int) -> bytes | memoryview:
    """Bytes ``[start, start + length)`` of ``unit``: a view when they are at least
    ``1 / SLICE_COPY_BELOW`` of the buffer behind it, else a copy.

    Why: the answer may wait in the NBD server's reply queue (under uvloop the transport
    keeps the object itself) long after the cache dropped its unit, and the server's
    budgets count only the answer's bytes. A 4 KiB view pinned its whole 512 KiB unit: a
    client that sent small READs and read no replies made a mount with ``--cache-mb 32``
    hold 1 GiB. A copy of a small slice costs less than the GET behind it."""
    view = memoryview(unit).cast("B")
    if length * SLICE_COPY_BELOW < _buffer_bytes(view):
        return bytes(view[start : start + length])
    return view[start : start + length]


def _buffer_bytes(view: memoryview) -> int:
    """Bytes of the object ``view`` keeps alive (a unit may itself be a view into a
    larger buffer: a codec-0 block is one into its stored bytes)."""
    owner = view.obj
    try:
        return memoryview(owner).nbytes
    except TypeError:  # an exporter that lends no buffer again: count the view
        return view.nbytes


def _check_length(key: str, offset: int, length: int, stored: Bytes) -> None:
    """A ranged GET gave the whole range (an object shorter than its index says is
    damaged, and named)."""
    if len(stored) != length:
        raise TruncatedError(f"{key}: bytes {offset}..{offset + length}: got {len(stored)} bytes, "
                             f"expected {length}")


def _decode_block(index: SegmentIndex, block: int, stored: bytes) -> Unit:
    """One segment block verified and decompressed (a thread of the pool)."""
    (raw,) = unpack_blocks(index, block, block, stored)
    return raw


def _decode_chunk_part(key: str, stored: bytes, hash16: bytes, chunk_len: int, lo: int, hi: int,
                       namer: Namer = None) -> Unit:
    """Raw bytes ``[lo, hi)`` of a version-1 chunk verified and decoded whole (a thread of
    the pool); a sealed store's is not hashed whole again (its seal binds it to its name,
    FORMAT.md §19.6)."""
    raw = decode_chunk(key, stored, hash16, namer=namer, check_name=namer is None)
    if len(raw) != chunk_len:
        raise FormatError(f"chunk {key}: {len(raw)} bytes, the manifest needs {chunk_len}")
    return bytes(memoryview(raw)[lo:hi])


def _unit_failed(key: str, part: str, exc: CdpError) -> OSError:
    """The read's error for a unit that could not be had: EIO, after a log line that names
    the object and what was wrong."""
    logger.warning("mount_object_failed", object=key, part=part, error=exc.message, kind=type(exc).__name__)
    return OSError(errno.EIO, f"{exc.message}")
