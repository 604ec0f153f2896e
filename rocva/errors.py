"""Errors of point-in-time recovery, grafted onto the one error tree of ``cdp.errors``::

    CdpError
    ├── ConfigError                      exit 2
    │   └── InvalidTarget                        the target is no recovery point
    │       ├── InconsistentPoint                inside a seeding/resync window
    │       └── OutsideRetention                 below the horizon, above the committed
    │                                            seq, or before the catalog can rebuild
    └── RecoveryError                    exit 6   the output directory refuses the job

Object-store and format failures during a recovery are the ``cdp.errors`` ones
(``NotFound``, ``ChecksumMismatch``, …) and name the object key.
"""

from __future__ import annotations

from cdp.errors import CdpError, ConfigError


class InvalidTarget(ConfigError):
    """The recovery target is not a recovery point of the domain.

    ``nearest`` is (the nearest valid seq below, the nearest valid seq above), each None
    when there is none; the message quotes them.
    """

    def __init__(self, message: str | None = None, nearest: tuple[int | None, int | None] = (None, None)) -> None:
        super().__init__(message)
        self.nearest = nearest


class InconsistentPoint(InvalidTarget):
    """The target lies inside a window that is not crash-consistent (seeding or resync)."""


class OutsideRetention(InvalidTarget):
    """The target lies outside what the catalog can rebuild."""


class RecoveryError(CdpError):
    """The recovery cannot run in its output directory."""

    exit_code = 6
