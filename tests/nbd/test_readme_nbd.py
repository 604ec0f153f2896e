"""The README's NBD section runs as written: its shell block, in bash, with the examples
copied to a temporary directory and moved to free ports (tests may run in parallel)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.drva.harness import ROOT, free_port

SECTION = "## Real block devices over NBD"
SCRIPT_TIMEOUT_S = 300


def readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION):]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def test_the_readme_nbd_block_runs_as_written(tmp_path: Path) -> None:
    for tool in ("nbdinfo", "qemu-img", "fio", "mkfs.ext4", "e2fsck", "debugfs"):
        assert shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin"), \
            f"{tool} is not installed: run ./dev test (it installs qemu-utils, libnbd-bin, fio, e2fsprogs)"
    ports = {"32873": str(free_port()), "32874": str(free_port()), "10809": str(free_port()),
             "10810": str(free_port())}
    (tmp_path / "examples").mkdir()
    for name in ("drva-1.toml", "drva-2.toml", "cluster.toml"):
        text = (ROOT / "examples" / name).read_text()
        for fixed, free in ports.items():
            text = text.replace(fixed, free)
        (tmp_path / "examples" / name).write_text(text)
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "FORMAT.md", tmp_path / "docs")
    shutil.copy(ROOT / "README.md", tmp_path)
    # The block calls .venv/bin/...: the test's own interpreter's environment.
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    script = readme_block()
    for fixed, free in ports.items():
        script = script.replace(fixed, free)
    env = {**os.environ, "PATH": f"/usr/sbin:/sbin:{os.environ.get('PATH', '')}", "TMPDIR": str(tmp_path)}
    r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=SCRIPT_TIMEOUT_S)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in tmp_path.glob("tmp.*/*.log"))
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-4000:]}{logs}"
    lines = r.stdout.splitlines()
    assert "7" in lines, r.stdout  # nbdinfo listed the seven disks of examples/cluster.toml
    assert "Images are identical." in lines, r.stdout
