"""``cdp daemon``: the MSA — the protection service of one site.

One process, a few long-lived tasks around it:

* the **supervisor** (``cdp.msa.supervisor``) keeps one DRVA subprocess per DRVA that
  serves protected domains (``<state_dir>/protection.json``), restarting crashed ones;
* the **hypervisor** driver (``cdp.hypervisor``) runs the VMs of ``<state_dir>/power.json``;
* the **standby keeper** (``cdp.msa.standby``) keeps the ``[[standby]]`` domains warm;
* the **alarm loop** reads the DRVAs' statuses every second, raises and clears alarms
  (``cdp.msa.alarms``), measures throughput and keeps an hour of samples for the
  console's charts (``cdp.msa.history``);
* the **consolidation scheduler** starts a ``consolidate`` job per protected domain every
  ``consolidate_every`` of its policy (not while one of that domain runs);
* the **pruner** deletes job records older than ``[jobs] retention_days``, daily;
* the **REST API** (``cdp.msa.api``) on ``[api] listen``, with ``/metrics`` and the web
  console at ``/`` (``cdp.msa.console``).

``<state_dir>/msa.pid`` holds the daemon's pid and start time while it runs (FORMAT.md
§13.3: ``cdp uninstall`` sends SIGTERM to that process, and only to it); a second daemon
for the same state directory refuses to start, while a file naming a process that is
gone, or another process that got the pid later, is stale and replaced. SIGTERM and
SIGINT stop it in order: API, jobs (recorded as cancelled), VMs, standbys, DRVAs
(SIGTERM, then SIGKILL), pid file — each step whatever the one before did (a read-only
state directory once ended the stop at the VMs, its DRVAs left running).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from cdp.errors import Busy, CdpError, ConfigError
from cdp.hypervisor import open_hypervisor
from cdp.logs import get_logger
from cdp.msa import operations
from cdp.msa.alarms import AlarmEvaluator, CertificateWatch
from cdp.msa.config import Policy, PolicyChange, SiteConfig
from cdp.msa.daemon_claim import DaemonClaim
from cdp.msa.history import StatusHistory
from cdp.msa.http_limits import ApiLimits
from cdp.msa.jobs import Job, JobStore
from cdp.msa.power import load_power, save_power
from cdp.msa.metrics import MetricsSnapshot, MsaMetrics
from cdp.msa.power_refusals import half_failed_back, handing_over
from cdp.msa.protection import load_protection, save_protection
from cdp.msa.state_fs import StateUnwritable
from cdp.msa.runner import JobRunner, acting_claim, quiesce_claim
from cdp.msa.standby import StandbyKeeper
from cdp.msa.status_doc import domains_of
from cdp.msa.supervisor import STEP_INTERVAL_S, Supervisor
from cdp.msa.throughput import Throughput
from cdp.store.open import redact_url
from drva.requests import write_unprotect_request

log = get_logger("cdp.msa.daemon")

ALARM_INTERVAL_S = 1.0
SCHEDULE_INTERVAL_S = 1.0
PRUNE_INTERVAL_S = 3600.0
JOBS_PRUNE_EVERY_S = 86400.0
SERVE_TIMEOUT_S = 60.0  # a protect job waits this long for its DRVA to serve the domain
#: Each job kind's timeout (run_job cancels it after this).
JOB_TIMEOUT_S = {"protect": 120.0, "mark": 120.0, "preflight": 600.0, "verify": 6 * 3600.0,
                 "consolidate": 6 * 3600.0, "recover": 24 * 3600.0, "failover": 24 * 3600.0, "quiesce": 300.0,
                 "failback": 24 * 3600.0}
OWNER_CHECK_EVERY_S = 30.0  # a fenced domain's catalog is read this often to say who owns it


class MsaDaemon:
    """The running service (see the module docstring). ``start``/``stop`` for tests and
    ``run_daemon``; the API handlers call the public methods."""

    def __init__(self, cfg: SiteConfig, env: Mapping[str, str] = os.environ, *,
                 supervisor_options: Mapping[str, Any] | None = None,
                 alarm_options: Mapping[str, Any] | None = None, api_limits: ApiLimits = ApiLimits(),
                 hypervisor_options: Mapping[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.api_limits = api_limits
        self.env = dict(env)
        self.token = cfg.api_token(env)  # refuse to start an API nobody can call
        self.jobs = JobStore(cfg.state_dir / "jobs", cfg.jobs_retention_s)
        self.runner = JobRunner(self.jobs)
        self.supervisor = Supervisor(cfg, env, **(supervisor_options or {}))
        self.hypervisor = open_hypervisor(cfg, env, **(hypervisor_options or {}))
        self.standby = StandbyKeeper(cfg, env)
        self.powered: list[str] = []  # the domains whose VMs run here (<state_dir>/power.json)
        # Domains whose current timeline another site owns (they failed over there), with
        # when that was last read from the store.
        self.failed_over: dict[str, dict[str, Any]] = {}
        self._owner_checked: dict[str, float] = {}
        self._power_lock = asyncio.Lock()
        self.alarms = AlarmEvaluator(cfg.alarms, **(alarm_options or {}))
        self.certificates = CertificateWatch(cfg.tls, cfg.drvas)  # what certificate_expiring judges
        self.metrics = MsaMetrics(self.metrics_snapshot)
        self.throughput = Throughput()
        self.history = StatusHistory()  # what the console charts (GET /v1/domains/{name}/history)
        self.protection: dict[str, Policy] = {}
        self.claim = DaemonClaim(cfg.state_dir)  # msa.lock and msa.pid (FORMAT.md §13.3)
        self.started_ns = 0
        self._protection_lock = asyncio.Lock()
        self._next_consolidation: dict[str, float] = {}
        self._pruned_at = time.monotonic()  # start() prunes once itself
        self._tasks: list[asyncio.Task] = []
        self._api: Any = None  # aiohttp AppRunner

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        from cdp.msa.api import start_api
        from cdp.msa.install_dirs import ensure_dir, ensure_state_dir

        # The check install makes: a state_dir another user can write could have the pid
        # file (which uninstall signals) or a job record point elsewhere.
        ensure_state_dir(self.cfg, "the daemon writes its pid file and job records")
        # Its children's logs and pid files: a logs/ others may write would let them name
        # any process for the next start to stop, or a file for root to append to.
        ensure_dir(self.cfg, "state_dir", self.cfg.state_dir / "logs",
                   "the daemon writes its children's logs and pid files")
        self.claim.take()
        try:
            if self.cfg.tls is not None:  # before a DRVA or the API would fail on a missing file
                await asyncio.to_thread(self.cfg.tls.check_files, self.cfg.drvas, self.cfg.path)
            self.protection = load_protection(self.cfg)
            await asyncio.to_thread(self.jobs.prune)
            await self.supervisor.apply(self.protection)
            # What a killed daemon left running of the VMs goes first (its filters drain
            # into the DRVAs just started): a domain that must stay off here — it failed
            # over to another site meanwhile — is dropped by _runnable, and its VMs ran on.
            await self.hypervisor.stop_leftovers()
            self.powered = await self._runnable(load_power(self.cfg))
            await self.hypervisor.apply(self.powered)
            await self.standby.apply()
            self._api = await start_api(self)
            loops = ((self.supervisor.step, STEP_INTERVAL_S, "supervisor"),
                     (self.hypervisor.step, STEP_INTERVAL_S, "hypervisor"),
                     (self.standby.step, STEP_INTERVAL_S, "standby"),
                     (self._alarm_step, ALARM_INTERVAL_S, "alarms"),
                     (self._schedule_step, SCHEDULE_INTERVAL_S, "consolidation-scheduler"),
                     (self._prune_step, PRUNE_INTERVAL_S, "pruner"))
            for step, interval_s, name in loops:
                self._tasks.append(asyncio.create_task(_every(interval_s, step, name), name=name))
        except BaseException:
            try:
                await self.stop()
            except Exception:  # logged step by step; the start's own error is the one to tell
                pass
            raise
        self.started_ns = time.time_ns()
        log.info("msa_started", site=self.cfg.site, api=str(self.cfg.api_listen), pid=os.getpid(),
                 protected=sorted(self.protection), drvas=sorted(self.supervisor.drvas))

    async def stop(self) -> None:
        """Stop in order: API, loops, jobs, VMs (their filters drain into the DRVAs before
        those stop), standbys, DRVAs, pid file. Each step runs whatever the one before
        did — on a read-only state directory a failed step once skipped the rest, and left
        the DRVAs running with no daemon — and the first error is raised at the end."""
        errors: list[BaseException] = []
        await _stop_step("api", self._stop_api, errors)
        await _stop_step("loops", self._stop_loops, errors)
        await _stop_step("jobs", self.runner.cancel_all, errors)
        await _stop_step("hypervisor", self.hypervisor.stop_all, errors)
        await _stop_step("standby", self.standby.stop_all, errors)
        await _stop_step("supervisor", self.supervisor.stop_all, errors)
        await _stop_step("pid-file", self.claim.release, errors)  # a plain function: called as is
        log.info("msa_stopped", site=self.cfg.site, **({"failed_steps": len(errors)} if errors else {}))
        if errors:
            raise errors[0]

    async def _stop_api(self) -> None:
        if self._api is not None:
            api, self._api = self._api, None
            await api.cleanup()

    async def _stop_loops(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # ------------------------------------------------------------------ loops

    async def _alarm_step(self) -> None:
        self.evaluate_alarms()
        await self._check_fenced_owners(time.monotonic())

    async def _check_fenced_owners(self, now: float) -> None:
        """Who owns the domains a DRVA stopped shipping (fenced): a failover elsewhere shows
        in the status as such, not only as an alarm."""
        for v in self.supervisor.views():
            for dom in domains_of(v.status):
                name = dom["name"]
                if not dom.get("fenced") or name not in self.protection:
                    continue
                if now - self._owner_checked.get(name, -OWNER_CHECK_EVERY_S) < OWNER_CHECK_EVERY_S:
                    continue
                self._owner_checked[name] = now
                await self.owner_elsewhere(name)

    def evaluate_alarms(self) -> None:
        """Alarms first: what the charts keep (throughput, history) must never stand
        between a DRVA and its ``drva_down`` (a mistyped counter once raised here first,
        every second, and froze every alarm of the site)."""
        views = self.supervisor.views()
        self.alarms.evaluate(time.time_ns(), views, self.protection, monotonic_ns=time.monotonic_ns(),
                             vms_down=self.hypervisor.vms_not_up(), powered=self.powered,
                             certificates=self.certificates.in_use(views))
        self.alarms.forget_subjects(set(self.protection) | {d.name for d in self.cfg.drvas})
        self.throughput.update(time.monotonic(), views)
        self.history.record(time.time_ns(), views, self.protection, self.throughput)

    async def _schedule_step(self) -> None:
        await self.consolidation_step(time.monotonic())

    async def consolidation_step(self, now: float) -> list[str]:
        """Start the consolidation jobs that are due; return their ids."""
        started = []
        for domain in [d for d in self._next_consolidation if d not in self.protection]:
            del self._next_consolidation[domain]
        for domain, policy in list(self.protection.items()):
            due = self._next_consolidation.setdefault(domain, now + policy.consolidate_every_s)
            if now < due:
                continue
            self._next_consolidation[domain] = now + policy.consolidate_every_s
            if self.runner.running("consolidate", {"domain": domain}):
                log.info("consolidation_skipped", domain=domain, reason="one is still running")
                continue
            record = await self.start_consolidation(domain, trigger="schedule")
            started.append(record["id"])
        return started

    async def _prune_step(self) -> None:
        if time.monotonic() - self._pruned_at >= JOBS_PRUNE_EVERY_S:
            self._pruned_at = time.monotonic()
            gone = await asyncio.to_thread(self.jobs.prune)
            log.info("jobs_pruned", records=gone)

    # ------------------------------------------------------------------ operations

    def check_domain(self, domain: str) -> None:
        """ConfigError (→ 404) when the cluster file has no such domain."""
        self.cfg.domain(domain)

    async def start_job(self, name: str, args: dict[str, Any], work: Any, *,
                        claim: tuple[str, str] | None = None) -> dict[str, Any]:
        return await self.runner.start(name, args, JOB_TIMEOUT_S[name], work, claim=claim)

    async def start_consolidation(self, domain: str, trigger: str = "request") -> dict[str, Any]:
        policy = self.protection.get(domain) or self.cfg.policy(domain)
        return await self.start_job("consolidate", {"domain": domain, "trigger": trigger},
                                    lambda job: operations.consolidate(self.cfg, domain, policy, job))

    async def owner_elsewhere(self, domain: str, *, strict: bool = False) -> dict[str, Any] | None:
        """The site that owns ``domain``'s current timeline when it is not this one
        (``operations.owned_elsewhere``), remembered for the status. A store that cannot
        be read says nothing: logged, and None — unless ``strict``."""
        try:
            where = await operations.owned_elsewhere(self.cfg, domain)
        except CdpError as exc:
            if strict:
                raise
            log.warning("owner_unknown", domain=domain, error=exc.message)
            return self.failed_over.get(domain)
        if where is None:
            self.failed_over.pop(domain, None)
        else:
            self.failed_over[domain] = {**where, "checked_ns": time.time_ns()}
        return where

    async def refuse_if_failed_over(self, domain: str, doing: str) -> None:
        where = await self.owner_elsewhere(domain)
        if where is not None:
            raise FailedOver(f"{operations.failed_over_text(domain, where)}: {doing} here would act on the "
                             f"old timeline, which is fenced for good; fail the domain back to site "
                             f"{self.cfg.site} first")

    def reload_config(self) -> None:
        """Read the site file and the inventory again (a failover registered VMs)."""
        from cdp.msa.config import load_site_config

        cfg = load_site_config(self.cfg.path)
        self.cfg = cfg
        self.supervisor.cfg = cfg
        self.hypervisor.set_inventory(cfg)
        self.standby.set_config(cfg)

    async def _runnable(self, domains: list[str]) -> list[str]:
        """``domains`` less those that failed over to another site (their VMs stay off).
        A domain handed over (``cdp.msa.power_refusals.handing_over``) is also dropped
        from ``power.json``: its VMs run here again only when asked, once it is protected
        here again — not at the next restart after that (a quiesce killed before its
        power-off left it listed)."""
        out, handed_over = [], []
        for name in domains:
            if name in self.cfg.isolated:
                out.append(name)
                continue
            where = await self.owner_elsewhere(name)
            if where is not None:
                log.error("power_on_refused", domain=name, reason=operations.failed_over_text(name, where))
                continue
            if (why := half_failed_back(self.cfg, name)) is not None:
                log.error("power_on_refused", domain=name, reason=why)
                continue
            if (why := handing_over(self.cfg, self.runner.claims, name)) is not None:
                log.error("power_on_refused", domain=name, reason=why)
                handed_over.append(name)
                continue
            out.append(name)
        if handed_over:
            await asyncio.to_thread(save_power, self.cfg, [d for d in domains if d not in handed_over])
        return out

    async def power(self, domain: str, on: bool) -> dict[str, Any]:
        """Power ``domain``'s VMs on or off (``cdp.hypervisor``); remembered across restarts.
        ``Busy`` while a job moves the domain between sites, unless this is its own step
        (``JobRunner.refuse_if_moving``)."""
        spec = self.cfg.domain(domain)
        if on:
            self.hypervisor.check(spec)
            if domain not in self.cfg.isolated:  # a test failover's copy writes nothing to the store
                await self.refuse_if_failed_over(domain, "powering its VMs on")
                if (why := half_failed_back(self.cfg, domain)) is not None:
                    raise FailedOver(why)
        async with self._power_lock:
            # Under the lock: a quiesce powers the VMs off under it too, so a power-on
            # checked before it and applied after it cannot slip past.
            if on and (why := handing_over(self.cfg, self.runner.claims, domain)) is not None:
                raise FailedOver(why)
            self.runner.refuse_if_moving(domain, f"powering its VMs {'on' if on else 'off'}")
            was = domain in self.powered
            powered = [d for d in self.powered if d != domain] + ([domain] if on else [])
            await asyncio.to_thread(save_power, self.cfg, powered)
            self.powered = powered
            await self.hypervisor.apply(powered)
        log.info("domain_powered", domain=domain, on=on, was_on=was)
        view = next((v for v in self.hypervisor.views() if v.domain == domain), None)
        last = None if on else self.hypervisor.last_run(domain)
        return {"domain": domain, "on": on, "was_on": was, "vms": [vm.name for vm in spec.vms],
                "host": view.host if view else None,
                "acked_seq": last.get("acked_seq") if last else None}

    async def quiesce(self, domain: str, mark: str, job: Job) -> dict[str, Any]:
        """Hand ``domain`` over for a planned failover (the recovery site asks, over the
        API): its VMs stop issuing writes, mark ``mark`` is placed after their last write
        and committed — so every write they had acknowledged is in the store before it —
        then they are powered off and the domain is no longer protected (shipped) here.
        Returns the mark's seq: the point the recovery site fails over at.

        The handover record (``handovers/<domain>.json``) is written as soon as the mark
        is committed, before the power-off: from then on the VMs are refused power-on
        here, so a quiesce killed after it is finished by the next one asked, which
        answers with this mark (``_quiesced_again``) instead of finding the domain
        unprotected, or its VMs off, and refusing."""
        from cdp.msa.failback import record_handed_back
        from cdp.msa.handover import write_handover
        from cdp.msa.marks import request_mark

        if (again := await self._quiesced_again(domain)) is not None:
            return again
        if domain not in self.protection:
            raise NotProtected(f"domain {domain} is not protected at site {self.cfg.site}: nothing to hand over")
        if domain not in self.powered:
            raise ConfigError(f"domain {domain}: its VMs are not running at site {self.cfg.site}, so no final "
                              f"mark can be placed in their stream; power them on (`cdp power {domain} on`), "
                              f"or fail over unplanned at the latest point (they write nothing)")
        job.progress("pause", 0, 4)
        handed_over = False
        try:
            paused = await self.hypervisor.pause(domain)
            job.progress("mark", 1, 4)
            placed = await request_mark(self.cfg, domain, mark)
            await asyncio.to_thread(record_handed_back, self.cfg, domain, mark, placed["seq"])
            async with self._protection_lock:  # never between a protect's claim check and its forget_handover
                await asyncio.to_thread(write_handover, self.cfg.state_dir, domain, mark, placed["seq"])
            handed_over = True
        finally:
            if not handed_over:
                # Nothing was handed over (the asking site gets this job's error and forks
                # nothing): the VMs write on. Left paused, they stayed stopped for good —
                # powered on, so a power-on changed nothing.
                self.hypervisor.resume(domain)
        job.progress("power-off", 2, 4)
        off = await self.power(domain, False)
        job.progress("unprotect", 3, 4)
        await self.unprotect(domain)
        job.progress("done", 4, 4)
        acked = off["acked_seq"]
        log.info("domain_quiesced", domain=domain, mark=mark, seq=placed["seq"], acked_seq=acked)
        return {"domain": domain, "site": self.cfg.site, "mark": mark, "seq": placed["seq"], "ts": placed["ts"],
                "captured_seq_at_pause": paused.get("captured_seq"), "acked_seq": acked}

    async def _quiesced_again(self, domain: str) -> dict[str, Any] | None:
        """A quiesce asked again of a domain this site already handed over — for a
        planned failover or a failback — whose asking site died before it recorded the
        answer (or before its fork), or whose own quiesce was killed after the mark: the
        same answer, at the recorded mark, once the domain is unprotected here (a killed
        quiesce may not have got that far). Its VMs have not run since the mark (they are
        refused power-on while ``handovers/<domain>.json`` is there, and it goes when the
        domain is protected again), so that mark is still its final point. None when
        there is no record, or the VMs are on (a quiesce that failed before its power-off:
        a new one places a new mark)."""
        from cdp.msa.handover import read_handover

        if domain in self.powered:
            return None
        try:
            back = read_handover(self.cfg.state_dir, domain)
        except ConfigError:
            return None
        if back is None:
            return None
        if domain in self.protection:  # the quiesce that wrote the record was killed before this step
            await self.unprotect(domain)
        await self._forget_power(domain)  # nor its power-off (power.json still listed the domain)
        last = self.hypervisor.last_run(domain) or {}
        log.info("domain_quiesced_again", domain=domain, mark=back["mark"], seq=back["seq"])
        return {"domain": domain, "site": self.cfg.site, "mark": back["mark"], "seq": back["seq"], "ts": None,
                "captured_seq_at_pause": None, "acked_seq": last.get("acked_seq"), "again": True}

    async def _forget_power(self, domain: str) -> None:
        """``power.json`` without ``domain`` (its VMs are off here: ``domain`` is not in
        ``powered``), so that no restart powers them on unasked."""
        async with self._power_lock:
            listed = await asyncio.to_thread(load_power, self.cfg)
            if domain in listed and domain not in self.powered:
                await asyncio.to_thread(save_power, self.cfg, [d for d in listed if d != domain])

    async def protect(self, domain: str, policy: Policy | PolicyChange, job: Job, *, takeover: bool = False,
                      reopen: bool = False) -> dict[str, Any]:
        """Protect ``domain`` with ``policy`` (or change its policy: a ``PolicyChange`` is
        applied to the policy it has under the lock, so concurrent changes of different
        fields all take effect); its DRVA is restarted
        when its domain set changes, and the job ends when the DRVA serves the domain.
        ``takeover``: a failover to this site is forking the domain (``cdp.msa.failover``):
        its DRVA starts now and waits for the fork instead of being fenced. ``reopen``:
        its DRVA is restarted even if it already served the domain (a failback forked a
        new timeline for it: ``cdp.msa.failback``). ``Busy`` while a job moves the
        domain between sites, unless this is its own step (``JobRunner.refuse_if_moving``):
        a protect during a quiesce removed the handover record, and the quiesce then
        stopped protecting the domain anyway."""
        from cdp.msa.handover import forget_handover

        if domain in self.cfg.isolated:
            raise ConfigError(f"domain {domain} is a test failover's copy: its VMs run isolated and are never "
                              f"protected (`cdp failover-cleanup {domain}` removes them)")
        if takeover:
            self.supervisor.takeover.add(domain)
        else:
            await self.refuse_if_failed_over(domain, "protecting it")
        drva = self.cfg.drva_of(self.cfg.domain(domain))
        async with self._protection_lock:
            self.runner.refuse_if_moving(domain, "protecting it")
            protection = dict(self.protection)
            was = protection.get(domain)
            if isinstance(policy, PolicyChange):
                policy = policy.applied_to(was or self.cfg.policy(domain))
            protection[domain] = policy
            await asyncio.to_thread(save_protection, self.cfg, protection)
            self.protection = protection
            job.progress("drva", 0, 1)
            restarted = await self.supervisor.apply(protection)
            if reopen and drva.name not in restarted and await self.supervisor.restart_serving(domain):
                restarted.append(drva.name)
            # Protected here again: a quiesce asked from now on hands over a new final
            # point. Under the lock a quiesce writes its record under, and never while
            # one holds the domain: its record is what keeps the VMs off meanwhile.
            if quiesce_claim(domain) not in self.runner.claims:
                await asyncio.to_thread(forget_handover, self.cfg.state_dir, domain)
        log.info("domain_protected", domain=domain, drva=drva.name, policy=asdict(policy),
                 already=was is not None)
        await self.supervisor.wait_serving(drva.name, domain, SERVE_TIMEOUT_S)
        job.progress("drva", 1, 1)
        return {"domain": domain, "id": self.cfg.domain(domain).id, "drva": drva.name,
                "policy": asdict(policy), "was_protected": was is not None, "drva_restarted": drva.name in restarted}

    async def unprotect(self, domain: str) -> dict[str, Any]:
        """Stop protecting ``domain``: its DRVA no longer serves it. ``Busy`` while a job
        moves the domain between sites, unless this is its own step
        (``JobRunner.refuse_if_moving``), and, asked directly, while a mark job of the
        domain runs: a mark its filter took ships only when the domain is protected
        again, after the job reported it failed."""
        spec = self.cfg.domain(domain)
        drva = self.cfg.drva_of(spec)
        async with self._protection_lock:
            self.runner.refuse_if_moving(domain, "unprotecting it")
            if domain not in self.protection:
                raise NotProtected(f"domain {domain} is not protected (protected: "
                                   f"{', '.join(sorted(self.protection)) or 'none'})")
            marking = self.runner.running("mark", {"domain": domain})
            if marking and acting_claim() is None:
                raise Busy(f"domain {domain}: a mark is being placed (job {marking[0]}); unprotecting it now would "
                           f"leave that mark to be committed only if the domain is protected again; try again "
                           f"when it has ended (`cdp jobs`)")
            protection = {d: p for d, p in self.protection.items() if d != domain}
            # First the request that lets its DRVA give up what its log still holds of the
            # domain (FORMAT.md §13.6): without one, a DRVA whose configuration lost a
            # domain with acked, unshipped frames refuses to start rather than drop them.
            await asyncio.to_thread(write_unprotect_request, self.cfg.drva_state_dir(drva), spec.id, spec.name)
            await asyncio.to_thread(save_protection, self.cfg, protection)
            self.protection = protection
            pending = None
            try:
                await self.supervisor.apply(protection)
            except StateUnwritable as exc:
                # Unprotected from here on (protection.json says so, the DRVA's request is
                # written): only the DRVA's configuration waits for room, and the keeper
                # rewrites it unasked. Answering 507 told the caller the domain was still
                # protected, and its retry was then refused as not protected.
                pending = exc.message
                log.warning("domain_unprotected_drva_pending", domain=domain, drva=drva.name, error=pending)
        log.info("domain_unprotected", domain=domain, drva=drva.name)
        return {"domain": domain, "drva": drva.name, "protected": False,
                "drva_running": drva.name in self.supervisor.drvas,
                **({"drva_config_pending": pending} if pending else {})}

    # ------------------------------------------------------------------ views

    def status(self) -> dict[str, Any]:
        views = {v.name: v for v in self.supervisor.views()}
        active = self.alarms.active_alarms()
        drvas = []
        for spec in self.cfg.drvas:
            v = views.get(spec.name)
            drvas.append(v.to_dict() if v is not None else {
                "name": spec.name, "listen": str(spec.listen), "domains": [], "state": "idle", "up": False,
                "restarts": 0, "pid": None})
        domains = []
        for name, policy in self.protection.items():
            drva = self.cfg.drva_of(self.cfg.domain(name)).name
            v = views.get(drva)
            dom = next((d for d in domains_of(v.status) if d["name"] == name), None) if v else None
            domains.append({"name": name, "id": self.cfg.domain(name).id, "drva": drva, "policy": asdict(policy),
                            "status": dom, "throughput": self.throughput.rates(drva, name),
                            "failed_over": self.failed_over.get(name),
                            "alarms": [a.id for a in active if a.subject in (name, drva)]})
        return {"site": self.cfg.site, "pid": os.getpid(), "api": self.cfg.api_url,
                "store": redact_url(self.cfg.store_url), "state_dir": str(self.cfg.state_dir),
                **self._peer_store(), "peer": self._peer(),
                "started_ns": self.started_ns, "time_ns": time.time_ns(), "drvas": drvas, "domains": domains,
                "vms": [v.to_dict() for v in self.hypervisor.views()], "powered": list(self.powered),
                "standby": self.standby.views(),
                "failed_over": dict(self.failed_over),
                "alarms": [a.to_dict() for a in active], "jobs_running": len(self.runner.tasks)}

    def _peer(self) -> dict[str, str] | None:
        """The peer site (``[peer]``): its name and API, for the console; None without one."""
        peer = self.cfg.peer
        return None if peer is None else {"site": peer.site, "api": peer.api_url}

    def _peer_store(self) -> dict[str, str]:
        """``{"peer_store": URL}`` (redacted) when the peer's domains live in a store of
        their own (``[peer] store``), else nothing: the status is as with one store."""
        urls = self.cfg.store_urls()
        return {"peer_store": redact_url(urls[1])} if len(urls) > 1 else {}

    def metrics_snapshot(self) -> MetricsSnapshot:
        return MetricsSnapshot(self.supervisor.views(), dict(self.protection), self.alarms.counts_by_kind(),
                               self.runner.running_by_name(), dict(self.runner.finished))


async def _stop_step(name: str, step: Any, errors: list[BaseException]) -> None:
    """Run one step of the daemon's stop; an error is logged (naming the step and the
    cause) and kept in ``errors``, and the next step runs all the same."""
    try:
        if asyncio.iscoroutine(done := step()):
            await done
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.error("msa_stop_step_failed", step=name, error=str(exc) or type(exc).__name__, exc_info=True)
        errors.append(exc)


async def _every(interval_s: float, step: Any, name: str) -> None:
    """Call ``step()`` every ``interval_s``. A failing step is logged and the loop goes on:
    one bad status document must not end supervision or alarms for good."""
    while True:
        try:
            await step()
        except CdpError as exc:
            log.error("loop_step_failed", loop=name, error=exc.message)
        except Exception:
            log.error("loop_step_failed", loop=name, exc_info=True)
        await asyncio.sleep(interval_s)


class NotProtected(ConfigError):
    """The domain is not protected."""


class FailedOver(ConfigError):
    """Another site owns the domain's current timeline: it failed over there."""


async def serve(daemon: MsaDaemon) -> None:
    """Run ``daemon`` until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await daemon.start()
    try:
        await stop.wait()
        log.info("msa_stopping", reason="signal")
    finally:
        await daemon.stop()


def run_daemon(cfg: SiteConfig, env: Mapping[str, str] = os.environ) -> None:
    """``cdp daemon``: blocks until the daemon is told to stop."""
    asyncio.run(serve(MsaDaemon(cfg, env)))
