"""The ``nbd`` hypervisor driver (issue 13): a powered-on domain's disks are NBD exports
on its host's socket; what real clients write there is replicated, and powering the
domain off drains it into the store."""

from __future__ import annotations

import asyncio

from cdp.digest import sha256_file
from cdp.store.fs import FileStore
from cdp.testing.site import make_site, running_daemon
from rocva import RecoverOptions, recover
from rocva.target import Target
from tests.drva.test_crash import wait_until_committed
from tests.nbd.conftest import run_tool


async def test_a_domain_powered_on_serves_its_disks_and_replicates_what_clients_write(tmp_path) -> None:
    site = make_site(tmp_path / "site", hypervisor={"driver": "nbd", "nbd_listen": "127.0.0.1:0"})
    async with running_daemon(site) as daemon:
        await daemon.power("erp", True)
        hv = daemon.hypervisor
        sock = hv.socket_path("esx-01")

        async def exports() -> dict:
            for _ in range(600):
                await hv.step()
                view = next(v for v in hv.views() if v.domain == "erp")
                nbd = (view.status or {}).get("nbd") or {}
                if nbd.get("exports"):
                    return nbd
                await asyncio.sleep(0.05)
            raise AssertionError(f"the host never reported its exports: {hv.views()}")

        nbd = await exports()
        assert nbd["exports"] == {"erp-db/data": 4 << 20, "erp-db/log": 4 << 20}
        assert nbd["unix"] == str(sock) and nbd["tcp"].startswith("127.0.0.1:")
        image = tmp_path / "in.img"
        image.write_bytes(bytes(range(256)) * (12 * 1024))  # 3 MiB
        await run_tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image),
                       f"nbd+unix:///erp-db/data?socket={sock}")
        await run_tool("qemu-io", "-f", "raw", "-c", "write -P 0x5c 1M 64k", f"nbd://{nbd['tcp']}/erp-db/log")
        status = next(v for v in hv.views() if v.domain == "erp").status
        await daemon.power("erp", False)  # the host drains before it stops
        last = hv.last_run("erp")
        assert last is not None and last["acked_seq"] == last["captured_seq"] > 0, (last, status)
        store = FileStore(site.cfg.store_url.removeprefix("file://"))
        await wait_until_committed(store, 1, last["acked_seq"])
    primaries = site.cfg.cluster.state_dir
    out = tmp_path / "out"
    await recover(store, 1, RecoverOptions(Target.latest(), out))
    for vm_disk in ("erp-db-data", "erp-db-log"):
        assert sha256_file(out / f"{vm_disk}.img") == sha256_file(primaries / f"{vm_disk}.img"), vm_disk
    assert (out / "erp-db-data.img").read_bytes()[: 3 << 20] == image.read_bytes()
    assert not sock.exists()  # the host removed its socket when it stopped
