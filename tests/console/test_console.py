"""The web console (issue 16) in a real browser: Debian's chromium, headless, driven by
Playwright against two sites' daemons in this process (``cdp.testing.two_sites``: site A
protects ``erp``, whose simulated VMs write all along; site B is its recovery site).

One browser and one pair of sites for the module, so the whole file stays within a few
tens of seconds: signing in, the RPO chart moving while the VMs write, a mark placed
from the console, a test failover at B started and cleaned up from the console, and
every page at desktop and phone width — screenshotted, checked non-blank and checked by
axe-core.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import async_playwright, expect

from cdp.testing.site import TOKEN, Site, running_daemon
from cdp.testing.two_sites import TwoSites, make_two_sites
from tests.console.browser import DESKTOP, PHONE, axe_violations, check_not_blank, launch
from tests.drva.harness import ROOT
from tests.waiting import EVENTUALLY_S, wait_until

pytestmark = pytest.mark.asyncio(loop_scope="module")

UI_S = 15.0  # bound on the console showing what the API already has (it polls every 2 s)
JOB_S = 60.0  # bound on a job the console started (a test failover rehydrates 6 MiB)
PAGES = ("#/site", "#/domain/erp", "#/points/erp", "#/alarms", "#/jobs", "#/failover/erp")
expect.set_options(timeout=UI_S * 1000)  # Playwright's 5 s is short for a page that polls every 2 s on a busy CI


@dataclass
class Sites:
    two: TwoSites
    a: Any  # site A's MsaDaemon
    b: Any


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sites(tmp_path_factory: pytest.TempPathFactory) -> Any:
    two = make_two_sites(tmp_path_factory.mktemp("console-sites"))
    async with running_daemon(two.a) as a, running_daemon(two.b) as b:
        await a.power("erp", True)  # the simulated VMs write until the module ends
        yield Sites(two, a, b)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> Any:
    async with async_playwright() as playwright:
        chromium = await launch(playwright)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture(scope="module")
def screens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("console-screens")


class Console:
    """One browser tab on one site's console, with the page's script errors collected."""

    def __init__(self, context: Any, page: Any, site: Site) -> None:
        self.context, self.page, self.site = context, page, site
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        page.on("response", lambda r: self.errors.append(f"{r.status} {r.request.method} {r.url}")
                if r.status >= 400 else None)

    @classmethod
    async def open(cls, browser: Any, site: Site, viewport: dict[str, int] = DESKTOP) -> Console:
        context = await browser.new_context(viewport=viewport)
        console = cls(context, await context.new_page(), site)
        response = await console.page.goto(site.api + "/")
        assert response.status == 200
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp, csp
        return console

    async def sign_in(self, token: str = TOKEN) -> None:
        await self.page.fill("#token", token)
        await self.page.click("#signin button[type=submit]")

    async def show(self, route: str) -> None:
        """Go to ``route`` and wait until its page has its data."""
        await self.page.evaluate("route => { location.hash = route; }", route)
        await self.page.wait_for_selector(f'main[data-ready="{route}"]', timeout=UI_S * 1000)

    async def confirm(self, button: str, says: str) -> None:
        """Click ``button``, check the confirmation says ``says``, and confirm."""
        await self.page.get_by_role("button", name=button, exact=True).click()
        await expect(self.page.locator("#confirm-text")).to_contain_text(says)
        await self.page.click("#confirm-ok")

    async def close(self) -> None:
        assert not [e for e in self.errors if "Content Security Policy" in e], self.errors
        await self.context.close()


async def signed_in(browser: Any, site: Site, viewport: dict[str, int] = DESKTOP) -> Console:
    console = await Console.open(browser, site, viewport)
    await console.sign_in()
    await console.page.wait_for_selector("#nav:not([hidden])", timeout=UI_S * 1000)
    return console


# ---------------------------------------------------------------------- sign-in


async def test_a_wrong_token_is_refused_and_the_right_one_signs_in(sites, browser):
    console = await Console.open(browser, sites.two.a)
    page = console.page
    await console.sign_in("wrong-token-0123456789abcdef")
    await expect(page.locator("#signin-error")).to_contain_text("refused the token (401")
    assert await page.evaluate("() => sessionStorage.length") == 0
    assert await page.locator("#nav").is_hidden()

    await console.sign_in()
    await page.wait_for_selector('main[data-ready="#/site"]', timeout=UI_S * 1000)
    await expect(page.locator("main h1")).to_have_text("Site")
    await expect(page.locator("main")).to_contain_text("drva-a1")
    await expect(page.locator("#site-name")).to_have_text("site site-a")
    assert TOKEN not in page.url
    assert await page.evaluate("() => Object.values(sessionStorage)") == [TOKEN]  # this tab only
    await page.click("#sign-out")
    await expect(page.locator("#signin-error")).to_have_text("Signed out.")
    assert await page.evaluate("() => sessionStorage.length") == 0
    await console.close()


# ---------------------------------------------------------------------- the domain page


async def test_the_rpo_chart_moves_while_the_simulator_writes(sites, browser):
    console = await signed_in(browser, sites.two.a)
    page = console.page
    await console.show("#/domain/erp")
    chart = "document.querySelector('figure.chart')"
    await page.wait_for_function(f"() => Number({chart}.dataset.samples) >= 2", timeout=UI_S * 1000)
    before = await page.evaluate(f"() => [{chart}.dataset.last, {chart}.querySelector('canvas').toDataURL()]")
    seq_before = _committed(sites.a)
    await page.wait_for_function(f"last => {chart}.dataset.last !== last", arg=before[0], timeout=UI_S * 1000)
    after = await page.evaluate(f"() => [{chart}.dataset.last, {chart}.querySelector('canvas').toDataURL()]")
    assert after[1] != before[1]  # the drawing moved, not only its data
    await wait_until(lambda: _committed(sites.a) > seq_before, UI_S, "the VMs' writes committed meanwhile")
    await expect(page.locator("figure.chart figcaption").first).to_contain_text("target 60 s")
    await expect(page.locator("main")).to_contain_text("runs here")
    await console.close()


async def test_the_site_page_shows_each_drva_s_seed_uploads_and_store_lanes(sites, browser):
    """The DRVAs' budgets the status reports (issue 15's lanes and seed upload slots): the
    seed slots in the DRVAs table, and a row per store lane with its domains by name and
    its frame budget, as the supervisor's views hold them."""
    await wait_until(lambda: all(v.status and v.status.get("lanes") for v in sites.a.supervisor.views()),
                     EVENTUALLY_S, "every DRVA of site A reported its lanes")
    views = sites.a.supervisor.views()
    console = await signed_in(browser, sites.two.a)
    await console.show("#/site")
    drvas = console.page.get_by_role("region", name="DRVAs of this site")
    lanes = console.page.get_by_role("region", name="Store lanes of this site's DRVAs")
    for view in views:
        slots = view.status["seed_uploads"]
        row = drvas.locator("tr", has_text=view.name)
        await expect(row).to_contain_text(f"{slots['slots_used']} of {slots['slots']}")
        for lane in view.status["lanes"]:
            row = lanes.locator("tr", has_text=view.name)
            await expect(row).to_contain_text(lane["store"])
            await expect(row).to_contain_text("erp" if lane["domains"] else "—")
            # The maximum is fixed (what is held moves with the VMs' writes).
            await expect(row).to_contain_text(f" of {fmt_bytes(lane['frame_budget_bytes_max'])}")
    assert await lanes.locator("tbody tr").count() == sum(len(v.status["lanes"]) for v in views)
    assert not console.errors, "\n".join(console.errors)
    await console.close()


def fmt_bytes(n: float) -> str:
    """The console's ``fmtBytes``: binary units, one decimal past bytes."""
    units, i = ("B", "KiB", "MiB", "GiB", "TiB"), 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.1f} {units[i]}" if i else f"{n:.0f} {units[i]}"


def _committed(daemon: Any) -> int:
    for view in daemon.supervisor.views():
        for dom in (view.status or {}).get("domains", []):
            if dom.get("name") == "erp":
                return int(dom.get("committed_seq") or 0)
    return 0


# ---------------------------------------------------------------------- a mark


async def test_a_mark_placed_from_the_console_shows_on_the_time_axis_and_in_cdp_points(sites, browser):
    console = await signed_in(browser, sites.two.a)
    page = console.page
    await console.show("#/points/erp")
    await page.fill("#mark-name", "from-console")
    await console.confirm("Place a mark…", 'Place mark "from-console" in domain erp')
    await page.wait_for_selector('#time-axis [data-mark="from-console"]', timeout=JOB_S * 1000)
    await expect(page.locator("main")).to_contain_text("from-console")

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cdp.cli", "points", "erp", "--store", f"file://{sites.two.store}", "--json",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    marks = [m["name"] for t in json.loads(out)["timelines"] for m in t["marks"]]
    assert "from-console" in marks

    # Cancelled: nothing is sent. Hostile text in an answer stays text.
    jobs = len(sites.a.jobs.list(limit=100))
    await page.fill("#mark-name", "never-placed")
    await page.get_by_role("button", name="Place a mark…").click()
    await page.click("#confirm-cancel")
    await expect(page.locator(".action-out")).to_have_text("Mark: cancelled.")
    hostile = '/tmp/<img src=x onerror="window.pwned=1">'
    await page.fill("#recover-dir", hostile)
    await console.confirm("Recover at the picked point…", hostile)
    await expect(page.locator(".action-out .error")).to_contain_text("Recover failed: 400")
    assert await page.locator("main img").count() == 0 and await page.evaluate("() => window.pwned") is None
    assert len(sites.a.jobs.list(limit=100)) == jobs
    await console.show("#/jobs")  # the mark's job, with its final progress
    await expect(page.locator("main tbody tr").first).to_contain_text("mark")
    await expect(page.locator('main tbody tr [data-state="succeeded"]').first).to_be_visible()
    await console.close()


# ---------------------------------------------------------------------- a test failover at site B


async def test_a_test_failover_from_the_console_runs_the_vms_at_b_and_its_cleanup_removes_them(
        sites, browser, screens):
    b = sites.b
    console = await signed_in(browser, sites.two.b)
    page = console.page
    await console.show("#/failover/erp")
    await page.wait_for_selector("#time-axis svg", timeout=UI_S * 1000)
    await page.get_by_role("button", name="Pick the latest point").click()
    await console.confirm("Test failover…", "Bring domain erp's VMs up at this site from the latest point")
    await page.wait_for_selector('.action-out [data-state="succeeded"]', timeout=JOB_S * 1000)
    area = b.cfg.cluster.state_dir / "+test" / "erp"
    assert b.powered == ["erp"] and b.cfg.isolated == {"erp"} and len(list(area.glob("*.img"))) == 3
    assert b.protection == {}  # isolated: nothing of B's is shipped
    await page.evaluate("() => window.cdpConsole.tick()")
    await expect(page.locator("main")).to_contain_text("a test failover's VMs are isolated", timeout=UI_S * 1000)
    await page.screenshot(path=screens / "b-test-failover-running.png", full_page=True)

    await console.confirm("Clean up test failover…", "Remove the test failover of domain erp")
    await page.wait_for_selector(".action-out [data-done]", timeout=JOB_S * 1000)
    assert b.powered == [] and not area.exists() and b.cfg.isolated == frozenset()
    await page.evaluate("() => window.cdpConsole.tick()")
    await expect(page.locator("main")).to_contain_text("No VM runs here.", timeout=UI_S * 1000)
    await console.close()


# ---------------------------------------------------------------------- every page, both sizes


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280x800", "390-phone"])
async def test_every_page_is_drawn_and_accessible_at_desktop_and_phone_width(sites, browser, screens, viewport):
    size = f"{viewport['width']}x{viewport['height']}"
    console = await Console.open(browser, sites.two.a, viewport)
    page = console.page
    found: dict[str, Any] = {}

    async def check(name: str) -> None:
        png = screens / f"{name}-{size}.png"
        await page.screenshot(path=png, full_page=True)
        colours = check_not_blank(png)
        wide = await page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert wide <= 1, f"{name} at {size} is {wide} px wider than the screen"
        found[name] = {"colours": colours, "axe": await axe_violations(page)}

    await check("signin")
    await console.sign_in()
    await page.wait_for_selector("#nav:not([hidden])", timeout=UI_S * 1000)
    for route in PAGES:
        await console.show(route)
        if route == "#/domain/erp":
            await page.wait_for_function("() => Number(document.querySelector('figure.chart').dataset.samples) > 1")
        if route.startswith(("#/points", "#/failover")):
            await page.wait_for_selector("#time-axis svg", timeout=UI_S * 1000)
        await check(route.strip("#/").replace("/", "-"))
    assert {n: f["axe"] for n, f in found.items() if f["axe"]} == {}
    assert not console.errors, "\n".join(console.errors)
    await console.close()


async def test_the_history_endpoint_is_bounded_and_columnar(sites):
    """What the chart reads: one list per field, equal lengths, one sample a second."""
    import aiohttp

    await wait_until(lambda: len(sites.a.history.rings.get("erp", ())) >= 2, EVENTUALLY_S, "samples taken")
    async with aiohttp.ClientSession() as http:
        async with http.get(sites.two.a.api + "/v1/domains/erp/history", headers=sites.two.a.headers) as resp:
            doc = await resp.json()
        async with http.get(sites.two.a.api + "/v1/domains/erp/history?since_ns=x1",
                            headers=sites.two.a.headers) as bad:
            assert bad.status == 400 and (await bad.json())["error"]["field"] == "since_ns"
        async with http.get(sites.two.b.api + "/v1/failover/nowhere/points", headers=sites.two.b.headers) as gone:
            error = (await gone.json())["error"]
            assert gone.status == 404 and "no domain named nowhere in <store>" in error["message"], error
    samples = doc["samples"]
    assert doc["protected"] and doc["rpo_target_s"] == 60 and doc["samples_max"] == 3600
    assert len({len(column) for column in samples.values()}) == 1 and len(samples["t_ns"]) >= 2
    assert samples["t_ns"] == sorted(samples["t_ns"])
