"""rocva.fetch's writers: block-by-block placement, zero pages, region and early write-out,
base chunks decoded only where their pieces are."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cdp import durable
from cdp.base_image import SUB_BLOCK_BYTES, decode_chunk_head, encode_chunk, encode_chunk_v1
from cdp.errors import ChecksumMismatch, FormatError
from cdp.layout import chunk_key
from cdp.segment import fetch_blocks, read_blocks
from cdp.store.memory import MemoryStore
from cdp.testing.domain import SECTOR, DomainBuilder
from rocva import Target, fetch, image_writes, plan_recovery
from rocva.fetch import Fetcher, _place_run, _sub_block_runs
from rocva.image_writes import Writeback, pwrite_sparse, region_parts, write_piece, zero_pages_before
from rocva.work_units import PAGE, ChunkCopy, SegmentRun, base_groups, segment_groups

KiB = 1 << 10


def _extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The data extents of a file (SEEK_DATA/SEEK_HOLE): where its non-hole pages are."""
    out, at = [], 0
    while at < size:
        try:
            start = os.lseek(fd, at, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after ``at``
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        at = end
    return out


def _payload(rng: np.random.Generator, offset: int, length: int) -> bytes:
    """Random bytes with some whole file pages zeroed and one page zeroed but one byte."""
    buf = bytearray(rng.bytes(length))
    first = -(-offset // PAGE) * PAGE
    for page in range(first, offset + length - PAGE + 1, PAGE):
        roll = rng.random()
        if roll < 0.35:
            buf[page - offset : page - offset + PAGE] = bytes(PAGE)
        elif roll < 0.45:
            buf[page - offset : page - offset + PAGE] = bytes(PAGE)
            buf[page - offset + int(rng.integers(0, PAGE))] = 1
    return bytes(buf)


@pytest.mark.parametrize("seed", range(6))
async def test_block_by_block_writes_what_the_joined_run_writes(tmp_path: Path, seed: int, monkeypatch) -> None:
    """Pieces cross 4 KiB blocks (decoded alone, by 3, or all of a run together) at sector
    (not page) offsets, with zero pages on the boundaries: the bytes and the holes are
    those of writing each piece whole."""
    monkeypatch.setattr(fetch, "DECODE_GROUP_BYTES", [4 * KiB, 12 * KiB, 1 << 20][(seed + 1) % 3])
    rng = np.random.default_rng(seed)
    size = 512 * KiB
    b = await DomainBuilder(MemoryStore(), disks=(("vm", "d", size),), block_raw_size=4 * KiB).start()
    for _ in range(3):
        for _ in range(40):
            length = int(rng.integers(1, 48)) * SECTOR
            offset = int(rng.integers(0, (size - length) // SECTOR + 1)) * SECTOR
            b.write(0, offset, _payload(rng, offset, length))
        # A sequential stream: its writes coalesce into one piece longer than a run.
        offset = int(rng.integers(0, size // 2 // SECTOR)) * SECTOR
        for _ in range(12):
            length = int(rng.integers(8, 24)) * SECTOR
            b.write(0, offset, _payload(rng, offset, length))
            offset += length
        await b.seal()
    plan = await plan_recovery(b.store, b.domain, Target.latest())
    cap = int(rng.choice([8, 16, 64])) * KiB
    gap = [0, 8 * KiB, 1 << 20][seed % 3]  # runs read through gaps of unneeded blocks, or not
    runs = [u for _, _, units in segment_groups(plan, run_bytes_max=cap, gap_bytes_max=gap) for u in units]
    assert any(u.last_block > u.first_block for u in runs)
    assert sum(u.nbytes for u in runs) == sum(d.bytes_of(0) for d in plan.disks)  # WRITE bytes, once
    for u in runs:  # a run stays below 2 × run_bytes_max plus a block, sequential writes or not
        assert (u.last_block - u.first_block + 1) * 4 * KiB <= 2 * cap + 4 * KiB
        assert (u.length <= cap).all()
    paths = [tmp_path / "blocks.img", tmp_path / "joined.img"]
    fds = [os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC) for p in paths]
    try:
        for fd in fds:
            os.ftruncate(fd, size)
        for unit in runs:
            assert isinstance(unit, SegmentRun)
            _place_run([fds[0]], unit, await fetch_blocks(b.store, unit.index, unit.first_block, unit.last_block))
            raw = memoryview(await read_blocks(b.store, unit.index, unit.first_block, unit.last_block))
            for o, a, n in zip(unit.offset.tolist(), unit.start.tolist(), unit.length.tolist()):
                pwrite_sparse(fds[1], raw[a : a + n], o)
        assert os.pread(fds[0], size, 0) == os.pread(fds[1], size, 0)
        assert _extents(fds[0], size) == _extents(fds[1], size)
    finally:
        for fd in fds:
            os.close(fd)


async def test_runs_read_through_short_gaps_and_never_decode_the_gap(tmp_path: Path) -> None:
    """Writes in 4 KiB blocks 0, 2 and 6 of a segment: a gap of one block is read
    through (one GET) and a gap of three is cut at, for a gap_bytes_max of 8 KiB; the
    block read only to join the run is not decoded (garbage there is not noticed),
    while garbage in a block a piece lies in is."""
    b = await DomainBuilder(MemoryStore(), disks=(("vm", "d", 64 * KiB),), block_raw_size=4 * KiB).start()
    rng = np.random.default_rng(3)
    for block in range(7):  # every block of the payload stream holds one 4 KiB write ...
        b.write(0, block * 4 * KiB, rng.bytes(4 * KiB))
    await b.seal()
    for block in (1, 3, 4, 5):  # ... and these are overwritten by the next segment: dead
        b.write(0, block * 4 * KiB, rng.bytes(4 * KiB))
    await b.seal()
    want = bytes(b.model[0])
    plan = await plan_recovery(b.store, b.domain, Target.latest())
    first = plan.segments[0]
    cut = {gap: [(u.first_block, u.last_block) for name, _, units in segment_groups(plan, gap_bytes_max=gap)
                 if name == f"seg:{first.key}" for u in units] for gap in (0, 8 * KiB, 16 * KiB)}
    assert cut == {0: [(0, 0), (2, 2), (6, 6)], 8 * KiB: [(0, 2), (6, 6)], 16 * KiB: [(0, 6)]}
    run = next(u for _, _, units in segment_groups(plan, gap_bytes_max=16 * KiB) for u in units if u.index is first)
    stored = bytearray(await fetch_blocks(b.store, first, run.first_block, run.last_block))
    rows = first.blocks
    base = int(rows["stored_offset"][0])
    path = tmp_path / "d.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        os.ftruncate(fd, 64 * KiB)
        for dead in (1, 4):  # garbage in blocks the run only reads through
            at = int(rows["stored_offset"][dead]) - base
            stored[at : at + int(rows["stored_len"][dead])] = bytes(int(rows["stored_len"][dead]))
        _place_run([fd], run, bytes(stored))
        for block in (0, 2, 6):
            assert os.pread(fd, 4 * KiB, block * 4 * KiB) == want[block * 4 * KiB : (block + 1) * 4 * KiB]
        at = int(rows["stored_offset"][2]) - base
        stored[at] ^= 0xFF  # and in a block it needs
        with pytest.raises(ChecksumMismatch, match="block 2"):
            _place_run([fd], run, bytes(stored))
    finally:
        os.close(fd)


def test_write_piece_equals_pwrite_sparse(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    buf = bytearray(rng.bytes(64 * KiB))
    for page in rng.choice(16, 6, replace=False).tolist():
        buf[page * PAGE : (page + 1) * PAGE] = bytes(PAGE)
    mv = memoryview(bytes(buf))
    zeros = zero_pages_before(mv)
    assert zeros[-1] == 6
    size = 8 << 20
    paths = [tmp_path / "a.img", tmp_path / "b.img"]
    fds = [os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC) for p in paths]
    try:
        for fd in fds:
            os.ftruncate(fd, size)
        at = 0
        for _ in range(60):
            x0 = int(rng.integers(0, len(mv) // SECTOR)) * SECTOR
            x1 = int(rng.integers(x0 // SECTOR + 1, len(mv) // SECTOR + 1)) * SECTOR
            aligned = rng.random() < 0.5  # same page grid as the buffer, or shifted by sectors
            offset = at + (x0 % PAGE if aligned else int(rng.integers(1, 8)) * SECTOR)
            write_piece(fds[0], mv, x0, x1, offset, zeros)
            pwrite_sparse(fds[1], mv[x0:x1], offset)
            at = -(-(offset + x1 - x0) // PAGE) * PAGE + PAGE
        assert at < size
        assert os.pread(fds[0], size, 0) == os.pread(fds[1], size, 0)
        assert _extents(fds[0], size) == _extents(fds[1], size)
    finally:
        for fd in fds:
            os.close(fd)


def test_region_parts_count_every_byte_once() -> None:
    rng = np.random.default_rng(8)
    region, count = 64 * KiB, 40
    size = region * count
    long_from = size - 3 * region - 5 * SECTOR  # one piece crossing three region boundaries
    cuts = np.sort(rng.choice(long_from // SECTOR, 300, replace=False)) * SECTOR
    starts = np.append(cuts, long_from)
    ends = np.append(starts[1:], size - 7 * SECTOR)
    keep = rng.random(len(starts)) < 0.7
    keep[-1] = True
    offset, length = starts[keep], (ends - starts)[keep]
    regions, nbytes = region_parts(offset, length, region)
    assert (nbytes > 0).all() and len(regions) == int(((offset + length - 1) // region - offset // region + 1).sum())
    got = np.zeros(count, dtype=np.int64)
    np.add.at(got, regions, nbytes)
    covered = np.zeros(size, dtype=bool)
    for o, n in zip(offset.tolist(), length.tolist()):
        covered[o : o + n] = True
    assert got.tolist() == covered.reshape(count, region).sum(axis=1).tolist()
    empty = region_parts(offset[:0], length[:0], region)
    assert len(empty[0]) == len(empty[1]) == 0


async def test_writeback_starts_each_region_once_when_complete(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    size = 1 << 20
    b = await DomainBuilder(MemoryStore(), disks=(("vm", "a", size), ("vm", "b", size // 2)),
                            block_raw_size=8 * KiB).start()
    b.model[0][:] = rng.bytes(size)
    await b.add_base(0, chunk_size=64 * KiB)
    for _ in range(120):
        disk = int(rng.integers(0, 2))
        length = int(rng.integers(1, 64)) * SECTOR
        offset = int(rng.integers(0, (b.disks[disk]["size"] - length) // SECTOR + 1)) * SECTOR
        b.write(disk, offset, rng.bytes(length))
    await b.seal()
    plan = await plan_recovery(b.store, b.domain, Target.latest())
    started: list[tuple[int, int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: started.append((fd, off, n)))
    region = 128 * KiB
    wb = Writeback(plan, [100, 101], region)
    planned = [left.copy() for left in wb.left]
    units = [u for _, _, us in segment_groups(plan) for u in us] + [u for _, _, us in base_groups(plan) for u in us]
    for unit in units:
        wb.written(unit)
        assert all((left >= 0).all() for left in wb.left)
    wb.close()
    assert all((left == 0).all() for left in wb.left)
    expected = {(100 + k, r * region, region) for k in range(2) for r in np.flatnonzero(planned[k]).tolist()}
    assert sorted(started) == sorted(expected)  # each region with planned bytes, once


class _CountingStore(MemoryStore):
    """A memory store that counts the bytes its gets return and records each get."""

    def __init__(self) -> None:
        super().__init__()
        self.read_bytes = 0
        self.gets: list[tuple[str, int, int | None]] = []

    async def get(self, key: str, offset: int = 0, length: int | None = None, *,
                  max_bytes: int | None = None) -> bytes:
        data = await super().get(key, offset, length, max_bytes=max_bytes)
        self.read_bytes += len(data)
        self.gets.append((key, offset, length))
        return data


@pytest.mark.parametrize("version", [1, 2])
async def test_a_partial_chunk_read_places_what_a_whole_read_does(tmp_path: Path, version: int) -> None:
    """A ChunkCopy with ``partial`` fetches the head and the runs of sub-blocks its pieces
    need (a version-1 chunk: the whole object), and writes and digests exactly as a whole
    read does; dense (``sparse=False``) writes put zero pages over old content."""
    rng = np.random.default_rng(version)
    size = 16 * SUB_BLOCK_BYTES + 3000
    raw = bytearray(rng.bytes(size))
    raw[3 * SUB_BLOCK_BYTES : 3 * SUB_BLOCK_BYTES + 2 * PAGE] = bytes(2 * PAGE)  # zero pages in a piece
    h, obj = (encode_chunk if version == 2 else encode_chunk_v1)(bytes(raw))
    store = _CountingStore()
    await store.put(chunk_key(h), obj)
    start = np.array([100, 3 * SUB_BLOCK_BYTES - 5, 4 * SUB_BLOCK_BYTES + 7, 15 * SUB_BLOCK_BYTES + 11], np.int64)
    length = np.array([200, 3 * PAGE, 9, size - 15 * SUB_BLOCK_BYTES - 11], np.int64)
    assert [(a, b) for a, b in _sub_block_runs(ChunkCopy("k", h, size, start, start, start, length, 0))] == [
        (0, 0), (2, 4), (15, 16)]
    digests, files = [], []
    for partial in (False, True):
        path = tmp_path / f"{partial}.img"
        path.write_bytes(b"\xee" * size)  # old content everywhere
        fd = os.open(path, os.O_RDWR)
        try:
            unit = ChunkCopy(chunk_key(h), h, size, np.zeros(4, np.int64), start, start, length,
                             int(length.sum()), partial)
            store.read_bytes = 0
            with ThreadPoolExecutor(1) as pool:
                digests.append(await Fetcher(store, [fd], pool, sparse=False).run(unit))
        finally:
            os.close(fd)
        files.append(path.read_bytes())
        if partial and version == 2:
            assert store.read_bytes < len(obj) // 3
        else:
            assert store.read_bytes == len(obj)
    assert digests[0] == digests[1] and files[0] == files[1]
    want = bytearray(b"\xee" * size)
    for a, n in zip(start.tolist(), length.tolist()):
        want[a : a + n] = raw[a : a + n]
    assert files[0] == bytes(want)


async def test_early_writeout_starts_every_images_writeout_as_units_land(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``EARLY_WRITEOUT_BYTES`` placed, the write-out of every image is started (no
    region need be complete), one at a time; below it, none."""
    rng = np.random.default_rng(5)
    size = 1 << 20
    b = await DomainBuilder(MemoryStore(), disks=(("vm", "a", size), ("vm", "b", size // 2)),
                            block_raw_size=8 * KiB).start()
    for k in range(200):
        disk = int(rng.integers(0, 2))
        length = int(rng.integers(1, 64)) * SECTOR
        offset = int(rng.integers(0, (b.disks[disk]["size"] - length) // SECTOR + 1)) * SECTOR
        b.write(disk, offset, rng.bytes(length))
        if k % 20 == 19:
            await b.seal()  # one segment, one run at least, per 20 writes
    plan = await plan_recovery(b.store, b.domain, Target.latest())
    units = [u for _, _, us in segment_groups(plan) for u in us]
    assert len(units) >= 10
    total = sum(u.nbytes for u in units)
    started: list[int] = []
    monkeypatch.setattr(durable, "start_writeout", lambda fd: started.append(fd) or True)
    monkeypatch.setattr(os, "posix_fadvise", lambda *args: None)
    monkeypatch.setattr(image_writes, "EARLY_WRITEOUT_BYTES", total + 1)
    wb = Writeback(plan, [100, 101])
    for unit in units:
        wb.written(unit)
    wb.close()
    assert started == []  # fewer bytes placed than the step
    step = max(1, total // 8)
    monkeypatch.setattr(image_writes, "EARLY_WRITEOUT_BYTES", step)
    wb = Writeback(plan, [100, 101])
    for unit in units:
        wb.written(unit)
        wb._early is None or wb._early.result()  # let each finish: the count is then exact
    wb.close()
    steps, placed = 0, 0
    for unit in units:
        placed += unit.nbytes
        if placed >= step:
            steps, placed = steps + 1, 0
    assert steps >= 2 and started == [100, 101] * steps


def test_start_writeout_is_a_hint_on_a_real_file(tmp_path: Path) -> None:
    """On Linux it starts the write-out (true) and changes no byte; a bad fd is false."""
    path = tmp_path / "f"
    data = os.urandom(3 << 20)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, data, 4096)
        assert durable.start_writeout(fd) is (durable._sync_file_range is not None)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(4096) + data
    assert durable.start_writeout(fd) is False  # closed


async def test_a_whole_chunk_is_verified_and_decoded_only_where_its_pieces_are(tmp_path: Path) -> None:
    """A full recovery's whole chunk (version 2): a changed byte in a sub-block no piece
    uses does not stop it, one in a used sub-block is found and names the chunk; a chunk
    whose header names another (swapped objects) is refused."""
    rng = np.random.default_rng(11)
    size = 8 * SUB_BLOCK_BYTES
    raw = rng.bytes(size)
    h, obj = encode_chunk(raw)
    table = decode_chunk_head("k", obj, h, size)
    start = np.array([SUB_BLOCK_BYTES + 10, 5 * SUB_BLOCK_BYTES], np.int64)  # sub-blocks 1 and 5
    length = np.array([100, SUB_BLOCK_BYTES], np.int64)

    async def place(stored: bytes, key_hash: bytes = h) -> bytes:
        store = MemoryStore()
        await store.put(chunk_key(key_hash), stored)
        path = tmp_path / "img"
        path.write_bytes(bytes(size))
        fd = os.open(path, os.O_RDWR)
        try:
            unit = ChunkCopy(chunk_key(key_hash), key_hash, size, np.zeros(2, np.int64), start, start, length,
                             int(length.sum()))
            with ThreadPoolExecutor(1) as pool:
                await Fetcher(store, [fd], pool).run(unit)
        finally:
            os.close(fd)
        return path.read_bytes()

    def changed(sub_block: int) -> bytes:
        at = int(table.entries["stored_offset"][sub_block]) + 7
        out = bytearray(obj)
        out[at] ^= 0x20
        return bytes(out)

    want = bytearray(size)
    for a, n in zip(start.tolist(), length.tolist()):
        want[a : a + n] = raw[a : a + n]
    assert await place(obj) == bytes(want)
    assert await place(changed(3)) == bytes(want)  # no piece in sub-block 3
    for used in (1, 5):
        with pytest.raises(ChecksumMismatch, match=rf"chunk {chunk_key(h)}.*sub-block"):
            await place(changed(used))
    other, other_obj = encode_chunk(rng.bytes(size))
    with pytest.raises(FormatError, match="raw_xxh3_128 .* is not the expected"):
        store = MemoryStore()
        await store.put(chunk_key(h), other_obj)
        unit = ChunkCopy(chunk_key(h), h, size, np.zeros(2, np.int64), start, start, length, int(length.sum()))
        with ThreadPoolExecutor(1) as pool:
            fd = os.open(tmp_path / "img", os.O_RDWR)
            try:
                await Fetcher(store, [fd], pool).run(unit)
            finally:
                os.close(fd)
