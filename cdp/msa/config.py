"""The site configuration: one TOML file for the management server (``cdp``'s verbs).

Relative paths are relative to the file's directory. ``examples/site.toml`` is a complete
one that needs no service at all (file store, log files in a local directory)::

    site = "site-a"                    # this site's name
    cluster = "cluster.toml"           # the inventory: hosts, VMs, disks, and which DRVA
                                       # each domain's filter streams to (cdp.inventory)
    store = "store"                    # this site's own store: where the domains of the cluster
                                       # file live. A path (file store) or a URL (file:///…,
                                       # s3://bucket/prefix, azure://container/prefix);
                                       # credentials only from the environment
    state_dir = "state"                # the MSA's own state: DRVA configs, jobs, logs
    recovery_roots = ["/srv/restore"]  # where recoveries started through the MSA may write
                                       # (REST "to"); none: such recoveries are refused.
                                       # Never inside the store or state_dir (rocva.destination)
    secret_env = "CDP_SITE_SECRET"     # the filter handshake secret (>= 16 characters)

    [api]
    listen = "127.0.0.1:32880"         # the REST API and /metrics
    token_env = "CDP_API_TOKEN"        # the API's bearer token (>= 16 characters)

    [[drvas]]
    name = "drva-1"                    # not "host-…", "standby-…" (the logs of hosts, standbys) nor "….toml"
    listen = "127.0.0.1:32873"         # one DRVA per port, 32873..32878 by convention
    log = { path = "state/drva-1/replog", size = "256MiB" }   # the replication-log partition
    meta = { path = "state/drva-1/meta" }                      # the metadata repository
    seal = { bytes = "16MiB", age_s = 1.0 }                    # optional
    upload_concurrency = 4                                     # optional

    [defaults]                         # every protected domain, unless its [[protect]] says otherwise
    retention = "72h"                  # points kept at least this long
    rpo_target_s = 60                  # the RPO alarm threshold
    consolidate_after = "1h"           # segments older than this are rolled into a base ...
    consolidate_every = "15m"          # ... by a job this often

    [[protect]]                        # the domains protected at install (protect/unprotect change it)
    domain = "erp"                     # a domain of the cluster file
    rpo_target_s = 30                  # any key of [defaults]

    [alarms]
    log_usage_pct = 90                 # a DRVA's log fuller than this
    backpressure_s = 300               # back-pressure held longer than this

    [jobs]
    retention_days = 60                # job records are kept this long

    [hypervisor]                       # how the MSA powers VMs on and off (cdp.hypervisor); read by
                                       # cdp.msa.config_hypervisor
    driver = "simulator"               # "simulator": a workload per domain; "nbd": its disks as NBD exports
    nbd_listen = "127.0.0.1:0"         # nbd only, optional: TCP too (besides <state_dir>/hypervisor/<host>.nbd.sock),
                                       # a loopback address: the exports carry no authentication (only root
                                       # and the daemon's uid may connect); another one only with
    nbd_allow_remote = false           # true: then anyone who reaches nbd_listen reads and writes the disks
    nbd_allow_users = ["libvirt-qemu"] # nbd_listen only: these users (names or uids) may connect to it too,
                                       # each host resolves them as it starts
    on_demand_hosts = ["esx-b02"]      # hosts a failover may add to the inventory (pilot light)
    vms_per_host = 16                  # a host running this many VMs has no room left
    recovered_workload = { kind = "random", rate_mb_s = 1 }  # what failed-over VMs write

    [peer]                             # the other site of the pair (a planned failover asks it)
    site = "site-a"
    api = "127.0.0.1:32880"            # its [api] listen
    token_env = "CDP_PEER_TOKEN"       # its API token, from this environment variable
    store = "../site-b/store"          # optional: the peer's own store, where its domains live
                                       # (as `store`); absent: they live in this site's `store`

    [[standby]]                        # continuous rehydration of a domain of the peer site
    domain = "erp"                     # kept at its newest consistent point in the datastore,
    mode = "continuous"                # so a failover applies only the tail
    interval_s = 0.5                   # how often the catalog is read

    [tls]                              # FORMAT.md §20
    mode = "on"                        # "off" (the default) or "on": cdp install makes a site CA
                                       # and certificates; the DRVAs and the API serve TLS only,
                                       # the filters and cdp's verbs trust that CA only
    dir = "state/tls"                  # optional (default <state_dir>/tls): where they are
    server_names = ["dr-a.example.net"]  # optional: more names or addresses clients dial
                                       # (besides each listen host, localhost, 127.0.0.1)

With ``[peer] ca = "PATH"`` (the peer site's CA certificate) the peer's API is called
over HTTPS, trusting that CA only.

The inventory the site uses is the ``cluster`` file plus what this MSA registered in
``<state_dir>/registered.toml`` (``cdp.msa.registry``): the VMs a failover brought.

**Which store a domain lives in** (``SiteConfig.store_url_for``): a domain's catalog stays
in one store for its whole life — its timelines, failovers and failbacks. A domain of the
``cluster`` file (this site's own) lives in ``store``; any other — one a failover brought
here, the peer's domain a ``[[standby]]`` keeps warm, a domain looked up by name to be
failed over — lives in ``[peer] store``, or in ``store`` when the peer has none (both
sites share one store). So a pair can protect both ways with one store, or with two:
one per direction, each site's ``store`` being the other's ``[peer] store``.

``load_site_config`` refuses a bad file with the file, the key and what was expected
(``cdp.tomlread``). Secrets are read from the environment by ``secret()`` and
``api_token()``; they are never stored in the file, in logs or in messages.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cdp.errors import ConfigError
from cdp.inventory import Cluster, DomainSpec, parse_cluster
from cdp.msa.config_hypervisor import HypervisorSpec, parse_hypervisor
from cdp.msa.config_places import check_places
from cdp.msa.site_tls import TlsSpec, parse_tls
from cdp.store.open import check_store_url, config_store_url
from cdp.store.storekeys import STORE_KEY_FILE_ENV
from cdp.tomlread import Endpoint, TomlReader
from cdp.units import parse_duration
from drva.config import (
    DOMAIN_ID_RANGE, DRVA_DOMAIN_STORES_VERSION, LOG_SIZE_MIN, SEAL_AGE_S_RANGE, SEAL_BYTES_RANGE,
    UPLOAD_CONCURRENCY_RANGE, blocking_file, parse_drva_config,
)

SECRET_MIN_CHARS = 16
DRVA_PORTS = range(32873, 32879)  # the seed's DRVA ports
DEFAULT_API = "127.0.0.1:32880"
STANDBY_MODES = ("continuous",)
SHOWN_CHARS_MAX = 80  # a value quoted in a message is cut here
#: A wildcard ``[api] listen`` host and the address a client on this machine dials
#: instead: no certificate names a wildcard (``cdp.pki_files.server_names``), nor can one be dialled.
WILDCARD_DIALLED: Mapping[str, str] = {"0.0.0.0": "127.0.0.1", "::": "::1"}
#: Each policy key of the site file and of ``POST /v1/domains/{name}/protect``: its bounds
#: in seconds and whether it is a duration ("72h") or a plain number of seconds. One table
#: for both, so the API refuses what the site file would (and no policy is inf or NaN).
POLICY_LIMITS: Mapping[str, tuple[float, float, bool]] = {
    "retention": (1.0, 3650 * 86400.0, True),
    "rpo_target_s": (1.0, 365 * 86400.0, False),
    "consolidate_after": (0.0, 3650 * 86400.0, True),
    "consolidate_every": (1.0, 365 * 86400.0, True),
}
_POLICY_KEYS = set(POLICY_LIMITS)
#: The stems of the other children's logs and pid files in ``<state_dir>/logs/`` (FORMAT.md
#: §13, §13.13): a simulated host's ``host-<host>``, a standby's ``standby-<domain>``. A
#: DRVA's are its name, so no DRVA name begins with one (``_check_drva_name``).
CHILD_LOG_PREFIXES = ("host-", "standby-")
DRVA_CONFIG_SUFFIX = ".toml"  # drvas/<name>.toml beside drvas/<name>/


@dataclass(frozen=True)
class Policy:
    """What the MSA does for one protected domain."""

    retention_s: float = 72 * 3600.0
    rpo_target_s: float = 60.0
    consolidate_after_s: float = 3600.0
    consolidate_every_s: float = 900.0


#: A protect request's key -> the ``Policy`` field it sets.
POLICY_FIELDS: Mapping[str, str] = {"retention": "retention_s", "rpo_target_s": "rpo_target_s",
                                    "consolidate_after": "consolidate_after_s",
                                    "consolidate_every": "consolidate_every_s"}


@dataclass(frozen=True)
class PolicyChange:
    """The fields one protect request sets (``Policy`` field -> value, checked), applied to
    the domain's policy as it is when the change is made, not when it was asked for: two
    requests that each change one field both take effect."""

    fields: Mapping[str, float]

    def applied_to(self, base: Policy) -> Policy:
        return replace(base, **self.fields)


@dataclass(frozen=True)
class DrvaSpec:
    name: str
    listen: Endpoint
    log_path: Path
    log_size: int
    meta_path: Path
    seal_bytes: int | None = None
    seal_age_s: float | None = None
    upload_concurrency: int | None = None


@dataclass(frozen=True)
class Alarms:
    log_usage_pct: float = 90.0
    backpressure_s: float = 300.0


@dataclass(frozen=True)
class StandbySpec:
    """A domain of the peer site this site keeps warm (continuous rehydration)."""

    domain: str
    mode: str = "continuous"
    interval_s: float = 0.5


@dataclass(frozen=True)
class PeerSpec:
    """The other site of the pair: its name and API; its token comes from ``token_env``.
    ``store_url``: the peer's own store (its domains'), None when it is this site's."""

    site: str
    api: Endpoint
    token_env: str
    store_url: str | None = None
    ca: Path | None = None  # the peer's CA certificate: its API is called over HTTPS

    @property
    def api_url(self) -> str:
        return f"{'https' if self.ca is not None else 'http'}://{self.api.authority}"


@dataclass(frozen=True)
class SiteConfig:
    """A checked site file. Invariant: every protected domain is a domain of ``cluster``
    whose ``drva`` endpoint is the ``listen`` of one of ``drvas``."""

    path: Path
    site: str
    cluster: Cluster
    cluster_path: Path
    store_url: str
    state_dir: Path
    secret_env: str
    api_listen: Endpoint
    token_env: str
    drvas: tuple[DrvaSpec, ...]
    defaults: Policy
    protect: Mapping[str, Policy]  # domain name -> policy, in file order
    alarms: Alarms
    jobs_retention_s: float
    recovery_roots: tuple[Path, ...] = ()  # where the MSA's recoveries may write (rocva.destination)
    hypervisor: HypervisorSpec = HypervisorSpec()
    peer: PeerSpec | None = None
    isolated: frozenset[str] = frozenset()  # registered domains whose VMs run unreplicated (test failovers)
    standby: tuple[StandbySpec, ...] = ()
    own_domains: frozenset[str] = frozenset()  # the cluster file's domains (not registered): in ``store``
    tls: TlsSpec | None = None  # [tls] mode = "on"

    @property
    def api_url(self) -> str:
        """The REST API's base URL, as a client on this machine dials it: https when the
        site serves TLS; a wildcard listen address is dialled at the loopback address of
        its family (``WILDCARD_DIALLED``), an IPv6 address in brackets."""
        host = WILDCARD_DIALLED.get(self.api_listen.host, self.api_listen.host)
        return f"{'https' if self.tls is not None else 'http'}://{Endpoint(host, self.api_listen.port).authority}"

    @property
    def api_server_name(self) -> str | None:
        """The name the API's certificate is checked for when it is not the host dialled:
        a certificate holds 127.0.0.1 and localhost whatever the listen address
        (``cdp.pki_files.LOCAL_NAMES``), and ::1 only when listed, so ``[::]`` is checked for
        localhost."""
        return "localhost" if self.tls is not None and self.api_listen.host == "::" else None

    # ---- lookups

    def drva(self, name: str) -> DrvaSpec:
        for d in self.drvas:
            if d.name == name:
                return d
        raise ConfigError(f"{self.path}: no DRVA named {name!r} (drvas: {', '.join(d.name for d in self.drvas)})")

    def drva_of(self, domain: DomainSpec) -> DrvaSpec:
        for d in self.drvas:
            if d.listen == domain.drva:
                return d
        raise ConfigError(f"{self.cluster_path}: domain {domain.name} streams to {domain.drva}, "
                          f"which no [[drvas]] of {self.path} listens on")

    def domain(self, name: str) -> DomainSpec:
        return self.cluster.domain(name)

    def policy(self, domain: str) -> Policy:
        return self.protect.get(domain, self.defaults)

    # ---- stores

    def store_url_for(self, domain: str) -> str:
        """The store domain ``domain`` (a name) lives in (module docstring): this site's
        ``store`` for a domain of its own, else the peer's store."""
        if domain in self.own_domains or self.peer is None or self.peer.store_url is None:
            return self.store_url
        return self.peer.store_url

    def store_urls(self) -> tuple[str, ...]:
        """Every store the site reaches: its own, then the peer's if it has another."""
        peer = self.peer.store_url if self.peer is not None else None
        return (self.store_url,) if peer is None or peer == self.store_url else (self.store_url, peer)

    # ---- secrets (from the environment only)

    def secret(self, env: Mapping[str, str] = os.environ) -> bytes:
        return _secret(env, self.secret_env, "the filter handshake secret", self.path).encode()

    def api_token(self, env: Mapping[str, str] = os.environ) -> str:
        return _secret(env, self.token_env, "the API token", self.path)

    def child_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` for the processes the MSA starts (DRVAs, hosts, appliances): without
        the API tokens — this site's and the peer's — which only the MSA uses."""
        tokens = {self.token_env} | ({self.peer.token_env} if self.peer is not None else set())
        out = {k: v for k, v in env.items() if k not in tokens}
        # The children start in the code root, not in the daemon's directory: a relative
        # key file would name another file there (or none), so it is passed absolute.
        key_file = out.get(STORE_KEY_FILE_ENV)
        if key_file and not os.path.isabs(key_file):
            out[STORE_KEY_FILE_ENV] = os.path.abspath(key_file)
        return out

    def peer_token(self, env: Mapping[str, str] = os.environ) -> str:
        assert self.peer is not None
        return _secret(env, self.peer.token_env, f"the API token of site {self.peer.site}", self.path)

    # ---- what the MSA writes for its DRVAs

    def drva_state_dir(self, drva: DrvaSpec) -> Path:
        return self.state_dir / "drvas" / drva.name

    def drva_config_doc(self, drva: DrvaSpec, domains: list[str], takeover: Collection[str] = ()) -> dict[str, Any]:
        """The ``drva.config`` document of ``drva`` serving the protected ``domains``
        (absolute paths, so it can live anywhere); those in ``takeover`` are being failed
        over to this site (the DRVA waits for the fork instead of being fenced). A domain
        that lives in another store than the site's own (``store_url_for``) names it; the
        document is then of version 2 (FORMAT.md §13.4), otherwise it is as before."""
        doms = []
        for name in domains:
            spec = self.domain(name)
            if self.drva_of(spec).name != drva.name:  # by name: the site may have been reloaded
                raise ConfigError(f"domain {name} streams to {spec.drva}, not to DRVA {drva.name}")
            doms.append({"id": spec.id, "name": spec.name, "disks": [
                {"vm": d.vm.name, "name": d.disk.name, "size": d.disk.size} for d in spec.disks]})
            if (store := self.store_url_for(name)) != self.store_url:
                doms[-1]["store"] = store
            if name in takeover:
                doms[-1]["takeover"] = True
        doc: dict[str, Any] = {}
        if any("store" in d for d in doms):  # a reader of version 1 would ship them to "store"
            doc["version"] = DRVA_DOMAIN_STORES_VERSION
        doc |= {
            "name": drva.name, "site": self.site, "listen": str(drva.listen),
            "state_dir": str(self.drva_state_dir(drva)), "store": self.store_url,
            "secret_env": self.secret_env,
            "log": {"path": str(drva.log_path), "size": drva.log_size},
            "meta": {"path": str(drva.meta_path)},
            "domains": doms,
        }
        if self.tls is not None:
            stem = self.tls.drva_stem(drva)
            doc["tls"] = {"cert": str(self.tls.files.cert(stem)), "key": str(self.tls.files.key(stem))}
        if drva.seal_bytes is not None or drva.seal_age_s is not None:
            doc["seal"] = {k: v for k, v in (("bytes", drva.seal_bytes), ("age_s", drva.seal_age_s))
                           if v is not None}
        if drva.upload_concurrency is not None:
            doc["upload"] = {"concurrency": drva.upload_concurrency}
        return doc


def _secret(env: Mapping[str, str], name: str, what: str, source: Path) -> str:
    value = env.get(name, "")
    if len(value) < SECRET_MIN_CHARS:
        raise ConfigError(f"{source}: environment variable {name} must hold {what} "
                          f"(at least {SECRET_MIN_CHARS} characters); it is "
                          f"{'unset' if name not in env else 'too short'}")
    return value


def policy_value(key: str, value: Any) -> float:
    """Seconds of policy key ``key`` (``POLICY_LIMITS``); ``ConfigError`` saying what was
    expected (without a location: the caller adds the file and key, or the field)."""
    lo, hi, is_duration = POLICY_LIMITS[key]
    what = "a duration (seconds, or e.g. '15m', '72h', '7d')" if is_duration else "a number of seconds"
    expected = f"{what} in {lo:g}..{hi:g} s"
    try:
        seconds = parse_duration(value, key) if is_duration else _plain_number(value)
    except (ConfigError, OverflowError):
        raise ConfigError(f"expected {expected}, got {_quoted(value)}") from None
    if not lo <= seconds <= hi:  # also refuses NaN
        raise ConfigError(f"expected {expected}, got {_quoted(value)}")
    return seconds


def _plain_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError("not a number")
    return float(value)


def _quoted(value: Any, limit: int = SHOWN_CHARS_MAX) -> str:
    """``value`` as it may appear in a message: its repr, cut to ``limit`` characters (a
    value from a file or a request can be a megabyte long)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _policy(r: TomlReader, table: Mapping[str, Any], path: str, base: Policy) -> Policy:
    def get(key: str, default: float) -> float:
        if key not in table:
            return default
        try:
            return policy_value(key, table[key])
        except ConfigError as exc:
            raise ConfigError(f"{r.source}: {path}.{key}: {exc.message}") from None

    return Policy(get("retention", base.retention_s), get("rpo_target_s", base.rpo_target_s),
                  get("consolidate_after", base.consolidate_after_s),
                  get("consolidate_every", base.consolidate_every_s))


def load_site_config(path: str | os.PathLike[str]) -> SiteConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the site file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_site_config(data, path)


def parse_site_config(data: Mapping[str, Any], path: Path) -> SiteConfig:
    r = TomlReader(str(path))
    here = path.resolve().parent
    r.table(data, "", {"site", "cluster", "store", "drvas"},
            {"state_dir", "secret_env", "api", "defaults", "protect", "alarms", "jobs", "recovery_roots",
             "hypervisor", "peer", "standby", "tls"})
    site = r.name(data["site"], "site")
    cluster_path = here / r.file_path(data["cluster"], "cluster")
    store_url = _store_url(r, data["store"], "store", here)
    state_dir = r.file_path(data.get("state_dir", "state"), "state_dir")
    if (blocker := blocking_file(here / state_dir)) is not None:
        raise ConfigError(f"{path}: state_dir: expected a directory (or a path where one can be made), got "
                          f"{state_dir!r}: {blocker!r} is a regular file")
    cluster, isolated, registered = _inventory(cluster_path, here / state_dir, site)
    _check_domain_ids(cluster, cluster_path)
    secret_env = data.get("secret_env", "CDP_SITE_SECRET")
    if not isinstance(secret_env, str) or not secret_env:
        r.fail("secret_env", "an environment variable name", secret_env)
    api = r.table(data.get("api", {}), "api", set(), {"listen", "token_env"})
    token_env = api.get("token_env", "CDP_API_TOKEN")
    if not isinstance(token_env, str) or not token_env:
        r.fail("api.token_env", "an environment variable name", token_env)
    if token_env == secret_env:  # every host holds the secret: it would drive the API too
        r.fail("api.token_env", f"a variable other than secret_env ({secret_env}): the filters' handshake "
                                f"secret, which every host holds, must not also be the API's token", token_env)
    drvas = _drvas(r, data["drvas"], here)
    defaults = _policy(r, r.table(data.get("defaults", {}), "defaults", set(), _POLICY_KEYS), "defaults",
                       Policy())
    protect: dict[str, Policy] = {}
    for i, p in enumerate(r.list(data.get("protect", []), "protect", nonempty=False)):
        at = f"protect[{i}]"
        r.table(p, at, {"domain"}, _POLICY_KEYS)
        name = r.name(p["domain"], f"{at}.domain")
        if name in protect:
            r.fail(f"{at}.domain", "a domain not listed twice", name)
        if name not in {d.name for d in cluster.domains}:
            r.fail(f"{at}.domain", f"a domain of {cluster_path.name} "
                   f"({', '.join(d.name for d in cluster.domains) or 'none'})", name)
        protect[name] = _policy(r, p, at, defaults)
    alarms_t = r.table(data.get("alarms", {}), "alarms", set(), {"log_usage_pct", "backpressure_s"})
    alarms = Alarms(r.number(alarms_t.get("log_usage_pct", 90), "alarms.log_usage_pct", 1, 100),
                    r.number(alarms_t.get("backpressure_s", 300), "alarms.backpressure_s", 1, 86400))
    jobs = r.table(data.get("jobs", {}), "jobs", set(), {"retention_days"})
    retention_days = r.number(jobs.get("retention_days", 60), "jobs.retention_days", 1, 3650)
    recovery_roots = []
    for i, root in enumerate(r.list(data.get("recovery_roots", []), "recovery_roots", nonempty=False)):
        recovery_roots.append(here / r.file_path(root, f"recovery_roots[{i}]"))
    hypervisor = parse_hypervisor(r, data.get("hypervisor", {}))
    peer = None
    if "peer" in data:
        p = r.table(data["peer"], "peer", {"site", "api"}, {"token_env", "store", "ca"})
        peer_name = r.name(p["site"], "peer.site")
        if peer_name == site:
            r.fail("peer.site", "another site's name", peer_name)
        peer_token_env = p.get("token_env", "CDP_PEER_TOKEN")
        if not isinstance(peer_token_env, str) or not peer_token_env:
            r.fail("peer.token_env", "an environment variable name", peer_token_env)
        if peer_token_env in (secret_env, token_env):  # a secret of this site sent to the peer
            r.fail("peer.token_env", f"a variable other than secret_env ({secret_env}) and api.token_env "
                                     f"({token_env}): the peer's token is sent to the peer", peer_token_env)
        if "ca" in p:
            r.file_path(p["ca"], "peer.ca")
        peer = PeerSpec(peer_name, r.endpoint(p["api"], "peer.api"), peer_token_env,
                        _store_url(r, p["store"], "peer.store", here) if "store" in p else None,
                        here / p["ca"] if "ca" in p else None)
    standby: list[StandbySpec] = []
    for i, sb in enumerate(r.list(data.get("standby", []), "standby", nonempty=False)):
        at = f"standby[{i}]"
        r.table(sb, at, {"domain"}, {"mode", "interval_s"})
        name = r.name(sb["domain"], f"{at}.domain")
        r.unique(name, {x.domain for x in standby}, f"{at}.domain", "standby domain")
        mode = sb.get("mode", "continuous")
        if mode not in STANDBY_MODES:
            r.fail(f"{at}.mode", f"one of {', '.join(STANDBY_MODES)} (without an entry a failover is cold)", mode)
        standby.append(StandbySpec(name, mode, r.number(sb.get("interval_s", 0.5), f"{at}.interval_s", 0.05, 60)))
    own = frozenset(d.name for d in cluster.domains) - registered
    cfg = SiteConfig(path.resolve(), site, cluster, cluster_path, store_url,
                     here / state_dir, secret_env,
                     r.endpoint(api.get("listen", DEFAULT_API), "api.listen"), token_env, drvas, defaults,
                     protect, alarms, retention_days * 86400, tuple(recovery_roots), hypervisor, peer, isolated,
                     tuple(standby), own, parse_tls(r, data.get("tls", {}), here, here / state_dir))
    for name in protect:  # every protected domain has a DRVA here
        spec = cluster.domain(name)
        if not any(d.listen == spec.drva for d in drvas):
            r.fail(f"protect[{list(protect).index(name)}].domain",
                   f"a domain whose DRVA ({spec.drva}, from {cluster_path.name}) is one of the [[drvas]]", name)
    check_places(cfg)
    _check_drva_configs(cfg)
    return cfg


def _inventory(cluster_path: Path, state_dir: Path, site: str) -> tuple[Cluster, frozenset[str], frozenset[str]]:
    """The operator's inventory with what this site's MSA registered (``cdp.msa.registry``),
    checked together — a clash names both files —, the registered domains that run
    isolated (a test failover's) and the names of all the registered domains."""
    from cdp.msa.registry import load_registry, merged, registered_domains, registry_path

    try:
        data = tomllib.loads(cluster_path.read_text())
    except OSError as exc:
        raise ConfigError(f"{cluster_path}: cannot read the cluster file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{cluster_path}: not valid TOML: {exc}") from exc
    registry = load_registry(state_dir, site)
    if not (registry["hosts"] or registry["vms"] or registry["domains"]):
        return parse_cluster(data, str(cluster_path), base_dir=cluster_path.parent), frozenset(), frozenset()
    source = f"{cluster_path} with {registry_path(state_dir)}"
    return (parse_cluster(merged(data, registry), source, base_dir=cluster_path.parent),
            frozenset(registry["isolated"]), frozenset(registered_domains(registry)))


def _store_url(r: TomlReader, value: Any, key: str, here: Path) -> str:
    """The store URL of key ``key`` (a plain path is a file store relative to ``here``),
    refused by its form (``check_store_url``) with the file and the key; the message
    quotes the URL redacted (``open_store``'s words): never a secret."""
    expected = ("a store URL or path (file:///…, s3://bucket/prefix, azure://container/prefix; "
                "credentials only from the environment)")
    if not isinstance(value, str) or not value:
        r.fail(key, expected, value)
    url = config_store_url(value, here)
    try:
        check_store_url(url)
    except ConfigError as exc:
        raise ConfigError(f"{r.source}: {key}: expected {expected}: {exc.message}") from None
    return url


def _check_domain_ids(cluster: Cluster, cluster_path: Path) -> None:
    """The cluster file allows any u32; a DRVA serves none of them outside its range
    (0 is no domain), so a site that names one would restart its DRVA for ever."""
    lo, hi = DOMAIN_ID_RANGE
    for i, spec in enumerate(cluster.domains):
        if not lo <= spec.id <= hi:
            raise ConfigError(f"{cluster_path}: domains[{i}].id: expected an integer in {lo}..{hi} "
                              f"(a DRVA serves no domain {spec.id}), got {spec.id}")


def _check_drva_configs(cfg: SiteConfig) -> None:
    """Each DRVA's configuration as the MSA would write it (serving every domain that
    streams to it), read by the DRVA's own reader: whatever a DRVA would refuse at start
    is refused here, when the site file is loaded, by every verb (preflight and install
    alike). The checks above name the site file's keys; this is the net under them."""
    secret = {cfg.secret_env: "x" * SECRET_MIN_CHARS}  # the value is checked elsewhere
    for i, drva in enumerate(cfg.drvas):
        domains = [d.name for d in cfg.cluster.domains if d.drva == drva.listen]
        doc = cfg.drva_config_doc(drva, domains)
        doc.pop("tls", None)  # its files are made by install (cdp.pki), and checked by the DRVA at start
        try:
            parse_drva_config(doc, f"drvas/{drva.name}.toml", secret, base_dir=cfg.state_dir)
        except ConfigError as exc:
            raise ConfigError(f"{cfg.path}: drvas[{i}]: DRVA {drva.name} would refuse the configuration "
                              f"the MSA writes for it: {exc.message}") from None


def _check_drva_name(r: TomlReader, name: str, at: str) -> None:
    """Refuse a DRVA name whose files would be another's: ``logs/<name>.log`` and
    ``.pid`` are a simulated host's (``host-<host>``) or a standby's (``standby-<domain>``)
    for a name with their prefix — each keeper would stop the other's process as its own
    leftover (FORMAT.md §13.13) —, and ``drvas/<name>.toml`` is DRVA ``<name>``'s
    configuration for a name ending ``.toml`` — DRVA ``d1``'s file would be DRVA
    ``d1.toml``'s state directory. Refused rather than the files renamed: installed
    sites keep their paths."""
    prefix = next((p for p in CHILD_LOG_PREFIXES if name.startswith(p)), None)
    if prefix is not None:
        owner = "a simulated host's" if prefix == "host-" else "a standby's"
        r.fail(at, f"a DRVA name not beginning {prefix!r}: logs/{name}.log and logs/{name}.pid would be "
                   f"{owner} ({prefix}<name>) as well as the DRVA's", name)
    if name.endswith(DRVA_CONFIG_SUFFIX):
        r.fail(at, f"a DRVA name not ending {DRVA_CONFIG_SUFFIX!r}: drvas/{name} would be this DRVA's state "
                   f"directory and the configuration file of a DRVA named {name[:-len(DRVA_CONFIG_SUFFIX)]!r}",
               name)


def _drvas(r: TomlReader, value: Any, here: Path) -> tuple[DrvaSpec, ...]:
    out: list[DrvaSpec] = []
    names: set[str] = set()
    endpoints: set[Endpoint] = set()
    partitions: dict[str, str] = {}  # normalised path -> the key that named it (links: preflight resolves)
    for i, d in enumerate(r.list(value, "drvas", nonempty=True)):
        at = f"drvas[{i}]"
        r.table(d, at, {"name", "listen", "log", "meta"}, {"seal", "upload_concurrency"})
        name = r.name(d["name"], f"{at}.name")
        r.unique(name, names, f"{at}.name", "DRVA")
        _check_drva_name(r, name, f"{at}.name")
        listen = r.endpoint(d["listen"], f"{at}.listen")
        if listen in endpoints:
            r.fail(f"{at}.listen", "an endpoint no other DRVA listens on", str(listen))
        endpoints.add(listen)
        log = r.table(d["log"], f"{at}.log", {"path", "size"}, set())
        meta = r.table(d["meta"], f"{at}.meta", {"path"}, set())
        seal = r.table(d.get("seal", {}), f"{at}.seal", set(), {"bytes", "age_s"})
        for key, tbl in (("log.path", log), ("meta.path", meta)):
            r.file_path(tbl["path"], f"{at}.{key}")
            where = os.path.normpath(here / tbl["path"])
            if where in partitions:  # two writers of one partition: the second would find the first's
                r.fail(f"{at}.{key}", f"a path no other partition uses ({partitions[where]} is there)", tbl["path"])
            partitions[where] = f"{at}.{key}"
            if (blocker := blocking_file((here / tbl["path"]).parent)) is not None:
                raise ConfigError(f"{r.source}: {at}.{key}: expected a file path whose directories exist or can "
                                  f"be made, got {tbl['path']!r}: {blocker!r} is a regular file")
        upload = d.get("upload_concurrency")
        out.append(DrvaSpec(
            name, listen, here / log["path"], r.size(log["size"], f"{at}.log.size", LOG_SIZE_MIN),
            here / meta["path"],
            r.size(seal["bytes"], f"{at}.seal.bytes", *SEAL_BYTES_RANGE) if "bytes" in seal else None,
            r.number(seal["age_s"], f"{at}.seal.age_s", *SEAL_AGE_S_RANGE) if "age_s" in seal else None,
            r.integer(upload, f"{at}.upload_concurrency", *UPLOAD_CONCURRENCY_RANGE)
            if upload is not None else None))
    return tuple(out)
