"""The per-domain job records (``cdp.msa.job_records``: failovers/, failbacks/, handovers/,
FORMAT.md §13.10, §13.12, §13.14) read back as what they must be: a regular file of at
most its bound, never through a link, never waiting on a FIFO; anything else is a
``ConfigError`` naming the file, not a traceback, a hang or gigabytes read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from cdp.errors import ConfigError
from cdp.msa import failback, failover, handover
from cdp.msa.job_records import read_domain_record, write_domain_record

ROOT = Path(__file__).resolve().parents[2]
BYTES_MAX = 64 << 10
GUARD_S = 30.0  # ends a child that hangs on a FIFO (the bug): never reached otherwise


def read(path: Path) -> dict | None:
    return read_domain_record(path, "erp", version=1, bytes_max=BYTES_MAX, what="failover")


def test_a_record_reads_back_and_a_missing_one_is_none(tmp_path):
    path = tmp_path / "failovers" / "erp.json"
    assert read(path) is None
    write_domain_record(path, {"version": 1, "domain": "erp", "phase": "rehydrated"})
    assert read(path) == {"version": 1, "domain": "erp", "phase": "rehydrated"}


def test_a_symbolic_link_is_not_followed(tmp_path):
    """A link planted where the record goes, to a record elsewhere (or to /dev/zero, which
    was read until memory ran out) is refused as a link."""
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"version": 1, "domain": "erp", "phase": "forked"}))
    readers = ((failover.record_path, failover.read_record, "failover"),
               (failback.record_path, failback.read_record, "failback"),
               (handover.handover_path, handover.read_handover, "handover"))
    for path_of, read_record, what in readers:
        path = path_of(tmp_path, "erp")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(elsewhere)
        with pytest.raises(ConfigError, match=f"{path}: a symbolic link, not a {what} record"):
            read_record(tmp_path, "erp")


def test_a_large_file_is_not_read_past_the_bound(tmp_path):
    path = tmp_path / "erp.json"
    with open(path, "wb") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB of NULs that cost no disk
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="not a failover record of domain erp"):
            read(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * BYTES_MAX, peak


def test_a_directory_is_refused_naming_it(tmp_path):
    path = tmp_path / "erp.json"
    path.mkdir()
    with pytest.raises(ConfigError, match=f"{path}: a directory, not a failover record"):
        read(path)


def test_json_nested_too_deep_is_refused_not_a_traceback(tmp_path):
    path = tmp_path / "erp.json"
    path.write_text("[" * (BYTES_MAX - 1))
    with pytest.raises(ConfigError, match="not a failover record"):
        read(path)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    """In a child process: a reader that opens the FIFO blocks until a writer comes, for
    ever; the guard only ends the child of a build that has the bug."""
    path = tmp_path / "erp.json"
    os.mkfifo(path)
    code = ("import sys; from pathlib import Path; from cdp.errors import ConfigError;"
            "from cdp.msa.job_records import read_domain_record\n"
            "try:\n"
            f"    read_domain_record(Path(sys.argv[1]), 'erp', version=1, bytes_max={BYTES_MAX}, what='failover')\n"
            "except ConfigError as exc:\n"
            "    print(exc.message)\n")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True,
                              timeout=GUARD_S)
    except subprocess.TimeoutExpired:
        pytest.fail("reading a FIFO as a record blocked")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{path}: a FIFO, not a failover record; move it away to run the failover again"
