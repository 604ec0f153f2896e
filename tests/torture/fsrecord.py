"""Record what reaches the file system below one directory, and rebuild crash states.

``Recorder`` patches the ``os`` functions that change files (``open`` with ``O_CREAT``,
``write``, ``pwrite``, ``pwritev``, ``ftruncate``, ``posix_fallocate``, ``fsync``,
``fdatasync``, ``rename``, ``replace``, ``link``, ``unlink``, ``mkdir``, ``rmdir``):
everything beneath ``cdp.durable`` and the file store goes through them, so nothing
durable can happen unseen. Calls on paths and descriptors outside the root pass through
unrecorded. The workload adds ``Ack`` markers between the operations: what it was told
was durable, and when.

A crash at point ``k`` (the first ``k`` operations issued) leaves, as ALICE and
CrashMonkey model it:

- every operation a later sync (before ``k``) covered: a file's writes and size changes
  once that file is ``fsync``/``fdatasync``ed, a directory's entries (create, link,
  rename, unlink, mkdir, rmdir) once that directory is fsynced — POSIX promises no more;
- plus any subset of the others, applied in their order. A pending write is split into
  ``TEAR_BYTES`` pieces, each kept or lost on its own (a torn write). A pending rename
  whose source is not there in that state does nothing.

``CrashStates`` replays such a state from the image taken when recording began, as
real files in a directory, for the real recovery code to open.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A pending write is lost or kept in pieces of this size: the page cache writes pages back
# one by one, in any order, and a power loss can cut between any two of them.
TEAR_BYTES = 4096


# ------------------------------------------------------------------ operations


@dataclass(frozen=True, slots=True)
class Write:
    ino: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Resize:
    ino: int
    size: int
    grow_only: bool  # posix_fallocate never shrinks


@dataclass(frozen=True, slots=True)
class Sync:
    ino: int


@dataclass(frozen=True, slots=True)
class SyncDir:
    dir: str


@dataclass(frozen=True, slots=True)
class Create:  # also Link: a name for an inode
    dir: str
    name: str
    ino: int


@dataclass(frozen=True, slots=True)
class Rename:
    src_dir: str
    src: str
    dst_dir: str
    dst: str


@dataclass(frozen=True, slots=True)
class Unlink:  # also rmdir
    dir: str
    name: str


@dataclass(frozen=True, slots=True)
class Mkdir:
    dir: str
    name: str


@dataclass(frozen=True, slots=True)
class Ack:
    what: Any


Op = Write | Resize | Sync | SyncDir | Create | Rename | Unlink | Mkdir | Ack


def _dirs_of(op: Op) -> tuple[str, ...]:
    if isinstance(op, (Create, Unlink, Mkdir)):
        return (op.dir,)
    if isinstance(op, Rename):
        return (op.src_dir, op.dst_dir)
    return ()


# ------------------------------------------------------------------ the file system image


class Image:
    """Directories (relative path → {name: ("f", inode) | ("d", relative path)}) and
    file contents (inode → bytes). Copies share contents until one is written."""

    def __init__(self, dirs: dict[str, dict[str, tuple[str, Any]]], files: dict[int, bytes | bytearray]) -> None:
        self.dirs = dirs
        self.files = files
        self._owned: set[int] = set()

    def copy(self) -> "Image":
        return Image({d: dict(e) for d, e in self.dirs.items()}, dict(self.files))

    def _mutable(self, ino: int) -> bytearray:
        if ino not in self._owned:
            self.files[ino] = bytearray(self.files.get(ino, b""))
            self._owned.add(ino)
        return self.files[ino]  # type: ignore[return-value]

    def apply(self, op: Op) -> None:
        if isinstance(op, Write):
            buf = self._mutable(op.ino)
            end = op.offset + len(op.data)
            if len(buf) < op.offset:
                buf.extend(bytes(op.offset - len(buf)))
            buf[op.offset : end] = op.data
        elif isinstance(op, Resize):
            buf = self._mutable(op.ino)
            if len(buf) < op.size:
                buf.extend(bytes(op.size - len(buf)))
            elif not op.grow_only:
                del buf[op.size :]
        elif isinstance(op, Create):
            if op.dir in self.dirs:
                self.dirs[op.dir][op.name] = ("f", op.ino)
                self.files.setdefault(op.ino, b"")
        elif isinstance(op, Mkdir):
            if op.dir in self.dirs:
                child = _join(op.dir, op.name)
                self.dirs[op.dir][op.name] = ("d", child)
                self.dirs.setdefault(child, {})
        elif isinstance(op, Unlink):
            self.dirs.get(op.dir, {}).pop(op.name, None)
        elif isinstance(op, Rename):
            entry = self.dirs.get(op.src_dir, {}).get(op.src)
            if entry is not None and op.dst_dir in self.dirs:  # else: this rename did not happen
                del self.dirs[op.src_dir][op.src]
                self.dirs[op.dst_dir][op.dst] = entry

    def materialize(self, dest: Path) -> None:
        """Write the tree reachable from the root to ``dest`` (created, must not exist)."""
        os.mkdir(dest)
        todo = [("", dest)]
        while todo:
            rel, path = todo.pop()
            for name, (kind, what) in self.dirs.get(rel, {}).items():
                if kind == "d":
                    os.mkdir(path / name)
                    todo.append((what, path / name))
                else:
                    fd = os.open(path / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    try:
                        data = memoryview(self.files[what])
                        while data:
                            data = data[os.write(fd, data) :]
                    finally:
                        os.close(fd)


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def snapshot(root: Path) -> tuple[Image, dict[tuple[int, int], int]]:
    """The image of the tree at ``root`` and the inode ids given to its files."""
    dirs: dict[str, dict[str, tuple[str, Any]]] = {}
    files: dict[int, bytes | bytearray] = {}
    inodes: dict[tuple[int, int], int] = {}
    todo = [""]
    while todo:
        rel = todo.pop()
        entries: dict[str, tuple[str, Any]] = {}
        with os.scandir(root / rel if rel else root) as it:
            for d in it:
                st = d.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    entries[d.name] = ("d", _join(rel, d.name))
                    todo.append(_join(rel, d.name))
                elif stat.S_ISREG(st.st_mode):
                    ino = inodes.setdefault((st.st_dev, st.st_ino), len(inodes) + 1)
                    files[ino] = Path(d.path).read_bytes()
                    entries[d.name] = ("f", ino)
        dirs[rel] = entries
    return Image(dirs, files), inodes


# ------------------------------------------------------------------ recording


_PATCHED = ("open", "close", "write", "pwrite", "pwritev", "ftruncate", "posix_fallocate", "fsync",
            "fdatasync", "rename", "replace", "link", "unlink", "remove", "mkdir", "rmdir")


class Recorder:
    """Records the operations below ``root`` while active (a context manager).

    Invariant: ``ops`` is in the order the calls completed (a lock orders worker threads);
    every descriptor open below ``root`` maps to an inode id of ``initial`` or of a
    ``Create`` in ``ops``.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.realpath(root))
        self.initial, self._inodes = snapshot(self.root)
        self.ops: list[Op] = []
        self._fds: dict[int, tuple[str, Any]] = {}  # fd -> ("f", inode) | ("d", relative dir)
        self._lock = threading.RLock()
        self._real: dict[str, Any] = {}

    def ack(self, what: Any) -> None:
        with self._lock:
            self.ops.append(Ack(what))

    # -------------------------------------------------------------- where

    def _where(self, path: Any, dir_fd: int | None = None) -> tuple[str, str] | None:
        """(relative dir, name) of ``path`` (relative to ``dir_fd``, if given) when it is
        below the root, else None."""
        if isinstance(path, int):
            return None
        path = os.fspath(path)
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        # Normalised first: os.open(".", dir_fd=D) is D itself, not an entry "." of D's
        # parent (a directory sync through such an fd was put on the wrong directory).
        path = os.path.normpath(os.path.abspath(path))
        full = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))),
                            os.path.basename(path))
        rel = os.path.relpath(full, self.root)
        if rel.startswith("..") or rel == ".":
            return None
        d, name = os.path.split(rel)
        return d, name

    def _inode(self, st: os.stat_result) -> int:
        key = (st.st_dev, st.st_ino)
        if key not in self._inodes:
            raise AssertionError(f"a file below {self.root} the recorder never saw created: inode {key}")
        return self._inodes[key]

    def _new_inode(self, st: os.stat_result) -> int:
        ino = max(self._inodes.values(), default=0) + 1
        self._inodes[(st.st_dev, st.st_ino)] = ino  # an inode number reused after an unlink: a new file
        return ino

    # -------------------------------------------------------------- the patched calls

    def _open(self, path, flags, mode=0o777, *, dir_fd=None):
        real = self._real["open"]
        where = self._where(path, dir_fd)
        if where is None:
            fd = real(path, flags, mode, dir_fd=dir_fd)
            if dir_fd is None and not isinstance(path, int) and os.path.realpath(path) == str(self.root):
                with self._lock:
                    self._fds[fd] = ("d", "")  # the root itself: its fsync makes its entries durable
            return fd
        with self._lock:
            try:
                os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
                existed = True
            except FileNotFoundError:
                existed = False
            fd = real(path, flags, mode, dir_fd=dir_fd)
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                self._fds[fd] = ("d", _join(*where) if where[0] else where[1])
                return fd
            if flags & os.O_CREAT and not existed:
                ino = self._new_inode(st)
                self.ops.append(Create(where[0], where[1], ino))
            else:
                ino = self._inode(st)
                if flags & os.O_TRUNC:
                    self.ops.append(Resize(ino, 0, False))
            self._fds[fd] = ("f", ino)
            return fd

    def _dir_by_fd(self, fd: int) -> tuple[str, str] | None:
        """("d", relative dir) for a directory below the root opened without ``os.open``
        (the file store opens them with openat2), else None."""
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            return None
        rel = os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), self.root)
        if rel.startswith(".."):
            return None
        return ("d", "" if rel == "." else rel)

    def _close(self, fd):
        with self._lock:
            self._fds.pop(fd, None)
        return self._real["close"](fd)

    def _file(self, fd: int) -> int | None:
        got = self._fds.get(fd)
        return got[1] if got is not None and got[0] == "f" else None

    def _write(self, fd, data):
        with self._lock:
            ino = self._file(fd)
            if ino is None:
                return self._real["write"](fd, data)
            offset = os.lseek(fd, 0, os.SEEK_CUR)
            n = self._real["write"](fd, data)
            self.ops.append(Write(ino, offset, bytes(memoryview(data).cast("B")[:n])))
            return n

    def _pwrite(self, fd, data, offset, *args):
        with self._lock:
            n = self._real["pwrite"](fd, data, offset, *args)
            ino = self._file(fd)
            if ino is not None:
                self.ops.append(Write(ino, offset, bytes(memoryview(data).cast("B")[:n])))
            return n

    def _pwritev(self, fd, buffers, offset, *args):
        with self._lock:
            buffers = list(buffers)
            n = self._real["pwritev"](fd, buffers, offset, *args)
            ino = self._file(fd)
            if ino is not None:
                data = b"".join(memoryview(b).cast("B") for b in buffers)[:n]
                self.ops.append(Write(ino, offset, data))
            return n

    def _ftruncate(self, fd, length):
        with self._lock:
            self._real["ftruncate"](fd, length)
            ino = self._file(fd)
            if ino is not None:
                self.ops.append(Resize(ino, length, False))

    def _posix_fallocate(self, fd, offset, length):
        with self._lock:
            self._real["posix_fallocate"](fd, offset, length)
            ino = self._file(fd)
            if ino is not None:
                self.ops.append(Resize(ino, offset + length, True))

    def _sync(self, name: str, fd: int) -> None:
        with self._lock:
            self._real[name](fd)
            got = self._fds.get(fd) or self._dir_by_fd(fd)
            if got is not None:
                self.ops.append(Sync(got[1]) if got[0] == "f" else SyncDir(got[1]))

    def _rename(self, name: str, src, dst, *args, **kwargs):
        with self._lock:
            s, d = self._where(src, kwargs.get("src_dir_fd")), self._where(dst, kwargs.get("dst_dir_fd"))
            self._real[name](src, dst, *args, **kwargs)
            if s is not None and d is not None:
                self.ops.append(Rename(s[0], s[1], d[0], d[1]))

    def _link(self, src, dst, *args, **kwargs):
        with self._lock:
            d = self._where(dst, kwargs.get("dst_dir_fd"))
            self._real["link"](src, dst, *args, **kwargs)
            if d is not None:
                st = os.stat(dst, dir_fd=kwargs.get("dst_dir_fd"), follow_symlinks=False)
                self.ops.append(Create(d[0], d[1], self._inode(st)))

    def _unlink(self, name: str, path, *args, **kwargs):
        with self._lock:
            where = self._where(path, kwargs.get("dir_fd"))
            self._real[name](path, *args, **kwargs)
            if where is not None:
                self.ops.append(Unlink(*where))

    def _mkdir(self, path, *args, **kwargs):
        with self._lock:
            where = self._where(path, kwargs.get("dir_fd"))
            self._real["mkdir"](path, *args, **kwargs)
            if where is not None:
                self.ops.append(Mkdir(*where))

    def __enter__(self) -> "Recorder":
        self._real = {name: getattr(os, name) for name in _PATCHED}
        patches = {
            "open": self._open, "close": self._close, "write": self._write, "pwrite": self._pwrite,
            "pwritev": self._pwritev, "ftruncate": self._ftruncate, "posix_fallocate": self._posix_fallocate,
            "fsync": lambda fd: self._sync("fsync", fd), "fdatasync": lambda fd: self._sync("fdatasync", fd),
            "rename": lambda s, d, *a, **k: self._rename("rename", s, d, *a, **k),
            "replace": lambda s, d, *a, **k: self._rename("replace", s, d, *a, **k),
            "link": self._link, "unlink": lambda p, *a, **k: self._unlink("unlink", p, *a, **k),
            "remove": lambda p, *a, **k: self._unlink("remove", p, *a, **k),
            "rmdir": lambda p, *a, **k: self._unlink("rmdir", p, *a, **k), "mkdir": self._mkdir,
        }
        for name, fn in patches.items():
            setattr(os, name, fn)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._real.items():
            setattr(os, name, fn)


# ------------------------------------------------------------------ crash states


def persisted_at(ops: list[Op]) -> list[int]:
    """For each operation, the index of the first sync that makes it durable (or
    ``len(ops)``: none does). A crash at ``k`` keeps it for sure when that index is < k."""
    never = len(ops)
    out = [never] * len(ops)
    next_sync: dict[Any, int] = {}  # ("f", inode) / ("d", dir) -> the next sync after the op
    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        if isinstance(op, Sync):
            next_sync[("f", op.ino)] = i
            out[i] = -1  # changes no file
        elif isinstance(op, SyncDir):
            next_sync[("d", op.dir)] = i
            out[i] = -1
        elif isinstance(op, (Write, Resize)):
            out[i] = next_sync.get(("f", op.ino), never)
        elif isinstance(op, Ack):
            out[i] = -1
        else:
            out[i] = max(next_sync.get(("d", d), never) for d in _dirs_of(op))
    return out


@dataclass(frozen=True, slots=True)
class Pending:
    """A piece of a pending operation: ``ops[index]``, or bytes ``[start, end)`` of its write."""

    index: int
    start: int = 0
    end: int = 0


class CrashStates:
    """Crash states of a recording: the durable base at a point, plus chosen pending pieces."""

    def __init__(self, initial: Image, ops: list[Op]) -> None:
        self.ops = ops
        self._persisted = persisted_at(ops)
        # The image with ops[:_base_end] applied: a prefix every later crash point keeps.
        self._base = initial.copy()
        self._base_end = 0
        self._last_k = 0

    def _advance_base(self, k: int) -> None:
        # The base only grows: crash points must be visited in increasing order.
        assert k >= self._last_k, f"crash point {k} after {self._last_k}"
        self._last_k = k
        while self._base_end < k and self._persisted[self._base_end] < k:
            op = self.ops[self._base_end]
            if not isinstance(op, Ack):
                self._base.apply(op)
            self._base_end += 1

    def pending(self, k: int) -> list[Pending]:
        """The pieces that a crash at ``k`` may keep or lose, in order."""
        self._advance_base(k)
        out = []
        for i in range(self._base_end, k):
            op = self.ops[i]
            if self._persisted[i] < k or isinstance(op, (Ack, Sync, SyncDir)):
                continue
            if isinstance(op, Write):
                # Pieces end on TEAR_BYTES boundaries of the file, as pages do.
                at, end = op.offset, op.offset + len(op.data)
                while at < end:
                    nxt = min(end, (at // TEAR_BYTES + 1) * TEAR_BYTES)
                    out.append(Pending(i, at - op.offset, nxt - op.offset))
                    at = nxt
            else:
                out.append(Pending(i))
        return out

    def build(self, k: int, kept: set[Pending]) -> Image:
        """The state a crash at ``k`` leaves when the pending pieces ``kept`` reached the disk."""
        self._advance_base(k)
        image = self._base.copy()
        by_op: dict[int, list[Pending]] = {}
        for p in kept:
            by_op.setdefault(p.index, []).append(p)
        for i in range(self._base_end, k):
            op = self.ops[i]
            if isinstance(op, (Ack, Sync, SyncDir)):
                continue
            if self._persisted[i] < k:
                image.apply(op)
            elif i in by_op:
                if isinstance(op, Write):
                    for p in sorted(by_op[i], key=lambda p: p.start):
                        image.apply(Write(op.ino, op.offset + p.start, op.data[p.start : p.end]))
                else:
                    image.apply(op)
        return image


def acks_until(ops: list[Op], k: int) -> Iterator[Any]:
    """What the workload was told was durable before a crash at ``k``."""
    for op in ops[:k]:
        if isinstance(op, Ack):
            yield op.what


def fresh(dest: Path) -> None:
    """Remove ``dest`` and everything below it, if there."""
    shutil.rmtree(dest, ignore_errors=True)
