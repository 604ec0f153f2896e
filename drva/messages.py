"""The control messages a filter sends a DRVA, checked at the edge (FORMAT.md §9).

Every body from a socket is hostile until ``parse`` has checked it: strict UTF-8 JSON
(``wire.Message.json``), one object with exactly the keys of its type, each value of
the right JSON type and in range. A failure is a ``wire.ProtocolError`` ``bad_message``
naming the message, the field and what was expected; the session that sent it is
closed, nothing else. Invariant: what ``parse`` returns has been checked whole, so code
past the edge (the status, the RPO figures, the seeder) never meets a wrong type — one
``"captured_ts": "x"`` once ended a DRVA for all its domains (issue 10).

Binary bodies are checked by their own decoders: ``FRAME`` by ``cdp.frame.decode_frame``,
the ``SEED_CHUNK`` prefix by ``wire.parse_seed_chunk`` and the seeder.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from cdp import wire
from cdp.layout import U32_MAX, U64_MAX
from cdp.tomlread import NAME

# A site name (<= 64 characters) plus a suffix: the simulator names its filter
# "<site>-filter".
FILTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
DOMAINS_PER_HELLO_MAX = 1024
ERROR_CODE = re.compile(r"[a-z_]{1,64}")
ERROR_TEXT_CHARS_MAX = 2000  # what wire.error_message sends at most
SEED_CHUNK_SIZE_MIN = 64 << 10
SEED_CHUNK_SIZE_MAX = wire.SEED_CHUNK_MAX
FILTER_MODES = ("normal", "bitmap", "resync")
_HEX_MAC = re.compile(r"[0-9a-f]{64}")  # HMAC-SHA256 as hexdigest() prints it
_HEX_NONCE = re.compile(r"[0-9a-f]{%d}" % (2 * wire.NONCE_BYTES))
_SHOWN_CHARS_MAX = 40  # of a refused value, in the ERROR and the log

Check = Callable[[Any, str], Any]


class _Missing:
    def __repr__(self) -> str:
        return "nothing (the field is missing)"


_MISSING = _Missing()


def _shown(value: Any) -> str:
    got = repr(value)
    return got if len(got) <= _SHOWN_CHARS_MAX else got[:_SHOWN_CHARS_MAX] + "..."


def _refuse(field: str, expected: str, value: Any, *, secret: bool = False) -> wire.ProtocolError:
    if secret and value is not _MISSING:  # never echo what could be (close to) a credential
        got = f"a {type(value).__name__}" + (f" of {len(value)} characters" if isinstance(value, str) else "")
    else:
        got = _shown(value)
    return wire.ProtocolError("bad_message", f"{field}: expected {expected}, got {got}")


def _uint(low: int, high: int, unit: str = "") -> Check:
    expected = f"an integer in {low}..{high}{unit}"

    def check(value: Any, field: str) -> int:
        # bool is an int in Python, not in JSON.
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _refuse(field, expected, value)
        return value
    return check


def _match(pattern: re.Pattern, expected: str, *, secret: bool = False) -> Check:
    def check(value: Any, field: str) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise _refuse(field, expected, value, secret=secret)
        return value
    return check


def _one_of(choices: tuple[str, ...]) -> Check:
    def check(value: Any, field: str) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _refuse(field, "one of " + ", ".join(repr(c) for c in choices), value)
        return value
    return check


def _exactly(wanted: int) -> Check:
    def check(value: Any, field: str) -> int:
        if isinstance(value, bool) or value != wanted or not isinstance(value, int):
            raise _refuse(field, repr(wanted), value)
        return value
    return check


def _power_of_two(low: int, high: int) -> Check:
    def check(value: Any, field: str) -> int:
        if (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high
                or value & (value - 1)):
            raise _refuse(field, f"a power of two in {low}..{high}", value)
        return value
    return check


def _domain_list(value: Any, field: str) -> list[int]:
    expected = f"a list of 1..{DOMAINS_PER_HELLO_MAX} distinct domain ids (1..{U32_MAX})"
    if not isinstance(value, list) or not 1 <= len(value) <= DOMAINS_PER_HELLO_MAX:
        raise _refuse(field, expected, value)
    for i, item in enumerate(value):
        DOMAIN(item, f"{field}[{i}]")
    if len(set(value)) != len(value):
        raise _refuse(field, expected, value)
    return value


def _text(chars_max: int) -> Check:
    def check(value: Any, field: str) -> str:
        if not isinstance(value, str) or len(value) > chars_max:
            raise _refuse(field, f"a string of at most {chars_max} characters", value)
        return value
    return check


def _boolean(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise _refuse(field, "true or false", value)
    return value


DOMAIN = _uint(1, U32_MAX)
DISK = _uint(0, U32_MAX)
U64 = _uint(0, U64_MAX)

SCHEMAS: dict[int, dict[str, Check]] = {
    wire.HELLO: {
        "version": _exactly(wire.WIRE_VERSION),
        "filter": _match(FILTER_NAME, "a filter name of 1..128 characters [A-Za-z0-9._-]"),
        "site": _match(NAME, "a site name of 1..64 characters [A-Za-z0-9._-]"),
        "domains": _domain_list,
        "nonce": _match(_HEX_NONCE, f"{wire.NONCE_BYTES} bytes in lower-case hex"),
    },
    wire.AUTH: {"mac": _match(_HEX_MAC, "64 lower-case hex digits", secret=True)},
    wire.FILTER_STATE: {
        "domain": DOMAIN, "mode": _one_of(FILTER_MODES), "captured_seq": U64,
        "captured_ts": _uint(0, U64_MAX, " (ns)"), "buffered_bytes": U64, "dirty_bytes": U64,
    },
    wire.SEED_BEGIN: {
        "domain": DOMAIN, "disk": DISK, "disk_size": _uint(1, U64_MAX),
        "chunk_size": _power_of_two(SEED_CHUNK_SIZE_MIN, SEED_CHUNK_SIZE_MAX), "start_seq": U64,
    },
    wire.SEED_END: {"domain": DOMAIN, "disk": DISK, "end_seq": U64},
    wire.PING: {},
    wire.PONG: {},
    wire.ERROR: {"code": _match(ERROR_CODE, "an error code [a-z_]{1,64}"),
                 "message": _text(ERROR_TEXT_CHARS_MAX), "fatal": _boolean},
}


def parse(msg: wire.Message, where: str) -> dict[str, Any]:
    """The checked body of a control message from a filter (module docstring)."""
    schema = SCHEMAS[msg.type]
    doc = msg.json(where)
    name = msg.name
    if msg.type == wire.HELLO:
        version = doc.get("version")
        # Another version is not malformed: it gets its own code, whatever else it holds.
        if isinstance(version, int) and not isinstance(version, bool) and version != wire.WIRE_VERSION:
            raise wire.ProtocolError("unsupported_version", f"{where}: protocol version {_shown(version)}, "
                                                            f"this DRVA speaks {wire.WIRE_VERSION}")
    unknown = sorted(set(doc) - set(schema))
    if unknown:
        raise wire.ProtocolError("bad_message", f"{where}: {name}: unknown field {unknown[0][:_SHOWN_CHARS_MAX]!r} "
                                                f"(expected {', '.join(schema) or 'no field'})")
    for key, check in schema.items():
        try:
            check(doc.get(key, _MISSING), f"{name}.{key}")  # a missing key fails every check
        except wire.ProtocolError as exc:
            raise wire.ProtocolError(exc.code, f"{where}: {exc.message}") from None
    return doc
