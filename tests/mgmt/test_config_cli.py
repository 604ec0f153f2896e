"""Hostile configuration through the real ``cdp`` command and the real DRVA (issue 10,
item 10): each case is refused by every verb that reads the file, with one line naming
the file, the key and what was expected, the documented exit code (2: bad configuration
or arguments), and never a traceback. Preflight refuses whatever install would: both
go through the same loading of the site file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cdp.testing.site import Site, make_site
from tests.drva.harness import ROOT, SECRET, write_toml

CONFIG_EXIT = 2
#: Every verb that reads the site file, with its arguments; the first case runs them all,
#: the others the verbs the issue names (each is a subprocess: the machine is shared).
SITE_VERBS = (("preflight", "system"), ("preflight", "install"), ("install",), ("daemon",),
              ("preflight", "uninstall"), ("uninstall",), ("status",), ("jobs",), ("protect", "erp"),
              ("mark", "erp", "m"))
CORE_VERBS = SITE_VERBS[:4]
HIDDEN = "hunter2-SECRET"  # a credential in a bad value: never in what is printed


def run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def cdp(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "cdp.cli", *args, "--config", str(site.config_path)], site.env)


def assert_clean_refusal(r: subprocess.CompletedProcess[str], *words: str, code: int = CONFIG_EXIT) -> None:
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr  # one line: the error
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path / "site", install=False)


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (old, text)
    path.write_text(text.replace(old, new, 1))


# ---------------------------------------------------------------------- the site file, every verb

CASES: dict[str, tuple[Callable[[Site], None], tuple[str, ...]]] = {
    "state_dir is a regular file": (
        lambda s: (s.root / "state").write_text("not a directory"),
        ("site.toml: state_dir: expected a directory", "'state' is a regular file")),
    "state_dir below a regular file": (
        lambda s: (_edit(s.config_path, 'state_dir = "state"', 'state_dir = "blocker/state"'),
                   (s.root / "blocker").write_text("x")),
        ("site.toml: state_dir: expected a directory", "'blocker' is a regular file")),
    "domain id 0": (
        lambda s: _edit(s.root / "cluster.toml", "id = 1", "id = 0"),
        ("cluster.toml: domains[0].id: expected an integer in 1..4294967295", "got 0")),
    "a DRVA named ..": (
        lambda s: _edit(s.config_path, 'name = "drva-1"', 'name = ".."'),
        ("site.toml: drvas[0].name: expected a name", "not '.' or '..'", "got '..'")),
    "a DRVA named .": (
        lambda s: _edit(s.config_path, 'name = "drva-1"', 'name = "."'),
        ("site.toml: drvas[0].name:", "got '.'")),
    "a site named ..": (
        lambda s: _edit(s.config_path, 'site = "site-t"', 'site = ".."'),
        ("site.toml: site: expected a name",)),
    "a VM named ..": (
        lambda s: (_edit(s.root / "cluster.toml", 'name = "web-1"', 'name = ".."'),
                   _edit(s.root / "cluster.toml", '    "web-1",', '    "..",')),
        ("cluster.toml: vms[1].name:", "got '..'")),
    "log.size 512": (
        lambda s: _edit(s.config_path, 'size = "8MiB"', "size = 512"),
        ("site.toml: drvas[0].log.size: expected a size of at least 1056768 bytes", "got 512")),
    "log.size 900PiB": (
        lambda s: _edit(s.config_path, 'size = "8MiB"', 'size = "900PiB"'),
        ("site.toml: drvas[0].log.size: expected a size", "unit", "got '900PiB'")),
    "log.size 1000000TiB": (
        lambda s: _edit(s.config_path, 'size = "8MiB"', 'size = "1000000TiB"'),
        ("site.toml: drvas[0].log.size: expected a size of at least 1056768 bytes and at most",)),
    "log.path below a regular file": (
        lambda s: (_edit(s.config_path, 'path = "state/drva-1/replog"', 'path = "blocker/replog"'),
                   (s.root / "blocker").write_text("x")),
        ("site.toml: drvas[0].log.path: expected", "'blocker' is a regular file")),
    "a huge retention": (
        lambda s: _edit(s.config_path, 'retention = "72h"', 'retention = "' + "9" * 400 + '"'),
        ("site.toml: defaults.retention: expected a duration", "3.1536e+08")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_verb_refuses_a_bad_site_cleanly(site: Site, case: str) -> None:
    change, words = CASES[case]
    change(site)
    for verb in SITE_VERBS if case == next(iter(CASES)) else CORE_VERBS:
        r = cdp(site, *verb)
        assert_clean_refusal(r, *words)
    assert not (site.root / "store").exists()  # install changed nothing in the store


def test_a_state_directory_that_cannot_hold_jobs_is_a_clean_error(site: Site) -> None:
    """The state directory is a directory, but its jobs/ is a file: every verb that runs
    as a job says so in one line (exit 1: the state, not the file, is wrong)."""
    (site.root / "state").mkdir()
    (site.root / "state" / "jobs").write_text("not a directory")
    for verb in (("preflight", "system"), ("preflight", "install"), ("install",)):
        r = cdp(site, *verb)
        assert_clean_refusal(r, "job records", "cannot write a record", code=1)


def test_preflight_install_and_install_refuse_the_same_site(site: Site) -> None:
    """A site preflight passes is one install completes; one install refuses, preflight
    refuses first (no install that fails after a green preflight)."""
    for verb in (("preflight", "system"), ("preflight", "install")):
        r = cdp(site, *verb, "--json")
        assert r.returncode == 0, r.stdout + r.stderr
    r = cdp(site, "install")
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------- recover --at


@pytest.mark.parametrize("at", ["9999-12-31T00:00:00Z", "0001-01-01T00:00:00Z", "-99999999999d",
                                "-" + "9" * 5000 + "s", "1969-12-31T23:59:59Z"])
def test_recover_at_out_of_range_is_a_clean_error(tmp_path: Path, at: str) -> None:
    r = run([sys.executable, "-m", "cdp.cli", "recover", "erp", "--store", f"file://{tmp_path / 'store'}",
             "--at", at, "--to", str(tmp_path / "out")], dict(os.environ))
    assert_clean_refusal(r, "--at", "expected a time between 1970-01-01T00:00:00Z and 2262-04-11T23:47:16Z")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- the DRVA's own file


def _drva_config(tmp_path: Path, **changes: object) -> Path:
    doc = {"name": "drva-x", "listen": "127.0.0.1:0", "state_dir": str(tmp_path / "drva-state"),
           "store": f"file://{tmp_path / 'store'}", "secret_env": "CDP_SITE_SECRET",
           "log": {"path": str(tmp_path / "replog"), "size": "4MiB"}, "meta": {"path": str(tmp_path / "meta")},
           "domains": [{"id": 1, "name": "erp", "disks": [{"vm": "db", "name": "d0", "size": "1MiB"}]}]}
    for key, value in changes.items():
        doc[key] = value
    return write_toml(doc, tmp_path / "drva.toml")


DRVA_CASES = {
    "state_dir is a regular file": (lambda t: ((t / "drva-state").write_text("x"), {})[1],
                                    ("state_dir: expected a directory", "'drva-state' is a regular file")),
    "tls certificate missing": (lambda t: {"tls": {"cert": str(t / "nope.pem"), "key": str(t / "nope.key")}},
                                ("tls.cert: expected a readable PEM certificate", "No such file")),
    "tls certificate not a certificate": (
        lambda t: ((t / "junk.pem").write_text("junk"),
                   {"tls": {"cert": str(t / "junk.pem"), "key": str(t / "junk.pem")}})[1],
        ("tls.cert: expected a readable PEM certificate",)),
    "status_interval_s -1": (lambda t: {"status_interval_s": -1}, ("status_interval_s: expected 0.1..60",)),
    "status_interval_s 0": (lambda t: {"status_interval_s": 0}, ("status_interval_s: expected 0.1..60",)),
    "domain id 0": (lambda t: {"domains": [{"id": 0, "name": "erp", "disks": [
        {"vm": "db", "name": "d0", "size": "1MiB"}]}]}, ("domains[0].id: expected 1..",)),
    "a name of ..": (lambda t: {"name": ".."}, ("name: '..' is not a name",)),
    "log.size 512": (lambda t: {"log": {"path": str(t / "replog"), "size": 512}},
                     ("log.size: expected at least 1056768 bytes",)),
    "a domain's store with credentials in it": (lambda t: {"version": 2, "domains": [{
        "id": 1, "name": "erp", "disks": [{"vm": "db", "name": "d0", "size": "1MiB"}],
        "store": f"s3://AKID:{HIDDEN}@bucket/x"}]},
        ("domains[0].store: expected a store URL", "credentials in the URL are refused")),
}


@pytest.mark.parametrize("case", list(DRVA_CASES))
def test_the_drva_refuses_a_bad_file_cleanly(tmp_path: Path, case: str) -> None:
    make, words = DRVA_CASES[case]
    path = _drva_config(tmp_path, **make(tmp_path))
    r = run([sys.executable, "-m", "drva.daemon", "--config", str(path)],
            {**os.environ, "CDP_SITE_SECRET": SECRET}, timeout=60)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == CONFIG_EXIT, (r.returncode, r.stderr)
    assert HIDDEN not in r.stderr + r.stdout
    [line] = [line for line in r.stderr.splitlines() if line.startswith("drva: error:")]
    assert str(path) in line, line
    for word in words:
        assert word in line, (word, line)
    events = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
    assert [e["event"] for e in events] == ["drva_failed"], events

