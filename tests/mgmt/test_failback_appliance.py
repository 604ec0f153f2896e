"""The failback appliance (``python -m rocva failback``, issue 12) against real sites:
site A's VMs wrote through its simulator (real dirty-region maps next to its disks, a
real DRVA log), site B failed the domain over at a point before A's last writes and
wrote on the new timeline; the appliance, run with A's site file, brings A's own disks
to B's point, moving only what changed, and forks a timeline owned by A."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cdp.catalog import load_catalog
from cdp.dirtymap import sidecar_path
from cdp.store.fs import FileStore
from cdp.testing.site import running_daemon
from cdp.testing.two_sites import make_two_sites, sha256
from tests.mgmt.test_failover_job import WRITE_S, committed, failover, power_off_and_commit
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
APPLIANCE_S = 120.0


def appliance(config: Path, env: dict[str, str], *args: str) -> tuple[int, list[dict]]:
    r = subprocess.run([sys.executable, "-m", "rocva", "failback", "--config", str(config), *args], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=APPLIANCE_S)
    return r.returncode, [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


async def test_the_appliance_brings_site_a_disks_to_b_point_by_the_delta(tmp_path):
    sites = make_two_sites(tmp_path)
    async with running_daemon(sites.a) as a:
        await a.power("erp", True)
        await wait_until(lambda: committed(a, "erp") >= 150, WRITE_S, "site A's first writes committed")
        fork_at = committed(a, "erp")
        await wait_until(lambda: committed(a, "erp") >= fork_at + 100, WRITE_S, "site A's writes after the point")
        await power_off_and_commit(a)
    images_a = [d.disk.image for d in sites.a.cfg.domain("erp").disks]
    assert all(sidecar_path(p).exists() for p in images_a)  # A's filter kept its maps
    async with running_daemon(sites.b) as b:
        record = await failover(b, target=f"seq:{fork_at}")
        assert record["state"] == "succeeded", record
        fork = record["output"]["fork_seq"]
        await wait_until(lambda: committed(b, "erp") > fork + 50, WRITE_S, "B's writes committed")
        final = await power_off_and_commit(b)
        images_b = [d.disk.image for d in b.cfg.domain("erp").disks]
        b_disks = [sha256(p) for p in images_b]
    assert [sha256(p) for p in images_a] != b_disks

    env = {**sites.a.env}
    code, lines = appliance(sites.a.config_path, env, "--domain", "1", "--name", "erp", "--target", f"seq:{final}")
    assert code == 0, lines
    out = lines[-1]["result"]
    assert [sha256(p) for p in images_a] == b_disks  # A's disks are B's at its last point
    assert [x["mode"] for x in out["disks"]] == ["delta"] * len(images_a)
    total = sum(d.disk.size for d in sites.a.cfg.domain("erp").disks)
    assert 0 < out["bytes_moved"] < total, out
    assert all(x["ranges"]["ours"] > 0 and x["ranges"]["theirs"] > 0 for x in out["disks"] if x["bytes"]), out
    assert (out["timeline"], out["parent_timeline"], out["fork_seq"], out["old_fork_seq"]) == (3, 2, final, fork)
    state, _ = await load_catalog(FileStore(sites.store), 1)
    assert state.current == 3 and state.timeline().owner == sites.a.cfg.site
    assert not any(sidecar_path(p).exists() for p in images_a)

    code, lines = appliance(sites.a.config_path, env, "--domain", "1", "--name", "nope", "--target", "latest")
    assert code == 2 and "has no domain nope" in lines[-1]["error"], lines
