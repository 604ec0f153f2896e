"""A warm standby and a disk re-seeded at or after its point (FORMAT.md §6.2, §8.2, §14.6):
the ``seed`` base says the disk holds content no record says, so the standby cannot be
brought past it by replaying records — it is rebuilt cold, and a failover from it falls
back to a cold rehydration; both equal a cold recovery. And the standby loop
(``python -m rocva standby``) records an OSError of the datastore as its last error and
goes on, as it does for a store's."""

from __future__ import annotations

import errno
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cdp.store.fs import FileStore
from cdp.testing.domain import DomainBuilder, random_workload, sha256
from rocva import RecoverOptions, Target, recover
from rocva.failover import failover
from rocva.plan import build_plan, load_state
from rocva.standby import keep_warm
from rocva.target import resolve_target

KiB = 1 << 10


def images(out: Path) -> list[str]:
    return [sha256(p.read_bytes()) for p in sorted(out.glob("*.img"))]


async def cold(b: DomainBuilder, seq: int) -> list[str]:
    out = Path(tempfile.mkdtemp()) / "cold"
    result = await recover(b.store, b.domain, RecoverOptions(Target.seq(seq), out))
    return images(out) if result["seq"] == seq else []


async def _domain(tmp_path: Path) -> tuple[DomainBuilder, np.random.Generator]:
    rng = np.random.default_rng(11)
    b = await DomainBuilder(FileStore(tmp_path / "store")).start()
    b.model[0][:] = rng.bytes(b.disks[0]["size"])
    await b.add_base(0, chunk_size=64 * KiB)
    await random_workload(b, rng, 40, seal_every=8, marks=False)
    return b, rng


async def _reseed(b: DomainBuilder, rng: np.random.Generator) -> None:
    """The filter lost track of disk 0 and seeds it again from the primary, whose content
    the records never said."""
    b.model[0][0 : 64 * KiB] = rng.bytes(64 * KiB)
    await b.add_base(0, chunk_size=64 * KiB, origin="seed")


@pytest.mark.parametrize("records_before_seed", [0, 7])
async def test_a_disk_seeded_at_or_after_the_standby_point_rebuilds_it_cold(tmp_path, records_before_seed):
    """0: seeded at the standby's very seq (committed after the images were built);
    7: seeded inside the tail."""
    b, rng = await _domain(tmp_path)
    out = tmp_path / "datastore" / "erp"
    first = await keep_warm(b.store, b.domain, out)
    assert first["cold"] and images(out) == b.snapshot()
    if records_before_seed:
        await random_workload(b, rng, records_before_seed, seal_every=100, marks=False)
    await _reseed(b, rng)
    await random_workload(b, rng, 20, seal_every=5, marks=False)
    view = await load_state(b.store, b.domain)
    resolved = await resolve_target(view, Target.seq(b.seq))
    with pytest.raises(ValueError, match="cannot hold the seed base"):
        await build_plan(b.store, view, resolved, after_seq=first["seq"])
    step = await keep_warm(b.store, b.domain, out)
    assert step["cold"] and "was seeded at seq" in step["reason"] and step["seq"] == b.seq
    assert images(out) == b.snapshot() == await cold(b, b.seq)
    # From there on the standby is warm again.
    await random_workload(b, rng, 10, seal_every=5, marks=False)
    step = await keep_warm(b.store, b.domain, out)
    assert not step["cold"] and images(out) == b.snapshot() == await cold(b, b.seq)


async def test_a_seed_at_the_standby_point_with_nothing_after_it_rebuilds_it_cold(tmp_path):
    """The seed committed after the images were built, at their very seq, and no record
    since: there is no tail to apply, and the standby was once handed over as it was
    (its disk 0 without the seed's content). A standby built with that seed in its
    view names it, and stays warm."""
    b, rng = await _domain(tmp_path)
    out = tmp_path / "datastore" / "erp"
    first = await keep_warm(b.store, b.domain, out)
    assert first["cold"] and first["seq"] == b.seq
    await _reseed(b, rng)
    step = await keep_warm(b.store, b.domain, out)
    assert step["cold"] and "was seeded at seq" in step["reason"] and step["seq"] == first["seq"]
    assert images(out) == b.snapshot() == await cold(b, b.seq)
    again = await keep_warm(b.store, b.domain, out)
    assert not again["cold"] and again["bytes_written"] == 0 and images(out) == b.snapshot()
    doc = json.loads((out / "standby.json").read_text())
    assert doc["seq"] == b.seq and len(doc["seeds"]) == 1


async def test_a_failover_from_a_standby_at_a_later_seed_rehydrates_cold(tmp_path):
    b, rng = await _domain(tmp_path)
    out = tmp_path / "datastore" / "erp"
    await keep_warm(b.store, b.domain, out)
    await _reseed(b, rng)
    result = await failover(b.store, b.domain, Target.latest(), out, site="site-b")
    assert not result["warm"] and images(out) == b.snapshot() == await cold(b, b.seq)


async def test_a_failover_from_a_standby_behind_a_reseed_rehydrates_cold(tmp_path):
    b, rng = await _domain(tmp_path)
    out = tmp_path / "datastore" / "erp"
    await keep_warm(b.store, b.domain, out)
    await random_workload(b, rng, 5, seal_every=100, marks=False)
    await _reseed(b, rng)
    await random_workload(b, rng, 20, seal_every=5, marks=False)
    expected = await cold(b, b.seq)
    result = await failover(b.store, b.domain, Target.latest(), out, site="site-b")
    assert not result["warm"] and result["fork_seq"] == b.seq
    assert images(out) == expected == b.snapshot()


async def test_the_standby_loop_records_an_oserror_and_goes_on(tmp_path, monkeypatch):
    """EFBIG sizing an image (a disk grown to 2^62 bytes), ENOSPC, EIO: the loop killed
    by a traceback left the status saying "warm" for good."""
    import cdp.catalog
    import cdp.durable
    import cdp.msa.config
    import cdp.msa.operations
    import cdp.store
    import rocva.standby
    from cdp.store.memory import MemoryStore
    from rocva.__main__ import _standby

    cfg = SimpleNamespace(site="site-b", state_dir=tmp_path / "msa", cluster=SimpleNamespace(state_dir=tmp_path / "ds"),
                          store_url_for=lambda name: "memory://")
    owners = iter(["site-a", "site-a", "site-b"])  # two steps that fail, then it is owned here
    steps = []

    async def find_domain(store, name):
        return 7, SimpleNamespace(timeline=lambda: SimpleNamespace(owner=next(owners), committed_seq=40))

    async def keep_warm(store, domain, out_dir, *, destination=None):
        steps.append(out_dir)
        if len(steps) == 1:
            raise OSError(errno.EFBIG, "File too large", str(out_dir / "vm2-disk1.img"))
        raise OSError(errno.ENOSPC, "No space left on device")

    written = []
    monkeypatch.setattr(cdp.msa.config, "load_site_config", lambda path: cfg)
    monkeypatch.setattr(cdp.msa.operations, "forbidden_places", lambda cfg: ())
    monkeypatch.setattr(cdp.store, "open_store", lambda url: MemoryStore())
    monkeypatch.setattr(cdp.catalog, "find_domain", find_domain)
    monkeypatch.setattr(rocva.standby, "keep_warm", keep_warm)
    monkeypatch.setattr(cdp.durable, "atomic_write", lambda path, data: written.append(json.loads(data)))
    await _standby(tmp_path / "site.toml", "erp", 0.05)
    assert len(steps) == 2 and [w["state"] for w in written] == ["error", "error", "owned here"]
    assert written[0]["last_error"] == f"File too large: {tmp_path / 'ds' / 'erp' / 'vm2-disk1.img'}"
    assert written[1]["last_error"] == "No space left on device" and written[2]["last_error"] is None
