"""A simulated VM's primary disk is its image file and nothing else: a symbolic link
planted at the image path is refused (never followed: the VM's writes would land in its
target), so are a FIFO and a directory, each with the disk and the path named; a new
image is 0600; and the inventory refuses two disks whose images are hard links of one
file (one path each, one inode), as it refuses one path twice."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from cdp.errors import ConfigError
from cdp.inventory import load_cluster
from cdp.records import KIND_WRITE, RECORD_DTYPE
from iofilter_sim.disks import PrimaryDisk

SIZE = 4096
VICTIM = b"V" * SIZE


def one_write(byte: bytes) -> tuple[np.ndarray, bytes]:
    records = np.zeros(1, RECORD_DTYPE)
    records["kind"], records["offset"], records["length"] = KIND_WRITE, 0, 512
    return records, byte * 512


def test_a_link_at_the_image_path_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    victim = tmp_path / "victim.dat"
    victim.write_bytes(VICTIM)
    image = tmp_path / "vm-disk0.img"
    image.symlink_to(victim)
    for create in (True, False):
        with pytest.raises(ConfigError) as caught:
            PrimaryDisk(image, SIZE, name="vm/disk0", create=create)
        assert str(caught.value).startswith(f"disk vm/disk0: {image} is a symbolic link"), caught.value
    assert victim.read_bytes() == VICTIM


def test_a_dangling_link_creates_nothing_at_its_target(tmp_path: Path) -> None:
    image, target = tmp_path / "vm-disk0.img", tmp_path / "elsewhere.img"
    image.symlink_to(target)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        PrimaryDisk(image, SIZE, name="vm/disk0")
    assert not target.exists()


@pytest.mark.parametrize("kind,make", [("a FIFO", os.mkfifo), ("a directory", os.mkdir)])
def test_anything_but_a_regular_file_is_refused_without_blocking(tmp_path: Path, kind: str, make) -> None:
    image = tmp_path / "vm-disk0.img"
    make(image)
    with pytest.raises(ConfigError) as caught:
        PrimaryDisk(image, SIZE, name="vm/disk0")
    assert str(caught.value) == f"disk vm/disk0: {image} is {kind}: expected a regular file (a raw image)"


def test_a_new_image_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    image = tmp_path / "fresh.img"
    old_umask = os.umask(0)
    try:
        PrimaryDisk(image, SIZE).close()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(image.stat().st_mode) == 0o600


def test_an_existing_image_still_opens_and_takes_writes(tmp_path: Path) -> None:
    image = tmp_path / "vm-disk0.img"
    image.write_bytes(bytes(SIZE))
    with PrimaryDisk(image, SIZE, name="vm/disk0", create=False) as disk:
        disk.write_batch(*one_write(b"W"))
        assert disk.read(0, 4) == b"WWWW"


CLUSTER = """\
site = "site-a"
state_dir = "."
[[hosts]]
name = "esx-01"
[[vms]]
name = "vm1"
host = "esx-01"
disks = [ {{ name = "d0", size = "4KiB", image = "{a}" }}, {{ name = "d1", size = "4KiB", image = "{b}" }} ]
"""


def cluster_file(tmp_path: Path, a: str, b: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(CLUSTER.format(a=a, b=b))
    return path


def test_two_disks_on_hard_links_of_one_file_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.img").write_bytes(bytes(SIZE))
    os.link(tmp_path / "a.img", tmp_path / "b.img")
    with pytest.raises(ConfigError) as caught:
        load_cluster(cluster_file(tmp_path, "a.img", "b.img"))
    message = str(caught.value)
    assert "vms[0].disks[1].image: expected an image file no other disk uses" in message, message
    assert "vms[0].disks[0].image names the same file: a hard link" in message and "b.img" in message, message


def test_distinct_images_and_images_not_there_yet_pass(tmp_path: Path) -> None:
    (tmp_path / "a.img").write_bytes(bytes(SIZE))
    (tmp_path / "b.img").write_bytes(bytes(SIZE))
    assert len(load_cluster(cluster_file(tmp_path, "a.img", "b.img")).vms[0].disks) == 2
    assert len(load_cluster(cluster_file(tmp_path, "new-a.img", "new-b.img")).vms[0].disks) == 2


def test_one_path_twice_is_still_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="an image file no other disk uses"):
        load_cluster(cluster_file(tmp_path, "a.img", "./a.img"))


def test_a_failed_fsync_of_the_primary_is_for_good(tmp_path: Path, monkeypatch) -> None:
    """After a failed write-back Linux reports the error once and marks the pages clean:
    the next fsync returned 0, and a guest's next FLUSH was answered over lost writes."""
    import errno

    import cdp.durable
    from cdp.durable import SyncFailed

    disk = PrimaryDisk(tmp_path / "vm-disk0.img", SIZE, name="vm/disk0")
    real, failed = os.fsync, []

    def fsync_once_failing(fd: int) -> None:
        if not failed:
            failed.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        real(fd)
    monkeypatch.setattr(cdp.durable.os, "fsync", fsync_once_failing)
    try:
        with pytest.raises(OSError):
            disk.fsync()
        with pytest.raises(SyncFailed, match="a sync failed earlier") as caught:
            disk.fsync()  # the kernel would say 0 now
        assert caught.value.filename == str(disk.path)
    finally:
        disk.close()
