"""Damaged or missing objects: the error names the object, and no final image is left."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cdp.base_image import chunk_head_bytes
from cdp.errors import ChecksumMismatch, NotFound
from cdp.layout import chunk_key
from cdp.store.memory import MemoryStore
from cdp.testing.domain import DomainBuilder, random_workload
from rocva import RecoverOptions, Target, plan_recovery, recover
from tests.rocva.test_recover import seed_initial

KiB = 1 << 10


async def domain() -> DomainBuilder:
    rng = np.random.default_rng(21)
    b = await DomainBuilder(MemoryStore(), block_raw_size=4 * KiB).start()
    await seed_initial(b, 0, rng, chunk=64 * KiB)
    await random_workload(b, rng, 120, seal_every=10)
    b.write(1, 0, rng.bytes(8 * KiB))  # the newest segment's first block is surely needed
    await b.seal()
    return b


async def needed_chunk(b: DomainBuilder) -> str:
    plan = await plan_recovery(b.store, b.domain, Target.latest())
    disk = plan.disks[0]
    assert len(disk.base_pieces)
    return chunk_key(disk.manifest.hash_of(int(disk.base_pieces["chunk"][0])))


async def flip(store, key: str, at: int) -> None:
    data = bytearray(await store.get(key))
    data[at] ^= 0x40
    await store.put(key, bytes(data))


def images(out: Path) -> tuple[list[str], list[str]]:
    names = sorted(p.name for p in out.iterdir()) if out.exists() else []
    return [n for n in names if n.endswith(".img")], [n for n in names if n.endswith(".partial")]


@pytest.mark.parametrize("damage", ["segment block", "segment index", "base chunk", "manifest",
                                    "deleted segment", "deleted chunk", "deleted manifest"])
async def test_damage_is_detected_and_named(damage: str, tmp_path: Path) -> None:
    b = await domain()
    last_segment, middle_segment = b.segment_keys[-1], b.segment_keys[len(b.segment_keys) // 2]
    manifest, chunk = b.base_keys[0], await needed_chunk(b)
    at_fetch = True
    if damage == "segment block":
        key, error, what = last_segment, ChecksumMismatch, "block 0 at offset 64: stored_xxh3"
        await flip(b.store, key, 64 + 5)
    elif damage == "segment index":
        key, error, what, at_fetch = last_segment, ChecksumMismatch, "index_xxh3", False
        await flip(b.store, key, -64 - 7)
    elif damage == "base chunk":
        at = chunk_head_bytes(64 * KiB)  # a version-2 chunk's first sub-block (FORMAT.md §6.1)
        key, error, what = chunk, ChecksumMismatch, f"sub-block 0 at offset {at}: stored_xxh3"
        await flip(b.store, key, at + 5)
    elif damage == "manifest":
        key, error, what, at_fetch = manifest, ChecksumMismatch, "table_xxh3", False
        await flip(b.store, key, 64 + 3)
    elif damage == "deleted segment":
        key, error, what, at_fetch = middle_segment, NotFound, "is missing", False
        await b.store.delete(key)
    elif damage == "deleted chunk":
        key, error, what = chunk, NotFound, "is missing"
        await b.store.delete(key)
    else:
        key, error, what, at_fetch = manifest, NotFound, "is missing", False
        await b.store.delete(key)
    out = tmp_path / "out"
    with pytest.raises(error) as info:
        await recover(b.store, b.domain, RecoverOptions(Target.latest(), out))
    assert key in str(info.value) and what in str(info.value), str(info.value)
    finals, partials = images(out)
    assert finals == []  # never a silently wrong image
    assert len(partials) == (2 if at_fetch else 0)  # planning fails before any file exists


async def test_a_flip_in_an_unneeded_block_does_not_matter(tmp_path: Path) -> None:
    """Only what survives is fetched: damage in an overwritten payload is never read."""
    b = await DomainBuilder(MemoryStore(), block_raw_size=4 * KiB).start()
    b.write(0, 0, b"\1" * 4 * KiB)
    await b.seal()
    b.write(0, 0, b"\2" * 4 * KiB)
    await b.seal()
    await flip(b.store, b.segment_keys[0], 64 + 1)  # inside block 0 of the first segment
    result = await recover(b.store, b.domain, RecoverOptions(Target.latest(), tmp_path / "out", checksum=True))
    assert result["images"][0]["sha256"] == b.snapshot()[0]
    with pytest.raises(ChecksumMismatch, match=b.segment_keys[0]):
        await recover(b.store, b.domain, RecoverOptions(1, tmp_path / "out1"))
