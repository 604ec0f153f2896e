"""Alarms: conditions of the DRVAs and the protected domains that need a person.

``AlarmEvaluator.evaluate(now_ns, drvas, policies, monotonic_ns=...)`` looks at the
supervisor's views (``DrvaView``: state, restarts, the DRVA's ``status.json``) and the
domains' policies, and raises or clears alarms. How long a condition has held or been
quiet is measured on the monotonic clock (``monotonic_ns``): a step of the wall clock
(NTP, an operator) neither keeps an alarm raised for the length of the step nor fires
one at once. The wall clock (``now_ns``) only dates alarms (``raised_ns``,
``cleared_ns``). One alarm per (kind, subject) at a time:

====================  ========  =======  ==================================================================
kind                  severity  subject  raised while
====================  ========  =======  ==================================================================
drva_down             critical  DRVA     it is restarting after an exit, has not come up within
                                         ``start_grace_s``, is stopped though it serves protected domains
                                         (its configuration could not be written: the message says why),
                                         its status.json has not changed for ``stale_s`` (the MSA's
                                         clock; the message says when the state directory is unwritable,
                                         where status.json is rewritten), or its status.json cannot be
                                         used (no JSON, or a field mistyped: the message names it)
state_dir_unwritable  critical  site     the MSA's state directory cannot be written: a write of ours
                                         failed there with ENOSPC, EDQUOT, EROFS or EIO and none has
                                         succeeded since (a probe retries), or ``statvfs`` says its file
                                         system is read-only, full or out of inodes
                                         (``cdp.msa.state_fs``); subject ``state_dir``
fenced                critical  domain   the DRVA stopped shipping it (another writer owns its catalog,
                                         or the catalog is unusable)
rpo_lag               major     domain   its RPO lag is above the policy's ``rpo_target_s``, or unknown
                                         (absent, or not a finite number of seconds ≥ 0)
bitmap_mode           major     domain   its filter fell back to a dirty-region bitmap
backpressure          major     DRVA     back-pressure held longer than ``alarms.backpressure_s``
store_errors          warning   domain   its upload/catalog error counters rose, or a new last_error
                                         appeared, within the last ``store_error_quiet_s`` (not when fenced)
timestamps_rewritten  major     domain   its DRVA's ``timestamps_raised`` or ``timestamps_clamped``
                                         counter rose within the last ``timestamps_quiet_s``: records were
                                         stored with other times than their filter gave (a clock off), and
                                         ``--at`` near then may pick another point than meant
log_usage             warning   DRVA     its log partition is fuller than ``alarms.log_usage_pct``
filter_clock_skew     major     domain   its DRVA reports the filter's clock off its own by more than the
                                         lock skew (``clock_skew_s``, ``cdp.locks.SKEW_DEFAULT_S``): the
                                         filter stamps its writes with that clock, and ``--at`` picks a
                                         point off by as much (a clock behind is never rewritten: its
                                         stamps only go forward)
filter_disconnected   major     domain   its VMs run here (powered on, ``vms_down`` not raised) but its
                                         DRVA has had no filter session for longer than the policy's
                                         ``rpo_target_s`` (on the MSA's monotonic clock, from when it saw
                                         none; anew when the DRVA restarts); not while fenced. Nothing of
                                         its writes reaches the store, and its lag cannot show it (the DRVA
                                         sees no write). ``powered`` not given: every protected domain
                                         counts as running here
certificate_expiring  major     site     a TLS certificate a server of the site loaded (the site CA, the
                                         API's, a running DRVA's: ``CertificateWatch``) expires within
                                         ``CERT_WARN_S`` (30 days), has expired, or is not valid yet;
                                         subject: the file's stem (``ca``, ``api``, ``drva-<name>``)
marks_dropped         warning   domain   its DRVA's ``marks_dropped`` is above 0: the catalog keeps at most
                                         ``MARKS_MAX`` (131,072) marks per timeline, and the oldest names
                                         left it past that (FORMAT.md §8.2): ``--mark`` no longer finds
                                         them, their points stay recoverable by ``--seq`` and ``--at``.
                                         The count is per DRVA process: cleared when the DRVA restarts
====================  ========  =======  ==================================================================

The state directory's condition comes with the views (``DrvaViews.state_fs_problem``, the
supervisor's look at it). While a DRVA is not up its domains cannot be judged: their alarms stay as they are
(neither raised nor cleared), and ``drva_down`` says why; ``vms_down`` and
``certificate_expiring`` are judged without the DRVAs. Each DRVA is judged on its
own: should judging one fail (a bug), it is logged, that DRVA gets a ``drva_down`` saying
so and its domains stay as they are, and every other DRVA is judged as ever. An active
alarm's message is kept current (the lag it quotes); raising and clearing are logged once
each. Cleared alarms are kept in a bounded history, newest last.
"""

from __future__ import annotations

import collections
import datetime as dt
import itertools
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cdp.catalog_state import MARKS_MAX
from cdp.errors import ConfigError
from cdp.hypervisor import VmsDown
from cdp.locks import SKEW_DEFAULT_S
from cdp.logs import get_logger
from cdp.msa.config import Alarms, DrvaSpec, Policy
from cdp.msa.keeper import ERROR_TEXT_MAX, exit_text
from cdp.msa.site_tls import API_STEM, TlsSpec
from cdp.msa.status_doc import COUNT_MAX, domains_of, shown
from cdp.msa.supervisor import DrvaView
from cdp.pki import RENEW_BEFORE_S, read_cert

log = get_logger("cdp.msa.alarms")

KINDS = ("drva_down", "fenced", "rpo_lag", "bitmap_mode", "backpressure", "store_errors", "log_usage",
         "timestamps_rewritten", "state_dir_unwritable", "vms_down", "filter_clock_skew", "filter_disconnected",
         "certificate_expiring", "marks_dropped")
SEVERITY = {"drva_down": "critical", "fenced": "critical", "rpo_lag": "major", "bitmap_mode": "major",
            "backpressure": "major", "store_errors": "warning", "log_usage": "warning",
            "timestamps_rewritten": "major", "state_dir_unwritable": "critical", "vms_down": "critical",
            "filter_clock_skew": "major", "filter_disconnected": "major", "certificate_expiring": "major",
            "marks_dropped": "warning"}
#: Judged without the DRVAs: a DRVA that is not up leaves them judged (``evaluate``).
JUDGED_WITHOUT_DRVAS = ("vms_down", "certificate_expiring")
STATE_DIR_SUBJECT = "state_dir"  # the subject of state_dir_unwritable (subject_kind "site")
HISTORY_MAX = 500
START_GRACE_S = 15.0
#: Stopped this long while serving protected domains is down (the supervisor stops a DRVA
#: only to start it again at once): a DRVA whose configuration could not be written.
STOPPED_GRACE_S = 2.0
STALE_S = 10.0
STORE_ERROR_QUIET_S = 60.0
#: A clock that is off rewrites timestamps with every frame: an hour without one says it was set right.
TIMESTAMPS_QUIET_S = 3600.0
#: A certificate expiring within this is an alarm: what a rerun of ``cdp install`` renews.
CERT_WARN_S = RENEW_BEFORE_S
#: A certificate file that could not be read is tried again after this (CertificateWatch).
CERT_RETRY_S = 3600.0


@dataclass
class Alarm:
    id: str
    kind: str
    severity: str
    subject: str
    subject_kind: str  # "domain" or "drva"
    message: str
    raised_ns: int
    cleared_ns: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Condition = tuple[str, str]  # (subject_kind, message)


class AlarmEvaluator:
    """Invariant: ``active`` holds at most one alarm per (kind, subject), none cleared;
    ``history`` holds at most ``history_max`` cleared alarms."""

    def __init__(self, thresholds: Alarms, *, history_max: int = HISTORY_MAX, start_grace_s: float = START_GRACE_S,
                 stale_s: float = STALE_S, store_error_quiet_s: float = STORE_ERROR_QUIET_S,
                 timestamps_quiet_s: float = TIMESTAMPS_QUIET_S, clock_skew_s: float = SKEW_DEFAULT_S,
                 cert_warn_s: float = CERT_WARN_S) -> None:
        self.thresholds = thresholds
        self.start_grace_s, self.stale_s, self.store_error_quiet_s = start_grace_s, stale_s, store_error_quiet_s
        self.timestamps_quiet_s = timestamps_quiet_s
        self.clock_skew_s, self.cert_warn_s = clock_skew_s, cert_warn_s
        self.active: dict[tuple[str, str], Alarm] = {}
        self.history: collections.deque[Alarm] = collections.deque(maxlen=history_max)
        self._ids = itertools.count(1)
        # Times below are monotonic ns unless named ``wall``.
        self._backpressure_since_ns: dict[str, int] = {}  # DRVA -> when back-pressure began
        # (DRVA, domain) -> (pid, error count, last_error) seen last time; a new pid restarts the counters
        self._errors_seen: dict[tuple[str, str], tuple[int, int, str | None]] = {}
        self._error_at_ns: dict[str, tuple[int, str]] = {}  # domain -> (when, what) of its newest error
        # (DRVA, domain) -> (pid, timestamps_raised, timestamps_clamped) seen last time
        self._rewrites_seen: dict[tuple[str, str], tuple[int, int, int]] = {}
        self._rewrite_at_ns: dict[str, tuple[int, int]] = {}  # domain -> (when, wall when) of its newest rise
        self._failing: dict[str, str] = {}  # DRVA -> why judging it failed (logged when it changes)
        # (DRVA, domain) -> (DRVA pid, when) its DRVA was first seen with no filter session
        # while its VMs ran here; a new pid starts the count again (filter_disconnected).
        self._disconnected_since: dict[tuple[str, str], tuple[int, int]] = {}

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, now_ns: int, drvas: Sequence[DrvaView], policies: Mapping[str, Policy], *,
                 monotonic_ns: int | None = None, vms_down: Sequence[VmsDown] = (),
                 powered: Collection[str] | None = None,
                 certificates: Sequence["CertInUse"] = ()) -> tuple[list[Alarm], list[Alarm]]:
        """Raise and clear alarms for this moment; return (raised, cleared). ``now_ns`` is
        the wall clock, ``monotonic_ns`` the clock durations are measured on (the daemon
        passes ``time.monotonic_ns()``; a test may drive both with ``now_ns``). ``powered``:
        the domains whose VMs are powered on here (``filter_disconnected`` is judged for
        those only); None: not known, every protected domain is judged (a missed alarm
        costs more than a needless one). ``certificates``: the TLS certificates the
        site's servers loaded (``CertificateWatch.in_use``)."""
        mono_ns = now_ns if monotonic_ns is None else monotonic_ns
        # VMs that do not run write nothing: their filter has nothing to ship.
        running = set(policies if powered is None else powered) - {d.domain for d in vms_down}
        conditions: dict[tuple[str, str], Condition] = {}
        unknown: set[str] = set()  # subjects that cannot be judged now (their DRVA is not up)
        state_fs = getattr(drvas, "state_fs_problem", None)
        if state_fs is not None:
            conditions[("state_dir_unwritable", STATE_DIR_SUBJECT)] = (
                "site", f"the MSA's state directory cannot be written: {_said(state_fs)}; job records, DRVA "
                        f"configurations, protection.json and power.json are not saved, and the DRVAs' status.json "
                        f"there goes stale")
        for v in drvas:
            found: dict[tuple[str, str], Condition] = {}
            try:
                judged = self._judge(now_ns, mono_ns, v, policies, found, state_fs, running)
            except Exception as exc:  # a bug: this DRVA alone goes unjudged, and says so
                judged = False
                found = {("drva_down", v.name): ("drva", self._judging_failed(v, exc))}
            else:
                self._failing.pop(v.name, None)
            conditions.update(found)
            if not judged:
                unknown.update(v.domains)
                unknown.add(v.name)
        for d in vms_down:
            if (why := self._vms_down(d)) is not None:
                conditions[("vms_down", d.domain)] = ("domain", why)
        for c in certificates:
            if (why := self._certificate_problem(now_ns, c)) is not None:
                conditions[("certificate_expiring", c.stem)] = ("site", why)
        raised, cleared = [], []
        for key, (subject_kind, message) in conditions.items():
            alarm = self.active.get(key)
            if alarm is not None:
                alarm.message = message
                continue
            alarm = Alarm(f"{key[0]}-{next(self._ids)}", key[0], SEVERITY[key[0]], key[1], subject_kind, message,
                          now_ns)
            self.active[key] = alarm
            raised.append(alarm)
            log.warning("alarm_raised", **alarm.to_dict())
        # vms_down is judged by the hypervisor, certificate_expiring by the files, not by a
        # DRVA: a DRVA not up leaves them judged.
        for key in [k for k in self.active
                    if k not in conditions and (k[0] in JUDGED_WITHOUT_DRVAS or k[1] not in unknown)]:
            alarm = self.active.pop(key)
            alarm.cleared_ns = now_ns
            self.history.append(alarm)
            cleared.append(alarm)
            log.info("alarm_cleared", **alarm.to_dict())
        return raised, cleared

    def _judge(self, now_ns: int, mono_ns: int, v: DrvaView, policies: Mapping[str, Policy],
               out: dict[tuple[str, str], Condition], state_fs: str | None = None,
               running: Collection[str] = ()) -> bool:
        """The conditions of DRVA ``v`` and its domains (``running``: those whose VMs run
        here); False when they cannot be judged."""
        down = self._drva_down(v, state_fs)
        if down is not None:
            out[("drva_down", v.name)] = ("drva", down)
            return False
        if v.status is None:
            return False
        self._drva_conditions(mono_ns, v, out)
        for dom in domains_of(v.status):
            policy = policies.get(dom["name"])
            if policy is not None:
                self._domain_conditions(now_ns, mono_ns, v, dom, policy, out)
                self._filter_conditions(mono_ns, v, dom, policy, dom["name"] in running, out)
                self._marks_dropped_condition(v, dom, out)
        return True

    def _vms_down(self, d: VmsDown) -> str | None:
        """Why a domain powered on here has no VMs running, or None while its host is
        merely being (re)started for a power change (it passes through both states)."""
        if d.state in ("starting", "stopped") and d.for_s <= self.start_grace_s:
            return None
        why = {"restarting": f"its host {d.host} is down ({exit_text(d.last_exit)})",
               "not placed": f"its host {d.host} could not be started",
               "starting": f"its host {d.host} has not come up {d.for_s:.0f} s after it was started",
               "stopped": f"its host {d.host} has been stopped for {d.for_s:.0f} s"}.get(
                   d.state, f"its host {d.host} is {shown(d.state)}")
        error = f": {_said(d.last_error)}" if d.last_error else ""
        retry = f"; tried again in {d.retry_in_s:.1f} s" if d.retry_in_s is not None else ""
        return f"domain {d.domain}: its VMs are powered on here but do not run: {why}{error}{retry}"

    def _judging_failed(self, v: DrvaView, exc: Exception) -> str:
        why = f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_MAX]
        if self._failing.get(v.name) != why:
            self._failing[v.name] = why
            log.error("alarm_evaluation_failed", drva=v.name, error=why, exc_info=True)
        return f"DRVA {v.name} cannot be judged: evaluating its status failed ({why}); see the MSA's log"

    def _drva_down(self, v: DrvaView, state_fs: str | None = None) -> str | None:
        if v.state == "stopped" and v.domains and (v.config_problem is not None or v.state_for_s > STOPPED_GRACE_S):
            why = f": its configuration could not be written ({_said(v.config_problem)})" if v.config_problem else ""
            return (f"DRVA {v.name} is stopped though it serves protected domains {', '.join(v.domains)}{why}; "
                    f"the supervisor tries again" + (f" (the state directory: {_said(state_fs)})" if state_fs else ""))
        if v.state == "up" and v.status_problem is not None:
            return f"DRVA {v.name} cannot be judged: its status.json {_said(v.status_problem)}"
        if v.state == "restarting":
            why = exit_text(v.last_exit) + (f" ({v.last_error})" if v.last_error else "")
            return (f"DRVA {v.name} is down: {why}; restart {v.restarts + 1} in "
                    f"{v.restart_in_s or 0:.1f} s")
        if v.state == "starting" and v.state_for_s > self.start_grace_s:
            return (f"DRVA {v.name} has not come up {v.state_for_s:.0f} s after it was started"
                    + (f" (its status.json {_said(v.status_problem)})" if v.status_problem else ""))
        if v.state == "up" and v.status_age_s is not None and v.status_age_s > self.stale_s:
            if state_fs is not None:  # it rewrites status.json in the state directory, which takes no write
                return (f"DRVA {v.name} is not reporting: its status has not changed for {v.status_age_s:.0f} s, "
                        f"and the state directory it rewrites status.json in cannot be written "
                        f"({_said(state_fs)}): it may be replicating still (see the state_dir_unwritable alarm)")
            return f"DRVA {v.name} is not reporting: its status has not changed for {v.status_age_s:.0f} s (hung?)"
        return None

    def _drva_conditions(self, mono_ns: int, v: DrvaView, out: dict[tuple[str, str], Condition]) -> None:
        st = v.status or {}
        log_doc = st.get("log")
        if isinstance(log_doc, dict) and "used_ratio" in log_doc:
            usage = _finite(log_doc["used_ratio"])
            if usage is None or usage < 0:
                out[("log_usage", v.name)] = ("drva", f"DRVA {v.name}: log partition usage unknown (its status "
                                                      f"says {shown(log_doc['used_ratio'])})")
            elif usage * 100 > self.thresholds.log_usage_pct:
                out[("log_usage", v.name)] = ("drva", f"DRVA {v.name}: log partition {usage * 100:.1f} % full "
                                                      f"(alarm above {self.thresholds.log_usage_pct:g} %)")
        if st.get("backpressure"):
            since = self._backpressure_since_ns.setdefault(v.name, mono_ns)
            held_s = (mono_ns - since) / 1e9
            if held_s > self.thresholds.backpressure_s:
                out[("backpressure", v.name)] = ("drva", f"DRVA {v.name}: back-pressure held for {held_s:.0f} s "
                                                         f"(alarm after {self.thresholds.backpressure_s:g} s)")
        else:
            self._backpressure_since_ns.pop(v.name, None)

    def _domain_conditions(self, now_ns: int, mono_ns: int, v: DrvaView, dom: Mapping[str, Any], policy: Policy,
                           out: dict[tuple[str, str], Condition]) -> None:
        name = str(dom.get("name"))
        last_error = _said(dom["last_error"]) if dom.get("last_error") else None
        if dom.get("fenced"):
            out[("fenced", name)] = ("domain", f"domain {name}: DRVA {v.name} stopped shipping it (fenced)"
                                     + (f": {last_error}" if last_error else ""))
        lag = _finite(dom.get("rpo_lag_s"))
        if lag is None or lag < 0:  # a DRVA that cannot say its lag is not one that has none
            out[("rpo_lag", name)] = ("domain", f"domain {name}: RPO lag unknown: DRVA {v.name} reports "
                                                f"{shown(dom.get('rpo_lag_s'))} (expected seconds ≥ 0); its target "
                                                f"is {policy.rpo_target_s:g} s")
        elif lag > policy.rpo_target_s:
            out[("rpo_lag", name)] = ("domain", f"domain {name}: RPO lag {lag:.1f} s exceeds its target "
                                                f"{policy.rpo_target_s:g} s ({_bytes(dom.get('rpo_lag_bytes'))} "
                                                f"not in the store)")
        if dom.get("bitmap_mode"):
            out[("bitmap_mode", name)] = ("domain", f"domain {name}: the filter fell back to a dirty-region bitmap "
                                                    f"({_bytes(dom.get('dirty_bytes'))} dirty); no consistent "
                                                    f"point until its resync ends")
        self._rewrite_condition(now_ns, mono_ns, v, dom, name, out)
        errors = _count(dom.get("upload_errors")) + _count(dom.get("catalog_errors"))
        pid = v.pid or 0
        seen = self._errors_seen.get((v.name, name))
        if seen is None or seen[0] != pid:
            rising = bool(errors or last_error)
        else:
            rising = errors > seen[1] or (last_error is not None and last_error != seen[2])
        self._errors_seen[(v.name, name)] = (pid, errors, last_error)
        if dom.get("fenced"):
            return  # the fenced alarm quotes its error already
        if rising:
            self._error_at_ns[name] = (mono_ns, str(last_error or "store error"))
        recent = self._error_at_ns.get(name)
        if recent is not None and (mono_ns - recent[0]) / 1e9 < self.store_error_quiet_s:
            out[("store_errors", name)] = (
                "domain", f"domain {name}: store errors (upload {_count(dom.get('upload_errors'))}, catalog "
                          f"{_count(dom.get('catalog_errors'))} since DRVA {v.name} started); last: {recent[1]}")

    def _rewrite_condition(self, now_ns: int, mono_ns: int, v: DrvaView, dom: Mapping[str, Any], name: str,
                           out: dict[tuple[str, str], Condition]) -> None:
        """``timestamps_rewritten``: the DRVA's counters of raised and clamped record times
        (per DRVA process, like the error counters) rose within ``timestamps_quiet_s``."""
        raised, clamped = _count(dom.get("timestamps_raised")), _count(dom.get("timestamps_clamped"))
        seen = self._rewrites_seen.get((v.name, name))
        pid = v.pid or 0
        if seen is None or seen[0] != pid:
            rising = bool(raised or clamped)
        else:
            rising = raised > seen[1] or clamped > seen[2]
        self._rewrites_seen[(v.name, name)] = (pid, raised, clamped)
        if rising:
            self._rewrite_at_ns[name] = (mono_ns, now_ns)
        recent = self._rewrite_at_ns.get(name)
        if recent is None or (mono_ns - recent[0]) / 1e9 >= self.timestamps_quiet_s:
            return
        last = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(recent[1] / 1e9))
        out[("timestamps_rewritten", name)] = (
            "domain", f"domain {name}: DRVA {v.name} stored records with other times than their filter gave "
                      f"(since it started: {raised} raised to the domain's newest time, a filter's clock behind; "
                      f"{clamped} lowered to the bound above the DRVA's clock (FORMAT.md §9.2), a filter's "
                      f"clock ahead or the DRVA's behind), last seen rising at {last} (the MSA's clock): a recovery "
                      f"--at a time near then may pick a later (or earlier) point than meant; check the clocks "
                      f"(NTP) of the filter hosts and of the DRVA")

    def _filter_conditions(self, mono_ns: int, v: DrvaView, dom: Mapping[str, Any], policy: Policy, running: bool,
                           out: dict[tuple[str, str], Condition]) -> None:
        """``filter_clock_skew`` and ``filter_disconnected`` of domain ``dom`` (its VMs
        ``running`` here or not)."""
        name = str(dom.get("name"))
        offset = _finite(dom.get("filter_clock_offset_s"))
        if offset is not None and abs(offset) > self.clock_skew_s:
            out[("filter_clock_skew", name)] = ("domain", self._skew_message(v, dom, name, offset))
        for_s = self._disconnected_for_s(mono_ns, v, dom, name, running)
        if for_s is not None and for_s > policy.rpo_target_s:
            out[("filter_disconnected", name)] = (
                "domain", f"domain {name}: its VMs run here, but DRVA {v.name} has had no filter session for "
                          f"{for_s:.0f} s (its RPO target is {policy.rpo_target_s:g} s): none of its writes since "
                          f"reaches the store, and its RPO lag cannot show them (the DRVA sees none); they wait "
                          f"in the filter. Is the filter's host up, and can it reach the DRVA (network, secret, "
                          f"TLS certificate: see its log and any certificate_expiring alarm)?")

    def _marks_dropped_condition(self, v: DrvaView, dom: Mapping[str, Any],
                                 out: dict[tuple[str, str], Condition]) -> None:
        """``marks_dropped``: the DRVA let the names of the oldest marks of domain ``dom``
        go past the catalog's cap. Its count is per DRVA process and only grows while it
        runs, so the alarm stays until the DRVA restarts (a new process counts from 0):
        nothing else tells that ``--mark`` lost names, the log line aside."""
        dropped = _count(dom.get("marks_dropped"))
        if not dropped:
            return
        name = str(dom.get("name"))
        out[("marks_dropped", name)] = (
            "domain", f"domain {name}: DRVA {v.name} dropped the names of {dropped:,} marks since it started: a "
                      f"timeline's catalog keeps at most {MARKS_MAX:,} marks, and the oldest leave it as new ones "
                      f"come (FORMAT.md §8.2), so cdp recover --mark no longer finds them; their points stay "
                      f"recoverable by --seq and --at. Something places far too many marks (a filter, a "
                      f"schedule); cleared when the DRVA restarts (it counts from its start)")

    def _skew_message(self, v: DrvaView, dom: Mapping[str, Any], name: str, offset: float) -> str:
        # A filter behind stamps a write earlier than it was: --at T takes writes made up
        # to |offset| after T (a later point); ahead, the converse.
        way, point = ("behind", "later") if offset < 0 else ("ahead of", "earlier")
        gone = "" if dom.get("connected") is not False else " (as its last filter said; none is connected now)"
        return (f"domain {name}: its filter's clock is {abs(offset):.1f} s {way} DRVA {v.name}'s{gone}, more than "
                f"the {self.clock_skew_s:g} s the store's locks allow: its writes are stamped with that clock, so "
                f"a recovery --at a time picks a {point} point than meant (by as much); check the clocks (NTP) of "
                f"the filter's host and of the DRVA")

    def _disconnected_for_s(self, mono_ns: int, v: DrvaView, dom: Mapping[str, Any], name: str,
                            running: bool) -> float | None:
        """How long the DRVA has had no filter session for domain ``name`` whose VMs run
        here, on the MSA's clock from when it first said so (and not before the DRVA's
        process started); None while a session is there, the VMs do not run here, the
        domain is fenced (its alarm says why the filter is refused), or the DRVA does not
        say (an older one: no ``connected``)."""
        key = (v.name, name)
        if dom.get("connected") is not False or not running or dom.get("fenced"):
            self._disconnected_since.pop(key, None)
            return None
        pid = v.pid or 0
        since = self._disconnected_since.get(key)
        if since is None or since[0] != pid:
            since = self._disconnected_since[key] = (pid, mono_ns)
        return (mono_ns - since[1]) / 1e9

    def _certificate_problem(self, now_ns: int, c: "CertInUse") -> str | None:
        """Why certificate ``c`` needs a person now (on the wall clock, as TLS judges it),
        or None while it is valid for longer than ``cert_warn_s``."""
        renew = ("rerun cdp install (it renews what expires within 30 days), then restart the daemon: its "
                 "servers load their certificates at start")
        if now_ns < c.not_before_ns:
            return (f"certificate {c.path} ({c.serves}) is not valid until {_utc(c.not_before_ns)} (the MSA's clock "
                    f"reads {_utc(now_ns)}): its clients refuse it; is this host's clock behind?")
        left_s = (c.not_after_ns - now_ns) / 1e9
        if left_s <= 0:
            return (f"certificate {c.path} ({c.serves}) expired at {_utc(c.not_after_ns)}: its clients refuse it "
                    f"(filters refused by a DRVA keep their writes: see filter_disconnected); {renew}")
        if left_s < self.cert_warn_s:
            return (f"certificate {c.path} ({c.serves}) expires at {_utc(c.not_after_ns)}, in {left_s / 86400:.1f} "
                    f"days: then its clients refuse it; {renew}")
        return None

    # ------------------------------------------------------------------ reading

    def active_alarms(self) -> list[Alarm]:
        return sorted(self.active.values(), key=lambda a: (a.raised_ns, a.id))

    def recent_alarms(self) -> list[Alarm]:
        """Cleared alarms, newest last."""
        return list(self.history)

    def counts_by_kind(self) -> dict[str, int]:
        counts = dict.fromkeys(KINDS, 0)
        for a in self.active.values():
            counts[a.kind] += 1
        return counts

    def forget_subjects(self, keep: set[str]) -> None:
        """Drop the bookkeeping of subjects no longer supervised (bounded memory)."""
        for k in [k for k in self._errors_seen if k[0] not in keep or k[1] not in keep]:
            del self._errors_seen[k]
        for k in [k for k in self._error_at_ns if k not in keep]:
            del self._error_at_ns[k]
        for k in [k for k in self._rewrites_seen if k[0] not in keep or k[1] not in keep]:
            del self._rewrites_seen[k]
        for k in [k for k in self._rewrite_at_ns if k not in keep]:
            del self._rewrite_at_ns[k]
        for k in [k for k in self._failing if k not in keep]:
            del self._failing[k]
        for k in [k for k in self._disconnected_since if k[0] not in keep or k[1] not in keep]:
            del self._disconnected_since[k]


@dataclass(frozen=True)
class CertInUse:
    """A TLS certificate a server of this site loaded (``CertificateWatch``)."""

    stem: str  # its file's stem: ca, api, drva-<name> (the alarm's subject)
    path: str
    serves: str  # who presents it, in the words of a message
    not_before_ns: int
    not_after_ns: int


class CertificateWatch:
    """The TLS certificates the site's servers loaded, for ``certificate_expiring``:
    the site CA and the API's, read at the daemon's first evaluation (the daemon loaded
    them at its start), and each DRVA's, read again whenever its process is a new one
    (its pid changed: it loaded the file at its start). A file renewed by ``cdp install``
    serves nothing until its server restarts (FORMAT.md §20), so the file as it is now
    is not what the alarm must judge, and no file is read on every tick. A file that
    cannot be read is logged and tried again after ``retry_s``; its server could not load
    it either (the DRVA's start fails: ``drva_down`` says why)."""

    def __init__(self, tls: TlsSpec | None, drvas: Sequence[DrvaSpec], *,
                 clock: Callable[[], float] = time.monotonic, retry_s: float = CERT_RETRY_S) -> None:
        self.tls = tls
        self.drvas = {d.name: d for d in drvas}
        self.clock, self.retry_s = clock, retry_s
        # stem -> (who loaded it: "daemon", a DRVA's pid or None, what was read (None:
        # the read failed), when on ``clock``)
        self._read: dict[str, tuple[Any, CertInUse | None, float]] = {}

    def in_use(self, views: Sequence[DrvaView]) -> list[CertInUse]:
        """The certificates loaded now: the CA's, the API's, and those of the DRVAs that
        serve protected domains (``views``)."""
        if self.tls is None:
            return []
        wanted = [("ca", self.tls.ca_cert, "daemon", "the site CA: every client trusts it, and only it"),
                  (API_STEM, self.tls.api_cert, "daemon", "the REST API's")]
        for v in views:
            spec = self.drvas.get(v.name)
            if spec is None or not v.domains:
                continue
            stem = self.tls.drva_stem(spec)
            # Between two processes (no pid): the one it last judged, or the file the next will load.
            loader = v.pid if v.pid is not None else self._read.get(stem, (None,))[0]
            wanted.append((stem, self.tls.files.cert(stem), loader, f"DRVA {v.name}'s filter port"))
        found = [self._loaded(stem, path, loader, serves) for stem, path, loader, serves in wanted]
        return [c for c in found if c is not None]

    def _loaded(self, stem: str, path: Path, loader: Any, serves: str) -> CertInUse | None:
        now = self.clock()
        seen = self._read.get(stem)
        if seen is not None and seen[0] == loader and (seen[1] is not None or now - seen[2] < self.retry_s):
            return seen[1]
        cert = self._read_cert(stem, path, serves)
        self._read[stem] = (loader, cert, now)
        return cert

    def _read_cert(self, stem: str, path: Path, serves: str) -> CertInUse | None:
        try:
            cert = read_cert(path)
        except ConfigError as exc:
            log.warning("certificate_unreadable", path=str(path), error=exc.message,
                        reason=f"its expiry cannot be watched; tried again in {self.retry_s:g} s")
            return None
        return CertInUse(stem, str(path), serves, _ns(cert.not_valid_before_utc), _ns(cert.not_valid_after_utc))


def _ns(when: dt.datetime) -> int:
    """A timezone-aware datetime as ns since the epoch (exact: a float would round)."""
    return (when - _EPOCH) // dt.timedelta(microseconds=1) * 1000


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def _utc(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))


def _finite(value: Any) -> float | None:
    """A status field as a finite number, or None (absent, null, mistyped, NaN, infinite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _count(value: Any) -> int:
    """A status counter, 0 when it is not one (``cdp.msa.status_doc`` lets none through)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= COUNT_MAX:
        return value
    return 0


def _bytes(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= COUNT_MAX:
        return f"{value:,} bytes"
    return "unknown bytes" if value is not None else "0 bytes"


def _said(text: Any) -> str:
    """Another process's text in an alarm's message: a string, cut to ``ERROR_TEXT_MAX``."""
    text = text if isinstance(text, str) else shown(text)
    return text if len(text) <= ERROR_TEXT_MAX else text[:ERROR_TEXT_MAX] + "…"
