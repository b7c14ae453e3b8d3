"""The daily quota counts the messages marked ``sending`` (those that may have been handed to SMTP), whatever
happens to a worker: one SIGKILLed with a batch claimed costs the day no slot for the messages it never marked,
and workers side by side never send more than the quota between them.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import sqlalchemy as sa

from tests.sendkit import REPO, M, ledger, prepare_database, settings_dict, subprocess_env, write_config
from tests.smtp_server import ACCEPT, Behaviour, RecordingServer
from worker.adapters import db

QUOTA = 10


def _statuses(url: str) -> Counter[str]:
    return Counter(row.status for row in ledger(url).values())


def _quota_used(url: str) -> int:
    engine = db.create_engine(url)
    try:
        with engine.connect() as conn:
            used = conn.execute(sa.text("SELECT day_count FROM rate_limit WHERE key = 'quota:daily'")).scalar()
    finally:
        engine.dispose()
    return int(used or 0)


def test_a_worker_sigkilled_with_a_claimed_batch_costs_the_day_only_the_slot_of_the_message_it_marked(
    db_url: str, tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given ten customers due a win-back, a daily quota of ten, one connection and one message in flight, and a
    # server that holds the first message it gets at DATA
    emails = prepare_database(db_url, QUOTA)
    for email in emails:
        smtp_server.on(email, Behaviour(delay_at="data", delay_seconds=30.0))
    raw = settings_dict(db_url, smtp_server.port, smtp={"pool_size": 1, "timeout_seconds": 60.0},
                        in_flight_per_connection=1, batch_size=QUOTA, daily_quota=QUOTA, lease_seconds=2)  # fmt: skip
    raw["logging"] = {"level": "warning"}
    config = write_config(tmp_path / "config.toml", raw)
    argv = [sys.executable, "-m", "worker", "--config", str(config), "run", "--once"]
    log_path = tmp_path / "worker.log"
    with log_path.open("ab") as log:
        # When a worker claims the ten, marks the first `sending` and is held at its DATA (nine wait, unmarked)
        first = subprocess.Popen(argv, cwd=REPO, env=subprocess_env(), stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while _statuses(db_url)["sending"] != 1 or not smtp_server.connections:
                assert first.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.02)
            time.sleep(0.2)  # (its one sender holds the connection: the other nine wait on its queue)
            # and is SIGKILLed there
            first.kill()
            assert first.wait(10) == -signal.SIGKILL
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        statuses = _statuses(db_url)
        assert statuses["sending"] == 1 and statuses["claimed"] == QUOTA - 1, statuses
        # and, once its leases lapse, a worker starts again the same day (the server now takes every message)
        for email in emails:
            smtp_server.on(email, ACCEPT)
        time.sleep(2.5)
        again = subprocess.run(argv, cwd=REPO, env=subprocess_env(), stdout=log, stderr=log, timeout=120)
    # Then it sends the nine the first never marked: the quota counted only the one that may have gone out
    # (it is `uncertain`: 1 asks for a decision), not the ten the first worker had claimed
    assert again.returncode == 1, log_path.read_text()[-3000:]
    statuses = _statuses(db_url)
    assert statuses == {"sent": QUOTA - 1, "uncertain": 1}, (statuses, log_path.read_text()[-3000:])
    assert len(smtp_server.messages) == QUOTA - 1
    assert _quota_used(db_url) == QUOTA
    assert "daily_quota_reached" not in log_path.read_text()


def test_workers_side_by_side_send_the_daily_quota_and_not_one_message_more(
    db_url: str, tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given 60 customers due a win-back and a daily quota of 25, small batches
    prepare_database(db_url, 60)
    raw = settings_dict(db_url, smtp_server.port, batch_size=7, daily_quota=25, rate_per_second=10_000.0,
                        burst=1000, domain_rate_per_second=10_000.0, domain_burst=1000)  # fmt: skip
    raw["logging"] = {"level": "warning"}
    config = write_config(tmp_path / "config.toml", raw)
    argv = [sys.executable, "-m", "worker", "--config", str(config), "run", "--once"]
    # When three workers send side by side
    with (tmp_path / "workers.log").open("wb") as log:
        procs = [subprocess.Popen(argv, cwd=REPO, env=subprocess_env(), stdout=log, stderr=log) for _ in range(3)]
        codes = [p.wait(timeout=120) for p in procs]
    # Then 25 were sent between them, not one more; the rest wait for tomorrow (those claimed, sent to wait until it
    # begins; the others left unclaimed once the quota was spent), and the quota counts the 25
    assert codes == [0, 0, 0], (tmp_path / "workers.log").read_text()[-3000:]
    engine = db.create_engine(db_url)
    try:
        with engine.connect() as conn:
            statuses = Counter(conn.execute(sa.select(M.c.status)).scalars())  # (rows never claimed have no Message-ID)
    finally:
        engine.dispose()
    assert statuses["sent"] == 25 and len(smtp_server.messages) == 25, statuses
    assert statuses["sent"] + statuses["planned"] + statuses["retry"] == 60, statuses
    assert _quota_used(db_url) == 25


def test_a_worker_that_cannot_reach_the_smtp_server_leaves_the_days_quota_to_the_workers_that_can(
    db_url: str, tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given 20 customers due a win-back, a daily quota of ten, and two hosts on one database: host A's SMTP server
    # refuses connections (a firewall, a wrong smtp.port on that host), host B's takes every message
    prepare_database(db_url, 20)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    common = dict(batch_size=5, daily_quota=QUOTA, pause_after_failures=3, rate_per_second=10_000.0, burst=1000,
                  domain_rate_per_second=10_000.0, domain_burst=1000)  # fmt: skip
    configs = []
    for name, port in (("a", closed), ("b", smtp_server.port)):
        raw = settings_dict(db_url, port, **common)
        raw["logging"] = {"level": "warning"}
        configs.append(write_config(tmp_path / f"{name}.toml", raw))
    runs = []
    # When host A's cron runs twice (each run pauses after three connections refused, exit 3)
    for config in (configs[0], configs[0], configs[1]):
        argv = [sys.executable, "-m", "worker", "--config", str(config), "run", "--once"]
        runs.append(subprocess.run(argv, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120))
    assert [r.returncode for r in runs[:2]] == [3, 3], [r.stdout for r in runs[:2]]
    # Then host B sends the day's ten: no message of A's reached a server, so none took a slot of the quota
    assert runs[2].returncode == 0, runs[2].stdout + runs[2].stderr
    assert len(smtp_server.messages) == QUOTA, runs[2].stdout
    assert _statuses(db_url)["sent"] == QUOTA
    assert _quota_used(db_url) == QUOTA
