"""Store operations for the daemon, the web links and operator commands.

Functions over a ``Store`` (each one short transaction), kept beside the Store
rather than in it: maintenance (expiry, pruning, abandoning rows at shutdown),
scheduled-job bookkeeping, suppression management, feedback, and small reads
for pages, health and metrics.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from worker.adapters import db
from worker.adapters.store import (
    CLAIMED,
    IN_FLIGHT,
    LAPSED_LIKE,
    LAPSED_WHY,
    MOVED_FROM,
    UNCERTAIN,
    WAITING,
    C,
    M,
    O,
    S,
    Store,
    _chunks,
    customer_snapshot,
    followed_sql,
    own_wish_sql,
    suppression_address,
)
from worker.adapters.tables import Attempt, Feedback, JobRun
from worker.core.campaigns import feedback_key
from worker.domain import CustomerSnapshot, Locale, MessageStatus, Outcome, SkipReason
from worker.errors import LedgerRowError

A = Attempt.__table__  # type: ignore[attr-defined]
F = Feedback.__table__  # type: ignore[attr-defined]
J = JobRun.__table__  # type: ignore[attr-defined]

PRUNE_BATCH = 5000


chunks = _chunks
"""``store._chunks``, the adapters' one slicing of ids into runs (each one statement's IN list, or one short
transaction), for the start's chunking in ``app``."""


# --- maintenance ---------------------------------------------------------------


def expire_messages(store: Store, now: datetime, campaigns: Iterable[str] | None = None) -> int:
    """Waiting rows whose expiry passed become ``skipped: expired`` (only those of ``campaigns``, if given); returns
    how many."""
    only = [] if campaigns is None else [M.c.campaign.in_(sorted(campaigns))]
    stmt = (
        sa.update(M)
        .where(WAITING, M.c.expires_at < now, *only)
        .values(
            status=MessageStatus.SKIPPED.value,
            skip_reason=SkipReason.EXPIRED.value,
            claimed_by=None,
            lease_until=None,
            updated_at=now,
        )
    )
    with store.engine.begin() as conn:
        return int(conn.execute(stmt).rowcount)


@dataclass(frozen=True)
class OddRows:
    """Waiting rows a claim would never judge right (``odd_waiting_rows``), by id."""

    unknown_campaign: tuple[int, ...] = ()
    odd_time: tuple[int, ...] = ()
    odd_priority: tuple[int, ...] = ()


def odd_waiting_rows(store: Store, known: Iterable[str], priorities: Mapping[str, int] | None = None) -> OddRows:
    """ONE read of the waiting rows (``planned``, ``retry``; the claim's, the expiry's and the queue's counts read index
    ranges instead), for what a start looks at: those whose campaign is none of ``known``; on SQLite, where a time
    is text compared as text, those whose ``next_attempt_at`` or ``expires_at`` is not 26 characters with a space as
    the 11th, as Kembali writes them (``SQLITE_TIME``; ``hand_written_times`` looks closer); and those whose priority
    is not their campaign's in ``priorities`` (planned under another ``policy.priorities`` order: ``reprioritise``)."""
    known = sorted(known)
    unknown = M.c.campaign.not_in(known)
    odd_time: sa.ColumnElement[bool] = sa.false()
    if store.dialect == "sqlite":
        for c in (M.c.next_attempt_at, M.c.expires_at):
            text = sa.type_coerce(c, sa.Text)
            odd_time = sa.or_(odd_time, sa.func.length(text) != 26, sa.func.substr(text, 11, 1) != " ")
    odd_priority = M.c.priority != _priority_of(priorities) if priorities else sa.false()
    query = sa.select(M.c.id, unknown.label("unknown"), odd_time.label("odd_time"),
                      odd_priority.label("odd_priority")).where(WAITING, sa.or_(unknown, odd_time, odd_priority))
    with db.reading(store.engine) as conn:
        rows = conn.execute(query).all()
    return OddRows(tuple(r.id for r in rows if r.unknown), tuple(r.id for r in rows if not r.unknown and r.odd_time),
                   tuple(r.id for r in rows if not r.unknown and r.odd_priority))


def _priority_of(priorities: Mapping[str, int]) -> Any:
    """Each row's campaign's priority in ``priorities``, as SQL (the row's own for a campaign not in them)."""
    return sa.case(*((M.c.campaign == name, p) for name, p in sorted(priorities.items())), else_=M.c.priority)


def reprioritise(store: Store, ids: Sequence[int], priorities: Mapping[str, int]) -> int:
    """Of ``ids`` (``OddRows.odd_priority``), the waiting rows whose priority is not their campaign's in
    ``priorities`` get it, in one transaction; returns how many. A claim skips the priorities that only campaigns
    turned off hold (``Store.claim``'s ``held_priorities``): a row left at one of those would never be claimed."""
    wanted = _priority_of(priorities)
    stmt = sa.update(M).where(WAITING, M.c.priority != wanted).values(priority=wanted)
    with store.engine.begin() as conn:
        return sum(int(conn.execute(stmt.where(M.c.id.in_(part))).rowcount) for part in _chunks(ids))


def reprioritise_held(store: Store, held: Collection[int], priorities: Mapping[str, int]) -> int:
    """The waiting rows of the campaigns of ``priorities`` (those turned on) that sit at one of ``held`` (the
    priorities a claim skips, ``Store.claim``'s ``held_priorities``) take their campaign's priority, in one
    transaction (the queue's partial index: the held priorities' rows only); returns how many."""
    if not held or not priorities:
        return 0
    stmt = (sa.update(M).where(WAITING, M.c.priority.in_(sorted(held)), M.c.campaign.in_(sorted(priorities)))
            .values(priority=_priority_of(priorities)))
    with store.engine.begin() as conn:
        return int(conn.execute(stmt).rowcount)


def waiting_by_campaign(store: Store) -> dict[str, int]:
    """How many rows of each campaign wait in the queue, whatever its name (``kembali check``): one count of the
    waiting rows (the queue's partial index), no row read into Python."""
    query = sa.select(M.c.campaign, sa.func.count()).where(WAITING).group_by(M.c.campaign)
    with db.reading(store.engine) as conn:
        return {campaign: int(n) for campaign, n in conn.execute(query)}


def waiting_of(store: Store, campaigns: Iterable[str]) -> dict[str, int]:
    """How many rows of each of ``campaigns`` wait in the queue (a read of the waiting rows)."""
    query = (sa.select(M.c.campaign, sa.func.count()).where(WAITING, M.c.campaign.in_(sorted(campaigns)))
             .group_by(M.c.campaign))  # fmt: skip
    with db.reading(store.engine) as conn:
        return {campaign: int(n) for campaign, n in conn.execute(query)}


@dataclass(frozen=True)
class UnknownCampaignRow:
    """A waiting row of a campaign Kembali does not know, failed by ``fail_unknown_campaigns``."""

    id: int
    campaign: str
    customer: str
    """The customer's id in the shop; "" when the customer is gone."""


def unknown_campaign_reply(row_id: int, campaign: str, customer: str, known: Iterable[str]) -> str:
    """What ``ledger list`` shows of a row failed for its campaign (``last_reply``): which row, why, what to do."""
    whose = f", customer {customer}" if customer else ""
    text = (f"ledger row {row_id} ({campaign!r}{whose}) cannot be sent: no campaign Kembali knows by that name "
            f"(known: {', '.join(sorted(known))}; edited by hand?); correct the campaign in the database and "
            f"`kembali ledger resend {row_id}`, or leave it closed: `kembali ledger close {row_id}`")
    return text[:500]


def fail_unknown_campaigns(
    store: Store, ids: Iterable[int], now: datetime, known: Iterable[str], worker: str
) -> list[UnknownCampaignRow]:
    """Of ``ids`` (``OddRows.unknown_campaign``), the waiting rows no worker holds whose campaign is none of ``known``
    (a row edited by hand, or written by another program) become ``failed`` (``LedgerRowError``), each with an
    attempt row saying why: no claim ever takes them (it takes the enabled campaigns' rows), so they would wait in the
    queue for ever, counted in its depth. ``CHUNK`` rows a short transaction, set-based: a bulk rename of 100,000 rows
    held SQLite's write lock (every other worker's claims and outcomes) for 160 s in one transaction, row by row;
    the caller gives the database thread back between calls of ``CHUNK`` ids (``app.campaigns_not_sent``)."""
    known = sorted(known)
    who = sa.select(C.c.external_id).where(C.c.id == M.c.customer_id).scalar_subquery()
    query = sa.select(M.c.id, M.c.campaign, M.c.attempts, who.label("customer")).where(
        WAITING, M.c.claimed_by.is_(None), M.c.campaign.not_in(known)
    )
    if store.dialect == "postgresql":  # another worker's start failing them too: each row by one of them
        query = query.with_for_update(of=M, skip_locked=True)
    fail = (
        sa.update(M)
        .where(M.c.id == sa.bindparam("_id"), WAITING, M.c.claimed_by.is_(None))
        .values(status=MessageStatus.FAILED.value, last_code=None,  # (never handed to a server: 0 tries more)
                last_reply=sa.bindparam("_reply"), last_error=LedgerRowError.__name__, lease_until=None,
                updated_at=now)
    )  # fmt: skip
    failed: list[UnknownCampaignRow] = []
    for part in _chunks(sorted(ids), CHUNK):
        # SQLite: BEGIN IMMEDIATE, no other writer between the read and the writes; PostgreSQL: the rows locked
        with store.engine.begin() as conn:
            rows = conn.execute(query.where(M.c.id.in_(part))).all()
            if not rows:
                continue
            replies = {r.id: unknown_campaign_reply(r.id, r.campaign, r.customer or "", known) for r in rows}
            conn.execute(fail, [{"_id": r.id, "_reply": replies[r.id]} for r in rows])
            conn.execute(sa.insert(A), [
                {"message_id": r.id, "attempt_no": r.attempts + 1, "worker": worker[:100], "started_at": now,
                 "finished_at": now, "outcome": Outcome.RENDER_ERROR.value, "code": None, "reply": replies[r.id],
                 "error_type": LedgerRowError.__name__} for r in rows])  # fmt: skip
        failed += [UnknownCampaignRow(r.id, r.campaign, r.customer or "") for r in rows]
    return failed


CHUNK = 500
"""Rows a start fails or rewrites in one transaction, and one call of the worker's database thread."""


SQLITE_TIME = "-".join(["[0-9]" * 4, "[0-9]" * 2, "[0-9]" * 2]) + " " + ":".join(["[0-9]" * 2] * 3) + "." + "[0-9]" * 6
"""A time as Kembali writes it on SQLite (``YYYY-MM-DD HH:MM:SS.ffffff``, UTC), a GLOB pattern: the one form whose
text order is time order, as the claim, the expiry and the queue's index compare them."""
TIME_COLUMNS = ("next_attempt_at", "expires_at", "due_at")


@dataclass(frozen=True)
class HandWrittenTime:
    """A waiting row's time in another form than Kembali writes (``hand_written_times``)."""

    id: int
    column: str
    """``message.next_attempt_at`` and so on."""
    value: str
    reads_as: str | None
    """As Kembali writes it (an offset taken into account, none read as UTC); None: no date and time at all, and the
    row was failed."""


def _read_hand_written(value: object) -> datetime | None:
    """A time as a person writes it in ISO 8601 ('2026-12-06T03:00:00Z', '+07:00', a 'T' or a space, no seconds,
    a day alone: its midnight); no offset is UTC, as Kembali's. A number (seconds? milliseconds?) is none."""
    if not isinstance(value, str):
        return None
    try:
        read = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    try:
        return read.replace(tzinfo=UTC) if read.tzinfo is None else read.astimezone(UTC)
    except OverflowError:  # past year 9999, or before year 1, in UTC ('9999-12-31T23:00-05:00': never): that end
        return datetime.max.replace(tzinfo=UTC) if read.year == datetime.max.year else datetime.min.replace(tzinfo=UTC)


def _sqlite_text(at: datetime) -> str:
    return at.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def hand_written_times(store: Store, ids: Iterable[int], now: datetime, worker: str) -> list[HandWrittenTime]:
    """On SQLite, where a time is text compared as text: of ``ids`` (``OddRows.odd_time``), each waiting row no worker
    holds whose times are not all in
    Kembali's form (``SQLITE_TIME``; a row edited by hand) has them rewritten in it, as the times they name
    ('2026-12-06T03:00:00Z' sorted after every '2026-12-06 …', so the claim took it up to a day late, an offset's
    hours off, 'tomorrow' never); a row whose ``next_attempt_at`` no reading makes sense of becomes ``failed``
    (``LedgerRowError``, the value in its reply and attempt row; its ``next_attempt_at`` then ``now``, so the ledger
    reads it); one of the other times is left to the claim, which fails the row, naming it, when it is due.
    PostgreSQL's timestamp columns hold no such value: nothing to do."""
    if store.dialect != "sqlite":
        return []
    query = (f"SELECT message.id, campaign, {', '.join(TIME_COLUMNS)}, customer.external_id FROM message"
             " LEFT JOIN customer ON customer.id = message.customer_id"
             " WHERE message.id IN ({ids}) AND status IN ('planned', 'retry') AND claimed_by IS NULL")  # fmt: skip
    found: list[HandWrittenTime] = []
    with store.engine.begin() as conn:
        rows = [r for part in _chunks(sorted(ids))
                for r in conn.exec_driver_sql(query.format(ids=", ".join("?" * len(part))), tuple(part)).all()]
        for row in rows:
            row_id, campaign, values, customer = row[0], row[1], dict(zip(TIME_COLUMNS, row[2:5], strict=True)), row[5]
            odd_ones = {c: v for c, v in values.items()
                        if not (isinstance(v, str) and fnmatch.fnmatchcase(v, SQLITE_TIME))}  # fmt: skip
            reads = {c: _read_hand_written(v) for c, v in odd_ones.items()}
            same = " AND ".join(f"{c} IS ?" for c in odd_ones)
            if reads.get("next_attempt_at", now) is not None:
                # (a due_at or expires_at no reading makes sense of is left to the claim: it fails its row when due)
                texts = {c: _sqlite_text(at) for c, at in reads.items() if at is not None}
                sets = ", ".join(f"{c} = ?" for c in texts)
                done = texts and conn.exec_driver_sql(
                    f"UPDATE message SET {sets} WHERE id = ? AND status IN ('planned', 'retry') AND claimed_by IS NULL"
                    f" AND {same}", (*texts.values(), row_id, *odd_ones.values())).rowcount  # fmt: skip
                if done:
                    found += [HandWrittenTime(row_id, f"message.{c}", str(odd_ones[c]), t) for c, t in texts.items()]
                continue
            column = "next_attempt_at"  # never claimed at its time: failed here, naming it
            whose = f", customer {customer}" if customer else ""
            reply = (f"ledger row {row_id} ({campaign}{whose}) cannot be read: message.{column} holds "
                     f"{str(odd_ones[column])[:40]!r} where a date and time belongs (edited by hand?): Kembali writes "
                     f"them as '2026-11-22 03:00:00.000000', in UTC; correct it and `kembali ledger resend {row_id}` "
                     f"(due now), or `kembali ledger close {row_id}`")[:500]  # fmt: skip
            done = conn.exec_driver_sql(
                "UPDATE message SET status = ?, last_code = NULL, last_reply = ?, last_error = ?, lease_until = NULL,"
                " next_attempt_at = ?, updated_at = ? WHERE id = ? AND status IN ('planned', 'retry')"
                f" AND claimed_by IS NULL AND {same}",
                (MessageStatus.FAILED.value, reply, LedgerRowError.__name__, _sqlite_text(now), _sqlite_text(now),
                 row_id, *odd_ones.values())).rowcount  # fmt: skip
            if not done:
                continue
            attempts = conn.exec_driver_sql("SELECT attempts FROM message WHERE id = ?", (row_id,)).scalar() or 0
            conn.execute(sa.insert(A).values(
                message_id=row_id, attempt_no=int(attempts) + 1, worker=worker[:100], started_at=now, finished_at=now,
                outcome=Outcome.RENDER_ERROR.value, code=None, reply=reply, error_type=LedgerRowError.__name__))
            found.append(HandWrittenTime(row_id, f"message.{column}", str(odd_ones[column]), None))
    return found


def merge_guard(older_than: datetime) -> sa.ColumnElement[bool]:
    """The messages whose attempts ``Store.record``'s un-merge reads (``store._UNMERGE_SQL``) while they may still be
    read: a loyalty email that carries a milestone merged into it, as long as that email may still be sent (not sent
    nor skipped, its expiry not long past: resent by an operator, then found no longer due). Its attempts that may
    have arrived (sent, ambiguous) are kept: pruned, the merged milestone would go back to the queue, a second
    email."""
    return sa.and_(
        M.c.payload.contains('"carries"'),
        M.c.status.not_in([MessageStatus.SENT.value, MessageStatus.SKIPPED.value]),
        M.c.expires_at >= older_than,
    )


MAY_HAVE_ARRIVED = (Outcome.SENT.value, Outcome.AMBIGUOUS.value)
"""The attempts of a message in ``merge_guard`` that pruning keeps."""


def prune_attempts(store: Store, older_than: datetime, batch: int = PRUNE_BATCH) -> int:
    """Delete attempt rows finished before ``older_than``, in short batches (by id, each past the last); returns how
    many. Not those a merged loyalty milestone's fate still depends on (``merge_guard``): each batch looks up the
    messages of its attempts that may have arrived by their ids. As a NOT EXISTS in the batch's query,
    PostgreSQL read the whole message table each batch (a hashed subplan: 0.4 s a batch of 200,000 messages,
    ``bench/pruning.py``)."""
    total = 0
    after = 0
    while True:
        rows = (sa.select(A.c.id, A.c.message_id, A.c.outcome).where(A.c.finished_at < older_than, A.c.id > after)
                .order_by(A.c.id).limit(batch))  # fmt: skip
        with store.engine.begin() as conn:
            found = conn.execute(rows).all()
            if not found:
                return total
            first, after = after, found[-1].id
            maybe = sorted({r.message_id for r in found if r.outcome in MAY_HAVE_ARRIVED})
            guarded: set[int] = set()
            carriers = sa.select(M.c.id).where(merge_guard(older_than))
            for part in _chunks(maybe):
                guarded.update(conn.execute(carriers.where(M.c.id.in_(part))).scalars())
            kept = [r.id for r in found if r.message_id in guarded and r.outcome in MAY_HAVE_ARRIVED]
            total += int(conn.execute(sa.delete(A).where(A.c.id > first, A.c.id <= after, A.c.finished_at < older_than,
                                                         A.c.id.not_in(kept))).rowcount)  # fmt: skip
        if len(found) < batch:
            return total


@dataclass(frozen=True)
class LeftUncertain:
    """A ``sending`` row whose lease lapsed, made ``uncertain`` by ``Store.release_expired_leases`` (or by
    ``abandon``: the shutdown's grace period ran out while it was being sent)."""

    campaign: str
    dedupe_key: str
    customer: str
    """The customer's id in the shop; "" when the customer is gone."""
    email: str
    message_id: str | None = None
    """The Message-ID its claim gave it (a bounce or the relay's log names the message by it)."""


@dataclass(frozen=True)
class LapsedHolders:
    """Whose leases have lapsed, read right before ``Store.release_expired_leases`` gives their rows back: with
    several workers, the one that died (its log just ends) is named in the log of the one that takes over."""

    counts: dict[str, tuple[int, int]]
    """Worker → (claimed rows, ``sending`` rows) whose lease lapsed."""
    sending: dict[str, str]
    """Dedupe key of a lapsed ``sending`` row → the worker that was sending it."""

    def describe(self) -> str:
        """``vm:12:ab12cd (197 claimed, 16 sending)``, each worker so, ``;`` between them."""
        parts = []
        for worker, (claimed, sending) in sorted(self.counts.items()):
            held = [f"{n} {what}" for n, what in ((claimed, "claimed"), (sending, "sending")) if n]
            parts.append(f"{worker} ({', '.join(held)})")
        return "; ".join(parts)


def lapsed_holders(store: Store, now: datetime, *, keep: Collection[int] = ()) -> LapsedHolders:
    """The workers whose leases lapsed by ``now`` (the rows ``Store.release_expired_leases(now, keep=keep)`` gives
    back), with how many rows each held: a read of the partial index of the rows in flight."""
    query = sa.select(M.c.id, M.c.claimed_by, M.c.status, M.c.dedupe_key).where(IN_FLIGHT, M.c.lease_until < now)
    counts: dict[str, tuple[int, int]] = {}
    sending: dict[str, str] = {}
    with db.reading(store.engine) as conn:
        for row_id, worker, status, key in conn.execute(query):
            if row_id in keep:
                continue
            worker = worker or "?"
            claimed, marked = counts.get(worker, (0, 0))
            if status == MessageStatus.SENDING.value:
                counts[worker] = (claimed, marked + 1)
                sending[key] = worker
            else:
                counts[worker] = (claimed + 1, marked)
    return LapsedHolders(counts, sending)


def left_uncertain(store: Store, at: datetime, limit: int = 100, *, why: str = LAPSED_WHY) -> list[LeftUncertain]:
    """The rows ``Store.release_expired_leases(at)`` made ``uncertain`` (at most ``limit``, the oldest first); or
    ``abandon`` did, given its ``why``."""
    query = (
        sa.select(M.c.campaign, M.c.dedupe_key, C.c.external_id, M.c.email, M.c.message_id)
        .select_from(M.outerjoin(C, C.c.id == M.c.customer_id))
        .where(UNCERTAIN, M.c.updated_at == at,
               M.c.last_error.like(LAPSED_LIKE) if why == LAPSED_WHY else M.c.last_error == why[:500])
        .order_by(M.c.id)
        .limit(limit)
    )
    with db.reading(store.engine) as conn:
        return [LeftUncertain(r[0], r[1], r[2] or "", r[3], r[4]) for r in conn.execute(query)]


def abandon(store: Store, *, worker: str, now: datetime, why: str) -> tuple[int, int]:
    """At a forced shutdown: this worker's claimed rows go back to the queue, its ``sending``
    rows become ``uncertain`` (the mail may have left). Returns (requeued, uncertain)."""
    return store.release(M.c.claimed_by == worker, now=now, why=why)


# --- scheduled jobs ------------------------------------------------------------


def last_run(store: Store, name: str) -> datetime | None:
    with db.reading(store.engine) as conn:
        value: datetime | None = conn.execute(sa.select(J.c.last_run_at).where(J.c.name == name)).scalar()
    return value


def record_run(store: Store, name: str, *, at: datetime, worker: str) -> None:
    """Remember that job ``name`` ran at ``at`` (never moves backwards)."""
    with store.engine.begin() as conn:
        updated = conn.execute(
            sa.update(J).where(J.c.name == name, J.c.last_run_at < at).values(last_run_at=at, worker=worker)
        ).rowcount
        if not updated:
            conn.execute(db.insert_ignore(store.engine, J).values(name=name, last_run_at=at, worker=worker))


# --- reads for pages, health and metrics ----------------------------------------


def ping(store: Store) -> None:
    """Raise if the database cannot be reached. On SQLite without the write lock: a long writer (an import) does
    not make the database look unreachable."""
    with db.reading(store.engine) as conn:
        conn.execute(sa.text("SELECT 1"))


def _queue(now: datetime | None) -> sa.ColumnElement[Any]:
    """The queue's depth: rows waiting to be sent that are due by ``now`` (None: due now or later), and the rows a
    worker has claimed and not begun to send (a batch, and the next one ahead, waiting their turn at the rate):
    each a read of a partial index. Without the claimed ones, a daemon sending its batches at a slow rate showed a
    queue of 0 for minutes while hundreds of messages waited to go."""
    due = [] if now is None else [M.c.next_attempt_at <= now]
    waiting = sa.select(sa.func.count()).select_from(M).where(WAITING, *due).scalar_subquery()
    claimed = sa.select(sa.func.count()).select_from(M).where(CLAIMED).scalar_subquery()
    return waiting + claimed


def queue_depth(store: Store, now: datetime | None = None) -> int:
    """The queue's depth (``_queue``)."""
    with db.reading(store.engine) as conn:
        return int(conn.execute(sa.select(_queue(now))).scalar() or 0)


def still_to_send(
    store: Store, now: datetime, *, held: Collection[int] = (), campaigns: Sequence[str] | None = None
) -> int:
    """The rows due by ``now`` and those claimed or being sent (``ix_message_queue``, ``ix_message_inflight``): what
    the runs sending now still have to do, by ``now`` (``run --once``'s progress line). Not those of a campaign turned
    off, which wait and no run sends: ``held``, the priorities of campaigns turned off alone (the index tells them),
    and ``campaigns``, of these only (each row read: where one turned off shares its priority with one turned on)."""
    only = [M.c.priority.not_in(sorted(held))] if held else []
    only += [] if campaigns is None else [M.c.campaign.in_(list(campaigns))]
    due = sa.select(sa.func.count()).select_from(M).where(WAITING, M.c.next_attempt_at <= now, *only)
    in_flight = sa.select(sa.func.count()).select_from(M).where(IN_FLIGHT, *only)
    with db.reading(store.engine) as conn:
        return int(conn.execute(sa.select(due.scalar_subquery() + in_flight.scalar_subquery())).scalar() or 0)


def health_counts(store: Store, now: datetime) -> tuple[int, int]:
    """The health line's reads, in one statement: the queue's depth by ``now`` (``_queue``), and the ledger's
    ``uncertain`` rows, whichever worker left them, for an operator to decide on (``kembali ledger``): each a read
    of a partial index (of the waiting and the claimed rows; ``ix_message_uncertain``), not of the whole ledger."""
    uncertain = sa.select(sa.func.count()).select_from(M).where(UNCERTAIN).scalar_subquery()
    with db.reading(store.engine) as conn:
        row = conn.execute(sa.select(_queue(now), uncertain)).one()
        return int(row[0] or 0), int(row[1] or 0)


@dataclass(frozen=True)
class Waiting:
    """What waits in the queue after a run: planned or to be tried again."""

    messages: int
    due: int
    """Of them, due already (a run stopped early, paused, or the day's quota used up)."""
    first: datetime | None
    """When the first of the others falls due (held back by the frequency cap, quiet hours, planned ahead)."""
    held: tuple[tuple[str, int, datetime], ...] = ()
    """Rows other workers hold (claimed or ``sending``): (worker, rows, when the last of their leases ends). A worker
    that died holding them (kill -9 on another host) leaves them to a run after then."""


def waiting(store: Store, now: datetime) -> Waiting:
    """The queue as ``now`` finds it: one read of the waiting rows (an index of them only)."""
    later = M.c.next_attempt_at > now
    query = sa.select(
        sa.func.count(),
        sa.func.coalesce(sa.func.sum(sa.case((later, 0), else_=1)), 0),
        sa.func.min(sa.case((later, M.c.next_attempt_at), else_=sa.null()), type_=M.c.next_attempt_at.type),
    ).where(WAITING)
    holders = (sa.select(M.c.claimed_by, sa.func.count(), sa.func.max(M.c.lease_until))
               .where(IN_FLIGHT, M.c.claimed_by.is_not(None)).group_by(M.c.claimed_by).order_by(M.c.claimed_by))
    with db.reading(store.engine) as conn:
        messages, due, first = conn.execute(query).one()
        held = tuple((str(worker), int(n), until) for worker, n, until in conn.execute(holders))
    return Waiting(int(messages), int(due), first, held)


def customer(store: Store, customer_id: int) -> CustomerSnapshot | None:
    with db.reading(store.engine) as conn:
        row = conn.execute(sa.select(C).where(C.c.id == customer_id)).first()
    return customer_snapshot(row, store.default_locale) if row is not None else None


def order_locale(store: Store, order_ref: str) -> Locale | None:
    """The language of the customer who placed an order named by database id or shop id.

    Rating links carry the database id: when another order's shop id is the same digits
    (shops number their orders), the order with that database id is the one meant."""
    match = O.c.external_id == order_ref
    query = sa.select(C.c.locale).join(O, O.c.customer_id == C.c.id)
    if order_ref.isdigit():
        by_id = O.c.id == int(order_ref)
        match = sa.or_(by_id, match)
        query = query.order_by(sa.case((by_id, 0), else_=1))
    query = query.where(match).limit(1)
    with db.reading(store.engine) as conn:
        value = conn.execute(query).scalar()
    return Locale(value) if value in ("id", "en") else None


def recipient(store: Store, customer_id: int, message_id: str) -> str | None:
    """The address the customer's email with this Message-ID went to (what its unsubscribe link stands for)."""
    query = sa.select(M.c.email).where(M.c.message_id == message_id, M.c.customer_id == customer_id)
    with db.reading(store.engine) as conn:
        found = conn.execute(query).scalar()
    return str(found) if found is not None else None


def recipient_any_case(store: Store, customer_id: int, message_ids: Sequence[str]) -> str | None:
    """``recipient`` of any of ``message_ids``, compared in any case: a Message-ID written while ``shop.domain`` had
    capitals (before it was lower-cased, ``config.ShopSettings``) is on the same domain. No index has the ledger's
    Message-IDs lower-cased: this reads it whole, so the site calls it off the daemon's store thread, and only when
    ``recipient`` found none."""
    wanted = [m.lower() for m in message_ids]
    query = sa.select(M.c.email).where(sa.func.lower(M.c.message_id).in_(wanted), M.c.customer_id == customer_id)
    with db.reading(store.engine) as conn:
        found = conn.execute(query.limit(1)).scalar()
    return str(found) if found is not None else None


def feedback_requested(store: Store, order_ref: str) -> bool:
    """Whether this ledger mailed a feedback request for the order whose database id is ``order_ref`` (what a rating
    link names, ``core.campaigns.rating_links``), to the order's customer: what shows a rating link signed for no
    shop to be this shop's (``links.Site.feedback``). Not the order whose shop number is those digits: shops number
    their orders 1, 2, 3…, and another shop's link for its order 1 was taken for this shop's request for its order
    "1", and recorded for this shop's order 1. One look-up by the dedupe key's unique index."""
    if not (order_ref.isascii() and order_ref.isdigit() and len(order_ref) <= 18):
        return False
    mailed = (MessageStatus.SENT.value, MessageStatus.UNCERTAIN.value)
    with db.reading(store.engine) as conn:
        order = conn.execute(sa.select(O.c.external_id, O.c.customer_id).where(O.c.id == int(order_ref))).first()
        if order is None:
            return False
        found = sa.select(M.c.id).where(M.c.dedupe_key == feedback_key(order.external_id),
                                        M.c.customer_id == order.customer_id, M.c.status.in_(mailed))  # fmt: skip
        return conn.execute(found).first() is not None


def mailed_addresses(store: Store, customer_id: int) -> list[str]:
    """Every address a message to the customer was sent to (or may have reached), oldest first: what an unsubscribe
    link naming no email stands for (those issued before links named theirs). The ledger has no index by customer:
    this reads it whole (~0.2 s a million rows on SQLite), so the site calls it off the daemon's store thread
    (``links.Site._mailed_addresses``)."""
    mailed = (MessageStatus.SENT.value, MessageStatus.UNCERTAIN.value)
    query = sa.select(M.c.email).where(M.c.customer_id == customer_id, M.c.status.in_(mailed)).order_by(M.c.id)
    with db.reading(store.engine) as conn:
        return list(dict.fromkeys(str(e) for e in conn.scalars(query)))


# --- suppressions ----------------------------------------------------------------


def unsuppress(store: Store, email: str) -> dict[str, Any] | None:
    """Remove an address from the suppression list: its entry as it was (``reason``, ``source``, ``created_at``),
    None if it was not there."""
    statement = (sa.delete(S).where(S.c.email == suppression_address(email))
                 .returning(S.c.reason, S.c.source, S.c.created_at))  # fmt: skip
    with store.engine.begin() as conn:
        row = conn.execute(statement).first()
    return None if row is None else dict(row._mapping)


MAX_FOLLOWED = 100
"""The entries ``followed_from`` gives at most (a customer's moves, each followed by their unsubscribe)."""


def followed_from(store: Store, email: str) -> list[dict[str, Any]]:
    """The entries an import carried from ``email`` to the address it gave its customer (``shop.Followed``: their
    source is ``store.followed_source``), and on from those to the next, in order: ``email``, ``reason``,
    ``source``. One whose source was cut to the column's 100 characters (a long address) is not found."""
    found: dict[str, dict[str, Any]] = {}
    query = sa.select(S.c.email, S.c.reason, S.c.source).order_by(S.c.created_at, S.c.id)
    todo = [suppression_address(email)]
    with db.reading(store.engine) as conn:
        while todo and len(found) < MAX_FOLLOWED:
            address = todo.pop(0)
            for row in conn.execute(query.where(followed_sql(S.c.source),
                                                S.c.source.endswith(f"{MOVED_FROM}{address}", autoescape=True))):
                if row.email not in found and row.email != suppression_address(email):
                    found[row.email] = dict(row._mapping)
                    todo.append(row.email)
    return list(found.values())


def suppress_many(store: Store, emails: Iterable[str], *, reason: str, source: str, now: datetime) -> int:
    """Add many addresses at once, each with ``reason``, ``source`` and ``now``: ``suppress_entries``."""
    entry = {"reason": reason, "source": source, "created_at": now}
    return suppress_entries(store, dict.fromkeys(emails, entry))


def suppress_entries(
    store: Store, entries: Mapping[str, Mapping[str, Any]], *, saved: Callable[[int, int], None] | None = None
) -> int:
    """Add many addresses at once, in one transaction, each with the ``reason``, ``source`` and ``created_at`` of
    its entry (the first of addresses that are one on the list); returns how many were new (an address already
    suppressed keeps its entry). ``saved(done, total)`` is told of each batch written (a progress line)."""
    rows: dict[str, Mapping[str, Any]] = {}
    for address, entry in entries.items():
        rows.setdefault(suppression_address(address), entry)
    if not rows:
        return 0
    with store.engine.begin() as conn:
        return _insert_entries(conn, rows, saved)


def _insert_entries(
    conn: sa.Connection, rows: Mapping[str, Mapping[str, Any]], saved: Callable[[int, int], None] | None = None
) -> int:
    """``suppress_entries``'s inserts, of addresses as the list holds them, in ``conn``'s transaction: how many
    were new."""
    stmt = db.insert_ignore(conn.engine, S).returning(S.c.id)
    values = [{"email": address, "reason": entry["reason"], "source": entry["source"],
               "created_at": entry["created_at"]} for address, entry in rows.items()]  # fmt: skip
    new = 0
    for i in range(0, len(values), 500):
        new += len(conn.execute(stmt, values[i : i + 500]).all())
        if saved is not None:
            saved(min(i + 500, len(values)), len(values))
    return new


def unsubscribe(store: Store, emails: Iterable[str], *, source: str, now: datetime) -> int:
    """The customer's own unsubscribe of ``emails`` (an unsubscribe link's), in one transaction: each suppressed as
    ``unsubscribed``, and one on the list already for a reason not the customer's own (``CUSTOMERS_OWN``: a bounce,
    an operator's ``manual``) made theirs, with ``source`` and ``now``. Kept so, it was the mailbox's or the
    address's: an import that gave the customer another address did not carry it there (``shop``'s ``Followed``),
    and the bounce cleared (``suppress remove``, the mailbox mended) lost the unsubscribe. Returns how many were
    new or made the customer's own."""
    addresses = list(dict.fromkeys(suppression_address(e) for e in emails))
    if not addresses:
        return 0
    entry = {"reason": "unsubscribed", "source": source, "created_at": now}
    with store.engine.begin() as conn:
        new = _insert_entries(conn, dict.fromkeys(addresses, entry))
        made_own = conn.execute(
            sa.update(S).where(S.c.email.in_(addresses), ~own_wish_sql()).values(entry)
        ).rowcount
    return new + made_own


def unsubscribed(store: Store, email: str) -> bool:
    """Whether the address is on the suppression list as the customer's own wish (``CUSTOMERS_OWN``, in any case:
    an earlier version stored a reason as typed), not only as a bounce or an operator's entry."""
    query = sa.select(S.c.id).where(S.c.email == suppression_address(email), own_wish_sql())
    with db.reading(store.engine) as conn:
        return conn.execute(query).first() is not None


def suppressions(store: Store, *, reason: str | None = None, email: str | None = None) -> list[dict[str, Any]]:
    return list(each_suppression(store, reason=reason, email=email))


LISTED_AT_ONCE = 1000
"""The entries ``each_suppression`` reads at a time."""


def each_suppression(store: Store, *, reason: str | None = None, email: str | None = None,
                     any_case: bool = False) -> Iterator[dict[str, Any]]:
    """The suppression list's entries (``email``, ``reason``, ``source``, ``created_at``), oldest first, read as
    they are taken (a server-side cursor on PostgreSQL): a list of millions is written out, not held in memory. Its
    read's transaction stays open until the last is taken: take them without waiting on a reader (a pager), which
    the server's idle_in_transaction_timeout_seconds would end it for. ``any_case``: ``reason`` in any case (a
    reason Kembali knows, which earlier versions stored as typed: 'Complaint')."""
    query = sa.select(S.c.email, S.c.reason, S.c.source, S.c.created_at).order_by(S.c.created_at, S.c.id)
    if reason:
        query = query.where(sa.func.lower(S.c.reason) == reason.lower() if any_case else S.c.reason == reason)
    if email:
        query = query.where(S.c.email == suppression_address(email))
    with db.reading(store.engine) as conn:
        found = conn.execution_options(stream_results=True, yield_per=LISTED_AT_ONCE).execute(query)
        for part in found.partitions():
            yield from (dict(r._mapping) for r in part)


def suppression_reasons(store: Store, most: int = 20) -> list[str]:
    """The reasons of the suppression list's entries, each once, in order (the first ``most`` of them)."""
    query = sa.select(S.c.reason).distinct().order_by(S.c.reason).limit(most)
    with db.reading(store.engine) as conn:
        return list(conn.execute(query).scalars())


def is_suppressed(store: Store, email: str) -> bool:
    with db.reading(store.engine) as conn:
        return conn.execute(sa.select(S.c.id).where(S.c.email == suppression_address(email))).first() is not None


# --- feedback ----------------------------------------------------------------------


@dataclass(frozen=True)
class FeedbackRow:
    order_ref: str
    score: int
    comment: str | None


def record_feedback(store: Store, order_ref: str, score: int, now: datetime) -> tuple[bool, FeedbackRow]:
    """Record a rating once per order (the first wins). Returns (new?, the stored row)."""
    stmt = db.insert_ignore(store.engine, F).values(order_ref=order_ref, score=score, created_at=now).returning(F.c.id)
    with store.engine.begin() as conn:
        created = conn.execute(stmt).first() is not None
        row = conn.execute(sa.select(F.c.order_ref, F.c.score, F.c.comment).where(F.c.order_ref == order_ref)).one()
    return created, FeedbackRow(row.order_ref, row.score, row.comment)


def feedback_for(store: Store, order_ref: str) -> FeedbackRow | None:
    """The rating recorded for an order, if any."""
    with db.reading(store.engine) as conn:
        row = conn.execute(sa.select(F.c.order_ref, F.c.score, F.c.comment).where(F.c.order_ref == order_ref)).first()
    return FeedbackRow(row.order_ref, row.score, row.comment) if row is not None else None


def add_feedback_comment(
    store: Store, order_ref: str, comment: str, now: datetime
) -> tuple[bool, FeedbackRow] | None:
    """Store a comment on a recorded rating, once (the first comment stays). Returns (stored?, the stored row);
    None if no rating exists."""
    with store.engine.begin() as conn:
        stored = conn.execute(
            sa.update(F)
            .where(F.c.order_ref == order_ref, F.c.comment.is_(None))
            .values(comment=comment[:2000], commented_at=now)
        ).rowcount == 1
        row = conn.execute(sa.select(F.c.order_ref, F.c.score, F.c.comment).where(F.c.order_ref == order_ref)).first()
    return (stored, FeedbackRow(row.order_ref, row.score, row.comment)) if row is not None else None


def feedback(store: Store) -> list[FeedbackRow]:
    with db.reading(store.engine) as conn:
        rows = conn.execute(sa.select(F.c.order_ref, F.c.score, F.c.comment).order_by(F.c.id)).all()
    return [FeedbackRow(r.order_ref, r.score, r.comment) for r in rows]
