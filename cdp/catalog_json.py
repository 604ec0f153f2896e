"""Checked reading of catalog JSON (FORMAT.md §8.2): every value's type and range, and
the exact keys of every object (an unknown key means a newer writer, §0).

Each function takes ``what`` (the field's path, for the message) and ``where`` (the
object), and raises ``FormatError`` naming both; the segment and page columns are
checked per column (numpy), not per value.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from cdp.catalog_page import REF_DTYPE, REF_FIELDS, ROW_DTYPE, ROW_FIELDS
from cdp.errors import FormatError
from cdp.layout import U32_MAX, U64_MAX, base_manifest_key
from cdp.units import SECTOR

WINDOW_KINDS = ("seeding", "resync")
#: §8.2: "seed": the disk joined with this content (nothing before it is known);
#: "consolidation": derived from the domain's own records (earlier points stay as they were).
BASE_ORIGINS = ("seed", "consolidation")
MARK_NAME_BYTES_MAX = 255  # §1
WRITER_BY_CHARS_MAX = 200  # §8.1
OWNER_CHARS_MAX = 200  # §8.5
DISK_SIZE_MAX = 1 << 62  # §1: offset + length never exceeds 2^62
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX16 = re.compile(r"[0-9a-f]{16}")


def check_int(value: Any, what: str, where: str, limit: int = U64_MAX) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise FormatError(f"{where}: {what} is {value!r}, expected an integer in 0..{limit}")
    return value


def check_str(value: Any, what: str, where: str, chars_max: int | None = None) -> str:
    if not isinstance(value, str) or (chars_max is not None and not 1 <= len(value) <= chars_max):
        size = "" if chars_max is None else f" of 1..{chars_max} characters"
        raise FormatError(f"{where}: {what} is {value!r}, expected a string{size}")
    return value


def check_list(value: Any, what: str, where: str) -> list:
    if not isinstance(value, list):
        raise FormatError(f"{where}: {what} is not a list")
    return value


def check_obj(value: Any, keys: frozenset[str] | set[str], what: str, where: str,
              optional: frozenset[str] = frozenset()) -> dict:
    """A JSON object with exactly ``keys``, and any of ``optional`` (keys added after the
    layout's first writers, absent from what they wrote): an unknown key means a newer
    writer (§0)."""
    if not isinstance(value, dict) or not set(keys) <= set(value) <= set(keys) | optional:
        got = sorted(value) if isinstance(value, dict) else type(value).__name__
        extra = f" (optional: {sorted(optional)})" if optional else ""
        raise FormatError(f"{where}: {what} has keys {got}, expected {sorted(keys)}{extra}")
    return value


def check_writer(value: Any, where: str) -> dict:
    w = check_obj(value, {"id", "by"}, "writer", where)
    if not isinstance(w["id"], str) or not _HEX32.fullmatch(w["id"]):
        raise FormatError(f"{where}: writer.id is {w['id']!r}, expected 32 lower-case hex digits")
    return {"id": w["id"], "by": check_str(w["by"], "writer.by", where, WRITER_BY_CHARS_MAX)}


def check_disk_size(value: Any, field: str, where: str) -> int:
    """A disk's size: whole sectors, 512 .. 2^62 bytes (§1: no record reaches past 2^62)."""
    size = check_int(value, field, where, DISK_SIZE_MAX)
    if size < SECTOR or size % SECTOR:
        raise FormatError(f"{where}: {field} is {size}, expected a multiple of {SECTOR} in {SECTOR}..{DISK_SIZE_MAX}")
    return size


def check_disks(value: Any, where: str) -> list[dict]:
    out = []
    for i, d in enumerate(check_list(value, "disks", where)):
        d = check_obj(d, {"disk", "vm", "name", "size"}, f"disks[{i}]", where)
        out.append({"disk": check_int(d["disk"], f"disks[{i}].disk", where, U32_MAX),
                    "vm": check_str(d["vm"], f"disks[{i}].vm", where),
                    "name": check_str(d["name"], f"disks[{i}].name", where),
                    "size": check_disk_size(d["size"], f"disks[{i}].size", where)})
    if len({d["disk"] for d in out}) != len(out):
        raise FormatError(f"{where}: disks lists a disk index twice")
    return out


def check_base(b: Any, what: str, domain: int, where: str) -> dict:
    b = check_obj(b, {"timeline", "seq", "disk", "key", "origin"}, what, where)
    timeline = check_int(b["timeline"], f"{what}.timeline", where, U32_MAX)
    seq = check_int(b["seq"], f"{what}.seq", where)
    disk = check_int(b["disk"], f"{what}.disk", where, U32_MAX)
    # A seed's base has a key of its own (§6.2); one an older DRVA committed has the plain one.
    keys = {base_manifest_key(domain, timeline, seq, disk)} if timeline >= 1 else set()
    if timeline >= 1 and b["origin"] == "seed":
        keys.add(base_manifest_key(domain, timeline, seq, disk, seed=True))
    if b["key"] not in keys:
        raise FormatError(f"{where}: {what}.key {b['key']!r} is not the key of timeline {timeline}, "
                          f"seq {seq}, disk {disk}")
    if b["origin"] not in BASE_ORIGINS:
        raise FormatError(f"{where}: {what}.origin {b['origin']!r} not in {BASE_ORIGINS}")
    return {"timeline": timeline, "seq": seq, "disk": disk, "key": b["key"], "origin": b["origin"]}


def check_marks(value: Any, after_seq: int, what: str, where: str) -> list[dict]:
    out = []
    for i, m in enumerate(check_list(value, what, where)):
        m = check_obj(m, {"name", "seq", "ts"}, f"{what}[{i}]", where)
        name = check_str(m["name"], f"{what}[{i}].name", where)
        if not 1 <= len(name.encode("utf-8", "surrogatepass")) <= MARK_NAME_BYTES_MAX:
            raise FormatError(f"{where}: {what}[{i}].name is not 1..{MARK_NAME_BYTES_MAX} UTF-8 bytes")
        seq = check_int(m["seq"], f"{what}[{i}].seq", where)
        if seq <= after_seq:
            raise FormatError(f"{where}: {what}[{i}].seq {seq} is not after the previous mark's {after_seq}")
        out.append({"name": name, "seq": seq, "ts": check_int(m["ts"], f"{what}[{i}].ts", where)})
        after_seq = seq
    return out


def check_windows(value: Any, what: str, where: str) -> list[dict]:
    out = []
    for i, w in enumerate(check_list(value, what, where)):
        w = check_obj(w, {"kind", "first_seq", "last_seq"}, f"{what}[{i}]", where)
        if w["kind"] not in WINDOW_KINDS:
            raise FormatError(f"{where}: {what}[{i}].kind {w['kind']!r} not in {WINDOW_KINDS}")
        first = check_int(w["first_seq"], f"{what}[{i}].first_seq", where)
        last = w["last_seq"]
        if last is not None and check_int(last, f"{what}[{i}].last_seq", where) < first:
            raise FormatError(f"{where}: {what}[{i}] ends before it starts")
        out.append({"kind": w["kind"], "first_seq": first, "last_seq": last})
    return out


def _u64_column(col: list, what: str, where: str) -> np.ndarray:
    """A list of integers as a u64 array; checked in bulk, blamed one by one."""
    try:
        if all(type(v) is int for v in col):  # not bool, not float
            return np.array(col, dtype=np.uint64)
    except OverflowError:
        pass
    for i, v in enumerate(col):
        check_int(v, f"{what}[{i}]", where)
    raise AssertionError("unreachable: some value failed the bulk check")


def _columns(value: Any, fields: tuple[str, ...], dtype: np.dtype, what: str, where: str,
             hex_fields: tuple[str, ...] = ()) -> np.ndarray:
    cols = check_obj(value, set(fields), what, where)
    lengths = {len(check_list(cols[name], f"{what}.{name}", where)) for name in fields}
    if len(lengths) != 1:
        raise FormatError(f"{where}: the columns of {what} differ in length")
    out = np.zeros(lengths.pop(), dtype=dtype)
    for name in fields:
        if name in hex_fields:
            values = cols[name]
            bad = next((i for i, v in enumerate(values) if not (isinstance(v, str) and _HEX16.fullmatch(v))), None)
            if bad is not None:
                raise FormatError(f"{where}: {what}.{name}[{bad}] is {values[bad]!r}, expected 16 hex digits")
            out[name] = np.array([int(v, 16) for v in values], dtype=np.uint64)
        else:
            out[name] = _u64_column(cols[name], f"{what}.{name}", where)
    return out


def check_rows(value: Any, what: str, where: str) -> np.ndarray:
    """Segment rows given as columns (§8.2 ``tail``, ``add_segments``): a ``ROW_DTYPE`` array."""
    return _columns(value, ROW_FIELDS, ROW_DTYPE, what, where)


def check_refs(value: Any, what: str, where: str) -> np.ndarray:
    """Page references given as columns (§8.2 ``pages``, ``add_pages``): a ``REF_DTYPE`` array."""
    return _columns(value, REF_FIELDS, REF_DTYPE, what, where, hex_fields=("hash",))


def rows_json(rows: np.ndarray) -> dict[str, list]:
    return {name: rows[name].tolist() for name in ROW_FIELDS}


def refs_json(refs: np.ndarray) -> dict[str, list]:
    out: dict[str, list] = {name: refs[name].tolist() for name in REF_FIELDS if name != "hash"}
    out["hash"] = [f"{h:016x}" for h in refs["hash"].tolist()]
    return out
