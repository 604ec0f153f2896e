"""The simulator as a hypervisor: one supervised ``iofilter-sim run`` process per host.

A powered-on domain runs on its *home host*, the host of its first VM: the simulator
numbers a domain's writes in one filter (one sequence per consistency group), so one
process holds all of them even when the inventory spreads the VMs over hosts. For each
host with powered-on domains the driver writes ``<state_dir>/hypervisor/<host>.toml``
— an inventory of just those domains, images as absolute paths in the site's datastore
— and keeps ``python -m iofilter_sim run`` on it running (``cdp.msa.keeper``: logs in
``<state_dir>/logs/host-<host>.log``, restarts with a back-off). The process rewrites
``<host>.status.json`` twice a second (each domain's captured and acked seq, mode) and
appends each mark, with the primaries' sha256 at it, to ``<host>.marks.jsonl``.
``pause`` (a planned failover's quiesce) lists domains in ``<host>.control.json`` and
sends SIGUSR1: their workloads stop issuing writes, their filters stay connected;
``resume`` (a quiesce that failed before its handover) drops them from it the same way.
The signal goes only to a host that is ``up`` (it wrote its first status, after it
installed its handler; the default action of SIGUSR1 kills a process): one still
starting reads the file as it starts, and is signalled anyway once up. A
domain the site registered as isolated (a test failover's copy) runs with
``--isolated``: its VMs write their disks and nothing else. With the site's ``[tls]``
on, the host inventory names the site CA (``[tls] ca``): the filters connect to the
DRVAs with TLS only.

A host whose set of domains changes is restarted: SIGTERM makes the simulator stop its
workloads and drain (every captured write acked) before it exits, so the domains that
stay on it continue on the DRVA's sequence (the filter waits for its WELCOME). A host
killed outright loses what it had captured and not yet sent — a crashed host's VMs
lose their in-flight writes too.

A full or read-only state directory stops no VM for good. The new inventory is written
before the host running the old set is stopped: one that cannot be written leaves those
VMs running, ``apply`` raises the first such error after trying every host, and
``step`` places the host again after a back-off (the keeper's). The control file is
written inside the keeper's start (``spawn``'s ``prepare``): a start that fails is
retried after the back-off, as a crash is. ``vms_not_up`` lists the powered domains
whose VMs do not run (for the alarms). Before, a host killed while the directory was
full, or restarted for a power change then, stayed down with nothing left to restart it.

A daemon that was killed leaves its host processes running (each leads its own session).
``stop_leftovers`` stops every one of them at the next daemon's start, before its first
``apply`` — found as ``cdp uninstall`` finds them (``cdp.msa.processes.find_leftovers``:
``logs/host-*.pid`` by pid and start time, then command lines) — and ``apply`` stops
those of the hosts it does not run: else a domain that must stay off here (it failed
over to the other site meanwhile) ran on, on both sites.

Host processes get an allow-listed environment (``host_env``): what the interpreter
needs, the variables iofilter-sim reads and the site secret. They never open the store,
so none of its credentials.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp import site_files
from cdp.durable import atomic_write
from cdp.errors import CdpError, ConfigError
from cdp.hypervisor import PowerView, VmsDown
from cdp.inventory import DomainSpec
from cdp.logs import get_logger
from cdp.msa.install_dirs import dir_problem, ensure_dir
from cdp.msa.keeper import (
    STATUS_BYTES_MAX, Kept, ProcessKeeper, _leftover, find_leftovers, read_pid_file, send_signal, stop_leftovers,
)
from cdp.small_file import NotRegularFile, read_small_file

log = get_logger("cdp.hypervisor.simulator")

SIM_SECRET_ENV = "CDP_SITE_SECRET"  # where iofilter-sim reads the handshake secret
DRAIN_STOP_TIMEOUT_S = 60.0  # a host draining longer than this is killed (its DRVA is gone)
PAUSE_WAIT_S = 10.0  # a paused domain's loop notices within one batch
#: What a host process keeps of the daemon's environment (``host_env``), by name and by
#: prefix: what the interpreter needs to run, what iofilter-sim reads (its log level,
#: its event loop), and coverage's measuring of subprocesses (``pytest --cov``). Nothing
#: else: a host never opens the store (no AWS_*, AZURE_*, CDP_STORE_KEY*), nor the API.
HOST_ENV_NAMES = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH",
                            "CDP_LOG_LEVEL", "CDP_NO_UVLOOP"})
HOST_ENV_PREFIXES = ("LC_", "PYTHON", "COVERAGE_", "COV_CORE_")


def host_args(inventory_path: Path) -> tuple[str, ...]:
    """How a host process's arguments after the interpreter begin (``cdp uninstall``
    finds one a killed daemon left running by them)."""
    return ("-m", "iofilter_sim", "run", str(inventory_path))


def host_env(cfg: Any, env: Mapping[str, str]) -> dict[str, str]:
    """The environment of ``cfg``'s host processes, from the daemon's ``env``: the
    allow-listed variables (``HOST_ENV_NAMES``, ``HOST_ENV_PREFIXES``) and the site
    secret under the name iofilter-sim reads. ``ConfigError`` without the secret."""
    kept = {k: v for k, v in cfg.child_env(env).items() if k in HOST_ENV_NAMES or k.startswith(HOST_ENV_PREFIXES)}
    kept[SIM_SECRET_ENV] = cfg.secret(env).decode()
    return kept


@dataclass(kw_only=True)
class HostProcess(Kept):
    domains: tuple[str, ...]
    inventory_path: Path
    status_path: Path
    marks_log: Path
    control_path: Path
    # The control file changed while the process was not up yet: it is signalled once up
    # (it may have read the file before the change).
    control_unsent: bool = False
    # The control file could not be rewritten (a full state directory): ``step`` tries again.
    control_unwritten: bool = False


@dataclass
class Unplaced:
    """A host whose domains could not be placed on it (its inventory not written, or its
    process not started): ``step`` tries again at ``retry_at`` (the keeper's clock)."""

    domains: tuple[str, ...]
    error: str
    since: float
    retry_at: float
    backoff_s: float


class SimulatorHypervisor:
    """See the module docstring. ``cfg`` is the site (``cdp.msa.config.SiteConfig``)."""

    def __init__(self, cfg: Any, env: Mapping[str, str], *, clock: Callable[[], float] = time.monotonic,
                 **keeper_options: Any) -> None:
        self.cfg = cfg
        keeper_options.setdefault("stop_timeout_s", DRAIN_STOP_TIMEOUT_S)
        self.keeper = ProcessKeeper("host", host_env(cfg, env), clock, **keeper_options)
        self.hosts: dict[str, HostProcess] = {}
        self.root = cfg.state_dir / "hypervisor"
        self.stopped: dict[str, dict[str, Any]] = {}  # domain -> its figures when its host last stopped
        self.paused: set[str] = set()  # powered-on domains whose VMs issue no writes (quiesced)
        self.wanted: dict[str, tuple[str, ...]] = {}  # host -> its domains, as the last apply placed them
        self.unplaced: dict[str, Unplaced] = {}  # hosts whose placement failed, to try again
        # Held by what starts and stops host processes (apply, step, stop_all,
        # stop_leftovers): a crashed host that step() restarted while apply() stopped it
        # ran on, held by no one.
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ what runs where

    def set_inventory(self, cfg: Any) -> None:
        self.cfg = cfg

    def home_host(self, domain: DomainSpec) -> str:
        return domain.vms[0].host

    def check(self, domain: DomainSpec) -> None:
        from iofilter_sim.cluster import check_workloads

        if domain.workload is None:
            raise ConfigError(f"domain {domain.name}: no workload in {self.cfg.cluster_path.name}: the simulator "
                              f"has nothing for its VMs to run")
        check_workloads(_only(self.cfg.cluster, [domain]))

    def placement(self, powered: Sequence[str]) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {}
        for name in powered:
            out.setdefault(self.home_host(self.cfg.domain(name)), []).append(name)
        return {host: tuple(sorted(doms)) for host, doms in out.items()}

    async def apply(self, powered: Sequence[str]) -> list[str]:
        async with self._lock:
            return await self._apply(powered)

    async def _apply(self, powered: Sequence[str]) -> list[str]:
        """Place ``powered``; the first error of a host that could not be placed is raised
        once every host was tried (``step`` tries that one again)."""
        self.paused &= set(powered)  # a domain powered off is no longer paused
        wanted = self.placement(powered)
        self.wanted = wanted
        for host in [h for h in self.unplaced if h not in wanted]:
            del self.unplaced[host]
        started: list[str] = []
        for host in [h for h in self.hosts if h not in wanted]:
            hp = self.hosts.pop(host)
            log.info("host_powered_off", host=host, domains=list(hp.domains))
            await self._stop(hp)
        # A host a killed daemon left running that this one does not run: its VMs must be
        # off (a wanted host's leftover is stopped when its new process is spawned).
        await self._stop_leftovers(self.known_hosts() - set(wanted))
        errors: list[Exception] = []
        for host, domains in wanted.items():
            hp = self.hosts.get(host)
            if hp is not None and hp.domains == domains and hp.state != "stopped" and host not in self.unplaced:
                continue
            try:
                await self._place(host, domains)
            except Exception as exc:  # logged by _place; the other hosts are placed all the same
                errors.append(exc)
                continue
            started += list(domains)
        if errors:
            raise errors[0]
        return started

    async def _place(self, host: str, domains: tuple[str, ...]) -> None:
        """Run exactly ``domains`` on ``host``. The new inventory is written first, and only
        then is the process running the old set stopped: an inventory that cannot be
        written (a full state directory) leaves those VMs running. A failure is logged
        and raised, and ``step`` tries again after a back-off (``unplaced``)."""
        hp = self.hosts.get(host)
        try:
            # A copy naming the new set: the running process's record keeps the old one
            # until it is stopped (``_stop`` keeps those domains' last figures).
            self._write_inventory(dataclasses.replace(hp, domains=domains) if hp else self._new(host, domains))
            if hp is not None:
                await self._stop(hp)
            hp = hp or self._new(host, domains)
            hp.domains = domains
            self.hosts[host] = hp
            await self._start(hp)
        except Exception as exc:
            self._place_failed(host, domains, exc)
            raise
        self.unplaced.pop(host, None)

    def _place_failed(self, host: str, domains: tuple[str, ...], exc: Exception) -> None:
        """Remember that ``host`` is to be placed again, after a back-off doubling from the
        keeper's first step to its last."""
        now = self.keeper.clock()
        was = self.unplaced.get(host)
        backoff = self.keeper.backoff_first_s if was is None else min(self.keeper.backoff_max_s, was.backoff_s * 2)
        error = (exc.message if isinstance(exc, CdpError) else str(exc))[:400]
        self.unplaced[host] = Unplaced(domains, error, was.since if was else now, now + backoff, backoff)
        log.error("host_place_failed", host=host, domains=list(domains), error=error, retry_in_s=backoff)

    async def _place_again(self) -> None:
        """Place again the hosts whose placement failed, once their back-off is over."""
        for host, failed in list(self.unplaced.items()):
            if self.keeper.clock() < failed.retry_at or self.wanted.get(host) != failed.domains:
                continue
            try:
                await self._place(host, failed.domains)
            except Exception:  # logged, and tried again later
                continue
            log.info("host_placed", host=host, domains=list(failed.domains))

    def _new(self, host: str, domains: tuple[str, ...]) -> HostProcess:
        return HostProcess(name=host, log_path=self.cfg.state_dir / "logs" / f"host-{host}.log", domains=domains,
                           inventory_path=self.root / f"{host}.toml", status_path=self.root / f"{host}.status.json",
                           marks_log=self.root / f"{host}.marks.jsonl", control_path=self.root / f"{host}.control.json",
                           backoff_s=self.keeper.backoff_first_s)

    def _write_inventory(self, hp: HostProcess) -> None:
        cluster = self.cfg.cluster
        specs = [self.cfg.domain(d) for d in hp.domains]
        vms = [vm for d in specs for vm in d.vms]
        doc = site_files.inventory(
            cluster.site, sorted({vm.host for vm in vms}),
            [site_files.vm(vm.name, vm.host, [(d.name, d.size, d.image) for d in vm.disks]) for vm in vms],
            [site_files.domain(d.name, d.id, str(d.drva), [vm.name for vm in d.vms],
                               {"kind": d.workload.kind, **d.workload.options} if d.workload else None)
             for d in specs],
            state_dir=cluster.state_dir.resolve(),
            # [tls] on: the filters reach the DRVAs over TLS, trusting the site CA only.
            tls={"ca": self.cfg.tls.ca_cert.resolve()} if self.cfg.tls is not None else None)
        # 0755 under any umask: the host process's control and status files are read here.
        ensure_dir(self.cfg, "state_dir", self.root, "the daemon writes its hosts' inventories")
        _write_file(hp.inventory_path, site_files.toml_text(doc).encode(), "host inventory")

    def _write_control(self, hp: HostProcess) -> None:
        doc = {"pause": sorted(self.paused & set(hp.domains))}
        _write_file(hp.control_path, json.dumps(doc).encode(), "host control file")
        hp.control_unwritten = False

    async def _start(self, hp: HostProcess) -> None:
        hp.status = None
        hp.control_unsent = False  # the new process reads the file as it starts
        for domain in hp.domains:  # a new run: the last one's figures say nothing of it
            self.stopped.pop(domain, None)
        isolated = [a for d in hp.domains if d in self.cfg.isolated for a in ("--isolated", d)]
        # The control file is written inside the keeper's error handling: one that cannot
        # be written is a failed start, tried again after the back-off.
        await self.keeper.spawn(hp, (*host_args(hp.inventory_path), "--status",
                                     str(hp.status_path), "--marks-log", str(hp.marks_log), "--control",
                                     str(hp.control_path), "--no-hashes", *isolated,
                                     *(() if self.cfg.hypervisor.mark_hashes else ("--no-mark-hashes",)),
                                     *self._vm_args(hp)),
                                prepare=lambda: self._write_control(hp), domains=list(hp.domains))

    def _vm_args(self, hp: HostProcess) -> tuple[str, ...]:
        """What the host's VMs do: here, each domain's workload from the inventory."""
        return ()

    async def pause(self, domain: str, timeout_s: float = PAUSE_WAIT_S) -> dict[str, Any]:
        """Make ``domain``'s VMs stop issuing writes (their filter stays connected) and
        wait until they did; their figures then (``captured_seq``...)."""
        hp = next((h for h in self.hosts.values() if domain in h.domains and h.proc is not None), None)
        if hp is None:
            raise CdpError(f"domain {domain}: its VMs are not running here")
        self.paused.add(domain)
        self._write_control(hp)
        asked = time.time()
        self._tell_control(hp)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.keeper.read_status(hp)
            self._flush_control(hp)  # it may have come up meanwhile
            st = hp.status or {}
            if domain in (st.get("paused") or []) and float(st.get("time") or 0) > asked:
                return dict((st.get("domains") or {}).get(domain) or {})
            await asyncio.sleep(0.05)
        raise CdpError(f"domain {domain}: its VMs on host {hp.name} did not stop writing within {timeout_s:g} s "
                       f"(see {hp.log_path})")

    def resume(self, domain: str) -> None:
        """Let ``domain``'s VMs write again after ``pause``: dropped from the control file,
        and the host told (SIGUSR1). A host not running starts unpaused (``_start``
        writes the control file); a power-off also ends a pause (``apply``)."""
        if domain not in self.paused:
            return
        self.paused.discard(domain)
        hp = next((h for h in self.hosts.values() if domain in h.domains), None)
        if hp is None:
            return
        try:
            self._write_control(hp)
        except OSError as exc:  # its VMs stay paused until step() can write it
            hp.control_unwritten = True
            log.error("domain_resume_delayed", domain=domain, host=hp.name, error=str(exc))
            return
        self._tell_control(hp)
        log.info("domain_resumed", domain=domain, host=hp.name)

    def _rewrite_control(self, hp: HostProcess) -> None:
        """Write the control file a ``resume`` could not, and tell the host."""
        if not hp.control_unwritten:
            return
        try:
            self._write_control(hp)
        except OSError:
            return  # logged by resume; tried again at the next step
        self._tell_control(hp)
        log.info("domain_resumed", host=hp.name, domains=sorted(set(hp.domains) - self.paused))

    def _tell_control(self, hp: HostProcess) -> None:
        """Make the host re-read its control file (SIGUSR1), once it is up: its handler is
        installed before its first status, and the signal's default action kills it. One
        not up yet is told when it is (``_flush_control``): it may have read the file
        before this change."""
        hp.control_unsent = True
        self._flush_control(hp)

    def _flush_control(self, hp: HostProcess) -> None:
        """Send the SIGUSR1 ``_tell_control`` kept back, if the host is up now."""
        if hp.control_unsent and hp.proc is not None and hp.state == "up":
            send_signal(hp.proc, signal.SIGUSR1)
            hp.control_unsent = False

    async def _stop(self, hp: HostProcess) -> None:
        """Stop the host (its simulator drains first) and keep what it said last: the
        process rewrites its status once more after the drain."""
        pid = hp.proc.pid if hp.proc is not None else None
        await self.keeper.stop(hp)
        hp.status = None
        try:
            raw = read_small_file(hp.status_path, STATUS_BYTES_MAX)[0]
            doc = json.loads(raw) if len(raw) <= STATUS_BYTES_MAX else None
        except (OSError, NotRegularFile, ValueError, RecursionError):
            return
        if isinstance(doc, dict) and pid is not None and doc.get("pid") == pid:
            for name, figures in (doc.get("domains") or {}).items():
                if name in hp.domains and isinstance(figures, dict):
                    self.stopped[name] = figures

    def last_run(self, domain: str) -> dict[str, Any] | None:
        """What the domain's VMs reported when their host last stopped (``acked_seq``...)."""
        return self.stopped.get(domain)

    # ------------------------------------------------------------------ supervision

    async def step(self) -> None:
        async with self._lock:
            await self._place_again()
            for hp in list(self.hosts.values()):
                if await self.keeper.tend(hp, self._start):
                    log.info("host_up", host=hp.name, pid=hp.proc.pid, domains=list(hp.domains))
                self._rewrite_control(hp)
                self._flush_control(hp)

    async def stop_all(self) -> None:
        """Stop every host, each whatever the one before did; the first error is raised at
        the end."""
        async with self._lock:
            self.wanted, self.unplaced = {}, {}  # nothing is placed again after this
            errors = []
            for hp in self.hosts.values():
                try:
                    await self._stop(hp)
                except Exception as exc:
                    log.error("host_stop_failed", host=hp.name, error=str(exc))
                    errors.append(exc)
            if errors:
                raise errors[0]

    # ------------------------------------------------------------------ leftovers

    def known_hosts(self) -> set[str]:
        """Every host a process of this site may have run for: the inventory's (with the
        registered ones), the on-demand ones, and any with an inventory file here (a
        registration removed since)."""
        hosts = {h.name for h in self.cfg.cluster.hosts} | set(self.cfg.hypervisor.on_demand_hosts)
        try:
            hosts |= {p.name.removesuffix(".toml") for p in self.root.iterdir()
                      if p.name.endswith(".toml") and not p.name.startswith(".")}
        except OSError:  # no directory yet: no host ever ran
            pass
        return hosts

    async def stop_leftovers(self) -> None:
        """Stop every host process a killed daemon of this site left running (module
        docstring). The daemon calls it at start, before its first ``apply``."""
        async with self._lock:
            await self._stop_leftovers(self.known_hosts())

    async def _stop_leftovers(self, hosts: Collection[str]) -> None:
        """Stop the leftovers of ``hosts`` (by their pid files ``logs/host-<host>.pid`` and
        their command lines), never a process this driver runs: SIGTERM (the filters
        drain), SIGKILL after the stop timeout. One that outlives SIGKILL is logged."""
        if not hosts:
            return
        logs = self.cfg.state_dir / "logs"
        if (problem := dir_problem(logs)) is not None:  # anyone could name any process in a pid file there
            log.error("host_leftovers_not_looked_for", dir=str(logs), problem=problem)
            return
        names = {f"host-{h}.pid" for h in hosts}
        prefixes = [host_args(self.root / f"{h}.toml") for h in sorted(hosts)]
        ours = {hp.proc.pid for hp in self.hosts.values() if hp.proc is not None}
        found = await asyncio.to_thread(find_leftovers, logs, "host-*.pid", prefixes, names=names)
        found = [one for one in found if one.pid not in ours]
        if not found:
            return
        log.warning("host_leftovers_stopping", pids=[one.pid for one in found], hosts=sorted(hosts))
        for why in await stop_leftovers(found, self.keeper.stop_timeout_s):
            log.error("host_leftover_survived", error=why)
        for name in names:  # a file naming no running process (they are gone now) goes
            await asyncio.to_thread(_remove_stale_pid_file, logs / name)

    def views(self) -> list[PowerView]:
        """The domains of the hosts, then those whose host could not be placed
        (``not placed``, its last error)."""
        out = []
        for hp in self.hosts.values():
            for d in hp.domains:
                status = ((hp.status or {}).get("domains") or {}).get(d)
                out.append(PowerView(d, hp.name, hp.state, hp.proc.pid if hp.proc else None, hp.restarts,
                                     hp.last_error, status if isinstance(status, dict) else None))
        shown = {v.domain for v in out}
        for host, failed in self.unplaced.items():
            out += [PowerView(d, host, "not placed", None, 0, failed.error, None) for d in failed.domains
                    if d not in shown]
        return out

    def vms_not_up(self) -> list[VmsDown]:
        """Every powered domain (as the last ``apply`` placed them) whose VMs do not run:
        its host not ``up``, or not placed (its inventory or start failed: ``not
        placed``). For the alarms; how long is ``for_s``, on the keeper's clock."""
        now = self.keeper.clock()
        out = []
        for host, domains in self.wanted.items():
            hp = self.hosts.get(host)
            failed = self.unplaced.get(host)
            for d in domains:
                if hp is not None and d in hp.domains and hp.state == "up":
                    continue
                if hp is not None and d in hp.domains and (failed is None or hp.state != "stopped"):
                    out.append(VmsDown(d, host, hp.state, max(0.0, now - hp.state_since), hp.restarts, hp.last_exit,
                                       hp.last_error, None if hp.restart_at is None else max(0.0, hp.restart_at - now)))
                elif failed is not None:
                    out.append(VmsDown(d, host, "not placed", max(0.0, now - failed.since), 0, None, failed.error,
                                       max(0.0, failed.retry_at - now)))
        return out

    def marks(self, domain: str) -> list[dict[str, Any]]:
        """The marks the domain's host process recorded (with the primaries' sha256)."""
        hp = next((h for h in self.hosts.values() if domain in h.domains), None)
        if hp is None:
            return []
        try:
            lines = hp.marks_log.read_text().splitlines()
        except OSError:
            return []
        return [m for m in map(_json_line, lines) if isinstance(m, dict) and m.get("domain") == domain]


def _write_file(path: Path, data: bytes, what: str) -> None:
    """``atomic_write``, its ``OSError`` naming ``path`` and what it is (a failed write
    names no file, or the temporary one)."""
    try:
        atomic_write(path, data)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write the {what}: {exc.strerror or exc}", str(path)) from exc


def _remove_stale_pid_file(path: Path) -> None:
    """Remove ``path`` when it names no running process (``processes._leftover``); a file
    that is not one we wrote is left alone, as the keeper leaves it."""
    try:
        if read_pid_file(path) is not None and _leftover(path) is None:
            path.unlink(missing_ok=True)
    except (OSError, ValueError):
        pass


def _json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None  # a torn last line


def _only(cluster: Any, domains: Sequence[DomainSpec]) -> Any:
    from dataclasses import replace

    return replace(cluster, domains=tuple(domains))
