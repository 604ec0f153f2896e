"""The dirty-region map: a sidecar file next to each primary disk (``<image>.dirty``,
FORMAT.md §15) naming the regions that may hold a write its DRVA has not made durable.

The I/O filter sets a region's flag, and makes it durable, *before* the write reaches
the primary disk, and clears it once every write to the region is acknowledged. So
after any crash — of the filter, the host, the site — the regions where the primary
may differ from what reached the replication log are a subset of the flagged ones. A
failback uses that to undo the protected site's writes that never replicated; a
filter that starts on a disk with flags left resyncs those regions.

Why a byte per region and no body checksum while it runs: flags only go 0 → 1 before
the write they guard (and that set is synced before the write is issued) or with no
write to guard (the filter sets recently cleared regions again when a sync is due
anyway), and 1 → 0 after the ack (lazily, never synced). A torn page after a power loss
mixes old and new flag bytes, and either value of either transition is safe: an
unsynced set guards a write that was never issued, an unsynced clear or a set guarding
nothing leaves a region flagged that needs nothing (more is moved, nothing is lost).
The header and a body checksum are written only at a clean close, when every write was
acknowledged; a map whose header does not check, whose geometry does not match its
disk, or whose body holds a byte other than 0/1 is *unusable*: whoever reads it must
treat every region as dirty, and says so.

A failed sync of the map is for good (``durable.StickySync``): after a failed write-back
Linux marks the lost pages clean and the next fsync returns 0, so a retried sync would
vouch for flags that never reached the disk, and the write they guard would then be
issued. From the first failure on, every ``flag``, ``set_before_write`` and sync of the
map raises ``OSError`` (EIO) naming it — the disk takes no more writes through this
filter — a close writes nothing more, and the header is rewritten, once, with the
``unusable`` flag (FORMAT.md §15): the next filter (or failback) that reads the map
treats every region as dirty, as for any unusable map. In memory, a flag that is set
has been written to the file: a ``flag`` whose write fails is taken back.

The map sits in a datastore others may write, and the filter may run as root: it is
opened without following a link (``O_NOFOLLOW``) or blocking (``O_NONBLOCK``: a FIFO
planted there must not hang the open), and must be a regular file — with one link, to
be written. A reader takes anything else as unusable (every region dirty) and reads at
most one byte past the size the map of its disk has (a link to ``/dev/zero`` would have
been read until memory ran out); the writer refuses it (``DirtyMapRefused``, naming
the path), as writing the header through a link to another file would overwrite that
file. It also refuses a regular file that cannot be a map — not empty, not beginning
with ``MAGIC``, not the map's size: another disk's image or a partition configured at
the path —, which replacing an unusable map would have overwritten and truncated.
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from cdp import durable
from cdp.bounded_read import pread_upto
from cdp.errors import CdpError, FormatError
from cdp.file_kinds import NotRegular, open_regular

MAGIC = b"CDPR"
VERSION = 1
HEADER_BYTES = 4096  # the body (one flag byte per region) starts on the next block
FLAG_CLEAN = 0x0001
#: Set by a writer whose sync of the map failed: its flags may not be on the disk.
FLAG_UNUSABLE = 0x0002
# magic, version, flags, disk_size, region_shift, domain, regions, opens, body_xxh3
_HEADER = struct.Struct("<4sHHQIIQQQ")
_HEADER_SUM = struct.Struct("<Q")
assert _HEADER.size == 48  # FORMAT.md §15
REGIONS_MAX = 1 << 20  # as the filter's bitmap: 1 MiB of flags per disk at most
REGION_BYTES_MIN = 64 << 10
# Past this many touched 4 KiB pages a set writes the span between them in one pwrite.
PAGES_PER_WRITE_MAX = 8
_PAGE = 4096


class DirtyMapUnusable(FormatError):
    """A map that cannot say which regions are clean (see the module docstring)."""


class DirtyMapRefused(CdpError):
    """The map's path is not a regular file of its own (a link, a FIFO, a device, a
    directory, a file with other hard links): the filter will not write through it."""


# Creating a map: never through a link (an existing one is opened by open_regular).
_CREATE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


def region_bytes_for(disk_size: int) -> int:
    """The region size for a disk: at least 64 KiB, a power of two, at most
    ``REGIONS_MAX`` regions. The filter's in-memory bitmap uses the same."""
    r = max(REGION_BYTES_MIN, -(-disk_size // REGIONS_MAX))
    return 1 << (r - 1).bit_length()


def sidecar_path(image: str | os.PathLike[str]) -> Path:
    image = Path(image)
    return image.with_name(image.name + ".dirty")


def regions_of(offset: np.ndarray, length: np.ndarray, region_bytes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Every region index the byte ranges [offset, offset + length) touch, in range order
    (with repetitions), and how many each range touches — ``None`` when every range
    touches exactly one (the usual case, computed without the expansion). Every length
    must be > 0."""
    first = offset.astype(np.int64) // region_bytes
    if not len(first):
        return first, None
    count = (offset.astype(np.int64) + length.astype(np.int64) - 1) // region_bytes - first + 1
    if int(count.max()) == 1:
        return first, None
    starts = np.repeat(first - np.concatenate(([0], np.cumsum(count)[:-1])), count)
    return starts + np.arange(int(count.sum()), dtype=np.int64), count


@dataclass(frozen=True, slots=True)
class MapHeader:
    disk_size: int
    region_bytes: int
    domain: int
    regions: int
    opens: int
    clean: bool
    body_xxh3: int


def _pack_header(h: MapHeader, flags: int | None = None) -> bytes:
    if flags is None:
        flags = FLAG_CLEAN if h.clean else 0
    body = _HEADER.pack(MAGIC, VERSION, flags, h.disk_size,
                        h.region_bytes.bit_length() - 1, h.domain, h.regions, h.opens, h.body_xxh3)
    out = body + _HEADER_SUM.pack(xxhash.xxh3_64_intdigest(body))
    return out + bytes(HEADER_BYTES - len(out))


def _unpack_header(raw: bytes, where: str) -> MapHeader:
    if len(raw) < HEADER_BYTES:
        raise DirtyMapUnusable(f"{where}: {len(raw)} bytes, shorter than its {HEADER_BYTES}-byte header")
    magic, version, flags, disk_size, shift, domain, regions, opens, body_sum = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise DirtyMapUnusable(f"{where}: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise DirtyMapUnusable(f"{where}: version {version}, expected {VERSION}")
    (want,) = _HEADER_SUM.unpack_from(raw, _HEADER.size)
    if xxhash.xxh3_64_intdigest(raw[: _HEADER.size]) != want:
        raise DirtyMapUnusable(f"{where}: header checksum mismatch")
    if flags & FLAG_UNUSABLE:
        raise DirtyMapUnusable(f"{where}: marked unusable by its writer, whose sync of the map failed (its "
                               f"flags may never have reached the disk)")
    if flags & ~(FLAG_CLEAN | FLAG_UNUSABLE) or any(raw[_HEADER.size + _HEADER_SUM.size : HEADER_BYTES]):
        raise DirtyMapUnusable(f"{where}: unknown flags or non-zero reserved bytes (a newer writer?)")
    if not 16 <= shift <= 40:
        raise DirtyMapUnusable(f"{where}: region_shift {shift}, expected 16..40")
    return MapHeader(disk_size, 1 << shift, domain, regions, opens, bool(flags & FLAG_CLEAN), body_sum)


def read_dirty_map(path: str | os.PathLike[str], disk_size: int) -> tuple[np.ndarray, int]:
    """The flags of the map at ``path`` for a disk of ``disk_size`` bytes, without
    changing it: (bool array, one per region; region bytes). ``DirtyMapUnusable``
    saying why when the map is missing or cannot be trusted."""
    header, flags = _read(Path(path), disk_size)
    return flags, header.region_bytes


def _read(path: Path, disk_size: int) -> tuple[MapHeader, np.ndarray]:
    try:
        fd = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        raise DirtyMapUnusable(f"{path}: no dirty-region map next to the disk") from None
    except NotRegular as exc:
        raise DirtyMapUnusable(f"{path}: {exc.kind}, not a dirty-region map") from None
    except OSError as exc:
        raise DirtyMapUnusable(f"{path}: {exc.strerror}, not a dirty-region map") from None
    try:
        return _read_fd(fd, path, disk_size)
    finally:
        os.close(fd)


def _read_fd(fd: int, path: Path, disk_size: int) -> tuple[MapHeader, np.ndarray]:
    """The map open at ``fd`` (a regular file: ``open_regular``), checked whole; at most
    one byte past its size is read."""
    size_max = HEADER_BYTES + -(-disk_size // region_bytes_for(disk_size))
    raw = pread_upto(fd, size_max + 1)
    h = _unpack_header(raw, str(path))
    want_regions = -(-disk_size // h.region_bytes)
    if h.disk_size != disk_size or h.region_bytes != region_bytes_for(disk_size) or h.regions != want_regions:
        raise DirtyMapUnusable(f"{path}: a map of a {h.disk_size}-byte disk in {h.regions} regions of "
                               f"{h.region_bytes} bytes; the disk is {disk_size} bytes")
    if len(raw) != HEADER_BYTES + h.regions:
        size = f"{len(raw)} bytes" if len(raw) <= size_max else f"more than {size_max} bytes"
        raise DirtyMapUnusable(f"{path}: {size}, expected {HEADER_BYTES + h.regions}")
    body = np.frombuffer(raw, dtype=np.uint8, count=h.regions, offset=HEADER_BYTES)
    if (body > 1).any():
        i = int(np.flatnonzero(body > 1)[0])
        raise DirtyMapUnusable(f"{path}: region {i} holds {int(body[i])}, expected 0 or 1")
    if h.clean and xxhash.xxh3_64_intdigest(body.tobytes()) != h.body_xxh3:
        raise DirtyMapUnusable(f"{path}: closed clean but its body checksum does not match")
    return h, body.astype(bool)


def _open_for_writing(path: Path, map_bytes: int) -> tuple[int, bool]:
    """(fd, created): the map at ``path`` opened read-write, created if absent.
    ``DirtyMapRefused`` when the path is anything but a regular file with one link, or
    a file that is no map (``_refuse_foreign``; ``map_bytes``: the size of this disk's)."""
    try:  # O_EXCL: not through a link either
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _CREATE_FLAGS, 0o644), True
    except FileExistsError:
        pass
    try:
        fd = open_regular(path, os.O_RDWR, links_max=1)
    except NotRegular as exc:
        what = exc.kind
    except OSError as exc:
        what = f"cannot be opened ({exc.strerror})"
    else:
        try:
            _refuse_foreign(fd, path, map_bytes)
        except BaseException:
            os.close(fd)
            raise
        return fd, False
    raise DirtyMapRefused(f"{path}: {what}; expected the disk's dirty-region map, a regular file with one "
                          f"link: refusing to write through it (remove it to start a new map)")


def _refuse_foreign(fd: int, path: Path, map_bytes: int) -> None:
    """``DirtyMapRefused`` unless the file open at ``fd`` may be a map the writer
    replaces: empty (a creation a crash cut short), beginning with ``MAGIC`` (a map,
    usable or not), or exactly ``map_bytes`` long (a map whose header was damaged, or
    whose blocks a crash left unwritten). Anything else — another disk's image or a
    partition configured at this path — would be overwritten and truncated."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, len(MAGIC), 0)
    if size == 0 or head == MAGIC or size == map_bytes:
        return
    raise DirtyMapRefused(f"{path}: a {size}-byte file beginning {head!r}, not a dirty-region map (magic "
                          f"{MAGIC!r}, {map_bytes} bytes for this disk): refusing to overwrite it — is another "
                          f"disk's image or a partition configured at this path? Move it away to start a new map")


class DirtyMap:
    """The writer: the filter's handle on one disk's map (see the module docstring).

    ``left`` holds the regions flagged when it was opened: writes of an earlier run that
    may never have been acknowledged (all of them when the map was unusable, and
    ``left_reason`` then says why).

    Invariants: a region set in ``flags`` is set in the file (written, maybe not synced);
    once a sync has failed (``broken``) nothing is synced, flagged or closed clean again."""

    def __init__(self, path: Path, fd: int, header: MapHeader, flags: np.ndarray, left: np.ndarray,
                 left_reason: str | None) -> None:
        self.path = path
        self._fd = fd
        self.header = header
        self.region_bytes = header.region_bytes
        self.flags = flags  # what the file holds (or will, for clears not yet written)
        self.left = left
        self.left_reason = left_reason
        self.syncs = 0
        # Sets written and sets synced, counted: a set is durable once a sync that began
        # after it was written has returned (``sync_async`` runs off the caller's thread).
        self._written = 0
        self._synced = 0
        # Per region, the set (its count in ``_written``) that last flagged it: the region's
        # flag is durable once ``_synced`` reaches it (0: flagged at open, synced then).
        self._set_by = np.zeros(len(flags), dtype=np.uint64)
        # The latest sync running in a worker thread: (sets it covers, its task).
        self._running: tuple[int, asyncio.Task[None]] | None = None
        self._syncs = durable.StickySync()
        self._marked_unusable = False
        self._mark_lock = threading.Lock()  # syncs run in worker threads

    @classmethod
    def open(cls, image: str | os.PathLike[str], disk_size: int, domain: int) -> DirtyMap:
        """Open (or create) the map next to ``image`` and mark it in use (not clean),
        durably, before any write of this run can reach the disk."""
        path = sidecar_path(image)
        region_bytes = region_bytes_for(disk_size)
        regions = -(-disk_size // region_bytes)
        left_reason = None
        opens = 0
        fd, created = _open_for_writing(path, HEADER_BYTES + regions)
        try:
            if created:  # a disk never written through a filter with a map: nothing is pending
                left = np.zeros(regions, dtype=bool)
            else:
                try:
                    old, left = _read_fd(fd, path, disk_size)
                    opens = old.opens
                except DirtyMapUnusable as exc:  # there, and not to be trusted: every region is suspect
                    left_reason = str(exc)
                    left = np.ones(regions, dtype=bool)
            header = MapHeader(disk_size, region_bytes, domain, regions, opens + 1, False, 0)
            flags = left.copy()
            durable.pwrite_all(fd, [_pack_header(header), flags.view(np.uint8)], 0)
            os.ftruncate(fd, HEADER_BYTES + regions)
            durable.sync_file(fd)
            if created:
                durable.fsync_dir(path.parent)  # a new file: its entry too
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, header, flags, left, left_reason)

    def set_before_write(self, regions: np.ndarray) -> bool:
        """Flag ``regions`` (indexes, repetitions allowed) durably; True when something
        had to be synced (new flags, or flags ``flag`` wrote and no sync covers yet).
        Call before the writes reach the disk. Flags of other regions written and not yet
        synced (a ``flag`` for a later batch) do not make it sync."""
        self.flag(regions)
        if self.pending_set(regions) <= self._synced:
            return False
        upto = self._written
        self._sync()
        self._synced = max(self._synced, upto)
        self.syncs += 1
        return True

    def flag(self, regions: np.ndarray) -> bool:
        """Flag ``regions`` and write them, without syncing: True when new flags were
        written. They are durable only after a ``sync_async`` (or ``set_before_write``)
        that began after this call returns."""
        self.check()
        new = np.unique(regions[~self.flags[regions]]) if len(regions) else regions
        if not len(new):
            return False
        self.flags[new] = True
        try:
            self._write_pages(new)
        except BaseException:
            # Not known to be in the file: unset, so that the next flag writes (and syncs)
            # them again. A page written before the failure holds 1s, which is safe.
            self.flags[new] = False
            raise
        self._written += 1
        self._set_by[new] = self._written
        return True

    def pending_set(self, regions: np.ndarray) -> int:
        """The set that ``regions``' flags (all flagged) wait for: they are durable once
        a sync covering it has returned (``sync_covering``)."""
        return int(self._set_by[regions].max()) if len(regions) else 0

    async def sync_async(self) -> bool:
        """Make every flag written so far durable, in a worker thread: the event loop
        keeps sending and acking while the device flushes. True if it had to sync."""
        return await self.sync_covering(self._written)

    async def sync_covering(self, written: int) -> bool:
        """Until the sets up to ``written`` are durable: joins a running sync that began
        after them, else starts one in a worker thread at once — a running sync that
        began before them does not cover them, and waiting for it first would cost two
        device flushes (the capture pipeline flags a batch while the one before syncs).
        True if this call started a sync."""
        self.check()
        started = False
        while self._synced < written:
            running = self._running
            if running is None or running[0] < written:
                running = (self._written, asyncio.create_task(self._sync_thread(self._written)))
                self._running = running
                started = True
            await asyncio.shield(running[1])
        return started

    async def _sync_thread(self, upto: int) -> None:
        try:
            await asyncio.to_thread(self._sync)
        finally:
            if self._running is not None and self._running[0] == upto:
                self._running = None
        self._synced = max(self._synced, upto)
        self.syncs += 1

    @property
    def broken(self) -> OSError | None:
        """The failed sync that made the map unusable (module docstring), or None."""
        return self._syncs.failed

    def check(self) -> None:
        """``OSError`` (EIO) naming the map once a sync of it has failed."""
        self._syncs.check(str(self.path))

    def _sync(self) -> None:
        """``fdatasync`` of the map, believed only while no sync of it has failed; on the
        first failure the header is marked unusable (``_mark_unusable``)."""
        try:
            self._syncs.sync(self._fd, str(self.path))
        except durable.SyncFailed:
            self._mark_unusable()
            raise

    def _mark_unusable(self) -> None:
        """Rewrite the header, once, with the ``unusable`` flag and sync it: the next reader
        treats every region as dirty. Only new pages are written and synced here (the lost
        ones stay lost: their flags are not trusted any more); if this fails too, the map
        keeps what earlier good syncs made durable, which guards every write issued."""
        with self._mark_lock:
            if self._marked_unusable:
                return
            self._marked_unusable = True
        try:
            durable.pwrite_all(self._fd, [_pack_header(self.header, FLAG_UNUSABLE)], 0)
            durable.sync_data(self._fd)
        except OSError:
            pass  # best effort: see the docstring

    def clear(self, mask: np.ndarray) -> int:
        """Unflag the regions of ``mask`` (every write to them acknowledged); written,
        not synced (see the module docstring). How many were cleared. Nothing, once the
        map is broken: it is unusable anyway. (A failed write leaves them unflagged in
        memory and maybe flagged in the file: safe, the file flags more.)"""
        if self.broken is not None:
            return 0
        gone = np.flatnonzero(mask & self.flags)
        if len(gone):
            self.flags[gone] = False
            self._write_pages(gone)
        return len(gone)

    def _write_pages(self, regions: np.ndarray) -> None:
        pages = np.unique(regions // _PAGE)
        body = self.flags.view(np.uint8)
        if len(pages) > PAGES_PER_WRITE_MAX:
            lo, hi = int(pages[0]) * _PAGE, min(len(body), (int(pages[-1]) + 1) * _PAGE)
            durable.pwrite_all(self._fd, [body[lo:hi]], HEADER_BYTES + lo)
            return
        for p in pages.tolist():
            lo, hi = p * _PAGE, min(len(body), (p + 1) * _PAGE)
            durable.pwrite_all(self._fd, [body[lo:hi]], HEADER_BYTES + lo)

    def close(self, *, clean: bool) -> None:
        """Close. ``clean``: every write of this run was acknowledged — the flags are all
        cleared, and the header says so with the body's checksum. Otherwise the flags
        stay as they are, synced. A broken map is closed and nothing more is written:
        it stays unusable (a clean header would be written after a failed sync)."""
        if self._fd < 0:
            return
        try:
            if self.broken is not None:
                return
            if clean:
                self.flags[:] = False
                body = self.flags.view(np.uint8)
                durable.pwrite_all(self._fd, [body], HEADER_BYTES)
                self._sync()
                self.header = MapHeader(self.header.disk_size, self.region_bytes, self.header.domain,
                                        self.header.regions, self.header.opens, True,
                                        xxhash.xxh3_64_intdigest(body.tobytes()))
                durable.pwrite_all(self._fd, [_pack_header(self.header)], 0)
            self._sync()
        finally:
            os.close(self._fd)
            self._fd = -1

    def dirty_bytes(self) -> int:
        return int(self.flags.sum()) * self.region_bytes
