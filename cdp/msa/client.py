"""The CLI's client of the daemon's REST API.

The base URL is the site file's ``[api] listen`` (``https`` when the site's ``[tls]`` is
on: the daemon's certificate must then be signed by the site CA, which alone is
trusted, and hold the address dialled); the token comes from the environment variable
it names. The peer's API is HTTPS when ``[peer] ca`` names its CA. An error answer
becomes a ``DaemonError`` carrying the daemon's message and the exit code it chose
(FORMAT.md §13.5); no daemon at all is ``DaemonNotRunning``; a refused certificate is a
``CdpError`` that says why (``cdp.tls.describe_tls_error``).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from cdp.errors import CdpError, ConfigError
from cdp.msa.config import SiteConfig
from cdp.tls import client_context, describe_tls_error

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0  # a ?wait=1 request has no total limit: the job's timeout bounds it


class DaemonNotRunning(CdpError):
    """No daemon answers at the site's API address."""


class DaemonError(CdpError):
    """The daemon refused or failed a request; ``exit_code`` is the one it chose."""

    def __init__(self, message: str, status: int, code: str, exit_code: int = 1, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.field = status, code, field
        self.exit_code = exit_code


class MsaClient:
    """``async with MsaClient(cfg) as c: await c.get("/v1/status")``."""

    def __init__(self, cfg: SiteConfig, env: Mapping[str, str] = os.environ) -> None:
        self._setup(cfg.api_url, cfg.api_token(env), f"start it with `cdp daemon --config {cfg.path}`",
                    cfg.tls.ca_cert if cfg.tls is not None else None)

    @classmethod
    def for_peer(cls, cfg: SiteConfig, env: Mapping[str, str] = os.environ) -> MsaClient:
        """A client of the peer site's API (the site file's ``[peer]``)."""
        if cfg.peer is None:
            raise ConfigError(f"{cfg.path}: no [peer]: the address and token of the other site's API are needed")
        client = cls.__new__(cls)
        client._setup(cfg.peer.api_url, cfg.peer_token(env),
                      f"is site {cfg.peer.site}'s daemon running and reachable from here?", cfg.peer.ca)
        return client

    def _setup(self, base_url: str, token: str, hint: str, ca: Path | None = None) -> None:
        self.base_url = base_url
        self.ca = ca  # HTTPS: the CA certificate trusted (it alone)
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
                      wait: bool = False) -> Any:
        assert self._session is not None, "use MsaClient in 'async with'"
        timeout = aiohttp.ClientTimeout(total=None if wait else REQUEST_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S)
        if wait:
            params = {**(params or {}), "wait": "1"}
        try:
            async with self._session.request(method, self.base_url + path, json=body, params=params,
                                             timeout=timeout) as resp:
                text = await resp.text()
                status = resp.status
        except aiohttp.ClientConnectorCertificateError as exc:  # before its base class
            raise CdpError(describe_tls_error(exc.certificate_error, f"the daemon at {self.base_url}",
                                              self.ca)) from None
        except aiohttp.ClientConnectorSSLError as exc:
            raise CdpError(describe_tls_error(exc.os_error, f"the daemon at {self.base_url}", self.ca)) from None
        except aiohttp.ClientConnectorError as exc:
            raise DaemonNotRunning(f"no daemon at {self.base_url} ({exc.os_error.strerror or exc}): "
                                   f"{self._hint}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise CdpError(f"{method} {self.base_url}{path}: {type(exc).__name__}: {exc}") from None
        try:
            doc = json.loads(text) if text else None
        except ValueError:
            doc = None
        if status >= 400:
            err = doc.get("error") if isinstance(doc, dict) and isinstance(doc.get("error"), dict) else {}
            raise DaemonError(f"daemon: {err.get('message') or f'HTTP {status}'}", status,
                              str(err.get("code") or "http_error"), int(err.get("exit_code") or 1), err.get("field"))
        if doc is None and text:
            return text  # /metrics
        return doc

    async def get(self, path: str, **params: str) -> Any:
        return await self.request("GET", path, params=params or None)

    async def post(self, path: str, body: Any = None, *, wait: bool = False) -> Any:
        return await self.request("POST", path, body, wait=wait)
