"""The site file (cdp/msa/config.py): the example loads; a bad file is refused with the
file, the key path and what was expected; secrets come from the environment only."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdp.errors import ConfigError
from cdp.msa.config import load_site_config

ROOT = Path(__file__).resolve().parents[2]

CLUSTER = """\
site = "site-c"
[[hosts]]
name = "esx-01"
[[vms]]
name = "db"
host = "esx-01"
disks = [{ name = "disk0", size = "1MiB" }]
[[vms]]
name = "app"
host = "esx-01"
disks = [{ name = "disk0", size = "1MiB" }]
[[domains]]
name = "erp"
id = 1
drva = "127.0.0.1:32873"
vms = ["db"]
[[domains]]
name = "stray"
id = 2
drva = "127.0.0.1:32999"
vms = ["app"]
"""

SITE = """\
site = "site-c"
cluster = "cluster.toml"
store = "store"

[[drvas]]
name = "drva-1"
listen = "127.0.0.1:32873"
log = { path = "state/drva-1/replog", size = "8MiB" }
meta = { path = "state/drva-1/meta" }

[[drvas]]
name = "drva-2"
listen = "127.0.0.1:32874"
log = { path = "state/drva-2/replog", size = "8MiB" }
meta = { path = "state/drva-2/meta" }

[defaults]
retention = "72h"

[[protect]]
domain = "erp"
"""


def write_site(tmp_path: Path, site: str = SITE) -> Path:
    (tmp_path / "cluster.toml").write_text(CLUSTER)
    path = tmp_path / "site.toml"
    path.write_text(site)
    return path


def test_the_example_site_loads() -> None:
    cfg = load_site_config(ROOT / "examples" / "site.toml")
    assert cfg.site == "site-a" and cfg.cluster.site == "site-a"
    assert [(d.name, d.listen.port) for d in cfg.drvas] == [("drva-1", 32873), ("drva-2", 32874)]
    assert list(cfg.protect) == ["erp", "web", "files"]
    assert cfg.policy("erp").rpo_target_s == 30 and cfg.policy("erp").retention_s == 72 * 3600
    assert cfg.policy("files").retention_s == 24 * 3600
    assert cfg.store_url == f"file://{(ROOT / 'examples' / 'sim-store').resolve()}"
    assert cfg.drva_of(cfg.domain("files")).name == "drva-2"
    doc = cfg.drva_config_doc(cfg.drva("drva-1"), ["erp", "web"])
    assert [d["name"] for d in doc["domains"]] == ["erp", "web"]
    assert doc["secret_env"] == "CDP_SITE_SECRET" and "secret" not in doc
    assert cfg.jobs_retention_s == 60 * 86400


def test_the_example_recovery_site_loads_beside_site_a() -> None:
    a = load_site_config(ROOT / "examples" / "site.toml")
    b = load_site_config(ROOT / "examples" / "site-b.toml")
    assert b.site == "site-b" and b.store_url == a.store_url  # one store, two sites
    assert [h.name for h in b.cluster.hosts] == ["esx-b01"] and [d.name for d in b.cluster.domains] == ["crm"]
    assert list(b.protect) == ["crm"] and b.drva_of(b.domain("crm")).name == "drva-b1"  # both ways
    assert not {d.id for d in a.cluster.domains} & {d.id for d in b.cluster.domains}  # one store
    assert a.hypervisor.on_demand_hosts == ("esx-03",) and a.peer is not None and a.peer.site == b.site
    assert b.hypervisor.on_demand_hosts == ("esx-b02", "esx-b03") and b.hypervisor.vms_per_host == 2
    assert b.peer is not None and (b.peer.site, b.peer.api) == (a.site, a.api_listen)
    assert [(s.domain, s.mode) for s in b.standby] == [("erp", "continuous")]
    ports = {d.listen.port for d in a.drvas} | {a.api_listen.port}
    assert not ports & ({d.listen.port for d in b.drvas} | {b.api_listen.port})  # both run on one machine
    assert b.state_dir != a.state_dir and b.cluster.state_dir != a.cluster.state_dir


def test_hypervisor_keys_are_checked(tmp_path: Path) -> None:
    for table, key in (({"driver": "vmware"}, "hypervisor.driver"),
                       ({"vms_per_host": 0}, "hypervisor.vms_per_host"),
                       ({"on_demand_hosts": ["a b"]}, "hypervisor.on_demand_hosts[0]"),
                       ({"recovered_workload": {"rate_mb_s": 1}}, "hypervisor.recovered_workload"),
                       ({"nbd_listen": "127.0.0.1:0"}, "hypervisor.nbd_listen"),  # the simulator serves no NBD
                       ({"driver": "nbd", "nbd_listen": "127.0.0.1"}, "hypervisor.nbd_listen"),
                       ({"driver": "nbd", "nbd_listen": 10809}, "hypervisor.nbd_listen"),
                       ({"driver": "nbd", "nbd_listen": "unix:/tmp/x.sock"}, "hypervisor.nbd_listen"),
                       ({"surprise": 1}, "hypervisor")):
        path = write_site(tmp_path)
        path.write_text(path.read_text() + "\n[hypervisor]\n" + "".join(
            f"{k} = {_toml(v)}\n" for k, v in table.items()))
        with pytest.raises(ConfigError) as err:
            load_site_config(path)
        assert err.value.message.startswith(f"{path}: {key}"), err.value.message


def test_peer_and_standby_keys_are_checked(tmp_path: Path) -> None:
    for text, key in (('[peer]\nsite = "site-c"\napi = "127.0.0.1:1"\n', "peer.site"),
                      ('[peer]\nsite = "site-o"\napi = "nowhere"\n', "peer.api"),
                      ('[peer]\nsite = "site-o"\n', "peer"),
                      ('[[standby]]\ndomain = "erp"\nmode = "cold"\n', "standby[0].mode"),
                      ('[[standby]]\ndomain = "erp"\ninterval_s = 0\n', "standby[0].interval_s"),
                      ('[[standby]]\ndomain = "../x"\n', "standby[0].domain"),
                      ('[[standby]]\ndomain = "erp"\n[[standby]]\ndomain = "erp"\n', "standby[1].domain")):
        path = write_site(tmp_path)
        path.write_text(path.read_text() + "\n" + text)
        with pytest.raises(ConfigError) as err:
            load_site_config(path)
        assert err.value.message.startswith(f"{path}: {key}"), err.value.message


def _toml(value: object) -> str:
    import tomli_w

    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def test_the_minimal_site_loads(tmp_path: Path) -> None:
    cfg = load_site_config(write_site(tmp_path))
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.secret_env == "CDP_SITE_SECRET" and cfg.token_env == "CDP_API_TOKEN"
    assert str(cfg.api_listen) == "127.0.0.1:32880"


BAD_SITES = [
    # (what, change to the text, key path in the message, words of what was expected)
    ("unknown key", lambda s: 'colour = "blue"\n' + s, "colour", "unknown key"),
    ("unknown key in a DRVA", lambda s: s.replace('meta = { path = "state/drva-2/meta" }',
                                                  'meta = { path = "state/drva-2/meta" }\nlgo = 1'),
     "drvas[1].lgo", "unknown key"),
    ("missing key", lambda s: s.replace('store = "store"\n', ""), "store", "expected a store URL or path"),
    ("bad listen", lambda s: s.replace('listen = "127.0.0.1:32874"', 'listen = "localhost"'),
     "drvas[1].listen", "expected 'host:port'"),
    ("port out of range", lambda s: s.replace('listen = "127.0.0.1:32874"', 'listen = "127.0.0.1:70000"'),
     "drvas[1].listen", "port in 1..65535"),
    ("duplicate DRVA name", lambda s: s.replace('name = "drva-2"', 'name = "drva-1"'),
     "drvas[1].name", "a DRVA name not used before"),
    ("duplicate DRVA port", lambda s: s.replace('listen = "127.0.0.1:32874"', 'listen = "127.0.0.1:32873"'),
     "drvas[1].listen", "an endpoint no other DRVA listens on"),
    ("protect of an unknown domain", lambda s: s.replace('domain = "erp"', 'domain = "payroll"'),
     "protect[0].domain", "a domain of cluster.toml (erp, stray)"),
    ("a domain whose DRVA is not in [[drvas]]", lambda s: s.replace('domain = "erp"', 'domain = "stray"'),
     "protect[0].domain", "a domain whose DRVA (127.0.0.1:32999, from cluster.toml) is one of the [[drvas]]"),
    ("bad duration", lambda s: s.replace('retention = "72h"', 'retention = "3 fortnights"'),
     "defaults.retention", "a duration"),
    ("bad log size", lambda s: s.replace('size = "8MiB" }\nmeta = { path = "state/drva-2/meta" }',
                                         'size = "8MB" }\nmeta = { path = "state/drva-2/meta" }'),
     "drvas[1].log.size", "a number and a unit B, K/KiB, M/MiB, G/GiB or T/TiB"),
    ("log size not a multiple of 512", lambda s: s.replace('size = "8MiB" }\nmeta = { path = "state/drva-2/meta" }',
                                                           'size = 8388609 }\nmeta = { path = "state/drva-2/meta" }'),
     "drvas[1].log.size", "a size that is a multiple of 512"),
    ("a seal the DRVA refuses", lambda s: s.replace('meta = { path = "state/drva-2/meta" }',
                                                    'meta = { path = "state/drva-2/meta" }\nseal = { bytes = 4096 }'),
     "drvas[1].seal.bytes", "at least 1048576 bytes"),
    ("a DRVA named ..", lambda s: s.replace('name = "drva-2"', 'name = ".."'), "drvas[1].name", "not '.' or '..'"),
    ("empty drvas", lambda s: s.split("[[drvas]]")[0] + "drvas = []\n", "drvas", "a non-empty list"),
    # A review's hostile site files: each used to load (or end in a traceback).
    ("two DRVAs on one metadata repository", lambda s: s.replace('path = "state/drva-2/meta"', 'path = "state/drva-1/meta"'),
     "drvas[1].meta.path", "a path no other partition uses (drvas[0].meta.path is there)"),
    ("a log on another's metadata", lambda s: s.replace('path = "state/drva-2/replog"', 'path = "state/./drva-1/meta"'),
     "drvas[1].log.path", "a path no other partition uses (drvas[0].meta.path is there)"),
    ("the API token in the filters' secret", lambda s: s.replace('store = "store"\n', 'store = "store"\nsecret_env = "SHARED"\n'
                                                                     '[api]\ntoken_env = "SHARED"\n'),
     "api.token_env", "a variable other than secret_env (SHARED)"),
    ("a NUL in state_dir", lambda s: 'state_dir = "st\\u0000ate"\n' + s, "state_dir", "without NUL"),
    ("a NUL in a log path", lambda s: s.replace('path = "state/drva-2/replog"', 'path = "state/drva-2/re\\u0000plog"'),
     "drvas[1].log.path", "without NUL"),
    ("a path longer than PATH_MAX", lambda s: s.replace('path = "state/drva-2/replog"', 'path = "' + "a/" * 3000 + 'x"'),
     "drvas[1].log.path", "at most 4095 bytes"),
]


@pytest.mark.parametrize("what,change,key,expected", BAD_SITES, ids=[b[0] for b in BAD_SITES])
def test_a_bad_site_file_is_refused(tmp_path: Path, what: str, change, key: str, expected: str) -> None:
    path = write_site(tmp_path, change(SITE))
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    message = err.value.message
    assert message.startswith(f"{path}: {key}: "), message
    assert expected in message, message
    assert err.value.exit_code == 2


def test_a_file_that_is_not_toml_or_missing_is_named(tmp_path: Path) -> None:
    path = write_site(tmp_path, "site = \n")
    with pytest.raises(ConfigError, match=f"{path}: not valid TOML"):
        load_site_config(path)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nope.toml'}: cannot read the site file"):
        load_site_config(tmp_path / "nope.toml")


def test_a_bad_cluster_file_is_named(tmp_path: Path) -> None:
    path = write_site(tmp_path)
    (tmp_path / "cluster.toml").write_text(CLUSTER.replace('host = "esx-01"\ndisks', 'host = "esx-09"\ndisks', 1))
    with pytest.raises(ConfigError, match=r"cluster.toml: vms\[0\].host: expected one of the hosts"):
        load_site_config(path)


def test_secrets_come_from_the_environment_and_are_never_shown(tmp_path: Path) -> None:
    cfg = load_site_config(write_site(tmp_path))
    with pytest.raises(ConfigError) as err:
        cfg.secret({})
    assert "CDP_SITE_SECRET" in err.value.message and "unset" in err.value.message
    short = "tiny-secret"
    with pytest.raises(ConfigError) as err:
        cfg.api_token({"CDP_API_TOKEN": short})
    assert "CDP_API_TOKEN" in err.value.message and "too short" in err.value.message
    assert short not in err.value.message
    good = "a-long-enough-secret-value"
    assert cfg.secret({"CDP_SITE_SECRET": good}) == good.encode()
    assert cfg.api_token({"CDP_API_TOKEN": good}) == good


def test_secret_variable_names_are_configurable(tmp_path: Path) -> None:
    site = SITE.replace('store = "store"\n', 'store = "store"\nsecret_env = "MY_SECRET"\n'
                                             '[api]\ntoken_env = "MY_TOKEN"\n')
    cfg = load_site_config(write_site(tmp_path, site))
    with pytest.raises(ConfigError, match="MY_SECRET"):
        cfg.secret({"CDP_SITE_SECRET": "x" * 32})
    assert cfg.api_token({"MY_TOKEN": "y" * 16}) == "y" * 16


def test_child_processes_get_neither_api_token(tmp_path: Path) -> None:
    path = write_site(tmp_path)
    path.write_text(path.read_text() + '\n[peer]\nsite = "site-o"\napi = "127.0.0.1:1"\ntoken_env = "PEER_T"\n')
    cfg = load_site_config(path)
    env = {"CDP_API_TOKEN": "a" * 20, "PEER_T": "b" * 20, "CDP_SITE_SECRET": "s" * 20, "PATH": "/bin"}
    assert cfg.child_env(env) == {"CDP_SITE_SECRET": "s" * 20, "PATH": "/bin"}


# ---------------------------------------------------------------------- one store per direction

PEER = '\n[peer]\nsite = "site-o"\napi = "127.0.0.1:1"\n'
HIDDEN = "hunter2-SECRET"  # in a bad URL: never in a message


def _with_failed_over_domain(tmp_path: Path, peer: str) -> Path:
    """The minimal site with ``peer`` appended and domain ``crm`` (id 7) registered, as a
    failover of the peer's domain registers it (``cdp.msa.registry``)."""
    from cdp import site_files
    from cdp.msa import registry

    path = write_site(tmp_path)
    path.write_text(path.read_text() + peer)
    doc = registry.with_domain(registry.empty("site-c"), site_files.domain("crm", 7, "127.0.0.1:32873", ["crm-1"]),
                               [site_files.vm("crm-1", "esx-01", [("disk0", "1MiB", "crm/crm-1-disk0.img")])], [])
    registry.save_registry(tmp_path / "state", doc)
    return path


def test_a_domain_lives_in_this_sites_store_if_its_own_else_in_the_peers(tmp_path: Path) -> None:
    path = _with_failed_over_domain(tmp_path, PEER + 'store = "../peer-store"\n')
    cfg = load_site_config(path)
    own, peers = f"file://{tmp_path / 'store'}", f"file://{(tmp_path / '..' / 'peer-store').resolve()}"
    assert cfg.store_url == own and cfg.peer is not None and cfg.peer.store_url == peers
    assert cfg.own_domains == {"erp", "stray"}
    assert [cfg.store_url_for(d) for d in ("erp", "stray", "crm", "unknown")] == [own, own, peers, peers]
    assert cfg.store_urls() == (own, peers)
    doc = cfg.drva_config_doc(cfg.drva("drva-1"), ["erp", "crm"])
    assert doc["version"] == 2 and doc["store"] == own  # the default: this site's own domains
    assert ["store" in d for d in doc["domains"]] == [False, True] and doc["domains"][1]["store"] == peers


def test_without_a_peer_store_every_domain_lives_in_the_sites_store(tmp_path: Path) -> None:
    for peer in ("", PEER):
        cfg = load_site_config(_with_failed_over_domain(tmp_path, peer))
        assert {cfg.store_url_for(d) for d in ("erp", "crm", "unknown")} == {cfg.store_url}
        assert cfg.store_urls() == (cfg.store_url,)
        doc = cfg.drva_config_doc(cfg.drva("drva-1"), ["erp", "crm"])
        assert "version" not in doc and not any("store" in d for d in doc["domains"])  # as before two stores


BAD_STORES = [
    # (the key's TOML value, words of the message)
    ('""', "expected a store URL or path"),
    ("42", "expected a store URL or path"),
    ('"ftp://host/x"', "unknown scheme 'ftp'"),
    ('"file://otherhost/x"', "expected file:///absolute/path"),
    ('"s3://"', "no bucket"),
    (f'"s3://AKID:{HIDDEN}@bucket/x"', "credentials in the URL are refused"),
    (f'"s3://bucket/x?secret_key={HIDDEN}"', "unknown query parameter(s) secret_key"),
    ('"azure://cont?endpoint=x"', "azure URLs take no query parameters"),
]


@pytest.mark.parametrize("key", ["peer.store", "store"])
@pytest.mark.parametrize("value,expected", BAD_STORES, ids=[b[0] for b in BAD_STORES])
def test_a_bad_store_is_refused_with_the_file_and_the_key(tmp_path: Path, key: str, value: str,
                                                          expected: str) -> None:
    text = SITE + PEER + f"store = {value}\n" if key == "peer.store" else SITE.replace('"store"', value, 1)
    path = write_site(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    message = err.value.message
    assert message.startswith(f"{path}: {key}: expected a store URL or path"), message
    assert expected in message and HIDDEN not in message and HIDDEN not in repr(err.value), message


def test_the_examples_with_one_store_per_direction_load(tmp_path: Path) -> None:
    """The commented ``[peer] store`` lines of the examples, switched on as the README says
    (``Both ways at once``): each site's own domains in its store, the peer's in the other."""
    examples = ROOT / "examples"
    a = (examples / "site.toml").read_text().replace('# store = "sim-store-b"', 'store = "sim-store-b"')
    b = (examples / "site-b.toml").read_text()
    b = b.replace('\nstore = "sim-store" ', '\n# store = "sim-store" ').replace(
        '# store = "sim-store-b"', 'store = "sim-store-b"').replace(
        '# store = "sim-store"          # one store', 'store = "sim-store"          # one store')
    for name, text in (("site.toml", a), ("site-b.toml", b), ("cluster.toml", None), ("cluster-b.toml", None)):
        (tmp_path / name).write_text(text if text is not None else (examples / name).read_text())
    site_a, site_b = load_site_config(tmp_path / "site.toml"), load_site_config(tmp_path / "site-b.toml")
    sa, sb = f"file://{tmp_path / 'sim-store'}", f"file://{tmp_path / 'sim-store-b'}"
    assert (site_a.store_url, site_a.store_urls()) == (sa, (sa, sb))
    assert (site_b.store_url, site_b.store_urls()) == (sb, (sb, sa))
    assert site_a.store_url_for("erp") == site_b.store_url_for("erp") == sa  # erp's for its whole life
    assert site_a.store_url_for("crm") == site_b.store_url_for("crm") == sb


def test_a_long_value_is_cut_short_in_the_message(tmp_path: Path) -> None:
    """A 100 KB name made a 100 KB error: a quoted value is at most 80 characters."""
    path = write_site(tmp_path, SITE.replace('name = "drva-2"', 'name = "' + "x" * 100_000 + '"'))
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    assert len(err.value.message) < 400 and "(100002 characters)" in err.value.message, err.value.message
