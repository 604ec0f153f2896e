"""The one error tree of the CDP engine.

Every error that leaves a `cdp` module is one of these. Backends translate the
errors of their SDKs at the edge (``raise StoreUnavailable(...) from exc``), so
callers never see botocore, azure-core or OSError types. Each class carries the
exit code the CLI uses when the error reaches it, and its docstring is the
default message::

    CdpError                         exit 1
    ├── ConfigError                  exit 2   bad configuration or arguments
    │   └── KeyUnavailable                    an encrypted object's store key is not held (§19)
    ├── FormatError                  exit 3   bytes that do not follow docs/FORMAT.md
    │   ├── ChecksumMismatch                  a checksum does not match its bytes
    │   │   └── IntegrityError                an encrypted object fails authentication (§19)
    │   ├── NotEncrypted                      a plaintext object in an encrypted store (§19)
    │   └── TruncatedError                    fewer bytes than a length field promises
    ├── LogError                     exit 4   replication-log partition
    │   ├── LogFull                           appending would overwrite untrimmed data
    │   └── LogCorruption                     invalid data where durable data must be
    ├── MetaError                    exit 4   metadata repository unreadable
    ├── Fenced                       exit 8   another writer owns the domain's catalog (FORMAT.md §8.3)
    ├── Busy                         exit 7   another process holds the lock (FORMAT.md §11)
    ├── LeaseLost                    exit 7   a held lock or lease expired or was superseded
    └── StoreError                   exit 5   object store
        ├── InvalidKey                        a key the validator refuses
        ├── NotFound                          no object under that key
        ├── AlreadyExists                     a conditional (if-absent) put lost
        ├── PreconditionFailed                a conditional (if-match) put lost
        ├── PermissionDenied                  credentials refused
        └── StoreUnavailable                  transient: network, 5xx, throttling
            └── StoreTimeout                  the store did not answer in time

Messages name the file, object, offset or field that was wrong and what was
expected. They never contain credentials: backends build them from keys and
status codes, not from SDK exception text that may echo a signed URL.
"""

from __future__ import annotations

from collections.abc import Sequence


class CdpError(Exception):
    """CDP engine error."""

    exit_code = 1

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or type(self).__name__).strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(CdpError):
    """Invalid configuration or arguments."""

    exit_code = 2


class KeyUnavailable(ConfigError):
    """An object is encrypted with a store key this process does not hold (FORMAT.md §19):
    set CDP_STORE_KEY or CDP_STORE_KEY_FILE."""


class AmbiguousDomain(ConfigError):
    """More than one domain of a store answers to one domain name: name the one meant by
    its id (``id:N``)."""

    def __init__(self, message: str, ids: Sequence[int]) -> None:
        super().__init__(message)
        self.ids = tuple(ids)


class FailoverRefused(ConfigError):
    """A failover cannot be done as asked (the domain's state forbids it); the message says
    what to do instead."""


class FormatError(CdpError):
    """Data does not follow docs/FORMAT.md."""

    exit_code = 3


class ChecksumMismatch(FormatError):
    """A checksum does not match the bytes it covers."""


class TruncatedError(FormatError):
    """Fewer bytes than a length field promises."""


class IntegrityError(ChecksumMismatch):
    """An encrypted object (FORMAT.md §19) fails authentication: a byte of it was changed,
    it was truncated, or its pages were reordered or moved from another object."""


class NotEncrypted(FormatError):
    """A plaintext object where the store is encrypted (FORMAT.md §19): refused, since
    anyone who can write the store could have planted it."""


class LogError(CdpError):
    """Replication-log partition error."""

    exit_code = 4


class LogFull(LogError):
    """The replication log is full: appending would overwrite untrimmed data."""


class LogCorruption(LogError):
    """The replication log holds invalid data where durable data must be."""


class MetaError(CdpError):
    """The metadata repository cannot be read or written."""

    exit_code = 4


class Fenced(CdpError):
    """Another writer owns the domain's catalog: this writer must stop writing it."""

    exit_code = 8


class Busy(CdpError):
    """Another process holds the lock this operation needs; try again later."""

    exit_code = 7


class HorizonPassed(CdpError):
    """Retention moved a timeline's horizon past the seq a delta starts from: the records
    in between are gone from the store, so what they changed cannot be known from it."""


class LeaseLost(CdpError):
    """A lock or lease expired (or was superseded) while its holder still needed it."""

    exit_code = 7


class StoreError(CdpError):
    """Object store error."""

    exit_code = 5
    #: True when retrying the same call later may succeed.
    retryable = False


class InvalidKey(StoreError):
    """Object key refused by the key validator."""


class NotFound(StoreError):
    """No object under that key."""


class AlreadyExists(StoreError):
    """An object already exists under that key (conditional put lost)."""


class PreconditionFailed(StoreError):
    """The object under that key is no longer the one a conditional put (``if_match``)
    was made against: another writer replaced or deleted it."""


class PermissionDenied(StoreError):
    """The object store refused the credentials."""


class StoreUnavailable(StoreError):
    """The object store is unreachable or failed transiently."""

    retryable = True


class StoreClockUnknown(StoreUnavailable):
    """The store answered, but without a usable ``Date``: its clock is unknown (FORMAT.md
    §11.1). Not an outage: a reader goes on without its recovery lease (§11.3)."""


class StoreTimeout(StoreUnavailable):
    """The object store did not answer in time."""
