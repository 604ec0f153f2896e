"""The DRVA's wire protocol and its refusals (FORMAT.md §9), against an in-process DRVA.

Each bad input is refused with a logged reason and an ERROR; the DRVA stays up, and its
log is untouched (the log tail does not move)."""

from __future__ import annotations

import asyncio
import logging
import struct

import numpy as np
import pytest

from cdp import wire
from cdp.frame import decode_frame, encode_frame
from cdp.records import empty_records
from drva.daemon import Drva
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import SECRET, Disk, config, domain_doc, drva_doc, random_writes, running_drva, two_domains
from tests.waiting import EVENTUALLY_S, wait_until

SIZE = 8 << 20


@pytest.fixture
async def drva(tmp_path):
    async with running_drva(config(two_domains(tmp_path, "drva-t"))) as d:
        yield d


async def handshake(drva: Drva | int, domains=(1,), secret: str = SECRET, name: str = "host-1"):
    """HELLO and AUTH to a DRVA (in process, or its port); the answer to AUTH is unread."""
    port = drva if isinstance(drva, int) else drva.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    nonce = wire.new_nonce()
    writer.writelines(wire.control(wire.HELLO, {"version": 1, "filter": name, "site": "s",
                                                "domains": list(domains), "nonce": nonce.hex()}))
    ch = (await wire.read_message(reader, "t")).json("t")
    dn = bytes.fromhex(ch["nonce"])
    writer.writelines(wire.control(wire.AUTH, {"mac": wire.filter_mac(secret.encode(), nonce, dn, name)}))
    return reader, writer, nonce, dn, ch["drva"]


async def welcomed(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An authenticated session with a DRVA process that may still be opening its
    catalogs: ``not_ready`` is retried, as the filter client does; anything else fails."""
    deadline = asyncio.get_running_loop().time() + EVENTUALLY_S
    while True:
        reader, writer, *_ = await handshake(port)
        msg = await wire.read_message(reader, "t")
        if msg.type == wire.WELCOME:
            return reader, writer
        writer.close()
        assert msg.type == wire.ERROR and msg.json("t")["code"] == "not_ready", msg
        assert asyncio.get_running_loop().time() < deadline, "the DRVA never opened its catalog"
        await asyncio.sleep(0.05)


async def expect_error(reader, code: str) -> dict:
    """The ERROR ``code``, then the end of the connection."""
    async with asyncio.timeout(EVENTUALLY_S):
        while True:
            msg = await wire.read_message(reader, "t")
            if msg.type == wire.ERROR:
                doc = msg.json("t")
                assert doc["code"] == code, doc
                with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
                    await wire.read_message(reader, "t")
                return doc


def frame(first_seq: int, n: int = 4, domain: int = 1) -> bytes:
    rec = empty_records(n)
    rec["seq"] = np.arange(first_seq, first_seq + n)
    rec["timestamp_ns"] = 1
    rec["offset"] = np.arange(n) * 4096
    rec["length"] = 4096
    return encode_frame(domain, rec, bytes(range(256)) * 16 * n)


async def send_frame(writer, raw: bytes) -> None:
    writer.writelines(wire.frame_message([raw]))
    await writer.drain()


async def good_session_still_works(drva: Drva) -> None:
    """A new session of domain 2 is welcome and its frame (seqs 1..2) made durable. Also
    a barrier: the committer takes frames in order, one commit at a time, so anything a
    refused session got staged before it was refused is in the log by now."""
    reader, writer, nonce, dn, name = await handshake(drva, (2,))
    welcome = await wire.read_message(reader, "t")
    assert welcome.type == wire.WELCOME
    assert wire.mac_matches(wire.drva_mac(SECRET.encode(), nonce, dn, name), welcome.json("t")["mac"])
    await send_frame(writer, frame(1, 2, domain=2))
    await wait_until(lambda: drva.domains[2].durable_seq >= 2, EVENTUALLY_S, "the good session's frame")
    writer.close()


def log_since(drva: Drva, tail: int) -> list[tuple[int, int, int]]:
    """(domain, first seq, last seq) of every log entry from position ``tail``."""
    frames = [decode_frame(body) for _, body in drva.log.entries(tail)]
    return [(f.domain, f.first_seq, f.last_seq) for f in frames]


async def test_handshake_welcome_proves_the_drva_and_frames_are_acked(drva):
    reader, writer, nonce, dn, name = await handshake(drva)
    welcome = (await wire.read_message(reader, "t")).json("t")
    assert wire.mac_matches(wire.drva_mac(SECRET.encode(), nonce, dn, name), welcome["mac"])
    assert welcome["domains"] == {"1": {"durable_seq": 0}}
    await send_frame(writer, frame(1))
    await send_frame(writer, frame(5))
    acked = 0
    async with asyncio.timeout(EVENTUALLY_S):
        while acked < 8:
            msg = await wire.read_message(reader, "t")
            if msg.type == wire.ACK:
                _, _, acked, _ = wire.parse_ack(msg.body, "t")
    assert drva.domains[1].durable_seq == 8
    # A resend of acked records is dropped, and a partial overlap is cut.
    await send_frame(writer, frame(5))
    await send_frame(writer, frame(7, 4))  # seqs 7..10: 9 and 10 are new
    await wait_until(lambda: drva.domains[1].durable_seq == 10, EVENTUALLY_S, "the cut frame")
    assert drva.domains[1].stats.duplicates_dropped == 1
    writer.close()


@pytest.mark.parametrize("case", ["wrong_secret", "unknown_domain", "bad_version", "garbage"])
async def test_handshake_refusals(drva, case, caplog):
    tail = drva.log.tail
    caplog.set_level(logging.INFO)
    if case == "garbage":
        reader, writer = await asyncio.open_connection("127.0.0.1", drva.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await expect_error(reader, "bad_message")
    elif case == "bad_version":
        reader, writer = await asyncio.open_connection("127.0.0.1", drva.port)
        writer.writelines(wire.control(wire.HELLO, {"version": 9, "filter": "f", "domains": [1],
                                                    "nonce": "00" * 32}))
        await expect_error(reader, "unsupported_version")
    else:
        secret = "not-the-secret-at-all" if case == "wrong_secret" else SECRET
        domains = (7,) if case == "unknown_domain" else (1,)
        reader, writer, *_ = await handshake(drva, domains, secret)
        await expect_error(reader, "bad_auth" if case == "wrong_secret" else "unknown_domain")
    assert "session_refused" in caplog.text
    assert "not-the-secret" not in caplog.text
    assert drva.log.tail == tail
    await good_session_still_works(drva)


def corrupt(raw: bytes, at: int) -> bytes:
    b = bytearray(raw)
    b[at] ^= 0x40
    return bytes(b)


def backwards(raw: bytes) -> bytes:
    rec = np.frombuffer(raw[64 : 64 + 40 * 4], dtype=np.dtype([("seq", "<u8"), ("rest", "V32")])).copy()
    rec["seq"][2] = rec["seq"][1] - 1  # seq goes backwards inside the frame, checksums redone
    import xxhash
    body = rec.tobytes() + raw[64 + 160 :]
    header = bytearray(raw[:64])
    struct.pack_into("<Q", header, 40, xxhash.xxh3_64_intdigest(body))
    struct.pack_into("<Q", header, 56, xxhash.xxh3_64_intdigest(bytes(header[:56])))
    return bytes(header) + body


@pytest.mark.parametrize("case,code", [
    ("flipped_payload", "bad_frame"), ("flipped_header", "bad_frame"), ("seq_backwards", "bad_frame"),
    ("seq_gap", "seq_gap"), ("other_domain", "unknown_domain"), ("oversized", "oversized"),
    ("bad_body_sum", "bad_checksum"),
])
async def test_bad_frames_are_refused_and_the_log_is_untouched(drva, case, code, caplog):
    caplog.set_level(logging.INFO)
    reader, writer, *_ = await handshake(drva)
    assert (await wire.read_message(reader, "t")).type == wire.WELCOME
    await send_frame(writer, frame(1))
    await wait_until(lambda: drva.domains[1].durable_seq == 4, EVENTUALLY_S, "the first frame")
    tail = drva.log.tail
    if case == "flipped_payload":
        await send_frame(writer, corrupt(frame(5), 64 + 160 + 100))
    elif case == "flipped_header":
        await send_frame(writer, corrupt(frame(5), 20))
    elif case == "seq_backwards":
        await send_frame(writer, backwards(frame(5)))
    elif case == "seq_gap":
        await send_frame(writer, frame(50))
    elif case == "other_domain":
        await send_frame(writer, frame(1, domain=2))
    elif case == "oversized":
        writer.write(wire.pack_header(wire.FRAME, 1 << 30, 0))
    elif case == "bad_body_sum":
        writer.write(wire.pack_header(wire.PING, 2, 12345) + b"{}")
    await expect_error(reader, code)
    assert "session_refused" in caplog.text
    await good_session_still_works(drva)  # also a barrier for a late commit of the bad frame
    assert log_since(drva, tail) == [(2, 1, 2)] and drva.domains[1].durable_seq == 4


async def test_truncated_frame_then_disconnect_changes_nothing(drva):
    reader, writer, *_ = await handshake(drva)
    await wire.read_message(reader, "t")
    raw = frame(1)
    writer.write(wire.pack_header(wire.FRAME, len(raw), 0) + raw[:100])
    await writer.drain()
    writer.close()
    await wait_until(lambda: drva.domains[1].session is None, EVENTUALLY_S, "the DRVA to end the session")
    await good_session_still_works(drva)  # also a barrier for a late commit of the cut frame
    assert log_since(drva, 0) == [(2, 1, 2)] and drva.domains[1].accepted_seq == 0


async def test_memory_stays_bounded_under_a_sender_faster_than_the_path(tmp_path):
    """The store hangs: the log fills, the DRVA stops reading, the filter's buffer fills and
    it falls back to bitmap mode; DRVA staging stays under its bound throughout."""
    from cdp.store.faulty import FaultyStore
    from cdp.store.fs import FileStore

    doc = drva_doc(tmp_path, "drva-m", [domain_doc(1, "erp", [("vm1", "d0", 64 << 20)])],
                   log_size="12MiB", seal_bytes="1MiB")
    d = Drva(config(doc), exit_on_task_failure=False)
    await d.start()
    # The catalog's first generation is a put: hanging puts before it lands kept the DRVA
    # not_ready for good, the filter was never welcomed and the log stayed empty (the
    # cause of this test's failures on a loaded machine).
    await wait_until(lambda: d.domains[1].catalog_ready, EVENTUALLY_S, "the catalog open")
    faulty = FaultyStore(FileStore(tmp_path / "store"))
    faulty.hang("put")
    d.shipper.store = faulty
    disk = Disk(tmp_path / "p.img", 64 << 20)
    f = DomainFilter(1, [disk], buffer_bytes_max=16 << 20)
    client = FilterClient([f], "127.0.0.1", d.port, SECRET.encode(), "host-1")
    task = asyncio.create_task(client.run())
    rng = np.random.default_rng(3)
    peak_staged = 0
    loop = asyncio.get_running_loop()

    def offer() -> None:
        nonlocal peak_staged
        f.capture(*random_writes(rng, [64 << 20], 64, 64))  # ~1 MiB
        peak_staged = max(peak_staged, d.committer._staged_bytes)

    # First the log fills (12 MiB). The sender keeps at most 8 MiB waiting in the filter
    # meanwhile: on a starved machine a DRVA that reads slowly must not let the filter's
    # buffer fill first (it then goes to bitmap mode and sends nothing more, and the log
    # never fills: a run under load showed exactly that).
    deadline = loop.time() + EVENTUALLY_S
    while not d.committer.backpressure:
        assert loop.time() < deadline, f"the log never filled up to its high water: {d.log.stats()}, filter {f.mode}"
        if f.buffered_bytes < 8 << 20:
            offer()
        await asyncio.sleep(0.005)
    # Then the DRVA reads no more: the filter's buffer fills and it falls back to bitmap.
    while f.mode != "bitmap":
        assert loop.time() < deadline, "the filter never fell back to bitmap mode"
        offer()
        await asyncio.sleep(0.005)
    assert f.stats["bitmap_entries"] >= 1 and d.committer.backpressure
    assert peak_staged <= d.cfg.staging_bytes_max + (1 << 20)
    assert f.buffered_bytes <= 16 << 20
    assert d.log.stats().used_bytes <= d.log.data_size
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    faulty.release("put")
    await d.stop()


async def test_segments_of_thousands_of_small_records_are_sealed_and_committed(tmp_path):
    """A 16 MiB segment of 4 KiB writes has an index larger than any fixed tail guess."""
    from cdp.catalog import load_catalog
    from cdp.catalog_read import CatalogView
    from cdp.store.fs import FileStore

    doc = drva_doc(tmp_path, "drva-s", [domain_doc(1, "erp", [("vm1", "d0", 64 << 20)])],
                   seal_bytes="16MiB", seal_age_s=0.5)
    d = Drva(config(doc), exit_on_task_failure=False)
    await d.start()
    disk = Disk(tmp_path / "p.img", 64 << 20)
    f = DomainFilter(1, [disk])
    client = FilterClient([f], "127.0.0.1", d.port, SECRET.encode(), "host-1")
    task = asyncio.create_task(client.run())
    rng = np.random.default_rng(4)
    for _ in range(5):
        f.capture(*random_writes(rng, [64 << 20], 1024, 8))  # 1024 writes of 512 B .. 4 KiB
        await asyncio.sleep(0.01)
    await wait_until(lambda: d.domains[1].committed_seq == f.next_seq - 1, EVENTUALLY_S, "the commit")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await d.stop()
    assert d.failure is None
    store = FileStore(tmp_path / "store")
    state, generation = await load_catalog(store, 1)
    view = CatalogView(store, state, generation)
    rows = await view.rows_between(1, view.committed_seq)
    assert int((rows["last_seq"] - rows["first_seq"] + 1).max()) > 2000
