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


class Zygote:
    """``tests.log_crash_child --zygote``: forks each appender from one warm process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.log_crash_child", "--zygote"], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)

    def line(self) -> list[str]:
        got = self.proc.stdout.readline()
        if not got:
            raise AssertionError(f"the zygote ended: {self.proc.stderr.read()[-3000:]}")
        return got.split()

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(KILLED_EXIT_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def run_child_until_killed(zygote: Zygote, path: Path, seed: int, start_seq: int, delay_s: float) -> list[str]:
    report = path.with_name(f"report-{seed}")
    zygote.proc.stdin.write(f"{path} {seed} {start_seq} {report}\n")
    zygote.proc.stdin.flush()
    tag, pid = zygote.line()
    assert tag == "P", (tag, pid)

    def opened() -> bool:
        return report.exists() and report.stat().st_size > 0

    # The random moment counts from the child's first append ("R" once the log is open).
    wait_until_sync(opened, EVENTUALLY_S, "the child to open the log")
    time.sleep(delay_s)  # the random moment of the kill: it waits for nothing
    os.kill(int(pid), signal.SIGKILL)
    tag, reaped, status = zygote.line()
    assert (tag, reaped) == ("X", pid)
    assert os.WIFSIGNALED(int(status)) and os.WTERMSIG(int(status)) == signal.SIGKILL, \
        f"child died on its own: status {status}; {zygote.proc.stderr.read() if zygote.proc.poll() else ''}"
    lines = report.read_text().splitlines(keepends=True)
    report.unlink()
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
    zygote = Zygote()
    try:
        for i in range(KILLS):
            lines = run_child_until_killed(zygote, path, rng.randrange(1 << 30), last_seq + 1,
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
    finally:
        zygote.close()
    assert reported > 200, "the child barely ran: the test would prove nothing"
    with ReplicationLog.open(path) as log:
        assert log.tail > log.data_size, "the ring never wrapped"
