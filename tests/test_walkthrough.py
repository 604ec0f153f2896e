"""The README's walkthrough ("Walkthrough: protect a site with the management server"),
driven as a new user would: every step is the ``cdp`` or ``iofilter-sim`` command in a
subprocess, with the secrets in the environment, checking exit codes and ``--json``
output.

The site is ``examples/site.toml`` and ``examples/cluster.toml``, adapted: free ports
(never the fixed 32873/32874/32880: tests may run in parallel), small disks and log
partitions, lower write rates, a consolidation job every few seconds; ``erp`` and
``web`` are protected by ``cdp install`` (``[[protect]]``), ``files`` by ``cdp protect``.
The recovered images are compared with the primaries' sha256 that ``iofilter-sim run
--json`` reports (at the end, and at the mark ``cdp mark`` placed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import tomli_w

from cdp.ports import free_ports
from tests.waiting import EVENTUALLY_S

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent

MARK = "before-upgrade"
# A CLI verb: a Python process start and a request or a job (seconds); bounds a hang.
CLI_EXIT_S = 60.0
# One HTTP request to the local daemon.
HTTP_S = 5.0
# After SIGINT the simulator drains (every captured write acked) and prints its summary.
SIM_DRAIN_S = 60.0
# An orderly stop (SIGTERM) before SIGKILL; and a process exiting once asked or killed.
STOP_S = 25.0
EXIT_S = 10.0
INSTALL_PROTECTS = ("erp", "web")  # [[protect]] of the adapted site file
VERB_PROTECTS = "files"  # protected by `cdp protect`
#: Alarms a loaded CI machine may raise for a moment; any other fails the test.
TRANSIENT_ALARMS = {"rpo_lag", "log_usage"}


def _command(name: str, module: str) -> list[str]:
    """The console script next to this interpreter (what a user runs), else ``-m``."""
    script = BIN / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


CDP = _command("cdp", "cdp.cli")
SIM = _command("iofilter-sim", "iofilter_sim")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _smaller(size: str) -> str:
    """The example's disk sizes (32/64 MiB) become 16/24 MiB."""
    return {"32MiB": "16MiB", "64MiB": "24MiB"}.get(size, "16MiB")


def write_site(root: Path) -> tuple[Path, dict[str, Any]]:
    """Copy ``examples/{site,cluster}.toml`` into ``root``, adapted (module docstring)."""
    p1, p2, api = free_ports(3)
    ports = {"127.0.0.1:32873": f"127.0.0.1:{p1}", "127.0.0.1:32874": f"127.0.0.1:{p2}"}

    cluster = tomllib.loads((EXAMPLES / "cluster.toml").read_text())
    for vm in cluster["vms"]:
        for disk in vm["disks"]:
            disk["size"] = _smaller(disk["size"])
    for dom in cluster["domains"]:
        dom["drva"] = ports[dom["drva"]]
        if "rate_mb_s" in dom.get("workload", {}):
            dom["workload"]["rate_mb_s"] = max(1, dom["workload"]["rate_mb_s"] // 4)
    (root / "cluster.toml").write_text(tomli_w.dumps(cluster))

    site = tomllib.loads((EXAMPLES / "site.toml").read_text())
    assert site["cluster"] == "cluster.toml", "examples/site.toml names another cluster file"
    site["api"]["listen"] = f"127.0.0.1:{api}"
    for drva in site["drvas"]:
        drva["listen"] = ports[drva["listen"]]
        drva["log"]["size"] = "32MiB"
    site["defaults"].update(consolidate_every="5s", consolidate_after="2s")  # real consolidations, live
    assert {p["domain"] for p in site["protect"]} >= {*INSTALL_PROTECTS, VERB_PROTECTS}
    site["protect"] = [p for p in site["protect"] if p["domain"] in INSTALL_PROTECTS]
    path = root / "site.toml"
    path.write_text(tomli_w.dumps(site))
    return path, site


class Walkthrough:
    """The site under ``root``, the commands run there and the logs to show on a failure."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config, self.site = write_site(root)
        self.state_dir = root / self.site["state_dir"]
        self.store = f"file://{(root / self.site['store']).resolve()}"
        self.api = f"http://{self.site['api']['listen']}"
        self.token = secrets.token_hex(16)  # 32 characters
        self.env = {k: v for k, v in os.environ.items() if k not in ("CDP_CONFIG", "CDP_STORE")}
        self.env.update(CDP_SITE_SECRET=secrets.token_hex(16), CDP_API_TOKEN=self.token)
        self.daemon_log = root / "daemon.log"
        self.sim_log = root / "sim.log"
        self.sim_out = root / "sim.json"

    # ---------------------------------------------------------------- diagnostics

    def logs(self) -> str:
        """The tail of the daemon's, the DRVAs' and the simulator's logs."""
        out = []
        paths = [self.daemon_log, self.sim_log, *sorted((self.state_dir / "logs").glob("*.log"))]
        for path in paths:
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-25:]
                out.append(f"--- {path} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(out) or "(no logs)"

    def fail(self, message: str) -> AssertionError:
        return AssertionError(message)  # the test adds the logs to every failure

    # ---------------------------------------------------------------- commands

    def cdp(self, *args: str, expect: int = 0, timeout: float = CLI_EXIT_S) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*CDP, *args], cwd=self.root, env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != expect:
            raise self.fail(f"cdp {' '.join(args)}: exit {r.returncode}, expected {expect}\n"
                            f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}")
        return r

    def cdp_json(self, *args: str, expect: int = 0) -> dict[str, Any]:
        r = self.cdp(*args, "--json", expect=expect)
        try:
            return json.loads(r.stdout)
        except ValueError:
            raise self.fail(f"cdp {' '.join(args)} --json: not one JSON document: {r.stdout[-3000:]!r}") from None

    def site_verb(self, *args: str) -> dict[str, Any]:
        return self.cdp_json(*args, "--config", str(self.config))

    def http(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.api + path, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=HTTP_S) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_for(self, what: str, probe: Any, timeout_s: float, interval_s: float = 0.2) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            got = probe()
            if got:
                return got
            if time.monotonic() > deadline:
                raise self.fail(f"timed out after {timeout_s:g} s waiting for {what}")
            time.sleep(interval_s)

    def spawn(self, argv: list[str], log: Path, stdout: Path | None = None) -> subprocess.Popen[bytes]:
        with open(log, "ab") as err, open(stdout or log, "ab") as out:
            return subprocess.Popen(argv, cwd=self.root, env=self.env, stdout=out, stderr=err,
                                    stdin=subprocess.DEVNULL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(proc: subprocess.Popen[bytes] | None, timeout_s: float = STOP_S) -> bool:
    """SIGTERM (the orderly stop), then SIGKILL; True when it had to be killed."""
    if proc is None or proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(EXIT_S)
        return True


def kill_leftovers(state_dir: Path) -> None:
    """SIGKILL what a killed daemon left running: every process a pid file in
    ``state_dir/logs`` names with its start time (``cdp.msa.processes.find_leftovers``: the
    DRVAs and hosts its keeper ran, each leading a session of its own, which the daemon's
    SIGKILL does not reach). A failed test must not leave them loading the tests after it."""
    from cdp.msa.processes import find_leftovers

    for one in find_leftovers(state_dir / "logs", "*.pid", []):
        with contextlib.suppress(ProcessLookupError):
            os.kill(one.pid, signal.SIGKILL)


def test_walkthrough(tmp_path: Path) -> None:
    t0 = time.monotonic()
    w = Walkthrough(tmp_path)
    config = ("--config", str(w.config))
    store = ("--store", w.store)
    daemon = sim = None
    drva_pids: set[int] = set()
    try:
        # ---- before install: this machine, then the site
        pf = w.site_verb("preflight", "system")
        assert pf["ok"] is True and pf["kind"] == "system" and pf["job"]["state"] == "succeeded", pf
        assert {"runtime", "modules", "store.write", "secret.CDP_SITE_SECRET"} <= {c["name"] for c in pf["checks"]}
        pf = w.site_verb("preflight", "install")
        assert pf["ok"] is True and pf["failures"] == 0, pf

        # ---- install: partitions, DRVA configurations, protection.json, deployment record
        inst = w.site_verb("install")
        assert sorted(inst["protection"]["domains"]) == sorted(INSTALL_PROTECTS), inst
        assert {d["name"] for d in inst["drvas"]} == {"drva-1", "drva-2"}
        assert (w.state_dir / "protection.json").exists()

        # ---- the daemon, in the background
        daemon = w.spawn([*CDP, "daemon", *config], w.daemon_log)

        def healthy() -> bool:
            if daemon.poll() is not None:
                raise w.fail(f"cdp daemon exited with {daemon.returncode}")
            with contextlib.suppress(OSError):
                return w.http("/healthz") == (200, b'{"ok": true}')
            return False

        w.wait_for("GET /healthz", healthy, EVENTUALLY_S)
        st = w.site_verb("status")
        assert sorted(d["name"] for d in st["domains"]) == sorted(INSTALL_PROTECTS), st
        assert {d["name"]: d["state"] for d in st["drvas"]}["drva-2"] == "idle", st  # no domain of its own yet

        # ---- protect a second domain: its DRVA starts, and the verb returns once it serves it
        prot = w.site_verb("protect", VERB_PROTECTS, "--retention", "24h")
        assert prot["state"] == "succeeded" and prot["output"]["drva"] == "drva-2", prot
        assert prot["output"]["policy"]["retention_s"] == 86400 and not prot["output"]["was_protected"]

        # ---- the simulated site streams every write to the DRVAs, until SIGINT (Ctrl-C). Not
        # --duration as in the README: a fixed run raced the steps up to the mark below on a
        # slow machine (the simulator had stopped, and the mark found no filter connected).
        sim = w.spawn([*SIM, "run", "cluster.toml", "--json"], w.sim_log, stdout=w.sim_out)
        domains = sorted([*INSTALL_PROTECTS, VERB_PROTECTS])

        def streaming() -> dict[str, Any] | None:
            doc = w.site_verb("status")
            drva_pids.update(d["pid"] for d in doc["drvas"] if d.get("pid"))
            doms = {d["name"]: d for d in doc["domains"]}
            ok = sorted(doms) == domains and all(
                d["status"] and isinstance(d["status"].get("rpo_lag_s"), (int, float))
                and d["status"].get("bytes_received", 0) > 0 for d in doms.values())
            return doc if ok else None

        st = w.wait_for("every domain's writes reaching its DRVA (cdp status)", streaming, EVENTUALLY_S, 0.5)
        assert all(d["state"] == "up" for d in st["drvas"]), st["drvas"]
        for d in st["domains"]:
            assert d["status"]["rpo_lag_s"] >= 0 and d["status"]["rpo_lag_bytes"] >= 0, d
            assert d["policy"]["rpo_target_s"] == {"erp": 30, "web": 60, "files": 60}[d["name"]], d
        unexpected = [a for a in st["alarms"] if a["kind"] not in TRANSIENT_ALARMS]
        assert not unexpected, f"alarms: {unexpected}"
        text = w.cdp("status", *config).stdout  # the people's table
        assert "RPO LAG / TARGET" in text and all(name in text for name in domains), text

        # ---- a mark, while the writes go on: it returns once the store's catalog names it
        mark = w.site_verb("mark", "erp", MARK)
        assert mark["state"] == "succeeded" and mark["output"]["name"] == MARK, mark
        mark_seq = mark["output"]["seq"]
        assert isinstance(mark_seq, int) and mark_seq > 0

        # ---- writes go on after the mark; then SIGINT: the simulator drains (every captured
        # write acked), prints its summary and exits 0
        def written_after_mark() -> bool:
            erp = {d["name"]: d for d in w.site_verb("status")["domains"]}["erp"]
            return bool(erp["status"]) and erp["status"].get("durable_seq", 0) > mark_seq

        w.wait_for("erp's writes after the mark to reach its DRVA (cdp status)", written_after_mark,
                   EVENTUALLY_S, 0.5)
        sim.send_signal(signal.SIGINT)
        try:
            rc = sim.wait(SIM_DRAIN_S)
        except subprocess.TimeoutExpired:
            raise w.fail("iofilter-sim run did not end after SIGINT") from None
        summary_text = w.sim_out.read_text()
        if rc != 0:
            raise w.fail(f"iofilter-sim run: exit {rc}: {summary_text[-2000:]}")
        summary = json.loads(summary_text)
        assert summary["drained"] is True
        for name in domains:
            d = summary["domains"][name]
            assert d["writes"] > 0 and d["acked_seq"] == d["captured_seq"] and d["mode"] == "normal", (name, d)
        sim_mark = [m for m in summary["marks"] if m["domain"] == "erp" and m["name"] == MARK]
        assert len(sim_mark) == 1 and sim_mark[0]["seq"] == mark_seq, summary["marks"]

        # ---- the DRVAs upload the rest: wait until each catalog commits what was captured
        pts: dict[str, dict[str, Any]] = {}
        for name in domains:
            want = summary["domains"][name]["captured_seq"]

            def committed(name: str = name, want: int = want) -> bool:
                pts[name] = w.cdp_json("points", name, *store)
                return pts[name]["committed_seq"] >= want

            w.wait_for(f"{name}'s catalog to commit seq {want} (cdp points)", committed, EVENTUALLY_S, 0.3)
            assert pts[name]["committed_seq"] == want and pts[name]["latest"] == want, pts[name]
        assert [(m["name"], m["seq"], m["consistent"]) for m in pts["erp"]["marks"]] == [(MARK, mark_seq, True)]

        # ---- recover the mark and the latest point; compare with the primaries' sha256
        out = tmp_path / "recovered"
        rec = w.cdp_json("recover", "erp", *store, "--mark", MARK, "--to", str(out / "erp-mark"))
        assert rec["seq"] == mark_seq
        got = {img["disk"]: _sha256(tmp_path / img["path"]) for img in rec["images"]}
        assert [got[i] for i in sorted(got)] == sim_mark[0]["sha256"], \
            "the mark's images differ from the primaries at the mark"
        for name in domains:
            rec = w.cdp_json("recover", name, *store, "--latest", "--to", str(out / f"{name}-latest"))
            assert rec["seq"] == summary["domains"][name]["captured_seq"], rec
            got = {img["disk"]: _sha256(tmp_path / img["path"]) for img in rec["images"]}
            assert [got[i] for i in sorted(got)] == summary["domains"][name]["sha256"], \
                f"{name}: the latest images differ from the primaries"
        assert sim_mark[0]["sha256"] != summary["domains"]["erp"]["sha256"]  # writes went on after the mark

        # ---- every object of the domain read back and checked
        ver = w.cdp_json("verify", "erp", *store, "--deep")
        assert ver["ok"] is True and ver["checked"]["segments"] > 0 and not ver["problems"], ver

        # ---- the REST API a script would use (README: token = Authorization: Bearer)
        assert w.http("/v1/status")[0] == 401
        status, body = w.http("/metrics", w.token)
        assert status == 200 and b"cdp_domain_rpo_lag_seconds" in body
        status, body = w.http("/openapi.json", w.token)
        assert status == 200 and "/v1/domains/{name}/protect" in json.loads(body)["paths"]

        # ---- the jobs, newest first
        jobs = w.site_verb("jobs")["jobs"]
        names = {j["name"] for j in jobs}
        assert {"preflight-system", "preflight-install", "install", "protect", "mark", "consolidate"} <= names, names
        assert all(j["state"] in ("succeeded", "running", "cancelled") for j in jobs), jobs
        assert [j["id"] for j in jobs] == sorted((j["id"] for j in jobs), reverse=True)

        # ---- uninstall: the preflight, then uninstall stops the daemon and keeps the data
        pf = w.site_verb("preflight", "uninstall")
        assert pf["ok"] is True, pf
        assert {c["name"]: c["status"] for c in pf["checks"]}["daemon"] == "warn"  # running: uninstall stops it
        un = w.site_verb("uninstall")
        assert un["purged"] is None and sorted(u["domain"] for u in un["kept"]["domains"]) == domains, un
        try:
            assert daemon.wait(EXIT_S) == 0, "cdp daemon did not exit cleanly after cdp uninstall"
        except subprocess.TimeoutExpired:
            raise w.fail("cdp uninstall did not stop the daemon") from None
        assert not [p for p in drva_pids if _alive(p)], "DRVAs still running after cdp uninstall"
        assert not (w.state_dir / "protection.json").exists()
        for name in domains:  # the replicated data stays recoverable
            after = w.cdp_json("points", name, *store)
            assert after["committed_seq"] == pts[name]["committed_seq"], after
        w.cdp("jobs", *config)  # the job history is kept, and readable without a daemon
    except Exception as exc:  # a failed assert, a command that hung: show what the daemons said
        what = str(exc) if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {exc}"
        raise AssertionError(f"{what}\n{w.logs()}") from exc
    finally:
        _stop(sim)
        _stop(daemon)
        kill_leftovers(w.state_dir)
    elapsed = time.monotonic() - t0
    print(f"walkthrough: {elapsed:.1f} s")
