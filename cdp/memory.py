"""Process memory policy for the daemons and the command line tools (``cdp``, ``rocva``).

A buffer that comes from a fresh mapping costs a page fault per 4 KiB the first time each
page is touched, and on this project's machines (VMs whose freed pages go back to the
host) a fault costs about as much as a copy of the page at 0.3 GB/s. glibc's default
gives every block over its mmap threshold a mapping of its own, unmapped on free: the
DRVA's segments (about 11 MiB each, joined once built) paid that on every byte.

So large blocks come from the heap and stay there: the mmap threshold is pinned at
32 MiB (glibc's largest), and the heap keeps up to ``trim_threshold`` of free memory at
its top instead of giving it back at once, so that the next segment reuses warm pages.
``benchmarks.ingest --quick``: DRVA CPU 3.75-4.05 -> 3.31 CPU-s/GB, DRVA-only 64 KiB
424-445 -> 526 MB/s, RSS peak 248 -> 256 MB; ``benchmarks.scale --domains 100``: RSS
peak 105-112 -> 119 MB, CPU 7.3-7.7 -> 5.75 CPU-s/GB. What the RSS can reach stays
bounded by what the daemon holds at once (bounded queues) plus ``trim_threshold``.
A 1 GiB recovery (``cdp recover``) reads 16 MiB runs joined from 512 KiB reads: with the
policy it measured 1.98-2.22 s and 2.6-2.9 CPU-s, without it 2.06-2.37 s and 2.8-3.2.

Pinning the threshold (any value) also turns off glibc's own raising of it, and capping
the arenas stops each worker thread from growing a heap of its own.
"""

from __future__ import annotations

import ctypes

from cdp.libc import libc_function

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def bound_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20, arenas: int = 2) -> bool:
    """Apply the policy above; False where the C library is not glibc (nothing done)."""
    mallopt = libc_function(["mallopt"], [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    return (bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
            and bool(mallopt(_M_ARENA_MAX, arenas)))
