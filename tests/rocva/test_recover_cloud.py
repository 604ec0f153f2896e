"""The recovery property (tests/rocva/build.py) over the real local S3 (moto) and Azure
(Azurite) servers: the same code as over the in-memory store, a few examples each.

Each example builds its store inside its own event loop (the SDK clients bind to the
loop that opened them), in a bucket / container of its own, and closes it.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_azure_store, make_s3_store, unique_name
from tests.rocva.build import recovery_property

KiB = 1 << 10

cloud_examples = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
workloads = given(seed=st.integers(0, 2**32 - 1), ops=st.integers(2, 100), seal_every=st.integers(4, 40),
                  bases=st.sampled_from(["none", "initial", "initial+mid"]), resync=st.booleans(),
                  brs=st.sampled_from([4 * KiB, 8 * KiB, 64 * KiB]))


async def _run(make, create: str, args: tuple) -> None:
    store = make()
    try:
        await getattr(store, create)()
        with tempfile.TemporaryDirectory() as work:
            await recovery_property(store, *args, Path(work))
    finally:
        await store.close()


@cloud_examples
@workloads
def test_s3_random_workloads_match_the_reference(moto_server, seed, ops, seal_every, bases, resync, brs) -> None:
    asyncio.run(_run(lambda: make_s3_store(moto_server, unique_name()), "create_bucket",
                     (seed, ops, seal_every, bases, resync, brs)))


@cloud_examples
@workloads
def test_azure_random_workloads_match_the_reference(azurite, seed, ops, seal_every, bases, resync, brs) -> None:
    asyncio.run(_run(lambda: make_azure_store(azurite, unique_name()), "create_container",
                     (seed, ops, seal_every, bases, resync, brs)))
