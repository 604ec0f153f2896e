"""The catalog: a chain of generation objects and a tree of pages per domain (FORMAT.md §8).

Generation 1, 2, 3, … of ``d/<domain>/cat/<generation>.cat``: each a ``SNAPSHOT`` (the
whole head, ``CatalogState``) or a ``DELTA`` (the changes since the generation before).
The head at generation ``g`` is the newest snapshot at or below ``g`` with every delta
after it applied in order; ``load_catalog`` rebuilds the head at the newest generation.
The segment history sits in pages (``cdp.catalog_page``) that the head references, so
neither a commit nor a load grows with the history.

Ownership is fencing by conditional create: a generation is written with
``put(if_absent=True)`` after every object it names (segments, manifests, pages) is
durable; whoever creates generation ``n + 1`` owns the domain. ``CatalogWriter`` tells a
lost create that was its own (its writer id in the object), or a maintenance job's,
from another owner's, which fences it (``Fenced``). Only whole bytes are judged: a
generation whose bytes fail their own sums is read again, and when it stays bad it is
``CorruptGeneration`` — retried later, never a fence (``read_generation``).

This module holds the object codec, ``load_catalog``, ``CatalogWriter`` and the
collection of old generations; the head and the delta rules are in
``cdp.catalog_state``, reading pages in ``cdp.catalog_read``.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import re
import secrets
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import xxhash

from cdp.catalog_json import refs_json
from cdp.catalog_page import Fold
from cdp.catalog_state import MAINTENANCE_KEYS, CatalogState
from cdp.errors import (
    AlreadyExists, AmbiguousDomain, CdpError, ChecksumMismatch, Fenced, FormatError, KeyUnavailable, NotFound,
    StoreError, TruncatedError,
)
from cdp.gather import gather_bounded
from cdp.layout import U64_MAX, catalog_key, catalog_prefix, parse_catalog_key
from cdp.locks import SKEW_DEFAULT_S, live_locks, recovery_prefix
from cdp.logs import get_logger
from cdp.store.base import ObjectStore, get_bounded
from cdp.summed import SUMMED, checked_body, pack_summed, unpack_summed

__all__ = [
    "KIND_DELTA", "KIND_SNAPSHOT", "CatalogState", "CatalogTooLarge", "CatalogWriter", "CorruptGeneration",
    "collect_generations", "commit_catalog", "decode_catalog_object", "domain_ids", "encode_catalog_object",
    "load_catalog", "read_generation",
]

CATALOG_MAGIC = b"CDPC"
CATALOG_VERSION = 2  # §8: pages and timelines; version 1 objects are refused
KIND_DELTA = 1  # §8.1
KIND_SNAPSHOT = 2  # §8.1
KIND_NAMES = {KIND_DELTA: "DELTA", KIND_SNAPSHOT: "SNAPSHOT"}
BODY_LEN_MAX = 256 << 20  # §8.1
#: Catalog objects fetched at once while walking back from the newest generation
#: (after the first batch, which runs from where the newest snapshot should be).
FETCH_BATCH_MAX = 8
#: Catalog objects in flight at once while a load fetches them.
FETCH_CONCURRENCY = 16
#: §8.1: a SNAPSHOT at generation 1 and every this many generations, which bounds the
#: deltas a load applies and lets generations older than the previous snapshot go.
SNAPSHOT_EVERY = 64
#: Listings a load makes when generations vanish under it (a collector raced it).
LOAD_ATTEMPTS_MAX = 3
#: Catalog races lost to others' maintenance generations in a row before
#: ``commit_shared`` gives up (fenced).
MAINTENANCE_RETRIES = 16
#: Deletions of old generations in flight at once.
DELETE_CONCURRENCY = 8
#: Old generations a collector deletes per batch, streamed from the listing (after a
#: recovery lease held collection off for weeks there may be millions).
DELETE_BATCH = 1024
#: A load keeps the newest this many generations of its listing: the chain it walks
#: runs from the newest to the snapshot below it (at most SNAPSHOT_EVERY - 1 deltas
#: for a writer that follows §8.1), however many older ones collection has not removed.
GENERATIONS_KEPT = 4096
#: Keys a listing of ``d/<domain>/cat/`` may show before the load gives up on it: far
#: above what a domain accrues while collection is held off (one generation per commit),
#: and an end for a store or proxy whose listing never ends.
GENERATIONS_LISTED_MAX = 10_000_000
#: Stray keys under ``d/<domain>/cat/`` logged one by one; the rest are counted.
STRAY_KEYS_LOGGED = 10
#: Reads of one catalog object whose bytes fail their own sums or length before it is
#: called corrupt (``read_generation``): one flipped bit or cut body in transit is not a
#: damaged object, and must not be taken for another writer's generation (§8.3).
READ_ATTEMPTS = 4
#: The wait before the first re-read, doubled before each next one (0.05 + 0.1 + 0.2 s).
REREAD_WAIT_S = 0.05
#: The newest generation a chain may reach: its successor's key must exist (§7 keys end
#: at 2^64 − 1), or the writer that loads it can never commit, nor be fenced.
GENERATION_MAX = U64_MAX - 1

log = get_logger("cdp.catalog")
_DOMAIN_DIR = re.compile(r"[0-9a-f]{8}")  # d/<domain id: 8 lower-case hex digits>/ (§7)

# FORMAT.md §8.1: catalog object header, 64 bytes; header_xxh3 (last field) covers [0, 56).
_HEADER = struct.Struct("<4sHHIIQQ24sQ")
assert _HEADER.size == 64, "FORMAT.md §8.1"
HEADER_SIZE = _HEADER.size
#: The largest generation object: a larger one under a catalog key is refused unread (a
#: planted 2 GiB one took 8 GB of memory to refuse after reading it).
GENERATION_BYTES_MAX = HEADER_SIZE + BODY_LEN_MAX
_HEADER_ZERO = {"reserved": (32, 24)}  # must be zero: {name: (offset, size)}


class CorruptGeneration(ChecksumMismatch):
    """A catalog object whose bytes failed their own checksums or length on every one of
    ``READ_ATTEMPTS`` reads: damaged in the store, or by every transfer of it so far. It
    says nothing of who wrote it — never a fence (§8.3): a writer tries again later."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


class CatalogTooLarge(FormatError):
    """A generation whose body would exceed ``BODY_LEN_MAX`` (§8.1): no reader takes it,
    so it is not written. A refusal of that domain's commit, like a delta the head
    refuses: a DRVA stops that domain (its status says why) and serves the others. It
    once was a ValueError, which ended the DRVA's catalog committer and the DRVA (exit
    70), at every restart."""


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def new_writer_id(by: str) -> dict:
    """A ``writer`` record (§8.1): a fresh random id and what the writer is."""
    return {"id": secrets.token_hex(16), "by": by[:200]}


def encode_catalog_object(domain: int, generation: int, kind: int, body: dict) -> bytes:
    """A catalog object (§8.1): header, then ``body`` as compact, key-sorted UTF-8 JSON."""
    if kind not in KIND_NAMES:
        raise ValueError(f"catalog kind {kind} not in {sorted(KIND_NAMES)}")
    if generation < 1:
        raise ValueError("a catalog generation is >= 1")
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    data = text.encode("utf-8")
    if len(data) > BODY_LEN_MAX:
        what = KIND_NAMES[kind]
        raise CatalogTooLarge(f"catalog {catalog_key(domain, generation)}: the {what} body would be {len(data):,} "
                              f"bytes, over the {BODY_LEN_MAX:,} a generation may hold (FORMAT.md §8.1): not "
                              f"written")
    header = pack_summed(
        _HEADER, CATALOG_MAGIC, CATALOG_VERSION, kind, domain, len(data), generation,
        xxhash.xxh3_64_intdigest(data), bytes(24),
    )
    return header + data


def decode_catalog_object(key: str, data: bytes | bytearray | memoryview) -> tuple[int, int, int, Any]:
    """Verify a catalog object stored under ``key``; return (kind, generation, domain, body).

    The key must be a catalog key (§7) whose domain and generation equal the header's.
    """
    mv = memoryview(data).cast("B")
    where = f"catalog {key}"
    key_domain, key_generation = parse_catalog_key(key)
    kind, domain, body_len, generation, body_xxh3, _ = unpack_summed(
        _HEADER, mv, where=where, magic=CATALOG_MAGIC, version=CATALOG_VERSION, zero=_HEADER_ZERO
    )
    if kind not in KIND_NAMES:
        raise FormatError(f"{where}: header at offset 6: kind {kind}, expected 1 (DELTA) or 2 (SNAPSHOT)")
    if generation != key_generation or domain != key_domain:
        raise FormatError(
            f"{where}: header says domain {domain}, generation {generation}; the key says "
            f"domain {key_domain}, generation {key_generation}"
        )
    if body_len > BODY_LEN_MAX:
        raise FormatError(f"{where}: header at offset 12: body_len {body_len} > {BODY_LEN_MAX}")
    raw = checked_body(mv, body_len, body_xxh3, where=where, what="body_xxh3", header_size=HEADER_SIZE)
    try:
        body = json.loads(str(raw, "utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FormatError(f"{where}: the body at offset 64 is not UTF-8 JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise FormatError(f"{where}: the body is not a JSON object")
    return kind, generation, domain, body


def _bytes_intact(data: bytes | bytearray | memoryview) -> bool:
    """Do ``data`` pass their own sums (§8.1: ``header_xxh3``, then ``body_xxh3`` over
    exactly ``body_len`` bytes)? Checked without trusting any other field, not even the
    magic: True means these are the bytes some writer summed, whatever they say."""
    mv = memoryview(data).cast("B")
    if len(mv) < HEADER_SIZE:
        return False
    fields = _HEADER.unpack_from(mv)
    body_len, body_xxh3, header_xxh3 = fields[4], fields[6], fields[8]
    return (xxhash.xxh3_64_intdigest(mv[:SUMMED]) == header_xxh3 and len(mv) == HEADER_SIZE + body_len
            and xxhash.xxh3_64_intdigest(mv[HEADER_SIZE:]) == body_xxh3)


async def read_generation(store: ObjectStore, key: str,
                          data: bytes | None = None) -> tuple[int, int, int, Any]:
    """``decode_catalog_object`` of the object under ``key`` (``data``: its bytes, read
    already). Bytes that fail their own sums or length (a flipped bit, a cut or empty
    body in transit; an encrypted store's failed authentication) are read again, up to
    ``READ_ATTEMPTS`` reads in all with a doubling wait, before ``CorruptGeneration``
    naming the key. Intact bytes that do not decode are what a writer wrote: their
    FormatError is raised at once. ``NotFound`` and other store errors propagate."""
    failure: CdpError | None = None
    for attempt in range(READ_ATTEMPTS):
        if attempt:
            # Info, not a warning: a read that heals is no problem, and one that stays bad is
            # raised (CorruptGeneration), which its caller reports.
            log.info("catalog_read_again", key=key, attempt=attempt + 1, error=failure.message if failure else "")
            await asyncio.sleep(REREAD_WAIT_S * 2 ** (attempt - 1))
        try:
            blob = await get_bounded(store, key, GENERATION_BYTES_MAX) if data is None else data
        except (ChecksumMismatch, TruncatedError) as exc:  # an encrypted store's own check of what it read
            data, failure = None, exc
            continue
        data = None
        try:
            return decode_catalog_object(key, blob)
        except FormatError as exc:
            if _bytes_intact(blob):
                raise
            failure = exc
    raise CorruptGeneration(
        f"catalog {key}: corrupt generation: its bytes failed their checksums or length on each of "
        f"{READ_ATTEMPTS} reads (last: {failure.message if failure else '?'}); damaged in the store or on "
        f"every transfer — not taken for another writer's", key)


def _state_after(state: CatalogState | None, kind: int, body: Any, where: str) -> CatalogState:
    """The head after one generation's object (§8.1)."""
    if kind == KIND_SNAPSHOT:
        return CatalogState.from_snapshot_body(body, where)
    assert state is not None
    new = state.copy()
    new.apply_delta(body, where)
    return new


def check_successor(domain: int, generation: int, *, committing: bool = False) -> None:
    """FormatError naming the key unless ``generation`` can be followed by another
    (``GENERATION_MAX``): a chain at 2^64 − 1 can never be committed to — and no writer
    gets near it by +1, so only a forged or corrupt object puts it there. Refused as it
    is read (the newest generation), and never created (``committing``)."""
    if generation <= GENERATION_MAX:
        return
    key = catalog_key(domain, min(generation, U64_MAX))
    if committing:
        raise FormatError(f"catalog {key}: generation {generation} of domain {domain} would be one no generation "
                          f"can follow (keys end at 2^64 - 1): not committed; the chain it would extend, at "
                          f"generation {generation - 1}, comes from a forged or corrupt catalog object")
    raise FormatError(f"catalog {key}: the newest generation of domain {domain} is {generation}, which no generation "
                      f"can follow (keys end at 2^64 - 1): a forged or corrupt catalog object (no writer gets there "
                      f"by +1); the chain cannot go on")


async def commit_catalog(store: ObjectStore, domain: int, generation: int, kind: int, body: dict) -> str:
    """Create generation ``generation`` with a conditional put; return its key.

    ``AlreadyExists`` propagates: another writer created that generation first.
    FormatError when it would be a generation no other can follow (``check_successor``).
    """
    check_successor(domain, generation, committing=True)
    key = catalog_key(domain, generation)
    await store.put(key, encode_catalog_object(domain, generation, kind, body), if_absent=True)
    return key


async def list_generations(store: ObjectStore, domain: int) -> list[int]:
    """The newest ``GENERATIONS_KEPT`` generations under ``d/<domain>/cat/``, ascending
    (memory bounded however many the listing shows); stray keys are logged and skipped
    (§8.1). FormatError when the listing shows more than ``GENERATIONS_LISTED_MAX`` keys."""
    newest: list[int] = []  # a min-heap of the newest GENERATIONS_KEPT
    async for generation in listed_generations(store, domain):
        if len(newest) < GENERATIONS_KEPT:
            heapq.heappush(newest, generation)
        elif generation > newest[0]:
            heapq.heapreplace(newest, generation)
    return sorted(newest)


class ListingTooLong(FormatError):
    """A listing of catalog keys went past the bound its caller set (``listed_generations``)."""


async def listed_generations(store: ObjectStore, domain: int, *, start: int | None = None,
                             keys_max: int | None = None, log_strays: bool = True) -> AsyncIterator[int]:
    """Every generation the listing of ``d/<domain>/cat/`` shows, in its order — with
    ``start``, of the keys from that generation's on only; stray keys skipped, and logged
    (the first ``STRAY_KEYS_LOGGED``) with ``log_strays``; ``ListingTooLong`` past ``keys_max`` keys, strays
    counted (``GENERATIONS_LISTED_MAX`` by default, §8.1)."""
    prefix = catalog_prefix(domain)
    keys_max = GENERATIONS_LISTED_MAX if keys_max is None else keys_max
    listed = strays = 0
    start_after = None if start is None else f"{prefix}{start:016x}"  # start's key (.cat) sorts after this
    async for info in store.list(prefix, start_after=start_after):
        listed += 1
        if listed > keys_max:
            raise ListingTooLong(
                f"catalog of domain {domain}: the listing of {prefix} in {store.describe()} showed more than "
                f"{keys_max:,} keys ({strays:,} of them not catalog keys) without an end: a store or proxy "
                f"whose listing does not end, or a domain whose old generations were never collected (§8.1)")
        try:
            key_domain, generation = parse_catalog_key(info.key)
        except FormatError:
            strays += 1
            if log_strays and strays <= STRAY_KEYS_LOGGED:
                log.warning("catalog_stray_key", domain=domain, key=info.key,
                            reason="not a catalog key (FORMAT.md §7): skipped")
            continue
        if key_domain == domain:
            yield generation
    if log_strays and strays > STRAY_KEYS_LOGGED:
        log.warning("catalog_stray_keys", domain=domain, prefix=prefix, count=strays,
                    logged=STRAY_KEYS_LOGGED, reason="not catalog keys (FORMAT.md §7): skipped")


async def load_catalog(store: ObjectStore, domain: int, *,
                       stats: dict | None = None) -> tuple[CatalogState | None, int]:
    """(head, generation) at the newest catalog generation of ``domain``; (None, 0) if none.

    Walks back from the newest generation to the newest snapshot (fetching a few objects
    at once), then applies the deltas after it in order. A generation missing from that
    chain is a FormatError naming it, unless it vanished while being read (a collector
    raced the load): then the load lists again (§8.1). An object whose bytes fail their
    sums is read again before the load fails (``read_generation``: ``CorruptGeneration``
    when it stays bad). ``stats``, when given, receives ``objects_listed`` and
    ``objects_read``.
    """
    for attempt in range(LOAD_ATTEMPTS_MAX):
        generations = await list_generations(store, domain)
        if stats is not None:
            stats["objects_listed"] = stats.get("objects_listed", 0) + len(generations)
        if not generations:
            return None, 0
        check_successor(domain, max(generations))
        try:
            return await _load_chain(store, domain, set(generations), max(generations), stats), max(generations)
        except NotFound:
            if attempt == LOAD_ATTEMPTS_MAX - 1:
                raise
            log.info("catalog_load_raced", domain=domain, attempt=attempt + 1)
    raise AssertionError("unreachable")


async def find_domain(store: ObjectStore, name: str) -> tuple[int, CatalogState] | None:
    """(id, head) of the domain named ``name`` in the store; None when none is.

    Several domains of one name (nothing in the store forbids it: two sites' installs, a
    rename) raise ``AmbiguousDomain`` listing their ids: taking the first in key order
    acted on the wrong domain without a word. So every domain is looked at, in key order,
    one listing call and one catalog load each (no full listing). A catalog that does not
    load is skipped with a warning, and said when no readable domain has the name."""
    found: list[tuple[int, CatalogState]] = []
    unreadable: list[str] = []  # domains whose catalog did not load
    async for domain_id in domain_ids(store):
        try:
            state, _ = await load_catalog(store, domain_id)
        except FormatError as exc:  # not the store's failures, nor a key this process lacks (its config)
            log.warning("catalog_unreadable", store=store.describe(), domain=domain_id, error=exc.message)
            unreadable.append(f"domain {domain_id}: {exc.message}"[:300])
            continue
        if state is not None and state.domain["name"] == name:
            found.append((domain_id, state))
    if len(found) > 1:
        ids = [domain_id for domain_id, _ in found]
        raise AmbiguousDomain(f"{store.describe()}: {len(ids)} domains are named {name!r} "
                              f"(ids {', '.join(map(str, ids))})", ids)
    if not found and unreadable:
        raise FormatError(f"{store.describe()}: no readable domain is named {name!r}, and "
                          f"{len(unreadable)} catalog(s) could not be read: {'; '.join(unreadable[:3])}")
    return found[0] if found else None


async def domain_ids(store: ObjectStore) -> AsyncIterator[int]:
    """The id of every ``d/<id>/`` in the store, in key order, one listing call each.

    Each call asks only for the first key after the domains seen so far, and the walk
    ends on a call that lists nothing: a listing the server ends early (a page marked
    the last that is not) cannot hide a domain from it."""
    after = "d/"
    while True:
        first = None
        async for info in store.list("d/", start_after=after):
            first = info.key
            break
        if first is None:
            return
        part, slash, _ = first[2:].partition("/")
        # A stray key is stepped over, not taken for the end of the walk or an error: one
        # file dropped under d/ must not hide every domain that sorts after it.
        after = f"d/{part}/~" if slash else first  # '~' sorts after every key under d/<part>/
        if not _DOMAIN_DIR.fullmatch(part):
            log.warning("stray_key_skipped", store=store.describe(), key=first[:200])
            continue
        yield int(part, 16)


async def _fetch(store: ObjectStore, key: str) -> bytes | None:
    """The object under ``key``; None when an encrypted store found it tampered with on
    the way (``read_generation`` reads it again, rather than one bad transfer failing
    the whole batch)."""
    try:
        return await get_bounded(store, key, GENERATION_BYTES_MAX)
    except (ChecksumMismatch, TruncatedError):
        return None


async def _load_chain(store: ObjectStore, domain: int, present: set[int], head: int,
                      stats: dict | None) -> CatalogState:
    chain: list[tuple[str, int, Any]] = []  # (key, kind, body), newest first
    nxt = head
    # Writers snapshot every SNAPSHOT_EVERY generations: fetch from there to the head in
    # one go (a chain by another rule is still found, a batch at a time, further back).
    batch_max = head - max(1, head // SNAPSHOT_EVERY * SNAPSHOT_EVERY) + 1
    while not chain or chain[-1][1] != KIND_SNAPSHOT:
        if nxt < 1:
            raise FormatError(f"catalog of domain {domain}: generation 1 is a DELTA: the chain from "
                              f"generation {head} has no snapshot")
        if nxt not in present:
            raise FormatError(
                f"catalog of domain {domain}: generation {nxt} ({catalog_key(domain, nxt)}) is "
                f"missing: generation {nxt + 1} is a DELTA and no snapshot lies between it "
                f"and the newest generation {head}"
            )
        batch = []
        while nxt in present and len(batch) < batch_max:
            batch.append(catalog_key(domain, nxt))
            nxt -= 1
        batch_max = FETCH_BATCH_MAX
        blobs = await gather_bounded((_fetch(store, key) for key in batch), FETCH_CONCURRENCY)
        if stats is not None:
            stats["objects_read"] = stats.get("objects_read", 0) + len(batch)
        for key, blob in zip(batch, blobs):
            kind, _, _, body = await read_generation(store, key, blob)  # a bad transfer is read again
            chain.append((key, kind, body))
            if kind == KIND_SNAPSHOT:
                break
    key, kind, body = chain.pop()
    state = _state_after(None, kind, body, f"catalog {key}")
    if state.domain_id != domain:
        raise FormatError(f"catalog {key}: the snapshot is of domain {state.domain_id}")
    for key, kind, body in reversed(chain):
        state.apply_delta(body, f"catalog {key}")
    return state


async def collect_generations(store: ObjectStore, domain: int, generation: int, *,
                              skew_s: float = SKEW_DEFAULT_S) -> dict[str, Any]:
    """Delete the generations older than the snapshot before the newest one at or below
    ``generation`` (§8.1), unless a recovery lease on the domain is live (§11.3).
    Returns ``{"deleted": n, "deferred_by": lease or None}``.

    Only when ``generation`` is reached from ``keep_from`` by the +1 chain in the store
    (every generation between them present, as a load walks it): a head that is not —
    a forged generation far above the real chain, such as 2^63 — would otherwise make
    the genuine chain look old and have it deleted. Then nothing is deleted (a warning
    says why when something would have been)."""
    snapshot = generation // SNAPSHOT_EVERY * SNAPSHOT_EVERY
    keep_from = snapshot - SNAPSHOT_EVERY
    if keep_from <= 1:
        return {"deleted": 0, "deferred_by": None}
    leases = await live_locks(store, recovery_prefix(domain), skew_s=skew_s)
    if leases:
        return {"deleted": 0, "deferred_by": leases[0].describe()}
    # The chain from keep_from up to generation (< 2 * SNAPSHOT_EVERY steps) and whether
    # anything lies below it, from one listing; what is deleted comes from a second one,
    # in batches (memory bounded however many there are).
    chain: set[int] = set()
    old_seen = 0
    async for g in listed_generations(store, domain):
        if keep_from <= g <= generation:
            chain.add(g)
        elif g < keep_from:
            old_seen += 1
    low = generation if generation in chain else None
    while low is not None and low > keep_from and low - 1 in chain:
        low -= 1
    if low != keep_from:
        if old_seen:  # another collector that got further leaves nothing below keep_from: no warning then
            log.warning("catalog_collect_refused", domain=domain, generation=generation, keep_from=keep_from,
                        reason=f"generation {generation} is not reached from generation {keep_from} by the +1 "
                               f"chain in the store (a gap below {low if low is not None else generation}): "
                               f"{old_seen} older generations kept")
        return {"deleted": 0, "deferred_by": None}

    async def delete(g: int) -> None:
        try:
            await store.delete(catalog_key(domain, g))
        except NotFound:
            pass  # another collector was first

    deleted = 0
    batch: list[int] = []
    async for g in listed_generations(store, domain):
        if g < keep_from:
            batch.append(g)
        if len(batch) >= DELETE_BATCH:
            await gather_bounded((delete(x) for x in batch), DELETE_CONCURRENCY)
            deleted, batch = deleted + len(batch), []
    await gather_bounded((delete(x) for x in batch), DELETE_CONCURRENCY)
    return {"deleted": deleted + len(batch), "deferred_by": None}


class CatalogWriter:
    """A writer of one domain's catalog chain.

    Invariant: ``state`` is the head at ``generation``, which this writer (or the load it
    started from) has seen committed. ``commit`` checks a delta against a copy of the
    head first, so a refused delta or a lost conditional put leaves both unchanged.
    ``owner``, when set, is the site this writer writes for: it writes only the current
    timeline, and only while that timeline is ``owner``'s (§8.5).
    """

    def __init__(self, store: ObjectStore, state: CatalogState, generation: int = 0, *, by: str,
                 owner: str | None = None, snapshot_every: int = SNAPSHOT_EVERY) -> None:
        assert snapshot_every >= 1, snapshot_every
        self.store = store
        self.state = state
        self.generation = generation
        self.owner = owner
        self.snapshot_every = snapshot_every
        self.writer = new_writer_id(by)
        #: Generations of the newest snapshot this writer wrote (for ``collect_generations``).
        self.snapshots_written = 0

    @classmethod
    async def open(cls, store: ObjectStore, domain: int, **kwargs: Any) -> CatalogWriter | None:
        """A writer at the newest generation of ``domain``; None when it has no catalog."""
        state, generation = await load_catalog(store, domain)
        return None if state is None else cls(store, state, generation, **kwargs)

    @property
    def next_generation(self) -> int:
        return self.generation + 1

    def is_snapshot(self, generation: int) -> bool:
        return generation == 1 or generation % self.snapshot_every == 0

    def check_owner(self) -> None:
        """``Fenced`` unless this writer may write the current timeline (§8.5)."""
        tl = self.state.timeline()
        if self.owner is not None and tl.owner != self.owner:
            raise Fenced(f"catalog of domain {self.state.domain_id}: the current timeline {tl.id} is owned by "
                         f"{tl.owner!r}, not {self.owner!r} (forked from timeline {tl.parent} at seq {tl.fork_seq})")

    async def commit(self, delta: dict) -> int:
        """Apply ``delta``, fold the pages it fills (putting them first) and create the
        next generation; return it. ``AlreadyExists`` means someone else created it."""
        domain = self.state.domain_id
        self.check_owner()
        generation = self.next_generation
        check_successor(domain, generation, committing=True)
        where = f"catalog delta for generation {generation} of domain {domain}"
        body = dict(delta, writer=self.writer)
        new = self.state.copy()
        new.apply_delta(body, where)
        folds = new.timeline(body.get("timeline")).fold_plan(domain) if "add_timeline" not in body else []
        if folds:
            await self._put_pages(folds)
            body["add_pages"] = refs_json(_concat_refs(folds))
            new = self.state.copy()
            new.apply_delta(body, where)
        if self.is_snapshot(generation):
            await commit_catalog(self.store, domain, generation, KIND_SNAPSHOT, new.to_snapshot_body(self.writer))
            self.snapshots_written = generation
        else:
            await commit_catalog(self.store, domain, generation, KIND_DELTA, body)
        self.state, self.generation = new, generation
        return generation

    async def _put_pages(self, folds: list[Fold]) -> None:
        # Pages are named by their content: one that exists holds these very bytes.
        for fold in folds:
            try:
                await self.store.put(fold.key, fold.data, if_absent=True)
            except AlreadyExists:
                pass

    async def commit_shared(self, make_delta: Callable[[CatalogState], dict | None], *,
                            retries: int = MAINTENANCE_RETRIES) -> int:
        """``commit(make_delta(state))`` for the owner of a chain that others also write
        (§8.3): a lost create that was this writer's own earlier attempt (its reply lost)
        or a maintenance job's is moved over, and the delta is rebuilt on top —
        ``make_delta`` returns None when nothing is left to commit. Anything else raises
        ``Fenced`` saying why; a ``StoreError`` reading the generations found in the way,
        or a ``CorruptGeneration`` (bytes that stayed bad over several reads), propagates
        (nothing is known of them yet: retry later). Returns the generation that holds
        the change."""
        domain = self.state.domain_id
        for _ in range(retries):
            delta = make_delta(self.state)
            if delta is None:
                return self.generation
            try:
                return await self.commit(delta)
            except AlreadyExists:
                before = self.generation
                why = await self.catch_up()
                if why is not None:
                    raise Fenced(f"catalog of domain {domain}: {why}") from None
                log.info("catalog_caught_up", domain=domain, generations=self.generation - before,
                         horizon_seq=self.state.timeline().horizon_seq)
        raise Fenced(f"catalog of domain {domain}: generation {self.next_generation} lost {retries} races in a row")

    async def catch_up(self) -> str | None:
        """After a lost conditional create: move over the generations created since ours
        that are our own (an earlier attempt whose reply was lost) or only consolidate or
        apply retention (§8.3). Returns None when caught up (the caller rebuilds its
        delta on top), else why not: another writer owns the domain and this one is
        fenced. Only a generation read whole can fence: one whose bytes fail their sums
        on every read raises ``CorruptGeneration`` instead. The head is left at the last
        generation moved over."""
        while True:
            check_successor(self.state.domain_id, self.generation)
            generation = self.next_generation
            key = catalog_key(self.state.domain_id, generation)
            try:
                kind, _, _, body = await read_generation(self.store, key)
                new = _state_after(self.state, kind, body, f"catalog {key}")
            except NotFound:
                return None
            except StoreError:
                # The store failed to answer (busy, unreachable, a cut-off read): nothing
                # is known about that generation yet. The caller retries the commit later.
                raise
            except KeyUnavailable:
                # Sealed with a key this process lacks (a rotation that reached another
                # process first): its configuration's problem, said as such, not a fence.
                raise
            except CorruptGeneration:
                # Bytes that failed their sums on every read say nothing of their writer:
                # the generation may be our own whose reply was lost. Not a fence; the
                # caller tries again later (read_generation already re-read it).
                raise
            except CdpError as exc:  # whole bytes that do not decode or apply: not ours, not maintenance
                return f"another writer created generation {generation}: {exc.message}"
            own = new.writer is not None and new.writer["id"] == self.writer["id"]
            if not own:
                if kind == KIND_DELTA and not set(body) <= MAINTENANCE_KEYS:
                    why = self.state.maintenance_difference(new) or "it is not a maintenance delta"
                else:
                    why = self.state.maintenance_difference(new)
                if why is not None:
                    return f"generation {generation} by {new.writer['by'] if new.writer else '?'}: {why}"
            self.state, self.generation = new, generation


def _concat_refs(folds: list[Fold]) -> np.ndarray:
    return np.concatenate([f.ref for f in folds])
