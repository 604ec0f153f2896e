"""The OpenAPI 3.1 document of the MSA's REST API (``GET /openapi.json``), by hand.

Kept beside ``cdp.msa.api.ROUTES``; ``tests/mgmt/test_api.py`` checks that every route
is described here and nothing else is.
"""

from __future__ import annotations

from typing import Any

from cdp.msa.alarms import KINDS as ALARM_KINDS
from cdp.msa.config import SiteConfig

_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": {"$ref": "#/components/responses/BadRequest"},
    "401": {"$ref": "#/components/responses/Unauthorized"},
}
_DOMAIN_ERRORS = {**_ERRORS, "404": {"$ref": "#/components/responses/NotFound"}}
#: What any operation with a body may answer besides (FORMAT.md §13.5).
_BODY_ERRORS = {"408": {"$ref": "#/components/responses/RequestTimeout"},
                "413": {"$ref": "#/components/responses/TooLarge"},
                "415": {"$ref": "#/components/responses/UnsupportedMediaType"},
                # The operations with a body write the MSA's state (FORMAT.md §13.5).
                "507": {"$ref": "#/components/responses/InsufficientStorage"}}
_NAME = {"name": "name", "in": "path", "required": True, "description": "A domain of the cluster file.",
         "schema": {"type": "string", "pattern": "^(?!\\.\\.?$)[A-Za-z0-9._-]{1,64}$"}}
def _points_query() -> list[dict[str, Any]]:
    """The points routes' query (``cdp.msa.api_input.points_page``, FORMAT.md §13.5)."""
    from cdp.msa.api_input import POINTS_LIMIT_DEFAULT, POINTS_LIMIT_MAX, SEQ_MAX
    from rocva.recover_options import TIMELINE_MAX

    return [
        {"name": "limit", "in": "query", "required": False,
         "description": "At most this many marks per timeline: its newest ones (below before_seq), in seq order.",
         "schema": {"type": "integer", "minimum": 0, "maximum": POINTS_LIMIT_MAX, "default": POINTS_LIMIT_DEFAULT}},
        {"name": "before_seq", "in": "query", "required": False,
         "description": "Only marks whose seq is below this one: the next page is asked for with a timeline's "
                        "marks_next_before_seq.",
         "schema": {"type": "integer", "minimum": 1, "maximum": SEQ_MAX}},
        {"name": "timeline", "in": "query", "required": False,
         "description": "Only this timeline (default: every one; the top level describes the current one).",
         "schema": {"type": "integer", "minimum": 1, "maximum": TIMELINE_MAX}}]


_WAIT = {"name": "wait", "in": "query", "required": False,
         "description": "1: wait for the job to end and answer 200 with its final record.",
         "schema": {"type": "string", "enum": ["0", "1", "true", "false", "yes", "no"]}}


def _job_op(summary: str, body: dict[str, Any] | None, *, domain: bool = True,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": ([_NAME] if domain else []) + [_WAIT],
        "responses": {"202": _json(_ref("Job"), "The job started (Location: /v1/jobs/{id})."),
                      "200": _json(_ref("Job"), "With ?wait=1: the job's final record."),
                      **(_DOMAIN_ERRORS if domain else _ERRORS), **_BODY_ERRORS,
                      "503": {"$ref": "#/components/responses/TooManyJobs"}, **(extra or {})},
    }
    if body is not None:
        op["requestBody"] = {"required": False, "content": {"application/json": {"schema": body}}}
    return op


def _schemas() -> dict[str, Any]:
    duration = {"oneOf": [{"type": "number", "minimum": 0}, {"type": "string", "examples": ["15m", "72h", "7d"]}],
                "description": "Seconds, or a number with a unit s, m, h, d or w."}
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["status", "code", "message"], "properties": {
                "status": {"type": "integer"}, "code": {"type": "string"}, "message": {"type": "string"},
                "field": {"type": ["string", "null"], "description": "The request field that was wrong."},
                "exit_code": {"type": "integer", "description": "The exit code the cdp command uses."}}}}},
        "Policy": {"type": "object", "properties": {
            "retention_s": {"type": "number"}, "rpo_target_s": {"type": "number"},
            "consolidate_after_s": {"type": "number"}, "consolidate_every_s": {"type": "number"}}},
        "PolicyOverrides": {"type": "object", "additionalProperties": False, "properties": {
            "retention": duration, "rpo_target_s": {"type": "number", "exclusiveMinimum": 0},
            "consolidate_after": duration, "consolidate_every": duration}},
        "Job": {"type": "object", "description": "A job record (FORMAT.md §13.2).", "properties": {
            "version": {"type": "integer"}, "id": {"type": "string"}, "name": {"type": "string"},
            "args": {"type": "object"},
            "state": {"type": "string", "enum": ["running", "succeeded", "failed", "timed_out", "cancelled",
                                                 "abandoned"]},
            "timeout_s": {"type": "number"}, "created_ns": {"type": "integer"},
            "ended_ns": {"type": ["integer", "null"]}, "pid": {"type": "integer"},
            "progress": {"type": "object"}, "events": {"type": "array"}, "output": {},
            "error": {"type": ["string", "null"]}, "exit_code": {"type": "integer"}}},
        "Alarm": {"type": "object", "properties": {
            "id": {"type": "string"}, "kind": {"type": "string", "enum": list(ALARM_KINDS)},
            "severity": {"type": "string", "enum": ["critical", "major", "warning"]},
            "subject": {"type": "string"}, "subject_kind": {"type": "string", "enum": ["domain", "drva", "site"]},
            "message": {"type": "string"}, "raised_ns": {"type": "integer"},
            "cleared_ns": {"type": ["integer", "null"]}}},
        "Target": {"oneOf": [
            {"const": "latest"},
            {"type": "object", "required": ["seq"], "additionalProperties": False,
             "properties": {"seq": {"type": "integer", "minimum": 0}}},
            {"type": "object", "required": ["mark"], "additionalProperties": False,
             "properties": {"mark": {"type": "string"}}},
            {"type": "object", "required": ["at"], "additionalProperties": False,
             "properties": {"at": {"type": "string", "description": "ISO 8601 with a zone, or relative (-15m)."}}}]},
        "History": {"type": "object", "properties": {
            "domain": {"type": "string"}, "protected": {"type": "boolean"},
            "interval_s": {"type": "number"}, "samples_max": {"type": "integer"}, "time_ns": {"type": "integer"},
            "rpo_target_s": {"type": ["number", "null"], "description": "The policy's, while protected."},
            "samples": {"type": "object", "description": "Columns of equal length, oldest sample first.",
                        "properties": {
                            "t_ns": {"type": "array", "items": {"type": "integer"}},
                            **{f: {"type": "array", "items": {"type": ["number", "null"]}}
                               for f in ("rpo_lag_s", "rpo_lag_bytes", "received_bytes_per_s",
                                         "uploaded_bytes_per_s")}}}}},
        "Points": {"type": "object", "description": "A domain's recovery points from the store's catalog, its marks "
                   "paged (FORMAT.md §13.5); the top level describes the asked timeline (default: the current one), "
                   "timelines each one.", "properties": {
            "domain": {"type": "object"}, "generation": {"type": "integer"}, "timeline": {"type": "integer"},
            "current_timeline": {"type": "integer"}, "committed_seq": {"type": "integer"},
            "consistent": {"type": "array", "items": {"type": "object"}},
            "latest": {"type": ["integer", "null"]},
            "marks": {"type": "array", "items": {"type": "object"}, "maxItems": 1000,
                      "description": "The timeline's newest marks below before_seq, at most limit, in seq order."},
            "marks_total": {"type": "integer", "description": "Every mark the timeline holds."},
            "marks_next_before_seq": {"type": ["integer", "null"], "description": (
                "The before_seq that asks for the older marks not given (with timeline=...); null: none left.")},
            "bases": {"type": "array"}, "not_consistent": {"type": "array"}, "disks": {"type": "array"},
            "timelines": {"type": "array", "items": {"type": "object"}}, "problems": {"type": "array"}}},
        "Status": {"type": "object", "properties": {
            "site": {"type": "string"}, "pid": {"type": "integer"}, "api": {"type": "string"},
            "store": {"type": "string", "description": "This site's own store (its domains'), redacted."},
            "peer_store": {"type": "string", "description": "Where the peer's domains live, when not in store "
                           "([peer] store), redacted; absent otherwise."},
            "peer": {"type": ["object", "null"], "description": "The peer site ([peer]): site and api.",
                     "properties": {"site": {"type": "string"}, "api": {"type": "string"}}},
            "drvas": {"type": "array", "items": {"type": "object"}},
            "domains": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "id": {"type": "integer"}, "drva": {"type": "string"},
                "policy": _ref("Policy"),
                "status": {"type": ["object", "null"], "description": "The DRVA's status fields of the domain."},
                "throughput": {"type": "object"}, "alarms": {"type": "array", "items": {"type": "string"}},
                "failed_over": {"type": ["object", "null"],
                                "description": "The site that owns the domain's timeline now, when not this one."}}}},
            "vms": {"type": "array", "items": {"type": "object"},
                    "description": "Powered-on domains, their host and what their VMs report."},
            "powered": {"type": "array", "items": {"type": "string"}},
            "failed_over": {"type": "object", "description": "Domains another site owns now: site, timeline, "
                                                             "parent, fork_seq."},
            "alarms": {"type": "array", "items": _ref("Alarm")}, "jobs_running": {"type": "integer"}}},
    }


def _paths() -> dict[str, Any]:
    from rocva.recover_options import CONCURRENCY_MAX, TIMELINE_MAX  # the ranges the recover job checks

    return {
        "/healthz": {"get": {"summary": "Liveness (no token needed).", "security": [],
                             "responses": {"200": _json({"type": "object"}, "The daemon answers.")}}},
        "/": {"get": {"summary": "The web console's page (no token needed: it holds no data; it signs in with "
                                 "the API token and calls this API).", "security": [],
                      "responses": {"200": {"description": "The console.",
                                            "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        "/console/{file}": {"get": {
            "summary": "A file of the web console (script, style sheet, vendored library); no token needed.",
            "security": [], "parameters": [{"name": "file", "in": "path", "required": True,
                                            "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"}}],
            "responses": {"200": {"description": "The file.", "content": {
                "text/javascript": {"schema": {"type": "string"}}, "text/css": {"schema": {"type": "string"}},
                "text/html": {"schema": {"type": "string"}},
                "text/plain": {"schema": {"type": "string"}}}},
                "404": {"$ref": "#/components/responses/NotFound"}}}},
        "/openapi.json": {"get": {"summary": "This document.",
                                  "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1"), **_ERRORS}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (text exposition format).", "responses": {
            "200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
            **_ERRORS}}},
        "/v1/status": {"get": {"summary": "Site, DRVAs, protected domains with their DRVA status, active alarms.",
                               "responses": {"200": _json(_ref("Status"), "The status."), **_ERRORS}}},
        "/v1/alarms": {"get": {"summary": "Active alarms and recently cleared ones (bounded).", "responses": {
            "200": _json({"type": "object", "properties": {
                "active": {"type": "array", "items": _ref("Alarm")},
                "recent": {"type": "array", "items": _ref("Alarm")}}}, "The alarms."), **_ERRORS}}},
        "/v1/domains/{name}/protect": {"post": _job_op(
            "Protect the domain (or change its policy); the job ends when its DRVA serves it.",
            _ref("PolicyOverrides"), extra={"409": {"$ref": "#/components/responses/Conflict"}})},
        "/v1/domains/{name}/unprotect": {"post": {
            "summary": "Stop protecting the domain (its DRVA restarts without it).", "parameters": [_NAME],
            "responses": {"200": _json({"type": "object"}, "Unprotected."), **_DOMAIN_ERRORS,
                          "409": {"$ref": "#/components/responses/Conflict"}}}},
        "/v1/domains/{name}/points": {"get": {
            "summary": "Recovery points of the domain, from the store's catalog: consistent windows, bases, and "
                       "a page of each timeline's marks (the newest, at most limit). Never older than the newest "
                       "catalog generation in the store when the request arrived.",
            "parameters": [_NAME, *_points_query()],
            "responses": {"200": _json(_ref("Points"), "Consistent windows, marks, bases."),
                          **_DOMAIN_ERRORS}}},
        "/v1/domains/{name}/history": {"get": {
            "summary": "The domain's status over the last hour, as the MSA sampled it every interval_s (in "
                       "memory: a restarted MSA starts again), oldest first: what the web console charts.",
            "parameters": [_NAME, {"name": "since_ns", "in": "query", "required": False,
                                   "description": "Only the samples taken after this time (ns since the epoch).",
                                   "schema": {"type": "string", "pattern": "^[0-9]{1,19}$", "default": "0"}}],
            "responses": {"200": _json(_ref("History"), "The samples, one list per field."), **_DOMAIN_ERRORS}}},
        "/v1/domains/{name}/marks": {"post": _job_op(
            "Insert a named mark in the domain's stream; the job ends when it is in the catalog.",
            {"type": "object", "required": ["name"], "additionalProperties": False,
             "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"}}},
            extra={"409": {"$ref": "#/components/responses/Conflict"},
                   "501": {"$ref": "#/components/responses/NotImplemented"}})},
        "/v1/domains/{name}/recover": {"post": _job_op(
            "Rebuild the domain's disks at a point in time into a directory of the daemon's host.",
            {"type": "object", "required": ["target", "to"], "additionalProperties": False,
             "properties": {
                 "target": _ref("Target"), "to": {"type": "string", "description": "An absolute path."},
                 "timeline": {"type": "integer", "minimum": 1, "maximum": TIMELINE_MAX,
                              "description": "The timeline of the point (default: the current one)."},
                 "concurrency": {"type": "integer", "minimum": 1, "maximum": CONCURRENCY_MAX,
                                 "description": "Store reads (and their decoding) in flight."},
                 "checksum": {"type": "boolean", "description": "Give each image's sha256 in the result."}}})},
        "/v1/domains/{name}/verify": {"post": _job_op(
            "Check the domain's objects in the store.",
            {"type": "object", "additionalProperties": False, "properties": {
                "deep": {"type": "boolean"}, "sample": {"type": "number", "minimum": 0, "maximum": 1}}})},
        "/v1/domains/{name}/consolidate": {"post": _job_op(
            "Roll old segments into a base and apply retention, with the domain's policy.", None,
            extra={"409": {"$ref": "#/components/responses/Conflict"}})},
        "/v1/domains/{name}/power": {"post": {
            "summary": "Power the domain's VMs on or off through the site's hypervisor driver (remembered "
                       "across restarts). Refused (409 failed_over) for a domain that failed over to another site.",
            "parameters": [_NAME],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["on"], "additionalProperties": False,
                "properties": {"on": {"type": "boolean"}}}}}},
            "responses": {"200": _json({"type": "object"}, "Powered on or off."), **_DOMAIN_ERRORS, **_BODY_ERRORS,
                          "409": {"$ref": "#/components/responses/Conflict"}}}},
        "/v1/domains/{name}/quiesce": {"post": _job_op(
            "Hand the domain over for a planned failover: its VMs stop writing, a final mark is committed "
            "after their last write, they are powered off and the domain is no longer shipped from here. The "
            "job's output holds the mark's seq.",
            {"type": "object", "required": ["mark"], "additionalProperties": False,
             "properties": {"mark": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"}}},
            extra={"409": {"$ref": "#/components/responses/Conflict"}})},
        "/v1/failover/{name}": {"post": _job_op(
            "Fail the domain (named as the store knows it) over to this site from the store alone: rehydrate "
            "its disks at the point in a recovery appliance, fork its timeline (the other site is fenced), "
            "register its VMs here, protect them on the new timeline and power them on. Rerun a failed one "
            "to resume it.",
            {"type": "object", "additionalProperties": False, "properties": {
                "target": {**_ref("Target"), "description": "Required for an unplanned failover."},
                "mode": {"type": "string", "enum": ["unplanned", "planned", "test"], "default": "unplanned",
                         "description": "planned: the peer site ([peer] of the site file) quiesces the domain "
                                        "first and the failover is at its final mark (no target); test: the "
                                        "VMs come up isolated from the point, nothing is forked or written to "
                                        "the store, /v1/failover/{name}/cleanup removes them"}}},
            extra={"409": {"$ref": "#/components/responses/Conflict"},
                   "501": {"$ref": "#/components/responses/NotImplemented"}})},
        "/v1/failover/{name}/points": {"get": {
            "summary": "Recovery points of a domain named as the store knows it (as /v1/domains/{name}/points): "
                       "the recovery site's pick of a failover's point, before its inventory has the domain.",
            "parameters": [_NAME, *_points_query()],
            "responses": {"200": _json(_ref("Points"), "Consistent windows, marks, bases, per timeline."),
                          **_DOMAIN_ERRORS}}},
        "/v1/failover/{name}/cleanup": {"post": {
            "summary": "Remove a test failover: power its VMs off, unregister them and their on-demand hosts, "
                       "delete its test area and record (also those of a test failover killed before its VMs "
                       "were registered).", "parameters": [_NAME],
            "responses": {"200": _json({"type": "object"}, "Removed."), **_DOMAIN_ERRORS,
                          "409": {"$ref": "#/components/responses/Conflict"}}}},
        "/v1/failover/{name}/release": {"post": {
            "summary": "At the site a domain had failed over to, once it runs at another site again (a "
                       "failback): power its VMs off, stop protecting it, move its disks aside, remove its "
                       "failover record, then unregister its VMs and the on-demand hosts they took. A rerun "
                       "finishes an interrupted release (already: true when nothing is left). Refused while the "
                       "domain runs here.", "parameters": [_NAME],
            "responses": {"200": _json({"type": "object"}, "Released."), **_DOMAIN_ERRORS,
                          "409": {"$ref": "#/components/responses/Conflict"}}}},
        "/v1/failback/{name}": {"post": _job_op(
            "Bring a domain of this site's inventory back from the site it failed over to ([peer]): the peer "
            "quiesces it at a final mark, a recovery appliance writes only what changed into this site's disks "
            "(both timelines' indexes, this site's DRVA logs and dirty-region maps; a disk that cannot say what "
            "it holds is rewritten whole) and forks a timeline for this site, which protects the domain and "
            "powers its VMs on; the peer releases it. Rerun a failed one to resume it.",
            {"type": "object", "additionalProperties": False, "properties": {}},
            extra={"409": {"$ref": "#/components/responses/Conflict"}})},
        "/v1/failback/{name}/extents": {"post": {
            "summary": "At the site a domain failed over to, once its quiesce handed the domain back: the bytes of "
                       "its disks at the ranges asked for, read from the disks as they are at the final mark. The "
                       "body is an extent request, the answer an extent stream (FORMAT.md §16). Refused (409) "
                       "unless the domain was handed back at the request's seq, its VMs are off and nothing was "
                       "committed after it.", "parameters": [_NAME],
            "requestBody": {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}},
            "responses": {"200": {"description": "An extent stream.", "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}}, **_DOMAIN_ERRORS, **_BODY_ERRORS,
                          "409": {"$ref": "#/components/responses/Conflict"}}}},
        "/v1/preflight/{kind}": {"post": {**_job_op("Run the preflight checks of one kind.", None, domain=False,
                                                    extra={"501": {"$ref": "#/components/responses/NotImplemented"}}),
                                          "parameters": [
            {"name": "kind", "in": "path", "required": True,
             "schema": {"type": "string", "enum": ["system", "install", "uninstall"]}}, _WAIT]}},
        "/v1/jobs": {"get": {"summary": "Job records, newest first.", "parameters": [
            {"name": "name", "in": "query", "required": False, "schema": {"type": "string"}},
            {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}}],
            "responses": {"200": _json({"type": "object", "properties": {
                "jobs": {"type": "array", "items": _ref("Job")}}}, "The jobs."), **_ERRORS}}},
        "/v1/jobs/{id}": {"get": {"summary": "One job record.", "parameters": [
            {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _json(_ref("Job"), "The job."), **_ERRORS,
                          "404": {"$ref": "#/components/responses/NotFound"}}}},
    }


def openapi_document(cfg: SiteConfig) -> dict[str, Any]:
    def error(description: str) -> dict[str, Any]:
        return _json(_ref("Error"), description)

    return {
        "openapi": "3.1.0",
        "info": {"title": "cdp MSA", "version": "1",
                 "description": f"The management API of site {cfg.site}: protection, status, recovery, jobs."},
        "servers": [{"url": cfg.api_url}],
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": f"The token of the environment variable {cfg.token_env}."}},
            "schemas": _schemas(),
            "responses": {
                "BadRequest": error("Bad input: the message names the field and what was expected."),
                "Unauthorized": error("No bearer token, or a wrong one."),
                "NotFound": error("No such domain, job or route."),
                "Conflict": error("Not in a state for this (not protected, or another job holds the domain)."),
                "NotImplemented": error("Not available in this build."),
                "RequestTimeout": error("The body did not arrive in time; the connection is closed."),
                "TooLarge": error("A body over 1 MiB."),
                "UnsupportedMediaType": error("A charset other than UTF-8."),
                "TooManyJobs": error("As many jobs as the daemon runs at once are running (or, as "
                                     "too_many_connections, as many connections are open): try again later; or, "
                                     "as storage_unavailable, the state directory is read-only or failing "
                                     "(EROFS, EIO): the message names the file and the cause."),
                "InsufficientStorage": error("insufficient_storage: the state directory is full or over quota "
                                             "(ENOSPC, EDQUOT): the message names the file, the cause and what "
                                             "to do."),
            },
        },
    }
