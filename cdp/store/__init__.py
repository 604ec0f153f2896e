"""Object stores: one ObjectStore protocol, several backends, one key validator.

    from cdp.store import open_store
    async with open_store("s3://bucket/prefix") as store:
        await store.put("seg/0000000000000001", data)

Modules: ``base`` (the protocol, ObjectInfo, range rules), ``keys`` (the key
validator), ``fs``, ``memory``, ``s3``, ``azure`` (backends), ``faulty`` (a
fault-injecting wrapper for tests), ``crypt`` (EncryptedStore: encryption at rest,
a wrapper of any backend, FORMAT.md §19) and ``storekeys`` (its keys), ``open``
(URL -> store). S3Store, AzureBlobStore and EncryptedStore are imported on first use:
their libraries are slow to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cdp.store.base import ObjectInfo, ObjectStore
from cdp.store.faulty import FaultyStore
from cdp.store.fs import FileStore
from cdp.store.keys import validate_key, validate_prefix
from cdp.store.memory import MemoryStore
from cdp.store.open import open_store, redact_url

if TYPE_CHECKING:
    from cdp.store.azure import AzureBlobStore
    from cdp.store.crypt import EncryptedStore
    from cdp.store.s3 import S3Store

__all__ = [
    "AzureBlobStore",
    "EncryptedStore",
    "FaultyStore",
    "FileStore",
    "MemoryStore",
    "ObjectInfo",
    "ObjectStore",
    "S3Store",
    "open_store",
    "redact_url",
    "validate_key",
    "validate_prefix",
]


def __getattr__(name: str) -> Any:
    if name == "S3Store":
        from cdp.store.s3 import S3Store

        return S3Store
    if name == "AzureBlobStore":
        from cdp.store.azure import AzureBlobStore

        return AzureBlobStore
    if name == "EncryptedStore":
        from cdp.store.crypt import EncryptedStore

        return EncryptedStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
