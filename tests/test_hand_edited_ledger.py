"""A ledger row an operator edited by hand (or a copy cut short) fails alone, named, and the others are sent."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.sendkit import NOW, Shop, make_settings, settings_dict, write_config
from tests.smtp_server import RecordingServer
from worker import cli, pipeline
from worker.adapters.store import A, M

GOOD, EDITED, ALSO_GOOD = "a@test.example", "b@test.example", "c@test.example"

PAYLOADS = ['{"first_order_id": "2"', "[]", "null", '"winback"', "", '{"days": ["45"]}']
"""A payload cut short, JSON that is no object, no JSON at all, an object of a value no planning writes."""
TIMES = [("due_at", "22/11/2026 03:00"), ("expires_at", "garbage"), ("expires_at", "1798761600")]
"""On SQLite, where a date and time is text: one in a format Kembali never writes, or a number."""


@pytest.fixture
def shop(db_url: str, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shop]:
    """Three win-back emails planned, not sent."""
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")
    shop = Shop(db_url, make_settings(db_url, smtp_server.port), [GOOD, EDITED, ALSO_GOOD])
    pipeline.plan(shop.store, shop.settings, NOW)
    try:
        yield shop
    finally:
        shop.close()


def _edit(shop: Shop, column: str, value: str) -> int:
    """The operator's hand edit of EDITED's row (written as text, as `sqlite3` or `psql` would); its id."""
    with shop.store.engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE message SET {column} = :value WHERE email = :email"),
                     {"value": value, "email": EDITED})  # fmt: skip
        row_id: int = conn.execute(sa.select(M.c.id).where(M.c.email == EDITED)).scalar_one()
    return row_id


def _sends_the_others_and_fails_the_edited_row(shop: Shop, smtp_server: RecordingServer, row_id: int,
                                               what: str, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    report = shop.cycle()

    # the other two are sent: one unreadable row stopped every claim ("claim_retried", then nothing sent, every row
    # left claimed until its lease lapsed, again at each run)
    assert sorted(r for m in smtp_server.messages for r in m.rcpt_tos) == [GOOD, ALSO_GOOD]
    assert (shop.row(GOOD).status, shop.row(ALSO_GOOD).status) == ("sent", "sent")
    # the edited row failed, saying why and which row, for `kembali ledger list` and the log
    with shop.store.engine.connect() as conn:  # (a whole row's hand-edited time cannot be read as a datetime)
        row = conn.execute(sa.select(M.c.status, M.c.last_reply, M.c.last_error).where(M.c.id == row_id)).one()
    assert row.status == "failed", row
    said = row.last_reply  # what `ledger list` shows of a failed message
    assert f"ledger row {row_id} (winback, customer C1)" in said and what in said and "resend" in said, said
    assert row.last_error == "LedgerRowError"
    with shop.store.engine.connect() as conn:
        (attempt,) = conn.execute(sa.select(A).where(A.c.message_id == row_id)).all()
    assert attempt.error_type == "LedgerRowError"
    assert report.dispatched.outcomes["sent"] == 2
    (logged,) = [r.kembali_fields for r in caplog.records if r.getMessage() == "email_render_failed"]  # type: ignore[attr-defined]
    assert logged["customer"] == "C1" and f"ledger row {row_id}" in logged["error"], logged


@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_payload_that_is_no_json_object_fails_its_message_alone(
    shop: Shop, smtp_server: RecordingServer, payload: str, caplog: pytest.LogCaptureFixture
) -> None:
    row_id = _edit(shop, "payload", payload)
    _sends_the_others_and_fails_the_edited_row(shop, smtp_server, row_id, "payload", caplog)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # PostgreSQL's timestamp column takes no such value
@pytest.mark.parametrize(("column", "value"), TIMES)
def test_a_date_and_time_in_a_format_kembali_never_writes_fails_its_message_alone(
    shop: Shop, smtp_server: RecordingServer, column: str, value: str, caplog: pytest.LogCaptureFixture
) -> None:
    row_id = _edit(shop, column, value)
    _sends_the_others_and_fails_the_edited_row(shop, smtp_server, row_id, column, caplog)


def test_preview_shows_the_unreadable_row_as_an_error_and_the_others_as_sends(
    shop: Shop, smtp_server: RecordingServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    row_id = _edit(shop, "payload", PAYLOADS[0])
    config = write_config(tmp_path / "config.toml", settings_dict(shop.settings.database_url, smtp_server.port))

    code = cli.main(["--config", str(config), "preview", "--at", NOW.isoformat(), "--json"])

    # it was a traceback (JSONDecodeError), nothing shown
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    actions = {row.get("customer"): row.get("action") for row in lines if row.get("action") != "summary"}
    assert actions == {"C0": "send", "C1": "render_error", "C2": "send"}, lines
    (error,) = [row for row in lines if row.get("action") == "render_error"]
    assert f"ledger row {row_id}" in json.dumps(error), error
    assert code == 1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # PostgreSQL's timestamp column takes no such value
@pytest.mark.parametrize("command", [["ledger", "list", "--all"], ["ledger", "close", "2"], ["ledger", "resend", "2"]])
def test_a_ledger_command_over_a_hand_edited_time_names_the_value_without_a_traceback(
    shop: Shop, smtp_server: RecordingServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    row_id = _edit(shop, "expires_at", "end of March")
    assert row_id == 2
    config = write_config(tmp_path / "config.toml", settings_dict(shop.settings.database_url, smtp_server.port))

    code = cli.main(["--config", str(config), *command])

    # it was a traceback: ValueError: Invalid isoformat string: 'end of March'
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    (line,) = err.splitlines()
    assert line.startswith("kembali: ") and "'end of March'" in line and "edited by hand" in line, line
    # and where it is: the table and column (a ledger of thousands of rows has several date and time columns)
    assert "message.expires_at" in line, line


def test_a_value_no_retry_can_read_is_not_retried(
    tmp_path: Path, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a shop whose customer row an operator edited by hand on SQLite: a birthday no date reads as
    url = f"sqlite:///{tmp_path / 'k.db'}"
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")
    shop = Shop(url, make_settings(url, smtp_server.port), [GOOD, EDITED, ALSO_GOOD])
    try:
        pipeline.plan(shop.store, shop.settings, NOW)
        with shop.store.engine.begin() as conn:
            conn.execute(sa.text("UPDATE customer SET birthday = 'someday' WHERE email = :email"), {"email": EDITED})
        # When a run reads it
        with pytest.raises(Exception) as raised:
            shop.cycle()
    finally:
        shop.close()
    # Then it fails saying the value, at once: reading it again cannot help (it was retried for 15.5 s, each try
    # logged as a database failure)
    assert "'someday'" in str(raised.value), raised.value
    assert [r.getMessage() for r in caplog.records if r.getMessage().endswith("_retried")] == []
