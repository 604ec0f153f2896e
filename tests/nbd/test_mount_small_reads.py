"""A small read of a mount holds only its own bytes (FORMAT.md §18.2).

A read inside one decoded unit was answered with a view into the unit. The answer may
wait in the NBD server's reply queue long after the cache dropped the unit (uvloop's
transport keeps the object itself), and the server's budgets count only the answer's
bytes: a client that sent 4 KiB READs and read no replies made a mount with
``--cache-mb 32`` hold 1 GiB of 512 KiB units. Checked on ``PlanSource`` itself: what a
read returns, and what buffer it keeps alive.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cdp.store.fs import FileStore
from rocva import Target, plan_recovery
from rocva.mount_cache import UnitCache
from rocva.mount_source import SLICE_COPY_BELOW, PlanSource
from tests.nbd.mount_fixtures import KiB, build_domain, new_builder, recovered


@pytest.fixture(scope="module")
def domain_images(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("small-reads")

    async def build() -> dict[str, Path]:
        store = FileStore(root / "store")
        domain = await build_domain(await new_builder(store), root / "store")
        return await recovered(store, 7, domain.builder.seq, root / "images")

    return root / "store", asyncio.run(build())


def held_bytes(data: bytes | bytearray | memoryview) -> int:
    """Bytes of the buffer ``data`` keeps alive."""
    if isinstance(data, memoryview):
        return memoryview(data.obj).nbytes
    return len(data)


@pytest.mark.parametrize("length", [512, 4 * KiB])
async def test_a_small_read_keeps_no_unit_alive(domain_images, length: int) -> None:
    store_dir, images = domain_images
    store = FileStore(store_dir)
    plan = await plan_recovery(store, 7, Target.latest())
    cache = UnitCache(1 << 20)
    with ThreadPoolExecutor(2) as executor:
        for disk in plan.disks:
            source = PlanSource(store, disk, plan.segments, cache, executor)
            image = images[f"{disk.vm}/{disk.name}"].read_bytes()
            for offset in range(0, disk.size, 20 * KiB):  # through base parts and segment blocks alike
                data = await source.read(offset, length)
                assert bytes(data) == image[offset : offset + length], (disk.name, offset)
                assert held_bytes(data) <= SLICE_COPY_BELOW * length, (disk.name, offset, type(data),
                                                                       held_bytes(data))
    await cache.close()


async def test_a_read_of_most_of_a_unit_is_not_copied(domain_images) -> None:
    """Large reads keep the view: a copy would cost what the view saves nothing on."""
    store_dir, images = domain_images
    store = FileStore(store_dir)
    plan = await plan_recovery(store, 7, Target.latest())
    disk = plan.disks[0]
    cache = UnitCache(1 << 20)
    with ThreadPoolExecutor(2) as executor:
        source = PlanSource(store, disk, plan.segments, cache, executor)
        image = images[f"{disk.vm}/{disk.name}"].read_bytes()
        views = 0
        for offset in range(0, disk.size, 16 * KiB):
            data = await source.read(offset, 16 * KiB)
            assert bytes(data) == image[offset : offset + 16 * KiB]
            assert held_bytes(data) <= SLICE_COPY_BELOW * 16 * KiB
            views += isinstance(data, memoryview)
    await cache.close()
    assert views > 0
