"""What ``MetaRepository.open`` refuses (FORMAT.md §4): a document whose checksums hold
but whose shape or types are not a DRVA's, a second writer, a slot it cannot read."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp.errors import MetaError
from cdp.meta import MetaRepository, _pack_slot, read_metadata

SLOT = 8192
GOOD = {"drva": "drva-1", "domains": {"7": {"committed_seq": 12, "committed_ts": 5, "generation": 3,
                                            "timeline": 1}}}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "meta"
    MetaRepository.format(p, slot_size=SLOT)
    with MetaRepository.open(p, slot_size=SLOT) as meta:
        meta.write(GOOD)  # generation 2, slot 0
    return p


def plant(path: Path, doc: object, generation: int = 9) -> None:
    """A slot whose checksums hold, holding ``doc`` (another writer, a bug, a forger)."""
    with open(path, "r+b") as f:
        f.seek(generation % 2 * SLOT)
        f.write(_pack_slot(generation, SLOT, json.dumps(doc).encode()))


def with_entry(**entry) -> dict:
    return {"drva": "drva-1", "domains": {"7": {**GOOD["domains"]["7"], **entry}}}


BAD = {
    "domains is a list": ({"drva": "d", "domains": []}, r"domains is \[\], expected an object"),
    "domain entry is a number": ({"domains": {"1": 5}}, r"domains\.1 is 5, expected an object"),
    "committed_seq is a string": (with_entry(committed_seq="12"), r"domains\.7\.committed_seq is '12'"),
    "committed_seq is negative": (with_entry(committed_seq=-3), r"domains\.7\.committed_seq is -3"),
    "committed_seq is 2**64": (with_entry(committed_seq=2**64), r"domains\.7\.committed_seq is 18446744073709551616"),
    "committed_seq is a float": (with_entry(committed_seq=3.5), r"domains\.7\.committed_seq is 3\.5"),
    "committed_seq is a bool": (with_entry(committed_seq=True), r"domains\.7\.committed_seq is True"),
    "timeline is a string": (with_entry(timeline="x"), r"domains\.7\.timeline is 'x'"),
    "timeline past u32": (with_entry(timeline=2**32), r"domains\.7\.timeline is 4294967296"),
    "generation is null": (with_entry(generation=None), r"domains\.7\.generation is None"),
    "unknown domain field": (with_entry(durable_seq=4), r"domains\.7: unknown key 'durable_seq'"),
    "domain id not decimal": ({"domains": {"x": {}}}, r"domains key 'x'"),
    "domain id with a leading zero": ({"domains": {"07": {}}}, r"domains key '07'"),
    "drva is a number": ({"drva": 5, "domains": {}}, r"drva is 5"),
    "unknown top-level key": ({"drva": "d", "domain": {}}, r"unknown key 'domain'"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_document_that_is_not_a_drvas_is_refused_naming_file_and_key(path, case):
    doc, key = BAD[case]
    plant(path, doc)
    with pytest.raises(MetaError, match=rf"metadata repository {path}: generation 9: {key}"):
        MetaRepository.open(path, slot_size=SLOT)
    plant(path, GOOD, generation=11)  # a good document again: the open works, the lock was released
    with MetaRepository.open(path, slot_size=SLOT) as meta:
        assert meta.read() == GOOD


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**65, 2**65) | st.floats(allow_nan=False)
                           | st.text(max_size=5), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
FIELDS = ("committed_seq", "committed_ts", "generation", "timeline")


@settings(max_examples=100, deadline=None)
@given(domains=st.dictionaries(st.sampled_from(["1", "7", "01", "x", "4294967296"]) | st.text(max_size=3),
                               st.dictionaries(st.sampled_from(FIELDS), json_values | st.integers(0, 2**32))
                               | json_values, max_size=3))
def test_any_document_opens_with_in_range_integers_or_is_refused(tmp_path_factory, domains):
    p = tmp_path_factory.mktemp("meta") / "meta"
    MetaRepository.format(p, slot_size=SLOT)
    plant(p, {"drva": "drva-1", "domains": domains})
    try:
        meta = MetaRepository.open(p, slot_size=SLOT)
    except MetaError as exc:
        assert str(p) in exc.message and "domains" in exc.message
        return
    with meta:
        for domain, entry in meta.read()["domains"].items():
            assert str(int(domain)) == domain and 0 <= int(domain) < 2**32
            for name, value in entry.items():
                assert name in FIELDS and type(value) is int and 0 <= value < 2**64


def test_a_second_writer_is_refused_until_the_first_closes(path):
    first = MetaRepository.open(path, slot_size=SLOT)
    try:
        with pytest.raises(MetaError, match=rf"{path}: in use by another process"):
            MetaRepository.open(path, slot_size=SLOT)
        assert read_metadata(path, slot_size=SLOT) == GOOD  # readers beside the writer still read
        first.write(with_entry(committed_seq=13))
    finally:
        first.close()
    with MetaRepository.open(path, slot_size=SLOT) as meta:
        assert meta.read()["domains"]["7"]["committed_seq"] == 13


def test_eio_reading_one_slot_falls_back_to_the_other(path, monkeypatch):
    with MetaRepository.open(path, slot_size=SLOT) as meta:
        meta.write(with_entry(committed_seq=13))  # generation 3, slot 1
    real = os.pread

    def pread(fd, n, offset):
        if offset == SLOT:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    with MetaRepository.open(path, slot_size=SLOT) as meta:
        assert meta.read() == GOOD and meta.generation == 2
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(MetaError, match=r"no valid slot \(slot 0: cannot read .*Input/output error.*slot 1: cannot read"):
        MetaRepository.open(path, slot_size=SLOT)
