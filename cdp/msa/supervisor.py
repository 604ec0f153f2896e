"""DRVA supervision: one ``python -m drva.daemon`` subprocess per DRVA that serves
protected domains, kept running.

For each ``[[drvas]]`` entry of the site with at least one protected domain, the
supervisor writes ``<state_dir>/drvas/<name>.toml`` (``SiteConfig.drva_config_doc``),
starts the DRVA with its output appended to ``<state_dir>/logs/<name>.log``, and:

* restarts it when it exits (crash, signal, error exit), after a back-off that starts at
  ``backoff_first_s`` and doubles up to ``backoff_max_s``; a DRVA that stayed up for
  ``stable_after_s`` starts again from the first step;
* restarts it when its set of domains changes (``apply`` after protect / unprotect), and
  stops a DRVA left with no domain. The new configuration is written *before* the running
  process is stopped: a state directory that cannot take it (full, read-only) leaves the
  old DRVA serving, the error is raised naming the file, and the rewrite and restart are
  retried from ``step`` (``backoff_first_s``, doubling to ``backoff_max_s``) until done. A
  failure after a stop (or a cancellation) leaves a restart scheduled, on the
  configuration on disk: a DRVA is never left ``stopped`` while it serves a protected
  domain (and ``drva_down`` says so if one is);
* reads its ``status.json`` (``drva/status.py``), trusting only a document written by the
  current process (its ``pid``): a restarted DRVA's old status says nothing about it; a
  document that is no JSON or not of the shape ``cdp.msa.status_doc`` checks is not used
  (``status_problem`` says why, and ``drva_down`` quotes it). How old a status is comes
  from this daemon's monotonic clock, from when the document last changed: the ``time``
  a hung DRVA last wrote (or any it claims, a day ahead) says nothing of whether it runs;
* stops them all on shutdown: SIGTERM, then SIGKILL after ``stop_timeout_s``;
* looks at the state directory's file system (``cdp.msa.state_fs``) each round, off the
  event loop: ``views()`` carries what it found (``DrvaViews.state_fs_problem``) to the
  alarms (``state_dir_unwritable``).

States of one DRVA: ``starting`` (spawned, no status of its own yet), ``up`` (it wrote
a status), ``restarting`` (exited; waiting for its back-off), ``stopped``.

``step()`` does one round (reap exits, restart what is due, read statuses); the daemon
calls it a few times a second (``STEP_INTERVAL_S``); tests may call it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from cdp.durable import atomic_write
from cdp.errors import CdpError
from cdp.logs import get_logger
from cdp.msa.config import DrvaSpec, Policy, SiteConfig
from cdp.msa.install_dirs import DIR_MODE, ensure_dir
from cdp.msa.keeper import (
    BACKOFF_FIRST_S, BACKOFF_MAX_S, STABLE_AFTER_S, STOP_TIMEOUT_S, Kept, ProcessKeeper, exit_text, send_signal,
)
from cdp.msa.state_fs import StateUnwritable, error_text, hint, watch as state_fs_watch
from cdp.msa.status_doc import domains_of, problem as status_problem
from drva.requests import requests_dir

log = get_logger("cdp.msa.supervisor")

STEP_INTERVAL_S = 0.2
WRITER_SUPERVISOR = "the daemon writes its DRVAs' configurations and requests"  # install_dirs.dir_error


def drva_args(config_path: Path) -> tuple[str, ...]:
    """A DRVA process's arguments after the interpreter (``cdp uninstall`` finds one a
    killed daemon left running by them)."""
    return ("-m", "drva.daemon", "--config", str(config_path))


@dataclass(kw_only=True)
class Supervised(Kept):
    """One DRVA and its process (``Kept``)."""

    spec: DrvaSpec
    domains: tuple[str, ...]  # the protected domains it is to serve
    config_path: Path
    # The domains of the configuration file this supervisor last wrote (None: none yet:
    # a file found there is not known to be ours, and never started from).
    config_domains: tuple[str, ...] | None = None
    # A rewrite and restart is owed (the domains changed, a restart was asked) and is
    # retried from ``step`` at ``config_retry_at`` (monotonic); ``config_problem`` says
    # why the last write failed.
    reconfigure: bool = False
    config_problem: str | None = None
    config_retry_at: float | None = None
    config_backoff_s: float = BACKOFF_FIRST_S


@dataclass(frozen=True)
class DrvaView:
    """A snapshot of one supervised DRVA, for status, alarms and metrics."""

    name: str
    listen: str
    domains: tuple[str, ...]
    state: str
    state_for_s: float
    pid: int | None
    restarts: int
    last_exit: int | None
    last_error: str | None
    restart_in_s: float | None
    status: dict[str, Any] | None  # its newest usable status document (cdp.msa.status_doc)
    status_age_s: float | None  # since that document last changed, on the MSA's monotonic clock
    status_problem: str | None = None  # why its newest status.json is not used (None: it is)
    config_problem: str | None = None  # why its configuration could not be written (retried), None

    def to_dict(self) -> dict[str, Any]:
        log_doc = (self.status or {}).get("log")
        log_doc = log_doc if isinstance(log_doc, dict) else {}
        return {"name": self.name, "listen": self.listen, "domains": list(self.domains), "state": self.state,
                "up": self.state == "up", "state_for_s": round(self.state_for_s, 1), "pid": self.pid,
                "restarts": self.restarts, "last_exit": self.last_exit, "last_error": self.last_error,
                "restart_in_s": None if self.restart_in_s is None else round(self.restart_in_s, 2),
                "log_usage_ratio": log_doc.get("used_ratio"), "log_used_bytes": log_doc.get("used_bytes"),
                "log_size_bytes": log_doc.get("data_size"),
                "backpressure": (self.status or {}).get("backpressure"),
                # Each store lane's frame budget and the seeder's upload slots, as the DRVA
                # says them (cdp.msa.status_doc checked them; None from an older DRVA).
                "lanes": (self.status or {}).get("lanes"),
                "seed_uploads": (self.status or {}).get("seed_uploads"),
                "uptime_s": (self.status or {}).get("uptime_s"),
                "status_age_s": None if self.status_age_s is None else round(self.status_age_s, 1),
                "status_problem": self.status_problem, "config_problem": self.config_problem}


class DrvaViews(list[DrvaView]):
    """The supervisor's views, and what it last found of the state directory's file
    system (``cdp.msa.state_fs``): the alarms take both from one call."""

    state_fs_problem: str | None = None


class Supervisor:
    """The DRVA processes of one site (see the module docstring)."""

    def __init__(self, cfg: SiteConfig, env: Mapping[str, str], *, clock: Callable[[], float] = time.monotonic,
                 backoff_first_s: float = BACKOFF_FIRST_S, backoff_max_s: float = BACKOFF_MAX_S,
                 stable_after_s: float = STABLE_AFTER_S, stop_timeout_s: float = STOP_TIMEOUT_S) -> None:
        cfg.secret(env)  # refuse to start DRVAs that could not authenticate a filter
        self.cfg = cfg
        # The DRVAs get the site secret, not the API token: they never serve the API.
        self.keeper = ProcessKeeper("drva", cfg.child_env(env), clock,
                                    backoff_first_s=backoff_first_s, backoff_max_s=backoff_max_s,
                                    stable_after_s=stable_after_s, stop_timeout_s=stop_timeout_s,
                                    check_status=status_problem)
        self.clock = clock
        self.drvas: dict[str, Supervised] = {}
        self.takeover: set[str] = set()  # domains a failover is forking to this site (drva.config)
        self._lock = asyncio.Lock()  # apply / step / stop_all change the same processes
        self.state_fs = state_fs_watch(cfg.state_dir)
        self._stopped = False  # stop_all ran

    # ------------------------------------------------------------------ desired state

    def assignment(self, protection: Mapping[str, Policy]) -> dict[str, tuple[str, ...]]:
        """DRVA name -> the protected domains it serves (DRVAs with none left out)."""
        out: dict[str, list[str]] = {}
        for domain in protection:
            out.setdefault(self.cfg.drva_of(self.cfg.domain(domain)).name, []).append(domain)
        return {name: tuple(sorted(doms)) for name, doms in out.items()}

    async def apply(self, protection: Mapping[str, Policy]) -> list[str]:
        """Run exactly the DRVAs ``protection`` needs, each with its domains; return the
        names of the DRVAs (re)started. A DRVA whose domains did not change is left alone.
        A configuration that cannot be written (``StateUnwritable`` naming it, raised once
        every DRVA was tried) leaves that DRVA as it was, its rewrite retried from ``step``."""
        wanted = self.assignment(protection)
        changed: list[str] = []
        failed: StateUnwritable | None = None
        async with self._lock:
            for name in [n for n in self.drvas if n not in wanted]:
                log.info("drva_unassigned", drva=name)
                await self._stop(self.drvas.pop(name))
            for name, domains in wanted.items():
                current = self.drvas.get(name)
                if current is not None and current.domains == domains and not current.reconfigure:
                    continue
                if current is not None and current.domains != domains:
                    log.info("drva_domains_changed", drva=name, before=list(current.domains), after=list(domains))
                sup = current or self._new(self.cfg.drva(name), domains)
                sup.domains = domains
                self.drvas[name] = sup  # even unstarted: step retries it, drva_down tells
                try:
                    await self._reconfigure(sup)
                except OSError as exc:
                    failed = failed or self._unwritten(sup, exc)
                    continue
                changed.append(name)
        if failed is not None:
            raise failed from failed.__cause__
        return changed

    def nudge(self, domain: str) -> bool:
        """Tell the DRVA serving ``domain`` to read its catalog now (SIGUSR1: a failover's
        fork is done, ``drva.daemon.TAKEOVER_POLL_S``); only a DRVA that is up — it handles
        the signal from before its first status. True if one was told."""
        sup = next((s for s in self.drvas.values() if domain in s.domains), None)
        if sup is None or sup.proc is None or sup.state != "up" or sup.proc.returncode is not None:
            return False
        send_signal(sup.proc, signal.SIGUSR1)
        return True

    async def restart_serving(self, domain: str) -> str | None:
        """Restart the DRVA serving ``domain``, so that it opens the domain's catalog again
        (a failback's new timeline is adopted at open); its name, None if none serves it."""
        async with self._lock:
            sup = next((s for s in self.drvas.values() if domain in s.domains), None)
            if sup is None:
                return None
            log.info("drva_restarted_for", drva=sup.spec.name, domain=domain)
            try:
                await self._reconfigure(sup)
            except OSError as exc:  # the old DRVA serves on; step retries
                raise self._unwritten(sup, exc) from exc
            return sup.spec.name

    def _new(self, spec: DrvaSpec, domains: tuple[str, ...]) -> Supervised:
        root = self.cfg.state_dir
        return Supervised(name=spec.name, log_path=root / "logs" / f"{spec.name}.log", spec=spec, domains=domains,
                          config_path=root / "drvas" / f"{spec.name}.toml",
                          status_path=self.cfg.drva_state_dir(spec) / "status.json",
                          backoff_s=self.keeper.backoff_first_s, config_backoff_s=self.keeper.backoff_first_s)

    async def _reconfigure(self, sup: Supervised) -> None:
        """Write ``sup``'s configuration, then restart its process on it (``_restart``).
        The file first: while it cannot be written (``OSError`` naming it), the running
        DRVA is left alone — serving its old domains beats serving none — and ``step``
        tries again after a back-off (``config_retry_at``)."""
        sup.reconfigure = True
        try:
            self._write_config(sup)
        except OSError as exc:
            self._config_failed(sup, exc)
            raise
        await self._restart(sup)
        sup.reconfigure, sup.config_retry_at = False, None

    def _config_failed(self, sup: Supervised, exc: OSError) -> None:
        if exc.filename is None:
            exc.filename = str(sup.config_path)  # atomic_write's own errors name no file
        self.state_fs.failed(sup.config_path, exc)
        sup.config_problem = error_text(exc) + (f" ({hint(exc.errno)})" if hint(exc.errno) else "")
        sup.config_retry_at = self.clock() + sup.config_backoff_s
        log.error("drva_config_unwritten", drva=sup.spec.name, error=sup.config_problem,
                  domains=list(sup.domains), running=sup.proc is not None, retry_in_s=sup.config_backoff_s)
        sup.config_backoff_s = min(self.keeper.backoff_max_s, sup.config_backoff_s * 2)

    def _unwritten(self, sup: Supervised, exc: OSError) -> StateUnwritable:
        """The error of a configuration that could not be written: the file, why, what the
        DRVA does meanwhile and that it is retried."""
        if sup.proc is not None:
            now = (f"it serves on with the configuration it has (domains "
                   f"{', '.join(sup.config_domains or ()) or 'as before'})")
        else:
            now = "it is not running (alarm drva_down)"
        retry_s = max(0.0, (sup.config_retry_at or self.clock()) - self.clock())
        err = StateUnwritable(f"DRVA {sup.spec.name}: cannot write its configuration {sup.config_problem}; {now}; "
                              f"the daemon writes it again in {retry_s:.1f} s (then every "
                              f"{self.keeper.backoff_max_s:g} s at most) and restarts the DRVA on it", exc.errno)
        err.__cause__ = exc
        return err

    async def _restart(self, sup: Supervised) -> None:
        """Stop ``sup``'s process (if any) and start it again. Whatever interrupts that once
        it stopped (an error, a cancellation) leaves a restart scheduled: ``tend`` starts
        it after the back-off, on the configuration on disk."""
        try:
            await self._stop(sup)
            await self._start(sup)
        except BaseException:
            if sup.proc is None and sup.state != "restarting":
                self.keeper.schedule_restart(sup)
            raise

    def _write_config(self, sup: Supervised) -> None:
        sup.spec = self.cfg.drva(sup.spec.name)  # the site may have been reloaded (a failover registered VMs)
        doc = self.cfg.drva_config_doc(sup.spec, list(sup.domains), self.takeover)
        ensure_dir(self.cfg, "state_dir", sup.config_path.parent, WRITER_SUPERVISOR)  # 0755 under any umask
        self._make_requests_box(sup.spec)
        atomic_write(sup.config_path, tomli_w.dumps(doc).encode())
        sup.config_domains, sup.config_problem = sup.domains, None
        sup.config_backoff_s = self.keeper.backoff_first_s
        self.state_fs.succeeded()

    def _make_requests_box(self, spec: DrvaSpec) -> None:
        """The DRVA's state directory and its requests box, 0755 under any umask: the
        DRVA makes a missing box itself with the umask it inherits (0777 under 000), and
        reads any request file found there. A box that cannot be made is the DRVA's to
        report (``requests_unusable``): it is a side file, no reason not to start."""
        state_dir = self.cfg.drva_state_dir(spec)
        ensure_dir(self.cfg, "state_dir", state_dir, WRITER_SUPERVISOR)
        with contextlib.suppress(OSError):
            os.mkdir(requests_dir(state_dir), DIR_MODE)

    # ------------------------------------------------------------------ processes

    async def _start(self, sup: Supervised) -> None:
        sup.status, sup.status_problem = None, None
        await self.keeper.spawn(sup, drva_args(sup.config_path), domains=list(sup.domains),
                                config=str(sup.config_path))

    async def _stop(self, sup: Supervised) -> None:
        try:
            await self.keeper.stop(sup)
        except OSError as exc:
            if sup.proc is not None:
                raise
            # Stopped; only its pid file could not be removed (a read-only state fs): the
            # next start replaces it.
            log.warning("drva_pid_file_left", drva=sup.spec.name, error=error_text(exc))
            self.keeper.set_state(sup, "stopped")
        sup.status = None

    async def step(self) -> None:
        """Look at the state directory's file system; reap exited DRVAs, restart the ones
        whose back-off is over, retry the configurations owed, read statuses. One DRVA's
        failure (its pid file on a read-only file system) is logged and leaves it a
        restart, never the others untended."""
        if self.state_fs.due():
            await asyncio.to_thread(self.state_fs.check)
        async with self._lock:
            if self._stopped:
                return  # stop_all ran: nothing is to be restarted any more
            for sup in list(self.drvas.values()):
                try:
                    await self._tend(sup)
                except OSError as exc:
                    log.error("drva_tend_failed", drva=sup.spec.name, error=error_text(exc))
                    if sup.proc is None and sup.state not in ("restarting", "stopped"):
                        self.keeper.schedule_restart(sup)

    async def _tend(self, sup: Supervised) -> None:
        if await self.keeper.tend(sup, self._start):
            log.info("drva_up", drva=sup.spec.name, pid=sup.proc.pid, listen=sup.status.get("listen"))
        if sup.reconfigure and (sup.config_retry_at is None or self.clock() >= sup.config_retry_at):
            with contextlib.suppress(OSError):  # _config_failed logged it and set the next try
                await self._reconfigure(sup)
        elif sup.state == "stopped" and not sup.reconfigure and sup.config_domains is not None:
            # Stopped while it serves protected domains (only _stop's callers stop, and they
            # start it again; this is the net under them): start it on the file it has.
            log.warning("drva_stopped_restarting", drva=sup.spec.name, domains=list(sup.domains))
            self.keeper.schedule_restart(sup)

    async def stop_all(self) -> None:
        async with self._lock:
            self._stopped = True
            await asyncio.gather(*(self._stop(sup) for sup in self.drvas.values()))

    # ------------------------------------------------------------------ views

    def views(self) -> DrvaViews:
        now = self.clock()
        out = DrvaViews()
        out.state_fs_problem = self.state_fs.problem
        for sup in self.drvas.values():
            st = sup.status
            # Not the document's own "time": a hung DRVA's last claim (a day ahead, or none).
            age = None if st is None or sup.status_changed_at is None else max(0.0, now - sup.status_changed_at)
            out.append(DrvaView(
                sup.spec.name, str(sup.spec.listen), sup.domains, sup.state, now - sup.state_since,
                sup.proc.pid if sup.proc is not None else None, sup.restarts, sup.last_exit, sup.last_error,
                None if sup.restart_at is None else max(0.0, sup.restart_at - now), st, age, sup.status_problem,
                sup.config_problem))
        return out

    def view(self, name: str) -> DrvaView | None:
        return next((v for v in self.views() if v.name == name), None)

    def pid(self, name: str) -> int | None:
        sup = self.drvas.get(name)
        return sup.proc.pid if sup is not None and sup.proc is not None else None

    async def wait_serving(self, name: str, domain: str, timeout_s: float) -> DrvaView:
        """Wait until DRVA ``name`` is up and its status lists ``domain``."""
        deadline = self.clock() + timeout_s
        while True:
            v = self.view(name)
            if v is not None and v.state == "up" and v.status is not None and any(
                    d["name"] == domain for d in domains_of(v.status)):
                return v
            if self.clock() >= deadline:
                why = "" if v is None else f" (it is {v.state}; {exit_text(v.last_exit)}" + (
                    f": {v.last_error}" if v.last_error else "") + ")"
                raise CdpError(f"DRVA {name} did not start serving domain {domain} within {timeout_s:g} s{why}; "
                               f"see {self.cfg.state_dir / 'logs' / (name + '.log')}")
            await asyncio.sleep(STEP_INTERVAL_S)


