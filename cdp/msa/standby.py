"""Continuous rehydration at a recovery site: one supervised ``python -m rocva standby``
process per ``[[standby]]`` domain of the site file (``rocva.standby``).

A standby runs while the domain is not this site's: not registered here (a failover
brought it) and not being failed over — a failover job ``suspend``s it first, so that
the appliance alone touches the images, and ``resume``s it if the job fails before the
fork. Its status (``<state_dir>/standby/<domain>.status.json``: the seq the standby
holds, the domain's committed seq, the last apply) is read only when written by the
current process. Logs go to ``<state_dir>/logs/standby-<domain>.log``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp.logs import get_logger
from cdp.msa.keeper import Kept, ProcessKeeper

log = get_logger("cdp.msa.standby")


def standby_args(site_path: Path) -> tuple[str, ...]:
    """How the arguments of a standby of the site file ``site_path`` begin, after the
    interpreter (``cdp uninstall`` finds one a killed daemon left running by them)."""
    return ("-m", "rocva", "standby", "--config", str(site_path))


@dataclass(kw_only=True)
class StandbyProcess(Kept):
    interval_s: float


class StandbyKeeper:
    def __init__(self, cfg: Any, env: Mapping[str, str], *, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.keeper = ProcessKeeper("standby", cfg.child_env(env), clock)
        self.running: dict[str, StandbyProcess] = {}
        self.suspended: set[str] = set()

    def set_config(self, cfg: Any) -> None:
        self.cfg = cfg

    def wanted(self) -> list[Any]:
        here = {d.name for d in self.cfg.cluster.domains}
        return [s for s in self.cfg.standby if s.domain not in here and s.domain not in self.suspended]

    async def apply(self) -> None:
        wanted = {s.domain: s for s in self.wanted()}
        for name in [n for n in self.running if n not in wanted]:
            await self.keeper.stop(self.running.pop(name))
            log.info("standby_stopped", domain=name)
        for name, spec in wanted.items():
            if name in self.running:
                continue
            sp = StandbyProcess(name=name, log_path=self.cfg.state_dir / "logs" / f"standby-{name}.log",
                                interval_s=spec.interval_s,
                                status_path=self.cfg.state_dir / "standby" / f"{name}.status.json",
                                backoff_s=self.keeper.backoff_first_s)
            self.running[name] = sp
            await self._start(sp)

    async def _start(self, sp: StandbyProcess) -> None:
        sp.status = None
        await self.keeper.spawn(sp, (*standby_args(self.cfg.path), "--name", sp.name, "--interval", str(sp.interval_s)))

    async def step(self) -> None:
        await self.apply()
        for sp in list(self.running.values()):
            if sp.proc is not None and sp.proc.returncode == 0 and not sp.expected_exit:
                # it exited by itself: this site owns the domain now (failed over here)
                self.keeper.set_state(sp, "stopped")
                sp.expected_exit = True
                sp.proc = None
                log.info("standby_done", domain=sp.name)
                continue
            await self.keeper.tend(sp, self._start)

    async def suspend(self, name: str) -> None:
        """Stop ``name``'s standby and keep it stopped (a failover takes its images)."""
        self.suspended.add(name)
        sp = self.running.pop(name, None)
        if sp is not None:
            await self.keeper.stop(sp)
            log.info("standby_suspended", domain=name)

    def resume(self, name: str) -> None:
        self.suspended.discard(name)

    async def stop_all(self) -> None:
        """Stop every standby, each whatever the one before did; the first error is raised
        at the end (the daemon's stop goes on to its DRVAs all the same)."""
        errors = []
        for sp in self.running.values():
            try:
                await self.keeper.stop(sp)
            except Exception as exc:
                log.error("standby_stop_failed", domain=sp.name, error=str(exc))
                errors.append(exc)
        self.running.clear()
        if errors:
            raise errors[0]

    def views(self) -> list[dict[str, Any]]:
        out = []
        here = {d.name for d in self.cfg.cluster.domains}
        for spec in self.cfg.standby:
            sp = self.running.get(spec.domain)
            st = (sp.status if sp else None) or {}
            state = ("owned here" if spec.domain in here else "suspended" if spec.domain in self.suspended
                     else st.get("state") or (sp.state if sp else "off"))
            out.append({"domain": spec.domain, "mode": spec.mode, "state": state,
                        "seq": st.get("seq"), "committed_seq": st.get("committed_seq"),
                        "lag_seqs": (st["committed_seq"] - st["seq"]) if isinstance(st.get("seq"), int)
                        and isinstance(st.get("committed_seq"), int) else None,
                        "last_apply_s": st.get("last_apply_s"), "cold_builds": st.get("cold_builds"),
                        "applies": st.get("applies"), "last_error": st.get("last_error") or (sp.last_error if sp else None),
                        "pid": sp.proc.pid if sp and sp.proc else None})
        return out
