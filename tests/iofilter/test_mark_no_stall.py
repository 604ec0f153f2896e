"""A mark does not stop the host: its disks are hashed off the event loop, as they were at
the mark, while the VMs go on reading and writing them (``iofilter_sim.runner``).

The host hashed every disk of the domain in its event loop when a mark was placed: with
two sparse 8 GiB disks a mark took 59 s, and for as long no NBD request was answered and
no write captured or acked, on every domain of the host — and ``request_mark``'s 30 s
ran out on a mark that was placed. Here a mark asked for the way the MSA asks (a request
file for the DRVA, ``MARK_REQUEST`` to the filter) on a disk that takes seconds to hash:
an NBD read issued once the mark is in answers before the hash is done, the loop is
never held for more than a fraction of the hash, and the hash is still of the disk at
the mark, though writes landed after it while it was being taken.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np

from cdp import site_files
from cdp.nbd import protocol as nbd
from cdp.ports import free_port
from cdp.records import KIND_WRITE, KIND_ZERO
from drva.requests import write_request
from iofilter_sim.cluster import load_cluster
from iofilter_sim.nbd_site import NbdListen
from iofilter_sim import mark_hash
from iofilter_sim.runner import ClusterRunner, RunOptions
from tests.drva.harness import SECRET, config, domain_doc, drva_doc, running_drva
from tests.nbd import raw_client
from tests.nbd.raw_client import RawClient
from tests.waiting import wait_until

MiB = 1 << 20
GiB = 1 << 30
DOMAIN_ID = 7
# Big enough that hashing it takes seconds (a sparse file: no space is used).
BIG = 2 * GiB
BLOCK = 4096
PRE, POST = b"\xa5" * BLOCK, b"\x5a" * BLOCK  # written before / after the mark
# Where: the first block (hashed first), the middle, the last (hashed last: a write there
# right after the mark lands before the hash reaches it, and must not be in it).
OFFSETS = (0, BIG // 2, BIG - BLOCK)
HASH_WAIT_S = 300.0  # a safety net for a slow machine, never a measure of one


def _inventory(state: Path, drva_port: int, size: int) -> dict:
    return site_files.inventory(
        "site-a", ["esx-01"], [site_files.vm("db", "esx-01", [("data", size)])],
        [site_files.domain("erp", DOMAIN_ID, f"127.0.0.1:{drva_port}", ["db"], None)], state_dir=state)


def _runner(tmp: Path, drva_port: int, size: int, **opts) -> ClusterRunner:
    """A host serving disk ``db/data`` over NBD on TCP (no workload: the test's clients write)."""
    tmp.mkdir(exist_ok=True)
    cluster = site_files.write_inventory(tmp / "cluster.toml", _inventory(tmp / "disks", drva_port, size))
    return ClusterRunner(load_cluster(cluster), SECRET.encode(),
                         RunOptions(nbd=NbdListen(tcp=("127.0.0.1", 0)), hash_at_end=False, **opts))


async def _client(runner: ClusterRunner) -> RawClient:
    host, port = runner.nbd.address["tcp"].rsplit(":", 1)
    client = await RawClient.connect((host, int(port)))
    await client.go("db/data")
    return client


async def _write(client: RawClient, offset: int, data: bytes, handle: int = 1) -> None:
    await client.request(nbd.CMD_WRITE, handle, offset, len(data), payload=data)
    assert (await client.reply()).error == 0


class _Vm(threading.Thread):
    """A VM's I/O on its own thread and event loop (a client the host's loop does not
    run): once the filter inserted the mark, it reads a block, then writes ``POST`` at
    ``OFFSETS``; it notes when the mark was inserted and when its read and writes returned."""

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(name="vm-io", daemon=True)
        self.address = address
        self.error: BaseException | None = None
        self.marked = threading.Event()
        self.mark_seq = self.marked_ns = self.read_ns = self.written_ns = 0

    def watch(self, filter_client) -> None:
        """Note the moment the filter inserts a requested mark (before the host records it)."""
        record = filter_client.on_mark

        def on_mark(domain: int, name: str, seq: int) -> None:
            self.mark_seq, self.marked_ns = seq, time.time_ns()
            self.marked.set()
            record(domain, name, seq)

        filter_client.on_mark = on_mark

    def run(self) -> None:
        try:
            asyncio.run(self._io())
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            self.error = exc

    async def _io(self) -> None:
        client = await RawClient.connect(self.address)
        await client.go("db/data")
        while not self.marked.is_set():  # polled: this loop is not to wait on the host's
            await asyncio.sleep(0.001)
        await client.request(nbd.CMD_READ, 1, OFFSETS[1], BLOCK)
        reply = await client.reply(BLOCK)
        assert reply.error == 0 and reply.data == PRE
        self.read_ns = time.time_ns()
        for i, offset in enumerate(OFFSETS):
            await _write(client, offset, POST, handle=2 + i)
        self.written_ns = time.time_ns()
        await client.close()


class _Heartbeat:
    """The longest the event loop went without running this task, from ``start``."""

    def __init__(self) -> None:
        self.gaps: list[tuple[int, int]] = []  # (woke at, ns since the last wake)
        self._task = asyncio.create_task(self._beat())

    async def _beat(self) -> None:
        last = time.time_ns()
        while True:
            await asyncio.sleep(0.005)
            now = time.time_ns()
            self.gaps.append((now, now - last))
            last = now

    def longest(self, start_ns: int, end_ns: int) -> float:
        """The longest gap (s) that ended in [start_ns, end_ns + 1 s]."""
        return max((g for at, g in self.gaps if start_ns <= at <= end_ns + 10**9), default=0) / 1e9

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def _sha_at_mark(size: int) -> str:
    """The disk as it was at the mark: ``PRE`` at ``OFFSETS``, zeros elsewhere."""
    digest, zeros, at = hashlib.sha256(), bytes(8 * MiB), 0
    for offset in OFFSETS:
        while at < offset:
            n = min(len(zeros), offset - at)
            digest.update(zeros[:n])
            at += n
        digest.update(PRE)
        at += BLOCK
    assert at == size
    return digest.hexdigest()


def _mark_line(path: Path, name: str) -> dict | None:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    return next((m for m in map(json.loads, lines) if m["name"] == name), None)


async def test_a_requested_mark_on_a_big_disk_holds_neither_the_loop_nor_a_read(tmp_path, monkeypatch):
    # A read that waits for the hash is the failure to show, not a timeout of the client.
    monkeypatch.setattr(raw_client, "REPLY_TIMEOUT_S", HASH_WAIT_S)
    doc = drva_doc(tmp_path, "drva-1", [domain_doc(DOMAIN_ID, "erp", [("db", "data", BIG)])], port=free_port(),
                   seal_bytes="1MiB", seal_age_s=0.2)
    marks_log = tmp_path / "marks.jsonl"
    async with running_drva(config(doc)) as drva:
        runner = _runner(tmp_path, drva.port, BIG, marks_log=marks_log)
        await runner.start()
        heartbeat = None
        try:
            client = await _client(runner)
            for i, offset in enumerate(OFFSETS):
                await _write(client, offset, PRE, handle=i)
            await client.close()
            assert await runner.drain(60.0)  # acked, in normal mode: a mark can be placed
            host, port = runner.nbd.address["tcp"].rsplit(":", 1)
            vm = _Vm((host, int(port)))
            vm.watch(runner.clients[0])
            vm.start()
            heartbeat = _Heartbeat()
            # As ``cdp mark`` asks: a request file the DRVA passes to the filter.
            write_request(Path(doc["state_dir"]), "mark-1-00000000.json", {"domain": DOMAIN_ID, "name": "m1"})
            await wait_until(lambda: _mark_line(marks_log, "m1") is not None, HASH_WAIT_S, "the mark's hashes",
                             step_s=0.01)
            hashed_ns = marks_log.stat().st_mtime_ns
            await asyncio.to_thread(vm.join, HASH_WAIT_S)
            assert vm.error is None, repr(vm.error)
            hash_s = (hashed_ns - vm.marked_ns) / 1e9
            # Orders and fractions of the hash's own time, never a speed of this machine.
            late_s = (vm.read_ns - hashed_ns) / 1e9
            assert vm.read_ns < hashed_ns, (f"a 4 KiB NBD read issued once the mark was in waited for the mark's "
                                            f"{hash_s:.2f} s of hashing: answered {late_s:.3f} s after it")
            assert vm.written_ns < hashed_ns, "writes after the mark waited for its hashes"
            longest = heartbeat.longest(vm.marked_ns, hashed_ns)
            assert longest < hash_s / 4, f"the event loop was held {longest:.2f} s of the {hash_s:.2f} s hash"
            line = _mark_line(marks_log, "m1")
            assert set(line) == {"domain", "name", "seq", "sha256"} and line["seq"] == vm.mark_seq
            assert runner.marks == [line]
        finally:
            if heartbeat is not None:
                await heartbeat.stop()
            runner.give_up()
            await runner.close()
    # The hash is of the disk at the mark: the writes after it, which landed while it was
    # being taken (before it, behind it and ahead of it), are not in it.
    assert line["sha256"] == [await asyncio.to_thread(_sha_at_mark, BIG)]


# ---------------------------------------------------------------------- the snapshot itself


def _records(writes: list[tuple[int, bytes | int]]):
    """Records and payload of a batch: (offset, bytes) a WRITE, (offset, length) a ZERO."""
    from iofilter_sim.filter import batch_records

    kinds = [KIND_WRITE if isinstance(w, bytes) else KIND_ZERO for _, w in writes]
    lengths = [len(w) if isinstance(w, bytes) else w for _, w in writes]
    records = batch_records(np.zeros(len(writes), dtype=np.uint32), np.array([o for o, _ in writes], dtype=np.uint64),
                            np.array(lengths, dtype=np.uint32), np.array(kinds, dtype=np.uint8))
    return records, b"".join(w for _, w in writes if isinstance(w, bytes))


def _disk(tmp_path: Path, size: int, seed: int = 1):
    from iofilter_sim.mark_hash import SnapshotDisk

    disk = SnapshotDisk(tmp_path / "d.img", size)
    content = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    disk.write_batch(*_records([(i, content[i:i + MiB]) for i in range(0, size, MiB)]))
    return disk, content


def _snapshot(disk):
    from iofilter_sim.mark_hash import MarkHash as _MarkHash

    job = _MarkHash("test", [disk])
    disk.snapshots = (*disk.snapshots, job.snapshots[0])
    return job


def test_a_snapshot_reads_the_disk_as_it_was_at_the_mark_whatever_is_written_during_its_read(tmp_path):
    disk, content = _disk(tmp_path, 4 * MiB)
    job = _snapshot(disk)
    snap = job.snapshots[0]
    # Before the thread reads anything: overlapping writes, a zero range across chunks;
    # the second write over the same bytes must not replace what the first one kept.
    disk.write_batch(*_records([(3 * MiB, b"\x01" * 8192), (3 * MiB + 4096, b"\x02" * 8192)]))
    disk.write_batch(*_records([(3 * MiB, b"\x03" * 512), (MiB - 512, 2 * MiB)]))
    first = snap.next_chunk()
    assert first == content[:MiB]
    # Behind the thread (nothing to keep), across where it is, and ahead of it.
    disk.write_batch(*_records([(4096, b"\x04" * 4096), (MiB - 4096, b"\x05" * 8192), (4 * MiB - 512, b"\x06" * 512)]))
    rest = b"".join(iter(snap.next_chunk, b""))
    assert first + rest == content
    assert job.kept_bytes == 0  # every kept byte handed back once read
    # A disk with no snapshot left is written as any primary.
    disk.snapshots = ()
    disk.write_batch(*_records([(0, b"\x07" * 512)]))
    assert disk.read(0, 512) == b"\x07" * 512
    disk.close()


def test_a_mark_whose_writes_outgrow_what_it_may_keep_is_recorded_without_hashes(tmp_path, monkeypatch):

    monkeypatch.setattr(mark_hash, "MARK_KEPT_BYTES_MAX", 256 << 10)
    disk, _ = _disk(tmp_path, 4 * MiB)
    job = _snapshot(disk)
    disk.write_batch(*_records([(MiB, b"\x01" * (128 << 10))]))
    assert job.abandoned is None
    disk.write_batch(*_records([(2 * MiB, b"\x02" * (256 << 10))]))
    assert job.abandoned is not None and "overwrote more than" in job.abandoned
    assert job.sha256() is None and job.snapshots[0].kept == {}
    disk.write_batch(*_records([(3 * MiB, b"\x03" * 512)]))  # keeps nothing now
    assert job.snapshots[0].kept == {}
    disk.close()


# ---------------------------------------------------------------------- the runner's records


async def test_marks_are_logged_in_order_hashed_or_not(tmp_path, monkeypatch):
    """With hashes: the disk's sha256 at the mark. With ``hash_marks=False`` (``--no-mark-hashes``)
    null. A host stopping waits ``MARK_SETTLE_WAIT_S`` for hashes still to come, no more
    (none once given up); past ``MARK_HASHES_PENDING_MAX`` a mark is not hashed at all."""
    import iofilter_sim.runner as runner_mod

    size = 4 * MiB
    for hash_marks in (True, False):
        tmp = tmp_path / str(hash_marks)
        log = tmp / "marks.jsonl"
        runner = _runner(tmp, free_port(), size, marks_log=log, hash_marks=hash_marks, connect_wait_s=0)
        await runner.start()
        try:
            client = await _client(runner)
            await _write(client, MiB, PRE)
            assert await runner.mark("erp", "a") is not None
            await _write(client, MiB, POST)
            await client.close()
            await runner.mark("erp", "b")
        finally:
            await runner.close()
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        assert [m["name"] for m in lines] == ["a", "b"] and runner.marks == lines
        with_pre = bytearray(size)
        with_pre[MiB:MiB + BLOCK] = PRE
        with_post = bytearray(size)
        with_post[MiB:MiB + BLOCK] = POST
        expected = [[hashlib.sha256(with_pre).hexdigest()], [hashlib.sha256(with_post).hexdigest()]]
        assert [m["sha256"] for m in lines] == (expected if hash_marks else [None, None])

    # The thread busy until close abandons the hashes (were it waited for, close would
    # not return within the 60 s and the marks would then be hashed): marks queue behind.
    monkeypatch.setattr(runner_mod, "MARK_HASHES_PENDING_MAX", 2)
    monkeypatch.setattr(runner_mod, "MARK_SETTLE_WAIT_S", 0.5)
    release = threading.Event()
    abandon = mark_hash.MarkHash.abandon

    def abandon_and_release(job, why: str) -> None:
        abandon(job, why)
        release.set()

    monkeypatch.setattr(mark_hash.MarkHash, "abandon", abandon_and_release)
    for given_up in (False, True):
        tmp = tmp_path / f"given-up-{given_up}"
        log = tmp / "marks.jsonl"
        runner = _runner(tmp, free_port(), size, marks_log=log, connect_wait_s=0)
        await runner.start()
        release.clear()
        busy = runner._hasher.submit(release.wait, 60)
        try:
            for name in ("c", "d", "e"):
                await runner.mark("erp", name)
            if given_up:
                runner.give_up()
        finally:
            await runner.close()
            release.set()
        assert busy.result() is True  # released by an abandon, not timed out
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        assert [(m["name"], m["sha256"]) for m in lines] == [("c", None), ("d", None), ("e", None)]
