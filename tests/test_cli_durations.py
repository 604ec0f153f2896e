"""Durations on the command line (``cdp consolidate --older-than/--retention``): a value
no instant can be computed from — infinite, NaN, or longer than the MSA's policy allows
(``cdp.msa.config.POLICY_LIMITS``) — is a usage error naming the option (exit 2, no
traceback, nothing in the store touched); and a retention cutoff before the epoch reaches
the catalog as "nothing that old", not as a negative u64."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import click
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdp.catalog import load_catalog
from cdp.catalog_read import CatalogView
from cdp.cli.common import parse_duration_option
from cdp.msa.config import POLICY_LIMITS
from cdp.store.fs import FileStore
from cdp.testing.domain import DomainBuilder, random_workload
from rocva.consolidate import consolidate
from tests.test_cli import cdp

DAY_S = 86400
CAP_S = POLICY_LIMITS["retention"][1]


async def _domain(root: Path) -> tuple[int, int]:
    """A domain in a file store at ``root``, its records a second apart; (domain, committed seq)."""
    b = await DomainBuilder(FileStore(root), ns_per_seq=10**9).start()
    await random_workload(b, np.random.default_rng(1), 60)
    return b.domain, b.seq


def _objects(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("durations") / "store"
    asyncio.run(_domain(root))
    return root


@pytest.mark.parametrize(("option", "value", "said"), [
    ("--retention", "30000d", "longer than 3650 days"),  # the cutoff was before 1970: np.uint64(negative)
    ("--older-than", "99999999999999999999999", "longer than 3650 days"),
    ("--older-than", "9" * 400, "finite"),  # read as infinity: int(inf)
    ("--retention", "9" * 400 + "w", "finite"),
    ("--retention", "nan", "expected a duration"),
    ("--older-than", "inf", "expected a duration"),
    ("--retention", "-1d", "expected a duration"),
])
def test_a_duration_no_instant_can_come_from_is_a_usage_error(store_dir, option, value, said):
    before = _objects(store_dir)
    r = cdp("consolidate", "dom", "--store", store_dir.as_uri(), option, value)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and f"Invalid value for {option}" in r.stderr and said in r.stderr
    assert len(r.stderr) < 2000  # a 400-digit value is not echoed whole
    assert _objects(store_dir) == before


def test_the_longest_durations_allowed_run(store_dir):
    r = cdp("consolidate", "dom", "--store", store_dir.as_uri(), "--older-than", "3650d", "--retention", "3650d",
            "--json")
    assert r.returncode == 0, r.stderr
    assert '"consolidated_seq": null' in r.stdout


@given(text=st.one_of(
    st.from_regex(r"\A[0-9]{1,500}(\.[0-9]{1,20})?[smhdwSMHDW]?\Z"),
    st.text(max_size=40),
    st.floats().map(repr)))
def test_a_duration_option_is_finite_and_bounded_or_refused(text):
    try:
        seconds = parse_duration_option(text, "--retention", "retention")
    except click.BadParameter as exc:
        assert exc.param_hint == "--retention"
        return
    assert math.isfinite(seconds) and 0 <= seconds <= CAP_S


async def test_a_retention_cutoff_before_the_epoch_keeps_everything(tmp_path):
    """The library is asked directly (the CLI refuses such a window): now minus 30000
    days is before 1970; nothing is that old, so the horizon does not move."""
    root = tmp_path / "store"
    domain, committed = await _domain(root)
    store = FileStore(root)
    job = await consolidate(store, domain, older_than_s=30000 * DAY_S, retention_s=30000 * DAY_S,
                            now_ns=time.time_ns(), scratch_dir=tmp_path)
    assert job["consolidated_seq"] is None and not job["horizon_seq"] and job["segments_removed"] == 0
    assert job["sweep"]["objects_deleted"] == 0
    state, generation = await load_catalog(store, domain)
    view = CatalogView(store, state, generation)
    assert view.horizon_seq == 0 and view.committed_seq == committed
    assert await view.seq_at_time(-1) is None and await view.seq_at_time(-(10**30)) is None
    assert await view.seq_at_time(1 << 70) == committed  # after the u64 times end: every record
