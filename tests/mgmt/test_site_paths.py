"""The site and cluster files against a partition put where something else is written
or kept, numbers that are not integers, disks that recover to one image, a NUL in the
cluster's CA path; ``--timeout nan`` of the site verbs and a NaN in a job record served
by the API. Each was accepted: a log at a DRVA's ``status.json`` passed preflight and
install, then the status writer replaced it with JSON (acked writes lost, exit 4 on the
restart); ``GET /v1/jobs`` answered ``NaN``, which is no JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from cdp import site_files
from cdp.cli import cli
from cdp.errors import ConfigError
from cdp.inventory import parse_cluster
from cdp.msa.config import load_site_config
from cdp.msa.jobs import JobStore
from cdp.testing.site import TOKEN, make_site, running_daemon

P1, P2 = "127.0.0.1:32873", "127.0.0.1:32874"


def write(tmp: Path, *, log1: str = "state/drva-1/replog", meta1: str = "state/drva-1/meta",
          drva1: dict[str, Any] | None = None, hypervisor: dict[str, Any] | None = None,
          vms: list[dict[str, Any]] | None = None, tls: bool = False) -> Path:
    """A site of two DRVAs (``drva-1``'s partitions at ``log1``, ``meta1``) and its cluster."""
    drvas = [site_files.drva("drva-1", P1, log_path=log1, log_size="8MiB", meta_path=meta1, **(drva1 or {})),
             site_files.drva("drva-2", P2, log_path="state/drva-2/replog", log_size="8MiB",
                             meta_path="state/drva-2/meta")]
    inventory = site_files.inventory(
        "site-a", ["h1"], vms or [site_files.vm("db", "h1", [("data", "1MiB")]), site_files.vm("web", "h1",
                                                                                          [("d0", "1MiB")])],
        [site_files.domain("erp", 1, P1, ["db"]), site_files.domain("web", 2, P2, ["web"])], state_dir="images")
    doc = site_files.site("site-a", drvas=drvas, protect=["erp", "web"], hypervisor=hypervisor,
                          tls={"mode": "on"} if tls else None)
    return site_files.write_site(tmp, doc, inventory, check=False)


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    return err.value.message


@pytest.mark.parametrize("log,what", [
    ("state/drvas/drva-1/status.json", "status.json"),            # its own status file (the DRVA's reader)
    ("state/drvas/drva-1/requests/replog", "requests"),
    ("state/drvas/drva-2/status.json", "the state directory of DRVA drva-2"),
    ("state/drvas/drva-2", "the state directory of DRVA drva-2"),
    ("state/drvas/drva-2.toml", "the configuration of DRVA drva-2"),
    ("state/drvas", "drvas/ of state_dir"),
    ("state", "state_dir"),
    ("state/msa.lock", "msa.lock of state_dir"),
    ("state/protection.json", "protection.json of state_dir"),
    ("state/jobs/replog", "jobs of state_dir"),
    ("state/registered.toml", "registered.toml of state_dir"),
    ("state/tls/replog", "tls of state_dir"),
    ("images/db-data.img", "the image of disk data of VM db"),
    ("images/db-data.img.dirty", "the dirty-region map of the image of disk data of VM db"),
    ("images", "state_dir of cluster.toml (the datastore)"),
    ("site.toml", "the site file"),
    ("cluster.toml", "the cluster file"),
    ("store/replog", "store (a file store)"),
])
def test_a_partition_where_something_else_is_written_or_kept_is_refused(tmp_path, log, what):
    message = refusal(write(tmp_path, log1=log))
    assert message.startswith(f"{tmp_path / 'site.toml'}: drvas[0]"), message
    assert "log.path" in message and what in message, message


def test_a_metadata_partition_is_checked_as_the_log(tmp_path):
    message = refusal(write(tmp_path, meta1="state/drvas/drva-2/meta"))
    assert message.startswith(f"{tmp_path / 'site.toml'}: drvas[0].meta.path: expected a partition apart from "
                              f"the state directory of DRVA drva-2"), message


def test_a_tls_directory_elsewhere_is_checked_too(tmp_path):
    path = write(tmp_path, log1="pki/replog", tls=True)
    path.write_text(path.read_text().replace('mode = "on"', 'mode = "on"\ndir = "pki"'))
    assert "drvas[0].log.path: expected a partition apart from tls.dir" in refusal(path), refusal(path)


@pytest.mark.parametrize("log", ["state/drva-1/replog", "state/drvas/drva-1/replog", "images/drva-1/replog",
                                 "elsewhere/replog"])
def test_partitions_in_the_usual_places_load(tmp_path, log):
    cfg = load_site_config(write(tmp_path, log1=log, meta1=str(Path(log).parent / "meta")))
    assert cfg.drva("drva-1").log_path == tmp_path / log


@pytest.mark.parametrize("drva1,hypervisor,at", [
    ({"upload_concurrency": 2.7}, None, "drvas[0].upload_concurrency"),       # was 2
    ({"upload_concurrency": True}, None, "drvas[0].upload_concurrency"),
    (None, {"vms_per_host": 1.9}, "hypervisor.vms_per_host"),                 # was 1
    (None, {"vms_per_host": 4.0}, "hypervisor.vms_per_host"),
])
def test_a_count_that_is_not_an_integer_is_refused(tmp_path, drva1, hypervisor, at):
    message = refusal(write(tmp_path, drva1=drva1, hypervisor=hypervisor))
    assert message.startswith(f"{tmp_path / 'site.toml'}: {at}: expected an integer in"), message


def test_integer_counts_load(tmp_path):
    cfg = load_site_config(write(tmp_path, drva1={"upload_concurrency": 3}, hypervisor={"vms_per_host": 5}))
    assert cfg.drva("drva-1").upload_concurrency == 3 and cfg.hypervisor.vms_per_host == 5


# --------------------------------------------------------------- the cluster file


def _cluster(vms: list[dict[str, Any]], members: list[str], tls: dict[str, Any] | None = None) -> dict[str, Any]:
    return site_files.inventory("s", ["h"], vms, [site_files.domain("erp", 1, P1, members)], tls=tls)


def test_disks_of_a_domain_that_recover_to_one_image_are_refused_by_the_cluster_file():
    """With their own ``image`` they passed; ``cdp recover`` then refused the domain."""
    doc = _cluster([site_files.vm("a-b", "h", [("c", "1MiB", "x1.img")]),
                    site_files.vm("a", "h", [("b-c", "1MiB", "x2.img")])], ["a-b", "a"])
    with pytest.raises(ConfigError) as err:
        parse_cluster(doc, "cluster.toml")
    message = err.value.message
    assert message.startswith("cluster.toml: domains[0].vms: expected VMs whose disks each recover"), message
    assert "disk c of VM a-b and disk b-c of VM a both make a-b-c.img" in message, message


def test_the_same_vms_in_two_domains_recover_apart():
    doc = site_files.inventory("s", ["h"], [site_files.vm("a-b", "h", [("c", "1MiB", "x1.img")]),
                                            site_files.vm("a", "h", [("b-c", "1MiB", "x2.img")])],
                               [site_files.domain("one", 1, P1, ["a-b"]), site_files.domain("two", 2, P1, ["a"])])
    assert [d.name for d in parse_cluster(doc, "cluster.toml").domains] == ["one", "two"]


def test_a_nul_in_the_clusters_ca_path_is_refused_naming_the_key():
    doc = _cluster([site_files.vm("db", "h", [("d0", "1MiB")])], ["db"], tls={"ca": "ca\0.pem"})
    with pytest.raises(ConfigError, match=r"^cluster\.toml: tls\.ca: expected a file path"):
        parse_cluster(doc, "cluster.toml")


# --------------------------------------------------------------- --timeout and the API's JSON


@pytest.mark.parametrize("verb", [["preflight", "install"], ["install"], ["uninstall"]])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_timeout_that_is_not_finite_is_refused(tmp_path, verb, value):
    result = CliRunner().invoke(cli, [*verb, "--config", str(tmp_path / "site.toml"), "--timeout", value])
    assert result.exit_code == 2 and "is not a finite number" in result.output, result.output
    assert not (tmp_path / "state").exists()  # refused before any job record


def _strict(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is no JSON")

    return json.loads(text, parse_constant=refuse)


async def test_a_job_record_holding_nan_is_served_as_valid_json(tmp_path):
    """A record written before ``--timeout`` refused NaN made ``GET /v1/jobs`` invalid JSON."""
    site = make_site(tmp_path / "site", protect=())
    job = JobStore(site.cfg.state_dir / "jobs").create("preflight-install", {"x": [float("inf")]}, float("nan"))
    async with running_daemon(site), aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        async with http.get(f"{site.api}/v1/jobs") as resp:
            assert resp.status == 200
            listed = _strict(await resp.text())["jobs"]
        async with http.get(f"{site.api}/v1/jobs/{job.id}") as resp:
            assert resp.status == 200
            record = _strict(await resp.text())
    assert [j["id"] for j in listed] == [job.id] and listed[0]["timeout_s"] is None
    assert record["timeout_s"] is None and record["args"] == {"x": [None]}
    assert os.path.exists(site.cfg.state_dir / "jobs" / f"{job.id}.json")
