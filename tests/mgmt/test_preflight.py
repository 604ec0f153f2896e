"""Preflight checks (cdp/msa/preflight.py): each passes on a good site and fails or warns
for its broken case."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from cdp.catalog import CatalogWriter
from cdp.catalog_state import CatalogState
from cdp.errors import ConfigError, PermissionDenied
from cdp.logfmt import DATA_START
from cdp.meta import MetaRepository
from cdp.msa.config import load_site_config
from cdp.msa.deployment import Deployment, deployment_key, encode_deployment
from cdp.msa.install import install
from cdp.msa.preflight import (
    SKEW_FAIL_S, SKEW_WARN_S, Check, format_checks, preflight_install, preflight_system,
    preflight_uninstall,
)
from cdp.msa.protection import save_protection
from cdp.replog import ReplicationLog
from cdp.store import FaultyStore, FileStore, MemoryStore, open_store
from cdp.testing.site import Site, make_site
from tests.conftest import unique_name

AWS_ENV = {"AWS_ACCESS_KEY_ID": "test-access-key", "AWS_SECRET_ACCESS_KEY": "test-secret-key",
           "AWS_REGION": "us-east-1"}


def by_name(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in summary["checks"]}


def with_site_text(site: Site, *pairs: str) -> Site:
    """The same site with pieces of its site file replaced: ``old, new, old, new, ...``."""
    text = site.config_path.read_text()
    for old, new in zip(pairs[::2], pairs[1::2], strict=True):
        assert old in text, old
        text = text.replace(old, new)
    site.config_path.write_text(text)
    return Site(site.root, site.config_path, load_site_config(site.config_path), site.env)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path / "site", protect=("erp", "files"), log_size="64MiB", install=False)


class SkewedStore(MemoryStore):
    """A store whose clock is ``skew`` seconds off ours (None: it cannot tell)."""

    def __init__(self, skew: float | None) -> None:
        super().__init__("skewed")
        self.skew = skew

    async def server_time(self) -> float | None:
        return None if self.skew is None else time.time() + self.skew


# --------------------------------------------------------------------------- the shape


def test_a_check_prints_one_line_and_refuses_unknown_statuses() -> None:
    assert Check("store.clock", "warn", "7 s").line() == "WARN store.clock: 7 s"
    with pytest.raises(ValueError):
        Check("x", "maybe", "?")


# --------------------------------------------------------------------------- system


async def test_system_passes_on_a_good_site(site: Site) -> None:
    phases: list[str] = []
    summary = await preflight_system(site.cfg, site.env, progress=lambda p, d, t: phases.append(p))
    checks = by_name(summary)
    assert summary["kind"] == "system" and summary["ok"], format_checks(summary)
    for name in ("runtime", "modules", "secret.CDP_SITE_SECRET", "secret.CDP_API_TOKEN", "store.write",
                 "store.clock", "drva.drva-1.log", "drva.drva-1.meta", "drva.drva-2.log", "drva.drva-2.meta"):
        assert checks[name]["status"] == "pass", checks[name]
    assert checks["drva.drva-1.fsync"]["status"] in ("pass", "warn")  # a busy CI disk may be slow
    assert set(checks["modules"]["details"]["versions"]) >= {"numpy", "aioboto3", "azure.storage.blob", "tomli_w"}
    assert all(v for v in checks["modules"]["details"]["versions"].values())
    write = checks["store.write"]["details"]
    assert write["put_ms"] >= 0 and write["get_ms"] >= 0 and write["delete_ms"] >= 0
    assert checks["store.clock"]["details"]["skew_s"] == pytest.approx(0, abs=0.5)
    fsync = checks["drva.drva-1.fsync"]["details"]
    assert fsync["samples"] == 16 and 0 < fsync["p50_ms"] <= fsync["p99_ms"]
    assert phases[-1] == "done"
    assert summary["failures"] == 0 and summary["warnings"] == sum(c["status"] == "warn" for c in summary["checks"])
    # The probe object is gone, and nothing else was written to the store or the state dir.
    assert [i.key async for i in FileStore(site.root / "store").list()] == []
    assert not (site.root / "state").exists()


async def test_missing_secrets_fail_by_name_and_values_never_show(site: Site) -> None:
    env = {k: v for k, v in site.env.items() if k not in ("CDP_SITE_SECRET", "CDP_API_TOKEN")}
    env["CDP_API_TOKEN"] = "short-one"
    summary = await preflight_system(site.cfg, env)
    checks = by_name(summary)
    assert not summary["ok"] and summary["failures"] == 2
    assert checks["secret.CDP_SITE_SECRET"]["status"] == "fail"
    assert checks["secret.CDP_SITE_SECRET"]["reason"].startswith("unset")
    assert checks["secret.CDP_API_TOKEN"]["reason"].startswith("too short")
    assert "short-one" not in json.dumps(summary)
    good = await preflight_system(site.cfg, site.env)
    assert site.env["CDP_SITE_SECRET"] not in json.dumps(good)


async def test_store_credentials_are_checked_by_name(site: Site) -> None:
    s3 = with_site_text(site, 'store = "store"', 'store = "s3://some-bucket/p?endpoint=http://127.0.0.1:9"')
    env = {k: v for k, v in site.env.items() if not k.startswith("AWS_")}
    # (Any store will do: the credentials are checked by name, for the scheme of the URL.)
    summary = await preflight_system(s3.cfg, {**env, "AWS_ACCESS_KEY_ID": "only-half"}, store=MemoryStore())
    check = by_name(summary)["secret.store"]
    assert check["status"] == "fail" and "only one of" in check["reason"] and "only-half" not in json.dumps(summary)
    azure = with_site_text(s3, 's3://some-bucket/p?endpoint=http://127.0.0.1:9', "azure://box/p")
    env = {k: v for k, v in env.items() if "CONNECTION_STRING" not in k}
    summary = await preflight_system(azure.cfg, env)
    checks = by_name(summary)
    assert checks["secret.store"]["status"] == "fail"
    assert "CDP_AZURE_CONNECTION_STRING" in checks["secret.store"]["reason"]
    assert checks["store.write"]["status"] == "fail"  # the store cannot even be opened


async def test_a_store_that_refuses_writes_fails(site: Site) -> None:
    store = FaultyStore(MemoryStore("refusing"))
    store.fail_next("put", 1, PermissionDenied)
    checks = by_name(await preflight_system(site.cfg, site.env, store=store))
    assert checks["store.write"]["status"] == "fail"
    assert "injected fault" in checks["store.write"]["reason"]
    assert checks["store.clock"]["status"] == "pass"


async def test_an_unreachable_store_fails_both_store_checks(site: Site) -> None:
    store = FaultyStore(MemoryStore("offline"))
    store.offline()
    summary = await preflight_system(site.cfg, site.env, store=store)
    checks = by_name(summary)
    assert checks["store.write"]["status"] == checks["store.clock"]["status"] == "fail"
    assert "offline" in checks["store.clock"]["reason"]
    assert not summary["ok"]


async def test_a_store_whose_read_back_differs_fails(site: Site) -> None:
    class Lying(MemoryStore):
        async def get(self, key: str, offset: int = 0, length: int | None = None, *,
                      max_bytes: int | None = None) -> bytes:
            return b"not what was written"  # a fixed small answer: within any bound

    checks = by_name(await preflight_system(site.cfg, site.env, store=Lying("lying")))
    assert checks["store.write"]["status"] == "fail" and "differs" in checks["store.write"]["reason"]


async def test_the_peers_store_is_checked_when_the_peers_domains_live_in_it(site: Site) -> None:
    assert "peer_store.write" not in by_name(await preflight_system(site.cfg, site.env))  # one store: as before
    text = site.config_path.read_text() + '\n[peer]\nsite = "site-o"\napi = "127.0.0.1:1"\nstore = "peer-store"\n'
    site.config_path.write_text(text)
    two = with_site_text(site)
    check = by_name(await preflight_system(two.cfg, two.env))["peer_store.write"]
    assert check["status"] == "pass" and "peer-store" in check["reason"], check
    assert [i.key async for i in FileStore(site.root / "peer-store").list()] == []  # the probe is gone
    (site.root / "peer-store").rmdir()
    (site.root / "peer-store").write_text("a file where the peer's store should be")
    check = by_name(await preflight_system(two.cfg, two.env))["peer_store.write"]
    assert check["status"] == "fail" and check["reason"].startswith(f"{two.cfg.path}: peer.store: "), check
    azure = with_site_text(two, 'store = "peer-store"', 'store = "azure://peer-box/p"')
    env = {k: v for k, v in site.env.items() if "CONNECTION_STRING" not in k}
    checks = by_name(await preflight_system(azure.cfg, env))
    assert checks["secret.peer_store"]["status"] == "fail" and "secret.store" not in checks  # its own: a file store
    assert "CDP_AZURE_CONNECTION_STRING" in checks["secret.peer_store"]["reason"]
    check = checks["peer_store.write"]  # the store cannot even be opened
    assert check["status"] == "fail" and check["reason"].startswith(f"{azure.cfg.path}: peer.store: "), check


@pytest.mark.parametrize("skew,status", [(0.0, "pass"), (-(SKEW_WARN_S + 3), "warn"), (SKEW_WARN_S + 3, "warn"),
                                         (SKEW_FAIL_S + 10, "fail"), (-(SKEW_FAIL_S + 10), "fail"),
                                         (None, "warn")])
async def test_clock_skew_thresholds(site: Site, skew: float | None, status: str) -> None:
    checks = by_name(await preflight_system(site.cfg, site.env, store=SkewedStore(skew)))
    clock = checks["store.clock"]
    assert clock["status"] == status, clock
    if skew is not None:
        assert clock["details"]["skew_s"] == pytest.approx(skew, abs=0.5)
        assert ("ahead of" if skew >= 0 else "behind") in clock["reason"]


async def test_clock_skew_against_moto_s3(site: Site, moto_server: str) -> None:
    bucket = unique_name()
    s3 = with_site_text(site, 'store = "store"', f'store = "s3://{bucket}/sites?endpoint={moto_server}"')
    env = {**site.env, **AWS_ENV}
    missing = by_name(await preflight_system(s3.cfg, env))
    assert missing["store.write"]["status"] == "warn" and "does not exist yet" in missing["store.write"]["reason"]
    assert missing["store.clock"]["status"] == "pass"  # the server tells its time all the same
    async with open_store(s3.cfg.store_url, env=env) as store:
        await store.ensure_container()
    summary = await preflight_system(s3.cfg, env)
    checks = by_name(summary)
    assert checks["store.write"]["status"] == "pass", checks["store.write"]
    assert checks["secret.store"]["status"] == "pass"
    clock = checks["store.clock"]
    assert clock["status"] == "pass" and abs(clock["details"]["skew_s"]) < 1.5, clock
    assert clock["details"]["uncertainty_s"] >= 0.5  # an HTTP Date has whole seconds
    assert "test-secret-key" not in json.dumps(summary)


async def test_clock_skew_against_azurite(site: Site, azurite: str) -> None:
    container = unique_name()
    az = with_site_text(site, 'store = "store"', f'store = "azure://{container}/sites"')
    env = {**site.env, "CDP_AZURE_CONNECTION_STRING": azurite}
    async with open_store(az.cfg.store_url, env=env) as store:
        await store.ensure_container()
    summary = await preflight_system(az.cfg, env)
    checks = by_name(summary)
    assert checks["store.write"]["status"] == "pass", checks["store.write"]
    clock = checks["store.clock"]
    assert clock["status"] == "pass" and abs(clock["details"]["skew_s"]) < 1.5, clock
    assert "AccountKey" not in json.dumps(summary)


async def test_a_log_partition_too_small_or_not_ours(site: Site) -> None:
    # Configured below what a partition needs at all: the site file is refused, by
    # preflight as by install (issue 10: it used to pass one and fail the other).
    with pytest.raises(ConfigError, match=r"drvas\[0\]\.log\.size: expected a size of at least 1056768 bytes"):
        with_site_text(site, 'path = "state/drva-1/replog"\nsize = "64MiB"',
                       'path = "state/drva-1/replog"\nsize = "1MiB"')
    # Configured small: a warning (a short outage fills it).
    small = with_site_text(site, 'size = "1MiB"', 'size = "8MiB"')
    checks = by_name(await preflight_system(small.cfg, site.env))
    assert checks["drva.drva-1.log"]["status"] == "warn" and "below 64 MiB" in checks["drva.drva-1.log"]["reason"]
    # More than the file system has room for.
    huge = with_site_text(small, 'size = "8MiB"', 'size = "1000TiB"')
    checks = by_name(await preflight_system(huge.cfg, site.env))
    assert checks["drva.drva-1.log"]["status"] == "fail" and "free in" in checks["drva.drva-1.log"]["reason"]
    # An existing partition of this DRVA, smaller than configured: install keeps it.
    log_path = site.cfg.drva("drva-1").log_path
    log_path.parent.mkdir(parents=True)
    ReplicationLog.format(log_path, DATA_START + (2 << 20), label="drva-1")
    checks = by_name(await preflight_system(site.cfg, site.env))
    assert checks["drva.drva-1.log"]["status"] == "warn"
    assert "smaller than the configured 64 MiB" in checks["drva.drva-1.log"]["reason"]
    # Another DRVA's partition, or something that is not a partition: refused.
    ReplicationLog.format(log_path, 8 << 20, label="drva-9", force=True)
    checks = by_name(await preflight_system(site.cfg, site.env))
    assert checks["drva.drva-1.log"]["status"] == "fail" and "'drva-9'" in checks["drva.drva-1.log"]["reason"]
    log_path.write_bytes(b"precious data " * 1000)
    checks = by_name(await preflight_system(site.cfg, site.env))
    assert checks["drva.drva-1.log"]["status"] == "fail"
    assert "not a log partition" in checks["drva.drva-1.log"]["reason"]
    assert checks["drva.drva-1.fsync"]["status"] in ("pass", "warn")


async def test_the_metadata_path(site: Site) -> None:
    meta = site.cfg.drva("drva-2").meta_path
    meta.parent.mkdir(parents=True)
    MetaRepository.format(meta)
    checks = by_name(await preflight_system(site.cfg, site.env))
    assert checks["drva.drva-2.meta"]["status"] == "pass"
    assert "metadata repository" in checks["drva.drva-2.meta"]["reason"]
    meta.write_bytes(b"x" * 5000)
    checks = by_name(await preflight_system(site.cfg, site.env))
    assert checks["drva.drva-2.meta"]["status"] == "fail"
    assert "install refuses to overwrite it" in checks["drva.drva-2.meta"]["reason"]


async def test_an_unwritable_log_directory_fails(site: Site) -> None:
    # A file where the partition's directory should be: nothing can be created below it.
    (site.root / "state").mkdir()
    (site.root / "state" / "drva-1").write_text("in the way")
    checks = by_name(await preflight_system(site.cfg, site.env))
    assert checks["drva.drva-1.log"]["status"] == "fail"
    assert checks["drva.drva-1.fsync"]["status"] == "fail"
    assert checks["drva.drva-1.meta"]["status"] == "fail"
    assert checks["drva.drva-2.log"]["status"] == "pass"


# --------------------------------------------------------------------------- install


async def test_install_preflight_passes_on_a_good_site(site: Site) -> None:
    summary = await preflight_install(site.cfg, site.env)
    checks = by_name(summary)
    assert summary["kind"] == "install" and summary["ok"], format_checks(summary)
    for name in ("site", "domain.erp", "domain.files", "disk-images", "names", "ports.distinct",
                 "paths.distinct", "port.api", "state", "installation"):
        assert checks[name]["status"] == "pass", checks[name]
    # Test ports are free ones, not the DRVA convention: a warning that names the range.
    assert checks["port.drva-1"]["status"] == "warn" and "32873–32878" in checks["port.drva-1"]["reason"]
    assert "domain.web" not in checks  # not protected, and its DRVA is one of the site's
    assert checks["disk-images"]["details"]["to_create"] == 3


async def test_a_port_in_use_fails(site: Site) -> None:
    listen = site.cfg.drva("drva-2").listen
    with socket.socket() as taken:
        taken.bind((listen.host, listen.port))
        taken.listen()
        summary = await preflight_install(site.cfg, site.env)
    check = by_name(summary)["port.drva-2"]
    assert check["status"] == "fail" and check["reason"] == f"{listen}: in use"
    assert not summary["ok"]


async def test_a_port_on_an_address_not_of_this_host_fails(site: Site) -> None:
    api = str(site.cfg.api_listen)
    moved = with_site_text(site, f'listen = "{api}"', f'listen = "192.0.2.1:{site.cfg.api_listen.port}"')
    check = by_name(await preflight_install(moved.cfg, site.env))["port.api"]
    assert check["status"] == "fail" and "not an address of this machine" in check["reason"]


async def test_name_and_port_clashes_fail(site: Site) -> None:
    original = site.config_path.read_text()
    clash = with_site_text(site, 'name = "drva-2"', 'name = "erp-db"')
    check = by_name(await preflight_install(clash.cfg, site.env))["names"]
    assert check["status"] == "fail" and "DRVA erp-db is also a VM" in check["reason"]
    host = with_site_text(clash, 'name = "erp-db"\nlisten', 'name = "esx-01"\nlisten')
    check = by_name(await preflight_install(host.cfg, site.env))["names"]
    assert check["status"] == "fail" and "DRVA esx-01 is also a host" in check["reason"]
    # Two DRVAs on one port (different addresses): the config allows it, the machine does not.
    site.config_path.write_text(original)
    p1 = site.cfg.drva("drva-1").listen.port
    p2 = site.cfg.drva("drva-2").listen.port
    one_port = with_site_text(site, f'listen = "127.0.0.1:{p2}"', f'listen = "127.0.0.2:{p1}"',
                              'domain = "files"', 'domain = "web"')  # files' DRVA is gone
    check = by_name(await preflight_install(one_port.cfg, site.env))["ports.distinct"]
    assert check["status"] == "fail" and f"DRVA drva-1 and DRVA drva-2 on port {p1}" in check["reason"]
    # Two partitions on one path, through a link (the same literal path is refused as the
    # site file is read): drva-2 would find drva-1's log there.
    site.config_path.write_text(original)
    (site.root / "state" / "drva-1").mkdir(parents=True)
    (site.root / "state" / "alias").symlink_to("drva-1")
    shared = with_site_text(site, 'path = "state/drva-2/replog"', 'path = "state/alias/replog"')
    checks = by_name(await preflight_install(shared.cfg, site.env))
    assert checks["paths.distinct"]["status"] == "fail"
    assert "the log of DRVA drva-1 and the log of DRVA drva-2 share" in checks["paths.distinct"]["reason"]


async def test_the_cluster_file_must_describe_this_site(site: Site) -> None:
    cluster = site.root / "cluster.toml"
    cluster.write_text(cluster.read_text().replace('site = "site-t"', 'site = "elsewhere"'))
    check = by_name(await preflight_install(load_site_config(site.config_path), site.env))["site"]
    assert check["status"] == "fail" and "'elsewhere'" in check["reason"]


async def test_a_domain_that_could_never_be_protected_warns(site: Site) -> None:
    p2 = site.cfg.drva("drva-2").listen.port
    cluster = site.root / "cluster.toml"
    cluster.write_text(cluster.read_text().replace(f'drva = "127.0.0.1:{p2}"', 'drva = "127.0.0.1:9"'))
    fewer = with_site_text(site, '    { domain = "files" },\n', "")
    check = by_name(await preflight_install(fewer.cfg, site.env))["domain.files"]
    assert check["status"] == "warn" and "cannot be protected" in check["reason"]


async def test_a_disk_image_of_the_wrong_size_fails(site: Site) -> None:
    image = site.cfg.domain("erp").disks[0].disk.image
    image.parent.mkdir(parents=True)
    image.write_bytes(bytes(4096))
    check = by_name(await preflight_install(site.cfg, site.env))["disk-images"]
    assert check["status"] == "fail" and "4096 bytes" in check["reason"]
    image.write_bytes(bytes(site.cfg.domain("erp").disks[0].disk.size))
    check = by_name(await preflight_install(site.cfg, site.env))["disk-images"]
    assert check["status"] == "pass" and check["details"]["existing"] == 1


async def test_an_existing_installation(site: Site) -> None:
    await install(site.cfg, site.env)
    checks = by_name(await preflight_install(site.cfg, site.env))
    assert checks["installation"]["status"] == "warn" and "already installed" in checks["installation"]["reason"]
    assert checks["state"]["status"] == "warn"
    # Another site's record in the same store: sites share a store (a recovery site must).
    other = Deployment("site-o", time.time_ns(), "0.1.0", (("drva-x", "127.0.0.1:1"),), "127.0.0.1:2")
    store = FileStore(site.root / "store")
    await store.put(deployment_key("site-o"), encode_deployment(other))
    check = by_name(await preflight_install(site.cfg, site.env))["installation"]
    assert check["status"] == "warn" and check["details"]["other_sites"] == ["site-o"], check
    # ... but a domain id of this site that the store holds as the other site's domain does not.
    await CatalogWriter(store, CatalogState.new(2, "shop", 1, "site-o"), by="test").commit({"disks": []})
    summary = await preflight_install(site.cfg, site.env)
    check = by_name(summary)["installation"]
    assert check["status"] == "fail" and not summary["ok"], check
    assert "web (id 2: domain 'shop' of site 'site-o')" in check["reason"]


async def test_another_sites_state_directory_fails(site: Site) -> None:
    other = with_site_text(site, 'site = "site-t"', 'site = "site-o"')
    (site.root / "cluster.toml").write_text((site.root / "cluster.toml").read_text().replace("site-t", "site-o"))
    save_protection(load_site_config(other.config_path), {})
    (site.root / "cluster.toml").write_text((site.root / "cluster.toml").read_text().replace("site-o", "site-t"))
    site.config_path.write_text(site.config_path.read_text().replace('site = "site-o"', 'site = "site-t"'))
    check = by_name(await preflight_install(load_site_config(site.config_path), site.env))["state"]
    assert check["status"] == "fail" and "'site-o'" in check["reason"]


# --------------------------------------------------------------------------- uninstall


async def test_uninstall_preflight_before_and_after_install(site: Site) -> None:
    summary = await preflight_uninstall(site.cfg, site.env)
    checks = by_name(summary)
    assert checks["installation"]["status"] == "warn" and summary["ok"]
    assert checks["remove.drva-1"]["reason"] == "nothing to remove"
    await install(site.cfg, site.env)
    store = FileStore(site.root / "store")
    await store.put("d/00000001/seg/0000000000000001-0000000000000002.seg", b"x" * 1000)
    await store.put("d/00000003/cat/0000000000000001.cat", b"y" * 10)
    summary = await preflight_uninstall(site.cfg, site.env)
    checks = by_name(summary)
    assert summary["ok"] and checks["installation"]["status"] == "pass"
    assert checks["daemon"]["status"] == "pass"
    remove = checks["remove.drva-1"]["details"]["remove"]
    assert any("log partition" in r and "64 MiB" in r for r in remove)
    assert any(r.startswith("config ") for r in remove) and any(r.startswith("metadata ") for r in remove)
    assert "deployment record" in checks["remove.site"]["reason"] and "jobs" in checks["remove.site"]["reason"]
    assert checks["keep.erp"]["details"]["objects"] == 1 and checks["keep.erp"]["details"]["bytes"] == 1000
    assert checks["keep.files"]["details"]["objects"] == 1
    assert checks["keep.web"]["details"]["objects"] == 0
    # Nothing was removed by looking.
    assert site.cfg.drva("drva-1").log_path.exists()
    # A foreign file at a partition's path would be left alone: said so.
    site.cfg.drva("drva-2").meta_path.write_bytes(b"mine " * 2000)
    check = by_name(await preflight_uninstall(site.cfg, site.env))["remove.drva-2"]
    assert check["status"] == "warn" and "would leave" in check["reason"]
