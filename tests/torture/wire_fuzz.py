"""Campaign 3, wire fuzzing: generated sessions against running DRVA processes.

Two DRVAs run as subprocesses (so a crash is seen, and their memory measured), one plain
and one serving TLS. Each serves domain 1, kept for the good sessions, and domain 2, the
fuzzed one. A case is one generated input, sent and answered:

- byte mutations (bit flips, interesting values, header fields, cuts, insertions,
  duplications) of a valid ``HELLO`` (from a stranger), of a valid ``AUTH`` (after a real
  ``CHALLENGE``) and of a valid ``FRAME`` (after a real ``WELCOME``). The client then ends
  its side of the stream (TLS: see ``Peer.rest``) and reads until the DRVA closes it;
- the steps of a hypothesis state machine (``FilterSession``, on both DRVAs) that drives one session as
  a filter might, well or badly — frames in order, resends, overlaps, gaps, frames of a
  domain not named in ``HELLO``, wrong secrets, pings, filter states good and bad, garbage
  after ``WELCOME`` — and checks each answer against FORMAT.md §9.

After every batch of cases: the DRVA process is alive (else ``daemon_crashes``), a new
good session on domain 1 is welcomed and its frame acked (else ``daemon_crashes``: the
DRVA stopped serving), and its RSS is within ``RSS_GROWTH_MAX_BYTES`` of what it was after
the first batch (else ``failures``). At the end both DRVAs are stopped and their logs read
back with the real scan (``ReplicationLog.open``): every entry decodes, every record holds
exactly the bytes a good frame gave its seq, and each domain's seqs run without a gap
from 1 — a refused (mutated) frame in the log would break one of those (``failures``).
"""

from __future__ import annotations

import json
import os
import random
import ssl
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from cdp import wire
from cdp.errors import CdpError
from cdp.frame import decode_frame
from cdp.replog import ReplicationLog
from tests.drva.harness import SECRET, DrvaProcess, domain_doc, drva_doc, free_port
from tests.frames_gen import payload_for
from tests.torture.result import Result
from tests.torture.wire_peer import IO_TIMEOUT_S, Peer, auth, durable_of, frame, frame_message, hello, mutate, welcome

NAME = "wire_fuzz"
GOOD_DOMAIN, FUZZ_DOMAIN = 1, 2
DISK_BYTES = 8 << 20
# A DRVA may hold one frame being read (≤ 66 MiB) plus what strangers make it buffer
# (≤ 12 MiB, FORMAT.md §9.1): past that over its size after the first batch, memory grows.
RSS_GROWTH_MAX_BYTES = 96 << 20


@dataclass(frozen=True)
class Plan:
    mutations: int  # mutation cases on the plain DRVA
    tls_mutations: int  # mutation cases on the TLS one
    machine_examples: int  # hypothesis runs of FilterSession (plain DRVA)
    tls_machine_examples: int  # and on the TLS one
    machine_steps: int  # steps per run at most
    batch: int  # cases between liveness checks


QUICK = Plan(mutations=800, tls_mutations=60, machine_examples=10, tls_machine_examples=3, machine_steps=20,
             batch=100)
LONG = Plan(mutations=8000, tls_mutations=1500, machine_examples=60, tls_machine_examples=20, machine_steps=40,
            batch=250)


def mutation_case(port: int, tls: ssl.SSLContext | None, rng: random.Random, res: Result,
                  answers: Counter) -> None:
    """One mutated HELLO, AUTH or FRAME; the DRVA answers it and ends the session.

    Only a mutation that left the AUTH whole in front (bytes appended after it) may be
    welcomed; what follows it is then refused like any bad message after WELCOME."""
    where = rng.choice(("hello", "auth", "frame", "frame"))
    if where == "hello":
        peer = Peer(port, tls)
        good, _ = hello([FUZZ_DOMAIN])
        sent = mutate(good, rng)
        peer.send(sent)
    elif where == "auth":
        peer = Peer(port, tls)
        raw, nonce = hello([FUZZ_DOMAIN])
        peer.send(raw)
        ch = peer.message()
        if ch is None or ch.type != wire.CHALLENGE:
            res.problem("failures", f"a valid HELLO got {ch and ch.name} instead of CHALLENGE")
            peer.close()
            return
        good = auth(SECRET.encode(), nonce, ch)
        sent = mutate(good, rng)
        peer.send(sent)
    else:
        peer, ans = welcome(port, tls, [FUZZ_DOMAIN])
        if ans is None or ans.type != wire.WELCOME:
            res.problem("failures", f"a good handshake got {ans and ans.name} instead of WELCOME")
            peer.close()
            return
        good = frame_message(frame(FUZZ_DOMAIN, durable_of(ans, FUZZ_DOMAIN) + 1, rng))
        sent = mutate(good, rng)
        peer.send(sent)
    try:
        got = peer.rest()
    except TimeoutError:
        res.problem("failures", f"mutated {where}: the DRVA neither answered nor closed in {IO_TIMEOUT_S} s")
        got = []
    finally:
        peer.close()
    res.cases += 1
    for m in got:
        answers[m.json("t")["code"] if m.type == wire.ERROR else m.name] += 1
    welcomed = any(m.type == wire.WELCOME for m in got)
    if welcomed and not (where == "auth" and sent.startswith(good)):
        res.problem("failures", f"a mutated {where.upper()} was welcomed: {sent[:200]!r}")


# ------------------------------------------------------------------ the state machine


class FilterSession(RuleBasedStateMachine):
    """A filter session on the fuzzed domain, well or badly behaved, step by step."""

    port = 0
    tls: ssl.SSLContext | None = None
    res: Result

    def __init__(self) -> None:
        super().__init__()
        self.peer: Peer | None = None
        self.next_seq = 1
        self.rng = random.Random(0)

    def _count(self) -> None:
        self.res.cases += 1

    def _drop(self) -> None:
        if self.peer is not None:
            self.peer.close()
            self.peer = None

    def _expect_error(self, code: str) -> None:
        """The ERROR ``code``, then the end of the connection (FORMAT.md §9)."""
        msg = self.peer.until(lambda m: m.type != wire.ACK)
        assert msg is not None and msg.type == wire.ERROR, f"expected ERROR {code}, got {msg and msg.name}"
        assert msg.json("t")["code"] == code, msg.json("t")
        self.peer.rest()  # the DRVA closes the session (a read past IO_TIMEOUT_S fails the step)
        self._drop()

    def _expect_alive(self) -> None:
        self.peer.send(*wire.control(wire.PING, {}))
        msg = self.peer.until(lambda m: m.type != wire.ACK)
        assert msg is not None and msg.type == wire.PONG, f"PING got {msg and msg.name}"

    @initialize(seed=st.integers(0, 1 << 30))
    def start(self, seed: int) -> None:
        self.rng = random.Random(seed)

    @rule(good_secret=st.booleans())
    def open_session(self, good_secret: bool) -> None:
        self._drop()
        self._count()
        secret = SECRET.encode() if good_secret else b"not-the-site-secret"
        self.peer, ans = welcome(self.port, self.tls, [FUZZ_DOMAIN], secret)
        if good_secret:
            assert ans is not None and ans.type == wire.WELCOME, ans and ans.json("t")
            self.next_seq = durable_of(ans, FUZZ_DOMAIN) + 1
        else:
            assert ans is not None and ans.type == wire.ERROR and ans.json("t")["code"] == "bad_auth"
            self._drop()

    @precondition(lambda self: self.peer is not None)
    @rule()
    def send_frame(self) -> None:
        self._count()
        raw = frame(FUZZ_DOMAIN, self.next_seq, self.rng)
        last = decode_frame(raw).last_seq
        self.peer.send(frame_message(raw))
        msg = self.peer.until(lambda m: m.type != wire.ACK or wire.parse_ack(m.body, "t")[2] >= last)
        assert msg is not None and msg.type == wire.ACK, f"frame up to {last}: got {msg and msg.name}"
        self.next_seq = last + 1

    @precondition(lambda self: self.peer is not None and self.next_seq > 1)
    @rule(back=st.integers(1, 20), extra=st.integers(0, 3))
    def resend(self, back: int, extra: int) -> None:
        """A resend: old records only (dropped) or overlapping new ones (cut)."""
        self._count()
        first = max(1, self.next_seq - back)
        raw = frame(FUZZ_DOMAIN, first, self.rng)
        last = decode_frame(raw).last_seq
        self.peer.send(frame_message(raw))
        self._expect_alive()
        if last >= self.next_seq:
            self.next_seq = last + 1

    @precondition(lambda self: self.peer is not None)
    @rule(gap=st.integers(1, 1 << 20))
    def send_after_gap(self, gap: int) -> None:
        self._count()
        self.peer.send(frame_message(frame(FUZZ_DOMAIN, self.next_seq + gap, self.rng)))
        self._expect_error("seq_gap")

    @precondition(lambda self: self.peer is not None)
    @rule()
    def frame_of_another_domain(self) -> None:
        self._count()
        self.peer.send(frame_message(frame(GOOD_DOMAIN, 1, self.rng)))
        self._expect_error("unknown_domain")

    @precondition(lambda self: self.peer is not None)
    @rule(mode=st.sampled_from(["normal", "bitmap", "resync", "fast", ""]),
          captured=st.one_of(st.integers(-5, 1 << 65), st.text(max_size=3), st.none()))
    def filter_state(self, mode: str, captured) -> None:
        self._count()
        doc = {"domain": FUZZ_DOMAIN, "mode": mode, "captured_seq": captured, "captured_ts": 0,
               "buffered_bytes": 0, "dirty_bytes": 0}
        self.peer.send(*wire.control(wire.FILTER_STATE, doc))
        good = mode in ("normal", "bitmap", "resync") and type(captured) is int and 0 <= captured < 1 << 64
        if good:
            self._expect_alive()
        else:
            self._expect_error("bad_message")

    @precondition(lambda self: self.peer is not None)
    @rule(junk=st.binary(min_size=1, max_size=200))
    def garbage(self, junk: bytes) -> None:
        """Bytes that are not a message header (no ``CDPW`` magic): the session ends."""
        self._count()
        if junk[:4] == wire.WIRE_MAGIC:
            junk = b"X" + junk
        self.peer.send(junk.ljust(wire.HEADER_SIZE, b"\0"))
        msg = self.peer.until(lambda m: m.type != wire.ACK)
        assert msg is not None and msg.type == wire.ERROR, msg and msg.name
        self._drop()

    @precondition(lambda self: self.peer is not None)
    @rule()
    def ping(self) -> None:
        self._count()
        self._expect_alive()

    @invariant()
    def drva_alive(self) -> None:
        assert self.alive(), "the DRVA process is gone"

    alive: Callable[[], bool] = staticmethod(lambda: True)

    def teardown(self) -> None:
        self._drop()


def run_machine(target: "Target", examples: int, plan: Plan, derandomize: bool, res: Result) -> None:
    """Run ``FilterSession`` on ``target``; ``derandomize``: the same examples every time (CI)."""
    FilterSession.port, FilterSession.tls, FilterSession.res = target.port, target.ctx, res
    FilterSession.alive = staticmethod(target.alive)
    try:
        run_state_machine_as_test(FilterSession, settings=settings(
            max_examples=examples, stateful_step_count=plan.machine_steps, deadline=None,
            database=None, derandomize=derandomize, phases=[Phase.generate],
            suppress_health_check=list(HealthCheck)))
    except Exception as exc:  # an assertion of the machine: the DRVA answered off the protocol
        res.problem("failures", f"state machine: {type(exc).__name__}: {str(exc)[:500]}")


# ------------------------------------------------------------------ a DRVA under fuzz


class Target:
    """A DRVA process and what is checked of it between batches."""

    def __init__(self, name: str, tmp: Path, tls: tuple[Path, Path] | None) -> None:
        port = free_port()
        extra = {"tls": {"cert": str(tls[0]), "key": str(tls[1])}} if tls else {}
        doc = drva_doc(tmp, name, [domain_doc(GOOD_DOMAIN, "good", [("vm1", "d0", DISK_BYTES)]),
                                   domain_doc(FUZZ_DOMAIN, "fuzz", [("vm2", "d0", DISK_BYTES)])],
                       port=port, seal_bytes="256MiB", seal_age_s=3600.0, **extra)
        self.name, self.port, self.doc = name, port, doc
        self.ctx = ssl.create_default_context(cafile=str(tls[0])) if tls else None
        self.proc = DrvaProcess(doc, tmp)
        self.rss_first = 0
        self.rss_max = 0
        self.crashed = False
        self.good_sessions = 0

    def start(self) -> None:
        self.proc.start()

    def alive(self) -> bool:
        return self.proc.proc is not None and self.proc.proc.poll() is None

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def check(self, res: Result, rng: random.Random) -> None:
        """Between batches: alive, serving a good session, memory bounded."""
        if self.crashed:
            return
        if not self.alive():
            self.crashed = True
            tail = self.proc.log_path.read_text()[-2000:]
            res.problem("daemon_crashes", f"{self.name} exited with {self.proc.proc.returncode}: {tail}")
            return
        if not self._good_session(rng):
            res.problem("daemon_crashes", f"{self.name}: a good session was not served")
        rss = self.rss()
        self.rss_first = self.rss_first or rss
        self.rss_max = max(self.rss_max, rss)
        if rss > self.rss_first + RSS_GROWTH_MAX_BYTES:
            res.problem("failures", f"{self.name}: RSS {rss >> 20} MiB, {self.rss_first >> 20} MiB after the "
                                    f"first batch")

    def _good_session(self, rng: random.Random) -> bool:
        deadline = time.monotonic() + IO_TIMEOUT_S
        while True:  # a DRVA just started may still be opening its catalogs: not_ready
            peer, ans = welcome(self.port, self.ctx, [GOOD_DOMAIN])
            if ans is not None and ans.type == wire.WELCOME:
                break
            peer.close()
            if ans is None or ans.json("t").get("code") != "not_ready" or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        try:
            raw = frame(GOOD_DOMAIN, durable_of(ans, GOOD_DOMAIN) + 1, rng)
            last = decode_frame(raw).last_seq
            peer.send(frame_message(raw))
            msg = peer.until(lambda m: m.type != wire.ACK or wire.parse_ack(m.body, "t")[2] >= last)
            self.good_sessions += 1
            return msg is not None and msg.type == wire.ACK
        finally:
            peer.close()

    def stop_and_check_log(self, res: Result) -> int:
        """Stop the DRVA; every log entry is a good frame, seqs gapless per domain."""
        self.proc.stop()
        frames = 0
        next_seq = {GOOD_DOMAIN: 1, FUZZ_DOMAIN: 1}
        try:
            with ReplicationLog.open(self.doc["log"]["path"], readonly=True) as log:
                for pos, body in log.entries():
                    f = decode_frame(body, f"{self.name} log entry at {pos}")
                    frames += 1
                    if f.first_seq != next_seq.get(f.domain):
                        res.problem("failures", f"{self.name}: log entry at {pos}: domain {f.domain} seqs "
                                                f"{f.first_seq}..{f.last_seq}, expected {next_seq.get(f.domain)}")
                    next_seq[f.domain] = f.last_seq + 1
                    starts = f.payload_starts()
                    for i, seq in enumerate(f.records["seq"].tolist()):
                        n, a = int(f.records["length"][i]), int(starts[i])
                        if bytes(f.payload[a : a + n]) != payload_for(seq, n):
                            res.problem("failures", f"{self.name}: seq {seq} of domain {f.domain} in the log "
                                                    f"holds bytes no good frame sent")
                            break
        except CdpError as exc:
            res.problem("failures", f"{self.name}: its log does not read back: {exc}")
        return frames


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from tests.drva.test_tls_trace import self_signed

    return self_signed(tmp)


def run(quick: bool = True, seed: int = 14, progress: Callable[[str], None] = lambda s: None) -> Result:
    plan = QUICK if quick else LONG
    res = Result(NAME)
    t0 = time.monotonic()
    rng = random.Random(seed)
    answers: Counter = Counter()  # what the DRVAs answered the mutated cases: ERROR codes, else types
    with tempfile.TemporaryDirectory(prefix="torture-wire-") as tmp:
        tmp_path = Path(tmp)
        plain = Target("drva-fuzz", tmp_path, None)
        tls = Target("drva-fuzz-tls", tmp_path, _self_signed(tmp_path))
        targets = [plain, tls]
        try:
            for t in targets:
                t.start()
            for t in targets:
                t.check(res, rng)
            for target, count in ((plain, plan.mutations), (tls, plan.tls_mutations)):
                for i in range(count):
                    if target.crashed:
                        break
                    try:
                        mutation_case(target.port, target.ctx, rng, res, answers)
                    except OSError as exc:
                        res.problem("failures", f"{target.name}: case {i}: {type(exc).__name__}: {exc}")
                    if (i + 1) % plan.batch == 0 or i + 1 == count:
                        target.check(res, rng)
                        progress(f"{NAME}: {target.name}: {i + 1}/{count} mutation cases, "
                                 f"RSS {target.rss_max >> 20} MiB")
            for target, examples in ((plain, plan.machine_examples), (tls, plan.tls_machine_examples)):
                machine_cases = res.cases
                run_machine(target, examples, plan, quick, res)
                target.check(res, rng)
                progress(f"{NAME}: {target.name}: state machine: {res.cases - machine_cases} steps")
        finally:
            frames = {t.name: t.stop_and_check_log(res) for t in targets}
    res.notes = {"rss_mib": {t.name: [t.rss_first >> 20, t.rss_max >> 20] for t in targets},
                 "good_sessions": sum(t.good_sessions for t in targets), "log_frames": frames,
                 "answers": dict(answers.most_common())}
    res.elapsed_s = time.monotonic() - t0
    return res


if __name__ == "__main__":  # one campaign alone: python -m tests.torture.wire_fuzz
    r = run(progress=print)
    print(json.dumps(r.figures()), r.problems, os.linesep.join(map(str, r.notes.items())))
