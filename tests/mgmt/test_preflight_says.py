"""Preflight says what install and uninstall will do (cdp/msa/preflight.py against
cdp/msa/install_removal.py and cdp/msa/install_dirs.py), and no writer of state_dir —
the CLI's job records, the daemon — writes in one another user controls.

Each test builds the state itself and compares what preflight said with what the real
install, uninstall, CLI verb or daemon then did. These run as root in CI: "another
user" is uid 65534 (nobody), set with chown.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from cdp.errors import ConfigError, LogError
from cdp.meta import MetaRepository
from cdp.msa.daemon import MsaDaemon
from cdp.msa.deployment import load_install_record, save_install_record
from cdp.msa.install import MARK_XATTR, install, uninstall
from cdp.msa.preflight import check_kept_data, preflight_install, preflight_system, preflight_uninstall
from cdp.replog import ReplicationLog
from cdp.store import FileStore
from cdp.testing.site import Site, make_site
from tests.mgmt.test_install import build_domain, cdp
from tests.mgmt.test_install_hostile import NOBODY, site_b

VERBS = (("preflight", "system"), ("preflight", "install"), ("preflight", "uninstall"), ("install",),
         ("uninstall",))


def by_name(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in summary["checks"]}


def naming(summary: dict[str, Any], text: str) -> list[str]:
    """The checks whose reason holds ``text``."""
    return [c["name"] for c in summary["checks"] if text in c["reason"]]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path / "site", protect=("erp", "files"), log_size="8MiB", install=False)


# --------------------------------------------------------------------------- 2a: kept even with --purge


async def test_kept_data_says_which_domains_purge_leaves_alone(tmp_path: Path) -> None:
    """Site B's cluster file reuses site A's domain id 1 (erp), and B's files (id 3) has
    a catalog that cannot be read: preflight says both are kept even with --purge, and
    why; web is deleted with --purge. Uninstall --purge then does exactly that."""
    a = make_site(tmp_path / "a" / "site", protect=("erp", "files"), install=False)
    await install(a.cfg, a.env)
    shared = FileStore(a.root / "store")
    await build_domain(shared, 1, seed=1)
    await shared.put("d/00000003/cat/0000000000000001.cat", b"not a catalog")
    b = site_b(tmp_path / "b" / "site", 'store = "store"', f'store = "{a.root / "store"}"')

    checks = {c.name: c for c in await check_kept_data(b.cfg, shared)}
    erp, files, web = checks["keep.erp"], checks["keep.files"], checks["keep.web"]
    assert erp.status == "warn" and "kept, even with --purge: domain erp (id 1)" in erp.reason, erp
    assert "belongs to site 'site-t'" in erp.reason and "deleted with --purge" not in erp.reason
    assert files.status == "warn" and "kept, even with --purge" in files.reason
    assert "its catalog cannot be read" in files.reason
    assert web.status == "pass" and web.reason.endswith("kept (deleted with --purge)"), web
    said = {c.details["domain"] for c in checks.values() if c.details["purge"]}

    result = await uninstall(b.cfg, True, b.env)
    assert {u["domain"] for u in result["purged"]["domains"]} == said == {"web"}
    assert {s["domain"] for s in result["purged"]["skipped"]} == {"erp", "files"}
    assert (await shared.stat("d/00000003/cat/0000000000000001.cat")).size == len(b"not a catalog")


# --------------------------------------------------------------------------- 2b: removed, or kept


def partitions(site: Site, drva: str) -> tuple[str, str]:
    spec = site.cfg.drva(drva)
    return str(spec.log_path), str(spec.meta_path)


async def test_removal_says_which_partitions_install_made(site: Site) -> None:
    """drva-1's partitions are the files install made: removed. drva-2's log is not in
    the install record (as if an older install made it), and its metadata repository
    was replaced by another file: both kept, and preflight says so, with uninstall's
    own words, before uninstall does exactly that."""
    await install(site.cfg, site.env)
    log1, meta1 = partitions(site, "drva-1")
    log2, meta2 = partitions(site, "drva-2")
    made = load_install_record(site.cfg.state_dir, site.cfg.site)
    del made[log2]
    save_install_record(site.cfg.state_dir, site.cfg.site, made)
    os.link(meta2, site.root / "meta2.old")  # held: the new file cannot be given its inode number
    Path(meta2).unlink()
    MetaRepository.format(Path(meta2))  # a valid repository, but not the file install made

    checks = by_name(await preflight_uninstall(site.cfg, site.env))
    one, two = checks["remove.drva-1"], checks["remove.drva-2"]
    assert one["status"] == "pass" and "would leave" not in one["reason"], one
    assert any(log1 in r and r.startswith("log partition") for r in one["details"]["remove"])
    assert any(meta1 in r and r.startswith("metadata repository") for r in one["details"]["remove"])
    assert two["status"] == "warn", two
    assert not any(log2 in r or meta2 in r for r in two["details"]["remove"])
    kept = {e["path"]: e["why"] for e in two["details"]["left_alone"]}
    assert sorted(kept) == sorted([log2, meta2])
    assert kept[log2].endswith("kept (not made by this install)")
    assert "kept (not made by this install): another file than the one install made" in kept[meta2]
    assert "would leave" in two["reason"] and log2 in two["reason"] and meta2 in two["reason"]
    assert "the install record" in checks["remove.site"]["reason"]

    result = await uninstall(site.cfg, False, site.env)
    removed = {e["path"] for e in result["removed"] if "path" in e}
    assert {log1, meta1} <= removed and not {log2, meta2} & removed
    left = {e["path"]: e["why"] for e in result["left_alone"]}
    assert {p: left[p] for p in (log2, meta2)} == kept  # the same verdicts, word for word
    assert Path(log2).exists() and Path(meta2).exists() and not Path(log1).exists()


async def test_removal_keeps_a_partition_whose_directory_others_may_write(site: Site) -> None:
    await install(site.cfg, site.env)
    log1, meta1 = partitions(site, "drva-1")
    Path(log1).parent.chmod(0o777)
    try:
        check = by_name(await preflight_uninstall(site.cfg, site.env))["remove.drva-1"]
        kept = {e["path"]: e["why"] for e in check["details"]["left_alone"]}
        assert check["status"] == "warn" and sorted(kept) == sorted([log1, meta1])
        assert all("may be written by other users (mode 0777)" in why for why in kept.values())
        result = await uninstall(site.cfg, False, site.env)
        assert {p: w for p, w in ((e["path"], e["why"]) for e in result["left_alone"]) if p in kept} == kept
        assert Path(log1).exists() and Path(meta1).exists()
    finally:
        Path(log1).parent.chmod(0o755)


# --------------------------------------------------------------------------- 2c: the dirs check


async def test_a_foreign_state_dir_is_reported_once_under_dirs(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", protect=("erp",), install=False, tls={"mode": "on"})
    state = site.cfg.state_dir
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)

    summary = await preflight_install(site.cfg, site.env)
    checks = by_name(summary)
    dirs = checks["dirs"]
    assert dirs["status"] == "fail" and not summary["ok"]
    assert f"state_dir in {site.config_path} ({state}): {state} is owned by uid 65534" in dirs["reason"]
    assert naming(summary, "65534") == ["dirs"]  # not under ports, tls, ...
    assert dirs["reason"].count("65534") == 1  # state_dir, drvas/, tls/: one problem, named once
    assert checks["port.api"]["status"] == "pass"  # the ports are still checked
    assert "tls" not in checks and "state" not in checks  # nothing read in a refused directory

    summary = await preflight_uninstall(site.cfg, site.env)
    checks = by_name(summary)
    assert checks["dirs"]["status"] == "fail" and naming(summary, "65534") == ["dirs"]
    assert "daemon" not in checks and not [n for n in checks if n.startswith("remove.")]
    with pytest.raises(ConfigError, match="owned by uid 65534"):  # what uninstall does
        await uninstall(site.cfg, False, site.env)

    os.chown(state, 0, 0)
    state.chmod(0o777)
    summary = await preflight_install(site.cfg, site.env)
    assert naming(summary, "may be written by other users (mode 0777)") == ["dirs"]
    state.chmod(0o755)
    checks = by_name(await preflight_install(site.cfg, site.env))
    assert checks["dirs"]["status"] == "pass" and checks["tls"]["status"] == "pass", checks["dirs"]
    checks = by_name(await preflight_uninstall(site.cfg, site.env))
    assert checks["dirs"]["status"] == "pass" and checks["daemon"]["status"] == "pass", checks["dirs"]


async def test_dirs_names_each_refused_directory(site: Site) -> None:
    """Two partition directories others may write: both named, each with its site-file
    field; the state directory is fine, so every other check runs."""
    for drva in ("drva-1", "drva-2"):
        log_dir = site.cfg.drva(drva).log_path.parent
        log_dir.mkdir(parents=True)
        log_dir.chmod(0o777)
    summary = await preflight_install(site.cfg, site.env)
    reason = by_name(summary)["dirs"]["reason"]
    assert r"drvas[0].log.path in" in reason and r"drvas[1].log.path in" in reason
    assert naming(summary, "may be written by other users") == ["dirs"]
    with pytest.raises(ConfigError, match=r"drvas\[0\]\.log\.path in .*may be written by other users"):
        await install(site.cfg, site.env)


# --------------------------------------------------------------------------- 2d: another site's partitions


async def test_system_preflight_flags_another_sites_log_and_repository(site: Site) -> None:
    log_path, meta_path = site.cfg.drva("drva-1").log_path, site.cfg.drva("drva-2").meta_path
    log_path.parent.mkdir(parents=True)
    meta_path.parent.mkdir(parents=True)
    ReplicationLog.format(log_path, 8 << 20, label="drva-1@site-b")
    MetaRepository.format(meta_path)
    os.setxattr(meta_path, MARK_XATTR, b"drva-2@site-b " + b"0" * 32)

    checks = by_name(await preflight_system(site.cfg, site.env))
    log_check, meta_check = checks["drva.drva-1.log"], checks["drva.drva-2.meta"]
    assert log_check["status"] == "fail", log_check
    assert "of site 'site-b', not of this site 'site-t'; install refuses to overwrite it" in log_check["reason"]
    assert meta_check["status"] == "fail", meta_check
    assert "made for DRVA 'drva-2' of site 'site-b', not for DRVA 'drva-2' of site 'site-t'" in meta_check["reason"]
    with pytest.raises(LogError, match="of site 'site-b'"):  # what install does with it
        await install(site.cfg, site.env)

    os.setxattr(meta_path, MARK_XATTR, b"drva-1@site-t " + b"0" * 32)  # another DRVA's, of this site
    check = by_name(await preflight_system(site.cfg, site.env))["drva.drva-2.meta"]
    assert check["status"] == "fail" and "not for DRVA 'drva-2'" in check["reason"]
    ReplicationLog.format(log_path, 8 << 20, label="drva-1@site-t", force=True)  # this site's: kept
    os.setxattr(meta_path, MARK_XATTR, b"drva-2@site-t " + b"0" * 32)
    checks = by_name(await preflight_system(site.cfg, site.env))
    assert checks["drva.drva-1.log"]["status"] != "fail", checks["drva.drva-1.log"]
    assert checks["drva.drva-2.meta"]["status"] == "pass", checks["drva.drva-2.meta"]


# --------------------------------------------------------------------------- 3: writers of state_dir


def test_site_verbs_refuse_a_foreign_state_dir_before_any_job_record(site: Site) -> None:
    state = site.cfg.state_dir
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    for verb in VERBS:
        run = cdp(site, *verb)
        assert run.returncode == 2, (verb, run.stdout, run.stderr)  # ConfigError's exit code
        assert f"state_dir in {site.config_path} ({state}): {state} is owned by uid 65534" in run.stderr, verb
        assert list(state.iterdir()) == [], verb  # no jobs/, no record
    os.chown(state, 0, 0)
    state.chmod(0o777)
    run = cdp(site, "preflight", "system")
    assert run.returncode == 2 and "may be written by other users (mode 0777)" in run.stderr
    assert list(state.iterdir()) == []


def test_site_verbs_refuse_a_jobs_link_another_user_owns(site: Site, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    site.cfg.state_dir.mkdir()
    jobs = site.cfg.state_dir / "jobs"
    jobs.symlink_to(elsewhere)
    os.lchown(jobs, NOBODY, NOBODY)
    run = cdp(site, "install")
    assert run.returncode == 2 and f"{jobs} is owned by uid 65534" in run.stderr, run.stderr
    assert list(elsewhere.iterdir()) == [] and sorted(p.name for p in site.cfg.state_dir.iterdir()) == ["jobs"]


def test_site_verbs_make_a_state_dir_no_one_else_may_write(site: Site) -> None:
    """Even under umask 0 the job store's directories are made 0755: install, which
    checks them, then accepts them."""
    old_umask = os.umask(0)
    try:
        run = cdp(site, "preflight", "system")
    finally:
        os.umask(old_umask)
    assert run.returncode == 0, run.stderr
    for d in (site.cfg.state_dir, site.cfg.state_dir / "jobs"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d
    assert cdp(site, "install").returncode == 0


async def test_the_daemon_refuses_a_state_dir_another_user_controls(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", protect=("erp",), install=True)
    state = site.cfg.state_dir
    before = sorted(str(p) for p in state.rglob("*"))
    os.chown(state, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match="owned by uid 65534.*; the daemon writes its pid file"):
        await MsaDaemon(site.cfg, site.env).start()
    assert sorted(str(p) for p in state.rglob("*")) == before  # no msa.pid, no job record
    os.chown(state, 0, 0)
    state.chmod(0o777)
    with pytest.raises(ConfigError, match=r"may be written by other users \(mode 0777\)"):
        await MsaDaemon(site.cfg, site.env).start()
    assert not (state / "msa.pid").exists()
    state.chmod(0o755)
