"""The filter's spill journal: a bounded ring file of frames its memory buffer could not
hold, beside the domain's disks (as vSphere I/O filters keep sidecar files).

Why: a DRVA that restarts (SIGKILL, upgrade: back in about a second, then catching up)
stops acknowledging for a few seconds. At 100 MB/s that is more than the filter's memory
buffer (64 MiB), and without somewhere else to put the frames the filter drops to bitmap
mode: a resync window of seconds in which no point is crash-consistent. The journal keeps
the frames instead, numbered and in order, so the stream resumes where it stopped.

What it is not: a durability layer. A frame is only ever acknowledged by the DRVA, after
the DRVA's own fdatasync; the journal is never fsynced, and a fresh one is created by each
run. What a filter that crashes leaves unacknowledged is covered by the dirty-region maps
(``cdp.dirtymap``): those regions are resynced. A frame read back to be sent is checked
(``read_frame``: its own checksums and seqs); one that cannot be read back ends the
journal for the run (``abandon``) and the filter resyncs what it held
(``DomainFilter._spill_lost``).

The path is a sidecar beside the domain's first disk, and the filter may run as root:
what an earlier run left at it (a journal, or a planted symbolic link) is unlinked, never
followed, and the journal is created afresh there (``O_EXCL | O_NOFOLLOW``); anything else
there — a regular file that is not empty and does not begin with a frame, as another
disk's image or a partition configured at the path would not — is refused, never removed.
At the end the journal is removed only if the path still names its own file.

Layout: the file is a ring of ``capacity_bytes``; each frame is one contiguous run of
bytes, exactly the encoded frame as it goes on the wire (FORMAT.md §2: it carries its own
checksums, which the DRVA verifies). Frames are appended at the tail and leave in order:
from the head when acknowledged, from the tail when the filter drops unsent frames to the
bitmap. A frame that does not fit between the tail and the end of the file starts again
at offset 0 (the bytes skipped are a gap that comes back when the head passes it). The
offsets live in memory only (``_frames``); the file is sparse until used.
"""

from __future__ import annotations

import collections
import os
import stat
from pathlib import Path

from cdp.errors import CdpError, FormatError
from cdp.file_kinds import file_kind, open_regular
from cdp.frame import FRAME_MAGIC, decode_frame
from cdp.logs import get_logger

log = get_logger("iofilter_sim.spill")

#: Default journal size per domain: a DRVA restart of ~10 s at 100 MB/s (Zerto's VRA
#: buffers ~1.3 GB per host). Sparse: the space is used only while frames wait in it.
SPILL_BYTES_MAX = 1 << 30


class SpillRefused(CdpError):
    """The spill journal's path holds something that cannot be replaced by a new file."""


def _remove_left(path: Path) -> None:
    """Remove what an earlier run left at ``path``: a journal (a regular file, empty or
    beginning with a frame's magic: its first frame is always at offset 0), or a symbolic
    link (only the link goes; what it names is never touched). Nothing there is fine.
    Anything else — another disk's image, a DRVA's partition, a directory, a FIFO — is
    refused (``SpillRefused`` naming it): a journal is not worth another file's bytes."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SpillRefused(f"{path}: cannot look at it: {exc.strerror}") from None
    if stat.S_ISREG(mode):
        _check_journal(path)
    elif not stat.S_ISLNK(mode):
        raise SpillRefused(f"{path}: {file_kind(mode)}; expected nothing there or a spill journal an earlier "
                           f"run left: refusing to remove it (move it away, or check the inventory's images)")
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # a read-only datastore
        raise SpillRefused(f"{path}: cannot replace it with a spill journal: {exc.strerror}") from None


def _check_journal(path: Path) -> None:
    """``SpillRefused`` unless the regular file at ``path`` is empty or begins with
    ``FRAME_MAGIC``, as every journal does."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except OSError as exc:  # replaced since the lstat
        raise SpillRefused(f"{path}: cannot read it to see whether it is a spill journal: {exc.strerror}") from None
    try:
        head = os.pread(fd, len(FRAME_MAGIC), 0)
    except OSError as exc:
        raise SpillRefused(f"{path}: cannot read it to see whether it is a spill journal: {exc.strerror}") from None
    finally:
        os.close(fd)
    if head and head != FRAME_MAGIC:
        raise SpillRefused(f"{path}: a regular file beginning {head!r}, not a spill journal (which begins with a "
                           f"frame, {FRAME_MAGIC!r}): refusing to remove it — is another disk's image or a "
                           f"partition configured at this path? Move it away to let the filter start")


def _create(path: Path) -> int:
    """A new, empty journal file at ``path``: what an earlier run left is removed
    (``_remove_left``: a link is removed, not followed; anything not a journal is
    refused), and the file is created exclusively, without following a link planted in
    between."""
    _remove_left(path)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:  # EEXIST: something was put there since the unlink
        raise SpillRefused(f"{path}: cannot create the spill journal: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise SpillRefused(f"{path}: {file_kind(mode)}, expected the regular file just created")
    return fd


class SpillJournal:
    """Frames waiting for acknowledgement, in a ring file (see the module docstring)."""

    def __init__(self, path: Path | str, capacity_bytes: int) -> None:
        assert capacity_bytes > 0, capacity_bytes
        self.path = Path(path)
        self.capacity_bytes = capacity_bytes
        self._fd = _create(self.path)
        st = os.fstat(self._fd)
        self._identity = (st.st_dev, st.st_ino)  # close() removes this file, nothing else
        self._frames: collections.deque[tuple[int, int]] = collections.deque()  # (offset, nbytes)
        self.used_bytes = 0  # bytes of the frames in it (gaps not counted)
        self.peak_bytes = 0
        self.broken: str | None = None  # a write or a read back failed: take no more frames

    def _place(self, nbytes: int) -> int | None:
        """Where a frame of ``nbytes`` goes, or None if there is no room for it."""
        if not self._frames:
            return 0 if nbytes <= self.capacity_bytes else None
        head = self._frames[0][0]
        last_at, last_len = self._frames[-1]
        tail = last_at + last_len
        if last_at >= head:  # not wrapped: free after the tail, and before the head
            if tail + nbytes <= self.capacity_bytes:
                return tail
            return 0 if nbytes <= head else None
        return tail if tail + nbytes <= head else None  # wrapped: free between tail and head

    def append(self, parts: list, nbytes: int) -> int | None:
        """Write one encoded frame; its offset, or None (nothing written) if it does not fit."""
        if self.broken is not None:
            return None
        at = self._place(nbytes)
        if at is None:
            return None
        try:
            written = os.pwritev(self._fd, parts, at)
            if written != nbytes:  # a short write (rare on a regular file): finish it byte-exact
                rest = memoryview(b"".join(parts))[written:]
                while rest:
                    n = os.pwrite(self._fd, rest, at + written)
                    if n <= 0:
                        raise OSError(f"pwrite wrote {n} bytes")
                    rest, written = rest[n:], written + n
        except OSError as exc:  # the journal's file system is full or failing: memory and bitmap only
            self.broken = f"{exc.strerror or exc} at offset {at}"
            log.warning("spill_write_failed", path=str(self.path), error=self.broken)
            return None
        self._frames.append((at, nbytes))
        self.used_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        return at

    def read(self, offset: int, nbytes: int) -> bytes:
        """The frame written at ``offset`` (it must still be in the journal)."""
        data = os.pread(self._fd, nbytes, offset)
        if len(data) != nbytes:
            raise OSError(f"{self.path}: short read of a spilled frame: {len(data)} of {nbytes} bytes at {offset}")
        return data

    def abandon(self, reason: str) -> None:
        """A frame could not be read back: trust none of the journal again. Its frames
        are forgotten (the filter resyncs their regions) and it takes no more this run."""
        self.broken = reason
        self._frames.clear()
        self.used_bytes = 0

    def read_frame(self, offset: int, nbytes: int, seqs: tuple[int, int]) -> bytes:
        """``read``, checked right after reading: a whole frame (FORMAT.md §2.3, its own
        checksums) of seqs ``seqs`` (first, last). ``FormatError`` naming the file and the
        offset otherwise — sent as it is, a DRVA would refuse it on every reconnect."""
        data = self.read(offset, nbytes)
        frame = decode_frame(data, f"{self.path}: spilled frame at offset {offset}")
        if (frame.first_seq, frame.last_seq) != seqs:
            raise FormatError(f"{self.path}: spilled frame at offset {offset} holds seqs {frame.first_seq}.."
                              f"{frame.last_seq}, expected {seqs[0]}..{seqs[1]}")
        return data

    def release_oldest(self) -> None:
        """The oldest frame was acknowledged."""
        self.used_bytes -= self._frames.popleft()[1]

    def drop_newest(self) -> None:
        """The newest frame was dropped unsent (the filter went to bitmap mode)."""
        self.used_bytes -= self._frames.pop()[1]

    def __len__(self) -> int:
        return len(self._frames)

    def close(self) -> None:
        """Close and remove the file: what it held is acknowledged or in the dirty maps.
        Only the journal's own file is removed: not whatever was put at its path since."""
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._identity:
            self.path.unlink(missing_ok=True)
