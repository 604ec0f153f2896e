"""Sizes written by people: one parser for every configuration file and command line."""

from __future__ import annotations

import math
import re
from typing import Any

from cdp.errors import ConfigError

SECTOR = 512  # bytes: every disk size and write is a multiple (cdp.records uses this one)

_SIZE = re.compile(r"(\d+)\s*(|b|k|kib|m|mib|g|gib|t|tib)", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: Any, where: str) -> int:
    """Bytes from a non-negative int or a string such as '4096', '64KiB', '64MiB', '1GiB'.

    Units are binary (K = KiB = 1024). Decimal fractions and SI 'MB' are refused rather
    than guessed: a log partition off by 5 % is a surprise nobody wants.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
        return int(m.group(1)) * _UNITS[m.group(2).lower()[:1]]
    raise ConfigError(f"{where}: expected a size (an integer or e.g. '64KiB', '64MiB'), got {value!r}")


#: Characters of a refused value shown in its error (a value may be megabytes long).
SHOWN_CHARS_MAX = 60


def shown_value(value: Any) -> str:
    """``value`` as an error may show it: its repr, cut to ``SHOWN_CHARS_MAX`` characters."""
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than Python converts to text
        return f"an integer of about {int(value).bit_length() * 3 // 10} digits"
    return text if len(text) <= SHOWN_CHARS_MAX else text[: SHOWN_CHARS_MAX - 3] + "..."


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?", re.IGNORECASE)
_SECONDS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: Any, where: str) -> float:
    """Seconds from a non-negative number or a string such as '90', '15m', '72h', '7d'.
    Always finite: a number too large for a float ('1' and 400 zeros reads as infinity)
    is refused, as are NaN and the infinities, which no caller can turn into an instant."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond a float
            seconds = math.inf
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value.strip())):
        unit = m.group(2).lower() if m.group(2) else None
        seconds = float(m.group(1)) * _SECONDS[unit]
    if seconds is not None and math.isfinite(seconds):
        return seconds
    if seconds is not None:
        raise ConfigError(f"{where}: a duration must be a finite number of seconds, got {shown_value(value)}")
    raise ConfigError(f"{where}: expected a duration (seconds, or e.g. '15m', '72h', '7d'), got {shown_value(value)}")
