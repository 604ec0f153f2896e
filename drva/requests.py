"""Requests from the management server, dropped as files in ``<state_dir>/requests/``.

The MSA and its DRVAs share a host, so a directory is the whole control channel: the
MSA writes ``mark-<token>.json`` (``{"domain": ID, "name": NAME}``, atomically, FORMAT.md
§13) and the DRVA, polling every ``POLL_S``, passes it to the filter session of that
domain as a ``MARK_REQUEST`` (§9) and deletes the file. The filter inserts the mark; the
MSA sees it when the catalog names it. A request that cannot be delivered (no filter
connected) waits up to ``REQUEST_TTL_S`` and is then dropped with a log line, so the
directory never fills up; a malformed one is dropped at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdp import wire
from cdp.logs import get_logger

if TYPE_CHECKING:
    from drva.daemon import Drva

log = get_logger("drva.requests")

POLL_S = 0.2
REQUEST_TTL_S = 60.0
NAME_BYTES_MAX = 255


def requests_dir(state_dir: Path) -> Path:
    return state_dir / "requests"


class RequestBox:
    def __init__(self, drva: "Drva") -> None:
        self.drva = drva
        self.root = requests_dir(drva.cfg.state_dir)

    async def run(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        while True:
            for path in sorted(self.root.glob("mark-*.json")):
                self._mark(path)
            await asyncio.sleep(POLL_S)

    def _drop(self, path: Path, event: str, **fields: Any) -> None:
        log.warning(event, request=path.name, **fields)
        path.unlink(missing_ok=True)

    def _mark(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_bytes())
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            self._drop(path, "request_refused", reason=f"unreadable: {exc}")
            return
        domain, name = (doc.get("domain"), doc.get("name")) if isinstance(doc, dict) else (None, None)
        dom = self.drva.domains.get(domain) if isinstance(domain, int) else None
        if dom is None or not isinstance(name, str) or not 1 <= len(name.encode()) <= NAME_BYTES_MAX:
            self._drop(path, "request_refused",
                       reason=f"expected a domain of this DRVA and a name of 1..{NAME_BYTES_MAX} bytes")
            return
        session = dom.session
        if session is None or session.closed:
            if age > REQUEST_TTL_S:
                self._drop(path, "mark_request_expired", domain=domain, name=name,
                           reason=f"no filter connected for {REQUEST_TTL_S:.0f} s")
            return
        session.writer.writelines(wire.control(wire.MARK_REQUEST, {"domain": domain, "name": name}))
        path.unlink(missing_ok=True)
        log.info("mark_requested", domain=domain, name=name)
