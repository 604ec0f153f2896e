"""``cdp mark``'s path: the MSA drops a request file, the DRVA sends ``MARK_REQUEST`` to the
filter, the filter inserts the mark after every write it captured, and the catalog names
it (FORMAT.md §9, §13). Malformed and undeliverable requests are dropped, not kept."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from cdp import site_files
from cdp.catalog import load_catalog
from cdp.errors import CdpError
from cdp.msa.config import load_site_config
from cdp.msa.marks import request_mark
from cdp.store.fs import FileStore
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import (
    SECRET, Disk, DrvaProcess, domain_doc, drva_doc, free_port, random_writes,
)
from tests.waiting import EVENTUALLY_S, wait_until

DISK = 4 << 20
# How long a request that cannot be answered is waited for: the error is the point.
UNANSWERED_S = 1.5


def _connected(drva: DrvaProcess) -> bool | None:
    """Whether the DRVA's status shows a filter connected for the domain (None: no status yet)."""
    try:
        return bool(drva.status()["domains"][0]["connected"])
    except (OSError, ValueError, KeyError, IndexError):
        return None


def write_site(tmp, port: int) -> None:
    listen = f"127.0.0.1:{port}"
    site_files.write_site(tmp, site_files.site(
        "s", state_dir="msa", protect=["erp"],
        drvas=[site_files.drva("drva-m", listen, log_path="msa/drvas/drva-m/replog", log_size="16MiB",
                               meta_path="msa/drvas/drva-m/meta")]),
        site_files.inventory("s", ["h1"], [site_files.vm("vm1", "h1", [("d0", "4MiB")])],
                             [site_files.domain("erp", 1, listen, ["vm1"])]))


async def test_a_requested_mark_lands_after_every_captured_write(tmp_path):
    port = free_port()
    write_site(tmp_path, port)
    cfg = load_site_config(tmp_path / "site.toml")
    doc = drva_doc(tmp_path, "drva-m", [domain_doc(1, "erp", [("vm1", "d0", DISK)])], port=port,
                   seal_bytes="1MiB", seal_age_s=0.1)
    doc["state_dir"] = str(cfg.drva_state_dir(cfg.drva("drva-m")))
    drva = DrvaProcess(doc, tmp_path)
    drva.start()
    disk = Disk(tmp_path / "d0.img", DISK)
    filt = DomainFilter(1, [disk])
    client = FilterClient([filt], "127.0.0.1", port, SECRET.encode(), "host-1")
    task = asyncio.create_task(client.run())
    try:
        await wait_until(lambda: client.connections >= 1, EVENTUALLY_S, "the filter to connect")
        filt.capture(*random_writes(np.random.default_rng(1), [DISK], 50, 16))
        captured = filt.next_seq - 1
        got = await request_mark(cfg, "erp", "before-upgrade", timeout_s=EVENTUALLY_S)
        assert got["name"] == "before-upgrade" and got["seq"] > captured
        state, _ = await load_catalog(FileStore(tmp_path / "store"), 1)
        assert [m["name"] for m in state.timeline().marks] == ["before-upgrade"]
        # A second mark with the same name is a new point, not the old one.
        again = await request_mark(cfg, "erp", "before-upgrade", timeout_s=EVENTUALLY_S)
        assert again["seq"] > got["seq"]
        # Bad requests are dropped by the DRVA, with a log line.
        box = cfg.drva_state_dir(cfg.drva("drva-m")) / "requests"
        (box / "mark-bad.json").write_text("{not json")
        (box / "mark-other.json").write_text(json.dumps({"domain": 9, "name": "x"}))
        await wait_until(lambda: not list(box.glob("mark-*.json")), EVENTUALLY_S, "bad requests to be dropped")
        with pytest.raises(Exception, match="expected 1..255"):  # refused before any wait
            await request_mark(cfg, "erp", "", timeout_s=UNANSWERED_S)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # No filter connected (as the DRVA sees it): the request is not delivered; the error
    # says where it stuck.
    await wait_until(lambda: _connected(drva) is False, EVENTUALLY_S, "the DRVA to see the filter gone")
    with pytest.raises(CdpError, match="did not pass it on"):
        await request_mark(cfg, "erp", "nobody-listens", timeout_s=UNANSWERED_S)
    drva.stop()
    logs = drva.log_path.read_text()
    assert logs.count('"request_refused"') == 2 and '"mark_requested"' in logs
