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
        # The slots freed: every chunk is read whole, checked and uploaded.
        await wait_until(lambda: all(job.stored + job.deduplicated == 1 for job in d.seeder.jobs.values()),
                         EVENTUALLY_S, "every chunk uploaded")
        assert slots.used == 0
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
