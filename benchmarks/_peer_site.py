"""The recovery site's extents route on its own, for ``benchmarks.failback``: a process
serving the disks of site B at the target point as ``cdp.msa.extents.serve_files``
answers (the MSA's ``POST /v1/failback/{name}/extents`` without the rest of the MSA).

    python -m benchmarks._peer_site '{"domain": 1, "seq": 99, "files": {"0": ["b.img", 1073741824]}}'

The bearer token comes from ``CDP_BENCH_PEER_TOKEN``. Prints ``PORT <n>`` once it listens
on 127.0.0.1, then serves until stdin closes (its parent is gone).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from aiohttp import web

from cdp.msa.extents import serve_files

TOKEN_ENV = "CDP_BENCH_PEER_TOKEN"


async def serve(doc: dict) -> None:
    files = {int(k): (Path(v[0]), int(v[1])) for k, v in doc["files"].items()}
    runner = web.AppRunner(serve_files(int(doc["domain"]), int(doc["seq"]), files, os.environ[TOKEN_ENV]),
                           access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    await runner.cleanup()


def main() -> None:
    asyncio.run(serve(json.loads(sys.argv[1])))


if __name__ == "__main__":
    main()
