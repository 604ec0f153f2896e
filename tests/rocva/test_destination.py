"""Where a recovery may write (issue 10, item 1): the roots, the store and the state
directory, symbolic links planted in or on the way to the output directory.

Each test runs the real ``recover`` against a file store and checks what is on disk
afterwards: the victim files outside the roots keep their bytes, nothing is published
through a link, and a recovery where it is allowed gives the reference images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cdp.errors import ConfigError
from cdp.store.fs import FileStore
from cdp.testing.domain import DomainBuilder, file_sha256, random_workload
from rocva import RecoverOptions, RecoveryError, Target, plan_recovery, recover
from rocva import destination as dest
from rocva.destination import Destination, open_output_dir, resolve_destination
from rocva.points import list_points
from tests.rocva.test_recover import seed_initial

KiB = 1 << 10
VICTIM = b"an unrelated file the daemon's user can write\n"


@pytest.fixture
async def b(tmp_path: Path) -> DomainBuilder:
    rng = np.random.default_rng(3)
    builder = await DomainBuilder(FileStore(tmp_path / "store"), disks=(("vm", "a", 256 * KiB), ("vm", "b", 128 * KiB)),
                                  block_raw_size=4 * KiB).start()
    await seed_initial(builder, 0, rng, chunk=64 * KiB)
    await random_workload(builder, rng, 120, seal_every=15, max_sectors=16)
    return builder


def msa_policy(tmp_path: Path) -> Destination:
    """What the MSA gives a recovery: under ``roots``, never in the store or its state."""
    (tmp_path / "roots").mkdir(exist_ok=True)
    return Destination((tmp_path / "roots",), ((tmp_path / "store", "the object store"),
                                               (tmp_path / "state", "the MSA's state directory")))


def victim(tmp_path: Path) -> Path:
    path = tmp_path / "outside" / "victim.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(VICTIM)
    return path


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


async def test_dotdot_traversal_out_of_the_roots_is_refused(b, tmp_path):
    policy = msa_policy(tmp_path)
    to = f"{tmp_path}/roots/x/../../escaped"
    with pytest.raises(RecoveryError, match="is not under a recovery root"):
        await recover(b.store, b.domain, RecoverOptions(Target.latest(), to), destination=policy)
    assert not (tmp_path / "escaped").exists() and tree(tmp_path / "roots") == []
    # '..' that stays inside a root is only a path: the recovery lands where it resolves.
    result = await recover(b.store, b.domain,
                           RecoverOptions(Target.latest(), f"{tmp_path}/roots/x/../y", checksum=True),
                           destination=policy)
    assert [i["sha256"] for i in result["images"]] == b.snapshot()
    assert tree(tmp_path / "roots") == ["y", "y/vm-a.img", "y/vm-b.img"]


async def test_an_absolute_path_outside_the_roots_is_refused(b, tmp_path):
    with pytest.raises(RecoveryError, match="is not under a recovery root"):
        await recover(b.store, b.domain, RecoverOptions(Target.latest(), tmp_path / "elsewhere"),
                      destination=msa_policy(tmp_path))
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(RecoveryError, match="no recovery root is configured"):
        await recover(b.store, b.domain, RecoverOptions(Target.latest(), tmp_path / "roots" / "x"),
                      destination=Destination(()))
    with pytest.raises(ConfigError, match="absolute"):
        resolve_destination("relative/dir", msa_policy(tmp_path))
    for bad, what in (("/tmp/a\0b", "NUL"), ("/tmp/\ud800", "surrogate"), ("/" + "a" * 5000, "at most")):
        with pytest.raises(ConfigError, match=what):
            resolve_destination(bad, msa_policy(tmp_path))


async def test_a_symlinked_target_directory_or_root_is_resolved_first(b, tmp_path):
    policy = msa_policy(tmp_path)
    vic = victim(tmp_path)
    (tmp_path / "roots" / "link").symlink_to(tmp_path / "outside")
    for to in (tmp_path / "roots" / "link", tmp_path / "roots" / "link" / "sub"):
        with pytest.raises(RecoveryError, match="is not under a recovery root"):
            await recover(b.store, b.domain, RecoverOptions(Target.latest(), to), destination=policy)
    assert tree(tmp_path / "outside") == ["victim.txt"] and vic.read_bytes() == VICTIM

    # A root that is itself a link into the store: the store is refused all the same.
    (tmp_path / "rootlink").symlink_to(tmp_path / "store" / "d")
    into_store = Destination((tmp_path / "rootlink",), policy.forbidden)
    before = tree(tmp_path / "store")
    with pytest.raises(RecoveryError, match="inside the object store"):
        await recover(b.store, b.domain, RecoverOptions(Target.latest(), tmp_path / "rootlink" / "x"),
                      destination=into_store)
    assert tree(tmp_path / "store") == before

    # A link that resolves inside a root is followed to where it points, and checked there.
    (tmp_path / "roots" / "real").mkdir()
    (tmp_path / "roots" / "alias").symlink_to(tmp_path / "roots" / "real")
    result = await recover(b.store, b.domain,
                           RecoverOptions(Target.latest(), tmp_path / "roots" / "alias", checksum=True),
                           destination=policy)
    assert [i["sha256"] for i in result["images"]] == b.snapshot()
    assert result["images"][0]["path"] == str(tmp_path / "roots" / "real" / "vm-a.img")
    assert tree(tmp_path / "roots" / "real") == ["vm-a.img", "vm-b.img"]


async def test_a_component_swapped_for_a_link_after_the_check_is_not_followed(tmp_path, monkeypatch):
    policy = msa_policy(tmp_path)
    victim(tmp_path)
    (tmp_path / "roots" / "a").mkdir()
    real_resolve = dest.resolve_destination

    def resolve_then_swap(to, destination):
        checked = real_resolve(to, destination)
        (tmp_path / "roots" / "a").rename(tmp_path / "roots" / "a-old")
        (tmp_path / "roots" / "a").symlink_to(tmp_path / "outside")  # the race the walk must lose
        return checked

    monkeypatch.setattr(dest, "resolve_destination", resolve_then_swap)
    with pytest.raises(RecoveryError, match="'a' is a symbolic link or not a directory"):
        open_output_dir(tmp_path / "roots" / "a" / "b", policy)
    assert tree(tmp_path / "outside") == ["victim.txt"]


@pytest.mark.parametrize("msa", [True, False], ids=["msa", "user"])
async def test_a_planted_partial_symlink_is_refused(b, tmp_path, msa):
    out = tmp_path / "roots" / "out"
    out.mkdir(parents=True)
    vic = victim(tmp_path)
    (out / "vm-a.img.partial").symlink_to(vic)
    with pytest.raises(RecoveryError, match=r"vm-a\.img\.partial is a symbolic link"):
        await recover(b.store, b.domain, RecoverOptions(Target.latest(), out),
                      destination=msa_policy(tmp_path) if msa else None)
    assert vic.read_bytes() == VICTIM and os.readlink(out / "vm-a.img.partial") == str(vic)
    assert sorted(p.name for p in out.iterdir()) == ["vm-a.img.partial"]  # and no lock: the refused run removed its own


async def test_a_planted_final_image_symlink_is_refused(b, tmp_path):
    out = tmp_path / "roots" / "out"
    out.mkdir(parents=True)
    vic = victim(tmp_path)
    (out / "vm-a.img").symlink_to(vic)  # to an existing file
    (out / "vm-b.img").symlink_to(out / "vm-b.img.partial")  # to the partial, not there yet
    for _ in range(2):
        with pytest.raises(RecoveryError, match=r"vm-a\.img already exists"):
            await recover(b.store, b.domain, RecoverOptions(Target.latest(), out), destination=msa_policy(tmp_path))
        assert vic.read_bytes() == VICTIM and (out / "vm-a.img").is_symlink() and (out / "vm-b.img").is_symlink()
        (out / "vm-a.img").unlink()
        (out / "vm-a.img").symlink_to(tmp_path / "nowhere")  # dangling: exists() says False
    (out / "vm-a.img").unlink()
    with pytest.raises(RecoveryError, match=r"vm-b\.img already exists"):
        await recover(b.store, b.domain, RecoverOptions(Target.latest(), out), destination=msa_policy(tmp_path))
    assert os.readlink(out / "vm-b.img") == str(out / "vm-b.img.partial")
    assert not (out / "vm-b.img.partial").exists() and not (out / "vm-a.img").exists()


async def test_other_planted_files_are_refused_by_name(b, tmp_path):
    vic = victim(tmp_path)
    cases = {
        "lock link": (".recover.lock", lambda p: p.symlink_to(vic), r"\.recover\.lock is a symbolic link"),
        "state link": ("recover.state.json", lambda p: p.symlink_to(vic), r"recover\.state\.json is a symbolic link"),
        "partial fifo": ("vm-b.img.partial", os.mkfifo, r"vm-b\.img\.partial is not a regular file"),
        "partial hard link": ("vm-a.img.partial", lambda p: os.link(vic, p), r"vm-a\.img\.partial has 2 hard links"),
        "unclaimed partial": ("vm-a.img.partial", lambda p: p.write_bytes(b"mine"), "no recover.state.json claims it"),
    }
    for case, (name, plant, message) in cases.items():
        out = tmp_path / "roots" / case.replace(" ", "-")
        out.mkdir(parents=True)
        plant(out / name)
        with pytest.raises(RecoveryError, match=message):
            await recover(b.store, b.domain, RecoverOptions(Target.latest(), out), destination=msa_policy(tmp_path))
        assert vic.read_bytes() == VICTIM, case
        assert not (out / "vm-a.img").exists() and not (out / "vm-b.img").exists(), case
    assert (tmp_path / "roots" / "unclaimed-partial" / "vm-a.img.partial").read_bytes() == b"mine"


async def test_a_hard_linked_partial_claimed_by_a_forged_state_is_refused(b, tmp_path):
    """Even a state naming the file's very inode cannot make a recovery write through a hard link."""
    out = tmp_path / "roots" / "out"
    out.mkdir(parents=True)
    vic = victim(tmp_path)
    os.link(vic, out / "vm-a.img.partial")
    plan = await plan_recovery(b.store, b.domain, Target.latest())
    forged = {"version": 1, "identity": plan.identity(), "complete": False, "done": [],
              "images": ["vm-a.img", "vm-b.img"]}
    (out / "recover.state.json").write_text(json.dumps(forged))
    with pytest.raises(RecoveryError, match="hard links"):
        await recover(b.store, b.domain, RecoverOptions(Target.latest(), out), destination=msa_policy(tmp_path))
    assert vic.read_bytes() == VICTIM


@pytest.mark.parametrize("msa", [True, False], ids=["msa", "user"])
async def test_to_inside_the_store_is_refused_and_the_domain_stays_recoverable(b, tmp_path, msa):
    cat = tmp_path / "store" / "d" / f"{b.domain:08x}" / "cat"
    assert cat.is_dir()
    before = tree(tmp_path / "store")
    for to in (cat, tmp_path / "store", tmp_path / "store" / "new" / "dir"):
        with pytest.raises(RecoveryError, match="lies inside the object store"):
            await recover(b.store, b.domain, RecoverOptions(Target.latest(), to),
                          destination=msa_policy(tmp_path) if msa else None)
    assert tree(tmp_path / "store") == before
    assert (await list_points(b.store, b.domain))["committed_seq"] == b.seq
    # Through a link to the store, or a bind-mount-like alias, it is the same directory.
    (tmp_path / "roots").mkdir(exist_ok=True)
    (tmp_path / "roots" / "cat").symlink_to(cat)
    with pytest.raises(RecoveryError, match="lies inside the object store"):
        await recover(b.store, b.domain, RecoverOptions(Target.latest(), tmp_path / "roots" / "cat"),
                      destination=msa_policy(tmp_path) if msa else None)
    assert tree(tmp_path / "store") == before


async def test_to_inside_the_state_directory_is_refused(b, tmp_path):
    (tmp_path / "state" / "jobs").mkdir(parents=True)
    policy = Destination((tmp_path,), msa_policy(tmp_path).forbidden)  # a root that holds the state dir
    for to in (tmp_path / "state", tmp_path / "state" / "jobs", tmp_path / "state" / "drvas" / "x"):
        with pytest.raises(RecoveryError, match="lies inside the MSA's state directory"):
            await recover(b.store, b.domain, RecoverOptions(Target.latest(), to), destination=policy)
    assert tree(tmp_path / "state") == ["jobs"]
    result = await recover(b.store, b.domain, RecoverOptions(Target.latest(), tmp_path / "restored", checksum=True),
                           destination=policy)
    assert [i["sha256"] for i in result["images"]] == b.snapshot()
    assert [file_sha256(i["path"]) for i in result["images"]] == b.snapshot()


async def test_a_regular_file_as_destination_is_refused(b, tmp_path):
    (tmp_path / "roots").mkdir()
    (tmp_path / "roots" / "file").write_bytes(VICTIM)
    for to in (tmp_path / "roots" / "file", tmp_path / "roots" / "file" / "sub"):
        with pytest.raises(RecoveryError, match="is not a directory"):
            await recover(b.store, b.domain, RecoverOptions(Target.latest(), to), destination=msa_policy(tmp_path))
    assert (tmp_path / "roots" / "file").read_bytes() == VICTIM


async def test_a_partial_swapped_before_publication_is_not_published(b, tmp_path, monkeypatch):
    """The .partial renamed away and a link put in its place just before the link to .img."""
    import importlib

    rr = importlib.import_module("rocva.recover")
    vic = victim(tmp_path)
    out = tmp_path / "roots" / "out"
    real_publish = rr._publish

    def swap_then_publish(plan, outdir, inos):
        (out / "vm-a.img.partial").rename(out / "moved")
        (out / "vm-a.img.partial").symlink_to(vic)
        return real_publish(plan, outdir, inos)

    monkeypatch.setattr(rr, "_publish", swap_then_publish)
    with pytest.raises(RecoveryError, match="was replaced during the recovery"):
        await recover(b.store, b.domain, RecoverOptions(Target.latest(), out), destination=msa_policy(tmp_path))
    assert not (out / "vm-a.img").exists() and not (out / "vm-a.img").is_symlink()
    assert vic.read_bytes() == VICTIM


def test_each_directory_created_is_fsynced_into_its_parent(tmp_path, monkeypatch) -> None:
    """A recovery that created its output directory must make that directory's entry
    durable, in every parent it created it in (a power cut would otherwise lose images
    that were themselves fsynced)."""
    (tmp_path / "roots").mkdir()
    synced: list[int] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    out = open_output_dir(tmp_path / "roots" / "a" / "b", Destination((tmp_path / "roots",)))
    try:
        parents = [tmp_path / "roots", tmp_path / "roots" / "a"]
        assert [p.stat().st_ino for p in parents] == synced[:2], "each parent fsynced after its mkdir"
    finally:
        out.close()
    synced.clear()
    open_output_dir(tmp_path / "roots" / "a" / "b", Destination((tmp_path / "roots",))).close()
    assert synced == []  # nothing created, nothing to sync
