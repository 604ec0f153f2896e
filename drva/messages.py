"""The control messages a filter sends a DRVA, checked at the edge (FORMAT.md §9).

Every body from a socket is hostile until ``parse`` has checked it: strict UTF-8 JSON
(``wire.Message.json``), one object with exactly the keys of its type (those in
``OPTIONAL`` may be absent: a filter older than them does not send them), each value of
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
from typing import Any

from cdp import wire
from cdp.layout import U32_MAX, U64_MAX
from cdp.tomlread import NAME
from cdp.wire_checks import (
    DISK, DOMAIN, ERROR_FIELDS, HEX_MAC, HEX_NONCE, U64, Check, check_body, match, refuse, shown, uint,
)

# A site name (<= 64 characters) plus a suffix: the simulator names its filter
# "<site>-filter".
FILTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
DOMAINS_PER_HELLO_MAX = 1024
SEED_CHUNK_SIZE_MIN = 64 << 10
SEED_CHUNK_SIZE_MAX = wire.SEED_CHUNK_MAX
FILTER_MODES = ("normal", "bitmap", "resync")


def _one_of(choices: tuple[str, ...]) -> Check:
    def check(value: Any, field: str) -> str:
        if not isinstance(value, str) or value not in choices:
            raise refuse(field, "one of " + ", ".join(repr(c) for c in choices), value)
        return value
    return check


def _exactly(wanted: int) -> Check:
    def check(value: Any, field: str) -> int:
        if isinstance(value, bool) or value != wanted or not isinstance(value, int):
            raise refuse(field, repr(wanted), value)
        return value
    return check


def _power_of_two(low: int, high: int) -> Check:
    def check(value: Any, field: str) -> int:
        if (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high
                or value & (value - 1)):
            raise refuse(field, f"a power of two in {low}..{high}", value)
        return value
    return check


def _domain_list(value: Any, field: str) -> list[int]:
    expected = f"a list of 1..{DOMAINS_PER_HELLO_MAX} distinct domain ids (1..{U32_MAX})"
    if not isinstance(value, list) or not 1 <= len(value) <= DOMAINS_PER_HELLO_MAX:
        raise refuse(field, expected, value)
    for i, item in enumerate(value):
        DOMAIN(item, f"{field}[{i}]")
    if len(set(value)) != len(value):
        raise refuse(field, expected, value)
    return value


SCHEMAS: dict[int, dict[str, Check]] = {
    wire.HELLO: {
        "version": _exactly(wire.WIRE_VERSION),
        "filter": match(FILTER_NAME, "a filter name of 1..128 characters [A-Za-z0-9._-]"),
        "site": match(NAME, "a site name of 1..64 characters [A-Za-z0-9._-]"),
        "domains": _domain_list,
        "nonce": match(HEX_NONCE, f"{wire.NONCE_BYTES} bytes in lower-case hex"),
    },
    wire.AUTH: {"mac": match(HEX_MAC, "64 lower-case hex digits", secret=True)},
    wire.FILTER_STATE: {
        "domain": DOMAIN, "mode": _one_of(FILTER_MODES), "captured_seq": U64,
        "captured_ts": uint(0, U64_MAX, " (ns)"), "buffered_bytes": U64, "dirty_bytes": U64,
        # A floor of the RPO lag (DomainState.rpo_lag_s): bounded, so that one filter's
        # figure stays a number every reader of the status can take.
        "oldest_unacked_age_ms": uint(0, U32_MAX, " (ms)"),
        # The filter's wall clock when it sent this: the DRVA takes its offset from its own
        # (DomainState.note_filter_clock). Any u64 is a time; how far off it is, is judged there.
        "now_ns": uint(0, U64_MAX, " (ns)"),
    },
    wire.SEED_BEGIN: {
        "domain": DOMAIN, "disk": DISK, "disk_size": uint(1, U64_MAX),
        "chunk_size": _power_of_two(SEED_CHUNK_SIZE_MIN, SEED_CHUNK_SIZE_MAX), "start_seq": U64,
    },
    wire.SEED_END: {"domain": DOMAIN, "disk": DISK, "end_seq": U64},
    wire.PING: {},
    wire.PONG: {},
    wire.ERROR: ERROR_FIELDS,
}
# Keys a message may leave out: added after the type was, so older filters do not send them.
OPTIONAL: dict[int, frozenset[str]] = {wire.FILTER_STATE: frozenset({"oldest_unacked_age_ms", "now_ns"})}


def parse(msg: wire.Message, where: str) -> dict[str, Any]:
    """The checked body of a control message from a filter (module docstring)."""
    if msg.type == wire.HELLO:
        version = msg.json(where).get("version")
        # Another version is not malformed: it gets its own code, whatever else it holds.
        if isinstance(version, int) and not isinstance(version, bool) and version != wire.WIRE_VERSION:
            raise wire.ProtocolError("unsupported_version", f"{where}: protocol version {shown(version)}, "
                                                            f"this DRVA speaks {wire.WIRE_VERSION}")
    return check_body(msg, where, SCHEMAS[msg.type], OPTIONAL.get(msg.type, ()))
