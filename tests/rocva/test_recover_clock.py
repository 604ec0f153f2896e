"""A recovery whose lease fails the clock check goes on without it (FORMAT.md §11.3).

A recovery only reads; its lease keeps retention from deleting what it reads, and a
retention that does delete under it makes it fail naming the missing object, never
return a wrong image. It was refused outright when this host's clock was off from the
store's by more than the skew, or when the store's answer had no usable Date: in a
disaster the recovery host is the one likely to have a bad clock, and recover, verify,
mount and failover were all wedged. Now those go on without a lease, as with read-only
credentials, and say why. A store that does not answer still fails the recovery.
"""

from __future__ import annotations

import email.utils
import hashlib
import importlib
import logging
import re
import time
from pathlib import Path

import numpy as np
import pytest

from cdp.errors import StoreTimeout, StoreUnavailable
from cdp.locks import recovery_prefix
from cdp.store.base import server_date
from cdp.store.fs import FileStore
from cdp.store.memory import MemoryStore
from cdp.testing.domain import DomainBuilder
from rocva import RecoverOptions, Target, recover
from rocva.failover import failover
from rocva.mount import Mount, MountOptions
from rocva.verify import verify
from tests.rocva.build import seed_initial
from tests.store.test_hostile_responses import Pair, pair, with_date  # noqa: F401 (pair: a fixture)
from tests.waiting import EVENTUALLY_S, wait_until

KiB, MiB = 1 << 10, 1 << 20
NO_USABLE_DATE = "no usable Date header"  # cdp.store.base.server_date's words
S = 1_000_000_000
SITE_B = "site-b"


class HostClock:
    """This host's wall clock ``off_ns`` from the real one; the file and memory stores'
    ``server_time`` (``time.time``) keep the real time, as a store with its own clock."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.off_ns = 0
        real_ns = time.time_ns
        monkeypatch.setattr(time, "time_ns", lambda: real_ns() + self.off_ns)


class NoDate(MemoryStore):
    """A network store whose answers carry no Date: its error is ``server_date``'s own."""

    async def server_time(self) -> float:
        return server_date("memory store: server_time", None)


class ClockDown(MemoryStore):
    """A store that does not answer the clock's request (a transient outage)."""

    def __init__(self, error: StoreUnavailable) -> None:
        super().__init__()
        self.error = error

    async def server_time(self) -> float:
        raise self.error


async def _domain(store) -> DomainBuilder:
    b = await DomainBuilder(store, disks=(("vm", "d", MiB),)).start()
    rng = np.random.default_rng(5)
    await seed_initial(b, 0, rng, chunk=64 * KiB)
    b.write(0, 0, rng.bytes(4 * KiB))
    await b.seal()
    return b


def _skipped(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [r.fields for r in caplog.records if r.getMessage() == "recovery_without_lease"]


async def _no_lease_left(store, domain: int) -> None:
    assert [i.key async for i in store.list(recovery_prefix(domain))] == []


# ------------------------------------------------------------------ a clock off from the store's


@pytest.mark.parametrize("off_s", [-300, 300])
async def test_a_recovery_on_a_host_whose_clock_is_off_goes_on_without_a_lease(monkeypatch, caplog, tmp_path,
                                                                               off_s):
    store = FileStore(tmp_path / "store")
    clock = HostClock(monkeypatch)
    b = await _domain(store)
    clock.off_ns = off_s * S
    with caplog.at_level(logging.WARNING, logger="rocva.recover"):
        out = await recover(store, b.domain, RecoverOptions(Target.latest(), tmp_path / "rec", checksum=True))
    assert [im["sha256"] for im in out["images"]] == b.snapshot()
    way = "behind" if off_s < 0 else "ahead of"
    why = out["without_lease"]
    assert why.startswith("this host's clock is off from the store's: ") and f"300.0 s {way} the store's" in why
    [said] = _skipped(caplog)
    assert said["reason"] == "this host's clock is off from the store's" and "NTP" in said["error"]
    await _no_lease_left(store, b.domain)


async def test_a_recovery_that_holds_its_lease_says_so(tmp_path):
    store = FileStore(tmp_path / "store")
    b = await _domain(store)
    out = await recover(store, b.domain, RecoverOptions(Target.latest(), tmp_path / "rec"))
    assert out["without_lease"] is None


async def test_verify_mount_and_failover_go_on_too(monkeypatch, caplog, tmp_path):
    """Every reader takes its lease the same way (``recovery_lease_held``,
    ``take_recovery_lease``): none is wedged by the clock."""
    store = FileStore(tmp_path / "store")
    clock = HostClock(monkeypatch)
    b = await _domain(store)
    clock.off_ns = 300 * S
    with caplog.at_level(logging.WARNING, logger="rocva.recover"):
        assert (await verify(store, b.domain))["ok"]
        mount = await Mount.open(store, MountOptions(b.domain, Target.latest()))
        try:
            assert mount.lease is None and mount.guard is None
        finally:
            await mount.close()
        forked = await failover(store, b.domain, Target.latest(), tmp_path / "ds", site=SITE_B)
    assert forked["fork_seq"] == b.seq and forked["images"]
    assert len(_skipped(caplog)) == 4  # a failover's rehydration is a recovery: it takes one of its own
    await _no_lease_left(store, b.domain)


async def test_a_mount_whose_clock_steps_off_serves_on_without_a_lease(monkeypatch, caplog, tmp_path):
    """A mount's lease is lost when this host's clock steps off the store's (its renewal
    checks); the lease it takes again is refused by the same clock. The point is checked
    once more and served on without a lease, as with read-only credentials, not failed
    with EIO for good ("the point cannot be checked again")."""
    recover_mod = importlib.import_module("rocva.recover")  # ``rocva.recover`` is also a function
    real_lease = recover_mod.recovery_lease

    async def short_lease(store, domain, **kw):  # renewed every 0.5 s: the step is seen soon
        return await real_lease(store, domain, **{**kw, "ttl_s": 1.5})

    monkeypatch.setattr(recover_mod, "recovery_lease", short_lease)
    caplog.set_level(logging.INFO, logger="rocva.mount")
    store = FileStore(tmp_path / "store")
    clock = HostClock(monkeypatch)
    b = await _domain(store)
    mount = await Mount.open(store, MountOptions(b.domain, Target.latest()))
    try:
        lease = mount.lease
        assert lease is not None
        clock.off_ns = 300 * S  # NTP steps this host's clock five minutes ahead
        await wait_until(lambda: "mount_point_checked" in caplog.text or mount.guard.lost is not None,
                         EVENTUALLY_S, "the point checked again after the lease was lost")
        assert lease.lost is not None and mount.lease is None and mount.guard.lost is None, mount.guard.lost
        [disk] = mount.disks.values()
        image = b"".join([bytes(await disk.read(off, 64 * KiB)) for off in range(0, disk.size, 64 * KiB)])
        assert [hashlib.sha256(image).hexdigest()] == b.snapshot()
        assert mount.summary()["point_lost"] is None
    finally:
        await mount.close()


# ------------------------------------------------------------------ no usable Date, or no answer


async def test_a_recovery_through_a_store_without_a_date_goes_on_without_a_lease(caplog, tmp_path):
    store = NoDate()
    b = await _domain(store)
    with caplog.at_level(logging.WARNING, logger="rocva.recover"):
        out = await recover(store, b.domain, RecoverOptions(Target.latest(), tmp_path / "rec", checksum=True))
    assert [im["sha256"] for im in out["images"]] == b.snapshot()
    assert out["without_lease"].startswith("the store's clock is unknown: ") and NO_USABLE_DATE in out["without_lease"]
    [said] = _skipped(caplog)
    assert said["reason"] == "the store's clock is unknown"


@pytest.mark.parametrize("error", [StoreUnavailable("memory store: server_time: HTTP 503 (injected)"),
                                   StoreTimeout("memory store: server_time: no answer within 120 s (injected)")],
                         ids=["503", "timeout"])
async def test_a_store_that_does_not_answer_still_fails_the_recovery(tmp_path, error):
    store = ClockDown(error)
    b = await _domain(store)
    with pytest.raises(StoreUnavailable) as failed:
        await recover(store, b.domain, RecoverOptions(Target.latest(), tmp_path / "rec"))
    assert failed.value is error
    assert not (tmp_path / "rec").exists() or not list((tmp_path / "rec").glob("*.img"))


async def test_only_server_dates_own_error_is_an_unknown_clock():
    """A store's answer without a usable Date is ``StoreClockUnknown`` (raised by
    ``server_date``); a store that did not answer keeps its own error."""
    from cdp.errors import StoreClockUnknown
    from cdp.locks import read_store_clock
    from cdp.store.base import server_date

    with pytest.raises(StoreClockUnknown, match=NO_USABLE_DATE):
        server_date("s3://b", None)
    with pytest.raises(StoreClockUnknown, match=NO_USABLE_DATE):
        await read_store_clock(NoDate())
    down = StoreUnavailable("memory store: server_time: HTTP 503 (injected)")
    with pytest.raises(StoreUnavailable) as failed:
        await read_store_clock(ClockDown(down))
    assert failed.value is down


# ------------------------------------------------------------------ a real S3 / Azure behind a proxy


@pytest.mark.parametrize("date_off_s", [120, None], ids=["store_clock_2min_ahead", "no_date_header"])
async def test_a_recovery_through_a_store_whose_date_lies(pair: Pair, tmp_path: Path, date_off_s):  # noqa: F811
    """The audit's scenario: moto or Azurite behind a proxy that rewrites every Date."""
    b = await DomainBuilder(pair.direct, disks=(("vm", "d", MiB),)).start()
    rng = np.random.default_rng(5)
    await seed_initial(b, 0, rng, chunk=64 * KiB)
    b.write(0, 0, rng.bytes(4 * KiB))
    await b.seal()
    if date_off_s is None:
        pair.proxy.mangle = with_date(None)
    else:
        pair.proxy.mangle = lambda ex: ex.reply.set_header(
            "Date", email.utils.formatdate(time.time() + date_off_s, usegmt=True))
    out = await recover(pair.via, b.domain, RecoverOptions(Target.latest(), tmp_path / "rec", checksum=True))
    assert [im["sha256"] for im in out["images"]] == b.snapshot()
    expected = NO_USABLE_DATE if date_off_s is None else r"1[12]\d\.\d s behind the store's"  # Date: whole seconds
    assert re.search(expected, out["without_lease"]), out["without_lease"]
    pair.proxy.mangle = None
    await _no_lease_left(pair.direct, b.domain)
