"""The console takes a domain name as the API does (``cdp.tomlread.NAME``): never "." or
"..". A browser resolves those as dot segments, so ``#/failover/.``'s "Clean up" used to
post to ``/v1/failover/cleanup`` and ``#/domain/.``'s "Unprotect" to
``/v1/domains/unprotect``, another route than the one the confirmation named. In
Debian's chromium (headless) against a real daemon: no such route opens a page, and no
button of the failover page sends (or even asks to confirm) anything for such a name."""

from __future__ import annotations

from pathlib import Path

from playwright.async_api import async_playwright, expect

from cdp.testing.site import TOKEN, make_site, running_daemon
from tests.console.browser import launch

UI_S = 15.0  # bound on the console showing a page (it polls every 2 s)
BUTTONS = ("Test failover…", "Clean up test failover…", "Failover…", "Planned failover…", "Failback…")


async def test_dot_names_open_no_page_and_send_nothing(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site")
    async with running_daemon(site), async_playwright() as playwright:
        browser = await launch(playwright)
        try:
            page = await (await browser.new_context()).new_page()
            sent: list[str] = []  # every request that is not a read
            page.on("request", lambda r: sent.append(f"{r.method} {r.url}") if r.method not in ("GET", "HEAD")
                    else None)
            await page.goto(site.api + "/")
            await page.fill("#token", TOKEN)
            await page.click("#signin button[type=submit]")
            await page.wait_for_selector("#nav:not([hidden])", timeout=UI_S * 1000)

            for route in ("#/failover/.", "#/failover/..", "#/domain/.", "#/domain/..", "#/points/.", "#/points/.."):
                await page.evaluate("route => { location.hash = route; }", route)
                await page.wait_for_selector(f'main[data-ready="{route}"]', timeout=UI_S * 1000)
                await expect(page.locator("main h1")).to_have_text("Site")  # not a page of the name "."

            await page.evaluate("route => { location.hash = route; }", "#/failover")
            await page.wait_for_selector('main[data-ready="#/failover"]', timeout=UI_S * 1000)
            for name in (".", "..", " .. "):
                await page.fill("#failover-domain", name)
                for button in BUTTONS:
                    await page.get_by_role("button", name=button, exact=True).click()
                    alert = page.locator(".action-out [role=alert]")
                    await expect(alert).to_contain_text(f'"{name.strip()}" is not a domain name', timeout=UI_S * 1000)
                    assert not await page.evaluate("() => document.getElementById('confirm').open"), button
            # A name like any other still gets as far as the question (then cancelled).
            await page.fill("#failover-domain", "...")
            await page.get_by_role("button", name="Clean up test failover…", exact=True).click()
            await expect(page.locator("#confirm-text")).to_contain_text("Remove the test failover of domain ...")
            await page.click("#confirm-cancel")
            assert sent == []
        finally:
            await browser.close()
