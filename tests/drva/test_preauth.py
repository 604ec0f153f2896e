"""Before WELCOME a peer is a stranger: what it may make a DRVA hold is bounded (issue 10).

FORMAT.md §9.1: before WELCOME only HELLO then AUTH are accepted, refused from their
header alone otherwise (a FRAME header announcing 66 MiB costs 16 bytes of reading, not
66 MiB); handshakes in progress are capped (``HANDSHAKES_MAX``, then ``ERROR busy``) and
each has a deadline. The acceptance test runs a real DRVA process and reads its RSS."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cdp import wire
from cdp.frame import FRAME_LEN_MAX
from drva import session as session_mod
from drva.daemon import Drva
from tests.drva.harness import (EVENTUALLY_S, DrvaProcess, config, domain_doc, drva_doc, free_port,
                                running_drva, two_domains, wait_until)
from tests.drva.test_protocol import expect_error, good_session_still_works, handshake, welcomed

SIZE = 8 << 20


@pytest.fixture
async def drva(tmp_path):
    async with running_drva(config(two_domains(tmp_path, "drva-p"))) as d:
        yield d


# ---------------------------------------------------------------------- header-level refusal


async def test_read_message_refuses_a_type_from_its_header_alone():
    reader = asyncio.StreamReader()
    reader.feed_data(wire.pack_header(wire.FRAME, FRAME_LEN_MAX, 0))  # no body, no EOF
    with pytest.raises(wire.ProtocolError) as refused:
        async with asyncio.timeout(EVENTUALLY_S):  # a read of the body would wait forever
            await wire.read_message(reader, "t", allowed=(wire.HELLO,))
    assert refused.value.code == "unexpected_message"
    assert "FRAME" in refused.value.message and "HELLO" in refused.value.message


@pytest.mark.parametrize("mtype,body_len", [
    (wire.FRAME, FRAME_LEN_MAX), (wire.SEED_CHUNK, wire.SEED_CHUNK_MAX + 16), (wire.PING, 2),
])
@pytest.mark.parametrize("phase", ["instead_of_hello", "instead_of_auth"])
async def test_only_hello_then_auth_before_welcome(drva, mtype, body_len, phase):
    reader, writer = await asyncio.open_connection("127.0.0.1", drva.port)
    if phase == "instead_of_auth":
        writer.writelines(wire.control(wire.HELLO, {"version": 1, "filter": "f", "site": "s",
                                                    "domains": [1], "nonce": "00" * 32}))
        assert (await wire.read_message(reader, "t")).type == wire.CHALLENGE
    writer.write(wire.pack_header(mtype, body_len, 0))  # the header only: no body follows
    await writer.drain()
    doc = await expect_error(reader, "unexpected_message")
    assert wire.TYPE_NAMES[mtype] in doc["message"]
    writer.close()
    await good_session_still_works(drva)


async def test_a_handshake_body_over_64_kib_is_refused_from_its_header(drva):
    reader, writer = await asyncio.open_connection("127.0.0.1", drva.port)
    writer.write(wire.pack_header(wire.HELLO, wire.CONTROL_BODY_MAX + 1, 0))
    await writer.drain()
    await expect_error(reader, "oversized")
    writer.close()


async def test_a_stranger_gets_the_handshakes_read_ahead_and_a_welcomed_filter_the_streams(drva):
    """Until WELCOME a connection may buffer HANDSHAKE_READ_AHEAD_BYTES (64 KiB, its
    largest body), then reading stops; once welcomed its read-ahead grows to
    STREAM_READ_AHEAD_BYTES with what it held unread kept (the frame after WELCOME)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", drva.port)
    writer.write(wire.pack_header(wire.HELLO, wire.CONTROL_BODY_MAX, 0) + bytes(wire.CONTROL_BODY_MAX - 1))
    await writer.drain()
    await wait_until(lambda: len(drva.handshaking) == 1, EVENTUALLY_S, "the stranger's handshake")
    stranger = next(iter(drva.handshaking)).reader
    await wait_until(lambda: stranger._end - stranger._start >= wire.CONTROL_BODY_MAX - 1, EVENTUALLY_S,
                     "the stranger's bytes to be read ahead")
    assert len(stranger._ahead) == session_mod.HANDSHAKE_READ_AHEAD_BYTES == wire.CONTROL_BODY_MAX
    writer.close()
    r2, w2, *_ = await handshake(drva, (2,))
    assert (await wire.read_message(r2, "t")).type == wire.WELCOME
    (session,) = [s for s in drva.sessions if 2 in s.domains]
    assert session.reader._limit == session_mod.STREAM_READ_AHEAD_BYTES
    w2.writelines(wire.control(wire.PING, {}))
    assert (await wire.read_message(r2, "t")).type == wire.PONG  # the stream still reads
    w2.close()
    await good_session_still_works(drva)


# ---------------------------------------------------------------------- caps and deadline


def _source(i: int) -> tuple[str, int]:
    """A local address for the i-th of HANDSHAKES_MAX connections: as many sources as
    it takes for them to hold every slot (one source holds HANDSHAKES_PER_SOURCE_MAX)."""
    return f"127.0.0.{2 + i // session_mod.HANDSHAKES_PER_SOURCE_MAX}", 0


async def test_handshakes_in_progress_are_capped(drva, monkeypatch):
    # The idle connections must outlive the test's steps, however slow the machine.
    monkeypatch.setattr(session_mod, "HANDSHAKE_TIMEOUT_S", 600.0)
    monkeypatch.setattr(session_mod, "HELLO_TIMEOUT_S", 600.0)
    idle = [await asyncio.open_connection("127.0.0.1", drva.port, local_addr=_source(i))
            for i in range(session_mod.HANDSHAKES_MAX)]
    await wait_until(lambda: len(drva.handshaking) == session_mod.HANDSHAKES_MAX, EVENTUALLY_S,
                     "every idle connection counted as a handshake")
    reader, writer = await asyncio.open_connection("127.0.0.1", drva.port)
    doc = await expect_error(reader, "busy")
    assert str(session_mod.HANDSHAKES_MAX) in doc["message"]
    writer.close()
    for _, w in idle:
        w.close()
    await wait_until(lambda: not drva.handshaking, EVENTUALLY_S, "the idle handshakes to end")
    await good_session_still_works(drva)


async def test_a_handshake_has_a_deadline(drva, monkeypatch):
    monkeypatch.setattr(session_mod, "HANDSHAKE_TIMEOUT_S", 0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", drva.port)
    hello = b"".join(wire.control(wire.HELLO, {"version": 1, "filter": "f", "site": "s",
                                               "domains": [1], "nonce": "00" * 32}))
    writer.write(hello[: len(hello) - 3])  # a HELLO that never completes
    await writer.drain()
    await expect_error(reader, "timeout")
    writer.close()
    await wait_until(lambda: not drva.handshaking, EVENTUALLY_S, "the handshake slot to be freed")


# ---------------------------------------------------------------------- RSS of a real DRVA

FLOOD_SOCKETS = 40
FLOOD_CHUNK = bytes(1 << 20)
RSS_SAMPLE_S = 0.02
# What the flood may add besides the read-aheads of the connections in their handshake
# (sessions, tasks, transports, the allocator's slack). With 256 KiB read-aheads before
# WELCOME the flood measured +4.0-4.1 MiB in all, the read-aheads alone (and +9.8 MiB,
# 40 of them, twice in a busy run); with the 64 KiB ones of HANDSHAKE_READ_AHEAD_BYTES,
# +0.8 MiB (three runs alone, three beside two CPU-bound processes).
FLOOD_OVERHEAD_KB = 3 << 10


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM (Linux >= 4.0: write 5 to clear_refs), so it measures the load only."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


async def _flood(port: int) -> int:
    """A FRAME header announcing the largest frame, then its body as fast as the DRVA
    takes it, unauthenticated. Returns the body bytes sent before the DRVA hung up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = 0
    try:
        writer.write(wire.pack_header(wire.FRAME, FRAME_LEN_MAX, 0))
        while sent < FRAME_LEN_MAX:
            chunk = FLOOD_CHUNK[: FRAME_LEN_MAX - sent]
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
    except OSError:
        pass  # refused and closed by the DRVA: what the test wants
    finally:
        writer.close()
    return sent


async def test_rss_stays_bounded_under_unauthenticated_big_bodies(tmp_path):
    port = free_port()
    doc = drva_doc(tmp_path, "drva-rss", [domain_doc(1, "erp", [("vm1", "d0", SIZE)])],
                   port=port, status_interval_s=0.2)
    proc = DrvaProcess(doc, tmp_path)
    proc.start()
    try:
        pid = proc.proc.pid
        status_path = Path(doc["state_dir"]) / "status.json"
        await wait_until(status_path.exists, EVENTUALLY_S, "the first status")
        idle_kb = _status_kb(pid, "VmRSS")
        peak_resettable = _reset_peak_rss(pid)
        peak_kb = idle_kb
        floods = [asyncio.create_task(_flood(port)) for _ in range(FLOOD_SOCKETS)]
        while not all(t.done() for t in floods):
            peak_kb = max(peak_kb, _status_kb(pid, "VmRSS"))
            await asyncio.wait(floods, timeout=RSS_SAMPLE_S)
        sent = [t.result() for t in floods]
        if peak_resettable:
            peak_kb = max(peak_kb, _status_kb(pid, "VmHWM"))
        assert proc.proc.poll() is None, "the DRVA died under the flood"
        print(f"\nDRVA RSS: idle {idle_kb / 1024:.1f} MiB, peak under {FLOOD_SOCKETS} sockets "
              f"{peak_kb / 1024:.1f} MiB, body bytes accepted per socket max {max(sent)}")
        assert peak_kb <= 2 * idle_kb, f"RSS peaked at {peak_kb} KiB, idle was {idle_kb} KiB"
        # Only the connections in their handshake hold a read-ahead: those refused busy
        # at accept never allocate one.
        bound_kb = session_mod.HANDSHAKES_MAX * session_mod.HANDSHAKE_READ_AHEAD_BYTES // 1024 + FLOOD_OVERHEAD_KB
        assert peak_kb - idle_kb <= bound_kb, f"RSS grew {peak_kb - idle_kb} KiB under the flood (bound {bound_kb})"

        settled: list[int] = []

        def rss_back() -> bool:
            settled.append(_status_kb(pid, "VmRSS"))
            return settled[-1] <= idle_kb * 5 // 4

        await wait_until(rss_back, EVENTUALLY_S, "the DRVA's RSS to return near idle")
        print(f"DRVA RSS after the sockets closed: {settled[-1] / 1024:.1f} MiB")
        # And it still serves: a filter handshakes and is welcomed.
        await _welcomed(port)
        before = json.loads(status_path.read_text())["time"]
        await wait_until(lambda: json.loads(status_path.read_text())["time"] > before, EVENTUALLY_S,
                         "a status rewrite")
    finally:
        proc.stop()


async def _welcomed(port: int) -> None:
    _, writer = await welcomed(port)
    writer.close()


async def test_a_tls_handshake_has_the_same_deadline(tmp_path, monkeypatch):
    """The TLS handshake is part of the wire handshake's deadline: a peer that opens a
    TCP connection to a TLS DRVA and says nothing is dropped at that deadline, not after
    asyncio's default 60 s."""
    from drva import daemon as daemon_mod
    from tests.drva.test_tls_trace import self_signed

    monkeypatch.setattr(daemon_mod, "HANDSHAKE_TIMEOUT_S", 0.5, raising=False)
    cert, key = self_signed(tmp_path)
    doc = drva_doc(tmp_path, "drva-tls-p", [domain_doc(1, "erp", [("vm1", "d0", SIZE)])],
                   tls={"cert": str(cert), "key": str(key)})
    d = Drva(config(doc), exit_on_task_failure=False)
    await d.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", d.port)  # plain TCP, silent
        async with asyncio.timeout(EVENTUALLY_S):
            assert await reader.read() == b""  # the DRVA closed it
        writer.close()
    finally:
        await d.stop()


async def test_tls_handshakes_take_their_slot_at_accept(tmp_path, monkeypatch):
    """With TLS the cap counts from accept: sixteen peers that open TCP and never start
    their TLS handshake hold every slot, a seventeenth is closed at once (it could not
    read an ERROR before TLS); a plain peer's failed TLS handshake is counted and logged;
    once the slots are free a TLS filter is served."""
    import ssl

    import numpy as np

    from drva import daemon as daemon_mod
    from iofilter_sim.client import FilterClient
    from iofilter_sim.filter import DomainFilter
    from tests.drva.harness import SECRET, Disk, random_writes
    from tests.drva.test_tls_trace import self_signed

    monkeypatch.setattr(daemon_mod, "HANDSHAKE_TIMEOUT_S", 600.0)  # the silent peers outlive the test
    cert, key = self_signed(tmp_path)
    doc = drva_doc(tmp_path, "drva-tls-cap", [domain_doc(1, "erp", [("vm1", "d0", SIZE)])],
                   tls={"cert": str(cert), "key": str(key)})
    d = Drva(config(doc), exit_on_task_failure=False)
    await d.start()
    silent = []
    try:
        silent = [await asyncio.open_connection("127.0.0.1", d.port, local_addr=_source(i))
                  for i in range(daemon_mod.HANDSHAKES_MAX)]
        await wait_until(lambda: d.tls_handshaking == daemon_mod.HANDSHAKES_MAX, EVENTUALLY_S,
                         "every silent TLS connection to hold a slot")
        reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
        async with asyncio.timeout(EVENTUALLY_S):
            assert await reader.read() == b""  # closed at once, nothing sent
        writer.close()
        assert d.refused_busy == 1 and d.tls_handshaking == daemon_mod.HANDSHAKES_MAX
        for _, w in silent:
            w.close()
        await wait_until(lambda: d.tls_handshaking == 0, EVENTUALLY_S, "the silent connections' slots to be freed")

        assert d.refused_tls == daemon_mod.HANDSHAKES_MAX  # each closed mid-handshake: counted too
        # A plain filter's HELLO is no TLS ClientHello: refused, counted, its slot freed.
        reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
        writer.write(b"".join(wire.control(wire.HELLO, {"version": 1, "filter": "f", "site": "s",
                                                        "domains": [1], "nonce": "00" * 32})))
        async with asyncio.timeout(EVENTUALLY_S):
            await reader.read()
        writer.close()
        await wait_until(lambda: d.refused_tls == daemon_mod.HANDSHAKES_MAX + 1 and d.tls_handshaking == 0,
                         EVENTUALLY_S,
                         "the plain peer's TLS handshake to be refused")
        assert not d.handshaking

        disk = Disk(tmp_path / "p.img", SIZE)
        f = DomainFilter(1, [disk])
        client = FilterClient([f], "127.0.0.1", d.port, SECRET.encode(), "host-1",
                              tls=ssl.create_default_context(cafile=str(cert)))
        task = asyncio.create_task(client.run())
        try:
            f.capture(*random_writes(np.random.default_rng(1), [SIZE], 32, 16))
            await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "acks over TLS")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        for _, w in silent:
            w.close()
        await d.stop()
