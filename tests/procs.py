"""Finding a test's grandchildren: the processes a ``cdp daemon`` started (a recovery
appliance, ``python -m rocva VERB``), which a test kills at a moment of its choosing."""

from __future__ import annotations

import os


def children(parent: int, *words: bytes) -> list[int]:
    """Pids of the live (not zombie) processes whose parent is ``parent`` and whose
    command line has each of ``words`` as one of its arguments."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                state, ppid = f.read().rsplit(b")", 1)[1].split()[:2]
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError):
            continue  # gone meanwhile
        if int(ppid) == parent and state != b"Z" and all(w in argv for w in words):
            found.append(int(entry.name))
    return found
