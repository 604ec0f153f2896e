"""What a recovery is asked for: one ``RecoverOptions``, filled alike by ``cdp recover``
(the CLI), the MSA's ``recover`` job (``POST /v1/domains/{name}/recover``) and the
library's own callers, and checked once, here.

Why one object: the CLI and the REST API each passed ``rocva.recover`` its own set of
arguments, and they drifted: the REST API could not name a timeline, and nothing bound
``concurrency`` (``--concurrency 0`` ended in an ``AssertionError`` traceback, and a large
one let one recovery hold that many read buffers of up to 32 MiB each).

Tuning that is not the caller's choice (``run_bytes_max``, ``base_batch_chunks``) and
what the caller's context decides (progress reporting, where a recovery may write)
stay keyword arguments of ``recover``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdp.errors import ConfigError
from rocva.plan import CONCURRENCY_DEFAULT
from rocva.target import Target

#: Units (ranged GETs and their decoding) in flight at most: each may hold a read
#: buffer of up to 2 × 16 MiB (``rocva.fetch``), so 32 bound a recovery's buffers near 1 GiB.
#: A file store is fastest at 8; an S3 or Azure store may want more requests in flight.
CONCURRENCY_MAX = 32
#: Timelines are numbered from 1, and a key holds one in 8 hex digits (FORMAT.md §7, §8.5).
TIMELINE_MAX = (1 << 32) - 1


class RecoverOptionError(ConfigError):
    """A recovery option out of its range; ``field`` names it (``timeline``,
    ``concurrency``, ``checksum``, ``to``), as the CLI option and the REST field do."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


@dataclass(frozen=True, slots=True)
class RecoverOptions:
    """One recovery's choices. ``target``: any form ``Target.parse`` reads; ``out_dir``:
    where the images go (checked by ``rocva.destination`` when the recovery opens it);
    ``timeline``: None for the current one; ``checksum``: sha256 of each image in the
    summary (a second read of every image)."""

    target: Target
    out_dir: Path
    timeline: int | None = None
    concurrency: int = CONCURRENCY_DEFAULT
    checksum: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", Target.parse(self.target))
        try:
            out_dir = Path(os.fspath(self.out_dir))
        except TypeError:
            raise RecoverOptionError("to", f"expected a directory path, got {type(self.out_dir).__name__}") from None
        object.__setattr__(self, "out_dir", out_dir)
        if self.timeline is not None and not _int_in(self.timeline, 1, TIMELINE_MAX):
            raise RecoverOptionError("timeline", f"expected a timeline number 1..{TIMELINE_MAX} (or none: the "
                                                 f"current one), got {_shown(self.timeline)}")
        if not _int_in(self.concurrency, 1, CONCURRENCY_MAX):
            raise RecoverOptionError("concurrency", f"expected 1..{CONCURRENCY_MAX} units in flight, "
                                                    f"got {_shown(self.concurrency)}")
        if not isinstance(self.checksum, bool):
            raise RecoverOptionError("checksum", f"expected true or false, got {_shown(self.checksum)}")


def _int_in(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."
