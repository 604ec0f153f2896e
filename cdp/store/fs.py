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
- Nothing outside the root is read, written or removed, and no symbolic link below
  it is followed (the daemons run as root: a link planted in the store must not
  let them reach anything else). Every key is opened relative to a directory fd
  of the root, held for the store's life, with ``openat2`` and
  ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`` (where seccomp
  or the kernel refuses ``openat2``: one ``O_NOFOLLOW`` component at a time); each
  mkdir, create, rename, link, unlink, flock and directory fsync goes through the
  fd of the directory so opened, never through a path. Only directories and
  regular files are used: a key through a symbolic link, or one naming a link, a
  FIFO, a socket or a device, is refused with a ``StoreError`` that names it. A
  hard link is a regular file: a get reads it, a put replaces it by rename and
  never writes through it. The root's own path is configuration, resolved as
  given when first used.

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
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from cdp.direct_io import DIRECT_MIN_BYTES, ReadBuffer, read_direct, read_direct_into, write_direct
from cdp import durable
from cdp.durable import write_all
from cdp.errors import (
    AlreadyExists,
    InvalidKey,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StoreError,
    StoreUnavailable,
)
from cdp.store.beneath import (
    DIRECTORY,
    OBJECT,
    Dir,
    RootDir,
    Unconfined,
    fsync_dir,
    make_root,
    open_beneath,
    open_dir,
    open_object,
    special_entry,
)
from cdp.store.base import (
    Bytes, ObjectInfo, StoreBase, TooLarge, check_conditions, check_max_bytes, check_range, resolve_range,
)
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

_T = TypeVar("_T")


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
        self._root_dir = RootDir(self.root)

    def describe(self) -> str:
        return f"file://{self.root}"

    async def close(self) -> None:
        """Close the root's directory fd (once no thread uses it); a later call opens it again."""
        self._root_dir.close()

    def _at_root(self, fn: Callable[..., _T], *args: Any, create: bool = False) -> _T:
        """``fn(root, *args)`` with the root's directory held open (``create``: made first if
        missing; FileNotFoundError if it is missing otherwise). Once more if the root path
        was removed or replaced under the fd held (``RootDir.forget_if_replaced``)."""
        for attempt in range(2):
            root = self._root_dir.hold(create)
            try:
                return fn(root, *args)
            except FileNotFoundError:
                if attempt == 1 or not self._root_dir.forget_if_replaced():
                    raise
            finally:
                self._root_dir.let_go()
        raise AssertionError("unreachable")

    async def put(self, key: str, data: Bytes, *, if_absent: bool = False,
                  if_match: str | None = None) -> str:
        check_conditions(if_absent, if_match)
        validate_key(key)
        try:
            return await asyncio.to_thread(self._at_root, _write_atomic, key, data, if_absent, if_match,
                                           create=True)
        except _EtagMismatch as exc:
            raise PreconditionFailed(
                f"{self.describe()}: put if_match {show_key(key)}: {exc.args[0]}"
            ) from None
        except _KeyExists:
            raise AlreadyExists(
                f"{self.describe()}: put if_absent {show_key(key)}: an object already exists"
            ) from None
        except OSError as exc:
            raise self._error("put", key, exc) from exc

    async def get(self, key: str, offset: int = 0, length: int | None = None, *,
                  max_bytes: int | None = None) -> Bytes:
        """See ``ObjectStore.get``. A read of more than ``READ_STEP_BYTES`` may come back
        as a ``bytearray`` (read into in place: no second copy of a large object)."""
        return await self._get(key, offset, length, None, max_bytes)

    async def get_into(self, key: str, offset: int, length: int | None, buf: ReadBuffer, *,
                       max_bytes: int | None = None) -> Bytes:
        """``get``, but an object read with ``O_DIRECT`` (``DIRECT_MIN_BYTES`` or more) comes
        back as a view into ``buf``, without a copy: valid until ``buf`` is read into
        again. Smaller objects, and file systems that refuse ``O_DIRECT``, give bytes."""
        return await self._get(key, offset, length, buf, max_bytes)

    async def _get(self, key: str, offset: int, length: int | None, into: ReadBuffer | None,
                   max_bytes: int | None) -> Bytes:
        return await asyncio.get_running_loop().run_in_executor(_readers(), self._read, key, offset, length, into,
                                                                max_bytes)

    def read_blocking(self, key: str, offset: int = 0, length: int | None = None, *,
                      max_bytes: int | None = None) -> Bytes:
        """``get``, blocking: for a worker thread that goes on to decode what it read, so
        that one hand-off to a thread serves both (``rocva.mount_source``: a cold
        random 4 KiB read of a mount cost 0.8 ms of CPU with two, read then decode)."""
        return self._read(key, offset, length, None, max_bytes)

    def _read(self, key: str, offset: int, length: int | None, into: ReadBuffer | None,
              max_bytes: int | None = None) -> Bytes:
        validate_key(key)
        check_range(offset, length)
        check_max_bytes(max_bytes)
        try:
            return self._at_root(_read_range, key, offset, length, into, max_bytes)
        except _Oversized as exc:
            raise TooLarge(f"{self.describe()}: get {show_key(key)}", exc.size, exc.max_bytes) from None
        except OSError as exc:
            raise self._error("get", key, exc) from exc

    async def stat(self, key: str) -> ObjectInfo:
        validate_key(key)
        try:
            st = await asyncio.to_thread(self._at_root, _stat_object, key)
        except OSError as exc:
            raise self._error("stat", key, exc) from exc
        return ObjectInfo(key, st.st_size, st.st_mtime, _etag(st))

    async def delete(self, key: str) -> None:
        validate_key(key)
        try:
            await asyncio.to_thread(self._at_root, _delete, key)
        except FileNotFoundError:
            return  # no root: no object
        except OSError as exc:
            raise self._error("delete", key, exc) from exc

    async def server_time(self) -> float | None:
        """The store is this host's file system: its clock is ours."""
        return time.time()

    async def ensure_container(self) -> None:
        """Create the root directory (and its parents) if missing."""
        try:
            await asyncio.to_thread(make_root, self.root)
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
            entries = await asyncio.to_thread(self._scan, directory)
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

    def _scan(self, directory: str) -> list[_Entry]:
        try:
            return self._at_root(_scan, directory)
        except (FileNotFoundError, NotADirectoryError):
            return []  # no root: an empty store

    def _error(self, op: str, key: str, exc: OSError) -> StoreError:
        """Translate an OSError of `op` on `key` into the store error tree."""
        where = f"{self.describe()}: {op} {show_key(key)}"
        code = errno.errorcode.get(exc.errno or 0, "?")
        if isinstance(exc, Unconfined):
            return StoreError(
                f"{where}: refused: {exc.args[0]}; the file store follows no symbolic link below "
                f"its root and keeps only directories and regular files there"
            )
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


# --- Reading, writing, deleting, listing (run in worker threads) ---------------------------


def _scan(root: Dir, directory: str) -> list[_Entry]:
    """The key-like entries of one directory, sorted as their full keys sort."""
    try:
        d = open_dir(root, directory, create=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    entries = []
    try:
        with os.scandir(d.fd) as it:
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
                    # else: a symbolic link or special file is not an object
                except FileNotFoundError:
                    continue  # deleted while listing
    finally:
        os.close(d.fd)
    entries.sort()
    return entries


def _open_temp(root: Dir, directory: str) -> tuple[Dir, int, str]:
    """Create a fresh temp file in ``directory`` (creating it); return (the directory,
    open; the file's fd; its name)."""
    for attempt in range(DIR_CREATE_ATTEMPTS_MAX):
        try:
            d = open_dir(root, directory, create=True)
            tmp = f"{TMP_PREFIX}{secrets.token_hex(8)}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                             dir_fd=d.fd)
            except BaseException:
                os.close(d.fd)
                raise
            return d, fd, tmp
        except FileNotFoundError:
            if attempt == DIR_CREATE_ATTEMPTS_MAX - 1:
                raise
            # A concurrent delete pruned a directory we had made or opened: retry.
    raise AssertionError("unreachable")


class _EtagMismatch(Exception):
    """The object is not the one an if_match put was made against (args[0]: how)."""


class _KeyExists(Exception):
    """An if_absent put found an object under its key."""


class _Oversized(Exception):
    """A get's object is larger than its bound (raised before anything is read)."""

    def __init__(self, size: int, max_bytes: int) -> None:
        super().__init__(size, max_bytes)
        self.size, self.max_bytes = size, max_bytes


def _write_atomic(root: Dir, key: str, data: Bytes, if_absent: bool, if_match: str | None) -> str:
    """Write data under key so that it never holds a partial object; return its etag.

    if_absent: _KeyExists when an object is there, even against a concurrent writer
    (``durable.publish_at`` links). if_match: _EtagMismatch unless key is still the
    object with that etag (see the module docstring).
    """
    directory, _, name = key.rpartition("/")
    d, fd, tmp = _open_temp(root, directory)
    try:
        try:
            if len(data) < DIRECT_MIN_BYTES or not write_direct(fd, data):
                write_all(fd, data, IO_CHUNK_BYTES_MAX)
            os.fsync(fd)
            etag = _etag(os.fstat(fd))
        finally:
            os.close(fd)
        if if_match is None:
            _publish_new(d, tmp, name, key, if_absent)
        else:
            _publish_if_match(d, tmp, name, key, if_match)
        return etag
    except BaseException:
        _unlink_quietly(d, tmp)  # still there when the write or a comparison failed
        raise
    finally:
        os.close(d.fd)


def _publish_new(d: Dir, tmp: str, name: str, key: str, if_absent: bool) -> None:
    # A link or special file under the key would only be replaced, never written
    # through; refused all the same, as every other operation refuses it.
    refused = special_entry(d.fd, name, key, OBJECT)
    if refused is not None:
        raise refused
    try:
        durable.publish_at(d.fd, tmp, name, if_absent=if_absent)
    except FileExistsError:
        try:
            st = os.stat(name, dir_fd=d.fd, follow_symlinks=False)
        except FileNotFoundError:
            raise _KeyExists() from None  # it was there when the link failed
        if stat_mode.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "a directory", key) from None
        if not stat_mode.S_ISREG(st.st_mode):
            raise Unconfined(key, st.st_mode, OBJECT) from None
        # The caller goes on as if it had put it (a page a catalog generation then
        # names): the object found must be durable, and its writer may have been killed
        # between its link and its sync. Its bytes were synced before the link.
        fsync_dir(d)
        raise _KeyExists() from None


def _publish_if_match(d: Dir, tmp: str, name: str, key: str, if_match: str) -> None:
    with _locked(d):
        try:
            st = os.stat(name, dir_fd=d.fd, follow_symlinks=False)
        except FileNotFoundError:
            raise _EtagMismatch(f"the object is gone (expected etag {if_match})") from None
        if not (stat_mode.S_ISREG(st.st_mode) or stat_mode.S_ISDIR(st.st_mode)):
            raise Unconfined(key, st.st_mode, OBJECT)
        if not stat_mode.S_ISREG(st.st_mode) or _etag(st) != if_match:
            raise _EtagMismatch(f"the object was replaced (etag {_etag(st)}, expected {if_match})")
        durable.publish_at(d.fd, tmp, name)


@contextlib.contextmanager
def _locked(d: Dir):
    """Hold an exclusive flock of the open directory ``d`` (conditional puts and deletes in it)."""
    fcntl.flock(d.fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(d.fd, fcntl.LOCK_UN)


def _unlink_quietly(d: Dir, name: str) -> None:
    try:
        os.unlink(name, dir_fd=d.fd)
    except FileNotFoundError:
        pass


def _stat_object(root: Dir, key: str) -> os.stat_result:
    fd, st = open_object(root, key, os.O_PATH)
    os.close(fd)
    return st


def _read_range(root: Dir, key: str, offset: int, length: int | None, into: ReadBuffer | None = None,
                max_bytes: int | None = None) -> Bytes:
    """Bytes ``[offset, offset + length)`` of the object (``into``: read with ``O_DIRECT``, a
    view into that buffer), or, buffered, read in ``READ_STEP_BYTES`` steps; ``_Oversized``
    before anything is read if the object has more than ``max_bytes``.

    Why steps, not one pread of the whole range: reading a cold store (ext4, 6 threads,
    objects of 2.7 and 10 MB) measured 1.5 GB/s and 0.14 s of CPU per 338 MB with one
    pread per object, 2.2 GB/s and 0.09 s with 512 KiB steps (kernel readahead keeps up
    better with moderate requests; 128 KiB..512 KiB measured alike, 2 MiB as slow as one
    read). A range of one step is one pread (its bytes returned as they are); a longer
    one is read step by step into one ``bytearray`` of its size (no parts joined: a whole
    read held twice the object's size at its peak).

    ``O_NONBLOCK``: a FIFO planted under the key must not block the open (it is refused
    once open); on a regular file the flag changes nothing.
    """
    fd, st = open_object(root, key, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if max_bytes is not None and st.st_size > max_bytes:
            raise _Oversized(st.st_size, max_bytes)
        start, end = resolve_range(st.st_size, offset, length)
        if st.st_size >= DIRECT_MIN_BYTES:  # written past the page cache (_write_atomic)
            data = read_direct(fd, start, end) if into is None else read_direct_into(fd, start, end, into)
            if data is not None:
                return data
        if end - start <= RANDOM_READ_BYTES_MAX and (start or end < st.st_size):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        if end - start <= READ_STEP_BYTES:
            return os.pread(fd, end - start, start)
        out = bytearray(end - start)
        view = memoryview(out)
        got = 0
        while got < len(out):
            n = os.preadv(fd, [view[got : got + READ_STEP_BYTES]], start + got)
            if not n:
                break  # cannot happen: objects are replaced, never truncated
            got += n
        view.release()
        del out[got:]
        return out
    finally:
        os.close(fd)


def _delete(root: Dir, key: str) -> None:
    directory, _, name = key.rpartition("/")
    try:
        d = open_dir(root, directory, create=False)
    except FileNotFoundError:
        return  # no such object: delete is idempotent
    try:
        with _locked(d):  # see _publish_if_match
            try:
                st = os.stat(name, dir_fd=d.fd, follow_symlinks=False)
            except FileNotFoundError:
                return
            if stat_mode.S_ISDIR(st.st_mode):
                return  # not an object
            if not stat_mode.S_ISREG(st.st_mode):
                raise Unconfined(key, st.st_mode, OBJECT)
            _unlink_quietly(d, name)  # a hard link: only this name goes
    finally:
        os.close(d.fd)
    _prune(root, directory)


def _prune(root: Dir, directory: str) -> None:
    """Remove ``directory`` and its parents while they are empty (not the root), so
    that listings do not walk dead branches."""
    parts = directory.split("/") if directory else []
    while parts:
        try:
            parent = open_beneath(root, "/".join(parts[:-1]) or ".", os.O_PATH | os.O_DIRECTORY, DIRECTORY)
        except OSError:
            return
        try:
            os.rmdir(parts[-1], dir_fd=parent)  # a link under that name: ENOTDIR, stop
        except OSError:
            return  # not empty (or gone): stop
        finally:
            os.close(parent)
        parts.pop()
