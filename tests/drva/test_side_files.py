"""``status.json`` and ``requests/`` are side files: whatever is at their paths, the DRVA
serves on (FORMAT.md §13.4).

A directory at ``status.json``, a file or a dangling link at ``requests``, or a full file
system once ended the status or the requests task — and a real DRVA with it (exit 70), on
every restart. Now the error is logged (each distinct one once, the same one again at most
once a minute), retried on the next tick, and never followed: acks and shipping go on."""

from __future__ import annotations

import errno
import logging
import os

import numpy as np
import pytest

from drva import status as status_mod
from drva.requests import requests_dir
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import Disk, config, running_drva, stream_committed, two_domains
from tests.waiting import EVENTUALLY_S, wait_until

DISK = 4 << 20


def _events(caplog, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == event]


async def _ships(drva, tmp) -> None:
    """The data path works: writes of both domains are acked and committed."""
    filters = [DomainFilter(i, [Disk(tmp / f"dom{i}.img", DISK)]) for i in (1, 2)]
    await stream_committed(drva, filters, np.random.default_rng(7), 20, 16)


async def test_a_directory_at_status_json_is_reported_and_left_alone(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cfg = config(two_domains(tmp_path, "drva-s", size=DISK))
    cfg.status_path.mkdir(parents=True)
    async with running_drva(cfg) as d:  # fails the test if a task ended (exit 70)
        await _ships(d, tmp_path)
        assert await d.write_status() is False
        assert await d.write_status() is False
        assert cfg.status_path.is_dir()
        reported = _events(caplog, "status_unwritable")
        assert len(reported) == 1  # the same error, however often it recurs: once a minute
        assert reported[0].fields["path"] == str(cfg.status_path)
        assert "directory" in reported[0].fields["error"]


async def test_a_symlink_at_status_json_is_not_followed_nor_replaced(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cfg = config(two_domains(tmp_path, "drva-s", size=DISK))
    cfg.state_dir.mkdir(parents=True)
    target = tmp_path / "elsewhere.json"
    target.write_text("theirs")
    cfg.status_path.symlink_to(target)
    async with running_drva(cfg) as d:
        assert await d.write_status() is False
    assert cfg.status_path.is_symlink() and target.read_text() == "theirs"
    assert "symbolic link" in _events(caplog, "status_unwritable")[0].fields["error"]


async def test_a_full_file_system_does_not_stop_acks_or_shipping(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    cfg = config(two_domains(tmp_path, "drva-s", size=DISK))
    real_atomic_write = status_mod.atomic_write

    def full(path, data, **kwargs):  # the state file system only: the log and repository live elsewhere
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    async with running_drva(cfg) as d:
        monkeypatch.setattr(status_mod, "atomic_write", full)
        assert await d.write_status() is False
        await _ships(d, tmp_path)
        assert await d.write_status() is False
        assert len(_events(caplog, "status_unwritable")) == 1
        assert "ENOSPC" in _events(caplog, "status_unwritable")[0].fields["error"]
        monkeypatch.setattr(status_mod, "atomic_write", real_atomic_write)
        assert await d.write_status() is True
        assert len(_events(caplog, "status_unwritable_cleared")) == 1
        assert cfg.status_path.is_file()


@pytest.mark.parametrize("kind", ["file", "dangling symlink"])
async def test_something_else_at_requests_is_reported_and_the_box_serves_once_it_is_gone(
        tmp_path, caplog, kind):
    caplog.set_level(logging.INFO)
    cfg = config(two_domains(tmp_path, "drva-s", size=DISK))
    cfg.state_dir.mkdir(parents=True)
    root = requests_dir(cfg.state_dir)
    if kind == "file":
        root.write_text("not a directory")
    else:
        root.symlink_to(tmp_path / "nowhere")
    async with running_drva(cfg) as d:

        def reported() -> bool:
            if d.failure is not None:
                raise AssertionError(f"a DRVA task failed: {d.failure!r}")
            return bool(_events(caplog, "requests_unusable"))

        await wait_until(reported, EVENTUALLY_S, "requests_unusable logged by the requests task")
        assert os.path.lexists(root) and not root.is_dir()  # left alone
        assert not (tmp_path / "nowhere").exists()  # never followed
        await _ships(d, tmp_path)
        root.unlink()
        await wait_until(root.is_dir, EVENTUALLY_S, "the requests directory made again")
        bad = root / "mark-1-00000000.json"
        bad.write_text("not json")
        await wait_until(lambda: not bad.exists(), EVENTUALLY_S, "a malformed request dropped")
        assert len(_events(caplog, "requests_unusable")) == 1
        assert len(_events(caplog, "requests_unusable_cleared")) == 1


def test_a_side_file_error_is_logged_once_per_error_and_at_most_once_a_minute(caplog, tmp_path):
    from drva.status import SIDE_FILE_REPORT_INTERVAL_S, SideFileReport

    caplog.set_level(logging.INFO)
    now = [1000.0]
    report = SideFileReport("status_unwritable", clock=lambda: now[0])
    path = tmp_path / "status.json"
    for _ in range(5):
        report.failed(path, "ENOSPC: No space left on device")
    assert len(_events(caplog, "status_unwritable")) == 1
    now[0] += SIDE_FILE_REPORT_INTERVAL_S
    report.failed(path, "ENOSPC: No space left on device")
    report.failed(path, "EIO: Input/output error")  # another error: logged at once
    logged = _events(caplog, "status_unwritable")
    assert [r.fields["failures"] for r in logged] == [1, 6, 7]
    report.succeeded(path)
    report.succeeded(path)
    assert len(_events(caplog, "status_unwritable_cleared")) == 1
