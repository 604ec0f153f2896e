"""The daemon's stop on a read-only state directory (found by the full-disk audit: an ext4
error, ``errors=remount-ro``): removing a host's pid file raised EROFS, and the stop
ended there — the standby and DRVA stops never ran (a DRVA left running with no daemon),
nor the pid file's release. Each step runs now whatever the one before did, and the
first error is raised at the end.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

from cdp.msa.daemon import MsaDaemon
from cdp.msa.keeper import same_process, start_ticks
from cdp.testing.two_sites import make_two_sites
from tests.full_fs import ext4_error, ext4_remount_ro
from tests.waiting import EVENTUALLY_S, wait_until

HOST_STOP_S = 10.0  # a host that does not drain is SIGKILLed after this (60 s by default)


def acked_all(status: dict | None) -> bool:
    erp = ((status or {}).get("domains") or {}).get("erp") or {}
    return erp.get("mode") == "normal" and erp.get("acked_seq") == erp.get("captured_seq")


def running(pid: int, ticks: int | None) -> bool:
    return ticks is not None and same_process(pid, ticks)


async def test_a_failed_stop_step_does_not_skip_the_next_ones(tmp_path: Path) -> None:
    sites = make_two_sites(tmp_path)
    a = MsaDaemon(sites.a.cfg, sites.a.env)
    await a.start()
    try:
        sup = a.supervisor.drvas["drva-a1"]
        await wait_until(lambda: sup.state == "up", EVENTUALLY_S, "the DRVA up")
        drva = (sup.proc.pid, start_ticks(sup.proc.pid))
        pid_file = a.cfg.state_dir / "logs" / "host-esx-a1.pid"

        async def read_only() -> None:
            raise OSError(errno.EROFS, "Read-only file system", str(pid_file))

        a.hypervisor.stop_all = read_only
        with pytest.raises(OSError) as caught:
            await a.stop()
        assert caught.value.errno == errno.EROFS  # the first error, raised once every step ran
        assert not running(*drva), "the DRVA runs on with no daemon: the stop ended at the hypervisor"
        assert not a.claim.pid_path.exists() and a.claim.lock_fd is None
    finally:
        await a.supervisor.stop_all()  # the parent code's stop left it running
        a.claim.release()


async def test_a_daemon_on_a_read_only_state_dir_stops_its_children(tmp_path: Path) -> None:
    with ext4_remount_ro(tmp_path / "a" / "state", tmp_path / "a-state.img") as state:
        sites = make_two_sites(tmp_path)
        a = MsaDaemon(sites.a.cfg, sites.a.env, hypervisor_options={"stop_timeout_s": HOST_STOP_S})
        await a.start()
        stopped = False
        try:
            await a.power("erp", True)
            hp = a.hypervisor.hosts["esx-a1"]
            await wait_until(lambda: hp.state == "up", EVENTUALLY_S, "erp's VMs up")
            children = [(p.pid, start_ticks(p.pid)) for p in (hp.proc, a.supervisor.drvas["drva-a1"].proc)
                        if p is not None]
            # Its VMs quiet and every write acked: the DRVA, whose log is on the file system
            # that fails, has nothing left to ack, so the host's drain is immediate — but
            # for its SIGTERM message, which goes to a log there.
            await a.hypervisor.pause("erp", timeout_s=EVENTUALLY_S)
            await wait_until(lambda: acked_all(hp.status), EVENTUALLY_S, "every write of erp acked")
            ext4_error(state)
            began = time.monotonic()
            await a.stop()  # nothing to raise: pid files that cannot be removed are logged and left
            stopped = True
            took = time.monotonic() - began
            assert hp.last_exit == 0, f"the host did not drain and exit 0 ({hp.last_exit}) on a read-only log"
            assert took < HOST_STOP_S, f"the stop took {took:.1f} s: the host was killed, not drained"
            assert not [c for c in children if running(*c)], "children left running"
            assert a.claim.lock_fd is None
        finally:
            if not stopped:
                for step in (a.hypervisor.stop_all, a.supervisor.stop_all):
                    try:
                        await step()
                    except OSError:
                        pass
                a.claim.release()
