"""The CSV importer: records or line-numbered errors, one row at a time."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from worker.adapters.importer import LOCALE_LEFT_OUT, RowError, _SeenIds, read_customers, read_orders, read_products
from worker.domain import CustomerRecord, Locale, OrderLineRecord, OrderRecord, OrderStatus, ProductRecord
from worker.errors import ImportRowError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CUSTOMER_HEADER = "id,email,name,locale,time_zone,birthday,marketing_consent,consent_basis,consent_source\n"
PRODUCT_HEADER = "id,name,category,price,currency,url,image_url,launched_at,active\n"
ORDER_HEADER = "order_id,customer_id,status,placed_at,delivered_at,currency,total,product_id,quantity,unit_price\n"


def write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def errors(results: Iterable[object]) -> list[RowError]:
    return [r for r in results if isinstance(r, RowError)]


# --- customers_bad.csv: every bad row, with its line and the column named -------------

BAD_ROWS = [
    (3, "C-0102", ["email", "'budi@@example.com'"]),
    (4, "C-0103", ["email", "'no-at-sign'"]),
    (5, "C-0104", ["email", "'siti@'"]),
    (6, "C-0105", ["missing email"]),
    (7, "C-0106", ["missing name"]),
    (8, "C-0107", ["unclear marketing_consent ''", "saved as no consent"]),
    (9, "C-0101", ["duplicate id", "first seen at line 2"]),
    (10, "C-0108", ["time_zone", "'Mars/Olympus_Mons'", "imported with the shop's"]),
    (11, "C-0109", ["birthday", "'2026-02-30'", "imported without it"]),
    (12, "C-0110", ["locale", "'fr'", "imported with the shop's"]),
    (16, "C-0113", ["unclear marketing_consent 'maybe'", "saved as no consent"]),
    (17, "C-0114", ["birthday", "'1990-02-29'", "imported without it"]),
    (20, "C-0116", ["email", "'maya@toko.test'"]),
    (21, "C-0117", ["10 fields", "header has 9"]),
    (22, "", ["missing id"]),
]


@pytest.fixture(scope="module")
def bad_results() -> list[CustomerRecord | RowError]:
    return list(read_customers(EXAMPLES / "customers_bad.csv"))


@pytest.mark.parametrize(("line", "key", "words"), BAD_ROWS)
def test_each_bad_row_is_reported_at_its_line_naming_the_column(
    bad_results: list[CustomerRecord | RowError], line: int, key: str, words: list[str]
) -> None:
    [error] = [e for e in errors(bad_results) if e.line == line]
    assert error.file == "customers_bad.csv"
    assert error.key == key
    for word in words:
        assert word in error.reason


def test_bad_file_reports_nothing_else_and_keeps_the_good_rows(bad_results: list[CustomerRecord | RowError]) -> None:
    assert sorted(e.line for e in errors(bad_results)) == [line for line, _, _ in BAD_ROWS]
    good = {r.external_id: r for r in bad_results if isinstance(r, CustomerRecord)}
    assert sorted(good) == ["C-0101", "C-0107", "C-0108", "C-0109", "C-0110", "C-0111", "C-0112", "C-0113",
                            "C-0114", "C-0115", "C-0118"]
    # an unclear consent is saved as none, and a birthday that is none (30 February, 29 February 1990), a zone
    # that is none or a language the shop has no templates in left out, with a warning at its line (``saved``),
    # not a rejected row
    assert [e.line for e in errors(bad_results) if e.saved] == [8, 10, 11, 12, 16, 17]
    assert good["C-0109"].birthday is good["C-0114"].birthday is None
    assert (good["C-0108"].time_zone, good["C-0110"].locale) == ("Asia/Jakarta", Locale.ID)  # the shop's
    assert {"time_zone"} <= good["C-0108"].absent and {"locale"} <= good["C-0110"].absent
    assert good["C-0107"].marketing_consent is good["C-0113"].marketing_consent is False
    assert good["C-0101"].email == "budi.santoso@example.com"  # the first C-0101 wins
    assert good["C-0111"].name == "=?UTF-8?Q?=0A?=Bcc: x@example.com"  # hostile, yet valid: rendering sanitises
    assert good["C-0112"].name == "Wahyu\nNugroho"
    assert good["C-0112"].birthday == date(1992, 2, 29)
    assert good["C-0112"].marketing_consent is False
    assert good["C-0115"].email == "Fajar.Hidayat@example.com"  # domain lowercased, local part kept
    assert good["C-0115"].locale is Locale.EN


def test_row_error_reads_like_a_compiler_message() -> None:
    error = RowError("customers_bad.csv", 7, "C-0042", "invalid email address 'budi@@x' (why)")
    assert str(error) == "customers_bad.csv:7: id 'C-0042': invalid email address 'budi@@x' (why)"
    assert str(RowError("c.csv", 3, "", "missing id (required)")) == "c.csv:3: missing id (required)"


@pytest.mark.parametrize("name", ["customers.csv", "products.csv", "orders.csv"])
def test_example_files_import_without_errors(name: str) -> None:
    reader = {"customers.csv": read_customers, "products.csv": read_products, "orders.csv": read_orders}[name]
    results = list(reader(EXAMPLES / name))  # type: ignore[operator]
    assert results
    assert errors(results) == []


# --- customers: values ---------------------------------------------------------------


def test_defaults_and_bom(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", "id,email,name,marketing_consent\nC-1,a@example.com,Ani,ya\n", "utf-8-sig")
    [record] = read_customers(path)
    assert record == CustomerRecord("C-1", "a@example.com", "Ani", Locale.ID, "Asia/Jakarta", None, True, "", "")


def test_names_in_any_script_and_with_emoji_are_kept_as_given(tmp_path: Path) -> None:
    names = ["محمد علي", "李明", "Putu 👩\u200d👩\u200d👧", "Ni Luh\tAyu"]
    rows = "".join(f'C-{i},c{i}@example.com,"{name}",1\n' for i, name in enumerate(names))
    results = list(read_customers(write(tmp_path, "c.csv", "id,email,name,marketing_consent\n" + rows)))
    assert [r.name for r in results if isinstance(r, CustomerRecord)] == names


def test_addresses_are_kept_as_they_are_sent_internationalised_domains_in_their_ascii_form(tmp_path: Path) -> None:
    rows = ["C-1,ali@xn--bcher-kva.example", "C-2,ali@BÜCHER.example", "C-3,Budi.Santoso@Example.COM",
            "C-4,\uff21\uff2c\uff29@example.com", "C-5,sïti@example.com"]  # C-4: a fullwidth ALI  # fmt: skip
    path = write(tmp_path, "c.csv", "id,email,name,marketing_consent\n" + "".join(f"{r},Ani,1\n" for r in rows))
    results = list(read_customers(path))
    assert [r.email for r in results if isinstance(r, CustomerRecord)] == [
        "ali@xn--bcher-kva.example", "ali@xn--bcher-kva.example", "Budi.Santoso@example.com",
    ]  # fmt: skip
    errors = [r for r in results if isinstance(r, RowError)]
    assert [(e.line, e.key) for e in errors] == [(5, "C-4"), (6, "C-5")]
    assert all("before the @-sign are not supported" in e.reason for e in errors)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("Budi\x00Santoso", "invalid name 'Budi\\x00Santoso'"),
        ("x" * 201, "at most 200 characters"),
        ("   ", "missing name"),
        ("\u200b\u202e", "invalid name '\\u200b\\u202e' (nothing readable"),  # an email would greet nobody
        ("\x1b\t", "invalid name '\\x1b\\t' (nothing readable"),
    ],
)
def test_names_with_nul_too_long_or_blank_are_rejected(tmp_path: Path, name: str, reason: str) -> None:
    path = write(tmp_path, "c.csv", f"id,email,name,marketing_consent\nC-1,a@example.com,{name},1\n")
    [error] = read_customers(path)
    assert isinstance(error, RowError)
    assert reason in error.reason


def test_long_values_are_cut_short_in_messages(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", f"id,email,name,marketing_consent\nC-1,{'a' * 500},Ani,1\n")
    [error] = read_customers(path)
    assert isinstance(error, RowError)
    assert "…(500 chars)" in error.reason
    assert len(error.reason) < 300


def test_line_numbers_survive_quoted_newlines_and_blank_lines(tmp_path: Path) -> None:
    text = (
        "id,email,name,marketing_consent\n"
        'C-1,a@example.com,"Ani\r\nBcc: x@example.com",1\n'  # lines 2-3
        "\n"  # line 4
        'C-2,b@example.com,"A\nB\nC",1\n'  # lines 5-7
        "C-3,bad,Cici,1\n"  # line 8
    )
    results = list(read_customers(write(tmp_path, "c.csv", text)))
    assert [r.line for r in errors(results)] == [8]
    assert isinstance(results[0], CustomerRecord)
    assert results[0].name == "Ani\r\nBcc: x@example.com"


def test_missing_required_column_fails_before_any_row(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", "id,name,marketing_consent\nC-1,Ani,1\n")
    with pytest.raises(ImportRowError) as info:
        next(read_customers(path))
    assert info.value.line == 1
    assert info.value.reason == "missing column 'email' (found: id, name, marketing_consent)"


def test_every_missing_required_column_is_named_at_once(tmp_path: Path) -> None:
    # an export whose columns have other names was refused one column at a time: "missing column 'id'", renamed,
    # then "missing column 'email'", and so on, four runs for the four required columns
    path = write(tmp_path, "c.csv", "customer_id,e-mail,full_name,consent\nC-1,a@example.com,Ani,1\n")
    with pytest.raises(ImportRowError) as info:
        next(read_customers(path))
    assert info.value.line == 1
    assert info.value.reason == ("missing columns 'id', 'email', 'name' and 'marketing_consent' (found: customer_id, "
                                 "e-mail, full_name, consent); rename 'e-mail' to 'email'")  # fmt: skip


@pytest.mark.parametrize(("name", "header", "kind"), [
    ("orders.csv", "order_id,customer_id,status,placed_at,product_id,quantity,unit_price", "orders"),
    ("customers.csv", "id,email,name,marketing_consent,locale", "customers"),
    ("products.csv", "id,name,price,category", "products"),
])
def test_a_file_of_another_kind_is_named_as_such(tmp_path: Path, name: str, header: str, kind: str) -> None:
    # `kembali import customers orders.csv` listed the four columns a customers file needs, not the slip
    path = write(tmp_path, name, header + "\n")
    for read in (read_customers, read_products, read_orders):
        if read.__name__ != f"read_{kind}":
            with pytest.raises(ImportRowError) as info:
                next(iter(read(path)))
            article = "an" if kind == "orders" else "a"
            assert info.value.reason.endswith(f"; its columns are those of {article} {kind} file: import it with "
                                              f"`kembali import {kind}`")  # fmt: skip


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_empty_file_is_an_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ImportRowError, match="empty"):
        list(read_customers(write(tmp_path, "c.csv", text)))


def test_unknown_columns_are_ignored_with_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, "c.csv", "ID,Email,name,marketing_consent,Phone\nC-1,a@example.com,Ani,1,0812\n")
    warnings: list[str] = []
    [record] = read_customers(path, on_warning=warnings.append)
    assert isinstance(record, CustomerRecord)
    assert len(warnings) == 1
    assert "unknown column(s) 'phone' ignored" in warnings[0]


def test_a_row_that_is_not_utf8_is_reported_at_its_line_and_the_rest_is_read(tmp_path: Path) -> None:
    good = "".join(f"C-{i},c{i}@example.com,Ani {i},1\n" for i in range(3000))
    path = tmp_path / "c.csv"
    path.write_bytes(b"id,email,name,marketing_consent\n" + good.encode() + "C-X,x@example.com,André,1\n".encode(
        "latin-1") + "C-Y,y@example.com,Dédé,1\n".encode())  # fmt: skip
    results = list(read_customers(path))
    errors = [r for r in results if isinstance(r, RowError)]
    # named by its id and its column's name too, not only "in column 3", to be found in a big file
    assert [str(e) for e in errors] == [
        "c.csv:3002: id 'C-X': not UTF-8 text: byte 0xe9 in column 3 'name' (save the file as UTF-8; a spreadsheet "
        "calls it 'CSV UTF-8')"
    ]
    names = [r.name for r in results if isinstance(r, CustomerRecord)]
    assert len(names) == 3001 and names[-1] == "Dédé"


def test_a_header_that_is_not_utf8_stops_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_bytes("id,email,nàme,marketing_consent\nC-1,a@example.com,Ani,1\n".encode("latin-1"))
    with pytest.raises(ImportRowError, match="header: not UTF-8 text: byte 0xe0 in column 3"):
        list(read_customers(path))


# --- products ------------------------------------------------------------------------


def test_products_money_is_exact_and_dates_become_utc(tmp_path: Path) -> None:
    text = PRODUCT_HEADER + (
        "P-1,Kemeja Batik,Batik,249000.50,,https://toko.example/p/1,,2026-11-08,\n"
        "P-2,Kopi Gayo,Kopi,89000,idr,http://toko.example/p/2,https://toko.example/i/2.jpg,"
        "2026-11-22 10:00,tidak\n"
    )
    p1, p2 = read_products(write(tmp_path, "p.csv", text))
    assert p1 == ProductRecord(
        "P-1", "Kemeja Batik", "Batik", 24900050, "IDR", "https://toko.example/p/1", "",
        datetime(2026, 11, 7, 17, 0, tzinfo=UTC), True,
    )  # fmt: skip
    assert isinstance(p2, ProductRecord)
    assert p2.price_minor == 8900000
    assert p2.launched_at == datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
    assert p2.active is False


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ("P-1,Kopi,Kopi,,,,,,", ["missing price"]),
        ("P-1,Kopi,Kopi,89000.505,,,,,", ["price", "'89000.505'", "too many decimal places"]),
        ("P-1,Kopi,Kopi,1e5,,,,,", ["price", "'1e5'"]),
        ("P-1,Kopi,Kopi,-5,,,,,", ["price", "'-5'"]),
        ("P-1,Kopi,Kopi,89000,Rp,,,,", ["currency", "'Rp'"]),
        # a code whose minor units Kembali does not know: 89000.50 could not be read right, so it is not read
        ("P-1,Kopi,Kopi,89000.50,XYZ,,,,", ["unknown currency 'XYZ'", "an ISO 4217 code such as IDR"]),
        ("P-1,Kopi,Kopi,1.2345,KWD,,,,", ["price '1.2345' (too many decimal places for KWD, which has 3)"]),
        # said in words, not as Python's Decimal('89000.5')
        ("P-1,Kopi,Kopi,89000.5,JPY,,,,", ["price '89000.5' (too many decimal places for JPY, which has none)"]),
        ("P-1,Kopi,Kopi,89000,,javascript:alert(1),,,", ["url", "'javascript:alert(1)'"]),
        ("P-1,Kopi,Kopi,89000,,,ftp://x.example/a.jpg,,", ["image_url"]),
        ("P-1,Kopi,Kopi,89000,,,,kemarin,", ["launched_at", "'kemarin'"]),
        ("P-1,Kopi,Kopi,89000,,,,,maybe", ["active", "'maybe'"]),
        # a control character, C0 or C1, a line separator or a bidi control in an id or a category: the code point
        ("P-1,Kopi,Ko\x1bpi,89000,,,,,", ["category", "no control characters: U+001B at character 3"]),
        ("P-1,Kopi,Ko\x85pi,89000,,,,,", ["category", "no control characters: U+0085 at character 3"]),
        ("P-1,Kopi,Kopi\u2028Gayo,89000,,,,,", ["category", "U+2028 at character 5"]),
        ("P-1,Kopi,Kopi\u202eolaB,89000,,,,,", ["category", "U+202E at character 5"]),
    ],
)
def test_bad_product_values_are_named(tmp_path: Path, row: str, words: list[str]) -> None:
    [error] = read_products(write(tmp_path, "p.csv", PRODUCT_HEADER + row + "\n"))
    assert isinstance(error, RowError)
    assert error.line == 2
    assert error.key == "P-1"
    for word in words:
        assert word in error.reason


@pytest.mark.parametrize(("price", "currency", "minor"), [("12.50", "GBP", 1250), ("1.234", "kwd", 1234),
                                                          ("1500", "JPY", 1500), ("249000.50", "IDR", 24900050)])
def test_a_price_is_read_in_its_currencys_minor_units(tmp_path: Path, price: str, currency: str, minor: int) -> None:
    [product] = read_products(write(tmp_path, "p.csv", PRODUCT_HEADER + f"P-1,Tea,Tea,{price},{currency},,,,\n"))
    assert isinstance(product, ProductRecord)
    assert (product.price_minor, product.currency) == (minor, currency.upper())


def test_duplicate_product_id(tmp_path: Path) -> None:
    text = PRODUCT_HEADER + "P-1,A,,1000,,,,,\nP-2,B,,1000,,,,,\nP-1,C,,1000,,,,,\n"
    results = list(read_products(write(tmp_path, "p.csv", text)))
    assert [str(e) for e in errors(results)] == ["p.csv:4: id 'P-1': duplicate id 'P-1', first seen at line 2"]


# --- orders --------------------------------------------------------------------------

LINE = OrderLineRecord


def test_consecutive_rows_form_one_order_and_times_become_utc(tmp_path: Path) -> None:
    text = ORDER_HEADER + (
        "INV-1,C-1,delivered,2026-11-22T10:00:00+07:00,2026-11-25 09:30,,,P-1,2,249000\n"
        "INV-1,C-1,delivered,2026-11-22T10:00:00+07:00,2026-11-25 09:30,,,P-2,1,89000.50\n"
        "INV-2,C-2,cancelled,2026-11-22 10:00,,IDR,150000,,,\n"
        "INV-3,C-1,PAID,2026-11-23T01:00:00Z,,,100000,P-1,1,249000\n"
    )
    o1, o2, o3 = read_orders(write(tmp_path, "o.csv", text))
    assert o1 == OrderRecord(
        "INV-1", "C-1", OrderStatus.DELIVERED,
        datetime(2026, 11, 22, 3, 0, tzinfo=UTC), datetime(2026, 11, 25, 2, 30, tzinfo=UTC),
        2 * 24900000 + 8900050, "IDR", (LINE("P-1", 2, 24900000), LINE("P-2", 1, 8900050)),
    )  # fmt: skip
    assert o2 == OrderRecord(
        "INV-2", "C-2", OrderStatus.CANCELLED, datetime(2026, 11, 22, 3, 0, tzinfo=UTC), None, 15000000, "IDR"
    )
    assert isinstance(o3, OrderRecord)
    assert o3.status is OrderStatus.PAID
    assert o3.total_minor == 10000000  # a given total wins over the sum of lines (discounts, shipping)


def test_a_delivery_date_without_a_time_on_the_day_of_purchase_is_kept(tmp_path: Path) -> None:
    # midnight of the day, hours "before" a placed_at with its time, as shops export a delivery date
    text = ORDER_HEADER + "INV-1,C-1,delivered,2026-01-05 10:00,2026-01-05,,,P-1,1,1000\n"
    [order] = read_orders(write(tmp_path, "o.csv", text))
    assert isinstance(order, OrderRecord)
    assert order.delivered_at == datetime(2026, 1, 4, 17, 0, tzinfo=UTC)


def test_shop_time_zone_applies_to_naive_times(tmp_path: Path) -> None:
    text = ORDER_HEADER + "INV-1,C-1,placed,2026-11-22 10:00,,,,P-1,1,1000\n"
    [order] = read_orders(write(tmp_path, "o.csv", text), shop_tz="Asia/Jayapura")
    assert isinstance(order, OrderRecord)
    assert order.placed_at == datetime(2026, 11, 22, 1, 0, tzinfo=UTC)


def test_order_id_seen_again_later_is_an_error(tmp_path: Path) -> None:
    text = ORDER_HEADER + (
        "INV-1,C-1,delivered,2026-11-22 10:00,,,,P-1,1,1000\n"
        "INV-2,C-2,delivered,2026-11-22 10:00,,,,P-1,1,1000\n"
        "INV-1,C-1,delivered,2026-11-22 10:00,,,,P-2,1,1000\n"
        "INV-1,C-1,delivered,2026-11-22 10:00,,,,P-3,1,1000\n"
        "INV-3,C-3,delivered,2026-11-22 10:00,,,,P-1,1,1000\n"
    )
    results = list(read_orders(write(tmp_path, "o.csv", text)))
    # INV-1 is skipped whole, said once at its first row naming where it comes back: it was stored from line 2
    # alone, at a total short of lines 4 and 5
    assert [r.external_id for r in results if isinstance(r, OrderRecord)] == ["INV-2", "INV-3"]
    assert [str(e) for e in errors(results)] == [
        "o.csv:2: id 'INV-1': order 'INV-1' has rows at line 2 and again at line 4, other orders' rows between "
        "them: keep an order's rows together (sort the file by order_id); the whole order is skipped"
    ]


def test_a_file_sorted_by_product_skips_each_order_of_more_than_one_line_once(tmp_path: Path) -> None:
    # every order of two lines comes back after the others' first lines: each is said once, at its first row
    first = [f"INV-{n},C-1,delivered,2026-11-22 10:00,,,,P-1,1,1000\n" for n in range(3000)]
    second = [f"INV-{n},C-1,delivered,2026-11-22 10:00,,,,P-2,1,1000\n" for n in range(0, 3000, 2)]
    results = list(read_orders(write(tmp_path, "o.csv", ORDER_HEADER + "".join(first + second))))
    assert sorted(r.external_id for r in results if isinstance(r, OrderRecord)) == sorted(
        f"INV-{n}" for n in range(1, 3000, 2))
    assert [(e.line, e.key) for e in errors(results)] == [(n + 2, f"INV-{n}") for n in range(0, 3000, 2)]
    assert errors(results)[-1].reason.startswith("order 'INV-2998' has rows at line 3000 and again at line 4501,")


def test_rows_that_disagree_on_order_columns_drop_the_whole_order(tmp_path: Path) -> None:
    text = ORDER_HEADER + (
        "INV-1,C-1,delivered,2026-11-22 10:00,,,,P-1,1,1000\n"
        "INV-1,C-1,shipped,2026-11-22 10:00,,,,P-2,1,1000\n"
        "INV-2,C-2,delivered,2026-11-22 10:00,,,,P-1,1,1000\n"
    )
    results = list(read_orders(write(tmp_path, "o.csv", text)))
    [error] = errors(results)
    assert error.line == 3
    assert error.key == "INV-1"
    assert "status 'shipped' here, 'delivered' there" in error.reason
    assert [r.external_id for r in results if isinstance(r, OrderRecord)] == ["INV-2"]


@pytest.mark.parametrize(
    ("rows", "line", "words"),
    [
        (["INV-1,C-1,sent,2026-11-22 10:00,,,,P-1,1,1000"], 2, ["status", "'sent'"]),
        (["INV-1,C-1,paid,22/11/2026,,,,P-1,1,1000"], 2, ["placed_at", "'22/11/2026'"]),
        (["INV-1,C-1,paid,,,,,P-1,1,1000"], 2, ["missing placed_at"]),
        (["INV-1,,paid,2026-11-22,,,,P-1,1,1000"], 2, ["missing customer_id"]),
        (["INV-1,C-1,paid,2026-11-22,,,,P-1,0,1000"], 2, ["quantity", "'0'"]),
        (["INV-1,C-1,paid,2026-11-22,,,,P-1,1.5,1000"], 2, ["quantity", "'1.5'"]),
        (["INV-1,C-1,paid,2026-11-22,,,,P-1,1,"], 2, ["missing unit_price"]),
        (["INV-1,C-1,paid,2026-11-22,,,,,,"], 2, ["missing total"]),
        (["INV-1,C-1,paid,2026-11-22,,,,,2,"], 2, ["quantity given without a product_id"]),
        (["INV-1,C-1,paid,2026-11-22,,,,P-1,1,10", "INV-1,C-1,paid,2026-11-22,,,,,,"], 3, ["missing product_id"]),
        (["INV-1,C-1,paid,2026-11-22,,,,P-1,1,10", "INV-1,C-1,paid,2026-11-22,,,,P-2,x,10"], 3, ["quantity", "'x'"]),
        ([",C-1,paid,2026-11-22,,,,P-1,1,10"], 2, ["missing order_id"]),
        (["INV-1,C-1,delivered,2026-01-05,2026-01-04,,,P-1,1,10"], 2,
         ["delivered_at '2026-01-04' is before placed_at '2026-01-05'"]),
        (["INV-1,C-1,delivered,2026-01-05T10:00+07:00,2026-01-04T16:00Z,,,P-1,1,10"], 2, ["is before placed_at"]),
    ],
)
def test_bad_order_rows_are_named(tmp_path: Path, rows: list[str], line: int, words: list[str]) -> None:
    results = list(read_orders(write(tmp_path, "o.csv", ORDER_HEADER + "\n".join(rows) + "\n")))
    [error] = results
    assert isinstance(error, RowError)
    assert error.line == line
    for word in words:
        assert word in error.reason


PAID_HEADER = "order_id,customer_id,status,placed_at,paid_at,total\n"


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ("INV-1,C-1,paid,2026-01-05,2026-01-04,10", ["paid_at '2026-01-04' is before placed_at '2026-01-05'"]),
        ("INV-1,C-1,paid,2026-01-05,05/01/2026,10", ["paid_at", "'05/01/2026'"]),
        ("INV-1,C-1,paid,2026-01-05,2062-01-05,10", ["paid_at", "2062"]),
    ],
)
def test_a_bad_paid_at_is_a_rejected_row_naming_it(tmp_path: Path, row: str, words: list[str]) -> None:
    results = list(read_orders(write(tmp_path, "o.csv", PAID_HEADER + row + "\n"),
                               now=datetime(2026, 1, 6, tzinfo=UTC)))  # fmt: skip
    [error] = results
    assert isinstance(error, RowError) and error.line == 2, results
    for word in words:
        assert word in error.reason, error.reason


def test_paid_at_is_read_for_an_order_paid_and_left_out_for_one_that_is_not(tmp_path: Path) -> None:
    rows = ["INV-1,C-1,shipped,2026-01-05 10:00,2026-01-09 08:30,10", "INV-2,C-1,placed,2026-01-05,2026-01-09,10",
            "INV-3,C-1,refunded,2026-01-05,2026-01-06,10", "INV-4,C-1,paid,2026-01-05,,10"]  # fmt: skip
    orders = list(read_orders(write(tmp_path, "o.csv", PAID_HEADER + "\n".join(rows) + "\n")))
    assert all(isinstance(o, OrderRecord) for o in orders), orders
    assert [o.paid_at for o in orders if isinstance(o, OrderRecord)] == [
        datetime(2026, 1, 9, 1, 30, tzinfo=UTC), None, None, None]  # fmt: skip


def test_missing_order_column_fails_before_any_row(tmp_path: Path) -> None:
    path = write(tmp_path, "o.csv", "order_id,customer_id,status\nINV-1,C-1,paid\n")
    with pytest.raises(ImportRowError, match="missing column 'placed_at'"):
        list(read_orders(path))


# --- the duplicate detector --------------------------------------------------------------


def test_seen_ids_remembers_first_lines_across_growth() -> None:
    seen = _SeenIds(capacity=8)
    for i in range(5000):
        assert seen.add(f"C-{i}", i + 2) is None
    assert len(seen) == 5000
    assert seen.add("C-0", 9999) == 2
    assert seen.add("C-4999", 9999) == 5001


@pytest.mark.parametrize(("value", "currency"), [("249.000", "IDR"), ("12.500", "IDR"), ("1.500", "USD"),
                                                 ("1.500", "JPY")])  # fmt: skip
def test_an_amount_with_three_decimals_in_a_currency_with_fewer_is_a_thousands_separator_not_read(
    tmp_path: Path, value: str, currency: str
) -> None:
    # Given a price written as an Indonesian spreadsheet shows it, '.' separating thousands (Rp249.000), in a
    # currency with fewer than three decimals
    [error] = read_products(write(tmp_path, "p.csv", PRODUCT_HEADER + f"P-1,Tas,Tas,{value},{currency},,,,\n"))
    # Then it is a rejected row saying what to write (it was read as 249.00: Rp249 for a Rp249.000 bag, and
    # Rp12,50 for Rp12.500, in every email that shows the price)
    assert isinstance(error, RowError), error
    assert f"invalid price '{value}' (" in error.reason
    assert f"is '.' a thousands separator? write {value.replace('.', '')} for that" in error.reason
    # and in an order's total and line price as well
    orders = ("order_id,customer_id,status,placed_at,currency,total,product_id,quantity,unit_price\n"
              f"O-1,C-1,paid,2026-01-01,{currency},{value},,,\n"
              f"O-2,C-1,paid,2026-01-01,{currency},,P-1,1,{value}\n")  # fmt: skip
    found = list(read_orders(write(tmp_path, "o.csv", orders)))
    assert [(e.line, e.reason.split(" (")[0]) for e in errors(found)] == [
        (2, f"invalid total '{value}'"), (3, f"invalid unit_price '{value}'")]


@pytest.mark.parametrize("key", ["P-\x9b1", "P\u202e1-", "P-1\u2066"])
def test_an_id_with_a_c1_control_or_a_bidi_control_is_a_rejected_row(tmp_path: Path, key: str) -> None:
    [error] = read_products(write(tmp_path, "p.csv", PRODUCT_HEADER + f"{key},Kopi,Kopi,89000,,,,,\n"))
    assert isinstance(error, RowError) and error.line == 2
    assert f"invalid id {key!r}" in error.reason and "no control characters: U+" in error.reason


@pytest.mark.parametrize("zone", ["localtime", "Factory", "posixrules", "posix/Asia/Jakarta", "right/UTC"])
def test_a_zone_file_that_is_no_place_is_left_out_with_a_warning(tmp_path: Path, zone: str) -> None:
    # "localtime" is whatever zone the importing host is set to (another on each host), "Factory" reads every time
    # as "-00": the zone database holds them, but neither says where a customer is
    path = write(tmp_path, "customers.csv", CUSTOMER_HEADER + f"C-1,ani@example.com,Ani,id,{zone},,yes,,\n"
                 "C-2,budi@example.com,Budi,id,Asia/Makassar,,yes,,\n")
    results = list(read_customers(path))
    [error] = errors(results)
    assert (error.line, error.key) == (2, "C-1")
    assert f"invalid time_zone '{zone}'" in error.reason and error.saved  # the customer imported with the shop's
    assert [r.time_zone for r in results if isinstance(r, CustomerRecord)] == ["Asia/Jakarta", "Asia/Makassar"]


@pytest.mark.parametrize(("zone", "meant"), [
    ("WIB", "Asia/Jakarta"), ("wita", "Asia/Makassar"), ("WIT", "Asia/Jayapura"),
    ("asia/jakarta", "Asia/Jakarta"), ("ASIA/MAKASSAR", "Asia/Makassar"), ("europe/london", "Europe/London"),
    # a letter or two wrong, and a city alone (as a form's drop-down shows it): the name they stand for
    ("America/New_Yrok", "America/New_York"), ("Asia/Jakata", "Asia/Jakarta"), ("Europe/Londn", "Europe/London"),
    ("Jakarta", "Asia/Jakarta"), ("New York", "America/New_York"), ("kathmandu", "Asia/Kathmandu"),
])
def test_a_zone_written_as_a_clock_shows_it_or_in_another_case_is_left_out_saying_which_was_meant(
    tmp_path: Path, zone: str, meant: str
) -> None:
    path = write(tmp_path, "customers.csv", CUSTOMER_HEADER + f"C-1,ani@example.com,Ani,id,{zone},,yes,,\n")
    [error] = errors(read_customers(path))
    assert (error.line, error.key) == (2, "C-1")
    assert f"invalid time_zone '{zone}' (expected an IANA name such as 'Asia/Jakarta'; did you mean '{meant}'?)" \
        in error.reason, error.reason


@pytest.mark.parametrize("zone", ["Pacific", "GMT+7", "UTC+7", "+07:00", "Mars/Olympus", "Portland"])
def test_a_zone_no_name_is_near_is_left_out_with_no_guess(tmp_path: Path, zone: str) -> None:
    # "Pacific" is the city of no zone (US/Pacific, Canada/Pacific are old names for countries' zones), and
    # Etc/GMT+7 is UTC-7, the opposite of the GMT+7 a clock shows: neither is offered; nor Poland, Warsaw's old name,
    # for Portland (Oregon's, or Maine's), two letters from it
    path = write(tmp_path, "customers.csv", CUSTOMER_HEADER + f"C-1,ani@example.com,Ani,id,{zone},,yes,,\n")
    [error] = errors(read_customers(path))
    assert (error.line, error.key) == (2, "C-1")
    assert error.reason.startswith(f"invalid time_zone '{zone}' (expected an IANA name such as 'Asia/Jakarta'); "
                                   "the customer is imported with the shop's"), error.reason


def test_an_id_with_an_invisible_character_is_a_rejected_row_not_a_second_customer(tmp_path: Path) -> None:
    # "C-1" and "C-1\u200b" (a zero-width space copied from a web page) were taken as two customers, the second's
    # orders attached to a customer no email reaches; a BOM mid-file (two exports joined) and a no-break space the same
    path = write(tmp_path, "customers.csv", CUSTOMER_HEADER
                 + "C-1,ani@example.com,Ani,id,,,yes,,\n"
                 + "C-1\u200b,ani@example.com,Ani,id,,,yes,,\n"
                 + "\ufeffC-2,budi@example.com,Budi,id,,,yes,,\n"
                 + "C\xa03,cici@example.com,Cici,id,,,yes,,\n"
                 + "C-4,dodi@example.com,Dodi,id,,,yes,,\n")  # fmt: skip
    found = list(read_customers(path))
    assert [r.external_id for r in found if isinstance(r, CustomerRecord)] == ["C-1", "C-4"]
    assert [(e.line, e.reason) for e in errors(found)] == [
        (3, "invalid id 'C-1\\u200b' (no invisible characters nor spaces other than ' ': U+200B ZERO WIDTH SPACE "
            "at character 4)"),
        (4, "invalid id '\\ufeffC-2' (no invisible characters nor spaces other than ' ': U+FEFF ZERO WIDTH "
            "NO-BREAK SPACE at character 1)"),
        (5, "invalid id 'C\\xa03' (no invisible characters nor spaces other than ' ': U+00A0 NO-BREAK SPACE at "
            "character 2)"),
    ]


@pytest.mark.parametrize(
    ("row", "column", "code"),
    [
        ("P-1\u2060,Kopi,Kopi,89000,,,,,", "id", "U+2060 WORD JOINER"),
        ("P-1,Kopi,Kopi\u200bGayo,89000,,,,,", "category", "U+200B ZERO WIDTH SPACE"),
        ("P-1,Kopi,Kopi\u00adGayo,89000,,,,,", "category", "U+00AD SOFT HYPHEN"),
        ("P-1,Kopi,Kopi\u3000Gayo,89000,,,,,", "category", "U+3000 IDEOGRAPHIC SPACE"),
        ("P-1,Kopi,Kopi\ufe0fGayo,89000,,,,,", "category", "U+FE0F VARIATION SELECTOR-16"),
    ],
)
def test_a_product_id_or_category_with_an_invisible_character_is_a_rejected_row(
    tmp_path: Path, row: str, column: str, code: str
) -> None:
    [error] = read_products(write(tmp_path, "p.csv", PRODUCT_HEADER + row + "\n"))
    assert isinstance(error, RowError) and error.line == 2
    assert error.reason.startswith(f"invalid {column} ") and code in error.reason


def test_a_category_keeps_emoji_with_their_joiners_and_selectors(tmp_path: Path) -> None:
    category = "Dapur \U0001f469\u200d\U0001f373 \u2615\ufe0f"  # woman cook (a ZWJ sequence), hot beverage (VS16)
    [product] = read_products(write(tmp_path, "p.csv", PRODUCT_HEADER + f"P-1,Kopi,{category},89000,,,,,\n"))
    assert isinstance(product, ProductRecord) and product.category == category


def test_an_order_naming_its_customer_or_product_with_an_invisible_character_is_a_rejected_row(tmp_path: Path) -> None:
    path = write(tmp_path, "o.csv", ORDER_HEADER
                 + "O-1,C-1\u200b,paid,2026-01-01,,,,P-1,1,1000\n"
                 + "O-2,C-1,paid,2026-01-01,,,,P-1\ufeff,1,1000\n"
                 + "O-3,C-1,paid,2026-01-01,,,,P-1,1,1000\n")  # fmt: skip
    found = list(read_orders(path))
    assert [r.external_id for r in found if isinstance(r, OrderRecord)] == ["O-3"]
    assert [(e.line, e.reason.split(" (")[0]) for e in errors(found)] == [
        (2, "invalid customer_id 'C-1\\u200b'"), (3, "invalid product_id 'P-1\\ufeff'")]


@pytest.mark.parametrize(
    ("placed_at", "total", "hint"),
    [
        # a spreadsheet's own date format: 01/02/2026 is 1 February or 2 January, so none is guessed
        ("12/31/2026", "1000", "invalid placed_at '12/31/2026' (a date as a spreadsheet shows it: is it month/day or "
                               "day/month? write it as YYYY-MM-DD, e.g. 2026-11-22 or 2026-11-22T10:00:00+07:00)"),
        ("31.12.2025", "1000", "invalid placed_at '31.12.2025' (a date as a spreadsheet shows it"),
        # GMT+7 reads as UTC+7 here and as UTC-7 in a POSIX zone (Etc/GMT+7): the offset is asked for, not guessed
        ("2026-01-02 10:00 GMT+7", "1000", "invalid placed_at '2026-01-02 10:00 GMT+7' (write the offset as +07:00 "
                                           "or -07:00 after the time, or none for the shop's time zone; 'GMT+7' is "
                                           "read either way round)"),
        ("2026-01-02T10:00:00 UTC+7", "1000", "invalid placed_at '2026-01-02T10:00:00 UTC+7' (write the offset as"),
        # a zone by its name, as Ruby's Time#to_s writes UTC (Rails exports) or a shop writes WIB: it said
        # "(Invalid isoformat string: '2026-01-02 10:00:00 UTC')", naming the value twice and what to write nowhere
        ("2026-01-02 10:00:00 UTC", "1000", "invalid placed_at '2026-01-02 10:00:00 UTC' (a time zone written by its "
                                            "name, 'UTC', is not read: write its offset after the time, "
                                            "2026-01-02T10:00:00+00:00 for UTC, or none for the shop's time zone)"),
        # the offset named is the zone's (it gave +07:00 as the example for every zone: 10:00 WITA, written so,
        # would be read an hour late, and 10:00 UTC seven hours early)
        ("2026-01-02 10:00 WITA", "1000", "invalid placed_at '2026-01-02 10:00 WITA' (a time zone written by its name, "
                                          "'WITA', is not read: write its offset after the time, "
                                          "2026-01-02T10:00:00+08:00 for Asia/Makassar, or none for the shop's time "
                                          "zone)"),
        ("2026-01-02 10:00 WIT", "1000", "invalid placed_at '2026-01-02 10:00 WIT' (a time zone written by its name, "
                                         "'WIT', is not read: write its offset after the time, "
                                         "2026-01-02T10:00:00+09:00 for Asia/Jayapura"),
        ("2026-01-02 10:00 Mars", "1000", "invalid placed_at '2026-01-02 10:00 Mars' (a time zone written by its name, "
                                          "'Mars', is not read: write its offset after the time, as in "
                                          "2026-11-22T10:00:00+07:00, or none for the shop's time zone)"),
        ("2026-01-02T10:00 WIB", "1000", "invalid placed_at '2026-01-02T10:00 WIB' (a time zone written by its name, "
                                         "'WIB', is not read"),
        ("2026-01-02 10:00:00 Asia/Jakarta", "1000", "invalid placed_at '2026-01-02 10:00:00 Asia/Jakarta' (a time "
                                                     "zone written by its name, 'Asia/Jakarta', is not read"),
        ("2026-01-02 at 10:00", "1000", "invalid placed_at '2026-01-02 at 10:00' (expected ISO 8601, e.g. "
                                        "2026-11-22T10:00:00+07:00)"),
        # thousands separators: 1,234.50 is clear, but 249,50 is Rp249.50 in Indonesian and 24950 in English
        ("2026-01-02", "1,234.50", "invalid total '1,234.50' (write amounts without thousands separators and with "
                                   "'.' before decimals, such as 249000 or 249000.50)"),
        ("2026-01-02", "249,50", "invalid total '249,50' (write amounts without thousands separators"),
    ],
)
def test_a_spreadsheets_local_date_offset_or_amount_is_a_rejected_row_saying_what_to_write(
    tmp_path: Path, placed_at: str, total: str, hint: str
) -> None:
    path = write(tmp_path, "o.csv", "order_id,customer_id,status,placed_at,total\n"
                 f'O-1,C-1,paid,{placed_at},"{total}"\nO-2,C-1,paid,2026-01-02,1000\n')  # fmt: skip
    found = list(read_orders(path))
    assert [r.external_id for r in found if isinstance(r, OrderRecord)] == ["O-2"]
    [error] = errors(found)
    assert (error.file, error.line, error.key) == ("o.csv", 2, "O-1")
    assert error.reason.startswith(hint), error.reason


def test_a_language_tag_with_a_region_is_read_as_its_language(tmp_path: Path) -> None:
    # a shop system's export writes the customer's language as a tag with its region (Shopify, WooCommerce:
    # en-US, id_ID; Java's old in_ID; a POSIX en_US.UTF-8): every such customer was a rejected row, never emailed
    tags = {"C-1": "en-US", "C-2": "en_GB", "C-3": "id-ID", "C-4": "id_ID", "C-5": "in_ID", "C-6": "EN",
            "C-7": "en_US.UTF-8", "C-8": "in", "C-9": "fr-FR", "C-10": "en-", "C-11": "english"}
    path = write(tmp_path, "customers.csv", CUSTOMER_HEADER + "".join(
        f"{key},{key.lower()}@example.com,Ani,{tag},,,yes,,\n" for key, tag in tags.items()))
    found = list(read_customers(path))
    assert {r.external_id: r.locale for r in found if isinstance(r, CustomerRecord)} == {
        "C-1": Locale.EN, "C-2": Locale.EN, "C-3": Locale.ID, "C-4": Locale.ID, "C-5": Locale.ID, "C-6": Locale.EN,
        "C-7": Locale.EN, "C-8": Locale.ID, "C-9": Locale.ID, "C-10": Locale.ID, "C-11": Locale.ID}  # fmt: skip
    # another language, or no language tag at all, is a warning saying what is read, the customer imported with
    # the shop's language
    assert [(e.line, e.reason, e.saved) for e in errors(found)] == [
        (line, f"invalid locale {tag!r} (expected id or en, or a tag of either with its region: id-ID, en_US)"
               + LOCALE_LEFT_OUT, True)
        for line, tag in ((10, "fr-FR"), (11, "en-"), (12, "english"))
    ]


def test_an_unreadable_row_of_an_order_seen_before_skips_that_order_whole(tmp_path: Path) -> None:
    text = ORDER_HEADER + (
        "INV-1,C-1,paid,2026-11-22 10:00,,,,P-1,1,1000\n"
        "INV-2,C-1,paid,2026-11-22 10:00,,,,P-1,1,1000\n"
        "INV-1,C-1,paid,2026-11-22 10:00,,,,P-2,1,1,000\n"
    )
    results = list(read_orders(write(tmp_path, "o.csv", text)))
    # INV-1 is skipped whole, its rows not together; the row that cannot be read is said too, at its line
    first, broken = errors(results)
    assert (first.line, first.key) == (2, "INV-1")
    assert first.reason.startswith("order 'INV-1' has rows at line 2 and again at line 4,")
    assert (broken.line, broken.key) == (4, "INV-1")
    assert broken.reason.startswith("row has 11 fields, the header has 10: field 11 holds '000'"), broken.reason
    assert [r.external_id for r in results if isinstance(r, OrderRecord)] == ["INV-2"]


def test_an_id_too_long_is_cut_short_where_the_message_names_the_row(tmp_path: Path) -> None:
    # a column of notes exported as the id column: the message named the row by all of it, then cut it short
    path = write(tmp_path, "c.csv", f"id,email,name,marketing_consent\nC-{'x' * 20_000},a@example.com,Ani,1\n")
    [error] = read_customers(path)
    assert str(error).startswith(f"c.csv:2: id 'C-{'x' * 98}'…(20002 chars): invalid id "), str(error)[:300]
    assert len(str(error)) < 400
    # an id as long as one may be is named whole
    path = write(tmp_path, "c.csv", f"id,email,name,marketing_consent\nC-{'x' * 98},bad,Ani,1\n")
    [error] = read_customers(path)
    assert str(error).startswith(f"c.csv:2: id 'C-{'x' * 98}': invalid email address 'bad'"), str(error)


def test_a_row_without_an_order_id_after_an_orders_rows_drops_that_order(tmp_path: Path) -> None:
    # a marketplace export whose order columns were merged cells: only an order's first row holds them
    text = ORDER_HEADER + (
        "INV-1,C-1,paid,2026-11-22 10:00,,,,P-1,1,1000\n"
        ",,,,,,,P-2,1,2000\n"
        ",,,,,,,P-3,1,4000\n"
        "INV-2,C-1,paid,2026-11-22 10:00,,,,P-1,1,1000\n"
    )
    results = list(read_orders(write(tmp_path, "o.csv", text)))
    # INV-1 is not stored at 1000, without the lines after it (it was, the two rows reported only as "missing
    # order_id (required)")
    assert [r.external_id for r in results if isinstance(r, OrderRecord)] == ["INV-2"]
    assert [(e.line, e.key, e.reason) for e in errors(results)] == [
        (3, "", "missing order_id (required); the order above it, 'INV-1' from line 2, is skipped: this row may be "
                "one of its lines (a spreadsheet's merged cells leave them empty); write the order's columns on "
                "each of its rows"),
        (4, "", "missing order_id (required)"),
    ]


def test_a_zero_date_is_a_rejected_row_saying_what_it_is(tmp_path: Path) -> None:
    # MySQL's 0000-00-00 for a date that is not known (WooCommerce's date_completed of an order not delivered): it
    # said "(year 0 is out of range)"
    path = write(tmp_path, "o.csv", ORDER_HEADER
                 + "O-1,C-1,paid,2026-11-22 10:00,0000-00-00 00:00:00,,,P-1,1,1000\n"
                 + "O-2,C-1,paid,0000-00-00,,,,P-1,1,1000\n")  # fmt: skip
    assert [(e.line, e.reason) for e in errors(read_orders(path))] == [
        (2, "invalid delivered_at '0000-00-00 00:00:00' (a zero date, as MySQL writes one that is not known: leave "
            "the cell empty)"),
        (3, "invalid placed_at '0000-00-00' (a zero date, as MySQL writes one that is not known: placed_at is "
            "required)"),
    ]
    path = write(tmp_path, "c.csv", "id,email,name,marketing_consent,birthday\nC-1,a@example.com,Ani,1,0000-00-00\n")
    customer, error = read_customers(path)  # the customer is imported without it (a warning, ``saved``)
    assert isinstance(customer, CustomerRecord) and customer.birthday is None and "birthday" in customer.absent
    assert isinstance(error, RowError) and error.saved
    assert error.reason.startswith("invalid birthday '0000-00-00' (a zero date, as MySQL writes one that is not "
                                   "known: leave the cell empty); the customer is imported without it")


def test_a_broken_row_without_an_order_id_after_an_orders_rows_drops_that_order(tmp_path: Path) -> None:
    # a marketplace export of merged cells, one of whose later lines also has a stray comma: it was reported only
    # as "row has 11 fields", and the order above it stored without that line, at a total short of it
    text = ORDER_HEADER + (
        "INV-1,C-1,paid,2026-11-22 10:00,,,,P-1,1,1000\n"
        ",,,,,,,P-2,1,2,000\n"
        "INV-2,C-1,paid,2026-11-22 10:00,,,,P-1,1,1000\n"
    )
    results = list(read_orders(write(tmp_path, "o.csv", text)))
    assert [r.external_id for r in results if isinstance(r, OrderRecord)] == ["INV-2"]
    [error] = errors(results)
    assert (error.line, error.key) == (3, "")
    assert error.reason.startswith("row has 11 fields, the header has 10"), error.reason
    assert "the order above it, 'INV-1' from line 2, is skipped: this row may be one of its lines" in error.reason


def test_a_broken_row_whose_order_id_cannot_be_read_leaves_the_order_above_it(tmp_path: Path) -> None:
    # an id in bytes that are not UTF-8 is an id, not an empty cell: the order above it is whole and imported
    path = tmp_path / "o.csv"
    path.write_bytes((ORDER_HEADER + "INV-1,C-1,paid,2026-11-22 10:00,,,,P-1,1,1000\n").encode()
                     + b"INV-\xe9,C-1,paid,2026-11-22 10:00,,,,P-1,1,1000\n")  # fmt: skip
    results = list(read_orders(path))
    assert [r.external_id for r in results if isinstance(r, OrderRecord)] == ["INV-1"]
    [error] = errors(results)
    assert "not UTF-8 text: byte 0xe9 in column 1 'order_id'" in error.reason and "above" not in error.reason


def test_a_header_with_two_boms_is_read(tmp_path: Path) -> None:
    # a BOM'd export saved again by a tool that adds its own: the first column was "'\ufeffid'", a missing 'id'
    path = tmp_path / "c.csv"
    path.write_bytes(b"\xef\xbb\xbf\xef\xbb\xbfid,email,name,marketing_consent\nC-1,a@example.com,Ani,ya\n")
    [customer] = read_customers(path)
    assert isinstance(customer, CustomerRecord) and customer.external_id == "C-1"


def test_a_file_with_the_columns_of_two_kinds_is_named_as_the_kind_most_of_its_columns_are(tmp_path: Path) -> None:
    # Given an orders export whose line items carry their product's id, name and price (every column a products
    # file needs), imported as customers by a slip
    path = write(tmp_path, "orders.csv", "order_id,customer_id,status,placed_at,total,id,name,price\n")
    with pytest.raises(ImportRowError) as info:
        next(iter(read_customers(path)))
    # Then the refusal names it an orders file alone: it also told to `kembali import products` it, which would
    # import each order line as a product
    assert info.value.reason.endswith("(found: order_id, customer_id, status, placed_at, total, id, name, price); "
                                      "its columns are those of an orders file: import it with "
                                      "`kembali import orders`")  # fmt: skip
