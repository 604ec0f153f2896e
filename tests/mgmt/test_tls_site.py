"""A site with ``[tls] mode = "on"`` (FORMAT.md §20): ``cdp install`` makes the site CA
and the servers' certificates (permissions, names, renewal), the DRVAs serve them to the
filters the simulator driver runs, and the REST API serves HTTPS only — to clients that
trust the site CA, with the token still required."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cdp import site_files
from cdp.digest import sha256_file
from cdp.errors import CdpError, ConfigError
from cdp.msa.client import MsaClient
from cdp.msa.config import load_site_config
from cdp.msa.install import install
from cdp.msa.preflight import check_tls
from cdp.pki import LEAF_VALID_S, RENEW_BEFORE_S, TlsFiles, cert_names, ensure_site_pki, read_cert
from cdp.store.fs import FileStore
from cdp.testing.site import TOKEN, Site, inventory_doc, running_daemon, site_doc
from cdp.tls import client_context
from drva.config import load_drva_config
from rocva import RecoverOptions, recover
from rocva.target import Target
from tests.drva.harness import SECRET, free_port
from tests.drva.test_crash import wait_until_committed
from tests.waiting import EVENTUALLY_S, wait_until

ROOT = Path(__file__).resolve().parents[2]
CLI_S = 60.0


def tls_site(root: Path, tls: dict[str, Any], *, workload: bool = False) -> Site:
    """The fixture's site with ``[tls]``; ``workload``: erp's VMs write (the simulator driver)."""
    p1, p2, api = free_port(), free_port(), free_port()
    inventory = inventory_doc(p1, p2)
    if workload:
        inventory["domains"][0]["workload"] = {"kind": "random", "rate_mb_s": 2}
    doc = site_doc(p1, p2, api, log_size="8MiB", protect=("erp",), recovery_roots=[str(root.parent)], tls=tls)
    path = site_files.write_site(root, doc, inventory)
    return Site(root, path, load_site_config(path), {**os.environ, "CDP_SITE_SECRET": SECRET, "CDP_API_TOKEN": TOKEN})


def cdp(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdp.cli", *args, "--config", str(site.config_path)],
                          cwd=ROOT, env=site.env, capture_output=True, text=True, timeout=CLI_S)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_install_with_tls_makes_the_site_ca_and_certificates(tmp_path: Path) -> None:
    site = tls_site(tmp_path / "site", {"mode": "on", "server_names": ["dr-a.example.net"]})
    planned = check_tls(site.cfg)[0]  # cdp preflight install's view
    assert planned.status == "pass" and planned.details["ca"] == "create", planned
    assert set(planned.details["certs"].values()) == {"create"}
    r = cdp(site, "install", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.splitlines()[-1])
    tls = site.cfg.tls
    assert tls is not None and tls.dir == site.cfg.state_dir / "tls"  # the default place
    files = tls.files
    out = report.get("output", report)["tls"]
    assert out["ca"]["action"] == "created" and {c["action"] for c in out["certs"]} == {"created"}
    assert "PRIVATE KEY" not in r.stdout + r.stderr
    # Permissions: the directory and every key are the owner's only.
    assert mode(files.dir) == 0o700 and mode(files.ca_key) == 0o600 and mode(files.ca_cert) == 0o644
    ca = read_cert(files.ca_cert)
    for drva in site.cfg.drvas:
        stem = f"drva-{drva.name}"
        assert mode(files.key(stem)) == 0o600 and mode(files.cert(stem)) == 0o644
        cert = read_cert(files.cert(stem))
        cert.verify_directly_issued_by(ca)
        assert set(cert_names(cert)) == {"127.0.0.1", "localhost", "dr-a.example.net", drva.name}
        # The DRVA's configuration names them, and the DRVA's own reader loads them.
        conf = site.cfg.state_dir / "drvas" / f"{drva.name}.toml"
        doc = tomllib.loads(conf.read_text())
        assert doc["tls"] == {"cert": str(files.cert(stem)), "key": str(files.key(stem))}
        assert load_drva_config(conf, site.env).tls_cert == files.cert(stem)
    api = read_cert(tls.api_cert)
    api.verify_directly_issued_by(ca)
    assert set(cert_names(api)) == {"127.0.0.1", "localhost", "dr-a.example.net"} and mode(tls.api_key) == 0o600

    # A rerun keeps every file ...
    before = {p.name: p.read_bytes() for p in files.dir.iterdir()}
    again = (await install(site.cfg, site.env))["tls"]
    assert again["ca"]["action"] == "kept" and {c["action"] for c in again["certs"]} == {"kept"}
    assert {p.name: p.read_bytes() for p in files.dir.iterdir()} == before
    assert "every certificate kept" in check_tls(site.cfg)[0].reason
    # ... renews those whose names changed ...
    text = site.config_path.read_text().replace("dr-a.example.net", "dr-b.example.net")
    site.config_path.write_text(text)
    cfg = load_site_config(site.config_path)
    renamed = (await install(cfg, site.env))["tls"]
    assert all(c["action"].startswith("renewed (names") for c in renamed["certs"]), renamed
    assert "dr-b.example.net" in cert_names(read_cert(tls.api_cert))
    assert files.ca_cert.read_bytes() == before["ca.pem"]  # the CA stays
    # ... and those near their expiry, a month before it.
    import datetime as dt

    leaves = [cfg.tls.drva_leaf(d) for d in cfg.drvas] + [cfg.tls.api_leaf(cfg.api_listen)]
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=LEAF_VALID_S - RENEW_BEFORE_S + 86400)
    aged = ensure_site_pki(files, cfg.site, leaves, clock=lambda: later)
    assert aged["ca"]["action"] == "kept" and all(c["action"].startswith("renewed (expires") for c in aged["certs"])

    # The CA key may live offline: a rerun with nothing to sign does not need it; one
    # that must sign says which file is missing.
    files.ca_key.rename(tmp_path / "ca.key.offline")
    assert {c["action"] for c in (await install(cfg, site.env))["tls"]["certs"]} == {"kept"}
    files.cert("api").unlink()
    refused = check_tls(cfg)[0]
    assert refused.status == "fail" and f"{files.ca_key} is missing and install must sign" in refused.reason
    with pytest.raises(ConfigError, match=f"{files.ca_key}: missing, and the certificate {files.cert('api')}"):
        await install(cfg, site.env)


async def test_a_tls_site_protects_end_to_end_and_serves_https_only(tmp_path: Path) -> None:
    site = tls_site(tmp_path / "site", {"mode": "on"}, workload=True)
    await install(site.cfg, site.env)
    other = TlsFiles(tmp_path / "other-ca")
    ensure_site_pki(other, "site-z", [])
    from cdp.msa.http_limits import ApiLimits

    async with running_daemon(site, api_limits=ApiLimits(header_timeout_s=1.0)) as daemon:
        await daemon.power("erp", True)
        hv = daemon.hypervisor
        host_inventory = tomllib.loads((site.cfg.state_dir / "hypervisor" / "esx-01.toml").read_text())
        assert host_inventory["tls"] == {"ca": str(site.cfg.tls.ca_cert.resolve())}

        def acked() -> int:
            view = next((v for v in hv.views() if v.domain == "erp"), None)
            return int(((view.status if view else None) or {}).get("acked_seq") or 0)

        async def step_until_acked() -> bool:
            await hv.step()
            return acked() > 20

        for _ in range(int(EVENTUALLY_S / 0.05)):  # the host's filter is acked over TLS
            if await step_until_acked():
                break
            await asyncio.sleep(0.05)
        assert acked() > 20, hv.views()

        await check_api(site, daemon, other)

        await daemon.power("erp", False)  # the host drains before it stops
        last = hv.last_run("erp")
        assert last is not None and last["acked_seq"] == last["captured_seq"] > 20, last
        store = FileStore(site.cfg.store_url.removeprefix("file://"))
        await wait_until_committed(store, 1, last["acked_seq"])
    out = tmp_path / "out"
    await recover(store, 1, RecoverOptions(Target.latest(), out))
    primaries = site.cfg.cluster.state_dir
    for image in ("erp-db-data.img", "erp-db-log.img"):
        assert sha256_file(out / image) == sha256_file(primaries / image), image


async def check_api(site: Site, daemon: Any, other: TlsFiles) -> None:
    listen = site.cfg.api_listen
    assert site.api == f"https://{listen}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{site.api}/healthz", ssl=site.ssl) as resp:  # no token, as before
            assert resp.status == 200
        async with http.get(f"{site.api}/v1/status", ssl=site.ssl) as resp:  # the token is still required
            assert resp.status == 401
        async with http.get(f"{site.api}/v1/status", ssl=site.ssl, headers=site.headers) as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientError):  # plain HTTP: the TLS handshake fails, nothing answers
            async with http.get(f"http://{listen}/healthz") as resp:
                await resp.read()
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with http.get(f"{site.api}/healthz", ssl=client_context(other.ca_cert)) as resp:
                await resp.read()
    # The refused handshakes hold no connection slot once their deadline has passed.
    limited = next(iter(daemon._api.sites))
    await wait_until(lambda: limited.open == 0, EVENTUALLY_S, "the refused connections to be released")
    # cdp's client: trusts the site CA; another CA's client says what is wrong.
    async with MsaClient(site.cfg, site.env) as client:
        assert (await client.get("/v1/status"))["site"] == site.cfg.site
    foreign = dataclasses.replace(site.cfg, tls=dataclasses.replace(site.cfg.tls, dir=other.dir))
    with pytest.raises(CdpError, match=r"certificate is not signed by the CA in .*other-ca/ca.pem"):
        async with MsaClient(foreign, site.env) as client:
            await client.get("/v1/status")
    # The peer's API over HTTPS ([peer] ca): here this site plays its own peer.
    from cdp.msa.config import PeerSpec

    as_peer = dataclasses.replace(site.cfg, peer=PeerSpec("site-p", listen, "CDP_API_TOKEN", None,
                                                          site.cfg.tls.ca_cert))
    async with MsaClient.for_peer(as_peer, site.env) as client:
        assert client.base_url == f"https://{listen}"
        assert (await client.get("/v1/status"))["site"] == site.cfg.site
    # A verb of the CLI, in its own process, over HTTPS.
    r = await asyncio.to_thread(cdp, site, "status", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["site"] == site.cfg.site and doc["api"] == f"https://{listen}"  # the address a browser or curl needs


def test_the_tls_settings_are_checked_and_reach_the_hosts_inventories(tmp_path: Path) -> None:
    from cdp.hypervisor.nbd import NbdHypervisor
    from iofilter_sim.cluster import load_cluster

    with pytest.raises(ConfigError, match=r"tls.mode: expected one of off, on, got 'yes'"):
        tls_site(tmp_path / "a", {"mode": "yes"})
    with pytest.raises(ConfigError, match=r"tls.server_names\[0\]: expected a host name or an IP address"):
        tls_site(tmp_path / "b", {"mode": "on", "server_names": ["bad name"]})
    assert tls_site(tmp_path / "c", {"mode": "off"}).cfg.tls is None
    site = tls_site(tmp_path / "d", {"mode": "on", "dir": "pki"})
    assert site.cfg.tls.dir == site.root / "pki"  # relative to the site file
    # The NBD driver (as the simulator's) names the site CA in each host's inventory,
    # which iofilter-sim reads as its [tls] ca.
    hv = NbdHypervisor(site.cfg, site.env)
    hp = hv._new("esx-01", ("erp",))
    hv._write_inventory(hp)
    cluster = load_cluster(hp.inventory_path)
    assert cluster.tls_ca == site.cfg.tls.ca_cert.resolve() and cluster.tls_server_name is None
    text = hp.inventory_path.read_text().replace("[tls]", '[tls]\nserver_name = "not a name"')
    hp.inventory_path.write_text(text)
    with pytest.raises(ConfigError, match=r"tls.server_name: expected a host name or an IP address"):
        load_cluster(hp.inventory_path)


async def test_a_daemon_with_tls_on_and_no_certificates_says_which_file(tmp_path: Path) -> None:
    from cdp.testing.site import install_site

    site = tls_site(tmp_path / "site", {"mode": "on"})
    install_site(site.cfg)  # partitions and protection.json, but no TLS files
    missing = site.cfg.tls.files.cert("drva-drva-1")
    with pytest.raises(ConfigError, match=f"tls.mode is on, but {missing}: cannot read the TLS certificate"):
        async with running_daemon(site):
            pass
