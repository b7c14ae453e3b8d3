"""The pool's connections, counted for the senders (``Dispatcher._slot_and_connection``): a semaphore with two
waiting lines.

A sender with no rate slot booked waits in the first line (``acquire()``), one whose slot is booked and near in the
second (``acquire(due=True)``), and a connection freed goes to the second line first: the booked sender's slot
passes by more than ``Limiter.passed`` allows after 20 ms, while a sender with no slot loses nothing by waiting.
Behind a FIFO line, a slow domain's senders (their slots waited for without a connection) came back behind every
other domain's sender, found their slots passed and gave them up: a domain limited to 2/s went at 0.16-0.59/s among
fast ones over 8 connections (``bench/README.md``, ``--mixed``).

So that a sender with no slot is not left waiting while booked ones keep coming, at most ``DUE_IN_A_ROW`` connections
go to the second line in a row while the first one waits; the next goes to the first line's oldest sender. Each line
is first come, first served, and a connection is never taken past a sender already waiting.
"""

from __future__ import annotations

import asyncio
from collections import deque

DUE_IN_A_ROW = 8
"""How many connections in a row go to senders with a slot booked while a sender with none waits."""


class Wire:
    """``size`` connections: ``acquire`` waits for one, ``release`` frees it (to the next sender waiting)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a pool of {size} connections: at least 1 is needed")
        self._free = size
        self._fresh: deque[asyncio.Future[None]] = deque()
        self._due: deque[asyncio.Future[None]] = deque()
        self._due_in_a_row = 0

    async def acquire(self, *, due: bool = False) -> None:
        """Take a connection: at once if one is free and no sender waits, else after the senders ahead (``due``: a
        sender with a slot booked, ahead of the senders with none). Cancelled while waiting, it takes none."""
        if self._free > 0:  # (free only while no sender waits: ``release`` hands each freed one on)
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        (self._due if due else self._fresh).append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # handed one as it was cancelled: it goes to the next
                self.release()
            elif waiter in (line := self._due if due else self._fresh):
                line.remove(waiter)
            raise

    def release(self) -> None:
        """Free a connection: it goes to the next sender waiting, if any."""
        self._free += 1
        while self._free > 0:
            waiter = self._next()
            if waiter is None:
                return
            self._free -= 1
            waiter.set_result(None)

    def _next(self) -> asyncio.Future[None] | None:
        """The waiting sender the next connection goes to, out of its line (None if none waits)."""
        for line in (self._due, self._fresh):  # (a sender cancelled but not yet resumed is no longer waiting)
            while line and line[0].done():
                line.popleft()
        if self._due and (not self._fresh or self._due_in_a_row < DUE_IN_A_ROW):
            self._due_in_a_row = self._due_in_a_row + 1 if self._fresh else 0
            return self._due.popleft()
        self._due_in_a_row = 0
        return self._fresh.popleft() if self._fresh else None
