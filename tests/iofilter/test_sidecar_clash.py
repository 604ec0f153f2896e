"""The filter's sidecar files replace only what is theirs. An image or a partition at a
sidecar's path is refused by the site and cluster files (tests/mgmt/test_hv_places.py);
these are the filter's own checks under them, for a file that got there anyway.

Before: the spill journal unlinked whatever regular file was at ``<first image>.spill``
(another VM's disk, a DRVA's replication log), and a dirty-region map writer took any
file at ``<image>.dirty`` for an unusable map: its header written over the file's first
4 KiB, then the file truncated to the map's size."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cdp.dirtymap import HEADER_BYTES, MAGIC, DirtyMap, DirtyMapRefused, read_dirty_map, sidecar_path
from cdp.frame import FRAME_MAGIC
from iofilter_sim.spill import SpillJournal, SpillRefused

SIZE = 1 << 20  # a disk of 16 regions: its map is 4096 + 16 bytes
DISK_BYTES = b"\x5a" * (2 << 20)  # another VM's disk, holding data
LOG_BYTES = b"CDPLOGSB" + bytes(8184)  # a replication log's superblock


@pytest.mark.parametrize("content", [DISK_BYTES, LOG_BYTES, bytes(4096)], ids=["disk", "log", "zeros"])
def test_the_spill_journal_never_removes_a_file_that_is_no_journal(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "vm1-disk0.img.spill"
    path.write_bytes(content)
    before = os.stat(path).st_ino
    with pytest.raises(SpillRefused) as refused:
        SpillJournal(path, 1 << 20)
    message = str(refused.value)
    assert message.startswith(f"{path}: a regular file beginning {content[:4]!r}, not a spill journal"), message
    assert "refusing to remove it" in message
    assert os.stat(path).st_ino == before and path.read_bytes() == content


@pytest.mark.parametrize("left", [b"", FRAME_MAGIC + bytes(60)], ids=["empty", "a journal"])
def test_a_journal_an_earlier_run_left_is_replaced(tmp_path: Path, left: bytes) -> None:
    path = tmp_path / "vm1-disk0.img.spill"
    path.write_bytes(left)
    os.chmod(path, 0o644)
    journal = SpillJournal(path, 1 << 20)
    st = os.stat(path)  # a new file (its inode number may be the old one's, freed just before)
    assert st.st_size == 0 and st.st_mode & 0o777 == 0o600
    journal.close()
    assert not path.exists()


def test_the_spill_journal_refuses_a_fifo_without_removing_it(tmp_path: Path) -> None:
    path = tmp_path / "vm1-disk0.img.spill"
    os.mkfifo(path)
    with pytest.raises(SpillRefused, match="a FIFO; expected nothing there or a spill journal"):
        SpillJournal(path, 1 << 20)
    assert path.is_fifo()


@pytest.mark.parametrize("content", [DISK_BYTES, LOG_BYTES, bytes(HEADER_BYTES + 17)], ids=["disk", "log", "zeros"])
def test_a_map_writer_never_overwrites_a_file_that_is_no_map(tmp_path: Path, content: bytes) -> None:
    image = tmp_path / "vm1-disk0.img"
    path = sidecar_path(image)
    path.write_bytes(content)
    with pytest.raises(DirtyMapRefused) as refused:
        DirtyMap.open(image, SIZE, 1)
    message = str(refused.value)
    assert message.startswith(f"{path}: a {len(content)}-byte file beginning {content[:4]!r}, not a dirty-region map")
    assert "refusing to overwrite it" in message
    assert path.read_bytes() == content


@pytest.mark.parametrize("left", ["empty", "damaged magic", "zeros of the map's size", "foreign map"])
def test_a_map_writer_replaces_what_may_be_a_map(tmp_path: Path, left: str) -> None:
    """An empty file (a creation a crash cut short), a map whose magic was damaged or
    whose blocks a crash left unwritten, a map of another geometry: unusable, so every
    region is dirty, and a new map takes its place."""
    image = tmp_path / "vm1-disk0.img"
    path = sidecar_path(image)
    if left == "empty":
        path.write_bytes(b"")
    elif left == "zeros of the map's size":
        path.write_bytes(bytes(HEADER_BYTES + 16))
    else:
        DirtyMap.open(image, SIZE * (4 if left == "foreign map" else 1), 1).close(clean=True)
        if left == "damaged magic":
            with open(path, "r+b") as f:
                f.write(b"X")
    m = DirtyMap.open(image, SIZE, 1)
    assert m.left.all() and m.left_reason
    m.close(clean=True)
    assert path.read_bytes()[:4] == MAGIC
    flags, _ = read_dirty_map(path, SIZE)
    assert not flags.any()
