"""``cdp install`` and ``cdp uninstall``: the seed's Install-JetDR / Uninstall-JetDR.

Install, in this order, each step idempotent so a second run (or a run after a crash
half-way) ends in the same state:

1. the bucket / container / root directory exists (``ensure_container``), and no domain
   of this site's inventory has an id whose catalog in the store another site owns
   (``foreign_domains``). Sites may share a store — a recovery site must reach its
   protected site's — but a domain id is one domain's in the store;
2. per DRVA: its state directory, its replication-log partition (formatted with the
   DRVA's name as label when missing or blank; kept when it already carries that label;
   anything else is refused, never overwritten), its metadata repository (same rules)
   and its configuration file ``<state_dir>/drvas/<name>.toml``;
3. with ``[tls] mode = "on"``, the site CA and a certificate for each DRVA and for the
   API (``cdp.pki.ensure_site_pki``, in ``[tls] dir``): kept while good, renewed when
   near expiry, when the names they must hold changed, or when another CA signed them;
   each DRVA's configuration then names its certificate and key (``[tls]``);
4. ``<state_dir>/protection.json`` from the site file's ``[[protect]]``, only if absent:
   the daemon owns it afterwards (``cdp protect`` / ``unprotect``);
5. last, the deployment record ``sites/<site>/deployment.cdpd`` (FORMAT.md §12), so a
   record in the store means a completed installation.

Uninstall stops the daemon (SIGTERM to the process ``<state_dir>/msa.pid`` names, then
waits), removes what install made — DRVA configurations and state directories, log
partitions and metadata repositories that carry this DRVA's format, protection.json,
the deployment record — and keeps ``<state_dir>/jobs`` (job history has its own
retention), the TLS directory (the site CA: a reinstall keeps trusting it) and every
replicated object, unless ``purge``: then each domain of the
cluster file loses every object under ``d/<id>/`` and a chunk sweep drops the chunks no
manifest names any more. A domain a failover registered here is never purged: its
objects are the peer site's history too (``registered_kept``).

Secrets are read from the environment only to check that they are there; no summary,
log line or record holds one.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import tomli_w

from cdp.durable import atomic_write, fsync_dir
from cdp.errors import AlreadyExists, Busy, ConfigError, LogError, MetaError, NotFound
from cdp.layout import catalog_prefix, domain_prefix
from cdp.locks import live_locks, maintenance_lock, recovery_prefix
from cdp.logfmt import BLOCK, SUPERBLOCK_COUNT, unpack_superblock
from cdp.logs import get_logger
from cdp.meta import SLOT_SIZE_DEFAULT, MetaRepository
from cdp.msa.config import DrvaSpec, SiteConfig
from cdp.msa.deployment import (
    Deployment, decode_deployment, deployment_key, encode_deployment, installed_sites,
    read_deployment,
)
from cdp.msa.protection import load_protection, protection_path, save_protection
from cdp.msa.procs import pid_alive
from cdp.pki import ensure_site_pki
from cdp.replog import ReplicationLog
from cdp.store.base import ObjectStore

log = get_logger("cdp.msa.install")

Progress = Callable[[str, int | None, int | None], None]
DAEMON_STOP_TIMEOUT_S = 60.0
DELETE_CONCURRENCY = 16
_LOG_HEAD_BYTES = SUPERBLOCK_COUNT * BLOCK  # both superblock copies
_LABEL_BYTES = 32  # FORMAT.md §3.2: the superblock keeps the first 32 bytes of a label


def engine_version() -> str:
    try:
        return metadata.version("cdp-engine")
    except metadata.PackageNotFoundError:
        return "unknown"


def drva_config_path(cfg: SiteConfig, drva: DrvaSpec) -> Path:
    return cfg.state_dir / "drvas" / f"{drva.name}.toml"


def jobs_dir(cfg: SiteConfig) -> Path:
    return cfg.state_dir / "jobs"


def pid_path(cfg: SiteConfig) -> Path:
    return cfg.state_dir / "msa.pid"


def _no_progress(phase: str, done: int | None = None, total: int | None = None) -> None:
    return None


# --------------------------------------------------------------------------- what is on disk


@dataclass(frozen=True)
class PathState:
    """What lies at a partition's path, as install and uninstall see it.

    ``ours``: a valid partition this DRVA may keep (install) or remove (uninstall);
    ``blank``: nothing was ever formatted there (missing, empty, or zeros where the
    format's headers go), so install may format it.
    """

    path: Path
    kind: str  # "absent" | "file" | "device" | "other"
    size: int
    ours: bool
    blank: bool
    what: str

    @property
    def exists(self) -> bool:
        return self.kind != "absent"

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind, "size": self.size, "ours": self.ours,
                "blank": self.blank, "what": self.what}


def _path_kind(path: Path) -> tuple[str, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return "absent", 0
    if stat.S_ISREG(st.st_mode):
        return "file", st.st_size
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY)
        try:
            return "device", os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
    return "other", 0


def _read_at(path: Path, length: int, offset: int = 0) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def label_for(drva_name: str) -> str:
    """The label a DRVA's partition carries (the superblock keeps 32 bytes of it)."""
    return drva_name.encode("utf-8")[:_LABEL_BYTES].decode("utf-8", "ignore")


def inspect_log(path: Path, drva_name: str) -> PathState:
    """Is ``path`` missing, blank, ``drva_name``'s log partition, or something else?
    Reads the two superblocks only (no recovery scan, nothing written)."""
    try:
        kind, size = _path_kind(path)
        if kind == "absent":
            return PathState(path, kind, 0, False, True, "absent")
        if kind == "other":
            return PathState(path, kind, 0, False, False, "neither a regular file nor a block device")
        head = _read_at(path, _LOG_HEAD_BYTES)
    except OSError as exc:
        return PathState(path, "other", 0, False, False, f"unreadable ({exc.strerror})")
    found = [sb for i in range(SUPERBLOCK_COUNT)
             if not isinstance(sb := unpack_superblock(head[i * BLOCK:(i + 1) * BLOCK]), str)
             and sb.copy_index() == i]
    if not found:
        blank = not any(head)
        what = "blank (never formatted)" if blank else "not a log partition (no valid superblock)"
        return PathState(path, kind, size, False, blank, what)
    sb = max(found, key=lambda s: s.generation)
    if sb.label != label_for(drva_name):
        return PathState(path, kind, size, False, False,
                         f"the log partition of {sb.label!r}, not of DRVA {drva_name!r}")
    return PathState(path, kind, sb.partition_size, True, False, f"the log partition of {drva_name}")


def inspect_meta(path: Path) -> PathState:
    """Is ``path`` missing, blank, a metadata repository, or something else?"""
    try:
        kind, size = _path_kind(path)
        if kind == "absent":
            return PathState(path, kind, 0, False, True, "absent")
        if kind == "other":
            return PathState(path, kind, 0, False, False, "neither a regular file nor a block device")
        slot_heads = _read_at(path, BLOCK) + _read_at(path, BLOCK, SLOT_SIZE_DEFAULT)
    except OSError as exc:
        return PathState(path, "other", 0, False, False, f"unreadable ({exc.strerror})")
    if not any(slot_heads):
        return PathState(path, kind, size, False, True, "blank (never formatted)")
    try:
        MetaRepository.open(path).close()
    except MetaError as exc:
        return PathState(path, kind, size, False, False, f"not a metadata repository ({exc.message})")
    return PathState(path, kind, size, True, False, "a metadata repository")


def _wipe_headers(path: Path, length: int, offsets: tuple[int, ...]) -> None:
    """Make a block device blank again where a format's headers go (it cannot be deleted)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset in offsets:
            os.pwrite(fd, bytes(length), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the daemon


@dataclass(frozen=True)
class DaemonState:
    pid_file: Path
    pid: int | None
    running: bool
    note: str

    def to_dict(self) -> dict[str, Any]:
        return {"pid_file": str(self.pid_file), "pid": self.pid, "running": self.running, "note": self.note}


def _read_pid(path: Path) -> int | None:
    """The pid in the daemon's pid file: plain digits, or JSON with a "pid" key."""
    try:
        text = path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: unreadable pid file ({exc.strerror})") from exc
    try:
        value = json.loads(text)["pid"] if text.startswith("{") else int(text.split()[0])
    except (ValueError, KeyError, IndexError, TypeError):
        raise ConfigError(f"{path}: expected a process id, got {text[:40]!r}") from None
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{path}: expected a process id > 0, got {value!r}")
    return value


def _looks_like_cdp(pid: int) -> bool:
    """A pid file left by a crashed daemon may name a process that reused the pid: only a
    process whose command line mentions cdp is ever signalled (without procfs, trust it)."""
    try:
        return b"cdp" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return True


def daemon_state(cfg: SiteConfig) -> DaemonState:
    path = pid_path(cfg)
    pid = _read_pid(path)
    if pid is None:
        return DaemonState(path, None, False, "no pid file")
    if not pid_alive(pid):
        return DaemonState(path, pid, False, f"stale pid file: process {pid} is gone")
    if not _looks_like_cdp(pid):
        return DaemonState(path, pid, False, f"stale pid file: process {pid} is not a cdp process")
    return DaemonState(path, pid, True, f"running as process {pid}")


async def stop_daemon(cfg: SiteConfig, timeout_s: float = DAEMON_STOP_TIMEOUT_S) -> DaemonState:
    """SIGTERM the running daemon and wait until it exits (``Busy`` after ``timeout_s``)."""
    state = daemon_state(cfg)
    if not state.running or state.pid is None:
        return state
    log.info("daemon_stopping", pid=state.pid, pid_file=str(state.pid_file))
    try:
        os.kill(state.pid, signal.SIGTERM)
    except ProcessLookupError:
        return DaemonState(state.pid_file, state.pid, False, f"process {state.pid} exited")
    deadline = time.monotonic() + timeout_s
    while pid_alive(state.pid):
        if time.monotonic() >= deadline:
            raise Busy(f"the daemon (process {state.pid}, from {state.pid_file}) did not exit within "
                       f"{timeout_s:g} s of SIGTERM; stop it (kill {state.pid}) and run uninstall again")
        await asyncio.sleep(0.1)
    log.info("daemon_stopped", pid=state.pid)
    return DaemonState(state.pid_file, state.pid, False, f"stopped process {state.pid} (SIGTERM)")


# --------------------------------------------------------------------------- the store


def _open(cfg: SiteConfig, env: Mapping[str, str], store: ObjectStore | None) -> tuple[Any, bool]:
    """The store to use and whether we opened it (and so must close it)."""
    if store is not None:
        return store, False
    from cdp.store import open_store

    return open_store(cfg.store_url, env=env), True


async def other_sites(store: ObjectStore, site: str) -> list[str]:
    """Sites other than ``site`` installed on ``store`` ([] when the bucket is missing)."""
    try:
        return [s for s in await installed_sites(store) if s != site]
    except NotFound:
        return []


async def foreign_domains(store: ObjectStore, cfg: SiteConfig) -> list[str]:
    """This site's domains whose id the store holds as another site's (the owner of the
    catalog's current timeline), as "<name> (id N: <what the store has>)"."""
    from cdp.catalog import load_catalog

    out = []
    for spec in cfg.cluster.domains:
        try:
            state, _ = await load_catalog(store, spec.id)
        except NotFound:
            return out  # no bucket yet
        if state is None:
            continue
        tl = state.timeline()
        if tl.owner != cfg.site:
            out.append(f"{spec.name} (id {spec.id}: domain {state.domain.get('name')!r} of site {tl.owner!r})")
    return out


def _deployment_for(cfg: SiteConfig, created_ns: int) -> Deployment:
    return Deployment(cfg.site, created_ns, engine_version(),
                      tuple((d.name, str(d.listen)) for d in cfg.drvas), str(cfg.api_listen))


async def _write_deployment(store: ObjectStore, cfg: SiteConfig) -> tuple[Deployment, str]:
    """Create the record, or bring an existing one up to date keeping its ``created_ns``."""
    key = deployment_key(cfg.site)
    old = await read_deployment(store, cfg.site)
    if old is None:
        new = _deployment_for(cfg, time.time_ns())
        try:
            await store.put(key, encode_deployment(new), if_absent=True)
            return new, "written"
        except AlreadyExists:  # a concurrent install of this site won: follow it
            old = decode_deployment(key, await store.get(key))
    new = _deployment_for(cfg, old.created_ns)
    if new == old:
        return old, "kept"
    await store.put(key, encode_deployment(new))
    return new, "updated"


# --------------------------------------------------------------------------- install


def _install_log(cfg: SiteConfig, drva: DrvaSpec, index: int) -> dict[str, Any]:
    state = inspect_log(drva.log_path, drva.name)
    if state.ours:
        return {"path": str(drva.log_path), "size": state.size, "action": "kept"}
    if not state.blank:
        raise LogError(f"log partition {drva.log_path} of DRVA {drva.name}: {state.what}; install "
                       f"formats only a missing or blank partition and keeps one labelled "
                       f"{label_for(drva.name)!r}: move it away or change drvas[{index}].log.path "
                       f"in {cfg.path}")
    drva.log_path.parent.mkdir(parents=True, exist_ok=True)
    ReplicationLog.format(drva.log_path, None if state.kind == "device" else drva.log_size,
                          label=label_for(drva.name))
    log.info("log_partition_formatted", drva=drva.name, path=str(drva.log_path))
    return {"path": str(drva.log_path), "size": _path_kind(drva.log_path)[1], "action": "formatted"}


def _install_meta(cfg: SiteConfig, drva: DrvaSpec, index: int) -> dict[str, Any]:
    state = inspect_meta(drva.meta_path)
    if state.ours:
        return {"path": str(drva.meta_path), "action": "kept"}
    if not state.blank:
        raise MetaError(f"metadata repository {drva.meta_path} of DRVA {drva.name}: {state.what}; "
                        f"install formats only a missing or blank one: move it away or change "
                        f"drvas[{index}].meta.path in {cfg.path}")
    drva.meta_path.parent.mkdir(parents=True, exist_ok=True)
    MetaRepository.format(drva.meta_path)
    log.info("metadata_repository_formatted", drva=drva.name, path=str(drva.meta_path))
    return {"path": str(drva.meta_path), "action": "formatted"}


def _write_if_changed(path: Path, data: bytes) -> str:
    try:
        if path.read_bytes() == data:
            return "kept"
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    return "written"


def _install_drva_config(cfg: SiteConfig, drva: DrvaSpec, protected: list[str]) -> dict[str, Any]:
    domains = [name for name in protected if cfg.drva_of(cfg.domain(name)) is drva]
    path = drva_config_path(cfg, drva)
    cfg.drva_state_dir(drva).mkdir(parents=True, exist_ok=True)
    action = _write_if_changed(path, tomli_w.dumps(cfg.drva_config_doc(drva, domains)).encode())
    return {"path": str(path), "state_dir": str(cfg.drva_state_dir(drva)), "domains": domains,
            "action": action}


def _install_tls(cfg: SiteConfig) -> dict[str, Any] | None:
    """The site's CA and its servers' certificates (``cdp.pki``), when TLS is on."""
    if cfg.tls is None:
        return None
    leaves = [cfg.tls.drva_leaf(d) for d in cfg.drvas] + [cfg.tls.api_leaf(cfg.api_listen)]
    report = ensure_site_pki(cfg.tls.files, cfg.site, leaves)
    changed = [c["cert"] for c in report["certs"] if c["action"] != "kept"]
    log.info("tls_files", dir=report["dir"], ca=report["ca"]["action"], issued=changed)
    return report


def _install_protection(cfg: SiteConfig) -> dict[str, Any]:
    path = protection_path(cfg)
    if path.exists():
        action = "kept"  # the daemon owns it after install; load_protection checks it is ours
    else:
        save_protection(cfg, dict(cfg.protect))
        action = "written"
    return {"path": str(path), "domains": list(load_protection(cfg)), "action": action}


async def install(cfg: SiteConfig, env: Mapping[str, str] = os.environ, *, store: ObjectStore | None = None,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Install ``cfg``'s site (module docstring); return what each step did.

    ``store``: use this store instead of opening ``cfg.store_url`` (tests, the daemon).
    """
    progress = progress or _no_progress
    cfg.secret(env)  # ConfigError naming the variable: the DRVAs could not start without it
    cfg.api_token(env)
    steps = 4 + len(cfg.drvas)
    store, opened = _open(cfg, env, store)
    try:
        progress("store", 0, steps)
        ensure_container = getattr(store, "ensure_container", None)  # optional (cdp.store.base)
        if ensure_container is not None:
            await ensure_container()
        foreign = await foreign_domains(store, cfg)
        if foreign:
            raise ConfigError(f"{store.describe()} holds domain ids of {cfg.cluster_path.name} as another "
                              f"site's: {'; '.join(foreign)} — give this site's domains ids of their own, "
                              f"or point store in {cfg.path} at another bucket or prefix")
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        tls = await asyncio.to_thread(_install_tls, cfg)  # before the DRVA configurations that name its files
        progress("tls", 1, steps)
        protection = await asyncio.to_thread(_install_protection, cfg)
        progress("protection", 2, steps)
        drvas = []
        for i, drva in enumerate(cfg.drvas):
            log_part = await asyncio.to_thread(_install_log, cfg, drva, i)
            meta = await asyncio.to_thread(_install_meta, cfg, drva, i)
            conf = await asyncio.to_thread(_install_drva_config, cfg, drva, protection["domains"])
            drvas.append({"name": drva.name, "listen": str(drva.listen), "log": log_part, "meta": meta,
                          "config": conf})
            progress(f"drva {drva.name}", 3 + i, steps)
        record, record_action = await _write_deployment(store, cfg)
        progress("deployment record", steps, steps)
        log.info("installed", site=cfg.site, store=store.describe(), record=record_action)
        return {"site": cfg.site, "store": store.describe(), "state_dir": str(cfg.state_dir),
                "deployment": {"key": deployment_key(cfg.site), "action": record_action, **record.body()},
                "protection": protection, "drvas": drvas, "tls": tls}
    finally:
        if opened:
            await store.close()


# --------------------------------------------------------------------------- uninstall


def _remove_partition(state: PathState, wipe_offsets: tuple[int, ...], wipe_length: int) -> str:
    """Remove a partition file, or blank a device's headers; say which."""
    if state.kind == "file":
        state.path.unlink()
        fsync_dir(state.path.parent)
        return "removed"
    _wipe_headers(state.path, wipe_length, wipe_offsets)
    return "wiped (block device)"


def _rmdir_if_empty(directory: Path, within: Path) -> None:
    """Remove ``directory`` and its empty parents, never leaving ``within``."""
    within = within.resolve()
    directory = directory.resolve()
    while directory != within and within in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def _uninstall_drva(cfg: SiteConfig, drva: DrvaSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Remove one DRVA's files; return (removed, left alone) entries."""
    removed: list[dict[str, Any]] = []
    left: list[dict[str, Any]] = []
    for state, what, offsets, length in (
            (inspect_log(drva.log_path, drva.name), "log partition", (0,), _LOG_HEAD_BYTES),
            (inspect_meta(drva.meta_path), "metadata repository", (0, SLOT_SIZE_DEFAULT), BLOCK)):
        if state.ours:
            action = _remove_partition(state, offsets, length)
            removed.append({"path": str(state.path), "what": f"{what} of DRVA {drva.name}",
                            "size": state.size, "action": action})
            log.info("partition_removed", drva=drva.name, path=str(state.path), what=what)
            _rmdir_if_empty(state.path.parent, cfg.state_dir)
        elif state.exists:  # never ours to delete: someone else's data, or nothing formatted
            left.append({"path": str(state.path), "why": f"{state.what}: not removed"})
    conf = drva_config_path(cfg, drva)
    if conf.exists():
        conf.unlink()
        removed.append({"path": str(conf), "what": f"configuration of DRVA {drva.name}"})
    state_dir = cfg.drva_state_dir(drva)
    keep_inside = [e["path"] for e in left if state_dir.resolve() in Path(e["path"]).resolve().parents]
    if state_dir.exists() and not keep_inside:
        shutil.rmtree(state_dir)
        removed.append({"path": str(state_dir), "what": f"state directory of DRVA {drva.name}"})
    elif keep_inside:
        left.append({"path": str(state_dir), "why": f"holds {', '.join(keep_inside)}: not removed"})
    return removed, left


async def domain_usage(store: ObjectStore, cfg: SiteConfig) -> list[dict[str, Any]]:
    """Per domain of this site's own (its cluster file's): its objects in the store
    (count, bytes). Not a domain a failover registered here (``registered_kept``)."""
    out = []
    for spec in cfg.cluster.domains:
        if spec.name not in cfg.own_domains:
            continue
        prefix = domain_prefix(spec.id)
        count = size = 0
        try:
            async for info in store.list(prefix):
                count += 1
                size += info.size
        except NotFound:  # no bucket: no objects
            pass
        out.append({"domain": spec.name, "id": spec.id, "prefix": prefix, "objects": count, "bytes": size})
    return out


def registered_kept(cfg: SiteConfig) -> list[dict[str, Any]]:
    """The domains a failover registered here: never purged with the site. Their objects
    hold the peer site's history as well (its old timeline, which a failback reads), and
    the domain may be running here."""
    return [{"domain": spec.name, "id": spec.id, "why": "registered by a failover from the peer site: its objects "
             "are its history at both sites; fail it back or release it, then purge from the site that owns it"}
            for spec in cfg.cluster.domains if spec.name not in cfg.own_domains]


async def _purge_domain(store: ObjectStore, domain_id: int, progress: Progress, done_bytes: list[int],
                        total_bytes: int) -> int:
    """Delete every object of one domain, catalog first (so that an interrupted purge
    leaves no catalog naming missing objects); return how many were deleted."""
    async with await maintenance_lock(store, domain_id, owner="cdp uninstall --purge"):
        leases = await live_locks(store, recovery_prefix(domain_id))
        if leases:
            raise Busy(f"domain {domain_id}: a recovery is reading it ({leases[0].describe()}); "
                       f"purge it once the recovery is done")
        catalog = catalog_prefix(domain_id)
        cat = [i async for i in store.list(catalog)]
        rest = [i async for i in store.list(domain_prefix(domain_id)) if not i.key.startswith(catalog)]
        slots = asyncio.Semaphore(DELETE_CONCURRENCY)

        async def delete(info: Any) -> None:
            async with slots:
                await store.delete(info.key)
                done_bytes[0] += info.size
                progress(f"purge domain {domain_id}", done_bytes[0], total_bytes)

        for batch in (cat, rest):
            await asyncio.gather(*(delete(i) for i in batch))
    log.info("domain_purged", domain=domain_id, objects=len(cat) + len(rest))
    return len(cat) + len(rest)


async def _purge(store: ObjectStore, cfg: SiteConfig, progress: Progress) -> dict[str, Any]:
    from rocva.retention import sweep_chunks

    usage = await domain_usage(store, cfg)
    total = sum(u["bytes"] for u in usage)
    done = [0]
    domains = []
    for u in usage:
        deleted = await _purge_domain(store, u["id"], progress, done, total) if u["objects"] else 0
        domains.append({**u, "deleted": deleted})
    try:
        chunks = await sweep_chunks(store, owner="cdp uninstall --purge")
    except Busy as exc:  # a chunk writer of another site or job: the next sweep gets them
        chunks = {"deferred": exc.message}
    return {"domains": domains, "bytes": total, "chunk_sweep": chunks}


async def uninstall(cfg: SiteConfig, purge: bool = False, env: Mapping[str, str] = os.environ, *,
                    store: ObjectStore | None = None, progress: Progress | None = None,
                    stop_timeout_s: float = DAEMON_STOP_TIMEOUT_S) -> dict[str, Any]:
    """Uninstall ``cfg``'s site (module docstring); return what was removed and kept."""
    progress = progress or _no_progress
    store, opened = _open(cfg, env, store)
    try:
        progress("store", 0, None)
        key = deployment_key(cfg.site)
        try:  # reach the store before touching anything local; a damaged record goes too
            await store.stat(key)
            installed = True
        except NotFound:  # no record, or no bucket at all
            installed = False
        progress("daemon", 0, None)
        daemon = await stop_daemon(cfg, stop_timeout_s)
        removed: list[dict[str, Any]] = []
        left: list[dict[str, Any]] = []
        for drva in cfg.drvas:
            r, lf = await asyncio.to_thread(_uninstall_drva, cfg, drva)
            removed += r
            left += lf
        _rmdir_if_empty(cfg.state_dir / "drvas", cfg.state_dir)
        if protection_path(cfg).exists():
            protection_path(cfg).unlink()
            removed.append({"path": str(protection_path(cfg)), "what": "protected domains"})
        if pid_path(cfg).exists() and not daemon_state(cfg).running:  # left by a crashed daemon
            pid_path(cfg).unlink()
            removed.append({"path": str(pid_path(cfg)), "what": "stale daemon pid file"})
        if installed:
            await store.delete(key)
            removed.append({"key": key, "what": "deployment record"})
        purged = await _purge(store, cfg, progress) if purge else None
        # The site CA stays: a reinstall keeps it, so the peers and clients that trust it
        # need nothing new (FORMAT.md §20 says how to replace it).
        kept = {"jobs": str(jobs_dir(cfg)), "tls": str(cfg.tls.dir) if cfg.tls is not None else None,
                "domains": [] if purge else await domain_usage(store, cfg), "registered": registered_kept(cfg)}
        log.info("uninstalled", site=cfg.site, purge=purge, removed=len(removed))
        return {"site": cfg.site, "store": store.describe(), "purge": purge, "daemon": daemon.to_dict(),
                "removed": removed, "left_alone": left, "kept": kept, "purged": purged}
    finally:
        if opened:
            await store.close()


__all__ = [
    "DaemonState", "PathState", "daemon_state", "domain_usage", "drva_config_path", "registered_kept",
    "engine_version", "foreign_domains", "inspect_log", "inspect_meta", "install", "label_for", "other_sites",
    "pid_path", "stop_daemon", "uninstall",
]
