"""The `kembali` command end to end, as an operator runs it: real processes, files, SQLite and SMTP."""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from email.parser import BytesParser
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from tests.clikit import run_cli, run_on_a_terminal
from tests.db_fixtures import migrate
from tests.shop import LINK_KEY, ROOT, TEMPLATES
from tests.smtp_server import Behaviour, RecordingServer, closed_port
from worker.adapters.store import Store
from worker.cli import EXAMPLES, _parser
from worker.config import load_settings
from worker.demo import generate_shop, write_csvs

COMMANDS = ["demo", "db", "import", "run", "preview"]


def kembali(*args: str, config: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "KEMBALI_LINK_SECRET": LINK_KEY, **(env or {})}
    argv = [sys.executable, "-m", "worker", *(["--config", str(config)] if config else []), *args]
    return subprocess.run(argv, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def write_config(folder: Path, *, smtp_port: int | None = None, extra: str = "") -> Path:
    if smtp_port is None:  # one nobody listens on: port 25 reached the machine's own mail server, if it has one
        smtp_port = closed_port()
    path = folder / "config.toml"
    path.write_text(
        f"""
[database]
url = "sqlite:///{folder / 'shop.db'}"
[smtp]
host = "127.0.0.1"
port = {smtp_port}
tls = "none"
timeout_seconds = 10.0
[templates]
dir = "{TEMPLATES}"
[sending]
rate_per_second = 2000.0
burst = 500
{extra}
""",
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself(command: str) -> None:
    result = kembali(command, "--help")
    assert result.returncode == 0
    assert "usage: kembali" in result.stdout and len(result.stdout.splitlines()) > 4


def test_top_level_help_lists_the_commands() -> None:
    result = kembali("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout
    # and what its exit codes mean (they were only in the README)
    text = " ".join(result.stdout.split())
    assert "Exit codes: 0 done; 1 done, but something needs you" in text and "130/143 stopped by SIGINT/SIGTERM" in text


def test_a_mistyped_key_stops_the_program_naming_the_key_and_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, extra="[campaigns.winback]\nquiet_dayz = 30\n")
    result = kembali("db", "upgrade", config=config)
    assert result.returncode == 2
    assert "campaigns.winback.quiet_dayz" in result.stderr and str(config) in result.stderr
    assert "did you mean 'campaigns.winback.quiet_days'" in result.stderr
    assert not (tmp_path / "shop.db").exists()


def test_plaintext_smtp_to_a_remote_host_is_refused_unless_forced(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace('host = "127.0.0.1"', 'host = "smtp.example.com"'))
    result = kembali("db", "upgrade", config=config)
    assert result.returncode == 2 and "smtp.tls" in result.stderr and "allow_plaintext_remote" in result.stderr


def test_bad_csv_rows_are_named_by_line_and_the_rest_imported(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    assert kembali("db", "upgrade", config=config).returncode == 0
    result = kembali("import", "customers", str(ROOT / "examples" / "customers_bad.csv"), config=config)
    assert result.returncode == 1, result.stderr
    rejected = [line for line in result.stderr.splitlines() if line.startswith("rejected ")]
    lines = {int(line.split(":")[1]) for line in rejected}
    # broken addresses, missing fields, a duplicate id, a reserved domain, a stray field, no id
    assert lines == {3, 4, 5, 6, 7, 9, 20, 21, 22}
    # and an unclear consent (empty, 'maybe') is saved as none, with a warning at its line
    unclear = [line for line in result.stderr.splitlines() if "unclear marketing_consent" in line]
    assert {int(line.split(":")[2]) for line in unclear} == {8, 16}
    # and a birthday that is none (30 Feb, 29 Feb 1990) is left out, the customer imported, with a warning
    left_out = [line for line in result.stderr.splitlines() if "imported without it" in line]
    assert {int(line.split(":")[2]) for line in left_out} == {11, 17}
    # and so is a zone that is none or a language the shop has no templates in: imported with the shop's
    shops = [line for line in result.stderr.splitlines() if "imported with the shop's" in line]
    assert {int(line.split(":")[2]) for line in shops} == {10, 12}
    assert "customers_bad.csv:3: id 'C-0102'" in result.stderr and "email" in result.stderr
    assert "duplicate" in result.stderr
    with sqlite3.connect(tmp_path / "shop.db") as conn:
        imported = {row[0] for row in conn.execute("select external_id from customer")}
    # the good rows, including the hostile (but valid) name and the quoted multi-line name
    assert {"C-0101", "C-0111", "C-0112", "C-0115", "C-0118"} <= imported
    assert "C-0102" not in imported
    assert "customers: " in result.stdout and ("9 rejected, 2 with an unclear marketing_consent, "
                                          "2 imported without their birthday, 1 imported without their time_zone, "
                                          "1 imported without their locale") in result.stdout
    # importing the same file again changes nothing
    again = kembali("import", "customers", str(ROOT / "examples" / "customers_bad.csv"), config=config)
    assert "0 created, 0 updated" in again.stdout


def test_the_examples_import_cleanly_and_twice_changes_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    upgraded = kembali("db", "upgrade", config=config)
    assert upgraded.returncode == 0, upgraded.stderr
    for kind in ("customers", "products", "orders"):
        first = kembali("import", kind, str(ROOT / "examples" / f"{kind}.csv"), config=config)
        assert first.returncode == 0, first.stderr
        assert " 0 rejected" in first.stdout
        second = kembali("import", kind, str(ROOT / "examples" / f"{kind}.csv"), config=config)
        assert " 0 created, 0 updated," in second.stdout


def _weeks_ahead() -> str:
    """``preview --at`` for a shop ``_shop_in`` made: 10:00 in Jakarta six weeks after the real now, when its
    history (which ends at the real now) is behind it. A fixed date (2027-01-15) previewed nothing once it passed:
    the customers were imported after it."""
    day = (datetime.now(UTC) + timedelta(weeks=6)).date()
    return datetime(day.year, day.month, day.day, 10, 0, tzinfo=timezone(timedelta(hours=7))).isoformat(
        timespec="minutes")


def _migrated(config: Path) -> None:
    """The config's new SQLite file with the newest schema, a copy of the session's migrated one, where the tests
    ran `kembali db upgrade` (1-2 s of starting a process and migrating) to set up what they test (the tests above
    run it as the README's steps do)."""
    migrate(load_settings(config).database_url)


def _shop_in(tmp_path: Path, config: Path, customers: int) -> None:
    data = write_csvs(generate_shop(seed=3, customers=customers, now=datetime.now(UTC)), tmp_path / "data")
    _migrated(config)
    for kind in ("customers", "products", "orders"):
        result = kembali("import", kind, str(data[kind]), config=config)
        assert result.returncode == 0, result.stderr


def test_two_runs_started_together_deliver_each_email_exactly_once(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    config = write_config(tmp_path, smtp_port=smtp_server.port)
    _shop_in(tmp_path, config, customers=400)
    env = {**os.environ, "KEMBALI_LINK_SECRET": LINK_KEY}
    argv = [sys.executable, "-m", "worker", "--config", str(config), "run", "--once"]
    procs = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    ids = Counter(str(BytesParser(policy=policy.default).parsebytes(m.data, headersonly=True)["Message-ID"])
                  for m in smtp_server.messages)
    assert ids and max(ids.values()) == 1, "a message arrived twice"
    store = Store.from_url(f"sqlite:///{tmp_path / 'shop.db'}")
    try:
        rows = store.messages(limit=10_000)
    finally:
        store.close()
    assert {r["status"] for r in rows} == {"sent"}
    assert set(ids) == {r["message_id"] for r in rows}
    sent_lines = [line for out, _ in outputs for line in out.splitlines() if line.startswith("sent ")]
    assert sum(int(line.split()[1]) for line in sent_lines) == len(rows)


def test_run_once_ends_saying_how_many_messages_wait_and_when_the_first_falls_due(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # "planned 2 new birthday emails" then "sent 1 birthday email" said nothing of the other: planned ahead of its
    # day, or held back by the frequency cap, it waits in the queue, and the run now says so and until when
    news = "[campaigns.new_products]\nenabled = true\n[policy]\nfrequency_caps = [[1, 3]]\n"
    config = write_config(tmp_path, smtp_port=smtp_server.port, extra=news)
    _shop_in(tmp_path, config, customers=120)
    result = kembali("run", "--once", config=config)
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(tmp_path / "shop.db") as conn:
        waiting, first = conn.execute("SELECT count(*), min(next_attempt_at) FROM message "
                                      "WHERE status IN ('planned', 'retry')").fetchone()  # fmt: skip
    # customers due win-back and news on one day: the cap holds the second back
    assert waiting > 1, result.stdout
    local = datetime.fromisoformat(first).replace(tzinfo=UTC).astimezone(ZoneInfo("Asia/Jakarta"))
    assert local > datetime.now(UTC)
    assert (f"{waiting} messages wait in the queue for a later run (the first falls due "
            f"{local:%Y-%m-%d %H:%M} WIB)") in result.stdout.splitlines(), result.stdout


def test_with_no_cap_a_second_run_a_minute_later_sends_without_holding_for_another_worker(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # frequency_caps = [] and one worker: a run that sent win-back emails, then one a minute later with the news
    # turned on, sent half the news and said "33 deferred:another_worker" (held back a minute at the mark for the
    # cap, for the first run's sends), with no other worker and no cap to keep
    config = write_config(tmp_path, smtp_port=smtp_server.port, extra="[policy]\nfrequency_caps = []\n")
    _shop_in(tmp_path, config, customers=120)
    first = kembali("run", "--once", config=config)
    assert first.returncode == 0 and re.search(r"^sent \d+ win-back emails$", first.stdout, re.M), first.stdout
    news = "[campaigns.new_products]\nenabled = true\n[policy]\nfrequency_caps = []\n"
    config = write_config(tmp_path, smtp_port=smtp_server.port, extra=news)
    second = kembali("run", "--once", config=config)
    assert second.returncode == 0, second.stderr
    planned = re.search(r"^planned (\d+) new new-product emails$", second.stdout, re.M)
    assert planned and int(planned[1]) > 10, second.stdout
    assert f"sent {planned[1]} new-product emails" in second.stdout.splitlines(), second.stdout
    assert "another_worker" not in second.stdout + second.stderr
    with sqlite3.connect(tmp_path / "shop.db") as conn:
        assert conn.execute("SELECT count(*) FROM message WHERE status <> 'sent'").fetchone() == (0,)


def test_preview_shows_who_would_get_what_and_writes_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    _shop_in(tmp_path, config, customers=60)
    db_file = tmp_path / "shop.db"
    ran = kembali("run", "--once", config=config, env={"KEMBALI_LINK_SECRET": LINK_KEY})  # nothing listens: all retry
    # (a ledger of planned and retried rows for the preview to leave alone: the run paused, exit 3, sending none)
    assert ran.returncode == 3 and "PAUSED: sending stopped after" in ran.stdout, ran.stdout + ran.stderr
    with sqlite3.connect(db_file) as conn:
        statuses = dict(conn.execute("SELECT status, count(*) FROM message GROUP BY status").fetchall())
    assert set(statuses) == {"planned", "retry"}, statuses
    before = hashlib.sha256(db_file.read_bytes()).hexdigest()
    result = kembali("preview", "--at", _weeks_ahead(), config=config)
    assert result.returncode == 0, result.stderr
    assert "nothing is sent or written" in result.stdout
    assert "winback/1" in result.stdout and "would be sent" in result.stdout
    assert hashlib.sha256(db_file.read_bytes()).hexdigest() == before


def test_preview_with_a_link_key_too_short_says_so_not_that_it_is_unset(tmp_path: Path) -> None:
    # an operator who exported a key of 10 characters read "KEMBALI_LINK_SECRET is not set", and the run refused it
    config = write_config(tmp_path)
    _shop_in(tmp_path, config, customers=20)
    result = kembali("preview", config=config, env={"KEMBALI_LINK_SECRET": "ten-chars!"})
    assert result.returncode == 0, result.stderr
    assert "the key in KEMBALI_LINK_SECRET is too short" in result.stderr and "is not set" not in result.stderr
    assert "preview links use a throwaway key" in result.stderr and "ten-chars!" not in result.stderr


def test_preview_with_a_link_key_exported_empty_says_it_is_empty_not_unset(tmp_path: Path) -> None:
    # `KEMBALI_LINK_SECRET= kembali preview` (or an unexpanded ${VAR}) read "KEMBALI_LINK_SECRET is not set"
    config = write_config(tmp_path)
    _shop_in(tmp_path, config, customers=20)
    result = kembali("preview", config=config, env={"KEMBALI_LINK_SECRET": ""})
    assert result.returncode == 0, result.stderr
    assert "note: KEMBALI_LINK_SECRET is set but empty; preview links use a throwaway key" in result.stderr


def test_preview_with_the_link_key_written_where_its_variable_is_named_never_shows_it(tmp_path: Path) -> None:
    # A link key of letters and digits alone (half of token_urlsafe's) passes for a variable's name: the note read
    # "note: Zq7… is not set; preview links use a throwaway key"
    config = write_config(tmp_path)
    _shop_in(tmp_path, config, customers=20)
    text = config.read_text(encoding="utf-8")
    key = "Zq7Lm2P0aQ7vN3rT8yW5kq9x"
    config.write_text(text.replace("[unsubscribe]\n", f'[unsubscribe]\nsecret_env = "{key}"\n') if "[unsubscribe]\n"
                      in text else text + f'\n[unsubscribe]\nsecret_env = "{key}"\n', encoding="utf-8")
    result = kembali("preview", config=config)
    assert result.returncode == 0, result.stderr
    assert "unsubscribe.secret_env names (its name not shown" in result.stderr, result.stderr
    assert key not in result.stdout + result.stderr


def test_the_demo_refuses_a_link_key_too_short_before_it_builds_anything(tmp_path: Path) -> None:
    # Given a key exported too short (a truncated paste): the demo built and imported the whole shop, started the
    # sink, and only then stopped on it
    out = tmp_path / "demo"
    result = kembali("demo", "--out", str(out), "--customers", "30", env={"KEMBALI_LINK_SECRET": "ten-chars!"})
    # Then it stops at once, exit code 2 (nothing done), saying what is wrong with the key, never showing it
    assert result.returncode == 2, result.stdout + result.stderr
    assert "the key in KEMBALI_LINK_SECRET is too short (10 characters; use at least 16)" in result.stderr
    assert "ten-chars!" not in result.stdout + result.stderr
    assert not out.exists() and "local SMTP sink" not in result.stdout


def test_the_demo_with_a_link_key_exported_empty_says_so_and_signs_with_a_throwaway_key(tmp_path: Path) -> None:
    result = kembali("demo", "--out", str(tmp_path / "demo"), "--customers", "30", env={"KEMBALI_LINK_SECRET": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(demo) KEMBALI_LINK_SECRET is set but empty: signing links with a throwaway key" in result.stdout


@pytest.mark.parametrize("login", ["refused", "accepted"])
def test_no_secret_is_ever_printed(tmp_path: Path, smtp_server: RecordingServer, login: str) -> None:
    password = "Sup3r-Secret-Pa55word"
    # the server offers AUTH and takes the password, or refuses it (535): either way the password was sent
    smtp_server.login = ("shop", password if login == "accepted" else "another-password")
    config = write_config(tmp_path, smtp_port=smtp_server.port)
    config.write_text(config.read_text().replace('tls = "none"', 'tls = "none"\nusername = "shop"'))
    _shop_in(tmp_path, config, customers=20)
    result = kembali("run", "--once", "--log-level", "debug", config=config,  # the most it ever says
                     env={"KEMBALI_SMTP_PASSWORD": password})
    if login == "refused":  # sending pauses at once, naming the setting and the variable, not the password
        assert result.returncode == 3, result.stderr
        assert "dispatcher_paused" in result.stderr and "KEMBALI_SMTP_PASSWORD" in result.stdout + result.stderr
        assert smtp_server.messages == []
    else:
        assert result.returncode == 0, result.stderr
        assert smtp_server.messages
    assert password not in result.stdout + result.stderr
    assert LINK_KEY not in result.stdout + result.stderr


def test_missing_link_key_is_a_clear_configuration_error_and_nothing_is_planned(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    _shop_in(tmp_path, config, customers=40)  # customers due a win-back
    result = kembali("run", "--once", config=config, env={"KEMBALI_LINK_SECRET": ""})
    assert result.returncode == 2 and "KEMBALI_LINK_SECRET" in result.stderr
    # exit 2 means nothing was done: the ledger is as empty as before
    store = Store.from_url(load_settings(config).database_url)
    try:
        assert store.messages(limit=10) == []
    finally:
        store.close()


def test_running_without_a_schema_says_what_to_do(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = kembali("run", "--once", config=config)
    assert result.returncode == 3 and f"`kembali --config {config} db upgrade`" in result.stderr, result.stderr


def test_the_demo_sends_win_back_emails_to_a_local_sink(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = kembali("demo", "--out", str(out), env={"KEMBALI_LINK_SECRET": ""})
    assert result.returncode == 0, result.stderr
    summary = [line for line in result.stdout.splitlines() if line.startswith("sent ")]
    winback = [line for line in summary if "win-back emails" in line]
    assert winback and int(winback[0].split()[1]) > 10
    # what was planned and not sent is accounted for: the win-back's holdout (5 % in config.toml) gets no email
    assert re.search(r"^planned \d+ new win-back emails \(5% of the audience held out: no email, to measure the "
                     r"lift\)$", result.stdout, re.M), result.stdout
    assert {"birthday", "feedback-request", "loyalty", "new-product"} & {line.split()[2] for line in summary}
    # and what the frequency cap held back is said to wait, not left to be found
    assert re.search(r"^\d+ messages wait in the queue for a later run \(the first falls due "
                     r"\d{4}-\d\d-\d\d \d\d:\d\d WIB\)$", result.stdout, re.M), result.stdout
    sent = sum(int(line.split()[1]) for line in summary)  # every campaign's line
    files = sorted((out / "sent").glob("*.eml"))
    assert len(files) == sent
    for path in files:
        message = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
        assert message.get_content_type() == "multipart/alternative" and message["List-Unsubscribe"]


def test_a_demo_whose_templates_fail_for_some_customers_exits_1(tmp_path: Path) -> None:
    # `kembali demo --help` said "Exit code 1 if a message was not sent"; a demo run on templates being edited, whose
    # win-back failed for some customers ("12 failed:render_error" in its summary), exited 0
    shutil.copytree(TEMPLATES.parent, tmp_path / "templates")
    shutil.copy(ROOT / "config.toml", tmp_path / "config.toml")
    for body in (tmp_path / "templates" / "email").glob("winback*/*/body.html"):
        text = body.read_text(encoding="utf-8")
        body.write_text(text.replace("{% block content %}", "{% block content %}{% if customer.first_name[:1] in "
                                     "'ABCDEFGHIJ' %}{{ 1 // 0 }}{% endif %}", 1), encoding="utf-8")
    env = {**os.environ, "KEMBALI_LINK_SECRET": ""}
    env.pop("KEMBALI_CONFIG", None)
    result = subprocess.run([sys.executable, "-m", "worker", "demo", "--customers", "60"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert re.search(r"^sent \d+ win-back emails?, .*\d+ failed:render_error", result.stdout, re.M), result.stdout
    assert result.returncode == 1, result.stdout


@pytest.mark.parametrize("broken", ["syntax error", "a language deleted"])
def test_a_demo_whose_templates_run_once_refuses_stops_before_building_anything(tmp_path: Path, broken: str) -> None:
    # Given the shop's templates with a file that cannot be parsed, or without English: `run --once` refuses them
    # with exit code 2 before planning anything; the demo (which runs "one full cycle" as it does) built its shop,
    # imported it, planned and sent, failed every English win-back email (one `failed:render_error` each, left in
    # its ledger) and exited 1
    shutil.copytree(TEMPLATES.parent, tmp_path / "templates")
    shutil.copy(ROOT / "config.toml", tmp_path / "config.toml")
    winback_en = tmp_path / "templates" / "email" / "winback" / "en"
    if broken == "syntax error":
        body = winback_en / "body.txt"
        body.write_text(body.read_text(encoding="utf-8") + "{% if %}\n", encoding="utf-8")
    else:
        shutil.rmtree(winback_en)
    env = {**os.environ, "KEMBALI_LINK_SECRET": ""}
    env.pop("KEMBALI_CONFIG", None)
    # When the operator tries the demo
    result = subprocess.run([sys.executable, "-m", "worker", "demo", "--customers", "60"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    # Then it stops as `run --once` would, naming the file, before it builds, imports, plans or sends anything
    assert result.returncode == 2, result.stdout + result.stderr
    named = "winback/en/body.txt:" if broken == "syntax error" else "winback/en/subject.txt"
    assert named in result.stderr and "nothing was planned or sent" in result.stderr, result.stderr
    assert "demo shop:" not in result.stdout and "planned" not in result.stdout, result.stdout
    assert not (tmp_path / "demo-out").exists()


def test_the_demo_runs_from_a_folder_without_a_config(tmp_path: Path) -> None:
    # the demo's help says it touches nothing outside --out; it stopped at "config.toml: config file not found"
    env = {**os.environ, "KEMBALI_LINK_SECRET": ""}
    env.pop("KEMBALI_CONFIG", None)
    result = subprocess.run([sys.executable, "-m", "worker", "demo", "--customers", "30"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"(demo) no config.toml in this folder: using the project's, {ROOT / 'config.toml'}" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-out"]
    assert list((tmp_path / "demo-out" / "sent").glob("*.eml"))


def test_the_command_the_demo_suggests_runs_without_the_venv_activated(tmp_path: Path) -> None:
    # README's first command is `.venv/bin/kembali demo`, with the venv not activated: the demo's closing line said
    # "look around: kembali --config … preview", which the shell answered with "kembali: command not found"
    env = {**os.environ, "KEMBALI_LINK_SECRET": "", "PATH": "/usr/bin:/bin"}
    env.pop("KEMBALI_CONFIG", None)
    result = subprocess.run([sys.executable, "-m", "worker", "demo", "--customers", "30"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("look around: ")]
    command = line.removeprefix("look around: ").partition("   (")[0]
    suggested = subprocess.run(command, shell=True, cwd=tmp_path, env={**env, "KEMBALI_LINK_SECRET": LINK_KEY},  # noqa: S602
                               capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert suggested.returncode == 0, (command, suggested.stderr)
    assert "nothing is sent or written" in suggested.stdout


@pytest.mark.parametrize("named", ["--config", "KEMBALI_CONFIG"])
def test_the_demo_never_swaps_a_config_the_operator_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, named: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEMBALI_CONFIG", raising=False)
    if named == "KEMBALI_CONFIG":
        monkeypatch.setenv("KEMBALI_CONFIG", "config.toml")
        argv = ["demo"]
    else:
        argv = ["--config", "config.toml", "demo"]
    code, out = run_cli(capsys, *argv)
    assert code == 2 and "using the project's" not in out
    named_by = " (named by $KEMBALI_CONFIG)" if named == "KEMBALI_CONFIG" else ""
    assert f"config.toml{named_by}: config file not found" in out
    assert not (tmp_path / "demo-out").exists()


def test_the_demo_without_a_config_anywhere_says_what_it_needs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.commands import demo

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEMBALI_CONFIG", raising=False)
    monkeypatch.setattr(demo, "PROJECT", tmp_path / "site-packages")  # installed from a wheel: no shipped config
    code, out = run_cli(capsys, "demo")
    assert code == 2 and "Traceback" not in out
    assert "config.toml: config file not found; kembali demo needs a config.toml and its templates " \
           "(templates/email/): run it in the project's folder or give --config FILE" in out
    assert list(tmp_path.iterdir()) == []


def test_an_order_for_an_unknown_customer_is_named_by_line(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    _migrated(config)
    customers = kembali("import", "customers", str(ROOT / "examples" / "customers.csv"), config=config)
    assert customers.returncode == 0, customers.stderr  # (C-0001 and C-0002 known: C-9999 alone is unknown)
    orders = tmp_path / "orders.csv"
    orders.write_text(
        "order_id,customer_id,status,placed_at,total,product_id,quantity,unit_price\n"
        "X-1,C-0001,delivered,2026-09-01 10:00,89000,,,\n"
        "X-2,C-9999,delivered,2026-09-01 10:00,,P-1,1,89000\n"
        "X-2,C-9999,delivered,2026-09-01 10:00,,P-2,1,10000\n"
        "X-3,C-0002,paid,2026-09-02 10:00,120000,,,\n",
        encoding="utf-8",
    )
    result = kembali("import", "orders", str(orders), config=config)
    assert result.returncode == 1
    assert "rejected orders.csv:3: id 'X-2': unknown customer id 'C-9999'" in result.stderr
    assert "orders: 2 created, 0 updated, 0 unchanged, 1 rejected" in result.stdout


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["insights", "--bin-days", "0"], "must be at least 1, not 0"),
        (["insights", "--share", "1.5"], "must be more than 0 and less than 1, not 1.5"),
        (["insights", "--share", "nan"], "must be more than 0 and less than 1, not nan"),
        (["preview", "--limit", "0"], "must be at least 1, not 0"),
        (["preview", "--campaign", "winbak"], "--campaign 'winbak' is not an enabled campaign (enabled: winback"),
        (["preview", "--at", "2027-02-28"], "give an offset, e.g. 2027-02-28T10:00+07:00"),
        (["stats", "--now", "yesterday"], "argument --now: not an ISO 8601 date-time: 'yesterday'"),
        (["stats", "--now", "2027-02-28"], "argument --now: give an offset, e.g. 2027-02-28T10:00+07:00"),
        # a day or an hour that does not exist is named as such, not as a text that is no date-time at all
        (["preview", "--at", "2027-02-29T10:00+07:00"],
         "argument --at: not an ISO 8601 date-time: '2027-02-29T10:00+07:00' (day is out of range for month)"),
        (["stats", "--now", "2027-03-01T24:30+07:00"], "(hour must be in 0..23)"),
        # an offset of a day or more is said in the operator's words, not in Python's (timedelta reprs)
        (["preview", "--at", "2027-02-28T10:00+25:00"],
         "argument --at: not an ISO 8601 date-time: '2027-02-28T10:00+25:00' (an offset is less than 24 hours, "
         "e.g. +07:00)\n"),
        (["stats", "--since", "2026-13-01"], "argument --since: not a date (YYYY-MM-DD): '2026-13-01' (month must be "
                                             "in 1..12)"),
        (["stats", "--now", "9999-01-01T00:00Z"], "argument --now: out of range: '9999-01-01T00:00Z'"),
        (["send-test", "--campaign", "winback", "--to", "not-an-address"], "invalid email address 'not-an-address'"),
        (["suppress", "import", "/nonexistent/bounces.txt"],
         "suppress: /nonexistent/bounces.txt: no such folder: /nonexistent"),
    ],
)
def test_a_mistake_on_the_command_line_is_named_with_exit_2_and_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    config = write_config(tmp_path)
    _migrated(config)
    code, out = run_cli(capsys, "--config", str(config), *argv)
    assert code == 2, out
    assert says in out and "Traceback" not in out


@pytest.mark.parametrize(
    ("argv", "command"),
    [(["run", "--once", "--dry-run"], "run"), (["import", "customers", "c.csv", "--bogus"], "import"),
     (["ledger", "list", "--bogus"], "ledger list"), (["preview", "--campaigns", "winback"], "preview")],
)
def test_an_option_a_command_does_not_take_is_refused_with_that_commands_usage(
    argv: list[str], command: str
) -> None:
    # Given an option the command does not have (a typo, or one of another command)
    result = kembali(*argv)
    # Then it is refused with exit 2 by the command's own usage, which lists the options it does take: argparse
    # named the top level ("kembali: error: unrecognized arguments"), whose usage lists none of the command's
    assert result.returncode == 2, result.stderr
    assert f"usage: kembali {command} [-h]" in result.stderr, result.stderr
    assert f"kembali {command}: error: unrecognized arguments: " in result.stderr, result.stderr


@pytest.mark.parametrize(("argv", "lists"), [([], "demo             try Kembali on a demo shop"),
                                             (["ledger"], "list             list messages with their last reply")])
def test_a_command_line_without_its_command_shows_the_commands_to_choose_from(argv: list[str], lists: str) -> None:
    # Given a newcomer who types `kembali` alone (or `kembali ledger` without its action)
    result = kembali(*argv)
    # Then it exits 2 showing the commands to choose from, with what each does: it showed the one-line usage
    # ("COMMAND ...") and "the following arguments are required: COMMAND", naming none of them
    assert result.returncode == 2, result.stderr
    assert lists in result.stderr, result.stderr
    assert result.stderr.rstrip().splitlines()[-1].endswith("error: the following arguments are required: "
                                                           + ("ACTION" if argv else "COMMAND")), result.stderr


def test_the_offset_the_hint_suggests_is_taken(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    _migrated(config)
    code, out = run_cli(capsys, "--config", str(config), "preview", "--at", "2027-02-28T10:00+07:00")
    assert code == 0 and "Preview as of 2027-02-28 10:00 WIB" in out


def test_a_mistyped_database_path_is_named_and_no_empty_file_is_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)  # shop.db, never created
    missing = tmp_path / "shop.db"
    for argv in (["preview"], ["stats"], ["suppress", "list"]):
        code, out = run_cli(capsys, "--config", str(config), *argv)
        assert code == 3 and f"the database {missing} does not exist" in out, (argv, out)
    code, out = run_cli(capsys, "--config", str(config), "db", "status")
    assert code == 1 and f"no database file at {missing}" in out  # `db upgrade` needed: it creates the file
    assert not missing.exists()
    # and a folder that does not exist is named when the schema is created
    (tmp_path / "cfg").mkdir()
    nowhere = write_config(tmp_path / "cfg")
    nowhere.write_text(nowhere.read_text().replace(str(tmp_path / "cfg" / "shop.db"), str(tmp_path / "no" / "x.db")))
    code, out = run_cli(capsys, "--config", str(nowhere), "db", "upgrade")
    named = f"cannot open the database {tmp_path / 'no' / 'x.db'}: its folder {tmp_path / 'no'} does not exist"
    assert code == 2 and named in out, out
    # and `db status` says so too, rather than that `db upgrade` is needed: the upgrade would stop on it
    code, out = run_cli(capsys, "--config", str(nowhere), "db", "status")
    assert code == 2 and named in out and "no database file" not in out, out
    # and the other commands tell to create the folder, not only to run `db upgrade`, which would stop on it
    code, out = run_cli(capsys, "--config", str(nowhere), "preview")
    assert code == 3 and f"nor its folder {tmp_path / 'no'}: correct database.url, or create that folder" in out, out
    assert not (tmp_path / "no").exists()


def test_db_upgrade_against_a_postgresql_server_that_is_not_up_exits_3_not_2_and_shows_no_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a config whose PostgreSQL server does not answer (not up yet: a deploy script's `db upgrade` before it)
    config = write_config(tmp_path)
    url = f"postgresql+psycopg://kembali:S3cretPw@127.0.0.1:{closed_port()}/shop"
    config.write_text(config.read_text().replace(f"sqlite:///{tmp_path / 'shop.db'}", url))
    for action in ("upgrade", "status"):
        # When `kembali db` runs
        code, out = run_cli(capsys, "--config", str(config), "db", action)
        # Then it says the database cannot be used (3, to try again later), not that the configuration is wrong (2,
        # as a missing SQLite folder is), names the server and keeps the password to itself
        assert code == 3, (action, code, out)
        assert "cannot open the database" in out and "127.0.0.1" in out and "S3cretPw" not in out, out


def test_an_order_naming_an_unknown_product_is_warned_about_at_its_line(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    _migrated(config)
    (tmp_path / "customers.csv").write_text("id,email,name,marketing_consent\nC-1,c1@example.com,Ani,1\n")
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,currency,total,product_id,quantity,unit_price\n"
        "O-1,C-1,paid,2026-11-01T10:00+07:00,IDR,100000,P-999,1,100000\n"
        "O-2,C-1,paid,2026-11-02T10:00+07:00,IDR,100000,P-998,1,100000\n"
    )
    assert kembali("import", "customers", str(tmp_path / "customers.csv"), config=config).returncode == 0
    done = kembali("import", "orders", str(tmp_path / "orders.csv"), config=config)
    assert done.returncode == 0, done.stderr
    assert "warning: orders.csv:2: order 'O-1': unknown product 'P-999'" in done.stderr
    assert "warning: orders.csv:3: order 'O-2': unknown product 'P-998'" in done.stderr


def test_orders_imported_before_their_products_warn_twenty_lines_then_count_the_rest(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    _migrated(config)
    (tmp_path / "customers.csv").write_text("id,email,name,marketing_consent\nC-1,c1@example.com,Ani,1\n")
    (tmp_path / "orders.csv").write_text(
        "order_id,customer_id,status,placed_at,currency,total,product_id,quantity,unit_price\n"
        + "".join(f"O-{i},C-1,paid,2026-11-01T10:00+07:00,IDR,100000,P-{i % 7},1,100000\n" for i in range(500))
    )
    assert kembali("import", "customers", str(tmp_path / "customers.csv"), config=config).returncode == 0
    done = kembali("import", "orders", str(tmp_path / "orders.csv"), config=config)
    # every order is imported; the operator reads twenty warnings and one line that counts the rest
    assert done.returncode == 0, done.stderr
    assert "orders: 500 created" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 21
    assert warnings[-1].startswith("warning: orders.csv: 500 order lines in all name 7 products not imported")


@pytest.mark.parametrize("argv", [["suppress", "list"], ["preview", "--json", "--at", _weeks_ahead()]])
def test_output_piped_into_head_stops_quietly(tmp_path: Path, argv: list[str]) -> None:
    # `kembali preview | head` printed a BrokenPipeError traceback once head had read what it wanted
    config = write_config(tmp_path)
    _shop_in(tmp_path, config, customers=600)
    addresses = tmp_path / "bounces.txt"
    addresses.write_text("".join(f"bounced-{i}@example.com\n" for i in range(4000)), encoding="utf-8")
    assert kembali("suppress", "import", str(addresses), config=config).returncode == 0
    full = kembali(*argv, config=config)
    assert full.returncode == 0 and len(full.stdout) > 100_000, full.stderr  # more than a pipe and Python's buffer hold
    env = {**os.environ, "KEMBALI_LINK_SECRET": LINK_KEY}
    argv_full = [sys.executable, "-m", "worker", "--config", str(config), *argv]
    with subprocess.Popen(argv_full, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None and process.stderr is not None
        first = process.stdout.readline()
        process.stdout.close()  # as head does after its lines
        errors = process.stderr.read().decode()
        code = process.wait(timeout=120)
    assert code == 141, errors  # 128 + SIGPIPE, as a shell reports cat's or grep's
    assert first and "Traceback" not in errors and "BrokenPipeError" not in errors, errors


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
@pytest.mark.parametrize("argv", [["stats"], ["suppress", "list"]], ids=" ".join)
def test_output_to_a_full_disk_is_said_in_one_line_with_exit_1(tmp_path: Path, argv: list[str]) -> None:
    # Given a shop whose report fills more than Python's output buffer
    config = write_config(tmp_path)
    _shop_in(tmp_path, config, customers=600)
    addresses = tmp_path / "bounces.txt"
    addresses.write_text("".join(f"bounced-{i}@example.com\n" for i in range(4000)), encoding="utf-8")
    assert kembali("suppress", "import", str(addresses), config=config).returncode == 0
    # When its output goes to a disk that is full (`kembali suppress list > backup.csv`)
    env = {**os.environ, "KEMBALI_LINK_SECRET": LINK_KEY}
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "worker", "--config", str(config), *argv], cwd=ROOT, env=env,
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=120, check=False)  # fmt: skip
    # Then it says why the output is missing, in one line, and exits 1 (the operator must look), not with a traceback
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        "kembali: could not write: no space left on device (what it printed, or a file it wrote, is cut short)"
    ], done.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
@pytest.mark.parametrize("argv", [["--help"], ["preview", "--help"]], ids=" ".join)
def test_help_to_a_full_disk_is_said_in_one_line_with_exit_1(argv: list[str]) -> None:
    # `kembali preview --help > help.txt` on a full disk wrote nothing, said nothing and exited 0 (argparse drops
    # the write's error), though every other output cut short by a full disk is said, with exit code 1
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "worker", *argv], cwd=ROOT, stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        "kembali: could not write: no space left on device (what it printed, or a file it wrote, is cut short)"
    ], done.stderr


def test_a_run_whose_sends_became_uncertain_exits_1_and_says_what_to_do(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # the connection died after the final dot for every message: each may have arrived, and only the operator
    # can decide; the run exited 0 ("done") with them counted in passing, as if nothing needed anyone
    config = write_config(tmp_path, smtp_port=smtp_server.port)
    _shop_in(tmp_path, config, customers=20)
    with (tmp_path / "data" / "customers.csv").open(encoding="utf-8") as rows:
        for row in csv.DictReader(rows):
            smtp_server.on(row["email"].lower(), Behaviour(drop_after_dot=True))
    result = kembali("run", "--once", config=config)
    assert smtp_server.messages and "uncertain" in result.stdout, result.stderr
    assert result.returncode == 1, result.stdout
    assert "may have arrived" in result.stdout and "kembali ledger list" in result.stdout
    listed = kembali("ledger", "list", "--status", "uncertain", config=config)
    assert len(listed.stdout.splitlines()) - 3 == len(smtp_server.messages)  # the header, a blank line, the counts


def test_the_demo_shows_its_sending_progress_on_a_terminal(tmp_path: Path) -> None:
    # a big demo shop (--customers 100000) sends for half an hour at sending.rate_per_second; after "local SMTP
    # sink listening" the terminal stayed silent all that time, as if it had hung
    env = {**os.environ, "KEMBALI_LINK_SECRET": ""}
    argv = ["demo", "--out", str(tmp_path / "demo"), "--customers", "60"]
    code, seen = run_on_a_terminal(argv, stdout_too=False, env=env, cwd=ROOT)
    assert code == 0, seen
    # ("1 message done" when the line is drawn only at the first result: the run is over before the next drawing)
    assert re.search(rb"\rsending: [0-9,]+ messages? done \([0-9,]+ sent\)", seen), seen
    assert seen.endswith(b"\r\x1b[K")  # and the line is gone before the summary


def test_the_sending_progress_line_shows_how_far_along_the_rate_and_the_time_left(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # a 20,000-customer demo showed "sending: 8,336 messages done" for minutes, with neither how fast nor how much
    # was left; the total is what was done and what is still due now (the cap defers some of what is due), read
    # again as the run goes
    config = write_config(tmp_path, smtp_port=smtp_server.port)
    config.write_text(config.read_text(encoding="utf-8").replace("rate_per_second = 2000.0", "rate_per_second = 10.0")
                      .replace("burst = 500", "burst = 1"), encoding="utf-8")  # fmt: skip
    _shop_in(tmp_path, config, customers=60)
    env = {**os.environ, "KEMBALI_LINK_SECRET": LINK_KEY}
    code, seen = run_on_a_terminal(["--config", str(config), "--log-level", "warning", "run", "--once"],
                                   stdout_too=True, env=env, cwd=ROOT)  # fmt: skip
    assert code == 0, seen
    sent = int(re.search(rb"^sent (\d+) win-back emails", seen, re.M)[1])  # type: ignore[index]
    lines = re.findall(rb"\rsending: ([0-9,]+) of ([0-9,]+) \(([0-9.]+)%\) messages done \([0-9,]+ sent\), "
                       rb"([0-9.,]+)/s, about (\d+) s left\x1b", seen)  # fmt: skip
    assert lines, seen
    for done, total, share, rate, left in lines:
        # at 10 a second (a burst of 1): a rate near it; the total is the queue (give or take the results in flight
        # when it was counted), the time left what is left of it at that rate
        assert 5 < float(rate) < 30, seen
        assert sent - 5 <= int(total) <= sent + 5, seen
        assert float(share) == round(100 * int(done) / int(total), 1), seen
        assert abs(int(left) - (int(total) - int(done)) / float(rate)) <= 1, seen
    assert len(lines) > 1 and int(lines[-1][4]) < int(lines[0][4]), seen  # the time left goes down as it sends


def test_run_once_with_its_log_quietened_shows_its_sending_progress_on_a_terminal(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # `kembali run --once --log-level warning` (or a config at warning) on a day's queue of thousands sent for
    # many minutes with the terminal silent, as if it had hung: only the log's line per email (at info) told
    env = {**os.environ, "KEMBALI_LINK_SECRET": LINK_KEY}
    seen: dict[str, bytes] = {}
    for level in ("warning", "info"):
        (tmp_path / level).mkdir()
        config = write_config(tmp_path / level, smtp_port=smtp_server.port)
        _shop_in(tmp_path / level, config, customers=60)
        with (tmp_path / level / "data" / "customers.csv").open(encoding="utf-8") as rows:
            for n, row in enumerate(csv.DictReader(rows)):  # a few refused for good: a warning each, mid-run
                if n % 10 == 0:
                    smtp_server.on(row["email"].lower(), Behaviour(rcpt_reply="550 5.1.1 no such user"))
        before = len(smtp_server.messages)
        code, seen[level] = run_on_a_terminal(["--config", str(config), "--log-level", level, "run", "--once"],
                                              stdout_too=True, env=env, cwd=ROOT)  # fmt: skip
        assert code == 1 and len(smtp_server.messages) > before, seen[level]

    quiet = seen["warning"]
    last = quiet.rindex(b"\rsending: ")
    drawn = rb"\rsending: [0-9,]+ (of [0-9,]+ \([0-9.]+%\) )?messages? done \([0-9,]+ sent\)"
    assert re.match(drawn, quiet[last:]), quiet
    # the line is gone before the summary, and before each warning the log writes meanwhile (which would else go
    # on after the line's text)
    assert quiet.index(b"\r\x1b[K", last) < quiet.index(b"win-back email", last), quiet
    assert b"email_failed" in quiet and not re.search(rb"\rsending: [^\r]*\x1b\[K[^\r]", quiet), quiet
    # at info, the log's line per email is the progress: no line is drawn among them
    assert b"email_sent" in seen["info"] and b"\rsending:" not in seen["info"], seen["info"]


def test_a_first_command_in_a_folder_without_a_config_says_how_to_begin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the README's "Using it with your shop" starts with `kembali db upgrade`: in a new folder that said only
    # "config.toml: config file not found"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEMBALI_CONFIG", raising=False)
    code, out = run_cli(capsys, "db", "upgrade")
    assert code == 2 and "Traceback" not in out
    assert (f"config.toml: config file not found in {tmp_path}; copy the project's config.toml (every key "
            "explained) and templates/ here, or give --config FILE") in out
    assert list(tmp_path.iterdir()) == []


def test_import_help_says_what_to_import_first_and_what_its_exit_codes_mean() -> None:
    result = kembali("import", "--help")
    text = " ".join(result.stdout.split())
    # (it left out that orders need their customers imported first, and every exit code but 1)
    assert "Import customers before their orders (an order of an unknown customer is rejected)." in text
    assert "Exit code 1 if any row was rejected, or imported with a warning (an unclear marketing_consent, a " \
           "birthday, time_zone or locale left out, one address whose customers' consents disagree); 2 if the " \
           "file is missing or cannot be read as CSV of " \
           "that kind " \
           "(nothing imported); 3 when the database cannot be used; 130/143 when stopped by Ctrl-C/SIGTERM" \
           in text  # fmt: skip
    assert "file the CSV file (UTF-8, a header row)" in text


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_a_demo_stopped_while_it_imports_stops_and_sends_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    # Ctrl-C while the demo imported its orders stopped that import only ("import the file again to finish"): the demo
    # went on to plan and send to the half-imported shop, and exited 0
    import signal

    from worker.adapters import shop

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEMBALI_CONFIG", raising=False)
    real = shop.upsert_orders

    def upsert_then_stop(*args: object, **kwargs: object) -> object:  # the real write, then the operator's signal
        counts = real(*args, **kwargs)  # type: ignore[arg-type]
        signal.raise_signal(getattr(signal, stop))
        return counts

    monkeypatch.setattr(shop, "upsert_orders", upsert_then_stop)
    # Ctrl-C as at a terminal: where the tests run as a background job (nohup … &), SIGINT comes ignored, as it
    # does to the demo started that way, and the demo rightly goes on
    terminal = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, out = run_cli(capsys, "demo", "--customers", "30")
    finally:
        signal.signal(signal.SIGINT, terminal)
    assert code == (130 if stop == "SIGINT" else 143), out
    assert "kembali demo: stopped" in out and "Import the file again" not in out
    assert "local SMTP sink" not in out and not list((tmp_path / "demo-out").glob("sent/*.eml"))


@pytest.mark.parametrize("argv", [["preview", "--config", "{config}", "--json"],
                                  ["db", "status", "--config", "{config}"],
                                  ["ledger", "list", "--config", "{config}"],
                                  ["suppress", "list", "--config={config}"]])
def test_config_is_taken_after_the_command_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    # `kembali preview --config demo-out/config.toml`, as operators type it, was "unrecognized arguments: --config"
    config = write_config(tmp_path)
    _migrated(config)
    monkeypatch.chdir(tmp_path / "..")  # no config.toml here: only the one named is read
    monkeypatch.delenv("KEMBALI_CONFIG", raising=False)
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)
    code, out = run_cli(capsys, *(arg.format(config=config) for arg in argv))
    assert code == 0, out
    assert "unrecognized" not in out and "config file not found" not in out


def test_every_command_help_names_the_config_option() -> None:
    for command in ["preview", "db", "import", "run", "ledger", "stats"]:
        assert "--config FILE" in kembali(command, "--help").stdout, command


@pytest.mark.parametrize("text", [None, '[smtp]\nport = "25"\n'])
def test_a_config_error_from_the_environment_names_the_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, text: str | None
) -> None:
    # a $KEMBALI_CONFIG left in a shell profile read as the operator's own mistake: "old.toml: config file not found"
    # in a folder whose config.toml was fine, without a word of where old.toml came from
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.toml").write_text("", encoding="utf-8")
    if text is not None:
        (tmp_path / "old.toml").write_text(text, encoding="utf-8")
    monkeypatch.setenv("KEMBALI_CONFIG", "old.toml")
    code, out = run_cli(capsys, "preview")
    assert code == 2 and "old.toml" in out
    assert "old.toml (named by $KEMBALI_CONFIG)" in out
    code, out = run_cli(capsys, "--config", "old.toml", "preview")  # named on the command line: no word of it
    assert code == 2 and "KEMBALI_CONFIG" not in out


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_every_command_help_ends_with_examples_that_parse(command: str) -> None:
    # only the README had examples; a command's --help had none
    import shlex

    help_text = kembali(command, "--help").stdout
    assert "\nexamples:\n" in help_text
    for line in EXAMPLES[command]:
        assert f"  {line}\n" in help_text
        command_line = re.split(r" [|>] ", line.replace("<(gunzip -c orders.csv.gz)", "/dev/fd/63"))[0]
        words = shlex.split(command_line, comments=True)  # kembali's own words: no pipe, redirection or comment
        assert words[0] == "kembali"
        _parser().parse_args(words[1:])  # argparse exits 2 on an example that has gone stale


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_a_demo_stopped_while_it_sends_says_what_was_sent_and_what_was_not(tmp_path: Path, stop: str) -> None:
    # a SIGTERM while the demo sent killed it where it stood: no word of what the sink had received or of what was
    # planned and left unsent (a Ctrl-C said only "kembali: interrupted"); both now stop as `run --once` does
    import signal
    import time

    config = tmp_path / "slow.toml"
    config.write_text(f'[templates]\ndir = "{TEMPLATES}"\n[sending]\nrate_per_second = 4.0\nburst = 1\n',
                      encoding="utf-8")
    out = tmp_path / "demo"
    env = {**os.environ, "KEMBALI_LINK_SECRET": "", "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "worker", "--config", str(config), "demo", "--out", str(out), "--customers", "200"]
    with subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as child:
        deadline = time.monotonic() + 90
        while len(list(out.glob("sent/*.eml"))) < 3:
            assert child.poll() is None and time.monotonic() < deadline, "the demo never sent"
            time.sleep(0.05)
        child.send_signal(getattr(signal, stop))
        stdout, stderr = child.communicate(timeout=60)

    assert child.returncode == 128 + getattr(signal, stop).value, stdout + stderr
    assert "Traceback" not in stderr and "interrupted" not in stderr
    files = len(list(out.glob("sent/*.eml")))
    sent = sum(int(line.split()[1]) for line in stdout.splitlines() if line.startswith("sent "))
    assert sent == files and f"the local SMTP sink received {files} messages" in stdout, stdout
    left = re.search(rf"^kembali demo: stopped by {stop}: (\d+) planned messages? not sent", stdout, re.M)
    assert left is not None and int(left.group(1)) > 0, stdout


def test_the_log_level_is_chosen_on_the_command_line_for_one_run(tmp_path: Path, smtp_server: RecordingServer) -> None:
    # the only way to quieten a cron job or see a run's every email was to edit [logging] level in the config
    # the daemon shares; --log-level now sets it for one command, before or after the command's name
    config = write_config(tmp_path, smtp_port=smtp_server.port, extra='[logging]\nlevel = "warning"\n')
    _shop_in(tmp_path, config, customers=20)
    loud = kembali("run", "--once", "--log-level", "info", config=config)
    assert loud.returncode == 0, loud.stderr
    assert re.search(r"^\S+ info +email_sent campaign=\S+ .*to=\S+\*\*\*@", loud.stderr, re.M), loud.stderr
    assert "sent " in loud.stdout  # the summary is the result, whatever the level

    config.write_text(config.read_text(encoding="utf-8").replace('level = "warning"', 'level = "info"'),
                      encoding="utf-8")
    assert "campaign_planned" in kembali("run", "--once", config=config).stderr  # at info, every run
    quiet = kembali("--log-level", "error", "run", "--once", config=config)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr  # campaign_planned, info, not shown

    wrong = kembali("--log-level", "loud", "run", "--once", config=config)
    assert wrong.returncode == 2 and "invalid choice: 'loud'" in wrong.stderr
    assert "--log-level LEVEL" in kembali("run", "--help").stdout


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_every_command_help_says_what_its_exit_codes_mean(command: str) -> None:
    # db, run, suppress, preview and insights said nothing of theirs: an operator wiring one into cron or a script
    # had only the top-level --help's general list
    text = " ".join(kembali(command, "--help").stdout.split())
    assert re.search(r"exit codes?:? [0-9]", text, re.I), text


def test_the_run_help_tells_the_daemons_exit_codes_from_once() -> None:
    text = " ".join(kembali("run", "--help").stdout.split())
    assert "With --once, exit code 0" in text and "The daemon exits 0" in text


def test_the_run_help_says_the_daemon_exits_1_when_the_database_cannot_mark_its_sends_at_the_stop() -> None:
    # A stop whose grace period ran out while the database was away exits 1 (shutdown_abandon_failed; test_daemon),
    # but the help gave code 1 only for a second signal and outcomes not written: an operator reading it took the
    # 1 for a second signal that nobody sent
    text = " ".join(kembali("run", "--help").stdout.split())
    daemon_codes = text.split("The daemon exits", 1)[1]
    one = daemon_codes.split(" 1 when ", 1)[1].split(", 2 when", 1)[0]
    assert "grace period" in one and "database" in one, one


@pytest.mark.parametrize("customers", ["0", "-5"])
def test_the_demo_refuses_a_shop_without_customers(tmp_path: Path, customers: str) -> None:
    # When the operator asks for a demo shop of no (or fewer than no) customers
    result = kembali("demo", "--out", str(tmp_path / "demo"), "--customers", customers)
    # Then it is refused as bad usage, naming the option, instead of a demo that sends nothing and exits 0
    assert result.returncode == 2, result.stdout
    assert f"argument --customers: must be at least 1, not {customers}" in result.stderr
    assert not (tmp_path / "demo").exists()


def test_the_demo_names_an_out_that_is_a_file(tmp_path: Path) -> None:
    # Given a file where the operator points the demo's folder
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n", encoding="utf-8")
    # When the demo is asked to write there
    result = kembali("demo", "--out", str(notes))
    # Then it says so, naming the option and the file, exit code 2, and leaves the file alone
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"kembali demo: --out {notes}: is a file, not a folder" in result.stderr
    assert "Errno" not in result.stderr + result.stdout
    assert notes.read_text(encoding="utf-8") == "mine\n"


def test_the_demo_leaves_a_folder_of_the_operators_files_alone(tmp_path: Path) -> None:
    # Given the operator's shop folder: their config.toml, their data/customers.csv and a sent/ folder of theirs
    shop = tmp_path / "shop"
    (shop / "data").mkdir(parents=True)
    (shop / "sent").mkdir()
    (shop / "config.toml").write_text("# my shop\n", encoding="utf-8")
    (shop / "data" / "customers.csv").write_text("id,email,name,marketing_consent\n", encoding="utf-8")
    (shop / "sent" / "invoice.eml").write_text("mine\n", encoding="utf-8")
    before = {path: path.read_bytes() for path in shop.rglob("*") if path.is_file()}
    # When the demo is pointed there (`kembali demo --out .` in the shop's folder)
    result = kembali("demo", "--out", str(shop), "--customers", "30")
    # Then it refuses, exit code 2, naming the folder and what it holds; before, it replaced config.toml and
    # data/customers.csv with the demo's and deleted sent/ with everything in it
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"kembali demo: --out {shop}: holds files the demo did not write (config.toml, data, sent)" in \
        result.stderr, result.stderr
    assert {path: path.read_bytes() for path in shop.rglob("*") if path.is_file()} == before
    assert "local SMTP sink" not in result.stdout
    # while a folder the demo made is the demo's to write again
    demo = tmp_path / "demo"
    for _ in range(2):
        again = kembali("demo", "--out", str(demo), "--customers", "30")
        assert again.returncode == 0, again.stdout + again.stderr
    assert (demo / "config.toml").is_file() and list((demo / "sent").glob("*.eml"))


def test_the_demo_takes_a_folder_that_looks_empty_and_leaves_what_it_held(tmp_path: Path) -> None:
    # Given a new folder opened in macOS Finder (its .DS_Store) and a freshly mounted volume (its lost+found)
    finder = tmp_path / "demo-out"
    finder.mkdir()
    (finder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    volume = tmp_path / "volume"
    (volume / "lost+found").mkdir(parents=True)
    for out in (finder, volume):
        # When the demo is pointed there
        result = kembali("demo", "--out", str(out), "--customers", "30")
        # Then it runs there (it refused with exit code 2: "holds files the demo did not write (.DS_Store)"), and
        # leaves those be
        assert result.returncode == 0, result.stdout + result.stderr
        assert list((out / "sent").glob("*.eml"))
    assert (finder / ".DS_Store").read_bytes() == b"\x00\x00\x00\x01Bud1" and (volume / "lost+found").is_dir()


def test_a_file_or_folder_that_cannot_be_used_is_named_in_words(tmp_path: Path) -> None:
    # Given a config, a file where a folder is asked for, and a folder where a file is
    config = write_config(tmp_path)
    _migrated(config)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n", encoding="utf-8")
    # When the operator points commands at them
    out_is_a_file = kembali("preview", "--out", str(notes), config=config)
    file_is_a_folder = kembali("suppress", "import", str(tmp_path), config=config)
    # Then each says what is wrong with which path, exit code 2, without Python's "[Errno N]"
    assert (out_is_a_file.returncode, out_is_a_file.stderr) == (
        2, f"kembali preview: {notes}: is a file, not a folder\n")
    assert (file_is_a_folder.returncode, file_is_a_folder.stderr) == (
        2, f"kembali suppress: {tmp_path}: is a folder, not a file\n")


def test_db_status_and_a_second_upgrade_name_the_database_they_looked_at(tmp_path: Path) -> None:
    # an operator with a staging and a live config read "current: 0018  newest: 0018" and "schema already at 0018"
    # with no word of which database that was (the first `db upgrade` names it; a relative path is the config's)
    config = write_config(tmp_path)
    assert kembali("db", "upgrade", config=config).returncode == 0
    again, status = kembali("db", "upgrade", config=config), kembali("db", "status", config=config)
    assert again.returncode == 0 and status.returncode == 0, again.stderr + status.stderr
    head = status.stdout.split()[1]
    assert again.stdout == f"schema already at {head} ({tmp_path / 'shop.db'})\n", again.stdout
    assert status.stdout == f"current: {head}  newest: {head}  ({tmp_path / 'shop.db'})\n", status.stdout


@pytest.mark.parametrize("where", ["before", "after"])
def test_an_empty_config_option_is_named_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # Given a script's `kembali --config "$KEMBALI_CFG" check` with its variable empty
    monkeypatch.chdir(tmp_path)
    argv = ["--config", "", "check"] if where == "before" else ["check", "--config", ""]
    code, out = run_cli(capsys, *argv)
    # Then it says the option is empty, as it says of an empty $KEMBALI_CONFIG (it said ".: is a folder, not a
    # config file", a folder no one named)
    assert code == 2 and "Traceback" not in out
    assert "--config: empty: name the file or folder, or leave the option out" in out and "is a folder" not in out


@pytest.mark.parametrize(("query", "said"), [
    ("?timeout=abc", "has a query ('?timeout=abc'): an SQLite URL takes none"),
    ("postgresql+psycopg://shop:S3cret-pw@db.internal/kembali?port=5433x", "has a host or port in its query that "
     "cannot be read (Received non-integer port arguments: ('5433x',))"),
])
def test_a_database_url_with_a_query_the_engine_cannot_read_is_a_configuration_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], query: str, said: str
) -> None:
    # Given a database.url with a query the driver reads as its own: an SQLite timeout that is no number, a
    # PostgreSQL port that is none
    config = write_config(tmp_path)
    url = f"sqlite:///{tmp_path / 'shop.db'}{query}" if query.startswith("?") else query
    config.write_text(config.read_text().replace(f"sqlite:///{tmp_path / 'shop.db'}", url, 1))
    # When any command starts, it stops naming the key, exit code 2 (it was a traceback, from `check` too)
    for command in (["check"], ["stats"], ["db", "upgrade"]):
        code, out = run_cli(capsys, "--config", str(config), *command)
        assert code == 2 and "Traceback" not in out, out
        assert f"'database.url' {said}" in out and "S3cret" not in out


@pytest.mark.parametrize("command", [["import", "customers", str(ROOT / "examples" / "customers.csv")],
                                     ["ledger", "list"], ["preview"]])
def test_a_command_started_with_its_standard_output_closed_does_its_work_without_a_traceback(
    tmp_path: Path, command: list[str]
) -> None:
    # Given a cron line that closes standard output rather than discarding it (`kembali … >&-`)
    config = write_config(tmp_path)
    _migrated(config)
    argv = [sys.executable, "-m", "worker", "--config", str(config), *command]
    result = subprocess.run(argv, cwd=ROOT, env={**os.environ, "KEMBALI_LINK_SECRET": LINK_KEY}, stderr=subprocess.PIPE,
                            text=True, timeout=120, check=False, preexec_fn=lambda: os.close(1))  # fmt: skip
    # Then it does its work, its output discarded (every command ended in "AttributeError: 'NoneType' object has
    # no attribute 'flush'", exit code 1, after its work; preview before it)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    if command[0] == "import":
        with sqlite3.connect(tmp_path / "shop.db") as db:
            assert db.execute("SELECT count(*) FROM customer").fetchone() == (20,)


def test_version_names_the_package_and_its_newest_schema(capsys: pytest.CaptureFixture[str]) -> None:
    # An operator following the README's upgrade ("install the new version on every host") asks each host which
    # kembali it has (it said "the following arguments are required: COMMAND", exit code 2)
    from importlib.metadata import version

    newest = max(p.name[:4] for p in (ROOT / "worker" / "migrations" / "versions").glob("0*.py"))
    code, out = run_cli(capsys, "--version")
    assert (code, out) == (0, f"kembali {version('kembali')} (schema {newest})\n")


@pytest.mark.parametrize(("argv", "meant"), [
    (["sendtest"], "send-test"),
    (["stat"], "stats"),
    (["ledger", "lst"], "list"),
    (["ledger", "list", "--status", "uncertian"], "uncertain"),
    (["--log-level", "warn", "check"], "warning"),
    (["import", "customer", "c.csv"], "customers"),
])  # fmt: skip
def test_a_misspelt_command_or_choice_is_told_the_one_meant(
    capsys: pytest.CaptureFixture[str], argv: list[str], meant: str
) -> None:
    # A config key misspelt is told the key meant ("did you mean 'sending.batch_size'?"); a command misspelt (the
    # brief's `kembali sendtest`) got argparse's list of every choice alone, to read through for the one meant
    code, out = run_cli(capsys, *argv)
    assert code == 2, out
    assert f"(did you mean '{meant}'?)" in out, out


def test_a_win_back_steps_folder_given_to_preview_as_the_campaign_is_told_the_campaign_it_sends_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `send-test --campaign winback-reminder` takes a step's folder (the README shows it): `preview` refused the same
    # name as "not an enabled campaign (enabled: winback)", naming no link between the two
    steps = ('[[campaigns.winback.steps]]\ndays = 45\ntemplate = "winback-reminder"\n'
             '[[campaigns.winback.steps]]\ndays = 75\ntemplate = "winback"\ncoupon_code = "K10"\ncoupon_percent = 10\n')
    config = write_config(tmp_path, extra=steps)
    _migrated(config)
    code, out = run_cli(capsys, "--config", str(config), "preview", "--campaign", "winback-reminder")
    assert code == 2, out
    assert ("kembali: --campaign 'winback-reminder' is the template folder of win-back's step 1: preview "
            "--campaign winback (enabled: winback)") in out
