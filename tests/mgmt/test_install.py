"""Install and uninstall (cdp/msa/install.py), the deployment record (cdp/msa/deployment.py)
and the site verbs of the ``cdp`` command (cdp/cli/site_verbs.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest

from cdp.catalog import CatalogWriter
from cdp.catalog_state import CatalogState
from cdp.errors import Busy, ChecksumMismatch, ConfigError, FormatError, LogError, MetaError
from cdp.meta import MetaRepository
from cdp.msa.config import load_site_config
from cdp.msa.deployment import (
    Deployment, decode_deployment, deployment_key, encode_deployment, read_deployment,
)
from cdp.msa.install import install, uninstall
from cdp.msa.jobs import JobStore
from cdp.msa.keeper import start_ticks, write_pid_file
from cdp.msa.protection import load_protection, save_protection
from cdp.replog import ReplicationLog
from cdp.store import FileStore, open_store
from cdp.testing import domain as testing_domain
from cdp.testing.domain import DomainBuilder
from cdp.testing.site import Site, make_site
from drva.config import load_drva_config
from tests.conftest import unique_name
from tests.rocva.build import seed_initial

ROOT = Path(__file__).resolve().parents[2]
# A verb as a process (preflight, install, uninstall): seconds; bounds a hang.
CLI_EXIT_S = 120.0
# A process already stopped or signalled is reaped at once.
REAP_S = 5.0
# How long uninstall waits for a daemon that ignores SIGTERM: the error is the point.
STUBBORN_STOP_S = 0.5

FAKE_DAEMON = """\
import signal, sys, time
if sys.argv[1] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path / "site", protect=("erp", "files"), log_size="8MiB", install=False)


def store_of(site: Site) -> FileStore:
    return FileStore(site.root / "store")


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` but job records: path -> sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "jobs" not in p.parts}


async def keys(store: Any, prefix: str = "") -> list[str]:
    return [i.key async for i in store.list(prefix)]


# --------------------------------------------------------------------------- the record


def test_the_deployment_record_round_trips_and_is_checked() -> None:
    dep = Deployment("site-a", 1_700_000_000_000_000_000, "0.1.0",
                     (("drva-1", "127.0.0.1:32873"), ("drva-2", "127.0.0.1:32874")), "127.0.0.1:32880")
    data = encode_deployment(dep)
    assert data[:4] == b"CDPD" and int.from_bytes(data[4:6], "little") == 1
    assert int.from_bytes(data[12:16], "little") == len(data) - 64
    assert json.loads(data[64:]) == dep.body() and b" " not in data[64:]
    key = deployment_key("site-a")
    assert key == "sites/site-a/deployment.cdpd"
    assert decode_deployment(key, data) == dep
    with pytest.raises(FormatError, match="body.site 'site-a', expected 'site-b'"):
        decode_deployment(deployment_key("site-b"), data)
    flipped = bytearray(data)
    flipped[70] ^= 1
    with pytest.raises(ChecksumMismatch, match="body_xxh3"):
        decode_deployment(key, flipped)
    with pytest.raises(FormatError, match="magic"):
        decode_deployment(key, b"XXXX" + data[4:])
    with pytest.raises(FormatError, match="promises"):
        decode_deployment(key, data + b"\n")


# --------------------------------------------------------------------------- install


async def test_install_twice_is_the_same_result(site: Site) -> None:
    first = await install(site.cfg, site.env)
    assert first["deployment"]["action"] == "written"
    assert [(d["log"]["action"], d["meta"]["action"], d["config"]["action"]) for d in first["drvas"]] == \
        [("formatted", "formatted", "written")] * 2
    assert first["protection"] == {"path": str(site.root / "state" / "protection.json"),
                                   "domains": ["erp", "files"], "action": "written"}
    state = snapshot(site.root / "state")
    record = await store_of(site).get(deployment_key("site-t"))

    second = await install(site.cfg, site.env)
    assert second["deployment"]["action"] == "kept"
    assert [(d["log"]["action"], d["meta"]["action"], d["config"]["action"]) for d in second["drvas"]] == \
        [("kept", "kept", "kept")] * 2
    assert second["protection"]["action"] == "kept"
    assert snapshot(site.root / "state") == state
    assert await store_of(site).get(deployment_key("site-t")) == record
    assert await keys(store_of(site)) == [deployment_key("site-t")]


async def test_install_formats_partitions_and_writes_loadable_drva_configs(site: Site) -> None:
    await install(site.cfg, site.env)
    for drva in site.cfg.drvas:
        with ReplicationLog.open(drva.log_path, readonly=True) as lg:
            assert lg.label == f"{drva.name}@site-t" and lg.stats().used_bytes == 0
        assert drva.log_path.stat().st_size == 8 << 20
        MetaRepository.open(drva.meta_path).close()
        conf = load_drva_config(site.cfg.state_dir / "drvas" / f"{drva.name}.toml", site.env)
        assert (conf.name, conf.host, conf.port) == (drva.name, drva.listen.host, drva.listen.port)
        assert conf.log_path == drva.log_path and conf.meta_path == drva.meta_path
        assert conf.store_url == site.cfg.store_url
        assert conf.seal_bytes == 1 << 20 and conf.seal_age_s == 0.2
        assert (site.cfg.state_dir / "drvas" / drva.name).is_dir()
    erp = load_drva_config(site.cfg.state_dir / "drvas" / "drva-1.toml", site.env)
    assert [(d.id, d.name, [x.name for x in d.disks]) for d in erp.domains] == [(1, "erp", ["data", "log"])]
    files = load_drva_config(site.cfg.state_dir / "drvas" / "drva-2.toml", site.env)
    assert [d.name for d in files.domains] == ["files"]
    assert list(load_protection(site.cfg)) == ["erp", "files"]
    assert load_protection(site.cfg)["erp"].rpo_target_s == 30
    record = await read_deployment(store_of(site), "site-t")
    assert record is not None and record.site == "site-t" and record.engine_version
    assert record.drvas == tuple((d.name, str(d.listen)) for d in site.cfg.drvas)
    assert record.api == str(site.cfg.api_listen)
    # No secret anywhere install wrote.
    written = b"".join((site.root / "state").joinpath(p).read_bytes() for p in snapshot(site.root / "state"))
    assert site.env["CDP_SITE_SECRET"].encode() not in written + await store_of(site).get(deployment_key("site-t"))
    assert site.env["CDP_API_TOKEN"].encode() not in written


async def test_install_keeps_the_daemons_protection_state(site: Site) -> None:
    await install(site.cfg, site.env)
    save_protection(site.cfg, {"web": site.cfg.defaults})  # what cdp protect / unprotect leave
    result = await install(site.cfg, site.env)
    assert result["protection"] == {"path": str(site.root / "state" / "protection.json"), "domains": ["web"],
                                    "action": "kept"}
    conf = load_drva_config(site.cfg.state_dir / "drvas" / "drva-1.toml", site.env)
    assert [d.name for d in conf.domains] == ["web"]
    assert load_drva_config(site.cfg.state_dir / "drvas" / "drva-2.toml", site.env).domains == ()


async def test_install_refuses_what_it_did_not_format(site: Site) -> None:
    log_path = site.cfg.drva("drva-2").log_path
    log_path.parent.mkdir(parents=True)
    log_path.write_bytes(b"precious " * 1000)
    with pytest.raises(LogError) as err:
        await install(site.cfg, site.env)
    assert str(log_path) in err.value.message and "drvas[1].log.path" in err.value.message
    assert log_path.read_bytes() == b"precious " * 1000
    assert await read_deployment(store_of(site), "site-t") is None  # no record: not installed
    log_path.unlink()
    ReplicationLog.format(log_path, 8 << 20, label="drva-1")  # another DRVA's partition
    with pytest.raises(LogError, match="the log partition of 'drva-1', not of DRVA 'drva-2'"):
        await install(site.cfg, site.env)
    log_path.unlink()
    meta = site.cfg.drva("drva-2").meta_path
    meta.write_bytes(b"x" * 10000)
    with pytest.raises(MetaError, match=f"{meta}.*not a metadata repository"):
        await install(site.cfg, site.env)
    meta.write_bytes(bytes(3 << 20))  # blank (zeros where the slots go): formatted
    await install(site.cfg, site.env)
    MetaRepository.open(meta).close()


async def test_install_refuses_another_sites_domain_ids_and_missing_secrets(site: Site) -> None:
    env = {k: v for k, v in site.env.items() if k != "CDP_SITE_SECRET"}
    with pytest.raises(ConfigError, match="CDP_SITE_SECRET") as err:
        await install(site.cfg, env)
    assert not (site.root / "state").exists()
    # Another site's domain under one of this site's domain ids: refused, nothing made.
    other = Deployment("site-o", time.time_ns(), "0.1.0", (), "127.0.0.1:1")
    await store_of(site).put(deployment_key("site-o"), encode_deployment(other))
    foreign = CatalogWriter(store_of(site), CatalogState.new(3, "shop", 1, "site-o"), by="test")
    await foreign.commit({"disks": []})
    with pytest.raises(ConfigError, match="files .id 3: domain 'shop' of site 'site-o'") as err:
        await install(site.cfg, site.env)
    assert err.value.exit_code == 2
    assert not (site.root / "state").exists()
    # Sharing the store with another site is fine (a recovery site shares its protected site's).
    for key in sorted([i.key async for i in store_of(site).list("d/")]):
        await store_of(site).delete(key)
    await install(site.cfg, site.env)


async def test_install_creates_a_missing_bucket(site: Site, moto_server: str) -> None:
    bucket = unique_name()
    text = site.config_path.read_text().replace('store = "store"',
                                                f'store = "s3://{bucket}/cdp?endpoint={moto_server}"')
    site.config_path.write_text(text)
    cfg = load_site_config(site.config_path)
    env = {**site.env, "AWS_ACCESS_KEY_ID": "test-access-key", "AWS_SECRET_ACCESS_KEY": "test-secret-key"}
    await install(cfg, env)
    await install(cfg, env)
    async with open_store(cfg.store_url, env=env) as store:
        assert await keys(store) == ["sites/site-t/deployment.cdpd"]
    conf = load_drva_config(cfg.state_dir / "drvas" / "drva-1.toml", site.env)
    assert conf.store_url == cfg.store_url
    result = await uninstall(cfg, False, env)
    assert result["removed"][-1] == {"key": "sites/site-t/deployment.cdpd", "what": "deployment record"}
    async with open_store(cfg.store_url, env=env) as store:
        assert await keys(store) == []


# --------------------------------------------------------------------------- uninstall


async def build_domain(store: Any, domain_id: int, seed: int, owner: str = "site-t") -> DomainBuilder:
    """A domain with a seeded base (chunks, manifests) and a few segments, its timeline
    ``owner``'s (the test site's, unless another site's domain is wanted)."""
    with mock.patch.object(testing_domain, "SITE", owner):  # the builder's timelines' owner
        b = await DomainBuilder(store, domain=domain_id, disks=(("vm", "disk0", 256 << 10),)).start()
    rng = np.random.default_rng(seed)
    await seed_initial(b, 0, rng)
    for i in range(3):
        b.write(0, i * 8192, rng.bytes(8192))
        await b.seal()
    return b


async def test_uninstall_keeps_store_data_and_is_idempotent(site: Site) -> None:
    await install(site.cfg, site.env)
    store = store_of(site)
    erp = await build_domain(store, 1, seed=1)
    before = await keys(store, "d/") + await keys(store, "c/")
    assert erp.chunk_keys and erp.segment_keys
    result = await uninstall(site.cfg, False, site.env)
    assert result["purge"] is False and result["purged"] is None
    removed = {e.get("path") or e.get("key") for e in result["removed"]}
    state = site.cfg.state_dir
    assert {str(d.log_path) for d in site.cfg.drvas} <= removed
    assert {str(d.meta_path) for d in site.cfg.drvas} <= removed
    assert {str(state / "drvas" / "drva-1.toml"), str(state / "protection.json"), deployment_key("site-t")} <= removed
    kept = {u["domain"]: u for u in result["kept"]["domains"]}
    assert kept["erp"]["objects"] == len(await keys(store, "d/00000001/")) > 0
    assert kept["web"]["objects"] == 0
    assert await keys(store, "d/") + await keys(store, "c/") == before
    assert await read_deployment(store, "site-t") is None
    # Only the job history stays in the state directory.
    assert sorted(p.name for p in state.iterdir()) == []  # no job ran here: the library call
    again = await uninstall(site.cfg, False, site.env)
    assert again["removed"] == [] and again["left_alone"] == []
    assert await keys(store, "d/") + await keys(store, "c/") == before


async def test_uninstall_leaves_what_is_not_ours(site: Site) -> None:
    await install(site.cfg, site.env)
    meta = site.cfg.drva("drva-1").meta_path
    meta.unlink()
    meta.write_bytes(b"someone else's " * 100)
    result = await uninstall(site.cfg, False, site.env)
    [left] = result["left_alone"]
    assert left["path"] == str(meta) and "not a metadata repository" in left["why"]
    assert str(meta) not in {e.get("path") for e in result["removed"]}
    assert meta.read_bytes() == b"someone else's " * 100


async def test_purge_deletes_the_sites_objects_and_unreferenced_chunks(site: Site) -> None:
    await install(site.cfg, site.env)
    store = store_of(site)
    erp = await build_domain(store, 1, seed=1)
    files = await build_domain(store, 3, seed=3)
    foreign = await build_domain(store, 99, seed=99)  # not in the cluster file: not the site's
    foreign_keys = await keys(store, "d/00000063/")
    result = await uninstall(site.cfg, True, site.env)
    purged = {u["domain"]: u for u in result["purged"]["domains"]}
    assert purged["erp"]["deleted"] > 0 and purged["files"]["deleted"] > 0 and purged["web"]["deleted"] == 0
    assert await keys(store, "d/00000001/") == [] and await keys(store, "d/00000003/") == []
    assert await keys(store, "d/00000063/") == foreign_keys
    chunks = set(await keys(store, "c/"))
    assert chunks == foreign.chunk_keys
    assert not (erp.chunk_keys | files.chunk_keys) & chunks
    sweep = result["purged"]["chunk_sweep"]
    assert sweep["chunks_deleted"] == len(erp.chunk_keys | files.chunk_keys)
    assert await keys(store, "l/") == []  # the locks it took are gone
    assert await keys(store, "sites/") == []
    assert result["kept"]["domains"] == []


async def test_purge_keeps_a_domain_a_failover_registered_here(site: Site) -> None:
    """Domain crm failed over to this site (registered in its state directory): its
    objects are also the peer's history, which a failback reads. ``--purge`` deletes
    this site's own domains and leaves crm's every object (and chunk), saying why."""
    from cdp import site_files
    from cdp.msa import registry
    from cdp.msa.preflight import check_kept_data

    doc = registry.with_domain(registry.empty(site.cfg.site),
                               site_files.domain("crm", 7, str(site.cfg.drvas[0].listen), ["crm-1"]),
                               [site_files.vm("crm-1", "esx-01", [("disk0", "1MiB", "crm/crm-1-disk0.img")])], [])
    registry.save_registry(site.cfg.state_dir, doc)
    cfg = load_site_config(site.config_path)
    assert "crm" in {d.name for d in cfg.cluster.domains} and "crm" not in cfg.own_domains
    await install(cfg, site.env)
    store = store_of(site)
    erp = await build_domain(store, 1, seed=1)
    crm = await build_domain(store, 7, seed=7)
    crm_keys = await keys(store, "d/00000007/")
    checks = {c.name: c for c in await check_kept_data(cfg, store)}
    assert "kept, even with --purge" in checks["keep.crm"].reason
    result = await uninstall(cfg, True, site.env)
    assert {u["domain"] for u in result["purged"]["domains"]} == {"erp", "web", "files"}
    assert await keys(store, "d/00000001/") == [] and await keys(store, "d/00000007/") == crm_keys
    assert crm.chunk_keys <= set(await keys(store, "c/")) and not erp.chunk_keys & set(await keys(store, "c/"))
    [kept] = result["kept"]["registered"]
    assert kept["domain"] == "crm" and "registered by a failover" in kept["why"]


async def test_uninstall_stops_the_daemon(site: Site, tmp_path: Path) -> None:
    await install(site.cfg, site.env)
    script = tmp_path / "cdp-fake-daemon.py"  # "cdp" in its command line, like the real one
    script.write_text(FAKE_DAEMON)
    daemon = subprocess.Popen([sys.executable, str(script), "polite"], stdout=subprocess.PIPE)
    try:
        assert daemon.stdout is not None and daemon.stdout.readline() == b"ready\n"
        write_pid_file(site.cfg.state_dir / "msa.pid", daemon.pid)  # as the daemon does: pid and start time
        from cdp.msa.preflight import preflight_uninstall

        check = {c["name"]: c for c in (await preflight_uninstall(site.cfg, site.env))["checks"]}["daemon"]
        assert check["status"] == "warn" and str(daemon.pid) in check["reason"]
        result = await uninstall(site.cfg, False, site.env)
        assert result["daemon"]["pid"] == daemon.pid and "stopped" in result["daemon"]["note"]
        assert daemon.wait(REAP_S) == -15  # SIGTERM
        assert not (site.cfg.state_dir / "msa.pid").exists()  # the fake leaves it: removed as stale
    finally:
        daemon.kill()
        daemon.wait()


async def test_a_daemon_that_does_not_stop_is_a_clear_error(site: Site, tmp_path: Path) -> None:
    await install(site.cfg, site.env)
    script = tmp_path / "cdp-fake-daemon.py"
    script.write_text(FAKE_DAEMON)
    daemon = subprocess.Popen([sys.executable, str(script), "stubborn"], stdout=subprocess.PIPE)
    try:
        assert daemon.stdout is not None and daemon.stdout.readline() == b"ready\n"
        write_pid_file(site.cfg.state_dir / "msa.pid", daemon.pid)  # as the daemon does: pid and start time
        with pytest.raises(Busy, match=f"process {daemon.pid}.*did not exit within {STUBBORN_STOP_S:g} s") as err:
            await uninstall(site.cfg, False, site.env, stop_timeout_s=STUBBORN_STOP_S)
        assert err.value.exit_code == 7
        assert daemon.poll() is None
        assert site.cfg.drva("drva-1").log_path.exists()  # nothing removed under a live daemon
    finally:
        daemon.kill()
        daemon.wait()


async def test_a_stale_pid_file_naming_another_process_is_not_signalled(site: Site) -> None:
    await install(site.cfg, site.env)
    other = subprocess.Popen(["sleep", "30"])
    try:
        # Its pid, another start time: the daemon that wrote it is gone and the pid reused.
        (site.cfg.state_dir / "msa.pid").write_text(f"{other.pid} {start_ticks(other.pid) + 1}\n")
        result = await uninstall(site.cfg, False, site.env)
        assert result["daemon"]["running"] is False and "stale pid file" in result["daemon"]["note"]
        assert "started at another time" in result["daemon"]["note"]
        assert other.poll() is None
        assert {"path": str(site.cfg.state_dir / "msa.pid"), "what": "stale daemon pid file"} in result["removed"]
    finally:
        other.kill()
        other.wait()


# --------------------------------------------------------------------------- the command


def cdp(site: Site, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdp.cli", *args, "--config", str(site.config_path)],
                          cwd=ROOT, env=env or site.env, capture_output=True, text=True, timeout=CLI_EXIT_S)


def test_the_site_verbs_with_json_and_exit_codes(site: Site) -> None:
    run = cdp(site, "preflight", "system", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["kind"] == "system" and out["ok"] and out["job"]["state"] == "succeeded"
    job_id = out["job"]["id"]
    record = JobStore(site.cfg.state_dir / "jobs").get(job_id)
    assert record["name"] == "preflight-system" and record["output"]["ok"]

    run = cdp(site, "install", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["deployment"]["action"] == "written" and out["job"]["name"] == "install"
    run = cdp(site, "install")
    assert run.returncode == 0 and "deployment record sites/site-t/deployment.cdpd: kept" in run.stdout
    assert run.stdout.strip().splitlines()[-1].endswith(": succeeded") and "job " in run.stderr

    run = cdp(site, "preflight", "uninstall")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert all(line.split(" ", 1)[0] in ("PASS", "WARN", "FAIL") for line in lines[:-2])
    assert lines[-2].startswith("preflight uninstall: ok") and lines[-1].startswith("job ")

    erp = asyncio.run(build_domain(store_of(site), 1, seed=5))
    run = cdp(site, "uninstall", "--purge")
    assert run.returncode == 2 and "--yes" in run.stderr
    assert site.cfg.drva("drva-1").log_path.exists()
    run = cdp(site, "uninstall", "--purge", "--yes", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["purge"] is True and out["job"]["state"] == "succeeded"
    assert out["purged"]["chunk_sweep"]["chunks_deleted"] == len(erp.chunk_keys)
    assert not site.cfg.drva("drva-1").log_path.exists()
    assert asyncio.run(keys(store_of(site))) == []
    names = [r["name"] for r in JobStore(site.cfg.state_dir / "jobs").list()]
    # The refused --purge never became a job.
    assert sorted(names) == ["install", "install", "preflight-system", "preflight-uninstall", "uninstall"]
    assert sorted(p.name for p in site.cfg.state_dir.iterdir()) == ["jobs"]


def test_failed_checks_and_failed_jobs_set_the_exit_code(site: Site) -> None:
    listen = site.cfg.drva("drva-1").listen
    with socket.socket() as taken:
        taken.bind((listen.host, listen.port))
        taken.listen()
        run = cdp(site, "preflight", "install")
    assert run.returncode == 1
    assert f"FAIL port.drva-1: {listen}: in use" in run.stdout.splitlines()
    assert "NOT ok" in run.stdout

    env = {k: v for k, v in site.env.items() if k != "CDP_API_TOKEN"}
    run = cdp(site, "preflight", "system", "--json", env=env)
    assert run.returncode == 1 and json.loads(run.stdout)["failures"] == 1

    log_path = site.cfg.drva("drva-1").log_path
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_bytes(b"not a partition")
    run = cdp(site, "install", "--json")
    assert run.returncode == 4, run.stderr  # LogError's exit code
    out = json.loads(run.stdout)
    assert out["job"]["state"] == "failed" and str(log_path) in out["job"]["error"]
    assert "cdp: error: install" in run.stderr

    site.config_path.write_text(site.config_path.read_text().replace('site = "site-t"', 'site = "bad site"'))
    run = cdp(site, "preflight", "system")
    assert run.returncode == 2 and "site: expected a name" in run.stderr
    assert site.env["CDP_SITE_SECRET"] not in run.stdout + run.stderr
