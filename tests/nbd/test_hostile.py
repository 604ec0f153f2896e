"""Hostile and broken clients on raw sockets: each gets the protocol's error or loses its
connection, and after each the server still serves a fresh qemu-io client."""

from __future__ import annotations

import pytest

from cdp.nbd import protocol as nbd
from tests.nbd.conftest import EXPORT_SIZES, MiB, Served, run_tool
from tests.nbd.raw_client import RawClient

KiB = 1024


async def still_serves(served: Served, offset: int = 6 * MiB) -> None:
    """A fresh real client writes and reads back, and the bytes are in the file."""
    await served.server.wait_connections()
    assert served.server.connection_count == 0
    await run_tool("qemu-io", "-f", "raw", "-c", f"write -P 0x42 {offset} 64k", "-c", f"read -P 0x42 {offset} 64k",
                   served.uri())
    assert served.file_bytes()[offset : offset + 64 * KiB] == b"\x42" * (64 * KiB)


async def test_unknown_client_flags_close_the_connection(served: Served) -> None:
    client = await RawClient.connect(served.tcp)
    await client.greet(client_flags=0xFFFF_FFFF)
    assert await client.closed_by_server()
    await still_serves(served)


async def test_bad_option_magic_closes_the_connection(served: Served) -> None:
    client = await RawClient.connect(served.unix)
    await client.greet()
    await client.send(b"IHAVEOPX" + nbd.pack_option(nbd.OPT_LIST)[8:])
    assert await client.closed_by_server()
    await still_serves(served)


async def test_huge_option_gets_too_big_then_close(served: Served) -> None:
    client = await RawClient.connect(served.tcp)
    await client.greet()
    await client.send(nbd.pack_option(nbd.OPT_GO)[:12] + (0xFFFF_FF00).to_bytes(4, "big"))
    [(option, reply_type, _)] = await client.option_replies()
    assert (option, reply_type) == (nbd.OPT_GO, nbd.REP_ERR_TOO_BIG)
    assert await client.closed_by_server()
    await still_serves(served)


async def test_unknown_option_then_go_and_read(served: Served) -> None:
    client = await RawClient.connect(served.tcp)
    await client.greet()
    for option in (0x1234, nbd.OPT_STARTTLS, nbd.OPT_SET_META_CONTEXT):
        [(got, reply_type, message)] = await client.option(option, b"whatever")
        assert (got, reply_type) == (option, nbd.REP_ERR_UNSUP)
        assert message  # a reason for a human
    [(_, reply_type, _)] = await client.option(nbd.OPT_LIST, b"x")  # LIST takes no data
    assert reply_type == nbd.REP_ERR_INVALID
    [(_, reply_type, _)] = await client.option(nbd.OPT_GO, b"\x00\x00\x10\x00vm")  # name length overruns
    assert reply_type == nbd.REP_ERR_INVALID
    [(_, reply_type, _)] = await client.option(nbd.OPT_INFO, nbd.pack_info_request("vm/none"))
    assert reply_type == nbd.REP_ERR_UNKNOWN
    replies = await client.option(nbd.OPT_GO, nbd.pack_info_request("vm/disk", (nbd.INFO_DESCRIPTION,)))
    assert replies[-1][1] == nbd.REP_ACK
    assert (nbd.OPT_GO, nbd.REP_INFO, nbd.pack_info_string(nbd.INFO_DESCRIPTION, "first disk of vm")) in replies
    await client.request(nbd.CMD_WRITE, 7, 4096, 512, payload=b"\x33" * 512)
    assert (await client.reply()).error == 0
    await client.request(nbd.CMD_READ, 8, 4096, 512)
    assert (await client.reply(512)).data == b"\x33" * 512
    await client.request(nbd.CMD_DISC, 9, 0, 0)
    assert await client.closed_by_server()
    assert served.file_bytes()[4096:4608] == b"\x33" * 512


async def test_export_name_of_unknown_export_closes(served: Served) -> None:
    client = await RawClient.connect(served.tcp)
    await client.greet()
    await client.send(nbd.pack_option(nbd.OPT_EXPORT_NAME, b"vm/none"))
    assert await client.closed_by_server()
    await still_serves(served)


async def test_export_name_old_style_without_zeroes(served: Served) -> None:
    client = await RawClient.connect(served.tcp)
    await client.greet(client_flags=nbd.FLAG_C_FIXED_NEWSTYLE)  # not NO_ZEROES: 124 zeros follow
    await client.send(nbd.pack_option(nbd.OPT_EXPORT_NAME, b"vm/disk2"))
    reply = await client.read(10 + 124)
    assert int.from_bytes(reply[:8], "big") == EXPORT_SIZES["vm/disk2"]
    assert int.from_bytes(reply[8:10], "big") & nbd.TFLAG_SEND_FLUSH
    assert reply[10:] == bytes(124)
    await client.request(nbd.CMD_READ, 1, 0, 4096)
    got = await client.reply(4096)
    assert (got.error, got.handle, got.data) == (0, 1, bytes(4096))
    await client.close()
    await still_serves(served)


@pytest.mark.parametrize("structured", [False, True])
async def test_refused_requests_keep_the_connection(served: Served, structured: bool) -> None:
    size = EXPORT_SIZES["vm/disk"]
    client = await RawClient.connect(served.tcp)
    await client.go("vm/disk", structured=structured)
    cases = [
        (nbd.CMD_READ, size - 512, 1024, 0, b"", nbd.EINVAL),  # read past the end
        (nbd.CMD_READ, 1 << 63, 512, 0, b"", nbd.EINVAL),
        (nbd.CMD_WRITE, size, 512, 0, b"\x01" * 512, nbd.ENOSPC),  # write past the end: payload consumed
        (nbd.CMD_WRITE_ZEROES, size - 512, 4096, 0, b"", nbd.ENOSPC),
        (nbd.CMD_TRIM, size, 512, 0, b"", nbd.EINVAL),
        (nbd.CMD_WRITE, 100, 512, 0, b"\x02" * 512, nbd.EINVAL),  # not aligned to 512
        (nbd.CMD_READ, 0, 64 << 20, 0, b"", nbd.EINVAL),  # past the maximum block size
        (nbd.CMD_READ, 0, 512, nbd.CMD_FLAG_NO_HOLE, b"", nbd.EINVAL),  # a flag reads do not take
        (nbd.CMD_FLUSH, 512, 0, 0, b"", nbd.EINVAL),
        (nbd.CMD_BLOCK_STATUS, 0, 512, 0, b"", nbd.EINVAL),  # not negotiated
        (99, 0, 512, 0, b"", nbd.EINVAL),
    ]
    for handle, (command, offset, length, flags, payload, want) in enumerate(cases, start=100):
        await client.request(command, handle, offset, length, flags, payload)
        got = await client.reply()
        assert (got.error, got.handle) == (want, handle), (command, offset, length)
    await client.request(nbd.CMD_WRITE, 1, 8192, 4096, nbd.CMD_FLAG_FUA, b"\x5e" * 4096)
    assert (await client.reply()).error == 0
    await client.request(nbd.CMD_READ, 2, 8192, 4096)
    assert (await client.reply(4096)).data == b"\x5e" * 4096
    await client.request(nbd.CMD_READ, 3, 0, 0)  # a zero-length read is answered, not fatal
    assert (await client.reply()).error == 0
    await client.close()
    data = served.file_bytes()
    assert data[8192 : 8192 + 4096] == b"\x5e" * 4096
    assert data.count(0) == len(data) - 4096  # none of the refused writes touched the file
    await still_serves(served)


async def test_writes_on_read_only_export_get_eperm(served: Served) -> None:
    client = await RawClient.connect(served.tcp)
    _, tflags = await client.go("vm/ro")
    assert tflags & nbd.TFLAG_READ_ONLY and not tflags & nbd.TFLAG_SEND_TRIM
    await client.request(nbd.CMD_WRITE, 1, 0, 512, payload=b"\x00" * 512)
    assert (await client.reply()).error == nbd.EPERM
    await client.request(nbd.CMD_TRIM, 2, 0, 512)
    assert (await client.reply()).error == nbd.EPERM
    await client.request(nbd.CMD_READ, 3, 0, 512)
    assert (await client.reply(512)).data == b"\x5a" * 512
    await client.close()


async def test_oversized_write_is_refused_then_closed(served: Served) -> None:
    client = await RawClient.connect(served.tcp)
    await client.go("vm/disk")
    await client.request(nbd.CMD_WRITE, 5, 0, 0xFFFF_F000)  # 4 GiB we will not read
    got = await client.reply()
    assert (got.error, got.handle) == (nbd.EINVAL, 5)
    assert await client.closed_by_server()
    await still_serves(served)


async def test_disconnect_in_the_middle_of_a_write_payload(served: Served) -> None:
    client = await RawClient.connect(served.unix)
    await client.go("vm/disk")
    await client.request(nbd.CMD_WRITE, 1, 0, 64 * KiB, payload=b"\xfe" * (10 * KiB))
    await client.close()
    await still_serves(served)
    assert served.file_bytes()[: 64 * KiB] == bytes(64 * KiB)  # the torn write never reached the file
