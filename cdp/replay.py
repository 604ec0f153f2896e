"""Reference replay: rebuild a domain's disks from the store by the plainest method.

Newest base per disk at or below the target, then every record after it, in seq order,
written where it says. It reads whole segments and does Python work per record: it is
the yardstick that tests and ``cdp demo`` compare against, not the recovery path (the
``rocva`` planner resolves the last write per block and fetches only what survives).
Every object read is checked by its codec.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cdp.base_image import (
    CHUNK_SIZE_MIN, HASH_BYTES, HEADER_SIZE, chunk_head_bytes, chunk_namer_of, decode_chunk, decode_manifest,
)
from cdp.catalog import load_catalog
from cdp.catalog_read import CatalogView
from cdp.errors import FormatError, NotFound
from cdp.inventory import image_file_name
from cdp.layout import chunk_key
from cdp.records import KIND_WRITE, KIND_ZERO
from cdp.segment import read_blocks, read_segment_index
from cdp.store.base import ObjectStore, get_bounded


async def replay_reference(store: ObjectStore, domain: int, out_dir: Path, upto_seq: int | None = None, *,
                           initial: dict[int, Path] | None = None,
                           timeline: int | None = None) -> tuple[list[Path], CatalogView]:
    """Write one image per disk of ``domain`` into ``out_dir`` at ``upto_seq`` (default:
    the newest committed seq) on ``timeline`` (default: the current one). ``initial``
    maps a disk to an image to start from when the catalog has no base for it (the disk's
    content before protection began); otherwise a disk without a base starts as zeros.
    Returns the image paths, by disk index."""
    head, generation = await load_catalog(store, domain)
    if head is None:
        raise NotFound(f"domain {domain}: no catalog in {store.describe()}")
    state = CatalogView(store, head, generation, timeline)
    target = state.committed_seq if upto_seq is None else upto_seq
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, fds, base_seq = [], [], []
    try:
        for d in state.disks:
            path = out_dir / image_file_name(d["vm"], d["name"])
            paths.append(path)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            fds.append(fd)
            os.ftruncate(fd, d["size"])
            base = max((b for b in state.bases if b["disk"] == d["disk"] and b["seq"] <= target),
                       key=lambda b: b["seq"], default=None)
            if base is not None:
                await _restore_base(store, base["key"], fd, d["size"])
                base_seq.append(base["seq"])
            else:
                if initial and d["disk"] in initial:
                    _copy_into(initial[d["disk"]], fd)
                base_seq.append(0)
        first = min(base_seq) + 1
        for row in await state.rows_between(first, target):
            await _apply_segment(store, state, row, fds, np.array(base_seq, dtype=np.uint64), target)
    finally:
        for fd in fds:
            os.close(fd)
    return paths, state


async def _restore_base(store: ObjectStore, key: str, fd: int, disk_size: int) -> None:
    # The largest objects the format allows here (rocva.plan.manifest_bytes_max and
    # chunk_bytes_max, which this module below rocva cannot import): one entry per
    # chunk of the smallest size; a chunk's header, table and raw bytes.
    manifest = decode_manifest(key, await get_bounded(
        store, key, HEADER_SIZE + HASH_BYTES * -(-disk_size // CHUNK_SIZE_MIN)))
    zero = manifest.zero_mask()
    for i in np.flatnonzero(~zero):
        h = manifest.hash_of(int(i))
        ck = chunk_key(h)
        chunk_len = manifest.chunk_len(int(i))
        stored = await get_bounded(store, ck, chunk_head_bytes(chunk_len) + chunk_len)
        raw = decode_chunk(ck, stored, h, namer=chunk_namer_of(store))
        os.pwrite(fd, raw, int(i) * manifest.chunk_size)


def _copy_into(src: Path, fd: int) -> None:
    with open(src, "rb") as f:
        at = 0
        while chunk := f.read(8 << 20):
            os.pwrite(fd, chunk, at)
            at += len(chunk)


async def _apply_segment(store: ObjectStore, state: CatalogView, row: np.void, fds: list[int],
                         base_seq: np.ndarray, target: int) -> None:
    key = state.row_key(row)
    index = await read_segment_index(store, key)
    raw = await read_blocks(store, index, 0, len(index.blocks) - 1) if len(index.blocks) else b""
    rec = index.records
    # A row inherited at a fork holds its segment only up to the fork (FORMAT.md §8.5).
    keep = (rec["seq"] <= min(target, int(row["last_seq"]))) & (rec["kind"] <= KIND_ZERO)
    unknown = keep & (rec["disk"] >= len(base_seq))
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise FormatError(f"segment {key}: seq {int(rec['seq'][i])} writes disk {int(rec['disk'][i])}, "
                          f"which the catalog does not list")
    disk = np.where(keep, rec["disk"], 0)  # rows not kept look at disk 0: any valid index
    keep &= rec["seq"] > base_seq[disk]
    for i in np.flatnonzero(keep):
        disk, off, n = int(rec["disk"][i]), int(rec["offset"][i]), int(rec["length"][i])
        if rec["kind"][i] == KIND_WRITE:
            at = int(rec["raw_pos"][i])
            os.pwrite(fds[disk], raw[at : at + n], off)
        else:
            os.pwrite(fds[disk], bytes(n), off)

