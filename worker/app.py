"""Composition root: Settings → the adapters the pipeline runs on. The only module that builds adapters."""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from worker import log, planning
from worker.adapters import db, opstore
from worker.adapters.clock import SystemClock
from worker.adapters.ratestore import RateStore
from worker.adapters.smtp import SmtpTransport
from worker.adapters.store import Store
from worker.adapters.templates import JinjaTemplates
from worker.asyncstore import AsyncStore
from worker.composing import ComposerPool, ComposerSpec
from worker.config import NAME_NOT_SHOWN, Settings, UnsubscribeSettings, naming_the_line, shown_env_name
from worker.core.campaigns import CAMPAIGNS as ALL_CAMPAIGNS
from worker.errors import ConfigError
from worker.limiter import Booker, DbBooker, Limiter, LocalBooker
from worker.pipeline import Composer, enabled_campaigns
from worker.ports import Clock
from worker.sending import ClockGuard, Dispatcher

_INSTANCE = secrets.token_hex(3)
"""Drawn when the process starts: two containers given one hostname, each running Kembali as PID 1, still get
two names (claims, leases and the cross-worker frequency-cap check tell workers apart by name)."""


async def release_lapsed_leases(store: Store, astore: AsyncStore, now: datetime, *,
                                keep: Collection[int] = ()) -> tuple[int, int]:
    """Maintenance's first step (``Store.release_expired_leases``), logged: ``leases_released``, naming the workers
    whose leases lapsed, then one ``email_uncertain`` for each row a dead worker left ``sending`` (the first 100),
    saying whose email may have arrived and which worker was sending it; returns (requeued, uncertain)."""
    holders = await astore.call(opstore.lapsed_holders, store, now, keep=keep)
    requeued, uncertain = await astore.call(store.release_expired_leases, now, keep=keep)
    if requeued or uncertain:
        log.event("leases_released", logging.WARNING, requeued=requeued, uncertain=uncertain,
                  workers=holders.describe())  # fmt: skip
    if uncertain:
        for row in await astore.call(opstore.left_uncertain, store, now):
            log.event("email_uncertain", logging.WARNING, campaign=row.campaign, dedupe_key=row.dedupe_key,
                      message_id=row.message_id,
                      customer=row.customer, to=log.mask_email(row.email),
                      worker=holders.sending.get(row.dedupe_key, "?"),
                      why="its worker stopped while sending it (its lease lapsed): it may have arrived, and is not "
                          "sent again; see kembali ledger list --status uncertain")  # fmt: skip
    return requeued, uncertain


@dataclass(frozen=True)
class NotSent:
    """What waits in the queue of campaigns this worker does not send (``campaigns_not_sent``)."""

    failed: tuple[opstore.UnknownCampaignRow, ...] = ()
    """Rows of a campaign Kembali does not know, failed just now."""
    off: dict[str, int] = field(default_factory=dict)
    """Campaign turned off → how many of its rows wait (until it is on again, or they expire)."""
    expired: int = 0
    """Rows of campaigns turned off skipped as ``expired`` (``expire_off``)."""


CLOSE_OFF = "kembali ledger close --status planned --status retry --campaign {campaign}"
"""The command that cancels what a campaign turned off left waiting."""


async def campaigns_not_sent(
    store: Store, astore: AsyncStore, settings: Settings, now: datetime, *, expire_off: bool = False
) -> NotSent:
    """At a start (``run --once``, the daemon's, each reload's), ONE read of the waiting rows
    (``opstore.odd_waiting_rows``) for what no claim judges right: rows of a campaign Kembali does not know (edited by
    hand) fail with ``LedgerRowError`` and ``unknown_campaign_failed`` names them, as no claim ever takes them; on
    SQLite, times written by hand in another form than Kembali's are rewritten as the times they name
    (``ledger_time_normalised``), or their row fails when ``next_attempt_at`` names none (``ledger_time_unreadable``);
    rows planned under another ``policy.priorities`` order take their campaign's priority now
    (``ledger_priorities_updated``: a claim skips the priorities that campaigns turned off alone hold).
    Then, only if some campaign is turned off, each that has rows waiting is named
    (``campaign_off_messages_waiting``) with their count and the command that cancels them: they wait, not sent, until
    it is on again, or are skipped as ``expired`` (``expire_off``: here, first, for ``run --once``, which runs no
    maintenance; the claim's re-check skips the others' as expired)."""
    priorities = planning.priorities(settings)
    odd = await astore.call(opstore.odd_waiting_rows, store, ALL_CAMPAIGNS, priorities)
    failed: list[opstore.UnknownCampaignRow] = []
    if odd.unknown_campaign:
        done = 0
        try:
            # the database thread given back between them
            for part in opstore.chunks(odd.unknown_campaign, opstore.CHUNK):
                failed += await astore.call(opstore.fail_unknown_campaigns, store, part, now, ALL_CAMPAIGNS,
                                            worker_id())  # fmt: skip
                done += len(part)
        except BaseException as exc:  # the chunks committed before it stay failed: the log says which they are
            _unknown_campaign_failed(failed, stopped_by=log.error_line(exc), not_done=len(odd.unknown_campaign) - done)
            raise
        _unknown_campaign_failed(failed)
    if odd.odd_time:
        found = []
        for part in opstore.chunks(odd.odd_time, opstore.CHUNK):
            found += await astore.call(opstore.hand_written_times, store, part, now, worker_id())
        for t in found[:100]:
            if t.reads_as is not None:
                log.event("ledger_time_normalised", logging.WARNING, id=t.id, column=t.column, value=t.value,
                          reads_as=t.reads_as, note="a time with no offset is read as UTC")
            else:
                log.event("ledger_time_unreadable", logging.WARNING, id=t.id, column=t.column, value=t.value[:40],
                          what_to_do=f"the message failed; correct it and `kembali ledger resend {t.id}`")
    if odd.odd_priority:
        moved = 0
        for part in opstore.chunks(odd.odd_priority, opstore.CHUNK):  # the database thread given back between them
            moved += await astore.call(opstore.reprioritise, store, part, priorities)
        _priorities_updated(moved)
    on = set(enabled_campaigns(settings))
    off_campaigns = [name for name in ALL_CAMPAIGNS if name not in on]
    expired = 0
    if off_campaigns and expire_off:
        expired = await astore.call(opstore.expire_messages, store, now, off_campaigns)
        if expired:
            log.event("messages_expired", count=expired, campaigns=",".join(off_campaigns))
    off = await astore.call(opstore.waiting_of, store, off_campaigns) if off_campaigns else {}
    for name, n in sorted(off.items()):
        log.event("campaign_off_messages_waiting", logging.WARNING, campaign=name, count=n,
                  why="the campaign is turned off (enabled = false): its planned messages are not sent; they wait "
                      "until it is on again, or are skipped as expired",
                  what_to_do=f"turn it on again to send them, or cancel them: {CLOSE_OFF.format(campaign=name)}")
    return NotSent(tuple(failed), dict(sorted(off.items())), expired)


async def unhold_waiting_rows(store: Store, astore: AsyncStore, settings: Settings) -> int:
    """A daemon's maintenance: rows of a campaign turned on that wait at a priority its claims skip (held by
    campaigns turned off alone) take their campaign's priority now (``ledger_priorities_updated``). Planned after
    the start's or the reload's read (``campaigns_not_sent``) under another ``policy.priorities`` order (another
    host's, not given the new config yet), they were never claimed: they waited until they expired."""
    on = planning.priorities(settings, enabled_campaigns(settings))
    moved = await astore.call(opstore.reprioritise_held, store, planning.held_priorities(settings), on)
    if moved:
        _priorities_updated(moved)
    return moved


def _priorities_updated(count: int) -> None:
    log.event("ledger_priorities_updated", count=count,
              note="waiting rows planned under another policy.priorities order take the order as it is now")


def _unknown_campaign_failed(failed: list[opstore.UnknownCampaignRow], **stopped: object) -> None:
    """Log the rows ``campaigns_not_sent`` failed for their campaign; ``stopped``: ``stopped_by`` (the error that
    ended it) and ``not_done`` (the rows of the chunks it did not get to, left waiting for the next start)."""
    if not failed and not stopped:
        return
    log.event("unknown_campaign_failed", logging.WARNING, count=len(failed),
              campaigns=",".join(sorted({r.campaign for r in failed})),
              ids=",".join(str(r.id) for r in failed[:20]) + (",…" if len(failed) > 20 else ""),
              why="no campaign Kembali knows by that name (a row edited by hand?): never sent",
              what_to_do="kembali ledger list --status failed; correct the campaign and `kembali ledger resend "
                         "ID`, or leave them failed", **stopped)  # fmt: skip


def worker_id() -> str:
    """host:pid:instance, so attempts and claims say which process did what, and no two processes share a name."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{_INSTANCE}"


def link_keys(settings: Settings, environ: dict[str, str] | None = None) -> list[bytes]:
    """The link-signing keys from the environment: the variable holds one key, or several
    separated by commas (newest first; the older ones still verify)."""
    env = os.environ if environ is None else environ
    name = settings.unsubscribe.secret_env
    raw = env.get(name, "")
    # a key's very bytes: one saved in Latin-1 comes as lone surrogates, which .encode() refused with a traceback
    keys = [k.strip().encode("utf-8", "surrogateescape") for k in raw.split(",") if k.strip()]
    if not keys:
        if shown := shown_env_name(name):
            variable, export = f"the environment variable {shown}", f"export {shown}="
        else:
            default = UnsubscribeSettings.secret_env
            variable = f"an environment variable ({NAME_NOT_SHOWN})"
            export = f'secret_env = "{default}", export {default}='
        raise ConfigError(naming_the_line(
            f"{settings.source}: 'unsubscribe.secret_env' names {variable}, which {link_key_missing(name, env)}: it "
            f"must hold the key that signs unsubscribe links (for example: {export}"
            "$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))'))", settings))
    for place, key in enumerate(keys, 1):  # a key is never shown: one of several is named by its place
        if (chars := len(key.decode("utf-8", "surrogateescape"))) < MIN_LINK_KEY_CHARS:
            which = f"the {_ordinal(place)} of the {len(keys)} keys in {name} (newest first)" if len(keys) > 1 else (
                f"the key in {name}")
            raise ConfigError(f"{settings.source}: {which} is too short ({chars} character{'s' if chars != 1 else ''}; "
                              f"use at least {MIN_LINK_KEY_CHARS})")
    return keys


MIN_LINK_KEY_CHARS = 16


def link_key_missing(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """How the variable ``name`` holds no link key ("is not set", "is set but empty", "holds no key (only commas and
    spaces)"), or None when it holds one (good or not: `link_keys` judges it)."""
    env = os.environ if environ is None else environ
    raw = env.get(name)
    if raw is None:
        return "is not set"
    if not raw.strip():
        return "is set but empty"
    return "holds no key (only commas and spaces)" if not raw.replace(",", "").strip() else None


def _ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th… 11th, 12th, 13th, 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def smtp_password(settings: Settings, environ: dict[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    if not settings.smtp.username:
        return None
    password = env.get(settings.smtp.password_env)
    if not password:  # empty: an unexpanded ${VAR} or a secrets file that was not loaded, never a real password
        state = "is not set" if password is None else "is set but empty"
        shown = shown_env_name(settings.smtp.password_env)
        variable = (f"{shown} (named by 'smtp.password_env')" if shown
                    else f"'smtp.password_env' names ({NAME_NOT_SHOWN})")
        raise ConfigError(naming_the_line(f"{settings.source}: 'smtp.username' is set but the environment variable "
                                          f"{variable} {state}: it must hold the SMTP password", settings))
    try:
        password.encode("utf-8")  # bytes the environment held that are not UTF-8 come as lone surrogates
    except UnicodeEncodeError:
        raise ConfigError(
            f"{settings.source}: the environment variable {settings.smtp.password_env} (named by "
            "'smtp.password_env') holds bytes that are not UTF-8 (a file saved in Latin-1?): save the SMTP "
            "password as UTF-8, which is what the login sends"
        ) from None
    return password


def make_limiter(settings: Settings, async_store: AsyncStore, clock: Clock) -> Limiter:
    """The sender's limits, their state in the database (shared by every worker) when
    ``sending.shared_limits`` says so or, on ``auto``, when the database is PostgreSQL."""
    mode = settings.sending.shared_limits
    shared = mode == "database" or (mode == "auto" and async_store.store.dialect == "postgresql")
    booker: Booker = (
        DbBooker(async_store, RateStore(async_store.store.engine)) if shared else LocalBooker(clock)
    )
    return Limiter(settings.sending, clock, booker)


def clock_guard(settings: Settings, async_store: AsyncStore, clock: Clock) -> ClockGuard | None:
    """The check of this host's clock against the database's (``sending.ClockGuard``), for the real clock on
    PostgreSQL only: a simulated one (the demo's, the tests') is another time by design, and SQLite's file has no
    clock of its own (``Store.database_now``: every process on it reads this host's)."""
    if not isinstance(clock, SystemClock) or async_store.store.dialect == "sqlite":
        return None  # (asked, it would answer None: a trip to the database thread each run and lease renewal)
    return ClockGuard(async_store, clock, settings.sending.lease_seconds)


def compose_pool(settings: Settings, templates: JinjaTemplates, composer: Composer) -> ComposerPool | None:
    """Helper processes that compose like ``composer`` over the same templates, per ``sending.compose_processes``."""
    if settings.sending.compose_processes < 1:
        return None
    spec = ComposerSpec(settings, templates.root, composer.link_key, templates.recheck_seconds)
    return ComposerPool(spec, processes=settings.sending.compose_processes)


SNAPSHOT_PREFIX = "kembali-templates-"
OWNER_FILE = ".owner"
"""In each snapshot: a file its process holds an exclusive ``flock`` on while it lives. The kernel lets go of it when
the process ends, however (SIGKILL, the OOM killer), and whatever its PID namespace: a lock that can be taken is a
copy no process uses."""
_OWNED: dict[Path, int] = {}
"""This process's snapshots → the descriptor holding its owner lock."""


def remove_stale_snapshots(root: Path) -> list[Path]:
    """Remove the snapshots in ``root`` whose process is gone (SIGKILL left them: ~300 KB each, for ever): those whose
    owner lock can be taken. Another worker's, alive, holds its lock: left alone; so is a folder with no owner file
    (an older Kembali's, which may still run, or one being made this instant). Returns those removed."""
    removed = []
    try:
        candidates = [p for p in root.iterdir() if p.name.startswith(SNAPSHOT_PREFIX) and p not in _OWNED]
    except OSError:
        return []
    for folder in candidates:
        try:
            fd = os.open(folder / OWNER_FILE, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:  # none (see above), or not ours to open: another user's
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its process runs
            os.close(fd)
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(fd)
    if removed:
        log.event("stale_snapshots_removed", count=len(removed), folder=str(root))
    return removed


def snapshot_templates(settings: Settings) -> Path:
    """Copy the templates folder somewhere private (its ``t`` folder): the copy is what a daemon's generation, or a
    ``run --once``, renders, so a file edited meanwhile changes nothing until the next one checks it. The copy holds
    its owner lock (``OWNER_FILE``) until ``remove_snapshot``; first, the copies of processes gone are removed."""
    source = settings.resolve(settings.templates.dir)
    if not source.is_dir():
        raise ConfigError(f"{settings.source}: 'templates.dir' {str(source)!r} is not a folder")
    remove_stale_snapshots(Path(tempfile.gettempdir()))
    target = Path(tempfile.mkdtemp(prefix=SNAPSHOT_PREFIX))
    try:
        # locked before it is named: another start's cleanup that found an owner file not locked yet took it for a
        # dead process's and removed the copy being made
        fd = os.open(target / f"{OWNER_FILE}.new", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        _OWNED[target] = fd
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (a file no other process looks for: none holds it)
        os.rename(target / f"{OWNER_FILE}.new", target / OWNER_FILE)  # the lock is the file's: it goes with it
        shutil.copytree(source, target / "t")
    except OSError as exc:  # a file that cannot be read, a dangling link, a full temporary folder
        remove_snapshot(target)
        # shutil.Error holds a list of (source, target, why): the first why says enough
        why = exc.args[0][0][2] if isinstance(exc, shutil.Error) and exc.args and exc.args[0] else str(exc)
        raise ConfigError(f"{settings.source}: 'templates.dir': cannot copy {str(source)!r}: {why}") from None
    return target


def remove_snapshot(snapshot: Path) -> None:
    """Remove a snapshot this process made, and let go of its owner lock."""
    shutil.rmtree(snapshot, ignore_errors=True)
    fd = _OWNED.pop(snapshot, None)
    if fd is not None:
        os.close(fd)


@dataclass
class Deps:
    settings: Settings
    store: Store
    templates: JinjaTemplates
    clock: Clock
    snapshot: Path | None = None
    """The private copy ``templates`` renders (``snapshot_templates``), if it is one: ``close`` removes it."""

    @classmethod
    def build(cls, settings: Settings, *, check_schema: bool = True, private_templates: bool = False) -> Deps:
        """With ``private_templates``, ``templates`` renders a copy of the folder taken now (``run --once``: a file
        saved while it runs takes effect at the next run), else the folder itself, edits seen within a second."""
        store = Store.for_settings(settings)
        snapshot = None
        try:
            if check_schema:
                db.check_schema(store.engine)
            templates_dir = settings.resolve(settings.templates.dir)
            if not templates_dir.is_dir():
                raise ConfigError(f"{settings.source}: 'templates.dir' {str(templates_dir)!r} is not a folder")
            if private_templates:
                snapshot = snapshot_templates(settings)
        except BaseException:  # the engine's connections (the schema check's) go, not left to the collector
            store.close()
            raise
        limit = settings.checks.render_timeout_seconds
        templates = (JinjaTemplates(Path(templates_dir), recheck_seconds=1.0, time_limit=limit) if snapshot is None
                     else JinjaTemplates(snapshot / "t", recheck_seconds=None, time_limit=limit))  # never edited
        return cls(settings=settings, store=store, templates=templates, clock=SystemClock(), snapshot=snapshot)

    def composer(self, keys: list[bytes] | None = None) -> Composer:
        return Composer(self.settings, self.templates, (keys or link_keys(self.settings))[0])

    def transport(self) -> SmtpTransport:
        return SmtpTransport(self.settings.smtp, password=smtp_password(self.settings))

    def limiter(self, async_store: AsyncStore) -> Limiter:
        return make_limiter(self.settings, async_store, self.clock)

    def clock_guard(self, async_store: AsyncStore) -> ClockGuard | None:
        return clock_guard(self.settings, async_store, self.clock)

    def dispatcher(self, async_store: AsyncStore, transport: SmtpTransport) -> Dispatcher:
        composer = self.composer()
        return Dispatcher(
            settings=self.settings,
            store=async_store,
            composer=composer,
            transport=transport,
            clock=self.clock,
            worker=worker_id(),
            limiter=self.limiter(async_store),
            compose_pool=compose_pool(self.settings, self.templates, composer),
            clock_guard=self.clock_guard(async_store),
        )

    def close(self) -> None:
        self.store.close()
        self.remove_snapshot()

    def remove_snapshot(self) -> None:
        if self.snapshot is not None:
            remove_snapshot(self.snapshot)
