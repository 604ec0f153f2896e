"""``DomainState.rpo_lag_s``: from the recovery point the store holds (just before the
oldest write not in it) to the newest write captured — a quiet spell before a write is
not lag, and writes waiting with none after them still age."""

from __future__ import annotations

from drva.config import DomainConfig
from drva.domain import DomainState, LogEntry, SegmentJob

S = 1_000_000_000  # ns
T0 = 1_800_000_000 * S  # a capture time (the filter's clock)
NOW = 5_000.0  # this host's monotonic clock


def _domain(committed_seq: int = 10, committed_ts: int = T0) -> DomainState:
    dom = DomainState(DomainConfig(1, "erp", ()))
    dom.committed_seq = dom.sealed_seq = dom.durable_seq = dom.accepted_seq = committed_seq
    dom.committed_ts = committed_ts
    dom.newest_received_ts = committed_ts
    return dom


def _durable(dom: DomainState, first_seq: int, last_seq: int, first_ts: int, last_ts: int,
             arrived: float) -> LogEntry:
    entry = LogEntry(pos=0, first_seq=first_seq, last_seq=last_seq, nbytes=4096, first_ts=first_ts,
                     last_ts=last_ts, arrived=arrived, marks=[], resync=[])
    dom.unsealed.append(entry)
    dom.accepted_seq = dom.durable_seq = last_seq
    dom.newest_received_ts = last_ts
    return entry


def test_everything_in_the_store_is_no_lag() -> None:
    assert _domain().rpo_lag_s(NOW) == 0.0


def test_a_write_after_a_quiet_hour_is_not_an_hour_of_lag() -> None:
    dom = _domain()
    _durable(dom, 11, 11, T0 + 3600 * S, T0 + 3600 * S, arrived=NOW - 0.2)
    # The store equals the primary up to just before seq 11: 0.2 s behind, not 3600 s.
    assert abs(dom.rpo_lag_s(NOW) - 0.2) < 1e-9


def test_pending_writes_count_from_the_oldest_one() -> None:
    dom = _domain()
    first = _durable(dom, 11, 20, T0 + 60 * S, T0 + 61 * S, arrived=NOW - 0.5)
    dom.unsealed.popleft()  # sealed and being uploaded: still pending
    dom.inflight.append(SegmentJob(1, "k", b"", [first], 0, 0))
    dom.sealed_seq = 20
    _durable(dom, 21, 30, T0 + 61 * S, T0 + 62 * S + S // 2, arrived=NOW - 0.1)
    assert abs(dom.rpo_lag_s(NOW) - 2.5) < 1e-9  # capture times 60 .. 62.5 s


def test_writes_waiting_with_none_after_them_keep_ageing() -> None:
    dom = _domain()
    _durable(dom, 11, 11, T0 + 10 * S, T0 + 10 * S, arrived=NOW - 30.0)  # the store is down
    assert abs(dom.rpo_lag_s(NOW) - 30.0) < 1e-9
    assert abs(dom.rpo_lag_s(NOW + 60) - 90.0) < 1e-9


def test_a_frame_staged_for_a_group_commit_counts_from_its_own_time() -> None:
    dom = _domain()
    dom.accepted_seq = 12
    dom.newest_received_ts = T0 + 100 * S + S // 4
    dom.staged_first = (11, T0 + 100 * S, NOW - 0.01)
    assert abs(dom.rpo_lag_s(NOW) - 0.25) < 1e-9


def test_a_next_write_still_in_the_filter_counts_from_the_newest_committed_one() -> None:
    dom = _domain()
    # The filter says it captured up to seq 15, at +40 s; nothing of it reached this DRVA.
    dom.filter_state = {"mode": "normal", "captured_seq": 15, "captured_ts": T0 + 40 * S}
    assert abs(dom.rpo_lag_s(NOW) - 40.0) < 1e-9
    # A stale staged frame of an earlier round (seq <= committed) is not the next write.
    dom.staged_first = (5, T0 + 39 * S, NOW)
    assert abs(dom.rpo_lag_s(NOW) - 40.0) < 1e-9
