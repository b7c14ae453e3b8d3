"""`kembali import` fed what real shops export: each bad row is named, the rest imported, on SQLite and PostgreSQL."""

from __future__ import annotations

import gzip
import io
import os
import pty
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.clikit import migrated_config, run_on_a_terminal, waiting_for_a_lock
from tests.clikit import run_cli as kembali
from tests.db_fixtures import migrated_sqlite
from tests.shop import stored_orders
from worker.adapters import db, importer, shop, tables
from worker.cli import main
from worker.commands import importing


def _config(folder: Path, url: str) -> Path:
    path = folder / "config.toml"
    path.write_text(f'[database]\nurl = "{url}"\n', encoding="utf-8")
    return path


def _ids(url: str, table: str) -> set[str]:
    return {str(external_id) for external_id, in _rows(url, f"select external_id from {table}")}


def test_text_longer_than_its_column_is_a_rejected_row_not_a_lost_batch(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a consent source, a category and a product link longer than the columns that store them
    config = _config(tmp_path, db_url)
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent,consent_source\n"
        "C-1,c1@example.com,Ani,ya,checkout\n"
        f"C-2,c2@example.com,Budi,ya,{'newsletter form on the summer sale landing page ' * 2}\n"
        "C-3,c3@example.com,Citra,ya,checkout\n",
        encoding="utf-8",
    )
    (tmp_path / "products.csv").write_text(
        "id,name,price,category,url\n"
        "P-1,Tas,1000,tas,https://toko.example/p/1\n"
        f"P-2,Baju,1000,{'pakaian wanita ' * 8},https://toko.example/p/2\n"
        f"P-3,Topi,1000,topi,https://toko.example/p/3?{'utm=x&' * 200}\n"
        "P-4,Sepatu,1000,sepatu,https://toko.example/p/4\n",
        encoding="utf-8",
    )
    # When they are imported
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))
    # Then PostgreSQL does not refuse the batch (a traceback, and none of its rows imported): the row is named
    assert (code, "Traceback" in out) == (1, False), out
    assert "customers.csv:3: id 'C-2': invalid consent_source" in out and "(at most 64 characters" in out
    assert "customers: 2 created, 0 updated, 0 unchanged, 1 rejected" in out
    assert _ids(db_url, "customer") == {"C-1", "C-3"}
    code, out = kembali(capsys, "--config", str(config), "import", "products", str(tmp_path / "products.csv"))
    assert (code, "Traceback" in out) == (1, False), out
    assert "products.csv:3: id 'P-2': invalid category" in out and "(at most 100 characters" in out
    assert "products.csv:4: id 'P-3': invalid url" in out and "(at most 1000 characters)" in out
    assert _ids(db_url, "product") == {"P-1", "P-4"}


@pytest.mark.parametrize(
    ("limit", "column"),
    [
        (importer.MAX_ID, tables.Customer.__table__.c.external_id),
        (importer.MAX_NAME, tables.Customer.__table__.c.name),
        (importer.MAX_TEXT["consent_basis"], tables.Customer.__table__.c.consent_basis),
        (importer.MAX_TEXT["consent_source"], tables.Customer.__table__.c.consent_source),
        (importer.MAX_TEXT["category"], tables.Product.__table__.c.category),
        (importer.MAX_URL, tables.Product.__table__.c.url),
        (importer.MAX_URL, tables.Product.__table__.c.image_url),
    ],
)
def test_the_importers_limits_fit_the_columns(limit: int, column: sa.Column[str]) -> None:
    assert limit <= column.type.length  # type: ignore[attr-defined]


def test_columns_without_a_name_from_trailing_commas_are_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a spreadsheet's export with two empty columns at the end of every line, header included
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_bytes(
        b"id,email,name,marketing_consent,,\r\nC-1,c1@example.com,Ani,ya,,\r\nC-2,c2@example.com,Budi,ya,,\r\n,,,,,\r\n"
    )
    # When it is imported
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))
    # Then the rows are imported (the whole file was refused: "duplicate column ''"), with a warning for the columns
    assert (code, "duplicate column" in out) == (0, False), out
    assert "customers: 2 created, 0 updated, 0 unchanged, 0 rejected" in out
    assert "customers.csv:1: 2 column(s) without a name ignored" in out


def test_a_column_not_read_twice_in_the_header_is_ignored_and_one_read_twice_is_named_with_both_places(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an export with two 'Note' columns (a shop's own, not read by Kembali), and one with 'email' twice
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_text(
        "id,email,Note,name,marketing_consent,note\nC-1,c1@example.com,vip,Ani,ya,call first\n"
    )
    (tmp_path / "twice.csv").write_text("id,email,name,Email,marketing_consent\nC-1,c1@example.com,Ani,c@x.id,ya\n")
    # When they are imported
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))
    # Then the column that is not read is ignored with a warning naming it once (the whole file was refused:
    # "duplicate column 'note'"), and the rows imported
    assert code == 0, out
    assert "customers.csv:1: unknown column(s) 'note' ignored" in out, out
    assert "customers: 1 created, 0 updated, 0 unchanged, 0 rejected" in out, out
    # And a column that is read, given twice, refuses the file naming both places: which one is meant is not guessed
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "twice.csv"))
    assert code == 2, out
    assert "twice.csv: line 1: duplicate column 'email' (columns 2 and 4): keep one of them" in out, out


def test_excels_separator_line_before_the_header_is_read_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given exports that start with Excel's separator hint ('sep=,' or 'sep=;'), then the header
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_bytes(
        b"\xef\xbb\xbfsep=,\r\nid,email,name,marketing_consent\r\nC-1,c1@example.com,Ani,ya\r\nC-2,bad@,Budi,ya\r\n"
    )
    (tmp_path / "semicolons.csv").write_text("sep=;\nid;email;name;marketing_consent\nC-1;c1@example.com;Ani;ya\n")
    # When they are imported
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))
    # Then 'sep=,' is skipped and the header read on the line after it, the rows named by their lines (the file was
    # refused: "missing column 'id' (found: sep=, )")
    assert code == 1, out
    assert "customers.csv:4: id 'C-2': invalid email address 'bad@'" in out, out
    assert "customers: 1 created, 0 updated, 0 unchanged, 1 rejected" in out, out
    # And 'sep=;' says what the file is and what to do
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "semicolons.csv"))
    assert code == 2, out
    assert ("semicolons.csv: line 1: 'sep=;' says the columns are separated by ';': save the file comma-separated"
            in out), out


def test_rows_without_the_trailing_commas_of_columns_without_a_name_are_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given Excel's export of a sheet whose used range is wider than its columns: the header and the first rows end
    # in empty fields of columns without a name, and the rows after the 16th lack them (as Excel may leave them out)
    config = migrated_config(tmp_path)
    rows = [f"C-{n},c{n}@example.com,Ani {n},ya,," for n in range(1, 17)]
    rows += [f"C-{n},c{n}@example.com,Ani {n},ya" for n in range(17, 21)]
    rows += ["C-21,c21@example.com,ya"]  # a field of a named column missing: still rejected
    (tmp_path / "customers.csv").write_text("id,email,name,marketing_consent,,\n" + "\n".join(rows) + "\n")
    # When it is imported
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))
    # Then the short rows are read (each was 'row has 4 fields, the header has 6'), and the one lacking a field of
    # a column that is read is not
    assert code == 1, out
    assert "customers.csv:22: id 'C-21': row has 3 fields, the header has 6 (a stray comma or quote?)" in out, out
    assert "customers: 20 created, 0 updated, 0 unchanged, 1 rejected" in out, out


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_during_an_import_says_what_is_in_and_a_second_import_finishes_it(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    # Given a big customers file being imported
    config = migrated_config(tmp_path)
    rows = 6_000
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent\n" + "".join(f"C-{i},c{i}@example.com,Name {i},ya\n" for i in range(rows)),
        encoding="utf-8",
    )
    command = _import_command(config, "customers", tmp_path / "customers.csv")
    url = f"sqlite:///{tmp_path / 'k.db'}"
    # When the operator presses Ctrl-C (or `timeout`, or a service manager, stops it) once the first rows are in
    child, err = _interrupted(command, url, "customer", sig)
    # Then it says which signal stopped it, as the other commands do (it said "interrupted" for either: a cron log
    # did not tell `timeout` from a person), and how far the file is imported, and exits 130 (143)
    assert child.returncode == code, err
    assert "Traceback" not in err
    found = re.search(rf"kembali import: stopped by {sig.name}: customers\.csv is imported up to line (\d+), the rows "
                      r"after it are not "
                      r"\(([\d,]+) created, 0 updated, 0 unchanged, 0 rejected\)\. Import the file again to finish",
                      err)  # fmt: skip
    assert found is not None, err
    line, created = int(found[1]), int(found[2].replace(",", ""))
    assert line - 1 == created == len(_ids(url, "customer")) < rows  # every row up to that line, none after it
    # and importing the file again brings in exactly the rest
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"customers: {rows - created:,} created, 0 updated, {created:,} unchanged, 0 rejected" in again.stdout


def _import_command(config: Path, kind: str, path: Path) -> list[str]:
    # (Python ignores SIGINT when started with it ignored, as a shell's background job is: give it the default)
    start = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    start += "from worker.cli import main; sys.exit(main())"
    return [sys.executable, "-c", start, "--config", str(config), "import", kind, str(path)]


def _interrupted(command: list[str], url: str, table: str, sig: signal.Signals) -> tuple[subprocess.Popen[str], str]:
    """The import ``command`` run, sent ``sig`` once ``table`` has rows; the process and what it wrote to stderr."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _ids(url, table) and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.02)
        child.send_signal(sig)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    return child, err


def test_an_interrupted_import_of_orders_of_several_lines_names_the_last_line_imported(tmp_path: Path) -> None:
    # Given a big orders file whose orders have three lines each (and a customer and products for them)
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_text("id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\n")
    (tmp_path / "products.csv").write_text("id,name,price\nP-0,Tas,1000\nP-1,Topi,1000\nP-2,Sepatu,1000\n")
    orders = 6_000
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,product_id,quantity,unit_price\n"
        + "".join(f"O-{i},C-1,paid,2026-01-01,P-{j},1,1000\n" for i in range(orders) for j in range(3)),
        encoding="utf-8",
    )
    for kind in ("customers", "products"):
        assert subprocess.run(_import_command(config, kind, tmp_path / f"{kind}.csv"), timeout=60).returncode == 0
    url = f"sqlite:///{tmp_path / 'k.db'}"
    # When it is stopped once the first orders are in
    child, err = _interrupted(_import_command(config, "orders", tmp_path / "orders.csv"), url, "shop_order",
                              signal.SIGTERM)  # fmt: skip
    # Then the line it names is the last line of the last order imported: every row up to it is in, none after it
    # (it named the first line of that order, whose other two lines are in as well)
    assert child.returncode == 143, err
    found = re.search(r"stopped by SIGTERM: orders\.csv is imported up to line (\d+), the rows after it are not "
                      r"\(([\d,]+) created, 0 updated, 0 unchanged, 0 rejected\)", err)  # fmt: skip
    assert found is not None, err
    line, created = int(found[1]), int(found[2].replace(",", ""))
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            imported = conn.execute(sa.text("select count(*) from order_line")).scalar_one()
    finally:
        engine.dispose()
    assert line - 1 == imported == 3 * created < 3 * orders


def test_an_amount_too_large_for_the_database_is_a_rejected_row(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given orders whose amounts, in minor units, do not fit a 64-bit integer (a quantity typed into the price, …)
    config = _config(tmp_path, db_url)
    (tmp_path / "customers.csv").write_text("id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\n")
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,total,product_id,quantity,unit_price\n"
        "O-1,C-1,paid,2026-01-01,,P-1,9999999,999999999999999\n"
        "O-2,C-1,paid,2026-01-02,,P-1,1,150000\n"
        "O-3,C-1,paid,2026-01-03,,P-1,1000,50000000000000\n"
        "O-3,C-1,paid,2026-01-03,,P-2,1000,50000000000000\n"
        "O-4,C-1,paid,2026-01-04,,P-1,2,75000\n",
        encoding="utf-8",
    )
    (tmp_path / "products.csv").write_text("id,name,price,currency\nP-1,Emas,999999999999999,CLF\nP-2,Tas,1,CLF\n")
    assert kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))[0] == 0
    # When they are imported
    code, out = kembali(capsys, "--config", str(config), "import", "orders", str(tmp_path / "orders.csv"))
    # Then each is a rejected row (it was an OverflowError or a NumericValueOutOfRange traceback, the batch lost)
    assert (code, "Traceback" in out) == (1, False), out
    assert "orders.csv:2: id 'O-1': quantity 9999999 times unit_price '999999999999999' is too large " \
           "(at most 92233720368547758.07 IDR)" in out
    assert "orders.csv:4: id 'O-3': the lines' amounts add up to more than 92233720368547758.07 IDR" in out
    assert "orders: 2 created, 0 updated, 0 unchanged, 2 rejected" in out
    assert _ids(db_url, "shop_order") == {"O-2", "O-4"}
    code, out = kembali(capsys, "--config", str(config), "import", "products", str(tmp_path / "products.csv"))
    assert (code, "Traceback" in out) == (1, False), out
    assert "products.csv:2: id 'P-1': invalid price '999999999999999' (too large: at most 922337203685477.5807 CLF)" \
        in out
    assert _ids(db_url, "product") == {"P-2"}


def test_a_price_of_more_digits_than_an_amount_takes_is_said_to_be_too_large(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # it was "expected an amount such as 249000 or 249000.50", as if the digits were not a number
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "shop.db"}"\n', encoding="utf-8")
    (tmp_path / "products.csv").write_text("id,name,price,currency\nP-1,Emas,1000000000000000,IDR\n"
                                           "P-2,Tas,1,IDR\nP-3,Cincin,12345678901234567.5,JPY\n")  # fmt: skip
    migrated_sqlite(tmp_path / "shop.db")
    code, out = kembali(capsys, "--config", str(config), "import", "products", str(tmp_path / "products.csv"))
    assert code == 1, out
    assert "products.csv:2: id 'P-1': invalid price '1000000000000000' (too large: at most 999999999999999.99 IDR)" \
        in out
    assert "products.csv:4: id 'P-3': invalid price '12345678901234567.5' (too large: at most 999999999999999 JPY)" \
        in out
    assert "products: 1 created, 0 updated, 0 unchanged, 2 rejected" in out


def test_a_file_read_from_a_pipe_is_imported(tmp_path: Path) -> None:
    # Given a compressed export, decompressed on the fly: `kembali import customers <(gunzip -c customers.csv.gz)`
    config = migrated_config(tmp_path)
    csv = "id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\nC-2,c2@example.com,Budi,ya\n"
    command = [sys.executable, "-m", "worker", "--config", str(config), "import", "customers", "/dev/stdin"]
    # When the file is a pipe
    result = subprocess.run(command, input=csv, capture_output=True, text=True, timeout=60)
    # Then it is read like any file (it said "/dev/stdin: no such file")
    assert result.returncode == 0, result.stderr
    assert "customers: 2 created, 0 updated, 0 unchanged, 0 rejected" in result.stdout
    assert _ids(f"sqlite:///{tmp_path / 'k.db'}", "customer") == {"C-1", "C-2"}


def test_rows_of_a_process_substitution_are_named_by_its_path_not_by_a_bare_number(tmp_path: Path) -> None:
    # Given the README's `kembali import customers <(gunzip -c customers.csv.gz)`, one row bad
    config = migrated_config(tmp_path)
    (tmp_path / "c.csv").write_text("id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\nC-2,bad,Budi,ya\n")
    script = f'"{sys.executable}" -m worker --config "{config}" import customers <(cat "{tmp_path / "c.csv"}")'
    # When bash hands it over as /dev/fd/N
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    # Then the bad row is named by that path, as the summary names the file (it said "rejected 63:3", no file's name)
    assert result.returncode == 1, result.stderr
    (path,) = re.findall(r"\(from (/dev/fd/\d+)\)", result.stdout)
    assert f"rejected {path}:3: id 'C-2': invalid email address 'bad'" in result.stderr, result.stderr


def test_a_file_named_as_a_dash_is_read_from_standard_input(tmp_path: Path) -> None:
    # Given an export piped in as other commands take one (`suppress import -`): `gunzip -c c.csv.gz | kembali ... -`
    config = migrated_config(tmp_path)
    csv = "id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\nC-2,bad,Budi,ya\n"
    command = [sys.executable, "-m", "worker", "--config", str(config), "import", "customers", "-"]
    result = subprocess.run(command, input=csv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    # Then it is read (it said "kembali import: -: no such file"), its rows named as standard input's
    assert result.returncode == 1, result.stderr
    assert "customers: 1 created, 0 updated, 0 unchanged, 1 rejected (from standard input)" in result.stdout
    assert "rejected stdin:3: id 'C-2': invalid email address 'bad'" in result.stderr, result.stderr
    assert _ids(f"sqlite:///{tmp_path / 'k.db'}", "customer") == {"C-1"}


def test_a_dash_on_a_terminal_says_it_reads_standard_input(tmp_path: Path) -> None:
    # Given `kembali import customers -` typed at a terminal (no pipe): it waits for the CSV
    config = migrated_config(tmp_path)
    command = [sys.executable, "-m", "worker", "--config", str(config), "import", "customers", "-"]
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(command, stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, cwd=tmp_path)  # fmt: skip
        os.write(controller, b"id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\n\x04")
        out, err = process.communicate(timeout=60)
    finally:
        os.close(controller)
        os.close(terminal)
    # Then it says what it waits for, and reads what is typed up to Ctrl-D
    assert err == "kembali import: reading customers CSV from standard input (end with Ctrl-D)\n"
    assert process.returncode == 0
    assert "customers: 1 created, 0 updated, 0 unchanged, 0 rejected (from standard input)" in out


def test_a_dash_with_standard_input_closed_says_so(tmp_path: Path) -> None:
    # Given `kembali import customers -` run with its standard input closed (`<&-`, a cron line missing its pipe)
    config = migrated_config(tmp_path)
    command = [sys.executable, "-m", "worker", "--config", str(config), "import", "customers", "-"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            preexec_fn=lambda: os.close(0))  # fmt: skip
    # Then it names '-' and what to do (it said "kembali import: /dev/stdin: no such file"), exit 2
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("kembali import: -: standard input ('-') is closed: pipe or redirect the CSV "
                                     "into the command")  # fmt: skip


@pytest.mark.parametrize(
    ("name", "what"),
    [("customers.csv.gz", "is compressed with gzip: decompress it first (gunzip)"),
     ("customers.xlsx", "is a zip file (an .xlsx workbook?): save the sheet as 'CSV UTF-8'")],
)  # fmt: skip
def test_a_compressed_file_or_a_workbook_is_named_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, what: str
) -> None:
    config = migrated_config(tmp_path)
    csv = b"id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\n"
    if name.endswith(".gz"):
        (tmp_path / name).write_bytes(gzip.compress(csv))
    else:
        with zipfile.ZipFile(tmp_path / name, "w", zipfile.ZIP_DEFLATED) as workbook:
            workbook.writestr("xl/worksheets/sheet1.xml", "<worksheet/>" * 40)
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / name))
    # it said "header: not UTF-8 text: byte 0x8b in column 1 (save the file as UTF-8 ...)" for a gzip file
    assert (code, out.strip()) == (2, f"kembali import: {name}: line 1: {name} {what}")


def test_a_misspelt_column_is_named_with_the_column_it_surely_means(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a file whose time zone and birthday columns are spelt another way
    config = migrated_config(tmp_path)
    path = tmp_path / "customers.csv"
    path.write_text("id,email,name,marketing_consent,timezone,birth_date,phone\n"
                    "C-1,c1@example.com,Ani,ya,Asia/Makassar,1990-05-01,0812\n")  # fmt: skip
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(path))
    # Then the warning says which columns they surely are (every customer got Asia/Jakarta and no birthday, with
    # only "unknown column(s) 'timezone', 'birth_date', 'phone' ignored" said), and names the file once
    assert code == 0
    assert "warning: customers.csv:1: unknown column(s) 'timezone' (did you mean 'time_zone'?), 'birth_date' " \
           "(did you mean 'birthday'?), 'phone' ignored" in out
    # and a required column spelt another way, or a file separated by tabs, is named as such
    path.write_text("id,e-mail,name,marketing_consent\nC-1,c1@example.com,Ani,ya\n")
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(path))
    assert code == 2 and out.strip().endswith("missing column 'email' (found: id, e-mail, name, marketing_consent); "
                                              "rename 'e-mail' to 'email'")  # fmt: skip
    path.write_text("id\temail\tname\tmarketing_consent\nC-1\tc1@example.com\tAni\tya\n")
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(path))
    assert code == 2 and out.strip().endswith("the columns are separated by '\\t': save the file comma-separated")


@pytest.mark.postgres
def test_two_imports_of_the_same_new_ids_at_once_both_finish(tmp_path: Path, pg_migrated_url: str) -> None:
    # Given another import that has inserted C-1 but not committed yet (PostgreSQL: each batch reads, then inserts)
    engine = db.create_engine(pg_migrated_url)
    config = _config(tmp_path, pg_migrated_url)
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\nC-2,c2@example.com,Budi,ya\n", encoding="utf-8"
    )
    command = [sys.executable, "-m", "worker", "--config", str(config), "import", "customers",
               str(tmp_path / "customers.csv")]  # fmt: skip
    now = datetime.now(UTC)
    try:
        with engine.connect() as other:
            other.begin()
            other.execute(sa.insert(tables.Customer.__table__).values(
                external_id="C-1", email="c1@example.com", name="Ani S", locale="id", time_zone="Asia/Jakarta",
                marketing_consent=True, consent_basis="", consent_source="", order_count=0, total_spent_minor=0,
                created_at=now, updated_at=now))  # fmt: skip
            # When this import reads C-1 as new, and its insert waits for the other's
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                _wait_for_a_lock_wait(engine)
                other.commit()
                out, err = child.communicate(timeout=60)
            finally:
                child.kill()
    finally:
        engine.dispose()
    # Then it does its batch again and finishes (it failed with an IntegrityError traceback, none of it imported)
    assert (child.returncode, "Traceback" in err) == (0, False), err
    assert "customers: 1 created, 1 updated, 0 unchanged, 0 rejected" in out
    assert _ids(pg_migrated_url, "customer") == {"C-1", "C-2"}


@pytest.mark.postgres
def test_an_import_that_deadlocks_with_another_writer_does_its_batch_again(
    tmp_path: Path, pg_migrated_url: str
) -> None:
    # Given two customers, and another writer (a second import, the spend recount of a currency change) holding C-2
    engine = db.create_engine(pg_migrated_url)
    config = _config(tmp_path, pg_migrated_url)
    path = tmp_path / "customers.csv"
    path.write_text("id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\nC-2,c2@example.com,Budi,ya\n",
                    encoding="utf-8")  # fmt: skip
    command = [sys.executable, "-m", "worker", "--config", str(config), "import", "customers", str(path)]
    assert subprocess.run(command, capture_output=True, check=False).returncode == 0
    path.write_text("id,email,name,marketing_consent\nC-1,c1@example.com,Ani S,ya\nC-2,c2@example.com,Budi S,ya\n",
                    encoding="utf-8")  # fmt: skip
    customer = tables.Customer.__table__
    errors: list[BaseException] = []

    def other_writer_takes_c1(other: sa.Connection) -> None:
        try:  # waits for the import's lock on C-1: a deadlock, which PostgreSQL ends by failing the import's
            other.execute(sa.update(customer).where(customer.c.external_id == "C-1").values(locale="en"))
            other.commit()
        except BaseException as exc:
            errors.append(exc)

    try:
        with engine.connect() as other:
            other.begin()
            other.execute(sa.update(customer).where(customer.c.external_id == "C-2").values(locale="en"))
            # When this import updates C-1, then waits for C-2, and the other writer then asks for C-1
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                _wait_for_a_lock_wait(engine)
                writer = threading.Thread(target=other_writer_takes_c1, args=(other,))
                writer.start()
                writer.join(timeout=60)
                out, err = child.communicate(timeout=60)
            finally:
                child.kill()
    finally:
        engine.dispose()
    # Then the import, the one PostgreSQL failed, does its batch again once the other has committed (it exited 3,
    # "the database could not be used", and its batch was not imported)
    assert errors == []
    assert (child.returncode, "Traceback" in err) == (0, False), err
    assert "customers: 0 created, 2 updated, 0 unchanged, 0 rejected" in out
    names = {str(ext): (name, locale) for ext, name, locale in
             _rows(pg_migrated_url, "select external_id, name, locale from customer")}  # fmt: skip
    assert names == {"C-1": ("Ani S", "en"), "C-2": ("Budi S", "en")}


def _wait_for_a_lock_wait(engine: sa.Engine) -> None:
    waiting = sa.text("select count(*) from pg_stat_activity where datname = current_database() "
                      "and wait_event_type = 'Lock'")  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(waiting).scalar_one():
                return
        time.sleep(0.02)
    raise AssertionError("the import never waited for the other transaction's row")


def test_a_header_with_terminal_escapes_is_named_with_them_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given files whose header names carry a window-title escape and a clear-screen (a hostile export)
    config = migrated_config(tmp_path)
    path = tmp_path / "customers.csv"
    for header, shown, exit_code in (
        ("id,e\x1b]0;owned\x07mail,name,marketing_consent", "e\\u001b]0;owned\\u0007mail", 2),  # no email column
        ("id,email,name,marketing_consent,\x1b[2J\u202ex", "\\x1b[2j\\u202ex", 0),  # one unknown: ignored
    ):
        path.write_text(f"{header}\nC-1,c1@example.com,Ani,ya,1\n", encoding="utf-8")
        code, out = kembali(capsys, "--config", str(config), "import", "customers", str(path))
        # Then the missing column, or the unknown one, is named with each control character escaped: the file
        # without an email column is refused, the one with an unknown column imported with a warning
        assert code == exit_code, out
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out, repr(out)
        assert shown in out, out


def test_orders_whose_sum_is_too_large_for_the_customers_total_spent_are_rejected_rows(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a customer whose orders, each a valid amount, add up to more than a 64-bit total in minor units, beside
    # another customer's ordinary order in the same batch
    config = _config(tmp_path, db_url)
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\nC-2,c2@example.com,Budi,ya\n"
    )
    big = "999999999999999"  # about 10^17 minor units: the 93rd such order takes C-1's sum past 2^63 - 1
    rows = [f"B-{i},C-1,paid,2026-01-01,{big}\n" for i in range(95)]
    rows.insert(3, "B-C,C-1,cancelled,2026-01-01,999999999999999\n")  # a cancelled order does not count
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,total\n" + "".join(rows) + "O-2,C-2,paid,2026-01-02,1500\n"
    )
    assert kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))[0] == 0
    # When they are imported
    code, out = kembali(capsys, "--config", str(config), "import", "orders", str(tmp_path / "orders.csv"))
    # Then the orders that do not fit are rejected rows naming file, line and column (it was an "integer overflow"
    # or NumericValueOutOfRange traceback, and none of the batch imported, C-2's order neither)
    assert (code, "Traceback" in out) == (1, False), out
    too_large = ": total 999999999999999.00 IDR is too large: the orders of customer 'C-1' would add up to more " \
                "than 92233720368547758.07 IDR"  # fmt: skip
    assert f"orders.csv:95: id 'B-92'{too_large}" in out
    assert f"orders.csv:97: id 'B-94'{too_large}" in out
    assert "orders: 94 created, 0 updated, 0 unchanged, 3 rejected" in out
    assert _ids(db_url, "shop_order") == {"B-C", "O-2", *(f"B-{i}" for i in range(92))}
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            spent = dict(conn.execute(sa.text("select external_id, total_spent_minor from customer")).all())
    finally:
        engine.dispose()
    assert spent == {"C-1": 92 * 99999999999999900, "C-2": 150000}
    # and the same file imported again changes nothing, and rejects the same rows
    code, out = kembali(capsys, "--config", str(config), "import", "orders", str(tmp_path / "orders.csv"))
    assert code == 1 and "orders: 0 created, 0 updated, 94 unchanged, 3 rejected" in out, out
    assert f"orders.csv:96: id 'B-93'{too_large}" in out


def test_orders_in_another_currency_whose_sum_is_too_large_are_rejected_rows_and_the_currency_can_change(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a rupiah shop's orders file in which one customer has two absurd orders in CLF (four decimals: each
    # about 9 * 10^18 minor units, the two past 2^63 - 1), beside another customer's ordinary CLF order
    config = _config(tmp_path, db_url)
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\nC-2,c2@example.com,Budi,ya\n"
    )
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,currency,total\n"
        "F-1,C-1,paid,2026-01-01,CLF,900000000000000\n"
        "F-2,C-1,paid,2026-01-02,CLF,900000000000000\n"
        "O-3,C-2,paid,2026-01-03,CLF,12.5\n"
    )
    (tmp_path / "more.csv").write_text("order_id,customer_id,status,placed_at,currency,total\n"
                                       "O-4,C-2,paid,2026-01-04,CLF,1\n")  # fmt: skip
    assert kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))[0] == 0
    # When they are imported
    code, out = kembali(capsys, "--config", str(config), "import", "orders", str(tmp_path / "orders.csv"))
    # Then the order that takes C-1's CLF sum past what a total holds is a rejected row naming file, line and
    # column, as in the shop's currency (both were stored, and a later shop.currency = "CLF" failed every import
    # and every loyalty pass with "integer overflow" / "bigint out of range")
    assert (code, "Traceback" in out) == (1, False), out
    assert ("orders.csv:3: id 'F-2': total 900000000000000.0000 CLF is too large: the orders of customer 'C-1' "
            "would add up to more than 922337203685477.5807 CLF") in out, out
    assert "orders: 2 created, 0 updated, 0 unchanged, 1 rejected" in out, out
    # and the operator who then sets shop.currency = "CLF" imports the next file, every total counted in CLF
    config.write_text(config.read_text() + '\n[shop]\ncurrency = "CLF"\n', encoding="utf-8")
    code, out = kembali(capsys, "--config", str(config), "import", "orders", str(tmp_path / "more.csv"))
    assert (code, "Traceback" in out) == (0, False), out
    assert "counted again in CLF (2 changed)" in out, out
    spent = dict(_rows(db_url, "select external_id, total_spent_minor from customer"))
    assert spent == {"C-1": 9_000_000_000_000_000_000, "C-2": 13_5000}


def test_stored_orders_past_what_a_total_holds_block_no_import_and_are_named(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a database imported by an older Kembali, which stored C-1's two absurd CLF orders (together past
    # 2^63 - 1 minor units) in a rupiah shop, and an operator who now sets shop.currency = "CLF"
    config = _config(tmp_path, db_url)
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\nC-2,c2@example.com,Budi,ya\n"
    )
    assert kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))[0] == 0
    at = datetime(2026, 1, 1, tzinfo=UTC)
    engine = db.create_engine(db_url)
    try:
        stored_orders(engine, "C-1", [("F-1", "paid", 9 * 10**18, "CLF", at), ("F-2", "paid", 9 * 10**18, "CLF", at)])
    finally:
        engine.dispose()
    config.write_text(config.read_text() + '\n[shop]\ncurrency = "CLF"\n', encoding="utf-8")
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,currency,total\n"
        "O-1,C-2,paid,2026-01-03,CLF,12.5\n"
        "O-2,C-1,paid,2026-01-04,CLF,1\n"
        "O-3,C-1,paid,2026-01-04,IDR,1000\n"
        "F-2,C-1,cancelled,2026-01-01,CLF,900000000000000\n"
    )
    # When the next orders file is imported
    code, out = kembali(capsys, "--config", str(config), "import", "orders", str(tmp_path / "orders.csv"))
    # Then the recount does not fail the import ("integer overflow" / "bigint out of range", every import after
    # it too): C-1's total is the most a total holds, and the import names C-1
    assert (code, "Traceback" in out) == (1, False), out
    assert ("warning: the orders of customer 'C-1' in CLF add up to 922337203685477.5807 CLF or more, the most a "
            "spend total holds: counted as that much") in out, out
    # and the one order that would add to C-1's CLF sum is a rejected row; the rest imported, the cancellation
    # that brings the sum back within bounds too
    assert ("orders.csv:3: id 'O-2': total 1.0000 CLF is too large: the orders of customer 'C-1' would add up to "
            "more than 922337203685477.5807 CLF") in out, out
    assert "orders: 2 created, 1 updated, 0 unchanged, 1 rejected" in out, out
    spent = dict(_rows(db_url, "select external_id, total_spent_minor from customer"))
    assert spent == {"C-1": 9 * 10**18, "C-2": 12_5000}


def _screen(raw: str) -> list[str]:
    """The lines a terminal shows for ``raw``: a carriage return goes back to the start of the line, ESC [ K
    erases the rest of it."""
    lines = []
    for physical in raw.split("\n"):
        row: list[str] = []
        col = i = 0
        while i < len(physical):
            if physical.startswith("\x1b[K", i):
                del row[col:]
                i += 3
                continue
            if physical[i] == "\r":
                col = 0
            elif col < len(row):
                row[col] = physical[i]
                col += 1
            else:
                row.append(physical[i])
                col += 1
            i += 1
        lines.append("".join(row))
    return lines


def _on_a_terminal(config: Path, kind: str, path: Path, *, columns: int = 0) -> tuple[int, str]:
    """`kembali import KIND PATH` with its stderr on a terminal (``columns`` wide, 0: one that does not say): the
    exit code and what the terminal received."""
    code, raw = run_on_a_terminal(["--config", str(config), "import", kind, str(path)], stdout_too=False, timeout=60,
                                  columns=columns)  # fmt: skip
    return code, raw.decode()


def test_on_a_terminal_the_progress_line_is_cleared_before_a_rejected_row_or_a_warning(tmp_path: Path) -> None:
    # Given a customers file with a bad row and an unknown column, imported with stderr on a terminal
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent,phone\n"
        + "".join(f"C-{i},c{i}@example.com,Name {i},ya,0812\n" for i in range(5))
        + "C-5,not-an-address,Bad,ya,0812\n",
        encoding="utf-8",
    )
    code, raw = _on_a_terminal(config, "customers", tmp_path / "customers.csv")
    assert code == 1
    # Then each message is a line of its own (the first progress line was drawn, and "rejected customers.csv:7..."
    # written after it on the same line: "importing customers from customers.csv: 1 rows, 0 rejectedrejected ...")
    screen = [line for line in _screen(raw) if line]
    assert [line.split(":")[0] for line in screen] == ["warning", "rejected customers.csv"], screen
    assert screen[1].startswith("rejected customers.csv:7: id 'C-5': invalid email address 'not-an-address'")


class _StopOnWarning(io.StringIO):
    """stderr that sends this process SIGTERM when the first unknown-product warning is written: after the batch
    that warns is committed, before the import has counted it."""

    def write(self, text: str) -> int:
        if "unknown product" in text and "unknown product" not in self.getvalue():
            os.kill(os.getpid(), signal.SIGTERM)
        return super().write(text)


def test_a_stop_just_after_a_batch_is_committed_counts_the_batch_as_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an orders file of more than one batch, whose products are not imported (each order warns)
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_text("id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\n")
    assert kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))[0] == 0
    orders = importing.BATCH + 500
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,product_id,quantity,unit_price\n"
        + "".join(f"O-{i},C-1,paid,2026-01-01,P-1,1,1000\n" for i in range(orders)),
        encoding="utf-8",
    )
    # When SIGTERM arrives once the first batch is committed (as its first warning is written)
    stderr = _StopOnWarning()
    monkeypatch.setattr(sys, "stderr", stderr)
    code = main(["--config", str(config), "import", "orders", str(tmp_path / "orders.csv")])
    # Then what it says is in is what is in: the first batch (it said "none of orders.csv is imported", 0 created,
    # with 1000 orders in the database)
    assert code == 143, stderr.getvalue()
    assert f"stopped by SIGTERM: orders.csv is imported up to line {importing.BATCH + 1}, the rows after it are not " \
           f"({importing.BATCH:,} created, 0 updated, 0 unchanged, 0 rejected)" in stderr.getvalue()  # fmt: skip
    assert len(_ids(f"sqlite:///{tmp_path / 'k.db'}", "shop_order")) == importing.BATCH


def test_ctrl_c_pressed_again_while_a_batch_is_written_stops_the_import_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a customers file of two batches, whose second batch takes long to write (as one waiting for a lock)
    config = migrated_config(tmp_path)
    rows = importing.BATCH + 500
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent\n" + "".join(f"C-{i},c{i}@example.com,Name {i},ya\n" for i in range(rows)),
        encoding="utf-8",
    )
    real, batches = shop.upsert_customers, []

    def slow_second_batch(*args: Any, **kwargs: Any) -> Any:
        batches.append(len(batches) + 1)
        if len(batches) == 2:  # When the operator presses Ctrl-C while it is written, and again
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)  # (a person's second press: not the first's echo)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        return real(*args, **kwargs)

    monkeypatch.setattr(shop, "upsert_customers", slow_second_batch)
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))
    # Then the import stops at once, without that batch (the first press alone waits for it), and says so
    assert code == 130, out
    assert f"stopped by SIGINT: customers.csv is imported up to line {importing.BATCH + 1}, the rows after it are " \
           f"not ({importing.BATCH:,} created, 0 updated, 0 unchanged, 0 rejected)" in out  # fmt: skip
    assert len(_ids(f"sqlite:///{tmp_path / 'k.db'}", "customer")) == importing.BATCH


def test_a_second_stop_while_a_batch_waits_for_the_sqlite_write_lock_stops_the_import_at_once(tmp_path: Path) -> None:
    # Given an import whose first batch waits for the write lock another program holds on the SQLite file (up to
    # SQLite's busy timeout, 30 s)
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent\n" + "".join(f"C-{i},c{i}@example.com,Name {i},ya\n" for i in range(10)),
        encoding="utf-8",
    )
    locker = sqlite3.connect(tmp_path / "k.db", isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        child = subprocess.Popen(_import_command(config, "customers", tmp_path / "customers.csv"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not waiting_for_a_lock(child.pid):
                assert child.poll() is None and time.monotonic() < deadline, "the import never waited for the lock"
                time.sleep(0.02)
            # When Ctrl-C comes (it waits for the batch), and then SIGTERM
            child.send_signal(signal.SIGINT)
            signalled = time.monotonic()
            time.sleep(0.1)
            child.send_signal(signal.SIGTERM)
            _, err = child.communicate(timeout=60)
            waited = time.monotonic() - signalled
        finally:
            child.kill()
        locker.rollback()
    finally:
        locker.close()
    # Then the import stops without waiting out the lock (it waited the whole 30 s, in SQLite), saying what is in
    assert child.returncode == 130, err
    assert "stopped by SIGINT: none of customers.csv is imported" in err, err
    assert waited < db.SQLITE_BUSY_TIMEOUT_MS / 1000 / 2, waited
    assert _ids(f"sqlite:///{tmp_path / 'k.db'}", "customer") == set()


def test_the_progress_line_of_an_orders_import_counts_lines_read(tmp_path: Path) -> None:
    # Given orders of three lines each, their customer and products imported
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_text("id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\n")
    (tmp_path / "products.csv").write_text("id,name,price\nP-0,Tas,1000\nP-1,Topi,1000\nP-2,Sepatu,1000\n")
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,product_id,quantity,unit_price\n"
        + "".join(f"O-{i},C-1,paid,2026-01-01,P-{j},1,1000\n" for i in range(3) for j in range(3)),
        encoding="utf-8",
    )
    for kind in ("customers", "products"):
        assert subprocess.run(_import_command(config, kind, tmp_path / f"{kind}.csv"), timeout=60).returncode == 0
    # When they are imported on a terminal
    code, raw = _on_a_terminal(config, "orders", tmp_path / "orders.csv")
    # Then the progress line, drawn at the first order, says how far into the file it is, in lines (it said
    # "1 rows" after the first order's three rows)
    assert code == 0
    first = next(drawn for drawn in (part.lstrip("\r") for part in raw.split("\x1b[K")) if "lines read" in drawn)
    assert first == "importing orders from orders.csv: 4 lines read, 0 rejected, 100.0% of 384 B", raw


def test_on_a_terminal_the_import_says_how_much_of_the_file_is_read(tmp_path: Path) -> None:
    # Given a customers file of 3,000 rows (a 2-million-row export showed "N lines read" for half an hour, with no
    # way to tell how far along it was)
    config = migrated_config(tmp_path)
    path = tmp_path / "customers.csv"
    _customers(path, 3000)
    # When it is imported on a terminal 120 columns wide
    code, raw = _on_a_terminal(config, "customers", path, columns=120)
    # Then the progress line says what share of the file's bytes is read, and of how many
    assert code == 0, raw
    drawn = [part.lstrip("\r") for part in raw.split("\x1b[K") if "lines read" in part]
    first = re.fullmatch(r"importing customers from customers\.csv: 2 lines read, 0 rejected, ([0-9.]+)% of (\S+) kB",
                         drawn[0])  # fmt: skip
    assert first is not None, drawn
    assert 0 < float(first[1]) < 100 and first[2] == f"{path.stat().st_size / 1000:.3g}", drawn
    # and it is erased at the end: the summary (on stdout) and the shell's prompt start a line of their own
    assert raw.endswith("\r\x1b[K"), raw


def test_the_read_position_of_an_import_is_its_bytes_read_of_the_file_and_unknown_for_a_pipe(tmp_path: Path) -> None:
    # Given a customers file of 2,000 rows
    path = tmp_path / "customers.csv"
    _customers(path, 2000)
    size = path.stat().st_size
    # When it is read, the position asked at each row
    position = importer.ReadPosition()
    seen = [position() for _ in importer.numbered_customers(path, position=position)]
    # Then it is the bytes read so far of the file's size, growing up to all of it
    assert all(at is not None and at[1] == size for at in seen), seen[:3]
    reads = [at[0] for at in seen if at is not None]
    assert reads == sorted(reads) and 0 < reads[0] < size and reads[-1] == size, (reads[0], reads[-1], size)

    # Given the same rows from a pipe, whose size is not known ahead
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(path.read_bytes()))
    writer.start()
    position = importer.ReadPosition()
    seen = [position() for _ in importer.numbered_customers(fifo, position=position)]
    writer.join()
    # Then there is none to tell, but every row is read
    assert len(seen) == 2000 and set(seen) == {None}


def test_on_a_terminal_the_orders_import_shows_its_first_read_of_the_file(tmp_path: Path) -> None:
    # Given orders, their customer and product imported
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_text("id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\n")
    (tmp_path / "products.csv").write_text("id,name,price\nP-0,Tas,1000\n")
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,product_id,quantity,unit_price\n"
        + "".join(f"O-{i},C-1,paid,2026-01-01,P-0,1,1000\n" for i in range(3)),
        encoding="utf-8",
    )
    for kind in ("customers", "products"):
        assert subprocess.run(_import_command(config, kind, tmp_path / f"{kind}.csv"), timeout=60).returncode == 0
    # When they are imported on a terminal
    code, raw = _on_a_terminal(config, "orders", tmp_path / "orders.csv")
    # Then the file's first read (for orders whose rows are apart) has a progress line of its own, as the import
    # has, where a large file showed nothing for as long as that read took; the import's line is drawn after it
    assert code == 0
    drawn = [part.lstrip("\r") for part in raw.split("\x1b[K") if part.strip("\r")]
    # (on a terminal that does not say its width, taken as 80 columns wide: the words are cut short to fit)
    assert drawn[0] == "importing orders from orders.csv: 2 lines checked for orders whose row…, 100.0%", raw
    assert drawn[1] == "importing orders from orders.csv: 2 lines read, 0 rejected, 100.0% of 174 B", raw


def test_orders_in_another_currency_count_as_orders_but_not_as_spend(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an IDR shop (the default) whose export holds orders in US dollars and Singapore dollars beside rupiah
    config = _config(tmp_path, db_url)
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\nC-2,c2@example.com,Budi,ya\n"
    )
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,currency,total\n"
        "O-1,C-1,paid,2026-01-01,IDR,150000\n"
        "O-2,C-1,paid,2026-01-02,USD,4999\n"
        "O-3,C-2,paid,2026-01-03,SGD,20\n"
        "O-4,C-2,paid,2026-01-04,USD,1\n"
    )
    assert kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))[0] == 0
    # When the orders are imported
    code, out = kembali(capsys, "--config", str(config), "import", "orders", str(tmp_path / "orders.csv"))
    # Then every order is in, and one warning says which are not in rupiah and what that means
    assert code == 0 and "orders: 4 created, 0 updated, 0 unchanged, 0 rejected" in out, out
    assert ("warning: orders.csv: 3 orders are in another currency than the shop's IDR (SGD 1, USD 2; the first on "
            "line 3): they count as orders, but not toward spend milestones nor the revenue stats shows") in out, out
    # and each customer's spend adds up their rupiah only (USD 49.99 was added as Rp49,99), while every order counts
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("select external_id, order_count, total_spent_minor from customer")).all()
    finally:
        engine.dispose()
    assert sorted(map(tuple, rows)) == [("C-1", 2, 15_000_000), ("C-2", 2, 0)]


def _rows(url: str, query: str) -> list[tuple[object, ...]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(query))]
    finally:
        engine.dispose()


def test_a_file_without_an_optional_column_leaves_what_is_stored_in_it(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given customers and products imported with every column
    config = _config(tmp_path, db_url)
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent,locale,time_zone,birthday,consent_basis,consent_source\n"
        "C-1,c1@example.com,Ani,ya,en,Asia/Makassar,1990-02-28,opt_in,checkout\n",
        encoding="utf-8",
    )
    (tmp_path / "products.csv").write_text(
        "id,name,price,category,url,image_url,launched_at,active\n"
        "P-1,Tas,1000,Tas,https://toko.example/p/1,https://toko.example/i/1.jpg,2026-01-02,no\n",
        encoding="utf-8",
    )
    for kind in ("customers", "products"):
        assert kembali(capsys, "--config", str(config), "import", kind, str(tmp_path / f"{kind}.csv"))[0] == 0
    # When a later file holds only some columns: a consent update, a price update
    (tmp_path / "consent.csv").write_text("id,email,name,marketing_consent\nC-1,c1@example.com,Ani,tidak\n",
                                          encoding="utf-8")  # fmt: skip
    (tmp_path / "prices.csv").write_text("id,name,price\nP-1,Tas,2000\n", encoding="utf-8")
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "consent.csv"))
    assert (code, "customers: 0 created, 1 updated, 0 unchanged, 0 rejected" in out) == (0, True), out
    code, out = kembali(capsys, "--config", str(config), "import", "products", str(tmp_path / "prices.csv"))
    assert (code, "products: 0 created, 1 updated, 0 unchanged, 0 rejected" in out) == (0, True), out
    # Then the columns the files have are updated, and those they lack keep their values (the customer's language,
    # zone and birthday were reset to the shop's and lost; the discontinued product was made active again)
    customer = _rows(db_url, "select marketing_consent, locale, time_zone, birthday, consent_basis, consent_source "
                             "from customer")  # fmt: skip
    assert [(bool(c[0]), *map(str, c[1:])) for c in customer] == [
        (False, "en", "Asia/Makassar", "1990-02-28", "opt_in", "checkout")
    ]
    product = _rows(db_url, "select price_minor, category, url, image_url, launched_at, active from product")
    assert [(p[0], p[1], p[2], p[3], p[4] is not None, bool(p[5])) for p in product] == [
        (200000, "Tas", "https://toko.example/p/1", "https://toko.example/i/1.jpg", True, False)
    ]
    # and importing the partial files again changes nothing
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "consent.csv"))
    assert "customers: 0 created, 0 updated, 1 unchanged, 0 rejected" in out, out


def test_an_unclear_marketing_consent_is_saved_as_no_consent_and_reported_by_line(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given customers who agreed to marketing
    config = _config(tmp_path, db_url)
    path = tmp_path / "customers.csv"
    rows = "".join(f"C-{i},c{i}@example.com,N {i},ya\n" for i in range(4))
    path.write_text("id,email,name,marketing_consent\n" + rows, encoding="utf-8")
    assert kembali(capsys, "--config", str(config), "import", "customers", str(path))[0] == 0
    # When the shop's next export says something else than yes or no for three of them (a shop's own words, an
    # empty cell) and brings a new customer whose answer is unclear too
    path.write_text(
        "id,email,name,marketing_consent\n"
        "C-0,c0@example.com,N 0,unsubscribed\n"
        "C-1,c1@example.com,N 1,\n"
        "C-2,c2@example.com,N 2,ya\n"
        "C-3,c3@example.com,N 3,Y\n"
        "C-4,c4@example.com,N 4,subscribed\n",
        encoding="utf-8",
    )
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(path))
    # Then each unclear answer is named at its line and saved as no consent (the rows were rejected, and the
    # customers who had said yes kept getting marketing mail), and the import exits 1: something needs the operator
    assert code == 1, out
    unclear = ((2, "C-0", "'unsubscribed'"), (3, "C-1", "''"), (5, "C-3", "'Y'"), (6, "C-4", "'subscribed'"))
    for line, key, value in unclear:
        assert f"customers.csv:{line}: id {key!r}: unclear marketing_consent {value}" in out, out
    assert out.count("saved as no consent") == 4, out
    assert "customers: 1 created, 3 updated, 1 unchanged, 0 rejected, 4 with an unclear marketing_consent" in out, out
    consent = dict(_rows(db_url, "select external_id, marketing_consent from customer"))
    assert {k: bool(v) for k, v in consent.items()} == {"C-0": False, "C-1": False, "C-2": True, "C-3": False,
                                                        "C-4": False}  # fmt: skip


def test_an_order_placed_or_delivered_in_the_future_is_a_rejected_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a customer, and orders of which two carry a date in the future (a mistyped year)
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_text("id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\n")
    assert kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))[0] == 0
    placed = datetime.now(UTC).isoformat(timespec="seconds")  # O-4's, a moment before the import's now
    today = date.fromisoformat(placed[:10])
    year_ago, later = today - timedelta(days=365), date(2099, 1, 1)
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,delivered_at,total\n"
        f"O-1,C-1,delivered,{year_ago},{year_ago},1000\n"
        f"O-2,C-1,paid,{later},,1000\n"
        f"O-3,C-1,delivered,{today},{later},1000\n"
        f"O-4,C-1,paid,{placed},,1000\n"
    )
    # When they are imported
    code, out = kembali(capsys, "--config", str(config), "import", "orders", str(tmp_path / "orders.csv"))
    # Then the two are rejected, named by line and column (an order of 2099 was the customer's last order: no
    # win-back would ever reach them), and the others are imported
    assert code == 1, out
    assert "orders.csv:3: id 'O-2': invalid placed_at '2099-01-01' (in the future" in out, out
    assert "orders.csv:4: id 'O-3': invalid delivered_at '2099-01-01' (in the future" in out, out
    assert "orders: 2 created, 0 updated, 0 unchanged, 2 rejected" in out, out
    last = _rows(f"sqlite:///{tmp_path / 'k.db'}", "select last_order_at from customer")
    assert str(last[0][0])[:10] == placed[:10], last  # O-4's (the day it was placed, also a run over midnight)


def test_an_order_placed_before_any_web_shop_is_a_rejected_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given orders dated at the Unix epoch (an export's placeholder for a date it does not know), in the year 26 (a
    # two-digit year saved as four) and in 1989, and one of 1999
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\nC-2,c2@example.com,Budi,ya\n"
        "C-3,c3@example.com,Cici,ya\nC-4,c4@example.com,Dodi,ya\n"
    )
    assert kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))[0] == 0
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,total\n"
        "O-1,C-1,paid,1970-01-01T00:00:00Z,1000\n"
        "O-2,C-2,paid,0026-09-01,1000\n"
        "O-3,C-3,paid,1989-06-30 10:00:00,1000\n"
        "O-4,C-4,paid,1999-12-31,1000\n"
    )
    # When they are imported
    code, out = kembali(capsys, "--config", str(config), "import", "orders", str(tmp_path / "orders.csv"))
    # Then the first three are rejected, named by line and column (each was its customer's only order, decades
    # old: a win-back's last step at once, and `insights` recommending a first win-back day 739,832 days on)
    assert code == 1, out
    for line, key, value in ((2, "O-1", "1970-01-01T00:00:00Z"), (3, "O-2", "0026-09-01"),
                             (4, "O-3", "1989-06-30 10:00:00")):  # fmt: skip
        assert f"orders.csv:{line}: id {key!r}: invalid placed_at {value!r} (before 1990: no web shop took orders " \
            "then; a placeholder for a date not known, such as the Unix epoch 1970-01-01? check the year)" in out, out
    assert "orders: 1 created, 0 updated, 0 unchanged, 3 rejected" in out, out
    assert _rows(f"sqlite:///{tmp_path / 'k.db'}", "select external_id from shop_order") == [("O-4",)]


def test_a_placeholder_birthday_of_an_age_no_one_reaches_is_left_out_with_a_warning_saying_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an export whose shop wrote 1900-01-01 for a birthday it does not know, and a customer of 100
    config = migrated_config(tmp_path)
    today = datetime.now(UTC).date()
    hundred = date(today.year - 100, 1, 1)
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent,birthday\n"
        "C-1,c1@example.com,Ani,ya,1900-01-01\n"
        f"C-2,c2@example.com,Budi,ya,{hundred}\n"
    )
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))
    # Then the placeholder is a warning saying what it looks like (as a birthday, it gave a birthday offer every
    # 1 January to a customer whose birthday no one knows), and the customer is imported without it (it was a
    # rejected row: a customer lost for a column the shop does not even know), as the customer of 100 is with it
    assert code == 1, out
    assert (f"warning: customers.csv:2: id 'C-1': invalid birthday '1900-01-01' (an age of {today.year - 1900}, "
            "over 120: a placeholder for a birthday not known? leave the cell empty); the customer is imported "
            "without it") in out, out  # fmt: skip
    assert "customers: 2 created, 0 updated, 0 unchanged, 0 rejected, 1 imported without their birthday" in out, out
    born = dict(_rows(f"sqlite:///{tmp_path / 'k.db'}", "select external_id, birthday from customer"))
    assert {key: str(value) for key, value in born.items()} == {"C-1": "None", "C-2": str(hundred)}


def test_a_birthday_in_the_future_is_left_out_with_a_warning_and_the_customer_imported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given customers, one born "in 2030" (a mistyped year), one yesterday, one before 1900, one on 30 February,
    # one in a spreadsheet's local form
    config = migrated_config(tmp_path)
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    later = date(datetime.now(UTC).year + 4, 1, 1)
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent,time_zone,birthday\n"
        f"C-1,c1@example.com,Ani,ya,,{later}\n"
        f"C-2,c2@example.com,Budi,ya,Pacific/Kiritimati,{yesterday}\n"
        "C-3,c3@example.com,Sari,ya,,1899-12-31\n"
        "C-4,c4@example.com,Dewi,ya,,1990-05-01\n"
        "C-5,c5@example.com,Eka,ya,,1990-02-30\n"
        "C-6,c6@example.com,Fitri,ya,,12/31/1990\n"
    )
    # When they are imported
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))
    # Then each birthday that cannot be one is a warning naming the file, line, column and value, and every
    # customer is imported (a bad birthday rejected the whole customer), the bad birthdays left out: a customer
    # without one is never chosen for a birthday offer; the import exits 1, something needs the operator
    assert code == 1, out
    assert f"warning: customers.csv:2: id 'C-1': invalid birthday '{later}' (in the future: after today, " in out, out
    assert "warning: customers.csv:4: id 'C-3': invalid birthday '1899-12-31' (year before 1900)" in out, out
    assert "warning: customers.csv:6: id 'C-5': invalid birthday '1990-02-30' (day is out of range" in out, out
    assert "warning: customers.csv:7: id 'C-6': invalid birthday '12/31/1990' (a date as a spreadsheet shows" in out
    assert "rejected" not in out.replace("0 rejected", ""), out
    assert "customers: 6 created, 0 updated, 0 unchanged, 0 rejected, 4 imported without their birthday" in out, out
    born = dict(_rows(f"sqlite:///{tmp_path / 'k.db'}", "select external_id, birthday from customer"))
    assert {key: str(value) for key, value in born.items()} == {
        "C-1": "None", "C-2": str(yesterday), "C-3": "None", "C-4": "1990-05-01", "C-5": "None", "C-6": "None",
    }  # fmt: skip


def test_a_bad_birthday_imported_again_keeps_the_birthday_stored_before(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a customer imported with a good birthday
    config = migrated_config(tmp_path)
    path = tmp_path / "customers.csv"
    path.write_text("id,email,name,marketing_consent,birthday\nC-1,c1@example.com,Ani,ya,1990-05-01\n")
    assert kembali(capsys, "--config", str(config), "import", "customers", str(path))[0] == 0
    # When a later export gives a placeholder for it (and a new name)
    path.write_text("id,email,name,marketing_consent,birthday\nC-1,c1@example.com,Ani Lestari,ya,1900-01-01\n")
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(path))
    # Then the name is updated, the birthday stored before kept (not wiped by one that is no birthday), with a
    # warning saying so
    assert code == 1, out
    assert "warning: customers.csv:2: id 'C-1': invalid birthday '1900-01-01'" in out, out
    assert "(a birthday stored before is kept)" in out, out
    assert "customers: 0 created, 1 updated, 0 unchanged, 0 rejected, 1 imported without their birthday" in out, out
    stored = _rows(f"sqlite:///{tmp_path / 'k.db'}", "select name, birthday from customer")
    assert [(name, str(born)) for name, born in stored] == [("Ani Lestari", "1990-05-01")]
    # And an empty cell, which says "no birthday", still clears it
    path.write_text("id,email,name,marketing_consent,birthday\nC-1,c1@example.com,Ani Lestari,ya,\n")
    assert kembali(capsys, "--config", str(config), "import", "customers", str(path))[0] == 0
    assert _rows(f"sqlite:///{tmp_path / 'k.db'}", "select birthday from customer") == [(None,)]


def test_a_bad_time_zone_or_locale_is_left_out_with_a_warning_and_the_customer_imported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given customers, one in a mistyped zone, one in a zone no name is near, one speaking a language the shop has
    # no templates in, and one as they should be
    config = migrated_config(tmp_path)
    (tmp_path / "config.toml").write_text(
        (tmp_path / "config.toml").read_text() + '[shop]\ntime_zone = "Asia/Makassar"\ndefault_locale = "en"\n')
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent,locale,time_zone\n"
        "C-1,c1@example.com,Ani,ya,id,Asia/Jakata\n"
        "C-2,c2@example.com,Budi,ya,id,GMT+7\n"
        "C-3,c3@example.com,Sari,ya,fr-FR,Asia/Jakarta\n"
        "C-4,c4@example.com,Dewi,ya,id,Asia/Jakarta\n"
    )
    # When they are imported
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))
    # Then each value that cannot be read is a warning naming the file, line, column and value (with the zone it
    # looks like, if any), and every customer is imported (a bad zone or locale rejected the whole customer: never
    # emailed), with the shop's zone or language, as a customer with an empty cell is; the import exits 1
    assert code == 1, out
    assert ("warning: customers.csv:2: id 'C-1': invalid time_zone 'Asia/Jakata' (expected an IANA name such as "
            "'Asia/Jakarta'; did you mean 'Asia/Jakarta'?); the customer is imported with the shop's "
            "(a time_zone stored before is kept)") in out, out  # fmt: skip
    assert ("warning: customers.csv:3: id 'C-2': invalid time_zone 'GMT+7' (expected an IANA name such as "
            "'Asia/Jakarta'); the customer is imported with the shop's") in out, out
    assert ("warning: customers.csv:4: id 'C-3': invalid locale 'fr-FR' (expected id or en, or a tag of either with "
            "its region: id-ID, en_US); the customer is imported with the shop's (a locale stored before is "
            "kept)") in out, out  # fmt: skip
    assert "rejected" not in out.replace("0 rejected", ""), out
    assert ("customers: 4 created, 0 updated, 0 unchanged, 0 rejected, 2 imported without their time_zone, "
            "1 imported without their locale") in out, out  # fmt: skip
    stored = _rows(f"sqlite:///{tmp_path / 'k.db'}", "select external_id, locale, time_zone from customer")
    assert sorted(stored) == [("C-1", "id", "Asia/Makassar"), ("C-2", "id", "Asia/Makassar"),
                              ("C-3", "en", "Asia/Jakarta"), ("C-4", "id", "Asia/Jakarta")]


def test_a_bad_time_zone_or_locale_imported_again_keeps_the_one_stored_before(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a customer imported with a good zone and language
    config = migrated_config(tmp_path)
    path = tmp_path / "customers.csv"
    path.write_text("id,email,name,marketing_consent,locale,time_zone\nC-1,c1@example.com,Ani,ya,en,Asia/Jayapura\n")
    assert kembali(capsys, "--config", str(config), "import", "customers", str(path))[0] == 0
    # When a later export mistypes both (and gives a new name)
    path.write_text("id,email,name,marketing_consent,locale,time_zone\nC-1,c1@example.com,Ani Lestari,ya,english,"
                    "WIT\n")
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(path))
    # Then the name is updated, the zone and language stored before kept (not replaced by the shop's), with a
    # warning for each
    assert code == 1, out
    assert "warning: customers.csv:2: id 'C-1': invalid time_zone 'WIT'" in out, out
    assert "did you mean 'Asia/Jayapura'?); the customer is imported with the shop's" in out, out
    assert "warning: customers.csv:2: id 'C-1': invalid locale 'english'" in out, out
    assert ("customers: 0 created, 1 updated, 0 unchanged, 0 rejected, 1 imported without their time_zone, "
            "1 imported without their locale") in out, out  # fmt: skip
    stored = _rows(f"sqlite:///{tmp_path / 'k.db'}", "select name, locale, time_zone from customer")
    assert stored == [("Ani Lestari", "en", "Asia/Jayapura")]
    # And an empty cell, which says "the shop's", still gives the shop's
    path.write_text("id,email,name,marketing_consent,locale,time_zone\nC-1,c1@example.com,Ani Lestari,ya,,\n")
    assert kembali(capsys, "--config", str(config), "import", "customers", str(path))[0] == 0
    assert _rows(f"sqlite:///{tmp_path / 'k.db'}", "select locale, time_zone from customer") == [("id", "Asia/Jakarta")]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"], ids=["bom", "le", "be"])
def test_a_utf16_file_from_excels_unicode_text_is_named_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], encoding: str
) -> None:
    # Given customers saved by Excel as "Unicode Text" (UTF-16, tab-separated; with a BOM or, from other tools,
    # without one)
    config = migrated_config(tmp_path)
    path = tmp_path / "customers.txt"
    path.write_bytes("id\temail\tname\tmarketing_consent\r\nC-1\tc1@example.com\tAni\tya\r\n".encode(encoding))
    # When it is imported
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(path))
    # Then the encoding is named with what to do (it said "not UTF-8 text: byte 0xff", or listed the columns it
    # found as '\u0000i\u0000d\u0000…')
    assert (code, out.strip()) == (2, "kembali import: customers.txt: line 1: customers.txt is UTF-16 text "
                                      "(Excel's 'Unicode Text'): save the sheet as 'CSV UTF-8'")  # fmt: skip


def test_text_decoded_in_another_encoding_and_saved_as_utf8_is_a_rejected_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a file a spreadsheet opened as Windows-1252 and saved back as UTF-8: 'Béni' became 'BÃ©ni' (valid
    # UTF-8, so nothing else catches it), beside names that are right in any script
    config = migrated_config(tmp_path)
    path = tmp_path / "customers.csv"
    names = ["Béni Müller", "São Paulo", "Nguyễn Văn An", "王小明", "Łukasz Żak", "Ani 😀"]
    rows = "".join(f"C-{i},c{i}@example.com,{name},ya\n" for i, name in enumerate(names))
    broken = "Béni Müller".encode().decode("cp1252") + " \u2013 Łukasz".encode().decode("latin-1")
    path.write_text(f"id,email,name,marketing_consent\n{rows}C-9,c9@example.com,{broken},ya\n", encoding="utf-8")
    # When it is imported
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(path))
    # Then that row is rejected, naming the column and what the text was (it was stored, and greeted the customer
    # as 'BÃ©ni'), and the others are imported as written
    assert code == 1, out
    assert "customers.csv:8: id 'C-9': column 3 'name' 'BÃ©ni" in out, out
    assert "reads 'Béni Müller \u2013 Łukasz' in UTF-8" in out, out
    assert "customers: 6 created, 0 updated, 0 unchanged, 1 rejected" in out, out
    stored = _rows(f"sqlite:///{tmp_path / 'k.db'}", "select name from customer order by external_id")
    assert [name for (name,) in stored] == names


def test_bytes_that_are_not_utf8_in_a_column_kembali_ignores_reject_no_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a shop's export saved by a spreadsheet in Windows-1252, with columns Kembali does not read (an address,
    # a note) beside the ones it does: names in ASCII, as most are, and one that is not
    config = migrated_config(tmp_path)
    path = tmp_path / "customers.csv"
    path.write_bytes("id,email,name,marketing_consent,alamat,catatan\n"
                     "C-1,c1@example.com,Ani,ya,Jl. Kenari,ok\n"
                     "C-2,c2@example.com,Budi,ya,Caf\u00e9 Menteng,ok\n"  # a byte 0xe9 in 'alamat'
                     "C-3,c3@example.com,Citra,ya,Jl. Melati,pesan \u2013 kirim cepat\n"  # 0x96 in 'catatan'
                     "C-4,c4@example.com,Andr\u00e9,ya,Jl. Mawar,ok\n".encode("cp1252")  # 0xe9 in 'name'
                     + b"C-5,c5@example.com,Dewi,ya,Jl. Anggrek," + "Béni".encode().decode("cp1252").encode()
                     + b"\n")  # fmt: skip
    # When it is imported
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(path))
    # Then only the row whose name cannot be read is rejected: those were rejected too, for bytes in a column that
    # is ignored (it said "not UTF-8 text: byte 0xe9 in column 5 'alamat'")
    assert code == 1, out
    assert "customers.csv:5: id 'C-4': not UTF-8 text: byte 0xe9 in column 3 'name'" in out, out
    assert "alamat" not in out.replace("unknown column(s) 'alamat'", ""), out
    assert "customers: 4 created, 0 updated, 0 unchanged, 1 rejected" in out, out
    assert _ids(f"sqlite:///{tmp_path / 'k.db'}", "customer") == {"C-1", "C-2", "C-3", "C-5"}


def test_an_orders_file_without_delivered_at_leaves_the_delivery_dates_stored(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an order imported with its delivery date
    config = _config(tmp_path, db_url)
    (tmp_path / "customers.csv").write_text("id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\n")
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,delivered_at,total\nO-1,C-1,paid,2026-01-02T10:00+07:00,"
        "2026-01-05T10:00+07:00,1000\n"
    )
    for kind in ("customers", "orders"):
        assert kembali(capsys, "--config", str(config), "import", kind, str(tmp_path / f"{kind}.csv"))[0] == 0
    # When a later export without the column (a shop system that does not know it) brings the order's new status
    (tmp_path / "later.csv").write_text("order_id,customer_id,status,placed_at,total\n"
                                        "O-1,C-1,delivered,2026-01-02T10:00+07:00,1000\n")  # fmt: skip
    code, out = kembali(capsys, "--config", str(config), "import", "orders", str(tmp_path / "later.csv"))
    assert (code, "orders: 0 created, 1 updated, 0 unchanged, 0 rejected" in out) == (0, True), out
    # Then the status is updated and the delivery date kept (it was emptied, and the feedback request counted its
    # days from the purchase instead), and the same file again changes nothing
    [(status, delivered, settled)] = _rows(db_url, "select status, delivered_at, settled_at from shop_order")
    assert (status, str(delivered)[:16], str(settled)[:16]) == ("delivered", "2026-01-05 03:00", "2026-01-05 03:00")
    code, out = kembali(capsys, "--config", str(config), "import", "orders", str(tmp_path / "later.csv"))
    assert "orders: 0 created, 0 updated, 1 unchanged, 0 rejected" in out, out


def test_a_file_without_a_currency_column_is_in_the_shops_currency_not_rupiah(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a shop that sells in US dollars, with a product imported with its currency
    config = tmp_path / "config.toml"
    config.write_text(f'[shop]\ncurrency = "USD"\n[database]\nurl = "{db_url}"\n', encoding="utf-8")
    (tmp_path / "products.csv").write_text("id,name,price,currency\nP-1,Mug,19.99,USD\n", encoding="utf-8")
    (tmp_path / "customers.csv").write_text("id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\n")
    for kind in ("products", "customers"):
        assert kembali(capsys, "--config", str(config), "import", kind, str(tmp_path / f"{kind}.csv"))[0] == 0
    # When a price update and the orders come in files without a currency column
    (tmp_path / "prices.csv").write_text("id,name,price\nP-1,Mug,24.99\nP-2,Cup,5\n", encoding="utf-8")
    (tmp_path / "orders.csv").write_text("order_id,customer_id,status,placed_at,total\nO-1,C-1,paid,2026-01-01,24.99\n",
                                         encoding="utf-8")  # fmt: skip
    code, out = kembali(capsys, "--config", str(config), "import", "products", str(tmp_path / "prices.csv"))
    assert (code, "products: 1 created, 1 updated, 0 unchanged, 0 rejected" in out) == (0, True), out
    code, out = kembali(capsys, "--config", str(config), "import", "orders", str(tmp_path / "orders.csv"))
    # Then their amounts are the shop's dollars: the products were reset to rupiah (Rp24,99 for a $24.99 mug in
    # every email), and the order counted as one "in another currency than the shop's", adding nothing to spend
    assert (code, "another currency" in out) == (0, False), out
    assert sorted(_rows(db_url, "select external_id, price_minor, currency from product")) == [
        ("P-1", 2499, "USD"), ("P-2", 500, "USD")]
    assert _rows(db_url, "select currency, total_minor from shop_order") == [("USD", 2499)]
    assert _rows(db_url, "select total_spent_minor from customer") == [(2499,)]


def test_one_address_in_customers_whose_consents_disagree_is_reported_and_all_are_imported(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an export where one mailbox (written in two cases) is two customers, one who said yes and one who said
    # no, and another shared by two customers who agree
    config = _config(tmp_path, db_url)
    path = tmp_path / "customers.csv"
    path.write_text(
        "id,email,name,marketing_consent\n"
        "C-1,siti@example.com,Siti,ya\n"
        "C-2,budi@example.com,Budi,ya\n"
        "C-3,Siti@Example.COM,Ibu Siti,tidak\n"
        "C-4,budi@example.com,Budi Jr,yes\n",
        encoding="utf-8",
    )
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(path))
    # Then every customer is imported as given, and the disagreement is named at its line with the other line (it
    # went unsaid: the mailbox whose owner said no kept getting the other customer's marketing mail); exit 1
    assert code == 1, out
    assert ("warning: customers.csv:4: id 'C-3': marketing_consent no here, yes at line 2 for the same address "
            "'siti@example.com'") in out, out
    assert out.count("same address") == 1, out
    assert "customers: 4 created, 0 updated, 0 unchanged, 0 rejected, 1 sharing an address with another " \
           "marketing_consent" in out, out
    consent = dict(_rows(db_url, "select external_id, marketing_consent from customer"))
    assert {k: bool(v) for k, v in consent.items()} == {"C-1": True, "C-2": True, "C-3": False, "C-4": True}


def test_orders_imported_after_shop_currency_changed_count_every_customers_spend_in_the_new_one(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a shop selling in dollars, imported while the config still had the default currency (IDR)
    config = _config(tmp_path, db_url)
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\nC-2,c2@example.com,Budi,ya\n"
    )
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,currency,total\nO-1,C-1,paid,2026-01-01,USD,120.50\n"
    )
    (tmp_path / "more.csv").write_text("order_id,customer_id,status,placed_at,currency,total\n"
                                       "O-2,C-2,paid,2026-01-02,USD,7.00\n")  # fmt: skip
    for kind, name in (("customers", "customers.csv"), ("orders", "orders.csv")):
        assert kembali(capsys, "--config", str(config), "import", kind, str(tmp_path / name))[0] == 0
    # When the operator sets shop.currency = "USD" and imports the next day's orders (C-2's only)
    config.write_text(config.read_text() + '\n[shop]\ncurrency = "USD"\n', encoding="utf-8")
    code, out = kembali(capsys, "--config", str(config), "import", "orders", str(tmp_path / "more.csv"))
    # Then every customer's spend counts dollars, C-1's too, whose orders were not in this file, and the import
    # says so once
    assert code == 0, out
    assert "note: shop.currency is USD, the customers' spend totals counted IDR: counted again in USD " \
           "(1 changed)" in out  # fmt: skip
    assert dict(_rows(db_url, "select external_id, total_spent_minor from customer")) == {"C-1": 12050, "C-2": 700}
    code, out = kembali(capsys, "--config", str(config), "import", "orders", str(tmp_path / "more.csv"))
    assert code == 0 and "counted again" not in out, out


def _customers(path: Path, n: int) -> Path:
    rows = "".join(f"C-{i},c{i}@example.com,Ani {i},ya\n" for i in range(1, n + 1))
    path.write_text("id,email,name,marketing_consent\n" + rows, encoding="utf-8")
    return path


@pytest.fixture
def on_each_connection() -> Any:
    """Statements to run on each connection the command opens (SQLite's limits are the connection's own)."""
    listeners: list[Any] = []

    def add(*statements: str) -> None:
        def run(dbapi_connection: Any, _record: Any) -> None:
            for statement in statements:
                dbapi_connection.execute(statement)

        sa.event.listen(sa.Engine, "connect", run)
        listeners.append(run)

    yield add
    for run in listeners:
        sa.event.remove(sa.Engine, "connect", run)


@pytest.mark.parametrize("case", ["full", "read-only", "locked"])
def test_a_batch_sqlite_refuses_is_named_with_what_happened_and_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, case: str,
    on_each_connection: Any,
) -> None:
    # Given a SQLite file that cannot take the import's rows: full (its size capped where it stands, as a full disk
    # stops it), read-only (as a file the user cannot write; chmod does not stop root, PRAGMA query_only does), or
    # locked by another writer for longer than SQLite waits (0.2 s here, 30 s as shipped)
    config = migrated_config(tmp_path)
    path = _customers(tmp_path / "customers.csv", 3000 if case == "full" else 2)
    database = tmp_path / "k.db"
    holder = sqlite3.connect(database, isolation_level=None)
    try:
        if case == "full":
            pages = holder.execute("PRAGMA page_count").fetchone()[0]
            on_each_connection(f"PRAGMA max_page_count = {pages}")
        elif case == "read-only":
            on_each_connection("PRAGMA query_only = ON")
        else:
            monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 200)
            holder.execute("BEGIN IMMEDIATE")
        # When the customers are imported
        code, printed = kembali(capsys, "--config", str(config), "import", "customers", str(path))
    finally:
        holder.close()
    # Then it stops with exit 3, saying what happened and what to do about it, where it said "the database failed"
    expected = {
        "full": ("the database is full (SQLite: database or disk is full)",
                 f"Free space on the disk that holds {database}."),
        "read-only": ("the database cannot be written (SQLite: attempt to write a readonly database)",
                      f"Let the user running kembali write {database} and its folder"),
        "locked": ("another program held the database's write lock longer than the 0.2 s SQLite waits for it "
                   "(SQLite: database is locked)", "Wait for the other writer to finish"),
    }[case]  # fmt: skip
    assert code == 3, printed
    assert f"kembali import: stopped: {expected[0]}: none of customers.csv is imported (0 created" in printed, printed
    assert f"0 rejected). {expected[1]}" in printed, printed
    assert "Import the file again to finish: the rows already imported are left unchanged." in printed, printed
    assert "database failed" not in printed and "Traceback" not in printed, printed


@pytest.mark.postgres
@pytest.mark.parametrize("case", ["disk full", "read-only", "lock timeout"])
def test_a_batch_postgresql_refuses_is_named_with_what_happened_and_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pg_migrated_url: str, case: str
) -> None:
    # Given a PostgreSQL database that takes the first batch of 1,000 customers, then fails the second: its disk full
    # (53100, raised here by a trigger at the 1,500th customer, as the server raises it when a file cannot grow), or
    # that takes no writes at all (a standby, or default_transaction_read_only: 25006), or whose customers another
    # session holds locked past database.lock_timeout_seconds (55P03)
    engine = db.create_engine(pg_migrated_url)
    name = sa.make_url(pg_migrated_url).database
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{pg_migrated_url}"\nlock_timeout_seconds = 0.2\n', encoding="utf-8")
    path = _customers(tmp_path / "customers.csv", 1500)
    holder = engine.connect()
    try:
        if case == "disk full":
            with engine.begin() as conn:
                conn.exec_driver_sql(
                    "CREATE FUNCTION full_disk() RETURNS trigger AS $$ BEGIN IF NEW.external_id = 'C-1500' THEN "
                    "RAISE EXCEPTION 'could not extend file \"base/1/2\": No space left on device' "
                    "USING ERRCODE = 'disk_full'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql")
                conn.exec_driver_sql("CREATE TRIGGER full_disk BEFORE INSERT ON customer FOR EACH ROW "
                                     "EXECUTE FUNCTION full_disk()")  # fmt: skip
        elif case == "read-only":
            with engine.begin() as conn:
                conn.exec_driver_sql(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        else:
            holder.begin()
            holder.exec_driver_sql("LOCK TABLE customer IN SHARE MODE")
        # When the customers are imported
        code, printed = kembali(capsys, "--config", str(config), "import", "customers", str(path))
    finally:
        holder.close()
        engine.dispose()
    # Then it stops with exit 3, saying what happened, how far it got and what to do
    expected = {
        "disk full": ("the database server's disk is full (PostgreSQL 53100: could not extend file",
                      "customers.csv is imported up to line 1001, the rows after it are not (1,000 created,",
                      "Free space on the database server's disk"),
        "read-only": ("the database takes no writes (PostgreSQL 25006: cannot execute INSERT in a read-only "
                      "transaction)", "none of customers.csv is imported",
                      "Point [database] url at the primary server, not a standby, or turn default_transaction_"
                      "read_only off"),
        "lock timeout": ("another session held a lock the import needed longer than database.lock_timeout_seconds "
                         "(0.2 s) (PostgreSQL 55P03: canceling statement due to lock timeout)",
                         "none of customers.csv is imported", "Wait for the other session to finish"),
    }[case]  # fmt: skip
    assert code == 3, printed
    assert f"kembali import: stopped: {expected[0]}" in printed, printed
    assert expected[1] in printed and expected[2] in printed, printed
    assert "Import the file again to finish: the rows already imported are left unchanged." in printed, printed
    assert "database failed" not in printed and "Traceback" not in printed, printed


@pytest.mark.parametrize(
    ("bad", "words"),
    [(b"INV-1,C-1,paid,2026-10-01,P-2,1,2,000\n", "row has 8 fields, the header has 7: field 8 holds '000'"),
     (b"INV-1,C-1,paid,2026-10-01,P-\xe9,1,2000\n", "not UTF-8 text: byte 0xe9 in column 5"),
     (b'INV-1,C-1,paid,2026-10-01,P-2,1,"' + b"9" * 140_000 + b'"\n',
      "unreadable CSV: column 7 'unit_price' holds more than 131072")],
    ids=["stray comma", "latin-1", "field too long"],
)  # fmt: skip
def test_an_unreadable_row_of_an_order_drops_the_whole_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: bytes, words: str
) -> None:
    # Given an order of three lines whose second row cannot be read, in the middle or at the start of its order
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_text("id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\n")
    assert kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))[0] == 0
    header = b"order_id,customer_id,status,placed_at,product_id,quantity,unit_price\n"
    line = "{},C-1,paid,2026-10-01,{},1,{}\n".format
    (tmp_path / "orders.csv").write_bytes(
        header + line("INV-1", "P-1", 1000).encode() + bad + line("INV-1", "P-3", 4000).encode()
        + bad.replace(b"INV-1", b"INV-2") + line("INV-2", "P-1", 1000).encode() + line("INV-2", "P-3", 4000).encode()
        + line("INV-3", "P-1", 1000).encode()
    )
    # When the orders are imported
    code, out = kembali(capsys, "--config", str(config), "import", "orders", str(tmp_path / "orders.csv"))
    # Then each order is skipped whole, as an order with any other bad row is: none is stored without the line
    # that could not be read, at a total short of it (it stored INV-1 at 5000 and INV-2 at 5000)
    assert code == 1, out
    assert f"orders.csv:3: id 'INV-1': {words}" in out and "the whole order is skipped" in out, out
    assert f"orders.csv:5: id 'INV-2': {words}" in out, out
    assert "orders: 1 created, 0 updated, 0 unchanged, 2 rejected" in out, out
    assert _ids(f"sqlite:///{tmp_path / 'k.db'}", "shop_order") == {"INV-3"}


def test_a_file_named_as_a_dash_is_read_when_written_as_a_path(tmp_path: Path) -> None:
    # Given a file whose name is '-' (an export saved under a name left empty), written ./- as for any program
    config = migrated_config(tmp_path)
    (tmp_path / "-").write_text("id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\n", encoding="utf-8")
    command = [sys.executable, "-m", "worker", "--config", str(config), "import", "customers", "./-"]
    result = subprocess.run(command, input="", capture_output=True, text=True, timeout=60, cwd=tmp_path)
    # Then the file is imported: './-' was read as '-', standard input (here empty; on a terminal, a wait for input)
    assert result.returncode == 0, result.stderr
    assert "customers: 1 created, 0 updated, 0 unchanged, 0 rejected (from -)" in result.stdout, result.stdout
    assert _ids(f"sqlite:///{tmp_path / 'k.db'}", "customer") == {"C-1"}


def test_trailing_empty_fields_past_the_header_are_read_and_a_field_with_data_there_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given exports of a sheet once wider than its header: rows ending in empty cells ('a,b,c,,'), one of them
    # quoted or blank-padded, and one row whose extra field holds data
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent\n"
        "C-1,c1@example.com,Ani,ya,,\n"
        'C-2,c2@example.com,Budi,ya,"", \n'
        "C-3,c3@example.com,Citra,ya\n"
        "C-4,c4@example.com,Dewi,ya,,note\n"
    )
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,product_id,quantity,unit_price\n"
        "INV-1,C-1,paid,2026-10-01,P-1,1,1000,,,\n"
        "INV-1,C-1,paid,2026-10-01,P-2,2,2000,,,\n"
        "INV-2,C-2,paid,2026-10-01,P-1,1,1000\n"
    )
    # When they are imported
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))
    # Then the empty trailing fields are dropped and the rows imported (each was 'row has 6 fields, the header has
    # 4'), and the row whose extra field holds data is rejected, naming its line, the field and its value
    assert code == 1, out
    assert ("customers.csv:5: id 'C-4': row has 6 fields, the header has 4: field 6 holds 'note' (a stray comma or "
            "quote?)") in out, out  # fmt: skip
    assert "customers: 3 created, 0 updated, 0 unchanged, 1 rejected" in out, out
    assert _ids(f"sqlite:///{tmp_path / 'k.db'}", "customer") == {"C-1", "C-2", "C-3"}
    code, out = kembali(capsys, "--config", str(config), "import", "orders", str(tmp_path / "orders.csv"))
    assert "\nrejected " not in out and "orders: 2 created, 0 updated, 0 unchanged, 0 rejected" in out, out
    totals = dict(_rows(f"sqlite:///{tmp_path / 'k.db'}", "select external_id, total_minor from shop_order"))
    assert totals == {"INV-1": 500000, "INV-2": 100000}, totals


@pytest.mark.parametrize("through", ["file", "pipe"])
def test_an_order_whose_rows_are_not_together_is_skipped_whole_naming_both_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], through: str
) -> None:
    # Given an export sorted by something else than the order: O-1's rows, then O-2's, then O-1's again, one of O-3
    # in a later batch of the import coming back after that batch
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_text("id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\n")
    assert kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))[0] == 0
    rows = ["order_id,customer_id,status,placed_at,product_id,quantity,unit_price\n",
            "O-1,C-1,paid,2026-10-01,P-1,1,1000\n", "O-1,C-1,paid,2026-10-01,P-2,1,2000\n",
            "O-2,C-1,paid,2026-10-01,P-1,1,1000\n", "O-1,C-1,paid,2026-10-01,P-3,1,5000\n",
            "O-3,C-1,paid,2026-10-01,P-1,1,1000\n"]  # fmt: skip
    rows += [f"F-{n},C-1,paid,2026-10-01,P-1,1,1000\n" for n in range(importing.BATCH + 5)]
    rows += ["O-3,C-1,paid,2026-10-01,P-2,1,2000\n", "O-4,C-1,paid,2026-10-01,P-1,1,1000\n"]
    (tmp_path / "orders.csv").write_text("".join(rows))
    # When they are imported (from the file, or from a pipe, which is read once)
    if through == "file":
        code, out = kembali(capsys, "--config", str(config), "import", "orders", str(tmp_path / "orders.csv"))
    else:
        result = subprocess.run(
            [sys.executable, "-m", "worker", "--config", str(config), "import", "orders", "-"],
            input=(tmp_path / "orders.csv").read_bytes(), capture_output=True, timeout=120, check=False,
        )
        code, out = result.returncode, (result.stdout + result.stderr).decode()
    # Then each such order is skipped whole, named with the lines its rows start at and come back at: O-1 was
    # stored from its first rows at 3000 of its 8000, O-3 at 1000 of 3000 (and the customer's spend short)
    name = "orders.csv" if through == "file" else "stdin"
    assert code == 1, out
    assert (f"{name}:2: id 'O-1': order 'O-1' has rows at line 2 and again at line 5, other orders' rows between "
            "them: keep an order's rows together (sort the file by order_id); the whole order is skipped") in out, out
    assert f"{name}:6: id 'O-3': order 'O-3' has rows at line 6 and again at line {len(rows) - 1}," in out, out
    assert f"orders: {importing.BATCH + 7:,} created, 0 updated, 0 unchanged, 2 rejected" in out, out
    stored = _ids(f"sqlite:///{tmp_path / 'k.db'}", "shop_order")
    assert {"O-1", "O-3"} & stored == set() and {"O-2", "O-4"} <= stored, out


def test_a_birthday_with_a_midnight_time_from_a_database_export_is_read_and_a_spreadsheets_date_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a database's export (MySQL's DATETIME: '1990-05-01 00:00:00') and a spreadsheet's local date
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent,birthday\n"
        "C-1,c1@example.com,Ani,ya,1990-05-01 00:00:00\n"
        "C-2,c2@example.com,Budi,ya,1985-12-31T00:00\n"
        "C-3,c3@example.com,Citra,ya,1985-12-31 13:45:00\n"
        "C-4,c4@example.com,Dewi,ya,01/05/1990\n"
    )
    # When they are imported
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))
    # Then a date at midnight is that day (it was left out: '(expected YYYY-MM-DD)'), a time of day is not
    # guessed, and a spreadsheet's date says it may be read either way round
    assert code == 1, out
    assert "customers.csv:2:" not in out and "customers.csv:3:" not in out, out
    assert "customers.csv:4: id 'C-3': invalid birthday '1985-12-31 13:45:00' (expected YYYY-MM-DD)" in out, out
    assert ("customers.csv:5: id 'C-4': invalid birthday '01/05/1990' (a date as a spreadsheet shows it: is it "
            "month/day or day/month? write it as YYYY-MM-DD)") in out, out
    born = dict(_rows(f"sqlite:///{tmp_path / 'k.db'}", "select external_id, birthday from customer"))
    assert {key: str(value) for key, value in born.items()} == {
        "C-1": "1990-05-01", "C-2": "1985-12-31", "C-3": "None", "C-4": "None"}


def test_an_orders_later_rows_that_leave_the_order_columns_empty_are_its_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an export as Shopify's: an order's columns on its first row only, its later rows giving the order id
    # and the line; and an order whose later row gives another status
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_text("id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\n")
    assert kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))[0] == 0
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,delivered_at,currency,total,product_id,quantity,unit_price\n"
        "#1001,C-1,paid,2026-10-01 10:00:00 +0700,2026-10-03,IDR,8000,P-1,1,1000\n"
        "#1001,,,,,,,P-2,1,2000\n"
        "#1001,,,,,,,P-3,1,5000\n"
        "#1002,C-1,paid,2026-10-02,,,,P-1,1,1000\n"
        "#1002,,refunded,,,,,P-2,1,2000\n"
    )
    # When they are imported
    code, out = kembali(capsys, "--config", str(config), "import", "orders", str(tmp_path / "orders.csv"))
    # Then the first order is whole, with its three lines (it was skipped: "order columns disagree with line 2:
    # customer_id '' here, 'C-1' there"), and the one whose rows say two statuses is still skipped, naming both
    assert code == 1, out
    assert ("orders.csv:6: id '#1002': order columns disagree with line 5: status 'refunded' here, 'paid' there"
            in out), out
    assert "orders: 1 created, 0 updated, 0 unchanged, 1 rejected" in out, out
    url = f"sqlite:///{tmp_path / 'k.db'}"
    assert _rows(url, "select external_id, total_minor from shop_order") == [("#1001", 800000)]
    assert _rows(url, "select count(*) from order_line") == [(3,)]


def test_an_order_of_more_rows_than_an_order_may_have_is_skipped_without_being_held_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an orders file whose order_id column holds no order number (the wrong column renamed so: every row of
    # one "order"), and one more order after it; an order may have 3 rows here, as it may have 10,000
    monkeypatch.setattr(importer, "MAX_ORDER_ROWS", 3)
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_text("id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\n")
    assert kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))[0] == 0
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,product_id,quantity,unit_price\n"
        + "".join(f"paid,C-1,paid,2026-10-01,P-{i},1,1000\n" for i in range(6))
        + "#1002,C-1,paid,2026-10-02,P-1,1,1000\n#1002,C-1,paid,2026-10-02,P-2,1,1000\n"
        "#1002,C-1,paid,2026-10-02,P-3,1,1000\n"
    )
    # When they are imported
    code, out = kembali(capsys, "--config", str(config), "import", "orders", str(tmp_path / "orders.csv"))
    # Then that order is rejected once, at its fourth row, its rows not held past it (an "order" of 300,000 rows
    # took 430 MB, and was imported as one order of 300,000 lines), and the order after it, of 3 rows, is imported
    assert code == 1, out
    assert ("orders.csv:5: id 'paid': order 'paid' has more than 3 rows (from line 2), more lines than an order has: "
            "is its order_id column the order's number? the whole order is skipped") in out, out
    assert "orders: 1 created, 0 updated, 0 unchanged, 1 rejected" in out, out
    url = f"sqlite:///{tmp_path / 'k.db'}"
    assert _rows(url, "select external_id from shop_order") == [("#1002",)]


def test_a_row_with_two_faults_is_one_rejected_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Given an order of two rows, the first without its product, the second without it too and naming another
    # customer
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_text("id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\n"
                                            "C-2,c2@example.com,Budi,ya\n")  # fmt: skip
    assert kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))[0] == 0
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,total\n"
        "O-1,C-1,paid,2026-09-01,10\n"
        "O-1,C-2,paid,2026-09-01,10\n"
    )
    # When they are imported
    code, out = kembali(capsys, "--config", str(config), "import", "orders", str(tmp_path / "orders.csv"))
    # Then each fault is named, and the summary counts the two rows rejected (it said "3 rejected" of a file of two)
    assert code == 1, out
    assert "orders.csv:3: id 'O-1': order columns disagree with line 2: customer_id 'C-2' here" in out, out
    assert out.count("orders.csv:3: id 'O-1'") == 2 and out.count("orders.csv:2: id 'O-1'") == 1, out
    assert "orders: 0 created, 0 updated, 0 unchanged, 2 rejected" in out, out


def test_orders_from_a_pipe_with_no_room_for_their_copy_say_so_and_what_to_do(tmp_path: Path) -> None:
    # Given orders piped in, and a temporary folder with room for less than them (a file size limit stands in for
    # a full /tmp)
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_text("id,email,name,marketing_consent\nC-1,c1@example.com,Ani,ya\n")
    assert subprocess.run(_import_command(config, "customers", tmp_path / "customers.csv"), timeout=60).returncode == 0
    data = ("order_id,customer_id,status,placed_at,product_id,quantity,unit_price\n"
            + "".join(f"O-{n},C-1,paid,2026-10-01,P-1,1,1000\n" for n in range(60_000))).encode()  # fmt: skip
    limit = (tmp_path / "k.db").stat().st_size * 4 + 1_000_000

    def small_files() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    # When they are imported from standard input
    result = subprocess.run(_import_command(config, "orders", Path("-")), input=data, capture_output=True,
                            timeout=120, preexec_fn=small_files, check=False)  # fmt: skip
    err = result.stderr.decode()
    # Then the import says the copy a pipe needs could not be written, where, and what to do (it was a traceback,
    # or 'could not write: … (what it printed … is cut short)'), and nothing is imported
    assert result.returncode == 2, err
    assert "Traceback" not in err, err
    assert ("kembali import: standard input: could not be copied to a temporary file (File too large), which orders "
            "read from a pipe need: set TMPDIR to a folder with room for the file, or give the file's path") in err
    assert _ids(f"sqlite:///{tmp_path / 'k.db'}", "shop_order") == set()


def test_the_header_again_in_the_middle_of_a_file_joined_from_two_exports_is_skipped_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given two monthly exports joined (cat october.csv november.csv), the second with its BOM and its header
    config = migrated_config(tmp_path)
    october = "\ufeffid,email,name,marketing_consent\r\nC-1,c1@example.com,Ani,ya\r\n"
    november = "\ufeffID,Email,Name,Marketing_Consent\r\nC-2,c2@example.com,Budi,ya\r\n"
    (tmp_path / "customers.csv").write_text(october + november, encoding="utf-8")
    # When it is imported
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))
    # Then the second header is skipped, with a warning naming its line (it was a rejected row: "invalid id
    # '\ufeffID' (no invisible characters…)", or without the BOM an invalid address 'Email'), and both customers
    # are imported
    assert code == 0, out
    assert "warning: customers.csv:3: the header again (files joined?): skipped" in out, out
    assert "customers: 2 created, 0 updated, 0 unchanged, 0 rejected" in out, out


def test_a_header_of_huge_or_countless_column_names_is_named_on_lines_of_bounded_length(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given exports whose header has a column name of 10,000 characters, or 3,000 columns Kembali does not read
    config = migrated_config(tmp_path)
    big = "Q" * 10_000
    many = ",".join(f"note{i}" for i in range(3_000))
    files = {
        "big.csv": f"id,email,name,marketing_consent,{big}\nC-1,c1@example.com,Ani,ya,1\n",
        "many.csv": f"id,email,name,marketing_consent,{many}\nC-2,c2@example.com,Budi,ya{',' * 3_000}\n",
        "missing.csv": f"key,email,name,marketing_consent,{big},{many}\nC-3,c3@example.com,Citra,ya,1{',' * 3_000}\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    # When they are imported
    said = {name: kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / name))
            for name in files}  # fmt: skip
    # Then the warning, and the missing column's error, name the columns cut short and say how many there are
    # (each was one line as long as the header: 10,000 characters, or all 3,000 names)
    for name, (code, out) in said.items():
        assert code == (2 if name == "missing.csv" else 0), out
        assert max(map(len, out.splitlines())) < 1000, (name, [len(line) for line in out.splitlines()])
    assert "big.csv:1: unknown column(s) 'qqqqqqqqqq" in said["big.csv"][1]
    assert "…(10000 chars) ignored (known: id, email, name," in said["big.csv"][1]
    assert "many.csv:1: unknown column(s) 'note0', 'note1'" in said["many.csv"][1]
    assert "and 2990 more ignored (known: " in said["many.csv"][1]
    assert "customers: 1 created, 0 updated, 0 unchanged, 0 rejected" in said["many.csv"][1]
    assert "missing.csv: line 1: missing column 'id' (found: key, email, name, marketing_consent, qqqq" \
        in said["missing.csv"][1]
    assert "…(10000 chars), note0, note1, note2, note3, note4, and 2995 more)" in said["missing.csv"][1]
    # And a suppression list's header without an 'email' column is named so too
    (tmp_path / "bounces.csv").write_text(f"address,{big},{many}\nx@example.com\n", encoding="utf-8")
    code, out = kembali(capsys, "--config", str(config), "suppress", "import", str(tmp_path / "bounces.csv"))
    assert code == 2 and max(map(len, out.splitlines())) < 1000, [len(line) for line in out.splitlines()]
    assert "line 1: a CSV needs an 'email' column (found: address, qqqq" in out
    assert "…(10000 chars), note0, note1, note2, note3, note4, note5, note6, note7, and 2992 more)" in out


def test_a_file_of_no_line_breaks_is_refused_without_being_held_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a JSON export given by mistake: one line of 24 MB, the whole file, of short fields between its commas
    config = migrated_config(tmp_path)
    row = '{{"id": "C-{0}", "email": "c{0}@example.com", "marketing_consent": true}}'
    rows = ", ".join(row.format(i) for i in range(350_000))
    (tmp_path / "customers.json").write_text(f"[{rows}]", encoding="utf-8")
    # When it is imported as customers
    tracemalloc.start()
    try:
        code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.json"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Then it is refused, saying its first line is longer than a line may be, and it was read a piece at a time,
    # in less memory than the file's size (it was held whole, split into a column at each comma: 1.5 GB for a file
    # of 150 MB, and the first ten named)
    assert code == 2, out
    assert (f"customers.json: line 1: customers.json: header: unreadable CSV: line 1 holds more than "
            f"{importer.MAX_LINE:,} characters, the most a line may hold (a CSV file has one row a line: is it one?)"
            ) in out, out
    assert peak < 4 * importer.MAX_LINE < (tmp_path / "customers.json").stat().st_size, peak


def test_a_row_longer_than_a_line_may_be_is_rejected_and_the_rows_after_it_imported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a customers file whose third line is 6 million characters of short fields (a sheet's row of junk
    # pasted across its columns), with a line broken inside quotes before it
    config = migrated_config(tmp_path)
    junk = "x," * 3_000_000
    (tmp_path / "customers.csv").write_text(
        'id,email,name,marketing_consent\r\nC-1,c1@example.com,"Ani\r\nPutri",ya\r\n'
        f"C-2,c2@example.com,Budi,ya,{junk}\r\nC-3,c3@example.com,Citra,ya\r\n",
        encoding="utf-8",
    )
    # When it is imported
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))
    # Then that row is rejected by its line and id, and the rows around it are imported
    assert code == 1, out
    assert (f"customers.csv:4: id 'C-2': unreadable CSV: line 4 holds more than {importer.MAX_LINE:,} characters, "
            "the most a line may hold") in out, out
    assert "customers: 2 created, 0 updated, 0 unchanged, 1 rejected" in out, out
    assert _ids(f"sqlite:///{tmp_path / 'k.db'}", "customer") == {"C-1", "C-3"}


@pytest.mark.parametrize("header", ["id,email,name,marketing_consent", "id,email,marketing_consent,name"])
def test_a_quote_left_open_in_the_last_column_rejects_its_row_naming_the_rows_it_took_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], header: str
) -> None:
    # Given a file whose third line opens a quote in its last column and never closes it: the rows after it are
    # read into that one field, and the row still has as many fields as the header
    config = migrated_config(tmp_path)
    last = "last" if header.endswith("consent") else "name"
    rows = [("C-1", "a", "Ani"), ("C-2", "b", '"Budi'), ("C-3", "c", "Cici"), ("C-4", "d", "Dewi")]
    lines = [f"{i},{m}@example.com,{n},ya" if last == "last" else f"{i},{m}@example.com,ya,{n}" for i, m, n in rows]
    if last == "last":
        lines[1] = 'C-2,b@example.com,Budi,"ya'
    (tmp_path / "customers.csv").write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    # When it is imported
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))
    # Then that row is rejected, saying which lines it took in (it was imported, with a consent or a name of three
    # lines, and C-3 and C-4 were in no count: neither imported nor rejected)
    column = "4 'marketing_consent'" if last == "last" else "4 'name'"
    assert code == 1, out
    assert (f"customers.csv:3: id 'C-2': column {column} holds a quote left open; it takes in lines 3 to 5, "
            "none of which is imported (a quote opened and never closed makes the lines after it one field)") in out
    assert "customers: 1 created, 0 updated, 0 unchanged, 1 rejected" in out, out


def test_a_suppression_list_import_shows_its_progress_on_a_terminal(tmp_path: Path) -> None:
    # Given a bounce export of many addresses (a million took 40 s, a terminal silent all that time, as if hung,
    # where `kembali import` shows how far along it is), one line of it no address
    config = migrated_config(tmp_path)
    bounces = tmp_path / "bounces.txt"
    bounces.write_text("".join(f"b{i}@example.com\n" for i in range(3000)) + "not-an-address\n", encoding="utf-8")
    # When it is imported with stderr on a terminal
    code, raw = run_on_a_terminal(["--config", str(config), "suppress", "import", str(bounces)], stdout_too=False,
                                  timeout=60)  # fmt: skip
    seen = raw.decode()
    # Then a progress line shows the lines read of the file, and then the addresses saved
    assert code == 1, seen
    line = r"\rsuppressing addresses from bounces\.txt: [0-9,]+ of [0-9,]+ \([0-9.]+%\)"
    assert re.search(line + " lines read", seen), seen
    assert re.search(line.replace("of [0-9,]+", "of 3,000") + " saved", seen), seen
    # And the line is erased before the line it rejected is named, which starts a line of its own
    assert f"\r\x1b[K{bounces}: line 3001: invalid email address 'not-an-address'" in seen, seen
    assert seen.endswith("\r\x1b[K"), seen  # and the line is gone before the summary


def _imported(capsys: pytest.CaptureFixture[str], config: Path, path: Path) -> tuple[int, str]:
    """``kembali import KIND PATH``, the kind the file's name (customers.csv): the exit code and what it printed."""
    return kembali(capsys, "--config", str(config), "import", path.stem, str(path))


def test_an_id_a_spreadsheet_turned_into_scientific_notation_is_a_rejected_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given ids that are phone numbers (628123456789, 628123456790), which Excel shows as 6.28123E+11 and writes
    # so into the CSV: the digits are gone, and two customers share one id
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent\n"
        "6.28123E+11,ani@example.com,Ani,ya\n"
        "C-2,budi@example.com,Budi,ya\n"
        "\"6,28123E+11\",citra@example.com,Citra,ya\n", encoding="utf-8")  # fmt: skip
    # (the last as Excel in an Indonesian locale writes it, a decimal comma)
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,total\n"
        "O-1,6.28123E+11,paid,2026-11-01,100000\n"
        "O-2,C-2,paid,2026-11-02,100000\n"
        "8.10001E+14,C-2,paid,2026-11-03,100000\n", encoding="utf-8")  # fmt: skip
    # When they are imported
    code, out = _imported(capsys, config, tmp_path / "customers.csv")
    # Then the row is rejected, naming the column and what to do, not stored under an id its orders all share
    assert code == 1, out
    assert ("customers.csv:2: id '6.28123E+11': invalid id '6.28123E+11' (a number a spreadsheet wrote in "
            "scientific notation, its last digits lost: format the column as text and export it again)") in out
    assert "customers: 1 created, 0 updated, 0 unchanged, 2 rejected" in out
    code, out = _imported(capsys, config, tmp_path / "orders.csv")
    assert code == 1, out
    assert "orders.csv:2: id 'O-1': invalid customer_id '6.28123E+11' (a number a spreadsheet wrote" in out
    assert "orders.csv:4: id '8.10001E+14': invalid order_id '8.10001E+14' (a number a spreadsheet wrote" in out
    assert _ids(f"sqlite:///{tmp_path / 'k.db'}", "customer") == {"C-2"}
    assert _ids(f"sqlite:///{tmp_path / 'k.db'}", "shop_order") == {"O-2"}


def test_consents_an_indonesian_excel_wrote_as_benar_and_salah_are_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a sheet whose consent column holds TRUE and FALSE, saved as CSV by Excel in Indonesian (id-ID), which
    # writes its booleans in its own words: BENAR and SALAH (and a products sheet's active column the same)
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent\nC-1,ani@example.com,Ani,BENAR\nC-2,budi@example.com,Budi,SALAH\n"
        "C-3,citra@example.com,Citra,Benar\n", encoding="utf-8")  # fmt: skip
    (tmp_path / "products.csv").write_text("id,name,price,active\nP-1,Tas,1000,SALAH\nP-2,Topi,1000,BENAR\n")
    # When they are imported
    code, out = _imported(capsys, config, tmp_path / "customers.csv")
    # Then each answer is read as it was given: those who agreed are not saved as without consent
    assert (code, "unclear" in out) == (0, False), out
    url = f"sqlite:///{tmp_path / 'k.db'}"
    assert dict(_rows(url, "select external_id, marketing_consent from customer")) == {"C-1": 1, "C-2": 0, "C-3": 1}
    code, out = _imported(capsys, config, tmp_path / "products.csv")
    assert code == 0, out
    assert dict(_rows(url, "select external_id, active from product")) == {"P-1": 0, "P-2": 1}


def test_a_time_written_with_a_dot_as_indonesian_writes_it_is_a_rejected_row_not_read_as_another_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given orders whose times are written as Indonesian writes them (10.30, a spreadsheet's id-ID time format),
    # which Python's ISO reader takes as 10:00 and three tenths of a second: half an hour lost, without a word
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_text("id,email,name,marketing_consent\nC-1,ani@example.com,Ani,ya\n")
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,delivered_at,total\n"
        "O-1,C-1,delivered,2026-11-22 10.30,2026-11-25 18:45,100000\n"
        "O-2,C-1,delivered,2026-11-22 10:30,2026-11-25T18.45,100000\n"
        "O-3,C-1,paid,2026-11-22 10:30:15.250,,100000\n", encoding="utf-8")  # fmt: skip
    assert _imported(capsys, config, tmp_path / "customers.csv")[0] == 0
    # When they are imported
    code, out = _imported(capsys, config, tmp_path / "orders.csv")
    # Then each such row is rejected, naming its column and what to write; a second's fraction is read as ever
    assert code == 1, out
    assert ("orders.csv:2: id 'O-1': invalid placed_at '2026-11-22 10.30' (a time written with '.' between its hours "
            "and minutes, as in Indonesian, is not read: write 10:30)") in out
    assert "orders.csv:3: id 'O-2': invalid delivered_at '2026-11-25T18.45' (a time written with '.'" in out
    assert "orders: 1 created, 0 updated, 0 unchanged, 2 rejected" in out
    assert _rows(f"sqlite:///{tmp_path / 'k.db'}", "select external_id from shop_order") == [("O-3",)]


def test_a_price_as_an_indonesian_spreadsheet_shows_it_is_rejected_saying_what_to_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given prices as a sheet in Indonesian shows them: '.' between thousands, a decimal comma, the 'Rp' sign
    config = migrated_config(tmp_path)
    (tmp_path / "products.csv").write_text(
        "id,name,price\n"
        "P-1,Kemeja,\"1.250.000\"\n"
        "P-2,Kain,\"Rp 1.250.000,00\"\n"
        "P-3,Topi,Rp125000\n"
        "P-4,Tas,125000\n", encoding="utf-8")  # fmt: skip
    # When they are imported
    code, out = _imported(capsys, config, tmp_path / "products.csv")
    # Then each is a rejected row saying what it read and what to write (it was "expected an amount such as
    # 249000", as if the cell held no number at all)
    assert code == 1, out
    assert ("products.csv:2: id 'P-1': invalid price '1.250.000' ('.' separates thousands, as Indonesian writes "
            "them: write 1250000 for that amount)") in out
    assert ("products.csv:3: id 'P-2': invalid price 'Rp 1.250.000,00' (write the amount alone, without 'Rp': the "
            "currency goes in the currency column; and without thousands separators") in out
    assert ("products.csv:4: id 'P-3': invalid price 'Rp125000' (write the amount alone, without 'Rp': the "
            "currency goes in the currency column)") in out
    assert "products: 1 created, 0 updated, 0 unchanged, 3 rejected" in out


def test_an_order_whose_customer_id_lost_its_leading_zeros_or_changed_case_names_the_customer_it_may_be(
    tmp_path: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given customers whose ids are phone numbers with a leading zero, or codes in small letters or capitals, and an
    # orders file a spreadsheet opened and saved again, which read the phone numbers as numbers and dropped the
    # zero, or another system's, which writes the codes in the other case
    config = _config(tmp_path, db_url)
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent\n0812345,ani@example.com,Ani,ya\n0899,budi@example.com,Budi,ya\n"
        "cust-a1,citra@example.com,Citra,ya\nCUST-B2,dewi@example.com,Dewi,ya\n")
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,total\n"
        "O-1,812345,paid,2026-11-01,100000\n"
        "O-2,0899,paid,2026-11-02,100000\n"
        "O-3,7777,paid,2026-11-03,100000\n"
        "O-4,CUST-A1,paid,2026-11-01,100000\n"
        "O-5,cust-b2,paid,2026-11-02,100000\n", encoding="utf-8")  # fmt: skip
    assert _imported(capsys, config, tmp_path / "customers.csv")[0] == 0
    # When the orders are imported
    code, out = _imported(capsys, config, tmp_path / "orders.csv")
    # Then the order is rejected naming the customer its id may be (it said only "unknown customer id '812345'",
    # and "import its customer first" of a customer imported already)
    assert code == 1, out
    assert ("orders.csv:2: id 'O-1': unknown customer id '812345' (customer '0812345' is stored: a spreadsheet drops "
            "the leading zeros of an id it reads as a number; format the id column as text and export the file "
            "again)") in out
    assert "orders.csv:4: id 'O-3': unknown customer id '7777' (import its customer first)" in out
    assert ("orders.csv:5: id 'O-4': unknown customer id 'CUST-A1' (customer 'cust-a1' is stored: ids are compared "
            "exactly, case included; write the id as the customers file has it)") in out
    assert "orders.csv:6: id 'O-5': unknown customer id 'cust-b2' (customer 'CUST-B2' is stored: ids" in out
    assert "orders: 1 created, 0 updated, 0 unchanged, 4 rejected" in out
    assert _ids(db_url, "shop_order") == {"O-2"}


def test_a_date_written_year_first_but_not_as_iso_is_rejected_saying_how_to_write_it_not_called_ambiguous(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given dates written year first, as a spreadsheet's format 'yyyy/mm/dd' or 'yyyy-m-d' writes them
    config = migrated_config(tmp_path)
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent,birthday\nC-1,ani@example.com,Ani,ya,1990/12/07\n")
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,total\n"
        "O-1,C-1,paid,2026/11/01 10:00,100000\n"
        "O-2,C-1,paid,2026-11-1,100000\n"
        "O-3,C-1,paid,01/11/2026,100000\n", encoding="utf-8")  # fmt: skip
    # When they are imported
    code, out = _imported(capsys, config, tmp_path / "customers.csv")
    # Then each is named with the form to write, not as a day/month puzzle it is not (it said "is it month/day or
    # day/month?" of 2026/11/01); a day-first date still is one
    assert code == 1, out
    assert ("invalid birthday '1990/12/07' (write the date as YYYY-MM-DD, with '-' and two digits for the month and "
            "the day: 1990-12-07)") in out
    code, out = _imported(capsys, config, tmp_path / "orders.csv")
    assert code == 1, out
    assert ("orders.csv:2: id 'O-1': invalid placed_at '2026/11/01 10:00' (write the date as YYYY-MM-DD, with '-' "
            "and two digits for the month and the day: 2026-11-01)") in out
    assert "orders.csv:3: id 'O-2': invalid placed_at '2026-11-1' (write the date as YYYY-MM-DD, with '-' and two " \
           "digits for the month and the day: 2026-11-01)" in out
    assert "orders.csv:4: id 'O-3': invalid placed_at '01/11/2026' (a date as a spreadsheet shows it: is it " \
           "month/day or day/month?" in out
