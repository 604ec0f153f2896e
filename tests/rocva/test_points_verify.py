"""``cdp points`` and ``cdp verify`` on a domain built directly with the library."""

from __future__ import annotations

import numpy as np
import pytest

from cdp.base_image import encode_chunk, encode_manifest
from cdp.catalog import CatalogState, CatalogWriter
from cdp.errors import ConfigError
from cdp.frame import decode_frame, encode_frame
from cdp.layout import base_manifest_key, chunk_key, segment_key
from cdp.records import KIND_MARK
from cdp.segment import build_segment
from cdp.store.memory import MemoryStore
from rocva.points import list_points
from rocva.verify import verify
from tests.catalog_rows import segment_rows
from tests.frames_gen import write_batch

PER_SEGMENT = 20
DISK = 4 << 20


async def make_domain(store, segments: int = 6) -> dict:
    writer = CatalogWriter(store, CatalogState.new(1, "erp", 1, "site-a"), by="test")
    await writer.commit({"disks": [{"disk": 0, "vm": "vm", "name": "d0", "size": DISK},
                                   {"disk": 1, "vm": "vm", "name": "d1", "size": DISK}]})
    # A base for disk 1 at seq 0: two identical chunks (stored once) and a zero chunk.
    raw = bytes(range(256)) * 4096
    h, obj = encode_chunk(raw)
    await store.put(chunk_key(h), obj)
    hashes = np.zeros((4, 16), dtype=np.uint8)
    hashes[0] = hashes[2] = np.frombuffer(h, dtype=np.uint8)
    mkey = base_manifest_key(1, 1, 0, 1)
    await store.put(mkey, encode_manifest(1, 1, 0, DISK, 1 << 20, hashes))
    await writer.commit({"add_bases": [{"timeline": 1, "seq": 0, "disk": 1, "key": mkey, "origin": "seed"}]})
    seq = 1
    for i in range(segments):
        records, payload = write_batch(seq, PER_SEGMENT, 4096)
        records["timestamp_ns"] = 1_000_000 * records["seq"]
        records["offset"] %= DISK
        records["offset"] -= records["offset"] % 4096
        name = {1: b"m1", 3: b"in-resync"}.get(i)
        if name is not None:  # the record at seq + 5 is the mark the catalog names (FORMAT.md §1)
            records["kind"][5], records["length"][5] = KIND_MARK, len(name)
            records["offset"][5] = records["disk"][5] = 0
            payload = payload[: 5 * 4096] + name + payload[6 * 4096 :]
        frame = decode_frame(encode_frame(1, records, payload))
        data = build_segment(1, [frame])
        key = segment_key(1, 1, seq, seq + PER_SEGMENT - 1)
        await store.put(key, data)
        delta = {"add_segments": segment_rows({
            "first_seq": seq, "last_seq": seq + PER_SEGMENT - 1, "first_ts": 1_000_000 * seq,
            "last_ts": 1_000_000 * (seq + PER_SEGMENT - 1), "size": len(data),
            "payload_raw_len": len(payload)})}
        if i == 1:
            delta["add_marks"] = [{"name": "m1", "seq": seq + 5, "ts": 1_000_000 * (seq + 5)}]
        if i == 3:
            delta["add_marks"] = [{"name": "in-resync", "seq": seq + 5, "ts": 1_000_000 * (seq + 5)}]
            delta["set_windows"] = [{"kind": "resync", "first_seq": seq, "last_seq": seq + 9}]
        await writer.commit(delta)
        seq += PER_SEGMENT
    return {"committed": seq - 1, "manifest": mkey, "chunk": chunk_key(h)}


async def test_points_lists_windows_marks_and_times():
    store = MemoryStore()
    made = await make_domain(store)
    pts = await list_points(store, 1)
    assert pts["committed_seq"] == made["committed"] == 120
    assert [(w["first_seq"], w["last_seq"]) for w in pts["consistent"]] == [(0, 60), (71, 120)]
    assert pts["consistent"][1]["first_ts"] == 71_000_000 and pts["consistent"][1]["last_ts"] == 120_000_000
    assert pts["consistent"][0]["first_ts"] is None  # seq 0: before any record
    marks = {m["name"]: m["consistent"] for m in pts["marks"]}
    assert marks == {"m1": True, "in-resync": False}
    assert pts["not_consistent"] == [{"kind": "resync", "first_seq": 61, "last_seq": 70}]
    assert pts["latest"] == 120


async def test_verify_clean_then_every_kind_of_damage_is_named():
    store = MemoryStore()
    made = await make_domain(store)
    for deep in (False, True):
        report = await verify(store, 1, deep=deep)
        assert report["ok"], report["problems"]
        assert report["checked"]["segments"] == 6 and report["checked"]["chunks"] == 1
    seg2 = segment_key(1, 1, 21, 40)
    seg4 = segment_key(1, 1, 61, 80)
    data = bytearray(await store.get(seg2))
    data[100] ^= 1  # inside a block: only a deep scrub reads it
    await store.put(seg2, bytes(data))
    await store.delete(seg4)
    await store.put(segment_key(1, 1, 121, 140), b"orphan")
    report = await verify(store, 1)
    assert not report["ok"]
    assert [p["object"] for p in report["problems"]] == [seg4]
    assert "missing" in report["problems"][0]["problem"] and "gap" in report["problems"][0]["problem"]
    assert report["unreferenced"] == [segment_key(1, 1, 121, 140)]
    deep = await verify(store, 1, deep=True)
    objects = {p["object"] for p in deep["problems"]}
    assert objects == {seg2, seg4}
    # Base damage: a flipped manifest, then a missing chunk.
    m = bytearray(await store.get(made["manifest"]))
    m[70] ^= 1
    await store.put(made["manifest"], bytes(m))
    assert made["manifest"] in {p["object"] for p in (await verify(store, 1))["problems"]}
    m[70] ^= 1
    await store.put(made["manifest"], bytes(m))
    await store.delete(made["chunk"])
    problems = (await verify(store, 1))["problems"]
    assert any(p["object"] == made["chunk"] and "missing" in p["problem"] for p in problems)


async def test_verify_refuses_a_sample_that_is_no_share():
    """NaN compared false with everything: ``sample=nan`` deep-checked nothing and said OK."""
    store = MemoryStore()
    made = await make_domain(store)
    data = bytearray(await store.get(segment_key(1, 1, 21, 40)))
    data[100] ^= 1  # only a deep check (or a sampled one) finds it
    await store.put(segment_key(1, 1, 21, 40), bytes(data))
    for bad in (float("nan"), float("inf"), -0.1, 1.5, True, "0.5"):
        with pytest.raises(ConfigError, match="sample: expected a share of segments in 0..1"):
            await verify(store, 1, sample=bad)
    assert not (await verify(store, 1, sample=1.0))["ok"] and made


async def test_verify_a_domain_without_catalog():
    report = await verify(MemoryStore(), 9)
    assert not report["ok"] and "no catalog" in report["problems"][0]["problem"]


@pytest.mark.parametrize("flip_at", [0, 30, 57])
async def test_verify_names_a_corrupt_catalog_object(flip_at):
    store = MemoryStore()
    await make_domain(store, segments=2)
    key = "d/00000001/cat/0000000000000002.cat"
    data = bytearray(await store.get(key))
    data[flip_at] ^= 1
    await store.put(key, bytes(data))
    report = await verify(store, 1)
    assert not report["ok"] and key in report["problems"][0]["problem"]
