"""Write records as numpy structured arrays (docs/FORMAT.md §1, §2.2).

A batch of records is one ``RECORD_DTYPE`` array, never a list of Python objects: the
record table of a frame *is* such an array, viewed in place over the received bytes.
``check_records`` holds the per-kind rules of §1, vectorised, so the frame and segment
codecs share one definition of a valid record. A DRVA adds checks before it logs a
frame (FORMAT.md §9.2): ``check_mark_names`` (MARK names are strict UTF-8, §1, with no
control character), ``check_disk_bounds`` (records inside the domain's disks) and
``check_special_counts`` (at most ``MARKS_PER_FRAME_MAX`` MARK records and
``RESYNC_RUNS_PER_FRAME_MAX`` runs of RESYNC records in a frame).
"""

from __future__ import annotations

import re

import numpy as np

from cdp.errors import FormatError
from cdp.units import SECTOR

WRITE_LEN_MAX = 16 << 20  # §1: one write is at most 16 MiB
MARK_NAME_MAX = 255  # §1: a mark's name is 1..255 UTF-8 bytes
# §9.2: what a DRVA refuses in a MARK name (``check_mark_names``): the C0 and C1 control
# characters and DEL. A name holding one cannot be typed as `--mark NAME` (a NUL cannot
# be passed at all) and prints as something else in a terminal or a log.
MARK_NAME_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
OFFSET_END_MAX = 1 << 62  # §1: offset + length must not exceed 2**62
#: §9.2: the most MARK records a DRVA takes in one frame. A filter places a mark when an
#: operator or a schedule asks (the simulator puts each in a frame of its own); a few
#: schedules firing at once fit. Each MARK becomes a mark in the catalog head and, until
#: its segment is committed, a tuple in the DRVA's memory (~180 bytes, beside a log
#: entry of at least 4 KiB): a frame of 65,536 one-byte MARK records was 2.7 MB of log
#: and ~12 MB of memory, and the catalog head grew without a bound (FORMAT.md §8.2,
#: ``MARKS_MAX``).
MARKS_PER_FRAME_MAX = 8
#: §9.2: the most runs of RESYNC records a DRVA takes in one frame; a run is the
#: RESYNC_BEGIN and RESYNC_END records of one kind that follow each other in the frame
#: (other records between them do not end it). Each run but a repeat of the state opens
#: or closes a resync window of the catalog: a filter enters a resync, and leaves it once
#: the dirty regions are sent, so a frame holds one or two runs — a frame of thousands of
#: RESYNC_BEGIN records (the simulator's filler for frames its spill journal lost) is one.
#: 60,000 records alternating BEGIN and END opened 30,000 windows in one commit.
RESYNC_RUNS_PER_FRAME_MAX = 8

KIND_WRITE = 0
KIND_ZERO = 1
KIND_MARK = 2
KIND_RESYNC_BEGIN = 3
KIND_RESYNC_END = 4
KIND_MAX = KIND_RESYNC_END
KIND_NAMES = ("WRITE", "ZERO", "MARK", "RESYNC_BEGIN", "RESYNC_END")

# FORMAT.md §2.2: record table entry, 40 bytes.
RECORD_DTYPE = np.dtype(
    [
        ("seq", "<u8"),
        ("timestamp_ns", "<u8"),
        ("offset", "<u8"),
        ("length", "<u4"),
        ("disk", "<u4"),
        ("kind", "<u2"),
        ("reserved", "V6"),
    ]
)
assert RECORD_DTYPE.itemsize == 40, "FORMAT.md §2.2"


def empty_records(count: int) -> np.ndarray:
    """A zeroed record array of ``count`` entries (reserved bytes already zero)."""
    return np.zeros(count, dtype=RECORD_DTYPE)


def payload_lengths(records: np.ndarray) -> np.ndarray:
    """Bytes of payload each record carries in a frame (``WRITE`` and ``MARK`` only)."""
    kind = records["kind"]
    carries = (kind == KIND_WRITE) | (kind == KIND_MARK)
    return np.where(carries, records["length"], 0).astype(np.uint64)


def payload_starts(lengths: np.ndarray) -> np.ndarray:
    """Start of each record's payload in the concatenated payload, from its lengths."""
    starts = np.empty(len(lengths), dtype=np.uint64)
    if len(lengths):
        starts[0] = 0
        np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def _first_bad(bad: np.ndarray, records: np.ndarray, what: str, where: str) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        r = records[i]
        raise FormatError(
            f"{where}: record {i} (seq {int(r['seq'])}, kind {int(r['kind'])}, "
            f"offset {int(r['offset'])}, length {int(r['length'])}): {what}"
        )


def check_records(records: np.ndarray, first_seq: int, where: str) -> None:
    """Raise FormatError naming the first record that breaks FORMAT.md §1/§2.3 rule 7.

    Checks, vectorised: consecutive seqs from ``first_seq``, non-decreasing timestamps,
    known kinds, zero reserved bytes, and the offset/length rules of each kind.
    """
    n = len(records)
    if n == 0:
        return
    seq = records["seq"]
    expected = np.arange(first_seq, first_seq + n, dtype=np.uint64)
    _first_bad(seq != expected, records, f"seq is not consecutive from {first_seq}", where)
    ts = records["timestamp_ns"]
    if n > 1:
        back = np.zeros(n, dtype=bool)
        back[1:] = ts[1:] < ts[:-1]
        _first_bad(back, records, "timestamp_ns goes backwards", where)
    kind = records["kind"]
    _first_bad(kind > KIND_MAX, records, f"unknown kind (expected 0..{KIND_MAX})", where)
    reserved = records.view(np.uint8).reshape(n, RECORD_DTYPE.itemsize)[:, 34:]
    _first_bad(reserved.any(axis=1), records, "reserved bytes are not zero", where)

    offset = records["offset"]
    length = records["length"].astype(np.uint64)
    is_data = kind <= KIND_ZERO
    bad_align = is_data & (((offset | length) % SECTOR) != 0)
    _first_bad(bad_align, records, "offset/length not a multiple of 512", where)
    bad_len = is_data & ((length == 0) | (length > WRITE_LEN_MAX))
    _first_bad(bad_len, records, f"length not in 512..{WRITE_LEN_MAX}", where)
    bad_end = is_data & (offset > np.uint64(OFFSET_END_MAX) - length)
    _first_bad(bad_end, records, "offset + length exceeds 2**62", where)

    is_mark = kind == KIND_MARK
    bad_mark = is_mark & (
        (offset != 0) | (records["disk"] != 0) | (length == 0) | (length > MARK_NAME_MAX)
    )
    _first_bad(bad_mark, records, f"MARK needs offset 0, disk 0, length 1..{MARK_NAME_MAX}", where)
    is_resync = kind >= KIND_RESYNC_BEGIN
    bad_resync = is_resync & ((offset != 0) | (length != 0))
    _first_bad(bad_resync, records, "RESYNC_BEGIN/END need offset 0 and length 0", where)


def _payload_bytes(records: np.ndarray, payload: memoryview, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The payload bytes of the ``chosen`` records, concatenated (one numpy gather), and
    where each chosen record's bytes start in that concatenation."""
    lengths = payload_lengths(records)
    starts = payload_starts(lengths)[chosen].astype(np.int64)
    sizes = lengths[chosen].astype(np.int64)
    at = payload_starts(sizes.astype(np.uint64)).astype(np.int64)
    index = np.repeat(starts - at, sizes) + np.arange(int(sizes.sum()), dtype=np.int64)
    return np.frombuffer(payload, dtype=np.uint8)[index], at


def check_mark_names(records: np.ndarray, payload: bytes | bytearray | memoryview, where: str, *,
                     controls: bool = True) -> None:
    """Raise FormatError naming the first MARK whose name is not strict UTF-8 (§1), or
    (unless ``controls`` is False) holds a control character (``MARK_NAME_CONTROL``).

    One decode for all the marks of a frame, not one per mark: the names are gathered
    into one buffer, which must decode, and each name must start on a character (its
    first byte is no continuation byte 0x80..0xBF) — a valid buffer cut only at character
    starts is valid in every piece; one search of the decoded buffer finds a control
    character. Lengths (1..255, so never empty) are ``check_records``' business.
    """
    is_mark = records["kind"] == KIND_MARK
    if not is_mark.any():  # nearly every frame: one pass over the kinds
        return
    marks = np.flatnonzero(is_mark)
    names, at = _payload_bytes(records, memoryview(payload).cast("B"), marks)
    first = names[at]
    bad = np.zeros(len(records), dtype=bool)
    bad[marks] = (first >= 0x80) & (first <= 0xBF)
    _first_bad(bad, records, "MARK name does not start with a UTF-8 character", where)
    ends = at + records["length"][marks].astype(np.int64)
    try:
        text = names.tobytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        bad[marks] = (at <= exc.start) & (exc.start < ends)
        _first_bad(bad, records, f"MARK name is not UTF-8 ({exc.reason})", where)
        raise FormatError(f"{where}: a MARK name is not UTF-8 ({exc.reason})") from None
    found = MARK_NAME_CONTROL.search(text) if controls else None
    if found is not None:
        byte = len(text[: found.start()].encode("utf-8"))  # where it is in ``names``
        bad[marks] = (at <= byte) & (byte < ends)
        _first_bad(bad, records, f"MARK name holds a control character (U+{ord(found.group()):04X})", where)


def check_special_counts(records: np.ndarray, where: str) -> None:
    """Raise FormatError when a frame holds more than ``MARKS_PER_FRAME_MAX`` MARK
    records or more than ``RESYNC_RUNS_PER_FRAME_MAX`` runs of RESYNC records (§9.2),
    naming the count, the bound and the record past it. Vectorised; nearly every frame
    costs one pass over its kinds."""
    kind = records["kind"]
    special = kind >= KIND_MARK
    if not special.any():
        return
    marks = np.flatnonzero(kind == KIND_MARK)
    if len(marks) > MARKS_PER_FRAME_MAX:
        bad = np.zeros(len(records), dtype=bool)
        bad[marks[MARKS_PER_FRAME_MAX]] = True
        _first_bad(bad, records, f"the frame holds {len(marks)} MARK records, more than the "
                                 f"{MARKS_PER_FRAME_MAX} a DRVA takes in one frame", where)
    resync = np.flatnonzero(kind >= KIND_RESYNC_BEGIN)
    if len(resync) > RESYNC_RUNS_PER_FRAME_MAX:
        kinds = kind[resync]
        starts = np.flatnonzero(np.concatenate(([True], kinds[1:] != kinds[:-1])))
        if len(starts) > RESYNC_RUNS_PER_FRAME_MAX:
            bad = np.zeros(len(records), dtype=bool)
            bad[resync[starts[RESYNC_RUNS_PER_FRAME_MAX]]] = True
            _first_bad(bad, records, f"the frame holds {len(starts)} runs of RESYNC_BEGIN/RESYNC_END records "
                                     f"(each switches the resync state), more than the "
                                     f"{RESYNC_RUNS_PER_FRAME_MAX} a DRVA takes in one frame", where)


def check_disk_bounds(records: np.ndarray, disk_sizes: np.ndarray, where: str) -> None:
    """Raise FormatError naming the first WRITE or ZERO record on a disk index the domain
    does not have, or ending past its disk's end (``disk_sizes[disk]`` bytes).

    Vectorised. ``check_records`` ran first: ``offset + length`` is at most 2**62, so the
    sum cannot wrap."""
    is_data = records["kind"] <= KIND_ZERO
    disk = records["disk"]
    count = len(disk_sizes)
    outside = is_data & (disk >= count)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        _first_bad(outside, records, f"disk {int(disk[i])} is not a disk of the domain (it has disks "
                                     f"0..{count - 1})", where)
    size = disk_sizes[np.minimum(disk, max(count - 1, 0))]
    end = records["offset"] + records["length"].astype(np.uint64)
    past = is_data & (end > size)
    if past.any():
        i = int(np.flatnonzero(past)[0])
        _first_bad(past, records, f"runs past the end of disk {int(disk[i])} ({int(size[i])} bytes)", where)
