"""Metadata repository (docs/FORMAT.md §4): atomic two-slot writes."""

from __future__ import annotations

import json

import pytest

from cdp.errors import MetaError
from cdp.meta import MetaRepository

SLOT = 8192


def doc(seq: int, **more) -> dict:
    """A DRVA's document (FORMAT.md §4) recording ``seq`` committed for domain 7."""
    return {"drva": "drva-1", "domains": {"7": {"committed_seq": seq, **more}}}


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "meta"
    MetaRepository.format(p, slot_size=SLOT)
    return p


def test_write_read_reopen(path):
    with MetaRepository.open(path, slot_size=SLOT) as meta:
        assert meta.read() == {}
        meta.write(doc(10))
        meta.write(doc(20))
    with MetaRepository.open(path, slot_size=SLOT) as meta:
        assert meta.read() == doc(20)
        assert meta.generation == 3


def test_torn_write_keeps_the_previous_document(path):
    with MetaRepository.open(path, slot_size=SLOT) as meta:
        meta.write(doc(1))
        meta.write(doc(2))
        slot = meta.generation % 2
    with open(path, "r+b") as f:  # the newest slot's body was only half written
        f.seek(slot * SLOT + 64)
        f.write(b"\0")
    with MetaRepository.open(path, slot_size=SLOT) as meta:
        assert meta.read() == doc(1)
        meta.write(doc(3))
    with MetaRepository.open(path, slot_size=SLOT) as meta:
        assert meta.read() == doc(3)


def test_every_byte_flip_of_the_current_slot_falls_back_or_fails(path):
    with MetaRepository.open(path, slot_size=SLOT) as meta:
        meta.write(doc(1))
        meta.write(doc(2, committed_ts=123456789))
        slot = meta.generation % 2
    raw = path.read_bytes()
    used = 64 + len(json.dumps(doc(2, committed_ts=123456789), sort_keys=True, separators=(",", ":")))
    for i in range(used):
        bad = bytearray(raw)
        bad[slot * SLOT + i] ^= 0x01
        path.write_bytes(bad)
        with MetaRepository.open(path, slot_size=SLOT) as meta:
            assert meta.read() == doc(1), f"flip at {i} went unnoticed"


def test_both_slots_damaged_is_an_error(path):
    raw = bytearray(path.read_bytes())
    raw[SLOT] ^= 1
    path.write_bytes(raw)
    with pytest.raises(MetaError, match="no valid slot"):
        MetaRepository.open(path, slot_size=SLOT)


def test_oversized_document_is_refused_and_nothing_changes(path):
    with MetaRepository.open(path, slot_size=SLOT) as meta:
        meta.write(doc(1))
        with pytest.raises(MetaError, match="exceeds the slot"):
            meta.write({"drva": "x" * SLOT})
    with MetaRepository.open(path, slot_size=SLOT) as meta:
        assert meta.read() == doc(1)
