"""The pure half of rendering: money and date filters, header sanitising, the context."""

from __future__ import annotations

import re
import unicodedata
from datetime import date

import pytest

from worker.config import ShopSettings
from worker.core.render import (
    ShopInfo,
    build_context,
    clean_text,
    format_date,
    format_money,
    product_dict,
    sanitize_header_text,
)
from worker.domain import CustomerSnapshot, Locale, ProductView

SHOP = ShopInfo.from_settings(ShopSettings())


@pytest.mark.parametrize(
    ("minor", "currency", "locale", "expected"),
    [
        (0, "IDR", "id", "Rp0"),
        (100000, "IDR", "id", "Rp1.000"),
        (24900000, "IDR", "id", "Rp249.000"),
        (150000000, "IDR", "id", "Rp1.500.000"),
        (24900050, "IDR", "id", "Rp249.000,50"),
        (0, "IDR", "en", "Rp0"),
        (100000, "IDR", "en", "Rp1.000"),
        (24900000, "IDR", "en", "Rp249.000"),
        (150000000, "IDR", "en", "Rp1.500.000"),
        (24900050, "IDR", "en", "Rp249.000,50"),
        (24900000, "IDR", Locale.EN, "Rp249.000"),
        (1250, "USD", "en", "$12.50"),
        (1200, "USD", "en", "$12"),
        (1500, "JPY", "en", "¥1,500"),
        (-24900000, "IDR", "id", "-Rp249.000"),  # a refund
        (-1, "IDR", "en", "-Rp0,01"),
        (12345, "KWD", "en", "KWD12.345"),  # three decimals
        (2**63 - 1, "IDR", "id", "Rp92.233.720.368.547.758,07"),  # the largest amount an import takes
        # a template's arithmetic can go past it: every digit is kept (Decimal's 28 digits rounded, then failed)
        (10**30 + 12345, "USD", "en", "$10,000,000,000,000,000,000,000,000,123.45"),
        (-(10**40) - 1, "IDR", "id", "-Rp100." + "000." * 11 + "000,01"),
    ],
)
def test_format_money(minor: int, currency: str, locale: str, expected: str) -> None:
    assert format_money(minor, currency, locale) == expected


@pytest.mark.parametrize(
    ("locale", "expected"),
    [("id", "22 November 2026"), ("en", "November 22, 2026"), (Locale.ID, "22 November 2026")],
)
def test_format_date_is_babel_long(locale: str, expected: str) -> None:
    assert format_date(date(2026, 11, 22), locale) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Siti Rahayu", "Siti Rahayu"),
        ("  Siti   Rahayu  ", "Siti Rahayu"),
        ("Budi\r\nBcc: evil@example.com", "Budi Bcc: evil@example.com"),
        ("Budi\nTo: x@example.com", "Budi To: x@example.com"),
        ("Budi\rX", "Budi X"),
        ("Bu\x00di", "Bu di"),
        ("tab\there", "tab here"),
        ("line\u2028sep\u2029para\x85nel", "line sep para nel"),
        ("no\u00a0break", "no break"),
        ("rtl \u202eevil\u202c name", "rtl evil name"),
        ("=?UTF-8?Q?=0A?=Bcc: x@example.com", "= ?UTF-8?Q?=0A?=Bcc: x@example.com"),
        ("Terima kasih, Kak Siti 😊", "Terima kasih, Kak Siti 😊"),
        ("family 👨\u200d👩\u200d👧", "family 👨\u200d👩\u200d👧"),
        ("\r\n\t ", ""),
        ("", ""),
        # past 200 characters: cut, and said to be cut
        ("x" * 500, "x" * 197 + "..."),
        ("a " * 150, ("a " * 99).strip() + "..."),
        ("x" * 200, "x" * 200),
    ],
)
def test_sanitize_header_text(raw: str, expected: str) -> None:
    assert sanitize_header_text(raw) == expected


@pytest.mark.parametrize(
    ("head", "tail", "kept"),
    [
        # what a reader sees as one character is cut whole, never into parts (a flag's second letter alone shows as
        # a boxed 'D'; a family without its last member is another emoji); the cut: 197 characters, then "..."
        (195, "🇮🇩🇮🇩", "🇮🇩"),  # regional indicators: the cut falls between two flags
        (196, "🇮🇩🇮🇩", ""),  # … and between a flag's two letters
        (194, "👨\u200d👩\u200d👧", ""),  # joined by zero-width joiners
        (196, "👨\u200d👩", ""),
        (196, "👍🏽", ""),  # a skin tone modifier
        (196, "e\u0301", ""),  # a letter and its combining accent
        (196, "❤\ufe0f", ""),  # a variation selector
        (196, "ab", "a"),
    ],
)
def test_a_long_header_text_is_not_cut_inside_what_shows_as_one_character(head: int, tail: str, kept: str) -> None:
    out = sanitize_header_text("x" * head + tail + "y" * 50)
    assert out == "x" * head + kept + "...", [hex(ord(c)) for c in out[190:]]
    assert len(out) <= 200


def test_sanitize_output_is_one_printable_line() -> None:
    nasty = "".join(chr(c) for c in range(0, 0x3000, 7))
    out = sanitize_header_text(nasty, max_chars=10_000)
    assert "\r" not in out and "\n" not in out and "\x00" not in out
    assert all(ch.isprintable() or unicodedata.category(ch) in ("Cf", "Cn", "Co") for ch in out)
    assert not set(out) & set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
    assert "  " not in out and out == out.strip()


def _customer(name: str = "Siti Rahayu", locale: Locale = Locale.ID) -> CustomerSnapshot:
    return CustomerSnapshot(
        id=7,
        external_id="C7",
        email="siti@example.com",
        name=name,
        locale=locale,
        time_zone="Asia/Jakarta",
        birthday=None,
        marketing_consent=True,
    )


KOPI = ProductView(
    "P1", "Kopi Gayo 250g", "Kopi", 8900000, "IDR", "https://toko.example/p/1", "https://toko.example/i/1.jpg"
)


def test_product_dict_is_plain() -> None:
    assert product_dict(KOPI) == {
        "external_id": "P1",
        "name": "Kopi Gayo 250g",
        "category": "Kopi",
        "price_minor": 8900000,
        "currency": "IDR",
        "url": "https://toko.example/p/1",
        "image_url": "https://toko.example/i/1.jpg",
    }


def test_build_context_has_customer_shop_and_extra() -> None:
    ctx = build_context(
        "winback",
        _customer(),
        shop=SHOP,
        unsubscribe_url="https://toko.example/u/t",
        extra={"bought": [product_dict(KOPI)], "recommendations": (), "coupon_code": "KEMBALI10", "coupon_percent": 10},
    )
    assert ctx["customer"] == {"first_name": "Siti", "name": "Siti Rahayu", "email": "siti@example.com", "locale": "id"}
    assert ctx["shop"] == {
        "name": SHOP.name,
        "domain": SHOP.domain,
        "from_address": SHOP.from_address,
        "from_name": SHOP.from_name,
        "reply_to": SHOP.reply_to,
        "postal_address": SHOP.postal_address,
        "base_url": SHOP.base_url,
        "currency": "IDR",
    }
    assert ctx["unsubscribe_url"] == "https://toko.example/u/t"
    assert ctx["locale"] == "id" and ctx["campaign"] == "winback"
    assert ctx["bought"] == [product_dict(KOPI)]
    assert ctx["recommendations"] == []  # tuples become lists
    assert (ctx["coupon_code"], ctx["coupon_percent"]) == ("KEMBALI10", 10)


@pytest.mark.parametrize(
    ("extra", "error", "named"),
    [
        ({"customer": {}}, ValueError, "extra context for 'winback' may not set ['customer']"),
        ({"unsubscribe_url": "x"}, ValueError, "extra context for 'winback' may not set ['unsubscribe_url']"),
        ({"bought": [KOPI]}, TypeError, "template context bought[0]: ProductView is not plain data"),  # a dataclass
        ({"x": {1: "a"}}, TypeError, "template context x: keys must be strings, not int"),
        ({"x": object()}, TypeError, "template context x: object is not plain data"),
    ],
)
def test_build_context_refuses_clashes_and_objects(extra: dict[str, object], error: type[Exception], named: str
                                                   ) -> None:  # fmt: skip
    with pytest.raises(error, match=f"^{re.escape(named)}$"):
        build_context("winback", _customer(), shop=SHOP, unsubscribe_url="https://u", extra=extra)


def test_build_context_dates_become_iso_strings() -> None:
    extra = {"ordered": date(2026, 1, 2)}
    ctx = build_context("winback", _customer(), shop=SHOP, unsubscribe_url="https://u", extra=extra)
    assert ctx["ordered"] == "2026-01-02"


def test_first_name_empty_for_empty_name() -> None:
    ctx = build_context("winback", _customer(name=""), shop=SHOP, unsubscribe_url="https://u", extra={})
    assert ctx["customer"] == {"first_name": "", "name": "", "email": "siti@example.com", "locale": "id"}


@pytest.mark.parametrize(
    ("name", "first_name"),
    [
        ("Siti Rahayu", "Siti"),
        ("SITI RAHAYU", "Siti"),  # typed in capitals: "Halo Kak SITI" shouts in the subject
        ("siti rahayu", "Siti"),
        ("Ibu Sri Wahyuni", "Sri"),  # not "Halo Kak Ibu"
        ("Bpk. Agus Santoso", "Agus"),
        ("Hj. Siti Aminah", "Siti"),
        ("dr. budi", "Budi"),
        ("I Made Wirawan", "Made"),  # Balinese: not "Hi I"
        ("Kak Dewi", "Dewi"),  # not "Kak Kak Dewi"
        (". Siti", "Siti"),
        ("-", ""),  # not "Halo Kak -,": the templates' fallback instead
        ("Ibu", "Ibu"),  # nothing after the title: the title is all there is
        ("Kak", ""),  # the templates say "Kakak": not "Halo Kak Kak,"
        ("kakak", ""),
        ("McDonald Ray", "McDonald"),
        ("O'BRIEN", "O'Brien"),
        ("SITI-NUR Halim", "Siti-Nur"),
        ("李 明", "李"),
        ("<script>x</script> O'Brien", "<script>x</script>"),  # data, not a name: left as it is (and escaped)
        ("M. Rizky Pratama", "Rizky"),  # Muhammad Rizky: not "Halo Kak M.,"
        ("Moh. Arif", "Arif"),
        ("MUH YUSUF", "Yusuf"),
        ("A. Yani", "Yani"),
        ("M Rizky", "Rizky"),
        ("R. A. Kartini", "Kartini"),
        ("KH. Ahmad Dahlan", "Ahmad"),
        ("Raden Mas Said", "Said"),
        ("Teuku Umar", "Umar"),
        ("siti.rahayu@gmail.com", ""),  # the address typed as the name: "Kakak" / "there" instead
        ("R.", ""),
        ("Siti R.", "Siti"),
        ("M.Rizky Pratama", "Rizky"),  # the same without the space after the dot: not "Halo Kak M.Rizky,"
        ("Hj.Siti Aminah", "Siti"),
        ("Bpk.Andi", "Andi"),
        ("Drs.H.Ahmad", "Ahmad"),
        ("Siti, Aminah", "Siti"),  # not "Halo Kak Siti,,"
        ("Anak Agung Gede Agung", "Gede"),  # a Balinese title of two words: not "Halo Kak Anak" (a child)
        ("Ida Bagus Made Oka", "Made"),
        ("I Gusti Ngurah Rai", "Rai"),
        ("Raden Ajeng Kartini", "Kartini"),
        ("Ida Rahayu", "Ida"),  # a name of its own where no title of two words begins with it
        ("Agung Wijaya", "Agung"),
        ("Ö Demir", "Demir"),  # an initial beyond ASCII is an initial too: not "Hi Ö,"
        ("Ø", ""),
        ("李 明 Wei", "李"),  # a character of a script without capitals is a name, not an initial
        ("Om Budi", "Budi"),  # forms of address typed before the name: not "Halo Kak Om,"
        ("Tante Lina", "Lina"),
        ("Bang Ucok", "Ucok"),
        ("Teh Rina", "Rina"),
        ("Akang Dadang", "Dadang"),
    ],
)
def test_first_name_is_the_name_to_greet_by(name: str, first_name: str) -> None:
    assert _customer(name=name).first_name == first_name


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Siti Rahayu", "Siti Rahayu"),
        ("Ani\x1b[31mRED", "Ani [31mRED"),  # a terminal escape in the text part
        ("Rina\r\nBcc: x@example.com", "Rina Bcc: x@example.com"),
        ("Batik\u202e%05 FFO\u202c", "Batik%05 FFO"),  # would read "Batik OFF 50%"
        ("Ci\u200bti\ufeff", "Citi"),
        ("Kain\u2028Batik\x85", "Kain Batik"),
        ("محمد علي", "محمد علي"),
        ("李明 👩\u200d👩\u200d👧", "李明 👩\u200d👩\u200d👧"),  # the zero-width joiner makes one emoji
        ("मित्\u200cर", "मित्\u200cर"),  # the zero-width non-joiner shapes Indic and Persian script
        ("  kept  as  given  ", "  kept  as  given  "),  # printable text is not touched
    ],
)
def test_clean_text_keeps_names_and_drops_what_disguises_or_breaks_them(raw: str, expected: str) -> None:
    assert clean_text(raw) == expected


@pytest.mark.parametrize(
    ("name", "first_name"),
    [
        ("\u200bIbu Siti Rahayu", "Siti"),  # a title behind a zero-width space is still a title
        ("\u202eSITI\u202c RAHAYU", "Siti"),  # a name in capitals behind a bidi control is still written Siti
        ("Rina\r\nBcc: x@example.com", "Rina"),
    ],
)
def test_the_first_name_is_found_in_the_cleaned_name(name: str, first_name: str) -> None:
    ctx = build_context("winback", _customer(name=name), shop=SHOP, unsubscribe_url="https://u", extra={})
    assert ctx["customer"]["first_name"] == first_name  # type: ignore[index]
