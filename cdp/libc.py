"""The C library's functions that Python's ``os`` lacks (``fallocate``, ``sync_file_range``,
``mallopt``), looked up one way for every module that needs one.

Looked up in the process's own symbols (``dlopen(NULL)``), where the C library already
is: no ``ctypes.util.find_library`` (which runs ``ldconfig``) and no guessed file name.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from typing import Any


@functools.cache
def _symbols() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def libc_function(names: Sequence[str], argtypes: Sequence[Any], restype: Any = ctypes.c_int) -> Any:
    """The first of ``names`` that the C library has, with these argument and result
    types (errno kept for ``ctypes.get_errno``); None where it has none of them (not
    Linux, not glibc): callers then do without."""
    lib = _symbols()
    if lib is None:
        return None
    for name in names:
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.argtypes = list(argtypes)
            fn.restype = restype
            return fn
    return None
