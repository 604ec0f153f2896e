"""EncryptedStore: encryption at rest of every object, as a wrapper of any store (FORMAT.md §19).

    store = EncryptedStore(open_inner(url), keyring)    # open_store does this when a key is set

Every object is *sealed* (``cdp.store.sealed_format``: an envelope, pages each
AES-256-GCM with its own tag and bound to the object's name and place, the envelope
again at the end), so that no byte of it can be changed, dropped, reordered or moved
unnoticed. Invariants:

- A sealed object's size is ``sealed_size(plaintext size)``, a pure function both ways
  (``plain_size``): ``list`` and ``stat`` report plaintext sizes without a GET.
- A ranged ``get`` fetches only the pages it needs: one GET when the envelope is cached
  (from an earlier read or write of the key) or when the range runs to the end (the
  trailing envelope comes with it, e.g. a segment's tail read); else the envelope and
  the pages are fetched concurrently.
- Cached envelopes are trusted only as far as the pages they decrypt: objects under some
  keys are replaced (locks, deployment records), so a page that fails with a cached
  envelope is read again with a fresh one, once, before the failure is reported.
- ``get`` returns ``bytes``, or a ``bytearray`` when it returns more than
  ``INLINE_BYTES_MAX`` (pages are opened straight into it: with one more copy of every
  segment and chunk, ``benchmarks.recovery --quick`` recovered from a sealed store at 0.67
  of the plain store's speed, without it at 0.80).
- ``get_unopened`` fetches like ``get`` but leaves the pages sealed: its ``Unopened``
  opens them (every check of ``get``) into the caller's buffer, in the caller's thread.
  A recovery (``rocva.fetch``) opens each segment run and chunk in its pool thread into
  a buffer that thread reuses: no fresh memory per object and no extra thread hand-off
  (a fresh buffer cost a page fault per 4 KiB, and this machine faults in at ~0.3 GB/s).
  Over a store that reads into lent buffers (a file store's ``get_into``:
  ``unopened_into`` is then true), ``get_unopened(..., into=buf)`` fetches the sealed
  pages into ``buf`` with no copy, as a plain recovery's reads are.
- Nothing unsealed is ever returned: a plaintext object (``NotEncrypted``), an unknown
  key id (``KeyUnavailable``) and any changed byte (``IntegrityError``, naming the object
  and page) are errors.
- ``max_bytes`` bounds the plaintext: the inner store is asked for at most the sealed
  size of that many bytes (``sealed_size`` grows with the plaintext), so a larger object
  is refused before its body is read, and ``TooLarge`` names the plaintext sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator

from cdp.direct_io import ReadBuffer
from cdp.errors import CdpError, ChecksumMismatch, FormatError, IntegrityError, KeyUnavailable, NotEncrypted
from cdp.logs import get_logger
from cdp.store.base import (
    Bytes, ObjectInfo, ObjectStore, StoreBase, TooLarge, check_max_bytes, check_range, check_size,
    resolve_range,
)
from cdp.store.keys import show_key, validate_key, validate_prefix
from cdp.store.sealed_format import (
    ENVELOPE, ENVELOPE_BYTES, ENVELOPE_ZERO, PAGE_BYTES, PAGE_SHIFT, SEALED_PAGE_BYTES, TAG_BYTES, VERSION, Envelope,
    open_range, page_offset, plain_size, seal, sealed_bound, sealed_size, summed_ok,
)
from cdp.store.storekeys import ChunkNamer, StoreKeyring
from cdp.summed import SEALED_MAGIC, SUMMED, unpack_summed

log = get_logger("cdp.store.crypt")

#: Envelopes cached (objects are immutable by convention; see the module docstring).
ENVELOPES_CACHED_MAX = 4096
#: Bytes sealed or opened on the event loop; more go to a worker thread (AES-GCM of
#: ``cryptography`` releases the GIL on large buffers: 2 threads sealed 8 MiB buffers
#: at 1.65x the speed of one here).
INLINE_BYTES_MAX = 256 << 10
#: Buffers ``EncryptedStore.put`` keeps to seal large objects into (as many as a DRVA
#: has uploads in flight by default), their sizes rounded up to this.
SEAL_BUFFERS_KEPT = 4
SEAL_BUFFER_ROUND = 1 << 20
#: A cold ranged get that starts within this many bytes of the object's start fetches
#: from offset 0 in one GET (envelope included) rather than two concurrent ones.
HEAD_MERGE_BYTES = 256 << 10


class Unopened:
    """The sealed pages of plaintext ``[start, end)`` of one object, fetched and not yet
    opened (``EncryptedStore.get_unopened``). ``len()`` is the plaintext length (so a
    caller checks a short read as with ``get``); ``open_into`` decrypts and checks every
    page exactly as ``get`` does, in whatever thread calls it. Nothing of it can be read
    but through ``open_into``."""

    __slots__ = ("_store", "key", "_env", "_sealed", "start", "end", "cached", "stale")

    def __init__(self, store: EncryptedStore, key: str, env: Envelope, sealed: memoryview, start: int, end: int,
                 cached: bool) -> None:
        self._store, self.key, self._env, self._sealed = store, key, env, sealed
        self.start, self.end = start, end
        self.cached = cached  # the envelope came from the cache, not with these bytes
        self.stale = False  # opening failed with the cached envelope: get the range afresh

    def __len__(self) -> int:
        return self.end - self.start

    def __repr__(self) -> str:
        return f"<Unopened {show_key(self.key)} [{self.start}, {self.end})>"

    def open_into(self, buf: bytearray | None = None) -> bytearray | memoryview | bytes:
        """The plaintext, opened into ``buf`` when it holds ``len(self)`` bytes (a view of
        its start, valid until the caller reuses it), else into a fresh ``bytearray``.
        ``IntegrityError`` naming the object and page on any changed byte. When that
        happens with a cached envelope, the envelope is dropped and ``stale`` set: the
        object may have been replaced since (module docstring), and a ``get`` of the same
        range, which reads a fresh envelope, is what decides."""
        n = self.end - self.start
        if n == 0 and not (self._env.plain_len == 0 and len(self._sealed)):
            return b""  # an empty range of an object: no page to open (as get)
        # (An empty object read whole still has its one empty page checked.)
        out = buf if buf is not None and len(buf) >= n else None
        plain = self._checked(lambda where: open_range(self._env, self.key, where, self._sealed, self.start,
                                                       self.end, out))
        return plain if n else b""

    def open_ranges(self, ranges: list[tuple[int, int]], buf: bytearray) -> memoryview:
        """Open only the pages that hold ``ranges`` — ``(a, b)`` pairs, plaintext
        ``[a, b)`` relative to this range's start, ascending and disjoint — into ``buf``
        (at least ``len(self)`` bytes) at their places: a view of its first ``len(self)``
        bytes in which those ranges (widened to whole pages) are plaintext, checked as by
        ``open_into``, and the rest is whatever ``buf`` held before: never to be read.

        Why: a recovery fetches a segment run through gaps of overwritten blocks, and a
        whole chunk of which later writes left only a part; AES-GCM of the pages nobody
        reads was a fifth of a sealed recovery's extra CPU (``benchmarks.recovery``)."""
        n = self.end - self.start
        mv = memoryview(buf)[:n]
        if len(mv) != n or mv.readonly:
            raise ValueError(f"open_ranges: a writable buffer of {n} bytes is needed, not {len(mv)}")
        first_page = self.start // PAGE_BYTES
        spans: list[list[int]] = []  # [first page, last page], merged
        for a, b in ranges:
            if not 0 <= a < b <= n:
                raise ValueError(f"open_ranges: [{a}, {b}) is not within [0, {n})")
            p0, p1 = (self.start + a) // PAGE_BYTES, (self.start + b - 1) // PAGE_BYTES
            if spans and p0 <= spans[-1][1] + 1:
                if p0 < spans[-1][0]:
                    raise ValueError("open_ranges: the ranges are not ascending")
                spans[-1][1] = max(spans[-1][1], p1)
            else:
                spans.append([p0, p1])

        def opened(where: str) -> None:
            for p0, p1 in spans:
                lo, hi = max(self.start, p0 * PAGE_BYTES), min(self.end, (p1 + 1) * PAGE_BYTES)
                at = (p0 - first_page) * SEALED_PAGE_BYTES
                open_range(self._env, self.key, where, self._sealed[at:], lo, hi, mv[lo - self.start : hi - self.start])

        self._checked(opened)
        return mv

    def _checked(self, opening):
        """``opening(where)``: on a failed check with a cached envelope, that envelope is
        dropped and ``stale`` set (``open_into``); else the envelope is remembered."""
        store = self._store
        try:
            result = opening(store._where("get", self.key))
        except (IntegrityError, FormatError):
            if self.cached:
                self.stale = True
                store._forget(self.key, self._env)
            raise
        store._remember(self.key, self._env)
        return result


class EncryptedStore(StoreBase):
    """Seals every object put into ``inner`` and opens every object got from it, with
    the keys of ``keyring`` (module docstring)."""

    kind = "encrypted"

    def __init__(self, inner: ObjectStore, keyring: StoreKeyring) -> None:
        self.inner = inner
        self.keyring = keyring
        #: The keyed hash that names chunks in this store (cdp.base_image.chunk_namer_of).
        self.chunk_namer: ChunkNamer = keyring.namer
        self._envelopes: OrderedDict[str, Envelope] = OrderedDict()
        self._seal_buffers: list[bytearray] = []  # see _seal_buffer
        self._envelopes_lock = threading.Lock()  # ``Unopened.open_into`` runs in any thread
        #: ``get_unopened(..., into=buf)`` reads the sealed pages into ``buf`` (the inner
        #: store has ``get_into``); else ``into`` is ignored.
        self.unopened_into = hasattr(inner, "get_into")

    def describe(self) -> str:
        return self.inner.describe()

    def __repr__(self) -> str:
        return f"<EncryptedStore {self.describe()} key ids {', '.join(self.keyring.key_ids())}>"

    # -- the store ---------------------------------------------------------

    async def put(self, key: str, data: Bytes, *, if_absent: bool = False,
                  if_match: str | None = None) -> str | None:
        validate_key(key)
        writer = self.keyring.writer
        nbytes = memoryview(data).nbytes
        if nbytes <= INLINE_BYTES_MAX:
            envelope, sealed = seal(writer, key, data)
            self._forget(key)
            etag = await self.inner.put(key, sealed, if_absent=if_absent, if_match=if_match)
        else:
            buf = self._seal_buffer(sealed_size(nbytes))
            envelope, sealed = await asyncio.to_thread(seal, writer, key, data, None, buf)
            self._forget(key)
            try:
                etag = await self.inner.put(key, sealed, if_absent=if_absent, if_match=if_match)
            except CdpError:
                self._seal_buffer_done(buf)
                raise
            # Cancelled (above, or while sealing): the buffer is dropped, not kept — a
            # put or seal still running in a worker thread may be reading or writing it.
            self._seal_buffer_done(buf)
        self._remember(key, self._parse(key, envelope, "put"))
        return etag

    def _seal_buffer(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes to seal into: a kept one when one is large
        enough. Why: a fresh 16 MiB buffer per segment cost its zero-fill and page faults,
        about as much CPU as AES-GCM itself (``benchmarks.ingest``'s encrypted turns)."""
        for i, buf in enumerate(self._seal_buffers):
            if len(buf) >= size:
                return self._seal_buffers.pop(i)
        return bytearray(-(-size // SEAL_BUFFER_ROUND) * SEAL_BUFFER_ROUND)

    def _seal_buffer_done(self, buf: bytearray) -> None:
        """Keep ``buf`` for the next put (the stores copy or write what they are given
        before their put returns), the largest ``SEAL_BUFFERS_KEPT`` at most."""
        self._seal_buffers.append(buf)
        if len(self._seal_buffers) > SEAL_BUFFERS_KEPT:
            self._seal_buffers.remove(min(self._seal_buffers, key=len))

    async def get(self, key: str, offset: int = 0, length: int | None = None, *,
                  max_bytes: int | None = None) -> bytes:
        validate_key(key)
        check_range(offset, length)
        check_max_bytes(max_bytes)
        with self._bounded(key, max_bytes):
            if offset == 0 and length is None:
                return await self._get_whole(key, max_bytes)
            cached = self._envelopes.get(key)
            if cached is not None:
                try:
                    return await self._get_range(key, offset, length, cached, max_bytes)
                except (IntegrityError, FormatError):
                    self._forget(key)  # replaced since it was cached: read it afresh
            return await self._get_range(key, offset, length, None, max_bytes)

    @contextlib.contextmanager
    def _bounded(self, key: str, max_bytes: int | None) -> Iterator[None]:
        """The inner store's TooLarge (a sealed size against ``sealed_bound``) as the
        plaintext sizes the caller knows."""
        try:
            yield
        except TooLarge as exc:
            if max_bytes is None or exc.max_bytes == max_bytes:
                raise  # already in plaintext terms
            plain = plain_size(exc.size)
            raise TooLarge(self._where("get", key), exc.size if plain is None else plain, max_bytes) from None

    def _check_plain(self, key: str, env: Envelope, max_bytes: int | None) -> None:
        check_size(self._where("get", key), env.plain_len, max_bytes)

    async def list(self, prefix: str = "", *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        """The sealed objects under ``prefix``, with their plaintext sizes. An object whose
        size no sealed object has is left out and logged (``plaintext_object_skipped``):
        one stray file must not stop a listing (a domain's catalog, a verify); reading it
        by name (``get``, ``stat``) is still refused as ``NotEncrypted``."""
        validate_prefix(prefix)
        async for info in self.inner.list(prefix, start_after=start_after):
            try:
                yield self._plain_info(info, "list")
            except NotEncrypted as exc:
                log.warning("plaintext_object_skipped", store=self.describe(), key=show_key(info.key),
                            size=info.size, why=exc.message)

    async def stat(self, key: str) -> ObjectInfo:
        validate_key(key)
        return self._plain_info(await self.inner.stat(key), "stat")

    async def delete(self, key: str) -> None:
        validate_key(key)
        self._forget(key)
        await self.inner.delete(key)

    async def server_time(self) -> float | None:
        inner = getattr(self.inner, "server_time", None)
        return None if inner is None else await inner()

    async def ensure_container(self) -> None:
        inner = getattr(self.inner, "ensure_container", None)
        if inner is not None:
            await inner()

    async def close(self) -> None:
        with self._envelopes_lock:
            self._envelopes.clear()
        await self.inner.close()

    # -- reading -----------------------------------------------------------

    def _where(self, op: str, key: str) -> str:
        return f"{self.describe()}: {op} {show_key(key)}"

    def _plain_info(self, info: ObjectInfo, op: str) -> ObjectInfo:
        size = plain_size(info.size)
        if size is None:
            raise NotEncrypted(f"{self._where(op, info.key)}: {info.size} bytes is no sealed object's size: "
                               f"a plaintext object in an encrypted store (FORMAT.md §19) is refused")
        return ObjectInfo(info.key, size, info.mtime, info.etag)

    def _parse(self, key: str, raw: Bytes, op: str, what: str = "envelope", at: int = 0,
               twin: memoryview | None = None) -> Envelope:
        """The envelope at the start of ``raw`` (§19.1), its key found in the keyring.

        Its checksum is checked first: a changed byte anywhere in it (the magic, the
        version, the key id) is an ``IntegrityError``, unless neither it nor its ``twin``
        (the other end's copy, when read) looks like an envelope: then the object was
        never sealed (``NotEncrypted``)."""
        where = self._where(op, key)
        mv = memoryview(raw).cast("B")
        if len(mv) >= ENVELOPE_BYTES and not summed_ok(mv):
            if bytes(mv[:4]) == SEALED_MAGIC or (twin is not None and summed_ok(twin)
                                                 and bytes(twin[:4]) == SEALED_MAGIC):
                raise IntegrityError(f"{where}: {what} at offset {at + SUMMED}: header_xxh3 does not match "
                                     f"{what}[0:56]: the envelope was changed")
        if len(mv) < 4 or bytes(mv[:4]) != SEALED_MAGIC:
            raise NotEncrypted(f"{where}: not a sealed object (it starts {bytes(mv[:4])!r}, expected "
                               f"{SEALED_MAGIC!r}): a plaintext object in an encrypted store is refused "
                               f"(FORMAT.md §19)")
        try:
            page_shift, _, key_id, salt, plain_len, _ = unpack_summed(
                ENVELOPE, mv, where=where, magic=SEALED_MAGIC, version=VERSION, what=what, at=at,
                zero=ENVELOPE_ZERO)
        except ChecksumMismatch as exc:
            raise IntegrityError(exc.message) from None
        if page_shift != PAGE_SHIFT:
            raise FormatError(f"{where}: {what} at offset {at + 6}: page_shift {page_shift}, expected {PAGE_SHIFT}")
        store_key = self.keyring.by_id.get(key_id)
        if store_key is None:
            raise KeyUnavailable(f"{where}: sealed with key id {key_id.hex()}, which is not among the keys of "
                                 f"{self.keyring.source} (key ids {', '.join(self.keyring.key_ids())})")
        return Envelope(bytes(mv[:ENVELOPE_BYTES]), store_key, plain_len, store_key.object_aead(salt))

    def _remember(self, key: str, env: Envelope) -> None:
        with self._envelopes_lock:
            self._envelopes[key] = env
            self._envelopes.move_to_end(key)
            while len(self._envelopes) > ENVELOPES_CACHED_MAX:
                self._envelopes.popitem(last=False)

    def _forget(self, key: str, env: Envelope | None = None) -> None:
        """Drop the cached envelope of ``key`` (only if it is ``env``, when given)."""
        with self._envelopes_lock:
            if env is None or self._envelopes.get(key) is env:
                self._envelopes.pop(key, None)

    def _check_trailer(self, key: str, env: Envelope, trailer: memoryview, size: int) -> None:
        if bytes(trailer) != env.raw:
            raise IntegrityError(f"{self._where('get', key)}: envelope at offset {size - ENVELOPE_BYTES}: "
                                 f"differs from the envelope at offset 0")

    async def _open(self, env: Envelope, key: str, sealed: memoryview, start: int, end: int) -> bytes | bytearray:
        """Plaintext ``[start, end)`` from the sealed bytes of its pages: ``bytes``, or a
        ``bytearray`` over ``INLINE_BYTES_MAX`` (not copied once more: segments and chunks)."""
        where = self._where("get", key)
        if end - start <= INLINE_BYTES_MAX:
            return bytes(open_range(env, key, where, sealed, start, end))
        return await asyncio.to_thread(open_range, env, key, where, sealed, start, end)

    async def _inner_get(self, key: str, offset: int, length: int | None, into: ReadBuffer | None,
                         max_bytes: int | None = None) -> Bytes:
        """The inner store's bytes, read into ``into`` when it is given and the inner store
        reads into buffers (then valid until ``into`` is read into again); an object
        sealing more than ``max_bytes`` of plaintext refused unread."""
        if into is not None and self.unopened_into:
            return await self.inner.get_into(key, offset, length, into,  # type: ignore[attr-defined]
                                             max_bytes=sealed_bound(max_bytes))
        return await self.inner.get(key, offset, length, max_bytes=sealed_bound(max_bytes))

    async def _fetch_whole(self, key: str, into: ReadBuffer | None = None,
                           max_bytes: int | None = None) -> tuple[Envelope, memoryview]:
        """(envelope, sealed pages) of the whole object, its size and both envelopes checked."""
        blob = memoryview(await self._inner_get(key, 0, None, into, max_bytes))
        env = self._parse(key, blob, "get", twin=blob[-ENVELOPE_BYTES:] if len(blob) >= 2 * ENVELOPE_BYTES else None)
        if len(blob) != env.size:
            raise IntegrityError(f"{self._where('get', key)}: {len(blob)} bytes, the envelope promises "
                                 f"{env.size} ({env.plain_len} bytes sealed): the object is truncated or extended")
        self._check_trailer(key, env, blob[-ENVELOPE_BYTES:], len(blob))
        self._check_plain(key, env, max_bytes)
        return env, blob[ENVELOPE_BYTES:]

    async def _open_last_page(self, key: str, env: Envelope) -> None:
        """Open (authenticate) the object's last page, for a read that opens no page: an
        envelope is only checksummed, and its key id is public, so a forged one would
        otherwise be taken for an empty object (§19.2: even an empty object has a
        tagged last page for this)."""
        last = env.pages - 1
        sealed = memoryview(await self.inner.get(key, page_offset(last), env.page_len(last) + TAG_BYTES))
        open_range(env, key, self._where("get", key), sealed, last * PAGE_BYTES, env.plain_len)

    async def _get_whole(self, key: str, max_bytes: int | None = None) -> bytes:
        env, sealed = await self._fetch_whole(key, None, max_bytes)
        plain = await self._open(env, key, sealed, 0, env.plain_len)
        self._remember(key, env)
        return plain

    async def _fetch_range(self, key: str, offset: int, length: int | None, env: Envelope | None,
                           into: ReadBuffer | None = None,
                           max_bytes: int | None = None) -> tuple[Envelope, memoryview | None, int, int]:
        """(envelope, sealed pages from the first one needed, start, end) of plaintext
        ``[offset, offset + length)``, ``offset >= 0``; ``length`` None only with ``env``
        (a cached envelope; without one, reading to the end is ``_get_to_end``). Sealed
        None for an empty range (the object checked to exist)."""
        if env is None:
            assert length is not None
            env, sealed, base = await self._fetch_cold(key, offset, length, into, max_bytes)
        else:
            sealed, base = None, 0
        self._check_plain(key, env, max_bytes)
        start, end = resolve_range(env.plain_len, offset, length)
        if start == end:
            await self._open_last_page(key, env)  # NotFound if it is gone
            return env, None, start, end
        first, last = start // PAGE_BYTES, (end - 1) // PAGE_BYTES
        if sealed is None:
            base = page_offset(first)
            sealed = memoryview(await self._inner_get(
                key, base, page_offset(last) + env.page_len(last) + TAG_BYTES - base, into, max_bytes))
        return env, sealed[page_offset(first) - base :], start, end

    async def _get_range(self, key: str, offset: int, length: int | None, env: Envelope | None,
                         max_bytes: int | None = None) -> bytes:
        if offset < 0:
            if env is None:
                return await self._get_suffix(key, -offset, max_bytes)
            offset, length = max(0, env.plain_len + offset), None
        if env is None and length is None:
            return await self._get_to_end(key, offset, max_bytes)
        env, sealed, start, end = await self._fetch_range(key, offset, length, env, None, max_bytes)
        if sealed is None:
            return b""
        plain = await self._open(env, key, sealed, start, end)
        self._remember(key, env)
        return plain

    async def get_unopened(self, key: str, offset: int = 0, length: int | None = None, *,
                           into: ReadBuffer | None = None, max_bytes: int | None = None) -> Unopened:
        """What ``get(key, offset, length, max_bytes=max_bytes)`` would return, still sealed:
        the same GETs, the envelope checked, the pages left for ``Unopened.open_into`` to
        open and check (in the caller's thread, into the caller's buffer). ``offset >= 0``;
        a range to the end needs ``offset`` 0 (the whole object). With ``into`` (and
        ``unopened_into``), the sealed pages are read into it: the ``Unopened`` is valid
        until ``into`` is read into again."""
        validate_key(key)
        check_range(offset, length)
        check_max_bytes(max_bytes)
        if offset < 0 or (length is None and offset != 0):
            raise ValueError(f"get_unopened: offset {offset}, length {length}: a suffix or a read to the end "
                             f"is for get")
        with self._bounded(key, max_bytes):
            return await self._get_unopened(key, offset, length, into, max_bytes)

    async def _get_unopened(self, key: str, offset: int, length: int | None, into: ReadBuffer | None,
                            max_bytes: int | None) -> Unopened:
        if length is None:
            env, sealed = await self._fetch_whole(key, into, max_bytes)
            return Unopened(self, key, env, sealed, 0, env.plain_len, cached=False)
        cached = self._envelopes.get(key)
        env, sealed, start, end = await self._fetch_range(key, offset, length, cached, into, max_bytes)
        return Unopened(self, key, env, memoryview(b"") if sealed is None else sealed, start, end,
                        cached=cached is not None)

    async def _fetch_cold(self, key: str, offset: int, length: int, into: ReadBuffer | None = None,
                          max_bytes: int | None = None) -> tuple[Envelope, memoryview, int]:
        """(envelope, sealed bytes, their object offset) for plaintext ``[offset, offset +
        length)`` with no envelope known: the pages that range would need, and the envelope."""
        first = offset // PAGE_BYTES
        last = max(first, (offset + length - 1) // PAGE_BYTES)
        base, end = page_offset(first), page_offset(last + 1)
        if base <= HEAD_MERGE_BYTES:
            blob = memoryview(await self._inner_get(key, 0, end, into, max_bytes))
            return self._parse(key, blob, "get"), blob, 0
        head, pages = await asyncio.gather(self._inner_get(key, 0, ENVELOPE_BYTES, None, max_bytes),
                                           self._inner_get(key, base, end - base, into, max_bytes))
        return self._parse(key, head, "get"), memoryview(pages), base

    async def _get_to_end(self, key: str, offset: int, max_bytes: int | None = None) -> bytes:
        """Plaintext from ``offset`` to the end, envelope unknown: one GET from the first
        page needed, which brings the trailing envelope."""
        base = page_offset(offset // PAGE_BYTES)
        tail = memoryview(await self._inner_get(key, base, None, None, max_bytes))
        if len(tail) < ENVELOPE_BYTES:  # the offset is past the end (or the object is not sealed)
            env = self._parse(key, await self.inner.get(key, 0, ENVELOPE_BYTES), "get")
            self._check_plain(key, env, max_bytes)
            if env.plain_len > offset:
                raise IntegrityError(f"{self._where('get', key)}: {base + len(tail)} bytes, the envelope "
                                     f"promises {env.size}: the object is truncated")
            self._remember(key, env)
            return b""
        return await self._open_tail(key, tail, offset, None, max_bytes)

    async def _get_suffix(self, key: str, count: int, max_bytes: int | None = None) -> bytes:
        """The last ``count`` plaintext bytes, envelope unknown: one suffix GET of enough
        sealed pages (the last may be short, so one more than ``count`` needs) and the
        trailing envelope."""
        want = ENVELOPE_BYTES + (-(-count // PAGE_BYTES) + 1) * SEALED_PAGE_BYTES
        tail = memoryview(await self._inner_get(key, -want, None, None, max_bytes))
        return await self._open_tail(key, tail, None, count, max_bytes)

    async def _open_tail(self, key: str, tail: memoryview, offset: int | None, count: int | None,
                         max_bytes: int | None = None) -> bytes:
        """Plaintext from ``offset`` (or the last ``count`` bytes) to the end, from ``tail``,
        the object's last bytes, whose trailing envelope says where they start."""
        if len(tail) < ENVELOPE_BYTES:
            self._parse(key, tail, "get")  # NotEncrypted or a truncated envelope
        env = self._parse(key, tail[-ENVELOPE_BYTES:], "get", "trailing envelope", -ENVELOPE_BYTES)
        self._check_plain(key, env, max_bytes)
        size = env.size
        if len(tail) > size:
            raise IntegrityError(f"{self._where('get', key)}: at least {len(tail)} bytes, the envelope "
                                 f"promises {size}: the object was extended")
        base = size - len(tail)  # the object offset of tail[0]
        if base == 0:
            self._check_trailer(key, env, tail[:ENVELOPE_BYTES], size)
        if offset is None:
            assert count is not None
            offset = max(0, env.plain_len - count)
        start, end = offset, env.plain_len
        if start >= end:
            await self._open_last_page(key, env)
            self._remember(key, env)
            return b""
        first = start // PAGE_BYTES
        if page_offset(first) < base:
            raise IntegrityError(f"{self._where('get', key)}: the trailing envelope promises {size} bytes, "
                                 f"which the bytes read do not fit: the object is truncated")
        plain = await self._open(env, key, tail[page_offset(first) - base :], start, end)
        self._remember(key, env)
        return plain
