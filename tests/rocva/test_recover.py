"""Point-in-time recovery (rocva.recover) against the model and cdp.replay.replay_reference."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp.store.fs import FileStore
from cdp.store.crypt import EncryptedStore
from cdp.store.memory import MemoryStore
from cdp.store.storekeys import StoreKey, StoreKeyring
from cdp.testing.domain import DomainBuilder, file_sha256, random_workload
from rocva import RecoverOptions, RecoveryError, Target, plan_recovery, recover
from tests.rocva.build import check, recovery_property, seed_initial

KiB, MiB = 1 << 10, 1 << 20


async def test_bases_consolidation_and_both_disks(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    b = await DomainBuilder(FileStore(tmp_path / "store"), disks=(("db", "data", 512 * KiB), ("db", "log", 192 * KiB))).start()
    await seed_initial(b, 0, rng)
    early = await random_workload(b, rng, 150, seal_every=12)
    mid = b.seq
    mid_shas = b.snapshot()
    await b.add_base(0, chunk_size=64 * KiB, origin="consolidation")  # a consolidated base of disk 0 at `mid`
    late = await random_workload(b, rng, 150, seal_every=12)
    for seq, shas in [*early.items(), *late.items(), (mid, mid_shas), (b.seq, b.snapshot())]:
        await check(b, seq, tmp_path, shas)
    plan = await plan_recovery(b.store, b.domain, Target.latest())
    assert [d.base_seq for d in plan.disks] == [mid, 0]  # the newest base at or below the target
    assert plan.disks[0].manifest.seq == mid and plan.disks[1].manifest is None


async def test_only_surviving_payloads_are_fetched(tmp_path: Path) -> None:
    """The whole disk rewritten ten times: recovery fetches one pass, not ten."""
    size = 1 * MiB
    b = await DomainBuilder(MemoryStore(), disks=(("vm", "d", size),), block_raw_size=64 * KiB).start()
    rng = np.random.default_rng(2)
    for _ in range(10):
        for off in range(0, size, 64 * KiB):
            b.write(0, off, rng.bytes(64 * KiB))
        await b.seal()
    result = await check(b, b.seq, tmp_path, b.snapshot())
    assert result["plan"]["segments_read"] == 10 and result["plan"]["segments_fetched"] == 1
    # One pass of payload, plus each index's tail GET (64 KiB) and the catalog.
    assert result["bytes_written"] == size
    assert result["bytes_fetched"] < size + 10 * 64 * KiB + 32 * KiB
    # Half-way: segments 1..5 indexed, only the fifth fetched.
    result = await check(b, 5 * 16, tmp_path)
    assert result["plan"]["segments_read"] == 5 and result["plan"]["segments_fetched"] == 1


async def test_images_are_sparse(tmp_path: Path) -> None:
    size = 64 * MiB
    b = await DomainBuilder(FileStore(tmp_path / "store"), disks=(("vm", "big", size), ("vm", "empty", size))).start()
    b.model[0][10 * MiB : 10 * MiB + 256 * KiB] = np.random.default_rng(3).bytes(256 * KiB)
    await b.add_base(0, chunk_size=1 * MiB)  # 64 chunks, 63 of them zero
    for i in range(16):
        b.write(0, 40 * MiB + i * 8 * KiB, bytes([i + 1]) * 4 * KiB)
    b.zero(0, 10 * MiB + 4 * KiB, 8 * KiB)  # ZERO over base data: must read back as zeros
    await b.seal()
    result = await check(b, b.seq, tmp_path, b.snapshot())
    for image in result["images"]:
        used = os.stat(image["path"]).st_blocks * 512
        assert image["size"] == size and used <= 1 * MiB, (image["path"], used)
    # Planned: the one non-zero base chunk minus the ZERO, and the writes; its zero pages
    # are skipped by the writer and stay holes.
    assert result["bytes_written"] == 1 * MiB - 8 * KiB + 16 * 4 * KiB


async def test_result_progress_and_no_overwrite(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    b = await DomainBuilder(MemoryStore()).start()
    await random_workload(b, rng, 200, seal_every=15)
    calls: list[tuple[int, int]] = []
    out = tmp_path / "out"
    result = await recover(b.store, b.domain, RecoverOptions(Target.latest(), out, concurrency=3),
                           progress=lambda d, t: calls.append((d, t)))
    for key in ("bytes_fetched", "bytes_written", "seconds", "mb_per_s", "images", "target_seq"):
        assert key in result
    total = result["bytes_written"]
    assert calls and calls[-1] == (total, total)
    assert all(a[0] <= b_[0] for a, b_ in zip(calls, calls[1:]))
    assert not (out / "recover.state.json").exists()
    before = [file_sha256(i["path"]) for i in result["images"]]
    with pytest.raises(RecoveryError, match="already exists: a recovery never overwrites"):
        await recover(b.store, b.domain, RecoverOptions(10, out))
    assert before == [file_sha256(i["path"]) for i in result["images"]]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), ops=st.integers(2, 160), seal_every=st.integers(1, 40),
       bases=st.sampled_from(["none", "initial", "initial+mid"]), resync=st.booleans(),
       brs=st.sampled_from([4 * KiB, 8 * KiB, 64 * KiB]))
def test_random_workloads_match_the_reference(seed, ops, seal_every, bases, resync, brs) -> None:
    with tempfile.TemporaryDirectory() as work:
        asyncio.run(recovery_property(MemoryStore(), seed, ops, seal_every, bases, resync, brs, Path(work)))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), ops=st.integers(2, 120), seal_every=st.integers(1, 30),
       bases=st.sampled_from(["initial", "initial+mid"]), brs=st.sampled_from([4 * KiB, 64 * KiB]),
       chunk=st.sampled_from([64 * KiB, 256 * KiB]))
def test_random_workloads_match_the_reference_from_a_sealed_store(seed, ops, seal_every, bases, brs, chunk) -> None:
    """From a sealed store a recovery opens only the pages of the blocks and sub-blocks it
    places (``Unopened.open_ranges``): chunks of several sub-blocks, later writes over part
    of them, runs read through gaps; every image still equals the reference replay."""
    store = EncryptedStore(MemoryStore(), StoreKeyring([StoreKey(bytes(range(32)))], "a test key"))
    with tempfile.TemporaryDirectory() as work:
        asyncio.run(recovery_property(store, seed, ops, seal_every, bases, False, brs, Path(work), chunk))


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
async def test_a_file_store_lends_read_buffers_per_unit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        sealed: bool) -> None:
    """Segments and base chunks of 1 MiB and more are read with O_DIRECT into buffers the
    fetcher lends, one per unit in flight: the images are the model's at every point,
    each unit read into a buffer, and no more buffers were made than units ran at once.
    A unit that fails does not give its buffer back (a read may still be landing in it).
    Sealed (an encrypted store over the file store), the sealed pages are what is read
    into the lent buffers, and opened from there."""
    from cdp import direct_io
    from cdp.errors import ChecksumMismatch, IntegrityError
    from rocva import fetch

    size = 12 * MiB
    store = FileStore(tmp_path / "store")
    if sealed:
        store = EncryptedStore(store, StoreKeyring([StoreKey(bytes(range(32)))], "a test key"))
    b = await DomainBuilder(store, disks=(("vm", "d", size),), block_raw_size=64 * KiB).start()
    rng = np.random.default_rng(4)
    for off in range(0, size, MiB):
        b.write(0, off, rng.bytes(MiB))
    await b.seal()
    await b.add_base(0, chunk_size=4 * MiB)  # chunks of 4 MiB: read direct too
    shas = {}
    for _ in range(3):
        for _ in range(48):  # 3 MiB per segment, random and so incompressible
            b.write(0, int(rng.integers(0, size // (64 * KiB))) * 64 * KiB, rng.bytes(64 * KiB))
        await b.seal()
        shas[b.seq] = b.snapshot()
    made: list[direct_io.ReadBuffer] = []
    lent_reads: list[str] = []
    real_get_into = FileStore.get_into

    # The buffers the fetcher makes (the read threads' staging buffers are ReadBuffers too).
    class CountedBuffer(direct_io.ReadBuffer):
        def __init__(self) -> None:
            made.append(self)
            super().__init__()

    async def counted_get_into(self, key, offset, length, buf, *, max_bytes=None):
        data = await real_get_into(self, key, offset, length, buf, max_bytes=max_bytes)
        lent_reads.append(key)
        return data

    monkeypatch.setattr(fetch, "ReadBuffer", CountedBuffer)
    monkeypatch.setattr(FileStore, "get_into", counted_get_into)
    for seq, expected in shas.items():
        made.clear()
        lent_reads.clear()
        result = await check(b, seq, tmp_path, expected, concurrency=2)
        assert result["bytes_written"] == size
        assert any(k.endswith(".seg") for k in lent_reads) and any(k.endswith(".chk") for k in lent_reads)
        assert 1 <= len(made) <= 2
    # A unit whose bytes do not verify: the recovery fails, its buffer is not lent again.
    fetcher_buffers: list[list] = []
    real_fetcher_init = fetch.Fetcher.__init__

    def keep(self, *args, **kwargs) -> None:
        real_fetcher_init(self, *args, **kwargs)
        fetcher_buffers.append(self._buffers)

    monkeypatch.setattr(fetch.Fetcher, "__init__", keep)
    segment = max((tmp_path / "store").rglob("*.seg"))  # the newest: every one of its blocks is needed
    raw = bytearray(segment.read_bytes())
    raw[4096] ^= 0xFF  # in its first block's stored bytes
    segment.write_bytes(bytes(raw))
    made.clear()
    # Sealed, the page fails its authentication; the retry with a fresh envelope
    # (cdp.store.crypt) reads with get, into no lent buffer, and fails the same way.
    with pytest.raises(IntegrityError if sealed else ChecksumMismatch):
        await recover(b.store, b.domain, RecoverOptions(b.seq, tmp_path / "bad", concurrency=1))
    assert len(made) == 1 and fetcher_buffers[-1] == []  # made for the failed unit, not given back
