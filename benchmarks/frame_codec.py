"""Frame codec throughput: encode + validate whole frames (docs/FORMAT.md §2).

Fields: ``records_per_s_4k`` (frames of 256 × 4 KiB records) and ``mb_per_s_64k``
(frames of 16 × 64 KiB records), each the median over rounds of encoding a frame into
one contiguous buffer and decoding/validating it again. Payloads are half-compressible,
built before timing.
"""

from __future__ import annotations

from benchmarks._common import emit, median_rate, parse_args, progress
from cdp.frame import decode_frame, encode_frame
from cdp.testing.records import write_batch


def measure(record_len: int, per_frame: int, frames: int, rounds: int) -> tuple[float, float]:
    """(records/s, MB/s) of encode + validate."""
    records, payload = write_batch(1, per_frame, record_len)

    def run() -> None:
        for _ in range(frames):
            decode_frame(encode_frame(1, records, payload))

    bar = progress(rounds, f"frames of {per_frame} x {record_len // 1024} KiB", unit="round")
    rates = []
    for _ in range(rounds):
        rates.append(median_rate(1, frames * per_frame, run))
        bar.update(1)
    bar.close()
    rates.sort()
    recs = rates[len(rates) // 2]
    return recs, recs * record_len / 1e6


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    frames, rounds = (40, 5) if args.quick else (200, 9)
    rps_4k, mbps_4k = measure(4096, 256, frames, rounds)
    rps_64k, mbps_64k = measure(65536, 16, frames, rounds)
    result = {
        "benchmark": "frame_codec",
        "records_per_s_4k": round(rps_4k),
        "mb_per_s_4k": round(mbps_4k, 1),
        "mb_per_s_64k": round(mbps_64k, 1),
        "quick": args.quick,
    }
    emit(args, result, [
        ("4 KiB records, encode+validate", f"{rps_4k:,.0f} records/s ({mbps_4k:,.0f} MB/s)"),
        ("64 KiB records, encode+validate", f"{mbps_64k:,.0f} MB/s"),
    ])


if __name__ == "__main__":
    main()
