"""A daemon run under umask 000 (FORMAT.md §13.9): what its hypervisor face makes for a
powered-on domain is still ours alone — the datastore 0755, the host's NBD socket and
marks log 0600 — so no other local user writes a VM's disk through the socket, swaps
an image or a dirty-region map in the datastore, or forges a mark's record.

Before: the datastore was 0777, the socket 0777 (qemu-io as nobody wrote the disk) and
the marks log 0666."""

from __future__ import annotations

import asyncio
import os
import stat

from cdp.msa import marks
from cdp.testing.site import make_site, running_daemon
from tests.waiting import EVENTUALLY_S, wait_until, wait_until_async


def mode(path: os.PathLike[str]) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


async def test_under_umask_000_the_datastore_socket_and_marks_log_are_ours_alone(tmp_path) -> None:
    site = make_site(tmp_path / "site", hypervisor={"driver": "nbd"})
    datastore = site.cfg.cluster.state_dir
    assert not datastore.exists()  # made by the host process, under the daemon's umask
    before = os.umask(0)
    try:
        async with running_daemon(site) as daemon:
            await daemon.power("erp", True)
            hv = daemon.hypervisor

            async def serving() -> bool:
                await hv.step()
                view = next(v for v in hv.views() if v.domain == "erp")
                return bool(((view.status or {}).get("nbd") or {}).get("exports"))

            await wait_until_async(serving, EVENTUALLY_S, "the host serves erp's disks")
            await asyncio.wait_for(marks.request_mark(daemon.cfg, "erp", "m1"), EVENTUALLY_S)
            log = site.cfg.state_dir / "hypervisor" / "esx-01.marks.jsonl"
            await wait_until(lambda: log.exists() and b'"m1"' in log.read_bytes(), EVENTUALLY_S,
                             "the mark's record in the marks log")
            modes = {"datastore": mode(datastore), "socket": mode(hv.socket_path("esx-01")), "marks log": mode(log),
                     **{image.name: mode(image) for image in datastore.glob("*.img")}}
            assert {k: f"{v:04o}" for k, v in modes.items()} == {
                "datastore": "0755", "socket": "0600", "marks log": "0600", "erp-db-data.img": "0600",
                "erp-db-log.img": "0600"}
    finally:
        os.umask(before)


async def test_a_site_without_mark_hashes_records_marks_unhashed(tmp_path) -> None:
    """``[hypervisor] mark_hashes = false``: hosts run with ``--no-mark-hashes`` (no read of
    every disk per mark), and the marks log says ``sha256: null``; by default they hash."""
    import json

    from cdp.errors import ConfigError
    from cdp.msa.config import load_site_config

    site = make_site(tmp_path / "site", hypervisor={"driver": "nbd", "mark_hashes": False})
    async with running_daemon(site) as daemon:
        await daemon.power("erp", True)
        hp = daemon.hypervisor.hosts["esx-01"]
        await wait_until(lambda: hp.state == "up", EVENTUALLY_S, "erp's VMs up")
        assert b"--no-mark-hashes" in open(f"/proc/{hp.proc.pid}/cmdline", "rb").read().split(b"\0")
        await asyncio.wait_for(marks.request_mark(daemon.cfg, "erp", "m1"), EVENTUALLY_S)
        log = site.cfg.state_dir / "hypervisor" / "esx-01.marks.jsonl"
        await wait_until(lambda: log.exists() and b'"m1"' in log.read_bytes(), EVENTUALLY_S,
                         "the mark's record in the marks log")
        [line] = [json.loads(x) for x in log.read_bytes().splitlines() if b'"m1"' in x]
        assert line["sha256"] is None, line
    assert make_site(tmp_path / "default").cfg.hypervisor.mark_hashes is True
    path = site.cfg.path
    path.write_text(path.read_text().replace("mark_hashes = false", 'mark_hashes = "no"'))
    try:
        load_site_config(path)
    except ConfigError as exc:
        assert "hypervisor.mark_hashes: expected true or false" in exc.message
    else:
        raise AssertionError("a string was taken for mark_hashes")
