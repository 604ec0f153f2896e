"""A DRVA serving domains that live in two stores (FORMAT.md §13.4, version 2: a domain's
own ``store``): each domain's segments, catalog, base and chunks go to its store and
nowhere else, and a store that hangs holds back only its own domains (``drva.lanes``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from cdp.errors import ConfigError
from cdp.layout import domain_prefix
from cdp.store.faulty import FaultyStore
from cdp.store.fs import FileStore
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from iofilter_sim.seeding import seed_disk
from tests.drva.harness import (
    EVENTUALLY_S, SECRET, Disk, check_store, config, domain_doc, drva_doc, random_writes, running_drva, wait_until,
)

DISK = 4 << 20
HIDDEN = "hunter2-SECRET"  # in a bad URL: never in a message
SEGMENTS_AHEAD = 8  # erp segments sealed while store A hangs: more than one lane's uploaders and queue hold


def _crm_in(store: object) -> dict:
    return {**domain_doc(2, "crm", [("vm2", "d0", DISK)]), "store": store}


def test_a_domain_may_name_its_own_store_from_version_2_on(tmp_path) -> None:
    doc = drva_doc(tmp_path, "drva-v", [domain_doc(1, "erp", [("vm1", "d0", DISK)]), _crm_in("store-b")], version=2)
    cfg = config(doc)
    assert [d.store_url for d in cfg.domains] == [None, f"file://{(Path.cwd() / 'store-b').resolve()}"]
    assert cfg.store_urls() == (doc["store"], cfg.domains[1].store_url)
    same = config({**doc, "domains": [domain_doc(1, "erp", [("vm1", "d0", DISK)]), _crm_in(doc["store"])]})
    assert same.store_urls() == (doc["store"],)  # one store, one lane


BAD_DOMAIN_STORES = [
    # (version, the domain's store, the key in the message, words of what was expected)
    (1, "store-b", "domains[1].store", "needs version = 2"),
    (None, "store-b", "domains[1].store", "needs version = 2"),
    (3, "store-b", "version", "expected one of 1, 2"),
    ("2", "store-b", "version", "is not a int"),
    (2, "", "domains[1].store", "empty store URL"),
    (2, 7, "domains[1].store", "is not a str"),
    (2, "ftp://host/x", "domains[1].store", "unknown scheme"),
    (2, f"s3://AKID:{HIDDEN}@bucket/x", "domains[1].store", "credentials in the URL are refused"),
    (2, f"s3://bucket/x?token={HIDDEN}", "domains[1].store", "unknown query parameter"),
]


@pytest.mark.parametrize("version,store,key,expected", BAD_DOMAIN_STORES, ids=[str(b[:2]) for b in BAD_DOMAIN_STORES])
def test_a_bad_domain_store_is_refused_with_the_key(tmp_path, version, store, key, expected) -> None:
    extra = {} if version is None else {"version": version}
    doc = drva_doc(tmp_path, "drva-v", [domain_doc(1, "erp", [("vm1", "d0", DISK)]), _crm_in(store)], **extra)
    with pytest.raises(ConfigError) as err:
        config(doc)
    assert err.value.message.startswith(f"test config: {key}: "), err.value.message
    assert expected in err.value.message and HIDDEN not in err.value.message, err.value.message


def _keys(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


async def test_each_domain_ships_to_its_store_and_a_hung_store_holds_back_only_its_domains(tmp_path) -> None:
    store_a, store_b = tmp_path / "store-a", tmp_path / "store-b"
    crm = _crm_in(f"file://{store_b}")
    doc = drva_doc(tmp_path, "drva-s", [domain_doc(1, "erp", [("vm1", "d0", DISK)]), crm],
                   store=f"file://{store_a}", version=2, seal_bytes="1MiB", seal_age_s=0.1)
    disks = [Disk(tmp_path / "erp.img", DISK), Disk(tmp_path / "crm.img", DISK, fill_seed=3)]
    filters = [DomainFilter(1, [disks[0]]), DomainFilter(2, [disks[1]])]
    rng = np.random.default_rng(12)

    def committed(i: int) -> bool:
        return d.domains[filters[i].domain].committed_seq == filters[i].next_seq - 1

    async with running_drva(config(doc)) as d:
        assert [(lane.url, [x.id for x in lane.domains]) for lane in d.lanes] == [
            (f"file://{store_a}", [1]), (f"file://{store_b}", [2])]
        assert [s["domains"] for s in d.status()["stores"]] == [[1], [2]]
        client = FilterClient(filters, "127.0.0.1", d.port, SECRET.encode(), "host-1")
        task = asyncio.create_task(client.run())
        try:
            seeded = await seed_disk(client, filters[1], 0, chunk_size=1 << 20)  # crm's disk has content
            assert seeded["chunks_stored"] > 0
            for f in filters:
                f.capture(*random_writes(rng, [DISK], 32, 32))
            await wait_until(lambda: committed(0) and committed(1), EVENTUALLY_S, "both domains committed")

            # Store A hangs: erp's segments pile up in its lane, crm's still reach store B.
            hung = FaultyStore(FileStore(store_a))
            hung.hang("put")
            d.shipper.store = hung
            erp_before = d.domains[1].committed_seq
            for _ in range(SEGMENTS_AHEAD):
                filters[0].capture(*random_writes(rng, [DISK], 8, 16))
                await asyncio.sleep(0.15)  # past seal_age_s: a segment each
            filters[1].capture(*random_writes(rng, [DISK], 32, 32))
            await wait_until(lambda: committed(1), EVENTUALLY_S, "crm committed while store A hangs")
            assert d.domains[1].committed_seq == erp_before and hung.calls["put"] > 1
            hung.release("put")
            await wait_until(lambda: committed(0), EVENTUALLY_S, "erp committed once store A answers")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    a, b = _keys(store_a), _keys(store_b)
    assert any(k.startswith(domain_prefix(1)) for k in a) and any(k.startswith(domain_prefix(2)) for k in b)
    assert not [k for k in a if k.startswith((domain_prefix(2), "c/"))], a  # nothing of crm in store A
    assert not [k for k in b if k.startswith(domain_prefix(1))], b  # nothing of erp in store B
    assert any(k.startswith("c/") for k in b)  # crm's chunks, with its base
    await check_store(FileStore(store_a), 1, [disks[0].sha256()], tmp_path)
    summary = await check_store(FileStore(store_b), 2, [disks[1].sha256()], tmp_path)
    assert [base["disk"] for base in summary["bases"]] == [0]
