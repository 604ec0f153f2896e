"""A site's inventory: hosts, VMs, virtual disks and protection domains.

The management side (the MSA, preflight, install) and the hypervisor driver both read it;
nothing here knows how VMs run. One TOML file describes it (``examples/cluster.toml`` is
a complete one)::

    site = "site-a"                  # this site's name
    state_dir = "sim-state"          # optional (default "sim-state"): where disk images
                                     # live; relative to the directory of this file

    [[hosts]]
    name = "esx-01"

    [[vms]]                          # none at all is fine: a recovery site's pilot
    name = "erp-db"                  # light is a host and a datastore
    host = "esx-01"                  # one of the [[hosts]]
    disks = [                        # at least one; the order is the domain's disk order
      { name = "disk0", size = "64MiB" },   # bytes: an integer or "<n>KiB|MiB|GiB|TiB"
      { name = "log", size = 33554432, image = "/fast/erp-db-log.img" },
    ]                                # image: optional, default "<state_dir>/<vm>-<disk>.img";
                                     # a relative image is relative to state_dir

    [[domains]]
    name = "erp"
    id = 1                           # u32, unique: the domain id on the wire and in the store
    drva = "127.0.0.1:32873"         # the DRVA this domain's filter streams to
    vms = ["erp-db", "erp-app"]      # every disk of these VMs belongs to the domain
    workload = { kind = "database", rate_mb_s = 8 }   # optional: what the simulated VMs
                                     # write; plain options here, checked and built by
                                     # the simulator (iofilter_sim.cluster); seed
                                     # defaults to the domain id

    [tls]                            # optional: the DRVAs serve TLS (FORMAT.md §20)
    ca = "tls/ca.pem"                # the site CA: the only one the filters trust;
                                     # relative to the directory of this file
    server_name = "drva.example.net" # optional: the name the DRVAs' certificates must
                                     # hold (default: the host of each domain's drva)

Rules, each refused with a ``ConfigError`` naming the file, the key path (for example
``vms[2].disks[0].size``) and what was expected: names match ``[A-Za-z0-9._-]{1,64}``
and are unique among hosts, among VMs, among a VM's disks and among domains; sizes are
multiples of 512 and > 0; two disks never share an image file (neither one path, after
symbolic links, nor — for images that exist — one file by device and inode, as two hard
links are); no two disks of a domain recover to one image file (``image_file_name``,
``<vm>-<disk>.img``: VM ``a-b`` disk ``c`` and VM ``a`` disk ``b-c`` cannot share a
domain, whatever their ``image``); no image is another disk's sidecar file — its
dirty-region map ``<image>.dirty``, or the spill journal ``<image>.spill`` of a
domain's first disk (FORMAT.md §15, §15.1): the filter rewrites, truncates or replaces
those files when the domain starts; a VM is in at most one
domain (a VM in none is simply not protected); domain ids are unique u32s; a DRVA is
``host:port`` with a port in 1..65535; unknown keys are refused (they are typos).

Disk indexes inside a domain are stable: the domain's VMs in listed order, each VM's
disks in listed order, numbered from 0. Reordering VMs or disks in the file renumbers
them, so a protected domain's file must only ever be appended to.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from cdp.errors import ConfigError
from cdp.tls import SERVER_NAME, SERVER_NAME_EXPECTED
from cdp.tomlread import NAME, Endpoint, TomlReader

DEFAULT_STATE_DIR = "sim-state"
#: The filter's sidecar files beside a primary disk (FORMAT.md §15, §15.1): every disk's
#: dirty-region map (``cdp.dirtymap.sidecar_path``), and the spill journal of a domain's
#: first disk (``iofilter_sim.runner``). Spelled here too, so that the inventory refuses an
#: image at one without importing the filter.
DIRTY_MAP_SUFFIX = ".dirty"
SPILL_SUFFIX = ".spill"


def image_file_name(vm: str, disk: str) -> str:
    """The file a disk's image is recovered into (``rocva.plan``), and a disk's default
    image in the inventory: ``<vm>-<disk>.img``."""
    return f"{vm}-{disk}.img"


def image_clash(disks: Sequence[tuple[str, str]]) -> tuple[int, int, str] | None:
    """The first two of ``disks`` (``(vm, disk)`` names, one domain's in disk order) whose
    images are one file (``image_file_name``: ``(vm1, d0)`` twice, or ``(a-b, c)`` and
    ``(a, b-c)``), as ``(first, second, image)`` indexes; None when each has its own. A
    recovery builds every image of a domain in one directory, so it refuses such a domain
    (``rocva.plan``): the cluster and DRVA files refuse it first."""
    seen: dict[str, int] = {}
    for i, (vm, disk) in enumerate(disks):
        image = image_file_name(vm, disk)
        if image in seen:
            return seen[image], i, image
        seen[image] = i
    return None


@dataclass(frozen=True)
class Disk:
    """A virtual disk: ``size`` bytes (a multiple of 512), kept in the raw image ``image``."""

    vm: str
    name: str
    size: int
    image: Path


@dataclass(frozen=True)
class Vm:
    name: str
    host: str
    disks: tuple[Disk, ...]


@dataclass(frozen=True)
class Host:
    name: str
    vms: tuple[str, ...]  # names of the VMs on this host, in file order


class DomainDisk(NamedTuple):
    disk_index: int  # inside the domain: the ``disk`` field of its write records
    vm: Vm
    disk: Disk


@dataclass(frozen=True)
class WorkloadSpec:
    """A workload named in the file: its kind and its options, as written (plus the
    default seed). Their meaning is the simulator's (``iofilter_sim.cluster``)."""

    kind: str
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class DomainSpec:
    """A protection domain: every disk of ``vms``, streamed to one DRVA.

    Invariant: ``disks[i].disk_index == i`` — indexes follow the VMs' and disks' file order.
    """

    name: str
    id: int
    drva: Endpoint
    vms: tuple[Vm, ...]
    workload: WorkloadSpec | None = None

    @property
    def disks(self) -> tuple[DomainDisk, ...]:
        pairs = [(vm, disk) for vm in self.vms for disk in vm.disks]
        return tuple(DomainDisk(i, vm, disk) for i, (vm, disk) in enumerate(pairs))

    @property
    def disk_sizes(self) -> tuple[int, ...]:
        return tuple(disk.size for vm in self.vms for disk in vm.disks)


@dataclass(frozen=True)
class Cluster:
    """A whole simulated site. Invariant: every name it refers to exists in it."""

    site: str
    state_dir: Path
    hosts: tuple[Host, ...]
    vms: tuple[Vm, ...]
    domains: tuple[DomainSpec, ...]
    source: str = "<cluster>"
    tls_ca: Path | None = None  # [tls] ca: connect to the DRVAs with TLS, trusting this CA only
    tls_server_name: str | None = None  # [tls] server_name

    def vm(self, name: str) -> Vm:
        return _by_name(self.vms, name, "VM", self.source)

    def host(self, name: str) -> Host:
        return _by_name(self.hosts, name, "host", self.source)

    def domain(self, name: str) -> DomainSpec:
        return _by_name(self.domains, name, "domain", self.source)

    @property
    def drvas(self) -> tuple[Endpoint, ...]:
        """Every DRVA some domain streams to, sorted."""
        return tuple(sorted({d.drva for d in self.domains}))

    def domains_of(self, drva: Endpoint) -> tuple[DomainSpec, ...]:
        return tuple(d for d in self.domains if d.drva == drva)


def _by_name(items: Sequence[Any], name: str, what: str, source: str) -> Any:
    for item in items:
        if item.name == name:
            return item
    raise ConfigError(f"{source}: no {what} named {name!r}")


def load_cluster(path: str | Path, *, state_dir: str | Path | None = None) -> Cluster:
    """Read and check a cluster file; ``state_dir`` overrides the file's."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the cluster file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_cluster(data, str(path), base_dir=path.parent, state_dir=state_dir)


def parse_cluster(data: Mapping[str, Any], source: str = "<cluster>", *,
                  base_dir: str | Path = ".", state_dir: str | Path | None = None) -> Cluster:
    """Check a parsed cluster file (see the module docstring) and build the ``Cluster``.

    ``source`` names the file in errors; a relative ``state_dir`` is relative to
    ``base_dir``; the ``state_dir`` argument, when given, overrides the file's.
    """
    r = TomlReader(source)
    r.table(data, "", {"site", "hosts"}, {"state_dir", "vms", "domains", "tls"})
    site = r.name(data["site"], "site")
    state = state_dir if state_dir is not None else data.get("state_dir", DEFAULT_STATE_DIR)
    if not isinstance(state, (str, Path)) or not str(state):
        r.fail("state_dir", "a directory path", state)
    r.file_path(str(state), "state_dir")
    state_path = Path(base_dir) / Path(state)
    host_names: list[str] = []
    for i, host in enumerate(r.list(data["hosts"], "hosts", nonempty=True)):
        r.table(host, f"hosts[{i}]", {"name"}, set())
        name = r.name(host["name"], f"hosts[{i}].name")
        r.unique(name, set(host_names), f"hosts[{i}].name", "host")
        host_names.append(name)
    vms = _vms(r, data.get("vms", []), set(host_names), state_path)
    hosts = tuple(Host(h, tuple(vm.name for vm in vms if vm.host == h)) for h in host_names)
    domains = _domains(r, data.get("domains", []), {vm.name: vm for vm in vms})
    _refuse_sidecar_clash(r, vms, domains)
    tls_ca, server_name = _tls(r, data["tls"], Path(base_dir)) if "tls" in data else (None, None)
    return Cluster(site, state_path, hosts, vms, domains, source, tls_ca, server_name)


def _tls(r: TomlReader, value: Any, base_dir: Path) -> tuple[Path, str | None]:
    t = r.table(value, "tls", {"ca"}, {"server_name"})
    if not isinstance(t["ca"], str) or not t["ca"]:
        r.fail("tls.ca", "the path of the site CA's certificate (PEM)", t["ca"])
    r.file_path(t["ca"], "tls.ca")  # a NUL ended the load in a traceback (cdp.tls)
    name = t.get("server_name")
    if name is not None and (not isinstance(name, str) or not SERVER_NAME.fullmatch(name)):
        r.fail("tls.server_name", SERVER_NAME_EXPECTED, name)
    return base_dir / t["ca"], name


def _vms(r: TomlReader, value: Any, hosts: set[str], state_dir: Path) -> tuple[Vm, ...]:
    vms: list[Vm] = []
    vm_names: set[str] = set()
    images: set[Path] = set()
    inodes: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) of an existing image -> its key path
    for i, vm in enumerate(r.list(value, "vms", nonempty=False)):
        at = f"vms[{i}]"
        r.table(vm, at, {"name", "host", "disks"}, set())
        name = r.name(vm["name"], f"{at}.name")
        r.unique(name, vm_names, f"{at}.name", "VM")
        host = r.name(vm["host"], f"{at}.host")
        if host not in hosts:
            r.fail(f"{at}.host", f"one of the hosts ({', '.join(sorted(hosts))})", host)
        disks: list[Disk] = []
        disk_names: set[str] = set()
        for j, disk in enumerate(r.list(vm["disks"], f"{at}.disks", nonempty=True)):
            dat = f"{at}.disks[{j}]"
            r.table(disk, dat, {"name", "size"}, {"image"})
            disk_name = r.name(disk["name"], f"{dat}.name")
            r.unique(disk_name, disk_names, f"{dat}.name", "disk")
            image = disk.get("image", image_file_name(name, disk_name))
            r.file_path(image, f"{dat}.image")
            path = state_dir / image
            if path.resolve() in images:
                r.fail(f"{dat}.image", "an image file no other disk uses", str(path))
            images.add(path.resolve())
            _refuse_same_file(r, path, f"{dat}.image", inodes)
            disks.append(Disk(name, disk_name, r.size(disk["size"], f"{dat}.size"), path))
        vms.append(Vm(name, host, tuple(disks)))
    return tuple(vms)


def _refuse_same_file(r: TomlReader, path: Path, at: str, inodes: dict[tuple[int, int], str]) -> None:
    """Refuse the image at ``path`` when it is, by device and inode, the file of another
    disk's image (``inodes``): two hard links pass the path comparison, and a write to
    one disk would show in the other. An image not there yet (made on first use) has no
    inode to compare; one that cannot be looked at is for the disk's open to report."""
    try:
        st = os.stat(path)
    except OSError:
        return
    key = (st.st_dev, st.st_ino)
    if key in inodes:
        r.fail(at, f"an image file no other disk uses ({inodes[key]} names the same file: a hard link)", str(path))
    inodes[key] = at


def sidecars(vms: Sequence[Vm], domains: Sequence[DomainSpec]) -> list[tuple[Disk, str | None, Path]]:
    """(disk, domain, path) of every sidecar file the filter writes beside the images:
    each disk's dirty-region map (domain None), each domain's spill journal (beside its
    first disk)."""
    out: list[tuple[Disk, str | None, Path]] = [(disk, None, _beside(disk.image, DIRTY_MAP_SUFFIX))
                                                for vm in vms for disk in vm.disks]
    for dom in domains:
        first = dom.vms[0].disks[0]  # a domain has a VM, a VM a disk
        out.append((first, dom.name, _beside(first.image, SPILL_SUFFIX)))
    return out


def sidecar_role(domain: str | None, image: str) -> str:
    """What a sidecar of ``sidecars`` is, for a message; ``image`` names the disk's image."""
    if domain is None:
        return f"the dirty-region map of {image}"
    return f"the spill journal of domain {domain}, beside {image}"


def _beside(image: Path, suffix: str) -> Path:
    return image.with_name(image.name + suffix)


def _refuse_sidecar_clash(r: TomlReader, vms: Sequence[Vm], domains: Sequence[DomainSpec]) -> None:
    """Refuse an image at another disk's sidecar file (``sidecars``), as written or after
    links, naming both disks: the filter of that disk's domain would rewrite and truncate
    the image (a map) or unlink it (a journal) when it starts. Looked up, not compared
    pairwise: a site may have thousands of disks."""
    images: dict[Path, str] = {}
    keys: dict[tuple[str, str], str] = {}  # (vm, disk) -> its key path
    for i, vm in enumerate(vms):
        for j, disk in enumerate(vm.disks):
            keys[(vm.name, disk.name)] = at = f"vms[{i}].disks[{j}]"
            images[Path(os.path.abspath(disk.image))] = images[disk.image.resolve()] = at
    for disk, domain, path in sidecars(vms, domains):
        at = images.get(Path(os.path.abspath(path))) or images.get(path.resolve())
        if at is not None:
            what = sidecar_role(domain, f"the image of disk {disk.name} of VM {disk.vm} ({keys[(disk.vm, disk.name)]})")
            r.fail(f"{at}.image", f"an image apart from {what}: the filter rewrites or replaces that file when the "
                                  f"domain starts", str(path))


def _domains(r: TomlReader, value: Any, vms: Mapping[str, Vm]) -> tuple[DomainSpec, ...]:
    domains: list[DomainSpec] = []
    names: set[str] = set()
    ids: dict[int, str] = {}
    owner: dict[str, str] = {}  # VM name -> domain that protects it
    for i, dom in enumerate(r.list(value, "domains", nonempty=False)):
        at = f"domains[{i}]"
        r.table(dom, at, {"name", "id", "drva", "vms"}, {"workload"})
        name = r.name(dom["name"], f"{at}.name")
        if name.isascii() and name.isdigit():
            # `cdp recover 7` means domain id 7: a domain named "7" would be another one.
            r.fail(f"{at}.name", "a domain name that is not a number (a number names a domain by its id)", name)
        r.unique(name, names, f"{at}.name", "domain")
        dom_id = r.u32(dom["id"], f"{at}.id")
        if dom_id in ids:
            r.fail(f"{at}.id", f"an id no other domain uses (domain {ids[dom_id]} has it)", dom_id)
        ids[dom_id] = name
        members: list[Vm] = []
        for j, vm_name in enumerate(r.list(dom["vms"], f"{at}.vms", nonempty=True)):
            path = f"{at}.vms[{j}]"
            if vm_name not in vms:
                r.fail(path, "the name of one of the [[vms]]", vm_name)
            if owner.get(vm_name) == name:
                r.fail(path, "a VM not listed twice", vm_name)
            if vm_name in owner:
                r.fail(path, f"a VM in no other domain (domain {owner[vm_name]} has it)", vm_name)
            owner[vm_name] = name
            members.append(vms[vm_name])
        _refuse_image_clash(r, at, members)
        workload = _workload(r, dom["workload"], f"{at}.workload", dom_id) if "workload" in dom else None
        domains.append(DomainSpec(name, dom_id, r.endpoint(dom["drva"], f"{at}.drva"),
                                  tuple(members), workload))
    return tuple(domains)


def _refuse_image_clash(r: TomlReader, at: str, members: list[Vm]) -> None:
    """Refuse a domain two of whose disks recover to one image file (``image_clash``):
    their images in the datastore may differ (``image =``), the recovered ones cannot."""
    disks = [(vm.name, disk.name) for vm in members for disk in vm.disks]
    clash = image_clash(disks)
    if clash is not None:
        (vm1, disk1), (vm2, disk2) = disks[clash[0]], disks[clash[1]]
        r.fail(f"{at}.vms", f"VMs whose disks each recover to an image of their own (<vm>-<disk>.img): "
                            f"disk {disk1} of VM {vm1} and disk {disk2} of VM {vm2} both make {clash[2]}",
               [vm.name for vm in members])


def _workload(r: TomlReader, table: Any, path: str, default_seed: int) -> WorkloadSpec:
    """The shape only: a table with a ``kind`` name and named options."""
    if not isinstance(table, Mapping):
        r.fail(path, "a table such as { kind = \"random\", rate_mb_s = 10 }", table)
    if "kind" not in table:
        r.fail(f"{path}.kind", "a workload kind")
    kind = table["kind"]
    if not isinstance(kind, str) or not NAME.fullmatch(kind):
        r.fail(f"{path}.kind", "a workload kind (a name)", kind)
    options = {k: v for k, v in table.items() if k != "kind"}
    for key in options:
        if not NAME.fullmatch(key):
            r.fail(path, "option names of 1..64 characters [A-Za-z0-9._-]", key)
    options.setdefault("seed", default_seed)
    return WorkloadSpec(kind, MappingProxyType(options))
