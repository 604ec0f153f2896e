"""Sizes written by people: one parser for every configuration file and command line."""

from __future__ import annotations

import re
from typing import Any

from cdp.errors import ConfigError

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
