"""What a customer reads: whole emails sent by a real cycle to a real aiosmtpd server on 127.0.0.1:0, parsed as
a mail client parses them, for shop data as shops have it (abbreviated names, products without a picture or a
link)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from datetime import date, timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from html.parser import HTMLParser

import pytest

from tests.shop import LINK_KEY, NOW, customer, make_shop, one_time_order, settings_for
from tests.smtp_server import RecordingServer
from worker.adapters import shop
from worker.adapters.store import Store
from worker.adapters.templates import JinjaTemplates
from worker.app import Deps
from worker.commands.running import cycle
from worker.config import Settings
from worker.core import tokens
from worker.domain import Locale, ProductRecord
from worker.testing import FakeClock


@pytest.fixture(autouse=True)
def link_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)


def _send(settings: Settings, store: Store) -> None:
    deps = Deps(settings=settings, store=store, templates=JinjaTemplates(settings.resolve(settings.templates.dir)),
                clock=FakeClock(NOW))
    asyncio.run(cycle(deps))


def _received(server: RecordingServer) -> dict[str, EmailMessage]:
    out: dict[str, EmailMessage] = {}
    for m in server.messages:
        parsed = BytesParser(policy=policy.default).parsebytes(m.data)
        assert isinstance(parsed, EmailMessage)
        out[m.rcpt_tos[0]] = parsed
    return out


def _parts(message: EmailMessage) -> tuple[str, str]:
    text, html = message.get_body(("plain",)), message.get_body(("html",))
    assert text is not None and html is not None
    return str(text.get_content()), str(html.get_content())


@pytest.mark.parametrize(
    ("name", "locale", "greeting", "subject_start"),
    [
        ("M. Rizky Pratama", Locale.ID, "Halo Kak Rizky,", "Kak Rizky, "),  # M. is Muhammad: not "Halo Kak M.,"
        ("MOH. ARIF HIDAYAT", Locale.ID, "Halo Kak Arif,", "Kak Arif, "),
        ("Muh Yusuf", Locale.ID, "Halo Kak Yusuf,", "Kak Yusuf, "),
        ("A. Yani", Locale.EN, "Hi Yani,", "Yani, "),
        ("KH. Ahmad Dahlan", Locale.ID, "Halo Kak Ahmad,", "Kak Ahmad, "),
        ("Raden Mas Suryo", Locale.ID, "Halo Kak Suryo,", "Kak Suryo, "),
        ("Teuku Umar", Locale.EN, "Hi Umar,", "Umar, "),
        ("siti.rahayu@gmail.com", Locale.ID, "Halo Kakak,", "Kakak, "),  # the address typed as the name
        ("R.", Locale.EN, "Hi there,", "Still "),  # an initial alone is no name to greet by
        ("KAKAK", Locale.ID, "Halo Kakak,", "Kakak, "),  # not "Halo Kak Kakak,"
    ],
)
def test_a_customer_is_greeted_by_their_name_not_an_initial_a_title_or_their_address(
    sqlite_url: str, smtp_server: RecordingServer, name: str, locale: Locale, greeting: str, subject_start: str
) -> None:
    # Given a quiet one-time buyer whose name starts with an abbreviation or a title, or is their email address
    store = make_shop(sqlite_url, [customer("C1", name=name, locale=locale)], [one_time_order("O1", "C1")])
    # When a cycle sends them a win-back email
    _send(settings_for(sqlite_url, smtp={"port": smtp_server.port}), store)
    # Then the subject, the text part and the HTML part greet them by their name (or the fallback)
    message = _received(smtp_server)["c1@example.com"]
    text, html = _parts(message)
    assert str(message["Subject"]).startswith(subject_start), message["Subject"]
    assert greeting in text.splitlines(), text
    assert f">{greeting}</p>" in html


class _Table(HTMLParser):
    """The products table of an HTML part: for each row, its cells' widths in columns and the links in it."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[int]] = []
        self.hrefs: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "tr":
            self.rows.append([])
        elif tag == "td" and self.rows:
            self.rows[-1].append(int(found.get("colspan") or 1))
        elif tag == "a":
            self.hrefs.append(found.get("href"))


def test_products_without_a_picture_or_a_link_are_shown_whole_and_link_nowhere_empty(
    sqlite_url: str, smtp_server: RecordingServer
) -> None:
    # Given a shop whose products.csv gives a picture for some products only, and no link for some
    store = make_shop(sqlite_url, [customer("C1", locale=Locale.EN), customer("C2")],
                      [one_time_order("O1", "C1"), one_time_order("O2", "C2")])  # fmt: skip
    shop.upsert_products(store.engine, [
        ProductRecord("P-KOPI", "Kopi Gayo 250g", "Kopi", 89_000_00, "IDR", "", "", NOW - timedelta(days=300), True),
        ProductRecord("P-KOPI2", "Kopi Toraja 250g", "Kopi", 99_000_00, "IDR", "https://toko.example/p/kopi2",
                      "https://toko.example/img/kopi2.jpg", NOW - timedelta(days=100), True),
        ProductRecord("P-KOPI3", "Kopi Kintamani 200g", "Kopi", 79_000_00, "IDR", "", "",
                      NOW - timedelta(days=90), True),
    ], NOW)  # fmt: skip
    # When a cycle sends both customers their win-back email (the one they bought, and two recommendations)
    _send(settings_for(sqlite_url, smtp={"port": smtp_server.port}), store)
    received = _received(smtp_server)
    assert set(received) == {"c1@example.com", "c2@example.com"}
    for message in received.values():
        text, html = _parts(message)
        # Then in the HTML every row of the product table spans the same columns (a row without a picture is not
        # squeezed into the pictures' narrow column), and no link is empty (a click that goes nowhere)
        table = _Table()
        products = re.search(r"<table(?:(?!<table).)*?Kopi Toraja 250g.*?</table>", html, re.DOTALL)
        assert products is not None, html
        table.feed(products.group())
        widths = {sum(cells) for cells in table.rows if cells}
        assert len(widths) == 1, table.rows
        assert all(href for href in table.hrefs), table.hrefs
        full = _Table()
        full.feed(html)
        assert all(href for href in full.hrefs), full.hrefs
        # and the text part has no line that is only spaces, and no "…:" left hanging before a link that is not there
        lines = text.splitlines()
        assert all(line.strip() or not line for line in lines), lines
        for i, line in enumerate(lines):
            if line.endswith(":") and "Kopi Gayo 250g" in line:
                assert lines[i + 1].startswith("https://"), lines[i : i + 2]
        assert "Kopi Kintamani 200g: Rp79.000" in text and "Kopi Toraja 250g: Rp99.000" in text


def test_a_birthday_offer_sent_before_the_day_says_when_the_birthday_is(
    sqlite_url: str, smtp_server: RecordingServer
) -> None:
    # Given birthday offers sent three days ahead (as the shipped config.toml does), on 22 November 2026 at 10:00
    # in Jakarta: C1's birthday is on the 25th, C2's is today, C3's (in English) on the 24th
    born = {"C1": date(1990, 11, 25), "C2": date(1991, 11, 22), "C3": date(1992, 11, 24)}
    people = [dataclasses.replace(customer(ext, name=f"Siti {ext}", locale=Locale.EN if ext == "C3" else Locale.ID),
                                  birthday=day) for ext, day in born.items()]  # fmt: skip
    store = make_shop(sqlite_url, people, [])
    settings = settings_for(sqlite_url, smtp={"port": smtp_server.port},
                            campaigns={"winback": {"enabled": False},
                                       "birthday": {"enabled": True, "days_before": 3}})  # fmt: skip
    # When a cycle sends them
    _send(settings, store)
    received = _received(smtp_server)
    assert set(received) == {"c1@example.com", "c2@example.com", "c3@example.com"}
    early_id, today_id, early_en = (_parts(received[f"c{i}@example.com"]) for i in (1, 2, 3))
    # Then an offer before the day names the day and wishes it early, in the subject, the text and the HTML;
    # on the day it wishes a happy birthday
    assert "Selamat ulang tahun lebih awal" in str(received["c1@example.com"]["Subject"])
    for part in early_id:
        assert "tanggal 25 November 2026" in part and "Selamat ulang tahun lebih awal!" in part, part
    assert "Happy early birthday" in str(received["c3@example.com"]["Subject"])
    for part in early_en:
        assert "on November 24, 2026" in part and "Happy early birthday!" in part, part
    assert str(received["c2@example.com"]["Subject"]).startswith("Selamat ulang tahun, Kak Siti!")
    for part in today_id:
        assert "Selamat ulang tahun! Semoga sehat" in part and "lebih awal" not in part and "tanggal" not in part


def test_a_birthday_offer_suggests_what_the_customer_does_not_have_from_what_they_bought_from_first(
    sqlite_url: str, smtp_server: RecordingServer
) -> None:
    # Given Siti, whose birthday is today and who bought the shop's best seller (Kopi Gayo), as Budi did
    siti = dataclasses.replace(customer("C1", name="Siti Aminah", locale=Locale.EN), birthday=date(1990, 11, 22))
    store = make_shop(sqlite_url, [siti, customer("C2")],
                      [one_time_order("O1", "C1", days_ago=200), one_time_order("O2", "C2", days_ago=200)])
    settings = settings_for(sqlite_url, smtp={"port": smtp_server.port},
                            campaigns={"winback": {"enabled": False}, "birthday": {"enabled": True}})
    # When a cycle sends her birthday offer
    _send(settings, store)
    text, html = _parts(_received(smtp_server)["c1@example.com"])
    # Then "A few things you might like" leaves out the coffee she has (it was the first of the three), and puts
    # the other coffee, from the category she bought from, before the batik shirt
    suggested = text.split("A few things you might like", 1)[1]
    assert "Kopi Gayo 250g" not in suggested and "Kopi Gayo 250g" not in html, text
    assert suggested.index("Kopi Toraja 250g") < suggested.index("Kemeja Batik Parang"), suggested


def test_a_birthday_offer_whose_planned_day_cannot_be_read_does_not_stop_the_others(
    sqlite_url: str, smtp_server: RecordingServer
) -> None:
    # Given a birthday offer in the ledger whose day is not the ISO date planning writes (edited by hand: 25-11-2026),
    # and another customer's birthday on the 25th, offers sent three days ahead
    born = {"C1": date(1990, 11, 25), "C2": date(1991, 11, 25)}
    people = [dataclasses.replace(customer(ext, name=f"Siti {ext}"), birthday=day) for ext, day in born.items()]
    store = make_shop(sqlite_url, people, [])
    with store.engine.begin() as conn:
        c1 = conn.exec_driver_sql("SELECT id FROM customer WHERE external_id = 'C1'").scalar_one()
        conn.exec_driver_sql(
            "INSERT INTO message (dedupe_key, campaign, step, priority, customer_id, email, status, due_at, expires_at,"
            " next_attempt_at, attempts, payload, created_at, updated_at, resent_after_attempts) VALUES"
            f" ('birthday:C1:2026', 'birthday', 1, 50, {c1}, 'c1@example.com', 'planned', '2026-11-22 00:00:00',"
            " '2026-11-26 00:00:00', '2026-11-22 00:00:00', 0, '{\"birthday\": \"25-11-2026\"}',"
            " '2026-11-22 00:00:00', '2026-11-22 00:00:00', 0)")
    settings = settings_for(sqlite_url, smtp={"port": smtp_server.port},
                            campaigns={"winback": {"enabled": False},
                                       "birthday": {"enabled": True, "days_before": 3}})  # fmt: skip
    # When a cycle sends
    _send(settings, store)
    # Then the other customer's offer goes, naming the day, where a ValueError stopped every cycle at the row; the
    # row edited by hand is skipped, its day not confirmed
    received = _received(smtp_server)
    assert set(received) == {"c2@example.com"}
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql(f"SELECT status, skip_reason FROM message WHERE customer_id = {c1}").all() == [
            ("skipped", "no_longer_due")]
    assert all("tanggal 25 November 2026" in part for part in _parts(received["c2@example.com"]))


def _hand_edited_row(store: Store, ext: str, key: str, campaign: str, payload: str) -> int:
    with store.engine.begin() as conn:
        cid = conn.exec_driver_sql(f"SELECT id FROM customer WHERE external_id = '{ext}'").scalar_one()
        conn.exec_driver_sql(
            "INSERT INTO message (dedupe_key, campaign, step, priority, customer_id, email, status, due_at, expires_at,"
            " next_attempt_at, attempts, payload, created_at, updated_at, resent_after_attempts) VALUES"
            f" ('{key}', '{campaign}', 1, 30, {cid}, '{ext.lower()}@example.com', 'planned', '2026-11-21 00:00:00',"
            f" '2026-12-20 00:00:00', '2026-11-21 00:00:00', 0, '{payload}', '2026-11-21 00:00:00',"
            " '2026-11-21 00:00:00', 0)")
    return int(cid)


def test_rows_whose_order_or_milestone_cannot_be_read_do_not_stop_the_others(
    sqlite_url: str, smtp_server: RecordingServer
) -> None:
    # Given rows edited by hand in the ledger: a win-back whose order is written as the shop's order number (O1), a
    # feedback request whose order is 'O2', a loyalty reward whose milestone is 'orders-five'; and a customer (C4)
    # due a win-back as planning writes it
    people = [customer(f"C{i}", name=f"Siti C{i}") for i in range(1, 5)]
    orders = [one_time_order(f"O{i}", f"C{i}", days_ago=60) for i in range(1, 5)]
    store = make_shop(sqlite_url, people, orders)
    edited = [
        _hand_edited_row(store, "C1", "winback:C1:O1", "winback", '{"first_order_id": "O1"}'),
        _hand_edited_row(store, "C2", "feedback:O2", "feedback", '{"order_id": "O2", "order": "O2"}'),
        _hand_edited_row(store, "C3", "loyalty:C3:orders-five", "loyalty", '{"milestone": "orders-five"}'),
    ]
    settings = settings_for(sqlite_url, smtp={"port": smtp_server.port},
                            campaigns={"feedback": {"enabled": True}, "loyalty": {"enabled": True}})  # fmt: skip
    # When a cycle sends
    _send(settings, store)
    # Then C4's win-back goes, where int('O1') stopped every cycle at the first such row and nothing else went; the
    # rows edited by hand are skipped, what they name not confirmed
    assert "c4@example.com" in _received(smtp_server)
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT customer_id, status, skip_reason FROM message WHERE customer_id IN"
            f" ({', '.join(map(str, edited))}) AND dedupe_key IN"
            " ('winback:C1:O1', 'feedback:O2', 'loyalty:C3:orders-five') ORDER BY customer_id").all()
    assert rows == [(cid, "skipped", "no_longer_due") for cid in edited]


def test_a_feedback_request_whose_row_names_no_order_id_is_not_sent_with_links_every_such_customer_shares(
    sqlite_url: str, smtp_server: RecordingServer
) -> None:
    # Given feedback requests written into the ledger by hand for C1 and C2 with the shop's order number but no
    # order_id (what planning writes: the order's database id, which the rating links name), and C3 due a feedback
    # request as planning writes it
    people = [customer(f"C{i}", name=f"Siti C{i}") for i in range(1, 4)]
    store = make_shop(sqlite_url, people, [one_time_order(f"O{i}", f"C{i}", days_ago=8) for i in range(1, 4)])
    edited = [_hand_edited_row(store, f"C{i}", f"feedback:O{i}", "feedback", f'{{"order": "O{i}"}}') for i in (1, 2)]
    settings = settings_for(sqlite_url, smtp={"port": smtp_server.port}, campaigns={"feedback": {"enabled": True}})
    # When a cycle sends
    _send(settings, store)
    # Then every rating link sent names an order of its own recipient: C1's and C2's named order 0, one rating for
    # both (the second to click was told "we already have your rating" and shown the first one's comment)
    with store.engine.connect() as conn:
        orders = dict(conn.exec_driver_sql("SELECT lower(c.external_id) || '@example.com', o.id FROM shop_order o"
                                           " JOIN customer c ON c.id = o.customer_id").all())  # fmt: skip
    rated: dict[str, set[str]] = {}
    for to, message in _received(smtp_server).items():
        for link in re.findall(r"/feedback\?t=([\w.=-]+)", _parts(message)[0]):
            verified = tokens.verify(link, [LINK_KEY.encode()], shop=tokens.shop_scope(settings.shop.domain))
            assert verified is not None
            rated.setdefault(to, set()).add(verified[1].rpartition(":")[0])
    assert rated == {"c3@example.com": {str(orders["c3@example.com"])}}
    # And the rows that name no order are skipped, as those naming one that cannot be read are
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT customer_id, status, skip_reason FROM message WHERE dedupe_key IN"
                                    " ('feedback:O1', 'feedback:O2') ORDER BY customer_id").all()
    assert rows == [(cid, "skipped", "no_longer_due") for cid in edited]


def test_a_product_launched_later_is_not_recommended_nor_shown_as_a_best_seller_before_its_launch(
    sqlite_url: str, smtp_server: RecordingServer
) -> None:
    # Given a shop whose products.csv lists a coffee launched in three days (a pre-announced product, its page not
    # live yet), and a tea launched two days ago; C1 bought coffee once, 60 days ago (win-back, whose
    # recommendations come from the bought categories), C2 bought coffee 10 days ago (the tea is news to C2 in a
    # category C2 never bought from, and C2 owns the shop's one best seller: new products shows the news itself)
    store = make_shop(sqlite_url, [customer("C1"), customer("C2", locale=Locale.EN)],
                      [one_time_order("O1", "C1"), one_time_order("O2", "C2", days_ago=10),
                       one_time_order("O3", "C2", days_ago=11)])  # fmt: skip
    shop.upsert_products(store.engine, [
        ProductRecord("P-SOON", "Kopi Kintamani Pre-order", "Kopi", 79_000_00, "IDR", "https://toko.example/p/soon", "",
                      NOW + timedelta(days=3), True),
        ProductRecord("P-TEH", "Teh Melati", "Teh", 39_000_00, "IDR", "https://toko.example/p/teh", "",
                      NOW - timedelta(days=2), True),
    ], NOW)  # fmt: skip
    settings = settings_for(sqlite_url, smtp={"port": smtp_server.port},
                            campaigns={"new_products": {"enabled": True, "max_products": 4}})  # fmt: skip
    # When a cycle sends C1's win-back email and C2's new-products email
    _send(settings, store)
    sent = {(m.rcpt_tos[0], BytesParser(policy=policy.default).parsebytes(m.data)["X-Kembali-Campaign"])
            for m in smtp_server.messages}  # fmt: skip
    assert sent == {("c1@example.com", "winback"), ("c2@example.com", "new_products")}
    # Then neither shows the coffee of three days from now, nor links to its page
    for message in _received(smtp_server).values():
        for part in _parts(message):
            assert "Kintamani" not in part and "/p/soon" not in part, part
    _, news = _parts(_received(smtp_server)["c2@example.com"])
    assert "Teh Melati" in news and "Kemeja Batik Parang" not in news  # (never sold: no best seller)
