"""A host process dies while its last frames are staged at the DRVA (accepted, not durable
yet); its restarted filter — a new instance, which numbers on from the durable seq its
WELCOME gives — must never number over those seqs: they were dropped as duplicates of the
dead instance's frames, and acked, so flushed writes were silently lost. The WELCOME now
waits until the domain is durable up to its accepted seq, and a HELLO that cannot get
there in time is refused ``not_ready`` (retried) without holding up other sessions.

The log's appends are held by a gate (``LogGate``): a slow or stuck log device, with the
DRVA's own code running."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np

from cdp.store.fs import FileStore
from drva import session as drva_session
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import SECRET, Disk, check_store, config, random_writes, running_drva, two_domains
from tests.drva.test_crash import wait_until_committed
from tests.waiting import EVENTUALLY_S, wait_until

DISK = 8 << 20


class LogGate:
    """Holds each group commit's append (it runs in a worker thread) while closed."""

    def __init__(self, committer) -> None:
        self._open = threading.Event()
        self._open.set()
        append = committer._append

        def gated(bodies):
            self._open.wait(EVENTUALLY_S)
            return append(bodies)

        committer._append = gated

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()


class Host:
    """One run of a host process: a filter instance of the given domains and its client."""

    def __init__(self, port: int, filters: list[DomainFilter]) -> None:
        self.filters = filters
        self.client = FilterClient(filters, "127.0.0.1", port, SECRET.encode(), "host-1")
        self.task = asyncio.create_task(self.client.run())

    async def die(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def _leave_frames_staged(drva, disk, gate: LogGate, rng) -> DomainFilter:
    """Instance A: writes acked, then more sent while the log is held, and A dies with
    them accepted by the DRVA and not durable."""
    a = DomainFilter(1, [disk])
    host = Host(drva.port, [a])
    await wait_until(lambda: host.client.connections >= 1, EVENTUALLY_S, "instance A connected")
    a.capture(*random_writes(rng, [DISK], 20, 16))
    await wait_until(lambda: a.acked_seq == a.next_seq - 1, EVENTUALLY_S, "A's first writes acked")
    gate.close()
    for _ in range(4):  # four frames: the first one's append is held, the others wait staged
        a.capture(*random_writes(rng, [DISK], 4, 8))
        await asyncio.sleep(0)
    dom = drva.domains[1]
    await wait_until(lambda: dom.accepted_seq == a.next_seq - 1, EVENTUALLY_S, "A's frames accepted")
    assert dom.durable_seq < dom.accepted_seq
    await host.die()
    return a


async def test_a_restarted_filter_numbers_after_frames_the_dead_one_left_staged(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    async with running_drva(config(two_domains(tmp_path, "drva-t", DISK, seal_age_s=0.1,
                                               seal_bytes="1MiB"))) as drva:
        gate = LogGate(drva.committer)
        try:
            disk = Disk(tmp_path / "erp.img", DISK)
            a = await _leave_frames_staged(drva, disk, gate, rng)
            dom = drva.domains[1]
            await wait_until(lambda: dom.session is None, EVENTUALLY_S, "A's session closed")
            b = DomainFilter(1, [disk])  # the host process restarted: a new filter instance
            host = Host(drva.port, [b])
            await wait_until(lambda: dom.session is not None, EVENTUALLY_S, "B's HELLO taken")
            gate.open()
            await wait_until(lambda: host.client.connections >= 1, EVENTUALLY_S, "B welcomed")
            b.capture(*random_writes(rng, [DISK], 40, 16))
            await wait_until(lambda: b.acked_seq == b.next_seq - 1, EVENTUALLY_S, "B's writes acked")
            await wait_until_committed(FileStore(tmp_path / "store"), 1, b.next_seq - 1)
            await host.die()
            # Every write of both instances is in the store: the replay equals the primary.
            await check_store(FileStore(tmp_path / "store"), 1, [disk.sha256()], tmp_path)
            assert b.next_seq - 1 == a.next_seq - 1 + 40
            assert dom.stats.duplicates_dropped == 0
        finally:
            gate.open()


async def test_frames_that_stay_staged_refuse_the_hello_not_ready_and_hold_no_one_else(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(drva_session, "TAKEOVER_WAIT_S", 0.5, raising=False)
    rng = np.random.default_rng(12)
    async with running_drva(config(two_domains(tmp_path, "drva-u", DISK, seal_age_s=0.1,
                                               seal_bytes="1MiB"))) as drva:
        gate = LogGate(drva.committer)
        try:
            disk = Disk(tmp_path / "erp.img", DISK)
            a = await _leave_frames_staged(drva, disk, gate, rng)
            b = DomainFilter(1, [disk])
            host_b = Host(drva.port, [b])
            await wait_until(lambda: "not_ready" in (host_b.client.last_error or ""), EVENTUALLY_S,
                             "B's HELLO refused not_ready while A's frames are not durable")
            assert host_b.client.connections == 0 and "staged" in host_b.client.last_error
            # Another filter, of another domain, is welcomed meanwhile.
            c = DomainFilter(2, [Disk(tmp_path / "crm.img", DISK)])
            host_c = Host(drva.port, [c])
            await wait_until(lambda: host_c.client.connections >= 1, EVENTUALLY_S, "C welcomed")
            gate.open()
            await wait_until(lambda: host_b.client.connections >= 1, EVENTUALLY_S, "B welcomed once retried")
            assert b.next_seq - 1 == a.next_seq - 1
            b.capture(*random_writes(rng, [DISK], 10, 16))
            await wait_until(lambda: b.acked_seq == b.next_seq - 1, EVENTUALLY_S, "B's writes acked")
            await wait_until_committed(FileStore(tmp_path / "store"), 1, b.next_seq - 1)
            await host_b.die()
            await host_c.die()
            await check_store(FileStore(tmp_path / "store"), 1, [disk.sha256()], tmp_path)
        finally:
            gate.open()


async def test_a_frame_over_seqs_the_session_did_not_send_is_refused_not_acked(tmp_path: Path) -> None:
    """The domain's seqs move under a live session (a catalog that opens says more is
    committed than this DRVA had accepted): a frame of the filter's at those seqs is not
    the content logged there, so it must not be dropped as a duplicate and acked on this
    session — it is refused (``seq_conflict``), and the filter reconnects."""
    rng = np.random.default_rng(13)
    async with running_drva(config(two_domains(tmp_path, "drva-v", DISK))) as drva:
        f = DomainFilter(1, [Disk(tmp_path / "erp.img", DISK)])
        host = Host(drva.port, [f])
        await wait_until(lambda: host.client.connections >= 1, EVENTUALLY_S, "connected")
        f.capture(*random_writes(rng, [DISK], 5, 8))
        await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "acked")
        dom = drva.domains[1]
        moved = dom.accepted_seq + 3
        dom.accepted_seq = dom.durable_seq = moved  # as Shipper.open_catalog does
        f.capture(*random_writes(rng, [DISK], 3, 8))  # one frame of exactly the seqs the DRVA says it holds
        await wait_until(lambda: "not from this session" in (host.client.last_error or ""), EVENTUALLY_S,
                         "the frame refused seq_conflict")
        assert dom.stats.duplicates_dropped == 0 and dom.stats.frames_refused >= 1
        await host.die()
