"""``cdp uninstall`` against what it must keep and what a killed daemon left running
(cdp/msa/install_removal.py, cdp/msa/config.py, cdp/msa/processes.py's leftovers).

- A DRVA's state directory (``<state_dir>/drvas/<name>``) loses only what the DRVA
  writes there (``status.json``, ``requests/``); a store, a site CA or anything else
  found there stays, said so, and the site file refuses to put them there at all.
- The DRVAs and hosts a SIGKILLed daemon left running are stopped before their
  partitions are removed; one that survives stops uninstall before anything goes.

These run as root in CI, as the other hostile tests do.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from cdp import site_files
from cdp.errors import Busy, ConfigError
from cdp.msa import processes
from cdp.msa.config import load_site_config
from cdp.msa.deployment import install_record_path
from cdp.msa.install import install, uninstall
from cdp.msa.keeper import start_ticks, write_pid_file
from cdp.msa.preflight import preflight_uninstall
from cdp.msa.site_tls import TlsSpec
from cdp.testing.drva_config import free_port
from cdp.testing.site import Site, inventory_doc, make_site, site_doc

SLEEP_S = 120


def by_name(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in summary["checks"]}


# --------------------------------------------------------------------------- a DRVA's state directory


def write_site_with(root: Path, change: str) -> Path:
    """The test site's files with one thing put inside drva-1's state directory."""
    p1, p2, api = free_port(), free_port(), free_port()
    doc = site_doc(p1, p2, api, log_size="8MiB", protect=("erp",), recovery_roots=[])
    inventory = inventory_doc(p1, p2)
    inside = "state/drvas/drva-1/x"
    if change == "store":
        doc["store"] = inside
    elif change == "tls.dir":
        doc["tls"] = {"mode": "on", "dir": inside}
    elif change == "recovery_roots[0]":
        doc["recovery_roots"] = [inside]
    elif change == "cluster state_dir":
        inventory["state_dir"] = inside
    else:  # one VM's image, by an absolute path
        inventory["vms"][0]["disks"][0]["image"] = str(root / inside / "erp-db-data.img")
    return site_files.write_site(root, doc, inventory, check=False)


@pytest.mark.parametrize("change, key", [
    ("store", "store"), ("tls.dir", "tls.dir"), ("recovery_roots[0]", "recovery_roots[0]"),
    ("cluster state_dir", "state_dir of cluster.toml"),
    ("image", "the image of disk data of VM erp-db in cluster.toml")])
def test_the_site_file_keeps_what_uninstall_keeps_out_of_a_drva_state_dir(tmp_path: Path, change: str,
                                                                       key: str) -> None:
    path = write_site_with(tmp_path, change)
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    message = err.value.message
    assert message.startswith(f"{path.resolve()}: {key} (")
    assert "state directory of DRVA drva-1" in message and "drvas[0].name" in message, message
    assert str(tmp_path / "state" / "drvas" / "drva-1") in message


def plant(state_dir: Path) -> dict[str, bytes]:
    """What a DRVA writes in its state directory, and what someone else put there."""
    (state_dir / "requests").mkdir(parents=True, exist_ok=True)
    for name in ("status.json", ".tmp-status.json-0a1b2c3d4e5f", "requests/mark-17-0a1b2c3d.json",
                 "requests/.tmp-mark-18-0a1b2c3d.json-0a1b2c3d4e5f"):
        (state_dir / name).write_bytes(b"{}")
    theirs = {"store/d/00000009/precious-segment": b"x" * 1000, "tls/ca.key": b"the site CA's key",
              "requests/notes.txt": b"not a request"}
    for name, data in theirs.items():
        (state_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (state_dir / name).write_bytes(data)
    return theirs


async def test_uninstall_removes_only_what_the_drva_wrote_in_its_state_dir(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", install=False)
    await install(site.cfg, site.env)
    one, two = (site.cfg.drva_state_dir(d) for d in site.cfg.drvas)
    theirs = plant(one)
    (two / "requests").mkdir()
    (two / "status.json").write_bytes(b"{}")
    (two / "requests" / "mark-1-00000000.json").write_bytes(b"{}")

    check = by_name(await preflight_uninstall(site.cfg, site.env))["remove.drva-1"]
    assert check["status"] == "warn" and f"would leave {one} (holds requests/notes.txt, store, tls" in check["reason"]

    result = await uninstall(site.cfg, False, site.env)
    assert {name: (one / name).read_bytes() for name in theirs} == theirs
    assert sorted(p.name for p in one.iterdir()) == ["requests", "store", "tls"]
    assert [p.name for p in (one / "requests").iterdir()] == ["notes.txt"]
    left = {e["path"]: e["why"] for e in result["left_alone"]}
    assert left[str(one)].startswith("holds requests/notes.txt, store, tls, which the DRVA did not write: kept")
    assert left == {str(one): check["details"]["left_alone"][-1]["why"]}  # preflight said it word for word
    removed = {e["path"]: e["what"] for e in result["removed"] if "path" in e}
    assert removed[str(one)] == "status and requests of DRVA drva-1 (4 entries)"
    assert removed[str(two)] == "state directory of DRVA drva-2" and not two.exists()


async def test_a_site_ca_an_older_site_file_put_in_a_drva_state_dir_is_kept(tmp_path: Path) -> None:
    """The audit's case, from a site file loaded before the refusal (an older cdp's):
    the TLS directory inside drva-1's state directory survives uninstall, as it says."""
    site = make_site(tmp_path / "site", install=False, tls={"mode": "on"})
    tls_dir = site.cfg.drva_state_dir(site.cfg.drvas[0]) / "tls"
    cfg = dataclasses.replace(site.cfg, tls=TlsSpec(tls_dir, site.cfg.tls.server_names))
    await install(cfg, site.env)
    ca_key = cfg.tls.files.ca_key
    before = ca_key.read_bytes()
    result = await uninstall(cfg, False, site.env)
    assert result["kept"]["tls"] == str(tls_dir) and ca_key.read_bytes() == before
    assert any(e["path"] == str(tls_dir.parent) and "holds tls" in e["why"] for e in result["left_alone"])


# --------------------------------------------------------------------------- what a killed daemon left running


FAKE_CHILD = "import sys, time\nprint('running', sys.argv, flush=True)\ntime.sleep(%d)\n" % SLEEP_S


def fake_child(tmp_path: Path, module: str, *args: str) -> subprocess.Popen:
    """A process running ``python -m <module> <args>`` as the daemon runs its children,
    its own session, its module a sleeper (``drva.daemon`` would serve)."""
    code = tmp_path / "fake"
    package, _, name = module.partition(".")
    (code / package).mkdir(parents=True, exist_ok=True)
    (code / package / "__init__.py").touch()
    (code / package / f"{name or '__main__'}.py").write_text(FAKE_CHILD)
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=code, start_new_session=True,
                            stdout=subprocess.PIPE, text=True)


def exit_code(proc: subprocess.Popen) -> int | None:
    """How ``proc`` ended (uninstall waited for it), None if it still runs."""
    try:
        return proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
        return None


def wait_running(proc: subprocess.Popen) -> None:
    assert proc.stdout is not None and proc.stdout.readline().startswith("running"), proc.poll()


@pytest.fixture
def children() -> Any:
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def site_with_logs(tmp_path: Path) -> tuple[Site, Path]:
    site = make_site(tmp_path / "site", install=False)
    logs = site.cfg.state_dir / "logs"
    return site, logs


async def test_uninstall_stops_the_children_a_killed_daemon_left_running(tmp_path: Path, children: list) -> None:
    site, logs = site_with_logs(tmp_path)
    await install(site.cfg, site.env)
    state = site.cfg.state_dir
    logs.mkdir(mode=0o755)
    drva1 = fake_child(tmp_path, "drva.daemon", "--config", str(state / "drvas" / "drva-1.toml"))
    drva2 = fake_child(tmp_path, "drva.daemon", "--config", str(state / "drvas" / "drva-2.toml"))
    host = fake_child(tmp_path, "iofilter_sim", "run", str(state / "hypervisor" / "esx-01.toml"), "--status", "x")
    innocent = subprocess.Popen(["sleep", str(SLEEP_S)])
    children += [drva1, drva2, host, innocent]
    for proc in (drva1, drva2, host):
        wait_running(proc)
    write_pid_file(logs / "drva-1.pid", drva1.pid)  # drva-2 and the host: killed before their pid file
    (logs / "standby-erp.pid").write_text(f"{innocent.pid} {start_ticks(innocent.pid) + 1}\n")  # pid reused
    os.mkfifo(logs / "host-esx-02.pid")  # no pid file we wrote: never waited on, never acted on

    result = await uninstall(site.cfg, False, site.env)
    assert [exit_code(drva1), exit_code(drva2), exit_code(host)] == [-15, -15, -15]  # SIGTERM: orderly first
    assert innocent.poll() is None
    stopped = {one["pid"]: one["found"] for one in result["daemon"]["leftovers"]}
    assert stopped[drva1.pid] == f"named by {logs / 'drva-1.pid'}"
    assert stopped[drva2.pid].startswith(f"running {sys.executable} -m drva.daemon --config ")
    assert stopped[host.pid].startswith(f"running {sys.executable} -m iofilter_sim run ")
    assert len(stopped) == 3 and "stopped 3 processes it had left running" in result["daemon"]["note"]
    assert not site.cfg.drvas[0].log_path.exists()


async def test_a_leftover_that_survives_stops_uninstall_before_anything_is_removed(tmp_path: Path,
                                                                                   children: list) -> None:
    site, logs = site_with_logs(tmp_path)
    await install(site.cfg, site.env)
    logs.mkdir(mode=0o755)
    drva1 = fake_child(tmp_path, "drva.daemon", "--config", str(site.cfg.state_dir / "drvas" / "drva-1.toml"))
    children.append(drva1)
    wait_running(drva1)
    write_pid_file(logs / "drva-1.pid", drva1.pid)
    real = processes.same_process
    with mock.patch.object(processes, "same_process", lambda pid, ticks: pid == drva1.pid or real(pid, ticks)):
        with pytest.raises(Busy) as err:  # as a process stuck in the kernel would: SIGKILL does not end it
            await uninstall(site.cfg, False, site.env, child_stop_timeout_s=0.1)
    assert f"process {drva1.pid} (named by {logs / 'drva-1.pid'}) outlived SIGKILL" in err.value.message
    assert "uninstall removed nothing" in err.value.message
    for path in (site.cfg.drvas[0].log_path, site.cfg.drvas[0].meta_path, install_record_path(site.cfg.state_dir),
                 site.cfg.state_dir / "drvas" / "drva-1.toml"):
        assert path.exists(), path


async def test_pid_files_in_a_logs_dir_others_may_write_are_never_read(tmp_path: Path, children: list) -> None:
    site, logs = site_with_logs(tmp_path)
    await install(site.cfg, site.env)
    logs.mkdir()
    logs.chmod(0o777)  # an older daemon's, under umask 000: anyone could plant a pid file
    innocent = subprocess.Popen(["sleep", str(SLEEP_S)])
    children.append(innocent)
    write_pid_file(logs / "drva-1.pid", innocent.pid)  # names it with its right start time
    with pytest.raises(ConfigError) as err:
        await uninstall(site.cfg, False, site.env)
    assert f"({logs}): {logs} may be written by other users (mode 0777)" in err.value.message
    assert innocent.poll() is None and site.cfg.drvas[0].log_path.exists()
    check = by_name(await preflight_uninstall(site.cfg, site.env))["daemon"]
    assert check["status"] == "fail" and "mode 0777" in check["reason"]
