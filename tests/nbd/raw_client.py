"""A bare NBD client over asyncio streams, for the tests that play a hostile client.

It speaks just enough of the protocol (through ``cdp.nbd.protocol``'s client-side
packers) to reach any state, then lets a test send whatever bytes it likes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from cdp.nbd import protocol as nbd

#: Safety net for a read that should complete at once; a hang fails the test, never passes it.
REPLY_TIMEOUT_S = 10.0


@dataclass
class Reply:
    error: int
    handle: int
    data: bytes


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, address: tuple[str, int] | str) -> RawClient:
        if isinstance(address, str):
            reader, writer = await asyncio.open_unix_connection(address)
        else:
            reader, writer = await asyncio.open_connection(*address)
        return cls(reader, writer)

    async def read(self, n: int) -> bytes:
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            return await self.reader.readexactly(n)

    async def send(self, *parts: bytes) -> None:
        self.writer.writelines(parts)
        await self.writer.drain()

    async def greet(self, client_flags: int = nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES) -> int:
        flags = nbd.parse_greeting(await self.read(18))
        await self.send(nbd.pack_client_flags(client_flags))
        return flags

    async def option_replies(self) -> list[tuple[int, int, bytes]]:
        """(option, reply type, data) up to and including the final reply of one option."""
        replies = []
        while True:
            option, reply_type, length = nbd.parse_option_reply_header(await self.read(nbd.OPTION_REPLY_HEADER_SIZE))
            data = await self.read(length) if length else b""
            replies.append((option, reply_type, data))
            if reply_type not in (nbd.REP_SERVER, nbd.REP_INFO):
                return replies

    async def option(self, option: int, data: bytes = b"") -> list[tuple[int, int, bytes]]:
        await self.send(nbd.pack_option(option, data))
        return await self.option_replies()

    async def go(self, name: str, structured: bool = False) -> tuple[int, int]:
        """Handshake into the transmission phase of ``name``: (size, transmission flags)."""
        await self.greet()
        if structured:
            [(_, reply_type, _)] = await self.option(nbd.OPT_STRUCTURED_REPLY)
            assert reply_type == nbd.REP_ACK
        replies = await self.option(nbd.OPT_GO, nbd.pack_info_request(name))
        assert replies[-1][1] == nbd.REP_ACK, replies
        for _, _, data in replies[:-1]:
            if data[:2] == b"\x00\x00":  # NBD_INFO_EXPORT
                return int.from_bytes(data[2:10], "big"), int.from_bytes(data[10:12], "big")
        raise AssertionError(f"no NBD_INFO_EXPORT in {replies}")

    async def request(self, command: int, handle: int, offset: int, length: int, flags: int = 0,
                      payload: bytes = b"") -> None:
        await self.send(nbd.pack_request(command, handle, offset, length, flags), payload)

    async def reply(self, read_length: int = 0) -> Reply:
        """The next reply, simple or structured (with structured replies on, the server may
        still answer non-reads simply); ``read_length`` is the data a simple READ reply carries."""
        magic = await self.read(4)
        if int.from_bytes(magic, "big") == nbd.SIMPLE_REPLY_MAGIC:
            error, handle = nbd.parse_simple_reply(magic + await self.read(nbd.SIMPLE_REPLY_SIZE - 4))
            data = await self.read(read_length) if read_length and not error else b""
            return Reply(error, handle, data)
        data, error, head = bytearray(), 0, magic + await self.read(nbd.CHUNK_HEADER_SIZE - 4)
        while True:
            flags, reply_type, handle, length = nbd.parse_chunk_header(head)
            payload = await self.read(length) if length else b""
            if reply_type == nbd.REPLY_TYPE_OFFSET_DATA:
                data += payload[8:]
            elif reply_type & 0x8000:
                error = int.from_bytes(payload[:4], "big")
            if flags & nbd.REPLY_FLAG_DONE:
                return Reply(error, handle, bytes(data))
            head = await self.read(nbd.CHUNK_HEADER_SIZE)

    async def closed_by_server(self) -> bool:
        """True when the server has closed the connection (reads give end of stream)."""
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            try:
                while await self.reader.read(65536):
                    pass
            except ConnectionError:
                pass
        return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass
