"""``benchmarks.report``: run end to end on a quick subset (``--only scale``), the page is
written in Markdown and HTML, both show the machine and the targets, and every chart
they name is a PNG beside them. Rendered from results of every benchmark, each chart is
drawn; from results that lack fields (an ingest without per-stage figures, a recovery
without restic) the page says not measured, and a failed benchmark is never filled in."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from benchmarks import report

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 300  # bounds a hang, not a speed
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MACHINE = {"cores": 2, "cores_usable": 2, "cpu": "cpu", "memory_gib": 1, "path": "/x", "fs_type": "ext4",
           "disk": "vda", "load_1m": 0.1}


def images_of(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)


def test_report_quick_subset_writes_the_page_and_its_charts(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "benchmarks.report", "--out", str(out), "--quick", "--only", "scale",
                           "--dir", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert sorted(images_of(md)) == ["rpo.png", "scale.png"]
    for name in images_of(md):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f'src="{name}"' in page
    for text in (md, page):
        assert "Machine" in text and "Targets" in text and "rpo_p99_s_max" in text
        assert "n/a: 10 domains (the target is for 100)" in text  # quick: not the target's configuration
    doc = json.loads((out / "results.json").read_text())
    assert doc["benchmarks"] == ["scale"] and doc["machine"]["fs_type"] != "tmpfs"
    assert doc["results"]["scale"]["benchmark"] == "scale"
    assert (out / doc["runs"]["scale"]["run"]["log"]).is_file()
    assert json.loads(done.stdout.strip().splitlines()[-1])["failed"] == []


def results_of_every_benchmark() -> dict:
    return {
        "ingest": {"mb_per_s_64k": 300.0, "rpo_p99_s": 0.8,
                   "stages": {"socket_receive": {"bare_cpu_s_per_gb": 0.2, "drva_cpu_s_per_gb": 0.5},
                              "lz4": {"bare_cpu_s_per_gb": 1.0, "drva_cpu_s_per_gb": None}}},
        "log_append": {"mb_per_s": 500.0, "ratio_vs_raw": 0.95},
        "recovery": {"disk_bytes": 1 << 30, "recover_latest_s": 2.0, "cp_s": 1.8, "restic_restore_s": None,
                     "churn16_recover_s": 2.2, "ratio_vs_cp": 0.9},
        "history": {"sizes": [{"segments": 1000, "plan_mid_s": 0.01, "load_s": 0.01, "commit_p99_ms": 5.0},
                              {"segments": 100000, "plan_mid_s": 0.02, "load_s": 0.02, "commit_p99_ms": 6.0}]},
        "failover": {"rto_cold_s": 10.0, "rto_warm_s": 3.0, "rto_warm_4x_s": 3.3, "recover_s": 8.0},
        "failback": {"failback_s": 2.0, "checksum_scan_s": 20.0, "full_copy_s": 15.0, "failback_from_store_s": 3.0},
        "nbd": {"nbd_iops_4k": 5000.0},
        "scale": {"domains_max": 100, "rss_mb_max": 120.0, "rpo_p99_s_max": 2.5,
                  "configs": [{"domains": 100, "disks": 1500, "rss_mb_max": 120.0, "rpo_p99_s_max": 2.5,
                               "cpu_s_per_gb": 7.0, "mb_per_s": 100.0, "rpo_p99_s_median": 2.0}],
                  "rpo_series": [[0.0, 0.5, 1.0], [0.5, 0.7, 2.5]]},
        "storage": {"growth_vs_changed": 1.01, "restic_growth_vs_changed": 6.0, "borg_growth_vs_changed": 7.0},
    }


def test_every_chart_is_drawn_and_missing_fields_are_not_measured(tmp_path):
    results = results_of_every_benchmark()
    runs = {n: {"run": {"command": f"-m benchmarks.{n}", "exit": 0, "seconds": 1.0, "log": f"logs/{n}.log"},
                "result": r} for n, r in results.items()}
    doc = {"started": "now", "commit": "abc", "quick": False, "seconds": 9.0, "benchmarks": list(results),
           "runs": runs, "results": results, "machine": MACHINE}
    md = report.render_md(report.page(doc, report.make_charts(results, tmp_path)))
    assert sorted(images_of(md)) == ["failback.png", "history.png", "ingest_stages.png", "recovery.png", "rpo.png",
                                     "rto.png", "scale.png", "storage.png"]
    assert all((tmp_path / name).read_bytes()[:8] == PNG_MAGIC for name in images_of(md))
    assert "restic restore, borg extract: not measured" in md
    assert "| scale | `rpo_p99_s_max` | <= 2 | 2.5 | **no** |" in md
    assert "| storage | `growth_vs_changed` | <= 1.1 | 1.01 | yes |" in md
    del results["ingest"]["stages"]
    (tmp_path / "again").mkdir()
    md = report.render_md(report.page(doc, report.make_charts(results, tmp_path / "again")))
    assert "per-stage CPU not measured" in md and "ingest_stages.png" not in md


def test_a_failed_benchmark_is_not_measured(tmp_path):
    runs = {"storage": {"run": {"command": "-m benchmarks.storage", "exit": 1, "seconds": 0.1,
                                "log": "logs/storage.log"}, "error": "benchmarks.storage: restic not installed"}}
    doc = {"started": "now", "commit": "abc", "quick": True, "seconds": 0.1, "benchmarks": ["storage"], "runs": runs,
           "results": {"storage": None}, "machine": MACHINE}
    blocks = report.page(doc, report.make_charts(doc["results"], tmp_path))
    md, page = report.render_md(blocks), report.render_html(blocks)
    assert "Failed: not measured" in md and "restic not installed" in md and "restic not installed" in page
    assert "| storage | `growth_vs_changed` | <= 1.1 | not measured | not measured |" in md
    assert not list(tmp_path.glob("*.png"))
