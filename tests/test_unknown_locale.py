"""A customer whose stored language has no templates (written into the database by hand or by another program,
past the importer's check): preview and run --once go on, that customer's email in the shop's language, and say
so once. A real SQLite file, the CLI in this process, a real SMTP server."""

from __future__ import annotations

import json
import signal
from email import message_from_bytes
from email.header import decode_header, make_header
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.clikit import run_cli
from tests.daemon_harness import LINK_KEY, Daemon, Shop, http, make_shop
from tests.smtp_server import RecordingServer
from worker.core import tokens
from worker.domain import Locale


@pytest.fixture(autouse=True)
def link_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)


def _shop(tmp_path: Path, port: int, *, default_locale: str) -> Shop:
    """Given three customers due a win-back: C1 stored as 'fr', C2 as 'zh-TW' (no templates for either), C3 in
    English; the shop's language ``default_locale``."""
    shop = make_shop(tmp_path, smtp_port=port, plan_cron="0 9 * * *")
    text = shop.config.read_text(encoding="utf-8")
    shop.config.write_text(text.replace("[shop]\n", f'[shop]\ndefault_locale = "{default_locale}"\n'), "utf-8")
    shop.add([1, 2], days_ago=60)
    shop.add([3], days_ago=60, locale=Locale.EN)
    store = shop.store()
    try:
        with store.engine.begin() as conn:
            conn.execute(sa.text("UPDATE customer SET locale = 'fr' WHERE external_id = 'C1'"))
            conn.execute(sa.text("UPDATE customer SET locale = 'zh-TW' WHERE external_id = 'C2'"))
    finally:
        store.close()
    return shop


def _warnings(out: str) -> list[dict[str, object]]:
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [e for e in events if e.get("event") == "customer_locale_unknown"]


def _subject(data: bytes) -> str:
    return str(make_header(decode_header(message_from_bytes(data)["Subject"])))


def test_run_once_sends_a_customer_with_a_language_without_templates_the_shops_and_warns_once(
    tmp_path: Path, smtp_server: RecordingServer, capsys: pytest.CaptureFixture[str]
) -> None:
    shop = _shop(tmp_path, smtp_server.port, default_locale="en")
    # When the run plans and sends
    code, out = run_cli(capsys, "--config", str(shop.config), "run", "--once")
    # Then it goes on: all three get their email, the two without templates of their language in the shop's
    assert code == 0, out
    subjects = {m.rcpt_tos[0]: _subject(m.data) for m in smtp_server.messages}
    assert sorted(subjects) == ["c1@example.com", "c2@example.com", "c3@example.com"], out
    assert subjects["c1@example.com"] == subjects["c2@example.com"] == subjects["c3@example.com"], subjects
    assert "we miss you" in subjects["c1@example.com"]  # English, as C3's, not Bahasa Indonesia
    # And one warning for each, naming the customer and the value stored
    warned = sorted((str(w["customer"]), str(w["locale"]), str(w["using"])) for w in _warnings(out))
    assert warned == [("C1", "fr", "en"), ("C2", "zh-TW", "en")], out
    assert shop.rows("SELECT status, count(*) FROM message GROUP BY status") == [("sent", 3)]


def test_preview_shows_a_customer_with_a_language_without_templates_in_the_shops_and_warns_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shop = _shop(tmp_path, 25, default_locale="id")
    # When the operator previews the run
    code, out = run_cli(capsys, "--config", str(shop.config), "preview")
    # Then every customer's email is shown (C1 and C2 in the shop's Bahasa Indonesia), with one warning each
    assert code == 0, out
    assert "3 considered: 3 would be sent" in out, out
    subjects = {line.split()[0]: line for line in out.splitlines() if line.startswith("C")}
    assert "Kak Pelanggan" in subjects["C1"] and "Kak Pelanggan" in subjects["C2"], out
    assert "we miss you" in subjects["C3"], out
    warned = sorted((str(w["customer"]), str(w["locale"]), str(w["using"])) for w in _warnings(out))
    assert warned == [("C1", "fr", "id"), ("C2", "zh-TW", "id")], out
    assert shop.scalar("SELECT count(*) FROM message") == 0


def test_a_reload_that_changes_the_shops_language_is_the_one_a_customer_without_templates_reads_in(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a daemon of a shop in Bahasa Indonesia, and C1, whose stored language 'fr' has no templates
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    shop.add([1], days_ago=10)
    store = shop.store()
    try:
        with store.engine.begin() as conn:
            conn.execute(sa.text("UPDATE customer SET locale = 'fr' WHERE external_id = 'C1'"))
    finally:
        store.close()
    daemon = Daemon.start(shop)
    try:
        daemon.wait_event("daemon_started")
        token = tokens.sign("u", str(shop.customer_id("C1")), LINK_KEY.encode(), shop="shop.example")
        status, page, _ = http("GET", daemon.url(f"/unsubscribe?t={token}"))
        assert status == 200 and 'lang="id"' in page, page
        # When the operator makes the shop's language English and reloads (a `shop` change a reload applies)
        text = shop.config.read_text(encoding="utf-8")
        shop.config.write_text(text.replace("[shop]\n", '[shop]\ndefault_locale = "en"\n'), "utf-8")
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("reload_done", timeout=30)
        # Then C1 reads in English, the shop's language now (it stayed Bahasa Indonesia until a restart)
        status, page, _ = http("GET", daemon.url(f"/unsubscribe?t={token}"))
        assert status == 200 and 'lang="en"' in page and ">Unsubscribe<" in page, page
    finally:
        assert daemon.stop() == 0
