"""The relay's pace (``worker.core.pace``): which "slow down" is the relay's, and how the global rate follows it.
Pure: time is an argument, nothing sleeps."""

from __future__ import annotations

import pytest

from worker.core.limits import as_throttled
from worker.core.pace import REST_SECONDS, RelayPace, SharedCut, shared_cut, throttle_scope
from worker.domain import Outcome, SendResult


def _result(code: int | None, reply: str, stage: str = "rcpt", error: str = "", outcome: Outcome = Outcome.TRANSIENT
            ) -> SendResult:  # fmt: skip
    return as_throttled(SendResult(outcome, code, reply, error, stage=stage))


@pytest.mark.parametrize(
    ("result", "scope"),
    [
        (_result(421, "421 4.7.0 Too many messages, slow down; closing connection"), "relay"),
        (_result(421, "421 4.7.0 Too many messages, slow down", stage="mail"), "relay"),
        (_result(450, "450 4.7.1 Error: too much mail from 10.0.0.1", stage="mail"), "relay"),
        (_result(421, "421 4.7.0 Too many connections from your host, slow down", stage="connect"), "relay"),
        (_result(421, "421 4.3.2 The maximum number of concurrent server connections has exceeded a limit, closing "
                      "transmission channel", stage="connect"), "relay"),  # Microsoft's greeting
        (_result(421, "421 4.7.0 Try again later, closing connection. (EHLO)", stage="connect"), "relay"),  # Gmail's
        (_result(421, "421 4.4.5 Server busy, try again later.", stage="connect"), "relay"),
        (_result(451, "451 4.7.1 Too many messages, slow down"), "maybe_relay"),
        (_result(454, "454 Throttling failure: Maximum sending rate exceeded"), "maybe_relay"),
        (_result(450, "450 4.2.1 The user you are trying to contact is receiving mail at a rate that prevents "
                      "additional messages from being delivered"), "domain"),
        (_result(452, "452 Too many recipients for this mailbox, slow down"), "domain"),
        # the real providers' replies: about the sender (its IP, its recipients per session or hour), not a mailbox
        (_result(421, "421 4.7.0 [TSS04] Messages from 203.0.113.5 temporarily deferred due to unexpected volume or "
                      "user complaints - 4.16.56; see https://postmaster.yahooinc.com/error-codes"), "relay"),
        (_result(451, "451 4.7.0 [TSS04] Messages from 203.0.113.5 temporarily deferred due to unexpected volume or "
                      "user complaints - 4.16.56; see https://postmaster.yahooinc.com/error-codes"), "maybe_relay"),
        (_result(452, "452 4.5.3 Your message has too many recipients. For more information regarding Google's "
                      "sending limits, visit https://support.google.com/mail/answer/6592"), "maybe_relay"),
        (_result(452, "452 4.5.3 Too many recipients ([AS:RecipientRateLimit])"), "maybe_relay"),
        (_result(451, "451 4.7.500 Server busy. Please try again later from [203.0.113.5]. (S77719)"), "maybe_relay"),
        (_result(421, "421 4.7.28 Gmail has detected an unusual rate of unsolicited mail originating from your IP "
                      "address. To protect our users from spam, mail sent from your IP address has been temporarily "
                      "rate limited."), "relay"),
        # the relay's own limits, whatever recipient they met: Microsoft 365's sender thread limit (after the dot),
        # Google Workspace's SMTP relay peak limit (its 4.2.1 is not a mailbox's)
        (_result(432, "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [Hostname=AM0PR01MB1234."
                      "eurprd01.prod.exchangelabs.com]", stage="reply"), "relay"),
        (_result(450, "450 4.2.1 Peak SMTP relay limit exceeded for customer. This is a temporary error. For more "
                      "information on SMTP relay limits, please contact your administrator or visit "
                      "https://support.google.com/a/answer/6140680"), "relay"),
        (_result(450, "450 4.2.1 Peak SMTP relay limit exceeded for customer. This is a temporary error.",
                 stage="mail"), "relay"),
        # not throttling: the message's own temporary failure, the dispatcher's pause, or not a failure at all
        (_result(451, "451 4.3.0 try again later"), None),
        # an IP address the reply names is not a 4.2.x mailbox status
        (_result(450, "450 Too many messages from 10.4.2.9, slow down"), "maybe_relay"),
        # an outage or a flaky network, not a rate: the dispatcher's pause takes a relay that keeps failing
        (_result(421, "421 4.3.2 Service not available, closing transmission channel", stage="connect"), None),
        (_result(421, "421 4.3.0 Temporary System Problem. Try again later", stage="connect"), None),
        # a 5xx greeting refuses this client outright (a block list, complaints): no pace helps; at MAIL FROM alike
        (_result(554, "554 5.7.1 Service unavailable; too many complaints from 203.0.113.5, blocked", stage="connect"),
         None),
        (_result(554, "554 5.7.1 Too many spam reports from your IP: rejected", stage="mail"), None),
        (_result(None, "Connection lost", "connect", "SMTPServerDisconnected"), None),
        (_result(None, "Connection lost", "data", "SMTPServerDisconnected"), None),
        (_result(None, "Connection lost", "reply", "SMTPServerDisconnected", Outcome.AMBIGUOUS), None),
        (_result(None, "[SSL: WRONG_VERSION_NUMBER] wrong version number", "connect", "SSLError"), None),
        (SendResult(Outcome.TRANSIENT, None, "certificate verify failed", "SSLCertVerificationError", stage="connect",
                    setup="smtp.tls"), None),
        (_result(450, "450 4.7.1 Greylisted, please try again in 60 seconds"), None),
        (_result(None, "Connection refused", "connect", "SMTPConnectError"), None),
        (_result(535, "535 5.7.8 Authentication credentials invalid", stage="auth"), None),
        (_result(250, "250 OK", "reply", outcome=Outcome.SENT), None),
    ],
)
def test_where_a_slow_down_belongs(result: SendResult, scope: str | None) -> None:
    assert throttle_scope(result) == scope


SLOW = _result(451, "451 4.7.1 Too many messages, slow down")


@pytest.mark.parametrize(
    ("seen", "scope"),
    [
        ([(0.0, "a.example")], "domain"),  # one domain alone so far: its own limit
        ([(0.0, "a.example"), (1.0, "a.example")], "domain"),
        ([(0.0, "a.example"), (3.0, "b.example")], "relay"),  # a second domain within the window: the relay's
        ([(0.0, "a.example"), (11.0, "b.example")], "domain"),  # …not once the first is 10 s old
    ],
)
def test_a_slow_down_for_several_domains_is_the_relays(seen: list[tuple[float, str]], scope: str) -> None:
    pace = RelayPace(ceiling=50.0, floor=0.2)
    scopes = [pace.scope(SLOW, domain, now) for now, domain in seen]
    assert scopes[-1] == scope


def test_one_cut_per_round_then_a_rest() -> None:
    pace = RelayPace(ceiling=50.0, floor=0.2)
    assert pace.throttled(10.0, began=9.9) and pace.current == 25.0
    assert pace.wait(10.0) == REST_SECONDS  # no send begins for a second: the relay's window moves on
    # the replies of attempts that began before the cut went at the old pace: they say nothing new
    assert not pace.throttled(10.05, began=9.95) and pace.current == 25.0
    assert pace.throttled(11.5, began=11.1) and pace.current == 12.5
    assert pace.wait(12.0) == pytest.approx(0.5)


def test_never_below_the_floor_and_the_rest_is_one_interval_when_longer() -> None:
    pace = RelayPace(ceiling=1.0, floor=0.2)
    for n in range(6):
        pace.throttled(100.0 * n, began=100.0 * n)
    assert pace.current == 0.2
    assert pace.wait(500.0) == pytest.approx(5.0)  # one interval at 0.2/s


@pytest.mark.parametrize(
    ("sends_at", "rates"),
    [
        ([1.0, 4.9], [25.0, 25.0]),  # within RECOVER_SECONDS of the cut: no step
        ([5.0, 6.0, 10.0], [31.25, 31.25, 39.0625]),  # a quarter up every 5 s of sends without a cut
        ([5.0, 10.0, 15.0, 20.0], [31.25, 39.0625, 48.828125, 50.0]),  # never above the configured rate
    ],
)
def test_sends_bring_the_rate_back_step_by_step(sends_at: list[float], rates: list[float]) -> None:
    pace = RelayPace(ceiling=50.0, floor=0.2)
    pace.throttled(0.0, began=0.0)
    seen = []
    for at in sends_at:
        pace.succeeded(at)
        seen.append(pace.current)
    assert seen == rates
    assert pace.slowed is (rates[-1] < 50.0)


def test_pace_validates() -> None:
    with pytest.raises(ValueError, match="positive"):
        RelayPace(ceiling=0.0, floor=0.2)


@pytest.mark.parametrize(("idle", "rate"), [(12.0, 0.2 * 1.25**2), (3600.0, 50.0), (3.2e7, 50.0)])
def test_a_send_after_a_quiet_spell_takes_a_step_for_each_5_s_of_it(idle: float, rate: float) -> None:
    pace = RelayPace(ceiling=50.0, floor=0.2)
    for n in range(10):
        pace.throttled(float(n), began=float(n))
    assert pace.current == 0.2
    assert pace.succeeded(9.0 + idle) and pace.current == pytest.approx(rate)


def test_a_shared_pace_is_cut_once_per_round_whichever_worker_meets_the_signal() -> None:
    # Given no cut yet: a relay-wide signal halves the configured rate
    first = shared_cut(None, ceiling=50.0, floor=0.2, now=100.0, began=99.9)
    assert first == SharedCut(100.0, 25.0)
    # another worker's signal from an attempt that began before the rest after that cut was over (it went at the
    # old pace, or before that worker knew of the cut) cuts nothing; one that began after it halves again
    assert shared_cut(first, ceiling=50.0, floor=0.2, now=100.5, began=99.95) is None
    assert shared_cut(first, ceiling=50.0, floor=0.2, now=100.9, began=100.6) is None
    assert shared_cut(first, ceiling=50.0, floor=0.2, now=101.3, began=101.1) == SharedCut(101.3, 12.5)
    # ten quiet seconds later the pace is two steps back up, for every worker that follows the cut
    later = shared_cut(first, ceiling=50.0, floor=0.2, now=110.5, began=110.4)
    assert later is not None and later.rate == pytest.approx(25.0 * 1.25**2 / 2)


def test_a_worker_following_a_shared_cut_rests_and_steps_back_up_from_the_cuts_time() -> None:
    pace = RelayPace(ceiling=50.0, floor=0.2)
    pace.follow(SharedCut(100.0, 6.25), now=100.2)
    assert pace.current == 6.25 and pace.wait(100.2) == pytest.approx(0.8)
    pace.follow(SharedCut(100.0, 6.25), now=111.0)  # read again later: two steps up, as every other worker has it
    assert pace.current == pytest.approx(6.25 * 1.25**2) and pace.wait(111.0) == 0.0
    pace.follow(SharedCut(40.0, 0.2), now=4000.0)  # an hour-old cut: back at the configured rate
    assert not pace.slowed
