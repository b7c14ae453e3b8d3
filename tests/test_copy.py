"""The shipped emails as a customer reads them: every campaign folder (each win-back step's), both languages, the
feedback request on both scales, rendered the way the sender renders them (its context, its renderer, its MIME
writer), with ordinary and with hostile shop data."""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Iterator
from email import policy
from email.parser import BytesParser
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.shop_fixtures import REPO
from worker import checks
from worker.adapters.templates import JinjaTemplates
from worker.config import Settings, load_settings
from worker.core import samples
from worker.core.render import build_context, build_message
from worker.domain import CustomerSnapshot, Locale, ProductView, RenderedEmail, SendTimeFacts
from worker.errors import TemplateError
from worker.pipeline import BatchFacts, Composer

SETTINGS = load_settings(REPO / "config.toml")
FOLDERS = checks.required_folders(SETTINGS)
BASE = "https://toko.example/produk/"


def test_every_shipped_template_folder_is_among_those_checked() -> None:
    # the folders come from the shipped config.toml: a campaign turned off there must not quietly drop its copy's
    # checks, so every folder with a language in it is one of them
    shipped = sorted({path.parent.parent.name for path in (REPO / "templates" / "email").glob("*/*/body.html")})
    assert shipped and sorted(FOLDERS) == shipped


def _with_scale(settings: Settings, scale: str) -> Settings:
    feedback = dataclasses.replace(settings.campaigns.feedback, scale=scale)
    return dataclasses.replace(settings, campaigns=dataclasses.replace(settings.campaigns, feedback=feedback))


def _product(pid: str, name: str, category: str = "Kopi", price: int = 8_900_000) -> ProductView:
    return ProductView(external_id=pid, name=name, category=category, price_minor=price, currency="IDR",
                       url=f"{BASE}{pid.lower()}", image_url=f"{BASE}{pid.lower()}.jpg")  # fmt: skip


ORDINARY = [_product("P-1", "Kopi Gayo Arabika 250 g"), _product("P-2", "Kemeja Batik Parang", "Batik", 24_900_000),
            _product("P-3", "Tas Anyaman Pandan", "Tas", 14_900_000), _product("P-4", "Toner Teh Hijau", "Kopi")]


@dataclasses.dataclass(frozen=True)
class Email:
    folder: str
    locale: Locale
    scale: str
    rendered: RenderedEmail
    data: bytes

    def __str__(self) -> str:
        return f"{self.folder}/{self.locale} ({self.scale})"


def render(folder: str, locale: Locale, *, name: str = "Siti Rahayu", catalogue: list[ProductView] = ORDINARY,
           bought: list[ProductView] | None = None, scale: str = "stars",
           templates: Path | None = None) -> Email:  # fmt: skip
    """One message of ``folder`` as the sender composes it, for a customer called ``name``."""
    settings = _with_scale(SETTINGS, scale)
    root = templates or settings.resolve(settings.templates.dir)
    composer = Composer(settings, JinjaTemplates(root), checks.SAMPLE_LINK_KEY)
    customer = CustomerSnapshot(id=1, external_id="C-1", email="siti@example.com", name=name, locale=locale,
                                time_zone="Asia/Jakarta", birthday=None, marketing_consent=True)  # fmt: skip
    sample = samples.Sample("t", "test", customer)
    message = checks._sample_message(folder, sample, settings)
    facts = BatchFacts(
        customers={1: SendTimeFacts(customer=customer, suppressed=False, order_count=samples.SAMPLE_ORDER_COUNT,
                                    last_order_at=checks.SAMPLE_NOW)},
        order_products={samples.SAMPLE_ORDER_ID: catalogue[:2] if bought is None else bought},
        catalogue=catalogue,
    )  # fmt: skip
    unsubscribe = composer.unsubscribe_url(customer)
    context = build_context(message.campaign, customer, shop=composer.shop, unsubscribe_url=unsubscribe,
                            extra=composer.extra_context(message, facts))  # fmt: skip
    rendered = composer.renderer.render(folder, locale, context)
    data = build_message(rendered, to_name=customer.name, to_address=customer.email, shop=composer.shop,
                         message_id=message.message_id, date=checks.SAMPLE_NOW, list_unsubscribe_https=unsubscribe,
                         list_unsubscribe_mailto=settings.unsubscribe.mailto)  # fmt: skip
    return Email(folder, locale, scale, rendered, data)


def every_email(**kwargs: object) -> Iterator[Email]:
    for folder in FOLDERS:
        for locale in Locale:
            for scale in ("stars", "nps") if folder == "feedback" else ("stars",):
                yield render(folder, locale, scale=scale, **kwargs)  # type: ignore[arg-type]


class _Html(HTMLParser):
    """The tags, attributes, links and visible words of an HTML part."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.words: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in ("head", "style", "script"):
            self._hidden += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("head", "style", "script"):
            self._hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.words.append(data)

    @property
    def links(self) -> list[str]:
        return [str(attrs["href"]) for tag, attrs in self.tags if tag == "a" and attrs.get("href")]

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.words).split())


def parsed(html: str) -> _Html:
    p = _Html()
    p.feed(html)
    p.close()
    return p


def _words_of(email: Email) -> list[str]:
    """The subject, the plain text and the HTML's visible text (the preheader included)."""
    return [email.rendered.subject, email.rendered.text, parsed(email.rendered.html).text]


# --- the copy -----------------------------------------------------------------------------------------------

# "kamu" and its "-mu" suffix (untukmu, pesananmu…) are the familiar register; the emails greet "Kak Siti" and
# then say "Kakak": mixing the two reads as careless. "Anda" is the formal one, out of place beside "Kak".
OTHER_REGISTER = re.compile(r"\b(?:kamu|anda|kau|\w*(?:an|ah|uk|ja|ar)mu)\b", re.IGNORECASE)
ENGLISH = re.compile(r"\b(?:the|you|your|and|with|for|our|shop|order|click|view|here|thank|thanks|hi|hello|"
                     r"unsubscribe|off|code|now|team|gift|rate|rating|star|stars|new|see|all)\b",
                     re.IGNORECASE)  # fmt: skip


@pytest.mark.parametrize("name", ["Siti Rahayu", ""])
def test_the_indonesian_emails_address_the_customer_as_kakak_throughout(name: str) -> None:
    for email in every_email(name=name):
        if email.locale is Locale.ID:
            for part in _words_of(email):
                assert not OTHER_REGISTER.findall(part), (str(email), OTHER_REGISTER.findall(part), part)


def test_the_indonesian_emails_hold_no_english() -> None:
    for email in every_email():
        if email.locale is Locale.ID:
            for part in _words_of(email):
                words = re.sub(r"https?://\S+", "", part.replace(SETTINGS.shop.name, ""))  # links are not words
                found = ENGLISH.findall(words)
                assert not found, (str(email), found, part)


def test_no_email_claims_what_the_data_does_not_say() -> None:
    """The shop's best sellers are its best sellers of all time, not "this week's"; a loyalty email is not about
    one order ("that was your order number 5")."""
    for email in every_email():
        for part in _words_of(email):
            for claim in ("minggu ini", "this week", "order number", "pesananmu yang ke-", "yang ke-"):
                assert claim not in part, (str(email), claim, part)


def test_the_feedback_request_on_the_nps_scale_asks_one_question_and_names_both_ends() -> None:
    for locale in Locale:
        email = render("feedback", locale, scale="nps")
        html_text, text = parsed(email.rendered.html).text, email.rendered.text
        for part in (html_text, text):
            recommend = "merekomendasikan" if locale is Locale.ID else "recommend"
            assert part.count(recommend) == 1, part
            for end in (("0 (sangat tidak mungkin)", "10 (sangat mungkin)") if locale is Locale.ID
                        else ("0 (not at all likely)", "10 (extremely likely)")):  # fmt: skip
                assert end in part, (end, part)
            assert ("Bagaimana pengalaman" if locale is Locale.ID else "How did we do") not in part, part


def test_each_star_rating_link_says_in_words_what_it_gives() -> None:
    """Five links of stars alone are read out by a screen reader as "star star star"; each says its score."""
    for locale in Locale:
        email = render("feedback", locale)
        ratings = [attrs for tag, attrs in parsed(email.rendered.html).tags
                   if tag == "a" and "/feedback" in str(attrs.get("href"))]  # fmt: skip
        expected = ([f"{n} bintang" for n in range(1, 6)] if locale is Locale.ID
                    else ["1 star"] + [f"{n} stars" for n in range(2, 6)])  # fmt: skip
        assert [a.get("title") for a in ratings] == expected
        assert [a.get("aria-label") for a in ratings] == expected


# --- the plain-text part ----------------------------------------------------------------------------------------


def test_the_plain_text_part_spells_out_every_link_of_the_html_part_and_holds_no_markup() -> None:
    for email in every_email():
        text = email.rendered.text
        for link in parsed(email.rendered.html).links:
            assert link in text, (str(email), link)
        assert not re.search(r"&(?:#\d+|#x[0-9a-f]+|[a-z]+);", text, re.IGNORECASE), (str(email), text)
        assert not re.search(r"</?[a-z][^>]*>", text), (str(email), text)
        assert "\n\n\n" not in text, (str(email), text)  # no gap of two blank lines
        assert not re.search(r":\n- ", text), (str(email), text)  # a list is set off from the line that opens it


def test_every_email_has_a_preheader_subject_unsubscribe_link_header_and_footer() -> None:
    for email in every_email():
        message = BytesParser(policy=policy.default).parsebytes(email.data)
        assert message["Subject"] and message["Subject"] == email.rendered.subject, str(email)
        https, mailto = (u.strip(" <>") for u in str(message["List-Unsubscribe"]).split(","))
        assert https.startswith(SETTINGS.unsubscribe.url) and mailto == f"mailto:{SETTINGS.unsubscribe.mailto}"
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert https in email.rendered.text and https in parsed(email.rendered.html).links, str(email)
        for part in (email.rendered.text, parsed(email.rendered.html).text):
            assert SETTINGS.shop.postal_address in part, str(email)
        preheader = re.search(r'<div style="display:none;[^>]*>([^<]*)</div>', email.rendered.html)
        assert preheader and len(preheader.group(1).strip()) >= 15, str(email)


# --- hostile shop data ----------------------------------------------------------------------------------------

BREAKOUTS = ['"><img src=x onerror=alert(1)>', "'><script>alert(2)</script>", '" onmouseover="alert(3)',
             "</td></tr></table><a href=javascript:alert(4)>"]  # fmt: skip


def test_hostile_names_and_product_titles_add_no_markup_to_any_email() -> None:
    # Given a customer and products whose names try to close the attribute or the element they are written in
    catalogue = [_product(f"P-{i}", f"Kopi {b}", "Kopi") for i, b in enumerate(BREAKOUTS)]
    clean = render("winback", Locale.ID)
    for email in every_email(name=f"Siti {BREAKOUTS[0]}", catalogue=catalogue):
        # Then the HTML part has only the template's own elements and attributes, and every name reads as text
        html = parsed(email.rendered.html)
        assert {tag for tag, _ in html.tags} <= {tag for tag, _ in parsed(clean.rendered.html).tags}, str(email)
        for _, attrs in html.tags:
            assert not [a for a in attrs if a.startswith("on")], (str(email), attrs)
            for key in ("href", "src"):
                assert attrs.get(key) is None or str(attrs[key]).startswith(("https://", "mailto:")), attrs
        assert "<script" not in email.rendered.html and "<img src=x" not in email.rendered.html
        shown = [p for p in catalogue if p.name in html.text]
        assert shown or email.folder in ("feedback", "loyalty", "winback-last"), str(email)


@pytest.mark.parametrize("crlf", ["\r\nBcc: x@example.com", "\nSubject: free", "=?utf-8?q?=0D=0ABcc:_x@example.com?="])
def test_a_line_break_or_encoded_word_in_a_name_or_title_adds_no_header(crlf: str) -> None:
    catalogue = [_product("P-1", f"Kopi{crlf}", "Kopi"), *ORDINARY]
    for email in every_email(name=f"Siti{crlf}", catalogue=catalogue):
        head = email.data.split(b"\r\n\r\n", 1)[0]
        names = [line.split(b":", 1)[0] for line in head.split(b"\r\n") if not line.startswith((b" ", b"\t"))]
        assert sorted(names) == sorted([b"Date", b"From", b"To", b"Subject", b"Message-ID", b"MIME-Version",
                                        b"List-Unsubscribe", b"List-Unsubscribe-Post", b"Content-Type"]), names
        message = BytesParser(policy=policy.default).parsebytes(email.data)
        assert "\n" not in str(message["Subject"]) and "Bcc" not in message, str(email)


def test_bidi_controls_and_zero_width_characters_in_names_reach_no_part() -> None:
    name = "\u202eSiti\u200b Rahayu\u2066"
    catalogue = [_product("P-1", "Batik\u202e%05 FFO\u202c Tulis\u200b\ufeff", "Batik"), *ORDINARY]
    for email in every_email(name=name, catalogue=catalogue):
        message = BytesParser(policy=policy.default).parsebytes(email.data)
        parts = [str(message["Subject"]), str(message["To"]), email.rendered.text, email.rendered.html]
        for part in parts:
            bad = [c for c in part if c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200b\ufeff"]
            assert not bad, (str(email), bad)


LONG_TITLE = ("Kain Batik Tulis Solo Motif Sido Mukti Warna Sogan Klasik Ukuran 2,5 Meter Bahan Katun Primisima "
              "Halus Adem Cocok untuk Kemeja Pria Wanita Seragam Kantor Acara Resmi Pernikahan Kondangan Lebaran "
              "Hadiah Orang Tua Ready Stock Kirim Hari Ini Garansi Uang Kembali Original Pengrajin Asli "
              "Pekalongan Murah")
LONG_WORD = "BATIK" + "X" * 295


@pytest.mark.parametrize("title", [LONG_TITLE, LONG_WORD], ids=["words", "one-word"])
def test_a_300_character_product_title_keeps_the_subject_short_and_is_shown_whole_in_the_body(title: str) -> None:
    assert len(title) == 300
    catalogue = [_product("P-1", title, "Batik"), *ORDINARY]
    for email in every_email(catalogue=catalogue, bought=catalogue[:1]):
        assert len(email.rendered.subject) <= 80, (str(email), email.rendered.subject)
        if email.folder not in ("loyalty", "winback-last"):
            assert title in email.rendered.text, str(email)
            assert title in parsed(email.rendered.html).text, str(email)


# --- an operator's edit gone wrong --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "old", "new", "named"),
    [
        ("_coupon.html", "{{ coupon_code }}</span>", "{{ coupon_kode }}</span>",
         "_coupon.html:9: UndefinedError: 'coupon_kode' is undefined"),
        ("_products.txt", "{{ p.url }}", "{{ p.link }}",
         "_products.txt:4: UndefinedError: 'dict object' has no attribute 'link'"),
        ("winback/id/body.html", "{% if recommendations %}", "{% if recommendations %}{% if %}",
         "winback/id/body.html:11: syntax error: "),
        ("winback/en/subject.txt", "{% if bought %}", "{% if bought %}{{ custmer.name }}",
         "winback/en/subject.txt:1: UndefinedError: 'custmer' is undefined"),
    ],
)  # fmt: skip
def test_a_mistake_in_an_edited_shipped_template_names_its_file_and_line(
    tmp_path: Path, path: str, old: str, new: str, named: str
) -> None:
    """An operator's copy of the shipped templates with a mistyped variable (in a campaign's file or in a partial
    every campaign includes) or a broken tag: rendering the message fails with the file and line to fix, the
    partial's own, not the campaign file that included it (that the sender then fails this message alone, and
    `run --once` refuses a file it cannot parse, is tested in test_pipeline_e2e and test_secrets)."""
    root = tmp_path / "email"
    shutil.copytree(REPO / "templates" / "email", root)
    text = (root / path).read_text(encoding="utf-8")
    assert text.count(old) == 1, (path, old)
    (root / path).write_text(text.replace(old, new), encoding="utf-8")
    with pytest.raises(TemplateError) as info:
        render("winback", Locale.EN if "/en/" in path else Locale.ID, templates=root)
    assert str(info.value).startswith(named), str(info.value)
