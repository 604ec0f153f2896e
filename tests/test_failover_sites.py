"""Unplanned failover between two sites, as an operator runs it (issue 11): every step is
a ``cdp`` command in a subprocess, on the file store, moto S3 and Azurite.

Both sites run (``cdp daemon``); site A's VMs write through A's hypervisor; a mark is
placed, then A goes on writing (the garbage a ransomware burst would leave); every
process of A is SIGKILLed and A's state directory deleted. ``cdp failover --mark`` at
B must bring the disks back exactly as they were at the mark (the sha256 A's simulator
recorded there), run the VMs at B, and replicate their writes on the new timeline:
``cdp recover`` of that timeline's latest point equals B's disks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from cdp.testing.two_sites import TwoSites, make_two_sites, sha256
from tests.conftest import unique_name
from tests.test_walkthrough import CDP, CLI_EXIT_S, EXIT_S, HTTP_S, _stop, kill_leftovers

S3_CREDS = {"AWS_ACCESS_KEY_ID": "test-access-key", "AWS_SECRET_ACCESS_KEY": "test-secret-key"}
WRITES_S = 60.0  # bound on a few hundred small writes reaching the store's catalog
MARK = "before-garbage"


@pytest.fixture(params=["file", "s3", "azure"])
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str | None, dict[str, str]]:
    """(the sites' store URL — None: a file store under the test's directory — and the
    environment its credentials come from)."""
    if request.param == "file":
        return None, {}
    if request.param == "s3":
        endpoint = request.getfixturevalue("moto_server")
        return f"s3://{unique_name()}/dr?endpoint={endpoint}&region=us-east-1", dict(S3_CREDS)
    conn = request.getfixturevalue("azurite")
    return f"azure://{unique_name()}/dr", {"CDP_AZURE_CONNECTION_STRING": conn}


class Operator:
    """Runs ``cdp`` for both sites and keeps their daemons."""

    def __init__(self, sites: TwoSites, root: Path) -> None:
        self.sites, self.root = sites, root
        self.env = {k: v for k, v in sites.a.env.items() if k not in ("CDP_CONFIG", "CDP_STORE")}
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}
        self.background: list[subprocess.Popen[bytes]] = []

    def config(self, site: str) -> str:
        return str((self.sites.a if site == "a" else self.sites.b).config_path)

    def cdp(self, *args: str, expect: int = 0) -> dict[str, Any]:
        r = subprocess.run([*CDP, *args, "--json"], cwd=self.root, env=self.env, capture_output=True, text=True,
                           timeout=CLI_EXIT_S)
        if r.returncode != expect:
            raise AssertionError(f"cdp {' '.join(args)}: exit {r.returncode}, expected {expect}\n"
                                 f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}\n{self.logs()}")
        if expect:
            return {"error": r.stderr}  # what the operator is told
        return json.loads(r.stdout) if r.stdout.strip() else {}

    def at(self, site: str, *args: str, expect: int = 0) -> dict[str, Any]:
        return self.cdp(*args, "--config", self.config(site), expect=expect)

    def at_background(self, site: str, *args: str) -> subprocess.Popen[bytes]:
        """``cdp ARGS --config SITE`` started and not waited for (a test kills what it runs)."""
        proc = subprocess.Popen([*CDP, *args, "--json", "--config", self.config(site)], cwd=self.root, env=self.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.background.append(proc)
        return proc

    def start_daemon(self, site: str) -> None:
        log = open(self.root / f"daemon-{site}.log", "ab")
        with log:
            self.daemons[site] = subprocess.Popen([*CDP, "daemon", "--config", self.config(site)], cwd=self.root,
                                                  env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        cfg = (self.sites.a if site == "a" else self.sites.b).cfg
        self.wait(f"site {site}'s API", lambda: _healthy(str(cfg.api_listen)), CLI_EXIT_S)

    def status(self, site: str) -> dict[str, Any]:
        """``GET /v1/status`` (what ``cdp status --json`` prints), without a process per poll."""
        import urllib.request

        cfg = (self.sites.a if site == "a" else self.sites.b).cfg
        req = urllib.request.Request(f"http://{cfg.api_listen}/v1/status",
                                     headers={"Authorization": f"Bearer {self.env[cfg.token_env]}"})
        with urllib.request.urlopen(req, timeout=HTTP_S) as resp:
            return json.loads(resp.read())

    def domain_status(self, site: str, name: str = "erp") -> dict[str, Any]:
        doc = self.status(site)
        return next((d.get("status") or {} for d in doc["domains"] if d["name"] == name), {})

    def committed(self, site: str, name: str = "erp") -> int:
        return int(self.domain_status(site, name).get("committed_seq") or 0)

    def site_cfg(self, site: str) -> Any:
        """The site as its files say now (B's inventory grows with each failover)."""
        from cdp.msa.config import load_site_config

        return load_site_config(self.config(site))

    def wait(self, what: str, probe: Any, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while not (got := probe()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}\n{self.logs()}")
            time.sleep(0.2)
        return got

    def stop_all(self) -> None:
        """Stop both daemons (SIGTERM, then SIGKILL), then what a killed one left running
        (``kill_leftovers``), then what the test started and did not wait for
        (``background``): SIGKILLed with its process group when it leads one of its own."""
        for proc in self.daemons.values():
            _stop(proc)
        for site in (self.sites.a, self.sites.b):
            kill_leftovers(site.cfg.state_dir)
        for proc in self.background:
            if proc.poll() is None:
                _kill_with_group(proc)
            proc.wait(EXIT_S)

    def logs(self) -> str:
        out = []
        for path in sorted(self.root.glob("daemon-*.log")) + sorted(self.root.glob("*/state/logs/*.log")):
            lines = path.read_text(errors="replace").splitlines()[-20:]
            out.append(f"--- {path}\n" + "\n".join(lines))
        return "\n".join(out)


def _kill_with_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc``, and its whole process group when it leads one (started with
    ``start_new_session``: its children go with it)."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()


def _healthy(listen: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{listen}/healthz", timeout=HTTP_S) as resp:
            return resp.status == 200
    except OSError:
        return False


def _kill_site(status: dict[str, Any], daemon: subprocess.Popen[bytes]) -> None:
    """SIGKILL the daemon and every child it named, at once (each child leads a session)."""
    pids = [d["pid"] for d in status["drvas"] if d.get("pid")] + [v["pid"] for v in status["vms"] if v.get("pid")]
    daemon.kill()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    daemon.wait(EXIT_S)


def test_unplanned_failover_at_a_mark_before_the_garbage_and_at_the_latest_point(tmp_path: Path, store_env) -> None:
    """Site A protects erp and web. erp gets a mark, then garbage after it; web's VMs stop
    (every write acked and committed: its latest point is their disks). Every process of
    A is SIGKILLed. B fails erp over at the mark and web at the latest point. On S3 and
    Azure A's state is deleted; on the file store A then comes back with its old state:
    fenced, alarmed, refused, and nothing of it reaches the new timelines. Then erp fails
    back to A (``fail_back``)."""
    url, store_creds = store_env
    sites = make_two_sites(tmp_path, store_url=url, install=False, env=store_creds, web=True)
    op = Operator(sites, tmp_path)
    try:
        start_both(op, ("erp", "web"))
        mark = op.at("a", "mark", "erp", MARK)["output"]
        marks_log = sites.a.cfg.state_dir / "hypervisor" / "esx-a1.marks.jsonl"

        def logged() -> dict | None:  # the host appends the line once its disks are hashed
            lines = marks_log.read_text().splitlines() if marks_log.exists() else []
            return next((m for m in map(json.loads, lines) if m["name"] == MARK and m["sha256"]), None)

        at_mark = op.wait(f"mark {MARK} hashed in {marks_log.name}", logged, WRITES_S)
        assert at_mark["seq"] == mark["seq"]
        acked_web = op.at("a", "power", "web", "off")["acked_seq"]
        op.wait(f"web's seq {acked_web} committed", lambda: op.committed("a", "web") >= acked_web, WRITES_S)
        latest_web = sites.primaries_a("web")
        op.wait("A's garbage after erp's mark", lambda: op.committed("a") > mark["seq"] + 100, WRITES_S)
        assert sites.primaries_a() != at_mark["sha256"]

        _kill_site(op.status("a"), op.daemons.pop("a"))  # site A is lost ...
        if url is not None:
            shutil.rmtree(sites.a.cfg.state_dir)  # ... with its state
        else:  # ... as it was: VMs on (powering them on here would write past what is known)
            power = sites.a.cfg.state_dir / "power.json"
            power.write_text(json.dumps({**json.loads(power.read_text()), "on": ["erp", "web"]}))

        erp = op.at("b", "failover", "erp", "--mark", MARK)["output"]
        assert erp["fork_seq"] == mark["seq"]
        check_b(op, sites, tmp_path, "erp", erp, at_mark["sha256"])
        web = op.at("b", "failover", "web", "--latest")["output"]
        assert web["fork_seq"] >= acked_web
        check_b(op, sites, tmp_path, "web", web, latest_web)
        if url is not None:
            return

        before = domain_objects(sites)
        op.start_daemon("a")  # site A comes back with what it had
        status_a = op.wait("A's DRVA fenced", lambda: len((doc := op.status("a"))["alarms"]) >= 2 and doc, WRITES_S)
        assert status_a["powered"] == [] and {d: w["site"] for d, w in status_a["failed_over"].items()} == {
            "erp": "site-b", "web": "site-b"}
        fenced = [x for x in status_a["alarms"] if x["kind"] == "fenced"]
        assert len(fenced) == 2 and all("site-b" in x["message"] for x in fenced), status_a["alarms"]
        op.at("a", "power", "erp", "on", expect=2)
        op.at("a", "protect", "web", expect=2)
        assert domain_objects(sites) == before
        fail_back(op, sites, tmp_path, erp)  # issue 12: erp comes home, A's garbage undone
    finally:
        op.stop_all()


def fail_back(op: Operator, sites: TwoSites, tmp_path: Path, over: dict[str, Any]) -> None:
    """Issue 12's acceptance: A is back with its disks (garbage after the fork, writes
    its filter never had acked: dirty-region flags) and its log leftovers; B runs erp and
    writes. ``cdp failback`` at A: A's disks become B's at B's final mark — every write B
    acked there, A's own writes since the fork undone — A's VMs write on a timeline of its
    own, B is fenced, and the three timelines' points recover."""
    store = ("--store", sites.a.cfg.store_url)
    b_from = op.committed("b")
    op.at("b", "power", "erp", "on")  # B runs erp again and writes on timeline 2
    op.wait("B's writes before the failback", lambda: op.committed("b") > b_from + 30, WRITES_S)

    back = op.at("a", "failback", "erp")["output"]
    handover, fork = back["handover"], back["fork_seq"]
    assert back["from_site"] == "site-b" and (back["timeline"], back["parent_timeline"]) == (3, 2), back
    assert fork == handover["seq"] and handover["acked_seq"] <= fork, back  # every write B acked is before the mark
    assert [d["mode"] for d in back["disks"]] == ["delta"] * 3, back["disks"]
    assert sum(d["ranges"]["ours"] for d in back["disks"]) > 0, back["disks"]  # A's garbage after the fork
    status_b = op.status("b")
    assert status_b["powered"] == [] and not status_b["vms"], status_b  # B released erp ...
    op.at("b", "power", "erp", "on", expect=2)  # ... and refuses to run it
    assert op.status("a")["powered"] == ["erp"]

    # A's VMs write on timeline 3 and A's DRVA ships them: the store's point at the fork
    # plus those writes is A's disks, which holds only if A's disks were B's at the mark.
    op.wait("A's writes on timeline 3", lambda: op.committed("a") > fork + 50, WRITES_S)
    acked = op.at("a", "power", "erp", "off")["acked_seq"]
    op.wait(f"A's seq {acked} committed", lambda: op.committed("a") >= acked, WRITES_S)
    latest = op.cdp("recover", "erp", *store, "--latest", "--timeline", "3", "--to", str(tmp_path / "erp-t3"))
    assert [sha256(Path(i["path"])) for i in latest["images"]] == sites.primaries_a()
    on_two = op.cdp("recover", "erp", *store, "--seq", str(fork), "--timeline", "2", "--to", str(tmp_path / "t2"))
    on_three = op.cdp("recover", "erp", *store, "--seq", str(fork), "--timeline", "3", "--to", str(tmp_path / "t3"))
    assert [sha256(Path(i["path"])) for i in on_two["images"]] == [sha256(Path(i["path"])) for i in on_three["images"]]
    points = op.cdp("points", "erp", *store)
    assert [(t["timeline"], t["owner"]) for t in points["timelines"]] == [(1, "site-a"), (2, "site-b"), (3, "site-a")]
    old = op.cdp("recover", "erp", *store, "--latest", "--timeline", "1", "--to", str(tmp_path / "t1"))
    assert len(old["images"]) == 3 and over["fork_seq"] < old["seq"]  # the garbage A shipped: still a point


def start_both(op: Operator, domains: tuple[str, ...] = ("erp",)) -> None:
    for site in ("a", "b"):
        assert op.at(site, "install")["site"] == f"site-{site}"
        op.start_daemon(site)
    for name in domains:
        assert op.at("a", "power", name, "on")["on"] is True
    for name in domains:
        op.wait(f"A's first writes of {name} in the store", lambda: op.committed("a", name) >= 100, WRITES_S)


def check_b(op: Operator, sites: TwoSites, tmp_path: Path, name: str, failed_over: dict[str, Any],
            expected: list[str]) -> None:
    """B's failover of ``name``: a new timeline forked from 1 at the point, whose disks are
    ``expected``; B's VMs write on it, and its latest point is B's disks."""
    store = ("--store", sites.a.cfg.store_url)
    fork = failed_over["fork_seq"]
    assert (failed_over["timeline"], failed_over["parent_timeline"]) == (2, 1), failed_over
    assert failed_over["first_write_acked_s"] is not None
    at_fork = op.cdp("recover", name, *store, "--seq", str(fork), "--timeline", "2",
                     "--to", str(tmp_path / f"{name}-at-fork"))
    assert [sha256(Path(i["path"])) for i in at_fork["images"]] == expected

    status_b = op.at("b", "status")
    assert status_b["powered"] == [name] and [v["domain"] for v in status_b["vms"]] == [name]
    op.wait(f"B's writes of {name} on timeline 2", lambda: op.committed("b", name) > fork + 50, WRITES_S)
    acked = op.at("b", "power", name, "off")["acked_seq"]
    op.wait(f"B's seq {acked} committed", lambda: op.committed("b", name) >= acked, WRITES_S)
    latest = op.cdp("recover", name, *store, "--latest", "--timeline", "2", "--to", str(tmp_path / f"{name}-b"))
    b_disks = [d.disk.image for d in op.site_cfg("b").domain(name).disks]
    assert [sha256(Path(i["path"])) for i in latest["images"]] == [sha256(p) for p in b_disks]
    points = op.cdp("points", name, *store)
    assert [(t["timeline"], t["owner"]) for t in points["timelines"]] == [(1, "site-a"), (2, "site-b")]
    assert points["current_timeline"] == 2


def domain_objects(sites: TwoSites) -> list[str]:
    """The domain's objects in the file store but its catalog generations (which B's DRVA
    may collect at any time): segments, pages, bases — where a write of A's would land."""
    rels = (p.relative_to(sites.store).as_posix() for p in sites.store.rglob("*") if p.is_file())
    return sorted(r for r in rels if r.startswith("d/") and "/cat/" not in r)


def test_test_failover_then_planned_failover(tmp_path: Path) -> None:
    """On the file store: a test failover at B while A replicates (A's RPO lag stays under
    its target; cleanup leaves B's inventory as it was), then a planned failover that
    loses no write A acknowledged."""
    sites = make_two_sites(tmp_path, install=False)
    op = Operator(sites, tmp_path)
    store = ("--store", sites.a.cfg.store_url)
    inventory = sites.b.cfg.cluster
    try:
        for site in ("a", "b"):
            op.at(site, "install")
            op.start_daemon(site)
        op.at("a", "power", "erp", "on")
        op.wait("A's first writes in the store", lambda: op.committed("a") >= 100, WRITES_S)

        test = op.at("b", "failover", "erp", "--test", "--latest")["output"]
        assert test["test"] is True and test["hosts"] == ["esx-b1", "esx-b2"]
        target_s = sites.a.cfg.policy("erp").rpo_target_s
        lags = []
        start = op.committed("a")
        deadline = time.monotonic() + WRITES_S
        while len(lags) < 5 or op.committed("a") < start + 100:  # A replicates on while B's test VMs run
            lags.append(float(op.domain_status("a").get("rpo_lag_s") or 0.0))
            assert time.monotonic() < deadline, "A stopped replicating during the test failover"
            time.sleep(0.1)
        assert max(lags) < target_s, lags
        assert op.status("b")["vms"][0]["domain"] == "erp"
        op.at("b", "failover-cleanup", "erp")
        assert reload_cluster(sites) == inventory and not (sites.b.cfg.cluster.state_dir / "test-erp").exists()

        planned = op.at("b", "failover", "erp", "--planned")["output"]
        handover = planned["handover"]
        assert handover["lost_writes"] == 0 and planned["fork_seq"] == handover["seq"], planned
        at_fork = op.cdp("recover", "erp", *store, "--seq", str(planned["fork_seq"]), "--timeline", "2",
                         "--to", str(tmp_path / "at-fork"))
        assert [sha256(Path(i["path"])) for i in at_fork["images"]] == sites.primaries_a()
        status_a = op.at("a", "status")
        assert status_a["powered"] == [] and status_a["domains"] == []  # A stopped its VMs and shipping
        op.at("a", "power", "erp", "on", expect=2)  # refused: the domain runs at B now
    finally:
        op.stop_all()


def reload_cluster(sites: TwoSites) -> Any:
    from cdp.msa.config import load_site_config

    return load_site_config(sites.b.config_path).cluster
