"""Store keys: where the keys of encryption at rest come from (FORMAT.md §19.5).

A process holds a ``StoreKeyring`` — one or more 256-bit store keys — when its
environment names one:

    CDP_STORE_KEY=<64 hex digits | base64 of 32 bytes>     one key
    CDP_STORE_KEY_FILE=/path/to/keys                       one key per line, oldest first

Setting both is refused, and so is one that is set but empty (``CDP_STORE_KEY=$(cat
missing)`` silently meant a plaintext store). In a key file, blank lines and lines
starting with ``#`` are ignored; the file must not be readable by group or others, and
must belong to root or to us (as ssh's keys: its owner could append a key that then
seals everything). The **last** key not marked ``read-only`` writes; **every** listed
key reads; the **first** key names chunks, so that deduplication and whole-chunk
checks stay stable across rotations. Rotation, without any process sealing with a key
another one lacks: add the new key as ``read-only <key>`` everywhere and restart; then
drop the ``read-only`` and restart again; keep the old keys while objects sealed with
them exist.

From each key only derived values are used (HKDF-SHA256, no salt): a public 128-bit
*key id* written in the clear in every object, a data key (each object's page key is
derived from it and the object's salt) and, from the first key, the chunk-names key.
Key material never appears in a ``repr``, a message or a log line: only key ids do.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import stat as stat_mode
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from cdp.errors import ConfigError

if TYPE_CHECKING:  # cryptography is imported where it is used: the names below are imported widely
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

STORE_KEY_ENV = "CDP_STORE_KEY"
STORE_KEY_FILE_ENV = "CDP_STORE_KEY_FILE"
KEY_BYTES = 32  # AES-256
KEY_ID_BYTES = 16
SALT_BYTES = 16  # §19.1: an object's random salt
NAME_BYTES = 16  # §6.1: a chunk name is 128 bits
KEYS_PER_FILE_MAX = 64  # a key file is a short list, not a database
KEY_FILE_BYTES_MAX = 64 << 10
READ_ONLY_MARK = "read-only"  # a key file line's prefix: the key reads, never seals

# §19.4: the HKDF info strings; a new derivation gets a new string, never a reused one.
INFO_KEY_ID = b"cdp-store-1 key id"
INFO_DATA = b"cdp-store-1 data key"
INFO_NAMES = b"cdp-store-1 chunk names"
INFO_OBJECT = b"cdp-store-1 object key"


def _hkdf(secret: bytes, info: bytes, length: int, salt: bytes | None = None) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


class StoreKey:
    """One store key, held only as its derived values; shows its key id, never a secret."""

    __slots__ = ("key_id", "_data_key", "_names_key")

    def __init__(self, secret: bytes) -> None:
        if len(secret) != KEY_BYTES:
            raise ConfigError(f"a store key is {KEY_BYTES} bytes, not {len(secret)}")
        self.key_id = _hkdf(secret, INFO_KEY_ID, KEY_ID_BYTES)
        self._data_key = _hkdf(secret, INFO_DATA, KEY_BYTES)
        self._names_key = _hkdf(secret, INFO_NAMES, KEY_BYTES)

    @property
    def key_id_hex(self) -> str:
        return self.key_id.hex()

    def object_aead(self, salt: bytes) -> AESGCM:
        """The AES-256-GCM of one object: its key is derived from the data key and the
        object's random salt (§19.4), so nonces never repeat across objects."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        assert len(salt) == SALT_BYTES, len(salt)
        return AESGCM(_hkdf(self._data_key, INFO_OBJECT, KEY_BYTES, salt))

    def chunk_namer(self) -> ChunkNamer:
        return ChunkNamer(self._names_key, self.key_id)

    def __repr__(self) -> str:
        return f"<StoreKey id {self.key_id_hex}>"

    def __reduce__(self):  # never pickled (a process pool would copy the secrets)
        raise TypeError("a StoreKey is not picklable")


class ChunkNamer:
    """The keyed hash that names chunks in an encrypted store (§6.1, §19.6):
    ``HMAC-SHA256(names key, raw)[:16]``. Same raw, same name: deduplication holds;
    without the key a name tells nothing of the content.

    Why HMAC-SHA256 and not keyed BLAKE2b: with the SHA extensions of this project's
    machines it hashes 4 MiB chunks at 1.36 GB/s, BLAKE2b at 0.71 GB/s (hashlib, one core).
    """

    __slots__ = ("_key", "key_id")

    def __init__(self, names_key: bytes, key_id: bytes) -> None:
        self._key = names_key
        self.key_id = key_id  # of the store key the names key comes from

    def __call__(self, raw: bytes | bytearray | memoryview) -> bytes:
        return hmac.new(self._key, raw, hashlib.sha256).digest()[:NAME_BYTES]

    def __repr__(self) -> str:
        return f"<ChunkNamer of key id {self.key_id.hex()}>"

    def __reduce__(self):
        raise TypeError("a ChunkNamer is not picklable")


class StoreKeyring:
    """The store keys of a process. Invariant: at least one key, key ids distinct;
    ``writer`` is the last, ``namer`` comes from the first."""

    def __init__(self, keys: list[StoreKey], source: str, read_only: frozenset[int] = frozenset()) -> None:
        """``read_only``: indexes of ``keys`` that read but never seal (rotation)."""
        assert keys, "a keyring holds at least one key"
        self.keys = tuple(keys)
        self.source = source  # where the keys came from, for messages (never the keys)
        self.by_id = {key.key_id: key for key in keys}
        if len(self.by_id) != len(keys):
            raise ConfigError(f"{source}: the same key is listed twice")
        sealing = [key for i, key in enumerate(keys) if i not in read_only]
        if not sealing:
            raise ConfigError(f"{source}: every key is read-only: at least one must seal")
        self.writer = sealing[-1]
        self.namer = keys[0].chunk_namer()

    def key_ids(self) -> list[str]:
        return [key.key_id_hex for key in self.keys]

    def __repr__(self) -> str:
        return f"<StoreKeyring {self.source}: key ids {', '.join(self.key_ids())}>"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> StoreKeyring | None:
        """The keyring the environment names (module docstring), None when it names none."""
        for name in (STORE_KEY_ENV, STORE_KEY_FILE_ENV):
            if name in env and not env[name].strip():
                raise ConfigError(f"{name} is set but empty: give the key (or the key file), or unset it for a "
                                  f"plaintext store")
        value, path = env.get(STORE_KEY_ENV, ""), env.get(STORE_KEY_FILE_ENV, "")
        if value and path:
            raise ConfigError(f"set {STORE_KEY_ENV} or {STORE_KEY_FILE_ENV}, not both")
        if value:
            return cls([StoreKey(parse_key(value, STORE_KEY_ENV))], STORE_KEY_ENV)
        if path:
            return cls.from_file(Path(path))
        return None

    @classmethod
    def from_file(cls, path: Path) -> StoreKeyring:
        """The keys of a key file (module docstring); ConfigError naming the file and line."""
        try:
            # O_NONBLOCK: a FIFO named here made every verb wait for a writer, for ever,
            # before the S_ISREG check below could refuse it (a regular file ignores the
            # flag). O_NOCTTY: a terminal named here never becomes ours. A link is
            # followed, and its target's type and mode are what is checked (FORMAT.md §19.5).
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"store key file {path}: cannot open ({exc.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat_mode.S_ISREG(st.st_mode):
                raise ConfigError(f"store key file {path}: not a regular file")
            if st.st_uid not in (0, os.geteuid()):
                raise ConfigError(f"store key file {path}: owned by uid {st.st_uid}, not by root or by this "
                                  f"user ({os.geteuid()}): its owner could add a key that seals everything")
            if st.st_mode & 0o077:
                raise ConfigError(f"store key file {path}: readable or writable by group or others "
                                  f"(mode {stat_mode.S_IMODE(st.st_mode):o}): chmod 600 it")
            data = os.read(fd, KEY_FILE_BYTES_MAX + 1)
        finally:
            os.close(fd)
        if len(data) > KEY_FILE_BYTES_MAX:
            raise ConfigError(f"store key file {path}: over {KEY_FILE_BYTES_MAX} bytes")
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise ConfigError(f"store key file {path}: not ASCII text") from None
        keys = []
        read_only = set()
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            mark, _, rest = line.partition(" ")
            if mark == READ_ONLY_MARK:
                read_only.add(len(keys))
                line = rest
            keys.append(StoreKey(parse_key(line, f"store key file {path}, line {number}")))
        if not keys:
            raise ConfigError(f"store key file {path}: no key")
        if len(keys) > KEYS_PER_FILE_MAX:
            raise ConfigError(f"store key file {path}: {len(keys)} keys, at most {KEYS_PER_FILE_MAX}")
        return cls(keys, f"store key file {path}", frozenset(read_only))


def parse_key(text: str, where: str) -> bytes:
    """32 key bytes from 64 hex digits or standard base64; the message never quotes the text."""
    text = text.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{where}: expected a {KEY_BYTES}-byte key as {2 * KEY_BYTES} hex digits "
                          f"or base64 (got {len(text)} characters that are neither)")
    return key


def new_key_text() -> str:
    """A fresh random key, as a key file line (64 hex digits)."""
    return os.urandom(KEY_BYTES).hex()
