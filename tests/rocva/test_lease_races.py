"""Readers of a domain beside its consolidation/retention job, and the job's own chunk and
manifest rules (each test failed before the fix):

1. a consolidation put its manifest over one already under its key (another writer's base
   at that seq), and a recovery there returned that writer's bytes as its own;
2. a consolidation whose chunk-writer lease was lost while its manifests were put
   committed bases naming chunks a chunk sweep deleted meanwhile;
3. a mount lost its recovery lease for good after one stall (retention then deleted what
   it served), or went on serving half of a point retention took apart;
4. ``cdp verify`` took no lease: a retention beside it made a healthy store look damaged;
5. a failback took no lease: a retention beside it deleted the segments it was reading;
6. a failover's fork after retention passed its point failed with a raw ``ValueError``,
   and no lease was held between the rehydration and the fork.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import logging
import time

import numpy as np
import pytest

from cdp import locks
from cdp.base_image import encode_manifest
from cdp.catalog import load_catalog
from cdp.errors import AlreadyExists, FailoverRefused, StoreUnavailable
from cdp.layout import base_manifest_key
from cdp.store.fs import FileStore
from cdp.store.memory import MemoryStore
from cdp.testing.domain import SITE, DomainBuilder
from rocva import RecoverOptions, recover
from rocva import failover as failover_mod
from rocva.consolidate import consolidate, consolidation_seq
from rocva.failback import failback
from rocva.mount import Mount, MountOptions
from rocva.plan import load_state
from rocva.retention import sweep_chunks
from rocva.verify import verify
from tests.rocva.build import seed_initial
from tests.rocva.test_consolidate import workload
from tests.rocva.test_delta import _two_histories
from tests.rocva.test_failback import site_a_disks
from tests.waiting import EVENTUALLY_S, wait_until, wait_until_async

KiB = 1 << 10
S = 1_000_000_000
DAY_NS = 86400 * S
TTL_S = 1.5  # a lease this short is lost after one stall of the event loop of TTL_S


class Interleave:
    """The store a reader uses; its first read of a segment (or listing of segments) runs
    ``hook`` first: the moment a concurrent job happens to run, forced."""

    def __init__(self, inner, hook):
        self.inner, self.hook, self.fired = inner, hook, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def _maybe(self, key: str) -> None:
        if "/seg/" in key and not self.fired:
            self.fired = True
            await self.hook()

    async def get(self, key, *a, **kw):
        await self._maybe(key)
        return await self.inner.get(key, *a, **kw)

    async def get_range(self, key, *a, **kw):
        await self._maybe(key)
        return await self.inner.get_range(key, *a, **kw)

    def list(self, prefix, **kw):
        async def gen():
            await self._maybe(prefix)
            async for info in self.inner.list(prefix, **kw):
                yield info
        return gen()


async def _domain(store, rng_seed: int, *, ops: tuple[int, int] = (60, 60), size: int = 512 * KiB):
    """A seeded domain with two stretches of writes; (builder, the seq between them, shas)."""
    rng = np.random.default_rng(rng_seed)
    b = await DomainBuilder(store, disks=(("vm", "d", size),), ns_per_seq=S).start()
    await seed_initial(b, 0, rng)
    shas: dict[int, list[str]] = {}
    await workload(b, rng, ops[0], shas)
    point = b.seq
    await workload(b, rng, ops[1], shas)
    return b, point, shas


async def _job(path, b, **kw):
    """The MSA's consolidation + retention job, from another process's view of the store."""
    return await consolidate(FileStore(path), b.domain, older_than_s=0, retention_s=0, now_ns=b.ts(b.seq) + S,
                             **kw)


# ------------------------------------------------------------------ 1, 2: consolidation


async def test_consolidation_never_writes_over_a_manifest_under_its_key(tmp_path):
    store = FileStore(tmp_path / "store")
    b, _, shas = await _domain(store, 11)
    now = b.ts(b.seq) + S
    seq = await consolidation_seq(await load_state(store, b.domain), now)
    assert seq is not None
    # Another writer's base of the disk at that seq (a seed's fuzzy copy): other content.
    key = base_manifest_key(b.domain, 1, seq, 0)
    theirs = encode_manifest(b.domain, 0, seq, 512 * KiB, 64 * KiB, np.zeros((8, 16), np.uint8))
    await store.put(key, theirs)
    with pytest.raises(AlreadyExists, match="never overwritten"):
        await consolidate(store, b.domain, older_than_s=0, now_ns=now, scratch_dir=tmp_path)
    assert (tmp_path / "store" / key).read_bytes() == theirs
    state, _ = await load_catalog(store, b.domain)
    assert not [x for x in state.timeline().bases if x["seq"] == seq], "a base naming the other manifest"
    # A rerun after a crash that followed its own manifest put finds the same bytes: fine.
    await store.delete(key)
    first = await consolidate(store, b.domain, older_than_s=0, now_ns=now, scratch_dir=tmp_path)
    assert first["consolidated_seq"] == seq


async def test_consolidation_puts_back_chunks_swept_while_its_lease_was_lost(tmp_path, monkeypatch):
    import rocva.consolidate as consolidate_mod

    real_lease = consolidate_mod.chunk_writer_lease

    async def short_lease(store, **kw):
        return await real_lease(store, **{**kw, "ttl_s": TTL_S})
    monkeypatch.setattr(consolidate_mod, "chunk_writer_lease", short_lease)
    raw = FileStore(tmp_path / "store")
    b, _, shas = await _domain(raw, 12, size=1024 * KiB)
    swept: dict = {}

    class StallsAtTheManifest:
        """The job's store: the first manifest put comes after a stall of the whole process
        longer than the writer lease, during which another host's chunk sweep runs."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        async def put(self, key, data, **kw):
            if key.endswith(".bmf") and not swept:
                time.sleep(TTL_S)  # the loop stalls: the lease is not renewed in time
                swept.update(await sweep_chunks(FileStore(tmp_path / "store"), owner="another host", skew_s=0))
            return await self.inner.put(key, data, **kw)

    result = await consolidate(StallsAtTheManifest(raw), b.domain, older_than_s=0, now_ns=b.ts(b.seq) + S,
                               scratch_dir=tmp_path, chunk_size=64 * KiB)
    assert swept["chunks_deleted"] > 0, swept  # the sweep did take the job's fresh chunks
    seq = result["consolidated_seq"]
    report = await verify(raw, b.domain)
    assert report["ok"], report["problems"][:3]
    out = await recover(raw, b.domain, RecoverOptions(seq, tmp_path / "out", checksum=True))
    assert [i["sha256"] for i in out["images"]] == shas[seq]


# ------------------------------------------------------------------ 3: mount


class LeaseGate:
    """The mount's store; while ``shut``, creating a recovery lease fails (transiently)."""

    def __init__(self, inner):
        self.inner, self.shut = inner, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def put(self, key, data, **kw):
        if self.shut and key.startswith("l/recovery/"):
            raise StoreUnavailable(f"{key}: the store is out of reach (test)")
        return await self.inner.put(key, data, **kw)


@pytest.fixture
def short_recovery_leases(monkeypatch):
    recover_mod = importlib.import_module("rocva.recover")  # ``rocva.recover`` is also a function
    real = recover_mod.recovery_lease

    async def short(store, domain, **kw):
        return await real(store, domain, **{**kw, "ttl_s": TTL_S})
    monkeypatch.setattr(recover_mod, "recovery_lease", short)


async def _stall_until_lost(mount: Mount) -> None:
    """One stall of the whole process (a suspended VM, SIGSTOP) past the lease's window,
    then the event loop runs again: the renewal finds itself late, the lease is lost."""
    lease = mount.lease
    time.sleep(TTL_S * 0.8)
    await wait_until(lambda: lease.lost is not None, EVENTUALLY_S, "the renewal to find itself late")


async def test_a_mount_takes_its_lease_again_after_a_stall(tmp_path, short_recovery_leases, caplog):
    caplog.set_level(logging.INFO, logger="rocva.mount")
    store = FileStore(tmp_path / "store")
    b, point, shas = await _domain(store, 3)
    mount = await Mount.open(store, MountOptions(domain=b.domain, target=point))
    try:
        [disk] = mount.disks.values()
        await disk.read(0, 4096)
        await _stall_until_lost(mount)
        await wait_until(lambda: mount.lease is not None and mount.lease.lost is None
                         and "mount_point_checked" in caplog.text, EVENTUALLY_S, "the lease taken again, the point checked")
        assert "mount_lease_retaken" in caplog.text

        async def only_the_new_lease() -> bool:  # the old one expires for everyone, in TTL_S
            live = await locks.live_locks(store, locks.recovery_prefix(b.domain), skew_s=0)
            return [lk.key for lk in live] == [mount.lease.key]
        await wait_until_async(only_the_new_lease, EVENTUALLY_S, "only the new lease live")
        r = await _job(tmp_path / "store", b, scratch_dir=tmp_path, skew_s=0)
        assert r["sweep"]["deferred"] > 0 and r["sweep"]["objects_deleted"] == 0, r["sweep"]
        image = b"".join([bytes(await disk.read(off, 64 * KiB)) for off in range(0, disk.size, 64 * KiB)])
        assert hashlib.sha256(image).hexdigest() == shas[point][0]
        assert mount.summary()["leases_retaken"] == 1 and mount.summary()["point_lost"] is None
    finally:
        await mount.close()


async def test_a_mount_whose_point_retention_took_apart_fails_every_read(tmp_path, short_recovery_leases, caplog):
    caplog.set_level(logging.INFO, logger="rocva.mount")
    raw = FileStore(tmp_path / "store")
    b, point, _ = await _domain(raw, 4)
    gate = LeaseGate(raw)
    mount = await Mount.open(gate, MountOptions(domain=b.domain, target=point))
    try:
        [disk] = mount.disks.values()
        for off in range(0, disk.size, 64 * KiB):  # every unit in the cache
            await disk.read(off, 4096)
        gate.shut = True  # the lease cannot be taken again for a while...
        await _stall_until_lost(mount)

        async def no_live_lease() -> bool:  # the lost one expires for everyone, in TTL_S
            return not await locks.live_locks(raw, locks.recovery_prefix(b.domain), skew_s=0)
        await wait_until_async(no_live_lease, EVENTUALLY_S, "the lost lease expired")
        r = await _job(tmp_path / "store", b, scratch_dir=tmp_path, skew_s=0)  # ... and retention runs then
        assert r["sweep"]["segments_deleted"] > 0, r["sweep"]
        gate.shut = False
        failed = 0
        for off in range(0, disk.size, 64 * KiB):
            try:
                await disk.read(off, 4096)
            except OSError as exc:
                assert exc.errno == errno.EIO and "lost its recovery lease" in str(exc), exc
                failed += 1
        assert failed == disk.size // (64 * KiB), "half of the point was served"
        assert "retention moved timeline 1's horizon" in mount.summary()["point_lost"]
        assert "mount_point_lost" in caplog.text
    finally:
        await mount.close()


# ------------------------------------------------------------------ 4: verify


async def test_verify_beside_retention_reports_a_healthy_store_healthy(tmp_path):
    store = FileStore(tmp_path / "store")
    b, _, _ = await _domain(store, 5, ops=(60, 60))
    assert (await verify(store, b.domain))["ok"]
    jobs: list[dict] = []

    async def job():
        jobs.append(await _job(tmp_path / "store", b, scratch_dir=tmp_path))

    report = await verify(Interleave(store, job), b.domain)
    assert jobs and jobs[0]["sweep"]["deferred"] > 0, jobs  # verify's lease held the sweep off
    assert report["ok"], report["problems"][:2]
    assert not await locks.live_locks(store, locks.recovery_prefix(b.domain)), "verify's lease left behind"
    assert (await verify(store, b.domain))["ok"]


# ------------------------------------------------------------------ 5: failback


async def test_failback_beside_retention_holds_it_off(tmp_path):
    store = MemoryStore()
    b, _, mark, a_disks, at_mark = await _two_histories(store, 21, 12, 12, True)
    jobs: list[dict] = []

    async def job():  # keeps nothing: a window measured back from the newest record would keep it all
        jobs.append(await consolidate(store, b.domain, older_than_s=3600, retention_s=0,
                                      now_ns=b.ts(b.seq) + 4 * DAY_NS))

    disks = site_a_disks(tmp_path, a_disks)
    await failback(Interleave(store, job), b.domain, mark, site=SITE, disks=disks)
    assert jobs and jobs[0]["sweep"]["deferred"] > 0, jobs
    assert [hashlib.sha256(d.path.read_bytes()).hexdigest() for d in disks] == \
        [hashlib.sha256(m).hexdigest() for m in at_mark]
    assert not await locks.live_locks(store, locks.recovery_prefix(b.domain))


# ------------------------------------------------------------------ 6: failover


async def test_a_failover_whose_point_leaves_retention_before_its_fork_is_refused_clearly(tmp_path, monkeypatch):
    store = FileStore(tmp_path / "store")
    b, point, _ = await _domain(store, 9, ops=(40, 60), size=256 * KiB)
    real = failover_mod.fork_timeline
    held: list[list] = []

    async def fork_after_job(*a, **kw):
        held.append(await locks.live_locks(store, locks.recovery_prefix(b.domain)))
        await _job(tmp_path / "store", b, scratch_dir=tmp_path)
        return await real(*a, **kw)
    monkeypatch.setattr(failover_mod, "fork_timeline", fork_after_job)
    with pytest.raises(FailoverRefused, match=f"not {point} .*retention moved its horizon"):
        await failover_mod.failover(store, b.domain, point, tmp_path / "dr", site="site-b")
    assert held and held[0], "no recovery lease between the rehydration and the fork"
    state, _ = await load_catalog(store, b.domain)
    assert sorted(state.timelines) == [1], "a timeline was forked"
    assert not await locks.live_locks(store, locks.recovery_prefix(b.domain))
