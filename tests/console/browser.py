"""The browser the console tests drive: Debian's ``chromium``, headless, through
Playwright's Python API with the system executable (never ``playwright install``: no
browser is downloaded). ``./dev test`` installs chromium when it is missing; a test
that cannot find it fails, saying so — it is never skipped.

Also here: what the tests check a page with — a screenshot decoded and its colours
counted (a blank or one-colour page fails), and axe-core (vendored: ``vendor/axe.min.js``,
npm ``axe-core`` 4.14.1, MPL-2.0, licence header kept in the file) for accessibility.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# As root in a container: no sandbox; and nothing that would reach for the network on its
# own (QUIC probes, component updates, sync, background fetches). Playwright's launch()
# gives each browser a fresh --user-data-dir of its own (a temporary directory).
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
AXE_JS = Path(__file__).parent / "vendor" / "axe.min.js"
AXE_IMPACTS_REFUSED = ("serious", "critical")
COLOURS_MIN = 16  # text, borders, badges: a page with content has far more
ONE_COLOUR_SHARE_MAX = 0.985  # a page that is all background is blank


def chromium_path() -> str:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the console tests need Debian's chromium "
                    f"(./dev test installs it; or apt-get install chromium)")
    return str(CHROMIUM)


async def launch(playwright: Any) -> Any:
    return await playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=LAUNCH_ARGS)


def check_not_blank(png: Path) -> int:
    """The number of distinct colours of the screenshot ``png``; fails on a blank one."""
    from PIL import Image

    with Image.open(png) as image:
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=rgb.width * rgb.height)
        pixels = rgb.width * rgb.height
    assert colours is not None
    top = max(count for count, _ in colours)
    assert len(colours) >= COLOURS_MIN and top / pixels <= ONE_COLOUR_SHARE_MAX, \
        (png.name, len(colours), round(top / pixels, 4))
    return len(colours)


async def axe_violations(page: Any) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on ``page`` as it is (WCAG 2.1 A/AA and
    best practices). The script goes in through the DevTools protocol, which the page's
    Content-Security-Policy does not govern (it refuses inline scripts)."""
    if not await page.evaluate("() => typeof window.axe === 'object'"):
        await page.evaluate(AXE_JS.read_text())
    result = await page.evaluate("""() => axe.run(document, {resultTypes: ["violations"],
        runOnly: {type: "tag", values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]}})""")
    return [{"id": v["id"], "impact": v["impact"], "help": v["help"],
             "nodes": [n["target"] for n in v["nodes"]][:5]}
            for v in result["violations"] if v["impact"] in AXE_IMPACTS_REFUSED]
