"""``cdp recover --to`` as a user runs it (a subprocess) against hostile output
directories (issue 10, items 1 and 3): it may write wherever the user can, but never
into the store, never through a planted link, and never publishes what it did not prove."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cdp.store.fs import FileStore
from cdp.testing.domain import DomainBuilder, file_sha256, random_workload
from rocva import Target, plan_recovery
from rocva.work_units import BASE_BATCH_CHUNKS_DEFAULT
from tests.rocva.test_resume import forge, garbage_partials, group_names, interrupted
from tests.rocva.test_recover import seed_initial

ROOT = Path(__file__).resolve().parent.parent
KiB = 1 << 10
VICTIM = b"an unrelated file\n"


def cdp_recover(store: Path, to: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdp.cli", "recover", "7", "--store", f"file://{store}",
                           "--latest", "--to", str(to), "--json", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture
async def b(tmp_path: Path) -> DomainBuilder:
    rng = np.random.default_rng(8)
    builder = await DomainBuilder(FileStore(tmp_path / "store"), disks=(("vm", "a", 1 << 20), ("vm", "b", 512 * KiB)),
                                  block_raw_size=4 * KiB).start()
    await seed_initial(builder, 0, rng, chunk=64 * KiB)
    await random_workload(builder, rng, 400, seal_every=12, max_sectors=16)
    return builder


def images_ok(b: DomainBuilder, out: Path) -> bool:
    return [file_sha256(out / n) for n in ("vm-a.img", "vm-b.img")] == b.snapshot()


def store_tree(tmp_path: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "store").rglob("*"))


async def test_cli_refuses_the_store_and_planted_links(b, tmp_path):
    store = tmp_path / "store"
    before = store_tree(tmp_path)
    r = cdp_recover(store, store / "d" / f"{b.domain:08x}" / "cat")
    assert r.returncode == 6 and "lies inside the object store" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and store_tree(tmp_path) == before
    points = subprocess.run([sys.executable, "-m", "cdp.cli", "points", "7", "--store", f"file://{store}", "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert points.returncode == 0 and json.loads(points.stdout)["committed_seq"] == b.seq

    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM)
    out = tmp_path / "partial-link"
    out.mkdir()
    (out / "vm-a.img.partial").symlink_to(victim)
    r = cdp_recover(store, out)
    assert r.returncode == 6 and "vm-a.img.partial is a symbolic link" in r.stderr, r.stderr
    assert victim.read_bytes() == VICTIM and not (out / "vm-a.img").exists()

    out = tmp_path / "final-link"
    out.mkdir()
    (out / "vm-a.img").symlink_to(victim)
    r = cdp_recover(store, out)
    assert r.returncode == 6 and "vm-a.img already exists" in r.stderr, r.stderr
    assert victim.read_bytes() == VICTIM and os.readlink(out / "vm-a.img") == str(victim)

    # Where the user may write, through the user's own link: fine.
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    r = cdp_recover(store, tmp_path / "alias" / "x")
    assert r.returncode == 0, r.stderr
    assert images_ok(b, tmp_path / "real" / "x")


async def test_cli_never_publishes_a_forged_state(b, tmp_path):
    out = tmp_path / "out"
    plan = await garbage_partials(b, out)
    (out / "recover.state.json").write_text(json.dumps({  # the file
        "version": 1, "identity": plan.identity(), "domain": plan.domain, "target_seq": plan.seq,
        "generation": plan.generation, "complete": True, "images": [d.image_name for d in plan.disks],
        "done": group_names(plan)}))
    r = cdp_recover(tmp_path / "store", out)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bytes_written"] == plan.bytes_to_write > 0
    assert images_ok(b, out)

    out = tmp_path / "out2"
    await garbage_partials(b, out)
    forge(out, plan, complete=True, done={n: 7 for n in group_names(plan)})
    r = cdp_recover(tmp_path / "store", out)
    assert r.returncode == 0, r.stderr
    assert images_ok(b, out)
    doc = json.loads(r.stdout)
    assert not doc["resumed"] and "digest" in doc["state_discarded"] and "recover_state_discarded" in r.stderr


async def test_cli_resumes_an_interrupted_recovery(b, tmp_path):
    out = tmp_path / "out"
    state = await interrupted(b, out)
    assert state["done"] and not state["complete"]
    r = cdp_recover(tmp_path / "store", out)  # other units than the interrupted run: starts over
    assert r.returncode == 0, r.stderr
    assert images_ok(b, out) and not json.loads(r.stdout)["resumed"]

    out = tmp_path / "out2"
    state = await interrupted(b, out, base_batch_chunks=BASE_BATCH_CHUNKS_DEFAULT)  # the units cdp recover uses
    assert state["done"] and not state["complete"]
    plan = await plan_recovery(b.store, b.domain, Target.latest())
    r = cdp_recover(tmp_path / "store", out)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert images_ok(b, out)
    assert doc["resumed"] and doc["groups_skipped"] == len(state["done"]) and doc.get("state_discarded") is None
    assert doc["bytes_written"] + doc["bytes_skipped"] == plan.bytes_to_write and doc["bytes_skipped"] > 0


async def test_cli_options_are_checked_before_anything_is_read(b, tmp_path):
    """``--concurrency`` out of 1..32 is a usage error naming it (it was an AssertionError
    traceback at 0, and unbounded above); nothing is created, the store is not read."""
    from rocva.plan import CONCURRENCY_DEFAULT
    from rocva.recover_options import CONCURRENCY_MAX

    for bad in ("0", "-3", str(CONCURRENCY_MAX + 1)):
        r = cdp_recover(tmp_path / "store", tmp_path / "out", "--concurrency", bad)
        assert r.returncode == 2 and "--concurrency" in r.stderr and f"1..{CONCURRENCY_MAX}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    # The help states the numbers RecoverOptions checks (written out there: see store_verbs).
    usage = subprocess.run([sys.executable, "-m", "cdp.cli", "recover", "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300).stdout
    assert f"1..{CONCURRENCY_MAX}, default {CONCURRENCY_DEFAULT}" in " ".join(usage.split()), usage


async def test_cli_checksum_gives_each_image_sha256(b, tmp_path):
    r = cdp_recover(tmp_path / "store", tmp_path / "out", "--checksum", "--concurrency", "1")
    assert r.returncode == 0, r.stderr
    images = json.loads(r.stdout)["images"]
    assert [i["sha256"] for i in images] == b.snapshot() and images_ok(b, tmp_path / "out")


# Any of these audit events is a process being started.
_PROCESS_EVENTS = ("subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system")


async def test_cli_recovery_starts_no_process(b, tmp_path):
    """A recovery (base chunks and segment blocks decoded) starts no child process: a child
    forked while the run holds its directory's lock holds it too, so a run killed with its
    process group could leave its lock held after it was reaped and refuse the rerun.
    Decoding used to run ``ldconfig`` (ctypes.util.find_library) to find liblz4."""
    hook = ("import runpy, sys\n"
            f"EVENTS = {_PROCESS_EVENTS!r}\n"
            "def refuse(event, args):\n"
            "    if event in EVENTS:\n"
            "        raise RuntimeError(f'process started: {event} {args!r}')\n"
            "sys.addaudithook(refuse)\n"
            "runpy.run_module('cdp.cli', run_name='__main__')\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", hook, "recover", "7", "--store", f"file://{tmp_path / 'store'}",
                        "--latest", "--to", str(out), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "process started" not in r.stderr, r.stderr
    doc = json.loads(r.stdout)
    assert images_ok(b, out) and doc["bytes_fetched"] > 0


async def test_a_run_killed_holding_only_its_lock_is_rerun(b, tmp_path):
    """A run killed after it created its lock file and before anything else leaves the
    file alone in the directory; the rerun takes that lock (nobody holds it) and recovers."""
    from rocva.recover import LOCK_NAME

    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_bytes(b"")
    r = cdp_recover(tmp_path / "store", out)
    assert r.returncode == 0, r.stderr
    assert images_ok(b, out) and not (out / LOCK_NAME).exists()
