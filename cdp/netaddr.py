"""A peer's address as the caps that share connections count it: the DRVA's handshake
slots per source (``drva.handshakes``) and the management API's connections per address
(``cdp.msa.http_limits``).

An IPv4-mapped IPv6 address counts as its IPv4 address, and an IPv6 address as its /64
(the smallest block a site is given: one host can take any address in it); a zone
(``fe80::1%eth0``) is dropped."""

from __future__ import annotations

import ipaddress
from typing import Any

IPV6_SHARE_PREFIX = 64


def peer_ip(peername: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address of ``peername`` (as ``transport.get_extra_info("peername")`` gives
    it), an IPv4-mapped one as IPv4; None for a Unix socket, or nothing known."""
    host = peername[0] if isinstance(peername, tuple) and peername else peername
    if not isinstance(host, str):
        return None
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def share_key(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """What ``ip`` counts under: itself (IPv4), or its /64 (IPv6)."""
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, IPV6_SHARE_PREFIX), strict=False))
    return str(ip)
