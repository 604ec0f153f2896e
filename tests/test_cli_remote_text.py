"""What ``cdp`` prints of a daemon's text: a fake daemon (aiohttp on 127.0.0.1 port 0)
answers the real ``cdp`` command (a subprocess) with terminal escape codes in every
string it can, and odd exit codes. Nothing reaches the terminal as a control
character, and the exit code is one a daemon may choose, or 1."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cdp import site_files
from cdp.testing.site import TOKEN, inventory_doc, site_doc

ROOT = Path(__file__).resolve().parents[1]
CLI_S = 60.0
ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x1b[32mhanded over OK\x1b[0m\r\x9b31m\x7f"
CONTROLS = {chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))} - {"\n"}
JOB_ID = "20261205-120000-failover-abcdef"


def _record(**changes: Any) -> dict[str, Any]:
    now = time.time_ns()
    record = {"version": 1, "id": JOB_ID, "name": "failover", "args": {"domain": f"erp{ESCAPES}"},
              "state": "failed", "timeout_s": 86400.0, "created_ns": now, "ended_ns": now, "pid": os.getpid(),
              "progress": {"phase": f"quiesce{ESCAPES}", "done": 0, "total": 1},
              "events": [{"ts_ns": now, "message": f"asked the peer{ESCAPES}"}],
              "output": {"note": ESCAPES}, "error": f"site a did not hand it over: {ESCAPES}", "exit_code": "seven"}
    record.update(changes)
    return record


def _status() -> dict[str, Any]:
    return {"site": f"site-t{ESCAPES}", "pid": 1, "api": "http://127.0.0.1", "store": f"file:///s{ESCAPES}",
            "drvas": [{"name": f"drva-1{ESCAPES}", "state": "up", "pid": 2, "restarts": 0, "domains": ["erp"]}],
            "domains": [], "vms": [], "alarms": [{"severity": "warning", "kind": "rpo", "subject": "erp",
                                                 "message": f"lag{ESCAPES}"}]}


@asynccontextmanager
async def fake_daemon(tmp_path: Path) -> AsyncIterator[Path]:
    """The fake daemon, and a site file whose ``[api] listen`` is where it listens."""
    async def job(request: web.Request) -> web.Response:
        return web.json_response(_record())

    async def jobs(request: web.Request) -> web.Response:
        return web.json_response({"jobs": [_record()]})

    async def mark(request: web.Request) -> web.Response:  # ?wait=1: the job's final record
        return web.json_response(_record(name="mark", exit_code=300))

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {"status": 409, "code": f"busy{ESCAPES}", "field": None,
                                            "message": f"refused{ESCAPES}", "exit_code": {"x": 1}}}, status=409)

    async def status(request: web.Request) -> web.Response:
        return web.json_response(_status())

    app = web.Application()
    app.router.add_get("/v1/jobs", jobs)
    app.router.add_get("/v1/jobs/{id}", job)
    app.router.add_post("/v1/domains/{name}/marks", mark)
    app.router.add_post("/v1/domains/{name}/unprotect", refuse)
    app.router.add_get("/v1/status", status)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    doc = site_doc(1, 2, port, log_size="8MiB", protect=("erp",), recovery_roots=[str(tmp_path)])
    try:
        yield site_files.write_site(tmp_path / "site", doc, inventory_doc(1, 2))
    finally:
        await runner.cleanup()


async def cdp(config: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cdp.cli", *args, "--config", str(config), cwd=ROOT,
        env={**os.environ, "CDP_API_TOKEN": TOKEN, "CDP_SITE_SECRET": "s" * 32},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), CLI_S)
    return proc.returncode, out.decode(), err.decode()


def assert_no_controls(*texts: str) -> None:
    for text in texts:
        assert not CONTROLS & set(text), repr(text)


@pytest.mark.parametrize("args", [("jobs", JOB_ID), ("jobs",), ("status",)], ids=["job", "jobs", "status"])
async def test_a_daemons_text_is_printed_without_control_characters(tmp_path, args):
    async with fake_daemon(tmp_path) as config:
        code, out, err = await cdp(config, *args)
    assert code == 0, err
    assert_no_controls(out, err)
    assert "\\u001b]0;pwned\\u0007" in out  # shown, escaped: the operator sees what was sent


async def test_a_followed_job_exits_with_a_code_a_daemon_may_choose(tmp_path):
    async with fake_daemon(tmp_path) as config:
        code, out, err = await cdp(config, "jobs", JOB_ID, "--follow")
    assert code == 1 and "Traceback" not in err, err  # its exit_code "seven" is none
    assert_no_controls(out, err)


async def test_a_failed_job_waited_for_is_one_escaped_line_and_exit_1(tmp_path):
    async with fake_daemon(tmp_path) as config:
        code, out, err = await cdp(config, "mark", "erp", "m1")
    assert code == 1 and "Traceback" not in err, err  # its exit_code 300 is none (300 & 255 = 44)
    assert err.startswith(f"cdp: error: job {JOB_ID} failed: site a did not hand it over: \\u001b]0;pwned")
    assert err.count("\n") == 1
    assert_no_controls(out, err)


async def test_a_refusal_is_one_escaped_line_and_exit_1(tmp_path):
    async with fake_daemon(tmp_path) as config:
        code, out, err = await cdp(config, "unprotect", "erp")
    assert code == 1 and "Traceback" not in err, err  # its exit_code {"x": 1} is none
    assert err.startswith("cdp: error: daemon: refused\\u001b]0;pwned") and err.count("\n") == 1
    assert_no_controls(out, err)
