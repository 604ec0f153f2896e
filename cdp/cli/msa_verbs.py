"""``cdp daemon`` and the verbs that talk to it: protect, unprotect, status, mark, jobs.

Each verb is a thin REST call (``cdp.msa.client``); the daemon does the work. ``cdp jobs``
reads ``<state_dir>/jobs`` itself when no daemon runs.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click

from cdp.cli.common import FiniteRange, config_option, emit, json_option, one_point, point_options, progress_bar
from cdp.errors import CdpError, ConfigError
from cdp.msa.jobs import FINAL
from cdp.tomlread import printable

FOLLOW_POLL_S = 0.5
#: A followed record that still says running this long past its job's timeout (which ends
#: the job) can no longer change: following it stops, saying so.
FOLLOW_GRACE_S = 60.0
#: `cdp jobs --limit 1000`: up to 1,000 records of a few KB (200 events at most), from this
#: site's own daemon; one record alone is bounded by the client's default.
JOBS_ANSWER_BYTES_MAX = 64 << 20


# ---------------------------------------------------------------------- calling the daemon


def _site(config_path: Path) -> Any:
    from cdp.msa.config import load_site_config

    return load_site_config(config_path)


def _call(config_path: Path, work: Callable[[Any], Awaitable[Any]]) -> Any:
    from cdp.msa.client import MsaClient

    cfg = _site(config_path)

    async def run() -> Any:
        async with MsaClient(cfg) as client:
            return await work(client)

    return asyncio.run(run())


def _job_result(record: dict[str, Any]) -> dict[str, Any]:
    """The record of a job that ended; a job that did not succeed is an error with its code."""
    from cdp.msa.client import DaemonError

    if not isinstance(record, dict):
        raise DaemonError(f"daemon: expected a job record, got {type(record).__name__}", 200, "not_a_job")
    if record.get("state") != "succeeded":  # DaemonError escapes what the record says, checks its exit code
        raise DaemonError(f"job {record.get('id')} {record.get('state')}: {record.get('error')}", 200,
                          str(record.get("state")), record.get("exit_code"))
    return record


# ---------------------------------------------------------------------- text for people


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _seed_uploads(slots: Any) -> str:
    """A DRVA's seed upload slots (its status's ``seed_uploads``): used / all, and the
    sessions waiting for one; - from a DRVA that does not say."""
    if not isinstance(slots, dict):
        return "-"
    waiting = slots.get("sessions_waiting")
    return f"{slots.get('slots_used', '-')}/{slots.get('slots', '-')}" + (f", {waiting} waiting" if waiting else "")


def _lanes_table(drvas: list[dict[str, Any]], names: dict[Any, str]) -> list[str]:
    """Each DRVA's store lanes with their frame budgets (held / max, the sessions waiting
    for a share and the bytes they wait for); nothing when no DRVA says (an older one).
    A lane lists its domains by id (the DRVA's): shown by name where ``names`` has it."""
    rows = [["DRVA", "STORE", "DOMAINS", "FRAME BUDGET HELD / MAX", "WAITING FOR IT"]]
    for d in drvas:
        for lane in d.get("lanes") or ():
            waiting = lane.get("frame_budget_sessions_waiting")
            held, most = _bytes(lane.get("frame_budget_held_bytes")), _bytes(lane.get("frame_budget_bytes_max"))
            domains = ",".join(names.get(i, str(i)) for i in lane.get("domains", [])) or "-"
            rows.append([d["name"], str(lane.get("store")), domains,
                         f"{held} / {most}",
                         f"{waiting} sessions, {_bytes(lane.get('frame_budget_waiting_bytes'))}" if waiting else "-"])
    return _table(rows) + [""] if len(rows) > 1 else []


def status_text(doc: dict[str, Any]) -> str:
    peer_store = f", peer's domains in {doc['peer_store']}" if doc.get("peer_store") else ""
    lines = [f"site {doc['site']}: daemon pid {doc['pid']}, API {doc['api']}, store {doc['store']}{peer_store}", ""]
    rows = [["DRVA", "STATE", "PID", "RESTARTS", "LOG USED", "BACK-PRESSURE", "SEED UPLOADS", "DOMAINS"]]
    for d in doc["drvas"]:
        ratio = d.get("log_usage_ratio")
        bp = d.get("backpressure")
        rows.append([d["name"], d["state"], str(d.get("pid") or "-"), str(d.get("restarts", 0)),
                     "-" if ratio is None else f"{ratio * 100:.1f} %", "-" if bp is None else ("YES" if bp else "no"),
                     _seed_uploads(d.get("seed_uploads")), ",".join(d.get("domains", [])) or "-"])
    lines += _table(rows) + [""]
    lines += _lanes_table(doc["drvas"], {d.get("id"): d["name"] for d in doc["domains"]})
    rows = [["DOMAIN", "DRVA", "RPO LAG / TARGET", "NOT IN STORE", "IN", "UPLOADED", "MODE", "ALARMS"]]
    for d in doc["domains"]:
        st = d.get("status") or {}
        tp = d.get("throughput") or {}
        lag = st.get("rpo_lag_s")
        mode = [st.get("filter_mode") or ("-" if not st else "normal")]
        mode += [m for m, on in (("back-pressure", st.get("backpressure")), ("fenced", st.get("fenced"))) if on]
        rate_in, rate_up = tp.get("received_bytes_per_s"), tp.get("uploaded_bytes_per_s")
        rows.append([d["name"], d["drva"],
                     f"{'-' if lag is None else f'{lag:.1f} s'} / {d['policy']['rpo_target_s']:g} s",
                     _bytes(st.get("rpo_lag_bytes")), "-" if rate_in is None else _bytes(rate_in) + "/s",
                     "-" if rate_up is None else _bytes(rate_up) + "/s", ",".join(mode),
                     str(len(d.get("alarms", []))) if d.get("alarms") else "-"])
    lines += _table(rows) if len(rows) > 1 else ["no protected domain"]
    lines.append("")
    if doc.get("vms"):
        rows = [["POWERED ON", "HOST", "STATE", "PID", "CAPTURED", "ACKED"]]
        for v in doc["vms"]:
            st = v.get("status") or {}
            rows.append([v["domain"], v["host"], v["state"], str(v.get("pid") or "-"),
                         str(st.get("captured_seq", "-")), str(st.get("acked_seq", "-"))])
        lines += _table(rows) + [""]
    if doc.get("standby"):
        rows = [["STANDBY", "STATE", "SEQ", "BEHIND (SEQS)", "LAST APPLY"]]
        for sb in doc["standby"]:
            rows.append([sb["domain"], sb["state"], str(sb.get("seq") or "-"),
                         "-" if sb.get("lag_seqs") is None else str(sb["lag_seqs"]),
                         "-" if sb.get("last_apply_s") is None else f"{sb['last_apply_s']:.2f} s"])
        lines += _table(rows) + [""]
    for name, where in (doc.get("failed_over") or {}).items():
        lines.append(f"domain {name} FAILED OVER to site {where['site']} (timeline {where['timeline']}, forked "
                     f"from {where.get('parent')} at seq {where.get('fork_seq')}): fenced here")
    if doc.get("failed_over"):
        lines.append("")
    if doc["alarms"]:
        lines.append("ALARMS")
        lines += ["  " + line for line in _table([[a["severity"], a["kind"], a["subject"], a["message"]]
                                                  for a in doc["alarms"]])]
    else:
        lines.append("no active alarm")
    return "\n".join(lines)


def _ns(ns: int | None) -> str:
    if not ns:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns / 1e9)) + "Z"


def _progress_text(p: dict[str, Any] | None) -> str:
    p = p or {}
    if p.get("done") is None:
        return p.get("phase") or "-"
    total = f"/{p['total']}" if p.get("total") is not None else ""
    return f"{p.get('phase') or ''} {p['done']}{total}".strip()


def jobs_text(doc: dict[str, Any]) -> str:
    if not doc["jobs"]:
        return "no jobs"
    rows = [["ID", "NAME", "STATE", "PROGRESS", "CREATED", "ARGS"]]
    for j in doc["jobs"]:
        args = " ".join(f"{k}={v if not isinstance(v, (dict, list)) else json.dumps(v)}"
                        for k, v in sorted(j.get("args", {}).items()))
        rows.append([j["id"], j["name"], j["state"], _progress_text(j.get("progress")), _ns(j.get("created_ns")), args])
    return "\n".join(_table(rows))


def job_text(j: dict[str, Any]) -> str:
    lines = [f"job {j['id']}: {j['name']} {j['state']}",
             f"  args      {json.dumps(j.get('args', {}), sort_keys=True)}",
             f"  created   {_ns(j.get('created_ns'))}   ended {_ns(j.get('ended_ns'))}   timeout {_dur(j.get('timeout_s'))}",
             f"  progress  {_progress_text(j.get('progress'))}"]
    if j.get("error"):
        lines.append(f"  error     {j['error']}")
    for e in j.get("events", [])[-10:]:
        lines.append(f"  {_ns(e['ts_ns'])}  {e['message']}")
    if j.get("output") is not None:
        lines.append("  output    " + json.dumps(j["output"], indent=2, sort_keys=True).replace("\n", "\n  "))
    return "\n".join(lines)


def _protected_text(record: dict[str, Any]) -> str:
    out = record["output"]
    p = out["policy"]
    return (f"domain {out['domain']} {'policy changed' if out['was_protected'] else 'protected'} on {out['drva']}: "
            f"retention {_dur(p['retention_s'])}, RPO target {_dur(p['rpo_target_s'])}, consolidate what is older "
            f"than {_dur(p['consolidate_after_s'])} every {_dur(p['consolidate_every_s'])}")


# ---------------------------------------------------------------------- jobs, with or without a daemon


def _local_jobs(config_path: Path) -> Any:
    from cdp.msa.jobs import JobStore

    cfg = _site(config_path)
    return JobStore(cfg.state_dir / "jobs", cfg.jobs_retention_s)


def _jobs_list(config_path: Path, name: str | None, limit: int) -> dict[str, Any]:
    from cdp.msa.client import DaemonNotRunning

    params = {"limit": str(limit), **({"name": name} if name else {})}
    try:
        return _call(config_path, lambda c: c.get("/v1/jobs", answer_bytes_max=JOBS_ANSWER_BYTES_MAX, **params))
    except (DaemonNotRunning, ConfigError):
        # No daemon, or no API token in this shell: the records are files in the state
        # directory (a site file that is itself wrong fails again, with its own message).
        return {"jobs": _local_jobs(config_path).list(name=name, limit=limit)}


def _job_get(config_path: Path) -> Callable[[str], dict[str, Any]]:
    """A reader of job records: from the daemon, or from the state directory without one.
    The daemon's answer comes first: a job whose final record the state directory could
    not take yet (full, read-only) ended in the daemon's memory, while its file still says
    ``running``. So a daemon that did not answer is asked again at each read (it may be
    back); only one that refuses this shell (no API token) is given up for the files."""
    from cdp.msa.client import DaemonNotRunning, MsaClient

    cfg = _site(config_path)

    def via_daemon(job_id: str) -> dict[str, Any]:
        async def run() -> dict[str, Any]:
            async with MsaClient(cfg) as c:
                return await c.get(f"/v1/jobs/{job_id}")
        return asyncio.run(run())

    def local(job_id: str) -> dict[str, Any]:
        return _local_jobs(config_path).get(job_id)

    state = {"daemon": True}

    def get(job_id: str) -> dict[str, Any]:
        if state["daemon"]:
            try:
                return via_daemon(job_id)
            except DaemonNotRunning:  # not now: the file, and the daemon again next time
                pass
            except ConfigError:  # no API token in this shell: the files from now on
                state["daemon"] = False
        return local(job_id)
    return get


def _follow(get: Callable[[str], dict[str, Any]], job_id: str, as_json: bool) -> dict[str, Any]:
    """Poll job ``job_id`` until it ends (or is abandoned). Never for ever: the job's
    timeout ends it, so a record still ``running`` ``FOLLOW_GRACE_S`` after its timeout
    (counted from here, never shorter than the job's own) is one nobody will change — a
    daemon that cannot write it and does not answer — and is an error saying so."""
    bar, update = progress_bar(job_id, as_json)
    started = time.monotonic()
    try:
        while True:
            record = get(job_id)
            p = record.get("progress") or {}
            if isinstance(p.get("phase"), str) and p["phase"]:
                bar.set_description(printable(p["phase"]), refresh=False)
            if isinstance(p.get("done"), int) and isinstance(p.get("total"), int):
                update(p["done"], p["total"])
            if record["state"] in FINAL or record["state"] == "abandoned":
                return record
            _check_not_stuck(record, job_id, time.monotonic() - started)
            time.sleep(FOLLOW_POLL_S)
    finally:
        bar.close()


def _check_not_stuck(record: dict[str, Any], job_id: str, followed_s: float) -> None:
    timeout_s = record.get("timeout_s")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not math.isfinite(timeout_s):
        return  # no timeout known: the job's own end is all there is to wait for
    if followed_s <= timeout_s + FOLLOW_GRACE_S:
        return
    raise CdpError(f"job {job_id}: its record still says running {followed_s:.0f} s after it was followed, past "
                   f"its timeout of {timeout_s:g} s, which ends a job: no daemon has written its end (a full or "
                   f"read-only state directory? `cdp status` shows the alarm) nor answers for it; see `cdp jobs "
                   f"{job_id}` later")


# ---------------------------------------------------------------------- the commands



@click.command()
@config_option
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="JSON log lines on stderr from this level.")
def daemon(config_path: Path, log_level: str) -> None:
    """Run the protection service: REST API, metrics, DRVAs, alarms, scheduled jobs.
    Stops in order on SIGTERM or SIGINT."""
    from cdp.logs import setup_logging
    from cdp.msa.daemon import run_daemon

    setup_logging(log_level)
    run_daemon(_site(config_path))

@click.command()
@click.argument("domain")
@config_option
@click.option("--retention", default=None, help="Keep points at least this long (e.g. 72h).")
# Finite and above zero here (NaN reached the API, refused there as "not JSON"); the
# API checks the policy's own range (cdp.msa.config.POLICY_LIMITS).
@click.option("--rpo-target", "rpo_target", type=FiniteRange(0, min_open=True), default=None,
              help="RPO alarm threshold in seconds.")
@click.option("--consolidate-after", default=None, help="Roll segments older than this into a base (e.g. 1h).")
@click.option("--consolidate-every", default=None, help="Run the consolidation job this often (e.g. 15m).")
@json_option
def protect(domain: str, config_path: Path, retention: str | None, rpo_target: float | None,
            consolidate_after: str | None, consolidate_every: str | None, as_json: bool) -> None:
    """Protect DOMAIN (or change its policy); returns when its DRVA serves it."""
    body = {k: v for k, v in (("retention", retention), ("rpo_target_s", rpo_target),
                              ("consolidate_after", consolidate_after),
                              ("consolidate_every", consolidate_every)) if v is not None}
    record = _call(config_path, lambda c: c.post(f"/v1/domains/{domain}/protect", body, wait=True))
    emit(as_json, _job_result(record), _protected_text)

@click.command()
@click.argument("domain")
@config_option
@json_option
def unprotect(domain: str, config_path: Path, as_json: bool) -> None:
    """Stop protecting DOMAIN (what is in the store stays recoverable)."""
    result = _call(config_path, lambda c: c.post(f"/v1/domains/{domain}/unprotect"))
    emit(as_json, result, lambda r: f"domain {r['domain']} is no longer protected (DRVA {r['drva']})" + (
        f"\n  its DRVA's configuration is rewritten when it can be: {r['drva_config_pending']}"
        if r.get("drva_config_pending") else ""))

@click.command()
@config_option
@json_option
def status(config_path: Path, as_json: bool) -> None:
    """DRVAs, protected domains (RPO lag vs target, throughput, modes), active alarms."""
    emit(as_json, _call(config_path, lambda c: c.get("/v1/status")), status_text)

@click.command()
@click.argument("domain")
@click.argument("name")
@config_option
@json_option
def mark(domain: str, name: str, config_path: Path, as_json: bool) -> None:
    """Insert mark NAME in DOMAIN's stream; returns once it is in the store's catalog."""
    record = _call(config_path, lambda c: c.post(f"/v1/domains/{domain}/marks", {"name": name}, wait=True))
    emit(as_json, _job_result(record), lambda r: (
        f"mark {r['output'].get('name')!r} of domain {r['output'].get('domain')} at seq {r['output'].get('seq')}"))

@click.command()
@click.argument("job_id", required=False)
@config_option
@click.option("--follow", is_flag=True, help="With ID: follow a running job until it ends.")
@click.option("--name", default=None, help="Only jobs of this name (e.g. consolidate).")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="At most this many.")
@json_option
def jobs(job_id: str | None, config_path: Path, follow: bool, name: str | None, limit: int,
         as_json: bool) -> None:
    """List jobs, newest first, or show job ID (works without a daemon too)."""
    if job_id is None:
        if follow:
            raise click.UsageError("--follow needs a job ID")
        emit(as_json, _jobs_list(config_path, name, limit), jobs_text)
        return
    get = _job_get(config_path)
    record = _follow(get, job_id, as_json) if follow else get(job_id)
    emit(as_json, record, job_text)
    if follow and record["state"] != "succeeded":
        from cdp.msa.client import exit_code_of

        sys.exit(exit_code_of(record.get("exit_code")))


@click.command()
@click.argument("domain")
@click.argument("state", type=click.Choice(["on", "off"]))
@config_option
@json_option
def power(domain: str, state: str, config_path: Path, as_json: bool) -> None:
    """Power DOMAIN's VMs on or off through the site's hypervisor (kept across restarts)."""
    result = _call(config_path, lambda c: c.post(f"/v1/domains/{domain}/power", {"on": state == "on"}))
    emit(as_json, result, lambda r: f"domain {r['domain']}: VMs {', '.join(r['vms'])} powered "
                                    f"{'on' if r['on'] else 'off'}" + (f" on host {r['host']}" if r['host'] else ""))


def _failover_text(record: dict[str, Any]) -> str:
    r = record["output"]
    ack = r.get("first_write_acked_s")
    handover = r.get("handover")
    planned = ([f"  handed over by site {handover['site']} at mark {handover['mark']} (seq {handover['seq']}); "
                f"writes it acknowledged after that point: {handover['lost_writes']}"] if handover else [])
    return "\n".join([
        f"domain {r['domain']} failed over to site {r['site']} at {r['target']}: timeline {r['timeline']} "
        f"(forked from timeline {r['parent_timeline']} at seq {r['fork_seq']})",
        f"  VMs on host(s) {', '.join(r['hosts'])}" + (f" (added: {', '.join(r['added_hosts'])})"
                                                         if r['added_hosts'] else "")
        + f", protected by DRVA {r['drva']}",
        f"  rehydrated in {r['rehydrate_s']:.1f} s; first write acknowledged "
        + (f"{ack:.1f} s after the start" if ack is not None else "not yet (the VMs wrote nothing)"), *planned])


@click.command()
@click.argument("domain")
@point_options
@click.option("--planned", is_flag=True, help="Zero loss: the protected site ([peer]) quiesces the domain and "
                                              "hands it over at a final mark; no point option.")
@click.option("--test", "test", is_flag=True, help="The VMs come up isolated from the point (no fork, nothing "
                                                   "written to the store); cdp failover-cleanup removes them.")
@config_option
@json_option
def failover(domain: str, at: str | None, seq: int | None, mark: str | None, latest: bool, planned: bool,
             test: bool, config_path: Path, as_json: bool) -> None:
    """Fail DOMAIN over to this site (the recovery site's --config): its disks at the
    point, a new timeline owned here, its VMs registered, protected and powered on.
    Unplanned: from the store alone. Rerun a failover that did not finish to resume it."""
    if planned and test:
        raise click.UsageError("--planned and --test exclude each other")
    if planned:
        if any(v is not None for v in (at, seq, mark)) or latest:
            raise click.UsageError("--planned fails over at the protected site's final mark: give no point")
        body: dict[str, Any] = {"mode": "planned"}
    else:
        target = one_point(at, seq, mark, latest)
        body = {"target": "latest" if target.kind == "latest" else {target.kind: target.value}}
        if test:
            body["mode"] = "test"
    started = _call(config_path, lambda c: c.post(f"/v1/failover/{domain}", body))
    record = _follow(_job_get(config_path), started["id"], as_json)
    emit(as_json, _job_result(record), _test_failover_text if test else _failover_text)


def _test_failover_text(record: dict[str, Any]) -> str:
    r = record["output"]
    return (f"test failover of domain {r['domain']} at {r['target']} (seq {r['seq']}): its VMs run isolated on "
            f"host(s) {', '.join(r['hosts'])}; `cdp failover-cleanup {r['domain']}` removes them")


@click.command("failover-cleanup")
@click.argument("domain")
@config_option
@json_option
def failover_cleanup(domain: str, config_path: Path, as_json: bool) -> None:
    """Remove DOMAIN's test failover: its VMs, their registration, its test area."""
    result = _call(config_path, lambda c: c.post(f"/v1/failover/{domain}/cleanup"))
    emit(as_json, result, lambda r: f"test failover of domain {r['domain']} removed ({r['removed']})")


def _failback_text(record: dict[str, Any]) -> str:
    r = record["output"]
    lines = [f"domain {r['domain']} is back at site {r['site']} from site {r['from_site']} at {r['target']}: "
             f"timeline {r['timeline']} (forked from timeline {r['parent_timeline']} at seq {r['fork_seq']})"]
    for d in r.get("disks") or []:
        how = "rewritten whole: " + d["reason"] if d["mode"] == "whole" else "delta"
        lines.append(f"  {d['path']}: {d['bytes']:,} bytes moved ({how})")
    if r.get("bytes_moved") is not None:
        lines.append(f"  {r['bytes_moved']:,} bytes moved in all; VMs protected and powered on here; site "
                     f"{r['from_site']} released the domain")
    return "\n".join(lines)


@click.command()
@click.argument("domain")
@config_option
@json_option
def failback(domain: str, config_path: Path, as_json: bool) -> None:
    """Bring DOMAIN back to this site (the protected site's --config) from the site it
    failed over to ([peer]): that site quiesces it at a final mark, only what changed is
    written into this site's disks, a timeline owned here is forked, the VMs are protected
    and powered on here, the other site releases them. Rerun one that did not finish."""
    started = _call(config_path, lambda c: c.post(f"/v1/failback/{domain}", {}))
    record = _follow(_job_get(config_path), started["id"], as_json)
    emit(as_json, _job_result(record), _failback_text)


COMMANDS = (daemon, protect, unprotect, status, mark, jobs, power, failover, failover_cleanup, failback)
