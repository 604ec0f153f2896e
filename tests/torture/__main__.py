"""``python -m tests.torture [--quick | --long] [--json] [--only NAME ...] [--seed N]``

Runs every campaign (``tests.torture.CAMPAIGNS``), progress on stderr, then a table of
the figures; with ``--json`` the last line of stdout is one JSON object: per campaign and
in total ``cases``, ``faults``, ``kills``, ``acked_checked``, ``lost``, ``false_fences``,
``daemon_crashes``, ``crash_states``, ``failures`` and ``elapsed_s``. Exits 1 when any
``lost``, ``false_fences``, ``daemon_crashes`` or ``failures`` is not 0.

``--quick`` is the CI size (at least 1,000 fuzz cases and 200 crash states); ``--long``
(the default) is the run by hand whose table goes in the issue's closing note.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from tests.torture import CAMPAIGNS
from tests.torture.result import COUNTERS, Result, total


def _progress(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def _table(results: list[Result]) -> str:
    cols = ("campaign", *COUNTERS, "elapsed_s")
    rows = [cols] + [(r.campaign, *(str(v) for v in r.figures().values())) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.torture", description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the CI size")
    size.add_argument("--long", action="store_true", help="the run by hand (the default)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of figures")
    p.add_argument("--only", nargs="+", choices=CAMPAIGNS, help="run only these campaigns")
    p.add_argument("--seed", type=int, default=14)
    args = p.parse_args(argv)
    results = []
    for name in args.only or CAMPAIGNS:
        module = importlib.import_module(f"tests.torture.{name}")
        _progress(f"{name}: starting ({'quick' if args.quick else 'long'})")
        res = module.run(quick=args.quick, seed=args.seed, progress=_progress)
        _progress(f"{name}: {json.dumps(res.figures())} {json.dumps(res.notes, default=str)}")
        for line in res.problems:
            _progress(f"{name}: PROBLEM {line}")
        results.append(res)
    tot = total(results)
    print(_table([*results, tot]))
    if args.json:
        doc = {r.campaign: r.figures() for r in results}
        doc["total"] = tot.figures()
        print(json.dumps(doc, sort_keys=False))
    return 0 if tot.passed else 1


if __name__ == "__main__":
    sys.exit(main())
