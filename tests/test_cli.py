"""The ``cdp`` command as a user runs it: subprocesses, exit codes, ``--json``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cdp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdp.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_demo_json_verifies_every_image(tmp_path):
    r = cdp("demo", "--json", "--disk-size", "16MiB", "--writes-mb", "48", "--dir", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["verified"] is True and out["verified_mark"] and out["verified_latest"]
    assert out["segments"] >= 2 and out["writes"] > 100 and out["mark_seq"] > 1
    # The recovered images are really there, and equal the primaries at latest.
    d = tmp_path / "d"
    for prim in sorted(d.glob("primary-*.img")):
        name = prim.name.removeprefix("primary-")
        assert (d / "recovered-latest" / name).read_bytes() == prim.read_bytes()


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
