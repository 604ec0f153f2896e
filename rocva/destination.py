"""Where a recovery may write, and how it opens its output directory and the files in it.

The policy is a ``Destination``:

- ``roots``: the directories a recovery may write under — the site file's
  ``recovery_roots`` for the recoveries the MSA starts (``cdp.msa.operations``); None
  for ``cdp recover`` run by a user, who may write wherever that user can;
- ``forbidden``: directories a recovery never writes into, whatever the roots: the file
  store's root (always, when the store is a file store: images under ``d/<domain>/cat/``
  make the domain unrecoverable), and for the MSA its state directory.

``resolve_destination`` checks a destination as the file system resolves it *now*
(``os.path.realpath``: every symbolic link and every ``..``), which is what a request's
``to`` is checked with before a job starts. ``open_output_dir`` checks it again and opens
it without following any symbolic link: from the root's descriptor (``/`` when there
are no roots) it opens each component of the resolved path with
``O_NOFOLLOW|O_DIRECTORY`` (creating the missing ones), and compares every directory it
passes with the forbidden ones by device and inode, which neither a rename nor a bind
mount disguises. A component swapped for a symbolic link after the check fails its open:
the recovery is refused and nothing is written through the link.

Every file of the output directory is then reached through ``OutputDir``, relative to
the directory's descriptor and never by path: new files are created with
``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600 (``FILE_MODE``; the directories it creates
0700, ``DIR_MODE``: the images may be plaintext disks of an encrypted store); existing ones are opened with ``O_NOFOLLOW|O_NONBLOCK``
(a FIFO planted under a file's name does not block the open) and used only when they
are regular files with no other hard link. Anything else is refused with an error that
names the file (``RecoveryError``).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp import durable
from cdp.bounded_read import pread_upto
from cdp.errors import ConfigError
from cdp.store.base import ObjectStore
from rocva.errors import RecoveryError

#: Longest destination path, in bytes (Linux's PATH_MAX).
PATH_BYTES_MAX = 4096
#: Directories created for a destination at most (its missing components).
CREATE_DEPTH_MAX = 64
#: Directories a recovery creates, and the files in them: the owner's alone. A recovery
#: from an encrypted store writes plaintext disks, so what it makes must not be readable
#: by every local user. An existing directory is left with the mode it has.
DIR_MODE = 0o700
FILE_MODE = 0o600
_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)  # open a directory to walk it without needing to read it


@dataclass(frozen=True)
class Destination:
    """Where a recovery may write: under one of ``roots`` (None: anywhere the process
    can), never inside a ``forbidden`` directory (``(path, what)``: ``what`` names it
    in messages, e.g. "the object store", without the path when it must not be shown)."""

    roots: tuple[Path, ...] | None = None
    forbidden: tuple[tuple[Path, str], ...] = ()

    def with_forbidden(self, extra: Iterable[tuple[Path, str]]) -> Destination:
        return Destination(self.roots, (*self.forbidden, *extra))


def store_root(store: ObjectStore) -> Path | None:
    """The local directory of a file store (through wrappers that keep it as ``inner``);
    None for any other store."""
    from cdp.store.fs import FileStore

    for _ in range(16):  # wrappers nest a few deep at most
        if isinstance(store, FileStore):
            return store.root
        store = getattr(store, "inner", None)
        if store is None:
            return None
    return None


def for_store(store: ObjectStore, destination: Destination | None = None) -> Destination:
    """``destination`` (default: anywhere) that also never writes into ``store``'s root."""
    destination = destination or Destination()
    root = store_root(store)
    return destination if root is None else destination.with_forbidden([(root, "the object store")])


def check_text(value: Any, field: str = "to", *, absolute: bool = True) -> str:
    """``value`` if it is a usable path text; ConfigError naming ``field`` otherwise."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{field}: expected a directory path, got {type(value).__name__} {value!r:.80}")
    if "\0" in value:
        raise ConfigError(f"{field}: a path cannot hold a NUL character")
    try:
        encoded = os.fsencode(value)
    except UnicodeError:
        raise ConfigError(f"{field}: expected a path the file system can name (it holds a lone "
                          f"surrogate character)") from None
    if len(encoded) > PATH_BYTES_MAX:
        raise ConfigError(f"{field}: expected a path of at most {PATH_BYTES_MAX} bytes, got {len(encoded)}")
    if absolute and not os.path.isabs(value):
        raise ConfigError(f"{field}: expected an absolute directory path, got {value!r}")
    return value


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _real(path: Path | str) -> Path:
    return Path(os.path.realpath(path))


def resolve_destination(to: str | os.PathLike[str], destination: Destination) -> tuple[Path, Path]:
    """(the resolved destination, the resolved root it lies under — ``/`` without roots).

    Refuses (``RecoveryError``, naming ``to`` as given) a destination that resolves
    outside every root, inside a forbidden directory, or to something that is not a
    directory (a regular file, or a path through one). Writes nothing."""
    shown = os.fspath(to)
    check_text(shown, "to", absolute=destination.roots is not None)
    real = _real(shown)
    for path, what in destination.forbidden:
        if _inside(real, _real(path)):
            raise RecoveryError(f"{shown!r} lies inside {what}: a recovery never writes there")
    root = _root_of(shown, real, destination.roots)
    existing = real
    while not existing.exists() and existing != root:
        existing = existing.parent
    if not existing.is_dir():
        raise RecoveryError(f"{shown!r} is not a directory" if existing == real
                            else f"{shown!r}: {existing.name!r} is not a directory")
    return real, root


def _root_of(shown: str, real: Path, roots: tuple[Path, ...] | None) -> Path:
    if roots is None:
        return Path("/")
    if not roots:
        raise RecoveryError(f"{shown!r}: no recovery root is configured (recovery_roots in the site file), "
                            f"so a recovery cannot be written anywhere")
    for root in roots:
        resolved = _real(root)
        if _inside(real, resolved):
            return resolved
    names = ", ".join(str(r) for r in roots)
    raise RecoveryError(f"{shown!r} is not under a recovery root ({names}); symbolic links and '..' "
                        f"are resolved before the check")


class OutputDir:
    """An open output directory. Invariant: every name in it is reached through ``fd``
    (``*at`` calls), never through a path, and never followed if it is a symbolic link."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    def __repr__(self) -> str:
        return f"OutputDir({str(self.path)!r})"

    def show(self, name: str) -> str:
        return str(self.path / name)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def fsync(self) -> None:
        durable.sync_dir(self.fd)

    def lstat(self, name: str) -> os.stat_result | None:
        """The name's own status (a symbolic link is not followed), None when absent."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def create(self, name: str, mode: int = FILE_MODE) -> int:
        """A new, empty file (read-write); refused if the name exists, even as a link."""
        try:
            return os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                           dir_fd=self.fd)
        except FileExistsError:
            raise RecoveryError(f"{self.show(name)} appeared while the recovery created it; "
                                f"another process writes in this directory") from None

    def open(self, name: str, flags: int = os.O_RDWR, *, links_max: int = 1) -> int:
        """An existing regular file with at most ``links_max`` hard links; RecoveryError
        naming it if it is a symbolic link or anything else (FileNotFoundError if absent)."""
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise RecoveryError(f"{self.show(name)} is a symbolic link; a recovery never follows one: "
                                    f"remove it") from None
            if exc.errno == errno.ENOENT:
                raise
            raise RecoveryError(f"{self.show(name)}: cannot open ({exc.strerror})") from None
        try:
            refuse_odd(self, name, os.fstat(fd), links_max)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def unlink(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass

    def link(self, src: str, dst: str) -> None:
        """Give ``src``'s file the name ``dst``; FileExistsError if ``dst`` exists (in any form)."""
        os.link(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)

    def read(self, name: str, bytes_max: int) -> bytes | None:
        """A small regular file's bytes, at most ``bytes_max + 1`` of them (so that a
        larger file shows as such); None if absent; RecoveryError if it is a link or not
        a regular file."""
        try:
            fd = self.open(name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return pread_upto(fd, bytes_max + 1)
        finally:
            os.close(fd)

    def write_atomic(self, name: str, data: bytes) -> None:
        """Replace ``name`` with ``data`` atomically and durably: a new temporary file
        (``O_EXCL|O_NOFOLLOW``) fsynced, renamed over the name (a rename replaces a
        symbolic link, it never writes through one), the directory fsynced."""
        durable.atomic_write_at(self.fd, name, data)


def refuse_odd(out: OutputDir, name: str, st: os.stat_result, links_max: int = 1) -> None:
    """RecoveryError naming ``name`` unless it is a regular file with at most ``links_max`` names."""
    if stat.S_ISLNK(st.st_mode):
        raise RecoveryError(f"{out.show(name)} is a symbolic link; a recovery never follows one: remove it")
    if not stat.S_ISREG(st.st_mode):
        raise RecoveryError(f"{out.show(name)} is not a regular file: remove it or choose another directory")
    if st.st_nlink > links_max:
        raise RecoveryError(f"{out.show(name)} has {st.st_nlink} hard links: a recovery writes only files of "
                            f"its own; remove it or choose another directory")


def _forbidden_ids(destination: Destination) -> dict[tuple[int, int], str]:
    ids = {}
    for path, what in destination.forbidden:
        try:
            st = os.stat(path)
        except OSError:
            continue  # not there (yet): nothing can be under it
        ids[(st.st_dev, st.st_ino)] = what
    return ids


def open_output_dir(to: str | os.PathLike[str], destination: Destination) -> OutputDir:
    """Check ``to`` (``resolve_destination``), create what is missing of it and open it,
    walking from its root one ``O_NOFOLLOW`` component at a time (module docstring)."""
    shown = os.fspath(to)
    real, root = resolve_destination(shown, destination)
    forbidden = _forbidden_ids(destination)
    parts = real.relative_to(root).parts
    try:
        fd = os.open(root, _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise RecoveryError(f"the recovery root {root} cannot be opened ({exc.strerror})") from None
    created = 0
    try:
        _refuse_forbidden(fd, forbidden, shown)
        for part in parts:
            assert part not in ("", ".", ".."), parts  # a resolved path has none
            try:
                sub = os.open(part, _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                created += 1
                if created > CREATE_DEPTH_MAX:
                    raise RecoveryError(f"{shown!r}: more than {CREATE_DEPTH_MAX} directories to create") from None
                try:
                    os.mkdir(part, DIR_MODE, dir_fd=fd)
                    _fsync_dir_at(fd, shown)  # the new entry survives a power loss with what goes in it
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise RecoveryError(f"{shown!r}: cannot create directory {part!r} ({exc.strerror})") from None
                sub = _open_component(fd, part, shown)
            except OSError as exc:
                raise _component_error(shown, part, exc) from None
            os.close(fd)
            fd = sub
            _refuse_forbidden(fd, forbidden, shown)
        try:
            out = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        except OSError as exc:
            raise RecoveryError(f"{shown!r}: cannot open the directory ({exc.strerror})") from None
    finally:
        os.close(fd)
    return OutputDir(out, real)


def _fsync_dir_at(fd: int, shown: str) -> None:
    """fsync the directory ``fd`` (an ``O_PATH`` descriptor, which cannot be synced itself)
    after an entry was created in it: without it, a recovery that finished and fsynced
    its images could lose its whole directory to a power cut."""
    d = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    try:
        durable.sync_dir(d)
    finally:
        os.close(d)


def _open_component(fd: int, part: str, shown: str) -> int:
    try:
        return os.open(part, _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    except OSError as exc:
        raise _component_error(shown, part, exc) from None


def _component_error(shown: str, part: str, exc: OSError) -> RecoveryError:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return RecoveryError(f"{shown!r}: {part!r} is a symbolic link or not a directory (it changed after "
                             f"the destination was checked); a recovery never follows a link")
    return RecoveryError(f"{shown!r}: cannot open {part!r} ({exc.strerror})")


def _refuse_forbidden(fd: int, forbidden: dict[tuple[int, int], str], shown: str) -> None:
    st = os.fstat(fd)
    what = forbidden.get((st.st_dev, st.st_ino))
    if what is not None:
        raise RecoveryError(f"{shown!r} lies inside {what}: a recovery never writes there")
