"""Preflight checks: the seed's Invoke-PreflightJetDRSystemCheck, Invoke-PreflightJetDRInstall
and Invoke-PreflightJetDRUninstall.

Each preflight runs a list of checks and changes nothing that matters: the only writes
are a probe object in the store (deleted again) and a scratch file beside each log
partition (deleted again) to time ``fdatasync``. A check is ``pass``, ``warn`` (works,
but look at it) or ``fail`` (install / the DRVAs would not work); a preflight is ``ok``
when nothing failed. A check that cannot run at all (an I/O error, an unreachable store)
is a failure of that check, never an exception out of the preflight.

- ``preflight_system``: Python and the modules the engine imports; the secrets the site
  needs (names only); the store reachable and writable (put, get, compare, delete a
  probe) with latencies; the store's clock against ours (store locks tolerate
  ``SKEW_DEFAULT_S`` of skew: fail above it, warn above ``SKEW_WARN_S``); per DRVA, its
  log partition (present, or room to create it; size), ``fdatasync`` latency where it
  lives, and its metadata repository.
- ``preflight_install``: the site and cluster files agree; each protected domain's VMs
  and hosts; the simulated disk images; name clashes (DRVAs, VMs, hosts; two DRVAs on
  one port); the directories install writes in are ours alone (``dirs``: the check
  install makes first); the ports free (DRVAs by convention on 32873–32878); no
  installation of another site in the store nor in the state directory.
- ``preflight_uninstall``: the installation (deployment record, daemon); the state
  directory ours alone (``dirs``); what uninstall would remove — the partitions the
  install record names, still the files install made — and what it keeps (every other
  partition, and each domain's objects unless ``--purge``, or even then when another
  site owns them).

A directory ``dirs`` refuses is reported there only: a check that would read in it (the
state directory's installation and pid file, the TLS directory, the install record) is
not run, as install and uninstall stop before reading it; the ports are checked without
asking the daemon.
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import inspect
import math
import os
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from cdp.errors import CdpError, ConfigError, NotFound, StoreError
from cdp.locks import SKEW_DEFAULT_S
from cdp.logfmt import DATA_SIZE_MIN, DATA_START
from cdp.meta import SLOT_SIZE_DEFAULT
from cdp.msa.config import DRVA_PORTS, DrvaSpec, SiteConfig
from cdp.msa.deployment import (
    SITES_PREFIX, MadePartition, deployment_key, install_record_path, load_install_record, read_deployment,
)
from cdp.msa.install_daemon import DaemonState, daemon_state
from cdp.msa.install_dirs import (
    check_state_dir, dir_problem, drva_config_path, jobs_dir, local_dir_errors, local_dirs, who,
)
from cdp.msa.install_inspect import ROLES, PathState, inspect_log, inspect_meta
from cdp.msa.install_purge import domain_usage, registered_kept
from cdp.msa.install_removal import drva_dir_kept, kept_not_made, made_verdict
from cdp.msa.install_store import foreign_domains, other_sites
from cdp.msa.protection import load_protection, protection_path
from cdp.store.base import ObjectStore

STATUSES = ("pass", "warn", "fail")
PYTHON_MIN = (3, 11)
#: (import name, distribution name): what the engine imports, and where its version is.
MODULES = (
    ("numpy", "numpy"), ("lz4", "lz4"), ("xxhash", "xxhash"), ("aioboto3", "aioboto3"),
    ("azure.storage.blob", "azure-storage-blob"), ("uvloop", "uvloop"), ("aiohttp", "aiohttp"),
    ("prometheus_client", "prometheus-client"), ("click", "click"), ("tqdm", "tqdm"),
    ("tomli_w", "tomli-w"), ("cryptography", "cryptography"),
)
SKEW_WARN_S = 5.0
SKEW_FAIL_S = SKEW_DEFAULT_S  # store locks (FORMAT.md §11.1) tolerate this much
CLOCK_SAMPLES = 3
STORE_OP_TIMEOUT_S = 30.0
PROBE_BYTES = 64 << 10
LOG_SIZE_WARN = 64 << 20  # below this a DRVA rides out only a short store outage
FSYNC_SAMPLES = 16
FSYNC_WRITE_BYTES = 4096
FSYNC_WARN_P99_S = 0.010
META_BYTES = 2 * SLOT_SIZE_DEFAULT
_HTTP_STORES = ("s3", "azure")

Progress = Callable[[str, int | None, int | None], None]


@dataclass(frozen=True)
class Check:
    """One check's verdict. ``details`` holds data for scripts (never a secret value)."""

    name: str
    status: str
    reason: str
    details: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check {self.name}: status {self.status!r} not in {STATUSES}")

    def line(self) -> str:
        return f"{self.status.upper()} {self.name}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "status": self.status, "reason": self.reason}
        if self.details is not None:
            out["details"] = self.details
        return out


def summarize(kind: str, checks: list[Check], **extra: Any) -> dict[str, Any]:
    failures = sum(c.status == "fail" for c in checks)
    warnings = sum(c.status == "warn" for c in checks)
    return {"kind": kind, **extra, "checks": [c.to_dict() for c in checks], "ok": failures == 0,
            "warnings": warnings, "failures": failures}


def format_checks(summary: dict[str, Any]) -> str:
    """The human form: one line per check, then the verdict."""
    lines = [Check(c["name"], c["status"], c["reason"]).line() for c in summary["checks"]]
    verdict = "ok" if summary["ok"] else "NOT ok"
    lines.append(f"preflight {summary['kind']}: {verdict} — {len(summary['checks'])} checks, "
                 f"{summary['failures']} failed, {summary['warnings']} warnings")
    return "\n".join(lines)


def format_size(n: int) -> str:
    """Bytes for people, in binary units like the site file's ('256 MiB')."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _no_progress(phase: str, done: int | None = None, total: int | None = None) -> None:
    return None


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _probe_writable(directory: Path) -> str | None:
    """None when a file can be created (and removed) in ``directory``, else why not.
    Creating one is the only honest test: access(2) says yes to root on any mode."""
    probe = directory / f".cdp-preflight-{uuid.uuid4().hex[:12]}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot create a file in {directory}: {exc.strerror}"
    return None


async def _run_checks(steps: list[tuple[str, Callable[[], Any]]], progress: Progress) -> list[Check]:
    """Run each step (sync in a thread, or a coroutine function); a step returns one
    check or a list. A step that raises is a failed check, named after the step."""
    checks: list[Check] = []
    for i, (name, step) in enumerate(steps):
        progress(name, i, len(steps))
        try:
            got = await step() if inspect.iscoroutinefunction(step) else await asyncio.to_thread(step)
        except CdpError as exc:
            got = Check(name, "fail", exc.message)
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            got = Check(name, "fail", f"{exc.strerror or exc}{where}")
        checks.extend(got if isinstance(got, list) else [got])
    progress("done", len(steps), len(steps))
    return checks


def _open_store(cfg: SiteConfig, env: Mapping[str, str], store: ObjectStore | None) -> tuple[Any, bool]:
    if store is not None:
        return store, False
    from cdp.store import open_store

    return open_store(cfg.store_url, env=env), True


def _store_kind(store: ObjectStore) -> str:
    while getattr(store, "inner", None) is not None:  # FaultyStore and other wrappers
        store = store.inner
    return getattr(store, "kind", "store")


# --------------------------------------------------------------------------- system


def check_runtime() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    details = {"python": version, "executable": sys.executable, "platform": sys.platform}
    if sys.version_info[:2] < PYTHON_MIN:
        return Check("runtime", "fail", f"Python {version}; the engine needs "
                     f"{'.'.join(map(str, PYTHON_MIN))} or newer", details)
    return Check("runtime", "pass", f"Python {version} ({sys.executable})", details)


def check_modules() -> Check:
    versions: dict[str, str | None] = {}
    missing = []
    for module, dist in MODULES:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"{module} ({exc})")
            versions[module] = None
            continue
        try:
            versions[module] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[module] = "unknown"
    if missing:
        return Check("modules", "fail", f"cannot import {', '.join(missing)}: reinstall the package "
                     f"(pip install -e .)", {"versions": versions})
    shown = ", ".join(f"{m} {v}" for m, v in versions.items())
    return Check("modules", "pass", shown, {"versions": versions})


def check_secrets(cfg: SiteConfig, env: Mapping[str, str]) -> list[Check]:
    """Each secret the site needs is in the environment. Names only: a value, or even its
    length, never reaches a message."""
    checks = []
    for var, what, read in ((cfg.secret_env, "the filter handshake secret", cfg.secret),
                            (cfg.token_env, "the API token", cfg.api_token)):
        try:
            read(env)
        except ConfigError:
            state = "unset" if var not in env else "too short"
            checks.append(Check(f"secret.{var}", "fail",
                                f"{state}: set it to {what} (at least 16 characters)", {"state": state}))
            continue
        checks.append(Check(f"secret.{var}", "pass", f"set ({what})", {"state": "set"}))
    checks += _store_credentials(cfg.store_url, env, "secret.store")
    if len(urls := cfg.store_urls()) > 1:  # the peer's domains live in another store: its credentials too
        checks += _store_credentials(urls[1], env, "secret.peer_store")
    return checks


def _store_credentials(url: str, env: Mapping[str, str], name: str) -> list[Check]:
    """Check ``name``: the environment holds the credentials of the store at ``url`` (a
    file store needs none). Names only, never a value."""
    checks = []
    scheme = url.partition("://")[0].lower()
    if scheme == "s3":
        names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
        state = {n: "set" if env.get(n) else "unset" for n in names}
        if state["AWS_ACCESS_KEY_ID"] != state["AWS_SECRET_ACCESS_KEY"]:
            checks.append(Check(name, "fail", "only one of AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY is set: set both", state))
        elif state["AWS_ACCESS_KEY_ID"] == "unset":
            checks.append(Check(name, "warn", "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                                "unset: the SDK falls back to its shared files or an instance role", state))
        else:
            checks.append(Check(name, "pass", "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY set", state))
    elif scheme == "azure":
        names = ("CDP_AZURE_CONNECTION_STRING", "AZURE_STORAGE_CONNECTION_STRING")
        state = {n: "set" if env.get(n) else "unset" for n in names}
        if "set" in state.values():
            used = next(n for n in names if state[n] == "set")
            checks.append(Check(name, "pass", f"{used} set", state))
        else:
            checks.append(Check(name, "fail", f"set {names[0]} (or {names[1]}) to the "
                                "storage account's connection string", state))
    return checks


async def _within(op: Awaitable[Any], timeout_s: float = STORE_OP_TIMEOUT_S) -> Any:
    """``await op``, TimeoutError after ``timeout_s``. ``asyncio.timeout`` rather than
    ``wait_for``, which on Python 3.11 can swallow a cancellation of the caller."""
    async with asyncio.timeout(timeout_s):
        return await op


async def _timed(op: Awaitable[Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    result = await _within(op)
    return result, time.perf_counter() - t0


async def check_store_writable(cfg: SiteConfig, store: ObjectStore, name: str = "store.write") -> Check:
    """Put, get, compare and delete a probe object under the site's prefix."""
    got = await _probe_writes(cfg, store)
    return Check(name, got.status, got.reason, got.details)


async def _probe_writes(cfg: SiteConfig, store: ObjectStore) -> Check:
    key = f"{SITES_PREFIX}{cfg.site}/preflight/{uuid.uuid4().hex}.probe"
    data = os.urandom(PROBE_BYTES)
    where = store.describe()
    try:
        try:
            _, put_s = await _timed(store.put(key, data))
        except NotFound as exc:  # only a missing bucket / container makes a put NotFound
            return Check("store.write", "warn", f"{where}: the bucket or container does not exist "
                         f"yet (cdp install creates it); writes not verified: {exc.message}")
        got, get_s = await _timed(store.get(key))
        if got != data:
            return Check("store.write", "fail", f"{where}: the probe {key} read back differs from "
                         f"what was written ({len(got)} bytes for {len(data)})")
        _, delete_s = await _timed(store.delete(key))
        try:
            await _within(store.stat(key))
            return Check("store.write", "fail", f"{where}: the probe {key} is still there after delete")
        except NotFound:
            pass
    except TimeoutError:
        return Check("store.write", "fail", f"{where}: no answer within {STORE_OP_TIMEOUT_S:g} s")
    except StoreError as exc:
        return Check("store.write", "fail", exc.message)
    finally:
        try:
            await _within(store.delete(key))
        except (StoreError, TimeoutError):
            pass  # already reported; a stray probe is harmless
    latency = {"put_ms": _ms(put_s), "get_ms": _ms(get_s), "delete_ms": _ms(delete_s), "bytes": PROBE_BYTES}
    return Check("store.write", "pass", f"{where}: put/get/delete of {PROBE_BYTES >> 10} KiB in "
                 f"{latency['put_ms']:.1f}/{latency['get_ms']:.1f}/{latency['delete_ms']:.1f} ms", latency)


async def check_clock(store: ObjectStore) -> Check:
    """The store's clock against ours, from the sample with the shortest round trip."""
    server_time = getattr(store, "server_time", None)
    if server_time is None:
        return Check("store.clock", "warn", f"{store.describe()} does not tell its time: skew unknown")
    best: tuple[float, float] | None = None  # (round trip, skew)
    try:
        for _ in range(CLOCK_SAMPLES):
            t0 = time.time()
            theirs = await _within(server_time())
            t1 = time.time()
            if theirs is None:
                return Check("store.clock", "warn", f"{store.describe()} gave no time: skew unknown")
            if best is None or t1 - t0 < best[0]:
                best = (t1 - t0, theirs - (t0 + t1) / 2)
    except TimeoutError:
        return Check("store.clock", "fail", f"{store.describe()}: no answer within {STORE_OP_TIMEOUT_S:g} s")
    except StoreError as exc:
        return Check("store.clock", "fail", exc.message)
    assert best is not None
    rtt, skew = best
    resolution = 0.5 if _store_kind(store) in _HTTP_STORES else 0.0  # HTTP Date: whole seconds
    details = {"skew_s": round(skew, 3), "uncertainty_s": round(rtt / 2 + resolution, 3),
               "warn_above_s": SKEW_WARN_S, "fail_above_s": SKEW_FAIL_S}
    direction = "ahead of" if skew >= 0 else "behind"
    text = (f"the store's clock is {abs(skew):.2f} s {direction} this host's "
            f"(± {details['uncertainty_s']:.2f} s)")
    if abs(skew) > SKEW_FAIL_S:
        return Check("store.clock", "fail", f"{text}: store locks tolerate {SKEW_FAIL_S:g} s; "
                     "synchronise the clocks (NTP)", details)
    if abs(skew) > SKEW_WARN_S:
        return Check("store.clock", "warn", f"{text}: above {SKEW_WARN_S:g} s; locks tolerate "
                     f"{SKEW_FAIL_S:g} s, synchronise the clocks (NTP)", details)
    return Check("store.clock", "pass", text, details)


async def check_peer_store(cfg: SiteConfig, env: Mapping[str, str]) -> list[Check]:
    """``peer_store.write``: the store of the peer's domains (``[peer] store``), when it is
    not this site's, is reachable and writable — this site's DRVAs write a domain failed
    over here into it. A failure names the file and the key."""
    from cdp.store import open_store

    urls = cfg.store_urls()
    if len(urls) == 1:
        return []
    where = f"{cfg.path}: peer.store"
    try:
        store = open_store(urls[1], env=env)
    except ConfigError as exc:
        return [Check("peer_store.write", "fail", f"{where}: {exc.message}")]
    try:
        check = await check_store_writable(cfg, store, "peer_store.write")
    finally:
        await store.close()
    if check.status != "pass":
        return [Check(check.name, check.status, f"{where}: {check.reason}", check.details)]
    return [check]


async def check_store(cfg: SiteConfig, env: Mapping[str, str], store: ObjectStore | None) -> list[Check]:
    try:
        store, opened = _open_store(cfg, env, store)
    except ConfigError as exc:
        return [Check("store.write", "fail", exc.message), Check("store.clock", "fail", exc.message)]
    try:
        return [await check_store_writable(cfg, store), await check_clock(store)]
    finally:
        if opened:
            await store.close()


def check_log_partition(cfg: SiteConfig, drva: DrvaSpec) -> Check:
    """The DRVA's replication-log partition: this DRVA's of this site (kept by install;
    one labelled for another site is refused, as install refuses it), or a path install
    can format (missing or blank, with room); its size."""
    name = f"drva.{drva.name}.log"
    path, want = drva.log_path, drva.log_size
    state = inspect_log(path, drva.name, cfg.site)
    details: dict[str, Any] = {"path": str(path), "configured_bytes": want, **state.to_dict()}
    if state.kind == "other" or (state.exists and not state.ours and not state.blank):
        return Check(name, "fail", f"{path}: {state.what}; install refuses to overwrite it", details)
    if state.exists:
        if (why := _probe_rw(path)) is not None:
            return Check(name, "fail", why, details)
    if state.ours:
        size, text = state.size, f"{path}: {state.what}, {format_size(state.size)}"
        if size < want:
            return Check(name, "warn", f"{text}, smaller than the configured {format_size(want)}; "
                         "install keeps it (uninstall and install again to grow it)", details)
    elif state.kind == "device":
        size, text = state.size, f"{path}: blank block device of {format_size(state.size)}"
        if size < want:
            return Check(name, "fail", f"{text}, smaller than the configured {format_size(want)}", details)
    else:  # a file to create (or a blank one to grow): room in its directory?
        where = _existing_ancestor(path.parent)
        if (why := _probe_writable(where)) is not None:
            return Check(name, "fail", why, details)
        need = max(0, want - state.size)  # a blank file is grown, never shrunk
        free = _free_bytes(where)
        details["free_bytes"] = free
        if free < need:
            return Check(name, "fail", f"{path}: only {format_size(free)} free in {where}; the "
                         f"partition needs {format_size(want)}", details)
        size = max(want, state.size)
        text = f"{path}: {'blank' if state.exists else 'absent'}; {format_size(free)} free in {where} " \
               f"for {format_size(want)}"
    if size < DATA_START + DATA_SIZE_MIN:
        return Check(name, "fail", f"{text}: a partition needs at least "
                     f"{format_size(DATA_START + DATA_SIZE_MIN)}", details)
    if size < LOG_SIZE_WARN:
        return Check(name, "warn", f"{text}: below {format_size(LOG_SIZE_WARN)}, the DRVA can ride "
                     "out only a short store outage before holding filters back", details)
    return Check(name, "pass", text, details)


def _probe_rw(path: Path) -> str | None:
    try:
        os.close(os.open(path, os.O_RDWR))
    except OSError as exc:
        return f"{path}: cannot open for reading and writing: {exc.strerror}"
    return None


def check_fsync(drva: DrvaSpec) -> Check:
    """A few 4 KiB write + fdatasync in the log partition's directory: the latency every
    acknowledgement of a filter write waits for."""
    name = f"drva.{drva.name}.fsync"
    if inspect_log(drva.log_path, drva.name).kind == "device":
        return Check(name, "warn", f"{drva.log_path} is a block device: not measured (writing to it "
                     "would damage the partition)")
    where = _existing_ancestor(drva.log_path.parent)
    probe = where / f".cdp-preflight-fsync-{uuid.uuid4().hex[:12]}"
    samples = []
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        return Check(name, "fail", f"cannot create a file in {where}: {exc.strerror}")
    try:
        block = os.urandom(FSYNC_WRITE_BYTES)
        for i in range(FSYNC_SAMPLES):
            t0 = time.perf_counter()
            os.pwrite(fd, block, i * FSYNC_WRITE_BYTES)
            os.fdatasync(fd)
            samples.append(time.perf_counter() - t0)
    except OSError as exc:
        return Check(name, "fail", f"write + fdatasync in {where}: {exc.strerror}")
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
    samples.sort()
    p50, p99 = _percentile(samples, 0.5), _percentile(samples, 0.99)
    details = {"directory": str(where), "samples": FSYNC_SAMPLES, "p50_ms": _ms(p50), "p99_ms": _ms(p99),
               "warn_above_p99_ms": _ms(FSYNC_WARN_P99_S)}
    text = f"{FSYNC_SAMPLES} × 4 KiB write + fdatasync in {where}: p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms"
    if p99 > FSYNC_WARN_P99_S:
        return Check(name, "warn", f"{text}: above {FSYNC_WARN_P99_S * 1e3:g} ms, every ack waits for "
                     "it (use flash or a low-latency LUN)", details)
    return Check(name, "pass", text, details)


def check_meta(cfg: SiteConfig, drva: DrvaSpec) -> Check:
    """The DRVA's metadata repository: one install keeps (not another DRVA's, nor one
    install made for another site), or a path it can create."""
    name = f"drva.{drva.name}.meta"
    path = drva.meta_path
    state = inspect_meta(path, drva.name, cfg.site)
    details = state.to_dict()
    if state.exists and not state.ours and not state.blank:
        return Check(name, "fail", f"{path}: {state.what}; install refuses to overwrite it", details)
    if state.exists:
        if (why := _probe_rw(path)) is not None:
            return Check(name, "fail", why, details)
        return Check(name, "pass", f"{path}: {state.what}, readable and writable", details)
    where = _existing_ancestor(path.parent)
    if (why := _probe_writable(where)) is not None:
        return Check(name, "fail", why, details)
    if _free_bytes(where) < META_BYTES:
        return Check(name, "fail", f"{path}: less than {format_size(META_BYTES)} free in {where}", details)
    return Check(name, "pass", f"{path}: absent; {where} is writable", details)


async def preflight_system(cfg: SiteConfig, env: Mapping[str, str] = os.environ,
                           progress: Progress | None = None, *, store: ObjectStore | None = None) -> dict[str, Any]:
    """``cdp preflight system``. ``store``: use it instead of opening ``cfg.store_url``."""

    async def store_checks() -> list[Check]:
        return await check_store(cfg, env, store)

    async def peer_store_checks() -> list[Check]:
        return await check_peer_store(cfg, env)

    steps: list[tuple[str, Callable[[], Any]]] = [
        ("runtime", check_runtime), ("modules", check_modules),
        ("secrets", lambda: check_secrets(cfg, env)), ("store", store_checks),
        ("peer_store", peer_store_checks)]
    for drva in cfg.drvas:
        steps += [(f"drva.{drva.name}.log", lambda d=drva: check_log_partition(cfg, d)),
                  (f"drva.{drva.name}.fsync", lambda d=drva: check_fsync(d)),
                  (f"drva.{drva.name}.meta", lambda d=drva: check_meta(cfg, d))]
    checks = await _run_checks(steps, progress or _no_progress)
    return summarize("system", checks, site=cfg.site, config=str(cfg.path))


# --------------------------------------------------------------------------- install


def check_site(cfg: SiteConfig) -> Check:
    cluster = cfg.cluster
    details = {"site_file": str(cfg.path), "cluster_file": str(cfg.cluster_path),
               "hosts": len(cluster.hosts), "vms": len(cluster.vms), "domains": len(cluster.domains),
               "drvas": len(cfg.drvas), "protected": list(cfg.protect)}
    if cluster.site != cfg.site:
        return Check("site", "fail", f"{cfg.cluster_path.name} describes site {cluster.site!r}, "
                     f"{cfg.path.name} site {cfg.site!r}: the wrong cluster file?", details)
    return Check("site", "pass", f"{cfg.site}: {_n(len(cluster.hosts), 'host')}, {_n(len(cluster.vms), 'VM')}, "
                 f"{_n(len(cluster.domains), 'domain')} ({len(cfg.protect)} protected), "
                 f"{_n(len(cfg.drvas), 'DRVA')}", details)


def check_domains(cfg: SiteConfig) -> list[Check]:
    """Each protected domain's VMs and hosts exist; a domain whose DRVA is not one of the
    site's could never be protected."""
    checks = []
    hosts = {h.name for h in cfg.cluster.hosts}
    vms = {v.name for v in cfg.cluster.vms}
    listens = {d.listen for d in cfg.drvas}
    for spec in cfg.cluster.domains:
        name = f"domain.{spec.name}"
        placed = ", ".join(f"{vm.name} on {vm.host}" for vm in spec.vms)
        if spec.name not in cfg.protect:
            if spec.drva not in listens:
                checks.append(Check(name, "warn", f"not protected, and streams to {spec.drva}, which no "
                                    "DRVA of the site listens on: it cannot be protected"))
            continue
        gone = [vm.name for vm in spec.vms if vm.name not in vms] + \
               [f"host {vm.host}" for vm in spec.vms if vm.host not in hosts]
        if gone:
            checks.append(Check(name, "fail", f"missing from {cfg.cluster_path.name}: {', '.join(gone)}"))
            continue
        drva = cfg.drva_of(spec)
        checks.append(Check(name, "pass", f"id {spec.id}: {placed}; {_n(len(spec.disks), 'disk')}; DRVA "
                            f"{drva.name} ({drva.listen})",
                            {"id": spec.id, "vms": [vm.name for vm in spec.vms], "drva": drva.name}))
    return checks


def check_disk_images(cfg: SiteConfig) -> Check:
    """The protected VMs' disk images can be opened or created (sparse) where the cluster
    file puts them."""
    problems, existing, to_create, total = [], 0, 0, 0
    dirs: set[Path] = set()
    for name in cfg.protect:
        for d in cfg.domain(name).disks:
            image, size = d.disk.image, d.disk.size
            total += size
            if image.exists():
                existing += 1
                try:
                    have = image.stat().st_size
                    with image.open("rb") as f:
                        f.read(512)
                except OSError as exc:
                    problems.append(f"{image}: unreadable ({exc.strerror})")
                    continue
                if have not in (0, size):
                    problems.append(f"{image}: {have} bytes, the disk {d.vm.name}/{d.disk.name} has {size} "
                                    "(an image is never resized)")
            else:
                to_create += 1
                dirs.add(_existing_ancestor(image.parent))
    for where in sorted(dirs):
        if (why := _probe_writable(where)) is not None:
            problems.append(why)
    details = {"state_dir": str(cfg.cluster.state_dir), "existing": existing, "to_create": to_create,
               "bytes": total}
    if problems:
        return Check("disk-images", "fail", "; ".join(problems), details)
    return Check("disk-images", "pass", f"{existing} present, {to_create} to create (sparse) under "
                 f"{cfg.cluster.state_dir}, {format_size(total)} in all", details)


def check_names(cfg: SiteConfig) -> list[Check]:
    """No DRVA named like a VM or a host; no two DRVAs (or a DRVA and the API) on one port."""
    drvas = {d.name for d in cfg.drvas}
    vms = {v.name for v in cfg.cluster.vms}
    hosts = {h.name for h in cfg.cluster.hosts}
    clashes = [f"DRVA {n} is also a VM" for n in sorted(drvas & vms)] + \
              [f"DRVA {n} is also a host" for n in sorted(drvas & hosts)]
    shared = sorted(vms & hosts)
    if clashes:
        names = Check("names", "fail", "; ".join(clashes) + ": rename the DRVA in the site file")
    elif shared:
        names = Check("names", "warn", f"VM and host share a name: {', '.join(shared)}")
    else:
        names = Check("names", "pass", f"{_n(len(drvas), 'DRVA')}, {_n(len(vms), 'VM')}, "
                      f"{_n(len(hosts), 'host')}: no clash")
    by_port: dict[int, list[str]] = {}
    for d in cfg.drvas:
        by_port.setdefault(d.listen.port, []).append(f"DRVA {d.name}")
    by_port.setdefault(cfg.api_listen.port, []).append("the API")
    shared_ports = {p: who for p, who in by_port.items() if len(who) > 1}
    if shared_ports:
        ports = Check("ports.distinct", "fail", "; ".join(f"{' and '.join(who)} on port {p}"
                                                          for p, who in sorted(shared_ports.items())) +
                      ": one process per port")
    else:
        ports = Check("ports.distinct", "pass", f"{len(by_port)} distinct ports")
    return [names, ports, _check_paths(cfg)]


def _check_paths(cfg: SiteConfig) -> Check:
    """No two partitions on one path: the second DRVA would find the first one's log."""
    users: dict[Path, list[str]] = {}
    for d in cfg.drvas:
        users.setdefault(d.log_path.resolve(), []).append(f"the log of DRVA {d.name}")
        users.setdefault(d.meta_path.resolve(), []).append(f"the metadata of DRVA {d.name}")
    shared = {p: who for p, who in users.items() if len(who) > 1}
    if shared:
        return Check("paths.distinct", "fail", "; ".join(f"{' and '.join(who)} share {p}"
                                                         for p, who in sorted(shared.items())) +
                     ": one partition per path")
    return Check("paths.distinct", "pass", f"{len(users)} partitions on distinct paths")


def _bind_problem(host: str, port: int) -> str | None:
    """None when ``host:port`` can be listened on now (as the server will: SO_REUSEADDR)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host}: {exc.strerror}"
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "in use"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"{host} is not an address of this machine"
            return f"cannot bind: {exc.strerror}"
    return None


def _daemon_if_readable(cfg: SiteConfig) -> DaemonState | None:
    """The daemon the pid file names; None when ``state_dir`` is refused (the ``dirs``
    check says why): a pid file there proves nothing."""
    if _state_dir_refused(cfg):
        return None
    return daemon_state(cfg)


def check_ports(cfg: SiteConfig) -> list[Check]:
    daemon = _daemon_if_readable(cfg)
    conventional = f"{DRVA_PORTS.start}–{DRVA_PORTS.stop - 1}"
    checks = []
    targets = [(f"port.{d.name}", d.listen, True) for d in cfg.drvas] + [("port.api", cfg.api_listen, False)]
    for name, listen, is_drva in targets:
        problem = _bind_problem(listen.host, listen.port)
        details = {"listen": str(listen)}
        if problem == "in use" and daemon is not None and daemon.running:
            checks.append(Check(name, "warn", f"{listen} in use, likely by the running daemon "
                                f"(process {daemon.pid})", details))
        elif problem is not None:
            checks.append(Check(name, "fail", f"{listen}: {problem}", details))
        elif is_drva and listen.port not in DRVA_PORTS:
            checks.append(Check(name, "warn", f"{listen} free, but outside the DRVA ports {conventional} "
                                "(firewalls are opened for those)", details))
        else:
            checks.append(Check(name, "pass", f"{listen} free", details))
    return checks


def check_dirs(cfg: SiteConfig) -> Check:
    """Every directory install writes in is ours alone, or missing: the check install
    makes before anything else (``cdp.msa.install_dirs``), each problem named once."""
    dirs = sorted({str(path) for _, path in local_dirs(cfg)})
    errors = local_dir_errors(cfg)
    if errors:
        return Check("dirs", "fail", "; ".join(e.message for e in errors),
                     {"dirs": dirs, "problems": [e.message for e in errors]})
    return Check("dirs", "pass", f"{_n(len(dirs), 'directory')} to write in, each missing or owned by "
                 f"{who(os.geteuid())} or root and writable by no other user", {"dirs": dirs})


def check_state_dirs(cfg: SiteConfig) -> Check:
    """``state_dir`` (and its job records) ours alone: uninstall reads the daemon's pid
    file and the install record there, and refuses the directory otherwise."""
    check_state_dir(cfg)  # a ConfigError is this check's failure (_run_checks)
    return Check("dirs", "pass", f"{cfg.state_dir}: missing or owned by {who(os.geteuid())} or root and "
                 "writable by no other user", {"dirs": [str(cfg.state_dir), str(jobs_dir(cfg))]})


def _state_dir_refused(cfg: SiteConfig) -> bool:
    try:
        check_state_dir(cfg)
    except ConfigError:
        return True
    return False


def _tls_dir_refused(cfg: SiteConfig) -> bool:
    """Install would refuse ``[tls] dir`` before planning anything in it (``check_dirs``)."""
    return cfg.tls is not None and (dir_problem(cfg.tls.dir) is not None or cfg.tls.dir.is_symlink())


def check_local_state(cfg: SiteConfig) -> Check:
    """An installation in the state directory: ours is fine, another site's is not."""
    configs = [str(drva_config_path(cfg, d)) for d in cfg.drvas if drva_config_path(cfg, d).exists()]
    path = protection_path(cfg)
    details = {"state_dir": str(cfg.state_dir), "protection": path.exists(), "drva_configs": configs}
    if path.exists():
        try:
            load_protection(cfg)
        except ConfigError as exc:
            return Check("state", "fail", f"{exc.message}: move {cfg.state_dir} away or set state_dir",
                         details)
    if path.exists() or configs:
        return Check("state", "warn", f"{cfg.state_dir} holds an installation of {cfg.site}; install "
                     "is idempotent (keeps protection.json and formatted partitions)", details)
    return Check("state", "pass", f"{cfg.state_dir}: no installation", details)


async def check_installation(cfg: SiteConfig, env: Mapping[str, str], store: ObjectStore | None) -> Check:
    """The store's deployment records: this site's = already installed; another's = no."""
    try:
        store, opened = _open_store(cfg, env, store)
    except ConfigError as exc:
        return Check("installation", "fail", exc.message)
    try:
        where = store.describe()
        try:
            foreign = await _within(foreign_domains(store, cfg))
            if foreign:
                return Check("installation", "fail", f"{where} holds domain ids of this site as another "
                             f"site's: {'; '.join(foreign)}", {"domains": foreign})
            others = await _within(other_sites(store, cfg.site))
            mine = await _within(read_deployment(store, cfg.site))
        except NotFound:
            return Check("installation", "pass", f"{where}: the bucket or container does not exist yet "
                         "(install creates it)")
        except TimeoutError:
            return Check("installation", "fail", f"{where}: no answer within {STORE_OP_TIMEOUT_S:g} s")
        except CdpError as exc:
            return Check("installation", "fail", exc.message)
        shared = f"; shared with site(s) {', '.join(others)}" if others else ""
        if mine is not None:
            return Check("installation", "warn", f"{where}: {cfg.site} already installed "
                         f"({_when(mine.created_ns)}, cdp-engine {mine.engine_version}); install is "
                         f"idempotent{shared}", {**mine.body(), "other_sites": others})
        return Check("installation", "pass", f"{where}: no installation of {cfg.site}{shared}",
                     {"other_sites": others})
    finally:
        if opened:
            await store.close()


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))


async def preflight_install(cfg: SiteConfig, env: Mapping[str, str] = os.environ,
                            progress: Progress | None = None, *, store: ObjectStore | None = None) -> dict[str, Any]:
    """``cdp preflight install``."""

    async def installation() -> Check:
        return await check_installation(cfg, env, store)

    steps: list[tuple[str, Callable[[], Any]]] = [
        ("site", lambda: check_site(cfg)), ("domains", lambda: check_domains(cfg)),
        ("disk-images", lambda: check_disk_images(cfg)), ("names", lambda: check_names(cfg)),
        ("dirs", lambda: check_dirs(cfg)), ("ports", lambda: check_ports(cfg)),
        ("state", lambda: [] if _state_dir_refused(cfg) else check_local_state(cfg)),
        ("tls", lambda: [] if _tls_dir_refused(cfg) else check_tls(cfg)), ("installation", installation)]
    checks = await _run_checks(steps, progress or _no_progress)
    return summarize("install", checks, site=cfg.site, config=str(cfg.path))


def check_tls(cfg: SiteConfig) -> list[Check]:
    """With ``[tls]`` on: what install would do with the site CA and the certificates
    (``cdp.pki.plan_site_pki``); a renewal without the CA key is refused now."""
    from cdp.pki import plan_site_pki
    from drva.config import blocking_file

    if cfg.tls is None:
        return []
    tls = cfg.tls
    if (blocker := blocking_file(tls.dir)) is not None:
        return [Check("tls", "fail", f"tls.dir {tls.dir}: {blocker!r} is a regular file, not a directory")]
    leaves = [tls.drva_leaf(d) for d in cfg.drvas] + [tls.api_leaf(cfg.api_listen)]
    plan = plan_site_pki(tls.files, leaves)
    if plan["needs_ca_key"] and not tls.files.ca_key.exists():
        due = [path for path, action in plan["certs"].items() if action != "keep"]
        return [Check("tls", "fail", f"{tls.files.ca_key} is missing and install must sign {', '.join(due)}: "
                                     f"put the CA key back (or move {tls.dir} away for a new CA)", plan)]
    changes = [f"{Path(path).name}: {action}" for path, action in plan["certs"].items() if action != "keep"]
    text = f"CA {plan['ca']}; " + ("; ".join(changes) if changes else "every certificate kept")
    return [Check("tls", "pass", f"{tls.dir}: {text}", plan)]


# --------------------------------------------------------------------------- uninstall


def _tree_bytes(path: Path) -> tuple[int, int]:
    files = size = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                size += os.lstat(os.path.join(root, n)).st_size
                files += 1
            except OSError:
                continue
    return files, size


Verdicts = tuple[list[tuple[MadePartition, PathState]], list[dict[str, Any]]]


def _partition_verdicts(cfg: SiteConfig, made: dict[str, MadePartition]) -> Verdicts:
    """What uninstall would do with the partitions: (the install record's entries it
    would remove, each with what lies there; the partitions it would leave alone, each
    with why). The same verdicts uninstall acts on (``cdp.msa.install_removal``)."""
    remove: list[tuple[MadePartition, PathState]] = []
    left: list[dict[str, Any]] = []
    for entry in sorted(made.values(), key=lambda m: m.path):
        state, why = made_verdict(entry)
        if why is not None:
            left.append({"path": entry.path, "why": why})
        elif state is not None:
            remove.append((entry, state))
    return remove, left + kept_not_made(cfg, made)


def check_removal(cfg: SiteConfig, drva: DrvaSpec) -> Check:
    """What uninstall would remove for one DRVA — its configuration, its state directory,
    the partitions the install record names that still are the files install made — and
    what it would leave alone, with why (``details.left_alone``: as uninstall says it)."""
    made = load_install_record(cfg.state_dir, cfg.site)
    remove_all, left_all = _partition_verdicts(cfg, made)
    remove: list[str] = []
    conf = drva_config_path(cfg, drva)
    if conf.exists():
        remove.append(f"config {conf}")
    state_dir = cfg.drva_state_dir(drva)
    mine = {str(role.path(drva)) for role in ROLES.values()} | {m.path for m in made.values() if m.drva == drva.name}
    left = [e for e in left_all if e["path"] in mine]
    if (why := drva_dir_kept(cfg, drva, left_all)) is not None:
        left.append({"path": str(state_dir), "why": why})
    elif state_dir.exists():
        files, size = _tree_bytes(state_dir)
        remove.append(f"state dir {state_dir} ({files} files, {format_size(size)})")
    remove += [f"{ROLES[entry.role].what} {entry.path} ({format_size(state.size)})"
               for entry, state in remove_all if entry.drva == drva.name]
    leave = [f"{e['path']} ({e['why']})" for e in left]
    details = {"remove": remove, "leave": leave, "left_alone": left}
    text = f"would remove {'; '.join(remove)}" if remove else "nothing to remove"
    if leave:
        return Check(f"remove.{drva.name}", "warn", f"{text}; would leave {'; '.join(leave)}", details)
    return Check(f"remove.{drva.name}", "pass", text, details)


def check_site_removal(cfg: SiteConfig, installed: bool) -> Check:
    """What uninstall would remove for the whole site: protection.json, the install
    record (and any partition it names of a DRVA no longer in the site file), the
    deployment record; it keeps the job history."""
    made = load_install_record(cfg.state_dir, cfg.site)
    configured = {d.name for d in cfg.drvas}
    remove_all, left_all = _partition_verdicts(cfg, made)
    remove = [f"{ROLES[entry.role].what} {entry.path} of DRVA {entry.drva} (no longer in the site file)"
              for entry, _ in remove_all if entry.drva not in configured]
    left = [e for e in left_all if e["path"] in made and made[e["path"]].drva not in configured]
    leave = [f"{e['path']} ({e['why']})" for e in left]
    if protection_path(cfg).exists():
        remove.append(f"{protection_path(cfg)}")
    if install_record_path(cfg.state_dir).exists():
        remove.append(f"the install record {install_record_path(cfg.state_dir)}")
    if installed:
        remove.append(f"the deployment record {deployment_key(cfg.site)}")
    text = f"would remove {', '.join(remove)}" if remove else "nothing to remove"
    details = {"remove": remove, "keep": [str(jobs_dir(cfg))], "leave": leave, "left_alone": left}
    if leave:
        return Check("remove.site", "warn", f"{text}; would leave {'; '.join(leave)}; keeps the job history "
                     f"{jobs_dir(cfg)}", details)
    return Check("remove.site", "pass", f"{text}; keeps the job history {jobs_dir(cfg)}", details)


async def check_kept_data(cfg: SiteConfig, store: ObjectStore) -> list[Check]:
    """Each domain's objects: kept by uninstall, deleted by ``--purge`` — unless purge
    leaves them alone (another site's, or a catalog that cannot be read: a warning,
    saying why), or a failover registered the domain here."""
    usage = await _within(domain_usage(store, cfg), STORE_OP_TIMEOUT_S * 10)
    checks = []
    for u in usage:
        held = f"{u['objects']} objects, {format_size(u['bytes'])} under {u['prefix']}"
        if u["purge"]:
            checks.append(Check(f"keep.{u['domain']}", "pass", f"{held}: kept (deleted with --purge)", u))
        else:
            checks.append(Check(f"keep.{u['domain']}", "warn", f"{held}: kept, even with --purge: {u['why']}", u))
    for r in registered_kept(cfg):
        checks.append(Check(f"keep.{r['domain']}", "pass", f"kept, even with --purge: {r['why']}", r))
    return checks


async def preflight_uninstall(cfg: SiteConfig, env: Mapping[str, str] = os.environ,
                              progress: Progress | None = None, *, store: ObjectStore | None = None) -> dict[str, Any]:
    """``cdp preflight uninstall``."""
    progress = progress or _no_progress
    try:
        store_, opened = _open_store(cfg, env, store)
    except ConfigError as exc:
        return summarize("uninstall", [Check("installation", "fail", exc.message)], site=cfg.site,
                         config=str(cfg.path))
    installed = False
    try:
        async def installation() -> Check:
            nonlocal installed
            where = store_.describe()
            try:
                record = await _within(read_deployment(store_, cfg.site))
            except NotFound:
                record = None
            except TimeoutError:
                return Check("installation", "fail", f"{where}: no answer within {STORE_OP_TIMEOUT_S:g} s")
            if record is None:
                return Check("installation", "warn", f"{where}: no deployment record of {cfg.site}: not "
                             "installed, or already uninstalled (uninstall is idempotent)")
            installed = True
            return Check("installation", "pass", f"{where}: {cfg.site} installed {_when(record.created_ns)} "
                         f"by cdp-engine {record.engine_version}, {len(record.drvas)} DRVAs", record.body())

        def daemon() -> Check:
            state = daemon_state(cfg)
            if state.running:
                return Check("daemon", "warn", f"{state.note}: uninstall stops it (SIGTERM) first",
                             state.to_dict())
            return Check("daemon", "pass", f"not running ({state.note})", state.to_dict())

        async def kept() -> list[Check]:
            return await check_kept_data(cfg, store_)

        steps: list[tuple[str, Callable[[], Any]]] = [("installation", installation),
                                                      ("dirs", lambda: check_state_dirs(cfg))]
        if not _state_dir_refused(cfg):  # else uninstall stops there: nothing below is read or removed
            steps += [("daemon", daemon)]
            steps += [(f"remove.{d.name}", lambda d=d: check_removal(cfg, d)) for d in cfg.drvas]
            steps += [("remove.site", lambda: check_site_removal(cfg, installed))]
        steps += [("keep", kept)]
        checks = await _run_checks(steps, progress)
    finally:
        if opened:
            await store_.close()
    return summarize("uninstall", checks, site=cfg.site, config=str(cfg.path))


__all__ = [
    "Check", "MODULES", "SKEW_FAIL_S", "SKEW_WARN_S", "format_checks", "preflight_install",
    "preflight_system", "preflight_uninstall", "summarize",
]
