"""The Store's promises, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from worker.adapters import db, shop
from worker.adapters.store import HELD_SECONDS, Marks, Store
from worker.adapters.tables import metadata
from worker.core.audiences import message_id_for
from worker.domain import (
    CustomerRecord,
    Disposition,
    Locale,
    MessageStatus,
    OrderRecord,
    OrderStatus,
    Outcome,
    PlannedMessage,
    SendResult,
    SkipReason,
)

NOW = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)


@pytest.fixture
def store(db_url: str) -> Store:
    s = Store.from_url(db_url)
    shop.upsert_customers(
        s.engine,
        [CustomerRecord(f"C{i}", f"c{i}@example.com", f"C {i}", Locale.ID, "Asia/Jakarta", None, True, "", "")
         for i in range(3)],
        NOW,
    )
    yield s  # type: ignore[misc]
    s.close()


def planned(n: int, *, due: datetime = NOW, prefix: str = "k") -> list[PlannedMessage]:
    return [
        PlannedMessage(
            dedupe_key=f"{prefix}:{i}",
            campaign="winback",
            step=1,
            customer_id=1 + i % 3,
            email=f"c{i % 3}@example.com",
            due_at=due,
            expires_at=due + timedelta(days=14),
            message_id=message_id_for(f"{prefix}:{i}", "shop.example"),
        )
        for i in range(n)
    ]


def test_schema_is_at_head_and_upgrade_is_idempotent(store: Store) -> None:
    db.check_schema(store.engine)
    before, after = db.upgrade(store.engine)
    assert before == after == db.head_revision(store.engine)


POSTGRESQL_ONLY = {
    ("add_fk", "ForeignKeyConstraint", ("customer_id",)),
    ("add_constraint", "UniqueConstraint", ("message_id",)),
    ("remove_index", "Index", ("message_id",)),
}
"""What migration 0011 does on PostgreSQL alone: the ledger's foreign key to ``customer`` becomes a trigger on
``customer``, and the unique Message-ID constraint a unique index of the given Message-IDs."""


def test_the_migrations_build_exactly_the_tables_the_code_declares(store: Store) -> None:
    """Alembic's comparison of the migrated database with the SQLModel tables finds nothing to change, but on
    PostgreSQL exactly what migration 0011 changes there."""
    with store.engine.connect() as conn:
        found = {_difference(d) for d in compare_metadata(MigrationContext.configure(conn), metadata)}
    assert found == (POSTGRESQL_ONLY if store.dialect == "postgresql" else set())


def _difference(diff: Any) -> Any:
    """An index, key or constraint difference as (operation, kind, columns); any other kind of difference (a
    column's type, say, which Alembic reports as a list) as its repr, which no expectation matches."""
    if isinstance(diff, tuple) and hasattr(diff[1], "columns"):
        return diff[0], type(diff[1]).__name__, tuple(c.name for c in diff[1].columns)
    return repr(diff)


def test_planning_twice_creates_each_row_once(store: Store) -> None:
    assert store.insert_messages(planned(10), NOW) == 10
    assert store.insert_messages(planned(10), NOW) == 0
    assert store.insert_messages(planned(12), NOW) == 2
    assert store.status_counts() == {("winback", "planned", None): 12}


def test_claim_takes_only_due_rows_and_never_the_same_row_twice(store: Store) -> None:
    store.insert_messages(planned(5), NOW)
    store.insert_messages(planned(3, due=NOW + timedelta(hours=1), prefix="later"), NOW)
    first = store.claim(worker="a", now=NOW, limit=3, lease_seconds=60)
    second = store.claim(worker="b", now=NOW, limit=10, lease_seconds=60)
    assert len(first) == 3 and len(second) == 2
    assert not {m.id for m in first} & {m.id for m in second}
    assert store.claim(worker="c", now=NOW, limit=10, lease_seconds=60) == []
    assert len(store.claim(worker="c", now=NOW + timedelta(hours=1), limit=10, lease_seconds=60)) == 3


def test_claim_takes_the_highest_priority_first_then_the_oldest_due(store: Store) -> None:
    def one(key: str, priority: int, due: datetime) -> PlannedMessage:
        return dataclasses.replace(planned(1, due=due, prefix=key)[0], priority=priority)

    store.insert_messages([
        one("low-old", 10, NOW - timedelta(days=2)), one("high-new", 30, NOW - timedelta(minutes=1)),
        one("high-old", 30, NOW - timedelta(hours=1)), one("high-later", 30, NOW + timedelta(hours=1)),
        one("mid", 20, NOW),
    ], NOW)  # fmt: skip
    first = store.claim(worker="a", now=NOW, limit=3, lease_seconds=60)
    assert [m.dedupe_key for m in first] == ["high-old:0", "high-new:0", "mid:0"]
    # a high-priority row that is not due yet does not hold back the lower ones
    assert [m.dedupe_key for m in store.claim(worker="a", now=NOW, limit=3, lease_seconds=60)] == ["low-old:0"]


def test_the_claim_reads_the_queue_index_in_order_and_never_sorts_the_queue(sqlite_url: str) -> None:
    """With a million rows waiting, a claim that sorts every due row takes seconds; one that walks the
    partial queue index takes milliseconds. SQLite's plans say which (PostgreSQL's depend on statistics)."""
    store = Store.from_url(sqlite_url)
    db.upgrade(store.engine)
    shop.upsert_customers(store.engine, [CustomerRecord("C0", "c0@example.com", "C", Locale.ID, "Asia/Jakarta", None,
                                                        True, "", "")], NOW)  # fmt: skip
    store.insert_messages([dataclasses.replace(m, customer_id=1) for m in planned(50)], NOW)
    seen: list[tuple[str, Any]] = []

    def remember(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        seen.append((statement, parameters))

    sa.event.listen(store.engine, "before_cursor_execute", remember)
    try:
        assert len(store.claim(worker="a", now=NOW, limit=10, lease_seconds=60)) == 10
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", remember)
    claims = [(sql, params) for sql, params in seen if sql.lstrip().startswith("UPDATE message")]
    assert claims
    with store.engine.connect() as conn:
        for sql, params in claims:
            plan = " | ".join(row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params))
            assert "ix_message_queue" in plan and "TEMP B-TREE" not in plan, plan
    store.close()


def test_concurrent_claims_from_threads_partition_the_queue(store: Store) -> None:
    store.insert_messages(planned(200), NOW)
    results: dict[str, list[int]] = {}

    def worker(name: str) -> None:
        other = Store.from_url(store.engine.url.render_as_string(hide_password=False))
        got: list[int] = []
        while batch := other.claim(worker=name, now=NOW, limit=7, lease_seconds=60):
            got += [m.id for m in batch]
        results[name] = got
        other.close()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [i for ids in results.values() for i in ids]
    assert len(claimed) == 200 and len(set(claimed)) == 200


def test_only_the_holder_can_mark_and_record(store: Store) -> None:
    store.insert_messages(planned(2), NOW)
    batch = store.claim(worker="a", now=NOW, limit=2, lease_seconds=60)
    assert store.mark_sending([m.id for m in batch], worker="intruder", now=NOW) == set()
    assert store.mark_sending([batch[0].id], worker="a", now=NOW) == {batch[0].id}
    store.record([
        Disposition(message=batch[0], status=MessageStatus.SENT, worker="a", started_at=NOW, finished_at=NOW,
                    result=SendResult(Outcome.SENT, 250, "2.0.0 queued as X1"), subject="Halo"),
        Disposition(message=batch[1], status=MessageStatus.SKIPPED, worker="a", started_at=NOW, finished_at=NOW,
                    skip_reason=SkipReason.SUPPRESSED),
    ])
    rows = {r["dedupe_key"]: r for r in store.messages()}
    assert rows["k:0"]["status"] == "sent" and rows["k:0"]["last_code"] == 250
    assert rows["k:0"]["attempts"] == 1 and rows["k:0"]["sent_at"] == NOW and rows["k:0"]["subject"] == "Halo"
    assert rows["k:1"]["status"] == "skipped" and rows["k:1"]["skip_reason"] == "suppressed"
    assert [a["outcome"] for a in store.attempts_for(batch[0].id)] == ["sent"]
    assert store.attempts_for(batch[1].id) == []  # a skip is not an SMTP attempt
    # a sent row cannot be recorded again by anyone
    store.record([Disposition(message=batch[0], status=MessageStatus.FAILED, worker="a", started_at=NOW,
                              finished_at=NOW, result=SendResult(Outcome.PERMANENT, 550, "no"))])
    assert {r["dedupe_key"]: r["status"] for r in store.messages()}["k:0"] == "sent"


def test_a_row_whose_customer_another_worker_is_sending_to_is_held_back(store: Store) -> None:
    """Two workers hold one message each for customers 1, 2 and 3 (k:0-k:2 and k:3-k:5). The frequency cap
    is judged against the ledger, which shows another worker's message only once it is marked or recorded,
    so the mark checks."""
    store.insert_messages(planned(6), NOW)
    a = store.claim(worker="a", now=NOW, limit=3, lease_seconds=60)
    b = store.claim(worker="b", now=NOW, limit=3, lease_seconds=60)
    assert [m.customer_id for m in a] == [m.customer_id for m in b] == [1, 2, 3]
    assert store.mark_sending([a[0].id], worker="a", now=NOW) == {a[0].id}

    # a is sending to customer 1: b's message for them goes back to the queue; 2 and 3 go out
    marks = store.record_and_mark([], [m.id for m in b], worker="b", now=NOW)
    assert (marks.sending, marks.held) == ({b[1].id, b[2].id}, {b[0].id})
    held = {r["dedupe_key"]: r for r in store.messages()}["k:3"]
    assert (held["status"], held["claimed_by"], held["attempts"]) == ("planned", None, 0)
    assert held["next_attempt_at"] == NOW + timedelta(seconds=HELD_SECONDS)

    def sent(message: Any, worker: str, at: datetime) -> None:
        store.record([Disposition(message=message, status=MessageStatus.SENT, worker=worker, started_at=at,
                                  finished_at=at, result=SendResult(Outcome.SENT, 250, "ok"))])  # fmt: skip

    # b's message to customer 2 is sent and recorded after a claimed its own: a's is held back
    sent(b[1], "b", NOW + timedelta(seconds=1))
    assert store.record_and_mark([], [a[1].id], worker="a", now=NOW + timedelta(seconds=2)) == Marks(held={a[1].id})
    # b finished its message to customer 3 just before a claimed (a's facts may have been read before b's record
    # was committed, or b's clock runs behind): held back too
    sent(b[2], "b", NOW - timedelta(seconds=1))
    assert store.record_and_mark([], [a[2].id], worker="a", now=NOW + timedelta(seconds=2)) == Marks(held={a[2].id})

    # a's own send does not hold a back: its contact policy counted it
    sent(a[0], "a", NOW + timedelta(seconds=3))
    again = store.claim(worker="a", now=NOW + timedelta(seconds=62), limit=10, lease_seconds=60)
    assert sorted(m.dedupe_key for m in again) == ["k:1", "k:2", "k:3"]
    by_key = {m.dedupe_key: m.id for m in again}
    assert store.record_and_mark([], [by_key["k:3"]], worker="a", now=NOW + timedelta(seconds=62)) == Marks(
        sending={by_key["k:3"]}
    )
    # and a minute after b's send, the next claim is the contact policy's to judge alone
    assert store.record_and_mark([], [by_key["k:1"]], worker="a", now=NOW + timedelta(seconds=62)) == Marks(
        sending={by_key["k:1"]}
    )
    # a row that lost its lease is neither
    assert store.record_and_mark([], [by_key["k:2"]], worker="intruder", now=NOW) == Marks()


def test_lapsed_leases_requeue_claimed_rows_and_make_sending_rows_uncertain(store: Store) -> None:
    store.insert_messages(planned(2), NOW)
    batch = store.claim(worker="dead", now=NOW, limit=2, lease_seconds=60)
    store.mark_sending([batch[0].id], worker="dead", now=NOW)
    assert store.release_expired_leases(NOW + timedelta(seconds=59)) == (0, 0)
    assert store.release_expired_leases(NOW + timedelta(seconds=61)) == (1, 1)
    statuses = {r["dedupe_key"]: r["status"] for r in store.messages()}
    assert statuses == {"k:0": "uncertain", "k:1": "planned"}
    again = store.claim(worker="alive", now=NOW + timedelta(seconds=61), limit=10, lease_seconds=60)
    assert [m.dedupe_key for m in again] == ["k:1"]


def test_retry_waits_for_its_time(store: Store) -> None:
    store.insert_messages(planned(1), NOW)
    (m,) = store.claim(worker="a", now=NOW, limit=1, lease_seconds=60)
    store.mark_sending([m.id], worker="a", now=NOW)
    store.record([Disposition(message=m, status=MessageStatus.RETRY, worker="a", started_at=NOW, finished_at=NOW,
                              result=SendResult(Outcome.TRANSIENT, 451, "try later"),
                              next_attempt_at=NOW + timedelta(minutes=5))])
    assert store.claim(worker="a", now=NOW + timedelta(minutes=4), limit=1, lease_seconds=60) == []
    (again,) = store.claim(worker="a", now=NOW + timedelta(minutes=5), limit=1, lease_seconds=60)
    assert again.attempts == 1


def test_reimport_changes_nothing_and_orders_refresh_customer_facts(store: Store) -> None:
    orders = [OrderRecord("O1", "C0", OrderStatus.DELIVERED, NOW - timedelta(days=50), None, 100_00, "IDR"),
              OrderRecord("O2", "C0", OrderStatus.CANCELLED, NOW - timedelta(days=5), None, 100_00, "IDR")]
    first = shop.upsert_orders(store.engine, orders, NOW)
    again = shop.upsert_orders(store.engine, orders, NOW)
    assert (first.created, again.created, again.updated, again.unchanged) == (2, 0, 0, 2)
    assert store.send_time_facts([1])[1].order_count == 1
    changed = shop.upsert_orders(store.engine, [orders[0], OrderRecord("O2", "C0", OrderStatus.DELIVERED,
                                 NOW - timedelta(days=5), None, 100_00, "IDR")], NOW)
    assert (changed.updated, changed.unchanged) == (1, 1)
    facts = store.send_time_facts([1])[1]
    assert facts.order_count == 2 and facts.last_order_at == NOW - timedelta(days=5)


def first_order_numbers(store: Store) -> dict[str, str | None]:
    from worker.adapters.store import C

    with store.engine.begin() as conn:
        return {r[0]: r[1] for r in conn.execute(sa.select(C.c.external_id, C.c.first_order_external_id))}


def test_the_first_purchase_s_order_number_follows_the_imports(store: Store) -> None:
    """Win-back's dedupe key names the only order: the customer row carries its number (migration 0009)."""
    later = OrderRecord("O-later", "C0", OrderStatus.PAID, NOW - timedelta(days=50), None, 100_00, "IDR")
    shop.upsert_orders(store.engine, [later], NOW)
    assert first_order_numbers(store) == {"C0": "O-later", "C1": None, "C2": None}
    earlier = OrderRecord("O-earlier", "C0", OrderStatus.PAID, NOW - timedelta(days=90), None, 100_00, "IDR")
    shop.upsert_orders(store.engine, [earlier], NOW)
    assert first_order_numbers(store)["C0"] == "O-earlier"
    refunded = dataclasses.replace(earlier, status=OrderStatus.REFUNDED)
    shop.upsert_orders(store.engine, [refunded], NOW)
    assert first_order_numbers(store)["C0"] == "O-later"


def test_upgrading_an_existing_shop_fills_in_the_first_order_numbers(sqlite_url: str) -> None:
    """A database planned by an older Kembali (schema 0008) gets the column and its values on upgrade."""
    engine = db.create_engine(sqlite_url)
    try:
        _schema_at(engine, "0008")
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO customer (id, external_id, email, name, locale, time_zone, marketing_consent,"
                " consent_basis, consent_source, order_count, first_order_id, total_spent_minor, created_at,"
                " updated_at) VALUES (1, 'C1', 'c1@example.com', 'C 1', 'id', 'Asia/Jakarta', 1, '', '', 1, 7, 0,"
                " '2026-11-22 03:00:00', '2026-11-22 03:00:00')"
            )
            conn.exec_driver_sql(
                "INSERT INTO shop_order (id, external_id, customer_id, status, placed_at, total_minor, currency,"
                " created_at, updated_at) VALUES (7, 'INV-7', 1, 'paid', '2026-10-01 03:00:00', 100, 'IDR',"
                " '2026-11-22 03:00:00', '2026-11-22 03:00:00')"
            )
        assert db.upgrade(engine) == ("0008", db.head_revision(engine))
        with engine.begin() as conn:
            assert conn.exec_driver_sql("SELECT first_order_external_id FROM customer").scalar_one() == "INV-7"
    finally:
        engine.dispose()


def test_suppression_is_once_per_address(store: Store) -> None:
    assert store.suppress("c1@example.com", reason="unsubscribed", source="test", now=NOW) is True
    assert store.suppress("c1@example.com", reason="unsubscribed", source="test", now=NOW) is False
    assert store.send_time_facts([2])[2].suppressed is True


def test_a_customer_the_ledger_names_cannot_be_deleted(store: Store) -> None:
    """SQLite's foreign key and, on PostgreSQL, the trigger on ``customer`` (migration 0011) refuse alike;
    a customer the ledger does not name can go, and the importer's updates of customers go on."""
    store.insert_messages(planned(1), NOW)  # to customer 1 (C0)
    refusal = (r"customer C0 \(id 1\) has rows in the ledger \(message\): it cannot be deleted"
               if store.dialect == "postgresql" else "FOREIGN KEY constraint failed")  # fmt: skip
    with pytest.raises(sa.exc.IntegrityError, match=refusal), store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM customer WHERE external_id = 'C0'"))
    if store.dialect == "postgresql":
        for refused, says in (("UPDATE customer SET id = 100 WHERE external_id = 'C0'", "it cannot be updated"),
                              ("TRUNCATE customer CASCADE", "cannot truncate customer: the ledger")):
            with pytest.raises(sa.exc.IntegrityError, match=says), store.engine.begin() as conn:
                conn.execute(sa.text(refused))
    shop.upsert_customers(store.engine, [CustomerRecord("C0", "new@example.com", "C 0", Locale.EN, "Asia/Jakarta",
                                                        None, True, "", "")], NOW)  # fmt: skip
    with store.engine.begin() as conn:
        assert conn.execute(sa.text("DELETE FROM customer WHERE external_id = 'C2'")).rowcount == 1
        people = conn.execute(sa.text("SELECT external_id, email FROM customer ORDER BY id")).all()
        assert conn.execute(sa.text("SELECT customer_id FROM message")).scalars().all() == [1]
    assert [tuple(p) for p in people] == [("C0", "new@example.com"), ("C1", "c1@example.com")]


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("pg", marks=pytest.mark.postgres)])
def test_a_ledger_that_has_sent_upgrades_from_schema_0007_with_every_row(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """Migration 0008 rebuilds SQLite's ``message`` table; the ``attempt`` rows that refer to it stay, and
    the foreign key checks are on again afterwards."""
    url = request.getfixturevalue(f"{kind}_url")
    engine = db.create_engine(url)
    try:
        _schema_at(engine, "0007")
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO customer (id, external_id, email, name, locale, time_zone, marketing_consent,"
                " consent_basis, consent_source, order_count, total_spent_minor, created_at, updated_at)"
                " VALUES (1, 'C1', 'c1@example.com', 'C 1', 'id', 'Asia/Jakarta', true, '', '', 1, 0, :t, :t)"
            ), {"t": NOW})  # fmt: skip
            conn.execute(sa.text(
                "INSERT INTO message (id, dedupe_key, campaign, step, priority, customer_id, email, status,"
                " due_at, expires_at, next_attempt_at, attempts, message_id, payload, created_at, updated_at,"
                " sent_at) VALUES (1, 'winback:C1:O1:1', 'winback', 1, 0, 1, 'c1@example.com', 'sent', :t, :t, :t,"
                " 1, '<a@shop.example>', '{}', :t, :t, :t)"
            ), {"t": NOW})  # fmt: skip
            conn.execute(sa.text(
                "INSERT INTO attempt (message_id, attempt_no, worker, started_at, finished_at, outcome, code,"
                " reply, error_type) VALUES (1, 1, 'w', :t, :t, 'sent', 250, 'ok', '')"
            ), {"t": NOW})  # fmt: skip
        assert db.upgrade(engine) == ("0007", db.head_revision(engine))
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT message_id, status FROM message")).all() == [("<a@shop.example>",
                                                                                               "sent")]  # fmt: skip
            assert conn.execute(sa.text("SELECT message_id, outcome FROM attempt")).all() == [(1, "sent")]
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM message"))  # the attempt refers to it: checked again
    finally:
        engine.dispose()


def test_an_sqlite_upgrade_that_would_leave_a_broken_reference_changes_nothing(sqlite_url: str) -> None:
    """The upgrade runs with foreign key checks off, so it checks every reference before its commit: a ledger
    row naming a missing customer (written here behind the checks' back) stops it, and the schema stays."""
    import sqlite3

    from worker.errors import SchemaError

    engine = db.create_engine(sqlite_url)
    try:
        _schema_at(engine, "0010")
        raw = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
        raw.execute(
            "INSERT INTO message (dedupe_key, campaign, step, priority, customer_id, email, status, due_at,"
            " expires_at, next_attempt_at, attempts, payload, created_at, updated_at) VALUES ('k', 'winback', 1, 0,"
            " 999, 'x@example.com', 'planned', '2026-01-01', '2026-01-01', '2026-01-01', 0, '{}', '2026-01-01',"
            " '2026-01-01')"
        )  # fmt: skip
        raw.commit()
        raw.close()
        with pytest.raises(SchemaError, match="message row 1 names a missing customer"):
            db.upgrade(engine)
        assert db.current_revision(engine) == "0010"
        with pytest.raises(sa.exc.IntegrityError, match="FOREIGN KEY"), engine.begin() as conn:
            conn.execute(sa.text("UPDATE message SET customer_id = 998"))  # the checks are on again
    finally:
        engine.dispose()


def _schema_at(engine: sa.Engine, revision: str) -> None:
    """The schema as an older Kembali left it: the migrations up to ``revision``."""
    from alembic import command

    cfg = db._alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
