"""Campaign 2, kills: SIGKILLs at random moments across every process of a site.

Two sites over one file store (``cdp/testing/two_sites.py``), each ``cdp daemon`` a real
subprocess (``tests/test_failover_sites.Operator``) whose DRVAs and simulated hosts are
its own subprocesses. Site A's VMs write a random workload. Every kill is a SIGKILL of a
real process, at a moment drawn from ``random.Random(seed)``:

- **ingest**: site A's DRVA (its daemon restarts it), its simulated host (the daemon
  restarts it; its filter's dirty-region maps resync what it had not sent), its MSA (the
  campaign restarts ``cdp daemon``, which stops the leftovers and starts its own). After
  each kill the campaign waits until the site writes and acknowledges again (else
  ``daemon_crashes``: it did not come back). Marks are placed between kills; the host
  records the primaries' sha256 at each mark's seq.
- **recovery**: ``cdp recover --seq MARK`` processes (RocVA) killed during their run,
  then the same recovery rerun into the same directory: it finishes (resumed or from the
  start), byte-exact to the primaries at the mark (else ``failures``).
- **consolidation and retention**: a RocVA process running ``rocva.consolidate`` with
  retention (its maintenance lease shortened to ``LEASE_TTL_S``, so the rerun waits
  seconds for the dead holder's lease, not minutes) killed during its run; rerun to the
  end; then the marks after the retention horizon recover exact again.
- **failover and failback** (long mode, ``Plan.rounds``): with site A's VMs off and
  everything they acked committed, site B fails the domain over at the latest point
  while B's MSA or its recovery appliance (``python -m rocva failover``) is killed; the
  rerun finishes, and the fork's point equals A's disks. B's VMs write on the new
  timeline (B's DRVA or host killed once). A fails the domain back while A's MSA, A's
  appliance or B's MSA is killed; the rerun finishes: every seq B acked is before the
  final mark, A's VMs write on a third timeline (A's DRVA or host killed once), and its
  latest point equals A's disks. The next round fails over again (after the
  operator's cleanup of B's datastore, which the release leaves behind).

After each phase that writes (``final_check``): the VMs are powered off (the filter
drains), every seq acknowledged before a kill is committed (else ``lost``), the store's
segments run without a gap, and the latest point recovers byte-exact to the primaries.

Counted: ``kills`` (a process that was running when SIGKILLed: a RocVA run that had
ended is no kill, and more recoveries make up for it), ``acked_checked`` (the seqs
acknowledged at each kill, found committed afterwards), ``lost`` (an acknowledged seq
missing), ``daemon_crashes`` (a process that did not come back, or restarted without
being killed: its supervisor's restart count), ``failures`` (a recovery not
byte-exact, a job neither finished nor resumable).

The spill journal (``iofilter_sim/spill.py``, issue 14): for each DRVA kill the campaign
keeps the seqs acknowledged around the outage and counts the seqs of any resync window
that overlaps them (``notes["drva_kill_window_seqs"]``): a failure unless the journal
had filled up (its documented fallback to the bitmap, then counted apart). The journal's
high-water mark is its ring file's size (``spill_peak_bytes``). The quick mode writes at
a few MB/s (the outage fits the filter's 64 MiB memory buffer); the long mode adds a
phase at ~100 MB/s (``SpillPlan``, ``spill_*`` notes) whose DRVA restarts outlast it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.procs import children

NAME = "kills"
HOST_A = "esx-a1"
DOMAIN_ID = 1  # erp, cdp/testing/two_sites.py
LEASE_TTL_S = 1.5  # the killed consolidation's maintenance lease: the rerun waits this long at most
LEASE_SKEW_S = 0.1
KILL_AFTER_WORK_S = 0.1  # a RocVA kill lands within this of its first sign of work
CONSOLIDATE_OLDER_S = 0.5
MARK_LOGGED_WITHIN_S = 30.0  # the host's line for a mark (after hashing disks of a few MiB)
RERUNS_FAILED_MAX = 5  # a job rerun after a kill that runs and fails this often is a failure of the campaign


@dataclass(frozen=True)
class SpillPlan:
    rate_mb_s: float  # the workload during the DRVA kills
    write_size: str
    disk: str
    kills: int


@dataclass(frozen=True)
class Plan:
    disk: str  # each of site A's three disks
    rate_mb_s: float
    write_size: str
    ingest_kills: int  # DRVA, host and MSA of site A, while it writes
    recover_kills: int  # `cdp recover` processes
    consolidate_kills: int  # consolidation + retention processes
    rounds: int  # failover + failback rounds (each kills site A whole, then at least two more)
    kill_window_s: tuple[float, float]  # when an ingest kill lands after acks were seen
    spill: SpillPlan | None
    min_kills: int  # RocVA runs that finished before their kill are made up for with more recoveries


QUICK = Plan(disk="4MiB", rate_mb_s=4, write_size="16KiB", ingest_kills=3, recover_kills=6, consolidate_kills=1,
             rounds=0, kill_window_s=(0.0, 0.4), spill=None, min_kills=10)
LONG = Plan(disk="16MiB", rate_mb_s=16, write_size="16KiB", ingest_kills=54, recover_kills=16, consolidate_kills=8,
            rounds=5, kill_window_s=(0.0, 1.5),
            spill=SpillPlan(rate_mb_s=100, write_size="256KiB", disk="64MiB", kills=4), min_kills=100)


def _sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Mark:
    name: str
    seq: int
    sha256: list[str]
    timeline: int = 1


@dataclass
class Ctx:
    """What the campaign keeps while it runs."""

    root: Path
    rng: random.Random
    res: Any
    progress: Any
    plan: Plan
    op: Any = None  # tests.test_failover_sites.Operator
    sites: Any = None  # cdp.testing.two_sites.TwoSites
    store: Any = None
    marks: list[Mark] = field(default_factory=list)
    acked_at_kills: list[tuple[int, int]] = field(default_factory=list)  # (timeline, acked seq)
    # (timeline, seqs acked around a DRVA kill, the spill journal's high-water mark after it)
    drva_outages: list[tuple[int, int, int, int]] = field(default_factory=list)
    spill_kills: list[dict[str, Any]] = field(default_factory=list)  # per DRVA kill: restart, journal, window
    kinds: Counter = field(default_factory=Counter)
    phases: Counter = field(default_factory=Counter)
    rocva: Counter = field(default_factory=Counter)  # how killed RocVA runs ended on their rerun
    restart_s: dict[str, list[float]] = field(default_factory=dict)
    own_kills: dict[str, Counter] = field(default_factory=dict)  # per site and kind, since that site's MSA started
    timeline: int = 1
    window_seqs: int = 0  # seqs of resync windows over DRVA kills' outages (0 unless the journal filled)
    full_journal_window_seqs: int = 0  # of those, behind a journal that had filled up (the bitmap fallback)
    windows_total: int = 0  # resync windows in the catalog (host kills open them: by design)
    spill_peak_bytes: int = 0
    outage_rates: list[float] = field(default_factory=list)  # MB/s the VMs wrote while a DRVA was down
    hosts: dict[str, str] = field(default_factory=dict)  # the home host of erp's VMs at each site
    restart_base: dict[str, dict] = field(default_factory=dict)  # supervisors' restart counts at a baseline

    # ------------------------------------------------------------------ site A's state

    def host_status(self, site: str = "a", host: str | None = None) -> dict[str, Any]:
        cfg = self.sites.a.cfg if site == "a" else self.sites.b.cfg
        host = host or self.hosts.get(site, HOST_A)
        try:
            return json.loads((cfg.state_dir / "hypervisor" / f"{host}.status.json").read_text())
        except (OSError, ValueError):
            return {}

    def acked(self, site: str = "a", host: str | None = None) -> int:
        doc = self.host_status(site, host)
        return int(((doc.get("domains") or {}).get("erp") or {}).get("acked_seq") or 0)

    def mode(self, site: str = "a") -> str | None:
        return ((self.host_status(site).get("domains") or {}).get("erp") or {}).get("mode")

    async def wait_normal(self, site: str = "a") -> None:
        """Until the filter is in normal mode in two of its status documents (written
        every 0.5 s): no resync is left from a host restart."""
        from tests.waiting import EVENTUALLY_S

        deadline, seen = time.monotonic() + EVENTUALLY_S, set()
        while len(seen) < 2:
            doc = self.host_status(site)
            if ((doc.get("domains") or {}).get("erp") or {}).get("mode") == "normal":
                seen.add(doc.get("time"))
            else:
                seen.clear()
            if time.monotonic() > deadline:
                raise _Abort(f"site {site}'s filter not in normal mode after {EVENTUALLY_S:g} s")
            await asyncio.sleep(0.1)

    async def status(self, site: str = "a") -> dict[str, Any]:
        return await asyncio.to_thread(self.op.status, site)

    async def committed(self, timeline: int | None = None) -> int:
        from cdp.catalog import load_catalog

        state, _ = await load_catalog(self.store, DOMAIN_ID)
        if state is None:
            return 0
        return state.timeline(timeline).committed_seq if timeline is not None else state.timeline().committed_seq

    async def api(self, site: str, method: str, path: str, body: Any = None, wait: bool = False) -> Any:
        from cdp.msa.client import MsaClient

        s = self.sites.a if site == "a" else self.sites.b
        async with MsaClient(s.cfg, s.env) as c:
            return await c.request(method, path, body, wait=wait)

    async def wait_committed(self, seq: int, timeline: int | None = None) -> None:
        from tests.waiting import EVENTUALLY_S

        deadline = time.monotonic() + EVENTUALLY_S
        while (got := await self.committed(timeline)) < seq:
            if time.monotonic() > deadline:
                raise _Abort(f"timeline {timeline}: seq {seq} not committed after {EVENTUALLY_S:g} s (at {got})")
            await asyncio.sleep(0.05)

    def killed(self, kind: str, phase: str) -> None:
        self.res.kills += 1
        self.kinds[kind] += 1
        self.phases[phase] += 1

    async def wait(self, predicate: Any, what: str, timeout_s: float | None = None) -> None:
        from tests.waiting import EVENTUALLY_S, wait_until

        await wait_until(predicate, timeout_s or EVENTUALLY_S, what)


def _pgkill(pid: int) -> bool:
    """SIGKILL ``pid``'s process group (each kept child leads its own session); True if it was there."""
    try:
        os.killpg(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def _alive(pid: int) -> bool:
    from cdp.msa.procs import pid_alive

    return pid_alive(pid)


# ---------------------------------------------------------------------- ingest kills


async def _up_again(ctx: Ctx, site: str, acked_before: int, old_pids: dict[str, int | None], kind: str,
                    t_kill: float, record: bool = True) -> bool:
    """Wait until the site's DRVA and host run (new pids where one was killed) and acks
    flow past ``acked_before``; False (a daemon crash counted) if they do not."""
    from tests.waiting import EVENTUALLY_S

    deadline = time.monotonic() + EVENTUALLY_S
    while True:
        try:
            doc = await ctx.status(site)
        except Exception:  # noqa: BLE001  (the daemon restarting: ask again)
            doc = None
        if doc is not None:
            drvas = [d for d in doc["drvas"] if d.get("domains")]
            vms = doc.get("vms") or []
            drva_ok = all(d["state"] == "up" and d.get("pid") and d["pid"] != old_pids.get("drva") for d in drvas) \
                if kind in ("drva", "msa") else all(d["state"] == "up" for d in drvas)
            host_ok = all(v["state"] == "up" and v.get("pid") and
                          (kind == "drva" or v["pid"] != old_pids.get("sim")) for v in vms)
            hs = ctx.host_status(site)
            if drva_ok and host_ok and vms and hs.get("pid") == vms[0]["pid"] and ctx.acked(site) > acked_before:
                if record:
                    ctx.restart_s.setdefault(kind, []).append(round(time.monotonic() - t_kill, 2))
                return True
        if time.monotonic() > deadline:
            ctx.res.problem("daemon_crashes", f"site {site} did not write again {EVENTUALLY_S:g} s after the {kind} "
                                              f"kill (acked {acked_before}): {ctx.op.logs()[-1500:]}")
            return False
        await asyncio.sleep(0.1)


async def kill_one(ctx: Ctx, kind: str, site: str = "a", phase: str = "ingest") -> bool:
    """SIGKILL site ``site``'s DRVA, host (``sim``) or MSA, and wait until it writes again."""
    doc = await ctx.status(site)
    drva = next(d for d in doc["drvas"] if d.get("domains"))
    vm = doc["vms"][0]
    old = {"drva": drva["pid"], "sim": vm["pid"]}
    acked_before = ctx.acked(site)
    written_before = int(((ctx.host_status(site).get("domains") or {}).get("erp") or {}).get("bytes") or 0)
    t = time.monotonic()
    if kind == "drva":
        ok = _pgkill(drva["pid"])
    elif kind == "sim":
        ok = _pgkill(vm["pid"])
    else:
        proc = ctx.op.daemons.pop(site)
        proc.kill()  # the MSA alone: its children run on, the next daemon stops them
        proc.wait(10)
        ok = True
    if not ok:
        ctx.res.problem("daemon_crashes", f"site {site}'s {kind} (pid {old.get(kind)}) was gone before its kill")
        return False
    ctx.killed(kind, phase)
    ctx.acked_at_kills.append((ctx.timeline, acked_before))
    if kind == "msa":
        await asyncio.to_thread(ctx.op.start_daemon, site)
        ctx.restart_base[site], ctx.own_kills[site] = {}, Counter()  # a new daemon counts from 0
    else:
        ctx.own_kills.setdefault(site, Counter())[kind] += 1
    up = await _up_again(ctx, site, acked_before, old, kind, t)
    if up and kind == "drva":
        written = int(((ctx.host_status(site).get("domains") or {}).get("erp") or {}).get("bytes") or 0)
        ctx.outage_rates.append((written - written_before) / 1e6 / max(1e-3, time.monotonic() - t))
        high = 0
        with contextlib.suppress(OSError):
            high = _spill_file(ctx, site).stat().st_size
        ctx.spill_peak_bytes = max(ctx.spill_peak_bytes, high)
        after = ctx.acked(site)
        ctx.drva_outages.append((ctx.timeline, acked_before, after, high))
        ctx.spill_kills.append({"restart_s": ctx.restart_s["drva"][-1], "mb_s": round(ctx.outage_rates[-1], 1),
                                "journal_high_water_bytes": high, "seqs": (acked_before, after)})
    return up


async def place_mark(ctx: Ctx, site: str = "a") -> Mark | None:
    name = f"k{len(ctx.marks)}-{ctx.rng.randrange(1 << 30):x}"
    try:
        record = await ctx.api(site, "POST", "/v1/domains/erp/marks", {"name": name}, wait=True)
    except Exception as exc:  # noqa: BLE001
        ctx.res.problem("failures", f"mark {name} at site {site} refused: {exc}")
        return None
    if record.get("state") != "succeeded":
        if "bitmap or resync mode" in (record.get("error") or ""):  # refused as documented: no point there
            ctx.rocva["marks_refused_in_resync"] += 1
        else:
            ctx.res.problem("failures", f"mark {name} at site {site}: {record.get('error')}")
        return None
    cfg = ctx.sites.a.cfg if site == "a" else ctx.sites.b.cfg
    log_path = cfg.state_dir / "hypervisor" / f"{ctx.hosts.get(site, HOST_A)}.marks.jsonl"
    # The host appends the line once it has hashed the disks (a worker thread reads them
    # as they were at the mark): wait for it. A host killed meanwhile, or one that gave up
    # hashing (``sha256`` null), leaves a mark with nothing to check a recovery against.
    deadline = time.monotonic() + MARK_LOGGED_WITHIN_S
    while True:
        m = _logged_mark(log_path, name)
        if m is not None and m.get("sha256"):
            mark = Mark(name, int(m["seq"]), list(m["sha256"]), ctx.timeline)
            ctx.marks.append(mark)
            return mark
        if m is not None or time.monotonic() > deadline:
            ctx.rocva["marks_unhashed"] += 1
            return None
        await asyncio.sleep(0.1)


def _logged_mark(log_path: Path, name: str) -> dict | None:
    try:
        lines = log_path.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            m = json.loads(line)
            if isinstance(m, dict) and m.get("name") == name:
                return m
    return None


async def baseline(ctx: Ctx, site: str = "a") -> None:
    """From here on, every restart site ``site``'s supervisors count must be a kill of
    ours (a protect or a failback restarts a DRVA on purpose: call this after them)."""
    doc = await ctx.status(site)
    ctx.restart_base[site] = {**{("drva", d["name"]): d["restarts"] for d in doc["drvas"]},
                              **{("sim", v["host"]): v["restarts"] for v in doc.get("vms") or []}}
    ctx.own_kills[site] = Counter()


async def check_daemon_restarts(ctx: Ctx, site: str = "a") -> None:
    """Every restart the supervisors counted since ``baseline`` was a kill of ours: none
    crashed on its own."""
    doc = await ctx.status(site)
    ours = ctx.own_kills.get(site, Counter())
    base = ctx.restart_base.get(site, {})
    for kind, name, restarts, error in [("drva", d["name"], d["restarts"], d.get("last_error")) for d in doc["drvas"]] + \
            [("sim", v["host"], v["restarts"], v.get("last_error")) for v in doc.get("vms") or []]:
        if restarts - base.get((kind, name), 0) > ours[kind]:
            ctx.res.problem("daemon_crashes", f"site {site}'s {kind} {name} restarted "
                                              f"{restarts - base.get((kind, name), 0)} times, killed "
                                              f"{ours[kind]}: {error}")


async def ingest(ctx: Ctx, n: int) -> None:
    kinds = ["drva", "sim", "msa"] * (n // 3) + [ctx.rng.choice(["drva", "sim"]) for _ in range(n % 3)]
    ctx.rng.shuffle(kinds)
    for i, kind in enumerate(kinds):
        if i == 0:  # after a kill, the wait for the site's comeback saw acks flow again
            before = ctx.acked()
            await ctx.wait(lambda: ctx.acked() > before, "site A's writes acknowledged")
        if i % 3 == 0 or kind == "drva":  # no resync left from a host kill: a mark can be placed, and a
            await ctx.wait_normal()  # window that starts during the DRVA's outage is the DRVA kill's
        if i % 3 == 0:
            await place_mark(ctx)
        await asyncio.sleep(ctx.rng.uniform(*ctx.plan.kill_window_s))  # the random moment (waits for nothing)
        if not await kill_one(ctx, kind):
            raise _Abort(f"ingest kill {i} ({kind})")
        if i % 5 == 4 or ctx.plan is QUICK:
            ctx.progress(f"kills: ingest {i + 1}/{n} kills ({dict(ctx.kinds)})")
    await check_daemon_restarts(ctx)


class _Abort(Exception):
    """A process did not come back: the rest of the campaign cannot run."""


# ---------------------------------------------------------------------- RocVA kills


def _popen(ctx: Ctx, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A RocVA process in its own session (killed with its group; ``_cleanup`` kills it
    if the campaign stops before it does)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, cwd=ctx.root, env=ctx.op.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    ctx.op.background.append(proc)
    return proc


async def _kill_during(ctx: Ctx, proc: subprocess.Popen[bytes], started: Any, phase: str) -> bool:
    """SIGKILL ``proc`` at a random moment: half the time anywhere from its start, half
    the time soon after ``started()`` says it does its work. True if it was running."""
    if ctx.rng.random() < 0.5:
        await asyncio.sleep(ctx.rng.uniform(0.2, 1.0))
    else:
        deadline = time.monotonic() + 30
        while not started() and proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(ctx.rng.uniform(0.0, KILL_AFTER_WORK_S))
    if proc.poll() is not None:
        proc.wait()
        return False
    _pgkill(proc.pid)
    proc.wait(10)
    ctx.killed("rocva", phase)
    return True


async def recoveries(ctx: Ctx, n: int) -> None:
    """Kill ``cdp recover`` runs, rerun each to the end: byte-exact at its mark."""
    from tests.test_walkthrough import CDP

    attempts = 0
    landed = 0
    while landed < n and attempts < 4 * n:
        attempts += 1
        mark = ctx.rng.choice([m for m in ctx.marks if m.timeline == ctx.timeline] or [None])
        if mark is None:
            ctx.res.problem("failures", "no mark to recover at")
            return
        out = ctx.root / f"recover-{attempts}"
        proc = _popen(ctx, [*CDP, "recover", "erp", "--store", ctx.sites.a.cfg.store_url, "--seq", str(mark.seq),
                            "--timeline", str(mark.timeline), "--to", str(out), "--json"], ctx.root / "recover.log")
        killed = await _kill_during(ctx, proc, lambda: (out / "recover.state.json").exists(), "recovery")
        landed += killed
        if killed:
            await recover_exact(ctx, mark, out, "rerun of a killed recovery")
        else:
            ctx.rocva["recover_done_before_kill"] += 1


async def recover_exact(ctx: Ctx, mark: Mark, out: Path, what: str) -> bool:
    from rocva import RecoverOptions, Target, recover
    from rocva.recover import PARTIAL_SUFFIX, STATE_NAME

    ctx.rocva["recoveries_checked"] += 1
    left = {p.name for p in out.iterdir()} if out.exists() else set()
    names = [f"{d.vm.name}-{d.disk.name}.img" for d in ctx.sites.a.cfg.domain("erp").disks]
    if left.issuperset(names) and STATE_NAME not in left and not any(n.endswith(PARTIAL_SUFFIX) for n in left):
        # Killed after it published every image and dropped its state (it was exiting,
        # perhaps before it removed its lock file): finished; a rerun would refuse to
        # overwrite them. Check what it left. (Killed before it wrote its state, it may
        # have left its lock file alone: a rerun then starts over.)
        result = {"images": [{"path": out / n} for n in names]}
        ctx.rocva["finished_at_kill"] += 1
    else:
        try:
            result = await recover(ctx.store, DOMAIN_ID,
                                   RecoverOptions(Target.seq(mark.seq), out, timeline=mark.timeline))
        except Exception as exc:  # noqa: BLE001
            ctx.res.problem("failures", f"{what} at seq {mark.seq} (mark {mark.name}): {type(exc).__name__}: {exc}")
            return False
        if out.name.startswith("recover-"):
            ctx.rocva["resumed" if result.get("resumed") else "restarted"] += 1
    got = [await asyncio.to_thread(_sha256, i["path"]) for i in result["images"]]
    if got != mark.sha256:
        ctx.res.problem("failures", f"{what} at seq {mark.seq} (mark {mark.name}) differs from the primaries "
                                    f"there: {got} != {mark.sha256}")
        return False
    ctx.rocva["recoveries_exact"] += 1
    return True


CONSOLIDATE_CHILD = """
import asyncio, json, sys
from cdp.store import open_store
from rocva.consolidate import consolidate
url, older, retention, ttl, skew = sys.argv[1], *map(float, sys.argv[2:6])
async def main():
    store = open_store(url)
    try:
        r = await consolidate(store, 1, older_than_s=older, retention_s=retention, lease_ttl_s=ttl, skew_s=skew)
    finally:
        await store.close()
    print(json.dumps({"consolidated_seq": r["consolidated_seq"], "horizon_seq": r["horizon_seq"]}))
asyncio.run(main())
"""


async def consolidations(ctx: Ctx, n: int, t0: float) -> None:
    """Kill consolidation + retention runs, rerun each to the end, then recover the
    marks the retention kept (and the latest check at the end covers the rest)."""
    from cdp.errors import Busy, LeaseLost
    from rocva.consolidate import consolidate

    landed = attempts = 0
    while landed < n and attempts < 4 * n:
        attempts += 1
        # The horizon falls after the previous run's base most times: segments go.
        retention = max(1.0, (time.monotonic() - t0) * ctx.rng.uniform(0.3, 0.9))
        lock_dir = ctx.sites.store / "l"
        before = {p for p in lock_dir.rglob("*.lock")} if lock_dir.exists() else set()
        proc = _popen(ctx, [sys.executable, "-c", CONSOLIDATE_CHILD, ctx.sites.a.cfg.store_url,
                            str(CONSOLIDATE_OLDER_S), str(retention), str(LEASE_TTL_S), str(LEASE_SKEW_S)],
                      ctx.root / "consolidate.log")

        def started() -> bool:
            return lock_dir.exists() and any(p not in before for p in lock_dir.rglob("*.lock"))

        killed = await _kill_during(ctx, proc, started, "consolidation")
        landed += killed
        if not killed:
            ctx.rocva["consolidate_done_before_kill"] += 1
            continue
        deadline = time.monotonic() + LEASE_TTL_S + LEASE_SKEW_S + 30
        while True:
            try:
                r = await consolidate(ctx.store, DOMAIN_ID, older_than_s=CONSOLIDATE_OLDER_S, retention_s=retention,
                                      lease_ttl_s=LEASE_TTL_S, skew_s=LEASE_SKEW_S)
                ctx.rocva["consolidations_finished"] += 1
                ctx.rocva["bases"] += int(r["bases_added"] or 0)
                ctx.rocva["segments_removed"] += int(r["segments_removed"] or 0)
                break
            except LeaseLost as exc:  # a stall past its renewal (a loaded machine): it stopped, rerun it
                ctx.rocva["lease_lost_reruns"] += 1
                if time.monotonic() > deadline:
                    ctx.res.problem("failures", f"the rerun of a killed consolidation kept losing its lease: {exc}")
                    return
            except Busy:  # the killed run's lease: it expires within LEASE_TTL_S + skew
                if time.monotonic() > deadline:
                    ctx.res.problem("failures", "a killed consolidation's lock never expired: the job cannot resume")
                    return
                ctx.rocva["waited_for_dead_lease"] += 1
                await asyncio.sleep(0.2)
            except Exception as exc:  # noqa: BLE001
                ctx.res.problem("failures", f"the rerun of a killed consolidation failed: {type(exc).__name__}: {exc}")
                return
        t0 = time.monotonic()
        horizon = int(r["horizon_seq"] or 0)
        kept = [m for m in ctx.marks if m.timeline == ctx.timeline and m.seq > horizon]
        for m in kept[-2:]:
            await recover_exact(ctx, m, ctx.root / f"after-consolidation-{attempts}-{m.name}",
                                "recovery after a killed consolidation")


# ---------------------------------------------------------------------- the end of a site's run


def _spill_file(ctx: Ctx, site: str = "a") -> Path:
    return Path(f"{ctx.op.site_cfg(site).domain('erp').disks[0].disk.image}.spill")


async def final_check(ctx: Ctx, site: str = "a") -> None:
    """Power the VMs off (the filter drains), wait until their last acked seq is
    committed; then every acknowledged seq of every kill is committed, the store's rows
    run without a gap, no resync window overlaps a DRVA kill's outage, and the latest
    point equals the primaries byte for byte."""
    from cdp.catalog import load_catalog
    from cdp.catalog_read import CatalogView
    from rocva import RecoverOptions, Target, recover

    off = await ctx.api(site, "POST", "/v1/domains/erp/power", {"on": False})
    acked = int(off.get("acked_seq") or 0)
    tl = ctx.timeline
    await ctx.wait_committed(acked, tl)
    head, generation = await load_catalog(ctx.store, DOMAIN_ID)
    view = CatalogView(ctx.store, head, generation)
    timeline = head.timeline(tl)
    committed = timeline.committed_seq
    for t, seq in ctx.acked_at_kills:
        if t != tl:
            continue
        if seq > committed:
            ctx.res.problem("lost", f"seq {seq} was acknowledged before a kill; timeline {t} commits {committed}",
                            seq - committed)
        else:
            ctx.res.acked_checked += seq - (timeline.fork_seq if t > 1 else 0)
    if tl == head.current:
        rows = await view.rows_between(timeline.horizon_seq + 1, committed)
        expect = int(rows["first_seq"][0]) if len(rows) else committed + 1
        for row in rows:
            if int(row["first_seq"]) != expect:
                ctx.res.problem("lost", f"timeline {tl}: seqs {expect}..{int(row['first_seq']) - 1} missing from "
                                        f"the store's segments", int(row["first_seq"]) - expect)
            expect = int(row["last_seq"]) + 1
    from iofilter_sim.spill import SPILL_BYTES_MAX

    for t, lo, hi, high in ctx.drva_outages:
        seqs = 0
        for w in head.timeline(t).windows:  # the windows that opened during the outage
            if lo < w["first_seq"] <= hi:
                last = w["last_seq"] if w["last_seq"] is not None else head.timeline(t).committed_seq
                seqs += max(0, min(last, hi) - w["first_seq"] + 1)
        ctx.window_seqs += seqs
        for k in ctx.spill_kills:
            if k.get("seqs") == (lo, hi):
                k["window_seqs"] = seqs
        if seqs and high >= SPILL_BYTES_MAX * 0.9:  # full: the documented fallback to the bitmap
            ctx.full_journal_window_seqs += seqs
        elif seqs:
            ctx.res.problem("failures", f"a DRVA kill (seqs {lo}..{hi} acked around it) opened a resync window of "
                                        f"{seqs} seqs, its spill journal at {high} of {SPILL_BYTES_MAX} bytes")
    ctx.windows_total = sum(len(t.windows) for t in head.timelines.values())
    ctx.drva_outages = []
    expected = ctx.sites.primaries_a() if site == "a" else \
        [await asyncio.to_thread(_sha256, d.disk.image) for d in ctx.op.site_cfg("b").domain("erp").disks]
    out = ctx.root / f"latest-{site}-{tl}"
    ctx.rocva["recoveries_checked"] += 1
    result = await recover(ctx.store, DOMAIN_ID, RecoverOptions(Target.latest(), out, timeline=tl))
    got = [await asyncio.to_thread(_sha256, i["path"]) for i in result["images"]]
    if result["seq"] != acked and acked:
        ctx.res.problem("lost", f"the latest point of timeline {tl} is seq {result['seq']}, the VMs' last ack {acked}")
    if got != expected:
        ctx.res.problem("failures", f"the latest point of timeline {tl} (seq {result['seq']}) differs from site "
                                    f"{site}'s disks")
    else:
        ctx.rocva["recoveries_exact"] += 1


# ---------------------------------------------------------------------- the campaign


def _scratch() -> str | None:
    """A tmpfs when there is one: the sites' partitions, disks and store (a SIGKILL loses
    no page the kernel holds, so a RAM-backed file system changes nothing the campaign
    checks, and spares the disk a few GB in the long run)."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def _leftovers(ctx: Ctx) -> None:
    """Kill whatever a site's killed daemon left running (its pid files, FORMAT.md §13.13)."""
    from cdp.msa.keeper import _leftover

    for s in (ctx.sites.a, ctx.sites.b) if ctx.sites is not None else ():
        logs = s.cfg.state_dir / "logs"
        for p in logs.glob("*.pid") if logs.exists() else ():
            if (found := _leftover(p)) is not None:
                _pgkill(found[0])


async def _start_site_a(ctx: Ctx, rate_mb_s: float, write_size: str, disk: str) -> None:
    from cdp.store.fs import FileStore
    from cdp.testing.two_sites import make_two_sites
    from tests.test_failover_sites import Operator

    workload = {"kind": "random", "rate_mb_s": rate_mb_s, "write_size": write_size}
    ctx.root.mkdir(exist_ok=True)
    ctx.sites = make_two_sites(ctx.root, disk=disk, workload=workload)
    ctx.op = Operator(ctx.sites, ctx.root)
    ctx.store = FileStore(ctx.sites.store)
    await asyncio.to_thread(ctx.op.start_daemon, "a")
    await ctx.api("a", "POST", "/v1/domains/erp/power", {"on": True})
    await ctx.wait(lambda: ctx.acked() > 0, "site A's first writes acknowledged")
    await baseline(ctx, "a")


async def _sites(ctx: Ctx) -> None:
    plan = ctx.plan
    await _start_site_a(ctx, plan.rate_mb_s, plan.write_size, plan.disk)
    ctx.progress("kills: site A writes")
    t0 = time.monotonic()
    await ingest(ctx, plan.ingest_kills)
    ctx.progress(f"kills: ingest done, {ctx.res.kills} kills; recoveries")
    await recoveries(ctx, plan.recover_kills)
    ctx.progress(f"kills: {ctx.res.kills} kills; consolidations")
    await consolidations(ctx, plan.consolidate_kills, t0)
    later = 4 * plan.rounds + (plan.spill.kills if plan.spill else 0)  # the failover rounds and the spill phase
    if ctx.res.kills + later < plan.min_kills:
        await recoveries(ctx, plan.min_kills - later - ctx.res.kills)
    await check_daemon_restarts(ctx)
    ctx.progress(f"kills: {ctx.res.kills} kills; final check of timeline 1")
    await final_check(ctx)
    for i in range(plan.rounds):
        ctx.progress(f"kills: {ctx.res.kills} kills; failover round {i + 1}/{plan.rounds}")
        await failover_round(ctx)


async def _spill(ctx: Ctx, spill: SpillPlan) -> None:
    """DRVA kills under the daemon with the VMs writing at ``spill.rate_mb_s``: the DRVA's
    restart outlasts the filter's 64 MiB memory buffer, the journal holds the frames.
    Before each kill but the first the daemon is restarted (SIGTERM: the host drains),
    so that each restart is the supervisor's first back-off step and each journal is
    new (its file's size is that kill's high-water mark)."""
    from tests.test_walkthrough import _stop

    await _start_site_a(ctx, spill.rate_mb_s, spill.write_size, spill.disk)
    for i in range(spill.kills):
        if i:
            doc = await ctx.status("a")
            old = {"drva": next(d for d in doc["drvas"] if d.get("domains"))["pid"], "sim": doc["vms"][0]["pid"]}
            acked = ctx.acked()
            await asyncio.to_thread(_stop, ctx.op.daemons.pop("a"))
            await asyncio.to_thread(ctx.op.start_daemon, "a")
            if not await _up_again(ctx, "a", acked, old, "msa", time.monotonic(), record=False):
                raise _Abort("site A did not write again after a daemon restart")
            await baseline(ctx, "a")
        await ctx.wait_normal()
        await asyncio.sleep(ctx.rng.uniform(0.5, 1.5))  # the random moment (and the rate is reached)
        if not await kill_one(ctx, "drva", "a", "spill"):
            raise _Abort(f"spill kill {i}")
        await check_daemon_restarts(ctx)
    await final_check(ctx)


async def _job(ctx: Ctx, site: str, path: str, body: dict[str, Any], phase: str,
               targets: tuple[str, ...]) -> dict[str, Any] | None:
    """Start a failover or failback job at ``site`` and SIGKILL, at a random moment of
    its run, its recovery appliance (``python -m rocva``), the site's MSA, or the other
    site's MSA (``peer``); restart the MSA killed, rerun the job until it ends. Its
    output (None: a failure counted)."""
    from tests.waiting import EVENTUALLY_S

    other = "b" if site == "a" else "a"
    daemon_pid = ctx.op.daemons[site].pid
    started = await ctx.api(site, "POST", path, body)
    target = ctx.rng.choice(targets)
    ctx.rocva[f"{phase}_kill_{target}"] += 1
    appliance = None
    if target == "appliance":
        deadline = time.monotonic() + EVENTUALLY_S
        while appliance is None and time.monotonic() < deadline:
            found = children(daemon_pid, b"rocva")
            if found:
                appliance = found[0]
            elif (await ctx.api(site, "GET", f"/v1/jobs/{started['id']}"))["state"] not in ("running", "queued"):
                break
            else:
                await asyncio.sleep(0.01)
        await asyncio.sleep(ctx.rng.uniform(0.0, 0.3))
    else:
        await asyncio.sleep(ctx.rng.uniform(0.0, 1.5))
    record = await ctx.api(site, "GET", f"/v1/jobs/{started['id']}")
    if record["state"] not in ("running", "queued"):  # it ended before the kill: no kill
        ctx.rocva[f"{phase}_done_before_kill"] += 1
        if record["state"] == "succeeded":
            return record["output"]
        ctx.rocva[f"{phase}_failed_before_kill"] += 1  # (say, a quiesce in resync mode): rerun below
        target = "none"
    elif target == "appliance" and appliance is not None and _alive(appliance):
        os.kill(appliance, signal.SIGKILL)
        ctx.killed("rocva", phase)
    elif target != "none":
        if target == "appliance":  # it was gone before its kill: the job's MSA instead
            target = "msa"
        victim = other if target == "peer" else site
        proc = ctx.op.daemons.pop(victim)
        proc.kill()
        proc.wait(10)
        ctx.killed("msa", phase)
        if appliance is not None:
            await ctx.wait(lambda: not _alive(appliance), "the appliance gone with its MSA")
        await asyncio.to_thread(ctx.op.start_daemon, victim)
        ctx.restart_base[victim], ctx.own_kills[victim] = {}, Counter()
    if target in ("appliance", "peer"):  # the job's MSA lives: the job ends by itself (failed, or done anyway)
        deadline = time.monotonic() + 2 * EVENTUALLY_S
        while (record := await ctx.api(site, "GET", f"/v1/jobs/{started['id']}"))["state"] in ("running", "queued"):
            if time.monotonic() > deadline:
                ctx.res.problem("failures", f"{phase} at site {site} still runs {2 * EVENTUALLY_S:g} s after "
                                            f"its {target} was killed")
                return None
            await asyncio.sleep(0.1)
        if record["state"] == "succeeded":
            ctx.rocva[f"{phase}_finished_despite_kill"] += 1
            return record["output"]
    # Reruns until one succeeds: refused (409 busy) as long as the killed run is still
    # ending, which a deadline bounds (a count of tries ran out on a slow machine's
    # long ending); a rerun that ran and failed counts against RERUNS_FAILED_MAX.
    errors: list[str] = []
    failed = 0
    deadline = time.monotonic() + 2 * EVENTUALLY_S
    while failed < RERUNS_FAILED_MAX and time.monotonic() < deadline:
        try:
            rerun = await ctx.api(site, "POST", path, body, wait=True)
        except Exception as exc:  # noqa: BLE001  (409 busy: the killed run is still ending)
            errors = [*errors[-4:], str(exc)]
            await asyncio.sleep(0.5)
            continue
        if rerun["state"] == "succeeded":
            ctx.rocva[f"{phase}_resumed" if (rerun["output"] or {}).get("resumed") else f"{phase}_rerun"] += 1
            return rerun["output"]
        failed += 1
        errors = [*errors[-4:], rerun.get("error") or ""]
        await asyncio.sleep(0.5)
    ctx.res.problem("failures", f"{phase} at site {site} never finished after its {target} was killed "
                                f"({failed} reruns failed; last errors: {errors})")
    return None


async def failover_round(ctx: Ctx) -> None:
    """Site A's VMs are off and everything they had acked is committed (``final_check``):
    B fails the domain over at the latest point (a process killed during it), B's VMs
    write (B's DRVA or host killed once), A fails it back (a process killed during it),
    A's VMs write (A's DRVA or host killed once), and ``final_check`` checks A's new timeline."""
    from tests.waiting import EVENTUALLY_S

    expected = ctx.sites.primaries_a()
    fork_expected = await ctx.committed()
    if "b" not in ctx.op.daemons:
        await asyncio.to_thread(ctx.op.start_daemon, "b")
    out = await _job(ctx, "b", "/v1/failover/erp", {"target": "latest"}, "failover", ("appliance", "msa"))
    if out is None:
        raise _Abort("the failover did not finish")
    tl = int(out["timeline"])
    if int(out["fork_seq"]) != fork_expected:
        ctx.res.problem("lost", f"failover forked at seq {out['fork_seq']}, A had committed {fork_expected}",
                        max(0, fork_expected - int(out["fork_seq"])))
    await recover_exact(ctx, Mark("failover-fork", int(out["fork_seq"]), expected, tl),
                        ctx.root / f"fork-{tl}", "the failover's point")
    ctx.timeline = tl
    doc = await ctx.status("b")
    ctx.hosts["b"] = next(v["host"] for v in doc["vms"] if v["domain"] == "erp")
    await ctx.wait(lambda: ctx.acked("b") > int(out["fork_seq"]), "B's writes acknowledged on the new timeline")
    await _kill_on_the_new_timeline(ctx, "b", "failover", "site B did not come back")

    await ctx.wait_normal("b")  # B quiesces at a final mark: not while its filter resyncs
    back = await _job(ctx, "a", "/v1/failback/erp", {}, "failback", ("appliance", "msa", "peer"))
    if back is None:
        raise _Abort("the failback did not finish")
    for t, seq in ctx.acked_at_kills:  # B's acks before the final mark: all on timeline tl
        if t == tl:
            if seq > int(back["fork_seq"]):
                ctx.res.problem("lost", f"B acked seq {seq} before a kill; the failback's final mark is at "
                                        f"{back['fork_seq']}", seq - int(back["fork_seq"]))
            else:
                ctx.res.acked_checked += seq - int(out["fork_seq"])
    ctx.timeline = int(back["timeline"])
    # The release moves B's images of this failover aside (+released/erp-*), so that the
    # next failover to B rehydrates fresh ones; what was moved aside is the operator's
    # to remove, done here to keep the campaign's datastore small.
    datastore = ctx.sites.b.cfg.cluster.state_dir
    if (datastore / "erp").exists():
        ctx.res.problem("failures", f"the release left {datastore / 'erp'} in place: the next failover to B "
                                    f"would refuse to overwrite it")
    for kept in datastore.glob("+released/erp-*"):
        shutil.rmtree(kept)
        ctx.rocva["b_datastore_cleanups"] += 1
    deadline = time.monotonic() + EVENTUALLY_S
    while ctx.acked("a") <= int(back["fork_seq"]) or ctx.host_status("a").get("pid") is None:
        if time.monotonic() > deadline:
            raise _Abort("A's VMs did not write after the failback")
        await asyncio.sleep(0.1)
    await _kill_on_the_new_timeline(ctx, "a", "failback", "site A did not come back after the failback")
    await final_check(ctx)


async def _kill_on_the_new_timeline(ctx: Ctx, site: str, phase: str, why: str) -> None:
    """Once ``site`` writes on the timeline a failover or failback gave it: one SIGKILL
    of its DRVA or host at a random moment, and the site must come back (else ``_Abort``
    with ``why``) with no restart of ours unaccounted for."""
    await baseline(ctx, site)
    await ctx.wait_normal(site)
    await asyncio.sleep(ctx.rng.uniform(*ctx.plan.kill_window_s))
    if not await kill_one(ctx, ctx.rng.choice(("drva", "sim")), site, phase):
        raise _Abort(why)
    await check_daemon_restarts(ctx, site)


def _cleanup(ctx: Ctx) -> None:
    if ctx.op is not None:
        ctx.op.stop_all()
    _leftovers(ctx)


def _run_part(ctx: Ctx, part: Any) -> None:
    try:
        asyncio.run(part)
    except _Abort as exc:
        ctx.res.problem("failures", f"campaign stopped: {exc}")
    except AssertionError as exc:  # a wait that timed out: a process did not come back
        ctx.res.problem("daemon_crashes", f"campaign stopped: {str(exc)[:1500]}")
    except Exception as exc:  # noqa: BLE001  (counted, and the processes cleaned up)
        import traceback

        ctx.res.problem("failures", f"campaign stopped: {type(exc).__name__}: {exc}\n"
                                    f"{''.join(traceback.format_tb(exc.__traceback__)[-4:])}")
    finally:
        _cleanup(ctx)


def run(quick: bool = False, seed: int = 14, progress=lambda line: None) -> Any:
    from tests.torture.result import Result

    plan = QUICK if quick else LONG
    res = Result(NAME)
    started = time.monotonic()
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="torture-kills-", dir=_scratch()) as tmp:
        ctx = Ctx(Path(tmp), rng, res, progress, plan)
        _run_part(ctx, _sites(ctx))
        spill = None
        if plan.spill is not None:
            progress(f"kills: {res.kills} kills; DRVA kills at {plan.spill.rate_mb_s:g} MB/s (the spill journal)")
            spill = Ctx(Path(tmp) / "spill", rng, res, progress, plan)
            _run_part(spill, _spill(spill, plan.spill))
    res.elapsed_s = time.monotonic() - started
    both = [c for c in (ctx, spill) if c is not None]
    res.notes = {
        "kinds": dict(sum((c.kinds for c in both), Counter())),
        "phases": dict(sum((c.phases for c in both), Counter())), "marks": len(ctx.marks),
        "rocva": dict(ctx.rocva), "restart_s_max": {k: max(v) for k, v in ctx.restart_s.items()},
        "timelines": ctx.timeline,
    }
    for label, c, rate in (("", ctx, plan.rate_mb_s), ("spill_", spill, plan.spill and plan.spill.rate_mb_s)):
        if c is None:
            continue
        res.notes.update({
            f"{label}workload_mb_s": rate,
            f"{label}outage_rate_mb_s": round(sum(c.outage_rates) / len(c.outage_rates), 1) if c.outage_rates else None,
            f"{label}drva_kills": len(c.restart_s.get("drva", [])),
            **({f"{label}drva_kill_figures": [{k: v for k, v in d.items() if k != "seqs"} for d in c.spill_kills]}
               if label else {"drva_restart_s_max": max(c.restart_s.get("drva", [0]))}),
            f"{label}drva_kill_window_seqs": c.window_seqs,
            f"{label}drva_kill_window_seqs_journal_full": c.full_journal_window_seqs,
            f"{label}resync_windows": c.windows_total, f"{label}spill_peak_bytes": c.spill_peak_bytes,
        })
    return res
