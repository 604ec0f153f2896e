"""A failover whose MSA is SIGKILLed while its appliance rehydrates (found by the kills
campaign, tests/torture/kills.py): the restarted daemon starts the domain's DRVA from
protection.json without takeover, and before the fork that DRVA fences the domain (the
current timeline is still the protected site's). The rerun resumes the failover and
must restart that DRVA in takeover mode: otherwise the job "succeeds" with B's VMs
writing and nothing ever acknowledged."""

from __future__ import annotations

import time
from pathlib import Path

from cdp.testing.two_sites import make_two_sites, sha256
from tests.procs import children
from tests.test_failback_sites import gone
from tests.test_failover_sites import WRITES_S, Operator
from tests.test_walkthrough import CLI_EXIT_S, EXIT_S, _stop


def test_a_failover_whose_msa_was_killed_protects_the_domain_when_rerun(tmp_path: Path) -> None:
    sites = make_two_sites(tmp_path)
    op = Operator(sites, tmp_path)
    try:
        op.start_daemon("a")
        op.at("a", "power", "erp", "on")
        op.wait("A's writes in the store", lambda: op.committed("a") >= 100, WRITES_S)
        acked = op.at("a", "power", "erp", "off")["acked_seq"]
        op.wait(f"A's seq {acked} committed", lambda: op.committed("a") >= acked, WRITES_S)
        expected = sites.primaries_a()
        _stop(op.daemons.pop("a"))

        op.start_daemon("b")
        dies = op.at_background("b", "failover", "erp", "--latest")
        daemon = op.daemons["b"]
        deadline = time.monotonic() + CLI_EXIT_S
        while not (appliance := children(daemon.pid, b"rocva", b"failover")):
            assert time.monotonic() < deadline, f"no failover appliance\n{op.logs()}"
            time.sleep(0.01)
        op.daemons.pop("b").kill()  # B's MSA dies before the fork: its appliance goes with it
        daemon.wait(EXIT_S)
        op.wait("the appliance gone with its MSA", lambda: gone(appliance[0]), EXIT_S)
        assert dies.wait(CLI_EXIT_S) != 0
        op.start_daemon("b")

        over = op.at("b", "failover", "erp", "--latest")["output"]
        assert over["fork_seq"] == acked and over["first_write_acked_s"] is not None, over
        op.wait("B's writes on timeline 2", lambda: op.committed("b") > over["fork_seq"] + 30, WRITES_S)
        store = ("--store", sites.a.cfg.store_url)
        at_fork = op.cdp("recover", "erp", *store, "--seq", str(over["fork_seq"]), "--timeline", "2",
                         "--to", str(tmp_path / "at-fork"))
        assert [sha256(Path(i["path"])) for i in at_fork["images"]] == expected
    finally:
        op.stop_all()
