"""rocva.mount_source: a base read fetches and decodes only the part of its chunk it
needs, verified; every byte served equals the disk at the point."""

from __future__ import annotations

import contextlib
import errno

import numpy as np
import pytest

from cdp.base_image import SUB_BLOCK_BYTES, decode_chunk_head, encode_chunk_v1
from cdp.layout import chunk_key
from cdp.store.fs import FileStore
from cdp.store.memory import MemoryStore
from cdp.testing.domain import SECTOR, DomainBuilder
from rocva import Target
from rocva import mount_source
from rocva.mount import Mount, MountOptions
from rocva.plan import SRC_ZERO
from tests.rocva.test_fetch import _CountingStore

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 1 * MiB
PART = 256 * KiB
DISK = 6 * MiB


@pytest.fixture
async def domain(monkeypatch: pytest.MonkeyPatch):
    """A 6 MiB disk: a base of 1 MiB chunks (the fourth all zeros), then scattered writes."""
    return await _build(monkeypatch, _CountingStore())


@pytest.fixture
async def file_domain(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """``domain`` in a file store, whose mount reads and decodes a unit in one pool job
    (``FileStore.read_blocking``)."""
    return await _build(monkeypatch, FileStore(tmp_path / "store"))


async def _build(monkeypatch: pytest.MonkeyPatch, store) -> DomainBuilder:
    monkeypatch.setattr(mount_source, "CHUNK_PART_BYTES", PART)
    rng = np.random.default_rng(7)
    b = await DomainBuilder(store, disks=(("vm", "disk0", DISK),), block_raw_size=64 * KiB).start()
    b.model[0][:] = rng.bytes(DISK)
    b.model[0][3 * CHUNK : 4 * CHUNK] = bytes(CHUNK)
    await b.add_base(0, chunk_size=CHUNK)
    for _ in range(40):
        length = int(rng.integers(1, 32)) * SECTOR
        b.write(0, int(rng.integers(0, (DISK - length) // SECTOR)) * SECTOR, rng.bytes(length))
    b.zero(0, 5 * CHUNK + 3 * SECTOR, 40 * SECTOR)  # a ZERO extent too
    await b.seal()
    return b


@contextlib.asynccontextmanager
async def _mounted(b: DomainBuilder):
    """(the mount of the latest point, its one disk), closed after."""
    mount = await Mount.open(b.store, MountOptions(b.domain, Target.latest()))
    try:
        yield mount, next(iter(mount.disks.values()))
    finally:
        await mount.close()


async def _reads_right(b: DomainBuilder, disk, offset: int, length: int) -> None:
    """``length`` bytes read at ``offset`` are the disk's at the point."""
    assert bytes(await disk.read(offset, length)) == bytes(b.model[0][offset : offset + length])


async def _base_chunks(b: DomainBuilder) -> list[tuple[str, bytes]]:
    """(key, object) of every stored chunk."""
    return [(k, await MemoryStore.get(b.store, k)) for k in sorted(b.chunk_keys)]


async def test_random_reads_equal_the_disk_at_the_point(domain):
    b = domain
    async with _mounted(b) as (mount, disk):
        rng = np.random.default_rng(1)
        for _ in range(60):
            length = int(rng.integers(1, 3 * PART))
            offset = int(rng.integers(0, DISK - length))
            await _reads_right(b, disk, offset, length)
        await _reads_right(b, disk, 0, DISK)


async def test_a_base_read_fetches_the_chunks_table_and_one_part_only(domain):
    b = domain
    async with _mounted(b) as (mount, disk):
        key = chunk_key(mount.plan.disks[0].manifest.hash_of(4))
        size = len(await MemoryStore.get(b.store, key))
        b.store.read_bytes, b.store.gets = 0, []
        offset = 4 * CHUNK + 3 * PART  # the fifth chunk's last part, whole
        await _reads_right(b, disk, offset, PART)
        assert any(k == key for k, _, _ in b.store.gets)
        assert b.store.read_bytes < size // 2  # its table and one part (and maybe a segment block)
        offset = 4 * CHUNK + PART
        await _reads_right(b, disk, offset, PART)
        heads = [g for g in b.store.gets if g[0] == key and g[1] == 0]
        assert len(heads) == 1, b.store.gets  # the table is read once, then kept


async def test_a_changed_byte_fails_the_reads_of_its_part_only(domain):
    b = domain
    async with _mounted(b) as (mount, disk):
        key = chunk_key(mount.plan.disks[0].manifest.hash_of(5))
        obj = await MemoryStore.get(b.store, key)
        table = decode_chunk_head(key, obj, None)
        bad = bytearray(obj)
        bad[int(table.entries["stored_offset"][PART // SUB_BLOCK_BYTES]) + 5] ^= 1  # in its second part
        await MemoryStore.put(b.store, key, bytes(bad))
        first = 5 * CHUNK
        await _reads_right(b, disk, first, PART)
        with pytest.raises(OSError) as failed:
            await disk.read(first + PART, PART)
        assert failed.value.errno == errno.EIO and "stored_xxh3" in str(failed.value)
        third = first + 2 * PART
        await _reads_right(b, disk, third, PART)


async def test_a_version_1_chunk_is_read_whole_and_its_part_served(domain):
    b = domain
    for key, obj in await _base_chunks(b):
        table = decode_chunk_head(key, obj, None)
        raw = table.decode(0, table.block_count - 1, obj[table.stored_start :])
        h, v1 = encode_chunk_v1(bytes(raw))
        assert chunk_key(h) == key
        await MemoryStore.put(b.store, key, v1)
    async with _mounted(b) as (mount, disk):
        await _reads_right(b, disk, 0, DISK)
        offset = 5 * CHUNK + 2 * PART + 100
        await _reads_right(b, disk, offset, 5000)


async def test_a_range_inside_one_extent_is_cut_as_the_general_path_cuts_it(domain):
    """``_pieces_in_extent`` (plain integers, most small reads) gives exactly the pieces
    the numpy path over extents gives, for ranges inside every kind of extent."""
    b = domain
    async with _mounted(b) as (mount, disk):
        source = disk.lower
        rng = np.random.default_rng(5)
        kinds_seen = set()
        for i in range(len(source.starts)):
            start, end = int(source.starts[i]), int(source.ends[i])
            for _ in range(6):
                offset = int(rng.integers(start, end))
                length = int(rng.integers(1, end - offset + 1))
                fast = source._pieces_in_extent(i, offset, length)
                slow = source._pieces_of_extents(i, offset, length)
                assert fast[0] == slow[0] and fast[2:] == slow[2:], (i, offset, length)
                assert source._pieces(offset, length)[0] == fast[0]
            kinds_seen.add(int(source.kinds[i]))
        assert kinds_seen == {mount_source.SRC_WRITE, mount_source.SRC_BASE, SRC_ZERO}, kinds_seen


async def test_a_file_store_mount_reads_in_one_job_and_still_checks_everything(file_domain, monkeypatch):
    """From a file store each unit is read and decoded in one pool job; what it serves is
    the disk, a changed byte fails its part's reads with EIO, a cut segment fails its
    blocks' reads naming what is missing."""
    b = file_domain
    blocking = []
    real = FileStore.read_blocking
    monkeypatch.setattr(FileStore, "read_blocking", lambda self, *a: blocking.append(a) or real(self, *a))
    async with _mounted(b) as (mount, disk):
        await _reads_right(b, disk, 0, DISK)
        assert blocking and all(len(a) == 3 for a in blocking)
    root = b.store.root
    key = chunk_key(mount.plan.disks[0].manifest.hash_of(5))
    obj = (root / key).read_bytes()
    table = decode_chunk_head(key, obj, None)
    bad = bytearray(obj)
    bad[int(table.entries["stored_offset"][PART // SUB_BLOCK_BYTES]) + 5] ^= 1
    (root / key).write_bytes(bytes(bad))
    async with _mounted(b) as (mount, disk):
        await _reads_right(b, disk, 5 * CHUNK, PART)
        with pytest.raises(OSError) as failed:
            await disk.read(5 * CHUNK + PART, PART)
        assert failed.value.errno == errno.EIO and "stored_xxh3" in str(failed.value)
        # Cut in its first block after the mount read its index: that block's reads fail.
        source = disk.lower
        w = int(np.flatnonzero(source.kinds == mount_source.SRC_WRITE)[0])
        index = source.segments[int(source.segs[w])]
        first = int(source.poss[w]) // index.block_raw_size
        path = root / index.key
        path.write_bytes(path.read_bytes()[: int(index.blocks["stored_offset"][first]) + 10])
        with pytest.raises(OSError) as failed:
            await disk.read(int(source.starts[w]), SECTOR)
        assert failed.value.errno == errno.EIO and "got 10 bytes, expected" in str(failed.value), failed.value
