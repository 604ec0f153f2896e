"""The simulated host processes themselves (found by the hypervisor audit):

* a pause (a planned failover's quiesce) asked right after a host started sent SIGUSR1
  before iofilter-sim had installed its handler: the signal's default action killed the
  host (its in-flight writes lost, a restart). The driver now signals only a host that
  is up — one still starting is signalled once up — and ``python -m iofilter_sim``
  holds SIGUSR1 pending from its first line until the handler is there;
* the host processes inherited the daemon's whole environment but the store key: the
  store's cloud credentials with it, though a host never opens the store. They get an
  allow-listed one now."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cdp import site_files
from cdp.hypervisor.simulator import SimulatorHypervisor
from cdp.testing.drva_config import SECRET
from cdp.testing.site import running_daemon
from cdp.testing.two_sites import WORKLOAD, make_two_sites
from tests.waiting import EVENTUALLY_S, wait_until

CREDENTIALS = {"AWS_SECRET_ACCESS_KEY": "store-credential", "AZURE_STORAGE_CONNECTION_STRING": "AccountKey=zzz",
               "CDP_STORE_KEY": "k" * 64, "SOME_OTHER_SECRET": "other"}


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.decode().split("=", 1) for entry in raw.split(b"\0") if b"=" in entry)


async def test_a_pause_asked_of_a_starting_host_waits_for_it_and_does_not_kill_it(tmp_path):
    sites = make_two_sites(tmp_path)
    async with running_daemon(sites.a) as a:
        await a.power("erp", True)
        hp = a.hypervisor.hosts["esx-a1"]
        pid = hp.proc.pid
        assert hp.state == "starting"  # iofilter-sim is still importing: no handler yet
        paused = await a.hypervisor.pause("erp", timeout_s=EVENTUALLY_S)
        assert isinstance(paused.get("captured_seq"), int), paused
        assert hp.proc is not None and hp.proc.pid == pid and hp.restarts == 0 and hp.last_exit is None, \
            f"the host was killed: {hp.last_exit}, {hp.last_error}"
        a.hypervisor.resume("erp")  # up now: signalled at once
        await wait_until(lambda: "erp" not in ((hp.status or {}).get("paused") or []), EVENTUALLY_S, "erp resumed")
        assert hp.proc.pid == pid and hp.restarts == 0


async def test_host_processes_get_no_credential_of_the_daemons_environment(tmp_path):
    sites = make_two_sites(tmp_path)
    sites.a.env.update(CREDENTIALS)
    hypervisor = SimulatorHypervisor(sites.a.cfg, sites.a.env)
    assert set(hypervisor.keeper.env).isdisjoint(CREDENTIALS) and "CDP_API_TOKEN" not in hypervisor.keeper.env
    assert hypervisor.keeper.env["CDP_SITE_SECRET"] == SECRET and hypervisor.keeper.env["PATH"] == os.environ["PATH"]
    async with running_daemon(sites.a) as a:
        await a.power("erp", True)
        await wait_until(lambda: [v.state for v in a.hypervisor.views()] == ["up"], EVENTUALLY_S, "erp's VMs up")
        env = environ(a.hypervisor.hosts["esx-a1"].proc.pid)
    assert set(env).isdisjoint(CREDENTIALS) and "CDP_API_TOKEN" not in env and "CDP_PEER_TOKEN" not in env, env
    assert env["CDP_SITE_SECRET"] == SECRET


def test_iofilter_sim_run_survives_a_sigusr1_sent_while_it_imports(tmp_path):
    """``python -m iofilter_sim run``, signalled as soon as its first line ran (SIGUSR1 in
    its blocked mask), i.e. long before its handler: the signal waits, and is handled."""
    inventory = site_files.inventory("site-t", ["h"], [site_files.vm("v", "h", [("d", "1MiB")])],
                                     [site_files.domain("dom", 1, "127.0.0.1:9", ["v"], WORKLOAD)],
                                     state_dir=tmp_path / "datastore")
    site_files.write_inventory(tmp_path / "inventory.toml", inventory)
    control, status = tmp_path / "control.json", tmp_path / "status.json"
    control.write_text(json.dumps({"pause": []}))
    proc = subprocess.Popen([sys.executable, "-m", "iofilter_sim", "run", str(tmp_path / "inventory.toml"),
                             "--isolated", "dom", "--status", str(status), "--control", str(control), "--no-hashes"],
                            env={**os.environ, "CDP_SITE_SECRET": SECRET}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + EVENTUALLY_S
        while not blocked(proc.pid, signal.SIGUSR1):
            assert proc.poll() is None and time.monotonic() < deadline, "SIGUSR1 never blocked at the start"
            time.sleep(0.002)
        control.write_text(json.dumps({"pause": ["dom"]}))
        proc.send_signal(signal.SIGUSR1)
        asyncio.run(wait_until(lambda: proc.poll() is not None or "dom" in (read_json(status).get("paused") or []),
                               EVENTUALLY_S, "domain dom paused"))
        assert proc.poll() is None, f"killed by SIGUSR1: {proc.returncode}"
        assert not blocked(proc.pid, signal.SIGUSR1)  # handled from then on
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


def blocked(pid: int, sig: int) -> bool:
    """Whether process ``pid``'s main thread has ``sig`` in its blocked mask."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return False
    mask = next((int(line.split()[1], 16) for line in lines if line.startswith("SigBlk:")), 0)
    return bool(mask & (1 << (sig - 1)))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
