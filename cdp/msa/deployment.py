"""The deployment record: which site is installed on a store (FORMAT.md §12).

``cdp install`` writes ``sites/<site>/deployment.cdpd``; ``cdp uninstall`` deletes it;
the preflights read it to tell "already installed" from "another site's store". It is a
64-byte summed header and a compact, key-sorted JSON body, like a lock object (§11.1):

    {"api": "127.0.0.1:32880", "created_ns": 1700000000000000000,
     "drvas": [{"listen": "127.0.0.1:32873", "name": "drva-1"}],
     "engine_version": "0.1.0", "site": "site-a"}

It never holds a secret: names, endpoints and times only.

Beside it, on the installing host, ``<state_dir>/install.json`` (FORMAT.md §13.15) is the
install record: exactly which partitions ``cdp install`` created or formatted, each with
the identity it had right after (device and inode, and a log's superblock uuid and
label, a metadata repository's mark). ``cdp uninstall`` removes those and only those, and only while they still are
that same file: a partition install found and kept is never its to delete.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import xxhash

from cdp.durable import atomic_write
from cdp.errors import ConfigError, FormatError, NotFound
from cdp.store.base import ObjectStore, get_bounded
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
#: The largest record (§12: exactly ``64 + body_len`` bytes): a larger object under the key
#: is refused before it is read, not read whole first (a planted 2 GiB one took the memory
#: of every preflight and install).
DEPLOYMENT_BYTES_MAX = _HEADER.size + BODY_LEN_MAX


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
        data = await get_bounded(store, key, DEPLOYMENT_BYTES_MAX)
    except NotFound:
        return None
    return decode_deployment(key, data)


async def installed_sites(store: ObjectStore) -> list[str]:
    """Every site with a deployment record in ``store``, in key order (records only
    listed, not read: a damaged record still counts as an installation)."""
    return [site async for info in store.list(SITES_PREFIX)
            if (site := site_of_key(info.key)) is not None]


# --------------------------------------------------------------------------- the install record

INSTALL_RECORD_NAME = "install.json"
INSTALL_RECORD_VERSION = 1
INSTALL_RECORD_BYTES_MAX = 1 << 20  # a few entries per DRVA; more is not a file we wrote
PARTITION_ROLES = ("log", "meta")
PARTITION_KINDS = ("file", "device")


@dataclass(frozen=True)
class MadePartition:
    """One partition ``cdp install`` created or formatted, as it was right after.

    ``dev``/``ino``: a file's ``st_dev``/``st_ino``; a block device's number
    (``st_rdev``) and 0. ``formatted`` is false between the moment install made the
    file and the end of its format (a crash there: the next install formats it again).
    ``identity``: a log's superblock uuid (hex); for a metadata repository file, whose
    format carries no identity, the mark install set in its ``user.cdp.install``
    extended attribute ("" where the file system keeps none, and for a device).
    ``label``: the label install wrote in a log's superblock ("" for a repository).
    """

    drva: str
    role: str  # "log" | "meta"
    path: str  # absolute
    kind: str  # "file" | "device"
    dev: int
    ino: int
    formatted: bool
    identity: str = ""
    label: str = ""


_MADE_TYPES = {"drva": str, "role": str, "path": str, "kind": str, "dev": int, "ino": int, "formatted": bool,
               "identity": str, "label": str}
assert set(_MADE_TYPES) == {f.name for f in fields(MadePartition)}


def install_record_path(state_dir: Path) -> Path:
    return state_dir / INSTALL_RECORD_NAME


def _made_partition(path: Path, i: int, item: Any) -> MadePartition:
    where = f"{path}: partitions[{i}]"
    if not isinstance(item, dict) or set(item) != set(_MADE_TYPES):
        raise ConfigError(f"{where}: expected an object with exactly the keys {sorted(_MADE_TYPES)}")
    for key, typ in _MADE_TYPES.items():
        value = item[key]
        if type(value) is not typ:  # bool is an int: only the exact type will do
            raise ConfigError(f"{where}.{key}: expected a {typ.__name__}, got {value!r}")
    if item["role"] not in PARTITION_ROLES or item["kind"] not in PARTITION_KINDS:
        raise ConfigError(f"{where}: role {item['role']!r} / kind {item['kind']!r}: expected one of "
                          f"{PARTITION_ROLES} / {PARTITION_KINDS}")
    if not os.path.isabs(item["path"]):
        raise ConfigError(f"{where}.path: expected an absolute path, got {item['path']!r}")
    return MadePartition(**item)


def load_install_record(state_dir: Path, site: str) -> dict[str, MadePartition]:
    """The partitions install made, by path ({} when there is no record). ``ConfigError``
    naming the file and the field when it is not one install wrote for ``site``."""
    path = install_record_path(state_dir)
    try:
        with open(path, "rb") as f:
            data = f.read(INSTALL_RECORD_BYTES_MAX + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: unreadable install record ({exc.strerror})") from exc
    if len(data) > INSTALL_RECORD_BYTES_MAX:
        raise ConfigError(f"{path}: more than {INSTALL_RECORD_BYTES_MAX} bytes: not an install record")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(doc, dict) or set(doc) != {"version", "site", "partitions"} \
            or not isinstance(doc["partitions"], list):
        raise ConfigError(f"{path}: expected {{'version': {INSTALL_RECORD_VERSION}, 'site', 'partitions': [...]}}")
    if doc["version"] != INSTALL_RECORD_VERSION:
        raise ConfigError(f"{path}: version {doc['version']!r}, expected {INSTALL_RECORD_VERSION}")
    if doc["site"] != site:
        raise ConfigError(f"{path}: the install record of site {doc['site']!r}, the site file says {site!r}")
    made = [_made_partition(path, i, item) for i, item in enumerate(doc["partitions"])]
    return {m.path: m for m in made}


def save_install_record(state_dir: Path, site: str, made: dict[str, MadePartition]) -> None:
    """Replace the record atomically and durably (``cdp.durable.atomic_write``)."""
    doc = {"version": INSTALL_RECORD_VERSION, "site": site,
           "partitions": [asdict(m) for _, m in sorted(made.items())]}
    atomic_write(install_record_path(state_dir), json.dumps(doc, indent=1, sort_keys=True).encode())
