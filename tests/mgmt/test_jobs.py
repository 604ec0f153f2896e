"""Job records (cdp.msa.jobs): states, progress, timeout, errors, retention, abandoned jobs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

import pytest

from cdp.errors import CdpError, ConfigError, NotFound, StoreUnavailable
from cdp.msa.jobs import RECORDS_CHECK_EVERY, JobStore, run_job


async def test_a_job_records_progress_output_and_state(tmp_path):
    store = JobStore(tmp_path / "jobs")
    seen = []

    async def work(job):
        job.progress("copy", 5, 10)
        job.event("half way")
        seen.append(store.get(job.id))
        return {"bytes": 10}

    record = await run_job(store, "consolidate", {"domain": "erp"}, 60, work)
    assert record["state"] == "succeeded" and record["output"] == {"bytes": 10}
    assert record["ended_ns"] >= record["created_ns"] and record["args"] == {"domain": "erp"}
    assert seen[0]["state"] == "running" and seen[0]["events"][0]["message"] == "half way"
    assert store.get(record["id"]) == record
    assert [r["id"] for r in store.list()] == [record["id"]]


# The timeout of a job that hangs: any bound proves the same.
HANG_TIMEOUT_S = 0.1


async def test_failures_timeouts_and_bugs_are_recorded(tmp_path):
    store = JobStore(tmp_path / "jobs")

    async def fails(job):
        raise StoreUnavailable("s3://b: 503 from the store")

    async def hangs(job):
        await asyncio.Event().wait()  # for ever: the job's timeout ends it

    async def bug(job):
        raise KeyError("oops")

    r = await run_job(store, "recover", {}, 60, fails)
    assert r["state"] == "failed" and "503" in r["error"] and r["exit_code"] == 5
    r = await run_job(store, "verify", {}, HANG_TIMEOUT_S, hangs)
    assert r["state"] == "timed_out" and f"{HANG_TIMEOUT_S:g} s" in r["error"]
    with pytest.raises(KeyError):
        await run_job(store, "install", {}, 60, bug)
    assert store.list(name="install")[0]["state"] == "failed"
    assert len(store.list()) == 3 and len(store.list(limit=2)) == 2


async def test_retention_and_abandoned_jobs(tmp_path):
    store = JobStore(tmp_path / "jobs", retention_s=60)

    async def work(job):
        return None

    old = await run_job(store, "preflight-system", {}, 60, work)
    assert store.prune(now_ns=old["ended_ns"] + 30 * 10**9) == 0
    assert store.prune(now_ns=old["ended_ns"] + 61 * 10**9) == 1
    with pytest.raises(NotFound):
        store.get(old["id"])
    # A record left "running" by a process that died reads as abandoned.
    job = store.create("protect", {}, 60)
    path = store.path(job.id)
    doc = json.loads(path.read_text())
    doc["pid"] = 2**22 + 12345  # no such process
    path.write_text(json.dumps(doc))
    assert store.get(job.id)["state"] == "abandoned"
    assert os.getpid() == store.create("x", {}, 1).record["pid"]
    with pytest.raises(ConfigError):
        store.get("../etc/passwd")


async def test_a_cancelled_job_is_recorded_and_the_cancellation_goes_through(tmp_path):
    """The daemon's stop cancels its jobs: each must end "cancelled" and let the
    cancellation reach its caller, even when it comes as the work ends."""
    store = JobStore(tmp_path / "jobs")
    started = asyncio.Event()

    async def waits(job):
        started.set()
        await asyncio.sleep(60)

    task = asyncio.create_task(run_job(store, "consolidate", {}, 60, waits))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.list()[0]["state"] == "cancelled"

    # Cancelled just as the work ends: a cancel() that was accepted must end the task
    # cancelled. (With wait_for on 3.11 the work ran in a task of its own; a cancel that
    # came between its end and run_job's wake-up was accepted, then swallowed.)
    finished = asyncio.Event()

    async def quick(job):
        finished.set()
        return {"done": True}

    task = asyncio.create_task(run_job(store, "verify", {}, 60, quick))
    await finished.wait()
    accepted = task.cancel()
    try:
        await task
        outcome = "returned"
    except asyncio.CancelledError:
        outcome = "cancelled"
    assert outcome == ("cancelled" if accepted else "returned"), (accepted, outcome)


async def test_a_timeout_of_the_work_itself_is_a_failure_not_the_jobs_timeout(tmp_path):
    store = JobStore(tmp_path / "jobs")

    async def socket_timeout(job):
        raise TimeoutError("connect timed out")

    r = await run_job(store, "verify", {}, 60, socket_timeout)
    assert r["state"] == "failed" and "connect timed out" in r["error"] and r["exit_code"] == 1


def test_job_ids_are_ascii_and_bounded(tmp_path):
    store = JobStore(tmp_path / "jobs")
    for job_id in ("\u00b2", "\uff11", "a" * 129, "", "a/b", "a\x00"):
        with pytest.raises(ConfigError) as err:
            store.path(job_id)
        assert str(tmp_path) not in err.value.message


@pytest.mark.parametrize("planted", [b"[]", b"null", b'"str"', b'{"id": "x"}', b"{" * 100_000, b"\xff",
                                     b'{"version": 1, "id": "bad/id", "name": "x", "args": {}, "state": "succeeded", '
                                     b'"created_ns": 1, "ended_ns": 1, "pid": 1, "progress": {}, "events": []}'])
async def test_a_malformed_record_is_skipped_and_pruned_by_its_file_name(tmp_path, caplog, planted):
    """A planted or damaged file in the jobs directory made `cdp jobs`, install and the
    daemon's start end in a traceback; a record whose own id named another file had
    prune delete that one."""
    store = JobStore(tmp_path / "jobs", retention_s=60)
    good = await run_job(store, "protect", {}, 60, _nothing)
    victim = await run_job(store, "verify", {}, 60, _nothing)
    bad = store.root / "99999999-000000-protect-abcdef.json"
    bad.write_bytes(planted)
    with caplog.at_level(logging.WARNING, logger="cdp.msa.jobs"):
        assert [r["id"] for r in store.list()] == [victim["id"], good["id"]]
        assert [r["id"] for r in store.list(name="protect")] == [good["id"]]
    assert "job_record_skipped" in [r.getMessage() for r in caplog.records]
    with pytest.raises(CdpError, match="99999999-000000-protect-abcdef.json"):
        store.get("99999999-000000-protect-abcdef")
    old_ns = time.time_ns() - 3600 * 10**9
    os.utime(bad, ns=(old_ns, old_ns))
    assert store.prune() == 1 and not bad.exists()
    assert {r["id"] for r in store.list()} == {good["id"], victim["id"]}  # nothing else went with it


async def test_records_past_the_cap_are_deleted_oldest_first(tmp_path):
    store = JobStore(tmp_path / "jobs", kept_max=5)
    ids = [(await run_job(store, "protect", {"n": n}, 60, _nothing))["id"] for n in range(70)]
    # Counted every RECORDS_CHECK_EVERY creations, so between two counts it may run over.
    assert len(store.list(limit=1000)) <= 5 + RECORDS_CHECK_EVERY
    assert store.prune() > 0
    assert [r["id"] for r in store.list(limit=1000)] == sorted(ids)[-5:][::-1]
    running = store.create("failover", {}, 60)  # a live job is never capped away
    store.kept_max = 0
    store.prune()
    assert [r["id"] for r in store.list()] == [running.id]


async def _nothing(job):
    return None
