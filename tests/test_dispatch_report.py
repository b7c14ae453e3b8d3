"""The run's report: each message counted once, and a long run's memory of them stays near what still waits."""

from __future__ import annotations

from datetime import UTC, datetime

from worker.domain import ClaimedMessage
from worker.errors import TemplateError
from worker.sending import DispatchReport

_AT = datetime(2026, 12, 6, 12, tzinfo=UTC)


def _message(n: int) -> ClaimedMessage:
    return ClaimedMessage(id=n, dedupe_key=f"k{n}", campaign="winback", step=1, customer_id=n,
                          email=f"c{n}@gmail.com", message_id=f"<{n}@kembali>", attempts=0, due_at=_AT,
                          expires_at=_AT, payload={})  # fmt: skip


def test_a_long_runs_report_forgets_the_messages_that_waited_for_their_domain_once_they_are_done() -> None:
    # a daemon's run lasts as long as a slow domain's backlog (it waits for what it sent back to come due): it must
    # not remember every message that ever waited, only those that may still come back
    report = DispatchReport()
    for n in range(1, 10_001):
        message = _message(n)
        report.waited_for_rate(message, "gmail.com")
        report.count(message, "retry")  # greylisted once it went, then back for another slot
        report.waited_for_rate(message, "gmail.com")
        report.count(message, "sent")
    assert report.outcomes == {"sent": 10_000}
    assert report.rate_waits == {"gmail.com": 10_000}  # each message once, however many times it waited
    assert not report._rate_waited and not report._back  # its memory of the done messages


def test_a_long_runs_report_keeps_a_bounded_count_of_its_render_errors() -> None:
    # a million messages failing each with its own error (one quoting the customer's name) must not keep a million
    # errors: the first distinct ones are counted, the rest only summed
    report = DispatchReport()
    for n in range(1, 100_001):
        error = TemplateError(f"UndefinedError: 'dict object' has no attribute 'Pelanggan {n}'",
                              template="winback/id/subject.txt", line=2)
        report.render_failed(error if n % 2 else TemplateError("'coupon' is undefined", template="a.html", line=3))
    assert len(report.render_errors) <= 50
    assert report.render_errors[("a.html", 3, "'coupon' is undefined")] == 50_000
    assert sum(report.render_errors.values()) + report.render_errors_other == 100_000


def test_the_runs_summary_says_one_message_in_the_singular() -> None:
    # a run where one message of each kind went wrong: "1 message was refused", not "1 messages were refused"
    from worker.commands.running import CycleReport, summary
    from worker.pipeline import PlanReport

    report = DispatchReport()
    for n, outcome in enumerate(("failed:content_rejected", "retry:sender_refused", "uncertain"), start=1):
        report.count(_message(n), outcome)
    waited = _message(4)
    report.waited_for_rate(waited, "gmail.com")
    report.count(waited, "sent")
    lines = summary(CycleReport(PlanReport(), report))
    assert "1 message was refused for its content (5.7.x): check the templates, not the customers" in lines, lines
    assert any(line.startswith("1 message was refused for who sent it, not what it says") for line in lines), lines
    assert any(line.startswith("1 message is uncertain (the connection died after it was handed over: it may have "
                               "arrived) and is never resent by itself") for line in lines), lines
    assert any(line.startswith("1 message waited in the queue for a slot of its recipient domain's rate (gmail.com 1)")
               for line in lines), lines


def test_the_runs_summary_writes_its_counts_with_thousands_separators_as_the_import_does() -> None:
    # a demo of 20,000 customers said "planned 11228 new win-back emails" and "sent 10595 win-back emails, 91
    # deferred:cap" right below the import's "40,732 created": one run's figures written two ways
    from worker.adapters.opstore import Waiting
    from worker.commands.running import CycleReport, summary
    from worker.pipeline import PlanReport

    report = DispatchReport()
    for n in range(1, 1_235):
        report.count(_message(n), "sent")
    for n in range(2_000, 3_001):
        report.count(_message(n), "deferred:cap")
    later = datetime(2026, 12, 7, 15, tzinfo=UTC)
    lines = summary(CycleReport(PlanReport(created={"winback": 11_228}), report),
                    Waiting(messages=5_585, due=1_001, first=later), time_zone="Asia/Jakarta")
    assert "planned 11,228 new win-back emails" in lines, lines
    assert "sent 1,234 win-back emails, 1,001 deferred:cap" in lines, lines
    assert ("5,585 messages wait in the queue for a later run (1,001 due already; the first of the others falls due "
            "2026-12-07 22:00 WIB)") in lines, lines
