"""Where an NBD server listens: ``HOST:PORT``, ``[V6]:PORT`` or ``unix:PATH``."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from cdp.errors import ConfigError

_HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.\-]+)):(?P<port>[0-9]{1,5})")
#: Linux's limit on a Unix socket path (sun_path holds 108 bytes with the NUL).
UNIX_PATH_BYTES_MAX = 107


@dataclass(frozen=True)
class NbdAddress:
    """Where to listen: TCP ``host:port`` (port 0: any free one) or a Unix socket ``path``."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path is not None else f"{self.host}:{self.port}"


def parse_nbd_address(text: str) -> NbdAddress:
    """``HOST:PORT``, ``[V6]:PORT`` or ``unix:PATH``; ConfigError naming the text otherwise."""
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path or "\0" in path:
            raise ConfigError(f"NBD address {text!r}: expected unix:PATH with a socket path")
        if len(os.fsencode(path)) > UNIX_PATH_BYTES_MAX:
            raise ConfigError(f"NBD address {text!r}: a Unix socket path has at most {UNIX_PATH_BYTES_MAX} bytes")
        return NbdAddress(path=path)
    found = _HOST_PORT.fullmatch(text)
    if found is None or int(found["port"]) > 65535:
        raise ConfigError(f"NBD address {text!r}: expected HOST:PORT (port 0..65535, 0 for any free one) or unix:PATH")
    return NbdAddress(host=found["v6"] or found["host"], port=int(found["port"]))


def parse_tcp(text: str) -> tuple[str, int]:
    """A TCP ``HOST:PORT`` (``[V6]:PORT``) as a pair; ConfigError otherwise."""
    address = parse_nbd_address(text)
    if address.path is not None:
        raise ConfigError(f"NBD address {text!r}: expected HOST:PORT here, not a Unix socket")
    assert address.host is not None and address.port is not None
    return address.host, address.port
