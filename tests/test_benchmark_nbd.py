"""The NBD benchmark's own parts (``benchmarks.nbd``, ``benchmarks._nbd_site``): fio's
JSON read right (IOPS, MB/s, the p99 of its ``sync`` latency), the same job on both
sides but for engine and target, ABBA order, medians and ratios, the targets, and the
minimal NBD client that times the first read of a mount."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from benchmarks import _nbd_site as site_mod
from benchmarks.nbd import (
    TARGETS,
    WRITE_JOBS,
    Target,
    abba,
    check_targets,
    direct_io_ok,
    fio_argv,
    job_figures,
    median,
    parse_fio,
    ratio,
    run_fio,
)
from cdp.nbd.backend import FileBackend
from cdp.nbd.server import NbdServer

MiB = 1 << 20


def fio_doc(*, iops=1000.0, bw_bytes=4_096_000, ddir="write", sync_p99_ns=None, error=0) -> dict:
    side = {"iops": iops, "bw_bytes": bw_bytes, "io_bytes": 8_192_000, "runtime": 2000}
    sync = {"total_ios": 0, "lat_ns": {"min": 0, "max": 0, "mean": 0.0, "N": 0}}
    if sync_p99_ns is not None:
        sync = {"total_ios": 42, "lat_ns": {"N": 42, "percentile": {"50.000000": 1000, "99.000000": sync_p99_ns}}}
    empty = {"iops": 0.0, "bw_bytes": 0, "io_bytes": 0, "runtime": 0}
    job = {"jobname": "j", "error": error, "read": empty, "write": empty, "sync": sync}
    job[ddir] = side
    return {"fio version": "fio-3.33", "jobs": [job]}


def test_parse_fio_reads_iops_bandwidth_and_the_sync_p99_after_warnings():
    text = "fio: some warning on stdout\n" + json.dumps(fio_doc(iops=2500.5, bw_bytes=104_857_600,
                                                              sync_p99_ns=33_488_896))
    got = parse_fio(text)
    assert got["iops"] == 2500.5
    assert got["mb_s"] == pytest.approx(104.8576)
    assert got["runtime_s"] == 2.0 and got["io_bytes"] == 8_192_000
    assert got["syncs"] == 42 and got["sync_p99_ms"] == pytest.approx(33.488896)


def test_parse_fio_without_syncs_reads_side_and_has_no_p99():
    got = parse_fio(json.dumps(fio_doc(iops=64000.0, ddir="read")), "read")
    assert got["iops"] == 64000.0 and got["syncs"] == 0 and got["sync_p99_ms"] is None


def test_parse_fio_refuses_a_failed_job_and_no_json():
    with pytest.raises(RuntimeError, match="error 5"):
        parse_fio(json.dumps(fio_doc(error=5)))
    with pytest.raises(ValueError, match="no JSON"):
        parse_fio("fio: engine nbd not loadable\n")


def test_both_sides_run_the_same_job_but_for_engine_and_target(tmp_path):
    nbd = Target.nbd("nbd://127.0.0.1:1234/vm/disk0")
    plain = Target.file(tmp_path / "plain.img", direct=True)
    for job in (*WRITE_JOBS, "fill", "read4k"):
        a = fio_argv(job, nbd, 256 * MiB, 2.0)
        b = fio_argv(job, plain, 256 * MiB, 2.0)
        assert [x for x in a if x not in nbd.args] == [x for x in b if x not in plain.args]
        assert "--runtime=2000ms" in a and "--time_based=1" in a
        assert ("--end_fsync=1" in a) == (job != "read4k")
    assert "--direct=1" in plain.args and "--ioengine=libaio" in plain.args
    assert "--direct=0" in Target.file(tmp_path / "p", direct=False).args
    assert not any(x.startswith("--runtime") for x in fio_argv("fill", nbd, MiB, None))


def test_abba_alternates_which_side_goes_first():
    assert [abba(r, "file", "nbd") for r in range(4)] == [("file", "nbd"), ("nbd", "file")] * 2


def test_median_and_ratio():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([1.0, None, 3.0]) == 2.0
    assert median([]) is None
    assert ratio(1.0, 3.0) == 0.333
    assert ratio(None, 3.0) is None and ratio(1.0, 0.0) is None and ratio(1.0, None) is None


def test_job_figures_are_medians_over_rounds_and_ratios_of_the_medians():
    def runs(*values, key):
        return [{"iops": 0.0, "mb_s": 0.0, "sync_p99_ms": None, key: v} for v in values]

    jobs = {
        "4k": {"file": runs(30000.0, 10000.0, 20000.0, key="iops"), "nbd": runs(5000.0, 6000.0, 4000.0, key="iops")},
        "1m": {"file": runs(1000.0, 900.0, 800.0, key="mb_s"), "nbd": runs(400.0, 450.0, 500.0, key="mb_s")},
        "flush": {"file": runs(2.0, 3.0, 1.0, key="sync_p99_ms"), "nbd": runs(30.0, 10.0, 20.0, key="sync_p99_ms")},
    }
    got = job_figures(jobs)
    assert got["file_iops_4k"] == 20000.0 and got["nbd_iops_4k"] == 5000.0 and got["ratio_vs_file_4k"] == 0.25
    assert got["file_mb_s_1m"] == 900.0 and got["nbd_mb_s_1m"] == 450.0 and got["ratio_vs_file_1m"] == 0.5
    assert got["flush_p99_ms"] == 20.0 and got["file_flush_p99_ms"] == 2.0


def test_targets_say_which_are_met():
    got = check_targets({"ratio_vs_file_1m": 0.5, "ratio_vs_file_4k": 0.29, "mount_first_read_s": None})
    assert set(got) == set(TARGETS)
    assert got["ratio_vs_file_1m"] == {"target": ">= 0.5", "value": 0.5, "met": True}
    assert got["ratio_vs_file_4k"]["met"] is False
    assert got["mount_first_read_s"]["met"] is False  # missing is not met
    assert check_targets({"mount_first_read_s": 1.9})["mount_first_read_s"]["met"] is True
    assert check_targets({"mount_first_read_s": 2.1})["mount_first_read_s"]["met"] is False


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_a_short_real_flush_job_has_a_sync_p99(tmp_path):
    got = run_fio("flush", Target.file(tmp_path / "f.img", direct_io_ok(tmp_path)), 4 * MiB, 0.3)
    assert got["iops"] > 0 and got["syncs"] > 0
    assert got["sync_p99_ms"] is not None and got["sync_p99_ms"] > 0


async def test_the_minimal_client_reads_an_export(tmp_path):
    path = tmp_path / "disk.img"
    content = bytes(range(256)) * (64 * 1024 // 256)
    path.write_bytes(content)
    backend = FileBackend(path, read_only=True)
    server = NbdServer({site_mod.EXPORT: backend})
    address = await server.start_tcp("127.0.0.1", 0)
    try:
        got = await asyncio.to_thread(site_mod.nbd_read, address, site_mod.EXPORT, 8192, 4096)
        assert got == content[8192:12288]
        with pytest.raises(ConnectionError, match="NBD_OPT_GO"):
            await asyncio.to_thread(site_mod.nbd_read, address, "vm/absent", 0, 4096)
    finally:
        await server.close()
        backend.close()


def test_fs_type_finds_the_mount_of_a_path(tmp_path):
    assert site_mod.fs_type(tmp_path) not in ("", None)
