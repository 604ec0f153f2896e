"""``cdp daemon`` and the verbs that talk to it: protect, unprotect, status, mark, jobs."""

from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    """Add the daemon verbs to ``cli`` (being written: issue 4/4)."""
