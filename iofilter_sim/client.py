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

A DRVA is trusted with the site secret, not with well-formed input: every control body
it sends is checked whole (``parse_drva_message``: its keys, each value's JSON type and
range) before anything acts on it, a type the filter never takes (``FRAME``,
``SEED_CHUNK``...) is refused from its header before its body is read, an ``ACK`` of a
seq this filter never sent is refused (taking it would answer a FLUSH and unflag the
dirty-region maps for writes the DRVA never received), and PONGs stop while the DRVA
does not read them. A refusal ends the session with a ``ProtocolError`` naming the
message and the field; the client reconnects with backoff, as after any failed session.
"""

from __future__ import annotations

import asyncio
import random
import re
import ssl
from collections.abc import Callable, Sequence
from typing import Any

from cdp import wire
from cdp.layout import U32_MAX
from cdp.logs import get_logger
from cdp.records import MARK_NAME_CONTROL, MARK_NAME_MAX
from cdp.tls import describe_tls_error
from cdp.tomlread import NAME
from cdp.wire_checks import (
    DISK, DOMAIN, ERROR_FIELDS, HEX_MAC, HEX_NONCE, U64, Check, check_body, match, refuse, uint,
)
from iofilter_sim.filter import DomainFilter, FilterError

log = get_logger("iofilter.client")

STATE_EVERY_S = 1.0
# An idle sender still wakes this often: resync progress and FILTER_STATE are due.
SEND_IDLE_WAKE_S = STATE_EVERY_S / 4
# The DRVA answers each handshake step at once; a silent one is not worth waiting on.
HANDSHAKE_REPLY_TIMEOUT_S = 10.0
RECONNECT_MAX_S = 2.0
SEND_WINDOW_BYTES = 8 << 20  # drain after this much, so acks keep flowing
# Above this many bytes unsent to the DRVA no PONG is added (as the DRVA's own bound on
# what it queues for a filter): one PONG answers every PING before it, and a DRVA that
# sent PINGs and never read grew the filter's memory by 18 bytes a PING, without end.
PONG_WRITE_BUFFER_MAX = 1 << 20
# The messages a DRVA may send once welcomed; any other is refused from its header.
SESSION_TYPES = frozenset({wire.ACK, wire.ERROR, wire.SEED_DONE, wire.PING, wire.PONG, wire.MARK_REQUEST})


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
            except Exception as exc:  # noqa: BLE001 - a bug, or input nothing checked: this session ends, not the filter
                # (CancelledError is not an Exception: a stop still ends the loop.)
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("filter_session_failed", drva=f"{self.host}:{self.port}", error=self.last_error,
                          exc_info=True)
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
        drva_nonce = wire.parse_nonce(challenge["nonce"], where)
        drva_name = challenge["drva"]
        writer.writelines(wire.control(wire.AUTH, {"mac": wire.filter_mac(self.secret, nonce, drva_nonce, self.name)}))
        welcome = await self._expect(reader, wire.WELCOME, where)
        if not wire.mac_matches(wire.drva_mac(self.secret, nonce, drva_nonce, drva_name), welcome["mac"]):
            raise AuthError(f"{where} failed to prove it knows the site secret")
        durable_of: dict[int, int] = welcome["domains"]
        if set(durable_of) != set(self._live):
            # A domain left out would be neither rewound nor told where its seqs go on.
            raise wire.ProtocolError("bad_message", f"{where}: WELCOME.domains: expected the domains of the HELLO "
                                                    f"{_ids(self._live)}, got {_ids(durable_of)}")
        for domain, durable in durable_of.items():
            self._welcomed(self._live[domain], durable, where)
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

    def _welcomed(self, f: DomainFilter, durable: int, where: str) -> None:
        """What ``WELCOME`` says of one domain: where its seqs go on, what is durable."""
        # Back-pressure was the last connection's word: this DRVA says it again in its next
        # ACK if it still holds. Kept, it stopped every send until an ack that could only
        # follow a send — while live writes filled the buffer into bitmap mode.
        f.backpressure = False
        if durable > f.sent_seq:
            # The DRVA holds seqs this filter never sent: a new filter instance for an
            # existing domain. If it never sent a frame, nothing of its own is there: it
            # numbers on after them (what it captured meanwhile, numbered before it knew
            # where to, goes to the bitmap and is resynced). Once it sent frames, taking
            # the ack would silently drop our own writes numbered <= durable.
            if not f.sent_any:
                f.restart_after(durable)
            else:
                raise wire.ProtocolError(
                    "seq_behind", f"{where}: domain {f.domain} is durable up to seq {durable} on the DRVA, "
                    f"but this filter sent only up to seq {f.sent_seq} (numbered up to {f.next_seq - 1}): "
                    f"another filter instance wrote this domain; refusing to treat our writes as acked")
        f.on_ack(durable)
        f.rewind()

    async def _expect(self, reader: asyncio.StreamReader, mtype: int, where: str) -> dict[str, Any]:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the message and
        # drops a cancellation that lands in the loop iteration the message completes in.
        async with asyncio.timeout(HANDSHAKE_REPLY_TIMEOUT_S):
            msg = await wire.read_message(reader, where, allowed=(mtype, wire.ERROR))
        doc = parse_drva_message(msg, where)
        if msg.type == wire.ERROR:
            self._note_fenced(doc, where)
            raise AuthError(f"{where} refused: {doc['code']}: {doc['message']}")
        return doc

    async def _receive(self, reader: asyncio.StreamReader, where: str) -> None:
        while True:
            msg = await wire.read_message(reader, where, allowed=SESSION_TYPES)
            if msg.type == wire.ACK:
                self._ack(msg.body, where)
                continue
            doc = parse_drva_message(msg, where)
            if msg.type == wire.ERROR:
                self._note_fenced(doc, where)
                raise wire.ProtocolError(doc["code"], f"{where}: {doc['message']}")
            if msg.type == wire.SEED_DONE:
                self._seed_done(doc, where)
            elif msg.type == wire.PING:
                self._pong()
            elif msg.type == wire.MARK_REQUEST:
                self._mark_requested(doc, where)

    def _ack(self, body: bytes, where: str) -> None:
        domain, flags, durable, _ = wire.parse_ack(body, where)
        f = self.filters.get(domain)
        if f is None:
            return
        if durable > f.sent_seq:
            # Taken, it would answer FLUSHes and unflag dirty-region maps for writes the
            # DRVA never received (and a later honest ack could not undo it).
            raise wire.ProtocolError(
                "bad_ack", f"{where}: ACK says domain {domain} is durable up to seq {durable}, but this "
                f"filter sent it only up to seq {f.sent_seq}: refusing to treat unsent writes as acked")
        f.on_ack(durable)
        f.backpressure = bool(flags & wire.ACK_BACKPRESSURE)
        self._wake.set()

    def _seed_done(self, doc: dict[str, Any], where: str) -> None:
        f = self._live.get(doc["domain"])
        if f is None or doc["disk"] >= len(f.disks):  # kept by key: only ours may take room
            raise wire.ProtocolError("bad_message", f"{where}: SEED_DONE of domain {doc['domain']} disk "
                                                    f"{doc['disk']}: not a disk this session streams")
        self.seed_done[(doc["domain"], doc["disk"])] = doc
        self.seed_event.set()

    def _pong(self) -> None:
        writer = self._writer
        if writer is not None and writer.transport.get_write_buffer_size() <= PONG_WRITE_BUFFER_MAX:
            writer.writelines(wire.control(wire.PONG, {}))

    def _note_fenced(self, doc: dict[str, Any], where: str) -> None:
        """An ``ERROR fenced`` names a domain its DRVA will never write again (another site
        owns it): that filter's unacked writes can never be acked, so nothing waits on
        them (``DomainFilter.fenced``); they stay flagged in its dirty-region maps."""
        f = self.filters.get(doc["domain"]) if doc["code"] == "fenced" and "domain" in doc else None
        if f is not None and not f.fenced:
            f.fenced = True
            f.on_acked()
            log.warning("domain_fenced", drva=where, domain=f.domain, unacked=f.next_seq - 1 - f.acked_seq,
                        reason=str(doc.get("message"))[:300])

    def _mark_requested(self, doc: dict[str, Any], where: str) -> None:
        """A mark asked for by the management server (FORMAT.md §9, ``MARK_REQUEST``)."""
        f = self.filters.get(doc["domain"])
        name = doc["name"]
        if f is None:
            log.warning("mark_request_refused", where=where, domain=doc["domain"], reason="not a domain of this filter")
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

        def state_if_due() -> None:
            nonlocal next_state, reported
            modes = {f.domain: f.mode for f in live}
            if loop.time() >= next_state or modes != reported:
                for f in live:
                    writer.writelines(wire.control(wire.FILTER_STATE, f.state()))
                next_state, reported = loop.time() + STATE_EVERY_S, modes

        while True:
            sent = 0
            for f in live:
                # Re-read the buffer after every await: capture may have dropped unsent
                # frames meanwhile (bitmap mode), and their seqs are reused.
                while not f.backpressure and (frame := f.next_unsent()) is not None:
                    parts = f.wire_parts(frame)
                    if parts is None:  # its spill journal lost frames: the buffer changed, look again
                        continue
                    writer.writelines(wire.frame_message(parts))
                    f.mark_sent()
                    sent += frame.nbytes
                    if sent >= SEND_WINDOW_BYTES:
                        await writer.drain()
                        sent = 0
                        # Between windows too: on a slow link a backlog takes minutes to
                        # send, and a state sent only after it told the DRVA its lag
                        # (oldest_unacked_age_ms) that late.
                        state_if_due()
            for f in live:
                if f.mode != "normal":  # bitmap/resync: the path is up, move dirty regions
                    f.resync_step(self.connected)
            state_if_due()
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


def _ids(domains: Any) -> str:
    """Domain ids for a message, at most 10 of them."""
    ids = sorted(domains)
    return str(ids[:10])[:-1] + (", ...]" if len(ids) > 10 else "]")


# ------------------------------------------------------------------ what a DRVA sends, checked
#
# The twin of the DRVA's check of what a filter sends (drva/messages.py), built from the
# same checks (cdp.wire_checks): one object, exactly its type's keys (optional ones may be
# absent), each value of its JSON type and range. A value passed on unchecked ended FilterClient.run() for good: a
# durable_seq of "x" (int()), a domain given as a list (a dict key), a mark name with a
# lone surrogate (UTF-8 encoding), a durable_seq of 2**64 - 1 (numbering past u64).

# WELCOME's durable_seq: the filter numbers on from it + 1, and seqs are u64 (FORMAT.md
# §1); a stream of 2**63 writes is past any real domain.
WELCOME_SEQ_MAX = (1 << 63) - 1
WELCOME_DOMAINS_MAX = 1024  # as a HELLO's
_DOMAIN_KEY = re.compile(r"[1-9][0-9]{0,9}")


def _mark_name(value: Any, field: str) -> str:
    expected = f"a mark name of 1..{MARK_NAME_MAX} UTF-8 bytes"
    if not isinstance(value, str):
        raise refuse(field, expected, value)
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: JSON's \ud800 decodes to one
        raise refuse(field, expected, value) from None
    if not 1 <= len(raw) <= MARK_NAME_MAX or MARK_NAME_CONTROL.search(value):
        raise refuse(field, expected + " without control characters", value)
    return value


WELCOME_SEQ = uint(0, WELCOME_SEQ_MAX)


def _welcome_domains(value: Any, field: str) -> dict[int, int]:
    """``{"ID": {"durable_seq": N}}`` as ``{ID: N}``."""
    if not isinstance(value, dict) or len(value) > WELCOME_DOMAINS_MAX:
        raise refuse(field, f"an object of at most {WELCOME_DOMAINS_MAX} domains", value)
    out = {}
    for key, state in value.items():
        if not _DOMAIN_KEY.fullmatch(key) or int(key) > U32_MAX:
            raise refuse(f"{field} key", f"a domain id 1..{U32_MAX} in decimal", key)
        where = f"{field}.{key}"
        if not isinstance(state, dict) or set(state) != {"durable_seq"}:
            raise refuse(where, 'an object {"durable_seq": N}', state)
        out[int(key)] = WELCOME_SEQ(state["durable_seq"], f"{where}.durable_seq")
    return out


# Per type: (every key's check, the keys that may be absent).
_SCHEMAS: dict[int, tuple[dict[str, Check], frozenset[str]]] = {
    wire.CHALLENGE: ({"drva": match(NAME, "a DRVA name of 1..64 characters [A-Za-z0-9._-]"),
                      "nonce": match(HEX_NONCE, f"{wire.NONCE_BYTES} bytes in lower-case hex")}, frozenset()),
    wire.WELCOME: ({"mac": match(HEX_MAC, "64 lower-case hex digits", secret=True),
                    "domains": _welcome_domains}, frozenset()),
    wire.ERROR: ({**ERROR_FIELDS, "domain": DOMAIN}, frozenset({"domain"})),
    wire.SEED_DONE: ({"domain": DOMAIN, "disk": DISK, "base_seq": U64, "chunks_stored": U64,
                      "chunks_deduplicated": U64}, frozenset()),
    wire.MARK_REQUEST: ({"domain": DOMAIN, "name": _mark_name}, frozenset()),
    wire.PING: ({}, frozenset()),
    wire.PONG: ({}, frozenset()),
}


def parse_drva_message(msg: wire.Message, where: str) -> dict[str, Any]:
    """The checked body of a control message from a DRVA: its values as checked (WELCOME's
    ``domains`` as ``{id: durable_seq}``); ``ProtocolError`` ``bad_message`` naming the
    message and the field otherwise."""
    schema, optional = _SCHEMAS[msg.type]
    return check_body(msg, where, schema, optional)
