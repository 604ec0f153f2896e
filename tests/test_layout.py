"""Object keys (docs/FORMAT.md §7): format∘parse is the identity, listing order is numeric."""

from __future__ import annotations

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from cdp.errors import FormatError
from cdp.layout import (
    base_manifest_key, base_prefix, catalog_key, catalog_prefix, chunk_key, domain_prefix,
    page_key, page_prefix, parse_base_manifest_key, parse_catalog_key, parse_chunk_key, parse_page_key,
    parse_segment_key, segment_key, segment_prefix,
)
from cdp.store.keys import is_valid_key

u32 = st.integers(0, (1 << 32) - 1)
u64 = st.integers(0, (1 << 64) - 1)
seq_ranges = st.tuples(u64, u64).map(sorted)


@given(u32, u32, seq_ranges)
def test_segment_key_round_trip(domain, timeline, seqs) -> None:
    key = segment_key(domain, timeline, *seqs)
    assert parse_segment_key(key) == (domain, timeline, *seqs)
    assert key.startswith(segment_prefix(domain, timeline)) and key.startswith(segment_prefix(domain))
    assert key.startswith(domain_prefix(domain)) and is_valid_key(key)


@given(u32, seq_ranges, st.integers(0, 255), u64)
def test_page_key_round_trip(domain, seqs, level, h) -> None:
    key = page_key(domain, *seqs, level, h)
    assert parse_page_key(key) == (domain, *seqs, level, h)
    assert key.startswith(page_prefix(domain)) and is_valid_key(key)


@given(u32, st.integers(1, (1 << 64) - 1))
def test_catalog_key_round_trip(domain, generation) -> None:
    key = catalog_key(domain, generation)
    assert parse_catalog_key(key) == (domain, generation)
    assert key.startswith(catalog_prefix(domain)) and is_valid_key(key)


@given(u32, u32, u64, u32, st.booleans())
def test_base_manifest_key_round_trip(domain, timeline, seq, disk, seed) -> None:
    key = base_manifest_key(domain, timeline, seq, disk, seed=seed)
    assert parse_base_manifest_key(key) == (domain, timeline, seq, disk)
    assert key.startswith(base_prefix(domain)) and is_valid_key(key)
    # A seed's manifest never shares a key with a consolidation's base at the same seq.
    assert (key == base_manifest_key(domain, timeline, seq, disk)) is not seed


def test_a_base_key_is_checked_against_its_origin() -> None:
    from cdp.catalog_json import check_base

    plain, seeded = base_manifest_key(7, 1, 40, 0), base_manifest_key(7, 1, 40, 0, seed=True)
    base = {"timeline": 1, "seq": 40, "disk": 0}
    assert check_base({**base, "key": seeded, "origin": "seed"}, "b", 7, "here")["key"] == seeded
    assert check_base({**base, "key": plain, "origin": "seed"}, "b", 7, "here")["key"] == plain  # an older DRVA's
    with pytest.raises(FormatError, match="is not the key of timeline 1, seq 40, disk 0"):
        check_base({**base, "key": seeded, "origin": "consolidation"}, "b", 7, "here")


@given(st.binary(min_size=16, max_size=16))
def test_chunk_key_round_trip(h) -> None:
    key = chunk_key(h)
    assert parse_chunk_key(key) == h and is_valid_key(key)


def test_chunk_key_is_the_hexdigest_of_the_content() -> None:
    raw = b"some chunk content"
    stored = xxhash.xxh3_128_intdigest(raw).to_bytes(16, "little")  # §0
    name = xxhash.xxh3_128_hexdigest(raw)
    assert chunk_key(stored) == f"c/{name[:2]}/{name}.chk"


@given(st.lists(st.tuples(u32, u32, seq_ranges), min_size=2, max_size=20))
def test_segment_keys_sort_in_numeric_order(items) -> None:
    keys = [segment_key(d, t, *s) for d, t, s in items]
    assert sorted(keys) == [segment_key(d, t, *s) for d, t, s in sorted((d, t, tuple(s)) for d, t, s in items)]


@given(st.lists(st.tuples(seq_ranges, st.integers(0, 255), u64), min_size=2, max_size=20))
def test_page_keys_sort_by_first_seq(items) -> None:
    keys = [page_key(7, *s, lv, h) for s, lv, h in items]
    assert sorted(keys) == [page_key(7, *s, lv, h) for s, lv, h in sorted((tuple(s), lv, h) for s, lv, h in items)]


@given(u32, st.lists(st.integers(1, (1 << 64) - 1), min_size=2, max_size=20))
def test_catalog_keys_sort_in_generation_order(domain, gens) -> None:
    assert sorted(catalog_key(domain, g) for g in gens) == [catalog_key(domain, g) for g in sorted(gens)]


@given(st.lists(st.tuples(u32, u32, u64, u32), min_size=2, max_size=20))
def test_manifest_keys_sort_in_numeric_order(items) -> None:
    assert sorted(base_manifest_key(*t) for t in items) == [base_manifest_key(*t) for t in sorted(items)]


@given(st.lists(st.binary(min_size=16, max_size=16), min_size=2, max_size=20))
def test_chunk_keys_sort_by_value(hashes) -> None:
    by_value = sorted(hashes, key=lambda h: int.from_bytes(h, "little"))
    assert sorted(chunk_key(h) for h in hashes) == [chunk_key(h) for h in by_value]


@pytest.mark.parametrize(
    "parse,key",
    [
        (parse_segment_key, "d/00000007/seg/00000001/0000000000000001-00000000000003E8.seg"),  # upper case
        (parse_segment_key, "d/00000007/seg/00000001/1-3e8.seg"),  # not fixed width
        (parse_segment_key, "d/00000007/seg/00000001/00000000000003e8-0000000000000001.seg"),  # last < first
        (parse_segment_key, "d/00000007/seg/00000001/0000000000000001-00000000000003e8.seg\n"),
        (parse_segment_key, "d/0000007/seg/00000001/0000000000000001-00000000000003e8.seg"),
        (parse_segment_key, "x/00000007/seg/00000001/0000000000000001-00000000000003e8.seg"),
        (parse_segment_key, "d/00000007/seg/00000001/0000000000000001-00000000000003e8.cat"),
        (parse_segment_key, "d/00000007/seg/0000000000000001-00000000000003e8.seg"),  # version 1: no timeline
        (parse_segment_key, None),
        (parse_page_key, "d/00000007/page/0000000000000001-0000000000000100-00-00000000000000zz.pg"),
        (parse_page_key, "d/00000007/page/0000000000000100-0000000000000001-00-0000000000000000.pg"),
        (parse_page_key, "d/00000007/page/0000000000000001-0000000000000100-0-0000000000000000.pg"),
        (parse_catalog_key, "d/00000007/cat/0000000000000000.cat"),  # generation 0
        (parse_catalog_key, "d/00000007/cat/000000000000001.cat"),
        (parse_catalog_key, "d/00000007/cat/+000000000000001.cat"),
        (parse_base_manifest_key, "d/00000007/base/00000001/0000000000000000/0000000.bmf"),
        (parse_base_manifest_key, "d/00000007/base/00000001/000000000000000g/00000000.bmf"),
        (parse_base_manifest_key, "d/00000007/base/0000000000000000/00000000.bmf"),  # version 1: no timeline
        (parse_chunk_key, "c/ab/cd" + "0" * 30 + ".chk"),  # fan-out dir is not the prefix
        (parse_chunk_key, "c/ab/ab" + "0" * 29 + ".chk"),
    ],
)
def test_parsers_refuse_everything_else(parse, key) -> None:
    with pytest.raises(FormatError) as err:
        parse(key)
    assert repr(key) in str(err.value)


def test_formatters_refuse_out_of_range_numbers() -> None:
    for bad in (-1, 1 << 32, True, 1.0):
        with pytest.raises(ValueError):
            domain_prefix(bad)
    with pytest.raises(ValueError):
        segment_key(1, 1, 5, 4)
    with pytest.raises(ValueError):
        segment_key(1, 1, 0, 1 << 64)
    with pytest.raises(ValueError):
        segment_key(1, 1 << 32, 1, 2)
    with pytest.raises(ValueError):
        page_key(1, 1, 2, 256, 0)
    with pytest.raises(ValueError):
        catalog_key(1, 0)
    with pytest.raises(ValueError):
        chunk_key(b"\0" * 15)


def test_spec_examples() -> None:
    assert segment_key(7, 1, 1, 1000) == "d/00000007/seg/00000001/0000000000000001-00000000000003e8.seg"
    assert base_manifest_key(7, 1, 0, 0) == "d/00000007/base/00000001/0000000000000000/00000000.bmf"
    assert (page_key(7, 1, 256, 0, 0x0123456789ABCDEF)
            == "d/00000007/page/0000000000000001-0000000000000100-00-0123456789abcdef.pg")
    assert catalog_key(7, 1) == "d/00000007/cat/0000000000000001.cat"
