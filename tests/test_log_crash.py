"""SIGKILL a process appending to the log at 50 random moments (issue acceptance).

After each kill the log is reopened here: every entry the child reported durable — the
report is recorded outside the child, in this process — is present and intact unless a
reported trim removed it, and no entry that comes back is corrupt.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cdp.frame import decode_frame
from cdp.logfmt import DATA_START
from cdp.replog import ReplicationLog
from tests.frames_gen import TS0, payload_for
from tests.waiting import EVENTUALLY_S, wait_until_sync

ROOT = Path(__file__).resolve().parent.parent
KILLS = 50
# A SIGKILLed child is reaped at once, and its stdout then ends.
KILLED_EXIT_S = 30.0


def run_child_until_killed(path: Path, seed: int, start_seq: int, delay_s: float) -> list[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.log_crash_child", str(path), str(seed), str(start_seq)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # The random moment counts from the child's first append, not from the start of a
    # Python process: on a slow machine the imports alone can outlast the delay.
    wait_until_sync(lambda: lines or proc.poll() is not None, EVENTUALLY_S, "the child to open the log")
    time.sleep(delay_s)  # the random moment of the kill: it waits for nothing
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=KILLED_EXIT_S)
    reader.join(timeout=KILLED_EXIT_S)
    err = proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL, f"child died on its own: {err}"
    return lines


def check_log(path: Path, durable: dict[int, tuple[int, int]], trimmed_to: int) -> int:
    """Reopen, verify every entry, return the last seq in the log."""
    with ReplicationLog.open(path) as log:
        assert log.head >= trimmed_to, "a reported trim was lost"
        seen: dict[int, tuple[int, int]] = {}
        prev_last = None
        for pos, body in log.entries():
            frame = decode_frame(body)  # raises on any corruption
            rec = frame.records
            assert (rec["timestamp_ns"] == TS0 + rec["seq"]).all()
            starts = frame.payload_starts()
            for i in range(len(rec)):
                a, n = int(starts[i]), int(rec["length"][i])
                assert bytes(frame.payload[a : a + n]) == payload_for(int(rec["seq"][i]), n)
            if prev_last is not None:
                assert frame.first_seq == prev_last + 1, "gap or duplicate in the log"
            prev_last = frame.last_seq
            seen[pos] = (frame.first_seq, frame.last_seq)
        for pos, seqs in durable.items():
            if pos >= log.head:
                assert seen.get(pos) == seqs, f"acked entry at {pos} {seqs} lost"
        return prev_last or 0


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_no_acked_frame(tmp_path):
    path = tmp_path / "replog"
    ReplicationLog.format(path, DATA_START + (16 << 20))
    rng = random.Random(int(os.environ.get("CDP_CRASH_SEED", "20261125")))
    durable: dict[int, tuple[int, int]] = {}
    trimmed_to = 0
    last_seq = 0
    reported = 0
    for i in range(KILLS):
        lines = run_child_until_killed(path, rng.randrange(1 << 30), last_seq + 1,
                                       rng.uniform(0.05, 0.6))
        for line in lines:
            parts = line.split()
            if not line.endswith("\n"):
                continue  # a line cut by the kill reports nothing
            if parts[0] == "D":
                durable[int(parts[1])] = (int(parts[2]), int(parts[3]))
                reported += 1
            elif parts[0] == "T":
                trimmed_to = max(trimmed_to, int(parts[1]))
        durable = {p: s for p, s in durable.items() if p >= trimmed_to}
        last_seq = max(last_seq, check_log(path, durable, trimmed_to))
    assert reported > 200, "the child barely ran: the test would prove nothing"
    with ReplicationLog.open(path) as log:
        assert log.tail > log.data_size, "the ring never wrapped"
