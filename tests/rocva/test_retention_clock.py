"""Retention against a consolidating host whose clock is wrong (FORMAT.md §8.3, §11.1).

A host whose clock jumped eight days ahead ran the scheduled job (consolidate after 1 h,
keep 7 days) and deleted every segment: its "now minus 7 days" was after the newest
record. The window is now measured back from the job's clock but never from later than
the domain's newest record plus the skew; and where the store tells its own time, a job
on a host whose clock is off from it by more than the skew does nothing at all."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

import cdp.testing.domain as tdom
from cdp.errors import ConfigError
from cdp.layout import segment_prefix
from cdp.locks import SKEW_DEFAULT_S, maintenance_prefix
from cdp.store.memory import MemoryStore
from cdp.testing.domain import SECTOR, DomainBuilder
from rocva import RecoverOptions, recover
from rocva.consolidate import consolidate
from rocva.plan import load_state
from rocva.retention import retention_cutoff
from tests.rocva.build import seed_initial

KiB = 1 << 10
S = 1_000_000_000
DAY_NS = 86400 * S
WEEK_S = 7 * 86400


async def _hour_of_writes(monkeypatch) -> tuple[MemoryStore, DomainBuilder]:
    """Records stamped as a DRVA would: one every 30 s for the last hour, ending now."""
    monkeypatch.setattr(tdom, "TS0", time.time_ns() - 3600 * S)
    store = MemoryStore()
    b = await DomainBuilder(store, disks=(("vm", "d", 128 * KiB),), ns_per_seq=2 * 30 * S).start()
    rng = np.random.default_rng(1)
    await seed_initial(b, 0, rng)
    for i in range(120):
        b.write(0, (i % 64) * SECTOR * 4, rng.bytes(SECTOR * 4))
        if i % 10 == 9:
            await b.seal()
    await b.seal()
    return store, b


def _step_host_clock(monkeypatch, step_ns: int, *, store_follows: bool) -> None:
    """Move this host's clock. ``store_follows``: the store reports this host's clock as
    its own (as the file store does), so only the records can tell the time."""
    real_ns, real_s = time.time_ns, time.time
    monkeypatch.setattr(time, "time_ns", lambda: real_ns() + step_ns)
    if store_follows:
        monkeypatch.setattr(time, "time", lambda: real_s() + step_ns / 1e9)


async def _keys(store, prefix: str) -> list[str]:
    return [i.key async for i in store.list(prefix)]


async def test_a_host_clock_eight_days_ahead_keeps_the_last_week_of_records(monkeypatch, tmp_path):
    store, b = await _hour_of_writes(monkeypatch)
    newest = b.ts(b.seq)
    seq10 = max(s for s in range(b.seq + 1) if b.ts(s) <= newest - 600 * S)  # ten minutes old
    _step_host_clock(monkeypatch, 8 * DAY_NS, store_follows=True)
    job = await consolidate(store, b.domain, older_than_s=3600, retention_s=WEEK_S, scratch_dir=tmp_path)
    monkeypatch.undo()
    assert job["horizon_seq"] == 0 and job["sweep"]["segments_deleted"] == 0
    await recover(store, b.domain, RecoverOptions(seq10, Path(tmp_path / "out")))
    anchor = newest + int(SKEW_DEFAULT_S * 1e9)  # the job's output says what it measured from
    assert job["retention"]["anchored_on"].startswith("newest record")
    assert job["retention"]["anchor_ns"] == anchor and job["retention"]["newest_record_ns"] == newest
    assert job["retention"]["cutoff_ns"] == anchor - WEEK_S * S


async def test_an_idle_domain_keeps_its_last_window_of_written_history(monkeypatch, tmp_path):
    store, b = await _hour_of_writes(monkeypatch)
    newest = b.ts(b.seq)
    # A right clock, eight days after the last write: the week before that write stays.
    job = await consolidate(store, b.domain, older_than_s=3600, retention_s=WEEK_S, now_ns=newest + 8 * DAY_NS,
                            scratch_dir=tmp_path)
    assert job["horizon_seq"] == 0 and job["sweep"]["segments_deleted"] == 0
    assert job["retention"]["job_clock_ns"] == newest + 8 * DAY_NS
    state = await load_state(store, b.domain)
    assert state.horizon_seq == 0


async def test_a_host_clock_off_from_the_stores_runs_no_job(monkeypatch, tmp_path):
    store, b = await _hour_of_writes(monkeypatch)
    before = await _keys(store, segment_prefix(b.domain))
    generation = (await load_state(store, b.domain)).generation
    _step_host_clock(monkeypatch, 8 * DAY_NS, store_follows=False)  # the store keeps the right time
    with pytest.raises(ConfigError) as refused:
        await consolidate(store, b.domain, older_than_s=3600, retention_s=WEEK_S, scratch_dir=tmp_path)
    monkeypatch.undo()
    text = refused.value.message
    assert f"consolidate domain {b.domain} refused" in text and "ahead of the store's" in text
    assert f"{SKEW_DEFAULT_S:g} s of skew" in text and "NTP" in text
    assert await _keys(store, segment_prefix(b.domain)) == before
    assert (await load_state(store, b.domain)).generation == generation
    assert await _keys(store, maintenance_prefix(b.domain)) == []


def test_a_clock_within_the_skew_is_the_anchor():
    out = retention_cutoff(1000 * S, 990 * S, 100, 30)
    assert (out["anchor_ns"], out["anchored_on"], out["cutoff_ns"]) == (1000 * S, "job clock", 900 * S)
    out = retention_cutoff(1021 * S, 990 * S, 100, 30)
    assert (out["anchor_ns"], out["cutoff_ns"]) == (1020 * S, 920 * S)
    assert out["anchored_on"] == "newest record + 30 s skew"
    assert retention_cutoff(5, None, 100, 30)["cutoff_ns"] is None
