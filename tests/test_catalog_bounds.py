"""Catalog objects, manifests and deployment records larger than their format allows are
refused before they are read (``get(..., max_bytes=)``, FORMAT.md §7): a planted 2 GiB
generation took 8 GB of memory to refuse after reading it whole."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cdp.base_image import put_manifest
from cdp.catalog import GENERATION_BYTES_MAX, load_catalog
from cdp.catalog_page import PAGE_ROWS, ref_key
from cdp.errors import AlreadyExists
from cdp.layout import base_prefix, catalog_key
from cdp.store.base import TooLarge
from cdp.store.fs import FileStore
from cdp.store.memory import MemoryStore
from cdp.testing.domain import DomainBuilder, random_workload
from rocva.plan import load_state
from rocva.retention import sweep_chunks

GiB = 1 << 30


def _plant(store: FileStore, key: str, size: int) -> None:
    """A sparse file of ``size`` bytes under ``key``: costs no disk, and reading it would
    cost ``size`` bytes of memory."""
    path = store.root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


async def test_a_giant_generation_is_refused_unread(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    b = await DomainBuilder(store).start()
    await random_workload(b, np.random.default_rng(1), 6, seal_every=3)
    _plant(store, catalog_key(b.domain, b.writer.generation + 1), GENERATION_BYTES_MAX + 1)
    with pytest.raises(TooLarge, match=rf"is {GENERATION_BYTES_MAX + 1} bytes, at most {GENERATION_BYTES_MAX}"):
        await load_catalog(store, b.domain)


async def test_a_giant_page_is_refused_unread(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    b = await DomainBuilder(store).start()
    rng = np.random.default_rng(2)
    for _ in range(PAGE_ROWS + 8):  # one sealed segment each: the oldest rows fold into a page
        b.write(0, int(rng.integers(0, 64)) * 512, rng.bytes(512))
        await b.seal()
    view = await load_state(store, b.domain)
    refs = view.tl.refs
    assert len(refs), "no page was folded"
    key = ref_key(b.domain, refs[0])
    _plant(store, key, GiB)
    with pytest.raises(TooLarge, match="at most"):
        await view.page(refs[0])


async def test_a_larger_object_under_a_manifest_key_is_other_content_unread() -> None:
    store = MemoryStore()
    key = "d/00000001/base/00000001/0000000000000000/00000000.bmf"
    await store.put(key, b"x" * 4096)
    with pytest.raises(AlreadyExists, match="other content"):
        await put_manifest(store, key, b"y" * 100)


async def test_the_chunk_sweep_bounds_each_manifest_by_its_disk(tmp_path: Path) -> None:
    """A manifest key holding more than a manifest of the domain's largest disk can is
    refused unread, and the sweep deletes nothing."""
    store = FileStore(tmp_path / "store")
    b = await DomainBuilder(store).start()
    b.model[0][:] = np.random.default_rng(3).bytes(b.disks[0]["size"])
    await b.add_base(0, chunk_size=64 << 10)
    manifest = [i.key async for i in store.list(base_prefix(b.domain))][0]
    chunks = {i.key async for i in store.list("c/")}
    os.truncate(store.root / manifest, GiB)
    with pytest.raises(TooLarge):
        await sweep_chunks(store)
    assert {i.key async for i in store.list("c/")} == chunks
