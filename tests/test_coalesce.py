"""The flight machinery alone: replay for late joiners, the replay limit, and errors."""

from __future__ import annotations

import asyncio

import pytest

from proxy.coalesce import FlightAborted, Flights, Head, Refusal


async def drain(follower) -> bytes:  # type: ignore[no-untyped-def]
    out = b""
    while batch := await follower.next_batch():
        out += b"".join(batch)
    return out


async def test_late_joiner_gets_the_replayed_prefix_then_the_rest() -> None:
    flights = Flights(replay_limit=1024)
    flight = flights.start("k")
    flight.set_head(Head(200, (("Content-Type", "text/plain"),)))
    flight.publish(b"a")
    flight.publish(b"b")
    assert flights.joinable("k") is flight
    follower = flight.join()
    task = asyncio.create_task(drain(follower))
    flight.publish(b"c")
    flights.end(flight)
    assert await task == b"abc"
    assert flights.joinable("k") is None
    assert (await flight.head).status == 200


async def test_past_the_replay_limit_nobody_new_joins_but_followers_continue() -> None:
    flights = Flights(replay_limit=3)
    flight = flights.start("k")
    early = flight.join()
    flight.publish(b"ab")
    assert flight.joinable
    flight.publish(b"cd")  # 4 bytes > 3: the prefix is no longer kept
    assert not flight.joinable
    assert flights.joinable("k") is None
    with pytest.raises(RuntimeError):
        flight.join()
    flights.end(flight)
    assert await drain(early) == b"abcd"


async def test_a_broken_flight_raises_in_every_follower() -> None:
    flights = Flights(replay_limit=100)
    flight = flights.start("k")
    followers = [flight.join(), flight.join()]
    flight.publish(b"partial")
    flights.end(flight, ConnectionResetError("reset by peer"))
    for follower in followers:
        assert await follower.next_batch() == [b"partial"]
        with pytest.raises(FlightAborted, match="reset by peer"):
            await follower.next_batch()


async def test_a_flight_that_ends_before_its_head_refuses_followers() -> None:
    flights = Flights(replay_limit=100)
    flight = flights.start("k")
    flight.join()
    flights.end(flight, TimeoutError())
    head = await flight.head
    assert isinstance(head, Refusal)
    assert head.status == 502


async def test_a_follower_that_leaves_gets_nothing_more() -> None:
    flights = Flights(replay_limit=100)
    flight = flights.start("k")
    follower = flight.join()
    assert flight.has_followers
    flight.leave(follower)
    assert not flight.has_followers
    flight.publish(b"x")
    assert follower._chunks == type(follower._chunks)()
