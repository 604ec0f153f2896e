"""The MSA's REST API (aiohttp): one endpoint per management verb, JSON in and out.

Every request but ``GET /healthz`` and the web console's static files (``GET /``,
``/console/...``: they carry no data; ``cdp.msa.console``) carries ``Authorization: Bearer <token>``,
the token of the environment variable the site file names (``[api] token_env``); it is
compared in constant time and never logged. A request is checked by
``cdp.msa.api_input`` before anything uses it; a connection is bounded in time and number
by ``cdp.msa.http_limits``. Errors are JSON (FORMAT.md §13.5) and name no path of this
machine (``redactions``)::

    {"error": {"status": 400, "code": "bad_request", "field": "target",
               "message": "target: expected ...", "exit_code": 2}}

Long operations start a job and answer ``202`` with its record (``Location:
/v1/jobs/<id>``); ``?wait=1`` waits for the job and answers ``200`` with its final record.
Routes (the OpenAPI document, ``GET /openapi.json``, describes each one):

    GET  /healthz                          no token
    GET  /   GET /console/{file}           the web console's files, no token (``cdp.msa.console``)
    GET  /openapi.json                     GET /metrics
    GET  /v1/status                        GET /v1/alarms
    POST /v1/domains/{name}/protect        job "protect" (optional policy fields)
    POST /v1/domains/{name}/unprotect
    GET  /v1/domains/{name}/points         GET /v1/domains/{name}/history (the console's charts)
                                           (points: ?limit=&before_seq=&timeline=, ``cdp.msa.points_cache``)
    POST /v1/domains/{name}/marks          job "mark"         {"name": ...}
    POST /v1/domains/{name}/recover        job "recover"      {"target": ..., "to": DIR}
    POST /v1/domains/{name}/verify         job "verify"       {"deep": bool, "sample": 0..1}
    POST /v1/domains/{name}/consolidate    job "consolidate"
    POST /v1/preflight/{kind}              job "preflight"    kind: system | install | uninstall
    POST /v1/failback/{name}/extents       an extent stream of this site's handed-back disks (FORMAT.md §16)
    GET  /v1/failover/{name}/points        a domain's points as the store knows it (before a failover)
    GET  /v1/jobs                          GET /v1/jobs/{id}
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import math
import os
import re
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from cdp.errors import Busy, CdpError, ConfigError, FailoverRefused, LeaseLost, NotFound, StoreError
from cdp.logs import get_logger
from cdp.msa import console, operations
from cdp.msa.api_input import (
    BODY_BYTES_MAX, BODY_TIMEOUT_S, ApiError, PointsPage, bad, points_page, policy_change, read_body,
    recover_options_from, shown, target_from, wants_wait,
)
from cdp.msa.http_limits import LimitedSite, RefusalLog, quiet_parser_errors, request_fields
from cdp.msa.jobs import JOB_ID, JOB_ID_CHARS_MAX
from cdp.msa.points_cache import PointsCache
from cdp.msa.runner import TooManyJobs, quiesce_claim, site_move
from cdp.msa.state_fs import StateUnwritable, error_text, fs_problem, hint
from cdp.tomlread import NAME

if TYPE_CHECKING:
    from cdp.catalog_state import CatalogState
    from cdp.msa.daemon import MsaDaemon
    from cdp.store.base import ObjectStore

log = get_logger("cdp.msa.api")

MSA: web.AppKey[MsaDaemon] = web.AppKey("msa")
REDACTIONS: web.AppKey[tuple[tuple[str, str], ...]] = web.AppKey("redactions")
REFUSALS: web.AppKey[RefusalLog] = web.AppKey("refusals")
#: The points routes' computations: at most 2 at once, shared, kept (``cdp.msa.points_cache``).
POINTS: web.AppKey[PointsCache] = web.AppKey("points")
#: Refused before any work (no token, no such route, a wrong method): logged one by one
#: only up to a bound per minute (``http_limits.RefusalLog``), then counted.
REFUSED_STATUSES = frozenset({401, 404, 405})
PREFLIGHT_KINDS = ("system", "install", "uninstall")
JOBS_LIST_MAX = 1000
SHUTDOWN_TIMEOUT_S = 3.0  # open requests (a ?wait=1) get this long at shutdown
JOB_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
LIMIT = re.compile(r"[0-9]{1,4}")
SINCE_NS = re.compile(r"[0-9]{1,19}")


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinity (a job record's, stored before ``--timeout``
    refused them) as None: the answer stays valid JSON, which has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    """An answer's JSON: strict (``allow_nan=False``: ``NaN`` is no JSON), non-finite numbers as null."""
    return json.dumps(_finite(value), sort_keys=True, allow_nan=False)


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
    for url, name in zip(cfg.store_urls(), ("<store>", "<peer store>")):
        if url.startswith("file://"):
            places[url.removeprefix("file://").rstrip("/")] = name
    for drva in cfg.drvas:
        places[str(drva.log_path)] = f"<log partition of {drva.name}>"
        places[str(drva.meta_path)] = f"<metadata of {drva.name}>"
    paths = {p: n for p, n in places.items() if p.startswith("/") and len(p) > 1}
    urls = {f"file://{p}": n for p, n in paths.items()}  # a file store describes itself so
    return tuple(sorted({**paths, **urls}.items(), key=lambda item: -len(item[0])))


#: An unwritable file system (cdp.msa.state_fs) is answered by its errno: full (507: free
#: space and retry) or unusable (503: read-only, failing; repair it). FORMAT.md §13.5.
_STORAGE_ANSWERS = {errno.ENOSPC: (507, "insufficient_storage"), errno.EDQUOT: (507, "insufficient_storage"),
                    errno.EROFS: (503, "storage_unavailable"), errno.EIO: (503, "storage_unavailable")}


def _storage_error(code: int | None, message: str) -> ApiError | None:
    """The answer of an unwritable file system's error (``_STORAGE_ANSWERS``), else None."""
    found = _STORAGE_ANSWERS.get(code) if code is not None else None
    if found is None:
        return None
    return ApiError(found[0], found[1], message, exit_code=1)


def _from_os_error(exc: OSError, daemon: MsaDaemon) -> ApiError:
    """An operating error a handler met (the daemon's own files: protection.json,
    power.json, a DRVA's configuration...): the file and the cause, never ``internal``.
    An error that names no file (``atomic_write``'s do not) is the state directory's when
    its file system is what fails there; the state directory's watch is told either way."""
    state_dir = str(daemon.cfg.state_dir)
    name = os.fsdecode(exc.filename) if exc.filename is not None else None
    cause = exc.strerror or str(exc) or type(exc).__name__
    if name is not None and os.path.isabs(name):
        text = f"{name}: {cause}"
    elif exc.errno in _STORAGE_ANSWERS and fs_problem(daemon.cfg.state_dir) is not None:
        # No file, or a name in a directory opened earlier (a temporary file's): the
        # state directory is the place the daemon writes that is full or read-only now.
        text = f"{state_dir}: {cause}" + (f" (writing {name})" if name else "")
        name = state_dir
    else:
        text = f"a file the daemon writes{f' ({name})' if name else ''}: {cause}"
    if name is None or name == state_dir or name.startswith(state_dir.rstrip("/") + "/"):
        daemon.supervisor.state_fs.failed(name, exc)
    todo = hint(exc.errno)
    message = text + (f" ({todo})" if todo else "")
    return _storage_error(exc.errno, message) or ApiError(500, "failed", text, exit_code=1)


def _from_cdp_error(exc: CdpError) -> ApiError:
    from cdp.msa.daemon import FailedOver, NotProtected

    if isinstance(exc, StateUnwritable) and (found := _storage_error(exc.errno, exc.message)) is not None:
        return found
    if isinstance(exc, NotProtected):
        return ApiError(409, "not_protected", exc.message, exit_code=exc.exit_code)
    if isinstance(exc, FailedOver):
        return ApiError(409, "failed_over", exc.message, exit_code=exc.exit_code)
    if isinstance(exc, FailoverRefused):
        return ApiError(409, "failover_refused", exc.message, exit_code=exc.exit_code)
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
    except OSError as exc:  # an operating error (a full or read-only state directory), not a bug
        log.warning("api_handler_os_error", error=error_text(exc), errno=errno.errorcode.get(exc.errno, exc.errno),
                    **request_fields(request.method, request.path))
        response = error_response(_from_os_error(exc, request.app[MSA]), places)
    except Exception as exc:  # a bug: logged with its traceback, answered without it
        log.error("api_handler_failed", exc_info=True, **request_fields(request.method, request.path))
        response = error_response(ApiError(500, "internal", f"internal error ({type(exc).__name__})"))
    # The path only: the token is in a header, and query strings carry no secret either.
    # Reads that succeed (scrapes, `cdp jobs --follow` polling) only at debug level.
    # A path is cut (it may be 8,190 bytes), and refusals are bounded: a client with no
    # token once wrote ~32 MB/s of log lines from one connection.
    fields = {**request_fields(request.method, request.path), "status": response.status,
              "ms": round((time.monotonic() - t0) * 1000, 1)}
    if request.method in ("GET", "HEAD") and response.status < 400:
        log.debug("api_request", **fields)
    elif response.status not in REFUSED_STATUSES or request.app[REFUSALS].admit(response.status):
        log.info("api_request", **fields)
    return response


@web.middleware
async def _auth(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.method in ("GET", "HEAD") and (request.path == "/healthz" or console.is_static(request.path)):
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


def store_domain_of(request: web.Request) -> str:
    """A domain named as the store knows it (a failover's: this site's inventory has it
    only once the failover registered it), checked as a name."""
    name = request.match_info["name"]
    if not NAME.fullmatch(name):
        raise ApiError(404, "unknown_domain", f"expected a domain name of 1..64 characters [A-Za-z0-9._-], got "
                                              f"{shown(name)}", "name")
    return name


def mark_name(doc: dict[str, Any], field: str) -> str:
    name = doc[field]
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise bad(field, f"expected a mark name of 1..64 characters [A-Za-z0-9._-], got {shown(name)}")
    return name


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
    change = policy_change(doc)
    daemon.runner.refuse_if_moving(domain, "protecting it")  # at once, not as a failed job (checked again in it)
    record = await daemon.start_job("protect", {"domain": domain, **doc},
                                    lambda job: daemon.protect(domain, change, job))
    return await _job_answer(request, record, wait)


async def unprotect(request: web.Request) -> web.Response:
    domain = domain_of(request)
    await read_body(request, set())
    return _json(await request.app[MSA].unprotect(domain))


def _points_answer(text: str) -> web.Response:
    return web.Response(text=text, content_type="application/json")


async def _paged(page: PointsPage, work: Any) -> str:
    """``await work``, an unknown timeline of ``page`` answered 400 naming it."""
    from rocva.errors import InvalidTarget

    try:
        return await work
    except InvalidTarget as exc:
        if page.timeline is None:
            raise
        raise bad("timeline", exc.message) from None


async def points(request: web.Request) -> web.Response:
    """A page of the domain's points (``rocva.points``; at most ``limit`` marks per
    timeline): computed at most 2 at once, shared and kept while the catalog's newest
    generation is unchanged (``cdp.msa.points_cache``)."""
    from rocva.points import points_at

    cfg = request.app[MSA].cfg
    domain = domain_of(request)
    page = points_page(request)
    seen = await asyncio.to_thread(operations.seen_by_drva, cfg, domain)

    async def compute(store: ObjectStore, head: CatalogState, generation: int) -> str:
        doc = await points_at(store, head, generation, page.timeline, seen, limit=page.limit,
                              before_seq=page.before_seq)
        return _dumps(operations.jsonable(doc))

    work = request.app[POINTS].domain_points(cfg.store_url_for(domain), cfg.domain(domain).id, page, seen, compute)
    return _points_answer(await _paged(page, work))


async def history(request: web.Request) -> web.Response:
    """The domain's status samples (``cdp.msa.history``) after ``since_ns``, as columns."""
    from cdp.msa.daemon import ALARM_INTERVAL_S

    daemon = request.app[MSA]
    domain = domain_of(request)
    text = request.query.get("since_ns", "0")
    if not SINCE_NS.fullmatch(text):
        raise bad("since_ns", f"expected a time in ns since the epoch (0..19 digits), got {shown(text)}")
    policy = daemon.protection.get(domain)
    return _json({"domain": domain, "protected": policy is not None, "interval_s": ALARM_INTERVAL_S,
                  "samples_max": daemon.history.samples_max, "time_ns": time.time_ns(),
                  "rpo_target_s": policy.rpo_target_s if policy is not None else None,
                  "samples": daemon.history.columns(domain, int(text))})


async def failover_points(request: web.Request) -> web.Response:
    """Points of a domain named as the store knows it: the recovery site picks a failover's
    point before its inventory has the domain."""
    cfg = request.app[MSA].cfg
    name = store_domain_of(request)
    page = points_page(request)

    async def compute() -> str:
        doc = await console.store_points(cfg, name, timeline=page.timeline, limit=page.limit,
                                         before_seq=page.before_seq)
        return _dumps(doc)

    work = request.app[POINTS].gated(("failover", cfg.store_url_for(name), name, page), compute)
    return _points_answer(await _paged(page, work))


async def mark(request: web.Request) -> web.Response:
    daemon = request.app[MSA]
    domain = domain_of(request)
    wait = wants_wait(request)
    doc = await read_body(request, {"name"}, {"name"})
    name = mark_name(doc, "name")
    if domain not in daemon.protection:
        raise ApiError(409, "not_protected", f"domain {domain} is not protected: a mark needs its stream", "name")
    try:
        from cdp.msa import marks
    except ImportError:
        raise ApiError(501, "not_implemented", "marks are not available in this build (cdp.msa.marks)") from None
    daemon.runner.refuse_if_moving(domain, "placing a mark")
    record = await daemon.start_job("mark", {"domain": domain, "name": name},
                                    lambda job: marks.request_mark(daemon.cfg, domain, name))
    return await _job_answer(request, record, wait)


async def recover(request: web.Request) -> web.Response:
    daemon = request.app[MSA]
    domain = domain_of(request)
    wait = wants_wait(request)
    doc = await read_body(request, {"target", "to", "timeline", "concurrency", "checksum"}, {"target", "to"})
    options = recover_options_from(doc)
    to = options.out_dir
    # Under the site's recovery_roots, not in the store or the state directory, and a
    # directory: checked in that order, so that what lies outside the roots is never
    # looked at (a "not a directory" for /etc/passwd/x told a client that file exists).
    try:
        await asyncio.to_thread(operations.check_recovery_destination, daemon.cfg, str(to))
    except CdpError as exc:
        raise bad("to", exc.message) from None
    params = {"domain": domain, "target": doc["target"], "to": str(to), "timeline": options.timeline,
              "concurrency": options.concurrency, "checksum": options.checksum}
    record = await daemon.start_job("recover", params, lambda job: operations.recover(daemon.cfg, domain, options, job))
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


async def power(request: web.Request) -> web.Response:
    daemon = request.app[MSA]
    domain = domain_of(request)
    doc = await read_body(request, {"on"}, {"on"})
    if not isinstance(doc["on"], bool):
        raise bad("on", f"expected true (power the domain's VMs on) or false, got {shown(doc['on'])}")
    return _json(await daemon.power(domain, doc["on"]))


async def quiesce(request: web.Request) -> web.Response:
    daemon = request.app[MSA]
    domain = domain_of(request)
    wait = wants_wait(request)
    doc = await read_body(request, {"mark"}, {"mark"})
    name = mark_name(doc, "mark")
    record = await daemon.start_job("quiesce", {"domain": domain, "mark": name},
                                    lambda job: daemon.quiesce(domain, name, job), claim=quiesce_claim(domain))
    return await _job_answer(request, record, wait)


async def failover(request: web.Request) -> web.Response:
    """The domain is named as the store knows it: this site's inventory does not have it
    until the failover registers it."""
    from cdp.msa.failover import run_failover, run_test_failover

    daemon = request.app[MSA]
    name = store_domain_of(request)
    wait = wants_wait(request)
    doc = await read_body(request, {"target", "mode"})
    mode = doc.get("mode", "unplanned")
    if mode not in ("unplanned", "planned", "test"):
        raise bad("mode", f'expected "unplanned", "planned" or "test", got {shown(mode)}')
    if mode == "planned" and doc.get("target", "latest") != "latest":
        raise bad("target", "a planned failover is at the final mark the protected site places: give no target")
    if "target" not in doc and mode != "planned":
        raise bad("target", 'expected "latest", {"seq": N}, {"mark": NAME} or {"at": TIME}')
    target = target_from(doc.get("target", "latest")).text()
    async def work(job: Any) -> Any:
        if mode == "test":
            return await run_test_failover(daemon, name, target, job)
        return await run_failover(daemon, name, target, job, planned=mode == "planned")

    record = await daemon.start_job("failover", {"domain": name, "target": doc.get("target"), "mode": mode}, work,
                                    claim=site_move(name))
    return await _job_answer(request, record, wait)


async def failover_cleanup(request: web.Request) -> web.Response:
    from cdp.msa.failover import cleanup_test_failover

    daemon = request.app[MSA]
    name = store_domain_of(request)
    await read_body(request, set())
    with daemon.runner.claim(site_move(name), "a test failover's clean-up"):
        return _json(await cleanup_test_failover(daemon, name))


async def failback(request: web.Request) -> web.Response:
    """A domain of this site's inventory that runs at another site after a failover."""
    from cdp.msa.failback import run_failback

    daemon = request.app[MSA]
    name = store_domain_of(request)
    wait = wants_wait(request)
    await read_body(request, set())
    record = await daemon.start_job("failback", {"domain": name}, lambda job: run_failback(daemon, name, job),
                                    claim=site_move(name))
    return await _job_answer(request, record, wait)


async def failover_release(request: web.Request) -> web.Response:
    """The site a domain came back to (``cdp failback``) asks this one to let it go."""
    from cdp.msa.failback import release_failed_over

    daemon = request.app[MSA]
    name = store_domain_of(request)
    await read_body(request, set())
    with daemon.runner.claim(site_move(name), "a release for a failback"):
        return _json(await release_failed_over(daemon, name))


async def failback_extents(request: web.Request) -> web.StreamResponse:
    """The site failing a domain back reads this site's quiesced disks (FORMAT.md §16)."""
    from cdp.msa.extents import BadExtentRequest, check_inside, read_request, send_extents, stream_slot
    from cdp.msa.failback import extent_files

    daemon = request.app[MSA]
    name = store_domain_of(request)
    codes = {400: "bad_request", 408: "timeout", 409: "failover_refused", 413: "too_large",
             415: "unsupported_media_type"}
    with stream_slot(name, f"domain {name}"):
        try:
            req = await read_request(request, request.app[BODY_TIMEOUT_S])
            files = await extent_files(daemon, name, req)
            check_inside(req, files, f"domain {name}")
        except BadExtentRequest as exc:
            field = "Content-Type" if exc.status == 415 else "request body"
            raise ApiError(exc.status, codes.get(exc.status, "bad_request"), exc.message, field) from None
        return await send_extents(request, req, files, f"domain {name}")


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
    ("GET", "/", console.serve), ("GET", "/console/{file}", console.serve),
    ("GET", "/v1/status", status), ("GET", "/v1/alarms", alarms),
    ("POST", "/v1/domains/{name}/protect", protect), ("POST", "/v1/domains/{name}/unprotect", unprotect),
    ("GET", "/v1/domains/{name}/points", points), ("POST", "/v1/domains/{name}/marks", mark),
    ("GET", "/v1/domains/{name}/history", history), ("GET", "/v1/failover/{name}/points", failover_points),
    ("POST", "/v1/domains/{name}/recover", recover), ("POST", "/v1/domains/{name}/verify", verify),
    ("POST", "/v1/domains/{name}/consolidate", consolidate), ("POST", "/v1/preflight/{kind}", preflight),
    ("POST", "/v1/domains/{name}/power", power), ("POST", "/v1/domains/{name}/quiesce", quiesce),
    ("POST", "/v1/failover/{name}", failover), ("POST", "/v1/failover/{name}/cleanup", failover_cleanup),
    ("POST", "/v1/failover/{name}/release", failover_release), ("POST", "/v1/failback/{name}", failback),
    ("POST", "/v1/failback/{name}/extents", failback_extents),
    ("GET", "/v1/jobs", jobs_list), ("GET", "/v1/jobs/{id}", job_get),
)


def make_app(daemon: MsaDaemon) -> web.Application:
    app = web.Application(middlewares=[_errors, _auth], client_max_size=BODY_BYTES_MAX)
    app[MSA] = daemon
    app[REDACTIONS] = redactions(daemon)
    app[REFUSALS] = RefusalLog()
    app[POINTS] = PointsCache()
    app[BODY_TIMEOUT_S] = daemon.api_limits.body_timeout_s
    for method, path, handler in ROUTES:
        if method == "GET":
            app.router.add_get(path, handler)  # and HEAD: a HEAD /healthz is a health check too
        else:
            app.router.add_route(method, path, handler)
    console.install(app)
    return app


async def start_api(daemon: MsaDaemon) -> web.AppRunner:
    """Serve the API on the site's ``[api] listen`` within ``daemon.api_limits``
    (``cdp.msa.http_limits``); the caller cleans the runner up."""
    limits = daemon.api_limits
    quiet_parser_errors()
    runner = web.AppRunner(make_app(daemon), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                           **limits.runner_options())
    await runner.setup()
    listen = daemon.cfg.api_listen
    try:
        tls = _tls_context(daemon.cfg)
        await LimitedSite(runner, listen.host, listen.port, limits.connections_max, ssl_context=tls,
                          **limits.site_options()).start()
    except ConfigError:
        await runner.cleanup()
        raise
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"{daemon.cfg.path}: api.listen {listen}: cannot listen ({exc.strerror})") from exc
    log.info("api_listening", listen=str(listen), tls=tls is not None)
    return runner


def _tls_context(cfg: Any) -> Any:
    """The API's server context when the site serves TLS (``[tls] mode = "on"``)."""
    if cfg.tls is None:
        return None
    from cdp.tls import server_context

    try:
        return server_context(cfg.tls.api_cert, cfg.tls.api_key)
    except ConfigError as exc:
        raise ConfigError(f"{cfg.path}: tls.mode is on, but {exc.message} (cdp install makes the site's "
                          f"certificates)") from None
