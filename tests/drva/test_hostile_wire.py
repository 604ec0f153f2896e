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
from tests.drva.harness import SECRET, Disk, config, domain_doc, drva_doc, random_writes, wait_until
from tests.drva.test_protocol import expect_error, good_session_still_works, handshake

SIZE = 8 << 20
DEADLINE_S = 30.0


@pytest.fixture
async def drva(tmp_path):
    doc = drva_doc(tmp_path, "drva-h", [domain_doc(1, "erp", [("vm1", "d0", SIZE)]),
                                        domain_doc(2, "crm", [("vm2", "d0", SIZE)])])
    d = Drva(config(doc), exit_on_task_failure=False)
    await d.start()
    yield d
    await d.stop()
    assert d.failure is None


@pytest.fixture
async def live(drva, tmp_path):
    """A filter streaming domain 1, connected and acked once."""
    f = DomainFilter(1, [Disk(tmp_path / "p1.img", SIZE)])
    client = FilterClient([f], "127.0.0.1", drva.port, SECRET.encode(), "host-1")
    task = asyncio.create_task(client.run())
    rng = np.random.default_rng(9)
    f.capture(*random_writes(rng, [SIZE], 16))
    await wait_until(lambda: f.acked_seq == f.next_seq - 1, DEADLINE_S, "the first ack")
    yield f, client, rng
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def still_streaming(drva: Drva, f: DomainFilter, client: FilterClient, rng) -> None:
    """The live filter kept its one connection, and new writes are still acked."""
    assert client.connected and client.connections == 1, client.last_error
    assert drva.domains[1].session is not None and not drva.domains[1].session.closed
    f.capture(*random_writes(rng, [SIZE], 16))
    await wait_until(lambda: f.acked_seq == f.next_seq - 1, DEADLINE_S, "acks after the refusal")
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
