"""``cdp preflight system``: the runtime and modules, the secrets (names only), the store
(writable, its clock against ours), the peer's store, and per DRVA its log partition,
``fdatasync`` latency and metadata repository.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from cdp.errors import ConfigError, FormatError, NotFound, StoreError
from cdp.locks import SKEW_DEFAULT_S
from cdp.logfmt import DATA_SIZE_MIN, DATA_START
from cdp.meta import SLOT_SIZE_DEFAULT
from cdp.msa.config import DrvaSpec, SiteConfig
from cdp.msa.deployment import SITES_PREFIX
from cdp.msa.install_inspect import inspect_log, inspect_meta
from cdp.msa.preflight_check import (
    STORE_OP_TIMEOUT_S, Check, Progress, _existing_ancestor, _free_bytes, _no_progress, _open_store,
    _probe_writable, _run_checks, _within, format_size, summarize,
)
from cdp.store.base import ObjectStore, get_bounded

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
PROBE_BYTES = 64 << 10
LOG_SIZE_WARN = 64 << 20  # below this a DRVA rides out only a short store outage
FSYNC_SAMPLES = 16
FSYNC_WRITE_BYTES = 4096
FSYNC_WARN_P99_S = 0.010
META_BYTES = 2 * SLOT_SIZE_DEFAULT
_HTTP_STORES = ("s3", "azure")


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def _store_kind(store: ObjectStore) -> str:
    while getattr(store, "inner", None) is not None:  # FaultyStore and other wrappers
        store = store.inner
    return getattr(store, "kind", "store")


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
        # The probe's own size bounds the read: an answer of gigabytes is refused unread.
        got, get_s = await _timed(get_bounded(store, key, PROBE_BYTES))
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
    except (StoreError, FormatError) as exc:  # FormatError: the probe read back larger than written
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
