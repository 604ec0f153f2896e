"""Ingest: filter -> DRVA (a separate process) -> file store, with durable acks.

Phases, each on the same DRVA: 64 KiB random writes as fast as acks allow
(``mb_per_s_64k``), 4 KiB random writes likewise (``writes_per_s_4k``) — in turns with
the same load on a second domain whose filter keeps dirty-region maps
(``writes_per_s_4k_dirty_map``; ``dirty_map_4k_ratio`` = with over without, the median of
8 blocks of ABBA turns, 4 with ``--quick``, ``dirty_map_4k_block_ratios``) — then a steady
100 MB/s of 64 KiB writes with a 1 s seal age, sampling the DRVA's RPO lag from 1 s on
(``rpo_p50_s``, ``rpo_p99_s``; ``rpo_series``: [seconds, lag] of each sample).
``ack_p50_ms``/``ack_p99_ms``: capture-to-ack time of each captured batch during the
throughput phases. ``drva_rss_mb_max``: the DRVA's peak
RSS. ``encrypted_ratio``: the 64 KiB phase again on two fresh DRVAs, one with a plain
store and one with a store key (every object sealed, FORMAT.md §19), in turns; encrypted
MB/s over plain MB/s (``mb_per_s_64k_plain``, ``mb_per_s_64k_encrypted``: the medians of
their turns).

**Where the time goes, and the ceiling.** Before the DRVA starts, each stage it performs
is measured bare on the same bytes (``benchmarks._stages``: socket receive, frame
validation, log write + fdatasync, lz4, segment write to the file store, catalog
commit): ``stages[name].bare_cpu_s_per_gb``. Then rounds, in alternating order, of

- the raw durable append of ``benchmarks.log_append`` (``os.write`` + ``fdatasync`` every
  16 MiB) on the same file system (``raw_mb_per_s``, the median of the rounds);
- a **DRVA-only** ingest: ``benchmarks._sender`` in its own process replays pre-built
  frames of 64 KiB writes (no payload generation, no primary disk) on a domain of its
  own (``drva_only_mb_per_s``), with the DRVA's CPU seconds per GB from its
  ``/proc/PID/stat`` (drained before and after: receiving, logging, sealing, uploading
  and committing those bytes; ``drva_cpu_s_per_gb``);
- the end-to-end 64 KiB phase above (``mb_per_s_64k``);
- a DRVA-only ingest of 4 KiB writes (``drva_only_writes_per_s_4k``).

The log and the segments are both written to the same disk, so the ceiling of a
file-store DRVA is ``raw_mb_per_s / (1 + 1 / compression_ratio)`` (``ceiling_mb_per_s``;
the compression ratio is lz4's on the sender's bytes). ``ratio_vs_ceiling`` (DRVA-only
over the ceiling), ``e2e_vs_drva_only`` and ``ratio_vs_raw`` (end to end over raw) are
medians of the rounds' own ratios. ``cpu_vs_bare``: ``drva_cpu_s_per_gb`` over the sum of
the bare stages. That sum also bounds the DRVA by CPU: no ingest can beat this machine's
cores spent on the bare stages alone, ``cpu_ceiling_mb_per_s`` = cores × 1000 /
``bare_cpu_s_per_gb`` (``cores``: the CPUs this process may run on), and
``ratio_vs_cpu_ceiling`` is DRVA-only over it; ``ceiling_bound`` says which of the two
ceilings is the lower. The DRVA's CPU per stage (``stages[name].drva_cpu_s_per_gb``) is its
total split by a py-spy sample of one more DRVA-only run (``cpu_attribution``: the
shares; stacks with no Python frame below the event loop — uvloop's own recv, send and
polling — count as socket receive; ``segment_build`` is the build's work beside lz4:
gathering payloads, zero detection, the index). Without py-spy only the total is given.

Durable figures on tmpfs would measure memory, not a disk: the benchmark refuses to run
there (``--dir`` on a disk). ``--smoke`` runs every phase for a fraction of a second:
for the CI test of the fields, not for figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks._common import emit, progress, stop_process, work_dir
from benchmarks._profile import profile_run
from benchmarks._sender import POOL_BYTES, SenderProc, frame_pool
from benchmarks._stages import GB, STAGES, bare_stages, cpu_s, fs_type, median
from benchmarks.log_append import run_raw
from cdp.dirtymap import DirtyMap
from cdp.durable import preallocate
from cdp.layout import parse_segment_key
from cdp.testing.drva_config import SECRET, domain_doc, drva_doc, free_port, write_toml
from iofilter_sim.client import FilterClient
from iofilter_sim.disks import PrimaryDisk
from iofilter_sim.filter import DomainFilter
from iofilter_sim.payloads import PayloadSource

DISK_BYTES = 1 << 30
INFLIGHT_BYTES = 48 << 20
ROOT = Path(__file__).resolve().parent.parent


class Load:
    """Captures random writes of one size into a filter, bounded by unacked bytes."""

    def __init__(self, f: DomainFilter, write_bytes: int, seed: int) -> None:
        self.f = f
        self.write_bytes = write_bytes
        self.rng = np.random.default_rng(seed)
        self.payloads = PayloadSource("mixed", seed=seed, zero_share=0.0)
        self.pending: list[tuple[int, float]] = []  # (last seq of a batch, capture time)
        self.ack_ms: list[float] = []
        real_on_ack = f.on_ack

        def on_ack(durable: int) -> None:
            real_on_ack(durable)
            now = time.perf_counter()
            while self.pending and self.pending[0][0] <= durable:
                self.ack_ms.append((now - self.pending.pop(0)[1]) * 1e3)
        f.on_ack = on_ack

    def make(self, n: int) -> tuple[np.ndarray, np.ndarray, bytes]:
        """The next batch of ``n`` random writes: offsets, lengths, payload."""
        slots = DISK_BYTES // self.write_bytes
        offset = (self.rng.integers(0, slots, n) * self.write_bytes).astype(np.uint64)
        length = np.full(n, self.write_bytes, dtype=np.uint32)
        return offset, length, self.payloads.batch(length)

    async def capture(self, batch: tuple[np.ndarray, np.ndarray, bytes]) -> int:
        offset, length, payload = batch
        n = len(offset)
        await self.f.capture_async(np.zeros(n, np.uint32), offset, length, np.zeros(n, np.uint16), payload)
        self.pending.append((self.f.next_seq - 1, time.perf_counter()))
        return n * self.write_bytes

    async def run_until_acked(self, seconds: float, batch_writes: int) -> float:
        """Capture for ``seconds``, then wait for every captured write's ack; acked bytes
        per second over the whole time."""
        f = self.f
        acked0 = f.acked_seq
        t0 = time.perf_counter()
        await self.run(seconds, batch_writes)
        deadline = time.monotonic() + 120
        while f.acked_seq < f.next_seq - 1:
            if time.monotonic() > deadline:
                raise TimeoutError(f"domain {f.domain}: writes up to seq {f.next_seq - 1} not acked after 120 s")
            await asyncio.sleep(0.0005)
        return (f.acked_seq - acked0) * self.write_bytes / (time.perf_counter() - t0)

    async def run(self, seconds: float, batch_writes: int, rate_bytes_s: float | None = None) -> tuple[float, int]:
        """Capture for ``seconds``; returns (elapsed, bytes acked in that time)."""
        f = self.f
        acked0 = f.acked_seq
        t0 = time.perf_counter()
        sent = 0
        # Like a VM with more than one write outstanding: the next batch is made while the
        # last one waits to be captured (a filter with dirty-region maps holds a batch
        # until its map is synced), and batches are captured in order.
        capturing: asyncio.Future | None = None
        try:
            while (now := time.perf_counter()) - t0 < seconds:
                if rate_bytes_s is not None and sent > rate_bytes_s * (now - t0):
                    await asyncio.sleep(0.002)
                    continue
                if f.buffered_bytes >= INFLIGHT_BYTES or f.mode != "normal":
                    await asyncio.sleep(0.0005)
                    continue
                batch = self.make(batch_writes)
                if capturing is not None:
                    sent += await capturing
                capturing = asyncio.ensure_future(self.capture(batch))
                await asyncio.sleep(0)
            if capturing is not None:
                sent += await capturing
        finally:
            if capturing is not None and not capturing.done():
                capturing.cancel()
        elapsed = time.perf_counter() - t0
        return elapsed, (f.acked_seq - acked0) * self.write_bytes


ONLY_64K, ONLY_4K = 3, 4  # the DRVA-only senders' domains


def start_drva(d: Path, port: int, env: dict[str, str] | None = None, *, log_size: str = "1GiB",
               seal_age_s: float = 1.0) -> tuple[subprocess.Popen, Path]:
    domains = [domain_doc(1, "bench", [("vm", "disk0", DISK_BYTES)]),
               domain_doc(2, "bench-map", [("vm2", "disk0", DISK_BYTES)]),
               domain_doc(ONLY_64K, "bench-only", [("vm3", "disk0", DISK_BYTES)]),
               domain_doc(ONLY_4K, "bench-only-4k", [("vm4", "disk0", DISK_BYTES)])]
    doc = drva_doc(d, "drva-bench", domains, port=port,
                   log_size=log_size, seal_bytes="16MiB", seal_age_s=seal_age_s, status_interval_s=0.2)
    cfg = write_toml(doc, d / "drva.toml")
    log = open(d / "drva.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "drva.daemon", "--config", str(cfg), "--log-level", "warning"],
                            cwd=ROOT, env={**os.environ, "CDP_SITE_SECRET": SECRET, **(env or {})},
                            stdout=log, stderr=log)
    return proc, Path(doc["state_dir"]) / "status.json"


async def drained(status: Path, f: DomainFilter | None, timeout_s: float = 120, *, domain: int = 1,
                  seq: int | None = None) -> None:
    """Wait until the DRVA has committed everything the filter captured (or up to
    ``seq``): between phases, so that one phase's backlog does not count against the next.
    Then drop the segments it committed (``drop_committed_segments``)."""
    want = f.next_seq - 1 if seq is None else seq
    deadline = time.monotonic() + timeout_s
    doc: dict = {}
    while time.monotonic() < deadline:
        try:
            doc = json.loads(status.read_text())
            if next(x for x in doc["domains"] if x["id"] == domain)["committed_seq"] >= want:
                await asyncio.to_thread(drop_committed_segments, doc)
                return
        except (OSError, ValueError, KeyError, StopIteration):
            pass
        await asyncio.sleep(0.05)
    dom = next((x for x in doc.get("domains", ()) if x.get("id") == domain), {})
    raise TimeoutError(f"the DRVA did not drain in {timeout_s:.0f} s: domain {domain} committed up to seq "
                       f"{dom.get('committed_seq')}, {want} wanted; its store errors: {doc.get('store_errors')} "
                       f"(last: {doc.get('last_store_error')})")


def drop_committed_segments(status_doc: dict) -> int:
    """Delete the segments the DRVA has committed (its status's ``committed_seq`` per
    domain) from its file store; bytes freed. Nothing here reads them back, and kept, a
    full run's (~95 GB received) filled a disk with 60 GB free: the DRVA's uploads failed
    until a drain timed out. The catalog still names them: the store is of no use for a
    recovery afterwards, and is not meant to be."""
    store = Path(status_doc["store"].removeprefix("file://"))
    committed = {x["id"]: x["committed_seq"] for x in status_doc["domains"]}
    freed = 0
    for path in store.glob("d/*/seg/*/*.seg"):
        domain, _, _, last_seq = parse_segment_key(path.relative_to(store).as_posix())
        if last_seq <= committed.get(domain, -1):
            try:
                freed += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                pass
    return freed


async def drva_only(sender: SenderProc, status: Path, pid: int, seconds: float) -> tuple[float, float]:
    """(MB/s acked, the DRVA's CPU seconds per GB) of one DRVA-only run, drained before
    and after so that its CPU covers exactly the bytes it sent, all the way to the store."""
    await drained(status, None, domain=sender.domain, seq=sender.last_seq)
    cpu0 = cpu_s(pid)
    r = await sender.run(seconds)
    await drained(status, None, domain=sender.domain, seq=sender.last_seq)
    cpu = cpu_s(pid) - cpu0
    return r["acked_bytes"] / r["elapsed_s"] / 1e6, cpu / (r["sent_bytes"] / GB)


async def profiled(sender: SenderProc, status: Path, pid: int, seconds: float, d: Path) -> dict[str, float] | None:
    """Shares of the DRVA's CPU by stage during one more DRVA-only run, drained before and
    after (``benchmarks._profile``), or None without py-spy."""
    await drained(status, None, domain=sender.domain, seq=sender.last_seq)

    async def run() -> None:
        await sender.run(seconds)
        await drained(status, None, domain=sender.domain, seq=sender.last_seq)
    return await profile_run(pid, run, d / "profile.txt", seconds + 30)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


#: RPO samples start this long after the load (at most a third of the phase): the steady
#: state, not the first seal. (The lag once counted from the newest write in the store, and
#: the first statuses after an idle phase measured the idle time: 1.46 s in one quick run
#: whose later samples were all under 0.4 s; drva.domain counts from the oldest pending
#: write now.)
RPO_SETTLE_S = 1.0


async def rpo_samples(status: Path, seconds: float, load: Load) -> list[tuple[float, float]]:
    """(seconds since the start, RPO lag) of domain 1 every 0.2 s, at 100 MB/s offered,
    from ``RPO_SETTLE_S`` on."""
    samples: list[tuple[float, float]] = []
    t0 = time.perf_counter()

    def take() -> None:
        try:
            doms = json.loads(status.read_text())["domains"]
            samples.append((time.perf_counter() - t0, next(x for x in doms if x["id"] == 1)["rpo_lag_s"]))
        except (OSError, ValueError, KeyError, StopIteration):
            pass  # between two rewrites of the status: the next sample

    async def sample() -> None:
        await asyncio.sleep(min(RPO_SETTLE_S, seconds / 3))
        while True:
            await asyncio.sleep(0.2)
            take()
    task = asyncio.create_task(sample())
    try:
        await load.run(seconds, 64, rate_bytes_s=100e6)
    finally:
        task.cancel()  # and wait for it: a task left pending is cancelled at exit, if ever
        await asyncio.gather(task, return_exceptions=True)
    # A short load (--smoke: 0.6 s) on a busy machine can end before the first sample:
    # the status right after the load is the sample then.
    deadline = time.perf_counter() + 5.0
    while not samples and time.perf_counter() < deadline:
        take()
        if not samples:
            await asyncio.sleep(0.05)
    if not samples:
        raise RuntimeError(f"{status}: no readable status within 5 s of the RPO load")
    return samples


async def connected(client: FilterClient, proc, d: Path) -> None:
    """Wait for the filter's first connection; the DRVA's log tail if it died first."""
    while not client.connected:
        if proc.poll() is not None:
            raise RuntimeError((d / "drva.log").read_text()[-2000:])
        await asyncio.sleep(0.05)


async def run_64k(d: Path, seconds: float, env: dict[str, str] | None = None) -> float:
    """MB/s of the 64 KiB phase on a fresh DRVA in ``d`` (its own log and store) run with
    ``env`` added to its environment; drained before it stops."""
    d.mkdir(parents=True)
    port = free_port()
    proc, status = start_drva(d, port, env)
    preallocate(d / "primary.img", DISK_BYTES)
    disk = PrimaryDisk(d / "primary.img", DISK_BYTES)
    f = DomainFilter(1, [disk], buffer_bytes_max=INFLIGHT_BYTES * 2)
    client = FilterClient([f], "127.0.0.1", port, SECRET.encode(), "bench")
    ctask = asyncio.create_task(client.run())
    try:
        await connected(client, proc, d)
        load = Load(f, 64 << 10, 1)
        await load.run(min(1.0, seconds), 64)  # warm up
        el, acked = await load.run(seconds, 64)
        await drained(status, f)
    finally:
        ctask.cancel()
        await asyncio.gather(ctask, return_exceptions=True)
        stop_process(proc)
        disk.close()
    (d / "primary.img").unlink()
    return acked / el / 1e6


async def encrypted_turns(d: Path, seconds: float, turns: int) -> tuple[float, float]:
    """(plain, encrypted) MB/s of the 64 KiB phase: medians of ``turns`` pairs, run in
    turns (A B B A ...) so that the machine's drift falls on both alike."""
    key = {"CDP_STORE_KEY": os.urandom(32).hex()}  # a fresh key, in this process only
    runs: dict[bool, list[float]] = {False: [], True: []}
    order = [False, True, True, False] * (-(-turns // 2))
    for i, sealed in enumerate(order[: 2 * turns]):
        runs[sealed].append(await run_64k(d / f"turn-{i}", seconds, key if sealed else None))
        shutil.rmtree(d / f"turn-{i}")
    return float(np.median(runs[False])), float(np.median(runs[True]))


#: Per mode: seconds of a throughput run, rounds of the interleaved phases, blocks of
#: 4 KiB ABBA turns, encrypted turns, bytes of each bare stage, 16 MiB batches of a raw round.
#: The smoke size also shrinks the DRVA's log (formatting writes it whole), its seal age
#: (each drain waits for it) and leaves the encrypted turns out (their fields are null).
#: Its runs last 1 s: in 0.3 s a run on a busy machine sometimes saw no ack at all
#: (mb_per_s_64k 0.0, 1 run in 4 here), and the first RPO sample came after the load.
MODES = {
    "full": {"seconds": 15.0, "rounds": 5, "blocks": 8, "turns": 4, "stage_bytes": 1 << 30, "raw_batches": 64},
    "quick": {"seconds": 5.0, "rounds": 3, "blocks": 4, "turns": 2, "stage_bytes": 256 << 20, "raw_batches": 16},
    "smoke": {"seconds": 1.0, "rounds": 1, "blocks": 1, "turns": 0, "stage_bytes": 16 << 20, "raw_batches": 2,
              "log_size": "160MiB", "seal_age_s": 0.2, "rpo_s": 0.6, "pool_bytes": 4 << 20, "warm_up": False,
              "raw_ring_bytes": 32 << 20},
}
RAW_RING_BYTES = 256 << 20  # the raw loop's circular file (the smoke size: raw_ring_bytes)


class _NoBar:
    def update(self, n: int) -> None:
        pass


_NO_BAR = _NoBar()


def refuse_tmpfs(d: Path) -> None:
    kind = fs_type(d)
    if kind in ("tmpfs", "ramfs"):
        sys.exit(f"benchmarks.ingest: {d} is on {kind}: durable figures there would measure memory, not a "
                 f"disk; refusing (give --dir on a disk)")


async def rounds_phase(m: dict, d: Path, load64: Load, only64: SenderProc, only4: SenderProc,
                       status: Path, pid: int) -> dict[str, list[float]]:
    """The interleaved rounds: raw append, DRVA-only 64 KiB, end-to-end 64 KiB, DRVA-only
    4 KiB, in alternating order (ABCD, DCBA, ...), so that drift falls on all alike."""
    raw_path = d / "raw"
    ring = m.get("raw_ring_bytes", RAW_RING_BYTES)
    # Zeros written first, as ReplicationLog.format does for the DRVA's log: appending into
    # fallocated (unwritten) extents costs the journal commits that the log no longer pays.
    with open(raw_path, "wb") as fh:
        for _ in range(ring // (8 << 20)):
            fh.write(bytes(8 << 20))
        os.fsync(fh.fileno())
    chunks = [payload for _, payload in frame_pool(64 << 10, m.get("pool_bytes", POOL_BYTES))]
    raw_bytes = m["raw_batches"] * 16 * len(chunks[0])
    got: dict[str, list[float]] = {k: [] for k in ("raw", "only", "only_cpu", "e2e", "only4")}
    seconds = m["seconds"]
    bar = progress(4 * m["rounds"], "interleaved rounds", unit="run")

    async def raw() -> None:
        el = await asyncio.to_thread(run_raw, raw_path, chunks, ring, m["raw_batches"], _NO_BAR)
        got["raw"].append(raw_bytes / el / 1e6)

    async def only() -> None:
        mb_s, cpu = await drva_only(only64, status, pid, seconds)
        got["only"].append(mb_s)
        got["only_cpu"].append(cpu)

    async def e2e() -> None:
        await drained(status, load64.f)
        el, acked = await load64.run(seconds, 64)
        got["e2e"].append(acked / el / 1e6)
        await drained(status, load64.f)

    async def only4k() -> None:
        await drained(status, None, domain=only4.domain, seq=only4.last_seq)
        r = await only4.run(seconds)
        got["only4"].append(r["writes"] / r["elapsed_s"])

    phases = [raw, only, e2e, only4k]
    for k in range(m["rounds"]):
        for phase in phases if k % 2 == 0 else phases[::-1]:
            await phase()
            bar.update(1)
    bar.close()
    raw_path.unlink()
    return got


_T0 = time.perf_counter()


def _trace(what: str) -> None:
    """With CDP_BENCH_TRACE set: when each phase ended, on stderr (where the time goes)."""
    if os.environ.get("CDP_BENCH_TRACE"):
        print(f"{time.perf_counter() - _T0:7.2f} s  {what}", file=sys.stderr, flush=True)


async def bench(d: Path, mode: str) -> dict:
    m = MODES[mode]
    seconds = m["seconds"]
    refuse_tmpfs(d)
    bar = progress(6, "bare stages", unit="stage")
    bare = await asyncio.to_thread(bare_stages, d / "stages", m["stage_bytes"], 16 << 20)
    bar.close()
    shutil.rmtree(d / "stages")
    _trace('stages done')
    port = free_port()
    proc, status = start_drva(d, port, log_size=m.get("log_size", "1GiB"), seal_age_s=m.get("seal_age_s", 1.0))
    # A thick-provisioned VM disk: writes into a sparse file cost block allocation on
    # the filter's side, which is the simulator's cost, not the replication path's.
    preallocate(d / "primary.img", DISK_BYTES)
    disk = PrimaryDisk(d / "primary.img", DISK_BYTES)
    f = DomainFilter(1, [disk], buffer_bytes_max=INFLIGHT_BYTES * 2)
    # The domain with dirty-region maps writes the same file, in turns with the first:
    # two files would differ in what the page cache and the file system hold of them.
    mapped_disk = PrimaryDisk(d / "primary.img", DISK_BYTES)
    mapped = DomainFilter(2, [mapped_disk], buffer_bytes_max=INFLIGHT_BYTES * 2,
                          dirty_maps=[DirtyMap.open(mapped_disk.path, DISK_BYTES, 2)])
    client = FilterClient([f, mapped], "127.0.0.1", port, SECRET.encode(), "bench")
    ctask = asyncio.create_task(client.run())
    senders: list[SenderProc] = []
    try:
        await connected(client, proc, d)
        _trace('filter connected')
        pool_bytes = m.get("pool_bytes", POOL_BYTES)
        only64 = SenderProc(port, ONLY_64K, 64 << 10, d, SECRET, pool_bytes, INFLIGHT_BYTES)
        only4 = SenderProc(port, ONLY_4K, 4 << 10, d, SECRET, pool_bytes, INFLIGHT_BYTES)
        senders += [only64, only4]
        await asyncio.gather(only64.ready(), only4.ready())
        _trace('senders ready')
        load64 = Load(f, 64 << 10, 1)
        if m.get("warm_up", True):  # each side
            await load64.run(1.0, 64)
            await only64.run(1.0)
            await only4.run(1.0)
        _trace('warm')
        load64.ack_ms.clear()
        rounds = await rounds_phase(m, d, load64, only64, only4, status, proc.pid)
        _trace('rounds')
        ack_ms = list(load64.ack_ms)
        shares = await profiled(only64, status, proc.pid, seconds, d)
        _trace('profiled')
        await drained(status, f)
        # 4 KiB without and with dirty-region maps, in turns (this machine's speed drifts):
        # blocks of ABBA (A without, B with: each side takes its turns early and late
        # alike), each turn timed until its last write is acked (so what is still in
        # flight at the end of a turn counts, for both sides alike). The ratio is the
        # median of the blocks' ratios: one turn caught by a stall elsewhere on the
        # machine moves a ratio of sums (0.70..1.33 across runs with 2 blocks of
        # 3.75 s turns), not the median of the blocks.
        load4, load4_map = Load(f, 4 << 10, 2), Load(mapped, 4 << 10, 2)
        blocks = m["blocks"]  # 8: block ratios spread 0.78..1.17 over two runs; a median of 4 moved 0.85..1.01
        turns: dict[str, list[float]] = {"A": [], "B": []}  # writes/s of each turn
        bar = progress(4 * blocks, "4 KiB writes, without and with dirty-region maps", unit="turn")
        for turn in "ABBA" * blocks:
            load = load4 if turn == "A" else load4_map
            turns[turn].append(await load.run_until_acked(seconds / 8, 1024) / (4 << 10))
            await drained(status, load.f, domain=load.f.domain)
            bar.update(1)
        bar.close()
        _trace('abba')
        writes_4k, writes_4k_map = float(np.mean(turns["A"])), float(np.mean(turns["B"]))
        block_ratios = [(turns["B"][2 * k] + turns["B"][2 * k + 1]) / (turns["A"][2 * k] + turns["A"][2 * k + 1])
                        for k in range(blocks)]
        dirty_map_ratio = float(np.median(block_ratios))
        map_syncs = mapped.stats["map_syncs"]
        ack_ms += load4.ack_ms
        rpo_series = await rpo_samples(status, m.get("rpo_s", seconds), Load(f, 64 << 10, 3))
        rpo = [lag for _, lag in rpo_series]
        _trace('rpo')
        rss = peak_rss_mb(proc.pid)
    finally:
        for s in senders:
            s.close()
        ctask.cancel()
        await asyncio.gather(ctask, return_exceptions=True)
        stop_process(proc)
        disk.close()
        mapped.close_maps()
        mapped_disk.close()
    _trace('stopped')
    (d / "primary.img").unlink()
    plain_64k = sealed_64k = None
    if m["turns"]:
        plain_64k, sealed_64k = await encrypted_turns(d / "encrypted", seconds, m["turns"])
    return figures(mode, bare, rounds, shares, {
        "writes_per_s_4k": round(writes_4k),
        "writes_per_s_4k_dirty_map": round(writes_4k_map),
        "dirty_map_4k_ratio": round(dirty_map_ratio, 3),
        "dirty_map_4k_block_ratios": [round(r, 3) for r in block_ratios],
        "dirty_map_syncs": map_syncs,
        "ack_p50_ms": round(float(np.percentile(ack_ms, 50)), 2),
        "ack_p99_ms": round(float(np.percentile(ack_ms, 99)), 2),
        "rpo_p50_s": round(float(np.percentile(rpo, 50)), 3),
        "rpo_p99_s": round(float(np.percentile(rpo, 99)), 3),
        "rpo_samples": len(rpo),
        "rpo_series": [[round(t, 2), round(lag, 3)] for t, lag in rpo_series],
        "drva_rss_mb_max": round(rss, 1),
        "mb_per_s_64k_plain": None if plain_64k is None else round(plain_64k, 1),
        "mb_per_s_64k_encrypted": None if sealed_64k is None else round(sealed_64k, 1),
        "encrypted_ratio": None if plain_64k is None else round(sealed_64k / plain_64k, 3),
    })


def figures(mode: str, bare: dict, rounds: dict[str, list[float]], shares: dict[str, float] | None,
            rest: dict) -> dict:
    """The result line: the rounds' medians and ratios, the stages, and ``rest``."""
    cr = bare["compression_ratio"]
    raw, only, e2e = rounds["raw"], rounds["only"], rounds["e2e"]
    ceiling = [r / (1 + 1 / cr) for r in raw]
    drva_cpu = median(rounds["only_cpu"])
    bare_cpu = bare["bare_cpu_s_per_gb"]
    bare_sum = sum(bare_cpu.values())
    cores = len(os.sched_getaffinity(0))
    cpu_ceiling = cores * 1000 / bare_sum
    stages = {name: {"bare_cpu_s_per_gb": round(bare_cpu.get(name, 0.0), 3),
                     "drva_cpu_s_per_gb": None if shares is None else round(drva_cpu * shares.get(name, 0.0), 3)}
              for name in (*STAGES, *(["segment_build", "other"] if shares is not None else []))}
    return {
        "benchmark": "ingest",
        "mb_per_s_64k": round(median(e2e), 1),
        "drva_only_mb_per_s": round(median(only), 1),
        "drva_only_writes_per_s_4k": round(median(rounds["only4"])),
        "e2e_vs_drva_only": round(median([a / b for a, b in zip(e2e, only)]), 3),
        "raw_mb_per_s": round(median(raw), 1),
        "ratio_vs_raw": round(median([a / b for a, b in zip(e2e, raw)]), 3),
        "compression_ratio": round(cr, 3),
        "ceiling_mb_per_s": round(median(ceiling), 1),
        "ratio_vs_ceiling": round(median([a / b for a, b in zip(only, ceiling)]), 3),
        "cores": cores,
        "cpu_ceiling_mb_per_s": round(cpu_ceiling, 1),
        "ratio_vs_cpu_ceiling": round(median(only) / cpu_ceiling, 3),
        "ceiling_bound": "cpu" if cpu_ceiling < median(ceiling) else "disk",
        "rounds": {k: [round(x, 3) for x in v] for k, v in rounds.items()},
        "stages": stages,
        "bare_cpu_s_per_gb": round(bare_sum, 3),
        "drva_cpu_s_per_gb": round(drva_cpu, 3),
        "cpu_vs_bare": round(drva_cpu / bare_sum, 3),
        "cpu_attribution": None if shares is None else {k: round(v, 3) for k, v in shares.items()},
        "bare_log_mb_per_s": round(bare["log_mb_per_s"], 1),
        **rest,
        "mode": mode,
        "quick": mode != "full",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="shorter runs, fewer rounds (minutes)")
    p.add_argument("--smoke", action="store_true", help="every phase for a fraction of a second: the CI test's "
                                                        "size, fields only, no meaningful figure")
    p.add_argument("--json", action="store_true", help="print only the JSON result line")
    p.add_argument("--dir", type=Path, default=None, help="directory for benchmark files (default: a temp dir)")
    args = p.parse_args()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    with work_dir(args) as d:
        result = asyncio.run(bench(Path(d), mode))
    st = result["stages"]
    emit(args, result, [
        ("64 KiB random writes, durable acks", f"{result['mb_per_s_64k']:,} MB/s end to end"),
        ("... DRVA only (pre-built frames)", f"{result['drva_only_mb_per_s']:,} MB/s "
                                             f"(end to end / DRVA only {result['e2e_vs_drva_only']})"),
        ("ceiling: raw / (1 + 1/compression)", f"{result['ceiling_mb_per_s']:,} MB/s = {result['raw_mb_per_s']:,} "
                                               f"/ (1 + 1/{result['compression_ratio']}): the log and the "
                                               f"segments are both written to this disk"),
        ("DRVA only / ceiling", f"{result['ratio_vs_ceiling']}"),
        ("CPU ceiling: cores / bare CPU per GB", f"{result['cpu_ceiling_mb_per_s']:,} MB/s = {result['cores']} "
                                                 f"cores / {result['bare_cpu_s_per_gb']} s/GB; DRVA only / it "
                                                 f"{result['ratio_vs_cpu_ceiling']} (the lower ceiling: "
                                                 f"{result['ceiling_bound']})"),
        ("4 KiB random writes, durable acks", f"{result['writes_per_s_4k']:,} writes/s end to end, "
                                              f"{result['drva_only_writes_per_s_4k']:,} DRVA only"),
        ("... with dirty-region maps", f"{result['writes_per_s_4k_dirty_map']:,} writes/s "
                                       f"(ratio {result['dirty_map_4k_ratio']})"),
        ("ack latency p50 / p99", f"{result['ack_p50_ms']} / {result['ack_p99_ms']} ms"),
        ("RPO lag p50 / p99 at 100 MB/s", f"{result['rpo_p50_s']} / {result['rpo_p99_s']} s"),
        ("DRVA peak RSS", f"{result['drva_rss_mb_max']} MiB"),
        ("raw write+fdatasync", f"{result['raw_mb_per_s']:,} MB/s (end to end / raw {result['ratio_vs_raw']})"),
        ("CPU s/GB: DRVA vs bare stages", f"{result['drva_cpu_s_per_gb']} vs {result['bare_cpu_s_per_gb']} "
                                          f"(ratio {result['cpu_vs_bare']})"),
        *((f"  {name}", f"DRVA {v['drva_cpu_s_per_gb']} vs bare {v['bare_cpu_s_per_gb']}") for name, v in st.items()),
        *([("64 KiB writes, sealed store", f"{result['mb_per_s_64k_encrypted']:,} MB/s vs "
                                           f"{result['mb_per_s_64k_plain']:,} plain (ratio {result['encrypted_ratio']})")]
          if result["encrypted_ratio"] is not None else []),
    ])


if __name__ == "__main__":
    main()
