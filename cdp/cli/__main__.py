"""``python -m cdp.cli``: the ``cdp`` command."""

from cdp.cli import main

main()
