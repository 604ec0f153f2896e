"""Issue 10, items 4 and 11, against a tampered file store: a rolled-back catalog is a
problem that `verify` reports and `points` shows — by the traces it leaves in the store,
or against what the DRVA's metadata last saw committed when it leaves none; stray objects
under the catalog prefix are skipped; a point whose objects are missing is shown as such
and refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cdp.catalog import list_generations, load_catalog
from cdp.errors import MetaError, NotFound
from cdp.layout import catalog_key, segment_prefix
from cdp.meta import MetaRepository
from cdp.store.fs import FileStore
from cdp.testing.domain import DomainBuilder, random_workload
from rocva import RecoverOptions, recover
from rocva.integrity import SeenCommit, seen_in_metadata
from rocva.points import list_points
from rocva.verify import verify

HOUR_S = 3600
ROOT = Path(__file__).resolve().parents[2]
CLI_EXIT_S = 120.0


async def build(tmp_path: Path) -> DomainBuilder:
    b = await DomainBuilder(FileStore(tmp_path / "store")).start()
    await random_workload(b, np.random.default_rng(4), 120, seal_every=8)
    return b


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


async def test_a_rolled_back_catalog_is_a_problem_for_verify_and_points(tmp_path: Path) -> None:
    b = await build(tmp_path)
    store = b.store
    assert (await verify(store, b.domain))["ok"]
    head, generation = await load_catalog(store, b.domain)
    committed = head.timeline().committed_seq
    # The tester deletes the newest generations, back to the last snapshot (every 5).
    keep = generation // 5 * 5
    for g in range(keep + 1, generation + 1):
        await store.delete(catalog_key(b.domain, g))
    older, _ = await load_catalog(store, b.domain)
    assert older.timeline().committed_seq < committed
    # Just uploaded segments past committed_seq are uploads in flight: no problem yet.
    report = await verify(store, b.domain)
    assert report["ok"] and report["unreferenced"], report
    for p in (tmp_path / "store" / "d" / f"{b.domain:08x}" / "seg" / "00000001").iterdir():
        age(p, 2 * HOUR_S)
    report = await verify(store, b.domain, deep=True)
    assert not report["ok"]
    assert any("rolled back" in p["problem"] for p in report["problems"]), report["problems"]
    pts = await list_points(store, b.domain)
    assert pts["committed_seq"] == older.timeline().committed_seq
    assert pts["problems"] and "committed_seq" in pts["problems"][0]["problem"]


async def test_stray_objects_under_the_catalog_prefix_do_not_make_the_domain_unrecoverable(tmp_path: Path) -> None:
    b = await build(tmp_path)
    cat = tmp_path / "store" / "d" / f"{b.domain:08x}" / "cat"
    (cat / "README").write_text("what these files are")
    (cat / "0000000000000099.cat.tmp").write_bytes(b"partial")  # not a key: .tmp suffix
    pts = await list_points(b.store, b.domain)
    assert pts["latest"] == b.seq
    result = await recover(b.store, b.domain, RecoverOptions("latest", tmp_path / "out", checksum=True))
    assert [im["sha256"] for im in result["images"]] == b.snapshot()
    assert len(await list_generations(b.store, b.domain)) >= 1


async def test_a_mark_whose_segment_is_missing_is_shown_and_refused_by_name(tmp_path: Path) -> None:
    b = await build(tmp_path)
    pts = await list_points(b.store, b.domain)
    marks = [m for m in pts["marks"] if m["consistent"]]
    assert marks and all(m["missing"] == [] for m in pts["marks"])
    victim = marks[len(marks) // 2]
    head, generation = await load_catalog(b.store, b.domain)
    from cdp.catalog_read import CatalogView

    view = CatalogView(b.store, head, generation)
    key = view.row_key(await view.row_for_seq(victim["seq"]))
    await b.store.delete(key)
    pts = await list_points(b.store, b.domain)
    shown = next(m for m in pts["marks"] if m["seq"] == victim["seq"])
    assert shown["missing"] == [key] and shown["consistent"] is False
    with pytest.raises(NotFound, match=key):
        await recover(b.store, b.domain, RecoverOptions(f"mark:{victim['name']}", tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.img"))


def drva_metadata(path: Path, domain: int, timeline: int, committed_seq: int, generation: int) -> Path:
    """A metadata repository holding what a DRVA records after a commit (FORMAT.md §4)."""
    MetaRepository.format(path)
    with MetaRepository.open(path) as meta:
        meta.write({"drva": "drva-1", "domains": {str(domain): {
            "committed_seq": committed_seq, "committed_ts": 0, "generation": generation, "timeline": timeline}}})
    return path


async def test_a_rollback_that_leaves_no_trace_is_seen_against_the_drva_metadata(tmp_path: Path) -> None:
    b = await build(tmp_path)
    store = b.store
    head, generation = await load_catalog(store, b.domain)
    tl = head.timeline()
    meta = drva_metadata(tmp_path / "meta", b.domain, tl.id, tl.committed_seq, generation)
    seen = (seen_in_metadata(meta, b.domain, "the metadata of DRVA drva-1"),)
    assert seen == (SeenCommit("the metadata of DRVA drva-1", tl.id, tl.committed_seq, generation),)
    assert (await verify(store, b.domain, seen=seen))["ok"]
    assert (await list_points(store, b.domain, seen=seen))["problems"] == []
    # The tester deletes the newest generations and every segment they named: the store
    # alone now looks like a domain that never went further.
    keep = generation // 5 * 5
    for g in range(keep + 1, generation + 1):
        await store.delete(catalog_key(b.domain, g))
    older, _ = await load_catalog(store, b.domain)
    past = [i.key async for i in store.list(segment_prefix(b.domain, tl.id))
            if int(i.key.rsplit("/", 1)[1].split("-")[0], 16) > older.timeline().committed_seq]
    assert past
    for key in past:
        await store.delete(key)
    assert (await verify(store, b.domain))["ok"]  # what an unkeyed store cannot see alone
    report = await verify(store, b.domain, seen=seen)
    assert not report["ok"]
    problem = report["problems"][0]["problem"]
    assert "rolled back" in problem and "drva-1" in problem and str(tl.committed_seq) in problem, problem
    pts = await list_points(store, b.domain, seen=seen)
    assert pts["committed_seq"] == older.timeline().committed_seq
    assert any("rolled back" in p["problem"] for p in pts["problems"]), pts["problems"]
    # The same through the command a user runs.
    url = f"file://{tmp_path / 'store'}"
    r = cli("verify", str(b.domain), "--store", url, "--metadata", str(meta), "--json")
    assert r.returncode == 6, r.stderr
    assert not json.loads(r.stdout)["ok"]
    r = cli("points", str(b.domain), "--store", url, "--metadata", str(meta))
    assert r.returncode == 0, r.stderr
    assert "PROBLEM" in r.stdout and "rolled back" in r.stdout
    r = cli("verify", str(b.domain), "--store", url, "--metadata", str(tmp_path / "store"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "metadata" in r.stderr


async def test_metadata_that_is_not_a_drvas_is_refused_by_name(tmp_path: Path) -> None:
    meta = drva_metadata(tmp_path / "meta", 7, 1, 10, 3)
    assert seen_in_metadata(meta, 8, "m") is None  # a domain this DRVA never served
    with MetaRepository.open(meta) as m:
        m.write({"domains": {"7": {"committed_seq": "10", "generation": 3, "timeline": 1}}})
    with pytest.raises(MetaError, match=r"domains\.7\.committed_seq is '10'"):
        seen_in_metadata(meta, 7, "m")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdp.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=CLI_EXIT_S)
