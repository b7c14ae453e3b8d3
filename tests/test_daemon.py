"""The daemon as an operator runs it: a real `python -m worker run` process, a real SMTP server,
real HTTP requests, real signals."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from email import message_from_bytes
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from tests.daemon_harness import LINK_KEY, NOW, REPO, Daemon, Shop, customer, http, make_shop, order
from tests.smtp_server import Behaviour, RecordingServer
from worker import daemon as daemon_module
from worker import log
from worker.adapters import shop as shop_data
from worker.adapters.plan_sql import PLAN_LOCKS
from worker.config import load_settings
from worker.core import tokens
from worker.domain import OrderRecord, OrderStatus
from worker.pipeline import plan
from worker.stopping import StopSignals

ONE_CLICK = b"List-Unsubscribe=One-Click"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def _recipients(server: RecordingServer) -> list[str]:
    return [r for m in server.messages for r in m.rcpt_tos]


def _notify_socket(tmp_path: Path, *, timeout: float | None = None) -> tuple[socket.socket, str]:
    """A (fake) systemd notify socket: the socket the daemon's notifications arrive on, and its path for
    ``NOTIFY_SOCKET``."""
    path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(path)
    if timeout is not None:
        notify.settimeout(timeout)
    return notify, path


def _one_email_under_systemd(
    tmp_path: Path, smtp_server: RecordingServer, *, timeout: float
) -> tuple[socket.socket, Shop, Daemon]:
    """A daemon started under a (fake) systemd notify socket, for a shop with one customer due a win-back email."""
    notify, notify_path = _notify_socket(tmp_path, timeout=timeout)
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    shop.add([1], days_ago=60)
    return notify, shop, Daemon.start(shop, env={"NOTIFY_SOCKET": notify_path})


def _after_extensions(notify: socket.socket) -> bytes:
    """The first notification that is not a catch-up pass's request for more start-up time (``EXTEND_TIMEOUT_USEC``)."""
    heard = notify.recv(4096)
    while b"EXTEND_TIMEOUT_USEC" in heard:
        heard = notify.recv(4096)
    return heard


def _local(url: str, daemon: Daemon) -> str:
    """The public link from an email, sent to the daemon's loopback port (as a reverse proxy would)."""
    parts = urllib.parse.urlsplit(url)
    return daemon.url(parts.path + "?" + parts.query)


def test_fast_cron_plans_and_sends_and_an_unsubscribed_customer_gets_nothing_afterwards(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a shop with two customers due a win-back and two who are not (yet)
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="*/1 * * * * *")
    shop.add([1, 2], days_ago=60)
    shop.add([3, 4], days_ago=10)
    daemon = Daemon.start(shop)
    try:
        # When the daemon runs, it plans (at start-up: it never planned before) and sends
        daemon.wait_for(lambda: len(smtp_server.messages) == 2, why="two win-back emails")
        assert sorted(_recipients(smtp_server)) == ["c1@example.com", "c2@example.com"]
        # the server has the mail a moment before the daemon has recorded and logged it: wait for the log
        daemon.wait_for(lambda: sum(e["created"] for e in daemon.named("campaign_planned")) == 2,
                        why="campaign_planned events for two emails")
        daemon.wait_for(lambda: len(daemon.named("email_sent")) == 2, why="two email_sent events")

        # And a mailbox provider POSTs the one-click link from customer 1's email (RFC 8058)
        mail = message_from_bytes(next(m.data for m in smtp_server.messages if "c1@example.com" in m.rcpt_tos))
        assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        link = re.search(r"<(https://[^>]+)>", mail["List-Unsubscribe"])
        assert link is not None
        status, _body, headers = http("POST", _local(link.group(1), daemon), ONE_CLICK, FORM)
        assert status == 200 and "Location" not in headers
        assert shop.scalar("SELECT reason FROM suppression WHERE email = 'c1@example.com'") == "unsubscribed"

        # And customer 3 unsubscribes before they are due, customer 4 does not
        token = tokens.sign("u", str(shop.customer_id("C3")), LINK_KEY.encode(), shop="shop.example")
        assert http("POST", daemon.url(f"/unsubscribe?t={token}"), ONE_CLICK, FORM)[0] == 200

        # When both become due, the next cron firings plan again
        shop.add([3, 4], days_ago=60)
        daemon.wait_for(lambda: "c4@example.com" in _recipients(smtp_server), why="customer 4's email")
        n_plans = len(daemon.named("campaign_planned"))
        daemon.wait_for(lambda: len(daemon.named("campaign_planned")) >= n_plans + 2, why="two more planning runs")

        # Then the unsubscribed customer received nothing, and the ledger has no row for them
        assert sorted(_recipients(smtp_server)) == ["c1@example.com", "c2@example.com", "c4@example.com"]
        assert shop.scalar("SELECT count(*) FROM message WHERE email = 'c3@example.com'") == 0
        health = daemon.wait_event("health")
        assert {"planned", "sent", "failed", "uncertain", "queue_depth", "rate_per_minute"} <= health.keys()
    finally:
        assert daemon.stop() == 0
    assert daemon.named("daemon_stopped")


def _readiness(daemon: Daemon, probe: str = "/healthz") -> tuple[int, str]:
    """A probe's status code and the state its body names (``ok``, ``starting``, ``stopping``…)."""
    status, body, _ = http("GET", daemon.url(probe))
    return status, json.loads(body)["status"]


def test_links_healthz_metrics_and_readiness(tmp_path: Path, smtp_server: RecordingServer) -> None:
    # Given a daemon under a (fake) systemd notify socket, and one sent email
    notify, shop, daemon = _one_email_under_systemd(tmp_path, smtp_server, timeout=10)
    try:
        assert b"READY=1" in _after_extensions(notify)  # (the catch-up pass asks for more start-up time first)
        daemon.wait_for(lambda: smtp_server.messages, why="the email")
        cid = shop.customer_id("C1")
        token = tokens.sign("u", str(cid), LINK_KEY.encode(), shop="shop.example")

        # A GET (what a link scanner does) shows a page with a button and changes nothing
        status, page, _ = http("GET", daemon.url(f"/unsubscribe?t={token}"))
        assert status == 200 and "Berhenti berlangganan" in page and 'method="post"' in page
        assert "c1@example.com" not in page
        assert http("HEAD", daemon.url(f"/unsubscribe?t={token}"))[0] == 200  # (a prefetcher's HEAD, likewise)
        assert shop.scalar("SELECT count(*) FROM suppression") == 0

        # `curl -X POST -d List-Unsubscribe=One-Click <link>` → 200, suppressed; again → 200, still one row
        for _ in range(2):
            status, page, headers = http("POST", daemon.url(f"/unsubscribe?t={token}"), ONE_CLICK, FORM)
            assert status == 200 and "Location" not in headers and "Set-Cookie" not in headers
        assert shop.rows("SELECT email, reason FROM suppression") == [("c1@example.com", "unsubscribed")]

        # A tampered, truncated or forged token → 400 and nothing changes
        payload, mac = tokens.sign("u", str(cid + 1), LINK_KEY.encode(), shop="shop.example").split(".")
        forged = tokens.sign("u", str(cid + 1), b"x" * 32, shop="shop.example")
        bad = [token[:-3], payload + "." + token.split(".")[1], forged, "", mac]
        for t in bad:
            assert http("POST", daemon.url(f"/unsubscribe?t={t}"), ONE_CLICK, FORM)[0] == 400
            assert http("GET", daemon.url(f"/feedback?t={t}"))[0] == 400
        # a customer whose unsubscribe link no longer verifies (cut short by a mail client, or signed with a key
        # since retired) is not left at a dead end: the page gives the unsubscribe address to write to
        status, page, _ = http("GET", daemon.url(f"/unsubscribe?t={token[:-3]}"))
        assert status == 400 and '<a href="mailto:unsubscribe@toko-kembali.example">' in page, page
        assert "mailto:" not in http("GET", daemon.url(f"/feedback?t={token[:-3]}"))[1]
        # an unsubscribe token is not a feedback token
        assert http("GET", daemon.url(f"/feedback?t={token}"))[0] == 400
        assert shop.scalar("SELECT count(*) FROM suppression") == 1
        assert shop.scalar("SELECT count(*) FROM feedback") == 0

        # Feedback: a GET of every rating link (what a link scanner does) shows the rating with a button and
        # records nothing; the customer's button (a POST) records it, and a later one changes nothing
        ratings = {n: tokens.sign("f", f"O1:{n}", LINK_KEY.encode(), shop="shop.example") for n in range(1, 6)}
        for n, t in ratings.items():
            status, page, _ = http("GET", daemon.url(f"/feedback?t={t}"))
            assert status == 200 and f"Kakak memilih {n} bintang" in page and 'method="post"' in page, page
            assert "<textarea" in page
            # a HEAD (a prefetcher's) answers as the GET would, the same headers without the body
            status, nothing, head = http("HEAD", daemon.url(f"/feedback?t={t}"))
            assert status == 200 and nothing == "" and head["Content-Length"] == str(len(page.encode()))
        assert shop.scalar("SELECT count(*) FROM feedback") == 0
        status, page, _ = http("POST", daemon.url(f"/feedback?t={ratings[5]}"), b"comment=", FORM)
        assert status == 200 and "(5 bintang)" in page
        # (control characters are dropped: PostgreSQL's text cannot hold a NUL, and none belongs in a comment)
        comment = urllib.parse.urlencode({"comment": "<script>alert(1)</script>\x00 man\x1btap\r\nterima kasih"})
        status, page, _ = http("POST", daemon.url(f"/feedback?t={ratings[2]}"), comment.encode(), FORM)
        assert status == 200 and "&lt;script&gt;" in page and "<script>" not in page
        assert shop.rows("SELECT order_ref, score, comment FROM feedback") == [
            ("O1", 5, "<script>alert(1)</script> mantap\nterima kasih")
        ]
        # a second comment is thanked, not stored, and not logged as stored
        second = urllib.parse.urlencode({"comment": "lagi"}).encode()
        assert http("POST", daemon.url(f"/feedback?t={ratings[5]}"), second, FORM)[0] == 200
        assert shop.scalar("SELECT comment FROM feedback") == "<script>alert(1)</script> mantap\nterima kasih"
        # once recorded, a GET shows what was recorded
        status, page, _ = http("GET", daemon.url(f"/feedback?t={ratings[1]}"))
        assert status == 200 and "(5 bintang)" in page and "mantap" in page

        # Probes
        status, body, _ = http("GET", daemon.url("/healthz"))
        assert status == 200 and '"ok"' in body
        status, body, headers = http("GET", daemon.url("/metrics"))
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert 'kembali_messages{campaign="winback",state="sent"} 1' in body
        assert 'kembali_attempts_total{outcome="sent"} 1' in body
        assert "kembali_send_seconds_bucket{le=\"+Inf\"} 1" in body
        assert "kembali_queue_depth 0" in body
        assert http("GET", daemon.url("/nothing"))[0] == 404
        assert http("DELETE", daemon.url(f"/unsubscribe?t={token}"))[0] == 405
        # the probes only answer what reads them: a POST or DELETE is no health check or scrape
        assert _readiness(daemon, "/readyz") == (200, "ok")
        for method, path in (("POST", "/healthz"), ("POST", "/readyz"), ("DELETE", "/metrics"), ("PUT", "/metrics")):
            status, _body, headers = http(method, daemon.url(path), b"")
            assert status == 405 and headers["Allow"] == "GET, HEAD", (method, path, status)
        assert http("HEAD", daemon.url("/healthz"))[0] == 200
        assert not any(token in line or ratings[5] in line for line in daemon.lines)  # tokens never logged
    finally:
        assert daemon.stop() == 0
        notify.close()
    assert [e["chars"] for e in daemon.named("feedback_commented")] == [45]


def test_a_failing_database_write_is_a_500_and_the_log_names_no_address_or_comment(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    import sqlite3

    # Given a daemon whose database refuses new suppressions and comments (as a full disk or a lock would)
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    shop.add([1], days_ago=60)
    with contextlib.closing(sqlite3.connect(tmp_path / "kembali.db")) as conn, conn:
        conn.execute("CREATE TRIGGER no_suppression BEFORE INSERT ON suppression "
                     "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
        conn.execute("CREATE TRIGGER no_comment BEFORE UPDATE ON feedback "
                     "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    daemon = Daemon.start(shop)
    try:
        token = tokens.sign("u", str(shop.customer_id("C1")), LINK_KEY.encode(), shop="shop.example")
        rating = tokens.sign("f", "O1:5", LINK_KEY.encode(), shop="shop.example")
        # When the customer unsubscribes, and comments on a rating
        status, page, _ = http("POST", daemon.url(f"/unsubscribe?t={token}"), ONE_CLICK, FORM)
        assert status == 500 and "Traceback" not in page
        comment = urllib.parse.urlencode({"comment": "rahasia pribadi"}).encode()
        assert http("POST", daemon.url(f"/feedback?t={rating}"), comment, FORM)[0] == 500
        # Then the log says what failed, without the address or the comment (the statement's parameters)
        daemon.wait_for(lambda: len(daemon.named("web_handler_failed")) == 2, why="two web_handler_failed events")
        failures = daemon.named("web_handler_failed")
        assert all("disk says no" in e["error"] for e in failures), failures
    finally:
        assert daemon.stop() == 0
    assert not any("c1@example.com" in line or "rahasia" in line for line in daemon.lines), daemon.log()


BROKEN = "{% extends \"_layout.txt\" %}\n{% block content %}\nHalo {{ customer.first_name }\n{% endblock %}\n"


def test_sighup_with_a_broken_template_keeps_the_old_set_and_a_fixed_one_is_used(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="*/1 * * * * *")
    shop.add([1], days_ago=60)
    daemon = Daemon.start(shop)
    try:
        daemon.wait_for(lambda: len(smtp_server.messages) == 1, why="the first email")
        body_txt = shop.templates / "winback" / "id" / "body.txt"

        # When a template is broken on disk and the daemon gets SIGHUP
        body_txt.write_text(BROKEN, encoding="utf-8")
        daemon.signal(signal.SIGHUP)
        rejected = daemon.wait_event("reload_rejected")
        problem = daemon.wait_event("template_problem")
        # Then it names the file and line, and keeps the old set: the next email still renders
        assert problem["file"] == "winback/id/body.txt:3"
        assert "winback/id/body.txt:3" in rejected["first"]
        shop.add([2], days_ago=60)
        daemon.wait_for(lambda: len(smtp_server.messages) == 2, why="an email from the old templates")
        # the ledger records the send right after the server's reply, not at the same instant
        daemon.wait_for(lambda: shop.scalar("SELECT status FROM message WHERE email = 'c2@example.com'") == "sent",
                        why="c2's row recorded as sent")

        # When the template is fixed (with a visible change) and SIGHUP comes again, the new set is used
        fixed = BROKEN.replace(
            "{{ customer.first_name }\n", "{{ customer.first_name }} VERSI-BARU\n{{ unsubscribe_url }}\n")
        body_txt.write_text(fixed, encoding="utf-8")
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("reload_done")
        shop.add([3], days_ago=60)
        daemon.wait_for(lambda: len(smtp_server.messages) == 3, why="an email from the new templates")
        newest = next(m for m in smtp_server.messages if "c3@example.com" in m.rcpt_tos)
        assert b"VERSI-BARU" in newest.data
        versions = shop.rows("SELECT email, template_version FROM message ORDER BY id")
        assert versions[0][1] == versions[1][1] != versions[2][1]
    finally:
        assert daemon.stop() == 0


def test_reload_done_names_a_new_version_after_an_edit_of_an_english_template(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a running daemon, reloaded once as it is
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    daemon = Daemon.start(shop)
    try:
        daemon.wait_event("daemon_started")
        daemon.signal(signal.SIGHUP)
        before = daemon.wait_event("reload_done")["templates"]
        # When the operator edits the English birthday subject alone and reloads
        subject = shop.templates / "birthday" / "en" / "subject.txt"
        subject.write_text("Happy birthday from us! " + subject.read_text(encoding="utf-8"), encoding="utf-8")
        daemon.signal(signal.SIGHUP)
        after = daemon.wait_event("reload_done", after=1)["templates"]
    finally:
        assert daemon.stop() == 0
    # Then the line that says the reload took names another version of the English birthday templates, of no
    # other: the version was the Indonesian templates' alone, the same after an edit of the English ones
    changed = set(before.split(",")) ^ set(after.split(","))
    assert changed and all(part.startswith("birthday/en@") for part in changed), (before, after)


def test_a_reload_refusing_a_filter_that_does_not_exist_names_its_file_and_line(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    daemon = Daemon.start(shop)
    try:
        daemon.wait_event("daemon_started")
        # When the layout every email extends is saved with a filter Kembali does not have, and SIGHUP comes
        layout = shop.templates / "_layout.txt"
        text = layout.read_text(encoding="utf-8")
        assert "{{ shop.postal_address }}" in text
        layout.write_text(text.replace("{{ shop.postal_address }}", "{{ shop.postal_address | idr }}"))
        line = next(i for i, row in enumerate(layout.read_text().splitlines(), start=1) if "| idr" in row)
        daemon.signal(signal.SIGHUP)
        # Then the log names the file and line, as for any other template problem (it said only
        # error="TemplateAssertionError: No filter named 'idr'.")
        problem = daemon.wait_event("template_problem")
        rejected = daemon.wait_event("reload_rejected")
        assert problem["file"] == f"_layout.txt:{line}" and "No filter named 'idr'" in problem["error"], problem
        assert f"_layout.txt:{line}" in rejected["first"], rejected
    finally:
        assert daemon.stop() == 0


def test_a_daemon_starts_beside_a_copy_of_a_campaign_folder_that_no_campaign_uses(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given the operator's backup of the win-back templates under a name no campaign sends from
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    shutil.copytree(shop.templates / "winback", shop.templates / "backup")
    # When the daemon starts, it starts (it refused: exit 2, "unknown campaign 'backup'")
    daemon = Daemon.start(shop)
    try:
        daemon.wait_event("daemon_started")
        assert not any("template_problem" in line for line in daemon.lines), daemon.log()
    finally:
        assert daemon.stop() == 0


def test_the_daemons_cron_runs_on_the_shops_clock_whatever_the_hosts_zone(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a shop in Jakarta planning every second of one hour of its clock, the hour it is there now, on a host
    # whose clock is set to New York (that hour there is 11 or 12 hours away)
    jakarta = ZoneInfo("Asia/Jakarta")
    if datetime.now(jakarta).minute == 59:
        time.sleep(61 - datetime.now(jakarta).second)  # not the hour's last minute: it would be over before a run
    hour = datetime.now(jakarta).hour
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron=f"* * {hour} * * *")
    daemon = Daemon.start(shop, env={"TZ": "America/New_York"})
    try:
        # When the daemon starts, then it schedules win-back in that hour of Jakarta's, and runs it there: the
        # start's catch-up pass and then passes of the schedule's
        scheduled = daemon.wait_event("job_scheduled", where=lambda e: e.get("job") == "plan:winback")
        next_run = datetime.fromisoformat(scheduled["next_run"])
        assert (next_run.utcoffset(), next_run.hour) == (timedelta(hours=7), hour), scheduled
        daemon.wait_for(lambda: len([e for e in daemon.named("campaign_planned") if e["campaign"] == "winback"]) >= 3,
                        timeout=20, why="win-back planned by its schedule on the shop's clock")
    finally:
        assert daemon.stop() == 0


def test_a_reload_that_moves_the_shop_to_another_zone_moves_its_cron_times_there(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a daemon of a shop in Jakarta (the default) planning at 09:00 every day
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    daemon = Daemon.start(shop)
    try:
        daemon.wait_event("daemon_started")
        first = datetime.fromisoformat(daemon.named("job_scheduled")[-1]["next_run"])
        assert (first.utcoffset(), first.hour) == (timedelta(hours=7), 9)

        # When the operator moves the shop to London (a reload takes [shop]) and sends SIGHUP
        text = shop.config.read_text(encoding="utf-8")
        shop.config.write_text(text.replace("[shop]\n", '[shop]\ntime_zone = "Europe/London"\n', 1), encoding="utf-8")
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("reload_done")

        # Then the plan runs at 09:00 on London's clock, as shop.time_zone says cron times are: it stayed at 09:00
        # in Jakarta (02:00 in London) until a restart, while quiet hours and the daily quota moved to London
        london = ZoneInfo("Europe/London")
        after = [e for e in daemon.named("job_scheduled") if e["job"] == "plan:winback"][-1]
        moved = datetime.fromisoformat(after["next_run"])
        assert (moved.astimezone(london).hour, moved.astimezone(london).minute) == (9, 0), after
    finally:
        assert daemon.stop() == 0


def test_a_campaign_a_reload_turns_on_is_planned_at_once_as_a_restart_would_not_at_its_next_cron_time(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a daemon whose win-back is off, planned once a year, and a customer due a win-back
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 0 1 1 *",
                     extra="[campaigns.winback]\nenabled = false\n")
    shop.add([1], days_ago=60)
    daemon = Daemon.start(shop)
    try:
        daemon.wait_event("daemon_started")
        # When the operator turns win-back on and reloads
        shop.config.write_text(shop.config.read_text(encoding="utf-8").replace("enabled = false", "enabled = true"),
                               encoding="utf-8")
        daemon.signal(signal.SIGHUP)
        # Then it is planned now, never having been, as a restart plans it: it waited for 1 January
        caught = daemon.wait_event("plan_catch_up", where=lambda e: e.get("campaign") == "winback")
        assert (caught["last_run"], caught["trigger"]) == ("never", "SIGHUP"), caught
        daemon.wait_for(lambda: _recipients(smtp_server) == ["c1@example.com"], why="the win-back email")
        # and a reload that changes nothing plans nothing again (its planning time has not come since)
        reloads = len(daemon.named("reload_done"))
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("reload_done", after=reloads)
        time.sleep(1)
        assert len(daemon.named("campaign_planned")) == 1, daemon.log()
    finally:
        assert daemon.stop() == 0


def test_a_daemon_warns_of_a_campaign_whose_planning_cron_never_runs(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given planning on 31 February, a cron no day matches (crontab's way to pause a job)
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 0 31 2 *")
    shop.add(range(2), days_ago=60)  # (due a win-back)
    # When the daemon starts, it starts, and warns that win-back is never planned, naming the key and why: its only
    # trace was job_scheduled with an empty next_run
    daemon = Daemon.start(shop)
    try:
        warning = daemon.wait_event("campaign_never_planned", where=lambda e: e.get("campaign") == "winback")
        assert (warning["level"], warning["setting"], warning["cron"], warning["why"]) == (
            "warning", "schedule.default_plan_cron", "0 0 31 2 *", "no month it names (2) has a day 31"), warning
        daemon.wait_event("daemon_started")
        daemon.wait_event("health", timeout=10, after=2)  # (a maintenance or two since)
    finally:
        assert daemon.stop() == 0
    # And it is never planned indeed: not once at start-up as a campaign never planned before (a paused campaign
    # on a new install sent its emails all the same)
    assert not daemon.named("plan_catch_up"), daemon.log()
    assert shop.scalar("SELECT count(*) FROM message") == 0


SLOW = (
    "{% extends \"_layout.txt\" %}\n{% block content %}\nHalo {{ customer.first_name }}\n{{ unsubscribe_url }}\n"
    "{% for a in range(1500) %}{% for b in range(1500) %}{% endfor %}{% endfor %}{% endblock %}\n"
)


def test_a_template_saved_while_a_watched_reload_runs_is_picked_up_by_the_next_one(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a daemon that watches its templates
    shop = _watching_shop(tmp_path, smtp_server, "*/1 * * * * *")
    daemon = Daemon.start(shop)
    try:
        daemon.wait_event("daemon_started")
        # When one template is saved (its check takes a while), and another while that reload is checking
        (shop.templates / "winback" / "id" / "body.txt").write_text(SLOW, encoding="utf-8")
        daemon.wait_event("reload_started")
        time.sleep(0.3)  # its copy of the templates is taken; it is checking them
        subject = shop.templates / "winback" / "id" / "subject.txt"
        subject.write_text("VERSI-BARU untuk {{ customer.first_name }}\n", encoding="utf-8")
        daemon.wait_event("reload_done", timeout=30)
        # Then a second reload takes the later edit too, and the next email has the new subject
        daemon.wait_event("reload_done", timeout=20, after=1)
        shop.add([1], days_ago=60)
        daemon.wait_for(lambda: smtp_server.messages, timeout=20, why="the email")
        assert b"VERSI-BARU" in smtp_server.messages[0].data
    finally:
        assert daemon.stop() == 0


def test_a_template_saved_while_the_start_up_check_runs_is_picked_up_by_the_watcher(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a daemon that watches its templates, whose start-up check takes a while
    shop = _watching_shop(tmp_path, smtp_server, "*/1 * * * * *")
    (shop.templates / "winback" / "id" / "body.txt").write_text(SLOW, encoding="utf-8")
    daemon = Daemon.start(shop)
    try:
        # When a template is saved while that check runs (its copy of the templates taken)
        daemon.wait_event("daemon_starting")
        time.sleep(0.3)
        subject = shop.templates / "winback" / "id" / "subject.txt"
        subject.write_text("VERSI-BARU untuk {{ customer.first_name }}\n", encoding="utf-8")
        daemon.wait_event("daemon_started", timeout=30)
        # Then the watcher reloads it, and the next email has the new subject: the daemon took the files as they were
        # after its check for those it had loaded, and ran on the old subject until the next edit or SIGHUP
        daemon.wait_event("reload_done", timeout=30)
        shop.add([1], days_ago=60)
        daemon.wait_for(lambda: smtp_server.messages, timeout=20, why="the email")
        assert b"VERSI-BARU" in smtp_server.messages[0].data
    finally:
        assert daemon.stop() == 0


def test_a_burst_of_sighups_is_one_reload_under_way_and_one_after_it(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    daemon = Daemon.start(shop)
    try:
        daemon.wait_event("daemon_started")
        # When `systemctl reload` is run over and over (a deploy script's loop, an impatient operator) while the
        # first reload is checking the templates
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("reload_started")
        for _ in range(5):
            time.sleep(0.05)  # (signals sent at once reach the process as one: the kernel does not queue them)
            daemon.signal(signal.SIGHUP)
        # Then one reload waits behind the one under way and the others join it (each logged)
        daemon.wait_event("reload_done", timeout=30, after=1)
        assert len(daemon.named("reload_queued")) == 1
        assert daemon.named("reload_coalesced")
    finally:
        assert daemon.stop() == 0
    assert len(daemon.named("reload_started")) == 2, daemon.log()
    assert len(daemon.named("reload_done")) == 2


def test_templates_that_cannot_be_copied_are_a_rejected_reload_or_a_refused_start_leaving_no_copy(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    daemon = Daemon.start(shop, env={"TMPDIR": str(tmp)})
    try:
        daemon.wait_event("daemon_started")
        # When a file in the templates folder cannot be read (here a link to a file that is gone) and SIGHUP comes
        (shop.templates / "winback" / "notes.txt").symlink_to(tmp_path / "gone.txt")
        daemon.signal(signal.SIGHUP)
        # Then the reload is rejected naming the file, the old set stays, and the half-made copy is removed
        rejected = daemon.wait_event("reload_rejected")
        assert "cannot copy" in rejected["error"] and "winback/notes.txt" in rejected["error"], rejected
        assert len(list(tmp.iterdir())) == 1  # the running set's copy
        assert not any("Traceback" in line or "never retrieved" in line for line in daemon.lines), daemon.log()
    finally:
        assert daemon.stop() == 0
    assert list(tmp.iterdir()) == []
    # And a start with that folder is refused as a configuration error (exit 2), with nothing left behind
    proc = subprocess.run([sys.executable, "-m", "worker", "--config", str(shop.config), "run"], cwd=REPO,
                          env={**os.environ, "KEMBALI_LINK_SECRET": LINK_KEY, "TMPDIR": str(tmp)},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "winback/notes.txt" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert list(tmp.iterdir()) == []


def test_sighup_with_a_templates_folder_that_is_not_there_names_the_line_of_its_key(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    daemon = Daemon.start(shop)
    try:
        daemon.wait_event("daemon_started")
        # When the config names a templates folder that is not there (a typo) and SIGHUP comes
        text = shop.config.read_text(encoding="utf-8")
        shop.config.write_text(text.replace(f'dir = "{shop.templates}"', 'dir = "templatez"'), encoding="utf-8")
        line = shop.config.read_text(encoding="utf-8").splitlines().index('dir = "templatez"') + 1
        daemon.signal(signal.SIGHUP)
        # Then the reload is rejected naming the file, the line and the key, as a start with it is (no line before)
        rejected = daemon.wait_event("reload_rejected")
        assert rejected["error"] == f"{shop.config}: line {line}: 'templates.dir' '{tmp_path / 'templatez'}' is not " \
                                    "a folder", rejected["error"]
    finally:
        assert daemon.stop() == 0


def test_sighup_with_another_link_key_variable_is_rejected_until_a_restart_and_links_keep_working(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a daemon whose links are signed with KEMBALI_LINK_SECRET, and another key in SHOP_LINK_KEY
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    shop.add([1], days_ago=60)
    other = "shop-link-key-abcdef0123456789"
    daemon = Daemon.start(shop, env={"SHOP_LINK_KEY": other})
    try:
        daemon.wait_event("daemon_started")
        # When the config is changed to name SHOP_LINK_KEY and SIGHUP comes
        text = shop.config.read_text(encoding="utf-8")
        shop.config.write_text(text.replace("[unsubscribe]\n", '[unsubscribe]\nsecret_env = "SHOP_LINK_KEY"\n', 1),
                               encoding="utf-8")  # fmt: skip
        daemon.signal(signal.SIGHUP)
        # Then the reload is rejected saying a restart applies it: the daemon's keys are read once, at start, so it
        # went on verifying with the old key while `run --once` and `preview` signed with the new one (every link
        # they sent a "this link doesn't work" page)
        rejected = daemon.wait_event("reload_rejected")
        assert "unsubscribe.secret_env" in rejected["error"] and "restart the daemon" in rejected["error"], rejected
        assert not daemon.named("reload_done") and not daemon.named("config_reloaded")
        # And links signed with the key it started with still work
        token = tokens.sign("u", str(shop.customer_id("C1")), LINK_KEY.encode(), shop="shop.example")
        assert http("POST", daemon.url(f"/unsubscribe?t={token}"), ONE_CLICK, FORM)[0] == 200
    finally:
        assert daemon.stop() == 0
    assert other not in daemon.text()


def test_sighup_changing_a_setting_only_a_restart_applies_names_the_key_and_its_line_never_the_value(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a daemon on its SQLite file
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    daemon = Daemon.start(shop)
    try:
        daemon.wait_event("daemon_started", timeout=60)
        # When the operator changes a [web] setting and the database's URL (with a password), and sends SIGHUP
        text = shop.config.read_text(encoding="utf-8")
        text = text.replace("[web]\nport = 0\n", "[web]\nport = 0\nrequest_timeout_seconds = 30.0\n", 1)
        text = re.sub(r'url = "sqlite[^"]*"', 'url = "postgresql+psycopg://kembali:Sup3rSecret@db.example/kembali"',
                      text, count=1)
        shop.config.write_text(text, encoding="utf-8")
        daemon.signal(signal.SIGHUP)
        # Then the reload is rejected naming each key a restart applies, and the line of the first, not only a
        # section ("[database, web] changed"), and not the URL's password
        rejected = daemon.wait_event("reload_rejected", timeout=30)
        line = 1 + text.split("\n").index('url = "postgresql+psycopg://kembali:Sup3rSecret@db.example/kembali"')
        assert f"line {line}: 'database.url'" in rejected["error"], rejected
        assert "'web.request_timeout_seconds'" in rejected["error"] and "restart the daemon" in rejected["error"]
    finally:
        assert daemon.stop(30) == 0
    assert "Sup3rSecret" not in daemon.text()


RUNAWAY = (
    "{% extends \"_layout.txt\" %}\n{% block content %}\n"
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}\n{% endblock %}\n"
)


def test_sighup_with_a_runaway_template_is_refused_within_the_time_limit(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    """The sandbox does not bound CPU; the reload check renders in a helper process that stops the render on time
    (and is killed, should it not)."""
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, extra="[checks]\nrender_timeout_seconds = 0.5\n")
    shop.add([1], days_ago=60)
    daemon = Daemon.start(shop)
    try:
        daemon.wait_for(lambda: len(smtp_server.messages) == 1, why="the first email")
        (shop.templates / "winback" / "id" / "body.txt").write_text(RUNAWAY, encoding="utf-8")
        daemon.signal(signal.SIGHUP)
        problem = daemon.wait_event("template_problem")
        daemon.wait_event("reload_rejected")
        # named at the runaway loop's file and line, as preview and the ledger name a render error
        assert problem["file"] == "winback/id/body.txt:3" and "0.5" in problem["error"], problem
        # the daemon kept the old set and is still sending
        shop.add([2], days_ago=60)
        daemon.wait_for(lambda: len(smtp_server.messages) == 2, why="an email from the old templates")
    finally:
        assert daemon.stop() == 0


def test_a_daemon_paused_by_the_relays_daily_quota_waits_an_hour_and_fails_no_one(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a relay whose account may send 1 more message today, then answers Gmail's daily quota, and 4 customers
    smtp_server.account_quota = (1, "550 5.4.5 Daily user sending quota exceeded. d2si1 - gsmtp", "rcpt")
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *", pool_size=1)
    shop.add([1, 2, 3, 4], days_ago=60)
    daemon = Daemon.start(shop)
    try:
        # Then it pauses at once saying why, and tries again in an hour, not in a minute (before: 60 s, doubling up
        # to every 15 minutes, each try a refused message); the health line says it is paused and why
        paused = daemon.wait_event("dispatcher_paused")
        assert "daily sending limit" in paused["reason"] and paused["setting"] == "sending.daily_quota", paused
        scheduled = daemon.wait_event("dispatcher_retry_scheduled")
        assert scheduled["in_seconds"] == 3600, scheduled
        # a monitor is told sending is paused; a load balancer keeps routing the customers' links here, which work
        assert _readiness(daemon) == (503, "unhealthy")
        assert _readiness(daemon, "/readyz") == (200, "ok")
        token = tokens.sign("u", str(shop.customer_id("C2")), LINK_KEY.encode(), shop="shop.example")
        assert http("POST", daemon.url(f"/unsubscribe?t={token}"), ONE_CLICK, FORM)[0] == 200
        health = daemon.wait_event("health", where=lambda e: e["paused"])
        assert "daily sending limit" in health["paused_why"], health
        rows = shop.rows("SELECT status, attempts FROM message ORDER BY status")
        assert [r[0] for r in rows].count("sent") == 1 and len(rows) == 4, rows
        assert all(r[0] in ("planned", "retry") and r[1] == 0 for r in rows if r[0] != "sent"), rows
        assert smtp_server.quota_refused == 1
    finally:
        assert daemon.stop() == 0


def test_a_paused_daemon_waits_as_long_as_the_relay_said_before_it_tries_again(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a relay that turns this host away at the greeting for half an hour (a connection limit it keeps per
    # client IP), and a daemon that pauses on the first connection failure and would try again after 0.3 s
    smtp_server.greeting = "421 4.7.0 Too many connections from your IP, try again in 30 minutes"
    sending = "\n[sending]\npause_after_failures = 1\nretry_base_seconds = 0.1\npause_retry_seconds = 0.3\n"
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *", extra=sending)
    shop.add([1, 2], days_ago=60)
    daemon = Daemon.start(shop)
    try:
        # Then it pauses and waits the 30 minutes the relay named before it connects again, not 0.3 s, doubling
        # (each try one more refused connection the relay counts against this host)
        daemon.wait_event("dispatcher_paused")
        scheduled = daemon.wait_event("dispatcher_retry_scheduled")
        assert (scheduled["in_seconds"], scheduled["pauses_in_row"]) == (1800, 1), scheduled
        turned_away = smtp_server.connections  # (the pool's connections, opened at once)
        time.sleep(1.0)
        assert smtp_server.connections == turned_away
    finally:
        assert daemon.stop() == 0


def test_a_paused_daemon_tries_the_server_again_later_and_at_once_on_sighup(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given an SMTP server that refuses every connection at the greeting, and a daemon that pauses on the first
    # connection failure and tries again after 0.3 s (doubling)
    smtp_server.greeting = "554 5.7.1 No SMTP service here"
    sending = "\n[sending]\npause_after_failures = 1\nretry_base_seconds = 0.1\npause_retry_seconds = {}\n"
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *", extra=sending.format(0.3))
    shop.add([1, 2], days_ago=60)
    daemon = Daemon.start(shop)
    try:
        # Then it pauses naming the server's reply, tries again after 0.3 s, pauses again and waits 0.6 s
        paused = daemon.wait_event("dispatcher_paused")
        assert "554 5.7.1 No SMTP service here" in paused["reason"]
        first = daemon.wait_event("dispatcher_retry_scheduled")
        assert (first["in_seconds"], first["pauses_in_row"]) == (0.3, 1)
        resumed = daemon.wait_event("dispatcher_resumed")
        assert resumed["why"] == "retrying after 0.3 s" and "554" in resumed["was"]
        second = daemon.wait_event("dispatcher_retry_scheduled", where=lambda e: e["pauses_in_row"] == 2)
        assert second["in_seconds"] == 0.6

        # When the operator sets a long wait and reloads: the new configuration starts over and pauses again,
        # now for 600 s, and /healthz says so
        shop.config.write_text(shop.config.read_text().replace(sending.format(0.3), sending.format(600)))
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("dispatcher_retry_scheduled", timeout=30, where=lambda e: e["in_seconds"] == 600)
        status, body, _ = http("GET", daemon.url("/healthz"))
        assert status == 503 and '"paused"' in body

        # When the server is fixed and SIGHUP comes, the daemon tries at once (not in 600 s): the mail goes out
        smtp_server.greeting = None
        resumes = len(daemon.named("dispatcher_resumed"))
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("dispatcher_resumed", timeout=30, where=lambda e: "SIGHUP" in e["why"], after=resumes)
        daemon.wait_for(lambda: len(smtp_server.messages) == 2, timeout=30, why="both emails")
        daemon.wait_for(lambda: shop.scalar("SELECT count(*) FROM message WHERE status = 'sent'") == 2,
                        why="both rows recorded as sent")  # fmt: skip
        assert shop.scalar("SELECT count(*) FROM message WHERE status = 'failed'") == 0
        assert http("GET", daemon.url("/healthz"))[0] == 200
    finally:
        assert daemon.stop() == 0


PAUSING_SOON = ("\n[sending]\npause_after_failures = 3\nretry_base_seconds = 0.05\nretry_max_seconds = 0.1\n"
                "max_attempts = 3\npause_retry_seconds = 0.2\n")  # fmt: skip
"""Sending that pauses after three failures, retries due at once, and tries the server again after 0.2 s."""


def test_a_daemon_pausing_for_a_relay_in_trouble_counts_no_more_attempts_each_time_it_tries_again(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a relay whose disk is full: every RCPT TO gets "452 4.3.1 Insufficient system storage", whatever the
    # recipient's domain; retries due at once and a daemon that tries the server again after 0.2 s
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *", extra=PAUSING_SOON, pool_size=1)
    ids = range(1, 7)
    store = shop.store()
    try:
        shop_data.upsert_customers(store.engine, [replace(customer(i), email=f"c{i}@d{i}.example") for i in ids], NOW)
        shop_data.upsert_orders(store.engine, [order(i, days_ago=60) for i in ids], NOW)
    finally:
        store.close()
    for i in ids:
        smtp_server.on(f"c{i}@d{i}.example", Behaviour(rcpt_reply="452 4.3.1 Insufficient system storage"))
    daemon = Daemon.start(shop)
    try:
        # Then it pauses, tries again, pauses again…: the attempts counted are those before the third domain met
        # the failure, once, not more at each try (before: every message's attempts were used up within seconds
        # here, ~15 minutes with the default retries, and the whole queue failed)
        daemon.wait_event("dispatcher_retry_scheduled", timeout=30, where=lambda e: e["pauses_in_row"] == 4)
        assert shop.scalar("SELECT count(*) FROM message WHERE status = 'failed'") == 0
        assert shop.scalar("SELECT sum(attempts) FROM message") == 2

        # When the relay has room again, everyone gets theirs, once
        smtp_server.behaviours.clear()
        daemon.wait_for(lambda: shop.scalar("SELECT count(*) FROM message WHERE status = 'sent'") == 6, timeout=30,
                        why="all six rows recorded as sent")  # fmt: skip
        assert sorted(m.rcpt_tos for m in smtp_server.messages) == sorted((f"c{i}@d{i}.example",) for i in ids)
    finally:
        assert daemon.stop() == 0


def test_sigterm_mid_campaign_finishes_sends_under_way_and_exits_0(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a slow SMTP server and more mail than it can take before the signal
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    customers = range(1, 31)
    shop.add(customers, days_ago=60)
    for i in customers:
        smtp_server.on(f"c{i}@example.com", Behaviour(delay_at="data", delay_seconds=0.3))
    daemon = Daemon.start(shop)
    daemon.wait_for(lambda: len(smtp_server.messages) >= 3, why="the first emails")

    # When SIGTERM arrives mid-campaign
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0

    # Then no row is left in flight, everything the server accepted is recorded as sent,
    # and the rest waits in the queue for the next start
    statuses = dict(shop.rows("SELECT status, count(*) FROM message GROUP BY status"))
    assert "sending" not in statuses and "claimed" not in statuses and "uncertain" not in statuses
    assert statuses["sent"] == len(smtp_server.messages)
    assert statuses["sent"] + statuses.get("planned", 0) == 30 and statuses.get("planned", 0) > 0
    assert daemon.named("shutdown_requested")
    # and the log says so: the messages it had claimed and not begun went back to the queue (another worker sharing
    # the database takes them at once, not after their lease), and how many
    given_back = daemon.named("claims_given_back")
    assert [line["messages"] for line in given_back] == [statuses["planned"]], given_back
    names = [e.get("event") for e in daemon.events]
    assert names.index("shutdown_requested") < names.index("claims_given_back") < names.index("daemon_stopped")
    # and the last line says what this daemon did since it started, as `run --once`'s summary does: stopped
    # before its first health line, the per-message lines were the only trace of its sends
    stopped = daemon.named("daemon_stopped")[0]
    assert (stopped["planned"], stopped["sent"], stopped["failed"], stopped["uncertain"]) == (
        30, statuses["sent"], 0, 0)


def test_daemon_stopped_counts_the_sends_of_every_generation_a_reload_started(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a daemon sending to a slow server, reloaded (SIGHUP) mid-campaign: a new generation, a new dispatcher
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    shop.add(range(1, 21), days_ago=60)
    for i in range(1, 21):
        smtp_server.on(f"c{i}@example.com", Behaviour(delay_at="data", delay_seconds=0.2))
    daemon = Daemon.start(shop)
    daemon.wait_for(lambda: len(smtp_server.messages) >= 2, why="the first emails")
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("reload_done")
    before = len(smtp_server.messages)
    daemon.wait_for(lambda: len(smtp_server.messages) >= before + 2, why="emails after the reload")
    # When it stops
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    # Then its last line counts every email it sent, before the reload and after, no address in it
    sent = shop.scalar("SELECT count(*) FROM message WHERE status = 'sent'")
    stopped = daemon.named("daemon_stopped")[0]
    assert (stopped["planned"], stopped["sent"], stopped["failed"]) == (20, sent, 0)
    assert not any("@" in str(value) for value in stopped.values())


def test_sigterm_while_emails_wait_for_a_slow_rate_gives_them_and_their_daily_quota_back_at_once(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a slow rate (an email every 10 s: the next slots lie past the 5 s grace period), a daily quota, and six
    # customers due a win-back
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *",
                     extra="[sending]\nrate_per_second = 0.1\nburst = 1\ndaily_quota = 20\n")  # fmt: skip
    shop.add(range(1, 7), days_ago=60)
    daemon = Daemon.start(shop)
    daemon.wait_for(lambda: len(smtp_server.messages) >= 1, why="the first email")

    # When SIGTERM arrives while the other five wait for their slots
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0

    # Then they go back to the queue at once (the grace period is not used up: no send was under way), and the
    # day's quota counts the one email sent, not the five that wait for the next start
    assert not daemon.named("shutdown_grace_expired"), daemon.log()
    assert dict(shop.rows("SELECT status, count(*) FROM message GROUP BY status")) == {"sent": 1, "planned": 5}
    assert shop.scalar("SELECT day_count FROM rate_limit WHERE key = 'quota:daily'") == 1


def test_healthz_says_stopping_during_the_grace_period_while_the_links_still_work(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a daemon with a send under way to a slow server, and a grace period longer than that send
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    text = shop.config.read_text().replace("shutdown_grace_seconds = 5.0", "shutdown_grace_seconds = 20")
    shop.config.write_text(text)
    shop.add([1], days_ago=60)
    smtp_server.on("c1@example.com", Behaviour(delay_at="data", delay_seconds=4))
    daemon = Daemon.start(shop)
    daemon.wait_event("daemon_started")  # (the send may begin before the catch-up planning is done)
    daemon.wait_for(lambda: shop.scalar("SELECT count(*) FROM message WHERE status = 'sending'") == 1,
                    why="the send under way")
    assert _readiness(daemon) == (200, "ok")
    # When systemd stops it
    daemon.signal(signal.SIGTERM)
    daemon.wait_event("shutdown_requested")
    # Then, while the send finishes, a load balancer's probe is told to send nothing more here; a customer's
    # click is still served
    assert _readiness(daemon) == (503, "stopping")
    assert _readiness(daemon, "/readyz") == (503, "stopping")
    token = tokens.sign("u", str(shop.customer_id("C1")), LINK_KEY.encode(), shop="shop.example")
    assert http("GET", daemon.url(f"/unsubscribe?t={token}"))[0] == 200
    assert daemon.wait(20) == 0
    assert shop.scalar("SELECT status FROM message") == "sent"


def test_a_sighup_while_the_daemon_closes_does_not_kill_it(tmp_path: Path, smtp_server: RecordingServer) -> None:
    # Given a daemon stopping while a client holds a request open (closing waits a moment for it)
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    daemon = Daemon.start(shop, env={"TMPDIR": str(tmp)})
    daemon.wait_event("daemon_started")
    with socket.create_connection(("127.0.0.1", daemon.port)) as client:
        client.sendall(b"GET /healthz HTTP/1.1\r\n")
        daemon.signal(signal.SIGTERM)
        daemon.wait_event("daemon_stopped")
        # When a log rotation's `kill -HUP` comes as it closes
        daemon.signal(signal.SIGHUP)
        # Then it still exits 0 (not killed by the signal) and removes its template copy
        assert daemon.wait(10) == 0, daemon.log()
    assert list(tmp.iterdir()) == []


def _run_once(shop: Shop, *options: str) -> subprocess.Popen[str]:
    """`kembali [OPTIONS] run --once` on ``shop``, started (its output piped)."""
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "--config", str(shop.config), *options, "run", "--once"], cwd=REPO,
        env={**os.environ, "KEMBALI_LINK_SECRET": LINK_KEY}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("sig", "echoed"),
    [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGINT, True)],
    ids=["SIGINT", "SIGTERM", "SIGTERM-and-its-echo", "SIGINT-and-its-echo"],
)
def test_a_signal_stops_run_once_gracefully_leaving_nothing_in_flight(
    tmp_path: Path, smtp_server: RecordingServer, sig: signal.Signals, echoed: bool
) -> None:
    # Given `run --once` sending to a slow SMTP server more mail than it can take before the signal
    shop = make_shop(tmp_path, smtp_port=smtp_server.port)
    customers = range(1, 31)
    shop.add(customers, days_ago=60)
    for i in customers:
        smtp_server.on(f"c{i}@example.com", Behaviour(delay_at="data", delay_seconds=0.3))
    proc = _run_once(shop)
    try:
        deadline = time.monotonic() + 60
        while len(smtp_server.messages) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert len(smtp_server.messages) >= 3, "the first emails"
        # When Ctrl-C (SIGINT) or cron's `timeout` (SIGTERM) stops it
        before = len(smtp_server.messages)
        proc.send_signal(sig)
        if echoed:  # as coreutils' `timeout` does: the process, then its process group, so it comes twice
            time.sleep(0.05 if sig is signal.SIGTERM else 0.002)  # a SIGINT's echo comes at once, or it is a person
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Then the sends under way finished and were recorded (one per connection of the pool of 2, and at most one
    # that began as the signal came), the rest went back to the queue (with the 6 more senders that waited for a
    # connection), the summary says so, and the exit code is the shell's for that signal
    assert proc.returncode == 128 + sig.value, err
    assert len(smtp_server.messages) - before <= 3
    assert f"stopped early by {sig.name}" in out and "sent " in out, out
    statuses = dict(shop.rows("SELECT status, count(*) FROM message GROUP BY status"))
    assert "sending" not in statuses and "claimed" not in statuses and "uncertain" not in statuses, statuses
    assert statuses["sent"] == len(smtp_server.messages)
    assert statuses["sent"] + statuses.get("planned", 0) == 30 and statuses.get("planned", 0) > 0
    assert "stop_requested" in err and "stop_forced" not in err


def _two_sends_held(tmp_path: Path, smtp_server: RecordingServer, held: Behaviour) -> Shop:
    """A shop with two customers due a win-back email, whose sends the server holds as ``held`` says."""
    shop = make_shop(tmp_path, smtp_port=smtp_server.port)
    shop.add([1, 2], days_ago=60)
    for i in (1, 2):
        smtp_server.on(f"c{i}@example.com", held)
    return shop


def _until_both_are_sending(shop: Shop, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and shop.scalar(
        "SELECT count(*) FROM message WHERE status = 'sending'"
    ) < 2:
        time.sleep(0.05)


def test_run_once_stopped_while_its_sends_wait_at_rcpt_lets_them_finish_and_leaves_none_uncertain(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given `run --once` with two sends the server holds at RCPT TO (nothing of the messages sent yet)
    shop = _two_sends_held(tmp_path, smtp_server, Behaviour(delay_at="rcpt", delay_seconds=2))
    proc = _run_once(shop)
    try:
        _until_both_are_sending(shop, proc)
        # When cron's `timeout` stops it (run --once has no grace period to run out: it is not cut off)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Then both sends went on past RCPT TO and were recorded sent: none left for an operator to decide about
    assert proc.returncode == 128 + signal.SIGTERM.value, err
    assert dict(shop.rows("SELECT status, count(*) FROM message GROUP BY status")) == {"sent": 2}
    assert len(smtp_server.messages) == 2


def test_run_once_with_its_log_quietened_says_at_once_that_it_stops_and_what_a_second_ctrl_c_does(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given `run --once --log-level warning` (the log the demo runs with) whose two sends the server holds for long
    shop = _two_sends_held(tmp_path, smtp_server, Behaviour(delay_at="data", delay_seconds=4))  # (timeout: 5 s)
    proc = _run_once(shop, "--log-level", "warning")
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(iter(proc.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        _until_both_are_sending(shop, proc)
        # When the operator presses Ctrl-C
        proc.send_signal(signal.SIGINT)
        # Then it says at once, while the sends it waits for are still under way, that it stops and what a second
        # Ctrl-C would do: it said nothing until they ended (up to smtp.timeout_seconds), so an operator who took
        # it for hung pressed Ctrl-C again, and the messages being sent became uncertain
        deadline = time.monotonic() + 3
        while not any("stop_requested" in line for line in said) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the sends under way had ended"
        told = next((line for line in said if "stop_requested" in line), None)
        assert told is not None, said
        assert "sends under way finish" in told and "a second signal stops at once" in told, told
        assert proc.poll() is None, "the sends under way had ended"
        out, _ = proc.communicate(timeout=30)
        reader.join(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, said
    assert "stopped early by SIGINT" in out, out
    assert dict(shop.rows("SELECT status, count(*) FROM message GROUP BY status")) == {"sent": 2}


@pytest.mark.parametrize(
    ("signals", "verdicts"),
    [
        ([(0.0, "SIGTERM")], ["stop"]),
        ([(0.0, "SIGTERM"), (0.001, "SIGTERM")], ["stop", "echo"]),  # timeout: the process, then its group
        ([(0.0, "SIGTERM"), (0.001, "SIGTERM"), (0.002, "SIGTERM")], ["stop", "echo", "echo"]),
        ([(0.0, "SIGTERM"), (1.0, "SIGTERM")], ["stop", "force"]),  # a supervisor that means it
        ([(0.0, "SIGTERM"), (0.1, "SIGINT")], ["stop", "force"]),
        ([(0.0, "SIGINT"), (0.1, "SIGINT")], ["stop", "force"]),  # Ctrl-C twice, as quick as a person can
        ([(0.0, "SIGINT"), (0.002, "SIGINT")], ["stop", "echo"]),  # timeout -s INT: the process, then its group
        ([(0.0, "SIGINT"), (0.002, "SIGINT"), (0.3, "SIGINT")], ["stop", "echo", "force"]),
        ([(0.0, "SIGINT"), (0.1, "SIGTERM")], ["stop", "force"]),
    ],
)
def test_a_second_stop_signal_forces_but_an_echo_of_the_first_does_not(
    signals: list[tuple[float, str]], verdicts: list[str]
) -> None:
    now = [0.0]
    stop = StopSignals(monotonic=lambda: now[0])
    seen = []
    for at, name in signals:
        now[0] = at
        seen.append(stop.take(signal.Signals[name]))
    assert seen == verdicts
    assert stop.first is signal.Signals[signals[0][1]]


def test_sends_outliving_the_grace_period_become_uncertain_and_a_second_signal_exits_at_once(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    text = shop.config.read_text().replace("shutdown_grace_seconds = 5.0", "shutdown_grace_seconds = 0.5")
    shop.config.write_text(text)
    shop.add([1, 2], days_ago=60)
    for i in (1, 2):
        smtp_server.on(f"c{i}@example.com", Behaviour(delay_at="data", delay_seconds=3))
    daemon = Daemon.start(shop)
    daemon.wait_for(lambda: shop.scalar("SELECT count(*) FROM message WHERE status = 'sending'") == 2,
                    why="two sends under way")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(5) == 0
    assert daemon.named("shutdown_grace_expired")
    assert dict(shop.rows("SELECT status, count(*) FROM message GROUP BY status")) == {"uncertain": 2}

    # A second signal does not wait for anything. (The daemon was "down" over a 09:00 planning
    # time, so it plans once at start-up.)
    shop.add([3], days_ago=60)
    smtp_server.on("c3@example.com", Behaviour(delay_at="data", delay_seconds=3))
    shop.set_last_planned(datetime.now(UTC) - timedelta(days=2))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    daemon = Daemon.start(shop, env={"TMPDIR": str(tmp)})
    daemon.wait_for(lambda: shop.scalar("SELECT count(*) FROM message WHERE status = 'sending'") == 1,
                    why="a send under way")
    daemon.signal(signal.SIGTERM)
    daemon.signal(signal.SIGINT)
    assert daemon.wait(2) == 1
    assert daemon.named("plan_catch_up") and daemon.named("shutdown_forced")
    assert list(tmp.iterdir()) == []  # not even then is its template copy left behind


def _stopped_past_its_grace_period_with_two_sends_under_way(
    tmp_path: Path, smtp_server: RecordingServer
) -> tuple[Shop, Daemon]:
    """A daemon with a grace period of 0.5 s, stopped with two sends under way (the server's behaviours, set before,
    hold them), once it has exited."""
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    text = shop.config.read_text().replace("shutdown_grace_seconds = 5.0", "shutdown_grace_seconds = 0.5")
    shop.config.write_text(text)
    shop.add([1, 2], days_ago=60)
    daemon = Daemon.start(shop)
    try:
        daemon.wait_for(lambda: shop.scalar("SELECT count(*) FROM message WHERE status = 'sending'") == 2,
                        timeout=60, why="two sends under way")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    finally:
        if daemon.proc.poll() is None:  # (a failed wait above: no daemon left running after the test)
            daemon.stop()
    assert daemon.named("shutdown_grace_expired")
    return shop, daemon


def test_sends_the_grace_period_cut_short_are_each_named_as_uncertain_with_their_customer(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a daemon with two sends under way that outlast its grace period, when it is stopped
    for i in (1, 2):
        smtp_server.on(f"c{i}@example.com", Behaviour(delay_at="data", delay_seconds=3))
    shop, daemon = _stopped_past_its_grace_period_with_two_sends_under_way(tmp_path, smtp_server)
    # Then the log names each email left uncertain, whose customer may have it: the operator decides on each
    assert daemon.named("shutdown_abandoned")[0]["uncertain"] == 2
    named = sorted((e["campaign"], e["customer"], e["to"]) for e in daemon.named("email_uncertain"))
    assert named == [("winback", "C1", "c***@example.com"), ("winback", "C2", "c***@example.com")]
    assert all("grace period" in e["why"] for e in daemon.named("email_uncertain"))
    # each by the Message-ID a bounce or the relay's log would name it by, as the ledger has it
    ids = {e["message_id"] for e in daemon.named("email_uncertain")}
    assert ids == {r[0] for r in shop.rows("SELECT message_id FROM message WHERE status = 'uncertain'")}, ids


def test_the_daemons_last_line_counts_the_sends_its_grace_period_left_uncertain(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a daemon with two sends under way that outlast its grace period, when it is stopped
    for i in (1, 2):
        smtp_server.on(f"c{i}@example.com", Behaviour(delay_at="data", delay_seconds=3))
    _, daemon = _stopped_past_its_grace_period_with_two_sends_under_way(tmp_path, smtp_server)
    # Then daemon_stopped, what the daemon did since it started, counts the two it left uncertain: it said
    # uncertain=0 right after naming them, as if every email of the run had a known outcome
    (stopped,) = daemon.named("daemon_stopped")
    assert stopped["uncertain"] == 2 and stopped["sent"] == 0, stopped


@pytest.mark.parametrize("stall", ["greeting", "rcpt"])
def test_sends_the_grace_period_cut_short_before_the_message_left_go_back_to_the_queue_not_uncertain(
    tmp_path: Path, smtp_server: RecordingServer, stall: str
) -> None:
    # Given a daemon with two sends under way that the server holds past the grace period before any of the message
    # was handed over (its greeting comes late, or its reply to RCPT TO does), when it is stopped
    if stall == "greeting":
        smtp_server.greeting_delay = 3.0
    else:
        for i in (1, 2):
            smtp_server.on(f"c{i}@example.com", Behaviour(delay_at="rcpt", delay_seconds=3))
    shop, daemon = _stopped_past_its_grace_period_with_two_sends_under_way(tmp_path, smtp_server)
    # Then nothing of either message reached the server, and both went back to the queue, their attempts not
    # counted: sent at the next start, with no operator asked to decide about an email that was never sent
    assert smtp_server.messages == [] and smtp_server.data_taken == 0
    assert sorted(shop.rows("SELECT status, attempts FROM message")) == [("planned", 0), ("planned", 0)]
    assert not daemon.named("email_uncertain") and daemon.named("shutdown_abandoned")[0]["uncertain"] == 0


SLOW_LAYOUT = "{% for a in range(3000) %}{% for b in range(1000) %}{% endfor %}{% endfor %}"
"""Put before the shared text layout: every render takes a while (the start-up check, ~130 renders, some 20 s)."""


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the render helper, during the template check)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def _slow_start(tmp_path: Path, smtp_server: RecordingServer) -> tuple[Daemon, Path, Path]:
    """A daemon in the middle of its start-up template check (its render helper is up), and its TMPDIR."""
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *",
                     extra="[checks]\nrender_timeout_seconds = 30\n")
    layout = shop.templates / "_layout.txt"
    fast = layout.read_text(encoding="utf-8")
    layout.write_text(SLOW_LAYOUT + fast, encoding="utf-8")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    daemon = Daemon.start(shop, env={"TMPDIR": str(tmp)})
    daemon.wait_for(lambda: _children(daemon.proc.pid), timeout=30, why="the start-up check's render helper")
    layout.write_text(fast, encoding="utf-8")  # a reload, if any, checks quickly (start-up renders its own copy)
    return daemon, tmp, layout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_during_the_start_up_check_stops_at_once_cleanly_and_exits_0(
    tmp_path: Path, smtp_server: RecordingServer, sig: signal.Signals
) -> None:
    daemon, tmp, _ = _slow_start(tmp_path, smtp_server)
    helpers = _children(daemon.proc.pid)
    # When systemd stops the unit (or Ctrl-C) while the templates are being checked
    daemon.signal(sig)
    # Then it gives up the check (not some 20 s later), says so, exits 0 (systemd: a clean stop), and leaves no
    # render helper running and no template snapshot behind
    assert daemon.wait(10) == 0, daemon.log()
    assert daemon.named("shutdown_requested")[0]["during"] == "start-up"
    assert daemon.named("daemon_stopped")[0]["during"] == "start-up"
    assert not daemon.named("daemon_started")
    assert not [pid for pid in helpers if _alive(pid)]
    assert list(tmp.iterdir()) == []


def test_a_second_stop_signal_during_the_start_up_check_exits_at_once_leaving_no_template_copy(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    daemon, tmp, _ = _slow_start(tmp_path, smtp_server)
    daemon.signal(signal.SIGTERM)
    daemon.wait_event("shutdown_requested")
    daemon.signal(signal.SIGINT)
    assert daemon.wait(10) == 1, daemon.log()
    assert daemon.named("shutdown_forced")[0]["during"] == "start-up"
    assert list(tmp.iterdir()) == []


def test_sighup_during_start_up_does_not_kill_the_daemon_it_reloads_once_up(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    daemon, _, _ = _slow_start(tmp_path, smtp_server)
    try:
        # When `systemctl reload` (or a log rotation's kill -HUP) comes while the templates are being checked
        daemon.signal(signal.SIGHUP)
        # Then the daemon starts all the same, and reloads (once) after
        daemon.wait_event("daemon_started", timeout=60)
        daemon.wait_event("reload_done", timeout=30)
    finally:
        assert daemon.stop() == 0
    assert len(daemon.named("reload_started")) == 1


def test_a_stop_signal_during_a_reload_stops_its_check_and_leaves_nothing_in_the_temporary_folder(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a running daemon (its TMPDIR watched, under a fake systemd notify socket), paused by an SMTP server
    # that refuses it, whose templates on disk now take some 20 s to check
    notify, notify_path = _notify_socket(tmp_path)
    smtp_server.greeting = "554 5.7.1 No SMTP service here"
    extra = ("[checks]\nrender_timeout_seconds = 30\n"
             "[sending]\npause_after_failures = 1\nretry_base_seconds = 0.1\npause_retry_seconds = 600\n")
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *", extra=extra)
    shop.add([1], days_ago=60)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    daemon = Daemon.start(shop, env={"TMPDIR": str(tmp), "NOTIFY_SOCKET": notify_path})
    daemon.wait_event("dispatcher_retry_scheduled", timeout=30)
    layout = shop.templates / "_layout.txt"
    layout.write_text(SLOW_LAYOUT + layout.read_text(encoding="utf-8"), encoding="utf-8")
    # When `systemctl reload`, and systemd stops the unit while that reload is checking the templates
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("reload_started")
    daemon.wait_for(lambda: _children(daemon.proc.pid), timeout=30, why="the reload check's render helper")
    helpers = _children(daemon.proc.pid)
    daemon.signal(signal.SIGTERM)
    # Then the check gives up (not some 20 s later), the log says what became of the reload, the daemon exits 0,
    # and neither its template copies nor a render helper are left behind
    assert daemon.wait(10) == 0, daemon.log()
    assert daemon.named("reload_stopped") and not daemon.named("reload_done")
    assert not [pid for pid in helpers if _alive(pid)]
    assert list(tmp.iterdir()) == []
    # And the reload's end neither told systemd the daemon was ready again after STOPPING=1 nor resumed the
    # stopped dispatcher
    notify.setblocking(False)
    told = []
    with contextlib.suppress(BlockingIOError):
        while True:
            told.append(notify.recv(4096))
    notify.close()
    stopping = next(i for i, m in enumerate(told) if b"STOPPING=1" in m)
    assert not [m for m in told[stopping:] if b"READY=1" in m], told
    assert not daemon.named("dispatcher_resumed"), daemon.log()


@pytest.mark.postgres
@pytest.mark.parametrize("held", ["customer", "job_run"], ids=["the-pass", "the-look-at-its-last-run"])
def test_a_database_error_in_catch_up_planning_is_logged_the_daemon_starts_and_a_maintenance_plans_it_again(
    tmp_path: Path, smtp_server: RecordingServer, pg_migrated_url: str, held: str
) -> None:
    # Given a daemon that was down over a planning time, whose catch-up pass is held up (as a large shop's is), or
    # the look at when it last ran, before the pass
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *", db_url=pg_migrated_url)
    shop.add([1], days_ago=60)
    holder = sa.create_engine(pg_migrated_url)
    daemon = None
    try:
        with holder.connect() as conn:
            conn.execute(sa.text(f"LOCK TABLE {held} IN ACCESS EXCLUSIVE MODE"))
            daemon = Daemon.start(shop)
            if held == "customer":
                daemon.wait_event("plan_catch_up", timeout=30)
            # the pass's query waiting on the lock (one not sent yet would go through once the lock is let go)
            with holder.connect().execution_options(isolation_level="AUTOCOMMIT") as watcher:
                daemon.wait_for(lambda: watcher.execute(sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'")).scalar_one() > 0, why="the catch-up pass waiting on the lock")
            # When the database drops the daemon's connections meanwhile (a failover, a restart)
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
            conn.rollback()
        # Then the failed pass is logged, with the error's first line only, as a scheduled one's would be, and the
        # daemon starts all the same (not a traceback and exit 1 with its sends cut short)
        failed = daemon.wait_event("job_failed", timeout=30, where=lambda e: e.get("during") == "catch-up")
        assert failed["job"] == "plan:winback" and "OperationalError" in failed["error"], failed
        assert "SELECT" not in failed["error"]
        daemon.wait_event("daemon_started", timeout=30)
        assert not any(line.startswith("Traceback") for line in daemon.lines), daemon.log()
        # and, the database back, a maintenance plans it again and the customer gets the email: the daemon, running
        # on, planned nothing until the next day's 09:00 (a restart would have planned it at once)
        retry = daemon.wait_event("plan_retry_scheduled", where=lambda e: e.get("campaign") == "winback")
        assert retry["in_seconds"] == 1.0, retry  # the harness's maintenance interval
        again = daemon.wait_event("plan_catch_up", after=1 if held == "customer" else 0,
                                  where=lambda e: e.get("campaign") == "winback")  # fmt: skip
        assert "failed" in again["missed"], again
        daemon.wait_for(lambda: _recipients(smtp_server) == ["c1@example.com"], timeout=20, why="the win-back")
        assert shop.scalar("SELECT count(*) FROM job_run WHERE name = 'plan:winback'") == 1
    finally:
        holder.dispose()
        if daemon is not None:
            assert daemon.stop() == 0


def _allow_connections(pg_admin: sa.Engine, db_url: str, allowed: bool) -> None:
    """Let the database take connections again, or refuse them and cut those it has (a database gone away)."""
    name = sa.engine.make_url(db_url).database
    with pg_admin.connect() as conn:
        conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}'))
        if not allowed:
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                         {"n": name})


def _two_sent_on_postgresql(shop: Shop, pg_admin: sa.Engine) -> tuple[Daemon, Callable[[bool], None]]:
    """A daemon started on ``shop`` (on PostgreSQL) once it has sent win-backs to two customers, and what sends its
    database away and lets it back (``_allow_connections``)."""
    shop.add([1, 2], days_ago=60)
    daemon = Daemon.start(shop)
    try:
        daemon.wait_for(lambda: len(daemon.named("email_sent")) == 2, why="two email_sent events")
    except BaseException:
        daemon.stop()
        raise
    return daemon, functools.partial(_allow_connections, pg_admin, shop.db_url)


@contextlib.contextmanager
def _stopped_with_the_database_away(
    tmp_path: Path, smtp_server: RecordingServer, db_url: str, pg_admin: sa.Engine, *, grace: float, server_delay: float
) -> Iterator[tuple[Shop, Daemon, Callable[[], None]]]:
    """A daemon with two sends under way to a server that answers their DATA ``server_delay`` s late, and a grace
    period of ``grace`` s; the database goes away (its connections cut and refused), then SIGTERM. Yields the shop,
    the daemon, and what lets the database back (done again at the end)."""
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *", db_url=db_url)
    text = shop.config.read_text().replace("shutdown_grace_seconds = 5.0", f"shutdown_grace_seconds = {grace}")
    shop.config.write_text(text)
    shop.add([1, 2], days_ago=60)
    for i in (1, 2):
        smtp_server.on(f"c{i}@example.com", Behaviour(delay_at="data", delay_seconds=server_delay))
    allow = functools.partial(_allow_connections, pg_admin, db_url)
    daemon = Daemon.start(shop)
    try:
        # both on the wire: marked, and their data at the server, which holds its replies (a row marked and not yet
        # sent, its connection still opening on a loaded machine, is given back to the queue at SIGTERM)
        daemon.wait_for(lambda: smtp_server.data_taken == 2
                        and shop.scalar("SELECT count(*) FROM message WHERE status = 'sending'") == 2,
                        why="two sends under way")  # fmt: skip
        allow(False)
        daemon.signal(signal.SIGTERM)
        yield shop, daemon, functools.partial(allow, True)
    finally:
        allow(True)
        if daemon.proc.poll() is None:
            daemon.stop()


@pytest.mark.postgres
def test_when_the_database_is_gone_as_the_grace_period_runs_out_the_daemon_says_so_and_exits_1(
    tmp_path: Path, smtp_server: RecordingServer, pg_migrated_url: str, pg_admin: sa.Engine
) -> None:
    # Given a daemon with two sends under way to a slow server and a short grace period
    # When the database goes away, and systemd stops the daemon
    with _stopped_with_the_database_away(tmp_path, smtp_server, pg_migrated_url, pg_admin, grace=1,
                                         server_delay=5) as (shop, daemon, _):
        # Then, the grace period over, it cannot mark its rows: it says so and what becomes of them, and exits 1
        # (not 0 as if all were recorded; not a traceback)
        assert daemon.wait(20) == 1, daemon.log()
    failed = daemon.named("shutdown_abandon_failed")
    assert failed and "OperationalError" in failed[0]["error"] and "lease" in failed[0]["note"], daemon.log()
    assert daemon.named("daemon_stopped")[0]["exit_code"] == 1
    assert not any(line.startswith("Traceback") for line in daemon.lines), daemon.log()
    assert dict(shop.rows("SELECT status, count(*) FROM message GROUP BY status")) == {"sending": 2}


@pytest.mark.postgres
def test_sends_the_server_took_as_the_grace_period_ran_out_with_the_database_away_are_recorded_sent_once_it_is_back(
    tmp_path: Path, smtp_server: RecordingServer, pg_migrated_url: str, pg_admin: sa.Engine
) -> None:
    # Given a daemon with two sends under way to a slow server, When the database goes away, systemd stops the
    # daemon, the server takes both messages while the ledger cannot be written, and the grace period runs out as
    # the daemon tries again to write them
    with _stopped_with_the_database_away(tmp_path, smtp_server, pg_migrated_url, pg_admin, grace=3,
                                         server_delay=1) as (shop, daemon, back):
        daemon.wait_event("outcomes_not_written", timeout=15)
        back()  # and the database is back at once
        # Then the daemon writes what it kept, as it does when the sends ended within the grace period: both are
        # sent, not left 'sending' (to become uncertain at their leases' end) nor made uncertain by the shutdown
        assert daemon.wait(30) == 0, daemon.log()
    statuses = dict(shop.rows("SELECT status, count(*) FROM message GROUP BY status"))
    assert len(smtp_server.messages) == 2, (statuses, daemon.log())
    assert statuses == {"sent": 2}, daemon.log()
    assert not daemon.named("email_uncertain"), daemon.log()


@pytest.mark.postgres
def test_a_sighup_during_catch_up_planning_reloads_once_the_daemon_is_up_not_before(
    tmp_path: Path, smtp_server: RecordingServer, pg_migrated_url: str
) -> None:
    # Given a daemon under a (fake) systemd notify socket, whose catch-up pass is held up
    notify, notify_path = _notify_socket(tmp_path, timeout=30)
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *", db_url=pg_migrated_url)
    shop.add([1], days_ago=60)
    holder = sa.create_engine(pg_migrated_url)
    daemon = None
    try:
        with holder.connect() as conn:
            conn.execute(sa.text("LOCK TABLE customer IN ACCESS EXCLUSIVE MODE"))
            daemon = Daemon.start(shop, env={"NOTIFY_SOCKET": notify_path})
            daemon.wait_event("plan_catch_up", timeout=30)
            # When `systemctl reload` comes during that pass
            daemon.signal(signal.SIGHUP)
            daemon.wait_event("reload_queued")
            conn.rollback()
        # Then systemd hears READY=1 first from the daemon being up, not from the reload's end, and the reload
        # comes after (before it, only the catch-up's requests for more start-up time)
        heard = _after_extensions(notify)
        assert b"STATUS=running" in heard and b"READY=1" in heard
        daemon.wait_event("reload_done", timeout=30)
        names = [e["event"] for e in daemon.events]
        assert names.index("daemon_started") < names.index("reload_started")
    finally:
        holder.dispose()
        notify.close()
        if daemon is not None:
            assert daemon.stop() == 0


@pytest.mark.postgres
def test_a_stop_signal_during_a_scheduled_planning_pass_waits_for_it_and_says_so(
    tmp_path: Path, smtp_server: RecordingServer, pg_migrated_url: str
) -> None:
    # Given a running daemon planning every second, whose scheduled pass is held up (as a large shop's is)
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="*/1 * * * * *", db_url=pg_migrated_url)
    shop.add([1], days_ago=60)
    daemon = Daemon.start(shop)
    holder = sa.create_engine(pg_migrated_url)
    try:
        # (the email sent first: with the queue empty, the sender reads no customer row, only planning does)
        daemon.wait_for(lambda: daemon.named("email_sent"), timeout=30, why="the email_sent event")
        with holder.connect() as conn:
            conn.execute(sa.text("LOCK TABLE customer IN ACCESS EXCLUSIVE MODE"))
            # two firings in a row since the lock found the pass still going: it is held up (a firing during the
            # catch-up pass at start, skipped as well, was taken for this one, and the stop came with no pass going)
            skipped = len(daemon.named("job_skipped"))
            daemon.wait_event("job_skipped", timeout=30, after=skipped + 1)
            # When systemd stops it
            daemon.signal(signal.SIGTERM)
            # Then it says it waits for that pass (a pass cannot be stopped midway), and does not say it stopped
            waiting = daemon.wait_event("shutdown_waiting_for_planning")
            assert waiting["campaigns"] == "winback"
            assert not daemon.named("daemon_stopped") and daemon.proc.poll() is None
            conn.rollback()
        # And once the pass is done, it is recorded and logged, then the daemon says it stopped and exits 0,
        # without APScheduler's traceback for the cancelled job
        assert daemon.wait(30) == 0, daemon.log()
    finally:
        holder.dispose()
        if daemon.proc.poll() is None:
            daemon.stop()
    names = [e["event"] for e in daemon.events]
    after = names[names.index("shutdown_requested"):]
    assert after.index("campaign_planned") < after.index("daemon_stopped"), after
    assert all(line.startswith("{") for line in daemon.lines), daemon.log()


def _slow_domain_backlog(tmp_path: Path, smtp_server: RecordingServer, *, limits: str = "auto") -> tuple[Shop, Daemon]:
    """A daemon whose customers' domain is allowed one message every 1000 s, which sent the first of 6 win-backs and
    sent the 5 others back to the ledger to wait for the domain's next slots (the last 5000 s off). ``limits``: its
    ``sending.shared_limits``."""
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *",
                     extra=f'[sending]\nshared_limits = "{limits}"\n'
                           '[sending.domains]\n"example.com" = { rate_per_second = 0.001, burst = 1 }\n')  # fmt: skip
    shop.add(range(1, 7), days_ago=60)
    daemon = Daemon.start(shop)
    try:
        daemon.wait_for(lambda: len(daemon.named("email_waits_for_domain_rate")) == 5, timeout=30,
                        why="5 messages waiting")
    except BaseException:
        daemon.stop()
        raise
    return shop, daemon


@pytest.mark.postgres
def test_the_queue_depth_counts_the_messages_waiting_for_their_domains_rate(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a daemon whose customers' domain is allowed one message every 1000 s, and 6 customers due a win-back
    # When it has sent the first and sent the 5 others back to the ledger to wait for the domain's next slots
    _, daemon = _slow_domain_backlog(tmp_path, smtp_server)
    try:
        # (the first's transaction may still be under way when the 5 others are logged as waiting)
        daemon.wait_for(lambda: len(smtp_server.messages) >= 1, timeout=30, why="the first message at the server")
        assert len(smtp_server.messages) == 1
        # Then the health line (and the STATUS= line from it) counts them in the queue, and says why they wait
        health = daemon.wait_event("health", after=len(daemon.named("health")))
        assert (health["queue_depth"], health["waiting_for_domain_rate"]) == (5, 5), health
        # and so does /metrics
        _, body, _ = http("GET", daemon.url("/metrics"))
        assert "\nkembali_queue_depth 5\n" in body, body
    finally:
        assert daemon.stop() == 0


def test_messages_waiting_for_their_domains_rate_that_an_operator_cancels_leave_the_queue_depth(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a daemon that sent the first of 6 win-backs to a domain allowed one message every 1000 s and sent the 5
    # others back to the ledger to wait for its next slots (the last 5000 s off)
    shop, daemon = _slow_domain_backlog(tmp_path, smtp_server)
    try:
        # When the operator cancels them (closes the waiting messages as failed)
        waiting = [str(r[0]) for r in shop.rows("SELECT id FROM message WHERE status IN ('planned', 'retry')")]
        assert len(waiting) == 5
        proc = subprocess.run([sys.executable, "-m", "worker", "--config", str(shop.config), "ledger", "close",
                               *waiting, "--reason", "domain too slow"], cwd=REPO,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert shop.scalar("SELECT count(*) FROM message WHERE status = 'failed'") == 5
        # Then the health line no longer counts them in the queue, nor as waiting for the domain's rate
        daemon.wait_event("health", after=len(daemon.named("health")))
        health = daemon.wait_event("health", after=len(daemon.named("health")))
        assert (health["queue_depth"], health["waiting_for_domain_rate"]) == (0, 0), health
        _, body, _ = http("GET", daemon.url("/metrics"))
        assert "\nkembali_queue_depth 0\n" in body, body
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize("limits", ["process", "database"])
def test_a_reload_that_raises_a_slow_domains_rate_brings_its_waiting_messages_forward(
    tmp_path: Path, smtp_server: RecordingServer, limits: str
) -> None:
    # Given a daemon whose customers' domain is allowed one message every 1000 s (a rate set too low), which sent the
    # first of 6 win-backs and sent the 5 others back to the ledger to wait for the domain's next slots (the last
    # 5000 s off); its limits kept in this process, or in the database it shares with other workers
    shop, daemon = _slow_domain_backlog(tmp_path, smtp_server, limits=limits)
    try:
        # When the operator raises the domain's rate to 2 a second and sends SIGHUP
        shop.config.write_text(shop.config.read_text().replace("rate_per_second = 0.001", "rate_per_second = 2.0"))
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("reload_done")
        # Then the messages waiting go at the new rate, not at the slots the old one gave them (up to 5000 s off)
        daemon.wait_for(lambda: len(smtp_server.messages) == 6, timeout=15, why="the 5 waiting messages sent")
        assert len(daemon.named("email_waits_for_domain_rate")) == 5  # none sent back to wait again
        (moved,) = daemon.named("domain_rate_waits_brought_forward")
        assert (moved["domain"], moved["messages"]) == ("example.com", 5), moved
    finally:
        assert daemon.stop() == 0


@pytest.mark.postgres
def test_the_health_line_and_metrics_keep_their_counts_while_the_database_is_down(
    tmp_path: Path, smtp_server: RecordingServer, pg_migrated_url: str, pg_admin: sa.Engine
) -> None:
    # Given a daemon on PostgreSQL whose first health line is due a while after it has sent two emails
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *", db_url=pg_migrated_url)
    text = shop.config.read_text().replace("health_summary_seconds = 1.0", "health_summary_seconds = 5")
    shop.config.write_text(text)
    daemon, allow_connections = _two_sent_on_postgresql(shop, pg_admin)
    try:
        # When the database goes away before that line
        allow_connections(False)
        # Then the line still comes, says the database is unreachable and the queue unknown, and counts the sends
        down = daemon.wait_event("health", timeout=15, where=lambda e: e["database"] == "unreachable")
        assert down["queue_depth"] is None and down["uncertain_in_ledger"] is None, down
        assert "OperationalError" in down["error"], down
        assert sum(e["sent"] for e in daemon.named("health")) == 2, daemon.named("health")
        # And Prometheus still gets this process's figures, without the ledger's (not a 500 for the whole scrape)
        status, body, _ = http("GET", daemon.url("/metrics"))
        assert status == 200, body
        assert "\nkembali_database_up 0\n" in body and "\nkembali_queue_depth " not in body
        assert 'kembali_results_total{campaign="winback",result="sent"} 2' in body
        # And once the database is back, the lines say so again
        allow_connections(True)
        daemon.wait_event("health", timeout=15, where=lambda e: e["database"] == "ok" and e["queue_depth"] == 0,
                          after=len(daemon.named("health")))
    finally:
        allow_connections(True)
        assert daemon.stop() == 0


@pytest.mark.postgres
def test_a_stop_signal_during_catch_up_planning_leaves_the_other_campaigns_to_the_next_start(
    tmp_path: Path, smtp_server: RecordingServer, pg_migrated_url: str
) -> None:
    # Given a daemon that was down over every campaign's planning time, on PostgreSQL, whose first catch-up
    # pass is held up (another session holds the customer table), as a large shop's pass takes a while
    every = "".join(f"[campaigns.{c}]\nenabled = true\n" for c in ("birthday", "feedback", "new_products", "loyalty"))
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *", db_url=pg_migrated_url, extra=every)
    shop.add([1, 2], days_ago=60)
    holder = sa.create_engine(pg_migrated_url)
    try:
        with holder.connect() as conn:
            conn.execute(sa.text("LOCK TABLE customer IN ACCESS EXCLUSIVE MODE"))
            daemon = Daemon.start(shop)
            first = daemon.wait_event("plan_catch_up", timeout=30)
            # (not ready yet: a monitor's probe is told so)
            assert _readiness(daemon) == (503, "starting")
            # When systemd stops it during that pass
            daemon.signal(signal.SIGTERM)
            daemon.wait_event("shutdown_requested")
            assert _readiness(daemon) == (503, "stopping")
            conn.rollback()
        # Then the pass under way ends, the other campaigns are not planned now but left to the next start,
        # and the daemon exits 0 without ever saying it started
        assert daemon.wait(30) == 0, daemon.log()
    finally:
        holder.dispose()
    assert [e["campaign"] for e in daemon.named("plan_catch_up")] == [first["campaign"]]
    assert daemon.named("plan_catch_up_stopped"), daemon.log()
    left = daemon.named("plan_catch_up_stopped")[0]["left"].split(",")
    assert sorted([first["campaign"], *left]) == ["birthday", "feedback", "loyalty", "new_products", "winback"]
    assert not daemon.named("daemon_started")
    assert daemon.named("daemon_stopped")


@pytest.mark.postgres
def test_when_the_database_hangs_as_the_grace_period_runs_out_the_daemon_gives_up_on_it_and_exits_1(
    tmp_path: Path, smtp_server: RecordingServer, pg_migrated_url: str
) -> None:
    # Given a daemon with two sends under way to a slow server and a short grace period
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *", db_url=pg_migrated_url)
    text = shop.config.read_text().replace("shutdown_grace_seconds = 5.0", "shutdown_grace_seconds = 1")
    shop.config.write_text(text)
    shop.add([1, 2], days_ago=60)
    for i in (1, 2):
        smtp_server.on(f"c{i}@example.com", Behaviour(delay_at="data", delay_seconds=3))
    daemon = Daemon.start(shop)
    holder = sa.create_engine(pg_migrated_url)
    try:
        daemon.wait_for(lambda: shop.scalar("SELECT count(*) FROM message WHERE status = 'sending'") == 2,
                        why="two sends under way")
        # When the database stops answering the daemon (here: a long transaction holds its table), and systemd
        # stops the daemon
        with holder.connect() as conn:
            conn.execute(sa.text("LOCK TABLE message IN ACCESS EXCLUSIVE MODE"))
            daemon.signal(signal.SIGTERM)
            # Then, the grace period over, it waits a bounded time to mark its rows, says what it could not
            # record and what becomes of it, and exits 1 rather than hang until systemd's SIGKILL
            code = daemon.wait(30)
            conn.rollback()
    finally:
        holder.dispose()
        if daemon.proc.poll() is None:
            daemon.stop()
    assert code == 1, daemon.log()
    failed = daemon.named("shutdown_abandon_failed")
    assert failed and "did not answer" in failed[0]["error"] and "lease" in failed[0]["note"], daemon.log()
    assert daemon.named("daemon_stopped")[0]["exit_code"] == 1
    assert not any(line.startswith("Traceback") for line in daemon.lines), daemon.log()
    assert dict(shop.rows("SELECT status, count(*) FROM message GROUP BY status")) == {"sending": 2}


def test_a_catch_up_pass_asks_systemd_for_more_start_up_time_before_ready(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a daemon under a (fake) systemd notify socket that was down over its planning time
    notify, _, daemon = _one_email_under_systemd(tmp_path, smtp_server, timeout=30)
    try:
        # When it starts (and catches up before READY=1)
        heard = []
        while not any(b"READY=1" in message for message in heard):
            heard.append(notify.recv(4096))
        # Then, before READY=1, it asked systemd to extend the start-up timeout for the catch-up pass, so a large
        # shop's catch-up does not outlast TimeoutStartSec (90 s by default) and get the daemon killed
        before_ready = b"\n".join(heard[:-1]).split(b"\n")
        assert f"EXTEND_TIMEOUT_USEC={daemon_module.CATCH_UP_PASS_SECONDS * 1_000_000}".encode() in before_ready
        assert b"STATUS=catching up: planning winback (1 of 1)" in before_ready
    finally:
        notify.close()
        assert daemon.stop() == 0


@pytest.mark.postgres
def test_the_daemon_sends_nothing_while_a_planning_pass_is_under_way_so_priority_decides(
    tmp_path: Path, smtp_server: RecordingServer, pg_migrated_url: str
) -> None:
    # Given a running daemon planning win-back and feedback requests every second, under the default cap
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="*/1 * * * * *", db_url=pg_migrated_url,
                     extra="[campaigns.feedback]\nenabled = true\n\n[campaigns.winback]\nholdout_share = 0.0\n")
    daemon = Daemon.start(shop)
    holder = sa.create_engine(pg_migrated_url)
    try:
        daemon.wait_event("daemon_started")
        with holder.connect() as conn:
            # whose feedback pass is held up (as a large shop's pass takes its time), while win-back's goes on
            conn.execute(sa.text("SELECT pg_advisory_lock(:space, hashtext('feedback'))"), {"space": PLAN_LOCKS})
            # and a customer who becomes due both today: a win-back step and a request to rate the order
            store = shop.store()
            try:
                shop_data.upsert_customers(store.engine, [customer(1)], NOW)
                shop_data.upsert_orders(store.engine, [OrderRecord(
                    "O1", "C1", OrderStatus.DELIVERED, NOW - timedelta(days=50), NOW - timedelta(days=8), 100_000,
                    "IDR")], NOW)  # fmt: skip
            finally:
                store.close()
            daemon.wait_for(lambda: any(e["campaign"] == "winback" and e["created"] == 1
                                        for e in daemon.named("campaign_planned")), why="win-back planned")  # fmt: skip
            time.sleep(2.0)  # four dispatcher polls
            # Then nothing goes out while the higher-priority feedback pass is under way
            assert smtp_server.messages == []
            conn.execute(sa.text("SELECT pg_advisory_unlock(:space, hashtext('feedback'))"), {"space": PLAN_LOCKS})
            conn.commit()
        # And once it is done, the feedback request takes the slot, and the win-back step waits for the next one
        daemon.wait_for(lambda: smtp_server.messages and daemon.named("email_deferred_by_policy"), timeout=30,
                        why="an email sent and one deferred")  # fmt: skip
        assert [message_from_bytes(m.data)["X-Kembali-Campaign"] for m in smtp_server.messages] == ["feedback"]
        assert daemon.named("email_deferred_by_policy")[0]["campaign"] == "winback"
    finally:
        holder.dispose()
        assert daemon.stop() == 0


@pytest.mark.postgres
def test_a_birthday_offer_its_catch_up_pass_plans_keeps_its_slot_from_an_email_already_due_when_the_daemon_starts(
    tmp_path: Path, smtp_server: RecordingServer, pg_migrated_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a daemon that was down over the birthday pass that would have planned C1's offer: C1's birthday is
    # today on their clock (midday there), their win-back step, planned before, is due, and the shop plans once a
    # day at an hour that passed an hour ago (no pass comes again before the birthday is over); one email in three
    # days, no quiet hours
    now = datetime.now(UTC)
    offset = 12 - now.hour  # the customer's clock shows 12:xx (born in a leap year: any day of the year will do)
    zone = f"Etc/GMT{-offset:+d}" if offset else "UTC"
    local = now.astimezone(ZoneInfo(zone))
    passed = (now - timedelta(hours=1)).astimezone(ZoneInfo("Asia/Jakarta"))
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron=f"{passed.minute} {passed.hour} * * *",
                     db_url=pg_migrated_url, extra='''
[policy]
frequency_caps = [[1, 3]]
quiet_hours_start = "00:00"
quiet_hours_end = "00:00"

[campaigns.birthday]
enabled = true
days_before = 0
holdout_share = 0.0

[campaigns.winback]
holdout_share = 0.0
''')  # fmt: skip
    store = shop.store()
    try:
        shop_data.upsert_customers(store.engine, [replace(customer(1), time_zone=zone,
                                                          birthday=date(1992, local.month, local.day))], now)
        shop_data.upsert_orders(store.engine, [order(1, days_ago=50)], now)
        monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)
        assert plan(store, load_settings(shop.config), now, ["winback"]).created == {"winback": 1}
    finally:
        store.close()
    holder = sa.create_engine(pg_migrated_url)
    daemon = None
    try:
        with holder.connect() as conn:
            # (its catch-up pass is held up as it writes the offer, as a large shop's pass takes its time)
            conn.execute(sa.text(
                "INSERT INTO message (dedupe_key, campaign, step, priority, customer_id, email, status, due_at,"
                " expires_at, next_attempt_at, attempts, resent_after_attempts, payload, created_at, updated_at)"
                " VALUES (:key, 'birthday', 1, 100, :id, 'c1@example.com', 'planned', :t, :t, :t, 0, 0, '{}', :t,"
                " :t)"), {"key": f"birthday:C1:{local.year}", "id": shop.customer_id("C1"), "t": now})  # fmt: skip
            # When the daemon starts
            daemon = Daemon.start(shop)
            daemon.wait_event("plan_catch_up", timeout=30, where=lambda e: e["campaign"] == "birthday")
            with holder.connect().execution_options(isolation_level="AUTOCOMMIT") as watcher:
                daemon.wait_for(lambda: watcher.execute(sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'")).scalar_one() > 0, why="the catch-up pass writing the offer")
            time.sleep(2.0)  # four dispatcher polls
            # Then the win-back does not go out while the pass that plans the offer is under way (sent, it would
            # leave the offer capped until the birthday was over: skipped as expired)
            assert smtp_server.messages == []
            conn.rollback()
        # And the birthday offer goes out, the win-back waiting for the next slot
        daemon.wait_for(lambda: smtp_server.messages and daemon.named("email_deferred_by_policy"), timeout=30,
                        why="an email sent and one deferred")  # fmt: skip
        assert [message_from_bytes(m.data)["X-Kembali-Campaign"] for m in smtp_server.messages] == ["birthday"]
        assert dict(shop.rows("SELECT campaign, status FROM message")) == {"birthday": "sent", "winback": "planned"}
    finally:
        holder.dispose()
        if daemon is not None:
            assert daemon.stop() == 0


def test_the_start_line_says_which_config_database_and_smtp_server_the_daemon_uses(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # daemon_started named its campaigns and jobs but not what it runs against: on a host with a staging and a live
    # config, the on-call operator could not tell from the log which database and relay a daemon was using
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    daemon = Daemon.start(shop)
    try:
        started = daemon.wait_event("daemon_started")
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert started["config"] == str(shop.config)
    assert started["database"] == str((tmp_path / "kembali.db").resolve())
    assert started["smtp"] == f"127.0.0.1:{smtp_server.port}"


def test_a_campaigns_planning_pass_never_runs_twice_at_once_in_one_daemon(
    tmp_path: Path, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """APScheduler's max_instances keeps one cron job from overlapping itself, but the catch-up pass at start-up runs
    beside the scheduler: a cron time that comes while it is under way (a restart just before 09:00, a frequent
    cron, a long pass) would start a second pass of the same campaign over the same customers."""
    import asyncio
    import threading

    from worker.config import load_settings

    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    shop.add(range(3), days_ago=60)
    lock, running, most = threading.Lock(), [0], [0]
    planning, release = threading.Event(), threading.Event()
    real_plan = daemon_module.plan

    def held_plan(*args: object, **kwargs: object) -> object:
        """The real pass; the first one is held under way until the test lets it go on."""
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            first = not planning.is_set()
            planning.set()
        try:
            if first:
                release.wait(30)
            return real_plan(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(daemon_module, "plan", held_plan)

    async def scenario() -> None:
        daemon = daemon_module.Daemon(load_settings(shop.config), config_path=shop.config)
        try:
            # Given a daemon planning the win-backs (the catch-up pass); when the campaign's cron fires meanwhile
            catch_up = asyncio.ensure_future(daemon._planner("winback")())
            try:
                assert await asyncio.to_thread(planning.wait, 30), "the catch-up pass never started planning"
                await daemon._planner("winback")()
            finally:
                release.set()
            await catch_up
        finally:
            await daemon._close()
            daemon.store.close()

    asyncio.run(scenario())
    # Then the second pass is skipped, and says so, rather than run beside the first
    assert most[0] == 1
    skipped = [getattr(r, "kembali_fields", {}) for r in caplog.records if r.getMessage() == "job_skipped"]
    assert skipped and skipped[0]["job"] == "plan:winback", skipped
    assert shop.scalar("SELECT count(*) FROM message") == 3


def test_a_pause_for_a_relay_that_quotes_its_recipients_logs_and_shows_them_masked_at_every_step(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a relay in trouble that quotes each recipient in its reply (Postfix: "452 4.3.1 <addr>: Insufficient
    # system storage"), recipients at three domains, and a daemon that pauses and tries again after 0.2 s
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *", extra=PAUSING_SOON, pool_size=1)
    ids = range(1, 4)
    emails = [f"pelanggan{i}@toko{i}.example" for i in ids]
    store = shop.store()
    try:
        shop_data.upsert_customers(store.engine, [replace(customer(i), email=emails[i - 1]) for i in ids], NOW)
        shop_data.upsert_orders(store.engine, [order(i, days_ago=60) for i in ids], NOW)
    finally:
        store.close()
    for email in emails:
        smtp_server.on(email, Behaviour(rcpt_reply=f"452 4.3.1 <{email}>: Insufficient system storage"))
    daemon = Daemon.start(shop)
    try:
        # When it pauses, waits and tries again
        daemon.wait_event("dispatcher_paused", timeout=30)
        daemon.wait_event("dispatcher_retry_scheduled", timeout=30)
        daemon.wait_event("dispatcher_resumed", timeout=30)
        status, body, _ = http("GET", daemon.url("/healthz"))
    finally:
        assert daemon.stop() == 0
    # Then every line that gives the pause's reason names the reply with the address masked (deploy/README: the
    # log's addresses are masked), as dispatcher_paused does, and so does /healthz
    reasons = [e.get("reason") or e.get("was") for e in daemon.events
               if e.get("event") in ("dispatcher_paused", "dispatcher_retry_scheduled", "dispatcher_resumed")]
    assert len(reasons) >= 3 and all("Insufficient system storage" in r for r in reasons), reasons
    assert any(f"<{log.mask_email(e)}>" in r for r in reasons for e in emails), reasons
    leaked = [line for line in daemon.lines for e in emails if e in line]
    assert leaked == [], leaked
    assert not any(e in body for e in emails), (status, body)


def test_a_restart_after_a_crash_names_each_email_it_finds_left_uncertain(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # The daemon that came after a crash logged `leases_released uncertain=16` and no more: which customers' emails
    # may have arrived, to decide about, took a trip to the ledger (the health line counts only this process's sends)
    _restart_after_a_crash(tmp_path, smtp_server, None)


@pytest.mark.postgres
def test_a_restart_after_a_crash_names_each_email_it_finds_left_uncertain_on_postgresql(
    tmp_path: Path, smtp_server: RecordingServer, pg_migrated_url: str
) -> None:
    _restart_after_a_crash(tmp_path, smtp_server, pg_migrated_url)


def _restart_after_a_crash(tmp_path: Path, smtp_server: RecordingServer, db_url: str | None) -> None:
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, db_url=db_url, extra="[sending]\nlease_seconds = 2\n"
                     "[campaigns.winback]\nholdout_share = 0.0\n")  # fmt: skip
    shop.add([1, 2], days_ago=60)
    # Given a daemon killed while the server holds C1's message after its final dot (C2's went out)
    smtp_server.on("c1@example.com", Behaviour(delay_at="data", delay_seconds=30))
    first = Daemon.start(shop)
    try:
        first.wait_for(lambda: smtp_server.data_taken == 2 and first.named("email_sent"), timeout=30,
                       why="C2 sent, C1's message on the wire")  # fmt: skip
        first.signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    assert shop.scalar("SELECT status FROM message WHERE email = 'c1@example.com'") == "sending"
    dead = first.named("daemon_started")[0]["worker"]
    sending = shop.scalar("SELECT count(*) FROM message WHERE status = 'sending'")  # (C2's too, if its outcome was
    # not committed yet)
    # When another starts, and finds the lease lapsed
    second = Daemon.start(shop)
    try:
        released = second.wait_event("leases_released", timeout=20)
        # Then it names the worker whose lease lapsed (with several hosts, the one to look at: its log just ends),
        # and says whose email became uncertain, and where (masked), as a send that ended so does
        assert released["workers"] == f"{dead} ({sending} sending)", released
        uncertain = second.wait_event("email_uncertain", timeout=5)
        assert (uncertain["campaign"], uncertain["customer"], uncertain["to"]) == ("winback", "C1", "c***@example.com")
        assert uncertain["worker"] == dead, uncertain
        # and the ledger keeps it, for `kembali ledger list` long after the log has rotated
        assert shop.scalar("SELECT last_error FROM message WHERE email = 'c1@example.com'") == (
            f"lease of {dead} lapsed while sending (worker died?)")
        assert uncertain["dedupe_key"] == shop.scalar("SELECT dedupe_key FROM message WHERE email = 'c1@example.com'")
        assert uncertain["message_id"] == shop.scalar("SELECT message_id FROM message WHERE email = 'c1@example.com'")
        assert "c1@example.com" not in "\n".join(second.lines)
    finally:
        assert second.stop() == 0
    # And nothing is sent again
    assert sorted(to for m in smtp_server.messages for to in m.rcpt_tos).count("c1@example.com") <= 1


def test_the_health_line_counts_the_ledgers_uncertain_messages_not_only_this_workers(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a ledger where another worker died while sending: its row became uncertain when its lease lapsed (the
    # mail may have left), for an operator to decide on with `kembali ledger`
    from worker.adapters.store import M
    from worker.core.audiences import message_id_for
    from worker.domain import PlannedMessage

    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    shop.add([1, 2], days_ago=60)
    shop.add([3], days_ago=5)
    store = shop.store()
    try:
        row = PlannedMessage(dedupe_key="feedback:O3", campaign="feedback", step=1, customer_id=shop.customer_id("C3"),
                             email="c3@example.com", due_at=NOW, expires_at=NOW + timedelta(days=14),
                             message_id=message_id_for("feedback:O3", "shop.example"))  # fmt: skip
        store.insert_messages([row], NOW)
        [claimed] = store.claim(worker="other-host:41", now=NOW, limit=1, lease_seconds=60)
        assert store.mark_sending([claimed.id], worker="other-host:41", now=NOW) == {claimed.id}
        assert store.release_expired_leases(NOW + timedelta(seconds=61)) == (0, 1)
    finally:
        store.close()
    assert shop.scalar("SELECT count(*) FROM message WHERE status = 'uncertain'") == 1
    # When this worker runs and sends its own two emails, none of them uncertain
    daemon = Daemon.start(shop)
    try:
        daemon.wait_for(lambda: len(daemon.named("email_sent")) == 2, why="two email_sent events")
        # Then its health lines say there is one uncertain message in the ledger, and that none became uncertain
        # here since the previous line: the line said uncertain=0 throughout, counting this worker's alone
        health = daemon.wait_event("health", after=len(daemon.named("health")))
        assert health["uncertain_in_ledger"] == 1, health
        assert sum(e["uncertain"] for e in daemon.named("health")) == 0, daemon.named("health")
        # And once the operator has decided on it, the count goes back to 0
        store = shop.store()
        try:
            with store.engine.begin() as conn:
                conn.execute(sa.update(M).where(M.c.id == claimed.id).values(status="sent"))
        finally:
            store.close()
        daemon.wait_event("health", where=lambda e: e["uncertain_in_ledger"] == 0, after=len(daemon.named("health")))
    finally:
        assert daemon.stop() == 0


def _start_failure(shop_config: Path, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """``kembali run`` with ``shop_config`` as a service runs it: its exit code and its stderr's lines."""
    proc = subprocess.run([sys.executable, "-m", "worker", "--config", str(shop_config), "run"], cwd=REPO,
                          env={**os.environ, "KEMBALI_LINK_SECRET": LINK_KEY, **(env or {})},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    return proc.returncode, proc.stderr.splitlines()


SECRET_AS_A_NAME = "xK9mP2qR7vL4nW8sT3"
"""A secret with no character a variable's name cannot have (a generated password, half of token_urlsafe's keys)."""


def test_a_secret_written_where_its_variable_is_named_is_never_printed_by_a_start_or_a_reload(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    text = shop.config.read_text(encoding="utf-8")
    # When the operator writes the link key itself where its variable's name goes, and starts the daemon
    shop.config.write_text(text.replace("[unsubscribe]\n", f'[unsubscribe]\nsecret_env = "{SECRET_AS_A_NAME}"\n'),
                           encoding="utf-8")
    code, lines = _start_failure(shop.config)
    # Then it does not start, names the key and its line, and never the key itself: "names the environment variable
    # xK9m…, which is not set … export xK9m…=" put the link key in the journal
    assert code == 2 and len(lines) == 1, lines
    assert "'unsubscribe.secret_env'" in lines[0] and "line " in lines[0], lines
    assert SECRET_AS_A_NAME not in lines[0], lines
    # When a running daemon is reloaded with the SMTP password written where its variable's name goes
    shop.config.write_text(text, encoding="utf-8")
    daemon = Daemon.start(shop)
    try:
        daemon.wait_event("daemon_started")
        smtp = f'[smtp]\nusername = "u"\npassword_env = "{SECRET_AS_A_NAME}"\n'
        shop.config.write_text(text.replace("[smtp]\n", smtp), encoding="utf-8")
        daemon.signal(signal.SIGHUP)
        # Then the reload is rejected naming the key and its line, never the password
        rejected = daemon.wait_event("reload_rejected")
        assert "'smtp.password_env'" in rejected["error"] and "line " in rejected["error"], rejected
    finally:
        assert daemon.stop() == 0
    assert not [line for line in daemon.lines if SECRET_AS_A_NAME in line], daemon.log()


def test_a_daemon_that_cannot_start_says_why_in_one_json_line_when_its_config_asks_for_json(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")  # [logging] format = "json"
    text = shop.config.read_text(encoding="utf-8")
    # When the SMTP login's password variable is not set (a config error found after the file was read)
    shop.config.write_text(text.replace("[smtp]\n", '[smtp]\nusername = "u"\npassword_env = "KEMBALI_NO_SUCH"\n'),
                           encoding="utf-8")
    code, lines = _start_failure(shop.config)
    # Then the one line on stderr is a JSON event a log collector reads, with the whole message
    assert code == 2 and len(lines) == 1, lines
    failed = json.loads(lines[0])
    assert failed["event"] == "command_failed" and failed["level"] == "error" and failed["exit_code"] == 2, failed
    assert "KEMBALI_NO_SUCH" in failed["message"] and failed["message"].startswith("configuration error: "), failed
    # When the database is a PostgreSQL server nothing listens at
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    pg = f"postgresql+psycopg://kembali:Sup3rSecret@127.0.0.1:{port}/kembali"
    shop.config.write_text(re.sub(r'url = "sqlite[^"]*"', f'url = "{pg}"', text), encoding="utf-8")
    code, lines = _start_failure(shop.config)
    # Then it is one JSON line too, naming where nothing listens and what to look at, the password masked
    assert code == 3 and len(lines) == 1, lines
    failed = json.loads(lines[0])
    assert failed["event"] == "command_failed" and failed["exit_code"] == 3, failed
    assert f"nothing listens on 127.0.0.1:{port} (connection refused)" in failed["message"], failed
    assert "is PostgreSQL running there" in failed["message"], failed
    assert "Sup3rSecret" not in lines[0] and "kembali:***@" in failed["message"], failed
    # But a config that cannot be read says so in plain text: which format it asks for is unknown
    shop.config.write_text(text + "\n[logging\n", encoding="utf-8")
    code, lines = _start_failure(shop.config)
    assert code == 2 and lines[0].startswith("kembali: configuration error: ") and "invalid TOML" in lines[0], lines


def test_a_config_read_but_refused_says_why_in_json_when_it_asks_for_json_logs(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")  # [logging] format = "json"
    text = shop.config.read_text(encoding="utf-8")
    # When a key's value is refused (valid TOML: its [logging] table can be read)
    shop.config.write_text(text.replace('url = "https://shop.example/unsubscribe"', 'url = "http://shop.example/u"'),
                           encoding="utf-8")
    code, lines = _start_failure(shop.config)
    # Then the refusal, naming its line, is one JSON line
    assert code == 2 and len(lines) == 1, lines
    failed = json.loads(lines[0])
    assert failed["event"] == "command_failed" and failed["exit_code"] == 2, failed
    assert "'unsubscribe.url' must be an https:// URL" in failed["message"] and "line " in failed["message"], failed
    # But one whose [logging] format is the refused value is said in plain text
    shop.config.write_text(text.replace('format = "json"', 'format = "jsonl"'), encoding="utf-8")
    code, lines = _start_failure(shop.config)
    assert code == 2 and lines[0].startswith("kembali: configuration error: ") and "logging.format" in lines[0], lines


def test_the_daemon_says_it_is_starting_before_it_checks_its_templates(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # `kembali run` on a terminal (or in the journal) said nothing for 7 to 12 s on a busy 2-core host while it
    # rendered every template for the sample customers (about 140 renders): an operator could not tell it from a hang
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    daemon = Daemon.start(shop)
    try:
        daemon.wait_event("daemon_started", timeout=60)
        names = [event["event"] for event in daemon.events]
        # Then its first line says what it does meanwhile, naming the config and the templates it checks
        assert names[0] == "daemon_starting" and names.index("web_started") > 0, names
        starting = daemon.events[0]
        assert starting["config"] == str(shop.config.resolve()), starting
        assert starting["templates"] == str(shop.templates), starting
        assert "checking" in starting["doing"], starting
    finally:
        daemon.stop()


def test_a_cron_time_a_running_daemon_let_pass_unplanned_is_planned_at_the_next_maintenance(
    tmp_path: Path, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A firing can pass with no pass for it: skipped because the catch-up pass (begun just before 09:00) was still
    going, or never fired at all. A restart plans such a missed run at once (``missed_run`` on the ``job_run``
    table); the running daemon waited for the next cron time, a day for a daily cron, a week for a weekly one."""
    # Given every campaign last planned two days ago: at least one 09:00 has passed since, unplanned
    shop = _planned_days_ago(tmp_path, smtp_server, monkeypatch, caplog, customers=3)
    # When a maintenance runs (no pass under way, no catch-up)
    _one_maintenance(shop)
    # Then the missed run is planned now, once, and recorded
    catch_ups = [getattr(r, "kembali_fields", {}) for r in caplog.records if r.getMessage() == "plan_catch_up"]
    assert [c for c in catch_ups if c.get("campaign") == "winback"], catch_ups
    assert shop.scalar("SELECT count(*) FROM message WHERE campaign = 'winback'") == 3
    last = shop.scalar("SELECT last_run_at FROM job_run WHERE name = 'plan:winback'")
    assert datetime.fromisoformat(str(last)).replace(tzinfo=UTC) > datetime.now(UTC) - timedelta(minutes=1)


def test_a_watched_reload_that_moves_the_templates_folder_is_one_reload_not_two(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a daemon that watches its templates
    shop = _watching_shop(tmp_path, smtp_server, "0 9 * * *")
    moved = tmp_path / "templates-v2"
    shutil.copytree(shop.templates, moved)
    daemon = Daemon.start(shop)
    try:
        daemon.wait_event("daemon_started")
        # When the config is saved with templates.dir pointing at another folder
        shop.config.write_text(shop.config.read_text().replace(f'dir = "{shop.templates}"', f'dir = "{moved}"'))
        daemon.wait_event("reload_done", timeout=30)
        time.sleep(2.0)  # ten looks of the watcher, nothing saved since
    finally:
        assert daemon.stop() == 0
    # Then it reloads once: the watcher compared the new folder with the old one's files, took that for an edit
    # and checked every template again for nothing
    assert len(daemon.named("reload_started")) == 1, [e for e in daemon.named("reload_started")]


def test_a_template_mended_in_the_folder_a_rejected_reload_moved_to_is_reloaded_by_the_watcher(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a daemon that watches its templates, and a copy of them with a broken win-back subject
    shop = _watching_shop(tmp_path, smtp_server, "0 9 * * *")
    moved = tmp_path / "templates-v2"
    shutil.copytree(shop.templates, moved)
    subject = moved / "winback" / "en" / "subject.txt"
    good = subject.read_text(encoding="utf-8")
    subject.write_text("{% if %}" + good, encoding="utf-8")
    daemon = Daemon.start(shop)
    try:
        daemon.wait_event("daemon_started")
        # When the config is saved with templates.dir pointing at the copy, the reload is rejected
        shop.config.write_text(shop.config.read_text().replace(f'dir = "{shop.templates}"', f'dir = "{moved}"'))
        daemon.wait_event("reload_rejected", timeout=30)
        # and the operator mends the template there, touching nothing else
        subject.write_text(good, encoding="utf-8")
        # Then the watcher sees it and reloads (it watched the old folder only: nothing happened until a SIGHUP)
        done = daemon.wait_event("reload_done", timeout=30)
    finally:
        assert daemon.stop() == 0
    assert [e["trigger"] for e in daemon.named("reload_started")] == ["watch", "watch"], daemon.log()
    assert done["trigger"] == "watch", done


def test_a_maintenance_that_plans_a_pass_skipped_for_the_clock_does_not_start_it_twice(
    tmp_path: Path, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given every campaign last planned two days ago, and win-back's pass skipped for this host's clock
    shop = _planned_days_ago(tmp_path, smtp_server, monkeypatch, caplog, customers=0)
    # When the maintenance finds the clock right again
    _one_maintenance(shop, skipped_for_the_clock="winback")
    # Then it plans win-back once: not a second time for its missed cron time, skipped as "still going"
    fields = [(r.getMessage(), getattr(r, "kembali_fields", {})) for r in caplog.records]
    assert [f for name, f in fields if name == "plan_catch_up" and f.get("campaign") == "winback"] == [
        {"campaign": "winback", "missed": "skipped while this host's clock was off"}], fields
    assert not [f for name, f in fields if name == "job_skipped"], fields


def _planned_days_ago(tmp_path: Path, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch,
                      caplog: pytest.LogCaptureFixture, *, customers: int) -> Shop:
    """A shop planning daily at 09:00, ``customers`` due a win-back, every campaign last planned two days ago."""
    import logging

    from worker.adapters import opstore
    from worker.pipeline import enabled_campaigns

    caplog.set_level(logging.INFO)
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    if customers:
        shop.add(range(customers), days_ago=60)
    store = shop.store()
    try:
        for campaign in enabled_campaigns(load_settings(shop.config)):
            opstore.record_run(store, f"plan:{campaign}", at=datetime.now(UTC) - timedelta(days=2), worker="w")
    finally:
        store.close()
    return shop


def _one_maintenance(shop: Shop, *, skipped_for_the_clock: str | None = None) -> None:
    """Run one maintenance of an in-process daemon (not started), and wait for the passes it begins."""
    import asyncio

    async def scenario() -> None:
        daemon = daemon_module.Daemon(load_settings(shop.config), config_path=shop.config)
        if skipped_for_the_clock is not None:
            daemon._plan_skipped.add(skipped_for_the_clock)
        try:
            await daemon.maintenance()
            while daemon._tasks or daemon._planning:
                await asyncio.sleep(0.05)
        finally:
            await daemon._close()
            daemon.store.close()

    asyncio.run(scenario())


def _watching_shop(tmp_path: Path, smtp_server: RecordingServer, plan_cron: str) -> Shop:
    """A shop whose daemon watches its templates and config (every 0.2 s)."""
    watch = "\n[daemon]\nwatch_templates = true\nwatch_interval_seconds = 0.2\nshutdown_grace_seconds = 5.0\n"
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron=plan_cron)
    shop.config.write_text(shop.config.read_text().replace("\n[daemon]\nshutdown_grace_seconds = 5.0\n", watch))
    return shop


@pytest.mark.parametrize("change", ["removed", "replaced"])
def test_a_daemon_whose_sqlite_file_is_removed_or_replaced_under_it_says_so_and_stops(
    tmp_path: Path, smtp_server: RecordingServer, change: str
) -> None:
    # Given a daemon on an SQLite file that has sent two emails, and a copy of that file taken before it started
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    text = shop.config.read_text().replace("shutdown_grace_seconds = 5.0", "shutdown_grace_seconds = 20.0")
    shop.config.write_text(text)
    shop.add([1, 2], days_ago=60)
    database = tmp_path / "kembali.db"
    backup = tmp_path / "backup.db"
    with contextlib.closing(sqlite3.connect(database)) as source, contextlib.closing(sqlite3.connect(backup)) as copy:
        source.backup(copy)
    daemon = Daemon.start(shop)
    try:
        daemon.wait_for(lambda: len(daemon.named("email_sent")) == 2, why="two email_sent events")
        # When the file is removed (a clean-up gone wrong), or replaced by the copy (a restore while it runs)
        if change == "removed":
            database.unlink()
        else:
            os.replace(backup, database)
        # Then at its next maintenance it says so, naming the file, and stops as on SIGTERM, exiting 3: it went on
        # claiming, sending and recording in the file it had open, which no one will read again (and after a
        # restore, a restart sent again every email the copy does not show sent)
        changed = daemon.wait_event("database_file_changed", timeout=30)
        noticed = time.monotonic()
        code = daemon.wait(30)
        took = time.monotonic() - noticed
    finally:
        if daemon.proc.poll() is None:
            daemon.stop()
    assert code == 3, daemon.log()
    assert changed["database"] == str(database.resolve()), changed
    assert changed["change"] == ("removed" if change == "removed" else "replaced by another file"), changed
    assert daemon.named("daemon_stopped")[-1]["exit_code"] == 3, daemon.log()
    assert not (database.exists() and change == "removed"), "the daemon made a new empty database"
    # And with nothing in flight it stops at once: a claim that failed meanwhile is not retried for 15 s
    assert took < 4, f"{took:.1f} s\n{daemon.log()}"



@pytest.mark.postgres
def test_a_daemon_whose_database_is_away_tries_its_dispatch_again_less_and_less_often_not_every_poll(
    tmp_path: Path, smtp_server: RecordingServer, pg_migrated_url: str, pg_admin: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)
    # Given a daemon on PostgreSQL that looks for due rows every 0.5 s and has sent its two emails
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *", db_url=pg_migrated_url)
    daemon, allow_connections = _two_sent_on_postgresql(shop, pg_admin)
    try:
        # When its database is away for 10 s
        allow_connections(False)
        time.sleep(10)
        allow_connections(True)
        failed = daemon.named("dispatch_failed")
        # Then each failure says when the dispatcher tries again, each wait longer than the one before: a handful of
        # error lines, not one every 0.5 s (a day-long outage at the default 5 s made 17,000 lines of the same error)
        assert 1 <= len(failed) <= 6, [e.get("retry_in_seconds") for e in failed]
        waits = [e["retry_in_seconds"] for e in failed]
        assert waits == sorted(waits) and waits[-1] > waits[0], waits
        assert failed[-1]["failures_in_row"] == len(failed), failed[-1]
        # And once the database is back, it sends again: an email planned meanwhile goes within the last wait said
        shop.add([3], days_ago=60)
        store = shop.store()
        try:
            assert plan(store, load_settings(shop.config), datetime.now(UTC), ["winback"]).created == {"winback": 1}
        finally:
            store.close()
        daemon.wait_for(lambda: len(daemon.named("email_sent")) == 3, timeout=waits[-1] + 10, why="the third email")
        code = daemon.stop()
    finally:
        allow_connections(True)
        if daemon.proc.poll() is None:
            daemon.stop()
    assert code == 0, daemon.log()


def test_the_status_systemctl_shows_says_what_period_each_figure_covers(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a daemon under a (fake) systemd notify socket, its health line every second (the harness's), one email
    notify, _, daemon = _one_email_under_systemd(tmp_path, smtp_server, timeout=10)
    try:
        daemon.wait_for(lambda: smtp_server.messages, why="the email")
        # Then `systemctl status` reads the sends and failures of the last health period (1 s) and the rate of the
        # last minute, each named by its period (the rate said "(last 1s)", a minute's sends counted over it)
        heard = b""
        while not heard.startswith(b"STATUS=") or heard.startswith((b"STATUS=running", b"STATUS=catching up")):
            heard = notify.recv(4096)
        status = heard.decode()
        assert status.startswith("STATUS=in the last 1s: sent "), status
        assert re.search(r", [0-9.]+/min over the last 60s$", status), status
    finally:
        daemon.stop()
        notify.close()
