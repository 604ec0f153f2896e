"""Property tests of the NBD codec, and of the server on random client bytes."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.nbd import protocol as nbd
from cdp.nbd.backend import FileBackend
from cdp.nbd.server import NbdServer
from tests.nbd.raw_client import RawClient

u16 = st.integers(0, (1 << 16) - 1)
u32 = st.integers(0, (1 << 32) - 1)
u64 = st.integers(0, (1 << 64) - 1)
names = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=300)
info_lists = st.lists(u16, max_size=20).map(tuple)


@given(flags=u16, command=u16, handle=u64, offset=u64, length=u32)
def test_request_round_trip(flags: int, command: int, handle: int, offset: int, length: int) -> None:
    raw = nbd.pack_request(command, handle, offset, length, flags)
    assert len(raw) == nbd.REQUEST_SIZE
    assert nbd.parse_request(raw) == nbd.Request(flags, command, handle, offset, length)


@given(raw=st.binary(min_size=nbd.REQUEST_SIZE, max_size=nbd.REQUEST_SIZE))
def test_any_request_bytes_parse_or_are_refused(raw: bytes) -> None:
    try:
        req = nbd.parse_request(raw)
    except nbd.NbdProtocolError:
        assert raw[:4] != nbd.REQUEST_MAGIC.to_bytes(4, "big")
        return
    assert nbd.pack_request(req.command, req.handle, req.offset, req.length, req.flags) == raw


@given(name=names, wanted=info_lists)
def test_info_request_round_trip(name: str, wanted: tuple[int, ...]) -> None:
    assert nbd.parse_info_request(nbd.pack_info_request(name, wanted)) == (name, wanted)


@given(name=names, wanted=info_lists, data=st.data())
def test_truncated_info_request_is_invalid(name: str, wanted: tuple[int, ...], data: st.DataObject) -> None:
    raw = nbd.pack_info_request(name, wanted)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(nbd.OptionInvalid):
        nbd.parse_info_request(raw[:cut])


@given(name=names, wanted=info_lists, data=st.data())
def test_flipped_info_request_parses_or_is_invalid(name: str, wanted: tuple[int, ...], data: st.DataObject) -> None:
    raw = bytearray(nbd.pack_info_request(name, wanted))
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] ^= data.draw(st.integers(1, 255))
    try:
        got_name, got_wanted = nbd.parse_info_request(bytes(raw))
    except nbd.OptionInvalid:
        return
    assert "\x00" not in got_name and len(got_name.encode()) <= nbd.STRING_BYTES_MAX
    assert nbd.pack_info_request(got_name, got_wanted) == bytes(raw)


@given(raw=st.binary(max_size=nbd.STRING_BYTES_MAX + 8))
def test_export_names_are_utf8_without_nul(raw: bytes) -> None:
    try:
        name = nbd.parse_export_name(raw)
    except nbd.OptionInvalid:
        return
    assert name.encode() == raw and "\x00" not in name and len(raw) <= nbd.STRING_BYTES_MAX


@given(raw=st.binary(min_size=nbd.OPTION_HEADER_SIZE, max_size=nbd.OPTION_HEADER_SIZE))
def test_option_header_bounds_the_length(raw: bytes) -> None:
    try:
        option, length = nbd.parse_option_header(raw)
    except nbd.OptionTooBig as exc:
        assert int.from_bytes(raw[12:16], "big") > nbd.OPTION_BYTES_MAX
        assert exc.option == int.from_bytes(raw[8:12], "big")
        return
    except nbd.NbdProtocolError:
        assert raw[:8] != nbd.IHAVEOPT
        return
    assert raw[:8] == nbd.IHAVEOPT and length <= nbd.OPTION_BYTES_MAX


@given(raw=st.binary(min_size=4, max_size=4))
def test_client_flags(raw: bytes) -> None:
    flags = int.from_bytes(raw, "big")
    try:
        assert nbd.parse_client_flags(raw) == flags
    except nbd.NbdProtocolError:
        assert flags & ~nbd.CLIENT_FLAGS_KNOWN or not flags & nbd.FLAG_C_FIXED_NEWSTYLE
        return
    assert flags in (1, 3)


_COMMANDS = st.sampled_from([nbd.CMD_READ, nbd.CMD_WRITE, nbd.CMD_DISC, nbd.CMD_FLUSH, nbd.CMD_TRIM,
                             nbd.CMD_CACHE, nbd.CMD_WRITE_ZEROES, nbd.CMD_BLOCK_STATUS, 17])
_LIMITS = st.builds(nbd.ExportLimits, size=st.integers(0, 1 << 40).map(lambda n: n - n % 512),
                    read_only=st.booleans(), block_min=st.just(512), block_max=st.just(nbd.REQUEST_BYTES_MAX),
                    structured=st.booleans())


@given(flags=st.integers(0, 31), command=_COMMANDS, offset=st.one_of(u64, st.integers(0, 1 << 41)),
       length=u32, limits=_LIMITS)
def test_accepted_requests_are_in_bounds(flags: int, command: int, offset: int, length: int,
                                         limits: nbd.ExportLimits) -> None:
    """What request_error lets through is exactly what a backend may be handed."""
    req = nbd.Request(flags, command, 1, offset, length)
    code, message = nbd.request_error(req, limits)
    assert code in (0, nbd.EINVAL, nbd.ENOSPC, nbd.EPERM)
    assert bool(code) == bool(message)
    if code or command in (nbd.CMD_FLUSH, nbd.CMD_DISC):
        return
    assert command in (nbd.CMD_READ, nbd.CMD_WRITE, nbd.CMD_TRIM, nbd.CMD_WRITE_ZEROES)
    assert offset + length <= limits.size
    assert offset % 512 == 0 and length % 512 == 0
    assert command == nbd.CMD_TRIM or length <= nbd.REQUEST_BYTES_MAX
    assert not (limits.read_only and command != nbd.CMD_READ)


@given(info_type=st.sampled_from([nbd.INFO_NAME, nbd.INFO_DESCRIPTION]), text=st.text(max_size=5000))
def test_info_strings_are_capped_on_a_character_boundary(info_type: int, text: str) -> None:
    raw = nbd.pack_info_string(info_type, text)
    body = raw[2:].decode("utf-8")  # never a cut character
    assert len(raw) - 2 <= nbd.STRING_BYTES_MAX and text.startswith(body)


# --------------------------------------------------------------------------- the server on random bytes

_SERVER_SIZE = 64 << 10


async def _random_client_then_good_one(sock: Path, backend: FileBackend, stage: str, junk: bytes) -> None:
    server = NbdServer({"d": backend}, handshake_timeout_s=5.0)
    await server.start_unix(sock)
    try:
        client = await RawClient.connect(str(sock))
        if stage == "handshake":
            await client.read(18)
        elif stage == "options":
            await client.greet()
        else:
            await client.go("d", structured=stage == "structured")
        await client.send(junk)
        client.writer.write_eof()  # the server answers what it can, then sees the end
        assert await client.closed_by_server()
        await client.close()
        await server.wait_connections()
        assert server.connection_count == 0
        good = await RawClient.connect(str(sock))
        size, _ = await good.go("d")
        assert size == _SERVER_SIZE
        await good.request(nbd.CMD_READ, 1, 0, 512)
        assert (await good.reply(512)).error == 0
        await good.close()
    finally:
        await server.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stage=st.sampled_from(["handshake", "options", "simple", "structured"]),
       junk=st.one_of(st.binary(max_size=300),
                      st.lists(st.sampled_from([
                          nbd.pack_option(nbd.OPT_LIST), nbd.pack_option(nbd.OPT_GO, nbd.pack_info_request("d")),
                          nbd.pack_request(nbd.CMD_READ, 1, 0, 512), nbd.pack_request(nbd.CMD_WRITE, 2, 0, 512),
                          bytes(512), nbd.pack_request(nbd.CMD_DISC, 3, 0, 0), b"\xff" * 28,
                      ]), max_size=6).map(b"".join)))
def test_server_survives_random_bytes(stage: str, junk: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="nbdfuzz") as tmp:
        path = Path(tmp) / "d.img"
        path.write_bytes(bytes(_SERVER_SIZE))
        backend = FileBackend(path)
        try:
            asyncio.run(_random_client_then_good_one(Path(tmp) / "s", backend, stage, junk))
        finally:
            backend.close()
