"""A welcomed filter (it knows the secret) that sends what a DRVA must not log, and logs
an older DRVA left behind (FORMAT.md §9.2): each is refused or repaired for its domain
only, nothing refused is acked or logged, the DRVA's tasks never fail, the other domain
is served all along, and what the store holds is recoverable."""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np
import pytest
import xxhash

from cdp import wire
from cdp.catalog import load_catalog
from cdp.catalog_read import CatalogView
from cdp.frame import _HEADER, FRAME_MAGIC, FRAME_VERSION, decode_header, encode_frame
from cdp.logfmt import BLOCK, entry_stride
from cdp.records import KIND_MARK, KIND_WRITE, KIND_ZERO, empty_records
from cdp.replog import ReplicationLog
from cdp.segment import decode_segment
from cdp.summed import pack_summed
from drva.committer import GroupCommitter
from tests.drva.harness import check_store, config, running_drva, two_domains
from tests.drva.test_protocol import expect_error, good_session_still_works, handshake, log_since, send_frame
from tests.waiting import EVENTUALLY_S, wait_until

DISK = 8 << 20
T = 1_700_000_000_000_000_000  # ns
SECOND = 10**9


def frame(first: int, n: int = 2, *, domain: int = 1, ts: int = T, disk: int = 0, offset: int | None = None,
          length: int = 4096, kind: int = KIND_WRITE) -> bytes:
    """Records ``first..first+n-1``; record ``s`` writes byte ``s`` at ``(s - 1) * 4096``."""
    rec = empty_records(n)
    rec["seq"] = seqs = np.arange(first, first + n)
    rec["timestamp_ns"] = ts
    rec["offset"] = (seqs - 1) * 4096 if offset is None else offset
    rec["length"], rec["disk"], rec["kind"] = length, disk, kind
    payload = b"" if kind == KIND_ZERO else b"".join(bytes([s % 251]) * length for s in range(first, first + n))
    return encode_frame(domain, rec, payload)


def forged(domain: int, rec: np.ndarray, payload: bytes) -> bytes:
    """A frame whose checksums hold but which ``encode_frame`` would refuse to write."""
    table = rec.tobytes()
    first = int(rec["seq"][0])
    header = pack_summed(_HEADER, FRAME_MAGIC, FRAME_VERSION, 0, domain, len(rec), first, first + len(rec) - 1,
                         len(payload), xxhash.xxh3_64_intdigest(table + payload), 0)
    return header + table + payload


def marks(first: int, names: list[bytes], ts: int = T) -> bytes:
    rec = empty_records(len(names))
    rec["seq"] = np.arange(first, first + len(names))
    rec["timestamp_ns"], rec["kind"] = ts, KIND_MARK
    rec["length"] = [len(n) for n in names]
    return forged(1, rec, b"".join(names))


def image_sha256(last_seq: int, size: int = DISK) -> str:
    """The disk after records 1..last_seq of ``frame``."""
    img = bytearray(size)
    for s in range(1, last_seq + 1):
        img[(s - 1) * 4096 : s * 4096] = bytes([s % 251]) * 4096
    return hashlib.sha256(img).hexdigest()


async def welcomed(drva, domains=(1,)):
    reader, writer, *_ = await handshake(drva, domains)
    assert (await wire.read_message(reader, "t")).type == wire.WELCOME
    return reader, writer


async def stored_timestamps(store, domain: int) -> np.ndarray:
    head, generation = await load_catalog(store, domain)
    view = CatalogView(store, head, generation)
    rows = await view.rows_between(1, view.committed_seq)
    parts = [decode_segment(key, await store.get(key))[0].records["timestamp_ns"] for key in view.segment_keys(rows)]
    return np.concatenate(parts)


def write_log(cfg, frames: list[bytes]) -> None:
    """What an older DRVA left in its log: ``frames``, appended as they are."""
    if not cfg.log_path.exists():
        cfg.log_path.parent.mkdir(parents=True, exist_ok=True)
        ReplicationLog.format(cfg.log_path, cfg.log_size, label=cfg.name)
    log = ReplicationLog.open(cfg.log_path)
    try:
        log.append_batch([[f] for f in frames])
    finally:
        log.close()


@pytest.fixture
def cfg(tmp_path):
    return config(two_domains(tmp_path, "drva-h"))


# ---------------------------------------------------------------------- finding 1: disk bounds

@pytest.mark.parametrize("bad, message", [
    (dict(disk=99), "disk 99 is not a disk of the domain"),
    (dict(offset=DISK - 512), f"runs past the end of disk 0 ({DISK} bytes)"),
    (dict(offset=1 << 40, kind=KIND_ZERO), "runs past the end of disk 0"),
])
async def test_records_off_the_domains_disks_are_refused(cfg, tmp_path, bad, message):
    async with running_drva(cfg) as d:
        reader, writer = await welcomed(d)
        await send_frame(writer, frame(1, 2))
        await wait_until(lambda: d.domains[1].durable_seq == 2, EVENTUALLY_S, "seqs 1..2 durable")
        tail = d.log.tail
        await send_frame(writer, frame(3, 1, **bad))
        doc = await expect_error(reader, "bad_frame")
        assert message in doc["message"] and "seq 3" in doc["message"], doc
        assert d.domains[1].accepted_seq == 2 and d.domains[1].stats.frames_refused == 1
        await good_session_still_works(d)
        assert log_since(d, tail) == [(2, 1, 2)]  # domain 2's, nothing of domain 1's
        await wait_until(lambda: d.domains[1].committed_seq == 2, EVENTUALLY_S, "seqs 1..2 committed")
        await check_store(d.shipper.store_of(1), 1, [image_sha256(2)], tmp_path)


# ---------------------------------------------------------------------- finding 2: timestamps

async def test_timestamps_going_back_across_frames_are_raised_also_after_a_restart(cfg, tmp_path):
    async with running_drva(cfg) as d:
        reader, writer = await welcomed(d)
        await send_frame(writer, frame(1, 2, ts=T + SECOND))
        await send_frame(writer, frame(3, 2, ts=T))  # the filter's clock stepped back
        await wait_until(lambda: d.domains[1].committed_seq == 4, EVENTUALLY_S, "seqs 1..4 committed")
        assert d.domains[1].stats.timestamps_raised == 2
        writer.close()
    async with running_drva(cfg) as d:  # the newest timestamp comes back with the domain
        assert d.domains[1].accepted_ts == T + SECOND
        reader, writer = await welcomed(d)
        await send_frame(writer, frame(5, 1, ts=T))
        await wait_until(lambda: d.domains[1].committed_seq == 5, EVENTUALLY_S, "seq 5 committed")
        assert d.domains[1].stats.timestamps_raised == 1
        writer.close()
        store = d.shipper.store_of(1)
        assert (await stored_timestamps(store, 1)).tolist() == [T + SECOND] * 5
        await check_store(store, 1, [image_sha256(5)], tmp_path)


async def test_a_log_whose_timestamps_go_back_is_shipped_not_crash_looped(cfg, tmp_path):
    """Frames an older DRVA acked: raised when sealed, before the catalog's newest too."""
    async with running_drva(cfg) as d:
        reader, writer = await welcomed(d)
        await send_frame(writer, frame(1, 2, ts=T + 2 * SECOND))
        await wait_until(lambda: d.domains[1].committed_seq == 2, EVENTUALLY_S, "seqs 1..2 committed")
        writer.close()
    write_log(cfg, [frame(3, 2, ts=T + SECOND), frame(5, 2, ts=T)])
    async with running_drva(cfg) as d:
        await wait_until(lambda: d.domains[1].committed_seq == 6, EVENTUALLY_S, "seqs 3..6 committed")
        store = d.shipper.store_of(1)
        assert (await stored_timestamps(store, 1)).tolist() == [T + 2 * SECOND] * 6
        head, _ = await load_catalog(store, 1)
        assert int(head.timeline().tail["last_ts"][-1]) == T + 2 * SECOND
        await check_store(store, 1, [image_sha256(6)], tmp_path)
        await good_session_still_works(d)


# ---------------------------------------------------------------------- finding 3: mark names

@pytest.mark.parametrize("names", [
    [b"\xff" * 200],  # not UTF-8; decoded with "replace" it grew to 600 bytes
    [b"\xc3", b"\xa9"],  # one character cut in two marks: each name alone is not UTF-8
    [b"ok", b"\xc0\xaf"],  # an overlong encoding
    [b"\xed\xa0\x80"],  # a surrogate
])
async def test_mark_names_that_are_not_utf8_are_refused(cfg, names):
    async with running_drva(cfg) as d:
        reader, writer = await welcomed(d)
        tail = d.log.tail
        await send_frame(writer, marks(1, names))
        doc = await expect_error(reader, "bad_frame")
        assert "MARK name" in doc["message"], doc
        await good_session_still_works(d)
        assert log_since(d, tail) == [(2, 1, 2)] and d.domains[1].accepted_seq == 0


async def test_utf8_mark_names_are_named_in_the_catalog(cfg):
    names = ["é" * 127, "名前", "x"]  # 254, 6 and 1 bytes
    async with running_drva(cfg) as d:
        reader, writer = await welcomed(d)
        await send_frame(writer, frame(1, 1))
        await send_frame(writer, encode_marks(2, names))
        await wait_until(lambda: d.domains[1].committed_seq == 4, EVENTUALLY_S, "the marks committed")
        head, _ = await load_catalog(d.shipper.store_of(1), 1)
        assert [(m["name"], m["seq"]) for m in head.timeline().marks] == list(zip(names, [2, 3, 4]))
        writer.close()


def encode_marks(first: int, names: list[str]) -> bytes:
    raw = [n.encode() for n in names]
    rec = empty_records(len(raw))
    rec["seq"] = np.arange(first, first + len(raw))
    rec["timestamp_ns"], rec["kind"], rec["length"] = T, KIND_MARK, [len(n) for n in raw]
    return encode_frame(1, rec, b"".join(raw))


async def test_a_log_holding_a_mark_name_this_drva_refuses_stops_only_its_domain(cfg):
    write_log(cfg, [frame(1, 2), marks(3, [b"\xff" * 200])])
    async with running_drva(cfg) as d:
        dom = d.domains[1]
        assert dom.fenced and "MARK name is not UTF-8" in dom.stats.last_error
        reader, *_ = await handshake(d, (1,))
        doc = await expect_error(reader, "fenced")
        assert "MARK name" in doc["message"]
        await good_session_still_works(d)
        await wait_until(lambda: d.domains[2].committed_seq == 2, EVENTUALLY_S, "domain 2 committed")


# ---------------------------------------------------------------------- finding 4: resend race

async def test_a_resend_on_a_new_session_while_both_wait_is_staged_once(tmp_path):
    """The filter reconnects while the log is held above high water (the store is down):
    the old session's frame 1..4 and the new session's resend of it both wait for room.
    When the store is back, the seqs are staged once — the old session's frame is dropped."""
    cfg = config(two_domains(tmp_path, "drva-r", log_size="16MiB", size=64 << 20))
    async with running_drva(cfg) as d:
        store = d.shipper.store_of(2)
        real_put, store_back = store.put, asyncio.Event()

        async def put(key, data, *args, **kwargs):
            if "/seg/" in key:
                await store_back.wait()  # the outage: segments wait, so the log fills
            return await real_put(key, data, *args, **kwargs)

        store.put = put
        _, w2 = await welcomed(d, (2,))
        seq = 1
        while not d.committer.backpressure:
            await send_frame(w2, frame(seq, 1, domain=2, length=1 << 20, offset=(seq - 1) << 20))
            await wait_until(lambda: d.domains[2].durable_seq == seq or d.committer.backpressure, EVENTUALLY_S,
                             f"domain 2's seq {seq} durable, or back-pressure")
            seq += 1
        logged: list[tuple[int, int, int]] = []  # (domain, first seq, last seq) of every append from here
        real_append = d.log.append_batch

        def append_batch(bodies):
            logged.extend((h.domain, h.first_seq, h.last_seq) for h in (decode_header(b[0]) for b in bodies))
            return real_append(bodies)

        d.log.append_batch = append_batch
        _, old = await welcomed(d)
        await send_frame(old, frame(1, 4))
        await wait_until(lambda: d.domains[1].stats.frames_received == 1, EVENTUALLY_S, "the old session's frame")
        reader, new = await welcomed(d)  # WELCOME: durable 0; the old session is closed
        await send_frame(new, frame(1, 4))
        await wait_until(lambda: d.domains[1].stats.frames_received == 2, EVENTUALLY_S, "the resend")
        assert d.domains[1].accepted_seq == 0  # both wait for room
        store_back.set()
        await wait_until(lambda: d.domains[1].committed_seq == 4, EVENTUALLY_S, "seqs 1..4 committed")
        assert [e for e in logged if e[0] == 1] == [(1, 1, 4)]
        await check_store(d.shipper.store_of(1), 1, [image_sha256(4, 64 << 20)], tmp_path)
        new.close()
        w2.close()
        old.close()


async def test_a_log_holding_seqs_twice_is_shipped_once(cfg, tmp_path):
    """What the race above left in a log (with a partial overlap too): skipped at
    recovery, where it once made every restart fail."""
    write_log(cfg, [frame(1, 4), frame(1, 4), frame(3, 4), frame(7, 2)])
    async with running_drva(cfg) as d:
        await wait_until(lambda: d.domains[1].committed_seq == 8, EVENTUALLY_S, "seqs 1..8 committed")
        assert d.domains[1].stats.log_entries_skipped == 1
        await check_store(d.shipper.store_of(1), 1, [image_sha256(8)], tmp_path)


async def test_a_log_with_a_gap_stops_only_its_domain(cfg):
    write_log(cfg, [frame(1, 4), frame(6, 2)])
    async with running_drva(cfg) as d:
        assert d.domains[1].fenced and "gap" in d.domains[1].stats.last_error
        await good_session_still_works(d)
        await wait_until(lambda: d.domains[2].committed_seq == 2, EVENTUALLY_S, "domain 2 committed")


# ---------------------------------------------------------------------- finding 6: frames and the log

async def test_a_frame_bigger_than_the_log_can_take_is_refused(tmp_path):
    cfg = config(two_domains(tmp_path, "drva-s", log_size="16MiB", size=64 << 20))
    async with running_drva(cfg) as d:
        limit = d.committer.frame_len_max
        assert entry_stride(limit) <= d.log.data_size // 2
        reader, writer = await welcomed(d)
        tail = d.log.tail
        big = frame(1, 1, length=10 << 20)
        assert len(big) > limit
        await send_frame(writer, big)
        doc = await expect_error(reader, "frame_too_large")
        assert f"at most {limit} bytes" in doc["message"], doc
        await good_session_still_works(d)  # the committer was not stopped by it
        assert log_since(d, tail) == [(2, 1, 2)]
        reader, writer = await welcomed(d)
        ok = frame(1, 1, length=7 << 20)  # below the limit: taken
        assert len(ok) <= limit
        await send_frame(writer, ok)
        await wait_until(lambda: d.domains[1].durable_seq == 1, EVENTUALLY_S, "the 7 MiB frame durable")
        writer.close()


def test_the_largest_frame_taken_fits_an_empty_log_at_any_ring_offset(tmp_path):
    """Why ``frame_len_max`` is half the data area: an entry never crosses the ring's
    end, so an entry above half of it does not fit an empty log at its middle."""
    path = tmp_path / "replog"
    ReplicationLog.format(path, (1 << 20) + 2 * BLOCK)
    log = ReplicationLog.open(path)
    try:
        committer = GroupCommitter(log, staging_bytes_max=1 << 20, high_water=0.8, low_water=0.6,
                                   on_durable=lambda _: None)
        limit = committer.frame_len_max
        for _ in range(2 * log.data_size // (64 << 10)):  # two laps, 64 KiB at a time
            assert log.fits([limit]) == 1, f"ring offset {log.tail % log.data_size}"
            log.append_batch([[bytes((64 << 10) - 64)]])
            log.trim(log.tail)  # empty again, 64 KiB further on
        while log.tail % log.data_size != log.data_size // 2:
            log.append_batch([[bytes(BLOCK - 64)]])
            log.trim(log.tail)
        assert log.fits([limit + BLOCK]) == 0  # one block more: never, from the middle
    finally:
        log.close()

