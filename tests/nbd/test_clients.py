"""Real NBD clients against the server: nbdinfo, qemu-io, qemu-img, nbdcopy, fio.

Every test checks what reached the backing file, byte for byte, not only what the
client reports.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from tests.nbd.conftest import EXPORT_SIZES, RO_BYTE, MiB, Served, run_tool, run_tool_status

KiB = 1024


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_nbdinfo_lists_exports_with_sizes(served: Served, transport: str) -> None:
    if transport == "tcp":
        uri = f"nbd://{served.tcp[0]}:{served.tcp[1]}"
    else:
        uri = f"nbd+unix://?socket={served.unix}"
    listing = json.loads(await run_tool("nbdinfo", "--list", "--json", uri))
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert {name: e["export-size"] for name, e in exports.items()} == EXPORT_SIZES
    assert exports["vm/disk"]["description"] == "first disk of vm"
    assert exports["vm/ro"]["is_read_only"] is True
    assert exports["vm/disk"]["is_read_only"] is False
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert exports["vm/disk"][flag] is True, flag
    assert exports["vm/disk"]["block_size_minimum"] == 512
    assert exports["vm/disk"]["block_size_maximum"] == 32 * MiB


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_qemu_io_writes_land_in_the_file(served: Served, transport: str) -> None:
    uri = served.uri("vm/disk", transport)
    await run_tool("qemu-io", "-f", "raw",
                   "-c", "write -P 0xab -f 0 64k",  # FUA
                   "-c", "write -P 0xcd 1M 128k",
                   "-c", "write -P 0x11 70000 3000",  # unaligned: qemu reads-modifies-writes
                   "-c", "flush",
                   "-c", "read -P 0xab 0 64k",
                   "-c", "read -P 0xcd 1M 128k",
                   "-c", "read -P 0x11 70000 3000",
                   uri)
    want = bytearray(EXPORT_SIZES["vm/disk"])
    want[0 : 64 * KiB] = b"\xab" * (64 * KiB)
    want[1 * MiB : 1 * MiB + 128 * KiB] = b"\xcd" * (128 * KiB)
    want[70000:73000] = b"\x11" * 3000
    assert served.file_bytes("vm/disk") == want


async def test_qemu_io_read_pattern_mismatch_fails(served: Served) -> None:
    """The read check is real: a pattern that is not on the disk makes qemu-io report it."""
    code, out, _ = await run_tool_status("qemu-io", "-f", "raw", "-c", "read -P 0x77 0 4k", served.uri())
    assert code != 0
    assert "Pattern verification failed" in out


async def test_qemu_io_zeroes_and_discard(served: Served) -> None:
    path = served.files["vm/disk"]
    with open(path, "r+b") as f:
        f.write(b"\xee" * (3 * MiB))
    await run_tool("qemu-io", "-f", "raw",
                   "-c", "write -z 0 256k",  # may punch
                   "-c", "write -z -f 512k 64k",  # FUA; qemu sends NO_HOLE unless -u
                   "-c", "write -z -u 1M 64k",
                   "-c", "discard 2M 1M",
                   "-c", "read -P 0 0 256k",
                   "-c", "read -P 0xee 256k 256k",
                   served.uri())
    data = served.file_bytes()
    assert data[: 256 * KiB] == bytes(256 * KiB)
    assert data[256 * KiB : 512 * KiB] == b"\xee" * (256 * KiB)
    assert data[512 * KiB : 576 * KiB] == bytes(64 * KiB)
    assert data[1 * MiB : 1 * MiB + 64 * KiB] == bytes(64 * KiB)
    assert data[1 * MiB + 64 * KiB : 2 * MiB] == b"\xee" * (MiB - 64 * KiB)


async def test_read_only_export_refuses_writes(served: Served) -> None:
    out = await run_tool("qemu-io", "-r", "-f", "raw", "-c", f"read -P {RO_BYTE:#x} 0 1M", served.uri("vm/ro"))
    assert "Pattern verification failed" not in out
    # qemu opens it read-only itself (the export says so) and refuses the write before sending it.
    code, out, err = await run_tool_status("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", served.uri("vm/ro"))
    assert code != 0
    assert "read-only" in (out + err).lower() or "permission" in (out + err).lower(), out + err
    assert served.file_bytes("vm/ro") == bytes([RO_BYTE]) * EXPORT_SIZES["vm/ro"]


def _source_image(path: Path, size: int) -> bytes:
    """A source with data, zeros and a repeating pattern, so a copy has something to get wrong."""
    data = bytearray(size)
    for i in range(0, size, 64 * KiB):
        if (i // (64 * KiB)) % 3 != 1:
            block = os.urandom(64 * KiB) if i % (192 * KiB) == 0 else bytes([i // (64 * KiB) % 256]) * (64 * KiB)
            data[i : i + 64 * KiB] = block
    path.write_bytes(data)
    return bytes(data)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_qemu_img_convert_then_compare(served: Served, tmp_path: Path, transport: str) -> None:
    src = tmp_path / "src.raw"
    data = _source_image(src, EXPORT_SIZES["vm/disk2"])
    with open(served.files["vm/disk2"], "r+b") as f:
        f.write(b"\x99" * len(data))  # the copy must overwrite, and zero where the source is zero
    uri = served.uri("vm/disk2", transport)
    await run_tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
    out = await run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri)
    assert "Images are identical" in out
    assert served.file_bytes("vm/disk2") == data


async def test_nbdcopy_into_export(served: Served, tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    data = _source_image(src, EXPORT_SIZES["vm/disk2"])
    await run_tool("nbdcopy", "--flush", str(src), served.uri("vm/disk2"))
    assert served.file_bytes("vm/disk2") == data
    back = tmp_path / "back.raw"
    await run_tool("nbdcopy", served.uri("vm/disk2", "unix"), str(back))
    assert back.read_bytes() == data


async def test_fio_nbd_engine_verify(served: Served) -> None:
    out = await run_tool("fio", "--name=nbdverify", "--ioengine=nbd", f"--uri={served.uri('vm/disk')}",
                         "--rw=randwrite", "--bs=4k", "--size=4M", "--iodepth=16", "--verify=crc32c",
                         "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
                         "--output-format=json")
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 4 * MiB
    assert job["read"]["io_bytes"] == 4 * MiB  # the verify pass read everything back
    data = served.file_bytes("vm/disk")
    # fio wrote every 4 KiB block of the first 4 MiB (each with its verify header), nothing past it.
    assert all(data[i : i + 4096] != bytes(4096) for i in range(0, 4 * MiB, 4096))
    assert data[4 * MiB :] == bytes(4 * MiB)


async def test_ext4_image_through_the_export(served: Served, tmp_path: Path) -> None:
    """A file system written through NBD and read back through NBD is still a file system
    holding the same file: the whole path (writes, zeroes, reads) keeps every byte."""
    content = tmp_path / "content"
    content.mkdir()
    text = "written through NBD\n" * 200
    (content / "hello.txt").write_text(text)
    image = tmp_path / "fs.img"
    await run_tool("mkfs.ext4", "-q", "-F", "-d", str(content), str(image), "4M")
    await run_tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), served.uri("vm/disk2"))
    back = tmp_path / "back.img"
    await run_tool("nbdcopy", served.uri("vm/disk2", "unix"), str(back))
    assert back.read_bytes() == image.read_bytes()
    assert await run_tool("debugfs", "-R", "cat /hello.txt", str(back)) == text


async def test_concurrent_clients_and_requests(served: Served) -> None:
    """Four qemu-io clients at once (the export says CAN_MULTI_CONN), each with sixteen
    writes in flight (aio_write), on TCP and Unix sockets; every byte lands where it was sent."""

    def commands(client: int) -> list[str]:
        args = []
        for i in range(16):
            offset = client * MiB + i * 64 * KiB
            args += ["-c", f"aio_write -P {client * 16 + i + 1} {offset} 64k"]
        args += ["-c", "aio_flush"]
        for i in range(16):
            offset = client * MiB + i * 64 * KiB
            args += ["-c", f"read -P {client * 16 + i + 1} {offset} 64k"]
        return args

    await asyncio.gather(*(
        run_tool("qemu-io", "-f", "raw", *commands(c), served.uri("vm/disk", "tcp" if c % 2 else "unix"))
        for c in range(4)))
    data = served.file_bytes()
    for c in range(4):
        for i in range(16):
            offset = c * MiB + i * 64 * KiB
            assert data[offset : offset + 64 * KiB] == bytes([c * 16 + i + 1]) * (64 * KiB), (c, i)
    assert data[4 * MiB :] == bytes(4 * MiB)
