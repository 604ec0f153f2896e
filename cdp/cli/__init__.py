"""The ``cdp`` command. Thin: each verb fills an options object, calls the library and
prints the result, as a table for people or as JSON (``--json``) for scripts.

The verbs live in one module per kind — ``store_verbs`` (recovery and the store),
``site_verbs`` (preflight, install, uninstall), ``msa_verbs`` (the daemon and the verbs
that call it) — and share ``common``; this module only gathers them into the group.

A ``CdpError`` reaching here is printed as one line on stderr and becomes the process's
exit code (``errors.py`` gives each class its code).
"""

from __future__ import annotations

import sys

import click

from cdp.cli import msa_verbs, site_verbs, store_verbs
from cdp.errors import CdpError
from cdp.memory import bound_malloc
from cdp.tomlread import printable


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cdp-engine")
def cli() -> None:
    """Continuous data protection: capture every write, replicate it to an object store,
    recover disks at any point in time."""


for _module in (store_verbs, site_verbs, msa_verbs):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def main() -> None:
    bound_malloc()  # recover, mount, consolidate: large reads and decodes reuse warm heap
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except CdpError as exc:  # on one line, whatever a daemon, a peer or a file put in it
        click.echo(f"cdp: error: {printable(exc.message)}", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:  # an operating error (a file, a permission, a full disk), not a bug
        where = f": {exc.filename}" if exc.filename else ""
        click.echo(f"cdp: error: {exc.strerror or type(exc).__name__}{printable(where)}", err=True)
        sys.exit(1)
