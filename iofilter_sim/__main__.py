"""``iofilter-sim``: run a simulated cluster's I/O filters against running DRVAs.

    iofilter-sim check CLUSTER.toml
    iofilter-sim run CLUSTER.toml [--duration 60] [--workload random --rate-mb-s 50]
                 [--trace msr.csv --trace-domain erp --speed 10] [--mark 10:before-upgrade]
                 [--seed-disks] [--status FILE] [--marks-log FILE] [--control FILE] [--isolated DOMAIN]
                 [--no-hashes] [--no-mark-hashes] [--json]
                 [--nbd HOST:PORT [--nbd-allow-remote] [--nbd-allow-user USER]] [--nbd-unix PATH]
                 [--export-name VM/DISK]
                 [--flush-timeout S]
                 [--tls-ca CA.pem [--tls-server-name NAME]]

With ``--tls-ca`` (or the cluster file's ``[tls] ca``) every DRVA connection is TLS and
the DRVA's certificate must be signed by that CA and hold the address dialled (or
``--tls-server-name``); nothing falls back to plain TCP.

With ``--nbd`` or ``--nbd-unix`` no workload runs: every disk (or each ``--export-name``)
is served as the NBD export ``vm/disk`` and what real block clients write is captured
and streamed to the DRVAs; a FLUSH returns once the DRVA holds every earlier write. The
first line on stdout then says where it serves (a JSON object with ``--json``). Only root
and this process's uid may connect (``cdp.nbd.peers``), and on ``--nbd`` each
``--nbd-allow-user`` too (QEMU run as ``libvirt-qemu``, say); ``--nbd`` is a loopback
address unless ``--nbd-allow-remote`` says anyone who reaches another one may.

The handshake secret comes from the environment (``CDP_SITE_SECRET``), as for the DRVAs.
Without ``--duration`` it runs until SIGINT/SIGTERM; then it drains (waits until every
captured write is acked) and prints a summary, including each disk's sha256. A second
SIGINT/SIGTERM stops waiting for the drain. Output that cannot be written (a full or
read-only file system under the log the MSA gives a host) changes none of this: the
drain starts before the message about it, and the exit status still says whether it
drained.

Exit status of ``run``: 0 when every captured write was acked ("drained"), 1 when not
(the drain timed out or was given up), 2 for bad arguments or a bad cluster file, another
``cdp.errors`` code for any other error, 130 for a SIGINT before the run started.
"""

from __future__ import annotations

import signal

if __name__ == "__main__":
    # Run as ``python -m iofilter_sim`` (the MSA's hosts): SIGUSR1, "read the control
    # file again", is held pending from here until its handler is installed (``_run``).
    # Its default action kills the process, and the imports below take a good part of a
    # second: a pause asked of a host just started killed it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

import asyncio
import json
import os
import sys
from pathlib import Path

import click

from cdp import eventloop
from cdp.cli.common import FiniteRange
from cdp.errors import CdpError, ConfigError
from cdp.logs import setup_logging
from cdp.nbd.address import parse_tcp
from cdp.nbd.peers import resolve_users
from cdp.units import parse_size
from iofilter_sim.cluster import load_cluster
from iofilter_sim.nbd_site import NbdListen
from iofilter_sim.runner import ClusterRunner, RunOptions


def _marks(values: tuple[str, ...]) -> list[tuple[float, str]]:
    out = []
    for v in values:
        at, sep, name = v.partition(":")
        try:
            out.append((float(at), name))
        except ValueError:
            raise click.BadParameter(f"{v!r}: expected SECONDS:NAME, e.g. 10:before-upgrade") from None
        if not sep or not name:
            raise click.BadParameter(f"{v!r}: expected SECONDS:NAME")
    return out


#: Seconds, MB/s, a speed factor: finite and above zero (NaN passed ``float``, and a
#: flush timeout of NaN waited forever).
POSITIVE = FiniteRange(0, min_open=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Simulated vSphere I/O filters: capture VM writes and stream them to DRVAs."""


@cli.command()
@click.argument("cluster_file", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def check(cluster_file: Path, as_json: bool) -> None:
    """Validate CLUSTER_FILE and show its domains and disks."""
    cluster = load_cluster(cluster_file)
    doc = {"site": cluster.site, "domains": [{
        "name": d.name, "id": d.id, "drva": f"{d.drva.host}:{d.drva.port}",
        "disks": [{"index": x.disk_index, "vm": x.vm.name, "disk": x.disk.name, "size": x.disk.size}
                  for x in d.disks]} for d in cluster.domains]}
    if as_json:
        click.echo(json.dumps(doc))
        return
    for d in doc["domains"]:
        click.echo(f"domain {d['name']} (id {d['id']}) -> DRVA {d['drva']}")
        for x in d["disks"]:
            click.echo(f"  disk {x['index']}: {x['vm']}/{x['disk']} {x['size']:,} bytes")


@cli.command()
@click.argument("cluster_file", type=click.Path(exists=True, path_type=Path))
@click.option("--duration", type=POSITIVE, default=None, help="Seconds to run (default: until stopped).")
@click.option("--workload", default=None, help="Override every domain's workload kind.")
@click.option("--rate-mb-s", type=POSITIVE, default=None, help="With --workload: MB/s per domain.")
@click.option("--trace", type=click.Path(exists=True, path_type=Path), default=None,
              help="Replay an MSR Cambridge CSV trace instead of a workload.")
@click.option("--trace-domain", default=None, help="The domain the trace feeds (default: all).")
@click.option("--speed", type=POSITIVE, default=None, help="Trace speed factor (default: as fast as possible).")
@click.option("--mark", "marks", multiple=True, help="SECONDS:NAME — place a mark in every domain.")
@click.option("--seed-disks", is_flag=True, help="Seed each disk's existing content first.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None, help="Where the disk images live.")
@click.option("--status", "status_path", type=click.Path(path_type=Path), default=None,
              help="Rewrite this JSON status file twice a second (for a supervisor).")
@click.option("--marks-log", type=click.Path(path_type=Path), default=None,
              help="Append each mark placed (with the disks' sha256 at it, hashed in a worker thread while the "
                   "VMs write on) to this file, one JSON line each.")
@click.option("--control", "control_path", type=click.Path(path_type=Path), default=None,
              help='A JSON file {"pause": [domain, ...]}: re-read on SIGUSR1; paused domains stop writing.')
@click.option("--isolated", multiple=True, help="DOMAIN: its VMs write their disks only (no DRVA).")
@click.option("--no-hashes", is_flag=True, help="No sha256 of the disks in the summary.")
@click.option("--no-mark-hashes", is_flag=True,
              help="No sha256 of the disks at each mark (null in its record): nothing is read at a mark.")
@click.option("--nbd", "nbd_tcp", default=None, metavar="HOST:PORT",
              help="Serve the disks as NBD exports on TCP (port 0: any free one) instead of running workloads.")
@click.option("--nbd-unix", type=click.Path(path_type=Path), default=None,
              help="Serve the NBD exports on this Unix socket too (or only); its directory must be ours alone "
                   "(made 0700 if missing).")
@click.option("--nbd-allow-remote", is_flag=True,
              help="Let --nbd be an address other than loopback: the exports carry no authentication, so "
                   "anyone who reaches it reads and writes every disk.")
@click.option("--nbd-allow-user", "nbd_allow_users", multiple=True, metavar="USER",
              help="Let this user (a name or a uid) connect to --nbd's loopback address too, besides root and "
                   "this process's uid (repeatable); the Unix socket stays ours alone.")
@click.option("--export-name", "export_names", multiple=True, metavar="VM/DISK",
              help="With --nbd/--nbd-unix: serve only these disks (default: every disk).")
@click.option("--flush-timeout", type=POSITIVE, default=None,
              help="With NBD: fail a FLUSH/FUA with EIO when the DRVA has not got the writes within S seconds "
                   "(default: wait).")
@click.option("--tls-ca", type=click.Path(path_type=Path), default=None,
              help="Connect to the DRVAs with TLS, trusting only this CA certificate (PEM).")
@click.option("--tls-server-name", default=None, metavar="NAME",
              help="The name the DRVAs' certificates must hold (default: the address dialled).")
@click.option("--spill-bytes", default=None, metavar="SIZE",
              help="Spill journal per domain beside its first disk, for frames past the memory buffer "
                   "while a DRVA is away (e.g. 1GiB, the default; 0: none, go to bitmap mode at once).")
@click.option("--json", "as_json", is_flag=True)
def run(cluster_file: Path, duration: float | None, workload: str | None, rate_mb_s: float | None,
        trace: Path | None, trace_domain: str | None, speed: float | None, marks: tuple[str, ...],
        seed_disks: bool, state_dir: Path | None, status_path: Path | None, marks_log: Path | None,
        control_path: Path | None, isolated: tuple[str, ...], no_hashes: bool, no_mark_hashes: bool,
        nbd_tcp: str | None, nbd_unix: Path | None, nbd_allow_remote: bool, nbd_allow_users: tuple[str, ...],
        export_names: tuple[str, ...],
        flush_timeout: float | None, tls_ca: Path | None, tls_server_name: str | None, spill_bytes: str | None,
        as_json: bool) -> None:
    """Run the filters of CLUSTER_FILE against their DRVAs."""
    secret = os.environ.get("CDP_SITE_SECRET", "")
    if len(secret) < 16:
        raise click.UsageError("set CDP_SITE_SECRET to the site secret (at least 16 characters)")
    # Looked up here, where the host starts (the site file passes them on as written).
    allow_uids = resolve_users(nbd_allow_users, "--nbd-allow-user")
    cluster = load_cluster(cluster_file, state_dir=state_dir)
    nbd = None
    if nbd_tcp is not None or nbd_unix is not None:
        if workload or trace:
            raise click.UsageError("--nbd serves the disks to real clients: no --workload or --trace with it")
        nbd = NbdListen(tcp=parse_tcp(nbd_tcp) if nbd_tcp is not None else None, unix=nbd_unix,
                        exports=frozenset(export_names) if export_names else None, flush_timeout_s=flush_timeout,
                        allow_remote=nbd_allow_remote,
                        allow_uids=allow_uids)
    elif export_names or flush_timeout is not None or nbd_allow_remote or nbd_allow_users:
        raise click.UsageError("--export-name, --flush-timeout, --nbd-allow-remote and --nbd-allow-user go with "
                               "--nbd or --nbd-unix")
    opts = RunOptions(workload=workload, trace=trace, trace_domain=trace_domain, trace_speed=speed,
                      seed_disks=seed_disks, status_path=status_path, marks_log=marks_log,
                      control_path=control_path, isolated=frozenset(isolated), hash_at_end=not no_hashes,
                      hash_marks=not no_mark_hashes,
                      workload_options={"rate_mb_s": rate_mb_s} if rate_mb_s else {}, nbd=nbd,
                      tls_ca=tls_ca, tls_server_name=tls_server_name)
    if spill_bytes is not None:
        try:
            opts.spill_bytes_max = parse_size(spill_bytes, "--spill-bytes")
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from None
    if tls_server_name is not None and tls_ca is None and cluster.tls_ca is None:
        raise click.UsageError("--tls-server-name goes with --tls-ca (or the cluster file's [tls] ca)")
    summary = eventloop.run(_run(cluster, secret.encode(), opts, duration, _marks(marks), as_json))
    try:
        _print_summary(summary, as_json)
    except OSError:  # stdout on a full disk: the exit code still says whether it drained
        _drop_stdout()
    sys.exit(0 if summary["drained"] else 1)


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary))
        return
    for name, d in summary["domains"].items():
        click.echo(f"{name}: {d['writes']:,} writes, {d['bytes'] / 1e6:,.1f} MB "
                   f"({d['mb_per_s']} MB/s), acked through seq {d['acked_seq']}, mode {d['mode']}")
    click.echo("drained" if summary["drained"] else "NOT drained: some writes are not acked")


def _drop_stdout() -> None:
    """Give up what stdout could not write: the interpreter's flush at exit would fail
    again, and make the exit code 120 whatever the drain did."""
    try:
        sys.stdout = open(os.devnull, "w")
        os.dup2(sys.stdout.fileno(), 1)  # the old stream's buffer now goes nowhere
    except OSError:
        pass


async def _run(cluster, secret: bytes, opts: RunOptions, duration: float | None, marks, as_json: bool) -> dict:
    runner = ClusterRunner(cluster, secret, opts)
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        # The first signal stops the workloads and drains; a second one (the user will
        # not wait for a DRVA that does not answer) gives the drain up too. The runner is
        # told first: the message goes to a log that may be on a full file system, and
        # its ENOSPC once kept the host from stopping (SIGKILLed 60 s later, undrained).
        nonlocal signals
        signals += 1
        if signals == 1:
            runner.stop()
            _say("iofilter-sim: stopping: waiting until every captured write is acked (signal again to give up)")
        else:
            runner.give_up()
            _say("iofilter-sim: giving up the drain")

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGUSR1, runner.read_control)
    # Handled now: a SIGUSR1 held pending since the start (``python -m``) is delivered.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    await runner.start()
    try:
        if runner.nbd is not None:
            _say_serving(runner.nbd.address, as_json)
        await runner.run(duration, marks)
        drained = await runner.drain()
        return {**runner.summary(), "drained": drained}
    finally:
        await runner.close()


def _say(text: str) -> None:
    """``text`` on stderr, if it can be written: a full or read-only file system under
    the log must not stop what the message is about."""
    try:
        click.echo(text, err=True)
    except (OSError, ValueError):  # ValueError: stderr closed
        pass


def _say_serving(address: dict, as_json: bool) -> None:
    """The first line on stdout: where the exports are (scripts wait for it)."""
    if as_json:
        click.echo(json.dumps({"event": "serving", **address}))
    else:
        where = " and ".join(x for x in (address.get("tcp"), address.get("unix")) if x)
        click.echo(f"serving {len(address['exports'])} NBD exports on {where}: {', '.join(sorted(address['exports']))}")
    sys.stdout.flush()


def main() -> None:
    setup_logging(os.environ.get("CDP_LOG_LEVEL", "warning"))
    try:
        cli.main(standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except CdpError as exc:
        click.echo(f"iofilter-sim: error: {exc.message}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
