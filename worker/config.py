"""config.toml → frozen, validated ``Settings``.

Every section is a frozen dataclass; the loader walks the dataclass fields, so
an unknown or mistyped key, a wrong type or an out-of-range value stops the
program with the file and the dotted key named. Secrets are never in the file:
the file names an environment variable (``smtp.password_env``) and the value is
read from the environment when a connection is made, never stored here.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import itertools
import math
import re
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker import money
from worker.core import render, tokens
from worker.domain import SMTP_ADDRESS, place_zones, zone_meant
from worker.errors import ConfigError, not_utf8

DEFAULT_CONFIG = Path("config.toml")
LOG_LEVELS = ("debug", "info", "warning", "error")
"""What ``logging.level`` (and ``--log-level``) may be."""


@dataclass(frozen=True)
class ShopSettings:
    name: str = "Toko Kembali"
    domain: str = "toko-kembali.example"
    """Domain used in Message-IDs; link tokens are signed for it (``core.tokens``). Lower-cased, without a final dot
    (``core.tokens.shop_scope``): a domain's case names the same domain."""
    previous_domains: tuple[str, ...] = ()
    """The domains ``domain`` was before: links in emails sent then (signed for the domain of the day) still work.
    Lower-cased as ``domain`` is, whatever case the domain was (or is) written in."""
    from_address: str = "halo@toko-kembali.example"
    from_name: str = "Toko Kembali"
    reply_to: str = ""
    postal_address: str = "Jl. Contoh No. 1, Jakarta 10110, Indonesia"
    base_url: str = "https://toko-kembali.example"
    time_zone: str = "Asia/Jakarta"
    default_locale: str = "id"
    currency: str = "IDR"
    """An ISO 4217 code, upper-cased as an import stores each order's (``idr`` is IDR)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "domain", tokens.shop_scope(self.domain))
        object.__setattr__(self, "previous_domains", tuple(tokens.shop_scope(d) for d in self.previous_domains))
        if isinstance(self.currency, str):  # revenue and spend totals compare it with the orders' as stored
            object.__setattr__(self, "currency", self.currency.upper())


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = "sqlite:///kembali.db"
    """SQLAlchemy URL: ``sqlite:///path.db`` or ``postgresql+psycopg://user@host/db`` (``postgresql://`` and
    libpq's ``postgres://`` are read as that)."""
    lock_timeout_seconds: float = 30.0
    """PostgreSQL: how long a statement waits for a lock another session holds before the server cancels it
    (``lock_timeout``; logged as ``db_lock_timeout``, the work tried again); 0: for ever."""
    idle_in_transaction_timeout_seconds: float = 60.0
    """PostgreSQL: how long a session may sit idle inside a transaction before the server ends it, rolling the
    transaction back and releasing its locks (``idle_in_transaction_session_timeout``): a stuck worker's; 0: never."""

    def __post_init__(self) -> None:
        # psql, libpq and a hosting provider's DATABASE_URL write postgres://, a scheme SQLAlchemy no longer knows
        if isinstance(self.url, str) and self.url.startswith(("postgres://", "postgres+")):
            object.__setattr__(self, "url", "postgresql" + self.url.removeprefix("postgres"))


@dataclass(frozen=True)
class SmtpSettings:
    host: str = "127.0.0.1"
    port: int = 2525
    tls: str = "none"
    """``starttls``, ``tls`` (implicit TLS) or ``none`` (loopback only unless forced)."""
    allow_plaintext_remote: bool = False
    username: str = ""
    password_env: str = "KEMBALI_SMTP_PASSWORD"  # noqa: S105 - the variable's name, not a secret
    timeout_seconds: float = 30.0
    final_reply_timeout_seconds: float = 600.0
    """The wait for the reply to a message's final dot (RFC 5321 4.5.3.2.6: ten minutes): a relay scans the message
    before it answers, and a reply given up on leaves the message ``uncertain``, never sent again by itself."""
    pool_size: int = 4


def tls_port_hint(smtp: SmtpSettings) -> str | None:
    """What is unusual about ``smtp.tls`` for ``smtp.port``, or None: 465 is the implicit-TLS port (a client that
    waits for a plaintext greeting there times out like a hung server); 587 and 25 take STARTTLS."""
    if smtp.port == 465 and smtp.tls != "tls":
        return (f"smtp.port 465 is the implicit-TLS port (SMTPS), where smtp.tls is usually 'tls', not "
                f"{smtp.tls!r}: the server waits for TLS while Kembali waits for its greeting")  # fmt: skip
    if smtp.port in (25, 587) and smtp.tls == "tls":
        return f"smtp.port {smtp.port} usually takes STARTTLS: smtp.tls is usually 'starttls' there, not 'tls'"
    return None


@dataclass(frozen=True)
class DomainRate:
    """One recipient domain's own rate (``[sending.domains]``)."""

    rate_per_second: float = 5.0
    burst: int = 5


@dataclass(frozen=True)
class SendingSettings:
    batch_size: int = 200
    max_attempts: int = 5
    lease_seconds: int = 300
    rate_per_second: float = 50.0
    burst: int = 50
    retry_base_seconds: float = 60.0
    retry_max_seconds: float = 6 * 3600.0
    daily_quota: int = 0
    """Messages per shop-local day across all workers; 0 = no quota."""
    domain_rate_per_second: float = 20.0
    """Rate for each recipient domain not listed in ``domains``."""
    domain_burst: int = 20
    domains: dict[str, DomainRate] = field(default_factory=dict)
    """Per-domain rates, e.g. ``"gmail.com" = {rate_per_second = 10, burst = 10}``."""
    throttle_floor_per_second: float = 0.2
    """Throttling replies halve a domain's rate (or the relay's own, the global rate: ``core.pace``), but never below
    this."""
    pause_after_failures: int = 20
    """Consecutive connection failures (before RCPT TO, or no reply at all; or the server's own trouble at RCPT TO
    or after, ``retry.TroubleStreak``) that pause the dispatcher; a refused login pauses it at once; 0 = never."""
    pause_retry_seconds: float = 60.0
    """After a pause the daemon tries again after this long, twice as long after each pause in a row (at most
    15 minutes, or this if longer); a send that gets past the connection starts over. 0 = stay paused until
    SIGHUP or a restart."""
    in_flight_per_connection: int = 4
    """Messages per SMTP connection that may be marked ``sending`` at once: one on the wire,
    the others' marks being committed meanwhile (the group commit needs company)."""
    shared_limits: str = "auto"
    """Where rate state lives: ``database`` (shared by every worker), ``process``, or
    ``auto`` (database on PostgreSQL, process on SQLite)."""
    compose_processes: int = 1
    """Helper processes that render and build MIME for batches beside the event loop
    (``worker.composing``); 0 = compose in the event loop's thread."""


@dataclass(frozen=True)
class UnsubscribeSettings:
    url: str = "https://toko-kembali.example/unsubscribe"
    """HTTPS base of the one-click link; a signed token is appended."""
    mailto: str = "unsubscribe@toko-kembali.example"
    """The mailto: alternative in List-Unsubscribe, after the HTTPS link; empty for none."""
    secret_env: str = "KEMBALI_LINK_SECRET"  # noqa: S105 - the variable's name, not a secret
    """Environment variable holding the key that signs link tokens."""


@dataclass(frozen=True)
class WinbackStep:
    """One step of the win-back sequence (``[[campaigns.winback.steps]]``)."""

    days: int
    """Days since the customer's only order before this step is due."""
    template: str = "winback"
    """The template folder under templates/email/."""
    coupon_code: str = ""
    coupon_percent: int = 0


@dataclass(frozen=True)
class WinbackSettings:
    enabled: bool = True
    quiet_days: int = 45
    """With no ``steps``: the single step's day count (the skeleton's one-step win-back)."""
    expires_after_days: int = 14
    coupon_code: str = "KEMBALI10"
    coupon_percent: int = 10
    recommendations: int = 3
    steps: tuple[WinbackStep, ...] = ()
    """The sequence, in increasing ``days``; empty = one step from quiet_days/coupon_*."""
    give_up_after_days: int = 0
    """A one-time buyer whose only order is more than this many days old gets no win-back email (0 = no limit):
    old addresses bounce more, and a note years late reads as spam."""
    holdout_share: float = 0.0

    @property
    def effective_steps(self) -> tuple[WinbackStep, ...]:
        if self.steps:
            return self.steps
        return (WinbackStep(self.quiet_days, "winback", self.coupon_code, self.coupon_percent),)


@dataclass(frozen=True)
class BirthdaySettings:
    enabled: bool = False
    """Off unless config.toml turns it on (an older config keeps sending win-back only)."""
    days_before: int = 3
    """0 = on the birthday itself (in the customer's time zone)."""
    coupon_code: str = "ULTAH15"
    coupon_percent: int = 15
    holdout_share: float = 0.0


@dataclass(frozen=True)
class FeedbackSettings:
    enabled: bool = False
    """Off unless config.toml turns it on (an older config keeps sending win-back only)."""
    days_after: int = 7
    """Days after delivery (or after the order was placed, when no delivery time is known)."""
    lookback_days: int = 14
    """Orders that reached ``days_after`` more than this many days ago are not asked any more."""
    scale: str = "stars"
    """``stars`` (1-5) or ``nps`` (0-10, likelihood to recommend)."""
    link_url: str = "https://toko-kembali.example/feedback"
    """HTTPS base of the rating links; a signed token is appended."""
    expires_after_days: int = 7
    holdout_share: float = 0.0


@dataclass(frozen=True)
class NewProductsSettings:
    enabled: bool = False
    """Off unless config.toml turns it on (an older config keeps sending win-back only)."""
    within_days: int = 14
    """Products launched in the last N days (and after the customer's last order) are new."""
    active_within_days: int = 180
    """Only customers whose last order is this recent (older ones are win-back's audience)."""
    max_products: int = 4
    expires_after_days: int = 5
    holdout_share: float = 0.0


@dataclass(frozen=True)
class LoyaltySettings:
    enabled: bool = False
    """Off unless config.toml turns it on (an older config keeps sending win-back only)."""
    order_milestones: tuple[int, ...] = (5, 10, 25)
    """The nth purchase that earns a reward."""
    spend_milestones: tuple[int, ...] = (5_000_000,)
    """Total spend (in the shop's currency, major units) that earns a reward."""
    within_days: int = 30
    """Only customers whose last order is this recent (the order that reached the milestone)."""
    coupon_code: str = "SETIA20"
    coupon_percent: int = 20
    expires_after_days: int = 14
    holdout_share: float = 0.0


@dataclass(frozen=True)
class CampaignSettings:
    winback: WinbackSettings = field(default_factory=WinbackSettings)
    birthday: BirthdaySettings = field(default_factory=BirthdaySettings)
    feedback: FeedbackSettings = field(default_factory=FeedbackSettings)
    new_products: NewProductsSettings = field(default_factory=NewProductsSettings)
    loyalty: LoyaltySettings = field(default_factory=LoyaltySettings)


@dataclass(frozen=True)
class PolicySettings:
    frequency_caps: tuple[tuple[int, ...], ...] = ((1, 3), (4, 30))
    """``[max emails, per days]`` pairs, across all campaigns, per mailbox (customer records that share an address
    share its caps)."""
    quiet_hours_start: str = "00:00"
    quiet_hours_end: str = "00:00"
    """Local time in the customer's zone; equal start and end = no quiet hours (the default when both
    keys are missing, so an older config behaves as before; one alone is an error; config.toml ships 21:00-08:00)."""
    priorities: tuple[str, ...] = ("birthday", "feedback", "winback", "loyalty", "new_products")
    """Highest first: decides which competing message takes a customer's free slot."""


@dataclass(frozen=True)
class TemplateSettings:
    dir: str = "templates/email"


@dataclass(frozen=True)
class CheckSettings:
    """Limits `kembali check` (and the live preview) hold every template to."""

    html_max_bytes: int = 102_000
    """Gmail clips HTML parts over about 102 KB behind a "view entire message" link."""
    subject_max_chars: int = 100
    render_timeout_seconds: float = 2.0
    """A render that takes longer is stopped (the Jinja2 sandbox does not bound CPU)."""


@dataclass(frozen=True)
class LoggingSettings:
    level: str = "info"
    format: str = "text"
    """``text`` for people, ``json`` for log collectors."""


@dataclass(frozen=True)
class ScheduleSettings:
    """When the daemon (``kembali run``) plans, sends and tidies up. Cron times are in shop.time_zone."""

    plan_cron: dict[str, str] = field(default_factory=dict)
    """Per-campaign planning cron, e.g. ``{winback = "0 9 * * *"}``; campaigns not listed use ``default_plan_cron``."""
    default_plan_cron: str = "0 9 * * *"
    """Five crontab fields (minute hour day month weekday), or six with seconds first."""
    dispatch_poll_seconds: float = 5.0
    """How often the dispatch loop looks for due rows when nothing woke it (retries, other workers' plans)."""
    maintenance_interval_seconds: float = 60.0
    """How often lapsed leases are released, expired messages skipped and old attempts pruned."""
    attempt_retention_days: int = 180
    """Attempt rows older than this are deleted by maintenance; 0 keeps them forever."""

    def cron_of(self, campaign: str) -> str:
        """When ``campaign`` is planned: its ``plan_cron``, else ``default_plan_cron``."""
        return self.plan_cron.get(campaign, self.default_plan_cron)

    def cron_key(self, campaign: str) -> str:
        """The key ``cron_of(campaign)`` comes from, as an error or a note names it."""
        return f"schedule.plan_cron.{campaign}" if campaign in self.plan_cron else "schedule.default_plan_cron"


@dataclass(frozen=True)
class DaemonSettings:
    shutdown_grace_seconds: float = 20.0
    """After SIGTERM/SIGINT, how long in-flight sends may take before the daemon gives up on them."""
    watch_templates: bool = False
    """Reload (after a check) when a file in templates.dir or the config file changes, as on SIGHUP."""
    watch_interval_seconds: float = 2.0
    health_summary_seconds: float = 60.0
    """How often the one-line ``health`` event is logged; 0 turns it off."""


@dataclass(frozen=True)
class WebSettings:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8025
    """0 picks a free port (logged in the ``web_started`` event)."""
    request_timeout_seconds: float = 10.0
    max_connections: int = 100


@dataclass(frozen=True)
class Settings:
    shop: ShopSettings = field(default_factory=ShopSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    sending: SendingSettings = field(default_factory=SendingSettings)
    unsubscribe: UnsubscribeSettings = field(default_factory=UnsubscribeSettings)
    campaigns: CampaignSettings = field(default_factory=CampaignSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    templates: TemplateSettings = field(default_factory=TemplateSettings)
    checks: CheckSettings = field(default_factory=CheckSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    web: WebSettings = field(default_factory=WebSettings)
    source: str = field(default="<defaults>", compare=False)
    """Where these settings came from (for messages)."""
    base_dir: Path = field(default=Path("."), compare=False)
    """Relative paths (templates, SQLite files) are resolved against this."""

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.base_dir / p

    @property
    def database_url(self) -> str:
        """The database URL with a relative SQLite path made absolute."""
        url = self.database.url
        prefix = "sqlite:///"
        if url.startswith(prefix) and url != "sqlite:///:memory:":
            rest = url[len(prefix) :]
            if not rest.startswith("/"):
                return prefix + str(self.resolve(rest).resolve())
        return url


MAX_CONFIG_BYTES = 2**20
"""The largest config file read (a shop's is a few KB): past it the file is refused as not a config."""


def load_settings(path: Path | str = DEFAULT_CONFIG) -> Settings:
    """Read and validate a config file; raise ConfigError naming file and key."""
    path = Path(path)
    try:
        with path.open("rb") as file:  # read in a bounded size: ``--config /dev/zero`` is not read until memory is gone
            data = file.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 2**20} MiB: not a config file")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark, as Notepad writes one, is not TOML's to see
    except UnicodeDecodeError as exc:
        line, what = not_utf8(exc)
        raise ConfigError(f"{path}: line {line}: {what}; save the file as UTF-8") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {_written_twice(str(exc), text) or f'invalid TOML: {exc}'}") from None
    try:
        return settings_from_dict(raw, source=str(path), base_dir=path.resolve().parent)
    except ConfigError as exc:
        refused = ConfigError(_with_line(str(exc), str(path), text))
        table = raw.get("logging")
        refused.log_format = table.get("format") if isinstance(table, dict) else None  # to say it in JSON if asked
        raise refused from None


_NAMED_KEY = re.compile(r"(?:unknown key )?'([^'\n]+)'|\[([^\]\n]*)\] must be a table")
_HEADER = re.compile(r"\s*(\[\[?)\s*([A-Za-z0-9_\-.\"' ]+?)\s*\]\]?\s*(?:#.*)?")
_KEY_LINE = re.compile(r"\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_\-. ]+?)\s*=")


def _with_line(message: str, source: str, text: str) -> str:
    """``message`` (``SOURCE: 'dotted.key' …``) with the line the key is written on after the file's name (``SOURCE:
    line 12: 'dotted.key' …``), or the line of the closest table above it the file writes; as it is when the file
    writes neither (a default's value) or the message names no key."""
    head = f"{source}: "
    named = _NAMED_KEY.match(message, len(head)) if message.startswith(head) else None
    if named is None:
        return message
    lines = _key_lines(text)
    dotted = named.group(1) or named.group(2)
    while dotted:
        if dotted in lines:
            return f"{head}line {lines[dotted]}: {message[len(head):]}"
        table = re.sub(r"(\[[0-9]+\]|\.?[^.\[]*)$", "", dotted)  # the table it is in: a.b[1].c -> a.b[1] -> a.b -> a
        if table == dotted:  # a name no table is cut from (steps[].template): no line to give
            break
        dotted = table
    return message


def naming_the_line(message: str, settings: Settings) -> str:
    """``message``, an error about ``settings`` found after they were loaded (the database URL the engine cannot
    use), with the line of the key it names, as ``load_settings`` gives its own errors."""
    try:
        text = Path(settings.source).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):  # settings from no file (a dict), or the file changed since
        return message
    return _with_line(message, settings.source, text)


def _key_lines(text: str) -> dict[str, int]:
    """The first line each table and key of a TOML text is written on, by dotted name (arrays of tables as
    ``a.b[0]``; a key quoted as ``"gmail.com"`` as ``sending.domains.gmail.com``)."""
    found: dict[str, int] = {}
    for number, dotted in _named_lines(text):
        found.setdefault(dotted, number)
    return found


def _named_lines(text: str) -> Iterator[tuple[int, str]]:
    """Each table and key of a TOML text with the line it is on, in the file's order: a table header gives the
    tables it writes (``[campains.winback]`` writes ``campains`` too), the table itself last."""

    def name(part: str) -> str:
        return ".".join(p.strip().strip("\"'") for p in part.split(".")) if part[:1] not in "\"'" else part[1:-1]

    table, counts = "", dict[str, int]()
    open_string: str | None = None  # the quotes of a multi-line string the line is in: its lines are text
    for number, line in enumerate(text.splitlines(), start=1):
        if open_string is not None:
            if line.count(open_string) % 2:
                open_string = None
            continue
        for quotes in ('"""', "'''"):
            if line.split("#")[0].count(quotes) % 2 and quotes in line.split("=", 1)[-1]:
                open_string = quotes  # (the key on this line, before the string, is still named below)
                break
        if (header := _HEADER.fullmatch(line)) is not None:
            table = name(header.group(2))
            for end in range(1, table.count(".") + 1):
                yield number, ".".join(table.split(".")[:end])
            if header.group(1) == "[[":
                counts[table] = counts.get(table, -1) + 1
                yield number, table
                table = f"{table}[{counts[table]}]"
            yield number, table
        elif (key := _KEY_LINE.match(line)) is not None and not line.lstrip().startswith("#"):
            parts = [key.group(1)] if key.group(1)[:1] in "\"'" else key.group(1).split(".")
            for end in range(1, len(parts) + 1):  # a dotted key (timeout.seconds = 30) writes its tables too
                dotted = name(".".join(parts[:end]))
                yield number, f"{table}.{dotted}" if table else dotted


_TWICE = re.compile(r"(Cannot overwrite a value|Cannot declare \(.*\) twice) \(at line (\d+), column \d+\)")


def _written_twice(error: str, text: str) -> str | None:
    """tomllib's "Cannot overwrite a value (at line 4, column 13)" or "Cannot declare ('shop',) twice (…)" in words
    that name the key or table and the line of its first one; None for another error, or a line not found."""
    if (found := _TWICE.fullmatch(error)) is None:
        return None
    number = int(found.group(2))
    names = [dotted for at, dotted in _named_lines(text) if at == number]
    first = _key_lines(text).get(names[-1]) if names else None
    if first is None or first == number:
        return None
    twice = f"line {number}: '{names[-1]}' is written twice (first at line {first}): keep one of them"
    if _HEADER.fullmatch(text.splitlines()[number - 1]) is not None:
        twice = (f"line {number}: table [{names[-1]}] is written twice (first at line {first}): keep one, with all "
                 "its keys")
    return twice


def settings_from_dict(raw: dict[str, Any], *, source: str = "<dict>", base_dir: Path = Path(".")) -> Settings:
    values: Settings = _build(Settings, raw, source, prefix="", skip={"source", "base_dir"})
    _check_quiet_hours_given(raw, source)
    settings = dataclasses.replace(values, source=source, base_dir=base_dir)
    _check(settings)
    return settings


def _secret_goes(prefix: str, key: str) -> str | None:
    """Where the secret a key of this name would hold goes instead, for a key that looks like one (``smtp.password``,
    ``unsubscribe.secret``, ``database.password``): "did you mean 'smtp.password_env'?" invited the password there.
    The variable is named by its default: the file's own ``*_env`` may hold the secret too, and is not shown. A key
    naming a variable (``password-env``, a misspelt ``password_env``) holds its name, no secret: None."""
    word = key.lower()
    if "env" in word or "var" in word:
        return None
    if prefix == "smtp." and "pass" in word:
        return ("the SMTP password goes in the environment variable 'smtp.password_env' names "
                f"({SmtpSettings.password_env} by default)")  # fmt: skip
    if prefix == "unsubscribe." and ("secret" in word or "key" in word):
        return ("the link key goes in the environment variable 'unsubscribe.secret_env' names "
                f"({UnsubscribeSettings.secret_env} by default)")  # fmt: skip
    if prefix == "database." and "pass" in word:
        return ("PostgreSQL's password goes in $PGPASSWORD or ~/.pgpass (read by libpq), or percent-encoded in "
                "'database.url'")  # fmt: skip
    return None


_KEYED_BY = {"sending.domains": "domain's rate"}
"""What the keys of a table of tables name, for a key that names none (``sending.domains.daily_quota``)."""


def _tables(cls: type = Settings, path: str = "") -> list[tuple[str, bool, frozenset[str]]]:
    """Every table of the file under ``path``: its dotted name, whether it is an array of tables
    (``[[campaigns.winback.steps]]``) and the names of its own keys (not of the tables in it)."""
    hints = typing.get_type_hints(cls)
    keys: set[str] = set()
    found: list[tuple[str, bool, frozenset[str]]] = []
    for f in dataclasses.fields(cls):
        hint, inner = hints[f.name], typing.get_args(hints[f.name])
        dotted = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(hint):
            found += _tables(hint, dotted)  # type: ignore[arg-type]
        elif typing.get_origin(hint) is tuple and inner and dataclasses.is_dataclass(inner[0]):
            found += [(dotted, True, frozenset(x.name for x in dataclasses.fields(inner[0])))]
        elif cls is not Settings:  # its source and base_dir are no keys of the file
            keys.add(f.name)
    return [(path, False, frozenset(keys)), *found] if path else found


def _belongs_elsewhere(prefix: str, key: str) -> str | None:
    """Where a key unknown in the table ``prefix`` names belongs, when it is a key of other tables: TOML puts a key
    in the table of the last header above it, so one added below the last key of its table in the shipped file
    lands in the table that follows (``daily_quota`` in ``[sending.domains]``, a win-back key in its last step)."""
    here = re.sub(r"\[[0-9]+\]", "", prefix.rstrip("."))
    tables = _tables()
    homes = [(name, array) for name, array, keys in tables if name != here and key in keys]
    if not homes:
        return None
    header = {name: f"[[{name}]]" if array else f"[{name}]" for name, array, _keys in tables}
    this = header.get(here, f"[{here}]")
    above = [(name, array) for name, array in homes if here.startswith(f"{name}.")]  # [sending] of [sending.domains]
    homes = above or homes
    shown = " and ".join(header[name] for name, _array in homes)
    if above:
        where = f"write it above {'the first ' if '[' in prefix else ''}{this}"
    elif len(homes) == 1:
        where = f"write it under {shown}"
    else:
        where = "write it under the one meant"
    of_this = f", not of {this}" if here else ""
    return f"a key of {shown}{of_this}: a key belongs to the table of the header above it; {where}"


def _build(cls: type, data: Any, source: str, prefix: str, skip: frozenset[str] | set[str] = frozenset()) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: [{prefix.rstrip('.')}] must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    for key in data:
        if key not in fields:
            if (elsewhere := _secret_goes(prefix, key)) is not None:
                raise ConfigError(f"{source}: unknown key '{prefix}{key}': secrets never live in the file: {elsewhere}")
            close = difflib.get_close_matches(key, list(fields), n=1)
            if close:
                raise ConfigError(f"{source}: unknown key '{prefix}{key}' (did you mean '{prefix}{close[0]}'?)")
            elsewhere = _belongs_elsewhere(prefix, key)
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'" + (f": {elsewhere}" if elsewhere else ""))
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: '{prefix}{name}' is missing (it has no default)")
            continue
        hint = hints[name]
        value = data[name]
        dotted = prefix + name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, source, dotted + ".")  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(hint, value, source, dotted)
    return cls(**kwargs)


def _split_at_dots(key: str, value: Any, entry: type) -> str | None:
    """The key as written when TOML split it at its dots (``gmail.com = {…}`` unquoted is a table ``gmail`` holding
    ``com``), or None: an entry's table that holds tables, none of its keys, down to one that holds its keys."""
    names = {f.name for f in dataclasses.fields(entry)}
    parts = [key]
    while isinstance(value, dict) and value and not value.keys() & names:
        if not all(isinstance(v, dict) for v in value.values()):
            break
        part, value = next(iter(value.items()))
        parts.append(str(part))
    return ".".join(parts) if len(parts) > 1 else None


def _coerce(hint: Any, value: Any, source: str, dotted: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(option, value, source, dotted)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: '{dotted}' has the wrong type ({type(value).__name__})")
    if origin is dict:
        _key_type, inner = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{dotted}' must be a table")
        if dataclasses.is_dataclass(inner):
            for k, v in value.items():
                if not isinstance(v, dict) and (elsewhere := _belongs_elsewhere(f"{dotted}.", str(k))) is not None:
                    raise ConfigError(f"{source}: '{dotted}.{k}' is no {_KEYED_BY.get(dotted, 'entry')}: {elsewhere}")
                if (split := _split_at_dots(str(k), v, inner)) is not None:  # type: ignore[arg-type]
                    raise ConfigError(f"{source}: '{dotted}.{split}': write the domain in quotes, \"{split}\" = "
                                      "{ … } (unquoted, TOML reads each dot as a table of its own)")
            return {str(k): _build(inner, v, source, f"{dotted}.{k}.") for k, v in value.items()}  # type: ignore[arg-type]
        return {str(k): _coerce(inner, v, source, f"{dotted}.{k}") for k, v in value.items()}
    if origin is tuple:
        (inner, *_rest) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{dotted}' must be a list")
        if dataclasses.is_dataclass(inner):  # an array of tables: [[a.b]]
            return tuple(_build(inner, v, source, f"{dotted}[{i}].") for i, v in enumerate(value))  # type: ignore[arg-type]
        return tuple(_coerce(inner, v, source, f"{dotted}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # TOML has nan and inf; nan passes every `<= 0` check below
                raise ConfigError(f"{source}: '{dotted}' must be a finite number, not {value!r}")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is type(None):
        pass
    else:  # pragma: no cover - a programming error in a settings class
        raise TypeError(f"unsupported settings type {hint!r} for {dotted}")
    expected = getattr(hint, "__name__", str(hint))
    shown = "" if dotted == "database.url" or dotted.endswith("_env") else f" ({value!r})"  # may hold a secret
    raise ConfigError(f"{source}: '{dotted}' must be {expected}, not {type(value).__name__}{shown}")


def _check_quiet_hours_given(raw: dict[str, Any], source: str) -> None:
    """Quiet hours are a pair: a start given alone would take the default end, 00:00, silently (21:00 alone meant
    quiet until midnight), and an end alone the default start. Neither given means none, as before."""
    policy = raw.get("policy", {})
    keys = [key for key in ("quiet_hours_start", "quiet_hours_end") if key in policy]
    if len(keys) == 1:
        (given,) = keys
        missing = "quiet_hours_end" if given == "quiet_hours_start" else "quiet_hours_start"
        raise ConfigError(f"{source}: 'policy.{missing}' is missing: 'policy.{given}' = {policy[given]!r} needs it "
                          "(give both; equal times mean no quiet hours)")


def _fail(settings: Settings, key: str, why: str) -> typing.NoReturn:
    raise ConfigError(f"{settings.source}: '{key}' {why}")


MIN_RATE_PER_SECOND = 1 / 86400
"""The slowest rate a limit may have: one email a day. A slower one (``1e-300``, a typo's exponent) made the sender
wait for its next slot for ever, ``run --once`` included, with nothing said."""


def _rate(settings: Settings, key: str, rate: float) -> None:
    if rate <= 0:
        _fail(settings, key, "must be positive")
    if rate < MIN_RATE_PER_SECOND:
        _fail(settings, key, f"must be at least one email a day ({MIN_RATE_PER_SECOND:.7f} per second, 1/86400), not "
              f"{rate:g} ({rate * 86400:.3g} emails a day): each email would wait longer than a day for its turn")


_DOMAIN = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)+")
"""A recipient domain as ``core.limits.domain_of`` gives it: ASCII labels joined by dots, none empty."""


def _idna(domain: str) -> str:
    """``domain``'s IDNA form (``xn--…``), as imports store addresses; ``domain`` itself when it has none."""
    import idna  # email_validator's own dependency, which the importer uses for the same conversion

    try:
        return idna.encode(domain.lower(), uts46=True).decode("ascii")
    except idna.IDNAError:
        return domain


def _writable(address: str) -> bool:
    try:
        render.check_address(address, "")
    except ValueError:
        return False
    return True


def _plain_address(s: Settings, key: str, address: str) -> None:
    """Every message carries ``address`` in a header: one the MIME writer cannot write would fail them all."""
    if not _writable(address):
        _fail(s, key, "must be a plain ASCII email address such as name@shop.example, without a display name "
              f"(an internationalised domain in its IDNA form, xn--…), not {address!r}")


def _shop_names(s: Settings) -> None:
    """``shop.name`` (every footer, subject and page; the From name when ``from_name`` is empty) is not blank, and
    neither it nor ``from_name`` holds a character a header or a footer line cannot show as written."""
    if not s.shop.name.strip():
        _fail(s, "shop.name", "must not be empty (it is in every footer, and the From name when shop.from_name is "
              "empty)")
    if s.shop.from_name and not s.shop.from_name.strip():
        _fail(s, "shop.from_name", "must not be only spaces (leave it empty, \"\", to use shop.name)")
    for key, value in (("shop.name", s.shop.name), ("shop.from_name", s.shop.from_name)):
        found = render.CONTROL_CHARACTERS.search(value)  # the header writer would drop them
        if found is not None:
            _fail(s, key, f"must not hold a control character (U+{ord(found.group()):04X} at character "
                  f"{found.start() + 1}): a line break, tab or escape cannot go in the From header, not {value!r}")


def _check(s: Settings) -> None:
    """Cross-field and range checks, each naming its key."""
    if s.shop.time_zone not in place_zones():
        meant = zone_meant(s.shop.time_zone)
        _fail(s, "shop.time_zone", f"is not an IANA time zone: {s.shop.time_zone!r}"
              + (f" (did you mean {meant!r}?)" if meant else ""))
    if not money.known(s.shop.currency):  # its minor units unknown, amounts would be read with 2 decimals, right or not
        _fail(s, "shop.currency", f"must be an ISO 4217 currency code such as IDR, not {s.shop.currency!r}")
    if s.shop.default_locale not in ("id", "en"):
        _fail(s, "shop.default_locale", "must be 'id' or 'en'")
    _shop_names(s)
    _plain_address(s, "shop.from_address", s.shop.from_address)
    if not SMTP_ADDRESS.fullmatch(s.shop.from_address):  # the envelope sender too: refused there, every message failed
        _fail(s, "shop.from_address", "must be a plain ASCII email address SMTP can carry as the sender (letters, "
              f"digits, dots and hyphens after the @: no underscore), not {s.shop.from_address!r}")
    if s.shop.reply_to:
        _plain_address(s, "shop.reply_to", s.shop.reply_to)
    if s.unsubscribe.mailto.startswith("mailto:"):
        try:
            render.check_uri(s.unsubscribe.mailto, "unsubscribe.mailto", "mailto:")
        except ValueError:
            _fail(s, "unsubscribe.mailto", f"must be a mailto: URI without spaces or angle brackets, not "
                  f"{s.unsubscribe.mailto!r}")
    elif s.unsubscribe.mailto:
        _plain_address(s, "unsubscribe.mailto", s.unsubscribe.mailto)
    if not s.shop.domain or "." not in s.shop.domain or not _writable(f"x@{s.shop.domain}"):
        _fail(s, "shop.domain", "must be a domain name such as shop.example (an internationalised one in its "
              f"IDNA form, xn--…; it ends every Message-ID), not {s.shop.domain!r}")
    for i, before in enumerate(s.shop.previous_domains):
        if not before or "." not in before or not _writable(f"x@{before}"):
            _fail(s, f"shop.previous_domains[{i}]", "must be a domain name such as shop.example, as shop.domain was "
                  f"once, not {before!r}")
    if not s.shop.postal_address.strip():
        _fail(s, "shop.postal_address", "must not be empty (it goes in every footer)")
    _web_url(s, "shop.base_url", s.shop.base_url, ("http", "https"))
    if not s.database.url.startswith(("sqlite://", "postgresql")):  # the rest as the engine reads it: db.check_url
        _fail(s, "database.url", f"must be {DATABASE_URL_FORMS}")
    for key, timeout in (("database.lock_timeout_seconds", s.database.lock_timeout_seconds),
                         ("database.idle_in_transaction_timeout_seconds",
                          s.database.idle_in_transaction_timeout_seconds)):  # fmt: skip
        if timeout != 0 and not 0.001 <= timeout <= _DAY_SECONDS:  # PostgreSQL counts them in whole milliseconds
            _fail(s, key, f"must be 0 (no limit) or from 0.001 to {_DAY_SECONDS} seconds (a day), not {timeout:.15g}")
    for key, name in (("smtp.password_env", s.smtp.password_env), ("unsubscribe.secret_env", s.unsubscribe.secret_env)):
        if not _ENV_NAME.fullmatch(name):  # not shown: what is written here by mistake is the secret itself
            default = getattr(SmtpSettings if key.startswith("smtp") else UnsubscribeSettings, key.partition(".")[2])
            _fail(s, key, f"must be the name of an environment variable (letters, digits and _, such as {default}) "
                  "that holds the secret, not the secret itself; what it says is not shown")
    if s.smtp.tls not in ("starttls", "tls", "none"):
        _fail(s, "smtp.tls", "must be 'starttls', 'tls' or 'none'")
    if not s.smtp.host or re.search(r"[\s/@]", s.smtp.host) or re.fullmatch(r"[^:]+:[0-9]*", s.smtp.host):
        _fail(s, "smtp.host", f"must be a host name or address such as smtp.example.com or 127.0.0.1 (the port goes "
              f"in smtp.port), not {s.smtp.host!r}")
    if re.search(r"[\x00-\x1f\x7f]", s.smtp.username):  # not shown: a login is half a secret
        _fail(s, "smtp.username", "must not hold a line break or other control character")
    if s.smtp.tls == "none" and not s.smtp.allow_plaintext_remote and not _is_loopback(s.smtp.host):
        _fail(
            s,
            "smtp.tls",
            f"is 'none' but smtp.host {s.smtp.host!r} is not a loopback address; "
            "use starttls/tls, or set smtp.allow_plaintext_remote = true to force it",
        )
    if not 0 < s.smtp.port < 65536:
        _fail(s, "smtp.port", "must be between 1 and 65535")
    if s.smtp.pool_size < 1:
        _fail(s, "smtp.pool_size", "must be at least 1")
    for key, timeout in (("smtp.timeout_seconds", s.smtp.timeout_seconds),
                         ("smtp.final_reply_timeout_seconds", s.smtp.final_reply_timeout_seconds)):
        if timeout <= 0:
            _fail(s, key, "must be positive")
    for key, value in (
        ("sending.batch_size", s.sending.batch_size),
        ("sending.max_attempts", s.sending.max_attempts),
        ("sending.lease_seconds", s.sending.lease_seconds),
        ("sending.burst", s.sending.burst),
        ("sending.in_flight_per_connection", s.sending.in_flight_per_connection),
    ):
        if value < 1:
            _fail(s, key, "must be at least 1")
    _rate(s, "sending.rate_per_second", s.sending.rate_per_second)
    if s.sending.retry_base_seconds <= 0:
        _fail(s, "sending.retry_base_seconds", "must be positive")
    if not s.sending.retry_base_seconds <= s.sending.retry_max_seconds <= _YEAR_SECONDS:
        _fail(s, "sending.retry_max_seconds", f"must be at least retry_base_seconds and at most {_YEAR_SECONDS} "
              f"(a year); it is {s.sending.retry_max_seconds:.15g} (the default is "
              f"{SendingSettings.retry_max_seconds:g}), retry_base_seconds {s.sending.retry_base_seconds:.15g}")
    if s.sending.daily_quota < 0:
        _fail(s, "sending.daily_quota", "must be 0 (no quota) or more")
    if not 0 <= s.sending.compose_processes <= 64:
        _fail(s, "sending.compose_processes", "must be between 0 (compose in the event loop) and 64")
    if s.sending.pause_after_failures < 0:
        _fail(s, "sending.pause_after_failures", "must be 0 (never pause) or more")
    if not 0 <= s.sending.pause_retry_seconds <= 86400:
        _fail(s, "sending.pause_retry_seconds", "must be between 0 (stay paused until SIGHUP) and 86400")
    if s.sending.shared_limits not in ("auto", "database", "process"):
        _fail(s, "sending.shared_limits", "must be 'auto', 'database' or 'process'")
    for key, rate in (
        ("sending.domain_rate_per_second", s.sending.domain_rate_per_second),
        ("sending.throttle_floor_per_second", s.sending.throttle_floor_per_second),
    ):
        _rate(s, key, rate)
    if s.sending.domain_burst < 1:
        _fail(s, "sending.domain_burst", "must be at least 1")
    for domain, limit in s.sending.domains.items():
        if not domain.isascii() and (idna_form := _idna(domain)).isascii():  # as addresses are stored and sent
            _fail(s, f"sending.domains.{domain}", "must be a lower-case domain such as gmail.com, an internationalised "
                  f"one in its IDNA form: {idna_form!r} (the form the addresses it limits are stored in)")
        if domain != domain.lower() or not _DOMAIN.fullmatch(domain):
            _fail(s, f"sending.domains.{domain}", "must be a lower-case domain such as gmail.com")
        _rate(s, f"sending.domains.{domain}.rate_per_second", limit.rate_per_second)
        if limit.burst < 1:
            _fail(s, f"sending.domains.{domain}.burst", "must be at least 1")
    if not s.unsubscribe.url.startswith("https://"):
        _fail(s, "unsubscribe.url", "must be an https:// URL (RFC 8058 one-click)")
    try:
        render.check_uri(s.unsubscribe.url, "unsubscribe.url", "https://")
    except ValueError:
        _fail(s, "unsubscribe.url", "must be ASCII, without spaces or angle brackets and at most 900 characters "
              "(it goes in every List-Unsubscribe header; an internationalised domain in its IDNA form, xn--…), "
              f"not {s.unsubscribe.url!r}")
    _token_base(s, "unsubscribe.url", s.unsubscribe.url)
    w = s.campaigns.winback
    if w.quiet_days < 1:
        _fail(s, "campaigns.winback.quiet_days", "must be at least 1")
    if w.expires_after_days < 1:
        _fail(s, "campaigns.winback.expires_after_days", "must be at least 1")
    last_step = w.effective_steps[-1].days
    if w.give_up_after_days and w.give_up_after_days <= last_step:
        _fail(s, "campaigns.winback.give_up_after_days", f"must be 0 (no limit) or more than the last step's days "
              f"({last_step}), not {w.give_up_after_days}")
    if not 0 <= w.coupon_percent <= 100:
        _fail(s, "campaigns.winback.coupon_percent", "must be between 0 and 100")
    if not w.steps:  # with steps, each its own coupon: the one-step coupon is in no email
        _coupon(s, "campaigns.winback", w.coupon_code, w.coupon_percent)
    if s.checks.html_max_bytes < 1024:
        _fail(s, "checks.html_max_bytes", "must be at least 1024")
    if s.checks.subject_max_chars < 10:
        _fail(s, "checks.subject_max_chars", "must be at least 10")
    if s.checks.subject_max_chars > render.HEADER_TEXT_MAX_CHARS:
        _fail(s, "checks.subject_max_chars", f"must be at most {render.HEADER_TEXT_MAX_CHARS} (a message's subject "
              f"is cut there), not {s.checks.subject_max_chars}")
    if not 0 < s.checks.render_timeout_seconds <= 60:
        _fail(s, "checks.render_timeout_seconds", "must be more than 0 and at most 60")
    _check_daemon(s)
    _check_campaigns(s)
    _check_policy(s)
    _check_upper_bounds(s)
    if s.logging.format not in ("text", "json"):
        _fail(s, "logging.format", "must be 'text' or 'json'")
    if s.logging.level not in LOG_LEVELS:
        _fail(s, "logging.level", "must be debug, info, warning or error")


MIN_INTERVAL_SECONDS = 0.1
"""The least time between the daemon's looks for due rows, maintenance runs, template watches and health lines: a
millisecond kept it busy doing nothing else, and wrote a health line a millisecond."""


def _check_daemon(s: Settings) -> None:
    from worker.core.cron import parse_cron  # pure

    known = {f.name for f in dataclasses.fields(CampaignSettings)}
    for campaign, expr in s.schedule.plan_cron.items():
        if campaign not in known:
            close = difflib.get_close_matches(campaign, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            _fail(s, f"schedule.plan_cron.{campaign}",
                  f"is not a campaign{hint}: the campaigns are {', '.join(sorted(known))}")
        try:
            parse_cron(expr)
        except ValueError as exc:
            _fail(s, f"schedule.plan_cron.{campaign}", f"is not a cron expression: {exc}")
    try:
        parse_cron(s.schedule.default_plan_cron)
    except ValueError as exc:
        _fail(s, "schedule.default_plan_cron", f"is not a cron expression: {exc}")
    for key, value in (
        ("daemon.shutdown_grace_seconds", s.daemon.shutdown_grace_seconds),
        ("web.request_timeout_seconds", s.web.request_timeout_seconds),
    ):
        if value <= 0:
            _fail(s, key, "must be positive")
    if s.schedule.attempt_retention_days < 0:
        _fail(s, "schedule.attempt_retention_days", "must be 0 (keep forever) or more")
    if s.daemon.health_summary_seconds < 0:
        _fail(s, "daemon.health_summary_seconds", "must be 0 (off) or more")
    for key, value in (
        ("schedule.dispatch_poll_seconds", s.schedule.dispatch_poll_seconds),
        ("schedule.maintenance_interval_seconds", s.schedule.maintenance_interval_seconds),
        ("daemon.watch_interval_seconds", s.daemon.watch_interval_seconds),
        ("daemon.health_summary_seconds", s.daemon.health_summary_seconds or MIN_INTERVAL_SECONDS),
    ):
        if value < MIN_INTERVAL_SECONDS:
            _fail(s, key, f"must be at least {MIN_INTERVAL_SECONDS:g} seconds, not {value:g}" + (
                ": the daemon would do little else than this (a typo for 1.0?)" if value > 0 else ""))
    if not s.web.host.strip():  # asyncio would listen on every interface: the links, and /metrics, open to all
        _fail(s, "web.host", "must be the address to listen on, such as 127.0.0.1 behind your HTTPS proxy (an empty "
              "one would listen on every interface, /metrics and /healthz included: write 0.0.0.0 if that is meant)")
    if not 0 <= s.web.port < 65536:
        _fail(s, "web.port", "must be between 0 and 65535")
    if s.web.max_connections < 1:
        _fail(s, "web.max_connections", "must be at least 1")


def _coupon(s: Settings, key: str, code: str, percent: int) -> None:
    """A coupon code needs its percent: the templates say "{{ coupon_percent }}% off with the code …", and a step
    given a code without one told its customers "0% off"."""
    if code and percent < 1:
        _fail(s, f"{key}.coupon_percent", f"must be between 1 and 100 with a coupon_code ({code!r}): the emails say "
              f"'{percent}% off with the code {code}'; set the percent, or leave coupon_code empty for no coupon")


def _check_campaigns(s: Settings) -> None:
    c = s.campaigns
    last = 0
    for i, step in enumerate(c.winback.steps):
        key = f"campaigns.winback.steps[{i}]"
        if step.days <= last:
            _fail(s, key + ".days", "must be at least 1 and greater than the previous step's")
        last = step.days
        if not _TEMPLATE_NAME.fullmatch(step.template):
            _fail(s, key + ".template", "must be a template folder name (a-z, 0-9, - and _)")
        if not 0 <= step.coupon_percent <= 100:
            _fail(s, key + ".coupon_percent", "must be between 0 and 100")
        _coupon(s, key, step.coupon_code, step.coupon_percent)
    for name in ("winback", "birthday", "feedback", "new_products", "loyalty"):
        share = getattr(c, name).holdout_share
        if not 0.0 <= share < 1.0:
            _fail(s, f"campaigns.{name}.holdout_share", "must be at least 0 and less than 1")
    for key, value in (
        ("campaigns.birthday.days_before", c.birthday.days_before),
        ("campaigns.feedback.days_after", c.feedback.days_after),
    ):
        if not 0 <= value <= 60:
            _fail(s, key, "must be between 0 and 60")
    for key, value in (
        ("campaigns.feedback.lookback_days", c.feedback.lookback_days),
        ("campaigns.feedback.expires_after_days", c.feedback.expires_after_days),
        ("campaigns.new_products.within_days", c.new_products.within_days),
        ("campaigns.new_products.max_products", c.new_products.max_products),
        ("campaigns.new_products.active_within_days", c.new_products.active_within_days),
        ("campaigns.new_products.expires_after_days", c.new_products.expires_after_days),
        ("campaigns.loyalty.within_days", c.loyalty.within_days),
        ("campaigns.loyalty.expires_after_days", c.loyalty.expires_after_days),
    ):
        if value < 1:
            _fail(s, key, "must be at least 1")
    if c.feedback.scale not in ("stars", "nps"):
        _fail(s, "campaigns.feedback.scale", "must be 'stars' (1-5) or 'nps' (0-10)")
    _web_url(s, "campaigns.feedback.link_url", c.feedback.link_url, ("https",))
    _token_base(s, "campaigns.feedback.link_url", c.feedback.link_url)
    for key, pct in (("campaigns.birthday.coupon_percent", c.birthday.coupon_percent),
                     ("campaigns.loyalty.coupon_percent", c.loyalty.coupon_percent)):
        if not 0 <= pct <= 100:
            _fail(s, key, "must be between 0 and 100")
    _coupon(s, "campaigns.birthday", c.birthday.coupon_code, c.birthday.coupon_percent)
    _coupon(s, "campaigns.loyalty", c.loyalty.coupon_code, c.loyalty.coupon_percent)
    if any(n < 1 for n in c.loyalty.order_milestones):
        _fail(s, "campaigns.loyalty.order_milestones", "must be order counts of at least 1")
    if any(n < 1 for n in c.loyalty.spend_milestones):
        _fail(s, "campaigns.loyalty.spend_milestones", "must be positive amounts")
    for key, milestones in (("campaigns.loyalty.order_milestones", c.loyalty.order_milestones),
                            ("campaigns.loyalty.spend_milestones", c.loyalty.spend_milestones)):
        if any(later <= earlier for earlier, later in itertools.pairwise(milestones)):  # a typo: 50 for 5, 5 twice
            _fail(s, key, f"must each be greater than the one before, not [{', '.join(map(str, milestones))}]")


_YEAR_SECONDS = 365 * 86400
DATABASE_URL_FORMS = ("a sqlite:/// or postgresql+psycopg:// URL (sqlite:///relative.db, sqlite:////absolute/path.db, "
                      "postgresql+psycopg://user@host/db; postgresql:// and postgres:// are read as the latter)")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SHOWN_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
NAME_NOT_SHOWN = "its name not shown: not in capitals, it may be the secret itself"


def shown_env_name(name: str) -> str | None:
    """``name``, a variable's name from the config, if an error saying it is not set may show it: one written as
    variables' are (capitals, digits and _). Any other is not shown (None): what is written there by mistake is the
    secret itself, and a generated password or link key is often letters and digits alone, which ``_ENV_NAME``
    takes for a name."""
    return name if _SHOWN_ENV_NAME.fullmatch(name) else None
_TEMPLATE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_CLOCK = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")


def _check_policy(s: Settings) -> None:
    p = s.policy
    for i, pair in enumerate(p.frequency_caps):
        if len(pair) != 2 or pair[0] < 1 or pair[1] < 1:
            _fail(s, f"policy.frequency_caps[{i}]", "must be [max emails, per days], both at least 1")
    clocks = (("policy.quiet_hours_start", p.quiet_hours_start), ("policy.quiet_hours_end", p.quiet_hours_end))
    for key, value in clocks:
        if not _CLOCK.fullmatch(value):
            _fail(s, key, f"must be a 24-hour time such as \"21:00\", not {value!r}")
    known = {"birthday", "feedback", "winback", "loyalty", "new_products"}
    unknown = [name for name in p.priorities if name not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        _fail(s, "policy.priorities", f"{unknown[0]!r} is not a campaign{hint}: the campaigns are {sorted(known)}")
    repeated = sorted({name for name in p.priorities if p.priorities.count(name) > 1})
    if repeated:
        _fail(s, "policy.priorities", f"lists {repeated[0]!r} more than once: each campaign at most once")
    left_out = [name for name in sorted(known) if getattr(s.campaigns, name).enabled and name not in p.priorities]
    if left_out:  # it would go last, below every campaign listed, without a word
        _fail(s, "policy.priorities", f"leaves out {', '.join(map(repr, left_out))}, which "
              f"{'is' if len(left_out) == 1 else 'are'} enabled: list every enabled campaign, highest priority first")


_TEN_YEARS_DAYS = 3650
_DAY_SECONDS = 86400


def _check_upper_bounds(s: Settings) -> None:
    """Ceilings far above any sensible value, below the ones the program cannot take: a count of days or seconds
    past them made dates and timers overflow (``OverflowError`` in a traceback, at the first plan, maintenance or
    health line), a pool or an amount past them opened connections or tasks without end, or overflowed a column."""
    c = s.campaigns
    days = [("campaigns.winback.quiet_days", c.winback.quiet_days),
            ("campaigns.winback.expires_after_days", c.winback.expires_after_days),
            *((f"campaigns.winback.steps[{i}].days", step.days) for i, step in enumerate(c.winback.steps)),
            ("campaigns.winback.give_up_after_days", c.winback.give_up_after_days),
            ("campaigns.feedback.lookback_days", c.feedback.lookback_days),
            ("campaigns.feedback.expires_after_days", c.feedback.expires_after_days),
            ("campaigns.new_products.within_days", c.new_products.within_days),
            ("campaigns.new_products.active_within_days", c.new_products.active_within_days),
            ("campaigns.new_products.expires_after_days", c.new_products.expires_after_days),
            ("campaigns.loyalty.within_days", c.loyalty.within_days),
            ("campaigns.loyalty.expires_after_days", c.loyalty.expires_after_days),
            ("schedule.attempt_retention_days", s.schedule.attempt_retention_days),
            *((f"policy.frequency_caps[{i}]", pair[1]) for i, pair in enumerate(s.policy.frequency_caps))]
    seconds = [("sending.lease_seconds", s.sending.lease_seconds),
               ("smtp.timeout_seconds", s.smtp.timeout_seconds),
               ("smtp.final_reply_timeout_seconds", s.smtp.final_reply_timeout_seconds),
               ("schedule.dispatch_poll_seconds", s.schedule.dispatch_poll_seconds),
               ("schedule.maintenance_interval_seconds", s.schedule.maintenance_interval_seconds),
               ("daemon.shutdown_grace_seconds", s.daemon.shutdown_grace_seconds),
               ("daemon.watch_interval_seconds", s.daemon.watch_interval_seconds),
               ("daemon.health_summary_seconds", s.daemon.health_summary_seconds),
               ("web.request_timeout_seconds", s.web.request_timeout_seconds)]
    counts = [("smtp.pool_size", s.smtp.pool_size, 100),
              ("sending.max_attempts", s.sending.max_attempts, 100),
              ("sending.burst", s.sending.burst, 100_000),
              ("sending.domain_burst", s.sending.domain_burst, 100_000),
              *((f"sending.domains.{d}.burst", limit.burst, 100_000) for d, limit in s.sending.domains.items()),
              ("sending.pause_after_failures", s.sending.pause_after_failures, 100_000),
              ("web.max_connections", s.web.max_connections, 10_000),
              ("sending.in_flight_per_connection", s.sending.in_flight_per_connection, 100),
              ("sending.batch_size", s.sending.batch_size, 100_000),
              ("campaigns.new_products.max_products", c.new_products.max_products, 100),
              ("campaigns.winback.recommendations", c.winback.recommendations, 100),
              *((f"policy.frequency_caps[{i}]", pair[0], 1000) for i, pair in enumerate(s.policy.frequency_caps)),
              *((f"campaigns.loyalty.order_milestones[{i}]", n, 1_000_000)
                for i, n in enumerate(c.loyalty.order_milestones)),
              *((f"campaigns.loyalty.spend_milestones[{i}]", n, 10**15)
                for i, n in enumerate(c.loyalty.spend_milestones))]
    for key, day_count in days:
        if day_count > _TEN_YEARS_DAYS:
            _fail(s, key, f"must be at most {_TEN_YEARS_DAYS} days (ten years), not {day_count}")
    for key, duration in seconds:
        if duration > _DAY_SECONDS:
            _fail(s, key, f"must be at most {_DAY_SECONDS} seconds (a day), not {duration:.15g}")
    for key, count, high in counts:
        if count > high:
            _fail(s, key, f"must be at most {high:_}, not {count:_}")
    if c.winback.recommendations < 0:
        _fail(s, "campaigns.winback.recommendations", "must be 0 (none) or more")


_NOT_IN_URL = re.compile(r"[\s<>\"'`\x00-\x1f\x7f]")


def _web_url(s: Settings, key: str, url: str, schemes: tuple[str, ...]) -> None:
    """``url`` is an absolute link with one of ``schemes`` and a host, that can go in an email's href as it is
    (every "visit the shop" button or rating link would otherwise lead nowhere, or nowhere safe)."""
    try:
        parts = urllib.parse.urlsplit(url)
        readable = parts.scheme in schemes and bool(parts.hostname) and not _NOT_IN_URL.search(url)
        parts.port  # noqa: B018 (raises for a port that is no number, or out of range)
    except ValueError:  # an IPv6 host without its closing bracket, a port out of range
        readable = False
    if not readable:
        example = f"{schemes[-1]}://shop.example" + ("/feedback" if "feedback" in key else "")
        _fail(s, key, f"must be an absolute {' or '.join(f'{x}://' for x in schemes)} link with a host and no spaces "
              f"or quotes, such as {example}, not {url!r}")


def _token_base(s: Settings, key: str, url: str) -> None:
    """``url`` can take a signed token appended as ``?t=`` or ``&t=``: after a ``#fragment`` it would never reach
    the server (a browser keeps the fragment to itself), and a ``t`` of the URL's own would be read in its place:
    either way every link made from it would answer "this link doesn't work"."""
    if "#" in url:
        _fail(s, key, f"must have no #fragment: the link's token is added at the end, and a browser does not send "
              f"what follows a '#', not {url!r}")
    if "t" in urllib.parse.parse_qs(urllib.parse.urlsplit(url).query, keep_blank_values=True):
        _fail(s, key, f"must have no query parameter 't': the link's token goes there, not {url!r}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
