"""What ``ReplicationLog.open`` refuses before it trusts the partition (FORMAT.md §3.2,
§3.5): a partition cut short, a forged superblock, a second writer, a read error, a
file that is no partition; and why a scan reads the device, not the page cache."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cdp import durable
from cdp.errors import CdpError, LogCorruption, LogError
from cdp.logfmt import BLOCK, DATA_START, pack_superblock, unpack_superblock
from cdp.replog import ReplicationLog

ROOT = Path(__file__).resolve().parent.parent
DATA_SIZE = 2 << 20
SIZE = DATA_START + DATA_SIZE  # a 2 MiB ring


def body(i: int, n: int = 3000) -> bytes:
    return (b"%08d" % i) * (n // 8)


def phys(pos: int) -> int:
    return DATA_START + pos % DATA_SIZE


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "replog"
    ReplicationLog.format(p, SIZE, label="drva-test")
    return p


def bodies(path: Path, **kw) -> list[bytes]:
    with ReplicationLog.open(path, readonly=True, **kw) as log:
        return [b for _, b in log.entries()]


# ---- a partition cut short while stopped ------------------------------------------


def _log_of_ten(directory: Path) -> tuple[Path, int]:
    p = directory / "replog"
    ReplicationLog.format(p, SIZE)
    with ReplicationLog.open(p) as log:
        for i in range(10):
            log.append_batch([[body(i, 20000)]])
        return p, log.tail


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=2 * BLOCK, max_value=SIZE - 1))
@example(cut=DATA_START + 5 * 5 * BLOCK)  # in the middle of the acked entries, block-aligned
@example(cut=SIZE - 1)
def test_a_partition_cut_short_is_refused_naming_both_sizes(cut: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        p, _ = _log_of_ten(Path(d))
        os.truncate(p, cut)
        before = p.read_bytes()
        for readonly in (True, False):
            with pytest.raises(LogCorruption, match=rf"{p}: .*partition_size {SIZE}, but the partition holds {cut} bytes"):
                ReplicationLog.open(p, readonly=readonly)
        assert p.read_bytes() == before  # refused before writing anything


def test_a_partition_grown_while_stopped_still_opens(tmp_path: Path) -> None:
    p, tail = _log_of_ten(tmp_path)
    os.truncate(p, SIZE + (1 << 20))  # a LUN grown: the ring keeps its recorded size
    with ReplicationLog.open(p) as log:
        assert log.tail == tail and [b for _, b in log.entries()] == [body(i, 20000) for i in range(10)]


# ---- fsyncgate: the scan reads the device, not what a failed write-back left cached ----


class LostWriteBack:
    """A device that lost a write-back while the page cache kept the bytes (Linux marks
    them clean after the EIO): reads through an ``O_DIRECT`` fd (the device) see
    ``stale`` at ``[lo, lo + len(stale))`` of the file; buffered reads (the cache) see
    the file as it is."""

    def __init__(self, monkeypatch, path: Path, lo: int, stale: bytes) -> None:
        self.ino, self.lo, self.stale = os.stat(path).st_ino, lo, stale
        real_pread, real_preadv = os.pread, os.preadv

        def pread(fd: int, n: int, offset: int) -> bytes:
            data = real_pread(fd, n, offset)
            if not self._device(fd):
                return data
            out = bytearray(data)
            self._overlay(memoryview(out), offset)
            return bytes(out)

        def preadv(fd: int, buffers, offset: int) -> int:
            got = real_preadv(fd, buffers, offset)
            if self._device(fd):
                at, left = offset, got
                for b in buffers:
                    view = memoryview(b).cast("B")[:left]
                    self._overlay(view, at)
                    at, left = at + len(view), left - len(view)
            return got

        monkeypatch.setattr(os, "pread", pread)
        monkeypatch.setattr(os, "preadv", preadv)

    def _device(self, fd: int) -> bool:
        return os.fstat(fd).st_ino == self.ino and bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)

    def _overlay(self, view: memoryview, offset: int) -> None:
        a, b = max(offset, self.lo), min(offset + len(view), self.lo + len(self.stale))
        if a < b:
            view[a - offset : b - offset] = self.stale[a - self.lo : b - self.lo]


def test_entries_whose_fdatasync_failed_are_not_reported_durable_after_a_restart(path, monkeypatch):
    with ReplicationLog.open(path) as log:
        log.append_batch([[body(1)], [body(2)]])
        tail = log.tail
        with open(path, "rb") as f:  # what the device holds where the next commit goes
            f.seek(phys(tail))
            stale = f.read(8 * BLOCK)

        def eio(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error (write-back failed)")

        monkeypatch.setattr(durable, "sync_data", eio)
        with pytest.raises(OSError):
            log.append_batch([[body(3)], [body(4)]])  # never acked
        monkeypatch.undo()
    LostWriteBack(monkeypatch, path, phys(tail), stale)
    assert bodies(path) == [body(1), body(2)]
    with ReplicationLog.open(path) as log:
        assert log.tail == tail and [b for _, b in log.entries()] == [body(1), body(2)]


def test_the_scan_reads_a_big_log_in_chunks(path, monkeypatch):
    with ReplicationLog.open(path) as log:
        log.append_batch([[body(i, 100)] for i in range(300)])  # 300 one-block entries
    reads = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: reads.append(off) or real(fd, bufs, off))
    assert bodies(path) == [body(i, 100) for i in range(300)]
    assert len(reads) < 20  # not two device round trips per entry


# ---- read errors -------------------------------------------------------------------


def failing_reads(monkeypatch, *bad_offsets: int) -> None:
    """Every read covering one of the file offsets ``bad_offsets`` fails with EIO (a bad
    sector), buffered or ``O_DIRECT``."""
    real_pread, real_preadv = os.pread, os.preadv

    def covers(offset: int, n: int) -> bool:
        return any(offset <= bad < offset + n for bad in bad_offsets)

    def pread(fd, n, offset):
        if covers(offset, n):
            raise OSError(errno.EIO, "Input/output error")
        return real_pread(fd, n, offset)

    def preadv(fd, buffers, offset):
        if covers(offset, sum(len(memoryview(b).cast("B")) for b in buffers)):
            raise OSError(errno.EIO, "Input/output error")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "preadv", preadv)


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "o_direct"])
def test_eio_in_the_recovery_scan_is_a_log_error_naming_offset_and_position(path, monkeypatch, direct):
    with ReplicationLog.open(path) as log:
        positions = log.append_batch([[body(1)], [body(2)], [body(3)]])
    failing_reads(monkeypatch, phys(positions[1]) + 100)
    with pytest.raises(LogError, match=rf"{path}: cannot read .* at offset \d+ \(position \d+\): Input/output error"):
        ReplicationLog.open(path, direct=direct)


def test_eio_reading_a_live_entry_is_a_log_error_naming_its_position(path, monkeypatch):
    with ReplicationLog.open(path) as log:
        positions = log.append_batch([[body(1)], [body(2)], [body(3)]])
        failing_reads(monkeypatch, phys(positions[1]) + 100)
        assert log.read(positions[0]) == body(1)
        with pytest.raises(LogError, match=rf"offset {phys(positions[1])} \(position {positions[1]}\)"):
            log.read(positions[1])
        monkeypatch.undo()
        assert log.read(positions[1]) == body(2)  # the error was the read's, not the data's


@pytest.mark.parametrize("copy", [0, 1])
def test_eio_on_one_superblock_copy_falls_back_to_the_other(path, monkeypatch, copy):
    with ReplicationLog.open(path) as log:
        log.append_batch([[body(1)], [body(2)]])
    ReplicationLog.open(path).close()  # both copies now know the entries' epoch
    failing_reads(monkeypatch, copy * BLOCK + 10)
    assert bodies(path) == [body(1), body(2)]
    with ReplicationLog.open(path) as log:
        assert [b for _, b in log.entries()] == [body(1), body(2)]


def test_eio_on_both_superblock_copies_names_both(path, monkeypatch):
    failing_reads(monkeypatch, 10, BLOCK + 10)
    with pytest.raises(LogCorruption, match=r"no valid superblock \(copy 0: .*cannot read.*copy 1: .*cannot read"):
        ReplicationLog.open(path)


def test_a_fifo_or_a_character_device_is_not_a_partition(tmp_path: Path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    zero = tmp_path / "zero"
    zero.symlink_to("/dev/zero")
    for p in (fifo, zero):
        for readonly in (False, True):  # a read-only open of a FIFO does not wait for a writer
            with pytest.raises(LogError, match=rf"{p}: not a regular file or a block device"):
                ReplicationLog.open(p, readonly=readonly)


# ---- one writer at a time ----------------------------------------------------------


def test_a_second_writer_is_refused_until_the_first_closes(path):
    first = ReplicationLog.open(path)
    try:
        first.append_batch([[body(1)]])
        with pytest.raises(LogError, match=rf"{path}: in use by another process"):
            ReplicationLog.open(path)
        assert [b for _, b in ReplicationLog.open(path, readonly=True).entries()] == [body(1)]
        first.append_batch([[body(2)]])  # the refused open wrote nothing
        epoch = first.epoch
    finally:
        first.close()
    with ReplicationLog.open(path) as log:  # closing released the lock
        assert [b for _, b in log.entries()] == [body(1), body(2)] and log.epoch == epoch + 1


def test_a_writer_in_another_process_is_refused(path):
    code = ("import sys; from cdp.replog import ReplicationLog; from cdp.errors import LogError\n"
            "try:\n    ReplicationLog.open(sys.argv[1])\nexcept LogError as e:\n    print(e); sys.exit(3)\n")
    with ReplicationLog.open(path):
        r = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True, check=False,
                           timeout=60)
        assert r.returncode == 3 and "in use by another process" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- forged superblock fields (the checksum is unkeyed: FORMAT.md §0) ---------------


def _forge(path: Path, **fields) -> tuple[int, bytes]:
    """Overwrite the newest copy with its fields changed (generation + 2 by default,
    so it stays the newest); return the entries' epoch and the forged copy."""
    raw = path.read_bytes()[: 2 * BLOCK]
    sbs = [unpack_superblock(raw[i * BLOCK : (i + 1) * BLOCK]) for i in range(2)]
    newest = max(sbs, key=lambda s: s.generation)
    fields.setdefault("generation", newest.generation + 2)
    forged = pack_superblock(dataclasses.replace(newest, **fields))
    with open(path, "r+b") as f:
        f.seek(fields["generation"] % 2 * BLOCK)
        f.write(forged)
    return min(s.epoch for s in sbs), forged


def _two_opens(path: Path) -> None:
    """Entries of epoch 1, then a second open: copy 0 holds epoch 1, copy 1 epoch 2."""
    with ReplicationLog.open(path) as log:
        log.append_batch([[body(1)], [body(2)]])
    ReplicationLog.open(path).close()


@functools.cache
def _two_opened_log() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "replog"
        ReplicationLog.format(p, SIZE)
        _two_opens(p)
        return p.read_bytes()


FORGED = {
    "head not block-aligned": (lambda t: dict(head=100, tail_hint=100), "head 100"),
    "tail_hint not block-aligned": (lambda t: dict(tail_hint=t + 7), "tail_hint"),
    "head past tail_hint": (lambda t: dict(head=t + BLOCK, tail_hint=t), "head .* > tail_hint"),
    "live part larger than the ring": (lambda t: dict(head=0, tail_hint=DATA_SIZE + BLOCK), "> data_size"),
    "epoch 2**32-1": (lambda t: dict(epoch=2**32 - 1), "epoch 4294967295"),
    "generation 2**64-1": (lambda t: dict(generation=2**64 - 1), "generation 18446744073709551615"),
    "head near 2**64": (lambda t: dict(head=2**64 - 2 * BLOCK, tail_hint=2**64 - 2 * BLOCK), "no room left"),
    "data_size past the partition": (lambda t: dict(data_size=1 << 40), "partition_size"),
    "commit_bytes_max 0": (lambda t: dict(commit_bytes_max=0), "commit_bytes_max 0"),
    "partition_size past the file": (lambda t: dict(partition_size=1 << 40), "cut short"),
}


@pytest.mark.parametrize("case", FORGED)
def test_a_forged_superblock_copy_is_refused_and_the_other_copy_used(path, case):
    _two_opens(path)
    make, field = FORGED[case]
    epoch, forged = _forge(path, **make(4 * BLOCK))
    if case != "partition_size past the file":  # only the file's size tells that one
        why = unpack_superblock(forged)
        assert isinstance(why, str) and re.search(field, why), why
    with ReplicationLog.open(path, readonly=True) as log:
        assert log.epoch == epoch and [b for _, b in log.entries()] == [body(1), body(2)]
    with ReplicationLog.open(path) as log:
        log.append_batch([[body(3)]])
    assert bodies(path) == [body(1), body(2), body(3)]


def test_a_forged_copy_with_no_good_copy_beside_it_is_corruption_naming_the_field(path):
    sb = unpack_superblock(path.read_bytes()[:BLOCK])
    with open(path, "r+b") as f:
        for gen in (2, 3):
            f.seek(gen % 2 * BLOCK)
            f.write(pack_superblock(dataclasses.replace(sb, generation=gen, head=100, tail_hint=100)))
    with pytest.raises(LogCorruption, match=r"copy 0: head 100 .*copy 1: head 100"):
        ReplicationLog.open(path)


@settings(max_examples=60, deadline=None)
@given(fields=st.fixed_dictionaries({}, optional={
    "head": st.integers(0, 2**64 - 1), "tail_hint": st.integers(0, 2**64 - 1),
    "epoch": st.integers(0, 2**32 - 1), "commit_bytes_max": st.integers(0, 2**32 - 1),
    "generation": st.integers(0, 2**64 - 1), "data_size": st.integers(0, 2**64 - 1),
    "partition_size": st.integers(0, 2**64 - 1)}))
@example(fields={"epoch": 2**32 - 1})
@example(fields={"generation": 2**64 - 1})
@example(fields={"head": 2**64 - 2 * BLOCK, "tail_hint": 2**64 - 2 * BLOCK})
def test_any_forged_superblock_gives_a_clear_error_or_a_working_log(fields):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "replog"
        p.write_bytes(_two_opened_log())
        _forge(p, **fields)
        try:
            log = ReplicationLog.open(p)
        except CdpError:
            return  # refused, with a message (no bare struct.error, OverflowError, ...)
        with log:
            log.append_batch([[body(9)]])
            assert log.head % BLOCK == 0 and log.head <= log.tail <= log.head + log.data_size


# ---- the message of a refused copy (the scan fell back to an older one) --------------


def test_corruption_after_a_fallback_names_the_refused_copy(tmp_path: Path):
    p = tmp_path / "replog"
    ReplicationLog.format(p, DATA_START + (1 << 20))
    with ReplicationLog.open(p) as log:
        for _ in range(3):  # three laps, each shipped: the older copy's head is overwritten
            for i in range(12):
                log.append_batch([[body(i, 50000)]])
            log.trim(log.tail)
        for i in range(8):
            log.append_batch([[body(100 + i, 50000)]])  # acked, not shipped
        newest = log._sb.copy_index()
    with open(p, "r+b") as f:  # a bit flip in the newest copy's head
        f.seek(newest * BLOCK + 70)
        x = f.read(1)
        f.seek(newest * BLOCK + 70)
        f.write(bytes([x[0] ^ 1]))
    with pytest.raises(LogCorruption, match=rf"superblock copy {newest}: superblock checksum mismatch — refused, "
                                             rf"so the scan used copy {1 - newest}"):
        ReplicationLog.open(p, readonly=True)
