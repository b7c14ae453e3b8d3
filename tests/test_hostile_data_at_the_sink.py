"""Shop data that got into the database some other way than today's importer (an earlier Kembali, a shop's own
sync, a hand edit), sent through a real SMTP server and read there as a mail client reads it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import cast

import pytest

from tests.sendkit import NOW, Shop, make_settings
from tests.smtp_server import RecordingServer
from worker.adapters import shop as shop_data
from worker.core.render import product_dict
from worker.domain import ProductRecord, ProductView

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
