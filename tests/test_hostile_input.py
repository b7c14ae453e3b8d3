"""What an operator types and feeds Kembali that is wrong: each is named, with no traceback and no silent loss."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import unicodedata
from datetime import UTC, datetime
from email import policy
from email.parser import BytesParser
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from tests import sendkit
from tests.clikit import migrated_config
from tests.clikit import run_cli as kembali
from tests.shop import LINK_KEY, TEMPLATES
from tests.shop_fixtures import make_site
from tests.smtp_server import RecordingServer
from worker.config import load_settings

CUSTOMERS = "id,email,name,marketing_consent\n"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return migrated_config(tmp_path)


def _import_with_a_quote_left_open(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str], *, customers: int
) -> tuple[int, str]:
    """``kembali import customers`` of C-1 … C-``customers``, C-1's name opening a quote it never closes."""
    rows = ['C-1,c1@example.com,"Budi,true']
    rows += [f"C-{i},c{i}@example.com,Name {i},true" for i in range(2, customers + 1)]
    (tmp_path / "customers.csv").write_text(CUSTOMERS + "\n".join(rows) + "\n", encoding="utf-8")
    return kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))


def test_a_quote_left_open_names_every_line_it_swallowed(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a name with an opening quote and no closing one: the CSV reader reads on to the end of the file as one field
    code, out = _import_with_a_quote_left_open(tmp_path, config, capsys, customers=6)
    assert code == 1
    assert "customers.csv:2: id 'C-1': row has 3 fields" in out
    assert "it takes in lines 2 to 7, none of which is imported" in out, out


def test_a_quote_left_open_in_a_big_file_names_the_lines_it_swallowed(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # past the CSV field limit the reader gives up on the field and goes on after it: the lines in between are lost
    code, out = _import_with_a_quote_left_open(tmp_path, config, capsys, customers=4999)
    assert code == 1
    [rejected] = [line for line in out.splitlines() if line.startswith("rejected")]
    assert rejected.startswith("rejected customers.csv:2: id 'C-1': unreadable CSV: column 3 'name' holds more than "
                               "131072 characters, the most one field may hold; ")  # fmt: skip
    assert "it takes in lines 2 to " in rejected and "none of which is imported" in rejected
    last = int(rejected.split("it takes in lines 2 to ")[1].split(",")[0])
    created = int(out.split("customers: ")[1].split(" created")[0].replace(",", ""))
    assert created == 5000 - last  # every other line of the file is either imported or named as lost


def test_a_field_past_the_csv_field_limit_is_named_by_line_and_column_and_the_rest_is_imported(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a customers file one of whose names is a megabyte (a picture pasted into a cell), quoted or not
    big = "x" * 1_000_000
    (tmp_path / "customers.csv").write_text(
        CUSTOMERS + f"C-1,c1@example.com,{big},true\nC-2,c2@example.com,Budi,true\n"
        f'C-3,c3@example.com,"{big}",true\nC-4,c4@example.com,Ani,true\n',
        encoding="utf-8",
    )
    # When it is imported
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))
    # Then each such row is rejected naming its line, its id and the column, and the limit in words (it said
    # "unreadable CSV (field larger than field limit (131072))"), and the other rows are imported
    assert code == 1, out
    for line, key in ((2, "C-1"), (4, "C-3")):
        assert f"rejected customers.csv:{line}: id {key!r}: unreadable CSV: column 3 'name' holds more than 131072 " \
               "characters, the most one field may hold" in out, out
    assert "customers: 2 created, 0 updated, 0 unchanged, 2 rejected" in out, out


def test_a_date_time_out_of_range_in_utc_is_a_rejected_row(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 0001-01-01T00:00:00 is a common "no date" from other systems; in Asia/Jakarta it is before year 1 in UTC
    (tmp_path / "customers.csv").write_text(CUSTOMERS + "C-1,c1@example.com,Ani,true\n", encoding="utf-8")
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,delivered_at,product_id,quantity,unit_price\n"
        "O-1,C-1,delivered,2026-11-01T10:00,0001-01-01T00:00:00,,,\n"
        "O-2,C-1,paid,9999-12-31T23:59:59-12:00,,P-1,1,1000\n"
        "O-3,C-1,paid,2026-11-02T10:00,,P-1,1,1000\n",
        encoding="utf-8",
    )
    assert kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))[0] == 0
    code, out = kembali(capsys, "--config", str(config), "import", "orders", str(tmp_path / "orders.csv"))
    assert code == 1 and "Traceback" not in out
    assert "orders.csv:2: id 'O-1': invalid delivered_at '0001-01-01T00:00:00' (out of range" in out
    assert "orders.csv:3: id 'O-2': invalid placed_at '9999-12-31T23:59:59-12:00' (out of range" in out
    assert "orders: 1 created, 0 updated, 0 unchanged, 2 rejected" in out


def test_a_suppression_file_that_is_not_utf8_is_named_by_line_and_nothing_is_imported(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bounces = tmp_path / "bounces.txt"  # a list saved as Windows-1252 by a spreadsheet
    bounces.write_bytes("siti@example.com\nagus@example.com\njos\u00e9@example.com\n".encode("cp1252"))
    code, out = kembali(capsys, "--config", str(config), "suppress", "import", str(bounces))
    assert code == 2 and "Traceback" not in out
    assert f"{bounces}: line 3: not UTF-8 text (byte 0xe9); save the file as UTF-8: nothing was imported" in out
    listed = kembali(capsys, "--config", str(config), "suppress", "list")[1]
    assert listed.splitlines()[1:] == ["0 suppressed address(es)"]


@pytest.mark.parametrize(
    ("argv", "exit_code"),
    [(["db", "status"], 2), (["db", "upgrade"], 2), (["preview"], 3), (["stats"], 3), (["ledger", "list"], 3),
     (["suppress", "list"], 3)],
)
def test_a_database_url_naming_a_file_that_is_no_database_is_named_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], exit_code: int
) -> None:
    not_a_db = tmp_path / "customers.csv"  # database.url pointed at the wrong file
    not_a_db.write_text(CUSTOMERS + "C-1,c1@example.com,Ani,true\n", encoding="utf-8")
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{not_a_db}"\n', encoding="utf-8")
    code, out = kembali(capsys, "--config", str(config), *argv)
    assert (code, "Traceback" in out) == (exit_code, False), out
    assert f"cannot open the database {not_a_db}: file is not a database" in out
    assert not_a_db.read_text(encoding="utf-8").startswith(CUSTOMERS)


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_a_preview_port_out_of_range_is_a_usage_error(
    config: Path, capsys: pytest.CaptureFixture[str], port: str
) -> None:
    code, out = kembali(capsys, "--config", str(config), "preview", "--serve", "--port", port)
    assert code == 2 and "Traceback" not in out
    assert f"argument --port: must be from 0 to 65535 (0: a free one), not {port}" in out


def test_a_preview_port_already_taken_names_it_and_what_to_do(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # it said only "[Errno 98] Address already in use"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config.write_text(config.read_text() + f'[templates]\ndir = "{TEMPLATES}"\n')  # (none: said first)
        code, out = kembali(capsys, "--config", str(config), "preview", "--serve", "--port", str(port))
    assert code == 2 and "Traceback" not in out
    assert (f"kembali preview --serve: cannot listen on 127.0.0.1:{port} (address already in use): give another "
            "--port (0 picks a free one)") in out  # fmt: skip


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        # nan compares false to everything: `rate <= 0` let it through, and a rate of nan let every message go at once
        ("[sending]\nrate_per_second = nan", "'sending.rate_per_second' must be a finite number, not nan"),
        ("[sending]\nretry_max_seconds = inf", "'sending.retry_max_seconds' must be a finite number, not inf"),
        ("[smtp]\ntimeout_seconds = -inf", "'smtp.timeout_seconds' must be a finite number, not -inf"),
        # a negative retry_base_seconds retried at once until the attempts ran out; under a retry_max_seconds of
        # 1e12 s a server's "try again in N hours" could put the next attempt past the year 9999 (an OverflowError)
        ("[sending]\nretry_base_seconds = -60.0", "'sending.retry_base_seconds' must be positive"),
        ("[sending]\nretry_base_seconds = 600.0\nretry_max_seconds = 60.0",
         "'sending.retry_max_seconds' must be at least retry_base_seconds and at most 31536000 (a year); it is 60"),
        # only the base given, above the maximum's default: the message says where the other number comes from
        ("[sending]\nretry_base_seconds = 86400.0",
         "'sending.retry_max_seconds' must be at least retry_base_seconds and at most 31536000 (a year); it is 21600 "
         "(the default is 21600), retry_base_seconds 86400"),
        ("[sending]\nretry_max_seconds = 1e12", "'sending.retry_max_seconds' must be at least retry_base_seconds"),
        # a value just past a bound is shown as written, not rounded to six digits onto the bound ("at most 31536000
        # (a year); it is 3.1536e+07", "at most 86400 seconds (a day), not 86400")
        ("[sending]\nretry_max_seconds = 31536001", "'sending.retry_max_seconds' must be at least retry_base_seconds "
         "and at most 31536000 (a year); it is 31536001 (the default"),
        ("[smtp]\ntimeout_seconds = 86400.01",
         "'smtp.timeout_seconds' must be at most 86400 seconds (a day), not 86400.01"),
        ("[sending]\nlease_seconds = 1000000",
         "'sending.lease_seconds' must be at most 86400 seconds (a day), not 1000000"),
    ],
)
def test_a_number_that_cannot_work_is_a_configuration_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, says: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "k.db"}"\n{setting}\n', encoding="utf-8")
    code, out = kembali(capsys, "--config", str(config), "db", "status")
    assert code == 2 and "Traceback" not in out
    assert re.search(re.escape(f"kembali: configuration error: {config}: ") + r"line \d+: " + re.escape(says), out), out


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_a_ledger_limit_below_one_is_a_usage_error(
    config: Path, capsys: pytest.CaptureFixture[str], limit: str
) -> None:
    # --limit 0 printed "no messages with status uncertain, failed" whatever the ledger held
    code, out = kembali(capsys, "--config", str(config), "ledger", "list", "--limit", limit)
    assert code == 2 and "Traceback" not in out and "no messages" not in out
    assert f"argument --limit: must be from 1 to 9223372036854775807, not {limit}" in out


def test_a_semicolon_separated_file_is_named_as_such(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Excel set to Indonesian (a decimal comma) saves "CSV" with semicolons: "missing column 'id'" alone, with the
    # id column right there in the header it shows, leaves the operator guessing
    (tmp_path / "customers.csv").write_text("id;email;name;marketing_consent\nC-1;c1@example.com;Ani;ya\n")
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))
    assert code == 2
    assert "line 1: missing column 'id' (found: id;email;name;marketing_consent); the columns are separated by ';': " \
           "save the file comma-separated" in out


def test_importing_a_folder_says_it_is_a_folder(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "exports").mkdir()
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "exports"))
    assert (code, out.strip()) == (2, f"kembali import: {tmp_path / 'exports'}: a folder, not a file")


@pytest.mark.parametrize("at", ["9999-12-31T23:00+00:00", "0001-01-01T00:00+14:00", "1900-01-01T00:00+14:00"])
def test_a_preview_moment_out_of_range_is_a_usage_error(
    config: Path, capsys: pytest.CaptureFixture[str], at: str
) -> None:
    # the first was past year 9999 in the shop's zone, the second before year 1 in UTC: OverflowError tracebacks;
    # the third, in year 1900 as written, was refused as before "year 1900": the bound is a moment in UTC
    code, out = kembali(capsys, "--config", str(config), "preview", "--at", at)
    assert code == 2 and "Traceback" not in out
    assert (f"argument --at: out of range: '{at}' (give a moment from 1900-01-01 00:00 UTC to the end of 8999)"
            in out)


def test_an_attribution_window_past_ten_years_is_a_usage_error(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 100000000 days added to an email's moment was an OverflowError traceback
    code, out = kembali(capsys, "--config", str(config), "stats", "--window-days", "100000000")
    assert code == 2 and "Traceback" not in out
    assert "argument --window-days: must be from 1 to 3650 (ten years), not 100000000" in out
    assert kembali(capsys, "--config", str(config), "stats", "--window-days", "3650")[0] == 0


@pytest.mark.parametrize(("given", "missing"), [("quiet_hours_start", "quiet_hours_end"),
                                                ("quiet_hours_end", "quiet_hours_start")])
def test_one_end_of_the_quiet_hours_alone_is_a_configuration_error(
    config: Path, capsys: pytest.CaptureFixture[str], given: str, missing: str
) -> None:
    # quiet_hours_start = "21:00" alone passed `check` and meant 21:00 to 00:00, the end's default
    config.write_text(config.read_text() + f'[policy]\n{given} = "21:00"\n')
    code, out = kembali(capsys, "--config", str(config), "check")
    assert code == 2 and "Traceback" not in out
    line = len(config.read_text().splitlines()) - 1  # [policy], the table the missing key belongs in
    assert f"configuration error: {config}: line {line}: 'policy.{missing}' is missing: 'policy.{given}' = '21:00' " \
           "needs it (give both; equal times mean no quiet hours)" in out


def test_a_web_port_already_taken_names_the_key_and_the_address(config: Path) -> None:
    # the daemon said only "[Errno 98] error while attempting to bind on address ('127.0.0.1', 8025): address
    # already in use", naming no key
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config.write_text(config.read_text() + f'[templates]\ndir = "{TEMPLATES}"\n[web]\nport = {port}\n')
        env = {**os.environ, "KEMBALI_LINK_SECRET": LINK_KEY}
        done = subprocess.run([sys.executable, "-m", "worker", "--config", str(config), "run"], env=env,
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    # with the line of the key, as every other configuration error names it (it named none)
    line = config.read_text().splitlines().index(f"port = {port}") + 1
    assert f"configuration error: {config}: line {line}: 'web.port': cannot listen on 127.0.0.1:{port} (address " \
           "already in use): another program listens there" in done.stderr, done.stderr


def test_a_templates_folder_that_is_not_there_is_named_with_the_line_of_its_key(config: Path) -> None:
    # `run --once`, `preview` and the daemon found the folder missing after the file was read, and named no line
    config.write_text(config.read_text() + '[templates]\n# the folder with the email templates\ndir = "nowhere"\n')
    line = config.read_text().splitlines().index('dir = "nowhere"') + 1
    env = {**os.environ, "KEMBALI_LINK_SECRET": LINK_KEY}
    for argv in (["run", "--once"], ["preview"], ["run"]):
        done = subprocess.run([sys.executable, "-m", "worker", "--config", str(config), *argv], env=env,
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert done.returncode == 2 and "Traceback" not in done.stderr, (argv, done.stderr)
        assert f"configuration error: {config}: line {line}: 'templates.dir' '{config.parent / 'nowhere'}' is not a " \
               "folder" in done.stderr, (argv, done.stderr)
    # and `check` reports it as a problem (exit 1) with the file and line too, as its secrets' problems name the file
    done = subprocess.run([sys.executable, "-m", "worker", "--config", str(config), "check"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"config: {config}: line {line}: 'templates.dir' '{config.parent / 'nowhere'}' is not a folder\n" \
           in done.stdout, done.stdout
    # its header said "about 0 sample renders", as if the templates were there and checked
    assert f"templates: {config.parent / 'nowhere'} (not checked: no such folder)\n" in done.stdout, done.stdout
    assert "sample renders" not in done.stdout


def test_a_stats_period_starting_in_the_future_is_a_usage_error(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # it printed "from 2999-01-01 to <today>" and an empty report
    code, out = kembali(capsys, "--config", str(config), "stats", "--since", "2999-01-01")
    assert code == 2 and "Traceback" not in out and "Kembali stats from" not in out
    assert "kembali stats: --since 2999-01-01 is after today (" in out and "give a day in the past" in out
    today = datetime.now(ZoneInfo("Asia/Jakarta")).date().isoformat()  # the shop's (shop.time_zone's default)
    assert kembali(capsys, "--config", str(config), "stats", "--since", today)[0] == 0
    # and the day of --now is "today" when it is given: on the shop's clock, as the report's days are
    code, out = kembali(capsys, "--config", str(config), "stats", "--since", "2026-11-21", "--now",
                        "2026-11-20T06:00+07:00")  # fmt: skip
    assert code == 2 and "kembali stats: --since 2026-11-21 is after the day of --now (2026-11-20, Asia/Jakarta)" in out
    assert kembali(capsys, "--config", str(config), "stats", "--since", "2026-11-20", "--now",
                   "2026-11-20T06:00+07:00")[0] == 0  # fmt: skip


def test_a_shop_currency_kembali_cannot_format_is_a_configuration_error(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "XYZ" was taken, and its amounts written with 2 decimals whatever the currency has
    config.write_text(config.read_text() + '[shop]\ncurrency = "XYZ"\n')
    code, out = kembali(capsys, "--config", str(config), "check")
    assert code == 2 and "Traceback" not in out
    line = len(config.read_text().splitlines())  # the last, where currency is written
    assert f"configuration error: {config}: line {line}: 'shop.currency' must be an ISO 4217 currency code such as " \
           "IDR, not 'XYZ'" in out


@pytest.mark.parametrize("currency", ["idr", "GBP", "THB", "KWD"])
def test_any_iso_4217_currency_in_any_case_is_taken(config: Path, capsys: pytest.CaptureFixture[str],
                                                    currency: str) -> None:  # fmt: skip
    config.write_text(config.read_text() + f'[shop]\ncurrency = "{currency}"\n')
    assert kembali(capsys, "--config", str(config), "db", "status")[0] == 0
    # (as its code: totals are compared with the orders' currency as stored, in capitals)
    assert load_settings(config).shop.currency == currency.upper()


@pytest.mark.parametrize(
    ("section", "key", "wrong", "right"),
    [
        ("shop", "reply_to", "Toko Kembali <cs@toko-kembali.example>", "cs@toko-kembali.example"),
        ("shop", "from_address", "halo@tökö.example", "halo@xn--tk-fkab.example"),
        ("unsubscribe", "mailto", "berhenti langganan@toko-kembali.example", "berhenti@toko-kembali.example"),
        ("shop", "domain", "tökö.example", "xn--tk-fkab.example"),
    ],
)
def test_an_address_no_message_can_carry_is_a_configuration_error_before_anything_is_planned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, smtp_server: RecordingServer,
    section: str, key: str, wrong: str, right: str,
) -> None:
    # every message carries these in a header (the domain ends each Message-ID): the MIME writer refused them, so
    # `run --once` marked every due message failed (render_error) for good, and fixing the setting sent none of them
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)
    url = f"sqlite:///{tmp_path / 'k.db'}"
    emails = sendkit.prepare_database(url, 3)
    raw = sendkit.settings_dict(url, smtp_server.port)
    raw.setdefault(section, {})[key] = wrong
    config = sendkit.write_config(tmp_path / "config.toml", raw)
    code, out = kembali(capsys, "--config", str(config), "run", "--once")
    assert (code, "Traceback" in out) == (2, False), out
    named = re.escape(f"configuration error: {config}: ") + r"line \d+: " + re.escape(f"'{section}.{key}' must be")
    assert re.search(named, out) and repr(wrong) in out
    assert smtp_server.messages == []
    raw[section][key] = right
    sendkit.write_config(config, raw)
    assert kembali(capsys, "--config", str(config), "run", "--once")[0] == 0
    assert sorted(m.rcpt_tos[0] for m in smtp_server.messages) == sorted(emails)


def test_control_bidi_and_invisible_characters_in_shop_data_do_not_reach_the_email(tmp_path: Path) -> None:
    # Given customers and a product whose texts carry a terminal escape, a bidi override, a zero-width space and
    # a carriage return, beside names in Arabic, Chinese and with emoji, imported with the real CLI
    site = make_site(tmp_path / "shop")
    (tmp_path / "customers.csv").write_text(
        "id,email,name,marketing_consent,locale\n"
        'X-1,x1@example.com,"Ani\x1b[31mRED\x1b[0m Susanto",true,en\n'
        'X-2,x2@example.com,"Budi\u202eodnaL\u202c Santoso",true,id\n'
        'X-3,x3@example.com,"Ci\u200bti\rZ\x85",true,en\n'
        'X-4,x4@example.com,"محمد Ali 李明 👩\u200d👩\u200d👧",true,en\n',
        encoding="utf-8",
    )
    (tmp_path / "products.csv").write_text(
        'id,name,price,category\nP-1,"Batik\u202e%05 FFO\u202c \x1b[2JTulis",100000,"Kain\u200bBatik"\n'
        'P-2,"Batik\u202e%05 FFO\u202c \x1b[2JTulis",100000,Kain Batik\n',
        encoding="utf-8",
    )
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,product_id,quantity,unit_price\n"
        + "".join(f"O-{i},X-{i},delivered,2026-01-01T10:00,P-2,1,100000\n" for i in range(1, 5)),
        encoding="utf-8",
    )
    for kind in ("customers", "products", "orders"):
        done = site.cli("import", kind, str(tmp_path / f"{kind}.csv"))
        # (a category, as an id, may hold no invisible character: that product is a rejected row, named)
        assert (done.returncode, "U+200B ZERO WIDTH SPACE" in done.stderr) == (
            (1, True) if kind == "products" else (0, False)), done.stdout + done.stderr

    # When the win-back emails are previewed into a folder
    out = tmp_path / "out"
    done = site.cli("preview", "--at", "2026-12-05T10:00+07:00", "--campaign", "winback", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr

    # Then no part of any email holds a control character (bar the line breaks), a bidi control or an invisible
    # character, and the names read as they were meant
    parser = BytesParser(policy=policy.default)
    texts = {}
    for path in sorted(out.glob("*.eml")):
        parsed = parser.parsebytes(path.read_bytes())
        parts = [str(parsed["Subject"]), str(parsed["To"])] + [p.get_content() for p in parsed.iter_parts()]
        for part in parts:
            bad = [ch for ch in part if (ch not in "\r\n" and unicodedata.category(ch) in ("Cc", "Zl", "Zp"))
                   or ch in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200b\ufeff"]  # fmt: skip
            assert not bad, (path.name, bad)
        texts[path.name.split("_")[1]] = parts[2]  # the text part, by customer id
    assert set(texts) == {"X-1", "X-2", "X-3", "X-4"}
    assert "Hi Ani," in texts["X-1"]  # the escape split the name: its first word is Ani
    assert "Halo Kak BudiodnaL," in texts["X-2"]
    assert "Hi Citi," in texts["X-3"]
    assert "Hi محمد," in texts["X-4"]
    assert "Batik%05 FFO [2JTulis" in texts["X-1"]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_render_error_quoting_a_lot_of_data_logs_a_line_of_bounded_length(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, smtp_server: RecordingServer,
    log_format: str,
) -> None:  # fmt: skip
    # Given templates whose subject looks up a key built from the customer's name, 2000 times over: Jinja2's
    # error quotes the key, 30,000 characters of it
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)
    shutil.copytree(TEMPLATES, tmp_path / "templates")
    for subject in (tmp_path / "templates").glob("*/*/subject.txt"):
        subject.write_text("{{ shop[customer.name * 2000] }}\n", encoding="utf-8")
    url = f"sqlite:///{tmp_path / 'k.db'}"
    sendkit.prepare_database(url, 4)
    raw = sendkit.settings_dict(url, smtp_server.port)
    raw["templates"] = {"dir": str(tmp_path / "templates")}
    raw["policy"] = {"quiet_hours_start": "00:00", "quiet_hours_end": "00:00"}
    raw["logging"] = {"format": log_format}
    config = sendkit.write_config(tmp_path / "config.toml", raw)

    # When a preview renders the due messages, then a run
    code, out = kembali(capsys, "--config", str(config), "preview")
    assert code == 1 and "render error (1 message): " in out, out[:2000]
    assert max(map(len, out.splitlines())) < 600 and "chars)" in out
    code, out = kembali(capsys, "--config", str(config), "run", "--once")

    # Then each failure is logged on one line of bounded length that says what failed, and the JSON parses
    assert code == 1, out
    failed = [line for line in out.splitlines() if "email_render_failed" in line]
    assert failed and smtp_server.messages == []
    for line in failed:
        assert len(line) < 1300, len(line)
        assert "subject.txt:1: UndefinedError: 'dict object' has no attribute 'Pelanggan" in line
        assert "chars)" in line
        if log_format == "json":
            assert json.loads(line)["error"].endswith(" chars)")
    # And the ledger keeps where it failed and that the message was cut
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        query = sa.select(sendkit.A.c.reply).where(sendkit.A.c.outcome == "render_error")
        replies = list(conn.execute(query).scalars())
    engine.dispose()
    assert replies and all(r.startswith("winback/") and r.endswith(" chars)") for r in replies), replies


@pytest.mark.parametrize(
    ("hidden", "named"),
    [("\u202e", "U+202E RIGHT-TO-LEFT OVERRIDE"), ("\x9b", "U+009B"), ("\u200b", "U+200B ZERO WIDTH SPACE"),
     ("\u2028", "U+2028 LINE SEPARATOR"), ("\u00a0", "U+00A0 NO-BREAK SPACE"), ("\x1b", "U+001B")],
)
def test_a_product_link_with_a_bidi_control_or_an_invisible_character_is_a_rejected_row(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str], hidden: str, named: str
) -> None:
    # a link is printed as it is in the text part of every email naming the product: "https://toko.example/p/
    # \u202emoc.live" reads as another address, a C1 CSI (U+009B) is a terminal's escape; only ASCII controls and
    # spaces were refused
    (tmp_path / "products.csv").write_text(
        "id,name,price,url,image_url\n"
        f"P-1,Batik,100000,https://toko.example/p/{hidden}moc.live,\n"
        f"P-2,Kopi,100000,https://toko.example/p/kopi,https://toko.example/i/{hidden}kopi.jpg\n"
        "P-3,Teh,100000,https://toko.example/p/teh-hijau-\u00e9,https://toko.example/i/teh.jpg\n",
        encoding="utf-8",
    )
    code, out = kembali(capsys, "--config", str(config), "import", "products", str(tmp_path / "products.csv"))
    assert code == 1 and hidden not in out, out
    shown = f"https://toko.example/p/{hidden}moc.live"
    assert f"products.csv:2: id 'P-1': invalid url {shown!r} (expected an http(s) URL: {named} at character 24)" \
        in out, out
    assert "products.csv:3: id 'P-2': invalid image_url" in out, out
    assert "products: 1 created, 0 updated, 0 unchanged, 2 rejected" in out, out  # a letter with an accent is a link


def test_a_product_link_with_a_broken_bracketed_host_is_a_rejected_row_and_the_rest_is_imported(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # an unclosed or bad IPv6 bracket made urlsplit raise "Invalid IPv6 URL": the import stopped with a traceback,
    # no product of the file imported
    (tmp_path / "products.csv").write_text(
        "id,name,price,url,image_url\n"
        "P-1,Batik,100000,http://[bad,\n"
        "P-2,Kopi,100000,https://toko.example/p/kopi,https://[::1/i/kopi.jpg\n"
        "P-3,Teh,100000,https://toko.example/p/teh,https://toko.example/i/teh.jpg\n"
        "P-4,Gula,100000,https://toko.example:99999/p/gula,\n",
        encoding="utf-8",
    )
    code, out = kembali(capsys, "--config", str(config), "import", "products", str(tmp_path / "products.csv"))
    assert code == 1, out
    assert "products.csv:2: id 'P-1': invalid url 'http://[bad' (expected an http(s) URL: Invalid IPv6 URL)" in out, out
    assert "products.csv:3: id 'P-2': invalid image_url 'https://[::1/i/kopi.jpg' (expected an http(s) URL" in out, out
    assert "products.csv:5: id 'P-4': invalid url 'https://toko.example:99999/p/gula' (expected an http(s) URL: " \
        "Port out of range 0-65535)" in out, out
    assert "products: 1 created, 0 updated, 0 unchanged, 3 rejected" in out, out


def test_a_product_link_stored_with_a_bidi_control_links_the_email_to_the_shop_instead(tmp_path: Path) -> None:
    # Given products whose links an earlier Kembali imported with a bidi override, a C1 control and a zero-width
    # space in them (it refused only ASCII controls and spaces)
    site = make_site(tmp_path / "shop")
    now = datetime(2026, 12, 5, 3, 0, tzinfo=UTC)
    from tests.shop import customer, one_time_order
    from worker.adapters import db, shop
    from worker.domain import Locale, ProductRecord

    engine = db.create_engine(site.settings.database_url)
    try:
        shop.upsert_products(engine, [ProductRecord("P-KOPI", "Kopi", "Kopi", 89_000_00, "IDR",
                                                    "https://toko.example/p/\u202emoc.live\x9b2J",
                                                    "https://toko.example/i/\u200bkopi.jpg", None, True)], now)
        shop.upsert_customers(engine, [customer("C-1", locale=Locale.EN)], now)
        shop.upsert_orders(engine, [one_time_order("O-1", "C-1", days_ago=60)], now)
    finally:
        engine.dispose()
    # When the win-back email is previewed into a folder
    out = tmp_path / "out"
    done = site.cli("preview", "--at", "2026-12-05T10:00+07:00", "--campaign", "winback", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    # Then neither part carries the link as stored: the product links to the shop, and shows no picture
    [eml] = out.glob("*.eml")
    parsed = BytesParser(policy=policy.default).parsebytes(eml.read_bytes())
    text, html = (part.get_content() for part in parsed.iter_parts())
    for part in (text, html):
        assert "moc.live" not in part and "kopi.jpg" not in part, part
        assert not any(ch in part for ch in "\u202e\x9b\u200b"), part
    assert f"Kopi from Toko Kembali:\n{site.settings.shop.base_url}\n" in text.replace("\r\n", "\n"), text


@pytest.mark.parametrize("hidden", ["\u3164", "\u115f", "\u034f", "\ufe0f"])
def test_a_stored_product_link_with_an_invisible_letter_the_importer_refuses_is_not_printed(hidden: str) -> None:
    # the importer refuses these in a link (Hangul fillers, the grapheme joiner, a variation selector: printable to
    # Python, invisible on screen); a product an earlier import stored so links to the shop, as one with a bidi
    # control does, and shows no picture
    from worker.core.render import product_dict
    from worker.domain import ProductView

    product = ProductView("P-1", "Kopi", "", 89_000_00, "IDR", f"https://toko.example/p/{hidden}kopi",
                          f"https://toko.example/i/{hidden}kopi.jpg")
    shown = product_dict(product, "https://toko.example/")
    assert (shown["url"], shown["image_url"]) == ("https://toko.example/", ""), shown
