"""``recover``: plan, fetch, verify and publish one raw sparse image per disk.

Output directory layout (FORMAT.md §14)::

    <vm>-<disk>.img            a finished image (never overwritten)
    <vm>-<disk>.img.partial    an image being built
    recover.state.json         progress of the unfinished recovery (gone when it finishes)
    .recover.lock              flock()ed while a recovery runs (removed when it ends, however it ends)

Where the directory may be, and how it and its files are opened: ``rocva.destination``
(every name is reached through the directory's descriptor and never followed if it is
a symbolic link). The state file and the proofs a resume gives: ``rocva.resume``.

Invariants:

- Every file a recovery creates is created with ``O_CREAT|O_EXCL|O_NOFOLLOW``. A name it
  finds already there is used only if it is its own leftover: a regular file with no
  other hard link that the directory's state file claims (by name and inode); anything
  else under an image's name is refused, naming the file.
- A ``.img`` is published only after every group of the plan is done, the bytes
  written add up to the plan's, every file has its disk's size, and the images are
  fsynced; then it is *linked* into place (never replacing an existing file) and the
  directory fsynced. On any error the ``.partial`` files stay and nothing is renamed:
  a recovery never hands back a silently wrong disk.
- A group listed as done in ``recover.state.json``, with the digest of its bytes, had
  them pwritten *and fsynced* before the state file was (atomically) written. Once an
  fsync of the images (or a save) failed, the state is not written again in this run
  (``ResumeState.failed``): a retried fsync returns 0 for bytes the kernel dropped
  ("fsyncgate"), and the state would claim them. The run stops; the state on disk is the
  last good one, and the error (``RecoveryError``) names the file and says that the
  same command resumes.
- A state of the same plan (``RecoveryPlan.identity``) cut into the same units resumes
  only once its done groups' digests are read back from the images and match; then
  every byte outside them is zeroed. A state that says the images are complete is
  proved in full before they are published. Any other state is discarded (with a
  warning when it failed a proof) and the ``.partial`` files are created again, empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cdp.durable import SyncFailed
from cdp.errors import CdpError, NotFound, PermissionDenied, StoreClockUnknown
from cdp.locks import ClockSkewed, Lease, recovery_lease
from cdp.logs import get_logger
from cdp.store.base import ObjectStore
from rocva.destination import Destination, OutputDir, for_store, open_output_dir, refuse_odd
from rocva.errors import RecoveryError
from rocva.fetch import Fetcher, execute, pool_workers
from rocva.image_writes import ImageWriteError, Writeback
from rocva.plan import CONCURRENCY_DEFAULT, RecoveryPlan, plan_recovery
from rocva.recover_options import RecoverOptions
from rocva.resume import (
    PARTIAL_SUFFIX, STATE_NAME, STATE_SAVE_INTERVAL_S, STATE_VERSION, ResumeState, SavedState, StateWriteError,
    all_groups, clear_outside, discarded, prove, read_state, zeros_outside,
)
from rocva.work_units import BASE_BATCH_CHUNKS_DEFAULT, GAP_BYTES_MAX_DEFAULT, RUN_BYTES_MAX_DEFAULT

log = get_logger("rocva.recover")

__all__ = ["LOCK_NAME", "PARTIAL_SUFFIX", "STATE_NAME", "STATE_SAVE_INTERVAL_S", "STATE_VERSION", "RecoveryLease",
           "execute_plan", "recover", "recovery_lease_held", "recovery_lease_or_why", "take_recovery_lease"]

LOCK_NAME = ".recover.lock"
SHA256_READ_BYTES = 8 << 20

Progress = Callable[[int, int], None]


class CountingStore:
    """A read-through view of a store that counts GETs and the bytes they returned."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.gets = 0
        self.bytes = 0
        if hasattr(inner, "get_unopened"):  # a sealed store (rocva.fetch opens in its pool)
            self.get_unopened = self._get_unopened
            self.unopened_into = inner.unopened_into  # ... and lends it read buffers
        if hasattr(inner, "get_into"):  # a file store (rocva.fetch lends it read buffers)
            self.get_into = self._get_into

    # Each read passes the reader's bound on (``max_bytes``): refused before the body.
    async def get(self, key: str, offset: int = 0, length: int | None = None, *,
                  max_bytes: int | None = None) -> bytes:
        return self._counted(await self.inner.get(key, offset, length, max_bytes=max_bytes))

    async def _get_unopened(self, key: str, offset: int = 0, length: int | None = None, *, into=None,
                            max_bytes: int | None = None):
        return self._counted(await self.inner.get_unopened(key, offset, length, into=into, max_bytes=max_bytes))

    async def _get_into(self, key: str, offset: int, length: int | None, buf, *, max_bytes: int | None = None):
        return self._counted(await self.inner.get_into(key, offset, length, buf, max_bytes=max_bytes))

    def _counted(self, data):
        self.gets += 1
        self.bytes += len(data)
        return data

    def list(self, prefix: str = "", *, start_after: str | None = None):
        return self.inner.list(prefix, start_after=start_after)

    def describe(self) -> str:
        return self.inner.describe()


def _lock(out: OutputDir) -> int:
    """The directory's lock file, ``flock``ed. Only a file still under the lock's name
    counts as locked: a run that ends unlinks the name while it holds the lock
    (``_unlock``), and another that opened the file before that must not lock the
    unlinked file and run beside a third that created the name anew."""
    try:
        fd = out.create(LOCK_NAME)
    except RecoveryError:  # there already (left by an earlier run, or another one's)
        fd = out.open(LOCK_NAME)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locked = _is_named(out, fd)  # False: another run just ended with it; a third may hold the new one
    except BlockingIOError:
        locked = False
    except BaseException:
        os.close(fd)
        raise
    if not locked:
        os.close(fd)
        raise RecoveryError(f"{out.path}: another recovery is running in this directory")
    return fd


def _is_named(out: OutputDir, fd: int) -> bool:
    """``fd``'s file is what the lock's name holds now."""
    st, found = os.fstat(fd), out.lstat(LOCK_NAME)
    return found is not None and (found.st_dev, found.st_ino) == (st.st_dev, st.st_ino)


def _unlock(out: OutputDir, fd: int) -> None:
    """End this run's hold of the directory, however the run ended: the lock's name is
    removed while the lock is still held (so it is this run's file, which no other process
    holds), unless the name now leads to another file; then the lock is released."""
    try:
        if _is_named(out, fd):
            out.unlink(LOCK_NAME)
    finally:
        os.close(fd)


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()


@dataclass
class _Found:
    """What an image's two names hold when the recovery starts (None: absent)."""

    partial: os.stat_result | None
    final: os.stat_result | None


_UNCLAIMED = object()


def _find(plan: RecoveryPlan, out: OutputDir, saved: SavedState | None) -> list[_Found]:
    """Each image's names; RecoveryError naming a ``.partial`` that is not a leftover of
    this directory's recoveries (a symbolic link, hard-linked, not a regular file, or
    not claimed by the state file)."""
    names = [d.image_name for d in plan.disks]
    if len(set(names)) != len(names):
        raise RecoveryError(f"domain {plan.domain}: two disks have the same image name "
                            f"({sorted(n for n in names if names.count(n) > 1)[0]})")
    found = []
    for d in plan.disks:
        name = d.image_name + PARTIAL_SUFFIX
        partial, final = out.lstat(name), out.lstat(d.image_name)
        if partial is not None:
            both = final is not None and (final.st_dev, final.st_ino) == (partial.st_dev, partial.st_ino)
            refuse_odd(out, name, partial, 2 if both else 1)
            claim = saved.images.get(d.image_name, _UNCLAIMED) if saved is not None else _UNCLAIMED
            if claim is _UNCLAIMED or (claim.ino is not None and claim.ino != partial.st_ino):
                raise RecoveryError(f"{out.show(name)} exists and is not a leftover of a recovery in this "
                                    f"directory (no {STATE_NAME} claims it): remove it or choose another directory")
        found.append(_Found(partial, final))
    return found


def _refuse_finals(plan: RecoveryPlan, out: OutputDir, found: list[_Found]) -> None:
    for d, f in zip(plan.disks, found):
        if f.final is not None:
            raise RecoveryError(f"{out.show(d.image_name)} already exists: a recovery never overwrites an "
                                f"image; remove it or choose another directory")


def _open_saved(plan: RecoveryPlan, out: OutputDir, saved: SavedState, found: list[_Found],
                complete: bool) -> tuple[list[int], str | None]:
    """The saved images, opened to be proved (read-only when ``complete``: one may be
    published already), and why they cannot be used (None if they can)."""
    fds: list[int] = []
    try:
        for d, f in zip(plan.disks, found):
            name = d.image_name + PARTIAL_SUFFIX
            if f.partial is None:
                if not complete or f.final is None:
                    return fds, f"{name} is missing"
                name = d.image_name  # published before an interruption
            fd = out.open(name, os.O_RDONLY if complete else os.O_RDWR, links_max=2 if complete else 1)
            fds.append(fd)
            st = os.fstat(fd)
            if st.st_ino != saved.images[d.image_name].ino:
                return fds, f"{name} is not the file the state recorded (inode {st.st_ino})"
            if st.st_size != d.size:
                return fds, f"{name} has {st.st_size} bytes, disk {d.disk} has {d.size}"
    except BaseException:
        _close(fds)
        raise
    return fds, None


def _proved(plan: RecoveryPlan, fds: list[int], units: dict[str, int], saved: SavedState) -> tuple[str | None, list]:
    """``prove`` of the saved run, and for a complete one zeros outside its groups: (None,
    the done groups' pieces per disk), or (why not, []). A read that fails proves nothing:
    a direct read reports a write-back that failed since (the kernel's ``AS_EIO`` or
    ``AS_ENOSPC``), and the bytes the state claims there may be lost."""
    try:
        problem, keep = prove(plan, fds, units, saved.done, complete=saved.complete)
        if problem is None and saved.complete:
            for d, fd, pieces in zip(plan.disks, fds, keep):
                stray = zeros_outside(fd, d.size, pieces)
                if stray is not None:
                    return f"{d.image_name}: bytes {stray[0]}..{stray[1]} should be zeros and are not", []
    except OSError as exc:
        return (f"reading the images back failed ({exc.strerror or exc}): a write-back to them may have failed, "
                f"and what the state claims may not be on the disk"), []
    return problem, keep


def _resume(plan: RecoveryPlan, out: OutputDir, saved: SavedState, found: list[_Found],
            units: dict[str, int]) -> tuple[ResumeState, list[int]] | str:
    """The state and images of a saved run proved right (and, unless complete, cleared
    outside its done groups), or why the saved run cannot be kept."""
    fds, problem = _open_saved(plan, out, saved, found, saved.complete)
    try:
        if problem is None:
            problem, keep = _proved(plan, fds, units, saved)
        if problem is not None:
            _close(fds)
            return problem
        if not saved.complete:
            for d, fd, pieces in zip(plan.disks, fds, keep):
                clear_outside(fd, d.size, pieces)
    except BaseException:
        _close(fds)
        raise
    state = ResumeState(out, plan, units, dict(saved.done), [saved.images[d.image_name].ino for d in plan.disks])
    state.complete = saved.complete
    return state, fds


def _start_over(plan: RecoveryPlan, out: OutputDir, found: list[_Found], units: dict[str, int]
                ) -> tuple[ResumeState, list[int]]:
    """Claim the image names in a new state, then create the ``.partial`` images empty
    (replacing leftovers ``_find`` recognised) and record their inodes."""
    state = ResumeState(out, plan, units, {}, [None] * len(plan.disks))
    state.save([])  # claims the names before any file exists: a crash now leaves ours
    fds: list[int] = []
    try:
        for k, (d, f) in enumerate(zip(plan.disks, found)):
            name = d.image_name + PARTIAL_SUFFIX
            if f.partial is not None:
                out.unlink(name)
            fd = out.create(name)
            fds.append(fd)
            try:
                os.ftruncate(fd, d.size)  # a hole: reads as zeros, takes no blocks
            except OSError as exc:  # EFBIG: the file system's largest file is smaller than the disk
                raise OSError(exc.errno, f"{exc.strerror}: cannot size {name} to disk {d.image_name}'s "
                                         f"{d.size} bytes") from exc
            state.inos[k] = os.fstat(fd).st_ino
        state.save(fds)
    except BaseException:
        _close(fds)
        raise
    return state, fds


def _prepare(plan: RecoveryPlan, out: OutputDir, units: dict[str, int]
             ) -> tuple[ResumeState, list[int], bool, str | None]:
    """(state, open images, resumed, why a saved state was discarded): resume a saved
    state of this plan once proved, or claim the directory with fresh ``.partial`` images."""
    saved = read_state(out)
    found = _find(plan, out, saved)
    problem = None
    if saved is not None and saved.resumes(plan, units):
        if saved.complete:  # published before an interruption: only the images it created
            _refuse_finals(plan, out, [f if f.final is None or f.final.st_ino != saved.images[d.image_name].ino
                                       else _Found(f.partial, None) for d, f in zip(plan.disks, found)])
        else:
            _refuse_finals(plan, out, found)
        kept = _resume(plan, out, saved, found, units)
        if not isinstance(kept, str):
            return kept[0], kept[1], True, None
        problem = kept
        discarded(out, problem)
    _refuse_finals(plan, out, found)
    state, fds = _start_over(plan, out, found, units)
    return state, fds, False, problem


def _publish(plan: RecoveryPlan, out: OutputDir, inos: list[int | None]) -> None:
    """Link every finished ``.partial`` to its final name (never over a file), then drop it."""
    for d, ino in zip(plan.disks, inos):
        final, partial = d.image_name, d.image_name + PARTIAL_SUFFIX
        st = out.lstat(final)
        if st is not None:
            if st.st_ino != ino or not stat.S_ISREG(st.st_mode):
                raise RecoveryError(f"{out.show(final)} appeared during the recovery; {partial} is kept")
            out.unlink(partial)  # published before an interruption
            continue
        try:
            out.link(partial, final)
        except FileExistsError:
            raise RecoveryError(f"{out.show(final)} appeared during the recovery; {partial} is kept") from None
        st = out.lstat(final)
        if st is None or st.st_ino != ino or not stat.S_ISREG(st.st_mode):  # the name was swapped under us
            out.unlink(final)
            raise RecoveryError(f"{out.show(partial)} was replaced during the recovery: nothing is published")
        out.unlink(partial)
    out.fsync()


def _sha256(out: OutputDir, name: str) -> str:
    fd = out.open(name, os.O_RDONLY)
    try:
        digest = hashlib.sha256()
        buf = bytearray(SHA256_READ_BYTES)
        view = memoryview(buf)
        while n := os.readv(fd, [buf]):
            digest.update(view[:n])
        return digest.hexdigest()
    finally:
        os.close(fd)


async def execute_plan(store: ObjectStore, plan: RecoveryPlan, out_dir: Path | str, *, progress: Progress | None = None,
                       concurrency: int = CONCURRENCY_DEFAULT, checksum: bool = False,
                       run_bytes_max: int = RUN_BYTES_MAX_DEFAULT,
                       base_batch_chunks: int = BASE_BATCH_CHUNKS_DEFAULT,
                       destination: Destination | None = None) -> dict:
    """Build the images of ``plan`` in ``out_dir`` (resuming a matching interrupted run).

    ``destination`` says where ``out_dir`` may be (default: anywhere this process can
    write); never inside ``store``'s own directory (``rocva.destination``)."""
    out = open_output_dir(out_dir, for_store(store, destination))
    try:
        lock = _lock(out)
        try:
            # A finished directory holds only images; a refused or failed run leaves no lock.
            return await _execute_locked(store, plan, out, progress, concurrency, checksum,
                                         {"run_bytes_max": run_bytes_max, "gap_bytes_max": GAP_BYTES_MAX_DEFAULT,
                                          "base_batch_chunks": base_batch_chunks})
        finally:
            _unlock(out, lock)
    finally:
        out.close()


class _Tally:
    """Counts for progress and for the final check: groups seen, skipped, bytes done."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total = total
        self.progress = progress
        self.done_bytes = 0
        self.skipped_bytes = 0
        self.skipped_groups = 0
        self.groups: set[str] = set()
        self.sizes: dict[str, int] = {}  # bytes of each group seen

    def left(self, saved: frozenset[str]) -> int:
        """Bytes of the plan outside the groups ``saved`` (what a rerun writes), as far as
        the groups seen tell."""
        return max(0, self.total - sum(self.sizes.get(name, 0) for name in saved))

    def add(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        if self.progress:
            self.progress(self.done_bytes, self.total)


async def _fetch_all(store: ObjectStore, plan, state: ResumeState, fds: list[int], tally: _Tally,
                     concurrency: int, units: dict[str, int]) -> int:
    """Run every group not done yet into ``fds``; the bytes written. Each image region's
    write-out starts once it is complete, so that the fsync before publication has little
    left to write (``rocva.image_writes.Writeback``)."""
    def skip(name: str, nbytes: int) -> bool:
        state.check()  # a save failed: nothing more can be recorded, stop now
        tally.groups.add(name)
        tally.sizes[name] = nbytes
        if name not in state.done:
            return False
        tally.skipped_bytes += nbytes
        tally.skipped_groups += 1
        tally.add(nbytes)
        return True

    def group_done(name: str, digest: int) -> None:
        state.done[name] = digest
        state.save_soon(fds)

    # Fewer threads than units in flight: see pool_workers.
    with ThreadPoolExecutor(pool_workers(concurrency), thread_name_prefix="rocva") as pool:
        writeback = Writeback(plan, fds)
        fetcher = Fetcher(store, fds, pool, writeback)
        try:
            await execute(all_groups(plan, units), fetcher, concurrency=concurrency, skip=skip,
                          on_group_done=group_done, on_unit_done=tally.add)
        except BaseException:
            writeback.close(drop_pending=True)  # the images are closed next: drop the hints not begun
            raise
        try:
            await asyncio.to_thread(writeback.close)
        except BaseException:
            writeback.close(drop_pending=True)
            raise
    await state.settle()
    return fetcher.bytes_written


async def _execute_locked(store: ObjectStore, plan, out: OutputDir, progress, concurrency, checksum, units) -> dict:
    t0 = time.monotonic()
    tally = _Tally(plan.bytes_to_write, progress)
    try:
        state, fds, resume, discarded_because = await asyncio.to_thread(_prepare, plan, out, units)
    except (ImageWriteError, SyncFailed, StateWriteError) as exc:
        raise _write_failed(exc, plan, out, {}, plan.bytes_to_write) from exc
    finished_before = state.complete
    names = {fd: out.show(d.image_name + PARTIAL_SUFFIX) for d, fd in zip(plan.disks, fds)}
    tally.add(0)  # tell the progress bar the total before the first unit ends
    bytes_written = 0
    try:
        try:
            if not finished_before:
                bytes_written = await _fetch_all(store, plan, state, fds, tally, concurrency, units)
                _verify(plan, fds, state, tally, bytes_written)
                state.complete = True
                state.save(fds)
        except BaseException:
            if fds and not finished_before:  # keep what is durable for a resume; the first error is raised
                with contextlib.suppress(Exception):
                    await state.settle()
                if state.failed is None:  # else the state on disk is the last good one: never a newer
                    try:
                        await asyncio.to_thread(state.save, fds)
                    except OSError as exc:
                        log.warning("recover_state_not_saved", dir=str(out.path), error=str(exc))
            raise
        finally:
            _close(fds)
    except (ImageWriteError, SyncFailed, StateWriteError) as exc:
        raise _write_failed(exc, plan, out, names, tally.left(state.saved)) from exc
    _publish(plan, out, state.inos)
    out.unlink(STATE_NAME)
    out.fsync()
    images = [{"disk": d.disk, "path": str(out.path / d.image_name), "size": d.size} for d in plan.disks]
    if checksum:
        sums = await asyncio.gather(*(asyncio.to_thread(_sha256, out, d.image_name) for d in plan.disks))
        for image, digest in zip(images, sums):
            image["sha256"] = digest
    seconds = time.monotonic() - t0
    return {
        "domain": plan.domain, "seq": plan.seq, "target_seq": plan.seq, "generation": plan.generation,
        "target": plan.target.target.describe(), "resumed": resume, "state_discarded": discarded_because,
        "bytes_fetched": getattr(store, "bytes", None), "gets": getattr(store, "gets", None),
        "bytes_written": bytes_written, "bytes_skipped": tally.skipped_bytes,
        "groups_skipped": tally.skipped_groups, "groups": len(tally.groups),
        "seconds": round(seconds, 3),
        "mb_per_s": round(bytes_written / 1e6 / seconds, 1) if seconds > 0 else None,
        "images": images, "plan": plan.summary(),
    }


def _write_failed(exc: OSError, plan: RecoveryPlan, out: OutputDir, names: dict[int, str],
                  left: int) -> RecoveryError:
    """The error of a recovery whose write or fsync of an image, or write of its state,
    failed (a full file system, a failing disk): the file, the directory, the bytes a
    rerun has ``left`` to write, and that the same command resumes."""
    if isinstance(exc, ImageWriteError):
        where = names.get(exc.fd, f"an image in {out.path}")
        what = f"writing {exc.length} bytes at offset {exc.offset} failed ({exc.strerror})"
    elif isinstance(exc, SyncFailed):
        first = exc.first.strerror or str(exc.first)
        where = exc.filename
        what = (f"fsync failed ({first})" if exc.__cause__ is exc.first else f"an earlier fsync failed ({first})")
        what += ": bytes written since the last good save may be lost, so no new state was saved"
    else:
        where, what = exc.filename, f"writing the recovery state failed ({exc.strerror})"
    try:
        st = os.fstatvfs(out.fd)
        free = f"; the file system says {st.f_bavail * st.f_frsize} bytes are free"
    except OSError:
        free = ""
    return RecoveryError(
        f"{where}: {what}. The recovery into {out.path} still needs {left} of the plan's "
        f"{plan.bytes_to_write} bytes written{free}. Make room (or fix the disk) and run the same command again: it "
        f"resumes from {STATE_NAME}, keeping only the work it recorded as durable and checking that against the "
        f"disk")


def _verify(plan: RecoveryPlan, fds: list[int], state: ResumeState, tally: _Tally, bytes_written: int) -> None:
    """Refuse to publish unless every group is done and every byte of the plan is written."""
    missing = tally.groups - set(state.done)
    if missing:
        raise RecoveryError(f"recovery of domain {plan.domain} at seq {plan.seq}: {len(missing)} work "
                            f"groups not done (e.g. {min(missing)})")
    written = bytes_written + tally.skipped_bytes
    if written != plan.bytes_to_write:
        raise RecoveryError(f"recovery of domain {plan.domain} at seq {plan.seq}: wrote "
                            f"{written} bytes, the plan has {plan.bytes_to_write}")
    for d, fd in zip(plan.disks, fds):
        size = os.fstat(fd).st_size
        if size != d.size:
            raise RecoveryError(f"{d.image_name}{PARTIAL_SUFFIX}: {size} bytes, disk {d.disk} has {d.size}")


async def recover(store: ObjectStore, domain: int, options: RecoverOptions, *,
                  progress: Progress | None = None, now_ns: int | None = None,
                  run_bytes_max: int = RUN_BYTES_MAX_DEFAULT,
                  base_batch_chunks: int = BASE_BATCH_CHUNKS_DEFAULT,
                  destination: Destination | None = None) -> dict:
    """Rebuild every disk of ``domain`` at ``options.target`` on ``options.timeline``
    (default: the current one) as ``<vm>-<disk>.img`` in ``options.out_dir``
    (``RecoverOptions``: what the CLI and the REST API fill alike).

    ``progress(done_bytes, total_bytes)`` is called as work completes. Returns a summary:
    ``bytes_fetched``, ``bytes_written``, ``seconds``, ``mb_per_s``, ``images`` (path,
    size, and ``sha256`` when ``options.checksum``), ``resumed``/``groups_skipped``,
    ``state_discarded`` (why a saved state could not be kept, or None), ``without_lease``
    (why it ran without a recovery lease, or None: ``recovery_lease_or_why``), the plan.
    ``run_bytes_max`` bounds one ranged GET of blocks, ``base_batch_chunks`` the chunk
    positions per resume group of a base (see ``rocva.fetch``). ``destination``: where
    ``out_dir`` may be (``rocva.destination``; default anywhere but the store's own
    directory), checked before the store is read.
    Raises ``InvalidTarget`` (no recovery point: the message names the nearest ones),
    ``NotFound``/``FormatError`` naming the missing or damaged object, ``RecoveryError``
    (the destination or a file in it refused, naming it).
    """
    from rocva.destination import resolve_destination

    if not isinstance(options, RecoverOptions):
        raise TypeError(f"recover() takes RecoverOptions, not {type(options).__name__}")
    out_dir = options.out_dir
    resolve_destination(out_dir, for_store(store, destination))  # refuse early; checked again when opened
    counting = CountingStore(store)
    async with recovery_lease_held(store, domain) as held:  # before the catalog is read (FORMAT.md §11.3)
        plan = await plan_recovery(counting, domain, options.target, timeline=options.timeline,
                                   concurrency=options.concurrency, now_ns=now_ns)
        summary = await execute_plan(counting, plan, out_dir, progress=progress, concurrency=options.concurrency,
                                     checksum=options.checksum, run_bytes_max=run_bytes_max,
                                     base_batch_chunks=base_batch_chunks, destination=for_store(store, destination))
        return {**summary, "without_lease": held.without}


@dataclass(frozen=True)
class RecoveryLease:
    """What ``recovery_lease_held`` yields: the lease held, or why there is none."""

    lease: Lease | None
    #: Why the recovery runs without a lease (None: it holds one); its result says so.
    without: str | None = None


#: Why a recovery may go on without its lease, by the error that refused the lease.
#: Read-only credentials cannot write one. A clock that disagrees with the store's, or a
#: store answer without a usable Date, only stops the lease from being judged fairly by
#: the others (§11.1); the recovery only reads, and in a disaster the recovery host is the
#: one likely to have a bad clock. Anything else (a store that does not answer) still fails.
_WITHOUT_LEASE: tuple[tuple[type[CdpError], str], ...] = (
    (PermissionDenied, "the store refused the lease (read-only credentials)"),
    (NotFound, "the store refused the lease (read-only credentials)"),
    (ClockSkewed, "this host's clock is off from the store's"),
    (StoreClockUnknown, "the store's clock is unknown"),
)
_WITHOUT_LEASE_ERRORS = tuple(kind for kind, _ in _WITHOUT_LEASE)


async def take_recovery_lease(store: ObjectStore, domain: int, owner: str | None = None) -> Lease | None:
    """The recovery lease that keeps retention from deleting what this recovery reads
    (None: the recovery goes on without one, ``recovery_lease_or_why``)."""
    return (await recovery_lease_or_why(store, domain, owner)).lease


async def recovery_lease_or_why(store: ObjectStore, domain: int, owner: str | None = None) -> RecoveryLease:
    """The recovery lease on ``domain``, or why the recovery goes on without one: read-only
    credentials, or a clock check that failed (``_WITHOUT_LEASE``). Without it a concurrent
    retention could delete an object the recovery needs, which the recovery then reports
    by name (NotFound) — never a wrong image. Logged (``recovery_without_lease``)."""
    try:
        return RecoveryLease(await recovery_lease(store, domain, owner=owner or f"cdp recover domain {domain}"))
    except _WITHOUT_LEASE_ERRORS as exc:
        reason = next(why for kind, why in _WITHOUT_LEASE if isinstance(exc, kind))
        log.warning("recovery_without_lease", domain=domain, reason=reason, error=exc.message)
        return RecoveryLease(None, f"{reason}: {exc.message}")


@contextlib.asynccontextmanager
async def recovery_lease_held(store: ObjectStore, domain: int, owner: str | None = None
                              ) -> AsyncIterator[RecoveryLease]:
    """Hold a recovery lease on ``domain`` (``recovery_lease_or_why``) for the block: every
    reader of a domain's objects (recover, verify, failover, failback) enters it *before*
    it loads the catalog and leaves it once it read the last of them (FORMAT.md §11.3),
    however the block ends. Yields the lease, or why there is none."""
    held = await recovery_lease_or_why(store, domain, owner)
    try:
        yield held
    finally:
        if held.lease is not None:
            await held.lease.release()
