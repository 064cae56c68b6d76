"""The flight machinery alone (pure asyncio): replay, the replay limit, outcomes, leaving, slow cursors."""

from __future__ import annotations

import asyncio

import pytest

from proxy.coalesce import NOBODY_LEFT, Cursor, CursorDropped, Flight, FlightFailed, Flights, Head, Refusal

HEAD = Head(200, (("Content-Type", "text/plain"),))


async def drain(cursor: Cursor) -> bytes:
    out = b""
    while batch := await cursor.next_batch():
        out += b"".join(batch)
    return out


class Script:
    """A reader the test steers: it publishes what it is given and ends as it is told."""

    def __init__(self) -> None:
        self.steps: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self.cancelled_with: str | None = None

    async def __call__(self, flight: Flight) -> None:
        flight.set_head(HEAD)
        try:
            while (step := await self.steps.get()) is not None:
                if isinstance(step, BaseException):
                    raise step
                flight.publish(step)
        except asyncio.CancelledError as exc:
            self.cancelled_with = str(exc.args[0]) if exc.args else ""
            raise


async def settle(flight: Flight) -> None:
    assert flight.task is not None
    await asyncio.wait([flight.task], timeout=5)
    assert flight.task.done()


async def test_every_cursor_gets_the_whole_body_and_a_late_one_its_replay() -> None:
    flights = Flights(replay_limit=1024)
    script = Script()
    flight, first = flights.start("k", script)
    for piece in (b"a", b"b"):
        script.steps.put_nowait(piece)
    await asyncio.sleep(0.01)
    assert flights.joinable("k") is flight
    late = flight.join()
    script.steps.put_nowait(b"c")
    script.steps.put_nowait(None)
    assert await drain(first) == await drain(late) == b"abc"
    await settle(flight)
    assert flight.finished
    assert flight.error is None
    assert flights.joinable("k") is None
    assert await flight.head == HEAD


async def test_past_the_replay_limit_nobody_new_joins_but_cursors_continue() -> None:
    flights = Flights(replay_limit=3)
    script = Script()
    flight, early = flights.start("k", script)
    script.steps.put_nowait(b"ab")
    await asyncio.sleep(0.01)
    assert flight.joinable
    script.steps.put_nowait(b"cd")  # 4 bytes > 3: the prefix is no longer kept
    await asyncio.sleep(0.01)
    assert not flight.joinable
    assert flights.joinable("k") is None
    with pytest.raises(RuntimeError):
        flight.join()
    script.steps.put_nowait(None)
    assert await drain(early) == b"abcd"


@pytest.mark.parametrize(
    "error",
    [FlightFailed("body broke off: connection reset by peer"), ValueError("nobody expected this")],
    ids=["expected", "unexpected"],
)
async def test_a_failed_reader_breaks_every_cursor(error: BaseException) -> None:
    flights = Flights(replay_limit=100)
    script = Script()
    flight, first = flights.start("k", script)
    second = flight.join()
    script.steps.put_nowait(b"partial")
    await asyncio.sleep(0.01)
    script.steps.put_nowait(error)
    for cursor in (first, second):
        with pytest.raises(FlightFailed):
            await drain(cursor)  # never a clean end after b"partial"
    await settle(flight)
    assert isinstance(flight.error, FlightFailed)


async def test_a_reader_cancelled_at_an_await_breaks_every_cursor() -> None:
    flights = Flights(replay_limit=100)
    script = Script()
    flight, first = flights.start("k", script)
    second = flight.join()
    script.steps.put_nowait(b"partial")
    await asyncio.sleep(0.01)
    assert flight.task is not None
    flight.task.cancel("the proxy is stopping")
    for cursor in (first, second):
        with pytest.raises(FlightFailed, match="the proxy is stopping"):
            await drain(cursor)
    await settle(flight)


async def test_the_last_cursor_to_leave_cancels_the_reader() -> None:
    flights = Flights(replay_limit=100)
    script = Script()
    flight, first = flights.start("k", script)
    second = flight.join()
    flight.leave(first)
    await asyncio.sleep(0.01)
    assert flight.task is not None
    assert not flight.task.done()  # one scraper still wants it
    flight.leave(second)
    await settle(flight)
    assert script.cancelled_with == NOBODY_LEFT
    assert flights.joinable("k") is None


async def test_a_reader_that_ends_before_its_head_refuses_everyone() -> None:
    flights = Flights(replay_limit=100)

    async def reader(_flight: Flight) -> None:
        raise FlightFailed("no answer")

    flight, cursor = flights.start("k", reader)
    head = await flight.head
    assert isinstance(head, Refusal)
    assert head.status == 502
    with pytest.raises(FlightFailed):
        await drain(cursor)


async def test_a_cursor_too_far_behind_is_dropped_and_the_others_go_on() -> None:
    flights = Flights(replay_limit=1024)  # the backlog limit is at least 16 MiB
    script = Script()
    flight, slow = flights.start("k", script)
    fast = flight.join()
    dropped: list[bool] = []
    slow.on_drop = lambda: dropped.append(True)
    piece = b"x" * (1 << 20)
    received = 0
    for _ in range(20):
        script.steps.put_nowait(piece)
        received += len(b"".join(await fast.next_batch()))
    script.steps.put_nowait(None)
    assert await drain(fast) == b""
    assert received == 20 << 20
    assert dropped == [True]
    with pytest.raises(CursorDropped):
        await drain(slow)
    await settle(flight)
    assert flight.error is None  # the flight itself was whole
