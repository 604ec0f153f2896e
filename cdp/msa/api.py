"""The MSA's REST API (aiohttp): one endpoint per management verb, JSON in and out.

Every request but ``GET /healthz`` carries ``Authorization: Bearer <token>``, the token
of the environment variable the site file names (``[api] token_env``); it is compared in
constant time and never logged. Errors are JSON (FORMAT.md §13.5)::

    {"error": {"status": 400, "code": "bad_request", "field": "target",
               "message": "target: expected ...", "exit_code": 2}}

Long operations start a job and answer ``202`` with its record (``Location:
/v1/jobs/<id>``); ``?wait=1`` waits for the job and answers ``200`` with its final record.
Routes (the OpenAPI document, ``GET /openapi.json``, describes each one):

    GET  /healthz                          no token
    GET  /openapi.json                     GET /metrics
    GET  /v1/status                        GET /v1/alarms
    POST /v1/domains/{name}/protect        job "protect" (optional policy fields)
    POST /v1/domains/{name}/unprotect
    GET  /v1/domains/{name}/points
    POST /v1/domains/{name}/marks          job "mark"         {"name": ...}
    POST /v1/domains/{name}/recover        job "recover"      {"target": ..., "to": DIR}
    POST /v1/domains/{name}/verify         job "verify"       {"deep": bool, "sample": 0..1}
    POST /v1/domains/{name}/consolidate    job "consolidate"
    POST /v1/preflight/{kind}              job "preflight"    kind: system | install | uninstall
    GET  /v1/jobs                          GET /v1/jobs/{id}
"""

from __future__ import annotations

import hmac
import json
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from cdp.errors import Busy, CdpError, ConfigError, LeaseLost, NotFound, StoreError
from cdp.logs import get_logger
from cdp.msa import operations
from cdp.msa.config import Policy
from cdp.msa.runner import TooManyJobs
from cdp.tomlread import NAME
from cdp.units import parse_duration

if TYPE_CHECKING:
    from cdp.msa.daemon import MsaDaemon

log = get_logger("cdp.msa.api")

MSA: web.AppKey[MsaDaemon] = web.AppKey("msa")
PREFLIGHT_KINDS = ("system", "install", "uninstall")
JOBS_LIST_MAX = 1000
SHUTDOWN_TIMEOUT_S = 3.0  # open requests (a ?wait=1) get this long at shutdown
_dumps = partial(json.dumps, sort_keys=True)


class ApiError(Exception):
    """An answer other than 2xx, with the field of the request that was wrong."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 exit_code: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.exit_code = exit_code if exit_code is not None else (7 if status == 409 else 2 if status < 500 else 1)


def bad(field: str, message: str) -> ApiError:
    return ApiError(400, "bad_request", f"{field}: {message}", field)


def error_response(err: ApiError) -> web.Response:
    body = {"error": {"status": err.status, "code": err.code, "message": err.message, "field": err.field,
                      "exit_code": err.exit_code}}
    headers = {"WWW-Authenticate": 'Bearer realm="cdp"'} if err.status == 401 else None
    return web.json_response(body, status=err.status, headers=headers, dumps=_dumps)


def _from_cdp_error(exc: CdpError) -> ApiError:
    from cdp.msa.daemon import NotProtected

    if isinstance(exc, NotProtected):
        return ApiError(409, "not_protected", exc.message, exit_code=exc.exit_code)
    if isinstance(exc, (Busy, LeaseLost)):
        return ApiError(409, "busy", exc.message, exit_code=exc.exit_code)
    if isinstance(exc, TooManyJobs):
        return ApiError(503, "too_many_jobs", exc.message, exit_code=exc.exit_code)
    if isinstance(exc, NotFound):
        return ApiError(404, "not_found", exc.message, exit_code=exc.exit_code)
    if isinstance(exc, StoreError):
        return ApiError(502, "store_error", exc.message, exit_code=exc.exit_code)
    if isinstance(exc, ConfigError):
        return ApiError(400, "bad_request", exc.message, exit_code=exc.exit_code)
    return ApiError(500, "failed", exc.message, exit_code=exc.exit_code)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    t0 = time.monotonic()
    try:
        response = await handler(request)
    except ApiError as err:
        response = error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(ApiError(exc.status, _HTTP_CODES.get(exc.status, "http_error"),
                                           f"{request.method} {request.path}: {exc.reason}"))
    except CdpError as exc:
        response = error_response(_from_cdp_error(exc))
    except Exception as exc:  # a bug: logged with its traceback, answered without it
        log.error("api_handler_failed", exc_info=True, method=request.method, path=request.path)
        response = error_response(ApiError(500, "internal", f"internal error ({type(exc).__name__})"))
    # The path only: the token is in a header, and query strings carry no secret either.
    # Reads that succeed (scrapes, `cdp jobs --follow` polling) only at debug level.
    quiet = request.method == "GET" and response.status < 400
    (log.debug if quiet else log.info)("api_request", method=request.method, path=request.path,
                                       status=response.status, ms=round((time.monotonic() - t0) * 1000, 1))
    return response


@web.middleware
async def _auth(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path == "/healthz" and request.method in ("GET", "HEAD"):
        return await handler(request)
    daemon = request.app[MSA]
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), daemon.token.encode()):
        raise ApiError(401, "unauthorized",
                       f"missing or wrong bearer token: send 'Authorization: Bearer <token>' with the token "
                       f"in the daemon's environment variable {daemon.cfg.token_env}")
    return await handler(request)


# ---------------------------------------------------------------------- input


async def read_body(request: web.Request, allowed: set[str], required: set[str] = frozenset()) -> dict[str, Any]:
    """The JSON object of the request body ({} when there is none); unknown keys refused."""
    text = await request.text() if request.can_read_body else ""
    if not text.strip():
        doc: Any = {}
    else:
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise bad("request body", f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise bad("request body", f"expected a JSON object, got {type(doc).__name__}")
    for key in sorted(set(doc) - allowed):
        raise bad(key, f"unknown field (expected {', '.join(sorted(allowed)) or 'no body'})")
    for key in sorted(required - set(doc)):
        raise bad(key, "missing")
    return doc


def wants_wait(request: web.Request) -> bool:
    value = request.query.get("wait", "0").strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no", ""):
        return False
    raise bad("wait", f"expected 1 or 0, got {value!r}")


def domain_of(request: web.Request) -> str:
    daemon = request.app[MSA]
    name = request.match_info["name"]
    try:
        daemon.check_domain(name)
    except ConfigError:
        known = ", ".join(d.name for d in daemon.cfg.cluster.domains) or "none"
        raise ApiError(404, "unknown_domain", f"no domain named {name!r} in {daemon.cfg.cluster_path.name} "
                                              f"(domains: {known})", "name") from None
    return name


def _duration(doc: dict[str, Any], key: str, minimum_s: float) -> float | None:
    if key not in doc:
        return None
    try:
        value = parse_duration(doc[key], key)
    except ConfigError:
        raise bad(key, f"expected a duration (seconds, or e.g. '15m', '72h', '7d'), got {doc[key]!r}") from None
    if value < minimum_s:
        raise bad(key, f"expected at least {minimum_s:g} s, got {doc[key]!r}")
    return value


def policy_from(doc: dict[str, Any], base: Policy) -> Policy:
    """``base`` with the fields the protect body overrides."""
    rpo = doc.get("rpo_target_s", base.rpo_target_s)
    if isinstance(rpo, bool) or not isinstance(rpo, (int, float)) or not 0 < rpo <= 365 * 86400:
        raise bad("rpo_target_s", f"expected a number of seconds in (0, 31536000], got {rpo!r}")
    retention = _duration(doc, "retention", 1)
    after = _duration(doc, "consolidate_after", 0)
    every = _duration(doc, "consolidate_every", 1)
    return Policy(retention_s=base.retention_s if retention is None else retention, rpo_target_s=float(rpo),
                  consolidate_after_s=base.consolidate_after_s if after is None else after,
                  consolidate_every_s=base.consolidate_every_s if every is None else every)


def target_from(value: Any) -> Any:
    """The recovery target of a request: "latest", {"seq": N}, {"mark": NAME}, {"at": TIME}."""
    from rocva import Target

    expected = 'expected "latest", {"seq": N}, {"mark": NAME} or {"at": TIME}'
    if value == "latest":
        return Target.latest()
    if not isinstance(value, dict) or len(value) != 1:
        raise bad("target", f"{expected}, got {json.dumps(value)}")
    kind, arg = next(iter(value.items()))
    try:
        if kind == "seq" and isinstance(arg, int) and not isinstance(arg, bool):
            return Target.seq(arg)
        if kind == "mark" and isinstance(arg, str):
            return Target.mark(arg)
        if kind == "at" and isinstance(arg, str):
            return Target.at(arg)
    except ConfigError as exc:
        raise bad(f"target.{kind}", exc.message) from None
    raise bad("target", f"{expected}, got {json.dumps(value)}")


# ---------------------------------------------------------------------- handlers


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=_dumps)


async def _job_answer(request: web.Request, record: dict[str, Any], wait: bool) -> web.Response:
    if wait:
        return _json(await request.app[MSA].runner.wait(record["id"]))
    return _json(record, 202, {"Location": f"/v1/jobs/{record['id']}"})


async def healthz(request: web.Request) -> web.Response:
    return _json({"ok": True})


async def openapi(request: web.Request) -> web.Response:
    from cdp.msa.openapi import openapi_document

    return _json(openapi_document(request.app[MSA].cfg))


async def metrics(request: web.Request) -> web.Response:
    body = request.app[MSA].metrics.render()
    return web.Response(body=body, headers={"Content-Type": request.app[MSA].metrics.content_type})


async def status(request: web.Request) -> web.Response:
    return _json(request.app[MSA].status())


async def alarms(request: web.Request) -> web.Response:
    ev = request.app[MSA].alarms
    return _json({"active": [a.to_dict() for a in ev.active_alarms()],
                  "recent": [a.to_dict() for a in ev.recent_alarms()]})


async def protect(request: web.Request) -> web.Response:
    daemon = request.app[MSA]
    domain = domain_of(request)
    wait = wants_wait(request)
    doc = await read_body(request, {"retention", "rpo_target_s", "consolidate_after", "consolidate_every"})
    try:
        daemon.cfg.drva_of(daemon.cfg.domain(domain))
    except ConfigError as exc:
        raise ApiError(409, "no_drva", exc.message, "name", exit_code=exc.exit_code) from None
    policy = policy_from(doc, daemon.protection.get(domain) or daemon.cfg.policy(domain))
    record = await daemon.start_job("protect", {"domain": domain, **doc},
                                    lambda job: daemon.protect(domain, policy, job))
    return await _job_answer(request, record, wait)


async def unprotect(request: web.Request) -> web.Response:
    domain = domain_of(request)
    await read_body(request, set())
    return _json(await request.app[MSA].unprotect(domain))


async def points(request: web.Request) -> web.Response:
    domain = domain_of(request)
    return _json(await operations.points(request.app[MSA].cfg, domain))


async def mark(request: web.Request) -> web.Response:
    daemon = request.app[MSA]
    domain = domain_of(request)
    wait = wants_wait(request)
    doc = await read_body(request, {"name"}, {"name"})
    name = doc["name"]
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise bad("name", f"expected a mark name of 1..64 characters [A-Za-z0-9._-], got {json.dumps(name)}")
    if domain not in daemon.protection:
        raise ApiError(409, "not_protected", f"domain {domain} is not protected: a mark needs its stream", "name")
    try:
        from cdp.msa.marks import request_mark
    except ImportError:
        raise ApiError(501, "not_implemented", "marks are not available in this build (cdp.msa.marks)") from None
    record = await daemon.start_job("mark", {"domain": domain, "name": name},
                                    lambda job: request_mark(daemon.cfg, domain, name))
    return await _job_answer(request, record, wait)


async def recover(request: web.Request) -> web.Response:
    daemon = request.app[MSA]
    domain = domain_of(request)
    wait = wants_wait(request)
    doc = await read_body(request, {"target", "to"}, {"target", "to"})
    target = target_from(doc["target"])
    to = doc["to"]
    if not isinstance(to, str) or not to or not Path(to).is_absolute():
        raise bad("to", f"expected an absolute directory path (the images go there), got {json.dumps(to)}")
    try:  # under the site's recovery_roots, not in the store or the state directory
        operations.check_recovery_destination(daemon.cfg, to)
    except CdpError as exc:
        raise bad("to", exc.message) from None
    record = await daemon.start_job("recover", {"domain": domain, "target": doc["target"], "to": to},
                                    lambda job: operations.recover(daemon.cfg, domain, target, Path(to), job))
    return await _job_answer(request, record, wait)


async def verify(request: web.Request) -> web.Response:
    daemon = request.app[MSA]
    domain = domain_of(request)
    wait = wants_wait(request)
    doc = await read_body(request, {"deep", "sample"})
    deep, sample = doc.get("deep", False), doc.get("sample", 0.0)
    if not isinstance(deep, bool):
        raise bad("deep", f"expected true or false, got {json.dumps(deep)}")
    if isinstance(sample, bool) or not isinstance(sample, (int, float)) or not 0 <= sample <= 1:
        raise bad("sample", f"expected a share of segments in 0..1, got {json.dumps(sample)}")
    record = await daemon.start_job("verify", {"domain": domain, "deep": deep, "sample": sample},
                                    lambda job: operations.verify(daemon.cfg, domain, deep, float(sample), job))
    return await _job_answer(request, record, wait)


async def consolidate(request: web.Request) -> web.Response:
    daemon = request.app[MSA]
    domain = domain_of(request)
    wait = wants_wait(request)
    await read_body(request, set())
    return await _job_answer(request, await daemon.start_consolidation(domain), wait)


async def preflight(request: web.Request) -> web.Response:
    daemon = request.app[MSA]
    kind = request.match_info["kind"]
    if kind not in PREFLIGHT_KINDS:
        raise ApiError(404, "not_found", f"no preflight {kind!r} (expected one of {', '.join(PREFLIGHT_KINDS)})",
                       "kind")
    wait = wants_wait(request)
    await read_body(request, set())
    try:
        from cdp.msa import preflight as checks
    except ImportError:
        raise ApiError(501, "not_implemented", "preflight is not available in this build (cdp.msa.preflight)") from None

    async def work(job: Any) -> Any:
        if kind == "uninstall":
            return await checks.preflight_uninstall(daemon.cfg)
        fn = checks.preflight_system if kind == "system" else checks.preflight_install
        return await fn(daemon.cfg, env=daemon.env)

    record = await daemon.start_job("preflight", {"kind": kind}, work)
    return await _job_answer(request, record, wait)


async def jobs_list(request: web.Request) -> web.Response:
    daemon = request.app[MSA]
    name = request.query.get("name") or None
    text = request.query.get("limit", "100")
    if not text.isdigit() or not 1 <= int(text) <= JOBS_LIST_MAX:
        raise bad("limit", f"expected an integer in 1..{JOBS_LIST_MAX}, got {text!r}")
    return _json({"jobs": daemon.jobs.list(name=name, limit=int(text))})


async def job_get(request: web.Request) -> web.Response:
    job_id = request.match_info["id"]
    try:
        return _json(request.app[MSA].jobs.get(job_id))
    except NotFound as exc:
        raise ApiError(404, "unknown_job", exc.message, "id") from None
    except ConfigError as exc:
        raise bad("id", exc.message) from None


ROUTES = (
    ("GET", "/healthz", healthz), ("GET", "/openapi.json", openapi), ("GET", "/metrics", metrics),
    ("GET", "/v1/status", status), ("GET", "/v1/alarms", alarms),
    ("POST", "/v1/domains/{name}/protect", protect), ("POST", "/v1/domains/{name}/unprotect", unprotect),
    ("GET", "/v1/domains/{name}/points", points), ("POST", "/v1/domains/{name}/marks", mark),
    ("POST", "/v1/domains/{name}/recover", recover), ("POST", "/v1/domains/{name}/verify", verify),
    ("POST", "/v1/domains/{name}/consolidate", consolidate), ("POST", "/v1/preflight/{kind}", preflight),
    ("GET", "/v1/jobs", jobs_list), ("GET", "/v1/jobs/{id}", job_get),
)


def make_app(daemon: MsaDaemon) -> web.Application:
    app = web.Application(middlewares=[_errors, _auth], client_max_size=1 << 20)
    app[MSA] = daemon
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    return app


async def start_api(daemon: MsaDaemon) -> web.AppRunner:
    """Serve the API on the site's ``[api] listen``; the caller cleans the runner up."""
    runner = web.AppRunner(make_app(daemon), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    listen = daemon.cfg.api_listen
    try:
        await web.TCPSite(runner, listen.host, listen.port, reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"{daemon.cfg.path}: api.listen {listen}: cannot listen ({exc.strerror})") from exc
    log.info("api_listening", listen=str(listen))
    return runner
