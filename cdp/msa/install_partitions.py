"""Install, step 2: keep, adopt, format or refuse each partition of each DRVA.

A partition that is missing or blank is created (never through a symbolic link:
``cdp.durable.create_new``) and formatted — a log with the label ``<drva>@<site>``
(``label_for``), a metadata repository file marked with ``user.cdp.install`` — and
written down in the install record ``<state_dir>/install.json``
(``cdp.msa.deployment``) with the identity it has (device and inode, a log's uuid, a
repository's mark). One the record names, still that same file, is kept. Any other
valid partition of this DRVA is kept as "not made by this install" (uninstall leaves
it), except one an older install made, which this site's DRVA configuration names: it
is written down as install's (the upgrade). One that carries another site's or another
DRVA's label, or that is no partition at all, is refused, never overwritten
(FORMAT.md §13.15).
"""

from __future__ import annotations

import os
import secrets
import stat
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from cdp.durable import create_new
from cdp.logs import get_logger
from cdp.meta import MetaRepository
from cdp.msa.config import DrvaSpec, SiteConfig
from cdp.msa.deployment import MadePartition, save_install_record
from cdp.msa.install_dirs import drva_config_path, ensure_dir, who
from cdp.msa.install_inspect import (
    KEPT_NOT_MADE, MARK_XATTR, PathState, Role, label_for, made_problem, read_mark, same_file,
)
from cdp.replog import ReplicationLog

log = get_logger("cdp.msa.install")  # install and uninstall log as one, whichever module acts


def format_target_problem(path: Path) -> str | None:
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
            return f"a symbolic link owned by {who(st.st_uid)}"
        try:
            target = os.stat(path)
        except FileNotFoundError:
            return (f"a symbolic link to {os.readlink(path)!r}, which does not exist: install creates a "
                    f"partition file only at its own path, never through a link")
        if stat.S_ISBLK(target.st_mode):
            return None
        return "a symbolic link to a file: give the file's own path (install never writes through a link)"
    if stat.S_ISREG(st.st_mode) and st.st_uid != os.geteuid():
        return f"a file owned by {who(st.st_uid)}, not by {who(os.geteuid())}"
    return None


def format_partition(cfg: SiteConfig, drva: DrvaSpec, index: int, role: Role,
                     made: dict[str, MadePartition]) -> PathState:
    """Create (never through a link) and format ``drva``'s partition, writing it down in
    the install record before the format (a crash in between: the next install sees it
    is its own and formats it again) and after."""
    path = role.path(drva)
    field = f"drvas[{index}].{role.name}.path"
    if (problem := format_target_problem(path)) is not None:
        raise role.error(f"{role.what} {path} of DRVA {drva.name}: {problem}; change {field} in {cfg.path}")
    ensure_dir(cfg, field, path.parent)
    if not os.path.lexists(path):
        st = create_new(path)
    else:
        st = os.stat(path)  # a blank file of ours, or a block device (format_target_problem)
    device = stat.S_ISBLK(st.st_mode)
    entry = MadePartition(drva.name, role.name, str(path), "device" if device else "file",
                          st.st_rdev if device else st.st_dev, 0 if device else st.st_ino, formatted=False)
    made[str(path)] = entry
    save_install_record(cfg.state_dir, cfg.site, made)
    label = label_for(drva.name, cfg.site) if role.name == "log" else ""
    if role.name == "log":
        # Inspected already (install_inspect): a blank file of ours, a partition this install made and
        # formatted before a crash, or a device the operator named: formatted over on purpose.
        ReplicationLog.format(path, None if device else drva.log_size, label=label, force=True)
    else:
        MetaRepository.format(path)
    if (why := same_file(entry)) is not None:
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


def _named_by_own_config(cfg: SiteConfig, drva: DrvaSpec, role: Role) -> bool:
    """Does this site's configuration of ``drva`` name this partition? An install older
    than the install record wrote it so: the partition is that install's."""
    try:
        doc = tomllib.loads(drva_config_path(cfg, drva).read_text())
    except (OSError, ValueError):
        return False
    section = doc.get(role.name)
    return doc.get("site") == cfg.site and isinstance(section, dict) and section.get("path") == str(role.path(drva))


def install_partition(cfg: SiteConfig, drva: DrvaSpec, index: int, role: Role,
                      made: dict[str, MadePartition]) -> dict[str, Any]:
    """Keep, format or refuse ``drva``'s partition of ``role`` (module docstring)."""
    path = role.path(drva)
    state = role.inspect(path, drva.name, cfg.site)
    entry = made.get(str(path))
    if entry is not None and made_problem(entry, state) is not None:
        del made[str(path)]  # not the partition it made any more: not its to keep or remove
        save_install_record(cfg.state_dir, cfg.site, made)
        entry = None
    if entry is not None and entry.formatted and state.ours:
        return {"path": str(path), "size": state.size, "action": "kept"}
    if entry is None and state.ours:
        if state.owner in ("", None) and _named_by_own_config(cfg, drva, role):
            made[str(path)] = _adopted_entry(cfg, drva, role, state)
            save_install_record(cfg.state_dir, cfg.site, made)
            return {"path": str(path), "size": state.size, "action": "kept"}
        log.info("partition_kept_not_made", drva=drva.name, path=str(path), what=state.what)
        return {"path": str(path), "size": state.size, "action": KEPT_NOT_MADE}
    if not state.blank and (entry is None or entry.formatted):
        keeps = f"keeps one labelled {label_for(drva.name, cfg.site)!r}" if role.name == "log" else "keeps its own"
        raise role.error(f"{role.what} {path} of DRVA {drva.name}: {state.what}; install formats only a "
                         f"missing or blank one and {keeps}: move it away or change "
                         f"drvas[{index}].{role.name}.path in {cfg.path}")
    state = format_partition(cfg, drva, index, role, made)  # blank, or its own whose format did not finish
    return {"path": str(path), "size": state.size, "action": "formatted"}


def _adopted_entry(cfg: SiteConfig, drva: DrvaSpec, role: Role, state: PathState) -> MadePartition:
    """The record entry of a partition an older install made (``_named_by_own_config``);
    a metadata repository file gets the mark install now sets on the ones it makes."""
    device = stat.S_ISBLK(os.stat(state.path).st_mode)
    st = os.stat(state.path) if device else os.lstat(state.path)
    identity = state.identity
    if role.name == "meta" and not device:
        _set_mark(state.path, f"{label_for(drva.name, cfg.site)} {secrets.token_hex(16)}")
        identity = read_mark(state.path)
    return MadePartition(drva.name, role.name, str(state.path), "device" if device else "file",
                         st.st_rdev if device else st.st_dev, 0 if device else st.st_ino, formatted=True,
                         identity=identity, label=label_for(drva.name) if role.name == "log" else "")


__all__ = ["format_partition", "format_target_problem", "install_partition"]
