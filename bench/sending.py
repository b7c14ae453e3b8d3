"""Sending throughput: the raw aiosmtplib ceiling vs Kembali end to end, against two sinks.

    .venv/bin/python bench/sending.py [--messages 20000] [--pool 8] [--sinks smtp-sink,aiosmtpd]
    .venv/bin/python bench/sending.py --mixed 2 [--slow-share 0.1] [--wire-hold S] [--backend postgresql]

For each sink (Postfix's C ``smtp-sink`` when installed, and aiosmtpd in its own
process) it measures, in one run:

* raw: a bare loop of ``--pool`` pooled aiosmtplib clients sending one pre-built
  Kembali message over and over (no database, no rendering): the ceiling;
* kembali: ``run --once`` in-process on a fresh SQLite file with ``--messages``
  customers due a win-back: plan, re-check, render, build MIME, send, record;

and prints messages per second for each and the ratio kembali/raw, plus the
process RSS when half and all of the messages were sent (memory must stay flat).
Figures are noisy on a shared machine: run it twice.

``--mixed R`` measures instead what a slow recipient domain costs the others: ``--slow-share`` of the
recipients (default a tenth) on a domain limited to R/s, the rest on fast ones, until every fast
message is sent (``--mixed 0``: the same recipients, the slow domain unlimited: the baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiosmtplib import SMTP  # noqa: E402

from worker import eventloop, log, sending  # noqa: E402
from worker.adapters import db, shop  # noqa: E402
from worker.app import Deps  # noqa: E402
from worker.commands import running  # noqa: E402
from worker.config import Settings, settings_from_dict  # noqa: E402
from worker.domain import (  # noqa: E402
    CustomerRecord,
    Locale,
    OrderLineRecord,
    OrderRecord,
    OrderStatus,
    ProductRecord,
    SendResult,
    SendStage,
)
from worker.limiter import HOLD_SECONDS, REBOOKS, Later, Limiter  # noqa: E402

SMTP_SINK = shutil.which("smtp-sink") or ("/usr/sbin/smtp-sink" if Path("/usr/sbin/smtp-sink").exists() else None)
SENDER = "halo@toko-kembali.example"
PG_ADMIN = os.environ.get("KEMBALI_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PROFILE = os.environ.get("KEMBALI_BENCH_PROFILE")
"""A file to write cProfile stats of the end-to-end run to."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


@contextmanager
def sink_process(kind: str) -> Iterator[int]:
    port = free_port()
    if kind == "smtp-sink":
        assert SMTP_SINK is not None
        cmd = [SMTP_SINK, "-u", "nobody", f"127.0.0.1:{port}", "1024"] if os.getuid() == 0 else \
              [SMTP_SINK, f"127.0.0.1:{port}", "1024"]  # fmt: skip
    else:
        cmd = [sys.executable, __file__, "--serve-aiosmtpd", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    SINK_PIDS.add(proc.pid)
    try:
        wait_for_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


def serve_aiosmtpd(port: int) -> None:
    """A counting aiosmtpd sink that keeps nothing (so its memory stays flat)."""
    from aiosmtpd.smtp import SMTP as Server

    class Handler:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            return "250 2.0.0 Ok: queued"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Server(Handler(), hostname="bench-sink"), "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def rss_mb(pid: int | str = "self") -> float:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0.0
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def helpers_rss_mb() -> float:
    """RSS of this process's children (the compose helpers; the sinks are not children of the e2e run's
    process tree here, they are started before and counted out by pid)."""
    total = 0.0
    for task in Path("/proc/self/task").iterdir():
        try:
            pids = (task / "children").read_text().split()
        except OSError:
            continue
        total += sum(rss_mb(pid) for pid in pids if int(pid) not in SINK_PIDS)
    return total


SINK_PIDS: set[int] = set()


# --- raw ceiling -----------------------------------------------------------------------


async def raw_ceiling(port: int, message: bytes, count: int, pool: int) -> float:
    clients = [SMTP(hostname="127.0.0.1", port=port, timeout=30) for _ in range(pool)]
    for c in clients:
        await c.connect()
    share = [count // pool + (1 if i < count % pool else 0) for i in range(pool)]

    async def loop(client: SMTP, n: int) -> None:
        for i in range(n):
            await client.sendmail(SENDER, [f"c{i}@gmail.com"], message)

    start = time.perf_counter()
    await asyncio.gather(*(loop(c, n) for c, n in zip(clients, share, strict=True)))
    elapsed = time.perf_counter() - start
    for c in clients:
        await c.quit()
    return count / elapsed


# --- Kembali end to end ----------------------------------------------------------------


SLOW_DOMAIN = "lambat.example"
"""``--mixed``'s slow recipient domain."""


def seed(url: str, count: int, now: datetime, slow_every: int = 0) -> None:
    """``count`` customers due a win-back; with ``slow_every``, every such customer's address is at ``SLOW_DOMAIN``."""
    engine = db.create_engine(url)
    db.upgrade(engine)
    products = [ProductRecord(f"P-{i}", f"Produk {i}", "kopi", (50 + i) * 1000_00, "IDR",
                              f"https://toko.example/p/{i}", "", None, True) for i in range(20)]  # fmt: skip
    shop.upsert_products(engine, products, now)
    placed = now - timedelta(days=60)
    domains = ("gmail.com", "yahoo.co.id", "outlook.com", "ymail.com", "toko.example")

    def domain(i: int) -> str:
        return SLOW_DOMAIN if slow_every and not i % slow_every else domains[i % 5]

    for start in range(0, count, 5000):
        ids = range(start, min(count, start + 5000))
        shop.upsert_customers(engine, [
            CustomerRecord(f"C{i}", f"pelanggan{i}@{domain(i)}", f"Pelanggan Nomor {i}",
                           Locale.ID if i % 4 else Locale.EN, "Asia/Jakarta", None, True, "opt_in", "checkout")
            for i in ids], now)  # fmt: skip
        shop.upsert_orders(engine, [
            OrderRecord(f"O{i}", f"C{i}", OrderStatus.DELIVERED, placed, None, 85_000_00, "IDR",
                        (OrderLineRecord(f"P-{i % 20}", 1, 85_000_00),))
            for i in ids], now)  # fmt: skip
    engine.dispose()


UNLIMITED = {"rate_per_second": 1e6, "burst": 10_000, "domain_rate_per_second": 1e6, "domain_burst": 10_000}


def bench_settings(url: str, port: int, pool: int, in_flight: int, limits: dict[str, Any] | None = None) -> Settings:
    return settings_from_dict(
        {
            "database": {"url": url},
            "smtp": {"host": "127.0.0.1", "port": port, "pool_size": pool, "timeout_seconds": 30.0},
            "sending": {"batch_size": 500, "in_flight_per_connection": in_flight, **(limits or UNLIMITED)},
            "templates": {"dir": str(ROOT / "templates" / "email")},
            "logging": {"level": "warning"},
        },
        base_dir=ROOT,
    )


class RssProbe:
    """Wraps the transport: counts sends and samples RSS at given counts."""

    def __init__(self, inner: object, marks: list[int], *, timestamps: bool = False) -> None:
        self.inner = inner
        self.marks = set(marks)
        self.sent = 0
        self.rss: dict[int, float] = {}
        self.helper_rss: dict[int, float] = {}
        self.starts: list[tuple[float, str]] | None = [] if timestamps else None
        """(monotonic time, recipient domain) of each SMTP transaction's start: right after the limiter."""

    async def send(self, sender: str, recipient: str, message: bytes, where: SendStage | None = None) -> SendResult:
        if self.starts is not None:
            self.starts.append((time.monotonic(), recipient.rpartition("@")[2]))
        result: SendResult = await self.inner.send(sender, recipient, message, where)  # type: ignore[attr-defined]
        self.sent += 1
        if self.sent in self.marks:
            self.rss[self.sent] = rss_mb()
            self.helper_rss[self.sent] = helpers_rss_mb()
        return result

    async def close(self) -> None:
        await self.inner.close()  # type: ignore[attr-defined]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of another process, from /proc (0 where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kembali_end_to_end(
    port: int, count: int, pool: int, in_flight: int, folder: Path, limits: dict[str, Any] | None = None
) -> dict[str, Any]:
    url = f"sqlite:///{folder / 'bench.db'}"
    now = datetime.now(UTC)
    seed(url, count, now)
    deps = Deps.build(bench_settings(url, port, pool, in_flight, limits))
    probe: RssProbe | None = None
    original = deps.transport
    marks = sorted({m for m in (10_000, count // 10, count // 2, count) if 0 < m <= count})

    def transport() -> RssProbe:
        nonlocal probe
        probe = RssProbe(original(), marks, timestamps=limits is not None)
        return probe

    deps.transport = transport  # type: ignore[method-assign]
    sink_pid = max(SINK_PIDS)
    sink0 = process_cpu_seconds(sink_pid)
    cpu0 = os.times()
    start = time.perf_counter()
    if PROFILE:
        import cProfile

        with cProfile.Profile() as profiler:
            report = eventloop.run(running.cycle(deps))
        profiler.dump_stats(PROFILE)
    else:
        report = eventloop.run(running.cycle(deps))
    elapsed = time.perf_counter() - start
    deps.close()
    cpu1 = os.times()  # the compose helpers have exited (and been waited for) by now
    sink_cpu = process_cpu_seconds(sink_pid) - sink0
    main_cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    helper_cpu = (cpu1.children_user - cpu0.children_user) + (cpu1.children_system - cpu0.children_system)
    sent = report.dispatched.outcomes["sent"]
    if sent != count:
        raise RuntimeError(f"only {sent} of {count} sent: {report.dispatched.outcomes}")
    assert probe is not None
    return {"rate": count / elapsed, "seconds": elapsed, "main_cpu_us": main_cpu / count * 1e6,
            "helper_cpu_us": helper_cpu / count * 1e6, "sink_cpu_us": sink_cpu / count * 1e6,
            "starts": probe.starts, "remembered_peak": report.dispatched.remembered_peak,
            **{f"rss@{k}": v for k, v in probe.rss.items()},
            **{f"helper@{k}": v for k, v in probe.helper_rss.items()}}  # fmt: skip


def sample_message(port: int, folder: Path) -> bytes:
    """One real Kembali message (rendered and built), for the raw loop."""
    url = f"sqlite:///{folder / f'sample-{port}.db'}"
    now = datetime.now(UTC)
    seed(url, 1, now)
    deps = Deps.build(bench_settings(url, port, 1, 1))
    from worker.pipeline import load_batch_facts, load_catalogue, plan

    plan(deps.store, deps.settings, now)
    (claimed,) = deps.store.claim(worker="bench", now=now, limit=1, lease_seconds=60,
                                  domain=deps.settings.shop.domain)
    facts = load_batch_facts(deps.store, [claimed], load_catalogue(deps.store, now))
    composed = deps.composer().compose(claimed, facts, now)
    deps.close()
    data: bytes = composed.data  # type: ignore[union-attr]
    return data


def rate_fidelity(
    starts: Sequence[tuple[float, str]], rate: float, burst: int, domain: str, domain_rate: float
) -> list[str]:
    """What the real clock saw of the limits: the sustained rate (over the middle 80 % of the sends), and
    the busiest one-second window, overall and for one recipient domain."""

    def figures(times: list[float], limit: float, allowed_burst: int) -> str:
        times.sort()
        # the middle 80 %: past the burst and the start-up, before the last batch thins out
        steady = times[len(times) // 10 : len(times) * 9 // 10]
        sustained = (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 1 else 0.0
        busiest, j = 0, 0
        for i, t in enumerate(times):
            while times[j] <= t - 1.0:
                j += 1
            busiest = max(busiest, i - j + 1)
        return (f"{sustained:7.1f}/s sustained for a limit of {limit:g}/s ({sustained / limit:.1%}); busiest second "
                f"{busiest} (limit + burst = {limit + allowed_burst:g})")

    overall = figures([t for t, _ in starts], rate, burst)
    one = [t for t, d in starts if d == domain]
    return [f"  all domains            : {overall}", f"  {domain:<22} : {figures(one, domain_rate, 1)}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--pool", type=int, default=8, help="SMTP connections (default 8)")
    parser.add_argument("--in-flight", type=int, default=4, help="sending.in_flight_per_connection (default 4)")
    parser.add_argument("--sinks", default="smtp-sink,aiosmtpd")
    parser.add_argument("--no-raw", action="store_true", help="skip the raw ceiling (for a long memory run)")
    parser.add_argument("--rate", type=float, metavar="R",
                        help="instead: rate fidelity on the real clock, with a global limit of R/s (burst 20) and "
                             "R/4 per s for gmail.com, measured at each SMTP transaction's start")  # fmt: skip
    parser.add_argument("--daily-quota", type=int, default=0, metavar="N",
                        help="sending.daily_quota (default 0: none); above --messages it costs the marks, stops none")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default=None,
                        help="event loop for both raw and end to end (default: KEMBALI_EVENT_LOOP, else auto: "
                             "uvloop when installed)")  # fmt: skip
    parser.add_argument("--mixed", type=float, metavar="R",
                        help="instead: a slow recipient domain limited to R/s among fast ones, until every fast "
                             "message is sent (0: the same run, that domain unlimited)")  # fmt: skip
    parser.add_argument("--slow-share", type=float, default=0.1, help="--mixed: the slow domain's share (0.1)")
    parser.add_argument("--wire-hold", type=float, metavar="S",
                        help=f"--mixed: worker.sending.WIRE_HOLD_SECONDS for the run (default {wire_hold():g})")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite",
                        help="--mixed: the database (postgresql: KEMBALI_TEST_PG_URL's server, shared limits)")
    parser.add_argument("--serve-aiosmtpd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_aiosmtpd:
        serve_aiosmtpd(args.serve_aiosmtpd)
        return
    os.environ.setdefault("KEMBALI_LINK_SECRET", "bench-link-secret-0123456789abcdef")
    if args.loop:
        os.environ[eventloop.ENV] = args.loop
    log.configure("warning")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, {args.messages} messages, "
          f"pool {args.pool} x {args.in_flight} in flight, event loop {eventloop.describe()}, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    sinks = [s.strip() for s in args.sinks.split(",") if s.strip()]
    if "smtp-sink" in sinks and SMTP_SINK is None:
        print("NOTE: Postfix's smtp-sink is not installed (apt-get install postfix): measuring aiosmtpd only")
        sinks.remove("smtp-sink")
    with tempfile.TemporaryDirectory(prefix="kembali-bench-") as tmp:
        folder = Path(tmp)
        if args.mixed is not None:
            if args.wire_hold is not None:
                vars(sending)["WIRE_HOLD_SECONDS"] = args.wire_hold
            mixed_run(sinks[-1], args.mixed, args.slow_share, args.messages, args.pool, args.in_flight, folder,
                      args.backend)  # fmt: skip
            return
        if args.rate:
            rate_run(sinks[0], args.rate, args.messages, args.pool, args.in_flight, folder)
            return
        for kind in sinks:
            with sink_process(kind) as port:
                message = sample_message(port, folder)
                raw = None if args.no_raw else eventloop.run(raw_ceiling(port, message, args.messages, args.pool))
                run_dir = folder / kind
                run_dir.mkdir()
                limits = {**UNLIMITED, "daily_quota": args.daily_quota} if args.daily_quota else None
                e2e = kembali_end_to_end(port, args.messages, args.pool, args.in_flight, run_dir, limits)
            rss = {k: v for k, v in e2e.items() if k.startswith("rss@")}
            print(f"\n[{kind}] message {len(message)} bytes")
            if raw is not None:
                print(f"  raw aiosmtplib ceiling : {raw:8.0f} msg/s")
            print(f"  kembali end to end     : {e2e['rate']:8.0f} msg/s  ({e2e['seconds']:.1f} s: plan, render, "
                  "MIME, send, record on SQLite)")  # fmt: skip
            if raw is not None:
                print(f"  ratio kembali / raw    : {e2e['rate'] / raw:8.0%}")
            print(f"  CPU per message        : {e2e['main_cpu_us']:.0f} us in the main process, "
                  f"{e2e['helper_cpu_us']:.0f} us in the compose helpers, {e2e['sink_cpu_us']:.0f} us in the sink")
            print("  RSS                    : " + ", ".join(f"{v:.0f} MB after {k[4:]} sent" for k, v in rss.items()))
            helpers = {k: v for k, v in e2e.items() if k.startswith("helper@")}
            print("  RSS of compose helpers : "
                  + ", ".join(f"{v:.0f} MB after {k[7:]} sent" for k, v in helpers.items()))
            print(f"  contact policy memory  : at most {e2e['remembered_peak']} sends remembered beside the ledger")


# --- a slow recipient domain among fast ones ---------------------------------------------


class MixedProbe:
    """Wraps the transport: counts the fast domains' sends and the slow one's, and sets ``done`` once every fast
    message is sent (the slow domain's backlog would take its count / R seconds more)."""

    def __init__(self, inner: object, fast: int, done: asyncio.Event) -> None:
        self.inner, self.fast_total, self.done = inner, fast, done
        self.fast = self.slow = 0
        self.first: float | None = None
        self.last_fast = 0.0

    async def send(self, sender: str, recipient: str, message: bytes, where: SendStage | None = None) -> SendResult:
        if self.first is None:
            self.first = time.monotonic()
        result: SendResult = await self.inner.send(sender, recipient, message, where)  # type: ignore[attr-defined]
        if recipient.endswith("@" + SLOW_DOMAIN):
            self.slow += 1
        else:
            self.fast += 1
            if self.fast == self.fast_total:
                self.last_fast = time.monotonic()
                self.done.set()
        return result

    async def close(self) -> None:
        await self.inner.close()  # type: ignore[attr-defined]


@contextmanager
def held_waits() -> Iterator[dict[str, float]]:
    """The slot waits the senders make holding one of the pool's connections (``Limiter.acquire`` with
    ``tell=False``: ``Dispatcher._slot_and_connection``), summed: the time the connections idle. The seconds are
    those each was told to wait (not its oversleep); patched around the limiter's method for the run. With the
    limiter's count of slots given up (``late_rebookings``), and of those because they passed while the sender waited
    for a connection (``passed``)."""
    held = {"seconds": 0.0, "waits": 0, "long": 0.0, "longs": 0, "missed": 0, "passed": 0}
    original, original_passed = Limiter.acquire, Limiter.passed

    async def acquire(self: Limiter, domain: str, **kwargs: Any) -> float | Later:
        waited = await original(self, domain, **kwargs)
        held["missed"] = self.late_rebookings  # slots given up: passed while the sender waited for a connection
        if not kwargs.get("tell", True) and not isinstance(waited, Later) and waited > 0:
            held["seconds"] += waited
            held["waits"] += 1
            if kwargs.get("hold") == HOLD_SECONDS:  # after REBOOKS misses: whatever slot the domain has
                held["long"] += waited
                held["longs"] += 1
        return waited

    def passed(self: Limiter, domain: str, granted: float) -> bool:
        gone = original_passed(self, domain, granted)
        held["passed"] += gone
        return gone

    Limiter.acquire, Limiter.passed = acquire, passed  # type: ignore[method-assign]
    try:
        yield held
    finally:
        Limiter.acquire, Limiter.passed = original, original_passed  # type: ignore[method-assign]


def wire_hold() -> float:
    """The sender's ``WIRE_HOLD_SECONDS`` as the run has it (``--wire-hold`` sets it)."""
    hold: float = vars(sending)["WIRE_HOLD_SECONDS"]
    return hold


@contextmanager
def bench_database(backend: str, folder: Path) -> Iterator[str]:
    """A fresh database's URL: a SQLite file in ``folder``, or a PostgreSQL database (``KEMBALI_TEST_PG_URL``'s
    server) dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'mixed.db'}"
        return
    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    name = f"kembali_bench_sending_{os.getpid()}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def mixed_run(sink: str, slow_rate: float, share: float, count: int, pool: int, in_flight: int, folder: Path,
              backend: str) -> None:  # fmt: skip
    slow_every = round(1 / share)
    fast = count - len(range(0, count, slow_every))
    limits = {**UNLIMITED, "domains": {SLOW_DOMAIN: {"rate_per_second": slow_rate, "burst": 1}}} if slow_rate \
        else UNLIMITED  # fmt: skip
    done = asyncio.Event()
    probe: MixedProbe | None = None
    with sink_process(sink) as port, bench_database(backend, folder) as url:
        seed(url, count, datetime.now(UTC), slow_every)
        deps = Deps.build(bench_settings(url, port, pool, in_flight, limits))
        original = deps.transport

        def transport() -> MixedProbe:
            nonlocal probe
            probe = MixedProbe(original(), fast, done)
            return probe

        deps.transport = transport  # type: ignore[method-assign,assignment]
        with held_waits() as held:
            eventloop.run(running.cycle(deps, stop=done))
        deps.close()
    assert probe is not None and probe.first is not None
    if probe.fast != fast:
        raise RuntimeError(f"only {probe.fast} of {fast} messages to the fast domains sent")
    seconds = probe.last_fast - probe.first
    slow = f"{slow_rate:g}/s" if slow_rate else "unlimited"
    print(f"\n[{sink}] mixed domains on {backend}: {fast} fast + {count - fast} at {SLOW_DOMAIN} ({slow}), "
          f"a connection held for a slot due within {wire_hold():g} s")  # fmt: skip
    print(f"  fast domains           : {fast / seconds:8.0f} msg/s  ({fast} in {seconds:.1f} s, the first send to "
          "the last fast one)")  # fmt: skip
    print(f"  all domains            : {(fast + probe.slow) / seconds:8.0f} msg/s")
    print(f"  {SLOW_DOMAIN:<22} : {probe.slow:8d} sent meanwhile ({probe.slow / seconds:.2f}/s), "
          f"{held['missed']:.0f} slots given up ({held['passed']:.0f} passed while waiting for a connection)")
    print(f"  connections held idle  : {held['seconds']:8.2f} s waiting for a slot ({held['waits']:.0f} waits), "
          f"{held['seconds'] / (pool * seconds):.2%} of {pool} connections x {seconds:.1f} s; of them "
          f"{held['long']:.2f} s ({held['longs']:.0f} waits) for a slot up to {HOLD_SECONDS:g} s off, after "
          f"{REBOOKS} missed")  # fmt: skip


def rate_run(sink: str, rate: float, count: int, pool: int, in_flight: int, folder: Path) -> None:
    limits = {"rate_per_second": rate, "burst": 20, "domain_rate_per_second": 1e6, "domain_burst": 10_000,
              "domains": {"gmail.com": {"rate_per_second": rate / 4, "burst": 1}}}  # fmt: skip
    with sink_process(sink) as port:
        e2e = kembali_end_to_end(port, count, pool, in_flight, folder, limits)
    print(f"\n[{sink}] rate fidelity on the real clock, {count} messages in {e2e['seconds']:.1f} s:")
    for line in rate_fidelity(e2e["starts"], rate, 20, "gmail.com", rate / 4):
        print(line)


if __name__ == "__main__":
    main()
