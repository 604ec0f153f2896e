"""Payloads of simulated writes: their sizes (``SizeDist``) and their bytes.

Sizes: a ``SizeDist`` is a weighted table of write sizes, multiples of 512 in
512 B .. ``WRITE_SIZE_MAX`` (1 MiB); ``parse_write_size`` reads one from a config value.

Bytes: every payload has the compressibility of real disk data, and is sliced out of a
*pool*: a few MiB made once per process and per style
with numpy, then shared read-only. Slicing costs one memcpy per run of writes, so a
source produces GB/s and never loops over bytes in Python.

Styles, as ``lz4.block.compress`` sees 64 KiB of them:

- ``text``   — words of a made-up language with Zipf frequencies: about 2.6:1.
- ``mixed``  — 512-byte pieces, 60 % text and 40 % random, like a database file or a
  VM's page cache: about 1.5:1.
- ``random`` — uniform bytes (encrypted or already-compressed data): 1:1.

On top of its style, a ``PayloadSource`` makes a share of writes all zeros (a guest
zeroing blocks), which exercises the zero paths of the compressor and the base images.

Pools come from fixed seeds, so they are the same in every process; a source's seed only
picks where in the pool each batch starts. ``trace_payload`` is a pure function of a
write's number, for replaying traces that must come out the same every time.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from cdp.errors import ConfigError
from cdp.units import parse_size  # noqa: F401  (cluster and workloads import it from here)
from cdp.records import SECTOR

WRITE_SIZE_MAX = 1 << 20  # the simulator's largest write (FORMAT.md §1 allows 16 MiB)
KiB = 1 << 10
STYLES = ("text", "mixed", "random")
POOL_BYTES = 8 << 20
# Extra bytes copied after the pool, so a slice of up to this length starting anywhere in
# the pool is one contiguous memoryview (trace payloads of ≤ 1 MiB, the usual case).
POOL_TAIL_BYTES = 1 << 20
_POOL_SEED = 0x5EED_CD9
_MIXED_PIECE_BYTES = 512
_MIXED_TEXT_SHARE = 0.6  # 60 % text pieces: lz4 gets about 1.5:1 (measured)
_TEXT_VOCABULARY = 1024  # with Zipf exponent 1.2: lz4 gets about 2.6:1 (measured)
_TEXT_ZIPF_A = 1.2
class SizeDist:
    """A distribution of write sizes: multiples of 512 in 512 .. WRITE_SIZE_MAX."""

    def __init__(self, sizes: ArrayLike, weights: ArrayLike) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        p = np.asarray(weights, dtype=np.float64)
        assert len(self.sizes) and (self.sizes % SECTOR == 0).all() and (p >= 0).all()
        assert self.sizes.min() >= SECTOR and self.sizes.max() <= WRITE_SIZE_MAX
        self._cdf = np.cumsum(p) / p.sum()
        self.mean = float((self.sizes * p).sum() / p.sum())

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        i = np.searchsorted(self._cdf, rng.random(n), side="right")
        return self.sizes[np.minimum(i, len(self.sizes) - 1)]


# The default mix: mostly 4..64 KiB, a tail up to 1 MiB (guest file systems and databases).
DEFAULT_SIZES = SizeDist(
    [512, 4 * KiB, 8 * KiB, 16 * KiB, 32 * KiB, 64 * KiB, 128 * KiB, 256 * KiB, 512 * KiB, 1 << 20],
    [2, 40, 15, 10, 8, 12, 6, 4, 2, 1],
)
DATABASE_PAGE_SIZES = SizeDist([4 * KiB, 8 * KiB, 16 * KiB], [2, 2, 1])


def _write_size(value: Any, where: str) -> int:
    size = parse_size(value, where)
    if size < SECTOR or size > WRITE_SIZE_MAX or size % SECTOR:
        raise ConfigError(f"{where}: expected a multiple of 512 in 512 .. {WRITE_SIZE_MAX}, "
                          f"got {value!r}")
    return size


def _weighted(table: Mapping[str, Any], where: str) -> SizeDist:
    if not table:
        raise ConfigError(f"{where}: expected at least one size = weight, got an empty table")
    for key, weight in table.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"{where}.{key}: expected a weight > 0, got {weight!r}")
    return SizeDist([_write_size(k, f"{where}.{k}") for k in table], list(table.values()))


def parse_write_size(spec: Any, where: str) -> SizeDist:
    """A ``SizeDist`` from a write_size option.

    ``None``/``"mix"``: the default mix; a size (``"64KiB"``): that size always;
    ``[lo, hi]``: log-uniform between the two; ``{"4KiB" = 3, "64KiB" = 1}``: weighted.
    """
    if isinstance(spec, SizeDist):
        return spec
    if spec is None or spec == "mix":
        return DEFAULT_SIZES
    if isinstance(spec, Mapping):
        return _weighted(spec, where)
    if isinstance(spec, (list, tuple)):
        if len(spec) != 2:
            raise ConfigError(f"{where}: expected [smallest, largest], got {spec!r}")
        lo, hi = _write_size(spec[0], f"{where}[0]"), _write_size(spec[1], f"{where}[1]")
        if lo > hi:
            raise ConfigError(f"{where}: expected smallest <= largest, got {spec!r}")
        sizes = np.arange(lo, hi + 1, SECTOR)
        return SizeDist(sizes, 1.0 / sizes)  # density ∝ 1/size: uniform in log(size)
    return SizeDist([_write_size(spec, where)], [1.0])


def _text_pool(nbytes: int, rng: np.random.Generator) -> np.ndarray:
    """Words of 2..11 letters plus a space, drawn with Zipf frequencies from a vocabulary."""
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", np.uint8)
    letter_cdf = np.cumsum(1.0 / np.arange(1, 27) ** 0.9)
    letter_cdf /= letter_cdf[-1]
    width = 12  # longest word (11 letters) plus its space
    word_len = rng.integers(2, width, _TEXT_VOCABULARY)
    vocab = letters[np.searchsorted(letter_cdf, rng.random((_TEXT_VOCABULARY, width)))]
    vocab[np.arange(_TEXT_VOCABULARY), word_len] = ord(" ")
    word_cdf = np.cumsum(1.0 / np.arange(1, _TEXT_VOCABULARY + 1) ** _TEXT_ZIPF_A)
    word_cdf /= word_cdf[-1]
    # Words average > 4 bytes with their space, so nbytes // 4 words are enough.
    picks = np.searchsorted(word_cdf, rng.random(nbytes // 4 + 1))
    keep = np.arange(width)[None, :] <= word_len[picks][:, None]
    return vocab[picks][keep][:nbytes]


@functools.cache
def _pool(style: str) -> bytes:
    """The pool of ``style``, ``POOL_BYTES`` long, followed by its first ``POOL_TAIL_BYTES``."""
    if style not in STYLES:
        raise ValueError(f"payload style {style!r}: expected one of {', '.join(STYLES)}")
    rng = np.random.default_rng([_POOL_SEED, STYLES.index(style)])
    if style == "random":
        pool = rng.integers(0, 256, POOL_BYTES, dtype=np.uint8)
    else:
        pool = _text_pool(POOL_BYTES, rng)
        if style == "mixed":
            pieces = POOL_BYTES // _MIXED_PIECE_BYTES
            noise = rng.integers(0, 256, POOL_BYTES, dtype=np.uint8)
            is_text = np.repeat(rng.random(pieces) < _MIXED_TEXT_SHARE, _MIXED_PIECE_BYTES)
            pool = np.where(is_text, pool, noise)
    return pool.tobytes() + pool[:POOL_TAIL_BYTES].tobytes()


def _cyclic(style: str, start: int, length: int) -> memoryview | bytes:
    """``length`` bytes of the pool read cyclically from ``start`` (0 <= start < POOL_BYTES)."""
    pool = memoryview(_pool(style))
    if start + length <= len(pool):
        return pool[start : start + length]
    parts = []
    while length > 0:
        take = min(length, POOL_BYTES - start)
        parts.append(pool[start : start + take])
        length -= take
        start = 0
    return b"".join(parts)


class PayloadSource:
    """Payload bytes of one style for batches of writes, deterministic for a seed.

    ``batch(lengths)`` returns the concatenated payloads of a batch (the frame layout).
    Each write is all zeros with probability ``zero_share``; the others are consecutive
    pool bytes from a random start, so a run of non-zero writes is one or two slices.
    """

    def __init__(self, style: str = "text", *, seed: int = 0, zero_share: float = 0.02) -> None:
        if style not in STYLES:
            raise ValueError(f"payload style {style!r}: expected one of {', '.join(STYLES)}")
        if not 0.0 <= zero_share <= 1.0:
            raise ValueError(f"payload zero_share {zero_share!r}: expected 0.0 .. 1.0")
        self.style = style
        self.zero_share = zero_share
        self._rng = np.random.default_rng([seed, 0xDA7A])
        _pool(style)  # build the pool now, not inside the first batch

    def _span(self, nbytes: int) -> list[memoryview | bytes]:
        """``nbytes`` of pool data; each pass over the pool starts somewhere new."""
        parts: list[memoryview | bytes] = []
        while nbytes > 0:
            # Start in the first half so that each slice is at least half a pool long.
            start = int(self._rng.integers(0, POOL_BYTES // 2)) & ~7
            take = min(nbytes, POOL_BYTES - start)
            parts.append(_cyclic(self.style, start, take))
            nbytes -= take
        return parts

    def batch(self, lengths: np.ndarray) -> bytes:
        """The payloads of writes of these lengths, concatenated in order."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(lengths) == 0:
            return b""
        zero = self._rng.random(len(lengths)) < self.zero_share
        # Runs of writes that are all zero or all data: one Python step per run.
        cuts = np.flatnonzero(zero[1:] != zero[:-1]) + 1
        bounds = np.concatenate(([0], cuts, [len(lengths)]))
        ends = np.concatenate(([0], np.cumsum(lengths)))
        parts: list[memoryview | bytes] = []
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            nbytes = int(ends[hi] - ends[lo])
            parts.extend([bytes(nbytes)] if zero[lo] else self._span(nbytes))
        return b"".join(parts)

    def take(self, length: int) -> bytes:
        """The payload of one write."""
        return self.batch(np.array([length]))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread u64 for each input."""
    x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def trace_starts(seqs: np.ndarray) -> np.ndarray:
    """Where in the pool the payload of each write number starts (8-byte aligned)."""
    return (_mix64(np.asarray(seqs)) % np.uint64(POOL_BYTES)) & ~np.uint64(7)


def trace_payload(seq: int, length: int, style: str = "text") -> bytes:
    """The payload of write number ``seq`` of a replayed trace: a pure function of (seq, length).

    A prefix or a slice of it is what ``trace_payloads`` returns for a piece of that write.
    """
    return bytes(_cyclic(style, int(trace_starts(np.array([seq]))[0]), length))


def trace_payloads(
    seqs: np.ndarray, piece_offsets: np.ndarray, lengths: np.ndarray, style: str = "text"
) -> bytes:
    """Concatenated pieces: piece i is ``trace_payload(seqs[i], n)[o : o + lengths[i]]``
    where ``o = piece_offsets[i]`` (for any n >= o + lengths[i]).

    One slice per write (a trace is paced by its own timestamps, rarely by this loop).
    """
    starts = (trace_starts(seqs) + np.asarray(piece_offsets, dtype=np.uint64)) % np.uint64(
        POOL_BYTES
    )
    return b"".join(
        [_cyclic(style, s, n) for s, n in zip(starts.tolist(), np.asarray(lengths).tolist())]
    )
