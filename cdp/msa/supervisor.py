"""DRVA supervision: one ``python -m drva.daemon`` subprocess per DRVA that serves
protected domains, kept running.

For each ``[[drvas]]`` entry of the site with at least one protected domain, the
supervisor writes ``<state_dir>/drvas/<name>.toml`` (``SiteConfig.drva_config_doc``),
starts the DRVA with its output appended to ``<state_dir>/logs/<name>.log``, and:

* restarts it when it exits (crash, signal, error exit), after a back-off that starts at
  ``backoff_first_s`` and doubles up to ``backoff_max_s``; a DRVA that stayed up for
  ``stable_after_s`` starts again from the first step;
* restarts it when its set of domains changes (``apply`` after protect / unprotect), and
  stops a DRVA left with no domain;
* reads its ``status.json`` (``drva/status.py``), trusting only a document written by the
  current process (its ``pid``): a restarted DRVA's old status says nothing about it; a
  document that is no JSON or not of the shape ``cdp.msa.status_doc`` checks is not used
  (``status_problem`` says why, and ``drva_down`` quotes it). How old a status is comes
  from this daemon's monotonic clock, from when the document last changed: the ``time``
  a hung DRVA last wrote (or any it claims, a day ahead) says nothing of whether it runs;
* stops them all on shutdown: SIGTERM, then SIGKILL after ``stop_timeout_s``.

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
    domains: tuple[str, ...]
    config_path: Path


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
                "uptime_s": (self.status or {}).get("uptime_s"),
                "status_age_s": None if self.status_age_s is None else round(self.status_age_s, 1),
                "status_problem": self.status_problem}


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

    # ------------------------------------------------------------------ desired state

    def assignment(self, protection: Mapping[str, Policy]) -> dict[str, tuple[str, ...]]:
        """DRVA name -> the protected domains it serves (DRVAs with none left out)."""
        out: dict[str, list[str]] = {}
        for domain in protection:
            out.setdefault(self.cfg.drva_of(self.cfg.domain(domain)).name, []).append(domain)
        return {name: tuple(sorted(doms)) for name, doms in out.items()}

    async def apply(self, protection: Mapping[str, Policy]) -> list[str]:
        """Run exactly the DRVAs ``protection`` needs, each with its domains; return the
        names of the DRVAs (re)started. A DRVA whose domains did not change is left alone."""
        wanted = self.assignment(protection)
        changed: list[str] = []
        async with self._lock:
            for name in [n for n in self.drvas if n not in wanted]:
                log.info("drva_unassigned", drva=name)
                await self._stop(self.drvas.pop(name))
            for name, domains in wanted.items():
                current = self.drvas.get(name)
                if current is not None and current.domains == domains:
                    continue
                if current is not None:
                    log.info("drva_domains_changed", drva=name, before=list(current.domains), after=list(domains))
                    await self._stop(current)
                sup = current or self._new(self.cfg.drva(name), domains)
                sup.domains = domains
                sup.status = None
                self._write_config(sup)
                await self._start(sup)
                self.drvas[name] = sup
                changed.append(name)
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
            await self._stop(sup)
            self._write_config(sup)
            await self._start(sup)
            return sup.spec.name

    def _new(self, spec: DrvaSpec, domains: tuple[str, ...]) -> Supervised:
        root = self.cfg.state_dir
        return Supervised(name=spec.name, log_path=root / "logs" / f"{spec.name}.log", spec=spec, domains=domains,
                          config_path=root / "drvas" / f"{spec.name}.toml",
                          status_path=self.cfg.drva_state_dir(spec) / "status.json",
                          backoff_s=self.keeper.backoff_first_s)

    def _write_config(self, sup: Supervised) -> None:
        sup.spec = self.cfg.drva(sup.spec.name)  # the site may have been reloaded (a failover registered VMs)
        doc = self.cfg.drva_config_doc(sup.spec, list(sup.domains), self.takeover)
        ensure_dir(self.cfg, "state_dir", sup.config_path.parent, WRITER_SUPERVISOR)  # 0755 under any umask
        self._make_requests_box(sup.spec)
        atomic_write(sup.config_path, tomli_w.dumps(doc).encode())

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
        await self.keeper.stop(sup)
        sup.status = None

    async def step(self) -> None:
        """Reap exited DRVAs, restart the ones whose back-off is over, read statuses."""
        async with self._lock:
            for sup in self.drvas.values():
                if await self.keeper.tend(sup, self._start):
                    log.info("drva_up", drva=sup.spec.name, pid=sup.proc.pid, listen=sup.status.get("listen"))

    async def stop_all(self) -> None:
        async with self._lock:
            await asyncio.gather(*(self._stop(sup) for sup in self.drvas.values()))

    # ------------------------------------------------------------------ views

    def views(self) -> list[DrvaView]:
        now = self.clock()
        out = []
        for sup in self.drvas.values():
            st = sup.status
            # Not the document's own "time": a hung DRVA's last claim (a day ahead, or none).
            age = None if st is None or sup.status_changed_at is None else max(0.0, now - sup.status_changed_at)
            out.append(DrvaView(
                sup.spec.name, str(sup.spec.listen), sup.domains, sup.state, now - sup.state_since,
                sup.proc.pid if sup.proc is not None else None, sup.restarts, sup.last_exit, sup.last_error,
                None if sup.restart_at is None else max(0.0, sup.restart_at - now), st, age, sup.status_problem))
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


