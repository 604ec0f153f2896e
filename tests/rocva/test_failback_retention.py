"""A failback after retention moved a timeline's horizon past the fork: the records that
said what changed after the fork are gone from the store, so no delta can be trusted —
the disks are rewritten whole, saying why, and end exactly at the recovery site's mark
(never a delta of the part still held: that left A's writes after the fork in place)."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.catalog import load_catalog
from cdp.errors import HorizonPassed
from cdp.store.memory import MemoryStore
from cdp.testing.domain import SITE
from rocva import delta
from rocva.consolidate import consolidate
from rocva.failback import failback
from rocva.plan import load_state
from tests.rocva.test_delta import DISKS, _two_histories
from tests.rocva.test_failback import site_a_disks

DAY_NS = 86400 * 10**9


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


async def _retention_past_the_fork(store, seed: int, a_ops: int, b_ops: int):
    """Two histories forked at F, then the recovery site's periodic job four days later
    (consolidate after 1 h, keep nothing): every timeline gets a base at its newest point
    and its horizon there, past F. (Retention is measured back from the newest record at
    the latest, so a window of 72 h would keep this idle domain's history whole.)"""
    b, fork, mark, a_disks, at_mark = await _two_histories(store, seed, a_ops, b_ops, True)
    job = await consolidate(store, b.domain, older_than_s=3600, retention_s=0,
                            now_ns=b.ts(b.seq) + 4 * DAY_NS)
    assert job["sweep"]["segments_deleted"] > 0
    state, _ = await load_catalog(store, b.domain)
    return b, fork, mark, a_disks, at_mark, state


async def test_changed_in_store_refuses_to_start_below_the_horizon():
    store = MemoryStore()
    b, fork, mark, _, _, _ = await _retention_past_the_fork(store, 21, 12, 12)
    new = await load_state(store, b.domain, 2)
    assert new.horizon_seq > fork
    with pytest.raises(HorizonPassed, match=rf"horizon to seq {new.horizon_seq}, past seq {fork}"):
        await delta.changed_in_store(store, new, fork, mark)
    # An empty interval asks nothing; from the horizon on, the store still knows.
    assert [delta.total(r) for r in await delta.changed_in_store(store, new, fork, fork)] == [0] * len(DISKS)
    assert len(await delta.changed_in_store(store, new, new.horizon_seq, new.committed_seq)) == len(DISKS)


async def _failback_after_retention(tmp_path, seed: int, a_ops: int, b_ops: int) -> None:
    store = MemoryStore()
    b, fork, mark, a_disks, at_mark, state = await _retention_past_the_fork(store, seed, a_ops, b_ops)
    passed = [t for t in (1, 2) if state.timelines[t].horizon_seq > fork and
              (t == 2 or state.timelines[t].committed_seq > fork)]
    assert passed, "retention did not pass the fork: the test would prove nothing"
    disks = site_a_disks(tmp_path, a_disks)
    out = await failback(store, b.domain, mark, site=SITE, disks=disks)
    assert [sha(d.path.read_bytes()) for d in disks] == [sha(m) for m in at_mark]
    assert [x["mode"] for x in out["disks"]] == ["whole"] * len(DISKS)
    assert all(f"after the fork (seq {fork}) cannot be known" in x["reason"] and "retention" in x["reason"]
               for x in out["disks"])
    assert out["bytes_moved"] == sum(size for _, _, size in DISKS)
    later, _ = await load_catalog(store, b.domain)
    assert later.current == 3 and later.timeline().owner == SITE and later.timeline().fork_seq == mark


@pytest.mark.parametrize("a_ops", [0, 12], ids=["b-wrote-only", "both-wrote"])
async def test_a_failback_after_retention_passed_the_fork_rewrites_whole(tmp_path, a_ops):
    await _failback_after_retention(tmp_path, 21, a_ops, 12)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), a_ops=st.integers(0, 20), b_ops=st.integers(1, 20))
def test_after_retention_a_failback_always_ends_at_the_mark(tmp_path_factory, seed, a_ops, b_ops):
    asyncio.run(_failback_after_retention(tmp_path_factory.mktemp("fb"), seed, a_ops, b_ops))
