"""Maintenance, job bookkeeping, suppressions and feedback on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from worker import log
from worker.adapters import opstore, shop
from worker.adapters.store import Store
from worker.core.audiences import plan_winback
from worker.domain import (
    CustomerRecord,
    Disposition,
    Locale,
    MessageStatus,
    OrderRecord,
    OrderStatus,
    Outcome,
    SendResult,
)

NOW = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)


def _shop(store: Store, n: int) -> None:
    shop.upsert_customers(store.engine, [
        CustomerRecord(f"C{i}", f"c{i}@example.com", f"C {i}", Locale.EN if i % 2 else Locale.ID, "Asia/Jakarta",
                       None, True, "opt_in", "checkout") for i in range(n)], NOW)
    shop.upsert_orders(store.engine, [
        OrderRecord(f"O{i}", f"C{i}", OrderStatus.DELIVERED, NOW - timedelta(days=60), None, 100, "IDR")
        for i in range(n)], NOW)


def _plan(store: Store, *, expires_after_days: int = 14, at: datetime = NOW) -> None:
    candidates = store.winback_candidates(cutoff=at - timedelta(days=45))
    store.insert_messages([plan_winback(c, now=at, expires_after_days=expires_after_days, domain="s.example")
                           for c in candidates], at)


def _statuses(store: Store) -> dict[str, str]:
    return {m["email"]: m["status"] + (f":{m['skip_reason']}" if m["skip_reason"] else "") for m in store.messages()}


def test_expired_waiting_messages_are_skipped_and_nothing_else_is(db_url: str) -> None:
    store = Store.from_url(db_url)
    try:
        _shop(store, 3)
        _plan(store, expires_after_days=1)
        claimed = store.claim(worker="w", now=NOW, limit=1, lease_seconds=60)
        assert opstore.expire_messages(store, NOW + timedelta(hours=23)) == 0
        assert opstore.expire_messages(store, NOW + timedelta(days=2)) == 2
        statuses = _statuses(store)
        assert statuses.pop(claimed[0].email) == "claimed"  # a claimed row is the sender's to finish
        assert set(statuses.values()) == {"skipped:expired"}
    finally:
        store.close()


def test_abandon_requeues_claimed_rows_and_makes_sending_rows_uncertain(db_url: str) -> None:
    store = Store.from_url(db_url)
    try:
        _shop(store, 3)
        _plan(store)
        a, b, c = store.claim(worker="me", now=NOW, limit=3, lease_seconds=60)
        store.mark_sending([a.id], worker="me", now=NOW)
        assert opstore.abandon(store, worker="other", now=NOW, why="x") == (0, 0)
        assert opstore.abandon(store, worker="me", now=NOW, why="grace ran out") == (2, 1)
        statuses = _statuses(store)
        assert statuses[a.email] == "uncertain"
        assert statuses[b.email] == statuses[c.email] == "planned"
        assert store.messages(statuses=["uncertain"])[0]["last_error"] == "grace ran out"
    finally:
        store.close()


def test_old_attempt_rows_are_pruned(db_url: str) -> None:
    store = Store.from_url(db_url)
    try:
        _shop(store, 4)
        _plan(store)
        rows = store.claim(worker="w", now=NOW, limit=4, lease_seconds=60)
        store.mark_sending([r.id for r in rows], worker="w", now=NOW)
        store.record([
            Disposition(r, MessageStatus.SENT, "w", NOW - timedelta(days=i * 100), NOW - timedelta(days=i * 100),
                        SendResult(Outcome.SENT, 250, "ok")) for i, r in enumerate(rows)])
        assert opstore.prune_attempts(store, NOW - timedelta(days=150), batch=1) == 2
        assert sum(len(store.attempts_for(r.id)) for r in rows) == 2
        assert len(store.messages()) == 4  # message rows are never pruned
    finally:
        store.close()


def test_pruning_keeps_the_attempts_a_merged_milestone_needs_and_prunes_every_other_batch_after_them(
    db_url: str,
) -> None:
    # Given 4 sent messages with an old attempt each, the first two (the lowest attempt ids) rows that carry a
    # merged loyalty milestone and may still be sent (resent: retry, not expired)
    store = Store.from_url(db_url)
    try:
        _shop(store, 4)
        _plan(store)
        rows = sorted(store.claim(worker="w", now=NOW, limit=4, lease_seconds=60), key=lambda r: r.id)
        store.mark_sending([r.id for r in rows], worker="w", now=NOW)
        store.record([Disposition(r, MessageStatus.SENT, "w", NOW - timedelta(days=200), NOW - timedelta(days=200),
                                  SendResult(Outcome.SENT, 250, "ok")) for r in rows])  # fmt: skip
        m = sa.table("message", sa.column("id"), sa.column("payload"), sa.column("status"))
        with store.engine.begin() as conn:
            conn.execute(sa.update(m).where(m.c.id.in_([rows[0].id, rows[1].id]))
                         .values(payload='{"carries": "loyalty:C0:spend-1"}', status="retry"))  # fmt: skip

        # When attempts are pruned one a batch
        pruned = opstore.prune_attempts(store, NOW - timedelta(days=150), batch=1)

        # Then the guarded two stay, and the batches after them still prune the other two
        assert pruned == 2
        assert [len(store.attempts_for(r.id)) for r in rows] == [1, 1, 0, 0]
    finally:
        store.close()


def test_a_message_id_is_found_on_its_domain_in_any_case_and_on_no_other(db_url: str) -> None:
    # Given a ledger row written while shop.domain had capitals (as versions before it was lower-cased wrote it)
    store = Store.from_url(db_url)
    try:
        _shop(store, 2)
        candidates = store.winback_candidates(cutoff=NOW - timedelta(days=45))
        store.insert_messages([plan_winback(c, now=NOW, expires_after_days=14, domain="S.Example")
                               for c in candidates], NOW)  # fmt: skip
        with store.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT customer_id, message_id, email FROM message ORDER BY id")).all()
        customer_id, message_id, email = rows[0]
        local = message_id.rpartition("@")[0]
        assert message_id == f"{local}@S.Example>"
        # When the link's Message-ID is looked up on the domain as it is written now, Then the exact look-up misses
        # it, and the look-up in any case finds its address; not for another customer, nor on another domain
        assert opstore.recipient(store, customer_id, f"{local}@s.example>") is None
        found = opstore.recipient_any_case(store, customer_id, [f"{local}@other.example>", f"{local}@s.example>"])
        assert found == email
        assert opstore.recipient_any_case(store, rows[1][0], [f"{local}@s.example>"]) is None
        assert opstore.recipient_any_case(store, customer_id, [f"{local}@other.example>"]) is None
    finally:
        store.close()


def test_job_runs_only_move_forward(db_url: str) -> None:
    store = Store.from_url(db_url)
    try:
        assert opstore.last_run(store, "plan:winback") is None
        opstore.record_run(store, "plan:winback", at=NOW, worker="a")
        opstore.record_run(store, "plan:winback", at=NOW - timedelta(hours=1), worker="b")
        assert opstore.last_run(store, "plan:winback") == NOW
        opstore.record_run(store, "plan:winback", at=NOW + timedelta(days=1), worker="b")
        assert opstore.last_run(store, "plan:winback") == NOW + timedelta(days=1)
    finally:
        store.close()


def test_feedback_first_click_and_first_comment_win(db_url: str) -> None:
    store = Store.from_url(db_url)
    try:
        _shop(store, 2)
        assert opstore.record_feedback(store, "O1", 5, NOW) == (True, opstore.FeedbackRow("O1", 5, None))
        assert opstore.record_feedback(store, "O1", 1, NOW) == (False, opstore.FeedbackRow("O1", 5, None))
        assert opstore.add_feedback_comment(store, "O9", "?", NOW) is None
        assert opstore.add_feedback_comment(store, "O1", "enak", NOW) == (True, opstore.FeedbackRow("O1", 5, "enak"))
        assert opstore.add_feedback_comment(store, "O1", "again", NOW) == (False, opstore.FeedbackRow("O1", 5, "enak"))
        assert opstore.order_locale(store, "O1") is Locale.EN
        assert opstore.order_locale(store, "O0") is Locale.ID
        assert opstore.order_locale(store, "nope") is None
    finally:
        store.close()


def test_a_rating_links_order_is_its_database_id_even_when_another_order_has_that_number(db_url: str) -> None:
    # Given a shop that numbers its orders: C1's order "2" got database id 1, C2's order "1" database id 2
    store = Store.from_url(db_url)
    try:
        shop.upsert_customers(store.engine, [
            CustomerRecord(f"C{i}", f"c{i}@example.com", f"C {i}", locale, "Asia/Jakarta", None, True, "opt_in",
                           "checkout") for i, locale in ((1, Locale.ID), (2, Locale.EN))], NOW)
        shop.upsert_orders(store.engine, [
            OrderRecord(ref, cust, OrderStatus.DELIVERED, NOW - timedelta(days=9), None, 100, "IDR")
            for ref, cust in (("2", "C1"), ("1", "C2"))], NOW)
        with store.engine.connect() as conn:
            ids = dict(conn.execute(sa.text("SELECT external_id, id FROM shop_order")).all())
        assert ids == {"2": 1, "1": 2}
        # Then the rating link of database order 2 (f:2:<score>) gets C2's language, and of order 1 C1's
        assert opstore.order_locale(store, "2") is Locale.EN
        assert opstore.order_locale(store, "1") is Locale.ID
    finally:
        store.close()


def test_suppressions_add_many_list_remove(db_url: str) -> None:
    store = Store.from_url(db_url)
    try:
        assert opstore.suppress_many(store, ["a@x.id", "b@x.id", "a@x.id"], reason="manual", source="t", now=NOW) == 2
        assert opstore.suppress_many(store, ["b@x.id", "c@x.id"], reason="complaint", source="t", now=NOW) == 1
        assert [r["email"] for r in opstore.suppressions(store, reason="manual")] == ["a@x.id", "b@x.id"]
        assert opstore.unsuppress(store, "a@x.id") and not opstore.unsuppress(store, "a@x.id")
        assert not opstore.is_suppressed(store, "a@x.id") and opstore.is_suppressed(store, "c@x.id")
    finally:
        store.close()


def test_suppress_entries_stores_each_address_with_its_own_entry(db_url: str) -> None:
    store = Store.from_url(db_url)
    try:
        # Given entries as `suppress import` reads them, two of them one mailbox in two cases
        earlier = NOW - timedelta(days=300)
        entries = {
            "Budi@X.id": {"reason": "unsubscribed", "source": "unsubscribe-link", "created_at": earlier},
            "budi@x.id": {"reason": "manual", "source": "import:b.csv", "created_at": NOW},
            "sari@x.id": {"reason": "complaint", "source": "import:b.csv", "created_at": NOW},
        }
        # Then each mailbox is new once, with the reason, source and time of its first entry
        assert opstore.suppress_entries(store, entries) == 2
        assert opstore.suppress_entries(store, {"sari@x.id": entries["budi@x.id"]}) == 0
        stored = {r["email"]: (r["reason"], r["source"], r["created_at"])
                  for r in opstore.suppressions(store)}
        assert stored == {"budi@x.id": ("unsubscribed", "unsubscribe-link", earlier),
                          "sari@x.id": ("complaint", "import:b.csv", NOW)}
    finally:
        store.close()


def test_a_database_error_names_the_statement_but_never_its_parameters(db_url: str) -> None:
    engine = Store.from_url(db_url).engine
    # Given a statement that fails with a customer's address among its parameters
    # (logs and operators' terminals carry such errors: dispatch_failed, job_failed, web_handler_failed)
    with engine.connect() as conn:
        conn.execute(sa.text("CREATE TEMPORARY TABLE seen (email VARCHAR(320) PRIMARY KEY)"))
        insert = sa.text("INSERT INTO seen (email) VALUES (:email)")
        conn.execute(insert, {"email": "rahasia@example.com"})
        # When it fails
        try:
            conn.execute(insert, {"email": "rahasia@example.com"})
        except sa.exc.IntegrityError as exc:
            error, line = str(exc), log.error_line(exc)
        else:
            raise AssertionError("a second row with the same key was accepted")
    engine.dispose()
    # Then the error keeps the statement but not its parameters, and the log line (its first line) says
    # what failed without the key's value (PostgreSQL's DETAIL line names it)
    assert "INSERT INTO seen" in error and "rahasia" not in error.replace(error.partition("\n")[2], ""), error
    assert "[SQL parameters hidden" in error
    assert line.startswith("IntegrityError: ") and "unique" in line.lower(), line
    assert "rahasia" not in line, line
