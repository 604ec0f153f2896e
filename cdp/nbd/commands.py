"""What each NBD command does to a backend, and how its answer is encoded
(docs/FORMAT.md §17.3, §17.4). No connection state here: the connection
(``cdp.nbd.server``) checks a request, calls ``run_command`` and queues the reply."""

from __future__ import annotations

import errno

from cdp.errors import ConfigError, LogFull
from cdp.nbd import protocol as nbd
from cdp.nbd.backend import NbdBackend

Data = bytes | bytearray | memoryview


async def run_command(backend: NbdBackend, req: nbd.Request, payload: bytes) -> Data | None:
    """Do ``req`` (already checked against its export: ``nbd.request_error``) on ``backend``:
    a READ's data, else None. Raises what the backend raises."""
    fua = bool(req.flags & nbd.CMD_FLAG_FUA)
    if req.command == nbd.CMD_READ:
        data = await backend.read(req.offset, req.length) if req.length else b""
        if len(data) != req.length:
            raise OSError(errno.EIO, f"backend returned {len(data)} bytes for a read of {req.length}")
        return data
    if req.command == nbd.CMD_WRITE:
        if req.length:
            await backend.write(req.offset, payload, fua)
    elif req.command == nbd.CMD_FLUSH:
        await backend.flush()
    elif req.command == nbd.CMD_TRIM:
        if req.length:
            await backend.trim(req.offset, req.length)
        if fua:
            await backend.flush()
    elif req.command == nbd.CMD_WRITE_ZEROES:
        if req.length:
            may_trim = not req.flags & nbd.CMD_FLAG_NO_HOLE
            await backend.write_zeroes(req.offset, req.length, may_trim, fua)
    else:
        raise AssertionError(f"request_error let {req.name} through")
    return None


def nbd_errno(exc: BaseException) -> int:
    """The NBD error for a backend failure (the protocol's mapping of errno values)."""
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return nbd.ENOSPC
        if exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
            return nbd.EPERM
        if exc.errno == errno.EINVAL:
            return nbd.EINVAL
        return nbd.EIO
    if isinstance(exc, LogFull):
        return nbd.ENOSPC
    if isinstance(exc, ConfigError):
        return nbd.EINVAL
    return nbd.EIO


def ok_reply(req: nbd.Request, data: Data | None, structured: bool) -> tuple[Data, ...]:
    """The parts of the successful reply to ``req`` (``data``: a READ's)."""
    if req.command != nbd.CMD_READ:
        return (nbd.pack_simple_reply(req.handle),)
    if not structured:
        return nbd.pack_simple_reply(req.handle), data
    if req.length:
        return nbd.pack_data_chunk_header(req.handle, req.offset, req.length, done=True), data
    return (nbd.pack_none_chunk(req.handle),)  # a data chunk holds at least one byte


def error_reply(req: nbd.Request, code: int, message: str, structured: bool) -> tuple[bytes]:
    """The reply failing ``req`` with the NBD error ``code`` (the message only with structured replies)."""
    if structured:
        return (nbd.pack_error_chunk(req.handle, code, message),)
    return (nbd.pack_simple_reply(req.handle, code),)
