"""The hand-written MIME writer, checked by parsing its bytes with the standard library."""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from email import policy
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any, cast

import pytest

from worker.core.render import ShopInfo, build_message, sanitize_header_text
from worker.domain import RenderedEmail

SHOP = ShopInfo(
    name="Toko Kembali",
    domain="toko.example",
    from_address="halo@toko.example",
    from_name="Toko Kembali",
    reply_to="",
    postal_address="Jl. Contoh No. 1, Jakarta",
    base_url="https://toko.example",
    currency="IDR",
)
WIB = timezone(timedelta(hours=7))
WHEN = datetime(2026, 11, 22, 9, 30, 5, tzinfo=WIB)
HTTPS = "https://toko.example/unsubscribe?t=abc.DEF_123-x"
MAILTO = "unsubscribe@toko.example"
TEXT = "Terima kasih, Kak Siti 😊\n\nKopi Gayo 250g: Rp249.000\nDiskon 10% = hemat!  \n"
HTML = "<p>Terima kasih, Kak Siti 😊</p>\n<p>Rp249.000</p>\n"
HEADERS = [
    "Date",
    "From",
    "To",
    "Subject",
    "Message-ID",
    "MIME-Version",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Content-Type",
]
INJECTIONS = [
    "Budi\r\nBcc: evil@example.com",
    "Budi\nBcc: evil@example.com",
    "Budi\rBcc: evil@example.com",
    "=?UTF-8?Q?=0A?=Bcc: x@example.com",
    "=?utf-8?b?QnVkaQpCY2M6IGV2aWxAZXhhbXBsZS5jb20=?=",
    "Siti =?UTF-8?Q?=0D=0ABcc:_x@example.com?= Rahayu",
    "Budi\r\n\r\n<html>body injection",
    "Budi\u2028Bcc: evil@example.com",
    "Budi\x00\r\nTo: second@example.com",
]


def build(
    *,
    subject: str = "Terima kasih, Kak Siti 😊",
    text: str = TEXT,
    html: str = HTML,
    to_name: str = "Siti Rahayu",
    to_address: str = "siti@example.com",
    shop: ShopInfo = SHOP,
    message_id: str = "<winback.1.abc@toko.example>",
    date: datetime = WHEN,
    https: str = HTTPS,
    mailto: str = MAILTO,
    extra_headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    return build_message(
        RenderedEmail(subject=subject, html=html, text=text, template_version="v1"),
        to_name=to_name,
        to_address=to_address,
        shop=shop,
        message_id=message_id,
        date=date,
        list_unsubscribe_https=https,
        list_unsubscribe_mailto=mailto,
        extra_headers=extra_headers,
    )


def parse(raw: bytes) -> EmailMessage:
    return BytesParser(policy=policy.default).parsebytes(raw)


def header_names(msg: EmailMessage) -> list[str]:
    return list(msg.keys())


def assert_wire_format(raw: bytes) -> None:
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in raw.replace(b"\r\n", b""), "bare CR"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    for word in re.findall(rb"=\?[^?]+\?[bBqQ]\?[^?]*\?=", head):
        assert len(word) <= 75
        base64.b64decode(word.split(b"?")[3]).decode("utf-8")  # never a split character


# --- structure ----------------------------------------------------------------


def test_multipart_alternative_with_text_first_and_exact_bodies() -> None:
    raw = build()
    assert_wire_format(raw)
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/alternative"
    assert not msg.defects
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert [p.get_content_charset() for p in parts] == ["utf-8", "utf-8"]
    text, html = (cast(EmailMessage, p).get_content() for p in parts)
    assert text == TEXT.replace("\n", "\r\n")  # canonical MIME text: CRLF line ends
    assert html == HTML.replace("\n", "\r\n")
    assert "Terima kasih, Kak Siti 😊" in text


def test_headers_present_exactly_once_in_order() -> None:
    msg = parse(build())
    assert header_names(msg) == HEADERS
    assert msg["MIME-Version"] == "1.0"
    assert msg["Message-ID"] == "<winback.1.abc@toko.example>"
    assert msg["Subject"] == "Terima kasih, Kak Siti 😊"
    assert cast(Any, msg["Date"]).datetime == WHEN
    assert str(msg["From"]) == "Toko Kembali <halo@toko.example>"
    assert str(msg["To"]) == "Siti Rahayu <siti@example.com>"


def test_reply_to_when_the_shop_sets_one() -> None:
    shop = ShopInfo(**{**SHOP.__dict__, "reply_to": "cs@toko.example"})
    msg = parse(build(shop=shop))
    assert header_names(msg) == [*HEADERS[:3], "Reply-To", *HEADERS[3:]]
    assert msg["Reply-To"] == "cs@toko.example"


def test_list_unsubscribe_https_first_and_one_click() -> None:
    msg = parse(build())
    assert msg["List-Unsubscribe"] == f"<{HTTPS}>, <mailto:{MAILTO}>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert parse(build(mailto=f"mailto:{MAILTO}"))["List-Unsubscribe"] == f"<{HTTPS}>, <mailto:{MAILTO}>"


def test_list_unsubscribe_without_a_mailto_when_none_is_set() -> None:
    # unsubscribe.mailto = "" (no mailbox reads unsubscribe mail) failed every message: the HTTPS link alone is
    # what one-click unsubscribe needs (RFC 8058)
    raw = build(mailto="")
    assert_wire_format(raw)
    msg = parse(raw)
    assert header_names(msg) == HEADERS
    assert msg["List-Unsubscribe"] == f"<{HTTPS}>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_deterministic_bytes() -> None:
    assert build() == build()
    assert build(message_id="<a@toko.example>") != build(message_id="<b@toko.example>")


@pytest.mark.parametrize(
    "body",
    [
        "",
        "no newline at the end",
        "windows\r\nline\r\nends\r\n",
        "old mac\rline ends\r",
        "trailing spaces   \ntrailing tab\t\n",
        "x" * 5000 + "\n" + "é" * 3000,
        ".\n..\nFrom the shop\n--\n",
        "Bahasa Jepang: ありがとうございました。" * 40,  # mostly non-ASCII: base64
        "😊" * 1000,
        "= =3D =\n=\n",
        # one line too long to send as it is, and no line break at all (minified HTML saved without a final
        # newline): quoted-printable breaks it, with CRLF as everywhere else, not with bare LFs
        '<td style="padding:8px">Kak Siti 😊</td>' * 40,
        "x" * 1200,
    ],
    ids=["empty", "no-eol", "crlf", "cr", "trailing-ws", "long-lines", "dots-and-dashes", "cjk", "emoji", "equals",
         "one-long-line", "one-long-ascii-line"],
)
def test_bodies_round_trip(body: str) -> None:
    raw = build(text=body, html=f"<pre>{body}</pre>")
    assert_wire_format(raw)
    text, html = (cast(EmailMessage, p).get_content() for p in parse(raw).iter_parts())
    canonical = body.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
    assert text == canonical
    assert html == f"<pre>{canonical}</pre>"


@pytest.mark.parametrize(
    ("body", "encoding"),
    [
        ("Halo Kak Siti,\nKopi Gayo 250g: Rp249.000\n", "7bit"),  # ASCII, short lines: sent as it is
        ("x" * 998 + "\n", "7bit"),
        ("x" * 999 + "\n", "quoted-printable"),  # a line SMTP may not carry as is
        ("nul \x00 inside\n", "quoted-printable"),
        ("Terima kasih 😊, Kopi Gayo 250g: Rp249.000 untuk Kak Siti\n", "quoted-printable"),
        ("ありがとうございました。" * 10, "base64"),
    ],
    ids=["ascii", "longest-line", "too-long-line", "nul", "some-utf8", "mostly-utf8"],
)
def test_each_body_gets_the_lightest_encoding_that_carries_it(body: str, encoding: str) -> None:
    raw = build(text=body, html=body)
    assert_wire_format(raw)
    parts = list(parse(raw).iter_parts())
    assert [p["Content-Transfer-Encoding"] for p in parts] == [encoding, encoding]
    canonical = body.replace("\n", "\r\n")
    assert [cast(EmailMessage, p).get_content() for p in parts] == [canonical, canonical]
    if encoding == "7bit":  # the bytes on the wire are the text itself
        assert canonical.encode() in raw


def test_boundary_never_occurs_in_the_bodies() -> None:
    raw = build()
    boundary = parse(raw).get_boundary()
    assert boundary is not None
    hostile = f"--{boundary}\n--{boundary}--\n"
    raw = build(text=hostile, html=hostile)
    msg = parse(raw)
    assert [cast(EmailMessage, p).get_content() for p in msg.iter_parts()] == [hostile.replace("\n", "\r\n")] * 2
    body = raw.split(b"\r\n\r\n", 1)[1]
    assert body.count(f"--{msg.get_boundary()}".encode()) == 3  # two delimiters and the close


@pytest.mark.parametrize(
    "subject",
    [
        "Kak Siti, masih suka Kopi Gayo 250g? Ada diskon 10% khusus untukmu",
        "Terima kasih, Kak Siti 😊 " * 8,
        "a" * 190,
        "ありがとう" * 40,
        'Kopi: (promo) <spesial> "hemat" 100%',
    ],
)
def test_subjects_round_trip_and_fold(subject: str) -> None:
    raw = build(subject=subject)
    assert_wire_format(raw)
    msg = parse(raw)
    assert msg["Subject"] == sanitize_header_text(subject)
    assert header_names(msg) == HEADERS


# --- display names: quoting, encoding, injection --------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "Siti Rahayu",
        "Rahayu, Siti",
        'Siti "Ani" Rahayu',
        "Siti <siti@evil.example>",
        "siti@evil.example",
        "Siti, other@example.com",
        "Budi; Ani: <x@y.z>, (comment)",
        "back\\slash\\",
        "Séverine 😊, Ltd",
        "Dr. Budi",
        "",
        "x" * 300,
        *INJECTIONS,
    ],
)
def test_to_display_name_is_one_mailbox(name: str) -> None:
    raw = build(to_name=name)
    assert_wire_format(raw)
    msg = parse(raw)
    assert header_names(msg) == HEADERS
    to = cast(Any, msg["To"])
    assert len(to.addresses) == 1
    assert to.addresses[0].addr_spec == "siti@example.com"
    assert to.addresses[0].display_name == sanitize_header_text(name)
    assert "\n" not in to.addresses[0].display_name and "\r" not in to.addresses[0].display_name
    assert not to.defects


@pytest.mark.parametrize("name", ["Toko, Kembali", 'Toko "Kembali" <x@y.z>', "Toko Kembali 😊", *INJECTIONS])
def test_from_display_name_is_one_mailbox(name: str) -> None:
    shop = ShopInfo(**{**SHOP.__dict__, "from_name": name})
    msg = parse(build(shop=shop))
    assert header_names(msg) == HEADERS
    frm = cast(Any, msg["From"])
    assert [a.addr_spec for a in frm.addresses] == ["halo@toko.example"]
    assert frm.addresses[0].display_name == sanitize_header_text(name)


@pytest.mark.parametrize("payload", INJECTIONS)
def test_cve_2024_6923_no_header_injection_via_name_or_subject(payload: str) -> None:
    """A CR/LF or an encoded newline in data never becomes a header, even after re-serialising."""
    raw = build(to_name=payload, subject=f"Masih suka {payload}? Diskon 10%")
    msg = parse(raw)
    assert header_names(msg) == HEADERS  # no Bcc, no second To
    assert "Bcc" not in msg
    assert msg.get_all("To") is not None and len(msg.get_all("To") or []) == 1
    assert "\n" not in str(msg["To"]) and "\n" not in str(msg["Subject"])
    assert msg["Subject"] == sanitize_header_text(f"Masih suka {payload}? Diskon 10%")
    # Python 3.11.7's generator is the vulnerable part: refold our parsed headers and parse again.
    for out_policy in (policy.default, policy.SMTP):
        again = parse(msg.as_bytes(policy=out_policy))
        assert header_names(again) == HEADERS
        assert len(cast(Any, again["To"]).addresses) == 1


def test_extra_headers_are_written_and_sanitised() -> None:
    msg = parse(build(extra_headers=[("X-Kembali-Campaign", "winback\r\nBcc: x@example.com"), ("Feedback-ID", "w:1")]))
    assert header_names(msg) == [*HEADERS[:-1], "X-Kembali-Campaign", "Feedback-ID", "Content-Type"]
    assert msg["X-Kembali-Campaign"] == "winback Bcc: x@example.com"


# --- refusals ------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"to_address": "siti@example.com\r\nBcc: evil@example.com"},
        {"to_address": "siti @example.com"},
        {"to_address": "<siti@example.com>"},
        {"to_address": "siti@example.com>, <evil@example.com"},
        {"to_address": "siti.example.com"},
        {"to_address": "sití@example.com"},
        {"to_address": ""},
        {"message_id": "<a b@toko.example>"},
        {"message_id": "<a@toko.example>\r\nBcc: x@y.z"},
        {"date": datetime(2026, 11, 22, 9, 30)},  # naive
        {"https": "http://toko.example/u"},
        {"https": "https://toko.example/u>, <https://evil.example"},
        {"https": "https://toko.example/u\r\nBcc: x@y.z"},
        {"mailto": "un sub@toko.example"},
        {"extra_headers": [("Bcc", "x@example.com")]},
        {"extra_headers": [("to", "x@example.com")]},
        {"extra_headers": [("X-Bad Name", "v")]},
        {"extra_headers": [("X-Bad:Name", "v")]},
        {"shop": ShopInfo(**{**SHOP.__dict__, "reply_to": "cs@toko.example\r\nBcc: x@y.z"})},
    ],
)
def test_refuses_what_cannot_be_written_safely(overrides: dict[str, Any]) -> None:
    # refused by the name of what was wrong (any ValueError passed: one from elsewhere in build too)
    (given,) = overrides
    with pytest.raises(ValueError, match=f"^{re.escape(REFUSED_AS[given])}"):
        build(**overrides)


REFUSED_AS = {"to_address": "to_address: ", "message_id": "message_id: ", "date": "date must be timezone-aware",
              "https": "list_unsubscribe_https: ", "mailto": "list_unsubscribe_mailto: ",
              "extra_headers": "extra header name not allowed: ", "shop": "shop.reply_to: "}


@pytest.mark.parametrize(
    "field",
    [
        {"subject": "Kak Siti, masih suka Kemeja Batik Parang Rusak? 😊 Ada diskon 10% khusus untukmu hari ini saja"},
        {"subject": "ありがとう" * 40},
        {"to_name": "Siti Rahayu Ḍewi Kusumawardhani Putri Ayu 🌸 " * 3},
        {"to_name": "Ḍewi", "to_address": "dewi.kusumawardhani.putri.ayu.kartika@mail.universitas-indonesia.example"},
        {"shop": ShopInfo(**{**SHOP.__dict__, "from_name": "Toko Kembali — Batik & Kopi Nusantara ☕"})},
    ],
)
def test_header_lines_with_encoded_words_are_at_most_76_characters(field: dict[str, Any]) -> None:
    """RFC 2047 section 2: a line of a header holding an encoded-word may not be longer than 76 characters. The
    first line counts its header's name: 'Subject: ' and an encoded-word of 72 made 81; a From of 98."""
    raw = build(**field)
    assert_wire_format(raw)
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    # (each case's header is encoded: a check of no line at all, were they spelt otherwise, would pass)
    encoded = [line for line in head.split("\r\n") if "=?utf-8?" in line.lower()]
    assert encoded, head
    assert [line for line in encoded if len(line) > 76] == []
    msg = parse(raw)
    assert header_names(msg) == HEADERS
    if "subject" in field:
        assert msg["Subject"] == sanitize_header_text(field["subject"])
    # the names as RFC 2047 reads them (Python's parser puts a space between two encoded-words of a name)
    unfolded = dict(line.split(": ", 1) for line in head.replace("\r\n ", " ").split("\r\n"))
    to_name, to_address = unfolded["To"].rsplit(" <", 1)
    assert to_address == field.get("to_address", "siti@example.com") + ">"
    assert str(make_header(decode_header(to_name))) == sanitize_header_text(field.get("to_name", "Siti Rahayu"))
    from_name = unfolded["From"].rsplit(" <", 1)[0]
    assert str(make_header(decode_header(from_name))) == sanitize_header_text(field.get("shop", SHOP).from_name)


@pytest.mark.parametrize(
    "field",
    [
        {"to_name": "PT. Sinar Jaya Abadi Sentosa, Divisi Pengadaan Barang dan Jasa Kantor Pusat Jakarta"},
        {"to_name": "Bapak Haji Muhammad Rizky Pratama Nugroho Wicaksono Saputra Kusumawardhana Putra"},
        {"to_name": 'Siti "Ani" Rahayu', "to_address": "siti.rahayu.kusumawardhani.putri@mail.universitas.example"},
        {"shop": ShopInfo(**{**SHOP.__dict__, "from_name": "Toko Kembali (Batik, Kopi & Kerajinan) Official Store"})},
    ],
)
def test_a_long_plain_display_name_is_folded_at_its_spaces_to_lines_of_78(field: dict[str, Any]) -> None:
    """RFC 5322 2.1.1: lines SHOULD be at most 78 characters. A long ASCII name (a company's, quoted for its
    comma or dot) went on one line of 100 and more, its address after it."""
    raw = build(**field)
    assert_wire_format(raw)
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    lines = [line for line in head.split("\r\n") if line.startswith(("To:", "From:", " ")) and "=?" not in line]
    assert [line for line in lines if len(line) > 78] == []
    msg = parse(raw)
    assert header_names(msg) == HEADERS
    to, frm = cast(Any, msg["To"]), cast(Any, msg["From"])
    assert [(a.display_name, a.addr_spec) for a in to.addresses] == [
        (sanitize_header_text(field.get("to_name", "Siti Rahayu")), field.get("to_address", "siti@example.com"))]
    assert [(a.display_name, a.addr_spec) for a in frm.addresses] == [
        (sanitize_header_text(field.get("shop", SHOP).from_name), "halo@toko.example")]
    assert not to.defects and not frm.defects


@pytest.mark.parametrize("before", range(40, 80, 3))
def test_a_folded_plain_header_never_joins_into_an_encoded_word_look_alike_when_unfolded_laxly(before: int) -> None:
    """``sanitize_header_text`` writes a data's "=?" as "= ?" so that no reader, however lax, decodes data as an
    encoded-word. A fold at that space, unfolded by a reader that drops the CRLF and the space after it (not
    RFC 5322's way, but a lax one), gave the "=?" back."""
    data = "a" * before + " =?utf-8?b?QnVkaQ==?= " + "x" * 60
    raw = build(subject=data, to_name=data)
    assert_wire_format(raw)
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    laxly = {line.split(": ", 1)[0]: line for line in head.replace("\r\n ", "").split("\r\n")}
    assert "=?" not in laxly["Subject"] and "=?" not in laxly["To"], head
    msg = parse(raw)
    assert msg["Subject"] == sanitize_header_text(data)
    assert cast(Any, msg["To"]).addresses[0].display_name == sanitize_header_text(data)
