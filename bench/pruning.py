"""Attempt pruning (``opstore.prune_attempts``) on a big attempt table, SQLite and PostgreSQL.

Builds a ledger of ``--messages`` rows (a tenth loyalty emails carrying a merged milestone, a fifth of those still
sendable) and ``--attempts`` attempt rows, all past the retention, then prunes them with the merge guard and prints
the seconds, the rows pruned and the rows kept. The database is made with the tables' metadata (no migrations).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlmodel import SQLModel

from worker.adapters import opstore
from worker.adapters.store import Store
from worker.adapters.tables import Attempt, Customer, Message

NOW = datetime(2026, 12, 6, tzinfo=UTC)


def build(engine: sa.Engine, messages: int, attempts: int) -> None:
    SQLModel.metadata.create_all(engine)
    c, m, a = Customer.__table__, Message.__table__, Attempt.__table__  # type: ignore[attr-defined]
    with engine.begin() as conn:
        conn.execute(sa.insert(c), [{"id": 1, "external_id": "c1", "email": "a@b.example", "name": "n", "locale": "id",
                                     "time_zone": "UTC", "marketing_consent": True, "consent_basis": "",
                                     "consent_source": "", "order_count": 0, "total_spent_minor": 0,
                                     "created_at": NOW, "updated_at": NOW}])  # fmt: skip
        pad = "x" * 300
        for start in range(1, messages + 1, 10_000):
            rows = []
            for i in range(start, min(start + 10_000, messages + 1)):
                carrier = i % 10 == 0
                payload = f'{{"carries": "k{i + 1}", "p": "{pad}"}}' if carrier else f'{{"p": "{pad}"}}'
                status = "failed" if carrier and i % 50 == 0 else "sent"
                rows.append({"id": i, "dedupe_key": f"k{i}", "campaign": "loyalty" if carrier else "winback",
                             "customer_id": 1, "email": "a@b.example", "status": status, "due_at": NOW,
                             "expires_at": NOW + timedelta(days=30), "next_attempt_at": NOW, "attempts": 1,
                             "payload": payload, "created_at": NOW, "updated_at": NOW})  # fmt: skip
            conn.execute(sa.insert(m), rows)
        old = NOW - timedelta(days=300)
        for start in range(0, attempts, 20_000):
            part = range(start, min(start + 20_000, attempts))
            conn.execute(sa.insert(a), [{"message_id": i % messages + 1, "attempt_no": 1, "worker": "w",
                                         "started_at": old, "finished_at": old, "reply": "", "error_type": "",
                                         "outcome": "ambiguous" if i % 3 == 0 else "sent"} for i in part])  # fmt: skip
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("ANALYZE"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=500_000)
    parser.add_argument("--attempts", type=int, default=1_500_000)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1/test")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        urls = []
        if args.backend in ("sqlite", "both"):
            urls.append(f"sqlite:///{Path(tmp) / 'prune.db'}")
        if args.backend in ("postgresql", "both"):
            admin = sa.create_engine(args.pg, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(sa.text("DROP DATABASE IF EXISTS bench_pruning"))
                conn.execute(sa.text("CREATE DATABASE bench_pruning"))
            admin.dispose()
            urls.append(args.pg.rsplit("/", 1)[0] + "/bench_pruning")
        for url in urls:
            build(sa.create_engine(url), args.messages, args.attempts)
            store = Store.from_url(url)
            started = time.perf_counter()
            pruned = opstore.prune_attempts(store, NOW - timedelta(days=180))
            seconds = time.perf_counter() - started
            with store.engine.connect() as conn:
                kept = conn.execute(sa.select(sa.func.count()).select_from(Attempt.__table__)).scalar_one()  # type: ignore[attr-defined]
            store.close()
            print(f"{url.split(':')[0]}: {args.messages:,} messages, {args.attempts:,} attempts: pruned {pruned:,}, "
                  f"kept {kept:,} in {seconds:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
