"""FileStore: objects as files under a root directory (the embedded default).

Key "a/b/c" is the file ``root/a/b/c``. Invariants:

- A file under its key is always a whole object. ``put`` writes a temporary
  file ``.tmp-<random>`` in the target directory, fsyncs it, then renames it
  over the key (``os.replace``) or, for ``if_absent``, hard-links it to the
  key (``os.link`` fails if the key exists, atomically against any other
  writer), and fsyncs the directory. New directories are fsynced into their
  parents. After a crash, a key holds the old or the new object; a leftover
  ``.tmp-*`` file is garbage that ``list`` skips (names starting with "." are
  never keys, see cdp.store.keys).
- ``if_match`` compares and replaces under an exclusive ``flock`` of the key's
  directory, which ``delete`` takes too: a conditional put cannot bring back an
  object deleted after its comparison. A plain put does not take it (its rename
  is atomic on its own); keys written with ``if_match`` (lock objects) are only
  ever replaced conditionally.
- An etag is the file's inode, mtime (ns) and size: the temporary file's, taken
  before it is renamed or linked to the key (neither changes them).
- POSIX promises durability only for what was fsynced: file data and the
  directory entry are; a ``delete`` is not fsynced (a crash may bring a
  deleted object back, never a partial one).
- ``list`` walks the tree in full-key byte order without sorting the whole
  tree: within one directory, a subdirectory "x" sorts as "x/" and a file "x"
  as "x". Since every key below "x" starts with "x/", this per-directory
  order is the order of the full keys ("a-b" < "a.b" < "a/b" < "a/b/c" < "a0").
- A file and a directory cannot share a name: with this backend a key cannot
  also be the directory part of another key ("a" and "a/b"); such a put raises
  InvalidKey.

Objects of ``DIRECT_MIN_BYTES`` (1 MiB) or more are written with ``O_DIRECT`` where the
file system takes it (``cdp.direct_io``): segments and base chunks are written once and
read back, if ever, long after; copying them into the page cache cost the DRVA more than
the disk write itself. They are read with ``O_DIRECT`` too (``read_direct``): not being in
the page cache, a buffered read would only fill it to copy out of it.

Blocking file I/O runs in worker threads (``asyncio.to_thread``); a put that
is cancelled may still complete in its thread, but never leaves a partial
object. Gets run on a pool of their own (``READ_THREADS``): a cold read waits on
the disk, and scattered reads (a failback's 64 KiB blocks) go as fast as the
device's queue is deep, not as the loop's default pool (CPUs + 4 threads) is wide.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import secrets
import stat as stat_mode
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from cdp.direct_io import DIRECT_MIN_BYTES, ReadBuffer, read_direct, read_direct_into, write_direct
from cdp.durable import fsync_dir, publish, write_all
from cdp.errors import (
    AlreadyExists,
    InvalidKey,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StoreError,
    StoreUnavailable,
)
from cdp.store.base import Bytes, ObjectInfo, StoreBase, check_conditions, check_range, resolve_range
from cdp.store.keys import is_valid_key, show_key, validate_key, validate_prefix

TMP_PREFIX = ".tmp-"
#: Attempts to create a directory and a temp file in it, when a concurrent
#: delete keeps pruning the (empty) directory.
DIR_CREATE_ATTEMPTS_MAX = 5
#: Largest single os.pread / os.write call.
IO_CHUNK_BYTES_MAX = 64 * 1024 * 1024
#: Bytes per os.pread of a get (see _read_range).
READ_STEP_BYTES = 512 * 1024
#: A ranged get of at most this many bytes reads just them (POSIX_FADV_RANDOM): the
#: kernel's readahead on a freshly opened file reads ahead of a small request, which a
#: delta's scattered sub-block reads never use (a cold benchmarks.failback read 303 MB
#: from the device for 209 MB of gets; 267 MB with the hint).
RANDOM_READ_BYTES_MAX = 512 * 1024
#: Threads reading for gets, shared by every FileStore of the process. Cold random
#: 64 KiB preads of a store on this project's machines (virtio disk): 170-350 MB/s
#: with 6 threads, 310-650 MB/s with 32, no better with 64. Threads start on demand;
#: what they hold is bounded by the callers' own concurrency.
READ_THREADS = 32
_read_pool: ThreadPoolExecutor | None = None
_read_pool_lock = threading.Lock()


def _readers() -> ThreadPoolExecutor:
    global _read_pool
    with _read_pool_lock:
        if _read_pool is None:
            _read_pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="fs-read")
        return _read_pool


class FileStore(StoreBase):
    """Objects stored as files below `root` (created on first put)."""

    kind = "file"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()

    def describe(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    async def put(self, key: str, data: Bytes, *, if_absent: bool = False,
                  if_match: str | None = None) -> str:
        check_conditions(if_absent, if_match)
        path = self._path(key)
        try:
            return await asyncio.to_thread(_write_atomic, path, data, if_absent=if_absent, if_match=if_match)
        except _EtagMismatch as exc:
            raise PreconditionFailed(
                f"{self.describe()}: put if_match {show_key(key)}: {exc.args[0]}"
            ) from None
        except FileExistsError as exc:
            if if_absent and exc.filename2 == str(path) and not path.is_dir():
                raise AlreadyExists(
                    f"{self.describe()}: put if_absent {show_key(key)}: an object already exists"
                ) from exc
            raise self._error("put", key, exc) from exc
        except OSError as exc:
            raise self._error("put", key, exc) from exc

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return await self._get(key, offset, length, None)

    async def get_into(self, key: str, offset: int, length: int | None, buf: ReadBuffer) -> Bytes:
        """``get``, but an object read with ``O_DIRECT`` (``DIRECT_MIN_BYTES`` or more) comes
        back as a view into ``buf``, without a copy: valid until ``buf`` is read into
        again. Smaller objects, and file systems that refuse ``O_DIRECT``, give bytes."""
        return await self._get(key, offset, length, buf)

    async def _get(self, key: str, offset: int, length: int | None, into: ReadBuffer | None) -> Bytes:
        return await asyncio.get_running_loop().run_in_executor(_readers(), self._read, key, offset, length, into)

    def read_blocking(self, key: str, offset: int = 0, length: int | None = None) -> Bytes:
        """``get``, blocking: for a worker thread that goes on to decode what it read, so
        that one hand-off to a thread serves both (``rocva.mount_source``: a cold
        random 4 KiB read of a mount cost 0.8 ms of CPU with two, read then decode)."""
        return self._read(key, offset, length, None)

    def _read(self, key: str, offset: int, length: int | None, into: ReadBuffer | None) -> Bytes:
        path = self._path(key)
        check_range(offset, length)
        try:
            return _read_range(path, offset, length, into)
        except OSError as exc:
            raise self._error("get", key, exc) from exc

    async def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = await asyncio.to_thread(os.stat, path)
        except OSError as exc:
            raise self._error("stat", key, exc) from exc
        if not stat_mode.S_ISREG(st.st_mode):
            raise NotFound(f"{self.describe()}: stat {show_key(key)}: no such object")
        return ObjectInfo(key, st.st_size, st.st_mtime, _etag(st))

    async def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(_delete, path, self.root)
        except OSError as exc:
            raise self._error("delete", key, exc) from exc

    async def server_time(self) -> float | None:
        """The store is this host's file system: its clock is ours."""
        return time.time()

    async def ensure_container(self) -> None:
        """Create the root directory (and its parents) if missing."""
        try:
            await asyncio.to_thread(_make_dirs, self.root)
        except OSError as exc:
            raise self._error("ensure_container", ".", exc) from exc

    async def list(
        self, prefix: str = "", *, start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        validate_prefix(prefix)
        directory, _, name_prefix = prefix.rpartition("/")
        async for info in self._walk(directory, name_prefix, start_after):
            yield info

    async def _walk(
        self, directory: str, name_prefix: str, start_after: str | None
    ) -> AsyncIterator[ObjectInfo]:
        """Objects below the relative `directory`, in key order (recursive)."""
        try:
            entries = await asyncio.to_thread(_scan, self.root / directory)
        except OSError as exc:
            raise self._error("list", directory or ".", exc) from exc
        for entry in entries:
            if not entry.name.startswith(name_prefix):
                continue
            key = f"{directory}/{entry.name}" if directory else entry.name
            if entry.is_dir:
                below = key + "/"
                if start_after is not None and below <= start_after:
                    if not start_after.startswith(below):
                        continue  # every key below is < start_after
                async for info in self._walk(key, "", start_after):
                    yield info
            elif start_after is None or key > start_after:
                yield ObjectInfo(key, entry.size, entry.mtime, entry.etag)

    def _error(self, op: str, key: str, exc: OSError) -> StoreError:
        """Translate an OSError of `op` on `key` into the store error tree."""
        where = f"{self.describe()}: {op} {show_key(key)}"
        code = errno.errorcode.get(exc.errno or 0, "?")
        if op in ("get", "stat") and isinstance(
            exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)
        ):
            return NotFound(f"{where}: no such object")
        if isinstance(exc, (NotADirectoryError, IsADirectoryError, FileExistsError)):
            return InvalidKey(
                f"{where}: a file store cannot hold a key that is also the "
                f"directory part of another key ({code})"
            )
        if isinstance(exc, PermissionError):
            return PermissionDenied(f"{where}: permission denied ({code})")
        return StoreUnavailable(f"{where}: I/O error {code}: {exc.strerror}")


class _Entry(NamedTuple):
    sort_name: str
    name: str
    is_dir: bool
    size: int
    mtime: float
    etag: str | None


def _etag(st: os.stat_result) -> str:
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


def _scan(directory: Path) -> list[_Entry]:
    """The key-like entries of one directory, sorted as their full keys sort."""
    entries = []
    try:
        with os.scandir(directory) as it:
            for dirent in it:
                if not is_valid_key(dirent.name):
                    continue  # temp files (".tmp-*") and foreign names
                try:
                    if dirent.is_dir(follow_symlinks=False):
                        entries.append(_Entry(dirent.name + "/", dirent.name, True, 0, 0.0, None))
                    elif dirent.is_file(follow_symlinks=False):
                        st = dirent.stat(follow_symlinks=False)
                        name = dirent.name
                        entries.append(_Entry(name, name, False, st.st_size, st.st_mtime, _etag(st)))
                except FileNotFoundError:
                    continue  # deleted while listing
    except (FileNotFoundError, NotADirectoryError):
        return []
    entries.sort()
    return entries


def _make_dirs(directory: Path) -> None:
    """Create directory and its missing parents, each fsynced into its parent."""
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        try:
            os.mkdir(new)
        except FileExistsError:
            if not new.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(new)) from None
        fsync_dir(new.parent)


def _open_temp(directory: Path) -> tuple[int, Path]:
    """Create a fresh temp file in directory (creating it); return (fd, path)."""
    for attempt in range(DIR_CREATE_ATTEMPTS_MAX):
        try:
            _make_dirs(directory)
            tmp = directory / f"{TMP_PREFIX}{secrets.token_hex(8)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            return fd, tmp
        except FileNotFoundError:
            if attempt == DIR_CREATE_ATTEMPTS_MAX - 1:
                raise
            # A concurrent delete pruned a directory we just made: retry.
    raise AssertionError("unreachable")


class _EtagMismatch(Exception):
    """The object is not the one an if_match put was made against (args[0]: how)."""


def _write_atomic(path: Path, data: Bytes, *, if_absent: bool, if_match: str | None = None) -> str:
    """Write data to path so that path never holds a partial object; return its etag.

    if_absent: fails with FileExistsError (filename2 == path) when path exists, even
    against a concurrent writer (see cdp.durable.publish). if_match: _EtagMismatch
    unless path is still the object with that etag (see the module docstring).
    """
    fd, tmp = _open_temp(path.parent)
    try:
        if len(data) < DIRECT_MIN_BYTES or not write_direct(fd, data):
            write_all(fd, data, IO_CHUNK_BYTES_MAX)
        os.fsync(fd)
        etag = _etag(os.fstat(fd))
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    if if_match is None:
        publish(tmp, path, if_absent=if_absent)
        return etag
    try:
        with _directory_locked(path.parent):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise _EtagMismatch(f"the object is gone (expected etag {if_match})") from None
            if not stat_mode.S_ISREG(st.st_mode) or _etag(st) != if_match:
                raise _EtagMismatch(f"the object was replaced (etag {_etag(st)}, expected {if_match})")
            publish(tmp, path)
    finally:
        _unlink_quietly(tmp)  # still there when the comparison failed
    return etag


@contextlib.contextmanager
def _directory_locked(directory: Path):
    """Hold an exclusive flock of ``directory`` (conditional puts and deletes in it)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _read_range(path: Path, offset: int, length: int | None, into: ReadBuffer | None = None) -> Bytes:
    """Bytes ``[offset, offset + length)`` of the file (``into``: read with ``O_DIRECT``, a
    view into that buffer), or, buffered, read in ``READ_STEP_BYTES`` steps.

    Why steps, not one pread of the whole range: reading a cold store (ext4, 6 threads,
    objects of 2.7 and 10 MB) measured 1.5 GB/s and 0.14 s of CPU per 338 MB with one
    pread per object, 2.2 GB/s and 0.09 s with 512 KiB steps (kernel readahead keeps up
    better with moderate requests; 128 KiB..512 KiB measured alike, 2 MiB as slow as one
    read). Joining the steps costs one copy, included in those figures; a range of one
    step is not copied at all (``join`` returns its only part).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat_mode.S_ISREG(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a regular file", str(path))
        start, end = resolve_range(st.st_size, offset, length)
        if st.st_size >= DIRECT_MIN_BYTES:  # written past the page cache (_write_atomic)
            data = read_direct(fd, start, end) if into is None else read_direct_into(fd, start, end, into)
            if data is not None:
                return data
        if end - start <= RANDOM_READ_BYTES_MAX and (start or end < st.st_size):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        chunks = []
        while start < end:
            chunk = os.pread(fd, min(end - start, READ_STEP_BYTES), start)
            if not chunk:
                break  # cannot happen: objects are replaced, never truncated
            chunks.append(chunk)
            start += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _delete(path: Path, root: Path) -> None:
    try:
        with _directory_locked(path.parent):  # see _write_atomic's if_match
            os.unlink(path)
    except (FileNotFoundError, IsADirectoryError):
        return  # no such object: delete is idempotent
    # Prune directories left empty, so listings do not walk dead branches.
    directory = path.parent
    while directory != root and root in directory.parents:
        try:
            os.rmdir(directory)
        except OSError:
            return  # not empty (or gone): stop
        directory = directory.parent
