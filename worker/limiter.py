"""The sender's limits composed: a global rate, a rate per recipient domain (adaptive),
and a daily quota.

Before each message a sender calls ``acquire(domain)``: it books a slot on the
global rate and on the domain's rate together and sleeps until both allow it.
After the attempt, ``observe(domain, result)`` feeds the domain's adaptive rate
(a throttling reply about that domain, or a refusal of the sender, halves it; good
replies restore it step by step), or the relay's pace (``core.pace``: a throttling
reply that is the relay's own, a 421, one for several domains, halve the global rate and
hold every send back a moment; good replies restore it step by step). A domain slot
further off than ``HOLD_SECONDS`` is not waited for in a sender: ``acquire`` books
nothing and says ``Later``, and the message waits in the ledger.

Where the booking happens is a ``Booker``: ``LocalBooker`` keeps the GCRA
state in this process (SQLite, one worker); ``DbBooker`` keeps it in the
``rate_limit`` table, so several workers on one PostgreSQL database share the
limits (one upsert per limit per message). The adaptive factor itself stays in
each process: a throttled worker books the shared domain row at its slower
interval, which puts every worker's next slot later, but the other workers
book at their own interval until a throttling reply reaches them too.

The relay's pace is shared with ``DbBooker``: every worker sends to the one relay, whose "slow down" is about all
of them. A cut is made here at once (``observe``), then written to the database before this worker's next booking
(``core.pace.shared_cut`` decides it there against the last cut any worker made: one cut per round, however many
workers met the signal); each booking reads the last cut, and a worker that finds a new one follows it
(``RelayPace.follow``) and books again at the new pace. Recovery is counted from the shared cut's time alone, so
every worker steps back up together.

The daily quota always lives in the database (it must survive restarts).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime
from typing import NamedTuple, Protocol

from worker import log
from worker.adapters.ratestore import PaceRead, RateStore
from worker.adapters.store import DayQuota
from worker.asyncstore import AsyncStore
from worker.config import SendingSettings
from worker.core.limits import AdaptiveRate, book, quota_day, quota_day_end, quota_day_start, quota_grant, slows_domain
from worker.core.pace import RelayPace, SharedCut, shared_cut
from worker.domain import Outcome, SendResult
from worker.ports import Clock

GLOBAL_KEY = "global"
QUOTA_KEY = "quota:daily"

Limit = tuple[str, float, int]
"""(key, interval in seconds, burst)"""

LATE_SECONDS = 0.02
"""A sender that wakes this much after its slot books a new one."""
REBOOKS = 3


WIRE_HOLD_SECONDS = 0.25
"""The longest a sender holding one of the pool's connections waits on it for a slot of its message's recipient
domain, once the slot it had passed while it waited for the connection (about one SMTP transaction: the
connection idles that long at most; a later slot is waited for without it, the connection free for other
domains' messages)."""

RELAY_WHY = ("the SMTP relay's own limit (a 421, or the same \"slow down\" for several domains): the global rate is "
             "halved, and comes back step by step as mail goes through")
JOINED_WHY = ("the SMTP relay's \"slow down\" came in a round another worker sharing the database had already cut: "
              "this worker follows that shared pace, no new cut")


@dataclass(frozen=True)
class RelaySignal:
    """A relay-wide "slow down" met here, cut into ``pace`` and not written to the shared pace yet: when it came and
    when its attempt began (monotonic), and what the log says of it once the database has decided whether it was a
    cut of its own or part of one another worker made (``Limiter.share_cut``)."""

    at: float
    began: float
    domain: str
    code: int | None
    reply: str
    rate_before: float


HOLD_SECONDS = 5.0
"""The longest a sender waits for a slot of its message's recipient domain (``acquire``'s ``hold``): a later slot is
waited for in the ledger (``Later``), so that a slow or throttled domain cannot hold every sender while the global
rate has room for the other domains' messages."""


class Booking(NamedTuple):
    wait: float
    """Seconds until the latest of the limits allows the event (booked), or until the limit that would have made it
    wait too long does (not booked)."""
    booked: bool = True


@dataclass(frozen=True)
class Later:
    """The recipient domain's next slot for this message lies further off than a sender waits: nothing is booked,
    the message waits in the ledger for ``seconds`` (then books its slot when it is claimed again)."""

    seconds: float


class Booker(Protocol):
    async def book(self, limits: Sequence[Limit], longest: Mapping[str, float] | None = None) -> Booking:
        """Book one event on every limit; return the seconds to wait for the latest of them. Unless a limit whose
        key ``longest`` names would wait longer than the seconds it gives: then book nothing, and say so."""
        ...


class LocalBooker:
    """GCRA state in this process, on the monotonic clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.tats: dict[str, float] = {}

    async def book(self, limits: Sequence[Limit], longest: Mapping[str, float] | None = None) -> Booking:
        now = self.clock.monotonic()
        wait = 0.0
        tats: dict[str, float] = {}
        for key, interval, burst in limits:
            tats[key], w = book(self.tats.get(key, 0.0), now, interval=interval, burst=burst)
            if longest and w > longest.get(key, math.inf):
                return Booking(w, booked=False)
            wait = max(wait, w)
        self.tats.update(tats)
        return Booking(wait)


KEY_MAX = 200
"""The longest key the shared ``rate_limit`` table holds (on PostgreSQL: a longer one fails the booking)."""


def domain_key(domain: str) -> str:
    """A recipient domain's rate key: ``domain:<domain>``, or for a domain too long for the table (up to 253
    characters: DNS's most), its first 150 characters and a digest of the whole (others that share the 150 have
    other digests), the same on every worker."""
    key = f"domain:{domain}"
    if len(key) <= KEY_MAX:
        return key
    return f"domain:{domain[:150]}…{hashlib.sha256(domain.encode()).hexdigest()[:16]}"


class DbBooker:
    """GCRA state in the ``rate_limit`` table, shared by every worker on the database."""

    def __init__(self, store: AsyncStore, rates: RateStore) -> None:
        self.store = store
        self.rates = rates
        self.pace: PaceRead | None = None
        """The relay's pace shared through the database as the last booking found it."""
        self.sooner: dict[str, float] = {}
        """Per key, the seconds its shared row's next slot is to be brought forward before this worker's next
        booking: a reload raised the key's rate (``Limiter.take_over``), and the row still holds the next slot the
        old rate booked (up to one old interval off, which every message to the domain would wait for)."""

    async def book(self, limits: Sequence[Limit], longest: Mapping[str, float] | None = None) -> Booking:
        # the wait is measured on the database's clock, the one every worker shares; the time
        # its answer takes to come back is added on top, which errs on the slow side. A booking that fails
        # (the database restarting) is tried again: one whose reply was lost only wastes a slot.
        if self.sooner:  # (brought forward twice, should a reply be lost: the next slot is never before now)
            sooner, self.sooner = self.sooner, {}  # (the senders booking meanwhile do not bring it forward again)
            try:
                await self.store.call_retrying("rate_brought_forward_retried", self.rates.bring_forward, sooner)
            except BaseException:
                for key, seconds in sooner.items():  # for the next booking
                    self.sooner[key] = self.sooner.get(key, 0.0) + seconds
                raise
        wait, booked, pace = await self.store.call_retrying(
            "rate_booking_retried", self.rates.try_book_reading_pace, limits, longest or {}
        )
        self.pace = pace
        return Booking(wait, booked)

    async def read_pace(self) -> PaceRead:
        return await self.store.call(self.rates.read_pace)  # not retried: the pace as last read serves meanwhile

    async def cut_pace(self, decide: Callable[[SharedCut | None, float], SharedCut | None]) -> PaceRead:
        return await self.store.call_retrying("relay_pace_cut_retried", self.rates.cut_pace, decide)


class Limiter:
    def __init__(self, settings: SendingSettings, clock: Clock, booker: Booker) -> None:
        self.settings = settings
        self.clock = clock
        self.booker = booker
        self.rates: dict[str, AdaptiveRate] = {}
        self.late_rebookings = 0
        self.later: dict[str, float] = {}
        """Per domain, the monotonic time the last message this process sent to wait in the ledger was told to
        come back at: the next one is told one interval after it, so they do not all come back at once."""
        self.told: dict[str, dict[int, float]] = {}
        """Per domain, the messages told to wait in the ledger (``Later``), by message id, and the monotonic time each
        was told to come back at (see ``waiting`` and ``take_over``); those come due are dropped as they are seen."""
        self._unnamed = itertools.count(-1, -1)
        self.taken: dict[str, list[float]] = {}
        """Per domain whose waiting messages were read from the ledger (``learn``), the monotonic times (sorted) that
        the messages waiting for it fall due at, with those told since: a message told to wait is told a time one
        interval clear of each of them, not one a message left waiting by an earlier process (or another worker)
        already has."""
        self._free: dict[str, float] = {}
        """Per domain, its next free slot as its last ``Later`` found it (monotonic; for ``tell_again``)."""
        self.pace = RelayPace(ceiling=settings.rate_per_second, floor=settings.throttle_floor_per_second)
        """The global rate, slowed by the relay's own throttling (``core.pace``)."""
        self.relay_cuts = 0
        """Times the relay's throttling slowed the global rate down (since this process started): with ``DbBooker``,
        the cuts the database took as new, not the signals of a round another worker had cut (``relay_joined``)."""
        self.relay_joined = 0
        """With ``DbBooker``: relay-wide signals met here that the database counted in a cut another worker made."""
        self.relay_lowest = settings.rate_per_second
        """The slowest the relay's throttling made the global rate."""
        self.relay_why = ""
        """The reply behind the last cut, addresses masked."""
        self.shared_at: float | None = None
        """With ``DbBooker``: when (the database's clock) the shared pace's last cut that ``pace`` follows was made."""
        self.shared_cut_at = 0.0
        """That cut's time on this process's monotonic clock."""
        self.unshared: RelaySignal | None = None
        """With ``DbBooker``: a cut made here not written to the database yet."""

    def take_over(self, old: Limiter) -> dict[str, dict[int, float]]:
        """Carry on from ``old``, the limiter of the configuration a reload replaces: the slots it booked in this
        process (the same ones, as the runs of the two never overlap but on the slots they book together), the
        domains a throttling reply slowed down (kept as slow, within this configuration's rates) and the
        messages it told to come back later. A fresh limiter would let a burst out on every reload, and send a
        throttled domain at its full rate again.

        A domain this configuration sends to faster than ``old`` did (its rate raised) has the messages told to wait
        for it given new times, one of its new intervals apart from now on, where they would keep the old rate's
        slots (a backlog told to come back every 1000 s would still go at that pace, however high the new rate), and
        the next slot booked for it here is one new interval after the last one. Returns those new times, per domain
        and message id (monotonic): the caller writes them in the ledger."""
        if isinstance(self.booker, LocalBooker) and isinstance(old.booker, LocalBooker):
            self.booker.tats = old.booker.tats
        if isinstance(self.booker, DbBooker) and isinstance(old.booker, DbBooker) and self.booker is not old.booker:
            self.booker.sooner = {**old.booker.sooner, **self.booker.sooner}  # (not booked yet: still to be made)
        for domain, rate in old.rates.items():
            if rate.current < rate.ceiling:
                now = self._rate(domain)
                now.current = max(now.floor, min(now.ceiling, rate.current))
        pace = old.pace
        if pace.slowed:
            self.pace.current = max(self.pace.floor, min(self.pace.ceiling, pace.current))
            self.pace.cut_at, self.pace.stepped_at = pace.cut_at, pace.stepped_at
            self.pace.quiet_until = pace.quiet_until
        self.relay_cuts, self.relay_joined, self.relay_why = old.relay_cuts, old.relay_joined, old.relay_why
        # the shared pace's last cut is followed again at the next booking, against this configuration's rates: one
        # the old rate was under (nothing to slow) slows a raised one
        self.unshared = old.unshared
        self.relay_lowest = min(old.relay_lowest, self.pace.current)
        self.later = dict(old.later)
        self.told = {domain: dict(told) for domain, told in old.told.items()}
        self.taken = {domain: list(times) for domain, times in old.taken.items()}
        self._free = dict(old._free)
        self._unnamed = old._unnamed
        self._drop_passed()
        # every domain the old configuration booked a slot of (``limits`` made its rate): its next slot moves
        return {domain: self._sooner(domain, was=old.limits(domain)[-1][1]) for domain in {*self.told, *old.rates}}

    def _sooner(self, domain: str, *, was: float) -> dict[int, float]:
        """New times for the messages told to wait for ``domain``, whose interval was ``was``, if it is shorter now
        (else none); and its next slot, one new interval after the last one booked (shared through the database:
        at this worker's next booking)."""
        key, interval, _ = self.limits(domain)[-1]
        if interval >= was:
            return {}
        now = self.clock.monotonic()
        start = now
        if isinstance(self.booker, LocalBooker) and key in self.booker.tats:
            self.booker.tats[key] -= was - interval  # the next slot: one new interval after the last one booked
            start = max(now, self.booker.tats[key])
        elif isinstance(self.booker, DbBooker):
            self.booker.sooner[key] = self.booker.sooner.get(key, 0.0) + was - interval
        told = self.told.get(domain, {})
        if not told:
            return {}
        moved = {}
        for n, (message, at) in enumerate(sorted(told.items(), key=lambda item: item[1])):
            sooner = start + n * interval
            if sooner < at:
                moved[message] = told[message] = sooner
                self._untake(domain, at)
                bisect.insort(self.taken.get(domain, []), sooner)
        if told:
            self.later[domain] = max(told.values())
        return moved

    def knows(self, domain: str) -> bool:
        """Whether the messages waiting in the ledger for ``domain`` were read (``learn``)."""
        return domain in self.taken

    def learn(self, domain: str, due: Iterable[float]) -> None:
        """The monotonic times the messages waiting in the ledger for ``domain`` fall due (read once a message to it
        must wait, as those an earlier process left waiting are not in this one's memory): what this process tells
        to wait next is told a slot clear of them."""
        now = self.clock.monotonic()
        self.taken[domain] = sorted(t for t in due if t > now)  # the ledger's: what this process told is written
        self.later.pop(domain, None)  # a free slot may be found before the last one told

    def tell_again(self, domain: str, message: int, *, interval: float) -> Later:
        """``message``'s ``Later`` again, after ``learn``, in place of the one told before (not written yet): a slot
        clear of the messages waiting for ``domain``."""
        self.told.get(domain, {}).pop(message, None)
        now = self.clock.monotonic()
        return self._later(domain, max(0.0, self._free.get(domain, now) - now), interval=interval, message=message)

    def _untake(self, domain: str, at: float) -> None:
        taken = self.taken.get(domain)
        if taken:
            i = bisect.bisect_left(taken, at)
            if i < len(taken) and taken[i] == at:
                del taken[i]

    def _rate(self, domain: str) -> AdaptiveRate:
        rate = self.rates.get(domain)
        if rate is None:
            configured = self.settings.domains.get(domain)
            ceiling = configured.rate_per_second if configured else self.settings.domain_rate_per_second
            rate = self.rates[domain] = AdaptiveRate(ceiling=ceiling, floor=self.settings.throttle_floor_per_second)
        return rate

    def _burst(self, domain: str) -> int:
        configured = self.settings.domains.get(domain)
        return configured.burst if configured else self.settings.domain_burst

    def limits(self, domain: str) -> list[Limit]:
        s = self.settings
        rate = self._rate(domain)
        # a throttled domain loses its burst until it is back at full rate
        burst = self._burst(domain) if rate.current >= rate.ceiling else 1
        # so does the global rate while the relay's throttling keeps it below the configured one
        pace = self.pace
        return [(GLOBAL_KEY, 1.0 / pace.current, 1 if pace.slowed else s.burst),
                (domain_key(domain), 1.0 / rate.current, burst)]  # fmt: skip

    async def acquire(
        self,
        domain: str,
        *,
        stop: asyncio.Event | None = None,
        hold: float | None = None,
        message: int | None = None,
        tell: bool = True,
    ) -> float | Later:
        """Wait for a slot on the global and the domain rate; returns the seconds waited.

        ``hold`` given, a slot of the domain's further off than ``hold`` seconds is not booked nor waited for: the
        result is ``Later``, when the message may try again (the domain's next free slot, or one interval after
        the last message this process told to come back later, whichever is later; ``message``, its id, is kept with
        that time: ``waiting``, ``take_over``; ``tell`` False: the result is only the seconds until the domain's next
        free slot, nothing kept, for a caller that waits for it itself). A sender that waited for it
        would be one sender fewer for every other domain: with enough such messages claimed, all of them, and a
        slow domain (a throttled one at ``throttle_floor_per_second``) would stop the others.

        ``stop`` set (the dispatcher stopping or pausing) ends the wait at once, the slot not used: a slow rate's
        slots can lie further off than a daemon's grace period, and a message that waits for one has not begun
        (its sender gives it back to the queue, with its slot of the day's quota).

        A sender that wakes well after its slot (the process was starved of CPU, or the
        event loop was busy) gives the slot up and books again: sent late, it would go
        out together with the messages of the slots after it, and a stalled worker would
        release its whole backlog at once. The slot given up is not given back: a starved
        worker sends below the rate, never above it. After ``REBOOKS`` tries it goes anyway,
        so an overloaded machine slows down rather than stops. Returns the seconds it was
        told to wait, not the time it overslept."""
        waited = 0.0
        key = domain_key(domain)
        tries = 0
        while True:
            if self.unshared is not None:
                await self.share_cut()
            quiet = self.pace.wait(self.clock.monotonic())
            if quiet > 0:  # the relay just said "slow down": no send begins until it has had a rest
                await self.sleep(quiet, stop)
                waited += quiet
                if stop is not None and stop.is_set():
                    break
            limits = self.limits(domain)
            cut = self.pace.cut_at
            wait, booked = await self.booker.book(limits, {key: hold} if hold is not None else None)
            if isinstance(self.booker, DbBooker):
                self.follow(self.booker.pace)
            if self.pace.cut_at != cut and tries < REBOOKS and self.rebook(domain, limits):
                tries += 1  # booked at the pace before a cut: book at the new one
                continue
            if not booked:
                return self._later(domain, wait, interval=limits[-1][1], message=message) if tell else Later(wait)
            if wait <= 0:
                break
            due = self.clock.monotonic() + wait
            cut = self.pace.cut_at
            await self.sleep(wait, stop)
            waited += wait
            late = self.clock.monotonic() - due
            if tries == REBOOKS or (stop is not None and stop.is_set()):
                break
            tries += 1
            if self.pace.cut_at != cut and self.rebook(domain, limits):  # booked at the pace before a cut: again
                continue
            if late <= LATE_SECONDS:
                break
            self.late_rebookings += 1
            log.event("rate_slot_missed", logging.DEBUG, domain=domain, late_seconds=round(late, 3))
        return waited

    def rebook(self, domain: str, booked: Sequence[Limit]) -> bool:
        """Whether a slot booked on ``booked`` is to be booked again now that the pace has a new last cut: its limits
        are not what they were (a cut halved the rate, took the burst away) or a rest is due. A cut long past, read
        by a worker that just started (the pace back at the configured rate), changes nothing: its slot stands."""
        return list(booked) != self.limits(domain) or self.pace.wait(self.clock.monotonic()) > 0

    def passed(self, domain: str, granted: float) -> bool:
        """Whether the slot ``acquire`` gave at ``granted`` (monotonic, when it returned) passed by more than
        ``LATE_SECONDS`` before its message could begin (it waited for one of the pool's connections, or the
        process for the CPU): begun now, it would go out together with the messages whose slots are now. Such a
        slot is given up (not given back: a slowed sender sends below the rate, never above it), and counted."""
        late = self.clock.monotonic() - granted
        if late <= LATE_SECONDS:
            return False
        self.late_rebookings += 1
        log.event("rate_slot_missed", logging.DEBUG, domain=domain, late_seconds=round(late, 3),
                  why="waited for a connection")  # fmt: skip
        return True

    def _later(self, domain: str, wait: float, *, interval: float, message: int | None) -> Later:
        now = self.clock.monotonic()
        at = now + wait
        self._free[domain] = at
        last = self.later.get(domain)
        if last is not None and last + interval > at:
            at = last + interval
        taken = self.taken.get(domain)
        if taken is not None:  # clear of every message waiting for it: the first gap of an interval each side
            del taken[: bisect.bisect_right(taken, now)]
            for t in taken[bisect.bisect_right(taken, at - interval) :]:
                if t >= at + interval:
                    break
                at = t + interval
            bisect.insort(taken, at)
        self.later = {d: t for d, t in self.later.items() if t > now}  # those passed tell nothing any more
        self.later[domain] = at
        self.told.setdefault(domain, {})[next(self._unnamed) if message is None else message] = at
        return Later(at - now)

    def waiting(self) -> int:
        """The messages this process told to wait in the ledger for their domain's slot (``Later``) whose time has
        not come yet: not due, not claimed, they are in no count of the queue the ledger can make (the health line
        and ``/metrics`` add them to it). Those come due are the ledger's due rows again."""
        self._drop_passed()
        return sum(len(told) for told in self.told.values())

    def told_times(self) -> dict[int, float]:
        """The messages told to wait for their domain's slot whose time has not come yet, and that time (monotonic)."""
        self._drop_passed()
        return {m: t for told in self.told.values() for m, t in told.items() if m >= 0}

    def forget(self, messages: Iterable[int]) -> None:
        """``messages`` wait for their domain's slot no more (the ledger says: cancelled, claimed, sent, come due):
        ``waiting`` does not count them, a reload does not bring them forward."""
        gone = set(messages)
        if gone:
            self.told = {d: left for d, told in self.told.items() if (left := {m: t for m, t in told.items()
                                                                               if m not in gone})}  # fmt: skip

    def _drop_passed(self) -> None:
        now = self.clock.monotonic()
        self.told = {d: left for d, told in self.told.items() if (left := {m: t for m, t in told.items() if t > now})}

    async def sleep(self, seconds: float, stop: asyncio.Event | None) -> None:
        """Sleep ``seconds``, or until ``stop`` is set."""
        if stop is None:
            await self.clock.sleep(seconds)
            return
        sleep = asyncio.ensure_future(self.clock.sleep(seconds))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({sleep, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleep.cancel()
            stopped.cancel()

    def observe(self, domain: str, result: SendResult, *, began: float | None = None) -> None:
        """Feed the adaptive rates with the attempt's result as the server gave it (``began``: when the attempt
        began, monotonic). A throttling reply about the recipient's domain, or a refusal of the sender
        (``core.limits.slows_domain``), halves the domain's rate; one that is the relay's own (``core.pace``: a 421,
        a "slow down" met for several domains) halves the global rate instead; a send
        restores each step by step."""
        now = self.clock.monotonic()
        rate = self._rate(domain)
        scope = self.pace.scope(result, domain, now)
        if scope == "relay":
            before = self.pace.current
            began = now if began is None else began
            if self.pace.throttled(now, began=began):
                self.relay_why = log.mask_addresses(result.reply or result.error_type)[:200]
                signal = RelaySignal(now, began, domain, result.code, self.relay_why, before)
                if isinstance(self.booker, DbBooker):  # written (and logged) before this worker's next booking
                    if self.unshared is not None:  # one round's: the rate before it is the one before its first
                        signal = replace(signal, rate_before=self.unshared.rate_before)
                    self.unshared = signal
                else:
                    self._cut_made(signal, self.pace.current)
        elif slows_domain(result):
            before = rate.current
            rate.throttled()
            log.event(
                "domain_throttled", logging.WARNING, domain=domain, code=result.code,
                rate_before=round(before, 3), rate_now=round(rate.current, 3),
            )  # fmt: skip
        elif result.outcome is Outcome.SENT:
            if rate.current < rate.ceiling:
                rate.succeeded()
            if self.pace.succeeded(now):
                back = not self.pace.slowed
                log.event("relay_pace_restored" if back else "relay_pace_raised", logging.INFO,
                          rate_now=round(self.pace.current, 3), rate_configured=self.pace.ceiling)  # fmt: skip

    def _cut_made(self, signal: RelaySignal, rate: float) -> None:
        """``signal`` cut the global rate to ``rate``: count it, and log ``relay_throttled``."""
        self.relay_cuts += 1
        self.relay_lowest = min(self.relay_lowest, rate)
        log.event("relay_throttled", logging.WARNING, domain=signal.domain, code=signal.code, reply=signal.reply,
                  rate_before=round(signal.rate_before, 3), rate_now=round(rate, 3), why=RELAY_WHY)  # fmt: skip

    async def share_cut(self) -> None:
        """Write the cut made here (``unshared``) to the pace shared through the database, unless another worker's
        was made after its attempt began (``core.pace.shared_cut``); follow what the database then holds. The log
        says which it was: ``relay_throttled`` (WARNING) for a cut of this worker's, ``relay_throttled_joined``
        (INFO, naming the shared pace followed) for a signal the database counted in another worker's cut, so that
        N workers met by one round of throttling log one cut, not N. A write that fails (the database gone, the run
        cancelled) logs and counts the cut as this worker's (its pace was cut), and raises."""
        if self.unshared is None or not isinstance(self.booker, DbBooker):
            return
        signal, self.unshared = self.unshared, None
        sent = self.clock.monotonic()
        pace = self.pace
        made: list[SharedCut | None] = [None]

        def decide(last: SharedCut | None, now: float) -> SharedCut | None:  # on the database's clock
            made[0] = shared_cut(last, ceiling=pace.ceiling, floor=pace.floor, now=now - (sent - signal.at),
                                 began=now - (sent - signal.began))  # fmt: skip
            return made[0]  # the last call's, should a failed transaction be tried again

        try:
            read = await self.booker.cut_pace(decide)
        except BaseException:  # the database failed (or the run stopped): this worker's own pace was cut all the same
            self._cut_made(signal, self.pace.current)
            raise
        if made[0] is not None:
            self._cut_made(signal, made[0].rate)
        elif read.cut is not None:
            self.relay_joined += 1
            log.event("relay_throttled_joined", logging.INFO, domain=signal.domain, code=signal.code,
                      reply=signal.reply, shared_rate=round(read.cut.rate, 3),
                      shared_cut_seconds_ago=round(max(0.0, read.now - read.cut.at), 3), why=JOINED_WHY)  # fmt: skip
        self.follow(read, again=True)

    async def refresh_pace(self) -> None:
        """Bring ``pace`` up to date with the one shared through the database (for the health line and
        ``/metrics``: a worker that sends nothing books nothing, and reads no other worker's cut); else nothing."""
        if isinstance(self.booker, DbBooker):
            self.follow(await self.booker.read_pace(), again=True)

    def follow(self, read: PaceRead | None, *, again: bool = False) -> bool:
        """Follow the last cut of the pace shared through the database, if ``read`` (None: not shared) found one
        this worker did not follow yet (or ``again``: once more, stepped up to now), unless a cut made here is still
        to be written. Whether it did."""
        if read is None:
            return False
        if read.cut is None or self.unshared is not None:
            return False
        now = self.clock.monotonic()
        if read.cut.at != self.shared_at:
            self.shared_at, self.shared_cut_at = read.cut.at, now - (read.now - read.cut.at)
        elif not again:
            return False
        before = self.pace.cut_at
        self.pace.follow(SharedCut(self.shared_cut_at, read.cut.rate), now)
        self.relay_lowest = min(self.relay_lowest, self.pace.current)
        return before != self.pace.cut_at

    def relay_status(self) -> dict[str, float | str | None]:
        """The health line's relay fields: the global pace now, the reply that slowed it (only while it is slowed:
        once the pace is back at the configured rate, an old reply is not news) and how long ago the last cut was
        (None: never)."""
        pace = self.pace
        ago = None if pace.cut_at is None else round(self.clock.monotonic() - pace.cut_at, 1)
        return {
            "relay_pace_per_second": round(pace.current, 3),
            "relay_throttled": self.relay_why if pace.slowed else "",
            "relay_throttled_seconds_ago": ago,
        }

    def relay_note(self, cuts_before: int, joined_before: int = 0) -> str | None:
        """What the relay's throttling did to the global rate since ``relay_cuts`` was ``cuts_before`` (and
        ``relay_joined`` ``joined_before``) (None: nothing): for the run's summary."""
        cuts = self.relay_cuts - cuts_before
        joined = self.relay_joined - joined_before
        if cuts <= 0 and joined <= 0 and not self.pace.slowed:
            return None
        pace = self.pace
        now = f"{pace.current:.3g}/s" if pace.slowed else "back at the configured rate"
        if cuts <= 0 and joined > 0:  # told too, in rounds another worker's cut had counted
            return (
                f"the SMTP relay asked this worker to slow down ({joined} {'time' if joined == 1 else 'times'}, last: "
                f"{self.relay_why[:120]}) in a round another worker sharing the database had already cut: the global "
                f"rate went down to {self.relay_lowest:.3g}/s of sending.rate_per_second {pace.ceiling:g}/s, now {now}"
            )
        if cuts <= 0 and isinstance(self.booker, DbBooker) and not self.relay_why:  # another worker's cut, followed
            return (
                f"the SMTP relay asked another worker sharing the database to slow down: the global rate went "
                f"down to {self.relay_lowest:.3g}/s of sending.rate_per_second {pace.ceiling:g}/s, now {now}"
            )
        if cuts <= 0 and joined <= 0:  # slowed by an earlier run's cut (or one another worker made since)
            return (
                f"the SMTP relay did not ask this worker to slow down in this run, but the global rate is still "
                f"below sending.rate_per_second {pace.ceiling:g}/s (the relay's last request: "
                f"{self.relay_why[:120]}), now {now}"
            )
        return (
            f"the SMTP relay asked to slow down ({cuts} {'time' if cuts == 1 else 'times'}, last: "
            f"{self.relay_why[:120]}): the global rate went down to {self.relay_lowest:.3g}/s of "
            f"sending.rate_per_second {pace.ceiling:g}/s, now {now}"
        )


class DailyQuota:
    """Today's sends across every worker, counted in the database by the ledger's group commit: each ``sending``
    mark takes a slot in its own transaction (``Store.record_and_mark`` with ``at``'s ``DayQuota``)."""

    def __init__(self, store: AsyncStore, clock: Clock, *, quota: int, zone: str) -> None:
        self.store = store
        self.clock = clock
        self.quota = quota
        self.zone = zone

    def at(self, now: datetime) -> DayQuota | None:
        """The quota the group commit made at ``now`` counts in (None: no quota)."""
        if self.quota <= 0:
            return None
        return DayQuota(QUOTA_KEY, quota_day(now, self.zone).isoformat(), quota_day_start(now, self.zone), self.quota)

    def ends(self, day: date) -> datetime:
        """When what ``day``'s quota refused is due again: the first instant of the next shop-local day."""
        return quota_day_end(day, self.zone)

    async def room(self, wanted: int, taking: Callable[[], int] = lambda: 0) -> tuple[int, date]:
        """How many of ``wanted`` today's quota has room for as it stands, less the slots ``taking`` says this
        process's marks under way will take (a hint: the marks take the slots, and refuse once they are spent), and
        the shop-local day it told of: the clock's as the room is read, which may be a day after the batch's
        claim (what that day's quota has no room for waits until that day ends, not until the claim's day does)."""
        now = self.clock.now()
        day = quota_day(now, self.zone)
        if self.quota <= 0 or wanted <= 0:
            return wanted, day
        # (a quota set during the day: the day's sends before its first commit counted any, as that commit will)
        used = await self.store.call_retrying("daily_quota_retried", self.store.store.quota_spent, QUOTA_KEY,
                                              day.isoformat(), quota_day_start(now, self.zone))  # fmt: skip
        return quota_grant(used + taking(), self.quota, wanted), day
