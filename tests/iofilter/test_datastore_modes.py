"""The directories that hold VM disks, and the disks in them, are ours alone whatever
the umask (FORMAT.md §13.9): a datastore the host process makes is 0755, one that other
users may write is refused (they could plant an image before it is made, or swap an
image or its sidecar files under a running VM), and so is an image another user owns.

Before: the datastore was made with the process's umask (0777 under umask 000), never
checked, and an image a local user had created was adopted, the VM's data written into
a file that user could read and truncate."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdp.errors import ConfigError
from cdp.inventory import Disk
from iofilter_sim.disks import PrimaryDisk

SIZE = 1 << 20


@pytest.fixture
def umask0() -> Iterator[None]:
    before = os.umask(0)
    try:
        yield
    finally:
        os.umask(before)


def disk_in(directory: Path) -> Disk:
    return Disk("vm1", "disk0", SIZE, directory / "vm1-disk0.img")


def test_a_new_datastore_is_0755_under_umask_000(tmp_path: Path, umask0: None) -> None:
    datastore = tmp_path / "a" / "datastore"
    PrimaryDisk.for_disk(disk_in(datastore)).close()
    for directory in (datastore, datastore.parent):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o755, directory
    assert stat.S_IMODE(os.stat(datastore / "vm1-disk0.img").st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777], ids=["0777", "0775", "1777"])
def test_a_datastore_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    datastore = tmp_path / "datastore"
    datastore.mkdir()
    os.chmod(datastore, mode)
    with pytest.raises(ConfigError) as refused:
        PrimaryDisk.for_disk(disk_in(datastore))
    message = str(refused.value)
    assert message.startswith(f"disk vm1/disk0: {datastore} may be written by other users (mode {mode:04o})"), message
    assert "chmod go-w" in message
    assert not (datastore / "vm1-disk0.img").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user takes root")
def test_an_image_another_user_owns_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "vm1-disk0.img"
    image.write_bytes(b"")
    os.chown(image, 65534, 65534)
    with pytest.raises(ConfigError) as refused:
        PrimaryDisk.for_disk(disk_in(tmp_path))
    message = str(refused.value)
    assert message.startswith(f"disk vm1/disk0: {image} is owned by uid 65534"), message
    assert "expected an image owned by root or by uid 0" in message
    assert os.stat(image).st_size == 0  # nothing written into it
