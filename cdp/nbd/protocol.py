"""The NBD wire protocol, server side (docs/FORMAT.md §17): constants and a pure codec.

No I/O here: ``cdp.nbd.server`` reads the fixed-size parts with ``readexactly``
and hands the bytes to these functions. The subset is the fixed newstyle handshake, the
options GO / INFO / LIST / ABORT / STRUCTURED_REPLY / EXPORT_NAME, and the commands READ,
WRITE, FLUSH, TRIM, WRITE_ZEROES and DISC, as the NBD protocol document (proto.md of the
NetworkBlockDevice project) defines them. Unlike the rest of FORMAT.md, every NBD integer
is **big-endian** (network order).

Two kinds of bad input, two exceptions:

- ``NbdProtocolError``: the byte stream cannot be trusted any more (bad magic, unknown
  client flags, a length past our caps that we will not read): the connection is closed.
- ``OptionInvalid``: one option's data is malformed; the option gets
  ``NBD_REP_ERR_INVALID`` and haggling goes on.

Client-side packers (``pack_option``, ``pack_request``) and reply parsers live here too:
the tests play hostile clients with them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cdp.errors import FormatError

# --------------------------------------------------------------------------- magics

NBDMAGIC = b"NBDMAGIC"  # 0x4e42444d41474943, the INIT_PASSWD
IHAVEOPT = b"IHAVEOPT"  # 0x49484156454f5054, opens the handshake and every option
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --------------------------------------------------------------------------- handshake flags

FLAG_FIXED_NEWSTYLE = 1 << 0  # server, 16 bits
FLAG_NO_ZEROES = 1 << 1
SERVER_HANDSHAKE_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
FLAG_C_FIXED_NEWSTYLE = 1 << 0  # client, 32 bits
FLAG_C_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# --------------------------------------------------------------------------- options

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# --------------------------------------------------------------------------- transmission flags

TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8

# --------------------------------------------------------------------------- commands

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
COMMAND_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_DISC: "disc", CMD_FLUSH: "flush",
                 CMD_TRIM: "trim", CMD_CACHE: "cache", CMD_WRITE_ZEROES: "write_zeroes",
                 CMD_BLOCK_STATUS: "block_status"}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# Error values: fixed by the protocol (they happen to equal Linux errno values).
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# --------------------------------------------------------------------------- our limits

#: Largest option data we read; a GO carries at most 4 + 4096 + 2 + 2n bytes.
OPTION_BYTES_MAX = 64 << 10
#: Longest export name or description (the protocol's string limit).
STRING_BYTES_MAX = 4096
#: Largest READ / WRITE / WRITE_ZEROES length; the protocol's portable maximum (2^25),
#: advertised as the maximum block size. A WRITE past it is not read: the connection closes.
REQUEST_BYTES_MAX = 32 << 20
#: Longest error message we send in a structured error chunk.
ERROR_MESSAGE_BYTES_MAX = 1024

# --------------------------------------------------------------------------- structs

_GREETING = struct.Struct(">8s8sH")
assert _GREETING.size == 18, "FORMAT.md §17.1"
_CLIENT_FLAGS = struct.Struct(">I")
CLIENT_FLAGS_SIZE = _CLIENT_FLAGS.size
_OPTION = struct.Struct(">8sII")
assert _OPTION.size == 16, "FORMAT.md §17.2"
OPTION_HEADER_SIZE = _OPTION.size
_OPTION_REPLY = struct.Struct(">QIII")
assert _OPTION_REPLY.size == 20, "FORMAT.md §17.2"
OPTION_REPLY_HEADER_SIZE = _OPTION_REPLY.size
_EXPORT_NAME_REPLY = struct.Struct(">QH")
assert _EXPORT_NAME_REPLY.size == 10, "FORMAT.md §17.2"
EXPORT_NAME_ZEROES = bytes(124)
_INFO_EXPORT = struct.Struct(">HQH")
assert _INFO_EXPORT.size == 12, "FORMAT.md §17.2"
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
assert _INFO_BLOCK_SIZE.size == 14, "FORMAT.md §17.2"
_REQUEST = struct.Struct(">IHHQQI")
assert _REQUEST.size == 28, "FORMAT.md §17.3"
REQUEST_SIZE = _REQUEST.size
_SIMPLE_REPLY = struct.Struct(">IIQ")
assert _SIMPLE_REPLY.size == 16, "FORMAT.md §17.3"
SIMPLE_REPLY_SIZE = _SIMPLE_REPLY.size
_CHUNK = struct.Struct(">IHHQI")
assert _CHUNK.size == 20, "FORMAT.md §17.3"
CHUNK_HEADER_SIZE = _CHUNK.size
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_ERROR_HEAD = struct.Struct(">IH")


class NbdProtocolError(FormatError):
    """The NBD peer broke the protocol; the connection cannot go on."""


class OptionTooBig(NbdProtocolError):
    """An option longer than we read: refused with NBD_REP_ERR_TOO_BIG, then the connection
    closes (its data cannot be skipped without reading it)."""

    def __init__(self, option: int, length: int) -> None:
        super().__init__(f"option {option} of {length} bytes exceeds {OPTION_BYTES_MAX}")
        self.option = option


class OptionInvalid(FormatError):
    """One option's data is malformed; it is refused with NBD_REP_ERR_INVALID."""


# --------------------------------------------------------------------------- handshake


def server_greeting() -> bytes:
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS)


def parse_client_flags(raw: bytes) -> int:
    """The client's 32 flag bits; unknown bits close the connection, as the protocol says."""
    (flags,) = _CLIENT_FLAGS.unpack(raw)
    if flags & ~CLIENT_FLAGS_KNOWN:
        raise NbdProtocolError(f"client flags {flags:#010x}: unknown bits {flags & ~CLIENT_FLAGS_KNOWN:#x}")
    if not flags & FLAG_C_FIXED_NEWSTYLE:
        # Plain newstyle allows EXPORT_NAME only, and every client we serve speaks fixed.
        raise NbdProtocolError(f"client flags {flags:#010x}: fixed newstyle not set")
    return flags


def parse_option_header(raw: bytes) -> tuple[int, int]:
    """(option, data length) of a 16-byte option header; a length past our cap is refused
    here, before its data is read."""
    magic, option, length = _OPTION.unpack(raw)
    if magic != IHAVEOPT:
        raise NbdProtocolError(f"option magic {magic!r}, expected {IHAVEOPT!r}")
    if length > OPTION_BYTES_MAX:
        raise OptionTooBig(option, length)
    return option, length


def parse_export_name(data: bytes) -> str:
    """An export name: UTF-8, no NUL, at most 4096 bytes."""
    if len(data) > STRING_BYTES_MAX:
        raise OptionInvalid(f"export name of {len(data)} bytes exceeds {STRING_BYTES_MAX}")
    try:
        name = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OptionInvalid(f"export name is not UTF-8 (byte {exc.start})") from None
    if "\x00" in name:
        raise OptionInvalid("export name contains NUL")
    return name


def parse_info_request(data: bytes) -> tuple[str, tuple[int, ...]]:
    """(export name, information types asked for) of an NBD_OPT_INFO / NBD_OPT_GO."""
    if len(data) < 6:
        raise OptionInvalid(f"INFO/GO data of {len(data)} bytes, at least 6 expected")
    (name_len,) = _U32.unpack_from(data, 0)
    if name_len > len(data) - 6:
        raise OptionInvalid(f"INFO/GO name length {name_len} overruns {len(data)} bytes of data")
    name = parse_export_name(data[4 : 4 + name_len])
    (count,) = _U16.unpack_from(data, 4 + name_len)
    rest = data[6 + name_len :]
    if len(rest) != 2 * count:
        raise OptionInvalid(f"INFO/GO lists {count} information requests in {len(rest)} bytes")
    return name, struct.unpack(f">{count}H", rest)


def pack_option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def pack_option_error(option: int, reply_type: int, message: str) -> bytes:
    assert reply_type & REP_FLAG_ERROR, reply_type
    return pack_option_reply(option, reply_type, _utf8_capped(message, ERROR_MESSAGE_BYTES_MAX))


def pack_rep_server(name: str, description: str = "") -> bytes:
    """An NBD_REP_SERVER body: the name, then a human-readable description."""
    raw = name.encode()
    return _U32.pack(len(raw)) + raw + _utf8_capped(description, STRING_BYTES_MAX)


def pack_info_export(size: int, transmission_flags: int) -> bytes:
    return _INFO_EXPORT.pack(INFO_EXPORT, size, transmission_flags)


def pack_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return _INFO_BLOCK_SIZE.pack(INFO_BLOCK_SIZE, minimum, preferred, maximum)


def pack_info_string(info_type: int, text: str) -> bytes:
    """NBD_INFO_NAME or NBD_INFO_DESCRIPTION."""
    assert info_type in (INFO_NAME, INFO_DESCRIPTION), info_type
    return _U16.pack(info_type) + _utf8_capped(text, STRING_BYTES_MAX)


def pack_export_name_reply(size: int, transmission_flags: int, no_zeroes: bool) -> bytes:
    """The answer to NBD_OPT_EXPORT_NAME; the 124 zero bytes unless the client said NO_ZEROES."""
    head = _EXPORT_NAME_REPLY.pack(size, transmission_flags)
    return head if no_zeroes else head + EXPORT_NAME_ZEROES


def _utf8_capped(text: str, limit: int) -> bytes:
    raw = text.encode()
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode()  # never cut a character in two


# --------------------------------------------------------------------------- transmission


@dataclass(frozen=True, slots=True)
class Request:
    """One transmission-phase request header (the WRITE payload follows it on the wire)."""

    flags: int
    command: int
    handle: int
    offset: int
    length: int

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.command, f"command-{self.command}")


def parse_request(raw: bytes) -> Request:
    magic, flags, command, handle, offset, length = _REQUEST.unpack(raw)
    if magic != REQUEST_MAGIC:
        raise NbdProtocolError(f"request magic {magic:#010x}, expected {REQUEST_MAGIC:#010x}")
    return Request(flags, command, handle, offset, length)


@dataclass(frozen=True, slots=True)
class ExportLimits:
    """What a request is checked against: the export and what was negotiated for it."""

    size: int
    read_only: bool
    block_min: int
    block_max: int
    structured: bool


#: Flags each command accepts. FUA is accepted on every command (clients set it on
#: reads too); DF only once structured replies are on (checked below).
_FLAGS_ALLOWED = {
    CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
}
_WRITING = (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES)


def request_error(req: Request, limits: ExportLimits) -> tuple[int, str]:
    """(NBD error, message) a request must be refused with before the backend sees it;
    (0, "") when it may run. The order is the protocol's: unknown command or flag, then
    read-only, then bounds (ENOSPC for writes past the end, EINVAL otherwise), then
    alignment and size limits."""
    allowed = _FLAGS_ALLOWED.get(req.command)
    if allowed is None:
        return EINVAL, f"unsupported command {req.command}"
    if not limits.structured:
        allowed &= ~CMD_FLAG_DF
    if req.flags & ~allowed:
        return EINVAL, f"{req.name}: flags {req.flags:#x} not allowed"
    if req.command in (CMD_DISC, CMD_FLUSH):
        if req.offset or req.length:
            return EINVAL, f"{req.name}: offset and length must be zero"
        return 0, ""
    if limits.read_only and req.command in _WRITING:
        return EPERM, f"{req.name}: the export is read-only"
    if req.offset + req.length > limits.size:
        code = ENOSPC if req.command in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
        return code, f"{req.name} [{req.offset}, {req.offset + req.length}) ends past the export's {limits.size} bytes"
    if req.offset % limits.block_min or req.length % limits.block_min:
        return EINVAL, f"{req.name} [{req.offset}, +{req.length}) not aligned to {limits.block_min} bytes"
    if req.command != CMD_TRIM and req.length > limits.block_max:
        return EINVAL, f"{req.name} of {req.length} bytes exceeds the maximum block size {limits.block_max}"
    return 0, ""


def pack_simple_reply(handle: int, error: int = 0) -> bytes:
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def pack_chunk_header(flags: int, reply_type: int, handle: int, length: int) -> bytes:
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, reply_type, handle, length)


def pack_data_chunk_header(handle: int, offset: int, data_len: int, done: bool) -> bytes:
    """Header and offset of an NBD_REPLY_TYPE_OFFSET_DATA chunk; the data follows."""
    assert 0 < data_len <= REQUEST_BYTES_MAX, data_len
    flags = REPLY_FLAG_DONE if done else 0
    return pack_chunk_header(flags, REPLY_TYPE_OFFSET_DATA, handle, 8 + data_len) + _U64.pack(offset)


def pack_none_chunk(handle: int) -> bytes:
    return pack_chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)


def pack_error_chunk(handle: int, error: int, message: str) -> bytes:
    """A final NBD_REPLY_TYPE_ERROR chunk carrying a message for a human."""
    assert error, "an error chunk needs a nonzero error"
    text = _utf8_capped(message, ERROR_MESSAGE_BYTES_MAX)
    body = _ERROR_HEAD.pack(error, len(text)) + text
    return pack_chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, len(body)) + body


# --------------------------------------------------------------------------- client side (tests)


def pack_client_flags(flags: int) -> bytes:
    return _CLIENT_FLAGS.pack(flags)


def parse_greeting(raw: bytes) -> int:
    """The handshake flags of a server greeting."""
    magic, opt_magic, flags = _GREETING.unpack(raw)
    if magic != NBDMAGIC or opt_magic != IHAVEOPT:
        raise NbdProtocolError(f"greeting magics {magic!r} {opt_magic!r}")
    return flags


def pack_option(option: int, data: bytes = b"") -> bytes:
    return _OPTION.pack(IHAVEOPT, option, len(data)) + data


def pack_info_request(name: str, info_types: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return _U32.pack(len(raw)) + raw + _U16.pack(len(info_types)) + struct.pack(f">{len(info_types)}H", *info_types)


def parse_option_reply_header(raw: bytes) -> tuple[int, int, int]:
    """(option, reply type, data length) of an option reply header."""
    magic, option, reply_type, length = _OPTION_REPLY.unpack(raw)
    if magic != OPTION_REPLY_MAGIC:
        raise NbdProtocolError(f"option reply magic {magic:#x}")
    return option, reply_type, length


def pack_request(command: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return _REQUEST.pack(REQUEST_MAGIC, flags, command, handle, offset, length)


def parse_simple_reply(raw: bytes) -> tuple[int, int]:
    """(error, handle) of a simple reply."""
    magic, error, handle = _SIMPLE_REPLY.unpack(raw)
    if magic != SIMPLE_REPLY_MAGIC:
        raise NbdProtocolError(f"simple reply magic {magic:#010x}")
    return error, handle


def parse_chunk_header(raw: bytes) -> tuple[int, int, int, int]:
    """(flags, type, handle, payload length) of a structured reply chunk."""
    magic, flags, reply_type, handle, length = _CHUNK.unpack(raw)
    if magic != STRUCTURED_REPLY_MAGIC:
        raise NbdProtocolError(f"structured reply magic {magic:#010x}")
    return flags, reply_type, handle, length
