"""Small file systems for tests of a full (ENOSPC) or read-only (EROFS) state directory:
a tmpfs of a given size mounted at a path, filled to the last byte and freed again; an
ext4 on a loop device mounted ``errors=remount-ro``, made read-only by an ext4 error
(as a failing disk makes it). Tests using them need root; each unmounts in its finally.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

FILLER = "zz-filler"


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``mount -o size=``) at ``path``, 0755; unmounted at the end
    (lazily: a child a failed test left may still hold a file there)."""
    need_root()
    path.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True, timeout=60)


@contextlib.contextmanager
def ext4_remount_ro(path: Path, image: Path, size: str = "64M") -> Iterator[Path]:
    """An ext4 of ``size`` on a loop device at ``path``, mounted ``errors=remount-ro`` (so
    ``ext4_error`` makes it read-only at once); unmounted and its image removed at the end."""
    need_root()
    path.mkdir(parents=True, exist_ok=True)
    _run("truncate", "-s", size, str(image))
    _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
    _run("mount", "-o", "loop,errors=remount-ro", str(image), str(path))
    try:
        os.chmod(path, 0o755)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True, timeout=60)
        image.unlink(missing_ok=True)


def ext4_error(path: Path) -> None:
    """An ext4 error on the file system mounted at ``path``: read-only from now on
    (``errors=remount-ro``), files open for writing or not."""
    device = os.path.basename(_run("findmnt", "-no", "SOURCE", str(path)).strip())
    with open(f"/sys/fs/ext4/{device}/trigger_fs_error", "w") as f:
        f.write("test: a simulated file system error")


def fill(path: Path, name: str = FILLER) -> None:
    """Fill the file system of ``path`` to its last byte: one ``fallocate`` of what is
    free, then single bytes until ENOSPC."""
    fd = os.open(path / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        st = os.statvfs(path)
        free = st.f_bavail * st.f_frsize
        size = os.fstat(fd).st_size
        for chunk in (free, free // 2, free // 4):
            if chunk > 65536:
                with contextlib.suppress(OSError):
                    os.posix_fallocate(fd, size, chunk - 65536)
                    break
        for piece in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\xa5" * piece)
    finally:
        os.close(fd)


def free(path: Path, name: str = FILLER) -> None:
    (path / name).unlink(missing_ok=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
