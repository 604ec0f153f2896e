"""A test failover whose MSA was SIGKILLed while its appliance recovered (found by the
crash audit): it left ``failovers/erp.json`` with ``test: true, phase: started`` and
nothing registered. ``cdp failover-cleanup`` refused it ("no test failover"), and a
real failover took it for its own unfinished run — refused at any other point, and
"run it again with that point" forked at the test's old seq (1991 acknowledged writes
lost). Now the clean-up removes such a leftover, and a real failover ignores it."""

from __future__ import annotations

import time
from typing import Any

from cdp.msa.failover import cleanup_test_failover, read_record, write_record
from cdp.testing.site import running_daemon
from cdp.testing.two_sites import make_two_sites
from tests.mgmt.test_failover_job import WRITE_S, committed, failover, power_off_and_commit
from tests.waiting import wait_until

OLD_SEQ = 20


def leave_a_killed_test_failover(b: Any) -> None:
    """What ``run_test_failover`` at seq ``OLD_SEQ`` leaves when its MSA dies in the
    appliance: its record (as it writes it) and a half-built test area."""
    write_record(b.cfg.state_dir, {"version": 1, "domain": "erp", "id": 1, "site": b.cfg.site,
                                   "target": f"seq:{OLD_SEQ}", "test": True, "phase": "started",
                                   "started_ns": time.time_ns()})
    area = b.cfg.cluster.state_dir / "+test" / "erp"
    area.mkdir(parents=True, exist_ok=True)
    (area / "erp-db-data.img.partial").write_bytes(b"\0" * 4096)


async def test_a_killed_test_failover_is_cleaned_up_and_never_resumed_as_a_real_one(tmp_path):
    sites = make_two_sites(tmp_path)
    async with running_daemon(sites.a) as a, running_daemon(sites.b) as b:
        await a.power("erp", True)
        await wait_until(lambda: committed(a, "erp") >= 100, WRITE_S, "site A's writes committed")
        acked = await power_off_and_commit(a)
        area = b.cfg.cluster.state_dir / "+test" / "erp"

        leave_a_killed_test_failover(b)
        cleaned = await cleanup_test_failover(b, "erp")
        assert cleaned["removed"] == str(area) and not area.exists(), cleaned
        assert read_record(b.cfg.state_dir, "erp") is None

        leave_a_killed_test_failover(b)
        over = await failover(b, target="latest")
        assert over["state"] == "succeeded", over
        assert over["output"]["fork_seq"] == acked > OLD_SEQ, over["output"]  # the point asked for, not the test's
        record = read_record(b.cfg.state_dir, "erp")
        assert record["phase"] == "done" and "test" not in record and record["target"] == "latest", record
        assert b.powered == ["erp"] and "erp" in b.protection and b.cfg.isolated == frozenset()
