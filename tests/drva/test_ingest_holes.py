"""Ingest holes an audit reproduced (each test failed before the fix):

1. a SEED_BEGIN whose start_seq is behind what the DRVA accepted put a seeding window
   over committed points (and marks), and its SEED_END removed the consolidation base
   retention relied on: after retention no point was recoverable;
2. one record stamped far in the future (2**64 - 1) was raised into every later record
   of its domain: none was reachable by ``--at`` again;
3. a session replaced by a new HELLO under back-pressure kept its frame while it waited
   for room, with no bound on how many did;
4. a store that was down held back the acks of domains whose store was healthy (the
   log's back-pressure was all or nothing);
5. MARK names with control characters were committed: no ``--mark`` could name them.
"""

from __future__ import annotations

import asyncio
import gc
import time
from types import SimpleNamespace

import numpy as np
import pytest

from cdp import wire
from cdp.catalog import load_catalog
from cdp.errors import FormatError
from cdp.logfmt import BLOCK
from cdp.records import KIND_MARK, check_mark_names, empty_records
from cdp.store.faulty import FaultyStore
from cdp.store.fs import FileStore
from drva.committer import TS_AHEAD_MAX_NS, GroupCommitter, _Staged
from drva.daemon import Drva
from drva.domain import DomainState, LogEntry
from drva.seeder import SeedJob, _behind_horizon
from drva.session import Session
from rocva import RecoverOptions, recover, recoverable_ranges
from rocva.consolidate import consolidate
from rocva.plan import load_state
from rocva.points import list_points
from tests.drva.harness import config, domain_doc, drva_doc, random_writes, running_drva, two_domains
from tests.drva.test_crash import wait_until_committed
from tests.drva.test_hostile_filter import SECOND, T, forged, frame, marks, stored_timestamps, welcomed
from tests.drva.test_protocol import expect_error, good_session_still_works, log_since, send_frame
from tests.drva.test_seed_holes import CHUNK, DISK, _begin, _start, _stop
from tests.waiting import EVENTUALLY_S, wait_until

# ------------------------------------------------------------------ 1: seeds behind the stream


async def test_a_seed_begin_behind_the_accepted_seq_is_refused_and_the_catalog_untouched(tmp_path, caplog):
    d, disk, f, client, task = await _start(tmp_path)
    store = FileStore(tmp_path / "store")
    rng = np.random.default_rng(1)
    f.capture(*random_writes(rng, [DISK], 50, 16))
    mark_seq = f.mark("before-upgrade")
    f.capture(*random_writes(rng, [DISK], 50, 16))
    await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "the filter drained")
    await wait_until_committed(store, 1, f.next_seq - 1)
    before, _ = await load_catalog(store, 1)
    await client.send_seed([_begin(0)])  # a stale start_seq: points 1.. are committed
    await wait_until(lambda: "SEED_BEGIN.start_seq 0" in (client.last_error or ""), EVENTUALLY_S, "the refusal")
    assert [getattr(r, "fields", {}).get("code") for r in caplog.records
            if r.getMessage() == "session_refused"] == ["bad_seed"]
    await wait_until(lambda: not d.seeder.jobs and not d.seeder.finishing, EVENTUALLY_S, "no seed left")
    after, _ = await load_catalog(store, 1)
    assert after.timeline().windows == [] and after.timeline().bases == []
    assert after.timeline().committed_seq == before.timeline().committed_seq
    state = await load_state(store, 1)
    assert recoverable_ranges(state) == [(0, f.next_seq - 1)]
    assert [m["consistent"] for m in (await list_points(store, 1))["marks"]] == [True]
    r = await recover(store, 1, RecoverOptions(mark_seq, tmp_path / "out", checksum=True))
    assert r["seq"] == mark_seq  # the mark is a consistent point still
    # The filter reconnects and streams on; an honest seed (the last seq captured) is taken.
    await wait_until(lambda: client.connected, EVENTUALLY_S, "the filter reconnected")
    await _stop(d, task)


async def test_a_seed_begin_behind_after_retention_keeps_the_consolidation_base(tmp_path):
    d, disk, f, client, task = await _start(tmp_path, log_size="64MiB", seal_bytes="1MiB", seal_age_s=0.1)
    store = FileStore(tmp_path / "store")
    rng = np.random.default_rng(1)
    f.capture(*random_writes(rng, [DISK], 100, 16))
    await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "the filter drained")
    await wait_until_committed(store, 1, f.next_seq - 1)
    c = await consolidate(FileStore(tmp_path / "store"), 1, older_than_s=0, retention_s=0,
                          now_ns=time.time_ns() + 10**9)
    assert c["horizon_seq"] > 0
    f.capture(*random_writes(rng, [DISK], 50, 16))
    await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "the filter drained")
    await wait_until_committed(store, 1, f.next_seq - 1)
    before = await load_state(store, 1)
    await client.send_seed([_begin(0)])
    await wait_until(lambda: "SEED_BEGIN.start_seq 0" in (client.last_error or ""), EVENTUALLY_S, "the refusal")
    await wait_until(lambda: client.connected, EVENTUALLY_S, "the filter reconnected")
    f.capture(*random_writes(rng, [DISK], 10, 16))
    await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "the filter drained")
    await wait_until_committed(store, 1, f.next_seq - 1)
    await _stop(d, task)
    after = await load_state(store, 1)
    assert after.bases == before.bases and after.windows == []
    assert recoverable_ranges(after) == [(before.horizon_seq, f.next_seq - 1)]
    r = await recover(store, 1, RecoverOptions(after.committed_seq, tmp_path / "out", checksum=True))
    assert r["seq"] == after.committed_seq  # (the disk was never seeded: not the primary's content)


async def test_no_seeding_window_opens_at_or_below_the_catalogs_committed_seq(tmp_path):
    """Defensive: a DRVA whose accepted seq were behind its catalog still opens no window there."""
    async with running_drva(config(two_domains(tmp_path, "drva-w"))) as d:
        reader, writer = await welcomed(d)
        await send_frame(writer, frame(1, 4))
        await wait_until(lambda: d.domains[1].committed_seq == 4, EVENTUALLY_S, "seqs 1..4 committed")
        d.domains[1].accepted_seq = 2  # what the first check cannot see
        try:
            writer.writelines(wire.control(wire.SEED_BEGIN, {"domain": 1, "disk": 0, "disk_size": 8 << 20,
                                                             "chunk_size": CHUNK, "start_seq": 2}))
            doc = await expect_error(reader, "bad_seed")
        finally:
            d.domains[1].accepted_seq = 4
        assert "below the catalog's committed seq 4" in doc["message"], doc
        await wait_until(lambda: not d.seeder.jobs and not d.seeder.finishing, EVENTUALLY_S, "no seed left")
        head, _ = await load_catalog(d.shipper.store_of(1), 1)
        assert head.timeline().windows == [] and head.timeline().bases == []


def test_a_seed_base_never_replaces_a_base_at_or_below_the_horizon():
    job = SeedJob(1, 0, DISK, CHUNK, 100, np.zeros((8, 16), dtype=np.uint8))
    ours = {"timeline": 1, "seq": 100, "disk": 0, "key": "k", "origin": "seed"}
    consolidated = {"timeline": 1, "seq": 120, "disk": 0, "key": "c", "origin": "consolidation"}
    tl = SimpleNamespace(bases=[consolidated], horizon_seq=120)
    assert "would replace the base at seq 120" in _behind_horizon(tl, job, 150, ours)
    assert "not after the retention horizon (seq 130)" in _behind_horizon(
        SimpleNamespace(bases=[], horizon_seq=130), job, 150, ours)
    # After the horizon: the seed replaces a stale base of its copy, as it always did.
    assert _behind_horizon(SimpleNamespace(bases=[consolidated], horizon_seq=90), job, 150, ours) is None
    assert _behind_horizon(SimpleNamespace(bases=[ours], horizon_seq=130), job, 150, ours) is None  # ours already


# ------------------------------------------------------------------ 2: timestamps far ahead

async def test_timestamps_far_ahead_of_the_drvas_clock_are_clamped_never_raised_past_it(tmp_path):
    now = T + 10 * SECOND
    ceiling = now + TS_AHEAD_MAX_NS
    async with running_drva(config(two_domains(tmp_path, "drva-c"))) as d:
        d.committer.clock_ns = lambda: now
        reader, writer = await welcomed(d)
        await send_frame(writer, frame(1, 2, ts=T))
        await send_frame(writer, frame(3, 1, ts=(1 << 64) - 1))  # a filter clock glitch
        await send_frame(writer, frame(4, 3, ts=T + SECOND))  # its clock back to normal
        await wait_until(lambda: d.domains[1].durable_seq == 6, EVENTUALLY_S, "seqs 1..6 durable")
        dom = d.domains[1]
        assert dom.accepted_ts == ceiling
        assert dom.stats.timestamps_clamped == 1 and dom.stats.timestamps_raised == 3
        # This host's clock steps back an hour: the bound never takes a timestamp back.
        d.committer.clock_ns = lambda: now - 3600 * SECOND
        await send_frame(writer, frame(7, 1, ts=ceiling + SECOND))
        await wait_until(lambda: d.domains[1].committed_seq == 7, EVENTUALLY_S, "seqs 1..7 committed")
        assert dom.accepted_ts == ceiling and dom.stats.timestamps_clamped == 2
        store = d.shipper.store_of(1)
        assert (await stored_timestamps(store, 1)).tolist() == [T, T] + [ceiling] * 5
        head, _ = await load_catalog(store, 1)
        assert int(head.timeline().tail["last_ts"][-1]) == ceiling
        writer.close()


# ------------------------------------------------------------------ 3: replaced sessions under back-pressure

async def test_sessions_replaced_under_backpressure_drop_their_frames(tmp_path):
    doc = drva_doc(tmp_path, "drva-m", [domain_doc(1, "erp", [("vm1", "d0", 64 << 20)])],
                   log_size="12MiB", seal_bytes="1MiB")
    d = Drva(config(doc), exit_on_task_failure=False)
    await d.start()
    writers = []
    try:
        await wait_until(lambda: d.domains[1].catalog_ready, EVENTUALLY_S, "the catalog open")
        faulty = FaultyStore(FileStore(tmp_path / "store"))
        faulty.hang("put")
        d.shipper.store = faulty
        _, w = await welcomed(d)
        writers.append(w)
        seq = 1
        while not d.committer.backpressure:  # the log fills up to its high water
            await send_frame(w, frame(seq, 64, length=16384, offset=0))
            seq += 64
            await wait_until(lambda: d.domains[1].durable_seq == seq - 1 or d.committer.backpressure,
                             EVENTUALLY_S, "the frame durable, or back-pressure")
        big = frame(d.domains[1].accepted_seq + 1, 128, length=16384, offset=0)  # 2 MiB, resent each time
        for i in range(8):
            _, w = await welcomed(d)  # the filter reconnects: the older session is closed
            writers.append(w)
            await send_frame(w, big)
            await wait_until(lambda: d.domains[1].stats.frames_received >= i + 1 + (seq - 1) // 64,
                             EVENTUALLY_S, "the frame received")
        await wait_until(lambda: len(d.session_tasks) <= 1, EVENTUALLY_S, "the replaced sessions ended")
        gc.collect()
        alive = [o for o in gc.get_objects() if isinstance(o, Session)]
        assert len(alive) <= 1 and not any(s.closed for s in alive), alive
        assert sum(1 for o in gc.get_objects() if isinstance(o, (bytes, bytearray)) and len(o) >= len(big)) <= 2
        assert d.domains[1].accepted_seq == big_first(big) - 1  # nothing of it staged while held back
        faulty.release("put")
    finally:
        for w in writers:
            w.close()
        await d.stop()


def big_first(raw: bytes) -> int:
    return int.from_bytes(raw[16:24], "little")


# ------------------------------------------------------------------ 4: one store down, the other acked

async def test_a_store_that_is_down_holds_back_only_its_own_domains(tmp_path):
    sa, sb = tmp_path / "store-a", tmp_path / "store-b"
    crm = {**domain_doc(2, "crm", [("vm2", "d0", 64 << 20)]), "store": f"file://{sb}"}
    doc = drva_doc(tmp_path, "drva-s", [domain_doc(1, "erp", [("vm1", "d0", 64 << 20)]), crm],
                   store=f"file://{sa}", version=2, log_size="16MiB", seal_bytes="1MiB", seal_age_s=0.1)
    async with running_drva(config(doc)) as d:
        lane_a = d.shipper.lane_of[1]
        faulty = FaultyStore(lane_a.store)
        faulty.hang("put")
        lane_a.store = faulty
        r1, w1 = await welcomed(d, (1,))
        r2, w2 = await welcomed(d, (2,))
        await send_frame(w2, frame(1, 4, domain=2))
        await wait_until(lambda: d.domains[2].committed_seq == 4, EVENTUALLY_S, "crm's first frame committed")
        seq = 1

        async def flood() -> None:  # erp's filter keeps writing: its store is down
            nonlocal seq
            while True:
                await send_frame(w1, frame(seq, 64, length=16384, offset=0))
                seq += 64

        flooding = asyncio.create_task(flood())
        try:
            await wait_until(lambda: d.committer.backpressure, EVENTUALLY_S, "the log above high water")
            assert d.committer.held_back([lane.domains for lane in d.lanes]) == [True, False]
            await send_frame(w2, frame(5, 4, domain=2))
            await wait_until(lambda: d.domains[2].committed_seq == 8, EVENTUALLY_S, "crm's frame committed")
            assert await last_ack(r2, 2, 8) & wire.ACK_BACKPRESSURE == 0
            assert d.committer.backpressure and d.domains[1].committed_seq == 0
        finally:
            flooding.cancel()
            await asyncio.gather(flooding, return_exceptions=True)
            faulty.release("put")
            w1.close()
            w2.close()


async def last_ack(reader, domain: int, durable_seq: int) -> int:
    """The flags of the first ACK of ``domain`` at ``durable_seq``."""
    async with asyncio.timeout(EVENTUALLY_S):
        while True:
            msg = await wire.read_message(reader, "t")
            if msg.type == wire.ACK:
                dom, flags, durable, _ = wire.parse_ack(msg.body, "t")
                if dom == domain and durable == durable_seq:
                    return flags


def test_frames_of_a_domain_the_log_cannot_take_hold_no_other_domain_back():
    class Log:  # the log has room for 5 bytes more
        data_size, tail = 1 << 20, 0

        def fits(self, lens):
            total, n = 0, 0
            for x in lens:
                total += x
                if total > 5:
                    break
                n += 1
            return n

    c = GroupCommitter(Log(), staging_bytes_max=1 << 20, high_water=0.8, low_water=0.6, on_durable=lambda _: None)
    a, b, e = (SimpleNamespace(id=i) for i in (1, 2, 3))
    c._staged = [_Staged(dom, b"x" * n, None) for dom, n in ((a, 10), (a, 10), (b, 1), (a, 1), (e, 2), (b, 1))]
    assert [(s.domain.id, len(s.raw)) for s in c._batch()] == [(2, 1), (3, 2), (2, 1)]  # not a's 1: its 10 first
    assert c._blocked == {1}
    c.poke()  # a trim: a's lane is not held back for it any more
    assert c._blocked == set()


# ------------------------------------------------------------------ 5: mark names with control characters

CONTROL_NAMES = [b"\x00", b"a\nb", b"\x1b[31mred", b"tab\there", b"del\x7f", "nel\u0085".encode(),
                 "csi\u009b".encode()]


@pytest.mark.parametrize("name", CONTROL_NAMES, ids=[repr(n) for n in CONTROL_NAMES])
def test_check_mark_names_refuses_control_characters(name):
    names = [b"ok", "é".encode() * 3, name]
    rec = empty_records(3)
    rec["seq"] = [1, 2, 3]
    rec["kind"], rec["length"] = KIND_MARK, [len(n) for n in names]
    with pytest.raises(FormatError, match=r"record 2 \(seq 3.*MARK name holds a control character"):
        check_mark_names(rec, b"".join(names), "t")
    check_mark_names(rec[:2], b"".join(names[:2]), "t")  # the others pass
    check_mark_names(rec, b"".join(names), "t", controls=False)  # a log an older DRVA wrote


@pytest.mark.parametrize("names", [[b"a\nb"], [b"fine", b"\x00"], ["\u0085".encode()]])
async def test_mark_names_with_control_characters_are_refused(tmp_path, names):
    async with running_drva(config(two_domains(tmp_path, "drva-k"))) as d:
        reader, writer = await welcomed(d)
        tail = d.log.tail
        await send_frame(writer, marks(1, names))
        doc = await expect_error(reader, "bad_frame")
        assert "control character" in doc["message"], doc
        await good_session_still_works(d)
        assert log_since(d, tail) == [(2, 1, 2)] and d.domains[1].accepted_seq == 0


async def test_an_empty_mark_name_is_refused(tmp_path):
    rec = empty_records(1)
    rec["seq"], rec["kind"], rec["length"] = 1, KIND_MARK, 0
    async with running_drva(config(two_domains(tmp_path, "drva-e"))) as d:
        reader, writer = await welcomed(d)
        await send_frame(writer, forged(1, rec, b""))
        doc = await expect_error(reader, "bad_frame")
        assert "MARK needs offset 0, disk 0, length 1..255" in doc["message"], doc


def test_a_domains_log_bytes_follow_its_uncommitted_entries(tmp_path):
    dom = DomainState(config(two_domains(tmp_path, "drva-b")).domains[0])

    def add(first: int, last: int, nbytes: int) -> None:
        assert dom.add_durable(LogEntry(0, first, last, nbytes, T, T, 0.0, [], []))

    add(1, 10, 5000)  # a stride of 2 log blocks (64-byte header)
    add(11, 20, 100)
    assert dom.log_bytes() == 3 * BLOCK
    dom.staged_bytes = BLOCK
    assert dom.log_bytes() == 4 * BLOCK
    dom.unsealed.popleft()  # committed (the shipper retires it)
    dom.committed_seq = 10
    assert dom.log_bytes() == 2 * BLOCK
    dom.unsealed.clear()  # a timeline adopted: the domain goes on from its fork, seq 5
    dom.committed_seq = dom.durable_seq = 5
    add(6, 6, 10)
    assert dom.log_bytes() == 2 * BLOCK
    dom.stop("fenced")
    assert dom.log_bytes() == 0


def test_a_mark_name_with_a_control_character_is_refused_before_it_reaches_the_wire() -> None:
    """The DRVA refuses such a MARK at the frame check; a filter that inserted one would
    resend it, refused again, for ever."""
    import pytest as _pytest

    from iofilter_sim.filter import DomainFilter, FilterError

    filt = DomainFilter(1, [])
    with _pytest.raises(FilterError, match="control character"):
        filt.mark("a\nb")
    assert filt.mark("ok") >= 1
