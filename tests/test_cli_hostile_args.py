"""``cdp`` arguments that used to do harm or crash: an empty output directory (click made
it "."), a FIFO as the store key file (every verb hung), a DOMAIN that is not an id
("²", 2^32: tracebacks) or names more than one domain (the first was taken), and
``cdp log format`` over a log a DRVA holds or over any file (zeroed, exit 0).
Each is refused with one line and a usage (2) or domain (4) exit code."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cdp.catalog import AmbiguousDomain, find_domain
from cdp.replog import ReplicationLog
from cdp.store import open_store
from cdp.store.memory import MemoryStore
from cdp.testing.domain import DomainBuilder

ROOT = Path(__file__).resolve().parent.parent
CLI_EXIT_S = 60.0  # each run here is one short verb; bounds a hang (the FIFO key file)
NO_STORE = "file:///nonexistent-cdp-store"


def cdp(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("CDP_STORE_KEY", "CDP_STORE_KEY_FILE")}
    return subprocess.run([sys.executable, "-m", "cdp.cli", *args], cwd=cwd,
                          env={**base, "PYTHONPATH": str(ROOT), **(env or {})},
                          capture_output=True, text=True, timeout=CLI_EXIT_S)


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    return r.stderr


# ---- 1. cdp log format --------------------------------------------------------------


def test_log_format_refuses_a_log_a_writer_holds(tmp_path: Path) -> None:
    path = tmp_path / "replog"
    ReplicationLog.format(path, 4 << 20)
    with ReplicationLog.open(path) as writer:  # the running DRVA
        writer.append_batch([[b"acked-but-unshipped" * 100]])
        r = cdp("log", "format", str(path), "--size", "4MiB", "--force", "--json")
        assert r.returncode == 4 and "in use by another process" in one_error_line(r), r
        writer.append_batch([[b"more"]])
    with ReplicationLog.open(path, readonly=True) as log:
        assert len(list(log.entries())) == 2


def test_log_format_refuses_any_file_without_force_and_says_what_it_holds(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    data = os.urandom(5000)
    victim.write_bytes(data)
    r = cdp("log", "format", str(victim), "--size", "4MiB")
    assert r.returncode == 4 and "5,000 bytes of other data" in one_error_line(r) and "--force" in r.stderr
    assert victim.read_bytes() == data
    log = tmp_path / "replog"
    assert cdp("log", "format", str(log), "--size", "4MiB", "--label", "drva-1").returncode == 0  # new: no force
    r = cdp("log", "format", str(log), "--size", "4MiB")
    assert r.returncode == 4 and "labelled 'drva-1'" in one_error_line(r)
    r = cdp("log", "format", str(victim), "--size", "4MiB", "--force", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["data_size"] > 0


# ---- 2. an empty path is not the current directory ----------------------------------


@pytest.mark.parametrize("args", [
    ["recover", "7", "--store", NO_STORE, "--latest", "--to"],
    ["mount", "7", "--store", NO_STORE, "--latest", "--nbd", "127.0.0.1:0", "--writable", "--overlay"],
    ["mount", "7", "--store", NO_STORE, "--latest", "--nbd", "127.0.0.1:0", "--rehydrate-to"],
    ["consolidate", "7", "--store", NO_STORE, "--scratch"],
    ["demo", "--dir"],
    ["log", "format", "--size", "4MiB"],
    ["points", "7", "--store", NO_STORE, "--metadata"],
], ids=["recover-to", "mount-overlay", "mount-rehydrate-to", "consolidate-scratch", "demo-dir", "log-format",
        "points-metadata"])
@pytest.mark.parametrize("blank", ["", "  "], ids=["empty", "blank"])
def test_an_empty_path_is_a_usage_error_and_nothing_is_written(tmp_path: Path, args: list[str], blank: str) -> None:
    r = cdp(*args, blank, cwd=tmp_path)
    assert r.returncode == 2 and "path" in one_error_line(r) and "Invalid value" in r.stderr, r
    assert list(tmp_path.iterdir()) == []


# ---- 3. the store key file ----------------------------------------------------------


def test_a_fifo_as_the_key_file_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "keys"
    os.mkfifo(fifo, 0o600)
    r = cdp("points", "7", "--store", f"file://{tmp_path / 'store'}", env={"CDP_STORE_KEY_FILE": str(fifo)})
    assert r.returncode == 2 and "not a regular file" in one_error_line(r)


def test_a_linked_key_file_is_followed_and_its_targets_mode_checked(tmp_path: Path) -> None:
    target = tmp_path / "keys.txt"
    target.write_text("00" * 32 + "\n")
    target.chmod(0o644)
    link = tmp_path / "keys"
    link.symlink_to(target)
    r = cdp("points", "7", "--store", f"file://{tmp_path / 'store'}", env={"CDP_STORE_KEY_FILE": str(link)})
    assert r.returncode == 2 and "chmod 600" in one_error_line(r)
    target.chmod(0o600)
    r = cdp("points", "7", "--store", f"file://{tmp_path / 'store'}", env={"CDP_STORE_KEY_FILE": str(link)})
    assert "store key file" not in one_error_line(r)  # read: the empty store is what fails now


# ---- 4. a DOMAIN that is not an id --------------------------------------------------


@pytest.mark.parametrize("domain", ["²", "٣", "4294967296", "99999999999", "id:", "id:x", "id:-1", "name:", ""])
@pytest.mark.parametrize("verb", ["points", "recover"])
def test_a_domain_argument_that_is_no_id_is_a_usage_error(verb: str, domain: str) -> None:
    extra = ["--latest", "--to", "/nonexistent-cdp-out"] if verb == "recover" else []
    r = cdp(verb, domain, "--store", NO_STORE, *extra)
    assert r.returncode == 2 and "Invalid value for 'DOMAIN'" in one_error_line(r), r


# ---- 5. a DOMAIN that names more than one domain -------------------------------------


async def _domain(store, domain_id: int, name: str) -> None:
    b = await DomainBuilder(store, domain=domain_id, name=name).start()
    b.write(0, 0, b"%d" % domain_id * 512)
    await b.seal()


async def _stores(root: Path) -> None:
    for sub, specs in (("dup", ((3, "erp"), (7, "erp"))), ("digit", ((3, "7"), (7, "erp")))):
        store = open_store(f"file://{root / sub}")
        try:
            for domain_id, name in specs:
                await _domain(store, domain_id, name)
        finally:
            await store.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    """``dup``: domains 3 and 7 both named 'erp'; ``digit``: domain 3 named '7', 7 named 'erp'."""
    root = tmp_path_factory.mktemp("stores")
    asyncio.run(_stores(root))
    return root


def points_domain(stores: Path, sub: str, domain: str) -> int:
    r = cdp("points", domain, "--store", f"file://{stores / sub}", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["domain"]["id"]


def test_a_name_of_two_domains_is_refused_listing_their_ids(stores: Path) -> None:
    for domain in ("erp", "name:erp"):
        r = cdp("points", domain, "--store", f"file://{stores / 'dup'}")
        assert r.returncode == 2 and "2 domains are named 'erp' (ids 3, 7)" in one_error_line(r)
        assert "id:N" in r.stderr
    assert points_domain(stores, "dup", "id:7") == 7 and points_domain(stores, "dup", "3") == 3


def test_a_number_is_an_id_and_name_reaches_a_numeric_name(stores: Path) -> None:
    """A store written before the cluster file refused numeric domain names may hold one:
    a bare number is still an id (no walk of the store), ``name:7`` reaches the other."""
    assert points_domain(stores, "digit", "7") == 7
    assert points_domain(stores, "digit", "id:7") == 7
    assert points_domain(stores, "digit", "name:7") == 3
    assert points_domain(stores, "digit", "erp") == 7
    assert points_domain(stores, "digit", "3") == 3


async def test_find_domain_refuses_a_name_two_domains_carry() -> None:
    store = MemoryStore()
    for domain_id, name in ((3, "erp"), (5, "crm"), (7, "erp")):
        await DomainBuilder(store, domain=domain_id, name=name).start()
    with pytest.raises(AmbiguousDomain, match=r"2 domains are named 'erp' \(ids 3, 7\)") as err:
        await find_domain(store, "erp")
    assert err.value.ids == (3, 7) and err.value.exit_code == 2
    found = await find_domain(store, "crm")
    assert found is not None and found[0] == 5
    assert await find_domain(store, "nosuch") is None
