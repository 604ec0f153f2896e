"""``benchmarks.scale --quick`` (10 domains of 15 disks, for 1.5 s): every
field is there and sane — not its speed, which a shared CI machine cannot promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks._common import last_json_line

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 240  # bounds a hang, not a speed


def test_scale_quick_reports_every_field(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--quick", "--json", "--dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    r = last_json_line(done.stdout)
    assert r["benchmark"] == "scale" and r["quick"] is True
    assert [(c["domains"], c["disks"], c["hosts"]) for c in r["configs"]] == [(10, 150, 8)]
    for c in r["configs"]:
        assert c["mb_per_s"] > 0 and c["cpu_s_per_gb"] > 0
        assert 0 < c["rss_mb_max"] < 4096
        assert c["rss_mb_end"] <= c["rss_mb_max"]
        assert 0 <= c["rpo_p50_s"] and 0 <= c["rpo_p99_s_median"] <= c["rpo_p99_s_max"]
        assert c["rpo_samples"] >= 1 and 0 <= c["bitmap_domains"] <= c["domains"]
        assert c["drain_s"] >= 0 and c["inflight_segments_max"] >= 0
    top = r["configs"][-1]
    assert (r["rss_mb_max"], r["rpo_p99_s_max"], r["cpu_s_per_gb"]) == (
        top["rss_mb_max"], top["rpo_p99_s_max"], top["cpu_s_per_gb"])
    assert r["targets_met"] is False  # quick mode never stands for the 100-domain target
    assert r["rpo_series"] and all(len(p) == 3 and p[1] <= p[2] for p in r["rpo_series"])
    assert r["machine"]["cores"] >= 1 and r["machine"]["fs_type"]
    assert not list(tmp_path.iterdir())  # the work dir is cleaned up
