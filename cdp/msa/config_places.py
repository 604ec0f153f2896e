"""Where the site file's places may be: the checks ``parse_site_config`` runs once the
site is parsed, each a ``ConfigError`` that names the keys (and both places) at fault.

- The site file, the cluster file and the registered inventory are apart from every VM
  image and the filter's files beside them (``_check_site_files_apart``).
- A DRVA's log and metadata partitions are apart from whatever else is written or kept
  there (``_check_partition_places``).
- Nothing ``cdp uninstall`` must keep lies in a DRVA's state directory, which it empties
  (``_check_drva_state_dirs``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from cdp.errors import ConfigError
from cdp.inventory import sidecar_role, sidecars
from cdp.msa.registry import REGISTERED_NAME
from drva.config import inside

if TYPE_CHECKING:
    from cdp.msa.config import DrvaSpec, SiteConfig

__all__ = ["MSA_STATE_ENTRIES", "check_places"]

#: What the MSA keeps in its ``state_dir`` (FORMAT.md §13), besides ``drvas/``: no
#: partition may be one of these or below one (``_check_partition_places``).
MSA_STATE_ENTRIES = ("protection.json", "jobs", "msa.pid", "msa.lock", "install.json", "logs", "scratch",
                     "registered.toml", "power.json", "hypervisor", "failovers", "standby", "failbacks",
                     "handovers", "tls")


def check_places(cfg: SiteConfig) -> None:
    """Every check of this module on ``cfg``; the first failure raised."""
    images = _image_places(cfg)
    _check_site_files_apart(cfg, images)
    _check_partition_places(cfg, images)
    _check_drva_state_dirs(cfg)


def _file_store_root(url: str | None) -> Path | None:
    """The directory of a ``file://`` store URL (already checked), None for any other."""
    if url is None or not url.startswith("file://"):
        return None
    return Path(unquote(urlsplit(url).path))


def _kept_places(cfg: SiteConfig) -> list[tuple[str, Path]]:
    """(site- or cluster-file key, path) of what must outlive ``cdp uninstall`` without
    ``--purge``: the file stores, the TLS directory (the site CA), the recovery roots,
    the inventory's datastore and every VM's image."""
    stores = [("store", cfg.store_url)]
    if cfg.peer is not None:
        stores.append(("peer.store", cfg.peer.store_url))
    places = [(key, root) for key, url in stores if (root := _file_store_root(url)) is not None]
    if cfg.tls is not None:
        places.append(("tls.dir", cfg.tls.dir))
    places += [(f"recovery_roots[{i}]", root) for i, root in enumerate(cfg.recovery_roots)]
    places.append((f"state_dir of {cfg.cluster_path.name}", cfg.cluster.state_dir))
    places += [(f"the image of disk {disk.name} of VM {vm.name} in {cfg.cluster_path.name}", disk.image)
               for vm in cfg.cluster.vms for disk in vm.disks]
    return places


def _partition_taboos(cfg: SiteConfig, drva: DrvaSpec) -> list[tuple[str, Path, bool]]:
    """(what, path, whether below it is refused too) of the places a partition of ``drva``
    must not be, because something else is written or kept there: the MSA's own state
    (``MSA_STATE_ENTRIES``, the DRVA configurations, the other DRVAs' state directories),
    the site and cluster files, the file stores, the TLS directory, the datastore. Its own
    state directory is the DRVA's reader's to judge (``drva.config``: ``status.json`` and
    ``requests/``); the VMs' images are ``_image_places``'."""
    state = cfg.state_dir
    taboos = [("state_dir", state, False), ("drvas/ of state_dir (the DRVA configurations)", state / "drvas", False)]
    taboos += [(f"{name} of state_dir (the MSA's own, FORMAT.md §13)", state / name, True)
               for name in MSA_STATE_ENTRIES]
    for other in cfg.drvas:
        taboos.append((f"the configuration of DRVA {other.name}", state / "drvas" / f"{other.name}.toml", False))
        if other.name != drva.name:
            taboos.append((f"the state directory of DRVA {other.name}", cfg.drva_state_dir(other), True))
    taboos += [("the site file", cfg.path, False), ("the cluster file", cfg.cluster_path, False),
               ("the registered inventory", state / REGISTERED_NAME, False)]
    taboos += [(f"{key} (a file store)", root, True) for key, url in (("store", cfg.store_url),
               ("peer.store", cfg.peer.store_url if cfg.peer is not None else None))
               if (root := _file_store_root(url)) is not None]
    if cfg.tls is not None:
        taboos.append(("tls.dir", cfg.tls.dir, True))
    taboos.append((f"state_dir of {cfg.cluster_path.name} (the datastore)", cfg.cluster.state_dir, False))
    return taboos


def _image_places(cfg: SiteConfig) -> dict[Path, str]:
    """Each VM's image and the filter's sidecar files beside the images — every disk's
    dirty-region map (``cdp.dirtymap``), each domain's spill journal (``<first
    image>.spill``: ``cdp.inventory.sidecars``) —, as written and with links resolved ->
    what it is: looked up, not compared one by one (a site may have thousands)."""
    places: dict[Path, str] = {}
    for vm in cfg.cluster.vms:
        for disk in vm.disks:
            what = f"the image of disk {disk.name} of VM {vm.name} in {cfg.cluster_path.name}"
            places[Path(os.path.abspath(disk.image))] = places[disk.image.resolve()] = what
    for disk, domain, path in sidecars(cfg.cluster.vms, cfg.cluster.domains):
        image = f"the image of disk {disk.name} of VM {disk.vm} in {cfg.cluster_path.name}"
        places[Path(os.path.abspath(path))] = places[path.resolve()] = sidecar_role(domain, image)
    return places


def _check_site_files_apart(cfg: SiteConfig, images: Mapping[Path, str]) -> None:
    """``ConfigError`` naming both when the site file, the cluster file or the registered
    inventory is at an image or a sidecar file (``_image_places``): the host process
    writes over an image, and the filter rewrites a dirty-region map or unlinks a spill
    journal's path when its domain starts."""
    files = (("the site file", cfg.path), ("cluster (the cluster file)", cfg.cluster_path),
             ("the registered inventory", cfg.state_dir / REGISTERED_NAME))
    for what, path in files:
        place = images.get(Path(os.path.abspath(path))) or images.get(path.resolve())
        if place is not None:
            raise ConfigError(f"{cfg.path}: {what} ({path}) is {place}: expected it apart from every VM image "
                              f"and the filter's files beside them, which are written over when a domain starts")


def _check_partition_places(cfg: SiteConfig, images: Mapping[Path, str]) -> None:
    """``ConfigError`` naming the key when a DRVA's log or metadata partition is at (or
    above; for a directory, below) a place ``_partition_taboos`` or ``_image_places``
    names: the partition would be replaced or removed by what writes there (a log at a
    DRVA's ``status.json`` became JSON, its acked writes lost), or would destroy what is
    kept there."""
    for i, drva in enumerate(cfg.drvas):
        taboos = _partition_taboos(cfg, drva)
        for key, path in (("log.path", drva.log_path), ("meta.path", drva.meta_path)):
            found = [(what, place) for what, place, below in taboos
                     if inside(place, path) or (below and inside(path, place))]
            image = images.get(Path(os.path.abspath(path))) or images.get(path.resolve())
            if image is not None:
                found.append((image, path))
            if found:
                what, place = found[0]
                raise ConfigError(f"{cfg.path}: drvas[{i}].{key}: expected a partition apart from {what} "
                                  f"({place}), got {path}")


def _check_drva_state_dirs(cfg: SiteConfig) -> None:
    """``ConfigError`` naming both keys when something uninstall must keep lies in a
    DRVA's state directory (``<state_dir>/drvas/<name>``): that directory is the DRVA's
    own, and ``cdp uninstall`` empties it of what the DRVA writes there and removes it."""
    places = _kept_places(cfg)
    for i, drva in enumerate(cfg.drvas):
        state_dir = cfg.drva_state_dir(drva)
        for key, path in places:
            if inside(path, state_dir):
                raise ConfigError(
                    f"{cfg.path}: {key} ({path}) lies inside the state directory of DRVA {drva.name} ({state_dir}, "
                    f"from state_dir and drvas[{i}].name): that directory is the DRVA's, and cdp uninstall empties "
                    f"and removes it; set {key} outside it")
