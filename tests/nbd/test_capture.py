"""NBD exports on the capture path (issue 13): what real clients write is numbered,
replicated and recoverable, and a FLUSH returns only once the DRVA holds the writes."""

from __future__ import annotations

import asyncio
import json

from cdp.digest import sha256_file
from tests.drva.harness import free_port, running_drva
from tests.nbd.capture_site import (
    DISKS,
    MiB,
    drva_config,
    nbd_runner,
    protected_site,
    recover,
    wait_for,
)
from tests.nbd.conftest import run_tool, run_tool_status, tool


async def test_nbdinfo_lists_every_disk_of_the_domain(tmp_path) -> None:
    async with protected_site(tmp_path) as site:
        for transport in ("tcp", "unix"):
            uri = site.uri(transport=transport).rsplit("/", 2)[0] + ("/" if transport == "tcp" else "")
            if transport == "unix":
                uri = f"nbd+unix://?socket={site.unix}"
            listed = json.loads(await run_tool("nbdinfo", "--list", "--json", uri))
            sizes = {e["export-name"]: e["export-size"] for e in listed["exports"]}
            assert sizes == DISKS


async def test_fio_writes_are_durable_at_the_drva_when_its_flush_returns(tmp_path) -> None:
    async with protected_site(tmp_path) as site:
        for job, rw, bs in (("rand", "randwrite", "4k"), ("seq", "write", "1m")):
            out = await run_tool("fio", f"--name={job}", "--ioengine=nbd", f"--uri={site.uri()}", f"--rw={rw}",
                                 f"--bs={bs}", "--size=8M", "--offset=4M" if job == "seq" else "--offset=0",
                                 "--iodepth=16", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                                 "--verify_state_save=0", "--end_fsync=1", "--output-format=json")
            assert json.loads(out[out.index("{"):])["jobs"][0]["error"] == 0
            # fio's last request was a FLUSH: every write it made is at the DRVA, now.
            assert site.filt.acked_seq == site.filt.next_seq - 1, (site.filt.acked_seq, site.filt.next_seq)
        assert site.filt.stats["writes"] >= 2048 + 8
        assert site.runner.nbd.captures["erp"].stats["flushes"] >= 2
        await site.committed()
        images = await recover(tmp_path, tmp_path / "latest", "--latest")
        for name in DISKS:
            assert sha256_file(images[name]) == sha256_file(site.image(name)), name


async def test_an_ext4_image_a_mark_then_damage_recovers_clean_at_the_mark(tmp_path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    files = {"etc/hostname": b"db-01\n", "readme.txt": b"protected through NBD\n" * 500,
             "etc/blob.bin": bytes(range(256)) * 4096}
    for rel, data in files.items():
        (tree / rel).write_bytes(data)
    fs = tmp_path / "fs.img"
    await run_tool("mkfs.ext4", "-q", "-F", "-d", str(tree), str(fs), "16M")
    async with protected_site(tmp_path) as site:
        await run_tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(fs), site.uri())
        mark_seq = await site.runner.mark("erp", "fs-ready")
        assert mark_seq is not None
        # Scribble over the superblock and some of the tables: the file system at latest is gone.
        await run_tool("qemu-io", "-f", "raw", "-c", "write -P 0xee 0 64k", "-c", "write -z 1M 256k",
                       "-c", "discard 2M 128k", "-c", "flush", site.uri("db/data", "unix"))
        await site.committed()
        at_mark = await recover(tmp_path, tmp_path / "at-mark", "--mark", "fs-ready")
        latest = await recover(tmp_path, tmp_path / "latest", "--latest")
    assert at_mark["db/data"].read_bytes() == fs.read_bytes()
    await run_tool("e2fsck", "-fn", str(at_mark["db/data"]))
    for rel, data in files.items():
        got = await run_tool_bytes("debugfs", "-R", f"cat /{rel}", str(at_mark["db/data"]))
        assert got == data, rel
    assert sha256_file(latest["db/data"]) == sha256_file(site.image("db/data"))
    damaged = latest["db/data"].read_bytes()
    assert damaged[:65536] == b"\xee" * 65536 and damaged[MiB : MiB + 256 * 1024] == bytes(256 * 1024)
    code, _, _ = await run_tool_status("e2fsck", "-fn", str(latest["db/data"]))
    assert code != 0  # the damage is real: only the mark is clean


async def run_tool_bytes(name: str, *args: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(tool(name), *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out


async def test_a_flush_waits_for_the_drva_through_bitmap_mode_and_resync(tmp_path) -> None:
    """No DRVA yet: writes land on the primary and, past the filter's small buffer, in its
    bitmap; the client's FLUSH does not return. (qemu-io runs writeback: by default it is
    writethrough, every write FUA, and the first write would wait instead.) The DRVA comes up, the filter resyncs,
    the FLUSH returns, and the store holds the primary byte for byte."""
    port = free_port()
    # No spill journal: with one, the frames would wait in it and the filter would never
    # reach the bitmap mode this test is about (tests/iofilter/test_spill.py covers it).
    async with nbd_runner(tmp_path, port, buffer_bytes_max=256 * 1024, spill_bytes_max=0,
                          connect_wait_s=0.1) as runner:
        site_uri = f"nbd://{runner.nbd.address['tcp']}/db/data"
        proc = await asyncio.create_subprocess_exec(
            tool("qemu-io"), "-f", "raw", "-t", "writeback", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 3M 512k", "-c", "flush",
            site_uri, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        filt = runner.filters["erp"]
        await wait_for(lambda: filt.stats["writes"] >= 2, "both writes captured")
        await asyncio.sleep(1.0)  # time for the FLUSH to return wrongly: that it does not is the check
        assert proc.returncode is None, "the FLUSH returned while no DRVA had the writes"
        assert filt.mode == "bitmap" and filt.acked_seq < 1
        async with running_drva(drva_config(tmp_path, port)) as drva:
            async with asyncio.timeout(60):
                out, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
            assert filt.mode == "normal" and filt.acked_seq >= filt.resync_end_seq > 0
            assert filt.stats["resyncs_completed"] == 1
            runner.stop()
            await runner.run(0)
            assert await runner.drain(30)
            await wait_for(lambda: drva.domains[7].committed_seq == filt.next_seq - 1, "committed")
        images = await recover(tmp_path, tmp_path / "out", "--latest")
        for name in DISKS:
            assert sha256_file(images[name]) == sha256_file(runner.cluster.state_dir / f"{name.replace('/', '-')}.img")


async def test_with_a_flush_timeout_a_flush_the_drva_cannot_take_fails(tmp_path) -> None:
    async with nbd_runner(tmp_path, free_port(), connect_wait_s=0.1, flush_timeout_s=0.5) as runner:
        uri = f"nbd://{runner.nbd.address['tcp']}/db/log"
        code, out, err = await run_tool_status("qemu-io", "-f", "raw", "-t", "writeback", "-c", "write -P 0x33 0 64k", "-c", "flush", uri)
        assert "flush failed" in (out + err).lower() or code != 0, (code, out, err)
        # The write itself was answered: it is on the primary (and in the filter's buffer).
        data = (runner.cluster.state_dir / "db-log.img").read_bytes()[:65536]
        assert data == b"\x33" * 65536
        assert runner.nbd.captures["erp"].stats["flush_timeouts"] >= 1  # qemu-io flushes at exit too


async def test_a_paused_domain_holds_its_writes_until_resumed(tmp_path) -> None:
    async with protected_site(tmp_path) as site:
        site.runner.pause = {"erp"}
        site.runner.nbd.wake()
        proc = await asyncio.create_subprocess_exec(
            tool("qemu-io"), "-f", "raw", "-c", "write -P 0x44 0 64k", site.uri(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        await wait_for(lambda: site.runner.nbd.captures["erp"]._queue, "the write queued")
        await asyncio.sleep(0.3)  # time for a paused domain to capture the write wrongly: nothing may happen
        assert proc.returncode is None
        assert site.runner.status()["paused"] == ["erp"]
        assert site.filt.stats["writes"] == 0
        site.runner.pause = set()
        site.runner.nbd.wake()
        async with asyncio.timeout(30):
            await proc.communicate()
        assert proc.returncode == 0
        assert site.filt.stats["writes"] == 1


async def test_overlapping_writes_from_many_connections_replicate_in_disk_order(tmp_path) -> None:
    """Eight clients write the same 256 KiB again and again with different patterns, on
    both transports, with zeroes and trims between: whatever order they land in, the
    store replays to exactly the primary."""
    async with protected_site(tmp_path) as site:
        def commands(client: int) -> list[str]:
            args = []
            for i in range(12):
                at = (i % 4) * 64 * 1024 + client * 4096
                args += ["-c", f"aio_write -P {client * 12 + i + 1} {at} 128k"]
                if i % 5 == 4:
                    args += ["-c", f"aio_write -z {at + 8192} 16k", "-c", f"discard {at} 8k"]
            return args + ["-c", "aio_flush"]

        await asyncio.gather(*(run_tool("qemu-io", "-f", "raw", *commands(c), site.uri("db/data", ("tcp", "unix")[c % 2]))
                               for c in range(8)))
        await site.committed()
        images = await recover(tmp_path, tmp_path / "out", "--latest")
        assert sha256_file(images["db/data"]) == sha256_file(site.image("db/data"))
        assert site.filt.stats["writes"] >= 8 * 12


async def test_hostile_clients_capture_nothing_and_the_others_are_served(tmp_path) -> None:
    """A write cut off in its payload, a read past the end and a bad request magic: no
    record is captured for any of them, each gets the protocol's answer, and a well-behaved
    client on another connection is served all along."""
    from cdp.nbd import protocol as nbd
    from tests.nbd.raw_client import RawClient

    async with protected_site(tmp_path) as site:
        host, port = site.tcp.rsplit(":", 1)
        cut = await RawClient.connect((host, int(port)))
        await cut.go("db/data")
        await cut.request(nbd.CMD_WRITE, 1, 0, 65536, payload=b"\xaa" * 1000)  # 1000 of 65,536 bytes
        await cut.close()
        past = await RawClient.connect(site.unix)
        size, _ = await past.go("db/log")
        await past.request(nbd.CMD_READ, 2, size - 4096, 8192)
        assert (await past.reply()).error == nbd.EINVAL
        await past.send(b"\x00" * nbd.REQUEST_SIZE)  # not a request magic: the server hangs up
        assert await past.closed_by_server()
        await run_tool("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 64k", "-c", "read -P 0x77 0 64k", site.uri())
        assert site.filt.stats["writes"] == 1  # qemu-io's write, nothing of the cut one
        assert site.image("db/data").read_bytes()[:65536] == b"\x77" * 65536
