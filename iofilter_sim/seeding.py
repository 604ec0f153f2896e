"""Initial seeding from the filter's side: read a primary disk chunk by chunk and send it
to the DRVA while its live writes keep being captured (FORMAT.md §9, drva/seeder.py).

The base is recorded at the last seq captured before the copy starts; the copy is fuzzy
and the stream after that seq makes it exact, so the DRVA marks the seq range of the copy
as a ``seeding`` window. All-zero chunks are not sent (they are zero in the base).
"""

from __future__ import annotations

import asyncio
from typing import Any

from cdp import wire
from cdp.base_image import is_zero
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter

CHUNK_SIZE_DEFAULT = 4 << 20


async def seed_disk(client: FilterClient, f: DomainFilter, disk: int, *,
                    chunk_size: int = CHUNK_SIZE_DEFAULT, timeout_s: float = 300) -> dict[str, Any]:
    """Seed disk ``disk`` of ``f``'s domain; return the DRVA's SEED_DONE body."""
    while not client.connected:
        await asyncio.sleep(0.05)
    size = f.disks[disk].size
    start_seq = f.next_seq - 1
    client.seed_done.pop((f.domain, disk), None)
    await client.send_seed([wire.control(wire.SEED_BEGIN, {
        "domain": f.domain, "disk": disk, "disk_size": size, "chunk_size": chunk_size,
        "start_seq": start_seq})])
    for i in range(-(-size // chunk_size)):
        at = i * chunk_size
        data = await asyncio.to_thread(f.disks[disk].read, at, min(chunk_size, size - at))
        if not is_zero(data):
            await client.send_seed([wire.seed_chunk_message(f.domain, disk, i, data)])
    await client.send_seed([wire.control(wire.SEED_END, {
        "domain": f.domain, "disk": disk, "end_seq": f.next_seq - 1})])
    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can drop a cancellation
    # that lands as the event fires, and the caller's stop would be lost.
    try:
        async with asyncio.timeout(timeout_s):
            while (done := client.seed_done.get((f.domain, disk))) is None:
                client.seed_event.clear()
                await client.seed_event.wait()
    except TimeoutError:
        raise TimeoutError(f"domain {f.domain} disk {disk}: no SEED_DONE in {timeout_s} s") from None
    return done
