"""The MSA's own state files read as hostile input (``cdp.small_file``): a link, a FIFO,
a huge or a mistyped file in the state directory is refused by name, quickly, never
followed, never read whole, never a traceback."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from cdp.errors import ConfigError
from cdp.msa.keeper import STATUS_BYTES_MAX, Kept, ProcessKeeper
from cdp.msa.power import load_power, power_path, save_power
from cdp.msa.protection import load_protection, protection_path, save_protection
from cdp.msa.config import Policy
from cdp.small_file import NotRegularFile, read_small_file
from cdp.testing.site import Site, make_site


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path / "site", protect=("erp", "files"), log_size="8MiB", install=False)


def _plant(path: Path, kind: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    if kind == "link to /dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "huge sparse":
        with open(path, "wb") as f:
            f.truncate(2 << 30)
    elif kind == "directory":
        path.mkdir()


@pytest.mark.parametrize("kind, says", [("link to /dev/zero", "symbolic link"), ("fifo", "FIFO"),
                                        ("huge sparse", "bytes, more than"), ("directory", "directory")])
@pytest.mark.parametrize("which", ["power", "protection"])
def test_a_planted_state_file_is_refused_by_name_without_reading_it_whole(site: Site, which: str, kind: str,
                                                                          says: str) -> None:
    path = power_path(site.cfg) if which == "power" else protection_path(site.cfg)
    load = load_power if which == "power" else load_protection
    _plant(path, kind)
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load(site.cfg)
    assert time.monotonic() - started < 5  # a FIFO does not wait for a writer, /dev/zero is not read to the end
    assert str(path) in str(caught.value) and says in str(caught.value)


def test_state_files_written_by_the_msa_read_back(site: Site) -> None:
    save_power(site.cfg, ["erp"])
    save_protection(site.cfg, {"erp": Policy(retention_s=7200.0, rpo_target_s=30.0)})
    assert load_power(site.cfg) == ["erp"]
    assert load_protection(site.cfg)["erp"] == Policy(retention_s=7200.0, rpo_target_s=30.0)


@pytest.mark.parametrize("field, value", [("retention_s", "x"), ("retention_s", [1]), ("rpo_target_s", True),
                                          ("rpo_target_s", 1e308), ("consolidate_every_s", -5.0),
                                          ("consolidate_after_s", None)])
def test_a_mistyped_or_out_of_bounds_policy_is_refused_naming_the_field(site: Site, field: str, value: object) -> None:
    save_protection(site.cfg, {"erp": Policy()})
    path = protection_path(site.cfg)
    doc = json.loads(path.read_bytes())
    doc["domains"]["erp"][field] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=rf"domains\.erp\.{field}"):
        load_protection(site.cfg)


async def test_a_status_file_replaced_by_a_link_to_dev_zero_is_not_read(tmp_path: Path) -> None:
    status = tmp_path / "status.json"
    kept = Kept(name="drva-x", log_path=tmp_path / "drva-x.log", status_path=status)
    keeper = ProcessKeeper("test", os.environ, time.monotonic)
    await keeper.spawn(kept, ["-c", "import time; time.sleep(60)"])
    try:
        kept.state = "starting"
        status.symlink_to("/dev/zero")
        started = time.monotonic()
        assert keeper.read_status(kept) is False and kept.status is None
        status.unlink()
        _plant(status, "fifo")
        assert keeper.read_status(kept) is False
        assert time.monotonic() - started < 5
        status.unlink()
        status.write_text(json.dumps({"pid": kept.proc.pid}))
        assert keeper.read_status(kept) is True and kept.state == "up"  # the real one is still read
    finally:
        await keeper.stop(kept)


def test_read_small_file_reads_one_byte_past_its_bound_at_most(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * (STATUS_BYTES_MAX + 100))
    raw, st = read_small_file(path, 10)
    assert raw == b"x" * 11 and st.st_size == STATUS_BYTES_MAX + 100
    with pytest.raises(FileNotFoundError):
        read_small_file(tmp_path / "none", 10)
    (tmp_path / "l").symlink_to(path)
    with pytest.raises(NotRegularFile, match="symbolic link"):
        read_small_file(tmp_path / "l", 10)


def test_a_relative_store_key_file_reaches_the_children_absolute(site: Site, tmp_path: Path, monkeypatch) -> None:
    """The children start in the code root: a relative ``CDP_STORE_KEY_FILE`` made every
    DRVA, host and appliance fail to open it (or open another file of that name)."""
    monkeypatch.chdir(tmp_path)
    env = site.cfg.child_env({"CDP_STORE_KEY_FILE": "keys", "PATH": "/bin"})
    assert env["CDP_STORE_KEY_FILE"] == str(tmp_path / "keys") and env["PATH"] == "/bin"
    assert site.cfg.child_env({"CDP_STORE_KEY_FILE": "/etc/k"})["CDP_STORE_KEY_FILE"] == "/etc/k"


def test_state_dirs_made_under_umask_000_are_0755(site: Site) -> None:
    """The MSA's state_dir (made by the first power or protection write) and the datastore
    a failover recovers into are 0755 whatever the umask: a host now refuses a datastore
    others may write (iofilter_sim.disks.ensure_image_dir), and under umask 000 plain
    mkdir made them 0777."""
    import shutil

    from cdp.msa.install_dirs import make_missing_dirs

    shutil.rmtree(site.cfg.state_dir, ignore_errors=True)
    old = os.umask(0)
    try:
        save_power(site.cfg, ["erp"])
        save_protection(site.cfg, {})
        make_missing_dirs(site.cfg.cluster.state_dir / "a" / "b")
    finally:
        os.umask(old)
    for path in (site.cfg.state_dir, site.cfg.cluster.state_dir / "a", site.cfg.cluster.state_dir / "a" / "b"):
        assert path.stat().st_mode & 0o777 == 0o755, path
