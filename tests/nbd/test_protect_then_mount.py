"""The whole path with real clients and the real commands (issue 13 acceptance): fio writes
verified patterns into an export served by ``iofilter-sim run --nbd``, the DRVA ships
them, ``cdp recover --latest`` equals the primary, and fio's verify pass and
``qemu-img compare`` succeed against a ``cdp mount`` of that point."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

from cdp import site_files
from cdp.digest import sha256_file
from cdp.store.fs import FileStore
from tests.drva.harness import ROOT, SECRET, DrvaProcess, domain_doc, drva_doc, free_port
from tests.drva.test_crash import wait_until_committed
from tests.nbd.capture_site import DISKS, DOMAIN_ID, MiB, inventory, run_cdp
from tests.nbd.conftest import run_tool
from tests.nbd.mount_fixtures import start_mount

#: The fio jobs, written then verified: the same options in both passes (fio regenerates
#: the same offsets and patterns from them).
FIO_JOBS = [
    ["--name=rand", "--rw=randwrite", "--bs=4k", "--offset=0", "--size=6M", "--iodepth=32"],
    ["--name=seq", "--rw=write", "--bs=1m", "--offset=8M", "--size=8M", "--iodepth=4"],
]
FIO_VERIFY = ["--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--randrepeat=1",
              "--output-format=json"]


def fio_ok(out: str) -> dict:
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0, job
    return job


async def test_fio_through_the_filter_then_recover_and_verify_against_a_mount(tmp_path) -> None:
    port = free_port()
    doms = [domain_doc(DOMAIN_ID, "erp", [(n.split("/")[0], n.split("/")[1], s) for n, s in DISKS.items()])]
    drva = DrvaProcess(drva_doc(tmp_path, "drva-1", doms, port=port, seal_bytes="1MiB", seal_age_s=0.2), tmp_path)
    cluster = site_files.write_inventory(tmp_path / "cluster.toml", inventory(tmp_path / "disks", port))
    sock = tmp_path / "filter.sock"
    drva.start()
    try:
        site = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "iofilter_sim", "run", str(cluster), "--nbd", "127.0.0.1:0", "--nbd-unix",
            str(sock), "--export-name", "db/data", "--json", cwd=ROOT, env={**os.environ, "CDP_SITE_SECRET": SECRET},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(60):
                serving = json.loads(await site.stdout.readline())
            assert serving["event"] == "serving" and serving["exports"] == {"db/data": DISKS["db/data"]}
            listed = json.loads(await run_tool("nbdinfo", "--list", "--json", f"nbd+unix://?socket={sock}"))
            assert [e["export-name"] for e in listed["exports"]] == ["db/data"]  # only the disk asked for
            uri = f"nbd://{serving['tcp']}/db/data"
            for job in FIO_JOBS:
                fio_ok(await run_tool("fio", *job, "--ioengine=nbd", f"--uri={uri}", "--do_verify=1",
                                      "--end_fsync=1", *FIO_VERIFY))
            site.send_signal(signal.SIGTERM)  # stop serving, drain, summary
            async with asyncio.timeout(60):
                out, err = await site.communicate()
        finally:
            if site.returncode is None:
                site.kill()
                await site.wait()
        assert site.returncode == 0, err.decode()[-3000:]
        summary = json.loads(out.decode().splitlines()[-1])
        assert summary["drained"] is True
        erp = summary["domains"]["erp"]
        await wait_until_committed(FileStore(tmp_path / "store"), DOMAIN_ID, erp["captured_seq"])
    finally:
        drva.stop()
    store_url = f"file://{tmp_path / 'store'}"
    code, _, err = await run_cdp("recover", "erp", "--store", store_url, "--latest", "--to", str(tmp_path / "out"))
    assert code == 0, err
    image = tmp_path / "out" / "db-data.img"
    assert sha256_file(image) == erp["sha256"][0] == sha256_file(tmp_path / "disks" / "db-data.img")
    assert sha256_file(tmp_path / "out" / "db-log.img") == erp["sha256"][1]  # never written: zeros both sides

    mounted = await start_mount(store_url, tmp_path, "--latest", "--nbd", "127.0.0.1:0")
    try:
        assert mounted.serving["seq"] == erp["captured_seq"]
        for job, size in zip(FIO_JOBS, (6 * MiB, 8 * MiB)):
            # The mount is read-only (a write would fail the job): fio reads back and checks
            # every block it wrote (its JSON counts the skipped writes as written).
            verified = fio_ok(await run_tool("fio", *job, "--ioengine=nbd", f"--uri={mounted.uri('db/data')}",
                                             "--verify_only=1", *FIO_VERIFY))
            assert verified["read"]["io_bytes"] == size
        compared = await run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), mounted.uri("db/data"))
        assert "identical" in compared.lower()
    finally:
        await mounted.stop()
    assert image.stat().st_size == 16 * MiB
