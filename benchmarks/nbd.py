"""NBD: fio through the capture export against a plain file; instant recovery by ``cdp mount``.

Setup (not timed): a DRVA (``python -m drva.daemon``, a file store in the work dir, a
replication log of 2 GiB, ``--quick``: 1 GiB, 16 MiB segments) and a protected site
(``python -m iofilter_sim run --nbd 127.0.0.1:0``) serving one disk of 1 GiB
(``--quick``: 256 MiB) as the NBD export ``vm/disk0``; every write a client makes there
goes through the filter to the DRVA, and a FLUSH returns only once the DRVA holds every
earlier write in its log. A plain file of the same size on the same file system is the
baseline. Both are first filled whole by the same sequential fio job (1 MiB writes,
reported as ``nbd_fill_mb_s`` / ``file_fill_mb_s``, one run each), so that no measured
job pays for block allocation on one side only.

Measured with fio, the same job on both sides — only the engine and the target differ:
``--ioengine=nbd --uri=nbd://...`` for the export, ``--ioengine=libaio --direct=1
--filename=FILE`` for the file. Direct I/O because a buffered baseline would measure the
page cache (memory copies) until the final fsync, not the device the export's writes
end up on; libaio because it is the asynchronous engine that honours ``--iodepth`` with
``direct=1`` (the NBD engine is asynchronous too). Where ``O_DIRECT`` is refused (tmpfs,
some FUSE mounts) the file side runs buffered and ``file_engine`` says so. Each job is
time-based, 5 s (``--quick``: 2 s) over the whole disk, and ends with ``--end_fsync=1``:
fio counts the final flush in its runtime, so the export's figure includes getting every
write into the DRVA's log. After each job on the export the benchmark waits until the
DRVA has committed everything to the store (``settle_s``; read from its status file), so
that the next job, on either side, does not start under its uploads:

- ``4k``: random 4 KiB writes, iodepth 32 -> ``file_iops_4k``, ``nbd_iops_4k``,
  ``ratio_vs_file_4k`` (nbd / file, of the medians);
- ``1m``: sequential 1 MiB writes, iodepth 8 -> ``file_mb_s_1m``, ``nbd_mb_s_1m``,
  ``ratio_vs_file_1m``;
- ``flush``: random 4 KiB writes at iodepth 1 with a FLUSH (fsync) after every 16 ->
  ``flush_p99_ms`` (p99 of fio's ``sync`` latency on the export), ``file_flush_p99_ms``
  (the file's fsync, for reference).

The jobs run in 3 rounds (``--quick``: 2) in ABBA order: file first in even rounds, the
export first in odd ones; medians over rounds; ``rounds`` lists every value. For each
export job ``site_cpu_s`` / ``drva_cpu_s`` are the CPU seconds the site and the DRVA
used during it (2 cores here: the numbers say who was busy).

Instant recovery, of the disk the jobs above wrote through the export (a sequential
fill, then the rounds' random and sequential overwrites: a disk with no base image and
many segments, ``store_segments``): the site is stopped (SIGTERM; it drains, and its
summary gives the last acked seq and the primary image's sha256), the store's catalog
is waited for until it has committed that seq (``cdp.catalog.load_catalog``), the DRVA
is stopped. Then, in rounds (ABBA again: mount first in even rounds), each from a cold
page cache (``echo 1 > /proc/sys/vm/drop_caches`` after a sync; ``cold`` says whether it
was permitted):

- ``mount_first_read_s``: wall time from spawning ``cdp mount 1 --latest --nbd
  127.0.0.1:0 --json`` until a 4 KiB READ at offset 0 returned, read by a minimal NBD
  client in this process (connect, fixed-newstyle handshake, NBD_OPT_GO, one READ) as
  soon as the mount printed its "serving" line (``mount_serving_s``: until that line);
  CPython's start and imports of the CLI are in it;
- ``mount_read_iops_4k``: fio random 4 KiB reads, iodepth 32, time-based, on the mount's
  export right after; ``file_read_iops_4k``: the same job on the recovered image file
  (libaio, direct), for reference;
- ``full_restore_s``: wall time of ``cdp recover 1 --latest --to DIR --json`` into a fresh
  directory (its own ``seconds`` in ``full_restore_inner_s``).

Checks (the run fails when one does not hold): ``mount_sha_equal`` — the mount's export
read whole with ``nbdcopy`` has the recovered image's sha256; ``restore_sha_equal`` — the
recovered image has the site's primary image's sha256.

Targets (issue 13): ``ratio_vs_file_1m`` >= 0.5, ``ratio_vs_file_4k`` >= 0.3,
``mount_first_read_s`` <= 2; ``targets`` says which are met.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import _nbd_site as site_mod
from benchmarks._common import emit, parse_args, progress, work_dir
from benchmarks._nbd_site import Processes
from cdp.digest import sha256_file

MiB = 1 << 20
ROUNDS, ROUNDS_QUICK = 3, 2
RUNTIME_S, RUNTIME_S_QUICK = 5, 2
FSYNC_EVERY = 16
FIRST_READ_BYTES = 4096
#: A fio run gets its runtime plus this long (it connects, lays out, flushes at the end).
FIO_SLACK_S = 300.0
#: The jobs; every write job ends with a flush (``--end_fsync=1``).
JOBS: dict[str, list[str]] = {
    "fill": ["--rw=write", "--bs=1m", "--iodepth=8", "--end_fsync=1"],
    "4k": ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--end_fsync=1"],
    "1m": ["--rw=write", "--bs=1m", "--iodepth=8", "--end_fsync=1"],
    "flush": ["--rw=randwrite", "--bs=4k", "--iodepth=1", f"--fsync={FSYNC_EVERY}", "--end_fsync=1"],
    "read4k": ["--rw=randread", "--bs=4k", "--iodepth=32", "--readonly"],
}
WRITE_JOBS = ("4k", "1m", "flush")
#: field -> (comparison, bound)
TARGETS: dict[str, tuple[str, float]] = {
    "ratio_vs_file_1m": (">=", 0.5),
    "ratio_vs_file_4k": (">=", 0.3),
    "mount_first_read_s": ("<=", 2.0),
}


# --------------------------------------------------------------------------- fio


@dataclass(frozen=True)
class Target:
    """Where a fio job goes: the engine and target arguments, the only ones that differ."""

    kind: str  # "nbd" or "file"
    args: tuple[str, ...]

    @classmethod
    def nbd(cls, uri: str) -> Target:
        return cls("nbd", ("--ioengine=nbd", f"--uri={uri}"))

    @classmethod
    def file(cls, path: Path, direct: bool) -> Target:
        return cls("file", ("--ioengine=libaio", f"--direct={int(direct)}", f"--filename={path}"))


def fio_argv(job: str, target: Target, size: int, runtime_s: float | None) -> list[str]:
    argv = ["fio", f"--name={job}", *target.args, f"--size={size}", *JOBS[job], "--output-format=json"]
    if runtime_s is not None:
        argv += ["--time_based=1", f"--runtime={round(runtime_s * 1000)}ms"]
    return argv


def parse_fio(text: str, ddir: str = "write") -> dict[str, Any]:
    """The figures of fio's JSON output (the first job): IOPS, MB/s, the p99 of its
    ``sync`` latency in ms (None without syncs). fio may print warnings before the JSON."""
    start = text.find("{")
    if start < 0:
        raise ValueError(f"no JSON in fio's output: {text[:500]!r}")
    job = json.loads(text[start:])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job {job.get('jobname')} failed: error {job['error']}")
    side = job[ddir]
    sync = job.get("sync") or {}
    p99 = ((sync.get("lat_ns") or {}).get("percentile") or {}).get("99.000000")
    return {"iops": float(side["iops"]), "mb_s": side["bw_bytes"] / 1e6, "io_bytes": int(side["io_bytes"]),
            "runtime_s": side["runtime"] / 1e3, "syncs": int(sync.get("total_ios", 0)),
            "sync_p99_ms": None if p99 is None else p99 / 1e6}


def run_fio(job: str, target: Target, size: int, runtime_s: float | None) -> dict[str, Any]:
    argv = fio_argv(job, target, size, runtime_s)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=(runtime_s or 0) + FIO_SLACK_S)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {out.returncode}: {out.stderr[-2000:]}")
    return parse_fio(out.stdout, "read" if job.startswith("read") else "write")


def direct_io_ok(directory: Path) -> bool:
    """Whether the file system under ``directory`` takes an ``O_DIRECT`` write."""
    probe = directory / ".direct-probe"
    buf = mmap.mmap(-1, 4096)  # page-aligned
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        os.pwrite(fd, buf, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


# --------------------------------------------------------------------------- aggregation


def abba(round_index: int, a: str, b: str) -> tuple[str, str]:
    """The order of the two sides in a round: ``a`` first in even rounds, ``b`` in odd ones."""
    return (a, b) if round_index % 2 == 0 else (b, a)


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or not den:
        return None
    return round(num / den, 3)


def check_targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target with its value and whether it is met (a missing value is not met)."""
    out = {}
    for name, (op, bound) in TARGETS.items():
        value = result.get(name)
        met = value is not None and (value >= bound if op == ">=" else value <= bound)
        out[name] = {"target": f"{op} {bound:g}", "value": value, "met": bool(met)}
    return out


def rounded(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


# --------------------------------------------------------------------------- phases


@dataclass
class Run:
    """What the phases share."""

    root: Path
    procs: Processes
    size: int
    rounds: int
    runtime_s: float
    direct: bool  # whether the file side runs with O_DIRECT
    bar: Any

    def step(self, what: str) -> None:
        self.bar.set_description(what)

    def done(self) -> None:
        self.bar.update(1)


def measured_nbd(run: Run, job: str, target: Target, pids: dict[str, int], runtime_s: float | None) -> dict[str, Any]:
    """One fio job on the export, with the CPU seconds each process used meanwhile."""
    before = {name: site_mod.cpu_s(pid) for name, pid in pids.items()}
    r = run_fio(job, target, run.size, runtime_s)
    for name, pid in pids.items():
        r[f"{name}_cpu_s"] = round(site_mod.cpu_s(pid) - before[name], 2)
    return r


def capture_rounds(run: Run, site: site_mod.Site, drva_status: Path, file_target: Target,
                   pids: dict[str, int]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every write job on both sides, ``run.rounds`` times in ABBA order."""
    nbd_target = Target.nbd(site.uri)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {job: {"file": [], "nbd": []} for job in WRITE_JOBS}
    for r in range(run.rounds):
        for job in WRITE_JOBS:
            for side in abba(r, "file", "nbd"):
                run.step(f"round {r + 1}/{run.rounds}: {job} on the {side}")
                if side == "nbd":
                    res = measured_nbd(run, job, nbd_target, pids, run.runtime_s)
                    res["settle_s"] = round(site_mod.wait_settled(drva_status), 2)
                else:
                    res = run_fio(job, file_target, run.size, run.runtime_s)
                results[job][side].append(res)
                run.done()
    return results


def sha256_nbd(uri: str) -> str:
    """sha256 of a whole export, read by ``nbdcopy URI -``."""
    h = hashlib.sha256()
    proc = subprocess.Popen(["nbdcopy", uri, "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while chunk := proc.stdout.read(4 * MiB):
            h.update(chunk)
        _, err = proc.communicate(timeout=FIO_SLACK_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"nbdcopy {uri} exited {proc.returncode}: {err.decode()[-2000:]}")
    return h.hexdigest()


def mount_once(run: Run, store_dir: Path, name: str) -> dict[str, Any]:
    """One cold ``cdp mount``: the time to its first read, then fio random reads."""
    cold = site_mod.drop_caches()
    mount = site_mod.start_mount(run.procs, store_dir, name)
    try:
        data = site_mod.nbd_read(mount.address, site_mod.EXPORT, 0, FIRST_READ_BYTES)
        first_read_s = time.perf_counter() - mount.proc.started
        if len(data) != FIRST_READ_BYTES:
            raise RuntimeError(f"the first read returned {len(data)} bytes")
        reads = run_fio("read4k", Target.nbd(mount.uri), run.size, run.runtime_s)
    finally:
        summary = site_mod.stop_mount(run.procs, mount)
    return {"cold": cold, "serving_s": mount.serving_s, "first_read_s": first_read_s, "read_iops_4k": reads["iops"],
            "fetches": summary.get("fetches"), "bytes_fetched": summary.get("bytes_fetched")}


def mount_sha(run: Run, store_dir: Path) -> str:
    """The sha256 of the whole export of one more mount (untimed)."""
    mount = site_mod.start_mount(run.procs, store_dir, "mount-sha")
    try:
        return sha256_nbd(mount.uri)
    finally:
        site_mod.stop_mount(run.procs, mount)


def restore_once(run: Run, store_dir: Path, r: int) -> tuple[dict[str, Any], Path]:
    """One cold ``cdp recover --latest`` into a fresh directory; the image's path."""
    out_dir = run.root / f"restore-{r}"
    shutil.rmtree(out_dir, ignore_errors=True)
    cold = site_mod.drop_caches()
    proc = run.procs.start(f"recover-{r}", site_mod.cdp_argv("recover", store_dir, "--latest", "--to", str(out_dir),
                                                              "--json"), stdout_pipe=True)
    code = proc.popen.wait(site_mod.COMMIT_S_MAX)
    wall_s = time.perf_counter() - proc.started
    if code != 0:
        raise RuntimeError(f"cdp recover exited {code}: {proc.tail()}")
    doc = proc.next_json(5.0, "the recovery's summary")
    image = Path(doc["images"][0]["path"])
    res = {"cold": cold, "wall_s": wall_s, "inner_s": doc.get("seconds"), "bytes_fetched": doc.get("bytes_fetched")}
    return res, image


def recovery_rounds(run: Run, store_dir: Path, primary_sha: str) -> dict[str, Any]:
    """Mount and full restore, ``run.rounds`` times in ABBA order, each cold; then the
    checks: the first restored image against the primary, one more mount against it."""
    mounts: list[dict[str, Any]] = []
    restores: list[dict[str, Any]] = []
    file_reads: list[float] = []
    image_sha = None
    for r in range(run.rounds):
        for what in abba(r, "mount", "restore"):
            run.step(f"recovery round {r + 1}/{run.rounds}: {what}")
            if what == "mount":
                mounts.append(mount_once(run, store_dir, f"mount-{r}"))
            else:
                res, image = restore_once(run, store_dir, r)
                restores.append(res)
                if image_sha is None:
                    image_sha = sha256_file(image)
                file_reads.append(run_fio("read4k", Target.file(image, run.direct), run.size, run.runtime_s)["iops"])
                shutil.rmtree(image.parent)
            run.done()
    run.step("checks: the mount's export whole (nbdcopy)")
    mounted_sha = mount_sha(run, store_dir)
    run.done()
    return {"mounts": mounts, "restores": restores, "file_read_iops": file_reads,
            "restore_sha_equal": image_sha == primary_sha, "mount_sha_equal": mounted_sha == image_sha}


def protect_and_measure(run: Run) -> dict[str, Any]:
    """The capture phase: DRVA and site up, both sides filled, the rounds; then the site
    stopped and drained, the store committed, the DRVA stopped."""
    root, size = run.root, run.size
    log_size = (1 << 30) if run.size <= 256 * MiB else (2 << 30)
    doc = site_mod.drva_doc(root, size, log_size=log_size, seal_bytes=16 * MiB, seal_age_s=1.0)
    run.step("starting the DRVA and the site")
    drva, port = site_mod.start_drva(run.procs, root, doc)
    drva_status = Path(doc["state_dir"]) / "status.json"
    site = site_mod.start_site(run.procs, site_mod.write_cluster(root, port, size), drva_status)
    pids = {"site": site.proc.popen.pid, "drva": drva.popen.pid}
    plain = root / "plain.img"
    file_target = Target.file(plain, run.direct)
    run.done()
    run.step("filling the export")
    fill_nbd = measured_nbd(run, "fill", Target.nbd(site.uri), pids, None)
    fill_nbd["settle_s"] = round(site_mod.wait_settled(drva_status), 2)
    run.done()
    run.step("filling the file")
    fill_file = run_fio("fill", file_target, size, None)
    run.done()
    jobs = capture_rounds(run, site, drva_status, file_target, pids)
    run.step("stopping the site (drain), waiting for the catalog")
    summary = site_mod.stop_site(run.procs, site)
    dom = summary["domains"][site_mod.DOMAIN_NAME]
    commit_s = site_mod.wait_committed(root / "store", dom["acked_seq"])
    code = run.procs.stop(drva)
    if code != 0:
        raise RuntimeError(f"the DRVA exited {code}: {drva.tail()}")
    plain.unlink()
    run.done()
    return {"fill": {"nbd": fill_nbd, "file": fill_file}, "jobs": jobs, "last_seq": dom["acked_seq"],
            "writes": dom["writes"], "primary_sha": dom["sha256"][0], "commit_wait_s": commit_s}


def job_figures(jobs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """The medians and ratios of the write jobs (module docstring)."""
    def med(job: str, side: str, key: str) -> float | None:
        return median([r[key] for r in jobs[job][side]])

    out = {
        "file_iops_4k": med("4k", "file", "iops"), "nbd_iops_4k": med("4k", "nbd", "iops"),
        "file_mb_s_1m": med("1m", "file", "mb_s"), "nbd_mb_s_1m": med("1m", "nbd", "mb_s"),
        "flush_p99_ms": med("flush", "nbd", "sync_p99_ms"), "file_flush_p99_ms": med("flush", "file", "sync_p99_ms"),
        "nbd_iops_flush_job": med("flush", "nbd", "iops"), "file_iops_flush_job": med("flush", "file", "iops"),
    }
    out["ratio_vs_file_4k"] = ratio(out["nbd_iops_4k"], out["file_iops_4k"])
    out["ratio_vs_file_1m"] = ratio(out["nbd_mb_s_1m"], out["file_mb_s_1m"])
    return {k: v if k.startswith("ratio") else rounded(v, 1 if "iops" in k or "mb_s" in k else 3)
            for k, v in out.items()}


def per_round(jobs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Every round's figures, for the JSON line."""
    keys = {"4k": ("iops",), "1m": ("mb_s",), "flush": ("sync_p99_ms", "iops")}
    out: dict[str, Any] = {}
    for job, sides in jobs.items():
        for side, runs in sides.items():
            for key in keys[job]:
                out[f"{side}_{job}_{key}"] = [rounded(r[key], 2) for r in runs]
            if side == "nbd":
                for key in ("site_cpu_s", "drva_cpu_s", "settle_s"):
                    out[f"nbd_{job}_{key}"] = [r[key] for r in runs]
    return out


def build_result(args: Any, run: Run, cap: dict[str, Any], rec: dict[str, Any], store: dict[str, int],
                 work_fs: str, seconds: float) -> dict[str, Any]:
    mounts, restores = rec["mounts"], rec["restores"]
    cold = all(x["cold"] for x in mounts + restores)
    result: dict[str, Any] = {
        "benchmark": "nbd", "quick": args.quick, "disk_bytes": run.size, "rounds": run.rounds,
        "job_runtime_s": run.runtime_s, "work_fs": work_fs,
        "file_engine": "libaio, direct=1" if run.direct else "libaio, buffered (O_DIRECT refused on this file system)",
        "nbd_engine": "fio nbd (libnbd), one connection over TCP to 127.0.0.1",
        **job_figures(cap["jobs"]),
        "nbd_fill_mb_s": rounded(cap["fill"]["nbd"]["mb_s"], 1),
        "file_fill_mb_s": rounded(cap["fill"]["file"]["mb_s"], 1),
        "mount_first_read_s": rounded(median([m["first_read_s"] for m in mounts])),
        "mount_serving_s": rounded(median([m["serving_s"] for m in mounts])),
        "mount_first_read_via": "in-process minimal NBD client (connect, NBD_OPT_GO, one 4 KiB READ at offset 0)",
        "mount_read_iops_4k": rounded(median([m["read_iops_4k"] for m in mounts]), 1),
        "file_read_iops_4k": rounded(median(rec["file_read_iops"]), 1),
        "full_restore_s": rounded(median([r["wall_s"] for r in restores])),
        "full_restore_inner_s": rounded(median([r["inner_s"] for r in restores])),
        "cold": cold, "cold_how": "sync + echo 1 > /proc/sys/vm/drop_caches before each mount and restore"
        if cold else "warm: dropping the page cache was not permitted",
        "recovered_disk": "written through the export: sequential fill, then the rounds' random 4 KiB and "
                          "sequential 1 MiB overwrites (no base image)",
        "store_segments": store["segments"], "store_bytes": store["bytes"], "last_seq": cap["last_seq"],
        "captured_writes": cap["writes"], "commit_wait_s": rounded(cap["commit_wait_s"]),
        "mount_sha_equal": rec["mount_sha_equal"], "restore_sha_equal": rec["restore_sha_equal"],
        "per_round": {**per_round(cap["jobs"]),
                      "mount_first_read_s": [rounded(m["first_read_s"]) for m in mounts],
                      "mount_serving_s": [rounded(m["serving_s"]) for m in mounts],
                      "mount_read_iops_4k": [rounded(m["read_iops_4k"], 1) for m in mounts],
                      "mount_fetches": [m["fetches"] for m in mounts],
                      "full_restore_s": [rounded(r["wall_s"]) for r in restores],
                      "file_read_iops_4k": [rounded(x, 1) for x in rec["file_read_iops"]]},
        "seconds": round(seconds, 1),
    }
    targets = check_targets(result)
    result["targets"] = targets
    result["targets_met"] = sorted(k for k, t in targets.items() if t["met"])
    result["targets_missed"] = sorted(k for k, t in targets.items() if not t["met"])
    result["all_targets_met"] = not result["targets_missed"]
    return result


def store_stats(store_dir: Path) -> dict[str, int]:
    files = [p for p in store_dir.rglob("*") if p.is_file()]
    return {"segments": sum(1 for p in files if p.name.endswith(".seg")), "bytes": sum(p.stat().st_size for p in files)}


def table(r: dict[str, Any]) -> list[tuple[str, str]]:
    def t(name: str) -> str:
        x = r["targets"][name]
        return f"(target {x['target']}: {'met' if x['met'] else 'MISSED'})"

    return [
        ("disk", f"{r['disk_bytes'] / MiB:,.0f} MiB, {r['rounds']} rounds ABBA, {r['job_runtime_s']} s jobs, "
                 f"file side: {r['file_engine']} on {r['work_fs']}"),
        ("4 KiB randwrite qd32 IOPS", f"file {r['file_iops_4k']:,.0f}  nbd {r['nbd_iops_4k']:,.0f}  "
                                      f"ratio {r['ratio_vs_file_4k']} {t('ratio_vs_file_4k')}"),
        ("1 MiB seq write qd8 MB/s", f"file {r['file_mb_s_1m']:,.1f}  nbd {r['nbd_mb_s_1m']:,.1f}  "
                                     f"ratio {r['ratio_vs_file_1m']} {t('ratio_vs_file_1m')}"),
        ("flush every 16 writes, p99", f"nbd {r['flush_p99_ms']} ms  file {r['file_flush_p99_ms']} ms"),
        ("fill (seq 1 MiB, once)", f"file {r['file_fill_mb_s']} MB/s  nbd {r['nbd_fill_mb_s']} MB/s"),
        ("mount: first 4 KiB read", f"{r['mount_first_read_s']} s (serving after {r['mount_serving_s']} s) "
                                    f"{t('mount_first_read_s')}"),
        ("mount: 4 KiB randread qd32", f"{r['mount_read_iops_4k']:,.0f} IOPS (recovered file: "
                                       f"{r['file_read_iops_4k']:,.0f})"),
        ("full restore (cdp recover)", f"{r['full_restore_s']} s ({r['store_segments']} segments)"),
        ("page cache", "cold" if r["cold"] else "WARM (drop_caches not permitted)"),
        ("checks", f"mount sha == restore: {r['mount_sha_equal']}, restore sha == primary: {r['restore_sha_equal']}"),
    ]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    size = (256 if args.quick else 1024) * MiB
    rounds = ROUNDS_QUICK if args.quick else ROUNDS
    t0 = time.perf_counter()
    with work_dir(args) as d:
        root = Path(d)
        work_fs = site_mod.fs_type(root)
        steps = 3 + 2 * len(WRITE_JOBS) * rounds + 1 + 2 * rounds + 1
        bar = progress(steps, "nbd", unit="step")
        procs = Processes(root / "logs")
        run = Run(root, procs, size, rounds, RUNTIME_S_QUICK if args.quick else RUNTIME_S, direct_io_ok(root), bar)
        try:
            cap = protect_and_measure(run)
            store = store_stats(root / "store")
            rec = recovery_rounds(run, root / "store", cap["primary_sha"])
        finally:
            procs.close()
            bar.close()
    result = build_result(args, run, cap, rec, store, work_fs, time.perf_counter() - t0)
    emit(args, result, table(result))
    if not (result["mount_sha_equal"] and result["restore_sha_equal"]):
        raise SystemExit("nbd: the recovered disk does not hold what was written (see mount_sha_equal, "
                         "restore_sha_equal)")


if __name__ == "__main__":
    main()
