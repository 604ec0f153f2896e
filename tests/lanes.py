"""Lanes for the test session: the two-site tests, the walkthrough, the S3 outage and
the other tests that mostly wait on processes of their own, and the browser, benchmark
and emulator tests (``LANES``), each group run in a pytest process of its own, beside
the rest of the suite.

Those tests drive daemons, DRVAs, simulated hosts and ``cdp`` commands as subprocesses,
or wait out an outage, and spend most of their wall clock waiting: measured, a two-site
test keeps about half of the machine's two cores busy. Run after the rest they add minutes to
the suite; run beside it they mostly fill the idle core.

At collection (``tests/conftest.py``) the session starts ``python -m pytest`` on each
lane's test ids, with ``CDP_TEST_LANE`` naming a report file: that process's
``pytest_runtest_logreport`` appends one JSON line per test phase to it. The session
keeps the lane's items, last in its order, but without their fixtures: each one waits
for its own phases in the report and passes, fails (with the lane's failure text) or
skips as they did. A lane that does not end in ``LANE_WITHIN_S`` is killed and its
waiting tests fail with the tail of its output. Why more than one lane: with one, the
main session kept a core busy and the lane about half of the other (1,482 tests: 452 s
beside 444 s); a second lane of tests that also wait fills the rest.

``CDP_TEST_LANES=0`` runs everything in the one session. A session that selected only
lane tests runs them itself (there is nothing to run beside them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

LANE_ENV = "CDP_TEST_LANE"  # in the lane's process: where its phases are reported
LANES_ENV = "CDP_TEST_LANES"  # "0": no lane
LANE_2 = ("tests/console/", "tests/test_benchmark_report.py::", "tests/test_benchmark_scale.py::",
          "tests/test_benchmark_storage.py::", "tests/rocva/test_recover_cloud.py::",
          "tests/rocva/test_consolidate.py::test_consolidation_and_retention_on_",
          "tests/test_catalog_model.py::test_s3_", "tests/test_catalog_model.py::test_azure_",
          "tests/nbd/test_readme_nbd.py::", "tests/drva/test_encrypted_store.py::",
          "tests/mgmt/test_api.py::test_daemon_process_and_cli_verbs",
          "tests/torture/test_campaigns.py::test_store_faults", "tests/test_benchmark_ingest.py::",
          "tests/torture/test_campaigns.py::test_kills_quick", "tests/test_failover_msa_killed.py::",
          "tests/nbd/test_mount.py::", "tests/nbd/test_capture.py::", "tests/nbd/test_protect_then_mount.py::",
          "tests/drva/test_outage.py::", "tests/drva/test_e2e.py::", "tests/test_walkthrough.py::",
          # Two-site daemon tests of the failover crash fixes (about 40 s that mostly wait):
          # lane 2 ended first (386 s beside 478 s and 531 s).
          "tests/mgmt/test_planned_failover_resume.py::", "tests/mgmt/test_quiesce_killed.py::",
          "tests/mgmt/test_release_rerun.py::", "tests/mgmt/test_test_failover_leftover.py::",
          "tests/mgmt/test_domain_op_races.py::",
          # Main-session tests that mostly wait (timeouts, watchdogs, real seconds of RPO):
          # about 92 s of wall clock for 28 s of CPU, measured per test (wall against the
          # process's and its children's CPU time).
          "tests/drva/test_hostile_wire.py::", "tests/drva/test_hostile_filter.py::",
          "tests/mgmt/test_status_hostile.py::", "tests/nbd/test_handshake_slots.py::",
          "tests/mgmt/test_api_limits.py::", "tests/rocva/test_lease_races.py::", "tests/mgmt/test_alarms.py::",
          "tests/rocva/test_sweep_deadline.py::", "tests/drva/test_seed_holes.py::",
          "tests/rocva/test_sweep_listing.py::", "tests/mgmt/test_state_full_hosts.py::")
LANES: tuple[tuple[str, ...], ...] = (
    # Lane 1: the two-site tests, the walkthrough, the S3 outage, and the subprocess
    # DRVAs, simulators and daemons that spend their time waiting.
    ("tests/test_failover_sites.py::", "tests/test_failback_sites.py::", "tests/drva/test_crash.py::",
     "tests/test_log_crash.py::", "tests/mgmt/test_failover_job.py::", "tests/mgmt/test_failback_job.py::",
     "tests/test_cli.py::",
     # CPU-bound campaigns and daemons from the main session, which ran longest (453 s
     # beside 442 s and 280 s): lane 1 alone ran 359 s on an idle machine.
     "tests/torture/test_campaigns.py::test_rest_fuzz_quick", "tests/torture/test_campaigns.py::test_wire_fuzz_quick",
     "tests/torture/test_campaigns.py::test_power_loss_quick", "tests/drva/test_consolidate_live.py::",
     "tests/mgmt/test_config_cli.py::", "tests/mgmt/test_install.py::",
     "tests/mgmt/test_failback_rehandover.py::", "tests/mgmt/test_failback_appliance.py::",
     # Main-session tests that mostly wait (real seconds of RPO lag, a full state
     # directory's retries, seeds held back): about 74 s of wall clock for 19 s of CPU.
     # The main session was the suite's longest part (686-739 s beside lanes of 430-498 s;
     # 633 s beside 546-556 s once the first of these had moved).
     "tests/drva/test_rpo_filter_clock.py::", "tests/mgmt/test_state_full.py::",
     "tests/drva/test_failover_continue.py::", "tests/drva/test_overload_seed.py::",
     "tests/drva/test_ingest_holes.py::", "tests/drva/test_seed_chunk_memory.py::",
     "tests/drva/test_false_fence.py::"),
    # Lane 2: what waits on a browser, on benchmark subprocesses, or on the S3 and Azure
    # emulators (each lane starts its own).
    LANE_2,
)
#: Every lane's files, for a test that asks whether a node id runs in a lane.
LANE_FILES = tuple(prefix for files in LANES for prefix in files)
#: The lane's own run (about 7 minutes on an idle 2-core machine) on a machine the rest
#: of the suite keeps busy meanwhile; bounds a hang, not a speed.
LANE_WITHIN_S = 1500.0
POLL_S = 0.2
ROOT = Path(__file__).resolve().parents[1]


class Lane:
    """The lane's pytest process and what it reported."""

    def __init__(self, nodeids: list[str], config: pytest.Config) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cdp-lane-"))
        self.report_path = self.dir / "phases.jsonl"
        self.log_path = self.dir / "lane.log"
        self.deadline = time.monotonic() + LANE_WITHIN_S
        self.phases: dict[str, list[dict[str, Any]]] = {}
        self._read_at = 0
        args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={self.dir / 'tmp'}"]
        if config.option.verbose > 0:
            args.append("-v")
        env = {**os.environ, LANE_ENV: str(self.report_path)}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([*args, *nodeids], cwd=ROOT, env=env, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)

    def _read(self) -> None:
        try:
            with open(self.report_path, "rb") as f:
                f.seek(self._read_at)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1  # a line being written is read next time
        self._read_at += end
        for line in data[:end].splitlines():
            doc = json.loads(line)
            self.phases.setdefault(doc["nodeid"], []).append(doc)

    def wait_for(self, nodeid: str) -> list[dict[str, Any]]:
        """The phases the lane reported for ``nodeid`` once its teardown is in."""
        while True:
            self._read()
            got = self.phases.get(nodeid, [])
            if any(p["when"] == "teardown" for p in got):
                return got
            if self.proc.poll() is not None:
                self._read()
                got = self.phases.get(nodeid, [])
                if any(p["when"] == "teardown" for p in got):
                    return got
                pytest.fail(f"the test lane exited ({self.proc.returncode}) without running {nodeid}\n"
                            f"{self.log_tail()}", pytrace=False)
            if time.monotonic() > self.deadline:
                self.stop()
                pytest.fail(f"the test lane did not end within {LANE_WITHIN_S:g} s\n{self.log_tail()}",
                            pytrace=False)
            time.sleep(POLL_S)

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-60:])
        except OSError:
            return "(no lane output)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


LANE_KEY = pytest.StashKey[list[Lane]]()


def split(config: pytest.Config, items: list[Any]) -> None:
    """Start each lane on its selected tests and make their items wait for it (module
    docstring). Called by ``pytest_collection_modifyitems``."""
    if os.environ.get(LANE_ENV) or os.environ.get(LANES_ENV) == "0" or config.option.collectonly:
        return
    groups = [[item for item in items if item.nodeid.startswith(files)] for files in LANES]
    moved = [item for group in groups for item in group]
    if not moved or len(moved) == len(items):
        return
    started = config.stash[LANE_KEY] = []
    for group in groups:
        if group:
            lane = Lane([item.nodeid for item in group], config)
            started.append(lane)
            for item in group:
                _wait_instead(item, lane)
    ids = {id(item) for item in moved}
    items[:] = [item for item in items if id(item) not in ids] + moved


def _wait_instead(item: Any, lane: Lane) -> None:
    """``item`` runs no fixture and no code of its own: it reports the lane's outcome."""
    def run() -> None:
        phases = lane.wait_for(item.nodeid)
        failed = [p for p in phases if p["outcome"] == "failed"]
        if failed:
            text = "\n\n".join(f"[{p['when']}, in the test lane]\n{p['longrepr']}" for p in failed)
            pytest.fail(text, pytrace=False)
        skipped = [p for p in phases if p["outcome"] == "skipped"]
        if skipped:
            pytest.skip(f"in the test lane: {skipped[0]['longrepr']}")

    item.setup = lambda: None
    item.runtest = run


def report_phase(report: Any) -> None:
    """In the lane's process: one JSON line per phase (``pytest_runtest_logreport``)."""
    path = os.environ.get(LANE_ENV)
    if not path:
        return
    doc = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
           "duration": round(report.duration, 3),
           "longrepr": str(report.longrepr) if report.longrepr is not None else None}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(doc) + "\n")


def finish(config: pytest.Config) -> None:
    for number, lane in enumerate(config.stash.get(LANE_KEY, []), 1):
        # The lane's own summary line ("N passed in S s"), so that a run shows how long
        # the lane took beside the main session: what balancing LANE_FILES goes by.
        summary = [line for line in lane.log_tail().splitlines() if " in " in line and ("passed" in line
                                                                                        or "failed" in line)]
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if summary and reporter is not None:
            reporter.write_line(f"test lane {number}: {summary[-1].strip('= ')}")
        lane.remove()
