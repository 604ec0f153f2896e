"""A DRVA that breaks the protocol (a bug, or a host holding the site secret) ends its
session, never the filter: each control body is checked whole before anything acts on
it, types the filter never takes are refused from their header, PONGs stop while the
DRVA does not read them — and the next, honest, connection replicates as ever.

Before: a WELCOME whose durable_seq was "x", a domain given as a list, a mark name with
a lone surrogate and five other shapes each ended ``FilterClient.run()`` for good (no
replication until the filter restarted); a FRAME header made the filter wait for 64 MiB
of body; a PING flood grew the filter's memory by 18 bytes a PING.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp import wire
from iofilter_sim.client import PONG_WRITE_BUFFER_MAX, FilterClient
from iofilter_sim.disks import PrimaryDisk
from iofilter_sim.filter import DomainFilter
from tests.iofilter.fake_drva import SECRET, Body, FakeDrva, Script
from tests.iofilter.test_seqs_and_acks import write
from tests.waiting import EVENTUALLY_S, wait_until

SIZE = 1 << 20


def sends(mtype: int, doc: dict[str, Any]) -> Script:
    """A script: one control message after WELCOME, then read until the filter hangs up."""
    async def script(fake: FakeDrva, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.writelines(wire.control(mtype, doc))
        await writer.drain()
        await reader.read()
    return script


async def frame_header(fake: FakeDrva, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(wire.pack_header(wire.FRAME, 64 << 20, 0))  # and never a byte of the body
    await writer.drain()
    await reader.read()


def welcome_domains(domains: Any) -> Body:
    return lambda doc: {**doc, "domains": domains}


@dataclass(frozen=True)
class Case:
    name: str
    expected: str  # in the error the session ended with
    challenge: Body | None = None
    welcome: Body | None = None
    script: Script | None = None


CASES = [
    Case("CHALLENGE drva name with a lone surrogate", "CHALLENGE.drva", challenge=lambda d: {**d, "drva": "\ud800"}),
    Case("WELCOME domains is a list", "WELCOME.domains", welcome=welcome_domains([1])),
    Case("WELCOME durable_seq not a number", "WELCOME.domains.1.durable_seq",
         welcome=welcome_domains({"1": {"durable_seq": "x"}})),
    Case("WELCOME durable_seq true", "WELCOME.domains.1.durable_seq",
         welcome=welcome_domains({"1": {"durable_seq": True}})),
    Case("WELCOME durable_seq past 2**63 - 1", "WELCOME.domains.1.durable_seq",
         welcome=welcome_domains({"1": {"durable_seq": 2**64 - 1}})),
    Case("WELCOME domain key not a number", "WELCOME.domains key", welcome=welcome_domains({"one": {}})),
    Case("WELCOME domain state not an object", "WELCOME.domains.1", welcome=welcome_domains({"1": 7})),
    Case("WELCOME without the domain", "expected the domains of the HELLO", welcome=welcome_domains({})),
    Case("WELCOME with another domain", "expected the domains of the HELLO",
         welcome=welcome_domains({"1": {"durable_seq": 0}, "2": {"durable_seq": 0}})),
    Case("WELCOME with an unknown field", "unknown field 'extra'", welcome=lambda d: {**d, "extra": 1}),
    Case("SEED_DONE without domain", "SEED_DONE.domain", script=sends(wire.SEED_DONE, {})),
    Case("SEED_DONE of a disk not streamed", "not a disk this session streams", script=sends(wire.SEED_DONE, {
        "domain": 1, "disk": 9, "base_seq": 0, "chunks_stored": 0, "chunks_deduplicated": 0})),
    Case("MARK_REQUEST name with a lone surrogate", "MARK_REQUEST.name",
         script=sends(wire.MARK_REQUEST, {"domain": 1, "name": "\ud800"})),
    Case("MARK_REQUEST domain is a list", "MARK_REQUEST.domain",
         script=sends(wire.MARK_REQUEST, {"domain": [1], "name": "m"})),
    Case("ERROR fenced with domain a list", "ERROR.domain",
         script=sends(wire.ERROR, {"code": "fenced", "domain": [1], "message": "m", "fatal": True})),
    Case("ERROR without fatal", "ERROR.fatal", script=sends(wire.ERROR, {"code": "x", "message": "m"})),
    Case("PING with a body", "PING: unknown field", script=sends(wire.PING, {"x": 1})),
    Case("a FRAME header", "FRAME (67108864 bytes) where", script=frame_header),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_a_malformed_message_ends_only_its_session(tmp_path, case: Case) -> None:
    disk = PrimaryDisk(tmp_path / "d.img", SIZE)
    f = DomainFilter(1, [disk])
    fake = FakeDrva()
    fake.challenge, fake.welcome, fake.script = case.challenge, case.welcome, case.script
    await fake.start()
    client = FilterClient([f], "127.0.0.1", fake.port, SECRET, "host-1")
    task = asyncio.create_task(client.run())
    try:
        await wait_until(lambda: task.done() or (fake.connections >= 2 and client.connected), EVENTUALLY_S,
                         "a second, honest session")
        assert not task.done(), f"the filter's client ended: {task.exception()!r}"
        assert case.expected in (client.last_error or ""), client.last_error
        assert "ProtocolError" in (client.last_error or ""), client.last_error
        write(f, [0, 5], ord("A"))  # and the honest session replicates
        await wait_until(lambda: f.acked_seq == f.next_seq - 1 == fake.durable_seq, EVENTUALLY_S, "the write acked")
        assert f.next_seq == 3  # numbered from 1: no WELCOME of the hostile session was taken
        assert fake.image(0, SIZE) == disk.read(0, SIZE)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await fake.close()


# ---------------------------------------------------------------- any body, straight into the receiver

class _Transport:
    def get_write_buffer_size(self) -> int:
        return 0


class _Writer:
    transport = _Transport()

    def writelines(self, parts: Any) -> None:
        pass


class _Disk:
    size = SIZE


VALUES = st.one_of(st.integers(-1, 3), st.integers(), st.booleans(), st.none(), st.floats(allow_nan=False),
                   st.text(max_size=300), st.sampled_from(["fenced", "\ud800", "m", "a" * 256]),
                   st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
KEYS = st.sampled_from(["domain", "disk", "name", "code", "message", "fatal", "base_seq", "chunks_stored",
                        "chunks_deduplicated", "x"])
SESSION_TYPES = [wire.ACK, wire.ERROR, wire.SEED_DONE, wire.PING, wire.PONG, wire.MARK_REQUEST]


async def _receive_one(mtype: int, doc: dict[str, Any]) -> None:
    f = DomainFilter(1, [_Disk()])
    client = FilterClient([f], "127.0.0.1", 9, SECRET, "host-1")
    client._writer = _Writer()  # type: ignore[assignment]
    reader = asyncio.StreamReader()
    reader.feed_data(b"".join(wire.control(mtype, doc)))
    reader.feed_eof()
    try:
        await client._receive(reader, "t")
    except (wire.ProtocolError, asyncio.IncompleteReadError):
        pass  # refused, or all read: the session ends either way, and only it


@settings(max_examples=300, deadline=None)
@given(mtype=st.sampled_from([wire.ERROR, wire.SEED_DONE, wire.PING, wire.PONG, wire.MARK_REQUEST]),
       doc=st.dictionaries(KEYS, VALUES, max_size=6))
def test_any_control_body_is_taken_or_refused_never_a_crash(mtype, doc) -> None:
    asyncio.run(_receive_one(mtype, doc))


# ---------------------------------------------------------------- a PING flood

async def test_a_ping_flood_from_a_drva_that_never_reads_costs_a_bounded_buffer(tmp_path) -> None:
    f = DomainFilter(1, [PrimaryDisk(tmp_path / "d.img", SIZE)])
    fake = FakeDrva()
    go = asyncio.Event()

    async def flood(fake: FakeDrva, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await go.wait()
        pings = b"".join(wire.control(wire.PING, {})) * 65536  # 1.2 MB
        for _ in range(2):
            writer.write(pings)
            await writer.drain()
        writer.writelines(wire.control(wire.MARK_REQUEST, {"domain": 1, "name": "after-the-flood"}))
        await writer.drain()
        await fake.closing.wait()  # and never read a byte

    fake.script = flood
    await fake.start()
    client = FilterClient([f], "127.0.0.1", fake.port, SECRET, "host-1")
    marked = asyncio.Event()
    client.on_mark = lambda domain, name, seq: marked.set()
    task = asyncio.create_task(client.run())
    try:
        await wait_until(lambda: client._writer is not None, EVENTUALLY_S, "the WELCOME")
        # Small kernel buffers, so what the filter queues shows in its own buffer at once.
        client._writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        go.set()
        async with asyncio.timeout(EVENTUALLY_S):
            await marked.wait()  # every PING before it was read
        queued = client._writer.transport.get_write_buffer_size()
        assert queued <= PONG_WRITE_BUFFER_MAX + 4096, f"{queued} bytes queued for a DRVA that reads nothing"
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await fake.close()


# ---------------------------------------------------------------- the backstop

async def test_an_unexpected_error_ends_the_session_not_the_client_and_a_cancel_still_stops(tmp_path) -> None:
    """Whatever escapes a session (here a bug in a mark callback) is logged and the
    client reconnects with its backoff; a cancellation still ends ``run()``."""
    disk = PrimaryDisk(tmp_path / "d.img", SIZE)
    f = DomainFilter(1, [disk])
    fake = FakeDrva()
    fake.script = sends(wire.MARK_REQUEST, {"domain": 1, "name": "m1"})
    await fake.start()
    client = FilterClient([f], "127.0.0.1", fake.port, SECRET, "host-1")
    calls = []

    def on_mark(domain: int, name: str, seq: int) -> None:
        calls.append(name)
        raise RuntimeError("a bug in the mark callback")

    client.on_mark = on_mark
    task = asyncio.create_task(client.run())
    try:
        await wait_until(lambda: task.done() or (fake.connections >= 2 and client.connected), EVENTUALLY_S,
                         "a second session")
        assert not task.done(), f"the filter's client ended: {task.exception()!r}"
        assert calls == ["m1"] and "RuntimeError: a bug in the mark callback" in (client.last_error or "")
        write(f, [1], ord("Z"))
        await wait_until(lambda: f.acked_seq == f.next_seq - 1 == fake.durable_seq, EVENTUALLY_S, "the write acked")
        assert fake.image(0, SIZE) == disk.read(0, SIZE)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await fake.close()
    assert task.cancelled()
