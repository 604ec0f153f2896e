"""One filter connection on a DRVA: handshake, frames in, acks out (FORMAT.md §9).

Every refusal is logged with its reason and answered with an ``ERROR``; a refused frame
never reaches the log (it is validated whole before it is staged), and a broken stream
closes only this connection. Frames of a domain are deduplicated by seq: records at or
below the domain's accepted seq are a resend and are dropped, a frame that overlaps is
cut to its new records, a frame after a gap is refused.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import numpy as np

from cdp import wire
from cdp.errors import FormatError
from cdp.frame import Frame, decode_frame, encode_frame
from cdp.logs import get_logger
from cdp.records import payload_lengths, payload_starts
from drva import messages

if TYPE_CHECKING:
    from drva.daemon import Drva
    from drva.domain import DomainState

log = get_logger("drva.session")

# Before WELCOME a peer is a stranger (FORMAT.md §9.1): only HELLO, then AUTH, whose
# bodies are at most CONTROL_BODY_MAX (64 KiB); any other type is refused from its header
# before its body is read. At most HANDSHAKES_MAX connections may be between accept and
# WELCOME (more get ERROR busy at once), each for at most HANDSHAKE_TIMEOUT_S; a stream
# reader stops reading its socket once it holds 2 x STREAM_READ_AHEAD_BYTES (TCP flow
# control takes over). So the bytes buffered for peers not yet authenticated stay under
# HANDSHAKES_MAX x (2 x STREAM_READ_AHEAD_BYTES + one socket read of 256 KiB) = 12 MiB.
HANDSHAKES_MAX = 16
HANDSHAKE_TIMEOUT_S = 10.0  # from accept to WELCOME sent
STREAM_READ_AHEAD_BYTES = 256 << 10
HANDSHAKE_TYPES = (wire.HELLO, wire.AUTH)
assert all(wire.body_max(t) == wire.CONTROL_BODY_MAX for t in HANDSHAKE_TYPES), "FORMAT.md §9.1"
# What a filter may send once welcomed; anything else is refused from its header.
STREAM_TYPES = frozenset((wire.FRAME, wire.SEED_BEGIN, wire.SEED_CHUNK, wire.SEED_END,
                          wire.FILTER_STATE, wire.PING, wire.PONG, wire.ERROR))
REFUSE_DRAIN_TIMEOUT_S = 2.0  # for the ERROR of a refusal to leave; then the socket closes
ACK_PERIOD_S = 1.0  # every domain's ack (and back-pressure flag) is resent at least this often
ACK_WRITE_BUFFER_MAX = 1 << 20


class Refused(Exception):
    """This session must end: an ERROR with ``code`` goes to the peer first."""

    def __init__(self, code: str, message: str, domain: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.domain = domain


def _fenced(dom: "DomainState") -> Refused:
    """The refusal of a domain this DRVA no longer writes, with the reason it stopped."""
    return Refused("fenced", f"domain {dom.id} is fenced on this DRVA: {dom.stats.last_error or 'another owner'}",
                   dom.id)


class _PeerEnded(Exception):
    """The filter ended the session (a fatal ERROR): close it, answer nothing."""


class Session:
    """A filter's connection. Invariant: ``domains`` are streamed by this session only."""

    def __init__(self, drva: "Drva", reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 handshake_deadline: float | None = None):
        self.drva = drva
        # Loop time by which WELCOME must be sent: HANDSHAKE_TIMEOUT_S from accept (a TLS
        # session's own handshake came first and spent part of it).
        self.handshake_deadline = (asyncio.get_running_loop().time() + HANDSHAKE_TIMEOUT_S
                                   if handshake_deadline is None else handshake_deadline)
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.where = f"filter session from {peer[0]}:{peer[1]}" if peer else "filter session"
        self.filter_name = "?"
        self.domains: dict[int, DomainState] = {}
        self._acked: dict[int, int] = {}
        self._ack_wanted = asyncio.Event()
        self.closed = False

    async def run(self) -> None:
        ack_task = None
        try:
            try:
                async with asyncio.timeout_at(self.handshake_deadline):
                    await self._handshake()
            except TimeoutError:
                raise Refused("timeout", f"no complete handshake in {HANDSHAKE_TIMEOUT_S} s") from None
            ack_task = asyncio.create_task(self._ack_loop())
            while True:
                msg = await wire.read_message(self.reader, self.where, STREAM_TYPES)
                await self._dispatch(msg)
        except (asyncio.IncompleteReadError, ConnectionError, _PeerEnded):
            log.info("session_closed", peer=self.where, filter=self.filter_name)
        except wire.ProtocolError as exc:
            await self._refuse(exc.code, exc.message)
        except Refused as exc:
            await self._refuse(exc.code, str(exc), exc.domain)
        except FormatError as exc:
            await self._refuse("bad_frame", exc.message)
        finally:
            self.close()  # also frees its handshake slot, if it never got past WELCOME
            if ack_task is not None:
                ack_task.cancel()
                await asyncio.gather(ack_task, return_exceptions=True)

    async def _refuse(self, code: str, message: str, domain: int | None = None) -> None:
        log.warning("session_refused", peer=self.where, filter=self.filter_name, code=code, reason=message)
        try:
            self.writer.writelines(wire.error_message(code, message, domain=domain))
            async with asyncio.timeout(REFUSE_DRAIN_TIMEOUT_S):
                await self.writer.drain()
        except TimeoutError:
            # The peer does not read: close() would wait for the flush forever.
            self.writer.transport.abort()
        except (ConnectionError, RuntimeError):
            pass  # the peer is gone: the socket closes anyway

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for dom in self.domains.values():
            if dom.session is self:
                dom.session = None
        self.drva.sessions.discard(self)
        self.drva.handshaking.discard(self)
        self.writer.close()

    # ------------------------------------------------------------------ handshake

    async def _expect(self, mtype: int) -> dict[str, Any]:
        assert mtype in HANDSHAKE_TYPES
        # Any other type is refused from its header: a stranger's FRAME header announcing
        # 66 MiB costs 16 bytes of reading, not 66 MiB.
        msg = await wire.read_message(self.reader, self.where, (mtype,))
        return messages.parse(msg, self.where)

    async def _handshake(self) -> None:
        hello = await self._expect(wire.HELLO)
        name, wanted = hello["filter"], hello["domains"]
        self.filter_name = name
        filter_nonce = bytes.fromhex(hello["nonce"])
        drva_nonce = wire.new_nonce()
        self.writer.writelines(wire.control(wire.CHALLENGE, {"drva": self.drva.cfg.name, "nonce": drva_nonce.hex()}))
        auth = await self._expect(wire.AUTH)
        expected = wire.filter_mac(self.drva.cfg.secret, filter_nonce, drva_nonce, name)
        if not wire.mac_matches(expected, auth["mac"]):
            raise Refused("bad_auth", f"authentication failed for filter {name!r}")
        accepted = {}
        for domain_id in wanted:
            dom = self.drva.domains.get(domain_id)
            if dom is None:
                raise Refused("unknown_domain", f"domain {domain_id} is not served by DRVA {self.drva.cfg.name}")
            if dom.fenced:
                raise _fenced(dom)
            if not dom.catalog_ready and not dom.catalog_known:
                # WELCOME tells the filter where to number from. A DRVA that never
                # committed this domain learns its durable seq only from the store's
                # catalog (after a failover: the fork seq); welcoming before would let
                # the filter number from 1 and have its writes taken for ones already
                # committed, acked and dropped.
                raise Refused("not_ready", f"domain {domain_id}: DRVA {self.drva.cfg.name} has not opened its "
                                           f"catalog yet; retry")
            accepted[domain_id] = dom
        # Every check passed: only now may this session take its domains over. A refused
        # HELLO must never close the live session of a domain it named.
        self._take_over(accepted)
        mac = wire.drva_mac(self.drva.cfg.secret, filter_nonce, drva_nonce, self.drva.cfg.name)
        state = {str(d.id): {"durable_seq": d.durable_seq} for d in self.domains.values()}
        self.writer.writelines(wire.control(wire.WELCOME, {"mac": mac, "domains": state}))
        await self.writer.drain()
        log.info("session_open", peer=self.where, filter=name, domains=sorted(self.domains))

    def _take_over(self, domains: dict[int, "DomainState"]) -> None:
        """Become the one session of ``domains``, closing any older one (FORMAT.md §9.2).
        No await in here: nothing can run between the last check and WELCOME."""
        for domain_id, dom in domains.items():
            if dom.session is not None and dom.session is not self:
                log.info("session_replaced", domain=domain_id, old=dom.session.where, new=self.where)
                dom.session.close()
            dom.session = self
            self.domains[domain_id] = dom
        self.drva.handshaking.discard(self)
        self.drva.sessions.add(self)

    # ------------------------------------------------------------------ streaming

    async def _dispatch(self, msg: wire.Message) -> None:
        if msg.type == wire.FRAME:
            await self._frame(msg.body)
        elif msg.type in (wire.SEED_BEGIN, wire.SEED_CHUNK, wire.SEED_END):
            await self.drva.seeder.handle(self, msg)
        elif msg.type == wire.FILTER_STATE:
            self._filter_state(messages.parse(msg, self.where))
        elif msg.type == wire.PING:
            messages.parse(msg, self.where)
            self.writer.writelines(wire.control(wire.PONG, {}))
        elif msg.type == wire.PONG:
            messages.parse(msg, self.where)
        elif msg.type == wire.ERROR:
            doc = messages.parse(msg, self.where)
            log.warning("filter_error", peer=self.where, filter=self.filter_name, code=doc["code"],
                        reason=doc["message"], fatal=doc["fatal"])
            if doc["fatal"]:
                raise _PeerEnded()
        else:
            raise Refused("unexpected_message", f"{msg.name} is not expected from a filter")

    async def _frame(self, raw: bytes) -> None:
        frame = decode_frame(raw, self.where)
        dom = self.domains.get(frame.domain)
        if dom is None:
            raise Refused("unknown_domain", f"frame of domain {frame.domain}, not in this session's HELLO")
        if dom.fenced:
            raise _fenced(dom)
        dom.stats.frames_received += 1
        dom.stats.bytes_received += len(raw)
        if frame.last_seq <= dom.accepted_seq:
            dom.stats.duplicates_dropped += 1
            log.debug("duplicate_dropped", domain=dom.id, first_seq=frame.first_seq, last_seq=frame.last_seq)
            self.want_ack()
            return
        if frame.first_seq > dom.accepted_seq + 1:
            dom.stats.frames_refused += 1
            raise Refused("seq_gap", f"domain {dom.id}: frame starts at seq {frame.first_seq}, "
                                     f"expected {dom.accepted_seq + 1} (records are missing)")
        if frame.first_seq <= dom.accepted_seq:
            raw, frame = _cut(frame, dom.accepted_seq + 1)
        dom.newest_received_ts = int(frame.records["timestamp_ns"][-1])
        await self.drva.committer.submit(dom, raw, frame)

    def _filter_state(self, doc: dict[str, Any]) -> None:
        """``doc`` is checked whole (drva.messages): every field is there, typed, in range."""
        dom = self.domains.get(doc["domain"])
        if dom is None:
            raise Refused("unknown_domain", f"FILTER_STATE for domain {doc['domain']}, not in this session")
        if dom.filter_state.get("mode") != doc["mode"]:
            log.info("filter_mode", domain=dom.id, mode=doc["mode"], dirty_bytes=doc["dirty_bytes"])
        dom.filter_state = {k: doc[k] for k in
                            ("mode", "captured_seq", "captured_ts", "buffered_bytes", "dirty_bytes")}

    # ------------------------------------------------------------------ acks

    def want_ack(self) -> None:
        self._ack_wanted.set()

    async def _ack_loop(self) -> None:
        """Send the newest durable seq of each domain when it moved (coalesced), and at
        least every second with the current back-pressure flag."""
        while True:
            try:
                async with asyncio.timeout(ACK_PERIOD_S):
                    await self._ack_wanted.wait()
            except TimeoutError:
                self._acked.clear()  # periodic: resend the state of every domain
            self._ack_wanted.clear()
            if self.writer.transport.get_write_buffer_size() > ACK_WRITE_BUFFER_MAX:
                continue  # the filter does not read: acks are cumulative, send later
            flags = wire.ACK_BACKPRESSURE if self.drva.committer.backpressure else 0
            permille = int(self.drva.committer.usage() * 1000)
            for dom in self.domains.values():
                if self._acked.get(dom.id) == dom.durable_seq and not flags:
                    continue
                f = flags | (wire.ACK_STOPPED if dom.fenced else 0)
                self.writer.writelines(wire.ack_message(dom.id, dom.durable_seq, f, permille))
                self._acked[dom.id] = dom.durable_seq


def _cut(frame: Frame, from_seq: int) -> tuple[bytes, Frame]:
    """The records of ``frame`` from ``from_seq`` on, as a new frame (a partial resend)."""
    k = from_seq - frame.first_seq
    starts = payload_starts(payload_lengths(frame.records))
    at = int(starts[k])
    records = np.array(frame.records[k:])
    raw = encode_frame(frame.domain, records, frame.payload[at:])
    return raw, decode_frame(raw, "cut frame")
