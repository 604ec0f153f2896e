"""The copy-on-write overlay of a writable ``cdp mount`` (FORMAT.md §18.3).

One overlay per disk, in the overlay directory::

    <vm>-<disk>.overlay        sparse file of the disk's size: the bytes of written blocks
    <vm>-<disk>.overlay.map    header(64) + the bitmap of written blocks, replaced whole
                               and durably at each FLUSH / FUA that follows a change

The disk is cut into blocks of ``OVERLAY_BLOCK_BYTES`` (4 KiB; the last one may be
shorter). A block whose bit is set is read from the overlay file, any other from the
*lower* layer (the plan, or the rehydrated image): a read merges runs of the two.

Invariants:

- a bit is set only after its whole block has been written into the overlay file: a
  write that covers part of a block not yet in the overlay first copies the rest of
  the block from the lower layer (read-modify-write);
- bits are only ever set, never cleared (TRIM and WRITE_ZEROES write zeros into the
  overlay: a hole punched in it, the bit set), so the map on disk only grows;
- the map file is written only after ``fdatasync`` of the overlay file, while no write
  runs (``_lock``): every bit it holds names bytes that are durable. A crash loses at
  most what the client had not flushed, as a disk does;
- mutations are serialized (``_lock``): a read-modify-write cannot interleave with
  another write of the same block. Reads take no lock;
- a write's or a flush's work in its worker thread ends before the lock is let go, even
  when the request is cancelled (its connection ended): a cancelled write's ``pwrite``
  landing later would overwrite a newer write of the same block, acknowledged and
  flushed meanwhile from another connection (``_to_end``);
- a FLUSH whose ``fdatasync`` fails, or whose new map fails once it is renamed into place,
  *breaks* the overlay, for good (``broken``): every later write,
  WRITE_ZEROES, FUA and FLUSH fails with EIO naming the overlay file, and the map is
  never written again. Why: after a failed write-back Linux marks the lost pages clean
  and the next ``fdatasync`` returns 0 ("fsyncgate", ``cdp.durable.StickySync``): a
  retried FLUSH would be acked and the next map would name blocks whose bytes never
  reached the disk (a restart then served zeros for them). The writes acked since the
  last good FLUSH may be lost, as a disk's unflushed writes in a crash; the map on disk
  is the last good one, and a mount started again on the directory serves the overlay
  as of that FLUSH (the file's cached pages dropped first, so that no lost page is
  served from the cache). A map that cannot be *staged* (its temporary file not created,
  written or synced: a full file system) fails the FLUSH and breaks nothing: the overlay
  file's sync succeeded, the map on disk is the last good one, and the next FLUSH tries
  again — so a client that frees space (TRIM) gets its export back;
- every file of the overlay, and the directory, belong to this process's user: the
  directory is checked by the rule of §13.15 (``_OverlayDir``, ``rocva.mount``), and a
  map or overlay file another user owns is refused (it could hold it open and change
  what is served after every check).

The store is never written: the overlay is the only place writes go.

Both files are reached through the overlay directory's descriptor (``OutputDir`` of
``rocva.destination``), never by path: a name planted in the directory — a symbolic
link, a hard link to a file elsewhere, a FIFO, a device — is refused with an error
naming it (or, for an overlay file without a map, unlinked and created afresh), so the
overlay never writes, truncates or blocks on anything but a file of its own, and reads
no more of a map than the map of this disk can hold.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from cdp import durable
from cdp.durable import pwrite_all
from cdp.errors import ChecksumMismatch, ConfigError, FormatError
from cdp.fallocate import KEEP_SIZE, PUNCH_HOLE, fallocate
from cdp.summed import pack_summed, unpack_summed
from rocva.destination import OutputDir
from rocva.errors import RecoveryError

OVERLAY_BLOCK_BYTES = 4096
MAP_MAGIC = b"CDPO"
MAP_VERSION = 1
# magic, version, flags, domain, disk, timeline, block_bytes, seq, disk_size, bitmap_bytes, bitmap_xxh3, header_xxh3
_MAP_HEADER = struct.Struct("<4sHHIIIIQQQQQ")
assert _MAP_HEADER.size == 64  # FORMAT.md §18.3
_MAP_ZERO = {"flags": (6, 2)}
DATA_SUFFIX = ".overlay"
MAP_SUFFIX = ".overlay.map"
#: Zeros written at most this many bytes at a time where a hole cannot be punched.
ZERO_FILL_BYTES = 1 << 20
#: Bytes copied at a time when the overlay is applied to an image.
APPLY_BYTES = 8 << 20
#: What the operator does with a broken overlay (``Overlay.broken``).
BROKEN_ADVICE = ("stop the mount and start it again with this --overlay directory once the file system is "
                 "healthy: it serves the overlay as of its last good flush")

LowerRead = Callable[[int, int], Awaitable[bytes | bytearray | memoryview]]


@dataclass(frozen=True)
class OverlayIdentity:
    """What an overlay belongs to: one disk of one domain at one point. Reopening an
    overlay for anything else is refused."""

    domain: int
    timeline: int
    seq: int
    disk: int
    disk_size: int


def _runs(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, value) of each run of equal values in the 0/1 array ``bits``."""
    change = np.flatnonzero(np.diff(bits)) + 1
    starts = np.concatenate([[0], change])
    ends = np.append(change, len(bits))
    return starts, ends, bits[starts]


class Overlay:
    """The overlay of one disk (invariants in the module docstring)."""

    def __init__(self, out: OutputDir, name: str, identity: OverlayIdentity, fd: int, bitmap: np.ndarray,
                 block_bytes: int = OVERLAY_BLOCK_BYTES) -> None:
        self.out = out  # the overlay directory: every file of the overlay is opened through it
        self.directory = out.path
        self.name = name
        self.identity = identity
        self.size = identity.disk_size
        self.block_bytes = block_bytes
        self.blocks = -(-self.size // block_bytes)
        self._fd = fd
        self._bitmap = bitmap  # packed, little bit order: bit k of byte k // 8 is block k
        self._lock = asyncio.Lock()
        self._dirty = False  # bits set since the map was last written
        self.broken: OSError | None = None  # the failure of a FLUSH: no write or FLUSH is taken after it
        self.writes = 0
        self.bytes_written = 0

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, directory: Path, name: str, identity: OverlayIdentity,
             block_bytes: int = OVERLAY_BLOCK_BYTES) -> Overlay:
        """The overlay ``name`` in ``directory``: reopened when its map exists (refused,
        naming the field, when made for another identity), else created empty (an overlay
        file without a map was never flushed: its bytes are dropped). RecoveryError, naming
        the file, when a name in the directory is not a regular file of the overlay's own."""
        out = _open_directory(directory)
        try:
            fd, bitmap = _open_files(out, name, identity, block_bytes)
        except BaseException:
            out.close()
            raise
        return cls(out, name, identity, fd, bitmap, block_bytes)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.out.close()

    @property
    def map_path(self) -> Path:
        return self.directory / (self.name + MAP_SUFFIX)

    @property
    def data_path(self) -> Path:
        return self.directory / (self.name + DATA_SUFFIX)

    def _refuse_if_broken(self) -> None:
        """EIO naming the overlay file once a FLUSH has failed (module docstring)."""
        if self.broken is not None:
            raise OSError(errno.EIO, f"{self.data_path}: a flush of this overlay failed earlier "
                                     f"({self.broken.strerror or self.broken}); it takes no more writes or "
                                     f"flushes: {BROKEN_ADVICE}")

    @property
    def blocks_written(self) -> int:
        return int(np.unpackbits(self._bitmap, bitorder="little")[: self.blocks].sum())

    # ------------------------------------------------------------------ bits

    def _bits(self, first: int, end: int) -> np.ndarray:
        """0/1 per block ``first..end-1``."""
        lo = first // 8
        bits = np.unpackbits(self._bitmap[lo : -(-end // 8)], bitorder="little")
        return bits[first - lo * 8 : end - lo * 8]

    def _set_bits(self, first: int, end: int) -> None:
        lo, hi = first // 8, -(-end // 8)
        bits = np.unpackbits(self._bitmap[lo:hi], bitorder="little")
        bits[first - lo * 8 : end - lo * 8] = 1
        self._bitmap[lo:hi] = np.packbits(bits, bitorder="little")
        self._dirty = True

    def _block_range(self, offset: int, length: int) -> tuple[int, int]:
        return offset // self.block_bytes, -(-(offset + length) // self.block_bytes)

    def _block_end(self, block: int) -> int:
        return min((block + 1) * self.block_bytes, self.size)

    # ------------------------------------------------------------------ reading

    async def read(self, offset: int, length: int, lower: LowerRead) -> bytes | bytearray | memoryview:
        """``length`` bytes from ``offset``: written blocks from the overlay, others from ``lower``."""
        first, end = self._block_range(offset, length)
        bits = self._bits(first, end)
        if not bits.any():
            return await lower(offset, length)
        if bits.all():
            return await asyncio.to_thread(self._pread, offset, length)
        out = bytearray(length)
        view = memoryview(out)
        starts, ends, values = _runs(bits)
        lowers = []
        for a, b, v in zip(starts.tolist(), ends.tolist(), values.tolist()):
            lo = max(offset, (first + a) * self.block_bytes)
            hi = min(offset + length, (first + b) * self.block_bytes)
            if v:
                view[lo - offset : hi - offset] = await asyncio.to_thread(self._pread, lo, hi - lo)
            else:
                lowers.append((lo, hi))
        parts = await asyncio.gather(*(lower(lo, hi - lo) for lo, hi in lowers))
        for (lo, hi), data in zip(lowers, parts):
            view[lo - offset : hi - offset] = data
        return out

    def _pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, f"{self.name}{DATA_SUFFIX}: short read at {offset}")
        return data

    # ------------------------------------------------------------------ writing

    async def write(self, offset: int, data: bytes | bytearray | memoryview, lower: LowerRead,
                    fua: bool = False) -> None:
        async with self._lock:
            self._refuse_if_broken()
            await self._write_locked(offset, memoryview(data).cast("B"), lower)
            if fua:
                await self._flush_locked()

    async def _write_locked(self, offset: int, data: memoryview, lower: LowerRead) -> None:
        end = offset + len(data)
        first, last_end = self._block_range(offset, len(data))
        fills = []  # the rest of partly written blocks not yet in the overlay
        head = first * self.block_bytes
        if offset > head and not self._bits(first, first + 1)[0]:
            fills.append((head, offset))
        tail = self._block_end(last_end - 1)
        if end < tail and not self._bits(last_end - 1, last_end)[0]:
            fills.append((end, tail))
        old = await asyncio.gather(*(lower(lo, hi - lo) for lo, hi in fills))
        buffers = [(lo, memoryview(b).cast("B")) for (lo, _), b in zip(fills, old)] + [(offset, data)]
        await _to_end(self._pwrite_parts, buffers)
        self._set_bits(first, last_end)
        self.writes += 1
        self.bytes_written += len(data)

    def _pwrite_parts(self, parts: list[tuple[int, memoryview]]) -> None:
        for offset, data in parts:
            pwrite_all(self._fd, [data], offset)

    async def write_zeroes(self, offset: int, length: int, lower: LowerRead, fua: bool = False) -> None:
        """The range reads back as zeros: whole blocks become holes of the overlay file,
        the parts of blocks at either end are written as zeros (read-modify-write)."""
        end = offset + length
        bb = self.block_bytes
        whole_lo = -(-offset // bb) * bb
        whole_hi = end if end == self.size else end // bb * bb
        async with self._lock:
            self._refuse_if_broken()
            if whole_lo >= whole_hi:  # inside one block
                await self._write_locked(offset, memoryview(bytes(length)), lower)
            else:
                if offset < whole_lo:
                    await self._write_locked(offset, memoryview(bytes(whole_lo - offset)), lower)
                if whole_hi < end:
                    await self._write_locked(whole_hi, memoryview(bytes(end - whole_hi)), lower)
                await _to_end(self._zero, whole_lo, whole_hi - whole_lo)
                self._set_bits(whole_lo // bb, -(-whole_hi // bb))
                self.writes += 1
                self.bytes_written += whole_hi - whole_lo
            if fua:
                await self._flush_locked()

    def _zero(self, offset: int, length: int) -> None:
        if fallocate(self._fd, PUNCH_HOLE | KEEP_SIZE, offset, length):
            return
        zeros = memoryview(bytes(min(length, ZERO_FILL_BYTES)))
        end = offset + length
        while offset < end:
            n = min(end - offset, len(zeros))
            pwrite_all(self._fd, [zeros[:n]], offset)
            offset += n

    # ------------------------------------------------------------------ durability

    async def flush(self) -> None:
        async with self._lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        """``fdatasync`` the overlay file, then write the map if a bit changed. Any failure
        breaks the overlay (module docstring): a failed map write may be a failed sync of
        the directory after the rename, which no retry could prove either.

        The failure is recorded by the worker thread itself (``_sync_and_map``): a FLUSH
        cancelled while its sync runs (its connection ended) would otherwise lose the
        error, and the next sync's 0 would put the lost blocks in the map. And the lock is
        held until that thread ends, cancelled or not: a second flush beside it could
        rename an older map over a newer one."""
        self._refuse_if_broken()
        doc = encode_map(self.identity, self.block_bytes, self._bitmap.tobytes()) if self._dirty else None
        try:
            await _to_end(self._sync_and_map, doc)
        except MapNotStaged as exc:
            raise OSError(exc.errno or errno.EIO, f"{self.map_path}: flush failed: the map could not be written "
                                                  f"({exc.strerror or exc}); the overlay's bytes are durable and "
                                                  f"its map on disk is the last good one: the next flush writes it "
                                                  f"again (free some room first)") from exc
        except OSError as exc:
            raise OSError(exc.errno or errno.EIO, f"{self.data_path}: flush failed ({exc.strerror or exc}): the "
                                                  f"writes acknowledged since its last good flush may be lost; "
                                                  f"it takes no more writes or flushes: {BROKEN_ADVICE}") from exc
        if doc is not None:
            self._dirty = False

    def _sync_and_map(self, doc: bytes | None) -> None:
        """In a worker thread: the sync, then the map ``doc`` (None: unchanged). A failed
        sync, or a failure once the new map is being renamed into place, breaks the
        overlay here, whoever waits for it; a map that could not be staged raises
        ``MapNotStaged`` and breaks nothing (module docstring)."""
        try:
            durable.sync_data(self._fd)
        except OSError as exc:
            self.broken = exc
            raise
        if doc is None:
            return
        name = self.name + MAP_SUFFIX
        try:
            tmp = durable.stage_at(self.out.fd, name, doc)
        except OSError as exc:
            raise MapNotStaged(exc.errno, exc.strerror) from exc
        try:
            durable.publish_at(self.out.fd, tmp, name)
        except OSError as exc:
            self.broken = exc
            raise

    def has_map(self) -> bool:
        """Whether the open overlay's map is on disk: an overlay never flushed has none,
        and a mount started again on the directory starts it empty."""
        return self.out.lstat(self.name + MAP_SUFFIX) is not None

    # ------------------------------------------------------------------ applying

    def apply_to(self, image_fd: int) -> int:
        """Copy every written block into the image ``image_fd`` (a file of the disk's size)
        and fsync it; the bytes copied. Blocking: call from a thread."""
        bits = self._bits(0, self.blocks)
        copied = 0
        if bits.any():
            starts, ends, values = _runs(bits)
            for a, b in zip(starts[values == 1].tolist(), ends[values == 1].tolist()):
                lo, hi = a * self.block_bytes, min(b * self.block_bytes, self.size)
                while lo < hi:
                    n = min(APPLY_BYTES, hi - lo)
                    pwrite_all(image_fd, [self._pread(lo, n)], lo)
                    lo += n
                    copied += n
        os.fsync(image_fd)
        return copied


class MapNotStaged(OSError):
    """The new map's temporary file could not be made (a full file system): the FLUSH
    fails, the overlay does not break (module docstring)."""


async def _to_end(fn: Callable[..., None], *args: object) -> None:
    """``fn(*args)`` in a worker thread, awaited to its end even when the caller is
    cancelled (then the cancellation goes on once it ended; its error, if any, is
    dropped with it): the caller holds the overlay's lock, which must not be let go while
    the thread may still write (module docstring)."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        await asyncio.shield(work)
    except asyncio.CancelledError:
        while not work.done():
            try:
                await asyncio.wait({work})
            except asyncio.CancelledError:
                continue  # cancelled again: still wait for the thread
        if not work.cancelled():
            work.exception()  # retrieved: the cancellation is what the caller gets
        raise


def encode_map(identity: OverlayIdentity, block_bytes: int, bitmap: bytes) -> bytes:
    """A map file (FORMAT.md §18.3): the summed header, then the bitmap."""
    header = pack_summed(_MAP_HEADER, MAP_MAGIC, MAP_VERSION, 0, identity.domain, identity.disk,
                         identity.timeline, block_bytes, identity.seq, identity.disk_size, len(bitmap),
                         xxhash.xxh3_64_intdigest(bitmap))
    return header + bitmap


def _open_directory(directory: Path) -> OutputDir:
    """The overlay directory, opened once: the mount made it (``--overlay DIR`` may be a
    symbolic link to a directory: that is the user's choice); its entries are not followed."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"overlay directory {directory}: cannot open it ({exc.strerror})") from None
    return OutputDir(fd, Path(directory))


def _open_files(out: OutputDir, name: str, identity: OverlayIdentity, block_bytes: int) -> tuple[int, np.ndarray]:
    """(descriptor of the overlay file, bitmap): the map's bitmap and the file it describes,
    or an empty bitmap and a new, empty file of the disk's size."""
    data_name, map_name = name + DATA_SUFFIX, name + MAP_SUFFIX
    blocks = -(-identity.disk_size // block_bytes)
    _remove_stale_maps(out, map_name)
    bitmap = _read_map(out, map_name, identity, block_bytes, blocks)
    if bitmap is None:
        return _create_data(out, data_name, identity.disk_size), np.zeros(-(-blocks // 8), dtype=np.uint8)
    try:
        fd = out.open(data_name, os.O_RDWR)  # a regular file with one link, or RecoveryError
    except FileNotFoundError:
        raise FormatError(f"{out.show(data_name)} is missing, yet {out.show(map_name)} records written "
                          f"blocks: put the file back, or remove the map to start an empty overlay") from None
    try:
        _refuse_foreign(out, data_name, fd)
        size = os.fstat(fd).st_size
        if size != identity.disk_size:
            raise FormatError(f"{out.show(data_name)}: {size} bytes, its map says the disk has "
                              f"{identity.disk_size}")
        _drop_cache(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, bitmap


def _remove_stale_maps(out: OutputDir, map_name: str) -> None:
    """Remove the temporary maps a crashed mount left (``durable.stage_at``'s
    ``.tmp-<map name>-<12 hex digits>``): never renamed into place, they are no map.
    The names only are unlinked (nothing is followed), and only those of this map; the
    directory is this user's alone (§13.15), so nothing else can be at those names."""
    stale = re.compile(rf"\.tmp-{re.escape(map_name)}-[0-9a-f]{{12}}")
    for entry in os.listdir(out.fd):
        if not stale.fullmatch(entry):
            continue
        st = out.lstat(entry)
        if st is not None and not stat.S_ISDIR(st.st_mode):  # a directory there is not ours to remove
            out.unlink(entry)


def _refuse_foreign(out: OutputDir, name: str, fd: int) -> None:
    """RecoveryError naming ``name`` when another user owns the file open at ``fd``: they
    could have written its map, or hold it open and change what the mount serves after
    every check."""
    uid = os.fstat(fd).st_uid
    if uid != os.geteuid():
        raise RecoveryError(f"{out.show(name)} belongs to uid {uid}, not to this mount's (uid {os.geteuid()}): "
                            f"an overlay serves only files of its own; remove it, or choose another --overlay "
                            f"directory")


def _drop_cache(fd: int) -> None:
    """Drop the cached pages of a reopened overlay file (``POSIX_FADV_DONTNEED``, advice):
    after a FLUSH failed, the pages whose write-back failed stay cached, marked clean, and
    would be served although the disk does not hold them (module docstring)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # advice


def _create_data(out: OutputDir, data_name: str, disk_size: int) -> int:
    """A new, empty overlay file. Whatever had the name (a file never flushed, or a link
    or FIFO planted there) is unlinked first — the name only, never what it points to —
    and the file is created ``O_EXCL|O_NOFOLLOW``: an existing file is never truncated,
    as truncating would follow a hard link to a file outside the directory."""
    try:
        out.unlink(data_name)
    except OSError as exc:
        raise RecoveryError(f"{out.show(data_name)}: cannot remove the stale entry ({exc.strerror}): remove it "
                            f"or choose another --overlay directory") from None
    fd = out.create(data_name, 0o600)
    try:
        os.ftruncate(fd, disk_size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_map(out: OutputDir, map_name: str, identity: OverlayIdentity, block_bytes: int,
              blocks: int) -> np.ndarray | None:
    """The bitmap of the map file, after every check of §18.3; None when there is none.
    The file must be a regular file with one link (``OutputDir.open``: a FIFO does not
    block, a link to a device is not followed); its header is checked before more is
    read, and no more than the map of this disk holds is read."""
    where = out.show(map_name)
    try:
        fd = out.open(map_name, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        _refuse_foreign(out, map_name, fd)
        size = os.fstat(fd).st_size
        header = _pread_exact(fd, min(size, _MAP_HEADER.size), 0, where)
        bitmap_bytes, bitmap_xxh3 = _check_map_header(where, header, identity, block_bytes, blocks)
        if size != _MAP_HEADER.size + bitmap_bytes:
            raise FormatError(f"{where}: {size} bytes, the header promises {_MAP_HEADER.size + bitmap_bytes}")
        body = _pread_exact(fd, bitmap_bytes, _MAP_HEADER.size, where)
    finally:
        os.close(fd)
    return _check_bitmap(where, body, bitmap_xxh3, blocks)


def _pread_exact(fd: int, length: int, offset: int, where: str) -> bytes:
    parts, done = [], 0
    while done < length:
        chunk = os.pread(fd, length - done, offset + done)
        if not chunk:
            raise FormatError(f"{where}: ends at offset {offset + done}, {length - done} bytes short "
                              f"(the file shrank while read)")
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


def _check_map_header(where: str, header: bytes, identity: OverlayIdentity, block_bytes: int,
                      blocks: int) -> tuple[int, int]:
    """(bitmap_bytes, bitmap_xxh3) of a map header; ConfigError when the overlay belongs
    to another disk or point, FormatError when the header is damaged."""
    (_, domain, disk, timeline, bb, seq, disk_size, bitmap_bytes, bitmap_xxh3) = unpack_summed(
        _MAP_HEADER, header, where=where, magic=MAP_MAGIC, version=MAP_VERSION, zero=_MAP_ZERO)
    found = OverlayIdentity(domain, timeline, seq, disk, disk_size)
    if found != identity:
        diffs = ", ".join(f"{name} {getattr(found, name)} (this mount: {getattr(identity, name)})"
                          for name in ("domain", "timeline", "seq", "disk", "disk_size")
                          if getattr(found, name) != getattr(identity, name))
        raise ConfigError(f"{where}: this overlay was made for another disk or point: {diffs}; "
                          f"mount the point it was made for, or use another --overlay directory")
    if bb != block_bytes:
        raise FormatError(f"{where}: header at offset 20: block_bytes {bb}, expected {block_bytes}")
    if bitmap_bytes != -(-blocks // 8):
        raise FormatError(f"{where}: header at offset 40: bitmap_bytes {bitmap_bytes}, a disk of {disk_size} "
                          f"bytes needs {-(-blocks // 8)}")
    return bitmap_bytes, bitmap_xxh3


def _check_bitmap(where: str, body: bytes, bitmap_xxh3: int, blocks: int) -> np.ndarray:
    if xxhash.xxh3_64_intdigest(body) != bitmap_xxh3:
        raise ChecksumMismatch(f"{where}: bitmap_xxh3 does not match the bitmap at offset {_MAP_HEADER.size}")
    bitmap = np.frombuffer(body, dtype=np.uint8).copy()
    spare = blocks % 8
    if spare and bitmap[-1] >> spare:
        raise FormatError(f"{where}: bits past the last block are set")
    return bitmap
