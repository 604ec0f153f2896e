"""Simulated hosts (the VMs) on a full state directory (found by the full-disk audit with
real daemons, the MSA's state_dir on a small tmpfs):

* a host SIGKILLed while the disk was full was never started again: its restart wrote
  the control file first, outside the keeper's error handling, the ENOSPC ended the
  restart and none was ever scheduled again — ``restarting`` with no restart due, its
  domain's commits stopped, no alarm. A start that fails is tried again after the
  back-off now, and ``vms_not_up`` lists the domain meanwhile (for an alarm);
* a power change (``power web on`` beside erp on the same host) stopped the running
  host before writing its new inventory: the ENOSPC left erp's VMs off for good. The
  inventory is written first now: erp runs on, web is ``not placed``, and the host is
  placed again once the disk has room;
* a host started while the disk was full stayed ``starting`` for good: its status
  writer ended at its first ENOSPC (``iofilter_sim.runner``). It tries again each tick
  now, and the host comes up once it can write its first status.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from cdp.testing.site import running_daemon
from cdp.testing.two_sites import make_two_sites
from tests.full_fs import fill, free, tmpfs
from tests.waiting import EVENTUALLY_S, wait_until

STATE_FS = "48m"  # the DRVA's 8 MiB log and its metadata live there too
AGAIN_S = 20.0  # a restart after the disk has room: the next back-off step (a few s) and a start


def down(daemon) -> list[tuple[str, str]]:
    return [(d.domain, d.state) for d in daemon.hypervisor.vms_not_up()]


@contextlib.asynccontextmanager
async def erp_up(tmp_path: Path, **sites: Any) -> AsyncIterator[tuple[Path, Any, Any]]:
    """Site a's daemon (``make_two_sites`` with ``sites``), its state directory on a small
    tmpfs, erp's VMs up on host esx-a1: (the state directory, the daemon, the host)."""
    with tmpfs(tmp_path / "a" / "state", STATE_FS) as state:
        async with running_daemon(make_two_sites(tmp_path, **sites).a) as a:
            await a.power("erp", True)
            hp = a.hypervisor.hosts["esx-a1"]
            await wait_until(lambda: hp.state == "up", EVENTUALLY_S, "erp's VMs up")
            yield state, a, hp


@contextlib.contextmanager
def full(state: Path) -> Iterator[None]:
    """The state directory filled to its last byte, freed on the way out."""
    try:
        fill(state)
        yield
    finally:
        free(state)


async def test_a_host_killed_while_the_state_dir_is_full_starts_again_once_it_has_room(tmp_path: Path) -> None:
    async with erp_up(tmp_path) as (state, a, hp):
        with full(state):
            os.kill(hp.proc.pid, signal.SIGKILL)
            # Its exit is seen (its pid file removed: a page back) a step before the
            # restart: the disk is topped off in between, as the daemon's own writes do.
            await wait_until(lambda: hp.state == "restarting", EVENTUALLY_S, "the host's exit seen")
            fill(state)
            await wait_until(lambda: "cannot start" in (hp.last_error or ""), 15.0,
                             "a restart that failed on the full disk")
            assert hp.state == "restarting" and hp.restart_at is not None, \
                f"{hp.state}, restart_at {hp.restart_at}: no restart is due, the VMs stay down for good"
            assert "control.json" in hp.last_error and "No space" in hp.last_error, hp.last_error
            assert down(a) == [("erp", "restarting")]
        await wait_until(lambda: hp.state == "up", AGAIN_S, "erp's VMs up again once the disk had room")
        assert down(a) == []


async def test_a_power_change_on_a_full_state_dir_leaves_the_running_vms_running(tmp_path: Path) -> None:
    async with erp_up(tmp_path, web=True) as (state, a, hp):
        pid = hp.proc.pid
        real = a.hypervisor._write_inventory

        def full_first(host) -> None:  # the disk fills up just before the new inventory is written
            a.hypervisor._write_inventory = real
            fill(state)
            real(host)

        a.hypervisor._write_inventory = full_first
        try:
            with pytest.raises(OSError) as caught:
                await a.power("web", True)
            assert hp.proc is not None and hp.proc.pid == pid and hp.proc.returncode is None, \
                "erp's VMs were stopped for a power change that could not be made"
            assert "esx-a1.toml" in str(caught.value) and "No space" in str(caught.value), caught.value
            assert down(a) == [("web", "not placed")]
            assert ("web", "not placed") in [(v.domain, v.state) for v in a.hypervisor.views()]
        finally:
            free(state)
        await wait_until(lambda: hp.domains == ("erp", "web") and hp.state == "up", AGAIN_S,
                         "the host placed again with both domains once the disk had room")
        assert down(a) == [] and a.powered == ["erp", "web"]


async def test_a_host_started_while_the_state_dir_is_full_comes_up_once_it_has_room(tmp_path: Path) -> None:
    """Its status writer no longer dies at its first ENOSPC: a host (re)started while the
    disk is full stays ``starting`` only until it can write its first status."""
    async with erp_up(tmp_path) as (state, a, hp):
        with full(state):
            first = hp.proc.pid
            os.kill(first, signal.SIGKILL)  # its pid file's page is enough for the control file
            await wait_until(lambda: hp.proc is not None and hp.proc.pid != first, EVENTUALLY_S,
                             "the host restarted on the full disk")
            # Its status writes fail meanwhile, with no sign outside (its log is on the
            # full disk too): an import (about a second) and a few ticks of 0.5 s.
            await asyncio.sleep(4.0)
            assert hp.state == "starting", hp.state
        await wait_until(lambda: hp.state == "up", AGAIN_S, "erp's VMs up once the disk had room")
