"""The simulator's reading of a site's inventory (``cdp.inventory``).

The inventory keeps each domain's ``workload`` as plain options; what they mean — the
kinds and their options (``iofilter_sim.workloads``) — is the simulator's. So the
simulator loads the inventory through here: the same file, every workload checked as
well, each refusal a ``ConfigError`` naming the file and the key path
(``domains[0].workload.rate_mb_s``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cdp import inventory
from cdp.errors import ConfigError
from cdp.inventory import Cluster, DomainSpec
from iofilter_sim.workloads import Workload, check_workload_options, make_workload


def load_cluster(path: str | Path, *, state_dir: str | Path | None = None) -> Cluster:
    """``cdp.inventory.load_cluster`` with every workload checked."""
    return check_workloads(inventory.load_cluster(path, state_dir=state_dir))


def parse_cluster(data: Mapping[str, Any], source: str = "<cluster>", **options: Any) -> Cluster:
    """``cdp.inventory.parse_cluster`` with every workload checked."""
    return check_workloads(inventory.parse_cluster(data, source, **options))


def check_workloads(cluster: Cluster) -> Cluster:
    for i, dom in enumerate(cluster.domains):  # in file order: the index is the file's
        if dom.workload is not None:
            try:
                check_workload_options(dom.workload.kind, dom.workload.options, f"domains[{i}].workload",
                                       len(dom.disk_sizes))
            except ConfigError as exc:
                raise ConfigError(f"{cluster.source}: {exc}") from None
    return cluster


def domain_workload(dom: DomainSpec, *, clock: Callable[[], float] = time.monotonic) -> Workload:
    """The workload the inventory names for ``dom`` (ConfigError when it names none)."""
    if dom.workload is None:
        raise ConfigError(f"domain {dom.name}: no workload configured")
    return make_workload(dom.workload.kind, dom.disk_sizes, clock=clock, **dom.workload.options)
