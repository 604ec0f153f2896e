"""The filter's connection to a DRVA: handshake, stream frames, take acks, reconnect.

With ``tls`` (the site CA's context, ``cdp.tls.client_context``) every connection is TLS
and the DRVA's certificate must be the site CA's and name the address dialled (or
``server_name``): there is no fallback to plain TCP. A refused certificate is retried
like any other failed connection (the operator may be fixing it), logged when its
reason changes, and kept in ``last_error`` in words (``cdp.tls.describe_tls_error``).

One ``FilterClient`` carries the domains that stream to one DRVA. It keeps connecting
(with backoff) for as long as it runs; after each ``WELCOME`` it drops what the DRVA
reports durable and resends every other buffered frame, oldest first — the DRVA drops
duplicates by seq, so a resend is always safe.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Callable, Sequence
from typing import Any

from cdp import wire
from cdp.logs import get_logger
from cdp.tls import describe_tls_error
from iofilter_sim.filter import DomainFilter, FilterError

log = get_logger("iofilter.client")

STATE_EVERY_S = 1.0
# An idle sender still wakes this often: resync progress and FILTER_STATE are due.
SEND_IDLE_WAKE_S = STATE_EVERY_S / 4
# The DRVA answers each handshake step at once; a silent one is not worth waiting on.
HANDSHAKE_REPLY_TIMEOUT_S = 10.0
RECONNECT_MAX_S = 2.0
SEND_WINDOW_BYTES = 8 << 20  # drain after this much, so acks keep flowing


class AuthError(Exception):
    """The DRVA refused us, or is not who it claims to be."""


class FilterClient:
    """Streams the frames of ``filters`` to the DRVA at ``host:port``."""

    def __init__(self, filters: Sequence[DomainFilter], host: str, port: int, secret: bytes,
                 name: str, *, site: str = "site", tls: ssl.SSLContext | None = None,
                 server_name: str | None = None) -> None:
        self.filters = {f.domain: f for f in filters}
        self.host, self.port, self.secret, self.name, self.site, self.tls = host, port, secret, name, site, tls
        # The name the DRVA's certificate must hold (default: the host dialled).
        self.server_name = server_name if tls is not None else None
        self.connected = False
        self.connections = 0
        self.last_error: str | None = None
        self._wake = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self.seed_done: dict[tuple[int, int], dict[str, Any]] = {}
        self.seed_event = asyncio.Event()
        # Called as on_mark(domain, name, seq) right after a requested mark is inserted,
        # before anything else runs: the primaries are exactly at the mark then.
        self.on_mark: Callable[[int, str, int], None] | None = None
        self._live: dict[int, DomainFilter] = dict(self.filters)  # the domains of the current session
        for f in filters:
            f.on_change = self._wake.set

    # ------------------------------------------------------------------ connection loop

    async def run(self) -> None:
        attempt = 0
        while True:
            if all(f.fenced for f in self.filters.values()):
                # Every domain runs at another site now: nothing may be sent, ever.
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.tls,
                                                               server_hostname=self.server_name)
            except ssl.SSLError as exc:  # before OSError: it is one
                attempt += 1
                error = describe_tls_error(exc, f"DRVA {self.host}:{self.port}", ctx=self.tls)
                if error != self.last_error:
                    log.warning("filter_tls_refused", drva=f"{self.host}:{self.port}", error=error)
                self.last_error = error
                await asyncio.sleep(random.uniform(0, min(RECONNECT_MAX_S, 0.05 * 2 ** attempt)))
                continue
            except OSError as exc:
                attempt += 1
                self.last_error = f"connect: {exc}"
                await asyncio.sleep(random.uniform(0, min(RECONNECT_MAX_S, 0.05 * 2 ** attempt)))
                continue
            try:
                await self._session(reader, writer)
                attempt = 0
            except (OSError, asyncio.IncompleteReadError, wire.ProtocolError, AuthError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.info("filter_disconnected", drva=f"{self.host}:{self.port}", error=self.last_error)
                attempt += 1
            finally:
                self.connected = False
                self._writer = None
                writer.close()
            await asyncio.sleep(random.uniform(0, min(RECONNECT_MAX_S, 0.05 * 2 ** attempt)))

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        where = f"DRVA {self.host}:{self.port}"
        nonce = wire.new_nonce()
        # A fenced domain is left out: the DRVA refuses a HELLO naming one (and with it
        # the whole session), which would stop every other domain of this filter too.
        self._live = {d: f for d, f in self.filters.items() if not f.fenced}
        writer.writelines(wire.control(wire.HELLO, {
            "version": wire.WIRE_VERSION, "filter": self.name, "site": self.site,
            "domains": sorted(self._live), "nonce": nonce.hex()}))
        try:
            challenge = await self._expect(reader, wire.CHALLENGE, where)
        except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
            if self.tls is not None or getattr(exc, "partial", b""):
                raise
            # A DRVA that serves TLS closes a plain connection (reset, when our HELLO was not
            # all read) without a byte of ours read.
            raise ConnectionError(f"{where} closed the connection before its CHALLENGE: if it serves TLS, give "
                                  f"this filter the site CA (--tls-ca, or [tls] ca in the cluster file)") from None
        drva_nonce = wire.parse_nonce(challenge.get("nonce"), where)
        drva_name = str(challenge.get("drva", ""))
        writer.writelines(wire.control(wire.AUTH, {"mac": wire.filter_mac(self.secret, nonce, drva_nonce, self.name)}))
        welcome = await self._expect(reader, wire.WELCOME, where)
        if not wire.mac_matches(wire.drva_mac(self.secret, nonce, drva_nonce, drva_name), welcome.get("mac")):
            raise AuthError(f"{where} failed to prove it knows the site secret")
        for domain, st in (welcome.get("domains") or {}).items():
            f = self._live.get(int(domain))
            if f is None:
                continue
            durable = int(st.get("durable_seq", 0))
            if durable > f.next_seq - 1:
                # The DRVA holds seqs this filter never numbered: a new filter instance for
                # an existing domain. Before any capture it continues after them; after,
                # taking the ack would silently drop our own writes numbered <= durable.
                if f.next_seq == 1 and not f.buffer:
                    f.continue_after(durable)
                else:
                    raise wire.ProtocolError(
                        "seq_behind", f"{where}: domain {f.domain} is durable up to seq {durable} on the "
                        f"DRVA, but this filter numbered only up to {f.next_seq - 1}: another filter "
                        f"instance wrote this domain; refusing to treat our writes as acked")
            f.on_ack(durable)
            f.rewind()
        self.connected = True
        self.connections += 1
        self._writer = writer
        log.info("filter_connected", drva=where, drva_name=drva_name, domains=sorted(self._live))
        tasks = [asyncio.create_task(self._receive(reader, where)), asyncio.create_task(self._send(writer))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _expect(self, reader: asyncio.StreamReader, mtype: int, where: str) -> dict[str, Any]:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the message and
        # drops a cancellation that lands in the loop iteration the message completes in.
        async with asyncio.timeout(HANDSHAKE_REPLY_TIMEOUT_S):
            msg = await wire.read_message(reader, where)
        if msg.type == wire.ERROR:
            doc = msg.json(where)
            self._note_fenced(doc, where)
            raise AuthError(f"{where} refused: {doc.get('code')}: {doc.get('message')}")
        if msg.type != mtype:
            raise wire.ProtocolError("unexpected_message", f"{where}: expected {wire.TYPE_NAMES[mtype]}, got {msg.name}")
        return msg.json(where)

    async def _receive(self, reader: asyncio.StreamReader, where: str) -> None:
        while True:
            msg = await wire.read_message(reader, where)
            if msg.type == wire.ACK:
                domain, flags, durable, _ = wire.parse_ack(msg.body, where)
                f = self.filters.get(domain)
                if f is not None:
                    f.on_ack(durable)
                    f.backpressure = bool(flags & wire.ACK_BACKPRESSURE)
                    self._wake.set()
            elif msg.type == wire.ERROR:
                doc = msg.json(where)
                self._note_fenced(doc, where)
                raise wire.ProtocolError(str(doc.get("code")), f"{where}: {doc.get('message')}")
            elif msg.type == wire.SEED_DONE:
                doc = msg.json(where)
                self.seed_done[(doc["domain"], doc["disk"])] = doc
                self.seed_event.set()
            elif msg.type == wire.PING:
                if self._writer is not None:
                    self._writer.writelines(wire.control(wire.PONG, {}))
            elif msg.type == wire.MARK_REQUEST:
                self._mark_requested(msg.json(where), where)

    def _note_fenced(self, doc: dict[str, Any], where: str) -> None:
        """An ``ERROR fenced`` names a domain its DRVA will never write again (another site
        owns it): that filter's unacked writes can never be acked, so nothing waits on
        them (``DomainFilter.fenced``); they stay flagged in its dirty-region maps."""
        f = self.filters.get(doc.get("domain")) if doc.get("code") == "fenced" else None  # type: ignore[arg-type]
        if f is not None and not f.fenced:
            f.fenced = True
            f.on_acked()
            log.warning("domain_fenced", drva=where, domain=f.domain, unacked=f.next_seq - 1 - f.acked_seq,
                        reason=str(doc.get("message"))[:300])

    def _mark_requested(self, doc: dict[str, Any], where: str) -> None:
        """A mark asked for by the management server (FORMAT.md §9, ``MARK_REQUEST``)."""
        f = self.filters.get(doc.get("domain"))  # type: ignore[arg-type]
        name = doc.get("name")
        if f is None or not isinstance(name, str):
            log.warning("mark_request_refused", where=where, reason="unknown domain or no name")
            return
        try:
            seq = f.mark(name)
        except FilterError as exc:  # bitmap/resync mode: no consistent point to mark
            log.warning("mark_request_refused", where=where, domain=f.domain, reason=str(exc))
            return
        log.info("mark_inserted", domain=f.domain, name=name, seq=seq)
        if self.on_mark is not None:
            self.on_mark(f.domain, name, seq)
        self._wake.set()

    async def _send(self, writer: asyncio.StreamWriter) -> None:
        """Send unsent frames, oldest first; a FILTER_STATE per domain every second."""
        loop = asyncio.get_running_loop()
        live = list(self._live.values())  # this session's domains: a fenced one is not among them
        next_state = 0.0
        reported: dict[int, str] = {}
        while True:
            sent = 0
            for f in live:
                # Re-read the buffer after every await: capture may have dropped unsent
                # frames meanwhile (bitmap mode), and their seqs are reused.
                while not f.backpressure and (frame := f.next_unsent()) is not None:
                    writer.writelines(wire.frame_message(f.wire_parts(frame)))
                    f.mark_sent()
                    sent += frame.nbytes
                    if sent >= SEND_WINDOW_BYTES:
                        await writer.drain()
                        sent = 0
            for f in live:
                if f.mode != "normal":  # bitmap/resync: the path is up, move dirty regions
                    f.resync_step(self.connected)
            modes = {f.domain: f.mode for f in live}
            if loop.time() >= next_state or modes != reported:
                for f in live:
                    writer.writelines(wire.control(wire.FILTER_STATE, f.state()))
                next_state, reported = loop.time() + STATE_EVERY_S, modes
            await writer.drain()
            self._wake.clear()
            if not any((f.next_unsent() and not f.backpressure) or (f.mode != "normal" and f.healthy(True))
                       for f in live):
                # Not wait_for (Python 3.11): a cancellation landing as the wake fires
                # would be dropped and this loop would run on, so a stop never ended.
                try:
                    async with asyncio.timeout(SEND_IDLE_WAKE_S):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    # ------------------------------------------------------------------ seeding

    async def send_seed(self, messages: list[list]) -> None:
        """Send seeding messages on the current connection (raises if not connected)."""
        if self._writer is None:
            raise ConnectionError("not connected to the DRVA")
        for m in messages:
            self._writer.writelines(m)
            await self._writer.drain()
