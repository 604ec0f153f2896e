"""Encryption at rest end to end (FORMAT.md §19): a real DRVA process with a store key
seeds a disk and ships writes to a file store and to S3 (moto); ``cdp recover`` with the
same key gives back the primary byte for byte, without it fails naming the key id; no
object in the store holds a known plaintext; identical chunks are stored once; and the
key appears in no log, status or recovery record written on the way."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from cdp.store import open_store
from cdp.store.s3 import S3Store
from cdp.store.storekeys import StoreKey
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from iofilter_sim.seeding import seed_disk
from tests.drva.harness import (
    EVENTUALLY_S, ROOT, SECRET, Disk, DrvaProcess, domain_doc, drva_doc, free_port, random_writes, wait_until,
)
from tests.drva.test_crash import wait_until_committed

DISK = 8 << 20
CHUNK = 1 << 20
MARKER = b"PLAINTEXT-MARKER-0123456789-"  # a known plaintext, written to the disk and in writes
KEY = bytes(range(7, 39))
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-key"}
RECOVER_S = 120.0  # bounds a hung cdp recover


def _marked_disk(path: Path) -> None:
    """A disk whose MiBs 0, 2 and 5 hold the same marker pattern (one chunk, stored once)
    and whose MiB 3 holds random bytes."""
    block = (MARKER * (CHUNK // len(MARKER) + 1))[:CHUNK]
    with open(path, "wb") as f:
        f.truncate(DISK)
        for mib in (0, 2, 5):
            os.pwrite(f.fileno(), block, mib * CHUNK)
        os.pwrite(f.fileno(), np.random.default_rng(1).bytes(CHUNK), 3 * CHUNK)


def _cdp(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdp.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=RECOVER_S)


async def _raw_objects(url: str, env: dict[str, str]) -> dict[str, bytes]:
    """Every object of the store as stored (no key)."""
    plain = open_store(url, env={k: v for k, v in env.items() if not k.startswith("CDP_STORE_KEY")})
    try:
        return {info.key: await plain.get(info.key) async for info in plain.list("")}
    finally:
        await plain.close()


@pytest.mark.parametrize("backend", ["file", "s3"])
async def test_encrypted_ingest_recovers_byte_for_byte_and_leaks_nothing(tmp_path, backend, request) -> None:
    key_file = tmp_path / "store.keys"
    key_file.write_text(f"# the store key\n{KEY.hex()}\n")
    key_file.chmod(0o600)
    env = {**os.environ, "CDP_STORE_KEY_FILE": str(key_file)}
    if backend == "file":
        url = f"file://{tmp_path / 'store'}"
    else:
        moto = request.getfixturevalue("moto_server")
        bucket = f"enc-{uuid.uuid4().hex[:12]}"
        await S3Store(bucket, "", endpoint_url=moto, access_key=CREDS["AWS_ACCESS_KEY_ID"],
                      secret_key=CREDS["AWS_SECRET_ACCESS_KEY"]).create_bucket()
        url = f"s3://{bucket}/site-a?endpoint={moto}&region=us-east-1"
        env.update(CREDS)
    port = free_port()
    doc = drva_doc(tmp_path, "drva-enc", [domain_doc(1, "erp", [("vm1", "d0", DISK)])], port=port, store=url,
                   seal_bytes="1MiB", seal_age_s=0.2)
    drva = DrvaProcess(doc, tmp_path, env={k: v for k, v in env.items() if k != "CDP_SITE_SECRET"})
    _marked_disk(tmp_path / "erp.img")
    disk = Disk(tmp_path / "erp.img", DISK)
    f = DomainFilter(1, [disk])
    store = open_store(url, env=env)
    drva.start()
    client = FilterClient([f], "127.0.0.1", port, SECRET.encode(), "host-1")
    task = asyncio.create_task(client.run())
    try:
        seeded = await seed_disk(client, f, 0, chunk_size=CHUNK)
        # Four chunks are not zero (concurrent uploads of twins may each be counted as
        # stored); the store holds two objects (checked below): MiBs 0, 2 and 5 are one.
        assert seeded["chunks_stored"] + seeded["chunks_deduplicated"] == 4, seeded
        rng = np.random.default_rng(3)
        f.capture(*random_writes(rng, [DISK], 64, 64))
        marked = np.frombuffer((MARKER * 200)[: 8 * 512], dtype=np.uint8).tobytes()
        f.capture(np.array([0], np.uint32), np.array([6 * CHUNK], np.uint64), np.array([len(marked)], np.uint32),
                  np.array([0], np.uint16), marked)
        await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "every write acked")
        await wait_until_committed(store, 1, f.next_seq - 1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        drva.stop()
        await store.close()

    out = tmp_path / "out"
    r = _cdp(env, "recover", "erp", "--store", url, "--latest", "--to", str(out), "--json")
    assert r.returncode == 0, r.stderr
    (image,) = sorted(out.glob("*.img"))
    assert image.read_bytes() == (tmp_path / "erp.img").read_bytes()

    key_id = StoreKey(KEY).key_id.hex()
    no_key = {k: v for k, v in env.items() if not k.startswith("CDP_STORE_KEY")}
    r = _cdp(no_key, "recover", "erp", "--store", url, "--latest", "--to", str(tmp_path / "nokey"))
    assert r.returncode == 2 and key_id in r.stderr and "CDP_STORE_KEY" in r.stderr, r.stderr

    objects = await _raw_objects(url, env)
    chunks = [k for k in objects if k.startswith("c/")]
    assert len(chunks) == 2 and any(".seg" in k for k in objects) and any(".bmf" in k for k in objects)
    for name, raw in objects.items():
        assert raw[:4] == b"CDPN" and raw[8:24].hex() == key_id, name
        assert MARKER[:16] not in raw, f"{name} holds plaintext"
    secrets = [KEY.hex().encode(), base64.b64encode(KEY), KEY]
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != key_file]
    assert drva.log_path in written and (tmp_path / "drva-enc" / "status.json") in written
    for path in written:  # logs, status, metadata, recovery records, the store's objects
        data = path.read_bytes()
        for secret in secrets:
            assert secret not in data, f"the store key is in {path}"


def test_the_demo_site_runs_sealed_and_records_no_key(tmp_path) -> None:
    """``cdp demo`` with a key file: the daemon, the DRVA it supervises and the recoveries
    all read the key from the environment they inherit; every object in the store is
    sealed, and the key is in no log, job record or state file."""
    key_file = tmp_path / "store.keys"
    key_file.write_text(KEY.hex() + "\n")
    key_file.chmod(0o600)
    d = tmp_path / "d"
    env = {**os.environ, "CDP_STORE_KEY_FILE": str(key_file)}
    r = subprocess.run([sys.executable, "-m", "cdp.cli", "demo", "--json", "--disk-size", "8MiB", "--writes-mb", "16",
                        "--dir", str(d)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=RECOVER_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.splitlines()[-1])["verified"] is True
    objects = [p for p in (d / "store").rglob("*") if p.is_file()]
    assert any(p.suffix == ".seg" for p in objects) and any(p.suffix == ".cat" for p in objects)
    for path in objects:
        assert path.read_bytes()[:4] == b"CDPN", path
    assert list((d / "msa" / "jobs").glob("*.json")) and (d / "msa" / "logs" / "drva-1.log").stat().st_size
    for path in (p for p in d.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for secret in (KEY.hex().encode(), base64.b64encode(KEY), KEY):
            assert secret not in data, f"the store key is in {path}"


def test_the_simulated_hosts_get_no_store_key_and_the_drvas_do(tmp_path) -> None:
    """The daemon's children inherit its environment without the API tokens (§13); the
    simulated hosts, which never open the store, get no store key either."""
    from cdp.hypervisor.simulator import SimulatorHypervisor
    from cdp.msa.supervisor import Supervisor
    from cdp.testing.site import make_site

    site = make_site(tmp_path / "site", install=False)
    env = {**site.env, "CDP_STORE_KEY": KEY.hex()}
    hosts = SimulatorHypervisor(site.cfg, env)
    assert "CDP_STORE_KEY" not in hosts.keeper.env and hosts.keeper.env["CDP_SITE_SECRET"]
    drvas = Supervisor(site.cfg, env)
    assert drvas.keeper.env["CDP_STORE_KEY"] == KEY.hex() and "CDP_API_TOKEN" not in drvas.keeper.env
