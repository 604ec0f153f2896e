"""Failback through the protected site's MSA (issue 12), both daemons in this process,
their DRVAs and simulated hosts real subprocesses: site A's domain failed over to B at a
point before A's last writes (A, fenced, went on writing into its log), B ran it; ``cdp
failback`` at A brings it home — B quiesces at a final mark, only what changed is written
into A's disks, A's DRVA adopts the new timeline, A's VMs run, B releases the domain."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cdp.catalog import load_catalog
from cdp.errors import CdpError
from cdp.extent_stream import request_for
from cdp.msa import registry
from cdp.msa.failback import read_record, run_failback
from cdp.msa.failover import _find
from cdp.msa.failover import read_record as read_failover
from cdp.store.fs import FileStore
from cdp.testing.site import running_daemon
from cdp.testing.two_sites import make_two_sites, sha256
from rocva import RecoverOptions, Target, recover
from rocva.peer_extents import Peer, PeerUnavailable, copy_from_peer
from tests.mgmt.test_failover_job import WRITE_S, committed, failover, power_off_and_commit
from tests.waiting import wait_until


def acked(daemon: Any, name: str = "erp") -> int:
    """The seq up to which the domain's running VMs had their writes acked (their host's status)."""
    view = next((v for v in daemon.hypervisor.views() if v.domain == name), None)
    return int(((view.status or {}) if view is not None else {}).get("acked_seq") or 0)


async def failback(daemon: Any, name: str = "erp") -> dict[str, Any]:
    record = await daemon.start_job("failback", {"domain": name}, lambda job: run_failback(daemon, name, job))
    return await daemon.runner.wait(record["id"])


async def test_failback_brings_the_domain_home_moving_only_what_changed(tmp_path):
    sites = make_two_sites(tmp_path, disk="16MiB")  # room the workloads leave unwritten
    images_a = [d.disk.image for d in sites.a.cfg.domain("erp").disks]
    async with running_daemon(sites.a) as a, running_daemon(sites.b) as b:
        await a.power("erp", True)
        await wait_until(lambda: committed(a, "erp") >= 150, WRITE_S, "site A's first writes committed")
        point = committed(a, "erp")
        await wait_until(lambda: committed(a, "erp") >= point + 60, WRITE_S, "site A's writes after the point")
        over = await failover(b, target=f"seq:{point}")  # A is still running: it is fenced, and goes on writing
        assert over["state"] == "succeeded", over
        fork = over["output"]["fork_seq"]
        await wait_until(lambda: committed(b, "erp") > fork + 60, WRITE_S, "B's writes on the new timeline")
        await a.power("erp", False)  # A's VMs stop (their last writes acked into A's log, never shipped)

        record = await failback(a)
        assert record["state"] == "succeeded", record
        out = record["output"]
        assert out["from_site"] == "site-b" and out["target"] == f"mark:{out['handover']['mark']}"
        assert (out["timeline"], out["parent_timeline"]) == (3, 2) and out["fork_seq"] == out["handover"]["seq"]
        assert [d["mode"] for d in out["disks"]] == ["delta"] * len(images_a), out["disks"]
        assert (out["source"], out["peer_error"]) == ("peer", None), out  # read from B's handed-back disks
        total = sum(d.disk.size for d in sites.a.cfg.domain("erp").disks)
        assert 0 < out["bytes_moved"] < total and any(d["ranges"]["log"] for d in out["disks"]), out["disks"]
        assert read_record(a.cfg.state_dir, "erp")["phase"] == "done"
        # B let the domain go: VMs off, not protected, unregistered, on-demand host gone.
        assert b.powered == [] and "erp" not in b.protection
        assert "erp" not in registry.registered_domains(registry.load_registry(b.cfg.state_dir, "site-b"))
        assert out["release"]["hosts_removed"] == ["esx-b2"] and not any(d.name == "erp" for d in b.cfg.cluster.domains)
        # A runs it on timeline 3: its VMs write on, its DRVA (which adopted the timeline) ships.
        assert a.powered == ["erp"] and a.failed_over == {}
        await wait_until(lambda: acked(a) > out["fork_seq"] + 60, WRITE_S, "A's writes acked on timeline 3")
        await power_off_and_commit(a)
        again = await failback(a)
        assert again["state"] == "failed" and "nothing to fail back" in again["error"], again
        # B's release moved the disks it ran on aside (never deleted): a new failover to B
        # rehydrates fresh ones instead of refusing to overwrite them.
        kept = Path(out["release"]["images_kept"])
        assert kept.parent == b.cfg.cluster.state_dir / "+released" and kept.name.startswith("erp-"), kept
        assert sorted(p.name for p in kept.glob("*.img")) and not (b.cfg.cluster.state_dir / "erp").exists()
        over_again = await failover(b, target="latest")
        assert over_again["state"] == "succeeded", over_again
        assert over_again["output"]["parent_timeline"] == 3, over_again["output"]
        await b.power("erp", False)
    store = FileStore(sites.store)
    state, _ = await load_catalog(store, 1)
    assert state.timeline(3).owner == "site-a"
    assert state.current == 4 and state.timeline().owner == "site-b" and state.timeline().parent == 3
    # A's disks were B's at the mark: what A wrote since on top of them is the new
    # timeline's latest point, byte for byte.
    latest = await recover(store, 1, RecoverOptions(Target.latest(), tmp_path / "t3", timeline=3))
    assert [sha256(i["path"]) for i in latest["images"]] == [sha256(p) for p in images_a]
    at_mark = await recover(store, 1, RecoverOptions(Target.seq(out["fork_seq"]), tmp_path / "t2", timeline=2))
    on_three = await recover(store, 1, RecoverOptions(Target.seq(out["fork_seq"]), tmp_path / "t3m", timeline=3))
    assert [sha256(i["path"]) for i in at_mark["images"]] == [sha256(i["path"]) for i in on_three["images"]]


async def test_handed_back_disks_are_served_at_their_mark_and_stay_off(tmp_path):
    """B's quiesce for a failback records the hand-back: B's VMs are refused power-on, and
    B's API serves its disks (FORMAT.md §16) only at the handed-back seq — bytes equal to
    B's images, checked piece by piece; another seq, a wrong token: refused."""
    sites = make_two_sites(tmp_path, disk="16MiB")
    async with running_daemon(sites.a) as a, running_daemon(sites.b) as b:
        await a.power("erp", True)
        await wait_until(lambda: committed(a, "erp") >= 100, WRITE_S, "site A's first writes committed")
        await power_off_and_commit(a)
        over = await failover(b, target="latest")
        assert over["state"] == "succeeded", over
        await wait_until(lambda: committed(b, "erp") > over["output"]["fork_seq"] + 40, WRITE_S, "B's writes")
        job = await b.start_job("quiesce", {"domain": "erp"}, lambda j: b.quiesce("erp", "handover-test", j))
        done = await b.runner.wait(job["id"])
        assert done["state"] == "succeeded", done
        seq = done["output"]["seq"]
        assert read_failover(b.cfg.state_dir, "erp")["handed_back"]["seq"] == seq
        try:
            await b.power("erp", True)
            raise AssertionError("B powered a handed-back domain on")
        except CdpError as exc:
            assert "handed back" in exc.message and "handover-test" in exc.message
        domain_id, disks, committed_seq = await _find(b.cfg, "erp")
        assert committed_seq == seq
        images_b = {(d.vm.name, d.disk.name): d.disk for d in b.cfg.domain("erp").disks}
        ids = [int(d["disk"]) for d in disks]
        sizes = [int(d["size"]) for d in disks]
        whole = [(np.array([0]), np.array([size])) for size in sizes]
        url = f"http://{b.cfg.api_listen}/v1/failback/erp/extents"
        fds, copies = {}, []
        try:
            for disk, size in zip(ids, sizes):
                path = tmp_path / f"copy-{disk}.img"
                path.write_bytes(b"")
                os.truncate(path, size)
                fds[disk] = os.open(path, os.O_RDWR)
                copies.append(path)
            for bad, why in ((request_for(domain_id, seq + 1, ids, whole), f"not at seq {seq + 1}"),
                             (request_for(domain_id + 1, seq, ids, whole), "not at seq")):
                try:
                    await copy_from_peer(Peer(url, b.token, "site-b"), bad, fds)
                    raise AssertionError(f"served {why}")
                except PeerUnavailable as exc:
                    assert why in exc.message, exc.message
            try:
                await copy_from_peer(Peer(url, "not-the-token", "site-b"), request_for(domain_id, seq, ids, whole), fds)
                raise AssertionError("served without the token")
            except PeerUnavailable as exc:
                assert "bearer token" in exc.message and b.token not in exc.message
            written = await copy_from_peer(Peer(url, b.token, "site-b"), request_for(domain_id, seq, ids, whole), fds)
        finally:
            for fd in fds.values():
                os.close(fd)
        assert written == sum(sizes)
        want = [sha256(images_b[(d["vm"], d["name"])].image) for d in disks]
        assert [sha256(p) for p in copies] == want
