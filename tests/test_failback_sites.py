"""Failback as an operator runs it (issue 12), every step a ``cdp`` command in a
subprocess, both sites' daemons real processes on the file store: what is refused with
nothing changed, and a failback onto disks that are gone (rewritten whole) that dies
twice — its recovery appliance SIGKILLed, then site A's MSA SIGKILLed — and completes
when rerun, never running A's VMs on a half-written disk.

The failback of a site that comes back with its disks and log leftovers is the end of
``tests/test_failover_sites.py``'s unplanned failover on the file store.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from cdp.layout import domain_prefix
from cdp.testing.two_sites import TwoSites, make_two_sites, sha256
from tests.test_failover_sites import WRITES_S, Operator, _kill_site, domain_objects, start_both
from tests.procs import children
from tests.test_walkthrough import CLI_EXIT_S, EXIT_S, _stop


APPLIANCE_POLL_S = 0.01
KILL_WITHIN_S = 0.15  # after it is seen: a random moment of its start or its work


def first_appliance(op: Operator, what: str) -> int:
    """The pid of A's failback appliance, seen within ``APPLIANCE_POLL_S`` of its start:
    the kill that follows must land while it runs, and its imports alone outlast the
    poll plus ``KILL_WITHIN_S`` (a 0.2 s poll and a 0.5 s wait once found it finished)."""
    deadline = time.monotonic() + CLI_EXIT_S
    while not (found := children(op.daemons["a"].pid, b"rocva", b"failback")):
        assert time.monotonic() < deadline, f"timed out after {CLI_EXIT_S:g} s waiting for {what}\n{op.logs()}"
        time.sleep(APPLIANCE_POLL_S)
    return found[0]


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"  # a zombie has exited
    except OSError:
        return True


def test_refusals_change_nothing_and_a_failback_killed_twice_completes_when_rerun(tmp_path: Path) -> None:
    sites = make_two_sites(tmp_path, install=False)
    op = Operator(sites, tmp_path)
    rng = random.Random(os.environ.get("CDP_TEST_SEED", "failback"))
    state_a = sites.a.cfg.state_dir
    try:
        start_both(op)
        refused = op.at("a", "failback", "erp", expect=2)  # erp never failed over
        assert "nothing to fail back" in refused["error"], refused

        _kill_site(op.status("a"), op.daemons.pop("a"))  # site A is lost, its disks with it
        over = op.at("b", "failover", "erp", "--latest")["output"]
        op.wait("B's writes on timeline 2", lambda: op.committed("b") > over["fork_seq"] + 30, WRITES_S)
        images = [d.disk.image for d in sites.a.cfg.domain("erp").disks]
        for image in images:
            image.unlink()
            image.with_name(image.name + ".dirty").unlink(missing_ok=True)

        # Site A's inventory gives a disk another size than the catalog's: refused before
        # B is asked anything.
        inventory = sites.a.cfg.cluster_path
        good = inventory.read_text()
        assert good.count('"2MiB"') == 3, good
        inventory.write_text(good.replace('"2MiB"', '"3MiB"', 1))
        op.start_daemon("a")
        before = (domain_objects(sites), op.committed("b"))
        refused = op.at("a", "failback", "erp", expect=2)
        assert "bytes in the catalog" in refused["error"] and "make the inventory say" in refused["error"], refused
        assert op.status("b")["powered"] == ["erp"]  # B runs on, untouched
        op.wait("B's writes after the refusal", lambda: op.committed("b") > before[1], WRITES_S)
        _stop(op.daemons.pop("a"))
        inventory.write_text(good)

        # Site B's daemon is down: refused (A cannot have B's final mark), nothing changed.
        _stop(op.daemons.pop("b"))
        op.start_daemon("a")
        before = domain_objects(sites)
        refused = op.at("a", "failback", "erp", expect=2)
        assert "did not hand domain erp over" in refused["error"], refused
        assert domain_objects(sites) == before and not (state_a / "failbacks").exists()
        assert not any(image.exists() for image in images)
        op.start_daemon("b")
        op.wait("B running erp again", lambda: op.status("b")["powered"] == ["erp"], WRITES_S)

        # The failback's appliance is SIGKILLed, then (rerun) A's MSA is: the disks are
        # half-written at most, and A refuses to run its VMs on them.
        dies = op.at_background("a", "failback", "erp")
        appliance = first_appliance(op, "the failback's appliance")
        time.sleep(rng.uniform(0.0, KILL_WITHIN_S))
        os.kill(appliance, signal.SIGKILL)
        assert dies.wait(CLI_EXIT_S) != 0
        op.at("a", "power", "erp", "on", expect=2)  # the disks may be half-written
        assert op.status("a")["powered"] == []

        op.at_background("a", "failback", "erp")
        appliance = first_appliance(op, "the rerun's appliance")
        time.sleep(rng.uniform(0.0, KILL_WITHIN_S))
        op.daemons.pop("a").kill()  # A's MSA dies: its appliance goes with it (stdin closed)
        op.wait("the appliance gone with its MSA", lambda: gone(appliance), EXIT_S)
        op.start_daemon("a")
        assert op.status("a")["powered"] == []

        back = op.at("a", "failback", "erp")["output"]
        assert back["timeline"] == 3 and back["fork_seq"] == back["handover"]["seq"], back
        if back["disks"] is not None:  # None: an appliance had forked before it died
            assert [d["mode"] for d in back["disks"]] == ["whole"] * 3, back["disks"]
        assert op.status("a")["powered"] == ["erp"] and op.status("b")["powered"] == []
        op.at("b", "power", "erp", "on", expect=2)  # B let the domain go

        fork = back["fork_seq"]
        op.wait("A's writes on timeline 3", lambda: op.committed("a") > fork + 30, WRITES_S)
        acked = op.at("a", "power", "erp", "off")["acked_seq"]
        op.wait(f"A's seq {acked} committed", lambda: op.committed("a") >= acked, WRITES_S)
        store = ("--store", sites.a.cfg.store_url)
        latest = op.cdp("recover", "erp", *store, "--latest", "--timeline", "3", "--to", str(tmp_path / "t3"))
        assert [sha256(Path(i["path"])) for i in latest["images"]] == sites.primaries_a()
    finally:
        op.stop_all()



ERP_ID, CRM_ID = 1, 3  # cdp.testing.two_sites


def domains_in(root: Path) -> set[str]:
    """The domain prefixes (``d/<id>/``) with objects in the file store at ``root``."""
    return {f"d/{p.relative_to(root).parts[1]}/" for p in (root / "d").rglob("*") if p.is_file()}


def check_stores(sites: TwoSites, two_stores: bool) -> None:
    """Each domain's objects are in its store only: with two stores erp's in A's (where it
    was protected from, whichever site writes it) and crm's in B's; else both in the one."""
    if two_stores:
        assert sites.store_b is not None
        assert (domains_in(sites.store), domains_in(sites.store_b)) == ({domain_prefix(ERP_ID)},
                                                                       {domain_prefix(CRM_ID)})
    else:
        assert domains_in(sites.store) == {domain_prefix(ERP_ID), domain_prefix(CRM_ID)}


@pytest.mark.parametrize("two_stores", [False, True], ids=["one-store", "two-stores"])
def test_both_ways_at_once_erp_goes_to_b_and_back_while_crm_keeps_its_rpo(tmp_path: Path, two_stores: bool) -> None:
    """Each site protects its own domain and is the other's recovery site — with one store,
    or with one per direction (erp in A's, crm in B's): A's erp fails over to B (planned)
    and back (``cdp failback``) while B's crm, on the same DRVA of B that takes erp in,
    stays within its RPO target all along; each domain's objects only ever land in its
    own store, and both domains' latest points recover to their disks."""
    sites = make_two_sites(tmp_path, install=False, crm=True, two_stores=two_stores)
    op = Operator(sites, tmp_path)
    erp_store, crm_store = ("--store", sites.a.cfg.store_url), ("--store", sites.b.cfg.store_url)
    assert (erp_store == crm_store) is not two_stores
    target_s = sites.b.cfg.policy("crm").rpo_target_s
    lags: list[float] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.2):
            with contextlib.suppress(OSError, ValueError, KeyError):
                lags.append(float(op.domain_status("b", "crm").get("rpo_lag_s") or 0.0))

    sampler = threading.Thread(target=sample, name="crm-rpo", daemon=True)
    try:
        for site in ("a", "b"):
            op.at(site, "install")
            op.start_daemon(site)
        op.at("a", "power", "erp", "on")
        op.at("b", "power", "crm", "on")
        for site, name in (("a", "erp"), ("b", "crm")):
            op.wait(f"{name}'s first writes in the store", lambda: op.committed(site, name) >= 100, WRITES_S)
        sampler.start()
        assert ("peer_store" in op.status("b")) is two_stores
        check_stores(sites, two_stores)

        planned = op.at("b", "failover", "erp", "--planned")["output"]
        assert planned["handover"]["lost_writes"] == 0 and planned["timeline"] == 2, planned
        op.wait("B's writes of erp", lambda: op.committed("b") > planned["fork_seq"] + 30, WRITES_S)
        assert sorted(op.status("b")["powered"]) == ["crm", "erp"]
        check_stores(sites, two_stores)  # B's DRVA writes erp to A's store, crm to its own
        crm_before = op.committed("b", "crm")

        back = op.at("a", "failback", "erp")["output"]
        assert (back["timeline"], back["parent_timeline"]) == (3, 2), back
        assert [d["mode"] for d in back["disks"]] == ["delta"] * 3, back["disks"]
        assert back["source"] == "peer", back
        op.wait("A's writes of erp on timeline 3", lambda: op.committed("a") > back["fork_seq"] + 30, WRITES_S)
        assert op.status("b")["powered"] == ["crm"] and op.status("a")["powered"] == ["erp"]
        op.wait("crm's writes after erp left B", lambda: op.committed("b", "crm") > crm_before + 100, WRITES_S)
        sampling.set()
        sampler.join(EXIT_S)
        assert len(lags) > 10 and max(lags) < target_s, lags

        acked = op.at("b", "power", "crm", "off")["acked_seq"]
        op.wait(f"crm's seq {acked} committed", lambda: op.committed("b", "crm") >= acked, WRITES_S)
        crm = op.cdp("recover", "crm", *crm_store, "--latest", "--to", str(tmp_path / "crm"))
        assert [sha256(Path(i["path"])) for i in crm["images"]] == sites.primaries_b("crm")
        points = op.cdp("points", "crm", *crm_store)
        assert [(t["timeline"], t["owner"]) for t in points["timelines"]] == [(1, "site-b")]

        acked = op.at("a", "power", "erp", "off")["acked_seq"]
        op.wait(f"erp's seq {acked} committed", lambda: op.committed("a") >= acked, WRITES_S)
        erp = op.cdp("recover", "erp", *erp_store, "--latest", "--to", str(tmp_path / "erp"))
        assert [sha256(Path(i["path"])) for i in erp["images"]] == sites.primaries_a()
        points = op.cdp("points", "erp", *erp_store)
        assert [(t["timeline"], t["owner"]) for t in points["timelines"]] == [(1, "site-a"), (2, "site-b"),
                                                                              (3, "site-a")]
        check_stores(sites, two_stores)
    finally:
        sampling.set()
        op.stop_all()
