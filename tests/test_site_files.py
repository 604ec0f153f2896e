"""``cdp.site_files`` writes what the loaders read: a site built from its functions loads
back with every value it was given, and awkward strings survive the TOML quoting."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp import site_files
from cdp.errors import ConfigError
from cdp.msa.config import load_site_config


def test_a_written_site_loads_back_with_its_values(tmp_path: Path) -> None:
    inv = site_files.inventory(
        "site-x", ["esx-01", "esx-02"],
        [site_files.vm("db", "esx-01", [("data", "8MiB"), ("log", 1 << 20)]),
         site_files.vm("app", "esx-02", [("disk0", "4MiB")])],
        [site_files.domain("erp", 7, "127.0.0.1:40001", ["db", "app"], {"kind": "random", "rate_mb_s": 2})],
        state_dir="disks")
    site = site_files.site(
        "site-x", state_dir="st", api_listen="127.0.0.1:40003", recovery_roots=[str(tmp_path / "restore")],
        drvas=[site_files.drva("drva-1", "127.0.0.1:40001", log_path="st/d1/replog", log_size="16MiB",
                               meta_path="st/d1/meta", seal_bytes="2MiB", seal_age_s=0.5, upload_concurrency=3)],
        defaults={"retention": "24h"}, protect=[{"domain": "erp", "rpo_target_s": 15}])
    cfg = load_site_config(site_files.write_site(tmp_path, site, inv))
    assert cfg.site == "site-x" and cfg.state_dir == tmp_path / "st"
    assert cfg.recovery_roots == (tmp_path / "restore",)
    (drva,) = cfg.drvas
    assert (drva.name, drva.log_size, drva.seal_bytes, drva.seal_age_s, drva.upload_concurrency) == \
        ("drva-1", 16 << 20, 2 << 20, 0.5, 3)
    erp = cfg.domain("erp")
    assert erp.id == 7 and erp.disk_sizes == (8 << 20, 1 << 20, 4 << 20)
    assert erp.workload.kind == "random" and erp.workload.options["rate_mb_s"] == 2
    assert cfg.policy("erp").rpo_target_s == 15 and cfg.policy("erp").retention_s == 24 * 3600


def test_a_builder_that_writes_what_the_loader_refuses_fails_where_it_is_called(tmp_path: Path) -> None:
    inv = site_files.inventory("s", ["h"], [site_files.vm("v", "h", [("d", 1000)])],  # not a multiple of 512
                               [site_files.domain("erp", 1, "127.0.0.1:40001", ["v"])])
    site = site_files.site("s", drvas=[site_files.drva("drva-1", "127.0.0.1:40001", log_path="l", log_size="16MiB",
                                                        meta_path="m")])
    with pytest.raises(ConfigError, match=r"vms\[0\]\.disks\[0\]\.size"):
        site_files.write_site(tmp_path, site, inv)


@settings(max_examples=60, deadline=None)
@given(st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40))
def test_any_string_survives_the_quoting(text: str) -> None:
    doc = site_files.site("s", recovery_roots=[text], drvas=[])
    assert tomllib.loads(site_files.toml_text(doc))["recovery_roots"] == [text]
