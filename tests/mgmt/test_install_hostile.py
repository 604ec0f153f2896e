"""Install and uninstall against what another site, another user or a dead daemon left
(cdp/msa/install.py, cdp/msa/deployment.py's install record, cdp/msa/daemon.py's pid
file, cdp/pki.py's TLS directory). Each test builds the hostile state itself and checks
the real outcome: the other site's objects and files byte for byte, the innocent
process alive, nothing created where a planted link points.

These run as root in CI: "another user" is uid 65534 (nobody), set with chown.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import tomli_w

from cdp.errors import Busy, ConfigError, LogError, MetaError
from cdp.meta import MetaRepository
from cdp.msa.config import load_site_config
from cdp.msa.daemon import MsaDaemon
from cdp.msa.deployment import install_record_path, load_install_record
from cdp.msa.install import MARK_XATTR, install, uninstall
from cdp.msa.keeper import start_ticks, write_pid_file
from cdp.msa.preflight import preflight_install, preflight_uninstall
from cdp.pki import TlsFiles, ensure_site_pki
from cdp.replog import ReplicationLog
from cdp.store import FileStore
from cdp.testing.site import Site, make_site, running_daemon
from tests.mgmt.test_install import build_domain, keys

NOBODY = 65534


def rewrite(site: Site, name: str, *pairs: str) -> Site:
    """``site`` with pieces of its ``name`` file (site.toml, cluster.toml) replaced:
    ``old, new, old, new, ...``; the configuration loaded again."""
    path = site.root / name
    text = path.read_text()
    for old, new in zip(pairs[::2], pairs[1::2], strict=True):
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)
    return Site(site.root, site.config_path, load_site_config(site.config_path), site.env)


def site_b(root: Path, *site_pairs: str) -> Site:
    """A second site, ``site-b``, made like the test site (same DRVA and domain names:
    the copy-paste the audit found), with more of its site file replaced."""
    site = make_site(root, protect=("erp", "files"), install=False)
    rewrite(site, "cluster.toml", 'site = "site-t"', 'site = "site-b"')
    return rewrite(site, "site.toml", 'site = "site-t"', 'site = "site-b"', *site_pairs)


async def objects(store: FileStore, prefix: str = "") -> dict[str, bytes]:
    return {key: bytes(await store.get(key)) for key in await keys(store, prefix)}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``: what it is (a link's target, a file's digest)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p)] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p)] = digest(p)
        else:
            out[str(p)] = f"dir {stat.S_IMODE(p.lstat().st_mode):04o}"
    return out


@pytest.fixture
def innocent() -> Any:
    """A process that is no daemon of ours: a pid file left by a dead one may name it."""
    proc = subprocess.Popen(["sleep", "300"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- F1: purge, shared store


async def test_purge_of_a_site_never_installed_leaves_the_other_sites_domains(tmp_path: Path) -> None:
    """Site B shares site A's store and its cluster file reuses A's domain ids 1 and 3.
    Install of B is refused; uninstall --purge of B skips those ids (their catalogs are
    A's) and says so; A's objects are all still there, byte for byte."""
    a = make_site(tmp_path / "a" / "site", protect=("erp", "files"), install=False)
    await install(a.cfg, a.env)
    shared = FileStore(a.root / "store")
    await build_domain(shared, 1, seed=1)  # erp and files of site-t (A)
    await build_domain(shared, 3, seed=3)
    before = await objects(shared, "d/") | await objects(shared, "c/")
    b = site_b(tmp_path / "b" / "site", 'store = "store"', f'store = "{a.root / "store"}"')
    with pytest.raises(ConfigError, match="erp .id 1: domain 'dom' of site 'site-t'"):
        await install(b.cfg, b.env)

    pf = {c["name"]: c for c in (await preflight_uninstall(b.cfg, b.env))["checks"]}
    assert pf["keep.erp"]["details"]["purge"] is False and "site-t" in pf["keep.erp"]["details"]["why"]
    assert pf["keep.web"]["details"]["purge"] is True
    result = await uninstall(b.cfg, True, b.env)

    assert await objects(shared, "d/") | await objects(shared, "c/") == before
    assert [u["domain"] for u in result["purged"]["domains"]] == ["web"]
    skipped = {s["domain"]: s for s in result["purged"]["skipped"]}
    assert sorted(skipped) == ["erp", "files"]
    assert "belongs to site 'site-t'" in skipped["erp"]["why"] and "not purged" in skipped["erp"]["why"]
    left = {e["path"]: e["why"] for e in result["left_alone"]}
    assert "site 'site-t'" in left["d/00000001/"] and "site 'site-t'" in left["d/00000003/"]
    # Without --purge the same is said, and the foreign domains are not "kept (--purge deletes them)".
    again = await uninstall(b.cfg, False, b.env)
    assert [u["domain"] for u in again["kept"]["domains"]] == ["web"]
    assert {"d/00000001/", "d/00000003/"} <= {e["path"] for e in again["left_alone"]}
    assert await objects(shared, "d/") | await objects(shared, "c/") == before


async def test_purge_leaves_a_domain_whose_catalog_cannot_be_read(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", protect=("erp",), install=False)
    await install(site.cfg, site.env)
    store = FileStore(site.root / "store")
    erp = await build_domain(store, 1, seed=1)  # this site's: purged
    await store.put("d/00000002/cat/0000000000000001.cat", b"not a catalog generation")
    await store.put("d/00000002/seg/0000000000000001-0000000000000002.seg", b"x" * 1000)
    web = await objects(store, "d/00000002/")
    result = await uninstall(site.cfg, True, site.env)
    assert await objects(store, "d/00000002/") == web
    assert await keys(store, "d/00000001/") == [] and not erp.chunk_keys & set(await keys(store, "c/"))
    [skipped] = result["purged"]["skipped"]
    assert skipped["domain"] == "web" and "its catalog cannot be read" in skipped["why"]
    assert "not purged" in skipped["why"]


# --------------------------------------------------------------------------- F2: partitions


async def test_another_sites_partitions_are_refused_and_never_removed(tmp_path: Path) -> None:
    """Site B's drva-1 (same name as A's) names A's replication log and metadata
    repository. Install refuses them (A's label and mark name site-t); uninstall of B
    leaves them, byte for byte, and says they are not its own."""
    a = make_site(tmp_path / "a" / "site", protect=("erp",), install=False)
    await install(a.cfg, a.env)
    a_log, a_meta = a.cfg.drva("drva-1").log_path, a.cfg.drva("drva-1").meta_path
    before = {p: digest(p) for p in (a_log, a_meta)}
    b = site_b(tmp_path / "b" / "site", 'path = "state/drva-1/replog"', f'path = "{a_log}"')
    with pytest.raises(LogError, match="of DRVA 'drva-1' of site 'site-t', not of this site 'site-b'"):
        await install(b.cfg, b.env)
    b = rewrite(b, "site.toml", f'path = "{a_log}"', 'path = "state/drva-1/replog"',
                'path = "state/drva-1/meta"', f'path = "{a_meta}"')
    with pytest.raises(MetaError, match="install made for DRVA 'drva-1' of site 'site-t', not for DRVA "
                                        "'drva-1' of site 'site-b'"):
        await install(b.cfg, b.env)
    b = rewrite(b, "site.toml", 'path = "state/drva-1/replog"', f'path = "{a_log}"')
    result = await uninstall(b.cfg, False, b.env)
    assert {p: digest(p) for p in (a_log, a_meta)} == before
    left = {e["path"]: e["why"] for e in result["left_alone"]}
    assert "kept (not made by this install)" in left[str(a_log)]
    assert "kept (not made by this install)" in left[str(a_meta)]
    assert not {str(a_log), str(a_meta)} & {e.get("path") for e in result["removed"]}


async def test_partitions_install_found_are_kept_and_left_by_uninstall(tmp_path: Path) -> None:
    """Partitions formatted before install ran (here by the test helper, labelled with
    the DRVA's name only): install keeps them, says it did not make them, and does not
    write them down; uninstall leaves them."""
    site = make_site(tmp_path / "site", protect=("erp",), install=True)
    paths = [p for d in site.cfg.drvas for p in (d.log_path, d.meta_path)]
    before = {p: digest(p) for p in paths}
    result = await install(site.cfg, site.env)
    assert {(d["log"]["action"], d["meta"]["action"]) for d in result["drvas"]} == \
        {("kept (not made by this install)", "kept (not made by this install)")}
    assert load_install_record(site.cfg.state_dir, "site-t") == {}
    removed = await uninstall(site.cfg, False, site.env)
    assert {p: digest(p) for p in paths} == before
    assert {str(p) for p in paths} <= {e["path"] for e in removed["left_alone"]}


async def test_an_older_installs_partitions_are_adopted_on_reinstall(tmp_path: Path) -> None:
    """An install older than the install record left partitions labelled with the DRVA's
    name and its configuration naming them: the re-install (the upgrade) writes them down
    as its own, and uninstall removes them as before."""
    site = make_site(tmp_path / "site", protect=("erp",), install=True)
    for drva in site.cfg.drvas:  # what the older install wrote besides the partitions
        conf = site.cfg.state_dir / "drvas" / f"{drva.name}.toml"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(tomli_w.dumps(site.cfg.drva_config_doc(drva, [])))
    result = await install(site.cfg, site.env)
    assert {(d["log"]["action"], d["meta"]["action"]) for d in result["drvas"]} == {("kept", "kept")}
    made = load_install_record(site.cfg.state_dir, "site-t")
    assert sorted(made) == sorted(str(p) for d in site.cfg.drvas for p in (d.log_path, d.meta_path))
    removed = await uninstall(site.cfg, False, site.env)
    assert not any(d.log_path.exists() or d.meta_path.exists() for d in site.cfg.drvas)
    assert removed["left_alone"] == []


async def test_install_twice_keeps_and_records_its_own_partitions(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", protect=("erp",), install=False)
    await install(site.cfg, site.env)
    record = install_record_path(site.cfg.state_dir).read_bytes()
    doc = json.loads(record)
    assert doc["site"] == "site-t" and len(doc["partitions"]) == 4
    for entry in doc["partitions"]:
        st = os.lstat(entry["path"])
        assert (entry["dev"], entry["ino"], entry["formatted"], entry["kind"]) == (st.st_dev, st.st_ino, True, "file")
        assert entry["identity"]
    log_entry = next(e for e in doc["partitions"] if e["role"] == "log" and e["drva"] == "drva-1")
    with ReplicationLog.open(log_entry["path"], readonly=True) as lg:
        assert lg.label == log_entry["label"] == "drva-1@site-t"
    again = await install(site.cfg, site.env)
    assert {(d["log"]["action"], d["meta"]["action"]) for d in again["drvas"]} == {("kept", "kept")}
    assert install_record_path(site.cfg.state_dir).read_bytes() == record


async def test_a_partition_replaced_since_install_is_not_removed(tmp_path: Path) -> None:
    """Install made the partitions; someone deleted them and put others at the same
    paths (the file system may hand out the same inode number again). Uninstall tells
    them apart — the log by its uuid, the metadata repository by install's mark — and
    leaves them."""
    site = make_site(tmp_path / "site", protect=("erp",), install=False)
    await install(site.cfg, site.env)
    drva = site.cfg.drva("drva-1")
    drva.log_path.unlink()
    ReplicationLog.format(drva.log_path, 8 << 20, label="drva-1@site-t")  # same label, another log
    drva.meta_path.unlink()
    MetaRepository.format(drva.meta_path)
    before = {p: digest(p) for p in (drva.log_path, drva.meta_path)}
    assert os.getxattr(site.cfg.drva("drva-2").meta_path, MARK_XATTR).startswith(b"drva-2@site-t ")
    result = await uninstall(site.cfg, False, site.env)
    assert {p: digest(p) for p in (drva.log_path, drva.meta_path)} == before
    left = {e["path"]: e["why"] for e in result["left_alone"]}
    assert "kept (not made by this install)" in left[str(drva.log_path)]
    assert "kept (not made by this install)" in left[str(drva.meta_path)]
    assert not site.cfg.drva("drva-2").log_path.exists()  # drva-2's are still install's: removed


async def test_a_format_cut_short_is_finished_by_the_next_install(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", protect=("erp",), install=False)
    with mock.patch.object(ReplicationLog, "format", side_effect=OSError("power cut")):
        with pytest.raises(OSError, match="power cut"):
            await install(site.cfg, site.env)
    [entry] = load_install_record(site.cfg.state_dir, "site-t").values()
    assert entry.formatted is False and Path(entry.path).stat().st_size == 0  # made, not formatted
    result = await install(site.cfg, site.env)
    assert result["drvas"][0]["log"]["action"] == "formatted"
    await uninstall(site.cfg, False, site.env)
    assert not Path(entry.path).exists()


# --------------------------------------------------------------------------- F3: stale pid file


async def test_a_stale_pid_file_never_signals_and_never_blocks_the_daemon(tmp_path: Path, innocent: Any) -> None:
    site = make_site(tmp_path / "site", protect=("erp",), install=True)
    pid_file = site.cfg.state_dir / "msa.pid"
    for text in (f"{innocent.pid} {start_ticks(innocent.pid) + 1}\n",  # pid reused: another start time
                 f"{innocent.pid}\n"):  # an older cdp's file: no start time, so no proof
        pid_file.write_text(text)
        daemon = MsaDaemon(site.cfg, site.env)
        daemon.claim.take()
        assert pid_file.read_text().split() == [str(os.getpid()), str(start_ticks(os.getpid()))]
        daemon.claim.release()
        assert not pid_file.exists()
    # The file names a process that is that process (same start time): a daemon runs.
    write_pid_file(pid_file, innocent.pid)
    with pytest.raises(Busy, match=f"a daemon already runs .*pid {innocent.pid}"):
        MsaDaemon(site.cfg, site.env).claim.take()
    # Uninstall with a stale file: nothing signalled, the file removed, said so.
    pid_file.write_text(f"{innocent.pid}\n")
    result = await uninstall(site.cfg, False, site.env)
    assert result["daemon"]["running"] is False and result["daemon"]["note"].startswith("stale pid file")
    assert {"path": str(pid_file), "what": "stale daemon pid file"} in result["removed"]
    assert innocent.poll() is None


async def test_the_daemon_starts_over_a_stale_pid_file(tmp_path: Path, innocent: Any) -> None:
    site = make_site(tmp_path / "site", protect=("erp",), install=True)
    pid_file = site.cfg.state_dir / "msa.pid"
    pid_file.write_text(f"{innocent.pid} {start_ticks(innocent.pid) + 7}\n")
    async with running_daemon(site):
        assert pid_file.read_text().split() == [str(os.getpid()), str(start_ticks(os.getpid()))]
    assert not pid_file.exists() and innocent.poll() is None


# --------------------------------------------------------------------------- F5: directories of others


def foreign_state_dir(tmp_path: Path) -> tuple[Site, Path, Path]:
    """The audit's state_dir: under a 1777 directory, made first by nobody, 0777, with
    drva-1/replog a link to where a root-only file would be and tls a link to a
    directory nobody chose. Returns (site, the link targets' directory, state_dir)."""
    shared, rootonly = tmp_path / "shared", tmp_path / "rootonly"
    shared.mkdir()
    shared.chmod(0o1777)
    (rootonly / "keys_here").mkdir(parents=True)
    rootonly.chmod(0o755)
    (rootonly / "keys_here").chmod(0o755)
    state = shared / "cdp-state"
    (state / "drva-1").mkdir(parents=True)
    for d in (state, state / "drva-1"):
        os.chown(d, NOBODY, NOBODY)
        d.chmod(0o777)
    for link, target in ((state / "drva-1" / "replog", rootonly / "created_by_root"),
                         (state / "tls", rootonly / "keys_here")):
        link.symlink_to(target)
        os.lchown(link, NOBODY, NOBODY)
    site = make_site(tmp_path / "site", protect=("erp",), install=False, tls={"mode": "on"})
    site = rewrite(site, "site.toml", 'state_dir = "state"', f'state_dir = "{state}"',
                   'path = "state/', f'path = "{state}/')
    return site, rootonly, state


async def test_install_refuses_a_state_dir_another_user_made(tmp_path: Path) -> None:
    site, rootonly, state = foreign_state_dir(tmp_path)
    before = tree(tmp_path / "shared") | tree(rootonly)
    with pytest.raises(ConfigError) as err:
        await install(site.cfg, site.env)
    message = err.value.message
    assert f"state_dir in {site.config_path} ({state})" in message and "owned by uid 65534" in message
    assert "writable by no other user" in message
    assert tree(tmp_path / "shared") | tree(rootonly) == before  # nothing made, chmodded or followed
    assert not (rootonly / "created_by_root").exists()
    assert stat.S_IMODE((rootonly / "keys_here").stat().st_mode) == 0o755
    assert list((rootonly / "keys_here").iterdir()) == []
    assert await keys(FileStore(site.root / "store")) == []  # refused before the store was touched
    checks = (await preflight_install(site.cfg, site.env))["checks"]
    assert any(c["status"] == "fail" and str(state) in c["reason"] and "65534" in c["reason"] for c in checks)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        await uninstall(site.cfg, False, site.env)
    assert tree(tmp_path / "shared") | tree(rootonly) == before


async def test_a_pid_file_in_a_foreign_state_dir_is_never_read(tmp_path: Path, innocent: Any) -> None:
    """A state directory another user can write: they could name any process (with its
    right start time) in msa.pid. Uninstall refuses the directory before it reads it."""
    site = make_site(tmp_path / "site", protect=("erp",), install=False)
    await install(site.cfg, site.env)
    write_pid_file(site.cfg.state_dir / "msa.pid", innocent.pid)
    site.cfg.state_dir.chmod(0o777)
    with pytest.raises(ConfigError, match=r"may be written by other users \(mode 0777\)"):
        await uninstall(site.cfg, False, site.env)
    assert innocent.poll() is None
    assert site.cfg.drva("drva-1").log_path.exists()  # nothing removed either
    site.cfg.state_dir.chmod(0o755)


async def test_every_directory_on_the_way_must_be_ours(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", protect=("erp",), install=False)
    # A parent of state_dir another user owns: they could swap state_dir for a link.
    parent = tmp_path / "theirs"
    parent.mkdir()
    os.chown(parent, NOBODY, NOBODY)
    other = rewrite(site, "site.toml", 'state_dir = "state"', f'state_dir = "{parent}/state"')
    with pytest.raises(ConfigError, match=f"{parent} is owned by uid 65534"):
        await install(other.cfg, other.env)
    assert not (parent / "state").exists()
    # A partition's directory others may write: refused; made private, accepted.
    site = rewrite(other, "site.toml", f'state_dir = "{parent}/state"', 'state_dir = "state"')
    log_dir = site.cfg.drva("drva-2").log_path.parent
    log_dir.mkdir(parents=True)
    log_dir.chmod(0o777)
    with pytest.raises(ConfigError, match=r"drvas\[1\]\.log\.path in .*may be written by other users"):
        await install(site.cfg, site.env)
    assert list(log_dir.iterdir()) == []
    log_dir.chmod(0o755)
    await install(site.cfg, site.env)
    # A link owned by another user on the way, in a sticky directory: they may retarget it.
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "to-state").symlink_to(site.cfg.state_dir)
    os.lchown(sticky / "to-state", NOBODY, NOBODY)
    linked = rewrite(site, "site.toml", 'state_dir = "state"', f'state_dir = "{sticky}/to-state"')
    with pytest.raises(ConfigError, match=f"{sticky}/to-state is owned by uid 65534"):
        await install(linked.cfg, linked.env)


async def test_install_creates_its_state_dir_in_a_sticky_shared_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    site = make_site(tmp_path / "site", protect=("erp",), install=False)
    site = rewrite(site, "site.toml", 'state_dir = "state"', f'state_dir = "{shared}/cdp-state"',
                   'path = "state/', f'path = "{shared}/cdp-state/')
    old_umask = os.umask(0)  # even so, nothing install makes is writable by others
    try:
        await install(site.cfg, site.env)
    finally:
        os.umask(old_umask)
    for d in (site.cfg.state_dir, site.cfg.drva("drva-1").log_path.parent):
        st = d.lstat()
        assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o022 == 0
    assert (await uninstall(site.cfg, False, site.env))["left_alone"] == []


async def test_install_never_creates_or_formats_through_a_link(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", protect=("erp",), install=False)
    log_path = site.cfg.drva("drva-1").log_path
    log_path.parent.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    log_path.symlink_to(elsewhere)  # dangling, and ours: still never created through
    with pytest.raises(LogError, match="which does not exist: install creates a partition file only at its own "
                                       "path, never through a link"):
        await install(site.cfg, site.env)
    assert not os.path.lexists(elsewhere)
    elsewhere.write_bytes(bytes(8 << 20))  # a blank file behind the link: not formatted either
    with pytest.raises(LogError, match="a symbolic link to a file"):
        await install(site.cfg, site.env)
    assert elsewhere.read_bytes() == bytes(8 << 20)
    log_path.unlink()
    log_path.write_bytes(bytes(8 << 20))  # a blank file of another user's
    os.chown(log_path, NOBODY, NOBODY)
    with pytest.raises(LogError, match="a file owned by uid 65534"):
        await install(site.cfg, site.env)
    assert log_path.read_bytes() == bytes(8 << 20)


async def test_a_tls_directory_that_is_a_link_or_not_ours_is_refused(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", protect=("erp",), install=False, tls={"mode": "on"})
    target = tmp_path / "chosen"
    target.mkdir()
    target.chmod(0o755)
    site.cfg.state_dir.mkdir()
    site.cfg.tls.dir.symlink_to(target)
    with pytest.raises(ConfigError, match=r"\[tls\] dir in .*: a symbolic link"):
        await install(site.cfg, site.env)
    assert stat.S_IMODE(target.stat().st_mode) == 0o755 and list(target.iterdir()) == []
    checks = {c["name"]: c for c in (await preflight_install(site.cfg, site.env))["checks"]}
    assert checks["dirs"]["status"] == "fail" and "a symbolic link" in checks["dirs"]["reason"]
    assert "tls" not in checks  # refused under "dirs", not planned inside the link's target
    # cdp.pki on its own: never through a link, never a directory others could write.
    with pytest.raises(ConfigError, match="a symbolic link, never followed here"):
        ensure_site_pki(TlsFiles(site.cfg.tls.dir), "site-t", [])
    assert stat.S_IMODE(target.stat().st_mode) == 0o755 and list(target.iterdir()) == []
    site.cfg.tls.dir.unlink()
    site.cfg.tls.dir.mkdir(mode=0o755)
    site.cfg.tls.dir.chmod(0o775)
    with pytest.raises(ConfigError, match="mode 0775: others may write in it"):
        ensure_site_pki(TlsFiles(site.cfg.tls.dir), "site-t", [])
    os.chown(site.cfg.tls.dir, NOBODY, NOBODY)
    site.cfg.tls.dir.chmod(0o700)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        ensure_site_pki(TlsFiles(site.cfg.tls.dir), "site-t", [])
    assert list(site.cfg.tls.dir.iterdir()) == []
    os.chown(site.cfg.tls.dir, os.geteuid(), os.getegid())
    await install(site.cfg, site.env)
    assert stat.S_IMODE(site.cfg.tls.dir.stat().st_mode) == 0o700 and site.cfg.tls.ca_cert.exists()

