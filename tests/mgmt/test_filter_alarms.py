"""The alarms of a filter the DRVA cannot trust or does not hear from, and of the site's
TLS certificates.

* ``filter_clock_skew``: a filter whose clock is far behind the DRVA's stamps its writes
  earlier than they were, and nothing rewrote or counted them, so no alarm fired and
  ``--at`` picked later points than meant (tests/drva/test_filter_clock_offset.py for
  the DRVA's figure, ``filter_clock_offset_s``).
* ``filter_disconnected``: when the filters could not connect (the DRVA's certificate
  had expired: leaf certificates last 397 days, and nothing watched them), the DRVA
  saw no write, reported an RPO lag of 0 and the MSA raised nothing, while the writes
  piled up in the filters.
* ``certificate_expiring``: a certificate the site's servers loaded expires within 30
  days, has expired, or is not valid yet.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path

import numpy as np

from cdp.hypervisor import VmsDown
from cdp.msa import alarms
from cdp.msa.alarms import KINDS, SEVERITY
from cdp.msa.config import DrvaSpec
from cdp.msa.site_tls import TlsSpec
from cdp.pki import LEAF_VALID_S, ensure_site_pki, read_cert
from cdp.tls import client_context
from cdp.tomlread import Endpoint
from drva.status import domain_status
from iofilter_sim.client import FilterClient
from iofilter_sim.filter import DomainFilter
from tests.drva.harness import SECRET, Disk, config, random_writes, running_drva, two_domains
from tests.mgmt.test_alarms import POLICIES, S, domain, evaluator, kinds, status, view
from tests.waiting import EVENTUALLY_S, wait_until

DAY = 86400 * S
WALL = 1_750_000_000 * S  # the MSA's wall clock when a test starts
ERP_RPO_S = POLICIES["erp"].rpo_target_s  # 30 s


# ---------------------------------------------------------------------- filter_clock_skew

def skewed(offset_s: float | None, **fields) -> list:
    return [view(status(domain("erp", filter_clock_offset_s=offset_s, **fields), domain("web")))]


def test_a_filter_clock_off_by_more_than_the_lock_skew_is_a_major_alarm_until_set_right():
    assert "filter_clock_skew" in KINDS and SEVERITY["filter_clock_skew"] == "major"
    ev = evaluator()
    for offset_s in (None, 0.0, -29.9, 30.0):  # unknown (an older filter), or within the 30 s the locks allow
        ev.evaluate(WALL, skewed(offset_s), POLICIES, monotonic_ns=0)
        assert kinds(ev) == set(), offset_s
    raised, _ = ev.evaluate(WALL, skewed(-86400.0), POLICIES, monotonic_ns=S)
    assert [(a.kind, a.subject, a.subject_kind) for a in raised] == [("filter_clock_skew", "erp", "domain")]
    text = raised[0].message
    assert "domain erp" in text and "86400.0 s behind DRVA drva-1's" in text and "later point" in text, text
    assert "30 s" in text and "NTP" in text, text
    # Ahead: an earlier point; the message is kept current.
    ev.evaluate(WALL, skewed(120.0), POLICIES, monotonic_ns=2 * S)
    assert "120.0 s ahead of DRVA drva-1's" in ev.active_alarms()[0].message
    assert "earlier point" in ev.active_alarms()[0].message
    # The filter went away: the last clock it gave still stands, and the message says so.
    ev.evaluate(WALL, skewed(120.0, connected=False), POLICIES, monotonic_ns=3 * S)
    assert "none is connected now" in ev.active_alarms()[0].message
    _, cleared = ev.evaluate(WALL, skewed(0.4), POLICIES, monotonic_ns=4 * S)
    assert [(a.kind, a.subject) for a in cleared] == [("filter_clock_skew", "erp")]


# ---------------------------------------------------------------------- filter_disconnected

def connected(flag: bool | None, *, pid: int = 100, **fields) -> list:
    extra = {} if flag is None else {"connected": flag}
    return [view(status(domain("erp", **extra, **fields), domain("web", connected=True)), pid=pid)]


def test_vms_running_here_with_no_filter_session_past_the_rpo_target_is_an_alarm_until_one_is_back():
    assert "filter_disconnected" in KINDS and SEVERITY["filter_disconnected"] == "major"
    ev = evaluator()
    on = ("erp", "web")
    ev.evaluate(WALL, connected(False), POLICIES, monotonic_ns=100 * S, powered=on)
    ev.evaluate(WALL, connected(False), POLICIES, monotonic_ns=(100 + ERP_RPO_S) * S, powered=on)
    assert kinds(ev) == set()  # not longer than its target yet (its lag reads 0: nothing else says it)
    raised, _ = ev.evaluate(WALL - DAY, connected(False), POLICIES, monotonic_ns=(101 + ERP_RPO_S) * S,
                            powered=on)  # timed on the monotonic clock: the wall's step changes nothing
    assert [(a.kind, a.subject, a.subject_kind) for a in raised] == [("filter_disconnected", "erp", "domain")]
    text = raised[0].message
    assert "domain erp" in text and "DRVA drva-1 has had no filter session for 31 s" in text, text
    assert "RPO target is 30 s" in text and "certificate" in text, text
    _, cleared = ev.evaluate(WALL, connected(True), POLICIES, monotonic_ns=200 * S, powered=on)
    assert [(a.kind, a.subject) for a in cleared] == [("filter_disconnected", "erp")]
    # Disconnected again: counted anew from then.
    ev.evaluate(WALL, connected(False), POLICIES, monotonic_ns=300 * S, powered=on)
    ev.evaluate(WALL, connected(False), POLICIES, monotonic_ns=320 * S, powered=on)
    assert kinds(ev) == set()


def test_no_filter_session_is_no_alarm_where_no_vm_of_the_domain_runs():
    long_after = (10 + ERP_RPO_S) * S
    # Powered off here (its VMs run at another site, or nowhere).
    ev = evaluator()
    ev.evaluate(WALL, connected(False), POLICIES, monotonic_ns=0, powered=("web",))
    ev.evaluate(WALL, connected(False), POLICIES, monotonic_ns=long_after, powered=("web",))
    assert kinds(ev) == set()
    # Powered on, but its host is down: vms_down says so, and its VMs write nothing.
    ev = evaluator()
    down = [VmsDown("erp", "esx-a1", "restarting", 60.0, 1, 1, "killed", 1.0)]
    for t in (0, long_after):
        ev.evaluate(WALL, connected(False), POLICIES, monotonic_ns=t, powered=("erp",), vms_down=down)
    assert kinds(ev) == {("vms_down", "erp")}
    # Fenced: its filter is refused on purpose, and the fenced alarm says why.
    ev = evaluator()
    for t in (0, long_after):
        ev.evaluate(WALL, connected(False, fenced=True), POLICIES, monotonic_ns=t, powered=("erp",))
    assert kinds(ev) == {("fenced", "erp")}
    # A DRVA that does not say (older than the field): nothing is assumed.
    ev = evaluator()
    for t in (0, long_after):
        ev.evaluate(WALL, connected(None), POLICIES, monotonic_ns=t, powered=("erp",))
    assert kinds(ev) == set()


def test_a_restarted_drva_gives_its_filter_the_rpo_target_anew():
    ev = evaluator()
    ev.evaluate(WALL, connected(False, pid=100), POLICIES, monotonic_ns=0, powered=("erp",))
    ev.evaluate(WALL, connected(False, pid=200), POLICIES, monotonic_ns=(ERP_RPO_S - 1) * S, powered=("erp",))
    ev.evaluate(WALL, connected(False, pid=200), POLICIES, monotonic_ns=(ERP_RPO_S + 1) * S, powered=("erp",))
    assert kinds(ev) == set()
    ev.evaluate(WALL, connected(False, pid=200), POLICIES, monotonic_ns=(2 * ERP_RPO_S) * S, powered=("erp",))
    assert kinds(ev) == {("filter_disconnected", "erp")}


# ---------------------------------------------------------------------- certificate_expiring

def cert(stem: str = "drva-drva-1", *, not_before_ns: int = WALL - 300 * DAY, not_after_ns: int):
    return alarms.CertInUse(stem, f"/site/tls/{stem}.pem", "DRVA drva-1's filter port", not_before_ns, not_after_ns)


def test_a_certificate_expiring_within_30_days_expired_or_not_yet_valid_is_an_alarm():
    assert "certificate_expiring" in KINDS and SEVERITY["certificate_expiring"] == "major"
    ev = evaluator()
    ev.evaluate(WALL, [], POLICIES, certificates=[cert(not_after_ns=WALL + 31 * DAY)])
    assert kinds(ev) == set()
    raised, _ = ev.evaluate(WALL, [], POLICIES, certificates=[cert(not_after_ns=WALL + 12 * DAY)])
    assert [(a.kind, a.subject, a.subject_kind) for a in raised] == [("certificate_expiring", "drva-drva-1", "site")]
    text = raised[0].message
    assert "/site/tls/drva-drva-1.pem" in text and "DRVA drva-1's filter port" in text and "in 12.0 days" in text
    assert "cdp install" in text and "restart the daemon" in text, text
    ev.evaluate(WALL, [], POLICIES, certificates=[cert(not_after_ns=WALL - DAY)])
    assert "expired at" in ev.active_alarms()[0].message
    ev.evaluate(WALL, [], POLICIES, certificates=[cert(not_before_ns=WALL + DAY, not_after_ns=WALL + 397 * DAY)])
    assert "is not valid until" in ev.active_alarms()[0].message
    # Renewed and loaded (the daemon restarted): cleared.
    _, cleared = ev.evaluate(WALL, [], POLICIES, certificates=[cert(not_after_ns=WALL + 397 * DAY)])
    assert [(a.kind, a.subject) for a in cleared] == [("certificate_expiring", "drva-drva-1")]


def test_a_certificate_alarm_stays_judged_while_its_drva_is_down():
    ev = evaluator()
    expiring = [cert(not_after_ns=WALL + DAY)]
    ev.evaluate(WALL, [view(status(domain("erp"), domain("web")))], POLICIES, certificates=expiring)
    ev.evaluate(WALL, [view(None, state="restarting", last_exit=1)], POLICIES, certificates=expiring)
    assert ("certificate_expiring", "drva-drva-1") in kinds(ev)
    _, cleared = ev.evaluate(WALL, [view(None, state="restarting", last_exit=1)], POLICIES, certificates=[])
    assert ("certificate_expiring", "drva-drva-1") in {(a.kind, a.subject) for a in cleared}


# ---------------------------------------------------------------------- the watch over the files

DRVA_1 = DrvaSpec("drva-1", Endpoint("127.0.0.1", 32873), Path("/dev/null"), 1, Path("/dev/null"))


def site_pki(tls_dir: Path, issued_days_ago: float) -> TlsSpec:
    spec = TlsSpec(tls_dir)
    issued = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=issued_days_ago)
    ensure_site_pki(spec.files, "site-a", [spec.drva_leaf(DRVA_1), spec.api_leaf(Endpoint("127.0.0.1", 32880))],
                    clock=lambda: issued)
    return spec


class Reads:
    """Counts the certificate files read (``cdp.pki.read_cert``)."""

    def __init__(self, monkeypatch) -> None:
        self.paths: list[str] = []
        monkeypatch.setattr(alarms, "read_cert", self)

    def __call__(self, path: Path):
        self.paths.append(Path(path).name)
        return read_cert(path)


def test_the_watch_reads_what_the_servers_loaded_once_and_a_drvas_again_when_it_restarts(tmp_path, monkeypatch):
    spec = site_pki(tmp_path / "tls", issued_days_ago=380)  # leaves expire in 17 days
    reads = Reads(monkeypatch)
    clock = [0.0]
    watch = alarms.CertificateWatch(spec, [DRVA_1], clock=lambda: clock[0])
    drva_up = [view(status(domain("erp")), pid=100)]
    found = watch.in_use(drva_up)
    assert sorted(c.stem for c in found) == ["api", "ca", "drva-drva-1"]
    expires = read_cert(spec.api_cert).not_valid_after_utc.timestamp()
    assert abs(next(c for c in found if c.stem == "api").not_after_ns / 1e9 - expires) < 1
    assert sorted(reads.paths) == ["api.pem", "ca.pem", "drva-drva-1.pem"]
    ev = evaluator()
    ev.evaluate(time.time_ns(), drva_up, POLICIES, certificates=found)
    assert {s for k, s in kinds(ev) if k == "certificate_expiring"} == {"api", "drva-drva-1"}  # the CA has 10 years
    # Renewed by an install, but no server restarted: what they serve still expires.
    site_pki(tmp_path / "tls", issued_days_ago=0)
    clock[0] += 7 * 86400.0
    reads.paths.clear()
    assert watch.in_use(drva_up) == found and reads.paths == []  # no file read on a tick
    # The DRVA restarted (a new pid): it loaded the renewed file, and only that is read again.
    renewed = watch.in_use([view(status(domain("erp")), pid=101)])
    assert reads.paths == ["drva-drva-1.pem"]
    assert next(c for c in renewed if c.stem == "drva-drva-1").not_after_ns > time.time_ns() + 390 * DAY


def test_a_certificate_that_cannot_be_read_is_tried_again_after_the_retry_interval(tmp_path, monkeypatch):
    spec = TlsSpec(tmp_path / "tls")  # no file there yet
    reads = Reads(monkeypatch)
    clock = [0.0]
    watch = alarms.CertificateWatch(spec, [DRVA_1], clock=lambda: clock[0], retry_s=3600.0)
    assert watch.in_use([]) == []
    clock[0] += 60.0
    assert watch.in_use([]) == [] and len(reads.paths) == 2  # not read again within the hour
    site_pki(tmp_path / "tls", issued_days_ago=0)
    clock[0] += 3600.0
    assert sorted(c.stem for c in watch.in_use([])) == ["api", "ca"]


def test_no_tls_no_certificate():
    assert alarms.CertificateWatch(None, [DRVA_1]).in_use([view(status(domain("erp")))]) == []


# ---------------------------------------------------------------------- live: the certificate expired

async def test_filters_locked_out_by_an_expired_drva_certificate_raise_alarms_not_a_zero_lag(tmp_path):
    """The reproduction: the DRVA's certificate was issued 398 days ago (``cdp install``,
    never rerun). Its filter cannot connect; the DRVA sees no write and reports a lag of
    0 — and now the MSA says what is wrong."""
    spec = site_pki(tmp_path / "tls", issued_days_ago=LEAF_VALID_S / 86400 + 1)
    stem = spec.drva_stem(DRVA_1)
    doc = two_domains(tmp_path, "drva-1", seal_age_s=0.2,
                      tls={"cert": str(spec.files.cert(stem)), "key": str(spec.files.key(stem))})
    async with running_drva(config(doc)) as d:
        f = DomainFilter(1, [Disk(tmp_path / "erp0.img", 8 << 20)])
        client = FilterClient([f], "127.0.0.1", d.port, SECRET.encode(), "host-1",
                              tls=client_context(spec.ca_cert), server_name="drva-1")
        task = asyncio.create_task(client.run())
        try:
            f.capture(*random_writes(np.random.default_rng(1), [8 << 20], 4, 8))
            await wait_until(lambda: d.refused_tls >= 1, EVENTUALLY_S, "the filter's TLS handshake refused")
            st = domain_status(d.domains[1], False)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert client.connections == 0 and st["connected"] is False
    assert st["rpo_lag_s"] == 0.0  # what the DRVA can say: it saw none of the writes
    views = [view(status(dict(st, name="erp"), domain("web", connected=True)))]
    ev = evaluator()
    start = time.monotonic_ns()
    for t in (start, start + (ERP_RPO_S + 1) * S):  # powered not given: every protected domain is judged
        ev.evaluate(time.time_ns(), views, POLICIES, monotonic_ns=t)
    assert ("filter_disconnected", "erp") in kinds(ev), \
        f"domain erp: no filter session for {ERP_RPO_S + 1:g} s past its RPO target, yet the alarms are {kinds(ev)}"
    watch = alarms.CertificateWatch(spec, [DRVA_1])
    ev.evaluate(time.time_ns(), views, POLICIES, monotonic_ns=start + (ERP_RPO_S + 2) * S, powered=("erp", "web"),
                certificates=watch.in_use(views))
    assert ("filter_disconnected", "erp") in kinds(ev)
    expired = [a for a in ev.active_alarms() if a.kind == "certificate_expiring" and a.subject == stem]
    assert expired and "expired at" in expired[0].message, [a.message for a in ev.active_alarms()]
