"""The pool's connections (``worker.wire``): a sender with a rate slot booked is handed the next connection freed
before the senders with none, and those still get theirs. Asserted by the order the pool hands them out, the senders
lined up with events (no sleeps, no timing)."""

from __future__ import annotations

import asyncio

import pytest

from worker.wire import DUE_IN_A_ROW, Wire


async def _line_up(wire: Wire, name: str, got: list[str], *, due: bool, keep: bool = False) -> asyncio.Task[None]:
    """A sender that starts waiting for a connection (waiting when this returns), notes it got one in ``got`` and
    frees it at once (or keeps it, ``keep``)."""
    waiting = asyncio.Event()

    async def sender() -> None:
        waiting.set()  # (no suspension between this and joining the line inside acquire)
        await wire.acquire(due=due)
        got.append(name)
        if not keep:
            wire.release()

    task = asyncio.create_task(sender(), name=name)
    await waiting.wait()
    return task


def test_a_sender_with_a_slot_booked_gets_the_freed_connection_before_an_earlier_one_without() -> None:
    async def scenario() -> list[str]:
        # Given a pool of one connection, held; a sender with no slot starts waiting for it, then one with a slot
        wire, got = Wire(1), []
        await wire.acquire()
        fresh = await _line_up(wire, "no slot", got, due=False)
        booked = await _line_up(wire, "slot booked", got, due=True)
        assert got == []
        # When the connection is freed
        wire.release()
        await asyncio.gather(fresh, booked)
        return got

    # Then the one whose slot is passing gets it first (FIFO, before: the other, and its slot passed meanwhile)
    assert asyncio.run(scenario()) == ["slot booked", "no slot"]


def test_each_line_is_first_come_first_served_and_a_free_connection_is_taken_at_once() -> None:
    async def scenario() -> list[str]:
        wire, got = Wire(2), []
        await wire.acquire()
        await wire.acquire(due=True)  # (nobody waits: free ones are taken at once, booked or not)
        tasks = [await _line_up(wire, f"{kind} {i}", got, due=kind == "due") for i in range(3)
                 for kind in ("fresh", "due")]  # fmt: skip
        wire.release()
        wire.release()
        await asyncio.gather(*tasks)
        await wire.acquire()  # all given back: free again
        return got

    assert asyncio.run(scenario()) == ["due 0", "due 1", "due 2", "fresh 0", "fresh 1", "fresh 2"]


def test_senders_with_no_slot_still_get_connections_while_booked_ones_keep_coming() -> None:
    async def scenario() -> tuple[list[str], int]:
        # Given the only connection held, a sender with no slot waiting, and booked senders that never stop coming:
        # each one that gets the connection lines up another booked sender before freeing it
        wire, got = Wire(1), []
        await wire.acquire()
        fresh = await _line_up(wire, "no slot", got, due=False)
        more: list[asyncio.Task[None]] = []

        async def booked(i: int, waiting: asyncio.Event) -> None:
            waiting.set()
            await wire.acquire(due=True)
            got.append(f"booked {i}")
            if "no slot" not in got and i < 3 * DUE_IN_A_ROW:  # (a bound, so that a regression fails, not hangs)
                await next_one(i + 1)  # (in the line before the connection is freed)
            wire.release()

        async def next_one(i: int) -> None:
            waiting = asyncio.Event()
            more.append(asyncio.create_task(booked(i, waiting)))
            await waiting.wait()

        await next_one(0)
        # When the connection is freed
        wire.release()
        await fresh
        while not all(task.done() for task in more):
            await asyncio.gather(*more)
        return got, got.index("no slot")

    got, place = asyncio.run(scenario())
    # Then the sender with no slot got one after at most DUE_IN_A_ROW booked ones, and every booked one got one too
    assert place == DUE_IN_A_ROW, got
    assert got[:place] == [f"booked {i}" for i in range(place)]
    assert got[place + 1 :] == [f"booked {place}"]


@pytest.mark.parametrize("when", ["waiting", "just handed one"])
def test_a_sender_cancelled_takes_no_connection_and_the_next_one_gets_it(when: str) -> None:
    async def scenario() -> list[str]:
        # Given the only connection held and two senders with slots waiting for it
        wire, got = Wire(1), []
        await wire.acquire()
        first = await _line_up(wire, "first", got, due=True, keep=True)
        second = await _line_up(wire, "second", got, due=True, keep=True)
        # When the first is cancelled (the run stops) before it could take the connection freed, or as it was
        if when == "waiting":
            first.cancel()
            wire.release()
        else:
            wire.release()
            first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await second
        # Then the connection went to the second, held once: a third sender waits for it
        third = await _line_up(wire, "third", got, due=False)
        assert got == ["second"]
        wire.release()
        await third
        return got

    assert asyncio.run(scenario()) == ["second", "third"]
