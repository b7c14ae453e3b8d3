"""Three worker processes on one PostgreSQL database share the queue and the rate.

Given 1,200 win-back emails due and a global rate of 120/s (burst 10) kept in
the database, when three `kembali run --once` processes start together, then
every message arrives exactly once, every row is `sent`, more than one worker
did the sending, and the workers never started more SMTP transactions than the
rate allows: at most rate + burst in any one-second window (plus 0.1 s of
scheduling jitter), and no faster than the rate overall.
"""

from __future__ import annotations

import bisect
import gc
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from tests.sendkit import (
    REPO,
    A,
    M,
    TimedSink,
    ledger,
    message_ids,
    prepare_database,
    settings_dict,
    subprocess_env,
    write_config,
)
from tests.smtp_server import Behaviour, RecordingServer
from worker.adapters import db
from worker.adapters.store import Store
from worker.config import load_settings
from worker.pipeline import plan

MESSAGES = 1200
RATE, BURST = 120.0, 10


def _run_workers(config: Path, log_path: Path, count: int = 3) -> list[int]:
    """``count`` ``kembali run --once`` processes started together; their exit codes."""
    with log_path.open("wb") as log:
        procs = [
            subprocess.Popen([sys.executable, "-m", "worker", "--config", str(config), "run", "--once"], cwd=REPO,
                             env=subprocess_env(), stdout=log, stderr=log)
            for _ in range(count)
        ]  # fmt: skip
        return [p.wait(timeout=120) for p in procs]


@pytest.mark.slow
@pytest.mark.postgres
def test_three_workers_deliver_exactly_once_within_the_shared_rate(pg_migrated_url: str, tmp_path: Path) -> None:
    prepare_database(pg_migrated_url, MESSAGES)
    # the sink is a thread of this process, whose heap holds the whole test session: a full garbage
    # collection would freeze it for a moment and make it log the messages that waited as one clump
    gc.disable()
    try:
        with TimedSink() as sink:
            raw = settings_dict(pg_migrated_url, sink.port, smtp={"pool_size": 3}, rate_per_second=RATE, burst=BURST,
                                batch_size=50, domain_rate_per_second=1000.0, domain_burst=100)  # fmt: skip
            raw["logging"] = {"level": "warning"}
            config = write_config(tmp_path / "config.toml", raw)
            codes = _run_workers(config, tmp_path / "workers.log")
            arrivals = sorted(sink.arrivals)
            received = list(sink.messages)
    finally:
        gc.enable()

    assert codes == [0, 0, 0], (tmp_path / "workers.log").read_text()[-2000:]
    rows = ledger(pg_migrated_url)
    assert len(rows) == MESSAGES
    assert Counter(r.status for r in rows.values()) == {"sent": MESSAGES}
    arrived = message_ids(received)
    assert set(arrived) == set(rows)
    assert set(arrived.values()) == {1}, "a message arrived twice"

    engine = db.create_engine(pg_migrated_url)
    with engine.connect() as conn:
        workers = Counter(conn.execute(sa.select(A.c.worker)).scalars())
        starts = sorted(t.timestamp() for t in conn.execute(sa.select(A.c.started_at)).scalars())
    engine.dispose()
    assert len(workers) >= 2, f"one worker did everything: {workers}"

    # GCRA books slots at most RATE/s plus BURST; a transaction starts a moment after its slot
    # (scheduling jitter, under 20 ms or the sender books again), allowed for here as 0.1 s of slots
    busiest = max(bisect.bisect_left(starts, t + 1.0) - i for i, t in enumerate(starts))
    assert busiest <= RATE * 1.1 + BURST, f"{busiest} transactions started in one second"
    # the sink sees each message at the end of its transaction: a reply that is late (the sink or a
    # worker paused) lets the transactions in flight end together, at most all of them at once
    in_flight = 3 * 3 * 4  # workers x pool_size x in_flight_per_connection
    arrived_busiest = max(bisect.bisect_left(arrivals, t + 1.0) - i for i, t in enumerate(arrivals))
    assert arrived_busiest <= RATE * 1.1 + BURST + in_flight, f"{arrived_busiest} messages arrived in one second"
    # over five seconds the late senders of a loaded 2-core machine (compose helpers, PostgreSQL, the
    # sink and three workers share it) can add up: allow a quarter second of slots there. Without a
    # shared limit three workers would send 3 x RATE (about 1,800 in five seconds).
    busiest_5s = max(bisect.bisect_left(arrivals, t + 5.0) - i for i, t in enumerate(arrivals))
    assert busiest_5s <= RATE * 5.25 + BURST, f"{busiest_5s} messages in five seconds"
    elapsed = arrivals[-1] - arrivals[0]
    assert elapsed >= (MESSAGES - BURST) / RATE * 0.97, f"{MESSAGES} messages in {elapsed:.1f} s"
    print(f"workers={dict(workers)} busiest_second={busiest} (arrived {arrived_busiest}) elapsed={elapsed:.1f}s "
          f"rate={MESSAGES / elapsed:.1f}/s at {time.strftime('%X')}")  # fmt: skip


CUSTOMERS = 150


def _two_due_per_customer(url: str, config: Path) -> None:
    """Every customer due two messages, one right after the other in the queue: the win-back the planner
    gives and a copy under another dedupe key, so that workers claiming side by side each get one."""
    from worker.config import load_settings
    from worker.pipeline import plan

    settings = load_settings(config)
    store = Store.from_url(url)
    try:
        plan(store, settings, datetime.now(UTC))
        with store.engine.begin() as conn:
            rows = conn.execute(sa.select(M).order_by(M.c.id)).mappings().all()
            conn.execute(sa.delete(M))
            columns = [c.name for c in M.columns if c.name != "id"]
            # two customers' messages, then their copies: a claim of two takes one of each pair's two
            doubled = [
                {**{c: r[c] for c in columns}, "dedupe_key": r["dedupe_key"] + suffix}
                for i in range(0, len(rows), 2)
                for suffix in ("", ":copy")
                for r in rows[i : i + 2]
            ]
            for row in doubled:  # one by one: ids in this order
                conn.execute(sa.insert(M).values(row))
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.postgres
def test_workers_side_by_side_never_send_one_customer_two_emails(pg_migrated_url: str, tmp_path: Path) -> None:
    """The frequency cap (one email per three days) across workers: two workers that claim a customer's
    two messages at the same moment do not both send; one waits and is judged again."""
    prepare_database(pg_migrated_url, CUSTOMERS)
    with TimedSink() as sink:
        raw = settings_dict(pg_migrated_url, sink.port, smtp={"pool_size": 2}, batch_size=2, rate_per_second=10_000.0,
                            burst=1000, domain_rate_per_second=10_000.0, domain_burst=1000)  # fmt: skip
        raw["logging"] = {"level": "warning"}
        config = write_config(tmp_path / "config.toml", raw)
        _two_due_per_customer(pg_migrated_url, config)
        codes = _run_workers(config, tmp_path / "workers.log")
        received = list(sink.messages)

    assert codes == [0, 0, 0], (tmp_path / "workers.log").read_text()[-2000:]
    per_customer = Counter(m.rcpt_tos[0] for m in received)
    assert len(per_customer) == CUSTOMERS
    twice = {address: n for address, n in per_customer.items() if n > 1}
    assert not twice, f"{len(twice)} customers got two emails at once, e.g. {sorted(twice)[:5]}"
    rows = ledger(pg_migrated_url).values()
    assert Counter(r.status for r in rows)["sent"] == CUSTOMERS
    waiting = [r for r in rows if r.status != "sent"]
    assert len(waiting) == CUSTOMERS
    assert all(r.status in ("planned", "retry") for r in waiting), Counter(r.status for r in waiting)


def test_two_processes_with_one_hostname_and_pid_get_different_worker_names() -> None:
    """Two containers given one hostname, each running Kembali as PID 1: the names that claims, leases and the
    cross-worker cap check go by still differ, and each stays the same for its process's whole life."""
    script = (
        "import os, socket\n"
        "os.getpid = lambda: 1\n"
        "socket.gethostname = lambda: 'shop-worker'\n"
        "from worker.app import worker_id\n"
        "print(worker_id(), worker_id())\n"
    )
    names = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent.parent).stdout.split()  # fmt: skip
        assert out[0] == out[1], "one process, one name"
        assert out[0].startswith("shop-worker:1:"), out[0]
        names.append(out[0])
    assert names[0] != names[1]


def _only_first_due(url: str, config: Path, first: str) -> tuple[int, int]:
    """The planned win-backs, plus a second message to ``first`` (another dedupe key); only ``first``'s own is due
    now, the rest an hour from now. Returns (the first message's id, the second's)."""
    from worker.config import load_settings
    from worker.pipeline import plan

    store = Store.from_url(url)
    try:
        plan(store, load_settings(config), datetime.now(UTC))
        with store.engine.begin() as conn:
            row = conn.execute(sa.select(M).where(M.c.email == first)).mappings().one()
            copy = {c.name: row[c.name] for c in M.columns if c.name != "id"} | {"dedupe_key": row["dedupe_key"] + ":2"}
            second = conn.execute(sa.insert(M).values(copy).returning(M.c.id)).scalar_one()
            conn.execute(sa.update(M).where(M.c.id != row["id"]).values(next_attempt_at=sa.func.now() + sa.text(
                "interval '1 hour'")))
        return row["id"], second
    finally:
        store.close()


@pytest.mark.postgres
def test_a_worker_does_not_send_a_customer_a_second_email_while_another_workers_first_became_uncertain(
    pg_migrated_url: str, tmp_path: Path, smtp_server: RecordingServer
) -> None:
    """The frequency cap across workers when the first email's outcome is `uncertain` (it may have arrived): a
    worker that read the ledger while the other worker was still sending it, and marks its own message after
    that send ended, holds its message back as it would after a plain `sent`."""
    # Given a customer due two emails and 60 others, a slow global rate, and a server that takes 15 s over the
    # customer's email and then drops the connection after the final dot (the mail is stored: it arrived): long
    # enough for worker B's process to start and claim on a loaded machine, where 5 s was sometimes not
    emails = prepare_database(pg_migrated_url, 61)
    customer = emails[0]
    smtp_server.on(customer, Behaviour(delay_at="data", delay_seconds=15.0, drop_after_dot=True))
    raw = settings_dict(pg_migrated_url, smtp_server.port, smtp={"pool_size": 1, "timeout_seconds": 30.0},
                        in_flight_per_connection=1, batch_size=100,
                        rate_per_second=10.0, burst=1, domain_rate_per_second=1000.0, domain_burst=100)  # fmt: skip
    raw["logging"] = {"level": "warning"}
    config = write_config(tmp_path / "config.toml", raw)
    first, second = _only_first_due(pg_migrated_url, config, customer)
    argv = [sys.executable, "-m", "worker", "--config", str(config), "run", "--once"]
    with (tmp_path / "workers.log").open("wb") as log:
        # When worker A sends the first email (nothing else is due yet)
        a = subprocess.Popen(argv, cwd=REPO, env=subprocess_env(), stdout=log, stderr=log)
        engine = db.create_engine(pg_migrated_url)
        try:
            deadline = time.monotonic() + 30
            with engine.connect() as conn:
                while conn.execute(sa.select(M.c.status).where(M.c.id == first)).scalar_one() != "sending":
                    assert time.monotonic() < deadline and a.poll() is None, "worker A never sent the first email"
                    time.sleep(0.02)
            time.sleep(0.3)  # (A's run has found nothing else due: it only waits for that send now)
            # and, while it is on the wire, the others and the customer's second email fall due (that one last)
            # and worker B claims them all, reading the ledger while A's send is under way
            with engine.begin() as conn:
                conn.execute(sa.update(M).where(M.c.id != first).values(
                    next_attempt_at=sa.func.now() - sa.case((M.c.id == second, sa.text("interval '1 second'")),
                                                            else_=sa.text("interval '1 minute'"))))  # fmt: skip
            b = subprocess.Popen(argv, cwd=REPO, env=subprocess_env(), stdout=log, stderr=log)
            codes = [a.wait(timeout=60), b.wait(timeout=60)]
            with engine.connect() as conn:
                rows = {r.id: r for r in conn.execute(sa.select(M))}
                attempts = list(conn.execute(sa.select(A).order_by(A.c.id)))
        finally:
            engine.dispose()
    assert codes[0] == 1, (tmp_path / "workers.log").read_text()[-3000:]  # 1: an uncertain email to decide about
    # (A's email is uncertain, and B began sending while it was still under way, so B's claim read the ledger then)
    assert rows[first].status == "uncertain"
    a_attempt = next(t for t in attempts if t.message_id == first)
    b_worker = next(t.worker for t in attempts if t.message_id not in (first, second))
    assert b_worker != a_attempt.worker
    assert min(t.started_at for t in attempts if t.worker == b_worker) < a_attempt.finished_at
    # Then the customer got one email, not two within the cap's three days; the second waits its turn
    per_address = Counter(m.rcpt_tos[0] for m in smtp_server.messages)
    assert per_address[customer] == 1, f"{customer} got {per_address[customer]} emails"
    assert rows[second].status in ("planned", "retry"), rows[second].status
    assert len(per_address) == 61
    assert codes[1] == 0, (tmp_path / "workers.log").read_text()[-3000:]


@pytest.mark.slow
@pytest.mark.postgres
def test_daemons_sharing_a_database_through_kills_stops_and_dropped_connections_send_each_email_once(
    pg_migrated_url: str, tmp_path: Path, smtp_server: RecordingServer
) -> None:
    """Three `kembali run` daemons and a `run --once` on one PostgreSQL database: the database drops every
    connection, one daemon is SIGKILLed mid-send, another stopped with SIGTERM; the rest finish the queue."""
    from tests.daemon_harness import LINK_KEY, Daemon, make_shop

    # Given 300 customers due a win-back, a server that takes 50 ms over each message, leases of 3 s
    for i in range(300):
        smtp_server.on(f"c{i}@example.com", Behaviour(delay_at="data", delay_seconds=0.05))
    extra = ('[sending]\nlease_seconds = 3\nrate_per_second = 100.0\nburst = 5\nbatch_size = 20\n'
             'domain_rate_per_second = 100.0\nshared_limits = "database"\n')  # fmt: skip
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, db_url=pg_migrated_url, extra=extra,
                     plan_cron="*/2 * * * * *")  # fmt: skip
    shop.config.write_text(shop.config.read_text().replace('level = "debug"', 'level = "info"'))
    shop.add(range(300), days_ago=60)
    admin = sa.create_engine(pg_migrated_url)
    daemons = [Daemon.start(shop) for _ in range(3)]
    once = None
    try:
        def after(count: int) -> None:
            daemons[-1].wait_for(lambda: len(smtp_server.messages) >= count, timeout=30, why=f"{count} emails")

        # When the database drops every connection of the workers
        after(40)
        with admin.connect() as conn:
            dropped = conn.execute(sa.text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                           " WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
        assert dropped
        # and one daemon is killed mid-send, another stopped, while a `run --once` starts beside the last
        after(100)
        daemons[0].proc.kill()
        assert daemons[0].wait(10) == -signal.SIGKILL
        after(150)
        daemons[1].signal(signal.SIGTERM)
        once = subprocess.Popen([sys.executable, "-m", "worker", "--config", str(shop.config), "run", "--once"],
                                cwd=REPO, env={**subprocess_env(), "KEMBALI_LINK_SECRET": LINK_KEY},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        assert daemons[1].wait(20) == 0, daemons[1].log()
        # Then the rest finish the queue: every row ends sent, or uncertain (the killed daemon's sends under way)
        done = ("SELECT count(*) FROM message WHERE status IN ('sent', 'uncertain')")
        daemons[2].wait_for(lambda: shop.scalar(done) == 300, timeout=40, why="every row sent or uncertain")
        out, _ = once.communicate(timeout=30)
        assert once.returncode in (0, 1), out.decode()[-2000:]  # 1: it found the killed daemon's uncertain rows
        assert daemons[2].stop() == 0, daemons[2].log()
    finally:
        admin.dispose()
        for daemon in daemons:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
            if daemon.proc.stderr is not None and not daemon.proc.stderr.closed:
                daemon.wait(10)
        if once is not None and once.poll() is None:
            once.kill()
            once.wait()
    rows = {r[0]: r[1] for r in shop.rows("SELECT message_id, status FROM message")}
    arrived = message_ids(smtp_server.messages)
    assert set(arrived.values()) == {1}, "an email arrived twice"
    assert all(arrived[mid] == 1 for mid, status in rows.items() if status == "sent")
    assert set(arrived) <= set(rows)
    uncertain = [mid for mid, status in rows.items() if status == "uncertain"]
    assert len(uncertain) <= 2 * 4, uncertain  # pool_size x in_flight_per_connection of the killed daemon
    assert len(arrived) >= 300 - len(uncertain)


@pytest.mark.slow
@pytest.mark.postgres
def test_four_workers_planning_every_campaign_at_once_plan_each_message_once_and_send_it_once(
    pg_migrated_url: str, tmp_path: Path
) -> None:
    """Every campaign enabled on a demo shop (birthdays, feedback requests, win-backs, new products, loyalty):
    four `run --once` processes started together plan the same campaigns at the same instant, then share the
    sending."""
    from worker.adapters import shop
    from worker.demo import generate_shop

    # Given a demo shop of 800 customers
    now = datetime.now(UTC)
    data = generate_shop(seed=7, customers=800, now=now)
    engine = db.create_engine(pg_migrated_url)
    try:
        shop.upsert_products(engine, data.products, now)
        shop.upsert_customers(engine, data.customers, now)
        shop.upsert_orders(engine, data.orders, now)
    finally:
        engine.dispose()
    with TimedSink() as sink:
        raw = settings_dict(pg_migrated_url, sink.port, batch_size=50, rate_per_second=10_000.0, burst=1000,
                            domain_rate_per_second=10_000.0, domain_burst=1000)  # fmt: skip
        for campaign in ("birthday", "feedback", "new_products", "loyalty"):
            raw[f"campaigns.{campaign}"] = {"enabled": True}
        raw["logging"] = {"level": "warning"}
        config = write_config(tmp_path / "config.toml", raw)
        # When four workers start together
        codes = _run_workers(config, tmp_path / "workers.log", count=4)
        received = list(sink.messages)

    # Then each exits 0; each message was planned once (the dedupe key is unique: a second planner's row would
    # have failed the run), and every campaign planned something
    assert codes == [0, 0, 0, 0], (tmp_path / "workers.log").read_text()[-3000:]
    rows = ledger(pg_migrated_url)
    assert {r.campaign for r in rows.values()} == {"birthday", "feedback", "winback", "new_products", "loyalty"}
    log = (tmp_path / "workers.log").read_text()
    planned = sum(int(n) for n in re.findall(r"^planned (\d+) new", log, re.MULTILINE))
    assert planned == len(rows), "the workers' reports of what they planned add up to the ledger"
    # and each email arrived once, no mailbox got two (the cap: one per three days), every sent row arrived
    arrived = message_ids(received)
    assert set(arrived.values()) == {1}, "a message arrived twice"
    assert {m for m, r in rows.items() if r.status == "sent"} == set(arrived)
    per_mailbox = Counter(m.rcpt_tos[0].lower() for m in received)
    assert max(per_mailbox.values()) == 1, [box for box, n in per_mailbox.items() if n > 1][:5]
    assert {r.status for r in rows.values()} <= {"sent", "planned", "retry", "skipped"}


DOMAIN_RATE, DOMAIN_BURST = 20.0, 2


@pytest.mark.slow
@pytest.mark.postgres
def test_three_workers_share_each_recipient_domains_rate(pg_migrated_url: str, tmp_path: Path) -> None:
    """The rate per recipient domain across processes: three `kembali run --once` workers with a generous global rate
    send to each domain no faster between them than the one domain rate allows (not three times it)."""
    # Given 240 customers due a win-back at three domains (80 each), a domain rate of 20/s (burst 2) and a global
    # rate that never holds anything back
    prepare_database(pg_migrated_url, 240)
    with TimedSink() as sink:
        raw = settings_dict(pg_migrated_url, sink.port, batch_size=20, rate_per_second=10_000.0, burst=1000,
                            domain_rate_per_second=DOMAIN_RATE, domain_burst=DOMAIN_BURST)  # fmt: skip
        raw["logging"] = {"level": "warning"}
        config = write_config(tmp_path / "config.toml", raw)
        # When three workers start together
        codes = _run_workers(config, tmp_path / "workers.log")
        received = list(sink.messages)

    assert codes == [0, 0, 0], (tmp_path / "workers.log").read_text()[-2000:]
    assert set(message_ids(received).values()) == {1}, "a message arrived twice"
    engine = db.create_engine(pg_migrated_url)
    try:
        with engine.connect() as conn:
            tried = conn.execute(sa.select(A.c.worker, A.c.started_at, M.c.email).join(M, M.c.id == A.c.message_id)
                                 ).all()  # fmt: skip
    finally:
        engine.dispose()
    assert len(tried) == 240 and len({t.worker for t in tried}) >= 2, Counter(t.worker for t in tried)
    for domain in ("gmail.com", "yahoo.co.id", "test.example"):
        starts = sorted(t.started_at.timestamp() for t in tried if t.email.endswith("@" + domain))
        assert len(starts) == 80
        # Then each domain's sends, whichever worker made them, keep to its one rate: at most rate + burst in any
        # second (0.1 s of slots allowed for scheduling jitter), and 80 of them take (80 - burst) / rate seconds;
        # three workers each on a rate of their own would have sent at 60/s, in about 1.3 s
        busiest = max(bisect.bisect_left(starts, t + 1.0) - i for i, t in enumerate(starts))
        assert busiest <= DOMAIN_RATE * 1.1 + DOMAIN_BURST, f"{busiest} sends to {domain} started in one second"
        elapsed = starts[-1] - starts[0]
        assert elapsed >= (80 - DOMAIN_BURST) / DOMAIN_RATE * 0.97, f"80 sends to {domain} in {elapsed:.2f} s"


@pytest.mark.postgres
def test_a_worker_killed_mid_batch_leaves_its_unsent_rows_to_the_next_and_the_one_the_server_took_uncertain(
    pg_migrated_url: str, tmp_path: Path, smtp_server: RecordingServer
) -> None:
    """SIGKILL while a batch is claimed: the rows never sent come back once their leases lapse and another worker
    sends them, each once; the one whose message the server had whole (after the final dot, its reply not yet
    given: it may have arrived) is `uncertain`, and not sent again."""
    # Given 30 customers due a win-back, leases of 2 s, one message in flight at a time, and a server that takes
    # 4 s over each message once it has it whole
    emails = prepare_database(pg_migrated_url, 30)
    for address in emails:
        smtp_server.on(address, Behaviour(delay_at="data", delay_seconds=4.0))
    raw = settings_dict(pg_migrated_url, smtp_server.port, smtp={"pool_size": 1, "timeout_seconds": 10.0},
                        in_flight_per_connection=1, batch_size=30, lease_seconds=2, compose_processes=0,
                        rate_per_second=1000.0, burst=10, domain_rate_per_second=1000.0, domain_burst=10)  # fmt: skip
    raw["logging"] = {"level": "warning"}
    config = write_config(tmp_path / "config.toml", raw)
    argv = [sys.executable, "-m", "worker", "--config", str(config), "run", "--once"]
    # When worker A claims the whole batch and is killed while the server holds its first message
    a = subprocess.Popen(argv, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while smtp_server.data_taken < 1:
        assert time.monotonic() < deadline and a.poll() is None, "worker A never sent its first email"
        time.sleep(0.01)
    taken = time.monotonic()  # (the server had A's first message whole by then: its 4 s over it began)
    a.kill()
    assert a.wait(10) == -signal.SIGKILL
    engine = db.create_engine(pg_migrated_url)
    try:
        with engine.connect() as conn:
            left = Counter(conn.execute(sa.select(M.c.status)).scalars())
        assert left == {"sending": 1, "claimed": 29}, left
        for address in emails:  # (the server quick again for the rest)
            smtp_server.on(address, Behaviour())
        # and worker B runs once A's leases have lapsed
        time.sleep(2.2)
        b = subprocess.run(argv, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=60)
        time.sleep(max(0.0, taken + 4.5 - time.monotonic()))  # (the server's 4 s over A's message are over)
        with engine.connect() as conn:
            rows = {r.message_id: r for r in conn.execute(sa.select(M))}
            tried = Counter(conn.execute(sa.select(A.c.message_id)).scalars())
    finally:
        engine.dispose()
    # Then B sent the 29 A never began, each once, and left the one A's server took uncertain, saying so (exit 1)
    assert b.returncode == 1, b.stdout + b.stderr
    assert "1 message became uncertain" in b.stdout, b.stdout
    assert Counter(r.status for r in rows.values()) == {"sent": 29, "uncertain": 1}
    arrived = message_ids(smtp_server.messages)
    [uncertain] = [r for r in rows.values() if r.status == "uncertain"]
    assert set(arrived) - {uncertain.message_id} == set(rows) - {uncertain.message_id}
    assert set(arrived.values()) == {1}, "an email arrived twice"
    assert uncertain.id not in tried  # (A's attempt was never recorded: nobody tried it again either)
    assert all(tried[r.id] == 1 for r in rows.values() if r.status == "sent")


@pytest.mark.slow
@pytest.mark.postgres
def test_a_worker_whose_server_is_slower_than_a_lease_keeps_its_rows_while_other_workers_run(
    pg_migrated_url: str, tmp_path: Path, smtp_server: RecordingServer
) -> None:
    """Lease renewal across processes: a worker whose SMTP server takes longer over each message than a lease, its
    batch held for four leases, keeps every row while other workers start beside it and release lapsed leases:
    nothing becomes `uncertain` or goes back to the queue, each message is sent once, by it."""
    # Given 3 customers due a win-back, leases of 3 s, one message at a time, and a server that takes 4 s over each
    emails = prepare_database(pg_migrated_url, 3)
    for address in emails:
        smtp_server.on(address, Behaviour(delay_at="data", delay_seconds=4.0))
    raw = settings_dict(pg_migrated_url, smtp_server.port, smtp={"pool_size": 1, "timeout_seconds": 10.0},
                        in_flight_per_connection=1, batch_size=10, lease_seconds=3, compose_processes=0)  # fmt: skip
    raw["logging"] = {"level": "warning"}
    config = write_config(tmp_path / "config.toml", raw)
    argv = [sys.executable, "-m", "worker", "--config", str(config), "run", "--once"]
    # When worker A sends them (12 s) while another worker runs every 2.5 s
    a = subprocess.Popen(argv, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    others = []
    while a.poll() is None:
        time.sleep(2.5)
        others.append(subprocess.run(argv, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=60))
    out, _ = a.communicate()
    # Then A sent all three, once each, and the others found nothing lapsed and nothing to send
    assert a.returncode == 0, out.decode()[-2000:]
    assert len(others) >= 3
    for other in others:
        assert other.returncode == 0 and "became uncertain" not in other.stdout, other.stdout + other.stderr
        assert "leases_released" not in other.stderr, other.stderr
    rows = ledger(pg_migrated_url)
    assert Counter(r.status for r in rows.values()) == {"sent": 3}
    assert set(message_ids(smtp_server.messages).values()) == {1} and len(smtp_server.messages) == 3
    engine = db.create_engine(pg_migrated_url)
    try:
        with engine.connect() as conn:
            workers = Counter(conn.execute(sa.select(A.c.worker)).scalars())
    finally:
        engine.dispose()
    assert len(workers) == 1 and sum(workers.values()) == 3, workers


def _feedback_and_winback_side_by_side(url: str, config: Path) -> None:
    """Plan both campaigns (each customer is due a feedback request and a win-back), then order the win-backs
    backwards: the first ones claimed are those of the customers whose feedback requests go out last, so one
    worker claims a customer's win-back while another is sending them their feedback request."""
    from worker.config import load_settings
    from worker.pipeline import plan

    store = Store.from_url(url)
    try:
        planned = plan(store, load_settings(config), datetime.now(UTC))
        assert set(planned.created) >= {"feedback", "winback"}, planned.created
        with store.engine.begin() as conn:
            rows = conn.execute(sa.select(M.c.id, M.c.campaign, M.c.customer_id, M.c.next_attempt_at)).all()
            feedback = sorted((r for r in rows if r.campaign == "feedback"), key=lambda r: (r.next_attempt_at, r.id))
            first = min(r.next_attempt_at for r in rows)
            order = {r.customer_id: i for i, r in enumerate(reversed(feedback))}
            for r in rows:
                if r.campaign == "winback":
                    conn.execute(sa.update(M).where(M.c.id == r.id).values(
                        next_attempt_at=first + timedelta(microseconds=order[r.customer_id])))  # fmt: skip
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_workers_sending_two_campaigns_to_one_customer_side_by_side_send_them_one_email(
    kind: str, tmp_path: Path, smtp_server: RecordingServer, request: pytest.FixtureRequest
) -> None:
    """The frequency cap (one email per three days) across worker processes and campaigns: each customer is due a
    feedback request and a win-back; three `run --once` processes claim one message at a time, the win-backs of the
    customers whose feedback requests go out last first, and the server takes 0.2 s over each message, so a worker
    claims a customer's win-back while another is sending them their feedback request."""
    url = f"sqlite:///{tmp_path / 'kembali.db'}" if kind == "sqlite" else request.getfixturevalue("pg_migrated_url")
    emails = prepare_database(url, 12)
    for address in emails:
        smtp_server.on(address, Behaviour(delay_at="data", delay_seconds=0.2))
    raw = settings_dict(url, smtp_server.port, smtp={"pool_size": 1}, batch_size=1, in_flight_per_connection=1,
                        rate_per_second=10_000.0, burst=1000, domain_rate_per_second=10_000.0,
                        domain_burst=1000)  # fmt: skip
    raw["campaigns.feedback"] = {"enabled": True, "days_after": 7, "lookback_days": 90}
    raw["logging"] = {"level": "warning"}
    config = write_config(tmp_path / "config.toml", raw)
    _feedback_and_winback_side_by_side(url, config)

    codes = _run_workers(config, tmp_path / "workers.log")

    assert codes == [0, 0, 0], (tmp_path / "workers.log").read_text()[-3000:]
    per_address = Counter(m.rcpt_tos[0] for m in smtp_server.messages)
    assert sorted(per_address) == sorted(emails)
    twice = {address: n for address, n in per_address.items() if n > 1}
    assert not twice, f"{len(twice)} customers got two emails at once: {twice}"
    rows = list(ledger(url).values())
    workers = {a.worker for a in _attempts(url)}
    assert len(workers) > 1, "one worker did all the sending: nothing was side by side"
    by_status = Counter((r.campaign, r.status) for r in rows)
    assert by_status[("feedback", "sent")] + by_status[("winback", "sent")] == len(emails), by_status
    assert all(r.status in ("sent", "planned", "retry") for r in rows), by_status


def _attempts(url: str) -> list[Any]:
    engine = db.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.select(A)))
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_run_while_another_worker_holds_messages_names_that_worker_and_when_its_lease_ends(
    pg_migrated_url: str, tmp_path: Path, smtp_server: RecordingServer
) -> None:
    """A cron `run --once` right after a worker died (kill -9 on another host) sent what it could and said
    "sent 4 win-back emails", exit 0, not a word of the messages the dead worker held: they wait for its lease."""
    # Given 10 customers due a win-back, 6 of whose rows another worker claimed and then died holding
    prepare_database(pg_migrated_url, 10)
    raw = settings_dict(pg_migrated_url, smtp_server.port, lease_seconds=300, compose_processes=0)
    config = write_config(tmp_path / "config.toml", raw)
    store = Store(db.create_engine(pg_migrated_url))
    try:
        now = datetime.now(UTC)
        plan(store, load_settings(config), now)
        held = store.claim(worker="shop-2:4242:1a2b3c", now=now, limit=6, lease_seconds=300)
        assert len(held) == 6
        # When a run comes while that worker's lease still runs
        run = subprocess.run([sys.executable, "-m", "worker", "--config", str(config), "run", "--once"], cwd=REPO,
                             env=subprocess_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
        with store.engine.connect() as conn:
            lease = conn.execute(sa.select(sa.func.max(M.c.lease_until)).where(M.c.status == "claimed")).scalar_one()
    finally:
        store.engine.dispose()
    # Then it sends the other 4, and says who holds the 6 and until when, on the shop's clock
    assert run.returncode == 0, run.stdout + run.stderr
    assert len(smtp_server.messages) == 4
    local = lease.astimezone(ZoneInfo("Asia/Jakarta"))
    assert (f"6 messages are held by another worker, shop-2:4242:1a2b3c, until {local:%Y-%m-%d %H:%M} WIB: "
            "under way there or, should it have stopped, taken by a run after then") in run.stdout.splitlines(), (
        run.stdout)
