"""`kembali ledger`: an operator lists uncertain and failed messages, then resends or closes them."""

from __future__ import annotations

import contextlib
import json
import shlex
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.sendkit import Shop, make_settings, message_ids, settings_dict, write_config
from tests.smtp_server import Behaviour, RecordingServer
from worker import cli
from worker.adapters.importer import normalize_email
from worker.adapters.store import M
from worker.commands import ledger as ledger_command
from worker.core.audiences import message_id_for
from worker.domain import PlannedMessage

DROP, GONE, OK = "drop@test.example", "gone@test.example", "ok@test.example"


@pytest.fixture
def world(tmp_path: Path, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Shop, Path]]:
    """Given one uncertain message (dropped after the dot), one failed (550) and one sent."""
    yield from _world(f"sqlite:///{tmp_path / 'ledger.db'}", tmp_path, smtp_server, monkeypatch)


@pytest.fixture
def world_on_either(
    db_url: str, tmp_path: Path, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Shop, Path]]:
    """``world`` on SQLite and on PostgreSQL."""
    yield from _world(db_url, tmp_path, smtp_server, monkeypatch)


def _world(
    url: str, tmp_path: Path, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Shop, Path]]:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")
    smtp_server.on(DROP, Behaviour(drop_after_dot=True))
    smtp_server.on(GONE, Behaviour(rcpt_reply="550 5.2.1 Mailbox disabled"))
    shop = Shop(url, make_settings(url, smtp_server.port), [DROP, GONE, OK])
    # the operator acts at the shop's time: a resend refuses a message past its expiry (two weeks after NOW)
    monkeypatch.setattr(ledger_command, "SystemClock", lambda: shop.clock)
    shop.cycle()
    config = write_config(tmp_path / "config.toml", settings_dict(url, smtp_server.port))
    try:
        yield shop, config
    finally:
        shop.close()


def kembali(config: Path, *args: str) -> int:
    return cli.main(["--config", str(config), "ledger", *args])


def test_list_shows_what_needs_a_decision(world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]) -> None:
    shop, config = world

    assert kembali(config, "list") == 0
    out = capsys.readouterr().out
    assert "uncertain" in out and DROP in out
    assert "failed" in out and GONE in out and "550 5.2.1 Mailbox disabled" in out
    assert OK not in out
    assert "ledger: 1 failed, 1 sent, 1 uncertain" in out

    assert kembali(config, "list", "--status", "uncertain", "--json") == 0
    (line,) = capsys.readouterr().out.splitlines()
    row = json.loads(line)
    assert (row["email"], row["status"], row["attempts"], row["last_code"]) == (DROP, "uncertain", 1, None)
    assert row["message_id"] == shop.row(DROP).message_id


def test_resend_puts_the_message_back_with_the_same_message_id(
    world: tuple[Shop, Path], smtp_server: RecordingServer, capsys: pytest.CaptureFixture[str]
) -> None:
    shop, config = world
    uncertain = shop.row(DROP)
    smtp_server.on(DROP, Behaviour())

    assert kembali(config, "resend", str(uncertain.id), "--reason", "customer says it never came") == 0
    assert "1 message(s) back in the queue" in capsys.readouterr().out
    row = shop.row(DROP)
    assert row.status == "retry"
    assert row.last_error == "operator resend: customer says it never came"
    assert shop.attempts(DROP)[-1].outcome == "operator"
    assert shop.attempts(DROP)[-1].worker.startswith("operator:")

    shop.clock.set(row.next_attempt_at)
    shop.cycle()
    assert shop.row(DROP).status == "sent"
    assert [a.outcome for a in shop.attempts(DROP)] == ["ambiguous", "operator", "sent"]
    # the operator chose to send it again: the same Message-ID twice, so mail clients can tell
    assert message_ids(smtp_server.messages)[uncertain.message_id] == 2


def test_close_marks_final_with_a_note(world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]) -> None:
    shop, config = world

    assert kembali(config, "close", str(shop.row(DROP).id), "--as", "sent", "--reason", "seen in the mailbox") == 0
    assert kembali(config, "close", str(shop.row(GONE).id)) == 0
    capsys.readouterr()

    assert (shop.row(DROP).status, shop.row(DROP).last_error) == (
        "sent",
        "operator closed as sent: seen in the mailbox",
    )
    assert shop.row(DROP).sent_at is not None
    assert (shop.row(GONE).status, shop.row(GONE).last_error) == ("failed", "operator closed as failed")
    assert [a.outcome for a in shop.attempts(GONE)] == ["permanent", "operator"]


def test_rows_that_are_not_decidable_are_left_alone(
    world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    shop, config = world

    assert kembali(config, "resend", str(shop.row(OK).id), "999999") == 1
    err = capsys.readouterr().err
    assert f"message {shop.row(OK).id} left alone: is sent" in err
    assert "message 999999 left alone: no such message" in err
    assert shop.row(OK).status == "sent"


@pytest.mark.parametrize(("reason", "advice"), [
    ("hard_bounce", "`kembali suppress remove {email}` first if it should go"),
    # the customer's own wish: not an entry to clear to get a message out
    ("complaint", "the customer asked for no more email: `kembali ledger close {id}` it instead"),
    ("unsubscribed", "the customer asked for no more email: `kembali ledger close {id}` it instead"),
])  # fmt: skip
def test_a_message_to_a_suppressed_address_is_not_put_back_in_the_queue(
    world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str], reason: str, advice: str
) -> None:
    # Given a failed message whose address is now on the suppression list (a hard bounce, an unsubscribe)
    shop, config = world
    failed = shop.row(GONE)
    assert cli.main(["--config", str(config), "suppress", "add", GONE.upper(), "--reason", reason]) == 0
    capsys.readouterr()

    # When the operator resends it, it is refused, saying why and what to do; the row keeps its reply
    # (it said "1 message(s) back in the queue (sent at the next run)", and the next run skipped it as
    # suppressed, its 550 overwritten)
    assert kembali(config, "resend", str(failed.id), str(shop.row(DROP).id)) == 1
    captured = capsys.readouterr()
    assert (f"message {failed.id} left alone: {GONE} is on the suppression list ({reason}), so the next run "
            f"would skip it; {advice.format(email=GONE, id=failed.id)}") in captured.err
    assert f"1 message(s) back in the queue (sent at the next run): {shop.row(DROP).id}" in captured.out
    row = shop.row(GONE)
    assert (row.status, row.last_code) == ("failed", 550)

    # Then, once the address is off the list, it can be resent
    assert cli.main(["--config", str(config), "suppress", "remove", GONE]) == 0
    assert kembali(config, "resend", str(failed.id)) == 0
    assert shop.row(GONE).status == "retry"


def test_a_resend_to_an_address_an_earlier_version_suppressed_as_typed_is_advised_as_the_customers_wish(
    world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a failed message whose address an earlier kembali suppressed as typed: 'Unsubscribed'
    shop, config = world
    failed = shop.row(GONE)
    shop.store.suppress(GONE, reason="Unsubscribed", source="cli", now=datetime.now(UTC))

    # When the operator resends it
    assert kembali(config, "resend", str(failed.id)) == 1

    # Then it is refused with the advice for the customer's own wish, not to clear the entry as for a bounce
    err = capsys.readouterr().err
    assert f"the customer asked for no more email: `kembali ledger close {failed.id}` it instead" in err, err
    assert "suppress remove" not in err, err


def test_a_skipped_row_is_listed_with_why_it_was_skipped(
    world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an uncertain message resent, whose customer unsubscribed before the next run
    shop, config = world
    assert kembali(config, "resend", str(shop.row(DROP).id)) == 0
    assert cli.main(["--config", str(config), "suppress", "add", DROP, "--reason", "unsubscribed"]) == 0
    shop.clock.set(shop.row(DROP).next_attempt_at)
    shop.cycle()
    assert (shop.row(DROP).status, shop.row(DROP).skip_reason) == ("skipped", "suppressed")
    capsys.readouterr()

    # Then the list says why it was skipped (it said "operator resend", the note before, as if still queued)
    assert kembali(config, "list", "--status", "skipped") == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if DROP in line]
    assert line.endswith("skipped: suppressed"), line


def test_an_id_past_what_a_database_holds_is_no_such_message(
    world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    shop, config = world
    huge = "99999999999999999999"  # past 2**63 - 1: SQLite raised "Python int too large to convert to SQLite INTEGER"

    assert kembali(config, "resend", huge, str(shop.row(DROP).id)) == 1
    captured = capsys.readouterr()
    assert f"message {huge} left alone: no such message" in captured.err and "Traceback" not in captured.err
    assert f"1 message(s) back in the queue (sent at the next run): {shop.row(DROP).id}" in captured.out
    assert kembali(config, "close", f"-{huge}") == 1
    assert f"message -{huge} left alone: no such message" in capsys.readouterr().err


def test_the_table_stays_aligned_with_a_long_campaign_name(
    world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    shop, config = world
    with shop.store.engine.begin() as conn:  # the CAMPAIGN column was 9 wide: new_products pushed its row right
        conn.execute(sa.update(M).where(M.c.email == GONE).values(campaign="new_products"))

    assert kembali(config, "list", "--all") == 0
    lines = capsys.readouterr().out.split("\n\n")[0].splitlines()
    header, rows = lines[0], lines[1:]
    assert len(rows) == 3 and any("new_products" in line for line in rows)
    for name in ("STATUS", "CAMPAIGN", "EMAIL", "LAST REPLY"):
        column = header.index(name)
        assert all(line[column - 2 : column] == "  " and line[column] != " " for line in rows), (name, lines)
    tries_end = header.index("TRIES") + len("TRIES")
    assert all(line[tries_end - 1] == "1" and line[tries_end] == " " for line in rows), lines


def test_a_note_with_a_line_break_is_refused_and_nothing_is_touched(
    world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    shop, config = world
    before = shop.row(DROP).status
    with pytest.raises(SystemExit) as exit_info:
        kembali(config, "close", str(shop.row(DROP).id), "--reason", "checked\nwith the provider")
    assert exit_info.value.code == 2
    assert "argument --reason: must be one line of text without control characters" in capsys.readouterr().err
    assert shop.row(DROP).status == before



HOSTILE_REPLY = "550 5.1.1 said: \x1b]0;owned\x07\x1b[2J\rgone"
"""A reply the relay passes on from a hostile recipient's server: a window-title escape, clear-screen and a
carriage return (an SMTP reply is ASCII)."""
HOSTILE_ERROR = "ValueError: Invalid isoformat string: 'Budi\x9b31m \u202efdp.exe\u2028next'"
"""A render error quoting a customer's name: an 8-bit CSI, a right-to-left override and a line separator."""
RAW_CONTROLS = ("\x1b", "\x07", "\r", "\x9b", "\u202e", "\u2028")


def test_replies_and_errors_with_terminal_escapes_are_listed_escaped(
    tmp_path: Path, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a message failed with a reply full of control characters (the recipient's server chose its text),
    # and one whose error quotes a customer's name with others
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    smtp_server.on(GONE, Behaviour(rcpt_reply=HOSTILE_REPLY))
    smtp_server.on(DROP, Behaviour(rcpt_reply="550 5.1.1 no"))
    shop = Shop(url, make_settings(url, smtp_server.port), [GONE, DROP])
    try:
        shop.cycle()
        assert shop.row(GONE).status == "failed" and "\x1b]0;owned" in (shop.row(GONE).last_reply or "")
        with shop.store.engine.begin() as conn:
            conn.execute(sa.update(M).where(M.c.email == DROP).values(last_reply=None, last_error=HOSTILE_ERROR))
    finally:
        shop.close()
    config = write_config(tmp_path / "config.toml", settings_dict(url, smtp_server.port))

    # When the operator lists them, as a table and as JSON lines
    for args in ((), ("--json",)):
        assert kembali(config, "list", *args) == 0
        out = capsys.readouterr().out
        # Then no control character reaches the terminal: each is shown escaped, the rest as it is
        assert not any(ch in out for ch in RAW_CONTROLS), repr(out)
        assert "said: \\u001b]0;owned\\u0007" in out and "\\u202efdp.exe\\u2028next" in out
        if args:  # still valid JSON, holding the text exactly
            rows = {row["email"]: row for row in map(json.loads, out.splitlines())}
            assert (rows[GONE]["last_reply"], rows[DROP]["last_error"]) == (HOSTILE_REPLY, HOSTILE_ERROR)


def test_a_failed_message_closed_as_sent_counts_as_sent_when_it_was_tried(
    world_on_either: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a message that failed (the server refused it), which the operator then finds in the customer's mailbox
    shop, config = world_on_either
    failed = shop.row(GONE)
    assert failed.status == "failed" and failed.sent_at is None
    tried = shop.attempts(GONE)[-1].started_at
    # When they close it as sent, two days later
    shop.clock.advance(2 * 86400)
    assert kembali(config, "close", str(failed.id), "--as", "sent") == 0
    capsys.readouterr()
    # Then it counts as sent when it was tried (for the frequency cap and the stats), not when it was closed
    assert shop.row(GONE).sent_at == tried


def test_a_decision_made_again_is_a_no_op_that_says_so(
    world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an uncertain message the operator has put back in the queue, and one closed as sent
    shop, config = world
    uncertain, failed = shop.row(DROP), shop.row(GONE)
    assert kembali(config, "resend", str(uncertain.id), "--reason", "never came") == 0
    assert kembali(config, "close", str(failed.id), "--as", "sent") == 0
    capsys.readouterr()
    due = shop.row(DROP).next_attempt_at
    # When the same commands are run again (a runbook step retried, a second operator)
    code = kembali(config, "resend", str(uncertain.id), "--reason", "never came")
    again = capsys.readouterr()
    # Then nothing changes and it says so, exiting 0: what was asked is what the ledger holds (it exited 1 with
    # "left alone: is retry; only uncertain or failed messages can be changed", as if the resend had failed)
    assert (code, again.err) == (0, ""), again
    assert again.out.strip() == (f"message {uncertain.id} is already back in the queue (next attempt "
                                 f"{due:%Y-%m-%d %H:%M} UTC): nothing changed")  # fmt: skip
    assert (shop.row(DROP).status, shop.row(DROP).next_attempt_at) == ("retry", due)
    assert [a.outcome for a in shop.attempts(DROP)] == ["ambiguous", "operator"]
    code = kembali(config, "close", str(failed.id), "--as", "sent")
    again = capsys.readouterr()
    assert (code, again.err, again.out.strip()) == (0, "", f"message {failed.id} is already sent: nothing changed")
    assert [a.outcome for a in shop.attempts(GONE)] == ["permanent", "operator"]
    # and a row in another state than the one asked for is still refused (exit 1)
    assert kembali(config, "close", str(failed.id), "--as", "failed") == 1
    assert (f"message {failed.id} left alone: is sent; only uncertain, failed, planned or retry messages can be "
            "changed") in capsys.readouterr().err


def test_a_close_as_failed_made_again_is_a_no_op_that_says_so(
    world_on_either: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a failed message the operator has closed as failed, with a note
    shop, config = world_on_either
    failed = shop.row(GONE)
    assert kembali(config, "close", str(failed.id), "--reason", "mailbox gone") == 0
    capsys.readouterr()
    changed = shop.row(GONE).updated_at
    # When the same close is run again, by its ID and by a filter that takes it (a runbook step retried)
    for args in ((str(failed.id),), ("--code", "550")):
        code = kembali(config, "close", *args, "--reason", "mailbox gone")
        again = capsys.readouterr()
        # Then nothing changes and it says so, as a close as sent run twice does: it said "1 message(s) closed as
        # failed" each time, writing another operator attempt and moving the row's change to now
        assert (code, again.err) == (0, ""), again
        assert again.out.strip() == f"message {failed.id} is already closed as failed: nothing changed"
    assert [a.outcome for a in shop.attempts(GONE)] == ["permanent", "operator"]
    assert shop.row(GONE).updated_at == changed
    # and a filter taking several such rows says so in one line, not one a row (a campaign's thousands)
    uncertain = shop.row(DROP).id
    assert kembali(config, "close", str(uncertain), "--reason", "mailbox gone") == 0
    capsys.readouterr()
    assert kembali(config, "close", "--status", "failed", "--reason", "mailbox gone") == 0
    assert capsys.readouterr().out.strip() == (
        f"2 message(s) already closed as failed: nothing changed: {' '.join(map(str, sorted([failed.id, uncertain])))}")
    # and a close with another note still takes it (the operator's decision, said again in other words)
    assert kembali(config, "close", str(failed.id), "--reason", "customer confirmed by phone") == 0
    assert shop.row(GONE).last_error == "operator closed as failed: customer confirmed by phone"


def test_an_empty_list_names_the_campaign_it_was_filtered_by(
    world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a ledger whose rows are all win-back emails, one of them uncertain and one failed
    _shop, config = world
    # When the operator lists a campaign's rows with its name misspelt, or a campaign without such rows
    assert kembali(config, "list", "--campaign", "winbak") == 0
    misspelt = capsys.readouterr().out.strip()
    assert kembali(config, "list", "--campaign", "winback", "--status", "retry") == 0
    none = capsys.readouterr().out.strip()
    # Then it says which campaign it looked in, and that the ledger has none by that name (it said "no messages
    # with status uncertain, failed", as if there were none in the whole ledger)
    assert misspelt == ("no messages with status uncertain, failed in campaign 'winbak' (the ledger has no "
                        "campaign 'winbak'; its campaigns: winback)")  # fmt: skip
    assert none == "no messages with status retry in campaign 'winback'"


def test_an_id_given_twice_is_decided_once(world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]) -> None:
    shop, config = world
    uncertain = shop.row(DROP).id
    # When the same id is given twice (pasted twice from `ledger list`)
    code = kembali(config, "resend", str(uncertain), str(uncertain))
    captured = capsys.readouterr()
    # Then it is resent once, and nothing is refused (the second was "left alone: changed meanwhile; try again",
    # exit 1, though the first had just done it)
    assert (code, captured.err) == (0, ""), captured
    assert captured.out.strip() == f"1 message(s) back in the queue (sent at the next run): {uncertain}"
    assert [a.outcome for a in shop.attempts(DROP)] == ["ambiguous", "operator"]


def test_a_reply_with_control_characters_reaches_the_terminal_escaped(
    world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a failed message whose server reply carries a terminal escape (retitling the window) and a bell
    shop, config = world
    with shop.store.engine.begin() as conn:
        conn.execute(sa.update(M).where(M.c.email == GONE).values(last_reply="550 \x1b]0;owned\x07 no such user"))
    # When the operator lists the ledger
    assert kembali(config, "list") == 0
    out = capsys.readouterr().out
    # Then the reply is shown with its control characters escaped, not sent to the terminal as they are
    assert "\x1b" not in out and "\x07" not in out
    assert "550 \\u001b]0;owned\\u0007 no such user" in out


def test_a_list_cut_short_by_the_limit_says_so(world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]) -> None:
    # Given an uncertain and a failed message
    _shop, config = world
    # When the operator lists them with a limit of one
    assert kembali(config, "list", "--limit", "1") == 0
    out = capsys.readouterr().out
    # Then it says that one more needs a decision (the table showed one row, and nothing said a second existed)
    assert f"1 of 2 messages shown (the newest); the next: kembali --config {config} ledger list --limit 1 " \
        "--after " in out
    assert kembali(config, "list", "--limit", "2") == 0
    assert "shown" not in capsys.readouterr().out


def _next_page(said: str) -> list[str] | None:
    """The command a list says shows the next page (without its ``kembali``), or None when it says none."""
    for line in said.splitlines():
        if "; the next: kembali " in line:
            return shlex.split(line.split("; the next: kembali ", 1)[1])
    return None


def _ids(table: str) -> list[int]:
    return [int(line.split()[0]) for line in table.split("\n\n")[0].splitlines()[1:]]


def test_the_next_page_of_a_list_is_the_command_it_says_and_every_row_is_on_one_page(
    world_on_either: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given three messages (uncertain, failed, sent), changed at the same moment (the shop's clock)
    _shop, config = world_on_either
    assert kembali(config, "list", "--all") == 0
    every = _ids(capsys.readouterr().out)
    assert len(every) == 3
    # When the operator lists every status one at a time, and runs the command each page says shows the next
    assert kembali(config, "list", "--all", "--limit", "1") == 0
    said = capsys.readouterr().out
    pages, shown = [_ids(said)], [said]
    while (command := _next_page(said)) is not None and len(pages) < 5:
        assert cli.main(command) == 0
        said = capsys.readouterr().out
        pages.append(_ids(said))
        shown.append(said)
    # Then each page holds the next row, newest change first, every row once, and the last page names no next
    assert pages == [[every[0]], [every[1]], [every[2]]], shown
    assert f"1 of 3 messages shown (the newest); the next: kembali --config {config} ledger list --all --limit 1 " \
        f"--after {every[0]}" in shown[0]
    assert f"1 of the 2 messages after message {every[0]} shown; the next: kembali --config {config} ledger list " \
        f"--all --limit 1 --after {every[1]}" in shown[1]
    assert "shown" not in shown[2]
    # And a filter is kept in the next page's command; --json says it on stderr, its output staying JSON lines
    assert kembali(config, "list", "--status", "failed", "--status", "uncertain", "--json", "--limit", "1") == 0
    captured = capsys.readouterr()
    (line,) = captured.out.splitlines()
    first, changed = json.loads(line)["id"], json.loads(line)["updated_at"]
    assert captured.err.strip() == (
        f"kembali ledger list: 1 of 2 messages shown (the newest); the next: kembali --config {config} ledger list "
        f"--status failed --status uncertain --limit 1 --json --after {first}@{changed}")
    assert cli.main(shlex.split(captured.err.split("the next: kembali ")[1])) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["id"] for line in captured.out.splitlines()] != [first] and captured.err == ""


@pytest.mark.parametrize(
    ("value", "says"),
    [("x", "argument --after: not a whole number: 'x'"),
     ("0", "argument --after: must be from 1 to 9223372036854775807, not 0"),
     ("999", "kembali ledger list: --after 999: no message 999 in the ledger (give an ID a list showed)")],
)
def test_a_next_page_after_no_message_is_refused_with_exit_2(
    world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str], value: str, says: str
) -> None:
    _shop, config = world
    with pytest.raises(SystemExit) if value != "999" else contextlib.nullcontext() as stopped:
        code = kembali(config, "list", "--all", "--after", value)
    captured = capsys.readouterr()
    assert (stopped.value.code if stopped is not None else code) == 2, captured
    assert says in captured.err and captured.out == "", captured


def test_list_help_tells_how_to_see_the_next_page(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["ledger", "list", "--help"])
    assert stopped.value.code == 0
    assert "--after ID" in " ".join(capsys.readouterr().out.split())


def test_list_help_says_its_default_leaves_out_what_an_operator_closed(capsys: pytest.CaptureFixture[str]) -> None:
    # `ledger list --help` gave --status's default as "uncertain and failed", and a plain list left out the failed
    # messages an operator closed, which `--status failed` then listed: the same words, two lists
    with pytest.raises(SystemExit):
        cli.main(["ledger", "list", "--help"])
    said = " ".join(capsys.readouterr().out.split())
    assert "(repeatable; default: uncertain and failed, not those an operator closed)" in said


def test_what_one_customer_was_sent_by_address_or_customer_id(
    world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given three customers' messages (C0 uncertain, C1 failed, C2 sent), and support asking about two of them
    shop, config = world

    # When the operator lists every status for one address, typed in another case
    assert kembali(config, "list", "--all", "--email", OK.upper()) == 0
    lines = capsys.readouterr().out.split("\n\n")[0].splitlines()
    # Then only that mailbox's row is listed, with when it last changed
    assert len(lines) == 2 and OK in lines[1] and "sent" in lines[1], lines
    changed = shop.row(OK).updated_at
    assert "CHANGED (UTC)" in lines[0] and f"{changed:%Y-%m-%d %H:%M}" in lines[1], lines

    # And by the shop's customer ID, the same
    assert kembali(config, "list", "--all", "--customer", "C1", "--json") == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["email"] == GONE

    # And a resend can take the customer's undecided rows by the same filter
    assert kembali(config, "resend", "--customer", "C0", "--dry-run") == 0
    out = capsys.readouterr().out
    assert f"1 message(s) would be back in the queue (sent at the next run): {shop.row(DROP).id}" in out
    assert shop.row(DROP).status == "uncertain"


def test_an_unknown_customer_or_a_mistyped_address_is_said_so(
    world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _shop, config = world

    assert kembali(config, "list", "--customer", "C-404") == 2
    assert "no customer 'C-404' in the shop" in capsys.readouterr().err
    # an id in the wrong case is answered with the one meant (it said only "no customer 'c1' in the shop")
    assert kembali(config, "list", "--customer", "c1") == 2
    assert "kembali ledger list: no customer 'c1' in the shop; did you mean 'C1'?" in capsys.readouterr().err

    assert kembali(config, "list", "--all", "--email", "nobody@test.example") == 0
    assert capsys.readouterr().out.startswith("no messages to nobody@test.example")

    with pytest.raises(SystemExit) as stopped:
        kembali(config, "list", "--email", "not-an-address")
    assert stopped.value.code == 2
    assert "--email: not an email address: 'not-an-address'" in capsys.readouterr().err


def test_a_waiting_row_says_when_it_is_tried_next(world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]) -> None:
    # Given a message deferred by the frequency cap (planned, due in three days) and one waiting to retry a 421
    shop, config = world
    later = shop.clock.now() + timedelta(days=3)
    with shop.store.engine.begin() as conn:
        conn.execute(sa.update(M).where(M.c.email == OK).values(
            status="planned", next_attempt_at=later, attempts=0, last_code=None, last_reply=None, sent_at=None))
        conn.execute(sa.update(M).where(M.c.email == GONE).values(
            status="retry", next_attempt_at=later, last_code=421, last_reply="421 4.7.0 Try again later"))

    # When the operator lists them
    assert kembali(config, "list", "--status", "planned", "--status", "retry") == 0
    out = capsys.readouterr().out

    # Then each says when it goes next, and the retry its last reply too
    (planned,) = [line for line in out.splitlines() if OK in line]
    assert planned.endswith(f"next try {later:%Y-%m-%d %H:%M} UTC"), planned
    (retry,) = [line for line in out.splitlines() if GONE in line]
    assert retry.endswith(f"next try {later:%Y-%m-%d %H:%M} UTC; 421 4.7.0 Try again later"), retry


@pytest.mark.parametrize(
    "option, moment", [("--since", "0001-01-01T00:00+05:00"), ("--until", "9999-12-31T23:00-05:00")]
)
def test_a_moment_outside_the_years_a_date_holds_in_utc_is_a_usage_error(
    world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str], option: str, moment: str
) -> None:
    # Given a moment whose offset takes it, in UTC, before year 1 or past year 9999
    _, config = world
    # When the operator filters by it, Then it is a usage error naming the option, not an OverflowError traceback
    with pytest.raises(SystemExit) as exit_info:
        kembali(config, "list", option, moment)
    assert exit_info.value.code == 2
    assert f"argument {option}: not a moment in years 1 to 9999 in UTC: {moment!r}" in capsys.readouterr().err


def test_an_address_with_an_internationalised_domain_is_found_as_the_csv_wrote_it(
    tmp_path: Path, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a customer whose customers.csv address has a Unicode domain, stored as the import stores it
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    stored = normalize_email("sari@tokó.example")
    shop = Shop(url, make_settings(url, smtp_server.port), [stored])
    try:
        shop.cycle()
        config = write_config(tmp_path / "config.toml", settings_dict(url, smtp_server.port))
        # When support asks what she got, typing the address as the CSV (and her email) shows it, in any case
        for typed in ("sari@tokó.example", "SARI@TOKÓ.EXAMPLE"):
            assert kembali(config, "list", "--all", "--email", typed, "--json") == 0
            # Then her sent win-back is listed, not "no messages to sari@tokó.example"
            (line,) = capsys.readouterr().out.splitlines()
            assert (json.loads(line)["email"], json.loads(line)["status"]) == (stored, "sent")
    finally:
        shop.close()


def test_a_next_page_is_where_the_page_ended_when_its_last_row_changed_meanwhile(
    world_on_either: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given three messages, and a page of the two newest
    shop, config = world_on_either
    assert kembali(config, "list", "--all") == 0
    every = _ids(capsys.readouterr().out)
    assert kembali(config, "list", "--all", "--limit", "2") == 0
    said = capsys.readouterr().out
    assert _ids(said) == every[:2]
    command = _next_page(said)
    assert command is not None
    # When the page's last row changes before the next page is listed (the daemon retries it, an operator decides it)
    with shop.store.engine.begin() as conn:
        changed = conn.execute(sa.select(M.c.updated_at).where(M.c.id == every[1])).scalar_one()
        conn.execute(sa.update(M).where(M.c.id == every[1]).values(updated_at=changed + timedelta(hours=1)))
    assert cli.main(command) == 0
    # Then the next page is the row after the page, not the page again (the changed row moved to the top)
    assert _ids(capsys.readouterr().out) == every[2:]


def test_a_page_after_the_last_row_says_there_are_none_after_it_not_none_at_all(
    world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an uncertain and a failed message, listed
    _shop, config = world
    assert kembali(config, "list") == 0
    every = _ids(capsys.readouterr().out)
    assert len(every) == 2
    # When the operator lists the page after the last of them (its rows resent meanwhile, say)
    assert kembali(config, "list", "--after", str(every[-1])) == 0
    # Then the list says none are left after it, not that the ledger has none needing a decision
    said = capsys.readouterr().out.strip()
    assert said == f"no messages with status uncertain, failed after message {every[-1]}", said


def test_list_all_with_a_status_lists_that_status(world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]) -> None:
    # --all overrode --status: `list --all --status sent` listed the uncertain and failed rows too
    assert kembali(config := world[1], "list", "--all", "--status", "sent", "--json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(row["email"], row["status"]) for row in rows] == [(OK, "sent")]
    assert kembali(config, "list", "--all", "--json") == 0  # --all alone: every status
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_a_planned_or_retrying_message_is_cancelled_by_closing_it_and_never_sent(
    world: tuple[Shop, Path], smtp_server: RecordingServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a message planned for three days on (deferred by the cap) and one waiting to retry a 421
    shop, config = world
    later = shop.clock.now() + timedelta(days=3)
    with shop.store.engine.begin() as conn:
        conn.execute(sa.update(M).where(M.c.email == OK).values(
            status="planned", next_attempt_at=later, attempts=0, last_code=None, last_reply=None, sent_at=None))
        conn.execute(sa.update(M).where(M.c.email == GONE).values(
            status="retry", next_attempt_at=later, last_code=421, last_reply="421 4.7.0 Try again later"))
    planned, retrying = shop.row(OK), shop.row(GONE)
    smtp_server.on(GONE, Behaviour())
    sent_before = len(smtp_server.messages)

    # When the operator closes them as sent, that is refused: they never left (it said "is planned; only
    # uncertain or failed messages can be changed", and no command could stop one message)
    assert kembali(config, "close", str(planned.id), "--as", "sent") == 1
    assert (f"message {planned.id} left alone: is planned; a planned or retrying message can only be closed as "
            "failed (it was not sent)") in capsys.readouterr().err
    # and a dry run by filters names them without changing them
    assert kembali(config, "close", "--status", "planned", "--status", "retry", "--dry-run") == 0
    assert "2 message(s) would be closed as failed" in capsys.readouterr().out
    assert shop.row(OK).status == "planned"
    # When they are closed (as failed, the default)
    assert kembali(config, "close", str(planned.id), str(retrying.id), "--reason", "wrong offer") == 0
    assert f"2 message(s) closed as failed: {planned.id} {retrying.id}" in capsys.readouterr().out

    # Then they are final with the operator's note, and when they fall due nothing is sent
    assert (shop.row(OK).status, shop.row(OK).last_error) == ("failed", "operator closed as failed: wrong offer")
    assert shop.row(GONE).status == "failed"
    assert shop.attempts(OK)[-1].outcome == "operator"
    shop.clock.set(later + timedelta(hours=1))
    shop.cycle()
    assert len(smtp_server.messages) == sent_before
    assert (shop.row(OK).status, shop.row(GONE).status) == ("failed", "failed")
    # and a resend by filters leaves them out, as any message an operator closed
    assert kembali(config, "resend", "--status", "failed", "--dry-run") == 0
    assert "2 message(s) an operator closed left out" in capsys.readouterr().out
    # and the one never tried cannot be closed as sent afterwards (it was: "1 message(s) closed as sent", counted
    # as sent at the moment it was closed, for the cap and the stats)
    assert kembali(config, "close", str(planned.id), "--as", "sent") == 1
    assert (f"message {planned.id} left alone: was never handed to an SMTP server (0 tries), so it cannot have "
            "arrived") in capsys.readouterr().err
    assert (shop.row(OK).status, shop.row(OK).sent_at) == ("failed", None)


def test_a_message_a_worker_has_claimed_is_not_cancelled_by_closing_it(
    world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a message a worker has taken from the queue (claimed, its send under way)
    shop, config = world
    with shop.store.engine.begin() as conn:
        conn.execute(sa.update(M).where(M.c.email == OK).values(status="claimed", claimed_by="w1", sent_at=None))
    # When the operator closes it, Then it is left alone, saying which states a close takes
    assert kembali(config, "close", str(shop.row(OK).id)) == 1
    assert (f"message {shop.row(OK).id} left alone: is claimed; only uncertain, failed, planned or retry messages "
            "can be changed") in capsys.readouterr().err
    assert (shop.row(OK).status, shop.row(OK).claimed_by) == ("claimed", "w1")


def test_an_address_copied_with_its_name_finds_the_customers_messages(
    world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given support pasting the sender of a customer's email, as their mail client copies it (it was refused: "not
    # an email address"; `kembali suppress` takes it)
    _shop, config = world
    # When the operator lists that address's messages, Then they are the mailbox's
    assert kembali(config, "list", "--all", "--email", f'"Ok, Customer" <{OK.upper()}>', "--json") == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["email"] == OK


def test_a_message_an_operator_closed_leaves_the_list_of_what_needs_a_decision(
    world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the failed message closed by the operator (decided: nothing left to decide)
    shop, config = world
    assert kembali(config, "close", str(shop.row(GONE).id), "--reason", "address gone") == 0
    capsys.readouterr()
    # When the operator lists what needs a decision
    assert kembali(config, "list") == 0
    # Then only the uncertain message is there, where a cancelled campaign's closed rows filled the list
    out = capsys.readouterr().out
    assert DROP in out and GONE not in out
    # and a list that finds nothing else says the closed ones were left out, and how to see them
    shop_drop = shop.row(DROP).id
    assert kembali(config, "close", str(shop_drop)) == 0
    capsys.readouterr()
    assert kembali(config, "list") == 0
    assert capsys.readouterr().out.strip() == ("no messages with status uncertain, failed (2 closed by an operator "
                                               "not shown: --status failed lists them)")
    # and the closed ones are still found when asked for by status or with every row
    for asked in (["--status", "failed"], ["--all"]):
        assert kembali(config, "list", *asked) == 0
        assert GONE in capsys.readouterr().out


def test_a_campaign_cancelled_by_filters_is_closed_a_few_hundred_rows_a_statement(
    world_on_either: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given 1,200 new-products messages planned for the shop's three customers
    shop, config = world_on_either
    now = shop.clock.now()
    customers = {row.email: row.customer_id for row in (shop.row(DROP), shop.row(GONE), shop.row(OK))}
    emails = sorted(customers)
    shop.store.insert_messages([
        PlannedMessage(dedupe_key=f"new_products:x{i}", campaign="new_products", step=1,
                       customer_id=customers[emails[i % 3]], email=emails[i % 3], due_at=now + timedelta(days=1),
                       expires_at=now + timedelta(days=8), message_id=message_id_for(f"new_products:x{i}", "t.example"))
        for i in range(1200)], now)  # fmt: skip
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    # When the operator cancels the campaign by filters
    sa.event.listen(sa.engine.Engine, "before_cursor_execute", count)
    try:
        assert kembali(config, "close", "--status", "planned", "--campaign", "new_products") == 0
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", count)
    # Then every one is closed as failed, each with the operator's attempt row
    assert "1200 message(s) closed as failed" in capsys.readouterr().out
    with shop.store.engine.connect() as conn:
        statuses = conn.execute(sa.select(M.c.status, sa.func.count()).where(M.c.campaign == "new_products")
                                .group_by(M.c.status)).all()  # fmt: skip
        attempts = conn.execute(sa.text("SELECT count(*) FROM attempt WHERE outcome = 'operator'")).scalar_one()
    assert statuses == [("failed", 1200)] and attempts == 1200
    # in a few statements per few hundred rows, where it ran two per message in one transaction: SQLite's write
    # lock held for as long (20,000 rows: 31 s, past the 30 s a worker's write waits for it, failing its run)
    writes = [s for s in statements if s.lstrip().upper().startswith(("UPDATE", "INSERT"))]
    assert len(writes) <= 20, f"{len(writes)} writes"


@pytest.mark.parametrize("option", ["--customer", "--campaign"])
def test_an_empty_filter_is_refused_not_taken_as_every_row(
    world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str], option: str
) -> None:
    # Given an uncertain and a failed message, and a script closing one customer's, its variable empty
    # (`kembali ledger close --status uncertain --status failed --customer "$ID"`)
    shop, config = world

    # When it runs (it closed every customer's messages: an empty value was no filter at all)
    with pytest.raises(SystemExit) as stopped:
        kembali(config, "close", "--status", "uncertain", "--status", "failed", option, "")
    # Then it is refused, naming the option, and nothing changes
    assert stopped.value.code == 2
    assert f"{option}: must not be empty" in capsys.readouterr().err
    assert (shop.row(DROP).status, shop.row(GONE).status) == ("uncertain", "failed")

    # And a list with one (which listed every row) is refused the same way
    with pytest.raises(SystemExit) as stopped:
        kembali(config, "list", "--all", option, " ")
    assert stopped.value.code == 2

    # And so is an empty customer given to preview (which considered no one) or send-test (a sample customer)
    for command in (["preview"], ["send-test", "--campaign", "winback", "--to", OK]):
        with pytest.raises(SystemExit) as stopped:
            cli.main(["--config", str(config), *command, "--customer", ""])
        assert stopped.value.code == 2
        assert "--customer: must not be empty" in capsys.readouterr().err


def test_a_message_another_worker_holds_names_that_worker_and_when_its_lease_ends(
    world_on_either: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a message a worker sharing the database claimed, and then died holding (kill -9 on another host)
    shop, config = world_on_either
    now = shop.clock.now()
    customer = shop.row(OK).customer_id
    shop.store.insert_messages([
        PlannedMessage(dedupe_key="new_products:held", campaign="new_products", step=1, customer_id=customer,
                       email=OK, due_at=now, expires_at=now + timedelta(days=8),
                       message_id=message_id_for("new_products:held", "t.example"))], now)  # fmt: skip
    [held] = shop.store.claim(worker="shop-2:4242:1a2b3c", now=now, limit=10, lease_seconds=300)
    lease = now + timedelta(seconds=300)
    # When the operator looks at that customer's messages, and tries to cancel it
    assert kembali(config, "list", "--all", "--email", OK) == 0
    listed = capsys.readouterr().out
    assert kembali(config, "close", str(held.id)) == 1
    refused = capsys.readouterr().err
    assert kembali(config, "list", "--all", "--email", OK, "--json") == 0
    rows = {row["id"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    # Then each says which worker holds it and until when: with several hosts, whether it is under way or waits
    # for a dead worker's lease to lapse (it showed a bare `claimed`, and "left alone: is claimed")
    line = next(line for line in listed.splitlines() if line.lstrip().startswith(f"{held.id} "))
    assert f"held by shop-2:4242:1a2b3c until {lease:%Y-%m-%d %H:%M:%S} UTC" in line, listed
    assert f"is claimed by shop-2:4242:1a2b3c (its lease ends {lease:%Y-%m-%d %H:%M:%S} UTC)" in refused, refused
    assert (rows[held.id]["claimed_by"], rows[held.id]["lease_until"]) == ("shop-2:4242:1a2b3c", lease.isoformat())


@pytest.mark.parametrize("action", ["list", "resend", "close"])
def test_a_since_not_before_until_is_refused_naming_both(
    world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str], action: str
) -> None:
    # Given an uncertain and a failed message, and an operator after an outage who swaps the two days
    shop, config = world
    changed = shop.row(GONE).updated_at

    # When they ask for the messages changed from the day after to the day before the failure
    after, before = (changed + timedelta(days=1)).date(), (changed - timedelta(days=1)).date()
    code = kembali(config, action, "--since", after.isoformat(), "--until", before.isoformat())

    # Then it is refused as a usage error naming both options, not "nothing to resend" with exit 0
    out = capsys.readouterr()
    assert code == 2, out
    assert (f"--since {after.isoformat()}T00:00:00+00:00 is not before --until {before.isoformat()}T00:00:00+00:00"
            in out.err), out  # fmt: skip
    assert (shop.row(DROP).status, shop.row(GONE).status) == ("uncertain", "failed")


def test_an_address_too_long_for_its_column_is_shown_cut_not_as_another_address(
    tmp_path: Path, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a customer whose address is longer than the table's EMAIL column (32 characters), sent a win-back
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    long = "made.simanjuntak147@posel.example"  # 33 characters: the table showed "…@posel.exampl", another domain
    shop = Shop(url, make_settings(url, smtp_server.port), [long])
    try:
        shop.cycle()
        config = write_config(tmp_path / "config.toml", settings_dict(url, smtp_server.port))
        # When support lists what she was sent
        assert kembali(config, "list", "--all") == 0
        (row,) = capsys.readouterr().out.split("\n\n")[0].splitlines()[1:]
    finally:
        shop.close()
    # Then the cell shows the address is cut, not a complete address that is not hers
    cells = row.split()
    assert long not in cells and "made.simanjuntak147@posel.exampl" not in cells, row
    assert "made.simanjuntak147@posel.examp…" in cells, row


def test_a_list_of_one_address_does_not_pass_the_whole_ledgers_counts_off_as_its_own(
    world: tuple[Shop, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a ledger of three messages to three addresses, one of them sent
    _, config = world
    # When the operator asks what one customer got, a message left uncertain
    assert kembali(config, "list", "--all", "--email", DROP) == 0
    out = capsys.readouterr().out
    # Then the one row is listed, and the counts under it say they are the whole ledger's, not that address's
    assert DROP in out and OK not in out and GONE not in out
    assert out.splitlines()[-1] == "the whole ledger (not only the rows above): 1 failed, 1 sent, 1 uncertain"
