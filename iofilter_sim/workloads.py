"""Workload generators: batches of writes for the disks of one protection domain.

A workload produces ``WriteBatch``es — numpy arrays of (disk index, offset, length, kind)
plus the concatenated payload — never seqs or timestamps: the filter assigns those when
it captures the writes. Kinds (``make_workload``):

- ``sequential`` — each disk written front to back, wrapping at its end.
- ``random``     — uniform offsets over each disk.
- ``zipf``       — hot spots: each disk cut into regions whose popularity follows a
  truncated Zipf law, the hottest regions scattered over the disk.
- ``database``   — 4..16 KiB random page writes, plus a sequential log stream on one
  disk (``log_disk``, default the last; a lone disk keeps its last eighth for it).
- ``burst``      — random writes in on/off periods (``on_s`` busy, ``off_s`` silent).

The contract every workload keeps (``trace.TraceWorkload`` too):

- ``next_batch(max_writes, max_bytes)``: at most ``max_writes`` writes (and never more
  than 65 536, a frame's limit) whose lengths sum to at most ``max_bytes``. Every write
  is 512-aligned, 512 B .. ``WRITE_SIZE_MAX``, and inside its disk. It never sleeps; if
  ``max_bytes >= WRITE_SIZE_MAX`` and the workload is not done, the batch is not empty.
- ``paced_batch(max_writes, max_bytes)``: the same, capped by what the pacer lets
  through now; empty when nothing is due. ``delay_s()`` says how long until something
  is; the caller sleeps (``await asyncio.sleep``), the workload never does.
- ``done``: True once a finite workload (``total_bytes``, a trace) has nothing left.

A loop that drives one::

    while not workload.done:
        batch = workload.paced_batch(4096, 16 << 20)
        if batch.count == 0:
            await asyncio.sleep(workload.delay_s())
            continue
        capture(batch)

Rates are in MB/s of 10**6 bytes (``rate_mb_s``) and writes per second (``iops``);
``ZERO`` writes count their length like any other write.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cdp.errors import ConfigError
from cdp.records import KIND_WRITE, KIND_ZERO, SECTOR, empty_records
from iofilter_sim.payloads import (
    DATABASE_PAGE_SIZES, DEFAULT_SIZES, STYLES, WRITE_SIZE_MAX, KiB, PayloadSource, SizeDist,
    parse_size, parse_write_size,
)

BATCH_WRITES_MAX = 65536  # a frame holds at most 65 536 records (FORMAT.md §2.1)
MB = 10**6
_ZIPF_REGIONS_MAX = 65536  # bounds the per-disk popularity tables to 1 MiB


class Pacer:
    """How many writes and bytes may be issued now to hold a target rate.

    Two token buckets, bytes (``rate_bytes_s``) and writes (``iops``); a rate left None is
    unlimited. Tokens accrue with the clock up to ``burst_s`` worth of rate. A caller may
    overdraw by ``slack_bytes`` and one write — so a write bigger than the tokens is
    never starved — and then nothing passes until the bucket is back at zero. With
    ``on_off_s = (on, off)``, tokens accrue and writes pass only during the first ``on``
    seconds of every ``on + off``, counted from the first call.

    Invariant: what was consumed up to any time is at most rate × on-time so far + slack.
    The pacer never sleeps: ``delay_s()`` tells the caller how long to.
    """

    UNLIMITED = 1 << 62
    DELAY_MIN_S = 0.001  # float rounding must not turn a wait into a busy loop

    def __init__(self, *, rate_bytes_s: float | None = None, iops: float | None = None,
                 clock: Callable[[], float] = time.monotonic, burst_s: float = 0.1,
                 slack_bytes: int = WRITE_SIZE_MAX,
                 on_off_s: tuple[float, float] | None = None) -> None:
        self._rates = (rate_bytes_s, iops)
        self._slack = (slack_bytes, 1)
        self._tokens = [0.0, 0.0]
        self._burst_s = burst_s
        self._clock = clock
        self._on_off = on_off_s
        self._t0: float | None = None
        self._on_seen = 0.0  # on-time at the last refill

    def _on_time(self, now: float) -> float:
        """Seconds of on-time from the first call to ``now``."""
        assert self._t0 is not None
        elapsed = now - self._t0
        if self._on_off is None:
            return elapsed
        on, off = self._on_off
        periods, phase = divmod(elapsed, on + off)
        return periods * on + min(phase, on)

    def _wall_at(self, on_time: float) -> float:
        """The wall time at which the on-time reaches ``on_time`` (in an on window)."""
        assert self._t0 is not None
        if self._on_off is None:
            return self._t0 + on_time
        on, off = self._on_off
        periods, rest = divmod(on_time, on)
        return self._t0 + periods * (on + off) + rest

    def _refill(self) -> tuple[float, bool]:
        now = self._clock()
        if self._t0 is None:
            self._t0 = now
        on_time = self._on_time(now)
        dt, self._on_seen = on_time - self._on_seen, on_time
        for i, rate in enumerate(self._rates):
            if rate is not None:
                self._tokens[i] = min(self._tokens[i] + dt * rate, rate * self._burst_s)
        is_on = self._on_off is None or (now - self._t0) % sum(self._on_off) < self._on_off[0]
        return now, is_on

    def allowance(self) -> tuple[int, int]:
        """(writes, bytes) that may be issued now; (0, 0) when nothing may."""
        _, is_on = self._refill()
        if not is_on or any(r is not None and t < 0 for r, t in zip(self._rates, self._tokens)):
            return 0, 0
        nbytes, writes = (
            self.UNLIMITED if rate is None else int(tokens) + slack
            for rate, tokens, slack in zip(self._rates, self._tokens, self._slack)
        )
        return writes, nbytes

    def consume(self, writes: int, nbytes: int) -> None:
        """Account for what was issued (at most the last ``allowance()``)."""
        self._tokens[0] -= nbytes
        self._tokens[1] -= writes

    def delay_s(self) -> float:
        """Seconds until ``allowance()`` lets something through (0: now)."""
        now, is_on = self._refill()
        need_s = max([-t / r for r, t in zip(self._rates, self._tokens) if r is not None and t < 0],
                     default=0.0)
        if need_s > 0:
            return max(self._wall_at(self._on_seen + need_s) - now, self.DELAY_MIN_S)
        if not is_on:
            assert self._on_off is not None and self._t0 is not None
            period = sum(self._on_off)
            next_on = self._t0 + ((now - self._t0) // period + 1) * period
            return max(next_on - now, self.DELAY_MIN_S)
        return 0.0


@dataclass(frozen=True, eq=False)
class WriteBatch:
    """Writes of one domain in issue order — the order the filter captures them.

    Invariants: the four arrays have one entry per write; ``kind`` is ``KIND_WRITE`` or
    ``KIND_ZERO``; ``payload`` is the ``WRITE`` payloads concatenated in order (a ``ZERO``
    carries none), so ``len(payload) == length[kind == KIND_WRITE].sum()``.
    """

    disk: np.ndarray  # u32, disk index inside the domain
    offset: np.ndarray  # u64, bytes, multiple of 512
    length: np.ndarray  # u32, bytes, multiple of 512
    kind: np.ndarray  # u16
    payload: bytes

    @staticmethod
    def empty() -> WriteBatch:
        return WriteBatch(
            np.zeros(0, np.uint32), np.zeros(0, np.uint64), np.zeros(0, np.uint32),
            np.zeros(0, np.uint16), b"",
        )

    @property
    def count(self) -> int:
        return len(self.length)

    @property
    def nbytes(self) -> int:
        """Bytes written, ``ZERO`` writes included."""
        return int(self.length.sum(dtype=np.uint64))

    def to_records(self) -> np.ndarray:
        """A ``RECORD_DTYPE`` array of these writes; seq and timestamp_ns are left 0."""
        records = empty_records(self.count)
        records["disk"] = self.disk
        records["offset"] = self.offset
        records["length"] = self.length
        records["kind"] = self.kind
        return records


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _advance(cursor: int, lo: int, hi: int, length: np.ndarray) -> tuple[np.ndarray, int]:
    """Place writes back to back from ``cursor`` inside [lo, hi), wrapping to ``lo``.

    A write that would cross ``hi`` is cut there (``length`` is shortened in place);
    every length must be <= hi - lo. Returns the offsets and the new cursor.
    """
    offset = np.empty(len(length), dtype=np.int64)
    i = 0
    while i < len(length):
        ends = cursor + np.cumsum(length[i:])
        k = int(np.searchsorted(ends, hi, side="right"))  # writes i .. i+k-1 fit whole
        offset[i : i + k] = ends[:k] - length[i : i + k]
        cursor = int(ends[k - 1]) if k else cursor
        i += k
        if i < len(length):
            if cursor < hi:
                offset[i], length[i] = cursor, hi - cursor
                i += 1
            cursor = lo
    return offset, cursor


def _uniform(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, length: np.ndarray,
             size: np.ndarray) -> np.ndarray:
    """Offsets uniform in [lo, hi - length], or the nearest window of the disk when the
    write is longer than the region; aligned to gcd(length, 4 KiB) from ``lo`` (guest
    file systems place 4 KiB blocks on 4 KiB boundaries)."""
    hi = np.maximum(hi, np.minimum(lo + length, size))
    lo = np.minimum(lo, hi - length)
    align = np.gcd(length, 4096)
    return lo + rng.integers(0, (hi - lo - length) // align + 1) * align


class Workload:
    """Base of the generators: draws sizes and disks, cuts to the limits, adds payloads.

    Subclasses choose disks and lengths (``_draw``) and offsets (``_place``); ``_place``
    may shorten a length, never lengthen it. Invariant: every write returned lies in
    [0, disk size) and is 512-aligned.
    """

    kind = ""

    def __init__(self, disk_sizes: Sequence[int], *, seed: int, sizes: SizeDist,
                 payloads: PayloadSource, trim_share: float, pacer: Pacer,
                 total_bytes: int | None) -> None:
        self.disk_sizes = np.asarray(disk_sizes, dtype=np.int64)
        self.sizes = sizes
        self.trim_share = trim_share
        self.pacer = pacer
        self._payloads = payloads
        self._rng = np.random.default_rng([seed, 0x3A7])
        self._left_bytes = total_bytes
        self._mean_bytes = sizes.mean

    @property
    def done(self) -> bool:
        """True once ``total_bytes`` have been handed out (never without a total)."""
        return self._left_bytes is not None and self._left_bytes < SECTOR

    def _draw(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        disk = self._rng.integers(0, len(self.disk_sizes), n)
        length = np.minimum(self.sizes.sample(self._rng, n), self.disk_sizes[disk])
        return disk, length, None

    def _place(self, disk: np.ndarray, length: np.ndarray, tag: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def next_batch(self, max_writes: int, max_bytes: int) -> WriteBatch:
        """The next writes, within both limits (see the module docstring); never waits."""
        max_writes = min(int(max_writes), BATCH_WRITES_MAX)
        left = self._left_bytes
        last = left is not None and left <= max_bytes
        if left is not None and last:
            max_bytes = left
        # Enough draws to fill max_bytes on average; a short batch is allowed.
        n = min(max_writes, int(max_bytes / self._mean_bytes * 1.25) + 8)
        if n <= 0 or max_bytes < SECTOR:
            return WriteBatch.empty()
        disk, length, tag = self._draw(n)
        ends = np.cumsum(length)
        k = int(np.searchsorted(ends, max_bytes, side="right"))
        rest = max_bytes - (int(ends[k - 1]) if k else 0)
        if last and k < n and rest >= SECTOR:
            # The workload's final write is cut to what is left, so the workload ends.
            length[k] = rest
            k += 1
        disk, length = disk[:k], length[:k]
        offset = self._place(disk, length, None if tag is None else tag[:k])
        kind = np.where(self._rng.random(k) < self.trim_share, KIND_ZERO, KIND_WRITE)
        payload = self._payloads.batch(length[kind == KIND_WRITE])
        if self._left_bytes is not None:
            self._left_bytes -= int(length.sum())
        return WriteBatch(disk.astype(np.uint32), offset.astype(np.uint64),
                          length.astype(np.uint32), kind.astype(np.uint16), payload)

    def paced_batch(self, max_writes: int, max_bytes: int) -> WriteBatch:
        """``next_batch`` within what the pacer lets through now (maybe nothing)."""
        writes, nbytes = self.pacer.allowance()
        batch = self.next_batch(min(max_writes, writes), min(max_bytes, nbytes))
        self.pacer.consume(batch.count, batch.nbytes)
        return batch

    def delay_s(self) -> float:
        """Seconds the caller should sleep before ``paced_batch`` has something."""
        return 0.0 if self.done else self.pacer.delay_s()


class SequentialWorkload(Workload):
    """Each disk written front to back from offset 0, wrapping at its end."""

    kind = "sequential"

    def __init__(self, disk_sizes: Sequence[int], **common: Any) -> None:
        super().__init__(disk_sizes, **common)
        self._cursor = [0] * len(self.disk_sizes)

    def _place(self, disk: np.ndarray, length: np.ndarray, tag: np.ndarray | None) -> np.ndarray:
        offset = np.empty(len(disk), dtype=np.int64)
        for d in np.unique(disk).tolist():
            sel = np.flatnonzero(disk == d)
            part = length[sel]
            end = int(self.disk_sizes[d])
            offset[sel], self._cursor[d] = _advance(self._cursor[d], 0, end, part)
            length[sel] = part
        return offset


class RandomWorkload(Workload):
    """Uniform offsets over each disk."""

    kind = "random"

    def _place(self, disk: np.ndarray, length: np.ndarray, tag: np.ndarray | None) -> np.ndarray:
        size = self.disk_sizes[disk]
        return _uniform(self._rng, np.zeros_like(size), size, length, size)


class ZipfWorkload(Workload):
    """Hot spots: region popularity ∝ rank**-zipf_a, ranks shuffled over each disk's regions."""

    kind = "zipf"

    def __init__(self, disk_sizes: Sequence[int], *, zipf_a: float, region_bytes: int,
                 **common: Any) -> None:
        super().__init__(disk_sizes, **common)
        self._region_bytes: list[int] = []
        self._cdf: list[np.ndarray] = []
        self._perm: list[np.ndarray] = []
        for size in self.disk_sizes.tolist():
            regions = min(_ceil_div(size, region_bytes), _ZIPF_REGIONS_MAX)
            step = _ceil_div(_ceil_div(size, regions), SECTOR) * SECTOR
            regions = _ceil_div(size, step)
            cdf = np.cumsum(1.0 / np.arange(1, regions + 1) ** zipf_a)
            self._region_bytes.append(step)
            self._cdf.append(cdf / cdf[-1])
            self._perm.append(self._rng.permutation(regions))

    def _place(self, disk: np.ndarray, length: np.ndarray, tag: np.ndarray | None) -> np.ndarray:
        lo = np.empty(len(disk), dtype=np.int64)
        for d in np.unique(disk).tolist():
            sel = np.flatnonzero(disk == d)
            rank = np.searchsorted(self._cdf[d], self._rng.random(len(sel)), side="right")
            rank = np.minimum(rank, len(self._cdf[d]) - 1)
            lo[sel] = self._perm[d][rank] * self._region_bytes[d]
        size = self.disk_sizes[disk]
        step = np.asarray(self._region_bytes, dtype=np.int64)[disk]
        return _uniform(self._rng, lo, np.minimum(lo + step, size), length, size)


class DatabaseWorkload(Workload):
    """Random page writes (``sizes``, default 4..16 KiB) plus a sequential log stream.

    With two disks or more the log is disk ``log_disk`` (default: the last) and pages go
    to the others; a lone disk keeps its last eighth for the log. ``log_share`` of the
    writes are log writes.
    """

    kind = "database"

    def __init__(self, disk_sizes: Sequence[int], *, log_share: float,
                 log_write_size: SizeDist, log_disk: int | None, **common: Any) -> None:
        super().__init__(disk_sizes, **common)
        self.log_share = log_share
        self.log_sizes = log_write_size
        self._mean_bytes = (1 - log_share) * self.sizes.mean + log_share * log_write_size.mean
        count = len(self.disk_sizes)
        self._log_disk = count - 1 if log_disk is None else log_disk
        size = int(self.disk_sizes[self._log_disk])
        if count > 1:
            self._data_disks = np.array([d for d in range(count) if d != self._log_disk])
            self._data_end, self._log_lo = self.disk_sizes.copy(), 0
        else:
            self._data_disks = np.zeros(1, dtype=np.int64)
            self._log_lo = size * 7 // 8 // SECTOR * SECTOR
            # A disk too small to split (under 8 sectors) shares all of itself.
            self._data_end = np.array([self._log_lo or size], dtype=np.int64)
        self._log_cursor = self._log_lo

    def _draw(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        is_log = self._rng.random(n) < self.log_share
        data_disk = self._data_disks[self._rng.integers(0, len(self._data_disks), n)]
        disk = np.where(is_log, self._log_disk, data_disk)
        log_room = self.disk_sizes[self._log_disk] - self._log_lo
        room = np.where(is_log, log_room, self._data_end[disk])
        log_sizes, page_sizes = self.log_sizes.sample(self._rng, n), self.sizes.sample(self._rng, n)
        return disk, np.minimum(np.where(is_log, log_sizes, page_sizes), room), is_log

    def _place(self, disk: np.ndarray, length: np.ndarray, tag: np.ndarray | None) -> np.ndarray:
        assert tag is not None
        end = self._data_end[disk]
        offset = _uniform(self._rng, np.zeros_like(end), end, length, self.disk_sizes[disk])
        log = np.flatnonzero(tag)
        if len(log):
            part = length[log]
            offset[log], self._log_cursor = _advance(
                self._log_cursor, self._log_lo, int(self.disk_sizes[self._log_disk]), part)
            length[log] = part
        return offset


class BurstWorkload(RandomWorkload):
    """Random writes in bursts: the pacer lets writes through ``on_s`` out of every
    ``on_s + off_s`` seconds, at the configured rate (or unpaced) while on."""

    kind = "burst"


_KINDS: dict[str, type[Workload]] = {
    cls.kind: cls
    for cls in (SequentialWorkload, RandomWorkload, ZipfWorkload, DatabaseWorkload, BurstWorkload)
}
KINDS = tuple(_KINDS)


Check = Callable[[Any, str], Any]


def _number(lo: float, hi: float, *, integer: bool = False, lo_open: bool = False) -> Check:
    """A check for a number in [lo, hi] (or (lo, hi] when ``lo_open``)."""
    def check(value: Any, where: str) -> Any:
        ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
        if not ok or math.isnan(value) or not lo <= value <= hi or (lo_open and value == lo):
            what = "an integer" if integer else "a number"
            if hi == math.inf:
                bounds = f"{'>' if lo_open else '>='} {lo}"
            else:
                bounds = f"in {'(' if lo_open else '['}{lo}, {hi}]"
            raise ConfigError(f"{where}: expected {what} {bounds}, got {value!r}")
        return value
    return check


def _sector_size(value: Any, where: str) -> int:
    size = parse_size(value, where)
    if size < SECTOR or size % SECTOR:
        raise ConfigError(f"{where}: expected a multiple of 512 bytes, at least 512, got {value!r}")
    return size


def _style(value: Any, where: str) -> str:
    if value not in STYLES:
        raise ConfigError(f"{where}: expected one of {', '.join(STYLES)}, got {value!r}")
    return value


_POSITIVE = _number(0, math.inf, lo_open=True)
_SHARE = _number(0.0, 1.0)
# option -> (check, default); a default of None means "not set" and is not checked.
_COMMON_OPTIONS: dict[str, tuple[Check, Any]] = {
    "seed": (_number(0, 2**63 - 1, integer=True), 0),
    "write_size": (parse_write_size, None),
    "rate_mb_s": (_POSITIVE, None),
    "iops": (_POSITIVE, None),
    "payload": (_style, "text"),
    "zero_share": (_SHARE, 0.02),
    "trim_share": (_SHARE, 0.01),
    "total_bytes": (_sector_size, None),
}
_KIND_OPTIONS: dict[str, dict[str, tuple[Check, Any]]] = {
    "sequential": {},
    "random": {},
    "zipf": {"zipf_a": (_number(0, 10, lo_open=True), 1.2),
             "region_bytes": (_sector_size, 1 << 20)},
    "database": {"log_share": (_SHARE, 0.3),
                 "log_write_size": (parse_write_size, [SECTOR, 64 * KiB]),
                 "log_disk": (_number(0, 2**32 - 1, integer=True), None)},
    "burst": {"on_s": (_POSITIVE, 1.0), "off_s": (_POSITIVE, 4.0)},
}


def check_workload_options(kind: Any, options: Mapping[str, Any], where: str,
                           disk_count: int | None = None) -> dict[str, Any]:
    """Every option of a ``kind`` workload checked and defaulted; ConfigError names the key.

    With ``disk_count``, options that name a disk are checked against it too.
    """
    if kind not in _KINDS:
        raise ConfigError(f"{where}.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    table = {**_COMMON_OPTIONS, **_KIND_OPTIONS[kind]}
    unknown = sorted(set(options) - set(table))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: not an option of a {kind} workload "
                          f"(expected one of {', '.join(sorted(table))})")
    out: dict[str, Any] = {}
    for key, (check, default) in table.items():
        value = options.get(key, default)
        out[key] = value if value is None else check(value, f"{where}.{key}")
    log_disk = out.get("log_disk")
    if disk_count is not None and log_disk is not None and log_disk >= disk_count:
        raise ConfigError(f"{where}.log_disk: expected a disk index in 0..{disk_count - 1}, "
                          f"got {log_disk!r}")
    return out


def make_workload(kind: str, disk_sizes: Sequence[int], *,
                  clock: Callable[[], float] = time.monotonic, where: str = "workload",
                  **options: Any) -> Workload:
    """A workload of ``kind`` over disks of these sizes (bytes, multiples of 512).

    Options (all optional): ``seed`` (0), ``write_size`` (see ``parse_write_size``; for
    ``database`` the page sizes, default 4..16 KiB), ``rate_mb_s`` and/or ``iops``
    (unpaced when neither), ``payload`` style ("text"), ``zero_share`` of all-zero
    payloads (0.02), ``trim_share`` of ``ZERO`` writes (0.01), ``total_bytes`` (unbounded).
    zipf: ``zipf_a`` (1.2), ``region_bytes`` (1 MiB). database: ``log_share`` (0.3),
    ``log_write_size`` ([512, 64 KiB]), ``log_disk`` (the last disk).
    burst: ``on_s`` (1.0), ``off_s`` (4.0).
    """
    opts = check_workload_options(kind, options, where, len(disk_sizes))
    if not len(disk_sizes):
        raise ConfigError(f"{where}: expected at least one disk, got none")
    for i, size in enumerate(disk_sizes):
        if not isinstance(size, (int, np.integer)) or size < SECTOR or size % SECTOR:
            raise ConfigError(f"{where}: disk {i}: expected a size that is a multiple of 512 "
                              f"and > 0, got {size!r}")
    default_sizes = DATABASE_PAGE_SIZES if kind == "database" else DEFAULT_SIZES
    rate_mb_s = opts.pop("rate_mb_s")
    pacer = Pacer(rate_bytes_s=None if rate_mb_s is None else rate_mb_s * MB,
                  iops=opts.pop("iops"), clock=clock,
                  on_off_s=(opts.pop("on_s"), opts.pop("off_s")) if kind == "burst" else None)
    seed = opts.pop("seed")
    payloads = PayloadSource(opts.pop("payload"), seed=seed, zero_share=opts.pop("zero_share"))
    return _KINDS[kind](
        disk_sizes, seed=seed, sizes=opts.pop("write_size") or default_sizes, payloads=payloads,
        trim_share=opts.pop("trim_share"), pacer=pacer, total_bytes=opts.pop("total_bytes"),
        **opts,
    )
