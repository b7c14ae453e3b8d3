"""The daemon's jobs, and nothing else: the daemon says what to run and when.

Cron jobs live in APScheduler's memory job store on an ``AsyncIOScheduler``; every
trigger gets the shop's time zone explicitly (never the host's). Each worker
process runs its own scheduler; the database, not the scheduler, decides who
sends what (claims, unique dedupe keys), so two daemons never double-send.

Misfires, deliberately (checked against APScheduler 3.11's ``BaseScheduler.
_process_jobs`` and ``executors.base.run_coroutine_job``):

* ``coalesce=True``: when several run times of a job are due at once (the event
  loop was blocked, the machine slept), the job runs **once**, not once per
  missed time.
* ``misfire_grace_time=None``: a late run is never dropped, however late.
  Planning is idempotent (unique dedupe keys), so planning late is always right.
* ``max_instances=1``: a firing that comes while the previous run of the same
  job is still going is skipped (APScheduler logs it; we log ``job_skipped``).
  The daemon's catch-up passes run beside the scheduler: it skips a campaign's
  pass while another of that campaign is under way itself (``job_skipped`` too).
* Interval jobs (maintenance, the health line, the template watcher, the
  systemd watchdog) do not go through APScheduler: its ``IntervalTrigger``
  counts on the wall clock, so when the clock steps back an hour (NTP, a VM
  restored), they would all stop for that hour, and the watchdog's silence
  would get the daemon killed. They run on the event loop's monotonic clock
  instead, one run at a time (a run that outlasts its interval is followed by
  the next at once, not by one per missed time). Cron jobs stay on the wall
  clock of the shop's time zone: that is what a cron expression means.
* APScheduler 3 waits for the next cron time with a timer on the event loop's
  clock (monotonic), which stands still while the machine is suspended and does
  not follow a wall clock stepped forward: a 09:00 run due during a night's
  sleep would come as many hours late as the sleep lasted. ``Scheduler`` wakes
  it every ``WAKE_SECONDS`` to look at the wall clock again, so such a run comes
  within that time of the wake-up (once: ``coalesce``).
* The memory job store forgets everything at exit, and a job added at start-up
  gets its *next* fire time, so a run missed while the daemon was **down** would
  be lost. ``missed_run`` answers "was a run due between the last recorded run
  and now?" from the ``job_run`` table; the daemon then plans once at start-up,
  and a maintenance asks it too (a firing skipped by ``max_instances``, begun
  before its time, is one a pass did not cover: it is planned then, once).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger

from worker import log
from worker.core.cron import first_gap, schedule

JobFunc = Callable[[], Awaitable[None]]

JOB_DEFAULTS: dict[str, Any] = {"coalesce": True, "misfire_grace_time": None, "max_instances": 1}


def cron_trigger(expr: str, time_zone: str) -> BaseTrigger:
    """A cron trigger in ``time_zone`` (crontab weekday numbers, 5 or 6 fields; see core.cron): one
    ``CronTrigger``, or the earliest of two when crontab would run on a day of the month *or* a weekday; a time the
    clocks skip runs as late as their jump is long (``_SkippedTimesToo``)."""
    zone = ZoneInfo(time_zone)

    def built(tz: ZoneInfo | timezone) -> BaseTrigger:
        triggers = [CronTrigger(timezone=tz, **fields.as_kwargs()) for fields in schedule(expr)]
        return triggers[0] if len(triggers) == 1 else OrTrigger(triggers)

    return _SkippedTimesToo(built(zone), built(UTC), zone)


class _SkippedTimesToo(BaseTrigger):  # type: ignore[misc]
    """``trigger``, and a time it names that the clocks skip, read with the offset before the jump (as late as the
    jump is long): 02:30 on the night 02:00 becomes 03:00 runs at 03:30. ``CronTrigger`` does so for a time within a
    day, but one at the start of a day whose first hour the clocks skip (00:00 going to 01:00 in Santiago, Havana,
    Beirut, the Azores) it left out: no run that day, 48 hours between two daily runs. ``wall``: the expression on
    a clock that never changes (UTC), whose fire times are the wall times it names."""

    def __init__(self, trigger: BaseTrigger, wall: BaseTrigger, zone: ZoneInfo) -> None:
        self.trigger, self.wall, self.zone = trigger, wall, zone

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        found: datetime | None = self.trigger.get_next_fire_time(previous_fire_time, now)
        if found is None:  # it names no time to come (0 9 31 4 *): none skipped either
            return None
        at = now.astimezone(self.zone).replace(tzinfo=UTC)  # the wall time now, on the unchanging clock
        for _ in range(100):  # the wall times it names up to ``found``: one or two, more only around a change
            named: datetime | None = self.wall.get_next_fire_time(None, at)
            if named is None:
                return found
            wall = named.replace(tzinfo=self.zone)  # (fold 0: a skipped time read with the offset before the jump)
            instant = wall.astimezone(UTC)
            if instant >= found:
                return found
            if instant.astimezone(self.zone).replace(tzinfo=None) != named.replace(tzinfo=None):  # skipped
                return instant.astimezone(self.zone)
            at = named + timedelta(seconds=1)
        return found

    def __str__(self) -> str:
        return str(self.trigger)


@functools.lru_cache(maxsize=16)
def _trigger(expr: str, time_zone: str) -> BaseTrigger:
    """``cron_trigger``, built once per expression and zone (its fire times are computed, not stored)."""
    return cron_trigger(expr, time_zone)


def next_fire_time(expr: str, time_zone: str, at: datetime) -> datetime | None:
    """The first time the cron expression fires at or after ``at`` (None: never again), in UTC: the trigger gives it
    on the shop's clock, where adding to it is wall-clock arithmetic and two such times compare ignoring ``fold``, so
    a pass at 02:30 in the hour the clocks go back (the second 02:30) plus five minutes was the first 02:35, an hour
    before the pass."""
    found: datetime | None = _trigger(expr, time_zone).get_next_fire_time(None, at)
    return None if found is None else found.astimezone(UTC)


LOOK_AHEAD = timedelta(days=366)
"""How far ahead ``first_long_wait`` looks: a year holds every month and weekday a cron expression can name."""


def first_long_wait(
    expr: str, time_zone: str, now: datetime, longer_than: timedelta
) -> tuple[datetime, datetime | None] | None:
    """The first wait longer than ``longer_than`` from one of the expression's fire times to the next, of those
    within ``LOOK_AHEAD`` of its first fire time after ``now`` (``core.cron.first_gap``): (the fire time, the
    next or None when none comes); None when it never waits that long."""
    first = next_fire_time(expr, time_zone, now)
    if first is None:
        return now, None
    return first_gap(lambda at: next_fire_time(expr, time_zone, at), first, first + LOOK_AHEAD, longer_than)


def missed_run(expr: str, time_zone: str, last_run: datetime | None, now: datetime) -> datetime | None:
    """The first scheduled time after ``last_run`` if it is not later than ``now`` (a run was
    missed); None when nothing was due. Never having run counts as missed (returns ``now``), unless the expression
    names no time at all (``0 0 31 2 *``, the way to pause a campaign: it is not planned at start-up either)."""
    if last_run is None:
        return now if _trigger(expr, time_zone).get_next_fire_time(None, now) is not None else None
    # CronTrigger rounds up to whole seconds: start at the second after the one the last run began in, so a run
    # that started on its fire time (or within that second) is not counted again, and one due less than a second
    # after a run (a catch-up pass recorded at 08:59:59.6, a 09:00 cron) is not taken for it
    after = last_run.replace(microsecond=0) + timedelta(seconds=1)
    due: datetime | None = cron_trigger(expr, time_zone).get_next_fire_time(None, after)
    return due if due is not None and due <= now else None


class Scheduler:
    """An ``AsyncIOScheduler`` with Kembali's job defaults for cron jobs, and interval jobs on the event loop's
    monotonic clock; start it inside the running loop."""

    WAKE_SECONDS = 30.0
    """How often APScheduler looks at the wall clock again, whatever its timer says (see the module's notes)."""

    def __init__(self, time_zone: str) -> None:
        self.time_zone = time_zone
        self._waker: asyncio.Task[None] | None = None
        self._aps = AsyncIOScheduler(timezone=ZoneInfo(time_zone), job_defaults=dict(JOB_DEFAULTS))
        self._aps.add_listener(self._on_event, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
        # Our job wrappers log failures as events; APScheduler's own lines would repeat them.
        logging.getLogger("apscheduler").setLevel(logging.ERROR)
        self._intervals: dict[str, _Interval] = {}
        self._finishing: list[_Interval] = []
        """Removed interval jobs whose last run is still going (cancelled too by ``shutdown``)."""
        self._started = False

    def add_cron(
        self, job_id: str, expr: str, func: JobFunc, *, now: datetime, time_zone: str | None = None
    ) -> datetime | None:
        """Schedule ``func`` on a cron expression in ``time_zone`` (None: the scheduler's, the shop's when it was
        made; a reload passes the shop's as it is now); returns its first fire time after ``now``."""
        trigger = cron_trigger(expr, time_zone or self.time_zone)
        self._aps.add_job(_guarded(job_id, func), trigger, id=job_id, name=job_id, replace_existing=True)
        first: datetime | None = trigger.get_next_fire_time(None, now)
        return first

    def add_interval(self, job_id: str, seconds: float, func: JobFunc) -> None:
        """Run ``func`` every ``seconds`` on the monotonic clock, the first time ``seconds`` after the start."""
        old = self._intervals.pop(job_id, None)
        if old is not None:
            self._remove(old)
        self._intervals[job_id] = job = _Interval(job_id, seconds, func)
        if self._started:
            job.start()

    def remove_all(self) -> None:
        """Remove every job; a run under way (the one calling this, perhaps) finishes, and is the job's last."""
        self._aps.remove_all_jobs()
        for job in self._intervals.values():
            self._remove(job)
        self._intervals.clear()

    def _remove(self, job: _Interval) -> None:
        job.remove()
        self._finishing = [j for j in self._finishing if j.running] + ([job] if job.running else [])

    def job_ids(self) -> list[str]:
        return sorted([job.id for job in self._aps.get_jobs()] + list(self._intervals))

    def start(self) -> None:
        self._aps.start()
        self._started = True
        self._waker = asyncio.get_running_loop().create_task(self._wake(), name="kembali-scheduler-wake")
        for job in self._intervals.values():
            job.start()

    def shutdown(self) -> None:
        """Stop firing; a job still running is cancelled (every job here is safe to cut short; the daemon's
        planning jobs shield their pass, which it waits for)."""
        self._started = False
        if self._waker is not None:
            self._waker.cancel()
            self._waker = None
        if self._aps.running:
            self._aps.shutdown(wait=False)
        for job in [*self._intervals.values(), *self._finishing]:
            job.cancel()
        self._intervals.clear()
        self._finishing.clear()

    async def _wake(self) -> None:
        """Have APScheduler look at the wall clock every ``WAKE_SECONDS``: a cron time that passed while the machine
        slept (or the clock was stepped forward) runs now, not when its timer on the event loop's clock runs out."""
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(self.WAKE_SECONDS)
                if self._aps.running:
                    self._aps.wakeup()

    def _on_event(self, event: JobEvent) -> None:
        if event.code == EVENT_JOB_MISSED:
            log.event("job_missed", logging.WARNING, job=event.job_id)
        else:
            log.event("job_skipped", logging.WARNING, job=event.job_id, why="the previous run is still going")


class _Interval:
    """One interval job: a task that sleeps on the event loop's (monotonic) clock and runs the job."""

    def __init__(self, job_id: str, seconds: float, func: JobFunc) -> None:
        self.id = job_id
        self.seconds = seconds
        self.func = _guarded(job_id, func)
        self.task: asyncio.Task[None] | None = None
        self.running = False
        self.removed = False

    def start(self) -> None:
        if self.task is None and not self.removed:
            self.task = asyncio.get_running_loop().create_task(self._loop(), name=f"kembali-job-{self.id}")

    def remove(self) -> None:
        """No more runs; one under way finishes (a reload run by the watcher removes the watcher itself)."""
        self.removed = True
        if not self.running:
            self.cancel()

    def cancel(self) -> None:
        self.removed = True
        if self.task is not None:
            self.task.cancel()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self.seconds
        with contextlib.suppress(asyncio.CancelledError):
            while not self.removed:
                await asyncio.sleep(max(0.0, due - loop.time()))
                if self.removed:
                    return
                self.running = True
                try:
                    await self.func()
                finally:
                    self.running = False
                # the next run an interval after this one was due; at once (once) if this one outlasted it
                due = max(due + self.seconds, loop.time())


def _guarded(job_id: str, func: JobFunc) -> JobFunc:
    async def run() -> None:
        try:
            await func()
        except asyncio.CancelledError:  # the shutdown cut it short, as meant: not APScheduler's "raised an exception"
            return
        except Exception as exc:
            log.event("job_failed", logging.ERROR, job=job_id, error=log.error_line(exc))

    return run
