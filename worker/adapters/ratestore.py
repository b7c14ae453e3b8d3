"""Limiter state in the database, so every worker on it shares the same limits.

``book`` is GCRA in one statement per limit: an upsert that moves the row's
theoretical arrival time (``tat``) and returns it::

    INSERT INTO rate_limit (key, tat) VALUES (:key, :now + :n * :interval)
    ON CONFLICT (key) DO UPDATE SET tat = greatest(rate_limit.tat, :now) + :n * :interval
    RETURNING tat

The row lock taken by the update makes concurrent bookings from several
processes queue up one after the other, so no two get the same slot. The
arithmetic matches ``worker.core.limits.book``. Times are Unix seconds (wall
clock), since monotonic clocks are not shared between processes.

In production ``now`` is the database's own clock, read inside the statement
(``clock_timestamp()`` on PostgreSQL, evaluated after the row lock is taken):
workers on several hosts then share one clock, and a booking that queued behind
another worker's lock does not carry a stale "now" that would let it, and every
booking queued with it, take slots in the past and go out together.

The relay's pace (``core.pace``), shared too, is two rows under reserved keys: ``relay_pace`` (``tat``: when the
last cut was made, on the database's clock) and ``relay_pace:rate`` (``tat``: the rate it left, per second).
``cut_pace`` writes a cut holding the first row's lock, so that concurrent cuts are decided one after the other;
each booking reads them (``try_book_reading_pace``), and so does ``read_pace``.

The daily quota's ``quota:*`` row is counted by the ledger's group commit, in the
transaction of the ``sending`` marks (``Store.record_and_mark``); ``Store.quota_spent`` reads it (with the
ledger's count of the day before its first commit), ``used_today`` the row alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from worker.adapters import db
from worker.adapters.tables import RateLimit
from worker.core.pace import SharedCut

R = RateLimit.__table__  # type: ignore[attr-defined]

PACE_KEY = "relay_pace"
PACE_RATE_KEY = "relay_pace:rate"


class PaceRead(NamedTuple):
    """The shared pace's last cut (None: never cut), and the database's clock when it was read (Unix seconds)."""

    cut: SharedCut | None
    now: float


class RateStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._greatest = sa.func.greatest if engine.dialect.name == "postgresql" else sa.func.max

    def _clock(self) -> sa.ColumnElement[float]:
        """The database's wall clock in Unix seconds, read when the expression is evaluated."""
        if self.engine.dialect.name == "postgresql":
            return sa.cast(sa.func.extract("epoch", sa.func.clock_timestamp()), sa.Float)
        # SQLite's 'now' is fixed for the statement, which runs holding the write lock
        return (sa.func.julianday("now") - 2440587.5) * 86400.0

    def _book_stmt(self, key: str, now: float | None, step: float) -> sa.Executable:
        at = self._clock() if now is None else sa.literal(now, sa.Float)
        stmt = db.dialect_insert(self.engine, R).values(key=key, tat=at + step, day_count=0)
        booked: sa.Executable = stmt.on_conflict_do_update(
            index_elements=[R.c.key],
            set_={"tat": self._greatest(R.c.tat, at) + step},
        ).returning(R.c.tat, at)
        return booked

    def book(self, limits: Sequence[tuple[str, float, int]], now: float | None = None, n: int = 1) -> float:
        """Book ``n`` events on every ``(key, interval, burst)`` limit in one transaction;
        returns the seconds from now until the first may happen (the longest of the limits).

        ``now`` is the database's clock unless given (tests give it)."""
        return self.try_book(limits, {}, now, n)[0]

    def try_book(
        self,
        limits: Sequence[tuple[str, float, int]],
        longest: Mapping[str, float],
        now: float | None = None,
        n: int = 1,
    ) -> tuple[float, bool]:
        """``book``, unless a limit whose key ``longest`` names would have its first event wait longer than the
        seconds it gives: then nothing is booked (the transaction rolled back) and the result is that wait and
        False. Else the wait for the latest of the limits and True."""
        with self.engine.begin() as conn:
            return self._try_book(conn, limits, longest, now, n)

    def try_book_reading_pace(
        self, limits: Sequence[tuple[str, float, int]], longest: Mapping[str, float]
    ) -> tuple[float, bool, PaceRead]:
        """``try_book`` on the database's clock, and the shared pace as it stood (``read_pace``), in one
        transaction."""
        with self.engine.begin() as conn:
            pace = self._read_pace(conn)
            return (*self._try_book(conn, limits, longest, None, 1), pace)

    def _try_book(
        self,
        conn: sa.Connection,
        limits: Sequence[tuple[str, float, int]],
        longest: Mapping[str, float],
        now: float | None,
        n: int,
    ) -> tuple[float, bool]:
        wait = 0.0
        if self.engine.dialect.name == "postgresql":
            # limiter state need not survive a database crash: do not wait for the WAL flush
            conn.execute(sa.text("SET LOCAL synchronous_commit = off"))
        for key, interval, burst in limits:
            step = n * interval
            tat, at = conn.execute(self._book_stmt(key, now, step)).one()
            start = float(tat) - step
            this = max(0.0, start - interval * (burst - 1) - float(at))
            if this > longest.get(key, math.inf):
                conn.rollback()
                return this, False
            wait = max(wait, this)
        return wait, True

    def bring_forward(self, sooner: Mapping[str, float]) -> None:
        """Move each key's next slot ``sooner[key]`` seconds earlier (a reload raised its rate): what a slot before
        now leaves is the burst the key allows, as for a key not booked for a while."""
        with self.engine.begin() as conn:
            for key, seconds in sorted(sooner.items()):
                conn.execute(R.update().where(R.c.key == key).values(tat=R.c.tat - seconds))

    def read_pace(self) -> PaceRead:
        """The relay's pace every worker on the database shares: its last cut, and the database's clock. Read only:
        on SQLite it does not wait for the write lock another process holds."""
        with db.reading(self.engine) as conn:
            return self._read_pace(conn)

    def _read_pace(self, conn: sa.Connection) -> PaceRead:
        def tat(key: str) -> sa.ScalarSelect[float]:
            return sa.select(R.c.tat).where(R.c.key == key).scalar_subquery()

        now, at, rate = conn.execute(sa.select(self._clock(), tat(PACE_KEY), tat(PACE_RATE_KEY))).one()
        cut = None if at is None or rate is None else SharedCut(float(at), float(rate))
        return PaceRead(cut, float(now))

    def cut_pace(self, decide: Callable[[SharedCut | None, float], SharedCut | None]) -> PaceRead:
        """Cut the shared pace as ``decide`` says, given its last cut and the database's clock (a new cut, or None:
        none), holding the pace's row lock (a cut another worker is writing is decided first); the pace after it."""
        with self.engine.begin() as conn:
            # take the row's lock (made if missing), then read it: what a concurrent cut wrote is seen
            lock = db.dialect_insert(self.engine, R).values(key=PACE_KEY, tat=0.0, day_count=0)
            conn.execute(lock.on_conflict_do_update(index_elements=[R.c.key], set_={"tat": R.c.tat}))
            last = self._read_pace(conn)
            cut = decide(last.cut, last.now)
            if cut is None:
                return last
            for key, value in ((PACE_KEY, cut.at), (PACE_RATE_KEY, cut.rate)):
                upsert = db.dialect_insert(self.engine, R).values(key=key, tat=value, day_count=0)
                conn.execute(upsert.on_conflict_do_update(index_elements=[R.c.key], set_={"tat": value}))
            return PaceRead(cut, last.now)

    def used_today(self, key: str, *, day: str) -> int:
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(R.c.day, R.c.day_count).where(R.c.key == key)).first()
        return row.day_count if row is not None and row.day == day else 0
