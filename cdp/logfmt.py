"""Byte layouts of the replication-log partition (docs/FORMAT.md §3).

Pure functions: pack and check superblocks and entry headers. The I/O and the scan
rules live in ``cdp.replog``.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from dataclasses import dataclass, replace

import xxhash

from cdp.frame import FRAME_LEN_MAX

BLOCK = 4096  # §0: log block; O_DIRECT alignment
SUPERBLOCK_COUNT = 2
DATA_START = SUPERBLOCK_COUNT * BLOCK  # §3.1
DATA_SIZE_MIN = 1 << 20  # §3.1

SB_MAGIC = b"CDPLOGSB"
SB_VERSION = 1
ENTRY_MAGIC = b"CDPL"
ENTRY_VERSION = 1
KIND_DATA = 1
KIND_PAD = 2
EMPTY_XXH3 = xxhash.xxh3_64_intdigest(b"")
#: §3.2 bounds on a superblock's counters, so every increment the writer makes fits its
#: field: ``epoch`` is a u32 bumped at each open; ``generation`` and positions are u64,
#: kept below 2**63 (29 years of appends at 10 GB/s) so no sum of them can overflow.
EPOCH_MAX = (1 << 32) - 2
GENERATION_MAX = 1 << 63
POSITION_MAX = 1 << 63

# FORMAT.md §3.2: superblock fields; the copy on disk is padded to one log block.
_SB = struct.Struct("<8sHHI16sQQQQQQII32sQ")
assert _SB.size == 128, "FORMAT.md §3.2"
_SB_SUMMED = 120

# FORMAT.md §3.3: entry header, 64 bytes.
_ENTRY = struct.Struct("<4sHHQQIIQ16sQ")
assert _ENTRY.size == 64, "FORMAT.md §3.3"
ENTRY_HEADER_SIZE = _ENTRY.size
_ENTRY_SUMMED = 56


def align_up(n: int, to: int = BLOCK) -> int:
    return (n + to - 1) // to * to


def entry_stride(body_len: int) -> int:
    """Bytes a DATA entry with ``body_len`` bytes of body occupies in the ring."""
    return align_up(ENTRY_HEADER_SIZE + body_len)



LABEL_BYTES = 32  # FORMAT.md §3.2: the superblock keeps the first 32 bytes of a label


def label_for(drva_name: str, site: str | None = None) -> str:
    """The label install writes in a DRVA's log superblock: ``<drva>@<site>`` (names hold
    no "@"), cut to the ``LABEL_BYTES`` the superblock keeps. Without ``site``: the DRVA's
    name alone, the label of a log an older install (or the DRVA itself) formatted."""
    text = drva_name if site is None else f"{drva_name}@{site}"
    return text.encode("utf-8")[:LABEL_BYTES].decode("utf-8", "ignore")


@dataclass(frozen=True)
class LabelOwner:
    """Whose log a label says it is, for DRVA ``drva_name`` of ``site``."""

    ours: bool
    site: str | None  # the site the label names ("" for a bare DRVA name; None: another DRVA's)
    what: str  # for messages


def label_owner(label: str, drva_name: str, site: str | None) -> LabelOwner:
    """Read ``label`` as install and the DRVA both do (FORMAT.md §3.2): ``<drva>@<site>``,
    or the DRVA's name alone. ``site`` None: any site's log of ``drva_name`` counts as this
    DRVA's (a caller that does not know the site)."""
    mine = f"the log partition of {drva_name}"
    if label == label_for(drva_name):
        return LabelOwner(True, "", mine)
    prefix = label_for(drva_name) + "@"
    if not label.startswith(prefix):
        return LabelOwner(False, None, f"the log partition of {label!r}, not of DRVA {drva_name!r}")
    owner = label[len(prefix):]
    if site is None or label == label_for(drva_name, site):
        return LabelOwner(True, owner, f"{mine} of site {owner!r}")
    return LabelOwner(False, owner, f"the log partition of DRVA {drva_name!r} of site {owner!r}, "
                                    f"not of this site {site!r}")


@dataclass(frozen=True, slots=True)
class Superblock:
    """One decoded superblock copy (§3.2). ``head <= tail_hint`` always holds."""

    uuid: bytes
    partition_size: int
    data_size: int
    generation: int
    head: int
    tail_hint: int
    epoch: int
    commit_bytes_max: int
    label: str

    def copy_index(self) -> int:
        return self.generation % SUPERBLOCK_COUNT

    def next(self, **changes: int) -> "Superblock":
        """The superblock to write next: one generation later, with ``changes``."""
        return replace(self, generation=self.generation + 1, **changes)

    @staticmethod
    def new(partition_size: int, data_size: int, commit_bytes_max: int, label: str) -> "Superblock":
        return Superblock(
            uuid=uuidlib.uuid4().bytes, partition_size=partition_size, data_size=data_size,
            generation=0, head=0, tail_hint=0, epoch=0, commit_bytes_max=commit_bytes_max,
            label=label,
        )


def pack_superblock(sb: Superblock) -> bytes:
    label = sb.label.encode("utf-8")[:32]
    raw = bytearray(BLOCK)
    _SB.pack_into(
        raw, 0, SB_MAGIC, SB_VERSION, 0, BLOCK, sb.uuid, sb.partition_size, DATA_START,
        sb.data_size, sb.generation, sb.head, sb.tail_hint, sb.epoch, sb.commit_bytes_max,
        label, 0,
    )
    struct.pack_into("<Q", raw, _SB_SUMMED, xxhash.xxh3_64_intdigest(raw[:_SB_SUMMED]))
    return bytes(raw)


def unpack_superblock(raw: bytes | memoryview) -> Superblock | str:
    """The superblock in ``raw``, or a string saying why this copy is not valid."""
    if len(raw) < _SB.size:
        return "short read"
    (magic, version, flags, block_size, uid, partition_size, data_start, data_size,
     generation, head, tail_hint, epoch, commit_max, label, summed) = _SB.unpack_from(raw)
    if magic != SB_MAGIC:
        return f"magic {magic!r}, expected {SB_MAGIC!r}"
    if version != SB_VERSION:
        return f"version {version}, expected {SB_VERSION}"
    if xxhash.xxh3_64_intdigest(bytes(raw[:_SB_SUMMED])) != summed:
        return "superblock checksum mismatch"
    if flags or block_size != BLOCK or data_start != DATA_START:
        return f"unsupported geometry (flags {flags}, block {block_size}, data_start {data_start})"
    bad = _field_problem(partition_size, data_size, generation, head, tail_hint, epoch, commit_max)
    if bad:
        return bad
    return Superblock(
        uuid=uid, partition_size=partition_size, data_size=data_size, generation=generation,
        head=head, tail_hint=tail_hint, epoch=epoch, commit_bytes_max=commit_max,
        label=label.rstrip(b"\0").decode("utf-8", "replace"),
    )


def _field_problem(partition_size: int, data_size: int, generation: int, head: int,
                   tail_hint: int, epoch: int, commit_max: int) -> str | None:
    """Why these superblock fields cannot be a real state (§3.2), naming the field; None
    when they can. The checksum is unkeyed (§0): a forged copy passes it."""
    if data_size < DATA_SIZE_MIN or data_size % BLOCK:
        return f"data_size {data_size}: not a multiple of {BLOCK} of at least {DATA_SIZE_MIN}"
    if partition_size < DATA_START + data_size:
        return f"partition_size {partition_size} < data_start + data_size {DATA_START + data_size}"
    if head % BLOCK or tail_hint % BLOCK:
        return f"head {head} / tail_hint {tail_hint}: not a multiple of {BLOCK}"
    if head > tail_hint:
        return f"head {head} > tail_hint {tail_hint}"
    if tail_hint - head > data_size:
        return f"tail_hint {tail_hint} - head {head} > data_size {data_size}"
    if tail_hint + data_size >= POSITION_MAX:
        return f"tail_hint {tail_hint}: no room left for positions (limit {POSITION_MAX})"
    if generation >= GENERATION_MAX:
        return f"generation {generation} >= {GENERATION_MAX}"
    if epoch > EPOCH_MAX:
        return f"epoch {epoch} > {EPOCH_MAX}: no room left to open it again"
    if commit_max < entry_stride(FRAME_LEN_MAX):
        return f"commit_bytes_max {commit_max} < the largest entry ({entry_stride(FRAME_LEN_MAX)} bytes)"
    return None


@dataclass(frozen=True, slots=True)
class EntryHeader:
    kind: int
    pos: int
    commit_pos: int
    epoch: int
    body_len: int
    body_xxh3: int


def pack_entry_header(kind: int, pos: int, commit_pos: int, epoch: int, body_len: int,
                      body_xxh3: int, uuid: bytes) -> bytes:
    raw = bytearray(
        _ENTRY.pack(ENTRY_MAGIC, ENTRY_VERSION, kind, pos, commit_pos, epoch, body_len,
                    body_xxh3, uuid, 0)
    )
    struct.pack_into("<Q", raw, _ENTRY_SUMMED, xxhash.xxh3_64_intdigest(raw[:_ENTRY_SUMMED]))
    return bytes(raw)


def unpack_entry_header(
    raw: bytes | memoryview, pos: int, uuid: bytes, body_len_max: int
) -> EntryHeader | str:
    """The entry header at logical ``pos``, or why it is not one (§3.3, header checks only).

    Checks magic, version, kind, ``header_xxh3``, the partition ``uuid`` (an entry of an
    earlier format carries another one), that the entry claims to be at ``pos`` (a stale
    entry of an earlier lap claims another position), ``commit_pos <= pos`` and the body
    length bound. Epoch, ring fit and body checksum are
    the caller's, who knows the context.
    """
    if len(raw) < ENTRY_HEADER_SIZE:
        return "short read"
    (magic, version, kind, epos, commit_pos, epoch, body_len, body_xxh3,
     entry_uuid, summed) = _ENTRY.unpack_from(raw)
    if magic != ENTRY_MAGIC:
        return "no entry magic"
    if version != ENTRY_VERSION:
        return f"entry version {version}, expected {ENTRY_VERSION}"
    if xxhash.xxh3_64_intdigest(bytes(raw[:_ENTRY_SUMMED])) != summed:
        return "entry header checksum mismatch"
    if entry_uuid != uuid:
        return "entry of another partition format (uuid differs)"
    if epos != pos:
        return f"entry claims position {epos} (stale entry of another lap)"
    if kind not in (KIND_DATA, KIND_PAD):
        return f"unknown entry kind {kind}"
    if commit_pos > pos:
        return f"inconsistent entry header (commit_pos {commit_pos})"
    if body_len > body_len_max or (kind == KIND_PAD and body_len):
        return f"entry body_len {body_len} out of bounds"
    return EntryHeader(kind, epos, commit_pos, epoch, body_len, body_xxh3)
