"""open_store(url): the one place that turns a store URL into an ObjectStore.

    file:///abs/path           FileStore (a plain path works too)
    mem://name                 MemoryStore; the same name gives the same
                               instance within the process ("mem://": a new one)
    s3://bucket[/prefix][?endpoint=URL&region=R]
                               S3Store; credentials only from the environment:
                               AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
                               AWS_SESSION_TOKEN; endpoint also from
                               CDP_S3_ENDPOINT, region from AWS_REGION or
                               AWS_DEFAULT_REGION (default us-east-1)
    azure://container[/prefix] AzureBlobStore; connection string from
                               CDP_AZURE_CONNECTION_STRING, else
                               AZURE_STORAGE_CONNECTION_STRING

With ``CDP_STORE_KEY`` or ``CDP_STORE_KEY_FILE`` set, every store is encrypted at rest
(``cdp.store.crypt``, FORMAT.md §19). Secrets never travel in the URL: a URL with an
"@" after its scheme (user info) or an unknown query parameter is refused, and every
message quotes the URL through ``redact_url``. User info is found in the raw text, not
by ``urlsplit``: a password may hold "/", "?" or "#" (AWS secret keys often hold "/"),
which end urlsplit's host early, so it sees no user info and the secret stays in what it
calls the path. The prefix is applied transparently: callers use keys relative to it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from cdp.errors import ConfigError
from cdp.store.base import ObjectStore
from cdp.store.fs import FileStore
from cdp.store.memory import MemoryStore
from cdp.store.storekeys import StoreKeyring

#: Query parameters whose values are not secret (shown in messages).
PUBLIC_PARAMS = frozenset({"endpoint", "region"})
#: Where each backend's credentials belong instead of the URL (the module docstring).
CREDENTIALS_FROM = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) in the environment",
    "azure": "set CDP_AZURE_CONNECTION_STRING (or AZURE_STORAGE_CONNECTION_STRING) in the environment",
}
#: A scheme as urlsplit recognises one, then what follows it (without a leading "//").
_SCHEME_REST = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(?://)?(.*)", re.DOTALL)
#: What urlsplit drops before reading a URL (WHATWG): leading C0 controls and spaces,
#: and every tab and line break wherever it is.
_LEADING_DROPPED = "".join(map(chr, range(0x21)))
_DROPPED = str.maketrans("", "", "\t\r\n")

_memory_stores: dict[str, MemoryStore] = {}


def config_store_url(value: str, base_dir: Path) -> str:
    """A store as a configuration file names it: a URL stays as it is; a plain path is a
    file store, relative to ``base_dir`` (the file's directory, not wherever the process
    started), made absolute."""
    if "://" in value:
        return value
    return f"file://{(base_dir / value).resolve()}"


def _after_userinfo(text: str) -> str | None:
    """What follows the last "@" of ``text``, or None when it holds none: the one rule
    every redaction here applies. Everything before the last "@" may be user info, and a
    password may hold "@", ":", "/", "?" or "#", so no earlier cut is safe."""
    if "@" not in text:
        return None
    return text.rpartition("@")[2]


def _userinfo_split(url: str) -> tuple[str, str] | None:
    """(scheme, what follows the last "@") when the raw text of ``url`` holds an "@" after
    its scheme; None otherwise (a plain path, or no "@"). Read as urlsplit reads the
    text (dropped characters dropped), so a tab in the scheme hides nothing."""
    text = url.lstrip(_LEADING_DROPPED).translate(_DROPPED)
    match = _SCHEME_REST.fullmatch(text)
    if match is None:
        return None
    tail = _after_userinfo(match.group(2))
    return None if tail is None else (match.group(1), tail)


def redact_host(host: str) -> str:
    """A host (``netloc``, maybe followed by a path) with any user info replaced by ***:
    everything before the last "@" goes, so no part of a password that holds one stays."""
    tail = _after_userinfo(host)
    return host if tail is None else "***@" + tail


def redact_url(url: str) -> str:
    """url with user info, non-public query values and fragment replaced by ***.

    User info is everything between the scheme and the last "@" of the raw text
    (``_userinfo_split``), whatever urlsplit would make of it."""
    found = _userinfo_split(url)
    if found is None:
        return _redact_parts(url)
    scheme, tail = found
    return f"{scheme}://***@{_redact_tail(scheme, tail)}"


def _redact_tail(scheme: str, tail: str) -> str:
    """What follows the last "@", redacted as a host, path, query and fragment. When the
    "@" was in the query (an endpoint with user info), the tail is the rest of that query
    without its "?": its pairs would show as a host, so a host or path holding "=" or
    "&" (no bucket or container name does; a prefix that does is hidden too) is
    replaced whole."""
    head = re.split(r"[?#]", tail, maxsplit=1)[0]
    if "=" in head or "&" in head:
        return "***"
    return _redact_parts(f"{scheme}://{tail}").partition("://")[2] or "***"


def _redact_parts(url: str) -> str:
    """``redact_url`` of a URL whose raw text holds no user info."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = redact_host(parts.netloc)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = "&".join(
        f"{name}={redact_url(value) if name in PUBLIC_PARAMS else '***'}" for name, value in pairs
    )
    redacted = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else parts.path
    if query:
        redacted += "?" + query
    if parts.fragment:
        redacted += "#***"
    return redacted


def check_store_url(url: str) -> None:
    """ConfigError (as ``open_store`` words it) when ``url`` cannot name a store, judged by
    its form alone: no I/O, no SDK import, no credential read — a configuration file is
    checked where the store's credentials may not be in the environment. What only the
    backend can judge (an S3 bucket name's rules, the Azure connection string) is left to
    ``open_store``."""
    _checked(url)


def open_store(url: str, *, env: Mapping[str, str] = os.environ) -> ObjectStore:
    """Return the store that url names (see the module docstring); ConfigError if bad.

    When the environment holds a store key (``CDP_STORE_KEY`` or ``CDP_STORE_KEY_FILE``,
    ``cdp.store.storekeys``), the store is an ``EncryptedStore`` over the backend: every
    object is sealed (FORMAT.md §19), and a plaintext one is refused.
    """
    store = _open_plain(url, env)
    keyring = StoreKeyring.from_env(env)
    if keyring is not None:
        from cdp.store.crypt import EncryptedStore  # cryptography: only when used

        return EncryptedStore(store, keyring)
    return store


def _open_plain(url: str, env: Mapping[str, str]) -> ObjectStore:
    scheme, parts, params = _checked(url)
    try:
        if scheme == "file":
            return FileStore(_file_path(url, parts))
        if scheme == "mem":
            return _open_memory(parts.netloc + parts.path)
        if scheme == "s3":
            return _open_s3(parts.netloc, parts.path, params, env)
        return _open_azure(parts.netloc, parts.path, env)
    except ConfigError as exc:
        raise ConfigError(f"store URL {redact_url(url)}: {exc.message}") from None
    except ValueError as exc:
        raise ConfigError(f"store URL {redact_url(url)}: not a valid URL") from exc


def _checked(url: str) -> tuple[str, SplitResult, dict[str, str]]:
    """(scheme — ``file`` for a plain path too —, the split URL, its query parameters)
    of a well-formed store URL; ConfigError naming the URL (redacted) otherwise."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError("empty store URL: expected file://, mem://, s3:// or azure://")
    try:
        _refuse_userinfo(url)  # first: urlsplit may fail on a password, and show it then
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if not scheme or scheme == "file":
            _file_path(url, parts)
            return "file", parts, {}
        if scheme == "mem":
            return scheme, parts, {}
        if scheme not in ("s3", "azure"):
            raise ConfigError(f"unknown scheme {scheme!r}: expected file, mem, s3 or azure")
        params = _params(parts.query)
        if scheme == "s3" and not parts.netloc:
            raise ConfigError("no bucket: expected s3://bucket/optional/prefix")
        if scheme == "azure" and not parts.netloc:
            raise ConfigError("no container: expected azure://container/optional/prefix")
        if scheme == "azure" and params:
            raise ConfigError("azure URLs take no query parameters")
        return scheme, parts, params
    except ConfigError as exc:
        raise ConfigError(f"store URL {redact_url(url)}: {exc.message}") from None
    except ValueError as exc:
        raise ConfigError(f"store URL {redact_url(url)}: not a valid URL") from exc


def _refuse_userinfo(url: str) -> None:
    """ConfigError when the raw text of ``url`` holds an "@" after its scheme: user info,
    whatever urlsplit makes of it (a password holding "/" ends its host early). A file
    URL is a path, where "@" is just a character. The message says where the credentials
    belong; the caller quotes the URL redacted."""
    found = _userinfo_split(url)
    if found is None or found[0].lower() == "file":
        return
    scheme = found[0].lower()
    where = CREDENTIALS_FROM.get(scheme, "use the environment")
    raise ConfigError(f"credentials in the URL are refused ('@' after {scheme}://): {where}")


def _params(query: str) -> dict[str, str]:
    params = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    unknown = sorted(set(params) - PUBLIC_PARAMS)
    if unknown:
        raise ConfigError(
            f"unknown query parameter(s) {', '.join(unknown)}: expected only "
            f"{', '.join(sorted(PUBLIC_PARAMS))} (credentials come from the environment)"
        )
    return params


def _file_path(url: str, parts: SplitResult) -> Path:
    """The directory of a file store: a plain path, or file:///absolute/path."""
    if not parts.scheme:
        return Path(url)
    if parts.netloc not in ("", "localhost"):
        # The host is not quoted: it may be user info cut short by a "/" in a password.
        raise ConfigError("file URL with a host: expected file:///absolute/path")
    if parts.query or parts.fragment or not parts.path.startswith("/"):
        raise ConfigError("expected file:///absolute/path with no query")
    return Path(unquote(parts.path))


def _open_memory(name: str) -> MemoryStore:
    if not name:
        return MemoryStore()
    store = _memory_stores.get(name)
    if store is None:
        store = _memory_stores[name] = MemoryStore(name)
    return store


def _open_s3(bucket: str, path: str, params: dict[str, str], env: Mapping[str, str]) -> ObjectStore:
    from cdp.store.s3 import S3Store  # aioboto3 is slow to import: only when used

    return S3Store(
        bucket,
        unquote(path),
        endpoint_url=params.get("endpoint") or env.get("CDP_S3_ENDPOINT") or None,
        region=params.get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
        access_key=env.get("AWS_ACCESS_KEY_ID") or None,
        secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
        session_token=env.get("AWS_SESSION_TOKEN") or None,
    )


def _open_azure(container: str, path: str, env: Mapping[str, str]) -> ObjectStore:
    from cdp.store.azure import AzureBlobStore  # azure-storage is slow to import

    connection_string = env.get("CDP_AZURE_CONNECTION_STRING") or env.get(
        "AZURE_STORAGE_CONNECTION_STRING"
    )
    if not connection_string:
        raise ConfigError(
            "no connection string: set CDP_AZURE_CONNECTION_STRING or "
            "AZURE_STORAGE_CONNECTION_STRING"
        )
    return AzureBlobStore(container, unquote(path), connection_string=connection_string)
