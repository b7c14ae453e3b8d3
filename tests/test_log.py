"""The text log as an operator reads it: one line per event, whatever customer data it carries."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
import sqlite3
from datetime import UTC, datetime
from email import message_from_bytes
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests import sendkit
from tests.clikit import run_cli
from tests.shop import TEMPLATES
from tests.smtp_server import Behaviour, RecordingServer
from worker import cli, log
from worker.adapters import db


@pytest.fixture
def stream() -> io.StringIO:
    logger = logging.getLogger("kembali")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    out = io.StringIO()
    log.configure("info", stream=out)
    yield out  # type: ignore[misc]
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("C-0001", "C-0001"),
        ("Budi Santoso", '"Budi Santoso"'),
        ("Siti\r\nlevel=error", '"Siti\\r\\nlevel=error"'),
        ("C9\u2028error\u0085ok", '"C9\\u2028error\\u0085ok"'),
        ("x\x1b[2J\x9b31m", '"x\\u001b[2J\\u009b31m"'),
        ("Ünïcode", "Ünïcode"),
    ],
)
def test_a_value_from_customer_data_stays_on_its_line_and_off_the_terminal(
    stream: io.StringIO, value: str, shown: str
) -> None:
    log.event("email_sent", customer=value, campaign="winback")
    text = stream.getvalue()
    assert text.endswith(f" email_sent customer={shown} campaign=winback\n")
    assert len(text.splitlines()) == 1 and text[:-1].isprintable()


@pytest.mark.parametrize(
    "value", ["Siti\r\nlevel=error", "C9\u2028error\u0085ok", "x\x1b[2J\x9b31m\u202eevil", "Ünïcode"]
)
def test_a_json_log_line_carries_the_value_exactly_and_no_control_character(value: str) -> None:
    logger = logging.getLogger("kembali")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    out = io.StringIO()
    log.configure("info", "json", stream=out)
    try:
        log.event("email_sent", customer=value)
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    text = out.getvalue()
    assert len(text.splitlines()) == 1 and text[:-1].isprintable(), repr(text)
    assert json.loads(text)["customer"] == value
    assert ("Ünïcode" in text) == (value == "Ünïcode")  # UTF-8 text stays readable


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_long_value_is_cut_and_says_how_long_it_was(fmt: str) -> None:
    logger = logging.getLogger("kembali")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    out = io.StringIO()
    log.configure("info", fmt, stream=out)
    try:
        log.event("email_render_failed", error="x\n" * 30_000, code=550, dedupe_key="winback:C-1:O-1:1")
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    text = out.getvalue()
    assert len(text.splitlines()) == 1 and len(text) < 2 * log.MAX_VALUE_CHARS + 200, len(text)
    assert "…(60,000 chars)" in text and "winback:C-1:O-1:1" in text
    if fmt == "json":
        body = json.loads(text)
        assert body["error"] == "x\n" * (log.MAX_VALUE_CHARS // 2) + "…(60,000 chars)" and body["code"] == 550


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_librarys_warning_is_a_line_of_the_same_log(fmt: str) -> None:
    # psycopg, asyncio or aiosmtpd log on their own loggers: Python's last resort printed their text bare, so a
    # JSON log got a line that is no JSON (psycopg's "error ignored terminating <Pipeline [BAD]>" as a connection
    # dropped), and a text log a line without time or level
    logger, root = logging.getLogger("kembali"), logging.getLogger()
    saved = (logger.handlers[:], logger.level, logger.propagate, root.handlers[:])
    out = io.StringIO()
    log.configure("info", fmt, stream=out)
    try:
        logging.getLogger("psycopg.pool").warning("error ignored terminating %s", "<Pipeline [BAD]>\nnext line")
        logging.getLogger("asyncio").info("chatter below warning")
    finally:
        logger.handlers[:], logger.level, logger.propagate, root.handlers[:] = saved
    text = out.getvalue()
    assert len(text.splitlines()) == 1 and text[:-1].isprintable(), repr(text)
    if fmt == "json":
        body = json.loads(text)
        assert (body["level"], body["event"], body["logger"]) == ("warning", "library_warning", "psycopg.pool")
        assert body["message"] == "error ignored terminating <Pipeline [BAD]>\nnext line"
    else:
        assert text.split(" ", 2)[1:] == ["warning", 'library_warning logger=psycopg.pool message="error ignored '
                                          'terminating <Pipeline [BAD]>\\nnext line"\n']  # fmt: skip


def test_the_level_chosen_on_the_command_line_outlasts_a_reconfiguration() -> None:
    # the daemon reconfigures its log when a SIGHUP reload changes [logging]: `kembali run --log-level debug` must
    # not fall back to the config's level then
    logger, root = logging.getLogger("kembali"), logging.getLogger()
    saved = (logger.handlers[:], logger.level, logger.propagate, root.handlers[:])
    out = io.StringIO()
    try:
        log.choose_level("debug")
        log.configure("warning", "json", stream=out)
        log.event("rate_slot_missed", logging.DEBUG, domain="gmail.com")
        log.choose_level(None)
        log.configure("warning", "json", stream=out)
        log.event("rate_slot_missed", logging.DEBUG, domain="yahoo.com")
    finally:
        log.choose_level(None)
        logger.handlers[:], logger.level, logger.propagate, root.handlers[:] = saved
    assert [json.loads(line)["domain"] for line in out.getvalue().splitlines()] == ["gmail.com"]


def test_a_message_that_fails_to_render_is_logged_with_its_recipient(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, smtp_server: RecordingServer
) -> None:
    # email_sent, email_failed and email_deferred named the (masked) recipient; email_render_failed named only the
    # dedupe key, so "who did not get it?" meant a trip to the ledger (and a feedback key names no customer)
    monkeypatch.setenv("KEMBALI_LINK_SECRET", sendkit.LINK_SECRET)
    shutil.copytree(TEMPLATES, tmp_path / "templates")
    for subject in (tmp_path / "templates").glob("*/*/subject.txt"):
        subject.write_text("{{ nope.missing }}\n", encoding="utf-8")
    url = f"sqlite:///{tmp_path / 'k.db'}"
    emails = sendkit.prepare_database(url, 3)
    raw = sendkit.settings_dict(url, smtp_server.port)
    raw["templates"] = {"dir": str(tmp_path / "templates")}
    raw["policy"] = {"quiet_hours_start": "00:00", "quiet_hours_end": "00:00"}
    config = sendkit.write_config(tmp_path / "config.toml", raw)

    code, out = run_cli(capsys, "--config", str(config), "run", "--once")

    assert code == 1, out
    failed = [line for line in out.splitlines() if " email_render_failed " in line]
    assert len(failed) == len(emails) and smtp_server.messages == []
    assert sorted(re.search(r" to=(\S+)", line).group(1) for line in failed) == sorted(  # type: ignore[union-attr]
        log.mask_email(email) for email in emails)
    # and the customer it was for
    assert sorted(re.search(r" customer=(\S+)", line).group(1) for line in failed) == [  # type: ignore[union-attr]
        "C0", "C1", "C2"]


def test_a_message_the_contact_policy_holds_back_is_logged_with_its_customer_and_recipient(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, smtp_server: RecordingServer
) -> None:
    # email_deferred_by_policy named the campaign and the dedupe key only: a feedback or loyalty key names no
    # customer, so "who was held back, and which mailbox?" meant a trip to the ledger
    monkeypatch.setenv("KEMBALI_LINK_SECRET", sendkit.LINK_SECRET)
    # Given two customers sharing one mailbox (a guest checkout), both due a win-back, under a cap of one in 3 days
    url = f"sqlite:///{tmp_path / 'k.db'}"
    sendkit.prepare_database(url, 0)
    engine = sa.create_engine(url)
    try:
        sendkit.seed_shop(engine, ["budi@gmail.com", "budi@gmail.com"], datetime.now(UTC))
    finally:
        engine.dispose()
    raw = sendkit.settings_dict(url, smtp_server.port)
    raw["policy"] = {"quiet_hours_start": "00:00", "quiet_hours_end": "00:00", "frequency_caps": [[1, 3]]}
    raw["campaigns"] = {"winback": {"holdout_share": 0.0}}
    config = sendkit.write_config(tmp_path / "config.toml", raw)

    # When a run sends one of them
    code, out = run_cli(capsys, "--config", str(config), "run", "--once")

    # Then the other's line says whose email waits, and for which (masked) mailbox
    assert code == 0, out
    assert len(smtp_server.messages) == 1
    held = [line for line in out.splitlines() if " email_deferred_by_policy " in line]
    assert len(held) == 1, out
    sent = re.search(r" email_sent .* customer=(\S+)", out)
    assert sent is not None, out
    assert re.search(r" customer=(\S+)", held[0]).group(1) in {"C0", "C1"} - {sent.group(1)}, held[0]  # type: ignore[union-attr]
    assert " to=b***@gmail.com " in held[0] + " ", held[0]
    assert "budi@gmail.com" not in out


def _run_once(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
              smtp_server: RecordingServer) -> tuple[int, str]:
    """``kembali run --once`` on the database at ``url`` and ``smtp_server``, quiet hours off: its exit code and what
    it printed (its log's text lines among it)."""
    monkeypatch.setenv("KEMBALI_LINK_SECRET", sendkit.LINK_SECRET)
    raw = sendkit.settings_dict(url, smtp_server.port)
    raw["policy"] = {"quiet_hours_start": "00:00", "quiet_hours_end": "00:00"}
    config = sendkit.write_config(tmp_path / "config.toml", raw)
    return run_cli(capsys, "--config", str(config), "run", "--once")


def test_a_server_reply_that_quotes_the_recipient_is_logged_with_the_address_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, smtp_server: RecordingServer
) -> None:
    # Given a server that refuses one customer quoting the address (Postfix: "550 5.1.1 <addr>: Recipient address
    # rejected") and puts another off the same way (a 4xx), the log's addresses being masked (deploy/README)
    url = f"sqlite:///{tmp_path / 'k.db'}"
    emails = sendkit.prepare_database(url, 3)
    gone, later = emails[0], emails[1]
    smtp_server.on(gone, Behaviour(rcpt_reply=f"550 5.1.1 <{gone}>: Recipient address rejected: User unknown"))
    smtp_server.on(later, Behaviour(rcpt_reply=f"450 4.2.0 <{later.upper()}>: Recipient address rejected: Greylisted"))

    # When a run sends
    code, out = _run_once(url, tmp_path, capsys, monkeypatch, smtp_server)

    # Then the events name the server's reply with the addresses in it masked, as their to= is
    assert code == 1, out
    (failed,) = [line for line in out.splitlines() if " email_failed " in line]
    (deferred,) = [line for line in out.splitlines() if " email_deferred " in line]
    assert f"<{log.mask_email(gone)}>: Recipient address rejected" in failed, failed
    assert f"<{log.mask_email(later.upper())}>: Recipient address rejected" in deferred, deferred
    assert gone not in out and later.upper() not in out


def test_each_attempts_line_names_the_message_id_a_bounce_or_the_relays_log_quotes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, smtp_server: RecordingServer
) -> None:
    # a bounce that comes back days later, a complaint, the relay's own log (Postfix: message-id=<…>) name the message
    # by its Message-ID; the lines named the dedupe key and the masked address only, so finding the customer meant
    # reading the whole ledger as JSON
    url = f"sqlite:///{tmp_path / 'k.db'}"
    emails = sendkit.prepare_database(url, 2)
    smtp_server.on(emails[0], Behaviour(data_reply="554 5.7.1 Message rejected as spam"))

    # When a run sends one email and the server refuses the other after its DATA
    code, out = _run_once(url, tmp_path, capsys, monkeypatch, smtp_server)

    # Then each line names its message's Message-ID, as the server received it and the ledger has it
    assert code == 1, out
    (sent,) = [line for line in out.splitlines() if " email_sent " in line]
    (failed,) = [line for line in out.splitlines() if " email_failed " in line]
    (received,) = smtp_server.messages
    with contextlib.closing(sqlite3.connect(tmp_path / "k.db")) as conn:
        ledger = dict(conn.execute("SELECT email, message_id FROM message").fetchall())
    assert f" message_id={message_from_bytes(received.data)['Message-ID']} " in sent + " ", sent
    assert f" message_id={ledger[emails[0]]} " in failed + " ", failed


def test_a_reply_keeps_the_shops_own_address_whole_and_masks_the_customers() -> None:
    # a relay refusing the sender names shop.from_address (the setting the operator is told to check), one
    # refusing to relay names the customer; the hint quotes the sender as Python does ('halo@…')
    reply = ("550 5.1.0 <Halo@Toko.example>: Sender address rejected; 554 5.7.1 <budi@gmail.com>: Relay access "
             "denied: check the envelope sender 'halo@toko.example'")  # fmt: skip
    masked = log.mask_addresses(reply, keep=("halo@toko.example", ""))
    assert masked == ("550 5.1.0 <Halo@Toko.example>: Sender address rejected; 554 5.7.1 <b***@gmail.com>: Relay "
                      "access denied: check the envelope sender 'halo@toko.example'")  # fmt: skip
    assert log.mask_addresses("rejected: 'budi@gmail.com'") == "rejected: 'b***@gmail.com'"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_librarys_error_with_a_traceback_is_one_line_of_bounded_length(fmt: str) -> None:
    # asyncio logs an error of a task nobody awaited ("Task exception was never retrieved") with its traceback:
    # the text log wrote the traceback raw on the lines after it, the exception's text with them (a server's reply
    # quoted with a terminal escape, a line break and what reads as a line of the log; 30,000 characters of it),
    # and the JSON log carried all of it in one field
    logger, root = logging.getLogger("kembali"), logging.getLogger()
    saved = (logger.handlers[:], logger.level, logger.propagate, root.handlers[:])
    out = io.StringIO()
    log.configure("info", fmt, stream=out)
    forged = "\x1b[2J\n2026-12-06T00:00:00Z info    email_sent campaign=winback"
    try:
        try:
            raise ConnectionError("x" * 30_000 + f" 421 {forged} closing")
        except ConnectionError:
            logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=True)
    finally:
        logger.handlers[:], logger.level, logger.propagate, root.handlers[:] = saved
    text = out.getvalue()
    assert len(text.splitlines()) == 1 and text[:-1].isprintable(), text[:3000]
    assert len(text) < 2 * log.MAX_VALUE_CHARS + 400, len(text)
    # the end of the traceback, where its error is said, is kept
    if fmt == "json":
        body = json.loads(text)
        assert body["event"] == "library_error" and body["message"] == "Task exception was never retrieved"
        assert body["exception"].startswith("…(") and body["exception"].endswith(f" 421 {forged} closing")
    else:
        assert 'library_error logger=asyncio message="Task exception was never retrieved" exception="…(' in text
        assert text.endswith(' 421 \\u001b[2J\\n2026-12-06T00:00:00Z info    email_sent campaign=winback closing"\n')


def test_run_once_with_json_logs_says_an_unexpected_error_in_one_json_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, smtp_server: RecordingServer
) -> None:
    # Given a service's `run --once` whose config asks for JSON logs, and a customer whose birthday an operator
    # edited by hand into a text no date reads as (what kembali makes of it is no matter here: an error nobody
    # foresaw, which the run's reads of the facts try again for a while, then give up on)
    monkeypatch.setenv("KEMBALI_LINK_SECRET", sendkit.LINK_SECRET)
    url = f"sqlite:///{tmp_path / 'k.db'}"
    sendkit.prepare_database(url, 2)
    raw = sendkit.settings_dict(url, smtp_server.port)
    raw["logging"] = {"format": "json"}
    config = sendkit.write_config(tmp_path / "config.toml", raw)
    engine = db.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE customer SET birthday = 'someday'"))
    engine.dispose()
    capsys.readouterr()

    code = cli.main(["--config", str(config), "run", "--once"])

    # Then it fails with exit code 1 and says why in one JSON line, the traceback inside it: it was Python's
    # traceback, a dozen lines the log collector took for a dozen events it could not parse
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [json.loads(line) for line in err.splitlines()]  # every line is JSON
    failed = [line for line in lines if line["event"] == "command_failed"]
    assert len(failed) == 1 and failed[0]["exit_code"] == 1, lines
    assert "ValueError" in failed[0]["message"], failed
    assert "ValueError: Invalid isoformat string" in failed[0]["exception"], failed  # the traceback's end
