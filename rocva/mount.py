"""Instant recovery: the disks of a recovery point as NBD backends, before any copy.

``Mount.open`` plans the point (``rocva.plan``: the catalog and the segment indexes,
nothing proportional to the disks' size) and builds one ``MountedDisk`` per disk of
the plan. A ``MountedDisk`` is an ``NbdBackend`` (``cdp.nbd.backend``) over
two layers:

- the *lower* layer: first a ``PlanSource`` (``rocva.mount_source``: ranged GETs through
  one bounded ``UnitCache`` shared by every disk), then — once the background
  rehydration (``rocva.recover.execute_plan``: resumable, verified) has published the
  images — an ``ImageSource`` over the local image, which is faster;
- with ``writable``, an ``Overlay`` (``rocva.overlay``): copy-on-write in a local
  directory. Without it the export is read-only and the server refuses every write.

Nothing ever writes the store. When the mount stops (``close``): the overlays are
flushed, a rehydration still running is cancelled (it resumes next time), and when it
had finished, each overlay's blocks are copied into its image, so that the rehydrated
directory holds exactly what the exports served last.

Memory: the cache's bound (``cache_bytes_max``), plus the units being fetched (at most
``loads_max`` GETs of one segment block or base chunk part each), plus what the NBD
server holds in flight (FORMAT.md §17.4); the plan's extent arrays; the chunk tables
kept per disk (``rocva.mount_source.HEADS_KEPT``, about 2 KiB each for 4 MiB chunks);
one bit per 4 KiB per disk for an overlay. Nothing grows with how much of a disk is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import shutil
import stat
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp.errors import Busy, ConfigError
from cdp.file_kinds import file_kind
from cdp.locks import Lease
from cdp.logs import get_logger
from cdp.nbd.backend import BlockSizes
from cdp.store.base import ObjectStore
from rocva.destination import OutputDir, for_store, open_output_dir, resolve_destination
from rocva.errors import RecoveryError
from rocva.fetch import pool_workers
from rocva.mount_cache import CACHE_BYTES_MAX_DEFAULT, LOADS_MAX_DEFAULT, UnitCache
from rocva.mount_source import PlanSource
from rocva.point_guard import PointGuard
from rocva.overlay import Overlay, OverlayIdentity
from rocva.plan import CONCURRENCY_DEFAULT, DiskPlan, RecoveryPlan, plan_recovery
from rocva.recover import CountingStore, execute_plan, take_recovery_lease
from rocva.target import Target

logger = get_logger("rocva.mount")

OVERLAY_LOCK_NAME = ".mount.lock"
#: A rehydration in progress is logged at most this often.
REHYDRATE_LOG_INTERVAL_S = 5.0


@dataclass(frozen=True)
class MountOptions:
    """What ``cdp mount`` was asked for (the CLI fills it)."""

    domain: int
    target: Target | int | str
    timeline: int | None = None
    writable: bool = False
    overlay_dir: Path | None = None  # None: a fresh temporary directory (writable only)
    keep_overlay: bool = False  # keep the temporary overlay directory at exit
    rehydrate_to: Path | None = None
    cache_bytes_max: int = CACHE_BYTES_MAX_DEFAULT
    loads_max: int = LOADS_MAX_DEFAULT  # store GETs in flight for reads
    rehydrate_concurrency: int = CONCURRENCY_DEFAULT


def export_name(disk: DiskPlan) -> str:
    return f"{disk.vm}/{disk.name}"


def _check_rehydrate_to(store: ObjectStore, path: Path) -> None:
    """``--rehydrate-to`` refused before anything starts (ConfigError, exit 2) when it is
    not, or cannot become, a directory a recovery may write (a file, a FIFO, a path
    through one, the store's own directory): found only once serving, it was a
    ``rehydrate_error`` in a mount that exited 0."""
    try:
        resolve_destination(path, for_store(store))
    except RecoveryError as exc:
        raise ConfigError(f"--rehydrate-to: {exc.message}") from None


class ImageSource:
    """A rehydrated image, read with ``pread`` in a thread from ``fd`` — opened through the
    rehydration directory's descriptor (``Mount._open_images``), never by path. The overlay
    is applied through this very descriptor when the mount stops: only the file that was
    served is ever written."""

    def __init__(self, fd: int, path: str) -> None:
        self.path = path
        self._fd = fd

    @property
    def fd(self) -> int:
        return self._fd

    async def read(self, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(self._pread, offset, length)

    def _pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, f"{self.path}: short read at {offset}")
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class MountedDisk:
    """One export: reads from the overlay (if any) over the lower layer.

    Invariant: ``read_only`` is true exactly when there is no overlay, and the server
    refuses writes before they get here (FORMAT.md §17.4), so the store is never written.
    """

    multi_conn_safe = True  # one overlay file and one bitmap behind every connection

    def __init__(self, name: str, disk: DiskPlan, lower: PlanSource | ImageSource, overlay: Overlay | None,
                 block_sizes: BlockSizes = BlockSizes()) -> None:
        self.name = name
        self.disk = disk
        self.size = disk.size
        self.lower = lower
        self.overlay = overlay
        self.read_only = overlay is None
        self.block_sizes = block_sizes
        self.reads = 0
        self.bytes_served = 0

    async def _lower_read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        return await self.lower.read(offset, length)  # looked up per call: the layer can change

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        if self.overlay is None:
            data = await self._lower_read(offset, length)
        else:
            data = await self.overlay.read(offset, length, self._lower_read)
        self.reads += 1
        self.bytes_served += length
        return data

    async def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        assert self.overlay is not None, "the server lets no write reach a read-only export"
        await self.overlay.write(offset, data, self._lower_read, fua)

    async def flush(self) -> None:
        if self.overlay is not None:
            await self.overlay.flush()

    async def trim(self, offset: int, length: int) -> None:
        # Trimmed bytes are unspecified; zeros keep the export's content a function of its writes.
        await self.write_zeroes(offset, length, True, False)

    async def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        assert self.overlay is not None, "the server lets no write reach a read-only export"
        await self.overlay.write_zeroes(offset, length, self._lower_read, fua)


def _open_lock_file(path: Path) -> int:
    """The overlay directory's lock file, created if absent. Opened without following a
    symbolic link (a link there made the open fail with a bare ELOOP) and without blocking
    (``O_NONBLOCK``: a FIFO or device planted under the name must not hang the mount),
    then kept only if it is a regular file with one link: the mount locks a file of its
    own, never one a planted name leads to. RecoveryError (exit 6) naming the file and
    what was found there otherwise."""
    expected = "where the overlay directory's lock file is expected"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RecoveryError(f"{path}: a symbolic link {expected}; cdp mount never follows one: remove it, "
                                f"or choose another --overlay directory") from None
        try:
            found = os.stat(path, follow_symlinks=False).st_mode
        except OSError:
            found = None
        if found is not None and not stat.S_ISREG(found):
            raise RecoveryError(f"{path}: {file_kind(found)} {expected}: remove it, or choose another "
                                f"--overlay directory") from None
        raise RecoveryError(f"{path}: cannot open the overlay directory's lock file ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RecoveryError(f"{path}: {file_kind(st.st_mode)} {expected}: remove it, or choose another "
                                f"--overlay directory")
        if st.st_nlink > 1:
            raise RecoveryError(f"{path}: a file with {st.st_nlink} hard links {expected} (a mount locks only a "
                                f"file of its own): remove it, or choose another --overlay directory")
        if st.st_uid != os.geteuid():  # another user holding it locked would keep every mount out
            raise RecoveryError(f"{path}: a file of uid {st.st_uid} {expected} (a mount locks only a file of its "
                                f"own): remove it, or choose another --overlay directory")
    except BaseException:
        os.close(fd)
        raise
    return fd


class _OverlayDir:
    """The overlay directory, locked (``flock`` of its lock file, ``_open_lock_file``) for
    as long as one mount uses it."""

    def __init__(self, path: Path, temporary: bool) -> None:
        self.path = path
        self.temporary = temporary
        self._lock_fd = _open_lock_file(path / OVERLAY_LOCK_NAME)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise Busy(f"overlay directory {path}: another cdp mount uses it") from None

    @classmethod
    def make(cls, wanted: Path | None) -> _OverlayDir:
        if wanted is None:
            return cls(Path(tempfile.mkdtemp(prefix="cdp-mount-overlay-")), True)
        from cdp.msa.install_dirs import dir_problem, made_dir_problem

        def refuse(problem: str) -> ConfigError:
            return ConfigError(f"--overlay {wanted}: {problem}; the overlay holds the writes made through the "
                               f"exports, so every directory on the way must be owned by root or by this "
                               f"mount's user (uid {os.geteuid()}), and the directory writable by no one else")

        # Before anything is made there, and after: no other user may control a step of
        # the path (they would choose where the overlay's files are, or swap the directory
        # between the lock and the overlays), nor write the directory (plant the files).
        if (problem := dir_problem(wanted)) is not None:
            raise refuse(problem)
        try:
            problem = made_dir_problem(wanted, 0o700)
        except OSError as exc:
            raise ConfigError(f"--overlay {wanted}: cannot create the directory ({exc.strerror})") from None
        if problem is not None:
            raise refuse(problem)
        if not wanted.is_dir():
            raise ConfigError(f"--overlay {wanted}: not a directory")
        return cls(wanted, False)

    def close(self, keep: bool) -> None:
        os.close(self._lock_fd)
        if self.temporary and not keep:
            shutil.rmtree(self.path, ignore_errors=True)


class Mount:
    """A recovery point being served (module docstring). ``open``, then ``exports`` to a
    server, ``start_rehydration`` if wanted, and ``close`` once the server is closed."""

    def __init__(self, store: ObjectStore, plan: RecoveryPlan, options: MountOptions, cache: UnitCache,
                 executor: ThreadPoolExecutor, disks: dict[str, MountedDisk], overlay_dir: _OverlayDir | None) -> None:
        self.store = store
        self.plan = plan
        self.options = options
        self.cache = cache
        self.executor = executor
        self.disks = disks
        self.overlay_dir = overlay_dir
        self.rehydration: asyncio.Task | None = None
        self.rehydrated = False
        self.rehydrate_error: str | None = None
        self.rehydrate_progress = (0, 0)
        self.rehydrate_store: CountingStore | None = None
        self.overlay_bytes_applied = 0
        self._images: list[ImageSource] = []
        self._rehydrate_dir: OutputDir | None = None  # open from the start of the rehydration until close
        self.guard: PointGuard | None = None  # keeps the recovery lease; None: a store we may only read

    @property
    def lease(self) -> Lease | None:
        """The recovery lease held now (None: a store we may only read)."""
        return self.guard.lease if self.guard is not None else None

    @classmethod
    async def open(cls, store: ObjectStore, options: MountOptions) -> Mount:
        if options.rehydrate_to is not None:
            _check_rehydrate_to(store, options.rehydrate_to)
        # A mount is a recovery that may last for days: its lease keeps retention from
        # deleting the objects its reads and its rehydration need, is taken before the
        # catalog is read (FORMAT.md §11.3), and taken again if lost (``PointGuard``).
        owner = f"cdp mount domain {options.domain}"
        lease = await take_recovery_lease(store, options.domain, owner=owner)
        try:
            mount = await cls._open(store, options)
        except BaseException:
            if lease is not None:
                await lease.release()
            raise
        if lease is not None:
            mount.guard = PointGuard(store, mount.plan, lease, owner)
            for disk in mount.disks.values():
                disk.lower.guard = mount.guard
            mount.guard.start()
        return mount

    @classmethod
    async def _open(cls, store: ObjectStore, options: MountOptions) -> Mount:
        plan = await plan_recovery(store, options.domain, options.target, timeline=options.timeline)
        cache = UnitCache(options.cache_bytes_max, options.loads_max)
        workers = pool_workers(options.loads_max)
        if hasattr(store, "read_blocking"):
            # Its GETs wait in the pool too (PlanSource._got_and_decoded): up to twice the
            # CPUs, so that some read while others decode. Cold random 4 KiB reads in process,
            # 2 CPUs: 2 threads 2,326-2,984/s, 4 threads 2,614-2,746/s (the device kept
            # busier), 8 threads 2,260-2,563/s and 15 % more CPU.
            workers = min(options.loads_max, 2 * workers)
        executor = ThreadPoolExecutor(workers, thread_name_prefix="rocva-mount")
        overlay_dir = None
        disks: dict[str, MountedDisk] = {}
        try:
            if options.writable:
                overlay_dir = _OverlayDir.make(options.overlay_dir)
            for d in plan.disks:
                overlay = None
                if overlay_dir is not None:
                    identity = OverlayIdentity(plan.domain, plan.timeline, plan.seq, d.disk, d.size)
                    overlay = await asyncio.to_thread(Overlay.open, overlay_dir.path, d.image_name.removesuffix(".img"),
                                                      identity)
                source = PlanSource(store, d, plan.segments, cache, executor)
                disks[export_name(d)] = MountedDisk(export_name(d), d, source, overlay)
        except BaseException:
            for disk in disks.values():
                if disk.overlay is not None:
                    disk.overlay.close()
            if overlay_dir is not None:
                overlay_dir.close(options.keep_overlay)
            executor.shutdown(wait=False)
            raise
        mount = cls(store, plan, options, cache, executor, disks, overlay_dir)
        logger.info("mount_opened", domain=plan.domain, seq=plan.seq, timeline=plan.timeline,
                    exports=[{"name": n, "size": d.size} for n, d in disks.items()], writable=options.writable,
                    overlay=str(overlay_dir.path) if overlay_dir else None)
        return mount

    def describe(self) -> dict[str, Any]:
        return {"domain": self.plan.domain, "seq": self.plan.seq, "timeline": self.plan.timeline,
                "writable": self.options.writable,
                "exports": [{"name": n, "size": d.size} for n, d in self.disks.items()],
                "overlay": str(self.overlay_dir.path) if self.overlay_dir else None}

    # ------------------------------------------------------------------ rehydration

    def start_rehydration(self, on_done=None) -> None:
        """Restore the point into ``options.rehydrate_to`` in the background; once done,
        reads come from the images (``on_done(summary)`` is called then)."""
        assert self.options.rehydrate_to is not None and self.rehydration is None
        self.rehydration = asyncio.create_task(self._rehydrate(on_done))

    async def _rehydrate(self, on_done) -> None:
        self.rehydrate_store = CountingStore(self.store)
        t0 = time.monotonic()
        last_log = [t0]

        def progress(done: int, total: int) -> None:
            self.rehydrate_progress = (done, total)
            now = time.monotonic()
            if now - last_log[0] >= REHYDRATE_LOG_INTERVAL_S:
                last_log[0] = now
                logger.info("mount_rehydrate_progress", done_bytes=done, total_bytes=total,
                            percent=round(100 * done / total, 1) if total else 100.0)

        logger.info("mount_rehydrate_started", to=str(self.options.rehydrate_to), total_bytes=self.plan.bytes_to_write)
        try:
            # The directory is opened (and kept) first: the images are then opened, and at
            # stop checked, through its descriptor, never by a path a name swap redirects.
            self._rehydrate_dir = await asyncio.to_thread(open_output_dir, self.options.rehydrate_to,
                                                          for_store(self.store))
            result = await execute_plan(self.rehydrate_store, self.plan, self.options.rehydrate_to, progress=progress,
                                        concurrency=self.options.rehydrate_concurrency)
            images = await asyncio.to_thread(self._open_images, self._rehydrate_dir)
        except asyncio.CancelledError:
            logger.info("mount_rehydrate_stopped", done_bytes=self.rehydrate_progress[0],
                        total_bytes=self.rehydrate_progress[1])
            raise
        except Exception as exc:  # noqa: BLE001 - reported; the exports go on from the store
            self.rehydrate_error = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            logger.error("mount_rehydrate_failed", to=str(self.options.rehydrate_to), error=self.rehydrate_error)
            return
        for disk, image in zip(self.disks.values(), images):
            self._images.append(image)
            disk.lower = image
        self.rehydrated = True
        summary = {"to": str(self.options.rehydrate_to), "seconds": round(time.monotonic() - t0, 3),
                   "bytes_written": result["bytes_written"], "bytes_fetched": self.rehydrate_store.bytes,
                   "resumed": result["resumed"], "images": result["images"]}
        logger.info("mount_rehydrated", **summary)
        if on_done is not None:
            on_done(summary)

    def _open_images(self, out: OutputDir) -> list[ImageSource]:
        """The published image of every disk (in ``self.disks``' order), opened through
        ``out``'s descriptor — read-write when the mount is writable, so that the overlay
        is applied to the very file served: a regular file with one link (``OutputDir.open``
        refuses anything else, naming it) of the disk's size."""
        flags = os.O_RDWR if self.options.writable else os.O_RDONLY
        images: list[ImageSource] = []
        try:
            for disk in self.disks.values():
                name = disk.disk.image_name
                image = ImageSource(out.open(name, flags), out.show(name))
                images.append(image)
                size = os.fstat(image.fd).st_size
                if size != disk.size:
                    raise RecoveryError(f"{out.show(name)}: {size} bytes, disk {disk.disk.disk} has {disk.size}")
        except BaseException:
            for image in images:
                image.close()
            raise
        return images

    # ------------------------------------------------------------------ stopping

    async def close(self) -> dict[str, Any]:
        """Stop (after the server is closed): flush the overlays, stop or finish the
        rehydration, apply the overlays to rehydrated images, release everything; the
        summary.

        A temporary overlay directory is removed only when all of that succeeded: it may
        hold the only copy of writes the clients flushed. Otherwise it is kept and the
        error (``RecoveryError``, exit 6) names it and says how to apply it."""
        kept = True
        try:
            await self._finish()
            kept = False
        except Exception as exc:
            if self.overlay_dir is None:
                raise
            raise self._overlay_kept(exc) from exc
        finally:
            for image in self._images:
                image.close()
            if self._rehydrate_dir is not None:
                self._rehydrate_dir.close()
            for disk in self.disks.values():
                if disk.overlay is not None:
                    disk.overlay.close()
            if self.overlay_dir is not None:
                self.overlay_dir.close(self.options.keep_overlay or kept)
            await self.cache.close()
            self.executor.shutdown(wait=True)
            if self.guard is not None:
                await self.guard.close()
        return self.summary()

    async def _finish(self) -> None:
        # Every overlay is flushed, even after one failed: each holds its own clients' writes.
        failed: list[str] = []
        first: OSError | None = None
        for name, disk in self.disks.items():
            if disk.overlay is not None:
                try:
                    await disk.overlay.flush()
                except OSError as exc:
                    why = exc.strerror or str(exc)
                    broken = disk.overlay.broken
                    if broken is not None:  # its own message advises a restart: said once, below
                        why = f"{disk.overlay.data_path}: {broken.strerror or broken}"
                    failed.append(f"flushing the overlay of {name} failed ({why})")
                    first = first or exc
        if failed:
            raise RecoveryError("; ".join(failed)) from first
        if self.rehydration is not None and not self.rehydration.done():
            self.rehydration.cancel()
        if self.rehydration is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.rehydration
        if self.rehydrated and self.options.writable:
            for disk in self.disks.values():
                self.overlay_bytes_applied += await asyncio.to_thread(self._apply, disk)
            logger.info("mount_overlay_applied", bytes=self.overlay_bytes_applied)

    def _apply(self, disk: MountedDisk) -> int:
        """Copy ``disk``'s overlay into its image, through the descriptor the image was
        served from — and only while the image's name in the rehydration directory still
        leads to that file: a name removed or swapped (for a hard link to another file)
        while serving is refused, naming it, and nothing is written."""
        image, out = disk.lower, self._rehydrate_dir
        assert isinstance(image, ImageSource) and disk.overlay is not None and out is not None
        name = disk.disk.image_name
        served = os.fstat(image.fd)
        found = out.lstat(name)
        if found is None or (found.st_dev, found.st_ino) != (served.st_dev, served.st_ino):
            what = "was removed" if found is None else "now leads to another file"
            raise RecoveryError(f"{out.show(name)} {what}: it is not the image this mount served, and the "
                                f"overlay is not applied to it")
        try:
            return disk.overlay.apply_to(image.fd)
        except OSError as exc:
            raise RecoveryError(f"applying the overlay to {out.show(name)} failed ({exc.strerror or exc}); the "
                                f"image may hold part of the writes") from exc

    def _overlay_kept(self, exc: Exception) -> RecoveryError:
        """The error of a stop that could not finish: the overlay directory is kept, and
        this names it and says how to apply what it holds."""
        assert self.overlay_dir is not None
        reason = getattr(exc, "message", None) or getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        kept = self.overlay_dir.path
        broken = [n for n, d in self.disks.items() if d.overlay is not None and d.overlay.broken is not None]
        logger.error("mount_stop_failed", error=reason, overlay_kept=str(kept), overlays_broken=broken)
        lost = [n for n, d in self.disks.items()
                if d.overlay is not None and d.overlay.writes and not d.overlay.has_map()]
        kept_what = f"The writes made through the {'other ' if lost else ''}exports are kept"
        if broken:
            # A failed flush (fsyncgate): what the kernel failed to write may be gone, and
            # what it still caches may be served once more, then not: only the map is trusted.
            kept_what = (f"A flush of the overlay of {', '.join(broken)} failed: the writes acknowledged to "
                         f"{'its' if len(broken) == 1 else 'their'} clients after the last good flush may be "
                         f"lost, as a disk's unflushed writes in a crash. The writes flushed before that are kept")
        if lost:
            # Written to, but no map ever reached the disk: a mount started again on the
            # directory starts that overlay empty, so none of its writes can be applied.
            through = "its export" if len(lost) == 1 else "their exports"
            kept_what = (f"The overlay of {', '.join(lost)} has no map (no flush of it ever completed): a mount on "
                         f"this directory starts it empty, so the writes made through {through} since this "
                         f"mount started are lost. {kept_what}")
        return RecoveryError(
            f"cdp mount could not stop cleanly: {reason}. {kept_what} in the "
            f"overlay directory {kept} (not removed). To apply them, serve the same point with that overlay and "
            f"rehydrate into an empty directory with room for the images: cdp mount {self.plan.domain} --seq "
            f"{self.plan.seq} --timeline {self.plan.timeline} --nbd ADDR --writable --overlay {kept} "
            f"--rehydrate-to NEW_DIR; once it has said 'rehydrated', stop it: the overlay is applied then")

    def summary(self) -> dict[str, Any]:
        overlays = [d.overlay for d in self.disks.values() if d.overlay is not None]
        done, total = self.rehydrate_progress
        return {
            "domain": self.plan.domain, "seq": self.plan.seq, "timeline": self.plan.timeline,
            "reads": sum(d.reads for d in self.disks.values()),
            "bytes_served": sum(d.bytes_served for d in self.disks.values()),
            "writes": sum(o.writes for o in overlays), "bytes_written": sum(o.bytes_written for o in overlays),
            **self.cache.stats(),
            "rehydrated": self.rehydrated, "rehydrate_error": self.rehydrate_error,
            "rehydrate_done_bytes": done, "rehydrate_total_bytes": total,
            "rehydrate_bytes_fetched": self.rehydrate_store.bytes if self.rehydrate_store else 0,
            "overlay_bytes_applied": self.overlay_bytes_applied,
            "leases_retaken": self.guard.leases_retaken if self.guard else 0,
            "point_lost": self.guard.lost if self.guard else None,
            "overlay": (str(self.overlay_dir.path) if self.overlay_dir and (not self.overlay_dir.temporary
                                                                            or self.options.keep_overlay) else None),
        }
