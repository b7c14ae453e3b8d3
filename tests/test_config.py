"""Config is validated once at start-up; every error names the file and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.clikit import run_cli
from worker.adapters import db
from worker.app import link_keys, smtp_password
from worker.config import Settings, load_settings, settings_from_dict
from worker.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_config_is_valid_and_matches_the_defaults_where_it_should() -> None:
    settings = load_settings(ROOT / "config.toml")
    assert settings.campaigns.winback.quiet_days == 45
    assert settings.smtp.tls == "none" and settings.smtp.host == "127.0.0.1"
    assert settings.database_url == f"sqlite:///{ROOT / 'kembali.db'}"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"smtp": {"prot": 25}}, "unknown key 'smtp.prot' (did you mean 'smtp.port'?)"),
        ({"campaign": {}}, "unknown key 'campaign' (did you mean 'campaigns'?)"),
        ({"schedule": {"plan_cron": {"winbak": "0 9 * * *"}}},
         "'schedule.plan_cron.winbak' is not a campaign (did you mean 'winback'?): the campaigns are birthday, "
         "feedback, loyalty, new_products, winback"),
        ({"campaigns": {"winback": {"quiet_days": "45"}}}, "'campaigns.winback.quiet_days' must be int"),
        ({"smtp": {"port": 70000}}, "'smtp.port' must be between 1 and 65535"),
        ({"smtp": {"tls": "ssl"}}, "'smtp.tls' must be 'starttls', 'tls' or 'none'"),
        ({"smtp": {"host": ""}}, "'smtp.host' must be a host name or address"),
        ({"smtp": {"host": "smtp://mail.example.com"}}, "'smtp.host' must be a host name or address"),
        ({"smtp": {"host": "mail.example.com "}}, "'smtp.host' must be a host name or address"),
        ({"smtp": {"host": "mail.example.com:587"}}, "(the port goes in smtp.port)"),
        # an envelope sender SMTP cannot carry (the transport refuses it): every message failed for good at MAIL FROM
        ({"shop": {"from_address": "halo@toko_kembali.example"}}, "'shop.from_address' must be a plain ASCII email"),
        ({"smtp": {"username": "halo@shop.example\n"}}, "'smtp.username' must not hold a line break"),
        ({"smtp": {"host": "mail.example.com"}}, "'smtp.tls' is 'none' but smtp.host"),
        # asyncio reads an empty host as every interface: /metrics and the links open to the network, unsaid
        ({"web": {"host": ""}}, "'web.host' must be the address to listen on, such as 127.0.0.1"),
        ({"web": {"host": " "}}, "an empty one would listen on every interface"),
        ({"shop": {"time_zone": "Asia/Atlantis"}}, "'shop.time_zone' is not an IANA time zone"),
        # names the zone database holds that are no place: this host's own zone, and the "-00" placeholder
        ({"shop": {"time_zone": "localtime"}}, "'shop.time_zone' is not an IANA time zone"),
        ({"shop": {"time_zone": "Factory"}}, "'shop.time_zone' is not an IANA time zone"),
        ({"shop": {"time_zone": "posix/Asia/Jakarta"}}, "'shop.time_zone' is not an IANA time zone"),
        # what an Indonesian shop writes first: the zone's name as a clock shows it, or the IANA name in lower case
        ({"shop": {"time_zone": "WIB"}}, "is not an IANA time zone: 'WIB' (did you mean 'Asia/Jakarta'?)"),
        ({"shop": {"time_zone": "asia/jakarta"}},
         "is not an IANA time zone: 'asia/jakarta' (did you mean 'Asia/Jakarta'?)"),
        ({"sending": {"rate_per_second": 0}}, "'sending.rate_per_second' must be positive"),
        ({"smtp": {"final_reply_timeout_seconds": 0}}, "'smtp.final_reply_timeout_seconds' must be positive"),
        # a typo's exponent: the sender waited for its next slot for ever, run --once too, saying nothing
        ({"sending": {"rate_per_second": 1e-300}},
         "'sending.rate_per_second' must be at least one email a day (0.0000116 per second, 1/86400), not 1e-300"),
        ({"sending": {"domain_rate_per_second": 1e-6}},
         "'sending.domain_rate_per_second' must be at least one email a day"),
        # said in emails a day too, where 1e-05 beside 0.0000116 took counting zeros to compare
        ({"sending": {"rate_per_second": 0.00001}},
         "not 1e-05 (0.864 emails a day): each email would wait longer than a day for its turn"),
        ({"sending": {"throttle_floor_per_second": 1e-9}},
         "'sending.throttle_floor_per_second' must be at least one email a day"),
        ({"sending": {"domains": {"gmail.com": {"rate_per_second": 1e-7, "burst": 1}}}},
         "'sending.domains.gmail.com.rate_per_second' must be at least one email a day"),
        ({"campaigns": {"winback": {"steps": [{"days": 45, "template": "winback"}, {"days": 120, "template": "w"}],
                                    "give_up_after_days": 120}}},
         "or more than the last step's days (120), not 120"),
        ({"campaigns": {"winback": {"give_up_after_days": 40}}},
         "'campaigns.winback.give_up_after_days' must be 0 (no limit) or more than the last step's days (45)"),
        ({"campaigns": {"winback": {"give_up_after_days": 4000}}}, "'campaigns.winback.give_up_after_days'"),
        ({"sending": {"burst": True}}, "'sending.burst' must be int, not bool"),
        ({"unsubscribe": {"url": "http://shop.example/u"}}, "'unsubscribe.url' must be an https:// URL"),
        ({"database": {"url": "mysql://x"}}, "'database.url' must be a sqlite:/// or postgresql"),
        ({"shop": {"base_url": ""}}, "'shop.base_url' must be an absolute http:// or https:// link with a host"),
        ({"shop": {"base_url": "toko.example"}}, "'shop.base_url' must be an absolute http:// or https:// link"),
        ({"shop": {"base_url": "https://"}}, "'shop.base_url' must be an absolute"),
        ({"shop": {"base_url": "https://toko.example:99999/"}}, "'shop.base_url' must be an absolute"),
        ({"shop": {"base_url": "https://toko.example:http/"}}, "'shop.base_url' must be an absolute"),
        ({"shop": {"base_url": 'https://toko.example/"onmouseover=x'}}, "'shop.base_url' must be an absolute"),
        ({"campaigns": {"feedback": {"link_url": "https://toko .example/f"}}},
         "'campaigns.feedback.link_url' must be an absolute https:// link"),
        ({"campaigns": {"feedback": {"link_url": "http://toko.example/f"}}},
         "'campaigns.feedback.link_url' must be an absolute https:// link"),
        # the token is appended to these links: after a #fragment a browser never sends it, and a "t" of their
        # own would be read in place of it (every unsubscribe and rating link a "this link doesn't work" page)
        ({"unsubscribe": {"url": "https://shop.example/u#top"}}, "'unsubscribe.url' must have no #fragment"),
        ({"unsubscribe": {"url": "https://shop.example/u?src=mail&t=1"}},
         "'unsubscribe.url' must have no query parameter 't'"),
        ({"campaigns": {"feedback": {"link_url": "https://toko.example/f#x"}}},
         "'campaigns.feedback.link_url' must have no #fragment"),
        ({"campaigns": {"feedback": {"link_url": "https://toko.example/f?t="}}},
         "'campaigns.feedback.link_url' must have no query parameter 't'"),
        ({"smtp": "localhost"}, "[smtp] must be a table"),
        ({"policy": {"priorities": ["bday", "winback"]}},
         "'policy.priorities' 'bday' is not a campaign (did you mean 'birthday'?)"),
        ({"policy": {"priorities": ["winback", "feedback", "winback"]}},
         "'policy.priorities' lists 'winback' more than once"),
        # an enabled campaign left out went silently last, below every one listed
        ({"campaigns": {"loyalty": {"enabled": True}, "feedback": {"enabled": True}},
          "policy": {"priorities": ["birthday", "winback"]}},
         "'policy.priorities' leaves out 'feedback', 'loyalty', which are enabled: list every enabled campaign"),
        ({"campaigns": {"loyalty": {"enabled": True}}, "policy": {"priorities": []}},
         "'policy.priorities' leaves out 'loyalty', 'winback', which are enabled"),
        # a coupon code without its percent: the shipped copy told every customer of the step "0% off with the code"
        ({"campaigns": {"winback": {"steps": [{"days": 45, "template": "winback-reminder", "coupon_code": "HALO"}]}}},
         "'campaigns.winback.steps[0].coupon_percent' must be between 1 and 100 with a coupon_code ('HALO')"),
        ({"campaigns": {"winback": {"coupon_code": "KEMBALI", "coupon_percent": 0}}},
         "'campaigns.winback.coupon_percent' must be between 1 and 100 with a coupon_code ('KEMBALI')"),
        ({"campaigns": {"birthday": {"coupon_percent": 0}}},
         "'campaigns.birthday.coupon_percent' must be between 1 and 100 with a coupon_code ('ULTAH15')"),
        ({"campaigns": {"loyalty": {"coupon_percent": 0}}},
         "'campaigns.loyalty.coupon_percent' must be between 1 and 100 with a coupon_code ('SETIA20')"),
    ],
)
def test_bad_settings_name_the_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_dict(raw, source="shop.toml")
    assert str(caught.value).startswith("shop.toml: ")
    assert message in str(caught.value)


def test_a_sequence_of_win_back_steps_loads_whatever_the_one_step_coupon_it_does_not_use() -> None:
    # a shop that turned the one-step coupon off (coupon_percent = 0, the code left as shipped) and then wrote its
    # steps, each with its own coupon: no email says the one-step coupon, and the config worked: it still loads
    steps = [{"days": 45, "template": "winback-reminder"},
             {"days": 75, "template": "winback", "coupon_code": "KEMBALI10", "coupon_percent": 10}]
    settings = settings_from_dict({"campaigns": {"winback": {"coupon_percent": 0, "steps": steps}}})
    assert [(s.coupon_code, s.coupon_percent) for s in settings.campaigns.winback.effective_steps] == [
        ("", 0), ("KEMBALI10", 10)]


def test_priorities_may_leave_out_the_campaigns_turned_off() -> None:
    # an older config, written before loyalty and new products, lists the campaigns it has: it still loads
    settings = settings_from_dict({"policy": {"priorities": ["birthday", "feedback", "winback"]}})
    assert settings.policy.priorities == ("birthday", "feedback", "winback")


def test_plaintext_to_a_remote_host_can_be_forced() -> None:
    settings = settings_from_dict({"smtp": {"host": "mail.example.com", "allow_plaintext_remote": True}})
    assert settings.smtp.host == "mail.example.com"


def test_a_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[smtp]\nport = = 25\n")
    with pytest.raises(ConfigError, match=r"config.toml: invalid TOML: .*line 2"):
        load_settings(path)


@pytest.mark.parametrize(("text", "expected"), [
    # a key added to a table that already has it (the shop's time zone pasted under [shop] from the README)
    ('[shop]\nname = "Toko"\ntime_zone = "Asia/Jakarta"\n\n[smtp]\nport = 25\n\n[shop]\ntime_zone = "Asia/Makassar"\n',
     "line 8: table [shop] is written twice (first at line 1): keep one, with all its keys"),
    ('[smtp]\nhost = "mail.example.com"\nport = 587\n  port = 25  # the relay\n',
     "line 4: 'smtp.port' is written twice (first at line 3): keep one of them"),
    ('[sending.domains]\n"gmail.com" = { rate_per_second = 10.0 }\n"gmail.com" = { rate_per_second = 5.0 }\n',
     "line 3: 'sending.domains.gmail.com' is written twice (first at line 2): keep one of them"),
    # a line inside a multi-line string that reads like the key is text, not the first one
    ('[shop]\nsignature = """\nname = Toko Kita\n"""\nname = "Toko"\nname = "Toko Kita"\n',
     "line 6: 'shop.name' is written twice (first at line 5): keep one of them"),
])
def test_a_key_or_table_written_twice_is_named_with_both_lines(tmp_path: Path, text: str, expected: str) -> None:
    # TOML refuses the second one; the operator read "invalid TOML: Cannot overwrite a value (at line 4, column
    # 13)" or "Cannot declare ('shop',) twice", with no key named and no word of where the first one is
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == f"{path}: {expected}"


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: config file not found"):
        load_settings(tmp_path / "nope.toml")


def test_secrets_come_from_the_environment_and_never_show_in_reprs() -> None:
    settings = settings_from_dict({"smtp": {"username": "shop", "password_env": "MY_SMTP_PW"}})
    assert smtp_password(settings, {"MY_SMTP_PW": "hunter2-hunter2"}) == "hunter2-hunter2"
    assert "hunter2" not in repr(settings)
    with pytest.raises(ConfigError, match="MY_SMTP_PW"):
        smtp_password(settings, {})
    assert smtp_password(Settings(), {}) is None  # no username: no password needed


def test_link_keys_allow_rotation_and_refuse_short_keys() -> None:
    settings = Settings()
    assert link_keys(settings, {"KEMBALI_LINK_SECRET": "new-key-0123456789, old-key-0123456789"}) == [
        b"new-key-0123456789", b"old-key-0123456789"]
    with pytest.raises(ConfigError, match="too short"):
        link_keys(settings, {"KEMBALI_LINK_SECRET": "short"})
    with pytest.raises(ConfigError, match="KEMBALI_LINK_SECRET"):
        link_keys(settings, {})


@pytest.mark.parametrize(("raw", "state"), [(None, "which is not set"), ("", "which is set but empty"),
                                            (" , ", "which holds no key (only commas and spaces)")])
def test_a_link_key_variable_without_a_key_says_which_way_and_how_to_make_one(raw: str | None, state: str) -> None:
    # Given KEMBALI_LINK_SECRET unset, exported empty (an unexpanded ${VAR} in a unit file), or only separators
    environ = {} if raw is None else {"KEMBALI_LINK_SECRET": raw}
    with pytest.raises(ConfigError) as caught:
        link_keys(Settings(), environ)
    message = str(caught.value)
    # Then the error says which of these it is, not "not set" for a variable the operator did set
    assert f"names the environment variable KEMBALI_LINK_SECRET, {state}:" in message, message
    # and the command it suggests runs where Python 3 has no `python` (Debian, Ubuntu: the README's python3)
    assert "$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')" in message, message


def test_a_short_key_among_several_is_named_by_its_place_and_never_shown() -> None:
    # Given three keys in rotation, the second one too short (a stray comma inside a key, a truncated paste)
    environ = {"KEMBALI_LINK_SECRET": "new-key-0123456789,sh0rt,old-key-0123456789"}
    # Then the error says which one, counting from the newest, and shows none of them
    with pytest.raises(ConfigError) as caught:
        link_keys(Settings(), environ)
    message = str(caught.value)
    assert "the 2nd of the 3 keys in KEMBALI_LINK_SECRET (newest first) is too short" in message, message
    assert "5 characters" in message and "at least 16" in message, message
    assert not any(key in message for key in ("sh0rt", "new-key", "old-key")), message


def test_a_one_character_key_is_too_short_in_the_singular() -> None:
    too_short = r"the key in KEMBALI_LINK_SECRET is too short \(1 character; use at least 16\)"
    with pytest.raises(ConfigError, match=too_short):
        link_keys(Settings(), {"KEMBALI_LINK_SECRET": "x"})


def test_a_key_that_is_not_utf8_signs_links_as_its_bytes() -> None:
    # Given a key saved in Latin-1 (Python reads the environment's other bytes as lone surrogates)
    raw = b"kunci-rahasia-\xe9t\xe9-0123"
    keys = link_keys(Settings(), {"KEMBALI_LINK_SECRET": raw.decode("utf-8", "surrogateescape")})
    # Then it is a key as good as any, its very bytes (it was a traceback from every command)
    assert keys == [raw]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql+psycopg://shop:S3cret-pw@db.internal:54x2/kembali", "has a host and port that cannot be read"),
        ("postgresql+psycopg://shop:S3cret-pw@db.internal:99999/kembali", "has a host and port that cannot be read"),
        ("postgresql+psycopg://shop:S3cret-pw@[::1/kembali", "has a host and port that cannot be read"),
        ("postgresql+asyncpg://shop:S3cret-pw@db.internal/kembali", "driver 'postgresql+asyncpg'"),
        ("postgresql+psycopg2://shop:S3cret-pw@db.internal/kembali", "driver 'postgresql+psycopg2'"),
        ("postgresql+psycopg_async://shop:S3cret-pw@db.internal/kembali", "driver 'postgresql+psycopg_async'"),
        ("postgresqll://shop:S3cret-pw@db.internal/kembali", "is not a URL SQLAlchemy can read"),
        ("sqlite://kembali.db", "has one slash too few: an SQLite file is sqlite:///kembali.db"),
        ("sqlite://", "names no database file"),
        ("sqlite:///:memory:", "names no database file"),
        # a traceback from every command (`check` too), or a warning quoting SQLAlchemy's source line
        ("sqlite:///kembali.db?timeout=abc", "has a query ('?timeout=abc'): an SQLite URL takes none"),
        ("sqlite:///kembali.db?uri=true&mode=ro", "has a query ('?uri=true&mode=ro'): an SQLite URL takes none"),
        # libpq's host and port in the query, as the engine reads them: each was a traceback from every command
        ("postgresql+psycopg://shop:S3cret-pw@db.internal/kembali?port=5433x",
         "has a host or port in its query that cannot be read (Received non-integer port arguments: ('5433x',))"),
        ("postgresql+psycopg://shop:S3cret-pw@/kembali?host=a,b&port=1,2,3",
         "has a host or port in its query that cannot be read (number of hosts and ports don't match)"),
    ],
)
def test_a_database_url_the_engine_cannot_use_is_refused_by_name_without_showing_it(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        db.check_url(settings_from_dict({"database": {"url": url}}, source="shop.toml"))
    assert str(caught.value).startswith("shop.toml: 'database.url' ")
    assert message in str(caught.value)
    assert "S3cret" not in str(caught.value)


@pytest.mark.parametrize("url", ["sqlite:///kembali.db", "sqlite:////var/lib/kembali/kembali.db",
                                 "postgresql+psycopg://shop:pw@db.internal:5432/kembali",
                                 "postgresql://shop@db.internal/kembali", "postgresql+psycopg:///kembali?host=/run/pg",
                                 "postgresql+psycopg://shop@/kembali?host=db1,db2&port=5432,5433"])
def test_the_database_urls_kembali_can_use_are_taken(url: str) -> None:
    settings = settings_from_dict({"database": {"url": url}})
    db.check_url(settings)
    assert settings.database.url == url


def test_a_config_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"\xef\xbb\xbf[smtp]\nport = 587\ntls = \"starttls\"\n")  # as Notepad saves "UTF-8"
    assert load_settings(path).smtp.port == 587


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_a_config_that_is_not_utf8_names_its_line(tmp_path: Path, bom: bytes) -> None:
    # with a byte-order mark too (it named "line 3 ... byte 0x43", three bytes before the bad one)
    path = tmp_path / "config.toml"
    path.write_bytes(bom + '[shop]\nname = "Toko Kembali"\npostal_address = "Jl. Café 1"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == f"{path}: line 3: not UTF-8 text (byte 0xe9); save the file as UTF-8"


def test_a_folder_given_as_the_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path)
    assert str(caught.value) == f"{tmp_path}: is a folder, not a config file"


def test_an_endless_file_given_as_the_config_is_refused_not_read_forever() -> None:
    # ``--config /dev/zero`` (or a log file named by mistake) read until memory ran out
    with pytest.raises(ConfigError) as caught:
        load_settings("/dev/zero")
    assert str(caught.value) == "/dev/zero: larger than 1 MiB: not a config file"


def test_a_config_read_from_a_pipe_still_loads(tmp_path: Path) -> None:
    # as ``--config <(envsubst < config.toml)`` gives it: a named pipe, whose size is not known before it is read
    import os
    import threading

    fifo = tmp_path / "config.pipe"
    os.mkfifo(fifo)
    text = '[shop]\nname = "Toko Pipa"\npostal_address = "Jl. Pipa 1"\n' + "# padding\n" * 20_000

    def write() -> None:
        with open(fifo, "w", encoding="utf-8") as out:
            out.write(text)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        settings = load_settings(fifo)
    finally:
        writer.join(timeout=10)
    assert settings.shop.name == "Toko Pipa"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"smtp": {"username": "shop", "password_env": "p@ss-W0rd!"}}, "smtp.password_env"),
        ({"unsubscribe": {"secret_env": "Zx9-kq_Lm2P0aQ7vN3rT8yW5"}}, "unsubscribe.secret_env"),
        ({"unsubscribe": {"secret_env": ""}}, "unsubscribe.secret_env"),
    ],
)
def test_a_secret_written_where_its_variable_is_named_is_refused_without_showing_it(
    raw: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_dict(raw, source="shop.toml")
    assert str(caught.value).startswith(f"shop.toml: '{key}' must be the name of an environment variable")
    assert "W0rd" not in str(caught.value) and "Zx9" not in str(caught.value)


def test_any_environment_variable_name_is_taken() -> None:
    settings = settings_from_dict({"smtp": {"password_env": "smtp_pw_2"}, "unsubscribe": {"secret_env": "_LINK_KEY"}})
    assert (settings.smtp.password_env, settings.unsubscribe.secret_env) == ("smtp_pw_2", "_LINK_KEY")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"campaigns": {"feedback": {"lookback_days": 2**63 - 1}}},
         "'campaigns.feedback.lookback_days' must be at most 3650 days (ten years)"),
        ({"campaigns": {"loyalty": {"expires_after_days": 5_000_000}}},
         "'campaigns.loyalty.expires_after_days' must be at most 3650 days"),
        ({"campaigns": {"winback": {"steps": [{"days": 45}, {"days": 9_999_999}]}}},
         "'campaigns.winback.steps[1].days' must be at most 3650 days"),
        ({"policy": {"frequency_caps": [[1, 3], [4, 10_000_000]]}}, "'policy.frequency_caps[1]' must be at most 3650"),
        ({"sending": {"lease_seconds": 2**63 - 1}}, "'sending.lease_seconds' must be at most 86400 seconds (a day)"),
        ({"schedule": {"maintenance_interval_seconds": 1e300}}, "'schedule.maintenance_interval_seconds' must be at"),
        ({"daemon": {"health_summary_seconds": 1e300}}, "'daemon.health_summary_seconds' must be at most 86400"),
        ({"smtp": {"final_reply_timeout_seconds": 1e9}}, "'smtp.final_reply_timeout_seconds' must be at most 86400"),
        ({"smtp": {"pool_size": 2**63 - 1}}, "'smtp.pool_size' must be at most 100, not 9_223_372_036_854_775_807"),
        ({"sending": {"in_flight_per_connection": 10_000}}, "'sending.in_flight_per_connection' must be at most 100"),
        ({"campaigns": {"loyalty": {"spend_milestones": [2**63 - 1]}}},
         "'campaigns.loyalty.spend_milestones[0]' must be at most 1_000_000_000_000_000"),
        ({"campaigns": {"winback": {"recommendations": -1}}}, "'campaigns.winback.recommendations' must be 0"),
        # counts no shop needs that high, taken as typos: a rate limit that never limits, a pause that never comes,
        # more connections than the process has file descriptors
        ({"sending": {"burst": 10**12}}, "'sending.burst' must be at most 100_000, not 1_000_000_000_000"),
        ({"sending": {"domain_burst": 10**9}}, "'sending.domain_burst' must be at most 100_000"),
        ({"sending": {"domains": {"gmail.com": {"burst": 10**9}}}},
         "'sending.domains.gmail.com.burst' must be at most 100_000"),
        ({"sending": {"pause_after_failures": 10**9}}, "'sending.pause_after_failures' must be at most 100_000"),
        ({"web": {"max_connections": 10**6}}, "'web.max_connections' must be at most 10_000"),
    ],
)
def test_a_value_past_what_the_program_can_take_is_refused_by_name(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_dict(raw, source="shop.toml")
    assert str(caught.value).startswith("shop.toml: ") and message in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('# shop\n[smtp]\nhost = "127.0.0.1"\n\nport = "25"\n', "line 5: 'smtp.port' must be int, not str ('25')"),
        ("[smtp]\nport = 70000\n", "line 2: 'smtp.port' must be between 1 and 65535"),
        ("[smtp]\nusernam = 'x'\n", "line 2: unknown key 'smtp.usernam' (did you mean 'smtp.username'?)"),
        ("[campains.winback]\nenabled = true\n", "line 1: unknown key 'campains' (did you mean 'campaigns'?)"),
        ('[sending.domains]\n"gmail.com" = { rate_per_second = 0.0, burst = 10 }\n',
         "line 2: 'sending.domains.gmail.com.rate_per_second' must be positive"),
        ("[[campaigns.winback.steps]]\ndays = 10\n[[campaigns.winback.steps]]\n# later\ndays = 5\n",
         "line 5: 'campaigns.winback.steps[1].days' must be at least 1 and greater than the previous step's"),
        ("[policy]\nfrequency_caps = [\n  [1, 3],\n  [0, 30],\n]\n",
         "line 2: 'policy.frequency_caps[1]' must be [max emails, per days], both at least 1"),
        ("[web]\nhost = '0.0.0.0'\n[sending]\nbatch_size = 0\n", "line 4: 'sending.batch_size' must be at least 1"),
        # milestones out of order or repeated were taken as given: a typo (50 for 5) went unseen
        ("[campaigns.loyalty]\nenabled = true\norder_milestones = [10, 5]\n",
         "line 3: 'campaigns.loyalty.order_milestones' must each be greater than the one before, not [10, 5]"),
        ("[campaigns.loyalty]\norder_milestones = [5, 5]\n",
         "line 2: 'campaigns.loyalty.order_milestones' must each be greater than the one before, not [5, 5]"),
        ("[campaigns.loyalty]\nspend_milestones = [\n  5000000,\n  1000000,\n]\n",
         "line 2: 'campaigns.loyalty.spend_milestones' must each be greater than the one before, "
         "not [5000000, 1000000]"),
        # a key without a default left out: a TypeError traceback, not the key
        ("[[campaigns.winback.steps]]\ntemplate = 'winback'\n",
         "line 1: 'campaigns.winback.steps[0].days' is missing (it has no default)"),
    ],
)
def test_a_bad_key_is_named_with_its_line(tmp_path: Path, text: str, message: str) -> None:
    # every key error named the file and the key but not the line: in the shipped 300-line config.toml the operator
    # searched for it (a table's name is written once, its keys by their last part)
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == f"{path}: {message}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # a dotted key named the line of the table's header (line 1), not its own
        ('[smtp]\nhost = "127.0.0.1"\n\ntimeout.seconds = 30\n',
         "line 4: unknown key 'smtp.timeout' (did you mean 'smtp.timeout_seconds'?)"),
        # a domain left unquoted is a table of its own for each dot: "unknown key 'sending.domains.gmail.com'" named
        # the very key the operator meant, with no word of the quotes it needs
        ("[sending.domains]\n# Gmail\ngmail.com = { rate_per_second = 10.0, burst = 10 }\n",
         "line 3: 'sending.domains.gmail.com': write the domain in quotes, \"gmail.com\" = { … } (unquoted, TOML "
         "reads each dot as a table of its own)"),
        ('[sending.domains]\n"gmail.com" = { rate_per_second = 10.0 }\nmail.yahoo.co.id = { burst = 5 }\n',
         "line 3: 'sending.domains.mail.yahoo.co.id': write the domain in quotes, \"mail.yahoo.co.id\" = { … } "
         "(unquoted, TOML reads each dot as a table of its own)"),
    ],
)
def test_check_names_a_dotted_key_by_its_own_line_and_tells_an_unquoted_domain_to_be_quoted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    code, printed = run_cli(capsys, "--config", str(path), "check")
    assert code == 2
    assert printed == f"kembali: configuration error: {path}: {message}\n"


def test_a_bad_key_of_the_shipped_config_is_named_with_its_line(tmp_path: Path) -> None:
    lines = (ROOT / "config.toml").read_text(encoding="utf-8").splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("burst = "))
    lines[at] = "burst = 0"
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"config.toml: line {at + 1}: 'sending.burst' must be at least 1$"):
        load_settings(path)


@pytest.mark.parametrize(
    ("after", "line", "message"),
    [
        # added "at the end of [sending]", which the shipped file follows with its empty [sending.domains]
        ('# "yahoo.com" = { rate_per_second = 5.0, burst = 5 }', "daily_quota = 1000",
         "'sending.domains.daily_quota' is no domain's rate: a key of [sending], not of [sending.domains]: a key "
         "belongs to the table of the header above it; write it above [sending.domains]"),
        # added "at the end of [campaigns.winback]", after its [[campaigns.winback.steps]]
        ('coupon_percent = 15', "holdout_share = 0.1",
         "unknown key 'campaigns.winback.steps[2].holdout_share': a key of [campaigns.winback], not of "
         "[[campaigns.winback.steps]]: a key belongs to the table of the header above it; write it above the first "
         "[[campaigns.winback.steps]]"),
        ('within_days = 30', "quiet_hours_start = '22:00'",
         "unknown key 'campaigns.loyalty.quiet_hours_start': a key of [policy], not of [campaigns.loyalty]: a key "
         "belongs to the table of the header above it; write it under [policy]"),
        ("# Kembali configuration. Every key is optional: a missing key takes the default", "batch_size = 10",
         "unknown key 'batch_size': a key of [sending]: a key belongs to the table of the header above it; write it "
         "under [sending]"),
        ('lock_timeout_seconds = 30', "host = 'db.internal'",
         "unknown key 'database.host': a key of [smtp] and [web], not of [database]: a key belongs to the table of "
         "the header above it; write it under the one meant"),
    ],
)
def test_a_key_written_under_another_tables_header_is_told_where_it_belongs(
    tmp_path: Path, after: str, line: str, message: str
) -> None:
    # a key added below the last one of its table in the shipped file lands in the table whose header follows:
    # it was "[sending.domains.daily_quota] must be a table", "unknown key 'campaigns.winback.steps[2].holdout_share'"
    lines = (ROOT / "config.toml").read_text(encoding="utf-8").splitlines()
    at = next(i for i, text in enumerate(lines) if text.startswith(after)) + 1
    lines.insert(at, line)
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == f"{path}: line {at + 1}: {message}"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"database": {"url": ["postgresql+psycopg://shop:S3cretPW@db.example/shop"]}}, "database.url"),
        ({"database": {"url": {"password": "S3cretPW"}}}, "database.url"),
        ({"smtp": {"password_env": ["S3cretPW"]}}, "smtp.password_env"),
        ({"unsubscribe": {"secret_env": 31415926}}, "unsubscribe.secret_env"),
    ],
)
def test_a_secret_written_with_the_wrong_type_is_not_shown(raw: dict[str, Any], key: str) -> None:
    # a wrong type was shown with its value: "'database.url' must be str, not list (['postgresql+psycopg://shop:S3cr…"
    with pytest.raises(ConfigError) as caught:
        settings_from_dict(raw)
    message = str(caught.value)
    assert f"'{key}' must be str, not " in message
    assert "S3cretPW" not in message and "31415926" not in message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # an empty shop name: every footer read "Toko Kembali" no more but ", Jl. …", the unsubscribe page "from "
        ('[shop]\nname = ""\n', "line 2: 'shop.name' must not be empty"),
        ('[shop]\ndomain = "x.example"\nname = "   "\n', "line 3: 'shop.name' must not be empty"),
        # a from_name of only spaces: the From header lost its name without a word (empty means shop.name)
        ('[shop]\nfrom_name = " \\t "\n', "line 2: 'shop.from_name' must not be only spaces"),
        # control characters in what goes into the From header and every subject and footer: they were accepted
        # and quietly turned into spaces or dropped when the message was written
        ('[shop]\nfrom_name = "Toko\\r\\nBcc: all@evil.example"\n',
         "line 2: 'shop.from_name' must not hold a control character (U+000D at character 5)"),
        ('[shop]\nname = "Toko\\u0000Kembali"\n',
         "line 2: 'shop.name' must not hold a control character (U+0000 at character 5)"),
        ('[shop]\nname = """Toko\nKembali"""\n',
         "line 2: 'shop.name' must not hold a control character (U+000A at character 5)"),
        ('[shop]\nfrom_name = "Toko \\u202eilabmeK"\n',
         "line 2: 'shop.from_name' must not hold a control character (U+202E at character 6)"),
        # a former domain that no Message-ID could have ended in: a typo, the links of then would stay refused
        ('[shop]\ndomain = "baru.example"\nprevious_domains = ["lama.example", "lama example"]\n',
         "line 3: 'shop.previous_domains[1]' must be a domain name such as shop.example, as shop.domain was once, "
         "not 'lama example'"),
    ],
)
def test_a_shop_name_that_headers_and_footers_cannot_show_is_refused_with_its_line(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value).startswith(f"{path}: {message}")


def test_the_shops_domains_are_taken_lower_cased_without_a_final_dot() -> None:
    # a domain's case and a final dot name the same domain: Message-IDs, links and the ledger's look-ups all agree
    settings = settings_from_dict({"shop": {"domain": "Toko-Baru.Example.", "previous_domains": ["TOKO.example"]}})
    assert settings.shop.domain == "toko-baru.example"
    assert settings.shop.previous_domains == ("toko.example",)


def test_an_empty_from_name_is_taken_and_means_the_shop_name() -> None:
    settings = settings_from_dict({"shop": {"name": "Batik Sari", "from_name": ""}})
    assert settings.shop.from_name == "" and settings.shop.name == "Batik Sari"


def test_a_subject_limit_past_what_a_message_carries_is_refused_with_its_line(tmp_path: Path) -> None:
    # checks.subject_max_chars = 300 let check and preview pass a 250-character subject that every message then
    # carried cut at 200 characters, without a word
    path = tmp_path / "config.toml"
    path.write_text("[checks]\nsubject_max_chars = 300\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == (f"{path}: line 2: 'checks.subject_max_chars' must be at most 200 (a message's "
                                 "subject is cut there), not 300")
    assert settings_from_dict({"checks": {"subject_max_chars": 200}}).checks.subject_max_chars == 200


def test_max_attempts_past_any_sensible_count_is_refused_with_its_line(tmp_path: Path) -> None:
    # max_attempts = 100000 (a typo for 10) was taken: a mailbox that kept answering 4xx was retried until its
    # message expired, and past attempt 1025 the retry delay overflowed (OverflowError in the dispatcher)
    path = tmp_path / "config.toml"
    path.write_text("[sending]\nbatch_size = 100\nmax_attempts = 100000\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == f"{path}: line 3: 'sending.max_attempts' must be at most 100, not 100_000"
    assert settings_from_dict({"sending": {"max_attempts": 100}}).sending.max_attempts == 100


def test_a_database_url_the_engine_cannot_use_is_named_with_its_line(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # every other key error named its line; the database URL, checked after the file is loaded, did not: the
    # operator searched the 300-line config.toml for 'database.url' (the password stays unshown)
    path = tmp_path / "config.toml"
    path.write_text('# shop\n\n[database]\n# the ledger\nurl = "postgresqll://shop:S3cret-pw@db.internal/k"\n',
                    encoding="utf-8")
    code, printed = run_cli(capsys, "--config", str(path), "stats")
    assert code == 2
    assert f"{path}: line 5: 'database.url' is not a URL SQLAlchemy can read" in printed
    assert "S3cret" not in printed
