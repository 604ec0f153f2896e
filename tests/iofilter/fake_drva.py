"""A DRVA for the filter's side of the wire, in the test's own event loop.

It does the real handshake (it proves the site secret, so the filter streams to it),
then takes frames as a DRVA does (FORMAT.md §9.2): records at or below the highest seq
accepted are duplicates and dropped, a frame that starts after a gap is refused. What it
accepted replays into disk images (``image``), to compare with the filter's primaries
byte for byte. The test decides what is durable (``hold``/``release``: staged but not
durable, as on a slow log device), when to say back-pressure, when the connection drops
(``drop``) and what a DRVA restart loses (``forget_staged``). For the next connection
only (later ones are honest again), ``challenge`` and ``welcome`` may change the honest
CHALLENGE and WELCOME bodies and ``script`` replaces what it does after WELCOME: a
hostile DRVA. A script that never reads waits for ``closing``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from cdp import wire
from cdp.frame import decode_frame
from cdp.records import KIND_RESYNC_BEGIN, KIND_RESYNC_END, KIND_WRITE, KIND_ZERO, payload_lengths

SECRET = b"s" * 32

Script = Callable[["FakeDrva", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Body = Callable[[dict[str, Any]], dict[str, Any]]


class FakeDrva:
    """One domain's DRVA (see the module docstring)."""

    def __init__(self, domain: int = 1, *, secret: bytes = SECRET) -> None:
        self.domain = domain
        self.secret = secret
        self.accepted = 0  # highest seq taken
        self.cap: int | None = None  # durable is at most this (None: all accepted is durable)
        self.backpressure = False
        self.records: dict[int, tuple[int, int, int, int, bytes]] = {}  # seq -> kind, disk, offset, length, payload
        self.gaps: list[tuple[int, int]] = []  # (accepted, first_seq) of refused frames
        self.connections = 0
        self.script: Script | None = None
        self.challenge: Body | None = None
        self.welcome: Body | None = None
        self.closing = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        self.closing.set()
        if self._writer is not None:
            self._writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # ------------------------------------------------------------------ what the test drives

    @property
    def durable_seq(self) -> int:
        return self.accepted if self.cap is None else min(self.accepted, self.cap)

    def hold(self) -> None:
        """From now on what is accepted stays staged, not durable (a stalled log device)."""
        self.cap = self.durable_seq

    def release(self) -> None:
        """Everything accepted is durable; say so."""
        self.cap = None
        self.backpressure = False
        self.ack()

    def ack(self, durable_seq: int | None = None) -> None:
        """An ACK on the current connection (of ``durable_seq``: a lie, if given)."""
        if self._writer is not None and not self._writer.is_closing():
            flags = wire.ACK_BACKPRESSURE if self.backpressure else 0
            seq = self.durable_seq if durable_seq is None else durable_seq
            self._writer.writelines(wire.ack_message(self.domain, seq, flags))

    def drop(self) -> None:
        """The connection breaks (a network blip)."""
        if self._writer is not None:
            self._writer.transport.abort()

    def forget_staged(self) -> None:
        """A DRVA restart: what was accepted but not durable is gone."""
        self.accepted = self.durable_seq
        self.records = {s: r for s, r in self.records.items() if s <= self.accepted}

    def image(self, disk: int, size: int) -> bytes:
        """Disk ``disk`` as a recovery at the latest point would rebuild it."""
        out = bytearray(size)
        for seq in sorted(self.records):
            kind, d, offset, length, payload = self.records[seq]
            if d != disk:
                continue
            if kind == KIND_WRITE:
                out[offset : offset + length] = payload
            elif kind == KIND_ZERO:
                out[offset : offset + length] = bytes(length)
        return bytes(out)

    def windows(self) -> list[tuple[int, int | None]]:
        """The resync windows as a catalog records them: (first seq, last seq or None)."""
        out: list[tuple[int, int | None]] = []
        for seq in sorted(self.records):
            kind = self.records[seq][0]
            if kind == KIND_RESYNC_BEGIN and (not out or out[-1][1] is not None):
                out.append((seq, None))
            elif kind == KIND_RESYNC_END and out and out[-1][1] is None:
                out[-1] = (out[-1][0], seq - 1)
        return out

    # ------------------------------------------------------------------ a connection

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writer = writer
        script, self.script = self.script, None
        challenge, self.challenge = self.challenge or _same, None
        welcome, self.welcome = self.welcome or _same, None
        try:
            hello = (await wire.read_message(reader, "fake")).json("fake")
            nonce, drva_nonce = bytes.fromhex(hello["nonce"]), wire.new_nonce()
            writer.writelines(wire.control(wire.CHALLENGE, challenge({"drva": "fake", "nonce": drva_nonce.hex()})))
            await wire.read_message(reader, "fake")  # AUTH: not checked, the filter's MAC is not the point
            doc = {"mac": wire.drva_mac(self.secret, nonce, drva_nonce, "fake"),
                   "domains": {str(d): {"durable_seq": self.durable_seq} for d in hello["domains"]}}
            writer.writelines(wire.control(wire.WELCOME, welcome(doc)))
            await writer.drain()
            if script is not None:
                await script(self, reader, writer)
                return
            while True:
                msg = await wire.read_message(reader, "fake")
                if msg.type == wire.FRAME and self.take(msg.body):
                    self.ack()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.transport.abort()

    def take(self, body: bytes) -> bool:
        """Accept a frame's new records; the connection ends after a gap."""
        first, last, contents = frame_contents(body)
        if first > self.accepted + 1:
            self.gaps.append((self.accepted, first))
            raise ConnectionError(f"gap: accepted {self.accepted}, frame starts at {first}")
        for seq, content in contents.items():
            if seq > self.accepted:  # else a duplicate: dropped, whatever it holds
                self.records[seq] = content
        self.accepted = max(self.accepted, last)
        return True


def _same(doc: dict[str, Any]) -> dict[str, Any]:
    return doc


def frame_contents(body: bytes) -> tuple[int, int, dict[int, tuple[int, int, int, int, bytes]]]:
    """(first seq, last seq, each record's (kind, disk, offset, length, payload) by seq)."""
    frame = decode_frame(body, "fake")
    lengths = payload_lengths(frame.records)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    out = {}
    for i, rec in enumerate(frame.records):
        at, n = int(starts[i]), int(lengths[i])
        out[int(rec["seq"])] = (int(rec["kind"]), int(rec["disk"]), int(rec["offset"]), int(rec["length"]),
                                bytes(frame.payload[at : at + n]))
    return frame.first_seq, frame.last_seq, out
