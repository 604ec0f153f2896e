"""``python -m rocva``: the short-lived recovery appliance a site's MSA starts for a job.

    python -m rocva failover --config SITE.toml --domain ID --name NAME --target TARGET [--test]
    python -m rocva standby --config SITE.toml --name NAME [--interval 0.5]
    python -m rocva failback --config SITE.toml --domain ID --name NAME --target TARGET

Rehydrates the domain into the site's datastore and forks its timeline for this site
(``rocva.failover``), then exits; with ``--test``, only recovers into ``+test/<name>``
(a test failover: no fork; ``cdp.msa.failover.isolated_area``). It speaks to the MSA in JSON lines on stdout, one
object each: ``{"progress": [done_bytes, total_bytes]}`` (a few a second at most), then
``{"result": {...}}`` and exit 0, or ``{"error": MESSAGE, "exit_code": N}`` and exit N
(``cdp.errors``). TARGET is ``latest``, ``seq:N``, ``mark:NAME`` or ``at:TIME``.
The MSA adds ``--exit-with-stdin`` before the verb and holds stdin open as a pipe: when
the MSA dies the appliance exits too, and a rerun of the job never meets it.
``standby`` is the long-lived form the MSA keeps running for a ``[[standby]]`` domain
(continuous rehydration, ``rocva.standby``): it brings ``<datastore>/<domain>/`` to the
newest consistent point every interval, writes ``<state_dir>/standby/<name>.status.json``
and exits once this site owns the domain. ``failback`` brings this site's own disks of the
domain (its inventory's images) to TARGET on the current timeline by the delta of both
histories, this site's DRVA logs and its dirty-region maps, then forks a timeline for
this site (``rocva.failback``). Store credentials come from the environment,
as for every verb; the images go only
under the datastore, never into the store or the MSA's state directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from cdp.cli.common import FiniteRange
from cdp.errors import CdpError
from cdp.msa.install_dirs import make_missing_dirs
from cdp.logs import setup_logging
from cdp.memory import bound_malloc

PROGRESS_EVERY_S = 0.25


def _line(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc, default=str) + "\n")
    sys.stdout.flush()


def _progress_lines() -> Any:
    """A ``progress(done, total)`` that prints ``{"progress": [done, total]}`` lines, at
    most every ``PROGRESS_EVERY_S`` (and the last one)."""
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S or done == total:
            last[0] = now
            _line({"progress": [done, total]})
    return progress


def failover_dir(cfg: Any, domain_name: str, *, test: bool = False) -> Path:
    """Where a failover of ``domain_name`` rehydrates its disks: a directory of its own
    in the site's datastore (the inventory's ``state_dir``); ``+test/<name>`` for a test
    failover, which must never touch a real one's images — nor be a real one's folder,
    as ``test-<name>`` was (the folder of a domain so named, deleted by the clean-up)."""
    from cdp.msa.failover import isolated_area

    if test:
        return isolated_area(cfg.cluster.state_dir, domain_name)
    return cfg.cluster.state_dir / domain_name


async def _failover(config: Path, domain: int, target: str, name: str, test: bool) -> dict[str, Any]:
    from cdp.msa.config import load_site_config
    from cdp.msa.operations import forbidden_places
    from cdp.store import open_store
    from rocva.destination import Destination
    from rocva.failover import failover
    from rocva.target import Target

    cfg = load_site_config(config)
    store = open_store(cfg.store_url_for(name))  # the peer's, for a domain of the peer
    progress = _progress_lines()

    make_missing_dirs(cfg.cluster.state_dir)  # 0755 under any umask; the datastore: a pilot light's may be new
    destination = Destination((cfg.cluster.state_dir,), forbidden_places(cfg))
    try:
        if test:  # a plain recovery: no fork, nothing written to the store but its lease
            from rocva.recover import recover
            from rocva.recover_options import RecoverOptions

            result = await recover(store, domain, RecoverOptions(target, failover_dir(cfg, name, test=True)),
                                   progress=progress, destination=destination)
            result.pop("plan", None)
            return result
        return await failover(store, domain, Target.parse(target), failover_dir(cfg, name), site=cfg.site,
                              progress=progress, destination=destination)
    finally:
        await store.close()


async def _failback(config: Path, domain: int, target: str, name: str) -> dict[str, Any]:
    from cdp.catalog import load_catalog
    from cdp.errors import FailoverRefused, NotFound
    from cdp.msa.config import load_site_config
    from cdp.store import open_store
    from rocva.failback import failback, inventory_disks
    from rocva.target import Target

    cfg = load_site_config(config)
    spec = next((d for d in cfg.cluster.domains if d.name == name), None)
    if spec is None:
        raise FailoverRefused(f"{cfg.cluster_path.name} has no domain {name}: a failback brings back this site's "
                              f"own disks of it; add the domain (its VMs and disks) to the inventory")
    store = open_store(cfg.store_url_for(name))  # this site's: the domain is its own
    try:
        state, _ = await load_catalog(store, domain)
        if state is None:
            raise NotFound(f"domain {domain}: no catalog in {store.describe()}: nothing to fail back")
        disks = inventory_disks(state.disks, {(d.vm.name, d.disk.name): d.disk for d in spec.disks}, name,
                                cfg.cluster_path.name)
        progress = _progress_lines()
        logs = [d.log_path for d in cfg.drvas if d.log_path.exists()]
        return await failback(store, domain, Target.parse(target), site=cfg.site, disks=disks, logs=logs,
                              progress=progress, peer=_peer_extents(cfg, name))
    finally:
        await store.close()


def _peer_extents(cfg: Any, name: str) -> Any:
    """Where a failback reads the recovery site's handed-back disks (``rocva.peer_extents``):
    its API's extents route, with the peer token the MSA passed on; None (the store is
    read) without a [peer] or its token."""
    from urllib.parse import quote

    from rocva.peer_extents import Peer

    if cfg.peer is None or not os.environ.get(cfg.peer.token_env):
        return None
    return Peer(f"{cfg.peer.api_url}/v1/failback/{quote(name, safe='')}/extents", cfg.peer_token(os.environ),
                cfg.peer.site, cfg.peer.ca)


@click.group()
@click.option("--exit-with-stdin", is_flag=True,
              help="Exit (code 1) as soon as stdin reaches its end: the MSA that started the appliance holds "
                   "stdin open as a pipe and never writes to it, so its death ends the job's appliance too.")
def cli(exit_with_stdin: bool) -> None:
    """The recovery appliance (started by the MSA)."""
    if exit_with_stdin:
        _exit_with_stdin()


def _exit_with_stdin() -> None:
    """Die with the MSA: a failover or failback whose job is gone must not go on writing
    the disks or fork the timeline while a rerun of the job starts its own appliance."""
    import threading

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass  # the MSA writes nothing; anything read is ignored
        except OSError:
            pass
        os._exit(1)  # no cleanup: what was written is redone by the rerun, nothing forked half

    threading.Thread(target=watch, name="exit-with-stdin", daemon=True).start()


async def _standby(config: Path, name: str, interval_s: float) -> None:
    """Keep ``name``'s standby warm until this site owns the domain (it failed over here)."""
    from cdp.catalog import find_domain
    from cdp.durable import atomic_write
    from cdp.errors import StoreError
    from cdp.msa.config import load_site_config
    from cdp.msa.operations import forbidden_places
    from cdp.store import open_store
    from rocva.destination import Destination
    from rocva.errors import InvalidTarget
    from rocva.standby import keep_warm

    cfg = load_site_config(config)
    store = open_store(cfg.store_url_for(name))  # the peer's: a standby is of a domain of the peer
    status_path = cfg.state_dir / "standby" / f"{name}.status.json"
    make_missing_dirs(status_path.parent)
    make_missing_dirs(cfg.cluster.state_dir)
    destination = Destination((cfg.cluster.state_dir,), forbidden_places(cfg))
    doc: dict[str, Any] = {"pid": os.getpid(), "domain": name, "seq": None, "timeline": None, "committed_seq": None,
                           "cold_builds": 0, "applies": 0, "last_error": None}
    try:
        domain_id = None
        while True:
            t0 = time.monotonic()
            try:
                found = await find_domain(store, name)
                if found is not None:
                    domain_id, state = found
                    tl = state.timeline()
                    if tl.owner == cfg.site:
                        doc["last_error"] = None
                        doc["state"] = "owned here"  # it failed over here: nothing to stand by for
                        atomic_write(status_path, json.dumps({**doc, "time": time.time()}).encode())
                        return
                    step = await keep_warm(store, domain_id, failover_dir(cfg, name), destination=destination)
                    doc.update(seq=step["seq"], timeline=step["timeline"], committed_seq=tl.committed_seq,
                               last_apply_s=step["seconds"], last_bytes=step["bytes_written"], last_error=None,
                               state="warm")
                    doc["cold_builds" if step["cold"] else "applies"] += 1
                else:
                    doc.update(state="waiting", last_error=f"no domain named {name} in the store yet")
            except InvalidTarget as exc:
                doc.update(state="waiting", last_error=exc.message)
            except (StoreError, CdpError) as exc:
                doc.update(state="error", last_error=exc.message)
            except OSError as exc:  # the datastore's (EFBIG, ENOSPC, EIO): said, and retried as the store's are
                where = f": {exc.filename}" if exc.filename else ""
                doc.update(state="error", last_error=f"{exc.strerror or str(exc) or type(exc).__name__}{where}")
            atomic_write(status_path, json.dumps({**doc, "id": domain_id, "time": time.time()}).encode())
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - t0)))
    finally:
        await store.close()


@cli.command("standby")
@click.option("--config", "config", type=click.Path(path_type=Path), required=True)
@click.option("--name", required=True, help="The domain's name (its directory in the datastore).")
@click.option("--interval", "interval_s", type=FiniteRange(0.05, 60.0), default=0.5, show_default=True)
def standby_command(config: Path, name: str, interval_s: float) -> None:
    """Continuous rehydration of domain NAME (supervised by the MSA)."""
    from cdp.msa.failover import check_domain_name

    check_domain_name(name)
    asyncio.run(_standby(config, name, interval_s))


@cli.command("failover")
@click.option("--config", "config", type=click.Path(path_type=Path), required=True)
@click.option("--domain", type=int, required=True, help="The domain id.")
@click.option("--name", required=True, help="The domain's name (its directory in the datastore).")
@click.option("--target", default="latest", show_default=True)
@click.option("--test", is_flag=True, help="Rehydrate into +test/<name> only: no fork (a test failover).")
def failover_command(config: Path, domain: int, name: str, target: str, test: bool) -> None:
    from cdp.msa.failover import check_domain_name

    check_domain_name(name)
    result = asyncio.run(_failover(config, domain, target, name, test))
    _line({"result": result})


@cli.command("failback")
@click.option("--config", "config", type=click.Path(path_type=Path), required=True)
@click.option("--domain", type=int, required=True, help="The domain id.")
@click.option("--name", required=True, help="The domain's name in this site's inventory.")
@click.option("--target", required=True, help="The point on the current timeline (the other site's final mark).")
def failback_command(config: Path, domain: int, name: str, target: str) -> None:
    from cdp.msa.failover import check_domain_name

    check_domain_name(name)
    result = asyncio.run(_failback(config, domain, target, name))
    _line({"result": result})


def main() -> None:
    setup_logging(os.environ.get("CDP_LOG_LEVEL", "warning"))
    bound_malloc()
    try:
        cli.main(standalone_mode=False)
    except click.ClickException as exc:
        _line({"error": exc.format_message(), "exit_code": 2})
        sys.exit(2)
    except CdpError as exc:
        _line({"error": exc.message, "exit_code": exc.exit_code})
        sys.exit(exc.exit_code)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        _line({"error": f"{exc.strerror or type(exc).__name__}{where}", "exit_code": 1})
        sys.exit(1)


if __name__ == "__main__":
    main()
