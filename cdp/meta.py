"""Metadata repository: per-domain engine state, durable and atomic (docs/FORMAT.md §4).

One JSON document lives in one of two fixed slots of a preallocated file (or device).
A write goes to the slot *not* holding the current state, then ``fdatasync``; a torn
write can only damage that slot, so the previous state stays readable. Invariant: after
``write`` returns, ``read`` — in this process or after a crash — returns that document
or a newer one.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import threading
from pathlib import Path
from typing import Any

import xxhash

from cdp import durable  # every write and sync through it, looked up at each call
from cdp.durable import fsync_dir, preallocate
from cdp.errors import ConfigError, MetaError
from cdp.tomlread import NAME, NAME_EXPECTED

META_MAGIC = b"CDPM"
META_VERSION = 1
SLOT_SIZE_DEFAULT = 1 << 20
_ALIGN = 4096
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
#: FORMAT.md §4: the fields of ``domains.<id>``, each an integer in 0..its maximum.
DOMAIN_FIELDS_MAX = {"committed_seq": U64_MAX, "committed_ts": U64_MAX, "generation": U64_MAX,
                     "timeline": U32_MAX}
#: FORMAT.md §4: ``domains.<id>.name``, the domain's name in the DRVA's configuration when
#: it last started serving it (absent in documents written before names were recorded).
DOMAIN_NAME_KEY = "name"
DOCUMENT_KEYS = ("drva", "domains")

# FORMAT.md §4: slot header, 64 bytes; header_xxh3 covers [0, 56).
_SLOT = struct.Struct("<4sHHQIIQ24sQ")
assert _SLOT.size == 64, "FORMAT.md §4"
_SUMMED = 56


def _pack_slot(generation: int, slot_size: int, body: bytes) -> bytes:
    raw = bytearray(_SLOT.pack(META_MAGIC, META_VERSION, 0, generation, slot_size, len(body),
                               xxhash.xxh3_64_intdigest(body), bytes(24), 0))
    struct.pack_into("<Q", raw, _SUMMED, xxhash.xxh3_64_intdigest(raw[:_SUMMED]))
    raw += body
    raw += bytes(-len(raw) % _ALIGN)
    return bytes(raw)


def _unpack_slot(raw: bytes, slot_size: int) -> tuple[int, dict[str, Any]] | str:
    if len(raw) < _SLOT.size:
        return "short read"
    magic, version, flags, gen, size, body_len, body_xxh3, reserved, summed = _SLOT.unpack_from(raw)
    if magic != META_MAGIC:
        return f"magic {magic!r}, expected {META_MAGIC!r}"
    if version != META_VERSION:
        return f"version {version}, expected {META_VERSION}"
    if xxhash.xxh3_64_intdigest(raw[:_SUMMED]) != summed:
        return "slot header checksum mismatch"
    if flags or any(reserved) or size != slot_size or body_len > slot_size - _SLOT.size:
        return f"inconsistent slot header (slot_size {size}, body_len {body_len})"
    body = raw[_SLOT.size : _SLOT.size + body_len]
    if xxhash.xxh3_64_intdigest(body) != body_xxh3:
        return "slot body checksum mismatch"
    try:
        doc = json.loads(body)
    except ValueError as exc:
        return f"slot body is not JSON ({exc})"
    if not isinstance(doc, dict):
        return "slot body is not a JSON object"
    return gen, doc


def document_problem(doc: dict[str, Any]) -> str | None:
    """Why ``doc`` is not a DRVA's document (§4), naming the key; None when it is one.
    A document whose checksums hold may still come from a bug or another writer."""
    for key in doc:
        if key not in DOCUMENT_KEYS:
            return f"unknown key {key!r} (known: {', '.join(DOCUMENT_KEYS)})"
    if "drva" in doc and not isinstance(doc["drva"], str):
        return f"drva is {doc['drva']!r}, expected a string"
    domains = doc.get("domains", {})
    if not isinstance(domains, dict):
        return f"domains is {domains!r}, expected an object keyed by domain id"
    for domain, entry in domains.items():
        if not (domain.isascii() and domain.isdecimal() and str(int(domain)) == domain
                and int(domain) <= U32_MAX):
            return f"domains key {domain!r} is not a decimal domain id in 0..{U32_MAX}"
        if not isinstance(entry, dict):
            return f"domains.{domain} is {entry!r}, expected an object"
        for name, value in entry.items():
            if name == DOMAIN_NAME_KEY:
                if not isinstance(value, str) or not NAME.fullmatch(value):
                    return f"domains.{domain}.name is {value!r:.80}, expected {NAME_EXPECTED}"
                continue
            high = DOMAIN_FIELDS_MAX.get(name)
            if high is None:
                known = ", ".join([*DOMAIN_FIELDS_MAX, DOMAIN_NAME_KEY])
                return f"domains.{domain}: unknown key {name!r} (known: {known})"
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
                return f"domains.{domain}.{name} is {value!r}, expected an integer in 0..{high}"
    return None


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags)
    except OSError as exc:
        raise MetaError(f"metadata repository {path}: cannot open ({exc.strerror})") from exc


def _newest_slot(fd: int, path: Path, slot_size: int) -> tuple[int, dict[str, Any]]:
    """(generation, document) of the newest valid slot; ``MetaError`` when neither is."""
    best: tuple[int, dict[str, Any]] | None = None
    reasons = []
    for i in range(2):
        try:
            raw = os.pread(fd, slot_size, i * slot_size)
        except OSError as exc:  # a bad sector under one slot: the other may still hold a state
            reasons.append(f"slot {i}: cannot read {slot_size} bytes at offset {i * slot_size} "
                           f"({exc.strerror or exc})")
            continue
        got = _unpack_slot(raw, slot_size)
        if isinstance(got, str):
            reasons.append(f"slot {i}: {got}")
        elif got[0] % 2 != i:
            reasons.append(f"slot {i}: generation {got[0]} belongs to the other slot")
        elif best is None or got[0] > best[0]:
            best = got
    if best is None:
        raise MetaError(f"metadata repository {path}: no valid slot ({'; '.join(reasons)})")
    return best


def read_metadata(path: str | os.PathLike[str], *, slot_size: int = SLOT_SIZE_DEFAULT) -> dict[str, Any]:
    """The current document of the repository at ``path``, opened read-only: for readers
    beside the DRVA that owns it. A slot caught half written fails its checksum and the
    other, the previous document, is read: never a torn one."""
    path = Path(path)
    fd = _open(path, os.O_RDONLY)
    try:
        return _newest_slot(fd, path, slot_size)[1]
    finally:
        os.close(fd)


class MetaRepository:
    """The two-slot metadata repository at ``path`` (see the module docstring)."""

    def __init__(self, path: Path, fd: int, slot_size: int, generation: int, doc: dict[str, Any]):
        self.path = path
        self._fd = fd
        self._slot_size = slot_size
        self._generation = generation
        self._doc = doc
        self._lock = threading.Lock()

    @classmethod
    def format(cls, path: str | os.PathLike[str], *, slot_size: int = SLOT_SIZE_DEFAULT) -> None:
        """Create the repository holding an empty document (generation 1 in slot 1)."""
        if slot_size % _ALIGN or slot_size < _ALIGN:
            raise ConfigError(f"metadata repository {path}: slot_size must be a multiple of {_ALIGN}")
        path = Path(path)
        is_device = path.exists() and stat.S_ISBLK(path.stat().st_mode)
        if not is_device:
            preallocate(path, 2 * slot_size)
        fd = os.open(path, os.O_RDWR)
        try:
            if os.lseek(fd, 0, os.SEEK_END) < 2 * slot_size:
                raise ConfigError(f"metadata repository {path}: smaller than two slots of {slot_size}")
            durable.pwrite_all(fd, [bytes(_ALIGN)], 0)  # no stale slot 0 of an earlier format
            durable.pwrite_all(fd, [_pack_slot(1, slot_size, b"{}")], slot_size)
            durable.sync_file(fd)
        finally:
            os.close(fd)
        if not is_device:
            fsync_dir(path.resolve().parent)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, slot_size: int = SLOT_SIZE_DEFAULT) -> "MetaRepository":
        """Open for writing: one writer at a time (an exclusive ``flock``, held until
        ``close``); ``MetaError`` naming the file and the key when the current document
        is not a DRVA's (``document_problem``)."""
        path = Path(path)
        fd = _open(path, os.O_RDWR)
        try:
            durable.lock_exclusive(fd, MetaError, f"metadata repository {path}")
            generation, doc = _newest_slot(fd, path, slot_size)
            bad = document_problem(doc)
            if bad is not None:
                raise MetaError(f"metadata repository {path}: generation {generation}: {bad}")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, slot_size, generation, doc)

    def read(self) -> dict[str, Any]:
        """A copy of the current document."""
        return json.loads(json.dumps(self._doc))

    @property
    def generation(self) -> int:
        return self._generation

    def write(self, doc: dict[str, Any]) -> None:
        """Replace the document atomically and durably."""
        body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        if len(body) > self._slot_size - _SLOT.size:
            raise MetaError(
                f"metadata repository {self.path}: document of {len(body)} bytes exceeds the "
                f"slot ({self._slot_size - _SLOT.size} bytes)"
            )
        with self._lock:
            gen = self._generation + 1
            durable.pwrite_all(self._fd, [_pack_slot(gen, self._slot_size, body)], (gen % 2) * self._slot_size)
            durable.sync_data(self._fd)
            self._generation = gen
            self._doc = json.loads(body)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> "MetaRepository":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
