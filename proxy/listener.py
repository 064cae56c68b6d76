"""The listening socket, with the two limits aiohttp's server does not have.

- A connection cap (PROXY_MAX_CONNECTIONS): past it, a new connection gets a short 503 and is
  closed, so a flood of clients cannot exhaust the pod's sockets or memory.
- A header-read timeout (PROXY_HEADER_TIMEOUT): a client must finish each request head within it,
  or the connection is closed. aiohttp waits forever for a head trickled in a byte at a time
  (slowloris).
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
from typing import Any

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
_HEAD_END = b"\r\n\r\n"


class ConnectionGuard:
    """Protocol factory for the listening socket: counts connections and times request heads."""

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
        self.active = 0

    def __call__(self) -> GuardedProtocol:
        return GuardedProtocol(self)


class GuardedProtocol(asyncio.Protocol):
    __slots__ = ("_armed", "_guard", "_head_bytes", "_inner", "_tail", "_timer", "_transport")

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._inner: Any = None
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._armed = False
        self._tail = b""
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        self._transport = transport
        if guard.active >= guard.max_connections:
            guard.telemetry.refused_connections.labels("limit").inc()
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(REFUSAL)
            transport.close()
            return
        guard.active += 1
        guard.telemetry.open_connections.set(guard.active)
        self._inner = guard.inner()
        self._inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        inner = self._inner
        if inner is None:
            return
        if not self._armed:
            self._arm()
        window = self._tail + data
        end = window.rfind(_HEAD_END)
        if end >= 0:
            # A head is complete. Bytes after it start the next (pipelined) head, if any.
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
                if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
                    transport.write(HEAD_TOO_LARGE)
                    transport.close()
                return
        inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._inner is None:
            return
        guard = self._guard
        guard.active -= 1
        guard.telemetry.open_connections.set(guard.active)
        self._inner.connection_lost(exc)
        self._inner = None

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
    return await loop.create_server(
        guard,
        host=listen_hosts(address),
        port=port,
        ssl=ssl_context,
        # reuse_address stays at asyncio's default: on POSIX, a restart can rebind at once; on
        # Windows, SO_REUSEADDR would let another process bind the same port, so it stays off.
        backlog=1024,
        family=socket.AF_UNSPEC,
    )
