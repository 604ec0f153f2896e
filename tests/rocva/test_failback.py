"""The failback appliance (``rocva.failback``, issue 12): the protected site's disks are
brought to the recovery site's final mark by moving only what may differ — or whole,
saying why, when a disk or its dirty-region map cannot be trusted — and the domain gets a
timeline of the protected site's; bad input is refused with nothing changed; a failback
that died half way completes when rerun."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from cdp.catalog import load_catalog
from cdp.dirtymap import DirtyMap, sidecar_path
from cdp.errors import FailoverRefused
from cdp.store.memory import MemoryStore
from cdp.testing.domain import SITE
from rocva import delta
from rocva.failback import LocalDisk, failback
from rocva.recover import recover
from rocva.recover_options import RecoverOptions
from tests.rocva.test_delta import DISKS, _two_histories

KiB = 1 << 10


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def site_a_disks(d: Path, contents: list[bytearray], flagged: dict[int, list[int]] | None = None) -> list[LocalDisk]:
    """A's disks as its filter left them: the images and their dirty-region maps (with the
    regions ``flagged`` per disk slot still set)."""
    out = []
    for k, ((vm, name, size), content) in enumerate(zip(DISKS, contents)):
        path = d / f"{vm}-{name}.img"
        path.write_bytes(content)
        m = DirtyMap.open(path, size, 7)
        if flagged and flagged.get(k):
            m.set_before_write(np.array(flagged[k]))
        m.close(clean=False)
        out.append(LocalDisk(k, path, size))
    return out


async def test_a_failback_moves_only_what_changed_and_forks_for_the_site(tmp_path):
    store = MemoryStore()
    b, fork, mark, a_disks, at_mark = await _two_histories(store, 21, 12, 12, True)
    # Written at A, never acked: only the dirty-region map knows. In a region neither
    # timeline's records after the fork touch, so that nothing else would move it.
    from rocva.plan import load_state

    touched = delta.union(*[(await delta.changed_in_store(store, await load_state(store, b.domain, t), fork, seq))[1]
                            for t, seq in ((1, 10**9), (2, mark))])
    free = [r for r in range(8) if not ((touched[0] < (r + 1) * 64 * KiB) & (touched[1] > r * 64 * KiB)).any()]
    assert free, "every region of disk 1 was written: the test would prove nothing"
    at = free[0] * 64 * KiB + 4 * KiB
    a_disks[1][at : at + KiB] = np.random.default_rng(4).bytes(KiB)
    disks = site_a_disks(tmp_path, a_disks, {1: [free[0]]})
    out = await failback(store, b.domain, mark, site=SITE, disks=disks)
    assert [sha(d.path.read_bytes()) for d in disks] == [sha(m) for m in at_mark]
    assert [x["mode"] for x in out["disks"]] == ["delta", "delta"]
    assert out["bytes_moved"] < sum(size for _, _, size in DISKS) and out["bytes_written"] <= out["bytes_moved"]
    assert (out["timeline"], out["parent_timeline"], out["fork_seq"], out["old_timeline"], out["old_fork_seq"]) == (
        3, 2, mark, 1, fork)
    state, _ = await load_catalog(store, b.domain)
    assert state.current == 3 and state.timeline().owner == SITE
    assert not any(sidecar_path(d.path).exists() for d in disks)  # the old life's maps are gone
    again = await recover(store, b.domain, RecoverOptions(mark, tmp_path / "t3", timeline=3))
    assert [sha(Path(i["path"]).read_bytes()) for i in again["images"]] == [sha(m) for m in at_mark]
    rerun = await failback(store, b.domain, mark, site=SITE, disks=disks)  # finished: only says so
    assert rerun["resumed"] and rerun["timeline"] == 3


async def test_disks_that_cannot_say_what_they_hold_are_rewritten_whole(tmp_path):
    store = MemoryStore()
    b, fork, mark, a_disks, at_mark = await _two_histories(store, 22, 6, 6, False)
    disks = site_a_disks(tmp_path, a_disks)
    disks[0].path.unlink()  # gone
    raw = bytearray(sidecar_path(disks[1].path).read_bytes())
    raw[0] ^= 0xFF  # its filter's map damaged
    sidecar_path(disks[1].path).write_bytes(bytes(raw))
    out = await failback(store, b.domain, mark, site=SITE, disks=disks)
    assert [x["mode"] for x in out["disks"]] == ["whole", "whole"]
    assert "is missing" in out["disks"][0]["reason"] and "dirty-region map" in out["disks"][1]["reason"]
    assert [sha(d.path.read_bytes()) for d in disks] == [sha(m) for m in at_mark]


async def test_bad_input_is_refused_with_nothing_changed(tmp_path):
    store = MemoryStore()
    b, fork, mark, a_disks, at_mark = await _two_histories(store, 23, 4, 4, False)
    disks = site_a_disks(tmp_path, a_disks)
    before = [d.path.read_bytes() for d in disks]
    generation = (await load_catalog(store, b.domain))[1]
    wrong = [disks[0], LocalDisk(1, disks[1].path, disks[1].size * 2)]
    with pytest.raises(FailoverRefused, match="in this site's inventory .* fix the inventory; nothing was changed"):
        await failback(store, b.domain, mark, site=SITE, disks=wrong)
    with pytest.raises(FailoverRefused, match="no disk in this site's inventory"):
        await failback(store, b.domain, mark, site=SITE, disks=disks[:1])
    with pytest.raises(FailoverRefused, match="owned by 'site-a', not by this site .'site-c'."):
        await failback(store, b.domain, mark, site="site-c", disks=disks)
    assert [d.path.read_bytes() for d in disks] == before and (await load_catalog(store, b.domain))[1] == generation

    never = MemoryStore()  # a domain that never failed over
    from cdp.testing.domain import DomainBuilder

    nb = await DomainBuilder(never, disks=DISKS).start()
    nb.write(0, 0, b"x" * 512)
    await nb.seal()
    with pytest.raises(FailoverRefused, match="never failed over"):
        await failback(never, nb.domain, nb.seq, site=SITE, disks=disks)


async def test_a_failback_that_died_half_way_completes_when_rerun(tmp_path, monkeypatch):
    store = MemoryStore()
    b, fork, mark, a_disks, at_mark = await _two_histories(store, 24, 10, 10, True)
    disks = site_a_disks(tmp_path, a_disks, {0: [2]})
    real = delta.apply_in_place

    async def dies_after_punching(store_, plan, paths):
        import os

        fds = [os.open(p, os.O_RDWR) for p in paths]
        try:
            delta._punch_zeros(plan, fds)  # the zero ranges are holes now: the disks are half-written
        finally:
            for fd in fds:
                os.close(fd)
        raise OSError(5, "the appliance died (injected)")

    monkeypatch.setattr(delta, "apply_in_place", dies_after_punching)
    with pytest.raises(OSError, match="injected"):
        await failback(store, b.domain, mark, site=SITE, disks=disks)
    assert [sha(d.path.read_bytes()) for d in disks] != [sha(m) for m in at_mark]
    assert (await load_catalog(store, b.domain))[0].current == 2  # no fork before the disks are right
    monkeypatch.setattr(delta, "apply_in_place", real)
    out = await failback(store, b.domain, mark, site=SITE, disks=disks)
    assert [x["mode"] for x in out["disks"]] == ["delta", "delta"]  # the maps were kept for the rerun
    assert [sha(d.path.read_bytes()) for d in disks] == [sha(m) for m in at_mark]


async def _serve(app):
    from aiohttp import web

    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/extents"


async def test_the_delta_is_read_from_the_peer_and_from_the_store_when_the_peer_fails(tmp_path):
    """With B's handed-back disks served (FORMAT.md §16) the delta is read from them; a
    peer that is gone, or whose stream stops after some pieces were written, leaves the
    store to read every range again: the disks end at the mark byte for byte each time."""
    from aiohttp import web

    from cdp.extent_stream import parse_request, piece_head, pieces, stream_header
    from cdp.msa.extents import serve_files
    from rocva.peer_extents import Peer

    async def cut(request: web.Request) -> web.StreamResponse:  # two good pieces, then the connection drops
        req = parse_request(await request.read())
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(stream_header(req))
        for disk, offset, length in pieces(req)[:2]:
            data = files[disk][0].read_bytes()[offset:offset + length]
            await resp.write(piece_head(disk, offset, data) + data)
        request.transport.close()
        return resp

    for how in ("peer", "gone", "cut"):
        store = MemoryStore()
        b, fork, mark, a_disks, at_mark = await _two_histories(store, 31, 12, 12, True)
        (tmp_path / how / "b").mkdir(parents=True)
        files = {}
        for k, ((vm, name, size), content) in enumerate(zip(DISKS, at_mark)):
            path = tmp_path / how / "b" / f"{vm}-{name}.img"
            path.write_bytes(content)
            files[k] = (path, size)
        disks = site_a_disks(tmp_path / how, a_disks)
        if how == "cut":
            app = web.Application()
            app.router.add_post("/extents", cut)
        else:
            app = serve_files(b.domain, mark, files, "tok")
        runner, url = await _serve(app)
        try:
            peer = Peer("http://127.0.0.1:1/extents" if how == "gone" else url, "tok", "site-b")
            out = await failback(store, b.domain, mark, site=SITE, disks=disks, peer=peer)
        finally:
            await runner.cleanup()
        assert [sha(d.path.read_bytes()) for d in disks] == [sha(m) for m in at_mark], how
        assert out["source"] == ("peer" if how == "peer" else "store"), (how, out)
        if how == "peer":
            assert out["peer_error"] is None and out["bytes_written"] == out["bytes_moved"]
        else:
            assert "site-b" in out["peer_error"] and ("ended early" in out["peer_error"]) is (how == "cut"), out


@pytest.mark.parametrize("how", ["missing", "short"])
async def test_a_failback_that_died_rewriting_a_disk_whole_rewrites_it_whole_again(tmp_path, monkeypatch, how):
    """A's image of disk 0 is gone (or lost its tail): the failback rewrites it whole, and
    dies after it created (or truncated) the image and before the disk holds the mark.
    Its dirty-region map was removed — durably, before the image was touched — so the
    rerun, finding an image of the right size, rewrites it whole again instead of moving
    a delta over zeros, and the disks end at the mark."""
    from cdp import durable

    store = MemoryStore()
    b, fork, mark, a_disks, at_mark = await _two_histories(store, 22, 6, 6, True)
    disks = site_a_disks(tmp_path, a_disks)
    if how == "missing":
        disks[0].path.unlink()
    else:
        with open(disks[0].path, "r+b") as f:
            f.truncate(disks[0].size // 2)
    assert sidecar_path(disks[0].path).exists()
    real_sync_dir, seen = durable.sync_dir, []

    def watch_dir_syncs(fd: int) -> None:  # what the disks' directory holds when its entries become durable
        if os.readlink(f"/proc/self/fd/{fd}") == os.path.realpath(tmp_path):
            seen.append((sidecar_path(disks[0].path).exists(),
                         disks[0].path.stat().st_size if disks[0].path.exists() else None))
        real_sync_dir(fd)

    async def dies(*args, **kwargs):
        raise OSError(5, "the appliance died (injected)")

    monkeypatch.setattr(durable, "sync_dir", watch_dir_syncs)
    monkeypatch.setattr(delta, "apply_in_place", dies)
    with pytest.raises(OSError, match="injected"):
        await failback(store, b.domain, mark, site=SITE, disks=disks)
    assert disks[0].path.stat().st_size == disks[0].size  # an image of the right size ...
    assert sha(disks[0].path.read_bytes()) != sha(at_mark[0])  # ... that is not the mark
    assert (await load_catalog(store, b.domain))[0].current == 2  # no fork before the disks are right
    monkeypatch.undo()
    out = await failback(store, b.domain, mark, site=SITE, disks=disks)
    assert [x["mode"] for x in out["disks"]] == ["whole", "delta"], out["disks"]
    assert "dirty-region map" in out["disks"][0]["reason"]
    assert [sha(d.path.read_bytes()) for d in disks] == [sha(m) for m in at_mark]
    assert out["timeline"] == 3 and (await load_catalog(store, b.domain))[0].current == 3
    # The first run made the map's removal durable while the image was still as it found it.
    assert (False, None if how == "missing" else disks[0].size // 2) in seen, seen


@pytest.mark.parametrize("victim_size", ["the disk's", "another"])
async def test_a_link_planted_at_a_disk_image_is_never_written_through(tmp_path, victim_size):
    """The MSA runs the failback as root: a symbolic link in place of a primary image
    (whatever its target's size, so whether the disk is rewritten whole or by delta)
    is refused, and its target left as it was."""
    store = MemoryStore()
    b, fork, mark, a_disks, at_mark = await _two_histories(store, 24, 4, 4, False)
    disks = site_a_disks(tmp_path, a_disks)
    victim = tmp_path / "victim"
    victim.write_bytes(b"v" * (disks[0].size if victim_size == "the disk's" else 4096))
    disks[0].path.unlink()
    disks[0].path.symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link"):
        await failback(store, b.domain, mark, site=SITE, disks=disks)
    assert set(victim.read_bytes()) == {ord("v")}
