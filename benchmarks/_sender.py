"""A light sender for ``benchmarks.ingest``'s DRVA-only phase: pre-built frames replayed.

``python -m benchmarks._sender --port P --domain D --write-bytes N`` connects to a DRVA as
a filter would (HELLO / AUTH / WELCOME, FORMAT.md §9.1) and streams FRAME messages of one
domain. Nothing of a VM is simulated: no payload is generated and no primary disk is
written while it runs. The payloads and the record tables (random offsets, one write
size) are made once, at start (``frame_pool``); each frame sent is one of them with its
seqs and timestamps stamped anew (a small numpy array) and its header and body checksum
recomputed (``encode_frame_parts``: one xxh3 pass), sent as views with ``writelines``.

Driven by lines on stdin, each answered by one JSON line on stdout:

- ``run SECONDS [RATE_BYTES_S]``: stream for SECONDS (at most ``--inflight-bytes``
  unacked, as a VM that waits on acks; at RATE_BYTES_S if given), then wait until every
  frame sent is acked. Answers ``{"elapsed_s", "acked_bytes", "writes", "last_seq"}``:
  the bytes acked *within* the SECONDS (as ``benchmarks.ingest``'s end-to-end ``Load.run``
  counts them) and the last seq sent.
- ``quit``.

The first line it prints is ``{"ready": true, "durable_seq": N}`` once welcomed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cdp import wire
from cdp.frame import encode_frame_parts
from cdp.records import KIND_WRITE, empty_records
from iofilter_sim.filter import FRAME_BYTES_MAX, FRAME_RECORDS_MAX
from iofilter_sim.payloads import PayloadSource

DISK_BYTES = 1 << 30
POOL_BYTES = 32 << 20  # distinct payload bytes replayed: more than the DRVA's frame cache and a segment
INFLIGHT_BYTES = 48 << 20  # as the end-to-end load's filter: unacked bytes at most
DRAIN_BYTES = 4 << 20  # socket write buffer above which the sender waits for it to drain
ACKED_WITHIN_S = 120.0  # after a run, every frame is acked in this time or the sender fails
CONNECT_WITHIN_S = 60.0  # a DRVA starting (formatting its log) is retried this long
ROOT = Path(__file__).resolve().parent.parent


def records_per_frame(write_bytes: int) -> int:
    """As the simulated filter cuts frames: FRAME_BYTES_MAX of payload, FRAME_RECORDS_MAX records."""
    return max(1, min(FRAME_RECORDS_MAX, FRAME_BYTES_MAX // write_bytes))


def frame_pool(write_bytes: int, pool_bytes: int = POOL_BYTES, seed: int = 7) -> list[tuple[np.ndarray, bytes]]:
    """(records, payload) of the frames a sender replays: random aligned offsets in a 1 GiB
    disk, "mixed" payloads (about 1.5:1 for lz4, as the end-to-end load's), no zero write.
    Seqs and timestamps are left to ``stamp``."""
    n = records_per_frame(write_bytes)
    rng = np.random.default_rng(seed)
    source = PayloadSource("mixed", seed=seed, zero_share=0.0)
    pool = []
    for _ in range(max(1, pool_bytes // (n * write_bytes))):
        records = empty_records(n)
        records["kind"] = KIND_WRITE
        records["length"] = write_bytes
        records["offset"] = rng.integers(0, DISK_BYTES // write_bytes, n) * write_bytes
        pool.append((records, source.batch(records["length"])))
    return pool


def stamp(records: np.ndarray, first_seq: int, ts: int) -> np.ndarray:
    """A copy of ``records`` numbered from ``first_seq``, every timestamp ``ts``."""
    out = records.copy()
    out["seq"] = np.arange(first_seq, first_seq + len(out), dtype=np.uint64)
    out["timestamp_ns"] = ts
    return out


class Sender:
    """One filter session of one domain, streaming ``pool`` frames in a loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, domain: int,
                 pool: list[tuple[np.ndarray, bytes]], durable_seq: int, inflight_bytes: int) -> None:
        self.reader, self.writer, self.domain, self.pool = reader, writer, domain, pool
        self.inflight_bytes = inflight_bytes
        self.next_seq = durable_seq + 1
        self.acked_seq = durable_seq
        self.write_bytes = int(pool[0][0]["length"][0])
        self.acked = asyncio.Event()
        self.i = 0
        self.last_ts = 0

    async def receive(self) -> None:
        where = "DRVA"
        while True:
            msg = await wire.read_message(self.reader, where)
            if msg.type == wire.ACK:
                domain, _, durable, _ = wire.parse_ack(msg.body, where)
                if domain == self.domain and durable > self.acked_seq:
                    self.acked_seq = durable
                    self.acked.set()
            elif msg.type == wire.ERROR:
                raise RuntimeError(f"DRVA refused: {msg.json(where)}")
            elif msg.type == wire.PING:
                self.writer.writelines(wire.control(wire.PONG, {}))

    def send_one(self) -> int:
        records, payload = self.pool[self.i % len(self.pool)]
        self.i += 1
        self.last_ts = max(self.last_ts, time.time_ns())
        parts = encode_frame_parts(self.domain, stamp(records, self.next_seq, self.last_ts), payload)
        self.writer.writelines(wire.frame_message(list(parts)))
        self.next_seq += len(records)
        return len(payload)

    async def run(self, seconds: float, rate_bytes_s: float | None) -> dict:
        acked0 = self.acked_seq
        t0 = time.perf_counter()
        sent = 0
        while (now := time.perf_counter()) - t0 < seconds:
            if rate_bytes_s is not None and sent > rate_bytes_s * (now - t0):
                await asyncio.sleep(0.002)
                continue
            if (self.next_seq - 1 - self.acked_seq) * self.write_bytes >= self.inflight_bytes:
                self.acked.clear()
                try:
                    async with asyncio.timeout(max(0.001, seconds - (now - t0))):
                        await self.acked.wait()
                except TimeoutError:
                    pass
                continue
            sent += self.send_one()
            if self.writer.transport.get_write_buffer_size() > DRAIN_BYTES:
                await self.writer.drain()
        elapsed = time.perf_counter() - t0
        acked_in_window = self.acked_seq - acked0
        await self.writer.drain()
        async with asyncio.timeout(ACKED_WITHIN_S):
            while self.acked_seq < self.next_seq - 1:
                self.acked.clear()
                await self.acked.wait()
        return {"elapsed_s": elapsed, "acked_bytes": acked_in_window * self.write_bytes,
                "writes": acked_in_window, "last_seq": self.next_seq - 1}


class SenderProc:
    """The driver's side: this module in a process of its own, on one domain of a DRVA
    (the lines of the module docstring on its stdin and stdout)."""

    def __init__(self, port: int, domain: int, write_bytes: int, d: Path, secret: str,
                 pool_bytes: int = POOL_BYTES, inflight_bytes: int = INFLIGHT_BYTES) -> None:
        self.domain, self.write_bytes = domain, write_bytes
        self.err = open(d / f"sender-{domain}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._sender", "--port", str(port), "--domain", str(domain),
             "--write-bytes", str(write_bytes), "--inflight-bytes", str(inflight_bytes),
             "--pool-bytes", str(pool_bytes)],
            cwd=ROOT, env={**os.environ, "CDP_SITE_SECRET": secret}, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.err)
        self.last_seq = 0

    async def _answer(self) -> dict:
        line = await asyncio.to_thread(self.proc.stdout.readline)
        if not line:
            self.err.flush()
            raise RuntimeError(f"sender of domain {self.domain} ended: "
                               + Path(self.err.name).read_text()[-2000:])
        return json.loads(line)

    async def ready(self) -> None:
        self.last_seq = (await self._answer())["durable_seq"]

    async def run(self, seconds: float, rate_bytes_s: float | None = None) -> dict:
        self.proc.stdin.write(f"run {seconds}{'' if rate_bytes_s is None else f' {rate_bytes_s}'}\n".encode())
        self.proc.stdin.flush()
        got = await self._answer()
        got["sent_bytes"] = (got["last_seq"] - self.last_seq) * self.write_bytes
        self.last_seq = got["last_seq"]
        return got

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.err.close()


async def handshake(reader, writer, domain: int, secret: bytes, name: str) -> int:
    """HELLO / CHALLENGE / AUTH / WELCOME; returns the domain's durable seq."""
    where = "DRVA"
    nonce = wire.new_nonce()
    writer.writelines(wire.control(wire.HELLO, {"version": wire.WIRE_VERSION, "filter": name, "site": "bench",
                                                "domains": [domain], "nonce": nonce.hex()}))
    challenge = (await wire.read_message(reader, where, (wire.CHALLENGE,))).json(where)
    drva_nonce = wire.parse_nonce(challenge["nonce"], where)
    writer.writelines(wire.control(wire.AUTH, {"mac": wire.filter_mac(secret, nonce, drva_nonce, name)}))
    welcome = (await wire.read_message(reader, where, (wire.WELCOME, wire.ERROR))).json(where)
    if "mac" not in welcome:
        raise RuntimeError(f"DRVA refused the handshake: {welcome}")
    if not wire.mac_matches(wire.drva_mac(secret, nonce, drva_nonce, challenge["drva"]), welcome["mac"]):
        raise RuntimeError("the DRVA failed to prove it knows the site secret")
    return int(welcome["domains"][str(domain)]["durable_seq"])


async def main_async(args: argparse.Namespace) -> None:
    pool = frame_pool(args.write_bytes, args.pool_bytes)
    deadline = time.monotonic() + CONNECT_WITHIN_S
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", args.port, limit=1 << 20)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    durable = await handshake(reader, writer, args.domain, os.environ["CDP_SITE_SECRET"].encode(), args.name)
    sender = Sender(reader, writer, args.domain, pool, durable, args.inflight_bytes)
    receiving = asyncio.create_task(sender.receive())
    print(json.dumps({"ready": True, "durable_seq": durable}), flush=True)
    try:
        while True:
            line = (await asyncio.to_thread(sys.stdin.readline)).split()
            if not line or line[0] == "quit":
                break
            if receiving.done():
                receiving.result()  # raises what ended it
            seconds = float(line[1])
            rate = float(line[2]) if len(line) > 2 else None
            run = asyncio.create_task(sender.run(seconds, rate))
            await asyncio.wait([run, receiving], return_when=asyncio.FIRST_COMPLETED)
            if not run.done():
                run.cancel()
                receiving.result()
            print(json.dumps(run.result()), flush=True)
    finally:
        receiving.cancel()
        writer.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--domain", type=int, required=True)
    p.add_argument("--write-bytes", type=int, default=64 << 10)
    p.add_argument("--inflight-bytes", type=int, default=INFLIGHT_BYTES)
    p.add_argument("--name", default="bench-sender")
    p.add_argument("--pool-bytes", type=int, default=POOL_BYTES, help="distinct payload bytes replayed")
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is None:
        asyncio.run(main_async(args))
    else:
        uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
