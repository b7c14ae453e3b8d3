"""The pages a customer reaches from an email (unsubscribe, rating, thanks, a link that does not work), as a phone
gets them: the daemon's site on a real HTTP server (port 0) over a real SQLite file, in both languages, and, for
the layout, in a real headless Chromium at a phone's width (``tests.test_live_preview``'s ``browser``)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import html as html_text
import re
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.daemon_harness import Shop, http, make_shop
from tests.smtp_server import closed_port
from tests.test_copy import ENGLISH, OTHER_REGISTER
from tests.test_live_preview import browser  # noqa: F401 - the fixture
from worker.adapters.clock import SystemClock
from worker.adapters.web import Handler, HttpServer, Request, Response
from worker.asyncstore import AsyncStore
from worker.config import load_settings
from worker.core import tokens
from worker.domain import Locale
from worker.links import Site
from worker.metrics import Metrics

KEY = b"k" * 32
ONE_CLICK = b"List-Unsubscribe=One-Click"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
LONG_WORD = "BATIK" + "X" * 295
HOSTILE_COMMENT = f'<img src=x onerror=alert(1)> "kutip" \'satu\' \u202eterbalik\u202c {LONG_WORD} selesai'


_BLOCKS = ("h1", "p", "blockquote", "form", "hr", "label", "button", "textarea", "br")


class _Page(HTMLParser):
    """What a page holds for a reader: its visible text (by language), title, meta tags, buttons and labels."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lang = ""
        self.title = ""
        self.metas: list[dict[str, str | None]] = []
        self.buttons: list[str] = []
        self.labels: dict[str, str] = {}
        self.fields: list[str] = []
        self.tags: list[str] = []
        self.text: dict[str, list[str]] = {}
        self._stack: list[tuple[str, str]] = []  # (tag, language)
        self._button: list[str] | None = None
        self._label: tuple[str, list[str]] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        lang = a.get("lang") or (self._stack[-1][1] if self._stack else "")
        if tag == "html":
            self.lang = lang
        if tag == "meta":
            self.metas.append(a)
        if tag == "button":
            self._button = []
        if tag == "label":
            self._label = (a.get("for") or "", [])
        if tag in ("textarea", "input") and a.get("type") != "hidden":
            self.fields.append(a.get("id") or "")
        if tag not in ("meta", "input", "br", "hr"):
            self._stack.append((tag, lang))
        if tag in _BLOCKS:
            self.text.setdefault(lang, []).append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCKS:
            self.text.setdefault(self._stack[-1][1] if self._stack else "", []).append(" ")
        if tag == "button" and self._button is not None:
            self.buttons.append("".join(self._button).strip())
            self._button = None
        if tag == "label" and self._label is not None:
            self.labels[self._label[0]] = "".join(self._label[1]).strip()
            self._label = None
        while self._stack:
            if self._stack.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        tag, lang = self._stack[-1] if self._stack else ("", "")
        if tag == "title":
            self.title += data
        if tag in ("style", "title"):
            return
        self.text.setdefault(lang, []).append(data)
        if self._button is not None:
            self._button.append(data)
        if self._label is not None:
            self._label[1].append(data)

    def words(self, lang: str) -> str:
        return " ".join("".join(self.text.get(lang, [])).split())


def read(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.close()
    return page


@dataclass
class Served:
    shop: Shop
    url: str

    def link(self, route: str, kind: str, value: str) -> str:
        return f"{self.url}/{route}?t={tokens.sign(kind, value, KEY, shop='shop.example')}"

    def unsubscribe(self, external_id: str) -> str:
        return self.link("unsubscribe", "u", str(self.shop.customer_id(external_id)))

    def rating(self, external_id: str, score: int) -> str:
        order = self.shop.scalar("SELECT o.id FROM shop_order o JOIN customer c ON c.id = o.customer_id "
                                 "WHERE c.external_id = :e", e=external_id)  # fmt: skip
        return self.link("feedback", "f", f"{order}:{score}")


@contextlib.contextmanager
def serving(shop: Shop, front: Callable[[Handler], Handler] | None = None) -> Iterator[str]:
    """The daemon's site for ``shop`` on a real HTTP server on 127.0.0.1, port 0, its loop on a thread; ``front``:
    what stands before the site (a reverse proxy's routing), given the site's handler."""
    store = shop.store()
    astore = AsyncStore(store)
    settings = load_settings(shop.config)
    site = Site(store=astore, keys=[KEY], settings=lambda: settings, clock=SystemClock(), metrics=Metrics(),
                paused=lambda: False)  # fmt: skip
    loop = asyncio.new_event_loop()
    server = HttpServer(front(site.handle) if front else site.handle, host="127.0.0.1", port=0)
    port = loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
        astore.close()
        store.close()


def _shop(tmp_path: Path, default_locale: str = "id") -> Shop:
    """C1 reads Bahasa Indonesia, C2 English; each has one order."""
    shop = make_shop(tmp_path, smtp_port=closed_port())
    shop.add([1], days_ago=20, locale=Locale.ID)
    shop.add([2], days_ago=20, locale=Locale.EN)
    if default_locale != "id":
        text = shop.config.read_text(encoding="utf-8")
        shop.config.write_text(text.replace("[shop]\n", f'[shop]\ndefault_locale = "{default_locale}"\n'), "utf-8")
    return shop


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    shop = _shop(tmp_path)
    with serving(shop) as url:
        yield Served(shop, url)


def _every_page(served: Served, external_id: str) -> dict[str, tuple[int, str]]:
    """Every page customer ``external_id`` can reach, in the order they reach them: name → (status, HTML)."""
    pages: dict[str, tuple[int, str]] = {}
    unsubscribe, rating = served.unsubscribe(external_id), served.rating(external_id, 4)
    for name, method, url, body in (
        ("confirm unsubscribe", "GET", unsubscribe, None),
        ("unsubscribed", "POST", unsubscribe, ONE_CLICK),
        ("confirm rating", "GET", rating, None),
        ("thanks", "POST", rating, b"comment="),
        ("thanks again", "GET", rating, None),
    ):
        status, html, _ = http(method, url, body, FORM if body else None)
        pages[name] = (status, html)
    return pages


def _elsewhere(served: Served) -> dict[str, tuple[int, str]]:
    """The pages in the shop's language: a link that does not verify, and no page at all."""
    good = served.unsubscribe("C1")
    return {
        "bad unsubscribe link": http("GET", good[:-3])[:2],
        "bad rating link": http("GET", served.rating("C1", 4)[:-3])[:2],
        "tampered link": http("GET", good.replace("?t=", "?t=x"))[:2],
        "no such page": http("GET", served.url + "/unsubscribe/extra/path")[:2],
    }


def test_the_indonesian_pages_call_the_customer_kakak_as_the_emails_do(served: Served) -> None:
    pages = {**_every_page(served, "C1"), **_elsewhere(served)}
    for name, (_status, html) in pages.items():
        page = read(html)
        assert page.lang == "id", name
        words = page.words("id")
        # no "Anda" (formal) or "kamu" (familiar) beside the emails' "Kak Siti"/"Kakak", and no English
        assert not OTHER_REGISTER.findall(words), (name, OTHER_REGISTER.findall(words), words)
        prose = re.sub(r"\S+@\S+", "", words.replace("Toko Kembali", ""))  # addresses are no words
        assert not ENGLISH.findall(prose), (name, ENGLISH.findall(prose), words)
        if name in ("unsubscribed", "confirm rating", "thanks", "thanks again"):
            assert "Kakak" in words, (name, words)
    text = {name: read(html).words("id") for name, (_s, html) in pages.items()}
    assert "Cukup klik tombol di bawah agar c***@example.com tidak lagi menerima email promosi dari Toko Kembali." \
        in text["confirm unsubscribe"]
    assert text["unsubscribed"].startswith("Kakak sudah berhenti berlangganan Kakak tidak akan menerima email "
                                           "promosi dari Toko Kembali lagi. Maaf sudah mengganggu, ya.")
    assert "Kakak memilih 4 bintang. Cukup klik tombol di bawah untuk mengirimkannya ke Toko Kembali." \
        in text["confirm rating"]
    assert "Ada yang ingin Kakak sampaikan? (opsional)" in text["confirm rating"]
    assert "Penilaian dari Kakak (4 bintang) sudah kami catat. Masukan Kakak membantu Toko Kembali menjadi lebih " \
        "baik." in text["thanks"]
    assert "Penilaian dari Kakak (4 bintang) sudah kami catat sebelumnya. Terima kasih, ya!" in text["thanks again"]
    assert "Coba salin seluruh tautan dari email kami, lalu buka lagi." in text["bad rating link"]
    assert "Kakak juga bisa berhenti berlangganan dengan mengirim email ke unsubscribe@toko-kembali.example." \
        in text["bad unsubscribe link"]
    assert "Coba buka lagi tautan dari email kami, ya." in text["no such page"]


def test_the_english_pages_speak_as_the_english_emails_do(tmp_path: Path) -> None:
    shop = _shop(tmp_path, default_locale="en")
    with serving(shop) as url:
        served = Served(shop, url)
        pages = {**_every_page(served, "C2"), **_elsewhere(served)}
    text = {name: read(html).words("en") for name, (_s, html) in pages.items()}
    for name, (_status, html) in pages.items():
        assert read(html).lang == "en", name
    assert "Just click the button below and we'll stop sending promotional emails from Toko Kembali to " \
        "c***@example.com." in text["confirm unsubscribe"]
    assert text["unsubscribed"].startswith("You're unsubscribed You won't get promotional emails from Toko Kembali "
                                           "any more. Sorry for the bother.")
    assert "You chose 4 stars. Just click the button below to send it to Toko Kembali." in text["confirm rating"]
    assert "Anything you'd like to tell us? (optional)" in text["confirm rating"]
    assert "We've recorded your rating (4 stars). Your feedback helps Toko Kembali improve." in text["thanks"]
    assert "We already have your rating (4 stars). Thank you!" in text["thanks again"]
    assert "Try copying the whole link from our email and opening it again." in text["bad rating link"]
    assert "You can also unsubscribe by sending an email to unsubscribe@toko-kembali.example." \
        in text["bad unsubscribe link"]
    assert "Try opening the link in our email again." in text["no such page"]


def _rated(served: Served, external_id: str, score: int, lang: str) -> tuple[str, str, str]:
    """The words of the rating page of ``score``, its thanks, and its thanks again, over HTTP."""
    rating = served.rating(external_id, score)
    said = [http("GET", rating), http("POST", rating, b"comment=", FORM), http("GET", rating)]
    assert [status for status, _html, _ in said] == [200, 200, 200]
    confirm, thanks, again = (read(html).words(lang) for _status, html, _ in said)
    return confirm, thanks, again


@pytest.mark.parametrize(
    ("scale", "external_id", "score", "lang", "chose", "recorded"),
    [
        ("stars", "C1", 5, "id", "Kakak memilih 5 bintang.", "Penilaian dari Kakak (5 bintang) sudah kami catat"),
        ("stars", "C2", 1, "en", "You chose 1 star.", "We've recorded your rating (1 star)."),
        ("nps", "C1", 4, "id", "Kakak memilih nilai 4 dari 10.", "Penilaian dari Kakak (4 dari 10) sudah kami catat"),
        ("nps", "C2", 0, "en", "You chose 0 out of 10.", "We've recorded your rating (0 out of 10)."),
        # a link of a 0-10 request sent before the scale became stars: a score past 5 is no number of stars
        ("stars", "C2", 9, "en", "You chose 9 out of 10.", "We've recorded your rating (9 out of 10)."),
    ],
)
def test_the_rating_pages_say_stars_for_a_star_rating_and_the_score_out_of_10_for_a_0_10_one(
    tmp_path: Path, scale: str, external_id: str, score: int, lang: str, chose: str, recorded: str
) -> None:
    # Given a shop whose feedback requests ask for stars (1-5) or a 0-10 score (campaigns.feedback.scale)
    shop = _shop(tmp_path)
    text = shop.config.read_text(encoding="utf-8")
    shop.config.write_text(text + f'\n[campaigns.feedback]\nscale = "{scale}"\n', encoding="utf-8")
    # When the customer opens a rating link, sends it, and opens it again
    with serving(shop) as url:
        confirm, thanks, again = _rated(Served(shop, url), external_id, score, lang)
    # Then each page says the rating as the request asked for it (a star rating was thanked as "nilai 4")
    assert chose in confirm, confirm
    assert recorded in thanks, thanks
    assert recorded.replace("We've recorded", "We already have").replace("sudah kami catat", "sudah kami catat "
                                                                          "sebelumnya") in again, again  # fmt: skip


def test_every_page_has_a_language_title_viewport_and_labelled_controls_and_no_script(served: Served) -> None:
    pages = {**_every_page(served, "C1"), **_every_page(served, "C2"), **_elsewhere(served)}
    statuses = {name: status for name, (status, _html) in pages.items()}
    assert statuses == {"confirm unsubscribe": 200, "unsubscribed": 200, "confirm rating": 200, "thanks": 200,
                        "thanks again": 200, "bad unsubscribe link": 400, "bad rating link": 400,
                        "tampered link": 400, "no such page": 404}  # fmt: skip
    for name, (_status, html) in pages.items():
        page = read(html)
        assert page.lang in ("id", "en") and page.title.strip(), name
        assert {"name": "viewport", "content": "width=device-width,initial-scale=1"} in page.metas, name
        assert "script" not in page.tags and "img" not in page.tags, name
        assert all(page.buttons), (name, page.buttons)  # every button says what it does
        assert all(field and page.labels.get(field) for field in page.fields), (name, page.fields, page.labels)
        # readable without CSS: a heading, and below it more than the heading (what happened, or what to do)
        assert page.tags.count("h1") == 1 and len(page.words(page.lang)) > len(page.title) + 20, (name, html)
        assert "@example.com" not in html.replace("c***@example.com", ""), name  # addresses masked
        assert KEY.decode() not in html and "test-link-key" not in html, name


def test_a_link_cut_short_or_tampered_with_says_in_both_languages_what_to_do(served: Served) -> None:
    for name, (status, html) in _elsewhere(served).items():
        if name == "no such page":
            continue
        page = read(html)
        assert status == 400, name
        assert "Maaf, tautan ini tidak bisa dibuka" in page.words("id"), (name, page.words("id"))
        assert "Sorry, this link doesn't work" in page.words("en"), (name, page.words("en"))
    # and the unsubscribe link's page gives the address to write to instead, in both
    html = _elsewhere(served)["bad unsubscribe link"][1]
    assert html.count('<a href="mailto:unsubscribe@toko-kembali.example">') == 2


def test_an_unsubscribe_link_whose_customer_the_database_lacks_says_so_and_where_to_write_not_that_it_worked(
    served: Served,
) -> None:
    """A link from an email the database has no record of (restored from a copy older than the email, rebuilt from
    the exports): nothing can be suppressed, as the token names no address. The customer was told "You're
    unsubscribed" and went on getting what the shop sends once their record is imported again."""
    gone = served.shop.scalar("SELECT max(id) FROM customer") + 100
    for value in (f"{gone}:0123abcd.kembali", str(gone)):  # a link naming its email, and one of before
        link = served.link("unsubscribe", "u", value)
        # When the customer opens it, and when they (or their mailbox provider's one-click) POST it
        answers = {"GET": http("GET", link), "POST": http("POST", link, ONE_CLICK, FORM)}
        # Then neither says they are unsubscribed, nor offers a button that does nothing: both say the address was
        # not found and give the address to write to, in the shop's language and the other (whose link it is, and
        # so their language, is not known)
        for method, (status, html, _headers) in answers.items():
            page = read(html)
            assert status == 404, (method, status, html)
            assert page.buttons == [] and "berhenti berlangganan Kakak tidak akan" not in page.words("id"), method
            assert "Maaf, alamat email Kakak tidak kami temukan" in page.words("id"), (method, page.words("id"))
            assert "Sorry, we couldn't find your address" in page.words("en"), (method, page.words("en"))
            assert html.count('<a href="mailto:unsubscribe@toko-kembali.example">') == 2, (method, html)
            said = re.sub(r"\S+@\S+", "", page.words("id"))  # (as the emails say it: "Kakak", and no English)
            assert not OTHER_REGISTER.findall(said) and not ENGLISH.findall(said), said
    assert served.shop.scalar("SELECT count(*) FROM suppression") == 0


def test_a_database_failure_gives_a_kind_page_in_both_languages_not_a_bare_error(tmp_path: Path) -> None:
    # Given a shop whose database refuses new suppressions and ratings (as a full disk or a lock would)
    shop = _shop(tmp_path)
    with contextlib.closing(sqlite3.connect(tmp_path / "kembali.db")) as conn, conn:
        conn.execute("CREATE TRIGGER no_suppression BEFORE INSERT ON suppression "
                     "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
        conn.execute("CREATE TRIGGER no_feedback BEFORE INSERT ON feedback "
                     "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    with serving(shop) as url:
        served = Served(shop, url)
        # When a customer presses the unsubscribe button, and sends a rating
        answers = [http("POST", served.unsubscribe(c), ONE_CLICK, FORM) for c in ("C1", "C2")]
        answers += [http("POST", served.rating(c, 5), b"comment=", FORM) for c in ("C1", "C2")]
    # Then each gets a 500 with a page that says sorry and what to do, in the shop's language and English
    for status, html, headers in answers:
        assert status == 500 and headers["Content-Type"] == "text/html; charset=utf-8", (status, html)
        page = read(html)
        assert page.lang == "id" and page.title.strip()
        assert "Maaf, ada gangguan di sistem kami. Coba lagi beberapa menit lagi, ya." in page.words("id"), html
        assert "Sorry, something went wrong on our side. Please try again in a few minutes." in page.words("en")
        assert "disk says no" not in html and "Traceback" not in html
    # the unsubscribe button's page gives the address to write to meanwhile; the rating's does not
    assert all("mailto:unsubscribe@toko-kembali.example" in html for _s, html, _h in answers[:2])
    assert not any("mailto:" in html for _s, html, _h in answers[2:])


def _letters(text: str) -> str:
    """``text`` without spaces, line breaks (a long word wraps) or bidi controls."""
    return re.sub(r"[\s\u202a-\u202e\u2066-\u2069]", "", text)


@pytest.mark.parametrize("locale", ["id", "en"])
def test_hostile_data_on_the_pages_is_shown_as_text_and_stays_inside_a_phones_screen(
    browser: object, tmp_path: Path, locale: str  # noqa: F811 - the fixture
) -> None:
    """A comment (which the thanks page shows back) with HTML, quotes, a right-to-left override and a 300-character
    word, and an address whose domain is one long word: shown as the customer typed them, on a 360px screen."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver

    driver: WebDriver = browser  # type: ignore[assignment]
    driver.set_window_size(360, 800)
    shop = _shop(tmp_path)
    external_id = "C1" if locale == "id" else "C2"
    domain = ".".join(["d" * 60] * 3) + ".example"
    with contextlib.closing(sqlite3.connect(tmp_path / "kembali.db")) as conn, conn:
        conn.execute("UPDATE customer SET email = :e WHERE external_id = :c",
                     {"e": f"budi@{domain}", "c": external_id})  # fmt: skip
    with serving(shop) as url:
        served = Served(shop, url)
        rating = served.rating(external_id, 2)
        comment = urllib.parse.urlencode({"comment": HOSTILE_COMMENT}).encode()
        assert http("POST", rating, comment, FORM)[0] == 200
        # (a link that does not verify, and no page, are in the shop's language, Bahasa Indonesia)
        for page_url, lang in ((served.unsubscribe(external_id), locale), (rating, locale),
                               (served.unsubscribe(external_id)[:-3], "id"), (url + "/nothing", "id")):  # fmt: skip
            driver.get(page_url)
            assert driver.find_element(By.TAG_NAME, "html").get_attribute("lang") == lang
            scroll, inner = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
            assert scroll <= inner, (page_url, scroll, inner)
            assert driver.find_elements(By.TAG_NAME, "img") == [] and driver.find_elements(By.TAG_NAME, "script") == []
            for button in driver.find_elements(By.TAG_NAME, "button"):  # on the screen, big enough for a thumb
                assert button.is_displayed() and button.size["height"] >= 44, (page_url, button.size)
        driver.get(rating)  # the thanks page, with the comment shown back as typed
        quoted = driver.find_element(By.TAG_NAME, "blockquote").text
        assert _letters(quoted) == _letters(HOSTILE_COMMENT), quoted
        paragraphs = [p.text for p in driver.find_elements(By.TAG_NAME, "p")]
        assert any(("(2 bintang)" if locale == "id" else "(2 stars)") in p for p in paragraphs), paragraphs


def _routed_by_query(site: Handler) -> Handler:
    """A shop's front controller, as a PHP shop or a proxy routing on the query has it: ``/shop.php?route=unsubscribe``
    goes to the site's ``/unsubscribe`` (``unsubscribe.url`` and ``campaigns.feedback.link_url`` may have a query of
    their own: the token is added after it), anything else is the shop's own."""

    async def front(request: Request) -> Response:
        route = request.arg("route")
        if request.path != "/shop.php" or route not in ("unsubscribe", "feedback"):
            return Response(404, b"the shop's own 404\n", "text/plain")
        return await site(dataclasses.replace(request, path=f"/{route}"))

    return front


def _form_target(page_url: str, html: str) -> str:
    """Where a browser POSTs the page's form: its ``action`` resolved against the page's URL (HTML: an action left
    out, or empty, is the page's own URL)."""
    form = re.search(r"<form\b([^>]*)>", html)
    assert form is not None, html
    attributes = dict(re.findall(r'([\w-]+)="([^"]*)"', form.group(1)))
    assert attributes.get("method") == "post", form.group(0)
    return urllib.parse.urljoin(page_url, html_text.unescape(attributes.get("action", ""))) or page_url


def test_the_buttons_post_back_to_the_very_link_opened_when_its_url_has_a_query_of_its_own(tmp_path: Path) -> None:
    """A shop whose links go through a front controller (``https://shop.example/shop.php?route=unsubscribe&t=…``):
    the pages' forms posted to ``?t=…``, which drops ``route=unsubscribe``, so the unsubscribe button and the
    rating's send button reached the shop's own 404 and the customer could neither unsubscribe nor rate."""
    shop = _shop(tmp_path)
    with serving(shop, _routed_by_query) as url:
        order = shop.scalar("SELECT id FROM shop_order WHERE external_id = 'O1'")
        unsubscribe = tokens.sign("u", str(shop.customer_id("C1")), KEY, shop="shop.example")
        rating = tokens.sign("f", f"{order}:4", KEY, shop="shop.example")
        for route, token, body in (("unsubscribe", unsubscribe, ONE_CLICK), ("feedback", rating, b"comment=")):
            # When the customer opens the link from the email, and presses the page's button
            link = f"{url}/shop.php?route={route}&t={token}"
            status, page, _ = http("GET", link)
            assert status == 200, (route, page)
            target = _form_target(link, page)
            status, page, _ = http("POST", target, body, FORM)
            # Then the button's POST reaches the site, and does what it says
            assert status == 200, (route, target, page)
        # And so does the thanks page's form, for a comment
        status, page, _ = http("POST", _form_target(target, page), b"comment=enak", FORM)
        assert status == 200 and "enak" in page, page
    assert shop.rows("SELECT email, reason FROM suppression") == [("c1@example.com", "unsubscribed")]
    assert shop.rows("SELECT score, comment FROM feedback") == [(4, "enak")]
