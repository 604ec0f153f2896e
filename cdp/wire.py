"""Wire protocol between filters and DRVAs (docs/FORMAT.md §9): messages and handshake.

Pure codec plus two asyncio helpers (``read_message``, ``write_message``). Frames are
sent as their parts with one ``writelines`` (no join); bodies are read with
``readexactly`` into one buffer that the frame decoder then views in place.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import struct
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

import xxhash

from cdp.errors import FormatError
from cdp.frame import FRAME_LEN_MAX

WIRE_MAGIC = b"CDPW"
WIRE_VERSION = 1

HELLO, CHALLENGE, AUTH, WELCOME, FRAME, ACK, ERROR = 1, 2, 3, 4, 5, 6, 7
SEED_BEGIN, SEED_CHUNK, SEED_END, SEED_DONE, PING, PONG = 8, 9, 10, 11, 12, 13
FILTER_STATE, MARK_REQUEST = 14, 15
TYPE_NAMES = {
    HELLO: "HELLO", CHALLENGE: "CHALLENGE", AUTH: "AUTH", WELCOME: "WELCOME", FRAME: "FRAME",
    ACK: "ACK", ERROR: "ERROR", SEED_BEGIN: "SEED_BEGIN", SEED_CHUNK: "SEED_CHUNK",
    SEED_END: "SEED_END", SEED_DONE: "SEED_DONE", PING: "PING", PONG: "PONG",
    FILTER_STATE: "FILTER_STATE", MARK_REQUEST: "MARK_REQUEST",
}
CONTROL_BODY_MAX = 64 << 10
SEED_CHUNK_MAX = 64 << 20
_BODY_MAX = {FRAME: FRAME_LEN_MAX, SEED_CHUNK: SEED_CHUNK_MAX + 16}

ACK_BACKPRESSURE = 1
ACK_STOPPED = 2

# FORMAT.md §9: message header, 16 bytes.
_HEADER = struct.Struct("<4sBBHII")
assert _HEADER.size == 16, "FORMAT.md §9"
HEADER_SIZE = _HEADER.size
# FORMAT.md §9: ACK body, 24 bytes.
_ACK = struct.Struct("<IIQII")
assert _ACK.size == 24, "FORMAT.md §9"
# FORMAT.md §9: SEED_CHUNK body prefix, 16 bytes.
_SEED_CHUNK = struct.Struct("<IIQ")
assert _SEED_CHUNK.size == 16, "FORMAT.md §9"

NONCE_BYTES = 32


class ProtocolError(FormatError):
    """The peer broke the wire protocol; the connection cannot go on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def body_sum(body: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(body) & 0xFFFFFFFF


def pack_header(mtype: int, body_len: int, summed: int) -> bytes:
    return _HEADER.pack(WIRE_MAGIC, mtype, 0, WIRE_VERSION, body_len, summed)


def body_max(mtype: int) -> int:
    """The largest body a message of this type may have (FORMAT.md §9)."""
    return _BODY_MAX.get(mtype, CONTROL_BODY_MAX)


def parse_header(raw: bytes, where: str) -> tuple[int, int, int]:
    """(type, body_len, body_sum) of a message header; ProtocolError when it is not one."""
    magic, mtype, flags, version, body_len, summed = _HEADER.unpack(raw)
    if magic != WIRE_MAGIC:
        raise ProtocolError("bad_message", f"{where}: magic {magic!r}, expected {WIRE_MAGIC!r}")
    if version != WIRE_VERSION:
        raise ProtocolError("unsupported_version", f"{where}: wire version {version}, expected {WIRE_VERSION}")
    if mtype not in TYPE_NAMES or flags:
        raise ProtocolError("bad_message", f"{where}: unknown message type {mtype} (flags {flags})")
    limit = body_max(mtype)
    if body_len > limit:
        raise ProtocolError(
            "oversized", f"{where}: {TYPE_NAMES[mtype]} of {body_len} bytes exceeds {limit}")
    return mtype, body_len, summed


@dataclass(frozen=True, slots=True)
class Message:
    type: int
    body: bytes

    @property
    def name(self) -> str:
        return TYPE_NAMES[self.type]

    def json(self, where: str) -> dict[str, Any]:
        """The body of a control message as a JSON object: strict UTF-8 (``json.loads``
        would also guess UTF-16/32), no duplicate key, no NaN/Infinity, bounded nesting."""
        try:
            text = bytes(self.body).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(
                "bad_message", f"{where}: {self.name} body is not UTF-8 (byte {exc.start})") from None
        try:
            doc = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
        except RecursionError:
            raise ProtocolError("bad_message", f"{where}: {self.name} body is nested too deep") from None
        except ValueError as exc:
            raise ProtocolError(
                "bad_message", f"{where}: {self.name} body is not JSON ({str(exc)[:200]})") from None
        if not isinstance(doc, dict):
            raise ProtocolError(
                "bad_message", f"{where}: {self.name} body is a JSON {type(doc).__name__}, expected an object")
        return doc


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise ValueError("duplicate key in an object")
    return doc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def read_message(reader: asyncio.StreamReader, where: str,
                       allowed: Container[int] | None = None) -> Message:
    """The next message; ``asyncio.IncompleteReadError`` at a clean or torn end of stream.

    A type not in ``allowed`` is refused from its header alone, before a byte of its
    body is read: what a peer may make us buffer is bounded by the types we accept."""
    mtype, body_len, summed = parse_header(await reader.readexactly(HEADER_SIZE), where)
    if allowed is not None and mtype not in allowed:
        names = "/".join(TYPE_NAMES[t] for t in sorted(allowed))
        raise ProtocolError("unexpected_message", f"{where}: {TYPE_NAMES[mtype]} ({body_len} bytes) "
                                                  f"where {names} was expected")
    body = await reader.readexactly(body_len) if body_len else b""
    if mtype != FRAME and body_sum(body) != summed:
        raise ProtocolError("bad_checksum", f"{where}: {TYPE_NAMES[mtype]} body checksum mismatch")
    return Message(mtype, body)


def control(mtype: int, doc: dict[str, Any]) -> list[bytes]:
    """A control message as buffers for ``writelines``."""
    body = json.dumps(doc, separators=(",", ":")).encode()
    if len(body) > CONTROL_BODY_MAX:
        raise ValueError(f"{TYPE_NAMES[mtype]} body of {len(body)} bytes")
    return [pack_header(mtype, len(body), body_sum(body)), body]


def frame_message(parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """A FRAME message around the parts of an encoded frame (no copy)."""
    n = sum(len(memoryview(p).cast("B")) for p in parts)
    return [pack_header(FRAME, n, 0), *parts]


def ack_message(domain: int, durable_seq: int, flags: int = 0, log_used_permille: int = 0) -> list[bytes]:
    body = _ACK.pack(domain, flags, durable_seq, log_used_permille, 0)
    return [pack_header(ACK, len(body), body_sum(body)), body]


def parse_ack(body: bytes, where: str) -> tuple[int, int, int, int]:
    """(domain, flags, durable_seq, log_used_permille)."""
    if len(body) != _ACK.size:
        raise ProtocolError("bad_message", f"{where}: ACK of {len(body)} bytes, expected {_ACK.size}")
    domain, flags, durable_seq, permille, _ = _ACK.unpack(body)
    return domain, flags, durable_seq, permille


def seed_chunk_message(domain: int, disk: int, chunk: int, data: bytes | memoryview) -> list:
    prefix = _SEED_CHUNK.pack(domain, disk, chunk)
    h = xxhash.xxh3_64(prefix)
    h.update(data)
    return [pack_header(SEED_CHUNK, len(prefix) + len(data), h.intdigest() & 0xFFFFFFFF), prefix, data]


#: Bytes of a SEED_CHUNK body before the chunk's bytes (domain u32, disk u32, chunk u64).
SEED_CHUNK_HEADER_SIZE = _SEED_CHUNK.size


def parse_seed_chunk_header(head: bytes, where: str) -> tuple[int, int, int]:
    """(domain, disk, chunk) of a SEED_CHUNK body's first ``SEED_CHUNK_HEADER_SIZE`` bytes."""
    if len(head) != _SEED_CHUNK.size:
        raise ProtocolError("bad_message", f"{where}: SEED_CHUNK of {len(head)} bytes")
    return _SEED_CHUNK.unpack(head)


def parse_seed_chunk(body: bytes, where: str) -> tuple[int, int, int, memoryview]:
    if len(body) < _SEED_CHUNK.size:
        raise ProtocolError("bad_message", f"{where}: SEED_CHUNK of {len(body)} bytes")
    domain, disk, chunk = _SEED_CHUNK.unpack_from(body)
    return domain, disk, chunk, memoryview(body)[_SEED_CHUNK.size :]


def error_message(code: str, message: str, fatal: bool = True, domain: int | None = None) -> list[bytes]:
    body: dict = {"code": code, "message": message[:2000], "fatal": fatal}
    if domain is not None:  # the domain the error is about (``fenced``)
        body["domain"] = domain
    return control(ERROR, body)


# --------------------------------------------------------------------------- handshake


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def parse_nonce(value: Any, where: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != NONCE_BYTES:
        raise ProtocolError("bad_message", f"{where}: nonce is not {NONCE_BYTES} bytes of hex")
    return raw


def filter_mac(secret: bytes, filter_nonce: bytes, drva_nonce: bytes, filter_name: str) -> str:
    msg = b"cdp-wire-1 filter" + filter_nonce + drva_nonce + filter_name.encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def drva_mac(secret: bytes, filter_nonce: bytes, drva_nonce: bytes, drva_name: str) -> str:
    msg = b"cdp-wire-1 drva" + filter_nonce + drva_nonce + drva_name.encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def mac_matches(expected: str, got: Any) -> bool:
    return isinstance(got, str) and hmac.compare_digest(expected.encode(), got.encode())
