"""The catalog: a chain of objects per domain that makes the store self-describing (FORMAT.md §8).

Generation 1, 2, 3, … of ``d/<domain>/cat/<generation>.cat``: each a ``SNAPSHOT`` (the
whole ``CatalogState``) or a ``DELTA`` (the changes since the generation before). The state
at generation ``g`` is the newest snapshot at or below ``g`` with every delta after it
applied in order; ``load_catalog`` rebuilds the state at the newest generation.

Ownership is fencing by conditional create: a generation is written with
``put(if_absent=True)`` after every object it names is durable; whoever creates
generation ``n + 1`` owns the domain, and a writer whose create fails (``AlreadyExists``,
propagated unchanged) has been fenced off and must stop.

This module holds the object codec, ``load_catalog``/``commit_catalog`` and the small
``CatalogWriter``; the state and the delta rules are in ``cdp.catalog_state``.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import xxhash

from cdp.catalog_state import SEGMENT_DTYPE, CatalogState, SegmentRef, SegmentTable
from cdp.errors import AlreadyExists, CdpError, FormatError, NotFound
from cdp.layout import catalog_key, catalog_prefix, parse_catalog_key
from cdp.logs import get_logger
from cdp.summed import checked_body, pack_summed, unpack_summed

__all__ = [
    "KIND_DELTA", "KIND_SNAPSHOT", "SEGMENT_DTYPE", "CatalogState", "CatalogWriter", "SegmentRef",
    "SegmentTable", "commit_catalog", "decode_catalog_object", "encode_catalog_object",
    "load_catalog",
]

CATALOG_MAGIC = b"CDPC"
CATALOG_VERSION = 1
KIND_DELTA = 1  # §8.1
KIND_SNAPSHOT = 2  # §8.1
KIND_NAMES = {KIND_DELTA: "DELTA", KIND_SNAPSHOT: "SNAPSHOT"}
BODY_LEN_MAX = 256 << 20  # §8.1
#: Catalog objects fetched at once while walking back from the newest generation.
FETCH_BATCH_MAX = 8
#: A writer writes a SNAPSHOT instead of a DELTA every this many generations, which
#: bounds the deltas a load must apply.
SNAPSHOT_EVERY_DEFAULT = 64
#: Catalog races lost to consolidation/retention jobs in a row before ``commit_shared``
#: gives up (fenced).
MAINTENANCE_RETRIES = 16

log = get_logger("cdp.catalog")

# FORMAT.md §8.1: catalog object header, 64 bytes; header_xxh3 (last field) covers [0, 56).
_HEADER = struct.Struct("<4sHHIIQQ24sQ")
assert _HEADER.size == 64, "FORMAT.md §8.1"
HEADER_SIZE = _HEADER.size
_HEADER_ZERO = {"reserved": (32, 24)}  # must be zero: {name: (offset, size)}


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def encode_catalog_object(domain: int, generation: int, kind: int, body: dict) -> bytes:
    """A catalog object (§8.1): header, then ``body`` as compact, key-sorted UTF-8 JSON."""
    if kind not in KIND_NAMES:
        raise ValueError(f"catalog kind {kind} not in {sorted(KIND_NAMES)}")
    if generation < 1:
        raise ValueError("a catalog generation is >= 1")
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    data = text.encode("utf-8")
    if len(data) > BODY_LEN_MAX:
        raise ValueError(f"catalog body of {len(data)} bytes > {BODY_LEN_MAX}")
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
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FormatError(f"{where}: the body at offset 64 is not UTF-8 JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise FormatError(f"{where}: the body is not a JSON object")
    return kind, generation, domain, body


async def commit_catalog(store, domain: int, generation: int, kind: int, body: dict) -> str:
    """Create generation ``generation`` with a conditional put; return its key.

    ``AlreadyExists`` propagates: another writer created that generation first, so this
    one has lost ownership of the domain (fenced) and must stop.
    """
    key = catalog_key(domain, generation)
    await store.put(key, encode_catalog_object(domain, generation, kind, body), if_absent=True)
    return key


async def load_catalog(store, domain: int) -> tuple[CatalogState | None, int]:
    """(state, generation) at the newest catalog generation of ``domain``; (None, 0) if none.

    Walks back from the newest generation to the newest snapshot (fetching a few objects
    at once), then applies the deltas after it in order. A generation missing from that
    chain is a FormatError naming it; so is any object that fails to decode or apply.
    """
    generations = []
    async for info in store.list(catalog_prefix(domain)):
        key_domain, generation = parse_catalog_key(info.key)
        if key_domain != domain:  # pragma: no cover - the prefix guarantees it
            raise FormatError(f"catalog {info.key}: listed under domain {domain}")
        generations.append(generation)
    if not generations:
        return None, 0
    present = set(generations)
    head = max(generations)
    chain: list[tuple[str, int, Any]] = []  # (key, kind, body), newest first
    nxt = head
    while not chain or chain[-1][1] != KIND_SNAPSHOT:
        if nxt < 1:
            raise FormatError(
                f"catalog of domain {domain}: generation 1 is a DELTA: the chain from "
                f"generation {head} has no snapshot"
            )
        if nxt not in present:
            raise FormatError(
                f"catalog of domain {domain}: generation {nxt} ({catalog_key(domain, nxt)}) is "
                f"missing: generation {nxt + 1} is a DELTA and no snapshot lies between it "
                f"and the newest generation {head}"
            )
        batch = []
        while nxt in present and len(batch) < FETCH_BATCH_MAX:
            batch.append(catalog_key(domain, nxt))
            nxt -= 1
        blobs = await asyncio.gather(*(store.get(key) for key in batch))
        for key, blob in zip(batch, blobs):
            kind, _, _, body = decode_catalog_object(key, blob)
            chain.append((key, kind, body))
            if kind == KIND_SNAPSHOT:
                break
    key, _, body = chain.pop()
    state = CatalogState.from_snapshot_body(body, f"catalog {key}")
    if state.domain_id != domain:
        raise FormatError(f"catalog {key}: the snapshot is of domain {state.domain_id}")
    for key, _, body in reversed(chain):
        state.apply_delta(body, f"catalog {key}")
    return state, head


class CatalogWriter:
    """The one writer of a domain's catalog chain.

    Invariant: ``state`` is the state at ``generation``, which this writer (or the load
    it started from) has seen committed. ``commit`` checks a delta against a copy of the
    state first, so a refused delta or a lost conditional put leaves both unchanged.
    """

    def __init__(self, store, state: CatalogState, generation: int = 0, *,
                 snapshot_every: int = SNAPSHOT_EVERY_DEFAULT) -> None:
        assert snapshot_every >= 1, snapshot_every
        self.store = store
        self.state = state
        self.generation = generation
        self.snapshot_every = snapshot_every

    @classmethod
    async def open(cls, store, domain: int, **kwargs: Any) -> CatalogWriter | None:
        """A writer at the newest generation of ``domain``; None when it has no catalog."""
        state, generation = await load_catalog(store, domain)
        return None if state is None else cls(store, state, generation, **kwargs)

    @property
    def next_generation(self) -> int:
        return self.generation + 1

    async def commit(self, delta: dict) -> int:
        """Apply ``delta`` and create the next generation; return it.

        The next generation is a SNAPSHOT when it is generation 1 or a multiple of
        ``snapshot_every``, else the DELTA itself. ``AlreadyExists`` means fenced.
        """
        domain = self.state.domain_id
        new = self.state.copy()
        new.apply_delta(delta, f"catalog delta for generation {self.next_generation} of domain {domain}")
        generation = self.next_generation
        if generation == 1 or generation % self.snapshot_every == 0:
            await commit_catalog(self.store, domain, generation, KIND_SNAPSHOT, new.to_snapshot_body())
        else:
            await commit_catalog(self.store, domain, generation, KIND_DELTA, delta)
        self.state, self.generation = new, generation
        return generation

    async def commit_shared(self, delta: dict, *, retries: int = MAINTENANCE_RETRIES) -> int:
        """``commit`` for the owner of a chain that consolidation/retention jobs also write
        (FORMAT.md §8.3): a lost conditional create that was our own put (its reply lost)
        counts as done; one lost to maintenance generations is absorbed and the delta
        retried on top. Anything else — another owner — raises ``AlreadyExists`` saying
        why: this writer is fenced. Returns the generation that holds ``delta``."""
        domain = self.state.domain_id
        for _ in range(retries):
            generation = self.next_generation
            try:
                return await self.commit(delta)
            except AlreadyExists:
                if await self._is_own_create(generation, delta):
                    return generation
                before = self.generation
                why = await self.catch_up_maintenance()
                if why is not None:
                    raise AlreadyExists(f"catalog of domain {domain}: {why}") from None
                log.info("catalog_maintenance_absorbed", domain=domain, generations=self.generation - before,
                         horizon_seq=self.state.horizon_seq, bases=len(self.state.bases))
        raise AlreadyExists(f"catalog of domain {domain}: generation {self.next_generation} lost "
                            f"{retries} races in a row")

    async def _is_own_create(self, generation: int, delta: dict) -> bool:
        """After AlreadyExists at ``generation``: is the object there the one our put wrote
        (the reply was lost, the put was not)? Then the state moves to it."""
        key = catalog_key(self.state.domain_id, generation)
        try:
            _, gen, _, body = decode_catalog_object(key, await self.store.get(key))
        except CdpError:
            return False
        new = self.state.copy()
        new.apply_delta(delta)
        if body == delta or body == new.to_snapshot_body():
            self.state, self.generation = new, gen
            return True
        return False

    async def catch_up_maintenance(self) -> str | None:
        """After a lost conditional create: move over the generations others created since
        ours, provided each only consolidates or applies retention (§8.3: bases added or
        removed, the oldest segments removed, the horizon moved). Returns None when caught
        up (the caller retries its delta on top), else why not: another writer owns the
        domain and this one is fenced. The state is left at the last absorbed generation."""
        while True:
            generation = self.next_generation
            key = catalog_key(self.state.domain_id, generation)
            try:
                kind, _, _, body = decode_catalog_object(key, await self.store.get(key))
                if kind == KIND_SNAPSHOT:
                    new = CatalogState.from_snapshot_body(body, f"catalog {key}")
                else:
                    new = self.state.copy()
                    new.apply_delta(body, f"catalog {key}")
            except NotFound:
                return None
            except CdpError as exc:
                return f"another writer created generation {generation}: {exc.message}"
            why = self.state.maintenance_difference(new)
            if why is not None:
                return f"another writer created generation {generation}: {why}"
            self.state, self.generation = new, generation
