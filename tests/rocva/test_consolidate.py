"""Consolidation and retention (rocva.consolidate, rocva.retention) and the store locks they
rely on: after each job every point inside the window recovers byte-exact to the model,
points outside it are refused, and what the catalog no longer needs is gone."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from cdp.catalog import load_catalog
from cdp.errors import Busy
from cdp.layout import base_prefix, segment_prefix
from cdp.locks import chunk_writer_lease, gc_lock, maintenance_lock, recovery_lease
from cdp.store.faulty import FaultyStore
from cdp.store.fs import FileStore
from cdp.store.memory import MemoryStore
from cdp.testing.domain import SECTOR, DomainBuilder
from rocva import OutsideRetention, RecoverOptions, recover, recoverable_ranges
from rocva.consolidate import consolidate
from rocva.plan import load_state
from rocva.retention import sweep_chunks
from rocva.verify import verify
from tests.conftest import make_azure_store, make_s3_store, unique_name
from tests.rocva.build import seed_initial
from tests.waiting import EVENTUALLY_S, wait_until

KiB = 1 << 10
S = 1_000_000_000  # ns


async def workload(b: DomainBuilder, rng: np.random.Generator, ops: int, shas: dict[int, list[str]],
                   disks: int | None = None) -> None:
    """Random writes/zeros/marks on the first ``disks`` disks (default all); ``shas[seq]`` =
    the model after each record."""
    for _ in range(ops):
        disk = int(rng.integers(0, disks or len(b.disks)))
        size = b.disks[disk]["size"]
        sectors = int(rng.integers(1, 65))
        offset = int(rng.integers(0, size // SECTOR - sectors + 1)) * SECTOR
        roll = rng.random()
        if roll < 0.05:
            b.mark(f"m{b.seq + 1}")
        elif roll < 0.15:
            b.zero(disk, offset, sectors * SECTOR)
        else:
            b.write(disk, offset, rng.bytes(sectors * SECTOR))
        shas[b.seq] = b.snapshot()
        if rng.random() < 0.12:
            await b.seal()
    await b.seal()


async def recovered(b: DomainBuilder, seq: int, work: Path) -> list[str]:
    out = Path(tempfile.mkdtemp(dir=work))
    result = await recover(b.store, b.domain, RecoverOptions(seq, out, checksum=True))
    return [im["sha256"] for im in result["images"]]


async def keys(store, prefix: str) -> set[str]:
    return {i.key async for i in store.list(prefix)}


@pytest.mark.parametrize("backend", ["memory", "file"])
async def test_every_point_in_the_window_survives_consolidation_and_retention(tmp_path: Path, backend: str) -> None:
    store = MemoryStore() if backend == "memory" else FileStore(tmp_path / "store")
    await window_survives(store, tmp_path)


async def test_consolidation_and_retention_on_s3(moto_server, tmp_path: Path) -> None:
    store = make_s3_store(moto_server, unique_name())
    try:
        await store.create_bucket()
        await window_survives(store, tmp_path)
    finally:
        await store.close()


async def test_consolidation_and_retention_on_azure(azurite, tmp_path: Path) -> None:
    store = make_azure_store(azurite, unique_name())
    try:
        await store.create_container()
        await window_survives(store, tmp_path)
    finally:
        await store.close()


async def window_survives(store, tmp_path: Path) -> None:
    """Two rounds of consolidation, the second with retention: every point from the new
    horizon recovers to the model, points before it are refused, the store holds what the
    catalog names and nothing else, deep verify is clean."""
    rng = np.random.default_rng(5)
    b = await DomainBuilder(store, disks=(("db", "data", 512 * KiB), ("db", "log", 256 * KiB),
                                          ("db", "spare", 256 * KiB)), ns_per_seq=S).start()
    await seed_initial(b, 0, rng)
    shas: dict[int, list[str]] = {0: b.snapshot()}
    await workload(b, rng, 120, shas, disks=2)
    first_segments = await keys(store, segment_prefix(b.domain))
    # Round 1: consolidate what is older than 20 s; no retention yet.
    r1 = await consolidate(store, b.domain, older_than_s=20, now_ns=b.ts(b.seq), scratch_dir=tmp_path)
    base1 = r1["consolidated_seq"]
    assert base1 is not None and b.ts(base1) <= b.ts(b.seq) - 20 * S
    assert r1["bases_added"] == 3 and r1["horizon_seq"] == 0 and r1["segments_removed"] == 0
    assert r1["chunks"]["zero_chunks"] == 1  # the spare disk is empty: its chunk is not stored
    for seq in (0, base1 - 1, base1, base1 + 1, b.seq):  # nothing was lost
        assert await recovered(b, seq, tmp_path) == shas[seq], seq
    await workload(b, rng, 120, shas, disks=2)
    # Round 2: retention of 30 s at the end: base1 is older than the window, so it becomes
    # the horizon; everything before it goes.
    now = b.ts(b.seq)
    assert b.ts(base1) < now - 30 * S
    r2 = await consolidate(store, b.domain, older_than_s=10, retention_s=30, now_ns=now, scratch_dir=tmp_path)
    assert r2["horizon_seq"] == base1 and r2["segments_removed"] > 0 and r2["bases_removed"] == 1
    assert r2["sweep"]["deferred"] == 0 and r2["chunk_sweep"]["chunks_deleted"] > 0
    state = await load_state(store, b.domain)
    assert recoverable_ranges(state)[0][0] == base1
    assert {(x["seq"]) for x in state.bases} == {base1, r2["consolidated_seq"]}
    # Every point from the horizon on (marks, both ends, the new base, a sample) is exact.
    window = [s for s in shas if s >= base1]
    marks = [m["seq"] for m in state.marks]
    assert marks and min(marks) >= base1
    sample = sorted({base1, r2["consolidated_seq"], b.seq, *marks, *rng.choice(window, 8).tolist()})
    for seq in sample:
        assert await recovered(b, seq, tmp_path) == shas[seq], seq
    for seq in (0, base1 - 1):  # before the horizon: a clear refusal naming the nearest point
        with pytest.raises(OutsideRetention, match=f"nearest consistent point: seq {base1}"):
            await recover(store, b.domain, RecoverOptions(seq, tmp_path / f"x{seq}"))
    # The store holds what the catalog names, and no more.
    remaining = await keys(store, segment_prefix(b.domain))
    assert remaining == set(state.segment_keys(await state.rows_between(1, state.committed_seq)))
    assert first_segments - remaining  # the oldest segments are gone from the store
    assert await keys(store, base_prefix(b.domain)) == {x["key"] for x in state.bases}
    report = await verify(store, b.domain, deep=True)
    assert report["ok"], report["problems"]
    # A third run with nothing new to do changes nothing.
    r3 = await consolidate(store, b.domain, older_than_s=10, retention_s=30, now_ns=now, scratch_dir=tmp_path)
    assert r3["generation"] is None and r3["consolidated_seq"] is None


async def test_identical_chunks_are_stored_once(tmp_path: Path) -> None:
    store = MemoryStore()
    b = await DomainBuilder(store, disks=(("a", "d", 512 * KiB), ("b", "d", 512 * KiB)), ns_per_seq=S).start()
    block = np.random.default_rng(1).bytes(128 * KiB)
    for disk in (0, 1):
        for off in range(0, 512 * KiB, 128 * KiB):
            b.write(disk, off, block)
    await b.seal()
    first_end = b.seq
    for _ in range(4):  # later records, so the first segment is older than the cutoff
        b.mark("later")
    await b.seal()
    r = await consolidate(store, b.domain, older_than_s=0.5, now_ns=b.ts(b.seq), chunk_size=64 * KiB,
                          scratch_dir=tmp_path)
    assert r["consolidated_seq"] == first_end
    c = r["chunks"]
    assert c["chunks"] == 16 and c["chunks_stored"] == 2 and c["chunks_deduplicated"] == 14, c
    assert len(await keys(store, "c/")) == 2


async def test_a_recovery_lease_defers_deletion(tmp_path: Path) -> None:
    store = MemoryStore()
    rng = np.random.default_rng(9)
    b = await DomainBuilder(store, disks=(("vm", "d", 256 * KiB),), ns_per_seq=S).start()
    shas: dict[int, list[str]] = {}
    await workload(b, rng, 80, shas)
    await consolidate(store, b.domain, older_than_s=5, now_ns=b.ts(b.seq), scratch_dir=tmp_path)
    await workload(b, rng, 40, shas)
    before = await keys(store, segment_prefix(b.domain))
    lease = await recovery_lease(store, b.domain, owner="test recovery")
    try:
        r = await consolidate(store, b.domain, older_than_s=5, retention_s=10, now_ns=b.ts(b.seq),
                              scratch_dir=tmp_path)
        assert r["segments_removed"] > 0 and r["sweep"]["deferred"] > 0
        assert "test recovery" in r["sweep"]["deferred_by"]
        assert await keys(store, segment_prefix(b.domain)) == before  # a recovery may read them
    finally:
        await lease.release()
    r = await consolidate(store, b.domain, older_than_s=5, retention_s=10, now_ns=b.ts(b.seq),
                          scratch_dir=tmp_path)
    assert r["sweep"]["deferred"] == 0 and r["sweep"]["segments_deleted"] > 0
    state = await load_state(store, b.domain)
    assert await keys(store, segment_prefix(b.domain)) == set(state.segment_keys(await state.rows_between(1, state.committed_seq)))


# How long a chunk writer waits for a sweep that is not going to end: the Busy is the point.
SWEEP_WAIT_S = 0.2


async def test_locks_exclude_each_other() -> None:
    store = FaultyStore(MemoryStore())  # no fault: it counts the calls
    m = await maintenance_lock(store, 7, owner="job one")
    with pytest.raises(Busy, match="job one"):
        await maintenance_lock(store, 7, owner="job two")
    await maintenance_lock(store, 8, owner="other domain")  # per domain
    await m.release()
    (await maintenance_lock(store, 7, owner="job two"))  # free again
    # A chunk writer keeps the sweep away; a sweep makes writers wait.
    w = await chunk_writer_lease(store, owner="seeder")
    with pytest.raises(Busy, match="seeder"):
        await gc_lock(store, owner="sweep")
    await w.release()
    g = await gc_lock(store, owner="sweep")
    with pytest.raises(Busy, match="sweep"):
        await chunk_writer_lease(store, owner="seeder", wait_s=SWEEP_WAIT_S)
    withdrawn = store.calls["delete"]
    waiter = asyncio.create_task(chunk_writer_lease(store, owner="seeder", wait_s=EVENTUALLY_S))
    # It saw the sweep and withdrew its lease (a delete): now it waits for the sweep to end.
    await wait_until(lambda: store.calls["delete"] > withdrawn, EVENTUALLY_S, "the writer to see the sweep")
    assert not waiter.done()
    await g.release()
    await (await waiter).release()


async def test_an_expired_lock_is_taken_over_and_its_holder_knows(monkeypatch) -> None:
    store = MemoryStore()
    old = await maintenance_lock(store, 7, owner="stalled job", ttl_s=0.3, skew_s=0)
    old._task.cancel()  # it stops renewing (a paused process)
    await wait_until(lambda: time.time_ns() > old.expires_ns, EVENTUALLY_S, "the stalled lock to expire")
    new = await maintenance_lock(store, 7, owner="new job", ttl_s=5, skew_s=0)
    with pytest.raises(Exception, match="lost"):
        old.check()
    new.check()
    await new.release()


async def test_chunk_sweep_deletes_only_unreferenced_chunks() -> None:
    store = MemoryStore()
    rng = np.random.default_rng(3)
    b = await DomainBuilder(store, disks=(("vm", "d", 256 * KiB),), ns_per_seq=S).start()
    await seed_initial(b, 0, rng)
    named = await keys(store, "c/")
    await store.put("c/ab/" + "ab" * 16 + ".chk", b"garbage nobody names")
    r = await sweep_chunks(store)
    assert r["chunks_deleted"] == 1 and await keys(store, "c/") == named


async def test_recover_holds_a_lease_while_it_reads(tmp_path: Path) -> None:
    """recover() takes its lease before it reads the catalog and drops it at the end."""
    store = MemoryStore()
    rng = np.random.default_rng(4)
    b = await DomainBuilder(store, disks=(("vm", "d", 256 * KiB),), ns_per_seq=S).start()
    await workload(b, rng, 30, {})
    seen = []
    real_get = store.get

    async def spying_get(key, *a, **kw):
        if key.startswith("d/") and "/cat/" in key:
            seen.append(sorted(await keys(store, "l/recovery/")))
        return await real_get(key, *a, **kw)

    store.get = spying_get
    await recover(store, b.domain, RecoverOptions("latest", tmp_path / "out"))
    assert seen and all(len(s) == 1 for s in seen)  # the lease existed when the catalog was read
    assert await keys(store, "l/") == set()


async def test_a_store_failure_during_chunking_leaves_the_catalog_unchanged(tmp_path: Path) -> None:
    from cdp.errors import StoreUnavailable

    store = MemoryStore()
    rng = np.random.default_rng(8)
    b = await DomainBuilder(store, disks=(("vm", "d", 512 * KiB),), ns_per_seq=S).start()
    await workload(b, rng, 60, {})
    _, before = await load_catalog(store, b.domain)
    real_put = store.put

    async def failing_put(key, data, **kw):
        if key.startswith("c/"):
            raise StoreUnavailable(f"mem://: put {key}: injected outage")
        return await real_put(key, data, **kw)

    store.put = failing_put
    with pytest.raises(StoreUnavailable, match="injected outage"):
        await consolidate(store, b.domain, older_than_s=1, now_ns=b.ts(b.seq), chunk_size=64 * KiB,
                          scratch_dir=tmp_path)
    _, after = await load_catalog(store, b.domain)
    assert after == before and not list(tmp_path.glob("consolidate-*"))  # no new generation, no scratch
    assert await keys(store, "l/") == set()  # its locks and leases are gone too
    store.put = real_put
    r = await consolidate(store, b.domain, older_than_s=1, now_ns=b.ts(b.seq), chunk_size=64 * KiB,
                          scratch_dir=tmp_path)
    assert r["bases_added"] == 1
