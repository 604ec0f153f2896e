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

import asyncio
import errno
import hmac
import json
import os
import re
import stat
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from cdp.errors import Busy, CdpError, ConfigError, LeaseLost, NotFound, StoreError
from cdp.logs import get_logger
from cdp.msa import operations
from cdp.msa.config import POLICY_LIMITS, Policy, policy_value
from cdp.msa.http_limits import LimitedSite
from cdp.msa.jobs import JOB_ID, JOB_ID_CHARS_MAX
from cdp.msa.runner import TooManyJobs
from cdp.tomlread import NAME

if TYPE_CHECKING:
    from cdp.msa.daemon import MsaDaemon

log = get_logger("cdp.msa.api")

MSA: web.AppKey[MsaDaemon] = web.AppKey("msa")
REDACTIONS: web.AppKey[tuple[tuple[str, str], ...]] = web.AppKey("redactions")
PREFLIGHT_KINDS = ("system", "install", "uninstall")
JOBS_LIST_MAX = 1000
SHUTDOWN_TIMEOUT_S = 3.0  # open requests (a ?wait=1) get this long at shutdown
BODY_BYTES_MAX = 1 << 20  # 413 above
BODY_DEPTH_MAX = 8  # the deepest valid body is 2 ({"target": {"seq": N}})
SHOWN_CHARS_MAX = 80  # of a client's value quoted in an error message
FIELD_CHARS_MAX = 64  # of a body key named as the error's field
SEQ_MAX = (1 << 64) - 1
MARK_BYTES_MAX = 255  # FORMAT.md §13.6
TIME_CHARS_MAX = 64
PATH_BYTES_MAX = 4096  # PATH_MAX on Linux
JOB_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
LIMIT = re.compile(r"[0-9]{1,4}")
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


def error_response(err: ApiError, places: tuple[tuple[str, str], ...] = ()) -> web.Response:
    """The JSON error answer; ``places`` (``redactions``) are replaced in its message."""
    message = err.message
    for path, name in places:
        message = message.replace(path, name)
    body = {"error": {"status": err.status, "code": err.code, "message": message, "field": err.field,
                      "exit_code": err.exit_code}}
    headers = {"WWW-Authenticate": 'Bearer realm="cdp"'} if err.status == 401 else None
    response = web.json_response(body, status=err.status, headers=headers, dumps=_dumps)
    if err.status in (408, 413):
        response.force_close()  # the rest of the body is not worth waiting for
    return response


def redactions(daemon: MsaDaemon) -> tuple[tuple[str, str], ...]:
    """Where the site lives on this machine, as it must never appear in an error answer:
    (absolute path or URL, the placeholder said instead), longest first. The library's
    messages name files for the operator at the console; a client is told the place."""
    cfg = daemon.cfg
    places = {str(cfg.state_dir): "<state_dir>", str(cfg.path.parent): "<site dir>",
              str(cfg.cluster_path.parent): "<cluster dir>", str(cfg.cluster.state_dir): "<disk images>"}
    if cfg.store_url.startswith("file://"):
        places[cfg.store_url] = "<store>"
        places[cfg.store_url.removeprefix("file://")] = "<store>"
    for drva in cfg.drvas:
        places[str(drva.log_path)] = f"<log partition of {drva.name}>"
        places[str(drva.meta_path)] = f"<metadata of {drva.name}>"
    return tuple(sorted(((p, n) for p, n in places.items() if p.startswith("/") and len(p) > 1),
                        key=lambda item: -len(item[0])))


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
    places = request.app[REDACTIONS]
    try:
        response = await handler(request)
    except ApiError as err:
        response = error_response(err, places)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(ApiError(exc.status, _HTTP_CODES.get(exc.status, "http_error"),
                                           f"{request.method} {shown(request.path)}: {exc.reason}"), places)
    except CdpError as exc:
        response = error_response(_from_cdp_error(exc), places)
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
    sent = request.headers.getall("Authorization", [])
    scheme, _, given = (sent[0] if len(sent) == 1 else "").partition(" ")  # two: which one counts? neither
    # A header is text as aiohttp decoded it (UTF-8, undecodable bytes as surrogates):
    # compare it as the bytes that were sent.
    token = given.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token, daemon.token.encode()):
        raise ApiError(401, "unauthorized",
                       f"missing or wrong bearer token: send 'Authorization: Bearer <token>' with the token "
                       f"in the daemon's environment variable {daemon.cfg.token_env}")
    return await handler(request)


# ---------------------------------------------------------------------- input
#
# Every byte of a request is hostile until checked here: the body is UTF-8 JSON (RFC 8259)
# of bounded size, depth and time to arrive, every string in it valid Unicode; each field
# is checked for type and range before anything uses it, and a refusal names the field
# and quotes at most ``SHOWN_CHARS_MAX`` characters of what was sent.


def shown(value: Any) -> str:
    """A client's value as JSON in a message, cut short (a field can be a megabyte)."""
    try:
        text = json.dumps(value, ensure_ascii=True, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= SHOWN_CHARS_MAX else text[:SHOWN_CHARS_MAX] + f"... ({len(text)} characters)"


def _field_name(key: str) -> str:
    """A body key as the ``field`` of an error: printable ASCII, cut short."""
    text = key.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= FIELD_CHARS_MAX else text[:FIELD_CHARS_MAX] + "..."


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def _check_json(doc: Any) -> None:
    """No deeper than ``BODY_DEPTH_MAX``, every string (key or value) valid Unicode:
    ``json.loads`` lets a lone surrogate (``"\\ud800"``) through, and no file name,
    record or log line can hold one."""
    stack = [(doc, 1, "request body")]
    while stack:
        value, depth, field = stack.pop()
        if depth > BODY_DEPTH_MAX:
            raise bad("request body", f"nested too deeply (at most {BODY_DEPTH_MAX} levels)")
        items: Any = ()
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, list):
            items = ((None, v) for v in value)
        elif isinstance(value, str):
            _check_text(value, field)
        for key, item in items:
            at = field
            if key is not None:
                _check_text(key, "request body")
                at = key if depth == 1 else field
            stack.append((item, depth + 1, at))


def _check_text(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad(_field_name(field), f"not valid Unicode: a lone surrogate at character {exc.start}") from None


async def read_body(request: web.Request, allowed: set[str], required: set[str] = frozenset()) -> dict[str, Any]:
    """The JSON object of the request body ({} when there is none); unknown keys refused."""
    charset = request.charset
    if charset is not None and charset.strip().lower() not in ("utf-8", "utf8"):
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type: charset {shown(charset)}: expected UTF-8 (JSON is UTF-8) or no charset",
                       "Content-Type")
    if (request.content_length or 0) > BODY_BYTES_MAX:
        raise ApiError(413, "too_large", f"request body: {request.content_length} bytes, at most {BODY_BYTES_MAX}",
                       "request body")
    timeout_s = request.app[MSA].api_limits.body_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            data = await request.read() if request.can_read_body else b""
    except TimeoutError:
        raise ApiError(408, "timeout", f"request body: not received within {timeout_s:g} s",
                       "request body") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad("request body", f"not UTF-8 (byte {exc.start}): a JSON body is UTF-8") from None
    if not text.strip():
        doc: Any = {}
    else:
        try:
            doc = json.loads(text, parse_constant=_refuse_constant)
        except RecursionError:
            raise bad("request body", f"nested too deeply (at most {BODY_DEPTH_MAX} levels)") from None
        except ValueError as exc:
            raise bad("request body", f"not valid JSON ({str(exc)[:SHOWN_CHARS_MAX]})") from None
    _check_json(doc)
    if not isinstance(doc, dict):
        raise bad("request body", f"expected a JSON object, got {type(doc).__name__}")
    for key in sorted(set(doc) - allowed):
        raise bad(_field_name(key), f"unknown field (expected {', '.join(sorted(allowed)) or 'no body'})")
    for key in sorted(required - set(doc)):
        raise bad(key, "missing")
    return doc


def wants_wait(request: web.Request) -> bool:
    value = request.query.get("wait", "0").strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no", ""):
        return False
    raise bad("wait", f"expected 1 or 0, got {shown(value)}")


def domain_of(request: web.Request) -> str:
    daemon = request.app[MSA]
    name = request.match_info["name"]
    try:
        daemon.check_domain(name)
    except ConfigError:
        known = ", ".join(d.name for d in daemon.cfg.cluster.domains) or "none"
        raise ApiError(404, "unknown_domain", f"no domain named {shown(name)} in {daemon.cfg.cluster_path.name} "
                                              f"(domains: {known})", "name") from None
    return name


def policy_from(doc: dict[str, Any], base: Policy) -> Policy:
    """``base`` with the fields the protect body overrides (the site file's limits)."""
    given: dict[str, float] = {}
    for key in POLICY_LIMITS:
        if key in doc:
            try:
                given[key] = policy_value(key, doc[key])
            except ConfigError as exc:
                raise bad(key, exc.message) from None
    return Policy(retention_s=given.get("retention", base.retention_s),
                  rpo_target_s=given.get("rpo_target_s", base.rpo_target_s),
                  consolidate_after_s=given.get("consolidate_after", base.consolidate_after_s),
                  consolidate_every_s=given.get("consolidate_every", base.consolidate_every_s))


def target_from(value: Any) -> Any:
    """The recovery target of a request: "latest", {"seq": N}, {"mark": NAME}, {"at": TIME}."""
    from rocva import Target

    expected = 'expected "latest", {"seq": N}, {"mark": NAME} or {"at": TIME}'
    if value == "latest":
        return Target.latest()
    if not isinstance(value, dict) or len(value) != 1:
        raise bad("target", f"{expected}, got {shown(value)}")
    kind, arg = next(iter(value.items()))
    if kind == "seq":
        if isinstance(arg, bool) or not isinstance(arg, int) or not 0 <= arg <= SEQ_MAX:
            raise bad("target.seq", f"expected an integer in 0..{SEQ_MAX}, got {shown(arg)}")
        return Target.seq(arg)
    if kind == "mark":
        if not isinstance(arg, str) or not 1 <= len(arg.encode()) <= MARK_BYTES_MAX or "\0" in arg:
            raise bad("target.mark", f"expected a mark name of 1..{MARK_BYTES_MAX} UTF-8 bytes, got {shown(arg)}")
        return Target.mark(arg)
    if kind == "at":
        if not isinstance(arg, str) or not 1 <= len(arg) <= TIME_CHARS_MAX:
            raise bad("target.at", f"expected a time of 1..{TIME_CHARS_MAX} characters (ISO 8601 with a zone, "
                                   f"or relative such as -15m), got {shown(arg)}")
        try:
            return Target.at(arg)
        except ConfigError as exc:
            raise bad("target.at", exc.message) from None
    raise bad("target", f"{expected}, got {shown(value)}")


def recovery_dir(value: Any) -> Path:
    """The ``to`` of a recover request, checked as a string that can name a directory:
    where recoveries may land at all is the recovery's own policy (rocva), not this."""
    expected = "expected an absolute directory path (the images go there)"
    if not isinstance(value, str) or not value:
        raise bad("to", f"{expected}, got {shown(value)}")
    if "\0" in value:
        raise bad("to", f"{expected}: a path holds no NUL character")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise bad("to", f"{expected}: not valid UTF-8 (a lone surrogate)") from None
    if size > PATH_BYTES_MAX:
        raise bad("to", f"{expected}: {size} bytes long, at most {PATH_BYTES_MAX}")
    path = Path(value)
    if not path.is_absolute():
        raise bad("to", f"{expected}, got {shown(value)}")
    return path


def _not_a_directory(path: Path) -> str | None:
    """The name of the first component of ``path`` that exists and is not a directory."""
    for part in (*reversed(path.parents), path):
        try:
            st = os.stat(part)
        except FileNotFoundError:
            return None  # from here on it is made by the recovery
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                return part.name[:FIELD_CHARS_MAX]
            return None  # not ours to judge (permissions): the recovery says what it cannot do
        if not stat.S_ISDIR(st.st_mode):
            return part.name[:FIELD_CHARS_MAX] or "/"
    return None


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
    spec = daemon.cfg.domain(domain)
    try:
        daemon.cfg.drva_of(spec)
    except ConfigError as exc:
        raise ApiError(409, "no_drva", f"domain {domain} streams to {spec.drva}, which no DRVA of the site "
                                       f"listens on", "name", exit_code=exc.exit_code) from None
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
        raise bad("name", f"expected a mark name of 1..64 characters [A-Za-z0-9._-], got {shown(name)}")
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
    to = recovery_dir(doc["to"])
    if (blocker := await asyncio.to_thread(_not_a_directory, to)) is not None:
        raise bad("to", f"expected a directory (or a path where one can be made), but {blocker!r} on "
                        f"the way is not a directory")
    record = await daemon.start_job("recover", {"domain": domain, "target": doc["target"], "to": str(to)},
                                    lambda job: operations.recover(daemon.cfg, domain, target, to, job))
    return await _job_answer(request, record, wait)


async def verify(request: web.Request) -> web.Response:
    daemon = request.app[MSA]
    domain = domain_of(request)
    wait = wants_wait(request)
    doc = await read_body(request, {"deep", "sample"})
    deep, sample = doc.get("deep", False), doc.get("sample", 0.0)
    if not isinstance(deep, bool):
        raise bad("deep", f"expected true or false, got {shown(deep)}")
    if isinstance(sample, bool) or not isinstance(sample, (int, float)) or not 0 <= sample <= 1:
        raise bad("sample", f"expected a share of segments in 0..1, got {shown(sample)}")
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
        raise ApiError(404, "not_found", f"no preflight {shown(kind)} (expected one of {', '.join(PREFLIGHT_KINDS)})",
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
    if name is not None and not JOB_NAME.fullmatch(name):
        raise bad("name", f"expected a job name of 1..64 characters [A-Za-z0-9_-], got {shown(name)}")
    text = request.query.get("limit", "100")
    if not LIMIT.fullmatch(text) or not 1 <= int(text) <= JOBS_LIST_MAX:
        raise bad("limit", f"expected an integer in 1..{JOBS_LIST_MAX}, got {shown(text)}")
    return _json({"jobs": await asyncio.to_thread(daemon.jobs.list, name=name, limit=int(text))})


async def job_get(request: web.Request) -> web.Response:
    job_id = request.match_info["id"]
    if not JOB_ID.fullmatch(job_id):
        raise bad("id", f"expected a job id of 1..{JOB_ID_CHARS_MAX} characters [A-Za-z0-9_-], got {shown(job_id)}")
    try:
        return _json(await asyncio.to_thread(request.app[MSA].jobs.get, job_id))
    except NotFound:
        raise ApiError(404, "unknown_job", f"no job {job_id}", "id") from None


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
    app = web.Application(middlewares=[_errors, _auth], client_max_size=BODY_BYTES_MAX)
    app[MSA] = daemon
    app[REDACTIONS] = redactions(daemon)
    for method, path, handler in ROUTES:
        if method == "GET":
            app.router.add_get(path, handler)  # and HEAD: a HEAD /healthz is a health check too
        else:
            app.router.add_route(method, path, handler)
    return app


async def start_api(daemon: MsaDaemon) -> web.AppRunner:
    """Serve the API on the site's ``[api] listen`` within ``daemon.api_limits``
    (``cdp.msa.http_limits``); the caller cleans the runner up."""
    limits = daemon.api_limits
    runner = web.AppRunner(make_app(daemon), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                           **limits.runner_options())
    await runner.setup()
    listen = daemon.cfg.api_listen
    try:
        await LimitedSite(runner, listen.host, listen.port, limits.connections_max).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"{daemon.cfg.path}: api.listen {listen}: cannot listen ({exc.strerror})") from exc
    log.info("api_listening", listen=str(listen))
    return runner
