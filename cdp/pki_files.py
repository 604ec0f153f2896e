"""Where a site's TLS files are (``TlsFiles``), which server certificates it keeps
(``LeafSpec``) and the names each holds (``server_names``): what a site file's ``[tls]``
means, without the certificate code (``cdp.pki``, FORMAT.md §20).

Apart from ``cdp.pki`` because that one loads ``cryptography``: every host, job and CLI
verb reads its site file, and only ``cdp install`` and the alarms make or read a
certificate (its import cost each of those processes about 0.05 s of CPU).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: Always in a server certificate: what a client on the same host dials.
LOCAL_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class TlsFiles:
    """Where a site's TLS files are (the layout: ``cdp.pki``'s docstring)."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    def cert(self, stem: str) -> Path:
        return self.dir / f"{stem}.pem"

    def key(self, stem: str) -> Path:
        return self.dir / f"{stem}.key"


@dataclass(frozen=True)
class LeafSpec:
    """A server certificate to keep: file stem (``drva-drva-1``, ``api``), the subject's
    common name and every name or address clients dial (DNS names and IP addresses)."""

    stem: str
    common_name: str
    names: tuple[str, ...]


def server_names(*hosts: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The subject alternative names of a server listening on ``hosts``: those, the local
    names, and ``extra`` (the site file's ``[tls] server_names``), without duplicates and
    without wildcard addresses (0.0.0.0, ::), which no client dials."""
    out: list[str] = []
    for name in (*hosts, *LOCAL_NAMES, *extra):
        name = name.strip("[]")
        try:
            name = str(ipaddress.ip_address(name))  # the form a certificate gives back: compared at each install
        except ValueError:
            pass
        if name in ("0.0.0.0", "::") or not name or name in out:
            continue
        out.append(name)
    return tuple(out)
