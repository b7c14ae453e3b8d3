"""`kembali run`: the long-running worker beside the shop.

Theory of operation
-------------------
* A **generation** is one accepted configuration: settings, a private snapshot of
  the templates folder (so edits on disk change nothing until accepted), the
  composer, an SMTP transport and a dispatcher. Start-up builds the first one and
  refuses to start when its templates fail the check; a reload (SIGHUP, or a
  watched change) builds a new one, checks every template in both languages
  (``worker.checks``) and swaps it in only when all is well; otherwise the old
  one stays and every problem is logged with file and line. One reload runs at a
  time; requests during it are one more reload after it, not one each.
* The **scheduler** (``worker.scheduler``) fires one planning job per enabled
  campaign on its cron (shop time zone), maintenance (lapsed leases, expired
  messages, old attempt rows), the health line and the template watcher. A
  planning run missed while the daemon was down runs once at start-up, before
  ``READY=1`` (each such pass first asks systemd for ``CATCH_UP_PASS_SECONDS``
  more with ``EXTEND_TIMEOUT_USEC``); an accepted reload does the same for its
  settings, beside the running daemon (a campaign it turned on). The dispatcher claims nothing while a pass,
  or the catch-up, is under way (``PLANNING_HOLD_SECONDS`` at most). Planning
  runs on a thread of its own, beside the store's thread that serves the dispatcher. A pass while this host's
  clock is too far off the database's plans nothing (``plan_skipped``; the dispatcher pauses, as for sending):
  the first maintenance that finds the clock right runs it. A pass that fails (the database away) is run again by
  a maintenance (``plan_retry_scheduled``), each failure in a row doubling the wait, up to
  ``PLAN_RETRY_MAX_SECONDS``.
* The **dispatch loop** runs the dispatcher until the queue is empty, then waits
  for a planning run to wake it or ``dispatch_poll_seconds``. When the dispatcher
  paused (connection failures in a row, a refused login, an SMTP setup that
  cannot work), the loop waits
  ``sending.pause_retry_seconds`` and resumes it to try the server again; each
  pause in a row doubles the wait (up to 15 minutes), a send that gets past the
  connection starts it over. ``/healthz`` answers 503 while it is paused (``/readyz``,
  a load balancer's probe, does not: the links work). SIGHUP
  (or a watched change) resumes it at once.
* The **web server** (``worker.links``) answers unsubscribe and feedback links,
  ``/healthz``, ``/readyz`` and ``/metrics``. It listens from before the catch-up
  planning until the shutdown is done; ``/healthz`` is 503 (``starting``,
  ``stopping``) outside the time between ``READY=1`` and the stop signal, ``/readyz``
  from the stop signal on.
* **SIGTERM/SIGINT**: stop the scheduler, stop claiming, let sends under way finish
  within ``shutdown_grace_seconds`` and record them, let a planning pass under way
  finish and record it (its thread cannot be stopped), exit 0. Outcomes a database
  outage kept from the ledger (``Dispatcher.unwritten``) are written in what is left
  of the grace period (at least ``KEPT_SECONDS``, also those of a run the grace period
  cut short, before its rows in flight are marked), should the database be back; if
  not, ``shutdown_outcomes_not_written`` and exit 1. After the grace
  period, the sends still in flight are cut off: one before the DATA command (nothing
  of it sent) goes back to the queue (``Dispatcher._sender``), this worker's other rows
  in flight are marked ``uncertain`` (claimed
  ones go back to the queue; when the database cannot be reached then, or does not
  answer within ``ABANDON_SECONDS``, exit 1 and they lapse as below; a stuck database's
  threads are not waited for). A claim still waiting for the database when the stop
  came (another program's SQLite write lock) is waited for ``STOP_PATIENCE_SECONDS``,
  then left to its thread (``shutdown_left_claim``, exit 0: it held nothing; rows it
  takes after all lapse back to the queue). A second signal exits at once with code 1; rows in
  flight then become ``uncertain`` when their lease lapses. A reload under way
  gives up at the next render of its check; no template copy outlives the
  process, not even the second signal's immediate exit (only a SIGKILL's). (A SIGTERM repeated
  within a second is one request: ``timeout`` signals the process and its group.) From the command's start
  until the event loop takes them, ``StartupSignals`` holds the signals: a stop ends start-up at its next step
  with exit 0, a SIGHUP is kept for a reload once the daemon is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from worker import eventloop, log
from worker.adapters import db, opstore, systemd
from worker.adapters.render_worker import TimeLimitedRenderer
from worker.adapters.smtp import SmtpTransport
from worker.adapters.templates import JinjaTemplates
from worker.adapters.web import HttpServer
from worker.app import (
    Deps,
    campaigns_not_sent,
    clock_guard,
    compose_pool,
    link_keys,
    make_limiter,
    release_lapsed_leases,
    remove_snapshot,
    smtp_password,
    snapshot_templates,
    unhold_waiting_rows,
    worker_id,
)
from worker.asyncstore import AsyncStore
from worker.checks import Problem, check_templates
from worker.config import Settings, load_settings, naming_the_line
from worker.core.cron import never_runs
from worker.core.lifecycle import shown_offset
from worker.core.retry import ACCOUNT_LIMIT_RETRY_SECONDS, doubled_wait, pause_retry_seconds
from worker.domain import Locale, RenderedEmail
from worker.errors import ConfigError, db_upgrade_command
from worker.links import Site
from worker.metrics import RATE_WINDOW_SECONDS, Metrics
from worker.pipeline import Composer, enabled_campaigns, plan
from worker.scheduler import Scheduler, missed_run
from worker.sending import Dispatcher
from worker.stopping import STOP_SIGNALS, StartupSignals, StartupStopped, StopSignals

EXIT_OK, EXIT_FORCED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
ABANDON_SECONDS, STUCK_CLOSE_SECONDS = 10.0, 2.0
"""After the grace period, how long the shutdown waits for the database to mark this worker's rows in flight: one
that does not answer (a lock held by a long transaction, a host gone silent) is given up, the daemon closes what
it can within ``STUCK_CLOSE_SECONDS`` and exits 1 without waiting for the threads the database holds."""
KEPT_SECONDS = 2.0
"""The least time a shutdown gives to write the outcomes a database outage kept (``Dispatcher.unwritten``), should
the sends on the wire have taken the whole grace period."""
CATCH_UP_PASS_SECONDS = 600
"""How long systemd is asked to wait (``EXTEND_TIMEOUT_USEC``) for each campaign's catch-up pass before ``READY=1``:
a large shop's passes, one after the other, outlast the default ``TimeoutStartSec`` (90 s), and systemd would
stop the daemon and start it over into the same catch-up, again and again."""
PLANNING_HOLD_SECONDS = 120.0
"""The longest the dispatcher is held while planning passes are under way (``Dispatcher.held``): a first pass over
a million customers takes seconds, but passes that follow each other without a break (crons closer than the passes
are long) must not stop sending altogether."""
PLAN_RETRY_MAX_SECONDS = 3600.0
"""The longest wait before a maintenance tries again a campaign's failed planning pass: the first comes at the next
maintenance, each that fails again doubles the wait, up to this (a pass that fails for good is not run every minute)."""
MISSED_AFTER_SECONDS = 2 * Scheduler.WAKE_SECONDS
"""How long after a cron time a maintenance takes it for missed, when no pass since has recorded it (``_plan_missed``):
longer than APScheduler can be late with it (``Scheduler.WAKE_SECONDS``), so a maintenance does not race the firing."""
DISPATCH_RETRY_MAX_SECONDS = 60.0
"""The longest wait before the dispatcher tries again after runs that failed in a row (``dispatch_retry_seconds``)."""
RESTART_ONLY = ("database", "web")
"""Config sections a reload cannot change (they need a restart)."""


class TemplatesRejected(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(f"{len(problems)} template problem(s)")
        self.problems = problems


@dataclass
class Generation:
    settings: Settings
    snapshot: Path
    templates: JinjaTemplates
    transport: SmtpTransport
    dispatcher: Dispatcher

    async def close(self) -> None:
        await self.transport.close()
        await asyncio.to_thread(self.dispatcher.close)  # joins the compose helpers, if any
        remove_snapshot(self.snapshot)


def folder_signature(*paths: Path) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime, size) of every file under ``paths``: changes when anything is edited."""
    out: list[tuple[str, int, int]] = []
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            with contextlib.suppress(OSError):
                st = p.stat()
                out.append((str(p), st.st_mtime_ns, st.st_size))
    return tuple(out)


class ReloadStopped(Exception):
    """The daemon began to stop while a reload was checking templates: the reload gave up, leaving nothing behind."""


class _StoppableChecker(TimeLimitedRenderer):
    """The template check's renderer: before each render, ``check`` raises once a stop signal has come, so the
    check gives up between two renders (start-up: ``StartupStopped``; a reload: ``ReloadStopped``)."""

    def __init__(self, root: Path, *, timeout_seconds: float, check: Callable[[], None]) -> None:
        super().__init__(root, timeout_seconds=timeout_seconds)
        self.check = check

    def render(self, campaign: str, locale: Locale, context: Mapping[str, object]) -> RenderedEmail:
        self.check()
        return super().render(campaign, locale, context)


TOLD_CHECKED_PER_LINE = 5_000
"""The messages told to wait for their domain's rate that one health line checks in the ledger (``still_waiting``):
100,000 took 1.7 s of the database thread on PostgreSQL, 0.5 s on SQLite; 5,000 a line check such a backlog in 20."""


class Daemon:
    def __init__(self, settings: Settings, *, config_path: Path, deps: Deps | None = None,
                 starting: StartupSignals | None = None) -> None:
        self.config_path = config_path
        self.starting = starting
        self._named_folder: Path | None = None
        """The templates folder the config file names when a reload that moved there was rejected (a template
        broken in it): watched beside the running one, so that mending it there is a change the watcher reloads."""
        self._watched = self._watch_signature(settings)
        """The template and config files as they were before this generation copied them (the watcher's reference):
        one saved while the start-up check runs is a change the watcher reloads."""
        self._watch_epoch = 0
        """Counts the reload's changes of ``_watched``: a look of the watcher begun before one compares files read
        against the reference it replaced, and is dropped (it took a moved folder for an edit, a second reload)."""
        self.deps = deps or Deps.build(settings)
        self.store = self.deps.store
        self.clock = self.deps.clock
        self.worker = worker_id()
        self._told_checked = 0
        """Where the next health line goes on checking the messages told to wait for their domain's rate."""
        self.keys = link_keys(settings)
        self.metrics = Metrics()
        self.astore = AsyncStore(self.store)
        self._snapshots: set[Path] = set()
        """Every template copy this daemon made: ``_close`` removes any a generation did not (its close cut short
        by the shutdown, say), so nothing of it stays in the temporary folder."""
        if starting is not None:
            starting.before_forced_exit.append(self._remove_snapshots)
        try:
            self.gen = self._build_generation(settings, stop_check=starting.check if starting is not None else None,
                                              starting=True)
        except BaseException:
            self.astore.close()
            raise
        self.scheduler = Scheduler(settings.shop.time_zone)
        self.web: HttpServer | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._resume_now = asyncio.Event()
        """Set by a reload: a paused dispatcher tries again at once."""
        self._signals = starting.signals if starting is not None else StopSignals()
        self._active: Generation | None = None
        self._retired: list[Generation] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._reload_lock = asyncio.Lock()
        self._reloading: asyncio.Task[None] | None = None
        """The task running reloads, one after the other, while there are any to run."""
        self._reload_next: str | None = None
        """The trigger of the reload queued behind the one under way: one at most, later requests join it."""
        self._reload_after_start: str | None = None
        """A reload asked for during the catch-up planning (the signals are the loop's, not yet READY=1)."""
        self._reload_catch_up: asyncio.Future[None] | None = None
        """The catch-up planning of the last accepted reload (``_catch_up_after_reload``)."""
        self._planning: dict[asyncio.Future[None], str] = {}
        """Planning passes under way, and their campaigns: the shutdown waits for them."""
        self._plan_skipped: set[str] = set()
        """Campaigns whose planning pass was skipped for this host's clock (``_plan_pass``): planned at the first
        maintenance that finds the clock right again."""
        self._plan_failed: dict[str, tuple[float, float]] = {}
        """Campaigns whose last planning pass failed (the database away, a lock timeout): when a maintenance plans it
        again (the clock's monotonic seconds), and the wait that led there (``_plan_again_later``)."""
        self._campaigns_checked = False
        """Whether this generation's first read of the waiting rows (``app.campaigns_not_sent``: the start's before any
        claim, a reload's at its first maintenance) has failed those of unknown campaigns, rewritten times written by
        hand, and named the campaigns turned off that leave rows waiting: once a start and a reload, as it reads
        every waiting row."""
        self._reading = asyncio.Lock()
        """Held by the read of the waiting rows: the start's, should it outlast a maintenance interval, and the first
        maintenance's are one read, not two at once saying the same."""
        self._planning_since = 0.0
        """When the passes under way began, without a break (the clock's monotonic seconds); or the catch-up."""
        self._catching_up = False
        """The start-up's catch-up planning is under way (``_catch_up``): the dispatcher is held from before its
        first claim, not only during each pass, as a message already due must not take the slot of one a pass is
        about to plan (a birthday offer, on the birthday: it would be capped until it expired)."""
        self._halt = threading.Event()
        """Set when the daemon begins to stop (the stop signal, or its close): a reload's template check (on a thread)
        gives up at its next render, and ``phase`` is ``stopping``."""
        self._builds: set[asyncio.Future[Generation]] = set()
        """Reloads' generations being built on a thread: a reload cancelled by the shutdown leaves its build
        running; ``_close`` waits for it and closes what it built (its template copy, its SMTP transport)."""
        self._stuck = False
        """The database did not answer the shutdown: the exit waits for no thread (``os._exit``)."""
        self._up = False
        """``READY=1`` has been sent: the start-up (and its catch-up planning) is done."""
        self._schema = db.newest_revision()
        """The schema this code needs (``Deps.build`` checked it): maintenance stops the daemon when it changes."""
        self._known = db.known_revisions(self.store.engine)
        """The revisions this code has, read now: a newer Kembali installed over it later does not add its own."""
        self._file = db.file_identity(self.store.engine)
        """The SQLite file the daemon opened (its device and inode; None on PostgreSQL): maintenance stops the daemon
        when its path names another file, or none."""
        self._exit_code = EXIT_OK
        """The exit code of a stop the daemon chose (a schema changed under it), unless the shutdown's is worse."""

    @property
    def phase(self) -> str:
        """``starting`` until ``READY=1``, ``running``, then ``stopping`` from the stop signal on (``/healthz``)."""
        return "stopping" if self._halt.is_set() else "running" if self._up else "starting"

    # --- generations ---------------------------------------------------------------

    def _build_generation(self, settings: Settings, *, stop_check: Callable[[], None] | None = None,
                          starting: bool = False) -> Generation:
        """A checked generation; raises TemplatesRejected or ConfigError, or what ``stop_check`` raises (it is
        called before each render of the check) when a stop signal has come; nothing is left behind. ``starting``:
        the daemon's first, said in the log before its check (a reload says ``reload_started``)."""
        password = smtp_password(settings)  # an unset variable is said before the seconds of the check, not after
        snapshot = snapshot_templates(settings)
        self._snapshots.add(snapshot)
        try:
            if starting:  # rendering every template for the sample customers takes seconds (more on a busy host)
                log.event("daemon_starting", worker=self.worker, config=str(self.config_path.resolve()),
                          templates=str(settings.resolve(settings.templates.dir)),
                          doing="checking the templates against sample customers")
            templates = JinjaTemplates(snapshot / "t", recheck_seconds=None,  # a private copy: never edited
                                       time_limit=settings.checks.render_timeout_seconds)
            # the sandbox does not bound CPU: check in a helper process that is killed past the time limit
            limit = settings.checks.render_timeout_seconds
            with (TimeLimitedRenderer(snapshot / "t", timeout_seconds=limit) if stop_check is None
                  else _StoppableChecker(snapshot / "t", timeout_seconds=limit, check=stop_check)) as checker:
                problems = check_templates(settings, checker)
            if problems:
                raise TemplatesRejected(problems)
            transport = SmtpTransport(settings.smtp, password=password)
        except BaseException:
            remove_snapshot(snapshot)
            raise
        composer = Composer(settings, templates, self.keys[0])
        dispatcher = Dispatcher(
            settings=settings,
            store=self.astore,
            composer=composer,
            transport=transport,
            clock=self.clock,
            worker=self.worker,
            limiter=make_limiter(settings, self.astore, self.clock),
            compose_pool=compose_pool(settings, templates, composer),
            clock_guard=clock_guard(settings, self.astore, self.clock),
        )
        dispatcher.observer = self.metrics
        dispatcher.held = self._holding  # priority decides only between rows that exist: wait for them
        return Generation(settings, snapshot, templates, transport, dispatcher)

    def paused(self) -> bool:
        """Whether sending is paused (the dispatcher's consecutive-failure pause, when it has one)."""
        return bool(getattr(self.gen.dispatcher, "paused", False))

    def waiting_for_domain_rate(self) -> int:
        """The messages this daemon sent back to the ledger to wait for their recipient domain's slot, not due yet
        (``Limiter.waiting``, carried over by a reload's ``take_over``)."""
        return self.gen.dispatcher.limiter.waiting()

    # --- running ---------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        settings = self.gen.settings
        code: int | None = None
        try:
            if self.starting is not None:
                self.starting.check()  # a stop signal that came before the loop took the signals over
            if settings.web.enabled:
                site = Site(store=self.astore, keys=self.keys, settings=lambda: self.gen.settings, clock=self.clock,
                            metrics=self.metrics, paused=self.paused, phase=lambda: self.phase,
                            waiting=self.waiting_for_domain_rate,
                            relay_pace=lambda: self.gen.dispatcher.limiter.pace)
                self.web = HttpServer(site.handle, host=settings.web.host, port=settings.web.port,
                                      timeout_seconds=settings.web.request_timeout_seconds,
                                      max_connections=settings.web.max_connections)
                port = await self._start_web(self.web, settings)
                log.event("web_started", host=settings.web.host, port=port)
            self._schedule(settings)
            self.scheduler.start()
            self._catching_up, self._planning_since = True, self.clock.monotonic()
            dispatch = asyncio.create_task(self._dispatch_loop(), name="kembali-dispatch")
            await self._catch_up(settings)
            if self._stop.is_set():  # stopped while catching up: it never was up
                return await self._shutdown(dispatch)
            # what it runs against, so a log tells a staging daemon from the live one (the URL's password hidden)
            log.event("daemon_started", worker=self.worker, campaigns=",".join(enabled_campaigns(settings)),
                      time_zone=settings.shop.time_zone, jobs=",".join(self.scheduler.job_ids()),
                      event_loop=eventloop.describe(), config=str(self.config_path.resolve()),
                      database=db.describe_url(settings.database_url),
                      smtp=f"{settings.smtp.host}:{settings.smtp.port}")
            self._up = True
            systemd.notify("READY=1", "STATUS=running")
            if self.starting is not None and self.starting.hangup:  # (the asyncio loop does not hand it on)
                self._reload_after_start = self._reload_after_start or "SIGHUP during start-up"
            if self._reload_after_start is not None:
                self.request_reload(self._reload_after_start)
            await self._stop.wait()
            code = await self._shutdown(dispatch)
            return code
        finally:
            # a call left to its thread (a claim waiting for another program's SQLite write lock when the stop came,
            # nothing in flight): closing would wait for it, as for a stuck one, but the stop itself went as asked
            held = self._stuck or self.astore.left_running
            try:
                if held:  # closing may wait on the database as well
                    await asyncio.wait({asyncio.ensure_future(self._close())}, timeout=STUCK_CLOSE_SECONDS)
                else:
                    await self._close()
            finally:  # not before: a SIGHUP (a log rotation) or SIGTERM while closing would kill it where it stands
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            if held:  # threads held by the database would keep the process (asyncio.run and the interpreter join
                self._remove_snapshots()  # them at the exit): all is logged, nothing else is left to record
                logging.shutdown()
                os._exit(EXIT_FORCED if self._stuck or code is None else code)

    @staticmethod
    async def _start_web(web: HttpServer, settings: Settings) -> int:
        """Listen, or say which key to change: ``[Errno 98] … address already in use`` alone named no key."""
        try:
            return await web.start()
        except OSError as exc:
            key = "web.port" if exc.errno in (errno.EADDRINUSE, errno.EACCES) else "web.host"
            why = os.strerror(exc.errno).lower() if exc.errno and exc.errno > 0 else str(exc)  # not asyncio's retelling
            hint = ": another program listens there" if exc.errno == errno.EADDRINUSE else ""
            raise ConfigError(f"{settings.source}: '{key}': cannot listen on {settings.web.host}:{settings.web.port} "
                              f"({why}){hint}") from None

    def _schedule(self, settings: Settings) -> None:
        self.scheduler.remove_all()
        now = self.clock.now()
        for campaign in enabled_campaigns(settings):
            cron = settings.schedule.cron_of(campaign)
            nxt = self.scheduler.add_cron(f"plan:{campaign}", cron, self._planner(campaign), now=now,
                                          time_zone=settings.shop.time_zone)  # a reload's, which may be another
            log.event("job_scheduled", job=f"plan:{campaign}", cron=cron, next_run=nxt.isoformat() if nxt else "")
            if nxt is None:  # a valid cron no day matches (0 0 31 2 *): a way to pause a job, or a mistake
                log.event("campaign_never_planned", logging.WARNING, campaign=campaign, cron=cron,
                          setting=settings.schedule.cron_key(campaign),
                          why=never_runs(cron) or "no time to come matches it")
        self.scheduler.add_interval("maintenance", settings.schedule.maintenance_interval_seconds, self.maintenance)
        if settings.daemon.health_summary_seconds:
            self.scheduler.add_interval("health", settings.daemon.health_summary_seconds, self.health)
        if settings.daemon.watch_templates:
            self.scheduler.add_interval("watch", settings.daemon.watch_interval_seconds, self._watch)
        watchdog = systemd.watchdog_seconds()
        if watchdog:
            self.scheduler.add_interval("watchdog", watchdog, self._watchdog)

    async def _catch_up(self, settings: Settings) -> None:
        """Plan once now for every campaign whose last scheduled run was missed (the daemon was down). The
        dispatcher is held meanwhile (``_holding``), as during any pass; then it sends what they planned."""
        try:
            await self._first_read()
            await self._catch_up_passes(settings)
        finally:
            self._catching_up = False
            self._wake.set()

    async def _first_read(self) -> None:
        """The waiting rows read once before the first claim (the dispatcher is held by the catch-up): on SQLite a
        time written by hand in another form is compared as text by the claim, so one due later (written with a
        negative offset, say) would be sent early, up to that offset, were the first maintenance left to read it.
        A clock off the database's, or a database that cannot be read, leaves it to the first maintenance that can."""
        dispatcher = self.gen.dispatcher
        try:
            if dispatcher.clock_guard is not None and await dispatcher.clock_guard.check():
                return
            await self._read_waiting_rows()
        except Exception as exc:
            log.event("job_failed", logging.ERROR, job="maintenance", during="start-up", error=log.error_line(exc),
                      note="the next maintenance reads the waiting rows")

    async def _read_waiting_rows(self) -> None:
        """``app.campaigns_not_sent``, once a start and a reload (``_campaigns_checked``: set before the read, so that
        a reload meanwhile, which clears it, has its own at the next maintenance; cleared again if the read fails), for
        the settings as they are when it reads (a maintenance's, begun before a reload, read for the old ones)."""
        async with self._reading:
            if not self._campaigns_checked:
                self._campaigns_checked = True
                try:
                    await campaigns_not_sent(self.store, self.astore, self.gen.settings, self.clock.now())
                except BaseException:
                    self._campaigns_checked = False
                    raise

    async def _catch_up_passes(self, settings: Settings, *, trigger: str | None = None) -> None:
        """Plan once each campaign whose planning time passed since its last pass: at the start, or after a reload
        (``trigger``) that turned a campaign on or moved its planning time, as a restart would have."""
        now = self.clock.now()
        campaigns = enabled_campaigns(settings)
        for i, campaign in enumerate(campaigns):
            if self._stop.is_set():  # a stop signal during one campaign's pass: leave the rest to the next start
                log.event("plan_catch_up_stopped", left=",".join(campaigns[i:]))
                return
            if trigger is not None and campaign in self._planning.values():  # its pass under way plans it
                continue
            try:
                last = await self.astore.call(opstore.last_run, self.store, f"plan:{campaign}")
                due = missed_run(settings.schedule.cron_of(campaign), settings.shop.time_zone, last, now)
                if due is not None:
                    log.event("plan_catch_up", campaign=campaign, missed=due.isoformat(),
                              last_run=last.isoformat() if last else "never", trigger=trigger or "start-up")
                    if trigger is None:  # before READY=1: systemd's start-up timeout is running
                        systemd.notify(f"EXTEND_TIMEOUT_USEC={CATCH_UP_PASS_SECONDS * 1_000_000}",
                                       f"STATUS=catching up: planning {campaign} ({i + 1} of {len(campaigns)})")
                    await self._planner(campaign)()
            except Exception as exc:  # as a scheduled run's failure: logged; the sends under way go on
                log.event("job_failed", logging.ERROR, job=f"plan:{campaign}", during="catch-up",
                          error=log.error_line(exc), note="not recorded as run: tried again at a maintenance")
                if campaign not in self._plan_failed:  # the look at its last run failed, before the pass
                    self._plan_again_later(campaign, settings)

    def _planner(self, campaign: str) -> Callable[[], Awaitable[None]]:
        async def run_plan() -> None:
            if campaign in self._planning.values():  # the catch-up pass beside the cron job, say: not twice at once
                log.event("job_skipped", logging.WARNING, job=f"plan:{campaign}", why="the previous run is still going")
                return
            # shielded: the shutdown's cancelling the job does not cut the pass short (its thread cannot be stopped,
            # and the process would linger after saying it stopped); the shutdown waits for it to be recorded
            task = asyncio.ensure_future(self._plan_pass(campaign))
            if not self._planning and not self._catching_up:  # (the catch-up's hold began with it)
                self._planning_since = self.clock.monotonic()
            self._planning[task] = campaign
            task.add_done_callback(self._planned)
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                task.add_done_callback(functools.partial(_log_failed_pass, campaign))  # nobody else will
                raise

        return run_plan

    def _holding(self) -> bool:
        """Whether the dispatcher claims nothing for now: a planning pass, or the start-up's catch-up planning, is
        under way (for at most ``PLANNING_HOLD_SECONDS`` without a break)."""
        planning = bool(self._planning) or self._catching_up
        return planning and self.clock.monotonic() - self._planning_since < PLANNING_HOLD_SECONDS

    def _planned(self, task: asyncio.Future[None]) -> None:
        """A planning pass ended: once none is under way, the dispatcher (held meanwhile) sends what they planned."""
        self._planning.pop(task, None)
        if not self._planning:
            self._wake.set()

    async def _plan_pass(self, campaign: str) -> None:
        settings = self.gen.settings
        if campaign not in enabled_campaigns(settings):
            self._plan_failed.pop(campaign, None)
            return
        try:
            await self._plan_on_time(campaign, settings)
        except Exception:  # the database away, a lock timeout: a maintenance tries again
            self._plan_again_later(campaign, settings)
            raise
        self._plan_failed.pop(campaign, None)

    async def _plan_on_time(self, campaign: str, settings: Settings) -> None:
        # a clock off the database's plans with the wrong due times and dedupe keys (a week's or year's, for a clock
        # a day off at a boundary), as it sends nothing: the pass waits for the clock (as `run --once` refuses)
        dispatcher = self.gen.dispatcher
        if dispatcher.clock_guard is not None and (problem := await dispatcher.clock_guard.check()):
            dispatcher.pause_for_clock(problem)
            self._plan_skipped.add(campaign)
            log.event("plan_skipped", logging.WARNING, campaign=campaign, reason=problem,
                      note="planned once this host's clock is in step with the database's again")
            return
        self._plan_skipped.discard(campaign)
        now = self.clock.now()
        # on a thread of its own, not the store's: a pass mostly reads (no SQLite write lock), and the
        # dispatcher's claims and commits must not queue behind it for seconds
        report = await asyncio.to_thread(plan, self.store, settings, now, [campaign])
        await self.astore.call(opstore.record_run, self.store, f"plan:{campaign}", at=now, worker=self.worker)
        created = report.created.get(campaign, 0)
        self.metrics.observe_planned(campaign, created, at=now.timestamp())
        log.event("campaign_planned", campaign=campaign, created=created,
                  considered=report.considered.get(campaign, 0))
        if created:
            self._wake.set()

    def _plan_again_later(self, campaign: str, settings: Settings) -> None:
        """A planning pass failed: a maintenance tries it again (``_plan_failed``), the first time the next one, where
        the daemon planned the campaign at its next cron time only, the next day's for a daily one."""
        wait = settings.schedule.maintenance_interval_seconds
        if campaign in self._plan_failed:
            wait = min(max(self._plan_failed[campaign][1] * 2, wait), PLAN_RETRY_MAX_SECONDS)
        self._plan_failed[campaign] = (self.clock.monotonic() + wait, wait)
        log.event("plan_retry_scheduled", logging.WARNING, campaign=campaign, in_seconds=wait,
                  note="a maintenance plans it again once that time has passed")

    async def _plan_missed(self, settings: Settings, enabled: list[str]) -> None:
        """Plan each campaign whose cron time passed since its last recorded pass (``missed_run``, the rule a restart
        plans by) more than ``MISSED_AFTER_SECONDS`` ago, with no pass of it under way nor waiting for a retry: a
        firing skipped because a pass begun before its time (the catch-up at start, just before 09:00) was still
        going, or one APScheduler never fired. Without this the running daemon planned it at the next cron time
        only, a day later for a daily cron, where a restart planned it at once."""
        before = self.clock.now() - timedelta(seconds=MISSED_AFTER_SECONDS)
        for campaign in enabled:
            if self._stop.is_set():
                return
            if campaign in self._planning.values() or campaign in self._plan_failed or campaign in self._plan_skipped:
                continue
            last = await self.astore.call(opstore.last_run, self.store, f"plan:{campaign}")
            if last is None:  # never planned: the start's catch-up (or a reload's) plans it, or failed and retries
                continue
            due = missed_run(settings.schedule.cron_of(campaign), settings.shop.time_zone, last, before)
            if due is not None and campaign not in self._planning.values():
                self._plan_in_maintenance(campaign, due.isoformat())

    def _plan_in_maintenance(self, campaign: str, missed: str) -> None:
        """Run ``campaign``'s planning pass beside the maintenance (``plan_catch_up``, with why it is run now)."""
        log.event("plan_catch_up", campaign=campaign, missed=missed)
        task = asyncio.ensure_future(self._planner(campaign)())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(functools.partial(_log_failed_pass, campaign))

    async def _dispatch_loop(self) -> None:
        failures = 0  # dispatch runs failed in a row (the database away): each waits longer (dispatch_retry_seconds)
        while not self._stop.is_set():
            self._wake.clear()
            gen = self._active = self.gen
            poll = gen.settings.schedule.dispatch_poll_seconds
            try:
                await gen.dispatcher.run_once()
                failures = 0
            except Exception as exc:
                failures += 1
                poll = dispatch_retry_seconds(poll, failures)
                log.event("dispatch_failed", logging.ERROR, error=log.error_line(exc), failures_in_row=failures,
                          retry_in_seconds=poll)  # fmt: skip
            finally:
                self._active = None
                if gen is not self.gen:  # a reload came meanwhile: its run writes them
                    gen.dispatcher.hand_over_unwritten(self.gen.dispatcher)
            await self._close_retired()
            if self._stop.is_set():
                return
            if gen is self.gen and gen.dispatcher.paused is not None:
                await self._wait_out_pause(gen)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), poll)

    async def _wait_out_pause(self, gen: Generation) -> None:
        """The dispatcher paused: wait (longer after each pause in a row), then resume it to try the server again.
        A reload (SIGHUP, a watched change) ends the wait at once, and so does a stop."""
        dispatcher = gen.dispatcher
        first = gen.settings.sending.pause_retry_seconds
        # the provider's daily limit is lifted in hours: trying sooner only costs refused messages
        at_least = ACCOUNT_LIMIT_RETRY_SECONDS if dispatcher.paused_setting == "sending.daily_quota" else 0.0
        # nor sooner than the server said ("421 4.7.0 Too many connections from your IP, try again in 30 minutes"):
        # each try before is one more refusal it counts against this host; up to what a message would wait for it
        if dispatcher.paused_retry_after is not None:
            at_least = max(at_least, min(dispatcher.paused_retry_after, gen.settings.sending.retry_max_seconds))
        delay = pause_retry_seconds(first, max(1, dispatcher.pauses_in_row), at_least=at_least) if first > 0 else None
        log.event("dispatcher_retry_scheduled", logging.WARNING, reason=dispatcher.paused,
                  in_seconds=delay if delay is not None else "never (sending.pause_retry_seconds = 0): send SIGHUP",
                  pauses_in_row=dispatcher.pauses_in_row)  # fmt: skip
        self._resume_now.clear()
        waits = [asyncio.ensure_future(self._stop.wait()), asyncio.ensure_future(self._resume_now.wait())]
        try:
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if self._stop.is_set() or self._resume_now.is_set() or gen is not self.gen:
            return  # stopping, or the reload has resumed (or replaced) the dispatcher
        dispatcher.resume(why=f"retrying after {delay:g} s")

    async def maintenance(self) -> None:
        if self._database_file_changed() or await self._schema_changed():
            return
        settings = self.gen.settings
        dispatcher = self.gen.dispatcher
        if dispatcher.clock_guard is not None and (problem := await dispatcher.clock_guard.check()):
            # lapsed leases and expiries judged on this clock would be another worker's live ones, or early
            dispatcher.pause_for_clock(problem)
            return
        if dispatcher.clock_paused and self._active is None:
            # the clock is right again: no operator's decision to wait for (a SIGHUP, when pause_retry_seconds is 0),
            # nor a retry doubled by the SMTP server's earlier pauses in a row
            dispatcher.resume(why="this host's clock is in step with the database's again")
            self._resume_now.set()
        for campaign in sorted(self._plan_skipped - set(self._planning.values())):  # the clock is right: plan now
            if self._stop.is_set():
                break
            self._plan_skipped.discard(campaign)  # (the pass adds it again should the clock be off again by then)
            self._plan_in_maintenance(campaign, "skipped while this host's clock was off")
        mono, enabled = self.clock.monotonic(), enabled_campaigns(settings)
        for campaign, (at, _) in sorted(self._plan_failed.items()):  # (the pass notes it again should it fail)
            if campaign not in enabled:  # turned off by a reload since
                del self._plan_failed[campaign]
            elif not self._stop.is_set() and at <= mono and campaign not in self._planning.values():
                self._plan_in_maintenance(campaign, "its last pass failed (job_failed)")
        if not self._catching_up and (self._reload_catch_up is None or self._reload_catch_up.done()):
            await self._plan_missed(settings, enabled)
        now = self.clock.now()
        # not the rows this process still has outcomes for (a database outage outlasted their leases): it is alive
        held = self.gen.dispatcher.holds() | (self._active.dispatcher.holds() if self._active is not None else set())
        if any(await release_lapsed_leases(self.store, self.astore, now, keep=held)):
            self._wake.set()
        expired = await self.astore.call(opstore.expire_messages, self.store, now)
        if expired:
            log.event("messages_expired", count=expired)
        await self._read_waiting_rows()
        if await unhold_waiting_rows(self.store, self.astore, self.gen.settings):  # (a reload's meanwhile)
            self._wake.set()
        days = settings.schedule.attempt_retention_days
        if days:
            pruned = await self.astore.call(opstore.prune_attempts, self.store, now - timedelta(days=days))
            if pruned:
                log.event("attempts_pruned", count=pruned, older_than_days=days)

    async def _schema_changed(self) -> bool:
        """Whether the database's schema is no longer the one this code needs (another host's ``kembali db
        upgrade``, a database restored from an older copy): then the daemon says so and stops, exit 3, as a start on
        that schema is refused, rather than go on claiming and writing rows in a schema it does not know. A database
        that cannot be read is not a change: the outage is waited out as everywhere else."""
        engine = self.store.engine
        try:
            current = await self.astore.call(db.current_revision, engine)
        except Exception:
            return False
        if current == self._schema:
            return False
        newer = current is not None and current not in self._known
        log.event("schema_changed", logging.ERROR, database=db.describe(engine), schema=current or "(none)",
                  newest_known=self._schema, what_to_do="install the newer kembali on this host" if newer
                  else f"run `{db_upgrade_command(self.config_path.resolve())}`, or restore the database at schema "
                  f"{self._schema}",  # (the full path: the operator runs it from another folder)
                  note="the daemon stops, as on SIGTERM (exit 3)")  # fmt: skip
        self._stop_unavailable()
        return True

    def _database_file_changed(self) -> bool:
        """Whether the SQLite file's path names another file than the one the daemon opened (a copy restored over
        it) or none (removed): SQLite goes on with the file it has open, so the daemon claimed, sent and recorded in
        a ledger no one reads again (and a restart on a restored copy sent again what the copy does not show sent).
        Then the daemon says so and stops, exit 3, to start again on what the path names. A path that cannot be
        looked at (a permission, a network file system's hiccup) is not a change."""
        if self._file is None:
            return False
        engine = self.store.engine
        try:
            now = db.file_identity(engine)
        except OSError:
            return False
        if now == self._file:
            return False
        log.event("database_file_changed", logging.ERROR, database=db.describe(engine),
                  change="removed" if now is None else "replaced by another file",
                  what_to_do="put the database file back at that path (a new, empty one would plan every email again)"
                  if now is None else "none, if a copy was restored on purpose: what this daemon recorded since in the "
                  "file it had open is not in it (`kembali ledger` and `stats` read the file there now)",
                  note="the daemon stops, as on SIGTERM (exit 3)")  # fmt: skip
        self._stop_unavailable()
        return True

    def _stop_unavailable(self) -> None:
        """Stop as on SIGTERM, to exit 3 (``EXIT_UNAVAILABLE``): the database is no longer the one the daemon began
        with."""
        self._exit_code = EXIT_UNAVAILABLE
        self._halt.set()
        self._stop.set()

    async def health(self) -> None:
        """The health line: what happened here since the last one, the queue, and the ledger's ``uncertain`` rows
        (``uncertain`` counts those this worker left since the last line; ``uncertain_in_ledger``, all of them, any
        worker's, an operator's to decide on). When the database cannot be read, the line still comes (its counts
        are not lost with it), with ``queue_depth`` and ``uncertain_in_ledger`` null and the error."""
        error = ""
        depth: int | None = None
        uncertain: int | None = None
        try:
            depth, uncertain = await self.astore.call(opstore.health_counts, self.store, self.clock.now())
        except Exception as exc:
            error = log.error_line(exc)
        else:
            with contextlib.suppress(Exception):  # (unread: the count stays as this process's memory has it)
                await self._forget_not_waiting()
        line = self.metrics.health(self.clock.monotonic())
        guard = self.gen.dispatcher.clock_guard
        offset = None if guard is None or guard.offset is None else shown_offset(guard.offset)
        waiting = self.waiting_for_domain_rate()
        if depth is not None:
            depth += waiting
        limiter = self.gen.dispatcher.limiter
        if not error:  # (a database that did not answer the counts would hold the line a connect timeout more)
            with contextlib.suppress(Exception):  # (unread: the pace as this worker last saw it)
                await limiter.refresh_pace()  # shared through the database: another worker's cut shows here too
        pace = limiter.pace
        relay = limiter.relay_status()
        fields = dataclasses.asdict(line) | relay | {"queue_depth": depth, "waiting_for_domain_rate": waiting,
                                             "uncertain_in_ledger": uncertain, "paused": self.paused(),
                                             "paused_why": self.gen.dispatcher.paused or "",
                                             "database": "unreachable" if error else "ok",
                                             "clock_offset_seconds": offset}  # fmt: skip
        if error:
            log.event("health", logging.WARNING, **fields, error=error)
        else:
            log.event("health", **fields)
        queue = f"queue {depth}" if depth is not None else "database unreachable"
        if waiting and depth is not None:
            queue += f" ({waiting} waiting for their domain's rate)"
        if uncertain:
            queue += f", {uncertain} uncertain in the ledger"
        if pace.slowed:
            queue += f", the relay's throttling slowed sending to {pace.current:.3g}/s"
        # the sends and failures since the last health line; the rate over the metrics' own window
        systemd.notify(f"STATUS=in the last {self.gen.settings.daemon.health_summary_seconds:g}s: sent {line.sent}, "
                       f"failed {line.failed}; {queue}, {line.rate_per_minute}/min over the last "
                       f"{RATE_WINDOW_SECONDS:g}s")

    async def _forget_not_waiting(self) -> None:
        """Drop from the count of the messages waiting for their domain's rate those the ledger says wait no more (an
        operator cancelled them, or they were claimed or sent since): counted until their slot came, days off at a
        slow rate, and brought forward by a reload that raised the rate (one a contact policy had since deferred)."""
        limiter = self.gen.dispatcher.limiter
        told = limiter.told_times()
        start = self._told_checked if self._told_checked < len(told) else 0
        ids = list(told)[start : start + TOLD_CHECKED_PER_LINE]  # a big backlog a part a line: the database is shared
        self._told_checked = start + len(ids)
        if ids:
            now, mono = self.clock.now(), self.clock.monotonic()
            part = {m: now + timedelta(seconds=told[m] - mono) for m in ids}
            still = await self.astore.call(self.store.still_waiting, part, now=now, worker=self.worker)
            limiter.forget(set(part) - still)

    async def _watchdog(self) -> None:
        systemd.notify("WATCHDOG=1")

    # --- reload ----------------------------------------------------------------------

    def _watch_signature(self, settings: Settings) -> tuple[tuple[str, int, int], ...]:
        return self._signatures(settings.resolve(settings.templates.dir))[1]

    def _signatures(self, running: Path) -> tuple[tuple[tuple[str, int, int], ...], tuple[tuple[str, int, int], ...]]:
        """(the running templates folder's and the config file's signature, that and the folder a rejected reload
        named, ``_named_folder``, when it is another): one read of the files for both."""
        base = folder_signature(running, self.config_path)
        if self._named_folder is None or self._named_folder == running:
            return base, base
        return base, base + folder_signature(self._named_folder)

    async def _watch(self) -> None:
        epoch = self._watch_epoch
        signature = await asyncio.to_thread(self._watch_signature, self.gen.settings)
        if epoch != self._watch_epoch:  # a reload set a new reference meanwhile: the next look compares with it
            return
        if signature != self._watched:
            self._watched = signature
            self.request_reload("watch")

    def request_reload(self, why: str) -> None:
        """Reload now, or once the reload under way is done. Requests that come while one waits join it: a burst
        of SIGHUPs (or of saves) is one reload under way and at most one after it, which reads the files as they
        are then."""
        if self._stop.is_set():
            return
        if self.phase == "starting":  # a reload's READY=1 would tell systemd the daemon is up: wait until it is
            if self._reload_after_start is None:
                log.event("reload_queued", trigger=why, note="once the daemon is up")
            self._reload_after_start = why
            return
        if self._reloading is None:
            self._reloading = asyncio.create_task(self._reload_while_asked(why), name="kembali-reload")
            self._tasks.add(self._reloading)
            self._reloading.add_done_callback(self._tasks.discard)
        elif self._reload_next is None:
            self._reload_next = why
            log.event("reload_queued", trigger=why, note="after the reload under way")
        else:
            log.event("reload_coalesced", trigger=why, joined=self._reload_next)

    async def _reload_while_asked(self, why: str) -> None:
        try:
            trigger: str | None = why
            while trigger is not None and not self._stop.is_set():
                try:
                    await self.reload(trigger)
                except Exception as exc:  # not one of the refusals _reload names: the old set stays all the same
                    log.event("reload_rejected", logging.ERROR, trigger=trigger, error=log.error_line(exc))
                trigger, self._reload_next = self._reload_next, None
        finally:
            self._reloading = None

    async def reload(self, why: str) -> bool:
        """Load config and templates again; swap them in only if every check passes."""
        async with self._reload_lock:
            if self._stop.is_set():
                return False
            systemd.reloading()
            paused = self.gen.dispatcher.paused
            try:
                return await self._reload(why)
            finally:
                if not self._stop.is_set():  # stopping: systemd has had STOPPING=1, the dispatcher is stopped
                    self._after_reload(why, paused)

    def _after_reload(self, why: str, paused: str | None) -> None:
        systemd.notify("READY=1")
        if paused is not None:  # the operator may have fixed the server: try it again at once
            if self.gen.dispatcher.paused is not None:  # the reload was rejected: the same dispatcher
                self.gen.dispatcher.resume(why=f"reload ({why}): trying the server again")
            else:
                log.event("dispatcher_resumed", logging.WARNING, was=paused,
                          why=f"reload ({why}): trying the server again with the new configuration")
            self._resume_now.set()

    async def _reload(self, why: str) -> bool:
        log.event("reload_started", trigger=why)
        old = self.gen
        # the files as they are before this reload reads them: one saved while it runs is seen by the watcher
        # as a change and reloaded next (a signature taken after the reload would count it as loaded)
        running = old.settings.resolve(old.settings.templates.dir)
        base, self._watched = await asyncio.to_thread(self._signatures, running)
        self._watch_epoch += 1
        try:
            settings = load_settings(self.config_path)
        except ConfigError as exc:
            log.event("reload_rejected", logging.ERROR, trigger=why, error=str(exc))
            return False
        named = settings.resolve(settings.templates.dir)
        watched: tuple[tuple[str, int, int], ...] | None = None
        if named != running:
            # the watcher looks at the new folder once this is accepted: its files as they are before the copy
            # (the config file as it was before it was read), or the next look takes the move for an edit; and
            # beside the running one until then, so that a template mended there after a rejection is reloaded
            fresh = await asyncio.to_thread(folder_signature, named)
            config = str(self.config_path)
            watched = fresh + tuple(entry for entry in base if entry[0] == config)
            self._named_folder, self._watched = named, base + fresh
        else:
            self._named_folder, self._watched = None, base
        self._watch_epoch += 1
        changed = _restart_only_changes(old.settings, settings)
        if changed:  # each key by name, the first with its line (never a value: the database URL's password)
            first, *others = changed
            more = f" (and {', '.join(repr(key) for key in others)})" if others else ""
            log.event("reload_rejected", logging.ERROR, trigger=why, error=naming_the_line(
                f"{settings.source}: '{first}'{more} changed: a reload cannot apply it, restart the daemon to apply "
                "(the running daemon keeps the value it started with)", settings))
            return False
        build = asyncio.ensure_future(asyncio.to_thread(self._build_generation, settings, stop_check=self._halted))
        self._builds.add(build)
        try:
            # shielded: cancelling the reload cannot stop the thread, and what it builds must be closed, not lost
            gen = await asyncio.shield(build)
        except asyncio.CancelledError:
            log.event("reload_stopped", trigger=why, why="the daemon is stopping")
            raise
        except ReloadStopped:
            self._builds.discard(build)
            log.event("reload_stopped", trigger=why, why="the daemon is stopping")
            return False
        except TemplatesRejected as exc:
            self._builds.discard(build)
            for problem in exc.problems:
                log.event("template_problem", logging.ERROR, file=problem.where or f"{problem.campaign}/",
                          campaign=problem.campaign, locale=problem.locale, error=problem.message)
            log.event("reload_rejected", logging.ERROR, trigger=why, problems=len(exc.problems),
                      first=str(exc.problems[0]), kept="the previous templates and config")
            return False
        except ConfigError as exc:  # found after the file was read (a templates folder that is not there): its line
            self._builds.discard(build)
            log.event("reload_rejected", logging.ERROR, trigger=why, error=naming_the_line(str(exc), settings))
            return False
        self._builds.discard(build)
        if self._stop.is_set():  # the check was done when the stop signal came: the daemon stops with the old set
            await gen.close()
            log.event("reload_stopped", trigger=why, why="the daemon is stopping")
            return False
        # the slots booked, the domains slowed down, the messages told to wait for a domain's slot
        sooner = gen.dispatcher.limiter.take_over(old.dispatcher.limiter)
        self.gen = gen
        self._named_folder = None
        if watched is not None:
            self._watched = watched
            self._watch_epoch += 1
        await self._bring_forward(sooner)
        # a language stored for a customer that has no templates reads as the shop's (``Store.default_locale``):
        # the shop's as reloaded, for the pages and this process's sends as for the compose helpers' new store
        self.store.default_locale = Locale(settings.shop.default_locale)
        self._retired.append(old)
        if self._active is not old:
            # what the last run could not write (the database away): the new dispatcher's next run writes it (a
            # run under way hands its own over as it ends, in _dispatch_loop)
            old.dispatcher.hand_over_unwritten(gen.dispatcher)
            await self._close_retired()
        else:
            old.dispatcher.stop()  # finish sends under way; claimed rows go back to the queue for the new set
        if (settings.logging.level, settings.logging.format) != (old.settings.logging.level,
                                                                old.settings.logging.format):
            log.configure(settings.logging.level, settings.logging.format)
        self._schedule(settings)
        self._catch_up_after_reload(settings, why)
        self._campaigns_checked = False  # a campaign turned off or on: said again at the next maintenance
        # each language's: the ledger's template_version of what it sends; one edited alone changes its own
        versions = [f"{c}/{loc}@{gen.templates.template_version(c, loc)}"
                    for c in gen.templates.campaigns() for loc in gen.templates.locales(c)]
        log.event("reload_done", trigger=why, templates=",".join(versions))
        self._wake.set()
        return True

    def _catch_up_after_reload(self, settings: Settings, why: str) -> None:
        """Plan, beside the reload (a large shop's passes take minutes), each campaign whose planning time has passed
        since its last pass under the reloaded settings: one turned on (never planned, or not since its time came), one
        whose cron moved to a time already gone today. It waited for its next cron time, a week for a weekly one,
        where a restart plans it at once. The catch-up of an earlier reload still going gives way to this one's (a
        pass under way finishes: a pass of its campaign is not run twice at once)."""
        if self._reload_catch_up is not None:
            self._reload_catch_up.cancel()
        task = asyncio.ensure_future(self._catch_up_passes(settings, trigger=why))
        self._reload_catch_up = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _bring_forward(self, sooner: dict[str, dict[int, float]]) -> None:
        """Write in the ledger the new times a reload gave the messages waiting for a domain whose rate it raised
        (``Limiter.take_over``): they go at the new rate, not at the old one's slots. Should the database fail, they
        keep their old times (logged)."""
        now, mono = self.clock.now(), self.clock.monotonic()
        for domain, moves in sooner.items():
            if not moves:
                continue
            at = {message: now + timedelta(seconds=max(0.0, t - mono)) for message, t in moves.items()}
            try:
                moved = await self.astore.call(self.store.bring_forward, at)
            except Exception as exc:
                log.event("domain_rate_waits_not_brought_forward", logging.WARNING, domain=domain, messages=len(at),
                          error=log.error_line(exc), note="they go at the slots the old rate gave them")  # fmt: skip
                continue
            log.event("domain_rate_waits_brought_forward", domain=domain, messages=moved,
                      last_due=max(at.values()).isoformat())  # fmt: skip
            self._wake.set()

    def _halted(self) -> None:
        """Raise ReloadStopped once the daemon has begun to stop (called on the reload's thread)."""
        if self._halt.is_set():
            raise ReloadStopped

    async def _close_retired(self) -> None:
        retired = [g for g in self._retired if g is not self._active]
        self._retired = [g for g in self._retired if g is self._active]
        for gen in retired:
            await gen.close()

    # --- stopping ----------------------------------------------------------------------

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        verdict = self._signals.take(sig)
        if verdict == "echo":
            return
        if verdict == "force":
            log.event("shutdown_forced", logging.WARNING, signal=sig.name,
                      note="rows in flight become uncertain when their lease lapses")
            self._remove_snapshots()  # the one thing that would outlive the process
            logging.shutdown()
            os._exit(EXIT_FORCED)
        log.event("shutdown_requested", signal=sig.name, grace_seconds=self.gen.settings.daemon.shutdown_grace_seconds)
        self._halt.set()
        self._stop.set()

    def _on_hangup(self) -> None:
        if self.starting is not None:
            self.starting.hangup = False  # uvloop hands on a SIGHUP that came during start-up: one reload does
        self.request_reload("SIGHUP")

    async def _shutdown(self, dispatch: asyncio.Task[None]) -> int:
        # (the stop signal set _halt: /healthz says "stopping", a reload's check gives up)
        systemd.notify("STOPPING=1")
        self.scheduler.shutdown()
        for task in list(self._tasks):
            task.cancel()
        for gen in (self.gen, self._active, *self._retired):
            if gen is not None:
                gen.dispatcher.stop()
        self._wake.set()
        grace = self.gen.settings.daemon.shutdown_grace_seconds
        began = time.monotonic()
        done, _ = await asyncio.wait({dispatch}, timeout=grace)
        code = self._exit_code
        if not done:
            log.event("shutdown_grace_expired", logging.WARNING, grace_seconds=grace)
            dispatch.cancel()
            await asyncio.wait({dispatch}, timeout=2)
        abandoning = time.monotonic()  # the grace period over: the kept outcomes' writing and the marks share
        # ABANDON_SECONDS (TimeoutStopSec is counted on it)
        # kept through a database outage, by the run or by its cut: written in the rest of the grace period (at least
        # KEPT_SECONDS), before the rows still in flight are marked: a send the server took is `sent`, not `uncertain`
        if dispatch.done() and self.gen.dispatcher.unwritten:
            log.event("shutdown_writing_kept_outcomes", outcomes=len(self.gen.dispatcher.unwritten))
            left = await self.gen.dispatcher.write_kept(max(grace - (time.monotonic() - began), KEPT_SECONDS))
            if left:
                log.event("shutdown_outcomes_not_written", logging.ERROR, outcomes=len(left),
                          note="the last outcomes_not_written line names the rows the server took (sent_ids)")
                code = EXIT_FORCED
        if not done:
            now, why = self.clock.now(), "shutdown grace period ran out while sending"
            within = max(ABANDON_SECONDS - (time.monotonic() - abandoning), KEPT_SECONDS)
            try:
                requeued, uncertain = await asyncio.wait_for(self.astore.call(
                    opstore.abandon, self.store, worker=self.worker, now=now, why=why,
                ), within)
            except TimeoutError:  # its thread is held by a call that does not return: leave it to the exit
                self._stuck = True
                log.event("shutdown_abandon_failed", logging.ERROR,
                          error=f"the database {db.describe(self.store.engine)} did not answer within "
                                f"{within:.3g} s", planning_left=",".join(sorted(set(self._planning.values()))),
                          note="rows in flight become uncertain when their lease lapses; a planning pass under way "
                               "is not recorded and runs again at the next start")
                code = EXIT_FORCED
            except Exception as exc:  # the database is gone too: as after a forced exit
                log.event("shutdown_abandon_failed", logging.ERROR, error=log.error_line(exc),
                          note="rows in flight become uncertain when their lease lapses")
                code = EXIT_FORCED
            else:
                log.event("shutdown_abandoned", logging.WARNING, requeued=requeued, uncertain=uncertain)
                self.metrics.left_uncertain += uncertain  # daemon_stopped counts them: the dispatch cut never did
                if uncertain:  # within what is left of ABANDON_SECONDS: TimeoutStopSec is counted on it
                    await self._name_abandoned(now, why, max(ABANDON_SECONDS - (time.monotonic() - abandoning), 0.5))
        if self._planning and not self._stuck:  # idempotent, but a pass cannot be stopped midway: let finish
            log.event("shutdown_waiting_for_planning", campaigns=",".join(sorted(set(self._planning.values()))))
            await asyncio.wait(list(self._planning))
        if self.astore.left_running and not self._stuck:
            log.event("shutdown_left_claim", logging.WARNING, database=db.describe(self.store.engine),
                      note="a claim still waiting for the database (another program holding its write lock?) was "
                           "left unanswered: it held no message; one it takes after all goes back to the queue when "
                           "its lease lapses")
        log.event("daemon_stopped", worker=self.worker, exit_code=code, **self.metrics.since_start())
        return code

    async def _name_abandoned(self, at: datetime, why: str, timeout: float) -> None:
        """One ``email_uncertain`` for each row ``abandon`` made uncertain (the first 100), saying whose email may
        have arrived: ``shutdown_abandoned`` counted them, and the operator decides on each."""
        try:
            rows = await asyncio.wait_for(self.astore.call(opstore.left_uncertain, self.store, at, why=why), timeout)
        except Exception as exc:  # the ledger has them all the same: kembali ledger lists them
            if isinstance(exc, TimeoutError):  # its thread is held by a call that does not return: as abandon's
                self._stuck = True
            log.event("shutdown_abandoned_not_named", logging.WARNING, error=log.error_line(exc),
                      note="see kembali ledger list --status uncertain")
            return
        for row in rows:
            log.event("email_uncertain", logging.WARNING, campaign=row.campaign, dedupe_key=row.dedupe_key,
                      message_id=row.message_id,
                      customer=row.customer, to=log.mask_email(row.email),
                      why="the shutdown's grace period ran out while it was being sent: it may have arrived, and "
                          "is not sent again; see kembali ledger list --status uncertain")  # fmt: skip

    async def _close(self) -> None:
        self._halt.set()
        if self.web is not None:
            await self.web.close()
        if self._builds:  # reloads cancelled by the shutdown: their checks give up at the next render
            await asyncio.wait(self._builds)
            for build in self._builds:
                if not build.cancelled() and build.exception() is None:
                    with contextlib.suppress(Exception):
                        await build.result().close()
            self._builds.clear()
        for gen in {id(g): g for g in (self.gen, *self._retired)}.values():
            with contextlib.suppress(Exception):
                await gen.close()
        self._remove_snapshots()
        self.astore.close(wait=not self._stuck)

    def _remove_snapshots(self) -> None:
        for snapshot in list(self._snapshots):
            remove_snapshot(snapshot)


def _restart_only_changes(old: Settings, new: Settings) -> list[str]:
    """The keys of ``RESTART_ONLY``'s sections, and ``unsubscribe.secret_env`` (the link keys are read at start),
    whose value ``new`` changes: a reload cannot apply them."""
    changed = [f"{section}.{f.name}" for section in RESTART_ONLY
               for f in dataclasses.fields(getattr(new, section))
               if getattr(getattr(new, section), f.name) != getattr(getattr(old, section), f.name)]
    if new.unsubscribe.secret_env != old.unsubscribe.secret_env:
        changed.append("unsubscribe.secret_env")
    return changed


def dispatch_retry_seconds(poll_seconds: float, failures: int) -> float:
    """The wait before the next dispatch run after ``failures`` in a row: ``poll_seconds``, doubled with each failure
    after the first, up to ``DISPATCH_RETRY_MAX_SECONDS`` (never less than ``poll_seconds``). A database away made
    one ``dispatch_failed`` line every poll, 17,000 a day at the default 5 s; a run it wakes (a planning pass, a
    maintenance that found work) is not held back."""
    return doubled_wait(poll_seconds, failures, DISPATCH_RETRY_MAX_SECONDS)


def _log_failed_pass(campaign: str, task: asyncio.Future[None]) -> None:
    error = None if task.cancelled() else task.exception()
    if error is not None:
        log.event("job_failed", logging.ERROR, job=f"plan:{campaign}", error=log.error_line(error))


def run(settings: Settings, *, config_path: Path, starting: StartupSignals | None = None) -> int:
    """Build and run the daemon until it is told to stop; the process's exit code.

    ``starting`` has taken the signals since the command began (else from here): a stop signal during start-up
    ends it at the next step, with exit code 0."""
    starting = starting or StartupSignals().install()
    try:
        deps = Deps.build(settings)
        try:
            starting.check()
            return eventloop.run(_main(settings, config_path, deps, starting))
        except TemplatesRejected as exc:
            for problem in exc.problems:
                log.event("template_problem", logging.ERROR, file=problem.where or f"{problem.campaign}/",
                          campaign=problem.campaign, locale=problem.locale, error=problem.message)
            log.event("daemon_not_started", logging.ERROR, why=f"{len(exc.problems)} template problem(s)")
            return EXIT_USAGE
        finally:
            deps.close()
    except StartupStopped as exc:
        log.event("daemon_stopped", during="start-up", signal=exc.signal.name)
        return EXIT_OK
    finally:
        starting.restore()


async def _main(settings: Settings, config_path: Path, deps: Deps, starting: StartupSignals | None = None) -> int:
    daemon = Daemon(settings, config_path=config_path, deps=deps, starting=starting)
    return await daemon.run()
