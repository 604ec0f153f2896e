"""The benchmark report: run every benchmark and the peers in one go, write a page with charts.

    python -m benchmarks.report --out DIR [--quick] [--only storage,scale] [--dir WORK]

Each benchmark (``BENCHMARKS``) runs as a subprocess, ``python -m benchmarks.NAME --json``
(``--quick`` passed on), one after the other so that none measures another's load; its
last JSON line is its result, its output goes to ``DIR/logs/NAME.log``. The peers (cp,
restic, borg) are measured inside the benchmarks that compare with them (``recovery``:
cp, restic and borg; ``storage``: restic and borg); restic and borg are installed first from
Debian packages when missing (``benchmarks._peers``). Then ``DIR/results.json`` (every
result, the machine, the run), ``DIR/report.md`` and ``DIR/report.html`` (the same page)
with matplotlib PNG charts beside them. Every figure on the page comes from this run:
a benchmark that failed or did not produce a field is shown as not measured, never
filled in from elsewhere.

The machine (cores, CPU, memory, the work directory's file system and disk, the load) is
at the top. Durable figures on tmpfs or ramfs would measure memory, not a disk: the
report refuses a work directory there, or on a file system it cannot tell
(``/proc/self/mountinfo``); pass ``--dir`` on a disk file system.

``--out`` must be a directory (created if missing). Every file the report writes in it
(and in ``logs/``, opened without following a link) is a new temporary file, created
``O_EXCL|O_NOFOLLOW`` through the directory's descriptor and renamed over its name: a
link planted at a name is replaced, never written through. A bad ``--out`` or ``--dir``
is refused with one line, exit 2.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import html
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._common import (FS_UNKNOWN, OPEN_DIR, Refused, kind_at, last_json_line, machine, make_dir,
                                write_at, write_beside)
from benchmarks._peers import PeerMissing, ensure

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("ingest", "log_append", "recovery", "history", "failover", "failback", "nbd", "scale", "storage")
PEER_USERS = {"recovery": ["restic", "borg"], "storage": ["restic", "borg"]}
BENCH_TIMEOUT_S, BENCH_TIMEOUT_S_QUICK = 4 * 3600, 3600
LOG_TAIL_CHARS = 1500
NOT_MEASURED = "not measured"
#: File systems held in memory: durable figures there would measure RAM, not a disk.
FS_IN_MEMORY = ("tmpfs", "ramfs")
LOGS = "logs"

# (benchmark, field, comparison, target): issue 15's targets, and the earlier ones the
# benchmarks report on (issues 11 and 12).
TARGETS = (
    ("ingest", "ratio_vs_ceiling", ">=", 0.8),
    ("ingest", "e2e_vs_drva_only", ">=", 0.6),
    ("ingest", "drva_only_writes_per_s_4k", ">=", 150_000),
    ("ingest", "rpo_p99_s", "<=", 1.0),
    ("ingest", "cpu_vs_bare", "<=", 1.5),
    ("recovery", "ratio_vs_cp", ">=", 0.9),
    ("recovery", "ratio_vs_restic", ">=", 2.0),
    ("scale", "rss_mb_max", "<=", 512),
    ("scale", "rpo_p99_s_max", "<=", 2.0),
    ("storage", "growth_vs_changed", "<=", 1.1),
    ("failover", "rto_cold_vs_recover", "<=", 1.3),
    ("failover", "rto_warm_s", "<=", 5.0),
    ("failover", "rto_warm_growth", "<=", 1.3),
    ("failover", "planned_lost_writes", "<=", 0),
    ("failover", "test_failover_rpo_p99_s", "<=", 2.0),
)


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return (out.stdout.strip() or "?") + (" (with uncommitted changes)" if dirty else "")


# ---------------------------------------------------------------- the output directory

def open_out_dir(out: Path) -> int:
    """The ``--out`` directory, created if missing, open (the user's path, links and all,
    is followed: it is theirs to choose); Refused when it is not a directory."""
    make_dir(out, "--out")
    try:
        return os.open(out, OPEN_DIR)
    except OSError as exc:
        raise Refused(f"--out {out}: cannot open the directory ({exc.strerror})") from None


def open_logs_dir(out_fd: int, out: Path) -> int:
    """``logs/`` in the open ``--out`` directory, created if missing, opened
    ``O_NOFOLLOW|O_DIRECTORY`` through ``out_fd``: a link planted there is refused."""
    try:
        os.mkdir(LOGS, 0o755, dir_fd=out_fd)
    except FileExistsError:
        pass  # a directory of an earlier run, or something the open below refuses
    except OSError as exc:
        raise Refused(f"--out {out}: cannot create {LOGS}/ ({exc.strerror})") from None
    try:
        return os.open(LOGS, OPEN_DIR | os.O_NOFOLLOW, dir_fd=out_fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise Refused(f"--out {out}: cannot open {out / LOGS} ({exc.strerror})") from None
        raise Refused(f"--out {out}: {out / LOGS} is {kind_at(LOGS, out_fd)}: expected a directory "
                      f"(a link there is never followed)") from None


def refuse_memory_fs(m: dict[str, Any], work: str) -> None:
    """Refused when the work directory is on a file system held in memory, or on one the
    mount table does not tell: durable figures must come from a disk."""
    if m["fs_type"] in FS_IN_MEMORY:
        raise Refused(f"the work directory {work} is on {m['fs_type']}: durable figures there would measure "
                      f"memory, not a disk; pass --dir on a disk file system")
    if m["fs_type"] == FS_UNKNOWN:
        raise Refused(f"the file system of the work directory {work} is unknown (not in /proc/self/mountinfo): "
                      f"durable figures need a disk; pass --dir on a disk file system")


# ---------------------------------------------------------------- one benchmark

def run_benchmark(name: str, quick: bool, work: Path, logs_fd: int) -> dict[str, Any]:
    """One benchmark as a subprocess: its result (its last JSON line), or why there is
    none. Its output goes to ``NAME.log`` in the open directory ``logs_fd``."""
    cmd = [sys.executable, "-m", f"benchmarks.{name}", "--json", "--dir", str(work)] + (["--quick"] if quick else [])
    log_name = f"{name}.log"
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              timeout=BENCH_TIMEOUT_S_QUICK if quick else BENCH_TIMEOUT_S)
        out, err, rc = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        out, err, rc = str(exc.stdout or ""), str(exc.stderr or "") + "\n(timed out)", None
    seconds = round(time.perf_counter() - t0, 1)
    write_at(logs_fd, log_name, f"$ {' '.join(cmd)}\n# exit {rc}, {seconds} s\n--- stdout\n{out}\n--- stderr\n{err}")
    run = {"command": " ".join(cmd[1:]), "exit": rc, "seconds": seconds, "log": f"{LOGS}/{log_name}"}
    try:
        result = last_json_line(out) if rc == 0 else None
    except ValueError:
        result = None
    if result is None:
        return {"run": run, "error": (err.strip() or out.strip())[-LOG_TAIL_CHARS:] or f"exit {rc}"}
    return {"run": run, "result": result}


# ---------------------------------------------------------------- charts

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: Path) -> Path:
    """Lay ``fig`` out, write it to ``path`` as a PNG (``write_beside``: never through a
    link planted there) and free it; ``path``."""
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_beside(path, png.getvalue())
    return path


def _bars(path: Path, title: str, ylabel: str, items: list[tuple[str, float | None]],
          hlines: tuple[tuple[float, str], ...] = ()) -> Path | None:
    """A bar chart of ``items``; a None value is drawn as an empty slot labelled not measured."""
    if not any(v is not None for _, v in items):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = range(len(items))
    values = [v or 0 for _, v in items]
    bars = ax.bar(xs, values, color=["#2b6cb0" if i == 0 else "#a0aec0" for i in xs])
    for bar, (_, v) in zip(bars, items):
        ax.annotate(NOT_MEASURED if v is None else f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    for y, label in hlines:
        ax.axhline(y, color="#c53030", linestyle="--", linewidth=1)
        ax.annotate(label, (len(items) - 0.5, y), ha="right", va="bottom", fontsize=8, color="#c53030")
    ax.set_xticks(list(xs), [k for k, _ in items], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return _save(plt, fig, path)


def chart_ingest(r: dict[str, Any], out: Path) -> tuple[Path | None, str]:
    stages = r.get("stages")
    if not isinstance(stages, dict) or not stages:
        return None, ("per-stage CPU " + NOT_MEASURED + " (this ingest run has no `stages`); "
                      "the table gives what it measured")
    names = list(stages)
    bare = [(stages[n] or {}).get("bare_cpu_s_per_gb") for n in names]
    drva = [(stages[n] or {}).get("drva_cpu_s_per_gb") for n in names]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ys = range(len(names))
    ax.barh([y + 0.2 for y in ys], [v or 0 for v in bare], height=0.4, label="bare stage", color="#a0aec0")
    ax.barh([y - 0.2 for y in ys], [v or 0 for v in drva], height=0.4, label="DRVA", color="#2b6cb0")
    for y, (b, d) in enumerate(zip(bare, drva)):
        if d is None:
            ax.annotate(NOT_MEASURED, (0, y - 0.2), va="center", fontsize=7)
        if b is None:
            ax.annotate(NOT_MEASURED, (0, y + 0.2), va="center", fontsize=7)
    ax.set_yticks(list(ys), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("CPU seconds per GB ingested")
    ax.set_title("Ingest by stage: the DRVA's CPU against each stage's bare cost", fontsize=10)
    ax.legend(fontsize=8)
    path = _save(plt, fig, out / "ingest_stages.png")
    note = "" if any(d is not None for d in drva) else "the DRVA's per-stage split " + NOT_MEASURED + " (no py-spy)"
    return path, note


def chart_rpo(results: dict[str, Any], out: Path) -> tuple[Path | None, str]:
    lines = []
    scale = results.get("scale") or {}
    if scale.get("rpo_series"):
        s = scale["rpo_series"]
        n = scale.get("domains_max")
        lines.append(([p[0] for p in s], [p[2] for p in s], f"scale: worst of {n} domains"))
        lines.append(([p[0] for p in s], [p[1] for p in s], f"scale: median of {n} domains"))
    ingest = results.get("ingest") or {}
    if ingest.get("rpo_series"):
        s = ingest["rpo_series"]
        lines.append(([p[0] for p in s], [p[1] for p in s], "ingest: one domain at 100 MB/s"))
    if not lines:
        return None, "RPO lag over time " + NOT_MEASURED
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.4))
    for xs, ys, label in lines:
        ax.plot(xs, ys, label=label, linewidth=1)
    ax.axhline(2.0, color="#c53030", linestyle="--", linewidth=1, label="scale target (p99)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RPO lag (s)")
    ax.set_title("RPO lag over time (the DRVA's status, each rewrite)", fontsize=10)
    ax.legend(fontsize=8)
    path = _save(plt, fig, out / "rpo.png")
    return path, ""


def chart_recovery(r: dict[str, Any], out: Path) -> tuple[Path | None, str]:
    items = [("cdp recover", r.get("recover_latest_s")), ("cp", r.get("cp_s")),
             ("restic restore", r.get("restic_restore_s")), ("borg extract", r.get("borg_extract_s"))]
    size = r.get("disk_bytes")
    title = f"Cold recovery of a {size / 2**30:g} GiB disk (s, lower is better)" if size else "Cold recovery (s)"
    path = _bars(out / "recovery.png", title, "seconds", items)
    missing = [k for k, v in items if v is None]
    return path, (", ".join(missing) + ": " + NOT_MEASURED) if missing else ""


def chart_history(rec: dict[str, Any], hist: dict[str, Any], out: Path) -> tuple[Path | None, str]:
    have_rec = rec.get("recover_latest_s") is not None and rec.get("churn16_recover_s") is not None
    sizes = hist.get("sizes") or []
    if not have_rec and not sizes:
        return None, "recovery time vs history " + NOT_MEASURED
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    ax = axes[0]
    if have_rec:
        ax.bar(["1x churn", "16x churn\n(consolidated)"], [rec["recover_latest_s"], rec["churn16_recover_s"]],
               color=["#2b6cb0", "#a0aec0"])
        ax.set_ylabel("cold recovery, latest (s)")
    else:
        ax.text(0.5, 0.5, NOT_MEASURED, ha="center")
    ax.set_title("Recovery vs churn (benchmarks.recovery)", fontsize=9)
    ax = axes[1]
    if sizes:
        segs = [s["segments"] for s in sizes]
        for key, label in (("plan_mid_s", "plan a point (catalog)"), ("load_s", "load the catalog"),
                           ("commit_p99_ms", "one commit, p99")):
            ys = [s.get(key) for s in sizes]
            if all(y is not None for y in ys):
                ax.plot(segs, [y / 1000 if key.endswith("_ms") else y for y in ys], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("segments in the history")
        ax.set_ylabel("seconds")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, NOT_MEASURED, ha="center")
    ax.set_title("Catalog cost vs history length (benchmarks.history)", fontsize=9)
    path = _save(plt, fig, out / "history.png")
    return path, ""


def chart_storage(r: dict[str, Any], out: Path) -> tuple[Path | None, str]:
    items = [("cdp store", r.get("growth_vs_changed")), ("restic", r.get("restic_growth_vs_changed")),
             ("borg", r.get("borg_growth_vs_changed"))]
    title = "Store growth over the changed bytes (10 % of a disk in random 4 KiB writes)"
    return _bars(out / "storage.png", title, "growth / changed bytes", items,
                 hlines=((1.1, "target 1.1"),)), ""


def chart_rto(r: dict[str, Any], out: Path) -> tuple[Path | None, str]:
    items = [("RTO warm", r.get("rto_warm_s")), ("RTO warm, 4x disks", r.get("rto_warm_4x_s")),
             ("RTO cold", r.get("rto_cold_s")), ("recover only", r.get("recover_s"))]
    return _bars(out / "rto.png", "Failover: recovery time objective, cold vs warm standby (s)", "seconds",
                 items, hlines=((5.0, "warm target 5 s"),)), ""


def chart_failback(r: dict[str, Any], out: Path) -> tuple[Path | None, str]:
    items = [("failback", r.get("failback_s")), ("failback from store", r.get("failback_from_store_s")),
             ("checksum scan", r.get("checksum_scan_s")), ("full copy", r.get("full_copy_s"))]
    return _bars(out / "failback.png", "Failback: only what changed, vs a checksum scan and a full copy (s)",
                 "seconds", items), ""


def chart_scale(r: dict[str, Any], out: Path) -> tuple[Path | None, str]:
    configs = r.get("configs") or []
    if not configs:
        return None, "scale " + NOT_MEASURED
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    labels = [f"{c['domains']} dom.\n{c['disks']} disks" for c in configs]
    for ax, key, title, target in ((axes[0], "rss_mb_max", "DRVA peak RSS (MiB)", 512),
                                   (axes[1], "rpo_p99_s_max", "RPO p99, worst domain (s)", 2.0),
                                   (axes[2], "cpu_s_per_gb", "DRVA CPU s per GB", None)):
        ax.bar(labels, [c.get(key) or 0 for c in configs], color="#2b6cb0")
        if target is not None:
            ax.axhline(target, color="#c53030", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    path = _save(plt, fig, out / "scale.png")
    return path, ""


# ---------------------------------------------------------------- the page

Block = tuple  # ("h2", text) | ("p", text) | ("table", header, rows) | ("img", file, alt)

# Per benchmark: the fields its table shows (those present are shown; none is invented).
FIELDS = {
    "ingest": ("mb_per_s_64k", "drva_only_mb_per_s", "ceiling_mb_per_s", "ratio_vs_ceiling", "cpu_ceiling_mb_per_s",
               "ratio_vs_cpu_ceiling", "ceiling_bound", "e2e_vs_drva_only",
               "raw_mb_per_s", "ratio_vs_raw", "writes_per_s_4k", "drva_only_writes_per_s_4k",
               "bare_cpu_s_per_gb", "drva_cpu_s_per_gb", "cpu_vs_bare", "ack_p99_ms", "rpo_p50_s", "rpo_p99_s",
               "drva_rss_mb_max", "encrypted_ratio", "dirty_map_4k_ratio"),
    "log_append": ("mb_per_s", "raw_mb_per_s", "ratio_vs_raw"),
    "recovery": ("disk_bytes", "recover_latest_s", "mb_per_s", "cp_s", "ratio_vs_cp", "restic_restore_s",
                 "ratio_vs_restic", "borg_extract_s", "ratio_vs_borg", "churn16_recover_s", "churn16_vs_churn1",
                 "consolidate_s", "encrypted_ratio", "verified"),
    "history": ("commit_p99_growth", "store_put_p50_ms", "store_put_p99_ms", "build_s"),
    "failover": ("rto_cold_s", "recover_s", "rto_cold_vs_recover", "rto_warm_s", "rto_warm_4x_s",
                 "rto_warm_growth", "planned_lost_writes", "planned_s", "test_failover_rpo_p99_s"),
    "failback": ("failback_s", "failback_from_store_s", "checksum_scan_s", "full_copy_s",
                 "speedup_vs_checksum_scan", "speedup_vs_full_copy", "changed_bytes", "bytes_moved",
                 "moved_vs_changed"),
    "nbd": ("nbd_iops_4k", "file_iops_4k", "ratio_vs_file_4k", "nbd_mb_s_1m", "file_mb_s_1m", "ratio_vs_file_1m",
            "flush_p99_ms", "mount_first_read_s", "mount_read_iops_4k", "full_restore_s"),
    "scale": ("domains_max", "disks_max", "mb_per_s", "rss_mb_max", "rpo_p99_s_max", "cpu_s_per_gb", "targets_met"),
    "storage": ("disk_bytes", "changed_bytes", "seed_store_bytes", "store_growth_bytes", "growth_vs_changed",
                "restic_seed_bytes", "restic_growth_bytes", "restic_growth_vs_changed", "borg_seed_bytes",
                "borg_growth_bytes", "borg_growth_vs_changed"),
}
TITLES = {"ingest": "Ingest", "log_append": "Log append", "recovery": "Recovery", "history": "History",
          "failover": "Failover (RTO)", "failback": "Failback", "nbd": "NBD", "scale": "Scale per DRVA",
          "storage": "Storage efficiency"}


def _fmt(v: Any) -> str:
    if v is None:
        return NOT_MEASURED
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


# A target that holds for one configuration only: why a run did not measure it.
TARGET_CONFIG = {"scale": lambda r: None if r.get("domains_max", 0) >= 100 else
                 f"n/a: {r.get('domains_max')} domains (the target is for 100)"}


def _target_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for bench, field, op, target in TARGETS:
        if bench not in results:
            continue
        value = results[bench].get(field) if results[bench] else None
        met = NOT_MEASURED if not isinstance(value, (int, float)) else (
            "yes" if (value >= target if op == ">=" else value <= target) else "**no**")
        if results[bench] and bench in TARGET_CONFIG:
            met = TARGET_CONFIG[bench](results[bench]) or met
        rows.append([bench, f"`{field}`", f"{op} {_fmt(target)}", _fmt(value), met])
    return rows


def page(doc: dict[str, Any], charts: dict[str, list[tuple[Path | None, str]]]) -> list[Block]:
    m = doc["machine"]
    blocks: list[Block] = [
        ("h1", "CDP engine: benchmark report"),
        ("p", f"{doc['started']} · commit {doc['commit']} · {'quick' if doc['quick'] else 'full'} mode · "
              f"{doc['seconds']:,.0f} s · every figure below comes from this run only."),
        ("h2", "Machine"),
        ("table", ["cores", "CPU", "memory", "work directory", "file system", "disk", "load (1 min, at start)"],
         [[f"{m['cores']} ({m['cores_usable']} usable)", m["cpu"], f"{m['memory_gib']} GiB", m["path"],
           m["fs_type"], m["disk"], str(m["load_1m"])]]),
        ("p", "A shared 2-core machine gives noisy absolute figures: the benchmarks report ratios "
              "measured in the same run, medians over rounds where they run rounds."),
        ("h2", "Targets"),
        ("table", ["benchmark", "field", "target", "measured", "met"], _target_rows(doc["results"])),
    ]
    for name in doc["benchmarks"]:
        entry = doc["runs"][name]
        blocks.append(("h2", f"{TITLES.get(name, name)} (`benchmarks.{name}`)"))
        run = entry["run"]
        blocks.append(("p", f"`{run['command']}`: exit {run['exit']}, {run['seconds']:,} s, log [{run['log']}]"
                            f"({run['log']})."))
        if "error" in entry:
            blocks.append(("p", f"**Failed: {NOT_MEASURED}.**"))
            blocks.append(("pre", entry["error"]))
            continue
        r = entry["result"]
        for path, note in charts.get(name, []):
            if path is not None:
                blocks.append(("img", path.name, f"{name}: {path.stem}"))
            if note:
                blocks.append(("p", f"_{note}_"))
        rows = [[f"`{k}`", _fmt(r.get(k))] for k in FIELDS.get(name, ()) if k in r]
        if name == "scale":
            rows += [[f"{c['domains']} domains / {c['disks']} disks",
                      f"{c['mb_per_s']} MB/s, RSS max {c['rss_mb_max']} MiB, RPO p99 worst {c['rpo_p99_s_max']} s "
                      f"(median domain {c['rpo_p99_s_median']}), {c['cpu_s_per_gb']} CPU s/GB"]
                     for c in r.get("configs", [])]
        if name == "history":
            rows += [[f"{s['segments']:,} segments", f"commit p99 {s.get('commit_p99_ms')} ms, load "
                      f"{s.get('load_s')} s, plan {s.get('plan_mid_s')} s"] for s in r.get("sizes", [])]
        blocks.append(("table", ["field", "value"], rows))
    return blocks


def render_md(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h1":
            out.append(f"# {b[1]}\n")
        elif kind == "h2":
            out.append(f"## {b[1]}\n")
        elif kind == "p":
            out.append(f"{b[1]}\n")
        elif kind == "pre":
            out.append("```\n" + b[1] + "\n```\n")
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})\n")
        elif kind == "table":
            header, rows = b[1], b[2]
            lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
            out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def _inline(text: str) -> str:
    """The few inline marks the page uses (`code`, **bold**, _em_, [text](link)), in HTML."""
    import re
    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)
    s = re.sub(r"(?<![\w/])_([^_]+)_(?![\w/])", r"<i>\1</i>", s)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', s)


def render_html(blocks: list[Block]) -> str:
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>CDP engine: benchmark report</title>",
           "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto;line-height:1.4}"
           "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
           "font-size:90%}code{background:#f4f4f4}img{max-width:100%}pre{background:#f4f4f4;padding:.5em;"
           "overflow:auto}</style></head><body>"]
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "p"):
            out.append(f"<{kind}>{_inline(b[1])}</{kind}>")
        elif kind == "pre":
            out.append(f"<pre>{html.escape(b[1])}</pre>")
        elif kind == "img":
            out.append(f'<p><img src="{html.escape(b[1])}" alt="{html.escape(b[2])}"></p>')
        elif kind == "table":
            out.append("<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in b[1]) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>" for row in b[2]]
            out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


def make_charts(results: dict[str, Any], out: Path) -> dict[str, list[tuple[Path | None, str]]]:
    charts: dict[str, list[tuple[Path | None, str]]] = {}
    makers: dict[str, Callable[[], tuple[Path | None, str]]] = {
        "ingest": lambda: chart_ingest(results["ingest"], out),
        "recovery": lambda: chart_recovery(results["recovery"], out),
        "history": lambda: chart_history(results.get("recovery") or {}, results["history"], out),
        "failover": lambda: chart_rto(results["failover"], out),
        "failback": lambda: chart_failback(results["failback"], out),
        "scale": lambda: chart_scale(results["scale"], out),
        "storage": lambda: chart_storage(results["storage"], out),
    }
    for name, make in makers.items():
        if results.get(name) is not None:
            charts.setdefault(name, []).append(make())
    if results.get("scale") is not None or results.get("ingest") is not None:
        rpo = chart_rpo(results, out)
        charts.setdefault("scale" if results.get("scale") is not None else "ingest", []).append(rpo)
    return charts


def _arguments() -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="where report.md, report.html and the charts go")
    p.add_argument("--quick", action="store_true", help="every benchmark in its quick mode")
    p.add_argument("--only", default=None, help=f"a comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--dir", type=Path, default=None, help="work directory for the benchmarks (default: a temp "
                                                          "dir); on a disk file system, not tmpfs")
    args = p.parse_args()
    names = list(BENCHMARKS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"--only: unknown benchmark(s) {', '.join(unknown)} (expected some of {', '.join(BENCHMARKS)})")
    return args, names


def _peers(names: list[str]) -> str:
    """Install the peers the chosen benchmarks compare with; why some are missing, or ""."""
    wanted = sorted({t for n in names for t in PEER_USERS.get(n, [])})
    if not wanted:
        return ""
    try:
        ensure(wanted)
    except PeerMissing as exc:
        print(f"benchmarks.report: {exc}; going on without them", file=sys.stderr)
        return str(exc)
    return ""


def _run_all(args: argparse.Namespace, names: list[str], out_fd: int) -> dict[str, Any]:
    """Run the benchmarks in a work directory on a disk; the document of the run."""
    logs_fd = open_logs_dir(out_fd, args.out)
    try:
        if args.dir is not None:
            make_dir(args.dir, "--dir")
        with tempfile.TemporaryDirectory(prefix="cdp-report-", dir=args.dir) as work:
            m = machine(Path(work))
            refuse_memory_fs(m, work)
            peers_note = _peers(names)
            started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            t0 = time.perf_counter()
            runs = {}
            for name in names:
                print(f"benchmarks.report: {name} ...", file=sys.stderr, flush=True)
                runs[name] = run_benchmark(name, args.quick, Path(work), logs_fd)
                state = "ok" if "result" in runs[name] else "FAILED"
                print(f"benchmarks.report: {name} {state} in {runs[name]['run']['seconds']} s", file=sys.stderr)
    finally:
        os.close(logs_fd)
    return {"started": started, "commit": git_commit(), "quick": args.quick, "machine": m, "benchmarks": names,
            "seconds": round(time.perf_counter() - t0, 1), "peers_note": peers_note, "runs": runs,
            "results": {n: runs[n].get("result") for n in names}}


def _write_report(doc: dict[str, Any], out_fd: int) -> None:
    """results.json, the charts, report.md and report.html, each by ``write_at`` in the
    open ``--out`` directory. The charts reach it through ``/proc/self/fd``: the very
    directory opened, no name on the way resolved again."""
    write_at(out_fd, "results.json", json.dumps(doc, indent=1, sort_keys=True))
    blocks = page(doc, make_charts(doc["results"], Path(f"/proc/self/fd/{out_fd}")))
    if doc["peers_note"]:
        blocks.insert(2, ("p", f"**Peers:** {doc['peers_note']}"))
    write_at(out_fd, "report.md", render_md(blocks))
    write_at(out_fd, "report.html", render_html(blocks))


def main() -> None:
    args, names = _arguments()
    try:
        out_fd = open_out_dir(args.out)
        try:
            doc = _run_all(args, names, out_fd)
            _write_report(doc, out_fd)
        finally:
            os.close(out_fd)
    except Refused as exc:
        print(f"benchmarks.report: {exc}", file=sys.stderr)
        sys.exit(2)
    failed = [n for n in names if doc["results"][n] is None]
    print(f"benchmarks.report: {args.out / 'report.md'} and report.html written"
          + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    print(json.dumps({"benchmark": "report", "out": str(args.out), "benchmarks": names, "failed": failed,
                      "seconds": doc["seconds"]}))
    sys.exit(1 if failed else 0)

if __name__ == "__main__":
    main()
