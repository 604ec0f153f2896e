"""``benchmarks.report --out DIR``: every file is created or replaced without following a
link planted at its name (report.md, report.html, results.json, logs/NAME.log, the PNGs),
``logs/`` as a link is refused, a non-directory ``--out`` or ``--dir`` is one line and exit
2; the work directory's file system comes from /proc/self/mountinfo (no ``findmnt``),
and tmpfs, ramfs or an unknown one is refused. The benchmarks themselves are faked: each
answers at once (exit 1), so the real ``main`` and page writers run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import _common, report
from benchmarks._stages import fs_type as proc_mounts_fs_type

MACHINE = {"cores": 2, "cores_usable": 2, "cpu": "cpu", "memory_gib": 1, "path": "/x", "fs_type": "ext4",
           "fs_source": "/dev/vda", "disk": "vda", "load_1m": 0.1}
VICTIM_TEXT = "precious: never overwritten\n"
#: What the faked failover benchmark prints: enough for its chart (rto.png).
FAILOVER_RESULT = '{"benchmark": "failover", "rto_warm_s": 3.0, "rto_cold_s": 9.0}\n'


@pytest.fixture
def fake_benchmarks(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Benchmarks that fail at once; peers never installed; the machine as ``machine``."""
    real_run = subprocess.run
    machine = dict(MACHINE)

    def run(cmd: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(cmd, list) and len(cmd) > 2 and str(cmd[2]) == "benchmarks.failover":
            return subprocess.CompletedProcess(cmd, 0, stdout=FAILOVER_RESULT, stderr="")
        if isinstance(cmd, list) and len(cmd) > 2 and str(cmd[2]).startswith("benchmarks."):
            return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="stub benchmark\n")
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(report.subprocess, "run", run)
    monkeypatch.setattr(report, "ensure", lambda wanted: None)
    monkeypatch.setattr(report, "machine", lambda path: {**machine, "path": str(path)})
    return machine


def run_report(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["benchmarks.report", *args])
    with pytest.raises(SystemExit) as done:
        report.main()
    return done.value.code


def victims(tmp_path: Path, names: list[str]) -> dict[str, Path]:
    d = tmp_path / "victims"
    d.mkdir(exist_ok=True)
    found = {}
    for name in names:
        found[name] = d / name.replace("/", "_")
        found[name].write_text(VICTIM_TEXT)
    return found


def test_links_planted_at_every_output_name_are_replaced_not_followed(tmp_path, monkeypatch, fake_benchmarks):
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    planted = victims(tmp_path, ["report.md", "report.html", "results.json", "logs/storage.log", "rto.png"])
    for name, victim in planted.items():
        (out / name).symlink_to(victim)
    assert run_report(monkeypatch, "--out", str(out), "--only", "storage,failover",
                      "--dir", str(tmp_path / "work")) == 1
    for name, victim in planted.items():
        assert victim.read_text() == VICTIM_TEXT, name
        assert not (out / name).is_symlink() and (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "Failed: not measured" in md and "![failover: rto](rto.png)" in md
    assert (out / "rto.png").read_bytes()[:4] == b"\x89PNG"
    assert "stub benchmark" in (out / "logs" / "storage.log").read_text()


def test_a_hard_link_planted_at_a_name_is_replaced_not_written(tmp_path, monkeypatch, fake_benchmarks):
    out = tmp_path / "out"
    out.mkdir()
    victim = victims(tmp_path, ["results.json"])["results.json"]
    os.link(victim, out / "results.json")
    assert run_report(monkeypatch, "--out", str(out), "--only", "storage", "--dir", str(tmp_path / "work")) == 1
    assert victim.read_text() == VICTIM_TEXT and (out / "results.json").stat().st_ino != victim.stat().st_ino


def test_a_chart_name_planted_as_a_link_is_replaced(tmp_path):
    victim = victims(tmp_path, ["rto.png"])["rto.png"]
    (tmp_path / "rto.png").symlink_to(victim)
    path, _ = report.chart_rto({"rto_warm_s": 3.0, "rto_cold_s": 9.0}, tmp_path)
    assert path == tmp_path / "rto.png" and victim.read_text() == VICTIM_TEXT
    assert not path.is_symlink() and path.read_bytes()[:4] == b"\x89PNG"


def test_logs_as_a_link_is_refused(tmp_path, monkeypatch, capsys, fake_benchmarks):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "logs").symlink_to(elsewhere)
    assert run_report(monkeypatch, "--out", str(out), "--only", "storage", "--dir", str(tmp_path / "work")) == 2
    err = capsys.readouterr().err
    assert "logs is a symbolic link: expected a directory" in err and len(err.strip().splitlines()) == 1, err
    assert list(elsewhere.iterdir()) == [] and not (out / "report.md").exists()


@pytest.mark.parametrize("option", ["--out", "--dir"])
def test_a_file_where_a_directory_goes_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, fake_benchmarks,
                                                               option):
    file = tmp_path / "a-file"
    file.write_text(VICTIM_TEXT)
    paths = {"--out": str(tmp_path / "out"), "--dir": str(tmp_path / "work"), option: str(file)}
    assert run_report(monkeypatch, "--out", paths["--out"], "--dir", paths["--dir"], "--only", "storage") == 2
    err = capsys.readouterr().err
    assert err.strip() == f"benchmarks.report: {option} {file}: a regular file is there: expected a directory", err
    assert file.read_text() == VICTIM_TEXT


@pytest.mark.parametrize("fs", ["tmpfs", "ramfs", "?"])
def test_memory_or_unknown_file_systems_are_refused(tmp_path, monkeypatch, capsys, fake_benchmarks, fs):
    fake_benchmarks["fs_type"] = fs
    assert run_report(monkeypatch, "--out", str(tmp_path / "out"), "--only", "storage",
                      "--dir", str(tmp_path / "work")) == 2
    err = capsys.readouterr().err
    assert "durable figures" in err and "--dir on a disk file system" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "report.md").exists()


# ---------------------------------------------------------------- the mount table

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 27 0:40 / /srv/my\\040disk rw,relatime shared:7 - xfs /dev/sdb\\0401 rw
41 40 0:41 / /srv/my\\040disk/scratch rw,relatime shared:8 master:2 - tmpfs tmpfs rw
42 27 0:42 / /srv/my rw,relatime - ramfs none rw
43 27 0:43 / /srv/my rw,relatime - ext4 /dev/sdc rw
garbage line
"""


@pytest.mark.parametrize("path,expected", [
    ("/", ("ext4", "/dev/vda", "/")),
    ("/home/u", ("ext4", "/dev/vda", "/")),
    ("/srv/my disk", ("xfs", "/dev/sdb 1", "/srv/my disk")),
    ("/srv/my disk/run/1", ("xfs", "/dev/sdb 1", "/srv/my disk")),
    ("/srv/my disk/scratch/x", ("tmpfs", "tmpfs", "/srv/my disk/scratch")),
    ("/srv/my disk/scratchy", ("xfs", "/dev/sdb 1", "/srv/my disk")),  # a prefix of a name is not a parent
    ("/srv/my/x", ("ext4", "/dev/sdc", "/srv/my")),  # mounted over the ramfs: the later line
])
def test_mount_in_finds_the_longest_mount_point_above_a_path(path, expected):
    assert _common.mount_in(MOUNTINFO, path) == expected


def test_no_mount_table_is_unknown():
    assert _common.mount_in("", "/x") == (_common.FS_UNKNOWN,) * 3


def test_the_file_system_is_known_without_findmnt(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools-here"))
    m = _common.machine(tmp_path)
    assert m["fs_type"] == proc_mounts_fs_type(tmp_path) != _common.FS_UNKNOWN
    shm = Path("/dev/shm")
    if shm.is_dir() and proc_mounts_fs_type(shm) == "tmpfs":
        assert _common.machine(shm)["fs_type"] == "tmpfs"
