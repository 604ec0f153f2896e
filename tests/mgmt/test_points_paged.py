"""``GET /v1/domains/{name}/points`` on a catalog of many marks (an audit: 60,000 marks
made one answer 10.6 MB and 1.6 s of CPU, and 32 at once 1,260 MB): its marks come in
pages of at most 1,000 per timeline, concurrent requests share one catalog load and no
more than 2 run at once, a repeated poll of an unchanged catalog loads nothing, and a
new commit is in the very next answer. Counted in loads, marks and bytes, never seconds.

The API runs in this process on a site whose store a ``DomainBuilder`` fills (no DRVA).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

import cdp.catalog
from cdp.msa.api import make_app
from cdp.msa.http_limits import ApiLimits
from cdp.msa.openapi import openapi_document
from cdp.store.fs import FileStore
from cdp.testing.domain import DomainBuilder
from cdp.testing.site import TOKEN, make_site
from rocva.points import list_points
from tests.drva.harness import ROOT

MARKS = 2_500  # 3 pages of 1,000
PAGE = 1_000
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class LoadCounter:
    """Every catalog load (``cdp.catalog._load_chain``: one per ``load_catalog``, whoever
    calls it) and the most in flight at once."""

    def __init__(self) -> None:
        self.loads = self.running = self.running_max = 0

    def wrap(self, real: Any) -> Any:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.loads += 1
            self.running += 1
            self.running_max = max(self.running_max, self.running)
            try:
                await asyncio.sleep(0)  # a real store awaits here: let the others pile up
                return await real(*args, **kwargs)
            finally:
                self.running -= 1
        return counted


@pytest_asyncio.fixture
async def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    site = make_site(tmp_path / "site")
    cfg = site.cfg
    b = await DomainBuilder(FileStore(Path(cfg.store_url.removeprefix("file://"))), domain=cfg.domain("erp").id,
                            name="erp").start()
    b.write(0, 0, b"\x11" * 4096)
    for n in range(MARKS):
        b.mark(f"m{n}")
        if n % 500 == 499:
            await b.seal()
    await b.seal()
    counter = LoadCounter()
    monkeypatch.setattr(cdp.catalog, "_load_chain", counter.wrap(cdp.catalog._load_chain))
    daemon = SimpleNamespace(cfg=cfg, token=TOKEN, api_limits=ApiLimits(), check_domain=cfg.domain)
    client = TestClient(TestServer(make_app(daemon)))
    await client.start_server()
    try:
        yield SimpleNamespace(cfg=cfg, builder=b, counter=counter, client=client)
    finally:
        await client.close()


async def get(env: Any, path: str) -> tuple[int, bytes]:
    async with env.client.get(path, headers=AUTH) as resp:
        return resp.status, await resp.read()


async def test_concurrent_polls_share_one_load_and_an_unchanged_catalog_is_not_loaded_again(env):
    b, counter = env.builder, env.counter
    full = len(json.dumps(await list_points(b.store, b.domain)))  # every mark: what the route gave before
    counter.loads = 0

    answers = await asyncio.gather(*(get(env, "/v1/domains/erp/points") for _ in range(32)))
    assert {status for status, _ in answers} == {200}, answers[0]
    assert len({body for _, body in answers}) == 1  # one computation, shared
    assert counter.loads == 1, f"32 identical requests at once made {counter.loads} catalog loads"
    doc = json.loads(answers[0][1])
    assert len(doc["marks"]) == PAGE and doc["marks_total"] == MARKS + 0 and doc["marks_next_before_seq"] is not None
    assert [m["name"] for m in doc["marks"]] == [f"m{n}" for n in range(MARKS - PAGE, MARKS)]  # the newest
    assert len(answers[0][1]) < full * 0.6, (len(answers[0][1]), full)

    for _ in range(10):  # the console's polls of an unchanged catalog
        status, body = await get(env, "/v1/domains/erp/points")
        assert status == 200 and body == answers[0][1]
    assert counter.loads == 1, f"polls of an unchanged catalog made {counter.loads - 1} more loads"

    # Requests for different pages: at most 2 loads at once, whatever the number asking.
    pages = [f"/v1/domains/erp/points?limit={n}" for n in range(1, 33)]
    b.mark("late")
    await b.seal()  # a new generation: every one of them must see it
    answers = await asyncio.gather(*(get(env, path) for path in pages))
    assert {status for status, _ in answers} == {200}
    assert counter.running_max <= 2, f"{counter.running_max} catalog loads ran at once"
    assert counter.loads == 2, counter.loads  # the new generation's head, loaded once for all 32 pages
    for n, (_, body) in enumerate(answers, 1):
        doc = json.loads(body)
        assert len(doc["marks"]) == n and doc["marks"][-1]["name"] == "late" and doc["marks_total"] == MARKS + 1


async def test_no_more_than_two_loads_run_at_once(env):
    """Three domains, eight pages of each, each asked for twice, all at once: one load per
    domain, and never more than 2 at once (on the event loop, each one's CPU and memory)."""
    for name in ("web", "files"):
        b = await DomainBuilder(env.builder.store, domain=env.cfg.domain(name).id, name=name).start()
        b.write(0, 0, b"\x22" * 4096)
        b.mark(f"{name}-mark")
        await b.seal()
    env.counter.loads = 0
    paths = [f"/v1/domains/{name}/points?limit={n}" for name in ("erp", "web", "files") for n in range(8)] * 2
    answers = await asyncio.gather(*(get(env, path) for path in paths))
    assert {status for status, _ in answers} == {200}, [a for a in answers if a[0] != 200][:1]
    assert env.counter.running_max <= 2, f"{env.counter.running_max} catalog loads ran at once"
    assert env.counter.loads == 3, env.counter.loads
    assert json.loads(answers[8][1])["marks"] == [] and json.loads(answers[8][1])["marks_total"] == 1
    assert [m["name"] for m in json.loads(answers[9][1])["marks"]] == ["web-mark"]


async def test_a_commit_is_in_the_next_answer(env):
    b = env.builder
    first = json.loads((await get(env, "/v1/domains/erp/points?limit=5"))[1])
    assert first["marks"][-1]["name"] == f"m{MARKS - 1}"
    for n in range(3):
        b.mark(f"after{n}")
        await b.seal()
        doc = json.loads((await get(env, "/v1/domains/erp/points?limit=5"))[1])
        assert doc["marks"][-1]["name"] == f"after{n}" and doc["generation"] > first["generation"], doc["generation"]
        assert doc["committed_seq"] == b.seq


async def test_every_mark_is_reached_by_following_the_pages_and_cdp_points_lists_them_all(env):
    seen: list[str] = []
    path = "/v1/domains/erp/points?timeline=1"
    while True:
        status, body = await get(env, path)
        assert status == 200, body
        doc = json.loads(body)
        assert len(doc["marks"]) <= PAGE and len(doc["timelines"]) == 1
        assert doc["timelines"][0]["marks"] == doc["marks"]
        seen[:0] = [m["name"] for m in doc["marks"]]
        if doc["marks_next_before_seq"] is None:
            break
        path = f"/v1/domains/erp/points?timeline=1&before_seq={doc['marks_next_before_seq']}"
    assert seen == [f"m{n}" for n in range(MARKS)]

    status, body = await get(env, "/v1/domains/erp/points?limit=0")  # the console's domain page
    doc = json.loads(body)
    assert status == 200 and doc["marks"] == [] and doc["marks_total"] == MARKS and doc["current_timeline"] == 1
    assert len(body) < 4096, len(body)
    assert json.loads((await get(env, "/v1/failover/erp/points?limit=3"))[1])["marks_total"] == MARKS
    assert [m["name"] for m in json.loads((await get(env, "/v1/failover/erp/points?limit=3"))[1])["marks"]] == \
        [f"m{n}" for n in range(MARKS - 3, MARKS)]

    out = subprocess.run([sys.executable, "-m", "cdp.cli", "points", "erp", "--store", env.cfg.store_url, "--json"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert [m["name"] for m in json.loads(out)["marks"]] == [f"m{n}" for n in range(MARKS)]


@pytest.mark.parametrize("query, field", [
    ("limit=-1", "limit"), ("limit=1001", "limit"), ("limit=abc", "limit"), ("limit=1.5", "limit"),
    ("limit=1e3", "limit"), ("limit=%201", "limit"), ("limit=", "limit"), ("limit=0x10", "limit"),
    ("limit=%D9%A1", "limit"), ("limit=" + "9" * 40, "limit"), ("limit=1&limit=2", "limit"),
    ("before_seq=0", "before_seq"), ("before_seq=-5", "before_seq"), ("before_seq=18446744073709551616", "before_seq"),
    ("before_seq=nan", "before_seq"), ("timeline=0", "timeline"), ("timeline=4294967296", "timeline"),
    ("timeline=x", "timeline"), ("timeline=7", "timeline"), ("lmit=5", "lmit"),
])
async def test_a_bad_query_is_refused_naming_the_parameter(env, query, field):
    for route in ("domains", "failover"):
        status, body = await get(env, f"/v1/{route}/erp/points?{query}")
        err = json.loads(body)["error"]
        assert (status, err["code"], err["field"]) == (400, "bad_request", field), (route, query, err)
        assert len(err["message"]) < 300


async def test_the_openapi_document_describes_the_page(env):
    doc = openapi_document(env.cfg)
    for path in ("/v1/domains/{name}/points", "/v1/failover/{name}/points"):
        params = {p["name"]: p["schema"] for p in doc["paths"][path]["get"]["parameters"]}
        assert params["limit"] == {"type": "integer", "minimum": 0, "maximum": PAGE, "default": PAGE}
        assert params["before_seq"]["minimum"] == 1 and params["before_seq"]["maximum"] == (1 << 64) - 1
        assert params["timeline"]["maximum"] == (1 << 32) - 1


async def test_a_kept_answer_is_not_used_past_its_age():
    """What an answer says besides the catalog (missing objects) is at most AGE_MAX_S old."""
    from cdp.msa.points_cache import AGE_MAX_S, PointsCache

    now = [0.0]
    cache = PointsCache(clock=lambda: now[0])
    cache._keep(cache._answers, "k", 5, "text", 4)
    assert cache._fresh(cache._answers, "k", 5) == "text" and cache._fresh(cache._answers, "k", 4) == "text"
    assert cache._fresh(cache._answers, "k", 6) is None  # a newer generation in the store
    cache._keep(cache._answers, "k", 5, "text", 4)
    now[0] = AGE_MAX_S + 1
    assert cache._fresh(cache._answers, "k", 5) is None
