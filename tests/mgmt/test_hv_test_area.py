"""Where a test failover's disks live, and what its clean-up deletes (found by the
hypervisor audit: the test area was ``<datastore>/test-<name>/``, which is also the
folder of a domain named ``test-<name>`` — a valid name — and ``cdp failover-cleanup``
deleted that whole folder, the disks of a VM running there with it).

The area is now ``<datastore>/+test/<name>/`` ("+" is in no domain name); a test
failover is refused where the site keeps an image, and the clean-up of an earlier
version's area takes from it only what the test's recovery provably wrote."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from cdp import site_files
from cdp.errors import FailoverRefused
from cdp.msa import registry
from cdp.msa.config import load_site_config
from cdp.msa.failover import cleanup_test_failover, read_record, run_test_failover, write_record
from cdp.testing.site import Site, running_daemon
from cdp.testing.two_sites import WORKLOAD, committed, make_two_sites, reload, sha256
from tests.mgmt.test_failover_job import WRITE_S, power_off_and_commit
from tests.waiting import wait_until

LIVE_IMAGE = "test-erp/web-1-disk0.img"  # domain test-erp's disk at site B: its folder is test-erp/


def register_live_test_erp(site: Site, *, isolated_erp_images: list[str] | None = None) -> Path:
    """Register at ``site`` (B) a domain named ``test-erp`` as a failover leaves it —
    VM web-1 on esx-b1, its disk in ``<datastore>/test-erp/`` — with ``isolated_erp_images``
    also a test failover of erp as an earlier version registered it (images given);
    returns the live disk's image, written with a recognisable content."""
    drva = str(site.cfg.drvas[0].listen)
    reg = registry.with_domain(registry.empty(site.cfg.site), site_files.domain("test-erp", 7, drva, ["web-1"], WORKLOAD),
                               [site_files.vm("web-1", "esx-b1", [("disk0", "2MiB", LIVE_IMAGE)])], [])
    if isolated_erp_images is not None:
        vms = {"erp-db": [("data", "2MiB"), ("log", "2MiB")], "erp-app": [("disk0", "2MiB")]}
        entries = [site_files.vm(vm, "esx-b2", [(d, size, image) for (d, size), image in
                                                zip(disks, [i for i in isolated_erp_images if f"/{vm}-" in i])])
                   for vm, disks in vms.items()]
        reg = registry.with_domain(reg, site_files.domain("erp", 1, drva, list(vms), WORKLOAD), entries,
                                   ["esx-b2"], isolated=True)
    registry.save_registry(site.cfg.state_dir, reg)
    live = site.cfg.cluster.state_dir / LIVE_IMAGE
    live.parent.mkdir(parents=True, exist_ok=True)
    live.write_bytes(b"the disk of a VM of domain test-erp\n" * 1000)
    return live


def folder_state(folder: Path) -> dict[str, tuple[int, str]]:
    """Each file of ``folder``: its inode and sha256 (what a deletion and a new file change)."""
    return {p.name: (p.stat().st_ino, sha256(p)) for p in sorted(folder.iterdir())}


class Daemon:
    """What the clean-up and the test failover's checks use of the MSA, without its
    processes (the test-area rules are file work)."""

    def __init__(self, site: Site) -> None:
        self.site, self.cfg, self.powered = site, site.cfg, []

    def reload_config(self) -> None:
        self.cfg = load_site_config(self.site.config_path)


class Job:
    def progress(self, *args: Any) -> None:
        pass


async def test_a_test_failovers_clean_up_leaves_the_folder_of_a_domain_named_test_dash_its_name(tmp_path):
    """The audit's case: domain test-erp runs at B from <datastore>/test-erp/; a test
    failover of erp at B, then its clean-up, leave that folder as it was."""
    sites = make_two_sites(tmp_path, web=True)  # room for test-erp's VM and erp's two at B
    live = register_live_test_erp(sites.b)
    sites.b = reload(sites.b)
    before = folder_state(live.parent)
    async with running_daemon(sites.a) as a:
        await a.power("erp", True)
        await wait_until(lambda: committed(a, "erp") >= 100, WRITE_S, "site A's writes committed")
        await power_off_and_commit(a)
    async with running_daemon(sites.b) as b:
        record = await b.start_job("failover", {"domain": "erp", "target": "latest", "mode": "test"},
                                   lambda job: run_test_failover(b, "erp", "latest", job))
        record = await b.runner.wait(record["id"])
        assert record["state"] == "succeeded", record
        images = record["output"]["images"]
        assert folder_state(live.parent) == before, "the test failover wrote into domain test-erp's folder"
        cleaned = await cleanup_test_failover(b, "erp")
        assert folder_state(live.parent) == before, cleaned  # nothing of test-erp's deleted or replaced
        assert b.cfg.domain("test-erp").disks[0].disk.image == live and b.cfg.isolated == frozenset()
    area = sites.b.cfg.cluster.state_dir / "+test" / "erp"
    assert cleaned["removed"] == str(area) and cleaned["kept"] == [] and not area.exists(), cleaned
    assert len(images) == 3 and all(Path(i["path"]).parent.resolve() == area.resolve() for i in images), images


async def test_a_test_failover_is_refused_where_the_site_keeps_an_image(tmp_path):
    """An image of the site's own inventory inside <datastore>/+test/erp/: the clean-up
    would delete it, so the test failover is refused before it writes anything."""
    sites = make_two_sites(tmp_path, crm=True, install=False)
    path = sites.b.cfg.cluster_path
    doc = tomllib.loads(path.read_text())
    doc["vms"][0]["disks"][0]["image"] = "+test/erp/crm-1-disk0.img"
    site_files.write_inventory(path, doc)
    site = reload(sites.b)
    with pytest.raises(FailoverRefused, match=r"crm-1/disk0 .*move that image out of .*\+test"):
        await run_test_failover(Daemon(site), "erp", "latest", Job())
    assert read_record(site.cfg.state_dir, "erp") is None


async def test_an_earlier_versions_test_area_loses_only_the_tests_images(tmp_path):
    """A test failover that an earlier version brought up in <datastore>/test-erp/, beside
    domain test-erp's disk: its clean-up removes the images its registration names, and
    nothing of test-erp's."""
    sites = make_two_sites(tmp_path, web=True, install=False)
    old = ["test-erp/erp-db-data.img", "test-erp/erp-db-log.img", "test-erp/erp-app-disk0.img"]
    live = register_live_test_erp(sites.b, isolated_erp_images=old)
    for image in old:
        (sites.b.cfg.cluster.state_dir / image).write_bytes(b"test VM writes\n")
    (sites.b.cfg.cluster.state_dir / "test-erp" / "failover.json").write_text("{}")  # test-erp's failover's
    write_record(sites.b.cfg.state_dir, {"version": 1, "domain": "erp", "id": 1, "site": "site-b", "target": "latest",
                                         "test": True, "phase": "done", "seq": 5, "hosts": ["esx-b2"], "done_ns": 1})
    daemon = Daemon(reload(sites.b))
    cleaned = await cleanup_test_failover(daemon, "erp")
    assert sorted(os.listdir(live.parent)) == ["failover.json", live.name], cleaned
    assert live.read_bytes().startswith(b"the disk of a VM of domain test-erp")
    assert sorted(cleaned["removed"].split(", ")) == sorted(str(daemon.cfg.cluster.state_dir / i) for i in old)
    assert cleaned["kept"] == []
    assert [d.name for d in daemon.cfg.cluster.domains] == ["test-erp"] and daemon.cfg.isolated == frozenset()
    assert read_record(daemon.cfg.state_dir, "erp") is None


def recovery_state(domain_id: int, images: list[str]) -> bytes:
    """A recovery state (FORMAT.md §14.2) of ``domain_id`` claiming ``images``."""
    return json.dumps({"version": 2, "identity": "ab" * 32, "domain": domain_id, "target_seq": 9, "generation": 1,
                       "units": {"run_bytes_max": 1 << 24, "gap_bytes_max": 1 << 20, "base_batch_chunks": 64},
                       "complete": False, "images": [{"name": n, "size": 2 << 20, "ino": None} for n in images],
                       "done": {}}).encode()


@pytest.mark.parametrize("owner", ["the test's", "another domain's"])
async def test_an_earlier_versions_killed_test_recovery_is_removed_only_when_its_state_says_it_was_the_tests(
        tmp_path, owner):
    """A test failover of an earlier version killed before it registered its VMs left its
    record and, in <datastore>/test-erp/, a recovery state and a .partial: removed when
    the state is of the test's domain (id 1), else (another domain's recovery: a
    failover of domain test-erp) left as it is."""
    sites = make_two_sites(tmp_path, install=False)
    folder = sites.b.cfg.cluster.state_dir / "test-erp"
    folder.mkdir(parents=True)
    (folder / "recover.state.json").write_bytes(recovery_state(1 if owner == "the test's" else 7, ["erp-db-data.img"]))
    (folder / "erp-db-data.img.partial").write_bytes(b"\0" * 4096)
    (folder / ".recover.lock").write_bytes(b"")  # left by the killed run
    write_record(sites.b.cfg.state_dir, {"version": 1, "domain": "erp", "id": 1, "site": "site-b",
                                         "target": "seq:5", "test": True, "phase": "started", "started_ns": 1})
    cleaned = await cleanup_test_failover(Daemon(sites.b), "erp")
    if owner == "the test's":
        assert not folder.exists(), cleaned
        assert str(folder) in cleaned["removed"].split(", ") and cleaned["kept"] == []
    else:
        assert sorted(os.listdir(folder)) == [".recover.lock", "erp-db-data.img.partial", "recover.state.json"]
        assert str(folder) not in cleaned["removed"] and cleaned["kept"] == [], cleaned
    assert read_record(sites.b.cfg.state_dir, "erp") is None
