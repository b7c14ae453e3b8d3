"""The pool's connections (``worker.wire``): a sender with a rate slot booked is handed the next connection freed
before the senders with none, and those still get theirs. Asserted by the order the pool hands them out, the senders
lined up with events (no sleeps, no timing)."""

from __future__ import annotations

import asyncio
import random

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


@pytest.mark.parametrize("seed", range(40))
def test_random_acquires_cancels_and_releases_never_lose_or_make_a_connection(seed: int) -> None:
    """Random interleavings of senders (booked or not) waiting, cancelled while waiting or as they are handed one or
    while holding one, and freeing theirs: at every quiet point the free connections and those held add up to the
    pool's size, none is free while a sender waits, and at the end every sender not cancelled got one."""
    rng = random.Random(seed)

    async def scenario() -> None:
        size = rng.randint(1, 3)
        wire = Wire(size)
        holding: dict[int, asyncio.Event] = {}  # sender -> its "free it now" event
        tasks: dict[int, asyncio.Task[None]] = {}
        served: set[int] = set()

        async def sender(i: int, due: bool) -> None:
            await wire.acquire(due=due)
            served.add(i)
            done = holding[i] = asyncio.Event()
            try:
                await done.wait()
            finally:
                del holding[i]
                wire.release()

        async def settle() -> None:  # (no timing: the loop's ready callbacks run until nothing changes)
            for _ in range(20):
                await asyncio.sleep(0)

        def check() -> None:
            waiting = sum(not f.done() for line in (wire._due, wire._fresh) for f in line)
            assert wire._free + len(holding) == size, (wire._free, len(holding), size)
            assert waiting == 0 or wire._free == 0, (waiting, wire._free)

        for step in range(rng.randint(10, 60)):
            action = rng.random()
            if action < 0.45:
                tasks[step] = asyncio.create_task(sender(step, due=rng.random() < 0.5))
            elif action < 0.7 and holding:
                holding[rng.choice(sorted(holding))].set()
            elif tasks:
                tasks[rng.choice(sorted(tasks))].cancel()
            turn = rng.random()
            if turn < 0.3:
                await settle()
                check()
            elif turn < 0.6:
                await asyncio.sleep(0)  # part-way: a handover or a cancellation may be pending
            # (else the next action follows at once: a release right after a cancellation, say)
        await settle()
        check()
        while holding or not all(t.done() for t in tasks.values()):
            for event in list(holding.values()):
                event.set()
            await settle()
        check()
        # (and as a sender sees it: the pool's size taken at once, one more waits)
        takers = [asyncio.create_task(wire.acquire(due=rng.random() < 0.5)) for _ in range(size + 1)]
        await settle()
        assert [t.done() for t in takers] == [True] * size + [False]
        wire.release()
        await settle()
        assert takers[-1].done()
        assert all(i in served for i, t in tasks.items() if not t.cancelled()), (served, tasks)

    asyncio.run(scenario())
