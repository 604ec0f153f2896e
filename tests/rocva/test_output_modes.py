"""What a recovery creates is its owner's alone: a recovery from an encrypted store writes
plaintext disks, so every image it makes is 0600 and every directory it creates for the
destination 0700, whatever the umask leaves; a directory that was already there keeps
its mode (rocva/destination.py)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cdp.store.crypt import EncryptedStore
from cdp.store.memory import MemoryStore
from cdp.store.storekeys import StoreKey, StoreKeyring
from cdp.testing.domain import DomainBuilder, random_workload
from rocva import RecoverOptions, Target, recover
from rocva.destination import Destination, open_output_dir
from tests.rocva.build import seed_initial

KiB = 1 << 10


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The loosest usual umask (022): what a user's shell often has."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
async def sealed() -> DomainBuilder:
    store = EncryptedStore(MemoryStore(), StoreKeyring([StoreKey(bytes(range(32)))], "a test key"))
    rng = np.random.default_rng(5)
    b = await DomainBuilder(store, disks=(("vm", "a", 128 * KiB), ("vm", "b", 64 * KiB)), block_raw_size=4 * KiB).start()
    await seed_initial(b, 0, rng, chunk=64 * KiB)
    await random_workload(b, rng, 40, seal_every=10, max_sectors=8)
    return b


async def test_images_and_created_directories_are_the_owners_alone(sealed, tmp_path, open_umask):
    out = tmp_path / "new" / "deeper" / "out"
    await recover(sealed.store, sealed.domain, RecoverOptions(Target.latest(), out))
    images = sorted(out.iterdir())
    assert [p.name for p in images] == ["vm-a.img", "vm-b.img"]
    assert all(mode(p) == 0o600 for p in images), {p.name: oct(mode(p)) for p in images}
    for d in (tmp_path / "new", tmp_path / "new" / "deeper", out):
        assert mode(d) == 0o700, (d, oct(mode(d)))


async def test_an_existing_directory_keeps_its_mode(sealed, tmp_path, open_umask):
    out = tmp_path / "shared"
    out.mkdir()
    out.chmod(0o755)
    parent = mode(tmp_path)
    await recover(sealed.store, sealed.domain, RecoverOptions(Target.latest(), out))
    assert mode(out) == 0o755 and mode(tmp_path) == parent  # left as they were
    assert all(mode(p) == 0o600 for p in out.iterdir())


def test_every_file_the_output_directory_creates_is_0600(tmp_path, open_umask):
    out = open_output_dir(tmp_path / "o", Destination())
    try:
        os.close(out.create("x"))
        out.write_atomic("state.json", b"{}")
    finally:
        out.close()
    assert mode(tmp_path / "o") == 0o700
    assert mode(tmp_path / "o" / "x") == 0o600 and mode(tmp_path / "o" / "state.json") == 0o600
