"""Whose log partition is it? A DRVA adopts only its own (FORMAT.md §3.2, §13.4).

A log path that names another DRVA's partition (a LUN remapped, a configuration or a link
pointing at the wrong device) once made the DRVA call that DRVA's acked, unshipped frames
"unconfigured domain frames" and trim them away. Now the superblock label is read as
install reads it: another DRVA's or another site's label is refused at start, before
anything is appended or trimmed; an empty label is accepted, but then no frame of a
domain this DRVA does not serve is dropped. A device error at start is one line and an
exit code, not a traceback."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging

import numpy as np
import pytest

from cdp.errors import ConfigError
from cdp.frame import decode_frame
from cdp.replog import ReplicationLog
from drva import daemon as daemon_mod
from drva.daemon import Drva
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import (
    SECRET,
    Disk,
    config,
    domain_doc,
    drva_doc,
    random_writes,
    running_drva,
    write_toml,
)
from tests.waiting import EVENTUALLY_S, wait_until

DISK = 4 << 20
WRITES = 20
LOG_SIZE = 8 << 20
# Nothing is sealed while the test runs: every acked frame stays in the log, unshipped.
HOLD = {"seal_bytes": "64MiB", "seal_age_s": 3600.0, "log_size": "8MiB"}


def _doc(tmp, name, domains, **extra):
    return drva_doc(tmp, name, [domain_doc(i, f"d{i}", [(f"vm{i}", "d0", DISK)]) for i in domains],
                    **{**HOLD, **extra})


async def _stream_acked(drva: Drva, tmp, domain: int) -> int:
    """WRITES writes of ``domain`` streamed to ``drva`` until all are acked; the last seq."""
    filt = DomainFilter(domain, [Disk(tmp / f"dom{domain}.img", DISK)])
    client = FilterClient([filt], "127.0.0.1", drva.port, SECRET.encode(), "host-1")
    task = asyncio.create_task(client.run())
    try:
        await wait_until(lambda: client.connections >= 1, EVENTUALLY_S, "the filter connected")
        filt.capture(*random_writes(np.random.default_rng(domain), [DISK], WRITES, 16))
        await wait_until(lambda: filt.acked_seq == filt.next_seq - 1, EVENTUALLY_S, "every write acked")
        return filt.acked_seq
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _frames_of(path, domain: int) -> list[int]:
    """The last seqs of ``domain``'s frames in the log at ``path``."""
    with ReplicationLog.open(path, readonly=True) as lg:
        frames = [decode_frame(body, "test") for _, body in lg.entries()]
    return [f.last_seq for f in frames if f.domain == domain]


async def _acked_log_of_b(tmp) -> tuple:
    """DRVA drva-b (domain 3) with WRITES acked, unshipped frames in its log; stopped."""
    cfg_b = config(_doc(tmp, "drva-b", [3], site="site-a"))
    async with running_drva(cfg_b) as b:
        acked = await _stream_acked(b, tmp, 3)
    assert len(_frames_of(cfg_b.log_path, 3)) > 0
    return cfg_b, acked


async def test_another_drvas_log_is_refused_and_its_acked_frames_kept(tmp_path):
    cfg_b, acked = await _acked_log_of_b(tmp_path)
    frames_before = _frames_of(cfg_b.log_path, 3)
    # drva-a's log.path names drva-b's partition.
    doc_a = _doc(tmp_path, "drva-a", [1, 2], site="site-a")
    doc_a["log"]["path"] = str(cfg_b.log_path)
    with pytest.raises(ConfigError) as refused:
        await Drva(config(doc_a), exit_on_task_failure=False).start()
    message = refused.value.message
    assert str(cfg_b.log_path) in message and "labelled 'drva-b'" in message
    assert "'drva-a'" in message and "'site-a'" in message
    assert refused.value.exit_code == 2
    # Nothing of drva-b's was touched: its frames are there, and drva-b serves them on.
    assert _frames_of(cfg_b.log_path, 3) == frames_before
    async with running_drva(cfg_b) as b:
        assert b.domains[3].durable_seq == acked
        assert b.domains[3].unsealed[-1].last_seq == acked


@pytest.mark.parametrize("label", ["drva-a@site-b", "drva-b", "drva-b@site-a", "torture"])
async def test_a_label_naming_another_drva_or_site_is_refused(tmp_path, label):
    cfg = config(_doc(tmp_path, "drva-a", [1], site="site-a"))
    cfg.log_path.parent.mkdir(parents=True)
    ReplicationLog.format(cfg.log_path, LOG_SIZE, label=label)
    before = cfg.log_path.read_bytes()
    with pytest.raises(ConfigError, match=f"labelled {label!r}"):
        await Drva(cfg, exit_on_task_failure=False).start()
    # Refused before anything was written: not even the epoch was bumped.
    assert cfg.log_path.read_bytes() == before
    with ReplicationLog.open(cfg.log_path, readonly=True) as lg:
        assert lg.label == label


@pytest.mark.parametrize("label", ["drva-a@site-a", "drva-a", ""])
async def test_own_legacy_and_empty_labels_are_served(tmp_path, label):
    cfg = config(_doc(tmp_path, "drva-a", [1], site="site-a"))
    cfg.log_path.parent.mkdir(parents=True)
    ReplicationLog.format(cfg.log_path, LOG_SIZE, label=label)
    async with running_drva(cfg) as d:
        acked = await _stream_acked(d, tmp_path, 1)
        assert d.domains[1].durable_seq == acked


async def test_an_unlabelled_log_with_frames_of_an_unserved_domain_is_not_trimmed(tmp_path):
    """A log that names no one may be another DRVA's: its frames of a domain this DRVA
    does not serve are kept, and the DRVA says so instead of starting."""
    cfg_b = config(_doc(tmp_path, "drva-b", [3], site="site-a"))
    cfg_b.log_path.parent.mkdir(parents=True)
    ReplicationLog.format(cfg_b.log_path, LOG_SIZE, label="")
    async with running_drva(cfg_b) as b:
        acked = await _stream_acked(b, tmp_path, 3)
    frames_before = _frames_of(cfg_b.log_path, 3)
    doc_a = _doc(tmp_path, "drva-a", [1], site="site-a")
    doc_a["log"]["path"] = str(cfg_b.log_path)
    with pytest.raises(ConfigError) as refused:
        await Drva(config(doc_a), exit_on_task_failure=False).start()
    assert str(cfg_b.log_path) in refused.value.message
    assert f"domain 3 (seqs 1..{acked}" in refused.value.message
    assert _frames_of(cfg_b.log_path, 3) == frames_before


async def test_an_own_log_still_drops_frames_of_an_unprotected_domain(tmp_path, caplog):
    """Labelled as this DRVA's: a domain missing from its configuration, with the unprotect
    request ``cdp unprotect`` writes, was unprotected (without one: test_domain_identity)."""
    from drva.requests import write_unprotect_request

    caplog.set_level(logging.WARNING)
    cfg = config(_doc(tmp_path, "drva-a", [1, 3], site="site-a"))
    async with running_drva(cfg) as d:
        await _stream_acked(d, tmp_path, 3)
    unprotected = dataclasses.replace(cfg, domains=tuple(x for x in cfg.domains if x.id == 1))
    write_unprotect_request(cfg.state_dir, 3, next(x.name for x in cfg.domains if x.id == 3))
    async with running_drva(unprotected):
        pass
    assert any(r.getMessage() == "unconfigured_domain_frames_dropped" and r.fields["domain"] == 3
               for r in caplog.records)


def test_a_device_error_in_the_recovery_scan_is_one_line_and_exit_4(tmp_path, monkeypatch, capsys):
    """EIO reading the log at start: ``drva: error: ...`` naming the partition, exit 4."""
    doc = _doc(tmp_path, "drva-a", [1], site="site-a")
    cfg = config(doc)
    cfg.log_path.parent.mkdir(parents=True)
    ReplicationLog.format(cfg.log_path, LOG_SIZE, label="drva-a@site-a")

    def unreadable(self, start=None):
        raise OSError(errno.EIO, "Input/output error")
        yield  # a generator, as entries() is

    monkeypatch.setattr(ReplicationLog, "entries", unreadable)
    monkeypatch.setenv("CDP_SITE_SECRET", SECRET)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with pytest.raises(SystemExit) as exited:
            daemon_mod.main(["--config", str(write_toml(doc, tmp_path / "drva-a.toml"))])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert exited.value.code == 4
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("drva: error:")]
    assert len(lines) == 1 and str(cfg.log_path) in lines[0] and "EIO" in lines[0]
