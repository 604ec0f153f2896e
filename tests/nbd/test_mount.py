"""``cdp mount``: a recovery point served over NBD straight from the store, checked with
real clients (nbdinfo, qemu-img, qemu-io, nbdcopy) against the images ``cdp recover``
builds of the same point; and the copy-on-write overlay alone against a bytearray model.

The domain (a base and segments of overwrites in a file store) is built once for the
module; a test that damages the store damages a copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.nbd import protocol as nbd_protocol
from cdp.store.fs import FileStore
from rocva import Target, plan_recovery
from rocva.mount_cache import UnitCache
from rocva.overlay import Overlay, OverlayIdentity
from rocva.plan import SRC_BASE, SRC_WRITE
from tests.conftest import make_s3_store, unique_name
from tests.nbd.conftest import run_tool, run_tool_status
from tests.nbd.mount_fixtures import (
    DISKS,
    Domain,
    KiB,
    MiB,
    build_domain,
    new_builder,
    recovered,
    run_mount_to_end,
    start_mount,
)

S3_CREDS = {"AWS_ACCESS_KEY_ID": "test-access-key", "AWS_SECRET_ACCESS_KEY": "test-secret-key"}
#: The bound the issue sets on a first 4 KiB read after start; asserted loosely here (a
#: loaded test machine), measured by the benchmark.
FIRST_READ_S_MAX = 10.0
SIZES = {f"{vm}/{disk}": size for vm, disk, size in DISKS}


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


class World:
    """The module's domain and the reference images of its points."""

    def __init__(self, domain: Domain, images: dict[str, dict[str, Path]]) -> None:
        self.domain = domain
        self.images = images  # point ("latest", "seq", "mark") -> export name -> recover image
        self.seqs = {"latest": domain.builder.seq, "seq": domain.middle_seq, "mark": domain.mark_seq}

    def point_args(self, point: str) -> tuple[str, ...]:
        return {"latest": ("--latest",), "seq": ("--seq", str(self.domain.middle_seq)),
                "mark": ("--mark", self.domain.mark)}[point]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("mount")

    async def build() -> World:
        store = FileStore(root / "store")
        domain = await build_domain(await new_builder(store), root / "store")
        images = {}
        for point, seq in (("latest", domain.builder.seq), ("seq", domain.middle_seq), ("mark", domain.mark_seq)):
            images[point] = await recovered(store, 7, seq, root / f"rec-{point}")
        return World(domain, images)

    return asyncio.run(build())


async def assert_identical(mounted, images: dict[str, Path]) -> None:
    for name, path in images.items():
        out = await run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(path), mounted.uri(name))
        assert "Images are identical" in out, (name, out)


# --------------------------------------------------------------------------- serving


@pytest.mark.parametrize("point,transport", [("latest", "tcp"), ("seq", "tcp"), ("mark", "unix")])
async def test_exports_equal_the_recovered_images(world: World, tmp_path: Path, point: str, transport: str) -> None:
    address = "127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path / 'nbd.sock'}"
    mounted = await start_mount(world.domain.url, tmp_path, *world.point_args(point), "--nbd", address)
    try:
        assert mounted.serving["seq"] == world.seqs[point] and mounted.serving["writable"] is False
        assert {e["name"]: e["size"] for e in mounted.serving["exports"]} == SIZES
        address = mounted.serving["address"]
        listing_uri = (f"nbd://127.0.0.1:{address['port']}" if transport == "tcp"
                       else f"nbd+unix://?socket={address['path']}")
        listing = json.loads(await run_tool("nbdinfo", "--list", "--json", listing_uri))
        exports = {e["export-name"]: e for e in listing["exports"]}
        assert {n: e["export-size"] for n, e in exports.items()} == SIZES
        assert all(e["is_read_only"] for e in exports.values())
        await assert_identical(mounted, world.images[point])
        if point == "latest":
            copy = tmp_path / "copy.img"
            await run_tool("nbdcopy", mounted.uri("vm1/sys"), str(copy))
            assert sha256_file(copy) == sha256_file(world.images[point]["vm1/sys"])
    finally:
        summary = await mounted.stop()
    assert summary["reads"] > 0 and summary["bytes_served"] >= sum(SIZES.values())
    assert summary["fetch_failures"] == 0 and summary["rehydrated"] is False


def site_ca_and_nbd_cert(root: Path) -> tuple[Path, Path, Path]:
    """A site CA (cdp.pki, as cdp install makes it) and a server certificate for
    127.0.0.1; returns (clients' certificate dir holding ca-cert.pem, cert, key)."""
    import datetime as dt

    from cdp import pki

    now = dt.datetime.now(dt.timezone.utc)
    ca, ca_key = pki.make_ca("site-a", now)
    cert, key = pki.make_leaf(pki.LeafSpec("nbd", "cdp mount", pki.server_names("127.0.0.1")), ca, ca_key, now)
    files = pki.TlsFiles(root / "tls")
    files.dir.mkdir(parents=True)
    pki._write_pair(files.cert("nbd"), files.key("nbd"), cert, key)
    clients = root / "clients"
    clients.mkdir()
    from cryptography.hazmat.primitives.serialization import Encoding

    (clients / "ca-cert.pem").write_bytes(ca.public_bytes(Encoding.PEM))  # libnbd's and qemu's file name
    return clients, files.cert("nbd"), files.key("nbd")


async def test_a_tls_mount_serves_only_after_starttls(world: World, tmp_path: Path) -> None:
    """``--tls-cert``: the protocol's FORCEDTLS. libnbd's tools read the exports over TLS,
    byte-exact; a plain client learns TLS is required (and no export, size or byte); an
    EXPORT_NAME before STARTTLS is hung up on; the server goes on serving."""
    from tests.nbd.raw_client import RawClient

    clients, cert, key = site_ca_and_nbd_cert(tmp_path)
    mounted = await start_mount(world.domain.url, tmp_path, "--latest", "--nbd", "127.0.0.1:0",
                                "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        address = mounted.serving["address"]
        assert address["tls"] is True and address["uri"].startswith("nbds://")
        listing = json.loads(await run_tool("nbdinfo", "--list", "--json",
                                            f"nbds://127.0.0.1:{address['port']}?tls-certificates={clients}"))
        assert {e["export-name"]: e["export-size"] for e in listing["exports"]} == SIZES
        copy = tmp_path / "copy.img"
        await run_tool("nbdcopy", mounted.uri("vm1/sys", clients), str(copy))
        assert sha256_file(copy) == sha256_file(world.images["latest"]["vm1/sys"])

        code, _, err = await run_tool_status("nbdinfo", "--list", f"nbd://127.0.0.1:{address['port']}")
        assert code != 0 and "error to list request" in err, err  # libnbd shows TLS_REQD as ENOTSUP
        plain = await RawClient.connect(("127.0.0.1", address["port"]))
        await plain.greet()
        for option in (nbd_protocol.OPT_LIST, nbd_protocol.OPT_GO, nbd_protocol.OPT_INFO):
            data = nbd_protocol.pack_info_request("vm1/sys") if option != nbd_protocol.OPT_LIST else b""
            [(_, reply_type, _)] = await plain.option(option, data)
            assert reply_type == nbd_protocol.REP_ERR_TLS_REQD, (option, reply_type)
        await plain.send(nbd_protocol.pack_option(nbd_protocol.OPT_EXPORT_NAME, b"vm1/sys"))
        async with asyncio.timeout(10):
            assert await plain.reader.read() == b""  # hung up on, nothing of the export sent
        plain.writer.close()
        # A client that STARTTLSes with a certificate of another CA gets nothing either.
        other, _, _ = site_ca_and_nbd_cert(tmp_path / "other")
        code, _, err = await run_tool_status("nbdinfo", "--list",
                                             f"nbds://127.0.0.1:{address['port']}?tls-certificates={other}")
        assert code != 0, err
        await run_tool("nbdcopy", mounted.uri("vm1/sys", clients), str(copy))  # still served
    finally:
        summary = await mounted.stop()
    assert summary["fetch_failures"] == 0


async def test_first_read_fetches_one_unit(world: World, tmp_path: Path) -> None:
    """Nothing proportional to the disks is read before serving: the first 4 KiB read costs
    one GET of one segment block or base chunk, and it comes quickly."""
    t0 = time.monotonic()
    mounted = await start_mount(world.domain.url, tmp_path, "--latest", "--nbd", "127.0.0.1:0")
    try:
        data = world.images["latest"]["vm1/sys"].read_bytes()[8 * KiB : 12 * KiB]
        out = await run_tool("qemu-io", "-r", "-f", "raw", "-c", f"read -v {8 * KiB} 4k", mounted.uri("vm1/sys"))
        first_read_s = time.monotonic() - t0
        assert data[:16].hex()[:8] in out.replace(" ", "")
    finally:
        summary = await mounted.stop()
    print(f"mount_first_read_s={first_read_s:.3f}")
    assert first_read_s < FIRST_READ_S_MAX
    assert 1 <= summary["fetches"] <= 2 and summary["bytes_fetched"] <= 2 * 64 * KiB + 4 * KiB, summary


async def test_a_mount_holds_a_recovery_lease_while_it_serves(world: World, tmp_path: Path) -> None:
    """Retention deletes nothing of a domain while a recovery lease on it is live
    (FORMAT.md §11.3): a mount, which may serve for days, holds one from before it plans
    until it stops."""
    from cdp.locks import live_locks, recovery_prefix

    store = FileStore(world.domain.store_dir)
    mounted = await start_mount(world.domain.url, tmp_path, "--latest", "--nbd", "127.0.0.1:0")
    try:
        leases = await live_locks(store, recovery_prefix(7))
        assert [lease.body["owner"] for lease in leases] == ["cdp mount domain 7"]
    finally:
        await mounted.stop()
    assert await live_locks(store, recovery_prefix(7)) == []


async def test_read_only_mount_refuses_writes(world: World, tmp_path: Path) -> None:
    before = tree_digest(Path(world.domain.store_dir))
    mounted = await start_mount(world.domain.url, tmp_path, "--latest", "--nbd", "127.0.0.1:0")
    try:
        code, out, err = await run_tool_status("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4k",
                                               mounted.uri("vm1/sys"))
        assert code != 0, (code, out, err)
        await assert_identical(mounted, world.images["latest"])
    finally:
        summary = await mounted.stop()
    assert summary["writes"] == 0
    assert tree_digest(Path(world.domain.store_dir)) == before


# --------------------------------------------------------------------------- writable


WRITES = [  # qemu-io commands at unaligned offsets and the model's edit of them
    ("write -P 0xab 70000 3000", lambda b: b.__setitem__(slice(70000, 73000), b"\xab" * 3000)),
    ("write -P 0xcd 1048000 10000", lambda b: b.__setitem__(slice(1048000, 1058000), b"\xcd" * 10000)),
    ("write -z 2000000 100000", lambda b: b.__setitem__(slice(2000000, 2100000), bytes(100000))),
    ("discard 3145728 65536", lambda b: b.__setitem__(slice(3145728, 3211264), bytes(65536))),
]


def written_model(image: Path) -> bytes:
    model = bytearray(image.read_bytes())
    for _, edit in WRITES:
        edit(model)
    return bytes(model)


async def qemu_io_writes(uri: str) -> None:
    commands = []
    for command, _ in WRITES:
        commands += ["-c", command]
    commands += ["-c", "flush", "-c", "read -P 0xab 70000 3000", "-c", "read -P 0xcd 1048000 10000",
                 "-c", "read -P 0 2000000 100000"]
    await run_tool("qemu-io", "-f", "raw", *commands, uri)


async def test_writable_overlay_keeps_the_store_and_reopens(world: World, tmp_path: Path) -> None:
    store_dir = Path(world.domain.store_dir)
    before = tree_digest(store_dir)
    overlay = tmp_path / "overlay"
    want = written_model(world.images["latest"]["vm1/sys"])
    mounted = await start_mount(world.domain.url, tmp_path, "--latest", "--nbd", "127.0.0.1:0",
                                "--writable", "--overlay", str(overlay))
    try:
        assert mounted.serving["writable"] is True
        await qemu_io_writes(mounted.uri("vm1/sys"))
        copy = tmp_path / "copy.img"
        await run_tool("nbdcopy", mounted.uri("vm1/sys"), str(copy))
        assert copy.read_bytes() == want
        await assert_identical(mounted, {"vm2/data": world.images["latest"]["vm2/data"]})
    finally:
        summary = await mounted.stop()
    assert summary["writes"] >= len(WRITES) and summary["overlay"] == str(overlay)
    assert tree_digest(store_dir) == before, "the store was written"

    # The same point without the overlay: the original bytes.
    mounted = await start_mount(world.domain.url, tmp_path, "--latest", "--nbd", "127.0.0.1:0")
    try:
        await assert_identical(mounted, world.images["latest"])
    finally:
        await mounted.stop()

    # The overlay directory again: the writes are there.
    mounted = await start_mount(world.domain.url, tmp_path, "--latest", "--nbd", "127.0.0.1:0",
                                "--writable", "--overlay", str(overlay))
    try:
        copy.unlink()
        await run_tool("nbdcopy", mounted.uri("vm1/sys"), str(copy))
        assert copy.read_bytes() == want
    finally:
        await mounted.stop()

    # ... but not for another point.
    code, _, err = await run_mount_to_end(world.domain.url, tmp_path, "--seq", str(world.domain.middle_seq),
                                          "--nbd", "127.0.0.1:0", "--writable", "--overlay", str(overlay))
    assert code == 2 and "made for another disk or point" in err and f"seq {world.seqs['latest']}" in err, err


async def test_rehydrate_then_apply_the_overlay(world: World, tmp_path: Path) -> None:
    out = tmp_path / "rehydrated"
    mounted = await start_mount(world.domain.url, tmp_path, "--latest", "--nbd", "127.0.0.1:0",
                                "--writable", "--rehydrate-to", str(out))
    try:
        await qemu_io_writes(mounted.uri("vm1/sys"))  # while rehydrating, or after: either way
        event = await mounted.next_event()
        assert event["event"] == "rehydrated" and event["to"] == str(out), event
        await run_tool("qemu-io", "-f", "raw", "-c", "write -P 0x5e 4095 2", mounted.uri("vm2/data"))
        served = {name: tmp_path / f"served-{name.replace('/', '-')}.img" for name in SIZES}
        for name, path in served.items():
            await run_tool("nbdcopy", mounted.uri(name), str(path))
    finally:
        summary = await mounted.stop()
    assert summary["rehydrated"] is True and summary["overlay_bytes_applied"] > 0
    assert summary["overlay"] is None and not Path(mounted.serving["overlay"]).exists()
    data = bytearray(world.images["latest"]["vm2/data"].read_bytes())
    data[4095:4097] = b"\x5e\x5e"
    assert (out / "vm1-sys.img").read_bytes() == written_model(world.images["latest"]["vm1/sys"])
    assert (out / "vm2-data.img").read_bytes() == bytes(data)
    for name, path in served.items():
        assert sha256_file(path) == sha256_file(out / (name.replace("/", "-") + ".img"))


# --------------------------------------------------------------------------- failures


async def test_a_corrupt_object_fails_its_reads_only(world: World, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    shutil.copytree(world.domain.store_dir, store_dir)
    plan = await plan_recovery(FileStore(store_dir), 7, Target.latest())
    k = len(plan.segments) - 1
    index = plan.segments[k]
    last = index.block_count - 1
    block_lo = last * index.block_raw_size
    bad = None
    for d in plan.disks:  # a byte the newest segment's last block serves (nothing later overwrites it)
        ext = d.extents[(d.extents["kind"] == SRC_WRITE) & (d.extents["seg"] == k)]
        hit = ext[ext["pos"].astype(np.int64) + ext["length"].astype(np.int64) > block_lo]
        if len(hit):
            at = int(hit[-1]["offset"]) + max(0, block_lo - int(hit[-1]["pos"]))
            bad = (f"{d.vm}/{d.name}", at - at % 512)
    assert bad is not None
    good_disk = plan.disks[0]
    base = good_disk.extents[good_disk.extents["kind"] == SRC_BASE]
    good = (f"{good_disk.vm}/{good_disk.name}", int(base[0]["offset"]))
    path = store_dir / index.key
    raw = bytearray(path.read_bytes())
    raw[int(index.blocks["stored_offset"][last]) + int(index.blocks["stored_len"][last]) // 2] ^= 0x40
    path.write_bytes(raw)

    mounted = await start_mount(f"file://{store_dir}", tmp_path, "--latest", "--nbd", "127.0.0.1:0")
    try:
        code, out, err = await run_tool_status("qemu-io", "-r", "-f", "raw", "-c", f"read {bad[1]} 512",
                                               mounted.uri(bad[0]))
        assert code != 0, (code, out, err)
        for _ in range(2):  # elsewhere, before and after a retry of the bad range
            await run_tool("qemu-io", "-r", "-f", "raw", "-c", f"read {good[1]} 512", mounted.uri(good[0]))
            await run_tool_status("qemu-io", "-r", "-f", "raw", "-c", f"read {bad[1]} 512", mounted.uri(bad[0]))
        assert mounted.proc.returncode is None
    finally:
        summary = await mounted.stop()
    assert summary["fetch_failures"] >= 1
    logged = [json.loads(line) for line in mounted.stderr().splitlines() if "mount_object_failed" in line]
    assert logged and logged[0]["object"] == index.key and "stored_xxh3" in logged[0]["error"], logged


async def test_the_cache_stays_under_its_bound(world: World, tmp_path: Path) -> None:
    mounted = await start_mount(world.domain.url, tmp_path, "--latest", "--nbd", "127.0.0.1:0", "--cache-mb", "1")
    try:
        for name, image in world.images["latest"].items():
            copy = tmp_path / "copy.img"
            await run_tool("nbdcopy", mounted.uri(name), str(copy))
            assert sha256_file(copy) == sha256_file(image)
            copy.unlink()
    finally:
        summary = await mounted.stop()
    assert summary["cache_bytes_max"] == MiB
    assert 0 < summary["cache_bytes_peak"] <= MiB and summary["cache_evictions"] > 0, summary
    assert summary["cache_misses"] == summary["fetches"] and summary["bytes_fetched"] > 0


async def test_bad_inputs_exit_with_a_message(world: World, tmp_path: Path) -> None:
    url = world.domain.url
    busy = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = busy.sockets[0].getsockname()[1]
    cases = [  # (domain, arguments, exit status, what stderr says)
        ("nope", ("--latest", "--nbd", "127.0.0.1:0"), 2, "no domain named 'nope'"),
        ("99", ("--latest", "--nbd", "127.0.0.1:0"), 5, "domain 99: no catalog"),
        ("7", ("--at", "2001-01-01T00:00:00Z", "--nbd", "127.0.0.1:0"), 2, "2001-01-01"),
        ("7", ("--latest", "--nbd", "localhost"), 2, "expected HOST:PORT"),
        ("7", ("--latest", "--nbd", "127.0.0.1:70000"), 2, "expected HOST:PORT"),
        ("7", ("--latest", "--nbd", f"127.0.0.1:{port}"), 2, "the address is in use"),
        ("7", ("--latest", "--nbd", "127.0.0.1:0", "--overlay", str(tmp_path / "o")), 2, "need --writable"),
    ]
    try:
        results = await asyncio.gather(*(run_mount_to_end(url, tmp_path, *args, domain=domain)
                                         for domain, args, _, _ in cases))
    finally:
        busy.close()
    for (domain, args, status, message), (code, out, err) in zip(cases, results):
        assert code == status and not out.strip(), (domain, args, code, out, err)
        assert message in err and "Traceback" not in err, (domain, args, err)


async def test_a_planted_lock_file_is_refused_with_exit_6(world: World, tmp_path: Path) -> None:
    """A symbolic link as the overlay directory's .mount.lock ended cdp mount with "Too
    many levels of symbolic links" and exit 1; a FIFO there was locked as if a file."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"not a lock file\n")
    plants = {"symlink": "a symbolic link", "fifo": "a FIFO"}
    directories = {plant: tmp_path / f"overlay-{plant}" for plant in plants}
    for plant, directory in directories.items():
        directory.mkdir()
        if plant == "symlink":
            os.symlink(victim, directory / ".mount.lock")
        else:
            os.mkfifo(directory / ".mount.lock")
    results = await asyncio.gather(*(run_mount_to_end(world.domain.url, tmp_path, "--latest", "--nbd", "127.0.0.1:0",
                                                      "--writable", "--overlay", str(directory))
                                     for directory in directories.values()))
    for (plant, found), (code, out, err) in zip(plants.items(), results):
        lock = directories[plant] / ".mount.lock"
        assert code == 6 and not out.strip(), (plant, code, out, err)
        assert f"{lock}: {found} where the overlay directory's lock file is expected" in err, (plant, err)
        assert "Traceback" not in err, err
    assert victim.read_bytes() == b"not a lock file\n"


# --------------------------------------------------------------------------- S3


async def test_mount_over_s3(world: World, moto_server: str, tmp_path: Path) -> None:
    """The module's domain copied object by object into moto's S3: the same exports."""
    bucket = unique_name()
    source, store = FileStore(world.domain.store_dir), make_s3_store(moto_server, bucket)
    try:
        await store.create_bucket()
        async def copy(key: str) -> None:
            await store.put(key, await source.get(key))

        await asyncio.gather(*[copy(info.key) async for info in source.list("")])
    finally:
        await store.close()
    url = f"s3://{bucket}/p/q?endpoint={moto_server}&region=us-east-1"
    saved = {k: os.environ.get(k) for k in S3_CREDS}
    os.environ.update(S3_CREDS)  # the subprocess's credentials, from its environment only
    try:
        mounted = await start_mount(url, tmp_path, "--latest", "--nbd", "127.0.0.1:0")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:  # one disk: moto answers a GET in milliseconds, not microseconds
        await assert_identical(mounted, {"vm2/data": world.images["latest"]["vm2/data"]})
    finally:
        summary = await mounted.stop()
    assert summary["fetches"] > 0 and summary["fetch_failures"] == 0


async def test_mount_of_a_sealed_store(world: World, tmp_path: Path) -> None:
    """The module's domain copied into a store sealed with a key (FORMAT.md §19), the key
    given to the mount in its environment: the same exports, read through the seal."""
    from cdp.store.crypt import EncryptedStore
    from cdp.store.storekeys import STORE_KEY_ENV, StoreKeyring

    key = os.urandom(32).hex()
    source = FileStore(world.domain.store_dir)
    store = EncryptedStore(FileStore(tmp_path / "sealed"), StoreKeyring.from_env({STORE_KEY_ENV: key}))

    async def copy(name: str) -> None:
        await store.put(name, await source.get(name))

    await asyncio.gather(*[copy(info.key) async for info in source.list("")])
    assert (tmp_path / "sealed" / next(iter([i.key async for i in source.list("")]))).read_bytes()[:4] == b"CDPN"
    os.environ[STORE_KEY_ENV] = key
    try:
        mounted = await start_mount(f"file://{tmp_path / 'sealed'}", tmp_path, "--latest", "--nbd", "127.0.0.1:0")
    finally:
        del os.environ[STORE_KEY_ENV]
    try:
        await assert_identical(mounted, {"vm2/data": world.images["latest"]["vm2/data"]})
    finally:
        summary = await mounted.stop()
    assert summary["fetches"] > 0 and summary["fetch_failures"] == 0


# --------------------------------------------------------------------------- the cache alone


async def test_cache_loads_a_unit_once_and_keeps_its_bound() -> None:
    cache = UnitCache(bytes_max=10, loads_max=2)
    started = []
    gate = asyncio.Event()

    def loader(key: str, size: int, fail: bool = False):
        async def load():
            started.append(key)
            await gate.wait()
            if fail:
                raise OSError(5, f"{key} is damaged")
            return bytes(size), size + 1
        return load

    readers = [asyncio.create_task(cache.get("a", loader("a", 4))) for _ in range(5)]
    broken = [asyncio.create_task(cache.get("bad", loader("bad", 4, fail=True))) for _ in range(2)]
    await asyncio.sleep(0.01)
    readers[0].cancel()  # a reader that goes away does not cancel the fetch the others wait for
    gate.set()
    assert [len(u) for u in await asyncio.gather(*readers[1:])] == [4] * 4
    for task in broken:
        with pytest.raises(OSError, match="damaged"):
            await task
    assert started == ["a", "bad"] and cache.joined == 5 and cache.failures == 1
    await cache.get("bad", loader("bad", 4))  # a failure is not cached: tried again
    for key, size in (("b", 4), ("c", 4), ("huge", 11)):
        await cache.get(key, loader(key, size))
    assert cache.bytes_cached <= 10 and cache.bytes_cached_peak <= 10 and cache.evictions >= 1
    assert cache.stats()["bytes_fetched"] == 5 + 5 + 5 + 5 + 12
    await cache.close()


# --------------------------------------------------------------------------- the overlay alone


OVERLAY_SIZE = 10 * 4096 + 1536  # a short last block
LOWER = np.random.default_rng(1).bytes(OVERLAY_SIZE)

span = st.integers(0, OVERLAY_SIZE - 1).flatmap(
    lambda off: st.tuples(st.just(off), st.integers(1, min(3 * 4096 + 100, OVERLAY_SIZE - off))))
operations = st.lists(st.one_of(
    st.tuples(st.just("write"), span, st.integers(0, 255)),
    st.tuples(st.just("zero"), span, st.just(0)),
    st.tuples(st.just("trim"), span, st.just(0)),
    st.tuples(st.just("read"), span, st.just(0)),
    st.tuples(st.just("reopen"), st.just((0, 1)), st.just(0)),
), max_size=40)


async def _lower(offset: int, length: int) -> bytes:
    await asyncio.sleep(0)
    return LOWER[offset : offset + length]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
def test_overlay_matches_a_bytearray(ops) -> None:
    identity = OverlayIdentity(7, 1, 42, 0, OVERLAY_SIZE)

    async def run(directory: Path) -> None:
        model = bytearray(LOWER)
        overlay = Overlay.open(directory, "vm-d", identity)
        try:
            for op, (offset, length), byte in ops:
                if op == "write":
                    await overlay.write(offset, bytes([byte]) * length, _lower)
                    model[offset : offset + length] = bytes([byte]) * length
                elif op in ("zero", "trim"):
                    await overlay.write_zeroes(offset, length, _lower)
                    model[offset : offset + length] = bytes(length)
                elif op == "read":
                    assert bytes(await overlay.read(offset, length, _lower)) == model[offset : offset + length]
                else:
                    await overlay.flush()
                    overlay.close()
                    overlay = Overlay.open(directory, "vm-d", identity)
            assert bytes(await overlay.read(0, OVERLAY_SIZE, _lower)) == model
            await overlay.flush()
        finally:
            overlay.close()
        reopened = Overlay.open(directory, "vm-d", identity)
        try:
            assert bytes(await reopened.read(0, OVERLAY_SIZE, _lower)) == model
        finally:
            reopened.close()

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(run(Path(directory)))
