"""What the MSA removes stays removed after a power loss (found by the crash audit:
``registered.toml`` and ``failovers/<domain>.json`` were unlinked without an fsync of
their directory, came back after a reboot, and the recovery site refused the next
failover with no verb to get out). A SIGKILL test cannot see a missing directory fsync
— the page cache survives the process — so ``Synced`` records what each directory held
at its last fsync (every one goes through ``cdp.durable.sync_dir``): that is what a
power loss leaves of it."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import cdp.msa.failover as failover_job
from cdp import durable
from cdp.errors import CdpError
from cdp.msa import registry
from cdp.msa.failback import release_failed_over
from cdp.msa.failover import cleanup_test_failover, record_path, run_test_failover, write_record
from cdp.msa.handover import forget_handover, handover_path, write_handover
from cdp.msa.job_records import write_domain_record
from cdp.testing.site import running_daemon
from cdp.testing.two_sites import make_two_sites
from tests.mgmt.test_failover_job import failover, run_a_then_stop


class Synced:
    """Each directory's entries as its last fsync saw them (those of ``dirs`` as they are
    now, taken as durable: every file the MSA writes is published with a directory fsync)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *dirs: Path) -> None:
        self.seen: dict[Path, set[str]] = {d: set(os.listdir(d)) for d in dirs if d.is_dir()}
        self._lock = threading.Lock()
        real = durable.sync_dir

        def sync_dir(fd: int) -> None:
            real(fd)
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            with self._lock:
                self.seen[path] = set(os.listdir(path))

        monkeypatch.setattr(durable, "sync_dir", sync_dir)

    def survives(self, path: Path) -> bool:
        """``path`` would be there after a power loss now."""
        return path.name in self.seen.get(path.parent, set())


def test_remove_makes_the_unlink_durable(tmp_path, monkeypatch):
    (tmp_path / "x").write_bytes(b"x")
    synced = Synced(monkeypatch, tmp_path)
    assert durable.remove(tmp_path / "x") is True and not synced.survives(tmp_path / "x")
    synced.seen[tmp_path].add("x")  # an unlink whose fsync a killed run never made
    assert durable.remove(tmp_path / "x") is False and not synced.survives(tmp_path / "x")
    assert durable.remove(tmp_path / "no-such-dir" / "x") is False


def test_records_and_registrations_removed_and_created_are_durable(tmp_path, monkeypatch):
    state = tmp_path / "state"
    state.mkdir()
    synced = Synced(monkeypatch, state)
    write_handover(state, "erp", "m", 7)
    assert synced.survives(state / "handovers") and synced.survives(handover_path(state, "erp"))
    forget_handover(state, "erp")
    assert not synced.survives(handover_path(state, "erp"))
    write_domain_record(state / "failbacks" / "erp.json", {"version": 1, "domain": "erp"})
    assert synced.survives(state / "failbacks")
    registry.save_registry(state, _registered("site-b"))
    assert synced.survives(state / "registered.toml")
    registry.save_registry(state, registry.empty("site-b"))
    assert not synced.survives(state / "registered.toml")


def _registered(site: str) -> dict[str, Any]:
    return registry.with_domain(registry.empty(site), {"name": "erp", "id": 1, "drva": "127.0.0.1:1", "vms": ["v"]},
                                [{"name": "v", "host": "h2", "disks": []}], ["h2"])


def _fake_site(tmp_path: Path) -> SimpleNamespace:
    state, datastore = tmp_path / "state", tmp_path / "datastore"
    state.mkdir()
    datastore.mkdir()
    cfg = SimpleNamespace(state_dir=state, site="site-b", cluster=SimpleNamespace(state_dir=datastore, domains=[]))

    async def owner_elsewhere(name: str, strict: bool = False) -> dict[str, Any]:
        return {"site": "site-a", "timeline": 3, "parent": 2, "fork_seq": 9}

    return SimpleNamespace(cfg=cfg, powered=[], protection={}, owner_elsewhere=owner_elsewhere,
                           reload_config=lambda: None)


async def test_a_release_and_a_test_failovers_clean_up_are_durable(tmp_path, monkeypatch):
    site = _fake_site(tmp_path)
    state, datastore = site.cfg.state_dir, site.cfg.cluster.state_dir
    registry.save_registry(state, _registered("site-b"))
    write_record(state, {"version": 1, "domain": "erp", "id": 1, "site": "site-b", "phase": "done"})
    (datastore / "erp").mkdir()
    (datastore / "erp" / "v-d.img").write_bytes(b"\0")
    synced = Synced(monkeypatch, state, state / "failovers", datastore)
    released = await release_failed_over(site, "erp")
    assert released["released"] is True and synced.survives(Path(released["images_kept"]))
    assert not synced.survives(datastore / "erp")
    assert not synced.survives(record_path(state, "erp")) and not synced.survives(state / "registered.toml")

    write_record(state, {"version": 1, "domain": "erp", "id": 1, "site": "site-b", "target": "seq:5", "test": True,
                         "phase": "started", "started_ns": time.time_ns()})
    (datastore / "test-erp").mkdir()
    synced.seen[datastore].add("test-erp")
    await cleanup_test_failover(site, "erp")
    assert not synced.survives(record_path(state, "erp")) and not synced.survives(datastore / "test-erp")


async def test_a_failover_rolled_back_and_a_failed_test_failover_leave_no_record_after_a_power_loss(
        tmp_path, monkeypatch):
    sites = make_two_sites(tmp_path)
    await run_a_then_stop(sites, min_seq=20)

    async def appliance_fails(*args: Any, **kwargs: Any) -> Any:
        raise CdpError("the appliance failed (injected)")

    monkeypatch.setattr(failover_job, "_rocva_failover", appliance_fails)
    async with running_daemon(sites.b) as b:
        state = b.cfg.state_dir
        synced = Synced(monkeypatch, state)
        rolled_back = await failover(b)
        assert rolled_back["state"] == "failed" and "injected" in rolled_back["error"], rolled_back
        assert not synced.survives(record_path(state, "erp")) and not synced.survives(state / "registered.toml")
        job = await b.start_job("failover", {"domain": "erp", "mode": "test"},
                                lambda j: run_test_failover(b, "erp", "latest", j))
        assert (await b.runner.wait(job["id"]))["state"] == "failed"
        assert not synced.survives(record_path(state, "erp"))
