"""What a process of ours loads as it starts: the product starts one per CLI verb, job,
host and DRVA, so what each start costs is paid many times (the test suite starts about
800). Each check runs a fresh interpreter without the variables it is about."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("drva.daemon", "iofilter_sim.__main__", "rocva.__main__", "cdp.cli", "benchmarks.ingest")


def started(code: str, env: dict[str, str] | None = None) -> dict:
    """What ``code`` (run in a fresh interpreter at the checkout) printed as JSON."""
    base = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**base, **(env or {})}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_numpy_starts_no_blas_threads_under_an_entry_point(module: str):
    got = started(f"import {module}, numpy, os, json; "
                  f"print(json.dumps([os.environ.get('OPENBLAS_NUM_THREADS'), len(os.listdir('/proc/self/task'))]))")
    assert got == ["1", 1], f"{module}: OPENBLAS_NUM_THREADS and threads after importing numpy: {got}"


def test_an_operators_own_blas_threads_are_kept():
    got = started("import drva.daemon, os, json; print(json.dumps(os.environ.get('OPENBLAS_NUM_THREADS')))",
                  {"OPENBLAS_NUM_THREADS": "2"})
    assert got == "2"


@pytest.mark.parametrize("module", ["cdp.msa.config", "iofilter_sim.__main__", "rocva.__main__", "cdp.msa.client"])
def test_reading_a_site_file_does_not_load_the_certificate_code(module: str):
    got = started(f"import {module}, sys, json; "
                  f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography')[:5]))")
    assert got == [], f"{module} loads cryptography (cdp.pki_files says why it must not): {got}"
