"""Retention: which segments and bases a domain no longer needs, and deleting them safely.

Three steps, each on its own (``rocva.consolidate`` runs them in order):

``retention_cutoff``
    The time the window is measured back from: the job's clock, but never later than the
    domain's newest record plus the skew. A host whose clock jumped ahead cannot cut
    recent history that way; an idle domain keeps the last window of what was written.

``retention_delta``
    The catalog delta that moves one timeline's horizon. With ``R`` the last record older
    than the retention window, the new horizon ``F`` is the newest seq ``<= R`` at which
    **every** disk has a base (a consolidation writes such a cut). Points ``>= F`` keep
    everything they need: the bases at ``F`` and after, the rows holding seqs after
    ``F``. So the delta sets ``horizon_seq = F`` (the rows ending at or before it leave
    the head with it, FORMAT.md §8.2), ``horizon_ts`` to the time of record ``F`` (so
    ``--at`` still finds that point once its row is gone), and removes the bases below
    ``F``. The newest base is never removed (it is at ``F`` or later). Points older than the window stay
    recoverable until the next base passes them: retention is at least the window.

``sweep_domain``
    Deletes what the catalog no longer needs, found by listing (so a sweep that was
    deferred or interrupted is finished by the next one): segments that no timeline keeps
    (a timeline keeps its own rows above its horizon, and those it inherited at a fork),
    listed only up to each timeline's horizon; pages no timeline can hold (``page_expired``:
    behind every timeline's horizon, or beyond what a timeline that no longer receives
    segments holds);
    manifests no timeline names below their timeline's horizon; catalog generations older
    than the previous snapshot (FORMAT.md §8.1). Nothing of the first three while a
    recovery lease on the domain is live (§11.3: the recovery may have planned from an
    older generation). A segment uploaded but never committed (a crash between upload
    and commit) goes when the horizon passes it. Manifests at or above their timeline's
    horizon that no timeline names may be a seeding about to commit: kept.

    Its deletes have no deadline, unlike the chunk sweep's: what it deletes is below a
    horizon the catalog already holds (horizons only rise, and no key below one is
    written again), and a recovery whose lease it did not see loads that catalog, so a
    delete that lands late, even after the maintenance lock expired, takes nothing
    anyone may still read. The lock only keeps two jobs of a domain apart.

``sweep_chunks``
    Store-wide: under the gc lock (only while no chunk writer is live, §11.4), reads every
    manifest in the store and deletes the chunks none of them names. It is the one step
    that deletes on what a listing did *not* show, so it deletes nothing until the listing
    is shown whole: each domain's manifests are listed on their own (``d/<id>/base/``),
    a second listing after the last key must be empty (a server or proxy may end a
    listing early, marking a page the last that is not), and every manifest a timeline
    of the domain's catalog names must be among those listed. Each delete must land
    before the gc lock may look expired to a chunk writer (``Lease.bounded``), and the lock
    is checked once more after the last: a sweep that lost it reports LeaseLost.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cdp.base_image import decode_manifest
from cdp.catalog import collect_generations, domain_ids, load_catalog
from cdp.catalog_read import CatalogView
from cdp.catalog_state import CatalogState
from cdp.errors import FormatError, StoreError
from cdp.gather import gather_bounded
from cdp.layout import (
    base_prefix, page_prefix, parse_base_manifest_key, parse_chunk_key, parse_page_key, parse_segment_key,
    segment_prefix,
)
from cdp.locks import SKEW_DEFAULT_S, TTL_DEFAULT_S, Lease, gc_lock, live_locks, recovery_prefix
from cdp.logs import get_logger
from cdp.store.base import ObjectStore, get_bounded
from cdp.tomlread import SIZE_MAX
from rocva.plan import manifest_bytes_max

log = get_logger("rocva.retention")

CONCURRENCY = 8
_MANIFEST_SUFFIX = ".bmf"


def full_base_seqs(state: CatalogView) -> list[int]:
    """Seqs at which every disk of ``state`` has a base, ascending."""
    if not state.disks:
        return []
    per_disk = [{b["seq"] for b in state.bases if b["disk"] == d["disk"]} for d in state.disks]
    return sorted(set.intersection(*per_disk))


def newest_record_ns(state: CatalogState) -> int | None:
    """The newest record time any timeline of ``state`` holds (None: none holds a row).
    Rows are in seq order and never go back in time (FORMAT.md §8.2): a timeline's last
    row ends with its newest."""
    newest = None
    for t in state.timelines.values():
        rows = t.tail if len(t.tail) else t.refs
        if len(rows):
            ts = int(rows["last_ts"][-1])
            newest = ts if newest is None else max(newest, ts)
    return newest


def retention_cutoff(now_ns: int, newest_ns: int | None, retention_s: float, skew_s: float) -> dict[str, Any]:
    """Where a retention of ``retention_s`` cuts, for a job whose clock says ``now_ns``
    (module docstring): ``cutoff_ns`` (None: the domain holds no record), the anchor it
    is measured back from and why, for the job's output."""
    out: dict[str, Any] = {"retention_s": retention_s, "job_clock_ns": now_ns, "newest_record_ns": newest_ns,
                           "anchor_ns": None, "anchored_on": "no records", "cutoff_ns": None}
    if newest_ns is None:
        return out
    ceiling_ns = newest_ns + int(skew_s * 1e9)
    if now_ns <= ceiling_ns:
        out.update(anchor_ns=now_ns, anchored_on="job clock")
    else:  # an idle domain, or a clock ahead: the records' own time bounds what may go
        out.update(anchor_ns=ceiling_ns, anchored_on=f"newest record + {skew_s:g} s skew")
    out["cutoff_ns"] = out["anchor_ns"] - int(retention_s * 1e9)
    return out


async def retention_delta(state: CatalogView, cutoff_ns: int) -> dict[str, Any]:
    """The delta applying retention at ``cutoff_ns`` to the timeline ``state`` reads
    (module docstring); {} for none. The rows at or below the new horizon leave the
    catalog with it (FORMAT.md §8.2)."""
    r = await state.seq_at_time(cutoff_ns)
    if r is None:
        return {}
    cuts = [s for s in full_base_seqs(state) if s <= r]
    if not cuts or cuts[-1] <= state.horizon_seq:
        return {}
    f = cuts[-1]
    # The record at F leaves the head with its row; its time stays as horizon_ts, which
    # --at needs for the times between it and the next record (FORMAT.md §8.2).
    delta: dict[str, Any] = {"timeline": state.timeline_id, "horizon_seq": f,
                             "horizon_ts": await _record_time(state, f)}
    old = [{"seq": b["seq"], "disk": b["disk"]} for b in state.bases if b["seq"] < f]
    if old:
        delta["remove_bases"] = old
    return delta


async def _record_time(state: CatalogView, seq: int) -> int:
    """``timestamp_ns`` of record ``seq``, which is after the horizon (so a row holds it)."""
    ts = await state.time_of(seq)
    if ts is None:
        raise FormatError(f"catalog of domain {state.domain_id}, timeline {state.timeline_id}: no row holds seq {seq}, "
                          f"though the rows hold every seq from horizon_seq + 1 = {state.horizon_seq + 1} to "
                          f"committed_seq {state.committed_seq}")
    return ts


async def _delete_all(store: ObjectStore, keys: list[str], check=None) -> int:
    """Delete ``keys``; ``check()`` right before each (a lost maintenance lock stops the
    sweep). No deadline: what ``sweep_domain`` deletes is safe to delete however late it
    lands (its docstring says why)."""
    async def one(key: str) -> None:
        if check is not None:
            check()
        await store.delete(key)

    await gather_bounded((one(k) for k in keys), CONCURRENCY)
    return len(keys)


async def _delete_under_lease(store: ObjectStore, keys: list[str], lease: Lease) -> int:
    """Delete ``keys``, each within what is left of ``lease`` (``Lease.bounded``): a chunk
    writer elsewhere may rely on a chunk once the lease looks expired to it, so no delete
    may land after that. The first that cannot end in time stops them all (LeaseLost)."""
    async def one(key: str) -> None:
        await lease.bounded(lambda: store.delete(key), f"chunk sweep: delete of {key}")

    await gather_bounded((one(k) for k in keys), CONCURRENCY)
    return len(keys)


def _still_named(state: CatalogState, owner: int, first: int, last: int) -> bool:
    """Does a timeline that descends from ``owner`` (or ``owner`` itself) keep a row of
    ``owner``'s segment ``first..last``? (Rows inherited at a fork are clipped at it.)"""
    for tl in state.timelines:
        for ancestor, cap in state.lineage(tl):
            if ancestor != owner:
                continue
            t = state.timelines[tl]
            if first <= cap and min(last, cap) > t.horizon_seq:
                return True
    return False


async def _expired_segments(store: ObjectStore, state: CatalogState) -> list[str]:
    """Segments no timeline keeps: each timeline's listing is read only up to its
    horizon (keys sort by first seq), so a sweep costs what expired, not the history."""
    out = []
    for tl_id, tl in state.timelines.items():
        async for info in store.list(segment_prefix(state.domain_id, tl_id)):
            _, _, first, last = parse_segment_key(info.key)
            if first > tl.horizon_seq:
                break
            if not _still_named(state, tl_id, first, last):
                out.append(info.key)
    return out


def page_expired(state: CatalogState, first: int, last: int) -> bool:
    """May the page of seqs ``first..last`` go, ``state`` being the head as loaded?

    Pages name no timeline, and timelines share seq numbers after a fork, so a page is
    judged against every timeline, each of which must let it go:

    * ``last <= horizon_seq``: the timeline needs none of its seqs, and never will (a
      horizon only rises; a timeline forked from it later starts at or above it);
    * or the timeline is not current and ``first > committed_seq``: it is none of this
      timeline's, ever — only the current timeline receives segments (§8.5), so a
      non-current one's rows are final.

    The current timeline gets no second way out: its writer commits (and folds pages) while
    the sweep runs, after the head was loaded, so a page above its loaded
    ``committed_seq`` may be its newest. (The same holds of a timeline forked after the
    load: its pages end above the current's horizon.) FORMAT.md §8.4."""
    for tl_id, t in state.timelines.items():
        if last <= t.horizon_seq:
            continue
        if tl_id != state.current and first > t.committed_seq:
            continue
        return False
    return True


async def _expired_pages(store: ObjectStore, state: CatalogState) -> list[str]:
    """Pages no timeline can reference any more (``page_expired``)."""
    out = []
    current_horizon = state.timeline().horizon_seq
    async for info in store.list(page_prefix(state.domain_id)):
        _, first, last, _, _ = parse_page_key(info.key)
        if first > current_horizon:  # keys sort by first seq: none after this ends at or below it
            break
        if page_expired(state, first, last):
            out.append(info.key)
    return out


async def sweep_domain(store: ObjectStore, state: CatalogState, generation: int, *, skew_s: float = SKEW_DEFAULT_S,
                       check=None) -> dict[str, Any]:
    """Delete the objects of ``state``'s domain the catalog no longer needs (module
    docstring): segments and pages behind every timeline's horizon, manifests no
    timeline names below their timeline's horizon, generations older than the previous
    snapshot — nothing while a recovery lease on the domain is live (§11.3)."""
    domain = state.domain_id
    # Leases are judged by this host's clock: ConfigError while it is off from the store's
    # by more than the skew (cdp.locks.live_locks), before anything is deleted.
    expired = await _expired_segments(store, state)
    pages = await _expired_pages(store, state)
    named = {b["key"] for t in state.timelines.values() for b in t.bases}
    old_manifests, kept = [], 0
    async for info in store.list(base_prefix(domain)):
        if info.key in named:
            continue
        _, tl, seq, _ = parse_base_manifest_key(info.key)
        if tl in state.timelines and seq < state.timelines[tl].horizon_seq:
            old_manifests.append(info.key)
        else:
            kept += 1
    leases = await live_locks(store, recovery_prefix(domain), skew_s=skew_s)
    deferred = deleted = 0
    if leases and (expired or old_manifests or pages):
        deferred = len(expired) + len(old_manifests) + len(pages)
        log.info("retention_deferred", domain=domain, objects=deferred,
                 reason=f"recovery in progress: {leases[0].describe()}")
    else:
        deleted += await _delete_all(store, expired + old_manifests + pages, check)
    generations = await collect_generations(store, domain, generation, skew_s=skew_s)
    return {"objects_deleted": deleted, "segments_deleted": 0 if deferred else len(expired),
            "manifests_deleted": 0 if deferred else len(old_manifests),
            "pages_deleted": 0 if deferred else len(pages), "deferred": deferred,
            "deferred_by": leases[0].describe() if deferred else None,
            "uncommitted_manifests_kept": kept, "generations_deleted": generations["deleted"]}


async def sweep_chunks(store: ObjectStore, *, owner: str = "cdp consolidate", ttl_s: float = TTL_DEFAULT_S,
                       skew_s: float = SKEW_DEFAULT_S) -> dict[str, Any]:
    """Delete every chunk no manifest in the store names (module docstring); ``Busy`` while
    a chunk writer is live. Nothing is deleted unless every domain's listing of manifests
    is shown whole (``_domain_manifests``: StoreError naming what is missing). A manifest
    that does not decode stops the sweep (FormatError naming it): without it we cannot
    know which chunks are still needed. ``LeaseLost`` when the gc lock was lost, or a
    delete could not end while it surely held (§11.4): what was deleted before was safe."""
    async with await gc_lock(store, owner=owner, ttl_s=ttl_s, skew_s=skew_s) as lease:
        domains = await _domains_twice(store)
        listed = await gather_bounded((_domain_manifests(store, d) for d in domains), CONCURRENCY)
        keys = [k for per_domain in listed for k in per_domain]

        async def hashes(key: str, bound: int) -> np.ndarray:
            return decode_manifest(key, await get_bounded(store, key, bound)).hashes

        tables = await gather_bounded((hashes(k, bound) for k, bound in keys), CONCURRENCY)
        referenced = {row.tobytes() for t in tables for row in t}
        garbage, kept = [], 0
        async for info in store.list("c/"):  # one cut short only keeps chunks: no check needed
            try:
                h = parse_chunk_key(info.key)
            except FormatError:
                log.warning("chunk_sweep_stray_object", key=info.key)
                continue
            if h in referenced:
                kept += 1
            else:
                garbage.append(info.key)
        deleted = await _delete_under_lease(store, garbage, lease)
        lease.check()  # lost while deleting (superseded, its clock stepped): an error, not a success
    return {"domains_read": len(domains), "manifests_read": len(keys), "chunks_kept": kept,
            "chunks_deleted": deleted}


async def _domains_twice(store: ObjectStore) -> list[int]:
    """Every domain id, walked twice (``domain_ids``): the walk ends on a listing call
    that shows nothing, and one answered empty in error hid every domain after it — whose
    chunks the sweep then took for garbage. Two walks that differ refuse the sweep."""
    first = [d async for d in domain_ids(store)]
    second = [d async for d in domain_ids(store)]
    if first != second:
        raise StoreError(f"chunk sweep of {store.describe()} refused, nothing deleted: two walks of the store's "
                         f"domains differ ({len(first)} and {len(second)} domains; first difference at "
                         f"{next((f'{a}/{b}' for a, b in zip(first, second) if a != b), 'the end')}): a listing "
                         f"answered short, or a domain was created meanwhile (the next sweep tells)")
    return first


def _manifest_bound(state: CatalogState | None) -> int:
    """The largest manifest of the domain: of its largest disk (§6.2), or of the largest
    disk a configuration takes (1 PiB) when its catalog does not say."""
    sizes = [int(d["size"]) for d in state.disks] if state is not None else []
    return manifest_bytes_max(max(sizes, default=SIZE_MAX))


async def _domain_manifests(store: ObjectStore, domain: int) -> list[tuple[str, int]]:
    """The keys of ``domain``'s manifests, each with the bound of its read, shown to be all of them (StoreError otherwise):
    listed to the end (``_listed_whole``), and holding every manifest the domain's catalog
    names (a catalog that does not load is warned of, and only the end is checked). The
    catalog is loaded after the listing: a base committed meanwhile had its manifest
    stored before (§8), so a manifest named and not listed is a listing that missed it —
    or a catalog naming one the store lacks, which the sweep does not guess at either."""
    prefix = base_prefix(domain)
    manifests = [k for k in await _listed_whole(store, prefix) if k.endswith(_MANIFEST_SUFFIX)]
    try:
        state, generation = await load_catalog(store, domain)
    except FormatError as exc:
        # A damaged or foreign domain must not stop the collection of every other one's
        # garbage: its listing was shown to reach its end, and every manifest listed is
        # kept; only the cross-check is lost, and said.
        log.warning("chunk_sweep_catalog_unreadable", domain=domain, manifests=len(manifests), error=exc.message,
                    reason="the listing of its manifests is checked for its end only")
        return [(k, _manifest_bound(None)) for k in manifests]
    if state is None:  # no catalog names anything (a domain being purged, or not begun)
        return [(k, _manifest_bound(None)) for k in manifests]
    named = {b["key"] for t in state.timelines.values() for b in t.bases}
    missing = sorted(named.difference(manifests))
    if missing:
        raise StoreError(f"chunk sweep of {store.describe()} refused, nothing deleted: manifest {missing[0]} "
                         f"({len(missing)} in all), named by generation {generation} of domain {domain}'s catalog, "
                         f"is not in the listing of {prefix} ({len(manifests)} manifests listed): the listing is "
                         f"incomplete, or the manifest came or went after it (the next sweep tells), so the chunks "
                         f"it names could be taken for garbage")
    return [(k, _manifest_bound(state)) for k in manifests]


async def _listed_whole(store: ObjectStore, prefix: str) -> list[str]:
    """Every key under ``prefix``, and proof that the listing reached the end: a listing
    that starts after its last key must be empty. A server or proxy that marks a page
    the last when it is not ends the first listing early without an error; the rest
    then shows up in the second (StoreError naming where the listing stopped)."""
    keys = [info.key async for info in store.list(prefix)]
    if not keys:
        return keys
    beyond = None
    async for info in store.list(prefix, start_after=keys[-1]):
        beyond = info.key
        break
    if beyond is not None:
        raise StoreError(f"chunk sweep of {store.describe()} refused, nothing deleted: the listing of {prefix} "
                         f"ended at {keys[-1]} ({len(keys)} keys), but {beyond} comes after it: the store (or a "
                         f"proxy) cut the listing short, or that key was created since")
    return keys
