"""Rendering, the pure half: template context, formatting filters, and the MIME writer.

Theory of operation: the pipeline turns a customer and campaign facts into a
*plain-data* context (``build_context``), a ``TemplateRenderer`` (the Jinja2
adapter) turns it into a ``RenderedEmail``, and ``build_message`` turns that into
the exact bytes handed to SMTP. Nothing here reads files, the clock or the network.

The MIME writer is hand-written because ``email.message.EmailMessage`` costs about
a millisecond per message and, on Python 3.11.7, its header folding is exposed to
CVE-2024-6923 (newlines inside encoded words). Here every header value built from
data is sanitised (no control characters, no ``=?`` encoded-word look-alikes) and
then emitted as plain ASCII atoms, an RFC 5322 quoted-string, or RFC 2047
``=?utf-8?b?…?=`` encoded-words, folded with CRLF + space.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, localcontext
from email.utils import format_datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from babel import Locale as BabelLocale
from babel import UnknownLocaleError
from babel.dates import format_date as _babel_format_date
from babel.numbers import format_currency

from worker.domain import CustomerSnapshot, Locale, ProductView, RenderedEmail
from worker.money import exponent, from_minor

if TYPE_CHECKING:
    from worker.config import ShopSettings

__all__ = [
    "HEADER_TEXT_MAX_CHARS",
    "ShopInfo",
    "TemplateRenderer",
    "build_context",
    "build_message",
    "check_address",
    "check_uri",
    "clean_text",
    "format_date",
    "format_money",
    "product_dict",
    "sanitize_header_text",
]


# --- the port and the shop's identity --------------------------------------


@dataclass(frozen=True)
class ShopInfo:
    """The shop as templates and headers see it."""

    name: str
    domain: str
    from_address: str
    from_name: str
    reply_to: str
    postal_address: str
    base_url: str
    currency: str

    @classmethod
    def from_settings(cls, shop: ShopSettings) -> ShopInfo:
        return cls(
            name=shop.name,
            domain=shop.domain,
            from_address=shop.from_address,
            from_name=shop.from_name or shop.name,  # config.toml: "an empty from_name uses name"
            reply_to=shop.reply_to,
            postal_address=shop.postal_address,
            base_url=shop.base_url,
            currency=shop.currency,
        )


class TemplateRenderer(Protocol):
    """Turns a campaign, a locale and a plain-data context into an email."""

    def render(self, campaign: str, locale: Locale, context: Mapping[str, object]) -> RenderedEmail:
        """Raise ``worker.errors.TemplateError`` naming the file and line on failure."""
        ...


# --- formatting filters ----------------------------------------------------

# Where a currency is at home: its amounts are written the local way whatever the
# language (an Indonesian shop writes "Rp249.000" in English text too).
_CURRENCY_TERRITORY = {"IDR": "ID", "MYR": "MY", "SGD": "SG"}


@lru_cache(maxsize=64)
def _money_locale(locale: str, currency: str) -> BabelLocale:
    language = str(locale).replace("-", "_").split("_")[0] or "id"
    territory = _CURRENCY_TERRITORY.get(currency.upper())
    if territory:
        try:
            return BabelLocale.parse(f"{language}_{territory}")
        except (UnknownLocaleError, ValueError):
            pass
    return BabelLocale.parse(language)


@lru_cache(maxsize=16)
def _money_patterns(currency: str) -> tuple[str, str]:
    digits = exponent(currency)
    return "¤#,##0", ("¤#,##0." + "0" * digits) if digits else "¤#,##0"


MAX_MONEY_DIGITS = 1000
"""The most digits ``format_money`` prints: beyond any sum of money, and Babel and Decimal take seconds over
an amount of millions (time a render's limit cannot stop, spent in their code)."""


@lru_cache(maxsize=4096)  # Babel takes ~30 µs a call; shops have few distinct prices
def format_money(minor: int, currency: str, locale: str) -> str:
    """``24900000`` IDR minor units → ``Rp249.000`` (decimals only when not whole), every digit of any amount of
    at most ``MAX_MONEY_DIGITS`` digits; ValueError beyond."""
    digits = minor.bit_length() * 30103 // 100000 + 1  # at least as many as it has (log10(2) < 0.30103)
    if digits > MAX_MONEY_DIGITS + 1:
        raise ValueError(f"money: an amount of {digits - 1:,} digits or more, more than the {MAX_MONEY_DIGITS:,} "
                         "digits an amount may have (a template's arithmetic gone wrong?)")
    # Decimal's default context keeps 28 digits: a template's arithmetic (a total times a quantity) can go past
    # them, which rounded the amount and then failed with a bare InvalidOperation
    with localcontext(prec=max(28, digits + 8)):
        amount: Decimal = from_minor(minor, currency)
        whole, fractional = _money_patterns(currency)
        pattern = whole if amount == amount.to_integral_value() else fractional
        return str(
            format_currency(
                amount, currency.upper(), format=pattern, locale=_money_locale(locale, currency), currency_digits=False
            )
        )


def format_date(d: date, locale: str) -> str:
    """Babel's long date: ``22 November 2026`` (id), ``November 22, 2026`` (en)."""
    language = str(locale).replace("-", "_").split("_")[0] or "id"
    return str(_babel_format_date(d, format="long", locale=language))


# --- context -----------------------------------------------------------------

_RESERVED_KEYS = frozenset({"campaign", "customer", "shop", "unsubscribe_url", "locale"})
_Plain = str | int | float | bool | None | dict[str, "_Plain"] | list["_Plain"]


def product_dict(p: ProductView, shop_url: str = "") -> dict[str, object]:
    """A product as templates see it: plain strings (its texts cleaned, see ``clean_text``) and an integer price.
    A product that products.csv gives no link for links to ``shop_url`` (the shop's ``base_url``): a name, a
    picture or a "View product" linked to ``href=""`` went nowhere, and the text part printed an empty line."""
    return {
        "external_id": clean_text(p.external_id),
        "name": clean_text(p.name),
        "category": clean_text(p.category),
        "price_minor": p.price_minor,
        "currency": p.currency,
        "url": _link(p.url) or shop_url,
        "image_url": _link(p.image_url),
    }


INVISIBLE_CHARACTERS = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u3164\uffa0"
                                 + "".join(map(chr, range(0xFE00, 0xFE10))))
"""Invisible characters Unicode does not class as format characters (Cf), so printable to Python: the combining
grapheme joiner, Hangul fillers, Khmer inherent vowels, variation selectors."""


def _link(url: str) -> str:
    """``url``, or "" when it holds a space, a control, bidi or invisible character, or is no http(s) address
    with a host (the importer refuses such a link; an earlier one, or a row written past it, stored it): the text
    part prints a link as it is, and "https://toko.example/p/\u202emoc.live" reads as another address; an
    ``href`` of ``javascript:…`` or ``data:…`` runs or shows what the shop never wrote, and a relative one
    resolves against whatever page the webmail is."""
    clean = url.isprintable() and not any(ch.isspace() or ch in INVISIBLE_CHARACTERS for ch in url)
    if not clean:
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced "[" in the host
        return ""
    return url if parts.scheme.lower() in ("http", "https") and parts.netloc else ""


_SCALAR_TYPES = frozenset({str, int, float, bool, type(None)})


def _plain(value: object, where: tuple[str | int, ...]) -> _Plain:
    """Copy ``value`` as plain data, refusing anything a template should not touch. ``where`` is the path
    to it, spelt out only in an error (building it for every value costs more than the copy)."""
    if type(value) in _SCALAR_TYPES:
        return value  # type: ignore[return-value]
    if isinstance(value, str | bool | int | float):  # subclasses (e.g. a StrEnum member)
        return value
    if isinstance(value, Mapping):
        out: dict[str, _Plain] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"template context {_path(where)}: keys must be strings, not {type(k).__name__}")
            out[k] = v if type(v) in _SCALAR_TYPES else _plain(v, (*where, k))
        return out
    if isinstance(value, list | tuple):
        return [v if type(v) in _SCALAR_TYPES else _plain(v, (*where, i)) for i, v in enumerate(value)]
    if isinstance(value, date):  # dates travel as ISO strings; the `date` filter reads them
        return value.isoformat()
    raise TypeError(f"template context {_path(where)}: {type(value).__name__} is not plain data")


def _path(where: tuple[str | int, ...]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else (f".{part}" if i else part)
                   for i, part in enumerate(where))  # fmt: skip


def build_context(
    campaign: str,
    customer: CustomerSnapshot,
    *,
    shop: ShopInfo,
    unsubscribe_url: str,
    extra: Mapping[str, object],
) -> dict[str, object]:
    """The variables every template receives, as plain data (see templates/email/README.md)."""
    clash = _RESERVED_KEYS.intersection(extra)
    if clash:
        raise ValueError(f"extra context for {campaign!r} may not set {sorted(clash)}")
    name = clean_text(customer.name)
    if name is not customer.name:  # the first name of what the email shows: "\u200bIbu SITI" greets Siti
        customer = dataclasses.replace(customer, name=name)
    context: dict[str, object] = {
        "campaign": campaign,
        "locale": str(customer.locale),
        "customer": {
            "first_name": customer.first_name,
            "name": name,
            "email": customer.email,
            "locale": str(customer.locale),
        },
        "shop": {
            "name": shop.name,
            "domain": shop.domain,
            "from_address": shop.from_address,
            "from_name": shop.from_name,
            "reply_to": shop.reply_to,
            "postal_address": shop.postal_address,
            "base_url": shop.base_url,
            "currency": shop.currency,
        },
        "unsubscribe_url": unsubscribe_url,
    }
    for key, value in extra.items():
        context[key] = _plain(value, (key,))
    return context


# --- header text -------------------------------------------------------------

HEADER_TEXT_MAX_CHARS = 200
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
"""What a short text that names something (an id, a category, the shop's name) may not hold, where it is read:
C0 and C1 controls (CR, LF, NUL, TAB, ESC, NEL, CSI…), line separators, and bidi overrides, embeddings and
isolates (they make one name read as another). The importer and the config refuse them; ``clean_text`` turns them
into spaces or drops them in what reaches an email."""
# Bidirectional overrides, embeddings, isolates and marks: dropped (they disguise names, product titles and
# subjects: "Batik\u202eFFO %05" reads "Batik50% OFF"). Arabic and Hebrew text needs none of them.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")
# Invisible characters that join nothing: the zero-width space, word joiner, invisible operators, BOM, Mongolian
# vowel separator. Dropped (they hide inside a name or a title). The zero-width joiner and non-joiner (emoji
# sequences, Persian and Indic scripts) and the other format characters are kept.
_INVISIBLE = frozenset("\u200b\u2060\u2061\u2062\u2063\u2064\ufeff\u180e")


def _clean_char(ch: str) -> str:
    if ch.isprintable():
        return ch
    category = unicodedata.category(ch)
    if category == "Cf":
        return "" if ch in _BIDI or ch in _INVISIBLE else ch  # keep joiners (emoji sequences)
    if category in ("Cn", "Co"):
        return ch  # unassigned in this Python's tables (new emoji) or private use: harmless
    return " "  # Cc (CR, LF, NUL, TAB, ESC, C1…), Cs, Zl, Zp, Zs → space


def clean_text(value: str) -> str:
    """Shop data (a customer's name, a product's name or category, an order id) as templates receive it.

    Imports keep these as given (bar NUL); here control characters (C0 and C1: CR, LF, TAB, ESC…, which would
    reach the text part raw: a terminal escape, a line break in a greeting) and line separators become spaces,
    bidi controls and invisible characters are dropped, and runs of whitespace then collapse to one space.
    Every other character is kept: Indonesian, Chinese and Arabic names, emoji (with their joiners).
    Unchanged (and the same object) when every character is printable, as almost all are.
    """
    if value.isprintable():
        return value
    return " ".join("".join(map(_clean_char, value)).split())


def sanitize_header_text(value: str, max_chars: int = HEADER_TEXT_MAX_CHARS) -> str:
    """Make data safe to put in a header: one line of printable text, trimmed and capped.

    Control characters (CR, LF, NUL, TAB…) and Unicode line separators become
    spaces, bidi overrides are dropped, whitespace runs collapse to one space, and
    ``=?`` (the start of an RFC 2047 encoded-word) becomes ``= ?`` so no reader,
    however lax, decodes data as an encoded-word.
    """
    if not (value.isprintable() and value.isascii()):
        value = "".join(map(_clean_char, value))
    if "  " in value or value[:1] == " " or value[-1:] == " " or "\xa0" in value:
        value = " ".join(value.split())
    if "=?" in value:
        value = value.replace("=?", "= ?")
    if len(value) > max_chars:
        value = cut_whole(value, max_chars - 3) + "..."  # ASCII: a cut ASCII name or subject stays plain, not encoded
    return value


_ZWJ = "\u200d"
_REGIONAL = range(0x1F1E6, 0x1F200)
"""A flag is two of these letters (🇮🇩 is I, D)."""


_LONGEST_CHARACTER = 32
"""The most code points ``cut_whole`` steps back over to keep one character a reader sees whole: a letter with its
accents, an emoji sequence (Unicode's stream-safe text, UAX #15, allows 30 marks after a letter). A longer run is
no character anyone writes ("Zalgo" text: a letter under hundreds of accents) and is cut inside: stepping back
over all of it left a subject opening with such a name as "..."."""


def cut_whole(value: str, end: int) -> str:
    """``value[:end]``, the end moved back to where one character a reader sees ends (not between a flag's two
    letters, an emoji's parts joined by ZWJ, a letter and its accent or modifier), spaces before it dropped: a
    header cut short here, and the templates' ``truncate``."""
    at = end
    while 0 < at < len(value) and end - at < _LONGEST_CHARACTER and _inside(value, at):
        at -= 1
    if 0 < at < len(value) and _inside(value, at):  # no end within reach: cut inside the run
        at = end
    return value[:at].rstrip()


def _inside(value: str, i: int) -> bool:
    """Whether ``value[i]`` belongs with ``value[i - 1]``: an approximation of Unicode's grapheme clusters (UAX 29)
    good for the cases a name or subject holds."""
    after, before = value[i], value[i - 1]
    if after == _ZWJ or before == _ZWJ or unicodedata.category(after) in ("Mn", "Me", "Mc"):
        return True
    code = ord(after)
    if 0xFE00 <= code <= 0xFE0F or 0x1F3FB <= code <= 0x1F3FF or 0xE0020 <= code <= 0xE007F:
        return True  # a variation selector, a skin tone, a tag (the flags of England, Scotland, Wales)
    if code in _REGIONAL and ord(before) in _REGIONAL:
        letters = 0  # the regional indicators before ``i``: an odd number ends inside a flag
        while i - letters - 1 >= 0 and ord(value[i - letters - 1]) in _REGIONAL:
            letters += 1
        return letters % 2 == 1
    return False


# --- header encoding -----------------------------------------------------------

_ATOM_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_FIELD_NAME = re.compile(r"[!-9;-~]+")
_EW_MAX_BYTES = 45  # 60 base64 chars + len("=?utf-8?b??=") == 72 ≤ 75
_FOLD_AT = 76


def _encoded_words(text: str, first: int = _EW_MAX_BYTES) -> list[str]:
    """RFC 2047 B-encoded words, each ≤ 75 chars (the first of at most ``first`` bytes of text, to fit after its
    header's name), never splitting a UTF-8 character."""
    words: list[str] = []
    chunk: list[bytes] = []
    size = 0
    limit = first
    for ch in text:
        b = ch.encode("utf-8")
        if size + len(b) > limit and chunk:
            words.append("=?utf-8?b?" + base64.b64encode(b"".join(chunk)).decode("ascii") + "?=")
            chunk, size, limit = [], 0, _EW_MAX_BYTES
        chunk.append(b)
        size += len(b)
    if chunk:
        words.append("=?utf-8?b?" + base64.b64encode(b"".join(chunk)).decode("ascii") + "?=")
    return words


_EW_LINE = 76
"""The longest line of a header holding an encoded-word (RFC 2047 section 2), its name and the folding space
included."""
_EW_FIRST_MIN_BYTES = 9
"""A first line that holds fewer bytes of text than this (after a long header name) takes none: the words begin
on the next line."""


def _encoded_lines(text: str, used: int) -> str:
    """``text`` as encoded-words folded with CRLF + space so that no line, counting the ``used`` characters before
    it on the first (``Subject: ``), is longer than 76."""
    first = (_EW_LINE - used - len("=?utf-8?b??=")) // 4 * 3  # 4 base64 characters carry 3 bytes
    if first < _EW_FIRST_MIN_BYTES:
        return "\r\n " + "\r\n ".join(_encoded_words(text))
    return "\r\n ".join(_encoded_words(text, first))


_FOLD_POINT = re.compile(r"(?<!=) | (?!\?)")
"""A space a header may be folded at: any but the one ``sanitize_header_text`` put inside an "=?" (a reader that
unfolds laxly, dropping the space after the CRLF too, would read "=?" again)."""


def _fold_plain(text: str, used: int) -> str:
    """Fold printable ASCII at spaces so lines stay near 78 chars (content is unchanged)."""
    if used + len(text) <= _FOLD_AT:
        return text
    lines: list[str] = []
    line = ""
    for word in _FOLD_POINT.split(text):
        if line and used + len(line) + 1 + len(word) > _FOLD_AT:
            lines.append(line)
            line, used = word, 1
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\r\n ".join(lines)


def _unstructured(value: str, used: int) -> str:
    """An unstructured header value (Subject…): plain ASCII when safe, else encoded-words."""
    text = sanitize_header_text(value)
    if text.isascii() and "=?" not in text:
        return _fold_plain(text, used)
    return _encoded_lines(text, used)


def _display_name(value: str, used: int) -> str:
    """A phrase that can never be read as more than one name (``used``: the characters before it on its line)."""
    name = sanitize_header_text(value)
    if not name or _ATOM_PHRASE.fullmatch(name):
        return _fold_plain(name, used)
    if name.isascii():  # sanitised, so printable and without "=?": a quoted-string is exact
        # folded at its single spaces: unfolding takes only the CRLF away (RFC 5322 3.2.4), the space stays
        return _fold_plain('"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"', used)
    return _encoded_lines(name, used)


_ADDRESS_FORBIDDEN = re.compile(r'[\s<>,;"()\\\[\]\x00-\x1f\x7f]')


def check_address(address: str, what: str) -> str:
    """``address`` if it can be written in a header and an SMTP command as it is (ASCII ``local@domain``,
    nothing that would need quoting); else ValueError naming ``what``."""
    if (
        not address
        or not address.isascii()
        or _ADDRESS_FORBIDDEN.search(address)
        or address.count("@") != 1
        or address.startswith("@")
        or address.endswith("@")
    ):
        raise ValueError(f"{what}: not a plain email address: {address!r}")
    return address


def _mailbox(name: str, address: str, what: str, used: int) -> str:
    """``name <address>`` for a header whose first line has ``used`` characters before it."""
    address = check_address(address, what)
    phrase = _display_name(name, used)
    if not phrase:
        return address
    last = phrase.rsplit("\r\n", 1)[-1]
    if len(last) + (0 if "\r\n" in phrase else used) + len(address) + 3 > _EW_LINE:
        return f"{phrase}\r\n <{address}>"  # an encoded-word's line stays within 76 characters, any other near 78
    return f"{phrase} <{address}>"


_URI_FORBIDDEN = re.compile(r"[\s<>\x00-\x1f\x7f]")


def check_uri(uri: str, what: str, scheme: str) -> str:
    """``uri`` if it is an ASCII ``scheme`` URI that can be written between angle brackets in a header; else
    ValueError naming ``what``."""
    if not uri.isascii() or not uri.startswith(scheme) or len(uri) <= len(scheme) or _URI_FORBIDDEN.search(uri):
        raise ValueError(f"{what}: not a {scheme} URI without spaces or angle brackets: {uri!r}")
    if len(uri) > 900:
        raise ValueError(f"{what}: longer than 900 characters")
    return uri


def _message_id(value: str) -> str:
    mid = value.strip()
    if mid.startswith("<") and mid.endswith(">"):
        mid = mid[1:-1]
    check_address(mid, "message_id")
    return f"<{mid}>"


# --- bodies ----------------------------------------------------------------------


MAX_7BIT_LINE = 998
"""Octets a line may have before its CRLF (RFC 5322 2.1.1)."""


def _encode_body(text: str) -> tuple[str, bytes]:
    """(transfer encoding, encoded bytes) of a text part in canonical CRLF form: ``7bit`` when it is
    already ASCII text with short lines (no encoding to do, nothing to decode), else quoted-printable
    for mostly-ASCII text and base64 for the rest."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    data = text.replace("\n", "\r\n").encode("utf-8")
    extra = len(data) - len(text)  # bytes beyond one per character: a cheap non-ASCII measure
    if data.isascii() and b"\0" not in data and _short_lines(data):
        return "7bit", data
    if extra * 5 > len(data):  # mostly non-ASCII: base64 is smaller than quoted-printable
        return "base64", base64.encodebytes(data).replace(b"\n", b"\r\n")
    encoded = binascii.b2a_qp(data, istext=True)
    if b"\r\n" not in data:  # binascii breaks lines the way the first one ends: with no line end, a bare LF
        encoded = encoded.replace(b"\n", b"\r\n")
    return "quoted-printable", encoded


def _short_lines(data: bytes) -> bool:
    if len(data) <= MAX_7BIT_LINE:
        return True
    return max(map(len, data.split(b"\r\n"))) <= MAX_7BIT_LINE


_RESERVED_HEADERS = frozenset(
    h.lower()
    for h in (
        "Date",
        "From",
        "To",
        "Cc",
        "Bcc",
        "Reply-To",
        "Subject",
        "Message-ID",
        "MIME-Version",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Sender",
        "Return-Path",
    )
)


def build_message(
    rendered: RenderedEmail,
    *,
    to_name: str,
    to_address: str,
    shop: ShopInfo,
    message_id: str,
    date: datetime,
    list_unsubscribe_https: str,
    list_unsubscribe_mailto: str,
    extra_headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """The RFC 5322 message: multipart/alternative (text, then HTML), CRLF throughout.

    ``List-Unsubscribe`` holds the HTTPS link, then the mailto address unless
    ``list_unsubscribe_mailto`` is empty.

    Raises ValueError for an address, URI, Message-ID or header name that could
    not be written safely, and for a naive ``date``.
    """
    if date.tzinfo is None or date.utcoffset() is None:
        raise ValueError("date must be timezone-aware")
    unsubscribe = ["<" + check_uri(list_unsubscribe_https, "list_unsubscribe_https", "https://") + ">"]
    mailto = list_unsubscribe_mailto
    if mailto:  # optional: the HTTPS link is what one-click unsubscribe (RFC 8058) needs
        if not mailto.startswith("mailto:"):
            mailto = "mailto:" + check_address(mailto, "list_unsubscribe_mailto")
        unsubscribe.append("<" + check_uri(mailto, "list_unsubscribe_mailto", "mailto:") + ">")

    lines = [
        "Date: " + format_datetime(date),
        "From: " + _mailbox(shop.from_name or shop.name, shop.from_address, "shop.from_address", len("From: ")),
        "To: " + _mailbox(to_name, to_address, "to_address", len("To: ")),
    ]
    if shop.reply_to:
        lines.append("Reply-To: " + check_address(shop.reply_to, "shop.reply_to"))
    lines += [
        "Subject: " + _unstructured(rendered.subject, len("Subject: ")),
        "Message-ID: " + _message_id(message_id),
        "MIME-Version: 1.0",
        "List-Unsubscribe: " + ",\r\n ".join(unsubscribe),
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
    ]
    for name, value in extra_headers:
        if not _FIELD_NAME.fullmatch(name) or name.lower() in _RESERVED_HEADERS:
            raise ValueError(f"extra header name not allowed: {name!r}")
        lines.append(f"{name}: " + _unstructured(value, len(name) + 2))

    text_cte, text_body = _encode_body(rendered.text)
    html_cte, html_body = _encode_body(rendered.html)
    seed = hashlib.blake2s(message_id.encode("utf-8", "replace"), digest_size=9).hexdigest()
    boundary = "=_kembali_" + seed  # "=_" never occurs in quoted-printable or base64 output (7bit text: checked)
    n = 0
    while boundary.encode("ascii") in text_body or boundary.encode("ascii") in html_body:
        n += 1
        boundary = f"=_kembali_{seed}_{n}"
    lines.append(f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"')

    head = "\r\n".join(lines).encode("utf-8")  # ASCII by construction
    delimiter = b"--" + boundary.encode("ascii")
    return b"".join(
        (
            head,
            b"\r\n\r\n",
            delimiter,
            b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: ",
            text_cte.encode("ascii"),
            b"\r\n\r\n",
            text_body,
            b"\r\n",  # this CRLF belongs to the delimiter (RFC 2046 5.1.1)
            delimiter,
            b"\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: ",
            html_cte.encode("ascii"),
            b"\r\n\r\n",
            html_body,
            b"\r\n",
            delimiter,
            b"--\r\n",
        )
    )
