"""What a catalog says must agree with itself and with the records, beyond every checksum
and the JSON schema (FORMAT.md §1, §8.2, §8.5): a forged head that passes both must be
refused naming the generation or page and the row, not recover another point.

- A timeline's rows lie in its history: its own from its fork on, each ancestor's up to
  the fork that left it (never a sibling's, nor the parent's after the fork), and only
  the row at a fork is clipped — in snapshots, ``add_timeline`` and ``add_segments``
  deltas, and in pages as a ``CatalogView`` reads them.
- Record times are non-decreasing along seq across rows, page references and the seam
  between the last page and the tail, so ``--at`` never binary-searches unsorted times.
- A newest generation no generation can follow (2^64 − 1) is refused, never a traceback;
  the collector never deletes a chain its head is not reached from by +1.
- A mark names the MARK record of its name and time at its seq.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from cdp.catalog import (
    GENERATION_MAX, KIND_DELTA, KIND_SNAPSHOT, CatalogWriter, collect_generations, encode_catalog_object,
    list_generations, load_catalog,
)
from cdp.catalog_json import refs_json, rows_json
from cdp.catalog_page import ROW_DTYPE, empty_refs, encode_page, ref_key, refs_problem, rows_lineage_problem, rows_problem
from cdp.catalog_read import CatalogView
from cdp.catalog_state import Timeline
from cdp.errors import FormatError
from cdp.layout import U64_MAX, catalog_key
from cdp.records import KIND_WRITE, RECORD_DTYPE
from cdp.replay import replay_reference
from cdp.segment import build_segment_from_arrays, decode_segment, index_as_records
from cdp.layout import segment_key
from cdp.store.memory import MemoryStore
from cdp.testing.domain import DomainBuilder, random_workload
from rocva import RecoverOptions, Target, recover
from rocva.consolidate import consolidate
from rocva.plan import load_state
from rocva.verify import verify

KiB = 1 << 10
WRITER = {"id": "f" * 32, "by": "forger"}


async def _domain(ops: int = 60, seal_every: int = 8) -> tuple[DomainBuilder, np.random.Generator]:
    rng = np.random.default_rng(5)
    b = await DomainBuilder(MemoryStore()).start()
    b.model[0][:] = rng.bytes(b.disks[0]["size"])
    await b.add_base(0, chunk_size=64 * KiB)
    await random_workload(b, rng, ops, seal_every=seal_every)
    return b, rng


async def _put(store, domain: int, body: dict, kind: int = KIND_SNAPSHOT, gen: int | None = None) -> int:
    if gen is None:
        gen = max(await list_generations(store, domain)) + 1
    await store.put(catalog_key(domain, gen), encode_catalog_object(domain, gen, kind, body))
    return gen


async def _recover(store, domain: int, target: Target, tl: int | None = None) -> list[str]:
    out = Path(tempfile.mkdtemp()) / "rec"
    r = await recover(store, domain, RecoverOptions(target, out, timeline=tl, checksum=True))
    return [im["sha256"] for im in r["images"]]


async def _fork(b: DomainBuilder, fork_seq: int, owner: str) -> int:
    paths, _ = await replay_reference(b.store, b.domain, Path(tempfile.mkdtemp()), fork_seq)
    return await b.fork(fork_seq, [bytearray(Path(p).read_bytes()) for p in paths], owner)


def _rows(spec: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Rows of (timeline, first_seq, last_seq, object_last_seq), timed by seq."""
    rows = np.zeros(len(spec), ROW_DTYPE)
    for i, (t, a, z, o) in enumerate(spec):
        rows[i] = (t, a, z, o, 1000 + a, 1000 + z, 100, 10)
    return rows


# --------------------------------------------------------------------------- lineage


def test_rows_must_lie_in_the_history_of_their_timeline() -> None:
    # timeline 3 forked from 2 at 30; 2 forked from 1 at 10: 1 holds 1..10, 2 11..30, 3 31..
    history = [(3, 30, U64_MAX), (2, 10, 30), (1, 0, 10)]
    good = _rows([(1, 1, 5, 5), (1, 6, 10, 12), (2, 11, 30, 33), (3, 31, 40, 40)])
    assert rows_lineage_problem(good, history) is None
    for spec, why in (([(4, 1, 5, 5)], "of no timeline of its lineage"),            # a sibling's
                      ([(1, 6, 11, 11)], "outside the seqs 1..10"),                  # the parent after the fork
                      ([(2, 5, 12, 12)], "outside the seqs 11..30"),                 # 2's own before its fork
                      ([(1, 1, 5, 7)], "is clipped, but ends before"),               # clipped, not at the fork
                      ([(3, 31, 40, 41)], "is clipped, but ends before")):           # its own rows are never clipped
        problem = rows_lineage_problem(_rows(spec), history)
        assert problem is not None and why in problem and problem.startswith("row 0"), (spec, problem)


async def test_a_snapshot_whose_timeline_holds_its_parents_rows_after_the_fork_is_refused() -> None:
    b, rng = await _domain()
    t1 = (await load_catalog(b.store, b.domain))[0].timeline(1)
    fork = int(t1.tail["last_seq"][len(t1.tail) // 2])
    await _fork(b, fork, "site-b")
    await random_workload(b, rng, 20, seal_every=5)
    state, _ = await load_catalog(b.store, b.domain)
    t2 = state.timeline(2)
    body = state.to_snapshot_body(WRITER)
    rows = np.concatenate([t2.tail[t2.tail["last_seq"] <= fork], t1.tail[t1.tail["first_seq"] > fork]])
    body["timelines"][1].update(tail=rows_json(rows), committed_seq=int(rows["last_seq"][-1]),
                                marks=[m for m in body["timelines"][1]["marks"] if m["seq"] <= fork])
    gen = await _put(b.store, b.domain, body)
    with pytest.raises(FormatError, match=rf"{catalog_key(b.domain, gen)}: timeline 2: tail row \d+ \(timeline 1, "
                                          rf".*outside the seqs 1\.\.{fork} "):
        await load_catalog(b.store, b.domain)
    report = await verify(b.store, b.domain)
    assert not report["ok"] and "timeline 2: tail row" in report["problems"][0]["problem"]
    with pytest.raises(FormatError, match="timeline 2: tail row"):
        await _recover(b.store, b.domain, Target.latest())


async def test_an_add_timeline_holding_a_siblings_rows_is_refused() -> None:
    b, rng = await _domain()
    t1 = (await load_catalog(b.store, b.domain))[0].timeline(1)
    f2 = int(t1.tail["last_seq"][2])
    await _fork(b, f2, "site-b")
    await random_workload(b, rng, 40, seal_every=5)
    t2 = (await load_catalog(b.store, b.domain))[0].timeline(2)
    fork = next(int(x) for x in t2.tail["last_seq"] if f2 < int(x) <= t1.committed_seq)
    body = {"writer": WRITER, "add_timeline": {
        "id": 3, "parent": 1, "fork_seq": fork, "owner": "site-c", "created_ns": 1, "committed_seq": fork,
        "horizon_seq": 0, "pages": refs_json(empty_refs()), "tail": rows_json(t2.tail[t2.tail["last_seq"] <= fork]),
        "bases": [dict(x) for x in t1.bases if x["seq"] <= fork], "marks": [], "windows": []}}
    gen = await _put(b.store, b.domain, body, KIND_DELTA)
    with pytest.raises(FormatError, match=rf"{catalog_key(b.domain, gen)}: timeline 3: tail row \d+ \(timeline 2, "
                                          r".*of no timeline of its lineage \(3, 1\)"):
        await load_catalog(b.store, b.domain)


async def test_a_page_of_another_branchs_rows_is_refused_as_it_is_read() -> None:
    """Page references name no timeline, so the head loads; the page's rows do not pass."""
    b, rng = await _domain()
    t1 = (await load_catalog(b.store, b.domain))[0].timeline(1)
    fork = int(t1.tail["last_seq"][len(t1.tail) // 2])
    await _fork(b, fork, "site-b")
    await random_workload(b, rng, 20, seal_every=5)
    state, _ = await load_catalog(b.store, b.domain)
    t2 = state.timeline(2)
    rows = np.concatenate([t2.tail[t2.tail["last_seq"] <= fork], t1.tail[t1.tail["first_seq"] > fork]])
    data, ref = encode_page(b.domain, 0, rows)
    await b.store.put(ref_key(b.domain, ref[0]), data)
    body = state.to_snapshot_body(WRITER)
    body["timelines"][1].update(pages=refs_json(ref), tail=rows_json(rows[:0]), committed_seq=int(rows["last_seq"][-1]),
                                marks=[m for m in body["timelines"][1]["marks"] if m["seq"] <= fork])
    await _put(b.store, b.domain, body)
    view = await load_state(b.store, b.domain)  # the head itself is well formed
    with pytest.raises(FormatError, match=rf"catalog page {ref_key(b.domain, ref[0])}: row \d+ \(timeline 1, .*"
                                          rf"read for timeline 2"):
        await view.rows_between(1, view.committed_seq)
    assert len(await CatalogView(b.store, view.state, view.generation, 1).rows_between(1, fork))  # not its page
    with pytest.raises(FormatError, match="catalog page"):
        await _recover(b.store, b.domain, Target.latest())
    report = await verify(b.store, b.domain)
    assert any("timeline 2: catalog page" in p["problem"] for p in report["problems"]), report["problems"]


# --------------------------------------------------------------------------- time order


def test_rows_and_references_that_go_back_in_time_are_refused_and_equal_times_pass() -> None:
    rows = _rows([(1, 1, 4, 4), (1, 5, 7, 7), (1, 8, 9, 9)])
    rows["first_ts"][1] = rows["last_ts"][0]  # equal across the seam: allowed
    assert rows_problem(rows) is None
    rows["first_ts"][2] = rows["last_ts"][1] - 1
    assert "row 2 (seqs 8..9) starts at ts 1006, before row 1 ends (ts 1007)" in rows_problem(rows)
    refs = np.zeros(2, dtype=empty_refs().dtype)
    refs["first_seq"], refs["last_seq"], refs["count"], refs["segments"] = [1, 11], [10, 20], 1, 1
    refs["first_ts"], refs["last_ts"] = [0, 99], [100, 200]
    assert "page reference 1 (seqs 11..20) starts at ts 99, before page reference 0 ends" in refs_problem(refs)
    tl = Timeline(1, 0, 0, "a", 0, 20, 0, refs[:1], _rows([(1, 11, 20, 20)]))
    tl.tail["first_ts"][0] = 99
    with pytest.raises(FormatError, match="the tail starts at ts 99, before the last page ends"):
        tl.check("here")


async def test_a_snapshot_whose_segments_go_back_in_time_is_refused() -> None:
    b, _ = await _domain()
    state, _ = await load_catalog(b.store, b.domain)
    rows = state.timeline().tail.copy()
    key, k, shift = b.segment_keys[1], 1, 3600 * 10**9  # restamp segment 1 an hour later, and its row
    index, payload = decode_segment(key, await b.store.get(key))
    recs = index_as_records(index.records)
    recs["timestamp_ns"] += np.uint64(shift)
    data = build_segment_from_arrays(b.domain, recs, payload, block_raw_size=b.block_raw_size)
    await b.store.put(key, data)
    rows["first_ts"][k] += np.uint64(shift)
    rows["last_ts"][k] += np.uint64(shift)
    rows["size"][k] = len(data)
    body = state.to_snapshot_body(WRITER)
    body["timelines"][0]["tail"] = rows_json(rows)
    gen = await _put(b.store, b.domain, body)
    with pytest.raises(FormatError, match=rf"{catalog_key(b.domain, gen)}: .*row 2 .* before row 1 ends"):
        await load_catalog(b.store, b.domain)
    report = await verify(b.store, b.domain)
    assert not report["ok"] and "non-decreasing along seq" in report["problems"][0]["problem"]


async def test_a_delta_whose_added_segments_go_back_in_time_is_refused() -> None:
    b, rng = await _domain(ops=20)
    tl = (await load_catalog(b.store, b.domain))[0].timeline()
    c, last_ts = tl.committed_seq, int(tl.tail["last_ts"][-1])
    cols: dict[str, list[int]] = {k: [] for k in ROW_DTYPE.names}
    for i, ts in enumerate((last_ts + 3600 * 10**9, last_ts + 1)):  # the second row an hour before the first
        seq = c + 1 + i
        rec = np.zeros(1, RECORD_DTYPE)
        rec["seq"], rec["timestamp_ns"], rec["length"], rec["kind"] = seq, ts, 512, KIND_WRITE
        data = build_segment_from_arrays(b.domain, rec, rng.bytes(512), block_raw_size=8192)
        await b.store.put(segment_key(b.domain, 1, seq, seq), data)
        for k, v in zip(ROW_DTYPE.names, (1, seq, seq, seq, ts, ts, len(data), 512)):
            cols[k].append(v)
    gen = await _put(b.store, b.domain, {"writer": WRITER, "add_segments": cols}, KIND_DELTA)
    with pytest.raises(FormatError, match=rf"{catalog_key(b.domain, gen)}: add_segments row 1 \(seqs {c + 2}\.\."):
        await load_catalog(b.store, b.domain)


# --------------------------------------------------------------------------- generations


async def test_a_newest_generation_no_generation_can_follow_is_refused_naming_its_key() -> None:
    b, _ = await _domain(ops=20)
    state, _ = await load_catalog(b.store, b.domain)
    await _put(b.store, b.domain, state.to_snapshot_body(WRITER), gen=U64_MAX)
    key = catalog_key(b.domain, U64_MAX)
    with pytest.raises(FormatError, match=rf"catalog {key}: the newest generation .* no generation can follow"):
        await load_catalog(b.store, b.domain)
    with pytest.raises(FormatError, match=key):
        await consolidate(b.store, b.domain, older_than_s=0, now_ns=2**62, scratch_dir=tempfile.mkdtemp())
    report = await verify(b.store, b.domain)
    assert not report["ok"] and key in report["problems"][0]["problem"]
    # One below: it loads, but the generation after it is never created.
    await b.store.delete(key)
    await _put(b.store, b.domain, state.to_snapshot_body(WRITER), gen=GENERATION_MAX)
    w = await CatalogWriter.open(b.store, b.domain, by="test", owner="site-a")
    with pytest.raises(FormatError, match=rf"catalog {key}: generation {U64_MAX} of domain 7 would be one no"):
        await w.commit({"add_marks": []})
    assert max(await list_generations(b.store, b.domain)) == GENERATION_MAX


async def test_the_collector_keeps_a_chain_its_head_is_not_reached_from() -> None:
    """A valid snapshot stored as generation 2^63: a consolidation loaded it and collected
    everything below 2^63 - 64 — the genuine chain."""
    b, _ = await _domain(ops=40)
    genuine = await list_generations(b.store, b.domain)
    state, _ = await load_catalog(b.store, b.domain)
    await _put(b.store, b.domain, state.to_snapshot_body(WRITER), gen=1 << 63)
    await consolidate(b.store, b.domain, older_than_s=0, now_ns=2**62, scratch_dir=tempfile.mkdtemp())
    left = await list_generations(b.store, b.domain)
    assert left[: len(genuine)] == genuine and left[len(genuine)] == 1 << 63 and len(left) > len(genuine) + 1
    assert (await collect_generations(b.store, b.domain, left[-1]))["deleted"] == 0
    assert await list_generations(b.store, b.domain) == left


# --------------------------------------------------------------------------- marks


async def test_a_mark_on_a_record_that_is_not_that_mark_is_refused_and_reported() -> None:
    b, _ = await _domain(ops=40)
    b.write(0, 0, b"\x01" * 512)
    named = b.mark("aa")
    b.write(1, 512, b"\x02" * 512)
    await b.seal()
    assert await _recover(b.store, b.domain, Target.mark("aa")) == await b.reference(Path(tempfile.mkdtemp()), named)
    state, _ = await load_catalog(b.store, b.domain)
    good = state.to_snapshot_body(WRITER)
    ts = next(m["ts"] for m in good["timelines"][0]["marks"] if m["name"] == "aa")
    for mark, why in (({"name": "quiesced", "seq": named + 1, "ts": b.ts(named + 1)}, "is a WRITE record, not a MARK"),
                      ({"name": "bb", "seq": named, "ts": ts}, "is the MARK 'aa', not 'bb'"),
                      ({"name": "aa", "seq": named, "ts": ts + 1}, f"is a MARK of ts {ts}, the catalog's mark says"),
                      ({"name": "aaa", "seq": named, "ts": ts}, "is a MARK of a 2-byte name, not 'aaa'")):
        body = state.to_snapshot_body(WRITER)
        body["timelines"][0]["marks"] = [m for m in body["timelines"][0]["marks"] if m["seq"] < named] + [mark]
        await _put(b.store, b.domain, body)
        with pytest.raises(FormatError, match=rf"mark '{mark['name']}' at seq {mark['seq']}: segment .*: record "
                                              rf"seq {mark['seq']} {why}"):
            await _recover(b.store, b.domain, Target.mark(mark["name"]))
        # verify: from the index (kind, time, name length); the name itself when it reads segments whole
        for deep in (False, True) if mark["name"] != "bb" else (True,):
            ((problem),) = (await verify(b.store, b.domain, deep=deep))["problems"]
            assert problem["object"] == b.segment_keys[-1] and problem["problem"].startswith(
                f"the catalog's mark {mark['name']!r} at seq {mark['seq']} is no such mark: segment "
                f"{b.segment_keys[-1]}: record seq {mark['seq']} {why}"), problem
    await _put(b.store, b.domain, good)
    assert (await verify(b.store, b.domain, deep=True))["ok"]
