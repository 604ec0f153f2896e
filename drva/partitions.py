"""What a DRVA reads back from its own partitions before it listens (``Drva.start``):
the log partition and the metadata repository opened (or formatted), the log's label
checked against this DRVA, each domain's committed seq from the metadata and its pending
entries from the log (FORMAT.md §3, §4)."""

from __future__ import annotations

import time
from typing import Any

from cdp.errors import ConfigError, FormatError, LogError, MetaError
from cdp.frame import Frame, decode_frame, decode_header
from cdp.logfmt import label_owner
from cdp.logs import get_logger
from cdp.meta import MetaRepository
from cdp.records import check_mark_names
from cdp.replog import ReplicationLog
from drva.committer import log_entry
from drva.domain import DomainState, frame_from
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
        """Per domain: committed seq from the metadata repository, entries from the log."""
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
        if dropped and not self.log_label_ours:
            self._refuse_unlabelled(dropped)
        for domain, (frames, first, last) in dropped.items():
            log.warning("unconfigured_domain_frames_dropped", domain=domain, frames=frames,
                        first_seq=first, last_seq=last,
                        reason="the domain is no longer in this DRVA's configuration (unprotected)")
        for dom in self.domains.values():
            if dom.stats.log_entries_skipped:
                log.warning("log_entries_skipped", domain=dom.id, entries=dom.stats.log_entries_skipped,
                            reason="their seqs were logged before (a resend staged twice by an earlier DRVA)")
            log.info("domain_recovered", domain=dom.id, committed_seq=dom.committed_seq,
                     durable_seq=dom.durable_seq, pending_entries=len(dom.unsealed))

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

    def _refuse_unlabelled(self, dropped: dict[int, list[int]]) -> None:
        """An unlabelled log holds unshipped frames of domains this DRVA does not serve:
        nothing says they are of a domain it unprotected rather than another DRVA's, so
        they are not dropped — the DRVA does not start (``ConfigError``)."""
        held = ", ".join(f"domain {d} (seqs {first}..{last}, {n} frames)"
                         for d, (n, first, last) in sorted(dropped.items()))
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
