"""Sample customers and products that `kembali check` and the live preview render every template with.

Chosen to break templates: hostile names (CR/LF header injection, an RFC 2047
encoded-word, HTML, bidi overrides), a long name, a single name, no name at
all, both locales, and a customer with products to show, with none, and with one
(one order line, one product in the shop).
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.domain import CustomerSnapshot, Locale, ProductView

SCRIPT_NAME = "<script>alert(1)</script> O'Brien & \"Co\""
"""A name whose HTML must come out escaped."""


@dataclass(frozen=True)
class Sample:
    slug: str
    """Short, URL-safe: ``siti``, ``crlf``…"""
    label: str
    customer: CustomerSnapshot
    with_products: bool = True
    one_product: bool = False
    """One order line and one product in the shop (a win-back's usual order): ``bought[1]``, ``recommendations[1]``
    are not there."""
    birthday_today: bool = False
    """A birthday offer that goes on the day (``days_to_birthday`` 0), not ``days_before`` it: the templates' other
    branch (an offer held back by the contact policy, or planned late, goes on the day)."""
    news: bool = False
    """New products launched since the customer's last order, in the categories of their order: the new-products
    email shows those (``new``), not the best sellers."""
    spend_milestone: bool = False
    """A loyalty reward for a spend milestone (the shop's first ``spend_milestones``), not an order milestone: the
    templates' other branch (``milestone_kind == "spend"``, ``milestone | money``)."""


_NAMES = (
    ("siti", "a typical name", "Siti Rahayu"),
    ("single", "one name only", "Sukarni"),
    ("noname", "no name", ""),
    ("long", "a long name",
     "Raden Mas Muhammad Abdurrahman Wahyudi Kusumanegara Hadiningrat Purbonegoro Suryodiningrat"),
    ("crlf", "CR/LF in the name", "Rina\r\nBcc: semua@example.com"),
    ("encword", "an encoded-word in the name", "=?UTF-8?Q?=0A?=Bcc: x@example.com"),
    ("html", "HTML in the name", SCRIPT_NAME),
    ("bidi", "bidi override and emoji", "\u202eDewi Lestari \U0001f600"),
)  # fmt: skip


def _customer(i: int, name: str, locale: Locale) -> CustomerSnapshot:
    return CustomerSnapshot(
        id=900_000 + i,
        external_id=f"SAMPLE-{i:02d}",
        email=f"sample{i}@example.com",
        name=name,
        locale=locale,
        time_zone="Asia/Jakarta",
        birthday=None,
        marketing_consent=True,
    )


_SPEND = frozenset({"single", "html"})
"""The samples whose loyalty reward is for a spend milestone (the others': an order milestone)."""
_ON_THE_DAY = frozenset({"noname", "bidi"})
"""The samples whose birthday offer goes on the day (the others': ``days_before`` it)."""
_NEWS = frozenset({"long", "encword"})
"""The samples shown new products from their categories (the others: the shop's best sellers)."""


def samples(locale: Locale) -> list[Sample]:
    """Every sample customer in one locale; the last two have no products to show, and one of each. Two reach a
    loyalty spend milestone (``_SPEND``), the others an order milestone; two get their birthday offer on the day
    (``_ON_THE_DAY``), the others before it; two are shown new products from their categories (``_NEWS``), the
    others the best sellers."""
    out = [
        Sample(slug, label, _customer(i, name, locale), birthday_today=slug in _ON_THE_DAY,
               spend_milestone=slug in _SPEND, news=slug in _NEWS)
        for i, (slug, label, name) in enumerate(_NAMES, start=1)
    ]
    out.append(Sample("noproducts", "no order lines, no recommendations",
                      _customer(len(_NAMES) + 1, "Agus Santoso", locale), with_products=False))  # fmt: skip
    out.append(Sample("oneproduct", "one order line, one product in the shop",
                      _customer(len(_NAMES) + 2, "Wulan Sari", locale), one_product=True))  # fmt: skip
    return out


def catalogue(sample: Sample) -> list[ProductView]:
    """The shop's products as ``sample`` sees them (recommendations, best sellers, new products)."""
    if not sample.with_products:
        return []
    return [products()[1]] if sample.one_product else products()


def launched(sample: Sample) -> list[ProductView]:
    """The products launched since ``sample``'s last order: for a ``news`` sample, those of the catalogue in the
    categories of their order that they do not own."""
    if not sample.news:
        return []
    owned = bought_by(sample)
    categories = {p.category for p in owned}
    return [p for p in catalogue(sample) if p.category in categories and p not in owned]


def bought_by(sample: Sample) -> list[ProductView]:
    """The products of ``sample``'s order."""
    if not sample.with_products:
        return []
    return bought()[:1] if sample.one_product else bought()


_BASE = "https://toko-kembali.example/produk/"


def _product(pid: str, name: str, category: str, price: int, sold: int = 0) -> ProductView:
    return ProductView(external_id=pid, name=name, category=category, price_minor=price, currency="IDR",
                       url=f"{_BASE}{pid.lower()}", image_url=f"{_BASE}{pid.lower()}.jpg", sold=sold)  # fmt: skip


def products() -> list[ProductView]:
    """A small catalogue, best-first: ordinary items, a decimal price, HTML in a name, a very long name. The one
    with HTML is a best seller of a category the sample order has, so every list of products a campaign shows
    (recommendations, a birthday's best sellers) holds it: a list printed unescaped cannot pass the check."""
    rows = (
        ("P-S01", "Kemeja Batik Parang", "Batik", 24_900_000),
        ("P-S04", "<b>Tas</b> & \"Anyaman\" Pandan", "Tas", 14_900_000),
        ("P-S02", "Kopi Gayo Arabika 250 g", "Kopi", 8_900_000),
        ("P-S03", "Toner Teh Hijau", "Skincare", 7_450_050),
        ("P-S05", "Kain Batik Tulis Solo Motif Sido Mukti Warna Sogan Klasik Ukuran 2,5 Meter", "Batik", 45_000_000),
    )
    return [_product(*row, sold=len(rows) - i) for i, row in enumerate(rows)]  # each sold: best sellers all


def bought() -> list[ProductView]:
    """The sample order's products: the first has HTML in its name (templates show ``bought[0]`` by itself)."""
    return [_product("P-S06", "<b>Tas</b> Rotan", "Tas", 12_500_000), products()[0]]


SAMPLE_ORDER_ID = 1
SAMPLE_ORDER_COUNT = 5
"""A sample customer's purchases: the loyalty sample's milestone (``orders-5``), just reached."""
SAMPLE_PAYLOAD = {
    "first_order_id": str(SAMPLE_ORDER_ID),
    "first_order": "INV-SAMPLE-1",
    "order_id": str(SAMPLE_ORDER_ID),
    "order": "INV-SAMPLE-1",
    "milestone": f"orders-{SAMPLE_ORDER_COUNT}",
    "birthday": "2027-02-28",
}
"""Planning payload keys campaigns read when composing (a new campaign adds its keys here)."""
