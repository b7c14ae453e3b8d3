"""`kembali preview` shares the real run's path: same dedupe keys, same bytes, and it writes nothing."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.clikit import migrated_config, run_cli
from tests.shop import PRODUCTS, TEMPLATES, customer, one_time_order
from tests.shop_fixtures import LINK_SECRET, Site, load_shop, make_site
from tests.smtp_server import RecordingServer
from worker.adapters.store import M
from worker.app import Deps
from worker.commands import running
from worker.demo import HOSTILE_NAMES, ShopData, generate_shop
from worker.domain import CustomerRecord, Locale, OrderLineRecord, OrderRecord, OrderStatus, ProductRecord

T = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)


class FixedClock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at

    def monotonic(self) -> float:
        return 0.0

    async def sleep(self, seconds: float) -> None:
        return None


def _fingerprint(site: Site) -> tuple[str, list[tuple[object, ...]]]:
    digest = hashlib.sha256(site.db_path.read_bytes()).hexdigest()
    engine = sa.create_engine(f"sqlite:///{site.db_path}")
    with engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(sa.select(M).order_by(M.c.id))]
    engine.dispose()
    return digest, rows


def _preview_json(site: Site, *args: str) -> tuple[int, list[dict[str, object]]]:
    done = site.cli("preview", "--at", T.isoformat(), "--json", *args)
    assert done.stderr == "" or "error" not in done.stderr.lower(), done.stderr
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture
def site(tmp_path: Path, smtp_server: RecordingServer) -> Site:
    site = make_site(tmp_path / "shop", smtp_port=smtp_server.port)
    load_shop(site.settings, generate_shop(seed=11, customers=80, now=T - timedelta(days=1)), T)
    return site


def test_preview_at_t_and_run_once_at_t_agree_and_preview_writes_nothing(
    site: Site, smtp_server: RecordingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a shop whose database has never been planned
    before = _fingerprint(site)
    assert before[1] == []

    # When the operator previews at T, writing the messages to a folder
    out = tmp_path / "preview-out"
    code, lines = _preview_json(site, "--out", str(out))

    # Then nothing in the database changed
    assert code == 0
    assert _fingerprint(site) == before
    sends = [row for row in lines if row["action"] == "send"]
    summary = lines[-1]
    assert summary["action"] == "summary"
    assert summary["would_send"] == len(sends) > 5
    preview_keys = {str(row["dedupe_key"]) for row in lines if row["action"] != "summary"}
    assert all(str(row["customer"]).startswith("C-") for row in lines if row["action"] != "summary")

    # When a real cycle runs at the same T against a real SMTP server
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_SECRET)
    deps = Deps.build(site.settings)
    deps.clock = FixedClock(T)
    try:
        report = asyncio.run(running.cycle(deps))
    finally:
        deps.close()

    # Then it planned and sent exactly what the preview showed
    ledger = _ledger(site)
    assert set(ledger) == preview_keys
    assert {k for k, status in ledger.items() if status == "sent"} == {str(r["dedupe_key"]) for r in sends}
    assert report.dispatched.outcomes["sent"] == len(sends) == len(smtp_server.messages)

    # And the .eml files are byte for byte what the server received
    written = sorted(out.glob("*.eml"))
    assert len(written) == len(sends) == len(list(out.glob("*.html")))
    assert {p.read_bytes() for p in written} == {m.data for m in smtp_server.messages}
    parser = BytesParser(policy=policy.default)
    for path in written:
        parsed = parser.parsebytes(path.read_bytes())
        assert parsed.get_content_type() == "multipart/alternative"
        assert [p.get_content_type() for p in parsed.iter_parts()] == ["text/plain", "text/html"]
        assert "\n" not in str(parsed["To"]) and "Bcc" not in parsed
    assert any(HOSTILE_NAMES[0].split()[0] in str(parser.parsebytes(p.read_bytes())["To"]) for p in written)


def _ledger(site: Site) -> dict[str, str]:
    engine = sa.create_engine(f"sqlite:///{site.db_path}")
    with engine.connect() as conn:
        out = {r.dedupe_key: r.status for r in conn.execute(sa.select(M.c.dedupe_key, M.c.status))}
    engine.dispose()
    return out


def test_a_preview_cut_short_by_limit_says_so(site: Site) -> None:
    code, everything = _preview_json(site)
    total = int(str(everything[-1]["considered"]))
    assert code == 0 and total > 3 and everything[-1]["stopped_at_limit"] is False

    code, lines = _preview_json(site, "--limit", "3")
    assert (lines[-1]["considered"], lines[-1]["stopped_at_limit"]) == (3, True)
    assert lines[:3] == everything[:3]
    table = site.cli("preview", "--at", T.isoformat(), "--limit", "3").stdout
    assert "\n3 considered (the first 3, as --limit asked; more may be due): " in table
    # a limit the preview did not reach cut nothing short
    code, lines = _preview_json(site, "--limit", str(total + 1))
    assert (lines[-1]["considered"], lines[-1]["stopped_at_limit"]) == (total, False)


def test_table_shows_local_time_and_render_errors_name_file_and_line(tmp_path: Path) -> None:
    # Given a shop whose English win-back body refers to a variable that does not exist
    site = make_site(tmp_path / "shop", copy_templates=True)
    load_shop(site.settings, generate_shop(seed=11, customers=80, now=T - timedelta(days=1)), T)
    body = site.folder / "templates" / "winback" / "en" / "body.txt"
    body.write_text(body.read_text(encoding="utf-8").replace("{{ shop.base_url }}", "{{ shop.bas_url }}"))

    # When the operator previews
    done = site.cli("preview", "--at", "2026-11-22T10:00+07:00")

    # Then Indonesian customers are listed with their local time, English ones fail with file:line
    assert done.returncode == 1, done.stderr
    out = done.stdout
    assert "customer" in out and "campaign/step" in out and "when (their time)" in out
    assert "winback/1" in out
    assert "2026-11-22 10:00 WIB" in out or "2026-11-22 11:00 WITA" in out
    assert "render_error" in out and "Not sent, by reason:" in out
    assert "render error (" in out and "winback/en/body.txt:" in out and "bas_url" in out


def test_the_table_lists_a_message_that_fails_to_render_on_the_customers_row(tmp_path: Path) -> None:
    # Given a shop whose English win-back body refers to a variable that does not exist
    site = make_site(tmp_path / "shop", copy_templates=True)
    load_shop(site.settings, generate_shop(seed=11, customers=80, now=T - timedelta(days=1)), T)
    body = site.folder / "templates" / "winback" / "en" / "body.txt"
    body.write_text(body.read_text(encoding="utf-8").replace("{{ shop.base_url }}", "{{ shop.bas_url }}"))
    _code, lines = _preview_json(site)
    failing = next(line for line in lines if line["action"] == "render_error")

    # When the operator previews that one customer
    done = site.cli("preview", "--at", T.isoformat(), "--customer", str(failing["customer"]))

    # Then the table has a row for the message that would fail, naming the template's file and line (the table
    # listed the customer's sends, skips and deferrals, but not it: only the summary below said it, as "1 messages")
    assert done.returncode == 1, done.stderr
    rows = [row for row in done.stdout.splitlines() if row.startswith(f"{failing['customer']} ")]
    assert any(f"{failing['dedupe_key']}" in row and f"render error: {failing['template']}:{failing['line']}" in row
               and "winback" in row for row in rows), done.stdout  # fmt: skip
    assert "\nrender error (1 message): winback/en/body.txt:" in done.stdout, done.stdout


def test_preview_of_a_template_run_once_would_refuse_says_so(tmp_path: Path) -> None:
    # Given a shop whose English win-back body has a syntax error
    site = make_site(tmp_path / "shop", copy_templates=True)
    load_shop(site.settings, generate_shop(seed=11, customers=80, now=T - timedelta(days=1)), T)
    body = site.folder / "templates" / "winback" / "en" / "body.txt"
    body.write_text(body.read_text(encoding="utf-8").replace("{% block content %}", "{% block content %}{% if %}"))

    # When the operator previews
    done = site.cli("preview", "--at", "2026-11-22T10:00+07:00")

    # Then the messages it can render are listed, and it says that a run would send none of them
    assert done.returncode == 1, done.stderr
    assert "render error (" in done.stdout and "winback/en/body.txt:2: syntax error" in done.stdout
    assert "`kembali run --once` would stop before planning, and the daemon not start" in done.stderr
    assert "winback/en/body.txt:2: syntax error" in done.stderr


def test_preview_of_templates_run_once_would_refuse_exits_1_when_no_message_uses_them(tmp_path: Path) -> None:
    # Given a shop with no customers yet, and an English text layout saved with a mistyped include
    site = make_site(tmp_path / "shop", copy_templates=True)
    body = site.folder / "templates" / "winback" / "en" / "body.txt"
    text = body.read_text(encoding="utf-8")
    assert '{% include "_products.txt" %}' in text
    body.write_text(text.replace('{% include "_products.txt" %}', '{% include "_produk.txt" %}'))
    # When the operator previews before the first run
    done = site.cli("preview", "--at", "2026-11-22T10:00+07:00")
    # Then it says the run would stop, and its exit code says so too: it was 0, so `kembali preview &&
    # kembali run --once` went on to a run that refused to start
    assert "`kembali run --once` would stop before planning" in done.stderr, done.stderr
    assert "template not found: _produk.txt" in done.stderr
    assert done.returncode == 1, done.stdout + done.stderr


def test_preview_names_the_line_of_a_misspelt_win_back_step_folder(tmp_path: Path) -> None:
    # Given a config whose second win-back step names a folder that is not there ("winback-remnder")
    steps = ('[[campaigns.winback.steps]]\ndays = 45\ntemplate = "winback-reminder"\n\n'
             '[[campaigns.winback.steps]]\ndays = 75\ntemplate = "winback-remnder"\n')
    site = make_site(tmp_path / "shop", extra_toml=steps)
    line = site.config.read_text(encoding="utf-8").splitlines().index('template = "winback-remnder"') + 1
    # When the operator previews
    done = site.cli("preview", "--at", "2026-11-22T10:00+07:00")
    # Then the note says which step of the file, by its line (it said 'campaigns.winback.steps[].template': which?)
    assert f"config.toml: line {line}: 'campaigns.winback.steps[1].template'" in done.stderr, done.stderr
    assert done.returncode == 1, done.stdout + done.stderr


def test_customer_data_reaches_the_table_with_what_is_not_printable_escaped(tmp_path: Path) -> None:
    # Given customers whose names carry a terminal escape and a line separator, and whose ids a C1 control
    site = make_site(tmp_path / "shop")
    load_shop(site.settings, generate_shop(seed=11, customers=40, now=T - timedelta(days=1)), T)
    engine = sa.create_engine(site.settings.database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE customer SET name = :n, locale = 'en'"), {"n": "\x1b[31mred\u2028fake_event x"})
        conn.execute(sa.text("UPDATE customer SET external_id = :e || id"), {"e": "C\u0085X"})
    engine.dispose()
    # When the operator previews in a terminal
    done = site.cli("preview", "--at", "2026-11-22T10:00+07:00")
    # Then no control character reaches it: each is shown escaped
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "\u2028" not in done.stdout and "\x85" not in done.stdout
    # the subject greets the first name as the email shows it: cleaned of the escape (U+2028 ends it)
    assert "[31mred, still" in done.stdout and "\\u001b" not in done.stdout
    assert "C\\u0085X" in done.stdout


def test_customer_data_reaches_json_lines_with_what_is_not_printable_escaped(tmp_path: Path) -> None:
    # Given customers whose names carry an 8-bit CSI and a right-to-left override (JSON leaves both raw)
    site = make_site(tmp_path / "shop")
    load_shop(site.settings, generate_shop(seed=11, customers=40, now=T - timedelta(days=1)), T)
    engine = sa.create_engine(site.settings.database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE customer SET name = :n, locale = 'en'"), {"n": "\x9b31mred\u202eevil x"})
    engine.dispose()
    # When the operator previews as JSON lines, in a terminal
    done = site.cli("preview", "--at", "2026-11-22T10:00+07:00", "--json")
    # Then no control character reaches it; the lines are still JSON holding the subject as the email has it,
    # the name cleaned of both
    assert done.returncode == 0, done.stderr
    assert "\x9b" not in done.stdout and "\u202e" not in done.stdout
    sends = [row for row in map(json.loads, done.stdout.splitlines()) if row["action"] == "send"]
    assert sends and all("31mredevil" in row["subject"] for row in sends)


def test_the_subject_preview_lists_is_the_subject_header_that_goes_out(tmp_path: Path) -> None:
    # Given customers whose first name starts an encoded-word and runs long (a name field pasted into by a bot)
    site = make_site(tmp_path / "shop")
    load_shop(site.settings, generate_shop(seed=11, customers=40, now=T - timedelta(days=1)), T)
    engine = sa.create_engine(site.settings.database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE customer SET name = :n, locale = 'en'"), {"n": "=?utf-8?q?Bcc?=" + "a" * 180})
    engine.dispose()
    # When the operator previews them, as JSON lines with the messages written out, and as the table
    done = site.cli("preview", "--at", "2026-11-22T10:00+07:00", "--json", "--out", str(tmp_path / "out"))
    table = site.cli("preview", "--at", "2026-11-22T10:00+07:00")
    # Then each subject listed is the Subject header of the message (its "=?" defused, cut to 200 characters), not
    # the template's output, which no customer sees: preview listed what the run would never send
    assert done.returncode == 0 and table.returncode == 0, done.stderr + table.stderr
    sends = [row for row in map(json.loads, done.stdout.splitlines()) if row["action"] == "send"]
    assert sends
    for row in sends:
        eml = BytesParser(policy=policy.default).parsebytes(Path(str(row["eml"])).read_bytes())
        assert row["subject"] == eml["Subject"], (row["subject"], eml["Subject"])
        assert len(eml["Subject"]) <= 200 and "=?" not in eml["Subject"]
        assert f" {eml['Subject']}\n" in table.stdout


def test_rows_planned_but_not_yet_claimed_preview_with_the_message_id_their_claim_gives(
    site: Site, smtp_server: RecordingServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planning leaves the Message-ID to the first claim; preview of such rows shows the very one sent."""
    from worker import pipeline
    from worker.core.audiences import message_id_for

    deps = Deps.build(site.settings)
    try:
        planned = pipeline.plan(deps.store, site.settings, T)
    finally:
        deps.close()
    assert sum(planned.created.values()) > 5
    assert {mid for _, mid in _message_ids(site)} == {None}
    before = _fingerprint(site)

    out = tmp_path / "preview-out"
    code, lines = _preview_json(site, "--out", str(out))
    assert code == 0 and _fingerprint(site) == before
    parser = BytesParser(policy=policy.default)
    shown = {str(parser.parsebytes(p.read_bytes())["Message-ID"]) for p in out.glob("*.eml")}
    sends = [str(r["dedupe_key"]) for r in lines if r["action"] == "send"]
    assert shown == {message_id_for(key, site.settings.shop.domain) for key in sends} and len(shown) > 5

    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_SECRET)
    deps = Deps.build(site.settings)
    deps.clock = FixedClock(T)
    try:
        asyncio.run(running.cycle(deps))
    finally:
        deps.close()
    assert {str(parser.parsebytes(m.data)["Message-ID"]) for m in smtp_server.messages} == shown


def _message_ids(site: Site) -> list[tuple[str, str | None]]:
    engine = sa.create_engine(f"sqlite:///{site.db_path}")
    with engine.connect() as conn:
        out = [(r.dedupe_key, r.message_id) for r in conn.execute(sa.select(M.c.dedupe_key, M.c.message_id))]
    engine.dispose()
    return out


@pytest.mark.parametrize("zone", ["Mars/Olympus", "", "localtime", "Factory"])
def test_a_customer_whose_time_zone_is_unknown_is_shown_on_the_shops_clock_that_the_policy_used(
    tmp_path: Path, zone: str
) -> None:
    # Given a one-time buyer due win-back whose stored time zone this machine does not know (a database written
    # by a host with newer time zone data, or by hand), or is one the importer refuses as saying where no customer
    # is (localtime: the reading host's own zone; Factory: "-00"): the contact policy reads the shop's clock for them
    site = make_site(tmp_path / "shop", extra_toml='[policy]\nquiet_hours_start = "21:00"\nquiet_hours_end = "08:00"\n')
    load_shop(site.settings, ShopData([customer("C1", locale=Locale.EN)], PRODUCTS, [one_time_order("O1", "C1")]), T)
    engine = sa.create_engine(site.settings.database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE customer SET time_zone = :z"), {"z": zone})
    engine.dispose()

    # When the operator previews in the morning and at night, shop time (Asia/Jakarta)
    morning = site.cli("preview", "--at", "2026-11-22T10:00+07:00")
    night = site.cli("preview", "--at", "2026-11-22T22:00+07:00")

    # Then each lists the message on the shop's clock: sent at once, or deferred to the end of quiet hours there
    assert morning.returncode == 0, morning.stderr
    assert [line.split()[:6] for line in morning.stdout.splitlines() if line.startswith("C1 ")] == [
        ["C1", "winback/1", "d45", "2026-11-22", "10:00", "WIB"]]
    assert night.returncode == 0, night.stderr
    assert "defer until 2026-11-23 08:00 WIB (quiet hours)" in night.stdout


def test_json_lines_give_when_as_iso_8601_on_the_customers_clock_on_the_night_its_hour_repeats(
    tmp_path: Path,
) -> None:
    # Given a one-time buyer in New York due win-back, and no quiet hours
    site = make_site(tmp_path / "shop")
    buyer = replace(customer("C1", locale=Locale.EN), time_zone="America/New_York")
    load_shop(site.settings, ShopData([buyer], PRODUCTS, [one_time_order("O1", "C1", days_ago=80)]), T)

    # When the operator previews as JSON lines at 01:30 the second time, the night New York's clocks go back
    at = datetime(2026, 11, 1, 6, 30, tzinfo=UTC)
    done = site.cli("preview", "--at", at.isoformat(), "--json")

    # Then "when" is ISO 8601, as a deferral's "until" is, with the offset of the customer's clock then (EST,
    # -05:00): it was "2026-11-01 01:30 EST", the table's text, which jq and datetime.fromisoformat cannot read
    assert done.returncode == 0, done.stderr
    send = [row for row in map(json.loads, done.stdout.splitlines()) if row["action"] == "send"]
    assert [row["when"] for row in send] == ["2026-11-01T01:30:00-05:00"]
    assert datetime.fromisoformat(str(send[0]["when"])) == at


def test_customers_imported_without_a_time_zone_keep_quiet_hours_on_the_shops_clock(tmp_path: Path) -> None:
    # Given a shop in London, whose customers file has no time_zone column, and one of them due win-back
    site = make_site(tmp_path / "shop", extra_toml=(
        '[shop]\ntime_zone = "Europe/London"\n\n[policy]\nquiet_hours_start = "21:00"\nquiet_hours_end = "08:00"\n'))
    (tmp_path / "customers.csv").write_text("id,email,name,locale,marketing_consent\nC1,c1@example.com,Ann,en,yes\n")
    (tmp_path / "orders.csv").write_text("order_id,customer_id,status,placed_at,total\n"
                                         "O1,C1,delivered,2026-09-20T10:00,89000\n")  # fmt: skip
    for kind in ("customers", "orders"):
        done = site.cli("import", kind, str(tmp_path / f"{kind}.csv"))
        assert done.returncode == 0, done.stderr

    # When the operator previews at 03:00 in London (10:00 in Jakarta)
    night = site.cli("preview", "--at", "2026-11-22T03:00+00:00")

    # Then the email waits for the end of quiet hours on the shop's clock, the customer's for want of their own
    assert night.returncode == 0, night.stderr
    assert "defer until 2026-11-22 08:00 GMT (quiet hours)" in night.stdout, night.stdout


@pytest.mark.parametrize(("category", "subject"), [
    ("Tas", "New at Toko Kembali: Tas Rotan Baru"),
    ("", "Our customers' favourites at Toko Kembali"),  # no category to match: the best sellers, not called new
])  # fmt: skip
def test_new_products_news_is_called_new_only_when_it_shows_launches_from_their_categories(
    tmp_path: Path, category: str, subject: str
) -> None:
    # Given a shop whose products are all in `category`, one launched three days ago, and a best seller that is old;
    # a customer who bought another old product of it 20 days ago (C2, without consent, made the best seller)
    site = make_site(tmp_path / "shop", extra_toml="[campaigns.new_products]\nenabled = true\n")
    def product(ext: str, name: str, days_ago: int) -> ProductRecord:
        return ProductRecord(ext, name, category, 100_000, "IDR", f"https://toko.example/{ext}", "",
                             T - timedelta(days=days_ago), True)  # fmt: skip
    load_shop(site.settings, ShopData(
        [customer("C1", locale=Locale.EN), customer("C2", consent=False)],
        [product("P-OLD", "Tas Rotan Lama", 300), product("P-BEST", "Sandal Laris", 300),
         product("P-NEW", "Tas Rotan Baru", 3)],
        [OrderRecord("O1", "C1", OrderStatus.DELIVERED, T - timedelta(days=20), None, 100_000, "IDR",
                     (OrderLineRecord("P-OLD", 1, 100_000),)),
         OrderRecord("O2", "C2", OrderStatus.DELIVERED, T - timedelta(days=200), None, 500_000, "IDR",
                     (OrderLineRecord("P-BEST", 5, 100_000),))],
    ), T)  # fmt: skip

    # When the operator previews the news
    code, lines = _preview_json(site, "--campaign", "new_products")

    # Then C1's email says "new" only when it lists the new product of a category they bought from
    assert code == 0
    assert [(row["customer"], row["subject"]) for row in lines if row["action"] == "send"] == [("C1", subject)]


def test_news_for_a_customer_who_owns_every_best_seller_shows_the_news_not_unsold_products_as_favourites(
    tmp_path: Path,
) -> None:
    # Given a shop whose one best seller (P-BEST) and other old products C1 bought 20 days ago, and which since
    # launched P-NEW in a category C1 never bought from; P-DUD, old, never sold
    site = make_site(tmp_path / "shop", extra_toml="[campaigns.new_products]\nenabled = true\n")
    def product(ext: str, name: str, category: str, days_ago: int) -> ProductRecord:
        return ProductRecord(ext, name, category, 100_000, "IDR", f"https://toko.example/{ext}", "",
                             T - timedelta(days=days_ago), True)  # fmt: skip
    load_shop(site.settings, ShopData(
        [customer("C1", locale=Locale.EN)],
        [product("P-BEST", "Sandal Laris", "Sandal", 300), product("P-DUD", "Payung Sepi", "Payung", 300),
         product("P-NEW", "Tas Rotan Baru", "Tas", 3)],
        [OrderRecord("O1", "C1", OrderStatus.DELIVERED, T - timedelta(days=20), None, 100_000, "IDR",
                     (OrderLineRecord("P-BEST", 1, 100_000),))],
    ), T)  # fmt: skip

    # When the operator previews the news, the email written out
    done = site.cli("preview", "--at", T.isoformat(), "--campaign", "new_products", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    (eml,) = (tmp_path / "out").glob("*.eml")
    mail = BytesParser(policy=policy.default).parsebytes(eml.read_bytes())
    text = mail.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]

    # Then it shows what is new since their last order, as news: not a product no one bought as "what our customers
    # love most"
    assert mail["Subject"] == "New at Toko Kembali: Tas Rotan Baru"
    assert "Something new since your last order:" in text and "love most" not in text, text
    assert "Tas Rotan Baru" in text and "Payung Sepi" not in text, text


def test_customers_imported_without_a_language_are_written_to_in_the_shops(tmp_path: Path) -> None:
    # Given a shop whose default language is English, and a customers file without a locale column
    site = make_site(tmp_path / "shop", extra_toml='[shop]\ndefault_locale = "en"\n')
    (tmp_path / "customers.csv").write_text("id,email,name,marketing_consent\nC1,c1@example.com,Ann,yes\n")
    (tmp_path / "orders.csv").write_text("order_id,customer_id,status,placed_at,total\n"
                                         "O1,C1,delivered,2026-09-20T10:00,89000\n")  # fmt: skip
    for kind in ("customers", "orders"):
        done = site.cli("import", kind, str(tmp_path / f"{kind}.csv"))
        assert done.returncode == 0, done.stderr

    # When the operator previews
    code, lines = _preview_json(site)

    # Then the win-back email is the English one
    assert code == 0
    sends = [row["subject"] for row in lines if row["action"] == "send"]
    assert sends == ["Ann, we miss you! Here's 10% off, just for you"]


def test_campaign_and_customer_choose_what_preview_shows_not_what_it_decides(tmp_path: Path) -> None:
    # Given C1, whose birthday is today, due a feedback request and win-back too; and C2, a guest checkout of the
    # same person (one mailbox), due win-back
    site = make_site(tmp_path / "shop", extra_toml=(
        "[campaigns.birthday]\nenabled = true\ndays_before = 0\nholdout_share = 0.0\n\n"
        "[campaigns.feedback]\nenabled = true\n\n[campaigns.winback]\nholdout_share = 0.0\n"))
    people = [CustomerRecord("C1", "c1@example.com", "Ani", Locale.EN, "Asia/Jakarta", date(1990, 11, 22), True, "",
                             ""),
              CustomerRecord("C2", "C1@Example.com", "Ani", Locale.EN, "Asia/Jakarta", None, True, "", "")]
    orders = [OrderRecord("O1", "C1", OrderStatus.DELIVERED, T - timedelta(days=50), T - timedelta(days=8), 100_000,
                          "IDR"),
              OrderRecord("O2", "C2", OrderStatus.DELIVERED, T - timedelta(days=50), None, 100_000, "IDR")]
    load_shop(site.settings, ShopData(people, PRODUCTS, orders), T)

    def lines(*args: str) -> list[str]:
        done = site.cli("preview", "--at", "2026-11-22T10:00+07:00", *args)
        assert done.returncode == 0, done.stderr
        return [" ".join(line.split()) for line in done.stdout.splitlines() if line.startswith("C")]

    # When the operator previews everything, then one campaign, one customer, two campaigns named low first
    everything = lines()
    # Then the birthday offer takes the mailbox's slot today in every preview, shown or not
    later = "defer until 2026-11-25 10:00 WIB (cap: 1 email per 3 days, 4 emails per 30 days)"
    assert everything == [
        "C1 birthday 2026-11-22 10:00 WIB Happy birthday, Ani! Enjoy 15% off, on us",
        f"C1 feedback - {later}", f"C1 winback/1 d45 - {later}", f"C2 winback/1 d45 - {later}",
    ]  # fmt: skip
    assert lines("--campaign", "feedback") == [f"C1 feedback - {later}"]
    assert lines("--customer", "C2") == [f"C2 winback/1 d45 - {later}"]
    assert lines("--campaign", "winback", "--campaign", "birthday") == [everything[0], *everything[2:]]


def test_out_files_are_whole_or_absent_when_writing_fails_part_way(tmp_path: Path) -> None:
    # Given a shop whose English win-back HTML is long (72 KB), and a preview process that may write files of at
    # most 48 KiB (RLIMIT_FSIZE: a disk that fills up part-way through a file, as ENOSPC does)
    import resource
    import subprocess
    import sys

    from tests.shop_fixtures import REPO

    site = make_site(tmp_path / "shop", copy_templates=True)
    load_shop(site.settings, generate_shop(seed=11, customers=80, now=T - timedelta(days=1)), T)
    body = site.folder / "templates" / "winback" / "en" / "body.html"
    tag = "{% block content %}"
    body.write_text(body.read_text(encoding="utf-8").replace(tag, tag + "<p>" + "Batik tulis asli. " * 4000 + "</p>"))
    out = tmp_path / "preview-out"

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, 48 * 1024))

    # When the operator previews into a folder
    done = subprocess.run(
        [sys.executable, "-m", "worker", "--config", str(site.config), "preview", "--at", T.isoformat(),
         "--out", str(out)],
        cwd=REPO, env={**site.env(), "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True, text=True, timeout=120,
        preexec_fn=limit_file_size, check=False,
    )  # fmt: skip

    # Then the write that failed is reported by file, without a traceback, and the preview stops (exit 2)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "cannot write" in done.stderr and "_C-" in done.stderr and "File too large" in done.stderr
    # And every file in the folder is whole: the Indonesian messages written before it, nothing of the English one
    written = sorted(out.iterdir())
    emls = [p for p in written if p.suffix == ".eml"]
    assert emls, written
    pairs = sorted([p.name for p in emls] + [p.with_suffix(".html").name for p in emls])
    assert [p.name for p in written] == pairs, "only the .eml and .html of whole messages"
    for path in emls:
        raw = path.read_bytes()
        assert raw.endswith(b"--\r\n"), path  # the closing boundary: the message is whole
        assert path.with_suffix(".html").read_text(encoding="utf-8").rstrip().endswith("</html>")

    # When a preview killed while writing left a hidden partial file, and the operator previews again (no limit)
    (out / ".0002-winback_C-0006_x.eml.partial").write_bytes(b"Date: cut short")
    again = site.cli("preview", "--at", T.isoformat(), "--out", str(out))

    # Then the folder holds whole messages only
    assert again.returncode == 0, again.stderr
    assert not list(out.glob(".*")), "no partial file left"
    assert all(p.read_bytes().endswith(b"--\r\n") for p in out.glob("*.eml"))


def test_out_into_a_folder_of_an_earlier_preview_holds_only_this_previews_messages(tmp_path: Path) -> None:
    # Given a folder an earlier preview wrote 5 messages to, and files of the operator's own, some named by date
    # as a preview names its messages by number (they were taken for an earlier preview's, and removed)
    site = make_site(tmp_path / "shop")
    load_shop(site.settings, generate_shop(seed=11, customers=80, now=T - timedelta(days=1)), T)
    out = tmp_path / "preview-out"
    assert site.cli("preview", "--at", T.isoformat(), "--out", str(out), "--limit", "5").returncode == 0
    assert len(list(out.glob("*.eml"))) == 5
    mine = ["notes.txt", "2026-11-campaign-plan.html", "20261122-newsletter.eml", "0001-draft.html"]
    for name in mine:
        (out / name).write_text("mine")

    # When the operator previews into it again, and 2 messages would be sent now
    done = site.cli("preview", "--at", T.isoformat(), "--out", str(out), "--limit", "2")

    # Then the folder holds this preview's 2 messages, as the summary says, not 3 more of the earlier one
    assert done.returncode == 0, done.stderr
    assert f"2 messages written to {out}" in done.stdout
    assert "removed 10 files an earlier preview wrote" in done.stderr, done.stderr
    assert sorted(p.name[:5] for p in out.glob("*.eml") if p.name not in mine) == ["0001-", "0002-"]
    assert len([p for p in out.glob("*.html") if p.name not in mine]) == 2
    assert [(out / name).read_text() for name in mine] == ["mine"] * len(mine)
    # and one message is "1 message written", not "1 messages"
    done = site.cli("preview", "--at", T.isoformat(), "--out", str(out), "--limit", "1")
    assert done.returncode == 0 and f"\n1 message written to {out} (.eml and .html)\n" in done.stdout, done.stdout


def test_an_empty_out_is_refused_not_read_as_the_current_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a script's `kembali preview --out "$PREVIEW_DIR"` with its variable empty, run in the shop's folder
    config = migrated_config(tmp_path)
    config.write_text(config.read_text() + f'[templates]\ndir = "{TEMPLATES}"\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())
    # When it runs, it is refused naming the option (it wrote its .eml and .html files into the shop's folder,
    # after removing those an earlier preview had written there)
    code, out = run_cli(capsys, "--config", str(config), "preview", "--out", "")
    assert code == 2 and "argument --out: empty: name the file or folder, or leave the option out" in out
    assert sorted(tmp_path.iterdir()) == before


def test_a_preview_as_of_a_past_moment_says_it_plans_on_todays_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a shop's config (an operator asking what yesterday's 09:00 pass planned, or mistyping the year)
    config = migrated_config(tmp_path)
    config.write_text(config.read_text() + f'[templates]\ndir = "{TEMPLATES}"\n', encoding="utf-8")
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat(timespec="minutes")
    # When the preview is asked as of that past moment, it says that today's data is planned on: orders placed and
    # messages sent since count (at 1970 it thanked a customer for the 6 orders of 2026, without a word)
    code, out = run_cli(capsys, "--config", str(config), "preview", "--at", past)
    assert code == 0, out
    assert ("note: --at is before now: the preview plans on the shop's data and the ledger as they are now (orders "
            "placed and messages sent since then count), not as they were then") in out
    # And one of a moment to come says nothing of it, nor one without --at (now, which has passed when it is compared),
    # nor one of this very minute (`--at $(date -Iminutes)`: its seconds cut off, not a past pass asked about)
    this_minute = datetime.now(UTC).isoformat(timespec="minutes")
    for at in (["--at", "2099-01-01T09:00+07:00"], [], ["--at", this_minute]):
        code, out = run_cli(capsys, "--config", str(config), "preview", *at)
        assert code == 0 and "--at is before now" not in out, out
