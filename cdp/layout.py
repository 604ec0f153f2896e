"""Object keys (FORMAT.md §7): one ``*_key`` / ``parse_*_key`` pair per kind of object.

::

    d/<domain:08x>/cat/<generation:016x>.cat                               catalog object (§8.1)
    d/<domain:08x>/page/<first:016x>-<last:016x>-<level:02x>-<h:016x>.pg   catalog page (§8.4)
    d/<domain:08x>/seg/<timeline:08x>/<first_seq:016x>-<last_seq:016x>.seg segment (§5)
    d/<domain:08x>/base/<timeline:08x>/<seq:016x>/<disk:08x>.bmf          base manifest (§6.2)
    d/<domain:08x>/base/<timeline:08x>/<seq:016x>/<disk:08x>.seed.bmf     a seed's (§6.2)
    c/<h[0:2]>/<h:032x>.chk                                                chunk (§6.1), all domains

Numbers are fixed-width lower-case hex, so a plain listing (byte order) returns objects
in numeric order, and a prefix lists one domain's segments (of one timeline) or catalog.
Segments and bases carry their timeline (§8.5) in the key: after a fork, two timelines
hold different records under the same seqs. Parsers accept
exactly what the formatters produce and raise ``FormatError`` naming the key otherwise.

The chunk name ``h`` is the 128-bit ``xxh3_128`` value in hex, most significant digit
first (what ``xxhash.xxh3_128_hexdigest`` prints). Chunk headers and manifests store the
same value as 16 little-endian bytes (§0), so ``chunk_key`` takes those 16 bytes and
``parse_chunk_key`` gives them back.
"""

from __future__ import annotations

import re

from cdp.errors import FormatError

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
HASH_BYTES = 16  # §0: xxh3_128 is stored as 16 bytes

_SEGMENT = re.compile(r"d/([0-9a-f]{8})/seg/([0-9a-f]{8})/([0-9a-f]{16})-([0-9a-f]{16})\.seg")
_CATALOG = re.compile(r"d/([0-9a-f]{8})/cat/([0-9a-f]{16})\.cat")
_PAGE = re.compile(r"d/([0-9a-f]{8})/page/([0-9a-f]{16})-([0-9a-f]{16})-([0-9a-f]{2})-([0-9a-f]{16})\.pg")
_MANIFEST = re.compile(r"d/([0-9a-f]{8})/base/([0-9a-f]{8})/([0-9a-f]{16})/([0-9a-f]{8})(?:\.seed)?\.bmf")
_CHUNK = re.compile(r"c/([0-9a-f]{2})/([0-9a-f]{32})\.chk")


def _u(value: int, limit: int, what: str) -> int:
    """Refuse a number that does not fit its fixed-width field (a caller's error)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise ValueError(f"{what} {value!r} not in 0..{limit:#x}")
    return value


def _match(pattern: re.Pattern[str], key: object, what: str) -> re.Match[str]:
    m = pattern.fullmatch(key) if isinstance(key, str) else None
    if m is None:
        raise FormatError(f"key {key!r} is not a {what} key (FORMAT.md §7: {pattern.pattern})")
    return m


def domain_prefix(domain: int) -> str:
    """``d/<domain>/``: every object of one domain."""
    return f"d/{_u(domain, U32_MAX, 'domain'):08x}/"


def segment_prefix(domain: int, timeline: int | None = None) -> str:
    """``d/<domain>/seg/``: a domain's segments; with ``timeline``, that timeline's
    segments (``d/<domain>/seg/<timeline>/``), listed in seq order."""
    prefix = domain_prefix(domain) + "seg/"
    if timeline is None:
        return prefix
    return f"{prefix}{_u(timeline, U32_MAX, 'timeline'):08x}/"


def page_prefix(domain: int) -> str:
    """``d/<domain>/page/``: a domain's catalog pages, listed by first seq."""
    return domain_prefix(domain) + "page/"


def catalog_prefix(domain: int) -> str:
    """``d/<domain>/cat/``: a domain's catalog objects, listed in generation order."""
    return domain_prefix(domain) + "cat/"


def base_prefix(domain: int) -> str:
    """``d/<domain>/base/``: a domain's base manifests, by timeline, then seq."""
    return domain_prefix(domain) + "base/"


def segment_key(domain: int, timeline: int, first_seq: int, last_seq: int) -> str:
    """Key of timeline ``timeline``'s segment holding seqs ``first_seq..last_seq`` (inclusive)."""
    _u(first_seq, U64_MAX, "first_seq")
    _u(last_seq, U64_MAX, "last_seq")
    if last_seq < first_seq:
        raise ValueError(f"segment last_seq {last_seq} < first_seq {first_seq}")
    return f"{segment_prefix(domain, timeline)}{first_seq:016x}-{last_seq:016x}.seg"


def parse_segment_key(key: str) -> tuple[int, int, int, int]:
    """(domain, timeline, first_seq, last_seq) of a segment key."""
    m = _match(_SEGMENT, key, "segment")
    domain, timeline, first, last = (int(g, 16) for g in m.groups())
    if last < first:
        raise FormatError(f"key {key!r}: last_seq {last} < first_seq {first}")
    return domain, timeline, first, last


def page_key(domain: int, first_seq: int, last_seq: int, level: int, body_hash: int) -> str:
    """Key of a catalog page (§8.4): its seq range, level and ``xxh3`` of its body."""
    _u(first_seq, U64_MAX, "first_seq")
    _u(last_seq, U64_MAX, "last_seq")
    _u(level, 0xFF, "level")
    _u(body_hash, U64_MAX, "page hash")
    if last_seq < first_seq:
        raise ValueError(f"page last_seq {last_seq} < first_seq {first_seq}")
    return f"{page_prefix(domain)}{first_seq:016x}-{last_seq:016x}-{level:02x}-{body_hash:016x}.pg"


def parse_page_key(key: str) -> tuple[int, int, int, int, int]:
    """(domain, first_seq, last_seq, level, body_hash) of a catalog page key."""
    m = _match(_PAGE, key, "catalog page")
    domain, first, last, level, body_hash = (int(g, 16) for g in m.groups())
    if last < first:
        raise FormatError(f"key {key!r}: last_seq {last} < first_seq {first}")
    return domain, first, last, level, body_hash


def catalog_key(domain: int, generation: int) -> str:
    """Key of a domain's catalog object of ``generation`` (≥ 1)."""
    if _u(generation, U64_MAX, "generation") < 1:
        raise ValueError("a catalog generation is >= 1")
    return f"{catalog_prefix(domain)}{generation:016x}.cat"


def parse_catalog_key(key: str) -> tuple[int, int]:
    """(domain, generation) of a catalog key."""
    m = _match(_CATALOG, key, "catalog")
    domain, generation = (int(g, 16) for g in m.groups())
    if generation < 1:
        raise FormatError(f"key {key!r}: catalog generation 0 (generations start at 1)")
    return domain, generation


def base_manifest_key(domain: int, timeline: int, seq: int, disk: int, *, seed: bool = False) -> str:
    """Key of the base manifest of ``disk`` at ``seq`` on ``timeline``; ``seed``: a seed's,
    which never shares a key with a consolidation's base at the same seq (the seed takes
    that base's place in the catalog, and a reader that planned on the older one still
    finds it whole)."""
    _u(timeline, U32_MAX, "timeline")
    _u(seq, U64_MAX, "seq")
    _u(disk, U32_MAX, "disk")
    return f"{base_prefix(domain)}{timeline:08x}/{seq:016x}/{disk:08x}{'.seed' if seed else ''}.bmf"


def parse_base_manifest_key(key: str) -> tuple[int, int, int, int]:
    """(domain, timeline, seq, disk) of a base manifest key."""
    m = _match(_MANIFEST, key, "base manifest")
    domain, timeline, seq, disk = (int(g, 16) for g in m.groups())
    return domain, timeline, seq, disk


def chunk_key(h: bytes) -> str:
    """Key of the chunk whose ``xxh3_128`` is ``h`` (16 bytes, little-endian as stored)."""
    if not isinstance(h, (bytes, bytearray)) or len(h) != HASH_BYTES:
        raise ValueError(f"a chunk hash is {HASH_BYTES} bytes, got {h!r}")
    name = f"{int.from_bytes(h, 'little'):032x}"
    return f"c/{name[:2]}/{name}.chk"


def parse_chunk_key(key: str) -> bytes:
    """The 16 stored (little-endian) bytes of the ``xxh3_128`` a chunk key names."""
    m = _match(_CHUNK, key, "chunk")
    fan, name = m.groups()
    if fan != name[:2]:
        raise FormatError(f"key {key!r}: directory {fan!r} is not the first two digits of {name!r}")
    return int(name, 16).to_bytes(HASH_BYTES, "little")
