"""Planning benchmark: a full planning pass of every campaign over a generated shop, on SQLite and PostgreSQL.

    python bench/planning.py                        # 1,000,000 customers, 2,500,000 orders, both databases
    python bench/planning.py --customers 100000 --backend sqlite

The shop goes straight into the database (Core executemany on SQLite, COPY on PostgreSQL; no CSV import):
about 70 % of customers have exactly one order, the rest 2-10, 2.5 orders per customer on average, over the
400 days before the planning instant, every order paid (one in 50 paid 3 days after it was placed), with the
denormalised per-customer columns filled in. Then, in a fresh
process each (so peak RSS is planning's alone), these passes, in order, on one ledger:

* ``dry``: every enabled campaign's planned messages streamed as values, nothing written (what `preview` does);
* ``first``: what `run` does (``pipeline.plan``: per campaign, a read that finds the new rows, then INSERT …
  SELECT … ON CONFLICT DO NOTHING by id; birthday row by row; two campaigns at a time), on an empty ledger: the
  very first pass on a shop;
* ``again``: a second pass right after, which finds everything already planned (the steady state: what every
  scheduled pass costs before it finds anything new);
* ``next-day``: the pass a day later, on a Monday (a new ISO week, nothing launched yet): the day's new rows;
* ``day-after``: the pass two days later, mid-week: the day's new rows (win-back steps reached, orders due a
  feedback request, birthdays, milestones);
* ``launch-day``: three days later, after a product launch (the bench adds product P-LAUNCH, launched that
  morning): the day's rows plus the news for every active customer whose last order predates it (~530k).

``--keep DIR`` keeps the generated shop (SQLite file in DIR, PostgreSQL database ``kembali_bench_<N>_<seed>``)
and reuses it on the next run, with the ledger emptied; ``--runs N`` repeats the passes; ``--modes`` picks them.

Each prints the pass's seconds, each campaign's own seconds (two run at once, so they add up to more), rows
planned, and peak RSS (VmHWM). Figures on a shared 2-core
machine are noisy: run twice.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa

from worker import pipeline, planning
from worker.adapters import db, shop
from worker.adapters.store import A, C, M, O, P, Store
from worker.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2027, 2, 28, 3, 0, tzinfo=UTC)
PG_ADMIN = os.environ.get("KEMBALI_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
CHUNK = 50_000
CATEGORIES = ("Batik", "Kopi", "Skincare", "Tas", "Sepatu", "Hijab", "Kerajinan")


def peak_rss_mb() -> float:
    """This process's peak RSS. ``getrusage``'s ru_maxrss survives fork+exec (a child started by the
    bench would report the generator's peak), so on Linux read VmHWM, which a new program starts afresh."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- generating the shop -----------------------------------------------------------------


def shop_rows(customers: int, seed: int) -> Iterator[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """(customers, orders) in chunks, ids assigned here, purchase columns computed here."""
    rng = random.Random(seed)
    order_id = 0
    zones = ("Asia/Jakarta",) * 8 + ("Asia/Makassar", "Asia/Jayapura")
    people: list[dict[str, Any]] = []
    orders: list[dict[str, Any]] = []
    for cid in range(1, customers + 1):
        n = 1 if rng.random() < 0.7 else rng.randint(2, 10)
        placed = sorted(NOW - timedelta(days=rng.uniform(1, 400)) for _ in range(n))
        total = 0
        first_id = order_id + 1
        last_paid = placed[0]
        for when in placed:
            order_id += 1
            # paid when placed, but one order in 50 paid 3 days later (a bank transfer: a later import said so)
            paid = min(when + timedelta(days=3), NOW) if order_id % 50 == 0 else when
            last_paid = max(last_paid, paid)
            amount = rng.randint(50, 2_000) * 1_000_00
            total += amount
            delivered = when + timedelta(days=rng.randint(2, 6)) if rng.random() < 0.9 else None
            if delivered is not None and delivered > NOW:
                delivered = None
            orders.append({
                "id": order_id, "external_id": f"INV-{order_id:08d}", "customer_id": cid, "status":
                "delivered" if delivered else "paid", "placed_at": when, "delivered_at": delivered,
                "settled_at": delivered or when, "paid_at": paid, "total_minor": amount, "currency": "IDR",
                "created_at": NOW, "updated_at": NOW,
            })  # fmt: skip
        born = date(rng.randint(1965, 2005), rng.randint(1, 12), rng.randint(1, 28)) if rng.random() < 0.7 else None
        people.append({
            "id": cid, "external_id": f"C-{cid:07d}", "email": f"pelanggan{cid}@example.com",
            "name": f"Pelanggan {cid}", "locale": "id", "time_zone": zones[cid % 10], "birthday": born,
            "birthday_mmdd": born.month * 100 + born.day if born else None, "marketing_consent": cid % 10 != 0,
            "consent_basis": "opt_in", "consent_source": "checkout", "order_count": n, "first_order_id": first_id,
            "first_order_external_id": f"INV-{first_id:08d}",
            "first_order_at": placed[0], "last_order_at": placed[-1], "last_paid_at": last_paid,
            "total_spent_minor": total, "created_at": NOW, "updated_at": NOW,
        })  # fmt: skip
        if len(people) >= CHUNK:
            yield people, orders
            people, orders = [], []
    if people:
        yield people, orders


def products() -> list[dict[str, Any]]:
    rng = random.Random(1)
    return [
        {"id": i, "external_id": f"P-{i:03d}", "name": f"Produk {i}", "category": CATEGORIES[i % 7],
         "price_minor": rng.randint(30, 500) * 1_000_00, "currency": "IDR", "url": f"https://toko.example/p/{i}",
         "image_url": "",
         "launched_at": NOW - timedelta(days=rng.randint(1, 13) if i % 5 == 0 else rng.randint(20, 365)),
         "active": True, "created_at": NOW, "updated_at": NOW}
        for i in range(1, 41)
    ]  # fmt: skip


def load_sqlite(engine: sa.Engine, customers: int, seed: int) -> None:
    with engine.begin() as conn:
        conn.execute(sa.insert(P), products())
    for people, orders in shop_rows(customers, seed):
        with engine.begin() as conn:
            conn.execute(sa.insert(C), people)
            conn.execute(sa.insert(O), orders)


def load_postgresql(engine: sa.Engine, customers: int, seed: int) -> None:
    with engine.begin() as conn:
        conn.execute(sa.insert(P), products())
    ccols = [c.name for c in C.columns]
    ocols = [c.name for c in O.columns]
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        with cur.copy(f"COPY customer ({', '.join(ccols)}) FROM STDIN") as copy_c:  # type: ignore[attr-defined]
            for people, _ in shop_rows(customers, seed):
                for row in people:
                    copy_c.write_row([row.get(c) for c in ccols])
        with cur.copy(f"COPY shop_order ({', '.join(ocols)}) FROM STDIN") as copy_o:  # type: ignore[attr-defined]
            for _, orders in shop_rows(customers, seed):
                for row in orders:
                    copy_o.write_row([row.get(c) for c in ocols])
        cur.execute("SELECT setval('customer_id_seq', (SELECT max(id) FROM customer))")
        cur.execute("SELECT setval('shop_order_id_seq', (SELECT max(id) FROM shop_order))")
        cur.execute("ANALYZE")
        raw.commit()
    finally:
        raw.close()


# --- timing a pass (in a child process) -----------------------------------------------------


def bench_settings(url: str) -> Settings:
    settings = load_settings(ROOT / "config.toml")
    import dataclasses

    return dataclasses.replace(settings, database=dataclasses.replace(settings.database, url=url))


PASS_AT = {"dry": NOW, "first": NOW, "again": NOW, "next-day": NOW + timedelta(days=1),
           "day-after": NOW + timedelta(days=2), "launch-day": NOW + timedelta(days=3)}
LAUNCH = {"id": 1000, "external_id": "P-LAUNCH", "name": "Produk baru", "category": "Kopi", "price_minor": 150_000_00,
          "currency": "IDR", "url": "https://toko.example/p/launch", "image_url": "", "active": True,
          "launched_at": PASS_AT["launch-day"] - timedelta(hours=6), "created_at": NOW, "updated_at": NOW}
"""Launched between ``day-after`` and ``launch-day``: earlier passes do not see it (launches after the pass's
instant are not news yet), so it stays in a kept shop without changing them."""


def _launch(store: Store) -> None:
    with store.engine.begin() as conn:
        if conn.execute(sa.select(P.c.id).where(P.c.external_id == LAUNCH["external_id"])).first() is None:
            conn.execute(sa.insert(P), [LAUNCH])


def one_pass(url: str, mode: str, threads: int | None = None) -> dict[str, Any]:
    settings = bench_settings(url)
    store = Store.from_url(url)
    at = PASS_AT[mode]
    if mode == "launch-day":
        _launch(store)
    out: dict[str, Any] = {"mode": mode, "campaigns": {}}
    started = time.perf_counter()
    cpu = time.process_time()
    try:
        if mode == "dry":  # what preview does: every planned message as a value, nothing written
            for campaign in pipeline.enabled_campaigns(settings):
                t0 = time.perf_counter()
                rows = sum(len(batch) for batch in planning.plan_batches(store, settings, campaign, at))
                out["campaigns"][campaign] = {"seconds": time.perf_counter() - t0, "rows": rows}
        else:  # what `run` does (pipeline.plan): every campaign's new rows inserted, two campaigns at a time
            done = planning.plan_campaigns(store, settings, pipeline.enabled_campaigns(settings), at, threads=threads)
            for campaign, part in done.items():
                out["campaigns"][campaign] = {"seconds": part.seconds, "rows": part.created}
        out["seconds"] = time.perf_counter() - started
        out["cpu_seconds"] = time.process_time() - cpu
        out["server_cpu_seconds"] = server_cpu_seconds(store.engine)
    finally:
        store.close()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def server_cpu_seconds(engine: sa.Engine) -> float | None:
    """PostgreSQL: the processor time of the backends serving this database (this process's pool, opened for the
    pass), read from /proc when the server runs on this host; None otherwise. On a machine other jobs share, the
    processor time a pass costs varies much less than its seconds."""
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as conn:
        pids = conn.execute(sa.text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")).scalars()
        total = 0.0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                return None
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


REFERENCE = {"orders": 1.1, "keyset": 0.34}
"""The issue's figures for two ways of finding the ~570k win-back candidates of such a shop on SQLite, "on these
machines": an indexed query (here: over the orders, grouped by customer) and keyset batches over the denormalised
per-customer columns. ``machine_reference`` times the same two reads here, so that figures taken on two machines
can be compared."""


def machine_reference(path: Path, runs: int = 3) -> dict[str, float]:
    """Seconds (median of ``runs``) of the two reference reads of ``REFERENCE`` on this machine, straight through
    Python's sqlite3 (a read-only connection), and the candidates each found."""
    cutoff = (NOW - timedelta(days=45)).strftime("%Y-%m-%d %H:%M:%S.%f")  # as the ledger's DateTime columns hold it
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)

    def orders() -> int:
        return len(conn.execute(
            "SELECT customer_id FROM shop_order GROUP BY customer_id HAVING count(*) = 1 AND max(placed_at) < ?",
            (cutoff,),
        ).fetchall())  # fmt: skip

    def keyset() -> int:
        found, after = 0, 0
        while True:
            # in id order: likely() keeps SQLite off the (order_count, first_order_at) index, which would sort
            # every batch
            rows = conn.execute(
                "SELECT id, email, first_order_external_id FROM customer WHERE id > ? AND likely(order_count) = 1"
                " AND first_order_at < ? ORDER BY id LIMIT 20000", (after, cutoff),
            ).fetchall()  # fmt: skip
            if not rows:
                return found
            found += len(rows)
            after = rows[-1][0]

    seconds: dict[str, float] = {}
    try:
        for name, read in (("orders", orders), ("keyset", keyset)):
            timings = []
            for _ in range(runs):
                t0 = time.perf_counter()
                seconds[f"{name}_rows"] = read()
                timings.append(time.perf_counter() - t0)
            seconds[name] = statistics.median(timings)
    finally:
        conn.close()
    return seconds


def report_reference(seconds: dict[str, float]) -> None:
    print(f"  machine reference, the {seconds['orders_rows']:,.0f} one-time buyers quiet for 45 days (without the "
          f"consent filter): by an indexed query over orders {seconds['orders']:.2f} s (the issue: "
          f"{REFERENCE['orders']} s, so {seconds['orders'] / REFERENCE['orders']:.1f}x), by keyset batches over "
          f"customer columns {seconds['keyset']:.2f} s (the issue: {REFERENCE['keyset']} s, so "
          f"{seconds['keyset'] / REFERENCE['keyset']:.1f}x)")  # fmt: skip


def run_child(url: str, mode: str, threads: int | None) -> dict[str, Any]:
    given = [] if threads is None else ["--threads", str(threads)]
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--database", url, *given],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def report(name: str, result: dict[str, Any]) -> None:
    parts = ", ".join(f"{c} {v['rows']:,} in {v['seconds']:.2f} s" for c, v in result["campaigns"].items())
    server = result.get("server_cpu_seconds")
    cpu = f"CPU {result['cpu_seconds']:.2f} s" + (f" + server {server:.2f} s" if server is not None else "")
    print(f"  {result['mode']:<9} {result['seconds']:6.2f} s  {cpu}  peak RSS {result['peak_rss_mb']:5.0f} MB   "
          f"({parts})")


def _clear_ledger(url: str) -> None:
    """A kept shop is reused from a clean ledger: every pass starts as on a freshly generated one."""
    engine = db.create_engine(url)
    try:
        db.upgrade(engine)  # a kept database may predate this branch's migrations
        with engine.begin() as conn:
            conn.execute(sa.delete(A))
            conn.execute(sa.delete(M))
        # the generated totals count rupiah: recorded (once, outside the timed passes) as migration 0015 keeps it
        shop.settle_spend_currency(engine, "IDR", NOW)
        if engine.dialect.name == "postgresql":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM ANALYZE message")
    finally:
        engine.dispose()


def _generate(url: str, backend: str, customers: int, seed: int) -> None:
    engine = db.create_engine(url)
    try:
        db.upgrade(engine)
        t0 = time.perf_counter()
        (load_sqlite if backend == "sqlite" else load_postgresql)(engine, customers, seed)
        shop.settle_spend_currency(engine, "IDR", NOW)
        with engine.begin() as conn:
            n_orders = conn.execute(sa.select(sa.func.count()).select_from(O)).scalar_one()
            one = conn.execute(sa.select(sa.func.count()).select_from(C).where(C.c.order_count == 1)).scalar_one()
        if backend == "sqlite":
            with engine.connect() as conn:
                conn.exec_driver_sql("ANALYZE")
    finally:
        engine.dispose()
    print(f"{backend}: {customers:,} customers ({one / customers:.0%} with one order), {n_orders:,} orders, "
          f"loaded in {time.perf_counter() - t0:.0f} s")


def bench(backend: str, customers: int, seed: int, folder: Path, keep: bool, runs: int, modes: list[str],
          threads: int | None) -> None:  # fmt: skip
    """Generate (or, with ``keep``, reuse) the shop, then time the passes ``runs`` times each."""
    admin = None
    dbname = ""
    if backend == "sqlite":
        path = folder / (f"planning-{customers}-{seed}.db" if keep else "bench.db")
        url = f"sqlite:///{path}"
        if keep and path.exists():
            print(f"{backend}: reusing {path}")
            _clear_ledger(url)
        else:
            part = path.with_suffix(".part")
            for stale in folder.glob(part.name + "*"):
                stale.unlink()
            _generate(f"sqlite:///{part}", backend, customers, seed)
            part.rename(path)
    else:
        admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        dbname = f"kembali_bench_{customers}_{seed}" if keep else f"kembali_bench_{uuid.uuid4().hex[:8]}"
        url = admin.url.set(database=dbname).render_as_string(hide_password=False)
        with admin.connect() as conn:
            exists = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": dbname}).first()
            if keep and exists:
                print(f"{backend}: reusing database {dbname}")
            else:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{dbname}_part" WITH (FORCE)'))
                conn.execute(sa.text(f'CREATE DATABASE "{dbname}_part"'))
        if keep and exists:
            _clear_ledger(url)
        else:
            _generate(admin.url.set(database=f"{dbname}_part").render_as_string(hide_password=False), backend,
                      customers, seed)
            with admin.connect() as conn:
                conn.execute(sa.text(f'ALTER DATABASE "{dbname}_part" RENAME TO "{dbname}"'))
    seen: dict[str, list[dict[str, Any]]] = {}
    if backend == "sqlite" and runs:
        report_reference(machine_reference(path))
    try:
        for run in range(runs):
            if run:
                _clear_ledger(url)
            for mode in modes:
                result = run_child(url, mode, threads)
                seen.setdefault(mode, []).append(result)
                report(backend, result)
        if runs > 1:
            print(f"{backend}, median of {runs} runs (min-max):")
            for mode, results in seen.items():
                secs = sorted(r["seconds"] for r in results)
                rss = max(r["peak_rss_mb"] for r in results)
                print(f"  {mode:<9} {statistics.median(secs):6.2f} s ({secs[0]:.2f}-{secs[-1]:.2f})  "
                      f"peak RSS {rss:5.0f} MB")
    finally:
        if admin is not None:
            if not keep:
                with admin.connect() as conn:
                    conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
            admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep the generated shop (SQLite file in DIR, PostgreSQL database kembali_bench_N_SEED) "
                        "and reuse it next time, with its ledger emptied")
    parser.add_argument("--runs", type=int, default=1, help="repeat the passes (0: only generate)")
    parser.add_argument("--modes", default="first,again,next-day,day-after,launch-day",
                        help=f"which passes, in order, of {', '.join(PASS_AT)} (default: all but dry)")
    defaults = ", ".join(f"{n} on {d}" for d, n in planning.PLAN_THREADS.items())
    parser.add_argument("--threads", type=int, default=None,
                        help=f"campaigns planned at once (default as `run` does: {defaults})")
    parser.add_argument("--child", choices=list(PASS_AT), help=argparse.SUPPRESS)
    parser.add_argument("--database", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_pass(args.database, args.child, args.threads)))
        return
    print(f"planning at {NOW.isoformat()} with the shipped config.toml (every campaign enabled)")
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        for backend in backends:
            bench(backend, args.customers, args.seed, args.keep, True, args.runs, args.modes.split(","), args.threads)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            bench(backend, args.customers, args.seed, Path(tmp), False, args.runs, args.modes.split(","),
                  args.threads)


if __name__ == "__main__":
    main()
