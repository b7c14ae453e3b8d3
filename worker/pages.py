"""The few HTML pages customers see after clicking a link, in Bahasa Indonesia and English.

Every value from data goes through ``html.escape``; pages load nothing external
(the web server sends a CSP of ``default-src 'none'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from urllib.parse import unquote

from worker.domain import Locale

_TEXT: dict[str, dict[Locale, str]] = {
    # The shop's voice, as in its emails: Bahasa Indonesia calls the customer "Kakak" (never "Anda"), in short,
    # casual-polite sentences; English is as warm ("Just click…", "we'll"). tests/test_customer_pages.py holds
    # every sentence.
    "confirm_title": {Locale.ID: "Berhenti berlangganan?", Locale.EN: "Unsubscribe?"},
    "confirm_body": {
        Locale.ID: "Cukup klik tombol di bawah agar {who} tidak lagi menerima email promosi dari {shop}.",
        Locale.EN: "Just click the button below and we'll stop sending promotional emails from {shop} to {who}.",
    },
    "you": {Locale.ID: "Kakak", Locale.EN: "you"},
    "and": {Locale.ID: "dan", Locale.EN: "and"},
    "confirm_button": {Locale.ID: "Berhenti berlangganan", Locale.EN: "Unsubscribe"},
    "done_title": {Locale.ID: "Kakak sudah berhenti berlangganan", Locale.EN: "You're unsubscribed"},
    "done_body": {
        Locale.ID: "Kakak tidak akan menerima email promosi dari {shop} lagi. Maaf sudah mengganggu, ya.",
        Locale.EN: "You won't get promotional emails from {shop} any more. Sorry for the bother.",
    },
    "done_addresses": {
        Locale.ID: "Alamat yang tidak akan kami kirimi email lagi: {who}.",
        Locale.EN: "Addresses we won't write to again: {who}.",
    },
    "bad_title": {Locale.ID: "Maaf, tautan ini tidak bisa dibuka", Locale.EN: "Sorry, this link doesn't work"},
    "bad_body": {
        Locale.ID: "Mungkin tautannya terpotong. Coba salin seluruh tautan dari email kami, lalu buka lagi.",
        Locale.EN: "It may have been cut short. Try copying the whole link from our email and opening it again.",
    },
    "bad_unsubscribe": {
        Locale.ID: "Kakak juga bisa berhenti berlangganan dengan mengirim email ke {address}.",
        Locale.EN: "You can also unsubscribe by sending an email to {address}.",
    },
    "unknown_title": {Locale.ID: "Maaf, alamat email Kakak tidak kami temukan",
                      Locale.EN: "Sorry, we couldn't find your address"},
    "unknown_body": {
        Locale.ID: "Tautan ini berasal dari email yang tidak ada lagi di catatan kami, jadi belum bisa dipakai "
                   "untuk berhenti berlangganan.",
        Locale.EN: "This link is from an email we no longer have on record, so it can't unsubscribe you.",
    },
    "missing_title": {Locale.ID: "Halaman tidak ditemukan", Locale.EN: "Page not found"},
    "missing_body": {
        Locale.ID: "Coba buka lagi tautan dari email kami, ya.",
        Locale.EN: "Try opening the link in our email again.",
    },
    "trouble_title": {Locale.ID: "Maaf, ada gangguan", Locale.EN: "Sorry, something went wrong"},
    "trouble_body": {
        Locale.ID: "Maaf, ada gangguan di sistem kami. Coba lagi beberapa menit lagi, ya.",
        Locale.EN: "Sorry, something went wrong on our side. Please try again in a few minutes.",
    },
    "thanks_title": {Locale.ID: "Terima kasih!", Locale.EN: "Thank you!"},
    "thanks_first": {
        Locale.ID: "Penilaian dari Kakak ({rating}) sudah kami catat. Masukan Kakak membantu {shop} menjadi lebih "
                   "baik.",
        Locale.EN: "We've recorded your rating ({rating}). Your feedback helps {shop} improve.",
    },
    "thanks_again": {
        Locale.ID: "Penilaian dari Kakak ({rating}) sudah kami catat sebelumnya. Terima kasih, ya!",
        Locale.EN: "We already have your rating ({rating}). Thank you!",
    },
    "comment_label": {Locale.ID: "Ada yang ingin Kakak sampaikan? (opsional)",
                      Locale.EN: "Anything you'd like to tell us? (optional)"},
    "comment_button": {Locale.ID: "Kirim", Locale.EN: "Send"},
    "your_comment": {Locale.ID: "Komentar Kakak:", Locale.EN: "Your comment:"},
    "rate_title": {Locale.ID: "Kirim penilaian Kakak", Locale.EN: "Send your rating"},
    "rate_body": {
        Locale.ID: "Kakak memilih {rating}. Cukup klik tombol di bawah untuk mengirimkannya ke {shop}.",
        Locale.EN: "You chose {rating}. Just click the button below to send it to {shop}.",
    },
    # a rating as the pages say it: stars (1-5) or a score out of 10 (0-10), the feedback request's scale
    "stars": {Locale.ID: "{score} bintang", Locale.EN: "{score} stars"},
    "one_star": {Locale.ID: "1 bintang", Locale.EN: "1 star"},
    "chose_score": {Locale.ID: "nilai {score} dari 10", Locale.EN: "{score} out of 10"},
    "score": {Locale.ID: "{score} dari 10", Locale.EN: "{score} out of 10"},
    "rate_button": {Locale.ID: "Kirim penilaian", Locale.EN: "Send my rating"},
}

# overflow-wrap: a 300-character word (an address's domain, a comment) wraps rather than widen the page past a
# phone's screen; buttons at least 44px high, for a thumb; box-sizing keeps the 100%-wide textarea inside.
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:34em;margin:3em auto;padding:0 1em;color:#222;line-height:1.5;"
    "overflow-wrap:anywhere}"
    "button{font-size:1em;min-height:44px;padding:.6em 1.2em;border:0;border-radius:.3em;background:#b3261e;"
    "color:#fff}"
    "textarea{box-sizing:border-box;width:100%;min-height:6em;font:inherit}"
    "blockquote{border-left:3px solid #ccc;margin:1em 0;padding-left:1em;white-space:pre-wrap}"
)


_FORM = '<form method="post">'
"""A page's form, which POSTs to the page's own URL, the link as the customer opened it: no ``action``. The link's
URL may have a query of its own ahead of the token (``unsubscribe.url``, ``campaigns.feedback.link_url``: a shop's
front controller's ``?route=…``), which an ``action="?t=…"`` dropped: the button's POST reached the shop's own 404."""


def _t(key: str, locale: Locale, **values: str) -> str:
    return _TEXT[key][locale].format(**{k: escape(v) for k, v in values.items()})


def _page(locale: Locale, title: str, body: str) -> bytes:
    return (
        f'<!doctype html><html lang="{locale.value}"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><meta name="robots" content="noindex">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{escape(title)}</h1>{body}</body></html>\n"
    ).encode()


def _both(locale: Locale, masked: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c`` (not escaped: ``_t`` escapes it)."""
    *first, last = masked
    return f"{', '.join(first)} {_TEXT['and'][locale]} {last}" if first else last


def confirm_unsubscribe(locale: Locale, shop: str, masked: Sequence[str]) -> bytes:
    """The page an unsubscribe link opens; ``masked`` are the addresses the button will unsubscribe (masked): the
    one the email went to first, then the customer's address on file now when it is another. The button POSTs to
    the link itself (``_FORM``)."""
    who = _both(locale, masked) if masked else _t("you", locale)
    return _page(
        locale,
        _t("confirm_title", locale),
        f"<p>{_t('confirm_body', locale, who=who, shop=shop)}</p>"
        f"{_FORM}"
        f'<input type="hidden" name="List-Unsubscribe" value="One-Click">'
        f'<button type="submit">{_t("confirm_button", locale)}</button></form>',
    )


def unsubscribed(locale: Locale, shop: str, masked: Sequence[str] = ()) -> bytes:
    """Done; with ``masked``, the addresses unsubscribed (masked) are named when there are more than one."""
    more = f"<p>{_t('done_addresses', locale, who=_both(locale, masked))}</p>" if len(masked) > 1 else ""
    return _page(locale, _t("done_title", locale), f"<p>{_t('done_body', locale, shop=shop)}</p>{more}")


def bad_link(locale: Locale, unsubscribe_mailto: str = "") -> bytes:
    """A link that does not verify. An unsubscribe link's page gives ``unsubscribe_mailto`` (an address, or a
    mailto: URI) to write to instead: a link cut short, or signed with a retired key, is no dead end."""
    return _in_both_languages(locale, "bad_title", "bad_body", unsubscribe_mailto)


def unknown_unsubscriber(locale: Locale, unsubscribe_mailto: str = "") -> bytes:
    """An unsubscribe link whose customer the database has no record of (restored from a copy older than the
    email): the token names no address, so nothing was done; ``unsubscribe_mailto`` is where to write instead."""
    return _in_both_languages(locale, "unknown_title", "unknown_body", unsubscribe_mailto)


def trouble(locale: Locale, unsubscribe_mailto: str = "") -> bytes:
    """Something failed on our side (the database): sorry, try again later; an unsubscribe link's page gives
    ``unsubscribe_mailto`` to write to meanwhile."""
    return _in_both_languages(locale, "trouble_title", "trouble_body", unsubscribe_mailto)


def _in_both_languages(locale: Locale, title: str, body: str, unsubscribe_mailto: str) -> bytes:
    """A page in ``locale`` with the same said in the other language below it: it comes before we know whose link
    it is (or when we could not find out), so the shop's language may not be the customer's."""
    other = Locale.EN if locale is Locale.ID else Locale.ID
    mailto = _mailto_link(unsubscribe_mailto)

    def also(lang: Locale) -> str:
        return " " + _TEXT["bad_unsubscribe"][lang].format(address=mailto) if mailto else ""

    return _page(
        locale,
        _t(title, locale),
        f"<p>{_t(body, locale)}{also(locale)}</p><hr><p lang=\"{other.value}\">"
        f"<strong>{_t(title, other)}</strong>. {_t(body, other)}{also(other)}</p>",
    )


def _mailto_link(mailto: str) -> str:
    """``<a href="mailto:…">address</a>`` for a plain address or a mailto: URI (shown without its ?subject=…)."""
    if not mailto:
        return ""
    uri = mailto if mailto.startswith("mailto:") else f"mailto:{mailto}"
    shown = unquote(uri.removeprefix("mailto:").partition("?")[0])
    return f'<a href="{escape(uri, quote=True)}">{escape(shown)}</a>'


def not_found(locale: Locale) -> bytes:
    return _page(locale, _t("missing_title", locale), f"<p>{_t('missing_body', locale)}</p>")


def _rating(locale: Locale, score: int, stars: bool, *, chosen: bool = False) -> str:
    """``4 bintang``/``4 stars`` for a star rating, ``8 dari 10``/``8 out of 10`` for a score (``chosen``: as what
    the customer chose, ``nilai 8 dari 10``); not escaped: ``_t`` escapes it."""
    if stars:
        return _TEXT["one_star" if score == 1 else "stars"][locale].format(score=score)
    return _TEXT["chose_score" if chosen else "score"][locale].format(score=score)


def confirm_feedback(locale: Locale, shop: str, score: int, *, stars: bool) -> bytes:
    """The page a rating link opens: the rating is sent by its button (a POST), because mail scanners fetch every
    link of an email (with a GET that recorded, the first link a scanner fetched would be the rating). ``stars``:
    the rating is 1-5 stars, else a score out of 10."""
    body = f"<p>{_t('rate_body', locale, rating=_rating(locale, score, stars, chosen=True), shop=shop)}</p>"
    body += _comment_form(locale, "rate_button")
    return _page(locale, _t("rate_title", locale), body)


def _comment_form(locale: Locale, button: str) -> str:
    """A form that POSTs an optional comment back to the link it came from (``_FORM``)."""
    return (
        f'{_FORM}<p><label for="comment">{_t("comment_label", locale)}</label></p>'
        f'<textarea id="comment" name="comment" maxlength="2000"></textarea>'
        f'<p><button type="submit">{_t(button, locale)}</button></p></form>'
    )


def feedback_thanks(
    locale: Locale, shop: str, score: int, comment: str | None, *, first: bool, stars: bool
) -> bytes:
    key = "thanks_first" if first else "thanks_again"
    body = f"<p>{_t(key, locale, rating=_rating(locale, score, stars), shop=shop)}</p>"
    if comment:
        body += f"<p>{_t('your_comment', locale)}</p><blockquote>{escape(comment)}</blockquote>"
    else:
        body += _comment_form(locale, "comment_button")
    return _page(locale, _t("thanks_title", locale), body)
