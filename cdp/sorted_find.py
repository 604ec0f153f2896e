"""Finding a column of values among a few keys, with numpy: which disk of the catalog a
record names, which timeline of a lineage a row is of — for every record or row at
once, not one lookup each."""

from __future__ import annotations

import numpy as np


def find_keys(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``values``: the index in ``keys`` (distinct, in any order) of the key
    equal to it, and whether there is one. Where there is none the index is still a
    valid index of ``keys`` (when it has any), so that arrays indexed by it need no
    special case: the caller masks those with the second array."""
    values = np.asarray(values)
    if not len(keys):
        return np.zeros(len(values), np.int64), np.zeros(len(values), bool)
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    at = np.minimum(np.searchsorted(ordered, values.astype(keys.dtype, copy=False)), len(keys) - 1)
    return order[at], ordered[at] == values
