"""The address ``cdp`` dials for the site's API (``SiteConfig.api_url``) and the peer's
(``PeerSpec.api_url``): a wildcard ``[api] listen`` is dialled at the loopback address of
its family — with TLS on, at a name the API's certificate holds — and an IPv6 address is
written in brackets. A stand-in API (aiohttp with the site's real certificate) listens
on a socket bound to port 0; the real ``MsaClient`` calls it."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from cdp import site_files
from cdp.errors import CdpError
from cdp.msa.client import MsaClient
from cdp.msa.config import PeerSpec, SiteConfig, load_site_config
from cdp.pki import ensure_site_pki
from cdp.testing.site import TOKEN, inventory_doc, site_doc
from cdp.tls import server_context
from cdp.tomlread import Endpoint

ENV = {"CDP_API_TOKEN": TOKEN}


def bound(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds "::": IPv6 only
    sock.bind((host, 0))
    return sock


def site_listening(root: Path, listen: str, *, tls: bool) -> SiteConfig:
    """A site file whose ``[api] listen`` is ``listen`` (the port is the stand-in's); with
    ``tls``, its CA and API certificate made as ``cdp install`` makes them."""
    host, _, port = listen.rpartition(":")
    doc = site_doc(1, 2, int(port), log_size="8MiB", protect=("erp",), recovery_roots=[str(root)],
                   tls={"mode": "on"} if tls else None)
    path = site_files.write_site(root, doc, inventory_doc(1, 2))
    path.write_text(path.read_text().replace(f'"127.0.0.1:{port}"', f'"{listen}"'))
    cfg = load_site_config(path)
    assert cfg.api_listen == Endpoint(host.strip("[]"), int(port))
    if tls:
        ensure_site_pki(cfg.tls.files, cfg.site, [cfg.tls.api_leaf(cfg.api_listen)])
    return cfg


@asynccontextmanager
async def stand_in(sock: socket.socket, cfg: SiteConfig) -> AsyncIterator[None]:
    async def status(request: web.Request) -> web.Response:
        return web.json_response({"site": "site-t"})

    app = web.Application()
    app.router.add_get("/v1/status", status)
    runner = web.AppRunner(app)
    await runner.setup()
    ssl = server_context(cfg.tls.api_cert, cfg.tls.api_key) if cfg.tls is not None else None
    await web.SockSite(runner, sock, ssl_context=ssl).start()
    try:
        yield
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("wildcard", "dialled"), [("0.0.0.0", "127.0.0.1"), ("::", "[::1]")])
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_a_wildcard_listen_is_dialled_at_the_loopback_address(tmp_path, wildcard, dialled, tls):
    sock = bound(wildcard)
    port = sock.getsockname()[1]
    listen = f"[{wildcard}]:{port}" if ":" in wildcard else f"{wildcard}:{port}"
    cfg = site_listening(tmp_path / "site", listen, tls=tls)
    assert cfg.api_url == f"{'https' if tls else 'http'}://{dialled}:{port}"
    async with stand_in(sock, cfg), MsaClient(cfg, ENV) as client:
        assert await client.get("/v1/status") == {"site": "site-t"}


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
async def test_an_ipv6_listen_is_dialled_in_brackets(tmp_path, tls):
    sock = bound("::1")
    port = sock.getsockname()[1]
    cfg = site_listening(tmp_path / "site", f"[::1]:{port}", tls=tls)
    assert cfg.api_url == f"{'https' if tls else 'http'}://[::1]:{port}"
    async with stand_in(sock, cfg), MsaClient(cfg, ENV) as client:
        assert await client.get("/v1/status") == {"site": "site-t"}
    assert PeerSpec("b", Endpoint("::1", 8443), "T", ca=Path("ca.pem")).api_url == "https://[::1]:8443"
    assert PeerSpec("b", Endpoint("dr-b.example", 80), "T").api_url == "http://dr-b.example:80"


async def test_an_address_the_certificate_does_not_hold_is_said_so(tmp_path):
    """An IP address not in the certificate (OpenSSL's code 64, not the host name's 62)
    gets the sentence that says what to do."""
    sock = bound("0.0.0.0")
    port = sock.getsockname()[1]
    cfg = site_listening(tmp_path / "site", f"0.0.0.0:{port}", tls=True)
    client = MsaClient.at(f"https://127.0.0.2:{port}", TOKEN, "hint", ca=cfg.tls.ca_cert)
    async with stand_in(sock, cfg), client:
        with pytest.raises(CdpError, match=r"certificate is not for the name dialled \(IP address mismatch.*"
                                           r"add the name to \[tls\] server_names"):
            await client.get("/v1/status")
