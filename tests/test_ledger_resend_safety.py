"""`kembali ledger resend` and `close` after an incident: hundreds of rows chosen by filters, a dry run first,
and nothing put back in the queue that the next run would only skip."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.sendkit import REPO, Shop, message_ids, settings_dict, write_config
from tests.smtp_server import Behaviour, RecordingServer
from worker import cli
from worker.adapters.store import M
from worker.commands import ledger as ledger_command
from worker.config import settings_from_dict

BROKEN = [f"b{i}@test.example" for i in range(4)]
"""Refused while the relay was broken (554), each a 5xx that fails the message at once."""
DISABLED = "disabled@test.example"
"""Refused for its own reason (550 5.2.1), which a resend will not cure."""
RELAY_BROKEN = "554 5.3.0 relay misconfigured"


@pytest.fixture
def incident(
    db_url: str, tmp_path: Path, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Shop, Path]]:
    """Given four win-back messages failed by a relay refusing everything, and one failed for its mailbox."""
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")
    for address in BROKEN:
        smtp_server.on(address, Behaviour(rcpt_reply=RELAY_BROKEN))
    smtp_server.on(DISABLED, Behaviour(rcpt_reply="550 5.2.1 Mailbox disabled"))
    raw = settings_dict(db_url, smtp_server.port)
    raw["policy"] = {"quiet_hours_start": "21:00", "quiet_hours_end": "08:00"}
    shop = Shop(db_url, settings_from_dict(raw, base_dir=REPO), [*BROKEN, DISABLED])
    monkeypatch.setattr(ledger_command, "SystemClock", lambda: shop.clock)  # the operator acts at the shop's time
    shop.cycle()
    assert {shop.row(a).status for a in [*BROKEN, DISABLED]} == {"failed"}
    for address in BROKEN:  # the relay is mended
        smtp_server.on(address, Behaviour())
    config = write_config(tmp_path / "config.toml", raw)
    try:
        yield shop, config
    finally:
        shop.close()


def kembali(config: Path, *args: str) -> int:
    return cli.main(["--config", str(config), "ledger", *args])


def test_a_dry_run_counts_what_a_bulk_resend_by_code_takes_then_the_resend_sends_them_once(
    incident: tuple[Shop, Path], smtp_server: RecordingServer, capsys: pytest.CaptureFixture[str]
) -> None:
    shop, config = incident
    ids = sorted(shop.row(a).id for a in BROKEN)
    filters = ("--campaign", "winback", "--status", "failed", "--code", "554", "--since", "2026-11-22")
    # When the operator first asks what a resend of the relay's refusals would take (it took message IDs alone:
    # 500 of them had to be pasted from `ledger list`)
    assert kembali(config, "resend", *filters, "--dry-run") == 0
    out = capsys.readouterr().out
    # Then it counts and names them, and changes nothing
    assert "dry run: nothing changed; 4 message(s) would be back in the queue" in out
    assert sorted(map(int, out.splitlines()[-1].split(": ")[-1].split())) == ids
    assert {shop.row(a).status for a in BROKEN} == {"failed"}
    assert [a.outcome for a in shop.attempts(BROKEN[0])] == ["permanent"]

    # When it resends them for real
    assert kembali(config, "resend", *filters, "--reason", "relay fixed") == 0
    assert "4 message(s) back in the queue" in capsys.readouterr().out
    # Then those four go out at the next run with their Message-IDs, the mailbox refusal stays failed
    assert {shop.row(a).status for a in BROKEN} == {"retry"}
    assert shop.row(DISABLED).status == "failed"
    shop.clock.advance(60)
    shop.cycle()
    assert {shop.row(a).status for a in BROKEN} == {"sent"}
    sent = message_ids(smtp_server.messages)
    assert all(sent[shop.row(a).message_id] == 1 for a in BROKEN)
    # and running it again finds nothing left to resend
    assert kembali(config, "resend", *filters) == 0
    assert capsys.readouterr().out.strip() == "no failed messages match: nothing to resend"


def test_filters_that_match_nothing_or_no_selection_at_all(
    incident: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    shop, config = incident
    # a time range before the incident matches nothing
    assert kembali(config, "resend", "--until", "2026-11-22") == 0
    assert capsys.readouterr().out.strip() == "no uncertain or failed messages match: nothing to resend"
    # neither IDs nor a filter would mean every failed message: refused, as are both
    assert kembali(config, "resend") == 2
    refused = capsys.readouterr().err
    assert "give message IDs or filters (--status, --campaign, --since, --until, --code, --email, --customer), " \
        "not neither" in refused
    assert kembali(config, "close", str(shop.row(DISABLED).id), "--code", "550") == 2
    assert "not both" in capsys.readouterr().err
    assert shop.row(DISABLED).status == "failed"


def test_list_combines_the_filters(incident: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _shop, config = incident
    assert kembali(config, "list", "--code", "550", "--since", "2026-11-22T02:00+07:00", "--json") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [row.split('"email": "')[1].split('"')[0] for row in lines] == [DISABLED]
    assert kembali(config, "list", "--code", "550", "--until", "2026-11-22T09:59+07:00") == 0
    assert capsys.readouterr().out.strip() == ("no messages with status uncertain, failed with last reply code 550 "
                                               "changed before 2026-11-22 02:59 UTC")  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        kembali(config, "list", "--since", "yesterday")
    assert exit_info.value.code == 2
    assert "not a day or a moment: 'yesterday'" in capsys.readouterr().err


def test_a_message_past_its_expiry_is_not_put_back_in_the_queue(
    incident: tuple[Shop, Path], smtp_server: RecordingServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a failed message whose expiry has passed by the time the operator gets to it
    shop, config = incident
    stale, fresh = shop.row(BROKEN[0]), shop.row(BROKEN[1])
    expired = shop.clock.now() - timedelta(hours=1)
    with shop.store.engine.begin() as conn:
        conn.execute(sa.update(M).where(M.c.id == stale.id).values(expires_at=expired))
    # When it is resent with another
    assert kembali(config, "resend", str(stale.id), str(fresh.id)) == 1
    captured = capsys.readouterr()
    # Then it is left alone, saying why and what to do instead (it said "back in the queue (sent at the next
    # run)", and the next run skipped it as expired, its 554 overwritten)
    assert (f"message {stale.id} left alone: expired at {expired:%Y-%m-%d %H:%M} UTC, so the next run would "
            "skip it as expired; `kembali ledger close` it instead") in captured.err
    assert f"1 message(s) back in the queue (sent at the next run): {fresh.id}" in captured.out
    assert (shop.row(BROKEN[0]).status, shop.row(BROKEN[0]).last_code) == ("failed", 554)
    # and closing it records the decision, which stats count as failed
    assert kembali(config, "close", str(stale.id), "--reason", "offer over") == 0
    assert shop.row(BROKEN[0]).last_error == "operator closed as failed: offer over"
    capsys.readouterr()
    assert cli.main(["--config", str(config), "stats", "--since", "2026-11-01", "--now", shop.clock.now().isoformat(),
                     "--json"]) == 0
    (winback,) = json.loads(capsys.readouterr().out)["campaigns"]
    assert (winback["failed"], winback["sent"]) == (4, 0)


def test_a_resent_message_still_waits_for_quiet_hours_and_the_frequency_cap(
    incident: tuple[Shop, Path], smtp_server: RecordingServer, capsys: pytest.CaptureFixture[str]
) -> None:
    shop, config = incident
    first, second = shop.row(BROKEN[0]), shop.row(BROKEN[1])
    # Given the first customer was sent another email since (the cap: one in three days)
    with shop.store.engine.begin() as conn:
        conn.execute(sa.update(M).where(M.c.id == second.id).values(
            customer_id=first.customer_id, email=first.email, status="sent", sent_at=shop.clock.now()))
    # When both failed messages are resent in the evening, at 22:00 in Jakarta (quiet from 21:00 to 08:00)
    shop.clock.set(shop.clock.now().replace(hour=15))
    third = shop.row(BROKEN[2])
    assert kembali(config, "resend", str(first.id), str(third.id)) == 0
    capsys.readouterr()
    shop.cycle()
    # Then nothing goes out during quiet hours
    assert smtp_server.messages == [] and [status(shop, first.id), status(shop, third.id)] == ["retry", "retry"]
    # and in the morning the one to a customer under the cap goes, the other waits for its slot
    shop.clock.advance(10.5 * 3600)
    shop.cycle()
    assert [status(shop, first.id), status(shop, third.id)] == ["retry", "sent"]
    assert list(message_ids(smtp_server.messages)) == [third.message_id]


def status(shop: Shop, message_id: int) -> str:
    with shop.store.engine.connect() as conn:
        return str(conn.execute(sa.select(M.c.status).where(M.c.id == message_id)).scalar_one())


def test_a_refusal_naming_a_hostile_address_reaches_the_terminal_escaped(
    incident: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a failed message to an address written past the importer with a terminal escape, now suppressed
    shop, config = incident
    hostile = "b0\x1b]0;owned\x07@test.example"
    failed = shop.row(BROKEN[0])
    with shop.store.engine.begin() as conn:
        conn.execute(sa.update(M).where(M.c.id == failed.id).values(email=hostile))
    shop.store.suppress(hostile, reason="complaint", source="test", now=shop.clock.now())
    # When the operator resends it, the refusal names the address with its control characters escaped
    assert kembali(config, "resend", str(failed.id)) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err
    assert "b0\\u001b]0;owned\\u0007@test.example is on the suppression list" in err


def test_a_message_failed_after_its_last_attempt_gets_its_attempts_again_when_resent(
    db_url: str, tmp_path: Path, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given a message failed after its two attempts (sending.max_attempts = 2), both a 451 from the relay
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")
    address = BROKEN[0]
    smtp_server.on(address, Behaviour(rcpt_reply="451 4.3.0 queue file write error"))
    raw = settings_dict(db_url, smtp_server.port, max_attempts=2)
    shop = Shop(db_url, settings_from_dict(raw, base_dir=REPO), [address])
    monkeypatch.setattr(ledger_command, "SystemClock", lambda: shop.clock)
    config = write_config(tmp_path / "config.toml", raw)
    try:
        shop.cycle()
        shop.clock.set(shop.row(address).next_attempt_at)
        shop.cycle()
        assert (shop.row(address).status, shop.row(address).attempts) == ("failed", 2)
        # When the operator resends it and the relay, not quite mended, refuses it once more
        assert kembali(config, "resend", str(shop.row(address).id)) == 0
        shop.clock.advance(1)
        shop.cycle()
        # Then it is retried later, as a new message would be (it failed at once: its third attempt was past
        # max_attempts, so a resend after an outage had one chance, without backoff)
        row = shop.row(address)
        assert (row.status, row.attempts) == ("retry", 3), (row.status, row.last_error)
        smtp_server.on(address, Behaviour())
        shop.clock.set(row.next_attempt_at)
        shop.cycle()
        assert shop.row(address).status == "sent"
        assert [a.outcome for a in shop.attempts(address)] == ["transient", "transient", "operator", "transient",
                                                               "sent"]  # fmt: skip
    finally:
        shop.close()


def test_one_customers_rows_by_address_or_customer_id_on_each_database(
    incident: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given five failed rows, and support asking about one customer by address and another by customer ID
    shop, config = incident
    before = [shop.row(a).last_error for a in BROKEN]

    # When the operator closes one address's rows, typed in capitals
    assert kembali(config, "close", "--email", BROKEN[1].upper(), "--reason", "asked us to stop") == 0
    capsys.readouterr()
    # Then that row alone is closed
    after = [shop.row(a).last_error for a in BROKEN]
    assert after == [before[0], "operator closed as failed: asked us to stop", *before[2:]]

    # And a customer's rows are listed by the shop's ID, whatever their status
    assert kembali(config, "list", "--all", "--customer", "C4", "--json") == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert (json.loads(line)["email"], json.loads(line)["last_code"]) == (DISABLED, 550)


def test_a_bulk_resend_dry_run_over_more_rows_than_one_statement_takes_counts_them_all(
    incident: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a day-long relay outage's 66,000 failed messages besides the incident's (554, each to its own address):
    # more ids than PostgreSQL takes parameters in one statement (65,535), more addresses than SQLite does (32,766)
    shop, config = incident
    now, many = shop.clock.now(), 66_000
    customer = shop.row(BROKEN[0]).customer_id
    rows = [
        {"dedupe_key": f"outage:{i}", "campaign": "winback", "step": 1, "priority": 0, "customer_id": customer,
         "email": f"o{i}@outage.example", "status": "failed", "due_at": now, "expires_at": now + timedelta(days=14),
         "next_attempt_at": now, "attempts": 1, "last_code": 554, "payload": "{}", "created_at": now,
         "updated_at": now}
        for i in range(many)
    ]  # fmt: skip
    engine = sa.create_engine(shop.settings.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.insert(M), rows)
    finally:
        engine.dispose()
    # When the operator counts what a resend by code would take
    assert kembali(config, "resend", "--code", "554", "--dry-run") == 0
    # Then it counts every one, and changes nothing
    out = capsys.readouterr().out
    assert f"dry run: nothing changed; {many + len(BROKEN)} message(s) would be back in the queue" in out
    assert {shop.row(a).status for a in BROKEN} == {"failed"}


def test_a_list_limit_past_what_a_database_counts_to_is_a_usage_error(
    incident: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the incident's failed rows; when the operator asks for more rows than a database can count
    _, config = incident
    with pytest.raises(SystemExit) as exit_info:
        kembali(config, "list", "--limit", str(2**63))
    # Then it is a usage error naming the option (SQLite raised OverflowError, PostgreSQL 'bigint out of range',
    # each a traceback), and the largest limit lists them all
    assert exit_info.value.code == 2
    assert "argument --limit: must be from 1 to 9223372036854775807" in capsys.readouterr().err
    assert kembali(config, "list", "--limit", str(2**63 - 1)) == 0
    out = capsys.readouterr().out
    assert all(a in out for a in [*BROKEN, DISABLED])


def test_a_bulk_resend_leaves_out_what_an_operator_closed_but_a_resend_by_id_takes_it(
    incident: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given four messages the broken relay refused, one of which the operator has since closed as failed (the
    # customer asked by phone not to get it)
    shop, config = incident
    closed = shop.row(BROKEN[0]).id
    assert kembali(config, "close", str(closed), "--reason", "customer asked by phone") == 0
    capsys.readouterr()

    # When the operator resends the relay's refusals by filter, a dry run first
    assert kembali(config, "resend", "--code", "554", "--dry-run") == 0
    out = capsys.readouterr().out
    # Then the closed one is left out, and the operator is told so and how to take it after all
    assert "dry run: nothing changed; 3 message(s) would be back in the queue" in out
    assert f"1 message(s) an operator closed left out (resend them by ID to send them after all): {closed}" in out
    assert kembali(config, "resend", "--code", "554") == 0
    capsys.readouterr()
    assert [shop.row(a).status for a in BROKEN] == ["failed", "retry", "retry", "retry"]
    assert shop.row(BROKEN[0]).last_error == "operator closed as failed: customer asked by phone"

    # And named by its ID, it is resent: the operator changed their mind
    assert kembali(config, "resend", str(closed)) == 0
    assert shop.row(BROKEN[0]).status == "retry"
