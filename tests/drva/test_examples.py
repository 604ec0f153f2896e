"""The example DRVA configurations match the example cluster and load cleanly."""

from __future__ import annotations

from pathlib import Path

from drva.config import load_drva_config
from iofilter_sim.cluster import load_cluster

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_example_drvas_serve_exactly_the_clusters_domains():
    env = {"CDP_SITE_SECRET": "x" * 20}
    cluster = load_cluster(EXAMPLES / "cluster.toml")
    served = {}
    for name in ("drva-1", "drva-2"):
        cfg = load_drva_config(EXAMPLES / f"{name}.toml", env)
        assert cfg.log_path.is_absolute() and cfg.store_url.startswith("file:///")
        for d in cfg.domains:
            served[d.id] = (cfg.port, [(x.vm, x.name, x.size) for x in d.disks])
    for d in cluster.domains:
        port, disks = served[d.id]
        assert port == d.drva.port
        assert disks == [(x.vm.name, x.disk.name, x.disk.size) for x in d.disks]


def test_a_path_with_a_nul_or_past_path_max_is_refused_naming_the_key(tmp_path: Path) -> None:
    """A NUL in a DRVA's paths ended its start in a ValueError traceback."""
    import pytest

    from cdp.errors import ConfigError
    from cdp.testing.drva_config import SECRET, domain_doc, drva_doc
    from drva.config import parse_drva_config

    for key, bad in (("state_dir", "st\0ate"), ("log", {"path": "re\0plog", "size": "64MiB"}),
                     ("meta", {"path": "a/" * 3000 + "m"})):
        doc = drva_doc(tmp_path, "drva-1", [domain_doc(1, "erp", [("vm", "d0", 1 << 20)])])
        doc[key] = bad
        with pytest.raises(ConfigError) as err:
            parse_drva_config(doc, "d.toml", {"CDP_SITE_SECRET": SECRET})
        name = key if key == "state_dir" else f"{key}.path"
        assert err.value.message.startswith(f"d.toml: {name}: expected a file path"), err.value.message
