"""The MSA's REST API under load (issue 10, items 8 and 9): the limit of running jobs
holds under parallel requests; half-sent requests are closed after the header and body
timeouts; connections beyond the cap are refused at once."""

from __future__ import annotations

import asyncio
import collections

from cdp.msa.runner import RUNNING_MAX
from tests.mgmt.test_api import Api, api  # noqa: F401  (the fixture)

PARALLEL_MARKS = 150


async def test_parallel_job_requests_never_exceed_the_running_limit(api: Api):
    """150 mark requests at once (no filter is connected, so each job waits for its mark):
    exactly RUNNING_MAX start, the rest are 503 too_many_jobs, and no job is over the limit."""
    answers = await asyncio.gather(*(api.call("POST", "/v1/domains/erp/marks", {"name": f"m{i}"})
                                     for i in range(PARALLEL_MARKS)))
    by_status = collections.Counter(status for status, _, _ in answers)
    assert by_status == {202: RUNNING_MAX, 503: PARALLEL_MARKS - RUNNING_MAX}, by_status
    for status, doc, _ in answers:
        if status == 503:
            assert doc["error"]["code"] == "too_many_jobs" and doc["error"]["exit_code"] == 7, doc
    records = api.daemon.jobs.list(limit=1000)
    assert len(records) == RUNNING_MAX and all(r["state"] == "running" for r in records)
    assert len(api.daemon.runner.tasks) == RUNNING_MAX
    # A slot frees when a job ends: then one more starts, and only one.
    victim = next(iter(api.daemon.runner.tasks.values()))
    victim.cancel()
    await asyncio.gather(victim, return_exceptions=True)
    answers = await asyncio.gather(*(api.call("POST", "/v1/domains/erp/marks", {"name": f"n{i}"})
                                     for i in range(10)))
    assert collections.Counter(status for status, _, _ in answers) == {202: 1, 503: 9}
