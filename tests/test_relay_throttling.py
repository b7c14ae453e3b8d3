"""A relay that throttles the whole account: the real Dispatcher, a real SQLite ledger, a real aiosmtpd relay that
takes at most a few messages a second (whoever they are for) and answers the rest "slow down".

Given a backlog for recipients at many domains, when a run sends it, then the sender slows its global pace to what
the relay takes (instead of hammering it at the configured rate with every message, each throttled one sent back to
wait), says so in the log and the run's summary, and recovers once the relay takes mail again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_harness import LINK_KEY, REPO, make_shop
from tests.sendkit import Shop, make_settings, message_ids
from tests.smtp_server import Behaviour, RecordingServer, RelayRate
from worker.adapters.clock import SystemClock
from worker.adapters.ratestore import RateStore
from worker.commands import running

DOMAINS = [f"d{n}.example" for n in range(8)]


@pytest.fixture(autouse=True)
def link_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")


@pytest.fixture
def server(smtp_server: RecordingServer) -> RecordingServer:
    """The relay: conftest's recording server on 127.0.0.1, port 0."""
    return smtp_server


def _paced(shop: Any, emails: list[str], relay: RelayRate) -> list[Any]:
    """The messages' rows, once a run sent 40 through a relay taking 5 a second at a slowed pace: at most 12
    refused (35 of 40 at the full rate), at least 30 sent, the rest waiting to retry."""
    rows = [shop.row(e) for e in emails]
    statuses = Counter(r.status for r in rows)
    assert len(relay.refused) <= 12, (len(relay.refused), statuses)
    assert statuses["sent"] >= 30 and statuses["sent"] + statuses["retry"] == 40, statuses
    return rows


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [getattr(r, "kembali_fields", {}) for r in caplog.records if r.getMessage() == name]


def _shop(tmp_path: Path, server: RecordingServer, count: int, **sending: Any) -> tuple[Shop, list[str]]:
    emails = [f"c{i}@{DOMAINS[i % len(DOMAINS)]}" for i in range(count)]
    settings = make_settings(f"sqlite:///{tmp_path / 'ledger.db'}", server.port, smtp={"timeout_seconds": 2.0},
                             rate_per_second=50.0, burst=50, **sending)  # fmt: skip
    return Shop(f"sqlite:///{tmp_path / 'ledger.db'}", settings, emails, clock=SystemClock()), emails  # type: ignore[arg-type]


@pytest.mark.parametrize("at", ["rcpt", "mail"], ids=["451 at RCPT TO", "421 at MAIL FROM and a hang-up"])
def test_a_relay_that_says_slow_down_gets_a_slower_global_pace(
    tmp_path: Path, server: RecordingServer, at: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a relay that takes 5 messages a second, whoever they are for, and 40 due for 8 domains (each domain's
    # own rate, 20/s, and the global one, 50/s, far above what the relay takes)
    server.relay_rate = relay = RelayRate(5, at=at)
    shop, emails = _shop(tmp_path, server, 40)
    try:
        # When a run sends them
        report = shop.cycle()

        # Then it slowed its global pace to what the relay takes: before, it sent at 50/s whatever the relay said,
        # so 35 of 40 attempts (451) were refused, each domain halved in turn (35 domain_throttled); with the 421
        # and hang-up, 23 reconnections were refused in 0.6 s, 20 in a row paused the run with 14 never tried
        rows = _paced(shop, emails, relay)
        assert report.dispatched.paused is None
        # the throttled messages wait in the queue, their attempts not counted; nothing arrived twice
        assert all(r.attempts == 0 for r in rows if r.status == "retry")
        assert len(server.messages) == sum(r.status == "sent" for r in rows)
        assert set(message_ids(server.messages).values()) == {1}
        # the log says what slowed, to what rate, and why; the domains were not blamed for the relay's limit
        throttled = _events(caplog, "relay_throttled")
        assert 1 <= len(throttled) <= 6
        assert throttled[0]["rate_before"] == 50.0 and throttled[-1]["rate_now"] <= 6.25
        assert all("slow down" in e["reply"] for e in throttled)
        assert len(_events(caplog, "domain_throttled")) <= 1  # the first "451" alone (at RCPT TO) is a domain's
        (line,) = [line for line in running.summary(report) if "relay" in line]
        assert line.startswith("the SMTP relay asked to slow down (")
        assert "the global rate went down to " in line and "Too many messages, slow down" in line
    finally:
        shop.close()


def test_a_run_whose_last_send_the_relay_throttles_shares_the_cut_before_it_ends(
    tmp_path: Path, server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given limits shared through the ledger's SQLite file, one message due, and a relay that hangs up on it with
    # "421 … slow down" at MAIL FROM
    server.relay_rate = RelayRate(0, at="mail")
    shop, emails = _shop(tmp_path, server, 1, shared_limits="database")
    try:
        # When a `run --once` sends it: its last send, no booking after it to write the cut at
        report = shop.cycle()
        pace = RateStore(shop.store.engine).read_pace()
        assert shop.row(emails[0]).status == "retry"
    finally:
        shop.close()
    # Then the run wrote its cut to the shared pace before it ended (other workers follow it; it was left unwritten
    # and the log told of a cut no other worker knew of), and logged it once, as the run's summary says
    assert pace.cut is not None and pace.cut.rate == 25.0
    assert [e["rate_now"] for e in _events(caplog, "relay_throttled")] == [25.0]
    assert report.dispatched.relay_slowed is not None and "(1 time, last: 421" in report.dispatched.relay_slowed


def test_a_domain_whose_mailboxes_say_slow_down_slows_that_domain_alone(
    tmp_path: Path, server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given one recipient domain whose mailboxes are throttled (Gmail's 4.2.1 "receiving mail at a rate"), and 35
    # messages for seven other domains
    shop, emails = _shop(tmp_path, server, 40)
    slow = [e for e in emails if e.endswith("@d0.example")]
    for address in slow:
        server.on(address, Behaviour(rcpt_reply="450 4.2.1 The user you are trying to contact is receiving mail at "
                                                "a rate that prevents additional messages from being delivered"))
    try:
        started = time.monotonic()
        report = shop.cycle()
        took = time.monotonic() - started

        # Then that domain is slowed down, the global pace is not: the others' 35 go out at once
        assert {shop.row(e).status for e in emails if e not in slow} == {"sent"}
        assert {shop.row(e).status for e in slow} == {"retry"}
        assert {e["domain"] for e in _events(caplog, "domain_throttled")} == {"d0.example"}
        assert _events(caplog, "relay_throttled") == []
        assert report.dispatched.relay_slowed is None
        assert took < 10
    finally:
        shop.close()


@pytest.mark.parametrize("command", ["run --once", "daemon"])
def test_a_sigterm_while_messages_wait_on_the_relays_pace_loses_nothing_and_leaves_nothing_claimed(
    tmp_path: Path, server: RecordingServer, command: str
) -> None:
    # Given a relay that takes 2 messages a second and hangs up on more ("421 … slow down" at MAIL FROM), and 40
    # customers due a win-back: the pace comes down to about 1/s, so most messages wait on it
    server.relay_rate = relay = RelayRate(2, at="mail")
    shop = make_shop(tmp_path, smtp_port=server.port, extra="[sending]\nrate_per_second = 50.0\n")
    shop.add(range(1, 41), days_ago=60)
    argv = [sys.executable, "-m", "worker", "--config", str(shop.config), "run", *(["--once"] if command != "daemon"
                                                                                     else [])]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, "KEMBALI_LINK_SECRET": LINK_KEY},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while (len(relay.refused) < 2 or len(relay.accepted) < 4) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        assert len(relay.refused) >= 2, "the relay's throttling"
        time.sleep(0.5 if command != "daemon" else 2.5)  # the senders wait on the slowed pace (a health line comes)
        # When SIGTERM comes (cron's `timeout`, systemd)
        proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
    # Then it stops without waiting out the pace (the rest would take 30 s or more), with the documented exit code
    # (run --once: 143, as the shell reports a SIGTERM; the daemon: 0), and nothing is lost: every row is sent or
    # back in the queue, none left `sending` or claimed, none `uncertain`; each message arrived once
    assert proc.returncode == (0 if command == "daemon" else 143), err[-3000:]
    assert took < 15, took
    rows = shop.rows("SELECT status, claimed_by, attempts FROM message")
    statuses = Counter(r[0] for r in rows)
    assert set(statuses) <= {"sent", "planned", "retry"} and statuses["planned"] + statuses["retry"] > 0, statuses
    assert [r for r in rows if r[1] is not None] == []
    assert statuses["sent"] == len(server.messages) and set(message_ids(server.messages).values()) == {1}
    assert all(r[2] == 0 for r in rows if r[0] != "sent")  # the relay's throttling is counted against no message
    assert len(rows) == 40
    assert "relay_throttled" in err
    if command == "daemon":  # the health line says what slowed sending, to what rate, and why
        health = [e for e in map(_json, err.splitlines()) if e.get("event") == "health"]
        slowed = [e for e in health if e["relay_pace_per_second"] < 50.0]
        assert slowed and "slow down" in slowed[-1]["relay_throttled"], health[-3:]
    else:
        assert "stopped early by SIGTERM" in out and "the SMTP relay asked to slow down" in out, out


def _json(line: str) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return event if isinstance(event, dict) else {}


PEAK = ("450 4.2.1 Peak SMTP relay limit exceeded for customer. This is a temporary error. For more information on "
        "SMTP relay limits, please contact your administrator or visit https://support.google.com/a/answer/6140680")


def test_googles_peak_relay_limit_slows_the_global_pace_not_each_domain(
    tmp_path: Path, server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given Google Workspace's SMTP relay, which takes 5 messages a second from the account and answers the rest
    # "450 4.2.1 Peak SMTP relay limit exceeded for customer" (a 4.2.1 that is the relay's, not a mailbox's)
    server.relay_rate = relay = RelayRate(5, at="rcpt", reply=PEAK)
    shop, emails = _shop(tmp_path, server, 40)
    try:
        report = shop.cycle()

        # Then the global pace comes down as for any relay-wide "slow down" (before: not throttling at all, each
        # refusal an ordinary attempt counted against the message, 35 of 40 refused at 50/s)
        rows = _paced(shop, emails, relay)
        assert all(r.attempts == 0 for r in rows if r.status == "retry")
        throttled = _events(caplog, "relay_throttled")
        assert throttled and all("Peak SMTP relay limit" in e["reply"] for e in throttled)
        assert _events(caplog, "domain_throttled") == []
        assert report.dispatched.relay_slowed is not None
    finally:
        shop.close()


GMAIL_QUOTA = "550 5.4.5 Daily user sending quota exceeded. d2-20020a05600c0d8200b0040e3 - gsmtp"
GOOGLE_RELAY_QUOTA = ("550 5.4.5 Daily SMTP relay limit exceeded for customer. For more information on SMTP relay "
                      "sending limits please contact your administrator or visit https://support.google.com/a/answer/"
                      "6140680")
OUTLOOK_RECIPIENTS = ("550 5.1.90 Your message can't be sent because you've reached your daily limit for message "
                      "recipients.")
MICROSOFT_QUOTA = ("554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process "
                   "message due to a permanent exception with message Cannot submit message.")


@pytest.mark.parametrize(
    ("reply", "at"),
    [(GMAIL_QUOTA, "rcpt"), (GOOGLE_RELAY_QUOTA, "rcpt"), (MICROSOFT_QUOTA, "data"), (OUTLOOK_RECIPIENTS, "data")],
    ids=["Gmail's user quota at RCPT TO", "Google's relay daily limit at RCPT TO", "Microsoft 365 after the dot",
         "Microsoft's daily recipient limit after the dot"],
)
def test_run_once_stops_at_the_relays_daily_quota_and_fails_no_one(
    tmp_path: Path, server: RecordingServer, reply: str, at: str
) -> None:
    # Given a relay whose account may send 5 more messages today, then answers every one with its daily limit, and
    # 15 customers due a win-back
    server.account_quota = (5, reply, at)
    shop = make_shop(tmp_path, smtp_port=server.port)
    shop.add(range(1, 16), days_ago=60)
    argv = [sys.executable, "-m", "worker", "--config", str(shop.config), "run", "--once"]
    done = subprocess.run(argv, cwd=REPO, env={**os.environ, "KEMBALI_LINK_SECRET": LINK_KEY}, capture_output=True,
                          text=True, timeout=120)  # fmt: skip

    # Then the run stops at the first refusals with the documented exit code for "not all sent" (3), saying why and
    # what setting keeps Kembali under the limit; the 5 arrived, the other 10 wait in the queue, not failed and no
    # attempt counted against them, and the relay was not hammered with the rest
    assert done.returncode == 3, done.stderr[-3000:]
    paused = [line for line in done.stdout.splitlines() if line.startswith("PAUSED")]
    assert paused and "daily sending limit" in paused[0] and "sending.daily_quota" in paused[0], done.stdout
    assert reply[:30] in paused[0] and "setup problem" not in paused[0], paused  # nothing in the setup is wrong
    rows = shop.rows("SELECT status, attempts FROM message")
    statuses = Counter(r[0] for r in rows)
    assert len(rows) == 15 and statuses["sent"] == 5 == len(server.messages), statuses
    assert set(statuses) <= {"sent", "planned", "retry"}, statuses
    assert all(r[1] == 0 for r in rows if r[0] != "sent")
    assert server.quota_refused <= 2, server.quota_refused  # at most one per pooled connection already under way
    events = [e for e in map(_json, done.stderr.splitlines()) if e.get("event") == "dispatcher_paused"]
    assert events and events[0].get("setting") == "sending.daily_quota", events
