"""Concurrent senders: claim → prepare → decide → limit → mark → send → record.

Theory of operation
-------------------
The producer claims due rows in batches (a lease, so no other worker takes
them) and has each batch prepared: its facts read, each message re-checked,
judged against the contact policy as the ledger stands, and rendered to MIME
bytes; in a compose helper process for full batches (``worker.composing``),
in this one for small ones. The run's ``Arbiter`` then has the last word on
every rendered message (it knows what this run sent that the ledger could not
show yet); skips, defers and render failures are recorded at once, what the
daily quota has no room left for goes back to the queue until the next local
day, and the rest go on a bounded queue. While one batch is
sent, the next is claimed and prepared.

``pool_size * in_flight_per_connection`` sender tasks take them off the queue
(more senders than connections, so the next marks are committed while the
current messages are on the wire); each waits for its own ``sending`` mark to be committed, then for one of the
pool's connections and a slot of the global rate and of the recipient domain's rate (``worker.limiter``: last, so
commit latency cannot bunch messages up on the wire; the connection first, then a slot near enough to wait for on it,
a further one waited for without it, and the next connection freed then goes to it before any sender with no slot:
``Dispatcher._slot_and_connection``, ``worker.wire``), and only then speaks SMTP. The outcome
goes back to the ledger with an attempt row. A throttling reply slows that domain down and retries the message
without counting the attempt; a 5.1.x "no such user" suppresses the address; a 5.7.x refusal at DATA or after is
logged as a content problem.
A failure before RCPT TO (connection, greeting, EHLO, STARTTLS, login, MAIL
FROM, which names the sender alone) is not the message's: it goes back to the queue without the attempt counted.
The same 4xx at RCPT TO or after for recipients at several domains in a row is the server's trouble, not the messages'
(``retry.TroubleStreak``): it is not counted either, and counts toward the pause. Too
many connection failures in a row (``sending.pause_after_failures``), or one
that every message would meet alike (a refused login; a setup that cannot work:
a relay that wants a login at MAIL FROM or RCPT TO, STARTTLS or AUTH not offered,
a certificate that fails verification, implicit TLS against a plaintext port; see
``worker.core.retry``), pause the dispatcher:
it stops claiming and gives what it holds back to the queue. If a sender or the ledger writer
fails, the run stops and raises that failure instead of waiting on a queue
nobody empties.

Where each check happens:

* planning (``worker.planning``): the campaign's rule, consent, the suppression list, one row per occasion;
* preparing the batch (``pipeline.Composer.decide``, then the run's ``Arbiter``), at the claim's time: expiry, the
  customer still there, suppression of the customer's current address and of the one the message goes to,
  consent, win-back's "ordered since" and "no longer due", the other campaigns' rules (``campaigns.still_due``),
  then the contact policy (frequency cap, quiet hours, the news week, a birthday ahead) against the ledger and
  what this run has sent;
* the ``sending`` mark itself (``Store.record_and_mark``, one transaction, after the message waited on the queue):
  again expiry, suppression of both addresses, consent, and win-back's "ordered since" / "no longer due", so an
  unsubscribe, a ``kembali suppress``, an import that withdraws consent or brings a new order, made while the
  message waited for its sender, stops it: the row ends ``skipped`` with the reason preparing would have given
  (``email_skipped``, ``skipped:<reason>`` in the report), nothing is sent. Then
  the cap across workers: a mailbox another worker is sending to, holds a higher-priority claim for, or sent to
  just before, holds the message back (``held``: back to the queue, judged again a minute later). Last, the day's
  quota: the mark takes the message's slot in the same transaction, and is refused once the day's slots are all
  taken (``daily_quota_reached``: back to the queue until the next local day). So the quota counts the messages
  marked, those that may have been handed to SMTP, across workers: a worker killed with a batch claimed took no
  slot for the messages it never marked, and a marked one given back unsent gives its slot back in the commit
  that writes it.

Not checked again at the mark: the other campaigns' rules and the contact policy (the queue holds a batch
at most, so a message waits there about ``batch_size / rate`` seconds; what these checks watch seldom changes in
that time, and a message sent then breaks no one's wish as one sent after an unsubscribe would). A change made
after the mark (the message is then ``sending``, waiting for its rate slot and a connection: about
``in_flight / rate`` seconds at most) is not seen.

All ledger writes go through one ``LedgerWriter`` task (a group commit): it
commits the marks and outcomes that piled up while the last commit ran, in one
transaction, so committing per message does not cap the throughput, while each
sender still waits for its own ``sending`` mark before the first SMTP byte. A
group whose commit fails is tried again on a new connection for ~15 s; then
the run stops, and the dispatcher keeps what was not written for its next run
(``Dispatcher.unwritten``: the daemon's sends end ``sent``, not ``uncertain``).

While the run holds rows, a lease keeper renews their leases every third of
``lease_seconds``, so however long they wait (a slow rate, a slow server) no
maintenance takes them from a live worker. Should they lapse anyway (the worker
stalled), the run never works on a row twice (``LedgerWriter.holding``), and the
store writes an outcome only over a row the worker still holds, except a send, or
a refusal over the row its attempt left uncertain (``store.Stale``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, Literal, Protocol

from worker import log
from worker.adapters.store import HELD_SECONDS, Marks, Stale
from worker.asyncstore import RETRY_SECONDS, AsyncStore, retrying
from worker.composing import ComposerPool
from worker.config import Settings, tls_port_hint
from worker.contact import Arbiter
from worker.core import lifecycle
from worker.core.limits import as_sender_refusal, as_throttled, bounce_kind, domain_of
from worker.core.policy import SendNow, Skip
from worker.core.render import sanitize_header_text
from worker.core.retry import BEFORE_DATA, PAUSES_AT_ONCE, SERVER_TROUBLE_DOMAINS, TroubleStreak, connection_failure
from worker.domain import (
    ClaimedMessage,
    Disposition,
    MessageStatus,
    Outcome,
    ProductView,
    SendResult,
    SendStage,
    SkipReason,
)
from worker.errors import TemplateError
from worker.limiter import HOLD_SECONDS, REBOOKS, WIRE_HOLD_SECONDS, DailyQuota, Later, Limiter, LocalBooker
from worker.pipeline import (
    Composed,
    Composer,
    Deferred,
    LocaleWarnings,
    RenderFailed,
    Skipped,
    enabled_campaigns,
    held_priorities,
    load_batch_facts,
    load_catalogue,
)
from worker.ports import Clock, Transport
from worker.wire import Wire

MAY_HAVE_ARRIVED = frozenset({MessageStatus.SENT, MessageStatus.UNCERTAIN})
"""Outcomes that take the mailbox's slot under the frequency cap: sent, and uncertain (it may have arrived)."""


class ClockGuard:
    """Compares this host's clock with the database's (``Store.database_now``, PostgreSQL's; SQLite has none, as
    every process on its file reads this host's clock): the leases, claims and sends are stamped on this host's
    clock, and workers whose clocks disagree by more than ``core.lifecycle.max_clock_offset`` take each other's live
    leases and miss each other's sends at the mark's frequency-cap check. ``check`` logs ``clock_off`` (an error)
    when the offset goes past it and ``clock_in_step`` when it comes back."""

    def __init__(self, store: AsyncStore, clock: Clock, lease_seconds: int) -> None:
        self.store, self.clock, self.lease_seconds = store, clock, lease_seconds
        self.offset: float | None = None
        """Seconds this host's clock was ahead of the database's (behind: negative) at the last check; None on
        SQLite, or before the first."""
        self.problem: str | None = None

    async def check(self) -> str | None:
        """Measure the offset (within half the query's round trip); what is wrong, or None."""
        before = self.clock.now()
        at = await self.store.call(self.store.store.database_now)
        after = self.clock.now()
        if at is None:
            return None
        half = (after - before) / 2
        self.offset = (before + half - at).total_seconds()
        problem = lifecycle.clock_offset_problem(self.offset, half.total_seconds(), self.lease_seconds)
        if problem and not self.problem:
            log.event("clock_off", logging.ERROR, offset_seconds=lifecycle.shown_offset(self.offset),
                      allowed_seconds=lifecycle.max_clock_offset(self.lease_seconds), reason=problem)  # fmt: skip
        elif self.problem and not problem:
            log.event("clock_in_step", logging.WARNING, offset_seconds=lifecycle.shown_offset(self.offset))
        self.problem = problem
        return problem


MAX_RENDER_ERRORS = 50
"""The distinct render errors a run's report counts apart (``DispatchReport.render_errors``)."""


@dataclass
class DispatchReport:
    outcomes: Counter[str] = field(default_factory=Counter)
    """Final statuses of this run's messages (``sent``, ``retry``, ``skipped:suppressed``…), each message once: one
    the run sent back to the queue (to wait for its domain's rate slot, a retry) then claimed again and sent counts
    as ``sent`` alone."""
    by_campaign: Counter[tuple[str, str]] = field(default_factory=Counter)
    rate_waits: Counter[str] = field(default_factory=Counter)
    """Per recipient domain, the messages of the run that waited in the queue for a slot of its rate (each once,
    however many times it waited), whatever became of them after."""
    paused: str | None = None
    """Why the dispatcher paused (too many connection failures in a row, this host's clock off the database's), or
    None."""
    clock_off: str | None = None
    """``paused`` when this host's clock is too far off the database's (``ClockGuard``), else None."""
    quota_reached: bool = False
    """The daily quota ran out; what is left waits for the next day."""
    unreachable: str | None = None
    """Why not one of the run's attempts reached the SMTP server (each met a refused or dropped connection, no reply
    or the server's own trouble), naming it, when there were some and they did not pause sending (fewer than
    ``sending.pause_after_failures``); else None. ``run --once`` says so and exits 3, as after a pause."""
    attempts_reached: int = 0
    """Attempts of the run that got past the connection to the server's reply about the message."""
    attempts_unreached: int = 0
    """Attempts of the run that did not (those the dispatcher's pause counts)."""
    relay_slowed: str | None = None
    """What the relay's own throttling did to the global rate during the run (``Limiter.relay_note``), or None."""
    remembered_peak: int = 0
    """The most sends the run's arbiter remembered beside the ledger at once (its memory; stays near
    the messages in flight however long the run)."""

    render_errors: Counter[tuple[str, int | None, str]] = field(default_factory=Counter)
    """The messages that failed to render (``failed:render_error``), by (template file under the templates' folder
    or "", its line or None, what went wrong): the first ``MAX_RENDER_ERRORS`` distinct ones, those after them in
    ``render_errors_other`` (an error quoting the customer's data is one per customer: a long run keeps a few)."""
    render_errors_other: int = 0
    """The messages that failed to render with an error not kept in ``render_errors``."""

    _back: dict[int, tuple[str, str]] = field(default_factory=dict, repr=False)
    """The (campaign, outcome) counted for each message the run sent back to the queue (a retry, a deferral), which
    it may claim again: what becomes of it then takes its place. Not those it is done with (its memory stays near the
    messages waiting, however long the run)."""
    _rate_waited: set[int] = field(default_factory=set, repr=False)
    """The messages counted in ``rate_waits`` that may come back to wait again (not those the run is done with)."""

    def count(self, message: ClaimedMessage, what: str) -> None:
        """What became of ``message``, in place of what the run counted for it before (its final outcome)."""
        before = self._back.pop(message.id, None)
        if before is not None:
            _take_one(self.outcomes, before[1])
            _take_one(self.by_campaign, before)
        if what.startswith(("retry", "deferred:")):
            self._back[message.id] = (message.campaign, what)
        else:  # done with it: it waits for its domain no more (a long run remembers only those that may come back)
            self._rate_waited.discard(message.id)
        self.outcomes[what] += 1
        self.by_campaign[(message.campaign, what)] += 1

    def render_failed(self, error: Exception) -> None:
        """A message failed to render with ``error`` (its count in ``outcomes`` is ``count``'s)."""
        # (a ledger row that cannot be read, ``LedgerRowError``, has no template)
        key = (error.template, error.line, error.reason) if isinstance(error, TemplateError) else ("", None, str(error))
        if key in self.render_errors or len(self.render_errors) < MAX_RENDER_ERRORS:
            self.render_errors[key] += 1
        else:
            self.render_errors_other += 1

    def waited_for_rate(self, message: ClaimedMessage, domain: str) -> None:
        """``message`` goes back to the queue to wait for a slot of ``domain``'s rate."""
        if message.id not in self._rate_waited:
            self._rate_waited.add(message.id)
            self.rate_waits[domain] += 1
        self.count(message, "deferred:domain_rate")


def _take_one(counter: Counter[Any], key: object) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def _back_in_queue(message: ClaimedMessage, worker: str, now: datetime, until: datetime | None = None, *,
                  counts_as_attempt: bool = True) -> Disposition:  # fmt: skip
    """A claimed row given back to the queue unsent at ``now``, due at once or ``until``, in the status
    ``lifecycle.requeued`` gives it; ``counts_as_attempt`` False gives back the attempt its claim counted."""
    return Disposition(message=message, status=lifecycle.requeued(message.attempts), worker=worker, started_at=now,
                       finished_at=now, next_attempt_at=until or now, counts_as_attempt=counts_as_attempt)


class LedgerWriter:
    """One task that commits ``sending`` marks and outcomes in groups."""

    RETRY_SECONDS: tuple[float, ...] = RETRY_SECONDS
    """The waits before a failed group commit is tried again (15.5 s in all: a database restart or failover)."""
    LINGER_SECONDS = 0.003
    """How long a small group waits for company before it is committed: each commit has a fixed cost
    (~0.2 ms of SQLite), so groups of 6 cost twice what groups of 30 do per message. Most senders
    whose mark waits hold a message for a busy connection anyway."""

    def __init__(
        self,
        store: AsyncStore,
        *,
        worker: str,
        clock: Clock,
        group: int = 1,
        quota: DailyQuota | None = None,
        capped: bool = True,
    ) -> None:
        """``group``: a group this big is committed at once; a smaller one lingers ``LINGER_SECONDS``. ``quota``: the
        daily quota, whose day at a commit's time (``DailyQuota.at``) the commit itself counts
        (``Store.record_and_mark``); None: no quota. ``capped``: whether the contact policy has a frequency cap for
        the mark to keep across workers (``Store.record_and_mark``)."""
        self.store = store
        self.quota = quota
        self.capped = capped
        self.worker = worker
        self.clock = clock
        self.group = group
        self._marks: list[tuple[ClaimedMessage, asyncio.Future[Mark]]] = []
        self._records: list[Disposition] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self.commits = 0
        """Transactions committed so far."""
        self.unmarked = 0
        """Messages put on the senders' queue whose marks are not made yet: the slots of the day's quota they will
        take (``Dispatcher._produce_with`` leaves them out of the room it sees)."""
        self.holding: set[int] = set()
        """The rows this run claimed and has not given an outcome yet (see ``Dispatcher._next_batch``)."""
        self.uncommitted: set[int] = set()
        """The rows given an outcome whose commit has not been made yet."""
        self.settled: Callable[..., None] = _ignore
        """Told ``(message id, sent=…, seq=…)`` for each outcome once it is committed (the run's arbiter)."""
        self._failed: list[Disposition] = []
        """The outcomes of the group whose commit was given up (see ``unwritten``)."""

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kembali-ledger-writer")

    async def mark_sending(self, message: ClaimedMessage) -> Mark:
        """Wait until the row's mark is committed: ``sending`` (send it; it took a slot of the day's quota),
        ``held`` (another worker is sending to the customer: it went back to the queue), ``OverQuota`` (the day's
        quota is spent: not marked, still claimed), ``lost`` (the lease was lost), or a ``SkipReason``
        (the re-check made with the mark skipped it: expired, suppressed, no consent, ordered since; the row is
        ``skipped``).
        A sender cancelled meanwhile (the run stopping) sends nothing: a row its mark made ``sending`` goes back to
        the queue."""
        future: asyncio.Future[Mark] = asyncio.get_running_loop().create_future()
        self._marks.append((message, future))
        self._poke()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                # cancelled as its mark came, before it ran again to hear it: the writer, seeing the mark taken, left
                # the row to it; nobody will send it or give it back (it would stay so until its lease lapsed, a
                # `sending` row then `uncertain`). A writer's failure instead: nothing was marked, nothing to give back
                self._given_back(message, future.result())
            raise

    def _given_back(self, message: ClaimedMessage, mark: Mark) -> None:
        """A row whose mark its sender will never act on, back to the queue: one marked ``sending``, its attempt not
        counted; one the day's quota refused, due when that day ends."""
        if mark == "sending":
            self.record(self._requeued(message, counts_as_attempt=False))
        elif isinstance(mark, OverQuota) and self.quota is not None:
            self.record(self._requeued(message, counts_as_attempt=True, until=self.quota.ends(mark.day)))

    def record(self, disposition: Disposition) -> None:
        self.holding.discard(disposition.message.id)
        self.uncommitted.add(disposition.message.id)
        self._records.append(disposition)
        self._poke()

    def _poke(self) -> None:
        self._idle.clear()
        self._wake.set()

    async def flush(self) -> None:
        """Wait until everything handed over so far is committed."""
        while self._marks or self._records or not self._idle.is_set():
            self._check_alive()
            idle = asyncio.ensure_future(self._idle.wait())
            try:
                await asyncio.wait([idle, *([self._task] if self._task else [])], return_when=asyncio.FIRST_COMPLETED)
            finally:
                idle.cancel()  # (the writer failed, or the flush was cancelled: nobody waits for it)
            self._check_alive()

    def _check_alive(self) -> None:
        if self._task is not None and self._task.done():
            self._task.result()  # re-raise the writer's failure
            raise RuntimeError("ledger writer stopped")

    def unwritten(self) -> list[Disposition]:
        """The outcomes handed over and not committed, once the writer has failed: the group it gave up on and any
        that came after, and the rows of the marks it did not make, back to the queue. The mail they tell of went
        out (or did not) all the same: the dispatcher writes them in its next run, rather than let a send the
        server took become ``uncertain`` when its lease lapses, and an unsent row wait for its lease."""
        waiting = [self._requeued(message, counts_as_attempt=True) for message, _ in self._marks]  # never tried
        return [*self._failed, *self._records, *waiting]

    async def close(self) -> None:
        await self.flush()
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def abort(self) -> None:
        """Stop now, in the middle of a commit or of its retries: what it did not commit is in ``unwritten``."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._closed and not (self._marks or self._records):
                return
            if not self._closed and len(self._marks) + len(self._records) < self.group:
                await asyncio.sleep(self.LINGER_SECONDS)
            records, self._records = self._records, []
            marks, self._marks = self._marks, []
            try:
                marked = await self._commit(records, [m.id for m, _ in marks])
                self.commits += 1
                self.unmarked -= len(marks)
                self.uncommitted.difference_update(record.message.id for record in records)
                for record in records:
                    self.settled(record.message.id, sent=record.status in MAY_HAVE_ARRIVED, seq=self.commits)
                if marked.stale:
                    _log_stale(records, marked.stale)
                refused = OverQuota(date.fromisoformat(marked.quota_day)) if marked.quota_day else None
                for message, future in marks:
                    message_id = message.id
                    if message_id in marked.over_quota and future.cancelled():
                        # not marked, still claimed, and nobody will give it back: back to the queue now (not
                        # when its lease lapses), with no attempt to take back, due when the refusing day ends
                        # (as its sender would have given it back: not due at once, to be claimed and refused again)
                        assert refused is not None
                        self._given_back(message, refused)
                    elif message_id not in marked.sending:
                        self.holding.discard(message_id)
                    elif future.cancelled():  # nobody will send it: back to the queue, the attempt not counted
                        self._given_back(message, "sending")
                    if not future.done():
                        future.set_result(
                            "sending" if message_id in marked.sending else "held" if message_id in marked.held
                            else refused if refused is not None and message_id in marked.over_quota
                            else marked.skipped.get(message_id, "lost")
                        )  # fmt: skip
            except BaseException as exc:
                # nothing is sent for these marks (their senders get the failure); should the commit have gone
                # through unheard, the row's attempt stays counted
                self._failed = [*records, *(self._requeued(message, counts_as_attempt=True) for message, _ in marks)]
                for _, future in marks:
                    if not future.done():
                        future.set_exception(exc)
                log.event("ledger_write_failed", logging.ERROR, error=log.error_line(exc), pending=len(records))
                raise
            if not (self._marks or self._records):
                self._idle.set()

    def _requeued(
        self, message: ClaimedMessage, *, counts_as_attempt: bool, until: datetime | None = None
    ) -> Disposition:
        """A marked row (or, ``counts_as_attempt``, one left claimed: the day's quota spent) given back to the queue
        unsent, due at once or ``until``."""
        return _back_in_queue(message, self.worker, self.clock.now(), until, counts_as_attempt=counts_as_attempt)

    async def _commit(self, records: list[Disposition], ids: list[int]) -> Marks:
        """One transaction, one commit: outcomes first, then the marks senders wait for. A failure (the database
        restarted, a connection dropped, SQLite busy past its timeout) rolls it back; it is tried again on a
        new connection after ``RETRY_SECONDS``, then given up (the run stops with that error; what it held
        comes back when its leases lapse)."""
        store = self.store.store
        now = self.clock.now()  # each try the same: a try after a commit whose reply was lost finds its marks by it
        quota = self.quota.at(now) if self.quota is not None else None
        return await retrying(
            "ledger_write_retried",
            lambda: self.store.call(store.record_and_mark, records, ids, worker=self.worker, now=now, quota=quota,
                                    capped=self.capped),
            self.RETRY_SECONDS, outcomes=len(records), marks=len(ids),
        )  # fmt: skip


@dataclass(frozen=True)
class OverQuota:
    """A mark the day's quota had no slot left for (``Marks.over_quota``): not made, the row still claimed."""

    day: date
    """The shop-local day whose quota refused it (``Marks.quota_day``): the row waits until the next one begins,
    however late the refusal is heard."""


Mark = Literal["sending", "held", "lost"] | OverQuota | SkipReason
"""What a row's ``sending`` mark made of it (``LedgerWriter.mark_sending``)."""
_DONE: Literal["done"] = "done"
LOCAL_CHUNK = 25
CATALOGUE_SECONDS = 60.0
"""How long a run prepares its batches with the product catalogue it read (recommendations, best sellers, the news'
picks): an import's change to the products is in the emails claimed this long after it at most."""
CANCELLED_CLOSE_SECONDS = 1.0
"""How long a cancelled run lets its ledger writer commit what it holds before stopping it (see ``run_once``)."""
"""Messages prepared in the event loop's thread between two chances for the senders to run (~8 ms)."""


@dataclass(frozen=True)
class _Batch:
    """A claimed batch, prepared."""

    now: datetime
    """When it was claimed (what its messages were judged at)."""
    items: list[Composed | Skipped | RenderFailed | Deferred]
    facts_seq: int
    """The ledger writer's commits before its facts were read (see ``contact.Arbiter``)."""
    full: bool
    """As many rows as a batch takes: more are probably due."""


async def _unless_one_fails(awaitable: Awaitable[None], watched: Sequence[asyncio.Task[None]]) -> None:
    """Await ``awaitable``; if one of ``watched`` fails first, cancel it and raise that failure (a producer
    must not wait forever on a queue nobody empties)."""
    main = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({main, *watched}, return_when=asyncio.FIRST_COMPLETED)
            if main in done:
                main.result()
                return
            for task in done:
                if task.cancelled():
                    raise asyncio.CancelledError(f"{task.get_name()} was cancelled")
                failure = task.exception()
                if failure is not None:
                    raise failure
            watched = [task for task in watched if not task.done()]
    finally:
        if not main.done():
            main.cancel()
            with contextlib.suppress(BaseException):
                await main


class SendObserver(Protocol):
    """Told about every message the dispatcher finishes (metrics, health lines)."""

    def observe_result(self, campaign: str, result: str, outcome: str | None, seconds: float | None, at: float) -> None:
        """``result``: sent, retry, failed, uncertain or skipped:<reason>; ``outcome`` and ``seconds``
        when an SMTP attempt was made; ``at`` on the monotonic clock."""
        ...


class Dispatcher:
    """Sends what is due until the queue is empty (``run_once``) or told to stop."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: AsyncStore,
        composer: Composer,
        transport: Transport,
        clock: Clock,
        worker: str,
        limiter: Limiter | None = None,
        quota: DailyQuota | None = None,
        compose_pool: ComposerPool | None = None,
        clock_guard: ClockGuard | None = None,
    ) -> None:
        self.settings = settings
        self.clock_guard = clock_guard
        """Checks this host's clock against the database's before each run and at each lease renewal; None: not
        checked (a simulated clock)."""
        self._clock_paused = False
        self.store = store
        self.composer = composer
        self.compose_pool = compose_pool
        """Renders big batches in helper processes (``worker.composing``); None: all in this thread."""
        self.transport = transport
        self.clock = clock
        self.worker = worker
        self.limiter = limiter or Limiter(settings.sending, clock, LocalBooker(clock))
        self.quota = quota or DailyQuota(store, clock, quota=settings.sending.daily_quota, zone=settings.shop.time_zone)
        self.stopping = asyncio.Event()
        self._campaigns = enabled_campaigns(settings)
        """What a claim takes: a campaign turned off sends nothing more, what it planned waits until it is on again
        (or expires). Read once, as the settings a dispatcher has never change (a reload makes a new one)."""
        self._held_priorities = held_priorities(settings)
        self.held: Callable[[], bool] = lambda: False
        """While this says so, claim nothing more (the run ends after what it holds): the daemon holds it while a
        planning pass is under way, so the messages of a pass that finished first (a low priority) do not take
        the slots of those of a pass still running (a higher one) before the claim can order them."""
        self.observer: SendObserver | None = None
        self.paused: str | None = None
        """Set when too many connection failures in a row, a refused login or an SMTP setup that cannot work
        paused sending (health checks read it)."""
        self.paused_setting: str | None = None
        """The setting an SMTP setup problem that paused sending names (``SendResult.setup``): the daemon waits an
        hour at least after ``sending.daily_quota``, the provider's daily limit."""
        self.paused_retry_after: float | None = None
        """The server's own "try again in N seconds" in the reply that paused sending
        (``SendResult.retry_after_seconds``): the daemon waits that long at least before it tries the server again."""
        self.failures_in_row = 0
        self.trouble = TroubleStreak()
        """The same temporary failure in a row at RCPT TO or after: the server's own once recipients at several
        domains met it (kept across pauses: a daemon that tries again finds it still there)."""
        self.pauses_in_row = 0
        """Pauses since the last attempt that got past the connection (a daemon waits longer after each)."""
        self._quota_resumes: datetime | None = None
        """Once this run's quota is reached: when the day after the latest one whose quota refused its messages
        begins (None: not reached)."""
        self._quota_told: date | None = None
        """The last shop-local day whose quota's end this dispatcher logged (``daily_quota_reached``)."""
        self._last_unreached = ""
        """The reply (or error) of the last attempt that did not reach the server."""
        self._rate_later: list[datetime] = []
        """When the messages this run sent back to the queue to wait for their recipient domain's slot come due."""
        self._learning: dict[str, asyncio.Future[list[datetime]]] = {}
        """Per domain, the read of the messages waiting in the ledger for it (``_learn_waiting``)."""
        self._runs = 0
        """The number of the product catalogue batches are prepared with: a new one each run, and every
        ``CATALOGUE_SECONDS`` within one (``_fresh_catalogue``)."""
        self._run_began = (-1, datetime.min)
        """The catalogue number ``_next_batch`` last saw, and when it saw it first."""
        self._catalogue: list[ProductView] = []
        """The product catalogue, read once per ``_runs`` (when batches are prepared in this process)."""
        self._catalogue_run = -1
        self._on_wire: set[asyncio.Future[None]] = set()
        """One for each send under way, done once its outcome is handed to the writer."""
        self._locales = LocaleWarnings()
        self._failing = False
        """The run is failing: no send begins any more (those on the wire go on to their replies)."""
        self._writer: LedgerWriter | None = None
        """The ledger writer of the run under way, if any (``holds``)."""
        self.unwritten: list[Disposition] = []
        """Outcomes a failed run could not commit (the database gone longer than the writer's retries), written
        first by the next run before it claims anything: a daemon's sends the server took end ``sent``, not
        ``uncertain`` at their leases' end, however long the database was away."""
        self._given_back = 0
        """Claimed messages this run gave back unbegun, due at once (stopped, paused): ``claims_given_back``."""

    def close(self) -> None:
        """Stop the compose helper processes, if any (a later ``run_once`` starts them again)."""
        if self.compose_pool is not None:
            self.compose_pool.close()

    def holds(self) -> set[int]:
        """The rows whose outcome this dispatcher has yet to write: those the run under way holds, and those kept
        through a database outage (``unwritten``). Their leases may lapse while the database is away, but this
        process is alive and knows what became of them: its own maintenance must not take them for a dead
        worker's (a row it never sent would become ``uncertain``, and its outcome come too late to undo that)."""
        held = {d.message.id for d in self.unwritten}
        if self._writer is not None:
            held |= self._writer.holding | self._writer.uncommitted | {d.message.id for d in self._writer.unwritten()}
        return held

    def stop(self) -> None:
        """Stop claiming; sends already under way finish, claimed messages not yet begun go back to the queue."""
        self.stopping.set()

    def resume(self, why: str = "resumed by the operator") -> None:
        """Clear a pause (the daemon tries the server again, or an operator fixed it): the next ``run_once``
        claims again. ``pauses_in_row`` stays until a send gets past the connection."""
        if self.paused is not None:
            log.event("dispatcher_resumed", logging.WARNING, why=why, was=self.paused)
        self.paused = None
        self.paused_setting = None
        self.paused_retry_after = None
        self._clock_paused = False
        self.failures_in_row = 0
        self.stopping.clear()

    @property
    def clock_paused(self) -> bool:
        """Whether the pause is this host's clock's (``pause_for_clock``), not the SMTP server's."""
        return self.paused is not None and self._clock_paused

    def pause_for_clock(self, problem: str) -> None:
        """This host's clock is too far off the database's (``ClockGuard``): claim nothing more until it is right
        (what is on the wire finishes, what is claimed goes back to the queue). Not counted as a pause in a row: the
        daemon tries again after ``sending.pause_retry_seconds`` each time, and the next run checks again."""
        if self.paused is None:
            self.paused, self._clock_paused = problem, True
        self.stop()

    def _observe_failures(self, result: SendResult, domain: str) -> bool:
        """Count attempts that failed before RCPT TO (the connection, greeting, EHLO, STARTTLS, login, MAIL FROM), got
        no reply at all, or met the server's own trouble (the same temporary failure for recipients at
        ``SERVER_TROUBLE_DOMAINS`` different domains in a row: ``retry.TroubleStreak``); too many in a row, or one
        that every message would meet alike (a refused login, an SMTP setup that cannot work:
        ``retry.PAUSES_AT_ONCE``), pause the dispatcher. Returns whether the attempt met the server's trouble (it
        is not counted against the message)."""
        trouble = connection_failure(result)
        streak_before = self.trouble.confirmed
        servers = self.trouble.observe(result, domain)
        no_reply = result.code is None and result.outcome in (Outcome.TRANSIENT, Outcome.AMBIGUOUS)
        if trouble is None and not servers and not no_reply:
            self.failures_in_row = 0
            self.pauses_in_row = 0
            return False
        # the streak just turned out the server's: the failures of it so far were in a row too
        self.failures_in_row += self.trouble.count if servers and not streak_before else 1
        limit = self.settings.sending.pause_after_failures
        if not limit or self.paused is not None:
            return servers
        smtp = self.settings.smtp
        # the server's reply as every line that gives the pause's reason shows it (dispatcher_retry_scheduled,
        # dispatcher_resumed, the run's summary): it may quote the recipient, whose address is masked there too
        reply = log.mask_addresses(result.reply, keep=(self.settings.shop.from_address, smtp.username))
        if trouble in PAUSES_AT_ONCE:  # every message would fail alike until something is fixed: pause at once
            if trouble == "setup":
                # the reply names host:port and the fix
                what = ("the provider's daily sending limit" if result.setup == "sending.daily_quota"  # nothing to fix
                        else "an SMTP setup problem")  # fmt: skip
                self.paused = f"{what} ({result.setup}): {reply}"
                self.paused_setting = result.setup
            elif result.code is not None and 400 <= result.code < 500:
                # "454 4.7.0 Temporary authentication failure" (its login service down), Gmail's "too many login
                # attempts": every login would meet it for now, but the password is not what to check
                self.paused = (
                    f"{smtp.host}:{smtp.port} refuses logins for now ({reply[:120]}): a temporary refusal on the "
                    "server's side (its login service down, or too many logins), not a wrong password; sending "
                    "tries the login again later"
                )
            else:
                self.paused = (
                    f"an SMTP authentication failure ({reply[:120]}): check smtp.username "
                    f"({smtp.username!r}) and the password in ${smtp.password_env}"
                )
        elif self.failures_in_row >= limit and servers:
            where = {"rcpt": "RCPT TO", "data": "DATA"}.get(result.stage, "the end of the message")
            self.paused = (
                f"{self.failures_in_row} failures in a row, the server's own trouble: {smtp.host}:{smtp.port} gives "
                f"recipients at {SERVER_TROUBLE_DOMAINS} or more different domains the same temporary failure "
                f"at {where} (last: {reply[:120]})"
            )
        elif self.failures_in_row >= limit:
            hint = tls_port_hint(smtp)
            self.paused = (
                f"{self.failures_in_row} connection failures in a row (last: {result.error_type or 'no reply'}: "
                f"{reply[:120]})" + (f"; {hint}" if hint else "")
            )
        else:
            return servers
        self.paused_retry_after = result.retry_after_seconds
        self.pauses_in_row += 1
        log.event(
            "dispatcher_paused", logging.ERROR, reason=self.paused, smtp_host=smtp.host,
            failures_in_row=self.failures_in_row, code=result.code, stage=result.stage,
            **({"setting": result.setup} if result.setup else {}),
        )  # fmt: skip
        self.stop()
        return servers

    def _release(self, message: ClaimedMessage, now: datetime, until: datetime | None = None, *,
                 counts_as_attempt: bool = True) -> Disposition:  # fmt: skip
        """Give a claimed, unsent row back to the queue (stopped, paused, or out of quota): no attempt made."""
        return _back_in_queue(message, self.worker, now, until, counts_as_attempt=counts_as_attempt)

    def _give_back(self, message: ClaimedMessage, now: datetime) -> Disposition:
        """``_release`` of a claimed message the run stops (or pauses) before it began, due at once; counted."""
        self._given_back += 1
        return self._release(message, now)

    async def run_once(self) -> DispatchReport:
        """Send what is due, batch after batch, until nothing is (or stopped, paused, out of quota).
        If a sender or the ledger writer fails, the run begins no more sends, lets those on the wire finish (at most
        ``smtp.timeout_seconds`` and ``smtp.final_reply_timeout_seconds`` together) and raises that failure; what was
        claimed and not begun goes back to the queue (or, when the writer failed, is kept in ``unwritten`` with the
        outcomes it could not write, for the next run to write first)."""
        if self.clock_guard is not None and (problem := await self.clock_guard.check()):
            self.pause_for_clock(problem)
            await self._write_unwritten_alone()
            return DispatchReport(paused=self.paused, clock_off=problem if self._clock_paused else None)
        self._given_back = 0
        try:
            report = await self._run_once()
        finally:
            self._writer = None
        if self._given_back:  # (written: the run's writer closed) another worker takes them at once, not a lease later
            log.event("claims_given_back", messages=self._given_back,
                      why="paused" if self.paused is not None else "stopping" if self.stopping.is_set() else "",
                      note="claimed and not begun: back in the queue, due now, no attempt counted")  # fmt: skip
            self._given_back = 0
        return report

    async def _run_once(self) -> DispatchReport:
        self._runs += 1
        self._failing, self._on_wire = False, set()
        self._quota_resumes = None  # a new run, perhaps a new day: the quota tells (a daemon keeps its dispatcher)
        report = DispatchReport()
        relay_cuts, relay_joined = self.limiter.relay_cuts, self.limiter.relay_joined
        in_flight = self.settings.smtp.pool_size * self.settings.sending.in_flight_per_connection
        capped = bool(self.settings.policy.frequency_caps)
        writer = self._writer = LedgerWriter(self.store, worker=self.worker, clock=self.clock, group=in_flight // 2,
                                             quota=self.quota, capped=capped)  # fmt: skip
        writer.start()
        queue: asyncio.Queue[Composed | Literal["done"]] = asyncio.Queue(maxsize=self.settings.sending.batch_size)
        wire = Wire(self.settings.smtp.pool_size)
        self._rate_later = []
        senders: list[asyncio.Task[None]] = []
        keeper = asyncio.create_task(self._keep_leases(writer), name="kembali-lease-keeper")
        try:
            await self._write_unwritten(writer)
            while True:
                senders = [
                    asyncio.create_task(self._sender(queue, writer, report, wire), name=f"kembali-sender-{i}")
                    for i in range(in_flight)
                ]
                await _unless_one_fails(self._produce(queue, writer, report), senders)
                for _ in senders:
                    await _unless_one_fails(queue.put(_DONE), senders)
                await asyncio.gather(*senders)
                # what this run sent back to the queue to wait for its domain's slot comes due again in seconds: the
                # run waits for it and claims again (a cron's `run --once` sends a slow domain's backlog at its rate,
                # not one message a run), once what it sent is in the ledger for the contact policy's next judgement
                wait = self._rate_wait()
                if wait is None:
                    break
                await writer.flush()
                await self.limiter.sleep(wait, self.stopping)
                if self.stopping.is_set():
                    break
                self._runs += 1  # what it claims now reads the catalogue as of now, as a new run would
        except BaseException as failure:
            self._failing = True
            now = self.clock.now()
            while not queue.empty():  # claimed, never begun: back to the queue (if the writer still can)
                item = queue.get_nowait()
                if item != _DONE:
                    assert isinstance(item, Composed)
                    writer.record(self._give_back(item.message, now))
            if isinstance(failure, Exception) and self._on_wire:
                # failing (the database gone, say), not cancelled: the messages on the wire go on to the server's
                # reply (cut off, they would stay `sending` and become `uncertain`), their outcomes kept with the
                # rest (``unwritten``); the time of the last commands at most
                try:
                    smtp = self.settings.smtp
                    last_commands = smtp.timeout_seconds + smtp.final_reply_timeout_seconds
                    await asyncio.wait(set(self._on_wire), timeout=last_commands)
                except asyncio.CancelledError:  # cancelled meanwhile (a shutdown): the senders are cut off below
                    failure = asyncio.CancelledError()
            for task in senders:
                task.cancel()
            await asyncio.gather(*senders, return_exceptions=True)
            if isinstance(failure, asyncio.CancelledError):
                await _close_cut_short(writer)
            else:
                with contextlib.suppress(Exception):  # the writer's own failure is what is being raised
                    await writer.close()
            self._keep_unwritten(writer)
            raise failure
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        try:
            await writer.close()
        except BaseException as failure:
            if isinstance(failure, asyncio.CancelledError):
                await _close_cut_short(writer)
            self._keep_unwritten(writer)
            raise
        with contextlib.suppress(Exception):  # the run's last cut, for the others to follow (and the log to tell);
            await self.limiter.share_cut()  # a database gone meanwhile: its retries are logged, the run's done
        report.paused = self.paused
        report.relay_slowed = self.limiter.relay_note(relay_cuts, relay_joined)
        report.clock_off = self.paused if self._clock_paused else None
        report.quota_reached = self.quota_reached
        if report.attempts_unreached and not report.attempts_reached and self.paused is None:
            smtp = self.settings.smtp
            hint = tls_port_hint(smtp)
            report.unreachable = (
                f"not one of this run's {report.attempts_unreached} attempts got through to the SMTP server "
                f"{smtp.host}:{smtp.port} (last: {self._last_unreached[:120]})" + (f"; {hint}" if hint else "")
            )
        return report

    def _rate_wait(self) -> float | None:
        """Seconds until the first message this run sent back to the queue for its domain's slot comes due, or None
        when there is none, or the run is stopping, paused or out of the day's quota. At most
        ``schedule.dispatch_poll_seconds``: what else comes due meanwhile (a retry, another worker's plan, to any
        domain) is claimed as the daemon's poll would, not when a slow domain's slot, minutes off, comes."""
        now = self.clock.now()
        self._rate_later = [at for at in self._rate_later if at > now]  # those come due were claimed (or taken)
        if not self._rate_later or self.stopping.is_set() or self.paused is not None or self.quota_reached:
            return None
        return min((min(self._rate_later) - now).total_seconds(), self.settings.schedule.dispatch_poll_seconds)

    def hand_over_unwritten(self, to: Dispatcher) -> None:
        """Give what this dispatcher's runs could not write to ``to`` (a reload's), whose next run writes it first."""
        to.unwritten += self.unwritten
        self.unwritten = []

    async def write_kept(self, timeout: float) -> list[Disposition]:
        """Write what the last runs could not (``unwritten``), trying for at most ``timeout`` seconds: a daemon told to
        stop while the database was away records the sends the server took, should the database come back in its
        grace period. What is still unwritten at the end (logged by ``outcomes_not_written``)."""
        deadline = time.monotonic() + timeout
        while self.unwritten and (left := deadline - time.monotonic()) > 0:
            writer = self._writer = LedgerWriter(self.store, worker=self.worker, clock=self.clock, quota=self.quota)
            writer.start()
            try:
                await asyncio.wait_for(self._write_unwritten(writer), left)
                await writer.close()
            except Exception:  # the database still away (the writer gave up, or the time ran out)
                await writer.abort()
                self._keep_unwritten(writer)
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            finally:
                self._writer = None
        return self.unwritten

    async def _write_unwritten(self, writer: LedgerWriter) -> None:
        """Commit what the last run could not, before claiming: the facts of the next batches must show it."""
        if not self.unwritten:
            return
        carried, self.unwritten = self.unwritten, []
        for disposition in carried:
            writer.record(disposition)
        await writer.flush()
        log.event("outcomes_written_late", logging.WARNING, outcomes=len(carried),
                  sent=sum(1 for d in carried if d.status is MessageStatus.SENT))  # fmt: skip

    async def _write_unwritten_alone(self) -> None:
        """Commit what the last run could not (a database outage), though this run sends nothing (the clock is off):
        sends the server took, left ``sending``, would become ``uncertain`` at another worker's maintenance once their
        leases lapse, and the rows given back would stay claimed until then. Their outcomes were stamped when they
        happened; a failure keeps them for the next run, as any run's."""
        if not self.unwritten:
            return
        in_flight = self.settings.smtp.pool_size * self.settings.sending.in_flight_per_connection
        writer = LedgerWriter(self.store, worker=self.worker, clock=self.clock, group=in_flight // 2,
                              quota=self.quota)  # fmt: skip
        writer.start()
        try:
            await self._write_unwritten(writer)
        except asyncio.CancelledError:
            await _close_cut_short(writer)
            self._keep_unwritten(writer)
            raise
        except Exception:
            with contextlib.suppress(Exception):  # the writer's own failure is what is being raised
                await writer.close()
            self._keep_unwritten(writer)
            raise
        await writer.close()

    def _keep_unwritten(self, writer: LedgerWriter) -> None:
        self.unwritten = writer.unwritten()
        if self.unwritten:
            sent = [d.message.id for d in self.unwritten if d.status is MessageStatus.SENT]
            log.event("outcomes_not_written", logging.ERROR, outcomes=len(self.unwritten), sent=len(sent),
                      sent_ids=",".join(map(str, sent)),
                      note="kept to be written by the next run; should the process end first, the rows sent "
                      "become uncertain when their leases lapse: the server took the messages sent_ids names, "
                      "so `kembali ledger close --as sent <id>…` records them")  # fmt: skip

    async def _keep_leases(self, writer: LedgerWriter) -> None:
        """Renew the leases of the rows this run holds, every third of a lease: however long they wait for the
        rate (or a slow server), nobody's maintenance takes them while this worker is alive. A renewal that
        fails is logged and tried again at the next beat; if none succeeds, the leases lapse as a dead
        worker's would. Only this run's rows: those an earlier run of this process left when it failed lapse
        (back to the queue, or `uncertain` if they were on the wire), however long this one lasts."""
        lease = self.settings.sending.lease_seconds
        while True:
            await asyncio.sleep(lease / 3)
            off: float | None = None
            with contextlib.suppress(Exception):  # (a database that cannot be read: the renewal says so)
                if self.clock_guard is not None and (problem := await self.clock_guard.check()):
                    self.pause_for_clock(problem)
                    off = self.clock_guard.offset
            # compared first: renewed on a clock minutes behind, the leases of the rows this run still sends or gives
            # back would have lapsed minutes ago, for another worker's maintenance to take; on the database's time
            # they stay live while the run winds down
            now = self.clock.now() - timedelta(seconds=off or 0)
            try:
                await self.store.call(self.store.store.renew_leases, worker=self.worker, now=now,
                                      lease_seconds=lease, ids=writer.holding | writer.uncommitted)  # fmt: skip
            except Exception as exc:
                log.event("lease_renewal_failed", logging.WARNING, error=log.error_line(exc))

    async def _produce(
        self, queue: asyncio.Queue[Composed | Literal["done"]], writer: LedgerWriter, report: DispatchReport
    ) -> None:
        arbiter = self.composer.new_arbiter()
        writer.settled = arbiter.settled  # each committed outcome: the arbiter forgets or waits for the ledger
        try:
            await self._produce_with(arbiter, queue, writer, report)
        finally:
            report.remembered_peak = max(report.remembered_peak, arbiter.peak)

    async def _produce_with(
        self,
        arbiter: Arbiter,
        queue: asyncio.Queue[Composed | Literal["done"]],
        writer: LedgerWriter,
        report: DispatchReport,
    ) -> None:
        ahead: asyncio.Task[_Batch | None] | None = asyncio.create_task(self._next_batch(writer))
        try:
            while ahead is not None:
                got = await ahead
                ahead = None
                if got is None:
                    return
                if got.full and self.compose_pool is not None:
                    # a full batch: more is due. Start the helpers (in the background: batches are prepared
                    # here until they are up), claim the next batch and have it prepared while this one is
                    # queued and sent, so the senders never wait.
                    self.compose_pool.start()
                    ahead = asyncio.create_task(self._next_batch(writer))
                now = got.now
                composed: list[Composed] = []
                for item in got.items:
                    if isinstance(item, Composed):
                        self._locales.note(item.customer)
                        decided = self._arbitrate(item, arbiter, now, got.facts_seq)
                        if decided is item:
                            composed.append(item)
                            continue
                        item = decided
                    message = item.message
                    if isinstance(item, Deferred):  # the contact policy: not yet (cap or quiet hours)
                        writer.record(self._release(message, now, until=item.until))
                        report.count(message, f"deferred:{item.why}")
                        log.event("email_deferred_by_policy", campaign=message.campaign,
                                  dedupe_key=message.dedupe_key, customer=item.customer,
                                  to=log.mask_email(message.email), until=item.until.isoformat(), why=item.why)
                    else:
                        assert not isinstance(item, Composed)
                        writer.record(self._not_sent(item, now))
                        self._count_not_sent(item, report)
                # every batch still to come was read after this one: what it could see, they see
                arbiter.forget_visible(got.facts_seq)
                # what the day's quota has room for, as it stands (each mark takes its slot, and refuses the mark
                # once the quota is spent: workers side by side may leave one another less room than this tells)
                granted, day = await self.quota.room(len(composed), taking=lambda: writer.unmarked)
                if granted < len(composed):  # (the room's day decides: a batch claimed before midnight may be told
                    # it by the new day's quota, and waits until that day ends, not to be claimed again at once)
                    self._quota_reached(composed[granted:], writer, now, day)
                for index, item in enumerate(composed[:granted]):
                    if self.stopping.is_set():
                        for left in composed[index:granted]:
                            writer.record(self._give_back(left.message, now))
                        return
                    writer.unmarked += 1
                    await queue.put(item)
                if self.quota_reached:
                    return
                if ahead is None:
                    ahead = asyncio.create_task(self._next_batch(writer))
        except BaseException:
            if ahead is not None:  # failing or cancelled: do not wait for it; its leases lapse
                ahead.cancel()
                ahead = None
            raise
        finally:
            if ahead is not None:
                await self._give_back_ahead(ahead, writer)

    @staticmethod
    def _arbitrate(item: Composed, arbiter: Arbiter, now: datetime, facts_seq: int) -> Composed | Skipped | Deferred:
        """The run's arbiter has the last word: the helper judged against the ledger alone (the cap, a birthday
        offer planned ahead keeping its slot, and the news week count this run's sends too)."""
        decision = arbiter.decide(item.message, item.customer, item.sent, now, facts_seq, item.birthdays_ahead)
        if isinstance(decision, SendNow):
            return item
        if isinstance(decision, Skip):
            return Skipped(item.message, decision.reason, item.customer.external_id)
        return Deferred(item.message, decision.at, decision.why, item.customer.time_zone, item.customer.external_id)

    def _fresh_catalogue(self, now: datetime) -> None:
        """A batch claimed ``CATALOGUE_SECONDS`` after the run's catalogue was first used reads it again, as a new
        run would: a run may send a backlog for hours, and a product an import marks no longer sold (or reprices)
        since is in no email claimed a minute later."""
        runs, began = self._run_began
        if runs == self._runs and (now - began).total_seconds() >= CATALOGUE_SECONDS:
            self._runs += 1
        if runs != self._runs:
            self._run_began = (self._runs, now)

    async def _next_batch(self, writer: LedgerWriter) -> _Batch | None:
        """Claim the next batch and prepare it (in the helper when the batch is big enough); None when
        stopping or nothing is due. Batches are decided in claim order by the run's arbiter."""
        if self.stopping.is_set() or self.held():
            return None
        store = self.store.store
        now = self.clock.now()
        if self.quota.quota > 0 and not (spent := await self.quota.room(1))[0]:
            # the day's quota spent: nothing claimed, so the runs a daemon makes meanwhile do not send the whole queue
            # to wait for the next day batch by batch (a reload that raises the quota sends it that day); the run says
            # so if a message is due
            if await self.store.call(store.any_due, now, campaigns=self._campaigns):
                self._quota_reached([], writer, now, spent[1])
            return None
        self._fresh_catalogue(now)
        limit = self.settings.sending.batch_size
        try:  # a stop ends the retries: a claim that failed claimed nothing (one whose reply was lost, rows that lapse)
            batch = await self.store.call_retrying_until(
                self.stopping, "claim_retried", store.claim, worker=self.worker, now=now, limit=limit,
                lease_seconds=self.settings.sending.lease_seconds, domain=self.settings.shop.domain,
                campaigns=self._campaigns, held_priorities=self._held_priorities)  # fmt: skip
        except Exception:
            if self.stopping.is_set():
                return None
            raise
        if not batch:
            return None
        full = len(batch) == limit
        again = [message for message in batch if message.id in writer.holding]
        if again:
            # rows whose lease lapsed while this run held them (the worker stalled longer than a lease), claimed
            # again: the copy already held goes on; a second copy would race it for one row
            log.event("claimed_again_while_held", logging.WARNING, messages=len(again),
                      dedupe_keys=[message.dedupe_key for message in again[:5]])  # fmt: skip
            batch = [message for message in batch if message.id not in writer.holding]
        writer.holding.update(message.id for message in batch)
        facts_seq = writer.commits  # read before the facts: every commit counted here is in them
        items: list[Composed | Skipped | RenderFailed | Deferred] | None = None
        if self.compose_pool is not None and self.compose_pool.wanted(len(batch)):
            try:
                items = await self.compose_pool.prepare(batch, now, run=self._runs)
            except Exception as exc:  # the helper could not read the facts (the database restarting): read them here
                log.event("compose_facts_failed", logging.WARNING, error=log.error_line(exc), messages=len(batch))
        if items is None:
            if self._catalogue_run != self._runs:
                self._catalogue = await self.store.call_retrying("facts_read_retried", load_catalogue, store, now)
                self._catalogue_run = self._runs
            facts = await self.store.call_retrying("facts_read_retried", load_batch_facts, store, batch,
                                                   self._catalogue, settings=self.settings, now=now)  # fmt: skip
            items = []
            for start in range(0, len(batch), LOCAL_CHUNK):
                items += [self.composer.prepare(message, facts, now) for message in batch[start : start + LOCAL_CHUNK]]
                await asyncio.sleep(0)  # let the senders read their replies between chunks
        return _Batch(now, items, facts_seq, full=full)

    async def _give_back_ahead(self, ahead: asyncio.Task[_Batch | None], writer: LedgerWriter) -> None:
        """A batch claimed ahead that will not be sent (stopped, out of quota, failed): back to the queue."""
        got = await ahead
        if got is None:
            return
        # the refusal's day decides, not the claim's: a batch claimed after local midnight would wait a day too long
        until = self._quota_resumes
        for item in got.items:
            writer.record(self._release(item.message, got.now, until=until) if until else
                          self._give_back(item.message, got.now))

    @property
    def quota_reached(self) -> bool:
        """Whether the day's quota refused some of this run's messages."""
        return self._quota_resumes is not None

    def _quota_reached(self, items: list[Composed], writer: LedgerWriter, now: datetime, day: date) -> None:
        """``day``'s quota had no slot left for ``items``: back to the queue until the next day begins, whenever the
        refusal is heard (one heard after local midnight makes them due at once, not a day later)."""
        resumes = self.quota.ends(day)
        for item in items:
            writer.record(self._release(item.message, now, until=resumes))
        first = self._quota_told != day  # (said once a day: a daemon's runs find it spent until the day ends)
        self._quota_told = day
        self._quota_resumes = max(resumes, self._quota_resumes or resumes)
        if first:
            log.event(
                "daily_quota_reached", logging.WARNING, quota=self.settings.sending.daily_quota,
                waiting=len(items), resumes_at=resumes.isoformat(),
            )  # fmt: skip

    def _count_not_sent(self, item: Skipped | RenderFailed, report: DispatchReport) -> None:
        report.count(item.message, _label(item))
        if isinstance(item, RenderFailed):
            report.render_failed(item.error)
        if self.observer is not None:
            self.observer.observe_result(item.message.campaign, _label(item), None, None, self.clock.monotonic())

    def _skipped(self, item: Skipped, report: DispatchReport) -> None:
        """A skip the mark's re-check made (the row is written ``skipped`` by the mark): told as one made when the
        batch was prepared is."""
        _log_skipped(item)
        self._count_not_sent(item, report)

    def _not_sent(self, item: Skipped | RenderFailed, now: datetime) -> Disposition:
        if isinstance(item, Skipped):
            _log_skipped(item)
            return Disposition(
                message=item.message,
                status=MessageStatus.SKIPPED,
                worker=self.worker,
                started_at=now,
                finished_at=now,
                skip_reason=item.reason,
            )
        log.event(
            "email_render_failed",
            logging.ERROR,
            campaign=item.message.campaign,
            dedupe_key=item.message.dedupe_key,
            customer=item.customer,
            to=log.mask_email(item.message.email),
            error=str(item.error),
        )
        return Disposition(
            message=item.message,
            status=MessageStatus.FAILED,
            worker=self.worker,
            started_at=now,
            finished_at=now,
            result=SendResult(Outcome.RENDER_ERROR, None, str(item.error)[:500], type(item.error).__name__),
        )

    async def _sender(
        self,
        queue: asyncio.Queue[Composed | Literal["done"]],
        writer: LedgerWriter,
        report: DispatchReport,
        wire: Wire,
    ) -> None:
        """Send the queue's messages one by one (one of ``pool_size * in_flight_per_connection`` such tasks). ``wire``
        counts the pool's connections: a sender that waited for one while the run was told to stop gives its
        message back instead of starting a send."""
        sender = self.settings.shop.from_address
        while True:
            item = await queue.get()
            if item == _DONE:
                return
            assert isinstance(item, Composed)
            message = item.message
            domain = domain_of(message.email)
            if self.stopping.is_set():  # stopped or paused: not begun, back to the queue
                writer.unmarked -= 1
                writer.record(self._give_back(message, self.clock.now()))
                continue
            mark = await writer.mark_sending(message)
            if mark != "sending":
                writer.settled(message.id, sent=False, seq=writer.commits)  # it takes no slot after all
                if isinstance(mark, SkipReason):  # the mark's re-check: the row is skipped, as at prepare time
                    self._skipped(Skipped(message, mark, item.customer.external_id), report)
                elif isinstance(mark, OverQuota):  # the day's quota spent (other workers took the rest)
                    self._quota_reached([item], writer, self.clock.now(), mark.day)
                elif mark == "held":
                    log.event("email_held_back", campaign=message.campaign, dedupe_key=message.dedupe_key,
                              customer=item.customer.external_id, to=log.mask_email(message.email),
                              retry_in_seconds=HELD_SECONDS,
                              why="another worker is sending to this mailbox, or another worker or an earlier "
                                  "run sent to it from a minute before the claim (the frequency cap across "
                                  "workers)")  # fmt: skip
                    report.count(message, "deferred:another_worker")
                else:
                    log.event("email_lease_lost", logging.WARNING, campaign=message.campaign,
                              dedupe_key=message.dedupe_key, customer=item.customer.external_id,
                              to=log.mask_email(message.email))  # fmt: skip
                # nor a slot of the day's quota: only a mark takes one (whoever marks a row lost here takes their own)
                continue
            result: SendResult | None = None
            begun, where = False, SendStage()
            on_wire = asyncio.get_running_loop().create_future()
            try:
                # the rate slot is taken last, right before the first SMTP byte, so commit latency (nor a wait for
                # a connection) cannot bunch messages up on the wire; a stop ends the wait (its message has not begun)
                slot = await self._slot_and_connection(domain, message.id, wire)
                if isinstance(slot, Later):  # the domain's slot is far off: wait in the ledger, not in a sender
                    if not self.limiter.knows(domain):  # the first to: a slot clear of those already waiting there
                        await self._learn_waiting(domain)
                        slot = self.limiter.tell_again(domain, message.id, interval=self.limiter.limits(domain)[-1][1])
                    now = self.clock.now()
                    until = now + timedelta(seconds=slot.seconds)
                    writer.record(self._release(message, now, until=until, counts_as_attempt=False))
                    report.waited_for_rate(message, domain)
                    self._rate_later.append(until)
                    log.event("email_waits_for_domain_rate", campaign=message.campaign,
                              dedupe_key=message.dedupe_key, customer=item.customer.external_id,
                              to=log.mask_email(message.email), domain=domain, until=until.isoformat(),
                              retry_in_seconds=round(slot.seconds, 1))  # fmt: skip
                    continue
                try:  # one of the pool's connections is this sender's: the send begins now, or not at all
                    if not (self.stopping.is_set() or self._failing):
                        started = self.clock.now()
                        started_mono = self.clock.monotonic()
                        begun = True
                        self._on_wire.add(on_wire)
                        result = as_throttled(await self.transport.send(sender, message.email, item.data, where))
                        finished = self.clock.now()
                        finished_mono = self.clock.monotonic()
                finally:
                    wire.release()
            except BaseException:
                # the run is failing (the rate's database gone past its retries) or being cancelled (a shutdown's
                # grace period over): a message whose first SMTP byte was not sent, or cut off before the DATA
                # command, nothing of it sent, goes back to the queue, not to `uncertain` at its lease's end (or at
                # the shutdown's ``abandon``); one cut off at DATA or after may have arrived: left to those
                self._off_wire(on_wire)
                if not begun or where.stage in BEFORE_DATA:
                    writer.record(self._release(message, self.clock.now(), counts_as_attempt=False))
                raise
            if result is None:  # stopped while it waited for the rate or a connection: nothing sent, give it back
                # (with its slot of the day's quota: the commit that writes it gives that back)
                self._given_back += 1
                writer.record(self._release(message, self.clock.now(), counts_as_attempt=False))
                continue
            self.limiter.observe(domain, result, began=started_mono)  # the reply as the server gave it
            refusal = as_sender_refusal(result)
            sender_refused, result = refusal is not result, refusal
            servers = self._observe_failures(result, domain)
            # this attempt met the connection's or the server's trouble (one cut off after the dot may have arrived)
            if self.failures_in_row and result.outcome is not Outcome.AMBIGUOUS:
                report.attempts_unreached += 1
                self._last_unreached = result.reply
            else:
                report.attempts_reached += 1
            throttled_before, cut_short = 0, None
            if result.outcome is Outcome.THROTTLED:
                try:
                    throttled_before = await self._throttled_before(message)
                except asyncio.CancelledError as exc:  # the outcome is known: written all the same, then raised
                    cut_short = exc
            status, next_at = lifecycle.after_attempt(
                result,
                attempt=message.attempt_since_resend,
                max_attempts=self.settings.sending.max_attempts,
                now=finished,
                base_seconds=self.settings.sending.retry_base_seconds,
                cap_seconds=self.settings.sending.retry_max_seconds,
                server_trouble=servers,
                throttled_before=throttled_before,
            )
            label, suppress = status.value, None
            if result.outcome is Outcome.PERMANENT:
                kind = bounce_kind(result.code, result.reply)
                if kind == "hard_bounce":
                    label, suppress = "failed:hard_bounce", "hard_bounce"
                elif kind == "content" and result.stage != "rcpt":  # at RCPT TO it had seen no content: a policy
                    label = "failed:content_rejected"  # refusal of that recipient ("Recipient address rejected")
                    log.event(
                        "content_rejected", logging.ERROR, campaign=message.campaign,
                        template_version=item.rendered.template_version, dedupe_key=message.dedupe_key,
                        code=result.code, reply=log.mask_addresses(result.reply)[:200],
                        hint="the server refused the message for its content: check the template, not the customer",
                    )  # fmt: skip
            elif result.outcome is Outcome.THROTTLED:
                label = "retry:throttled"
            elif sender_refused:
                label = f"{status.value}:sender_refused"
                log.event(
                    "sender_refused", logging.ERROR, domain=domain, dedupe_key=message.dedupe_key,
                    code=result.code, reply=log.mask_addresses(result.reply)[:200], status=status.value,
                    hint=f"{domain} refuses mail from this sender (authentication or reputation), whatever the "
                    f"message: check SPF, DKIM and DMARC for the domain of shop.from_address and the sending IP's "
                    "standing; " + ("the message is tried again in an hour or more" if status is MessageStatus.RETRY
                                    else "the message has used its attempts and failed"),
                )  # fmt: skip
            writer.record(
                Disposition(
                    message=message,
                    status=status,
                    worker=self.worker,
                    started_at=started,
                    finished_at=finished,
                    result=result,
                    next_attempt_at=next_at,
                    template_version=item.rendered.template_version,
                    subject=sanitize_header_text(item.rendered.subject),  # as the Subject header has it
                    counts_as_attempt=lifecycle.counts_as_attempt(result, server_trouble=servers),
                    reached_server=connection_failure(result) is None,
                    suppress_reason=suppress,
                )
            )
            self._off_wire(on_wire)
            report.count(message, label)
            if self.observer is not None:
                self.observer.observe_result(
                    message.campaign, status.value, result.outcome.value, finished_mono - started_mono, finished_mono
                )
            _log_outcome(message, status, result, item.customer.external_id, suppressed=suppress, retry_at=next_at)
            if cut_short is not None:
                raise cut_short

    async def _throttled_before(self, message: ClaimedMessage) -> int:
        """The message's attempts throttled in a row before this one (``Store.throttled_in_row``: they space out its
        next try); 0 when the ledger cannot tell now, so the attempt's outcome is recorded all the same."""
        try:
            return await self.store.call(self.store.store.throttled_in_row, message.id)
        except Exception as exc:  # the database's trouble: the writer's retries meet it, and stop the run if it lasts
            log.event("throttled_count_unread", logging.WARNING, dedupe_key=message.dedupe_key,
                      error=log.error_line(exc)[:300])  # fmt: skip
            return 0

    async def _slot_and_connection(self, domain: str, message: int, wire: Wire) -> float | Later:
        """Wait for one of the pool's connections (``wire``) and the message's slot of the rates
        (``Limiter.acquire``): this sender's connection on return, but for a ``Later``, which the caller tells the
        message to wait for in the ledger.

        The connection first: holding it, the sender books a slot within ``WIRE_HOLD_SECONDS`` and waits for it on
        the connection. A sender that booked its slot first and then waited for a busy connection would find its
        slot passed (begun then, it would go out with the messages whose slots are now) and book another: where the
        connections hold the messages back, nearly every message booked two slots (29 of 30 at a domain rate of 5/s
        over one connection taking 0.3 s a message), the lost slots halving the domain's rate for every worker that
        shares it. Waiting for the connection with no slot booked, each message books one.

        A further slot is waited for without the connection, free for other domains' messages meanwhile: booked with
        ``HOLD_SECONDS`` (or ``Later``), then the connection again, handed to it before the senders with no slot booked
        (``worker.wire``: behind them, under a mix of domains, a slow domain's slots all but always passed, the domain
        sent at 8-30 % of its rate, and the fallback below held connections idle for seconds). If that slot passed while
        the message waited for the connection (``Limiter.passed``: a slow message held it, or every connection was
        busy), the sender books again holding the connection (17 in one second at a domain rate of 10/s behind a message
        that held the only connection a second, before): a slot within ``WIRE_HOLD_SECONDS`` it waits for on it; a later
        one without it, and then waits for a connection again. After ``REBOOKS`` such misses it waits on the connection
        for whatever slot the domain has (up to ``HOLD_SECONDS``), so a message whose connection always comes late still
        goes, at the rate, with the connection idle meanwhile."""
        await wire.acquire()
        try:
            slot = await self.limiter.acquire(domain, stop=self.stopping, hold=WIRE_HOLD_SECONDS, tell=False)
        except BaseException:
            wire.release()
            raise
        if not isinstance(slot, Later):
            return slot
        wire.release()  # the domain's next slot is further off (nothing booked): waited for without the connection
        misses = 0
        while True:
            slot = await self.limiter.acquire(domain, stop=self.stopping, hold=HOLD_SECONDS, message=message)
            if isinstance(slot, Later):
                return slot
            granted = self.clock.monotonic()
            await wire.acquire(due=True)  # before the senders with no slot to lose (``worker.wire``)
            try:
                while not self.stopping.is_set() and self.limiter.passed(domain, granted):
                    misses += 1
                    hold = HOLD_SECONDS if misses > REBOOKS else WIRE_HOLD_SECONDS
                    slot = await self.limiter.acquire(domain, stop=self.stopping, hold=hold, tell=False)
                    if isinstance(slot, Later):
                        break
                    granted = self.clock.monotonic()
                else:
                    return slot
            except BaseException:
                wire.release()
                raise
            wire.release()  # the domain's next slot is further off: waited for without the connection

    async def _learn_waiting(self, domain: str) -> None:
        """Tell the limiter when the messages waiting in the ledger for ``domain`` fall due (``Limiter.learn``): those
        an earlier process or another worker sent back to wait for its slots are in no memory of this one, which
        would tell its own the same slots (each claimed with one of them, found its slot taken, and sent back again
        and again). Read once per domain, by the first sender that must wait for it; a read that fails is not tried
        again: the limiter goes by its own memory alone."""
        learning = self._learning.get(domain)
        if learning is None:
            learning = self._learning[domain] = asyncio.ensure_future(
                self.store.call(self.store.store.waiting_for_domain, domain, self.clock.now())
            )
        try:
            due = await asyncio.shield(learning)
        except Exception as exc:
            if not self.limiter.knows(domain):  # (said once: the senders that waited for the read with it say nothing)
                log.event("domain_waits_not_read", logging.WARNING, domain=domain, error=log.error_line(exc))
                self.limiter.learn(domain, ())
            return
        if not self.limiter.knows(domain):
            now, mono = self.clock.now(), self.clock.monotonic()
            self.limiter.learn(domain, (mono + (at - now).total_seconds() for at in due))

    def _off_wire(self, on_wire: asyncio.Future[None]) -> None:
        """A send is over, its outcome (if any) handed to the writer."""
        self._on_wire.discard(on_wire)
        if not on_wire.done():
            on_wire.set_result(None)


def _ignore(*_args: object, **_kwargs: object) -> None:
    pass


async def _close_cut_short(writer: LedgerWriter) -> None:
    """Close the writer of a run cut short (a daemon's shutdown past its grace period, which waits 2 s more): what
    does not commit within ``CANCELLED_CLOSE_SECONDS`` waits on a database in trouble, so the writer's retries are
    stopped, and the group it was trying again is kept with the rest (``unwritten``: ``outcomes_not_written`` names
    its sends) rather than dropped with the process."""
    try:
        await asyncio.wait_for(writer.close(), CANCELLED_CLOSE_SECONDS)
    except BaseException:  # (the writer's own failure, the time run out, or a second cancel: the same)
        await writer.abort()


def _log_stale(records: Sequence[Disposition], stale: Sequence[Stale]) -> None:
    """Outcomes that came after the row's lease had lapsed (the worker stalled longer than a lease)."""
    by_id = {record.message.id: record for record in records}
    for row in stale:
        record = by_id[row.message_id]
        message = record.message
        if row.sent_late:
            log.event("email_sent_after_lease_lapsed", logging.WARNING, campaign=message.campaign,
                      dedupe_key=message.dedupe_key, found=row.found, recorded="sent")  # fmt: skip
        elif row.refused_late:  # the mail did not leave: the row need not wait for an operator's decision
            event = "email_refused_after_lease_lapsed" if record.result else "email_given_back_after_lease_lapsed"
            log.event(event, logging.WARNING, campaign=message.campaign,
                      dedupe_key=message.dedupe_key, found=row.found, recorded=record.status.value)  # fmt: skip
        else:
            sent = record.status is MessageStatus.SENT
            log.event(
                "email_outcome_after_lease_lapsed", logging.ERROR if sent else logging.WARNING,
                campaign=message.campaign, dedupe_key=message.dedupe_key, outcome=record.status.value, found=row.found,
                note="the row keeps its state: its lease lapsed before this outcome came"
                + (" and another worker is sending it or sent it" if sent else ""),
            )  # fmt: skip


def _log_skipped(item: Skipped) -> None:
    message = item.message
    log.event("email_skipped", campaign=message.campaign, dedupe_key=message.dedupe_key, customer=item.customer,
              to=log.mask_email(message.email), reason=item.reason.value)  # fmt: skip


def _label(item: Skipped | RenderFailed) -> str:
    return f"skipped:{item.reason.value}" if isinstance(item, Skipped) else "failed:render_error"


def _log_outcome(
    message: ClaimedMessage, status: MessageStatus, result: SendResult, customer: str, *, suppressed: str | None = None,
    retry_at: datetime | None = None,
) -> None:
    """``suppressed``: the reason the address went on the suppression list with this outcome (``hard_bounce``);
    ``retry_at``: when a retry is due. ``stage``: where the attempt stopped (``core.retry.STAGES``)."""
    name = {
        MessageStatus.SENT: "email_sent",
        MessageStatus.RETRY: "email_deferred",
        MessageStatus.FAILED: "email_failed",
        MessageStatus.UNCERTAIN: "email_uncertain",
    }.get(status, "email_" + status.value)
    level = logging.INFO if status in (MessageStatus.SENT, MessageStatus.RETRY) else logging.WARNING
    log.event(
        name,
        level,
        campaign=message.campaign,
        dedupe_key=message.dedupe_key,
        customer=customer,
        to=log.mask_email(message.email),
        message_id=message.message_id,  # what a bounce, a complaint or the relay's log names the message by
        attempt=message.attempts + 1,
        code=result.code,
        reply=log.mask_addresses(result.reply)[:120],
        error=result.error_type,
        stage=result.stage,
        **({"suppressed": suppressed} if suppressed else {}),
        **({"retry_at": retry_at.isoformat()} if retry_at is not None and status is MessageStatus.RETRY else {}),
    )
