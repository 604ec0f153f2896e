"""The DRVA daemon: accept filter streams, make them durable, ship them to the store.

``Drva.start`` recovers before it listens: it opens (or formats) the log partition and
the metadata repository, rebuilds each domain's pending entries from the log, then
starts a few long-lived tasks, each a loop around a ``step`` that tests may call
directly: the group committer, the sealer, the upload workers, the catalog committer,
the catalog opener (retries while the store is unreachable) and the status writer. The
sealer, the upload workers, the catalog committer and the catalog opener are per store
(``drva.lanes``): one set for a DRVA whose domains all live in one store.

A restart resumes with no gap and no duplicate: what the log holds beyond the catalog's
committed seq is sealed and uploaded again; what the catalog already names is dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cdp import eventloop, wire
from cdp.catalog import CorruptGeneration
from cdp.errors import CdpError, Fenced, StoreError
from cdp.frame import FRAME_LEN_MAX
from cdp.logs import get_logger, setup_logging
from cdp.memory import bound_malloc
from cdp.tls import describe_tls_error, server_context
from drva.committer import FrameBudget, GroupCommitter
from drva.config import LOG_SIZE_ANY_FRAME, DrvaConfig, load_drva_config
from drva.domain import DomainState
from drva.lanes import StoreLane, open_lanes
from drva.partitions import PartitionsMixin
from drva.seeder import Seeder
from drva.requests import RequestBox
from drva.handshakes import HANDSHAKES_MAX, HandshakeSlots, source_of
from drva.session import HANDSHAKE_READ_AHEAD_BYTES, HANDSHAKE_TIMEOUT_S, Session, SessionStream
from drva.shipper import Shipper, backoff_s
from drva.state_lock import StateDirLock
from drva.status import SideFileReport, build_status, write_status_file

log = get_logger("drva")

SEAL_TICK_S = 0.05
COMMIT_POLL_S = 0.5  # the catalog committer's wait for an upload, at most
# A domain being taken over reads the catalog this often until the fork — and at once when
# nudged (SIGUSR1: the failover's MSA sends it when its appliance has forked). A
# rehydration takes seconds to hours: reading the catalog ten times a second meanwhile
# took CPU from it on a 2-core machine.
TAKEOVER_POLL_S = 1.0
TAKEOVER_WAITING = "waiting for the failover's fork"
BUSY_LOG_INTERVAL_S = 1.0


def _listen_socket(host: str, port: int) -> socket.socket:
    """A non-blocking listening TCP socket on (host, port); port 0 picks a free one."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Drva(PartitionsMixin):
    """One DRVA process (see the module docstring)."""

    def __init__(self, cfg: DrvaConfig, *, exit_on_task_failure: bool = True) -> None:
        self.cfg = cfg
        self.exit_on_task_failure = exit_on_task_failure
        self.failure: BaseException | None = None
        self.domains = {d.id: DomainState(d) for d in cfg.domains}
        self.lanes: list[StoreLane] = []  # one per store (start)
        # Per lane (same index): frames received and not staged yet (FrameBudget).
        self.frame_budgets: list[FrameBudget] = []
        self.sessions: set[Session] = set()  # welcomed
        self.handshaking: set[Session] = set()  # accepted, not welcomed yet (each holds a slot)
        # Slots of the connections between accept and WELCOME, TLS handshakes included.
        self.slots = HandshakeSlots(HANDSHAKES_MAX)
        self.refused_busy = 0
        self.refused_tls = 0  # connections whose TLS handshake failed or timed out
        self.tls_handshaking = 0  # accepted TLS connections still in the TLS handshake (count in the cap)
        self._listener: socket.socket | None = None  # with TLS: the socket _accept_tls_loop accepts on
        self._busy_logged = -BUSY_LOG_INTERVAL_S
        self.session_tasks: set[asyncio.Task] = set()
        self.tasks: list[asyncio.Task] = []
        self.server: asyncio.AbstractServer | None = None
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="drva-seal")
        self.started = time.time()
        self._port = cfg.port
        self.status_report = SideFileReport("status_unwritable")
        self.log_label_ours = False  # the log's label names this DRVA (_check_log_label)
        self.state_lock: StateDirLock | None = None  # held from start to stop

    # ------------------------------------------------------------------ start / stop

    async def start(self) -> None:
        cfg = self.cfg
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        # Before anything is opened or written: a second DRVA given this state directory
        # (a copied configuration) is refused (Busy, exit 7), not run beside the first.
        self.state_lock = StateDirLock.take(cfg.state_dir)
        try:
            await self._start()
        except BaseException:
            self.state_lock.release()
            raise

    async def _start(self) -> None:
        cfg = self.cfg
        await asyncio.to_thread(self._open_partitions)
        self.lanes = open_lanes(cfg, self.domains)
        # As many bytes of frames may wait in front of the staging area as it holds
        # (FORMAT.md §9.2): enough to keep it full, and no more per domain.
        self.frame_budgets = [FrameBudget(cfg.staging_bytes_max) for _ in self.lanes]
        self.committer = GroupCommitter(
            self.log, staging_bytes_max=cfg.staging_bytes_max, high_water=cfg.high_water,
            low_water=cfg.low_water, on_durable=self._on_durable,
            cache_bytes_max=cfg.frame_cache_bytes)
        self.shipper = Shipper(
            name=cfg.name, site=cfg.site, log_=self.log, lanes=self.lanes, meta=self.meta,
            committer=self.committer, domains=self.domains, seal_bytes=cfg.seal_bytes,
            seal_age_s=cfg.seal_age_s, upload_concurrency=cfg.upload_concurrency, pool=self.pool)
        self.seeder = Seeder(self)
        if self.committer.frame_len_max < FRAME_LEN_MAX:
            log.warning("log_refuses_large_frames", log=str(cfg.log_path), data_size=self.log.data_size,
                        frame_len_max=self.committer.frame_len_max, wire_frame_len_max=FRAME_LEN_MAX,
                        reason=f"frames whose log entry fills more than half the log are refused "
                               f"(ERROR frame_too_large); a log.size of {LOG_SIZE_ANY_FRAME} bytes takes any frame")
        spawn = self._spawn
        spawn(self.committer.run(), "committer")
        for lane in self.lanes:
            spawn(self._seal_loop(lane), lane.task_name("sealer"))
            for i in range(cfg.upload_concurrency):
                spawn(self.shipper.upload_worker(lane), lane.task_name(f"uploader-{i}"))
            spawn(self._commit_loop(lane), lane.task_name("catalog-committer"))
            spawn(self._open_catalogs(lane), lane.task_name("catalog-opener"))
        spawn(self._status_loop(), "status")
        spawn(RequestBox(self).run(), "requests")
        tls = self._tls()
        if tls is None:
            self.server = await asyncio.get_running_loop().create_server(
                lambda: SessionStream(HANDSHAKE_READ_AHEAD_BYTES, self._accept), cfg.host, cfg.port,
                reuse_address=True)
            self._port = self.server.sockets[0].getsockname()[1]
        else:
            # Not start_server(ssl=...): there the TLS handshake runs before the accept
            # callback, outside the cap of HANDSHAKES_MAX and its deadline, so a flood of
            # slow TLS handshakes would hold sockets and buffers unbounded. Here a
            # connection takes its slot at accept and keeps it until WELCOME.
            self._listener = _listen_socket(cfg.host, cfg.port)
            self._port = self._listener.getsockname()[1]
            spawn(self._accept_tls_loop(tls), "tls-accept")
        log.info("drva_started", name=cfg.name, listen=f"{cfg.host}:{self.port}",
                 log=str(cfg.log_path), store=self.shipper.store.describe(),
                 domains=sorted(self.domains), log_head=self.log.head, log_tail=self.log.tail,
                 **({"stores": {lane.store.describe(): sorted(d.id for d in lane.domains) for lane in self.lanes}}
                    if len(self.lanes) > 1 else {}))

    @property
    def port(self) -> int:
        """The port actually listened on (the configuration may say 0)."""
        return self._port

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self.tasks.append(task)

    def _task_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A pipeline task must not die quietly: without it acked data stops moving.
            self.failure = task.exception()
            log.error("task_failed", task=task.get_name(), error=repr(self.failure))
            if self.exit_on_task_failure:
                os._exit(70)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        if self._listener is not None:
            self._listener.close()  # its accept loop is among the tasks cancelled next
        pending = [*self.session_tasks, *self.seeder.finishing, *self.tasks]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self.write_status()
        for lane in self.lanes:
            await lane.store.close()
        self.log.close()
        self.meta.close()
        self.pool.shutdown()
        self.shipper.close()
        if self.state_lock is not None:
            self.state_lock.release()
        log.info("drva_stopped", name=self.cfg.name)

    def _tls(self) -> ssl.SSLContext | None:
        if self.cfg.tls_cert is None:
            return None
        return server_context(self.cfg.tls_cert, self.cfg.tls_key)  # TLS >= 1.2 (cdp.tls)

    def _accept(self, reader: SessionStream, writer: asyncio.StreamWriter) -> None:
        source = source_of(writer.get_extra_info("peername"))
        refusal = self.slots.refusal(source)
        if refusal is not None:
            self._refuse_busy(writer, refusal)
            return
        session = Session(self, reader, writer)
        self._hold_slot(session, source)  # until WELCOME (Session._take_over) or close
        # A task of our own rather than a coroutine callback: Python 3.11's stream server
        # calls task.exception() on a cancelled callback task (stop() cancels sessions),
        # which raises; and so nothing here has to swallow a cancellation.
        task = asyncio.create_task(session.run(), name="session")
        self.session_tasks.add(task)
        task.add_done_callback(self._session_done)

    async def _accept_tls_loop(self, tls: ssl.SSLContext) -> None:
        """Accept on the TLS listener: each connection takes a handshake slot before its
        TLS handshake starts (or is closed at once when none is free)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(self._listener)
            except OSError as exc:
                # EMFILE, ECONNABORTED...: the listener is fine, this accept was not.
                log.warning("accept_failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            source = source_of(addr)
            refusal = self.slots.refusal(source)
            if refusal is not None:
                # No ERROR busy: before its TLS handshake the peer could not read it.
                conn.close()
                self._count_busy(refusal)
                continue
            self.slots.take(source)
            self.tls_handshaking += 1
            task = asyncio.create_task(self._tls_session(conn, addr, tls), name="session")
            self.session_tasks.add(task)
            task.add_done_callback(self._session_done)

    async def _tls_session(self, conn: socket.socket, addr: Any, tls: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANDSHAKE_TIMEOUT_S  # from accept to WELCOME, TLS included
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        protocol = SessionStream(HANDSHAKE_READ_AHEAD_BYTES)
        source = source_of(addr)
        connected = False
        try:
            try:
                await loop.connect_accepted_socket(
                    lambda: protocol, conn, ssl=tls, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
                connected = True
            finally:
                self.tls_handshaking -= 1
                if not connected:
                    self.slots.release(source)  # it never reaches the wire handshake
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            conn.close()
            self.refused_tls += 1
            log.warning("tls_handshake_refused", peer=peer, refused_total=self.refused_tls,
                        reason=describe_tls_error(exc, f"filter {peer}"))
            return
        assert protocol.writer is not None  # connection_made ran
        session = Session(self, protocol, protocol.writer, handshake_deadline=deadline)
        # The slot passes from TLS to the wire handshake, no await between.
        session.slot_source = source
        self.handshaking.add(session)
        await session.run()

    def _hold_slot(self, session: Session, source: str) -> None:
        self.slots.take(source)
        session.slot_source = source
        self.handshaking.add(session)

    def handshake_ended(self, session: Session) -> None:
        """``session`` was welcomed or closed: the handshake slot it held (if any) is free."""
        self.handshaking.discard(session)
        if session.slot_source is not None:
            self.slots.release(session.slot_source)
            session.slot_source = None

    def _refuse_busy(self, writer: asyncio.StreamWriter, refusal: str) -> None:
        """No handshake slot for this peer: ERROR busy and close, nothing read."""
        writer.writelines(wire.error_message("busy", f"DRVA {self.cfg.name}: {refusal}, retry later"))
        writer.close()  # the ERROR fits the socket's send buffer: this does not linger
        self._count_busy(refusal)

    def _count_busy(self, refusal: str) -> None:
        """Logged at most once per BUSY_LOG_INTERVAL_S, with the count: a flood must not
        flood the log too."""
        self.refused_busy += 1
        now = time.monotonic()
        if now - self._busy_logged >= BUSY_LOG_INTERVAL_S:
            self._busy_logged = now
            log.warning("handshakes_full", reason=refusal, handshakes_max=self.slots.total_max,
                        per_source_max=self.slots.per_source_max, refused_total=self.refused_busy)

    def _session_done(self, task: asyncio.Task) -> None:
        self.session_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug in one session: it is closed (Session.run's finally), the DRVA goes on.
            log.error("session_failed", error=repr(task.exception()))

    def _on_durable(self, touched: set[DomainState]) -> None:
        for dom in touched:
            if dom.session is not None:
                dom.session.want_ack()

    def nudge_takeovers(self) -> None:
        """Read the catalogs of the domains being taken over now (SIGUSR1)."""
        for lane in self.lanes:
            lane.takeover_nudge.set()

    async def _seal_loop(self, lane: StoreLane | None = None) -> None:
        lane = lane or self.lanes[0]
        while True:
            if not await self.shipper.seal_step(lane=lane):
                await asyncio.sleep(SEAL_TICK_S)

    async def _commit_loop(self, lane: StoreLane | None = None) -> None:
        lane = lane or self.lanes[0]
        while True:
            lane.uploaded.clear()
            await self.shipper.commit_step(lane)
            try:
                async with asyncio.timeout(COMMIT_POLL_S):
                    await lane.uploaded.wait()
            except TimeoutError:
                pass  # commit at least this often: a seeding commit may be waiting too

    async def _open_catalogs(self, lane: StoreLane) -> None:
        """Open the catalog of every domain of ``lane``, retrying while its store is
        unreachable, while a generation of a domain stays corrupt over several reads
        (``CorruptGeneration``), and while a domain taken over from another site
        (``takeover``) is not this site's yet."""
        attempt = 0
        pending = list(lane.domains)
        while pending:
            dom = pending[0]
            try:
                await self.shipper.open_catalog(dom)
                pending.pop(0)
                attempt = 0
                if dom.cfg.takeover and (dom.stats.last_error or "").startswith(TAKEOVER_WAITING):
                    dom.stats.last_error = None
                    log.info("takeover_done", domain=dom.id)
            except Fenced as exc:
                if not dom.cfg.takeover:
                    self._unusable(dom, exc)  # another site owns it: fenced for good
                    pending.pop(0)
                    continue
                if not dom.stats.last_error:
                    log.info("takeover_waiting", domain=dom.id, reason=exc.message)
                dom.stats.last_error = f"{TAKEOVER_WAITING}: {exc.message}"
                pending.append(pending.pop(0))  # the other domains open meanwhile
                if all(d.cfg.takeover and (d.stats.last_error or "").startswith(TAKEOVER_WAITING) for d in pending):
                    # Nothing else to open: wait for the fork (or a nudge).
                    try:
                        async with asyncio.timeout(TAKEOVER_POLL_S):
                            await lane.takeover_nudge.wait()
                    except TimeoutError:
                        pass
                    lane.takeover_nudge.clear()
            except StoreError as exc:
                attempt += 1
                self.shipper._store_error(dom, "catalog_open_failed", exc, attempt=attempt)
                await asyncio.sleep(backoff_s(attempt, self.shipper.rng))
            except CorruptGeneration as exc:
                # Bytes that failed their sums on every read: damaged in the store or on
                # each transfer so far, which says nothing of another writer. Stopping the
                # domain for good on it needed a restart once the link healed: said (an
                # MSA raises store_errors), tried again; the lane's other domains open meanwhile.
                attempt += 1
                dom.stats.catalog_errors += 1
                self.shipper._store_error(dom, "catalog_open_corrupt", exc, attempt=attempt, key=exc.key)
                pending.append(pending.pop(0))
                await asyncio.sleep(backoff_s(attempt, self.shipper.rng))
            except CdpError as exc:  # a catalog that does not decode: this domain cannot be served
                self._unusable(dom, exc)
                pending.pop(0)

    def _unusable(self, dom: DomainState, exc: CdpError) -> None:
        dom.fenced = True
        dom.stats.last_error = exc.message
        log.error("catalog_unusable", domain=dom.id, error=exc.message)

    async def _status_loop(self) -> None:
        while True:
            await self.write_status()
            await asyncio.sleep(self.cfg.status_interval_s)

    def status(self) -> dict[str, Any]:
        """The status document; on the loop only (it iterates deques the loop mutates)."""
        return build_status(self)

    async def write_status(self) -> bool:
        """One status write: the snapshot is a plain dict taken here, on the loop, where
        nothing mutates the domains' deques meanwhile; only its encoding and the file
        write leave the loop (they touch nothing shared). False when it failed: the
        error is reported (``status_unwritable``) and the next tick tries again — a side
        file never stops the data path."""
        doc = self.status()
        path = self.cfg.status_path
        problem = await asyncio.to_thread(write_status_file, path, doc)
        if problem is not None:
            self.status_report.failed(path, problem)
            return False
        self.status_report.succeeded(path)
        return True


async def run(cfg: DrvaConfig) -> None:
    drva = Drva(cfg)
    loop = asyncio.get_running_loop()
    # Before start(): the MSA nudges only a DRVA whose status it read, written after this.
    loop.add_signal_handler(signal.SIGUSR1, drva.nudge_takeovers)
    await drva.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await drva.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="drva", description="DR virtual appliance daemon")
    p.add_argument("--config", required=True, help="the DRVA's TOML configuration")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    bound_malloc()
    try:
        cfg = load_drva_config(args.config)
        eventloop.run(run(cfg))
    except CdpError as exc:
        log.error("drva_failed", error=exc.message)
        print(f"drva: error: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
