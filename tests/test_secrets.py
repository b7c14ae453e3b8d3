"""Secrets stay secret, and a bad setting is refused by name: the `kembali` command as an operator runs it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from tests.clikit import run_cli
from tests.shop import LINK_KEY, ROOT, TEMPLATES
from tests.smtp_server import Behaviour, RecordingServer
from tests.test_cli import _migrated as migrated
from tests.test_cli import _shop_in as shop_in
from tests.test_cli import write_config
from worker.adapters.store import Store
from worker.config import load_settings

DB_PASSWORD = "S3cr@t:p/ss%w0rd"
"""A password with the characters a URL must percent-encode (``S3cr%40t%3Ap%2Fss%25w0rd``)."""


def kembali(*args: str, config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "KEMBALI_LINK_SECRET": LINK_KEY, **(env or {})}
    argv = [sys.executable, "-m", "worker", "--config", str(config), *args]
    return subprocess.run(argv, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120, check=False)


def config_for(folder: Path, database_url: str) -> Path:
    """Logging every event (debug): a password is never printed, at any level."""
    path = folder / "config.toml"
    path.write_text(f'[database]\nurl = "{database_url}"\n[templates]\ndir = "{TEMPLATES}"\n'
                    '[logging]\nlevel = "debug"\n', encoding="utf-8")
    return path


@pytest.mark.postgres
def test_a_database_password_with_percent_encoded_characters_works_and_is_never_printed(
    pg_url: str, tmp_path: Path
) -> None:
    # Given a PostgreSQL URL whose password has an @, a : and a / in it, percent-encoded as a URL needs them
    url = make_url(pg_url).set(password=DB_PASSWORD).render_as_string(hide_password=False)
    assert "%40" in url and "%25" in url
    config = config_for(tmp_path, url)
    # When the operator creates the schema, looks at it and runs a cycle
    for args in (("db", "upgrade"), ("db", "status"), ("run", "--once")):
        result = kembali(*args, config=config)
        # Then each works, and neither the password nor its encoded form is printed
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        printed = result.stdout + result.stderr
        assert DB_PASSWORD not in printed and "S3cr%40t" not in printed and "S3cr" not in printed
    assert_at_newest(kembali("db", "status", config=config))


def assert_at_newest(status: subprocess.CompletedProcess[str]) -> None:
    """``kembali db status`` says the database is at the newest revision."""
    assert status.returncode == 0, status.stderr
    current, newest = status.stdout.split()[1], status.stdout.split()[3]
    assert status.stdout.startswith("current:") and current == newest, status.stdout


def test_an_sqlite_database_in_a_folder_named_with_a_percent_sign_can_be_created(tmp_path: Path) -> None:
    folder = tmp_path / "toko 100%"
    folder.mkdir()
    config = config_for(tmp_path, f"sqlite:///{folder / 'kembali.db'}")
    upgraded = kembali("db", "upgrade", config=config)
    assert upgraded.returncode == 0, upgraded.stderr
    assert_at_newest(kembali("db", "status", config=config))


@pytest.mark.parametrize("url", ["postgresql+psycopg://shop:S3cret-pw@db.internal:54x2/kembali",
                                 "postgresql+asyncpg://shop:S3cret-pw@db.internal/kembali",
                                 # a password's @ not percent-encoded: the rest of it would be read as the host
                                 "postgresql+psycopg://shop:pw@S3cret-tail@127.0.0.1:1/kembali",
                                 "sqlite://kembali.db"])
@pytest.mark.parametrize("command", [("db", "status"), ("db", "upgrade"), ("stats",), ("check",)])
def test_a_database_url_the_engine_cannot_read_stops_every_command_by_name(
    tmp_path: Path, url: str, command: tuple[str, ...]
) -> None:
    result = kembali(*command, config=config_for(tmp_path, url))
    assert "'database.url'" in result.stdout + result.stderr
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "S3cret" not in result.stdout + result.stderr


@pytest.mark.parametrize("url", ["postgresql+psycopg://shop:pw@S3cret-tail@127.0.0.1:5432/kembali",
                                 # and with a colon after the @: SQLAlchemy read the rest as a port
                                 "postgresql+psycopg://shop:p@S3cret:1234@db.internal:5432/kembali"])
def test_a_password_with_an_at_sign_not_percent_encoded_is_named_as_such(tmp_path: Path, url: str) -> None:
    result = kembali("check", config=config_for(tmp_path, url))
    assert result.returncode == 2, result.stderr
    assert "'database.url' has an @ after the one that ends the user part" in result.stdout + result.stderr, (
        result.stderr)
    assert "%40" in result.stderr and "S3cret" not in result.stdout + result.stderr


def _nothing_planned_or_sent(config: Path, smtp_server: RecordingServer) -> bool:
    """The ledger is as empty as before and the server received nothing (exit 2: nothing was done)."""
    store = Store.from_url(load_settings(config).database_url)
    try:
        return store.messages(limit=10) == [] and smtp_server.messages == []
    finally:
        store.close()


@pytest.mark.postgres
def test_a_password_given_as_a_url_parameter_is_never_printed(pg_url: str, tmp_path: Path) -> None:
    # Given the password as libpq's password parameter (?password=…), which psycopg takes as well as user:pw@
    good = make_url(pg_url).update_query_dict({"password": "S3cret-param-pw"})
    missing = good.set(database=f"{good.database}_missing")
    for url, commands in ((good, [("db", "upgrade"), ("db", "status")]),
                          (missing, [("db", "status"), ("db", "upgrade"), ("stats",), ("run", "--once")])):
        config = config_for(tmp_path, url.render_as_string(hide_password=False))
        for args in commands:
            result = kembali(*args, config=config)
            printed = result.stdout + result.stderr
            # Then what names the database (the upgrade's and the status's lines, the error) shows ***, not the
            # password
            assert "S3cret" not in printed, printed
            assert "password=***" in printed, printed
            assert result.returncode == (0 if url is good else 3), printed  # the database cannot be used


def test_an_empty_smtp_password_stops_the_run_before_anything_is_planned(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given an SMTP login whose password variable is set but empty (an unexpanded ${VAR}, a secrets file not loaded)
    smtp_server.login = ("shop", "right-password")
    config = write_config(tmp_path, smtp_port=smtp_server.port)
    config.write_text(config.read_text().replace('tls = "none"', 'tls = "none"\nusername = "shop"'))
    shop_in(tmp_path, config, customers=40)  # customers due a win-back
    empty = {"KEMBALI_SMTP_PASSWORD": ""}
    # When the operator checks and runs
    checked = kembali("check", config=config, env=empty)
    result = kembali("run", "--once", config=config, env=empty)
    # Then both name the variable; the run stops with exit 2 and nothing done, as for a variable not set at all
    assert checked.returncode == 1 and "KEMBALI_SMTP_PASSWORD" in checked.stdout and "empty" in checked.stdout
    assert result.returncode == 2, result.stdout + result.stderr
    assert "KEMBALI_SMTP_PASSWORD" in result.stderr and "set but empty" in result.stderr
    assert _nothing_planned_or_sent(config, smtp_server)


def test_an_smtp_password_that_is_not_utf8_stops_the_run_before_anything_is_planned_and_is_never_printed(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given the SMTP password in an environment file saved in Latin-1 ("S3cr\xe9t-pw": é as one byte, not UTF-8)
    smtp_server.login = ("shop", "S3cr\u00e9t-pw")
    config = write_config(tmp_path, smtp_port=smtp_server.port)
    config.write_text(config.read_text().replace('tls = "none"', 'tls = "none"\nusername = "shop"'))
    shop_in(tmp_path, config, customers=40)  # customers due a win-back
    env = {**os.environb, b"KEMBALI_LINK_SECRET": LINK_KEY.encode(), b"KEMBALI_SMTP_PASSWORD": b"S3cr\xe9t-pw"}
    results = {}
    for args in (("check",), ("run", "--once"), ("send-test", "--campaign", "winback", "--to", "me@shop.example")):
        argv = [sys.executable, "-m", "worker", "--config", str(config), *args]
        results[args[0]] = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, timeout=120, check=False)
    # Then each names the variable and what is wrong with it, without a traceback and without the password; the
    # run stops with exit 2 and nothing done (before: a UnicodeEncodeError at the login, every message it had
    # marked left `sending`, to become `uncertain`)
    for command, result in results.items():
        printed = (result.stdout + result.stderr).decode("utf-8", "replace")
        assert result.returncode == (1 if command == "check" else 2), printed
        assert "KEMBALI_SMTP_PASSWORD" in printed and "UTF-8" in printed, printed
        assert "Traceback" not in printed and "S3cr" not in printed and "t-pw" not in printed, printed
    assert _nothing_planned_or_sent(config, smtp_server)


@pytest.mark.parametrize("command", [("check",), ("db", "status"), ("demo", "--out", "demo")])
def test_an_empty_kembali_config_is_named_rather_than_read_as_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: tuple[str, ...]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KEMBALI_CONFIG", "")  # Environment=KEMBALI_CONFIG=${UNSET} in a unit, say
    code, out = run_cli(capsys, *command)
    assert code == 2, out
    assert "$KEMBALI_CONFIG is set but empty" in out and "Is a directory" not in out
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(("edit", "key", "written"), [
    (lambda text: text.replace(f'dir = "{TEMPLATES}"', f'dir = "{TEMPLATES.parent}"'), "'templates.dir'", "dir = "),
    (lambda text: text + '[[campaigns.winback.steps]]\ndays = 30\ntemplate = "winback-reminder"\n'
     '[[campaigns.winback.steps]]\ndays = 60\ntemplate = "winback-remnder"\n',
     "'campaigns.winback.steps[1].template'", 'template = "winback-remnder"'),
])
def test_run_once_without_templates_for_a_campaign_stops_before_planning(
    tmp_path: Path, smtp_server: RecordingServer, edit: Any, key: str, written: str
) -> None:
    # Given templates.dir one level off (templates/ for templates/email/), or a win-back step's folder misspelt
    config = write_config(tmp_path, smtp_port=smtp_server.port)
    shop_in(tmp_path, config, customers=40)  # customers due a win-back
    config.write_text(edit(config.read_text()))
    lines = config.read_text().splitlines()
    line = next(n for n, text in enumerate(lines, 1) if text.startswith(written))
    # When cron runs a cycle
    result = kembali("run", "--once", config=config)
    # Then it stops with exit 2 naming the setting and its line (the second step's, not `steps[]` and no line: which
    # of three steps was it?), and plans nothing (rather than failing every due message)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"config.toml: line {line}: {key}" in result.stderr, result.stderr
    assert "nothing was planned or sent" in result.stderr
    assert _nothing_planned_or_sent(config, smtp_server)


@pytest.mark.parametrize("off", ["up", "down"])
def test_run_once_and_check_with_templates_dir_one_level_off_name_the_folder_meant(
    tmp_path: Path, smtp_server: RecordingServer, off: str
) -> None:
    # Given templates.dir one level off: templates/ for templates/email/ (the shipped config's folder, as a
    # newcomer who copied templates/ beside the config may write it), or a campaign's folder
    config = write_config(tmp_path, smtp_port=smtp_server.port)
    shop_in(tmp_path, config, customers=40)
    wrong = TEMPLATES.parent if off == "up" else TEMPLATES / "winback"
    config.write_text(config.read_text().replace(f'dir = "{TEMPLATES}"', f'dir = "{wrong}"'))
    # When cron runs a cycle, and the operator checks
    result, checked = kembali("run", "--once", config=config), kembali("check", config=config)
    # Then both name the folder that holds the campaigns' folders, to set templates.dir to (they said only "no
    # templates for 'birthday' in …", and check "(one level off?)", leaving the operator to find which way)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{TEMPLATES} holds the campaigns' folders: set templates.dir to it" in result.stderr, result.stderr
    assert checked.returncode == 1, checked.stdout
    assert f"{TEMPLATES} holds the campaigns' folders: set templates.dir to it" in checked.stdout, checked.stdout
    assert _nothing_planned_or_sent(config, smtp_server)


@pytest.mark.parametrize(("missing", "named", "extra"), [
    (("winback/en",), "winback/en/subject.txt, winback/en/body.html, winback/en/body.txt", ""),
    (("winback/id/body.txt",), "winback/id/body.txt", ""),
    (("feedback/id/body.html", "winback/en/body.txt"), "feedback/id/body.html, winback/en/body.txt",
     "[campaigns.feedback]\nenabled = true\n"),
])
def test_run_once_with_a_template_missing_in_one_language_stops_before_planning(
    tmp_path: Path, smtp_server: RecordingServer, missing: tuple[str, ...], named: str, extra: str
) -> None:
    # Given win-back templates in Indonesian only (or an Indonesian body.txt deleted, or files of two campaigns):
    # customers in the other language would each get a failed message, every run, where the daemon refuses to start
    templates = tmp_path / "email"
    shutil.copytree(TEMPLATES, templates)
    for path in missing:
        target = templates / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    config = write_config(tmp_path, smtp_port=smtp_server.port, extra=extra)
    shop_in(tmp_path, config, customers=40)  # customers due a win-back, in both languages
    config.write_text(config.read_text().replace(f'dir = "{TEMPLATES}"', f'dir = "{templates}"'))
    # When cron runs a cycle
    result = kembali("run", "--once", config=config)
    # Then it stops with exit 2 naming the missing files, and plans and sends nothing, as the daemon refuses
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"'templates.dir': {named} missing in {templates}" in result.stderr, result.stderr
    assert "nothing was planned or sent" in result.stderr
    assert _nothing_planned_or_sent(config, smtp_server)


def test_a_bad_event_loop_variable_is_one_clear_line(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    migrated(config)
    result = kembali("run", "--once", config=config, env={"KEMBALI_EVENT_LOOP": "bogus"})
    assert result.returncode == 2
    assert result.stderr == ("kembali: configuration error: KEMBALI_EVENT_LOOP must be 'auto', 'asyncio' or "
                             "'uvloop', not 'bogus'\n")


@pytest.mark.parametrize(("path", "old", "new", "named"), [
    ("winback/en/body.html", "{% block content %}", "{% block content %}{% if %}",
     "winback/en/body.html:3: syntax error"),
    ("_products.txt", "{% endfor %}", "{% endfor %}{% endif %}", "_products.txt:"),
    ("winback/id/body.txt", '{% include "_products.txt" %}', '{% include "_produk.txt" %}',
     "template not found: _produk.txt"),
    ("_layout.html", "{{ shop.postal_address }}", "{{ shop.postal_address | idr }}",
     "_layout.html:40: syntax error: No filter named 'idr'."),
    # inside an {% if %}, Jinja2 itself leaves an unknown filter for the render: every message reaching it would fail
    ("winback/id/body.txt", "{{ bought[0].name }}", "{{ bought[0].name | uppercase }}",
     "winback/id/body.txt:7: syntax error: No filter named 'uppercase'. (did you mean 'upper'?)"),
])
def test_run_once_with_a_template_that_cannot_be_parsed_stops_before_planning(
    tmp_path: Path, smtp_server: RecordingServer, path: str, old: str, new: str, named: str
) -> None:
    # Given a template saved with a syntax error (in a campaign's body, or in a partial every body includes), or an
    # include whose file is misspelt: rendering would fail every due message of that language, each left failed
    templates = tmp_path / "email"
    shutil.copytree(TEMPLATES, templates)
    target = templates / path
    text = target.read_text(encoding="utf-8")
    assert old in text
    target.write_text(text.replace(old, new, 1), encoding="utf-8")
    config = write_config(tmp_path, smtp_port=smtp_server.port)
    shop_in(tmp_path, config, customers=40)  # customers due a win-back, in both languages
    config.write_text(config.read_text().replace(f'dir = "{TEMPLATES}"', f'dir = "{templates}"'))
    # When cron runs a cycle
    result = kembali("run", "--once", config=config)
    # Then it stops with exit 2 naming the file (and line), and plans and sends nothing, as the daemon refuses
    assert result.returncode == 2, result.stdout + result.stderr
    assert named in result.stderr, result.stderr
    assert "nothing was planned or sent" in result.stderr
    assert _nothing_planned_or_sent(config, smtp_server)


@pytest.mark.parametrize(
    ("table", "key", "says"),
    [
        ("smtp", "password", "the SMTP password goes in the environment variable 'smtp.password_env' names "
                             "(KEMBALI_SMTP_PASSWORD by default)"),
        ("smtp", "smtp_pass", "the SMTP password goes in the environment variable 'smtp.password_env' names "
                              "(KEMBALI_SMTP_PASSWORD by default)"),
        ("unsubscribe", "secret", "the link key goes in the environment variable 'unsubscribe.secret_env' names "
                                  "(KEMBALI_LINK_SECRET by default)"),
        ("database", "password", "PostgreSQL's password goes in $PGPASSWORD or ~/.pgpass (read by libpq), or "
                                 "percent-encoded in 'database.url'"),
    ],
)
def test_a_secret_written_into_the_config_file_is_refused_saying_where_it_goes_and_never_printed(
    tmp_path: Path, table: str, key: str, says: str
) -> None:
    # An operator new to Kembali writes the password into the file: `password = "…"` under [smtp] was refused as
    # "unknown key 'smtp.password' (did you mean 'smtp.password_env'?)", which invites writing the password there
    # next (refused as well, but a second round), and [database] password named nothing at all
    config = tmp_path / "config.toml"
    config.write_text(f'[templates]\ndir = "{TEMPLATES}"\n[{table}]\n{key} = "hunter2-S3CRET"\n', encoding="utf-8")
    result = kembali("check", config=config)
    assert result.returncode == 2, result.stderr
    assert f"{config}: line 4: unknown key '{table}.{key}': secrets never live in the file: {says}" in result.stderr, \
        result.stderr
    assert "hunter2" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("table", "key", "meant"),
    [("smtp", "password-env", "smtp.password_env"), ("smtp", "password_envv", "smtp.password_env"),
     ("unsubscribe", "secret-env", "unsubscribe.secret_env")],
)  # fmt: skip
def test_a_misspelt_name_of_the_secrets_variable_is_not_taken_for_a_secret(
    tmp_path: Path, table: str, key: str, meant: str
) -> None:
    # An operator who writes the variable's name, as the file should, under a key spelt a little wrong (a hyphen
    # for the underscore): it was "secrets never live in the file: … goes in the environment variable
    # 'smtp.password_env' names", an alarm about a secret the file does not hold, and no word of the typo
    config = tmp_path / "config.toml"
    config.write_text(f'[templates]\ndir = "{TEMPLATES}"\n[{table}]\n{key} = "SHOP_MAIL_VAR"\n', encoding="utf-8")
    result = kembali("check", config=config)
    assert result.returncode == 2, result.stderr
    assert f"{config}: line 4: unknown key '{table}.{key}' (did you mean '{meant}'?)" in result.stderr, result.stderr
    assert "secrets never live in the file" not in result.stderr, result.stderr


def _slow_run(tmp_path: Path, smtp_server: RecordingServer) -> tuple[Path, Path, Path, subprocess.Popen[str]]:
    """A `run --once` started over the shop's own copy of the templates, sending slowly (one message at a time, 0.3 s
    each; batches of 2, each rendered as it is claimed): its config, templates, TMPDIR and process."""
    templates = tmp_path / "email"
    shutil.copytree(TEMPLATES, templates)
    config = write_config(tmp_path, smtp_port=smtp_server.port, extra="batch_size = 2\nin_flight_per_connection = 1\n")
    config.write_text(config.read_text().replace('tls = "none"', 'tls = "none"\npool_size = 1'))
    shop_in(tmp_path, config, customers=40)  # customers due a win-back, in both languages
    config.write_text(config.read_text().replace(f'dir = "{TEMPLATES}"', f'dir = "{templates}"'))
    smtp_server.default = Behaviour(delay_at="data", delay_seconds=0.3)
    argv = [sys.executable, "-m", "worker", "--config", str(config), "run", "--once"]
    scratch = tmp_path / "tmp"  # where the run's private copy of the templates goes
    scratch.mkdir()
    env = {**os.environ, "KEMBALI_LINK_SECRET": LINK_KEY, "TMPDIR": str(scratch)}
    run = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return config, templates, scratch, run


def test_run_once_renders_the_whole_run_from_the_templates_it_checked_at_its_start(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a long run (a slow SMTP server) over the shop's own copy of the templates
    config, templates, scratch, run = _slow_run(tmp_path, smtp_server)
    try:
        # When the operator saves the shared layout with a syntax error once the first messages have gone
        while smtp_server.data_taken < 2 and run.poll() is None:
            time.sleep(0.05)
        layout = templates / "_layout.html"
        layout.write_text(layout.read_text(encoding="utf-8") + "{% if %}\n", encoding="utf-8")
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    # Then the run went on with the templates it checked: every message was sent, none failed to render
    assert run.returncode == 0, out + err
    store = Store.from_url(load_settings(config).database_url)
    try:
        rows = store.messages(limit=10_000)
    finally:
        store.close()
    assert len(rows) > 4, "too few messages for the edit to fall mid-run"
    assert {row["status"] for row in rows} == {"sent"}, Counter(row["status"] for row in rows)
    assert len(smtp_server.messages) == len(rows)
    assert "render_error" not in err
    assert list(scratch.iterdir()) == [], "the run left its copy of the templates behind"
    # and the edit takes effect at the next run: it refuses to start, naming the file
    result = kembali("run", "--once", config=config)
    assert result.returncode == 2 and "_layout.html" in result.stderr, result.stderr


def test_run_once_stopped_at_once_by_a_second_signal_leaves_no_copy_of_the_templates(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a long run, sending
    _, _, scratch, run = _slow_run(tmp_path, smtp_server)
    try:
        while smtp_server.data_taken < 1 and run.poll() is None:
            time.sleep(0.05)
        # When Ctrl-C is pressed twice
        run.send_signal(signal.SIGINT)
        time.sleep(0.2)
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    # Then it exits at once, leaving nothing of its private copy of the templates behind
    assert run.returncode == 128 + signal.SIGINT.value, out + err
    assert list(scratch.iterdir()) == []
