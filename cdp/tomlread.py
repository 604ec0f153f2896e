"""Reading checked TOML: typed access where every refusal names the file and the key path.

One reader for the configuration files people write (the simulated cluster, the site):
``TomlReader.table`` refuses unknown keys (they are typos) and missing ones, and the
value checks say what was expected, e.g. ``site.toml: drvas[1].listen: expected 'host:port'
with a port in 1..65535 (e.g. '127.0.0.1:32873'), got 'localhost'``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any, NamedTuple, NoReturn

from cdp.errors import ConfigError
from cdp.units import SECTOR
from cdp.units import parse_duration, parse_size

#: A name that is also a path component (a DRVA's state directory, a site's prefix in
#: the store): never "." or "..", which would name the directory above.
NAME = re.compile(r"(?!\.\.?\Z)[A-Za-z0-9._-]{1,64}")
NAME_EXPECTED = "a name of 1..64 characters [A-Za-z0-9._-], not '.' or '..'"
_ENDPOINT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")
U32_MAX = 2**32 - 1
SIZE_MAX = 1 << 50  # 1 PiB: larger is a typo, and more than a file system will preallocate
_MISSING = object()
PATH_BYTES_MAX = 4095  # Linux's PATH_MAX, less its NUL
NAME_BYTES_MAX = 255  # one path component (NAME_MAX)
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
SHOWN_CHARS_MAX = 80  # of a value quoted in an error: a 100 KB name made a 100 KB message


def shown(value: Any) -> str:
    """``repr(value)`` cut to SHOWN_CHARS_MAX characters for a message."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS_MAX else f"{text[:SHOWN_CHARS_MAX]}... ({len(text)} characters)"


#: C0 controls, DEL and C1 controls: a terminal acts on them (ESC starts a sequence that
#: can retitle the window, clear the screen or forge a line; in UTF-8, U+009B is an 8-bit
#: CSI to some terminals). Written as JSON writes them, ``\u001b``.
_CONTROLS = {c: f"\\u{c:04x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}


def printable(text: str) -> str:
    """``text`` from elsewhere (a peer's or a daemon's message, a record read back) with
    its control characters escaped (``_CONTROLS``), for a terminal or a log line; the rest
    is kept as written, and applying it twice changes nothing more."""
    return text.translate(_CONTROLS)


class Endpoint(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def authority(self) -> str:
        """``host:port`` for a URL: an IPv6 address in brackets (RFC 3986), ``[::1]:8080``."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"



class TomlReader:
    """Typed access to the parsed TOML; every refusal names the file and the key path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, expected: str, value: Any = _MISSING) -> NoReturn:
        got = "nothing" if value is _MISSING else shown(value)
        raise ConfigError(f"{self.source}: {path}: expected {expected}, got {got}")

    def table(self, value: Any, path: str, required: set[str], optional: set[str]) -> Mapping:
        if not isinstance(value, Mapping):
            self.fail(path, "a table", value)
        for key in sorted(set(value) - required - optional):
            keys = ", ".join(sorted(required | optional)) or "none: an empty table"
            key_text = key if _PLAIN_KEY.fullmatch(key) else shown(key)  # a typo as written; anything else quoted
            at = f"{path}.{key_text}" if path else key_text
            close = difflib.get_close_matches(str(key), sorted(required | optional), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{self.source}: {at}: unknown key (expected one of: {keys}{hint})")
        for key in sorted(required - set(value)):
            self.fail(f"{path}.{key}" if path else key, self._expects.get(key, "a value"))
        return value

    _expects = {"name": "a name", "size": "a size", "id": "a u32 domain id",
                "drva": "'host:port'", "host": "a host name", "disks": "a list of disks",
                "vms": "a list of VM names", "site": "a site name", "hosts": "a list of hosts",
                "listen": "'host:port'", "domain": "a domain name", "cluster": "a file path",
                "store": "a store URL or path", "path": "a file path"}

    def file_path(self, value: Any, path: str) -> str:
        """A path as written (relative ones are the caller's to resolve): a non-empty
        string with no NUL (the OS would refuse it later, with a traceback), at most
        PATH_BYTES_MAX bytes and NAME_BYTES_MAX per component."""
        if not isinstance(value, str) or not value or "\0" in value:
            self.fail(path, "a file path (a non-empty string without NUL)", value)
        try:
            encoded = value.encode()
        except UnicodeEncodeError:
            self.fail(path, "a file path in valid Unicode", value)
        if len(encoded) > PATH_BYTES_MAX or any(len(part) > NAME_BYTES_MAX for part in encoded.split(b"/")):
            self.fail(path, f"a file path of at most {PATH_BYTES_MAX} bytes, {NAME_BYTES_MAX} per name", value)
        return value

    def list(self, value: Any, path: str, *, nonempty: bool) -> list:
        if not isinstance(value, list) or (nonempty and not value):
            self.fail(path, "a non-empty list" if nonempty else "a list", value)
        return value

    def name(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not NAME.fullmatch(value):
            self.fail(path, NAME_EXPECTED, value)
        return value

    def size(self, value: Any, path: str, minimum: int = SECTOR, maximum: int = SIZE_MAX) -> int:
        """Bytes, a multiple of 512 in ``minimum..maximum``; each refusal says which rule."""
        try:
            size = parse_size(value, path)
        except ConfigError:
            self.fail(path, "a size: a number of bytes, or a number and a unit B, K/KiB, M/MiB, G/GiB or "
                            "T/TiB (e.g. 67108864, '64MiB')", value)
        if not minimum <= size <= maximum:
            self.fail(path, f"a size of at least {minimum} bytes and at most {maximum} ({maximum >> 40} TiB)",
                      value)
        if size % SECTOR:
            self.fail(path, f"a size that is a multiple of {SECTOR} (e.g. 67108864, '64MiB')", value)
        return size

    def integer(self, value: Any, path: str, lo: int, hi: int) -> int:
        """An integer in ``lo..hi``: ``true`` and ``2.7`` are refused, not read as 1 and 2."""
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.fail(path, f"an integer in {lo}..{hi}", value)
        return value

    def u32(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U32_MAX:
            self.fail(path, f"an integer in 0..{U32_MAX}", value)
        return value

    def endpoint(self, value: Any, path: str) -> Endpoint:
        m = _ENDPOINT.fullmatch(value) if isinstance(value, str) else None
        if m is None or not 1 <= int(m.group(2)) <= 65535:
            self.fail(path, "'host:port' with a port in 1..65535 (e.g. '127.0.0.1:32873')", value)
        return Endpoint(m.group(1).strip("[]"), int(m.group(2)))

    def unique(self, name: str, seen: set[str], path: str, what: str) -> None:
        if name in seen:
            self.fail(path, f"a {what} name not used before", name)
        seen.add(name)

    def duration(self, value: Any, path: str) -> float:
        try:
            return parse_duration(value, path)
        except ConfigError:
            self.fail(path, "a duration (seconds, or e.g. '15m', '72h', '7d')", value)

    def number(self, value: Any, path: str, lo: float, hi: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            self.fail(path, f"a number in {lo:g}..{hi:g}", value)
        return float(value)
