"""Child process of the log crash test: appends frames forever, reporting durability.

Every line it prints is printed *after* the fact it reports is durable:
``D pos first_seq last_seq`` after ``append_batch`` returned for that entry, ``T pos``
after a trim returned. ``R`` first, once the log is open: the parent kills it with
SIGKILL at a random moment after that.

``--zygote`` starts it once for the whole test: it imports everything, then for each
line ``path seed start_seq report`` read from stdin forks an appender whose stdout is
the file ``report`` (opened for append: what it wrote before a SIGKILL is there), prints
``P pid``, reaps it and prints ``X pid status`` (``status`` as ``os.waitpid`` gives it). A
forked appender is killed like a started one, without a Python start-up per kill.
"""

from __future__ import annotations

import random
import sys

import numpy as np

from cdp.frame import decode_frame, encode_frame_parts
from cdp.records import KIND_WRITE, empty_records
from tests.frames_gen import TS0, payload_for


def make_frame(first_seq: int, lengths: list[int]) -> list:
    records = empty_records(len(lengths))
    seqs = np.arange(first_seq, first_seq + len(lengths), dtype=np.uint64)
    records["seq"] = seqs
    records["timestamp_ns"] = TS0 + seqs
    records["offset"] = seqs * 512
    records["length"] = lengths
    records["kind"] = KIND_WRITE
    payload = b"".join(payload_for(int(s), n) for s, n in zip(seqs, lengths))
    return list(encode_frame_parts(1, records, payload))


def main(path: str, seed: int, start_seq: int) -> None:
    from cdp.replog import ReplicationLog

    rng = random.Random(seed)
    log = ReplicationLog.open(path)
    seq = start_seq
    for _, body in log.entries():
        seq = max(seq, decode_frame(body).last_seq + 1)
    out = sys.stdout
    out.write("R\n")
    out.flush()
    while True:
        frames, meta = [], []
        for _ in range(rng.randint(1, 4)):
            lengths = [rng.randint(1, 32) * 512 for _ in range(rng.randint(1, 16))]
            frames.append(make_frame(seq, lengths))
            meta.append((seq, seq + len(lengths) - 1))
            seq += len(lengths)
        positions = log.append_batch(frames)
        out.write("".join(f"D {p} {a} {b}\n" for p, (a, b) in zip(positions, meta)))
        out.flush()
        stats = log.stats()
        if stats.used_bytes > stats.data_size // 2:
            target = log.head
            while target < log.tail and log.tail - target > stats.data_size // 4:
                target = log.next_position(target)
            log.trim(target)
            out.write(f"T {target}\n")
            out.flush()


def zygote() -> None:
    import os

    import cdp.replog  # noqa: F401  (imported once, here, for every child)

    for line in sys.stdin:
        path, seed, start_seq, report = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                fd = os.open(report, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                sys.stdout = os.fdopen(1, "w", buffering=1)
                main(path, int(seed), int(start_seq))
            finally:
                os._exit(70)  # main never returns: anything else is a failure
        print(f"P {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"X {pid} {status}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--zygote"]:
        zygote()
    else:
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
