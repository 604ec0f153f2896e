"""``cdp preflight install``: the site and cluster files, the protected domains, the disk
images, name and port clashes, the directories install writes in (``dirs``), the ports
free, an installation already in the state directory or the store, and the TLS plan.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cdp.errors import CdpError, ConfigError, NotFound
from cdp.msa.config import DRVA_PORTS, SiteConfig
from cdp.msa.deployment import read_deployment
from cdp.msa.install_daemon import DaemonState, daemon_state
from cdp.msa.install_dirs import dir_problem, drva_config_path, local_dir_errors, local_dirs, who
from cdp.msa.install_store import foreign_domains, other_sites
from cdp.msa.preflight_check import (
    STORE_OP_TIMEOUT_S, Check, Progress, _existing_ancestor, _no_progress, _open_store, _probe_writable,
    _run_checks, _state_dir_refused, _when, _within, format_size, summarize,
)
from cdp.msa.protection import load_protection, protection_path
from cdp.store.base import ObjectStore


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


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
