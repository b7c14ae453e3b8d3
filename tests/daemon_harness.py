"""A real `kembali run` process for tests: a tmp shop (SQLite file, config, a copy of the
templates), the recording SMTP server, and the daemon's JSON log read line by line."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.db_fixtures import migrate
from worker.adapters import shop
from worker.adapters.store import Store
from worker.domain import CustomerRecord, Locale, OrderRecord, OrderStatus

REPO = Path(__file__).resolve().parent.parent
LINK_KEY = "test-link-key-0123456789abcdef"
NOW = datetime.now(UTC)


def customer(i: int, *, locale: Locale = Locale.ID) -> CustomerRecord:
    return CustomerRecord(f"C{i}", f"c{i}@example.com", f"Pelanggan {i}", locale, "Asia/Jakarta", None, True,
                          "opt_in", "checkout")


def order(i: int, *, days_ago: int) -> OrderRecord:
    return OrderRecord(f"O{i}", f"C{i}", OrderStatus.DELIVERED, NOW - timedelta(days=days_ago), None, 150_000_00, "IDR")


@dataclass
class Shop:
    root: Path
    config: Path
    db_url: str
    templates: Path
    extra_config: str = ""

    def store(self) -> Store:
        return Store.from_url(self.db_url)

    def add(self, ids: range | list[int], *, days_ago: int, locale: Locale = Locale.ID) -> None:
        """Customers with one order ``days_ago`` (45+ makes them due a win-back)."""
        store = self.store()
        try:
            shop.upsert_customers(store.engine, [customer(i, locale=locale) for i in ids], NOW)
            shop.upsert_orders(store.engine, [order(i, days_ago=days_ago) for i in ids], NOW)
        finally:
            store.close()

    def set_last_planned(self, at: datetime) -> None:
        """Pretend the last planning run was at ``at`` (as if the daemon had been down since)."""
        from worker.adapters.tables import JobRun

        store = self.store()
        try:
            with store.engine.begin() as conn:
                conn.execute(sa.update(JobRun.__table__).values(last_run_at=at))  # type: ignore[attr-defined]
        finally:
            store.close()

    def customer_id(self, external_id: str) -> int:
        return int(self.scalar("SELECT id FROM customer WHERE external_id = :e", e=external_id))

    def scalar(self, sql: str, **params: Any) -> Any:
        store = self.store()
        try:
            with store.engine.connect() as conn:
                return conn.execute(sa.text(sql), params).scalar()
        finally:
            store.close()

    def rows(self, sql: str, **params: Any) -> list[Any]:
        store = self.store()
        try:
            with store.engine.connect() as conn:
                return list(conn.execute(sa.text(sql), params).all())
        finally:
            store.close()


def make_shop(tmp: Path, *, smtp_port: int, extra: str = "", plan_cron: str = "*/1 * * * * *",
              pool_size: int = 2, db_url: str | None = None) -> Shop:
    """A shop in ``tmp`` (templates, config); its database is an SQLite file there unless ``db_url`` is given."""
    templates = tmp / "templates"
    shutil.copytree(REPO / "templates" / "email", templates)
    db_url = db_url or f"sqlite:///{tmp / 'kembali.db'}"
    config = tmp / "config.toml"
    config.write_text(
        f"""
[shop]
domain = "shop.example"
from_address = "halo@shop.example"

[database]
url = "{db_url}"

[smtp]
host = "127.0.0.1"
port = {smtp_port}
timeout_seconds = 5.0
pool_size = {pool_size}

[unsubscribe]
url = "https://shop.example/unsubscribe"

[templates]
dir = "{templates}"

[logging]
format = "json"
level = "debug"

[schedule]
default_plan_cron = "{plan_cron}"
dispatch_poll_seconds = 0.5
maintenance_interval_seconds = 1.0

[daemon]
shutdown_grace_seconds = 5.0
health_summary_seconds = 1.0

[web]
port = 0
{extra}
""",
        encoding="utf-8",
    )
    migrate(db_url)
    return Shop(tmp, config, db_url, templates)


@dataclass
class Daemon:
    """A running `python -m worker run` and its log events."""

    proc: subprocess.Popen[str]
    events: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _reader: threading.Thread | None = None

    @classmethod
    def start(cls, s: Shop, env: dict[str, str] | None = None, cwd: Path = REPO, config: str | None = None) -> Daemon:
        """``cwd``: the folder whose ``worker`` package runs (``python -m worker``): the repository's, or a copy.
        ``config``: the ``--config`` as given (relative to ``cwd``), the shop's by its full path unless given."""
        environ = {**os.environ, "KEMBALI_LINK_SECRET": LINK_KEY, **(env or {})}
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--config", config or str(s.config), "run"],
            cwd=cwd, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        daemon = cls(proc)
        daemon._reader = threading.Thread(target=daemon._read, daemon=True)
        daemon._reader.start()
        return daemon

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))
                with contextlib.suppress(json.JSONDecodeError):
                    self.events.append(json.loads(line))

    def named(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e.get("event") == name]

    def wait_for(self, what: Callable[[], Any], timeout: float = 10.0, why: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = what()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited ({self.proc.returncode}) waiting for {why}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {why}:\n{self.log()}")

    def wait_event(self, name: str, timeout: float = 10.0, where: Callable[[dict[str, Any]], bool] | None = None,
                   after: int = 0) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            matches = [e for e in self.named(name)[after:] if where is None or where(e)]
            return matches[0] if matches else None

        event: dict[str, Any] = self.wait_for(found, timeout, why=f"event {name}")
        return event

    @property
    def port(self) -> int:
        return int(self.wait_event("web_started")["port"])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """The exit code, once the process has exited and its log is read to the end."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the daemon did not exit in {timeout}s:\n{self.log()}") from None
        finally:
            if self._reader is not None:
                self._reader.join(5)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
        return code

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def log(self) -> str:
        """The last 80 lines, for a failure's message (``text`` has them all)."""
        with self._lock:
            return "\n".join(self.lines[-80:])

    def text(self) -> str:
        """Every line it wrote: what a check that something is never logged reads."""
        with self._lock:
            return "\n".join(self.lines)


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
         ) -> tuple[int, str, dict[str, str]]:
    """One request with urllib; (status, body text, headers), also for 4xx/5xx."""
    assert url.startswith("http://127.0.0.1:")
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - a loopback test URL
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)
