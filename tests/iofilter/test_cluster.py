"""Cluster files: the example loads; every rule is refused naming the file and key path."""

from __future__ import annotations

import copy
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pytest

from cdp.errors import ConfigError
from cdp.tomlread import Endpoint
from iofilter_sim.cluster import domain_workload, load_cluster, parse_cluster

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster.toml"
MiB = 1 << 20


def test_example_parses() -> None:
    c = load_cluster(EXAMPLE)
    assert c.site == "site-a"
    assert [h.name for h in c.hosts] == ["esx-01", "esx-02"]
    assert len(c.vms) == 5 and len(c.domains) == 3
    assert c.drvas == (Endpoint("127.0.0.1", 32873), Endpoint("127.0.0.1", 32874))
    assert [d.name for d in c.domains_of(Endpoint("127.0.0.1", 32873))] == ["erp", "web"]
    assert c.state_dir == EXAMPLE.parent / "sim-state"
    erp = c.domain("erp")
    assert erp.id == 1 and str(erp.drva) == "127.0.0.1:32873"
    assert [(i, vm.name, d.name) for i, vm, d in erp.disks] == [
        (0, "erp-db", "data"), (1, "erp-db", "log"), (2, "erp-app", "disk0")]
    assert erp.disk_sizes == (64 * MiB, 32 * MiB, 64 * MiB)
    assert erp.disks[1].disk.image == c.state_dir / "erp-db-log.img"
    assert c.vm("files").host == "esx-02"
    assert c.host("esx-01").vms == ("erp-db", "web-1")
    for domain in c.domains:
        batch = domain_workload(domain).next_batch(64, 4 * MiB)
        assert batch.count > 0 and int(batch.disk.max()) < len(domain.disks)


def test_state_dir_override_and_image_paths(tmp_path: Path) -> None:
    c = load_cluster(EXAMPLE, state_dir=tmp_path)
    assert c.state_dir == tmp_path
    assert c.vm("web-1").disks[0].image == tmp_path / "web-1-disk0.img"
    with pytest.raises(ConfigError, match="no domain named 'nope'"):
        c.domain("nope")


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.toml: cannot read"):
        load_cluster(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("site = \n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_cluster(bad)


def _base() -> dict[str, Any]:
    return {
        "site": "s1",
        "hosts": [{"name": "h1"}, {"name": "h2"}],
        "vms": [
            {"name": "a", "host": "h1", "disks": [{"name": "d0", "size": "1MiB"},
                                                  {"name": "d1", "size": 4096}]},
            {"name": "b", "host": "h2", "disks": [{"name": "d0", "size": "64KiB"}]},
            {"name": "c", "host": "h2", "disks": [{"name": "d0", "size": 512}]},
        ],
        "domains": [
            {"name": "p", "id": 1, "drva": "127.0.0.1:32873", "vms": ["a", "b"],
             "workload": {"kind": "random"}},
            {"name": "q", "id": 2, "drva": "[::1]:32874", "vms": ["c"]},
        ],
    }


def test_base_is_valid() -> None:
    c = parse_cluster(_base(), "t.toml")
    p = c.domain("p")
    assert [(i, vm.name, d.name) for i, vm, d in p.disks] == [(0, "a", "d0"), (1, "a", "d1"),
                                                                (2, "b", "d0")]
    assert p.workload is not None and p.workload.options["seed"] == 1
    assert c.domain("q").drva == Endpoint("::1", 32874)


def _set(path: list, value: Any) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        for key in path[:-1]:
            d = d[key]
        if value is _DELETE:
            del d[path[-1]]
        else:
            d[path[-1]] = value
    return edit


_DELETE = object()

RULES = [
    ("bad site name", _set(["site"], "site a"), "site"),
    ("missing site", _set(["site"], _DELETE), "site"),
    ("unknown top key", _set(["sites"], 1), "sites"),
    ("unknown disk key", _set(["vms", 0, "disks", 0, "sise"], 1), "vms[0].disks[0].sise"),
    ("no hosts", _set(["hosts"], []), "hosts"),
    ("duplicate host", _set(["hosts", 1, "name"], "h1"), "hosts[1].name"),
    ("name too long", _set(["vms", 1, "name"], "x" * 65), "vms[1].name"),
    ("name with slash", _set(["vms", 1, "name"], "a/b"), "vms[1].name"),
    ("duplicate vm", _set(["vms", 2, "name"], "a"), "vms[2].name"),
    ("unknown host", _set(["vms", 2, "host"], "h9"), "vms[2].host"),
    ("no disks", _set(["vms", 0, "disks"], []), "vms[0].disks"),
    ("duplicate disk", _set(["vms", 0, "disks", 1, "name"], "d0"), "vms[0].disks[1].name"),
    ("size not multiple of 512", _set(["vms", 2, "disks", 0, "size"], 1000),
     "vms[2].disks[0].size"),
    ("size zero", _set(["vms", 2, "disks", 0, "size"], 0), "vms[2].disks[0].size"),
    ("size negative", _set(["vms", 2, "disks", 0, "size"], -512), "vms[2].disks[0].size"),
    ("size bad unit", _set(["vms", 2, "disks", 0, "size"], "64XB"), "vms[2].disks[0].size"),
    ("size a bool", _set(["vms", 2, "disks", 0, "size"], True), "vms[2].disks[0].size"),
    ("shared image", _set(["vms", 1, "disks", 0, "image"], "a-d0.img"), "vms[1].disks[0].image"),
    ("image with a NUL", _set(["vms", 1, "disks", 0, "image"], "b\0.img"), "vms[1].disks[0].image"),
    ("state_dir with a NUL", _set(["state_dir"], "st\0ate"), "state_dir"),
    ("vm in two domains", _set(["domains", 1, "vms"], ["c", "a"]), "domains[1].vms[1]"),
    ("vm twice in a domain", _set(["domains", 0, "vms"], ["a", "a"]), "domains[0].vms[1]"),
    ("unknown vm", _set(["domains", 0, "vms"], ["a", "zz"]), "domains[0].vms[1]"),
    ("empty domain", _set(["domains", 0, "vms"], []), "domains[0].vms"),
    ("duplicate domain name", _set(["domains", 1, "name"], "p"), "domains[1].name"),
    ("duplicate domain id", _set(["domains", 1, "id"], 1), "domains[1].id"),
    ("id above u32", _set(["domains", 0, "id"], 2**32), "domains[0].id"),
    ("id negative", _set(["domains", 0, "id"], -1), "domains[0].id"),
    ("id a string", _set(["domains", 0, "id"], "1"), "domains[0].id"),
    ("domain named by a number", _set(["domains", 0, "name"], "7"), "domains[0].name"),
    ("port zero", _set(["domains", 0, "drva"], "127.0.0.1:0"), "domains[0].drva"),
    ("port too big", _set(["domains", 0, "drva"], "127.0.0.1:65536"), "domains[0].drva"),
    ("no port", _set(["domains", 0, "drva"], "127.0.0.1"), "domains[0].drva"),
    ("missing drva", _set(["domains", 0, "drva"], _DELETE), "domains[0].drva"),
    ("workload kind", _set(["domains", 0, "workload", "kind"], "fast"), "domains[0].workload.kind"),
    ("workload option", _set(["domains", 0, "workload", "rate"], 3), "domains[0].workload.rate"),
    ("workload value", _set(["domains", 0, "workload", "rate_mb_s"], -3),
     "domains[0].workload.rate_mb_s"),
    ("workload log_disk", _set(["domains", 0, "workload"], {"kind": "database", "log_disk": 3}),
     "domains[0].workload.log_disk"),
    ("workload write_size", _set(["domains", 0, "workload", "write_size"], "2MiB"),
     "domains[0].workload.write_size"),
]


@pytest.mark.parametrize("edit, key", [(e, k) for _, e, k in RULES], ids=[r[0] for r in RULES])
def test_rule_refused_naming_file_and_key(edit: Callable[[dict], None], key: str) -> None:
    data = copy.deepcopy(_base())
    edit(data)
    with pytest.raises(ConfigError) as info:
        parse_cluster(data, "t.toml")
    assert str(info.value).startswith(f"t.toml: {key}: "), str(info.value)
    assert "expected" in str(info.value)
