"""Reading a request of the MSA's REST API: every byte is hostile until checked here.

The body is UTF-8 JSON (RFC 8259) of bounded size, depth and time to arrive, every string
in it valid Unicode; each field is checked for type and range before anything uses it.
A refusal is an ``ApiError`` (FORMAT.md §13.5) that names the field and quotes at most
``SHOWN_CHARS_MAX`` characters of what was sent.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any, NamedTuple

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from cdp.errors import ConfigError
from cdp.msa.config import POLICY_FIELDS, POLICY_LIMITS, PolicyChange, policy_value

#: The time a body has to arrive (``ApiLimits.body_timeout_s``), set by ``make_app``.
BODY_TIMEOUT_S: web.AppKey[float] = web.AppKey("body_timeout_s")

BODY_BYTES_MAX = 1 << 20  # 413 above
BODY_DEPTH_MAX = 8  # the deepest valid body is 2 ({"target": {"seq": N}})
SHOWN_CHARS_MAX = 80  # of a client's value quoted in an error message
FIELD_CHARS_MAX = 64  # of a body key named as the error's field
PATH_BYTES_MAX = 4096  # PATH_MAX on Linux
PATH_PART_BYTES_MAX = 255  # NAME_MAX


class ApiError(Exception):
    """An answer other than 2xx, with the field of the request that was wrong."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 exit_code: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.exit_code = exit_code if exit_code is not None else (7 if status == 409 else 2 if status < 500 else 1)


def bad(field: str, message: str) -> ApiError:
    return ApiError(400, "bad_request", f"{field}: {message}", field)


def shown(value: Any) -> str:
    """A client's value as JSON in a message, cut short (a field can be a megabyte)."""
    try:
        text = json.dumps(value, ensure_ascii=True, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= SHOWN_CHARS_MAX else text[:SHOWN_CHARS_MAX] + f"... ({len(text)} characters)"


def field_name(key: str) -> str:
    """A body key as the ``field`` of an error: printable ASCII, cut short."""
    # JSON's escapes: non-ASCII, quotes and control characters (an ESC or a newline in a
    # message is a terminal's or a log's injection); DEL is the one JSON leaves alone.
    text = json.dumps(key, ensure_ascii=True)[1:-1].replace("\x7f", "\\u007f")
    return text if len(text) <= FIELD_CHARS_MAX else text[:FIELD_CHARS_MAX] + "..."


class _RepeatedKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _object_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys are each given once: ``json.loads`` keeps the last of a
    repeated key, so ``{"mode": "test", "mode": "unplanned"}`` would read as unplanned
    while a proxy or a log that keeps the first shows a test."""
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)
    return doc


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
        raise bad(field_name(field), f"not valid Unicode: a lone surrogate at character {exc.start}") from None


def content_encoding(request: web.Request) -> str | None:
    """The request's Content-Encoding unless absent or identity. Bodies are small JSON or
    extent lists: a compressed one only costs the server its inflating (and aiohttp's
    error for a broken one is not ours), so none is taken."""
    value = request.headers.get("Content-Encoding", "").strip()
    return None if value.lower() in ("", "identity") else value


async def read_body(request: web.Request, allowed: set[str], required: set[str] = frozenset()) -> dict[str, Any]:
    """The JSON object of the request body ({} when there is none); unknown keys refused."""
    charset = request.charset
    if charset is not None and charset.strip().lower() not in ("utf-8", "utf8"):
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type: charset {shown(charset)}: expected UTF-8 (JSON is UTF-8) or no charset",
                       "Content-Type")
    encoding = content_encoding(request)
    if encoding is not None:
        raise ApiError(415, "unsupported_media_type", f"Content-Encoding {shown(encoding)}: a request body is sent "
                                                      f"as it is (identity)", "Content-Encoding")
    if (request.content_length or 0) > BODY_BYTES_MAX:
        raise ApiError(413, "too_large", f"request body: {request.content_length} bytes, at most {BODY_BYTES_MAX}",
                       "request body")
    timeout_s = request.app[BODY_TIMEOUT_S]
    try:
        async with asyncio.timeout(timeout_s):
            data = await request.read() if request.can_read_body else b""
    except TimeoutError:
        raise ApiError(408, "timeout", f"request body: not received within {timeout_s:g} s",
                       "request body") from None
    except RequestPayloadError as exc:  # a chunked body that breaks its framing
        raise bad("request body", f"could not be read: {shown(str(exc))}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad("request body", f"not UTF-8 (byte {exc.start}): a JSON body is UTF-8") from None
    if not text.strip():
        doc: Any = {}
    else:
        try:
            doc = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_object_once)
        except _RepeatedKey as exc:
            raise bad(field_name(exc.key), "given twice in one object (each key once)") from None
        except RecursionError:
            raise bad("request body", f"nested too deeply (at most {BODY_DEPTH_MAX} levels)") from None
        except ValueError as exc:
            raise bad("request body", f"not valid JSON ({str(exc)[:SHOWN_CHARS_MAX]})") from None
    _check_json(doc)
    if not isinstance(doc, dict):
        raise bad("request body", f"expected a JSON object, got {type(doc).__name__}")
    for key in sorted(set(doc) - allowed):
        raise bad(field_name(key), f"unknown field (expected {', '.join(sorted(allowed)) or 'no body'})")
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


#: ``GET /v1/domains/{name}/points``: marks per timeline in one answer (FORMAT.md §13.5).
POINTS_LIMIT_DEFAULT = 1000
POINTS_LIMIT_MAX = 1000
POINTS_PARAMS = ("limit", "before_seq", "timeline")
SEQ_MAX = (1 << 64) - 1  # §1: a seq is a u64
_QUERY_INT = re.compile(r"[0-9]{1,20}")  # ASCII digits: no sign, space, exponent or other script's digits


class PointsPage(NamedTuple):
    """What a points request asks for: its marks' page, on one timeline or all of them."""

    timeline: int | None = None
    limit: int = POINTS_LIMIT_DEFAULT
    before_seq: int | None = None


def query_int(request: web.Request, name: str, low: int, high: int, default: int | None) -> int | None:
    """Query parameter ``name`` as an integer in ``low..high`` (``default`` when absent);
    400 naming it when it is anything else, or given twice (which one would count?)."""
    values = request.query.getall(name, [])
    if not values:
        return default
    if len(values) > 1:
        raise bad(name, f"given {len(values)} times: give it once")
    text = values[0]
    if not _QUERY_INT.fullmatch(text) or not low <= int(text) <= high:
        raise bad(name, f"expected an integer in {low}..{high}, got {shown(text)}")
    return int(text)


def points_page(request: web.Request) -> PointsPage:
    """The page a points request asks for: ``limit`` marks per timeline (0..1000, default
    1000), the newest ones below ``before_seq``; only ``timeline`` when given."""
    from rocva.recover_options import TIMELINE_MAX

    for key in request.query:
        if key not in POINTS_PARAMS:
            raise bad(field_name(key), f"unknown query parameter (expected {', '.join(POINTS_PARAMS)})")
    return PointsPage(query_int(request, "timeline", 1, TIMELINE_MAX, None),
                      query_int(request, "limit", 0, POINTS_LIMIT_MAX, POINTS_LIMIT_DEFAULT) or 0,
                      query_int(request, "before_seq", 1, SEQ_MAX, None))


def policy_change(doc: dict[str, Any]) -> PolicyChange:
    """The policy fields a protect body sets, each checked against the site file's limits."""
    fields: dict[str, float] = {}
    for key in POLICY_LIMITS:
        if key in doc:
            try:
                fields[POLICY_FIELDS[key]] = policy_value(key, doc[key])
            except ConfigError as exc:
                raise bad(key, exc.message) from None
    return PolicyChange(fields)


TIME_CHARS_MAX = 64  # an ISO 8601 time with its zone is far shorter


def target_from(value: Any) -> Any:
    """The recovery target of a request: "latest", {"seq": N}, {"mark": NAME}, {"at": TIME}
    (the REST forms; ``rocva.Target.parse`` reads them, and checks each value)."""
    from rocva.target import Target, TargetSyntaxError

    if not (value == "latest" or isinstance(value, dict)):
        raise bad("target", f'expected "latest", {{"seq": N}}, {{"mark": NAME}} or {{"at": TIME}}, got {shown(value)}')
    at = value.get("at") if isinstance(value, dict) else None
    if isinstance(at, str) and len(at) > TIME_CHARS_MAX:  # a request's size, before any parsing
        raise bad("target.at", f"expected a time of 1..{TIME_CHARS_MAX} characters (ISO 8601 with a zone, or "
                               f"relative such as -15m), got {shown(at)}")
    try:
        return Target.parse(value)
    except TargetSyntaxError as exc:
        raise bad("target" if exc.part == "target" else f"target.{exc.part}", exc.message) from None


def recover_options_from(doc: dict[str, Any]) -> Any:
    """The ``rocva.RecoverOptions`` of a recover request's body: ``target`` and ``to`` as
    above; ``timeline``, ``concurrency`` and ``checksum`` checked by ``RecoverOptions``
    itself (the ranges ``cdp recover`` has), each error naming its field."""
    from rocva.recover_options import RecoverOptionError, RecoverOptions

    target, to = target_from(doc["target"]), recovery_dir(doc["to"])
    extra = {k: doc[k] for k in ("timeline", "concurrency", "checksum") if k in doc}
    try:
        return RecoverOptions(target, to, **extra)
    except RecoverOptionError as exc:
        raise bad(exc.field, exc.detail) from None


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
    if any(len(part.encode()) > PATH_PART_BYTES_MAX for part in path.parts):
        raise bad("to", f"{expected}: a name in it is longer than {PATH_PART_BYTES_MAX} bytes")
    return path
