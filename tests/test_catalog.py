"""The catalog (docs/FORMAT.md §8): object codec, pages, the delta rules, chain loading,
collection, fencing, own generations and timelines.

The paged catalog against a simple model (random commits, retention, forks, lost
replies) is in tests/test_catalog_model.py.
"""

from __future__ import annotations

import asyncio
import json
import struct

import numpy as np
import pytest
import xxhash

from cdp import catalog_page
from cdp.catalog import (
    FETCH_BATCH_MAX, KIND_DELTA, KIND_SNAPSHOT, SNAPSHOT_EVERY, _HEADER, CatalogState, CatalogWriter, collect_generations,
    commit_catalog, decode_catalog_object, encode_catalog_object, list_generations, load_catalog,
)
from cdp.catalog_fork import fork_timeline
from cdp.catalog_page import (
    PAGE_ROWS, ROW_DTYPE, decode_page, encode_page, plan_folds, ref_key,
)
from cdp.catalog_read import CatalogView
from cdp.errors import AlreadyExists, ChecksumMismatch, Fenced, FormatError, NotFound, StoreUnavailable, TruncatedError
from cdp.layout import catalog_key, page_prefix
from cdp.locks import recovery_lease
from cdp.store.faulty import FaultyStore
from cdp.store.base import ObjectInfo
from cdp.store.memory import MemoryStore
from tests.catalog_rows import segment_rows

TS0 = 1_700_000_000_000_000_000
WRITER = {"id": "5f1c0e2d9a8b7c6d5e4f3a2b1c0d9e8f", "by": "drva drva-1@site-a"}

SPEC_EXAMPLE = {  # FORMAT.md §8.2, verbatim
    "writer": {"id": "5f1c0e2d9a8b7c6d5e4f3a2b1c0d9e8f", "by": "drva drva-1@site-a"},
    "domain": {"id": 7, "name": "erp", "created_ns": 1700000000000000000},
    "disks": [{"disk": 0, "vm": "erp-db", "name": "disk0", "size": 10737418240}],
    "current": 1,
    "timelines": [{
        "id": 1, "parent": 0, "fork_seq": 0, "owner": "site-a",
        "created_ns": 1700000000000000000,
        "committed_seq": 1000, "horizon_seq": 0,
        "pages": {"level": [], "first_seq": [], "last_seq": [], "first_ts": [], "last_ts": [],
                  "count": [], "segments": [], "bytes": [], "hash": []},
        "tail": {"timeline": [1], "first_seq": [1], "last_seq": [1000], "object_last_seq": [1000],
                 "first_ts": [1700000000000000000], "last_ts": [1700000000900000000],
                 "size": [4194304], "payload_raw_len": [4096000]},
        "bases": [{"timeline": 1, "seq": 0, "disk": 0, "origin": "seed",
                   "key": "d/00000007/base/00000001/0000000000000000/00000000.bmf"}],
        "marks": [{"name": "app-quiesced", "seq": 1000, "ts": 1700000000900000000}],
        "windows": [{"kind": "seeding", "first_seq": 1, "last_seq": 40}],
    }],
}
DISKS = [{"disk": 0, "vm": "vm", "name": "d0", "size": 1 << 20}]


def seg(first: int, last: int, *, timeline: int = 1, size: int = 1000) -> dict:
    return segment_rows({"timeline": timeline, "first_seq": first, "last_seq": last, "first_ts": TS0 + first,
                         "last_ts": TS0 + last, "size": size, "payload_raw_len": size * 2})


def run(coro):
    return asyncio.run(coro)


async def new_domain(store, *, owner: str = "site-a", snapshot_every: int = SNAPSHOT_EVERY) -> CatalogWriter:
    writer = CatalogWriter(store, CatalogState.new(7, "erp", TS0, owner), by="test", owner=owner,
                           snapshot_every=snapshot_every)
    await writer.commit({"disks": DISKS})
    return writer


async def append(writer: CatalogWriter, n: int, per: int = 10) -> int:
    """Commit ``n`` segments of ``per`` seqs each; return the new committed seq."""
    for _ in range(n):
        first = writer.state.timeline().committed_seq + 1
        await writer.commit({"add_segments": seg(first, first + per - 1, timeline=writer.state.current)})
    return writer.state.timeline().committed_seq


# --------------------------------------------------------------------------- codec


def test_header_layout_matches_the_spec_table() -> None:
    assert _HEADER.size == 64
    raw = _HEADER.pack(b"CDPC", 2, 2, 3, 4, 5, 6, b"r" * 24, 7)
    assert raw[4:6] == b"\2\0" and raw[6:8] == b"\2\0"
    assert raw[8:12] == struct.pack("<I", 3) and raw[12:16] == struct.pack("<I", 4)
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


def _raw_object(domain: int, generation: int, kind: int, body: bytes, version: int = 2) -> bytes:
    header = bytearray(_HEADER.pack(b"CDPC", version, kind, domain, len(body), generation,
                                    xxhash.xxh3_64_intdigest(body), bytes(24), 0))
    struct.pack_into("<Q", header, 56, xxhash.xxh3_64_intdigest(bytes(header[:56])))
    return bytes(header) + body


def test_a_version_1_object_is_refused_naming_its_version() -> None:
    v1 = _raw_object(7, 1, KIND_SNAPSHOT, b'{"segments":[]}', version=1)
    with pytest.raises(FormatError, match="version 1, expected 2"):
        decode_catalog_object(catalog_key(7, 1), v1)


@pytest.mark.parametrize("body", [b"\xff\xfe", b"[1,2]", b'{"a":NaN}', b"{" * 100_000, b'{"a":1'])
def test_checksummed_but_invalid_bodies_are_refused(body) -> None:
    with pytest.raises(FormatError):
        decode_catalog_object(catalog_key(7, 1), _raw_object(7, 1, KIND_DELTA, body))


def test_every_byte_flip_and_truncation_is_detected() -> None:
    obj = encode_catalog_object(7, 2, KIND_SNAPSHOT, SPEC_EXAMPLE)
    key = catalog_key(7, 2)
    for i in range(len(obj)):
        bad = bytearray(obj)
        bad[i] ^= 0x40
        with pytest.raises(FormatError):
            decode_catalog_object(key, bytes(bad))
    for n in (0, 10, 63, 64, len(obj) - 1):
        with pytest.raises((TruncatedError, ChecksumMismatch, FormatError)):
            decode_catalog_object(key, obj[:n])


def test_spec_example_snapshot_round_trips() -> None:
    state = CatalogState.from_snapshot_body(json.loads(json.dumps(SPEC_EXAMPLE)))
    assert state.to_snapshot_body(SPEC_EXAMPLE["writer"]) == SPEC_EXAMPLE
    tl = state.timeline()
    assert tl.committed_seq == 1000 and len(tl.tail) == 1 and tl.segments == 1
    assert state.writer == SPEC_EXAMPLE["writer"]


@pytest.mark.parametrize("path,value,message", [
    (("timelines", 0, "committed_seq"), 999, "committed_seq 999 is not the last row's"),
    (("timelines", 0, "horizon_seq"), 2000, "horizon_seq 2000 is after committed_seq"),
    (("timelines", 0, "tail", "object_last_seq"), [999], "not a segment row"),
    (("timelines", 0, "tail", "hash"), [1], "keys"),
    (("timelines", 0, "pages", "hash"), ["0"], "differ in length"),
    (("timelines", 0, "marks"), [{"name": "x", "seq": 1001, "ts": 1}], "outside horizon_seq"),
    (("timelines", 0, "bases", 0, "key"), "d/00000007/base/00000002/0000000000000000/00000000.bmf", "is not the key"),
    (("timelines", 0, "bases", 0, "timeline"), 2, "is not the key"),
    (("timelines", 0, "id"), 2, "expected 1"),
    (("current",), 2, "current timeline 2 does not exist"),
    (("writer", "id"), "XYZ", "32 lower-case hex"),
    (("timelines", 0, "owner"), "", "of 1..200 characters"),
])
def test_snapshot_body_is_validated(path, value, message) -> None:
    body = json.loads(json.dumps(SPEC_EXAMPLE))
    target = body
    for k in path[:-1]:
        target = target[k]
    if isinstance(target, dict) and path[-1] not in target and path[-1] == "hash":
        target[path[-1]] = value
    else:
        target[path[-1]] = value
    with pytest.raises(FormatError, match=message):
        CatalogState.from_snapshot_body(body)


# --------------------------------------------------------------------------- pages


def _rows(first: int, n: int, per: int = 3, timeline: int = 1) -> np.ndarray:
    rows = np.zeros(n, dtype=ROW_DTYPE)
    rows["timeline"] = timeline
    rows["first_seq"] = first + per * np.arange(n)
    rows["last_seq"] = rows["first_seq"] + per - 1
    rows["object_last_seq"] = rows["last_seq"]
    rows["first_ts"], rows["last_ts"] = TS0 + rows["first_seq"], TS0 + rows["last_seq"]
    rows["size"], rows["payload_raw_len"] = 100, 200
    return rows


def test_page_round_trips_and_every_byte_flip_is_detected() -> None:
    rows = _rows(1, 5)
    data, ref = encode_page(7, 0, rows)
    key = ref_key(7, ref[0])
    assert len(data) == 64 + 64 * 5 and data[:4] == b"CDPG" and data[4:6] == b"\2\0"
    page = decode_page(key, data, ref[0])
    assert page.level == 0 and np.array_equal(page.entries, rows)
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        with pytest.raises(FormatError):
            decode_page(key, bytes(bad), ref[0])
    with pytest.raises(FormatError, match="disagrees on"):
        other = ref.copy()
        other["bytes"] += 1
        decode_page(key, data, other[0])
    with pytest.raises(FormatError):
        decode_page(key.replace("-00-", "-01-"), data)
    # A level-1 page of two level-0 references.
    d2, r2 = encode_page(7, 0, _rows(16, 5))
    data1, ref1 = encode_page(7, 1, np.concatenate([ref, r2]))
    page1 = decode_page(ref_key(7, ref1[0]), data1, ref1[0])
    assert page1.level == 1 and list(page1.entries["level"]) == [0, 0]
    assert int(ref1["segments"][0]) == 10 and int(ref1["bytes"][0]) == 1000


def test_a_page_whose_rows_are_not_contiguous_is_refused_even_with_good_sums() -> None:
    rows = _rows(1, 3)
    rows["first_seq"][2] += 1
    data, ref = encode_page(7, 0, rows)
    with pytest.raises(FormatError, match="row 2"):
        decode_page(ref_key(7, ref[0]), data)


def test_folding_keeps_the_head_bounded_and_rows_findable() -> None:
    async def go() -> None:
        store = MemoryStore()
        w = await new_domain(store)
        n = PAGE_ROWS * 70 + 37  # more than one level-1 page
        for _ in range(n):
            first = w.state.timeline().committed_seq + 1
            await w.commit({"add_segments": seg(first, first + 1)})
        tl = w.state.timeline()
        assert len(tl.tail) == 37 and tl.segments == n
        assert list(tl.refs["level"]) == [1] + [0] * 6  # 64 level-0 pages folded into one level-1
        pages = [i.key async for i in store.list(page_prefix(7))]
        assert len(pages) == 70 + 1
        state, generation = await load_catalog(store, 7)
        assert state == w.state
        view = CatalogView(store, state, generation)
        rows = await view.rows_between(1, tl.committed_seq)
        assert len(rows) == n and np.array_equal(rows["first_seq"], 1 + 2 * np.arange(n))
        mid = await view.rows_between(20_001, 20_001)
        assert view.pages_read >= 2 and int(mid["first_seq"][0]) == 20_001
        assert await view.seq_at_time(TS0 + 20_002) == 20_002
        assert await view.seq_at_time(TS0) is None
        assert await view.seq_at_time(TS0 + 10**12) == tl.committed_seq

    run(go())


def test_plan_folds_matches_what_the_writer_commits(monkeypatch) -> None:
    """A bulk builder (benchmarks.history) folds with plan_folds alone: the same pages."""
    monkeypatch.setattr(catalog_page, "PAGE_ROWS", 4)
    monkeypatch.setattr(catalog_page, "PAGE_FANOUT", 3)

    async def go() -> None:
        store = MemoryStore()
        w = await new_domain(store)
        await append(w, 50, per=2)
        tl = w.state.timeline()
        assert len(tl.tail) < 4 and all(n < 3 for n in np.unique(tl.refs["level"], return_counts=True)[1])
        rows = await CatalogView(store, w.state, w.generation).rows_between(1, tl.committed_seq)
        folds = plan_folds(7, np.zeros(0, dtype=catalog_page.REF_DTYPE), rows)
        assert {f.key for f in folds} == {i.key async for i in store.list(page_prefix(7))}

    run(go())


def test_rows_are_read_after_the_sweep_deleted_a_page_under_a_straddling_one(monkeypatch) -> None:
    """A level-1 page the horizon cuts through stays in the head; its children behind the
    horizon (of every timeline) are swept. Every read of the rows steps over them."""
    from rocva.retention import sweep_domain

    monkeypatch.setattr(catalog_page, "PAGE_ROWS", 4)
    monkeypatch.setattr(catalog_page, "PAGE_FANOUT", 3)

    async def go() -> None:
        store = MemoryStore()
        w = await new_domain(store)
        committed = await append(w, 50, per=2)  # a level-2 page 1..72 over level-1 1..24, 25..48, 49..72
        await w.commit({"horizon_seq": 36})  # inside 25..48, past its first child 25..32
        tl = w.state.timeline()
        assert [int(tl.refs["level"][0]), int(tl.refs["first_seq"][0]), int(tl.refs["last_seq"][0])] == [2, 1, 72]
        swept = await sweep_domain(store, w.state, w.generation)
        assert swept["pages_deleted"] == 1 + 3 + 1  # 1..24 and its 3 children, and 25..32
        view = CatalogView(store, *(await load_catalog(store, 7)))
        rows = np.concatenate([r async for r in view.iter_rows()])
        assert int(rows["first_seq"][0]) == 37 and int(rows["last_seq"][-1]) == committed
        assert len(await view.rows_between(1, committed)) == len(rows)

    run(go())


# --------------------------------------------------------------------------- delta rules


@pytest.mark.parametrize("delta,message", [
    ({"add_segments": seg(12, 20)}, "expected committed_seq \\+ 1 = 11"),
    ({"add_segments": seg(11, 20, timeline=2)}, "another timeline"),
    ({"add_segments": {**seg(11, 20), "object_last_seq": [25]}}, "clipped row"),
    ({"add_segments": seg(11, 10)}, "not a segment row"),
    ({"committed_seq": 11}, "committed_seq 11, expected 10"),
    ({"horizon_seq": 11}, "horizon_seq 11 is after committed_seq"),
    ({"add_marks": [{"name": "m", "seq": 11, "ts": 1}]}, "outside horizon_seq"),
    ({"add_marks": [{"name": "", "seq": 5, "ts": 1}]}, "1..255 UTF-8 bytes"),
    ({"remove_bases": [{"seq": 3, "disk": 0}]}, "not in the catalog"),
    ({"timeline": 2}, "timeline 2 does not exist"),
    ({"add_pages": {"level": [0], "first_seq": [1], "last_seq": [10], "first_ts": [TS0 + 1],
                    "last_ts": [TS0 + 10], "count": [2], "segments": [2], "bytes": [1000],
                    "hash": ["0000000000000000"]}}, "level-0 page of 2 rows, the tail holds 1"),
    ({"add_timeline": {}, "horizon_seq": 1}, "add_timeline comes with other changes"),
    ({"remove_segments": []}, "unknown keys"),
])
def test_refused_deltas_leave_the_state_unchanged(delta, message) -> None:
    state = CatalogState.new(7, "erp", TS0, "site-a")
    state.apply_delta({"writer": WRITER, "disks": DISKS, "add_segments": seg(1, 10)})
    before = state.to_snapshot_body(WRITER)
    with pytest.raises(FormatError, match=message):
        state.apply_delta({"writer": WRITER, **delta})
    assert state.to_snapshot_body(WRITER) == before


def test_the_horizon_drops_rows_pages_and_marks_and_never_goes_back() -> None:
    state = CatalogState.new(7, "erp", TS0, "site-a")
    for i in range(5):
        state.apply_delta({"writer": WRITER, "add_segments": seg(10 * i + 1, 10 * i + 10),
                           "add_marks": [{"name": f"m{i}", "seq": 10 * i + 5, "ts": 1}]})
    state.apply_delta({"writer": WRITER, "horizon_seq": 25})
    tl = state.timeline()
    assert list(tl.tail["first_seq"]) == [21, 31, 41] and [m["seq"] for m in tl.marks] == [25, 35, 45]
    with pytest.raises(FormatError, match="goes back"):
        state.apply_delta({"writer": WRITER, "horizon_seq": 24})


# --------------------------------------------------------------------------- chains


def test_load_applies_the_deltas_after_the_newest_snapshot() -> None:
    async def go() -> None:
        store = MemoryStore()
        w = await new_domain(store, snapshot_every=4)
        await append(w, 9)
        kinds = [decode_catalog_object(catalog_key(7, g), await store.get(catalog_key(7, g)))[0]
                 for g in range(1, w.generation + 1)]
        assert [g + 1 for g, k in enumerate(kinds) if k == KIND_SNAPSHOT] == [1, 4, 8]
        state, generation = await load_catalog(store, 7)
        assert generation == 10 and state == w.state

    run(go())


def test_missing_generation_and_chain_without_snapshot_are_named() -> None:
    async def go() -> None:
        store = MemoryStore()
        w = await new_domain(store, snapshot_every=100)
        await append(w, 5)
        await store.delete(catalog_key(7, 3))
        with pytest.raises(FormatError, match="generation 3 .* is missing"):
            await load_catalog(store, 7)
        store2 = MemoryStore()
        await commit_catalog(store2, 7, 2, KIND_DELTA, {"writer": WRITER, "horizon_seq": 0})
        with pytest.raises(FormatError, match="generation 1 is a DELTA|generation 1 .* is missing"):
            await load_catalog(store2, 7)

    run(go())


def test_corrupt_object_in_the_chain_is_named() -> None:
    async def go() -> None:
        store = MemoryStore()
        w = await new_domain(store)
        await append(w, 3)
        key = catalog_key(7, 3)
        raw = bytearray(await store.get(key))
        raw[70] ^= 1
        await store.put(key, bytes(raw))
        with pytest.raises(ChecksumMismatch, match=key):
            await load_catalog(store, 7)

    run(go())


def test_no_catalog_is_none() -> None:
    assert run(load_catalog(MemoryStore(), 7)) == (None, 0)


def test_a_stray_object_under_the_catalog_prefix_is_skipped_and_reported(caplog) -> None:
    """Issue 10 (11): a README or a .tmp file there must not make the domain unrecoverable."""
    async def go() -> None:
        store = MemoryStore()
        w = await new_domain(store)
        await append(w, 3)
        await store.put("d/00000007/cat/README", b"notes")
        await store.put("d/00000007/cat/0000000000000009.cat.tmp", b"junk")
        state, generation = await load_catalog(store, 7)
        assert generation == w.generation and state == w.state
        # A catalog key that does not decode stays an error.
        await store.put(catalog_key(7, w.generation + 1), b"garbage")
        with pytest.raises(FormatError, match=catalog_key(7, w.generation + 1)):
            await load_catalog(store, 7)

    run(go())


def test_old_generations_are_collected_so_a_load_lists_a_bounded_number() -> None:
    async def go() -> None:
        store = MemoryStore()
        w = await new_domain(store)
        await append(w, 5 * SNAPSHOT_EVERY)
        assert w.generation == 5 * SNAPSHOT_EVERY + 1
        lease = await recovery_lease(store, 7, owner="a recovery")
        deferred = await collect_generations(store, 7, w.generation)
        assert deferred["deleted"] == 0 and "a recovery" in deferred["deferred_by"]
        await lease.release()
        done = await collect_generations(store, 7, w.generation)
        assert done["deleted"] == 4 * SNAPSHOT_EVERY - 1  # 1 .. 255: below the snapshot before the newest
        gens = await list_generations(store, 7)
        assert gens[0] == 4 * SNAPSHOT_EVERY and len(gens) == SNAPSHOT_EVERY + 2
        stats: dict = {}
        state, generation = await load_catalog(store, 7, stats=stats)
        assert state == w.state and stats["objects_listed"] == len(gens)
        assert stats["objects_read"] <= generation - 5 * SNAPSHOT_EVERY + FETCH_BATCH_MAX

    run(go())


def test_a_load_that_races_a_collector_lists_again() -> None:
    async def go() -> None:
        inner = MemoryStore()
        w = await new_domain(inner)
        await append(w, 3 * SNAPSHOT_EVERY)
        store = FaultyStore(inner)
        store.fail_next("get", 1, NotFound)  # the first generation read has vanished
        state, _ = await load_catalog(store, 7)
        assert state == w.state and store.calls["list"] == 2

    run(go())


# --------------------------------------------------------------------------- writers


def test_two_writers_one_is_fenced() -> None:
    async def go() -> None:
        store = MemoryStore()
        a = await new_domain(store)
        await append(a, 2)
        b = await CatalogWriter.open(store, 7, by="other drva", owner="site-a")
        await append(b, 1)
        with pytest.raises(AlreadyExists):
            await append(a, 1)
        with pytest.raises(Fenced, match="generation 4 by other drva"):
            await a.commit_shared(lambda st: {"add_segments": seg(st.timeline().committed_seq + 1,
                                                                          st.timeline().committed_seq + 5)})

    run(go())


def test_a_lost_reply_does_not_fence_the_writer_even_when_the_retry_carries_more() -> None:
    """Issue 9, defect 1: the first create lands, its reply is lost; the retry carries the
    segments uploaded meanwhile. The writer recognises its own generation by its id."""
    async def go() -> None:
        inner = MemoryStore()
        store = FaultyStore(inner)
        w = CatalogWriter(inner, CatalogState.new(7, "erp", TS0, "site-a"), by="drva", owner="site-a")
        await w.commit({"disks": DISKS})
        w.store = store
        pending = [(1, 10)]

        def make(state):
            rows = [(a, b) for a, b in pending if b > state.timeline().committed_seq]
            if not rows:
                return None
            cols = [seg(a, b) for a, b in rows]
            return {"add_segments": {k: sum((c[k] for c in cols), []) for k in cols[0]}}

        store.fail_next("put", 1, StoreUnavailable, after=True)  # the generation lands; the reply is lost
        with pytest.raises(StoreUnavailable):
            await w.commit_shared(make)
        pending.append((11, 20))  # uploaded meanwhile
        generation = await w.commit_shared(make)
        assert generation == 3 and w.state.timeline().committed_seq == 20
        state, _ = await load_catalog(inner, 7)
        assert list(state.timeline().tail["first_seq"]) == [1, 11]

    run(go())


def test_a_store_error_while_catching_up_is_no_fence() -> None:
    """Found by the store faults campaign: a generation whose reply was lost, then the read
    of it, to tell whose it is, fails (the store is busy). That says nothing about its
    writer: the error propagates (the DRVA retries), and the next commit moves over it."""
    async def go() -> None:
        inner = MemoryStore()
        store = FaultyStore(inner)
        w = CatalogWriter(store, CatalogState.new(7, "erp", TS0, "site-a"), by="drva", owner="site-a")
        await w.commit({"disks": DISKS})
        store.fail_next("put", 1, AlreadyExists, after=True)  # lands; the SDK's retry finds it there
        store.fail_next("get", 1, StoreUnavailable)  # and the read of it fails
        with pytest.raises(StoreUnavailable):
            await w.commit_shared(lambda st: {"add_segments": seg(1, 10)} if st.timeline().committed_seq < 10
                                  else None)
        generation = await w.commit_shared(lambda st: {"add_segments": seg(1, 10)}
                                           if st.timeline().committed_seq < 10 else None)
        assert generation == 2 and w.state.timeline().committed_seq == 10
        assert store.injected["get"] == 1

    run(go())


def test_commit_shared_absorbs_maintenance_and_refuses_another_owner() -> None:
    async def go() -> None:
        store = MemoryStore()
        drva = await new_domain(store)
        await append(drva, 4)
        job = await CatalogWriter.open(store, 7, by="cdp consolidate")
        await job.commit({"horizon_seq": 20})
        committed = drva.state.timeline().committed_seq
        await drva.commit_shared(lambda st: {"add_segments": seg(committed + 1, committed + 10)}
                                 if st.timeline().committed_seq == committed else None)
        tl = drva.state.timeline()
        assert tl.horizon_seq == 20 and tl.committed_seq == committed + 10
        other = await CatalogWriter.open(store, 7, by="impostor")
        # At the horizon (20): a window below it would leave the head at once (§8.2).
        await other.commit({"set_windows": [{"kind": "resync", "first_seq": 20, "last_seq": 22}]})
        with pytest.raises(Fenced, match="windows changed"):
            await drva.commit_shared(lambda st: {"add_segments": seg(st.timeline().committed_seq + 1,
                                                                          st.timeline().committed_seq + 5)})

    run(go())


def test_a_writer_writes_only_a_timeline_its_site_owns() -> None:
    async def go() -> None:
        store = MemoryStore()
        await new_domain(store, owner="site-a")
        b = await CatalogWriter.open(store, 7, by="drva of site b", owner="site-b")
        with pytest.raises(Fenced, match="owned by 'site-a', not 'site-b'"):
            await append(b, 1)

    run(go())


# --------------------------------------------------------------------------- timelines


def test_a_fork_fences_the_old_writer_for_good_and_keeps_both_histories() -> None:
    async def go() -> None:
        store = MemoryStore()
        a = await new_domain(store, owner="site-a")
        await append(a, PAGE_ROWS * 3 + 10)  # pages and a tail
        fork_at = 10 * (PAGE_ROWS + 5)  # a segment end inside the second page
        state, generation = await fork_timeline(store, 7, fork_at, "site-b")
        t2 = state.timeline()
        assert (state.current, t2.parent, t2.fork_seq, t2.owner, t2.committed_seq) == (2, 1, fork_at, "site-b", fork_at)
        with pytest.raises(Fenced, match=f"FENCED: timeline 2 \\(owner site-b\\) forked from timeline 1 at seq {fork_at}"):
            await a.commit_shared(lambda st: {"add_segments": seg(st.timeline(1).committed_seq + 1,
                                                                  st.timeline(1).committed_seq + 10)})
        b = await CatalogWriter.open(store, 7, by="drva of site b", owner="site-b")
        for _ in range(5):
            first = b.state.timeline().committed_seq + 1
            await b.commit({"add_segments": seg(first, first + 9, timeline=2)})
        head, generation = await load_catalog(store, 7)
        v2 = CatalogView(store, head, generation, 2)
        rows = await v2.rows_between(1, v2.committed_seq)
        assert int(rows["last_seq"][-6]) == fork_at and set(rows["timeline"][-5:]) == {2}
        assert np.array_equal(rows["first_seq"][1:], rows["last_seq"][:-1] + 1)
        v1 = CatalogView(store, head, generation, 1)
        assert v1.committed_seq == 10 * (PAGE_ROWS * 3 + 10)  # the old timeline is whole
        assert len(await v1.rows_between(1, v1.committed_seq)) == PAGE_ROWS * 3 + 10

    run(go())


def test_a_fork_is_refused_when_another_timeline_became_current_while_it_was_made(monkeypatch) -> None:
    """Two sites fork timeline 1 at once: site C commits first, while site B's fork was
    being made. B's commit loses the generation, and the head it loads again has C's
    timeline current: B is refused, naming it — forking timeline 1 again would leave
    C's timeline dead while C believes it owns the domain."""
    from cdp import catalog_fork
    from cdp.errors import FailoverRefused

    async def go() -> None:
        store = MemoryStore()
        a = await new_domain(store, owner="site-a")
        await append(a, 30)
        real = catalog_fork.fork_body
        raced = []

        async def site_c_commits_first(view, fork_seq, new_id, owner, created_ns):
            body = await real(view, fork_seq, new_id, owner, created_ns)
            if owner == "site-b" and not raced:
                raced.append(True)
                await fork_timeline(store, 7, fork_seq, "site-c", parent=1)
            return body

        monkeypatch.setattr(catalog_fork, "fork_body", site_c_commits_first)
        with pytest.raises(FailoverRefused, match=r"domain 7: timeline 1 is no longer current: timeline 2 \(owner "
                                                  r"'site-c', forked from timeline 1 at seq 100\) is, .* nothing was "
                                                  r"forked: the domain runs at site 'site-c' now"):
            await fork_timeline(store, 7, 100, "site-b", parent=1)
        assert raced == [True]
        state, _ = await load_catalog(store, 7)
        assert state.current == 2
        assert [(t, state.timeline(t).owner, state.timeline(t).parent) for t in sorted(state.timelines)] == [
            (1, "site-a", 0), (2, "site-c", 1)]
        # Asked for later with the same stale parent: refused as well, nothing forked.
        with pytest.raises(FailoverRefused, match="timeline 1 is no longer current: timeline 2"):
            await fork_timeline(store, 7, 100, "site-b", parent=1)
        assert sorted((await load_catalog(store, 7))[0].timelines) == [1, 2]
        # Forking the current timeline (no parent named, or the current one) still works.
        state, _ = await fork_timeline(store, 7, 100, "site-a", parent=2)
        assert (state.current, state.timeline().parent, state.timeline().owner) == (3, 2, "site-a")

    run(go())


def test_a_load_keeps_only_the_newest_generations_of_a_long_listing(monkeypatch) -> None:
    """Collection held off for long (a recovery lease: a mount lives for weeks) leaves a
    generation per commit: a load keeps the newest GENERATIONS_KEPT of the listing (its
    chain is among them), and a collector deletes the old ones in batches — memory
    bounded however many there are (a list of every generation, then a task each)."""
    import cdp.catalog as catalog_mod

    monkeypatch.setattr(catalog_mod, "GENERATIONS_KEPT", 2 * SNAPSHOT_EVERY)
    monkeypatch.setattr(catalog_mod, "DELETE_BATCH", 10)
    gathered: list[int] = []
    real_gather = catalog_mod.gather_bounded

    async def counting_gather(aws, limit):
        aws = list(aws)
        gathered.append(len(aws))
        return await real_gather(aws, limit)

    monkeypatch.setattr(catalog_mod, "gather_bounded", counting_gather)

    async def go() -> None:
        store = MemoryStore()
        w = await new_domain(store)
        lease = await recovery_lease(store, 7, owner="a long mount")
        await append(w, 6 * SNAPSHOT_EVERY)
        gens = await list_generations(store, 7)
        assert gens == list(range(w.generation - 2 * SNAPSHOT_EVERY + 1, w.generation + 1))
        state, generation = await load_catalog(store, 7)
        assert generation == w.generation and state == w.state
        await lease.release()
        gathered.clear()
        done = await collect_generations(store, 7, w.generation)
        keep_from = w.generation // SNAPSHOT_EVERY * SNAPSHOT_EVERY - SNAPSHOT_EVERY
        assert done["deleted"] == keep_from - 1
        assert gathered and max(gathered) <= 10 and sum(gathered) == keep_from - 1
        assert (await load_catalog(store, 7))[1] == w.generation

    run(go())


def test_a_listing_without_an_end_is_refused(monkeypatch) -> None:
    """A store (or proxy) whose listing of the catalog never ends: the load gives up
    past GENERATIONS_LISTED_MAX keys naming the prefix, instead of listing for ever;
    stray keys are logged a few at a time, then counted."""
    import cdp.catalog as catalog_mod

    monkeypatch.setattr(catalog_mod, "GENERATIONS_LISTED_MAX", 5000)

    class Endless(MemoryStore):
        def list(self, prefix: str = "", *, start_after: str | None = None):
            async def keys():
                n = 0
                while True:
                    n += 1
                    yield ObjectInfo(f"{prefix}{n:016x}.stray", 10)
            return keys()

    async def go() -> None:
        with pytest.raises(FormatError, match=r"listing of d/00000007/cat/ in .* more than 5,000 keys \(5,000 "
                                              r"of them not catalog keys\) without an end"):
            await load_catalog(Endless(), 7)

    run(go())
