"""The site and cluster files against what the hypervisor face writes beside the VMs'
images, and against names and addresses that make two things one.

Each was accepted before: a VM image or a DRVA's log at another disk's spill journal
(``<first image>.spill``: the host unlinked it at power-on) or dirty-region map (the
filter rewrote and truncated it); ``[hypervisor] nbd_listen = "0.0.0.0:…"`` (every
protected disk read and written by anyone, no authentication); a DRVA named
``host-<host>`` (its log and pid file were the host's: each keeper stopped the other's
process as its leftover) or ``d1.toml`` beside ``d1`` (``drvas/d1.toml`` both DRVA d1's
configuration and DRVA d1.toml's state directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cdp import site_files
from cdp.errors import ConfigError
from cdp.inventory import parse_cluster
from cdp.msa.config import load_site_config

P1 = "127.0.0.1:32873"


def write(tmp: Path, *, drva: dict[str, Any] | None = None, vms: list[dict[str, Any]] | None = None,
          hypervisor: dict[str, Any] | None = None, cluster: str = "cluster.toml",
          datastore: str = "datastore") -> Path:
    """A site of one DRVA (``drva``: its entry's keys) protecting domain erp (VM db)."""
    entry = {"log_path": "state/d/replog", "log_size": "8MiB", "meta_path": "state/d/meta", **(drva or {})}
    name = entry.pop("name", "drva-1")
    inventory = site_files.inventory(
        "site-a", ["h1"], vms or [site_files.vm("db", "h1", [("data", "1MiB"), ("log", "1MiB")])],
        [site_files.domain("erp", 1, P1, ["db"])], state_dir=datastore)
    doc = site_files.site("site-a", drvas=[site_files.drva(name, P1, **entry)], protect=["erp"],
                          hypervisor=hypervisor, cluster=cluster)
    (tmp / Path(cluster).parent).mkdir(parents=True, exist_ok=True)
    return site_files.write_site(tmp, doc, inventory, check=False)


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    return err.value.message


@pytest.mark.parametrize("image,what", [
    ("db-data.img.spill", "the spill journal of domain erp, beside the image of disk data of VM db (vms[0].disks[0])"),
    ("db-log.img.dirty", "the dirty-region map of the image of disk log of VM db (vms[0].disks[1])"),
    ("./sub/../db-data.img.dirty", "the dirty-region map of the image of disk data of VM db (vms[0].disks[0])"),
])
def test_an_image_at_another_disks_sidecar_file_is_refused_naming_both(tmp_path: Path, image: str, what: str) -> None:
    vms = [site_files.vm("db", "h1", [("data", "1MiB"), ("log", "1MiB")]),
           site_files.vm("web", "h1", [("d0", "1MiB", image)])]
    message = refusal(write(tmp_path, vms=vms))
    assert "vms[1].disks[0].image: expected an image apart from " + what in message, message
    # The inventory alone (what iofilter-sim run reads) refuses it too.
    doc = site_files.inventory("site-a", ["h1"], vms, [site_files.domain("erp", 1, P1, ["db"])],
                               state_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"vms\[1\]\.disks\[0\]\.image: expected an image apart from"):
        parse_cluster(doc, "cluster.toml")


def test_only_a_domains_first_disk_has_a_spill_journal(tmp_path: Path) -> None:
    """``<image>.spill`` of a disk that is no domain's first is no one's file."""
    vms = [site_files.vm("db", "h1", [("data", "1MiB"), ("log", "1MiB")]),
           site_files.vm("web", "h1", [("d0", "1MiB", "db-log.img.spill")])]
    assert load_site_config(write(tmp_path, vms=vms)).cluster.vms[1].disks[0].image.name == "db-log.img.spill"


@pytest.mark.parametrize("key,path,what", [
    ("log", "datastore/db-data.img.spill", "the spill journal of domain erp, beside the image of disk data of VM db"),
    ("meta", "datastore/db-log.img.dirty", "the dirty-region map of the image of disk log of VM db"),
])
def test_a_partition_at_a_sidecar_file_is_refused(tmp_path: Path, key: str, path: str, what: str) -> None:
    message = refusal(write(tmp_path, drva={f"{key}_path": path}))
    assert f"drvas[0].{key}.path: expected a partition apart from {what} in cluster.toml" in message, message


def test_the_cluster_file_at_a_dirty_map_is_refused(tmp_path: Path) -> None:
    """The cluster file in the datastore, named as its first disk's map: the filter's
    open would have rewritten it as a map."""
    message = refusal(write(tmp_path, cluster="datastore/db-data.img.dirty", datastore="."))
    assert "cluster (the cluster file)" in message, message
    assert "is the dirty-region map of the image of disk data of VM db" in message, message


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:10809", "192.168.1.10:10809", "nbd.example.net:10809",
                                    "[::ffff:127.0.0.1]:0"])
def test_nbd_listen_beyond_loopback_is_refused(tmp_path: Path, listen: str) -> None:
    message = refusal(write(tmp_path, hypervisor={"driver": "nbd", "nbd_listen": listen}))
    assert "hypervisor.nbd_listen: expected a loopback address" in message, message
    assert "carry no authentication" in message and "Unix socket" in message


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "127.0.0.2:10809", "[::1]:0", "localhost:10809"])
def test_nbd_listen_on_loopback_is_accepted(tmp_path: Path, listen: str) -> None:
    cfg = load_site_config(write(tmp_path, hypervisor={"driver": "nbd", "nbd_listen": listen}))
    assert cfg.hypervisor.nbd_listen == listen


@pytest.mark.parametrize("name,why", [
    ("host-h1", "logs/host-h1.log and logs/host-h1.pid would be a simulated host's"),
    ("host-other", "not beginning 'host-'"),
    ("standby-erp", "logs/standby-erp.log and logs/standby-erp.pid would be a standby's"),
    ("d1.toml", "drvas/d1.toml would be this DRVA's state directory and the configuration file of a DRVA "
                "named 'd1'"),
])
def test_a_drva_name_that_is_another_childs_or_a_config_file_is_refused(tmp_path: Path, name: str, why: str) -> None:
    message = refusal(write(tmp_path, drva={"name": name}))
    assert "drvas[0].name: expected a DRVA name" in message and why in message, message


@pytest.mark.parametrize("name", ["hosting", "d1", "d1.tom", "my-host-1"])
def test_other_drva_names_are_accepted(tmp_path: Path, name: str) -> None:
    assert load_site_config(write(tmp_path, drva={"name": name})).drvas[0].name == name
