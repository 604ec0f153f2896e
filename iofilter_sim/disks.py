"""Primary disks: the VMs' own virtual disks, as sparse raw image files.

A ``PrimaryDisk`` is what a VM's writes land on before the filter ships them. Recovery is
checked against it: a disk rebuilt at seq S must hash like the primary did at seq S.

``write_batch`` takes the records a filter captured (``cdp.records.RECORD_DTYPE``) and
their payload in frame layout (the payloads of ``WRITE`` and ``MARK`` records,
concatenated in record order). It applies ``WRITE`` and ``ZERO`` records in order — so
of two overlapping writes in one batch, the later wins — and skips ``MARK`` and
``RESYNC_*`` records, which are stream events, not disk writes. Consecutive records that
continue each other on the disk and in the payload go down in one ``pwrite``.

A ``ZERO`` record punches a hole (``fallocate(PUNCH_HOLE | KEEP_SIZE)``) where the file
system can; elsewhere it writes zeros. Either way the range reads back as zeros. One
that ``write_batch`` is told to keep allocated (NBD's ``NO_HOLE``: the guest asked for
zeros, not for the space to be freed) is zeroed in place (``fallocate(ZERO_RANGE |
KEEP_SIZE)``, or zeros written) and never punched.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from cdp.durable import StickySync
from cdp.errors import ConfigError
from cdp.fallocate import KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE, fallocate
from cdp.fallocate import available as fallocate_available
from cdp.file_kinds import NotRegular, open_regular
from cdp.msa.install_dirs import dir_problem, made_dir_problem, who
from cdp.records import (
    KIND_WRITE, KIND_ZERO, SECTOR, WRITE_LEN_MAX, payload_lengths, payload_starts,
)

HASH_CHUNK_BYTES = 8 << 20
#: The most one ``pwrite`` puts down. Linux (6.16 on, ext4 with large folios) sizes a
#: page-cache folio by the write that creates it, up to 2 MiB, and every later write
#: into a folio walks all of its block buffers: after a sequential fill in runs of 2 MiB,
#: a random 4 KiB write cost 12.5 us instead of 3.9 while writeback ran (a quarter of the
#: NBD export's CPU at 4 KiB qd 32, benchmarks.nbd; 6 % left at 256 KiB pieces, 4 % at
#: 64 KiB). A sequential fill in 64 KiB pieces costs 0.26 CPU-s/GB instead of 0.23.
WRITE_PIECE_BYTES = 64 << 10
_ZEROS = bytes(1 << 20)


#: A new image's mode: a VM's disk is readable by its owner only.
IMAGE_MODE = 0o600
# An image is refused unless root or this process owns it (``_open_image``), and its
# directory unless no other user may write there (``ensure_image_dir``): the host process
# may run as root, and the datastore is where other users' files could otherwise wait.


def _open_image(path: Path, name: str, create: bool) -> int:
    """The image at ``path``, open read-write (created ``IMAGE_MODE`` when missing and
    ``create``), only as a regular file and never through a symbolic link
    (``cdp.file_kinds.open_regular``: a link planted at the image path would make the
    VM's writes land in its target); a ConfigError naming the disk and the path else."""
    try:
        fd = open_regular(path, os.O_RDWR | (os.O_CREAT if create else 0), IMAGE_MODE)
    except NotRegular as exc:
        raise ConfigError(f"disk {name}: {path} is {exc.strerror} (a raw image)") from None
    except IsADirectoryError:  # a directory cannot be opened for writing at all
        raise ConfigError(f"disk {name}: {path} is a directory: expected a regular file (a raw image)") from None
    except OSError as exc:
        raise ConfigError(f"disk {name}: cannot open {path}: {exc.strerror}") from exc
    owner = os.fstat(fd).st_uid
    if owner not in (0, os.geteuid()):
        os.close(fd)
        raise ConfigError(f"disk {name}: {path} is owned by {who(owner)}; expected an image owned by root or by "
                          f"{who(os.geteuid())} (this process): another user's file is theirs to read, truncate or "
                          f"swap under the VM. Check who made it, then chown it or move it away")
    return fd


def ensure_image_dir(directory: Path, name: str, *, create: bool = True) -> None:
    """Create ``directory`` and its missing parents (``create``: 0755 under any umask),
    then check it as install checks ``state_dir`` (``dir_problem``: every directory on
    the way owned by root or us, none writable by others unless sticky, the directory
    itself by no one else): others who may write there could plant the image before it
    is made, and replace or remove it and its sidecar files (dirty-region map, spill
    journal) under a running VM. A ``ConfigError`` naming the disk, the directory and
    what is expected."""
    if (problem := made_dir_problem(directory) if create else dir_problem(directory)) is not None:
        raise ConfigError(f"disk {name}: {problem}; a VM's disk ({directory}/…) is kept only where no other "
                          f"user may write: every directory on the way owned by root or by "
                          f"{who(os.geteuid())} and writable by no other user (a shared one like /tmp only if "
                          f"sticky), the directory itself by no one else (chmod go-w, or move the datastore)")


class PrimaryDisk:
    """A sparse raw image of a fixed ``size``, written in place with pwrite.

    Invariants: the file is exactly ``size`` bytes from creation on (made with ftruncate,
    never truncated, extended or rewritten wholesale); every write applied is 512-aligned
    and inside [0, size).
    """

    def __init__(self, path: str | Path, size: int, *, name: str | None = None,
                 create: bool = True) -> None:
        self.path = Path(path)
        self.name = name or self.path.name
        if size <= 0 or size % SECTOR:
            raise ConfigError(f"disk {self.name} ({self.path}): size {size}: "
                              f"expected a multiple of 512 > 0")
        self.size = size
        self._fd = _open_image(self.path, self.name, create)
        self._sync = StickySync()
        try:
            have = os.fstat(self._fd).st_size
            if have == 0:
                os.ftruncate(self._fd, size)  # sparse: no data block is written
            elif have != size:
                raise ConfigError(f"disk {self.name}: {self.path} is {have} bytes, expected "
                                  f"{size} (an existing image is never resized)")
        except BaseException:
            os.close(self._fd)
            raise
        self._punch = fallocate_available
        self._zero_range = fallocate_available

    @classmethod
    def for_disk(cls, disk: Any, *, create: bool = True) -> PrimaryDisk:
        """The image of a ``cluster.Disk``, in a directory created if needed (0755, with
        ``create``) and checked (``ensure_image_dir``) before the image is opened or made."""
        name = f"{disk.vm}/{disk.name}"
        ensure_image_dir(Path(disk.image).parent, name, create=create)
        return cls(disk.image, disk.size, name=name, create=create)

    # ------------------------------------------------------------------ writes

    def write_batch(self, records: np.ndarray, payload: bytes | bytearray | memoryview,
                    no_hole: np.ndarray | None = None) -> None:
        """Apply the ``WRITE``/``ZERO`` records of a batch, in order.

        ``payload`` is in frame layout (see the module docstring); ``no_hole``, one bool
        per record, names the ``ZERO`` records whose range stays allocated (NBD's
        ``NO_HOLE``). Raises ValueError naming the disk and the record when a record is
        unaligned, too long, past the end of the disk or past the end of the payload;
        nothing of the batch is written then.
        """
        view = memoryview(payload).cast("B")
        starts = payload_starts(payload_lengths(records)).astype(np.int64)
        data = np.flatnonzero((records["kind"] == KIND_WRITE) | (records["kind"] == KIND_ZERO))
        kind = records["kind"][data]
        self._check(data, kind, records["offset"][data], records["length"][data],
                    starts[data], len(view))
        if not len(data):
            return
        offset = records["offset"][data].astype(np.int64)  # now known to be < size
        length = records["length"][data].astype(np.int64)
        start = starts[data]
        keep = np.zeros(len(data), dtype=bool) if no_hole is None else np.asarray(no_hole, dtype=bool)[data]
        # A run continues while the kind (and, for ZERO, NO_HOLE) stays the same, the disk
        # range continues and (for WRITE) the payload range continues: then it is one
        # system call.
        cont = np.zeros(len(data), dtype=bool)
        cont[1:] = (kind[1:] == kind[:-1]) & (keep[1:] == keep[:-1]) & (offset[1:] == offset[:-1] + length[:-1]) & (
            (kind[1:] == KIND_ZERO) | (start[1:] == start[:-1] + length[:-1]))
        heads = np.flatnonzero(~cont)
        run_bytes = np.add.reduceat(length, heads)
        for h, nbytes in zip(heads.tolist(), run_bytes.tolist()):
            at = int(offset[h])
            if kind[h] == KIND_WRITE:
                self._pwrite_all(view[int(start[h]) : int(start[h]) + nbytes], at)
            else:
                self.zero(at, nbytes, no_hole=bool(keep[h]))

    def _check(self, data: np.ndarray, kind: np.ndarray, offset: np.ndarray, length: np.ndarray,
               start: np.ndarray, payload_len: int) -> None:
        """ValueError naming the first bad record. Checked in u64, where nothing wraps:
        an offset is compared with the size before the length is added to it."""
        offset, length = offset.astype(np.uint64), length.astype(np.uint64)
        size, start = np.uint64(self.size), start.astype(np.uint64)
        problems = (
            (((offset | length) % SECTOR) != 0, "offset/length not a multiple of 512"),
            ((length == 0) | (length > WRITE_LEN_MAX), f"length not in 512..{WRITE_LEN_MAX}"),
            ((offset > size) | (offset + length > size),
             f"range past the end of the disk ({self.size} bytes)"),
            ((kind == KIND_WRITE) & (start + length > payload_len),
             f"payload past the end of the batch payload ({payload_len} bytes)"),
        )
        for bad, what in problems:
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"disk {self.name} ({self.path}): record {int(data[i])} "
                                 f"(offset {int(offset[i])}, length {int(length[i])}): {what}")

    def _pwrite_all(self, data: memoryview, offset: int) -> None:
        while len(data):
            n = os.pwrite(self._fd, data[:WRITE_PIECE_BYTES], offset)
            data, offset = data[n:], offset + n

    def zero(self, offset: int, length: int, *, no_hole: bool = False) -> None:
        """Make [offset, offset + length) read as zeros: a hole where possible, or, with
        ``no_hole``, zeros in place (the range stays allocated)."""
        self._check_range(offset, length)
        if no_hole:
            if self._zero_range and fallocate(self._fd, ZERO_RANGE | KEEP_SIZE, offset, length,
                                              f"fallocate(ZERO_RANGE) on {self.path}"):
                return
            self._zero_range = False  # this file system cannot: write zeros from now on
        elif self._punch:
            if fallocate(self._fd, PUNCH_HOLE | KEEP_SIZE, offset, length, f"fallocate(PUNCH_HOLE) on {self.path}"):
                return
            self._punch = False  # this file system cannot: write zeros from now on
        zeros = memoryview(_ZEROS)
        end = offset + length
        while offset < end:
            n = min(end - offset, len(zeros))
            self._pwrite_all(zeros[:n], offset)
            offset += n

    # ------------------------------------------------------------------ reads

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"disk {self.name} ({self.path}): range [{offset}, "
                             f"{offset + length}) is not inside [0, {self.size})")

    def read(self, offset: int, length: int) -> bytes:
        """The bytes at [offset, offset + length), which must lie inside the disk."""
        self._check_range(offset, length)
        parts = []
        while length > 0:
            chunk = os.pread(self._fd, length, offset)
            if not chunk:
                raise OSError(errno.EIO, f"{self.path}: short read at {offset}")
            parts.append(chunk)
            offset, length = offset + len(chunk), length - len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def sha256(self) -> str:
        """SHA-256 (hex) of the whole disk, read in 8 MiB chunks into one reused buffer."""
        digest = hashlib.sha256()
        buf = bytearray(min(HASH_CHUNK_BYTES, self.size))
        view = memoryview(buf)
        offset = 0
        while offset < self.size:
            want = min(len(buf), self.size - offset)
            got = os.preadv(self._fd, [view[:want]], offset)
            if got <= 0:
                raise OSError(errno.EIO, f"{self.path}: short read at {offset}")
            digest.update(view[:got])
            offset += got
        return digest.hexdigest()

    # ------------------------------------------------------------------ lifetime

    def fsync(self) -> None:
        """``fsync`` of the image; once one failed, every later one fails (EIO naming the
        image: ``durable.StickySync``) — after a failed write-back a retried fsync returns
        0 for bytes the kernel dropped, and a guest's FLUSH would be answered over them."""
        self._sync.sync(self._fd, str(self.path), data_only=False)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> PrimaryDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PrimaryDisk({self.name!r}, {str(self.path)!r}, size={self.size})"
