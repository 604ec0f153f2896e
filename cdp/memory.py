"""Process memory policy for the daemons.

glibc's malloc raises its mmap threshold each time a large block is freed, after which
large buffers (segments: up to tens of megabytes) come from the heap and are not given
back to the system when freed: the RSS then records the peak of fragmentation, not of
live data. Pinning the threshold keeps every buffer over it in its own mapping, returned
on free, and capping the arenas stops each worker thread from growing its own heap.
4 MiB, not less: frames (~1 MiB) then stay on the reused heap, since a fresh mapping per
frame costs a page fault per 4 KiB and measured 30 % of the 64 KiB ingest throughput.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def bound_malloc(mmap_threshold: int = 4 << 20, arenas: int = 2) -> bool:
    """Apply the policy above; False where the C library is not glibc (nothing done)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_ARENA_MAX, arenas))
