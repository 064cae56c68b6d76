"""The listening socket, with the limits aiohttp's server does not have.

- A connection cap (PROXY_MAX_CONNECTIONS), so a flood of clients cannot exhaust the pod's sockets
  or memory. At the cap, a new connection first displaces the oldest one that is not serving a
  request (one that has not finished a request head yet, else one idle between keep-alive
  requests): a flood of idle connections must not lock out the kubelet's probes, which would
  restart the pod. Only when every connection is busy with a request is the new one refused: its
  request head is read, it is answered 503 and closed gracefully, so the answer really arrives.
- A header-read timeout (PROXY_HEADER_TIMEOUT): a client must finish each request head within it,
  or the connection is closed. aiohttp waits forever for a head trickled in a byte at a time
  (slowloris). On a TLS listener the handshake gets the same time.
- A cap on a request head's total size (64 KiB): a larger one gets 431 and the connection closes.

Each accepted connection's protocol is aiohttp's own, wrapped: events pass straight through, so
aiohttp's parsing, keep-alive and graceful shutdown are untouched.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

from proxy.telemetry import Telemetry

log = logging.getLogger("proxy.listener")

# A request head larger than this is refused: aiohttp limits each line (8 KiB) and the number of
# headers, but 128 headers of 8 KiB would still be a megabyte held per connection.
MAX_HEAD_BYTES = 64 * 1024
HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 24\r\nConnection: close\r\n\r\nrequest head too large\r\n"
)
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 27\r\n"
    b"Connection: close\r\n\r\ntoo many connections, retry\n"
)
# After a refusal is written and the sending side shut, the client's own close is awaited this
# long (at most) while anything it still sends is discarded. Closing at once with its bytes unread
# makes the kernel send a reset, which can destroy the 503 before the client has read it.
REFUSAL_LINGER = 1.0
# Refusals under way at once: PROXY_MAX_CONNECTIONS, but no fewer than this, so that with a small
# cap a refused client that has not yet been seen to close does not make the next refusal a
# hasty one.
MIN_REFUSALS = 64
_HEAD_END = b"\r\n\r\n"


class ConnectionGuard:
    """Protocol factory for the listening socket: caps connections and times request heads.

    `connections` holds the connections being served, oldest first; `fresh` those of them that
    have not finished a request head yet, oldest first (the first ones displaced at the cap);
    `refusing` those being answered 503, which hold no slot. Refusals in progress are capped at
    `max_refusing`: past that, a refusal is written at once with no wait for the head.
    """

    def __init__(
        self,
        inner: Callable[[], asyncio.BaseProtocol],
        *,
        max_connections: int,
        header_timeout: float,
        telemetry: Telemetry,
    ) -> None:
        self.inner = inner
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.telemetry = telemetry
        self.connections: dict[GuardedProtocol, None] = {}
        self.fresh: dict[GuardedProtocol, None] = {}
        self.refusing: set[GuardedProtocol] = set()
        self.max_refusing = max(max_connections, MIN_REFUSALS)
        self.closed = False
        # Listed at 0 from the start, like the reasons Telemetry lists itself.
        telemetry.refused_connections.labels("idle_evicted")

    @property
    def active(self) -> int:
        return len(self.connections)

    def __call__(self) -> GuardedProtocol:
        return GuardedProtocol(self)

    def admit(self, protocol: GuardedProtocol) -> bool:
        """Give `protocol` a slot, displacing an idle connection at the cap; False if all are busy."""
        if self.closed:
            return False
        if len(self.connections) >= self.max_connections:
            victim = self._idlest()
            if victim is None:
                return False
            self._release(victim)
            victim.evict()
            self.telemetry.refused_connections.labels("idle_evicted").inc()
        self.connections[protocol] = None
        self.fresh[protocol] = None
        self.telemetry.open_connections.set(len(self.connections))
        return True

    def _idlest(self) -> GuardedProtocol | None:
        """The connection whose loss costs least: the oldest that has not finished a request head
        (an idle or trickling client, or one that connected and then hung), else the oldest idle
        between keep-alive requests (an HTTP client retries a GET on a reused connection that
        closes before answering). None if every connection is serving a request."""
        oldest_fresh = next(iter(self.fresh), None)
        if oldest_fresh is not None:
            return oldest_fresh
        for protocol in self.connections:
            if protocol.awaiting_request():
                return protocol
        return None

    def _release(self, protocol: GuardedProtocol) -> None:
        """Free `protocol`'s slot, if it holds one (once: on eviction or when it closes)."""
        if protocol in self.connections:
            del self.connections[protocol]
            self.fresh.pop(protocol, None)
            self.telemetry.open_connections.set(len(self.connections))

    def close(self) -> None:
        """The proxy is stopping: admit nobody, and close the connections being refused now (the
        served ones are aiohttp's, which closes them within the stop's budget)."""
        self.closed = True
        for protocol in list(self.refusing):
            protocol.close_refusal()


class GuardedProtocol(asyncio.Protocol):
    __slots__ = (
        "_answered",
        "_armed",
        "_guard",
        "_head_bytes",
        "_inner",
        "_tail",
        "_timer",
        "_transport",
    )

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._inner: Any = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._armed = False
        self._tail = b""
        self._head_bytes = 0
        self._answered = False  # refusing: the 503 went out

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        # A stream transport, whatever its class: uvloop's are no subclasses of asyncio's, so an
        # isinstance test would skip every write under uvloop (as it once did here).
        self._transport = cast(asyncio.Transport, transport)
        if not guard.admit(self):
            self._refuse()
            return
        self._inner = guard.inner()
        self._inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        inner = self._inner
        if inner is None:
            if self in self._guard.refusing and not self._answered:
                self._read_refused_head(data)
            return  # refusing: whatever the client sends is discarded
        if not self._armed:
            self._arm()
        window = self._tail + data
        end = window.rfind(_HEAD_END)
        if end >= 0:
            # A head is complete. Bytes after it start the next (pipelined) head, if any.
            self._guard.fresh.pop(self, None)
            self._disarm()
            self._tail = b""
            self._head_bytes = len(window) - end - len(_HEAD_END)
            if self._head_bytes:
                self._arm()
        else:
            self._tail = window[-3:]
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._guard.telemetry.refused_connections.labels("head_too_large").inc()
                transport = self._transport
                if transport is not None and not transport.is_closing():
                    transport.write(HEAD_TOO_LARGE)
                    transport.close()
                return
        inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            return self._inner.eof_received()
        if self in self._guard.refusing and not self._answered:
            self._answer_refusal()
        return None  # the transport closes once the refusal is flushed

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        guard = self._guard
        guard.refusing.discard(self)
        guard._release(self)
        if self._inner is None:
            return
        self._inner.connection_lost(exc)
        self._inner = None

    # --- the cap --------------------------------------------------------------------------------------

    def awaiting_request(self) -> bool:
        """aiohttp's handler is parked waiting for a request (the next one, on a keep-alive
        connection between requests), none is queued or running. Anything unexpected about
        aiohttp's internals counts as busy, so an upgrade of aiohttp can make the cap refuse more,
        never cut a request."""
        waiter = getattr(self._inner, "_waiter", None)
        return (
            isinstance(waiter, asyncio.Future)
            and not waiter.done()
            and not getattr(self._inner, "_messages", True)
            and not getattr(self._inner, "_request_in_progress", True)
        )

    def evict(self) -> None:
        """Displaced at the cap by a new connection (ConnectionGuard.admit has released the slot).

        A graceful close: an idle client sees the connection end, as on a keep-alive timeout."""
        self._disarm()
        if self._transport is not None and not self._transport.is_closing():
            log.debug("closed an idle connection to make room for a new one")
            self._transport.close()

    def _refuse(self) -> None:
        """Every slot is busy with a request: answer 503 once this client's head has arrived (or
        the header timeout has passed), so the answer follows its request as HTTP expects."""
        guard = self._guard
        guard.telemetry.refused_connections.labels("limit").inc()
        if guard.closed or len(guard.refusing) >= guard.max_refusing:
            # Too many refusals under way already: no waiting, at the risk of a reset.
            self._answered = True
            transport = self._transport
            if transport is not None:
                transport.write(REFUSAL)
                transport.close()
            return
        guard.refusing.add(self)
        self._timer = asyncio.get_running_loop().call_later(guard.header_timeout, self._answer_refusal)

    def _read_refused_head(self, data: bytes) -> None:
        window = self._tail + data
        self._head_bytes += len(data)
        if _HEAD_END in window or self._head_bytes > MAX_HEAD_BYTES:
            self._answer_refusal()
        else:
            self._tail = window[-3:]

    def _answer_refusal(self) -> None:
        """Write the 503, shut the sending side and wait (at most REFUSAL_LINGER) for the client to
        close, so no reset overtakes the answer. TLS cannot shut one side; it closes at once."""
        if self._answered:
            return
        self._answered = True
        self._disarm()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(REFUSAL)
        if transport.can_write_eof():
            transport.write_eof()
            linger = min(REFUSAL_LINGER, self._guard.header_timeout)
            self._timer = asyncio.get_running_loop().call_later(linger, self.close_refusal)
        else:
            transport.close()

    def close_refusal(self) -> None:
        self._disarm()
        self._answered = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    # --- the header timeout ---------------------------------------------------------------------------

    def _arm(self) -> None:
        self._armed = True
        self._timer = asyncio.get_running_loop().call_later(self._guard.header_timeout, self._expire)

    def _disarm(self) -> None:
        self._armed = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._transport is None or self._transport.is_closing():
            return
        inner = self._inner
        if inner is not None and getattr(inner, "_request_in_progress", False):
            self._arm()  # a response is still going out: judge the next head when it is done
            return
        self._guard.telemetry.refused_connections.labels("header_timeout").inc()
        log.info(
            "closed a connection that sent no complete request head in time",
            extra={"fields": {"timeout": self._guard.header_timeout}},
        )
        self._transport.abort()


def listen_hosts(address: str) -> str | None:
    """'::' means dual stack; asyncio binds IPv6-only sockets, so ask for every family instead."""
    return None if address == "::" else address


async def listen(
    guard: ConnectionGuard, address: str, port: int, ssl_context: ssl.SSLContext | None
) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    # A TLS client has no request head until its handshake is done, so the header timeout cannot
    # reach one that never finishes it: the handshake gets the same time (asyncio's default is
    # 60 s, a minute of socket and TLS state per silent connection).
    tls: dict[str, Any] = {}
    if ssl_context is not None:
        tls = {"ssl": ssl_context, "ssl_handshake_timeout": guard.header_timeout}
    return await loop.create_server(
        guard,
        host=listen_hosts(address),
        port=port,
        **tls,
        # reuse_address stays at asyncio's default: on POSIX, a restart can rebind at once; on
        # Windows, SO_REUSEADDR would let another process bind the same port, so it stays off.
        backlog=1024,
        family=socket.AF_UNSPEC,
    )
