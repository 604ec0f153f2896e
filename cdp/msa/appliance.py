"""Running the recovery appliance for a job of the MSA: ``python -m rocva COMMAND`` as a
child process (a failover's rehydration and fork, a failback's delta), its progress
relayed into the job, its result or its error returned (FORMAT.md §14.5).

The child speaks JSON lines on stdout (``{"progress": [done, total]}``, then one
``{"result": ...}`` or ``{"error": ..., "exit_code": N}``); lines that are not JSON
objects are a library's printing and skipped. Its stderr is kept only for its last
64 KiB, for the message when it ends without a result. It gets the site's child
environment (no API token unless asked: a failback reads the peer's disks through its
API), and dies with the job: a cancelled job kills it, and its stdin, held open, ties
its life to this process (``--exit-with-stdin``).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Mapping
from typing import Any

from cdp.errors import CdpError
from cdp.logs import get_logger
from cdp.msa.jobs import Job
from cdp.msa.keeper import CODE_ROOT

log = get_logger("cdp.msa.appliance")

ROCVA_LINE_BYTES_MAX = 1 << 20  # a result line with every image's path is far below this
ROCVA_STDERR_BYTES_MAX = 64 << 10


async def run_appliance(cfg: Any, args: list[str], job: Job, env: Mapping[str, str], phase: str, *,
                        peer_token: bool = False) -> dict[str, Any]:
    """Run ``python -m rocva ARGS --config SITE`` and relay its progress as ``phase``; its
    result, or its error (with its exit code) as a ``CdpError`` (FORMAT.md §14.5).
    ``peer_token``: the appliance keeps the peer's API token (a failback reads the peer's
    disks through its API); children get no token otherwise."""
    child_env = cfg.child_env(env)
    if peer_token and cfg.peer is not None and cfg.peer.token_env in env:
        child_env[cfg.peer.token_env] = env[cfg.peer.token_env]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rocva", "--exit-with-stdin", *args[:1], "--config", str(cfg.path), *args[1:],
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=child_env, cwd=CODE_ROOT, limit=ROCVA_LINE_BYTES_MAX)
    log.info("rocva_started", command=args[0], pid=proc.pid, args=args[1:])
    stderr_task = asyncio.create_task(_tail(proc.stderr, ROCVA_STDERR_BYTES_MAX))
    outcome: dict[str, Any] | None = None
    try:
        assert proc.stdout is not None
        async for line in proc.stdout:
            try:
                doc = json.loads(line)
            except ValueError:
                continue  # not ours (a library printing): the protocol lines are JSON
            if not isinstance(doc, dict):
                continue
            if "progress" in doc and isinstance(doc["progress"], list) and len(doc["progress"]) == 2:
                done, total = doc["progress"]
                if isinstance(done, int) and isinstance(total, int):
                    job.progress(phase, done, total)
            elif "result" in doc or "error" in doc:
                outcome = doc
        code = await proc.wait()
    except BaseException:
        if proc.returncode is None:  # the job was cancelled: the appliance goes with it
            proc.kill()
            await proc.wait()
        raise
    finally:
        stderr = await stderr_task
        if proc.stdin is not None:  # held open only to tie the appliance's life to this process
            proc.stdin.close()
    log.info("rocva_exited", command=args[0], pid=proc.pid, exit=code)
    if outcome is not None and "result" in outcome and code == 0 and isinstance(outcome["result"], dict):
        return outcome["result"]
    if outcome is not None and isinstance(outcome.get("error"), str):
        err = CdpError(outcome["error"])
        exit_code = outcome.get("exit_code")
        err.exit_code = exit_code if isinstance(exit_code, int) and 1 <= exit_code <= 125 else 1
        raise err
    last = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
    raise CdpError(f"the recovery appliance (rocva) exited with code {code} and no result: {last[0][:400]}")


async def _tail(stream: asyncio.StreamReader | None, limit: int) -> bytes:
    """Read ``stream`` to its end, keeping only its last ``limit`` bytes."""
    kept = b""
    if stream is None:
        return kept
    while chunk := await stream.read(65536):
        kept = (kept + chunk)[-limit:]
    return kept
