"""What lies at a partition's path, whose it is, and whether it is still the one install made.

Read-only: nothing here writes. ``inspect_log`` and ``inspect_meta`` read a partition's
headers (the two log superblocks; the metadata repository's slot heads and its
``user.cdp.install`` mark) and say whether it is missing, blank, this DRVA's (and this
site's), or something install must refuse. ``made_problem`` compares a partition the
install record names (``cdp.msa.deployment.MadePartition``) with what lies there now:
uninstall removes, and install keeps, only one that still is the file it made
(FORMAT.md §13.15).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp.errors import CdpError, LogError, MetaError
from cdp.logfmt import BLOCK, LABEL_BYTES, SUPERBLOCK_COUNT, label_for, label_owner, unpack_superblock
from cdp.meta import SLOT_SIZE_DEFAULT, read_metadata
from cdp.msa.config import DrvaSpec
from cdp.msa.deployment import MadePartition

LOG_HEAD_BYTES = SUPERBLOCK_COUNT * BLOCK  # both superblock copies
#: Set by install on a metadata repository file it made: the repository's format carries
#: no identity (an inode number is reused as soon as a file is deleted), this does.
MARK_XATTR = "user.cdp.install"
MARK_CHARS_MAX = 200  # two names of 64 characters and 32 hex digits fit
#: What install and uninstall say of a valid partition install did not make.
KEPT_NOT_MADE = "kept (not made by this install)"


@dataclass(frozen=True)
class PathState:
    """What lies at a partition's path, as install and uninstall see it.

    ``ours``: a valid partition this DRVA may use; ``blank``: nothing was ever
    formatted there (missing, empty, or zeros where the format's headers go), so install
    may format it. ``owner``: the site a log's label names ("" for a label naming none:
    an older install's, or a DRVA's that formatted its own log; None: not a log).
    ``identity``: a log's superblock uuid (hex), "" otherwise.
    """

    path: Path
    kind: str  # "absent" | "file" | "device" | "other"
    size: int
    ours: bool
    blank: bool
    what: str
    owner: str | None = None
    identity: str = ""

    @property
    def exists(self) -> bool:
        return self.kind != "absent"

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind, "size": self.size, "ours": self.ours,
                "blank": self.blank, "what": self.what, "owner": self.owner, "identity": self.identity}


def _path_kind(path: Path) -> tuple[str, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return "absent", 0
    if stat.S_ISREG(st.st_mode):
        return "file", st.st_size
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY)
        try:
            return "device", os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
    return "other", 0


def _read_at(path: Path, length: int, offset: int = 0) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def _log_label_state(path: Path, kind: str, sb: Any, drva_name: str, site: str | None) -> PathState:
    """Whose log is it, by its label (``cdp.logfmt.label_owner``)?"""
    owner = label_owner(sb.label, drva_name, site)
    return PathState(path, kind, sb.partition_size, owner.ours, False, owner.what, owner.site, sb.uuid.hex())


def _no_partition_there(path: Path, kind: str) -> PathState | None:
    """The state of a path with nothing to read as a partition (absent, or neither a
    regular file nor a block device); None when there is something to read."""
    if kind == "absent":
        return PathState(path, kind, 0, False, True, "absent")
    if kind == "other":
        return PathState(path, kind, 0, False, False, "neither a regular file nor a block device")
    return None


def inspect_log(path: Path, drva_name: str, site: str | None = None) -> PathState:
    """Is ``path`` missing, blank, ``drva_name``'s log partition (of ``site``, when
    given), or something else? Reads the two superblocks only (no recovery scan,
    nothing written)."""
    try:
        kind, size = _path_kind(path)
        if (early := _no_partition_there(path, kind)) is not None:
            return early
        head = _read_at(path, LOG_HEAD_BYTES)
    except OSError as exc:
        return PathState(path, "other", 0, False, False, f"unreadable ({exc.strerror})")
    found = [sb for i in range(SUPERBLOCK_COUNT)
             if not isinstance(sb := unpack_superblock(head[i * BLOCK:(i + 1) * BLOCK]), str)
             and sb.copy_index() == i]
    if not found:
        blank = not any(head)
        what = "blank (never formatted)" if blank else "not a log partition (no valid superblock)"
        return PathState(path, kind, size, False, blank, what)
    return _log_label_state(path, kind, max(found, key=lambda s: s.generation), drva_name, site)


def read_mark(path: Path) -> str:
    """The mark install set on a metadata repository file it made (``MARK_XATTR``:
    ``<drva>@<site> <random hex>``), "" when there is none."""
    try:
        return os.getxattr(path, MARK_XATTR, follow_symlinks=False).decode("utf-8", "replace")[:MARK_CHARS_MAX]
    except OSError:  # none, no extended attributes here, or a device node
        return ""


def inspect_meta(path: Path, drva_name: str | None = None, site: str | None = None) -> PathState:
    """Is ``path`` missing, blank, a metadata repository, or something else? With
    ``drva_name`` (and ``site``): one another DRVA's document names, or whose install
    mark names another DRVA or site, is not ours."""
    try:
        kind, size = _path_kind(path)
        if (early := _no_partition_there(path, kind)) is not None:
            return early
        slot_heads = _read_at(path, BLOCK) + _read_at(path, BLOCK, SLOT_SIZE_DEFAULT)
    except OSError as exc:
        return PathState(path, "other", 0, False, False, f"unreadable ({exc.strerror})")
    if not any(slot_heads):
        return PathState(path, kind, size, False, True, "blank (never formatted)")
    try:
        # Read-only, without the writer's lock: the DRVA may be running and hold it.
        writer = read_metadata(path).get("drva")  # FORMAT.md §4: the DRVA's document names it
    except MetaError as exc:
        return PathState(path, kind, size, False, False, f"not a metadata repository ({exc.message})")
    mark = read_mark(path)
    marked_drva, _, owner = mark.partition(" ")[0].partition("@")
    if drva_name is not None and isinstance(writer, str) and writer != drva_name:
        return PathState(path, kind, size, False, False,
                         f"the metadata repository of DRVA {writer!r}, not of DRVA {drva_name!r}", None, mark)
    if mark and drva_name is not None and (marked_drva != drva_name or site not in (None, owner)):
        return PathState(path, kind, size, False, False, f"the metadata repository install made for DRVA "
                         f"{marked_drva!r} of site {owner!r}, not for DRVA {drva_name!r} of site {site!r}",
                         owner, mark)
    return PathState(path, kind, size, True, False, "a metadata repository", owner, mark)


@dataclass(frozen=True)
class Role:
    """How install and uninstall treat one kind of partition."""

    name: str  # "log" | "meta": the key in the install record and the DRVA configuration
    what: str
    error: type[CdpError]
    wipe_offsets: tuple[int, ...]  # where a device's headers go (uninstall blanks them)
    wipe_length: int

    def path(self, drva: DrvaSpec) -> Path:
        return drva.log_path if self.name == "log" else drva.meta_path

    def inspect(self, path: Path, drva: str, site: str | None) -> PathState:
        return inspect_log(path, drva, site) if self.name == "log" else inspect_meta(path, drva, site)


ROLES = {"log": Role("log", "log partition", LogError, (0,), LOG_HEAD_BYTES),
         "meta": Role("meta", "metadata repository", MetaError, (0, SLOT_SIZE_DEFAULT), BLOCK)}


def same_file(made: MadePartition) -> str | None:
    """Why ``made.path`` is no longer the file or device install made, or None."""
    path = Path(made.path)
    try:
        st = os.stat(path) if made.kind == "device" else os.lstat(path)
    except FileNotFoundError:
        return "gone"
    if made.kind == "device":
        if not stat.S_ISBLK(st.st_mode) or st.st_rdev != made.dev:
            return "another device than the one install formatted"
    elif not stat.S_ISREG(st.st_mode):
        return "no longer a regular file"
    elif (st.st_dev, st.st_ino) != (made.dev, made.ino):
        return "another file than the one install made (device and inode differ)"
    return None


def made_problem(made: MadePartition, state: PathState) -> str | None:
    """Why ``made`` is not, as it lies now, the partition install made, or None."""
    if (why := same_file(made)) is not None:
        return why
    if not made.formatted:
        return None  # install's own, its format cut short: anything may be there
    if not state.ours and not state.blank:
        return f"no longer a {ROLES[made.role].what} of DRVA {made.drva} ({state.what})"
    if made.identity and state.identity != made.identity:
        return "not the one install made (another file given its inode number, or formatted again since)"
    return None


__all__ = [
    "KEPT_NOT_MADE", "LABEL_BYTES", "LOG_HEAD_BYTES", "MARK_CHARS_MAX", "MARK_XATTR", "PathState", "ROLES", "Role",
    "inspect_log", "inspect_meta", "label_for", "made_problem", "read_mark", "same_file",
]
