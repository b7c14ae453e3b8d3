"""A database host that does not answer: a real TCP listener that accepts connections and never speaks (what a
dropped route or a hung server looks like to the client), and the real PostgreSQL server."""

from __future__ import annotations

import asyncio
import contextlib
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.daemon_harness import make_shop
from tests.sendkit import REPO
from tests.shop_fixtures import Site as ShopSite
from tests.shop_fixtures import make_site
from tests.smtp_server import closed_port
from worker import links
from worker.adapters import db
from worker.adapters.clock import SystemClock
from worker.adapters.store import Store
from worker.adapters.web import Request
from worker.asyncstore import AsyncStore
from worker.config import load_settings
from worker.links import Site
from worker.metrics import Metrics


@pytest.fixture
def silent_listener() -> Iterator[socket.socket]:
    """A listening socket nobody accepts on: connections complete (the kernel's backlog) and hear nothing."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener


def accepted(listener: socket.socket) -> int:
    """How many connections were made to the listener (those waiting in its backlog)."""
    listener.setblocking(False)
    count = 0
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def _libpq_parameters(url: str, **query: str) -> dict[str, str]:
    """The parameters libpq connects with, on an engine Kembali makes from ``url`` with ``query`` added to it."""
    engine = db.create_engine(sa.make_url(url).update_query_dict(query).render_as_string(False))
    try:
        with engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            return raw.info.get_parameters()
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_postgresql_connection_sends_tcp_keepalives_unless_the_url_sets_its_own(pg_url: str) -> None:
    # Given the engines Kembali makes: one from a URL as usually written, one that sets keepalives_idle itself
    for query, idle in (({}, "30"), ({"keepalives_idle": "120"}, "120")):
        got = _libpq_parameters(pg_url, **query)
        # Then the connection probes a silent peer after 30 s idle, 3 times 10 s apart (the system's default waits
        # two hours idle before the first probe), and the URL's own value is kept
        assert (got.get("keepalives"), got.get("keepalives_idle"), got.get("keepalives_interval"),
                got.get("keepalives_count")) == ("1", idle, "10", "3"), got  # fmt: skip


@pytest.mark.postgres
def test_a_postgresql_connection_gives_up_after_a_connect_timeout_unless_the_url_sets_its_own(pg_url: str) -> None:
    # Given the engines Kembali makes: one from a URL as usually written, one that sets connect_timeout itself
    for query, expected in (({}, "10"), ({"connect_timeout": "3"}, "3")):
        # Then libpq is told to give up on a host that does not answer (it waits for ever by default), and the
        # URL's own value is kept
        assert _libpq_parameters(pg_url, **query).get("connect_timeout") == expected


def test_health_and_readiness_probes_share_one_ping_while_the_database_host_does_not_answer(
    tmp_path: Path, silent_listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the daemon's site, its database on a host that accepts connections and never answers
    port = silent_listener.getsockname()[1]
    store = Store(db.create_engine(f"postgresql+psycopg://kembali@127.0.0.1:{port}/kembali?connect_timeout=2"))
    astore = AsyncStore(store)
    settings = load_settings(make_shop(tmp_path, smtp_port=closed_port()).config)
    site = Site(store=astore, keys=[b"k" * 32], settings=lambda: settings, clock=SystemClock(), metrics=Metrics(),
                paused=lambda: False)
    monkeypatch.setattr(links, "HEALTH_TIMEOUT_SECONDS", 0.05)

    async def probes() -> list[tuple[int, bytes]]:
        answers = []
        for path in ("/healthz", "/readyz") * 3:  # When a monitor and a load balancer probe again and again
            response = await site.handle(Request("GET", path, {}, {}))
            answers.append((response.status, response.body))
        return answers

    try:
        answers = asyncio.run(probes())  # (asyncio.run waits for the pings' threads: until their connect timeout)
    finally:
        astore.close()
        store.close()
    # Then each probe says the database is unreachable
    assert all(status == 503 and b'"unhealthy"' in body and b"unreachable" in body for status, body in answers), answers
    # And one ping was under way for all of them: not one thread per probe, each held by the silent host
    assert accepted(silent_listener) == 1


def test_metrics_are_served_without_the_ledgers_figures_while_the_database_host_does_not_answer(
    tmp_path: Path, silent_listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the daemon's site, its database on a host that accepts connections and never answers
    port = silent_listener.getsockname()[1]
    store = Store(db.create_engine(f"postgresql+psycopg://kembali@127.0.0.1:{port}/kembali?connect_timeout=2"))
    astore = AsyncStore(store)
    settings = load_settings(make_shop(tmp_path, smtp_port=closed_port()).config)
    metrics = Metrics()
    metrics.observe_result("winback", "sent", "sent", 0.2, at=0.0)
    site = Site(store=astore, keys=[b"k" * 32], settings=lambda: settings, clock=SystemClock(), metrics=metrics,
                paused=lambda: False)
    monkeypatch.setattr(links, "METRICS_DATABASE_SECONDS", 0.05)

    async def scrape() -> tuple[int, str, bool]:
        # When Prometheus scrapes /metrics (its scrape times out at 10 s, as the database's connect timeout does)
        response = await site.handle(Request("GET", "/metrics", {}, {}))
        return response.status, response.body.decode(), not site._shared.under_way(("metrics",))

    try:
        status, text, read_done = asyncio.run(scrape())
    finally:
        astore.close()
        store.close()
    # Then the answer comes without waiting for the database: the process's own figures, and the database down
    assert status == 200
    assert "kembali_database_up 0" in text
    assert 'kembali_results_total{campaign="winback",result="sent"} 1' in text
    assert not read_done  # (the read still waited for the silent host when the scrape was answered)


def _site_on(tmp_path: Path, url: str) -> ShopSite:
    """A site whose database is at ``url``, logging every event (the password's checks see them all)."""
    site = make_site(tmp_path)
    site.config.write_text(site.config.read_text().replace('"sqlite:///kembali.db"', f'"{url}"')
                           .replace('level = "warning"', 'level = "debug"'))
    return site


def test_the_operators_commands_name_a_database_host_that_does_not_answer_and_what_to_look_at(
    tmp_path: Path, silent_listener: socket.socket
) -> None:
    # Given a config whose PostgreSQL host accepts connections and never answers (a hung server; a firewall that drops
    # the packets looks the same, only without the connection)
    port = silent_listener.getsockname()[1]
    site = _site_on(tmp_path, f"postgresql+psycopg://kembali:s3cret@127.0.0.1:{port}/kembali")
    # When the operator checks the config, the schema, the ledger
    for args in (("check", "--json"), ("db", "status"), ("ledger", "list")):
        done = site.cli(*args)
        said = done.stdout + done.stderr
        # Then each gives up after the short wait of a command (not the daemon's 10 s) and says which host and port
        # did not answer, and what to look at; the password is not shown
        assert f"PostgreSQL at 127.0.0.1:{port} did not answer within 3 s" in said, (args, said)
        assert "is the server up" in said and "s3cret" not in said, (args, said)
    # And check still checks the config: the ledger is a note, the exit code the config's
    assert done.returncode == 3 and site.cli("check").returncode == 0


def test_the_operators_commands_say_when_nothing_listens_on_the_databases_port(tmp_path: Path) -> None:
    # Given a config whose PostgreSQL port has nothing listening on it (the server down, or another port)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    site = _site_on(tmp_path, f"postgresql+psycopg://kembali:s3cret@127.0.0.1:{port}/kembali")
    for args in (("check",), ("db", "status")):
        done = site.cli(*args)
        said = done.stdout + done.stderr
        # Then the command says nothing listens there, and what to look at
        assert f"nothing listens on 127.0.0.1:{port} (connection refused)" in said, (args, said)
        assert "is PostgreSQL running" in said and "s3cret" not in said, (args, said)


def _refusing_every_password(listener: socket.socket) -> None:
    """Answer each connection as a PostgreSQL server whose pg_hba.conf asks for a password and refuses the one given
    (libpq's SSL and GSS requests declined, then a cleartext password asked for, then FATAL 28P01)."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:  # the listener closed: the test is over
            return
        with conn:
            conn.settimeout(10)
            with contextlib.suppress(OSError):
                while len(request := conn.recv(8)) == 8 and request[4:] in (b"\x04\xd2\x16\x2f", b"\x04\xd2\x16\x30"):
                    conn.sendall(b"N")  # no SSL, no GSS encryption (request: the startup message's start)
                length = int.from_bytes(request[:4])
                while len(request) < length:
                    request += conn.recv(length - len(request))
                conn.sendall(b"R" + (8).to_bytes(4) + (3).to_bytes(4))  # AuthenticationCleartextPassword
                conn.recv(4096)  # the password message
                fields = b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user \"kembali\"\0\0"
                conn.sendall(b"E" + (len(fields) + 4).to_bytes(4) + fields)


def test_the_operators_commands_say_a_refused_password_is_the_password_and_never_show_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a PostgreSQL server that refuses the password database.url gives
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        threading.Thread(target=_refusing_every_password, args=(listener,), daemon=True).start()
        port = listener.getsockname()[1]
        site = _site_on(tmp_path, f"postgresql+psycopg://kembali:s3cret-Pw@127.0.0.1:{port}/kembali")
        for args in (("db", "status"), ("db", "upgrade"), ("ledger", "list")):
            done = site.cli(*args)
            said = done.stdout + done.stderr
            # Then each says the server refused the password of the user the URL names, where to set it, and
            # shows it nowhere
            assert done.returncode == 3, (args, said)
            assert f"PostgreSQL at 127.0.0.1:{port} refused the password of user 'kembali'" in said, (args, said)
            assert "$PGPASSWORD" in said and "s3cret" not in said, (args, said)
        # And a URL without a password, where the server asks for one, says where to set it
        site = _site_on(tmp_path, f"postgresql+psycopg://kembali@127.0.0.1:{port}/kembali")
        monkeypatch.delenv("PGPASSWORD", raising=False)
        monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))
        done = site.cli("db", "status")
        assert f"PostgreSQL at 127.0.0.1:{port} asks for a password and none is given" in done.stderr, done.stderr
        listener.shutdown(socket.SHUT_RDWR)


@pytest.mark.postgres
def test_the_operators_commands_say_a_database_or_user_the_server_does_not_have_is_to_be_created(
    tmp_path: Path, pg_url: str
) -> None:
    # Given database.url naming a database, or a user, the PostgreSQL server does not have (a new host's first deploy)
    url = sa.make_url(pg_url).set(password="s3cret-Pw")
    cases = ((url.set(database="kembali_not_created"), "has no database 'kembali_not_created': create it"),
             (url.set(username="kembali_no_role"), "has no user 'kembali_no_role': check database.url's user"))
    for given, meant in cases:
        site = _site_on(tmp_path, given.render_as_string(hide_password=False))
        for args in (("db", "upgrade"), ("db", "status")):
            done = site.cli(*args)
            said = done.stdout + done.stderr
            # Then the command says what to create or correct, not the bare FATAL, and the password is not shown
            assert done.returncode == 3, (args, said)
            assert meant in said and "s3cret" not in said, (args, said)


def _closed_port(family: socket.AddressFamily = socket.AF_INET, host: str = "127.0.0.1") -> int:
    with socket.socket(family) as closed:
        closed.bind((host, 0))
        return int(closed.getsockname()[1])


def _ipv6_loopback() -> bool:
    try:
        _closed_port(socket.AF_INET6, "::1")
    except OSError:
        return False
    return True


def test_the_operators_commands_name_the_host_and_port_the_url_gives_in_every_form(tmp_path: Path) -> None:
    # Given configs naming their PostgreSQL server as libpq's parameters (host and port in the query), several hosts,
    # an IPv6 address and a unix socket's folder, with nothing listening at any of them
    p1, p2 = _closed_port(), _closed_port()
    folder = tmp_path / "pg-socket"
    folder.mkdir()
    stale = socket.socket(socket.AF_UNIX)  # a socket file left behind by a server that is gone: connection refused
    stale.bind(str(folder / ".s.PGSQL.5433"))
    forms = {
        f"/kembali?host=127.0.0.1&port={p1}": f"127.0.0.1:{p1}",
        f"/kembali?host=127.0.0.1:{p1}&host=127.0.0.1:{p2}": f"127.0.0.1:{p1}, 127.0.0.1:{p2}",
        f"/kembali?host={folder}&port=5433": f"the socket {folder}/.s.PGSQL.5433",
    }
    if _ipv6_loopback():
        p6 = _closed_port(socket.AF_INET6, "::1")
        forms[f"[::1]:{p6}/kembali"] = f"[::1]:{p6}"
    try:
        for n, (rest, where) in enumerate(forms.items()):
            site = _site_on(tmp_path / str(n), f"postgresql+psycopg://kembali:s3cret@{rest}")
            # When the operator asks for the schema's state
            done = site.cli("db", "status")
            # Then the command names where the URL sends it, not a localhost:5432 it never tried
            said = done.stdout + done.stderr
            assert f"nothing listens on {where} (connection refused)" in said, (rest, said)
            assert "s3cret" not in said and done.returncode != 0, (rest, said)
    finally:
        stale.close()


@pytest.fixture
def waking_server(pg_migrated_url: str) -> Iterator[str]:
    """``pg_migrated_url`` through a proxy that answers its first connection after 4 s, as a PostgreSQL host that
    sleeps when idle (a serverless or scaled-to-zero database) does when it wakes; the others at once."""
    real = sa.make_url(pg_migrated_url)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    first = [True]

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def serve() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if first[0]:
                first[0] = False
                time.sleep(4.0)
            upstream = socket.create_connection((real.host or "127.0.0.1", real.port or 5432))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield real.set(host="127.0.0.1", port=listener.getsockname()[1]).render_as_string(False)
    finally:
        listener.close()


@pytest.mark.postgres
def test_db_upgrade_waits_for_a_database_host_as_long_as_the_daemon_does(tmp_path: Path, waking_server: str) -> None:
    # Given a deploy's PostgreSQL host that takes 4 s to answer its first connection (waking up), which the daemon
    # waits for (10 s)
    site = _site_on(tmp_path, waking_server)
    # When the deploy migrates the schema before it starts the daemon
    done = site.cli("db", "upgrade")
    # Then the migration is not given up after the 3 s of an operator's look at the ledger: the deploy goes on
    assert done.returncode == 0, done.stdout + done.stderr
    assert "schema already at" in done.stdout


def test_ctrl_c_stops_check_while_it_waits_for_a_database_host_that_does_not_answer(
    tmp_path: Path, silent_listener: socket.socket
) -> None:
    # Given a config whose PostgreSQL host never answers, with a long connect_timeout of the URL's own (a slow link)
    port = silent_listener.getsockname()[1]
    site = _site_on(tmp_path, f"postgresql+psycopg://kembali@127.0.0.1:{port}/kembali?connect_timeout=60")
    # (started with Ctrl-C's default, as from an operator's terminal: a runner started in the background of a
    # script ignores SIGINT, and so would check, its KeyboardInterrupt never raised)
    runner = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        check = subprocess.Popen([sys.executable, "-m", "worker", "--config", str(site.config), "check"], cwd=REPO,
                                 env=site.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, runner)
    try:
        # When the operator presses Ctrl-C once check is waiting for the host (its start takes a while on a busy
        # machine: 30 s was not always enough with the load average at 20)
        assert select.select([silent_listener], [], [], 90)[0], "check never connected"
        check.send_signal(signal.SIGINT)
        # Then check stops (130), not after the host's minute
        _, err = check.communicate(timeout=20)
    finally:
        check.kill()
        check.wait()
    assert check.returncode == 130, err
    assert "stopped by SIGINT" in err


def test_db_upgrade_of_a_postgresql_database_not_created_yet_says_to_create_it(
    tmp_path: Path, pg_admin: sa.Engine
) -> None:
    # Given a config naming a database the PostgreSQL server does not have (a new shop's: README's first steps)
    name = f"kembali_never_created_{uuid.uuid4().hex[:8]}"
    url = pg_admin.url.set(database=name)
    site = _site_on(tmp_path, url.render_as_string(hide_password=False))
    for args in (("db", "upgrade"), ("db", "status")):
        done = site.cli(*args)
        # Then the command says the server has no such database and how to create one; nothing was created
        assert done.returncode == 3, (args, done.stderr)
        assert f"has no database '{name}': create it first" in done.stderr, (args, done.stderr)
        assert f"CREATE DATABASE {name} OWNER {url.username}" in done.stderr, (args, done.stderr)
        assert f"createdb --owner={url.username} {name}" in done.stderr, (args, done.stderr)
    with pg_admin.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM pg_database WHERE datname = :n"), {"n": name}).scalar() == 0
