"""A DRVA's configuration file against the mistakes an operator makes (drva/config.py):
a partition put where the DRVA writes its own files, a typo'd key, two disks that
recover to one image, a disk of 4 EiB, ``true`` for a number, a NUL in a TLS path; the
status writer's backstop under the first (drva/status.py) and the claim on the state
directory (drva/state_lock.py). Each was accepted, and lost acked writes, shipped a
domain to the wrong store or left a domain unrecoverable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cdp.errors import Busy, ConfigError
from cdp.meta import MetaRepository
from cdp.replog import ReplicationLog
from cdp.testing.drva_config import SECRET, domain_doc, drva_doc
from drva.config import parse_drva_config
from drva.state_lock import StateDirLock
from drva.status import write_status_file

ENV = {"CDP_SITE_SECRET": SECRET}


def doc_of(tmp: Path, disks: list[tuple[str, str, int]] | None = None, **extra: Any) -> dict[str, Any]:
    return drva_doc(tmp, "drva-1", [domain_doc(1, "erp", disks or [("vm1", "d0", 1 << 20)])], **extra)


def refusal(doc: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as err:
        parse_drva_config(doc, "d.toml", ENV)
    return err.value.message


# --------------------------------------------------------------- partitions


def _at(tmp: Path, where: str) -> str:
    return str(tmp / "drva-1" / where) if where else str(tmp / "drva-1")


@pytest.mark.parametrize("key,where,words", [
    ("log", "status.json", "status.json"),          # replaced by JSON every second: acked writes lost
    ("meta", "status.json", "status.json"),
    ("log", "requests/replog", "requests"),          # each file there is read and deleted
    ("log", "requests", "requests"),
    ("log", "", "which is state_dir"),                # the state directory itself
    ("meta", "", "which is state_dir"),
])
def test_a_partition_where_the_drva_writes_its_own_files_is_refused(tmp_path, key, where, words):
    doc = doc_of(tmp_path)
    doc[key] = {**doc[key], "path": _at(tmp_path, where)}
    message = refusal(doc)
    assert message.startswith(f"d.toml: {key}.path: expected a file"), message
    assert words in message, message


def test_a_partition_above_state_dir_is_refused(tmp_path):
    doc = doc_of(tmp_path)
    doc["state_dir"] = str(tmp_path / "replog" / "state")
    doc["log"] = {**doc["log"], "path": str(tmp_path / "replog")}
    assert refusal(doc).startswith("d.toml: log.path: expected a file, got"), refusal(doc)


def test_log_and_meta_at_one_path_are_refused_at_load(tmp_path):
    """They gave "in use by another process (locked)" at start: the DRVA's own two locks."""
    doc = doc_of(tmp_path)
    doc["meta"] = {"path": doc["log"]["path"]}
    message = refusal(doc)
    assert message.startswith("d.toml: meta.path: expected a file apart from log.path"), message


def test_partitions_elsewhere_in_state_dir_load(tmp_path):
    cfg = parse_drva_config(doc_of(tmp_path), "d.toml", ENV)  # <state_dir>/replog and /meta: the usual place
    assert cfg.log_path.parent == cfg.state_dir == cfg.meta_path.parent


def test_the_status_writer_never_replaces_a_partition(tmp_path):
    """The backstop: a log or a metadata repository at status.json is left as it is."""
    log_at = tmp_path / "log" / "status.json"
    log_at.parent.mkdir()
    ReplicationLog.format(log_at, 2 << 20, label="drva-1")
    meta_at = tmp_path / "meta" / "status.json"
    meta_at.parent.mkdir()
    MetaRepository.format(meta_at)
    with MetaRepository.open(meta_at) as meta:
        meta.write({"drva": "drva-1", "domains": {}})  # generation 2: slot 0 (a new one's is zeros)
    other = tmp_path / "other" / "status.json"
    other.parent.mkdir()
    other.write_bytes(b"\0" * 4096)
    for path, words in ((log_at, "a replication-log partition"), (meta_at, "a metadata repository"),
                        (other, "not a status document")):
        before = path.read_bytes()
        problem = write_status_file(path, {"drva": "drva-1"})
        assert problem is not None and words in problem and "left alone" in problem, problem
        assert path.read_bytes() == before


def test_the_status_writer_replaces_a_status_document_or_an_empty_file(tmp_path):
    path = tmp_path / "status.json"
    assert write_status_file(path, {"drva": "a"}) is None
    assert write_status_file(path, {"drva": "b"}) is None
    assert json.loads(path.read_text()) == {"drva": "b"}
    path.write_bytes(b"")
    assert write_status_file(path, {"drva": "c"}) is None
    assert json.loads(path.read_text()) == {"drva": "c"}


# --------------------------------------------------------------- unknown keys


@pytest.mark.parametrize("change,at,known,close", [
    (lambda d: d["seal"].update(byte="1MiB"), "seal.byte", "age_s, bytes", "bytes"),
    (lambda d: d.update(backpresure={"high_water": 0.9}), "backpresure", "backpressure", "backpressure"),
    (lambda d: d.update(upload={"concurency": 8}), "upload.concurency", "concurrency", "concurrency"),
    (lambda d: d["log"].update(drect=True), "log.drect", "direct, path, size", "direct"),
    (lambda d: d.update(statu_interval_s=5), "statu_interval_s", "status_interval_s", "status_interval_s"),
    (lambda d: d["domains"][0].update(tkaeover=True), "domains[0].tkaeover", "takeover", "takeover"),
    (lambda d: d["domains"][0].update(stor="s3://elsewhere/x"), "domains[0].stor", "store", "store"),
    (lambda d: d["domains"][0]["disks"][0].update(sise=1), "domains[0].disks[0].sise", "name, size, vm", "size"),
    (lambda d: d.update(meta={"path": d["meta"]["path"], "szie": 1}), "meta.szie", "path", None),
    (lambda d: d.update(tls={"cetr": "x.pem"}), "tls.cetr", "cert, key", "cert"),
])
def test_an_unknown_key_is_refused_naming_it_and_the_keys_expected(tmp_path, change, at, known, close):
    """They loaded with defaults: a domain's ``stor`` shipped it to the default store."""
    doc = doc_of(tmp_path)
    change(doc)
    message = refusal(doc)
    assert message.startswith(f"d.toml: {at}: unknown key (expected one of: "), message
    assert known in message, message
    if close is not None:
        assert f"did you mean {close!r}?" in message, message


def test_a_file_with_every_key_loads(tmp_path):
    doc = doc_of(tmp_path, version=2, site="site-a", status_interval_s=2.0, secret_env="CDP_SITE_SECRET",
                 upload={"concurrency": 2}, backpressure={"high_water": 0.9, "low_water": 0.5})
    doc["log"]["direct"] = False
    doc["domains"][0].update(takeover=True, store=f"file://{tmp_path / 'store-b'}")
    cfg = parse_drva_config(doc, "d.toml", ENV)
    assert (cfg.upload_concurrency, cfg.high_water, cfg.status_interval_s) == (2, 0.9, 2.0)
    assert cfg.domains[0].takeover and cfg.domains[0].store_url == f"file://{tmp_path / 'store-b'}"


def test_a_domain_or_disk_that_is_no_table_is_refused(tmp_path):
    doc = doc_of(tmp_path)
    doc["domains"] = [7]
    assert refusal(doc).startswith("d.toml: domains[0]: expected a table, got 7"), refusal(doc)


# --------------------------------------------------------------- values


@pytest.mark.parametrize("disks,first,second", [
    ([("vm1", "d0", 1 << 20), ("vm1", "d0", 1 << 20)], "vm 'vm1' name 'd0'", "vm 'vm1' name 'd0'"),
    ([("a-b", "c", 1 << 20), ("a", "b-c", 1 << 20)], "vm 'a-b' name 'c'", "vm 'a' name 'b-c'"),
])
def test_two_disks_that_recover_to_one_image_are_refused(tmp_path, disks, first, second):
    """Accepted and replicated, then ``cdp recover`` refused the domain: "two disks make
    image vm1-d0.img"."""
    message = refusal(doc_of(tmp_path, disks))
    assert message.startswith("d.toml: domains[0].disks[1]: expected a disk whose image"), message
    assert f"got {second}" in message and f"disks[0] ({first})" in message, message
    assert "a-b-c.img" in message or "vm1-d0.img" in message, message


def test_a_disk_above_the_cluster_files_cap_is_refused(tmp_path):
    message = refusal(doc_of(tmp_path, [("vm1", "d0", 1 << 62)]))
    assert message.startswith("d.toml: domains[0].disks[0].size: expected at most 1125899906842624 bytes"), message
    parse_drva_config(doc_of(tmp_path, [("vm1", "d0", 1 << 50)]), "d.toml", ENV)  # 1 PiB: the cap itself


@pytest.mark.parametrize("change,at", [
    (lambda d: d.update(backpressure={"high_water": True}), "backpressure.high_water"),
    (lambda d: d.update(backpressure={"low_water": True, "high_water": 1}), "backpressure.low_water"),
    (lambda d: d.update(status_interval_s=True), "status_interval_s"),
    (lambda d: d["seal"].update(age_s=True), "seal.age_s"),
])
def test_true_is_no_number(tmp_path, change, at):
    """``high_water = true`` was read as 1.0."""
    doc = doc_of(tmp_path)
    change(doc)
    assert refusal(doc).startswith(f"d.toml: {at}: True is not a"), refusal(doc)


@pytest.mark.parametrize("key", ["cert", "key"])
def test_a_nul_in_a_tls_path_is_refused_naming_the_key(tmp_path, key):
    """It ended the load in a ValueError traceback (cdp/tls.py)."""
    doc = doc_of(tmp_path, tls={"cert": "cert.pem", key: "x\0.pem"})
    assert refusal(doc).startswith(f"d.toml: tls.{key}: expected a file path"), refusal(doc)


# --------------------------------------------------------------- the state directory


def test_a_second_claim_on_a_state_directory_is_refused_until_the_first_is_released(tmp_path):
    """Two DRVAs with one state_dir both started, each replacing the other's status.json."""
    first = StateDirLock.take(tmp_path)
    assert first.held
    with pytest.raises(Busy, match=f"state_dir {tmp_path}: another DRVA runs with this state directory"):
        StateDirLock.take(tmp_path)
    first.release()
    again = StateDirLock.take(tmp_path)
    assert again.held
    again.release()
    assert list(tmp_path.iterdir()) == []  # nothing left for uninstall to remove


def test_a_state_directory_that_cannot_be_opened_is_run_without_the_claim(tmp_path):
    lock = StateDirLock.take(tmp_path / "missing")
    assert not lock.held
    lock.release()


async def test_a_second_drva_on_a_state_directory_is_refused_and_the_first_goes_on(tmp_path):
    """Two configurations copied and not edited but for the partitions and the port: the
    second DRVA is refused before it opens anything; once the first stops, it starts."""
    from drva.daemon import Drva
    from tests.drva.harness import config

    state = tmp_path / "state"
    docs = []
    for name in ("a", "b"):
        doc = drva_doc(tmp_path / name, "drva-1", [domain_doc(1, "erp", [("vm1", "d0", 1 << 20)])])
        docs.append({**doc, "state_dir": str(state)})
    first = Drva(config(docs[0]), exit_on_task_failure=False)
    await first.start()
    try:
        second = Drva(config(docs[1]), exit_on_task_failure=False)
        with pytest.raises(Busy, match="another DRVA runs with this state directory"):
            await second.start()
        assert not Path(docs[1]["log"]["path"]).exists()  # refused before its partitions were touched
    finally:
        await first.stop()
    second = Drva(config(docs[1]), exit_on_task_failure=False)
    await second.start()
    await second.stop()
