"""One filter connection on a DRVA: handshake, frames in, acks out (FORMAT.md §9).

Every refusal is logged with its reason and answered with an ``ERROR``; a refused frame
never reaches the log (it is validated whole before it is staged), and a broken stream
closes only this connection. Frames of a domain are deduplicated by seq: records at or
below the domain's accepted seq are a resend and are dropped, a frame that overlaps is
cut to its new records, a frame after a gap is refused. The check and the staging are
one step: a frame waits for room first, then is checked again and staged with no await
in between, so that a filter reconnecting while both its sessions wait (log
back-pressure) cannot stage a seq twice; a session replaced meanwhile stages nothing.
A session that closes (a new HELLO replaced it) drops the frame it waits with at once
and reads no more. What a DRVA holds of frames received but not staged is bounded by its
frame budget (``committer.FrameBudget``, one per store lane, ``staging_bytes_max``; a
larger frame goes alone), not by how many sessions wait: a session takes its frame's
share from the frame's header, before it reads the body, and while none is left it reads
nothing (FORMAT.md §9.2).

A seq is acked to a session only for content that session sent (FORMAT.md §9.2). A
session that takes a domain over may find frames an older one staged and the log has
not made durable yet — the older one may be a host process that died, and the new one
a new instance of its filter, which numbers on from the durable seq ``WELCOME`` gives
it: numbered over those staged seqs, its writes were dropped as duplicates and acked
for the dead instance's content. So ``WELCOME`` waits (``TAKEOVER_WAIT_S``, then
``ERROR not_ready``: the filter retries) until each domain taken over is durable up to
its accepted seq. And each session keeps, per domain, the highest seq it can vouch for
(``_vouched``: durable at its ``WELCOME``, or staged by it): a frame whose seqs would be
dropped as duplicates of seqs above it is refused (``ERROR seq_conflict``), and no
``ACK`` goes above it.

Before it is staged a frame is held to what the DRVA knows of its domain (FORMAT.md
§9.2): its WRITE and ZERO records on the domain's disks, inside them; its MARK names
strict UTF-8 without control characters (``decode_frame`` takes them as they are); no
bigger than the log can always take (``GroupCommitter.frame_len_max``); its timestamps
not before the domain's newest accepted one — a filter's clock that stepped back (or a
filter on another host) has them raised to it, as the filter itself does with its own
clock — nor after this host's clock plus ``TS_AHEAD_MAX_S`` (``GroupCommitter.ts_ceiling``):
a clock that jumped ahead has them clamped there. A clock far behind from the start trips
neither (its stamps only go forward) and is not corrected: a filter replaying a backlog
sends old stamps that are true. Its clock is read instead: each ``FILTER_STATE`` carries
it (``now_ns``), and the status reports its offset from this host's
(``filter_clock_offset_s``), which the MSA holds to the lock skew (``filter_clock_skew``).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from cdp import wire
from cdp.errors import FormatError
from cdp.frame import HEADER_SIZE as FRAME_HEADER_SIZE
from cdp.frame import Frame, decode_frame, decode_header, encode_frame
from cdp.locks import SKEW_DEFAULT_S
from cdp.logs import get_logger
from cdp.records import (
    check_disk_bounds, check_mark_names, check_special_counts, payload_lengths, payload_starts,
)
from drva import messages
from drva.committer import TS_AHEAD_MAX_S
from drva.handshakes import HANDSHAKES_MAX, HANDSHAKES_PER_SOURCE_MAX
# SessionStream lived here: the daemon and tests still import it (and its constant) from here.
from drva.stream import DIRECT_READ_BYTES, BodyStalled, SessionStream  # noqa: F401

if TYPE_CHECKING:
    from drva.daemon import Drva
    from drva.domain import DomainState

log = get_logger("drva.session")

# Before WELCOME a peer is a stranger (FORMAT.md §9.1): only HELLO, then AUTH, whose
# bodies are at most CONTROL_BODY_MAX (64 KiB); any other type is refused from its header
# before its body is read. At most HANDSHAKES_MAX connections may be between accept and
# WELCOME, HANDSHAKES_PER_SOURCE_MAX of them from one source (drva.handshakes; more get
# ERROR busy at once), each for at most HANDSHAKE_TIMEOUT_S, and with its HELLO complete
# within HELLO_TIMEOUT_S; until WELCOME a connection's read-ahead buffer is
# HANDSHAKE_READ_AHEAD_BYTES (what the largest handshake body needs), and reading stops
# while it is full (TCP flow control takes over). So the bytes buffered for peers not yet
# authenticated stay under HANDSHAKES_MAX x HANDSHAKE_READ_AHEAD_BYTES = 1 MiB. A welcomed
# filter's read-ahead grows to STREAM_READ_AHEAD_BYTES (SessionStream.grow).
assert HANDSHAKES_PER_SOURCE_MAX < HANDSHAKES_MAX, "one source must not fill every slot"
HANDSHAKE_TIMEOUT_S = 10.0  # from accept to WELCOME sent
# From accept (or from the end of the TLS handshake) to a complete HELLO: a filter sends
# it at once, so an idle connection gives its slot back well before HANDSHAKE_TIMEOUT_S.
HELLO_TIMEOUT_S = 3.0
HANDSHAKE_READ_AHEAD_BYTES = wire.CONTROL_BODY_MAX
STREAM_READ_AHEAD_BYTES = 256 << 10
HANDSHAKE_TYPES = (wire.HELLO, wire.AUTH)
assert all(wire.body_max(t) == wire.CONTROL_BODY_MAX for t in HANDSHAKE_TYPES), "FORMAT.md §9.1"
# What a filter may send once welcomed; anything else is refused from its header.
STREAM_TYPES = frozenset((wire.FRAME, wire.SEED_BEGIN, wire.SEED_CHUNK, wire.SEED_END,
                          wire.FILTER_STATE, wire.PING, wire.PONG, wire.ERROR))
REFUSE_DRAIN_TIMEOUT_S = 2.0  # for the ERROR of a refusal to leave; then the socket closes
# A FRAME body that stops arriving this long (no byte of it) ends its session (ERROR
# timeout): it holds a share of the frame budget that other domains wait for
# (committer.FrameBudget). As the NBD server's stall timeout (cdp.nbd.limits).
FRAME_BODY_STALL_S = 60.0
# A SEED_CHUNK body is read while it holds one of the seeder's few upload slots
# (``Seeder.chunk_slot``): it must come at least this fast, after FRAME_BODY_STALL_S of
# grace, or the session is refused. The stall check alone let a peer sending a byte a
# minute keep a slot for ever (four such, and no seed of the DRVA went on). 1 MiB/s: a
# 4 MiB chunk (the default) within 64 s; a link slower than that seeds nothing useful.
SEED_CHUNK_BYTES_PER_S_MIN = 1 << 20
ACK_PERIOD_S = 1.0  # every domain's ack (and back-pressure flag) is resent at least this often
# Above this many bytes unsent to a filter, no ACK or PONG is added: the filter does not
# read, and what it is owed is cumulative (the next ACK) or coalesced (one PONG answers
# every PING), so the DRVA's memory for a peer that never reads stays bounded.
ACK_WRITE_BUFFER_MAX = 1 << 20
# WELCOME waits at most this long for the frames an older session of its domains staged to
# be durable (see the module docstring); then ERROR not_ready, and the filter retries. A
# staged frame waits only for the group commit in flight, unless the log is full (behind
# a store that is down), when no domain of that log is logged until a trim makes room.
TAKEOVER_WAIT_S = 5.0
# ... and looks again at least this often (a commit of its domains wakes it at once).
TAKEOVER_RECHECK_S = 0.25
# A frame's timestamps raised to the domain's newest one (or clamped to the DRVA's clock
# plus committer.TS_AHEAD_MAX_S) are logged at most this often, per domain.
TS_RAISED_LOG_INTERVAL_S = 1.0


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
    """The filter ended the session (a fatal ERROR), or a newer session replaced it
    before its WELCOME: close it, answer nothing."""


class Session:
    """A filter's connection. Invariant: ``domains`` are streamed by this session only."""

    def __init__(self, drva: "Drva", reader: "SessionStream | asyncio.StreamReader", writer: asyncio.StreamWriter,
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
        # The source whose handshake slot this session holds until WELCOME or close
        # (drva.handshakes); None once given back, or for a session that never took one.
        self.slot_source: str | None = None
        self.domains: dict[int, DomainState] = {}
        # Per domain, the highest seq whose logged content this session vouches for: durable
        # when it was welcomed, or staged by it (see the module docstring).
        self._vouched: dict[int, int] = {}
        self._acked: dict[int, int] = {}
        self._ack_wanted = asyncio.Event()
        self.closed = False
        self.ended = asyncio.Event()  # set with ``closed`` (what waits on the session's life)

    async def run(self) -> None:
        ack_task = None
        try:
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout_at(min(self.handshake_deadline, loop.time() + HELLO_TIMEOUT_S)):
                    hello = await self._expect(wire.HELLO)
            except TimeoutError:
                raise Refused("timeout", f"no complete HELLO in {HELLO_TIMEOUT_S} s") from None
            try:
                async with asyncio.timeout_at(self.handshake_deadline):
                    mac = await self._handshake(hello)
            except TimeoutError:
                raise Refused("timeout", f"no complete handshake in {HANDSHAKE_TIMEOUT_S} s") from None
            await self._welcome(mac)
            ack_task = asyncio.create_task(self._ack_loop())
            while not self.closed:  # a session replaced by a new HELLO reads no more
                await self._next_message()
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
        self.ended.set()
        for dom in self.domains.values():
            if dom.session is self:
                dom.session = None
                dom.filter_session_ended()
        self.drva.sessions.discard(self)
        self.drva.handshake_ended(self)
        self.drva.seeder.session_closed(self)  # a seed lives inside its session
        for budget in self.drva.frame_budgets:  # a frame waiting for its share is dropped
            budget.leave(self)
        self.writer.close()
        # If it waits for room (wait_room), it returns now and drops its frame: a
        # session replaced under back-pressure must not hold a frame until room comes.
        self.drva.committer.wake()

    async def end(self, code: str, message: str) -> None:
        """Refuse and close from outside the read loop (a seed refused at SEED_END's
        commit): the ERROR first, as ``run`` does, then the connection."""
        if self.closed:
            return
        await self._refuse(code, message)
        self.close()

    # ------------------------------------------------------------------ handshake

    async def _expect(self, mtype: int) -> dict[str, Any]:
        assert mtype in HANDSHAKE_TYPES
        # Any other type is refused from its header: a stranger's FRAME header announcing
        # 66 MiB costs 16 bytes of reading, not 66 MiB.
        msg = await wire.read_message(self.reader, self.where, (mtype,))
        return messages.parse(msg, self.where)

    async def _handshake(self, hello: dict[str, Any]) -> str:
        """CHALLENGE, AUTH and every check of the HELLO, then the take-over of its
        domains; the mac of the ``WELCOME`` to send (``_welcome``)."""
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
        return wire.drva_mac(self.drva.cfg.secret, filter_nonce, drva_nonce, self.drva.cfg.name)

    async def _welcome(self, mac: str) -> None:
        """``WELCOME`` once every domain taken over is durable up to its accepted seq, so
        that no seq after the durable seq it reports is held by a frame an older session
        staged (module docstring); ``Refused`` not_ready after ``TAKEOVER_WAIT_S``.

        Only this session may stage its domains' frames now (the older ones are closed,
        and drop what they wait with), and it reads none before ``WELCOME``: the accepted
        seqs stay put, and each commit that moves a durable one wakes it (``want_ack``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TAKEOVER_WAIT_S
        while True:
            if self.closed:  # a newer HELLO took a domain over meanwhile
                raise _PeerEnded()
            for dom in self.domains.values():
                if dom.fenced:
                    raise _fenced(dom)
            pending = [d for d in self.domains.values() if d.durable_seq < d.accepted_seq]
            if not pending:
                break
            if loop.time() >= deadline:
                d = pending[0]
                raise Refused("not_ready", f"domain {d.id}: seqs {d.durable_seq + 1}..{d.accepted_seq} that an "
                                           f"earlier session sent are staged on DRVA {self.drva.cfg.name} and not "
                                           f"durable after {TAKEOVER_WAIT_S:g} s (is its log full behind a store "
                                           f"that is down?); a new session numbers after them once they are: retry",
                              d.id)
            self._ack_wanted.clear()
            try:
                async with asyncio.timeout(min(TAKEOVER_RECHECK_S, max(0.0, deadline - loop.time()))):
                    await self._ack_wanted.wait()
            except TimeoutError:
                pass
        # From the check above to WELCOME: no await.
        self._vouched = {d.id: d.durable_seq for d in self.domains.values()}
        state = {str(d.id): {"durable_seq": d.durable_seq} for d in self.domains.values()}
        self.writer.writelines(wire.control(wire.WELCOME, {"mac": mac, "domains": state}))
        log.info("session_open", peer=self.where, filter=self.filter_name, domains=sorted(self.domains))
        try:
            async with asyncio.timeout_at(deadline + REFUSE_DRAIN_TIMEOUT_S):
                await self.writer.drain()
        except TimeoutError:
            raise Refused("timeout", "the filter does not read its WELCOME") from None

    def _take_over(self, domains: dict[int, "DomainState"]) -> None:
        """Become the one session of ``domains``, closing any older one (FORMAT.md §9.2).
        No await in here: nothing can run between the last check and the take-over."""
        for domain_id, dom in domains.items():
            if dom.session is not None and dom.session is not self:
                log.info("session_replaced", domain=domain_id, old=dom.session.where, new=self.where)
                dom.session.close()
            dom.session = self
            dom.filter_session_opened()
            self.domains[domain_id] = dom
        self.drva.handshake_ended(self)
        self.drva.sessions.add(self)
        # A seed of these domains that an earlier session (or DRVA run) left has ended:
        # its open window must not hide the points after it.
        self.drva.seeder.session_opened(self)
        grow = getattr(self.reader, "grow", None)
        if grow is not None:
            grow(STREAM_READ_AHEAD_BYTES)

    # ------------------------------------------------------------------ streaming

    def _held_back(self) -> list[bool]:
        """Per store lane (``drva.lanes``), whether its domains' frames wait for room
        (back-pressure: ``GroupCommitter.held_back``)."""
        return self.drva.committer.held_back([lane.domains for lane in self.drva.lanes])

    def _lane(self, dom: "DomainState") -> int:
        return self.drva.shipper.lane_of[dom.id].index

    async def _next_message(self) -> None:
        """Read one message and act on it (``wire.read_message``, but for a ``FRAME``:
        ``_frame_message``). A type not in STREAM_TYPES is refused from its header."""
        mtype, body_len, summed = wire.parse_header(await self.reader.readexactly(wire.HEADER_SIZE), self.where)
        if mtype not in STREAM_TYPES:
            names = "/".join(wire.TYPE_NAMES[t] for t in sorted(STREAM_TYPES))
            raise wire.ProtocolError("unexpected_message", f"{self.where}: {wire.TYPE_NAMES[mtype]} ({body_len} "
                                                           f"bytes) where {names} was expected")
        if mtype == wire.FRAME:
            await self._frame_message(body_len)
            return
        if mtype == wire.SEED_CHUNK and body_len >= wire.SEED_CHUNK_HEADER_SIZE:
            await self._seed_chunk_message(body_len, summed)
            return
        body = await self.reader.readexactly(body_len) if body_len else b""
        if wire.body_sum(body) != summed:
            raise wire.ProtocolError("bad_checksum", f"{self.where}: {wire.TYPE_NAMES[mtype]} body checksum mismatch")
        await self._dispatch(wire.Message(mtype, body))

    async def _frame_message(self, body_len: int) -> None:
        """A ``FRAME`` of ``body_len`` bytes: its frame header is read first, and its
        domain's share of the frame budget (``FrameBudget``, per store lane) taken before
        the rest of it is: while the budget is spent this session reads nothing (its
        filter feels back-pressure). The share goes back once the frame is staged,
        dropped or refused, or the session ended, however (FORMAT.md §9.2)."""
        if body_len < FRAME_HEADER_SIZE:  # not even a header: refused (bad_frame)
            await self._frame(await self.reader.readexactly(body_len) if body_len else b"")
            return
        head = await self.reader.readexactly(FRAME_HEADER_SIZE)
        try:
            dom = self.domains.get(decode_header(head, self.where).domain)
        except FormatError:
            dom = None
        # Every check waits for the whole frame, as before (``_frame``): a refusal sent
        # with the body unread could be lost to the reset that closing such a socket
        # sends. A frame of no domain of the session takes the first lane's share, and is refused.
        budget = self.drva.frame_budgets[self._lane(dom) if dom is not None else 0]
        if not await budget.take(body_len, self):
            return  # closed while it waited: the loop reads no more
        try:
            await self._frame(await self._frame_body(head, body_len))
        finally:
            budget.give(body_len)

    async def _seed_chunk_message(self, body_len: int, summed: int) -> None:
        """A ``SEED_CHUNK`` of ``body_len`` bytes (up to 64 MiB): its 16-byte header is read
        first, and an upload slot of the seeder taken (``Seeder.chunk_slot``) before the
        chunk is: a session waiting for a slot holds no chunk. Before, each one held its
        chunk, and a copy of it, while it waited: 128 MiB per seeding session. The slot
        goes with the chunk into its upload, or back if none starts (FORMAT.md §9.3)."""
        head = await self.reader.readexactly(wire.SEED_CHUNK_HEADER_SIZE)
        domain, disk, chunk = wire.parse_seed_chunk_header(head, self.where)
        seeder = self.drva.seeder
        try:
            job = await seeder.chunk_slot(self, domain, disk, chunk, body_len - len(head))
        except Refused:
            # Read past the chunk first, a piece at a time: the refusal, sent with the
            # body unread, could be lost to the reset that closing such a socket sends.
            await self._skip(body_len - len(head))
            raise
        if job is None:  # its seed was abandoned while it waited: nothing to upload
            await self._skip(body_len - len(head))
            return
        try:
            deadline_s = FRAME_BODY_STALL_S + body_len / SEED_CHUNK_BYTES_PER_S_MIN
            try:
                async with asyncio.timeout(deadline_s):
                    body = await self._frame_body(head, body_len, "SEED_CHUNK")
            except TimeoutError:
                raise Refused("timeout", f"SEED_CHUNK body of {body_len} bytes not received within "
                                         f"{deadline_s:.0f} s while it held an upload slot (at least "
                                         f"{SEED_CHUNK_BYTES_PER_S_MIN >> 20} MiB/s)") from None
            if wire.body_sum(body) != summed:
                raise wire.ProtocolError("bad_checksum", f"{self.where}: SEED_CHUNK body checksum mismatch")
            job, held = None, job
            seeder.chunk_received(held, chunk, memoryview(body)[len(head):])
        finally:
            if job is not None:
                seeder.slots.release()

    async def _skip(self, nbytes: int) -> None:
        """Read ``nbytes`` of the stream and let them go, holding at most 64 KiB at a time."""
        while nbytes > 0:
            piece = min(nbytes, DIRECT_READ_BYTES)
            if isinstance(self.reader, SessionStream):
                try:
                    await self.reader.readexactly(piece, stall_s=FRAME_BODY_STALL_S)
                except BodyStalled as exc:
                    raise Refused("timeout", f"message body stalled: {exc}") from None
            else:
                await self.reader.readexactly(piece)
            nbytes -= piece

    async def _frame_body(self, head: bytes, body_len: int, what: str = "FRAME") -> bytes | bytearray:
        """The whole body of a FRAME (or ``what``) whose first bytes ``head`` were read. It
        holds a share of the frame budget (or a seeder's upload slot) meanwhile: a filter
        that stops sending in its middle (dead, or hostile) is refused after
        FRAME_BODY_STALL_S with no byte of it, rather than keep that share from every other
        domain of its store for ever."""
        if not isinstance(self.reader, SessionStream):
            return head + await self.reader.readexactly(body_len - len(head))
        try:
            return await self.reader.readexactly(body_len, head=head, stall_s=FRAME_BODY_STALL_S)
        except BodyStalled as exc:
            raise Refused("timeout", f"{what} body of {body_len} bytes stalled: {exc}") from None

    async def _dispatch(self, msg: wire.Message) -> None:
        if msg.type == wire.FRAME:
            await self._frame(msg.body)
        elif msg.type in (wire.SEED_BEGIN, wire.SEED_CHUNK, wire.SEED_END):
            await self.drva.seeder.handle(self, msg)
        elif msg.type == wire.FILTER_STATE:
            self._filter_state(messages.parse(msg, self.where))
        elif msg.type == wire.PING:
            messages.parse(msg, self.where)
            if self.writer.transport.get_write_buffer_size() <= ACK_WRITE_BUFFER_MAX:
                self.writer.writelines(wire.control(wire.PONG, {}))
            # else the peer has not read the PONGs it was sent: one more would only grow
            # the buffer (a PING flood from a peer that never reads grew it unbounded).
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

    async def _frame(self, raw: bytes | bytearray) -> None:
        frame = decode_frame(raw, self.where)
        dom = self.domains.get(frame.domain)
        if dom is None:
            raise Refused("unknown_domain", f"frame of domain {frame.domain}, not in this session's HELLO")
        if dom.fenced:
            raise _fenced(dom)
        dom.stats.frames_received += 1
        dom.stats.bytes_received += len(raw)
        self._check_frame(dom, raw, frame)
        if not self._continues(dom, frame):
            return
        committer = self.drva.committer
        # Received, if not staged yet: the newest write captured (rpo_lag_s), as it will be staged.
        dom.newest_received_ts = max(min(int(frame.records["timestamp_ns"][-1]), committer.ts_ceiling(dom)),
                                     dom.accepted_ts)
        lane = self._lane(dom)
        staged = await committer.wait_room(len(raw), held_back=lambda: self._held_back()[lane],
                                           gone=lambda: self.closed or dom.session is not self)
        # Checked again: while this frame waited, another session of the domain (the
        # filter, reconnected) may have staged these seqs, or taken the domain over.
        if not staged or self.closed or dom.session is not self:
            log.info("frame_dropped", peer=self.where, domain=dom.id, first_seq=frame.first_seq,
                     last_seq=frame.last_seq, reason="the session was replaced while the frame waited")
            return
        if dom.fenced:
            raise _fenced(dom)
        if not self._continues(dom, frame):
            return
        # From here to stage(): no await.
        if frame.first_seq <= dom.accepted_seq:
            raw, frame = _cut(frame, dom.accepted_seq + 1)
        ts, ceiling = frame.records["timestamp_ns"], committer.ts_ceiling(dom)
        # Non-decreasing in a frame (decode_frame): its first and last are its bounds.
        if int(ts[0]) < dom.accepted_ts or int(ts[-1]) > ceiling:
            raw, frame = self._restamp(dom, frame, ceiling)
        committer.stage(dom, raw, frame)
        self._vouched[dom.id] = frame.last_seq

    def _check_frame(self, dom: "DomainState", raw: bytes | bytearray, frame: Frame) -> None:
        """Refuse a frame this DRVA must not log for ``dom`` (see the module docstring)."""
        frame_len_max = self.drva.committer.frame_len_max
        if len(raw) > frame_len_max:
            dom.stats.frames_refused += 1
            raise Refused("frame_too_large", f"domain {dom.id}: frame of seqs {frame.first_seq}..{frame.last_seq} "
                                             f"is {len(raw)} bytes; this DRVA's log takes frames of at most "
                                             f"{frame_len_max} bytes (half its data area)")
        try:
            check_disk_bounds(frame.records, dom.disk_sizes, f"{self.where}: domain {dom.id}")
            # What a session holds each frame to before it logs it, and only that: a frame
            # an older DRVA logged is not refused for its counts at a restart
            # (``drva.partitions`` re-checks mark names only): the catalog bounds what such
            # a frame leaves (FORMAT.md §8.2).
            check_special_counts(frame.records, f"{self.where}: domain {dom.id}")
            # A name the catalog cannot hold once stopped every domain's commits.
            check_mark_names(frame.records, frame.payload, f"{self.where}: domain {dom.id}")
        except FormatError:
            dom.stats.frames_refused += 1
            raise

    def _continues(self, dom: "DomainState", frame: Frame) -> bool:
        """True if ``frame`` holds seqs after ``dom.accepted_seq`` and none after a gap;
        False for a resend of accepted seqs (dropped, acked again); Refused after a gap,
        or when seqs it holds would be dropped as duplicates of content this session
        cannot vouch for (``_vouched``: it did not stage them, and they were not durable
        at its WELCOME) — dropped and acked, the filter's writes would be lost."""
        dropped_to = min(frame.last_seq, dom.accepted_seq)
        if frame.first_seq <= dropped_to and dropped_to > self._vouched.get(dom.id, dropped_to):
            dom.stats.frames_refused += 1
            raise Refused("seq_conflict", f"domain {dom.id}: frame of seqs {frame.first_seq}..{frame.last_seq}: "
                                          f"seqs {self._vouched[dom.id] + 1}..{dropped_to} are accepted on this "
                                          f"DRVA, but not from this session (another filter instance, or another "
                                          f"site, numbered them); reconnect to learn where the domain's seqs go on",
                          dom.id)
        if frame.last_seq <= dom.accepted_seq:
            dom.stats.duplicates_dropped += 1
            log.debug("duplicate_dropped", domain=dom.id, first_seq=frame.first_seq, last_seq=frame.last_seq)
            self.want_ack()
            return False
        if frame.first_seq > dom.accepted_seq + 1:
            dom.stats.frames_refused += 1
            raise Refused("seq_gap", f"domain {dom.id}: frame starts at seq {frame.first_seq}, "
                                     f"expected {dom.accepted_seq + 1} (records are missing)")
        return True

    def _restamp(self, dom: "DomainState", frame: Frame, ceiling: int) -> tuple[bytes, Frame]:
        """``frame`` with its timestamps raised to ``dom.accepted_ts`` and clamped to
        ``ceiling`` (``GroupCommitter.ts_ceiling``, never below the former): FORMAT.md §9.2.

        Raised: seqs order a domain's writes, and the catalog maps time to seq, so time
        may not go backwards along them. Refusing would leave the filter no way on until
        its clock passed the old one again; the record keeps its seq, disk, offset and
        data, and its time is the newest the domain had, which is what it saw last.
        Clamped: a time far ahead of this host's clock (a filter clock that jumped) would
        be raised into every later record of the domain, and put them all past any time
        ``--at`` names, and past every consolidation and retention cut-off, for good."""
        records = np.array(frame.records)
        ts = records["timestamp_ns"]
        floor = dom.accepted_ts
        raised = int(np.count_nonzero(ts < floor))
        clamped = int(np.count_nonzero(ts > ceiling))
        back_ns, ahead_ns = floor - int(ts[0]), int(ts[-1]) - ceiling
        np.clip(ts, np.uint64(floor), np.uint64(ceiling), out=ts)
        self._note_rewritten(dom, frame, "raised", raised, "back_ns", back_ns,
                             "the filter's clock is behind the domain's newest accepted timestamp")
        self._note_rewritten(dom, frame, "clamped", clamped, "ahead_ns", ahead_ns,
                             f"the filter's clock is more than {TS_AHEAD_MAX_S:g} s ahead of this DRVA's")
        raw = encode_frame(frame.domain, records, frame.payload)
        return raw, decode_frame(raw, "frame with restamped timestamps")

    def _note_rewritten(self, dom: "DomainState", frame: Frame, how: str, records: int, off_field: str,
                        off_ns: int, reason: str) -> None:
        """Count the ``records`` of ``frame`` whose timestamps were ``how`` ("raised" or
        "clamped") in the status counter ``timestamps_<how>``, and log an event of that
        name — at most once per ``TS_RAISED_LOG_INTERVAL_S`` per domain and kind: a
        filter clock off for hours would log every frame."""
        if not records:
            return
        event = f"timestamps_{how}"
        total = getattr(dom.stats, event) + records
        setattr(dom.stats, event, total)
        now = time.monotonic()
        if now - dom.ts_logged[how] < TS_RAISED_LOG_INTERVAL_S:
            return
        dom.ts_logged[how] = now
        log.warning(event, peer=self.where, filter=self.filter_name, domain=dom.id, first_seq=frame.first_seq,
                    records=records, **{off_field: off_ns, f"{how}_total": total}, reason=reason)

    def _filter_state(self, doc: dict[str, Any]) -> None:
        """``doc`` is checked whole (drva.messages): every field is there (but the optional
        ``oldest_unacked_age_ms`` and ``now_ns``), typed, in range."""
        dom = self.domains.get(doc["domain"])
        if dom is None:
            raise Refused("unknown_domain", f"FILTER_STATE for domain {doc['domain']}, not in this session")
        if dom.filter_state.get("mode") != doc["mode"]:
            log.info("filter_mode", domain=dom.id, mode=doc["mode"], dirty_bytes=doc["dirty_bytes"])
        # All of it, each report anew: a field this one leaves out (a filter older than
        # it, or nothing waits unacked) is not taken from the one before.
        dom.filter_state = {k: v for k, v in doc.items() if k not in ("domain", "now_ns")}
        # Bounded as its records' timestamps are (rpo_lag_s compares the two).
        dom.filter_state["captured_ts"] = min(doc["captured_ts"], self.drva.committer.ts_ceiling(dom))
        if "now_ns" in doc:  # a filter older than the field does not say
            self._note_filter_clock(dom, doc["now_ns"])

    def _note_filter_clock(self, dom: "DomainState", filter_now_ns: int) -> None:
        """Take one reading of the filter's clock (FORMAT.md §9): its offset from this
        host's goes in the status (``filter_clock_offset_s``, the MSA's ``filter_clock_skew``
        alarm). Logged when it goes past ``SKEW_DEFAULT_S`` and when it comes back: the
        stamps of a filter far behind raise nothing here (they are not before the
        domain's newest), yet ``--at`` picks points later than meant by that much."""
        dom.note_filter_clock(filter_now_ns - self.drva.committer.clock_ns())
        offset_s = dom.filter_clock_offset_ns() / 1e9
        skewed = abs(offset_s) > SKEW_DEFAULT_S
        if skewed == dom.filter_clock_skewed:
            return
        dom.filter_clock_skewed = skewed
        if skewed:
            log.warning("filter_clock_skew", peer=self.where, filter=self.filter_name, domain=dom.id,
                        offset_s=round(offset_s, 3), bound_s=SKEW_DEFAULT_S,
                        reason="the filter's clock (that stamps its writes) and this DRVA's differ by more than "
                               "the store's locks allow: a recovery --at picks points off by that much")
        else:
            log.info("filter_clock_skew_cleared", peer=self.where, filter=self.filter_name, domain=dom.id,
                     offset_s=round(offset_s, 3))

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
            permille = int(self.drva.committer.usage() * 1000)
            held = self._held_back()  # a store that holds the log up holds back only its own domains
            for dom in self.domains.values():
                flags = wire.ACK_BACKPRESSURE if held[self._lane(dom)] else 0
                # Never above what this session vouches for: what is durable beyond it is not
                # its filter's content (the domain's seqs moved under it: a catalog said so).
                durable = min(dom.durable_seq, self._vouched.get(dom.id, dom.durable_seq))
                if self._acked.get(dom.id) == durable and not flags:
                    continue
                f = flags | (wire.ACK_STOPPED if dom.fenced else 0)
                self.writer.writelines(wire.ack_message(dom.id, durable, f, permille))
                self._acked[dom.id] = durable


def _cut(frame: Frame, from_seq: int) -> tuple[bytes, Frame]:
    """The records of ``frame`` from ``from_seq`` on, as a new frame (a partial resend)."""
    k = from_seq - frame.first_seq
    starts = payload_starts(payload_lengths(frame.records))
    at = int(starts[k])
    records = np.array(frame.records[k:])
    raw = encode_frame(frame.domain, records, frame.payload[at:])
    return raw, decode_frame(raw, "cut frame")
