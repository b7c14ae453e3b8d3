"""The Prometheus text the daemon serves and the health line's arithmetic."""

from __future__ import annotations

from worker.metrics import Metrics


def test_prometheus_text() -> None:
    m = Metrics()
    m.observe_planned("winback", 3)
    m.observe_result("winback", "sent", "sent", 0.2, at=100.0)
    m.observe_result("winback", "retry", "transient", 3.0, at=101.0)
    m.observe_result("winback", "skipped:suppressed", None, None, at=101.0)
    text = m.render(ledger={("winback", "sent"): 1, ("winback", "planned"): 2}, queue_depth=2,
                    rate_limit_per_second=50.0, rate_burst=50, paused=False, now=110.0)
    lines = text.splitlines()
    for expected in [
        "# TYPE kembali_messages gauge",
        'kembali_messages{campaign="winback",state="planned"} 2',
        "kembali_queue_depth 2",
        'kembali_planned_total{campaign="winback"} 3',
        'kembali_results_total{campaign="winback",result="skipped:suppressed"} 1',
        'kembali_attempts_total{outcome="transient"} 1',
        "# TYPE kembali_send_seconds histogram",
        'kembali_send_seconds_bucket{le="0.1"} 0',
        'kembali_send_seconds_bucket{le="0.25"} 1',
        'kembali_send_seconds_bucket{le="2.5"} 1',
        'kembali_send_seconds_bucket{le="5"} 2',
        'kembali_send_seconds_bucket{le="+Inf"} 2',
        "kembali_send_seconds_sum 3.2",
        "kembali_send_seconds_count 2",
        "kembali_rate_limit_per_second 50",
        "kembali_dispatcher_paused 0",
    ]:
        assert expected in lines, expected
    assert text.endswith("\n")


def test_health_counts_what_happened_since_the_last_line() -> None:
    m = Metrics()
    m.observe_planned("winback", 2)
    for i in range(2):
        m.observe_result("winback", "sent", "sent", 0.1, at=10.0 + i)
    first = m.health(now=30.0)
    assert (first.planned, first.sent, first.failed, first.rate_per_minute) == (2, 2, 0, 2.0)
    m.observe_result("winback", "failed", "permanent", 0.1, at=40.0)
    second = m.health(now=80.0)  # the first two sends left the one-minute window
    assert (second.planned, second.sent, second.failed, second.rate_per_minute) == (0, 0, 1, 1.0)


def test_a_daemon_nobody_asks_for_its_rate_does_not_keep_every_send_it_ever_made() -> None:
    # Given a daemon with the health line off and no Prometheus scraping it (nothing reads the rate)
    m = Metrics()
    # When it sends one email a second for a day
    for i in range(86_400):
        m.observe_result("winback", "sent", "sent", 0.1, at=float(i))
    # Then it holds only the last minute's sends (not 86 400 of them), and the rate still reads right
    assert len(m._sends) <= 61
    assert m.rate_per_second(now=86_400.0) == 1.0
    assert m.health(now=86_400.0).sent == 86_400
