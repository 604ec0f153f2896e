"""Primary disks against a bytearray model of the same disk."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from cdp.errors import ConfigError
from cdp.inventory import Disk
from cdp.records import KIND_MARK, KIND_RESYNC_BEGIN, KIND_WRITE, KIND_ZERO, empty_records
from iofilter_sim.disks import PrimaryDisk

SIZE = 1 << 20


def _random_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, bytes]:
    """WRITE/ZERO records (some overlapping, a sequential run, a MARK) and their payload."""
    records = empty_records(n)
    length = rng.integers(1, 65, n) * 512
    records["length"] = length
    records["offset"] = rng.integers(0, (SIZE - length) // 512 + 1) * 512
    records["kind"] = np.where(rng.random(n) < 0.2, KIND_ZERO, KIND_WRITE)
    # A run of writes that continue each other on the disk: one pwrite.
    records["offset"][5:10] = 4096 + np.concatenate(([0], np.cumsum(length[5:9])))
    records["kind"][5:10] = KIND_WRITE
    records["kind"][12], records["offset"][12], records["length"][12] = KIND_MARK, 0, 9
    records["kind"][13], records["offset"][13], records["length"][13] = KIND_RESYNC_BEGIN, 0, 0
    carries = (records["kind"] == KIND_WRITE) | (records["kind"] == KIND_MARK)
    payload = rng.integers(0, 256, int(records["length"][carries].sum()), dtype=np.uint8)
    return records, payload.tobytes()


def _apply_model(model: bytearray, records: np.ndarray, payload: bytes) -> None:
    at = 0
    for r in records:
        offset, length, kind = int(r["offset"]), int(r["length"]), int(r["kind"])
        if kind == KIND_WRITE:
            model[offset : offset + length] = payload[at : at + length]
        elif kind == KIND_ZERO:
            model[offset : offset + length] = bytes(length)
        if kind in (KIND_WRITE, KIND_MARK):
            at += length


@pytest.mark.parametrize("punch", [True, False], ids=["punch-hole", "write-zeros"])
def test_random_batches_match_model(tmp_path: Path, punch: bool) -> None:
    rng = np.random.default_rng(7)
    model = bytearray(SIZE)
    with PrimaryDisk(tmp_path / "d.img", SIZE, name="vm/d0") as disk:
        disk._punch = disk._punch and punch
        assert os.stat(disk.path).st_size == SIZE
        assert disk.sha256() == hashlib.sha256(model).hexdigest()
        for _ in range(5):
            records, payload = _random_batch(rng, 200)
            disk.write_batch(records, payload)
            _apply_model(model, records, payload)
        disk.fsync()
        assert disk.read(0, SIZE) == bytes(model)
        assert disk.read(4096 + 512, 1024) == bytes(model[4608:5632])
        assert disk.sha256() == hashlib.sha256(model).hexdigest()


def test_image_is_sparse_and_reopened(tmp_path: Path) -> None:
    path = tmp_path / "s.img"
    disk = PrimaryDisk(path, 64 << 20)
    assert os.stat(path).st_blocks * 512 < (1 << 20)  # ftruncate wrote no data blocks
    records, payload = empty_records(1), b"\xab" * 512
    records["offset"], records["length"] = 8192, 512
    disk.write_batch(records, payload)
    disk.close()
    disk.close()  # idempotent
    with PrimaryDisk(path, 64 << 20, create=False) as again:
        assert again.read(8192, 512) == payload
        assert again.read(0, 512) == bytes(512)
    with pytest.raises(ConfigError, match=r"s\.img is 67108864 bytes, expected 1048576"):
        PrimaryDisk(path, SIZE)
    with pytest.raises(ConfigError, match="cannot open"):
        PrimaryDisk(tmp_path / "none.img", SIZE, create=False)
    with pytest.raises(ConfigError, match="multiple of 512"):
        PrimaryDisk(tmp_path / "odd.img", 1000)


def test_for_disk_uses_the_cluster_disk(tmp_path: Path) -> None:
    spec = Disk("erp-db", "log", 4096, tmp_path / "state" / "erp-db-log.img")
    with PrimaryDisk.for_disk(spec) as disk:
        assert disk.name == "erp-db/log" and disk.size == 4096
        assert spec.image.exists()


@pytest.mark.parametrize("offset, length, what", [
    (SIZE - 512, 1024, "past the end of the disk"),
    (2**64 - 512, 512, "past the end of the disk"),
    (100, 512, "multiple of 512"),
    (0, 700, "multiple of 512"),
    (0, 0, "length not in"),
    (0, 4096, "past the end of the batch payload"),
])
def test_bad_record_is_refused_and_nothing_written(
        tmp_path: Path, offset: int, length: int, what: str) -> None:
    with PrimaryDisk(tmp_path / "d.img", SIZE, name="vm/d0") as disk:
        records = empty_records(2)
        records["offset"], records["length"] = [0, offset], [512, length]
        payload = b"\x01" * (512 + min(length, 1024))
        with pytest.raises(ValueError, match=rf"disk vm/d0 .*record 1 .*{what}"):
            disk.write_batch(records, payload)
        assert disk.read(0, 512) == bytes(512)


def test_read_outside_the_disk(tmp_path: Path) -> None:
    with PrimaryDisk(tmp_path / "d.img", SIZE, name="vm/d0") as disk:
        with pytest.raises(ValueError, match=r"disk vm/d0 .*not inside \[0, 1048576\)"):
            disk.read(SIZE - 512, 1024)
        with pytest.raises(ValueError):
            disk.zero(-512, 512)


def test_long_runs_go_down_in_bounded_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of writes longer than WRITE_PIECE_BYTES is cut into pieces of at most that
    (large page-cache folios make later small writes dear), and lands whole and in place."""
    from iofilter_sim import disks as disks_mod

    calls: list[tuple[int, int]] = []
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        calls.append((offset, len(data)))
        return real_pwrite(fd, data, offset)

    piece = disks_mod.WRITE_PIECE_BYTES
    run = 4 * piece + 3 * 512  # not a multiple of the piece: the last one is short
    records = empty_records(2)
    records["kind"] = KIND_WRITE
    half = piece + 512
    records["offset"] = [512, 512 + half]  # two records that continue each other: one run
    records["length"] = [half, run - half]
    payload = np.random.default_rng(3).integers(0, 256, run, dtype=np.uint8).tobytes()
    size = 8 * piece
    with PrimaryDisk(tmp_path / "d.img", size, name="vm/d0") as disk:
        monkeypatch.setattr(disks_mod.os, "pwrite", pwrite)
        disk.write_batch(records, payload)
        monkeypatch.undo()
        assert disk.read(0, size) == bytes(512) + payload + bytes(size - 512 - run)
    assert max(n for _, n in calls) == piece
    assert sum(n for _, n in calls) == run
    assert [o for o, _ in calls] == [512 + i * piece for i in range(len(calls))]
