"""What an NBD export serves: the backend protocol, and ``FileBackend`` over a plain file.

The server (``cdp.nbd.server``) checks every request against ``size``,
``read_only`` and ``block_sizes`` before it calls a backend, so a backend only ever sees
in-range, aligned requests of at most ``block_sizes.maximum`` bytes (trims excepted:
they may span the whole export). A backend reports a failure by raising ``OSError``
(its errno picks the NBD error) or a ``cdp.errors.CdpError``; the server maps both.

Backends to come: the filter's capture path (writes recorded in order, FLUSH and FUA
durable at the DRVA) and the store-backed mount of a past point (read-only).
"""

from __future__ import annotations

import asyncio
import errno
import os
from dataclasses import dataclass
from typing import Protocol

from cdp.errors import ConfigError
from cdp.fallocate import KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE, fallocate
from cdp.nbd.protocol import REQUEST_BYTES_MAX


@dataclass(frozen=True, slots=True)
class BlockSizes:
    """The block size constraints an export advertises (NBD_INFO_BLOCK_SIZE)."""

    minimum: int = 512
    preferred: int = 4096
    maximum: int = REQUEST_BYTES_MAX

    def check(self, size: int, where: str) -> None:
        """Refuse constraints the protocol forbids (FORMAT.md §17.4)."""
        def power_of_two(n: int) -> bool:
            return n > 0 and n & (n - 1) == 0

        if not power_of_two(self.minimum) or self.minimum > 1 << 16:
            raise ConfigError(f"{where}: minimum block size {self.minimum} is not a power of 2 up to 64 KiB")
        if not power_of_two(self.preferred) or self.preferred < max(self.minimum, 512):
            raise ConfigError(f"{where}: preferred block size {self.preferred} is not a power of 2 "
                              f">= max(minimum, 512)")
        if self.maximum % self.minimum or not self.preferred <= self.maximum <= REQUEST_BYTES_MAX:
            raise ConfigError(f"{where}: maximum block size {self.maximum} is not a multiple of the minimum "
                              f"in [{self.preferred}, {REQUEST_BYTES_MAX}]")
        if size % self.minimum:
            raise ConfigError(f"{where}: size {size} is not a multiple of the minimum block size {self.minimum}")


class NbdBackend(Protocol):
    """One export's bytes. Calls may overlap (up to the server's in-flight cap)."""

    size: int  # bytes; fixed while served
    read_only: bool  # writes, trims and zeroes are refused with EPERM before they get here
    block_sizes: BlockSizes
    multi_conn_safe: bool  # FLUSH / FUA on one connection covers writes done on every other one

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Exactly ``length`` bytes from ``offset``."""

    async def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        """Write ``data`` at ``offset``; durable before returning when ``fua``."""

    async def flush(self) -> None:
        """Make every write that has returned durable."""

    async def trim(self, offset: int, length: int) -> None:
        """A hint that the range is no longer needed; its contents become unspecified."""

    async def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        """The range reads back as zeros; ``may_trim`` allows deallocating it."""


#: Zeros are written in pieces of this size where the file system cannot zero a range.
ZERO_FILL_BYTES = 1 << 20


class FileBackend:
    """An export backed by a regular file (or a block device) of fixed size.

    One descriptor shared by every connection: writes land in the one page cache and
    ``fdatasync`` makes all of them durable, so FLUSH and FUA on any connection cover
    writes made on the others (``multi_conn_safe``). Blocking calls run in threads.
    """

    multi_conn_safe = True

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False,
                 block_sizes: BlockSizes = BlockSizes()) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        self.block_sizes = block_sizes
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags)
        except OSError as exc:
            raise ConfigError(f"NBD export file {self.path}: {exc.strerror}") from exc
        try:
            self.size = os.lseek(self._fd, 0, os.SEEK_END)  # also right for block devices
            block_sizes.check(self.size, f"NBD export file {self.path}")
        except BaseException:
            os.close(self._fd)
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def read(self, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(self._read, offset, length)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        await asyncio.to_thread(self._write, offset, data, fua)

    async def flush(self) -> None:
        await asyncio.to_thread(os.fdatasync, self._fd)

    async def trim(self, offset: int, length: int) -> None:
        await asyncio.to_thread(fallocate, self._fd, PUNCH_HOLE | KEEP_SIZE, offset, length)

    async def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        await asyncio.to_thread(self._write_zeroes, offset, length, may_trim, fua)

    # ------------------------------------------------------------------ in the thread

    def _read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) == length:
            return data
        buf = bytearray(data)  # a short read: go on until the file says end
        while len(buf) < length:
            more = os.pread(self._fd, length - len(buf), offset + len(buf))
            if not more:
                raise OSError(errno.EIO, f"{self.path} ends at {offset + len(buf)}, inside the export")
            buf += more
        return bytes(buf)

    def _write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        view = memoryview(data).cast("B")
        while view:
            done = os.pwrite(self._fd, view, offset)
            view, offset = view[done:], offset + done
        if fua:
            os.fdatasync(self._fd)

    def _write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        # A punched hole reads as zeros; ZERO_RANGE keeps the blocks allocated (NO_HOLE).
        mode = PUNCH_HOLE | KEEP_SIZE if may_trim else ZERO_RANGE | KEEP_SIZE
        if not fallocate(self._fd, mode, offset, length):
            zeros = bytes(min(length, ZERO_FILL_BYTES))
            end = offset + length
            while offset < end:
                piece = min(end - offset, len(zeros))
                self._write(offset, memoryview(zeros)[:piece], False)
                offset += piece
        if fua:
            os.fdatasync(self._fd)
