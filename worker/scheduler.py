"""APScheduler 3.x wiring, and nothing else: the daemon says what to run and when.

Jobs live in APScheduler's memory job store on an ``AsyncIOScheduler``; every
trigger gets the shop's time zone explicitly (never the host's). Each worker
process runs its own scheduler; the database, not the scheduler, decides who
sends what (claims, unique dedupe keys), so two daemons never double-send.

Misfires, deliberately (checked against APScheduler 3.11's ``BaseScheduler.
_process_jobs`` and ``executors.base.run_coroutine_job``):

* ``coalesce=True``: when several run times of a job are due at once (the event
  loop was blocked, the machine slept), the job runs **once**, not once per
  missed time.
* ``misfire_grace_time=None``: a late run is never dropped, however late.
  Planning is idempotent (unique dedupe keys), so planning late is always right;
  maintenance and the health line likewise.
* ``max_instances=1``: a firing that comes while the previous run of the same
  job is still going is skipped (APScheduler logs it; we log ``job_skipped``).
* The memory job store forgets everything at exit, and a job added at start-up
  gets its *next* fire time, so a run missed while the daemon was **down** would
  be lost. ``missed_run`` answers "was a run due between the last recorded run
  and now?" from the ``job_run`` table; the daemon then plans once at start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from worker import log
from worker.core.cron import schedule

JobFunc = Callable[[], Awaitable[None]]

JOB_DEFAULTS: dict[str, Any] = {"coalesce": True, "misfire_grace_time": None, "max_instances": 1}


def cron_trigger(expr: str, time_zone: str) -> BaseTrigger:
    """A cron trigger in ``time_zone`` (crontab weekday numbers, 5 or 6 fields; see core.cron): one
    ``CronTrigger``, or the earliest of two when crontab would run on a day of the month *or* a weekday."""
    zone = ZoneInfo(time_zone)
    triggers = [CronTrigger(timezone=zone, **fields.as_kwargs()) for fields in schedule(expr)]
    return triggers[0] if len(triggers) == 1 else OrTrigger(triggers)


def missed_run(expr: str, time_zone: str, last_run: datetime | None, now: datetime) -> datetime | None:
    """The first scheduled time after ``last_run`` if it is not later than ``now`` (a run was
    missed); None when nothing was due. Never having run counts as missed (returns ``now``)."""
    if last_run is None:
        return now
    # CronTrigger rounds up to whole seconds: start one second after the last run so a run
    # that started exactly on its fire time is not counted again.
    due: datetime | None = cron_trigger(expr, time_zone).get_next_fire_time(None, last_run + timedelta(seconds=1))
    return due if due is not None and due <= now else None


class Scheduler:
    """An ``AsyncIOScheduler`` with Kembali's job defaults; start it inside the running loop."""

    def __init__(self, time_zone: str) -> None:
        self.time_zone = time_zone
        self._aps = AsyncIOScheduler(timezone=ZoneInfo(time_zone), job_defaults=dict(JOB_DEFAULTS))
        self._aps.add_listener(self._on_event, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
        # Our job wrappers log failures as events; APScheduler's own lines would repeat them.
        logging.getLogger("apscheduler").setLevel(logging.ERROR)

    def add_cron(self, job_id: str, expr: str, func: JobFunc, *, now: datetime) -> datetime | None:
        """Schedule ``func`` on a cron expression; returns its first fire time after ``now``."""
        trigger = cron_trigger(expr, self.time_zone)
        self._aps.add_job(_guarded(job_id, func), trigger, id=job_id, name=job_id, replace_existing=True)
        first: datetime | None = trigger.get_next_fire_time(None, now)
        return first

    def add_interval(self, job_id: str, seconds: float, func: JobFunc) -> None:
        trigger = IntervalTrigger(seconds=seconds, timezone=ZoneInfo(self.time_zone))
        self._aps.add_job(_guarded(job_id, func), trigger, id=job_id, name=job_id, replace_existing=True)

    def remove_all(self) -> None:
        self._aps.remove_all_jobs()

    def job_ids(self) -> list[str]:
        return sorted(job.id for job in self._aps.get_jobs())

    def start(self) -> None:
        self._aps.start()

    def shutdown(self) -> None:
        """Stop firing; a job still running is cancelled (every job here is safe to cut short)."""
        if self._aps.running:
            self._aps.shutdown(wait=False)

    def _on_event(self, event: JobEvent) -> None:
        if event.code == EVENT_JOB_MISSED:
            log.event("job_missed", logging.WARNING, job=event.job_id)
        else:
            log.event("job_skipped", logging.WARNING, job=event.job_id, why="the previous run is still going")


def _guarded(job_id: str, func: JobFunc) -> JobFunc:
    async def run() -> None:
        try:
            await func()
        except Exception as exc:
            log.event("job_failed", logging.ERROR, job=job_id, error=log.error_line(exc))

    return run
