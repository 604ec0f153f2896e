"""``SessionStream``: the DRVA's socket reader that receives large bodies in place —
exact bytes whatever the chunking, an end of stream mid-body, and the read-ahead bound."""

from __future__ import annotations

import asyncio
import os

import pytest

from drva.session import DIRECT_READ_BYTES, SessionStream
from tests.waiting import EVENTUALLY_S, wait_until

LIMIT = 256 << 10


async def _pair(limit: int = LIMIT):
    """(the server side's SessionStream, the client's writer, the server)."""
    got: asyncio.Future = asyncio.get_running_loop().create_future()
    server = await asyncio.get_running_loop().create_server(
        lambda: SessionStream(limit, lambda s, w: got.set_result(s)), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    async with asyncio.timeout(EVENTUALLY_S):
        stream = await got
    return stream, writer, server


@pytest.mark.parametrize("chunk", [1, 4093, 65536, 1 << 20])
async def test_reads_exact_bytes_of_small_and_large_messages_whatever_the_chunking(chunk):
    stream, writer, server = await _pair()
    sizes = [16, 3, DIRECT_READ_BYTES, DIRECT_READ_BYTES + 1, 16, 1 << 20, 5, (3 << 20) + 7, 16]
    if chunk == 1:
        sizes = sizes[:5]  # a byte a write: keep it short
    parts = [os.urandom(n) for n in sizes]
    data = b"".join(parts)

    async def send() -> None:
        for a in range(0, len(data), chunk):
            writer.write(data[a : a + chunk])
            await writer.drain()

    sending = asyncio.create_task(send())
    async with asyncio.timeout(EVENTUALLY_S):
        for want in parts:
            assert bytes(await stream.readexactly(len(want))) == want
        await sending
    writer.close()
    server.close()


async def test_end_of_stream_mid_body_is_an_incomplete_read():
    stream, writer, server = await _pair()
    writer.write(b"h" * 16 + b"x" * 100_000)
    await writer.drain()
    assert await stream.readexactly(16) == b"h" * 16
    writer.close()
    with pytest.raises(asyncio.IncompleteReadError) as ended:
        async with asyncio.timeout(EVENTUALLY_S):
            await stream.readexactly(1 << 20)
    assert ended.value.partial == b"x" * 100_000 and ended.value.expected == 1 << 20
    server.close()


async def test_stops_reading_while_its_read_ahead_is_full():
    # Nobody reads: the stream holds at most its read-ahead; TCP flow control does the rest.
    stream, writer, server = await _pair(limit=64 << 10)
    writer.write(b"z" * (16 << 20))
    await wait_until(lambda: stream._end - stream._start == 64 << 10 and stream._reading_paused, EVENTUALLY_S,
                     "the read-ahead full and reading paused")
    assert writer.transport.get_write_buffer_size() > 0  # the rest waits on the sender's side
    async with asyncio.timeout(EVENTUALLY_S):
        assert await stream.readexactly(16 << 20) == b"z" * (16 << 20)
    writer.close()
    server.close()


async def test_grow_keeps_the_unread_bytes_and_reads_on_into_the_larger_read_ahead():
    # A welcomed filter's stream grows from the handshake's read-ahead (drva.session).
    stream, writer, server = await _pair(limit=64 << 10)
    data = os.urandom(16 << 20)
    writer.write(data)
    await wait_until(lambda: stream._end - stream._start == 64 << 10 and stream._reading_paused, EVENTUALLY_S,
                     "the read-ahead full and reading paused")
    head = await stream.readexactly(10)  # the read-ahead now holds 64 KiB - 10 unread
    stream.grow(256 << 10)
    assert len(stream._ahead) == 256 << 10
    # Full again, then paused: flow control, not an unbounded buffer.
    await wait_until(lambda: stream._end - stream._start == 256 << 10 and stream._reading_paused, EVENTUALLY_S,
                     "the grown read-ahead full and reading paused again")
    async with asyncio.timeout(EVENTUALLY_S):
        rest = await stream.readexactly(len(data) - 10)
    assert head + bytes(rest) == data
    stream.grow(64 << 10)  # never shrinks
    assert stream._limit == 256 << 10
    writer.close()
    server.close()
