"""``RecoverOptions``: the one place a recovery's choices are checked, for the CLI, the
REST API and the library alike (issue 15, point 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdp.store.fs import FileStore
from cdp.testing.domain import DomainBuilder, random_workload
from rocva import RecoverOptionError, RecoverOptions, Target, recover
from rocva.plan import CONCURRENCY_DEFAULT
from rocva.recover_options import CONCURRENCY_MAX, TIMELINE_MAX
from rocva.target import TargetSyntaxError

KiB = 1 << 10


def test_defaults_and_the_forms_of_a_target(tmp_path):
    o = RecoverOptions("latest", str(tmp_path))
    assert (o.target, o.out_dir, o.timeline, o.concurrency, o.checksum) == (
        Target.latest(), tmp_path, None, CONCURRENCY_DEFAULT, False)
    for written, expected in ((7, Target.seq(7)), ("seq:7", Target.seq(7)), ({"seq": 7}, Target.seq(7)),
                              ({"mark": "m"}, Target.mark("m")), (Target.mark("m"), Target.mark("m"))):
        assert RecoverOptions(written, tmp_path).target == expected
    o = RecoverOptions(1, tmp_path, timeline=TIMELINE_MAX, concurrency=CONCURRENCY_MAX, checksum=True)
    assert (o.target, o.timeline, o.concurrency, o.checksum) == (Target.seq(1), TIMELINE_MAX, CONCURRENCY_MAX, True)


@pytest.mark.parametrize("field, value", [
    ("concurrency", 0), ("concurrency", -1), ("concurrency", CONCURRENCY_MAX + 1), ("concurrency", 10**9),
    ("concurrency", True), ("concurrency", 2.0), ("concurrency", "8"), ("concurrency", None),
    ("timeline", 0), ("timeline", -2), ("timeline", TIMELINE_MAX + 1), ("timeline", True), ("timeline", "2"),
    ("checksum", "yes"), ("checksum", 1), ("checksum", None),
])
def test_a_value_out_of_range_is_refused_naming_its_field(tmp_path, field, value):
    with pytest.raises(RecoverOptionError) as info:
        RecoverOptions("latest", tmp_path, **{field: value})
    assert info.value.field == field and info.value.message.startswith(f"{field}: expected"), info.value.message


def test_a_bad_target_or_directory_is_refused():
    with pytest.raises(TargetSyntaxError):
        RecoverOptions("newest", "/tmp/x")
    with pytest.raises(RecoverOptionError) as info:
        RecoverOptions("latest", None)  # type: ignore[arg-type]
    assert info.value.field == "to"


@given(st.integers())
def test_concurrency_and_timeline_ranges(n):
    for field, lo, hi in (("concurrency", 1, CONCURRENCY_MAX), ("timeline", 1, TIMELINE_MAX)):
        if lo <= n <= hi:
            assert getattr(RecoverOptions("latest", "/x", **{field: n}), field) == n
        else:
            with pytest.raises(RecoverOptionError):
                RecoverOptions("latest", "/x", **{field: n})


async def test_recover_takes_the_options_and_only_them(tmp_path: Path):
    rng = np.random.default_rng(3)
    b = await DomainBuilder(FileStore(tmp_path / "store"), disks=(("vm", "a", 256 * KiB),),
                            block_raw_size=4 * KiB).start()
    await random_workload(b, rng, 60, seal_every=10, max_sectors=8)
    result = await recover(b.store, b.domain, RecoverOptions(Target.latest(), tmp_path / "out", timeline=1,
                                                             concurrency=1, checksum=True))
    assert [i["sha256"] for i in result["images"]] == b.snapshot()
    with pytest.raises(TypeError, match="takes RecoverOptions, not Target"):
        await recover(b.store, b.domain, Target.latest())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="positional"):  # the old call, target and directory apart
        await recover(b.store, b.domain, Target.latest(), tmp_path / "out2")  # type: ignore[call-arg]
    assert not (tmp_path / "out2").exists()
