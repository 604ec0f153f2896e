"""Real block clients as the VMs: each host process serves its domains' disks over NBD.

The same supervised ``iofilter-sim run`` process per host as the simulator driver
(``cdp.hypervisor.simulator``: placement, restart with back-off, pause and resume, drain on stop,
status and marks files), started with ``--nbd-unix <state_dir>/hypervisor/<host>.nbd.sock``
(and ``--nbd HOST:PORT`` when the site's ``[hypervisor] nbd_listen`` asks for TCP; with
``--nbd-allow-remote`` when ``nbd_allow_remote`` lets that be an address other than loopback)
instead of workloads: every disk of a powered-on domain is the export ``vm/disk``, and
what QEMU, fio or a kernel NBD client writes there is captured and replicated — a FLUSH
returns once the DRVA holds every earlier write. Powering a domain off drops its
clients' connections; its exports come back when it is powered on. Only root and the
daemon's uid may connect to them, and on ``nbd_listen`` the users ``nbd_allow_users``
names (``--nbd-allow-user``: QEMU run by libvirt as ``libvirt-qemu``, say;
``cdp.nbd.peers``, FORMAT.md §17.6).

A domain needs no workload in the inventory here. The status view of a domain carries
where its exports are served (``nbd``: ``unix``, ``tcp``, ``exports``), read from the
host's status file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cdp.hypervisor import PowerView
from cdp.hypervisor.simulator import HostProcess, SimulatorHypervisor
from cdp.errors import ConfigError
from cdp.inventory import DomainSpec


class NbdHypervisor(SimulatorHypervisor):
    """See the module docstring."""

    def check(self, domain: DomainSpec) -> None:
        """Any domain can run: its VMs are whatever clients connect to its exports."""

    def socket_path(self, host: str) -> Path:
        return self.root / f"{host}.nbd.sock"

    def _vm_args(self, hp: HostProcess) -> tuple[str, ...]:
        spec = self.cfg.hypervisor
        tcp: tuple[str, ...] = ()
        if spec.nbd_listen:
            tcp = ("--nbd", spec.nbd_listen, *(("--nbd-allow-remote",) if spec.nbd_allow_remote else ()),
                   *(arg for user in spec.nbd_allow_users for arg in ("--nbd-allow-user", user)))
        return ("--nbd-unix", str(self.socket_path(hp.name)), *tcp)

    def views(self) -> list[PowerView]:
        out = []
        for view in super().views():
            hp = self.hosts.get(view.host)
            served = ((hp.status or {}).get("nbd") if hp is not None else None) or {}
            exports = {n: s for n, s in (served.get("exports") or {}).items()
                       if n.split("/", 1)[0] in self._vm_names(view.domain)}
            nbd: dict[str, Any] = {"unix": served.get("unix"), "tcp": served.get("tcp"), "exports": exports}
            out.append(PowerView(view.domain, view.host, view.state, view.pid, view.restarts, view.last_error,
                                 {**(view.status or {}), "nbd": nbd}))
        return out

    def _vm_names(self, domain: str) -> set[str]:
        try:
            return {vm.name for vm in self.cfg.domain(domain).vms}
        except ConfigError:  # a domain gone from the inventory: nothing to show
            return set()
