"""Win-back steps renumbered in the config, end to end: real SQLite and PostgreSQL, a real SMTP server.

A step's dedupe key carries its number (``winback:<customer>:<order>:<step>``), and the number is the step's place
in ``[[campaigns.winback.steps]]``. Given a one-time buyer who got the step of day 30, when an operator inserts an
earlier step (day counts [30, 60] become [14, 30, 60]) or removes one ([14, 30, 60] become [30, 60]), the day-30
step has a new number, so a new key: it must not be planned and sent again for the same order. The step of a
later day count still goes when its day comes, under a key of its own (``…:<step>d<days>``) when its number is
that of the row the customer has; a step whose days are edited (its template kept) is not sent again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime, timedelta
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest

from tests.smtp_server import RecordingServer
from worker.adapters import db, shop
from worker.adapters.store import Store
from worker.app import Deps
from worker.commands import previewing, running
from worker.config import Settings, settings_from_dict
from worker.domain import CustomerRecord, Locale, OrderRecord, OrderStatus
from worker.testing import FakeClock

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2027, 3, 1, 3, 0, tzinfo=UTC)
"""10:00 in Jakarta: no quiet hours."""
TEMPLATES = {14: "winback-reminder", 30: "winback", 35: "winback", 60: "winback-last"}
COUPONS = {14: ("", 0), 30: ("KEMBALI10", 10), 35: ("KEMBALI10", 10), 60: ("KEMBALI15", 15)}


@pytest.fixture(autouse=True)
def link_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "a-test-key-of-enough-length")


def settings_for(db_url: str, server: RecordingServer, days: list[int]) -> Settings:
    return settings_from_dict({
        "database": {"url": db_url},
        "smtp": {"host": "127.0.0.1", "port": server.port, "tls": "none", "timeout_seconds": 5.0, "pool_size": 2},
        "templates": {"dir": str(ROOT / "templates" / "email")},
        "campaigns": {
            "winback": {"holdout_share": 0.0, "steps": [
                {"days": d, "template": TEMPLATES[d], "coupon_code": COUPONS[d][0], "coupon_percent": COUPONS[d][1]}
                for d in days]},
            "birthday": {"enabled": False}, "feedback": {"enabled": False},
            "new_products": {"enabled": False}, "loyalty": {"enabled": False},
        },
        "policy": {"frequency_caps": [[10, 1]], "quiet_hours_start": "21:00", "quiet_hours_end": "08:00"},
    })  # fmt: skip


def given_one_time_buyers(db_url: str, ages: dict[str, float]) -> None:
    """A customer per entry, whose only order (delivered) was placed that many days before ``T0``."""
    engine = db.create_engine(db_url)
    shop.upsert_customers(engine, [
        CustomerRecord(ext, f"{ext.lower()}@example.com", f"Siti {ext}", Locale.EN, "Asia/Jakarta", None, True,
                       "opt_in", "checkout")
        for ext in ages
    ], T0)  # fmt: skip
    shop.upsert_orders(engine, [
        OrderRecord(f"{ext}-1", ext, OrderStatus.DELIVERED, T0 - timedelta(days=age), None, 1_000_000, "IDR")
        for ext, age in ages.items()
    ], T0)  # fmt: skip
    engine.dispose()


def cycle_at(settings: Settings, when: datetime) -> None:
    deps = Deps.build(settings)
    deps.clock = FakeClock(when)
    try:
        asyncio.run(running.cycle(deps))
    finally:
        deps.close()


def received(server: RecordingServer) -> list[tuple[str, str]]:
    """(recipient, Subject) of every email received, in order."""
    out = []
    for m in server.messages:
        mail = BytesParser(policy=policy.default).parsebytes(m.data)
        out.extend((to, str(mail["Subject"])) for to in m.rcpt_tos)
    return out


def ledger(settings: Settings) -> list[tuple[str, str, str, str | None]]:
    """(dedupe key, the step's day count in its payload, status, skip reason) of every win-back row."""
    store = Store.from_url(settings.database_url)
    try:
        rows = store.messages(limit=100)
    finally:
        store.close()
    return sorted((r["dedupe_key"], str(json.loads(r["payload"]).get("days")), r["status"], r["skip_reason"])
                  for r in rows)  # fmt: skip


def test_a_step_inserted_before_the_one_a_customer_got_does_not_send_that_step_again(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given a one-time buyer whose order is 35 days old, sent the day-30 step as step 1 of [30, 60]
    given_one_time_buyers(db_url, {"C1": 35})
    before = settings_for(db_url, smtp_server, [30, 60])
    cycle_at(before, T0)
    assert [to for to, _ in received(smtp_server)] == ["c1@example.com"]
    day30 = received(smtp_server)[0][1]
    # When the operator inserts a day-14 step first, and Kembali runs the next morning and on day 61
    after = settings_for(db_url, smtp_server, [14, 30, 60])
    cycle_at(after, T0 + timedelta(days=1))
    # Then the day-30 step, now step 2, is not sent again
    assert received(smtp_server) == [("c1@example.com", day30)]
    assert ledger(after) == [("winback:C1:C1-1:1", "30", "sent", None)]
    # and the day-60 step, now step 3, still goes when its day comes
    cycle_at(after, T0 + timedelta(days=26))
    assert [to for to, _ in received(smtp_server)] == ["c1@example.com"] * 2
    assert received(smtp_server)[1][1] != day30
    assert ledger(after) == [("winback:C1:C1-1:1", "30", "sent", None), ("winback:C1:C1-1:3", "60", "sent", None)]


def test_a_step_removed_before_the_one_a_customer_got_does_not_send_that_step_again(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given a one-time buyer first seen when their order was 35 days old (the day-14 step is not sent late), sent
    # the day-30 step as step 2 of [14, 30, 60]
    given_one_time_buyers(db_url, {"C1": 35})
    before = settings_for(db_url, smtp_server, [14, 30, 60])
    cycle_at(before, T0)
    assert [to for to, _ in received(smtp_server)] == ["c1@example.com"]
    # When the operator removes the day-14 step, and Kembali runs the next morning
    after = settings_for(db_url, smtp_server, [30, 60])
    cycle_at(after, T0 + timedelta(days=1))
    # Then the day-30 step, now step 1, is not sent again
    assert [to for to, _ in received(smtp_server)] == ["c1@example.com"]
    assert ledger(after) == [("winback:C1:C1-1:2", "30", "sent", None)]


def test_a_step_waiting_when_a_step_is_inserted_before_it_is_still_sent(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given a one-time buyer whose order is 35 days old, the day-30 step planned as step 1 of [30, 60] at 22:00 in
    # Jakarta, held by quiet hours until the morning
    given_one_time_buyers(db_url, {"C1": 35})
    cycle_at(settings_for(db_url, smtp_server, [30, 60]), T0 - timedelta(hours=5))
    assert smtp_server.messages == []
    # When the operator inserts a day-14 step first overnight, and Kembali runs in the morning
    after = settings_for(db_url, smtp_server, [14, 30, 60])
    cycle_at(after, T0)
    # Then the day-30 step goes, once, as it was planned (not skipped as if a later step were due, which its new
    # number 2 would say, and not planned again under that number), with the day-30 step's coupon (not that of
    # the day-14 step, now step 1)
    assert received(smtp_server) == [("c1@example.com", "Siti, we miss you! Here's 10% off, just for you")]
    assert ledger(after) == [("winback:C1:C1-1:1", "30", "sent", None)]


def test_preview_says_when_the_steps_are_numbered_otherwise_than_when_rows_were_planned(
    db_url: str, smtp_server: RecordingServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given one-time buyers sent the day-30 step as step 1 of [30, 60] (C1 and C2), and one too new for any (C3)
    given_one_time_buyers(db_url, {"C1": 35, "C2": 31, "C3": 5})
    cycle_at(settings_for(db_url, smtp_server, [30, 60]), T0)
    assert len(smtp_server.messages) == 2
    capsys.readouterr()
    # When the operator inserts a day-14 step first and previews the next morning
    after = settings_for(db_url, smtp_server, [14, 30, 60])
    args = argparse.Namespace(at=T0 + timedelta(days=1), campaign=None, customer=None, limit=None, out=None,
                              json=False)  # fmt: skip
    assert previewing.preview(after, args) == 0
    shown = capsys.readouterr()
    # Then it says which rows' numbers changed and what a pass plans for them, and shows no win-back message
    assert ("note: win-back's steps are numbered otherwise than when some of its ledger rows were planned (2 of 30 "
            "days planned as step 1, now step 2): an order is not planned a step of as many days as a row it has, "
            "or fewer, whatever the numbers; a step whose number it has a row of is planned under a key with its "
            "days when that row was another step's (its days another step's now, or its template not this step's), "
            "and not at all when it was this step's, its days edited") in shown.err
    assert "winback/" not in shown.out
    # and with the steps as they were, it says nothing of the kind
    assert previewing.preview(settings_for(db_url, smtp_server, [30, 60]), args) == 0
    assert "numbered otherwise" not in capsys.readouterr().err


def test_a_step_removed_before_the_one_a_customer_got_still_sends_the_later_step(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given a one-time buyer sent the day-30 step as step 2 of [14, 30, 60]
    given_one_time_buyers(db_url, {"C1": 35})
    cycle_at(settings_for(db_url, smtp_server, [14, 30, 60]), T0)
    # When the operator removes the day-14 step, and Kembali runs on day 61
    after = settings_for(db_url, smtp_server, [30, 60])
    cycle_at(after, T0 + timedelta(days=26))
    # Then the day-60 step goes, under a key of its own (the day-30 row has the key of step 2)
    assert [to for to, _ in received(smtp_server)] == ["c1@example.com"] * 2
    assert ledger(after) == [("winback:C1:C1-1:2", "30", "sent", None), ("winback:C1:C1-1:2d60", "60", "sent", None)]
    # and a pass the next day plans nothing more
    cycle_at(after, T0 + timedelta(days=27))
    assert len(received(smtp_server)) == 2


def test_the_first_step_removed_still_sends_the_next_one_to_those_who_had_it(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given a one-time buyer sent the day-14 reminder as step 1 of [14, 30, 60]
    given_one_time_buyers(db_url, {"C1": 15})
    cycle_at(settings_for(db_url, smtp_server, [14, 30, 60]), T0)
    assert len(received(smtp_server)) == 1
    # When the operator removes the reminder, and Kembali runs on day 31
    after = settings_for(db_url, smtp_server, [30, 60])
    cycle_at(after, T0 + timedelta(days=16))
    # Then the day-30 offer, now step 1, goes: the row of step 1 is the reminder's, another template's
    assert [subject for _, subject in received(smtp_server)][1] == "Siti, we miss you! Here's 10% off, just for you"
    assert ledger(after) == [("winback:C1:C1-1:1", "14", "sent", None), ("winback:C1:C1-1:1d30", "30", "sent", None)]


def test_a_steps_days_edited_do_not_send_that_step_again(db_url: str, smtp_server: RecordingServer) -> None:
    # Given a one-time buyer sent the day-30 step (template winback) as step 1 of [30, 60]
    given_one_time_buyers(db_url, {"C1": 31})
    cycle_at(settings_for(db_url, smtp_server, [30, 60]), T0)
    assert len(received(smtp_server)) == 1
    # When the operator moves that step, same template, to day 35, and Kembali runs on day 36
    after = settings_for(db_url, smtp_server, [35, 60])
    cycle_at(after, T0 + timedelta(days=5))
    # Then it is the same step: not sent again
    assert len(received(smtp_server)) == 1
    # and the day-60 step still goes when its day comes
    cycle_at(after, T0 + timedelta(days=30))
    assert len(received(smtp_server)) == 2
    assert ledger(after) == [("winback:C1:C1-1:1", "30", "sent", None), ("winback:C1:C1-1:2", "60", "sent", None)]


def test_stats_count_the_steps_of_one_number_and_other_days_apart(db_url: str, smtp_server: RecordingServer) -> None:
    from worker.commands.reporting import stats_lines
    from worker.stats import build_stats

    # Given a one-time buyer sent the day-30 step as step 2 of [14, 30, 60], then the day-60 step as step 2 of
    # [30, 60] once the operator removed the day-14 step
    given_one_time_buyers(db_url, {"C1": 35})
    cycle_at(settings_for(db_url, smtp_server, [14, 30, 60]), T0)
    cycle_at(settings_for(db_url, smtp_server, [30, 60]), T0 + timedelta(days=26))
    assert len(received(smtp_server)) == 2
    # When the operator asks for the stats
    engine = db.create_engine(db_url)
    try:
        report = build_stats(engine, since=T0 - timedelta(days=1), now=T0 + timedelta(days=27))
    finally:
        engine.dispose()
    # Then the two emails of step 2, of 30 and 60 days, are counted apart, each by its day
    shown = [(s["campaign"], s["step"], s["days"], s["planned"], s["sent"]) for s in report.as_json()["campaigns"]]
    assert shown == [("winback", 2, 30, 1, 1), ("winback", 2, 60, 1, 1)]
    text = "\n".join(stats_lines(report))
    assert "\nwinback step 2 (day 30)\n  planned 1: sent 1," in text
    assert "\nwinback step 2 (day 60)\n  planned 1: sent 1," in text


def test_a_step_sent_under_a_key_of_its_own_then_its_days_edited_is_not_sent_again(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given a one-time buyer sent the day-14 reminder as step 1 of [14, 30, 60], then, the reminder removed, the
    # day-30 offer as step 1 of [30, 60] under a key of its own (…:1d30)
    given_one_time_buyers(db_url, {"C1": 15})
    cycle_at(settings_for(db_url, smtp_server, [14, 30, 60]), T0)
    cycle_at(settings_for(db_url, smtp_server, [30, 60]), T0 + timedelta(days=16))
    assert len(received(smtp_server)) == 2
    # When the operator moves the offer, same template, to day 35, and Kembali runs on day 36
    after = settings_for(db_url, smtp_server, [35, 60])
    cycle_at(after, T0 + timedelta(days=21))
    # Then it is the same step, the one the customer had as …:1d30: the offer is not sent again
    assert len(received(smtp_server)) == 2
    assert ledger(after) == [("winback:C1:C1-1:1", "14", "sent", None), ("winback:C1:C1-1:1d30", "30", "sent", None)]


def test_a_step_waiting_when_its_days_are_edited_is_still_sent(db_url: str, smtp_server: RecordingServer) -> None:
    # Given a one-time buyer whose order is 36 days old, the day-30 step (template winback) planned as step 1 of
    # [30, 60] at 22:00 in Jakarta, held by quiet hours until the morning
    given_one_time_buyers(db_url, {"C1": 36})
    cycle_at(settings_for(db_url, smtp_server, [30, 60]), T0 - timedelta(hours=5))
    assert smtp_server.messages == []
    # When the operator moves that step, same template, to day 35 overnight, and Kembali runs in the morning
    after = settings_for(db_url, smtp_server, [35, 60])
    cycle_at(after, T0)
    # Then it goes, as planned: the step due now is the same step, not a later one it would make way for (skipped as
    # no longer due, the planner would not plan it again: that row is the step's)
    assert received(smtp_server) == [("c1@example.com", "Siti, we miss you! Here's 10% off, just for you")]
    assert ledger(after) == [("winback:C1:C1-1:1", "30", "sent", None)]
