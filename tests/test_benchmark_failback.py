"""The failback benchmark's own parts (``benchmarks.failback``): its checksum-scan
baseline makes A equal B and writes exactly the 64 KiB blocks that differ, and the
changed-pages count sees every differing 4 KiB page and no other."""

from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from benchmarks.failback import PAGE, SCAN_BLOCK, SCAN_CHUNK, changed_pages, checksum_scan


def bar() -> tqdm:
    return tqdm(disable=True)


def test_checksum_scan_copies_exactly_the_blocks_that_differ(tmp_path):
    rng = np.random.default_rng(5)
    sizes = [SCAN_CHUNK + 3 * SCAN_BLOCK, 2 * SCAN_BLOCK]  # a chunk and a short one; a disk under a chunk
    a_paths, b_paths, differ = [], [], 0
    for k, size in enumerate(sizes):
        b = bytearray(rng.bytes(size))
        a = bytearray(b)
        blocks = size // SCAN_BLOCK
        changed = {0, blocks - 1, blocks // 2, min(blocks // 2 + 1, blocks - 1)}  # the edges, a run of two
        for blk in changed:
            a[blk * SCAN_BLOCK + 100] ^= 0xFF
        differ += len(changed) * SCAN_BLOCK
        for paths, content, side in ((a_paths, a, "a"), (b_paths, b, "b")):
            paths.append(tmp_path / f"{side}{k}.img")
            paths[-1].write_bytes(content)
    moved = checksum_scan(a_paths, b_paths, bar())
    assert moved == differ
    assert [p.read_bytes() for p in a_paths] == [p.read_bytes() for p in b_paths]
    assert checksum_scan(a_paths, b_paths, bar()) == 0


def test_changed_pages_counts_4k_pages(tmp_path):
    ref = bytearray(os.urandom(SCAN_CHUNK + 8 * PAGE))
    other = bytearray(ref)
    for page in (0, 3, SCAN_CHUNK // PAGE, SCAN_CHUNK // PAGE + 7):
        other[page * PAGE + PAGE - 1] ^= 1
    path = tmp_path / "x.img"
    path.write_bytes(other)
    got = changed_pages(path, ref, bar())
    assert np.flatnonzero(got).tolist() == [0, 3, SCAN_CHUNK // PAGE, SCAN_CHUNK // PAGE + 7]
