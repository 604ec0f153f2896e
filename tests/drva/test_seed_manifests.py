"""A seed's manifest, against other writers' bases and against the chunk sweep (each test
failed before the fix):

1. a re-seed at the seq of a consolidation base put its manifest over that base's (the
   same key) before the catalog changed: a recovery at that seq returned the fuzzy copy,
   every checksum passing. A seed's manifest has a key of its own now (``.seed.bmf``);
2. a seed whose chunk-writer lease was lost before its manifest landed (a store outage
   longer than the lease) committed a base naming chunks another host's chunk sweep had
   deleted meanwhile: SEED_DONE, and every later point was unrecoverable.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from cdp import locks, wire
from cdp.base_image import is_zero
from cdp.catalog import load_catalog
from cdp.store.faulty import FaultyStore
from cdp.store.fs import FileStore
from iofilter_sim.seeding import seed_disk
from cdp.testing.domain import sha256
from rocva import RecoverOptions, Target, recover
from rocva.plan import build_plan, load_state
from rocva.recover import execute_plan
from rocva.target import resolve_target
from rocva.consolidate import consolidate
from rocva.retention import sweep_chunks
from tests.drva.harness import random_writes
from tests.drva.test_crash import wait_until_committed
from tests.drva.test_seed_holes import CHUNK, DISK, _begin, _end, _start, _stop
from tests.waiting import EVENTUALLY_S, wait_until

TTL_S = 1.5


async def _drained(f) -> None:
    await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "the filter drained")


async def _seeder_idle(d) -> None:
    await wait_until(lambda: not d.seeder.jobs and not d.seeder.finishing, EVENTUALLY_S, "the seed finished")


async def test_a_reseed_at_a_consolidation_base_never_rewrites_its_manifest(tmp_path):
    d, disk, f, client, task = await _start(tmp_path, log_size="64MiB", seal_bytes="1MiB", seal_age_s=0.1)
    store = FileStore(tmp_path / "store")
    rng = np.random.default_rng(7)
    await seed_disk(client, f, 0, chunk_size=CHUNK)
    f.capture(*random_writes(rng, [DISK], 40, 64))
    await _drained(f)
    at = f.next_seq - 1
    await wait_until_committed(store, 1, at)
    sha_at = disk.sha256()
    done = await consolidate(FileStore(tmp_path / "store"), 1, older_than_s=0, now_ns=time.time_ns() + 10**9)
    assert done["consolidated_seq"] == at
    state, _ = await load_catalog(store, 1)
    [base] = [b for b in state.timeline().bases if b["seq"] == at]
    before = (tmp_path / "store" / base["key"]).read_bytes()
    view = await load_state(store, 1)
    planned = await build_plan(store, view, await resolve_target(view, Target.seq(at)))  # a reader's, before the seed
    # The filter seeds again at that seq (nothing written since) while its disk is written:
    # another content at that seq.
    await client.send_seed([_begin(at)])
    for i in range(DISK // CHUNK):
        f.capture(*random_writes(rng, [1 << 20], 8, 16))
        data = f.disks[0].read(i * CHUNK, CHUNK)
        if not is_zero(data):
            await client.send_seed([wire.seed_chunk_message(1, 0, i, data)])
    await _drained(f)
    end = f.next_seq - 1
    await wait_until_committed(store, 1, end)
    await client.send_seed([_end(end)])
    await _seeder_idle(d)
    await _stop(d, task)
    assert (tmp_path / "store" / base["key"]).read_bytes() == before, "the consolidation's manifest was rewritten"
    state, _ = await load_catalog(store, 1)
    [seeded] = [b for b in state.timeline().bases if b["seq"] == at]
    assert seeded["origin"] == "seed" and seeded["key"].endswith(".seed.bmf") and seeded["key"] != base["key"]
    assert [w for w in state.timeline().windows if w["last_seq"] is None] == []
    # The reader that planned on the consolidation's base still gets that point's bytes.
    out = tmp_path / "planned"
    await execute_plan(store, planned, out)
    assert sha256((out / "vm1-d0.img").read_bytes()) == sha_at
    latest = await recover(store, 1, RecoverOptions(end, tmp_path / "out", checksum=True))
    assert latest["images"][0]["sha256"] == disk.sha256()


async def test_a_seed_whose_lease_was_lost_before_its_manifest_landed_is_refused(tmp_path, monkeypatch, caplog):
    import drva.seeder as seeder_mod
    from drva.seeder import Seeder

    caplog.set_level(logging.INFO, logger="drva.seeder")
    real_lease = seeder_mod.chunk_writer_lease

    async def short_lease(store, **kw):
        return await real_lease(store, **{**kw, "ttl_s": TTL_S})
    monkeypatch.setattr(seeder_mod, "chunk_writer_lease", short_lease)
    d, disk, f, client, task = await _start(tmp_path, log_size="64MiB", seal_bytes="1MiB", seal_age_s=0.1)
    faulty = FaultyStore(d.shipper.store_of(1))
    d.shipper.store_of = lambda domain: faulty  # the DRVA's view of the store
    real_put = Seeder._put_retrying
    swept: dict = {}

    async def put_after_an_outage(self, store, key, data):
        if not swept:  # the lease was checked before: now the DRVA loses the store a while
            faulty.offline()
            await asyncio.sleep(TTL_S + 0.5)  # its renewals fail: the lease is lost, and expires
            swept.update(await sweep_chunks(FileStore(tmp_path / "store"), owner="another host", skew_s=0))
            faulty.online()
        await real_put(self, store, key, data)
    monkeypatch.setattr(Seeder, "_put_retrying", put_after_an_outage)

    seeding = asyncio.create_task(seed_disk(client, f, 0, chunk_size=CHUNK, timeout_s=60))
    await wait_until(lambda: "deleted by a chunk sweep" in (client.last_error or "") or seeding.done(),
                     EVENTUALLY_S, "the seed's end")
    assert swept["chunks_deleted"] > 0, swept
    assert not seeding.done(), "SEED_DONE for a base whose chunks were swept"
    seeding.cancel()
    await asyncio.gather(seeding, return_exceptions=True)
    await _seeder_idle(d)
    assert "seed_chunks_checked" in caplog.text
    store = FileStore(tmp_path / "store")
    state, _ = await load_catalog(store, 1)
    assert state.timeline().bases == [] and state.timeline().windows == [], "something of the seed committed"
    assert not await locks.live_locks(store, locks.writer_prefix(), skew_s=0)
    # Seeding again works: the same manifest (the disk did not change) is found in the
    # store, and the chunks the sweep took are put back under the new seed's lease.
    await wait_until(lambda: client.connected, EVENTUALLY_S, "the filter reconnected")
    await seed_disk(client, f, 0, chunk_size=CHUNK, timeout_s=60)
    f.capture(*random_writes(np.random.default_rng(1), [DISK], 10, 16))
    await _drained(f)
    await wait_until_committed(store, 1, f.next_seq - 1)
    await _stop(d, task)
    state, _ = await load_catalog(store, 1)
    out = await recover(store, 1, RecoverOptions(state.timeline().committed_seq, tmp_path / "out", checksum=True))
    assert out["images"][0]["sha256"] == disk.sha256()
