"""Objects a forger wrote with every (unkeyed) checksum right, or strays dropped into the
store: each is refused naming the object and field, before anything large is allocated,
and one stray object does not hide the rest of the store.

A plain store's checksums catch damage, not a writer (FORMAT.md §0): what a reader can
still check is that objects agree with each other and with the format's bounds."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import numpy as np
import pytest
import xxhash

from cdp.catalog import KIND_DELTA, encode_catalog_object, find_domain, load_catalog
from cdp.errors import FormatError
from cdp.layout import catalog_key, catalog_prefix, parse_catalog_key, segment_key
from cdp.segment import build_segment_from_arrays, decode_segment, index_as_records, read_segment_index
from cdp.segment_format import BLOCK_DTYPE, FOOTER, FOOTER_MAGIC, HEADER, INDEX_DTYPE, SEGMENT_MAGIC
from cdp.store.memory import MemoryStore
from cdp.summed import pack_summed
from cdp.testing.domain import DomainBuilder, random_workload
from rocva import RecoverOptions, Target, recover
from rocva.verify import verify
from tests.rocva.test_recover import seed_initial

MiB = 1 << 20


async def domain(name: str = "dom", domain_id: int = 7, store: MemoryStore | None = None) -> DomainBuilder:
    rng = np.random.default_rng(5)
    b = await DomainBuilder(store or MemoryStore(), domain=domain_id, name=name).start()
    await seed_initial(b, 0, rng)
    await random_workload(b, rng, 40, seal_every=8)
    return b


async def next_generation(store: MemoryStore, domain_id: int) -> int:
    return max([parse_catalog_key(i.key)[1] async for i in store.list(catalog_prefix(domain_id))]) + 1


async def forged_delta(b: DomainBuilder, body: dict) -> None:
    gen = await next_generation(b.store, b.domain)
    body = {"writer": {"id": "0" * 32, "by": "forger"}, **body}
    await b.store.put(catalog_key(b.domain, gen), encode_catalog_object(b.domain, gen, KIND_DELTA, body))


async def test_one_block_claiming_4_gib_is_refused_from_the_tail() -> None:
    """A 13 KB segment whose one block says 4 GiB raw: recovery sized a buffer by it
    (4.2 GB RSS) before lz4 said no. Refused as the tail is read."""
    store = MemoryStore()
    n, raw_total = 256, (1 << 32) - 512
    rec = np.zeros(n, INDEX_DTYPE)
    rec["seq"] = np.arange(1, n + 1)
    rec["timestamp_ns"] = 1_700_000_000_000_000_000
    rec["length"] = [16 * MiB] * (n - 1) + [16 * MiB - 512]
    rec["raw_pos"] = np.concatenate([[0], np.cumsum(rec["length"])[:-1]])
    stored = b"\x00"
    blk = np.zeros(1, BLOCK_DTYPE)
    blk[0] = (64, len(stored), raw_total, xxhash.xxh3_64_intdigest(stored), 0, 1, b"\0" * 6)
    body = blk.tobytes() + rec.tobytes()
    ts = int(rec["timestamp_ns"][0])
    header = pack_summed(HEADER, SEGMENT_MAGIC, 1, 0, 7, 64 << 10, 1, n, ts, ts, 0)
    footer = pack_summed(FOOTER, FOOTER_MAGIC, 1, 0, 7, 1, 1, n, 64 + len(stored), raw_total,
                         xxhash.xxh3_64_intdigest(body))
    key = segment_key(7, 1, 1, n)
    await store.put(key, header + stored + body + footer)
    with pytest.raises(FormatError, match=r"block 0 .*raw_len 4294966784 exceeds the largest block_raw_size"):
        await read_segment_index(store, key)


async def test_segment_times_that_disagree_with_the_catalog_are_refused(tmp_path: Path) -> None:
    """A valid segment of the same seqs, payload and size, timed 1 s later than its catalog
    row: ``--at`` hit an assert (and under -O picked another seq); verify said OK."""
    b = await domain()
    key = b.segment_keys[0]
    index, payload = decode_segment(key, await b.store.get(key))
    recs = index_as_records(index.records)
    recs["timestamp_ns"] += 1_000_000_000
    await b.store.put(key, build_segment_from_arrays(b.domain, recs, payload, block_raw_size=b.block_raw_size))
    at = datetime.datetime.fromtimestamp((b.ts(2) + 1) / 1e9, datetime.timezone.utc).isoformat()
    for target in (Target.at(at), Target.latest()):
        with pytest.raises(FormatError, match=rf"segment {key}: seqs .* are timed .* the catalog says"):
            await recover(b.store, b.domain, RecoverOptions(target, tmp_path / "out"))
    report = await verify(b.store, b.domain)
    assert not report["ok"] and any("are timed" in p["problem"] for p in report["problems"]), report


@pytest.mark.parametrize("bad", [[0], "0", None, -1, True])
async def test_a_remove_bases_seq_that_is_no_integer_is_refused(bad) -> None:
    b = await domain()
    await forged_delta(b, {"remove_bases": [{"seq": bad, "disk": 0}]})
    with pytest.raises(FormatError, match=r"remove_bases\[0\]\.seq is .*expected an integer"):
        await load_catalog(b.store, b.domain)


@pytest.mark.parametrize("size", [0xFFFFFFFFFFFFFE00, (1 << 62) + 512, 0, 1000])
async def test_a_disk_size_out_of_bounds_is_refused(size: int) -> None:
    """A size past 2^62 ended a recovery in an OverflowError traceback, leaving .partial
    files; one not in whole sectors is no disk at all."""
    b = await domain()
    disks = [dict(d) for d in b.disks]
    disks[1]["size"] = size
    await forged_delta(b, {"disks": disks})
    with pytest.raises(FormatError, match=r"disks\[1\]\.size is"):
        await load_catalog(b.store, b.domain)


async def test_verify_reports_a_manifest_whose_size_the_catalog_contradicts() -> None:
    """Verify said OK while every recovery refused the base: it now checks what they do."""
    b = await domain()
    disks = [dict(d) for d in b.disks]
    disks[0]["size"] *= 2
    await forged_delta(b, {"disks": disks})
    report = await verify(b.store, b.domain)
    problems = [p for p in report["problems"] if p["object"] in b.base_keys]
    assert problems and "the catalog says its disk has" in problems[0]["problem"], report


async def test_a_stray_key_or_an_unreadable_catalog_does_not_hide_other_domains(caplog) -> None:
    store = MemoryStore()
    await domain("wanted", 9, store)
    await store.put("d/0.txt", b"hi")  # sorts before every domain
    await store.put("d/zz/x", b"hi")
    await store.put(catalog_key(1, 1), b"bad")  # domain 1's only generation: unreadable
    with caplog.at_level(logging.WARNING, logger="cdp.catalog"):
        found = await find_domain(store, "wanted")
    assert found is not None and found[0] == 9
    events = [r.getMessage() for r in caplog.records]
    assert events == ["stray_key_skipped", "catalog_unreadable", "stray_key_skipped"], events  # d/0.txt, domain 1, d/zz/x
    # Not found among the readable ones: the unreadable one is said, not a bare "no domain".
    with pytest.raises(FormatError, match=r"no readable domain is named 'other'.*domain 1"):
        await find_domain(store, "other")
