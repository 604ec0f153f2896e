"""Moving only what changed (``rocva.delta``, issue 12): from the two timelines' indexes,
the old site's log and its dirty-region flags, the ranges where its disks may differ
from the new timeline at a point; writing that point's content there, in place, makes
them equal — byte for byte — and moves no more than those ranges."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.frame import encode_frame
from cdp.records import KIND_WRITE, empty_records
from cdp.replog import ReplicationLog
from cdp.store.memory import MemoryStore
from cdp.testing.domain import DomainBuilder, random_workload
from rocva.delta import apply_in_place, changed_in_log, changed_in_store, clip, flagged, merge, restrict, total, union
from rocva.plan import EXTENT_DTYPE, SRC_BASE, SRC_WRITE, SRC_ZERO, build_plan, load_state
from rocva.target import resolve_target

KiB = 1 << 10
PAGE = 4 * KiB
DISKS = (("vm1", "disk0", 1024 * KiB), ("vm2", "disk1", 512 * KiB))  # room no workload touches


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def test_merge_and_union_cover_the_same_bytes():
    s, e = merge(np.array([10, 0, 5, 30, 20]), np.array([12, 5, 8, 40, 30]))
    assert s.tolist() == [0, 10, 20] and e.tolist() == [8, 12, 40]  # touching ranges join
    u = union((np.array([0]), np.array([4])), (np.array([2, 9]), np.array([6, 9])))
    assert u[0].tolist() == [0] and u[1].tolist() == [6] and total(u) == 6


def test_clip_keeps_the_parts_inside_and_moves_payload_positions():
    ext = np.zeros(3, dtype=EXTENT_DTYPE)
    ext["offset"], ext["length"] = [0, 100, 300], [100, 200, 50]
    ext["kind"] = [SRC_BASE, SRC_WRITE, SRC_ZERO]
    ext["pos"] = [0, 1000, 0]
    out = clip(ext, (np.array([50, 150, 290]), np.array([60, 160, 320])))
    assert out["offset"].tolist() == [50, 150, 290, 300] and out["length"].tolist() == [10, 10, 10, 20]
    assert out["kind"].tolist() == [SRC_BASE, SRC_WRITE, SRC_WRITE, SRC_ZERO]
    assert out["pos"].tolist() == [0, 1050, 1190, 0]


async def _two_histories(store, seed: int, a_ops: int, b_ops: int, base: bool, *, chunk_size: int = 64 * KiB,
                        zero_pages: int = 0):
    """Timeline 1 written up to F, then A goes on (sealed: in the store); B forks at F and
    writes; a mark M on timeline 2. Returns (builder, F, M, A's disks after its writes,
    B's model at M).

    ``chunk_size``: of the bases (above 64 KiB, a chunk has several sub-blocks, which a
    delta reads apart); ``zero_pages``: B's last writes, each with whole zero pages among
    random ones, over ranges A wrote after F (old content that is not zero)."""
    rng = np.random.default_rng(seed)
    b = await DomainBuilder(store, disks=DISKS).start()
    await random_workload(b, rng, 40, seal_every=7)
    if base:
        for k in range(len(DISKS)):
            await b.add_base(k, chunk_size=chunk_size)
    await random_workload(b, rng, 10, seal_every=5)
    await b.seal()
    fork = b.seq
    at_fork = [bytearray(m) for m in b.model]
    await random_workload(b, rng, a_ops, seal_every=4)  # A's writes after the fork point
    await b.seal()
    a_disks = [bytearray(m) for m in b.model]
    await b.fork(fork, at_fork, "site-b")
    await random_workload(b, rng, b_ops, seal_every=6)  # B's writes on the new timeline
    for _ in range(zero_pages):
        disk = int(rng.integers(0, len(DISKS)))
        changed = np.flatnonzero(np.frombuffer(a_disks[disk], np.uint8) != np.frombuffer(at_fork[disk], np.uint8))
        at = int(rng.choice(changed)) if len(changed) else int(rng.integers(0, DISKS[disk][2]))
        at = min(at - at % PAGE, DISKS[disk][2] - 4 * PAGE)
        payload = bytearray(rng.bytes(4 * PAGE))
        for page in rng.choice(4, size=int(rng.integers(1, 4)), replace=False).tolist():
            payload[page * PAGE : (page + 1) * PAGE] = bytes(PAGE)
        b.write(disk, at, bytes(payload))
    await b.seal()
    mark = b.mark("final")
    await b.seal()
    return b, fork, mark, a_disks, [bytes(m) for m in b.model]


async def _failback(store, b, fork: int, mark: int, paths: list[Path], extra: list | None = None) -> tuple[int, int]:
    old = await load_state(store, b.domain, 1)
    new = await load_state(store, b.domain, 2)
    ranges = [union(x, y) for x, y in zip(await changed_in_store(store, old, fork, old.committed_seq),
                                          await changed_in_store(store, new, fork, mark))]
    if extra is not None:
        ranges = [union(r, x) for r, x in zip(ranges, extra)]
    plan = restrict(await build_plan(store, new, await resolve_target(new, mark)), ranges)
    written = await apply_in_place(store, plan, paths)
    return written, sum(total(r) for r in ranges)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), a_ops=st.integers(0, 25), b_ops=st.integers(0, 25), base=st.booleans(),
       chunk_size=st.sampled_from([64 * KiB, 256 * KiB]), zero_pages=st.integers(0, 3))
def test_a_delta_from_both_timelines_makes_a_equal_b_at_the_mark(tmp_path_factory, seed, a_ops, b_ops, base,
                                                                  chunk_size, zero_pages):
    asyncio.run(_delta_makes_a_equal_b(tmp_path_factory, seed, a_ops, b_ops, base, chunk_size, zero_pages))


async def _delta_makes_a_equal_b(tmp_path_factory, seed: int, a_ops: int, b_ops: int, base: bool,
                                 chunk_size: int, zero_pages: int) -> None:
    store = MemoryStore()
    b, fork, mark, a_disks, at_mark = await _two_histories(store, seed, a_ops, b_ops, base, chunk_size=chunk_size,
                                                           zero_pages=zero_pages)
    d = tmp_path_factory.mktemp("a")
    paths = [d / f"{vm}-{name}.img" for vm, name, _ in DISKS]
    for p, content in zip(paths, a_disks):
        p.write_bytes(content)
    written, moved = await _failback(store, b, fork, mark, paths)
    assert [sha(p.read_bytes()) for p in paths] == [sha(m) for m in at_mark]
    assert written <= moved <= sum(size for _, _, size in DISKS)


async def test_writes_only_at_the_old_site_need_their_log_or_their_flags(tmp_path):
    """A's writes that never reached the store: without the ranges its log and its dirty
    flags name, the delta misses them; with them, A equals B again."""
    store = MemoryStore()
    b, fork, mark, a_disks, at_mark = await _two_histories(store, 11, 8, 8, True)
    paths = [tmp_path / f"{vm}-{name}.img" for vm, name, _ in DISKS]
    rng = np.random.default_rng(3)
    # Acked into A's log, never shipped: a frame of the domain after timeline 1's end.
    old = await load_state(store, b.domain, 1)
    recs = empty_records(2)
    recs["seq"] = [old.committed_seq + 1, old.committed_seq + 2]
    recs["timestamp_ns"] = 1
    recs["kind"] = KIND_WRITE
    recs["disk"] = [0, 1]
    recs["offset"] = [64 * KiB, 8 * KiB]
    recs["length"] = [4 * KiB, 512]
    payload = rng.bytes(4 * KiB + 512)
    log_path = tmp_path / "replog"
    ReplicationLog.format(log_path, 2 << 20)
    with ReplicationLog.open(log_path) as log:
        log.append_batch([[encode_frame(b.domain, recs, payload)]])
        log.append_batch([[encode_frame(b.domain + 1, recs, payload)]])  # another domain's: not ours
    a_disks[0][64 * KiB : 68 * KiB] = payload[: 4 * KiB]
    a_disks[1][8 * KiB : 8 * KiB + 512] = payload[4 * KiB :]
    # Written, never acked: only A's dirty-region map knows (a 64 KiB region of disk 0).
    a_disks[0][200 * KiB : 201 * KiB] = rng.bytes(KiB)
    flags = np.zeros(16, bool)
    flags[3] = True
    unacked = [flagged(flags, 64 * KiB, 1024 * KiB), flagged(np.zeros(8, bool), 64 * KiB, 512 * KiB)]

    in_log, last = changed_in_log(log_path, b.domain, old.committed_seq, [0, 1])
    assert last == old.committed_seq + 2
    assert [(r[0].tolist(), r[1].tolist()) for r in in_log] == [([64 * KiB], [68 * KiB]), ([8 * KiB], [8 * KiB + 512])]
    assert changed_in_log(log_path, b.domain, old.committed_seq + 2, [0, 1])[0][0][0].size == 0

    for extra, equal in ((None, False), ([union(x, y) for x, y in zip(in_log, unacked)], True)):
        for p, content in zip(paths, a_disks):
            p.write_bytes(content)
        await _failback(store, b, fork, mark, paths, extra)
        assert ([sha(p.read_bytes()) for p in paths] == [sha(m) for m in at_mark]) is equal
