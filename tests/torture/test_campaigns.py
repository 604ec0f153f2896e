"""The torture campaigns in their quick form (issue 14), and proof that each can fail.

``python -m tests.torture --quick --json`` runs the same campaigns; these tests assert
the acceptance figures on each: at least 200 crash states and 1,000 wire fuzz cases, with
nothing lost and no daemon crash. The other tests break something on purpose — the group
commit's ``fdatasync``, a DRVA process, an error body — and see the campaign say so.
"""

from __future__ import annotations

import importlib
import json
import random
import sys

import pytest

from cdp import durable
from cdp.replog import ReplicationLog
from tests.torture import CAMPAIGNS
from tests.torture import __main__ as torture_main
from tests.torture import kills, power_loss, rest_fuzz, wire_fuzz
from tests.torture.result import Result, total


def test_power_loss_quick():
    """At least 200 crash states of both workloads, nothing lost; and they reach the case
    §3.5 is about: part of an unsynced group commit on disk, which the recovery scan must
    cut quietly (not a ``LogCorruption``)."""
    res = power_loss.run(quick=True)
    assert res.passed, res.problems
    assert res.crash_states >= 200 and res.acked_checked > 10 * res.crash_states, res.figures()
    own, drva = res.notes["own"], res.notes["drva"]
    assert own["crash_states"] >= 200 and drva["crash_states"] >= 100, res.notes
    assert own["torn_tails"] > 20 and drva["torn_tails"] > 5, res.notes


def test_the_command_line_adds_up_and_fails_on_a_loss(capsys, monkeypatch):
    """``python -m tests.torture``: the JSON line, the totals, the exit code (the campaigns
    stubbed: each runs in its own test)."""
    figures = {"power_loss": Result("power_loss", crash_states=250, acked_checked=9000, elapsed_s=1.5),
               "kills": Result("kills", kills=10, acked_checked=4000),
               "wire_fuzz": Result("wire_fuzz", cases=1100, elapsed_s=7.0),
               "rest_fuzz": Result("rest_fuzz", cases=1000, elapsed_s=9.0)}
    for name in CAMPAIGNS:  # the campaigns added later run nothing here
        figures.setdefault(name, Result(name))
        monkeypatch.setattr(importlib.import_module(f"tests.torture.{name}"), "run",
                            lambda quick, seed, progress, name=name: figures[name])
    assert torture_main.main(["--quick", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert list(doc) == [*CAMPAIGNS, "total"] and list(doc)[:4] == ["power_loss", "kills", "wire_fuzz", "rest_fuzz"]
    assert doc["total"]["cases"] == 2100 and doc["total"]["crash_states"] == 250 and doc["total"]["elapsed_s"] == 17.5
    assert doc["total"]["kills"] == 10 and doc["total"]["acked_checked"] == 13000
    assert set(doc["total"]) == {"cases", "faults", "kills", "acked_checked", "lost", "false_fences",
                                 "daemon_crashes", "crash_states", "failures", "elapsed_s"}
    figures["wire_fuzz"].daemon_crashes = 1
    assert torture_main.main(["--quick", "--json", "--only", "wire_fuzz"]) == 1


def test_kills_quick():
    """At least 10 SIGKILLs, every kind of process among them (DRVA, simulated host, MSA,
    RocVA), nothing acknowledged lost, every recovery byte-exact, every killed job
    finished on its rerun; and no resync window behind a DRVA kill (the spill journal)."""
    res = kills.run(quick=True)
    assert res.passed, res.problems
    assert res.kills >= 10 and res.lost == 0 and res.acked_checked > 0, res.figures()
    assert all(res.notes["kinds"].get(k) for k in ("drva", "sim", "msa", "rocva")), res.notes["kinds"]
    rocva = res.notes["rocva"]
    assert rocva["recoveries_checked"] == rocva["recoveries_exact"] >= 3, rocva
    assert rocva.get("consolidations_finished", 0) + rocva.get("consolidate_done_before_kill", 0) >= 1, rocva
    assert res.notes["drva_kills"] >= 1 and res.notes["drva_kill_window_seqs"] == 0, res.notes


@pytest.mark.parametrize("workload", ["own", "drva"])
def test_power_loss_fails_when_the_group_commit_fdatasync_is_removed(monkeypatch, workload):
    real = durable.sync_data
    removed = []

    def sync_data(fd: int) -> None:
        if sys._getframe(1).f_code is ReplicationLog._commit.__code__:
            removed.append(fd)  # the group commit's fdatasync: gone
            return
        real(fd)

    monkeypatch.setattr(durable, "sync_data", sync_data)
    res = power_loss.run(quick=True, workloads=(workload,))
    assert len(removed) >= 10
    assert res.lost > 0, res.figures()
    assert any("acknowledged seqs missing" in p for p in res.problems), res.problems


def test_power_loss_fails_when_a_put_does_not_sync_its_directory(monkeypatch):
    """Without the directory fsync of ``durable.publish_at`` a put returns before its rename
    is durable: objects reported stored vanish, and the metadata, synced later, names
    seqs the store no longer holds."""
    monkeypatch.setattr(durable, "sync_dir", lambda fd: None)  # every directory sync goes through it
    res = power_loss.run(quick=True, workloads=("own",))
    assert res.lost > 0 and res.failures > 0, res.figures()
    assert any("was put (acknowledged) and is gone" in p for p in res.problems), res.problems
    assert any("is said committed, the store lacks" in p for p in res.problems), res.problems


def test_wire_fuzz_quick():
    res = wire_fuzz.run(quick=True)
    assert res.passed, res.problems
    assert res.cases >= 1000
    frames = res.notes["log_frames"]
    assert frames["drva-fuzz"] > 0 and frames["drva-fuzz-tls"] > 0, frames
    assert res.notes["good_sessions"] >= (wire_fuzz.QUICK.mutations + wire_fuzz.QUICK.tls_mutations) // \
        wire_fuzz.QUICK.batch
    answers = res.notes["answers"]
    assert answers["bad_frame"] and answers["bad_message"] and answers["bad_checksum"], answers


def test_wire_fuzz_counts_a_dead_drva(tmp_path):
    target = wire_fuzz.Target("drva-dead", tmp_path, None)
    target.start()
    try:
        res = Result("wire_fuzz")
        target.check(res, random.Random(1))
        assert res.passed and target.good_sessions == 1, res.problems
        target.proc.kill()
        target.check(res, random.Random(1))
        assert res.daemon_crashes == 1 and "drva-dead exited" in res.problems[0]
    finally:
        target.proc.stop()


def test_rest_fuzz_quick():
    res = rest_fuzz.run(quick=True)
    assert res.passed, res.problems
    statuses = res.notes["statuses"]
    sent, refused, healthz = res.notes["strangers"]
    assert res.cases >= 500 and sent == res.cases // 2 and refused == sent - healthz, res.notes
    assert statuses[200] and statuses[400] and statuses[404] and statuses[409], statuses  # handlers reached


def test_rest_checker_refuses_what_13_5_forbids():
    res = Result("rest_fuzz")
    checker = rest_fuzz._Checker(res, ("sekret-token", "/tmp/site"))

    class Answer:
        def __init__(self, status: int, body: object, headers: dict | None = None) -> None:
            self.status_code, self.headers = status, headers or {}
            self.content = json.dumps(body).encode()
            self.text = self.content.decode()

    good = {"error": {"status": 404, "code": "unknown_domain", "message": "no domain x", "field": "name",
                      "exit_code": 2}}
    checker.answer("GET /v1/domains/x/points", Answer(404, good), authed=True)
    assert res.passed
    bad = [
        (500, {"error": dict(good["error"], status=500, code="internal")}),  # a 5xx
        (404, {"error": dict(good["error"], exit_code=3)}),
        (404, {"error": dict(good["error"], code="nope")}),
        (404, {"error": dict(good["error"], message="see /tmp/site/state")}),
        (404, {"error": {k: v for k, v in good["error"].items() if k != "field"}}),
        (404, {"error": good["error"], "extra": 1}),
        (200, {}),  # without the token (below)
    ]
    for status, body in bad[:-1]:
        checker.answer("GET /v1/domains/x/points", Answer(status, body), authed=True)
    checker.answer("GET /v1/status", Answer(200, {}), authed=False)
    assert res.failures == len(bad), res.problems


def test_totals_add_up():
    a = Result("a", cases=3, lost=1, crash_states=5, elapsed_s=1.0)
    b = Result("b", cases=4, kills=2, elapsed_s=2.5)
    t = total([a, b])
    assert (t.cases, t.lost, t.kills, t.crash_states, t.elapsed_s) == (7, 1, 2, 5, 3.5)
    assert not t.passed and b.passed


def _contents_after_crashes(root, ops_of) -> set:
    """Every content ``root/f`` may hold after a crash anywhere in what ``ops_of`` did
    (None: no such file), over every subset of the pending operations."""
    import itertools

    from tests.torture import fsrecord

    with fsrecord.Recorder(root) as rec:
        ops_of(root)
    states = fsrecord.CrashStates(rec.initial, rec.ops)
    seen = set()
    for k in range(len(rec.ops) + 1):
        pending = states.pending(k)
        for n in range(len(pending) + 1):
            for kept in itertools.combinations(pending, n):
                image = states.build(k, set(kept))
                entry = image.dirs[""].get("f")
                seen.add(None if entry is None else bytes(image.files[entry[1]]))
    return seen


def test_crash_states_keep_an_atomic_write_whole(tmp_path):
    """The model behind the power-loss campaign: ``durable.atomic_write`` leaves the old
    or the new content after any crash; a plain rewrite without a sync may leave neither."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"old" * 2000)

    def atomic(r):
        durable.atomic_write(r / "f", b"new" * 2000)

    assert _contents_after_crashes(root, atomic) == {b"old" * 2000, b"new" * 2000}

    def careless(r):
        import os
        fd = os.open(r / "f", os.O_WRONLY | os.O_TRUNC)
        os.write(fd, b"new" * 2000)
        os.close(fd)

    (root / "f").write_bytes(b"old" * 2000)
    seen = _contents_after_crashes(root, careless)
    assert b"" in seen and b"old" * 2000 in seen and b"new" * 2000 in seen
    assert any(s and s != b"new" * 2000 and s.startswith(b"new") for s in seen), "no torn page"


def test_store_faults_quick():
    """Every kind of store fault injected, through the proxies and the store wrapper:
    nothing acknowledged lost, no false fence, the RPO back, every recovery exact or
    refused naming the object (and exact once the faults stop); the lock holder keeps
    its lease through a lost renewal reply and sees a skewed successor take it."""
    from tests.torture import store_faults
    from tests.torture.fault_proxy import KINDS

    res = store_faults.run(quick=True)
    assert res.passed, res.problems
    assert res.lost == 0 and res.false_fences == 0 and res.daemon_crashes == 0
    kinds = res.notes["faults"]
    for kind in (*KINDS, "store_injected", "store_hang", "clock_skew"):
        assert kinds.get(kind, 0) > 0, (kind, kinds)
    assert res.faults == sum(kinds.values()) and res.acked_checked > 1000, res.figures()
    outcomes = res.notes["outcomes"]
    assert sum(n for o, n in outcomes.items() if o.startswith("exact_at_attempt_")) == 2, outcomes
    assert outcomes["skew_within_refused"] == outcomes["lease_kept_through_faults"] == 2, outcomes
    assert outcomes["holder_saw_takeover"] == outcomes["lock_taken_through_a_lost_reply"] == 2, outcomes
    assert outcomes["skew_past_refused"] == 2, outcomes
    assert all(f.get("lost_put_reply") for f in res.notes["lock_faults"].values()), res.notes["lock_faults"]
    assert len(res.notes["rpo_recovery_s"]) == store_faults.QUICK.rounds, res.notes
    assert max(res.notes["rpo_lag_max_s"]) > store_faults.QUICK.storm_s / 2, res.notes  # it climbed, came back


def test_store_faults_reports_a_false_fence_and_a_wrong_recovery(monkeypatch):
    """Break two guarantees and see the campaign say so: a lock write whose reply was lost
    is no longer recognised as the holder's own (the lock is refused to its taker, or
    the lease lost, with nobody else holding it: a false fence), and a recovery hands
    back an image with one byte wrong and no error (what accepting a corrupt GET body
    unnoticed would do)."""
    from cdp.locks import Lease
    from tests.torture import store_faults

    async def not_ours(self):
        return False

    monkeypatch.setattr(Lease, "_adopt_own_write", not_ours)
    real_recover = store_faults.rocva_recover

    async def corrupting_recover(*args, **kwargs):
        summary = await real_recover(*args, **kwargs)
        path = summary["images"][0]["path"]
        with open(path, "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0xFF]))
        return summary

    monkeypatch.setattr(store_faults, "rocva_recover", corrupting_recover)
    res = store_faults.run(plan=store_faults.Plan(rounds=1, round_s=1.0, storm_s=0.0, recoveries=1,
                                                  lock_scenarios=1))
    assert not res.passed
    assert res.false_fences >= 1, res.figures()
    assert any("refused to its own taker" in p or "lost its lease with nobody else holding it" in p
               for p in res.problems), res.problems
    assert res.failures >= 2, res.figures()  # each domain's recovery
    assert any("gave a wrong image and raised nothing" in p for p in res.problems), res.problems
