"""The deployment record: which site is installed on a store (FORMAT.md §12).

``cdp install`` writes ``sites/<site>/deployment.cdpd``; ``cdp uninstall`` deletes it;
the preflights read it to tell "already installed" from "another site's store". It is a
64-byte summed header and a compact, key-sorted JSON body, like a lock object (§11.1):

    {"api": "127.0.0.1:32880", "created_ns": 1700000000000000000,
     "drvas": [{"listen": "127.0.0.1:32873", "name": "drva-1"}],
     "engine_version": "0.1.0", "site": "site-a"}

It never holds a secret: names, endpoints and times only.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import xxhash

from cdp.errors import FormatError, NotFound
from cdp.store.base import ObjectStore
from cdp.summed import checked_json_body, pack_summed, unpack_summed

DEPLOYMENT_MAGIC = b"CDPD"
DEPLOYMENT_VERSION = 1
BODY_LEN_MAX = 64 << 10
SITES_PREFIX = "sites/"
RECORD_NAME = "deployment.cdpd"

# FORMAT.md §12: header, 64 bytes; header_xxh3 (the last field) covers [0, 56).
_HEADER = struct.Struct("<4sH6sIQQ24sQ")
assert _HEADER.size == 64, "FORMAT.md §12"
_HEADER_ZERO = {"reserved": (6, 6), "reserved2": (32, 24)}
_BODY_KEYS = frozenset(("site", "created_ns", "engine_version", "drvas", "api"))
_DRVA_KEYS = frozenset(("name", "listen"))


def deployment_key(site: str) -> str:
    return f"{SITES_PREFIX}{site}/{RECORD_NAME}"


def site_of_key(key: str) -> str | None:
    """The site a ``sites/<site>/deployment.cdpd`` key names; None for other keys."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] + "/" == SITES_PREFIX and parts[2] == RECORD_NAME:
        return parts[1]
    return None


@dataclass(frozen=True)
class Deployment:
    """One decoded deployment record."""

    site: str
    created_ns: int
    engine_version: str
    drvas: tuple[tuple[str, str], ...]  # (name, listen)
    api: str

    def body(self) -> dict[str, Any]:
        return {"site": self.site, "created_ns": self.created_ns, "engine_version": self.engine_version,
                "drvas": [{"name": n, "listen": listen} for n, listen in self.drvas], "api": self.api}


def encode_deployment(dep: Deployment) -> bytes:
    data = json.dumps(dep.body(), sort_keys=True, separators=(",", ":")).encode("utf-8")
    if len(data) > BODY_LEN_MAX:
        raise ValueError(f"deployment record body of {len(data)} bytes > {BODY_LEN_MAX}")
    return pack_summed(_HEADER, DEPLOYMENT_MAGIC, DEPLOYMENT_VERSION, bytes(6), len(data),
                       dep.created_ns, xxhash.xxh3_64_intdigest(data), bytes(24)) + data


def decode_deployment(key: str, data: bytes | bytearray | memoryview) -> Deployment:
    """Verify the record stored under ``key`` (FormatError naming it and the field otherwise)."""
    mv = memoryview(data).cast("B")
    where = f"deployment record {key}"
    _, body_len, created_ns, body_xxh3, _ = unpack_summed(
        _HEADER, mv, where=where, magic=DEPLOYMENT_MAGIC, version=DEPLOYMENT_VERSION, zero=_HEADER_ZERO)
    body = checked_json_body(mv, body_len, body_xxh3, where=where, body_len_max=BODY_LEN_MAX, keys=_BODY_KEYS)
    drvas = body["drvas"]
    if not isinstance(drvas, list) or not all(
            isinstance(d, dict) and set(d) == _DRVA_KEYS and all(isinstance(v, str) for v in d.values())
            for d in drvas):
        raise FormatError(f"{where}: body.drvas: expected a list of {{'name', 'listen'}} strings")
    if not all(isinstance(body[k], str) for k in ("site", "engine_version", "api")):
        raise FormatError(f"{where}: body.site, body.engine_version and body.api must be strings")
    if body["created_ns"] != created_ns:
        raise FormatError(f"{where}: body.created_ns {body['created_ns']!r} differs from the "
                          f"header's created_ns {created_ns} (offset 16)")
    expected_site = site_of_key(key)
    if expected_site is not None and body["site"] != expected_site:
        raise FormatError(f"{where}: body.site {body['site']!r}, expected {expected_site!r} (the key's)")
    return Deployment(body["site"], created_ns, body["engine_version"],
                      tuple((d["name"], d["listen"]) for d in drvas), body["api"])


async def read_deployment(store: ObjectStore, site: str) -> Deployment | None:
    """``site``'s record in ``store``, None when there is none."""
    key = deployment_key(site)
    try:
        data = await store.get(key)
    except NotFound:
        return None
    return decode_deployment(key, data)


async def installed_sites(store: ObjectStore) -> list[str]:
    """Every site with a deployment record in ``store``, in key order (records only
    listed, not read: a damaged record still counts as an installation)."""
    return [site async for info in store.list(SITES_PREFIX)
            if (site := site_of_key(info.key)) is not None]
