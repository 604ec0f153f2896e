"""Whole-file digests, for checking recovered images against their primaries."""

from __future__ import annotations

import hashlib
import os

READ_BYTES = 8 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file's bytes, read in 8 MiB chunks into one reused buffer."""
    digest = hashlib.sha256()
    buf = bytearray(READ_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()
