"""Shared by the recovery tests: seeding a domain with a base, the check against the
reference replay, and the random-workload property over any store.

``tests/rocva/test_recover.py`` runs ``recovery_property`` over a ``MemoryStore``;
``tests/rocva/test_recover_cloud.py`` runs the same function over moto S3 and Azurite.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from cdp.testing.domain import SECTOR, DomainBuilder, random_workload
from rocva import InvalidTarget, RecoverOptions, recover, recoverable_ranges
from rocva.plan import load_state

KiB = 1 << 10


def initial_content(rng: np.random.Generator, size: int, chunk: int) -> bytes:
    """Random content with an all-zero chunk and one chunk repeated (dedup in the base)."""
    data = bytearray(rng.bytes(size))
    chunks = size // chunk
    if chunks >= 3:
        data[chunk : 2 * chunk] = bytes(chunk)
        data[2 * chunk : 3 * chunk] = data[0:chunk]
    return bytes(data)


async def seed_initial(b: DomainBuilder, disk: int, rng: np.random.Generator, chunk: int = 64 * KiB) -> None:
    """Disk ``disk`` joins with content: its base at seq 0 (before any record)."""
    assert b.seq == 0
    b.model[disk][:] = initial_content(rng, b.disks[disk]["size"], chunk)
    await b.add_base(disk, chunk_size=chunk)


async def erp_history(store, domain: int, rng: np.random.Generator, ops: int, data_bytes: int) -> DomainBuilder:
    """The erp domain of ``cdp.testing.site`` in ``store``: erp-db's data disk of
    ``data_bytes`` and log disk of half that, disk 0 seeded, then ``ops`` random writes."""
    b = await DomainBuilder(store, domain=domain, disks=(("erp-db", "data", data_bytes),
                                                         ("erp-db", "log", data_bytes // 2)),
                            block_raw_size=4 * KiB).start()
    await seed_initial(b, 0, rng, chunk=64 * KiB)
    await random_workload(b, rng, ops, seal_every=12, max_sectors=16)
    return b


async def check(b: DomainBuilder, seq: int, work: Path, expected: list[str] | None = None, **kw) -> dict:
    """Recover at ``seq``; the images must equal the reference replay (and ``expected``)."""
    out = Path(tempfile.mkdtemp(dir=work))
    chosen = {k: kw.pop(k) for k in ("timeline", "concurrency") if k in kw}  # RecoverOptions' own
    result = await recover(b.store, b.domain, RecoverOptions(seq, out / "rec", checksum=True, **chosen), **kw)
    got = [im["sha256"] for im in result["images"]]
    assert got == await b.reference(out / "ref", seq), f"seq {seq}"
    if expected is not None:
        assert got == expected, f"seq {seq} vs the model"
    assert sorted(os.listdir(out / "rec")) == sorted(f"{d['vm']}-{d['name']}.img" for d in b.disks)
    return result


async def recovery_property(store, seed: int, ops: int, seal_every: int, bases: str, resync: bool,
                            brs: int, work: Path, chunk: int = 64 * KiB) -> None:
    """A random domain in ``store`` (1-3 disks, marks, optional bases of ``chunk`` bytes
    per chunk, and a resync window):
    every mark, the latest seq and four random seqs recover to the reference replay's
    images, and exactly the points inside a window or before a disk's first base are refused."""
    rng = np.random.default_rng(seed)
    disks = tuple((f"vm{k}", "d", int(rng.integers(16, 384)) * SECTOR) for k in range(int(rng.integers(1, 4))))
    b = await DomainBuilder(store, disks=disks, block_raw_size=brs).start()
    if bases != "none":
        await seed_initial(b, 0, rng, chunk=chunk)
    marks = await random_workload(b, rng, ops // 2, seal_every=seal_every, resync=resync)
    first_base = {0: 0} if bases != "none" else {}
    if bases == "initial+mid":
        for disk in range(len(disks)):
            await b.add_base(disk, chunk_size=chunk)
            first_base.setdefault(disk, b.seq)
    marks |= await random_workload(b, rng, ops - ops // 2, seal_every=seal_every)
    state = await load_state(b.store, b.domain)
    ranges = recoverable_ranges(state)
    seqs = sorted({*marks, b.seq, *rng.integers(0, b.seq + 1, 4).tolist()})
    for seq in seqs:
        # Independently of rocva.target: a point inside a window, or before the first base
        # of a disk that has bases (a disk without one starts as zeros at seq 0), is none.
        refused = (any(w["first_seq"] <= seq <= (w["last_seq"] or b.seq) for w in b.windows)
                   or any(seq < first for first in first_base.values()))
        assert any(a <= seq <= z for a, z in ranges) == (not refused), (seq, ranges, b.windows)
        if refused:
            with pytest.raises(InvalidTarget):
                await recover(b.store, b.domain, RecoverOptions(seq, work / f"x{seq}"))
            assert not (work / f"x{seq}").exists()
            continue
        await check(b, seq, work, marks.get(seq), concurrency=int(rng.integers(1, 9)))
