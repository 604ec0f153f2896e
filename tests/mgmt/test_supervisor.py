"""The daemon's DRVA supervision: a DRVA killed with SIGKILL is restarted and protection
resumes with no loss; a DRVA that keeps failing is restarted with a growing back-off;
stopping the daemon stops its DRVAs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import numpy as np

from cdp.msa.supervisor import Supervisor
from cdp.store.fs import FileStore
from cdp.testing.site import installed_site, running_daemon
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import SECRET, Disk, check_store, random_writes
from tests.drva.test_crash import wait_until_committed
from tests.waiting import EVENTUALLY_S, wait_until

# A back-off that does not end by itself: the test moves the supervisor's clock past it,
# so "restarting" lasts until the test has looked at it (a 1 s back-off did not always).
HELD_BACKOFF_S = 3600.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_sigkilled_drva_is_restarted_and_protection_resumes_with_no_loss(tmp_path):
    site = await installed_site(tmp_path / "site", protect=("erp",))
    skew_s = [0.0]
    options = {"backoff_first_s": HELD_BACKOFF_S, "clock": lambda: time.monotonic() + skew_s[0]}
    async with running_daemon(site, supervisor_options=options) as daemon:
        sup = daemon.supervisor
        await wait_until(lambda: (v := sup.view("drva-1")) is not None and v.state == "up", EVENTUALLY_S,
                         "drva-1 up")
        spec = site.cfg.domain("erp")
        disks = [Disk(tmp_path / f"erp-{i}.img", d.disk.size) for i, d in enumerate(spec.disks)]
        filt = DomainFilter(spec.id, disks)
        client = FilterClient([filt], spec.drva.host, spec.drva.port, SECRET.encode(), "esx-01")
        client_task = asyncio.create_task(client.run())
        stop = asyncio.Event()

        async def load() -> None:
            rng = np.random.default_rng(5)
            while not stop.is_set():
                filt.capture(*random_writes(rng, [d.size for d in disks], 8, 16))
                await asyncio.sleep(0.02)

        load_task = asyncio.create_task(load())
        try:
            await wait_until(lambda: filt.acked_seq > 50, EVENTUALLY_S, "writes acked before the kill")
            first_pid = sup.pid("drva-1")
            os.kill(first_pid, signal.SIGKILL)
            acked_at_kill = filt.acked_seq
            await wait_until(lambda: sup.view("drva-1").state == "restarting", EVENTUALLY_S, "the exit to be seen")
            daemon.evaluate_alarms()
            down = [a for a in daemon.alarms.active_alarms() if a.kind == "drva_down"]
            assert len(down) == 1 and "killed by SIGKILL" in down[0].message, down
            skew_s[0] += HELD_BACKOFF_S  # the back-off is over
            await wait_until(lambda: sup.view("drva-1").state == "up", EVENTUALLY_S, "drva-1 to come back")
            view = sup.view("drva-1")
            assert view.restarts == 1 and view.pid != first_pid and view.last_exit == -signal.SIGKILL
            await wait_until(lambda: client.connections >= 2, EVENTUALLY_S, "the filter to reconnect")
            await wait_until(lambda: filt.acked_seq > acked_at_kill + 50, EVENTUALLY_S, "acks after the restart")
        finally:
            stop.set()
            await load_task
        await wait_until(lambda: filt.mode == "normal" and filt.acked_seq == filt.next_seq - 1, EVENTUALLY_S,
                         "the filter to drain")
        store = FileStore(site.root / "store")
        await wait_until_committed(store, spec.id, filt.next_seq - 1)
        daemon.evaluate_alarms()
        assert not [a for a in daemon.alarms.active_alarms() if a.kind == "drva_down"]
        assert any(a.kind == "drva_down" for a in daemon.alarms.recent_alarms())
        client_task.cancel()
        await asyncio.gather(client_task, return_exceptions=True)
        last_pid = sup.pid("drva-1")
    # Every acked write is in the store, and the store replays to the primaries.
    summary = await check_store(store, spec.id, [d.sha256() for d in disks], tmp_path)
    assert summary["committed_seq"] == filt.next_seq - 1 >= acked_at_kill
    assert not _alive(last_pid), "the daemon left its DRVA running"
    log_text = (site.cfg.state_dir / "logs" / "drva-1.log").read_text()
    assert log_text.count("drva_started") == 2


async def test_failing_drva_is_restarted_with_a_doubling_backoff(tmp_path):
    site = await installed_site(tmp_path / "site", protect=("erp",))
    # The log partition path is a directory: the DRVA exits at once, naming it.
    drva = site.cfg.drva("drva-1")
    drva.log_path.unlink()
    drva.log_path.mkdir()
    now = [1000.0]
    sup = Supervisor(site.cfg, site.env, clock=lambda: now[0], backoff_first_s=0.5, backoff_max_s=2.0,
                     stable_after_s=60.0)
    try:
        assert await sup.apply({"erp": site.cfg.policy("erp")}) == ["drva-1"]
        delays = []
        for attempt in range(5):
            proc = sup.drvas["drva-1"].proc
            async with asyncio.timeout(EVENTUALLY_S):  # it exits at once (bad log path)
                await proc.wait()
            await sup.step()
            view = sup.view("drva-1")
            assert view.state == "restarting" and view.restarts == attempt
            assert view.last_exit not in (0, None)
            delays.append(view.restart_in_s)
            now[0] += view.restart_in_s - 0.01
            await sup.step()
            assert sup.view("drva-1").state == "restarting"  # not before its time
            now[0] += 0.02
            await sup.step()
            assert sup.view("drva-1").state == "starting" and sup.view("drva-1").restarts == attempt + 1
        assert delays == [0.5, 1.0, 2.0, 2.0, 2.0]
        assert sup.view("drva-1").last_error  # what its log said before it exited
        # Unassigned: stopped and forgotten.
        await sup.apply({})
        assert sup.views() == []
    finally:
        await sup.stop_all()


async def test_domain_set_change_restarts_the_drva_and_daemon_stop_stops_all(tmp_path):
    site = await installed_site(tmp_path / "site", protect=("erp", "files"))
    async with running_daemon(site) as daemon:
        sup = daemon.supervisor
        await wait_until(lambda: all(v.state == "up" for v in sup.views()) and len(sup.views()) == 2,
                         EVENTUALLY_S, "both DRVAs up")
        pids = {v.name: v.pid for v in sup.views()}
        assert sup.assignment(daemon.protection) == {"drva-1": ("erp",), "drva-2": ("files",)}
        cfg_text = (site.cfg.state_dir / "drvas" / "drva-1.toml").read_text()
        assert 'name = "erp"' in cfg_text and 'name = "web"' not in cfg_text
        assert site.env["CDP_SITE_SECRET"] not in cfg_text  # the secret travels in the environment only
        record = await daemon.runner.start("protect", {"domain": "web"}, 60,
                                           lambda job: daemon.protect("web", site.cfg.policy("web"), job))
        final = await daemon.runner.wait(record["id"])
        assert final["state"] == "succeeded" and final["output"]["drva_restarted"] is True
        assert 'name = "web"' in (site.cfg.state_dir / "drvas" / "drva-1.toml").read_text()
        assert sup.pid("drva-1") != pids["drva-1"] and sup.pid("drva-2") == pids["drva-2"]
        assert not _alive(pids["drva-1"])
        assert sup.view("drva-1").restarts == 0  # a requested restart is no crash
        await daemon.unprotect("files")
        assert "drva-2" not in sup.drvas and not _alive(pids["drva-2"])
        # The request that lets drva-2 give up what its log holds of the domain at its
        # next start (without one, it would refuse to start rather than drop acked writes).
        files = site.cfg.domain("files")
        request = site.cfg.drva_state_dir(site.cfg.drva_of(files)) / "requests" / f"unprotect-{files.id}.json"
        assert json.loads(request.read_text()) == {"domain": files.id, "name": "files"}
        last = sup.pid("drva-1")
        assert (site.cfg.state_dir / "msa.pid").read_text().split()[0] == str(os.getpid())
    assert not _alive(last)
    assert not (site.cfg.state_dir / "msa.pid").exists()


async def test_a_second_daemon_of_one_state_directory_is_refused_even_in_one_process(tmp_path):
    """Two daemons started together both read "no daemon" from the pid file: the claim is
    an flock of msa.lock, which a second open refuses even in the same process, and which
    the first daemon's stop gives back."""
    from cdp.errors import Busy
    from cdp.msa.daemon import MsaDaemon

    site = await installed_site(tmp_path / "site", protect=())
    async with running_daemon(site):
        second = MsaDaemon(site.cfg, site.env)
        try:
            await second.start()
        except Busy as exc:
            assert "msa.lock" in exc.message, exc.message
        else:
            await second.stop()
            raise AssertionError("a second daemon started on the same state directory")
        assert (site.cfg.state_dir / "msa.pid").read_text().split()[0] == str(os.getpid())
    async with running_daemon(site):  # given back at stop
        pass
