"""MSR Cambridge trace replay: mapping, alignment, fitting, splitting, payloads, pacing."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from cdp.errors import ConfigError
from iofilter_sim.payloads import trace_payload
from iofilter_sim.trace import TraceWorkload

MiB = 1 << 20
DISK = 4 * MiB
T0 = 128166372000000000  # filetime ticks (100 ns)

LINES = [
    f"{T0},hm,1,Read,4096,4096,100",  # 1: a read: ignored
    f"{T0 + 10000},hm,1,Write,1000,700,100",  # 2: write 0: (hm,1) -> disk 0, [512, 2048)
    "",  # 3: blank
    f"{T0 + 20000},src,0,Write,8192,4096,100",  # 4: write 1: (src,0) -> disk 1
    f"{T0 + 30000},hm,0,Write,513,1,100",  # 5: write 2: (hm,0) -> 2 % 2 = disk 0, [512, 1024)
    f"{T0 + 40000},src,0,Write,{DISK - 1024},4096,100",  # 6: write 3: crosses the end: cut
    f"{T0 + 50000},src,0,Write,{2 * DISK + 4096},512,100",  # 7: write 4: past the end
    f"{T0 + 60000},hm,1,Write,0,0,100",  # 8: write 5: zero bytes: dropped
    f"{T0 - 10000},src,0,Write,{MiB},{2 * MiB + MiB // 2},100",  # 9: write 6: 3 pieces
    f"{T0 + 70000},hm,1,Read,0,512,9",  # 10: a read
]
# (disk, offset, length, write number, offset inside the write's payload, due seconds)
EXPECTED = [
    (0, 512, 1536, 0, 0, 0.001),
    (1, 8192, 4096, 1, 0, 0.002),
    (0, 512, 512, 2, 0, 0.003),
    (1, DISK - 1024, 1024, 3, 0, 0.004),
    (1, MiB, MiB, 6, 0, 0.006),
    (1, 2 * MiB, MiB, 6, MiB, 0.006),
    (1, 3 * MiB, MiB // 2, 6, 2 * MiB, 0.006),
]


def write_trace(tmp_path: Path, lines: list[str], name: str = "t.csv") -> Path:
    path = tmp_path / name
    data = ("\n".join(lines) + "\n").encode()
    if name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def expected_payload(rows: list[tuple]) -> bytes:
    return b"".join(trace_payload(seq, po + n)[po:] for _, _, n, seq, po, *_ in rows)


def replay(wl: TraceWorkload, max_writes: int = 4096, max_bytes: int = 64 * MiB) -> list:
    out, payload = [], b""
    while not wl.done:
        batch = wl.next_batch(max_writes, max_bytes)
        assert batch.count > 0 and batch.count <= max_writes and batch.nbytes <= max_bytes
        out += zip(batch.disk.tolist(), batch.offset.tolist(), batch.length.tolist())
        payload += batch.payload
    return [out, payload]


def test_replays_the_expected_writes(tmp_path: Path) -> None:
    wl = TraceWorkload(write_trace(tmp_path, LINES), [DISK, DISK])
    writes, payload = replay(wl)
    assert writes == [row[:3] for row in EXPECTED]
    assert payload == expected_payload(EXPECTED)
    s = wl.stats
    assert (s.lines, s.reads, s.writes, s.beyond_end, s.empty, s.pieces) == (10, 2, 7, 1, 1, 7)
    assert wl.next_batch(10, MiB).count == 0 and wl.delay_s() == 0.0


@pytest.mark.parametrize("chunk, max_writes, max_bytes", [(1, 4096, 64 * MiB), (2, 1, MiB),
                                                          (3, 2, 3 * MiB)])
def test_chunking_and_limits_do_not_change_the_replay(
        tmp_path: Path, chunk: int, max_writes: int, max_bytes: int) -> None:
    path = write_trace(tmp_path, LINES)
    whole = replay(TraceWorkload(path, [DISK, DISK]))
    assert replay(TraceWorkload(path, [DISK, DISK], lines_per_batch=chunk),
                  max_writes, max_bytes) == whole


def test_wrap_fits_far_offsets_onto_the_disk(tmp_path: Path) -> None:
    wl = TraceWorkload(write_trace(tmp_path, LINES), [DISK, DISK], fit="wrap")
    writes, _ = replay(wl)
    assert (1, 4096, 512) in writes and wl.stats.beyond_end == 0
    assert len(writes) == len(EXPECTED) + 1


def test_disk_map_and_gzip(tmp_path: Path) -> None:
    path = write_trace(tmp_path, LINES, "t.csv.gz")
    wl = TraceWorkload(path, [DISK, DISK, DISK], disk_map={"hm:1": 2, ("src", 0): 0})
    writes, _ = replay(wl)
    assert [w[0] for w in writes] == [2, 0, 0, 0, 0, 0]  # (hm, 0) is not mapped
    assert wl.stats.unmapped == 1
    with pytest.raises(ConfigError, match="disk_map"):
        TraceWorkload(path, [DISK], disk_map={"hm:1": 1})
    with pytest.raises(ConfigError, match="disk_map key"):
        TraceWorkload(path, [DISK], disk_map={"hm": 0})


def test_header_line_is_skipped(tmp_path: Path) -> None:
    header = "Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime"
    wl = TraceWorkload(write_trace(tmp_path, [header] + LINES), [DISK, DISK])
    assert replay(wl)[0] == [row[:3] for row in EXPECTED]


def test_paced_at_the_trace_speed(tmp_path: Path) -> None:
    now = [50.0]
    wl = TraceWorkload(write_trace(tmp_path, LINES), [DISK, DISK], speed=2.0,
                       clock=lambda: now[0])
    released = []
    while not wl.done:
        batch = wl.paced_batch(4096, 64 * MiB)
        released += [now[0] - 50.0] * batch.count
        if batch.count == 0:
            delay = wl.delay_s()
            assert delay > 0
            now[0] += delay
    assert released == pytest.approx([row[5] / 2.0 for row in EXPECTED])


MALFORMED = [
    (f"{T0},hm,1,Write,4096,4096", "expected 7 comma-separated fields"),
    (f"{T0},hm,1,Write,abc,4096,1", r"Offset: expected an integer in 0..2\*\*62"),
    (f"{T0},hm,1,Write,0,-5,1", r"Size: expected an integer in 0..2\*\*62"),
    (f"{T0},hm,x,Write,0,512,1", r"DiskNumber: expected an integer in 0..2\*\*62"),
    ("later,hm,1,Write,0,512,1", r"Timestamp: expected an integer in 0..2\*\*62"),
    (f"{T0},hm,1,Erase,0,512,1", "Type: expected Read or Write"),
    (f"{T0},hm,1,Write,{2**62},512,1", r"Offset \+ Size: expected at most 2\*\*62"),
    (f"{T0},hm,1,Write,{2**63},512,1", r"Offset: expected an integer in 0..2\*\*62"),
    (f"{T0}, ,1,Write,0,512,1", "Hostname: expected a name"),
]


@pytest.mark.parametrize("bad, what", MALFORMED, ids=[m[1].split(":")[0] for m in MALFORMED])
def test_malformed_line_names_file_and_line(tmp_path: Path, bad: str, what: str) -> None:
    path = write_trace(tmp_path, LINES[:4] + [bad] + LINES[4:])
    with pytest.raises(ConfigError, match=rf"t\.csv:5: {what}"):
        replay(TraceWorkload(path, [DISK, DISK]))
    wl = TraceWorkload(path, [DISK, DISK], strict=False)
    writes, payload = replay(wl)
    assert writes == [row[:3] for row in EXPECTED] and payload == expected_payload(EXPECTED)
    assert wl.stats.malformed == 1


@pytest.mark.parametrize("kwargs, what", [
    ({"speed": 0}, "speed"), ({"fit": "squash"}, "fit"), ({"payload": "json"}, "payload"),
])
def test_bad_arguments(tmp_path: Path, kwargs: dict, what: str) -> None:
    with pytest.raises(ConfigError, match=what):
        TraceWorkload(write_trace(tmp_path, LINES), [DISK], **kwargs)
    with pytest.raises(ConfigError, match="cannot open"):
        TraceWorkload(tmp_path / "none.csv", [DISK])
    with pytest.raises(ConfigError, match="disk sizes"):
        TraceWorkload(write_trace(tmp_path, LINES), [1000])


def test_offsets_stay_on_disk_for_random_lines(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    n = 3000
    kinds = np.where(rng.random(n) < 0.7, "Write", "Read")
    lines = [f"{T0 + i},h{rng.integers(3)},{rng.integers(2)},{kinds[i]},"
             f"{rng.integers(0, 3 * DISK)},{rng.integers(0, 3 * MiB)},1" for i in range(n)]
    wl = TraceWorkload(write_trace(tmp_path, lines), [DISK, 2 * DISK], fit="wrap")
    while not wl.done:
        b = wl.next_batch(500, 16 * MiB)
        end = b.offset.astype(np.int64) + b.length
        assert (b.offset % 512 == 0).all() and (b.length % 512 == 0).all()
        assert (b.length >= 512).all() and (b.length <= MiB).all()
        assert (end <= np.array([DISK, 2 * DISK])[b.disk]).all()
