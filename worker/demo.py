"""A believable Indonesian shop, generated from a seed, and CSVs in the importer's format.

``generate_shop`` is deterministic for a given seed, customer count and ``now``.
About 70 % of customers have exactly one order that counts as a purchase
(some of them also have a cancelled one); the rest have 2-6. Two customers have
hostile names (CR/LF, an encoded-word ``Bcc:``) and are one-time buyers gone
quiet, so the win-back demo shows that headers stay safe.

All addresses are on reserved domains (``example.com``/``.net``/``.org`` and the
``.example`` TLD, RFC 2606), which email-validator accepts without DNS and
which can never reach a real person.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from worker import money
from worker.domain import CustomerRecord, Locale, OrderLineRecord, OrderRecord, OrderStatus, ProductRecord

SHOP_URL = "https://toko-kembali.example"
EMAIL_DOMAINS = ("example.com", "example.net", "example.org", "mail.example", "posel.example")
HOSTILE_NAMES = ("Rina\r\nBcc: semua@example.com", "=?UTF-8?Q?=0A?=Bcc: x@example.com")

_FIRST = (
    "Budi", "Siti", "Dewi", "Agus", "Rina", "Andi", "Putri", "Wahyu", "Sri", "Rizky", "Nur", "Bambang",
    "Ayu", "Dimas", "Fitri", "Hendra", "Indah", "Joko", "Kartika", "Lestari", "Made", "Nyoman", "Eko",
    "Yusuf", "Ratna", "Teguh", "Wulan", "Fajar", "Maya", "Gilang",
)  # fmt: skip
_LAST = (
    "Santoso", "Rahayu", "Lestari", "Wijaya", "Saputra", "Hidayat", "Kusuma", "Pratama", "Nugroho",
    "Setiawan", "Siregar", "Simanjuntak", "Wibowo", "Purnomo", "Hasibuan", "Susanto", "Gunawan",
    "Halim", "Tanjung", "Permata",
)  # fmt: skip
_SINGLE = ("Sukarni", "Suparman", "Mulyani", "Wagiman", "Tukiyem")
"""Many Indonesians have one name only."""

_CATALOGUE: dict[str, tuple[tuple[str, str], ...]] = {
    "Batik": (("Kemeja Batik Parang", "249000"), ("Kain Batik Tulis Solo", "450000"),
              ("Dress Batik Mega Mendung", "329000"), ("Kemeja Batik Kawung", "199000"),
              ("Selendang Batik Sutra", "189000")),
    "Kopi": (("Kopi Gayo Arabika 250 g", "89000"), ("Kopi Toraja Kalosi 250 g", "95000"),
             ("Kopi Kintamani 200 g", "79000"), ("Kopi Flores Bajawa 250 g", "92000"),
             ("Kopi Luwak Liar 100 g", "349000")),
    "Skincare": (("Serum Niacinamide 20 ml", "129000"), ("Sabun Sereh Alami", "35000"),
                 ("Masker Bengkoang", "59000"), ("Tabir Surya SPF 50", "89000"), ("Toner Teh Hijau", "74500.50")),
    "Tas": (("Tas Anyaman Pandan", "149000"), ("Tas Rotan Bulat Bali", "219000"),
            ("Dompet Kulit Garut", "179000"), ("Tas Selempang Tenun", "259000")),
    "Sepatu": (("Sepatu Kulit Cibaduyut", "399000"), ("Sandal Jepit Karet Alam", "45000"),
               ("Sneakers Kanvas Bandung", "289000"), ("Selop Batik", "99000")),
    "Hijab": (("Hijab Voal Motif", "89000"), ("Pashmina Ceruty", "69000"), ("Bergo Instan Jersey", "59000"),
              ("Hijab Segi Empat Polos", "49000")),
    "Kerajinan": (("Wayang Kulit Arjuna", "499000"), ("Ukiran Kayu Jepara", "650000"),
                  ("Gelang Perak Kotagede", "275000")),
}  # fmt: skip


@dataclass
class ShopData:
    customers: list[CustomerRecord]
    products: list[ProductRecord]
    orders: list[OrderRecord]


def generate_shop(*, seed: int, customers: int, now: datetime) -> ShopData:
    """A shop with ``customers`` customers, ~30 products and a year of orders before ``now``."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    rng = random.Random(seed)
    now = now.astimezone(UTC).replace(microsecond=0)
    products = _products(rng, now)
    roles = [_role(i, customers) for i in range(1, customers + 1)]
    people = [_customer(rng, i, role) for i, role in enumerate(roles, start=1)]
    orders: list[OrderRecord] = []
    for person, role in zip(people, roles, strict=True):
        orders.extend(_orders_of(rng, person, role, products, now, start=len(orders)))
    orders.sort(key=lambda o: (o.placed_at, o.external_id))
    return ShopData(customers=people, products=products, orders=orders)


def _products(rng: random.Random, now: datetime) -> list[ProductRecord]:
    items: list[ProductRecord] = []
    for category, entries in _CATALOGUE.items():
        for name, price in entries:
            slug = name.lower().replace(" ", "-")
            n = len(items) + 1
            # Every fifth product is new (launched in the last two weeks); the rest within the year.
            age_days = rng.randint(1, 13) if n % 5 == 0 else rng.randint(20, 365)
            items.append(
                ProductRecord(
                    external_id=f"P-{n:03d}",
                    name=name,
                    category=category,
                    price_minor=money.to_minor(price, "IDR"),
                    currency="IDR",
                    url=f"{SHOP_URL}/produk/{slug}",
                    image_url=f"{SHOP_URL}/img/{slug}.jpg",
                    launched_at=now - timedelta(days=age_days, hours=rng.randint(0, 23)),
                    active=n % 13 != 0,
                )
            )
    return items


def _customer(rng: random.Random, i: int, role: str) -> CustomerRecord:
    if role == "crlf":
        name = HOSTILE_NAMES[0]
    elif role == "encoded-word":
        name = HOSTILE_NAMES[1]
    elif rng.random() < 0.08:
        name = rng.choice(_SINGLE)
    else:
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    handle = "pelanggan" if role in ("crlf", "encoded-word") else name.lower().replace(" ", ".")
    email = f"{handle}{i}@{rng.choice(EMAIL_DOMAINS)}"
    zone = rng.choices(("Asia/Jakarta", "Asia/Makassar", "Asia/Jayapura"), weights=(80, 13, 7))[0]
    if role == "leap":
        birthday: date | None = date(rng.choice((1988, 1992, 1996, 2000)), 2, 29)
    elif rng.random() < 0.7:
        birthday = date(rng.randint(1965, 2005), rng.randint(1, 12), rng.randint(1, 28))
    else:
        birthday = None
    consent = role in ("crlf", "encoded-word", "leap") or rng.random() < 0.9
    return CustomerRecord(
        external_id=f"C-{i:04d}",
        email=email,
        name=name,
        locale=Locale.EN if rng.random() < 0.15 else Locale.ID,
        time_zone=zone,
        birthday=birthday,
        marketing_consent=consent,
        consent_basis="opt_in" if consent else "",
        consent_source=rng.choice(("checkout", "newsletter_form")),
    )


def _role(i: int, total: int) -> str:
    """Fixed roles for a few customers: the hostile names and two leap-day birthdays."""
    if total < 10:
        return ""
    return {3: "crlf", 7: "encoded-word", 4: "leap", 9: "leap"}.get(i, "")


def _orders_of(
    rng: random.Random, person: CustomerRecord, role: str, products: list[ProductRecord], now: datetime, start: int
) -> list[OrderRecord]:
    roll = rng.random()
    if role in ("crlf", "encoded-word"):  # one-time buyers gone quiet
        plan = [(OrderStatus.DELIVERED, rng.randint(90, 200))]
    elif roll < 0.60:  # one purchase
        plan = [(OrderStatus.DELIVERED, rng.randint(1, 400))]
    elif roll < 0.70:  # a cancelled attempt, then one real purchase
        days = rng.randint(1, 380)
        plan = [(OrderStatus.CANCELLED, days + rng.randint(1, 20)), (OrderStatus.DELIVERED, days)]
    else:  # a returning customer
        plan = [(OrderStatus.DELIVERED, rng.randint(1, 400)) for _ in range(rng.randint(2, 6))]
        if rng.random() < 0.1:
            plan[0] = (OrderStatus.REFUNDED, plan[0][1])
            plan.append((OrderStatus.DELIVERED, rng.randint(1, 400)))
    orders = []
    for k, (status, days_ago) in enumerate(sorted(plan, key=lambda p: -p[1])):
        placed = now - timedelta(days=days_ago, hours=rng.randint(0, 23), minutes=rng.randint(0, 59))
        if status is OrderStatus.DELIVERED and days_ago < 3:
            status = rng.choice((OrderStatus.PAID, OrderStatus.SHIPPED))
        # (delivered by now: an import refuses an order delivered in the future)
        delivered = min(placed + timedelta(days=rng.randint(2, 6)), now) if status is OrderStatus.DELIVERED else None
        picks = rng.sample(products, rng.choices((1, 2, 3), weights=(70, 22, 8))[0])
        lines = tuple(OrderLineRecord(p.external_id, rng.choice((1, 1, 1, 2)), p.price_minor) for p in picks)
        orders.append(
            OrderRecord(
                external_id=f"INV-{placed:%Y%m%d}-{start + k + 1:05d}",
                customer_external_id=person.external_id,
                status=status,
                placed_at=placed,
                delivered_at=delivered,
                total_minor=sum(line.quantity * line.unit_price_minor for line in lines),
                currency="IDR",
                lines=lines,
            )
        )
    return orders


# --- CSV output (exactly the importer's columns) --------------------------------------

CUSTOMER_HEADER = (
    "id", "email", "name", "locale", "time_zone", "birthday", "marketing_consent", "consent_basis", "consent_source",
)  # fmt: skip
PRODUCT_HEADER = ("id", "name", "category", "price", "currency", "url", "image_url", "launched_at", "active")
ORDER_HEADER = (
    "order_id", "customer_id", "status", "placed_at", "delivered_at", "currency", "total",
    "product_id", "quantity", "unit_price",
)  # fmt: skip


def major(minor: int, currency: str) -> str:
    """Minor units → a plain major-unit string ("249000", "74500.50"), no exponent, no float."""
    exp = money.exponent(currency)
    whole, part = divmod(minor, 10**exp)
    return str(whole) if part == 0 or exp == 0 else f"{whole}.{part:0{exp}d}"


def _when(value: datetime | None, zone: ZoneInfo) -> str:
    """ISO 8601 with the shop's offset, e.g. ``2026-11-22T10:00:00+07:00`` (easier to read than UTC)."""
    return value.astimezone(zone).isoformat() if value is not None else ""


def _write(path: Path, header: tuple[str, ...], rows: Iterable[Iterable[object]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_csvs(shop: ShopData, folder: Path, *, shop_tz: str = "Asia/Jakarta") -> dict[str, Path]:
    """Write customers.csv, products.csv and orders.csv; return them by kind."""
    folder.mkdir(parents=True, exist_ok=True)
    zone = ZoneInfo(shop_tz)
    customers = (
        (c.external_id, c.email, c.name, c.locale.value, c.time_zone, c.birthday.isoformat() if c.birthday else "",
         "true" if c.marketing_consent else "false", c.consent_basis, c.consent_source)
        for c in shop.customers
    )  # fmt: skip
    products = (
        (p.external_id, p.name, p.category, major(p.price_minor, p.currency), p.currency, p.url, p.image_url,
         _when(p.launched_at, zone), "true" if p.active else "false")
        for p in shop.products
    )  # fmt: skip
    return {
        "customers": _write(folder / "customers.csv", CUSTOMER_HEADER, customers),
        "products": _write(folder / "products.csv", PRODUCT_HEADER, products),
        "orders": _write(folder / "orders.csv", ORDER_HEADER, _order_rows(shop.orders, zone)),
    }


def _order_rows(orders: Iterable[OrderRecord], zone: ZoneInfo) -> Iterable[tuple[str, ...]]:
    for o in orders:
        placed, delivered = _when(o.placed_at, zone), _when(o.delivered_at, zone)
        total = major(o.total_minor, o.currency)
        head = (o.external_id, o.customer_external_id, o.status.value, placed, delivered, o.currency, total)
        if not o.lines:
            yield (*head, "", "", "")
        for line in o.lines:
            yield (*head, line.product_external_id, str(line.quantity), major(line.unit_price_minor, o.currency))


def generate_customers_csv(path: Path, *, rows: int, seed: int = 0) -> Path:
    """A large customers.csv (e.g. a million rows) for benchmarks, written at a few µs a row."""
    rng = random.Random(seed)
    zones = ("Asia/Jakarta",) * 8 + ("Asia/Makassar", "Asia/Jayapura")
    with path.open("w", encoding="utf-8", newline="") as handle:
        handle.write(",".join(CUSTOMER_HEADER) + "\n")
        batch: list[str] = []
        for i in range(1, rows + 1):
            first, last = _FIRST[rng.randrange(len(_FIRST))], _LAST[rng.randrange(len(_LAST))]
            birthday = f"{1965 + i % 40}-{1 + i % 12:02d}-{1 + i % 28:02d}" if i % 10 < 7 else ""
            batch.append(
                f"C-{i:07d},{first.lower()}.{last.lower()}{i}@{EMAIL_DOMAINS[i % 5]},{first} {last},"
                f"{'en' if i % 7 == 0 else 'id'},{zones[i % 10]},{birthday},{'true' if i % 10 else 'false'},"
                "opt_in,checkout\n"
            )
            if len(batch) == 10_000:
                handle.writelines(batch)
                batch.clear()
        handle.writelines(batch)
    return path
