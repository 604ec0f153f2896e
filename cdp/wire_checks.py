"""Checks of a control message's JSON body, for both ends of the wire (FORMAT.md §9).

A body from a socket is hostile until checked: one object with exactly the keys of its
type (optional ones may be absent), each value of its JSON type and in range. A failure
is a ``wire.ProtocolError`` ``bad_message`` naming the message, the field and what was
expected. The DRVA checks what filters send (``drva.messages``), the filter what DRVAs
send (``iofilter_sim.client``); each keeps its own table of schemas, built from these.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

from cdp import wire
from cdp.layout import U32_MAX, U64_MAX

Check = Callable[[Any, str], Any]

SHOWN_CHARS_MAX = 40  # of a refused value, in the ERROR and the log
ERROR_CODE = re.compile(r"[a-z_]{1,64}")
ERROR_TEXT_CHARS_MAX = 2000  # what wire.error_message sends at most
HEX_MAC = re.compile(r"[0-9a-f]{64}")  # HMAC-SHA256 as hexdigest() prints it
HEX_NONCE = re.compile(r"[0-9a-f]{%d}" % (2 * wire.NONCE_BYTES))


class _Missing:
    def __repr__(self) -> str:
        return "nothing (the field is missing)"


MISSING = _Missing()


def shown(value: Any) -> str:
    """``value`` for a message: its repr (ASCII-safe: a lone surrogate shows escaped), cut short."""
    got = repr(value)
    return got if len(got) <= SHOWN_CHARS_MAX else got[:SHOWN_CHARS_MAX] + "..."


def refuse(field: str, expected: str, value: Any, *, secret: bool = False) -> wire.ProtocolError:
    if secret and value is not MISSING:  # never echo what could be (close to) a credential
        got = f"a {type(value).__name__}" + (f" of {len(value)} characters" if isinstance(value, str) else "")
    else:
        got = shown(value)
    return wire.ProtocolError("bad_message", f"{field}: expected {expected}, got {got}")


def uint(low: int, high: int, unit: str = "") -> Check:
    expected = f"an integer in {low}..{high}{unit}"

    def check(value: Any, field: str) -> int:
        # bool is an int in Python, not in JSON.
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise refuse(field, expected, value)
        return value
    return check


def match(pattern: re.Pattern, expected: str, *, secret: bool = False) -> Check:
    def check(value: Any, field: str) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise refuse(field, expected, value, secret=secret)
        return value
    return check


def text(chars_max: int) -> Check:
    def check(value: Any, field: str) -> str:
        if not isinstance(value, str) or len(value) > chars_max:
            raise refuse(field, f"a string of at most {chars_max} characters", value)
        return value
    return check


def boolean(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise refuse(field, "true or false", value)
    return value


DOMAIN = uint(1, U32_MAX)
DISK = uint(0, U32_MAX)
U64 = uint(0, U64_MAX)
ERROR_FIELDS: dict[str, Check] = {"code": match(ERROR_CODE, "an error code [a-z_]{1,64}"),
                                  "message": text(ERROR_TEXT_CHARS_MAX), "fatal": boolean}


def check_body(msg: wire.Message, where: str, schema: Mapping[str, Check],
               optional: Collection[str] = ()) -> dict[str, Any]:
    """``msg``'s body, every key of ``schema`` checked (those in ``optional`` may be
    absent), no other key allowed: the values as the checks return them."""
    doc = msg.json(where)
    unknown = sorted(set(doc) - set(schema))
    if unknown:
        raise wire.ProtocolError("bad_message", f"{where}: {msg.name}: unknown field {unknown[0][:SHOWN_CHARS_MAX]!r} "
                                                f"(expected {', '.join(schema) or 'no field'})")
    out = {}
    for key, check in schema.items():
        if key in optional and key not in doc:
            continue
        try:
            out[key] = check(doc.get(key, MISSING), f"{msg.name}.{key}")  # a missing key fails every check
        except wire.ProtocolError as exc:
            raise wire.ProtocolError(exc.code, f"{where}: {exc.message}") from None
    return out
