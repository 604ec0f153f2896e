"""``cdp preflight system|install|uninstall``, ``cdp install``, ``cdp uninstall``.

Each verb runs as a job (``cdp.msa.jobs``: a record under ``<state_dir>/jobs`` with a
name, a timeout, progress and the result), as the seed's run commands do, and prints the
job's id. A preflight prints one ``PASS|WARN|FAIL name: reason`` line per check, then a
summary, and exits 1 when a check failed; a job that fails exits with its error's code.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click

from cdp.cli.common import FiniteRange, config_option, emit, json_option, progress_bar

#: Default job timeouts, seconds (--timeout overrides).
PREFLIGHT_TIMEOUT_S = 600.0
INSTALL_TIMEOUT_S = 3600.0
UNINSTALL_TIMEOUT_S = 3600.0


def _timeout_option(default: float) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    # FiniteRange: click's FloatRange let nan and inf through, into the job record (and the API's JSON).
    return click.option("--timeout", "timeout_s", type=FiniteRange(min=1), default=default,
                        show_default=True, help="Stop the job after this many seconds.")


def _run_as_job(config_path: Path, name: str, args: dict[str, Any], timeout_s: float, as_json: bool,
                work: Callable[[Any, Any], Awaitable[dict[str, Any]]],
                human: Callable[[dict[str, Any]], str]) -> None:
    """Load the site file, run ``work(cfg, job)`` as job ``name``, print the result, exit."""
    from cdp.msa.config import load_site_config
    from cdp.msa.install_dirs import ensure_state_dir
    from cdp.msa.jobs import JobStore, run_job

    cfg = load_site_config(config_path)
    # Install's directory check, before the job store prunes or writes a record there: a
    # state_dir another user controls is refused with nothing written in it.
    ensure_state_dir(cfg, f"the {name} job writes its record")
    jobs = JobStore(cfg.state_dir / "jobs", cfg.jobs_retention_s)
    jobs.prune()

    def announce(job: Any) -> None:
        if not as_json:
            click.echo(f"job {job.id} ({name}) started", err=True)

    record = asyncio.run(run_job(jobs, name, {"config": str(cfg.path), **args}, timeout_s,
                                 lambda job: work(cfg, job), on_start=announce))
    job = {"id": record["id"], "name": name, "state": record["state"], "error": record["error"]}
    if record["state"] != "succeeded":
        if as_json:
            click.echo(json.dumps({"job": job}, sort_keys=True))
        click.echo(f"cdp: error: {name} (job {record['id']}) {record['state']}: {record['error']}", err=True)
        sys.exit(record.get("exit_code", 1))
    result = record["output"]
    if as_json:
        emit(True, {**result, "job": job}, human)
    else:
        emit(False, result, lambda r: f"{human(r)}\njob {record['id']}: {record['state']}")
    if result.get("ok") is False:  # a preflight with a failed check
        sys.exit(1)


# --------------------------------------------------------------------------- human output


def _install_text(r: dict[str, Any]) -> str:
    dep = r["deployment"]
    lines = [f"site {r['site']} installed on {r['store']} (deployment record {dep['key']}: {dep['action']})",
             f"  protection {r['protection']['path']}: {r['protection']['action']} "
             f"({', '.join(r['protection']['domains']) or 'no domains'})"]
    for d in r["drvas"]:
        lines.append(f"  DRVA {d['name']} ({d['listen']}): log {d['log']['path']} {d['log']['action']}, "
                     f"metadata {d['meta']['path']} {d['meta']['action']}, config {d['config']['path']} "
                     f"{d['config']['action']} (domains: {', '.join(d['config']['domains']) or 'none'})")
    if r.get("tls") is not None:
        tls = r["tls"]
        lines.append(f"  TLS {tls['dir']}: CA {tls['ca']['action']} (expires {tls['ca']['expires']})")
        lines += [f"    {c['cert']}: {c['action']} ({', '.join(c['names'])})" for c in tls["certs"]]
    return "\n".join(lines)


def _uninstall_text(r: dict[str, Any]) -> str:
    lines = [f"site {r['site']} uninstalled from {r['store']}", f"  daemon: {r['daemon']['note']}"]
    lines += [f"  removed {e.get('path') or e.get('key')} ({e['what']})" for e in r["removed"]]
    lines += [f"  left alone {e['path']}: {e['why']}" for e in r["left_alone"]]
    lines.append(f"  kept the job history {r['kept']['jobs']}")
    if r["kept"].get("tls"):
        lines.append(f"  kept the site CA and certificates {r['kept']['tls']}")
    for u in r["kept"]["domains"]:
        lines.append(f"  kept domain {u['domain']}: {u['objects']} objects, {u['bytes']:,} bytes "
                     f"under {u['prefix']} (--purge deletes them)")
    for u in r["kept"].get("registered", []):
        lines.append(f"  kept domain {u['domain']}: {u['why']}")
    if r["purged"] is not None:
        for u in r["purged"]["domains"]:
            lines.append(f"  purged domain {u['domain']}: {u['deleted']} objects, {u['bytes']:,} bytes")
        sweep = r["purged"]["chunk_sweep"]
        lines.append(f"  chunk sweep: deferred ({sweep['deferred']})" if "deferred" in sweep else
                     f"  chunk sweep: {sweep['chunks_deleted']} deleted, {sweep['chunks_kept']} kept")
    return "\n".join(lines)


# --------------------------------------------------------------------------- verbs



@click.group()
def preflight() -> None:
    """Check this machine, the site and the store before install or uninstall."""

def preflight_verb(kind: str, doc: str) -> None:
    @preflight.command(kind, help=doc)
    @config_option
    @_timeout_option(PREFLIGHT_TIMEOUT_S)
    @json_option
    def verb(config_path: Path, timeout_s: float, as_json: bool) -> None:
        from cdp.msa import preflight as pf

        run = {"system": pf.preflight_system, "install": pf.preflight_install,
               "uninstall": pf.preflight_uninstall}[kind]
        _run_as_job(config_path, f"preflight-{kind}", {}, timeout_s, as_json,
                    lambda cfg, job: run(cfg, progress=job.progress), pf.format_checks)

preflight_verb("system", "Runtime, modules, secrets, the store (writable, clock skew), and each "
                         "DRVA's log partition (size, fsync latency) and metadata path.")
preflight_verb("install", "The cluster file, protected VMs and hosts, disk images, name clashes, "
                          "ports free, and no other installation in the store.")
preflight_verb("uninstall", "The installation, the daemon, what uninstall would remove and what "
                            "it keeps unless --purge.")

@click.command("install")
@config_option
@_timeout_option(INSTALL_TIMEOUT_S)
@json_option
def install_verb(config_path: Path, timeout_s: float, as_json: bool) -> None:
    """Install the site: the store's container and deployment record, each DRVA's log
    partition, metadata repository and configuration, protection.json. Idempotent."""
    from cdp.msa.install import install

    _run_as_job(config_path, "install", {}, timeout_s, as_json,
                lambda cfg, job: install(cfg, progress=job.progress), _install_text)

@click.command("uninstall")
@config_option
@click.option("--purge", is_flag=True, help="Also delete every replicated object of the site's domains.")
@click.option("--yes", is_flag=True, help="Confirm --purge.")
@_timeout_option(UNINSTALL_TIMEOUT_S)
@json_option
def uninstall_verb(config_path: Path, purge: bool, yes: bool, timeout_s: float, as_json: bool) -> None:
    """Stop the daemon and remove what install made; replicated data is kept unless --purge."""
    from cdp.msa.install import uninstall

    if purge and not yes:
        raise click.UsageError("--purge deletes every replicated object of the site's domains "
                               "(no recovery is possible afterwards): add --yes to confirm")
    bar, update = progress_bar("purge", as_json)

    async def work(cfg: Any, job: Any) -> dict[str, Any]:
        def progress(phase: str, done: int | None = None, total: int | None = None) -> None:
            job.progress(phase, done, total)
            if phase.startswith("purge") and done is not None and total is not None:
                update(done, total)
        return await uninstall(cfg, purge, progress=progress)

    try:
        _run_as_job(config_path, "uninstall", {"purge": purge}, timeout_s, as_json, work, _uninstall_text)
    finally:
        bar.close()


COMMANDS = (preflight, install_verb, uninstall_verb)
