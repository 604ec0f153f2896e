"""``ReplicationLog.format`` destroys a log, so it refuses to unless that is what is meant
(FORMAT.md §3.2): never under a writer (it takes the writer's ``flock`` first), never over
a file that holds anything, nor over a device that holds a log, without ``force``; it says
what is there. A new file, or an empty one, needs no force."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from cdp import replog_format
from cdp.errors import ConfigError, LogError
from cdp.logfmt import BLOCK, DATA_START
from cdp.replog import ReplicationLog

SIZE = DATA_START + (2 << 20)  # a 2 MiB ring


def body(i: int) -> bytes:
    return (b"%08d" % i) * 500


def entries(path: Path) -> list[bytes]:
    with ReplicationLog.open(path, readonly=True) as log:
        return [b for _, b in log.entries()]


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    """A formatted log with two entries (a DRVA's acked, unshipped frames)."""
    p = tmp_path / "replog"
    ReplicationLog.format(p, SIZE, label="drva-1@site-a")
    with ReplicationLog.open(p) as log:
        log.append_batch([[body(1)], [body(2)]])
    return p


def test_a_log_a_writer_holds_is_refused_even_with_force(log_path: Path) -> None:
    writer = ReplicationLog.open(log_path)  # the running DRVA: flock held until close
    try:
        writer.append_batch([[body(3)]])
        for force in (False, True):
            with pytest.raises(LogError, match=rf"{log_path}: in use by another process"):
                ReplicationLog.format(log_path, SIZE, force=force)
        writer.append_batch([[body(4)]])  # the writer goes on: nothing was written under it
    finally:
        writer.close()
    assert entries(log_path) == [body(i) for i in range(1, 5)]


def test_an_existing_log_is_refused_without_force_saying_its_label_and_entries(log_path: Path) -> None:
    before = log_path.read_bytes()
    with pytest.raises(LogError, match=r"labelled 'drva-1@site-a'.*entries from position 0.*force") as err:
        ReplicationLog.format(log_path, SIZE)
    assert str(log_path) in err.value.message
    assert log_path.read_bytes() == before
    ReplicationLog.format(log_path, SIZE, label="again", force=True)
    assert entries(log_path) == []
    with ReplicationLog.open(log_path, readonly=True) as log:
        assert log.label == "again"
    # A log with nothing in it is a log all the same: refused, and said to be empty.
    with pytest.raises(LogError, match=r"labelled 'again'.*no entry at its head"):
        ReplicationLog.format(log_path, SIZE)


def test_a_file_of_other_data_is_refused_without_force_and_left_as_it_was(tmp_path: Path) -> None:
    victim = tmp_path / "precious.img"
    data = os.urandom(5000)
    victim.write_bytes(data)
    with pytest.raises(LogError, match=r"precious.img: holds 5,000 bytes of other data"):
        ReplicationLog.format(victim, SIZE)
    assert victim.read_bytes() == data
    ReplicationLog.format(victim, SIZE, force=True)
    assert entries(victim) == [] and victim.stat().st_size == SIZE


def test_a_forced_format_of_a_file_keeps_its_size_when_none_is_given(log_path: Path) -> None:
    ReplicationLog.format(log_path, force=True)
    assert log_path.stat().st_size == SIZE and entries(log_path) == []


def test_a_new_or_empty_file_needs_no_force(tmp_path: Path) -> None:
    new = tmp_path / "new"
    ReplicationLog.format(new, SIZE)
    assert new.stat().st_mode & 0o777 == 0o600
    empty = tmp_path / "empty"
    empty.touch()
    ReplicationLog.format(empty, SIZE)
    assert entries(new) == entries(empty) == []


def test_a_link_is_never_created_through_but_an_existing_target_is_formatted(tmp_path: Path,
                                                                              log_path: Path) -> None:
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LogError, match=r"dangling: cannot open"):
        ReplicationLog.format(dangling, SIZE)
    assert not (tmp_path / "elsewhere").exists()
    link = tmp_path / "by-id"  # as /dev/disk/by-id names a LUN
    link.symlink_to(log_path)
    with pytest.raises(LogError, match="labelled 'drva-1@site-a'"):
        ReplicationLog.format(link, SIZE)
    ReplicationLog.format(link, SIZE, force=True)
    assert entries(log_path) == []


def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(LogError, match=r"fifo: not a regular file or a block device"):
        ReplicationLog.format(fifo, SIZE, force=True)


def test_a_failed_format_of_a_new_file_leaves_nothing_behind(tmp_path: Path) -> None:
    small = tmp_path / "small"
    with pytest.raises(ConfigError, match="at least"):
        ReplicationLog.format(small, 100_000)
    assert not small.exists()  # so that the retry, with a size that fits, needs no force
    ReplicationLog.format(small, SIZE)


def test_a_device_is_formatted_unless_it_holds_a_log(tmp_path: Path, monkeypatch) -> None:
    """A new LUN holds whatever its array left: formatted without force. One holding a log
    needs force. (A regular file stands in for the device: ``format`` is told it is one.)"""
    monkeypatch.setattr(replog_format, "stat", SimpleNamespace(S_ISBLK=lambda mode: True))
    lun = tmp_path / "lun"
    junk = os.urandom(SIZE)
    lun.write_bytes(junk)
    ReplicationLog.format(lun, label="drva-1")
    after = lun.read_bytes()
    assert after[DATA_START + BLOCK:] == junk[DATA_START + BLOCK:]  # a device's data area is not zero-filled
    with ReplicationLog.open(lun) as log:
        log.append_batch([[body(1)]])
    with pytest.raises(LogError, match=r"lun: holds a replication log \(labelled 'drva-1'"):
        ReplicationLog.format(lun)
    ReplicationLog.format(lun, force=True)
    assert entries(lun) == []
