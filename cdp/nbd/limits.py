"""Every bound the NBD server puts on what a client can make it hold or wait for
(docs/FORMAT.md §17.4), in one place: each is defined here once and imported.

The budgets (``cdp.nbd.budget``), the stall watchdog (``cdp.nbd.watchdog``), the refusal
at the connection cap (``cdp.nbd.refusal``) and the server (``cdp.nbd.server``, whose
constructor takes most of these as its defaults) read them from here.
"""

from __future__ import annotations

from cdp.errors import ConfigError

#: Requests running at once per connection. Above the queue depth clients use (fio and
#: qemu: 32-64): the writes a client has in flight arrive together and are captured as one
#: batch — one frame, one dirty-map sync. At 16, a 4 KiB qd-32 job was cut into batches of
#: 16, each paying a map sync: half the IOPS (benchmarks.nbd).
INFLIGHT_MAX = 128
INFLIGHT_BYTES_MAX = 64 << 20  # payload bytes held at once per connection (two maximal requests)
#: Payload bytes held at once by all connections: without it 64 connections could pin
#: 64 x 64 MiB. 256 MiB is four connections at their cap, or 64 at a qd-64 of 64 KiB.
SERVER_INFLIGHT_BYTES_MAX = 256 << 20
CONNECTIONS_MAX = 64
#: Replies queued past this many bytes (with the socket's buffer) make the sender wait.
WRITE_BUFFER_HIGH = 4 << 20
#: What a connection's reader buffers unread (it stops reading the socket past twice this):
#: asyncio's default of 64 KiB paused and resumed the socket four times per 1 MiB write.
READ_BUFFER_BYTES = 1 << 20
#: A client gets this long to finish haggling; one that stalls is dropped.
HANDSHAKE_TIMEOUT_S = 30.0
#: ... and this long from accept to its first option (its flags and an option header),
#: which a client sends at once: a socket that says nothing gives its slot back early.
FIRST_OPTION_TIMEOUT_S = 5.0
#: Connections between accept and an export chosen (or ABORT), at once. At the cap — or
#: at CONNECTIONS_MAX — the one that has been haggling longest is dropped to make room
#: (``evicted_handshake``), if it has haggled ``HANDSHAKE_EVICT_AFTER_S`` at least: 64
#: sockets that never finish their handshake no longer lock every new client out, and
#: 17 real clients connecting at once (a boot storm; TLS over a WAN haggles for hundreds
#: of ms) do not reset the first: a newcomer waits up to ``HANDSHAKE_WAIT_S`` for a slot
#: to free or a victim to age, then is refused.
HANDSHAKES_MAX = 16
HANDSHAKE_EVICT_AFTER_S = 1.0
HANDSHAKE_WAIT_S = 3.0
assert HANDSHAKES_MAX < CONNECTIONS_MAX, "connections haggling leave room for those past the handshake"
#: Options one connection may send before it is dropped (a client looping on LIST).
OPTIONS_PER_CONNECTION_MAX = 256
#: A client that owes us bytes (the rest of a request, or reading the replies queued for
#: it) and moves none for this long is dropped. Real clients never pause mid-request and
#: read replies as they come; a minute allows for a congested link (progress resets it).
STALL_TIMEOUT_S = 60.0
#: A connection idle this long (nothing in flight, nothing owed either way) gives its slot
#: to a new client when the server is full. Idle connections are otherwise kept: qemu
#: (without reconnect-delay, its default) and the kernel client fail the disk when the
#: server drops them, and an idle guest may not touch its disk for hours.
IDLE_TIMEOUT_S = 300.0
#: A closing connection waits this long for its last replies to leave: asyncio reports a
#: close only once the send buffer has drained, which it never does if the peer stopped
#: reading. Then the socket is aborted.
CLOSE_LINGER_S = 5.0
#: A client over the connection cap gets the greeting and NBD_REP_ERR_POLICY for each
#: option, for at most this long and this many options, then is closed; at most
#: REFUSING_MAX such exchanges at once (past that, a new client is closed at once).
REFUSE_TIMEOUT_S = 5.0
REFUSE_OPTIONS_MAX = 8
REFUSING_MAX = 16


def check_bounds(*, stall_timeout_s: float, server_inflight_bytes_max: int, idle_timeout_s: float,
                 close_linger_s: float) -> None:
    """ConfigError naming the argument: the first two must be above zero (a watchdog
    every quarter of 0 s would spin), the others at least zero."""
    for name, value, minimum_excluded in (("stall_timeout_s", stall_timeout_s, True),
                                          ("server_inflight_bytes_max", server_inflight_bytes_max, True),
                                          ("idle_timeout_s", idle_timeout_s, False),
                                          ("close_linger_s", close_linger_s, False)):
        if value < 0 or (minimum_excluded and value == 0):
            raise ConfigError(f"NBD server {name} {value}: expected {'above' if minimum_excluded else 'at least'} 0")
