"""The short-lived commands (preview, check, stats…) stopped part-way by Ctrl-C (SIGINT) or SIGTERM (``timeout``,
a service manager, ``kill``): one line naming the signal, exit code 128 + its number as the shell reports it (130,
143), no traceback, no file of ``--out`` cut short.

Each test makes the command wait where it works, so that the signal finds it there whatever the machine's speed:
preview's output fills a pipe the test does not read, a template that never finishes keeps check rendering, a
lock held on the ledger keeps stats' first query waiting. The signal goes to the command's whole process group,
as a terminal's Ctrl-C and ``timeout`` send it: its helper processes get it too."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.clikit import cpu_seconds, waiting_for_a_lock
from tests.shop_fixtures import LINK_SECRET, load_shop, make_site
from worker import launch, stopping
from worker.adapters import db
from worker.demo import generate_shop

NOW = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
STOPS = [signal.SIGINT, signal.SIGTERM]


def _start(argv: list[str], cwd: Path) -> subprocess.Popen[str]:
    """``python -m worker ARGV`` in a process group of its own, as a shell starts a command."""
    env = {**os.environ, "KEMBALI_LINK_SECRET": LINK_SECRET}
    return subprocess.Popen([sys.executable, "-m", "worker", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def _wait_for(condition: Callable[[], bool], child: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert child.poll() is None, f"the command ended before {what}: {child.communicate()}"
        assert time.monotonic() < deadline, f"the command never got to {what}"
        time.sleep(0.02)


def _stop(child: subprocess.Popen[str], sig: signal.Signals) -> tuple[str, str]:
    os.killpg(child.pid, sig)
    return child.communicate(timeout=60)


def _stopped_as_the_shell_expects(child: subprocess.Popen[str], stderr: str, command: str,
                                  sig: signal.Signals) -> None:  # fmt: skip
    assert child.returncode == 128 + sig.value, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.splitlines()[-1] == f"kembali {command}: stopped by {sig.name}", stderr


@pytest.mark.parametrize("sig", STOPS, ids=lambda s: s.name)
def test_a_preview_stopped_while_it_writes_its_messages_leaves_each_file_whole(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # Given a shop where more messages are due than a pipe holds lines of
    site = make_site(tmp_path / "shop")
    load_shop(site.settings, generate_shop(seed=7, customers=3000, now=NOW), NOW)
    out = tmp_path / "preview"
    # When its preview writes them to --out and to a pipe the test reads one line of: the preview waits on the full
    # pipe, mid-way, until the signal comes
    child = _start(["--config", str(site.config), "preview", "--at", NOW.isoformat(), "--out", str(out)],
                   site.folder)  # fmt: skip
    assert child.stdout is not None
    assert child.stdout.readline().startswith("Preview as of")
    _wait_for(lambda: any(out.glob("*.eml")), child, "its first message")
    stdout, stderr = _stop(child, sig)
    # Then it says it stopped part-way (no summary), with the signal's exit code
    _stopped_as_the_shell_expects(child, stderr, "preview", sig)
    assert "considered" not in stdout
    # and every message in --out is whole: its two files, and no file being written left behind
    names = {p.name for p in out.iterdir()}
    assert not [n for n in names if n.endswith(".partial")], names
    emls = {n.removesuffix(".eml") for n in names if n.endswith(".eml")}
    assert emls == {n.removesuffix(".html") for n in names if n.endswith(".html")}
    assert emls


@pytest.mark.parametrize("sig", STOPS, ids=lambda s: s.name)
def test_a_stop_during_steps_that_go_together_stops_the_command_once_they_are_done(sig: signal.Signals) -> None:
    # Given steps that must all happen or none (a preview's two files of one message), and the stop handlers a
    # short command has (Ctrl-C's KeyboardInterrupt, SIGTERM's Terminated)
    done: list[str] = []
    with stopping.sigterm_raises(), pytest.raises(KeyboardInterrupt) as stopped:
        with stopping.stops_held():
            done.append("first")
            # When the stop comes between them
            os.kill(os.getpid(), sig)
            time.sleep(0.01)  # a few instructions: the handler, were it not held, would have run by now
            done.append("second")
        done.append("after")
    # Then both steps are done, and the command stops right after them, as that signal stops it
    assert done == ["first", "second"]
    assert stopping.stop_signal(stopped.value) == sig
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize(("first", "second", "apart"), [
    (signal.SIGTERM, signal.SIGINT, 0.0),  # `timeout`, or a service manager, and then a person's Ctrl-C
    (signal.SIGINT, signal.SIGTERM, 0.0),
    (signal.SIGINT, signal.SIGINT, 0.3),  # Ctrl-C pressed again: a person's second press comes this late or later
    (signal.SIGTERM, signal.SIGTERM, stopping.ECHO_SECONDS + 0.1),  # `kill` again
], ids=["SIGTERM-then-SIGINT", "SIGINT-then-SIGTERM", "SIGINT-twice", "SIGTERM-twice"])
def test_a_second_stop_during_steps_that_go_together_stops_the_command_at_once(
    first: signal.Signals, second: signal.Signals, apart: float
) -> None:
    # Given steps that must all happen or none, held for a stop, under a short command's stop handlers
    done: list[str] = []
    with stopping.sigterm_raises(), pytest.raises(KeyboardInterrupt) as stopped, stopping.stops_held():
        done.append("first")
        # When a stop comes, and then a second one (the steps take long: a batch waiting for a lock, say)
        os.kill(os.getpid(), first)
        time.sleep(apart)
        os.kill(os.getpid(), second)
        time.sleep(0.01)  # a few instructions: the handler has run by now
        done.append("second")  # (it waited here for the steps' end, however long they took)
    # Then the second one does not wait: the command stops at once, as the first stop would have outside the steps
    assert done == ["first"]
    assert stopping.stop_signal(stopped.value) == first
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_echo_of_a_stop_during_steps_that_go_together_still_waits_for_them() -> None:
    # Given steps that must all happen or none, held for a stop, under a short command's stop handlers
    done: list[str] = []
    with stopping.sigterm_raises(), pytest.raises(stopping.Terminated), stopping.stops_held():
        done.append("first")
        # When SIGTERM comes twice at once, as `timeout` sends it: to the process, then to its process group
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        done.append("second")
    # Then that is one stop, not a second one: the steps are done, and the command stops right after them
    assert done == ["first", "second"]


NEVER_ENDS = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"


def _children(pid: int) -> list[str]:
    """The command lines of ``pid``'s child processes (Linux)."""
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(FileNotFoundError):  # gone meanwhile
            found.append(Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode())
    return found


@pytest.mark.parametrize("sig", STOPS, ids=lambda s: s.name)
def test_a_check_stopped_while_it_renders_says_so_and_its_helper_too_stays_quiet(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # Given a template that never finishes rendering (the check gives it checks.render_timeout_seconds, a minute)
    site = make_site(tmp_path / "shop", copy_templates=True, extra_toml="[checks]\nrender_timeout_seconds = 60\n")
    text = tmp_path / "shop" / "templates" / "winback" / "id" / "body.txt"
    text.write_text(NEVER_ENDS + text.read_text(encoding="utf-8"), encoding="utf-8")
    # When the check is rendering (its render helper started) and Ctrl-C or SIGTERM reaches its process group
    child = _start(["--config", str(site.config), "check"], site.folder)
    _wait_for(lambda: any("render_worker" in c for c in _children(child.pid)), child, "its render helper")
    _stdout, stderr = _stop(child, sig)
    # Then the check says it stopped, and the helper, which got the signal too, printed no traceback
    _stopped_as_the_shell_expects(child, stderr, "check", sig)


@pytest.mark.postgres
@pytest.mark.parametrize("sig", STOPS, ids=lambda s: s.name)
def test_stats_stopped_while_its_query_waits_says_so(tmp_path: Path, pg_migrated_url: str, sig: signal.Signals) -> None:
    # Given a PostgreSQL ledger locked by another session, so that stats' first query waits
    site = make_site(tmp_path / "shop")
    site.config.write_text(site.config.read_text(encoding="utf-8")
                           .replace('"sqlite:///kembali.db"', f'"{pg_migrated_url}"'),
                           encoding="utf-8")  # fmt: skip
    engine = db.create_engine(pg_migrated_url)
    try:
        with engine.connect() as locker:
            locker.execute(sa.text("LOCK TABLE message IN ACCESS EXCLUSIVE MODE"))
            holder = locker.execute(sa.text("select pg_backend_pid()")).scalar_one()
            child = _start(["--config", str(site.config), "stats", "--now", NOW.isoformat()], site.folder)

            def waiting() -> bool:  # a query blocked by this lock: not another test's, run beside this one
                with engine.connect() as probe:
                    return bool(probe.execute(sa.text(
                        "select count(*) from pg_stat_activity where :holder = any(pg_blocking_pids(pid)) "
                        "and query ilike '%from message%'"), {"holder": holder}).scalar())  # fmt: skip

            # When stats waits for the lock and the signal comes
            _wait_for(waiting, child, "its query")
            _stdout, stderr = _stop(child, sig)
            locker.rollback()
    finally:
        engine.dispose()
    # Then it stops at once (its query cancelled, not left to run), saying so
    _stopped_as_the_shell_expects(child, stderr, "stats", sig)


@pytest.mark.parametrize("sig", STOPS, ids=lambda s: s.name)
def test_a_command_stopped_while_it_waits_for_the_sqlite_write_lock_stops_without_waiting_it_out(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # Given an SQLite ledger whose write lock another process holds (a command waits for it up to SQLite's busy
    # timeout, 30 seconds, before it gives up)
    site = make_site(tmp_path / "shop")
    locker = sqlite3.connect(site.db_path, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        # When a command that writes waits for it (SQLite sleeping between its tries) and the signal comes
        child = _start(["--config", str(site.config), "suppress", "add", "someone@example.com"], site.folder)
        _wait_for(lambda: waiting_for_a_lock(child.pid), child, "its wait for the lock")
        signalled = time.monotonic()
        _stdout, stderr = _stop(child, sig)
        waited = time.monotonic() - signalled
        locker.rollback()
        # Then it stops without waiting out the busy timeout (it waited the whole 30 seconds, in SQLite), saying so
        _stopped_as_the_shell_expects(child, stderr, "suppress", sig)
        assert waited < db.SQLITE_BUSY_TIMEOUT_MS / 1000 / 2, waited
        # having written nothing
        assert locker.execute("SELECT count(*) FROM suppression").fetchone() == (0,)
    finally:
        locker.close()


@pytest.mark.parametrize("sig", STOPS, ids=lambda s: s.name)
def test_an_import_stopped_before_it_reads_its_file_says_so_as_the_other_commands_do(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # Given an SQLite ledger whose write lock another process holds, and a first orders import, which counts the
    # customers' spend totals in the shop's currency (a write) before it reads its file and takes the signals itself
    site = make_site(tmp_path / "shop")
    orders = site.folder / "orders.csv"
    orders.write_text("order_id,customer_id,status,placed_at,total\nO-1,C-1,paid,2026-11-01T10:00,1000\n",
                      encoding="utf-8")
    locker = sqlite3.connect(site.db_path, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        # When the signal comes while that count waits for the lock
        child = _start(["--config", str(site.config), "import", "orders", str(orders)], site.folder)
        _wait_for(lambda: waiting_for_a_lock(child.pid), child, "its wait for the lock")
        _stdout, stderr = _stop(child, sig)
        locker.rollback()
        # Then it says which signal stopped it, with 128 + its number (SIGTERM killed it without a word)
        _stopped_as_the_shell_expects(child, stderr, "import", sig)
    finally:
        locker.close()


def test_a_file_of_preview_out_stopped_while_it_is_written_is_removed(tmp_path: Path) -> None:
    # Given a message's file being written into a reader that takes one byte and then the signal comes: the file's
    # temporary name is a FIFO here, so that the write waits there, mid-file, for the test
    from worker.commands.previewing import write_whole

    path = tmp_path / "0001-winback_C-1.eml"
    partial = tmp_path / f".{path.name}.partial"
    os.mkfifo(partial)
    main, done = threading.main_thread().ident, threading.Event()
    assert main is not None

    def reader() -> None:
        with open(partial, "rb") as f:
            assert f.read(1) == b"x"  # the write began; it cannot have ended: a pipe holds less than a megabyte
            signal.pthread_kill(main, signal.SIGINT)
            done.wait(60)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        # When Ctrl-C stops the write
        with pytest.raises(KeyboardInterrupt):
            write_whole(path, b"x" * 2**20)
    finally:
        done.set()
        thread.join()
    # Then nothing of it is left: neither the message's name nor the temporary one
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", STOPS, ids=lambda s: s.name)
def test_the_live_preview_stops_on_either_signal_as_a_server_does(tmp_path: Path, sig: signal.Signals) -> None:
    # Given the live preview serving (SIGTERM killed it without a word; Ctrl-C stopped it)
    site = make_site(tmp_path / "shop")
    child = _start(["--config", str(site.config), "preview", "--serve", "--port", "0"], site.folder)
    assert child.stdout is not None
    assert child.stdout.readline().startswith("live preview on http://127.0.0.1:")
    # When the signal comes, Then it stops as a server does: exit code 0, saying so
    _stdout, stderr = _stop(child, sig)
    assert child.returncode == 0, stderr
    assert stderr.splitlines()[-1] == "live preview stopped" and "Traceback" not in stderr, stderr


@pytest.mark.parametrize("sig", STOPS, ids=lambda s: s.name)
def test_a_send_test_stopped_while_it_waits_for_the_server_says_so(tmp_path: Path, sig: signal.Signals) -> None:
    # Given an SMTP server that takes the connection and never greets
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:
        site = make_site(tmp_path / "shop", smtp_port=server.getsockname()[1])
        child = _start(["--config", str(site.config), "send-test", "--campaign", "winback", "--to", "me@example.com"],
                       site.folder)  # fmt: skip
        # When send-test has connected (it waits for the greeting) and the signal comes
        connection, _ = server.accept()
        with connection:
            stdout, stderr = _stop(child, sig)
    # Then it says it stopped, and sent nothing
    _stopped_as_the_shell_expects(child, stderr, "send-test", sig)
    assert stdout == ""


@pytest.mark.parametrize("sig", STOPS, ids=lambda s: s.name)
def test_a_short_command_stops_even_when_its_work_drops_the_first_cancel(sig: signal.Signals) -> None:
    # Given a command's work that drops the first cancel, as Python 3.11's asyncio.wait_for (aiosmtplib's, for each
    # connection and reply) does when it comes as the awaited thing completes, then waits for the next reply
    replies: list[str] = []

    async def work() -> str:
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, os.kill, os.getpid(), sig)
        try:
            await asyncio.sleep(30)  # the server's connection, made as the signal came
        except asyncio.CancelledError:
            replies.append("cancel dropped")
        await asyncio.sleep(30)  # the greeting that never comes
        replies.append("greeted")
        return "sent"

    # When the signal comes: then the command stops, and does not wait out the second step
    expected = stopping.Terminated if sig is signal.SIGTERM else KeyboardInterrupt
    with pytest.raises(expected):
        stopping.run_terminable(work())
    assert replies == ["cancel dropped"]
    # and the stop handlers are back as they were
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize(("first", "second"), [STOPS, STOPS[::-1]], ids=lambda s: s.name)
def test_a_short_command_stopped_by_one_signal_and_then_the_other_while_its_work_ends_says_it_stopped(
    first: signal.Signals, second: signal.Signals
) -> None:
    # Given a command's work that, cancelled by a stop signal, takes a moment to end (it drops the cancel, as
    # Python 3.11's asyncio.wait_for may), and meanwhile the other stop signal comes (Ctrl-C pressed after a
    # `timeout`'s SIGTERM, or the other way round)
    async def work() -> str:
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), first)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            os.kill(os.getpid(), second)
        await asyncio.sleep(30)
        return "sent"

    # When it stops: then it says it was stopped by a signal (KeyboardInterrupt, or Terminated, its kind), not a
    # CancelledError that escaped as a traceback
    with pytest.raises(KeyboardInterrupt):
        stopping.run_terminable(work())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_sigterm_as_a_command_ends_is_not_told_as_one_that_came_before_it_began() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        # Given the entry point noting SIGTERMs, and a command that set its own handler (and took none noted)
        launch.note_sigterm()
        with stopping.sigterm_raises():
            pass  # the command's work, done
        # When a SIGTERM comes as it exits, its handler given back (`timeout` running out just then)
        signal.raise_signal(signal.SIGTERM)
        # Then the entry point does not tell it as a stop before the command began (a second "stopped by SIGTERM"
        # after the command's own, or 143 after its work was done): the command had its say
        assert not launch.unanswered()
        # while one before any command's handler (`--help`, a usage error) is told
        launch.note_sigterm()
        signal.raise_signal(signal.SIGTERM)
        assert launch.unanswered()
    finally:
        launch.early_sigterm()  # forgotten: the next command's handler in this process must not take it
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("sig", STOPS, ids=lambda s: s.name)
def test_stats_stopped_while_an_sqlite_query_runs_stops_the_query(tmp_path: Path, sig: signal.Signals) -> None:
    # Given a ledger whose first query stats makes runs for ever: the message table behind a view that repeats its
    # rows without end (as a query over a ledger of many millions would keep SQLite busy, in C, for minutes)
    site = make_site(tmp_path / "shop")
    with sqlite3.connect(site.db_path) as conn:
        conn.executescript("""
            ALTER TABLE message RENAME TO message_rows;
            CREATE VIEW message AS
                WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n)
                SELECT message_rows.* FROM n CROSS JOIN message_rows;
        """)
    # and the processor time stats takes when its queries end (on the database as make_site left it)
    whole = make_site(tmp_path / "whole")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    finished = whole.cli("stats", "--now", NOW.isoformat())
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert finished.returncode == 0, finished.stderr
    baseline = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    # When stats has spent well more than that, so it is in its query, and the signal comes
    child = _start(["--config", str(site.config), "stats", "--now", NOW.isoformat()], site.folder)
    try:
        _wait_for(lambda: cpu_seconds(child.pid) > 2 * baseline + 1, child, "its query")
        _stdout, stderr = _stop(child, sig)
    finally:
        if child.poll() is None:  # (its query never ends)
            child.kill()
            child.communicate()
    # Then the query is stopped (not waited for: it never ends) and stats says it stopped, as it does elsewhere
    _stopped_as_the_shell_expects(child, stderr, "stats", sig)


@pytest.mark.parametrize("sig", STOPS, ids=lambda s: s.name)
def test_a_transaction_stopped_in_a_long_sqlite_statement_is_rolled_back_and_says_which_signal(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # Given a transaction that has written a row and then runs a statement that never ends
    site = make_site(tmp_path / "shop")
    engine = db.create_engine(site.settings.database_url)
    started, done, late = threading.Event(), threading.Event(), threading.Event()
    opened: list[sqlite3.Connection] = []

    @sa.event.listens_for(engine, "connect")
    def _with_started(dbapi_conn: sqlite3.Connection, _record: object) -> None:
        dbapi_conn.create_function("started", 0, started.set)  # called once the statement runs (NULL)
        opened.append(dbapi_conn)

    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE scratch (x INTEGER)")
    main = threading.main_thread().ident
    assert main is not None

    def stopper() -> None:
        if started.wait(60):
            signal.pthread_kill(main, sig)
        if not done.wait(60):  # the signal did not stop it: end the test, as a failure
            late.set()
            for c in opened:
                c.interrupt()

    thread = threading.Thread(target=stopper)
    thread.start()
    try:
        # When the signal comes while the statement runs (as the command's own handlers take it)
        with stopping.sigterm_raises(), pytest.raises(KeyboardInterrupt) as stopped, engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO scratch VALUES (1)")
            conn.exec_driver_sql("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) "
                                 "SELECT count(*) FROM n WHERE (SELECT started()) IS NULL")  # fmt: skip
    finally:
        done.set()
        started.set()
        thread.join()
    # Then the statement stops at the signal, raising the stop of that signal (no database error in its place)
    assert not late.is_set()
    assert stopping.stop_signal(stopped.value) is sig
    # and the transaction is rolled back whole, the database open to the next writer
    try:
        with engine.begin() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM scratch").scalar() == 0
            conn.exec_driver_sql("INSERT INTO scratch VALUES (2)")
    finally:
        engine.dispose()


RENDERING_PARENT = """
import sys
from pathlib import Path
from worker.adapters.render_worker import TimeLimitedRenderer
from worker.domain import Locale
renderer = TimeLimitedRenderer(Path(sys.argv[1]), timeout_seconds=3600)
print(renderer._helper().pid, flush=True)
renderer.render("demo", Locale.ID, {})
"""


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (Linux: one ended but not yet reaped is a zombie, "Z")."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_render_helper_ends_with_the_process_that_started_it_even_mid_render(tmp_path: Path) -> None:
    # Given a process rendering, in its helper, a template that never ends (within a time limit of an hour)
    for name, text in {"demo/id/subject.txt": "Halo", "demo/id/body.html": "<p>Halo</p>",
                       "demo/id/body.txt": NEVER_ENDS + "Halo"}.items():  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    parent = subprocess.Popen([sys.executable, "-c", RENDERING_PARENT, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    assert parent.stdout is not None
    helper = int(parent.stdout.readline())
    try:
        idle = cpu_seconds(helper)  # started, waiting for the request: then rendering, it keeps using the processor
        _wait_for(lambda: cpu_seconds(helper) > idle + 1, parent, "the render")
        # When that process is killed (SIGKILL: nothing of its own runs, to stop the helper)
        parent.kill()
        parent.communicate()
        # Then the helper ends too, not rendering on for the hour (or for ever) with nobody to answer
        deadline = time.monotonic() + 60
        while _running(helper):
            assert time.monotonic() < deadline, "the render helper outlived the process that started it"
            time.sleep(0.05)
    finally:
        if _running(helper):
            os.kill(helper, signal.SIGKILL)


def _state(pid: int) -> str:
    """Process ``pid``'s state letter (Linux): R running, S sleeping, T stopped, Z ended…"""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (Linux: the SigCgt mask)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (sig.value - 1)))


LOADING = ("sqlalchemy", "pydantic_core")
"""Libraries kembali's modules load (C extensions mapped into the process once imported), Python's own do not."""


def _frozen_while_loading(child: subprocess.Popen[str]) -> bool:
    """Stop ``child`` (SIGSTOP) at the first look that finds it loading kembali's modules (one of ``LOADING`` is
    mapped), however fast or slow the machine: the process is looked at only while stopped, so what is seen is
    what it is when the signal comes. Returns whether it has a SIGTERM handler there."""
    deadline = time.monotonic() + 60
    while True:
        assert child.poll() is None and time.monotonic() < deadline, "the command ended before it loaded kembali"
        os.kill(child.pid, signal.SIGSTOP)
        while _state(child.pid) not in "Tt":
            time.sleep(0.0005)
        maps = Path(f"/proc/{child.pid}/maps").read_text()
        if any(f"/{library}/" in maps for library in LOADING):
            return _catches(child.pid, signal.SIGTERM)
        os.kill(child.pid, signal.SIGCONT)
        # let it run a little before the next look: stopped again at once, a child the scheduler had not run yet
        # (two cores, other work) made no progress from one look to the next, and never reached kembali's modules
        time.sleep(0.002)


def _sigterm_while_loading(child: subprocess.Popen[str]) -> tuple[bool, str]:
    """SIGTERM to ``child`` while Python imports kembali's modules (``_frozen_while_loading``), and its stderr once
    it has ended: (whether it had a SIGTERM handler then, stderr)."""
    try:
        caught = _frozen_while_loading(child)
        os.kill(child.pid, signal.SIGTERM)
        os.kill(child.pid, signal.SIGCONT)
        _stdout, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    return caught, stderr


@pytest.mark.parametrize("how", ["kembali", "python -m worker"])
def test_a_sigterm_while_python_loads_kembali_says_so_as_later_with_exit_code_143(tmp_path: Path, how: str) -> None:
    # Given a command that, once loaded, waits (its config file is a FIFO nobody writes to), started as the console
    # script or as `python -m worker`
    config = tmp_path / "config.toml"
    os.mkfifo(config)
    start = [str(Path(sys.executable).parent / "kembali")] if how == "kembali" else [sys.executable, "-m", "worker"]
    for _ in range(3):
        child = subprocess.Popen([*start, "--config", str(config), "stats"], cwd=tmp_path, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
        # When SIGTERM comes while Python is still importing kembali's modules (the first half second: before the
        # command has parsed its arguments and set its own handlers)
        caught, stderr = _sigterm_while_loading(child)
        # Then kembali already had its handler there, and it stops as a SIGTERM stops it later: one line naming
        # the signal and exit code 143, not killed without a word
        assert caught, "no SIGTERM handler while kembali's modules load"
        assert child.returncode == 128 + signal.SIGTERM.value, (child.returncode, stderr)
        assert "Traceback" not in stderr, stderr
        assert stderr.splitlines()[-1] in ("kembali: stopped by SIGTERM", "kembali stats: stopped by SIGTERM"), stderr


def test_a_sigterm_while_python_loads_the_daemon_stops_its_start_up_with_exit_code_0(tmp_path: Path) -> None:
    # Given the daemon's command, started as a service manager starts it (the console script)
    site = make_site(tmp_path / "shop")
    env = {**os.environ, "KEMBALI_LINK_SECRET": LINK_SECRET}
    child = subprocess.Popen([str(Path(sys.executable).parent / "kembali"), "--config", str(site.config),
                              "--log-level", "info", "run"], cwd=site.folder, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    # When the service manager stops it while Python is still importing kembali's modules
    caught, stderr = _sigterm_while_loading(child)
    # Then its start-up takes that stop as a later one during start-up: it says so and exits 0, as systemd expects
    assert caught, "no SIGTERM handler while kembali's modules load"
    assert child.returncode == 0, stderr
    assert "daemon_stopped during=start-up signal=SIGTERM" in stderr, stderr


@pytest.mark.postgres
@pytest.mark.parametrize("sig", STOPS, ids=lambda s: s.name)
def test_run_once_with_json_logs_stopped_during_its_start_up_says_so_in_one_json_line(
    tmp_path: Path, pg_migrated_url: str, sig: signal.Signals
) -> None:
    # Given a service's `run --once` whose config asks for JSON logs (a collector reads its stderr), and a PostgreSQL
    # ledger whose schema table another session locks, so that its start-up (the schema check) waits
    site = make_site(tmp_path / "shop")
    site.config.write_text(site.config.read_text(encoding="utf-8")
                           .replace('"sqlite:///kembali.db"', f'"{pg_migrated_url}"')
                           .replace("[logging]\n", '[logging]\nformat = "json"\n'), encoding="utf-8")  # fmt: skip
    engine = db.create_engine(pg_migrated_url)
    try:
        with engine.connect() as locker:
            locker.execute(sa.text("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE"))
            holder = locker.execute(sa.text("select pg_backend_pid()")).scalar_one()
            child = _start(["--config", str(site.config), "run", "--once"], site.folder)

            def waiting() -> bool:
                with engine.connect() as probe:
                    return bool(probe.execute(sa.text(
                        "select count(*) from pg_stat_activity where :holder = any(pg_blocking_pids(pid))"),
                        {"holder": holder}).scalar())  # fmt: skip

            # When the signal comes while it waits
            _wait_for(waiting, child, "its schema check")
            _stdout, stderr = _stop(child, sig)
            locker.rollback()
    finally:
        engine.dispose()
    # Then it stops with the exit code the shell expects, and says so in one JSON line, as its other lines are: it
    # was the plain "kembali run: stopped by SIGTERM", a line the collector could not parse
    assert child.returncode == 128 + sig.value, stderr
    (line,) = stderr.splitlines()
    said = json.loads(line)
    assert (said["event"], said["signal"], said["exit_code"]) == ("command_stopped", sig.name, 128 + sig.value), said
