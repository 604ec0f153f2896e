"""The resume state of a recovery (``recover.state.json``, FORMAT.md §14) and the proofs a
resume gives before it keeps anything an earlier run left in the output directory.

What a resume keeps must be proved, because the directory is not the recovery's alone:
its files can be damaged, copied from elsewhere or written by hand. So:

- the state records, for every work group done (``rocva.fetch``: ``seg:<key>``,
  ``base:<disk>:<batch>``), the digest of the bytes its units placed, and the inode of
  each ``.partial`` image it created (its leftovers are recognised by name *and* inode);
- before a resume skips a done group, ``prove`` reads the group's pieces back from the
  images and recomputes its digest; then ``clear_outside`` zeroes every byte outside the
  done groups' pieces (punching holes), since a later piece's all-zero pages are left
  as holes and would otherwise show whatever the file held there;
- a state that claims completion is proved in full (every group, and zeros everywhere
  else) before its images are published;
- the proofs read the images past the page cache (``DeviceReader``: ``O_DIRECT``): after
  a failed write-back Linux keeps the lost bytes cached, marked clean ("fsyncgate");
- a save whose fsync (or write) failed poisons the state for the rest of the process
  (``ResumeState.failed``): it is never written again, since a later fsync returns 0 for
  bytes the kernel dropped and the state would claim them. The state on disk stays the
  last good one, which claims only bytes an fsync that succeeded made durable.

A state that fails any proof is discarded with a warning and the recovery starts over.
The digests are plain xxh3: they catch damage, stale or foreign files and garbage, not a
forger who can write the output directory — who could as well rewrite the images after
they are published.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from cdp import durable
from cdp.direct_io import ReadBuffer, read_direct_into
from cdp.fallocate import KEEP_SIZE, PUNCH_HOLE, fallocate
from cdp.logs import get_logger
from rocva.destination import OutputDir
from rocva.fetch import READBACK_BYTES, ReadBack, group_digest, unit_digest_from_file
from rocva.plan import RecoveryPlan
from rocva.work_units import Unit, base_groups, segment_groups

log = get_logger("rocva.resume")

STATE_NAME = "recover.state.json"
STATE_VERSION = 2
#: Largest state file read (about 90 bytes per done group: some 700,000 groups).
STATE_BYTES_MAX = 64 << 20
#: Most images one state may list.
STATE_IMAGES_MAX = 4096
PARTIAL_SUFFIX = ".partial"
#: Least time between two saves of the state file (each one fsyncs every image).
STATE_SAVE_INTERVAL_S = 2.0
ZERO_WRITE_BYTES = 1 << 20  # one pwrite of zeros where holes cannot be punched

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,250}\.img")
_GROUP_NAME_CHARS_MAX = 1024


@dataclass(frozen=True)
class SavedImage:
    size: int | None  # None in a version-1 state
    ino: int | None  # None: claimed before it was created


@dataclass(frozen=True)
class SavedState:
    """A state file as read, checked for shape (not yet for truth)."""

    version: int
    identity: str | None
    units: dict[str, int] | None
    complete: bool
    images: dict[str, SavedImage]  # image name -> size and inode of its .partial
    done: dict[str, int]  # group name -> digest

    def resumes(self, plan: RecoveryPlan, units: dict[str, int]) -> bool:
        """Whether this state is of ``plan`` cut into the same units, with every image created."""
        return (self.version == STATE_VERSION and self.identity == plan.identity() and self.units == units
                and [(d.image_name, d.size) for d in plan.disks]
                == [(name, image.size) for name, image in self.images.items()]
                and all(image.ino is not None for image in self.images.values()))


def _int(value: Any, what: str, *, nullable: bool = False) -> int | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 1 << 64:
        raise ValueError(f"{what}: expected an integer in 0..2**64-1, got {value!r:.40}")
    return value


def _keys(doc: Any, what: str, keys: set[str], optional: frozenset[str] = frozenset()) -> dict:
    if not isinstance(doc, dict) or not keys <= set(doc) <= keys | optional:
        got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        also = f" (and maybe {sorted(optional)})" if optional else ""
        raise ValueError(f"{what}: expected an object with keys {sorted(keys)}{also}, got {got}"[:300])
    return doc


def parse_state(doc: Any) -> SavedState:
    """The checked shape of a state document; ValueError naming the first bad field."""
    if not isinstance(doc, dict):
        raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
    version = doc.get("version")
    if version == 1:  # before digests: it claims its images by name, it is never resumed
        images = doc.get("images")
        if not isinstance(images, list) or len(images) > STATE_IMAGES_MAX:
            raise ValueError("images: expected a list of image names")
        named = [n for n in images if isinstance(n, str) and _IMAGE_NAME.fullmatch(n)]
        return SavedState(1, None, None, False, {n: SavedImage(None, None) for n in named}, {})
    if isinstance(version, bool) or version != STATE_VERSION:
        raise ValueError(f"version: expected {STATE_VERSION}, got {version!r:.40}")
    _keys(doc, "state", {"version", "identity", "domain", "target_seq", "generation", "units", "complete",
                         "images", "done"})
    if not isinstance(doc["identity"], str) or not _HEX64.fullmatch(doc["identity"]):
        raise ValueError("identity: expected 64 lowercase hex digits")
    for key in ("domain", "target_seq", "generation"):
        _int(doc[key], key)
    # A state written before gap_bytes_max existed parses, and is then not resumed: its
    # runs were cut without gaps, so its digests are not the new plan's (``resumes``).
    units = _keys(doc["units"], "units", {"run_bytes_max", "base_batch_chunks"},
                  optional=frozenset({"gap_bytes_max"}))
    for key, value in units.items():
        if not _int(value, f"units.{key}") and key != "gap_bytes_max":
            raise ValueError(f"units.{key}: expected a positive integer")
    if not isinstance(doc["complete"], bool):
        raise ValueError("complete: expected true or false")
    if not isinstance(doc["images"], list) or not 0 < len(doc["images"]) <= STATE_IMAGES_MAX:
        raise ValueError(f"images: expected a list of 1..{STATE_IMAGES_MAX} images")
    images: dict[str, SavedImage] = {}
    for i, image in enumerate(doc["images"]):
        _keys(image, f"images[{i}]", {"name", "size", "ino"})
        name = image["name"]
        if not isinstance(name, str) or not _IMAGE_NAME.fullmatch(name) or name in images:
            raise ValueError(f"images[{i}].name: expected a new image name <vm>-<disk>.img, got {name!r:.80}")
        images[name] = SavedImage(_int(image["size"], f"images[{i}].size"),
                                  _int(image["ino"], f"images[{i}].ino", nullable=True))
    if doc["complete"] and any(image.ino is None for image in images.values()):
        raise ValueError("complete: true with an image never created (ino null)")
    if not isinstance(doc["done"], dict):
        raise ValueError("done: expected an object of group name -> digest")
    done: dict[str, int] = {}
    for name, digest in doc["done"].items():
        if len(name) > _GROUP_NAME_CHARS_MAX or not isinstance(digest, str) or not _HEX16.fullmatch(digest):
            raise ValueError(f"done[{name[:80]!r}]: expected 16 lowercase hex digits, got {digest!r:.40}")
        done[name] = int(digest, 16)
    return SavedState(STATE_VERSION, doc["identity"], dict(units), doc["complete"], images, done)


def read_state(out: OutputDir) -> SavedState | None:
    """The directory's state, or None when there is none or it cannot be used (a warning
    says why). RecoveryError if the name is a symbolic link or not a regular file."""
    data = out.read(STATE_NAME, STATE_BYTES_MAX)
    if data is None:
        return None
    try:
        if len(data) > STATE_BYTES_MAX:
            raise ValueError(f"larger than {STATE_BYTES_MAX} bytes")
        return parse_state(json.loads(data.decode("utf-8")))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        discarded(out, f"{STATE_NAME} is not a usable recovery state: {str(exc)[:300]}")
        return None


def discarded(out: OutputDir, reason: str) -> None:
    log.warning("recover_state_discarded", dir=str(out.path), reason=reason)


class StateWriteError(OSError):
    """Writing ``recover.state.json`` failed; ``filename`` names it."""


class ResumeState:
    """Progress of one recovery in its output directory (see ``rocva.recover``'s invariants):
    ``done`` maps each group whose bytes are pwritten (and fsynced before the next save)
    to their digest; ``inos`` are the ``.partial`` images' inodes (None before creation).

    Invariant: once a save failed (``failed``), no save writes the state again in this
    process (module docstring)."""

    def __init__(self, out: OutputDir, plan: RecoveryPlan, units: dict[str, int], done: dict[str, int],
                 inos: list[int | None]) -> None:
        self.out = out
        self.plan = plan
        self.units = units
        self.done = done
        self.inos = inos
        self.complete = False
        self._task: asyncio.Task | None = None
        self.failed: OSError | None = None  # the save that failed: the state is not written again
        self.saved = frozenset(done)  # the groups the state on disk claims
        self._syncs = durable.StickySync()  # the images' fsyncs
        self._last_save = time.monotonic()

    def document(self, done: dict[str, int]) -> dict:
        p = self.plan
        return {"version": STATE_VERSION, "identity": p.identity(), "domain": p.domain, "target_seq": p.seq,
                "generation": p.generation, "units": dict(self.units), "complete": self.complete,
                "images": [{"name": d.image_name, "size": d.size, "ino": ino} for d, ino in zip(p.disks, self.inos)],
                "done": {name: f"{done[name]:016x}" for name in sorted(done)}}

    def save(self, fds: list[int]) -> None:
        """fsync every image (``fds``: the plan's disks in order), then atomically write
        the groups done before that fsync. ``durable.SyncFailed`` naming the image, or
        ``StateWriteError``; either poisons the state (``failed``, raised by every later
        save)."""
        self.check()
        done = dict(self.done)
        try:
            for d, fd in zip(self.plan.disks, fds):
                self._syncs.sync(fd, self.out.show(d.image_name + PARTIAL_SUFFIX), data_only=False)
            try:
                self.out.write_atomic(STATE_NAME, json.dumps(self.document(done), indent=1).encode())
            except OSError as exc:
                raise StateWriteError(exc.errno, exc.strerror, self.out.show(STATE_NAME)) from exc
        except OSError as exc:
            self.failed = self.failed or exc
            raise
        self.saved = frozenset(done)
        self._last_save = time.monotonic()

    def check(self) -> None:
        """Raise the failure of an earlier save, if one failed."""
        if self.failed is not None:
            raise self.failed

    def save_soon(self, fds: list[int]) -> None:
        """Start a save in a thread, at most every STATE_SAVE_INTERVAL_S, one at a time;
        none once a save failed."""
        if self._task is not None:
            if not self._task.done():
                return
            if not self._task.cancelled():
                self._task.exception()  # retrieved; a failure is in ``failed``
            self._task = None
        if self.failed is not None or time.monotonic() - self._last_save < STATE_SAVE_INTERVAL_S:
            return
        self._task = asyncio.get_running_loop().create_task(asyncio.to_thread(self.save, fds))

    async def settle(self) -> None:
        """Wait for the save in flight (call before closing the images); raise the error
        of any save that failed."""
        task, self._task = self._task, None
        if task is not None:
            await task
        self.check()


# --------------------------------------------------------------------------- proofs


def all_groups(plan: RecoveryPlan, units: dict[str, int]) -> Iterator[tuple[str, int, list[Unit]]]:
    """Every work group of ``plan``, cut as ``units`` says (the order ``rocva.recover`` runs them)."""
    return itertools.chain(segment_groups(plan, units["run_bytes_max"], units.get("gap_bytes_max", 0)),
                           base_groups(plan, units["base_batch_chunks"]))


Pieces = list[tuple[np.ndarray, np.ndarray]]  # per disk slot: (offsets, lengths) arrays


class DeviceReader:
    """Reads the images back past the page cache, for the proofs of a resume: after a
    failed write-back Linux keeps the lost pages cached and marks them clean, so a
    buffered read would prove bytes the disk does not hold. ``O_DIRECT``
    (``cdp.direct_io.read_direct_into``, into one reused buffer); where the file system
    refuses it, the image's cached pages are dropped once (``POSIX_FADV_DONTNEED``,
    advice) and it is read buffered (tmpfs refuses it, and there the cache is the file).
    A ``ReadBack`` (``rocva.fetch``): at most ``READBACK_BYTES`` a call."""

    def __init__(self) -> None:
        self._direct = ReadBuffer()
        self._buffer = bytearray(READBACK_BYTES)
        self._buffered: set[int] = set()  # descriptors whose file system refused O_DIRECT

    def __call__(self, fd: int, offset: int, length: int) -> memoryview:
        length = min(length, READBACK_BYTES)
        if fd not in self._buffered:
            got = read_direct_into(fd, offset, offset + length, self._direct)
            if got is not None:
                return got
            self._buffered.add(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        view = memoryview(self._buffer)[:length]
        return view[: os.preadv(fd, [view], offset)]


def prove(plan: RecoveryPlan, fds: list[int], units: dict[str, int], done: dict[str, int], *,
          complete: bool) -> tuple[str | None, list[Pieces]]:
    """(None, the done groups' pieces per disk) when the images hold, for every group of
    ``done``, bytes of its recorded digest (and, ``complete``, when every group of the plan
    is done); else (what is wrong, [])."""
    keep: list[Pieces] = [[] for _ in plan.disks]
    names = set()
    buf = bytearray(READBACK_BYTES)
    read = DeviceReader()
    for name, _, group in all_groups(plan, units):
        names.add(name)
        if name not in done:
            continue
        digest = group_digest([unit_digest_from_file(fds, u, buf, read) for u in group])
        if digest != done[name]:
            return (f"work group {name}: the images hold bytes of digest {digest:016x}, the state records "
                    f"{done[name]:016x}"), []
        for u in group:
            for k in np.unique(u.slot).tolist():
                sel = u.slot == k
                keep[k].append((u.offset[sel], u.length[sel]))
    unknown = set(done) - names
    if unknown:
        return f"the state names {len(unknown)} work groups the plan does not have (e.g. {min(unknown)[:120]})", []
    if complete and names != set(done):
        return f"the state says complete, but {len(names - set(done))} work groups are not done", []
    return None, keep


def data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The ranges of ``[0, size)`` that may hold data (all of it where SEEK_DATA is missing)."""
    pos = 0
    while pos < size:
        try:
            a = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, size
                return
            raise
        if a >= size:
            return
        b = min(os.lseek(fd, a, os.SEEK_HOLE), size)
        if b <= a:  # pragma: no cover - SEEK_HOLE always moves past data
            b = size
        yield a, b
        pos = b


def outside(fd: int, size: int, pieces: Pieces) -> Iterator[tuple[int, int]]:
    """The ranges of the file that may hold data and lie outside every piece (the pieces
    of a plan are disjoint)."""
    if pieces:
        starts = np.concatenate([o for o, _ in pieces]).astype(np.int64)
        ends = starts + np.concatenate([n for _, n in pieces]).astype(np.int64)
    else:
        starts = ends = np.zeros(0, np.int64)
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    g0 = np.concatenate([[0], ends])  # the gaps between the pieces
    g1 = np.concatenate([starts, [size]])
    real = g1 > g0
    g0, g1 = g0[real], g1[real]
    for a, b in data_ranges(fd, size):
        i = int(np.searchsorted(g1, a, side="right"))
        j = int(np.searchsorted(g0, b, side="left"))
        for x, y in zip(np.maximum(g0[i:j], a).tolist(), np.minimum(g1[i:j], b).tolist()):
            if x < y:
                yield x, y


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make ``[offset, offset + length)`` read as zeros: a punched hole, or written zeros
    where the file system cannot punch."""
    if fallocate(fd, PUNCH_HOLE | KEEP_SIZE, offset, length):
        return
    zeros = bytes(min(length, ZERO_WRITE_BYTES))
    end = offset + length
    while offset < end:
        offset += os.pwrite(fd, zeros[: end - offset], offset)


def clear_outside(fd: int, size: int, pieces: Pieces) -> int:
    """Zero every byte of the image outside ``pieces``; the bytes cleared."""
    cleared = 0
    for a, b in list(outside(fd, size, pieces)):  # listed first: punching moves the holes
        zero_range(fd, a, b - a)
        cleared += b - a
    return cleared


def zeros_outside(fd: int, size: int, pieces: Pieces, read: ReadBack | None = None) -> tuple[int, int] | None:
    """None when every byte outside ``pieces`` reads zero (read past the page cache:
    ``DeviceReader``, unless ``read`` is given); else the first range that does not."""
    read = read or DeviceReader()
    for a, b in outside(fd, size, pieces):
        pos = a
        while pos < b:
            data = read(fd, pos, b - pos)
            if not len(data):
                break
            if np.frombuffer(data, dtype=np.uint8).any():
                return a, b
            pos += len(data)
    return None
