"""A blocking wire client for the fuzzing campaign, the frames it sends, and its mutations.

Blocking sockets, not asyncio: a hypothesis state machine calls it step by step, and every
read has a deadline (``IO_TIMEOUT_S``), so a DRVA that stops answering fails a case
instead of hanging the run. Every frame's bytes are ``payload_for`` its seqs
(``cdp/testing/records.py``), which is how the campaign tells a good frame in the log from
anything else.
"""

from __future__ import annotations

import random
import socket
import ssl
import struct
from collections.abc import Callable

import numpy as np

from cdp import wire
from cdp.frame import encode_frame
from cdp.records import empty_records
from tests.drva.harness import SECRET
from tests.frames_gen import TS0, payload_for

# One answer from a local DRVA takes milliseconds; this only bounds a hang.
IO_TIMEOUT_S = 20.0
# A TLS case waits this long for an answer that may not come (see ``Peer.rest``).
TLS_QUIET_S = 0.25
RECORDS_PER_FRAME_MAX = 8
SECTORS_PER_RECORD_MAX = 8


class Peer:
    """One connection to a DRVA, blocking, with a deadline on every read."""

    def __init__(self, port: int, tls: ssl.SSLContext | None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)
        self.sock = tls.wrap_socket(sock, server_hostname="127.0.0.1") if tls is not None else sock
        self._buf = b""

    def send(self, *parts: bytes | memoryview) -> None:
        try:
            self.sock.sendall(b"".join(parts))
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the DRVA already refused and closed: the answer is in what it sent

    def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            try:
                got = self.sock.recv(1 << 16)
            except (ConnectionResetError, ssl.SSLError):
                got = b""
            if not got:
                return False
            self._buf += got
        return True

    def message(self) -> wire.Message | None:
        """The next message, or None at the end of the stream."""
        if not self._fill(wire.HEADER_SIZE):
            return None
        mtype, body_len, _ = wire.parse_header(self._buf[: wire.HEADER_SIZE], "drva")
        if not self._fill(wire.HEADER_SIZE + body_len):
            return None
        body = self._buf[wire.HEADER_SIZE : wire.HEADER_SIZE + body_len]
        self._buf = self._buf[wire.HEADER_SIZE + body_len :]
        return wire.Message(mtype, body)

    def until(self, want: Callable[[wire.Message], bool]) -> wire.Message | None:
        """Skip messages (ACKs) until one ``want``s it; None at the end of the stream."""
        while (msg := self.message()) is not None:
            if want(msg):
                return msg
        return None

    def rest(self) -> list[wire.Message]:
        """End our side, then every message until the DRVA closes the connection.

        TLS has no half-close (``SSLSocket.shutdown`` drops the TLS layer and leaves raw
        records to read), so a TLS peer reads until the DRVA closes or is quiet for
        ``TLS_QUIET_S``: a DRVA still waiting for the rest of a cut message."""
        if isinstance(self.sock, ssl.SSLSocket):
            self.sock.settimeout(TLS_QUIET_S)
        else:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        out = []
        try:
            while (msg := self.message()) is not None:
                out.append(msg)
        except TimeoutError:
            if not isinstance(self.sock, ssl.SSLSocket):
                raise
        return out

    def close(self) -> None:
        self.sock.close()


def hello(domains: list[int], name: str = "fuzz-host") -> tuple[bytes, bytes]:
    nonce = wire.new_nonce()
    msg = b"".join(wire.control(wire.HELLO, {"version": 1, "filter": name, "site": "torture",
                                             "domains": domains, "nonce": nonce.hex()}))
    return msg, nonce


def auth(secret: bytes, nonce: bytes, challenge: wire.Message, name: str = "fuzz-host") -> bytes:
    dn = bytes.fromhex(challenge.json("t")["nonce"])
    return b"".join(wire.control(wire.AUTH, {"mac": wire.filter_mac(secret, nonce, dn, name)}))


def welcome(port: int, tls: ssl.SSLContext | None, domains: list[int],
            secret: bytes = SECRET.encode()) -> tuple[Peer, wire.Message | None]:
    """A session through HELLO and AUTH; the DRVA's answer to AUTH (WELCOME or ERROR)."""
    peer = Peer(port, tls)
    raw, nonce = hello(domains)
    peer.send(raw)
    ch = peer.message()
    if ch is None or ch.type != wire.CHALLENGE:
        return peer, ch
    peer.send(auth(secret, nonce, ch))
    return peer, peer.message()


def durable_of(msg: wire.Message, domain: int) -> int:
    return int(msg.json("t")["domains"][str(domain)]["durable_seq"])


def frame(domain: int, first_seq: int, rng: random.Random) -> bytes:
    """A valid frame of consecutive WRITEs whose bytes are ``payload_for`` their seqs."""
    n = rng.randint(1, RECORDS_PER_FRAME_MAX)
    rec = empty_records(n)
    seqs = np.arange(first_seq, first_seq + n, dtype=np.uint64)
    lengths = [rng.randint(1, SECTORS_PER_RECORD_MAX) * 512 for _ in range(n)]
    rec["seq"] = seqs
    rec["timestamp_ns"] = TS0 + seqs
    rec["offset"] = (seqs % 1024) * 4096
    rec["length"] = lengths
    return encode_frame(domain, rec, b"".join(payload_for(int(s), n_) for s, n_ in zip(seqs, lengths)))


def frame_message(raw: bytes) -> bytes:
    return b"".join(wire.frame_message([raw]))


# ------------------------------------------------------------------ mutations


_INTERESTING = (0, 1, 0x7F, 0x80, 0xFF)
_INTERESTING_U32 = (0, 1, 16, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF, 64 << 20, (64 << 20) + 65)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """1..3 byte-level mutations of ``data`` (never a copy of it)."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        at = rng.randrange(len(buf)) if buf else 0
        if op == 0 and buf:
            buf[at] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[at] = rng.choice(_INTERESTING)
        elif op == 2 and len(buf) >= wire.HEADER_SIZE:  # a header field: type, flags, version, length, sum
            field = rng.choice([(4, "<B"), (5, "<B"), (6, "<H"), (8, "<I"), (12, "<I")])
            width = struct.calcsize(field[1])
            value = rng.choice(_INTERESTING_U32) & ((1 << 8 * width) - 1)
            struct.pack_into(field[1], buf, field[0], value)
        elif op == 3:
            del buf[rng.randrange(len(buf) + 1) :]  # cut
        elif op == 4:
            buf[at:at] = rng.randbytes(rng.randint(1, 64))  # insert
        elif op == 5 and buf:
            end = min(len(buf), at + rng.randint(1, 256))
            buf[at:at] = buf[at:end]  # duplicate a range
        elif op == 6 and buf:
            del buf[at : at + rng.randint(1, 64)]
        else:
            buf += rng.randbytes(rng.randint(1, 4096))  # trailing garbage
    if bytes(buf) == data:
        buf.append(0)
    return bytes(buf)
