"""Shop data that got into the database some other way than today's importer (an earlier Kembali, a shop's own
sync, a hand edit), sent through a real SMTP server and read there as a mail client reads it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import cast

import pytest
import sqlalchemy as sa

from tests.clikit import migrated_config
from tests.clikit import run_cli as kembali
from tests.sendkit import NOW, Shop, make_settings, settings_dict, write_config
from tests.smtp_server import RecordingServer
from worker import cli
from worker.adapters import shop as shop_data
from worker.adapters.store import M
from worker.core.render import HEADER_TEXT_MAX_CHARS, product_dict, sanitize_header_text
from worker.domain import CustomerSnapshot, Locale, ProductRecord, ProductView

ADDRESS = "ani@test.example"


@pytest.fixture
def shop(sqlite_url: str, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shop]:
    """One customer due a win-back for product P-1."""
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")
    shop = Shop(sqlite_url, make_settings(sqlite_url, smtp_server.port), [ADDRESS])
    try:
        yield shop
    finally:
        shop.close()


SCRIPTED_LINKS = [
    "javascript:alert(document.cookie)",
    "JavaScript:alert(1)",
    "vbscript:msgbox(1)",
    "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
    "file:///etc/passwd",
    "//evil.example/p/1",
    "/p/1",
    "https:/p/1",
]


def test_a_stored_product_link_that_is_no_web_address_never_reaches_the_email(
    shop: Shop, smtp_server: RecordingServer
) -> None:
    # Given the product the customer bought, stored with a script as its link and a data: URI as its picture
    # (the importer refuses both; a row written past it keeps them)
    shop_data.upsert_products(shop.store.engine, [ProductRecord(
        "P-1", "Kopi Gayo 250 g", "kopi", 85_000_00, "IDR", "javascript:alert(document.cookie)",
        "data:image/svg+xml;base64,PHN2Zy8+", None, True)], NOW)  # fmt: skip

    # When the win-back email is sent
    report = shop.cycle()
    assert report.dispatched.outcomes["sent"] == 1, report

    # Then what arrives links the product to the shop and shows no picture: no script, no data: URI in either part
    [received] = smtp_server.messages
    message = cast(EmailMessage, BytesParser(policy=policy.default).parsebytes(received.data))
    text, html = (cast(EmailMessage, part).get_content() for part in message.iter_parts())
    for part in (text, html):
        assert "javascript:" not in part.lower() and "data:image" not in part, part
    hrefs = re.findall(r'href="([^"]*)"', html)
    assert hrefs and all(h.startswith(("https://", "mailto:")) for h in hrefs), hrefs
    assert "<img" not in html or "data:" not in html


@pytest.mark.parametrize("link", SCRIPTED_LINKS)
def test_a_stored_link_that_is_no_http_address_links_to_the_shop(link: str) -> None:
    product = ProductView("P-1", "Kopi", "", 89_000_00, "IDR", link, link)
    shown = product_dict(product, "https://toko.example/")
    assert (shown["url"], shown["image_url"]) == ("https://toko.example/", ""), shown


@pytest.mark.parametrize("link", ["https://toko.example/p/kopi", "HTTP://toko.example/p/kopi?x=1#y"])
def test_a_stored_web_address_is_kept(link: str) -> None:
    product = ProductView("P-1", "Kopi", "", 89_000_00, "IDR", link, link)
    shown = product_dict(product, "https://toko.example/")
    assert (shown["url"], shown["image_url"]) == (link, link), shown


# --- the import report's line numbers ----------------------------------------------------------------------------


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_carriage_return_inside_a_quoted_name_does_not_shift_the_line_numbers_of_the_rows_after_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], newline: str
) -> None:
    # Given a customers file whose lines end in LF (or CRLF), a name holding a lone carriage return (a spreadsheet
    # cell's line break from an old Mac), and a bad address two rows further down, on the file's line 4 as an
    # editor, grep -n or sed count lines
    config = migrated_config(tmp_path)
    rows = ["id,email,name,marketing_consent", 'C-1,c1@example.com,"Ani\rSusanto",ya', "C-2,c2@example.com,Budi,ya",
            "C-3,not-an-address,Citra,ya", 'C-4,c4@example.com,"Dewi\r\rLestari",ya', "C-5,@,Eko,ya"]
    path = tmp_path / "customers.csv"
    path.write_bytes(newline.join(rows).encode() + newline.encode())
    assert [n for n, line in enumerate(path.read_bytes().split(b"\n"), 1) if line.startswith(b"C-3")] == [4]
    # When it is imported
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(path))
    # Then the bad rows are named at the lines they are on
    assert code == 1, out
    assert "customers.csv:4: id 'C-3': invalid email address" in out, out
    assert "customers.csv:6: id 'C-5': invalid email address" in out, out


def test_a_file_whose_lines_end_in_a_carriage_return_alone_is_numbered_by_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a file saved as an old Mac Excel saves CSV: each line ends in a carriage return alone
    config = migrated_config(tmp_path)
    path = tmp_path / "customers.csv"
    path.write_bytes(b"id,email,name,marketing_consent\rC-1,c1@example.com,Ani,ya\rC-2,nope,Budi,ya\r")
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(path))
    assert code == 1, out
    assert "customers.csv:3: id 'C-2': invalid email address" in out, out


# --- a subject cut to its length ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Z" + "\u0301" * 300, "Z" + "\u0301" * 199, "\U0001f469" + "\u200d\U0001f469" * 150])
def test_a_subject_opening_with_one_letter_under_hundreds_of_marks_is_cut_inside_it_not_to_nothing(name: str) -> None:
    # a name of one letter with hundreds of combining accents ("Zalgo" text) or of one endless emoji sequence is
    # one character a reader sees: cutting the subject back to where it ends left "..." for a subject
    subject = f"{name}, masih suka Kopi Gayo? Diskon 10% khusus untuk Kakak"
    cut = sanitize_header_text(subject)
    assert cut.startswith(name[:10]) and cut.endswith("...") and len(cut) <= HEADER_TEXT_MAX_CHARS, cut


@pytest.mark.parametrize("name", ["Siti \U0001f469\u200d\U0001f469\u200d\U0001f467", "Siti e\u0301\u0301"])
def test_a_subject_is_still_cut_where_a_short_character_a_reader_sees_ends(name: str) -> None:
    subject = "x" * (HEADER_TEXT_MAX_CHARS - 3 - len(name) + 2) + name + " tail"
    assert sanitize_header_text(subject) == "x" * (HEADER_TEXT_MAX_CHARS - 3 - len(name) + 2) + "Siti..."


# --- names that show nothing ----------------------------------------------------------------------------------

BLANK_LETTERS = ["\u3164", "\u3164 \u3164", "\u115f\u1160", "\uffa0", "\u2800\u2800", "\u034f"]
"""Names that are printable to Python and show nothing: Hangul fillers (a letter to ``str.isalpha``), the braille
blank, the combining grapheme joiner: the blank names games and forms are fed."""


@pytest.mark.parametrize("name", BLANK_LETTERS)
def test_a_name_of_characters_that_show_nothing_is_a_rejected_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    config = migrated_config(tmp_path)
    path = tmp_path / "customers.csv"
    path.write_text(f"id,email,name,marketing_consent\nC-1,c1@example.com,{name},ya\nC-2,c2@example.com,Budi,ya\n",
                    encoding="utf-8")
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(path))
    assert code == 1, out
    assert "customers.csv:2: id 'C-1': invalid name" in out and "(nothing readable" in out, out
    assert "customers: 1 created, 0 updated, 0 unchanged, 1 rejected" in out, out


@pytest.mark.parametrize("name", [*BLANK_LETTERS, "Ibu \u3164", "\u3164\u3164 Budi"])
def test_a_stored_name_that_shows_nothing_greets_no_one_by_it(name: str) -> None:
    customer = CustomerSnapshot(1, "C-1", "c1@example.com", name, Locale.ID, "Asia/Jakarta", None, True)
    assert customer.first_name == ("Budi" if name.endswith("Budi") else ""), customer.first_name


# --- what `kembali stats` prints of the ledger -----------------------------------------------------------------

ESCAPES = "\x1b[31m\x9b2J\u202e\u2028"
"""A terminal escape (ESC [ and the C1 CSI), a bidi override and a line separator."""


@pytest.mark.parametrize("json_out", [False, True])
def test_stats_print_a_hand_edited_campaign_or_skip_reason_with_its_escapes_shown_not_obeyed(
    shop: Shop, smtp_server: RecordingServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], json_out: bool
) -> None:
    # Given a win-back sent, and two ledger rows an operator (or another program) wrote by hand: one of a campaign
    # whose name holds a terminal escape, one skipped for such a reason (`kembali ledger list` escapes both)
    shop.cycle()
    customer_id = shop.row(ADDRESS).customer_id
    with shop.store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE message SET campaign = :c"), {"c": f"evil{ESCAPES}"})
        conn.execute(sa.insert(M).values(
            dedupe_key="hand:1", campaign="winback", step=1, priority=0, customer_id=customer_id,
            email=ADDRESS, status="skipped", skip_reason=f"why{ESCAPES}", due_at=NOW, expires_at=NOW,
            next_attempt_at=NOW, attempts=0, message_id="<hand-1@test.example>", created_at=NOW, updated_at=NOW))
    config = write_config(tmp_path / "config.toml", settings_dict(shop.settings.database_url, smtp_server.port))
    # When the operator reads the stats on a terminal
    capsys.readouterr()
    code = cli.main(["--config", str(config), "stats", "--now", "2026-11-23T03:00Z", *(["--json"] if json_out else [])])
    out = capsys.readouterr().out
    # Then both are shown with each escape written out, none of them raw
    assert code == 0, out
    assert not any(ch in out for ch in "\x1b\x9b\u202e\u2028"), out
    assert "evil\\u001b[31m\\u009b2J\\u202e\\u2028" in out and "why\\u001b[31m\\u009b2J\\u202e\\u2028" in out, out


def test_suppress_list_shows_a_hand_edited_reason_or_source_with_its_escapes_written_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a suppression an operator (or another program) wrote into the table by hand, its reason and source
    # holding a terminal escape and a line break (`suppress add` and `import` refuse both)
    config = migrated_config(tmp_path)
    assert cli.main(["--config", str(config), "suppress", "add", "budi@example.com"]) == 0
    url = next(line.split('"')[1] for line in config.read_text().splitlines() if line.startswith("url"))
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE suppression SET reason = :r, source = :s"),
                     {"r": "bounce\x1b[31m\u202e", "s": "sync\n\x9b2J"})  # fmt: skip
    engine.dispose()
    # When the list is printed on the operator's terminal
    capsys.readouterr()
    assert cli.main(["--config", str(config), "suppress", "list"]) == 0
    out = capsys.readouterr().out
    # Then the row is one line, its escapes written out
    assert not any(ch in out for ch in "\x1b\x9b\u202e"), out
    assert out.splitlines()[1].startswith("budi@example.com,bounce\\u001b[31m\\u202e,sync\\n\\u009b2J,"), out
