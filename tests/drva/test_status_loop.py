"""The DRVA's status document is built on the event loop, never in a worker thread.

The loop mutates each domain's deques (``unsealed``, ``inflight``) all the time; a status
built in a thread iterates them at the same moment (``RuntimeError: deque mutated during
iteration``) and the failed status task ends the whole DRVA (issue 9)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading

import pytest

from drva import daemon as daemon_mod
from drva.domain import LogEntry
from tests.drva.harness import EVENTUALLY_S, config, running_drva, two_domains, wait_until

SIZE = 8 << 20
# Enough entries that summing their sizes in a thread spans several GIL switch
# intervals (5 ms each): the loop gets to run in between, as it does in production.
FAKE_ENTRIES = 200_000
REWRITES_WANTED = 6


@pytest.fixture
async def drva(tmp_path):
    doc = two_domains(tmp_path, "drva-st")
    # Faster than a configuration may ask (0.1 s at least): more rewrites race the loop.
    async with running_drva(dataclasses.replace(config(doc), status_interval_s=0.01)) as d:
        yield d


def _entry(i: int) -> LogEntry:
    # pos 0: the trim never moves past these fake entries (first_needed_pos), and the
    # domain is fenced below, so neither the sealer nor the committer touches them.
    return LogEntry(0, i, i, 512, 1, 1, 0.0, [], [])


async def test_status_is_rewritten_while_the_loop_mutates_the_deques(drva):
    dom = drva.domains[2]
    dom.fenced = True
    dom.unsealed.extend(_entry(i) for i in range(1, FAKE_ENTRIES + 1))
    # Records beyond the committed seq: the RPO figures sum the pending entries.
    dom.accepted_seq = dom.durable_seq = FAKE_ENTRIES
    stop = asyncio.Event()

    async def mutate() -> None:
        n = FAKE_ENTRIES
        while not stop.is_set():
            n += 1
            dom.unsealed.append(_entry(n))
            dom.unsealed.popleft()
            await asyncio.sleep(0)

    mutator = asyncio.create_task(mutate())
    seen: set[float] = set()

    def rewritten_often() -> bool:
        if drva.failure is not None:
            raise AssertionError(f"a DRVA task failed: {drva.failure!r}")
        try:
            doc = json.loads(drva.cfg.status_path.read_text())
        except (FileNotFoundError, ValueError):
            return False  # not written yet (the write is atomic: never half a file)
        seen.add(doc["time"])
        return len(seen) >= REWRITES_WANTED

    try:
        await wait_until(rewritten_often, EVENTUALLY_S, f"{REWRITES_WANTED} status rewrites")
    finally:
        stop.set()
        await mutator
    doc = json.loads(drva.cfg.status_path.read_text())
    crm = next(d for d in doc["domains"] if d["id"] == 2)
    assert crm["unsealed_entries"] == FAKE_ENTRIES
    assert crm["fenced"] is True
    assert drva.failure is None


async def test_the_snapshot_is_taken_on_the_loop_thread(drva, monkeypatch):
    threads: list[int] = []
    real = daemon_mod.build_status

    def recording(d):
        threads.append(threading.get_ident())
        return real(d)

    monkeypatch.setattr(daemon_mod, "build_status", recording)
    await wait_until(lambda: len(threads) >= 3, EVENTUALLY_S, "three status snapshots")
    assert set(threads) == {threading.get_ident()}
