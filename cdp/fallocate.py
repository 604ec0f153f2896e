"""``fallocate(2)`` from libc: punching holes and zeroing ranges of a file in place.

Python's ``os`` has only ``posix_fallocate`` (which reserves space); the modes that make
a range read as zeros without writing it need libc's own call. One binding for the
primary disks (``iofilter_sim.disks``), recovered images (``rocva.resume``) and NBD
exports (``cdp.nbd.backend``).
"""

from __future__ import annotations

import ctypes
import errno
import os

from cdp.libc import libc_function

# Modes (linux/falloc.h).
KEEP_SIZE = 0x01
PUNCH_HOLE = 0x02
ZERO_RANGE = 0x10
# The file system (or the platform) cannot do a mode: callers fall back to writing zeros.
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


_fallocate = libc_function(["fallocate64", "fallocate"], [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])
available = _fallocate is not None  # False where libc has no fallocate (not Linux)


def fallocate(fd: int, mode: int, offset: int, length: int, what: str = "") -> bool:
    """``fallocate(fd, mode, offset, length)``: True when done, False when unavailable or
    the file system does not support ``mode``; any other failure is an ``OSError``
    (its message starts with ``what``, when given)."""
    if _fallocate is None:
        return False
    if _fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, f"{what}: {os.strerror(err)}" if what else os.strerror(err))
