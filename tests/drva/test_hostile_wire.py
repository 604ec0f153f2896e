"""A DRVA under hostile wire input (issue 10): refusals close only the offending session.

Against an in-process DRVA listening on a real socket: a live filter streams domain 1
while other connections send what a hostile or broken peer would. Each is answered with
an ERROR naming what was wrong, the live filter is never disturbed, the DRVA stays up,
and the next good session works."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from cdp import wire
from drva.daemon import Drva
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import (EVENTUALLY_S, SECRET, Disk, config, domain_doc, drva_doc, random_writes,
                                running_drva, two_domains, wait_until)
from tests.drva.test_protocol import expect_error, good_session_still_works, handshake, welcomed

SIZE = 8 << 20


@pytest.fixture
async def drva(tmp_path):
    async with running_drva(config(two_domains(tmp_path, "drva-h"))) as d:
        yield d


@pytest.fixture
async def live(drva, tmp_path):
    """A filter streaming domain 1, connected and acked once."""
    f = DomainFilter(1, [Disk(tmp_path / "p1.img", SIZE)])
    client = FilterClient([f], "127.0.0.1", drva.port, SECRET.encode(), "host-1")
    task = asyncio.create_task(client.run())
    rng = np.random.default_rng(9)
    f.capture(*random_writes(rng, [SIZE], 16))
    await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "the first ack")
    yield f, client, rng
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def still_streaming(drva: Drva, f: DomainFilter, client: FilterClient, rng) -> None:
    """The live filter kept its one connection, and new writes are still acked."""
    assert client.connected and client.connections == 1, client.last_error
    assert drva.domains[1].session is not None and not drva.domains[1].session.closed
    f.capture(*random_writes(rng, [SIZE], 16))
    await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "acks after the refusal")
    assert client.connections == 1, client.last_error


async def test_a_refused_hello_leaves_the_live_session_alone(drva, live, caplog):
    """A HELLO for a domain in use plus an unknown one, with a valid MAC, is refused
    (unknown_domain) and must not replace the live session of the known domain."""
    caplog.set_level(logging.INFO)
    f, client, rng = live
    reader, writer, *_ = await handshake(drva, (1, 7), name="intruder")
    await expect_error(reader, "unknown_domain")
    writer.close()
    assert "session_replaced" not in caplog.text
    await still_streaming(drva, f, client, rng)


async def test_an_accepted_hello_still_replaces_the_older_session(drva, live, caplog):
    """One session per domain (FORMAT.md §9.2): a fully accepted HELLO takes the domain over."""
    caplog.set_level(logging.INFO)
    f, client, rng = live
    old = drva.domains[1].session
    reader, writer, *_ = await handshake(drva, (1,), name="host-1b")
    assert (await wire.read_message(reader, "t")).type == wire.WELCOME
    assert old.closed and drva.domains[1].session is not old
    assert "session_replaced" in caplog.text
    writer.close()
    await good_session_still_works(drva)


# ---------------------------------------------------------------------- malformed messages

NONCE = "ab" * 32
GOOD = {
    wire.HELLO: {"version": 1, "filter": "host-9", "site": "s", "domains": [2], "nonce": NONCE},
    wire.AUTH: {"mac": "0" * 64},
    wire.FILTER_STATE: {"domain": 2, "mode": "normal", "captured_seq": 0, "captured_ts": 0,
                        "buffered_bytes": 0, "dirty_bytes": 0},
    wire.SEED_BEGIN: {"domain": 2, "disk": 0, "disk_size": SIZE, "chunk_size": 1 << 20, "start_seq": 0},
    wire.SEED_END: {"domain": 2, "disk": 0, "end_seq": 0},
    wire.PING: {},
    wire.PONG: {},
    wire.ERROR: {"code": "bye", "message": "", "fatal": False},
}


def with_(mtype: int, **changes) -> dict:
    doc = dict(GOOD[mtype])
    for key, value in changes.items():
        if value is DROP:
            del doc[key]
        else:
            doc[key] = value
    return doc


DROP = object()
RAW_NOT_UTF8 = b'{"mode": "\xff"}'
RAW_NOT_OBJECT = b"[1, 2]"
RAW_NOT_JSON = b"{not json"
RAW_DUPLICATE = b'{"domain": 2, "domain": 2}'
RAW_NAN = b'{"captured_ts": NaN}'
RAW_DEEP = b"[" * 30000 + b"]" * 30000

# (message type, body: a dict to encode or raw bytes, what the ERROR must name)
CASES = [
    (wire.HELLO, with_(wire.HELLO, filter=5), "HELLO.filter"),
    (wire.HELLO, with_(wire.HELLO, filter="a/b"), "HELLO.filter"),
    (wire.HELLO, with_(wire.HELLO, domains=[-1]), "HELLO.domains[0]"),
    (wire.HELLO, with_(wire.HELLO, domains=[2 ** 70]), "HELLO.domains[0]"),
    (wire.HELLO, with_(wire.HELLO, domains=[True]), "HELLO.domains[0]"),
    (wire.HELLO, with_(wire.HELLO, domains=[2, 2]), "HELLO.domains"),
    (wire.HELLO, with_(wire.HELLO, domains=[]), "HELLO.domains"),
    (wire.HELLO, with_(wire.HELLO, version="1"), "HELLO.version"),
    (wire.HELLO, with_(wire.HELLO, nonce="zz" * 32), "HELLO.nonce"),
    (wire.HELLO, with_(wire.HELLO, site=DROP), "HELLO.site"),
    (wire.HELLO, with_(wire.HELLO, extra=1), "'extra'"),
    (wire.HELLO, RAW_NOT_OBJECT, "HELLO body"),
    (wire.HELLO, RAW_NOT_UTF8, "HELLO body is not UTF-8"),
    (wire.HELLO, RAW_DEEP, "HELLO body"),
    (wire.AUTH, with_(wire.AUTH, mac=5), "AUTH.mac"),
    (wire.AUTH, with_(wire.AUTH, mac="0" * 63), "AUTH.mac"),
    (wire.AUTH, with_(wire.AUTH, mac=DROP), "AUTH.mac"),
    (wire.AUTH, with_(wire.AUTH, extra="x"), "'extra'"),
    (wire.AUTH, RAW_NOT_JSON, "AUTH body"),
    (wire.AUTH, RAW_NOT_UTF8, "AUTH body is not UTF-8"),
    (wire.FILTER_STATE, with_(wire.FILTER_STATE, captured_ts="x"), "FILTER_STATE.captured_ts"),
    (wire.FILTER_STATE, with_(wire.FILTER_STATE, captured_seq=-1), "FILTER_STATE.captured_seq"),
    (wire.FILTER_STATE, with_(wire.FILTER_STATE, buffered_bytes=2 ** 64), "FILTER_STATE.buffered_bytes"),
    (wire.FILTER_STATE, with_(wire.FILTER_STATE, dirty_bytes=1.5), "FILTER_STATE.dirty_bytes"),
    (wire.FILTER_STATE, with_(wire.FILTER_STATE, domain="2"), "FILTER_STATE.domain"),
    (wire.FILTER_STATE, with_(wire.FILTER_STATE, mode="fast"), "FILTER_STATE.mode"),
    (wire.FILTER_STATE, with_(wire.FILTER_STATE, mode=DROP), "FILTER_STATE.mode"),
    (wire.FILTER_STATE, with_(wire.FILTER_STATE, extra=None), "'extra'"),
    (wire.FILTER_STATE, RAW_NOT_OBJECT, "FILTER_STATE body"),
    (wire.FILTER_STATE, RAW_NOT_UTF8, "FILTER_STATE body is not UTF-8"),
    (wire.FILTER_STATE, RAW_DUPLICATE, "FILTER_STATE body"),
    (wire.FILTER_STATE, RAW_NAN, "FILTER_STATE body"),
    (wire.SEED_BEGIN, with_(wire.SEED_BEGIN, disk=-1), "SEED_BEGIN.disk"),
    (wire.SEED_BEGIN, with_(wire.SEED_BEGIN, chunk_size=2 ** 70), "SEED_BEGIN.chunk_size"),
    (wire.SEED_BEGIN, with_(wire.SEED_BEGIN, start_seq=DROP), "SEED_BEGIN.start_seq"),
    (wire.SEED_BEGIN, with_(wire.SEED_BEGIN, start_seq=-5), "SEED_BEGIN.start_seq"),
    (wire.SEED_BEGIN, with_(wire.SEED_BEGIN, extra=[]), "'extra'"),
    (wire.SEED_BEGIN, RAW_NOT_UTF8, "SEED_BEGIN body is not UTF-8"),
    (wire.SEED_END, with_(wire.SEED_END, end_seq=-1), "SEED_END.end_seq"),
    (wire.SEED_END, with_(wire.SEED_END, end_seq=2 ** 64), "SEED_END.end_seq"),
    (wire.SEED_END, with_(wire.SEED_END, disk=DROP), "SEED_END.disk"),
    (wire.SEED_END, RAW_NOT_OBJECT, "SEED_END body"),
    (wire.SEED_CHUNK, b"\x02\x00\x00\x00\x00", "SEED_CHUNK of 5 bytes"),
    (wire.PING, {"x": 1}, "'x'"),
    (wire.PING, RAW_NOT_OBJECT, "PING body"),
    (wire.PING, RAW_NOT_UTF8, "PING body is not UTF-8"),
    (wire.PONG, {"x": 1}, "'x'"),
    (wire.PONG, RAW_NOT_JSON, "PONG body"),
    (wire.ERROR, with_(wire.ERROR, code=5), "ERROR.code"),
    (wire.ERROR, with_(wire.ERROR, fatal="no"), "ERROR.fatal"),
]


def raw_message(mtype: int, body) -> bytes:
    if isinstance(body, dict):
        return b"".join(wire.control(mtype, body))
    return wire.pack_header(mtype, len(body), wire.body_sum(body)) + body


async def send_malformed(drva: Drva, mtype: int, body):
    """Open a session and send the malformed message where its type belongs."""
    if mtype == wire.HELLO:
        reader, writer = await asyncio.open_connection("127.0.0.1", drva.port)
    elif mtype == wire.AUTH:
        reader, writer = await asyncio.open_connection("127.0.0.1", drva.port)
        writer.writelines(wire.control(wire.HELLO, GOOD[wire.HELLO]))
        assert (await wire.read_message(reader, "t")).type == wire.CHALLENGE
    else:
        reader, writer, *_ = await handshake(drva, (2,), name="host-9")
        assert (await wire.read_message(reader, "t")).type == wire.WELCOME
    writer.write(raw_message(mtype, body))
    await writer.drain()
    return reader, writer


@pytest.mark.parametrize("mtype,body,field", CASES,
                         ids=[f"{wire.TYPE_NAMES[t]}-{i}" for i, (t, _, _) in enumerate(CASES)])
async def test_a_malformed_message_closes_only_its_session(drva, live, mtype, body, field, caplog):
    caplog.set_level(logging.INFO)
    f, client, rng = live
    reader, writer = await send_malformed(drva, mtype, body)
    doc = await expect_error(reader, "bad_message")
    assert field in doc["message"], doc
    writer.close()
    assert drva.failure is None
    assert "session_refused" in caplog.text
    await still_streaming(drva, f, client, rng)
    await good_session_still_works(drva)
    assert drva.failure is None


async def test_a_drva_process_survives_the_filter_state_that_once_ended_it(tmp_path):
    """The finding as reported: an authenticated filter's FILTER_STATE with
    ``"captured_ts": "x"`` made the status task fail and the DRVA exit 70."""
    import json
    from pathlib import Path

    from tests.drva.harness import DrvaProcess, free_port

    port = free_port()
    doc = drva_doc(tmp_path, "drva-hp", [domain_doc(1, "erp", [("vm1", "d0", SIZE)])],
                   port=port, status_interval_s=0.1)
    proc = DrvaProcess(doc, tmp_path)
    proc.start()
    try:
        reader, writer = await welcomed(port)
        bad = dict(GOOD[wire.FILTER_STATE], domain=1, captured_seq=10, captured_ts="x")
        writer.writelines(wire.control(wire.FILTER_STATE, bad))
        doc_ = await expect_error(reader, "bad_message")
        assert "FILTER_STATE.captured_ts" in doc_["message"]
        writer.close()
        status_path = Path(doc["state_dir"]) / "status.json"
        times: set[float] = set()

        def rewritten_twice() -> bool:
            assert proc.proc.poll() is None, f"the DRVA exited with {proc.proc.returncode}"
            try:
                times.add(json.loads(status_path.read_text())["time"])
            except (FileNotFoundError, ValueError):
                pass
            return len(times) >= 3

        await wait_until(rewritten_twice, EVENTUALLY_S, "status rewrites after the bad message")
    finally:
        proc.stop()
