"""The whole pipeline against a real SQLite file and a real aiosmtpd server on 127.0.0.1:0.

Given a shop in the database, when a cycle runs (plan → render → send → record),
then the server receives exactly the intended messages and the ledger says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from datetime import timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest

from tests.shop import LINK_KEY, NOW, customer, edited_templates, make_shop, one_time_order, settings_for
from tests.smtp_server import Behaviour, RecordingServer
from worker import pipeline, stopping
from worker.adapters import shop
from worker.adapters.store import Store
from worker.adapters.templates import JinjaTemplates
from worker.app import Deps
from worker.commands import running
from worker.commands.running import CycleReport, cycle
from worker.config import Settings
from worker.core import tokens
from worker.domain import Locale, OrderStatus
from worker.testing import FakeClock


@pytest.fixture(autouse=True)
def link_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)


def deps_for(settings: Settings, store: Store, clock: FakeClock) -> Deps:
    return Deps(settings=settings, store=store, templates=JinjaTemplates(settings.resolve(settings.templates.dir)),
                clock=clock)


def run_cycle(settings: Settings, store: Store, clock: FakeClock) -> CycleReport:
    return asyncio.run(cycle(deps_for(settings, store, clock)))


def parse(data: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


def ledger(store: Store) -> dict[str, dict[str, object]]:
    return {str(r["dedupe_key"]): r for r in store.messages(limit=10_000)}


def test_a_cycle_sends_each_due_winback_once_and_records_it(sqlite_url: str, smtp_server: RecordingServer) -> None:
    # Given three quiet one-time buyers, one recent buyer, one repeat buyer and one without consent
    customers = [customer("C1"), customer("C2"), customer("C3", locale=Locale.EN), customer("C4"),
                 customer("C5"), customer("C6", consent=False)]
    orders = [one_time_order("O1", "C1"), one_time_order("O2", "C2"), one_time_order("O3", "C3"),
              one_time_order("O4", "C4", days_ago=10),
              one_time_order("O5a", "C5", days_ago=90), one_time_order("O5b", "C5", days_ago=70),
              one_time_order("O6", "C6")]
    store = make_shop(sqlite_url, customers, orders)
    settings = settings_for(sqlite_url, smtp={"port": smtp_server.port})
    clock = FakeClock(NOW)

    # When a cycle runs, twice
    first = run_cycle(settings, store, clock)
    second = run_cycle(settings, store, clock)

    # Then exactly the three quiet one-time buyers got one email each, once
    assert sorted(m.rcpt_tos for m in smtp_server.messages) == [("c1@example.com",), ("c2@example.com",),
                                                         ("c3@example.com",)]
    assert first.planned.created == {"winback": 3} and first.dispatched.outcomes == {"sent": 3}
    assert second.planned.created == {"winback": 0} and not second.dispatched.outcomes
    rows = ledger(store)
    assert {k: r["status"] for k, r in rows.items()} == {f"winback:C{i}:O{i}:1": "sent" for i in (1, 2, 3)}
    for row in rows.values():
        assert row["attempts"] == 1 and row["last_code"] == 250 and row["template_version"]
        (attempt,) = store.attempts_for(int(row["id"]))  # type: ignore[call-overload]
        assert attempt["outcome"] == "sent" and attempt["code"] == 250 and attempt["worker"]
    # And the English customer got English, the others Bahasa Indonesia
    subjects = {m.rcpt_tos[0]: str(parse(m.data)["Subject"]) for m in smtp_server.messages}
    assert "Kak" in subjects["c1@example.com"]
    assert "Kak" not in subjects["c3@example.com"]


def test_each_message_has_the_headers_and_footer_the_law_and_mailbox_providers_expect(
    sqlite_url: str, smtp_server: RecordingServer
) -> None:
    store = make_shop(sqlite_url, [customer("C1", name="Siti Rahayu")], [one_time_order("O1", "C1")])
    settings = settings_for(sqlite_url, smtp={"port": smtp_server.port})
    run_cycle(settings, store, FakeClock(NOW))
    (received,) = smtp_server.messages
    message = parse(received.data)
    assert message["Date"] is not None
    assert str(message["Message-ID"]).endswith("@toko-kembali.example>")
    assert str(message["Message-ID"]) == ledger(store)["winback:C1:O1:1"]["message_id"]
    assert message.get_content_type() == "multipart/alternative"
    parts = [p.get_content_type() for p in message.iter_parts()]
    assert parts == ["text/plain", "text/html"]
    unsubscribe = str(message["List-Unsubscribe"])
    https, mailto = [u.strip(" <>") for u in unsubscribe.split(",")]
    assert https.startswith("https://toko-kembali.example/unsubscribe?t=")
    assert mailto == "mailto:unsubscribe@toko-kembali.example"
    assert str(message["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"
    token = https.split("t=", 1)[1]
    local = str(message["Message-ID"]).strip("<>").partition("@")[0]  # the email's ledger row, by its Message-ID
    assert tokens.verify(token, [LINK_KEY.encode()], shop="toko-kembali.example") == ("u", f"1:{local}")
    assert "@" not in tokens.verify(token, [LINK_KEY.encode()], shop="toko-kembali.example")[1]  # type: ignore[index]
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    for body in (text, html):
        assert https.replace("&", "&amp;") in body or https in body
        assert settings.shop.postal_address in body
    # personalised: first name, the product bought, a same-category recommendation with its Rupiah price
    assert "Siti" in text and "Kopi Gayo 250g" in text and "Kopi Toraja 250g: Rp99.000" in text


def test_without_an_unsubscribe_mailto_each_message_goes_out_with_the_https_link_alone(
    sqlite_url: str, smtp_server: RecordingServer
) -> None:
    # unsubscribe.mailto = "" failed every due message for good ("not a plain email address: ''")
    store = make_shop(sqlite_url, [customer("C1"), customer("C2")], [one_time_order("O1", "C1"),
                                                                      one_time_order("O2", "C2")])
    settings = settings_for(sqlite_url, smtp={"port": smtp_server.port}, unsubscribe={"mailto": ""})
    report = run_cycle(settings, store, FakeClock(NOW))
    assert report.dispatched.outcomes == {"sent": 2}
    for received in smtp_server.messages:
        message = parse(received.data)
        https = str(message["List-Unsubscribe"])
        assert https.startswith("<https://toko-kembali.example/unsubscribe?t=") and "," not in https
        assert str(message["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"
    assert {row["status"] for row in ledger(store).values()} == {"sent"}


def test_an_address_with_a_unicode_domain_goes_out_in_idna_and_one_before_the_at_fails_alone(
    sqlite_url: str, smtp_server: RecordingServer
) -> None:
    # addresses stored before imports wrote domains in their IDNA form (migration 0012 converted customers, not the
    # ledger rows already planned for them): the MIME writer refused them ("not a plain email address")
    customers = [customer("C1", email="budi@bücher.example"), customer("C2", email="sití@example.com"),
                 customer("C3")]
    store = make_shop(sqlite_url, customers, [one_time_order(f"O{i}", f"C{i}") for i in (1, 2, 3)])
    report = run_cycle(settings_for(sqlite_url, smtp={"port": smtp_server.port}), store, FakeClock(NOW))
    assert report.dispatched.outcomes == {"sent": 2, "failed:render_error": 1}
    received = {m.rcpt_tos: parse(m.data) for m in smtp_server.messages}
    assert set(received) == {("budi@xn--bcher-kva.example",), ("c3@example.com",)}
    assert received[("budi@xn--bcher-kva.example",)]["To"].addresses[0].addr_spec == "budi@xn--bcher-kva.example"
    rows = ledger(store)
    assert rows["winback:C1:O1:1"]["status"] == "sent"
    failed = rows["winback:C2:O2:1"]
    assert failed["status"] == "failed"
    assert "letters beyond ASCII before the @ need SMTPUTF8" in str(store.attempts_for(int(failed["id"]))[-1]["reply"])


@pytest.mark.parametrize(
    "hostile_name",
    ["Budi\r\nBcc: evil@example.com", "=?UTF-8?Q?=0A?=Bcc: x@example.com", "Rina\nTo: other@example.com",
     "Andi =?utf-8?b?DQpCY2M6IHhAZXhhbXBsZS5jb20=?="],
)
def test_a_hostile_name_gets_one_message_with_exactly_the_intended_headers(
    sqlite_url: str, smtp_server: RecordingServer, hostile_name: str
) -> None:
    store = make_shop(sqlite_url, [customer("C1", name=hostile_name)], [one_time_order("O1", "C1")])
    run_cycle(settings_for(sqlite_url, smtp={"port": smtp_server.port}), store, FakeClock(NOW))
    (received,) = smtp_server.messages
    assert received.rcpt_tos == ("c1@example.com",)
    message = parse(received.data)
    assert sorted(message.keys()) == sorted([
        "Date", "From", "To", "Subject", "Message-ID", "MIME-Version", "List-Unsubscribe",
        "List-Unsubscribe-Post", "Content-Type", "X-Kembali-Campaign",
    ])
    (to,) = message["To"].addresses
    assert to.addr_spec == "c1@example.com"
    assert "\n" not in to.display_name and "\r" not in to.display_name
    assert "Bcc" not in message and "Cc" not in message
    # the raw header block has one line per header (plus folded continuations only)
    head = received.data.split(b"\r\n\r\n", 1)[0]
    starts = [line.split(b":", 1)[0] for line in head.split(b"\r\n") if not line.startswith((b" ", b"\t"))]
    assert sorted(s.decode() for s in starts) == sorted(message.keys())


def test_the_ledger_records_the_subject_as_it_was_sent(
    sqlite_url: str, smtp_server: RecordingServer, tmp_path: Path
) -> None:
    # Given a subject template that runs past a header's length, with an encoded-word's opening in it
    long = "Kami rindu =?kamu?= " + "sangat " * 60
    templates = edited_templates(tmp_path / "email", "winback/en/subject.txt", lambda t: long)
    store = make_shop(sqlite_url, [customer("C1", locale=Locale.EN)], [one_time_order("O1", "C1")])
    run_cycle(settings_for(sqlite_url, smtp={"port": smtp_server.port}, templates=templates), store, FakeClock(NOW))
    # Then the ledger's subject is the one the customer got (cut, "=?" defused), not the template's output
    (received,) = smtp_server.messages
    sent = str(parse(received.data)["Subject"])
    assert len(sent) <= 200 and sent.endswith("...") and "= ?kamu" in sent, sent
    assert ledger(store)["winback:C1:O1:1"]["subject"] == sent


def test_a_broken_template_fails_its_messages_only(
    sqlite_url: str, smtp_server: RecordingServer, tmp_path: Path
) -> None:
    templates = edited_templates(tmp_path / "email", "winback/en/body.txt",
                                 lambda t: t.replace("{{ customer.first_name or", "{{ customer.nickname or"))
    store = make_shop(sqlite_url, [customer("C1"), customer("C2", locale=Locale.EN)],
                      [one_time_order("O1", "C1"), one_time_order("O2", "C2")])
    report = run_cycle(settings_for(sqlite_url, smtp={"port": smtp_server.port}, templates=templates), store,
                       FakeClock(NOW))
    assert [m.rcpt_tos for m in smtp_server.messages] == [("c1@example.com",)]
    assert report.dispatched.outcomes == {"sent": 1, "failed:render_error": 1}
    failed = ledger(store)["winback:C2:O2:1"]
    assert failed["status"] == "failed"
    (attempt,) = store.attempts_for(int(failed["id"]))  # type: ignore[call-overload]
    assert attempt["outcome"] == "render_error"
    assert "winback/en/body.txt:3" in str(attempt["reply"]) and "nickname" in str(attempt["reply"])


def test_a_template_that_never_ends_for_one_customer_fails_that_message_and_the_run_goes_on(
    sqlite_url: str, smtp_server: RecordingServer, tmp_path: Path
) -> None:
    endless = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    templates = edited_templates(tmp_path / "email", "winback/en/body.html",
                                 lambda t: f"{{% if customer.first_name == 'Loop' %}}{endless}{{% endif %}}\n" + t)
    store = make_shop(sqlite_url, [customer("C1", locale=Locale.EN), customer("C2", name="Loop", locale=Locale.EN)],
                      [one_time_order("O1", "C1"), one_time_order("O2", "C2")])  # fmt: skip
    settings = settings_for(sqlite_url, smtp={"port": smtp_server.port}, templates=templates,
                            checks={"render_timeout_seconds": 0.5})  # fmt: skip
    deps = dataclasses.replace(Deps.build(settings), clock=FakeClock(NOW))  # the limit as `run` configures it
    report = asyncio.run(cycle(deps))
    assert [m.rcpt_tos for m in smtp_server.messages] == [("c1@example.com",)]
    assert report.dispatched.outcomes == {"sent": 1, "failed:render_error": 1}
    (attempt,) = store.attempts_for(int(ledger(store)["winback:C2:O2:1"]["id"]))  # type: ignore[call-overload]
    assert "winback/en/body.html:1: the render took more than 0.5 s" in str(attempt["reply"])


def test_an_address_suppressed_in_another_case_gets_nothing(sqlite_url: str, smtp_server: RecordingServer) -> None:
    store = make_shop(sqlite_url, [customer("C1", email="Budi.Santoso@example.com"), customer("C2")],
                      [one_time_order("O1", "C1"), one_time_order("O2", "C2")])  # fmt: skip
    store.suppress("budi.santoso@EXAMPLE.com", reason="complaint", source="test", now=NOW)
    report = run_cycle(settings_for(sqlite_url, smtp={"port": smtp_server.port}), store, FakeClock(NOW))
    assert [m.rcpt_tos for m in smtp_server.messages] == [("c2@example.com",)]
    assert report.dispatched.outcomes == {"sent": 1}
    assert "winback:C1:O1:1" not in ledger(store)  # planning leaves the suppressed address out


def test_a_transient_failure_is_retried_later_and_then_sent(sqlite_url: str, smtp_server: RecordingServer) -> None:
    smtp_server.on("c1@example.com", Behaviour(rcpt_reply="451 4.7.1 Greylisted, try again in 300 seconds"))
    store = make_shop(sqlite_url, [customer("C1")], [one_time_order("O1", "C1")])
    settings = settings_for(sqlite_url, smtp={"port": smtp_server.port})
    clock = FakeClock(NOW)
    run_cycle(settings, store, clock)
    row = ledger(store)["winback:C1:O1:1"]
    assert row["status"] == "retry" and row["last_code"] == 451
    assert row["next_attempt_at"] >= NOW + timedelta(seconds=300)  # type: ignore[operator]
    clock.advance(60)
    run_cycle(settings, store, clock)  # not yet due
    assert ledger(store)["winback:C1:O1:1"]["status"] == "retry" and smtp_server.messages == []
    smtp_server.on("c1@example.com", Behaviour())
    clock.set(row["next_attempt_at"])  # type: ignore[arg-type]
    run_cycle(settings, store, clock)
    row = ledger(store)["winback:C1:O1:1"]
    assert row["status"] == "sent" and row["attempts"] == 2
    assert [a["outcome"] for a in store.attempts_for(int(row["id"]))] == ["transient", "sent"]  # type: ignore[call-overload]
    assert len(smtp_server.messages) == 1


def test_send_time_recheck_skips_customers_who_ordered_or_unsubscribed_since_planning(
    sqlite_url: str, smtp_server: RecordingServer
) -> None:
    from worker.pipeline import plan

    store = make_shop(sqlite_url, [customer("C1"), customer("C2"), customer("C3")],
                      [one_time_order("O1", "C1"), one_time_order("O2", "C2"), one_time_order("O3", "C3")])
    settings = settings_for(sqlite_url, smtp={"port": smtp_server.port})
    assert plan(store, settings, NOW).created == {"winback": 3}
    shop.upsert_orders(store.engine, [one_time_order("O1b", "C1", days_ago=0, status=OrderStatus.PAID)], NOW)
    store.suppress("c2@example.com", reason="unsubscribed", source="test", now=NOW)
    run_cycle(settings, store, FakeClock(NOW))
    assert [m.rcpt_tos for m in smtp_server.messages] == [("c3@example.com",)]
    rows = ledger(store)
    assert (rows["winback:C1:O1:1"]["status"], rows["winback:C1:O1:1"]["skip_reason"]) == ("skipped", "ordered_since")
    assert (rows["winback:C2:O2:1"]["status"], rows["winback:C2:O2:1"]["skip_reason"]) == ("skipped", "suppressed")


def test_a_message_planned_to_an_address_suppressed_since_goes_to_the_customers_new_address_not_there(
    sqlite_url: str, smtp_server: RecordingServer
) -> None:
    # Given a win-back email planned to c1@example.com, after which the shop's export gives C1 a new address,
    # and the old one is suppressed (its new owner complained, say, with the address in other letter cases)
    store = make_shop(sqlite_url, [customer("C1")], [one_time_order("O1", "C1")])
    settings = settings_for(sqlite_url, smtp={"port": smtp_server.port})
    assert pipeline.plan(store, settings, NOW).created == {"winback": 1}
    shop.upsert_customers(store.engine, [customer("C1", email="c1-new@example.com")], NOW)
    store.suppress("C1@Example.com", reason="complaint", source="test", now=NOW)
    # When a cycle runs
    run_cycle(settings, store, FakeClock(NOW))
    # Then nothing goes to the suppressed address the message was planned to: it goes to the customer's address now
    assert [m.rcpt_tos for m in smtp_server.messages] == [("c1-new@example.com",)]
    row = ledger(store)["winback:C1:O1:1"]
    assert (row["status"], row["email"]) == ("sent", "c1-new@example.com")


def test_an_expired_message_is_skipped_not_sent(sqlite_url: str, smtp_server: RecordingServer) -> None:
    from worker.pipeline import plan

    store = make_shop(sqlite_url, [customer("C1")], [one_time_order("O1", "C1")])
    settings = settings_for(sqlite_url, smtp={"port": smtp_server.port})
    plan(store, settings, NOW)
    clock = FakeClock(NOW + timedelta(days=settings.campaigns.winback.expires_after_days, seconds=1))
    run_cycle(settings, store, clock)
    assert smtp_server.messages == []
    row = ledger(store)["winback:C1:O1:1"]
    assert (row["status"], row["skip_reason"]) == ("skipped", "expired")


def test_a_campaign_turned_off_holds_what_it_had_planned_until_it_is_on_again(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given win-back emails planned for two quiet one-time buyers, not yet sent (planned at 20:00, quiet hours)
    store = make_shop(db_url, [customer("C1"), customer("C2")],
                      [one_time_order("O1", "C1"), one_time_order("O2", "C2")])
    try:
        on = settings_for(db_url, smtp={"port": smtp_server.port})
        evening = NOW - timedelta(hours=14)  # 20:00 in Jakarta, the evening before
        assert pipeline.plan(store, on, evening).created == {"winback": 2}

        # When the operator turns win-back off (birthdays on) and a cycle runs the next morning
        off = settings_for(db_url, smtp={"port": smtp_server.port},
                           campaigns={"winback": {"enabled": False}, "birthday": {"enabled": True}})
        clock = FakeClock(NOW)  # 10:00 in Jakarta
        held = run_cycle(off, store, clock)

        # Then nothing goes out, and the rows wait, as preview (which lists enabled campaigns only) shows them
        assert smtp_server.messages == [] and not held.dispatched.outcomes
        assert {k: r["status"] for k, r in ledger(store).items()} == {"winback:C1:O1:1": "planned",
                                                                       "winback:C2:O2:1": "planned"}
        # And once it is on again, they are sent (had they expired meanwhile, the expiry sweep would close them)
        run_cycle(on, store, clock)
        assert sorted(m.rcpt_tos for m in smtp_server.messages) == [("c1@example.com",), ("c2@example.com",)]
    finally:
        store.close()


def test_a_run_gives_back_the_stop_handlers_it_found_once_it_has_sent(
    sqlite_url: str, smtp_server: RecordingServer
) -> None:
    # Given a command that turns SIGTERM into its "stopped by SIGTERM" exit (the CLI does so for run --once and the
    # demo, for the steps before and after sending), and a due win-back
    store = make_shop(sqlite_url, [customer("C1")], [one_time_order("O1", "C1")])
    deps = deps_for(settings_for(sqlite_url, smtp={"port": smtp_server.port}), store, FakeClock(NOW))
    with stopping.sigterm_raises():
        before = signal.getsignal(signal.SIGTERM)
        # When the run, which takes SIGINT and SIGTERM itself while it plans and sends, is done
        report = asyncio.run(running.stoppable(deps))
        # Then the handlers from before are back for the steps after it (its summary, closing the database): a
        # SIGTERM there took the default action, killing the command without a word
        assert signal.getsignal(signal.SIGTERM) is before
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert report.dispatched.outcomes == {"sent": 1}
