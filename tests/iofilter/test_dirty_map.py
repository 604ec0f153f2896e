"""The filter's dirty-region maps (``cdp.dirtymap``, FORMAT.md §15): after any crash the
map flags every region a write not yet acked touched; a flag is durable before its write
reaches the primary; a clean close leaves a clean map; a damaged map is refused, whole,
saying why, and a filter then treats every region as dirty."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp import durable
from cdp.dirtymap import (
    HEADER_BYTES, DirtyMap, DirtyMapUnusable, read_dirty_map, region_bytes_for, regions_of, sidecar_path,
)
from cdp.records import KIND_WRITE
from iofilter_sim import disks as disks_mod
from iofilter_sim.disks import PrimaryDisk
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import random_writes

SIZES = [8 << 20, 4 << 20]  # 128 and 64 regions of 64 KiB


def open_filter(d: Path, sizes: list[int] = SIZES) -> tuple[DomainFilter, list[PrimaryDisk], list[DirtyMap]]:
    d.mkdir(parents=True, exist_ok=True)
    disks = [PrimaryDisk(d / f"d{i}.img", size) for i, size in enumerate(sizes)]
    maps = [DirtyMap.open(disk.path, disk.size, 7) for disk in disks]
    return DomainFilter(7, disks, dirty_maps=maps), disks, maps


def crash(disks: list[PrimaryDisk], maps: list[DirtyMap]) -> None:
    """The process dies: its descriptors close, nothing else happens."""
    for m in maps:
        os.close(m._fd)
        m._fd = -1
    for disk in disks:
        disk.close()


def touched(records_list: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n_disks: int) -> list[np.ndarray]:
    """Per disk, the regions the (disk, offset, length) batches touch."""
    out = [np.zeros(-(-s // region_bytes_for(s)), dtype=bool) for s in SIZES[:n_disks]]
    for disk, offset, length in records_list:
        for d in range(n_disks):
            sel = disk == d
            out[d][regions_of(offset[sel], length[sel], region_bytes_for(SIZES[d]))[0]] = True
    return out


ops = st.lists(st.tuples(st.sampled_from(["write", "ack", "clear"]), st.integers(0, 2**31)), max_size=25)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
def test_after_a_crash_the_map_flags_every_region_of_a_write_not_acked(tmp_path_factory, ops):
    d = tmp_path_factory.mktemp("m")
    f, disks, maps = open_filter(d)
    written: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # (seqs, disk, offset, length)
    for op, seed in ops:
        rng = np.random.default_rng(seed)
        if op == "write":
            disk, offset, length, kind, payload = random_writes(rng, SIZES, int(rng.integers(1, 40)))
            first = f.next_seq
            f.capture(disk, offset, length, kind, payload)
            written.append((np.arange(first, first + len(disk)), disk, offset, length))
        elif op == "ack" and f.next_seq > 1:
            f.on_ack(int(rng.integers(f.acked_seq, f.next_seq)))
        elif op == "clear":
            f.clear_acked_regions(keep_s=0)
    unacked = [(disk[seqs > f.acked_seq], offset[seqs > f.acked_seq], length[seqs > f.acked_seq])
               for seqs, disk, offset, length in written]
    everything = [(disk, offset, length) for _, disk, offset, length in written]
    crash(disks, maps)
    for i, size in enumerate(SIZES):
        flags, region = read_dirty_map(sidecar_path(d / f"d{i}.img"), size)
        assert region == 64 << 10
        must, may = touched(unacked, len(SIZES))[i], touched(everything, len(SIZES))[i]
        assert not (must & ~flags).any(), f"disk {i}: a region with an unacked write is not flagged"
        assert not (flags & ~may).any(), f"disk {i}: a region never written is flagged"


def test_a_clean_close_leaves_a_clean_map_and_a_crash_leaves_regions_to_resync(tmp_path):
    f, disks, maps = open_filter(tmp_path / "a")
    rng = np.random.default_rng(1)
    f.capture(*random_writes(rng, SIZES, 50))
    f.on_ack(f.next_seq - 1)
    assert f.close_maps() is True
    for disk in disks:
        disk.close()
    for i, size in enumerate(SIZES):
        flags, _ = read_dirty_map(sidecar_path(tmp_path / "a" / f"d{i}.img"), size)
        assert not flags.any()
    f, disks, maps = open_filter(tmp_path / "a")
    assert f.mode == "normal" and f.dirty_bytes() == 0 and maps[0].header.opens == 2

    # A crash with writes not acked: the next filter starts in bitmap mode with exactly
    # those regions, and its resync captures their current content from the primary.
    batch = (np.array([0, 0, 1], dtype=np.uint32), np.array([0, 3 << 20, 1 << 20], dtype=np.uint64),
             np.array([4096, 70 << 10, 512], dtype=np.uint32), np.zeros(3, dtype=np.uint16),
             os.urandom(4096 + (70 << 10) + 512))
    f.capture(*batch)
    crash(disks, maps)
    f, disks, maps = open_filter(tmp_path / "a")
    assert f.mode == "bitmap" and maps[0].left_reason is None
    assert np.flatnonzero(f.dirty[0]).tolist() == [0, 48, 49] and np.flatnonzero(f.dirty[1]).tolist() == [16]
    moved = f.resync_step(connected=True)
    assert moved == 4 * (64 << 10) and f.mode == "normal"  # RESYNC_BEGIN, the regions, RESYNC_END
    records = np.concatenate([fr.records for fr in f.buffer])
    data = records[records["kind"] == KIND_WRITE]
    assert sorted(zip(data["disk"].tolist(), data["offset"].tolist())) == [
        (0, 0), (0, 48 << 16), (0, 49 << 16), (1, 16 << 16)]
    f.on_ack(f.next_seq - 1)
    assert f.close_maps() is True


@pytest.mark.parametrize("mode", ["capture", "capture_async"])
def test_a_flag_is_durable_before_its_write_reaches_the_primary(tmp_path, monkeypatch, mode):
    """``capture_async`` syncs the maps in a worker thread, with acks and clears landing
    meanwhile (a region unflagged then must be flagged and synced again)."""
    events: list[tuple[str, int, int]] = []  # (what, region, disk)
    real_pwrite_all, real_sync = durable.pwrite_all, durable.sync_data
    map_fds: dict[int, int] = {}
    pending: dict[int, set[int]] = {}  # map fd -> flag bytes written and not yet synced

    def pwrite_all(fd, buffers, offset):
        if fd in map_fds and offset >= HEADER_BYTES:
            n = sum(len(memoryview(b).cast("B")) for b in buffers)
            pending.setdefault(fd, set()).update(range(offset - HEADER_BYTES, offset - HEADER_BYTES + n))
        return real_pwrite_all(fd, buffers, offset)

    def sync_data(fd):
        covered = pending.pop(fd, set())  # what was written before the sync began
        real_sync(fd)
        for region in covered:
            events.append(("synced", region, map_fds[fd]))

    def disk_pwrite(self, data, offset):
        d = int(self.path.stem[1:])
        for region in range(offset >> 16, (offset + len(data) - 1 >> 16) + 1):
            events.append(("write", region, d))
        return real_disk_pwrite(self, data, offset)

    real_disk_pwrite = disks_mod.PrimaryDisk._pwrite_all
    monkeypatch.setattr(durable, "pwrite_all", pwrite_all)
    monkeypatch.setattr(durable, "sync_data", sync_data)
    monkeypatch.setattr(disks_mod.PrimaryDisk, "_pwrite_all", disk_pwrite)
    f, disks, maps = open_filter(tmp_path / "o")
    for i, m in enumerate(maps):
        map_fds[m._fd] = i
    rng = np.random.default_rng(5)

    def ack_some() -> None:
        if rng.random() < 0.5:
            f.on_ack(int(rng.integers(f.acked_seq, f.next_seq)))
            f.clear_acked_regions(keep_s=0)

    async def ack_while_syncing() -> None:
        await asyncio.sleep(0)
        ack_some()

    async def drive() -> None:
        for _ in range(30):
            disk, offset, length, kind, payload = random_writes(rng, SIZES, 20)
            kind[:] = KIND_WRITE  # every record a pwrite the order can see
            payload = os.urandom(int(length.sum()))
            if mode == "capture":
                f.capture(disk, offset, length, kind, payload)
                ack_some()
            else:
                acks = asyncio.create_task(ack_while_syncing())
                await f.capture_async(disk, offset, length, kind, payload)
                await acks

    asyncio.run(drive())
    flagged: set[tuple[int, int]] = set()
    writes = 0
    for what, region, d in events:
        if what == "synced":
            flagged.add((d, region))
        else:
            writes += 1
            assert (d, region) in flagged, f"disk {d} region {region} written before its flag was synced"
    assert writes > 100
    # At most one sync a batch for each disk's map (capture_async: one more for regions an
    # ack unflagged during the first).
    assert f.stats["map_syncs"] <= (1 if mode == "capture" else 2) * 30 * len(SIZES)
    f.on_ack(f.next_seq - 1)
    assert f.close_maps()


@pytest.mark.parametrize("damage,why", [
    (lambda raw: raw.__setitem__(0, ord("X")), "magic"),
    (lambda raw: raw.__setitem__(4, 9), "version 9"),
    (lambda raw: raw.__setitem__(20, raw[20] ^ 1), "header checksum"),
    (lambda raw: raw.__setitem__(HEADER_BYTES + 3, 2), "region 3 holds 2"),
    (lambda raw: raw.__setitem__(HEADER_BYTES + 3, 1), "body checksum"),  # a clean map changed
    (lambda raw: raw.extend(b"\0"), "bytes, expected"),
    (lambda raw: raw.__delitem__(slice(100, None)), "shorter than"),
])
def test_a_damaged_map_is_unusable_and_a_filter_then_resyncs_everything(tmp_path, damage, why):
    f, disks, maps = open_filter(tmp_path / "x", [8 << 20])
    f.close_maps()
    disks[0].close()
    path = sidecar_path(tmp_path / "x" / "d0.img")
    raw = bytearray(path.read_bytes())
    damage(raw)
    path.write_bytes(bytes(raw))
    with pytest.raises(DirtyMapUnusable, match=why) as info:
        read_dirty_map(path, 8 << 20)
    assert str(path) in str(info.value)
    f, disks, maps = open_filter(tmp_path / "x", [8 << 20])
    assert why in maps[0].left_reason and maps[0].left.all()
    assert f.mode == "bitmap" and f.dirty_bytes() == 8 << 20
    disks[0].close()


def test_a_map_of_another_disk_size_or_none_at_all_is_unusable(tmp_path):
    f, disks, maps = open_filter(tmp_path / "s", [8 << 20])
    f.close_maps()
    path = sidecar_path(tmp_path / "s" / "d0.img")
    with pytest.raises(DirtyMapUnusable, match="8388608-byte disk .* the disk is 16777216 bytes"):
        read_dirty_map(path, 16 << 20)
    with pytest.raises(DirtyMapUnusable, match="no dirty-region map next to the disk"):
        read_dirty_map(tmp_path / "s" / "nothing.img.dirty", 8 << 20)


def test_regions_of_covers_every_byte_range():
    r = 64 << 10
    offset = np.array([0, r - 512, 5 * r, 7 * r + 4096], dtype=np.uint64)
    length = np.array([512, 1024, 3 * r, 512], dtype=np.uint32)
    idx, count = regions_of(offset, length, r)
    assert idx.tolist() == [0, 0, 1, 5, 6, 7, 7] and count.tolist() == [1, 2, 3, 1]
    idx, count = regions_of(offset[[0, 3]], length[[0, 3]], r)
    assert idx.tolist() == [0, 7] and count is None
    assert region_bytes_for(1 << 40) == 1 << 20 and region_bytes_for(4096) == 64 << 10


def test_a_flag_waits_only_for_its_own_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The NBD capture pipeline flags a batch while an older one syncs: the older batch's
    regions do not wait for the newer set, callers of one set share one sync, and a set
    written after a sync began gets a sync of its own."""
    syncs: list[int] = []
    real_sync = durable.sync_data
    monkeypatch.setattr(durable, "sync_data", lambda fd: (syncs.append(fd), real_sync(fd)))
    m = DirtyMap.open(tmp_path / "d.img", 8 << 20, 1)
    syncs.clear()
    assert m.set_before_write(np.array([1]))  # a new flag: synced here
    assert m.flag(np.array([2, 3]))  # a later batch's, not synced yet
    assert not m.set_before_write(np.array([1]))  # region 1's flag is durable already
    assert len(syncs) == 1
    later = m.pending_set(np.array([2, 3]))
    assert later > m.pending_set(np.array([1]))

    async def main() -> None:
        a, b = await asyncio.gather(m.sync_covering(later), m.sync_covering(later))
        assert (a, b) == (True, False) and len(syncs) == 2  # one sync for both callers
        assert not await m.sync_covering(later)
        m.flag(np.array([4]))
        assert await m.sync_async() and len(syncs) == 3

    asyncio.run(main())
    m.close(clean=False)


def test_a_sync_due_anyway_flags_again_the_regions_cleared_lately(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that must sync a map re-flags the regions a clear unflagged in the last
    ``MAP_REFLAG_S`` (one sync, not one per region a random workload comes back to), and
    no longer once that time has passed since their first clear."""
    from iofilter_sim import filter as filter_mod

    now = [1000.0]
    monkeypatch.setattr(filter_mod.time, "monotonic", lambda: now[0])
    f, disks, maps = open_filter(tmp_path / "r")

    def write(region: int) -> None:
        f.capture(np.array([0], np.uint32), np.array([region << 16], np.uint64), np.array([4096], np.uint32),
                  np.array([KIND_WRITE], np.uint16), os.urandom(4096))
        f.on_ack(f.next_seq - 1)

    write(0)
    f.clear_acked_regions(keep_s=0)
    assert not maps[0].flags[0]
    syncs = f.stats["map_syncs"]
    write(5)  # a new flag: the sync it needs flags region 0 again
    assert maps[0].flags[[0, 5]].all() and f.stats["map_syncs"] == syncs + 1 and f.stats["map_reflagged"] == 1
    now[0] += 1
    f.clear_acked_regions(keep_s=0)
    assert not maps[0].flags[[0, 5]].any()
    now[0] += filter_mod.MAP_REFLAG_S - 0.5  # region 0 was first cleared longer ago than that; 5 not
    write(9)
    assert maps[0].flags[[5, 9]].all() and not maps[0].flags[0]
    f.on_ack(f.next_seq - 1)
    assert f.close_maps()
