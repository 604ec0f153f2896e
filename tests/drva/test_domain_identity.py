"""A domain's id and name as the DRVA's metadata repository records them (FORMAT.md §4,
§13.4, §13.6).

An administrator typed ``id = 11`` for domain 1 "erp" (same name, same disks) while 40
acked writes of it were still in the log: the DRVA took domain 1 for an unprotected one,
dropped its frames with a warning, and once the typo was fixed the store had none of the
40 writes. Now the repository records each served domain's id and name before the first
ack; a configuration that gives a recorded name another id, or a recorded id another
name, is refused (exit 2, naming both), and only a domain taken out of the configuration
altogether (``cdp unprotect``), or given up by an unprotect request, has its unshipped
frames dropped."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

import numpy as np
import pytest

from cdp.errors import ConfigError, MetaError
from cdp.frame import decode_frame
from cdp.meta import MetaRepository, read_metadata
from cdp.replog import ReplicationLog
from cdp.store.fs import FileStore
from drva import daemon as daemon_mod
from drva.config import DomainConfig
from drva.daemon import Drva
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from rocva import RecoverOptions, recover
from tests.drva.harness import SECRET, Disk, config, domain_doc, drva_doc, random_writes, running_drva, write_toml
from tests.drva.test_crash import wait_until_committed
from tests.waiting import EVENTUALLY_S, wait_until

DISK = 4 << 20
WRITES = 40
# Nothing is sealed while the writes are streamed: every acked frame stays in the log.
HOLD = {"seal_bytes": "64MiB", "seal_age_s": 3600.0, "log_size": "8MiB"}
SHIP = {"seal_bytes": "1MiB", "seal_age_s": 0.1, "log_size": "8MiB"}


def _doc(tmp, domains, **options):
    """DRVA drva-a serving ``domains`` ((id, name), ...), one disk each."""
    return drva_doc(tmp, "drva-a", [domain_doc(i, name, [(f"vm-{name}", "d0", DISK)]) for i, name in domains],
                    **{**HOLD, **options})


def _renamed(cfg, **names_by_id):
    """``cfg`` with its domains given other (id, name): ``{"1": (11, "erp")}``."""
    out = []
    for d in cfg.domains:
        new_id, new_name = names_by_id.get(str(d.id), (d.id, d.name))
        out.append(DomainConfig(new_id, new_name, d.disks, d.takeover, d.store_url))
    return dataclasses.replace(cfg, domains=tuple(out))


async def _stream_acked(drva: Drva, disk, domain: int, seed: int = 5) -> int:
    """WRITES writes of ``domain`` to ``disk``, streamed until all are acked; the last seq."""
    filt = DomainFilter(domain, [disk])
    client = FilterClient([filt], "127.0.0.1", drva.port, SECRET.encode(), "host-1")
    task = asyncio.create_task(client.run())
    try:
        await wait_until(lambda: client.connections >= 1, EVENTUALLY_S, "the filter connected")
        filt.capture(*random_writes(np.random.default_rng(seed), [DISK], WRITES, 16))
        await wait_until(lambda: filt.acked_seq == filt.next_seq - 1, EVENTUALLY_S, "every write acked")
        return filt.acked_seq
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _logged_seqs(path, domain: int) -> list[int]:
    with ReplicationLog.open(path, readonly=True) as lg:
        return [f.last_seq for f in (decode_frame(body, "test") for _, body in lg.entries()) if f.domain == domain]


async def _refused(cfg) -> ConfigError:
    with pytest.raises(ConfigError) as refused:
        await Drva(cfg, exit_on_task_failure=False).start()
    assert refused.value.exit_code == 2
    return refused.value


async def _erp_acked(tmp_path):
    """DRVA drva-a serving domain 1 "erp", stopped with WRITES acked writes in its log only."""
    cfg = config(_doc(tmp_path, [(1, "erp")]))
    disk = Disk(tmp_path / "erp.img", DISK)
    async with running_drva(cfg) as d:
        acked = await _stream_acked(d, disk, 1)
    assert acked == WRITES and _logged_seqs(cfg.log_path, 1)
    return cfg, disk


async def test_a_mistyped_id_is_refused_and_every_acked_write_reaches_the_store(tmp_path):
    cfg, disk = await _erp_acked(tmp_path)
    before = _logged_seqs(cfg.log_path, 1)
    refused = await _refused(_renamed(cfg, **{"1": (11, "erp")}))
    message = refused.message
    assert "'erp' is configured with id 11 but recorded as domain 1" in message
    assert f"seqs 1..{WRITES}" in message and str(cfg.meta_path) in message
    assert '{"domain": 1, "name": "erp"}' in message and "unprotect-1.json" in message
    assert _logged_seqs(cfg.log_path, 1) == before  # nothing dropped, nothing trimmed
    # The typo fixed: domain 1's writes ship, and a recovery of domain 1 has every one.
    fixed = config(_doc(tmp_path, [(1, "erp")], **SHIP))
    store = FileStore(tmp_path / "store")
    async with running_drva(fixed):
        await wait_until_committed(store, 1, WRITES)
    r = await recover(store, 1, RecoverOptions("latest", tmp_path / "out", checksum=True))
    assert r["seq"] == WRITES
    assert [image["sha256"] for image in r["images"]] == [disk.sha256()]


def test_the_refusal_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    asyncio.run(_erp_acked(tmp_path))
    doc = _doc(tmp_path, [(11, "erp")])
    monkeypatch.setenv("CDP_SITE_SECRET", SECRET)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with pytest.raises(SystemExit) as exited:
            daemon_mod.main(["--config", str(write_toml(doc, tmp_path / "drva-a.toml"))])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert exited.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("drva: error:")]
    assert len(lines) == 1 and "id 11" in lines[0] and "domain 1" in lines[0] and "'erp'" in lines[0]


async def test_a_recorded_id_given_another_name_is_refused(tmp_path):
    cfg, _ = await _erp_acked(tmp_path)
    message = (await _refused(_renamed(cfg, **{"1": (1, "crm")}))).message
    assert "domain 1 is configured as 'crm' but recorded as 'erp'" in message
    assert f"seqs 1..{WRITES}" in message
    # A swap of two domains' ids is refused too, naming both.
    both = config(_doc(tmp_path / "two", [(1, "erp"), (2, "crm")]))
    async with running_drva(both):
        pass
    message = (await _refused(_renamed(both, **{"1": (1, "crm"), "2": (2, "erp")}))).message
    assert "domain 1 is configured as 'crm' but recorded as 'erp'" in message
    assert "domain 2 is configured as 'erp' but recorded as 'crm'" in message


async def test_an_unprotect_request_gives_the_recorded_domain_up(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cfg, _ = await _erp_acked(tmp_path)
    typo = _renamed(cfg, **{"1": (11, "erp")})
    request = cfg.state_dir / "requests" / "unprotect-1.json"
    # A request naming the domain otherwise than it is recorded gives up nothing.
    request.write_text(json.dumps({"domain": 1, "name": "erp2"}))
    await _refused(typo)
    assert not request.exists()
    assert any(r.getMessage() == "request_refused" and "recorded as 'erp'" in r.fields["reason"]
               for r in caplog.records)
    request.write_text(json.dumps({"domain": 1, "name": "erp"}))
    async with running_drva(typo) as d:
        assert sorted(d.domains) == [11]
    dropped = [r for r in caplog.records if r.getMessage() == "unconfigured_domain_frames_dropped"]
    assert [(r.fields["domain"], r.fields["last_seq"]) for r in dropped] == [(1, WRITES)]
    assert "unprotect-1.json" in dropped[0].fields["reason"]
    assert read_metadata(cfg.meta_path)["domains"].keys() == {"11"}
    # Kept while the log holds domain 1's frames (nothing was trimmed yet): the next start
    # gives them up again rather than refuse.
    assert request.exists()
    async with running_drva(typo) as d:
        assert sorted(d.domains) == [11]


async def test_a_request_for_a_served_domain_gives_up_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cfg, _ = await _erp_acked(tmp_path)
    request = cfg.state_dir / "requests" / "unprotect-1.json"
    request.write_text(json.dumps({"domain": 1, "name": "erp"}))
    async with running_drva(cfg) as d:
        assert d.domains[1].durable_seq == WRITES and d.domains[1].unsealed[-1].last_seq == WRITES
    assert not request.exists()
    assert not any(r.getMessage() == "unconfigured_domain_frames_dropped" for r in caplog.records)


async def test_a_domain_taken_out_of_the_configuration_needs_an_unprotect_request(tmp_path, caplog):
    """A domain removed from a DRVA's configuration by hand (or moved to another DRVA)
    while its log holds its acked, unshipped frames: the DRVA refuses to start rather
    than drop them; with the request ``cdp unprotect`` writes, they are given up."""
    from drva.requests import write_unprotect_request

    caplog.set_level(logging.WARNING)
    cfg = config(_doc(tmp_path, [(1, "erp"), (3, "web")]))
    async with running_drva(cfg) as d:
        await _stream_acked(d, Disk(tmp_path / "web.img", DISK), 3)
    assert read_metadata(cfg.meta_path)["domains"]["3"]["name"] == "web"
    removed = dataclasses.replace(cfg, domains=tuple(x for x in cfg.domains if x.id == 1))
    message = (await _refused(removed)).message
    assert "holds acked, unshipped frames of domain 3" in message and "unprotect-3.json" in message
    assert not any(r.getMessage() == "unconfigured_domain_frames_dropped" for r in caplog.records)
    async with running_drva(cfg) as d:  # put back: they are still there, and ship
        assert d.domains[3].unsealed
    write_unprotect_request(cfg.state_dir, 3, "web")
    async with running_drva(removed):
        pass
    assert any(r.getMessage() == "unconfigured_domain_frames_dropped" and r.fields["domain"] == 3
               for r in caplog.records)
    assert read_metadata(cfg.meta_path)["domains"].keys() == {"1"}  # forgotten: "web" may come back as any id
    async with running_drva(_renamed(cfg, **{"3": (4, "web")})) as d:
        assert sorted(d.domains) == [1, 4]


async def test_an_old_document_without_names_still_loads_and_gets_them(tmp_path):
    """A repository written before names were recorded: read as it is, names added at start."""
    cfg = config(_doc(tmp_path, [(1, "erp")], **SHIP))
    cfg.meta_path.parent.mkdir(parents=True)
    MetaRepository.format(cfg.meta_path)
    old = {"drva": "drva-a", "domains": {"1": {"committed_seq": 0, "committed_ts": 0, "generation": 0,
                                               "timeline": 0},
                                         "9": {"committed_seq": 7, "committed_ts": 5, "generation": 2,
                                               "timeline": 1}}}
    with MetaRepository.open(cfg.meta_path) as meta:
        meta.write(old)
    async with running_drva(cfg) as d:
        assert d.domains[1].committed_seq == 0
        doc = read_metadata(cfg.meta_path)
        assert doc["domains"] == {"1": {**old["domains"]["1"], "name": "erp"}}
        await _stream_acked(d, Disk(tmp_path / "erp.img", DISK), 1)
        await wait_until_committed(FileStore(tmp_path / "store"), 1, WRITES)
        await wait_until(lambda: read_metadata(cfg.meta_path)["domains"]["1"]["committed_seq"] == WRITES,
                         EVENTUALLY_S, "the commit recorded")
    entry = read_metadata(cfg.meta_path)["domains"]["1"]
    assert entry["name"] == "erp" and entry["generation"] > 0  # a commit's document keeps the name


@pytest.mark.parametrize("name", [5, "", "../x", "a" * 65, None])
def test_a_recorded_name_that_is_not_a_name_is_refused(tmp_path, name):
    path = tmp_path / "meta"
    MetaRepository.format(path)
    with MetaRepository.open(path) as meta:
        meta.write({"drva": "d", "domains": {"1": {"committed_seq": 1, "name": name}}})
    with pytest.raises(MetaError, match=r"domains\.1\.name is"):
        MetaRepository.open(path)


def test_a_recorded_name_loads(tmp_path):
    path = tmp_path / "meta"
    MetaRepository.format(path)
    doc = {"drva": "d", "domains": {"1": {"committed_seq": 1, "name": "erp-db.01"}}}
    with MetaRepository.open(path) as meta:
        meta.write(doc)
    with MetaRepository.open(path) as meta:
        assert meta.read() == doc
