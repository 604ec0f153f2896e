"""The hypervisor driver: how a site's MSA powers its VMs on and off.

The MSA decides *which* domains' VMs run (``<state_dir>/power.json``, ``cdp power``,
failover); a driver makes it so and says how they are doing. The unit is the domain:
a protection domain is a consistency group whose writes share one sequence, so its
VMs start and stop together.

Drivers:

* ``simulator`` (``cdp.hypervisor.simulator``): one supervised ``iofilter-sim`` process
  per host, running the inventory workload of the domains whose VMs it hosts.

* ``nbd`` (``cdp.hypervisor.nbd``): the same host processes, serving each domain's disks
  as NBD exports to real block clients (QEMU, fio, the kernel) instead of workloads.

``open_hypervisor`` picks the one the site file's ``[hypervisor] driver`` names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cdp.inventory import DomainSpec


@dataclass(frozen=True)
class PowerView:
    """One powered-on domain, as its driver sees it. ``state``: ``starting``, ``up``,
    ``restarting`` (its host process exited and is restarted after a back-off),
    ``stopped``, ``not placed`` (its host's inventory or start failed: tried again)."""

    domain: str
    host: str
    state: str
    pid: int | None
    restarts: int
    last_error: str | None
    status: Mapping[str, Any] | None  # the driver's own figures (seqs, mode), when known

    def to_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "host": self.host, "state": self.state, "pid": self.pid,
                "restarts": self.restarts, "last_error": self.last_error,
                "status": dict(self.status) if self.status is not None else None}


@dataclass(frozen=True)
class VmsDown:
    """A powered-on domain whose VMs do not run (``Hypervisor.vms_not_up``). ``state``:
    its host's (``starting``, ``restarting``, ``stopped``), or ``not placed`` (its host's
    inventory or start failed: tried again after ``retry_in_s``); ``for_s``: how long."""

    domain: str
    host: str
    state: str
    for_s: float
    restarts: int
    last_exit: int | None
    last_error: str | None
    retry_in_s: float | None


class Hypervisor(Protocol):
    def check(self, domain: DomainSpec) -> None:
        """``ConfigError`` when ``domain``'s VMs could not run here (say why)."""

    def set_inventory(self, cfg: Any) -> None:
        """The site's inventory changed (a failover registered VMs); takes effect at the
        next ``apply``."""

    async def apply(self, powered: Sequence[str]) -> list[str]:
        """Run exactly the VMs of ``powered`` domains; return the domains (re)started."""

    async def pause(self, domain: str) -> Mapping[str, Any]:
        """Quiesce ``domain``'s running VMs: no new writes, their filter still connected
        (a final mark can be placed); returns once they stopped, with their figures."""

    def resume(self, domain: str) -> None:
        """Undo ``pause``: ``domain``'s VMs issue writes again (a quiesce that failed
        before it handed the domain over). Asks and returns; nothing if not paused."""

    async def step(self) -> None:
        """Supervise: restart what crashed, read what the VMs report."""

    async def stop_leftovers(self) -> None:
        """Stop what a killed daemon of this site left running of its VMs (the daemon
        calls it at start, before its first ``apply``); ``apply`` stops those of what it
        does not run."""

    async def stop_all(self) -> None:
        """Power everything off (the MSA is stopping); ``apply`` after it starts them again."""

    def views(self) -> list[PowerView]:
        """The powered domains, in ``apply`` order."""

    def vms_not_up(self) -> list[VmsDown]:
        """The powered domains whose VMs do not run (their host is not up, or could not be
        placed), with how long: what an alarm judges."""

    def last_run(self, domain: str) -> Mapping[str, Any] | None:
        """What ``domain``'s VMs reported when they last stopped (at least ``acked_seq``:
        the last write acknowledged), None when unknown."""


def open_hypervisor(cfg: Any, env: Mapping[str, str], **options: Any) -> Hypervisor:
    """The driver the site file names (``[hypervisor] driver``)."""
    if cfg.hypervisor.driver == "simulator":
        from cdp.hypervisor.simulator import SimulatorHypervisor

        return SimulatorHypervisor(cfg, env, **options)
    if cfg.hypervisor.driver == "nbd":
        from cdp.hypervisor.nbd import NbdHypervisor

        return NbdHypervisor(cfg, env, **options)
    raise AssertionError(cfg.hypervisor.driver)  # the site loader admits only the drivers above
