"""The CLI's client of the daemon's REST API, and a site's client of its peer's.

The base URL is the site file's ``[api] listen`` (``https`` when the site's ``[tls]`` is
on: the daemon's certificate must then be signed by the site CA, which alone is
trusted, and hold the address dialled); the token comes from the environment variable
it names. The peer's API is HTTPS when ``[peer] ca`` names its CA. An error answer
becomes a ``DaemonError`` carrying the daemon's message and the exit code it chose
(FORMAT.md §13.5); no daemon at all is ``DaemonNotRunning``; a refused certificate is a
``CdpError`` that says why (``cdp.tls.describe_tls_error``).

The other end is not trusted to behave (a peer site's daemon may be hung, broken or
hostile), so every answer is bounded: ``ANSWER_BYTES_MAX`` bytes read at most, a deadline
(``REQUEST_TIMEOUT_S``; ``WAIT_TIMEOUT_S`` for a ``?wait=1``), no redirect followed, and
whatever the body holds, the outcome is a ``CdpError`` whose message has its control
characters escaped (``cdp.tomlread.printable``): it is stored in job records and printed
on terminals.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from cdp.bounded_read import read_at_most
from cdp.errors import CdpError, ConfigError
from cdp.msa.config import SiteConfig
from cdp.tls import client_context, describe_tls_error
from cdp.tomlread import printable

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0
#: A ``?wait=1`` request lasts as long as its job: the longest job a client waits on is a
#: peer's quiesce (``cdp.msa.daemon.JOB_TIMEOUT_S``: 300 s; protect and mark 120 s), and the
#: margin covers the answer's way back. Past this the peer is taken as hung.
WAIT_MARGIN_S = 30.0
WAIT_TIMEOUT_S = 300.0 + WAIT_MARGIN_S
#: The most of an answer read: a job record is at most 4 MiB (``cdp.msa.jobs``), a status a
#: few KB. A larger answer is refused, not read (a peer's 1 GiB answer took 3 GB of RSS).
ANSWER_BYTES_MAX = 8 << 20
SNIPPET_CHARS_MAX = 200  # of a non-JSON error answer, quoted in the message
MESSAGE_CHARS_MAX = 4000  # of an error's message: a daemon's are a few hundred; it goes into job records
EXIT_CODES = range(1, 126)  # an exit code a daemon may choose; 126.. mean things to a shell


class DaemonNotRunning(CdpError):
    """No daemon answers at the site's API address."""


def exit_code_of(value: Any) -> int:
    """The exit code a daemon or a record gives, if it is one (an int in ``EXIT_CODES``,
    not a bool); 1 otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value in EXIT_CODES:
        return value
    return 1


class DaemonError(CdpError):
    """The daemon refused or failed a request; ``exit_code`` is the one it chose (if it is
    one, ``exit_code_of``). Its strings come from elsewhere: their control characters are
    escaped here."""

    def __init__(self, message: str, status: int, code: str, exit_code: Any = 1, field: str | None = None) -> None:
        if len(message) > MESSAGE_CHARS_MAX:
            message = f"{message[:MESSAGE_CHARS_MAX]}... ({len(message)} characters)"
        super().__init__(printable(message))
        self.status, self.code = status, printable(code[:SNIPPET_CHARS_MAX])
        self.field = printable(field[:SNIPPET_CHARS_MAX]) if isinstance(field, str) else None
        self.exit_code = exit_code_of(exit_code)


class MsaClient:
    """``async with MsaClient(cfg) as c: await c.get("/v1/status")``. ``wait_timeout_s``
    bounds a ``?wait=1`` request, ``request_timeout_s`` any other, ``answer_bytes_max`` an
    answer's body."""

    def __init__(self, cfg: SiteConfig, env: Mapping[str, str] = os.environ, *,
                 wait_timeout_s: float = WAIT_TIMEOUT_S, request_timeout_s: float = REQUEST_TIMEOUT_S,
                 answer_bytes_max: int = ANSWER_BYTES_MAX) -> None:
        self._setup(cfg.api_url, cfg.api_token(env), f"start it with `cdp daemon --config {cfg.path}`",
                    cfg.tls.ca_cert if cfg.tls is not None else None, server_name=cfg.api_server_name,
                    wait_timeout_s=wait_timeout_s, request_timeout_s=request_timeout_s,
                    answer_bytes_max=answer_bytes_max)

    @classmethod
    def for_peer(cls, cfg: SiteConfig, env: Mapping[str, str] = os.environ, *,
                 wait_timeout_s: float = WAIT_TIMEOUT_S) -> MsaClient:
        """A client of the peer site's API (the site file's ``[peer]``)."""
        if cfg.peer is None:
            raise ConfigError(f"{cfg.path}: no [peer]: the address and token of the other site's API are needed")
        return cls.at(cfg.peer.api_url, cfg.peer_token(env), f"is site {cfg.peer.site}'s daemon running and "
                      f"reachable from here?", ca=cfg.peer.ca, wait_timeout_s=wait_timeout_s)

    @classmethod
    def at(cls, base_url: str, token: str, hint: str, *, ca: Path | None = None, server_name: str | None = None,
           wait_timeout_s: float = WAIT_TIMEOUT_S, request_timeout_s: float = REQUEST_TIMEOUT_S,
           answer_bytes_max: int = ANSWER_BYTES_MAX) -> MsaClient:
        """A client of the API at ``base_url`` (``hint``: what to check when nothing answers there)."""
        client = cls.__new__(cls)
        client._setup(base_url, token, hint, ca, server_name=server_name, wait_timeout_s=wait_timeout_s,
                      request_timeout_s=request_timeout_s, answer_bytes_max=answer_bytes_max)
        return client

    def _setup(self, base_url: str, token: str, hint: str, ca: Path | None = None, *, server_name: str | None = None,
               wait_timeout_s: float = WAIT_TIMEOUT_S, request_timeout_s: float = REQUEST_TIMEOUT_S,
               answer_bytes_max: int = ANSWER_BYTES_MAX) -> None:
        self.base_url = base_url
        self.ca = ca  # HTTPS: the CA certificate trusted (it alone)
        self.server_name = server_name  # HTTPS: the name the certificate must hold, when not the host dialled
        self.wait_timeout_s, self.request_timeout_s = wait_timeout_s, request_timeout_s
        self.answer_bytes_max = answer_bytes_max
        self._headers = {"Authorization": f"Bearer {token}"}
        self._hint = hint
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> MsaClient:
        connector = None
        if self.ca is not None:
            connector = aiohttp.TCPConnector(ssl=client_context(self.ca))  # ConfigError naming the file
        self._session = aiohttp.ClientSession(headers=self._headers, connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, path: str, body: Any = None, *, params: Mapping[str, str] | None = None,
                      wait: bool = False, answer_bytes_max: int | None = None) -> Any:
        assert self._session is not None, "use MsaClient in 'async with'"
        limit_s = self.wait_timeout_s if wait else self.request_timeout_s
        bytes_max = self.answer_bytes_max if answer_bytes_max is None else answer_bytes_max
        timeout = aiohttp.ClientTimeout(total=limit_s, sock_connect=CONNECT_TIMEOUT_S)
        if wait:
            params = {**(params or {}), "wait": "1"}
        where = f"{method} {self.base_url}{path}"
        extra = {"server_hostname": self.server_name} if self.server_name is not None else {}
        try:
            # No redirect followed: a 3xx is an answer like any other (an error, below); a
            # followed one turned a POST into a GET whose answer was taken for the POST's.
            async with self._session.request(method, self.base_url + path, json=body, params=params, timeout=timeout,
                                             allow_redirects=False, **extra) as resp:
                status = resp.status
                raw = await _read_bounded(resp, bytes_max, where)
        except aiohttp.ClientConnectorCertificateError as exc:  # before its base class
            raise CdpError(describe_tls_error(exc.certificate_error, f"the daemon at {self.base_url}",
                                              self.ca)) from None
        except aiohttp.ClientConnectorSSLError as exc:
            raise CdpError(describe_tls_error(exc.os_error, f"the daemon at {self.base_url}", self.ca)) from None
        except aiohttp.ClientConnectorError as exc:
            raise DaemonNotRunning(f"no daemon at {self.base_url} ({exc.os_error.strerror or exc}): "
                                   f"{self._hint}") from None
        except aiohttp.ConnectionTimeoutError:  # a TimeoutError too: before it
            raise DaemonNotRunning(f"no daemon at {self.base_url} (no connection within {CONNECT_TIMEOUT_S:g} s): "
                                   f"{self._hint}") from None
        except TimeoutError:  # aiohttp's own timeouts are ClientErrors too: before them
            raise CdpError(f"{where}: the daemon did not answer within {limit_s:g} s: it is hung, or the "
                           f"network to it is") from None
        except aiohttp.ClientError as exc:
            raise CdpError(printable(f"{where}: {type(exc).__name__}: {exc}")) from None
        text = raw.decode("utf-8", errors="replace")
        try:
            doc = json.loads(text) if text else None
        except (ValueError, RecursionError):
            doc = None
        if status >= 300:
            raise _error(status, doc, text)
        if doc is None and text:
            return text  # /metrics
        return doc

    async def get(self, path: str, *, answer_bytes_max: int | None = None, **params: str) -> Any:
        return await self.request("GET", path, params=params or None, answer_bytes_max=answer_bytes_max)

    async def post(self, path: str, body: Any = None, *, wait: bool = False) -> Any:
        return await self.request("POST", path, body, wait=wait)


async def _read_bounded(resp: aiohttp.ClientResponse, bytes_max: int, where: str) -> bytes:
    """The answer's body, or a ``CdpError`` once it says or proves to be over
    ``bytes_max`` (never more than ``bytes_max`` + one chunk is held)."""
    too_large = f"{where}: the answer is over {bytes_max} bytes: not read (not an answer of a cdp daemon)"
    if resp.content_length is not None and resp.content_length > bytes_max:
        raise CdpError(too_large)
    raw = await read_at_most(resp.content, bytes_max + 1)
    if len(raw) > bytes_max:
        raise CdpError(too_large)
    return raw


def _error(status: int, doc: Any, text: str) -> DaemonError:
    """The ``DaemonError`` of a non-2xx answer: FORMAT.md §13.5's body when it is one,
    else the status and the start of the body; whatever the body's types."""
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        message = err.get("message")
        code = err.get("code")
        return DaemonError(f"daemon: {message if isinstance(message, str) and message else f'HTTP {status}'}",
                           status, code if isinstance(code, str) and code else "http_error", err.get("exit_code"),
                           err.get("field") if isinstance(err.get("field"), str) else None)
    if 300 <= status < 400:
        return DaemonError(f"daemon: HTTP {status}: a redirect, which a client of the cdp API does not follow",
                           status, "redirect")
    snippet = text[:SNIPPET_CHARS_MAX].strip()
    cut = "..." if len(text) > SNIPPET_CHARS_MAX else ""
    return DaemonError(f"daemon: HTTP {status}" + (f": {snippet}{cut}" if snippet else ""), status, "http_error")
