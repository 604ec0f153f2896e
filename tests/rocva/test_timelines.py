"""Timelines (FORMAT.md §8.5) with real segments: a fork inside a segment, recovery on
both branches before and after the fork, `cdp points` listing both, and consolidation
and retention per timeline keeping what the other timeline still needs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from cdp.catalog import load_catalog
from cdp.catalog_read import CatalogView
from cdp.errors import Fenced
from cdp.store.fs import FileStore
from cdp.store.memory import MemoryStore
from cdp.testing.domain import SECTOR, DomainBuilder, sha256
from rocva import InvalidTarget, RecoverOptions, recover
from rocva.consolidate import consolidate
from rocva.points import list_points
from rocva.verify import verify

KiB = 1 << 10
S = 1_000_000_000


def _write_some(b: DomainBuilder, rng: np.random.Generator, n: int, shas: dict[int, list[str]]) -> None:
    for _ in range(n):
        disk = int(rng.integers(0, len(b.disks)))
        size = b.disks[disk]["size"]
        sectors = int(rng.integers(1, 33))
        offset = int(rng.integers(0, size // SECTOR - sectors + 1)) * SECTOR
        b.write(disk, offset, rng.bytes(sectors * SECTOR))
        shas[b.seq] = b.snapshot()


async def _recovered(b: DomainBuilder, seq: int, work: Path, timeline: int | None = None) -> list[str]:
    out = Path(tempfile.mkdtemp(dir=work))
    result = await recover(b.store, b.domain, RecoverOptions(seq, out, checksum=True, timeline=timeline))
    return [im["sha256"] for im in result["images"]]


async def branched(store, work: Path) -> tuple[DomainBuilder, dict, dict, int]:
    """Timeline 1: seqs 1..120 in segments of 40; timeline 2 forks at seq 57 (inside the
    second segment) and writes 58..140. Returns (builder, shas of 1, shas of 2, fork)."""
    rng = np.random.default_rng(21)
    b = await DomainBuilder(store, disks=(("db", "data", 256 * KiB), ("db", "log", 128 * KiB)),
                            ns_per_seq=S).start()
    one: dict[int, list[str]] = {0: b.snapshot()}
    fork_seq, at_fork = 57, None
    for _ in range(3):
        for _ in range(40):
            _write_some(b, rng, 1, one)
            if b.seq == fork_seq:
                at_fork = [bytearray(m) for m in b.model]
        await b.seal()
    tl = await b.fork(fork_seq, at_fork, "site-b")
    assert tl == 2
    two = {s: v for s, v in one.items() if s <= fork_seq}
    for _ in range(2):
        _write_some(b, rng, 40, two)
        await b.seal()
    b.mark("after-failover")
    two[b.seq] = b.snapshot()
    await b.seal()
    return b, one, two, fork_seq


@pytest.mark.parametrize("make", [MemoryStore, "file"])
async def test_recovery_on_both_branches_before_and_after_the_fork(make, tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store") if make == "file" else make()
    b, one, two, fork_seq = await branched(store, tmp_path)
    assert max(two) == 138 and max(one) == 120
    for seq in (0, 1, 40, fork_seq - 1, fork_seq, fork_seq + 1, 80, 97, 121, 138):
        assert await _recovered(b, seq, tmp_path) == two[seq], seq  # the current timeline: 2
        assert await _recovered(b, seq, tmp_path, timeline=2) == two[seq], seq
        paths, _ = await b.reference_paths(tmp_path / f"ref-{seq}", seq, timeline=2)
        assert [sha256(p.read_bytes()) for p in paths] == two[seq]
    for seq in (fork_seq, fork_seq + 1, 80, 120):
        assert await _recovered(b, seq, tmp_path, timeline=1) == one[seq], seq
    assert one[80] != two[80]
    with pytest.raises(InvalidTarget, match="timeline 1.*outside retention"):
        await _recovered(b, 121, tmp_path, timeline=1)
    with pytest.raises(InvalidTarget, match="no timeline 3"):
        await _recovered(b, 1, tmp_path, timeline=3)
    # The marks of each timeline are its own; points lists both timelines.
    pts = await list_points(store, b.domain)
    assert pts["current_timeline"] == 2 and [t["timeline"] for t in pts["timelines"]] == [1, 2]
    t1, t2 = pts["timelines"]
    assert (t2["parent"], t2["fork_seq"], t2["owner"], t2["latest"]) == (1, fork_seq, "site-b", 138)
    assert (t1["parent"], t1["latest"], t1["current"]) == (None, 120, False)
    assert [m["name"] for m in t2["marks"]] == ["after-failover"] and t1["marks"] == []
    report = await verify(store, b.domain, deep=True)
    assert report["ok"], report["problems"]
    assert report["checked"]["segments"] == 3 + 3  # timeline 2 reads timeline 1's first two
    # The fork's clipped row: timeline 2 holds the second segment only up to the fork.
    head, generation = await load_catalog(store, b.domain)
    rows = await CatalogView(store, head, generation, 2).rows_between(41, 58)
    assert [(int(r["timeline"]), int(r["first_seq"]), int(r["last_seq"]), int(r["object_last_seq"]))
            for r in rows] == [(1, 41, 57, 80), (2, 58, 97, 97)]
    assert int(rows["last_ts"][0]) == b.ts(57)


async def test_the_old_writer_stays_fenced(tmp_path: Path) -> None:
    store = MemoryStore()
    b, *_ = await branched(store, tmp_path)
    old = await load_catalog(store, b.domain)
    from cdp.catalog import CatalogWriter  # a writer of site-a, as a restarted DRVA of site A would open it
    w = CatalogWriter(store, old[0], old[1], by="drva of site-a", owner="site-a")
    with pytest.raises(Fenced, match="timeline 2 is owned by 'site-b'"):
        w.check_owner()


async def test_consolidation_and_retention_run_per_timeline(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    b, one, two, fork_seq = await branched(store, tmp_path)
    now = b.ts(b.seq)
    r = await consolidate(store, b.domain, older_than_s=10, retention_s=15, now_ns=now, scratch_dir=tmp_path)
    per = {t["timeline"]: t for t in r["timelines"]}
    assert per[1]["consolidated_seq"] is not None and per[2]["consolidated_seq"] is not None
    assert (per[1]["horizon_seq"], per[2]["horizon_seq"]) == (80, 97)  # timeline 2's passed the fork
    # Timeline 1's segments up to its horizon are gone: timeline 2 no longer needs them either.
    listed = sorted([i.key.split("/seg/")[1] async for i in store.list(f"d/{b.domain:08x}/seg/")])
    assert listed == ["00000001/0000000000000051-0000000000000078.seg",
                      "00000002/0000000000000062-0000000000000089.seg",
                      "00000002/000000000000008a-000000000000008a.seg"]
    with pytest.raises(InvalidTarget, match="outside retention"):
        await _recovered(b, 96, tmp_path, timeline=2)
    pts = await list_points(store, b.domain)
    for t in pts["timelines"]:
        shas = one if t["timeline"] == 1 else two
        for w in t["consistent"]:
            for seq in {w["first_seq"], w["last_seq"], (w["first_seq"] + w["last_seq"]) // 2}:
                assert await _recovered(b, seq, tmp_path, timeline=t["timeline"]) == shas[seq], (t["timeline"], seq)
    report = await verify(store, b.domain, deep=True)
    assert report["ok"], report["problems"]
    assert r["sweep"]["deferred"] == 0
