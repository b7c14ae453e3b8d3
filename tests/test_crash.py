"""A real `kembali run --once` process, SIGKILLed at random moments and restarted until done.

Given a few thousand win-back emails due and an SMTP sink in this process,
when worker processes are killed at random moments (before planning, while
sending, while committing) and restarted (leases of 1 s, so a dead worker's
rows are released at the next start), then in the end every row is terminal,
every planned message has its row, every `sent` row arrived exactly once, and
nothing arrived twice (only an `uncertain` row could have, and those are never
resent automatically).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.sendkit import (
    REPO,
    TimedSink,
    ledger,
    message_ids,
    prepare_database,
    settings_dict,
    subprocess_env,
    write_config,
)

MESSAGES = 2000
TERMINAL = {"sent", "uncertain", "failed", "skipped"}


def crash_until_done(url: str, tmp_path: Path, seed: int) -> tuple[dict[str, object], int, TimedSink]:
    rng = random.Random(seed)
    prepare_database(url, MESSAGES)
    with TimedSink() as sink:
        raw = settings_dict(url, sink.port, smtp={"pool_size": 4}, lease_seconds=1, batch_size=100,
                            rate_per_second=100_000.0, burst=1000, domain_rate_per_second=100_000.0,
                            domain_burst=1000)  # fmt: skip
        raw["logging"] = {"level": "warning"}
        config = write_config(tmp_path / "config.toml", raw)
        kills = 0
        log = (tmp_path / "worker.log").open("ab")
        for _round in range(40):
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker", "--config", str(config), "run", "--once"],
                cwd=REPO, env=subprocess_env(), stdout=log, stderr=log,
            )  # fmt: skip
            try:
                if kills < 6 and _kill_at_random(proc, sink, rng, while_sending=kills % 3 != 0):
                    kills += 1
                    continue
                proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            assert proc.returncode in (0, 1), f"run --once exited {proc.returncode}; see {tmp_path / 'worker.log'}"
            rows = ledger(url)
            if len(rows) == MESSAGES and all(r.status in TERMINAL for r in rows.values()):
                break
            time.sleep(1.1)  # let the dead worker's leases lapse
        log.close()
    return ledger(url), kills, sink


def _kill_at_random(proc: subprocess.Popen[bytes], sink: TimedSink, rng: random.Random, *, while_sending: bool) -> bool:
    """SIGKILL the worker at a random moment: after a random time, or once the sink has
    received a random number of new messages (so the kill lands while sending). True if killed."""
    start = time.monotonic()
    if while_sending:
        before, more = len(sink.messages), rng.randint(1, 400)
        deadline = start + 30
        while proc.poll() is None and len(sink.messages) < before + more and time.monotonic() < deadline:
            time.sleep(0.005)
    else:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=rng.uniform(0.2, 1.5))
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def check(rows: dict[str, object], kills: int, sink: TimedSink) -> None:
    statuses = {mid: r.status for mid, r in rows.items()}  # type: ignore[attr-defined]
    assert len(rows) == MESSAGES, "a planned message has no row"
    assert set(statuses.values()) <= TERMINAL, "a row did not end in a terminal state"
    # lose nothing: the sink takes every message, so a kill may leave a row uncertain, never failed or skipped
    assert set(statuses.values()) <= {"sent", "uncertain"}, Counter(statuses.values())
    arrived = message_ids(sink.messages)
    twice = {mid for mid, n in arrived.items() if n > 1}
    assert all(statuses.get(mid) == "uncertain" for mid in twice), "a message arrived twice"
    assert not twice, "even uncertain rows are never resent automatically"
    for mid, status in statuses.items():
        if status == "sent":
            assert arrived[mid] == 1, f"{mid} is sent but did not arrive"
    assert set(arrived) <= set(rows), "the sink got a message the ledger does not know"
    assert kills >= 3, "the test must actually kill workers"
    print(f"kills={kills} statuses={Counter(statuses.values())} arrived={len(arrived)}")


@pytest.mark.slow
def test_sigkilled_workers_on_sqlite_lose_nothing_and_send_nothing_twice(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    rows, kills, sink = crash_until_done(url, tmp_path, seed=4)
    check(rows, kills, sink)


@pytest.mark.slow
@pytest.mark.postgres
def test_sigkilled_workers_on_postgresql_lose_nothing_and_send_nothing_twice(
    pg_migrated_url: str, tmp_path: Path
) -> None:
    rows, kills, sink = crash_until_done(pg_migrated_url, tmp_path, seed=5)
    check(rows, kills, sink)
