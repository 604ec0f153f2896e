"""The MSA's state directory on a small real file system (tmpfs) that fills up (ENOSPC)
or turns read-only (EROFS) under a running daemon.

1. A DRVA whose configuration cannot be rewritten keeps serving, and is reconfigured
   once the disk has room; a DRVA stopped while it serves protected domains is alarmed.
2. A job whose final record cannot be written ends all the same for whoever asks (the
   API, ``?wait=1``, ``cdp jobs --follow``) and is written once the disk has room; a
   follower never waits for ever on a record that cannot change.
3. A progress write that fails does not fail the job, and is not blamed on the recovery's
   destination.
4. A request that meets a full or read-only state directory is answered 507 or 503,
   naming the place and the cause (never ``internal error (OSError)``).
5. ``state_dir_unwritable`` is raised while the state directory takes no write, and
   ``drva_down`` of a DRVA that cannot rewrite its status there says so.

Where the timing must be forced (the disk fills at one exact write), a wrapper fills the
file system just before that write: the ENOSPC the write then meets is the kernel's.
Every file system mounted here is unmounted in a ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from cdp.errors import CdpError
from cdp.msa.alarms import AlarmEvaluator
from cdp.msa.config import Alarms
from cdp.msa.supervisor import DrvaView
from cdp.store.fs import FileStore
from cdp.testing.site import TOKEN, Site, make_site, running_daemon
from tests.rocva.build import erp_history
from tests.waiting import EVENTUALLY_S, wait_until

KiB = 1 << 10
REPO = Path(__file__).resolve().parents[2]  # `python -m cdp.cli` runs this checkout's code
FILLER = "zz-filler"
SERVE_S = 20.0  # a DRVA coming up, a retry after a back-off: well under this


# ---------------------------------------------------------------------- a small file system


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "24m") -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path`` (0755: the state directory must be ours alone),
    unmounted (lazily if something still holds it) whatever happens."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(fs: Path) -> None:
    """Fill the file system of ``fs`` to ENOSPC: all its free space at once, then what
    is left, page by page and byte by byte (appended: each write needs a new block)."""
    st = os.statvfs(fs)
    fd = os.open(fs / FILLER, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for length in (st.f_bavail * st.f_frsize, st.f_bavail * st.f_frsize - (256 << 10)):
            if length > 0:
                with contextlib.suppress(OSError):
                    os.posix_fallocate(fd, os.fstat(fd).st_size, length)
                    break
        for piece in (b"\0" * 4096, b"\0"):
            for _ in range(1 << 16):
                try:
                    os.write(fd, piece)
                except OSError:
                    break
    finally:
        os.close(fd)
    with pytest.raises(OSError) as got:
        (fs / "zz-probe").write_bytes(b"x" * 8192)
    assert got.value.errno == errno.ENOSPC


def free(fs: Path) -> None:
    for name in (FILLER, "zz-probe"):
        (fs / name).unlink(missing_ok=True)


@contextlib.contextmanager
def read_only(fs: Path) -> Iterator[None]:
    """``fs`` read-only from now on, for every new open — as after an ext4 error's
    remount: a read-only bind mount over it (a file system with open writers, the daemon's
    lock file, cannot be remounted read-only itself). Unmounted whatever happens."""
    subprocess.run(["mount", "--bind", str(fs), str(fs)], check=True, capture_output=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(fs)], check=True, capture_output=True)
        yield
    finally:
        if subprocess.run(["umount", str(fs)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(fs)], capture_output=True)


def state_on_tmpfs(root: Path) -> Path:
    """Where ``make_site(root)`` puts the state directory."""
    return root / "state"


async def call(site: Site, http: aiohttp.ClientSession, method: str, path: str,
               body: Any = None) -> tuple[int, Any]:
    async with http.request(method, f"{site.api}{path}", headers=site.headers, json=body) as resp:
        return resp.status, await resp.json()


# ---------------------------------------------------------------------- 1. configurations


async def test_a_config_that_cannot_be_written_leaves_the_drva_serving_and_is_retried(tmp_path, monkeypatch):
    root = tmp_path / "site"
    with tmpfs(state_on_tmpfs(root)) as state:
        site = make_site(root, protect=("erp", "web"), log_size="4MiB")
        async with running_daemon(site) as daemon:
            sup = daemon.supervisor
            await wait_until(lambda: (v := sup.view("drva-1")) is not None and v.state == "up", SERVE_S,
                             "drva-1 up")
            first = sup.pid("drva-1")
            armed = [True]
            write_config = sup._write_config

            def full_at_the_write(kept: Any) -> None:
                if armed[0]:
                    armed[0] = False
                    fill(state)
                write_config(kept)

            monkeypatch.setattr(sup, "_write_config", full_at_the_write)
            try:
                # Unprotected (protection.json written before the disk filled): the
                # answer says so, and that the DRVA's configuration waits for room.
                got = await daemon.unprotect("web")
                assert got["protected"] is False and "web" not in daemon.protection, got
                text = got["drva_config_pending"]
                assert "drva-1.toml" in text and "No space left on device" in text, text
                with pytest.raises(CdpError, match="not protected"):  # a retry: already done
                    await daemon.unprotect("web")
                # The old DRVA serves on (erp with it): it was not stopped for a file that could not be written.
                view = sup.view("drva-1")
                assert view.state == "up" and view.pid == first, view
                assert view.config_problem and "No space left on device" in view.config_problem
            finally:
                free(state)
            # Room again: the configuration is written and the DRVA restarted on it, unasked.
            await wait_until(lambda: (v := sup.view("drva-1")).state == "up" and v.pid != first, SERVE_S,
                             "drva-1 restarted on its new configuration")
            assert sup.view("drva-1").config_problem is None
            assert [d["name"] for d in sup.drvas["drva-1"].status["domains"]] == ["erp"]

            # A restart for a domain (a failback's reopen) meets a full disk: no stop either.
            second = sup.pid("drva-1")
            armed[0] = True
            try:
                with pytest.raises((CdpError, OSError)):
                    await daemon.supervisor.restart_serving("erp")
                assert sup.view("drva-1").state == "up" and sup.pid("drva-1") == second
            finally:
                free(state)
            await wait_until(lambda: (v := sup.view("drva-1")).state == "up" and v.pid != second, SERVE_S,
                             "drva-1 restarted once its configuration was written")


def test_a_stopped_drva_that_serves_protected_domains_is_down():
    ev = AlarmEvaluator(Alarms(log_usage_pct=90, backpressure_s=300))
    stopped = DrvaView("drva-1", "127.0.0.1:1", ("erp",), "stopped", 5.0, None, 0, None, None, None, None, None)
    raised, _ = ev.evaluate(1_000_000_000, [stopped], {})
    assert [(a.kind, a.subject, a.severity) for a in raised] == [("drva_down", "drva-1", "critical")]
    assert "stopped though it serves protected domains erp" in raised[0].message


# ---------------------------------------------------------------------- 2. final records


async def test_a_final_record_the_disk_cannot_take_is_served_then_written(tmp_path, monkeypatch):
    from cdp.msa import preflight

    root = tmp_path / "site"
    with tmpfs(state_on_tmpfs(root)) as state:
        site = make_site(root, protect=())

        async def full_by_the_end(cfg: Any, env: Any = None) -> dict[str, Any]:
            fill(state)  # the job's work is done; its final record meets a full disk
            return {"checked": True}

        monkeypatch.setattr(preflight, "preflight_system", full_by_the_end)
        async with running_daemon(site) as daemon, aiohttp.ClientSession() as http:
            try:
                status, record = await call(site, http, "POST", "/v1/preflight/system?wait=1")
                assert status == 200 and record["state"] == "succeeded", record
                assert record["output"] == {"checked": True} and record["ended_ns"], record
                job_id = record["id"]
                on_disk = json.loads((state / "jobs" / f"{job_id}.json").read_text())
                assert on_disk["state"] == "running"  # the disk did not take the end...
                status, got = await call(site, http, "GET", f"/v1/jobs/{job_id}")
                assert status == 200 and got["state"] == "succeeded"  # ...the daemon says it all the same
                status, listed = await call(site, http, "GET", "/v1/jobs")
                assert [j["state"] for j in listed["jobs"] if j["id"] == job_id] == ["succeeded"]
                # cdp jobs --follow ends on the daemon's answer (it read the file, and followed for ever).
                cli = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "cdp.cli", "jobs", job_id, "--follow", "--json", "--config",
                    str(site.config_path), env={**site.env, "CDP_API_TOKEN": TOKEN}, cwd=REPO,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                try:
                    out, err = await asyncio.wait_for(cli.communicate(), 25)
                except TimeoutError:
                    cli.kill()
                    await cli.wait()
                    raise AssertionError("cdp jobs --follow did not end on a job that ended") from None
                assert cli.returncode == 0, err.decode()
                assert json.loads(out)["state"] == "succeeded"
            finally:
                free(state)
            # Room again: the record is written in the background.
            await wait_until(lambda: json.loads((state / "jobs" / f"{job_id}.json").read_text())["state"]
                             == "succeeded", SERVE_S, "the final record written once the disk has room")
            assert not daemon.jobs.unsaved


def test_follow_gives_up_on_a_record_that_cannot_change(monkeypatch):
    from cdp.cli import msa_verbs

    monkeypatch.setattr(msa_verbs, "FOLLOW_POLL_S", 0.01)
    monkeypatch.setattr(msa_verbs, "FOLLOW_GRACE_S", 0.05, raising=False)
    reads = [0]

    def get(job_id: str) -> dict[str, Any]:
        reads[0] += 1
        if reads[0] > 500:
            raise AssertionError("cdp jobs --follow never gave up on a record that cannot change")
        return {"id": job_id, "state": "running", "timeout_s": 0.0, "progress": {}}

    with pytest.raises(CdpError) as got:
        msa_verbs._follow(get, "20260101-000000-mark-abcdef", as_json=True)
    assert "still says running" in got.value.message and "timeout" in got.value.message


# ---------------------------------------------------------------------- 3. progress writes


async def test_a_failed_progress_write_neither_fails_the_job_nor_blames_the_destination(tmp_path, monkeypatch):
    from cdp.msa import jobs

    root = tmp_path / "site"
    roots = tmp_path / "roots"
    roots.mkdir()
    with tmpfs(state_on_tmpfs(root)) as state:
        site = make_site(root, protect=(), recovery_roots=[str(roots)])
        rng = np.random.default_rng(7)
        await erp_history(FileStore(site.root / "store"), site.cfg.domain("erp").id, rng, 60, 256 * KiB)
        progress = jobs.Job.progress
        met = []

        def full_at_the_first_write(job: Any, *args: Any) -> None:
            if job.record["name"] == "recover" and not met:
                met.append(job.id)
                job._last_write = 0.0  # this call writes the record
                fill(state)
                try:
                    return progress(job, *args)
                finally:
                    free(state)
            return progress(job, *args)

        monkeypatch.setattr(jobs.Job, "progress", full_at_the_first_write)
        async with running_daemon(site), aiohttp.ClientSession() as http:
            out = roots / "r1"
            status, record = await call(site, http, "POST", "/v1/domains/erp/recover?wait=1",
                                        {"target": "latest", "to": str(out)})
        assert met, "the recovery wrote no progress"
        assert status == 200 and record["state"] == "succeeded", record  # was: "to: cannot write the images there"
        assert sorted(p.name for p in out.iterdir()) == ["erp-db-data.img", "erp-db-log.img"]


def test_only_errors_on_the_destinations_paths_are_the_destinations(tmp_path):
    from cdp.msa.operations import on_destination

    to = tmp_path / "roots" / "out"
    full = errno.ENOSPC, "No space left on device"
    assert not on_destination(OSError(*full, str(tmp_path / "state" / "jobs" / "x.json")), to)
    assert not on_destination(OSError(*full), to)  # names nothing: not blamed on the client's directory
    assert on_destination(OSError(*full, str(to / "erp-db-data.img.partial")), to)
    assert on_destination(OSError(*full, "erp-db-data.img.partial"), to)  # relative to the open destination


# ---------------------------------------------------------------------- 4. answers


async def test_a_full_or_read_only_state_dir_is_answered_507_or_503_naming_it(tmp_path):
    root = tmp_path / "site"
    with tmpfs(state_on_tmpfs(root)) as state:
        site = make_site(root, protect=())
        async with running_daemon(site), aiohttp.ClientSession() as http:
            try:
                fill(state)
                status, doc = await call(site, http, "POST", "/v1/domains/erp/power", {"on": False})
                err = doc["error"]
                assert status == 507 and err["code"] == "insufficient_storage", doc  # was 500 internal (OSError)
                assert "<state_dir>" in err["message"] and "No space left on device" in err["message"], err
                assert str(state) not in err["message"] and err["exit_code"] == 1
                status, doc = await call(site, http, "POST", "/v1/preflight/system")
                assert status == 507 and "cannot write a record" in doc["error"]["message"], doc
                free(state)
                with read_only(state):
                    status, doc = await call(site, http, "POST", "/v1/domains/erp/power", {"on": False})
                err = doc["error"]
                assert status == 503 and err["code"] == "storage_unavailable", doc
                assert "<state_dir>" in err["message"] and "Read-only file system" in err["message"], err
            finally:
                free(state)
            status, doc = await call(site, http, "POST", "/v1/domains/erp/power", {"on": False})
            assert status == 200, doc


# ---------------------------------------------------------------------- 5. alarms


async def test_state_dir_unwritable_is_raised_and_cleared_and_drva_down_says_why(tmp_path):
    root = tmp_path / "site"
    with tmpfs(state_on_tmpfs(root)) as state:
        site = make_site(root, protect=("erp",), log_size="4MiB")
        async with running_daemon(site, alarm_options={"stale_s": 1.0}) as daemon:
            await wait_until(lambda: (v := daemon.supervisor.view("drva-1")) is not None and v.state == "up",
                             SERVE_S, "drva-1 up")

            def active(kind: str) -> list[Any]:
                return [a for a in daemon.alarms.active_alarms() if a.kind == kind]

            try:
                fill(state)
                await wait_until(lambda: active("state_dir_unwritable"), SERVE_S, "state_dir_unwritable")
                alarm = active("state_dir_unwritable")[0]
                assert alarm.severity == "critical" and alarm.subject == "state_dir", alarm
                assert str(state) in alarm.message and "bytes free" in alarm.message, alarm
                # The DRVA cannot rewrite its status.json there: its drva_down says so, not "hung?".
                await wait_until(lambda: active("drva_down"), EVENTUALLY_S, "drva_down of a stale status")
                assert "state directory" in active("drva_down")[0].message and "hung" not in \
                    active("drva_down")[0].message
            finally:
                free(state)
            await wait_until(lambda: not active("state_dir_unwritable") and not active("drva_down"), SERVE_S,
                             "both alarms cleared once the disk has room")
            with read_only(state):
                await wait_until(lambda: active("state_dir_unwritable"), SERVE_S, "state_dir_unwritable (read-only)")
                assert "read-only" in active("state_dir_unwritable")[0].message
            await wait_until(lambda: not active("state_dir_unwritable"), SERVE_S, "cleared once writable")


def test_a_write_that_failed_counts_until_a_write_succeeds(tmp_path):
    from cdp.msa.state_fs import StateFsWatch

    w = StateFsWatch(tmp_path)
    assert w.check(force=True) is None
    assert not w.failed(tmp_path / "x", OSError(errno.EACCES, "Permission denied"))  # a file's problem, not the fs's
    assert w.failed(tmp_path / "jobs" / "a.json", OSError(errno.EIO, "Input/output error"))
    assert "jobs/a.json: Input/output error" in w.problem
    assert w.check(force=True) is None  # the probe wrote: the file system takes writes again
    assert not (tmp_path / ".write-probe").exists()
