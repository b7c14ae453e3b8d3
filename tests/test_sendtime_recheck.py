"""The last re-check, at the ``sending`` mark: a customer who unsubscribes, is suppressed, withdraws consent or orders
again while their message, already prepared (re-checked and rendered), waits for its sender gets no email; the row
ends ``skipped`` with the reason the prepare-time re-check gives, on SQLite and PostgreSQL."""

from __future__ import annotations

import email
import logging
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.sendkit import NOW, Shop, make_settings, settings_dict, write_config
from tests.smtp_server import RecordingServer, closed_port
from worker import cli
from worker.adapters import shop as shopdata
from worker.adapters.ratestore import RateStore
from worker.adapters.store import M, Marks, Store
from worker.core.audiences import message_id_for
from worker.core.limits import quota_day
from worker.domain import (
    CustomerRecord,
    Disposition,
    Locale,
    MessageStatus,
    OrderLineRecord,
    OrderRecord,
    OrderStatus,
    Outcome,
    PlannedMessage,
    SendResult,
    SkipReason,
)
from worker.limiter import QUOTA_KEY
from worker.pipeline import plan

ADDRESSES = ["unsub@test.example", "noconsent@test.example", "ordered@test.example", "stays@test.example"]


@pytest.fixture(autouse=True)
def link_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")


def _before_the_first_mark(store: Store, change: Callable[[], None]) -> list[int]:
    """Run ``change`` once, right before the first group commit that marks rows ``sending`` (the batch is prepared
    by then: re-checked, judged and rendered); returns the ids that commit was given."""
    record_and_mark = store.record_and_mark
    marked: list[int] = []

    def interposed(records: Any, ids: Any, **kwargs: Any) -> Marks:
        if ids and not marked:
            marked.extend(ids)
            change()
        return record_and_mark(records, ids, **kwargs)

    store.record_and_mark = interposed  # type: ignore[method-assign]
    return marked


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [getattr(r, "kembali_fields", {}) for r in caplog.records if r.getMessage() == name]


def test_who_unsubscribes_withdraws_consent_or_orders_while_their_email_waits_for_its_mark_gets_none(
    db_url: str, smtp_server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given four customers due a win-back, a daily quota, and their batch claimed and prepared (each message
    # re-checked and rendered) in one run
    caplog.set_level(logging.INFO)
    settings = make_settings(db_url, smtp_server.port, daily_quota=10, compose_processes=0)
    shop = Shop(db_url, settings, ADDRESSES)
    try:
        plan(shop.store, settings, NOW)
        later = NOW + timedelta(minutes=1)

        def meanwhile() -> None:
            # When, before the sender's mark, one unsubscribes (as the /unsubscribe endpoint does), an import
            # withdraws another's consent, and a third orders again
            assert shop.store.suppress(ADDRESSES[0], reason="unsubscribed", source="unsubscribe-link", now=later)
            shopdata.upsert_customers(shop.store.engine, [
                CustomerRecord("C1", ADDRESSES[1], "Pelanggan 1", Locale.ID, "Asia/Jakarta", None, False, "opt_in",
                               "checkout"),
            ], later)  # fmt: skip
            shopdata.upsert_orders(shop.store.engine, [
                OrderRecord("O2-again", "C2", OrderStatus.PAID, later, None, 85_000_00, "IDR",
                            (OrderLineRecord("P-1", 1, 85_000_00),)),
            ], later)  # fmt: skip

        marked = _before_the_first_mark(shop.store, meanwhile)
        report = shop.cycle()

        # Then only the fourth gets an email; the others' rows end skipped, with the prepare-time re-check's reasons
        assert marked  # the change came after the batch was prepared, before any mark
        assert [to for m in smtp_server.messages for to in m.rcpt_tos] == [ADDRESSES[3]]
        assert report.dispatched.outcomes == {
            "sent": 1, "skipped:suppressed": 1, "skipped:no_consent": 1, "skipped:ordered_since": 1,
        }  # fmt: skip
        rows = {address: shop.row(address) for address in ADDRESSES}
        assert {a: (r.status, r.skip_reason, r.attempts, r.claimed_by, r.lease_until) for a, r in rows.items()} == {
            ADDRESSES[0]: ("skipped", "suppressed", 0, None, None),
            ADDRESSES[1]: ("skipped", "no_consent", 0, None, None),
            ADDRESSES[2]: ("skipped", "ordered_since", 0, None, None),
            ADDRESSES[3]: ("sent", None, 1, None, None),
        }
        assert all(shop.attempts(address) == [] for address in ADDRESSES[:3])
        # And the log tells each skip as a prepare-time skip does
        skipped = {e["dedupe_key"]: e["reason"] for e in _events(caplog, "email_skipped")}
        assert sorted(skipped.values()) == ["no_consent", "ordered_since", "suppressed"]
        assert skipped[rows[ADDRESSES[0]].dedupe_key] == "suppressed"
        # And the three skipped give their slots of the daily quota back
        day = quota_day(NOW, settings.shop.time_zone).isoformat()
        assert RateStore(shop.store.engine).used_today(QUOTA_KEY, day=day) == 1
    finally:
        shop.close()


def test_a_mark_given_again_after_a_lost_reply_finds_the_rows_it_skipped(db_url: str) -> None:
    # Given two claimed rows, one of them to an address suppressed since it was prepared, and one to an address the
    # customer no longer has, suppressed too (the customer's current one is not)
    settings = make_settings(db_url, closed_port())
    shop = Shop(db_url, settings, ["gone@test.example", "kept@test.example", "moved@test.example"])
    try:
        plan(shop.store, settings, NOW)
        store = shop.store
        batch = store.claim(worker="a", now=NOW, limit=10, lease_seconds=60)
        by_address = {m.email: m.id for m in batch}
        store.suppress("Gone@Test.Example", reason="unsubscribed", source="cli", now=NOW)
        store.suppress("moved@test.example", reason="hard_bounce", source="cli", now=NOW)
        with store.engine.begin() as conn:
            conn.execute(sa.text("UPDATE customer SET email = 'new@test.example' WHERE email = 'moved@test.example'"))
        # When the mark is made, and made again with the same time (a commit whose reply was lost)
        first = store.record_and_mark([], list(by_address.values()), worker="a", now=NOW)
        again = store.record_and_mark([], list(by_address.values()), worker="a", now=NOW)
        # Then both suppressed rows are skipped, the other marked, and the second try finds what the first made
        assert first == Marks(
            sending=frozenset({by_address["kept@test.example"]}),
            skipped={by_address["gone@test.example"]: SkipReason.SUPPRESSED,
                     by_address["moved@test.example"]: SkipReason.SUPPRESSED},
        )  # fmt: skip
        assert again == first
        assert (shop.row("gone@test.example").status, shop.row("gone@test.example").attempts) == ("skipped", 0)
    finally:
        shop.close()


def test_the_mark_skips_a_winback_whose_only_order_was_refunded_or_replaced_by_a_new_one(db_url: str) -> None:
    # Given three claimed win-back rows, and then an import: one customer's only order refunded, another's refunded
    # and a new one placed, the third's unchanged
    settings = make_settings(db_url, closed_port())
    emails = ["refunded@test.example", "replaced@test.example", "same@test.example"]
    shop = Shop(db_url, settings, emails)
    try:
        plan(shop.store, settings, NOW)
        batch = shop.store.claim(worker="a", now=NOW, limit=10, lease_seconds=60)
        by_address = {m.email: m.id for m in batch}
        placed, line = NOW - timedelta(days=60), (OrderLineRecord("P-1", 1, 85_000_00),)
        shopdata.upsert_orders(shop.store.engine, [
            OrderRecord("O0", "C0", OrderStatus.REFUNDED, placed, None, 85_000_00, "IDR", line),
            OrderRecord("O1", "C1", OrderStatus.REFUNDED, placed, None, 85_000_00, "IDR", line),
            OrderRecord("O1-new", "C1", OrderStatus.PAID, NOW, None, 85_000_00, "IDR", line),
        ], NOW)  # fmt: skip
        # When the rows are marked
        marks = shop.store.record_and_mark([], list(by_address.values()), worker="a", now=NOW)
        # Then the reasons are those of the prepare-time re-check (``audiences.recheck``)
        assert marks == Marks(
            sending=frozenset({by_address["same@test.example"]}),
            skipped={by_address["refunded@test.example"]: SkipReason.NO_LONGER_DUE,
                     by_address["replaced@test.example"]: SkipReason.ORDERED_SINCE},
        )  # fmt: skip
    finally:
        shop.close()


def test_the_mark_skips_a_message_whose_expiry_passed_while_it_waited_for_its_sender(db_url: str) -> None:
    # Given two claimed rows, one of them expiring at NOW + 10 s (a birthday offer at the end of its day, prepared
    # before then)
    settings = make_settings(db_url, closed_port())
    shop = Shop(db_url, settings, ["late@test.example", "fine@test.example"])
    try:
        plan(shop.store, settings, NOW)
        batch = shop.store.claim(worker="a", now=NOW, limit=10, lease_seconds=60)
        by_address = {m.email: m.id for m in batch}
        with shop.store.engine.begin() as conn:
            conn.execute(sa.update(M).where(M.c.id == by_address["late@test.example"])
                         .values(expires_at=NOW + timedelta(seconds=10)))  # fmt: skip
        # When its sender marks it 20 s later, the expiry past
        marks = shop.store.record_and_mark([], list(by_address.values()), worker="a", now=NOW + timedelta(seconds=20))
        # Then it is skipped as expired, as the prepare-time re-check would have, and the other is marked
        assert marks == Marks(sending=frozenset({by_address["fine@test.example"]}),
                              skipped={by_address["late@test.example"]: SkipReason.EXPIRED})  # fmt: skip
        assert (shop.row("late@test.example").status, shop.row("late@test.example").skip_reason) == \
            ("skipped", "expired")  # fmt: skip
    finally:
        shop.close()


def test_a_planned_email_goes_to_the_address_the_customer_has_when_it_is_sent(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given two customers due a win-back, planned to the addresses they had
    settings = make_settings(db_url, smtp_server.port, compose_processes=0)
    shop = Shop(db_url, settings, ["old@test.example", "other-old@test.example"])
    try:
        plan(shop.store, settings, NOW)
        # When a customers import gives both new addresses before the sender's run, the second's suppressed
        shopdata.upsert_customers(shop.store.engine, [
            CustomerRecord("C0", "baru@test.example", "Pelanggan 0", Locale.ID, "Asia/Jakarta", None, True, "opt_in",
                           "checkout"),
            CustomerRecord("C1", "Gone@Test.Example", "Pelanggan 1", Locale.ID, "Asia/Jakarta", None, True, "opt_in",
                           "checkout"),
        ], NOW)  # fmt: skip
        shop.store.suppress("gone@test.example", reason="hard_bounce", source="cli", now=NOW)
        report = shop.cycle()
        # Then the first email reaches the address the customer has now (the one they left may be abandoned, or
        # someone else's by now), and the ledger says where it went; the second is skipped as suppressed
        received = [(m.rcpt_tos, email.message_from_bytes(m.data)["To"]) for m in smtp_server.messages]
        assert received == [(("baru@test.example",), "Pelanggan 0 <baru@test.example>")]
        assert report.dispatched.outcomes == {"sent": 1, "skipped:suppressed": 1}
        assert (shop.row("baru@test.example").status, shop.row("Gone@Test.Example").status) == ("sent", "skipped")
        with shop.store.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(M).where(M.c.email.like("%old@%"))).scalar() == 0
    finally:
        shop.close()


def test_a_message_whose_lease_was_lost_before_its_mark_gives_its_daily_quota_slot_back(
    db_url: str, smtp_server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a daily quota of 2 and two customers due a win-back, their batch claimed and prepared by one worker
    caplog.set_level(logging.INFO)
    settings = make_settings(db_url, smtp_server.port, daily_quota=2, compose_processes=0)
    shop = Shop(db_url, settings, ["satu@test.example", "dua@test.example"])
    try:
        plan(shop.store, settings, NOW)
        lapsed = NOW + timedelta(seconds=settings.sending.lease_seconds + 1)

        def meanwhile() -> None:
            # When, before its marks, the worker stalls past its leases: another worker's maintenance puts the rows
            # back in the queue and that worker claims them (it dies before sending: its lease lapses in a second)
            assert shop.store.release_expired_leases(lapsed) == (2, 0)
            assert len(shop.store.claim(worker="other", now=lapsed, limit=10, lease_seconds=1)) == 2

        marked = _before_the_first_mark(shop.store, meanwhile)
        first = shop.cycle()
        # Then the first worker sends nothing, says its leases were lost, and keeps none of the day's quota
        assert marked and smtp_server.messages == []
        assert first.dispatched.outcomes == {}
        assert len(_events(caplog, "email_lease_lost")) == 2
        # (each line saying whose email it was: the key alone named no address, and a feedback key no customer)
        assert sorted((e["campaign"], e["customer"], e["to"]) for e in _events(caplog, "email_lease_lost")) == [
            ("winback", "C0", "s***@test.example"), ("winback", "C1", "d***@test.example")]
        day = quota_day(NOW, settings.shop.time_zone).isoformat()
        assert RateStore(shop.store.engine).used_today(QUOTA_KEY, day=day) == 0
        # And once the other worker's leases lapse, the next run sends both the same day: the quota counts what went
        shop.clock.advance(600)
        second = shop.cycle()
        received = sorted(to for m in smtp_server.messages for to in m.rcpt_tos)
        assert received == ["dua@test.example", "satu@test.example"]
        assert second.dispatched.outcomes == {"sent": 2}
        assert not second.dispatched.quota_reached
        assert RateStore(shop.store.engine).used_today(QUOTA_KEY, day=day) == 2
    finally:
        shop.close()


def test_a_skipped_email_is_logged_with_its_customer_whether_skipped_when_prepared_or_at_its_mark(
    db_url: str, smtp_server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # email_skipped named the campaign, the dedupe key and the masked address, not the customer (as email_sent does):
    # "whose email was skipped?" meant a trip to the ledger
    caplog.set_level(logging.INFO, logger="kembali")
    settings = make_settings(db_url, smtp_server.port, compose_processes=0)
    shop = Shop(db_url, settings, ADDRESSES)
    try:
        # Given four customers planned a win-back, one of whom then withdraws consent (skipped when prepared)
        plan(shop.store, settings, NOW)
        later = NOW + timedelta(minutes=1)
        shopdata.upsert_customers(shop.store.engine, [
            CustomerRecord("C1", ADDRESSES[1], "Pelanggan 1", Locale.ID, "Asia/Jakarta", None, False, "opt_in",
                           "checkout"),
        ], later)  # fmt: skip
        # and another unsubscribes after the batch is prepared (skipped at the sending mark)
        _before_the_first_mark(shop.store, lambda: shop.store.suppress(
            ADDRESSES[0], reason="unsubscribed", source="unsubscribe-link", now=later))

        shop.cycle()

        # Then each email_skipped line names the customer, with the address masked
        skipped = {e["customer"]: (e["reason"], e["to"]) for e in _events(caplog, "email_skipped")}
        assert skipped == {"C0": ("suppressed", "u***@test.example"), "C1": ("no_consent", "n***@test.example")}
    finally:
        shop.close()


def test_an_email_held_back_for_another_workers_send_is_logged_with_its_masked_address(
    db_url: str, smtp_server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a customer due a win-back, their message claimed and prepared by one worker
    caplog.set_level(logging.INFO)
    settings = make_settings(db_url, smtp_server.port, compose_processes=0)
    shop = Shop(db_url, settings, ["satu@test.example"])
    try:
        plan(shop.store, settings, NOW)
        customer_id = shop.row("satu@test.example").customer_id

        def meanwhile() -> None:
            # When, before its mark, another worker sends that customer another email
            other = PlannedMessage(dedupe_key="feedback:other", campaign="feedback", step=1, customer_id=customer_id,
                                   email="satu@test.example", due_at=NOW, expires_at=NOW + timedelta(days=14),
                                   message_id=message_id_for("feedback:other", "shop.example"))  # fmt: skip
            assert shop.store.insert_messages([other], NOW) == 1
            [claimed] = shop.store.claim(worker="other", now=NOW, limit=10, lease_seconds=60)
            shop.store.record([Disposition(message=claimed, status=MessageStatus.SENT, worker="other", started_at=NOW,
                                           finished_at=NOW, result=SendResult(Outcome.SENT, 250, "ok"))])  # fmt: skip

        marked = _before_the_first_mark(shop.store, meanwhile)
        report = shop.cycle()
        # Then the win-back is held back, and the line says whose mailbox it was, as email_lease_lost and
        # email_skipped do: it named the customer's id and dedupe key but not the (masked) address
        assert marked and smtp_server.messages == []
        assert report.dispatched.outcomes == {"deferred:another_worker": 1}
        held = _events(caplog, "email_held_back")
        assert [(e["campaign"], e["customer"], e["to"]) for e in held] == [("winback", "C0", "s***@test.example")]
    finally:
        shop.close()


def test_an_operators_kembali_suppress_made_while_the_daemon_sends_stops_the_prepared_email(
    db_url: str, smtp_server: RecordingServer, tmp_path: Path
) -> None:
    # Given four customers due a win-back, their batch claimed and prepared (re-checked, rendered) in one run
    settings = make_settings(db_url, smtp_server.port, compose_processes=0)
    shop = Shop(db_url, settings, ADDRESSES)
    config = write_config(tmp_path / "config.toml", settings_dict(db_url, smtp_server.port))
    bounces = tmp_path / "bounces.txt"
    bounces.write_text(f"# from the ESP\n{ADDRESSES[1].upper()}\nnot an address\n", encoding="utf-8")
    try:
        plan(shop.store, settings, NOW)

        def meanwhile() -> None:
            # When, before the sender's mark, the operator types `kembali suppress add` with the address in
            # another case and spaces around it, and imports a bounce list naming another in capitals
            assert cli.main(["--config", str(config), "suppress", "add", f"  {ADDRESSES[0].title()} "]) == 0
            assert cli.main(["--config", str(config), "suppress", "import", str(bounces), "--reason",
                             "hard_bounce"]) == 1  # fmt: skip

        marked = _before_the_first_mark(shop.store, meanwhile)
        report = shop.cycle()

        # Then neither of them gets the email already prepared for them; the other two do
        assert marked
        assert sorted(to for m in smtp_server.messages for to in m.rcpt_tos) == sorted(ADDRESSES[2:])
        assert report.dispatched.outcomes == {"sent": 2, "skipped:suppressed": 2}
        assert [(shop.row(a).status, shop.row(a).skip_reason) for a in ADDRESSES[:2]] == [("skipped", "suppressed")] * 2
    finally:
        shop.close()
