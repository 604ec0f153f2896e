"""Host processes a killed MSA left running (found by the hypervisor audit): each leads
its own session, so it outlives a SIGKILLed daemon. The next daemon looked for one only
when it spawned a host of the same name — so after the domain failed over to the other
site, whose VMs must stay off here, nothing stopped it and the VMs ran on both sites;
nor did ``cdp power erp off``.

A daemon that forgets its host process (``hosts.pop``) and stops is what a SIGKILLed
one leaves: the process runs on, its pid file (``logs/host-<host>.pid``) names it."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

from cdp.msa.keeper import read_pid_file, same_process
from cdp.testing.site import running_daemon
from cdp.testing.two_sites import committed, make_two_sites
from tests.mgmt.test_failover_job import WRITE_S, failover
from tests.waiting import EVENTUALLY_S, wait_until

HOST_STOP_S = 5.0  # a leftover's drain into a DRVA that fences it waits this long, then SIGKILL


def orphan_host(daemon: Any, host: str = "esx-a1") -> tuple[int, int]:
    """Make ``daemon`` forget its running host process, as a SIGKILL would: the
    process runs on; its (pid, start ticks) from the pid file the keeper wrote."""
    hp = daemon.hypervisor.hosts.pop(host)
    found = read_pid_file(hp.log_path.with_suffix(".pid"))
    assert found is not None and found[0] == hp.proc.pid and same_process(*found), found
    return found


def kill(pid: int, ticks: int) -> None:
    """SIGKILL the process if it still runs (a failed test leaves none behind)."""
    if same_process(pid, ticks):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_a_host_left_by_a_killed_msa_is_stopped_at_its_restart_when_the_domain_failed_over(tmp_path):
    sites = make_two_sites(tmp_path)
    orphan = None
    try:
        async with running_daemon(sites.a) as a:
            await a.power("erp", True)
            await wait_until(lambda: committed(a, "erp") >= 100, WRITE_S, "site A's writes committed")
            orphan = orphan_host(a)
        assert same_process(*orphan)  # site A's MSA is gone; its host writes on
        async with running_daemon(sites.b) as b:
            over = await failover(b)
            assert over["state"] == "succeeded", over
        async with running_daemon(sites.a, hypervisor_options={"stop_timeout_s": HOST_STOP_S}) as a:
            assert not same_process(*orphan), "the host the killed MSA left runs on at site A"
            assert a.powered == [] and a.hypervisor.views() == []  # erp runs at site B now
    finally:
        if orphan is not None:
            kill(*orphan)


async def test_power_off_stops_a_host_process_the_daemon_does_not_hold(tmp_path):
    sites = make_two_sites(tmp_path)
    orphan = None
    try:
        async with running_daemon(sites.a, hypervisor_options={"stop_timeout_s": HOST_STOP_S}) as a:
            await a.power("erp", True)
            await wait_until(lambda: [v.state for v in a.hypervisor.views()] == ["up"], EVENTUALLY_S, "erp's VMs up")
            orphan = orphan_host(a)
            off = await a.power("erp", False)
            assert off["was_on"] and not same_process(*orphan), "powered off, erp's VMs run on"
            assert a.hypervisor.hosts == {} and not (a.cfg.state_dir / "logs" / "host-esx-a1.pid").exists()
    finally:
        if orphan is not None:
            kill(*orphan)
