"""The peers the benchmarks compare with: restic and borg, from Debian packages.

``ensure(tools)`` installs what is missing with ``apt-get`` (root on Debian; ``apt-get
update`` first) and raises ``PeerMissing`` with what to do when it cannot. ``Restic`` and
``Borg`` drive one repository each: init, back up a file, restore it; ``dir_bytes`` is
what a repository (or the store) takes, in apparent bytes of its files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

#: tool -> its Debian package
PACKAGES = {"restic": "restic", "borg": "borgbackup"}
PASSWORD = "benchmark"
APT_TIMEOUT_S = 600


class PeerMissing(RuntimeError):
    """A peer tool is not installed and could not be installed here."""


def ensure(tools: list[str]) -> dict[str, str]:
    """Each tool's path, installing the missing ones from Debian packages first."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        packages = [PACKAGES[t] for t in missing]
        how = f"apt-get install {' '.join(packages)}"
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise PeerMissing(f"{', '.join(missing)} not installed, and this is not root on Debian: run {how}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
            if done.returncode != 0:
                raise PeerMissing(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        still = [t for t in missing if shutil.which(t) is None]
        if still:
            raise PeerMissing(f"{', '.join(still)} still missing after {how}")
    return {t: shutil.which(t) for t in tools}  # type: ignore[misc]


def version(tool: str) -> str:
    cmd = [tool, "version" if tool == "restic" else "--version"]  # restic has no --version
    out = subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
    return out.splitlines()[0] if out else "?"


def dir_bytes(root: Path) -> int:
    """Apparent bytes of every file under ``root``."""
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


class Restic:
    """One restic repository (no cache: every run starts cold, as a restore would)."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.env = {**os.environ, "RESTIC_PASSWORD": PASSWORD, "RESTIC_REPOSITORY": str(repo)}

    def run(self, *args: str) -> None:
        subprocess.run(["restic", "--no-cache", "--quiet", *args], env=self.env, check=True,
                       stdout=subprocess.DEVNULL)

    def init(self) -> Restic:
        self.run("init")
        return self

    def backup(self, path: Path) -> None:
        self.run("backup", str(path))

    def restore_latest(self, target: Path) -> None:
        self.run("restore", "latest", "--target", str(target))


class Borg:
    """One borg repository, unencrypted (restic's is encrypted; neither costs bytes)."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.env = {**os.environ, "BORG_PASSPHRASE": "", "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes", "BORG_BASE_DIR": str(repo.parent / ".borg-base")}
        self.archives = 0

    def run(self, *args: str) -> None:
        subprocess.run(["borg", *args], env=self.env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)

    def init(self) -> Borg:
        self.run("init", "--encryption=none", str(self.repo))
        return self

    def backup(self, path: Path) -> None:
        """A new archive of ``path`` (borg's default compression, lz4)."""
        self.archives += 1
        self.run("create", f"{self.repo}::a{self.archives}", str(path))

    def restore_latest(self, target: Path) -> None:
        """Extract the newest archive under ``target`` (its paths, as restic does, in full)."""
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["borg", "extract", f"{self.repo}::a{self.archives}"], env=self.env, check=True,
                       cwd=target, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
