"""Operator access to the ledger (``kembali ledger``): list rows, resend or close them.

Only rows that need an operator's decision can be changed: ``uncertain`` (the
mail may have arrived) and ``failed``; and a message waiting in the queue (``planned``, ``retry``) can be
closed as failed, which cancels it. Every action leaves an attempt row with
outcome ``operator`` (who, when, what was decided, the note) and the note in
``last_error``, so the history shows that a person, not the worker, decided.
A resend puts the row back to ``retry``, due now, with the same Message-ID.
A decision the row already reflects (a resend of a row in ``retry``, a close as
sent of a ``sent`` row, a close as failed of a row closed so with the same note)
changes nothing and is reported as such, not refused: running the same command
twice is safe.
A loyalty spend milestone merged into a message closed or resent shares its fate (``Carried``), and a resend
never sends both it and that message: one email for one order (``_one_email``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from worker.adapters import db
from worker.adapters.store import CUSTOMERS_OWN, _chunks, suppression_address
from worker.adapters.tables import Attempt, Customer, Message, Suppression
from worker.domain import MessageStatus, Outcome, SkipReason

M = Message.__table__  # type: ignore[attr-defined]
A = Attempt.__table__  # type: ignore[attr-defined]
S = Suppression.__table__  # type: ignore[attr-defined]
C = Customer.__table__  # type: ignore[attr-defined]

CLOSED = "operator closed as "
"""How the note of a row an operator closed begins (``last_error``): a bulk resend leaves those rows out."""
CLOSED_WITH = f"{CLOSED}{MessageStatus.FAILED.value}: with the email it was merged into"
"""How the note of a merged loyalty milestone closed with the email it was merged into begins (``Carried``)."""
DECIDABLE = (MessageStatus.UNCERTAIN.value, MessageStatus.FAILED.value)
"""States an operator may resend or close."""
WAITING = (MessageStatus.PLANNED.value, MessageStatus.RETRY.value)
"""States of a message in the queue, not sent yet: an operator may close one as failed (cancel it), not as sent.
A claimed one (``claimed``, ``sending``) is a worker's: the close's conditional update leaves it alone."""
IN_FLIGHT_STATES = (MessageStatus.CLAIMED.value, MessageStatus.SENDING.value)
"""States of a message a worker holds, with a lease: ``claimed_by`` and ``lease_until`` say whose, until when."""
GOES = (MessageStatus.PLANNED.value, MessageStatus.CLAIMED.value, MessageStatus.SENDING.value,
        MessageStatus.RETRY.value, MessageStatus.SENT.value, MessageStatus.UNCERTAIN.value)
"""States of a message that went, may have gone, or is to go: a spend milestone and the email it was merged into
are not resent while the other one is in one (``_one_email``)."""
MAX_ID = 2**63 - 1
"""The largest row id either database can hold (a 64-bit integer)."""


@dataclass(frozen=True)
class LedgerRow:
    id: int
    status: str
    campaign: str
    dedupe_key: str
    email: str
    message_id: str | None
    """None until the row is first claimed (held-out and expired rows never are)."""
    attempts: int
    last_code: int | None
    last_reply: str | None
    last_error: str | None
    skip_reason: str | None
    updated_at: datetime
    next_attempt_at: datetime
    claimed_by: str | None = None
    """The worker that holds a ``claimed`` or ``sending`` row (None otherwise)."""
    lease_until: datetime | None = None
    """When that worker's lease on it ends: a dead worker's row goes back to the queue (``sending``: ``uncertain``)
    at the first maintenance after it."""

    def held(self) -> str | None:
        """``held by W until T UTC``, for a row a worker holds; None for the others."""
        if self.status not in IN_FLIGHT_STATES or self.claimed_by is None or self.lease_until is None:
            return None
        return f"held by {self.claimed_by} until {self.lease_until:%Y-%m-%d %H:%M:%S} UTC"

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "campaign": self.campaign,
            "dedupe_key": self.dedupe_key,
            "email": self.email,
            "message_id": self.message_id,
            "attempts": self.attempts,
            "last_code": self.last_code,
            "last_reply": self.last_reply,
            "last_error": self.last_error,
            "skip_reason": self.skip_reason,
            "updated_at": self.updated_at.isoformat(),
            "next_attempt_at": self.next_attempt_at.isoformat(),
            "claimed_by": self.claimed_by,
            "lease_until": None if self.lease_until is None else self.lease_until.isoformat(),
        }


@dataclass(frozen=True)
class ActionResult:
    changed: list[int]
    """Rows changed."""
    refused: dict[int, str]
    """id → why it was left alone (unknown id, or a state an operator cannot change)."""
    already: dict[int, str] = field(default_factory=dict)
    """id → the state that already is what was asked (``"sent"``), left as it is."""
    carried: list[Carried] = field(default_factory=list)
    """The loyalty milestones merged into the messages closed or resent, and what became of each."""


@dataclass(frozen=True)
class Carried:
    """A loyalty milestone stored as skipped, ``merged`` into a message an operator closed or resent (that message's
    payload ``carries`` its dedupe key, see ``SkipReason.MERGED``): it shares that message's fate. Closed as sent, it
    went with it and stays merged; closed as failed (or cancelled), it is closed as failed with it (``CLOSED_WITH``),
    so that it is neither left waiting for ever on an email that will not go, nor sent unasked: its ID resends it on
    its own until its expiry. That message resent, one closed with it is merged into it again (``Store.record`` sends
    it on its own should that message be found no longer due)."""

    id: int
    dedupe_key: str
    carrier: int
    """The id of the message it was merged into."""
    expires_at: datetime
    """Its own expiry: closed with it, its ID resends it on its own until then (a resend refuses it after)."""
    fate: str
    """``"closed"`` with it, ``"went"`` with it (stays merged), or ``"merged again"`` into it."""


def _ledger_row(r: Any) -> LedgerRow:
    return LedgerRow(
        r.id, r.status, r.campaign, r.dedupe_key, r.email, r.message_id, r.attempts, r.last_code,
        r.last_reply, r.last_error, r.skip_reason, r.updated_at, r.next_attempt_at, r.claimed_by, r.lease_until,
    )  # fmt: skip


@dataclass(frozen=True)
class Selection:
    """Which rows: every filter given must hold (an empty one holds for every row)."""

    statuses: Sequence[str] = ()
    campaign: str | None = None
    since: datetime | None = None
    """Rows last changed (``updated_at``: failed, left uncertain, decided) at or after this moment."""
    until: datetime | None = None
    """… and before this one."""
    codes: Sequence[int] = ()
    """The last SMTP reply's code is one of these (e.g. 421, 550)."""
    closed: bool | None = None
    """True: only rows an operator closed as failed (``CLOSED``); False: none of them; None: either."""
    email: str | None = None
    """To this address, in any case (the mailbox, as the frequency cap counts it)."""
    customer: str | None = None
    """To the customer with this ID in the shop's data (``customers.csv``'s ``external_id``), at any address."""
    after: int | None = None
    """Listed after the row with this id, as ``rows`` orders them (newest change first): changed before it, or at
    the same moment with a lower id. A page's last row, for the next page (keyset paging: no row on two pages)."""
    after_changed: datetime | None = None
    """When the ``after`` row changed, as its page listed it: the next page begins where that page ended even when
    the row changed since (retried, decided), where its new time would list the page again. None: its time now."""


def closed_as_failed() -> sa.ColumnElement[bool]:
    """A row an operator closed as failed (decided, or cancelled while it waited): failed, its note ``CLOSED``'s.
    The coalesce: a row without a note is not closed, where NOT (NULL LIKE …) would leave it out of the negation
    too."""
    return sa.and_(M.c.status == MessageStatus.FAILED.value, sa.func.coalesce(M.c.last_error, "").startswith(CLOSED))


def _matching(query: sa.Select[Any], selection: Selection) -> sa.Select[Any]:
    if selection.statuses:
        query = query.where(M.c.status.in_(list(selection.statuses)))
    if selection.campaign:
        query = query.where(M.c.campaign == selection.campaign)
    if selection.since is not None:
        query = query.where(M.c.updated_at >= selection.since)
    if selection.until is not None:
        query = query.where(M.c.updated_at < selection.until)
    if selection.codes:
        query = query.where(M.c.last_code.in_(list(selection.codes)))
    if selection.closed is not None:
        closed = closed_as_failed()
        query = query.where(closed if selection.closed else ~closed)
    if selection.email:
        query = query.where(sa.func.lower(M.c.email) == sa.func.lower(sa.literal(selection.email)))
    if selection.customer:
        query = query.where(M.c.customer_id.in_(sa.select(C.c.id).where(C.c.external_id == selection.customer)))
    if selection.after is not None:
        changed: Any = selection.after_changed
        if changed is None:
            changed = sa.select(M.c.updated_at).where(M.c.id == selection.after).scalar_subquery()
        query = query.where(sa.or_(M.c.updated_at < changed,
                                   sa.and_(M.c.updated_at == changed, M.c.id < selection.after)))  # fmt: skip
    return query


class LedgerAdmin:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def rows(self, selection: Selection, *, limit: int = 50) -> list[LedgerRow]:
        query = _matching(sa.select(M), selection).order_by(M.c.updated_at.desc(), M.c.id.desc()).limit(limit)
        with db.reading(self.engine) as conn:
            rows = conn.execute(query).all()
        return [_ledger_row(r) for r in rows]

    def matching(self, selection: Selection) -> int:
        """How many rows ``rows`` would list without its limit."""
        query = _matching(sa.select(sa.func.count()).select_from(M), selection)
        with db.reading(self.engine) as conn:
            return int(conn.execute(query).scalar_one())

    def ids(self, selection: Selection) -> list[int]:
        """The ids of every row the selection matches, oldest change first (what a bulk resend or close takes)."""
        query = _matching(sa.select(M.c.id), selection).order_by(M.c.updated_at, M.c.id)
        with db.reading(self.engine) as conn:
            return list(conn.execute(query).scalars())

    def has_message(self, message_id: int) -> bool:
        """Whether the ledger has a row with this id (``list --after``'s, which lists nothing otherwise)."""
        with db.reading(self.engine) as conn:
            return conn.execute(sa.select(M.c.id).where(M.c.id == message_id)).first() is not None

    def has_customer(self, external_id: str) -> bool:
        """Whether the shop's data has a customer with this ID (``--customer``'s, which finds nothing otherwise)."""
        with db.reading(self.engine) as conn:
            return conn.execute(sa.select(C.c.id).where(C.c.external_id == external_id)).first() is not None

    def campaigns(self) -> list[str]:
        """The campaigns the ledger has rows of, by name."""
        query = sa.select(M.c.campaign).distinct().order_by(M.c.campaign)
        with db.reading(self.engine) as conn:
            return list(conn.execute(query).scalars())

    def counts(self) -> dict[str, int]:
        query = sa.select(M.c.status, sa.func.count()).group_by(M.c.status)
        with db.reading(self.engine) as conn:
            return {status: n for status, n in conn.execute(query)}

    def resend(
        self, ids: Sequence[int], *, now: datetime, operator: str, note: str = "", dry_run: bool = False
    ) -> ActionResult:
        """Put uncertain/failed rows back to ``retry``, due now (same Message-ID); not one past its expiry or to a
        suppressed address, which the next run would only skip."""
        text = "operator resend" + (f": {note}" if note else "")

        def queued(row: Any) -> str | None:
            if row.status != MessageStatus.RETRY.value:
                return None
            return f"back in the queue (next attempt {row.next_attempt_at:%Y-%m-%d %H:%M} UTC)"

        def carried(conn: Connection, resent: list[int]) -> list[Carried]:
            found = [Carried(*row, fate="merged again") for row in _merged_into(conn, resent, closed_with=True)]
            if not dry_run:
                _change(conn, found, now=now, operator=operator, text=f"{text}: merged again into the email resent",
                        status=MessageStatus.SKIPPED, reason=SkipReason.MERGED, closed_with=True)
            return found

        return self._decide(ids, now=now, operator=operator, text=text, values={
            "status": MessageStatus.RETRY.value, "next_attempt_at": now, "skip_reason": None,
            "sent_at": None,  # an uncertain send the cap counted: the resend is counted when it goes
            "resent_after_attempts": M.c.attempts,  # sending.max_attempts counts the attempts after the resend
        }, sendable_only=True, already=queued, dry_run=dry_run, then=carried, vet=_one_email)  # fmt: skip

    def close(
        self, ids: Sequence[int], *, now: datetime, operator: str, status: MessageStatus, note: str = "",
        dry_run: bool = False,
    ) -> ActionResult:
        """Mark uncertain/failed rows terminal as the operator decided (``sent`` or ``failed``); as failed, a row
        waiting in the queue too (``WAITING``: the operator cancels it; no worker holds it)."""
        if status not in (MessageStatus.SENT, MessageStatus.FAILED):
            raise ValueError("an operator closes a message as sent or failed")
        text = f"{CLOSED}{status.value}" + (f": {note}" if note else "")
        # sent: when it may have left (an uncertain send's time, else a failed one's last try: closed days later,
        # the cap and the stats would count it then), else now; failed: it did not arrive, the cap stops counting it
        values: dict[str, Any] = {"status": status.value}
        tried = (sa.select(sa.func.max(A.c.started_at))
                 .where(A.c.message_id == M.c.id, A.c.outcome != Outcome.OPERATOR.value).scalar_subquery())  # fmt: skip
        values["sent_at"] = sa.func.coalesce(M.c.sent_at, tried, now) if status is MessageStatus.SENT else None

        def closed(row: Any) -> str | None:
            # closed as failed with the same note already (the command run again): nothing to change; with another
            # note, or failed by its server, a failed row takes this decision's
            if status is MessageStatus.FAILED:
                return "closed as failed" if row.status == status.value and row.last_error == text[:500] else None
            return row.status if row.status == status.value else None

        states = DECIDABLE + WAITING if status is MessageStatus.FAILED else DECIDABLE
        failed = status is MessageStatus.FAILED

        def carried(conn: Connection, closing: list[int]) -> list[Carried]:
            fate = "closed" if failed else "went"
            found = [Carried(*row, fate=fate) for row in _merged_into(conn, closing)]
            if failed and not dry_run:
                _change(conn, found, now=now, operator=operator, text=CLOSED_WITH + (f": {note}" if note else ""),
                        status=MessageStatus.FAILED, reason=None)
            return found

        def named_too(conn: Connection, named: list[int], closing: list[int]) -> dict[int, str | None]:
            # a merged row named with the email it was merged into: closed (or left merged) with it, not refused
            given = set(named)
            return {row[0]: None for row in _merged_into(conn, closing) if row[0] in given}

        return self._decide(ids, now=now, operator=operator, text=text, values=values, already=closed, dry_run=dry_run,
                            states=states, tried_only=not failed, then=carried, vet=named_too)  # fmt: skip

    def _decide(
        self, ids: Sequence[int], *, now: datetime, operator: str, text: str, values: dict[str, Any],
        sendable_only: bool = False, already: Callable[[Any], str | None] = lambda row: None,
        dry_run: bool = False, states: Sequence[str] = DECIDABLE, tried_only: bool = False,
        then: Callable[[Connection, list[int]], list[Carried]] = lambda conn, changed: [],
        vet: Callable[[Connection, list[int], list[int]], dict[int, str | None]] = lambda conn, ids, changing: {},
    ) -> ActionResult:
        """``states``: the states of the rows it changes (the others are left alone, saying why). ``tried_only``:
        refuse a row never handed to an SMTP server (no tries: cancelled while planned, a template error), which a
        close as sent would count as sent at the moment it was closed.
        ``sendable_only``: refuse a row whose address is on the suppression list, or whose expiry has
        passed (a resend would only be skipped as ``suppressed`` or ``expired`` by the next run, its reply
        overwritten). ``already``: what a row already is when that is what was asked (it is then left alone without a
        refusal, in ``states`` or not), else None. ``dry_run``: decide the same, change nothing. ``then``: what else
        the decision changes, done in its transaction with the ids it changes (or would, in a dry run). ``vet``: the
        rows found (their ids) it leaves alone after all, given those it would change: id → why (replacing the reason
        it gave, if any), or None for one ``then`` takes care of (no longer refused)."""
        text = text[:500]
        which = f"{', '.join(states[:-1])} or {states[-1]}"  # uncertain or failed
        ids = list(dict.fromkeys(ids))  # an id given twice is decided once (the second would find it changed)
        changed: list[int] = []
        refused: dict[int, str] = {}
        done: dict[int, str] = {}
        with self.engine.begin() as conn:
            possible = [i for i in ids if 1 <= i <= MAX_ID]  # a bigger one is not a row: SQLite would raise on it
            # read a few hundred at a time: a bulk decision by filters (an outage's messages) can name more rows,
            # and addresses, than a statement takes parameters (PostgreSQL: 65,535)
            query = sa.select(M.c.id, M.c.status, M.c.attempts, M.c.email, M.c.next_attempt_at, M.c.expires_at,
                              M.c.last_error, M.c.claimed_by, M.c.lease_until)  # fmt: skip
            found = {r.id: r for part in _chunks(possible) for r in conn.execute(query.where(M.c.id.in_(part)))}
            suppressed: dict[str, str] = {}
            if sendable_only and found:
                listed = sorted({suppression_address(r.email) for r in found.values()})
                for part in _chunks(listed):
                    suppressed.update(conn.execute(sa.select(S.c.email, S.c.reason).where(S.c.email.in_(part))).all())
            for message_id in ids:
                row = found.get(message_id)
                if row is None:
                    refused[message_id] = "no such message"
                    continue
                if (state := already(row)) is not None:
                    done[message_id] = state
                    continue
                if row.status in WAITING and not sendable_only and row.status not in states:
                    refused[message_id] = (f"is {row.status}; a planned or retrying message can only be closed as "
                                           "failed (it was not sent)")
                    continue
                if row.status not in states:
                    holder = ""
                    if row.status in IN_FLIGHT_STATES and row.claimed_by is not None and row.lease_until is not None:
                        holder = f" by {row.claimed_by} (its lease ends {row.lease_until:%Y-%m-%d %H:%M:%S} UTC)"
                    refused[message_id] = f"is {row.status}{holder}; only {which} messages can be changed"
                    continue
                reason = suppressed.get(suppression_address(row.email))
                if reason is not None:
                    advice = (f"the customer asked for no more email: `kembali ledger close {message_id}` it instead"
                              if reason.lower() in CUSTOMERS_OWN else
                              f"`kembali suppress remove {row.email}` first if it should go")  # fmt: skip
                    refused[message_id] = (f"{row.email} is on the suppression list ({reason}), so the next run would "
                                           f"skip it; {advice}")
                    continue
                if sendable_only and row.expires_at <= now:  # one an operator closed: no advice to close it
                    closed = row.status == MessageStatus.FAILED.value and (row.last_error or "").startswith(CLOSED)
                    refused[message_id] = f"expired at {row.expires_at:%Y-%m-%d %H:%M} UTC, so " + (
                        "it can no longer be sent; it stays closed as failed" if closed else
                        "the next run would skip it as expired; `kembali ledger close` it instead")  # fmt: skip
                    continue
                if tried_only and row.attempts == 0:
                    refused[message_id] = "was never handed to an SMTP server (0 tries), so it cannot have arrived"
                    continue
                changed.append(message_id)
            for message_id, why in vet(conn, list(found), changed).items():
                if message_id in done:  # as asked already: nothing changes it
                    continue
                changed = [i for i in changed if i != message_id]
                if why is None:
                    refused.pop(message_id, None)
                else:
                    refused[message_id] = why
            if dry_run or not changed:
                return ActionResult(changed, refused, done, then(conn, changed) if changed else [])
            # a few hundred rows a statement, where two statements a row held SQLite's write lock past a worker's
            # busy timeout for a campaign's rows (20,000: 31 s); each only if still in ``states`` (a worker's claim)
            _lock_emails_first(conn, changed)
            update = (sa.update(M).where(M.c.status.in_(list(states)))
                      .values(last_error=text, updated_at=now, claimed_by=None, lease_until=None, **values)
                      .returning(M.c.id, M.c.attempts))  # fmt: skip
            tries: dict[int, int] = {}
            for part in _chunks(changed):
                tries.update((r.id, r.attempts) for r in conn.execute(update.where(M.c.id.in_(part))))
            for message_id in changed:
                if message_id not in tries:  # changed under us
                    refused[message_id] = "changed meanwhile; try again"
            changed = [message_id for message_id in changed if message_id in tries]
            attempts = [{"message_id": message_id, "attempt_no": tries[message_id], "worker": operator[:100],
                         "started_at": now, "finished_at": now, "outcome": Outcome.OPERATOR.value, "code": None,
                         "reply": text, "error_type": ""} for message_id in changed]  # fmt: skip
            for part in _chunks(attempts):
                conn.execute(sa.insert(A), list(part))
            carried = then(conn, changed)
        return ActionResult(changed, refused, done, carried)


def _merged_into(
    conn: Connection, carriers: Sequence[int], *, closed_with: bool = False
) -> list[tuple[int, str, int, datetime]]:
    """(id, dedupe key, carrier's id, expiry) of each row still stored as skipped, ``merged`` into one of ``carriers``
    (named by the carrier's payload ``carries``, and naming it back in its own ``merged_into``); ``closed_with``:
    of each row closed as failed with it instead (``CLOSED_WITH``)."""
    keys: dict[str, tuple[int, str]] = {}  # carried key → (carrier id, carrier key)
    query = sa.select(M.c.id, M.c.dedupe_key, M.c.payload, M.c.expires_at).where(M.c.campaign == "loyalty")
    for part in _chunks(list(carriers)):
        for r in conn.execute(query.where(M.c.id.in_(part))):
            carries = _payload(r.payload).get("carries")
            if isinstance(carries, str):
                keys[carries] = (r.id, r.dedupe_key)
    found: list[tuple[int, str, int, datetime]] = []
    for part in _chunks(sorted(keys)):
        for r in conn.execute(query.where(M.c.dedupe_key.in_(part), _fate(closed_with)).order_by(M.c.id)):
            carrier, carrier_key = keys[r.dedupe_key]
            if _payload(r.payload).get("merged_into") == carrier_key:
                found.append((r.id, r.dedupe_key, carrier, r.expires_at))
    return found


def _one_email(conn: Connection, ids: Sequence[int], resent: Sequence[int]) -> dict[int, str | None]:
    """Of the rows ``ids`` a resend names, the ones it leaves alone so that a loyalty spend milestone merged into an
    email (``Carried``) and that email do not both go, two emails for one order: id → why. That email, when the
    milestone went, may have gone or is to go on its own (``GOES``: resent by its ID, or sent before that email was
    resent); the milestone, when that email is (or this resend puts it back in the queue: resent together, or by a
    filter taking both). None: a milestone closed with that email, which this resend merges into it again
    (``Carried``). ``resent``: the rows the resend would put back in the queue."""
    query = sa.select(M.c.id, M.c.dedupe_key, M.c.payload, M.c.status, M.c.last_error).where(
        M.c.campaign == "loyalty")  # fmt: skip
    named = {r.id: r for part in _chunks(list(ids)) for r in conn.execute(query.where(M.c.id.in_(part)))}
    pairs: dict[int, tuple[str, str]] = {}  # id → ("carries" or "merged_into", the other row's dedupe key)
    for r in named.values():
        payload = _payload(r.payload)
        pairs.update((r.id, (kind, payload[kind])) for kind in ("carries", "merged_into")
                     if isinstance(payload.get(kind), str))  # fmt: skip
    keys = sorted({key for _, key in pairs.values()})
    others = {r.dedupe_key: r for part in _chunks(keys) for r in conn.execute(query.where(M.c.dedupe_key.in_(part)))}
    # PostgreSQL: each row of a pair locked and read again as locked: another operator's resend of the other row, not
    # committed yet, is waited for and seen (read before, both went: two emails); on SQLite the transaction's BEGIN
    # IMMEDIATE already waited for it. The emails first, then the milestones, as a close or resend of an email
    # changes them (the other order could deadlock with one)
    rows = {r.id: r for r in [*(named[i] for i in pairs), *others.values()]}
    carriers = sorted(i for i, r in rows.items() if "carries" in _payload(r.payload))
    locked = {r.id: r for part in [*_chunks(carriers), *_chunks(sorted(set(rows) - set(carriers)))]
              for r in conn.execute(query.where(M.c.id.in_(part)).order_by(M.c.id).with_for_update())}  # fmt: skip
    named = {i: locked.get(i, r) for i, r in named.items()}
    others = {key: locked.get(r.id, r) for key, r in others.items()}

    def other(message_id: int, kind: str) -> Any:
        """The row the pair names, if it names this one back."""
        named_kind, key = pairs[message_id]
        back = "merged_into" if kind == "carries" else "carries"
        row = others.get(key)
        if named_kind != kind or row is None or _payload(row.payload).get(back) != named[message_id].dedupe_key:
            return None
        return row

    left: dict[int, str | None] = {}
    for message_id in [i for i in resent if i in pairs]:  # the emails first: the milestone goes with those resent
        merged = other(message_id, "carries")
        if merged is not None and merged.status in GOES:
            left[message_id] = (f"the spend milestone merged into it, {merged.dedupe_key} (message {merged.id}), is "
                                f"{merged.status} on its own: resending this one too would send a second email for "
                                "the same order")  # fmt: skip
    going = set(resent) - set(left)
    for message_id in pairs:
        carrier = other(message_id, "merged_into")
        if carrier is None or (carrier.id not in going and carrier.status not in GOES):
            continue
        row = named[message_id]
        if carrier.id in going and row.status == MessageStatus.FAILED.value and (
                (row.last_error or "").startswith(CLOSED_WITH)):
            left[message_id] = None
            continue
        which = "this resend puts back in the queue" if carrier.id in going else f"is {carrier.status}"
        goes = "goes" if carrier.id in going else {"sent": "went", "uncertain": "may have gone"}.get(carrier.status,
                                                                                                       "goes")
        left[message_id] = (f"merged into message {carrier.id} ({carrier.dedupe_key}), which {which}: the milestone "
                            f"{goes} with that email, not in a second one")  # fmt: skip
    return left


def _lock_emails_first(conn: Connection, ids: Sequence[int]) -> None:
    """PostgreSQL: lock the loyalty emails among ``ids`` that carry a spend milestone, in id order, before the update
    of ``ids`` locks the rest: the emails before the milestones, as ``_one_email`` takes a pair's rows. The update
    alone takes them in the order it reads them (the milestone, the lower id, first, through the primary key), which
    beside a resend of that email deadlocked (the resend held the email and waited for the milestone). SQLite locks
    the whole database: nothing to read."""
    if conn.dialect.name != "postgresql":
        return
    query = sa.select(M.c.id, M.c.payload).where(M.c.campaign == "loyalty")
    carriers = sorted(r.id for part in _chunks(list(ids)) for r in conn.execute(query.where(M.c.id.in_(part)))
                      if isinstance(_payload(r.payload).get("carries"), str))  # fmt: skip
    for part in _chunks(carriers):
        conn.execute(sa.select(M.c.id).where(M.c.id.in_(part)).order_by(M.c.id).with_for_update()).all()


def _fate(closed_with: bool) -> sa.ColumnElement[bool]:
    """A merged row as planning stored it (skipped, ``merged``), or, ``closed_with``, as a close of the email it was
    merged into left it (failed, ``CLOSED_WITH``)."""
    if closed_with:
        return sa.and_(M.c.status == MessageStatus.FAILED.value,
                       sa.func.coalesce(M.c.last_error, "").startswith(CLOSED_WITH))  # fmt: skip
    return sa.and_(M.c.status == MessageStatus.SKIPPED.value, M.c.skip_reason == SkipReason.MERGED.value)


def _change(
    conn: Connection, carried: Sequence[Carried], *, now: datetime, operator: str, text: str, status: MessageStatus,
    reason: SkipReason | None, closed_with: bool = False,
) -> None:
    """Give the merged rows ``carried`` (as ``_merged_into(closed_with=...)`` found them, and still so) ``status`` and
    ``reason``, noted ``text`` with an ``operator`` attempt each; a few hundred a statement, as ``_decide`` does."""
    text = text[:500]
    update = (sa.update(M).where(_fate(closed_with))
              .values(status=status.value, skip_reason=reason.value if reason else None, last_error=text,
                      updated_at=now)
              .returning(M.c.id, M.c.attempts))  # fmt: skip
    for part in _chunks([c.id for c in carried]):
        attempts = [{"message_id": r.id, "attempt_no": r.attempts, "worker": operator[:100], "started_at": now,
                     "finished_at": now, "outcome": Outcome.OPERATOR.value, "code": None, "reply": text,
                     "error_type": ""} for r in conn.execute(update.where(M.c.id.in_(part)))]  # fmt: skip
        if attempts:
            conn.execute(sa.insert(A), attempts)


def _payload(text: str | None) -> dict[str, Any]:
    """A row's payload as a dict; {} for one that is not a JSON object (edited by hand)."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
