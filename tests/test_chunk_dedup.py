"""A writer that deduplicates chunks (seeding, consolidation) skips an upload only when the
store proves it holds the chunk: its header and table are read back and verified
(``cdp.base_image.chunk_stored``). It used to ask a HEAD: a store whose HEAD answered
for objects it did not hold (a caching proxy, a listing that still showed what a chunk
sweep deleted) got a manifest naming chunks never stored, committed, and only a recovery
found out. Each test below failed on the HEAD."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cdp.base_image import (
    CHUNK_SIZE_MIN, chunk_bytes_max, chunk_head_bytes, chunk_stored, encode_chunk, encode_chunk_v1,
)
from cdp.layout import chunk_key
from cdp.store.base import ObjectInfo
from cdp.store.fs import FileStore
from cdp.testing.domain import DomainBuilder
from iofilter_sim.seeding import seed_disk
from rocva import RecoverOptions, recover
from rocva.consolidate import consolidate
from tests.drva.harness import random_writes
from tests.drva.test_crash import wait_until_committed
from tests.drva.test_seed_holes import CHUNK, DISK, _start, _stop
from tests.waiting import EVENTUALLY_S, wait_until

KiB = 1 << 10
S = 1_000_000_000


class LyingHeadStore(FileStore):
    """A file store whose HEAD (``stat``) answers for every chunk key, held or not."""

    async def stat(self, key: str) -> ObjectInfo:
        if key.startswith("c/"):
            return ObjectInfo(key, 1 << 20, time.time(), "lie")
        return await super().stat(key)


async def test_chunk_stored_reads_the_head_back(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    raw = np.random.default_rng(3).bytes(CHUNK_SIZE_MIN + 1000)
    h, obj = encode_chunk(raw)
    key = chunk_key(h)
    assert await chunk_stored(store, key, h, len(raw)) == "absent"
    await store.put(key, obj)
    assert await chunk_stored(store, key, h, len(raw)) is None
    assert await chunk_stored(store, key, h, CHUNK_SIZE_MIN * 4) is None  # the caller's chunk size: an upper bound
    # A corrupt byte in the table, another chunk under the key, an object too large for
    # a chunk: each is not this chunk, and says why.
    bad = bytearray(obj)
    bad[chunk_head_bytes(len(raw)) - 1] ^= 1
    await store.put(key, bytes(bad))
    assert "table_xxh3" in await chunk_stored(store, key, h, len(raw))
    _, other = encode_chunk(raw[::-1])
    await store.put(key, other)
    assert "not the expected" in await chunk_stored(store, key, h, len(raw))
    await store.put(key, bytes(chunk_bytes_max(len(raw)) + 1))
    assert (await chunk_stored(store, key, h, len(raw))).startswith("not a chunk")
    # A version-1 chunk (no table) proves itself by its header.
    h1, obj1 = encode_chunk_v1(raw)
    await store.put(chunk_key(h1), obj1)
    assert await chunk_stored(store, chunk_key(h1), h1, len(raw)) is None


async def test_consolidation_stores_chunks_a_lying_head_claims(tmp_path: Path) -> None:
    store = LyingHeadStore(tmp_path / "store")
    b = await DomainBuilder(store, disks=(("a", "d", 512 * KiB),), ns_per_seq=S).start()
    rng = np.random.default_rng(5)
    for off in range(0, 512 * KiB, 64 * KiB):
        b.write(0, off, rng.bytes(64 * KiB))
    await b.seal()
    first_end = b.seq
    sha = b.snapshot()
    for _ in range(4):  # later records, so the first segment is older than the cutoff
        b.mark("later")
    await b.seal()
    r = await consolidate(store, b.domain, older_than_s=0.5, now_ns=b.ts(b.seq), chunk_size=64 * KiB,
                          scratch_dir=tmp_path)
    assert r["consolidated_seq"] == first_end and r["chunks"]["chunks_stored"] == 8, r
    assert len(list((tmp_path / "store" / "c").rglob("*.chk"))) == 8
    out = await recover(FileStore(tmp_path / "store"), b.domain, RecoverOptions(b.seq, tmp_path / "out",
                                                                                 checksum=True))
    assert [i["sha256"] for i in out["images"]] == sha


async def test_a_seed_stores_chunks_a_lying_head_claims(tmp_path: Path) -> None:
    d, disk, f, client, task = await _start(tmp_path, log_size="64MiB", seal_bytes="1MiB", seal_age_s=0.1)
    lying = LyingHeadStore(tmp_path / "store")
    d.shipper.store_of = lambda domain: lying  # the DRVA's view of the store
    try:
        await seed_disk(client, f, 0, chunk_size=CHUNK, timeout_s=60)
        f.capture(*random_writes(np.random.default_rng(2), [DISK], 10, 16))
        await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "the filter drained")
        store = FileStore(tmp_path / "store")
        await wait_until_committed(store, 1, f.next_seq - 1)
        await wait_until(lambda: not d.seeder.jobs and not d.seeder.finishing, EVENTUALLY_S, "the seed finished")
    finally:
        await _stop(d, task)
    assert list((tmp_path / "store" / "c").rglob("*.chk")), "no chunk stored"
    out = await recover(store, 1, RecoverOptions(f.next_seq - 1, tmp_path / "out", checksum=True))
    assert out["images"][0]["sha256"] == disk.sha256()
