"""``benchmarks.ingest``: its smoke run gives every field, sane (never its speed), and its
parts — the DRVA-only sender's frames, the CPU attribution, the tmpfs refusal — do what
they say."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from benchmarks import ingest
from benchmarks._profile import attribute
from benchmarks._sender import frame_pool, records_per_frame, stamp
from benchmarks._stages import STAGES, fs_type
from cdp.frame import decode_frame, encode_frame

ROOT = Path(__file__).resolve().parents[1]
#: The smoke run takes about 15 s on an idle 2-core machine; this bounds a hang.
SMOKE_WITHIN_S = 300


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_smoke_run_gives_every_field_sane(tmp_path: Path) -> None:
    d = tmp_path
    if fs_type(d) in ("tmpfs", "ramfs"):  # the benchmark refuses tmpfs: run beside the checkout
        d = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=ROOT))
    try:
        run = subprocess.run([sys.executable, "-m", "benchmarks.ingest", "--smoke", "--json", "--dir", str(d)],
                             cwd=ROOT, capture_output=True, text=True, timeout=SMOKE_WITHIN_S)
    finally:
        if d != tmp_path:
            shutil.rmtree(d, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "ingest" and result["mode"] == "smoke"
    for field in ("mb_per_s_64k", "drva_only_mb_per_s", "drva_only_writes_per_s_4k", "e2e_vs_drva_only",
                  "raw_mb_per_s", "ratio_vs_raw", "compression_ratio", "ceiling_mb_per_s", "ratio_vs_ceiling",
                  "bare_cpu_s_per_gb", "drva_cpu_s_per_gb", "cpu_vs_bare", "writes_per_s_4k", "bare_log_mb_per_s"):
        assert _positive(result[field]), (field, result[field])
    assert math.isfinite(result["rpo_p99_s"]) and result["rpo_p99_s"] >= 0
    assert len(result["rpo_series"]) == result["rpo_samples"] > 0
    # The ceiling is the raw append over (1 + 1 / compression), measured in the same run.
    cr = result["compression_ratio"]
    assert 1.0 < cr < 10.0
    assert result["ceiling_mb_per_s"] == pytest.approx(result["raw_mb_per_s"] / (1 + 1 / cr), rel=0.01)
    # The CPU ceiling: the cores spent on the bare stages alone, measured in the same run.
    assert result["cpu_ceiling_mb_per_s"] == pytest.approx(
        result["cores"] * 1000 / result["bare_cpu_s_per_gb"], rel=0.01)
    assert result["ceiling_bound"] == ("cpu" if result["cpu_ceiling_mb_per_s"] < result["ceiling_mb_per_s"] else "disk")
    stages = result["stages"]
    assert set(STAGES) <= set(stages)
    for name in STAGES:
        assert _positive(stages[name]["bare_cpu_s_per_gb"]), name
    assert result["bare_cpu_s_per_gb"] == pytest.approx(sum(stages[n]["bare_cpu_s_per_gb"] for n in STAGES), abs=0.01)
    per_stage = [v["drva_cpu_s_per_gb"] for v in stages.values()]
    if result["cpu_attribution"] is not None:  # py-spy could attach
        assert all(math.isfinite(x) and x >= 0 for x in per_stage)
        assert sum(per_stage) == pytest.approx(result["drva_cpu_s_per_gb"], rel=0.02)
        assert sum(result["cpu_attribution"].values()) == pytest.approx(1.0, abs=0.01)
    else:
        assert per_stage == [None] * len(per_stage)
    for name in ("raw", "only", "only_cpu", "e2e", "only4"):
        assert len(result["rounds"][name]) == 1 and all(_positive(x) for x in result["rounds"][name])


def test_sender_frames_are_valid_and_numbered_from_any_seq() -> None:
    pool = frame_pool(4 << 10, pool_bytes=2 << 20)
    assert len(pool) == 2 and len(pool[0][0]) == records_per_frame(4 << 10) == 256
    records, payload = pool[1]
    frame = decode_frame(encode_frame(9, stamp(records, 1000, 12345), payload))
    assert (frame.first_seq, frame.last_seq, frame.domain) == (1000, 1255, 9)
    assert (frame.records["timestamp_ns"] == 12345).all() and bytes(frame.payload) == payload
    assert (pool[1][0]["seq"] == 0).all()  # stamp copies: the pool is replayed as built


def test_attribution_splits_each_threads_cpu_by_its_samples_without_waits() -> None:
    raw = "\n".join([
        "<module> (drva/daemon.py:1);read_message (cdp/wire.py:2) 30",
        "<module> (drva/daemon.py:1);Session._frame (drva/session.py:3);decode_frame (cdp/frame.py:4) 10",
        "Thread._bootstrap (threading.py:1);_pack_blocks (cdp/segment_build.py:5);_pack_block (x.py:6) 50",
        "Thread._bootstrap (threading.py:1);GroupCommitter._append (drva/committer.py:7);"
        "ReplicationLog._commit (cdp/replog.py:8) 20",
        # A wait (fdatasync) is not CPU: left out.
        "Thread._bootstrap (threading.py:1);ReplicationLog._commit (cdp/replog.py:8);"
        "sync_data (cdp/durable.py:%d) 500" % _line_of("cdp/durable.py", "os.fdatasync"),
    ])
    shares = attribute(raw, {"main": 2.0, "pack": 1.0, "worker": 1.0})
    assert shares["socket_receive"] == pytest.approx(0.5 * 30 / 40)
    assert shares["frame_validation"] == pytest.approx(0.5 * 10 / 40)
    assert shares["lz4"] == pytest.approx(0.25) and shares["log_write"] == pytest.approx(0.25)
    alone = attribute(raw, None)  # no thread CPU: the samples' shares
    assert alone["lz4"] == pytest.approx(50 / 110)


def _line_of(path: str, text: str) -> int:
    lines = (ROOT / path).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


def test_refuses_tmpfs(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(ingest, "fs_type", lambda d: "tmpfs")
    with pytest.raises(SystemExit, match="tmpfs"):
        ingest.refuse_tmpfs(tmp_path)
    monkeypatch.setattr(ingest, "fs_type", lambda d: "ext4")
    ingest.refuse_tmpfs(tmp_path)
    assert os.path.isdir(tmp_path)


def test_drained_phases_drop_only_the_segments_the_drva_committed(tmp_path: Path) -> None:
    # A full run receives ~95 GB: kept, its segments filled the disk and the DRVA stalled.
    from cdp.layout import segment_key

    store = tmp_path / "store"
    keys = {segment_key(1, 1, 1, 10): True, segment_key(1, 1, 11, 20): False,  # domain 1 committed up to 10
            segment_key(2, 1, 1, 5): True, segment_key(3, 1, 1, 5): False}  # domain 3: not in the status
    for key in keys:
        (store / key).parent.mkdir(parents=True, exist_ok=True)
        (store / key).write_bytes(bytes(100))
    (store / "d/00000001/cat").mkdir(parents=True)
    (store / "d/00000001/cat/0000000000000001.cat").write_bytes(b"catalog")
    doc = {"store": f"file://{store}", "domains": [{"id": 1, "committed_seq": 10}, {"id": 2, "committed_seq": 9}]}
    assert ingest.drop_committed_segments(doc) == 200
    assert {key: (store / key).exists() for key in keys} == {key: not gone for key, gone in keys.items()}
    assert (store / "d/00000001/cat/0000000000000001.cat").exists()
