"""A DRVA's status document read as hostile input: NaN and Infinity, mistyped fields, a
clock a day ahead. Each is refused where the document is read, naming the field, with a
``drva_down`` alarm; alarms, history, throughput, metrics and the status answer never
raise and never carry a non-finite number; one bad DRVA never stops the others' alarms;
a hung DRVA is stale by the MSA's clock, whatever time its last document claims."""

from __future__ import annotations

import copy
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cdp.msa.alarms import AlarmEvaluator
from cdp.msa.config import Alarms, Policy
from cdp.msa.throughput import Throughput
from cdp.msa.history import StatusHistory
from cdp.msa.metrics import MetricsSnapshot, MsaMetrics
from cdp.msa.status_doc import problem
from cdp.msa.supervisor import DrvaView, Supervisor
from cdp.testing.site import installed_site, make_site, running_daemon
from tests.waiting import EVENTUALLY_S, wait_until

S = 1_000_000_000  # ns
POLICIES = {"erp": Policy(rpo_target_s=30.0), "files": Policy(rpo_target_s=30.0)}
STALE_S = 10.0
DAEMON_STALE_S = 3.0  # the running daemon's: its DRVA rewrites its status every second


def domain_doc(name: str = "erp", **fields: Any) -> dict[str, Any]:
    doc = {"id": 1, "name": name, "accepted_seq": 5, "durable_seq": 5, "sealed_seq": 5, "committed_seq": 4,
           "committed_ts": 1, "rpo_lag_s": 0.5, "rpo_lag_bytes": 4096, "filter_mode": "normal", "bitmap_mode": False,
           "dirty_bytes": None, "backpressure": False, "connected": True, "catalog_ready": True, "fenced": False,
           "unsealed_entries": 0, "inflight_segments": 0, "frames_received": 5, "bytes_received": 20480,
           "duplicates_dropped": 0, "frames_refused": 0, "timestamps_raised": 0, "timestamps_clamped": 0,
           "log_entries_skipped": 0, "segments_uploaded": 1, "bytes_uploaded": 16384, "upload_errors": 0,
           "catalog_errors": 0, "upload_latency_p50_s": 0.01, "upload_latency_p99_s": None, "last_error": None}
    doc.update(fields)
    return doc


SEED_UPLOADS = {"slots": 4, "slots_used": 1, "sessions_waiting": 0}


def lane_doc(**fields: Any) -> dict[str, Any]:
    """One store lane of a status (drva/status.py ``lanes_status``)."""
    return {"store": "file:///s", "domains": [1], "frame_budget_bytes_max": 25165824, "frame_budget_held_bytes": 0,
            "frame_budget_sessions_waiting": 0, "frame_budget_waiting_bytes": 0, **fields}


def status_doc(pid: int, *domains: dict[str, Any], **fields: Any) -> dict[str, Any]:
    doc = {"drva": "drva-1", "listen": "127.0.0.1:1", "pid": pid, "time": time.time(), "uptime_s": 3.0,
           "log": {"path": "/x", "head": 0, "tail": 0, "data_size": 100, "used_bytes": 10, "used_ratio": 0.1,
                   "epoch": 1},
           "backpressure": False, "group_commits": 1, "last_commit_latency_s": 0.001, "sessions": 1, "handshakes": 0,
           "handshakes_refused_busy": 0, "handshakes_refused_tls": 0, "store": "file:///s", "store_errors": 0,
           "last_store_error": None, "domains": list(domains) or [domain_doc()]}
    doc.update(fields)
    return doc


def view(status: dict[str, Any] | None, *, name: str = "drva-1", state: str = "up", pid: int = 100,
         domains: tuple[str, ...] = ("erp",), **fields: Any) -> DrvaView:
    """A supervisor's view as the alarm loop gets it, its status taken as it is (no check)."""
    options = {"state_for_s": 5.0, "restarts": 0, "last_exit": None, "last_error": None, "restart_in_s": None,
               "status_age_s": 0.5, **fields}
    return DrvaView(name, "127.0.0.1:1", domains, state, options["state_for_s"], pid, options["restarts"],
                    options["last_exit"], options["last_error"], options["restart_in_s"], status,
                    options["status_age_s"])


def strict_json(value: Any) -> str:
    return json.dumps(value, allow_nan=False)


# ---------------------------------------------------------------------- read where it is read


class Drva:
    """One supervised DRVA whose process is a stand-in that writes nothing: the test
    writes its status.json and moves the supervisor's clock."""

    def __init__(self, sup: Supervisor, clock: list[float]) -> None:
        self.sup, self.clock = sup, clock
        self.kept = next(iter(sup.drvas.values()))

    @property
    def pid(self) -> int:
        return self.kept.proc.pid

    async def write(self, doc: dict[str, Any] | str) -> None:
        text = doc if isinstance(doc, str) else json.dumps(doc)  # json.dumps writes NaN and Infinity
        tmp = self.kept.status_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.kept.status_path)
        await self.sup.step()

    def view(self) -> DrvaView:
        return self.sup.views()[0]


@pytest.fixture
async def drva(tmp_path: Path):
    site = make_site(tmp_path / "site", protect=("erp",), install=False)
    clock = [1000.0]
    sup = Supervisor(site.cfg, site.env, clock=lambda: clock[0])
    kept = sup._new(site.cfg.drva("drva-1"), ("erp",))
    sup.drvas["drva-1"] = kept
    # A command line of this test alone: a keeper stops any other process running its child's.
    await sup.keeper.spawn(kept, ["-c", f"import time; time.sleep(600)  # {tmp_path}"])
    try:
        yield Drva(sup, clock)
    finally:
        await sup.stop_all()


def _nan_rpo(pid: int) -> dict[str, Any]:
    return status_doc(pid, domain_doc(rpo_lag_s=float("nan")))


@pytest.mark.parametrize("forged, says", [
    (_nan_rpo, "NaN is no JSON number"),
    (lambda pid: status_doc(pid, domain_doc(rpo_lag_s=float("inf"))), "Infinity is no JSON number"),
    (lambda pid: json.dumps(status_doc(pid)).replace('"rpo_lag_s": 0.5', '"rpo_lag_s": 1e400'), "out of range"),
    (lambda pid: status_doc(pid, log={**status_doc(pid)["log"], "used_ratio": float("nan")}), "NaN"),
    (lambda pid: status_doc(pid, domain_doc(bytes_received="12 B")), "domains[0].bytes_received: expected a count"),
    (lambda pid: status_doc(pid, domain_doc(upload_errors="x")), "domains[0].upload_errors"),
    (lambda pid: status_doc(pid, domain_doc(rpo_lag_bytes="lots")), "domains[0].rpo_lag_bytes"),
    (lambda pid: status_doc(pid, domain_doc(name=["erp"])), 'domains[0].name: expected a string, got ["erp"]'),
    (lambda pid: status_doc(pid, domains={"erp": 1}), "domains: expected a list of objects"),
    (lambda pid: status_doc(pid, domains=["erp"]), "domains[0]: expected an object"),
    (lambda pid: status_doc(pid, domain_doc(bytes_uploaded=1 << 80)), "domains[0].bytes_uploaded"),
    (lambda pid: status_doc(pid, log=[]), "log: expected an object"),
    (lambda pid: status_doc(pid, domain_doc(marks_dropped="many")), "domains[0].marks_dropped: expected a count"),
    (lambda pid: status_doc(pid, domain_doc(resync_windows_merged=-2)),
     "domains[0].resync_windows_merged: expected a count"),
    (lambda pid: status_doc(pid, lanes={"file:///s": 1}), "lanes: expected a list of objects"),
    (lambda pid: status_doc(pid, lanes=[lane_doc(frame_budget_held_bytes=-1)]),
     "lanes[0].frame_budget_held_bytes: expected a count (an integer ≥ 0), got -1"),
    (lambda pid: status_doc(pid, lanes=[lane_doc(frame_budget_bytes_max=float("nan"))]), "NaN"),
    (lambda pid: status_doc(pid, lanes=[lane_doc(frame_budget_sessions_waiting="2")]),
     "lanes[0].frame_budget_sessions_waiting"),
    (lambda pid: status_doc(pid, lanes=[lane_doc(domains=["erp"])]), "lanes[0].domains: expected a list of domain ids"),
    (lambda pid: status_doc(pid, lanes=[{"domains": [1]}]), "lanes[0].store: missing"),
    (lambda pid: status_doc(pid, lanes=[lane_doc(), "lane"]), "lanes[1]: expected an object"),
    (lambda pid: status_doc(pid, seed_uploads=[4, 0, 0]), "seed_uploads: expected an object"),
    (lambda pid: status_doc(pid, seed_uploads={**SEED_UPLOADS, "sessions_waiting": True}),
     "seed_uploads.sessions_waiting: expected a count (an integer ≥ 0), got true"),
])
async def test_a_forged_status_is_unusable_and_drva_down_names_why(drva: Drva, forged, says: str):
    await drva.write(status_doc(drva.pid))
    assert drva.view().state == "up" and drva.view().status is not None
    ev = AlarmEvaluator(Alarms(), stale_s=STALE_S)
    ev.evaluate(1 * S, [drva.view()], POLICIES)
    assert ev.active_alarms() == []
    await drva.write(forged(drva.pid))
    v = drva.view()
    assert v.status is None and v.status_problem is not None and says in v.status_problem, v.status_problem
    raised, _ = ev.evaluate(2 * S, [v], POLICIES)
    assert [(a.kind, a.subject) for a in raised] == [("drva_down", "drva-1")]
    assert "cannot be judged: its status.json" in raised[0].message and says in raised[0].message
    strict_json(v.to_dict())  # what GET /v1/status says of it: valid JSON
    # A good document again: usable, the alarm clears.
    await drva.write(status_doc(drva.pid))
    assert drva.view().status_problem is None and drva.view().status is not None
    _, cleared = ev.evaluate(3 * S, [drva.view()], POLICIES)
    assert [a.kind for a in cleared] == ["drva_down"]


async def test_a_hung_drva_is_stale_by_the_msa_clock_whatever_time_it_claims(drva: Drva):
    """Its status said a day ahead (or no time at all): its age stayed 0 and drva_down never came."""
    ev = AlarmEvaluator(Alarms(), stale_s=STALE_S)
    for claim in ({"time": time.time() + 86400}, {"time": "soon"}, {}):
        doc = status_doc(drva.pid, uptime_s=float(len(claim)), **claim)
        if not claim:
            del doc["time"]
        elif claim["time"] == "soon":
            await drva.write(doc)  # mistyped: unusable (and said so), not a way to stay fresh
            assert "time: expected a finite number" in drva.view().status_problem
            continue
        await drva.write(doc)
        assert drva.view().status_age_s == 0.0
        ev.evaluate(1 * S, [drva.view()], POLICIES)
        assert ev.active_alarms() == []
        drva.clock[0] += STALE_S + 1  # it writes nothing more: hung
        await drva.sup.step()
        v = drva.view()
        assert v.status_age_s == pytest.approx(STALE_S + 1)
        raised, _ = ev.evaluate(2 * S, [v], POLICIES)
        assert [(a.kind, a.subject) for a in raised] == [("drva_down", "drva-1")], claim
        assert f"has not changed for {STALE_S + 1:.0f} s" in raised[0].message
        # It writes again (its time may lag: a clock stepped back): fresh.
        await drva.write(status_doc(drva.pid, time=time.time() - 3600))
        assert drva.view().status_age_s == 0.0
        _, cleared = ev.evaluate(3 * S, [drva.view()], POLICIES)
        assert [a.kind for a in cleared] == ["drva_down"]


# ---------------------------------------------------------------------- every reader, past the check


BAD_DOMAINS = [
    {"name": "erp", "bytes_received": "12 B", "bytes_uploaded": 1, "upload_errors": "x", "catalog_errors": [1],
     "rpo_lag_s": 1e6, "rpo_lag_bytes": "lots", "bitmap_mode": True, "dirty_bytes": "many", "fenced": False,
     "last_error": {"big": "x" * 5000}},
    {"name": ["files"], "rpo_lag_s": float("nan")},
    "web",
]


def test_one_badly_typed_drva_never_stops_the_alarms_of_the_others():
    """Each DRVA is judged on its own: the first one's mistyped fields (as if they got past
    the check) once raised every second, before drva-2's drva_down was ever judged."""
    ev = AlarmEvaluator(Alarms(), stale_s=STALE_S)
    bad = view({"pid": 100, "log": {"used_ratio": "full"}, "domains": BAD_DOMAINS})
    hostile = view({"pid": 101, "domains": {"erp": 1}}, name="drva-3", domains=("files",))
    down = view(None, name="drva-2", state="restarting", domains=("web",), last_exit=-9, restart_in_s=1.0)
    raised, _ = ev.evaluate(1 * S, [bad, hostile, down], POLICIES)
    kinds = {(a.kind, a.subject): a.message for a in raised}
    assert ("drva_down", "drva-2") in kinds and "killed by SIGKILL" in kinds[("drva_down", "drva-2")]
    assert "RPO lag 1000000.0 s exceeds its target 30 s (unknown bytes not in the store)" in kinds[("rpo_lag", "erp")]
    assert "log partition usage unknown" in kinds[("log_usage", "drva-1")]
    assert ("bitmap_mode", "erp") in kinds and ("store_errors", "erp") in kinds
    assert len(kinds[("store_errors", "erp")]) < 1000  # the DRVA's text is cut


def test_a_judging_that_fails_is_one_drva_down_of_that_drva_alone(monkeypatch):
    ev = AlarmEvaluator(Alarms(), stale_s=STALE_S)
    real = ev._drva_conditions

    def broken(now_ns, v, out):
        if v.name == "drva-1":
            raise KeyError("a bug")
        real(now_ns, v, out)
    monkeypatch.setattr(ev, "_drva_conditions", broken)
    ev.evaluate(1 * S, [view(status_doc(100), domains=("erp",)),
                        view(status_doc(101, log={"used_ratio": 0.99}), name="drva-2", domains=("files",))], POLICIES)
    active = {(a.kind, a.subject): a.message for a in ev.active_alarms()}
    assert "evaluating its status failed (KeyError: 'a bug')" in active[("drva_down", "drva-1")]
    assert ("log_usage", "drva-2") in active


@pytest.mark.parametrize("lag", [float("nan"), float("inf"), -5.0, None, "slow"])
def test_a_lag_that_is_no_finite_number_of_seconds_alarms_as_unknown(lag):
    """NaN > target is False: a NaN lag was no alarm at all."""
    ev = AlarmEvaluator(Alarms(), stale_s=STALE_S)
    raised, _ = ev.evaluate(1 * S, [view(status_doc(100, domain_doc(rpo_lag_s=lag)))], POLICIES)
    assert [(a.kind, a.subject) for a in raised] == [("rpo_lag", "erp")]
    assert "RPO lag unknown" in raised[0].message
    strict_json([a.to_dict() for a in raised])


def test_history_throughput_and_metrics_take_only_finite_well_typed_figures():
    views = [view({"pid": 100, "log": {"used_ratio": float("nan")}, "domains": [
        {"name": "erp", "rpo_lag_s": float("nan"), "rpo_lag_bytes": float("inf"), "bytes_received": "12 B",
         "bytes_uploaded": 5, "upload_errors": float("-inf"), "fenced": True},
        {"name": ["web"], "bytes_received": 1}, "files"]}),
             view({"pid": 101, "domains": {"erp": 1}}, name="drva-2")]
    throughput = Throughput()
    throughput.update(1.0, views)
    throughput.update(2.0, views)
    history = StatusHistory()
    history.record(1, views, {"erp", "web"}, throughput)
    columns = history.columns("erp")
    assert columns["rpo_lag_s"] == [None] and columns["rpo_lag_bytes"] == [None]
    strict_json(columns)
    text = MsaMetrics(lambda: MetricsSnapshot(views, POLICIES, {})).render().decode()
    assert "NaN" not in text and "Inf" not in text
    assert 'cdp_domain_fenced{domain="erp",drva="drva-1"} 1.0' in text


def test_the_status_check_takes_what_a_drva_writes():
    assert problem(status_doc(1)) is None
    assert problem(status_doc(1, domain_doc(), stores=[{"store": "s3://b", "domains": [1]}])) is None
    assert problem({"pid": 1}) is None  # absent fields are absent figures
    assert problem(status_doc(1, domain_doc(dirty_bytes=None, filter_mode=None))) is None
    assert problem(status_doc(1, domain_doc(marks_dropped=3), lanes=[lane_doc(), lane_doc(domains=[])],
                              seed_uploads=SEED_UPLOADS)) is None
    assert "domains[1].rpo_lag_s: expected a finite number, got true" in problem(
        status_doc(1, domain_doc(), domain_doc("files", rpo_lag_s=True)))
    assert "domains[0].name: missing" in problem(status_doc(1, {"id": 1}))
    assert "stores:" in problem(status_doc(1, stores=[{"store": "s3://b", "domains": ["x"]}]))


# ---------------------------------------------------------------------- the daemon, end to end


async def test_a_running_daemon_with_a_hung_drva_and_a_forged_status(tmp_path):
    """The audit's forge2: drva-1 stopped (SIGSTOP), its last status a day ahead and with a
    mistyped counter; before, every alarm step raised and drva_down never came."""
    site = await installed_site(tmp_path / "site", protect=("erp",))
    async with running_daemon(site, alarm_options={"stale_s": DAEMON_STALE_S}) as daemon:
        sup = daemon.supervisor
        await wait_until(lambda: (v := sup.view("drva-1")) is not None and v.state == "up", EVENTUALLY_S,
                         "drva-1 up")
        kept = sup.drvas["drva-1"]
        good = copy.deepcopy(kept.status)
        os.kill(kept.proc.pid, signal.SIGSTOP)
        try:
            doc = copy.deepcopy(good)
            doc["time"] = time.time() + 86400
            doc["domains"][0]["bytes_received"] = "12 B"
            doc["domains"][0]["rpo_lag_s"] = float("nan")
            tmp = kept.status_path.with_suffix(".forged")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, kept.status_path)

            def down() -> str | None:
                return next((a.message for a in daemon.alarms.active_alarms()
                             if (a.kind, a.subject) == ("drva_down", "drva-1")), None)
            await wait_until(down, EVENTUALLY_S, "drva_down of drva-1")
            assert "cannot be judged" in down() and "NaN" in down()
            async with aiohttp.ClientSession(headers=site.headers) as http:
                for path in ("/v1/status", "/v1/alarms", "/v1/domains/erp/history"):
                    async with http.get(site.api + path) as resp:
                        assert resp.status == 200, path
                        json.loads(await resp.text(), parse_constant=lambda c: pytest.fail(f"{path}: {c}"))
                async with http.get(site.api + "/metrics") as resp:
                    assert resp.status == 200 and "NaN" not in await resp.text()
            # The document well typed again, its time still a day ahead: the DRVA, still
            # stopped, writes nothing more, and is stale by the daemon's clock.
            doc = copy.deepcopy(good)
            doc["time"] = time.time() + 86400
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, kept.status_path)
            await wait_until(lambda: (m := down()) is not None and "has not changed for" in m, EVENTUALLY_S,
                             "drva-1 to be stale")
        finally:
            os.kill(kept.proc.pid, signal.SIGCONT)

