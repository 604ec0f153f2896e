"""What a DRVA's status file says of its memory bounds: each store lane's frame budget
(``lanes``: ``FrameBudget`` bytes max, held, sessions waiting and the bytes they wait for)
and the seeder's upload slots (``seed_uploads``: used, sessions waiting for one). Before,
neither was in the status: a DRVA whose sessions all waited for a share, or for a slot,
read nothing from its filters and showed nothing of why. Each test holds the bound for
real (sessions of a running DRVA), reads the status file the DRVA writes, checks that
the MSA takes it (``cdp.msa.status_doc``) and, for the lanes, what ``cdp status`` shows."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np

from cdp import wire
from cdp.cli.msa_verbs import _bytes, status_text
from cdp.msa.status_doc import problem
from cdp.msa.supervisor import DrvaView
from drva.seeder import UPLOADS_MAX
from tests.drva.harness import config, domain_doc, drva_doc, running_drva
from tests.drva.test_frame_budget import BUDGET, _cfg, _Room, _session, big_frame, store_a_held_back
from tests.waiting import EVENTUALLY_S, wait_until

FRAME_PAYLOAD = 384 << 10  # two such frames fit the budget (1 MiB), not three
SEED_CHUNK = 1 << 20
SEEDERS = UPLOADS_MAX + 2  # one chunk each: every slot taken, two sessions wait


async def written_status(d) -> dict[str, Any]:
    """The status file as the DRVA writes it (one write now: no waiting for its tick)."""
    assert await d.write_status()
    return json.loads(d.cfg.status_path.read_text())


def lane_budgets(doc: dict[str, Any]) -> list[tuple[int, int, int, int]]:
    return [(lane["frame_budget_bytes_max"], lane["frame_budget_held_bytes"], lane["frame_budget_sessions_waiting"],
             lane["frame_budget_waiting_bytes"]) for lane in doc["lanes"]]


def cdp_status_text(doc: dict[str, Any]) -> str:
    """What ``cdp status`` prints of a DRVA with this status (through the MSA's view)."""
    view = DrvaView("drva-b", "127.0.0.1:1", ("dom1",), "up", 5.0, doc["pid"], 0, None, None, None, doc, 0.5)
    protected = [{"name": "dom1", "id": 1, "drva": "drva-b", "policy": {"rpo_target_s": 30.0}, "status": None}]
    return status_text({"site": "site-a", "pid": 1, "api": "http://127.0.0.1:2", "store": "file:///s",
                        "drvas": [view.to_dict()], "domains": protected, "alarms": []})


async def test_a_lanes_frame_budget_held_and_waited_for_is_in_its_status_and_cdp_status(tmp_path):
    domains = 4
    async with running_drva(_cfg(tmp_path, domains)) as d:
        doc = await written_status(d)
        assert lane_budgets(doc) == [(BUDGET, 0, 0, 0)], doc["lanes"]
        room = _Room(d)
        room.held = True  # the log above high water: nothing is staged
        sessions = [await _session(d, i) for i in range(1, domains + 1)]
        frames = [big_frame(i, 1, FRAME_PAYLOAD) for i in range(1, domains + 1)]
        for (_, writer), raw in zip(sessions, frames):
            writer.writelines(wire.frame_message([raw]))
        # Two frames hold the budget (waiting for room), two sessions wait for a share.
        await wait_until(lambda: room.inside == 2 and d.frame_budgets[0].waiting == 2, EVENTUALLY_S,
                         "two frames held, two sessions waiting for a share")
        doc = await written_status(d)
        assert problem(doc) is None, problem(doc)  # the MSA takes what the DRVA writes
        frame_bytes = len(frames[0])  # every frame is of this size
        (lane,) = doc["lanes"]
        assert lane["store"] == d.shipper.store.describe() and sorted(lane["domains"]) == [1, 2, 3, 4]
        assert lane_budgets(doc) == [(BUDGET, 2 * frame_bytes, 2, 2 * frame_bytes)], doc["lanes"]

        text = cdp_status_text(doc)
        assert "FRAME BUDGET HELD / MAX" in text and "WAITING FOR IT" in text, text
        row = next(line for line in text.splitlines() if line.startswith("drva-b") and "sessions" in line)
        held, most = _bytes(2 * frame_bytes), _bytes(BUDGET)  # 794.2 kB, 1.0 MB
        assert f"{held} / {most}" in row and f"2 sessions, {held}" in row, row
        # Its domains by name where the MSA protects them (dom1), by id otherwise.
        assert sorted(row.split()[2].split(",")) == ["2", "3", "4", "dom1"], row

        room.release()  # room again: every frame staged, every share given back
        await wait_until(lambda: all(d.domains[i].durable_seq == FRAME_PAYLOAD // 4096 for i in range(1, domains + 1)),
                         EVENTUALLY_S, "every frame durable")
        assert lane_budgets(await written_status(d)) == [(BUDGET, 0, 0, 0)]
        for _, writer in sessions:
            writer.close()


async def test_each_store_lane_reports_its_own_frame_budget(tmp_path):
    """Store A's frames wait for room (its store holds the log up): its lane's budget is
    held and waited for; store B's lane, the other entry, holds nothing."""
    async with store_a_held_back(tmp_path) as (d, held):
        sessions = [await _session(d, i) for i in range(1, 5)]
        frames = [big_frame(i, 1, 512 << 10) for i in range(1, 5)]
        for (_, writer), raw in zip(sessions, frames):
            writer.writelines(wire.frame_message([raw]))
        await wait_until(lambda: d.frame_budgets[0].waiting == 3, EVENTUALLY_S, "store A's frames wait")
        doc = await written_status(d)
        assert problem(doc) is None, problem(doc)
        assert [sorted(lane["domains"]) for lane in doc["lanes"]] == [[1, 2, 3, 4], [5]]
        assert [lane["store"] for lane in doc["lanes"]] == [s["store"] for s in doc["stores"]]
        frame_bytes = len(frames[0])
        assert lane_budgets(doc) == [(BUDGET, frame_bytes, 3, 3 * frame_bytes), (BUDGET, 0, 0, 0)], doc["lanes"]
        held["a"] = False
        d.committer.poke()
        await wait_until(lambda: all(d.domains[i].durable_seq == 128 for i in range(1, 5)), EVENTUALLY_S,
                         "store A's frames durable once it is back")
        assert lane_budgets(await written_status(d)) == [(BUDGET, 0, 0, 0), (BUDGET, 0, 0, 0)]
        for _, writer in sessions:
            writer.close()


async def test_seed_upload_slots_in_use_and_sessions_waiting_for_one_are_in_its_status(tmp_path, monkeypatch):
    """A slow store: the chunk uploads hang in ``put``, holding every upload slot; the
    sessions whose chunks come next wait for a slot. Then the store answers."""
    doms = [domain_doc(i, f"dom{i}", [(f"vm{i}", "d0", SEED_CHUNK)]) for i in range(1, SEEDERS + 1)]
    cfg = config(drva_doc(tmp_path, "drva-s", doms, log_size="64MiB"))
    chunk = np.random.default_rng(7).integers(0, 256, SEED_CHUNK, dtype=np.uint8).tobytes()
    async with running_drva(cfg) as d:
        doc = await written_status(d)
        assert doc["seed_uploads"] == {"slots": UPLOADS_MAX, "slots_used": 0, "sessions_waiting": 0}
        store = d.shipper.store
        real_put, answer, putting = store.put, asyncio.Event(), []

        async def slow_put(key: str, data: Any, *a: Any, **kw: Any) -> Any:
            if key.startswith("c/"):  # a chunk (a lease is put at once)
                putting.append(key)
                await answer.wait()
            return await real_put(key, data, *a, **kw)
        monkeypatch.setattr(store, "put", slow_put)

        sessions = [await _session(d, i) for i in range(1, SEEDERS + 1)]
        for i, (_, writer) in enumerate(sessions, 1):
            writer.writelines(wire.control(wire.SEED_BEGIN, {"domain": i, "disk": 0, "disk_size": SEED_CHUNK,
                                                             "chunk_size": SEED_CHUNK, "start_seq": 0}))
        await wait_until(lambda: len(d.seeder.jobs) == SEEDERS, EVENTUALLY_S, "every seed begun")
        for i, (_, writer) in enumerate(sessions, 1):
            # Chunks of distinct content: each is uploaded (none is another's duplicate).
            writer.writelines(wire.seed_chunk_message(i, 0, 0, bytes([i]) + chunk[1:]))
        await wait_until(lambda: len(putting) == UPLOADS_MAX and d.seeder.slots.waiting == 2,
                         EVENTUALLY_S, "every slot uploading, two sessions waiting for one")
        doc = await written_status(d)
        assert problem(doc) is None, problem(doc)
        assert doc["seed_uploads"] == {"slots": UPLOADS_MAX, "slots_used": UPLOADS_MAX, "sessions_waiting": 2}

        answer.set()  # the store answers: every chunk uploaded, every slot back
        await wait_until(lambda: all(job.stored == 1 for job in d.seeder.jobs.values()), EVENTUALLY_S,
                         "every chunk uploaded")
        await wait_until(lambda: d.seeder.slots.used == 0, EVENTUALLY_S, "every slot back")
        doc = await written_status(d)
        assert doc["seed_uploads"] == {"slots": UPLOADS_MAX, "slots_used": 0, "sessions_waiting": 0}
        assert "0/4" in cdp_status_text(doc)
        for _, writer in sessions:
            writer.close()
