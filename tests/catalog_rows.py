"""Catalog rows for tests: the ``add_segments`` columns of FORMAT.md §8.2."""

from __future__ import annotations

from cdp.catalog_page import ROW_FIELDS


def segment_rows(*rows: dict) -> dict[str, list[int]]:
    """``add_segments`` columns for segments given as dicts with ``first_seq``,
    ``last_seq``, ``first_ts``, ``last_ts``, ``size``, ``payload_raw_len`` and optionally
    ``timeline`` (default 1) and ``object_last_seq`` (default ``last_seq``)."""
    cols: dict[str, list[int]] = {name: [] for name in ROW_FIELDS}
    for r in rows:
        full = {"timeline": 1, "object_last_seq": r["last_seq"], **r}
        for name in ROW_FIELDS:
            cols[name].append(full[name])
    return cols
