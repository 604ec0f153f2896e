"""The ``cdp`` command. Thin: each verb fills an options object, calls the library and
prints the result, as a table for people or as JSON (``--json``) for scripts.

A ``CdpError`` reaching here is printed as one line on stderr and becomes the process's
exit code (``errors.py`` gives each class its code).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cdp.errors import CdpError, ConfigError
from cdp.units import parse_size

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _emit(as_json: bool, result: dict[str, Any], human: Callable[[dict[str, Any]], str]) -> None:
    click.echo(json.dumps(result, sort_keys=True) if as_json else human(result))


def _size(text: str) -> int:
    """'64MiB', '1G', '4096' -> bytes."""
    try:
        return parse_size(text, "size")
    except ConfigError as exc:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 4096, 64MiB, 1GiB)") from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cdp-engine")
def cli() -> None:
    """Continuous data protection: capture every write, replicate it to an object store,
    recover disks at any point in time."""


@cli.command()
@click.option("--dir", "workdir", type=click.Path(path_type=Path), default=None,
              help="Work here instead of a temporary directory (kept afterwards).")
@click.option("--disk-size", default="64MiB", show_default=True, help="Size of each simulated disk.")
@click.option("--writes-mb", default=256, show_default=True, help="MB of writes to generate.")
@json_option
def demo(workdir: Path | None, disk_size: str, writes_mb: int, as_json: bool) -> None:
    """Run the data path end to end on the embedded default (file store, local log file)."""
    from cdp.demo import DemoOptions, format_summary, run_demo

    opts = DemoOptions(workdir=workdir, disk_size=_size(disk_size), writes_bytes=writes_mb * 10**6,
                       show_progress=not as_json and sys.stderr.isatty())
    result = asyncio.run(run_demo(opts))
    _emit(as_json, result, format_summary)
    if not result["verified"]:
        sys.exit(1)


@cli.group()
def log() -> None:
    """Replication-log partitions."""


@log.command("format")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--size", default=None, help="Create a file of this size (e.g. 1GiB); not for devices.")
@click.option("--label", default="", help="A name stored in the superblock (e.g. the DRVA's).")
@json_option
def log_format(path: Path, size: str | None, label: str, as_json: bool) -> None:
    """Format PATH (a file or a block device) as a replication-log partition."""
    from cdp.replog import ReplicationLog

    ReplicationLog.format(path, _size(size) if size else None, label=label)
    with ReplicationLog.open(path, readonly=True) as lg:
        info = {"path": str(path), "data_size": lg.data_size, "label": lg.label}
    _emit(as_json, info, lambda r: f"formatted {r['path']}: {r['data_size']:,} bytes of ring")


@log.command("info")
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@json_option
def log_info(path: Path, as_json: bool) -> None:
    """Recover PATH read-only and report head, tail, usage and the frames it holds."""
    from cdp.frame import decode_frame
    from cdp.replog import ReplicationLog

    with ReplicationLog.open(path, readonly=True) as lg:
        st = lg.stats()
        frames, first, last = 0, None, None
        for pos, body in lg.entries():
            f = decode_frame(body, f"{path} position {pos}")
            frames += 1
            first = f.first_seq if first is None else first
            last = f.last_seq
        info = {"path": str(path), "label": lg.label, "epoch": st.epoch, "head": st.head,
                "tail": st.tail, "data_size": st.data_size, "used_bytes": st.used_bytes,
                "frames": frames, "first_seq": first, "last_seq": last}
    _emit(as_json, info, lambda r: "\n".join(f"{k:<10} {v}" for k, v in r.items()))


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except CdpError as exc:
        click.echo(f"cdp: error: {exc.message}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
