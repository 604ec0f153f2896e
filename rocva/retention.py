"""Retention: which segments and bases a domain no longer needs, and deleting them safely.

Three steps, each on its own (``rocva.consolidate`` runs them in order):

``retention_delta``
    The catalog delta that moves the horizon. With ``R`` the last record older than the
    retention window, the new horizon ``F`` is the newest seq ``<= R`` at which **every**
    disk has a base (a consolidation writes such a cut). Points ``>= F`` keep everything
    they need: the bases at ``F`` and after, the segments holding seqs after ``F``. So the
    delta removes the segments that end at or before ``F`` (always the oldest ones) and
    the bases below ``F``, and sets ``horizon_seq = F``. The newest base is never
    removed (it is at ``F`` or later). Points older than the window stay recoverable until
    the next base passes them: retention is at least the window, never less.

``sweep_domain``
    Deletes what the catalog no longer names, found by listing (so a sweep that was
    deferred or interrupted is finished by the next one): segments before the first one
    the catalog holds and manifests below the horizon — but nothing of them while a
    recovery lease on the domain is live (FORMAT.md §11.3: the recovery may have planned
    from an older generation). Uploads that can never be committed (a segment that starts
    at or before ``committed_seq`` but is not in the catalog: the DRVA only extends the
    end) were never part of a recovery point and go regardless. Manifests at or above the
    horizon that the catalog does not name may be a seeding about to commit: kept.

``sweep_chunks``
    Store-wide: under the gc lock (only while no chunk writer is live, §11.4), reads every
    manifest in the store and deletes the chunks none of them names.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cdp.base_image import decode_manifest
from cdp.catalog_state import CatalogState
from cdp.errors import FormatError
from cdp.gather import gather_bounded
from cdp.layout import (
    base_prefix, parse_base_manifest_key, parse_chunk_key, parse_segment_key, segment_prefix,
)
from cdp.locks import SKEW_DEFAULT_S, TTL_DEFAULT_S, gc_lock, live_locks, recovery_prefix
from cdp.logs import get_logger
from rocva.target import seq_at_time

log = get_logger("rocva.retention")

CONCURRENCY = 8
_MANIFEST_SUFFIX = ".bmf"


def full_base_seqs(state: CatalogState) -> list[int]:
    """Seqs at which every disk of ``state`` has a base, ascending."""
    if not state.disks:
        return []
    per_disk = [{b["seq"] for b in state.bases if b["disk"] == d["disk"]} for d in state.disks]
    return sorted(set.intersection(*per_disk))


async def retention_delta(store, state: CatalogState, cutoff_ns: int) -> dict[str, Any]:
    """The delta applying retention at ``cutoff_ns`` (module docstring); {} for none."""
    r = await seq_at_time(store, state, cutoff_ns)
    if r is None:
        return {}
    cuts = [s for s in full_base_seqs(state) if s <= r]
    if not cuts or cuts[-1] <= state.horizon_seq:
        return {}
    f = cuts[-1]
    last = state.segments.column("last_seq")
    k = int(np.searchsorted(last, np.uint64(f), side="right"))  # segments ending at or before F
    delta: dict[str, Any] = {"horizon_seq": f}
    if k:
        delta["remove_segments"] = state.segment_keys(state.segments.rows(0, k))
    old = [{"seq": b["seq"], "disk": b["disk"]} for b in state.bases if b["seq"] < f]
    if old:
        delta["remove_bases"] = old
    return delta


async def _delete_all(store, keys: list[str], check=None) -> int:
    async def one(key: str) -> None:
        if check is not None:  # right before each delete: a lost lock stops the sweep
            check()
        await store.delete(key)

    await gather_bounded((one(k) for k in keys), CONCURRENCY)
    return len(keys)


async def sweep_domain(store, state: CatalogState, *, skew_s: float = SKEW_DEFAULT_S,
                       check=None) -> dict[str, Any]:
    """Delete the objects of ``state``'s domain the catalog no longer needs (module docstring)."""
    domain = state.domain_id
    firsts = state.segments.column("first_seq")
    front = int(firsts[0]) if len(firsts) else state.committed_seq + 1
    named = set(state.segment_keys(state.segments.rows(0, len(state.segments))))
    expired, never = [], []
    async for info in store.list(segment_prefix(domain)):
        if info.key in named:
            continue
        _, first, last = parse_segment_key(info.key)
        if last < front:
            expired.append(info.key)
        elif first <= state.committed_seq:
            never.append(info.key)
    bases = {b["key"] for b in state.bases}
    old_manifests, kept = [], 0
    async for info in store.list(base_prefix(domain)):
        if info.key in bases:
            continue
        _, seq, _ = parse_base_manifest_key(info.key)
        if seq < state.horizon_seq:
            old_manifests.append(info.key)
        else:
            kept += 1
    leases = await live_locks(store, recovery_prefix(domain), skew_s=skew_s)
    deleted = await _delete_all(store, never, check)
    deferred = 0
    if leases and (expired or old_manifests):
        deferred = len(expired) + len(old_manifests)
        log.info("retention_deferred", domain=domain, objects=deferred,
                 reason=f"recovery in progress: {leases[0].describe()}")
    else:
        deleted += await _delete_all(store, expired + old_manifests, check)
    return {"objects_deleted": deleted, "segments_deleted": len(expired) + len(never) if not deferred else len(never),
            "manifests_deleted": 0 if deferred else len(old_manifests), "deferred": deferred,
            "deferred_by": leases[0].describe() if deferred else None,
            "uncommitted_manifests_kept": kept}


async def sweep_chunks(store, *, owner: str = "cdp consolidate", ttl_s: float = TTL_DEFAULT_S,
                       skew_s: float = SKEW_DEFAULT_S) -> dict[str, Any]:
    """Delete every chunk no manifest in the store names (module docstring); ``Busy`` while
    a chunk writer is live. A manifest that does not decode stops the sweep (FormatError
    naming it): without it we cannot know which chunks are still needed."""
    async with await gc_lock(store, owner=owner, ttl_s=ttl_s, skew_s=skew_s) as lease:
        keys = [i.key async for i in store.list("d/") if i.key.endswith(_MANIFEST_SUFFIX)]
        async def hashes(key: str) -> np.ndarray:
            return decode_manifest(key, await store.get(key)).hashes

        tables = await gather_bounded((hashes(k) for k in keys), CONCURRENCY)
        referenced = {row.tobytes() for t in tables for row in t}
        garbage, kept = [], 0
        async for info in store.list("c/"):
            try:
                h = parse_chunk_key(info.key)
            except FormatError:
                log.warning("chunk_sweep_stray_object", key=info.key)
                continue
            if h in referenced:
                kept += 1
            else:
                garbage.append(info.key)
        deleted = await _delete_all(store, garbage, lease.check)
    return {"manifests_read": len(keys), "chunks_kept": kept, "chunks_deleted": deleted}
