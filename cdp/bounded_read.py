"""Reading at most so many bytes: of a file, or of a stream from a peer.

Whatever sent them — a file planted where a small record is expected (a link to
``/dev/zero``, a 2 GiB sparse file), a server answering with a gigabyte — what is read
stays below the caller's bound. A caller that must tell "exactly the bound" from "more"
asks for one byte past it.
"""

from __future__ import annotations

import os
from typing import Any

READ_CHUNK_BYTES_MAX = 1 << 20  # one read's buffer, however large the bound


def pread_upto(fd: int, limit: int, offset: int = 0) -> bytes:
    """At most ``limit`` bytes of the file at ``fd`` from ``offset`` (fewer at its end),
    whatever its position."""
    parts = []
    got = 0
    while got < limit:
        chunk = os.pread(fd, min(limit - got, READ_CHUNK_BYTES_MAX), offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


async def read_at_most(stream: Any, limit: int) -> bytes:
    """At most ``limit`` bytes of ``stream`` (anything with an async ``read(n)``: an
    aiohttp body, a botocore streaming body), fewer at its end."""
    parts = []
    got = 0
    while got < limit:
        chunk = await stream.read(limit - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)
