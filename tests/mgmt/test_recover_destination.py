"""``POST /v1/domains/{name}/recover`` on a running MSA against hostile ``to`` values and
output directories (issue 10, items 1 and 3).

The site's store holds domain ``erp`` (id 1), built directly with the library so that no
DRVA has to run. The site file names two recovery roots: ``roots/`` and ``rootlink``, a
link into the store. Each test checks what is on disk afterwards, not only the answer:
the files outside the roots keep their bytes, the store is unchanged and still
recoverable, and a recovery where it is allowed gives the model's images."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest_asyncio

from cdp.digest import sha256_file
from cdp.store.fs import FileStore
from cdp.testing.domain import DomainBuilder
from cdp.testing.site import TOKEN, Site, make_site, running_daemon
from rocva import Target, plan_recovery
from tests.rocva.build import erp_history
from tests.rocva.test_resume import forge, garbage_partials, group_names, interrupted

KiB = 1 << 10
VICTIM = b"an unrelated file the daemon's user can write\n"


@dataclass
class Rest:
    site: Site
    http: aiohttp.ClientSession
    b: DomainBuilder
    tmp: Path

    async def recover(self, to: Any, target: Any = "latest") -> tuple[int, dict]:
        async with self.http.post(f"{self.site.api}/v1/domains/erp/recover?wait=1", headers=self.site.headers,
                                  json={"target": target, "to": to}) as resp:
            return resp.status, await resp.json()

    async def refused(self, to: Any, contains: str) -> dict:
        status, doc = await self.recover(to)
        assert status == 400, (status, doc)
        err = doc["error"]
        assert err["field"] == "to" and contains in err["message"], err
        rest_of_message = err["message"].replace(repr(to), "")
        for secret_path in (str(self.site.cfg.state_dir), str(self.site.root / "store")):
            assert secret_path not in rest_of_message, err  # only the caller's own 'to' is named
        return err

    async def job_failed(self, to: Path, contains: str) -> dict:
        status, record = await self.recover(str(to))
        assert status == 200 and record["state"] == "failed", record
        assert contains in record["error"] and record["exit_code"] == 6, record
        return record

    async def points_ok(self) -> None:
        async with self.http.get(f"{self.site.api}/v1/domains/erp/points", headers=self.site.headers) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["committed_seq"] == self.b.seq

    def images_ok(self, out: Path) -> bool:
        return [sha256_file(out / f"erp-db-{n}.img") for n in ("data", "log")] == self.b.snapshot()

    def victim(self) -> Path:
        path = self.tmp / "outside" / "victim.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(VICTIM)
        return path

    def store_tree(self) -> list[str]:
        store = self.site.root / "store"
        return sorted(str(p.relative_to(store)) for p in store.rglob("*"))


@pytest_asyncio.fixture
async def rest(tmp_path):
    site = make_site(tmp_path / "site", protect=(),
                     recovery_roots=[str(tmp_path / "roots"), str(tmp_path / "rootlink")])
    (tmp_path / "roots").mkdir()
    rng = np.random.default_rng(4)
    b = await erp_history(FileStore(site.root / "store"), site.cfg.domain("erp").id, rng, 200, 512 * KiB)
    (tmp_path / "rootlink").symlink_to(site.root / "store" / "d")
    async with running_daemon(site), aiohttp.ClientSession() as http:
        yield Rest(site, http, b, tmp_path)


async def test_a_recovery_under_a_root_succeeds(rest):
    out = rest.tmp / "roots" / "a" / "b"
    status, record = await rest.recover(str(out))
    assert status == 200 and record["state"] == "succeeded", record
    assert record["output"]["images"][0]["path"] == str(out / "erp-db-data.img")
    assert rest.images_ok(out) and sorted(p.name for p in out.iterdir()) == ["erp-db-data.img", "erp-db-log.img"]


async def test_dotdot_traversal_is_refused(rest):
    await rest.refused(f"{rest.tmp}/roots/x/../../etc-probe", "is not under a recovery root")
    await rest.refused(f"{rest.tmp}/roots/../site/state/probe", "lies inside the MSA's state directory")
    assert not (rest.tmp / "etc-probe").exists() and not (rest.tmp / "roots" / "x").exists()
    assert not (rest.site.cfg.state_dir / "probe").exists()


async def test_an_absolute_path_outside_the_roots_is_refused(rest):
    err = await rest.refused(str(rest.tmp / "elsewhere"), "is not under a recovery root")
    assert str(rest.tmp / "roots") in err["message"]  # the roots the caller may use
    await rest.refused("/etc/cdp-probe", "is not under a recovery root")
    assert not (rest.tmp / "elsewhere").exists() and not Path("/etc/cdp-probe").exists()


async def test_a_symlinked_target_directory_or_root_is_refused(rest):
    victim = rest.victim()
    (rest.tmp / "roots" / "link").symlink_to(victim.parent)
    await rest.refused(str(rest.tmp / "roots" / "link"), "is not under a recovery root")
    await rest.refused(str(rest.tmp / "roots" / "link" / "sub"), "is not under a recovery root")
    assert sorted(p.name for p in victim.parent.iterdir()) == ["victim.txt"] and victim.read_bytes() == VICTIM
    before = rest.store_tree()
    await rest.refused(str(rest.tmp / "rootlink" / "00000001" / "cat"), "lies inside the site's object store")
    await rest.refused(str(rest.tmp / "rootlink" / "new"), "lies inside the site's object store")
    assert rest.store_tree() == before
    await rest.points_ok()


async def test_a_planted_partial_symlink_is_refused(rest):
    victim = rest.victim()
    out = rest.tmp / "roots" / "out"
    out.mkdir()
    (out / "erp-db-data.img.partial").symlink_to(victim)
    await rest.job_failed(out, "erp-db-data.img.partial is a symbolic link")
    assert victim.read_bytes() == VICTIM and os.readlink(out / "erp-db-data.img.partial") == str(victim)
    assert not (out / "erp-db-data.img").exists() and not (out / "erp-db-log.img").exists()


async def test_a_planted_final_image_symlink_is_refused(rest):
    victim = rest.victim()
    out = rest.tmp / "roots" / "out"
    out.mkdir()
    (out / "erp-db-log.img").symlink_to(out / "erp-db-log.img.partial")
    await rest.job_failed(out, "erp-db-log.img already exists")
    (out / "erp-db-log.img").unlink()
    (out / "erp-db-data.img").symlink_to(victim)
    await rest.job_failed(out, "erp-db-data.img already exists")
    assert victim.read_bytes() == VICTIM and os.readlink(out / "erp-db-data.img") == str(victim)
    assert not (out / "erp-db-log.img").exists() and not (out / "erp-db-log.img.partial").exists()


async def test_to_inside_the_store_is_refused(rest):
    before = rest.store_tree()
    store = rest.site.root / "store"
    for to in (store / "d" / "00000001" / "cat", store, store / "d" / "00000001" / "new"):
        await rest.refused(str(to), "lies inside the site's object store")
    assert rest.store_tree() == before
    await rest.points_ok()


async def test_to_inside_the_state_directory_is_refused(rest):
    state = rest.site.cfg.state_dir
    before = sorted(p.name for p in state.iterdir())
    for to in (state, state / "jobs", state / "drvas" / "x"):
        await rest.refused(str(to), "lies inside the MSA's state directory")
    assert sorted(p.name for p in state.iterdir()) == before and not (state / "drvas" / "x").exists()


async def test_a_site_without_recovery_roots_refuses_every_recovery(tmp_path):
    site = make_site(tmp_path / "site", protect=(), recovery_roots=[])
    async with running_daemon(site), aiohttp.ClientSession() as http:
        async with http.post(f"{site.api}/v1/domains/erp/recover", headers={"Authorization": f"Bearer {TOKEN}"},
                             json={"target": "latest", "to": str(tmp_path / "x")}) as resp:
            doc = await resp.json()
    assert resp.status == 400 and doc["error"]["field"] == "to", doc
    assert "no recovery root is configured" in doc["error"]["message"]
    assert not (tmp_path / "x").exists()


async def test_a_forged_complete_state_is_not_published(rest):
    out = rest.tmp / "roots" / "forged-v1"
    plan = await garbage_partials(rest.b, out)
    (out / "recover.state.json").write_text(json.dumps({  # the file
        "version": 1, "identity": plan.identity(), "domain": plan.domain, "target_seq": plan.seq,
        "generation": plan.generation, "complete": True, "images": [d.image_name for d in plan.disks],
        "done": group_names(plan)}))
    status, record = await rest.recover(str(out))
    assert status == 200 and record["state"] == "succeeded", record
    assert rest.images_ok(out) and record["output"]["bytes_written"] == plan.bytes_to_write

    out = rest.tmp / "roots" / "forged-v2"
    await garbage_partials(rest.b, out)
    forge(out, plan, complete=True, done={n: 1 for n in group_names(plan)})
    status, record = await rest.recover(str(out))
    assert status == 200 and record["state"] == "succeeded", record
    assert rest.images_ok(out)
    assert not record["output"]["resumed"] and "digest" in record["output"]["state_discarded"]
    assert record["output"]["bytes_written"] == plan.bytes_to_write


async def test_a_forged_incomplete_state_is_redone(rest):
    out = rest.tmp / "roots" / "forged"
    plan = await garbage_partials(rest.b, out)
    (out / "recover.state.json").write_text(json.dumps({  # the format, nothing done yet
        "version": 1, "identity": plan.identity(), "domain": plan.domain, "target_seq": plan.seq,
        "generation": plan.generation, "complete": False, "images": [d.image_name for d in plan.disks],
        "done": []}))
    status, record = await rest.recover(str(out))
    assert status == 200 and record["state"] == "succeeded", record
    assert rest.images_ok(out)
    await garbage_partials(rest.b, out / "v2")
    forge(out / "v2", plan, complete=False, done={})  # claims nothing is done: the garbage must not stay
    status, record = await rest.recover(str(out / "v2"))
    assert status == 200 and record["state"] == "succeeded", record
    assert rest.images_ok(out / "v2")


async def test_an_interrupted_recovery_resumes(rest):
    out = rest.tmp / "roots" / "resumed"
    state = await interrupted(rest.b, out, base_batch_chunks=64)
    plan = await plan_recovery(rest.b.store, rest.b.domain, Target.latest())
    status, record = await rest.recover(str(out))
    assert status == 200 and record["state"] == "succeeded", record
    output = record["output"]
    assert output["resumed"] and output["groups_skipped"] == len(state["done"]) > 0
    assert output["bytes_written"] + output["bytes_skipped"] == plan.bytes_to_write
    assert rest.images_ok(out) and output.get("state_discarded") is None


async def test_a_regular_file_as_to_is_refused(rest):
    victim = rest.tmp / "roots" / "file"
    victim.write_bytes(VICTIM)
    await rest.refused(str(victim), "is not a directory")
    await rest.refused(str(victim / "sub"), "'file' is not a directory")
    assert victim.read_bytes() == VICTIM


async def test_what_lies_outside_the_roots_is_not_looked_at(rest):
    """A file outside every recovery root answers as a missing one does: the refusal of
    ``to`` does not tell a client which files exist on the MSA's host."""
    outside = rest.tmp / "elsewhere"
    outside.write_bytes(VICTIM)
    for to in (outside / "x", rest.tmp / "no-such-file" / "x"):
        await rest.refused(str(to), "is not under a recovery root")
