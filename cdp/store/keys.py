"""The one key validator of every object store.

A key names one object, relative to the store's root or prefix. Every backend
calls ``validate_key`` on every key before any I/O, so a key that one backend
accepts, all accept, and maps to the same object name everywhere:

- non-empty ASCII, at most ``KEY_BYTES_MAX`` bytes;
- only the characters ``A-Z a-z 0-9 . _ / -``;
- segments separated by "/": no leading or trailing "/", no empty segment;
- no segment "." or "..", and no segment that starts with "." (names starting
  with "." are reserved for the file backend's temporary files).

Because the alphabet is ASCII, the byte order of keys is their ``str`` order,
and ``sorted(keys)`` is the order in which every backend lists them.
"""

from __future__ import annotations

import re

from cdp.errors import ConfigError, InvalidKey

#: Longest key, in bytes (S3 allows 1024, Azure 1024; leave room for prefixes).
KEY_BYTES_MAX = 512
#: Longest rendering of a refused key in an error message.
KEY_SHOWN_CHARS_MAX = 100

_ALLOWED = re.compile(r"[A-Za-z0-9._/-]*")


def show_key(key: object) -> str:
    """repr() of a key, cut to KEY_SHOWN_CHARS_MAX characters for messages."""
    text = repr(key)
    if len(text) > KEY_SHOWN_CHARS_MAX:
        text = text[: KEY_SHOWN_CHARS_MAX - 3] + "..."
    return text


def _broken_rule(key: object) -> str | None:
    """The first rule that key breaks, or None for a valid key."""
    if not isinstance(key, str):
        return f"a key must be a str, not {type(key).__name__}"
    if not key:
        return "a key must not be empty"
    if not key.isascii():
        return "a key must be ASCII"
    if len(key) > KEY_BYTES_MAX:
        return f"a key must be at most {KEY_BYTES_MAX} bytes, not {len(key)}"
    if _ALLOWED.fullmatch(key) is None:
        return "a key may only contain A-Z a-z 0-9 . _ / -"
    if key.startswith("/"):
        return "a key must not start with '/'"
    if key.endswith("/"):
        return "a key must not end with '/'"
    for segment in key.split("/"):
        if not segment:
            return "a key must not contain an empty segment ('//')"
        if segment in (".", ".."):
            return f"a key must not contain a {segment!r} segment"
        if segment.startswith("."):
            return "a key segment must not start with '.' (reserved for temporary files)"
    return None


def validate_key(key: str) -> str:
    """Return key unchanged if valid, else raise InvalidKey naming the rule."""
    rule = _broken_rule(key)
    if rule is not None:
        raise InvalidKey(f"invalid key {show_key(key)}: {rule}")
    return key


def is_valid_key(key: str) -> bool:
    """True if validate_key would accept key."""
    return _broken_rule(key) is None


def validate_prefix(prefix: str) -> str:
    """Return a list prefix unchanged if valid, else raise InvalidKey.

    A prefix is "", a valid key followed by "/" (a "directory"), or a valid
    key (which also matches longer names: "seg/00" matches "seg/0012").
    """
    if prefix == "":
        return prefix
    core = prefix[:-1] if isinstance(prefix, str) and prefix.endswith("/") else prefix
    rule = _broken_rule(core)
    if rule is not None:
        rule = rule.replace("a key", "a prefix", 1)
        raise InvalidKey(f"invalid list prefix {show_key(prefix)}: {rule}")
    return prefix


def normalize_root_prefix(prefix: str) -> str:
    """A store's root prefix in canonical form: "a/b", "/a/b/" -> "a/b/"; "" -> "".

    The prefix without its slashes must be a valid key; ConfigError if not.
    """
    core = prefix.strip("/")
    if not core:
        return ""
    rule = _broken_rule(core)
    if rule is not None:
        rule = rule.replace("a key", "a store prefix", 1)
        raise ConfigError(f"invalid store prefix {show_key(prefix)}: {rule}")
    return core + "/"
