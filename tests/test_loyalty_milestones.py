"""Loyalty milestones end to end: real SQLite and PostgreSQL, a real SMTP server, the shipped templates.

One order that reaches two milestones at once (the 5th paid order and the spend threshold) is one event for the
customer: one thank-you email with one coupon, not two a few days apart. The milestone not mailed is not lost:
its ledger row says ``skipped: merged`` and names the email it went with, so no later pass plans it again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shlex
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from tests.clikit import run_cli
from tests.sendkit import write_config
from tests.smtp_server import Behaviour, RecordingServer
from worker import cli, pipeline
from worker.adapters import db, opstore, shop
from worker.adapters.importer import read_orders
from worker.adapters.ledger import ActionResult, LedgerAdmin
from worker.adapters.store import Store
from worker.adapters.tables import Message
from worker.app import Deps
from worker.commands import ledger as ledger_command
from worker.commands import running
from worker.config import Settings, settings_from_dict
from worker.domain import CustomerRecord, Locale, MessageStatus, OrderLineRecord, OrderRecord, OrderStatus, SkipReason
from worker.stats import build_stats
from worker.testing import FakeClock

ROOT = Path(__file__).resolve().parent.parent
DAY = datetime(2027, 3, 1, 4, 0, tzinfo=UTC)
"""11:00 on 1 March 2027 in Jakarta."""
D = OrderStatus.DELIVERED
JAKARTA = ZoneInfo("Asia/Jakarta")
MESSAGE = Message.__table__  # type: ignore[attr-defined]
RP = 100
"""Minor units per rupiah."""


@pytest.fixture(autouse=True)
def link_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "a-test-key-of-enough-length")


def settings_for(db_url: str, server: RecordingServer) -> Settings:
    return settings_from_dict({
        "database": {"url": db_url},
        "smtp": {"host": "127.0.0.1", "port": server.port, "tls": "none", "timeout_seconds": 5.0, "pool_size": 2},
        "templates": {"dir": str(ROOT / "templates" / "email")},
        "campaigns": {
            "winback": {"enabled": False},
            "loyalty": {"enabled": True, "order_milestones": [5, 10], "spend_milestones": [5_000_000],
                        "within_days": 30, "expires_after_days": 14},
        },
        "policy": {"frequency_caps": [[1, 3], [4, 30]]},
    })  # fmt: skip


def customer(ext: str) -> CustomerRecord:
    return CustomerRecord(ext, f"{ext.lower()}@example.com", f"Siti {ext}", Locale.EN, "Asia/Jakarta", None, True,
                          "opt_in", "checkout")  # fmt: skip


def order(ext: str, cust: str, days_ago: float, rupiah: int) -> OrderRecord:
    return OrderRecord(ext, cust, D, DAY - timedelta(days=days_ago), None, rupiah * RP, "IDR",
                       (OrderLineRecord("P-1", 1, rupiah * RP),))  # fmt: skip


def cycle_at(settings: Settings, when: datetime) -> running.CycleReport:
    deps = Deps.build(settings)
    deps.clock = FakeClock(when)
    try:
        return asyncio.run(running.cycle(deps))
    finally:
        deps.close()


def ledger(settings: Settings) -> dict[str, tuple[str, str | None, dict[str, str]]]:
    store = Store.from_url(settings.database_url)
    try:
        return {r["dedupe_key"]: (r["status"], r["skip_reason"], json.loads(r["payload"] or "{}"))
                for r in store.messages(limit=100)}  # fmt: skip
    finally:
        store.close()


M1_KEYS = ("loyalty:M1:orders-5", "loyalty:M1:spend-500000000")
"""The dedupe keys of M1's order milestone and of its spend one."""


def m1_rows(settings: Settings) -> tuple[tuple[str, str | None], ...]:
    """(status, skip reason) of M1's order milestone and of its spend one, asserting they are the ledger's only rows."""
    rows = {k: v[:2] for k, v in ledger(settings).items()}
    assert sorted(rows) == sorted(M1_KEYS), rows
    return tuple(rows[key] for key in M1_KEYS)

def test_one_order_reaching_two_milestones_gets_one_reward_email_and_the_other_is_merged_into_it(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given M1, whose 5th order (2 days ago, Rp1.200.000) is also the one that takes their spend past Rp5.000.000;
    # O1, whose 5th order reaches only the order milestone; S1, whose one large order reaches only the spend one
    settings = settings_for(db_url, smtp_server)
    engine = db.create_engine(db_url)
    shop.upsert_customers(engine, [customer("M1"), customer("O1"), customer("S1")], DAY)
    shop.upsert_orders(engine, [
        *(order(f"M1-{i}", "M1", 40 + 10 * i, 1_200_000) for i in range(4)), order("M1-4", "M1", 2, 1_200_000),
        *(order(f"O1-{i}", "O1", 40 + 10 * i, 100_000) for i in range(4)), order("O1-4", "O1", 2, 100_000),
        order("S1-0", "S1", 2, 6_000_000),
    ], DAY)  # fmt: skip
    engine.dispose()

    # When Kembali runs today, and every day for the next two weeks (the reward's expiry, past the 3-day cap)
    received: list[str] = []
    for days in range(16):
        before = len(smtp_server.messages)
        cycle_at(settings, DAY + timedelta(days=days))
        received += [to for m in smtp_server.messages[before:] for to in m.rcpt_tos]

    # Then every customer gets one reward email: M1 too, whose one order reached two milestones
    assert sorted(received) == ["m1@example.com", "o1@example.com", "s1@example.com"]
    rows = ledger(settings)
    assert {k: v[:2] for k, v in rows.items()} == {
        "loyalty:M1:orders-5": ("sent", None),
        "loyalty:M1:spend-500000000": ("skipped", "merged"),
        "loyalty:O1:orders-5": ("sent", None),
        "loyalty:S1:spend-500000000": ("sent", None),
    }
    # and the milestone not mailed on its own names the email it went with
    assert rows["loyalty:M1:spend-500000000"][2]["merged_into"] == "loyalty:M1:orders-5"


def test_a_spend_milestone_reached_by_a_later_order_gets_its_own_email_and_preview_shows_the_merge(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given M1, whose 5th order (2 days ago) reached the order milestone and whose spend is still below Rp5.000.000,
    # and M2, whose 5th order reaches both milestones at once
    settings = settings_for(db_url, smtp_server)
    engine = db.create_engine(db_url)
    shop.upsert_customers(engine, [customer("M1"), customer("M2")], DAY)
    shop.upsert_orders(engine, [
        *(order(f"M1-{i}", "M1", 2 + 10 * i, 900_000) for i in range(5)),
        *(order(f"M2-{i}", "M2", 40 + 10 * i, 1_200_000) for i in range(4)), order("M2-4", "M2", 2, 1_200_000),
    ], DAY)  # fmt: skip
    engine.dispose()
    # When the operator previews today: M2's spend milestone shows as merged, not as a second email
    deps = Deps.build(settings)
    try:
        shown = {(r.message.dedupe_key, getattr(r, "reason", None)) for r in
                 pipeline.preview(deps.store, settings, deps.composer(), DAY, campaigns=["loyalty"])}  # fmt: skip
    finally:
        deps.close()
    assert shown == {("loyalty:M1:orders-5", None), ("loyalty:M2:orders-5", None),
                     ("loyalty:M2:spend-500000000", SkipReason.MERGED)}  # fmt: skip
    # and Kembali runs today; M1's 6th order, 5 days later, takes their spend past Rp5.000.000; it runs again
    cycle_at(settings, DAY)
    engine = db.create_engine(db_url)
    shop.upsert_orders(engine, [order("M1-5", "M1", -5, 900_000)], DAY + timedelta(days=5))
    engine.dispose()
    for days in range(5, 10):
        cycle_at(settings, DAY + timedelta(days=days))

    # Then M1 is thanked twice, once per order that reached a milestone; M2 once
    assert sorted(to for m in smtp_server.messages for to in m.rcpt_tos) == [
        "m1@example.com", "m1@example.com", "m2@example.com"]
    assert {k: v[:2] for k, v in ledger(settings).items()} == {
        "loyalty:M1:orders-5": ("sent", None), "loyalty:M1:spend-500000000": ("sent", None),
        "loyalty:M2:orders-5": ("sent", None), "loyalty:M2:spend-500000000": ("skipped", "merged"),
    }


def m1_at_five_orders(db_url: str) -> sa.Engine:
    """M1, whose 5th order (2 days ago, Rp1.700.000) reaches both milestones: the order one, and the spend one
    (Rp100.000 + 3 x Rp1.600.000 before it: Rp4.900.000); the first, small order is the one a test refunds."""
    engine = db.create_engine(db_url)
    shop.upsert_customers(engine, [customer("M1")], DAY)
    shop.upsert_orders(engine, [
        order("M1-0", "M1", 70, 100_000), *(order(f"M1-{i}", "M1", 40 + 5 * i, 1_600_000) for i in range(1, 4)),
        order("M1-4", "M1", 2, 1_700_000),
    ], DAY)  # fmt: skip
    return engine


def test_a_merged_spend_milestone_is_sent_on_its_own_when_the_order_milestone_it_went_with_is_no_longer_due(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given M1, whose 5th order (2 days ago, Rp1.700.000) reaches both milestones: the order one, and the spend one
    # (Rp100.000 + 3 x Rp1.600.000 before it: Rp4.900.000), planned today as one email, the spend one merged into it
    settings = settings_for(db_url, smtp_server)
    engine = m1_at_five_orders(db_url)
    store = Store.from_url(db_url)
    try:
        pipeline.plan(store, settings, DAY, campaigns=["loyalty"])
    finally:
        store.close()
    assert m1_rows(settings) == (("planned", None), ("skipped", "merged"))
    # and before it is sent, the small first order is refunded: 4 paid orders, Rp6.500.000 spent
    refunded = dataclasses.replace(order("M1-0", "M1", 70, 100_000), status=OrderStatus.REFUNDED)
    shop.upsert_orders(engine, [refunded], DAY + timedelta(minutes=30))
    engine.dispose()

    # When Kembali runs today and the next days
    for days in range(4):
        cycle_at(settings, DAY + timedelta(hours=1) + timedelta(days=days))

    # Then the order milestone is no longer reached, and not mailed; the spend one, still reached, is: M1 is thanked
    # once, not silently never
    assert [to for m in smtp_server.messages for to in m.rcpt_tos] == ["m1@example.com"]
    assert m1_rows(settings) == (("skipped", "no_longer_due"), ("sent", None))


def row_ids(db_url: str) -> dict[str, int]:
    store = Store.from_url(db_url)
    try:
        return {r["dedupe_key"]: r["id"] for r in store.messages(limit=100)}
    finally:
        store.close()


@pytest.mark.parametrize("pruned", [False, True], ids=["attempts-kept", "attempts-pruned"])
def test_a_merged_spend_milestone_stays_merged_when_its_email_that_may_have_arrived_is_resent_and_no_longer_due(
    db_url: str, smtp_server: RecordingServer, pruned: bool
) -> None:
    # Given M1's 5th order reaching both milestones, planned as one email (the spend one merged into it), whose
    # connection the server drops after the final dot: the email may have arrived (uncertain)
    settings = settings_for(db_url, smtp_server)
    engine = m1_at_five_orders(db_url)
    smtp_server.on("m1@example.com", Behaviour(drop_after_dot=True))
    cycle_at(settings, DAY + timedelta(minutes=10))
    assert m1_rows(settings) == (("uncertain", None), ("skipped", "merged"))
    # (pruned: a short attempt_retention_days, maintenance pruning attempts before the operator's resend 3 days on)
    later = timedelta(days=3) if pruned else timedelta(minutes=30)
    if pruned:
        store = Store.from_url(db_url)
        try:
            opstore.prune_attempts(store, DAY + later)
        finally:
            store.close()
    # and then the small first order is refunded, and the operator resends the uncertain email
    smtp_server.on("m1@example.com", Behaviour())
    refunded = dataclasses.replace(order("M1-0", "M1", 70, 100_000), status=OrderStatus.REFUNDED)
    shop.upsert_orders(engine, [refunded], DAY + later)
    LedgerAdmin(engine).resend([row_ids(db_url)["loyalty:M1:orders-5"]], now=DAY + later + timedelta(minutes=10),
                               operator="test")  # fmt: skip
    engine.dispose()

    # When Kembali runs then and the next days
    for days in range(4):
        cycle_at(settings, DAY + later + timedelta(minutes=30) + timedelta(days=days))

    # Then the resend is no longer due and not sent; the spend milestone went with the email that may have
    # arrived, so it is not sent a second time on its own: M1 got one email at most, the one that may have arrived
    assert [to for m in smtp_server.messages for to in m.rcpt_tos] == ["m1@example.com"]
    assert m1_rows(settings) == (("skipped", "no_longer_due"), ("skipped", "merged"))


def operator_config(db_url: str, tmp_path: Path) -> tuple[Path, int, int]:
    """A config.toml for `kembali ledger`, and the ids of M1's order milestone and of the spend one merged into it."""
    ids = row_ids(db_url)
    config = write_config(tmp_path / "config.toml", {"database": {"url": db_url}})
    return config, ids["loyalty:M1:orders-5"], ids["loyalty:M1:spend-500000000"]


def operator_at(monkeypatch: pytest.MonkeyPatch, when: datetime) -> None:
    """`kembali ledger` acting at ``when`` (a resend refuses a message past its expiry, two weeks after planning)."""
    monkeypatch.setattr(ledger_command, "SystemClock", lambda: FakeClock(when))


def ledger_at(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], config: Path, when: datetime,
              *args: str) -> tuple[int, str]:  # fmt: skip
    """`kembali --config CONFIG ledger ARGS` run by the operator at ``when``: its exit code and what it printed."""
    operator_at(monkeypatch, when)
    return run_cli(capsys, "--config", str(config), "ledger", *args)


EXPIRES = DAY + timedelta(days=14)
"""When M1's loyalty rows planned at ``DAY`` expire (``expires_after_days``)."""


def resend_hint(out: str) -> list[str]:
    """The command a close's output gives to resend a milestone closed with the email it was merged into, as
    arguments of `kembali`."""
    command = out.split("closed as failed with it: `", 1)[1].split("`", 1)[0]
    words = shlex.split(command)
    assert words[0] == "kembali", command
    return words[1:]


def m1_planned(db_url: str, server: RecordingServer, tmp_path: Path) -> tuple[Settings, Path, int, int]:
    """M1's 5th order reaching both milestones, planned at ``DAY`` as one email, the spend one merged into it: the
    settings, a config.toml for `kembali ledger`, and the ids of the order milestone's row and of the spend one."""
    settings = settings_for(db_url, server)
    m1_at_five_orders(db_url).dispose()
    store = Store.from_url(db_url)
    try:
        pipeline.plan(store, settings, DAY, campaigns=["loyalty"])
    finally:
        store.close()
    return settings, *operator_config(db_url, tmp_path)


@pytest.mark.parametrize("resent", ["spend", "orders"])
def test_closing_the_email_a_spend_milestone_was_merged_into_closes_it_too_and_says_how_to_send_it_on_its_own(
    db_url: str, smtp_server: RecordingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], resent: str,
) -> None:
    # Given M1's 5th order reaching both milestones, planned today as one email, the spend one merged into it
    settings, config, carrier, spend = m1_planned(db_url, smtp_server, tmp_path)

    # When the operator cancels the order milestone's email
    code, out = ledger_at(monkeypatch, capsys, config, DAY + timedelta(minutes=20), "close", str(carrier))

    # Then the output says what became of the spend milestone merged into it: closed with it, and how to send it
    # (on this ledger: with the --config given)
    assert code == 0
    assert f"1 message(s) closed as failed: {carrier}" in out
    assert (f"message {spend} (loyalty:M1:spend-500000000, merged into message {carrier}) closed as failed with it: "
            f"`kembali --config {config} ledger resend {spend}` sends it on its own until "
            f"{EXPIRES:%Y-%m-%d %H:%M} UTC (its expiry)") in out
    hint = resend_hint(out)
    assert m1_rows(settings) == (("failed", None), ("failed", None))
    # and a resend by filters leaves both out (the operator's decision)
    code, out = run_cli(capsys, "--config", str(config), "ledger", "resend", "--campaign", "loyalty", "--dry-run")
    assert "2 message(s) an operator closed left out" in out

    # When the operator resends the spend milestone (on its own, as the hint says), or the order milestone's email
    message = spend if resent == "spend" else carrier
    code, out = run_cli(capsys, *(hint if resent == "spend" else ["--config", str(config), "ledger", "resend",
                                                                   str(carrier)]))  # fmt: skip
    cycle_at(settings, DAY + timedelta(hours=1))

    # Then M1 gets that one email; resent, the order milestone's takes the spend one along again, and says so
    assert (code, out.splitlines()[0]) == (0, f"1 message(s) back in the queue (sent at the next run): {message}")
    assert [to for m in smtp_server.messages for to in m.rcpt_tos] == ["m1@example.com"]
    rows = m1_rows(settings)
    again = f"message {spend} (loyalty:M1:spend-500000000, merged into message {carrier}) merged into it again"
    if resent == "spend":
        assert rows == (("failed", None), ("sent", None))
        assert again not in out
    else:
        assert rows == (("sent", None), ("skipped", "merged"))
        assert again in out


def test_closing_as_sent_the_email_a_spend_milestone_was_merged_into_says_it_went_with_it(
    db_url: str, smtp_server: RecordingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given M1's one email for both milestones, whose connection the server dropped after the final dot (uncertain)
    settings = settings_for(db_url, smtp_server)
    m1_at_five_orders(db_url).dispose()
    smtp_server.on("m1@example.com", Behaviour(drop_after_dot=True))
    cycle_at(settings, DAY + timedelta(minutes=10))
    config, carrier, spend = operator_config(db_url, tmp_path)

    # When the operator, who knows it arrived, closes it as sent (a dry run first)
    capsys.readouterr()
    when = DAY + timedelta(hours=1)
    code, out = ledger_at(monkeypatch, capsys, config, when, "close", str(carrier), "--as", "sent", "--dry-run")
    assert f"message {spend} (loyalty:M1:spend-500000000, merged into message {carrier}) went with it" in out
    code, out = ledger_at(monkeypatch, capsys, config, when, "close", str(carrier), "--as", "sent")

    # Then the spend milestone merged into it went with it: it stays merged, and the output says so
    assert code == 0
    assert (f"message {spend} (loyalty:M1:spend-500000000, merged into message {carrier}) went with it: "
            "it stays skipped (merged)") in out
    assert m1_rows(settings) == (("sent", None), ("skipped", "merged"))


def m1_cancelled(
    db_url: str, server: RecordingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> tuple[Settings, Path, int, int, str]:
    """``m1_planned``, its email cancelled by the operator 20 minutes later (the spend milestone closed with it): what
    ``m1_planned`` gives, and what the close printed."""
    settings, config, carrier, spend = m1_planned(db_url, server, tmp_path)
    code, out = ledger_at(monkeypatch, capsys, config, DAY + timedelta(minutes=20), "close", str(carrier))
    assert code == 0, out
    return settings, config, carrier, spend, out


def sent_to(server: RecordingServer) -> list[str]:
    return [to for m in server.messages for to in m.rcpt_tos]


def cycles_at(settings: Settings, start: datetime, days: int) -> None:
    """Kembali run at ``start`` and each day after for ``days`` days (past the 3-day cap, which would hold a second
    email to M1 back, not stop it)."""
    for day in range(days):
        cycle_at(settings, start + timedelta(days=day))


@pytest.mark.parametrize("order", ["together", "orders-first", "spend-first", "spend-then-orders-together"])
def test_resending_both_a_merged_spend_milestone_and_the_email_it_was_merged_into_sends_one_email(
    db_url: str, smtp_server: RecordingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], order: str,
) -> None:
    # Given M1's one email for both milestones, cancelled by the operator (the spend milestone closed with it)
    settings, config, carrier, spend, _ = m1_cancelled(db_url, smtp_server, tmp_path, monkeypatch, capsys)
    merged = f"loyalty:M1:spend-500000000 (message {spend})"

    # When the operator resends both rows: in one command, or one after the other
    def resend(*ids: int) -> tuple[int, str]:
        return run_cli(capsys, "--config", str(config), "ledger", "resend", *map(str, ids))

    if order == "together":
        (code, out), second = resend(spend, carrier), None
    elif order == "orders-first":
        (code, out), second = resend(carrier), resend(spend)
    else:  # the spend milestone first: on its own, then the email it was merged into (alone or with it)
        (code, out), second = resend(spend), resend(carrier) if order == "spend-first" else resend(spend, carrier)
    cycles_at(settings, DAY + timedelta(hours=1), 5)

    # Then M1 gets one email, not two for one order; the second resend is refused, naming the row and why, and each
    # row says what became of it
    assert code == 0, out
    assert sent_to(smtp_server) == ["m1@example.com"]
    rows = m1_rows(settings)
    if order == "together":
        assert f"1 message(s) back in the queue (sent at the next run): {carrier}" in out
        assert (f"message {spend} (loyalty:M1:spend-500000000, merged into message {carrier}) merged into it again"
                in out)
        assert rows == (("sent", None), ("skipped", "merged"))
    elif order == "orders-first":
        assert second is not None
        assert second[0] == 1
        assert (f"kembali: message {spend} left alone: merged into message {carrier} (loyalty:M1:orders-5), which "
                "is retry: the milestone goes with that email, not in a second one") in second[1]
        assert rows == (("sent", None), ("skipped", "merged"))
    else:
        assert second is not None
        assert second[0] == 1
        assert (f"kembali: message {carrier} left alone: the spend milestone merged into it, {merged}, is retry "
                "on its own: resending this one too would send a second email for the same order") in second[1]
        assert rows == (("failed", None), ("sent", None))


def test_a_filter_that_selects_both_a_spend_milestone_and_the_email_it_was_merged_into_resends_one(
    db_url: str, smtp_server: RecordingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given M1's one email for both milestones, cancelled by the operator, then each resent by ID on its own (the
    # spend milestone, then that email, whose spend milestone had failed), both refused by M1's server (550)
    settings, config, carrier, spend, _ = m1_cancelled(db_url, smtp_server, tmp_path, monkeypatch, capsys)
    smtp_server.on("m1@example.com", Behaviour(rcpt_reply="550 5.2.1 Mailbox disabled"))
    for message in (spend, carrier):
        assert run_cli(capsys, "--config", str(config), "ledger", "resend", str(message))[0] == 0
        cycle_at(settings, DAY + timedelta(minutes=30))
    assert m1_rows(settings) == (("failed", None), ("failed", None))

    # When the mailbox works again and the operator resends the campaign's failed messages by a filter
    smtp_server.on("m1@example.com", Behaviour())
    code, out = ledger_at(monkeypatch, capsys, config, DAY + timedelta(hours=1), "resend", "--campaign", "loyalty")
    cycles_at(settings, DAY + timedelta(hours=2), 5)

    # Then M1 gets one email: the spend milestone is left alone, saying it goes with the email it was merged into
    assert sent_to(smtp_server) == ["m1@example.com"]
    assert code == 1
    assert f"1 message(s) back in the queue (sent at the next run): {carrier}" in out
    assert (f"kembali: message {spend} left alone: merged into message {carrier} (loyalty:M1:orders-5), which this "
            "resend puts back in the queue: the milestone goes with that email, not in a second one") in out
    assert m1_rows(settings) == (("sent", None), ("failed", None))


def test_the_close_says_until_when_its_resend_hint_works_and_the_resend_past_it_says_why_it_cannot(
    db_url: str, smtp_server: RecordingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given M1's one email for both milestones, cancelled by the operator, the spend milestone closed with it
    settings, _, _, spend, out = m1_cancelled(db_url, smtp_server, tmp_path, monkeypatch, capsys)

    # Then the hint to send the spend milestone on its own says until when it can
    assert f"ledger resend {spend}` sends it on its own until {EXPIRES:%Y-%m-%d %H:%M} UTC (its expiry)" in out

    # When the operator follows the hint after that
    operator_at(monkeypatch, EXPIRES + timedelta(hours=1))
    code, out = run_cli(capsys, *resend_hint(out))
    cycles_at(settings, EXPIRES + timedelta(hours=2), 1)

    # Then the resend is refused, saying why, and not advising to close a message closed already; nothing is sent
    assert code == 1
    assert (f"kembali: message {spend} left alone: expired at {EXPIRES:%Y-%m-%d %H:%M} UTC, so it can no longer be "
            "sent; it stays closed as failed") in out
    assert "`kembali ledger close` it instead" not in out
    assert sent_to(smtp_server) == []
    assert m1_rows(settings) == (("failed", None), ("failed", None))


def test_closing_the_email_a_spend_milestone_was_merged_into_after_its_expiry_gives_no_resend_hint(
    db_url: str, smtp_server: RecordingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given M1's one email for both milestones, still planned past its expiry (the worker stopped)
    _, config, carrier, spend = m1_planned(db_url, smtp_server, tmp_path)

    # When the operator cancels it then
    code, out = ledger_at(monkeypatch, capsys, config, EXPIRES + timedelta(hours=1), "close", str(carrier))

    # Then the spend milestone is closed with it, and the output says it cannot be sent on its own, and why; no hint
    assert code == 0
    assert (f"message {spend} (loyalty:M1:spend-500000000, merged into message {carrier}) closed as failed with it: "
            f"it expired at {EXPIRES:%Y-%m-%d %H:%M} UTC, so it cannot be sent on its own") in out
    assert "ledger resend" not in out


def four_orders(engine: sa.Engine, who: str, fifth_days_ago: float) -> tuple[list[OrderRecord], OrderRecord]:
    """Customer ``who`` (imported 100 days ago), their four orders (90 to 60 days ago) and a 5th placed
    ``fifth_days_ago``, all delivered and none imported yet."""
    shop.upsert_customers(engine, [customer(who)], DAY - timedelta(days=100))
    earlier = [order(f"{who}-{i}", who, 90 - 10 * i, 100_000) for i in range(4)]
    return earlier, order(f"{who}-4", who, fifth_days_ago, 100_000)


def p1_with_a_fifth_order_placed(db_url: str, days_ago: int) -> tuple[sa.Engine, list[OrderRecord], OrderRecord]:
    """P1's four paid orders (90 to 60 days ago) and a 5th placed ``days_ago``, unpaid, imported then: the engine,
    the four, and the 5th (delivered: replace its status)."""
    engine = db.create_engine(db_url)
    earlier, fifth = four_orders(engine, "P1", days_ago)
    shop.upsert_orders(engine, [*earlier, dataclasses.replace(fifth, status=OrderStatus.PLACED)],
                       DAY - timedelta(days=days_ago))  # fmt: skip
    return engine, earlier, fifth


def p1_thanked_once(settings: Settings, server: RecordingServer) -> None:
    """P1 alone got a loyalty email, for their 5th order, sent."""
    assert [to for m in server.messages for to in m.rcpt_tos] == ["p1@example.com"]
    assert {k: v[:2] for k, v in ledger(settings).items()} == {"loyalty:P1:orders-5": ("sent", None)}


def test_a_milestone_reached_by_an_order_placed_before_the_window_and_paid_inside_it_is_rewarded(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given P1's four paid orders (90 to 60 days ago) and a 5th placed 35 days ago, unpaid (a bank transfer awaited),
    # imported then; it is paid today (the next import says so), and P1 orders again in a week
    settings = settings_for(db_url, smtp_server)
    engine, _, fifth = p1_with_a_fifth_order_placed(db_url, 35)
    shop.upsert_orders(engine, [dataclasses.replace(fifth, status=OrderStatus.PAID)], DAY)

    # When Kembali runs every day for two weeks
    sent_today = []
    for days in range(14):
        if days == 7:
            shop.upsert_orders(engine, [order("P1-5", "P1", -7, 100_000)], DAY + timedelta(days=7))
        cycle_at(settings, DAY + timedelta(days=days))
        if days == 0:
            sent_today = [to for m in smtp_server.messages for to in m.rcpt_tos]
    engine.dispose()

    # Then P1 is thanked for their 5th paid order, which became one today (placed or not, it was not one before),
    # today, and once
    assert sent_today == ["p1@example.com"]
    assert [to for m in smtp_server.messages for to in m.rcpt_tos] == ["p1@example.com"]
    assert {k: v[:2] for k, v in ledger(settings).items()} == {"loyalty:P1:orders-5": ("sent", None)}


def test_an_order_paid_before_the_window_stays_paid_then_however_often_it_is_imported_again(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given P1's four paid orders and a 5th placed 50 days ago, unpaid, which the import 40 days ago saw paid (the
    # campaign was off then); every night since, the shop's whole export is imported again, the 5th shipped and then
    # delivered on the way, and a week ago refunded by mistake and corrected back to delivered today
    settings = settings_for(db_url, smtp_server)
    engine, earlier, fifth = p1_with_a_fifth_order_placed(db_url, 50)
    # and Q1, the same orders, but the 5th unpaid in every import until today's, which says it is delivered
    q1_earlier, q1_fifth = q1_with_a_fifth_order_placed(engine, 50)
    for days_ago in range(40, -1, -1):
        status = (OrderStatus.PAID if days_ago > 30 else OrderStatus.SHIPPED if days_ago > 20
                  else OrderStatus.REFUNDED if days_ago in range(1, 8) else D)  # fmt: skip
        q1_status = OrderStatus.PLACED if days_ago else D
        shop.upsert_orders(engine, [*earlier, dataclasses.replace(fifth, status=status),
                                    *q1_earlier, dataclasses.replace(q1_fifth, status=q1_status)],
                           DAY - timedelta(days=days_ago))  # fmt: skip
    engine.dispose()

    # When Kembali runs today and the next days
    for days in range(3):
        cycle_at(settings, DAY + timedelta(days=days))

    # Then P1, whose 5th order was paid 40 days ago, before the window, is not thanked for it now; Q1, whose 5th
    # was paid today, is (the campaign runs: P1's silence is the rule's, not a campaign that sends nothing)
    q1_alone_thanked(settings, smtp_server)


def test_the_paid_time_an_orders_file_gives_is_the_one_loyalty_counts_from(
    db_url: str, smtp_server: RecordingServer, tmp_path: Path
) -> None:
    # Given a shop whose orders.csv says when each order was paid: P1's four orders, paid when placed 90 to 60 days
    # ago, and a 5th placed 40 days ago and paid 3 days ago (a bank transfer), imported for the first time today;
    # Q1's the same, but its 5th paid 39 days ago
    settings = settings_for(db_url, smtp_server)
    engine = db.create_engine(db_url)
    shop.upsert_customers(engine, [customer("P1"), customer("Q1")], DAY - timedelta(days=100))

    def at(days_ago: int) -> str:
        return (DAY - timedelta(days=days_ago)).isoformat()

    rows = [f"{c}-{i},{c},delivered,{at(90 - 10 * i)},{at(90 - 10 * i)},100000" for c in ("P1", "Q1") for i in range(4)]
    rows += [f"P1-4,P1,paid,{at(40)},{at(3)},100000", f"Q1-4,Q1,paid,{at(40)},{at(39)},100000"]
    path = tmp_path / "orders.csv"
    path.write_text("order_id,customer_id,status,placed_at,paid_at,total\n" + "\n".join(rows) + "\n", "utf-8")
    records = [r for r in read_orders(path, now=DAY) if isinstance(r, OrderRecord)]
    assert len(records) == 10
    shop.upsert_orders(engine, records, DAY)
    # and tomorrow's file says P1's 5th was paid 40 days ago (a correction the shop made): the first time stays
    corrected = path.read_text("utf-8").replace(f"P1-4,P1,paid,{at(40)},{at(3)}", f"P1-4,P1,paid,{at(40)},{at(40)}")
    path.write_text(corrected, "utf-8")
    shop.upsert_orders(engine, [r for r in read_orders(path, now=DAY) if isinstance(r, OrderRecord)],
                       DAY + timedelta(days=1))  # fmt: skip
    engine.dispose()

    # When Kembali runs today and the next days
    for days in range(3):
        cycle_at(settings, DAY + timedelta(hours=1) + timedelta(days=days))

    # Then P1, whose 5th order was paid within the window, is thanked; Q1, whose 5th was paid before it, is not
    p1_thanked_once(settings, smtp_server)


def test_an_order_first_seen_refunded_and_corrected_back_to_paid_is_not_newly_paid(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given P1's four paid orders and a 5th placed 50 days ago, which the import 40 days ago saw already refunded (a
    # refund made by mistake: an order refunded was paid), and today's import says it is delivered after all
    settings = settings_for(db_url, smtp_server)
    engine = db.create_engine(db_url)
    earlier, fifth = four_orders(engine, "P1", 50)
    # and Q1, the same orders, but the 5th seen unpaid 40 days ago
    q1_earlier, q1_fifth = q1_with_a_fifth_order_placed(engine, 50)
    shop.upsert_orders(engine, [*earlier, dataclasses.replace(fifth, status=OrderStatus.REFUNDED),
                                *q1_earlier, dataclasses.replace(q1_fifth, status=OrderStatus.PLACED)],
                       DAY - timedelta(days=40))  # fmt: skip
    shop.upsert_orders(engine, [*earlier, fifth, *q1_earlier, q1_fifth], DAY)
    engine.dispose()

    # When Kembali runs today
    cycle_at(settings, DAY + timedelta(hours=1))

    # Then P1, whose 5th order was paid before the window (a refund corrected is not a new payment), is not thanked;
    # Q1, whose 5th became paid today, is
    q1_alone_thanked(settings, smtp_server)


def q1_with_a_fifth_order_placed(engine: sa.Engine, days_ago: int) -> tuple[list[OrderRecord], OrderRecord]:
    """Q1, a customer whose orders are P1's: four paid (90 to 60 days ago) and a 5th placed ``days_ago`` (delivered:
    replace its status); the four and the 5th, not imported yet."""
    return four_orders(engine, "Q1", days_ago)


def q1_alone_thanked(settings: Settings, server: RecordingServer) -> None:
    """Q1 alone got a loyalty email (P1 none), for their 5th order, sent."""
    assert [to for m in server.messages for to in m.rcpt_tos] == ["q1@example.com"]
    assert {k: v[:2] for k, v in ledger(settings).items()} == {"loyalty:Q1:orders-5": ("sent", None)}


def test_a_paid_date_without_a_time_on_the_day_the_order_was_placed_counts_it_from_when_it_was_placed(
    db_url: str, smtp_server: RecordingServer, tmp_path: Path
) -> None:
    # Given P1's four orders (90 to 60 days ago) and a 5th placed at 13:00 Jakarta 30 days ago, just inside the
    # window (which opened at 11:00 that day), paid that day: the shop's file gives the date it was paid, no time
    settings = settings_for(db_url, smtp_server)
    engine = db.create_engine(db_url)
    shop.upsert_customers(engine, [customer("P1")], DAY - timedelta(days=100))
    placed = DAY - timedelta(days=30) + timedelta(hours=2)
    rows = [f"P1-{i},P1,delivered,{(DAY - timedelta(days=90 - 10 * i)).isoformat()},,100000" for i in range(4)]
    rows.append(f"P1-4,P1,paid,{placed.isoformat()},{placed.astimezone(JAKARTA).date().isoformat()},100000")
    path = tmp_path / "orders.csv"
    path.write_text("order_id,customer_id,status,placed_at,paid_at,total\n" + "\n".join(rows) + "\n", "utf-8")
    records = [r for r in read_orders(path, now=DAY) if isinstance(r, OrderRecord)]
    assert len(records) == 5
    shop.upsert_orders(engine, records, DAY)
    engine.dispose()

    # When Kembali runs today
    cycle_at(settings, DAY)

    # Then P1's 5th order, placed and paid within the window, is rewarded (not counted from midnight, before it was
    # placed and before the window)
    p1_thanked_once(settings, smtp_server)


def test_an_order_paid_when_placed_whose_placed_at_is_corrected_counts_from_the_corrected_time(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given P1's four paid orders (90 to 60 days ago) and a 5th, paid at checkout 8 days ago, that the shop's export
    # first gave with a mistyped month (placed 39 days ago), and Q1's the same the other way round: its 5th, placed
    # 39 days ago, first given as placed 8 days ago; the next import (today) corrects both placed_at
    settings = settings_for(db_url, smtp_server)
    engine = db.create_engine(db_url)
    shop.upsert_customers(engine, [customer("P1"), customer("Q1")], DAY - timedelta(days=100))
    earlier = [order(f"{c}-{i}", c, 90 - 10 * i, 100_000) for c in ("P1", "Q1") for i in range(4)]
    shop.upsert_orders(engine, [*earlier, order("P1-4", "P1", 39, 100_000), order("Q1-4", "Q1", 8, 100_000)],
                       DAY - timedelta(hours=2))  # fmt: skip
    shop.upsert_orders(engine, [*earlier, order("P1-4", "P1", 8, 100_000), order("Q1-4", "Q1", 39, 100_000)],
                       DAY - timedelta(hours=1))  # fmt: skip
    engine.dispose()

    # When Kembali runs today
    cycle_at(settings, DAY)

    # Then P1, whose 5th order was placed and paid 8 days ago, is thanked; Q1, whose 5th was 39 days ago, is not
    p1_thanked_once(settings, smtp_server)


def test_closing_both_the_email_and_the_spend_milestone_merged_into_it_by_id_is_not_refused(
    db_url: str, smtp_server: RecordingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given M1's one email for both milestones, planned, the spend one merged into it
    settings, config, carrier, spend = m1_planned(db_url, smtp_server, tmp_path)

    # When the operator cancels both rows `ledger list --customer M1` shows, by their IDs (a dry run first)
    when = DAY + timedelta(minutes=20)
    dry = ledger_at(monkeypatch, capsys, config, when, "close", str(carrier), str(spend), "--dry-run")
    code, out = ledger_at(monkeypatch, capsys, config, when, "close", str(carrier), str(spend))
    cycles_at(settings, DAY + timedelta(hours=1), 2)

    # Then both are closed, the spend milestone with the email, and nothing is said to be left alone: exit code 0
    assert (dry[0], code) == (0, 0), dry[1] + out
    assert "left alone:" not in dry[1] + out
    assert (f"message {spend} (loyalty:M1:spend-500000000, merged into message {carrier}) closed as failed with it"
            in out)
    assert sent_to(smtp_server) == []
    assert m1_rows(settings) == (("failed", None), ("failed", None))


@pytest.mark.postgres
def test_two_operators_resending_a_spend_milestone_and_its_email_at_once_send_one_email(
    pg_migrated_url: str, smtp_server: RecordingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # PostgreSQL only (SQLite: a resend's BEGIN IMMEDIATE waits for the other's commit before it reads anything)
    # Given M1's one email for both milestones, cancelled by the operator (the spend milestone closed with it)
    settings, _, carrier, spend, _ = m1_cancelled(pg_migrated_url, smtp_server, tmp_path, monkeypatch, capsys)
    engine = db.create_engine(pg_migrated_url)
    try:
        # When one operator's resend of the spend milestone has put it back in the queue, not committed yet, and
        # another operator resends the email it was merged into meanwhile
        results = resend_beside(engine, carrier, [
            sa.update(MESSAGE).where(MESSAGE.c.id == spend).values(
                status="retry", next_attempt_at=DAY + timedelta(minutes=30), last_error="operator resend")], [])
    finally:
        engine.dispose()
    cycles_at(settings, DAY + timedelta(hours=1), 5)

    # Then the second resend sees the first: the email is left alone, and M1 gets one email, not two for one order
    assert sent_to(smtp_server) == ["m1@example.com"]
    assert results and results[0].changed == [], results
    assert "is retry on its own" in results[0].refused[carrier]


def resend_beside(engine: sa.Engine, message: int, first: list[Any], then: list[Any]) -> list[ActionResult]:
    """An operator's resend of ``message`` while another transaction (another operator's command) has made the
    changes ``first`` and not committed yet: once the resend waits for it (or is done without waiting), that
    transaction makes the changes ``then`` and commits. The resend's result (none if it failed)."""
    other = engine.connect()
    other.begin()
    for change in first:
        other.execute(change)
    results: list[ActionResult] = []
    resend = threading.Thread(target=lambda: results.append(LedgerAdmin(engine).resend(
        [message], now=DAY + timedelta(minutes=30), operator="second operator")))
    resend.start()
    waiting_for_locks(engine, 1, resend)  # until it waits for the other's rows, or is done without waiting
    for change in then:
        other.execute(change)
    other.commit()
    other.close()
    resend.join(60)
    return results


@pytest.mark.postgres
def test_a_resend_of_a_spend_milestone_beside_a_close_of_its_email_does_not_deadlock(
    pg_migrated_url: str, smtp_server: RecordingServer, tmp_path: Path,
) -> None:
    # PostgreSQL only (SQLite: a resend's BEGIN IMMEDIATE waits for the other's commit before it reads anything)
    # Given M1's one email for both milestones, planned, the spend one merged into it
    settings, _, carrier, spend = m1_planned(pg_migrated_url, smtp_server, tmp_path)
    engine = db.create_engine(pg_migrated_url)
    try:
        # When one operator's close of the email has closed it, and not yet the spend milestone with it (as a close
        # changes them: the email, then the milestone), and another operator resends the spend milestone meanwhile
        results = resend_beside(
            engine, spend, [sa.update(MESSAGE).where(MESSAGE.c.id == carrier).values(status="failed")],
            [sa.update(MESSAGE).where(MESSAGE.c.id == spend).values(status="failed", skip_reason=None)])
    finally:
        engine.dispose()

    # Then neither command fails on a deadlock: the close commits, and the resend answers
    assert results, "the resend failed"
    assert m1_rows(settings) == (("failed", None), ("failed", None))


@pytest.mark.postgres
def test_a_close_of_a_spend_milestone_and_its_email_beside_a_resend_of_that_email_does_not_deadlock(
    pg_migrated_url: str, smtp_server: RecordingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # PostgreSQL only (SQLite: each command's BEGIN IMMEDIATE waits for the other's commit before it reads anything)
    # Given M1's one email for both milestones, cancelled by the operator (the spend milestone closed with it)
    _, _, carrier, spend, _ = m1_cancelled(pg_migrated_url, smtp_server, tmp_path, monkeypatch, capsys)
    # (read through the primary key, in id order, as in a ledger of any size: not the few rows' heap order)
    engine = db.create_engine(pg_migrated_url)
    with engine.begin() as conn:
        name = sa.engine.make_url(pg_migrated_url).database
        conn.execute(sa.text(f'ALTER DATABASE "{name}" SET enable_seqscan = off'))
        conn.execute(sa.text(f'ALTER DATABASE "{name}" SET enable_bitmapscan = off'))
    engine.dispose()  # (the settings are a new connection's)
    when = DAY + timedelta(minutes=30)
    done: dict[str, Any] = {}

    def command(name: str, act: Any) -> threading.Thread:
        def run() -> None:
            try:
                done[name] = act()
            except Exception as exc:
                done[name] = exc
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    try:
        # When the email's row is busy a moment (another transaction holds it), and meanwhile one operator resends
        # that email while another closes both rows by their IDs (a filter taking both) with a note
        busy = engine.connect()
        busy.begin()
        busy.execute(sa.select(MESSAGE.c.id).where(MESSAGE.c.id == carrier).with_for_update()).all()
        resend = command("resend", lambda: LedgerAdmin(engine).resend([carrier], now=when, operator="first"))
        waiting_for_locks(engine, 1, resend)
        close = command("close", lambda: LedgerAdmin(engine).close(
            [spend, carrier], now=when, operator="second", status=MessageStatus.FAILED, note="cleanup"))
        waiting_for_locks(engine, 2, close)
        busy.commit()
        busy.close()
        resend.join(60)
        close.join(60)
    finally:
        engine.dispose()

    # Then neither command fails on a deadlock: each answers
    assert isinstance(done.get("resend"), ActionResult), done
    assert isinstance(done.get("close"), ActionResult), done


def waiting_for_locks(engine: sa.Engine, count: int, thread: threading.Thread) -> None:
    """Until ``count`` transactions wait for a lock (or ``thread`` is done without waiting)."""
    waiting = sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                      "AND wait_event_type = 'Lock'")
    with engine.connect() as watch:
        for _ in range(6000):
            if not thread.is_alive() or watch.execute(waiting).scalar_one() >= count:
                return
            watch.rollback()  # pg_stat_activity is read once a transaction: a new one sees the waits begun since
            thread.join(0.01)


def preview_keys(settings: Settings, when: datetime) -> set[str]:
    deps = Deps.build(settings)
    try:
        return {r.message.dedupe_key for r in
                pipeline.preview(deps.store, settings, deps.composer(), when, campaigns=["loyalty"])}  # fmt: skip
    finally:
        deps.close()


def test_a_milestone_whose_reward_a_refund_left_unsent_is_rewarded_when_reached_again_and_only_once(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given R1's four paid orders (90 to 60 days ago) and a 5th two days ago: the order milestone, planned today
    settings = settings_for(db_url, smtp_server)
    engine = db.create_engine(db_url)
    earlier, fifth = four_orders(engine, "R1", 2)
    shop.upsert_orders(engine, [*earlier, fifth], DAY)
    store = Store.from_url(db_url)
    try:
        pipeline.plan(store, settings, DAY, campaigns=["loyalty"])
    finally:
        store.close()
    # and the 5th order is refunded before the reward goes: it is skipped, the milestone no longer reached
    shop.upsert_orders(engine, [dataclasses.replace(fifth, status=OrderStatus.REFUNDED)], DAY + timedelta(minutes=30))
    for days in range(3):
        cycle_at(settings, DAY + timedelta(hours=1, days=days))
    assert smtp_server.messages == []
    assert {k: v[:2] for k, v in ledger(settings).items()} == {"loyalty:R1:orders-5": ("skipped", "no_longer_due")}

    # When R1 orders again 5 days on, a 5th paid order once more: preview shows the reward, and Kembali sends it
    shop.upsert_orders(engine, [order("R1-5", "R1", -5, 100_000)], DAY + timedelta(days=5))
    assert preview_keys(settings, DAY + timedelta(days=5, hours=1)) == {"loyalty:R1:orders-5:r1"}
    cycle_at(settings, DAY + timedelta(days=5, hours=1))
    assert [to for m in smtp_server.messages for to in m.rcpt_tos] == ["r1@example.com"]
    # and when an earlier order is refunded after it went and R1 orders again, reaching 5 paid orders a third time
    shop.upsert_orders(engine, [dataclasses.replace(earlier[0], status=OrderStatus.REFUNDED)], DAY + timedelta(days=6))
    shop.upsert_orders(engine, [order("R1-6", "R1", -8, 100_000)], DAY + timedelta(days=8))
    engine.dispose()
    assert preview_keys(settings, DAY + timedelta(days=8, hours=1)) == set()
    for days in range(8, 12):
        cycle_at(settings, DAY + timedelta(days=days, hours=1))

    # Then R1 got the reward they earned, once: the milestone's reward that went is not sent again
    assert [to for m in smtp_server.messages for to in m.rcpt_tos] == ["r1@example.com"]
    assert {k: v[:2] for k, v in ledger(settings).items()} == {
        "loyalty:R1:orders-5": ("skipped", "no_longer_due"), "loyalty:R1:orders-5:r1": ("sent", None)}
    assert {v[2]["milestone"] for v in ledger(settings).values()} == {"orders-5"}
    # and stats count both rows under the one campaign, R1 emailed once (and brought back: the order of day 8)
    engine = db.create_engine(db_url)
    try:
        report = build_stats(engine, since=DAY - timedelta(days=1), now=DAY + timedelta(days=13))
    finally:
        engine.dispose()
    [line] = [s for s in report.steps if s.campaign == "loyalty"]
    assert (line.step, line.planned, line.statuses["sent"], dict(line.skipped)) == (1, 2, 1, {"no_longer_due": 1})
    assert line.emailed is not None and (line.emailed.customers, line.emailed.converted) == (1, 1)


@pytest.mark.parametrize("tried", [True, False])
def test_a_spend_milestone_closed_with_the_email_it_went_in_counts_as_that_emails_failure_not_a_cancel(
    db_url: str, smtp_server: RecordingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], tried: bool,
) -> None:
    # Given M1's 5th order reaching both milestones, planned as one email (the spend one merged into it), which the
    # server refused for good (or which still waits in the queue)
    smtp_server.on("m1@example.com", Behaviour(rcpt_reply="550 5.2.1 Mailbox disabled"))
    settings, config, carrier, _spend = m1_planned(db_url, smtp_server, tmp_path)
    if tried:
        cycle_at(settings, DAY + timedelta(minutes=5))
    assert m1_rows(settings) == (("failed" if tried else "planned", None), ("skipped", "merged"))

    # When the operator closes that email as failed (the spend milestone closed with it)
    code, _ = ledger_at(monkeypatch, capsys, config, DAY + timedelta(minutes=20), "close", str(carrier))
    assert code == 0 and m1_rows(settings) == (("failed", None), ("failed", None))

    # Then stats count the spend milestone with the email it went in: tried and refused, a failure, not a message
    # "cancelled while it waited in the queue" (it never waited there on its own); cancelled with a cancelled one
    assert cli.main(["--config", str(config), "stats", "--since", f"{DAY:%Y-%m-%d}", "--json",
                     "--now", (DAY + timedelta(hours=1)).isoformat()]) == 0  # fmt: skip
    (loyalty,) = json.loads(capsys.readouterr().out)["campaigns"]
    failed, cancelled = (2, 0) if tried else (0, 2)
    assert (loyalty["planned"], loyalty["failed"], loyalty["cancelled"]) == (2, failed, cancelled), loyalty
