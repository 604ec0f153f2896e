"""A host process that starts while its DRVA is down, for a domain the DRVA already holds:
its NBD face serves anyway, and the writes it captures are numbered from seq 1 before any
WELCOME could say where the domain's seqs go on. Once the DRVA is back, those writes go to
the dirty bitmap (none was ever sent), the filter numbers on after the DRVA's durable seq
and resyncs them from the primary — instead of refusing every session (``seq_behind``)
and holding every FLUSH for good."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from cdp.nbd import protocol as nbd
from iofilter_sim.filter import DomainFilter, FilterError
from tests.drva.harness import Disk, free_port, random_writes, running_drva
from tests.nbd.capture_site import DISKS, DOMAIN_ID, MiB, drva_config, nbd_runner, recover
from tests.nbd.raw_client import RawClient
from tests.waiting import EVENTUALLY_S, wait_until

BLOCK = 4096


def pattern(i: int) -> bytes:
    head = f"W{i:08d}".encode()
    return (head * (BLOCK // len(head) + 1))[:BLOCK]


async def _write(client: RawClient, handle: int, offset: int, data: bytes) -> None:
    await client.request(nbd.CMD_WRITE, handle, offset, len(data), payload=data)
    assert (await client.reply()).error == 0


async def test_a_host_started_while_its_drva_was_down_replicates_once_it_is_back(tmp_path: Path) -> None:
    port = free_port()
    cfg = drva_config(tmp_path, port)
    async with running_drva(cfg):  # run 1: the domain's history at the DRVA
        async with nbd_runner(tmp_path, port) as runner:
            client = await RawClient.connect(runner.nbd.address["unix"])
            await client.go("db/data")
            for i in range(5):
                await _write(client, i, i * BLOCK, pattern(i))
            await client.request(nbd.CMD_FLUSH, 99, 0, 0)
            assert (await client.reply()).error == 0
            durable = runner.filters["erp"].acked_seq
            assert durable >= 5
            await client.close()
            runner.stop()
            await runner.run(0)
            assert await runner.drain(EVENTUALLY_S)
    # The DRVA is down: the host process starts, waits for it a moment, and serves anyway.
    async with nbd_runner(tmp_path, port, connect_wait_s=0.1) as runner:
        f = runner.filters["erp"]
        client = await RawClient.connect(runner.nbd.address["unix"])
        await client.go("db/data")
        await _write(client, 1, MiB, pattern(77))
        assert f.next_seq == 2  # numbered before any DRVA said where the domain's seqs go on
        async with running_drva(cfg) as drva:
            await client.request(nbd.CMD_FLUSH, 2, 0, 0)
            async with asyncio.timeout(EVENTUALLY_S):  # it waited for good
                assert (await client.reply()).error == 0
            assert f.acked_seq > durable and f.mode == "normal"
            await client.close()
            runner.stop()
            await runner.run(0)
            assert await runner.drain(EVENTUALLY_S)
            await wait_until(lambda: drva.domains[DOMAIN_ID].committed_seq == f.next_seq - 1, EVENTUALLY_S,
                             "every write committed")
            primaries = {name: (runner.cluster.state_dir / f"{name.replace('/', '-')}.img").read_bytes()
                         for name in DISKS}
    images = await recover(tmp_path, tmp_path / "out", "--latest")
    for name in DISKS:
        assert images[name].read_bytes() == primaries[name], name
    assert primaries["db/data"][MiB:MiB + BLOCK] == pattern(77)


def test_writes_numbered_before_any_welcome_move_to_the_bitmap(tmp_path: Path) -> None:
    disk = Disk(tmp_path / "d.img", 4 * MiB)
    f = DomainFilter(1, [disk])
    f.capture(*random_writes(np.random.default_rng(3), [disk.size], 6, 8))
    assert f.next_seq == 7 and f.buffer
    f.restart_after(40)
    assert (f.next_seq, f.acked_seq, f.sent_seq, f.mode) == (41, 40, 40, "bitmap")
    assert not f.buffer and f.dirty_bytes() > 0  # the resync captures them again
    f.capture(*random_writes(np.random.default_rng(4), [disk.size], 2, 8))  # bitmap mode: regions only
    while f.mode != "normal":
        f.resync_step(True)
        f.on_ack(f.next_seq - 1)
    assert f.acked_seq == f.resync_end_seq > 41
    f.capture(*random_writes(np.random.default_rng(5), [disk.size], 1, 8))
    f.mark_sent()
    with pytest.raises(FilterError, match="sent writes"):
        f.restart_after(100)
