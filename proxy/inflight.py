"""What the app is doing right now, so a stop can end within one budget (PROXY_SHUTDOWN_TIMEOUT).

server.py waits for the running handlers until the budget is spent, then aborts what is left.
aiohttp's own shutdown cannot be given that job: it waits its timeout for a handler, then "cancels"
it by failing the request's body, which a streaming handler never reads, waits the timeout again,
and only then cancels the handler and closes the connection gracefully: twice the budget, ending in
what a scraper could take for a clean end of the body.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

# The message a stop cancels handlers with, so a cancelled scrape is counted for the right reason.
STOPPING = "the proxy is stopping"


class InFlight:
    """Request handlers running now, and the flights' reader tasks."""

    def __init__(self, background: set[asyncio.Task[None]]) -> None:
        self.handlers: dict[asyncio.Task[Any], web.Request] = {}
        # The flights' own set of reader tasks, shared: they come and go there.
        self.background = background
        self._idle = asyncio.Event()
        self._idle.set()

    @web.middleware
    async def track(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The outermost middleware: every request is known from its start to its end."""
        task = asyncio.current_task()
        assert task is not None
        self.handlers[task] = request
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            del self.handlers[task]
            if not self.handlers:
                self._idle.set()

    def busy_connections(self) -> set[object]:
        """aiohttp's protocol objects of the connections whose request is in a handler now."""
        return {request.protocol for request in self.handlers.values()}

    async def drain(self, within: float) -> bool:
        """Wait up to `within` seconds until no handler runs; False if some still do."""
        if self._idle.is_set():
            return True
        try:
            async with asyncio.timeout(within):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def abort(self, unwind: float) -> tuple[int, int]:
        """Cancel the flights' readers, abort every connection still in a handler and cancel the
        handler; wait at most `unwind` seconds for all of them to finish.

        The TCP connection is aborted, not closed: a scraper must see a broken body, never a clean
        short one. The readers are cancelled first, with this stop as the reason, in the same turn
        of the loop as the handlers, so each upstream request is counted as cancelled by the stop
        and not by its scrapers leaving. Returns how many scrapers' and other clients'
        connections were aborted.
        """
        readers = list(self.background)
        for task in readers:
            task.cancel(STOPPING)
        handlers = list(self.handlers)
        scrapes = others = 0
        for task, request in list(self.handlers.items()):
            transport = request.transport
            if transport is not None and not transport.is_closing():
                transport.abort()
                if request.path == "/metrics":
                    scrapes += 1
                else:
                    others += 1
            task.cancel(STOPPING)
        if readers or handlers:
            await asyncio.wait([*readers, *handlers], timeout=unwind)
        return scrapes, others
