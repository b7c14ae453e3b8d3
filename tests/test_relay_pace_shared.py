"""Workers on one PostgreSQL database share the relay's pace.

Given a relay that takes 5 messages a second from the account, whoever they are for and whichever connection they
come on, and answers the rest "451 4.7.1 … slow down", and a worker whose pace that relay already slowed down, when
two more `kembali run --once` workers sharing its limits through the database start on the backlog, then they start
at the slowed pace, not at the configured rate: they do not each have to be refused before they slow down, and
nothing is lost or sent twice.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.sendkit import REPO, ledger, message_ids, prepare_database, settings_dict, subprocess_env, write_config
from tests.smtp_server import RecordingServer, RelayRate

MESSAGES = 150


@pytest.fixture(autouse=True)
def link_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")


@pytest.mark.slow
@pytest.mark.postgres
def test_workers_joining_one_the_relay_slowed_down_start_at_its_pace(
    pg_migrated_url: str, tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given 100 customers due a win-back at three domains, a global rate of 50/s (burst 50) shared through the
    # database, a relay that takes 5 a second across every connection, and one worker sending whose pace the
    # relay's "slow down" has cut
    prepare_database(pg_migrated_url, MESSAGES)
    smtp_server.relay_rate = relay = RelayRate(5)
    raw = settings_dict(pg_migrated_url, smtp_server.port, smtp={"pool_size": 2, "timeout_seconds": 2.0},
                        rate_per_second=50.0, burst=50, batch_size=10, shared_limits="database")  # fmt: skip
    config = write_config(tmp_path / "config.toml", raw)
    argv = [sys.executable, "-m", "worker", "--config", str(config), "run", "--once"]
    logs = [(tmp_path / f"worker{n}.log").open("wb") for n in range(3)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen(argv, cwd=REPO, env=subprocess_env(), stdout=logs[0], stderr=logs[0]))
        deadline = time.monotonic() + 60
        while not relay.refused and time.monotonic() < deadline:
            assert procs[0].poll() is None, (tmp_path / "worker0.log").read_text()[-3000:]
            time.sleep(0.05)
        assert relay.refused, "the relay's throttling"
        time.sleep(2.0)  # the cuts of its first round are made, its rest is over
        refused_before = len(relay.refused)

        # When two more workers start on the backlog
        joined = time.monotonic()
        for n in (1, 2):
            procs.append(subprocess.Popen(argv, cwd=REPO, env=subprocess_env(), stdout=logs[n], stderr=logs[n]))
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()

    texts = [(tmp_path / f"worker{n}.log").read_text() for n in range(3)]
    rows = ledger(pg_migrated_url)
    statuses = Counter(r.status for r in rows.values())
    after = [round(t - joined, 2) for t in relay.refused if t >= joined]
    cuts = [text.count(" relay_throttled ") for text in texts]
    print(f"refused before {refused_before}, after the others joined {len(after)}: {after}; cuts {cuts}; "
          f"{dict(statuses)} {codes}")  # fmt: skip
    # nothing lost, nothing sent twice, nothing failed
    assert set(codes) <= {0, 3}, texts[0][-2000:] + texts[1][-2000:]
    assert set(statuses) <= {"sent", "retry"} and len(rows) == MESSAGES, statuses
    arrived = message_ids(smtp_server.messages)
    assert set(arrived.values()) == {1} and len(arrived) == statuses["sent"]
    # Then the relay refused few of the joiners' sends, and few sends at all once they joined: with a pace of their
    # own, each started at 50/s (burst 50) and was refused until its own pace came down (19 or 20 of the joiners'
    # sends refused, 25 to 29 in all after they joined; now 3, and 5)
    # and a joiner that was told nothing itself slowed down all the same, and says whose "slow down" it followed (a
    # pace of its own is not slowed by another worker's: its summary says nothing of the relay, or its own cuts)
    # (a joiner the relay refused too says so, and that another worker had already cut that round: both joiners may)
    # (or both cut in a round of their own later, after the shared pace came back up: then a joiner's log shows it
    # stepping the shared pace up before its own first cut, which a pace of its own, never cut, could not)
    followed = ("the SMTP relay asked another worker sharing the database to slow down",
                "in a round another worker sharing the database had already cut")
    assert any(f in text for text in texts[1:] for f in followed) or any(
        _raised_before_its_own_cut(text) for text in texts[1:]), texts[1][-2000:] + texts[2][-2000:]
    joiners_refused = sum(" email_deferred " in line and "slow down" in line
                          for text in texts[1:] for line in text.splitlines())  # fmt: skip
    assert joiners_refused <= 8, (joiners_refused, after)
    assert len(after) <= 12, after


def _raised_before_its_own_cut(text: str) -> bool:
    """Whether a worker's log steps its global pace up (``relay_pace_raised``/``_restored``) before any cut of its own
    (``relay_throttled``): the pace it stepped up was another worker's cut, followed."""
    for line in text.splitlines():
        if " relay_throttled " in line:
            return False
        if " relay_pace_raised " in line or " relay_pace_restored " in line:
            return True
    return False
