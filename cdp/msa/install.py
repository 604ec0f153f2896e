"""``cdp install`` and ``cdp uninstall``: the seed's Install-JetDR / Uninstall-JetDR.

Both run as root: they write and delete only what they were told they may.

Install, in this order, each step idempotent so a second run (or a run after a crash
half-way) ends in the same state:

0. every directory it will write in — ``state_dir``, ``[tls] dir``, each partition's
   directory — is ours alone (``dir_problem``: owned by us or root, writable by no other
   user, reached only through directories and links no other user controls, as ssh's
   StrictModes asks), or missing (install creates it). Anything else is refused before
   anything is written: another user could point our writes elsewhere;
1. the bucket / container / root directory exists (``ensure_container``), and no domain
   of this site's inventory has an id whose catalog in the store another site owns
   (``foreign_domains``). Sites may share a store — a recovery site must reach its
   protected site's — but a domain id is one domain's in the store;
2. per DRVA: its state directory, its replication-log partition and its metadata
   repository, and its configuration file ``<state_dir>/drvas/<name>.toml``. A partition
   that is missing or blank is created (never through a symbolic link) and formatted —
   a log with the label ``<drva>@<site>`` (``label_for``) — and written down in the
   install record ``<state_dir>/install.json`` (``cdp.msa.deployment``) with the
   identity it has (device and inode, a log's uuid). One the record names, still that
   same file, is kept. Any other valid partition of this DRVA is kept as "not made by
   this install" (uninstall leaves it); one that carries another site's or another
   DRVA's label, or that is no partition at all, is refused, never overwritten;
3. with ``[tls] mode = "on"``, the site CA and a certificate for each DRVA and for the
   API (``cdp.pki.ensure_site_pki``, in ``[tls] dir``): kept while good, renewed when
   near expiry, when the names they must hold changed, or when another CA signed them;
   each DRVA's configuration then names its certificate and key (``[tls]``);
4. ``<state_dir>/protection.json`` from the site file's ``[[protect]]``, only if absent:
   the daemon owns it afterwards (``cdp protect`` / ``unprotect``);
5. last, the deployment record ``sites/<site>/deployment.cdpd`` (FORMAT.md §12), so a
   record in the store means a completed installation.

Uninstall stops the daemon (SIGTERM to the process ``<state_dir>/msa.pid`` names, only
if it is the process that wrote it: same pid *and* start time; then waits), removes
what install made — DRVA configurations and state directories, the partitions the
install record names while they still are the files it made, the record,
protection.json, the deployment record — and keeps ``<state_dir>/jobs`` (job history
has its own retention), the TLS directory (the site CA: a reinstall keeps trusting it),
every partition install did not make, and every replicated object, unless ``purge``:
then each domain of the cluster file this site owns loses every object under
``d/<id>/`` and a chunk sweep drops the chunks no manifest names any more. A domain is
this site's when its catalog's current timeline is (the check install makes); one of
another site, or whose catalog cannot be read, is left alone and said so. A domain a
failover registered here is never purged: its objects are the peer site's history too
(``registered_kept``).

Secrets are read from the environment only to check that they are there; no summary,
log line or record holds one.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import shutil
import signal
import stat
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import tomli_w

from cdp.durable import atomic_write, create_new, fsync_dir
from cdp.errors import AlreadyExists, Busy, CdpError, ConfigError, LogError, MetaError, NotFound
from cdp.layout import catalog_prefix, domain_prefix
from cdp.locks import live_locks, maintenance_lock, recovery_prefix
from cdp.logfmt import BLOCK, SUPERBLOCK_COUNT, unpack_superblock
from cdp.inventory import DomainSpec
from cdp.logs import get_logger
from cdp.meta import SLOT_SIZE_DEFAULT, MetaRepository
from cdp.msa.config import DrvaSpec, SiteConfig
from cdp.msa.deployment import (
    Deployment, MadePartition, decode_deployment, deployment_key, encode_deployment, install_record_path,
    installed_sites, load_install_record, read_deployment, save_install_record,
)
from cdp.msa.keeper import read_pid_file, same_process, stale_reason
from cdp.msa.protection import load_protection, protection_path, save_protection
from cdp.pki import ensure_site_pki
from cdp.replog import ReplicationLog
from cdp.store.base import ObjectStore

log = get_logger("cdp.msa.install")

Progress = Callable[[str, int | None, int | None], None]
DAEMON_STOP_TIMEOUT_S = 60.0
DELETE_CONCURRENCY = 16
_LOG_HEAD_BYTES = SUPERBLOCK_COUNT * BLOCK  # both superblock copies
_LABEL_BYTES = 32  # FORMAT.md §3.2: the superblock keeps the first 32 bytes of a label
SYMLINK_HOPS_MAX = 40  # Linux's MAXSYMLINKS: a longer chain of links is a loop
#: Set by install on a metadata repository file it made: the repository's format carries
#: no identity (an inode number is reused as soon as a file is deleted), this does.
MARK_XATTR = "user.cdp.install"
MARK_CHARS_MAX = 200  # two names of 64 characters and 32 hex digits fit


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


# --------------------------------------------------------------------------- directories we write in


def _who(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def dir_problem(path: Path) -> str | None:
    """Why another user could change what lies at or below directory ``path``, or None.

    Walks ``path`` from ``/`` as the kernel resolves it: every directory on the way and
    every symbolic link must be owned by root or by us; a directory on the way that
    others may write must be sticky (as /tmp: no one else may rename or replace what is
    ours there), and ``path`` itself writable by no one else (in a sticky directory
    another user could still create the names we are about to). A missing tail is
    fine: install creates it. The rules of ssh's StrictModes, for the same reason: any
    other user who controls a step of the path chooses where root's writes land.
    """
    trusted = (0, os.geteuid())
    absolute = path if path.is_absolute() else Path.cwd() / path  # ".." kept: the kernel resolves it after links
    todo = list(reversed(absolute.parts[1:]))
    here, hops = Path("/"), 0
    while todo:
        name = todo.pop()
        if name == "..":
            here = here.parent
            continue
        step = here / name
        try:
            st = os.lstat(step)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"{step}: {exc.strerror}"
        if st.st_uid not in trusted:
            return f"{step} is owned by {_who(st.st_uid)}"
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > SYMLINK_HOPS_MAX:
                return f"{step}: more than {SYMLINK_HOPS_MAX} symbolic links on the way (a loop)"
            target = os.readlink(step)
            if os.path.isabs(target):
                here = Path("/")
            todo.extend(reversed([part for part in Path(target).parts if part not in ("/", ".")]))
            continue
        if not stat.S_ISDIR(st.st_mode):
            return f"{step} is not a directory"
        if st.st_mode & 0o022 and (not todo or not st.st_mode & stat.S_ISVTX):
            return f"{step} may be written by other users (mode {stat.S_IMODE(st.st_mode):04o})"
        here = step
    return None


def _dir_error(cfg: SiteConfig, field: str, path: Path, problem: str) -> ConfigError:
    return ConfigError(
        f"{field} in {cfg.path} ({path}): {problem}; cdp install and uninstall write there as "
        f"{_who(os.geteuid())}, so every directory on the way must be owned by it or by root and "
        f"writable by no other user (a shared one like /tmp only if sticky), and the directory itself "
        f"by no one else at all: fix the owner or mode (chown, chmod go-w), or set {field} elsewhere")


def _local_dirs(cfg: SiteConfig) -> list[tuple[str, Path]]:
    """(site-file field, directory) for each directory install writes in."""
    dirs = [("state_dir", cfg.state_dir), ("state_dir", cfg.state_dir / "drvas")]
    if cfg.tls is not None:
        dirs.append(("[tls] dir", cfg.tls.dir))
    for i, drva in enumerate(cfg.drvas):
        dirs += [("state_dir", cfg.drva_state_dir(drva)), (f"drvas[{i}].log.path", drva.log_path.parent),
                 (f"drvas[{i}].meta.path", drva.meta_path.parent)]
    return dirs


def check_local_dirs(cfg: SiteConfig) -> None:
    """``ConfigError`` naming the first directory install writes in that is not ours
    alone (``dir_problem``), or a TLS directory that is a symbolic link (install sets
    its mode: never through a link)."""
    for field, path in _local_dirs(cfg):
        if (problem := dir_problem(path)) is not None:
            raise _dir_error(cfg, field, path, problem)
    if cfg.tls is not None and cfg.tls.dir.is_symlink():
        raise ConfigError(f"[tls] dir in {cfg.path} ({cfg.tls.dir}): a symbolic link; install sets this "
                          f"directory's mode and writes the CA key in it, never through a link: put the "
                          f"directory itself there, or set [tls] dir to its own path")


def _ensure_dir(cfg: SiteConfig, field: str, path: Path) -> None:
    """Create ``path`` and its missing parents (0755: no umask makes them writable by
    others), then check the whole path again: a directory someone else made first, in a
    race or not, is refused all the same (``dir_problem``)."""
    missing = []
    here = path
    while not os.path.lexists(here):
        missing.append(here)
        here = here.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:
            pass
    if (problem := dir_problem(path)) is not None:
        raise _dir_error(cfg, field, path, problem)


# --------------------------------------------------------------------------- what is on disk


@dataclass(frozen=True)
class PathState:
    """What lies at a partition's path, as install and uninstall see it.

    ``ours``: a valid partition this DRVA may use; ``blank``: nothing was ever
    formatted there (missing, empty, or zeros where the format's headers go), so install
    may format it. ``owner``: the site a log's label names ("" for a label naming none:
    an older install's, or a DRVA's that formatted its own log; None: not a log).
    ``identity``: a log's superblock uuid (hex), "" otherwise.
    """

    path: Path
    kind: str  # "absent" | "file" | "device" | "other"
    size: int
    ours: bool
    blank: bool
    what: str
    owner: str | None = None
    identity: str = ""

    @property
    def exists(self) -> bool:
        return self.kind != "absent"

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind, "size": self.size, "ours": self.ours,
                "blank": self.blank, "what": self.what, "owner": self.owner, "identity": self.identity}


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


def label_for(drva_name: str, site: str | None = None) -> str:
    """The label install writes in a DRVA's log superblock: ``<drva>@<site>`` (names hold
    no "@"), cut to the 32 bytes the superblock keeps. Without ``site``: the DRVA's name
    alone, the label of a log an older install (or the DRVA itself) formatted."""
    text = drva_name if site is None else f"{drva_name}@{site}"
    return text.encode("utf-8")[:_LABEL_BYTES].decode("utf-8", "ignore")


def _log_label_state(path: Path, kind: str, sb: Any, drva_name: str, site: str | None) -> PathState:
    """Whose log is it, by its label? ``site`` None: any site's log of ``drva_name``
    counts as this DRVA's (a caller that does not know the site)."""
    label, uuid = sb.label, sb.uuid.hex()
    mine = f"the log partition of {drva_name}"
    if label == label_for(drva_name):
        return PathState(path, kind, sb.partition_size, True, False, mine, "", uuid)
    prefix = label_for(drva_name) + "@"
    if not label.startswith(prefix):
        return PathState(path, kind, sb.partition_size, False, False,
                         f"the log partition of {label!r}, not of DRVA {drva_name!r}", None, uuid)
    owner = label[len(prefix):]
    if site is None or label == label_for(drva_name, site):
        return PathState(path, kind, sb.partition_size, True, False, f"{mine} of site {owner!r}", owner, uuid)
    return PathState(path, kind, sb.partition_size, False, False,
                     f"the log partition of DRVA {drva_name!r} of site {owner!r}, not of this site {site!r}",
                     owner, uuid)


def inspect_log(path: Path, drva_name: str, site: str | None = None) -> PathState:
    """Is ``path`` missing, blank, ``drva_name``'s log partition (of ``site``, when
    given), or something else? Reads the two superblocks only (no recovery scan,
    nothing written)."""
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
    return _log_label_state(path, kind, max(found, key=lambda s: s.generation), drva_name, site)


def _install_mark(path: Path) -> str:
    """The mark install set on a metadata repository file it made (``MARK_XATTR``:
    ``<drva>@<site> <random hex>``), "" when there is none."""
    try:
        return os.getxattr(path, MARK_XATTR, follow_symlinks=False).decode("utf-8", "replace")[:MARK_CHARS_MAX]
    except OSError:  # none, no extended attributes here, or a device node
        return ""


def inspect_meta(path: Path, drva_name: str | None = None, site: str | None = None) -> PathState:
    """Is ``path`` missing, blank, a metadata repository, or something else? With
    ``drva_name`` (and ``site``): one another DRVA's document names, or whose install
    mark names another DRVA or site, is not ours."""
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
        with MetaRepository.open(path) as repo:
            writer = repo.read().get("drva")  # FORMAT.md §4: the DRVA's document names it
    except MetaError as exc:
        return PathState(path, kind, size, False, False, f"not a metadata repository ({exc.message})")
    mark = _install_mark(path)
    marked_drva, _, owner = mark.partition(" ")[0].partition("@")
    if drva_name is not None and isinstance(writer, str) and writer != drva_name:
        return PathState(path, kind, size, False, False,
                         f"the metadata repository of DRVA {writer!r}, not of DRVA {drva_name!r}", None, mark)
    if mark and drva_name is not None and (marked_drva != drva_name or site not in (None, owner)):
        return PathState(path, kind, size, False, False, f"the metadata repository install made for DRVA "
                         f"{marked_drva!r} of site {owner!r}, not for DRVA {drva_name!r} of site {site!r}",
                         owner, mark)
    return PathState(path, kind, size, True, False, "a metadata repository", owner, mark)


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
    ticks: int | None = None  # its start time, from the pid file (FORMAT.md §13.3)

    def to_dict(self) -> dict[str, Any]:
        return {"pid_file": str(self.pid_file), "pid": self.pid, "running": self.running, "note": self.note}


def daemon_state(cfg: SiteConfig) -> DaemonState:
    """The daemon ``<state_dir>/msa.pid`` names, running only if that process is the one
    that wrote it (same pid and start time). ``ConfigError`` when the state directory is
    not ours alone: a pid file another user can write could aim our SIGTERM anywhere."""
    if (problem := dir_problem(cfg.state_dir)) is not None:
        raise _dir_error(cfg, "state_dir", cfg.state_dir, problem)
    path = pid_path(cfg)
    try:
        found = read_pid_file(path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"{path}: unreadable pid file ({exc.strerror})") from exc
    if found is None:
        return DaemonState(path, None, False, "no pid file")
    pid, ticks = found
    if not same_process(pid, ticks):
        return DaemonState(path, pid, False, f"stale pid file: {stale_reason(pid, ticks)}", ticks)
    return DaemonState(path, pid, True, f"running as process {pid}", ticks)


def _signal_if_same(pid: int, ticks: int | None, sig: int) -> bool:
    """Send ``sig`` to ``pid`` only while it is the process started at ``ticks``; False
    when it is not (any more). A pidfd pins the process between the check and the
    signal, so a pid reused in between is never signalled."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:  # no pidfd (Linux < 5.3): check, then kill; the window is the pid's reuse
        if not same_process(pid, ticks):
            return False
        os.kill(pid, sig)
        return True
    try:
        if not same_process(pid, ticks):
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


async def stop_daemon(cfg: SiteConfig, timeout_s: float = DAEMON_STOP_TIMEOUT_S) -> DaemonState:
    """SIGTERM the running daemon and wait until it exits (``Busy`` after ``timeout_s``).
    A stale pid file signals nothing (``daemon_state``)."""
    state = daemon_state(cfg)
    if not state.running or state.pid is None:
        return state
    log.info("daemon_stopping", pid=state.pid, pid_file=str(state.pid_file))
    if not _signal_if_same(state.pid, state.ticks, signal.SIGTERM):
        return DaemonState(state.pid_file, state.pid, False, f"process {state.pid} exited", state.ticks)
    deadline = time.monotonic() + timeout_s
    while same_process(state.pid, state.ticks):
        if time.monotonic() >= deadline:
            raise Busy(f"the daemon (process {state.pid}, from {state.pid_file}) did not exit within "
                       f"{timeout_s:g} s of SIGTERM; stop it (kill {state.pid}) and run uninstall again")
        await asyncio.sleep(0.1)
    log.info("daemon_stopped", pid=state.pid)
    return DaemonState(state.pid_file, state.pid, False, f"stopped process {state.pid} (SIGTERM)", state.ticks)


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


@dataclass(frozen=True)
class PurgePlan:
    """The ids of this site's own domains (the cluster file's, not a failover's) that
    ``--purge`` leaves alone, each with why (a left-alone entry of ``uninstall``)."""

    skipped: list[dict[str, Any]]


async def _not_ours_to_purge(store: ObjectStore, cfg: SiteConfig, spec: DomainSpec) -> str | None:
    """Why ``--purge`` must leave domain ``spec`` alone, or None. The check install makes
    (``foreign_domains``): the catalog's current timeline is another site's. A catalog
    that cannot be read cannot say whose the objects are: they stay too."""
    from cdp.catalog import load_catalog

    try:
        state, _ = await load_catalog(store, spec.id)
    except NotFound:
        return None  # no bucket: nothing to delete
    except CdpError as exc:
        return f"its catalog cannot be read ({exc.message}), so whose objects these are is unknown: not purged"
    if state is None:
        return None  # no catalog: objects this site's DRVA wrote before its first commit
    tl = state.timeline()
    if tl.owner != cfg.site:
        return (f"its catalog's current timeline ({tl.id}) belongs to site {tl.owner!r} (domain "
                f"{state.domain.get('name')!r}), not to {cfg.site!r}: another site's domain under this id, not purged")
    return None


async def purge_plan(store: ObjectStore, cfg: SiteConfig) -> PurgePlan:
    skipped = []
    for spec in cfg.cluster.domains:
        if spec.name not in cfg.own_domains:
            continue  # registered by a failover: registered_kept
        why = await _not_ours_to_purge(store, cfg, spec)
        if why is not None:
            skipped.append({"domain": spec.name, "id": spec.id, "path": domain_prefix(spec.id),
                            "why": f"domain {spec.name} (id {spec.id}): {why}"})
    return PurgePlan(skipped)


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


@dataclass(frozen=True)
class _Role:
    """How install and uninstall treat one kind of partition."""

    name: str  # "log" | "meta": the key in the install record and the DRVA configuration
    what: str
    error: type[CdpError]
    wipe_offsets: tuple[int, ...]  # where a device's headers go (uninstall blanks them)
    wipe_length: int

    def path(self, drva: DrvaSpec) -> Path:
        return drva.log_path if self.name == "log" else drva.meta_path

    def inspect(self, path: Path, drva: str, site: str | None) -> PathState:
        return inspect_log(path, drva, site) if self.name == "log" else inspect_meta(path, drva, site)


ROLES = {"log": _Role("log", "log partition", LogError, (0,), _LOG_HEAD_BYTES),
         "meta": _Role("meta", "metadata repository", MetaError, (0, SLOT_SIZE_DEFAULT), BLOCK)}
KEPT_NOT_MADE = "kept (not made by this install)"


def _same_file(made: MadePartition) -> str | None:
    """Why ``made.path`` is no longer the file or device install made, or None."""
    path = Path(made.path)
    try:
        st = os.stat(path) if made.kind == "device" else os.lstat(path)
    except FileNotFoundError:
        return "gone"
    if made.kind == "device":
        if not stat.S_ISBLK(st.st_mode) or st.st_rdev != made.dev:
            return "another device than the one install formatted"
    elif not stat.S_ISREG(st.st_mode):
        return "no longer a regular file"
    elif (st.st_dev, st.st_ino) != (made.dev, made.ino):
        return "another file than the one install made (device and inode differ)"
    return None


def _made_problem(made: MadePartition, state: PathState) -> str | None:
    """Why ``made`` is not, as it lies now, the partition install made, or None."""
    if (why := _same_file(made)) is not None:
        return why
    if not made.formatted:
        return None  # install's own, its format cut short: anything may be there
    if not state.ours and not state.blank:
        return f"no longer a {ROLES[made.role].what} of DRVA {made.drva} ({state.what})"
    if made.identity and state.identity != made.identity:
        return "not the one install made (another file given its inode number, or formatted again since)"
    return None


def _format_target_problem(path: Path) -> str | None:
    """Why install must not create or format a file at ``path``, or None. Checked with
    ``lstat`` right before: a regular file must be ours and reached without a link (a
    link would aim our writes elsewhere); a block device may be reached through a
    trusted link (/dev/disk/by-id/...). Partition directories were checked already
    (``check_local_dirs``): no other user can put anything here meanwhile."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        if st.st_uid not in (0, os.geteuid()):
            return f"a symbolic link owned by {_who(st.st_uid)}"
        try:
            target = os.stat(path)
        except FileNotFoundError:
            return (f"a symbolic link to {os.readlink(path)!r}, which does not exist: install creates a "
                    f"partition file only at its own path, never through a link")
        if stat.S_ISBLK(target.st_mode):
            return None
        return "a symbolic link to a file: give the file's own path (install never writes through a link)"
    if stat.S_ISREG(st.st_mode) and st.st_uid != os.geteuid():
        return f"a file owned by {_who(st.st_uid)}, not by {_who(os.geteuid())}"
    return None


def _format(cfg: SiteConfig, drva: DrvaSpec, index: int, role: _Role, made: dict[str, MadePartition]) -> PathState:
    """Create (never through a link) and format ``drva``'s partition, writing it down in
    the install record before the format (a crash in between: the next install sees it
    is its own and formats it again) and after."""
    path = role.path(drva)
    field = f"drvas[{index}].{role.name}.path"
    if (problem := _format_target_problem(path)) is not None:
        raise role.error(f"{role.what} {path} of DRVA {drva.name}: {problem}; change {field} in {cfg.path}")
    _ensure_dir(cfg, field, path.parent)
    if not os.path.lexists(path):
        st = create_new(path)
    else:
        st = os.stat(path)  # a blank file of ours, or a block device (_format_target_problem)
    device = stat.S_ISBLK(st.st_mode)
    entry = MadePartition(drva.name, role.name, str(path), "device" if device else "file",
                          st.st_rdev if device else st.st_dev, 0 if device else st.st_ino, formatted=False)
    made[str(path)] = entry
    save_install_record(cfg.state_dir, cfg.site, made)
    label = label_for(drva.name, cfg.site) if role.name == "log" else ""
    if role.name == "log":
        ReplicationLog.format(path, None if device else drva.log_size, label=label)
    else:
        MetaRepository.format(path)
    if (why := _same_file(entry)) is not None:
        raise role.error(f"{role.what} {path} of DRVA {drva.name}: {why} while install formatted it")
    if role.name == "meta" and not device:
        _set_mark(path, f"{label_for(drva.name, cfg.site)} {secrets.token_hex(16)}")
    state = role.inspect(path, drva.name, cfg.site)
    made[str(path)] = replace(entry, formatted=True, identity=state.identity, label=label)
    save_install_record(cfg.state_dir, cfg.site, made)
    log.info(f"{role.name}_partition_formatted", drva=drva.name, path=str(path))
    return state


def _set_mark(path: Path, mark: str) -> None:
    """Best effort: a file system without user extended attributes keeps no mark, and
    the record then knows the file by its device and inode only."""
    try:
        os.setxattr(path, MARK_XATTR, mark.encode(), follow_symlinks=False)
    except OSError as exc:
        log.warning("install_mark_not_set", path=str(path), error=exc.strerror)


def _named_by_own_config(cfg: SiteConfig, drva: DrvaSpec, role: _Role) -> bool:
    """Does this site's configuration of ``drva`` name this partition? An install older
    than the install record wrote it so: the partition is that install's."""
    try:
        doc = tomllib.loads(drva_config_path(cfg, drva).read_text())
    except (OSError, ValueError):
        return False
    section = doc.get(role.name)
    return doc.get("site") == cfg.site and isinstance(section, dict) and section.get("path") == str(role.path(drva))


def _install_partition(cfg: SiteConfig, drva: DrvaSpec, index: int, role: _Role,
                       made: dict[str, MadePartition]) -> dict[str, Any]:
    """Keep, format or refuse ``drva``'s partition of ``role`` (module docstring, step 2)."""
    path = role.path(drva)
    state = role.inspect(path, drva.name, cfg.site)
    entry = made.get(str(path))
    if entry is not None and _made_problem(entry, state) is not None:
        del made[str(path)]  # not the partition it made any more: not its to keep or remove
        save_install_record(cfg.state_dir, cfg.site, made)
        entry = None
    if entry is not None and entry.formatted and state.ours:
        return {"path": str(path), "size": state.size, "action": "kept"}
    if entry is None and state.ours:
        if state.owner in ("", None) and _named_by_own_config(cfg, drva, role):
            made[str(path)] = _adopted(cfg, drva, role, state)
            save_install_record(cfg.state_dir, cfg.site, made)
            return {"path": str(path), "size": state.size, "action": "kept"}
        log.info("partition_kept_not_made", drva=drva.name, path=str(path), what=state.what)
        return {"path": str(path), "size": state.size, "action": KEPT_NOT_MADE}
    if not state.blank and (entry is None or entry.formatted):
        keeps = f"keeps one labelled {label_for(drva.name, cfg.site)!r}" if role.name == "log" else "keeps its own"
        raise role.error(f"{role.what} {path} of DRVA {drva.name}: {state.what}; install formats only a "
                         f"missing or blank one and {keeps}: move it away or change "
                         f"drvas[{index}].{role.name}.path in {cfg.path}")
    state = _format(cfg, drva, index, role, made)  # blank, or its own whose format did not finish
    return {"path": str(path), "size": state.size, "action": "formatted"}


def _adopted(cfg: SiteConfig, drva: DrvaSpec, role: _Role, state: PathState) -> MadePartition:
    """The record entry of a partition an older install made (``_named_by_own_config``);
    a metadata repository file gets the mark install now sets on the ones it makes."""
    device = stat.S_ISBLK(os.stat(state.path).st_mode)
    st = os.stat(state.path) if device else os.lstat(state.path)
    identity = state.identity
    if role.name == "meta" and not device:
        _set_mark(state.path, f"{label_for(drva.name, cfg.site)} {secrets.token_hex(16)}")
        identity = _install_mark(state.path)
    return MadePartition(drva.name, role.name, str(state.path), "device" if device else "file",
                         st.st_rdev if device else st.st_dev, 0 if device else st.st_ino, formatted=True,
                         identity=identity, label=label_for(drva.name) if role.name == "log" else "")


def _write_if_changed(path: Path, data: bytes) -> str:
    try:
        if path.read_bytes() == data:
            return "kept"
    except FileNotFoundError:
        pass
    atomic_write(path, data)
    return "written"


def _install_drva_config(cfg: SiteConfig, drva: DrvaSpec, protected: list[str]) -> dict[str, Any]:
    domains = [name for name in protected if cfg.drva_of(cfg.domain(name)) is drva]
    path = drva_config_path(cfg, drva)
    _ensure_dir(cfg, "state_dir", cfg.drva_state_dir(drva))
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
    check_local_dirs(cfg)  # before the store is touched: a refused install leaves nothing behind
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
        await asyncio.to_thread(check_local_dirs, cfg)  # again, right before: nothing is made in a foreign one
        await asyncio.to_thread(_ensure_dir, cfg, "state_dir", cfg.state_dir)
        made = load_install_record(cfg.state_dir, cfg.site)
        tls = await asyncio.to_thread(_install_tls, cfg)  # before the DRVA configurations that name its files
        progress("tls", 1, steps)
        protection = await asyncio.to_thread(_install_protection, cfg)
        progress("protection", 2, steps)
        drvas = []
        for i, drva in enumerate(cfg.drvas):
            log_part = await asyncio.to_thread(_install_partition, cfg, drva, i, ROLES["log"], made)
            meta = await asyncio.to_thread(_install_partition, cfg, drva, i, ROLES["meta"], made)
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


Entries = list[dict[str, Any]]


def _remove_made(cfg: SiteConfig, made: MadePartition) -> tuple[Entries, Entries]:
    """Remove (a file) or blank (a device) a partition install made, if it still is the
    one it made; return (removed, left alone) entries."""
    role = ROLES[made.role]
    path = Path(made.path)
    if not os.path.lexists(path):
        return [], []
    if (problem := dir_problem(path.parent)) is not None:  # a path others control may lead elsewhere
        return [], [{"path": made.path, "why": f"{role.what} of DRVA {made.drva}: kept: {problem}"}]
    state = role.inspect(path, made.drva, None)
    if (why := _made_problem(made, state)) is not None:
        return [], [{"path": made.path, "why": f"{state.what}: {KEPT_NOT_MADE}: {why}"}]
    if made.kind == "file":
        path.unlink()
        fsync_dir(path.parent)
        action = "removed"
        _rmdir_if_empty(path.parent, cfg.state_dir)
    else:
        _wipe_headers(path, role.wipe_length, role.wipe_offsets)
        action = "wiped (block device)"
    log.info("partition_removed", drva=made.drva, path=made.path, what=role.what)
    return [{"path": made.path, "what": f"{role.what} of DRVA {made.drva}", "size": state.size,
             "action": action}], []


def _uninstall_partitions(cfg: SiteConfig, made: dict[str, MadePartition]) -> tuple[Entries, Entries]:
    """Remove what the install record names (``_remove_made``); say which configured
    partitions stay because install did not make them."""
    removed: Entries = []
    left: Entries = []
    for entry in sorted(made.values(), key=lambda m: m.path):
        r, lf = _remove_made(cfg, entry)
        removed += r
        left += lf
    for drva in cfg.drvas:
        for role in ROLES.values():
            path = role.path(drva)
            state = role.inspect(path, drva.name, cfg.site)
            if str(path) not in made and state.exists:
                left.append({"path": str(path), "why": f"{state.what}: {KEPT_NOT_MADE}"})
    return removed, left


def _uninstall_drva(cfg: SiteConfig, drva: DrvaSpec, left: Entries) -> tuple[Entries, Entries]:
    """Remove one DRVA's configuration and state directory (unless it holds a partition
    left alone); return (removed, left alone) entries."""
    removed: Entries = []
    kept: Entries = []
    conf = drva_config_path(cfg, drva)
    if conf.exists():
        conf.unlink()
        removed.append({"path": str(conf), "what": f"configuration of DRVA {drva.name}"})
    state_dir = cfg.drva_state_dir(drva)
    keep_inside = [e["path"] for e in left if state_dir.resolve() in Path(e["path"]).resolve().parents]
    if state_dir.is_symlink():  # install made a directory: never follow a link planted in its place
        kept.append({"path": str(state_dir), "why": "a symbolic link, not the directory install made: not "
                     "followed, not removed"})
    elif state_dir.exists() and not keep_inside:
        shutil.rmtree(state_dir)
        removed.append({"path": str(state_dir), "what": f"state directory of DRVA {drva.name}"})
    elif keep_inside:
        kept.append({"path": str(state_dir), "why": f"holds {', '.join(keep_inside)}: not removed"})
    return removed, kept


async def domain_usage(store: ObjectStore, cfg: SiteConfig, plan: PurgePlan | None = None) -> list[dict[str, Any]]:
    """Per domain of this site's own (its cluster file's): its objects in the store
    (count, bytes), and whether ``--purge`` deletes them (``purge``; when not, ``why``:
    ``purge_plan``). Not a domain a failover registered here (``registered_kept``)."""
    plan = plan or await purge_plan(store, cfg)
    skipped = {s["id"]: s["why"] for s in plan.skipped}
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
        out.append({"domain": spec.name, "id": spec.id, "prefix": prefix, "objects": count, "bytes": size,
                    "purge": spec.id not in skipped})
        if spec.id in skipped:
            out[-1]["why"] = skipped[spec.id]
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


async def _purge(store: ObjectStore, cfg: SiteConfig, plan: PurgePlan, progress: Progress) -> dict[str, Any]:
    from rocva.retention import sweep_chunks

    usage = [u for u in await domain_usage(store, cfg, plan) if u["purge"]]
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
    return {"domains": domains, "bytes": total, "chunk_sweep": chunks, "skipped": plan.skipped}


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
        daemon = await stop_daemon(cfg, stop_timeout_s)  # ConfigError first if state_dir is not ours alone
        made = load_install_record(cfg.state_dir, cfg.site)
        removed, left = await asyncio.to_thread(_uninstall_partitions, cfg, made)
        for drva in cfg.drvas:
            r, lf = await asyncio.to_thread(_uninstall_drva, cfg, drva, left)
            removed += r
            left += lf
        _rmdir_if_empty(cfg.state_dir / "drvas", cfg.state_dir)
        if install_record_path(cfg.state_dir).exists():  # last: a rerun after a crash still knows
            install_record_path(cfg.state_dir).unlink()
            removed.append({"path": str(install_record_path(cfg.state_dir)), "what": "install record"})
        if protection_path(cfg).exists():
            protection_path(cfg).unlink()
            removed.append({"path": str(protection_path(cfg)), "what": "protected domains"})
        if pid_path(cfg).exists() and not daemon_state(cfg).running:  # left by a crashed daemon
            pid_path(cfg).unlink()
            removed.append({"path": str(pid_path(cfg)), "what": "stale daemon pid file"})
        if installed:
            await store.delete(key)
            removed.append({"key": key, "what": "deployment record"})
        plan = await purge_plan(store, cfg)
        left += plan.skipped  # said either way: --purge would not delete them
        purged = await _purge(store, cfg, plan, progress) if purge else None
        # The site CA stays: a reinstall keeps it, so the peers and clients that trust it
        # need nothing new (FORMAT.md §20 says how to replace it).
        kept = {"jobs": str(jobs_dir(cfg)), "tls": str(cfg.tls.dir) if cfg.tls is not None else None,
                "domains": [] if purge else [u for u in await domain_usage(store, cfg, plan) if u["purge"]],
                "registered": registered_kept(cfg)}
        log.info("uninstalled", site=cfg.site, purge=purge, removed=len(removed))
        return {"site": cfg.site, "store": store.describe(), "purge": purge, "daemon": daemon.to_dict(),
                "removed": removed, "left_alone": left, "kept": kept, "purged": purged}
    finally:
        if opened:
            await store.close()


__all__ = [
    "DaemonState", "PathState", "PurgePlan", "check_local_dirs", "daemon_state", "dir_problem", "domain_usage",
    "drva_config_path", "registered_kept", "engine_version", "foreign_domains", "inspect_log", "inspect_meta",
    "install", "label_for", "other_sites", "pid_path", "purge_plan", "stop_daemon", "uninstall",
]
