"""``cdp mark DOMAIN NAME``: ask the domain's filter for a named recovery point.

The request goes to the DRVA serving the domain as a file in its requests directory
(``drva.requests``), from there to the filter as ``MARK_REQUEST`` (FORMAT.md §9); the
filter inserts a ``MARK`` record after every write it captured so far. The mark is a
recovery point once the catalog in the store names it, which is what ``request_mark``
waits for: it returns the mark's seq and time as the catalog has them.

Once the filter took the request, the ``MARK`` record is in the domain's stream: a wait
that ends first (the domain in bitmap mode, its DRVA stopped or the domain unprotected
before the record shipped) does not take it back, and it may still be committed when
the domain's log ships — later, or once the domain is protected again. The error says
so, naming the mark, rather than that no mark was placed.
"""

from __future__ import annotations

import asyncio
import secrets
import time

from cdp.catalog import load_catalog
from cdp.errors import CdpError, ConfigError
from cdp.msa.config import SiteConfig
from cdp.store import open_store
from drva.requests import NAME_BYTES_MAX, write_request

POLL_S = 0.25


async def request_mark(cfg: SiteConfig, domain: str, name: str, timeout_s: float = 30.0) -> dict:
    """Place mark ``name`` in ``domain``; return ``{"domain", "name", "seq", "ts"}`` once the
    store's catalog names it. ``CdpError`` when it does not within ``timeout_s``."""
    if not isinstance(name, str) or not 1 <= len(name.encode()) <= NAME_BYTES_MAX:
        raise ConfigError(f"mark name {name!r}: expected 1..{NAME_BYTES_MAX} UTF-8 bytes")
    spec = cfg.domain(domain)
    drva = cfg.drva_of(spec)
    store = open_store(cfg.store_url_for(domain))
    try:
        state, _ = await load_catalog(store, spec.id)
        before = max((m["seq"] for m in state.timeline().marks if m["name"] == name), default=0) if state else 0
        path = write_request(cfg.drva_state_dir(drva), f"mark-{time.time_ns():x}-{secrets.token_hex(4)}.json",
                             {"domain": spec.id, "name": name})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            state, _ = await load_catalog(store, spec.id)
            new = [m for m in (state.timeline().marks if state else []) if m["name"] == name and m["seq"] > before]
            if new:
                return {"domain": domain, "name": name, "seq": new[0]["seq"], "ts": new[0]["ts"]}
        try:
            path.unlink()  # withdrawn; gone already: the DRVA passed it on
            delivered = False
        except FileNotFoundError:
            delivered = True
        if delivered:
            raise CdpError(
                f"domain {domain}: mark {name!r} is not in the catalog after {timeout_s:g} s, but DRVA {drva.name} "
                f"passed the request to the domain's filter: the mark may be in its stream and still be committed "
                f"when its log ships (later, or once the domain is protected again if it was unprotected; bitmap or "
                f"resync mode? see `cdp status`); look for mark {name!r} in `cdp points {domain}` before placing "
                f"another")
        raise CdpError(f"domain {domain}: mark {name!r} is not in the catalog after {timeout_s:g} s: DRVA {drva.name} "
                       f"did not pass it on (is it running and is the domain's filter connected?)")
    finally:
        await store.close()
