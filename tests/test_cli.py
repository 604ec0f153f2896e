"""The ``cdp`` command as a user runs it: subprocesses, exit codes, ``--json``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The demo writes, uploads, recovers and verifies: tens of seconds; bounds a hang.
CLI_EXIT_S = 300.0


def cdp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdp.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=CLI_EXIT_S)


def test_demo_json_verifies_every_image(tmp_path):
    r = cdp("demo", "--json", "--disk-size", "16MiB", "--writes-mb", "48", "--dir", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["verified"] is True and out["verified_mark"] and out["verified_latest"]
    assert out["segments"] >= 2 and out["writes"] > 100 and 1 < out["mark_seq"] < out["committed_seq"]
    assert out["rpo_lag_max_s"] is not None and out["recover_latest_mb_per_s"] > 0
    # The recovered images are really there, and equal the simulated primaries at latest.
    d = tmp_path / "d"
    primaries = sorted((d / "sim-state").glob("*.img"))
    assert len(primaries) == 3
    for prim in primaries:
        assert (d / "recovered-latest" / prim.name).read_bytes() == prim.read_bytes()
    # It ran through the daemon: the mark was a job, the DRVA ran under supervision.
    assert any("mark" in p.name for p in (d / "msa" / "jobs").glob("*.json"))
    # With no daemon (and no API token in this shell) the job records are read from disk.
    r = cdp("jobs", "--config", str(d / "site.toml"), "--json")
    assert r.returncode == 0, r.stderr
    assert [j["name"] for j in json.loads(r.stdout)["jobs"]] == ["mark"]
    assert (d / "msa" / "logs" / "drva-1.log").stat().st_size > 0


def test_log_format_and_info(tmp_path):
    path = tmp_path / "replog"
    r = cdp("log", "format", str(path), "--size", "4MiB", "--label", "drva-1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["label"] == "drva-1"
    r = cdp("log", "info", str(path), "--json")
    info = json.loads(r.stdout)
    assert info["frames"] == 0 and info["head"] == info["tail"] == 0 and info["epoch"] == 0


def test_bad_input_gets_a_clear_error_and_exit_code(tmp_path):
    r = cdp("log", "format", str(tmp_path / "x"), "--size", "lots")
    assert r.returncode == 2 and "not a size" in r.stderr
    r = cdp("log", "format", str(tmp_path / "tiny"), "--size", "64KiB")
    assert r.returncode == 2 and "at least" in r.stderr
    (tmp_path / "junk").write_bytes(b"\0" * 65536)
    r = cdp("log", "info", str(tmp_path / "junk"))
    assert r.returncode == 4 and "no valid superblock" in r.stderr


def test_points_recover_verify_on_the_demo_store(tmp_path):
    d = tmp_path / "d"
    r = cdp("demo", "--json", "--disk-size", "8MiB", "--writes-mb", "24", "--dir", str(d))
    assert r.returncode == 0, r.stderr
    mark_seq = json.loads(r.stdout.splitlines()[-1])["mark_seq"]
    store = ["--store", f"file://{d / 'store'}"]
    pts = json.loads(cdp("points", "erp", *store, "--json").stdout)
    assert pts["marks"][0]["name"] == "demo-mark" and pts["marks"][0]["consistent"]
    assert pts["latest"] == pts["committed_seq"]
    r = cdp("recover", "erp", *store, "--mark", "demo-mark", "--to", str(tmp_path / "out"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["seq"] == mark_seq
    for ref in sorted((d / "recovered-mark").glob("*.img")):  # the demo's recovery, checked against the primaries
        assert (tmp_path / "out" / ref.name).read_bytes() == ref.read_bytes()
    r = cdp("recover", "erp", *store, "--seq", "999999", "--to", str(tmp_path / "bad"))
    assert r.returncode == 2 and "nearest" in r.stderr
    assert json.loads(cdp("verify", "1", *store, "--deep", "--json").stdout)["ok"] is True
    # The last stored byte of the newest segment's last block: the last payload written, which no later write
    # supersedes, so consolidation must read it (a block whose writes were all overwritten later is rightly skipped).
    seg = sorted((d / "store" / "d" / "00000001" / "seg" / "00000001").iterdir())[-1]
    raw = bytearray(seg.read_bytes())
    damaged_at = int.from_bytes(raw[-64 + 32:-64 + 40], "little") - 1  # footer `index_offset` (FORMAT.md §5.5)
    raw[damaged_at] ^= 1
    seg.write_bytes(bytes(raw))
    r = cdp("verify", "erp", *store, "--deep")
    assert r.returncode == 6 and seg.name in r.stdout
    # Consolidation reads the damaged segment: it stops and names it, the catalog unchanged.
    r = cdp("consolidate", "erp", *store, "--older-than", "0", "--retention", "0", "--json")
    assert r.returncode == 3 and seg.name in r.stderr, r.stderr
    raw[damaged_at] ^= 1
    seg.write_bytes(bytes(raw))
    r = cdp("consolidate", "erp", *store, "--older-than", "0", "--retention", "0", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    latest = pts["latest"]
    assert out["consolidated_seq"] == out["horizon_seq"] == latest and out["segments_removed"] >= 2
    assert not seg.exists()
    r = cdp("recover", "erp", *store, "--latest", "--to", str(tmp_path / "after"), "--json")
    assert r.returncode == 0, r.stderr
    for ref in sorted((d / "recovered-latest").glob("*.img")):
        assert (tmp_path / "after" / ref.name).read_bytes() == ref.read_bytes()
    r = cdp("recover", "erp", *store, "--mark", "demo-mark", "--to", str(tmp_path / "gone"))
    assert r.returncode == 2 and "no mark named" in r.stderr  # dropped with the horizon
    r = cdp("recover", "erp", *store, "--seq", str(mark_seq), "--to", str(tmp_path / "gone"))
    assert r.returncode == 2 and "outside retention" in r.stderr and f"seq {latest}" in r.stderr
    assert json.loads(cdp("verify", "erp", *store, "--deep", "--json").stdout)["ok"] is True
    r = cdp("consolidate", "erp", *store, "--older-than", "soon")
    assert r.returncode == 2 and "duration" in r.stderr
    for share in ("nan", "inf", "2", "-1"):  # NaN deep-checked nothing and said OK
        r = cdp("verify", "erp", *store, "--sample", share)
        assert r.returncode == 2 and "--sample" in r.stderr and "Traceback" not in r.stderr, (share, r.stderr)
    r = cdp("consolidate", "erp", *store, "--concurrency", "0")  # was an AssertionError traceback
    assert r.returncode == 2 and "--concurrency" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_protect_refuses_an_rpo_target_that_is_not_a_positive_number(tmp_path):
    """NaN reached the REST API, which refused it as "not JSON" without naming the option;
    now the CLI refuses it, and infinities, zero and negatives, naming ``--rpo-target``
    (the API still checks the policy's own range)."""
    for value in ("nan", "inf", "0", "-5"):
        r = cdp("protect", "erp", "--config", str(tmp_path / "never-read.toml"), "--rpo-target", value)
        assert r.returncode == 2 and "--rpo-target" in r.stderr and "Traceback" not in r.stderr, (value, r.stderr)
