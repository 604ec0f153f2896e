"""``recover``: plan, fetch, verify and publish one raw sparse image per disk.

Output directory layout::

    <vm>-<disk>.img            a finished image (never overwritten)
    <vm>-<disk>.img.partial    an image being built
    recover.state.json         progress of the unfinished recovery (gone when it finishes)
    .recover.lock              flock()ed while a recovery runs (removed when it finishes)

Invariants:

- A ``.img`` is published only after every group of the plan is done, the bytes
  written add up to the plan's, every file has its disk's size, and the images are
  fsynced; then it is *linked* into place (never replacing an existing file) and the
  directory fsynced. On any error the ``.partial`` files stay and nothing is renamed:
  a recovery never hands back a silently wrong disk.
- A group listed as done in ``recover.state.json`` had all its bytes pwritten *and
  fsynced* before the state file was (atomically) written: the state is saved only
  after an ``fsync`` of every image, with the set of groups done before that fsync.
- A state whose plan identity (``RecoveryPlan.identity``: domain, target seq, bases,
  segments, disks) equals the new plan's resumes: its done groups are skipped. Any other
  state is discarded and the ``.partial`` files are recreated empty (sparse).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cdp.digest import sha256_file
from cdp.durable import atomic_write, fsync_dir
from cdp.errors import NotFound, PermissionDenied
from cdp.locks import Lease, recovery_lease
from cdp.logs import get_logger
from rocva.errors import RecoveryError
from rocva.fetch import (
    BASE_BATCH_CHUNKS_DEFAULT, RUN_BYTES_MAX_DEFAULT, Fetcher, Writeback, base_groups, execute, pool_workers,
    segment_groups,
)
from rocva.plan import CONCURRENCY_DEFAULT, RecoveryPlan, plan_recovery
from rocva.target import Target

log = get_logger("rocva.recover")

STATE_NAME = "recover.state.json"
STATE_VERSION = 1
LOCK_NAME = ".recover.lock"
PARTIAL_SUFFIX = ".partial"
#: Least time between two saves of the state file (each one fsyncs every image).
STATE_SAVE_INTERVAL_S = 2.0

Progress = Callable[[int, int], None]


class CountingStore:
    """A read-through view of a store that counts GETs and the bytes they returned."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.gets = 0
        self.bytes = 0

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        data = await self.inner.get(key, offset, length)
        self.gets += 1
        self.bytes += len(data)
        return data

    def list(self, prefix: str = "", *, start_after: str | None = None):
        return self.inner.list(prefix, start_after=start_after)

    def describe(self) -> str:
        return self.inner.describe()


class ResumeState:
    """Progress of one recovery in its output directory (see the module invariants)."""

    def __init__(self, path: Path, plan: RecoveryPlan, done: set[str]) -> None:
        self.path = path
        self.plan = plan
        self.done = done
        self.complete = False
        self._task: asyncio.Task | None = None
        self._failed: BaseException | None = None
        self._last_save = time.monotonic()

    @staticmethod
    def read(path: Path) -> dict | None:
        """The saved document, or None when there is none or it is not ours to trust."""
        try:
            doc = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # unreadable: start over (the state is written atomically, so rare)
        ok = isinstance(doc, dict) and doc.get("version") == STATE_VERSION and isinstance(doc.get("done"), list)
        return doc if ok else None

    def document(self, done: list[str]) -> dict:
        p = self.plan
        return {"version": STATE_VERSION, "identity": p.identity(), "domain": p.domain,
                "target_seq": p.seq, "generation": p.generation, "complete": self.complete,
                "images": [d.image_name for d in p.disks], "done": done}

    def save(self, fds: list[int]) -> None:
        """fsync every image, then atomically write the groups done before that fsync."""
        done = sorted(self.done)
        for fd in fds:
            os.fsync(fd)
        atomic_write(self.path, json.dumps(self.document(done), indent=1).encode())
        self._last_save = time.monotonic()

    def save_soon(self, fds: list[int]) -> None:
        """Start a save in a thread, at most every STATE_SAVE_INTERVAL_S, one at a time."""
        if self._task is not None:
            if not self._task.done():
                return
            if not self._task.cancelled() and self._task.exception() is not None:
                self._failed = self._failed or self._task.exception()
            self._task = None
        if time.monotonic() - self._last_save < STATE_SAVE_INTERVAL_S:
            return
        self._task = asyncio.get_running_loop().create_task(asyncio.to_thread(self.save, fds))

    async def settle(self) -> None:
        """Wait for the save in flight (call before closing the images); raise the error
        of any background save that failed."""
        task, self._task = self._task, None
        if task is not None:
            await task
        if self._failed is not None:
            raise self._failed


def _lock(out_dir: Path) -> int:
    fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RecoveryError(f"{out_dir}: another recovery is running in this directory") from None
    return fd


def _open_images(plan: RecoveryPlan, out_dir: Path, resume: bool) -> list[int] | None:
    """Open the ``.partial`` images: as they are to resume (None if one is missing or of
    the wrong size), or recreated empty and sparse."""
    fds = []
    try:
        for d in plan.disks:
            path = out_dir / (d.image_name + PARTIAL_SUFFIX)
            if resume:
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    return None
                fds.append(fd)
                if os.fstat(fd).st_size != d.size:
                    return None
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                fds.append(fd)
                os.ftruncate(fd, d.size)  # a hole: reads as zeros, takes no blocks
    except BaseException:
        _close(fds)
        raise
    if resume and len(fds) != len(plan.disks):  # pragma: no cover - loop returns first
        return None
    return fds


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()


def _publish(plan: RecoveryPlan, out_dir: Path) -> None:
    """Link every finished ``.partial`` to its final name (never over a file), then drop it."""
    for d in plan.disks:
        final, partial = out_dir / d.image_name, out_dir / (d.image_name + PARTIAL_SUFFIX)
        if final.exists() and (not partial.exists() or os.path.samefile(final, partial)):
            partial.unlink(missing_ok=True)  # published before an interruption
            continue
        try:
            os.link(partial, final)
        except FileExistsError:
            raise RecoveryError(f"{final} appeared during the recovery; {partial.name} is kept") from None
        os.unlink(partial)
    fsync_dir(out_dir)


async def execute_plan(store, plan: RecoveryPlan, out_dir: Path | str, *, progress: Progress | None = None,
                       concurrency: int = CONCURRENCY_DEFAULT, checksum: bool = False,
                       run_bytes_max: int = RUN_BYTES_MAX_DEFAULT,
                       base_batch_chunks: int = BASE_BATCH_CHUNKS_DEFAULT) -> dict:
    """Build the images of ``plan`` in ``out_dir`` (resuming a matching interrupted run)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(out_dir)
    try:
        result = await _execute_locked(store, plan, out_dir, progress, concurrency, checksum,
                                       run_bytes_max, base_batch_chunks)
        (out_dir / LOCK_NAME).unlink()  # still held: a finished directory holds only images
        return result
    finally:
        os.close(lock)


def _prepare(plan: RecoveryPlan, out_dir: Path) -> tuple[ResumeState, list[int], bool, bool]:
    """(state, open images, resuming, finished before): resume a matching saved state, or
    claim the directory for this plan with fresh sparse ``.partial`` images."""
    state_path = out_dir / STATE_NAME
    saved = ResumeState.read(state_path)
    resume = saved is not None and saved.get("identity") == plan.identity()
    state = ResumeState(state_path, plan, set(saved["done"]) if resume else set())
    if resume and saved.get("complete") is True:
        return state, [], True, True  # interrupted while publishing: only links are left
    for d in plan.disks:
        if (out_dir / d.image_name).exists():
            raise RecoveryError(f"{out_dir / d.image_name} already exists: a recovery never "
                                f"overwrites an image; remove it or choose another directory")
    fds = _open_images(plan, out_dir, resume)
    if fds is None:  # a partial image is missing or resized: resuming is impossible
        resume, state.done = False, set()
        fds = _open_images(plan, out_dir, False)
    if not resume:
        state.save(fds)  # claim the directory for this plan before any byte is written
    return state, fds, resume, False


class _Tally:
    """Counts for progress and for the final check: groups seen, skipped, bytes done."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total = total
        self.progress = progress
        self.done_bytes = 0
        self.skipped_bytes = 0
        self.skipped_groups = 0
        self.groups: set[str] = set()

    def add(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        if self.progress:
            self.progress(self.done_bytes, self.total)


async def _fetch_all(plan, state: ResumeState, fds: list[int], fetcher: Fetcher, tally: _Tally,
                     concurrency: int, run_bytes_max: int, base_batch_chunks: int) -> None:
    def skip(name: str, nbytes: int) -> bool:
        tally.groups.add(name)
        if name not in state.done:
            return False
        tally.skipped_bytes += nbytes
        tally.skipped_groups += 1
        tally.add(nbytes)
        return True

    def group_done(name: str) -> None:
        state.done.add(name)
        state.save_soon(fds)

    # Fewer threads than units in flight: see pool_workers.
    with ThreadPoolExecutor(pool_workers(concurrency), thread_name_prefix="rocva") as pool:
        fetcher.executor = pool
        groups = itertools.chain(segment_groups(plan, run_bytes_max), base_groups(plan, base_batch_chunks))
        try:
            await execute(groups, fetcher, concurrency=concurrency, skip=skip, on_group_done=group_done,
                          on_unit_done=tally.add)
        except BaseException:
            if fetcher.writeback is not None:  # the images are closed next: drop the hints not begun
                fetcher.writeback.close(drop_pending=True)
            raise
        if fetcher.writeback is not None:
            try:
                await asyncio.to_thread(fetcher.writeback.close)
            except BaseException:
                fetcher.writeback.close(drop_pending=True)
                raise
    await state.settle()


async def _execute_locked(store, plan, out_dir, progress, concurrency, checksum, run_bytes_max,
                          base_batch_chunks) -> dict:
    t0 = time.monotonic()
    state, fds, resume, finished_before = _prepare(plan, out_dir)
    tally = _Tally(plan.bytes_to_write, progress)
    tally.add(0)  # tell the progress bar the total before the first unit ends
    fetcher = Fetcher(store, fds, None)
    try:
        if not finished_before:
            # Start each image region's write-out once it is complete, so that the fsync
            # before publication has little left to write (see rocva.fetch.Writeback).
            fetcher.writeback = Writeback(plan, fds)
            await _fetch_all(plan, state, fds, fetcher, tally, concurrency, run_bytes_max, base_batch_chunks)
            _verify(plan, fds, state, tally, fetcher)
            state.complete = True
            state.save(fds)
    except BaseException:
        if fds:  # keep what is durable for a resume; the first error is the one raised
            with contextlib.suppress(Exception):
                await state.settle()
            await asyncio.to_thread(state.save, fds)
        raise
    finally:
        _close(fds)
    _publish(plan, out_dir)
    state.path.unlink(missing_ok=True)
    fsync_dir(out_dir)
    images = [{"disk": d.disk, "path": str(out_dir / d.image_name), "size": d.size} for d in plan.disks]
    if checksum:
        sums = await asyncio.gather(*(asyncio.to_thread(sha256_file, Path(i["path"])) for i in images))
        for image, digest in zip(images, sums):
            image["sha256"] = digest
    seconds = time.monotonic() - t0
    return {
        "domain": plan.domain, "seq": plan.seq, "target_seq": plan.seq, "generation": plan.generation,
        "target": plan.target.target.describe(), "resumed": resume,
        "bytes_fetched": getattr(store, "bytes", None), "gets": getattr(store, "gets", None),
        "bytes_written": fetcher.bytes_written, "bytes_skipped": tally.skipped_bytes,
        "groups_skipped": tally.skipped_groups, "groups": len(tally.groups),
        "seconds": round(seconds, 3),
        "mb_per_s": round(fetcher.bytes_written / 1e6 / seconds, 1) if seconds > 0 else None,
        "images": images, "plan": plan.summary(),
    }


def _verify(plan: RecoveryPlan, fds: list[int], state: ResumeState, tally: _Tally, fetcher: Fetcher) -> None:
    """Refuse to publish unless every group is done and every byte of the plan is written."""
    missing = tally.groups - state.done
    if missing:
        raise RecoveryError(f"recovery of domain {plan.domain} at seq {plan.seq}: {len(missing)} work "
                            f"groups not done (e.g. {min(missing)})")
    written = fetcher.bytes_written + tally.skipped_bytes
    if written != plan.bytes_to_write:
        raise RecoveryError(f"recovery of domain {plan.domain} at seq {plan.seq}: wrote "
                            f"{written} bytes, the plan has {plan.bytes_to_write}")
    for d, fd in zip(plan.disks, fds):
        size = os.fstat(fd).st_size
        if size != d.size:
            raise RecoveryError(f"{d.image_name}{PARTIAL_SUFFIX}: {size} bytes, disk {d.disk} has {d.size}")


async def recover(store, domain: int, target: Target | int | str, out_dir: Path | str, *,
                  progress: Progress | None = None, concurrency: int = CONCURRENCY_DEFAULT,
                  checksum: bool = False, now_ns: int | None = None,
                  run_bytes_max: int = RUN_BYTES_MAX_DEFAULT,
                  base_batch_chunks: int = BASE_BATCH_CHUNKS_DEFAULT, timeline: int | None = None) -> dict:
    """Rebuild every disk of ``domain`` at ``target`` on ``timeline`` (default: the
    current one) as ``<vm>-<disk>.img`` in ``out_dir``.

    ``progress(done_bytes, total_bytes)`` is called as work completes. Returns a summary:
    ``bytes_fetched``, ``bytes_written``, ``seconds``, ``mb_per_s``, ``images`` (path,
    size, and ``sha256`` when ``checksum``), ``resumed``/``groups_skipped``, the plan.
    ``run_bytes_max`` bounds one ranged GET of blocks, ``base_batch_chunks`` the chunk
    positions per resume group of a base (see ``rocva.fetch``).
    Raises ``InvalidTarget`` (no recovery point: the message names the nearest ones),
    ``NotFound``/``FormatError`` naming the missing or damaged object, ``RecoveryError``.
    """
    counting = CountingStore(store)
    lease = await _take_lease(store, domain)  # before the catalog is read (FORMAT.md §11.3)
    try:
        plan = await plan_recovery(counting, domain, target, timeline=timeline, concurrency=concurrency,
                                   now_ns=now_ns)
        return await execute_plan(counting, plan, out_dir, progress=progress, concurrency=concurrency,
                                  checksum=checksum, run_bytes_max=run_bytes_max,
                                  base_batch_chunks=base_batch_chunks)
    finally:
        if lease is not None:
            await lease.release()


async def _take_lease(store, domain: int) -> Lease | None:
    """The recovery lease that keeps retention from deleting what this recovery reads.
    Credentials that may only read the store cannot write one: the recovery goes on
    without it (a concurrent retention could then delete an object it needs, which the
    recovery reports by name — never a wrong image)."""
    try:
        return await recovery_lease(store, domain, owner=f"cdp recover domain {domain}")
    except (PermissionDenied, NotFound) as exc:
        log.warning("recovery_without_lease", domain=domain, error=exc.message)
        return None
