"""The store verbs of ``cdp``: ``points``, ``recover``, ``mount``, ``verify``, ``consolidate`` (from the
object store alone, no daemon), ``log format|info`` (replication-log partitions), and
``demo``.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import click

from cdp.cli.common import (DomainRef, FiniteRange, NonEmptyPath, domain_argument, domain_id_of, emit, json_option,
                            metadata_option, ns_text, one_point, parse_duration_option, parse_size_option,
                            point_options, progress_bar, seen_from_metadata, store_option, timeline_option,
                            with_store)
from cdp.store.base import ObjectStore

@click.command()
@click.option("--dir", "workdir", type=NonEmptyPath(path_type=Path), default=None,
              help="Work here instead of a temporary directory (kept afterwards).")
@click.option("--disk-size", default="64MiB", show_default=True, help="Size of each simulated disk.")
@click.option("--writes-mb", default=256, show_default=True, help="MB of writes to generate.")
@json_option
def demo(workdir: Path | None, disk_size: str, writes_mb: int, as_json: bool) -> None:
    """The whole cycle on the embedded default in a temporary directory: site, install,
    daemon + DRVA, a workload, a mark, recovery at the mark and at latest, sha256 checked."""
    from cdp.demo import DemoOptions, format_summary, run_demo

    opts = DemoOptions(workdir=workdir, disk_size=parse_size_option(disk_size), writes_bytes=writes_mb * 10**6,
                       show_progress=not as_json and sys.stderr.isatty())
    result = asyncio.run(run_demo(opts))
    emit(as_json, result, format_summary)
    if not result["verified"]:
        sys.exit(1)


@click.command()
@domain_argument
@store_option
@timeline_option
@metadata_option
@json_option
def points(domain: DomainRef, store_url: str, timeline: int | None, metadata: tuple[Path, ...], as_json: bool) -> None:
    """List DOMAIN's recovery points (id or name) on every timeline, from the store's catalog
    (checked against DRVA metadata with --metadata)."""
    from rocva.points import list_points

    async def work(store: ObjectStore) -> dict[str, Any]:
        domain_id = await domain_id_of(store, domain)
        return await list_points(store, domain_id, timeline, seen_from_metadata(metadata, domain_id))

    result = asyncio.run(with_store(store_url, work))

    def human(r: dict[str, Any]) -> str:
        lines = [f"domain {r['domain']['name']} (id {r['domain']['id']}): current timeline "
                 f"{r['current_timeline']}"]
        for t in r["timelines"]:
            fork = f", forked from timeline {t['parent']} at seq {t['fork_seq']}" if t["parent"] else ""
            lines.append(f"timeline {t['timeline']} (owner {t['owner']}{fork}"
                         f"{', current' if t['current'] else ''}): committed seq {t['committed_seq']}, "
                         f"retention horizon seq {t['horizon_seq']}, {t['segments']} segments")
            for w in t["consistent"]:
                lines.append(f"  consistent  seq {w['first_seq']}..{w['last_seq']}  "
                             f"{ns_text(w['first_ts'])} .. {ns_text(w['last_ts'])}")
            for w in t["not_consistent"]:
                lines.append(f"  NOT consistent ({w['kind']})  seq {w['first_seq']}..{w['last_seq'] or 'open'}")
            for m in t["marks"]:
                why = (f"  (MISSING from the store: {', '.join(m['missing'])})" if m["missing"]
                       else "" if m["consistent"] else "  (not a consistent point)")
                lines.append(f"  mark {m['name']!r}  seq {m['seq']}  {ns_text(m['ts'])}{why}")
            if t["latest_missing"]:
                lines.append(f"  latest seq {t['latest']}: MISSING from the store: {', '.join(t['latest_missing'])}")
            for b in t["bases"]:
                lines.append(f"  base  disk {b['disk']} at seq {b['seq']}")
        for p in r["problems"]:
            lines.append(f"PROBLEM {p['object']}: {p['problem']}")
        return "\n".join(lines)

    emit(as_json, result, human)


@click.command()
@domain_argument
@store_option
@point_options
@click.option("--to", "out_dir", type=NonEmptyPath(path_type=Path), required=True,
              help="Directory for the images (<vm>-<disk>.img); an interrupted recovery resumes.")
# The numbers are rocva.recover_options' (CONCURRENCY_DEFAULT, _MAX), written out: importing
# rocva here would cost every cdp command 0.2 s. A test holds them equal.
@click.option("--concurrency", type=int, default=None,
              help="Ranged GETs (and their decoding) in flight: 1..32, default 8.")
@timeline_option
@click.option("--checksum", is_flag=True, help="Read each image back and give its sha256.")
@json_option
def recover(domain: DomainRef, store_url: str, at: str | None, seq: int | None, mark: str | None,
            latest: bool, out_dir: Path, concurrency: int | None, timeline: int | None, checksum: bool,
            as_json: bool) -> None:
    """Rebuild DOMAIN's disks at one point in time, from the object store alone."""
    from rocva import RecoverOptionError, RecoverOptions
    from rocva import recover as rocva_recover

    try:
        options = RecoverOptions(one_point(at, seq, mark, latest), out_dir, timeline=timeline, checksum=checksum,
                                 **({} if concurrency is None else {"concurrency": concurrency}))
    except RecoverOptionError as exc:
        raise click.BadParameter(exc.detail, param_hint=f"--{exc.field}") from None
    bar, update = progress_bar("recover", as_json)

    async def work(store: ObjectStore) -> dict[str, Any]:
        return await rocva_recover(store, await domain_id_of(store, domain), options, progress=update)

    try:
        result = asyncio.run(with_store(store_url, work))
    finally:
        bar.close()
    result.pop("plan", None)
    emit(as_json, result, lambda r: "\n".join(
        [f"recovered seq {r.get('seq')} into {out_dir}: {r['bytes_written'] / 1e6:,.1f} MB written, "
         f"{r['bytes_fetched'] / 1e6:,.1f} MB fetched, {r['seconds']} s ({r['mb_per_s']} MB/s)"]
        + [f"  {img['path']}" + (f"  sha256 {img['sha256']}" if "sha256" in img else "")
           for img in r.get("images", [])]))


@click.command()
@domain_argument
@store_option
@point_options
@timeline_option
@click.option("--nbd", "nbd_address", required=True,
              help="Where to serve: HOST:PORT (port 0: any free one; a loopback address unless "
                   "--nbd-allow-remote) or unix:PATH (its directory ours alone, made 0700 if missing). Only root, "
                   "this process's uid and each --nbd-allow-user may connect.")
@click.option("--nbd-allow-remote", is_flag=True,
              help="Let --nbd be an address other than loopback: NBD has no client authentication here (not "
                   "with --tls-cert either), so anyone who reaches it reads the disks (and writes them with "
                   "--writable).")
@click.option("--nbd-allow-user", "nbd_allow_users", multiple=True, metavar="USER",
              help="Let this user (a name or a uid) connect to --nbd HOST:PORT too (repeatable): QEMU run as "
                   "libvirt-qemu, say; a unix: socket stays ours alone.")
@click.option("--writable", is_flag=True, help="Accept writes, into a local copy-on-write overlay (never the store).")
@click.option("--overlay", "overlay_dir", type=NonEmptyPath(path_type=Path), default=None,
              help="Overlay directory (with --writable; reopened when it holds this point's overlay). "
                   "Default: a temporary one, removed at exit.")
@click.option("--keep-overlay", is_flag=True, help="Keep the temporary overlay directory at exit.")
@click.option("--rehydrate-to", "rehydrate_to", type=NonEmptyPath(path_type=Path), default=None,
              help="Restore the point into this directory in the background while serving; then serve from it.")
@click.option("--cache-mb", type=click.IntRange(0, 1 << 20), default=256, show_default=True,
              help="MiB of decoded segment blocks and base chunks kept in memory.")
@click.option("--tls-cert", type=NonEmptyPath(path_type=Path), default=None,
              help="Serve NBD over TLS only (clients must STARTTLS) with this certificate (PEM; "
                   "e.g. the site's api.pem from cdp install).")
@click.option("--tls-key", type=NonEmptyPath(path_type=Path), default=None,
              help="The certificate's private key (PEM); default: read from the --tls-cert file.")
@json_option
def mount(domain: DomainRef, store_url: str, at: str | None, seq: int | None, mark: str | None, latest: bool,
          timeline: int | None, nbd_address: str, nbd_allow_remote: bool, nbd_allow_users: tuple[str, ...],
          writable: bool, overlay_dir: Path | None,
          keep_overlay: bool, rehydrate_to: Path | None, cache_mb: int, tls_cert: Path | None, tls_key: Path | None,
          as_json: bool) -> None:
    """Serve DOMAIN's disks at one point as NBD exports named VM/DISK, straight from the
    store (instant recovery), until SIGINT or SIGTERM."""
    import signal

    from cdp.errors import ConfigError
    from cdp.logs import setup_logging
    from cdp.nbd.address import parse_nbd_address
    from cdp.nbd.peers import resolve_users
    from rocva.mount import MountOptions
    from rocva.mount_serve import serve_mount

    target = one_point(at, seq, mark, latest)
    address = parse_nbd_address(nbd_address)
    _check_mount_listen(nbd_address, address.host, nbd_allow_remote)
    if nbd_allow_users and address.host is None:
        raise ConfigError("--nbd-allow-user goes with --nbd HOST:PORT (a unix: socket and its directory are root's "
                          "and ours alone)")
    allow_uids = resolve_users(nbd_allow_users, "--nbd-allow-user")
    if (overlay_dir is not None or keep_overlay) and not writable:
        raise ConfigError("--overlay and --keep-overlay need --writable")
    if tls_key is not None and tls_cert is None:
        raise ConfigError("--tls-key needs --tls-cert")
    tls = None
    if tls_cert is not None:
        from cdp.tls import server_context

        tls = server_context(tls_cert, tls_key)  # a missing or unreadable file: a ConfigError naming it
    setup_logging("info")

    def say(event: dict[str, Any]) -> None:
        emit(as_json, event, _mount_event_text)

    async def work(store: ObjectStore) -> dict[str, Any]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        options = MountOptions(await domain_id_of(store, domain), target, timeline, writable, overlay_dir,
                               keep_overlay, rehydrate_to, cache_bytes_max=cache_mb << 20)
        return await serve_mount(store, options, address, say, stop, tls=tls, allow_uids=allow_uids,
                                 allow_remote=nbd_allow_remote)

    from cdp import eventloop

    say(eventloop.run(with_store(store_url, work)))


def _check_mount_listen(nbd_address: str, host: str | None, allow_remote: bool) -> None:
    """ConfigError for a TCP ``--nbd`` ``host`` other than loopback without
    ``--nbd-allow-remote`` (no client there can be identified: cdp.nbd.peers), and for
    the flag with a Unix socket (``host`` None)."""
    from cdp.errors import ConfigError
    from cdp.nbd.peers import remote_listen_problem

    if host is None:
        if allow_remote:
            raise ConfigError("--nbd-allow-remote goes with --nbd HOST:PORT (a Unix socket is never remote)")
        return
    if (why := remote_listen_problem(host, allow_remote, "--nbd-allow-remote")) is not None:
        raise ConfigError(f"--nbd {nbd_address}: expected a loopback address: {why}")


def _mount_event_text(event: dict[str, Any]) -> str:
    if event["event"] == "serving":
        exports = ", ".join(f"{e['name']} ({e['size']:,} bytes)" for e in event["exports"])
        mode = "read-write (overlay " + str(event["overlay"]) + ")" if event["writable"] else "read-only"
        return (f"serving domain {event['domain']} seq {event['seq']} (timeline {event['timeline']}) at "
                f"{event['address']['uri']}, {mode}: {exports}")
    if event["event"] == "rehydrated":
        return f"rehydrated into {event['to']} in {event['seconds']} s; reads now come from the images"
    return (f"stopped: {event['reads']} reads, {event['bytes_served'] / 1e6:,.1f} MB served, cache "
            f"{event['cache_hits']} hits / {event['cache_misses']} misses, {event['bytes_fetched'] / 1e6:,.1f} MB "
            f"fetched, rehydrated: {'yes' if event['rehydrated'] else 'no'}")


@click.command()
@domain_argument
@store_option
@click.option("--deep", is_flag=True, help="Read every byte of every object (default: indexes and manifests).")
@click.option("--sample", type=FiniteRange(0, 1), default=0.0,
              help="Deep-check this share of segments (0..1).")
@timeline_option
@metadata_option
@json_option
def verify(domain: DomainRef, store_url: str, deep: bool, sample: float, timeline: int | None,
           metadata: tuple[Path, ...], as_json: bool) -> None:
    """Check DOMAIN in the store: catalog vs objects, seq continuity, checksums (and, with
    --metadata, that the catalog is not older than what a DRVA last committed)."""
    from rocva.verify import verify as rocva_verify

    bar, update = progress_bar("verify", as_json)

    async def work(store: ObjectStore) -> dict[str, Any]:
        domain_id = await domain_id_of(store, domain)
        return await rocva_verify(store, domain_id, deep=deep, sample=sample, progress=update,
                                  timeline=timeline, seen=seen_from_metadata(metadata, domain_id))

    try:
        result = asyncio.run(with_store(store_url, work))
    finally:
        bar.close()
    emit(as_json, result, lambda r: "\n".join(
        [f"domain {r['domain']}: {'OK' if r['ok'] else 'PROBLEMS'} — {r['checked']['segments']} segments, "
         f"{r['checked']['manifests']} manifests, {r['checked']['chunks']} chunks, "
         f"{r['checked']['bytes_read'] / 1e6:,.1f} MB read in {r['seconds']} s"]
        + [f"  {p['object']}: {p['problem']}" for p in r["problems"]]
        + [f"  (unreferenced) {k}" for k in r["unreferenced"]]))
    if not result["ok"]:
        sys.exit(6)


@click.command()
@domain_argument
@store_option
@click.option("--older-than", default="1h", show_default=True,
              help="Roll the segments older than this into a new base (e.g. 30m, 24h).")
@click.option("--retention", default=None,
              help="Keep every point at most this old (e.g. 72h); older segments and bases are deleted. "
                   "Default: no retention.")
@click.option("--scratch", type=NonEmptyPath(path_type=Path), default=None,
              help="Directory for the temporary images (default: the system's temporary directory).")
@click.option("--sweep-chunks", is_flag=True, help="Also delete unreferenced chunks when no base was removed.")
@click.option("--concurrency", type=click.IntRange(1, 32), default=8, show_default=True,
              help="Store requests in flight (as recover's: 1..32).")
@json_option
def consolidate(domain: DomainRef, store_url: str, older_than: str, retention: str | None, scratch: Path | None,
                sweep_chunks: bool, concurrency: int, as_json: bool) -> None:
    """Roll DOMAIN's old segments into a base image and apply retention."""
    from rocva.consolidate import consolidate as run

    older_s = parse_duration_option(older_than, "--older-than", "consolidate_after")
    retention_s = parse_duration_option(retention, "--retention", "retention")
    bar, update = progress_bar("consolidate", as_json)

    def progress(phase: str, done: int, total: int) -> None:
        bar.set_description(phase, refresh=False)
        update(done, total)

    async def work(store: ObjectStore) -> dict[str, Any]:
        return await run(store, await domain_id_of(store, domain), older_than_s=older_s,
                         retention_s=retention_s, scratch_dir=scratch, concurrency=concurrency,
                         progress=progress, sweep_all_chunks=sweep_chunks)

    try:
        result = asyncio.run(with_store(store_url, work))
    finally:
        bar.close()

    def human(r: dict[str, Any]) -> str:
        lines = [f"domain {r['domain']}: " + (
            f"new base at seq {r['consolidated_seq']} ({r['bases_added']} disks)"
            if r["consolidated_seq"] is not None else "nothing old enough to consolidate")]
        if r["chunks"]:
            c = r["chunks"]
            lines.append(f"  chunks: {c['chunks']} read, {c['chunks_stored']} stored "
                         f"({c['bytes_stored'] / 1e6:,.1f} MB), {c['chunks_deduplicated']} already stored, "
                         f"{c['zero_chunks']} zero")
        lines.append(f"  retention horizon seq {r['horizon_seq']}: {r['segments_removed']} segments and "
                     f"{r['bases_removed']} bases dropped from the catalog")
        sw = r["sweep"]
        lines.append(f"  deleted {sw['objects_deleted']} objects"
                     + (f"; {sw['deferred']} kept for now: {sw['deferred_by']}" if sw["deferred"] else ""))
        if r["chunk_sweep"]:
            cs = r["chunk_sweep"]
            lines.append(f"  chunk sweep deferred (a later run with --sweep-chunks does it): {cs['deferred']}"
                         if "deferred" in cs else
                         f"  chunk sweep: {cs['chunks_deleted']} deleted, {cs['chunks_kept']} kept")
        lines.append(f"  {r['seconds']} s")
        return "\n".join(lines)

    emit(as_json, result, human)


@click.group()
def log() -> None:
    """Replication-log partitions."""


@log.command("format")
@click.argument("path", type=NonEmptyPath(path_type=Path))
@click.option("--size", default=None, help="Create a file of this size (e.g. 1GiB); not for devices. "
                                            "A file formatted again (--force) keeps its size without it.")
@click.option("--label", default="", help="A name stored in the superblock (e.g. the DRVA's).")
@click.option("--force", is_flag=True,
              help="Format over what PATH holds: a file that is not empty, or a device holding a log.")
@json_option
def log_format(path: Path, size: str | None, label: str, force: bool, as_json: bool) -> None:
    """Format PATH (a file or a block device) as a replication-log partition. Refused while a
    DRVA holds it, and, without --force, when it holds anything (it says what)."""
    from cdp.replog import ReplicationLog

    ReplicationLog.format(path, parse_size_option(size) if size else None, label=label, force=force)
    with ReplicationLog.open(path, readonly=True) as lg:
        info = {"path": str(path), "data_size": lg.data_size, "label": lg.label}
    emit(as_json, info, lambda r: f"formatted {r['path']}: {r['data_size']:,} bytes of ring")


@log.command("info")
@click.argument("path", type=NonEmptyPath(path_type=Path, exists=True))
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
    emit(as_json, info, lambda r: "\n".join(f"{k:<10} {v}" for k, v in r.items()))


COMMANDS = (demo, points, recover, mount, verify, consolidate, log)
