"""Sharing one upstream response among concurrent identical scrapes.

windows_exporter (0.30 and later) runs one scrape at a time and answers a second one with 503.
HA Prometheus pairs scrape the same node within milliseconds of each other, so without sharing
one of them fails every time. A `Flight` is one upstream exchange: the scrape that started it
(the leader) publishes the head and each body chunk; every scrape that joins it (a follower) gets
the head and the whole body, replayed from the start when it joined late.

Pure asyncio, no HTTP: the app decides what a key is and how to write to clients.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Head:
    """What a follower needs before the body: the status and end-to-end headers to send."""

    status: int
    headers: tuple[tuple[str, str], ...]
    rewritten: bool = False  # the body is the proxy's own: each scraper gets its own encoding


@dataclass(frozen=True, slots=True)
class Refusal:
    """The leader's upstream request failed before any header; followers answer the same."""

    status: int
    text: str


class FlightAborted(Exception):
    """The shared body broke off; a follower must make that visible to its scraper."""


class FollowerTooSlow(Exception):
    """A follower fell so far behind that keeping its backlog would hold the body in memory."""


class Follower:
    """One joined scrape's view of a flight: the chunks it has not written yet, in order."""

    __slots__ = ("_chunks", "_closed", "_error", "_waiter", "queued")

    def __init__(self, backlog: list[bytes]) -> None:
        self._chunks: deque[bytes] = deque(backlog)
        self.queued = sum(len(chunk) for chunk in backlog)
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._error: BaseException | None = None

    def _push(self, chunk: bytes) -> int:
        self._chunks.append(chunk)
        self.queued += len(chunk)
        self._wake()
        return self.queued

    def _close(self, error: BaseException | None) -> None:
        self._closed = True
        self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_batch(self) -> list[bytes]:
        """All chunks available now (waiting for at least one); [] at a clean end.

        Raises FlightAborted when the leader's body broke off.
        """
        while not self._chunks:
            if self._closed:
                if self._error is not None:
                    raise FlightAborted(str(self._error)) from self._error
                return []
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        batch = list(self._chunks)
        self._chunks.clear()
        self.queued = 0
        return batch


class Flight:
    """One upstream exchange in progress, which followers may join until it ends or grows too big."""

    def __init__(self, key: Hashable, replay_limit: int) -> None:
        self.key = key
        self.head: asyncio.Future[Head | Refusal] = asyncio.get_running_loop().create_future()
        self._replay: list[bytes] | None = []
        self._replay_bytes = 0
        self._replay_limit = replay_limit
        # A follower may fall behind by this much, a replayed backlog included. Generous, because
        # a scraper that is merely slow for a moment (CPU contention) must not lose its scrape;
        # one that stops reading is cut off at its scrape timeout anyway.
        self._backlog_limit = max(8 * replay_limit, 16 * 1024 * 1024)
        self._followers: list[Follower] = []
        self.finished = False

    @property
    def joinable(self) -> bool:
        return not self.finished and self._replay is not None

    @property
    def has_followers(self) -> bool:
        return bool(self._followers)

    def join(self) -> Follower:
        if self._replay is None:
            raise RuntimeError("flight is no longer joinable")
        follower = Follower(self._replay)
        self._followers.append(follower)
        return follower

    def leave(self, follower: Follower) -> None:
        """A follower's scraper went away; stop queueing chunks for it."""
        if follower in self._followers:
            self._followers.remove(follower)

    def set_head(self, head: Head | Refusal) -> None:
        if not self.head.done():
            self.head.set_result(head)

    def publish(self, chunk: bytes) -> None:
        replay = self._replay
        if replay is not None:
            self._replay_bytes += len(chunk)
            if self._replay_bytes > self._replay_limit:
                # Past the limit, keeping the prefix for late joiners would hold the whole body
                # in memory; late scrapes go upstream on their own instead.
                self._replay = None
            else:
                replay.append(chunk)
        slow = None
        for follower in self._followers:
            if follower._push(chunk) > self._backlog_limit:
                slow = [*(slow or ()), follower]
        if slow:
            # Waiting for a slow scraper would stall the others; queueing for it would hold the
            # body in memory. It is cut off instead, and sees a broken response.
            for follower in slow:
                self._followers.remove(follower)
                follower._close(FollowerTooSlow("the scraper read too slowly to keep up with the exporter"))

    def finish(self, error: BaseException | None = None) -> None:
        """End the flight: cleanly, or with the error that broke the body."""
        if self.finished:
            return
        self.finished = True
        self._replay = None
        if not self.head.done():
            self.head.set_result(Refusal(502, f"upstream request failed: {error or 'no answer'}"))
        for follower in self._followers:
            follower._close(error)
        self._followers.clear()


class Flights:
    """The flights in progress, by the key that makes two scrapes identical."""

    def __init__(self, replay_limit: int) -> None:
        self._flights: dict[Hashable, Flight] = {}
        self._replay_limit = replay_limit

    def joinable(self, key: Hashable) -> Flight | None:
        flight = self._flights.get(key)
        return flight if flight is not None and flight.joinable else None

    def start(self, key: Hashable) -> Flight:
        flight = Flight(key, self._replay_limit)
        self._flights[key] = flight
        return flight

    def end(self, flight: Flight, error: BaseException | None = None) -> None:
        """Finish the flight (idempotent) and stop offering it to new scrapes."""
        flight.finish(error)
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    def __len__(self) -> int:
        return len(self._flights)
