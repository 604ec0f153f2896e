"""History at scale: what the catalog costs as a domain's history grows (FORMAT.md §8).

Domains with 1 k, 100 k and 2.6 M one-second segments (30 days; ``--quick`` stops at
100 k) are built on the file store through the real ``CatalogWriter``: the history in
large deltas (16,384 segments each), which folds into exactly the pages a DRVA
committing one segment a second writes (folding depends only on the sequence of rows),
with the DRVA's collection of old generations; an hourly mark and a daily consolidation
base (catalog entries only: no manifest is read here). Segments are catalog rows only:
no segment object is written, so every figure is the catalog's own cost.

Then, interleaved (rounds alternate between the sizes, so a noisy machine hits them
alike): commits of one segment each through the writer, as a DRVA makes them (page
puts and snapshots included, the collection of old generations not — the DRVA runs it
off the commit path). Per size: ``commit_p50_ms``/``commit_p99_ms``; ``load_s`` (the
head: list, newest snapshot, deltas); ``points_s`` (``rocva.points.list_points``);
``plan_mid_s`` (load, resolve the middle seq, choose the bases, read the pages of the
window: the catalog's part of planning; reading the window's segment indexes grows with
the consolidation interval, not the history, and is ``benchmarks.recovery``'s);
``objects_listed`` by a load; ``catalog_bytes`` (generations and pages in the store);
``writer_rss_mb`` (a separate process: its peak RSS while it opens the writer and
commits, above its RSS after the imports). ``commit_p99_growth`` = p99 at the largest
size / p99 at the smallest. ``store_put_p50_ms``/``store_put_p99_ms``: a bare
conditional put of 2 KiB in the same rounds — the floor under any commit on this disk
(a put is a write, two fsyncs and a link).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import emit, parse_args, progress, work_dir
from cdp.catalog import CatalogState, CatalogWriter, collect_generations, load_catalog
from cdp.catalog_page import ROW_FIELDS
from cdp.layout import base_manifest_key, catalog_prefix, page_prefix
from cdp.store.base import ObjectStore
from cdp.store.fs import FileStore

SIZES_FULL = (1_000, 100_000, 2_592_000)
SIZES_QUICK = (1_000, 100_000)
SEQS_PER_SEGMENT = 100
SEGMENT_NS = 10**9
T0 = 1_700_000_000 * 10**9
BULK_ROWS = 16_384  # segments per bulk delta (64 level-0 pages)
MARK_EVERY = 3_600  # an hourly mark
BASE_EVERY = 86_400  # a daily consolidation
ROUNDS_FULL, ROUNDS_QUICK = 20, 8
COMMITS_PER_ROUND = 50
RSS_PROBE_COMMITS = 200
OWNER = "bench-site"
DISKS = [{"disk": 0, "vm": "vm", "name": "disk0", "size": 64 << 30}]


def segment_columns(first_index: int, n: int) -> dict[str, list[int]]:
    """``add_segments`` columns for segments ``first_index .. first_index + n - 1``."""
    i = np.arange(first_index, first_index + n, dtype=np.uint64)
    first = i * SEQS_PER_SEGMENT + 1
    cols = {"timeline": np.ones(n, np.uint64), "first_seq": first, "last_seq": first + SEQS_PER_SEGMENT - 1,
            "first_ts": T0 + i * SEGMENT_NS, "last_ts": T0 + i * SEGMENT_NS + 9 * SEGMENT_NS // 10,
            "size": np.full(n, 4 << 20, np.uint64), "payload_raw_len": np.full(n, 8 << 20, np.uint64)}
    cols["object_last_seq"] = cols["last_seq"]
    return {name: cols[name].tolist() for name in ROW_FIELDS}


def segment_delta(domain: int, first_index: int, n: int) -> dict[str, Any]:
    """A delta adding ``n`` segments, with the marks and bases due in them."""
    delta: dict[str, Any] = {"add_segments": segment_columns(first_index, n)}
    ends = [(k, (k + 1) * SEQS_PER_SEGMENT) for k in range(first_index, first_index + n)]
    marks = [{"name": f"hourly-{k // MARK_EVERY}", "seq": end, "ts": T0 + k * SEGMENT_NS + 9 * SEGMENT_NS // 10}
             for k, end in ends if k % MARK_EVERY == MARK_EVERY - 1]
    bases = [{"timeline": 1, "seq": end, "disk": 0, "key": base_manifest_key(domain, 1, end, 0),
              "origin": "consolidation"} for k, end in ends if k % BASE_EVERY == BASE_EVERY - 1]
    if marks:
        delta["add_marks"] = marks
    if bases:
        delta["add_bases"] = bases
    return delta


async def collect(store: ObjectStore, writer: CatalogWriter, done: dict[int, int]) -> None:
    """The DRVA's collection of old generations after each snapshot it writes."""
    domain = writer.state.domain_id
    if writer.snapshots_written > done.get(domain, 0):
        done[domain] = writer.snapshots_written
        await collect_generations(store, domain, writer.snapshots_written)


async def build(store: ObjectStore, domain: int, n: int, bar) -> None:
    writer = CatalogWriter(store, CatalogState.new(domain, f"history-{n}", T0, OWNER),
                           by="benchmarks.history", owner=OWNER)
    await writer.commit({"disks": DISKS})
    done: dict[int, int] = {}
    for i in range(0, n, BULK_ROWS):
        k = min(BULK_ROWS, n - i)
        await writer.commit(segment_delta(domain, i, k))
        await collect(store, writer, done)
        bar.update(k)


async def measure_commits(store: ObjectStore, sizes: dict[int, int], rounds: int, bar) -> dict[Any, list[float]]:
    """Interleaved rounds of one-segment commits; latencies in ms per size, and under
    ``"put"`` those of the bare conditional put of a small object (the floor of a commit
    on this store, measured in the same rounds)."""
    writers = {n: await CatalogWriter.open(store, d, by="benchmarks.history", owner=OWNER) for n, d in sizes.items()}
    lat: dict[Any, list[float]] = {n: [] for n in [*sizes, "put"]}
    done: dict[int, int] = {}
    order = [*sizes, "put"]
    body = os.urandom(2048)
    for r in range(rounds):
        for n in order[r % len(order):] + order[: r % len(order)]:
            for i in range(COMMITS_PER_ROUND):
                if n == "put":
                    t0 = time.perf_counter()
                    await store.put(f"bench/put/{r:04x}-{i:04x}", body, if_absent=True)
                    lat[n].append((time.perf_counter() - t0) * 1e3)
                    continue
                w = writers[n]
                delta = segment_delta(sizes[n], w.state.timeline().committed_seq // SEQS_PER_SEGMENT, 1)
                t0 = time.perf_counter()
                await w.commit(delta)
                lat[n].append((time.perf_counter() - t0) * 1e3)
                await collect(store, w, done)
            bar.update(COMMITS_PER_ROUND)
    return lat


async def timed(rounds: int, fn) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def measure_reads(store: ObjectStore, domain: int) -> dict[str, Any]:
    from rocva.plan import load_state, plan_rows
    from rocva.points import list_points
    from rocva.target import resolve_target

    stats: dict[str, int] = {}
    await load_catalog(store, domain, stats=stats)
    load_s = await timed(5, lambda: load_catalog(store, domain))
    points_s = await timed(3, lambda: list_points(store, domain))
    window: list[int] = []

    async def plan_mid() -> None:
        view = await load_state(store, domain)
        mid = view.committed_seq // 2
        target = await resolve_target(view, mid)
        _, _, rows = await plan_rows(view, target.seq)
        window[:] = [len(rows)]

    plan_mid_s = await timed(3, plan_mid)
    catalog_bytes = 0
    for prefix in (catalog_prefix(domain), page_prefix(domain)):
        async for info in store.list(prefix):
            catalog_bytes += info.size
    return {"load_s": round(load_s, 4), "points_s": round(points_s, 4), "plan_mid_s": round(plan_mid_s, 4),
            "plan_mid_window_segments": window[0], "objects_listed": stats["objects_listed"],
            "catalog_bytes": catalog_bytes}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


async def rss_probe(root: Path, domain: int) -> dict[str, float]:
    """In its own process: the writer's RSS (module docstring)."""
    store = FileStore(root)
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the imports' peak is not the writer's
    writer = await CatalogWriter.open(store, domain, by="benchmarks.history rss probe", owner=OWNER)
    for _ in range(RSS_PROBE_COMMITS):
        index = writer.state.timeline().committed_seq // SEQS_PER_SEGMENT
        await writer.commit(segment_delta(domain, index, 1))
    await load_catalog(store, domain)
    peak = _rss_kib("VmHWM")
    return {"writer_rss_mb": round((peak - before) / 1024, 1), "process_rss_mb": round(peak / 1024, 1)}


def run_rss_probe(root: Path, domain: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.history", "--rss-probe", str(root), str(domain)],
                         check=True, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


async def main_async(args) -> dict[str, Any]:
    sizes_list = SIZES_QUICK if args.quick else SIZES_FULL
    rounds = ROUNDS_QUICK if args.quick else ROUNDS_FULL
    with work_dir(args) as tmp:
        root = Path(tmp) / "store"
        store = FileStore(root)
        sizes = {n: i + 1 for i, n in enumerate(sizes_list)}  # size -> domain id
        t0 = time.perf_counter()
        with progress(sum(sizes_list), "build", unit="seg") as bar:
            for n, d in sizes.items():
                await build(store, d, n, bar)
        build_s = time.perf_counter() - t0
        with progress(rounds * COMMITS_PER_ROUND * (len(sizes) + 1), "commit", unit="commit") as bar:
            lat = await measure_commits(store, sizes, rounds, bar)
        out = []
        for n, d in sizes.items():
            reads = await measure_reads(store, d)
            rss = run_rss_probe(root, d)
            out.append({"segments": n, "commit_p50_ms": round(float(np.percentile(lat[n], 50)), 3),
                        "commit_p99_ms": round(float(np.percentile(lat[n], 99)), 3), **reads, **rss})
    growth = out[-1]["commit_p99_ms"] / out[0]["commit_p99_ms"]
    return {"benchmark": "history", "sizes": out, "commit_p99_growth": round(growth, 3), "quick": bool(args.quick),
            "build_s": round(build_s, 1), "commits_per_size": rounds * COMMITS_PER_ROUND,
            "store_put_p50_ms": round(float(np.percentile(lat["put"], 50)), 3),
            "store_put_p99_ms": round(float(np.percentile(lat["put"], 99)), 3)}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--rss-probe":
        print(json.dumps(asyncio.run(rss_probe(Path(sys.argv[2]), int(sys.argv[3])))))
        return
    args = parse_args(__doc__.splitlines()[0])
    result = asyncio.run(main_async(args))
    table = [("segments", "commit p50/p99 ms | load s | points s | plan mid s | listed | catalog MB | writer RSS MB")]
    for s in result["sizes"]:
        table.append((f"{s['segments']:,}", f"{s['commit_p50_ms']} / {s['commit_p99_ms']} | {s['load_s']} | "
                                            f"{s['points_s']} | {s['plan_mid_s']} | {s['objects_listed']} | "
                                            f"{s['catalog_bytes'] / 1e6:.2f} | {s['writer_rss_mb']}"))
    table.append(("commit p99 growth", str(result["commit_p99_growth"])))
    table.append(("bare put p50/p99 ms", f"{result['store_put_p50_ms']} / {result['store_put_p99_ms']}"))
    emit(args, result, table)


if __name__ == "__main__":
    main()
