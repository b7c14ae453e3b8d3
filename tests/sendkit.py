"""Helpers for the sending tests: a small shop whose customers are all due a win-back,
settings and config files pointing at a test SMTP server, and ledger readers."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.db_fixtures import migrate
from worker.adapters import db, shop
from worker.adapters.sink import ReceivedMessage
from worker.adapters.store import Store
from worker.adapters.tables import Attempt, Message, Suppression
from worker.adapters.templates import JinjaTemplates
from worker.app import Deps
from worker.commands import running
from worker.config import Settings, settings_from_dict
from worker.domain import CustomerRecord, Locale, OrderLineRecord, OrderRecord, OrderStatus, ProductRecord
from worker.testing import FakeClock

REPO = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
LINK_SECRET = "test-link-secret-0123456789abcdef"
M = Message.__table__  # type: ignore[attr-defined]
A = Attempt.__table__  # type: ignore[attr-defined]
S = Suppression.__table__  # type: ignore[attr-defined]


def seed_shop(engine: sa.Engine, emails: Sequence[str], now: datetime) -> None:
    """One customer per address, each with a single order 60 days before ``now``: all due a win-back."""
    product = ProductRecord("P-1", "Kopi Gayo 250 g", "kopi", 85_000_00, "IDR", "https://shop.example/p/1", "", None,
                            True)  # fmt: skip
    shop.upsert_products(engine, [product], now)
    customers = [
        CustomerRecord(f"C{i}", address, f"Pelanggan {i}", Locale.ID, "Asia/Jakarta", None, True, "opt_in", "checkout")
        for i, address in enumerate(emails)
    ]
    for part in range(0, len(customers), 2000):
        shop.upsert_customers(engine, customers[part : part + 2000], now)
    placed = now - timedelta(days=60)
    orders = [
        OrderRecord(f"O{i}", f"C{i}", OrderStatus.DELIVERED, placed, None, 85_000_00, "IDR",
                    (OrderLineRecord("P-1", 1, 85_000_00),))
        for i in range(len(emails))
    ]  # fmt: skip
    for part in range(0, len(orders), 2000):
        shop.upsert_orders(engine, orders[part : part + 2000], now)


def settings_dict(db_url: str, smtp_port: int, *, smtp: dict[str, Any] | None = None, **sending: Any) -> dict[str, Any]:
    return {
        "database": {"url": db_url},
        "smtp": {"host": "127.0.0.1", "port": smtp_port, "tls": "none", "timeout_seconds": 5.0, "pool_size": 2,
                 **(smtp or {})},
        "sending": sending,
        "templates": {"dir": str(REPO / "templates" / "email")},
    }  # fmt: skip


def make_settings(db_url: str, smtp_port: int, *, smtp: dict[str, Any] | None = None, **sending: Any) -> Settings:
    return settings_from_dict(settings_dict(db_url, smtp_port, smtp=smtp, **sending), base_dir=REPO)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {toml_value(v)}' for k, v in value.items()) + " }"
    return repr(value)


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    lines: list[str] = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class Shop:
    """A migrated database with customers due a win-back, and Deps on a fake clock."""

    def __init__(self, db_url: str, settings: Settings, emails: Sequence[str], clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock(NOW)
        migrate(db_url)
        self.store = Store(db.engine_for(settings))  # with its [database] settings (the lock timeout, say)
        seed_shop(self.store.engine, emails, self.clock.now())
        self.settings = settings
        templates = JinjaTemplates(REPO / "templates" / "email")
        self.deps = Deps(settings=settings, store=self.store, templates=templates, clock=self.clock)

    def cycle(self) -> running.CycleReport:
        return asyncio.run(running.cycle(self.deps))

    def close(self) -> None:
        self.store.close()

    def row(self, address: str) -> Any:
        with self.store.engine.connect() as conn:
            return conn.execute(sa.select(M).where(M.c.email == address)).one()

    def attempts(self, address: str) -> list[Any]:
        with self.store.engine.connect() as conn:
            query = sa.select(A).join(M, M.c.id == A.c.message_id).where(M.c.email == address).order_by(A.c.id)
            return list(conn.execute(query))

    def suppressed(self) -> dict[str, str]:
        with self.store.engine.connect() as conn:
            return {r.email: r.reason for r in conn.execute(sa.select(S))}

    def due_time(self, address: str) -> datetime:
        at: datetime = self.row(address).next_attempt_at
        return at


def message_ids(messages: Iterable[ReceivedMessage]) -> Counter[str]:
    """How many times each Message-ID arrived."""
    ids: Counter[str] = Counter()
    for m in messages:
        parsed = email.message_from_bytes(m.data, policy=email.policy.compat32)
        ids[str(parsed["Message-ID"]).strip()] += 1
    return ids


def ledger(url: str) -> dict[str, Any]:
    """message_id → row, for every ledger row."""
    engine = db.create_engine(url)
    try:
        with engine.connect() as conn:
            return {r.message_id: r for r in conn.execute(sa.select(M))}
    finally:
        engine.dispose()


class TimedSink:
    """An aiosmtpd sink (in a thread) that notes when each message arrived."""

    def __init__(self) -> None:
        from worker.adapters.sink import SinkHandler, SmtpSink

        owner = self
        self.arrivals: list[float] = []

        class _Handler(SinkHandler):
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                reply = await super().handle_DATA(server, session, envelope)
                owner.arrivals.append(time.monotonic())
                return reply

        self.sink = SmtpSink(handler_factory=_Handler)

    def __enter__(self) -> TimedSink:
        self.sink.start_in_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sink.stop_in_thread()

    @property
    def port(self) -> int:
        return self.sink.port

    @property
    def messages(self) -> list[ReceivedMessage]:
        return self.sink.messages


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["KEMBALI_LINK_SECRET"] = LINK_SECRET
    env.pop("KEMBALI_CONFIG", None)
    return env


def prepare_database(url: str, count: int) -> list[str]:
    """A migrated database with ``count`` customers due a win-back now (real clock); their addresses."""
    emails = [f"c{i}@{('gmail.com', 'yahoo.co.id', 'test.example')[i % 3]}" for i in range(count)]
    migrate(url)
    engine = db.create_engine(url)
    try:
        seed_shop(engine, emails, datetime.now(UTC))
    finally:
        engine.dispose()
    return emails
