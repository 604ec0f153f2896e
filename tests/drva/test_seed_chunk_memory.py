"""What a DRVA holds of seed chunks is bounded by its upload slots, not by its number of
seeding sessions (FORMAT.md §9.3): a session takes a slot from a ``SEED_CHUNK``'s header
before it reads the chunk. Before, each session waiting for a slot held its chunk (up
to 64 MiB) and a copy of it: 8 sessions of 8 MiB chunks held 128 MiB while the store
was slow."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import tracemalloc

import numpy as np
import pytest

from cdp import wire
from drva import session as session_mod
from drva.seeder import UPLOADS_MAX
from tests.drva.harness import config, domain_doc, drva_doc, running_drva
from tests.drva.test_frame_budget import _session
from tests.drva.test_protocol import expect_error
from tests.waiting import EVENTUALLY_S, wait_until

SESSIONS = 8
CHUNK = 8 << 20
DISK = 2 * CHUNK


def _begin(domain: int) -> list:
    return wire.control(wire.SEED_BEGIN, {"domain": domain, "disk": 0, "disk_size": DISK, "chunk_size": CHUNK,
                                          "start_seq": 0})


def _drva_bytes() -> int:
    """Bytes allocated by the DRVA's code and not freed (the test's own send buffers,
    asyncio's, are not the DRVA's)."""
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(True, "*/drva/*"), tracemalloc.Filter(True, "*/cdp/*")])
    return sum(stat.size for stat in snap.statistics("filename"))


async def test_sessions_waiting_for_an_upload_slot_hold_no_chunk(tmp_path):
    doms = [domain_doc(i, f"dom{i}", [(f"vm{i}", "d0", DISK)]) for i in range(1, SESSIONS + 1)]
    cfg = config(drva_doc(tmp_path, "drva-s", doms, log_size="64MiB"))
    chunk = np.random.default_rng(5).integers(0, 256, CHUNK, dtype=np.uint8).tobytes()
    async with running_drva(dataclasses.replace(cfg)) as d:
        slots = d.seeder.slots
        for _ in range(UPLOADS_MAX):  # every upload slot busy: a store that is slow
            await slots.acquire()
        sessions = [await _session(d, i) for i in range(1, SESSIONS + 1)]
        for i, (_, writer) in enumerate(sessions, 1):
            writer.writelines(_begin(i))
        await wait_until(lambda: len(d.seeder.jobs) == SESSIONS, EVENTUALLY_S, "every seed begun")
        gc.collect()
        tracemalloc.start()
        try:
            before = _drva_bytes()
            for i, (_, writer) in enumerate(sessions, 1):
                writer.writelines(wire.seed_chunk_message(i, 0, 0, chunk))
            await wait_until(lambda: slots.waiting == SESSIONS, EVENTUALLY_S,
                             "every session waiting for an upload slot")
            await asyncio.sleep(0.2)  # what a session would read meanwhile, it has read
            held = _drva_bytes() - before
        finally:
            tracemalloc.stop()
        # Each session's read-ahead (256 KiB), not a chunk per session.
        assert held < CHUNK, f"{held / 2**20:.1f} MiB held by {SESSIONS} sessions waiting for a slot"
        for _ in range(UPLOADS_MAX):
            slots.release()
        # The slots freed: every chunk is read whole, checked and uploaded, and every slot
        # comes back. Waited for together: an upload counts its chunk inside its task, and
        # its slot goes back in the task's done callback, a loop turn later.
        await wait_until(lambda: all(job.stored + job.deduplicated == 1 for job in d.seeder.jobs.values())
                         and slots.used == 0, EVENTUALLY_S, "every chunk uploaded and its slot given back")
        for _, writer in sessions:
            writer.close()


@pytest.mark.parametrize("case", ["no_seed", "wrong_size"])
async def test_a_chunk_refused_from_its_header_takes_no_slot_and_the_error_arrives(tmp_path, case):
    """Refused from its header (no seed of the session, or not its chunk's size): no
    upload slot is taken, and the filter gets ``ERROR bad_seed`` (the DRVA reads past the
    32 MiB in pieces before it closes the session)."""
    doc = drva_doc(tmp_path, "drva-r", [domain_doc(1, "erp", [("vm1", "d0", 64 << 20)])], log_size="64MiB")
    big = bytes(range(256)) * (128 << 10)  # 32 MiB, not zeros
    async with running_drva(config(doc)) as d:
        reader, writer = await _session(d, 1)
        if case == "wrong_size":  # a seed of 16 MiB chunks: a chunk of 32 MiB is not one
            writer.writelines(wire.control(wire.SEED_BEGIN, {"domain": 1, "disk": 0, "disk_size": 64 << 20,
                                                             "chunk_size": 16 << 20, "start_seq": 0}))
            await wait_until(lambda: len(d.seeder.jobs) == 1, EVENTUALLY_S, "the seed begun")
        writer.writelines(wire.seed_chunk_message(1, 0, 0, big))
        got = await expect_error(reader, "bad_seed")
        assert ("without SEED_BEGIN" if case == "no_seed" else "33554432 bytes, expected 16777216") in got["message"]
        assert d.seeder.slots.used == 0
        writer.close()


SMALL_CHUNK = 64 << 10


def _begin_small(start: int = 0) -> list:
    return wire.control(wire.SEED_BEGIN, {"domain": 1, "disk": 0, "disk_size": 16 * SMALL_CHUNK,
                                          "chunk_size": SMALL_CHUNK, "start_seq": start})


@pytest.mark.parametrize("then", ["seed_begin_again", "close"])
async def test_a_seed_abandoned_as_its_chunk_arrives_gives_the_slot_back(tmp_path, then):
    """The chunk is read whole and its upload task made; the bytes behind it (a new
    SEED_BEGIN, or the end of the stream) abandon the seed before that task ever ran. Its
    slot was released in the task's ``finally``, which a task cancelled before its first
    step never runs: after four, no seed of the DRVA got a slot again."""
    doc = drva_doc(tmp_path, "drva-l", [domain_doc(1, "erp", [("vm1", "d0", 16 * SMALL_CHUNK)])], log_size="64MiB")
    data = bytes(range(256)) * (SMALL_CHUNK // 256)
    async with running_drva(config(doc)) as d:
        for round_ in range(UPLOADS_MAX + 1):
            _, writer = await _session(d, 1)
            writer.writelines(_begin_small())
            await wait_until(lambda: (1, 0) in d.seeder.jobs, EVENTUALLY_S, "the seed begun")
            job = d.seeder.jobs[(1, 0)]
            writer.writelines([*wire.seed_chunk_message(1, 0, round_, data),
                               *(_begin_small() if then == "seed_begin_again" else [])])
            if then == "close":
                writer.close()
            await wait_until(lambda: job.dropped and not job.tasks, EVENTUALLY_S, "the seed abandoned")
            writer.close()
            await wait_until(lambda: d.seeder.slots.used == 0, EVENTUALLY_S,
                             f"round {round_}: every upload slot back")


async def test_a_chunk_trickled_in_loses_its_slot_and_an_honest_seed_goes_on(tmp_path, monkeypatch):
    """UPLOADS_MAX sessions take every slot with a chunk header, then send its body a byte
    at a time, each within the stall timeout; a fifth seed's chunk waits. Past the
    deadline a held slot gives its body (grace + size at the minimum rate), the trickling
    sessions are refused and the honest chunk is uploaded."""
    monkeypatch.setattr(session_mod, "FRAME_BODY_STALL_S", 1.0)
    monkeypatch.setattr(session_mod, "SEED_CHUNK_BYTES_PER_S_MIN", SMALL_CHUNK)  # 1 s for a chunk: 2 s in all
    size = 4 * SMALL_CHUNK
    doms = [domain_doc(i, f"dom{i}", [(f"vm{i}", "d0", size)]) for i in range(1, UPLOADS_MAX + 2)]
    data = bytes(range(256)) * (SMALL_CHUNK // 256)
    async with running_drva(config(drva_doc(tmp_path, "drva-t", doms, log_size="64MiB"))) as d:
        sessions = [await _session(d, i) for i in range(1, UPLOADS_MAX + 2)]
        for i, (_, writer) in enumerate(sessions, 1):
            writer.writelines(wire.control(wire.SEED_BEGIN, {"domain": i, "disk": 0, "disk_size": size,
                                                             "chunk_size": SMALL_CHUNK, "start_seq": 0}))
        await wait_until(lambda: len(d.seeder.jobs) == UPLOADS_MAX + 1, EVENTUALLY_S, "every seed begun")
        raws = [b"".join(bytes(m) for m in wire.seed_chunk_message(i, 0, 0, data)) for i in range(1, UPLOADS_MAX + 1)]
        sent = wire.HEADER_SIZE + wire.SEED_CHUNK_HEADER_SIZE
        for raw, (_, writer) in zip(raws, sessions):
            writer.write(raw[:sent])
        await wait_until(lambda: d.seeder.slots.used == UPLOADS_MAX, EVENTUALLY_S, "every slot taken")
        honest = d.seeder.jobs[(UPLOADS_MAX + 1, 0)]
        sessions[-1][1].writelines(wire.seed_chunk_message(UPLOADS_MAX + 1, 0, 0, data))
        loop = asyncio.get_running_loop()
        until = loop.time() + EVENTUALLY_S
        while honest.stored + honest.deduplicated == 0 and loop.time() < until:
            for raw, (_, writer) in zip(raws, sessions):
                if not writer.is_closing():
                    writer.write(raw[sent:sent + 1])  # a byte every 0.3 s: never a stall
            sent += 1
            await asyncio.sleep(0.3)
        assert honest.stored + honest.deduplicated == 1, "the honest chunk never got a slot"
        await wait_until(lambda: d.seeder.slots.used == 0, EVENTUALLY_S, "every slot back")
        for _, writer in sessions:
            writer.close()
