"""What a DRVA reads back from its own partitions before it listens (``Drva.start``):
the log partition and the metadata repository opened (or formatted), the log's label
checked against this DRVA, each domain's committed seq from the metadata and its pending
entries from the log (FORMAT.md §3, §4).

Then the domains' identities: the metadata repository records the id and name of each
domain the DRVA serves (written here, before the first ack). A configuration that gives a
recorded name another id, or a recorded id another name, is refused: the unshipped frames
of a domain whose id was mistyped were once dropped as an unprotected domain's, its acked
writes lost for good. Only a domain taken out of the configuration altogether (what the
MSA's ``cdp unprotect`` does), or given up by an unprotect request
(``requests/unprotect-<id>.json``, FORMAT.md §13.6), has its unshipped frames dropped."""

from __future__ import annotations

import json
import time
from typing import Any

from cdp.errors import ConfigError, FormatError, LogError, MetaError
from cdp.frame import Frame, decode_frame, decode_header
from cdp.logfmt import label_owner
from cdp.logs import get_logger
from cdp.meta import DOMAIN_FIELDS_MAX, DOMAIN_NAME_KEY, MetaRepository
from cdp.records import check_mark_names
from cdp.replog import ReplicationLog
from drva.committer import log_entry
from drva.domain import DomainState, frame_from
from drva.requests import UnprotectRequest, drop_request, read_unprotect_requests, unprotect_request_path
from drva.status import os_error_text

log = get_logger("drva")


class PartitionsMixin:
    """``Drva``'s recovery from its partitions (module docstring). Uses ``cfg``, ``domains``,
    ``log``, ``meta`` and ``log_label_ours`` of the ``Drva``."""

    def _open_partitions(self) -> None:
        """Open the log and the metadata repository and recover from them; what was
        opened is closed again when that fails (the DRVA does not start)."""
        self.log = self._open_log()
        try:
            self.meta = self._open_meta()
        except BaseException:
            self.log.close()
            raise
        try:
            self._recover()
        except BaseException:
            self.log.close()
            self.meta.close()
            raise

    def _open_log(self) -> ReplicationLog:
        """Open (formatting a missing one) this DRVA's log partition; ``ConfigError`` for
        one another DRVA's or site's label names (``_check_log_label``), ``LogError``
        for one the device cannot read."""
        path = self.cfg.log_path
        try:
            if not path.exists():
                if self.cfg.log_size is None:
                    raise ConfigError(f"log partition {path} does not exist and log.size is not set")
                path.parent.mkdir(parents=True, exist_ok=True)
                ReplicationLog.format(path, self.cfg.log_size, label=self.cfg.name)
            # The label is checked before the log is scanned or its epoch bumped: a refused
            # partition is left exactly as it was.
            return ReplicationLog.open(path, direct=self.cfg.log_direct, check_label=self._check_log_label)
        except OSError as exc:  # EIO in the recovery scan...: one line and exit 4, not a traceback
            raise LogError(f"log partition {path}: {os_error_text(exc)}") from exc

    def _check_log_label(self, label: str) -> None:
        """Refuse a log partition whose superblock label (FORMAT.md §3.2) names another
        DRVA, or this DRVA of another site: adopting it would call that DRVA's acked,
        unshipped frames "unconfigured" and trim them away. Read as install reads it
        (``cdp.logfmt.label_owner``): ``<drva>@<site>``, or the DRVA's name alone (an older
        install's, or a log this DRVA formatted). An empty label names no one (``cdp log format``
        without ``--label``): accepted, but such a log's frames of domains this DRVA does
        not serve are never dropped (``_recover``)."""
        self.log_label_ours = bool(label)
        if not label:
            return
        owner = label_owner(label, self.cfg.name, self.cfg.site)
        if owner.ours:
            return
        raise ConfigError(
            f"log partition {self.cfg.log_path} is labelled {label!r}: {owner.what}; DRVA {self.cfg.name!r} "
            f"of site {self.cfg.site!r} refuses it (its frames are another DRVA's, which this one would "
            f"trim away): correct log.path, or move that partition away")

    def _open_meta(self) -> MetaRepository:
        path = self.cfg.meta_path
        try:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                MetaRepository.format(path)
            return MetaRepository.open(path)
        except OSError as exc:  # EIO...: one line and exit 4, not a traceback
            raise MetaError(f"metadata repository {path}: {os_error_text(exc)}") from exc

    def _recover(self) -> None:
        """Per domain: committed seq from the metadata repository, entries from the log;
        then the identities the repository records checked against the configuration
        (``_check_identities``) and recorded anew (``_record_identities``) — before the
        DRVA listens, so that a domain's id and name are on record before its first ack."""
        doc = self.meta.read().get("domains", {})
        for dom in self.domains.values():
            state = doc.get(str(dom.id), {})
            dom.committed_seq = dom.sealed_seq = state.get("committed_seq", 0)
            dom.committed_ts = dom.accepted_ts = state.get("committed_ts", 0)
            dom.accepted_seq = dom.durable_seq = dom.committed_seq
            dom.catalog_known = state.get("generation", 0) > 0 or dom.committed_seq > 0
            dom.meta_timeline = state.get("timeline", 0)
        try:
            dropped = self._scan_log(doc)
        except OSError as exc:  # EIO reading an entry: one line and exit 4, not a traceback
            raise LogError(f"log partition {self.cfg.log_path}: recovery scan: {os_error_text(exc)}") from exc
        given_up = self._unprotect_requests(doc, dropped)
        self._check_identities(doc, dropped, given_up)
        unasked = {d: held for d, held in dropped.items() if d not in given_up}
        if unasked:
            self._refuse_unasked(unasked)
        for domain, (frames, first, last) in dropped.items():
            asked = given_up.get(domain)
            reason = f"an unprotect request ({asked.path.name}) gave up domain {domain} ({asked.name!r})"
            log.warning("unconfigured_domain_frames_dropped", domain=domain, frames=frames,
                        first_seq=first, last_seq=last, reason=reason)
        self._record_identities(doc)
        # A request that gave frames up stays until a start finds none of them left (the
        # log is trimmed past them as the other domains ship): the record of the domain is
        # forgotten now, and its frames must stay given up at every start until then.
        for dom in self.domains.values():
            if dom.stats.log_entries_skipped:
                log.warning("log_entries_skipped", domain=dom.id, entries=dom.stats.log_entries_skipped,
                            reason="their seqs were logged before (a resend staged twice by an earlier DRVA)")
            log.info("domain_recovered", domain=dom.id, committed_seq=dom.committed_seq,
                     durable_seq=dom.durable_seq, pending_entries=len(dom.unsealed))

    # ------------------------------------------------------------------ identities

    def _unprotect_requests(self, doc: dict[str, Any], dropped: dict[int, Any]) -> dict[int, UnprotectRequest]:
        """The unprotect requests (FORMAT.md §13.6) that give up a recorded domain: one
        this DRVA no longer serves, named as the metadata repository records it (a request
        with an id typo gives up nothing). The others are dropped, saying why."""
        found, malformed = read_unprotect_requests(self.cfg.state_dir)
        for path, reason in malformed:
            drop_request(path, "request_refused", reason=reason)
        given_up: dict[int, UnprotectRequest] = {}
        for asked in found:
            recorded = doc.get(str(asked.domain), {}).get(DOMAIN_NAME_KEY)
            if asked.domain in self.domains:
                drop_request(asked.path, "request_refused", domain=asked.domain, reason=(
                    f"domain {asked.domain} is in this DRVA's configuration (as "
                    f"{self.domains[asked.domain].cfg.name!r}): its writes ship, none is given up"))
            elif recorded is None and asked.domain in dropped:
                given_up[asked.domain] = asked  # held, but never named here (a document from before names)
            elif recorded is None:
                drop_request(asked.path, "unprotect_request_done", domain=asked.domain, name=asked.name,
                             reason=f"domain {asked.domain} is not on record here: nothing is held for it")
            elif recorded != asked.name:
                drop_request(asked.path, "request_refused", domain=asked.domain, reason=(
                    f"domain {asked.domain} is recorded as {recorded!r}, not {asked.name!r}: nothing is given up"))
            else:
                given_up[asked.domain] = asked
        return given_up

    def _check_identities(self, doc: dict[str, Any], dropped: dict[int, list[int]],
                          given_up: dict[int, UnprotectRequest]) -> None:
        """Refuse (``ConfigError``, exit 2) a configuration that gives a domain the
        metadata repository records another id or another name: an id typed wrong would
        call the recorded domain's acked, unshipped writes those of an unprotected one and
        drop them, or ship them into another domain's catalog. A domain taken out of the
        configuration altogether is unprotected (FORMAT.md §13.4); one given up by an
        unprotect request is no longer on record."""
        recorded = {int(k): entry[DOMAIN_NAME_KEY] for k, entry in doc.items()
                    if DOMAIN_NAME_KEY in entry and int(k) not in given_up}
        problems = []
        for dom in self.domains.values():
            was = recorded.get(dom.id)
            if was is not None and was != dom.cfg.name:
                problems.append(
                    f"domain {dom.id} is configured as {dom.cfg.name!r} but recorded as {was!r} "
                    f"({self._held(dom.id, dropped)}): name it {was!r} again; to unprotect it instead, start "
                    f"the DRVA once without domain {dom.id} (what it holds unshipped is then dropped)")
        for old_id, name in sorted(recorded.items()):
            for dom in self.domains.values():
                if dom.cfg.name != name or dom.id == old_id:
                    continue
                way = f"give {name!r} id {old_id} again"
                if old_id not in self.domains:
                    request = json.dumps({"domain": old_id, "name": name})
                    way += (f"; or, to unprotect domain {old_id} and give up what it holds, write {request} to "
                            f"{unprotect_request_path(self.cfg.state_dir, old_id)} and start the DRVA again")
                problems.append(f"domain {name!r} is configured with id {dom.id} but recorded as domain {old_id} "
                                f"({self._held(old_id, dropped)}): {way}")
        if problems:
            raise ConfigError(
                f"DRVA {self.cfg.name!r}: the configuration names domains otherwise than the metadata "
                f"repository {self.cfg.meta_path} records them, which the DRVA does not start with (it would "
                f"drop acked writes, or ship them into another domain's catalog): {'; '.join(problems)}")

    def _held(self, domain: int, dropped: dict[int, list[int]]) -> str:
        """What the log holds of ``domain`` that is not in the store, in words."""
        dom = self.domains.get(domain)
        if dom is not None and dom.unsealed:
            frames, first, last = len(dom.unsealed), dom.unsealed[0].first_seq, dom.unsealed[-1].last_seq
        elif dom is None and domain in dropped:
            frames, first, last = dropped[domain]
        else:
            return "the log holds no unshipped write of it"
        return f"the log holds its acked, unshipped seqs {first}..{last} ({frames} frame{'' if frames == 1 else 's'})"

    def _record_identities(self, doc: dict[str, Any]) -> None:
        """Make the metadata document name exactly the configured domains, each with its
        id and name (FORMAT.md §4), keeping what it records of their commits; a domain no
        longer configured is forgotten. Written only when that changes the document."""
        domains = {}
        for dom in self.domains.values():
            entry = doc.get(str(dom.id), {})
            domains[str(dom.id)] = {**{key: entry.get(key, 0) for key in DOMAIN_FIELDS_MAX},
                                    DOMAIN_NAME_KEY: dom.cfg.name}
        wanted = {"drva": self.cfg.name, "domains": domains}
        if self.meta.read() == wanted:
            return
        try:
            self.meta.write(wanted)
        except OSError as exc:  # EIO, ENOSPC...: one line and exit 4, not a traceback
            raise MetaError(f"metadata repository {self.cfg.meta_path}: {os_error_text(exc)}") from exc

    def _scan_log(self, doc: dict[str, Any]) -> dict[int, list[int]]:
        """Register the log's entries with their domains; return the unshipped frames of
        domains this DRVA does not serve: domain -> [frames, first seq, last seq]."""
        now = time.monotonic()
        dropped: dict[int, list[int]] = {}
        for pos, body in self.log.entries():
            where = f"{self.cfg.log_path} position {pos}"
            try:
                frame = decode_frame(body, where)
                check_mark_names(frame.records, frame.payload, where)  # as a session checks them now
            except FormatError as exc:
                self._refused_entry(decode_header(body, where).domain, exc)
                continue
            dom = self.domains.get(frame.domain)
            if dom is None:
                # The domain was unprotected (removed from the configuration): its frames
                # are not shipped any more. Those the store already has are simply behind
                # us; the others are reported, since protection of them stopped by request.
                committed = doc.get(str(frame.domain), {}).get("committed_seq", 0)
                if frame.last_seq > committed:
                    d = dropped.setdefault(frame.domain, [0, frame.first_seq, frame.last_seq])
                    d[0] += 1
                    d[2] = frame.last_seq
                continue
            if not dom.fenced and frame.last_seq > dom.durable_seq:
                self._recover_entry(dom, frame, len(body), pos, now)
            elif not dom.fenced and frame.last_seq > dom.committed_seq:
                dom.stats.log_entries_skipped += 1  # seqs an earlier entry holds: a resend logged twice
        return dropped

    def _refuse_unasked(self, dropped: dict[int, list[int]]) -> None:
        """The log holds unshipped frames of domains this DRVA does not serve, and no
        unprotect request gave them up: acked writes that only this log holds. A domain
        removed from the configuration by hand, or moved to another DRVA, is not an
        unprotect (``cdp unprotect`` writes the request, FORMAT.md §13.6): the DRVA does
        not start (``ConfigError``) rather than trim them away. An unlabelled log may also
        be another DRVA's."""
        held = ", ".join(f"domain {d} (seqs {first}..{last}, {n} frames)"
                         for d, (n, first, last) in sorted(dropped.items()))
        if self.log_label_ours:
            asks = " or ".join(f"{unprotect_request_path(self.cfg.state_dir, d)}" for d in sorted(dropped))
            raise ConfigError(
                f"log partition {self.cfg.log_path} holds acked, unshipped frames of {held}, which DRVA "
                f"{self.cfg.name!r}'s configuration no longer serves, and no unprotect request gave them up: "
                f"they would be lost. Put the domain back in the configuration (they ship), or unprotect it "
                f"(`cdp unprotect NAME`; by hand: {asks} holding {{\"domain\": ID, \"name\": NAME}}) to give "
                f"them up")
        raise ConfigError(
            f"log partition {self.cfg.log_path} carries no label and holds unshipped frames of {held}, which "
            f"DRVA {self.cfg.name!r} of site {self.cfg.site!r} does not serve: they may be another DRVA's, and "
            f"this one would trim them away; start the DRVA they belong to on it, or (to drop them) move the "
            f"partition away")

    def _recover_entry(self, dom: DomainState, frame: Frame, nbytes: int, pos: int, now: float) -> None:
        """Register a logged frame that holds seqs after ``dom.durable_seq``: from there on
        if it overlaps (a resend logged twice, in part, before this DRVA refused that);
        after a gap, the domain cannot continue — it is stopped here, and only it."""
        if frame.first_seq > dom.durable_seq + 1:
            reason = (f"the log holds seqs {frame.first_seq}..{frame.last_seq} of domain {dom.id} at position "
                      f"{pos} after seq {dom.durable_seq}, with a gap between: the domain is stopped on this DRVA")
            dom.stop(reason)
            log.error("log_gap", domain=dom.id, pos=pos, first_seq=frame.first_seq, durable_seq=dom.durable_seq,
                      reason=reason)
            return
        entry = log_entry(frame_from(frame, dom.durable_seq + 1), nbytes, pos, now)
        dom.add_durable(entry)  # continues durable_seq: it cannot refuse
        dom.accepted_seq, dom.accepted_ts = dom.durable_seq, entry.last_ts

    def _refused_entry(self, domain_id: int, exc: FormatError) -> None:
        """A log entry whose checksums hold but whose frame breaks a rule this DRVA
        enforces (an older one logged it): its domain cannot be shipped on from there."""
        dom = self.domains.get(domain_id)
        if dom is None or dom.fenced:
            return
        reason = (f"the log holds a frame of domain {domain_id} that this DRVA refuses ({exc.message}): "
                  f"the domain is stopped on this DRVA")
        dom.stop(reason)
        log.error("log_entry_refused", domain=domain_id, reason=reason)

    # ------------------------------------------------------------------ loops
