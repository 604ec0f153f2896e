"""The S3 endpoint (a real moto server) goes away for 20 s under load: nothing is lost,
the RPO lag climbs and shows in the DRVA's status, then recovers."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest

from cdp.store.s3 import S3Store
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import (
    SECRET, Disk, DrvaProcess, check_store, domain_doc, drva_doc, free_port, random_writes,
)
from tests.drva.test_crash import wait_until_committed
from tests.tcp_proxy import TcpProxy
from tests.waiting import EVENTUALLY_S, wait_until

OUTAGE_S = 20
# The RPO lag of a healthy path: segments seal every 0.3 s and upload at once.
RPO_HEALTHY_S = 3.0
# How often the DRVA's status is sampled during the outage.
SAMPLE_EVERY_S = 0.5
DISK = 32 << 20
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-key"}


@pytest.mark.slow
async def test_s3_outage_of_20s_loses_nothing_and_shows_in_rpo(tmp_path, moto_server):
    moto_port = int(moto_server.rsplit(":", 1)[1])
    proxy = TcpProxy("127.0.0.1", moto_port, free_port())
    await proxy.up()
    bucket = f"outage-{uuid.uuid4().hex[:12]}"
    endpoint = f"http://127.0.0.1:{proxy.port}"
    admin = S3Store(bucket, "", endpoint_url=moto_server, region="us-east-1",
                    access_key=CREDS["AWS_ACCESS_KEY_ID"], secret_key=CREDS["AWS_SECRET_ACCESS_KEY"])
    await admin.create_bucket()
    port = free_port()
    doc = drva_doc(tmp_path, "drva-s3", [domain_doc(1, "erp", [("vm1", "d0", DISK)])], port=port,
                   store=f"s3://{bucket}/site-a?endpoint={endpoint}&region=us-east-1",
                   log_size="256MiB", seal_bytes="2MiB", seal_age_s=0.3)
    drva = DrvaProcess(doc, tmp_path, env=CREDS)
    drva.start()
    disk = Disk(tmp_path / "erp0.img", DISK)
    f = DomainFilter(1, [disk])
    client = FilterClient([f], "127.0.0.1", port, SECRET.encode(), "host-1")
    client_task = asyncio.create_task(client.run())
    stop = asyncio.Event()

    async def load() -> None:
        rng = np.random.default_rng(5)
        while not stop.is_set():
            f.capture(*random_writes(rng, [DISK], 8, 32))  # ~64 KiB a batch
            await asyncio.sleep(0.02)  # ~3 MB/s

    load_task = asyncio.create_task(load())
    try:
        await wait_until(lambda: _dom(drva).get("committed_seq", 0) > 0, EVENTUALLY_S, "a first commit")
        # The outage starts from a healthy path (a slow start may show a larger lag first).
        await wait_until(lambda: _dom(drva).get("rpo_lag_s", RPO_HEALTHY_S) < RPO_HEALTHY_S, EVENTUALLY_S,
                         f"an RPO lag under {RPO_HEALTHY_S} s before the outage")
        await proxy.down()
        lags = []
        for _ in range(int(OUTAGE_S / SAMPLE_EVERY_S)):  # the outage lasts OUTAGE_S: sleeping is the point
            await asyncio.sleep(SAMPLE_EVERY_S)
            lags.append(_dom(drva)["rpo_lag_s"])
        during = _dom(drva)
        await proxy.up()
        assert max(lags) >= OUTAGE_S / 2, f"RPO lag did not climb: {lags}"
        assert during["upload_errors"] + during["catalog_errors"] > 0
        assert during["last_error"] and "Store" in during["last_error"]
        assert CREDS["AWS_SECRET_ACCESS_KEY"] not in drva.log_path.read_text()
        await wait_until(lambda: _dom(drva)["rpo_lag_s"] < RPO_HEALTHY_S, EVENTUALLY_S, "the RPO lag to recover")
    finally:
        stop.set()
        await load_task
    await wait_until(lambda: f.acked_seq == f.next_seq - 1, EVENTUALLY_S, "the filter to drain")
    store = S3Store(bucket, "site-a", endpoint_url=moto_server, region="us-east-1",
                    access_key=CREDS["AWS_ACCESS_KEY_ID"], secret_key=CREDS["AWS_SECRET_ACCESS_KEY"])
    await wait_until_committed(store, 1, f.next_seq - 1)
    client_task.cancel()
    await asyncio.gather(client_task, return_exceptions=True)
    drva.stop()
    await check_store(store, 1, [disk.sha256()], tmp_path)
    await store.close()
    await admin.close()
    await proxy.down()


def _dom(drva: DrvaProcess) -> dict:
    try:
        return drva.status()["domains"][0]
    except (FileNotFoundError, ValueError, KeyError, IndexError):
        return {}
