"""Recovery targets (rocva.target): seq, mark, time, latest; refusals name the nearest points."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from cdp.errors import ConfigError
from cdp.store.memory import MemoryStore
from cdp.testing.domain import TS0, DomainBuilder
from rocva import InconsistentPoint, InvalidTarget, OutsideRetention, Target, recoverable_ranges, resolve_target
from rocva.plan import load_state
from rocva.target import TargetSyntaxError, parse_time

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def iso(ns: int) -> str:
    return (EPOCH + timedelta(microseconds=ns // 1000)).isoformat()


async def linear(writes: int = 60, *, seal_every: int = 10, store=None) -> DomainBuilder:
    b = await DomainBuilder(store or MemoryStore()).start()
    for i in range(writes):
        b.write(i % 2, (i % 8) * 512, bytes([i % 250 + 1]) * 512)
        if i % seal_every == seal_every - 1:
            await b.seal()
    await b.seal()
    return b


async def resolve(b: DomainBuilder, target, **kw):
    state = await load_state(b.store, b.domain)
    return await resolve_target(state, target, **kw)


async def test_seq_mark_and_latest() -> None:
    b = await linear(60)
    quiet = b.mark("quiet")
    b.write(0, 0, b"\1" * 512)
    await b.seal()
    assert (await resolve(b, 17)).seq == 17
    assert (await resolve(b, Target.seq(0))).seq == 0  # every disk is zeros before seq 1
    r = await resolve(b, Target.mark("quiet"))
    assert r.seq == quiet and r.mark["name"] == "quiet"
    assert (await resolve(b, Target.latest())).seq == b.seq
    with pytest.raises(InvalidTarget, match="no mark named 'loud'.*'quiet'"):
        await resolve(b, Target.mark("loud"))


async def test_time_is_the_last_record_at_or_before_it() -> None:
    b = await linear(60, seal_every=7)
    seqs = np.arange(1, b.seq + 1)
    ts = np.array([b.ts(int(s)) for s in seqs])
    rng = np.random.default_rng(1)
    # Exact record times (two records share each time), segment edges, between, random.
    times = [b.ts(10), b.ts(20), b.ts(31) - 1, b.ts(b.seq), b.ts(b.seq) + 10**12,
             *rng.integers(int(ts[0]), int(ts[-1]) + 1, 20).tolist()]
    for t in times:
        t -= t % 1000  # ISO 8601 text carries microseconds
        assert (await resolve(b, Target.at(iso(t)))).seq == int(seqs[ts <= t].max()), t
    # Relative times, against an injected clock.
    now = b.ts(30) + 15 * 60 * 10**9
    assert (await resolve(b, Target.at("-15m"), now_ns=now)).seq == 31
    assert (await resolve(b, "at:-0.25h", now_ns=now)).seq == 31
    assert (await resolve(b, Target.at("-900s"), now_ns=now)).seq == 31
    with pytest.raises(OutsideRetention, match="before the oldest retained record.*nearest consistent point: seq 0"):
        await resolve(b, Target.at(iso(TS0 - 10**9)))


def test_time_parsing() -> None:
    assert parse_time("1970-01-01T00:00:01Z", 0) == 10**9
    assert parse_time("1970-01-01T01:00:00+01:00", 0) == 0
    assert parse_time("-1d", 10**15) == 10**15 - 86400 * 10**9
    assert parse_time("-30s", 10**12) == 10**12 - 30 * 10**9
    assert parse_time("-2h", 10**13) == 10**13 - 7200 * 10**9
    with pytest.raises(ConfigError, match="no timezone"):
        Target.at("2024-05-01T12:00:00")
    with pytest.raises(ConfigError, match="ISO 8601"):
        Target.at("yesterday")
    with pytest.raises(ConfigError):
        Target.seq(-1)
    with pytest.raises(ConfigError):
        Target.seq(1 << 64)


@pytest.mark.parametrize("target", [Target.latest(), Target.seq(0), Target.seq((1 << 64) - 1), Target.mark("a:b"),
                                    Target.mark("ünïcode"), Target.at("-15m"), Target.at("2024-05-01T12:00:00Z")])
def test_every_written_form_of_a_target_reads_back_the_same(target: Target) -> None:
    """``Target.parse`` reads every form a target is written in: its text (an appliance's
    --target), the REST API's JSON, a bare seq."""
    assert Target.parse(target.text()) == target == Target.parse(target)
    assert Target.parse("latest" if target.kind == "latest" else {target.kind: target.value}) == target
    if target.kind == "seq":
        assert Target.parse(target.value) == target


@pytest.mark.parametrize("written, part", [
    ("soon", "target"), ("seq:", "seq"), ("seq:-1", "seq"), ("seq:٣", "seq"), ({"seq": "7"}, "seq"),
    ({"seq": True}, "seq"), ({"seq": 1, "mark": "x"}, "target"), ({"mark": ""}, "mark"), ({"mark": "a\0b"}, "mark"),
    ({"mark": "x" * 256}, "mark"), ("at:yesterday", "at"), ({"at": "-" + "9" * 5000 + "s"}, "at"),
    (["latest"], "target"), (None, "target"), (True, "target"), (-1, "seq")])
def test_a_target_written_wrong_is_refused_naming_its_part(written, part) -> None:
    with pytest.raises(TargetSyntaxError) as err:
        Target.parse(written)
    assert err.value.part == part


async def test_point_inside_a_resync_window_is_refused_with_the_nearest_points() -> None:
    b = await linear(40)
    begin = b.resync_begin()
    for i in range(20):
        b.write(0, i * 512, b"\7" * 512)
    b.mark("during")
    end = b.resync_end()
    for i in range(10):
        b.write(1, i * 512, b"\x09" * 512)
    await b.seal()
    assert (begin, end) == (41, 63)
    with pytest.raises(InconsistentPoint) as info:
        await resolve(b, 50)
    assert "seq 50 is inside the resync window 41..63; nearest consistent points: seq 40, seq 64" in str(info.value)
    assert info.value.nearest == (40, 64)
    for seq in (41, 63):
        with pytest.raises(InconsistentPoint):
            await resolve(b, seq)
    assert (await resolve(b, 40)).seq == 40 and (await resolve(b, 64)).seq == 64
    with pytest.raises(InconsistentPoint, match="mark 'during': seq 62 is inside the resync window"):
        await resolve(b, Target.mark("during"))
    assert info.value.exit_code == 2


async def test_latest_inside_an_open_window_is_refused() -> None:
    b = await linear(30)
    b.resync_begin()
    b.write(0, 0, b"\5" * 512)
    await b.seal()
    with pytest.raises(InconsistentPoint,
                       match=r"--latest: seq 32 is inside the resync window 31..\(still open\); "
                             r"nearest consistent point: seq 30$"):
        await resolve(b, Target.latest())


async def test_outside_retention_and_before_the_first_rebuildable_point() -> None:
    b = await linear(50)
    base_seq = b.seq
    await b.add_base(0)
    await b.add_base(1)
    for i in range(30):
        b.write(0, 4096 + i * 512, b"\3" * 512)
        if i % 10 == 9:
            await b.seal()
    await b.retire(5, base_seq)  # the 5 segments of seqs 1..50 are gone
    state = await load_state(b.store, b.domain)
    assert recoverable_ranges(state) == [(50, 80)]
    with pytest.raises(OutsideRetention) as info:
        await resolve(b, 49)
    assert str(info.value) == ("domain 7: seq 49 is outside retention (horizon seq 50 .. committed seq 80); "
                               "nearest consistent point: seq 50")
    assert info.value.nearest == (None, 50)
    with pytest.raises(OutsideRetention, match="nearest consistent point: seq 80$"):
        await resolve(b, 81)
    assert (await resolve(b, 50)).seq == 50


async def test_a_disk_that_cannot_be_rebuilt() -> None:
    b = await linear(50)
    await b.add_base(0)  # disk 0 from seq 50 on; disk 1 has no base and replays from 1
    for i in range(20):
        b.write(0, i * 512, b"\4" * 512)
    await b.seal()
    with pytest.raises(OutsideRetention, match=r"disk 0 \(vm1/disk0\) has no base at or below it "
                                               r"\(oldest base: seq 50\); nearest consistent point: seq 50"):
        await resolve(b, 20)
    await b.retire(1, 10)  # seqs 1..10 gone: disk 1 can never be rebuilt again
    with pytest.raises(OutsideRetention, match="disk 1 .*replays from seq 1, but the oldest retained segment "
                                               "starts at seq 11; the domain has no recovery point"):
        await resolve(b, 60)


async def test_a_fuzzy_seeded_base_is_no_recovery_point() -> None:
    b = await linear(20)
    await b.add_base(1, seeding_until=30)  # copied while seqs 21..30 were written
    for i in range(20):
        b.write(1, i * 512, b"\6" * 512)
    await b.seal()
    with pytest.raises(InconsistentPoint, match="seq 20 is the fuzzy base of the seeding window 21..30"):
        await resolve(b, 20)
    with pytest.raises(InconsistentPoint, match="seq 25 is inside the seeding window 21..30; "
                                                "nearest consistent point: seq 31"):
        await resolve(b, 25)
    assert (await resolve(b, 31)).seq == 31
