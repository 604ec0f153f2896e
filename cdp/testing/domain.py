"""A test domain built with the library itself: records -> segments -> catalog, bases.

``DomainBuilder`` appends records (``write``, ``zero``, ``mark``, ``resync_begin/end``),
keeps the expected content of every disk in memory (``model``), and on ``seal`` encodes
the pending records as one segment (``build_segment_from_arrays``), puts it and commits
a catalog delta, exactly as a DRVA would. ``add_base`` stores the current content of a
disk as a base image (content-addressed chunks + manifest). No daemon is involved.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from cdp.base_image import ZERO_HASH, chunk_namer_of, encode_chunk, encode_manifest, is_zero
from cdp.catalog import CatalogState, CatalogWriter
from cdp.catalog_fork import fork_timeline
from cdp.digest import sha256_file
from cdp.layout import base_manifest_key, chunk_key, segment_key
from cdp.records import (
    KIND_MARK, KIND_RESYNC_BEGIN, KIND_RESYNC_END, KIND_WRITE, KIND_ZERO, RECORD_DTYPE,
)
from cdp.replay import replay_reference
from cdp.segment import build_segment_from_arrays, decode_segment
from cdp.store.base import ObjectStore

TS0 = 1_700_000_000_000_000_000
SECTOR = 512
SITE = "site-a"  # the owner of the builder's timelines


def sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


file_sha256 = sha256_file  # the tests' name for it


class DomainBuilder:
    """One domain in ``store``; ``model[k]`` is disk ``k``'s content after record ``seq``."""

    def __init__(self, store: ObjectStore, *, domain: int = 7,
                 disks=(("vm1", "disk0", 256 << 10), ("vm2", "disk1", 128 << 10)),
                 block_raw_size: int = 8 << 10, ns_per_seq: int = 1_000_000, name: str = "dom") -> None:
        self.store = store
        self.domain = domain
        self.name = name
        self.disks = [{"disk": i, "vm": vm, "name": name, "size": size} for i, (vm, name, size) in enumerate(disks)]
        self.model = [bytearray(d["size"]) for d in self.disks]
        self.block_raw_size = block_raw_size
        self.ns_per_seq = ns_per_seq
        self.seq = 0
        self.windows: list[dict] = []
        self.marks: list[dict] = []
        self.segment_keys: list[str] = []
        self.chunk_keys: set[str] = set()
        self.base_keys: list[str] = []
        self._records: list[tuple] = []
        self._payload: list[bytes] = []
        self._new_marks: list[dict] = []
        self.writer: CatalogWriter | None = None

    def ts(self, seq: int) -> int:
        """Timestamps go up every other seq: equal neighbours test "last record <= T"."""
        return TS0 + (seq // 2) * self.ns_per_seq

    async def start(self) -> DomainBuilder:
        self.writer = CatalogWriter(self.store, CatalogState.new(self.domain, self.name, TS0, SITE), by="test builder",
                                    owner=SITE, snapshot_every=5)
        await self._commit({"disks": self.disks})
        return self

    @property
    def timeline(self) -> int:
        return self.writer.state.current

    async def _commit(self, delta: dict) -> None:
        """Commit like a DRVA: a consolidation job's generation is absorbed, then retried on
        (and a generation of ours whose reply was lost is not committed twice)."""
        def make(state) -> dict | None:
            tl = state.timeline()
            rows = delta.get("add_segments")
            if rows and tl.committed_seq >= rows["last_seq"][-1]:
                return None
            if any(b in tl.bases for b in delta.get("add_bases", [])):
                return None
            return delta

        await self.writer.commit_shared(make)

    # ---- records

    def _add(self, kind: int, disk: int, offset: int, length: int, payload: bytes = b"") -> int:
        self.seq += 1
        self._records.append((self.seq, self.ts(self.seq), offset, length, disk, kind))
        if payload:
            self._payload.append(payload)
        return self.seq

    def write(self, disk: int, offset: int, data: bytes) -> int:
        assert offset % SECTOR == 0 and len(data) % SECTOR == 0 and data
        self.model[disk][offset : offset + len(data)] = data
        return self._add(KIND_WRITE, disk, offset, len(data), data)

    def zero(self, disk: int, offset: int, length: int) -> int:
        self.model[disk][offset : offset + length] = bytes(length)
        return self._add(KIND_ZERO, disk, offset, length)

    def mark(self, name: str) -> int:
        data = name.encode()
        seq = self._add(KIND_MARK, 0, 0, len(data), data)
        mark = {"name": name, "seq": seq, "ts": self.ts(seq)}
        self._new_marks.append(mark)
        self.marks.append(mark)
        return seq

    def resync_begin(self) -> int:
        seq = self._add(KIND_RESYNC_BEGIN, 0, 0, 0)
        self.windows.append({"kind": "resync", "first_seq": seq, "last_seq": None})
        return seq

    def resync_end(self) -> int:
        seq = self._add(KIND_RESYNC_END, 0, 0, 0)
        self.windows[-1] = {**self.windows[-1], "last_seq": seq}
        return seq

    def snapshot(self) -> list[str]:
        """sha256 of every disk now (after record ``self.seq``)."""
        return [sha256(m) for m in self.model]

    # ---- objects

    async def seal(self) -> str | None:
        """Put the pending records as one segment and commit it in the catalog."""
        if not self._records:
            return None
        records = np.zeros(len(self._records), dtype=RECORD_DTYPE)
        for name, col in zip(("seq", "timestamp_ns", "offset", "length", "disk", "kind"), zip(*self._records)):
            records[name] = col
        data = build_segment_from_arrays(self.domain, records, b"".join(self._payload),
                                         block_raw_size=self.block_raw_size)
        first, last = int(records["seq"][0]), int(records["seq"][-1])
        key = segment_key(self.domain, self.timeline, first, last)
        await self.store.put(key, data)
        index, _ = decode_segment(key, data)
        delta = {"add_segments": {"timeline": [self.timeline], "first_seq": [first], "last_seq": [last],
                                  "object_last_seq": [last], "first_ts": [self.ts(first)],
                                  "last_ts": [self.ts(last)], "size": [len(data)],
                                  "payload_raw_len": [index.payload_raw_len]},
                 "set_windows": [dict(w) for w in self.windows]}
        if self._new_marks:
            delta["add_marks"] = self._new_marks
        await self._commit(delta)
        self.segment_keys.append(key)
        self._records, self._payload, self._new_marks = [], [], []
        return key

    async def add_base(self, disk: int, *, chunk_size: int = 64 << 10, seeding_until: int | None = None,
                       origin: str = "seed") -> str:
        """Store disk ``disk`` as it is now as a base at ``self.seq`` (a disk joining with
        content unless ``origin="consolidation"``); optionally declare the seeding window
        ``seq + 1 .. seeding_until``."""
        seq = self.seq
        content = bytes(self.model[disk])
        count = -(-len(content) // chunk_size)
        hashes = np.zeros((count, 16), dtype=np.uint8)
        for i in range(count):
            raw = content[i * chunk_size : (i + 1) * chunk_size]
            if is_zero(raw):
                continue
            h, obj = encode_chunk(raw, chunk_namer_of(self.store))  # keyed names in a sealed store (§19.6)
            hashes[i] = np.frombuffer(h, dtype=np.uint8)
            if chunk_key(h) not in self.chunk_keys:
                await self.store.put(chunk_key(h), obj)
                self.chunk_keys.add(chunk_key(h))
        assert ZERO_HASH == bytes(16)
        key = base_manifest_key(self.domain, self.timeline, seq, disk)
        await self.store.put(key, encode_manifest(self.domain, disk, seq, len(content), chunk_size, hashes))
        delta = {"add_bases": [{"timeline": self.timeline, "seq": seq, "disk": disk, "key": key, "origin": origin}]}
        if seeding_until is not None:
            self.windows.append({"kind": "seeding", "first_seq": seq + 1, "last_seq": seeding_until})
            delta["set_windows"] = [dict(w) for w in self.windows]
        await self._commit(delta)
        self.base_keys.append(key)
        return key

    async def retire(self, segments: int, horizon: int) -> None:
        """Retention: raise the horizon, which drops the oldest ``segments`` segments
        (those ending at or before it: FORMAT.md §8.2)."""
        self.segment_keys = self.segment_keys[segments:]
        await self._commit({"horizon_seq": horizon})

    async def fork(self, fork_seq: int, model_at_fork: list[bytearray], owner: str) -> int:
        """Branch the domain at ``fork_seq`` (FORMAT.md §8.5) and go on writing the new
        timeline as ``owner`` from there, with the disks as they were at ``fork_seq``
        (``model_at_fork``); returns the new timeline's id."""
        assert not self._records, "seal first"
        state, generation = await fork_timeline(self.store, self.domain, fork_seq, owner)
        self.writer = CatalogWriter(self.store, state, generation, by=f"test builder of {owner}", owner=owner,
                                    snapshot_every=5)
        self.seq = fork_seq
        self.model = [bytearray(m) for m in model_at_fork]
        self.marks = [m for m in self.marks if m["seq"] <= fork_seq]
        self.windows = [w for w in self.windows if w["first_seq"] <= fork_seq]
        return state.current

    async def reference_paths(self, out_dir: Path, seq: int, timeline: int | None = None):
        """``cdp.replay.replay_reference`` at ``seq`` on ``timeline``: (paths, view)."""
        return await replay_reference(self.store, self.domain, out_dir, seq, timeline=timeline)

    async def reference(self, out_dir: Path, seq: int) -> list[str]:
        """sha256 of every disk at ``seq`` by ``cdp.replay.replay_reference``."""
        paths, _ = await replay_reference(self.store, self.domain, out_dir, seq)
        return [file_sha256(p) for p in paths]


async def random_workload(b: DomainBuilder, rng: np.random.Generator, ops: int, *, seal_every: int = 10,
                    max_sectors: int = 64, marks: bool = True, resync: bool = False) -> dict[int, list[str]]:
    """Append ``ops`` random records (writes of varying sizes that overlap, zero-filled
    writes, ZEROs, marks, optionally one resync window), sealing a segment every
    ``seal_every`` records on average and at the end; returns {mark seq: shas}."""
    snaps = {}
    resync_at = int(rng.integers(ops // 4, ops // 2 + 1)) if resync and ops >= 8 else -1
    for op in range(ops):
        if op == resync_at:
            b.resync_begin()
        elif resync_at >= 0 and op == resync_at + ops // 4:
            b.resync_end()
        disk = int(rng.integers(0, len(b.disks)))
        size = b.disks[disk]["size"]
        sectors = int(rng.integers(1, min(max_sectors, size // SECTOR) + 1))
        offset = int(rng.integers(0, size // SECTOR - sectors + 1)) * SECTOR
        roll = rng.random()
        if marks and roll < 0.08:
            snaps[b.mark(f"m{op}")] = b.snapshot()
        elif roll < 0.22:
            b.zero(disk, offset, sectors * SECTOR)
        elif roll < 0.27:
            b.write(disk, offset, bytes(sectors * SECTOR))  # stored as ZERO by the segment writer
        else:
            b.write(disk, offset, rng.bytes(sectors * SECTOR))
        if rng.random() < 1 / seal_every:
            await b.seal()
    await b.seal()
    return snaps
