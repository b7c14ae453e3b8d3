"""Concurrent senders: claim → compose → limit → mark → send → record.

Theory of operation
-------------------
One producer claims due rows in batches (a lease, so no other worker takes
them), reads the facts for the batch in one go, and composes each message
(re-check, render, MIME). Skips and render failures are recorded at once;
the daily quota is taken for the rest (what it does not cover goes back to the
queue until the next local day) and they go on a bounded queue.
``pool_size * in_flight_per_connection`` sender tasks take them off the queue
(more senders than connections, so the next marks are committed while the
current messages are on the wire); each waits for its own ``sending`` mark to be committed, then for a slot of the
global rate and of the recipient domain's rate (``worker.limiter``: last, so
commit latency cannot bunch messages up on the wire), and only then speaks
SMTP. The outcome goes back to the ledger with an attempt row. A throttling reply slows that domain
down and retries the message without counting the attempt; a 5.1.x "no such
user" suppresses the address; a 5.7.x refusal is logged as a content problem.
Too many connection failures in a row pause the dispatcher: it stops claiming
and gives what it holds back to the queue.

All ledger writes go through one ``LedgerWriter`` task (a group commit): it
commits the marks and outcomes that piled up while the last commit ran, in one
transaction, so committing per message does not cap the throughput, while each
sender still waits for its own ``sending`` mark before the first SMTP byte.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal, Protocol

from worker import log
from worker.adapters.ratestore import RateStore
from worker.asyncstore import AsyncStore
from worker.composing import ComposerPool
from worker.config import Settings
from worker.contact import Arbiter
from worker.core import lifecycle
from worker.core.limits import as_throttled, bounce_kind, domain_of, next_quota_day_start
from worker.domain import ClaimedMessage, Disposition, MessageStatus, Outcome, ProductView, SendResult
from worker.limiter import DailyQuota, Limiter, LocalBooker
from worker.pipeline import (
    BatchFacts,
    Composed,
    Composer,
    Deferred,
    RenderFailed,
    Skipped,
    load_batch_facts,
    load_catalogue,
)
from worker.ports import Clock, Transport


@dataclass
class DispatchReport:
    outcomes: Counter[str] = field(default_factory=Counter)
    """Final statuses of this run's messages (``sent``, ``retry``, ``skipped:suppressed``…)."""
    by_campaign: Counter[tuple[str, str]] = field(default_factory=Counter)
    paused: str | None = None
    """Why the dispatcher paused (too many connection failures in a row), or None."""
    quota_reached: bool = False
    """The daily quota ran out; what is left waits for the next day."""

    def count(self, campaign: str, what: str) -> None:
        self.outcomes[what] += 1
        self.by_campaign[(campaign, what)] += 1


class LedgerWriter:
    """One task that commits ``sending`` marks and outcomes in groups."""

    def __init__(self, store: AsyncStore, *, worker: str, clock: Clock) -> None:
        self.store = store
        self.worker = worker
        self.clock = clock
        self._marks: list[tuple[int, asyncio.Future[bool]]] = []
        self._records: list[Disposition] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self.commits = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kembali-ledger-writer")

    async def mark_sending(self, message_id: int) -> bool:
        """Wait until ``sending`` is committed for this row; False if the lease was lost."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._marks.append((message_id, future))
        self._poke()
        return await future

    def record(self, disposition: Disposition) -> None:
        self._records.append(disposition)
        self._poke()

    def _poke(self) -> None:
        self._idle.clear()
        self._wake.set()

    async def flush(self) -> None:
        """Wait until everything handed over so far is committed."""
        while self._marks or self._records or not self._idle.is_set():
            self._check_alive()
            await asyncio.wait(
                [asyncio.ensure_future(self._idle.wait()), *([self._task] if self._task else [])],
                return_when=asyncio.FIRST_COMPLETED,
            )
            self._check_alive()

    def _check_alive(self) -> None:
        if self._task is not None and self._task.done():
            self._task.result()  # re-raise the writer's failure
            raise RuntimeError("ledger writer stopped")

    async def close(self) -> None:
        await self.flush()
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._closed and not (self._marks or self._records):
                return
            records, self._records = self._records, []
            marks, self._marks = self._marks, []
            try:
                # one transaction, one commit: outcomes first, then the marks senders wait for
                marked = await self.store.call(
                    self.store.store.record_and_mark,
                    records,
                    [m for m, _ in marks],
                    worker=self.worker,
                    now=self.clock.now(),
                )
                for message_id, future in marks:
                    if not future.done():
                        future.set_result(message_id in marked)
                self.commits += 1
            except BaseException as exc:
                for _, future in marks:
                    if not future.done():
                        future.set_exception(exc)
                log.event("ledger_write_failed", logging.ERROR, error=repr(exc), pending=len(records))
                raise
            if not (self._marks or self._records):
                self._idle.set()


_DONE: Literal["done"] = "done"
_Batch = tuple[datetime, list[Composed | Skipped | RenderFailed | Deferred]]
"""A claimed batch, composed: when it was claimed, and each message's result."""


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
    ) -> None:
        self.settings = settings
        self.store = store
        self.composer = composer
        self.compose_pool = compose_pool
        """Renders big batches in helper processes (``worker.composing``); None: all in this thread."""
        self.transport = transport
        self.clock = clock
        self.worker = worker
        self.limiter = limiter or Limiter(settings.sending, clock, LocalBooker(clock))
        self.quota = quota or DailyQuota(
            store,
            RateStore(store.store.engine),
            clock,
            quota=settings.sending.daily_quota,
            zone=settings.shop.time_zone,
        )
        self.stopping = asyncio.Event()
        self.observer: SendObserver | None = None
        self.paused: str | None = None
        """Set when too many connection failures in a row paused sending (health checks read it)."""
        self.failures_in_row = 0
        self.quota_reached = False

    def close(self) -> None:
        """Stop the compose helper processes, if any (a later ``run_once`` starts them again)."""
        if self.compose_pool is not None:
            self.compose_pool.close()

    def stop(self) -> None:
        """Stop claiming; sends already under way finish, claimed messages not yet begun go back to the queue."""
        self.stopping.set()

    def resume(self) -> None:
        """Clear a pause (an operator fixed the server): the next ``run_once`` claims again."""
        if self.paused is not None:
            log.event("dispatcher_resumed", logging.WARNING, was=self.paused)
        self.paused = None
        self.failures_in_row = 0
        self.stopping.clear()

    def _observe_failures(self, result: SendResult) -> None:
        """Count attempts that got no reply at all; too many in a row pause the dispatcher."""
        if result.code is None and result.outcome in (Outcome.TRANSIENT, Outcome.AMBIGUOUS):
            self.failures_in_row += 1
        else:
            self.failures_in_row = 0
        limit = self.settings.sending.pause_after_failures
        if limit and self.failures_in_row >= limit and self.paused is None:
            self.paused = (
                f"{self.failures_in_row} connection failures in a row (last: {result.error_type or 'no reply'}: "
                f"{result.reply[:120]})"
            )
            log.event(
                "dispatcher_paused", logging.ERROR, reason=self.paused, smtp_host=self.settings.smtp.host,
                failures_in_row=self.failures_in_row,
            )  # fmt: skip
            self.stop()

    def _release(self, message: ClaimedMessage, now: datetime, until: datetime | None = None) -> Disposition:
        """Give a claimed, unsent row back to the queue (stopped, paused, or out of quota): no attempt made."""
        return Disposition(
            message=message,
            status=MessageStatus.RETRY if message.attempts else MessageStatus.PLANNED,
            worker=self.worker,
            started_at=now,
            finished_at=now,
            next_attempt_at=until or now,
        )

    async def run_once(self) -> DispatchReport:
        report = DispatchReport()
        writer = LedgerWriter(self.store, worker=self.worker, clock=self.clock)
        writer.start()
        queue: asyncio.Queue[Composed | Literal["done"]] = asyncio.Queue(maxsize=self.settings.sending.batch_size)
        senders = [
            asyncio.create_task(self._sender(queue, writer, report), name=f"kembali-sender-{i}")
            for i in range(self.settings.smtp.pool_size * self.settings.sending.in_flight_per_connection)
        ]
        try:
            await self._produce(queue, writer, report)
        finally:
            for _ in senders:
                await queue.put(_DONE)
            results = await asyncio.gather(*senders, return_exceptions=True)
            await writer.close()
        for result in results:
            if isinstance(result, BaseException):
                raise result
        report.paused = self.paused
        report.quota_reached = self.quota_reached
        return report

    async def _produce(
        self, queue: asyncio.Queue[Composed | Literal["done"]], writer: LedgerWriter, report: DispatchReport
    ) -> None:
        catalogue = await self.store.call(load_catalogue, self.store.store)
        arbiter = self.composer.new_arbiter()
        ahead: asyncio.Task[_Batch | None] | None = asyncio.create_task(self._claim_and_compose(catalogue, arbiter))
        try:
            while ahead is not None:
                got = await ahead
                ahead = None
                if got is None:
                    return
                now, items = got
                if self.compose_pool is not None and len(items) == self.settings.sending.batch_size:
                    # a full batch: more is due. Claim and compose the next one in the helper
                    # process while this one is queued and sent, so the senders never wait.
                    ahead = asyncio.create_task(self._claim_and_compose(catalogue, arbiter))
                composed: list[Composed] = []
                for item in items:
                    message = item.message
                    if isinstance(item, Composed):
                        composed.append(item)
                    elif isinstance(item, Deferred):  # the contact policy: not yet (cap or quiet hours)
                        writer.record(self._release(message, now, until=item.until))
                        report.count(message.campaign, f"deferred:{item.why}")
                        log.event("email_deferred_by_policy", campaign=message.campaign,
                                  dedupe_key=message.dedupe_key, until=item.until.isoformat(), why=item.why)
                    else:
                        writer.record(self._not_sent(item, now))
                        report.count(message.campaign, _label(item))
                        if self.observer is not None:
                            self.observer.observe_result(
                                message.campaign, _label(item), None, None, self.clock.monotonic()
                            )
                granted = await self.quota.take(len(composed))
                if granted < len(composed):
                    self._quota_reached(composed[granted:], writer, now)
                for index, item in enumerate(composed[:granted]):
                    if self.stopping.is_set():
                        for left in composed[index:granted]:
                            writer.record(self._release(left.message, now))
                        await self.quota.give_back(granted - index)
                        return
                    await queue.put(item)
                if self.quota_reached:
                    return
                if ahead is None:
                    ahead = asyncio.create_task(self._claim_and_compose(catalogue, arbiter))
        except BaseException:
            if ahead is not None:  # failing or cancelled: do not wait for it; its leases lapse
                ahead.cancel()
                ahead = None
            raise
        finally:
            if ahead is not None:
                await self._give_back_ahead(ahead, writer)

    async def _claim_and_compose(self, catalogue: list[ProductView], arbiter: Arbiter) -> _Batch | None:
        """Claim the next batch and compose it; None when stopping or nothing is due. Batches are
        composed in claim order, so the run's arbiter decides them in that order."""
        if self.stopping.is_set():
            return None
        store = self.store.store
        now = self.clock.now()
        batch = await self.store.call(
            store.claim,
            worker=self.worker,
            now=now,
            limit=self.settings.sending.batch_size,
            lease_seconds=self.settings.sending.lease_seconds,
            domain=self.settings.shop.domain,
        )
        if not batch:
            return None
        facts = await self.store.call(load_batch_facts, store, batch, catalogue, settings=self.settings, now=now)
        return now, await self._compose(batch, facts, now, arbiter)

    async def _give_back_ahead(self, ahead: asyncio.Task[_Batch | None], writer: LedgerWriter) -> None:
        """A batch claimed ahead that will not be sent (stopped, out of quota, failed): back to the queue."""
        got = await ahead
        if got is None:
            return
        now, items = got
        until = next_quota_day_start(now, self.settings.shop.time_zone) if self.quota_reached else None
        for item in items:
            writer.record(self._release(item.message, now, until=until))

    async def _compose(
        self, batch: list[ClaimedMessage], facts: BatchFacts, now: datetime, arbiter: Arbiter
    ) -> list[Composed | Skipped | RenderFailed | Deferred]:
        """``Composer.compose`` for each message, in order: decided here (the arbiter remembers the
        whole run), rendered by the compose helpers when there are some."""
        if self.compose_pool is None:
            return [self.composer.compose(message, facts, now, arbiter) for message in batch]
        decided = [self.composer.decide(message, facts, now, arbiter) for message in batch]
        to_render = [message for message, decision in zip(batch, decided, strict=True) if decision is None]
        rendered = iter(await self.compose_pool.render(to_render, facts, now))
        return [decision if decision is not None else next(rendered) for decision in decided]

    def _quota_reached(self, items: list[Composed], writer: LedgerWriter, now: datetime) -> None:
        tomorrow = next_quota_day_start(now, self.settings.shop.time_zone)
        for item in items:
            writer.record(self._release(item.message, now, until=tomorrow))
        if not self.quota_reached:
            self.quota_reached = True
            log.event(
                "daily_quota_reached", logging.WARNING, quota=self.settings.sending.daily_quota,
                waiting=len(items), resumes_at=tomorrow.isoformat(),
            )  # fmt: skip

    def _not_sent(self, item: Skipped | RenderFailed, now: datetime) -> Disposition:
        if isinstance(item, Skipped):
            log.event(
                "email_skipped",
                campaign=item.message.campaign,
                dedupe_key=item.message.dedupe_key,
                reason=item.reason.value,
            )
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
        self, queue: asyncio.Queue[Composed | Literal["done"]], writer: LedgerWriter, report: DispatchReport
    ) -> None:
        sender = self.settings.shop.from_address
        while True:
            item = await queue.get()
            if item == _DONE:
                return
            assert isinstance(item, Composed)
            message = item.message
            domain = domain_of(message.email)
            if self.stopping.is_set():  # stopped or paused: not begun, back to the queue
                writer.record(self._release(message, self.clock.now()))
                await self.quota.give_back(1)
                continue
            if not await writer.mark_sending(message.id):
                log.event("email_lease_lost", logging.WARNING, dedupe_key=message.dedupe_key)
                continue
            # the rate slot is taken last, right before the first SMTP byte, so commit
            # latency cannot bunch messages up on the wire
            await self.limiter.acquire(domain)
            if self.stopping.is_set():  # stopped while we waited: nothing sent, give it back
                writer.record(replace(self._release(message, self.clock.now()), counts_as_attempt=False))
                await self.quota.give_back(1)
                continue
            started = self.clock.now()
            started_mono = self.clock.monotonic()
            result = as_throttled(await self.transport.send(sender, message.email, item.data))
            finished = self.clock.now()
            finished_mono = self.clock.monotonic()
            self.limiter.observe(domain, result)
            self._observe_failures(result)
            status, next_at = lifecycle.after_attempt(
                result,
                attempt=message.attempts + 1,
                max_attempts=self.settings.sending.max_attempts,
                now=finished,
                base_seconds=self.settings.sending.retry_base_seconds,
                cap_seconds=self.settings.sending.retry_max_seconds,
            )
            label, suppress = status.value, None
            if result.outcome is Outcome.PERMANENT:
                kind = bounce_kind(result.code, result.reply)
                if kind == "hard_bounce":
                    label, suppress = "failed:hard_bounce", "hard_bounce"
                elif kind == "content":
                    label = "failed:content_rejected"
                    log.event(
                        "content_rejected", logging.ERROR, campaign=message.campaign,
                        template_version=item.rendered.template_version, dedupe_key=message.dedupe_key,
                        code=result.code, reply=result.reply[:200],
                        hint="the server refused the message for its content: check the template, not the customer",
                    )  # fmt: skip
            elif result.outcome is Outcome.THROTTLED:
                label = "retry:throttled"
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
                    subject=item.rendered.subject,
                    counts_as_attempt=result.outcome is not Outcome.THROTTLED,
                    suppress_reason=suppress,
                )
            )
            report.count(message.campaign, label)
            if self.observer is not None:
                self.observer.observe_result(
                    message.campaign, status.value, result.outcome.value, finished_mono - started_mono, finished_mono
                )
            _log_outcome(message, status, result, item.customer.external_id)


def _label(item: Skipped | RenderFailed) -> str:
    return f"skipped:{item.reason.value}" if isinstance(item, Skipped) else "failed:render_error"


def _log_outcome(message: ClaimedMessage, status: MessageStatus, result: SendResult, customer: str) -> None:
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
        attempt=message.attempts + 1,
        code=result.code,
        reply=result.reply[:120],
        error=result.error_type,
    )
