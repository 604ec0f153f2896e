"""Peers and neighbours that try to wear a DRVA down (FORMAT.md §9.1, §13.6): a welcomed
peer that PINGs and never reads, strangers holding handshake slots, and malformed
entries in the requests directory. Each stays bounded to what it is owed; the DRVA and
its other peers go on."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import pytest

from cdp import wire
from drva import session as session_mod
from drva.handshakes import HandshakeSlots, source_of
from drva.requests import requests_dir
from tests.drva.harness import SECRET, config, running_drva, two_domains
from tests.drva.test_protocol import expect_error, good_session_still_works
from tests.waiting import EVENTUALLY_S, wait_until


@pytest.fixture
async def drva(tmp_path):
    async with running_drva(config(two_domains(tmp_path, "drva-p"))) as d:
        yield d


async def welcomed_over(reader, writer, domains=(1,), name: str = "host-1") -> None:
    """HELLO, AUTH and WELCOME over a connection the caller opened."""
    nonce = wire.new_nonce()
    writer.writelines(wire.control(wire.HELLO, {"version": 1, "filter": name, "site": "s",
                                                "domains": list(domains), "nonce": nonce.hex()}))
    ch = (await wire.read_message(reader, "t")).json("t")
    mac = wire.filter_mac(SECRET.encode(), nonce, bytes.fromhex(ch["nonce"]), name)
    writer.writelines(wire.control(wire.AUTH, {"mac": mac}))
    assert (await wire.read_message(reader, "t")).type == wire.WELCOME


# ---------------------------------------------------------------------- finding 5: PING, never read

async def test_pings_from_a_peer_that_never_reads_leave_the_write_buffer_bounded(drva, monkeypatch):
    bound = 64 << 10  # ACK_WRITE_BUFFER_MAX is 1 MiB; a smaller one makes the same point faster
    monkeypatch.setattr(session_mod, "ACK_WRITE_BUFFER_MAX", bound)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # little for the kernel to hold for us
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", drva.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    await welcomed_over(reader, writer)
    (session,) = drva.sessions
    session.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer.transport.pause_reading()  # from here on this peer reads nothing
    ping = b"".join(wire.control(wire.PING, {}))
    pong_len = len(b"".join(wire.control(wire.PONG, {})))
    writer.write(ping * (4 * bound // pong_len))  # four times the bound in PONGs owed
    # Messages are handled in order: once this one is, every PING before it was.
    writer.writelines(wire.control(wire.FILTER_STATE, {"domain": 1, "mode": "normal", "captured_seq": 7,
                                                       "captured_ts": 1, "buffered_bytes": 0, "dirty_bytes": 0}))
    await writer.drain()
    await wait_until(lambda: drva.domains[1].filter_state.get("captured_seq") == 7, EVENTUALLY_S,
                     "every PING handled")
    unsent = session.writer.transport.get_write_buffer_size()
    # Full up to the bound (the peer does not read), and not one message past it.
    assert bound < unsent <= bound + 64, unsent
    await good_session_still_works(drva)
    writer.close()


# ---------------------------------------------------------------------- finding 7: handshake slots

def test_one_source_holds_at_most_its_share_of_the_handshake_slots():
    slots = HandshakeSlots(total_max=16, per_source_max=4)
    for _ in range(4):
        slots.take("10.0.0.1")
    assert slots.refusal("10.0.0.1") == "4 handshakes in progress from 10.0.0.1"
    assert slots.refusal("10.0.0.2") is None  # another filter is not kept out
    for source in ("10.0.0.2", "10.0.0.3", "10.0.0.4"):
        for _ in range(4):
            slots.take(source)
    assert slots.taken == 16 and slots.refusal("10.0.0.9") == "16 handshakes in progress"
    slots.release("10.0.0.1")
    assert slots.refusal("10.0.0.1") is None and slots.held_by("10.0.0.1") == 3
    with pytest.raises(AssertionError):
        slots.release("10.0.0.9")  # a slot it never took


@pytest.mark.parametrize("peer, source", [
    (("10.1.2.3", 4000), "10.1.2.3"),
    (("::ffff:10.1.2.3", 4000, 0, 0), "10.1.2.3"),  # IPv4 on a dual-stack socket
    (("2001:db8::1", 4000, 0, 0), "2001:db8::/64"),
    (("2001:db8::ffff:1", 4000, 0, 0), "2001:db8::/64"),  # the same /64: the same source
    (("2001:db8:0:1::1", 4000, 0, 0), "2001:db8:0:1::/64"),
    (("fe80::1%eth0", 4000, 0, 2), "fe80::/64"),
    (None, "None"),
])
def test_the_source_of_a_peer(peer, source):
    assert source_of(peer) == source


async def test_one_source_cannot_take_every_handshake_slot(drva, monkeypatch):
    """Idle connections from 127.0.0.2 hold its four slots; a fifth from there is
    refused busy at once, and a filter from another address is welcomed meanwhile."""
    monkeypatch.setattr(session_mod, "HANDSHAKE_TIMEOUT_S", 600.0)  # the idle ones outlive the test
    monkeypatch.setattr(session_mod, "HELLO_TIMEOUT_S", 600.0)
    hog = ("127.0.0.2", 0)
    idle = [await asyncio.open_connection("127.0.0.1", drva.port, local_addr=hog)
            for _ in range(session_mod.HANDSHAKES_PER_SOURCE_MAX)]
    await wait_until(lambda: len(drva.handshaking) == session_mod.HANDSHAKES_PER_SOURCE_MAX, EVENTUALLY_S,
                     "the idle connections' handshakes")
    reader, writer = await asyncio.open_connection("127.0.0.1", drva.port, local_addr=hog)
    doc = await expect_error(reader, "busy")
    assert f"{session_mod.HANDSHAKES_PER_SOURCE_MAX} handshakes in progress from 127.0.0.2" in doc["message"], doc
    writer.close()
    await good_session_still_works(drva)  # from 127.0.0.1
    assert drva.status()["handshakes"] == session_mod.HANDSHAKES_PER_SOURCE_MAX
    for _, w in idle:
        w.close()
    await wait_until(lambda: not drva.handshaking and not drva.slots.taken, EVENTUALLY_S, "every slot given back")


async def test_a_connection_without_a_hello_gives_its_slot_back_early(drva, monkeypatch):
    monkeypatch.setattr(session_mod, "HELLO_TIMEOUT_S", 0.2)  # HANDSHAKE_TIMEOUT_S stays 10 s
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", drva.port)
    started = loop.time()
    doc = await expect_error(reader, "timeout")
    assert "no complete HELLO in 0.2 s" in doc["message"], doc
    assert loop.time() - started < session_mod.HANDSHAKE_TIMEOUT_S
    writer.close()
    await wait_until(lambda: not drva.handshaking and not drva.slots.taken, EVENTUALLY_S, "the slot given back")


# ---------------------------------------------------------------------- finding 8: requests directory

async def test_malformed_requests_are_dropped_and_the_request_task_goes_on(drva):
    reader, writer = await asyncio.open_connection("127.0.0.1", drva.port)
    await welcomed_over(reader, writer)
    box = requests_dir(drva.cfg.state_dir)
    (box / "mark-a.json").write_text('{"domain": 1, "name": "\\ud800"}')  # a lone surrogate
    (box / "mark-b.json").write_text("[" * 2000 + "]" * 2000)  # deeper than the decoder recurses
    (box / "mark-b2.json").write_text("[" * 100000 + "]" * 100000)  # and too big to read at all
    (box / "mark-c.json").mkdir()
    os.symlink("/etc/hostname", box / "mark-d.json")
    os.mkfifo(box / "mark-e.json")  # opening it to read must not block the loop
    (box / "mark-f.json").write_bytes(b'{"domain": 1, "name": "\xff"}')  # not UTF-8
    (box / os.fsdecode(b"mark-\xff.json")).write_text("{}")  # a name that is not UTF-8 either
    (box / "mark-z.json").write_text(json.dumps({"domain": 1, "name": "after"}))  # sorted last: one poll
    async with asyncio.timeout(EVENTUALLY_S):
        while (msg := await wire.read_message(reader, "t")).type != wire.MARK_REQUEST:
            pass
    assert msg.json("t") == {"domain": 1, "name": "after"}
    (task,) = [t for t in drva.tasks if t.get_name() == "requests"]
    assert not task.done()
    assert sorted(p.name for p in box.iterdir()) == ["mark-c.json"]  # not the DRVA's to remove
    writer.close()
