"""The web console: static files the MSA serves at ``/`` beside its REST API.

The console is a page and a script (``static/``), shipped in the package: no build step,
no CDN. It holds no data: it signs in with the API token (kept in the browser's
sessionStorage, sent as ``Authorization: Bearer``) and reads and acts through the same
REST API as ``cdp`` does, so the files are served without the token and every byte of
data with it. The files are read once, when the app is made, and served from memory
by name: a request cannot name anything but those files.

Every answer carries a Content-Security-Policy that allows only this origin's scripts,
styles and API (no inline script, no eval, no frame), so data that reaches the page can
only ever be text (the script sets ``textContent``, never ``innerHTML``).

Vendored: uPlot (MIT), the chart library, as ``static/vendor/`` (see its README).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web

from cdp.store.base import ObjectStore

STATIC_DIR = Path(__file__).parent / "static"
PREFIX = "/console/"
FILES_MAX = 64  # the console is a handful of files; more means something was dropped here
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
FILES: web.AppKey[dict[str, tuple[bytes, str]]] = web.AppKey("console_files")


def is_static(path: str) -> bool:
    """A path the console's files are served at (no token needed: they hold no data)."""
    return path == "/" or path.startswith(PREFIX)


def load_files(root: Path = STATIC_DIR) -> dict[str, tuple[bytes, str]]:
    """Every file under ``root`` with a known type, by its name (``vendor/`` keeps the
    vendored files apart on disk; a URL names a file, never a directory)."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in TYPES:
            assert path.name not in files, f"two console files named {path.name}"
            files[path.name] = (path.read_bytes(), TYPES[path.suffix])
    assert "index.html" in files and len(files) <= FILES_MAX, sorted(files)
    return files


async def serve(request: web.Request) -> web.Response:
    name = "index.html" if request.path == "/" else request.path.removeprefix(PREFIX)
    found = request.app[FILES].get(name)
    if found is None:
        raise web.HTTPNotFound()
    body, content_type = found
    return web.Response(body=body, headers={"Content-Type": content_type, **HEADERS})


def install(app: web.Application) -> None:
    """Load the files ``serve`` answers with (its routes are in ``cdp.msa.api.ROUTES``)."""
    app[FILES] = load_files()


async def store_points(cfg: Any, name: str, *, timeline: int | None = None, limit: int | None = None,
                       before_seq: int | None = None) -> dict[str, Any]:
    """``rocva.points.list_points`` of the domain named ``name`` in the store it lives in
    (``cfg.store_url_for``), found by name: the failover page's time axis. ``limit`` and
    ``before_seq`` page its marks, ``timeline`` picks one (FORMAT.md §13.5)."""
    from cdp.catalog import find_domain
    from cdp.errors import NotFound
    from cdp.msa.operations import jsonable, with_store
    from rocva.points import list_points

    async def work(store: ObjectStore) -> dict[str, Any]:
        found = await find_domain(store, name)
        if found is None:
            raise NotFound(f"no domain named {name} in {store.describe()}")
        return await list_points(store, found[0], timeline, limit=limit, before_seq=before_seq)

    return jsonable(await with_store(cfg, name, work))
