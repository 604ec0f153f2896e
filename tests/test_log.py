"""Replication-log partition (docs/FORMAT.md §3): append, wrap, trim, and the corruption
rules of §3.5, one test per named rule."""

from __future__ import annotations


import pytest

from cdp.errors import ConfigError, LogCorruption, LogError, LogFull
from cdp.logfmt import BLOCK, DATA_START
from cdp.replog import ReplicationLog

SIZE = DATA_START + (2 << 20)  # a 2 MiB ring


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "replog"
    ReplicationLog.format(p, SIZE, label="drva-test")
    return p


def body(i: int, n: int = 3000) -> bytes:
    return (b"%08d" % i) * (n // 8)


def flip(path, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def phys(log_or_size, pos: int) -> int:
    return DATA_START + pos % (SIZE - DATA_START)


def test_append_reopen_read(path):
    with ReplicationLog.open(path) as log:
        assert log.label == "drva-test"
        p1 = log.append_batch([[body(1)], [body(2, 9000)]])
        p2 = log.append_batch([[b"ab", memoryview(b"cd"), bytearray(b"ef")]])
        assert p1 == [0, BLOCK] and p2 == [4 * BLOCK]
        assert log.read(4 * BLOCK) == b"abcdef"
    with ReplicationLog.open(path) as log:
        assert [(p, b) for p, b in log.entries()] == [
            (0, body(1)), (BLOCK, body(2, 9000)), (4 * BLOCK, b"abcdef")]
        assert log.epoch == 2


def test_direct_io_round_trip(path):
    with ReplicationLog.open(path, direct=True) as log:
        log.append_batch([[body(1, 5000)], [body(2, 100)]])
    with ReplicationLog.open(path, direct=True) as log:
        assert [b for _, b in log.entries()] == [body(1, 5000), body(2, 100)]


def test_log_full_writes_nothing_and_trim_frees(path):
    with ReplicationLog.open(path) as log:
        n = 0
        with pytest.raises(LogFull, match="free of"):
            while True:
                log.append_batch([[body(n, 60000)]])
                n += 1
        tail = log.tail
        with pytest.raises(LogFull):
            log.append_batch([[body(0, 60000)]])
        assert log.tail == tail
        second = log.next_position(log.head)
        log.trim(second)
        log.append_batch([[body(99, 60000)]])
    with ReplicationLog.open(path) as log:
        got = [b for _, b in log.entries()]
        assert got[-1] == body(99, 60000) and len(got) == n


def test_wraps_many_laps_with_pad_entries(path):
    expected = []
    with ReplicationLog.open(path) as log:
        for i in range(600):
            # Batches of several entries, so that lap ends fall inside a batch.
            batch = [[body(i * 10 + j, 7000 + 1000 * j)] for j in range(1 + i % 5)]
            pos = log.append_batch(batch)
            expected.extend(zip(pos, (b[0] for b in batch)))
            keep = [p for p, _ in expected if p >= log.tail - (1 << 20)]
            if keep and keep[0] > log.head:
                log.trim(keep[0])
            expected = [(p, b) for p, b in expected if p >= log.head]
        assert log.tail > 4 * log.data_size  # several laps
    with ReplicationLog.open(path) as log:
        assert list(log.entries()) == expected


def test_trim_refuses_a_non_boundary(path):
    with ReplicationLog.open(path) as log:
        log.append_batch([[body(1, 9000)], [body(2)]])
        with pytest.raises(LogError, match="boundary"):
            log.trim(BLOCK)
        with pytest.raises(LogError, match="outside"):
            log.trim(log.tail + BLOCK)


def test_format_refuses_a_tiny_partition(tmp_path):
    with pytest.raises(ConfigError, match="at least"):
        ReplicationLog.format(tmp_path / "small", 100_000)


def test_missing_partition_is_a_clear_error(tmp_path):
    with pytest.raises(LogError, match="cannot open"):
        ReplicationLog.open(tmp_path / "absent")


# ---- FORMAT.md §3.5 corruption rules, by name ------------------------------------


def test_TornTailIsTruncatedQuietly(path):
    with ReplicationLog.open(path) as log:
        log.append_batch([[body(1)]])
        log.append_batch([[body(2)]])
        last = log.append_batch([[body(3, 20000)]])[0]
    # The last commit's second block never reached the disk.
    with open(path, "r+b") as f:
        f.seek(phys(None, last) + BLOCK)
        f.write(bytes(BLOCK))
    with ReplicationLog.open(path) as log:
        assert [b for _, b in log.entries()] == [body(1), body(2)]
        assert log.tail == last
        # and the log carries on from there
        log.append_batch([[body(4)]])
    with ReplicationLog.open(path) as log:
        assert [b for _, b in log.entries()] == [body(1), body(2), body(4)]


def test_DamagedEntryBeforeTailHintIsCorruption(path):
    with ReplicationLog.open(path) as log:
        log.append_batch([[body(1)], [body(2)]])
    ReplicationLog.open(path).close()  # this open records tail_hint = 2 blocks
    flip(path, phys(None, BLOCK) + 100)
    with pytest.raises(LogCorruption, match=r"position 4096 .*checksum.*durable data up to"):
        ReplicationLog.open(path)


def test_DamageFollowedByLaterCommitIsCorruption(path):
    with ReplicationLog.open(path) as log:
        log.append_batch([[body(1)]])
        mid = log.append_batch([[body(2)]])[0]
        log.append_batch([[body(3)]])
    flip(path, phys(None, mid) + 64 + 10)
    with pytest.raises(LogCorruption, match="damage in the middle"):
        ReplicationLog.open(path)


def test_DamagedHeaderFollowedByLaterCommitIsCorruption(path):
    with ReplicationLog.open(path) as log:
        mid = log.append_batch([[body(1)]])[0]
        log.append_batch([[body(2)]])
    flip(path, phys(None, mid) + 3)  # the magic itself
    with pytest.raises(LogCorruption, match="damage in the middle"):
        ReplicationLog.open(path)


def test_StaleEntryOfEarlierLapEndsLog(path):
    with ReplicationLog.open(path) as log:
        while log.tail < log.data_size - 8 * BLOCK:
            log.append_batch([[body(1, 5000)]])
        log.trim(log.tail)
        # The next lap starts with a PAD, then one entry; the rest of the ring holds
        # valid-looking entries of the first lap.
        log.append_batch([[body(2, 40000)]])
        log.append_batch([[body(3, 40000)]])
        assert log.tail > log.data_size
    with ReplicationLog.open(path) as log:
        assert [b for _, b in log.entries()] == [body(2, 40000), body(3, 40000)]


def test_TornSuperblockFallsBackToOtherCopy(path):
    with ReplicationLog.open(path) as log:
        positions = log.append_batch([[body(i)] for i in range(4)])
        log.trim(positions[2])
        gen_copy = log._sb.copy_index()
    flip(path, gen_copy * BLOCK + 70)  # the newest copy's head field
    with ReplicationLog.open(path) as log:
        # The previous copy is older: head before the trim, entries still intact.
        assert [b for _, b in log.entries()] == [body(i) for i in range(4)]


def test_both_superblocks_damaged_is_corruption(path):
    flip(path, 0)
    flip(path, BLOCK)
    with pytest.raises(LogCorruption, match="no valid superblock"):
        ReplicationLog.open(path)


def test_LeftoverOfEarlierEpochIsNotResurrected(path):
    with ReplicationLog.open(path) as log:
        first = log.append_batch([[body(1)], [body(2)], [body(3)]])
    flip(path, phys(None, first[0]) + 64 + 1)  # the commit is torn at its first entry
    with ReplicationLog.open(path) as log:
        assert list(log.entries()) == []
        assert log.append_batch([[body(9)]]) == [0]  # same stride: lands on entry 1 only
    # Entries 2 and 3 of the torn commit still lie right after, valid for their
    # positions, but of an earlier epoch: they must not come back.
    with ReplicationLog.open(path) as log:
        assert [b for _, b in log.entries()] == [body(9)]


def test_entries_of_an_earlier_format_are_refused(path):
    with ReplicationLog.open(path) as log:
        log.append_batch([[body(1)], [body(2)]])
    ReplicationLog.format(path, SIZE, force=True)
    # format cleared only the first block; the second entry is intact but foreign
    with ReplicationLog.open(path) as log:
        assert list(log.entries()) == []


def test_readonly_open_changes_nothing(path):
    with ReplicationLog.open(path) as log:
        log.append_batch([[body(1)]])
    before = path.read_bytes()
    with ReplicationLog.open(path, readonly=True) as log:
        assert [b for _, b in log.entries()] == [body(1)]
        with pytest.raises(LogError, match="read-only"):
            log.append_batch([[body(2)]])
    assert path.read_bytes() == before


def test_fits_predicts_append_batch(path):
    with ReplicationLog.open(path) as log:
        sizes = [60000] * 100
        k = log.fits(sizes)
        assert 0 < k < 100
        log.append_batch([[body(i, n)] for i, n in enumerate(sizes[:k])])
        assert log.fits([60000]) == 0
        with pytest.raises(LogFull):
            log.append_batch([[body(0, 60000)]])
