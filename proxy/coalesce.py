"""Flights: one upstream exchange, read once by its own task, consumed by every scraper alike.

windows_exporter (0.30 and later) runs one scrape at a time and answers a second one with 503.
HA Prometheus pairs scrape the same node within milliseconds of each other, so without sharing
one of them fails every time. A `Flight` is one upstream exchange. Its reader runs as a task of
its own and publishes the head and each body piece; every scraper, the one that started the
flight included, consumes them through its own `Cursor`, replayed from the start when it joined
late. Nobody's pace is anybody else's: the reader never waits for a scraper, a scraper that falls
too far behind is dropped, and a scraper that leaves only takes its cursor away.

A flight always ends with an outcome: whole, or failed with the error that broke it. Whatever
stops the reader (an error, an exception nobody expected, a cancellation at any await) fails the
flight, and every cursor then raises rather than ending cleanly: a scraper must never get a short
body that looks whole. When the last cursor leaves, the reader is cancelled.

Pure asyncio, no HTTP: scrape.py decides what the key is, reads the exporter and writes to clients.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

# The reason a reader is cancelled with when the last scraper has left.
NOBODY_LEFT = "every scraper went away mid-body"


@dataclass(frozen=True, slots=True)
class Head:
    """What a scraper needs before the body: the status and end-to-end headers to send."""

    status: int
    headers: tuple[tuple[str, str], ...]
    rewritten: bool = False  # the body is the proxy's own: each scraper gets its own encoding


@dataclass(frozen=True, slots=True)
class Refusal:
    """The upstream request failed before any header; every scraper of the flight answers this."""

    status: int
    text: str


class FlightFailed(Exception):
    """The shared body broke off (or its reader stopped): a scraper must make that visible."""


class CursorDropped(Exception):
    """This scraper was cut off: it fell too far behind, or its own time ran out."""


class Cursor:
    """One scraper's view of a flight: the pieces it has not written yet, in order."""

    __slots__ = ("_closed", "_error", "_pieces", "_waiter", "on_drop", "queued")

    def __init__(self, backlog: list[bytes]) -> None:
        # Called when the flight drops this cursor for falling behind: the scraper's handler may
        # be stuck writing to a client that reads nothing, and its connection must be cut now.
        self.on_drop: Callable[[], None] | None = None
        self._pieces: deque[bytes] = deque(backlog)
        self.queued = sum(map(len, backlog))
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._error: BaseException | None = None

    def _push(self, piece: bytes) -> int:
        self._pieces.append(piece)
        self.queued += len(piece)
        self._wake()
        return self.queued

    def close(self, error: BaseException | None) -> None:
        """No more pieces: the end of the body (error None), or why there will be no end."""
        if not self._closed:
            self._closed = True
            self._error = error
            if error is not None:
                self._pieces.clear()  # a broken body is not delivered any further
                self.queued = 0
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_batch(self) -> list[bytes]:
        """Every piece available now (waiting for at least one); [] at a clean end.

        Raises FlightFailed or CursorDropped instead of ever ending a broken body cleanly.
        """
        while not self._pieces:
            if self._closed:
                if self._error is not None:
                    raise self._error
                return []
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        batch = list(self._pieces)
        self._pieces.clear()
        self.queued = 0
        return batch


Reader = Callable[["Flight"], Awaitable[None]]


class Flight:
    """One upstream exchange: a reader task that publishes, and the cursors that consume."""

    def __init__(
        self,
        key: Hashable,
        replay_limit: int,
        *,
        on_end: Callable[[Flight], None] | None = None,
    ) -> None:
        self.key = key
        self.head: asyncio.Future[Head | Refusal] = asyncio.get_running_loop().create_future()
        self._replay: list[bytes] | None = []
        self._replay_bytes = 0
        self._replay_limit = replay_limit
        # A cursor may fall behind by this much, a replayed backlog included. Generous, because a
        # scraper that is merely slow for a moment (CPU contention) must not lose its scrape; one
        # that stops reading is cut off at its scrape timeout anyway.
        self._backlog_limit = max(8 * replay_limit, 16 * 1024 * 1024)
        self._cursors: set[Cursor] = set()
        self._on_end = on_end
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        self.finished = False

    def start(self, reader: Reader) -> asyncio.Task[None]:
        """Run `reader` as this flight's task; whatever becomes of it, the flight ends with it."""
        self.task = asyncio.get_running_loop().create_task(self._run(reader))
        return self.task

    async def _run(self, reader: Reader) -> None:
        error: BaseException | None = None
        try:
            await reader(self)
        except asyncio.CancelledError as exc:
            error = FlightFailed(str(exc.args[0]) if exc.args else "the shared scrape was cancelled")
            raise
        except FlightFailed as exc:
            error = exc
        except Exception as exc:  # one nobody expected (the reader logs it) still breaks every body
            error = FlightFailed(f"the shared scrape failed: {exc!r}")
        except BaseException as exc:
            error = FlightFailed(f"the shared scrape failed: {exc!r}")
            raise
        finally:
            self.finish(error)

    @property
    def joinable(self) -> bool:
        return not self.finished and self._replay is not None

    def join(self) -> Cursor:
        """A new cursor from the start of the body (the replay buffer is its backlog)."""
        if self._replay is None or self.finished:
            raise RuntimeError("flight is no longer joinable")
        cursor = Cursor(self._replay)
        self._cursors.add(cursor)
        return cursor

    def leave(self, cursor: Cursor) -> None:
        """A scraper is done with the flight; the reader stops when nobody is left to read for."""
        self._cursors.discard(cursor)
        self._stop_if_nobody_left()

    def _stop_if_nobody_left(self) -> None:
        if not self._cursors and not self.finished:
            if self._on_end is not None:
                self._on_end(self)  # no new scraper may join a flight that is being cancelled
            if self.task is not None and not self.task.cancelling():
                self.task.cancel(NOBODY_LEFT)  # unless it is being cancelled already (a stop)

    def set_head(self, head: Head | Refusal) -> None:
        if not self.head.done():
            self.head.set_result(head)

    def publish(self, piece: bytes) -> None:
        replay = self._replay
        if replay is not None:
            self._replay_bytes += len(piece)
            if self._replay_bytes > self._replay_limit:
                # Past the limit, keeping the prefix for late joiners would hold the whole body
                # in memory; late scrapes start flights of their own instead.
                self._replay = None
            else:
                replay.append(piece)
        slow = None
        for cursor in self._cursors:
            if cursor._push(piece) > self._backlog_limit:
                slow = [*(slow or ()), cursor]
        if slow:
            # Waiting for a slow scraper would stall the others; queueing for it would hold the
            # body in memory. It is cut off instead, and sees a broken response.
            for cursor in slow:
                self._cursors.discard(cursor)
                cursor.close(CursorDropped("the scraper read too slowly to keep up with the exporter"))
                if cursor.on_drop is not None:
                    cursor.on_drop()
            self._stop_if_nobody_left()

    def finish(self, error: BaseException | None = None) -> None:
        """End the flight: whole (error None), or with the error that broke the body."""
        if self.finished:
            return
        self.finished = True
        self.error = error
        self._replay = None
        if not self.head.done():
            self.head.set_result(Refusal(502, f"upstream request failed: {error or 'no answer'}"))
        for cursor in self._cursors:
            cursor.close(error)
        self._cursors.clear()
        if self._on_end is not None:
            self._on_end(self)


class Flights:
    """The flights in progress, by the key that makes two scrapes identical."""

    def __init__(self, replay_limit: int) -> None:
        self._flights: dict[Hashable, Flight] = {}
        self._replay_limit = replay_limit
        self.tasks: set[asyncio.Task[None]] = set()  # every running reader, shared or not

    def joinable(self, key: Hashable) -> Flight | None:
        flight = self._flights.get(key)
        return flight if flight is not None and flight.joinable else None

    def start(self, key: Hashable | None, reader: Reader) -> tuple[Flight, Cursor]:
        """A new flight running `reader`, and its starter's cursor; others may join it by `key`
        (None: a private flight). The cursor exists before the reader first runs, so a flight
        never starts with nobody to read for."""
        flight = Flight(key, self._replay_limit, on_end=self._forget)
        if key is not None:
            self._flights[key] = flight
        cursor = flight.join()
        task = flight.start(reader)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return flight, cursor

    def _forget(self, flight: Flight) -> None:
        if flight.key is not None and self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    def __len__(self) -> int:
        return len(self._flights)
