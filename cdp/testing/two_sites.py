"""Two sites over one file store (or one per direction: ``two_stores``), for the failover
tests: site A protects domain ``erp`` (VMs erp-db with two disks and erp-app with one, on
host esx-a1, writing a random workload); site B is a pilot light — host esx-b1, no VM — with one on-demand host
esx-b2 and room for one VM per host, so a failover of erp's two VMs must add it; B's
``[peer]`` is A's API (a planned failover asks A to hand the domain over).

Both sites share the secret and the API token (the tests' environment); their DRVAs
and APIs are on free ports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp import site_files
from cdp.digest import sha256_file
from cdp.msa.config import load_site_config
from cdp.testing.drva_config import SECRET, free_port
from cdp.testing.site import TOKEN, Site, install_site

DISK = "2MiB"
WORKLOAD = {"kind": "random", "rate_mb_s": 2, "write_size": "4KiB"}


def _drva(name: str, port: int, state: str) -> dict[str, Any]:
    return site_files.drva(name, f"127.0.0.1:{port}", log_path=f"{state}/{name}/replog", log_size="8MiB",
                           meta_path=f"{state}/{name}/meta", seal_bytes="1MiB", seal_age_s=0.2)


@dataclass
class TwoSites:
    a: Site
    b: Site
    store: Path  # site A's store: erp's, and with one store every domain's
    store_b: Path | None = None  # with two stores, site B's own: crm's

    def primaries_a(self, domain: str = "erp") -> list[str]:
        """sha256 of the domain's disks at site A, in the domain's disk order."""
        return [sha256(d.disk.image) for d in self.a.cfg.domain(domain).disks]

    def primaries_b(self, domain: str) -> list[str]:
        """The same for a domain site B protects (``crm``)."""
        return [sha256(d.disk.image) for d in self.b.cfg.domain(domain).disks]


sha256 = sha256_file  # the tests' name for it


def make_two_sites(root: Path, *, workload: dict[str, Any] | None = None, store_url: str | None = None,
                   install: bool = True, env: dict[str, str] | None = None, standby: bool = False,
                   disk: str = DISK, web: bool = False, crm: bool = False, two_stores: bool = False) -> TwoSites:
    """``store_url``: default a file store under ``root``; ``install``: what the daemon
    needs of ``cdp install`` (else the test runs it); ``env``: added to the sites';
    ``web``: a second protected domain at A, ``web`` (id 2, VM web-1 with one disk), and
    room for it at B (two VMs per host); ``crm``: protection both ways — site B protects
    its own domain ``crm`` (id 3, VM crm-1 with one disk on esx-b1, B's DRVA) with A as
    its recovery site (A gets an on-demand host), and B has room for erp beside it;
    ``two_stores``: one file store per direction — A's domains in ``root/store``, B's in
    ``root/store-b``, each site naming the other's as ``[peer] store``."""
    assert not (two_stores and store_url), "two_stores: two file stores under root"
    store = root / "store"
    store_b = root / "store-b" if two_stores else None
    a_peer_store = {"store": str(store_b)} if store_b else {}
    b_peer_store = {"store": str(store)} if store_b else {}
    pa, pb, api_a, api_b = free_port(), free_port(), free_port(), free_port()
    a_inventory = site_files.inventory(
        "site-a", ["esx-a1"],
        [site_files.vm("erp-db", "esx-a1", [("data", disk), ("log", disk)]),
         site_files.vm("erp-app", "esx-a1", [("disk0", disk)])],
        [site_files.domain("erp", 1, f"127.0.0.1:{pa}", ["erp-db", "erp-app"], workload or WORKLOAD)],
        state_dir="datastore")
    if web:
        a_inventory["vms"].append(site_files.vm("web-1", "esx-a1", [("disk0", disk)]))
        a_inventory["domains"].append(site_files.domain("web", 2, f"127.0.0.1:{pa}", ["web-1"], workload or WORKLOAD))
    a_doc = site_files.site("site-a", drvas=[_drva("drva-a1", pa, "state")], protect=["erp", "web"] if web else ["erp"],
                            store=store_url or str(store),
                            api_listen=f"127.0.0.1:{api_a}", cluster="inventory.toml",
                            peer={"site": "site-b", "api": f"127.0.0.1:{api_b}", "token_env": "CDP_PEER_TOKEN",
                                  **a_peer_store})
    if crm:
        a_doc["hypervisor"] = {"on_demand_hosts": ["esx-a2"], "vms_per_host": 2, "recovered_workload": WORKLOAD}
    b_inventory = site_files.inventory(
        "site-b", ["esx-b1"], [site_files.vm("crm-1", "esx-b1", [("disk0", disk)])] if crm else [],
        [site_files.domain("crm", 3, f"127.0.0.1:{pb}", ["crm-1"], workload or WORKLOAD)] if crm else [],
        state_dir="datastore")
    b_doc = site_files.site("site-b", drvas=[_drva("drva-b1", pb, "state")], store=store_url or str(store_b or store),
                            protect=["crm"] if crm else (),
                            api_listen=f"127.0.0.1:{api_b}", cluster="inventory.toml",
                            hypervisor={"on_demand_hosts": ["esx-b2"], "vms_per_host": 2 if web or crm else 1,
                                        "recovered_workload": WORKLOAD},
                            peer={"site": "site-a", "api": f"127.0.0.1:{api_a}", "token_env": "CDP_PEER_TOKEN",
                                  **b_peer_store},
                            standby=[{"domain": "erp", "mode": "continuous", "interval_s": 0.2}] if standby else ())
    env = {**os.environ, "CDP_SITE_SECRET": SECRET, "CDP_API_TOKEN": TOKEN, "CDP_PEER_TOKEN": TOKEN, **(env or {})}
    sites = []
    for name, doc, inventory in (("a", a_doc, a_inventory), ("b", b_doc, b_inventory)):
        path = site_files.write_site(root / name, doc, inventory)
        cfg = load_site_config(path)
        if install:
            install_site(cfg)
        sites.append(Site(root / name, path, cfg, env))
    return TwoSites(sites[0], sites[1], store, store_b)


def reload(site: Site) -> Site:
    return Site(site.root, site.config_path, load_site_config(site.config_path), site.env)


def drva_domain(daemon: Any, name: str) -> dict[str, Any] | None:
    for v in daemon.supervisor.views():
        for d in (v.status or {}).get("domains", []):
            if d.get("name") == name:
                return d
    return None


def committed(daemon: Any, name: str) -> int:
    return int((drva_domain(daemon, name) or {}).get("committed_seq") or 0)
