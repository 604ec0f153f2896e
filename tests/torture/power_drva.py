"""The power-loss campaign's second workload: a real DRVA, in this process, fed frames.

Everything the DRVA writes below the workload's root — its log partition, its metadata
repository, the file store (segments, catalog, pages), ``status.json`` — is recorded by
``fsrecord.Recorder``. A seq counts as acknowledged when the DRVA builds the ``ACK`` that
carries it (``wire.ack_message``, called right before the ACK is written to the socket).
The frames' bytes are ``payload_for`` their seqs, so each crash state can be checked the
same way as the first workload's: every acknowledged seq in the log or in a segment, with
exactly its bytes. Seals are frequent (``SEAL_AGE_S``), so crashes also fall between a
segment's put, the catalog commit, the metadata write and the log trim.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from cdp import wire
from cdp.frame import decode_frame
from cdp.logfmt import DATA_SIZE_MIN, DATA_START
from cdp.meta import SLOT_SIZE_DEFAULT, MetaRepository
from cdp.replog import ReplicationLog
from tests.drva.harness import config, domain_doc, drva_doc, running_drva
from tests.drva.test_protocol import handshake
from tests.torture import fsrecord
from tests.torture.wire_peer import frame
from tests.waiting import EVENTUALLY_S, wait_until

NAME = "drva-pl"
DOMAIN = 1
DISK_BYTES = 8 << 20
LOG_BYTES = DATA_START + DATA_SIZE_MIN
SEAL_AGE_S = 0.05  # seal often: crashes fall between put, catalog, metadata and trim
FRAMES_PER_WAIT = 3  # frames sent before waiting for their ACK
# Where the checker finds what this workload wrote (relative to its root).
LOG, META, META_SLOT_BYTES, STORE = f"{NAME}/replog", f"{NAME}/meta", SLOT_SIZE_DEFAULT, "store"


def _doc(root: Path) -> dict:
    return drva_doc(root, NAME, [domain_doc(DOMAIN, "erp", [("vm1", "d0", DISK_BYTES)])],
                    log_size=str(LOG_BYTES), seal_bytes="1MiB", seal_age_s=SEAL_AGE_S,
                    status_interval_s=60.0)


def prepare(root: Path) -> None:
    """Format the partitions and create the store before recording starts."""
    doc = _doc(root)
    (root / NAME).mkdir()
    ReplicationLog.format(doc["log"]["path"], LOG_BYTES, label=NAME)
    MetaRepository.format(doc["meta"]["path"])
    (root / STORE).mkdir()


async def _acked(reader: asyncio.StreamReader, seq: int) -> None:
    async with asyncio.timeout(EVENTUALLY_S):
        while True:
            msg = await wire.read_message(reader, "torture")
            if msg.type == wire.ACK and wire.parse_ack(msg.body, "torture")[2] >= seq:
                return
            assert msg.type == wire.ACK, f"the DRVA answered {msg.name}: {msg.body[:300]!r}"


async def workload(root: Path, rec: fsrecord.Recorder, rng: random.Random, frames: int) -> int:
    """Stream ``frames`` frames to a DRVA until it committed them all; return the last seq."""
    real_ack_message = wire.ack_message

    def ack_message(domain: int, durable_seq: int, *args, **kwargs):
        if domain == DOMAIN:
            rec.ack(("seq", durable_seq))
        return real_ack_message(domain, durable_seq, *args, **kwargs)

    wire.ack_message = ack_message
    try:
        async with running_drva(config(_doc(root))) as drva:
            reader, writer, *_ = await handshake(drva, (DOMAIN,))
            assert (await wire.read_message(reader, "torture")).type == wire.WELCOME
            seq = 1
            for i in range(frames):
                raw = frame(DOMAIN, seq, rng)
                seq = decode_frame(raw).last_seq + 1
                writer.writelines(wire.frame_message([raw]))
                await writer.drain()
                if i % FRAMES_PER_WAIT == FRAMES_PER_WAIT - 1:
                    await _acked(reader, seq - 1)
                    await asyncio.sleep(rng.uniform(0, 2 * SEAL_AGE_S))  # let some seals happen
            await _acked(reader, seq - 1)
            await wait_until(lambda: drva.domains[DOMAIN].committed_seq == seq - 1, EVENTUALLY_S,
                             "every frame committed to the store")
            writer.close()
    finally:
        wire.ack_message = real_ack_message
    return seq - 1
