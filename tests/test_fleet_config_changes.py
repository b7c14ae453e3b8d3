"""Two workers on one PostgreSQL database while an operator changes the config on one of them.

The hosts of a fleet are not all given a new config at the same instant: for a while one runs a
``policy.priorities`` order (and the campaigns turned on or off) that another does not yet.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.daemon_harness import Daemon, make_shop
from tests.smtp_server import RecordingServer
from worker import pipeline
from worker.config import load_settings

NEW_ORDER = """
[policy]
priorities = ["winback", "birthday", "feedback", "loyalty", "new_products"]

[campaigns.feedback]
enabled = false
"""
"""Win-back put first, which gives feedback (turned off) 30: win-back's priority in the default order."""


@pytest.mark.postgres
def test_rows_another_host_plans_under_the_old_order_are_sent_by_a_daemon_running_the_new_one(
    tmp_path: Path, smtp_server: RecordingServer, pg_migrated_url: str
) -> None:
    # Given host A's daemon running the new order (feedback turned off and given win-back's old priority, 30), and
    # host B still on the default order (win-back third: 30)
    a = make_shop(tmp_path / "a", smtp_port=smtp_server.port, plan_cron="0 9 * * *", db_url=pg_migrated_url,
                  extra=NEW_ORDER)
    b = make_shop(tmp_path / "b", smtp_port=smtp_server.port, plan_cron="0 9 * * *", db_url=pg_migrated_url)
    daemon = Daemon.start(a)
    try:
        daemon.wait_event("daemon_started", timeout=30)
        # When host B plans three win-back emails (its scheduled pass), and then goes away before sending them (it
        # is being moved to the new config, or taken out of the fleet)
        b.add([1, 2, 3], days_ago=60)
        store = b.store()
        try:
            assert pipeline.plan(store, load_settings(b.config), datetime.now(UTC)).created["winback"] == 3
        finally:
            store.close()

        # Then host A, whose campaigns are all that run now, sends them: win-back is on there (they waited, planned,
        # at a priority A's claims skip as held by feedback turned off alone, until they expired)
        daemon.wait_for(lambda: len(smtp_server.messages) == 3, timeout=20, why="the three win-back emails")
    finally:
        assert daemon.stop() == 0
    received = Counter(r for m in smtp_server.messages for r in m.rcpt_tos)
    assert received == {f"c{i}@example.com": 1 for i in (1, 2, 3)}
    assert Counter(r.status for r in a.rows("SELECT status FROM message")) == {"sent": 3}
