"""The key validator (cdp/store/keys.py), and list order as a property.

Hypothesis generates keys; list order is checked against sorted() on the
memory and file backends (the fast ones; S3 and Azure get the fixed tricky
names in test_contract.py).
"""

from __future__ import annotations

import asyncio
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.errors import ConfigError, InvalidKey
from cdp.store import FileStore, MemoryStore
from cdp.store.keys import (
    KEY_BYTES_MAX,
    normalize_root_prefix,
    validate_key,
    validate_prefix,
)

CHARS = "ABCXYZabcxyz0189._-"
FIRST_CHARS = CHARS.replace(".", "")

segments = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(FIRST_CHARS),
    st.text(alphabet=CHARS, max_size=8),
)
valid_keys = st.lists(segments, min_size=1, max_size=6).map("/".join).filter(
    lambda key: len(key) <= KEY_BYTES_MAX
)


@given(valid_keys)
def test_valid_keys_are_accepted(key: str) -> None:
    assert validate_key(key) == key
    assert validate_prefix(key) == key
    assert validate_prefix(key + "/") == key + "/"


BAD_CHARS = st.characters(
    blacklist_characters=string.ascii_letters + string.digits + "._-/",
    blacklist_categories=("Cs",),
)  # anything else: space, ":", "\\", "é", control characters, ...


@given(valid_keys, st.data())
def test_a_bad_character_anywhere_is_refused(key: str, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(key)))
    bad = data.draw(BAD_CHARS)
    with pytest.raises(InvalidKey, match="invalid key"):
        validate_key(key[:at] + bad + key[at:])


@given(st.lists(segments, min_size=0, max_size=4), st.lists(segments, min_size=0, max_size=4),
       st.sampled_from(["..", ".", "", ".hidden", ".tmp-1234"]))
def test_dot_and_empty_segments_are_refused(before: list[str], after: list[str], bad: str) -> None:
    key = "/".join([*before, bad, *after])
    with pytest.raises(InvalidKey):
        validate_key(key)


@given(valid_keys)
def test_leading_or_trailing_slash_is_refused(key: str) -> None:
    for bad in ("/" + key, key + "/", "//" + key):
        with pytest.raises(InvalidKey):
            validate_key(bad)


def test_length_limit() -> None:
    assert validate_key("a" * KEY_BYTES_MAX)
    with pytest.raises(InvalidKey, match=f"at most {KEY_BYTES_MAX} bytes"):
        validate_key("a" * (KEY_BYTES_MAX + 1))


def test_message_names_the_key_truncated_and_the_rule() -> None:
    with pytest.raises(InvalidKey) as caught:
        validate_key("x" * 600 + " ")
    message = str(caught.value)
    assert "'xxxx" in message and "..." in message
    assert len(message) < 200
    with pytest.raises(InvalidKey, match=r"'a//b'.*empty segment"):
        validate_key("a//b")
    with pytest.raises(InvalidKey, match="must be a str"):
        validate_key(b"abc")  # type: ignore[arg-type]


@pytest.mark.parametrize("prefix", ["", "a", "a/", "a/b", "a/b/", "seg/00"])
def test_valid_prefixes(prefix: str) -> None:
    assert validate_prefix(prefix) == prefix


@pytest.mark.parametrize("prefix", ["/", "//", "a//", "/a", "..", "a/../", "a/.", ".x/", "a b"])
def test_invalid_prefixes(prefix: str) -> None:
    with pytest.raises(InvalidKey, match="invalid list prefix"):
        validate_prefix(prefix)


@pytest.mark.parametrize(
    "raw, canonical", [("", ""), ("/", ""), ("a", "a/"), ("/a/b/", "a/b/"), ("a/b", "a/b/")]
)
def test_root_prefix_normalization(raw: str, canonical: str) -> None:
    assert normalize_root_prefix(raw) == canonical


def test_bad_root_prefix_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="store prefix"):
        normalize_root_prefix("a/../b")


def _no_file_dir_clash(keys: set[str]) -> bool:
    """The file backend cannot hold "a" and "a/b" at once."""
    return not any(k + "/" == other[: len(k) + 1] for k in keys for other in keys)


# A narrow alphabet so that generated names share prefixes and sit around "/".
tight_segments = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from("-0Aa_"),
    st.text(alphabet="-.0Aa_", max_size=2),
)
key_sets = st.sets(
    st.lists(tight_segments, min_size=1, max_size=3).map("/".join), min_size=0, max_size=25
).filter(_no_file_dir_clash)


async def _listing(store: object, keys: set[str], prefix: str, start_after: str | None) -> list[str]:
    for key in keys:
        await store.put(key, b"")  # type: ignore[attr-defined]
    return [i.key async for i in store.list(prefix, start_after=start_after)]  # type: ignore[attr-defined]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key_sets, st.sampled_from(["", "a", "a/", "-", "A/", "0"]), st.one_of(st.none(), tight_segments))
def test_list_order_is_sorted_order(keys: set[str], prefix: str, start_after: str | None) -> None:
    want = sorted(k for k in keys if k.startswith(prefix) and (start_after is None or k > start_after))
    memory = MemoryStore(page_size=3)
    assert asyncio.run(_listing(memory, keys, prefix, start_after)) == want
    with tempfile.TemporaryDirectory() as tmp:
        files = FileStore(Path(tmp) / "s")
        assert asyncio.run(_listing(files, keys, prefix, start_after)) == want
