"""Engines and migrations: the only place that knows SQLite from PostgreSQL.

SQLite runs in WAL mode with a busy timeout, and every transaction begins with
``BEGIN IMMEDIATE``: a writer takes the database lock up front, so a claim's
select-then-update cannot interleave with another process's. A transaction
that only reads may say so (``reading``) and take no lock. PostgreSQL uses
row locks (``FOR UPDATE SKIP LOCKED``) instead; see ``store.Store.claim``.

Before the process's first SQLite connection, SQLite's memory statistics are
turned off (``without_sqlite_memstatus``), as SQLite's own list of recommended
compile-time options advises: with them on, every allocation takes one
process-wide mutex, which made planning's reads 1.7 times as slow on one thread
and kept two threads from running at once.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import sqlite3
import threading
import urllib.parse
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from worker import log, stopping
from worker.config import DATABASE_URL_FORMS, DatabaseSettings, Settings
from worker.core.audiences import message_id_for
from worker.errors import ConfigError, SchemaError

SQLITE_BUSY_TIMEOUT_MS = 30_000
PG_CONNECT_TIMEOUT_SECONDS = 10
"""libpq's ``connect_timeout`` unless the URL sets its own (``?connect_timeout=30``): without one, a database host
that does not answer (a dropped route, a listener that never speaks) held each new connection for minutes, or for
ever, and every thread that asked for one with it."""
PG_COMMAND_CONNECT_TIMEOUT_SECONDS = 3
"""``connect_timeout`` for the commands an operator waits on (``check``, ``db status``, ``ledger``, ``stats``,
``insights``, ``suppress``) unless the URL sets its own: with the daemon's 10 s, ``kembali check`` on a host that did
not answer took 12.6 s, ``db status`` 11.2 s, and said only "connection timeout expired". They now give up after 3 s
(about 5 s in all for check) and say which host and port did not answer (``connect_failure``). Enough for a TCP, TLS
and password handshake across a continent; the daemon, ``run``, ``import`` and ``db upgrade`` (a deploy's step before
the daemon, on a host that may be waking up) keep the longer wait."""
PG_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
"""TCP keepalives on every PostgreSQL connection, each unless the URL sets its own: a host that goes silent once
connected (a failover that moved its address, a dropped route) is given up after about a minute idle, where the
system's defaults (two hours idle) left a pooled connection, and the thread waiting on it, hanging that long."""
LOCK_NOT_AVAILABLE = "55P03"
"""PostgreSQL's SQLSTATE for a statement cancelled by ``lock_timeout`` (also ``NOWAIT``'s, which Kembali does not
use): the lock's holder is left alone, the waiter's transaction is aborted, and the same work tried again later
succeeds once the holder is gone."""
IDLE_IN_TRANSACTION_TIMEOUT = "25P03"
"""PostgreSQL's SQLSTATE for a session it ended because it sat idle in a transaction past
``idle_in_transaction_session_timeout``: the transaction rolled back, the connection closed."""
_SQLITE_CONFIG_MEMSTATUS = 9
"""``sqlite3_config`` verb: memory statistics on (1) or off (0); SQLite's default is on."""
_memstatus_lock = threading.Lock()
_memstatus_decided: bool | None = None


def without_sqlite_memstatus() -> bool:
    """Turn SQLite's memory statistics off in this process, once; True when they are off.

    The statistics guard every allocation with one mutex for the whole process (``SQLITE_DEFAULT_MEMSTATUS``
    in SQLite's recommended compile-time options): planning's read of a million customers took 1.2 s instead
    of 0.7, and two threads' reads took longer together than one after the other. Python's ``sqlite3`` is
    usually built with them on and offers no switch, so this calls ``sqlite3_config`` on the library its module
    is linked to, between ``sqlite3_shutdown`` and ``sqlite3_initialize``. SQLite allows that only while
    nothing is open, so it is done only when the statistics, which are on, count no memory in use at all (no
    connection anywhere in the process: this runs before ``create_engine`` opens any, under a lock, with the
    GIL held during each call). A library built with them off is left alone (True); one whose statistics
    cannot be read, or has memory in use, or cannot be reached from here, is left as it is (False), and works
    as before, only slower."""
    global _memstatus_decided
    with _memstatus_lock:
        if _memstatus_decided is None:
            _memstatus_decided = _memstatus_off()
        return _memstatus_decided


def _memstatus_off() -> bool:
    try:
        import _sqlite3

        lib = ctypes.PyDLL(_sqlite3.__file__)  # PyDLL: the GIL stays held, no Python thread opens SQLite meanwhile
        if lib.sqlite3_compileoption_used(b"DEFAULT_MEMSTATUS=0"):
            return True  # built with them off: sqlite3_memory_used() would say 0 whatever is open
        lib.sqlite3_memory_used.restype = ctypes.c_int64
        if lib.sqlite3_memory_used() != 0:
            log.event("sqlite_memstatus_kept", logging.DEBUG, reason="a connection was open")
            return False
        if lib.sqlite3_shutdown() != 0:
            return False
        lib.sqlite3_config.argtypes = [ctypes.c_int]  # variadic: the fixed argument declared, the rest as C ints
        configured: bool = lib.sqlite3_config(_SQLITE_CONFIG_MEMSTATUS, 0) == 0
        if lib.sqlite3_initialize() != 0:  # pragma: no cover - the initialisation Python's import did, again
            raise RuntimeError("sqlite3_initialize failed after turning memory statistics off")
        return configured
    except (ImportError, OSError, AttributeError) as e:  # another platform's build: SQLite as it comes
        log.event("sqlite_memstatus_kept", logging.DEBUG, reason=f"{type(e).__name__}: {e}")
        return False


_USER_PART = re.compile(r"^[^:/]*(?::[^@]*)?@")
"""The user part of a URL's authority as SQLAlchemy reads it (a user name without : or /, a password without @)."""


def check_url(settings: Settings) -> None:
    """Raise ConfigError naming ``database.url`` unless the engine can use it: every command checks it right after
    the config is loaded, so a mistake stops it there, by name, rather than as a traceback where the first engine
    is made. The URL itself is not shown: it may hold a password."""
    forms, where = DATABASE_URL_FORMS, f"{settings.source}: 'database.url'"
    # SQLAlchemy reads user:pw@rest@host as the password pw and the host (or a port) rest@host: said as such
    if "@" in (_USER_PART.sub("", settings.database.url.split("://", 1)[-1], count=1).split("/", 1)[0]):
        raise ConfigError(f"{where} has an @ after the one that ends the user part: a password (or user name) with "
                          "@ in it must be percent-encoded as %40 (and :, /, % as %3A, %2F, %25)")
    try:
        url = sa.make_url(settings.database.url)
        if url.port is not None and not 0 < url.port < 65536:
            raise ValueError(url.port)
        dialect = url.get_dialect()
    except ValueError:
        raise ConfigError(f"{where} has a host and port that cannot be read (the port a number from 1 to 65535): "
                          f"it must be {forms}") from None
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError):
        raise ConfigError(f"{where} is not a URL SQLAlchemy can read: it must be {forms} (a password with @, :, / "
                          "or % in it percent-encoded: %40, %3A, %2F, %25)") from None
    if url.get_backend_name() == "sqlite":
        if url.host:
            raise ConfigError(f"{where} has one slash too few: an SQLite file is sqlite:///{url.host} (three "
                              "slashes, relative to the config file's folder) or sqlite:////absolute/path.db (four)")
        if url.database in (None, "", ":memory:"):
            raise ConfigError(f"{where} names no database file (an SQLite database in memory is gone when the "
                              f"command ends): it must be {forms}")
        if url.query:  # the driver's own arguments: a timeout not a number was a traceback, others a warning
            query = settings.database.url.partition("?")[2]
            raise ConfigError(f"{where} has a query ({'?' + query!r}): an SQLite URL takes none (Kembali sets its "
                              "own timeout): write sqlite:///path.db")
    elif dialect.driver != "psycopg" or dialect.is_async:
        raise ConfigError(f"{where} asks for the PostgreSQL driver {url.drivername!r}: Kembali speaks to PostgreSQL "
                          "through psycopg 3 (synchronous), which it installs; write postgresql+psycopg://")
    else:
        try:  # libpq's host= and port= in the query, read as the engine reads them where it is made
            dialect().create_connect_args(url)
        except sa.exc.ArgumentError as exc:  # it names hosts and ports, never the password
            raise ConfigError(f"{where} has a host or port in its query that cannot be read ({exc}): it must be "
                              f"{forms}") from None


@dataclass(frozen=True)
class SessionLimits:
    """The server-side timeouts of a PostgreSQL engine's sessions (``[database]``), in seconds; 0 is none."""

    lock_timeout_seconds: float = DatabaseSettings.lock_timeout_seconds
    idle_in_transaction_timeout_seconds: float = DatabaseSettings.idle_in_transaction_timeout_seconds

    def options(self, given: str) -> str:
        """libpq's ``options`` (the server's ``-c name=value`` settings at session start): these, then ``given``,
        the URL's own ``?options=``, which the server applies after them, so what the URL says wins."""
        ours = (f"-c lock_timeout={round(self.lock_timeout_seconds * 1000)} "
                f"-c idle_in_transaction_session_timeout={round(self.idle_in_transaction_timeout_seconds * 1000)}")
        return f"{ours} {given}".strip()


_LIMITS: weakref.WeakKeyDictionary[Engine, SessionLimits] = weakref.WeakKeyDictionary()
"""Each PostgreSQL engine's ``SessionLimits``, for ``note_failure``."""
_CONNECT_TIMEOUTS: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()
"""Each PostgreSQL engine's ``connect_timeout`` (the URL's, else ours), for ``connect_failure``."""


def engine_for(settings: Settings, *, connect_timeout_seconds: int = PG_CONNECT_TIMEOUT_SECONDS) -> Engine:
    """``create_engine`` for the config's database, with its ``[database]`` settings: every engine a command or the
    daemon opens on it comes from here (an operator's command's from ``command_engine``)."""
    d = settings.database
    return create_engine(settings.database_url, SessionLimits(d.lock_timeout_seconds,
                                                              d.idle_in_transaction_timeout_seconds),
                         connect_timeout_seconds=connect_timeout_seconds)  # fmt: skip


def command_engine(settings: Settings) -> Engine:
    """``engine_for`` for a command an operator waits on: a PostgreSQL host that does not answer is given up after
    ``PG_COMMAND_CONNECT_TIMEOUT_SECONDS``."""
    return engine_for(settings, connect_timeout_seconds=PG_COMMAND_CONNECT_TIMEOUT_SECONDS)


def create_engine(
    url: str, limits: SessionLimits | None = None, *, connect_timeout_seconds: int = PG_CONNECT_TIMEOUT_SECONDS
) -> Engine:
    """An engine with Kembali's transaction discipline for the URL's dialect. On PostgreSQL every session starts
    with ``limits`` (the defaults when None): a statement waiting on another session's lock gives up after
    ``lock_timeout_seconds``, and a session left idle in a transaction (its process stopped, its host suspended or
    cut off) is ended by the server, its locks released, after ``idle_in_transaction_timeout_seconds``; either is
    logged when this process meets it (``note_failure``)."""
    if url.startswith("sqlite"):
        without_sqlite_memstatus()
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, hide_parameters=True)
        opened = False

        @sa.event.listens_for(engine, "do_connect")
        def _on_do_connect(_dialect: Any, _record: Any, cargs: list[Any], cparams: dict[str, Any]) -> None:
            # once the file is opened, a new connection of the pool opens that path or fails: SQLite made an empty
            # database there when the file was removed, in which the daemon wrote and a restart planned every
            # email again
            if opened and cargs and cargs[0] not in ("", ":memory:") and not cparams.get("uri"):
                cargs[0] = f"file:{urllib.parse.quote(str(cargs[0]))}?mode=rw"
                cparams["uri"] = True

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            nonlocal opened
            opened = True
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
            cur.execute("PRAGMA foreign_keys = ON")
            cur.close()
            # the Message-IDs preview shows: the pure function itself (PostgreSQL computes the same value with
            # its own sha256(); see adapters.plan_sql)
            dbapi_conn.create_function("kembali_message_id", 2, _noting_failures(message_id_for), deterministic=True)

        @sa.event.listens_for(engine, "before_cursor_execute")
        def _on_execute(conn: sa.Connection, *_args: Any) -> None:
            # in the main thread only, where signal handlers run: elsewhere each call would wait for the GIL
            main = threading.current_thread() is threading.main_thread()
            raw = conn.connection.driver_connection
            if raw is not None:
                raw.set_progress_handler(_let_signals_in if main else None, SQLITE_PROGRESS_STEPS)
            if main:
                stopping.take_raised_stop()  # one before this statement is not its own
                _callback_failures.clear()

        @sa.event.listens_for(engine, "handle_error")
        def _on_error(context: sa.engine.ExceptionContext) -> BaseException | None:
            return _stop_lost_in_query(context.original_exception)

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            options = conn.get_execution_options()
            if options.get(_READ_ONLY):
                conn.exec_driver_sql("BEGIN")
            else:
                _begin_writing(conn, options.get(_WAITING))

        return engine
    query = sa.make_url(url).query
    given = {key.lower() for key in query}
    defaults = {"connect_timeout": connect_timeout_seconds, **PG_KEEPALIVES}
    connect_args: dict[str, Any] = {key: value for key, value in defaults.items() if key not in given}
    limits = limits or SessionLimits()
    # libpq takes $PGOPTIONS only when no options are given, and ours always are: the variable's go after ours
    # (winning over the config, as the URL's do), unless the URL has its own, which replace it as libpq has it
    url_options = query.get("options", os.environ.get("PGOPTIONS", ""))
    connect_args["options"] = limits.options(url_options if isinstance(url_options, str) else " ".join(url_options))
    engine = sa.create_engine(url, connect_args=connect_args, pool_pre_ping=True, pool_size=5, max_overflow=5,
                              hide_parameters=True)
    _LIMITS[engine] = limits
    _CONNECT_TIMEOUTS[engine] = str(query.get("connect_timeout", connect_timeout_seconds))

    @sa.event.listens_for(engine, "handle_error")
    def _note_timeouts(context: sa.engine.ExceptionContext) -> None:
        if context.engine is not None:
            note_failure(context.engine, context.original_exception, context.statement)

    return engine


def note_failure(engine: Engine, exc: BaseException, statement: str | None) -> None:
    """Log, by name, a PostgreSQL failure of the session timeouts: ``db_lock_timeout`` (a statement gave up
    waiting for another session's lock: what it ran and what it waited for) or ``db_idle_in_transaction_timeout``
    (the server ended this session, idle in a transaction too long). Called for every failed statement of the
    engine's, and by the group commit for its driver statements; others are left to the caller."""
    sqlstate = getattr(exc, "sqlstate", None)
    limits = _LIMITS.get(engine, SessionLimits())
    if sqlstate == LOCK_NOT_AVAILABLE:
        context = (getattr(getattr(exc, "diag", None), "context", None) or "").strip()
        # a row's lock: 'while locking tuple (0,1) in relation "rate_limit"'; a table's or an advisory one: nothing
        waiting_for = context.splitlines()[0] if context else "a table or advisory lock (the server gives no more)"
        log.event("db_lock_timeout", logging.WARNING, statement=_opening(statement), waiting_for=waiting_for,
                  lock_timeout_seconds=limits.lock_timeout_seconds, setting="database.lock_timeout_seconds")
    elif sqlstate == IDLE_IN_TRANSACTION_TIMEOUT:
        log.event("db_idle_in_transaction_timeout", logging.WARNING, statement=_opening(statement),
                  idle_in_transaction_timeout_seconds=limits.idle_in_transaction_timeout_seconds,
                  setting="database.idle_in_transaction_timeout_seconds",
                  note="the server ended this session: its transaction was rolled back and its locks released")


def _opening(statement: str | None) -> str:
    """A statement's first words, on one line (its values are parameters: never in it)."""
    words = " ".join((statement or "").split())
    return words if len(words) <= 80 else words[:80] + "…"


SQLITE_BUSY_SLICE_MS = 200
"""The main thread waits for SQLite's write lock in slices of this long, the busy timeout in all (``_begin_writing``):
a stop signal waits at most this long."""


_WAITING = "kembali_waiting"
"""The execution option of a connection whose ``BEGIN IMMEDIATE`` calls it (no arguments) once, when its first slice
finds the write lock held: ``kembali db upgrade`` says what it waits for, as on PostgreSQL."""


def _begin_writing(conn: sa.Connection, waiting: Callable[[], None] | None = None) -> None:
    """``BEGIN IMMEDIATE``: the database's write lock, waited for up to the busy timeout while another connection
    holds it. SQLite waits sleeping between its tries, in C, calling no progress handler, so that a Ctrl-C or SIGTERM
    to a command waiting there (its handler runs once SQLite returns) waited out the whole timeout, 30 seconds,
    before the command stopped. In the main thread, where handlers run, it waits in slices, and the handler runs
    between two; elsewhere, as SQLite does. ``waiting`` (main thread only) is called once the first slice found the
    lock held."""
    raw = conn.connection.driver_connection
    if threading.current_thread() is not threading.main_thread() or raw is None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        return
    slice_ms = min(SQLITE_BUSY_SLICE_MS, SQLITE_BUSY_TIMEOUT_MS)
    raw.execute(f"PRAGMA busy_timeout = {slice_ms}")
    try:
        for _ in range(SQLITE_BUSY_TIMEOUT_MS // slice_ms - 1):
            try:
                raw.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_BUSY:
                    break  # (another failure: said by the last try, as any statement's)
                if waiting is not None:
                    waiting()
                    waiting = None
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # the last slice: a lock still held fails as it did after 30 s
    finally:
        with suppress(sqlite3.Error):  # (a connection that failed otherwise keeps its failure)
            raw.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")


SQLITE_PROGRESS_STEPS = 10_000
"""How often SQLite calls ``_let_signals_in`` in a query: every so many steps of its virtual machine (a fraction of
a millisecond; the call costs a microsecond)."""

_LOST_IN_CALLBACK = frozenset({"interrupted", "user-defined function raised exception"})
"""What the sqlite3 module says when a callback it made raised (the exception itself is dropped)."""

_callback_failures: list[BaseException] = []
"""What ``_noting_failures``' function raised in the main thread's statement under way."""


def _let_signals_in() -> int:
    """SQLite's progress handler, which lets a stop signal stop a query. A long query runs in C, in the main
    thread, where Python runs a signal's handler only at its next instruction: a Ctrl-C or SIGTERM waited for the
    query's end (minutes, over a large ledger). Being Python, this call is where the handler runs; what it
    raises fails the query ("interrupted") and ``_stop_lost_in_query`` raises the stop instead. 0: go on."""
    return 0


def _noting_failures(function: Any) -> Any:
    """``function``, for SQLite to call in a query, noting what it raises (which SQLite drops)."""

    def noted(*args: Any) -> Any:
        try:
            return function(*args)
        except BaseException as exc:
            if threading.current_thread() is threading.main_thread():
                _callback_failures.append(exc)
            raise

    return noted


def _stop_lost_in_query(exc: BaseException) -> BaseException | None:
    """The stop to raise in place of ``exc``, an SQLite statement's failure, when a stop signal's handler raised
    it in a callback of the statement (SQLite then drops it and fails the statement): ``stopping.raise_stop``'s,
    noted; one raised in our function, noted too; else, when the statement failed as a callback's failure does
    and none of ours failed, Python's own SIGINT handler's ``KeyboardInterrupt``, raised at the first instruction
    of a callback and noted nowhere. None: ``exc`` stands."""
    if threading.current_thread() is not threading.main_thread():
        return None
    raised = stopping.take_raised_stop()
    failed = _callback_failures[-1] if _callback_failures else None
    _callback_failures.clear()
    if raised is not None and raised is not exc:
        return raised
    if isinstance(failed, KeyboardInterrupt):
        return failed
    if failed is None and isinstance(exc, sqlite3.OperationalError) and str(exc) in _LOST_IN_CALLBACK:
        return KeyboardInterrupt()
    return None


_READ_ONLY = "kembali_read_only"


@contextmanager
def reading(engine: Engine, *, snapshot: bool = False) -> Iterator[sa.Connection]:
    """A transaction that only reads. On SQLite a deferred ``BEGIN`` rather than ``BEGIN IMMEDIATE``: it
    takes no write lock, so it runs beside the writer and beside other readers (WAL); writing in it fails.
    ``snapshot``: its statements all see the database as its first one did (what SQLite's WAL gives a transaction;
    on PostgreSQL ``REPEATABLE READ``, where each statement would otherwise see what was committed before it)."""
    with engine.connect() as conn:
        conn.execution_options(**{_READ_ONLY: True})
        if snapshot and engine.dialect.name == "postgresql":
            conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            yield conn


def message_id_sql(dialect: str, key: Any, domain: str) -> Any:
    """``core.audiences.message_id_for(key, domain)`` in SQL: PostgreSQL's own sha256(), SQLite's registered
    pure function."""
    if dialect == "postgresql":
        digest = sa.func.encode(sa.func.sha256(sa.func.convert_to(key, "UTF8")), "hex", type_=sa.String)
        return sa.literal("<") + sa.func.substr(digest, 1, 32, type_=sa.String) + sa.literal(f".kembali@{domain}>")
    return sa.func.kembali_message_id(key, domain, type_=sa.String)


MAX_BIGINT = 2**63 - 1
"""The most a BIGINT holds: an order's total, a customer's ``total_spent_minor``."""
_LOW_BITS = 32
_LOW: Any = sa.literal_column(str(2**_LOW_BITS - 1))
_SHIFT: Any = sa.literal_column(str(_LOW_BITS))


def sum_halves(amount: Any) -> tuple[Any, Any]:
    """``sum(amount)`` over amounts from 0 to ``MAX_BIGINT`` as two sums that cannot overflow, on both dialects:
    of each amount's upper 31 bits and of its lower 32 (exact for fewer than 2^31 amounts; ``joined`` puts them
    together). SQLite's sum() fails the whole statement with "integer overflow" past a BIGINT (its total() is a
    float, inexact past 2^53), PostgreSQL's cast back to bigint with "bigint out of range"; a hostile file's
    amounts, or several customers' together, can add up that far."""
    return (
        sa.func.coalesce(sa.func.sum(amount.op(">>")(_SHIFT)), 0),
        sa.func.coalesce(sa.func.sum(amount.op("&")(_LOW)), 0),
    )


def joined(high: Any, low: Any) -> int:
    """The sum whose halves ``sum_halves`` gave (a Python int: any size)."""
    return (int(high or 0) << _LOW_BITS) + int(low or 0)


def bigint_sum(dialect: str, amount: Any) -> Any:
    """``coalesce(sum(amount), 0)`` over amounts from 0 to ``MAX_BIGINT``, as a BIGINT: ``MAX_BIGINT`` when the
    sum is past it, where sum() would fail the statement (``sum_halves``)."""
    if dialect == "postgresql":  # sum(bigint) is numeric there: exact whatever its size
        return sa.cast(sa.func.least(sa.func.coalesce(sa.func.sum(amount), 0), MAX_BIGINT), sa.BigInteger)
    high, low = sum_halves(amount)
    carried = (high + low.op(">>")(_SHIFT)).self_group()  # the upper bits, the lower ones' carry added
    return sa.type_coerce(sa.case(
        (carried > MAX_BIGINT >> _LOW_BITS, sa.literal_column(str(MAX_BIGINT))),
        else_=carried.op("<<")(_SHIFT).self_group() + low.op("&")(_LOW).self_group(),
    ), sa.BigInteger)  # fmt: skip


def dialect_insert(engine: Engine, table: sa.Table) -> Any:
    """``INSERT`` in the engine's dialect, with its ``on_conflict_do_nothing`` / ``on_conflict_do_update``."""
    return (postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert)(table)


def insert_ignore(engine: Engine, table: sa.Table) -> Any:
    """``INSERT … ON CONFLICT DO NOTHING`` in the engine's dialect."""
    return dialect_insert(engine, table).on_conflict_do_nothing()


def _alembic_config(engine: Engine) -> Config:
    """Alembic's settings for the engine's database. Alembic keeps them in a ConfigParser, which reads ``%`` as the
    start of an interpolation: a percent-encoded password (``p%40ss`` for ``p@ss``) or a folder named ``100%`` made
    every ``db`` command fail with a traceback that printed the whole URL, password and all; ``%%`` is a ``%``."""
    cfg = _scripts_config()
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def _scripts_config() -> Config:
    """Alembic's settings naming the migrations as they are installed (``%%`` for a ``%`` in the path)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("worker") / "migrations").replace("%", "%%"))
    return cfg


def newest_revision() -> str:
    """This code's newest schema revision, as its migrations are installed now (no database is read)."""
    head = ScriptDirectory.from_config(_scripts_config()).get_current_head()
    assert head is not None
    return head


def known_revisions(engine: Engine) -> frozenset[str]:
    """Every revision this code has, as its migrations are installed now: what a long-running process reads once,
    at its start, to tell a newer schema by later (``is_newer_than_this`` reads them anew: installed over the
    running code, a newer Kembali's would count as this one's)."""
    scripts = ScriptDirectory.from_config(_alembic_config(engine))
    return frozenset(script.revision for script in scripts.walk_revisions())


def is_newer_than_this(engine: Engine, revision: str | None) -> bool:
    """Whether ``revision`` (the database's) is one this code does not have: a newer Kembali's, run on another
    host (or after this one was downgraded)."""
    return revision is not None and revision not in known_revisions(engine)


KEMBALIS_OWN = frozenset({"message", "attempt", "suppression"})
"""Tables every schema of Kembali's has: a database whose revision this code does not know, without them, is
another program's that migrates with Alembic too (its ``alembic_version``), not a newer Kembali's."""


def is_another_programs(engine: Engine) -> bool:
    """Whether the database holds none of ``KEMBALIS_OWN``: with a revision this code does not know, another
    program's (the shop's own application, migrated with Alembic)."""
    return not KEMBALIS_OWN & set(tables_in_the_way(engine))


def newer_schema(engine: Engine, current: str, head: str) -> SchemaError:
    """The error for a database whose schema is newer than this code's: ``kembali db upgrade`` cannot help (it was
    a traceback), and running on it could write rows the newer code does not expect. A database with none of
    Kembali's tables is another program's instead (it was taken for a newer Kembali's: "install the newer
    kembali")."""
    if is_another_programs(engine):
        return SchemaError(f"the database {describe(engine)} is another program's: its alembic_version holds "
                           f"{current}, not a revision of Kembali's, and none of Kembali's tables are there; point "
                           "database.url at a database of Kembali's own (nothing was changed)")  # fmt: skip
    return SchemaError(f"the database {describe(engine)} is at schema {current}, newer than this kembali (its newest "
                       f"is {head}): a newer kembali has upgraded it; install the newer kembali on this host "
                       "(nothing was changed)")  # fmt: skip


def current_revision(engine: Engine) -> str | None:
    with reading(engine) as conn:  # no SQLite write lock: a read-only command must not wait for a long writer
        return MigrationContext.configure(conn).get_current_revision()


MIGRATION_LOCK = 1265462379
"""The PostgreSQL advisory lock (``pg_advisory_xact_lock(MIGRATION_LOCK, 0)``) a migration holds: two hosts running
``kembali db upgrade`` at once migrate one after the other (the DDL of two transactions interleaving failed the
second one with a traceback: ``index "ix_customer_email" does not exist``). Beside ``store.MAILBOX_LOCKS`` and
``plan_sql.PLAN_LOCKS``."""


def upgrade(engine: Engine, *, waiting: Callable[[], None] | None = None,
            migrating: Callable[[int, int, str, str], None] | None = None,
            noting: Callable[[str], None] | None = None) -> tuple[str | None, str]:
    """Create or migrate the schema to the newest revision; returns (before, after).

    ``migrating(n, total, revision, title)`` is called before each revision runs: the n-th of the ``total`` this
    upgrade runs, and the first line of its docstring (one revision may take minutes on a big table).

    On PostgreSQL the migration holds ``MIGRATION_LOCK``: another ``kembali db upgrade`` under way is waited for
    (``waiting`` is called first), however long it takes (its statements give up on their own locks after
    ``database.lock_timeout_seconds``), and the revision is read again once the lock is held, so the second finds
    nothing left to do. SQLite's ``BEGIN IMMEDIATE`` does the same for a file (``waiting`` is called when its
    first try finds the write lock held), up to the busy timeout. A database newer than this code
    (``is_newer_than_this``) raises SchemaError and is left as it is.

    On SQLite the migrations run with foreign key checks off: a revision that changes a column there
    rebuilds its table (copies it, drops the old one, renames the copy), and with the checks on, dropping
    ``message`` under its ``attempt`` rows failed. SQLite's ``foreign_key_check`` then confirms, before the
    commit, that every reference still holds (a read of every table that refers to another: only when a
    revision ran on a database that had one). References broken before the migration (a customer deleted in the
    sqlite3 shell, which checks no foreign keys unless told to) do not stop it: the migration keeps them as they
    were, and ``noting`` is told of them."""
    before, head = current_revision(engine), newest_revision()
    if before == head:
        return before, head
    if is_newer_than_this(engine, before):
        raise newer_schema(engine, str(before), head)
    cfg = _alembic_config(engine)
    with writing_without_foreign_keys(engine, waiting) as conn:  # (SQLite: while another holds the write lock)
        if engine.dialect.name == "postgresql":
            _take_migration_lock(conn, waiting)
        before = MigrationContext.configure(conn).get_current_revision()  # another host's upgrade may have run
        if before == head:
            return before, head
        in_the_way = _tables_in_the_way(conn) if before is None else []
        if in_the_way:  # the first CREATE TABLE failed on one of them: a traceback on PostgreSQL
            raise tables_in_the_way_error(engine, in_the_way)
        if is_newer_than_this(engine, before):
            raise newer_schema(engine, str(before), head)
        checking = engine.dialect.name == "sqlite" and before is not None  # a new database has no rows to check
        broken_before = set(conn.exec_driver_sql("PRAGMA foreign_key_check").all()) if checking else set()
        cfg.attributes["connection"] = conn
        if migrating is not None:
            cfg.attributes["on_version_apply"] = _announcing(cfg, before, migrating)
        try:
            command.upgrade(cfg, "head")
        except Exception as exc:
            stop = _stop_behind(exc)
            if stop is not None:
                raise stop from None
            raise
        if checking:
            broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
            new = [row for row in broken if tuple(row) not in broken_before]
            if new:
                table, rowid, parent, _ = new[0]
                many = f"{len(new)} references" if len(new) > 1 else "1 reference"
                raise SchemaError(f"the migration of {describe(engine)} would break {many} (first: {table} row "
                                  f"{rowid} would name a missing {parent}); nothing was changed")
            if broken and noting is not None:
                table, rowid, parent, _ = broken[0]
                many, them = (f"{len(broken)} broken references", "them as they were") if len(broken) > 1 else (
                    "1 broken reference", "it as it was")
                noting(f"{describe(engine)} had {many} before the migration (first: {table} row {rowid} names a "
                       f"missing {parent}, deleted with foreign key checks off, as the sqlite3 shell has them); the "
                       f"migration left {them}")
    return before, head


def tables_in_the_way_error(engine: Engine, in_the_way: list[str]) -> SchemaError:
    """The error for a database without Kembali's schema that holds ``in_the_way``, tables of the names Kembali's
    take: ``db upgrade`` refuses it, so no command advises that (``check_schema`` said "has no schema: run `kembali
    db upgrade`", which then refused)."""
    return SchemaError(f"the database {describe(engine)} has no Kembali schema but holds tables of the names "
                       f"Kembali's take: {', '.join(in_the_way)} (another program's?): nothing was changed; point "
                       "database.url at a database of Kembali's own")  # fmt: skip


def tables_in_the_way(engine: Engine) -> list[str]:
    """The tables of the names Kembali's schema takes that a database without it holds (``database.url`` pointing
    at another program's database: the shop's own, say); none in an empty one."""
    with reading(engine) as conn:
        return _tables_in_the_way(conn)


def other_tables(engine: Engine) -> list[str]:
    """The tables of a database without Kembali's schema, but ``alembic_version``: another program's, when there are
    any (``db status`` names them: it called such a database empty)."""
    with reading(engine) as conn:
        return sorted(set(sa.inspect(conn).get_table_names()) - {"alembic_version"})


def _tables_in_the_way(conn: sa.Connection) -> list[str]:
    from worker.adapters.tables import metadata

    return sorted(set(metadata.tables) & set(sa.inspect(conn).get_table_names()))


def _announcing(cfg: Config, before: str | None,
                migrating: Callable[[int, int, str, str], None]) -> Callable[..., None]:
    """Call ``migrating`` for the first revision after ``before`` now, and for each next one as the one before it
    is applied (Alembic's ``on_version_apply``)."""
    oldest_first = list(reversed(list(ScriptDirectory.from_config(cfg).walk_revisions())))
    start = next((i + 1 for i, script in enumerate(oldest_first) if script.revision == before), 0)
    pending = oldest_first[start:]

    def announce(n: int) -> None:
        if n < len(pending):
            title = (pending[n].doc or "").strip().splitlines()[0] if pending[n].doc else ""
            migrating(n + 1, len(pending), pending[n].revision, title)

    applied = 0
    announce(0)

    def on_version_apply(**_kw: Any) -> None:
        nonlocal applied
        applied += 1
        announce(applied)

    return on_version_apply


def _stop_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The stop signal's exception that ``exc`` was raised in the handling of, if any. Alembic rebuilding an SQLite
    table drops its copy when the copy fails; stopped by a signal mid-copy, SQLite had rolled the whole transaction
    back, copy and all, so that the drop failed (``no such table: _alembic_tmp_message``) and took the stop's place:
    ``db upgrade`` said it could not open the database, exit 2, not that it stopped."""
    seen = exc.__context__
    while seen is not None and not isinstance(seen, KeyboardInterrupt):
        seen = seen.__context__
    return seen


def _take_migration_lock(conn: sa.Connection, waiting: Callable[[], None] | None) -> None:
    """``MIGRATION_LOCK`` for the transaction of ``conn``, waited for without the session's lock timeout (another
    migration is worth waiting for: it ends, or its own lock waits give up), which is then as it was."""
    if conn.exec_driver_sql(f"SELECT pg_try_advisory_xact_lock({MIGRATION_LOCK}, 0)").scalar_one():
        return
    if waiting is not None:
        waiting()
    timeout = conn.exec_driver_sql("SELECT current_setting('lock_timeout')").scalar_one()
    conn.exec_driver_sql("SET LOCAL lock_timeout = 0")
    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK}, 0)")
    conn.execute(sa.text("SELECT set_config('lock_timeout', :t, true)"), {"t": timeout})


@contextmanager
def writing_without_foreign_keys(engine: Engine, waiting: Callable[[], None] | None = None) -> Iterator[sa.Connection]:
    """A write transaction; on SQLite on a connection with its foreign key checks off, on again after, and
    ``waiting`` called if its ``BEGIN IMMEDIATE`` finds the write lock held (``_begin_writing``).

    The connection goes back to the pool with its checks on, or not at all. SQLite takes the setting only
    outside a transaction, hence before the BEGIN. PostgreSQL checks as always."""
    with engine.connect() as conn:
        if engine.dialect.name != "sqlite":
            with conn.begin():
                yield conn
            return
        raw = conn.connection.dbapi_connection
        assert raw is not None
        raw.cursor().execute("PRAGMA foreign_keys = OFF")
        if waiting is not None:
            conn.execution_options(**{_WAITING: waiting})
        try:
            with conn.begin():
                yield conn
        finally:
            # a transaction left open (a failed commit and rollback) would ignore the PRAGMA: read it back
            try:
                cur = raw.cursor()
                cur.execute("PRAGMA foreign_keys = ON")
                checking = cur.execute("PRAGMA foreign_keys").fetchone() == (1,)
            except BaseException:
                conn.invalidate()
                raise
            if not checking:
                conn.invalidate()


def check_schema(engine: Engine) -> None:
    """Raise SchemaError unless the schema is at the newest revision, naming the database.

    An SQLite file that does not exist is not created here (SQLite would create an empty one on the first
    connection): a mistyped path would otherwise leave an empty file behind, and an upgrade run on it."""
    where = describe(engine)
    path = sqlite_path(engine)
    if path is not None and not path.parent.is_dir():  # `db upgrade` alone would stop on it
        raise SchemaError(f"the database {where} does not exist, nor its folder {path.parent}",
                          upgrade="correct database.url, or create that folder, then the database with")
    if path is not None and not path.exists():
        raise SchemaError(f"the database {where} does not exist", upgrade="check database.url, or create it with")
    try:
        current = current_revision(engine)
    except sa.exc.DatabaseError as exc:  # also an SQLite file that is no database ("file is not a database")
        raise SchemaError(f"cannot open the database {where}: {connect_failure(engine, exc) or exc.orig}") from None
    head = newest_revision()
    if is_newer_than_this(engine, current):
        raise newer_schema(engine, str(current), head)
    if current is None and (in_the_way := tables_in_the_way(engine)):  # `db upgrade` would refuse them
        raise tables_in_the_way_error(engine, in_the_way)
    if current != head:
        state = "has no schema" if current is None else f"is at schema {current}, the code needs {head}"
        raise SchemaError(f"the database {where} {state}", upgrade="run")


@dataclass(frozen=True)
class WriteFailure:
    """Why the database refused a write, in words, and what the operator can do about it (``write_failure``)."""

    what: str
    """What happened, the driver's words after it: ``the database is full (SQLite: database or disk is full)``."""
    remedy: str
    """What to do before trying again: ``Free space on the disk that holds /srv/kembali/kembali.db.``"""


def sqlite_busy(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's "database is locked": another connection held the write lock past the busy
    timeout."""
    orig = getattr(exc, "orig", None)
    return isinstance(orig, sqlite3.Error) and (
        getattr(orig, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED))


def write_refused(exc: BaseException, engine: Engine) -> WriteFailure | None:
    """``write_failure`` of ``exc`` when the database refused the write outright, whoever wrote: a full disk, a
    database that takes no writes (a read-only SQLite file, a PostgreSQL standby), a PostgreSQL user without the
    privilege; else None."""
    orig = getattr(exc, "orig", None)
    refused = (isinstance(orig, sqlite3.Error)
               and getattr(orig, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY)
               ) or getattr(orig, "sqlstate", None) in (DISK_FULL, READ_ONLY_TRANSACTION, INSUFFICIENT_PRIVILEGE)
    return write_failure(exc, engine, DatabaseSettings()) if refused else None


def write_failure(exc: BaseException, engine: Engine, database: DatabaseSettings) -> WriteFailure | None:
    """``exc``, a write the database failed, when its cause can be known: a full disk, a database that takes no
    writes, another writer's lock waited out, a connection lost or ended by the server; else None. ``database``:
    the ``[database]`` settings the session ran with (its timeouts)."""
    orig = getattr(exc, "orig", None)
    if not isinstance(exc, sa.exc.DBAPIError) or orig is None:
        return None
    said = (str(orig).strip().splitlines() or [type(orig).__name__])[0][:200]
    if isinstance(orig, sqlite3.Error):
        path = sqlite_path(engine)
        code = getattr(orig, "sqlite_errorcode", 0) & 0xFF
        said = f"SQLite: {said}"
        if code == sqlite3.SQLITE_FULL:
            return WriteFailure(f"the database is full ({said})", f"Free space on the disk that holds {path}.")
        if code == sqlite3.SQLITE_READONLY:
            return WriteFailure(f"the database cannot be written ({said})",
                                f"Let the user running kembali write {path} and its folder (SQLite writes its -wal "
                                "and -shm files beside it), on a disk not mounted read-only.")  # fmt: skip
        if sqlite_busy(exc):
            return WriteFailure(f"another program held the database's write lock longer than the "
                                f"{SQLITE_BUSY_TIMEOUT_MS / 1000:g} s SQLite waits for it ({said})",
                                "Wait for the other writer to finish (a `kembali run`, another import, a program "
                                f"with {path} open in a transaction).")  # fmt: skip
        return None
    sqlstate = str(getattr(orig, "sqlstate", None) or "")
    said = f"PostgreSQL {sqlstate}: {said}" if sqlstate else f"PostgreSQL: {said}"
    if sqlstate == DISK_FULL:
        return WriteFailure(f"the database server's disk is full ({said})",
                            "Free space on the database server's disk (its data folder, or its WAL's).")
    if sqlstate == READ_ONLY_TRANSACTION:
        return WriteFailure(f"the database takes no writes ({said})",
                            "Point [database] url at the primary server, not a standby, or turn "
                            "default_transaction_read_only off for this database or user.")  # fmt: skip
    if sqlstate == INSUFFICIENT_PRIVILEGE:
        return WriteFailure(f"the database user may not do this ({said})",
                            "Grant the user of [database] url what it needs on Kembali's tables, or use the user "
                            "that owns them (the one that ran `kembali db upgrade` first); PostgreSQL 15 and later "
                            "let no other user create tables in the public schema: `GRANT CREATE ON SCHEMA public TO "
                            f"{engine.url.username or 'the user'}` as the database's owner.")  # fmt: skip
    if sqlstate == LOCK_NOT_AVAILABLE:
        return WriteFailure(f"another session held a lock the import needed longer than "
                            f"database.lock_timeout_seconds ({database.lock_timeout_seconds:g} s) ({said})",
                            "Wait for the other session to finish (a worker's long transaction, a report, a "
                            "migration), or raise database.lock_timeout_seconds.")  # fmt: skip
    if sqlstate == IDLE_IN_TRANSACTION_TIMEOUT:
        return WriteFailure(f"the database server ended the session, idle in a transaction longer than "
                            f"database.idle_in_transaction_timeout_seconds "
                            f"({database.idle_in_transaction_timeout_seconds:g} s) ({said})",
                            "If the import stalls that long between two statements (a machine suspended, a file "
                            "read slowly over a network), raise database.idle_in_transaction_timeout_seconds.")
    if exc.connection_invalidated or sqlstate.startswith("08") or sqlstate in _SESSION_ENDED:
        return WriteFailure(f"the connection to the database was lost ({said})",
                            f"Check that the database server {describe(engine)} is up and reachable (a batch under "
                            "way as the connection went may be in or not: importing again is safe either way).")
    return None


DISK_FULL = "53100"
INSUFFICIENT_PRIVILEGE = "42501"
"""The user may not: create in a schema (PostgreSQL 15's public one), write a table, alter another user's."""
READ_ONLY_TRANSACTION = "25006"
"""A write in a read-only transaction: a standby's, or ``default_transaction_read_only`` on."""
_SESSION_ENDED = frozenset({"57P01", "57P02", "57P03"})
"""The server ended the session: an administrator's command, its shutdown or crash."""


def describe(engine: Engine) -> str:
    """The database for messages: an SQLite file's path, or the URL without its password, in the user part
    (``user:***@host``) or as libpq's ``password`` or ``sslpassword`` parameter (``?password=***``)."""
    path = sqlite_path(engine)
    if path is not None:
        return str(path)
    return describe_url(engine.url)


def describe_url(given: str | sa.URL) -> str:
    """``describe`` for a URL, without an engine."""
    url = sa.make_url(given)
    if url.get_backend_name() == "sqlite":
        return str(Path(str(url.database)).resolve()) if url.database not in (None, "", ":memory:") else str(url)
    secret = {key: "***" for key in url.query if key.lower() in _SECRET_PARAMETERS}
    shown = url.update_query_dict(secret).render_as_string(hide_password=True)
    return shown.replace("=%2A%2A%2A", "=***")  # as the user part shows it, not percent-encoded


_SECRET_PARAMETERS = frozenset({"password", "sslpassword"})


def connect_failure(engine: Engine, exc: BaseException) -> str | None:
    """What to tell the operator when ``exc`` is a PostgreSQL connection that was never made, in words naming the
    host and port (from the URL: no password) and what to look at, or an SQLite file that is there but could not be
    opened for a folder or file beside it this user cannot write (``_sqlite_open_failure``); None for any other
    failure. libpq's own words ("connection timeout expired") named neither."""
    if engine.dialect.name == "sqlite":
        path = sqlite_path(engine)
        return _sqlite_open_failure(path, getattr(exc, "orig", None) or exc) if path is not None else None
    if engine.dialect.name != "postgresql":
        return None
    text = str(getattr(exc, "orig", None) or exc)
    where = _servers(engine)
    if "timeout expired" in text:
        return (f"PostgreSQL at {where} did not answer within {_CONNECT_TIMEOUTS.get(engine, '?')} s "
                "(connect_timeout): is the server up, do database.url's host and port name it, and does no firewall "
                "drop the packets between here and there?")  # fmt: skip
    if "Connection refused" in text:
        return (f"nothing listens on {where} (connection refused): is PostgreSQL running there, and on the port "
                "database.url names?")
    return _refused_login(where, text, engine.url.username)


def _refused_login(where: str, text: str, url_user: str | None) -> str | None:
    """What to do when the server at ``where`` answered and refused the login (libpq's words ``text``): a password
    refused or missing, a user or a database it does not have (a new host's first deploy); None for anything else."""
    user = re.search(r'(?:password authentication failed for user|role) "(.*?)"', text)
    if "password authentication failed" in text and user:
        return (f"PostgreSQL at {where} refused the password of user {user[1]!r}: check it in $PGPASSWORD or "
                "~/.pgpass (read by libpq), or percent-encoded in database.url")
    if "no password supplied" in text:
        return (f"PostgreSQL at {where} asks for a password and none is given: set it in $PGPASSWORD or ~/.pgpass "
                "(read by libpq), or percent-encoded in database.url")
    if user and "does not exist" in text:
        return (f"PostgreSQL at {where} has no user {user[1]!r}: check database.url's user, or create it there "
                f"(CREATE ROLE \"{user[1]}\" LOGIN)")
    if (missing := re.search(r'database "([^"]+)" does not exist', text)) is not None:
        # a new shop's: `db upgrade` makes the tables, not the database; owned by the URL's user (``url_user``):
        # PostgreSQL 15 and later let only the owner create tables in its public schema
        owner, flag = (f" OWNER {url_user}", f" --owner={url_user}") if url_user else ("", "")
        return (f"PostgreSQL at {where} has no database '{missing[1]}': create it first, as a user allowed to "
                f"(CREATE DATABASE {missing[1]}{owner}, or createdb{flag} {missing[1]}), then kembali db upgrade "
                "creates its tables, or correct database.url")  # fmt: skip
    return None


def _sqlite_open_failure(path: Path, orig: BaseException) -> str | None:
    """Why SQLite could not open ``path``, a file that is there, when the reason is beside it: a database in WAL mode
    is opened with its ``-wal`` and ``-shm`` files, which SQLite makes in its folder; a folder this user may not write
    (the service's file chowned to its user, the folder left root's) failed with "unable to open database file"
    alone, of a file this user can read and write."""
    if not (isinstance(orig, sqlite3.Error) and getattr(orig, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_CANTOPEN
            and path.is_file()):  # fmt: skip
        return None
    beside = [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm")]
    if all(p.exists() for p in beside) or os.access(path.parent, os.W_OK | os.X_OK):
        return None
    said = (str(orig).strip().splitlines() or ["unable to open database file"])[0]
    return (f"{said}: SQLite makes its -wal and -shm files beside the database, and this user cannot write the "
            f"folder {path.parent}: let the user that runs kembali write it (or run kembali as the user that can), on "
            "a disk not mounted read-only")


def _servers(engine: Engine) -> str:
    """The servers a PostgreSQL engine connects to, as libpq is given them (the URL's host and port, or its
    ``?host=...&port=...``, several hosts, $PGHOST/$PGPORT): ``host:port``, ``[v6]:port``, or the socket of a
    folder; a URL without a host names the local socket (libpq's default folder), not ``localhost:5432``."""
    _, params = engine.dialect.create_connect_args(engine.url)
    hosts = str(params.get("host") or os.environ.get("PGHOST") or "").split(",")
    ports = str(params.get("port") or os.environ.get("PGPORT") or "5432").split(",")
    ports = ports * len(hosts) if len(ports) == 1 else ports
    named = []
    for host, port in zip(hosts, ports, strict=False):
        port = port or "5432"
        if not host:
            named.append(f"the local socket .s.PGSQL.{port}")
        elif host.startswith("/"):
            named.append(f"the socket {host.rstrip('/')}/.s.PGSQL.{port}")
        elif ":" in host:
            named.append(f"[{host}]:{port}")
        else:
            named.append(f"{host}:{port}")
    return ", ".join(named)


def sqlite_path(engine: Engine) -> Path | None:
    """An SQLite database's file (None for PostgreSQL or an in-memory database)."""
    if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
        return None
    return Path(str(engine.url.database)).resolve()


def file_identity(engine: Engine) -> tuple[int, int] | None:
    """The device and inode of the file an SQLite database's path names now (None for PostgreSQL or an in-memory
    database, or no file there): SQLite goes on with the file it opened when another is put at its path, or none."""
    path = sqlite_path(engine)
    if path is None:
        return None
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino
