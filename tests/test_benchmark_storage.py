"""``benchmarks.storage --quick`` (a 32 MiB disk, 10 % of it changed by random 4 KiB
writes): the store's growth is there and sane, and so are restic's and borg's when they
are installed (the benchmark itself installs them; the test does not wait for apt-get)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks._common import last_json_line

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 240  # bounds a hang, not a speed


def test_storage_quick_reports_growth_beside_the_peers(tmp_path):
    peers = shutil.which("restic") is not None and shutil.which("borg") is not None
    cmd = [sys.executable, "-m", "benchmarks.storage", "--quick", "--json", "--dir", str(tmp_path)]
    done = subprocess.run(cmd + ([] if peers else ["--no-peers"]), cwd=ROOT, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    r = last_json_line(done.stdout)
    assert r["benchmark"] == "storage" and r["quick"] is True and r["peers"] is peers
    assert r["changed_bytes"] == r["writes"] * 4096 == r["disk_bytes"] // 10 // 4096 * 4096
    # Every changed byte is in the store once (incompressible), plus indexes and catalog.
    assert r["changed_bytes"] <= r["store_growth_bytes"] == sum(r["growth_by_kind"].values())
    assert r["growth_by_kind"]["segments"] >= r["changed_bytes"] and r["growth_by_kind"]["bases"] == 0
    assert r["growth_vs_changed"] == round(r["store_growth_bytes"] / r["changed_bytes"], 4)
    assert r["seed_store_bytes"] > 0 and r["seed_chunks_stored"] > 0
    for name in ("restic", "borg"):
        if peers:
            assert r[f"{name}_seed_bytes"] > 0 and r[f"{name}_growth_bytes"] > 0
            assert r[f"{name}_growth_vs_changed"] > 0 and r[f"{name}_version"]
        else:
            assert r[f"{name}_growth_vs_changed"] is None
    assert not list(tmp_path.iterdir())
