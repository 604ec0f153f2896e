"""A DRVA's stores: one lane per object store it ships to.

A DRVA usually ships every domain to one store (its configuration's ``store``). When it
serves domains of two sites that keep their data in two stores — its own site's domains
and one failed over from the other site (FORMAT.md §13.4, version 2) — each store gets
a lane of its own: its client, its sealer, its upload workers, its catalog committer
and its catalog opener (``drva.daemon``). So a store that is slow or down holds back
only its own domains' segments, and memory stays bounded per lane: at most
``upload_concurrency`` segments being put, one waiting in the lane's queue and one the
lane's sealer is handing over. With one store there is one lane, and the DRVA runs as
it always did.

What stays shared across lanes is what there is one of per DRVA: the replication log
(trimmed behind the oldest entry any domain still needs) and the metadata repository.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from cdp.store import open_store
from cdp.store.base import ObjectStore
from drva.config import DrvaConfig
from drva.domain import DomainState, SegmentJob

#: Sealed segments waiting for a lane's uploaders, beyond those being put: one keeps the
#: uploaders busy, and more would only hold memory.
LANE_QUEUE_SEGMENTS_MAX = 1


@dataclass(eq=False)
class StoreLane:
    """One store and the domains that live in it. Invariant: each domain of the DRVA is
    in exactly one lane — the one of the store its configuration names — for the life of
    the process; lane 0 is the configuration's ``store`` (it may have no domain)."""

    index: int
    url: str
    store: ObjectStore  # tests swap in a fault-injecting one
    domains: list[DomainState]
    queue: asyncio.Queue[SegmentJob] = field(
        default_factory=lambda: asyncio.Queue(maxsize=LANE_QUEUE_SEGMENTS_MAX))
    # Set by an upload: the lane's catalog committer has something to commit.
    uploaded: asyncio.Event = field(default_factory=asyncio.Event)
    # Set on SIGUSR1 (the failover's MSA: its appliance has forked): read the catalogs of
    # the lane's taken-over domains now. One per lane, so that one lane's opener clearing
    # it cannot swallow the nudge meant for another's.
    takeover_nudge: asyncio.Event = field(default_factory=asyncio.Event)

    def task_name(self, name: str) -> str:
        """A task's name in this lane: lane 0's keep the names of a one-store DRVA."""
        return name if self.index == 0 else f"{name}@store{self.index}"


def open_lanes(cfg: DrvaConfig, domains: dict[int, DomainState]) -> list[StoreLane]:
    """A lane per store of ``cfg`` (``DrvaConfig.store_urls``), each with its domains."""
    lanes = []
    for i, url in enumerate(cfg.store_urls()):
        members = [dom for dom in domains.values() if cfg.store_url_of(dom.cfg) == url]
        lanes.append(StoreLane(i, url, open_store(url), members))
    return lanes
