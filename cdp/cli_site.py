"""``cdp preflight system|install|uninstall``, ``cdp install``, ``cdp uninstall``."""

from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    """Add the site verbs to ``cli`` (being written: issue 4/4)."""
