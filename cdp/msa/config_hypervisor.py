"""The site file's ``[hypervisor]`` table: how the MSA runs VMs (``cdp.hypervisor``),
where a failover may put them, and who may reach the nbd driver's disks over TCP
(docs/FORMAT.md §17.6). ``cdp.msa.config`` reads the rest of the site file."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cdp.errors import ConfigError
from cdp.nbd.address import parse_tcp
from cdp.nbd.peers import ALLOW_USERS_MAX, UID_MAX, UserRefused, overflow_uid, remote_listen_problem, written_uid
from cdp.tomlread import TomlReader

__all__ = ["HYPERVISOR_DRIVERS", "HypervisorSpec", "parse_hypervisor"]

HYPERVISOR_DRIVERS = ("simulator", "nbd")
VMS_PER_HOST_DEFAULT = 16
VMS_PER_HOST_RANGE = (1, 1024)
RECOVERED_WORKLOAD_DEFAULT: Mapping[str, Any] = {"kind": "random", "rate_mb_s": 1}


@dataclass(frozen=True)
class HypervisorSpec:
    """How the MSA runs VMs (``cdp.hypervisor``) and where a failover may put them."""

    driver: str = "simulator"
    on_demand_hosts: tuple[str, ...] = ()  # added to the inventory when a failover needs room
    vms_per_host: int = VMS_PER_HOST_DEFAULT  # a host with this many VMs has no room left
    recovered_workload: Mapping[str, Any] = field(  # what recovered VMs write (the simulator's options)
        default_factory=lambda: dict(RECOVERED_WORKLOAD_DEFAULT), hash=False)
    nbd_listen: str | None = None  # driver "nbd": also serve on TCP at HOST:PORT (port 0: any free one)
    # nbd_listen may be an address other than loopback: its clients cannot be identified,
    # so whoever reaches it reads and writes every disk (docs/FORMAT.md §17.6).
    nbd_allow_remote: bool = False
    # Users (names or uids, as written) let in on nbd_listen besides root and the daemon's
    # uid: QEMU run by libvirt as libvirt-qemu, say. Each host resolves them as it starts
    # (cdp.nbd.peers.resolve_users): reading the site file — at every failover's reload —
    # never waits on, or fails with, the host's user directory.
    nbd_allow_users: tuple[str, ...] = ()
    # Hosts hash the disks at each mark they place (marks.jsonl's sha256): a read of every
    # protected disk per mark, worth it where marks are checked against recoveries (tests,
    # drills), not on a site with large disks and frequent marks.
    mark_hashes: bool = True


def parse_hypervisor(r: TomlReader, value: Any) -> HypervisorSpec:
    """The site file's ``[hypervisor]`` table (every key optional)."""
    t = r.table(value, "hypervisor", set(), {"driver", "on_demand_hosts", "vms_per_host", "recovered_workload",
                                             "nbd_listen", "nbd_allow_remote", "nbd_allow_users", "mark_hashes"})
    driver = t.get("driver", "simulator")
    if driver not in HYPERVISOR_DRIVERS:
        r.fail("hypervisor.driver", f"one of {', '.join(HYPERVISOR_DRIVERS)}", driver)
    hosts: list[str] = []
    for i, h in enumerate(r.list(t.get("on_demand_hosts", []), "hypervisor.on_demand_hosts", nonempty=False)):
        name = r.name(h, f"hypervisor.on_demand_hosts[{i}]")
        r.unique(name, set(hosts), f"hypervisor.on_demand_hosts[{i}]", "on-demand host")
        hosts.append(name)
    vms_per_host = r.integer(t.get("vms_per_host", VMS_PER_HOST_DEFAULT), "hypervisor.vms_per_host",
                             *VMS_PER_HOST_RANGE)
    workload = t.get("recovered_workload", RECOVERED_WORKLOAD_DEFAULT)
    # The options are the simulator's: it checks them (cdp.hypervisor.simulator).
    r.table(workload, "hypervisor.recovered_workload", {"kind"}, set(workload) - {"kind"}
            if isinstance(workload, Mapping) else set())
    nbd_listen, nbd_allow_remote = _nbd_listen(r, t, driver)
    nbd_allow_users = _nbd_allow_users(r, t, nbd_listen)
    mark_hashes = t.get("mark_hashes", True)
    if not isinstance(mark_hashes, bool):
        r.fail("hypervisor.mark_hashes", "true or false", mark_hashes)
    return HypervisorSpec(driver, tuple(hosts), vms_per_host, dict(workload), nbd_listen=nbd_listen,
                          nbd_allow_remote=nbd_allow_remote, nbd_allow_users=nbd_allow_users, mark_hashes=mark_hashes)


def _nbd_listen(r: TomlReader, t: Mapping, driver: str) -> tuple[str | None, bool]:
    """``[hypervisor] nbd_listen`` and ``nbd_allow_remote``: a TCP address for the nbd
    driver, loopback unless the second says that anyone who reaches it may connect."""
    nbd_listen = t.get("nbd_listen")
    allow_remote = t.get("nbd_allow_remote", False)
    if not isinstance(allow_remote, bool):
        r.fail("hypervisor.nbd_allow_remote", "true or false", allow_remote)
    if allow_remote and nbd_listen is None:
        r.fail("hypervisor.nbd_allow_remote", "nothing unless nbd_listen is set (a Unix socket is never remote)",
               allow_remote)
    if nbd_listen is None:
        return None, False
    if driver != "nbd":
        r.fail("hypervisor.nbd_listen", 'nothing unless driver = "nbd"', nbd_listen)
    try:
        host, _ = parse_tcp(nbd_listen if isinstance(nbd_listen, str) else "")
    except ConfigError:
        r.fail("hypervisor.nbd_listen", "HOST:PORT (port 0: any free one)", nbd_listen)
    if (why := remote_listen_problem(host, allow_remote, "[hypervisor] nbd_allow_remote = true")) is not None:
        r.fail("hypervisor.nbd_listen", f"a loopback address (127.0.0.1, ::1 or localhost): {why}", nbd_listen)
    return nbd_listen, allow_remote


#: A user name as ``useradd`` takes it (and a trailing $, Samba's machine accounts).
USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")


def _nbd_allow_users(r: TomlReader, t: Mapping, nbd_listen: str | None) -> tuple[str, ...]:
    """``[hypervisor] nbd_allow_users``: users (names, or uids as integers or ASCII digits)
    who may connect to ``nbd_listen`` besides root and the daemon's uid, as written (uids
    as digits): each host looks them up as it starts, not this file's every read."""
    users = t.get("nbd_allow_users")
    if users is None:
        return ()
    key = "hypervisor.nbd_allow_users"
    if nbd_listen is None:
        r.fail(key, "nothing unless nbd_listen is set (the Unix socket is root's and the daemon's alone)", users)
    out: list[str] = []
    overflow = overflow_uid()
    for i, user in enumerate(r.list(users, key, nonempty=False)):
        if isinstance(user, int) and not isinstance(user, bool):
            user = str(user) if user >= 0 else ""
        if not isinstance(user, str):
            user = ""
        try:
            if written_uid(user, overflow) is None and not USER_NAME.fullmatch(user):
                raise UserRefused(f"a user name or a uid of 0..{UID_MAX}")
        except UserRefused as e:
            r.fail(f"{key}[{i}]", str(e), users[i])
        out.append(user)
    if len(set(out)) > ALLOW_USERS_MAX:
        r.fail(key, f"at most {ALLOW_USERS_MAX} users", f"{len(set(out))} users")
    return tuple(out)
