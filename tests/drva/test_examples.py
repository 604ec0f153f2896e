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
