"""The catalog (docs/FORMAT.md §8): object codec, state invariants, chain loading, fencing."""

from __future__ import annotations

import asyncio
import json
import struct

import numpy as np
import pytest
import xxhash

from cdp.catalog import (
    KIND_DELTA, KIND_SNAPSHOT, _HEADER, CatalogState, CatalogWriter, commit_catalog,
    decode_catalog_object, encode_catalog_object, load_catalog,
)
from cdp.errors import AlreadyExists, ChecksumMismatch, FormatError, TruncatedError
from cdp.layout import base_manifest_key, catalog_key, segment_key
from cdp.store.memory import MemoryStore

TS0 = 1_700_000_000_000_000_000

SPEC_EXAMPLE = {  # FORMAT.md §8.2, verbatim
    "domain": {"id": 7, "name": "erp", "created_ns": 1700000000000000000},
    "disks": [{"disk": 0, "vm": "erp-db", "name": "disk0", "size": 10737418240}],
    "segments": [{"key": "d/00000007/seg/0000000000000001-00000000000003e8.seg",
                  "first_seq": 1, "last_seq": 1000,
                  "first_ts": 1700000000000000000, "last_ts": 1700000000900000000,
                  "size": 4194304, "payload_raw_len": 4096000}],
    "bases": [{"seq": 0, "disk": 0, "key": "d/00000007/base/0000000000000000/00000000.bmf", "origin": "seed"}],
    "marks": [{"name": "app-quiesced", "seq": 1000, "ts": 1700000000900000000}],
    "windows": [{"kind": "seeding", "first_seq": 1, "last_seq": 40}],
    "committed_seq": 1000,
    "horizon_seq": 0,
}


def seg(domain: int, first: int, last: int, size: int = 1000) -> dict:
    return {"key": segment_key(domain, first, last), "first_seq": first, "last_seq": last,
            "first_ts": TS0 + first, "last_ts": TS0 + last, "size": size, "payload_raw_len": size * 2}


def run(coro):
    return asyncio.run(coro)


# --------------------------------------------------------------------------- codec


def test_header_layout_matches_the_spec_table() -> None:
    assert _HEADER.size == 64
    raw = _HEADER.pack(b"CDPC", 1, 2, 3, 4, 5, 6, b"r" * 24, 7)
    assert raw[6:8] == b"\2\0" and raw[8:12] == struct.pack("<I", 3) and raw[12:16] == struct.pack("<I", 4)
    assert raw[16:24] == struct.pack("<Q", 5) and raw[24:32] == struct.pack("<Q", 6)
    assert raw[32:56] == b"r" * 24 and raw[56:64] == struct.pack("<Q", 7)


def test_object_round_trip_is_compact_sorted_utf8() -> None:
    body = {"z": 1, "a": ["mark é ✓", None, True], "m": {"y": 2, "b": 3}}
    obj = encode_catalog_object(7, 3, KIND_DELTA, body)
    assert obj[64:] == '{"a":["mark é ✓",null,true],"m":{"b":3,"y":2},"z":1}'.encode()
    assert decode_catalog_object(catalog_key(7, 3), obj) == (KIND_DELTA, 3, 7, body)


def test_key_must_name_the_header_generation_and_domain() -> None:
    obj = encode_catalog_object(7, 3, KIND_SNAPSHOT, SPEC_EXAMPLE)
    for key in (catalog_key(7, 4), catalog_key(8, 3)):
        with pytest.raises(FormatError, match="the key says"):
            decode_catalog_object(key, obj)
    with pytest.raises(FormatError):
        decode_catalog_object("d/00000007/cat/3.cat", obj)


def _raw_object(domain: int, generation: int, kind: int, body: bytes) -> bytes:
    header = bytearray(_HEADER.pack(b"CDPC", 1, kind, domain, len(body), generation,
                                    xxhash.xxh3_64_intdigest(body), bytes(24), 0))
    struct.pack_into("<Q", header, 56, xxhash.xxh3_64_intdigest(bytes(header[:56])))
    return bytes(header) + body


@pytest.mark.parametrize("body", [b"[1,2]", b'{"a":NaN}', b'{"a":', b"\xff{}", b'{"a":Infinity}'])
def test_checksummed_but_invalid_bodies_are_refused(body) -> None:
    with pytest.raises(FormatError, match="body"):
        decode_catalog_object(catalog_key(1, 1), _raw_object(1, 1, KIND_DELTA, body))


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(FormatError, match="kind"):
        decode_catalog_object(catalog_key(1, 1), _raw_object(1, 1, 3, b"{}"))


def test_every_byte_flip_and_truncation_is_detected() -> None:
    obj = encode_catalog_object(7, 9, KIND_SNAPSHOT, SPEC_EXAMPLE)
    key = catalog_key(7, 9)
    buf = bytearray(obj)
    for pos in range(len(buf)):
        for mask in (0x01, 0xFF):
            buf[pos] ^= mask
            with pytest.raises(FormatError):
                decode_catalog_object(key, buf)
            buf[pos] ^= mask
    for n in range(len(obj)):
        with pytest.raises(FormatError):
            decode_catalog_object(key, obj[:n])
    with pytest.raises(TruncatedError):
        decode_catalog_object(key, obj[:-1])
    with pytest.raises(FormatError):
        decode_catalog_object(key, obj + b" ")
    buf = bytearray(obj)
    buf[70] ^= 1
    with pytest.raises(ChecksumMismatch, match="body_xxh3"):
        decode_catalog_object(key, buf)


# --------------------------------------------------------------------------- state


def test_spec_example_snapshot_round_trips() -> None:
    state = CatalogState.from_snapshot_body(json.loads(json.dumps(SPEC_EXAMPLE)))
    assert state.to_snapshot_body() == SPEC_EXAMPLE
    assert state.committed_seq == 1000 and state.domain_id == 7
    ref = state.segment_for_seq(500)
    assert ref is not None and ref.key == SPEC_EXAMPLE["segments"][0]["key"] and ref.size == 4194304
    assert state.segment_for_seq(1001) is None and state.segment_for_seq(0) is None


def _state(n: int, domain: int = 7, seg_len: int = 10) -> CatalogState:
    state = CatalogState.new(domain, "erp", TS0)
    state.apply_delta({"add_segments": [seg(domain, 1 + i * seg_len, (i + 1) * seg_len) for i in range(n)]})
    return state


def test_lookups_by_seq() -> None:
    state = _state(1000)
    for seq in (1, 10, 11, 5555, 10000):
        ref = state.segment_for_seq(seq)
        assert ref.first_seq <= seq <= ref.last_seq and ref.key == segment_key(7, ref.first_seq, ref.last_seq)
    assert state.segment_for_seq(10001) is None
    rows = state.segments_between(15, 41)
    assert rows["first_seq"].tolist() == [11, 21, 31, 41]
    assert state.segment_keys(rows)[0] == segment_key(7, 11, 20)
    assert len(state.segments_between(20000, 30000)) == 0
    assert state.segments_between(0, 1)["first_seq"].tolist() == [1]


def test_many_segments_append_and_trim_without_python_objects_per_lookup() -> None:
    state = CatalogState.new(7, "big", TS0)
    for i in range(200):  # 200 deltas of 500 segments: 100 000 segments
        first = 1 + i * 500 * 4
        state.apply_delta({"add_segments": [seg(7, first + 4 * j, first + 4 * j + 3) for j in range(500)]})
    assert len(state.segments) == 100_000 and state.committed_seq == 400_000
    assert state.segment_for_seq(123_457).first_seq == 123_457
    state.apply_delta({"remove_segments": [segment_key(7, 1 + 4 * j, 4 + 4 * j) for j in range(1000)],
                       "horizon_seq": 4001})
    assert len(state.segments) == 99_000 and state.segment_for_seq(4000) is None
    back = CatalogState.from_snapshot_body(state.to_snapshot_body())
    assert back == state


@pytest.mark.parametrize(
    "delta,message",
    [
        ({"add_segments": [seg(7, 32, 40)]}, "expected committed_seq \\+ 1 = 31"),  # gap
        ({"add_segments": [seg(7, 30, 40)]}, "expected committed_seq"),  # overlap
        ({"add_segments": [seg(7, 31, 40), seg(7, 42, 50)]}, "contiguous"),
        ({"add_segments": [seg(7, 31, 40), seg(7, 40, 50)]}, "contiguous"),
        ({"add_segments": [dict(seg(7, 31, 40), key=segment_key(7, 31, 41))]}, "does not match"),
        ({"add_segments": [dict(seg(7, 31, 40), last_ts=TS0)]}, "ends before it starts"),
        ({"add_segments": [seg(7, 31, 40)], "committed_seq": 39}, "committed_seq 39"),
        ({"committed_seq": 31}, "committed_seq 31"),
        ({"remove_segments": [segment_key(7, 11, 20)]}, "hole in the middle"),
        ({"remove_segments": [segment_key(7, 1, 11)]}, "not in the catalog"),
        ({"remove_segments": [segment_key(8, 1, 10)]}, "not a segment of this domain"),
        ({"remove_segments": [segment_key(7, 1, 10), segment_key(7, 1, 10)]}, "remove_segments"),
        ({"horizon_seq": 5, "committed_seq": 30}, None),
        ({"add_marks": [{"name": "a", "seq": 31, "ts": TS0}]}, "after committed_seq"),
        ({"add_marks": [{"name": "a", "seq": 9, "ts": TS0}, {"name": "b", "seq": 9, "ts": TS0}]},
         "not after the previous mark"),
        ({"add_marks": [{"name": "", "seq": 9, "ts": TS0}]}, "UTF-8 bytes"),
        ({"set_windows": [{"kind": "other", "first_seq": 1, "last_seq": None}]}, "kind"),
        ({"set_windows": [{"kind": "resync", "first_seq": 5, "last_seq": 4}]}, "ends before"),
        ({"remove_bases": [{"seq": 1, "disk": 0}]}, "not in the catalog"),
        ({"add_bases": [{"seq": 0, "disk": 0, "key": "x", "origin": "seed"}]}, "is not the key"),
        ({"add_bases": [{"seq": 0, "disk": 0, "key": base_manifest_key(7, 0, 0), "origin": "x"}]}, "origin"),
        ({"disks": [{"disk": 0, "vm": "a", "name": "b", "size": 1}] * 2}, "twice"),
        ({"committed_seq": -1}, "integer"),
        ({"committed_seq": True}, "integer"),
        ({"surprise": 1}, "unknown keys"),
    ],
)
def test_refused_deltas_leave_the_state_unchanged(delta, message) -> None:
    state = _state(3)
    state.apply_delta({"add_bases": [{"seq": 0, "disk": 0, "key": base_manifest_key(7, 0, 0), "origin": "seed"}],
                       "horizon_seq": 5})
    before = state.to_snapshot_body()
    if message is None:  # the control case: a valid delta
        state.apply_delta(delta)
        return
    with pytest.raises(FormatError, match=message):
        state.apply_delta(delta)
    assert state.to_snapshot_body() == before


def test_horizon_never_goes_back_and_retention_removes_the_front() -> None:
    state = _state(3)
    state.apply_delta({"horizon_seq": 11})
    with pytest.raises(FormatError, match="goes back"):
        state.apply_delta({"horizon_seq": 10})
    state.apply_delta({"remove_segments": [segment_key(7, 11, 20), segment_key(7, 1, 10)]})
    assert state.segments.column("first_seq").tolist() == [21]
    state.apply_delta({"remove_segments": [segment_key(7, 21, 30)]})
    assert len(state.segments) == 0 and state.committed_seq == 30
    with pytest.raises(FormatError, match="expected committed_seq"):
        state.apply_delta({"add_segments": [seg(7, 1, 10)]})
    state.apply_delta({"add_segments": [seg(7, 31, 40)]})
    assert state.committed_seq == 40


def test_snapshot_body_is_validated() -> None:
    for change, message in (
        ({"committed_seq": 999}, "committed_seq"),
        ({"extra": 1}, "keys"),
        ({"segments": [seg(7, 1, 10), seg(7, 12, 20)]}, "contiguous"),
        ({"bases": SPEC_EXAMPLE["bases"] * 2}, "twice"),
        ({"domain": {"id": 7, "name": "erp"}}, "domain"),
    ):
        with pytest.raises(FormatError, match=message):
            CatalogState.from_snapshot_body({**SPEC_EXAMPLE, **change})


# --------------------------------------------------------------------------- chain


async def _write_chain(store, domain: int, kinds: str) -> CatalogState:
    """Write generations 1.. with kinds 'S'/'D'; return the state at the last one."""
    state = CatalogState.new(domain, "d", TS0)
    for g, kind in enumerate(kinds, start=1):
        delta = {"add_segments": [seg(domain, 1 + (g - 1) * 10, g * 10)]}
        state.apply_delta(delta)
        if kind == "S":
            await commit_catalog(store, domain, g, KIND_SNAPSHOT, state.to_snapshot_body())
        else:
            await commit_catalog(store, domain, g, KIND_DELTA, delta)
    return state


def test_load_applies_the_deltas_after_the_newest_snapshot() -> None:
    async def go() -> None:
        store = MemoryStore()
        expected = await _write_chain(store, 5, "SDDDSDDDDDDDDDDDDD")
        await _write_chain(store, 6, "S")  # another domain does not interfere
        state, generation = await load_catalog(store, 5)
        assert generation == 18 and state == expected and state.committed_seq == 180
        # Generations before the newest snapshot are not needed, even when broken.
        await store.delete(catalog_key(5, 2))
        await store.put(catalog_key(5, 3), b"garbage")
        state, generation = await load_catalog(store, 5)
        assert generation == 18 and state == expected

    run(go())


def test_missing_generation_is_named() -> None:
    async def go() -> None:
        store = MemoryStore()
        await _write_chain(store, 5, "SDDDDD")
        await store.delete(catalog_key(5, 4))
        with pytest.raises(FormatError, match=f"generation 4 \\({catalog_key(5, 4)}\\) is missing"):
            await load_catalog(store, 5)

    run(go())


def test_chain_without_a_snapshot_is_refused() -> None:
    async def go() -> None:
        store = MemoryStore()
        await _write_chain(store, 5, "DD")
        with pytest.raises(FormatError, match="generation 1 is a DELTA"):
            await load_catalog(store, 5)

    run(go())


def test_corrupt_object_in_the_chain_is_named() -> None:
    async def go() -> None:
        store = MemoryStore()
        await _write_chain(store, 5, "SDD")
        key = catalog_key(5, 2)
        data = bytearray(await store.get(key))
        data[-3] ^= 0x20
        await store.delete(key)
        await store.put(key, data)
        with pytest.raises(ChecksumMismatch, match=key):
            await load_catalog(store, 5)
        await store.put(catalog_key(5, 4), encode_catalog_object(5, 4, KIND_DELTA, {"committed_seq": 7}))
        await store.delete(key)
        await _write_chain(store, 9, "SD")  # a good generation 2 for domain 9, copied over
        await store.put(key, await store.get(catalog_key(9, 2)))
        with pytest.raises(FormatError, match=key):
            await load_catalog(store, 5)

    run(go())


def test_no_catalog_is_none() -> None:
    assert run(load_catalog(MemoryStore(), 5)) == (None, 0)


def test_stray_key_under_the_catalog_prefix_is_refused() -> None:
    async def go() -> None:
        store = MemoryStore()
        await _write_chain(store, 5, "S")
        await store.put("d/00000005/cat/tmp", b"x")
        with pytest.raises(FormatError, match="d/00000005/cat/tmp"):
            await load_catalog(store, 5)

    run(go())


def test_two_writers_one_is_fenced() -> None:
    async def go() -> None:
        store = MemoryStore()
        first = CatalogWriter(store, CatalogState.new(5, "d", TS0))
        assert await first.commit({"add_segments": [seg(5, 1, 10)]}) == 1
        a = await CatalogWriter.open(store, 5)
        b = await CatalogWriter.open(store, 5)
        assert a.next_generation == b.next_generation == 2
        assert await a.commit({"add_segments": [seg(5, 11, 20)]}) == 2
        with pytest.raises(AlreadyExists):
            await b.commit({"add_segments": [seg(5, 11, 30)]})
        assert b.generation == 1 and b.state.committed_seq == 10  # the loser is unchanged
        with pytest.raises(AlreadyExists):
            await commit_catalog(store, 5, 2, KIND_DELTA, {})
        state, generation = await load_catalog(store, 5)
        assert generation == 2 and state == a.state

    run(go())


def test_writer_snapshots_every_n_generations() -> None:
    async def go() -> None:
        store = MemoryStore()
        writer = CatalogWriter(store, CatalogState.new(5, "d", TS0), snapshot_every=4)
        for g in range(1, 11):
            await writer.commit({"add_segments": [seg(5, 1 + (g - 1) * 10, g * 10)],
                                 "add_marks": [{"name": f"m{g}", "seq": g * 10, "ts": TS0}]})
        kinds = []
        for g in range(1, 11):
            kinds.append(decode_catalog_object(catalog_key(5, g), await store.get(catalog_key(5, g)))[0])
        assert kinds == [KIND_SNAPSHOT, KIND_DELTA, KIND_DELTA, KIND_SNAPSHOT, KIND_DELTA,
                         KIND_DELTA, KIND_DELTA, KIND_SNAPSHOT, KIND_DELTA, KIND_DELTA]
        with pytest.raises(FormatError):
            await writer.commit({"add_segments": [seg(5, 200, 210)]})
        assert writer.generation == 10
        state, generation = await load_catalog(store, 5)
        assert generation == 10 and state == writer.state and len(state.marks) == 10
        assert np.array_equal(state.segments.column("last_seq"), np.arange(10, 101, 10, dtype=np.uint64))

    run(go())


def test_marks_below_the_horizon_are_dropped() -> None:
    state = _state(3)
    state.apply_delta({"add_marks": [{"name": "a", "seq": 5, "ts": 1}, {"name": "b", "seq": 15, "ts": 2}]})
    state.apply_delta({"horizon_seq": 11})
    assert [m["name"] for m in state.marks] == ["b"]


def test_maintenance_difference_tells_consolidation_from_another_writer() -> None:
    """§8.3: what a DRVA may absorb (bases, front removal, horizon) and what fences it."""
    old = _state(6)
    old.apply_delta({"add_marks": [{"name": "a", "seq": 2, "ts": 1}, {"name": "b", "seq": 5, "ts": 2}]})
    keys = old.segment_keys(old.segments.rows(0, 2))
    base = {"seq": 4, "disk": 0, "key": base_manifest_key(7, 4, 0), "origin": "consolidation"}
    ok = old.copy()
    ok.apply_delta({"add_bases": [base], "remove_segments": keys, "horizon_seq": 4})
    assert old.maintenance_difference(ok) is None
    assert [m["name"] for m in ok.marks] == ["b"]  # the horizon dropped mark "a"
    assert old.maintenance_difference(old.copy()) is None
    grown = old.copy()
    grown.apply_delta({"add_segments": [seg(7, old.committed_seq + 1, old.committed_seq + 3)]})
    assert "committed_seq" in old.maintenance_difference(grown)
    marked = old.copy()
    marked.apply_delta({"add_marks": [{"name": "c", "seq": 6, "ts": 3}]})
    assert "marks" in old.maintenance_difference(marked)
    windowed = old.copy()
    windowed.apply_delta({"set_windows": [{"kind": "resync", "first_seq": 3, "last_seq": 4}]})
    assert "windows" in old.maintenance_difference(windowed)
    assert "committed_seq" in grown.maintenance_difference(old)


def test_commit_shared_absorbs_maintenance_and_refuses_another_owner() -> None:
    """§8.3 through CatalogWriter.commit_shared: a lost race to a consolidation generation is
    absorbed and the delta retried on top; a race lost to another owner fences."""
    async def go() -> None:
        store = MemoryStore()
        owner = CatalogWriter(store, _state(2), 0)
        await owner.commit({})
        job = await CatalogWriter.open(store, 7)
        keys = job.state.segment_keys(job.state.segments.rows(0, 1))
        await job.commit({"remove_segments": keys, "horizon_seq": 10})
        generation = await owner.commit_shared({"add_segments": [seg(7, 21, 30)]})
        assert generation == 3 and owner.state.horizon_seq == 10 and owner.state.committed_seq == 30
        other = await CatalogWriter.open(store, 7)
        await other.commit({"add_segments": [seg(7, 31, 40)]})
        with pytest.raises(AlreadyExists, match="committed_seq moved"):
            await owner.commit_shared({"add_segments": [seg(7, 31, 35)]})

    run(go())
