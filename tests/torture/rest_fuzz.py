"""Campaign 4, REST fuzzing: schemathesis against the MSA's served ``/openapi.json``.

A small site (``cdp/testing/site.py``: file store, two DRVAs, ``erp`` protected)
is installed and its daemon started as a process (``python -m cdp.cli daemon``). The
schema is the one the daemon serves. For every operation, schemathesis generates cases
valid for the schema and cases that break it (``GenerationMode.POSITIVE`` and
``NEGATIVE``); each case is sent twice:

- without the token, or with a wrong one (alternately): every route but ``/healthz``
  must answer 401 ``unauthorized`` with ``WWW-Authenticate: Bearer`` — nothing answers
  a stranger;
- with the token: no 5xx but the documented refusals (501 ``not_implemented``, 503
  ``too_many_jobs`` / ``too_many_connections``);

and every answer that is not 2xx must carry the error body of FORMAT.md §13.5 — one
object ``{"error": {...}}`` with exactly ``status`` (the HTTP status), ``code`` (a word
of the table for that status), ``message`` (text that never holds the token nor a path of
the site), ``field`` (text or null) and ``exit_code`` (2, 7, 5 or 1). A case counts once
per request; any break counts in ``failures``, a daemon that dies in
``daemon_crashes``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from cdp.testing.site import TOKEN, installed_site
from tests.drva.harness import ROOT
from tests.torture.result import Result
from tests.waiting import EVENTUALLY_S, wait_until_sync

NAME = "rest_fuzz"
# A request answers at once, or (``?wait=1``) when its job ends: a local job on a tiny
# site takes seconds; this bounds a hang.
CALL_TIMEOUT_S = 120.0
HEALTH_PROBE_S = 1.0
STOP_S = 30.0

# FORMAT.md §13.5: the codes each status may carry.
CODES = {
    400: {"bad_request"}, 401: {"unauthorized"}, 404: {"unknown_domain", "unknown_job", "not_found"},
    405: {"method_not_allowed"}, 408: {"timeout"},
    409: {"not_protected", "busy", "no_drva", "failed_over", "failover_refused"},
    413: {"too_large"}, 415: {"unsupported_media_type"}, 501: {"not_implemented"}, 502: {"store_error"},
    503: {"too_many_jobs", "too_many_connections"}, 500: {"internal", "failed"},
}
EXIT_CODES = {1, 2, 5, 7}
ERROR_KEYS = {"status", "code", "message", "field", "exit_code"}
# The 5xx a client may get from a healthy daemon (the others are bugs or a broken store).
DOCUMENTED_5XX = {501, 503}


@dataclass(frozen=True)
class Plan:
    examples: int  # per operation and generation mode


QUICK = Plan(examples=6)
LONG = Plan(examples=150)


class _Daemon:
    """``cdp daemon`` of a site, as a process."""

    def __init__(self, site: Any, log_path: Path) -> None:
        self.site = site
        self.log_path = log_path
        out = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "cdp.cli", "daemon", "--config", str(site.config_path)],
                                     cwd=ROOT, env=site.env, stdout=out, stderr=out)
        out.close()

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {self.proc.returncode}: "
                                 f"{self.log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(self.site.api + "/healthz", timeout=HEALTH_PROBE_S) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class _Checker:
    """Checks one answer; counts what it saw."""

    def __init__(self, res: Result, secrets: tuple[str, ...]) -> None:
        self.res = res
        self.secrets = secrets
        self.statuses: Counter = Counter()
        self.no_negative: list[str] = []  # operations that take no input to break
        self.strangers = [0, 0, 0]  # requests without the token: sent, answered 401, to what needs none

    def answer(self, what: str, response: Any, *, authed: bool) -> None:
        res = self.res
        res.cases += 1
        status = response.status_code
        self.statuses[status] += 1
        if not authed:
            self.strangers[0] += 1
            self.strangers[1] += status == 401
            self.strangers[2] += _tokenless(what)
        if not authed and status != 401 and not _tokenless(what):
            res.problem("failures", f"{what} without the token answered {status}")
        if not authed and status == 401 and not response.headers.get("www-authenticate", [""])[0].startswith("Bearer"):
            res.problem("failures", f"{what}: 401 without WWW-Authenticate: Bearer")
        if authed and status == 401:
            res.problem("failures", f"{what}: the token was refused")
        if authed and status >= 500 and status not in DOCUMENTED_5XX:
            res.problem("failures", f"{what} answered {status}: {response.text[:500]}")
        if status >= 300 and what.split()[0] != "HEAD":
            why = self._error_body(status, response.content)
            if why is not None:
                res.problem("failures", f"{what} answered {status} with a body off FORMAT.md §13.5: {why}")

    def _error_body(self, status: int, content: bytes) -> str | None:
        """Why ``content`` is not the §13.5 error body of ``status`` (None: it is)."""
        try:
            doc = json.loads(content)
        except ValueError:
            return f"not JSON: {content[:200]!r}"
        if not isinstance(doc, dict) or set(doc) != {"error"} or not isinstance(doc["error"], dict):
            return f"not one object {{'error': {{...}}}}: {str(doc)[:200]}"
        err = doc["error"]
        if set(err) != ERROR_KEYS:
            return f"keys {sorted(err)}, expected {sorted(ERROR_KEYS)}"
        if err["status"] != status:
            return f"status {err['status']!r} in a {status} answer"
        if err["code"] not in CODES.get(status, ()):
            return f"code {err['code']!r} is not one of {sorted(CODES.get(status, ()))} for {status}"
        if not isinstance(err["message"], str) or not err["message"]:
            return f"message {err['message']!r}"
        if any(s in err["message"] for s in self.secrets):
            return f"the message shows the token or a path of the site: {err['message'][:300]}"
        if err["field"] is not None and not isinstance(err["field"], str):
            return f"field {err['field']!r}"
        if err["exit_code"] not in EXIT_CODES or type(err["exit_code"]) is not int:
            return f"exit_code {err['exit_code']!r}"
        return None


def _tokenless(what: str) -> bool:
    """``what`` ("METHOD /path") is served without the token: the health check, and the web
    console's static files (``cdp.msa.console``: they hold no data)."""
    path = what.split(" ", 1)[1]
    return path in ("/healthz", "/") or path.startswith("/console/")


def _fuzz_operation(op: Any, mode: GenerationMode, site: Any, checker: _Checker, examples: int,
                    derandomize: bool, alive: Callable[[], bool], name: str | None = None) -> None:
    """``examples`` cases of ``op``; ``name``: its ``{name}`` path parameter is that domain."""
    strangers = iter(range(1 << 62))
    fixed = {"path_parameters": {"name": name}} if name is not None else {}

    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode, **fixed))
    def one(case: Any) -> None:
        if not alive():
            return
        what = f"{case.method} {case.formatted_path}"
        # The headers are set on the case: schemathesis drops an Authorization passed to
        # ``call`` when it generates a case that breaks the security scheme.
        generated = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        # A stranger first, so that nothing it could do has been done by the real call.
        wrong = {"Authorization": "Bearer not-the-token-0123456789"} if next(strangers) % 2 else {}
        case.headers = {**generated, **wrong}
        checker.answer(what, case.call(base_url=site.api, timeout=CALL_TIMEOUT_S), authed=False)
        case.headers = {**generated, **site.headers}
        checker.answer(what, case.call(base_url=site.api, timeout=CALL_TIMEOUT_S), authed=True)

    try:
        one()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        checker.no_negative.append(op.label)  # nothing to break: the operation takes no input


def run(quick: bool = True, seed: int = 14, progress: Callable[[str], None] = lambda s: None) -> Result:
    plan = QUICK if quick else LONG
    res = Result(NAME)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="torture-rest-") as tmp:
        tmp_path = Path(tmp)
        site = asyncio.run(installed_site(tmp_path / "site", protect=("erp",)))
        daemon = _Daemon(site, tmp_path / "daemon.log")
        checker = _Checker(res, (TOKEN, str(tmp_path)))
        operations: list[Any] = []
        try:
            wait_until_sync(daemon.healthy, EVENTUALLY_S, "the daemon to answer /healthz")
            req = urllib.request.Request(site.api + "/openapi.json", headers=site.headers)
            with urllib.request.urlopen(req, timeout=CALL_TIMEOUT_S) as r:
                doc = json.loads(r.read())
            schema = schemathesis.openapi.from_dict(doc)
            operations = [r.ok() for r in schema.get_all_operations()]
            progress(f"{NAME}: {len(operations)} operations in the served /openapi.json")
            domains = [d.name for d in site.cfg.cluster.domains]
            for i, op in enumerate(operations):
                # Random names mostly meet 404 unknown_domain: each operation on a domain is
                # also fuzzed on one of the site's own, whose handlers then read the body.
                names = [None, domains[i % len(domains)]] if "{name}" in op.path else [None]
                for name in names:
                    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                        if daemon.proc.poll() is not None:
                            break
                        _fuzz_operation(op, mode, site, checker, plan.examples, quick,
                                        lambda: daemon.proc.poll() is None, name)
                progress(f"{NAME}: {op.label}: {res.cases} requests so far")
            if daemon.proc.poll() is not None:
                res.problem("daemon_crashes", f"the daemon exited with {daemon.proc.returncode}: "
                                              f"{daemon.log_path.read_text()[-2000:]}")
        finally:
            daemon.stop()
    res.notes = {"statuses": dict(sorted(checker.statuses.items())), "operations": len(operations),
                 "no_negative_cases": checker.no_negative, "strangers": checker.strangers}
    res.elapsed_s = time.monotonic() - t0
    return res
