"""The filter's sidecar files (``<image>.dirty``, ``<image>.spill``) sit in a datastore
others may write, and the filter may run as root: whatever is planted at their paths —
a link to a file elsewhere, a hard link, a FIFO, a link to ``/dev/zero`` — is never
written through, never read without bound, and never hangs an open.

Before: the map was opened O_RDWR|O_CREAT through a link (its header written over the
target, then the target truncated to the map's size), the journal O_CREAT|O_TRUNC
through one (the target emptied), and a reader read a map whole before checking its
size (a link to /dev/zero until memory ran out, a FIFO for ever).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cdp.dirtymap import DirtyMap, DirtyMapRefused, DirtyMapUnusable, read_dirty_map, sidecar_path
from iofilter_sim.disks import PrimaryDisk
from iofilter_sim.spill import SpillJournal
from tests.drva.harness import ROOT

SIZE = 1 << 20
PRECIOUS = b"precious configuration\n" * 1000
# A child that hangs (a FIFO opened for reading) or reads without end (/dev/zero) is
# ended after this: it bounds a hang, the child needs well under a second.
CHILD_TIMEOUT_S = 60.0


def datastore(tmp_path: Path) -> tuple[Path, Path]:
    """(a disk image in a datastore, a precious file elsewhere)."""
    (tmp_path / "datastore").mkdir()
    (tmp_path / "elsewhere").mkdir()
    image = tmp_path / "datastore" / "vm1-disk0.img"
    PrimaryDisk(image, SIZE).close()
    victim = tmp_path / "elsewhere" / "victim"
    victim.write_bytes(PRECIOUS)
    return image, victim


@pytest.mark.parametrize("plant", ["symlink", "dangling symlink", "hard link"])
def test_the_map_is_never_written_through_a_planted_link(tmp_path, plant: str) -> None:
    image, victim = datastore(tmp_path)
    path = sidecar_path(image)
    if plant == "symlink":
        path.symlink_to(victim)
    elif plant == "dangling symlink":
        victim.unlink()
        path.symlink_to(victim)
    else:
        os.link(victim, path)
    with pytest.raises(DirtyMapRefused) as refused:
        DirtyMap.open(image, SIZE, 1)
    assert str(path) in str(refused.value) and "refusing to write through it" in str(refused.value)
    if plant == "dangling symlink":
        assert not victim.exists(), "the map was created at the link's target"
    else:
        assert victim.read_bytes() == PRECIOUS


def test_the_spill_journal_replaces_a_planted_link_and_removes_only_its_own_file(tmp_path) -> None:
    image, victim = datastore(tmp_path)
    path = Path(f"{image}.spill")
    path.symlink_to(victim)
    journal = SpillJournal(path, 1 << 20)
    assert journal.append([b"f" * 4096], 4096) == 0
    assert victim.read_bytes() == PRECIOUS
    assert path.is_file() and not path.is_symlink() and path.read_bytes() == b"f" * 4096
    path.unlink()  # someone puts a link there again while it runs
    path.symlink_to(victim)
    journal.close()
    assert path.is_symlink() and victim.read_bytes() == PRECIOUS  # not ours: left alone


def test_a_map_reader_takes_a_planted_link_as_unusable_without_following_it(tmp_path) -> None:
    image, victim = datastore(tmp_path)
    m = DirtyMap.open(image, SIZE, 1)
    m.close(clean=True)
    good = sidecar_path(image).read_bytes()
    victim.write_bytes(good)  # a valid map elsewhere: following the link would trust it
    sidecar_path(image).unlink()
    sidecar_path(image).symlink_to(victim)
    with pytest.raises(DirtyMapUnusable, match="a symbolic link, not a dirty-region map"):
        read_dirty_map(sidecar_path(image), SIZE)


def _read_in_child(path: Path) -> subprocess.CompletedProcess:
    """``read_dirty_map(path)`` in a child with 1 GiB of address space: what it says."""
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from cdp.dirtymap import DirtyMapUnusable, read_dirty_map
        try:
            read_dirty_map({str(path)!r}, {SIZE})
        except DirtyMapUnusable as exc:
            print("unusable:", exc)
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)


@pytest.mark.parametrize("plant", ["link to /dev/zero", "FIFO", "directory"])
def test_a_map_reader_neither_hangs_nor_reads_without_bound(tmp_path, plant: str) -> None:
    image, _ = datastore(tmp_path)
    path = sidecar_path(image)
    if plant == "FIFO":
        os.mkfifo(path)
    elif plant == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    try:
        child = _read_in_child(path)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading a map that is a {plant} hung")
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.startswith(f"unusable: {path}: "), child.stdout
    with pytest.raises(DirtyMapRefused, match=str(path)):  # and the writer refuses it
        DirtyMap.open(image, SIZE, 1)


def test_a_map_longer_than_its_disk_needs_is_unusable(tmp_path) -> None:
    image, _ = datastore(tmp_path)
    m = DirtyMap.open(image, SIZE, 1)
    m.close(clean=False)
    with open(sidecar_path(image), "ab") as fh:
        fh.write(bytes(1 << 20))
    with pytest.raises(DirtyMapUnusable, match="more than 4112 bytes, expected 4112"):
        read_dirty_map(sidecar_path(image), SIZE)
    reopened = DirtyMap.open(image, SIZE, 1)  # unusable: every region dirty, a new map in its place
    assert reopened.left.all() and os.path.getsize(sidecar_path(image)) == 4096 + 16
    reopened.close(clean=True)
