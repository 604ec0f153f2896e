"""DRVA configuration: one TOML file per DRVA process.

Relative paths are relative to the file's directory.

```toml
version = 2                       # optional: 1 (the default) or 2, which allows [[domains]] store
name = "drva-1"
site = "site-a"                   # the site it writes for: owner of the timelines it writes (default "default")
listen = "127.0.0.1:32873"        # the filter port (32873..32878 by convention)
state_dir = "/var/lib/cdp/drva-1" # status.json lives here
status_interval_s = 1.0           # how often status.json is rewritten (0.1..60)
store = "file:///var/lib/cdp/store"   # where the domains ship to, unless theirs says otherwise
secret_env = "CDP_SITE_SECRET"    # the handshake secret comes from the environment

[log]                  # the replication-log partition: a file or a block device
path = "/var/lib/cdp/drva-1/replog"
size = "1GiB"          # only to create a file
direct = false         # O_DIRECT
[meta]
path = "/var/lib/cdp/drva-1/meta"
[seal]
bytes = "16MiB"        # cut a segment at this many bytes of frames ...
age_s = 1.0            # ... or when its oldest frame is this old
[upload]
concurrency = 4
[backpressure]
high_water = 0.80      # log usage above which filters are told to back off
low_water = 0.60
[tls]                  # optional: filters connect with TLS
cert = "/etc/cdp/drva-1.pem"      # PEM certificate (and key, unless key is given)
key = "/etc/cdp/drva-1.key"

[[domains]]
id = 1
name = "erp"
disks = [{ vm = "erp-db", name = "disk0", size = "64MiB" }]
takeover = false       # true while a failover to this site forks the domain's timeline:
                       # wait for the fork instead of being fenced by the other site's

[[domains]]            # (version 2) a domain that lives in another store: shipped there,
id = 3                 # its catalog and leases there too (FORMAT.md §13.4)
name = "crm"
disks = [{ vm = "crm-1", name = "disk0", size = "64MiB" }]
store = "s3://dr-site-b/cdp"
```

``load_drva_config`` refuses a bad file with the file, the key and what was expected,
before the DRVA touches anything: an unknown key (a typo: ``TOP_KEYS``, ``TABLE_KEYS``,
``DOMAIN_KEYS``, ``DISK_KEYS``), a value out of range, ``true`` for a number, a
``state_dir`` that is a file (or below one), a partition where the DRVA writes something
else (the other partition, ``state_dir`` itself, ``status.json``, ``requests/``), two
disks of a domain that would recover to one image file (``<vm>-<disk>.img``), a TLS
certificate that does not load. The ranges are constants here
(``SEAL_BYTES_RANGE``, …): the site file (``cdp.msa.config``) checks its own values
against them, so that preflight and install refuse what a DRVA would.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdp.errors import ConfigError
from cdp.frame import FRAME_LEN_MAX
from cdp.inventory import image_clash
from cdp.logfmt import DATA_SIZE_MIN, DATA_START, entry_stride
from cdp.store.open import check_store_url, config_store_url
from cdp.tls import server_context
from cdp.tomlread import NAME, NAME_EXPECTED, SIZE_MAX, TomlReader
from cdp.units import parse_size
from drva.requests import requests_dir

DEFAULT_SITE = "default"
#: Versions of this file a DRVA reads. Version 2 added ``[[domains]] store``: a reader of
#: version 1 knows no such key and would ship the domain to ``store`` — so a file that
#: uses it says version 2, and one that does not stays version 1 (no ``version`` key).
DRVA_CONFIG_VERSIONS = (1, 2)
DRVA_DOMAIN_STORES_VERSION = 2
# The ranges of the values a DRVA accepts (inclusive).
DOMAIN_ID_RANGE = (1, (1 << 32) - 1)  # 0 is no domain: frames and keys reserve it
SEAL_BYTES_RANGE = (1 << 20, 256 << 20)
SEAL_AGE_S_RANGE = (0.05, 3600.0)
UPLOAD_CONCURRENCY_RANGE = (1, 64)
STATUS_INTERVAL_S_RANGE = (0.1, 60.0)  # status.json is rewritten this often: below, a busy loop
LOG_SIZE_MIN = DATA_START + DATA_SIZE_MIN  # FORMAT.md §3.1: the superblocks and the smallest ring
DISK_SIZE_MAX = SIZE_MAX  # as the cluster file's (cdp.tomlread): 1 PiB
# The keys of each table of the file (the module docstring): any other is refused, it is a
# typo — ``[seal] byte`` was read as no key at all, and a domain's ``stor`` shipped it to ``store``.
TOP_KEYS = frozenset(("version", "name", "site", "listen", "state_dir", "status_interval_s", "store",
                      "secret_env", "log", "meta", "seal", "upload", "backpressure", "tls", "domains"))
TABLE_KEYS: Mapping[str, frozenset[str]] = {
    "log": frozenset(("path", "size", "direct")), "meta": frozenset(("path",)),
    "seal": frozenset(("bytes", "age_s")), "upload": frozenset(("concurrency",)),
    "backpressure": frozenset(("high_water", "low_water")), "tls": frozenset(("cert", "key")),
}
DOMAIN_KEYS = frozenset(("id", "name", "disks", "takeover", "store"))
DISK_KEYS = frozenset(("vm", "name", "size"))
#: A log of at least this many bytes takes any frame the wire allows (FORMAT.md §9.2): a
#: DRVA takes frames whose log entry fills at most half the log's data area
#: (``GroupCommitter.frame_len_max``) and refuses larger ones (``ERROR frame_too_large``).
#: A smaller log (down to LOG_SIZE_MIN) is allowed — the simulated filter's frames are
#: 1 MiB of payload, or one write of at most 16 MiB — and the DRVA says at start which
#: frames it refuses.
LOG_SIZE_ANY_FRAME = DATA_START + 2 * entry_stride(FRAME_LEN_MAX)


def blocking_file(path: Path) -> str | None:
    """The name of the first component of ``path`` (itself included) that exists and is
    not a directory, so that ``path`` cannot be (or become) a directory; None if none."""
    for part in (*reversed(path.parents), path):
        try:
            mode = os.stat(part).st_mode
        except FileNotFoundError:
            return None  # from here on it can be made
        except OSError:
            return None  # not ours to judge (permissions): creating it says what is wrong
        if not stat.S_ISDIR(mode):
            return part.name or str(part)
    return None


def inside(path: Path, directory: Path) -> bool:
    """Is ``path`` ``directory`` or below it, as written or once links are resolved?"""
    as_written = (Path(os.path.abspath(path)), Path(os.path.abspath(directory)))
    for p, d in (as_written, (path.resolve(), directory.resolve())):
        if p == d or d in p.parents:
            return True
    return False


@dataclass(frozen=True)
class DiskSpec:
    index: int
    vm: str
    name: str
    size: int


@dataclass(frozen=True)
class DomainConfig:
    id: int
    name: str
    disks: tuple[DiskSpec, ...]
    # Taking the domain over from another site (a failover in progress): while its
    # current timeline is not this site's, the catalog is not opened — the domain waits
    # (filters get not_ready) instead of being fenced.
    takeover: bool = False
    #: The store the domain lives in when it is not the DRVA's ``store`` (version 2).
    store_url: str | None = None

    def catalog_disks(self) -> list[dict[str, Any]]:
        return [{"disk": d.index, "vm": d.vm, "name": d.name, "size": d.size} for d in self.disks]


@dataclass(frozen=True)
class DrvaConfig:
    name: str
    host: str
    port: int
    state_dir: Path
    store_url: str
    secret: bytes = field(repr=False)
    log_path: Path
    log_size: int | None
    log_direct: bool
    meta_path: Path
    domains: tuple[DomainConfig, ...]
    seal_bytes: int = 16 << 20
    seal_age_s: float = 1.0
    upload_concurrency: int = 4
    high_water: float = 0.80
    low_water: float = 0.60
    staging_bytes_max: int = 24 << 20
    frame_cache_bytes: int = 24 << 20  # durable frames kept in RAM for the sealer
    status_interval_s: float = 1.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: The site this DRVA writes for: it writes a domain's catalog only while the
    #: current timeline is owned by this site (FORMAT.md §8.5).
    site: str = DEFAULT_SITE

    @property
    def status_path(self) -> Path:
        return self.state_dir / "status.json"

    def domain(self, domain_id: int) -> DomainConfig | None:
        return next((d for d in self.domains if d.id == domain_id), None)

    def store_url_of(self, domain: DomainConfig) -> str:
        return domain.store_url or self.store_url

    def store_urls(self) -> tuple[str, ...]:
        """Every store this DRVA ships to: ``store`` first (always: its status names it),
        then each other one a domain names, in the domains' order."""
        urls = [self.store_url]
        for d in self.domains:
            if (url := self.store_url_of(d)) not in urls:
                urls.append(url)
        return tuple(urls)


class _Reader:
    """Typed access to a TOML table, with errors that name the file and the key."""

    def __init__(self, doc: Mapping[str, Any], source: str, prefix: str = "") -> None:
        self.doc, self.source, self.prefix = doc, source, prefix

    def where(self, key: str) -> str:
        return f"{self.source}: {self.prefix}{key}"

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.doc:
            if default is ...:
                raise ConfigError(f"{self.where(key)}: missing")
            return default
        value = self.doc[key]
        kinds = (kind,) if isinstance(kind, type) else kind
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):  # true is no number
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise ConfigError(f"{self.where(key)}: {value!r} is not a {names}")
        return value

    def path(self, key: str) -> str:
        """A path: a non-empty string without NUL, at most 4,095 bytes and 255 per name
        (as ``cdp.tomlread.TomlReader.file_path``; a NUL ended the load in a traceback)."""
        value = self.get(key, str)
        try:
            TomlReader(self.source).file_path(value, f"{self.prefix}{key}")
        except ConfigError as exc:
            raise ConfigError(exc.message) from None
        return value

    def known(self, keys: frozenset[str]) -> "_Reader":
        """This reader, once every key of its table is one of ``keys`` (and it is a table):
        an unknown key is refused as ``TomlReader.table`` does, naming the file, the key and
        the keys expected."""
        TomlReader(self.source).table(self.doc, self.prefix.removesuffix("."), set(), set(keys))
        return self

    def table(self, key: str) -> "_Reader":
        """Table ``key`` (one of ``TABLE_KEYS``, whose keys it may hold), empty if absent."""
        return _Reader(self.get(key, dict, {}), self.source, f"{self.prefix}{key}.").known(TABLE_KEYS[key])

    def name(self, key: str) -> str:
        value = self.get(key, str)
        if not NAME.fullmatch(value):
            raise ConfigError(f"{self.where(key)}: {value!r} is not a name (expected {NAME_EXPECTED})")
        return value

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        value = float(self.get(key, (int, float), default))
        if not lo <= value <= hi:  # also refuses NaN
            raise ConfigError(f"{self.where(key)}: expected {lo:g}..{hi:g}, got {value!r}")
        return value


def load_drva_config(path: str | os.PathLike[str], env: Mapping[str, str] = os.environ) -> DrvaConfig:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    return parse_drva_config(doc, str(path), env, base_dir=path.resolve().parent)


def parse_drva_config(doc: Mapping[str, Any], source: str, env: Mapping[str, str] = os.environ,
                      base_dir: Path | None = None) -> DrvaConfig:
    """``base_dir``: relative paths (and a store given as a plain path) are relative to it
    — the configuration file's directory — rather than to wherever the daemon started."""
    r = _Reader(doc, source).known(TOP_KEYS)
    here = base_dir or Path.cwd()
    version = r.get("version", int, 1)
    if version not in DRVA_CONFIG_VERSIONS:
        raise ConfigError(f"{r.where('version')}: expected one of {', '.join(map(str, DRVA_CONFIG_VERSIONS))} "
                          f"(a newer MSA wrote it? this DRVA reads up to version {DRVA_CONFIG_VERSIONS[-1]}), "
                          f"got {version}")
    host, _, port_text = r.get("listen", str).rpartition(":")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{r.where('listen')}: expected HOST:PORT with a port in 0..65535 (0: any free port)")
    secret_env = r.get("secret_env", str, "CDP_SITE_SECRET")
    secret = env.get(secret_env, "")
    if len(secret) < 16:
        raise ConfigError(
            f"{r.where('secret_env')}: environment variable {secret_env} must hold the site "
            f"secret (at least 16 characters)"
        )
    log, meta, seal = r.table("log"), r.table("meta"), r.table("seal")
    upload, bp, tls = r.table("upload"), r.table("backpressure"), r.table("tls")
    high = float(bp.get("high_water", (int, float), 0.80))
    low = float(bp.get("low_water", (int, float), 0.60))
    if not 0 < low < high <= 1:
        raise ConfigError(f"{bp.where('low_water')}: expected 0 < low_water < high_water <= 1")
    domains = tuple(_domain(_Reader(d, source, f"domains[{i}]."), i, here, version)
                    for i, d in enumerate(r.get("domains", list)))
    if len({d.id for d in domains}) != len(domains):
        raise ConfigError(f"{r.where('domains')}: domain ids must be unique")
    state_dir = here / r.path("state_dir")
    if (blocker := blocking_file(state_dir)) is not None:
        raise ConfigError(f"{r.where('state_dir')}: expected a directory (or a path where one can be made); "
                          f"{blocker!r} is a regular file")
    log_size = None
    if "size" in log.doc:
        log_size = parse_size(log.get("size", (int, str)), log.where("size"))
        if not LOG_SIZE_MIN <= log_size <= SIZE_MAX:
            raise ConfigError(f"{log.where('size')}: expected at least {LOG_SIZE_MIN} bytes (FORMAT.md §3.1) "
                              f"and at most {SIZE_MAX}, got {log_size}")
    cfg = DrvaConfig(
        name=r.name("name"), host=host, port=int(port_text),
        site=r.name("site") if "site" in r.doc else DEFAULT_SITE,
        state_dir=state_dir, store_url=_store_url(r, "store", here),
        secret=secret.encode(),
        log_path=here / log.path("path"),
        log_size=log_size,
        log_direct=log.get("direct", bool, False),
        meta_path=here / meta.path("path"),
        domains=domains,
        seal_bytes=parse_size(seal.get("bytes", (int, str), 16 << 20), seal.where("bytes")),
        seal_age_s=seal.number("age_s", 1.0, *SEAL_AGE_S_RANGE),
        upload_concurrency=upload.get("concurrency", int, 4),
        high_water=high, low_water=low,
        status_interval_s=r.number("status_interval_s", 1.0, *STATUS_INTERVAL_S_RANGE),
        tls_cert=here / tls.path("cert") if "cert" in tls.doc else None,
        tls_key=here / tls.path("key") if "key" in tls.doc else None,
    )
    if not UPLOAD_CONCURRENCY_RANGE[0] <= cfg.upload_concurrency <= UPLOAD_CONCURRENCY_RANGE[1]:
        raise ConfigError(f"{upload.where('concurrency')}: expected {UPLOAD_CONCURRENCY_RANGE[0]}.."
                          f"{UPLOAD_CONCURRENCY_RANGE[1]}")
    if not SEAL_BYTES_RANGE[0] <= cfg.seal_bytes <= SEAL_BYTES_RANGE[1]:
        raise ConfigError(f"{seal.where('bytes')}: expected 1MiB..256MiB")
    _check_partition_paths(cfg, log, meta)
    _check_tls(cfg, tls)
    return cfg


def _check_partition_paths(cfg: DrvaConfig, log: _Reader, meta: _Reader) -> None:
    """Refuse a partition where the DRVA writes something else: the other partition (each
    takes an exclusive lock: one file for both was "in use by another process"),
    ``state_dir`` or a directory above it, ``status.json`` (rewritten every second by an
    atomic replace: a log there became JSON, its acked writes lost) and ``requests/``
    (each file there is read and deleted). A partition elsewhere in ``state_dir`` is fine
    (``<state_dir>/replog`` is the usual place)."""
    own = ((cfg.status_path, "its status file (status.json, replaced every status_interval_s)"),
           (requests_dir(cfg.state_dir), "requests from the MSA (requests/, whose files it deletes)"))
    for reader, path in ((log, cfg.log_path), (meta, cfg.meta_path)):
        if inside(cfg.state_dir, path):
            raise ConfigError(f"{reader.where('path')}: expected a file, got {path}, which is state_dir "
                              f"({cfg.state_dir}) or a directory above it")
        for place, what in own:
            if inside(path, place):
                raise ConfigError(f"{reader.where('path')}: expected a file apart from {place}, got {path}: the DRVA "
                                  f"writes {what} there, which would destroy the partition")
    if inside(cfg.meta_path, cfg.log_path) or inside(cfg.log_path, cfg.meta_path):
        raise ConfigError(f"{meta.where('path')}: expected a file apart from log.path ({cfg.log_path}): the log "
                          f"and the metadata repository are two partitions, got {cfg.meta_path}")


def _check_tls(cfg: DrvaConfig, tls: _Reader) -> None:
    """Load the certificate and key as the DRVA will (``drva.daemon``), so that a missing
    or unreadable file is a configuration error now, not a traceback at listen time."""
    if cfg.tls_cert is None:
        if cfg.tls_key is not None:
            raise ConfigError(f"{tls.where('key')}: a key without tls.cert (expected both, or a cert holding the key)")
        return
    try:
        server_context(cfg.tls_cert, cfg.tls_key)
    except ConfigError as exc:  # it names the file that failed, never a key's content
        raise ConfigError(f"{tls.where('cert')}: expected a readable PEM certificate (and key): "
                          f"{exc.message}") from None


def _store_url(r: _Reader, key: str, here: Path) -> str:
    """The store URL of ``key`` (a plain path: a file store relative to ``here``), checked
    by its form; the message names the key and shows the URL redacted."""
    value = r.get(key, str)
    url = config_store_url(value, here) if value else value
    try:
        check_store_url(url)
    except ConfigError as exc:
        raise ConfigError(f"{r.where(key)}: expected a store URL or path (file:///…, s3://bucket/prefix, "
                          f"azure://container/prefix): {exc.message}") from None
    return url


def _domain(r: _Reader, i: int, here: Path, version: int) -> DomainConfig:
    r.known(DOMAIN_KEYS)
    domain_id = r.get("id", int)
    if not DOMAIN_ID_RANGE[0] <= domain_id <= DOMAIN_ID_RANGE[1]:
        raise ConfigError(f"{r.where('id')}: expected {DOMAIN_ID_RANGE[0]}..{DOMAIN_ID_RANGE[1]}, got {domain_id}")
    disks = []
    for j, d in enumerate(r.get("disks", list)):
        dr = _Reader(d, r.source, f"{r.prefix}disks[{j}].").known(DISK_KEYS)
        size = parse_size(dr.get("size", (int, str)), dr.where("size"))
        if size <= 0 or size % 512:
            raise ConfigError(f"{dr.where('size')}: {size} is not a positive multiple of 512")
        if size > DISK_SIZE_MAX:
            raise ConfigError(f"{dr.where('size')}: expected at most {DISK_SIZE_MAX} bytes "
                              f"({DISK_SIZE_MAX >> 40} TiB, as the cluster file), got {size}")
        disks.append(DiskSpec(j, dr.name("vm"), dr.name("name"), size))
    if not disks:
        raise ConfigError(f"{r.where('disks')}: a domain needs at least one disk")
    clash = image_clash([(d.vm, d.name) for d in disks])
    if clash is not None:
        first, second = disks[clash[0]], disks[clash[1]]
        raise ConfigError(f"{r.where(f'disks[{second.index}]')}: expected a disk whose image (<vm>-<disk>.img) "
                          f"is its own, got vm {second.vm!r} name {second.name!r}, which makes {clash[2]} as "
                          f"disks[{first.index}] (vm {first.vm!r} name {first.name!r}) does: a recovery of the "
                          f"domain would refuse it")
    takeover = r.get("takeover", bool, False)
    store_url = None
    if "store" in r.doc:
        if version < DRVA_DOMAIN_STORES_VERSION:
            raise ConfigError(f"{r.where('store')}: a domain's own store needs version = "
                              f"{DRVA_DOMAIN_STORES_VERSION} at the top of the file (a reader of version 1 "
                              f"would ship the domain to the default store)")
        store_url = _store_url(r, "store", here)
    return DomainConfig(domain_id, r.name("name"), tuple(disks), takeover, store_url)
