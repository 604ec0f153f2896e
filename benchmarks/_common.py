"""Shared plumbing of the benchmarks: arguments, progress, timing, the JSON last line.

Every benchmark is ``python -m benchmarks.<name> [--quick] [--json] [--dir DIR]`` and
prints one JSON object as its last line. Speed is reported as ratios against a baseline
measured in the same run, because the machines are noisy and shared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds (CI)")
    p.add_argument("--json", action="store_true", help="print only the JSON result line")
    p.add_argument("--dir", type=Path, default=None,
                   help="directory for benchmark files (default: a temp dir)")
    return p.parse_args()


def work_dir(args: argparse.Namespace) -> tempfile.TemporaryDirectory[str]:
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix="cdp-bench-", dir=args.dir)


def progress(total: int, desc: str, unit: str = "B") -> tqdm:
    """A progress bar on stderr, shown only on a terminal."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr,
                disable=not sys.stderr.isatty(), leave=False)


def median_rate(rounds: int, amount: float, run: Callable[[], None]) -> float:
    """Median of ``amount / seconds`` over ``rounds`` runs of ``run``."""
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run()
        rates.append(amount / (time.perf_counter() - t0))
    return statistics.median(rates)


def emit(args: argparse.Namespace, result: dict[str, Any], table: list[tuple[str, str]]) -> None:
    """Print a human table (unless --json) and the JSON object as the last line."""
    if not args.json:
        width = max(len(k) for k, _ in table)
        for k, v in table:
            print(f"{k:<{width}}  {v}")
    print(json.dumps(result, sort_keys=True))
