"""On SQLite a date and time is text, and the claim compares it as text: one written by hand in another ISO form
('2026-11-22T02:00:00Z', an offset, a 'T') is read as the time it names before any claim, or the row fails, named."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.sendkit import NOW, Shop, make_settings
from tests.smtp_server import RecordingServer
from worker import pipeline
from worker.adapters.store import A, M

GOOD, EDITED, ALSO_GOOD = "a@test.example", "b@test.example", "c@test.example"


@pytest.fixture
def shop(tmp_path: Path, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shop]:
    """Three win-back emails planned on SQLite, due at NOW (2026-11-22 03:00 UTC), not sent."""
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")
    url = f"sqlite:///{tmp_path / 'k.db'}"
    shop = Shop(url, make_settings(url, smtp_server.port), [GOOD, EDITED, ALSO_GOOD])
    pipeline.plan(shop.store, shop.settings, NOW)
    try:
        yield shop
    finally:
        shop.close()


def _edit(shop: Shop, value: str) -> int:
    with shop.store.engine.begin() as conn:  # as `sqlite3` would write it: text
        conn.execute(sa.text("UPDATE message SET next_attempt_at = :v WHERE email = :e"), {"v": value, "e": EDITED})
        row_id: int = conn.execute(sa.select(M.c.id).where(M.c.email == EDITED)).scalar_one()
    return row_id


def _raw(shop: Shop, row_id: int) -> object:
    with shop.store.engine.connect() as conn:
        return conn.exec_driver_sql("SELECT next_attempt_at FROM message WHERE id = ?", (row_id,)).scalar()


def _sent(server: RecordingServer) -> list[str]:
    return sorted(r for m in server.messages for r in m.rcpt_tos)


# all an hour before NOW: due
DUE = ["2026-11-22T02:00:00Z", "2026-11-22T02:00:00+00:00", "2026-11-22 09:00:00+07:00", "2026-11-22T02:00:00",
       "2026-11-22 02:00"]  # fmt: skip


@pytest.mark.parametrize("value", DUE)
def test_a_due_time_written_by_hand_in_another_iso_form_is_sent_when_due(
    shop: Shop, smtp_server: RecordingServer, value: str, caplog: pytest.LogCaptureFixture
) -> None:
    row_id = _edit(shop, value)
    caplog.set_level(logging.INFO)

    shop.cycle()

    # it compared as text: '2026-11-22T…' after '2026-11-22 03:…', so it waited until the next day (the offset's
    # hours late), while the others went
    assert _sent(smtp_server) == [GOOD, EDITED, ALSO_GOOD]
    (logged,) = [r.kembali_fields for r in caplog.records if r.getMessage() == "ledger_time_normalised"]  # type: ignore[attr-defined]
    assert logged["id"] == row_id and logged["column"] == "message.next_attempt_at" and logged["value"] == value
    assert logged["reads_as"] == "2026-11-22 02:00:00.000000", logged


def test_a_later_time_written_by_hand_is_sent_at_that_time_not_the_next_day(
    shop: Shop, smtp_server: RecordingServer
) -> None:
    row_id = _edit(shop, "2026-11-22T05:00:00Z")

    shop.cycle()
    assert _sent(smtp_server) == [GOOD, ALSO_GOOD]
    assert _raw(shop, row_id) == "2026-11-22 05:00:00.000000"  # as Kembali writes it, so the claim's order holds

    shop.clock.advance(timedelta(hours=2, minutes=1).total_seconds())
    shop.cycle()
    assert _sent(smtp_server) == [GOOD, EDITED, ALSO_GOOD]


@pytest.mark.parametrize("value", ["tomorrow", "22/11/2026 02:00"])
def test_a_time_no_reading_makes_sense_of_fails_its_row_named(
    shop: Shop, smtp_server: RecordingServer, value: str
) -> None:
    row_id = _edit(shop, value)

    shop.cycle()

    # it waited for ever: 't' and '2' sort after every time Kembali writes
    assert _sent(smtp_server) == [GOOD, ALSO_GOOD]
    row = shop.row(EDITED)
    assert row.status == "failed" and row.last_error == "LedgerRowError", row
    said = row.last_reply
    assert f"ledger row {row_id}" in said and "message.next_attempt_at" in said and repr(value) in said, said
    assert f"kembali ledger resend {row_id}" in said, said
    with shop.store.engine.connect() as conn:
        (attempt,) = conn.execute(sa.select(A).where(A.c.message_id == row_id)).all()
    assert attempt.error_type == "LedgerRowError"


@pytest.mark.parametrize(("column", "value", "reads_as"), [
    ("expires_at", "9999-12-31T23:00:00-05:00", "9999-12-31 23:59:59.999999"),  # 'never expires', past year 9999 in UTC
    ("next_attempt_at", "0001-01-01T03:00:00+07:00", "0001-01-01 00:00:00.000000"),  # 'long ago', before year 1
])  # fmt: skip
def test_a_time_written_by_hand_past_the_ends_of_the_calendar_in_utc_is_read_as_that_end_not_a_crash(
    shop: Shop, smtp_server: RecordingServer, column: str, value: str, reads_as: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with shop.store.engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE message SET {column} = :v WHERE email = :e"), {"v": value, "e": EDITED})
        row_id: int = conn.execute(sa.select(M.c.id).where(M.c.email == EDITED)).scalar_one()

    shop.cycle()  # it stopped the start with an OverflowError (a traceback) on every run

    assert _sent(smtp_server) == [GOOD, EDITED, ALSO_GOOD]
    (logged,) = [r.kembali_fields for r in caplog.records if r.getMessage() == "ledger_time_normalised"]  # type: ignore[attr-defined]
    assert (logged["id"], logged["column"], logged["reads_as"]) == (row_id, f"message.{column}", reads_as), logged
