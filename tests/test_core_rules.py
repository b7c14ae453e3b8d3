"""Tables of cases for the pure rules: state transitions, backoff, rate arithmetic, tokens, recommendations."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from worker.core import tokens
from worker.core.lifecycle import (
    THROTTLED_CAP_SECONDS,
    after_attempt,
    backoff_seconds,
    clock_offset_problem,
    requeued,
    shown_offset,
)
from worker.core.ratelimit import Gcra
from worker.core.recommend import recommend
from worker.domain import MessageStatus, Outcome, ProductView, SendResult

NOW = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("attempts", "expected"), [(0, MessageStatus.PLANNED), (1, MessageStatus.RETRY), (4, MessageStatus.RETRY)]
)
def test_a_row_given_back_unsent_waits_as_planned_until_an_attempt_was_made(
    attempts: int, expected: MessageStatus
) -> None:
    assert requeued(attempts) is expected


@pytest.mark.parametrize(
    ("offset", "uncertainty", "lease", "refused"),
    [
        (0.0, 0.0, 300, False),
        (15.0, 0.0, 300, False),  # a sixth of 300 s is 50 s: 15 s at most (the mark looks back 60 s)
        (15.5, 0.0, 300, True),
        (-15.5, 0.0, 300, True),  # behind as well as ahead
        (16.0, 2.0, 300, False),  # within 15 s of it, given the query's round trip: not refused
        (5.5, 0.0, 30, True),  # a lease of 30 s allows 5 s
        (300.0, 0.0, 3600, True),
    ],
)
def test_a_clock_is_refused_past_a_sixth_of_a_lease_and_at_most_15_s_off_the_databases(
    offset: float, uncertainty: float, lease: int, refused: bool
) -> None:
    problem = clock_offset_problem(offset, uncertainty, lease)
    assert (problem is not None) is refused
    if problem:
        assert f"{abs(offset):.1f} s {'ahead of' if offset > 0 else 'behind'} the database's" in problem


@pytest.mark.parametrize(("offset", "shown"), [(-0.04, "0.0"), (0.04, "0.0"), (-0.06, "-0.1"), (300.04, "300.0")])
def test_a_clock_offset_is_shown_to_a_tenth_of_a_second_and_never_as_minus_zero(offset: float, shown: str) -> None:
    # the health line said clock_offset_seconds=-0.0 of a clock a few milliseconds behind the database's
    assert str(shown_offset(offset)) == shown


@pytest.mark.parametrize(
    ("outcome", "attempt", "expected"),
    [
        (Outcome.SENT, 1, MessageStatus.SENT),
        (Outcome.AMBIGUOUS, 1, MessageStatus.UNCERTAIN),
        (Outcome.PERMANENT, 1, MessageStatus.FAILED),
        (Outcome.RENDER_ERROR, 1, MessageStatus.FAILED),
        (Outcome.TRANSIENT, 1, MessageStatus.RETRY),
        (Outcome.TRANSIENT, 4, MessageStatus.RETRY),
        (Outcome.TRANSIENT, 5, MessageStatus.FAILED),  # max_attempts reached
    ],
)
def test_after_attempt(outcome: Outcome, attempt: int, expected: MessageStatus) -> None:
    status, next_at = after_attempt(SendResult(outcome, None, ""), attempt=attempt, max_attempts=5, now=NOW,
                                    base_seconds=60, cap_seconds=3600)
    assert status is expected
    assert (next_at is not None) == (expected is MessageStatus.RETRY)
    if next_at is not None:
        assert next_at > NOW


@pytest.mark.parametrize(
    ("attempt", "hint", "low", "high"),
    [
        (1, None, 30, 60),        # base 60, jitter in [0.5, 1]
        (2, None, 60, 120),
        (3, None, 120, 240),
        (10, None, 1800, 3600),   # capped
        (1, 300.0, 300, 300),     # the server's hint wins when longer
        (3, 10.0, 120, 240),      # …and is ignored when shorter
        (1, 99999.0, 3600, 3600), # a hint is still capped
        (1100, None, 1800, 3600), # the 1100th attempt: 2.0 ** 1099 overflowed (OverflowError in the dispatcher)
    ],
)
def test_backoff_is_exponential_jittered_capped_and_honours_hints(
    attempt: int, hint: float | None, low: float, high: float
) -> None:
    rng = random.Random(attempt)
    delays = [backoff_seconds(attempt, base=60, cap=3600, hint=hint, rng=rng) for _ in range(50)]
    assert all(low <= delay <= high for delay in delays), delays
    # jittered: spread over both halves of the range, not one fixed delay (a hint or the cap alone pins it)
    if low < high:
        assert min(delays) < (low + high) / 2 < max(delays), delays
    else:
        assert set(delays) == {low}, delays


@pytest.mark.parametrize(("rate", "burst", "seconds"), [(10.0, 1, 60), (50.0, 20, 30), (0.5, 3, 600)])
def test_gcra_holds_the_rate_over_time(rate: float, burst: int, seconds: int) -> None:
    """Events booked as fast as allowed, on a simulated clock: at most rate*t + burst in any prefix."""
    limiter = Gcra(rate=rate, burst=burst)
    clock = 0.0
    times: list[float] = []
    while clock < seconds:
        clock += limiter.reserve(clock)
        times.append(clock)
    assert times[:burst] == [0.0] * burst  # the burst goes at once
    for i, t in enumerate(times):
        assert i + 1 <= rate * t + burst + 1e-9
    assert len(times) == pytest.approx(rate * seconds + burst, abs=1)


def test_gcra_does_not_bank_idle_time_beyond_the_burst() -> None:
    limiter = Gcra(rate=1.0, burst=2)
    assert [limiter.reserve(0.0) for _ in range(3)] == [0.0, 0.0, 1.0]
    # after a long idle spell only `burst` events go at once
    waits = [limiter.reserve(100.0) for _ in range(3)]
    assert waits == [0.0, 0.0, 1.0]
    assert limiter.allows(102.0) and not Gcra(rate=1.0, burst=1, tat=5.0).allows(3.0)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0)])
def test_gcra_rejects_nonsense(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        Gcra(rate=rate, burst=burst)


KEY, OLD_KEY = b"k" * 32, b"o" * 32
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


SHOP = "toko-kembali.example"


def test_tokens_round_trip_and_rotate() -> None:
    token = tokens.sign("u", "42", KEY, shop=SHOP)
    assert tokens.verify(token, [KEY], shop=SHOP) == ("u", "42")
    assert tokens.verify(tokens.sign("u", "42", OLD_KEY, shop=SHOP), [KEY, OLD_KEY], shop=SHOP) == ("u", "42")
    assert tokens.verify(tokens.sign("u", "42", OLD_KEY, shop=SHOP), [KEY], shop=SHOP) is None


def test_a_token_verifies_only_for_the_shop_it_was_signed_for() -> None:
    # Given two shops with the same key, and a token of before, signed for no shop
    token = tokens.sign("u", "5:abc", KEY, shop=SHOP)
    unbound = tokens.sign("u", "5:abc", KEY, shop="")
    # Then the token verifies for its shop alone (however its domain is written), the one of before for none
    assert tokens.verify(token, [KEY], shop=tokens.shop_scope("Toko-Kembali.Example.")) == ("u", "5:abc")
    assert tokens.verify(token, [KEY], shop="toko-lain.example") is None
    assert tokens.verify(token, [KEY], shop="") is None
    assert tokens.verify(unbound, [KEY], shop=SHOP) is None
    assert tokens.verify(unbound, [KEY], shop="") == ("u", "5:abc")
    # And the token's text is as before: the same payload, a MAC of the same length
    assert token.split(".")[0] == unbound.split(".")[0] and len(token) == len(unbound) and token != unbound
    # And no kind can make a token of before stand for a bound one (a bound MAC's message starts with a digit)
    with pytest.raises(ValueError):
        tokens.sign("20", f"{SHOP}u:5", KEY, shop="")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-1],                         # truncated
        lambda t: t[:-2] + ("A" if t[-2] != "A" else "B") + t[-1],  # tampered MAC
        lambda t: "dTo0Mw" + t[t.index("."):],    # another payload, same MAC
        lambda t: t.replace(".", ""),             # no separator
        lambda t: t + ".x",                       # extra part
        lambda t: "",                             # empty
        lambda t: "!!!.???",                      # not base64
        # characters base64 decoding skipped, and the same bytes spelt another way: each was taken as the token
        lambda t: t[:4] + "!!!!" + t[4:],         # characters outside the alphabet, inside the payload
        lambda t: t + "%%%%",                     # … after the MAC
        lambda t: t.replace(".", ".    "),        # spaces
        lambda t: t[:-1] + _B64[_B64.index(t[-1]) ^ 1],  # the MAC's last character, an unused low bit changed
    ],
)
def test_forged_tokens_are_rejected(mangle: object) -> None:
    token = tokens.sign("u", "42", KEY, shop=SHOP)
    assert tokens.verify(mangle(token), [KEY], shop=SHOP) is None  # type: ignore[operator]


def test_a_token_padded_with_equals_signs_still_verifies() -> None:
    # (a mail client that leaves base64 padding, or a quoted-printable soft break's '=', on the end of a link)
    token = tokens.sign("u", "42", KEY, shop=SHOP)
    assert tokens.verify(token + "=", [KEY], shop=SHOP) == ("u", "42")
    assert tokens.verify(token + "==", [KEY], shop=SHOP) == ("u", "42")


def test_tokens_carry_no_readable_email() -> None:
    assert "@" not in tokens.sign("u", "42", KEY, shop=SHOP)


def _p(ext: str, category: str) -> ProductView:
    return ProductView(ext, ext, category, 1000, "IDR", "https://s.example/" + ext, "")


CATALOGUE = [_p("B1", "Batik"), _p("K1", "Kopi"), _p("K2", "Kopi"), _p("T1", "Tas"), _p("K3", "Kopi")]


@pytest.mark.parametrize(
    ("bought", "n", "expected"),
    [
        (["K1"], 3, ["K2", "K3", "B1"]),   # same category first (best sellers first), then best sellers
        (["K1", "B1"], 2, ["K2", "K3"]),
        ([], 2, ["B1", "K1"]),              # nothing bought: the shop's best sellers
        (["T1"], 0, []),
        (["K1", "K2", "K3", "B1", "T1"], 3, []),  # bought everything
    ],
)
def test_recommend(bought: list[str], n: int, expected: list[str]) -> None:
    owned = [p for p in CATALOGUE if p.external_id in bought]
    assert [p.external_id for p in recommend(owned, CATALOGUE, n)] == expected


def test_backoff_never_schedules_in_the_past() -> None:
    status, next_at = after_attempt(SendResult(Outcome.TRANSIENT, 451, "", retry_after_seconds=120.0),
                                    attempt=1, max_attempts=3, now=NOW, base_seconds=1, cap_seconds=600)
    assert status is MessageStatus.RETRY and next_at is not None and next_at >= NOW + timedelta(seconds=120)


@pytest.mark.parametrize(
    ("result", "throttled_before", "longest"),
    [
        (SendResult(Outcome.THROTTLED, 421, "421 4.7.0 Try again later", stage="reply"), 0, 60),
        (SendResult(Outcome.THROTTLED, 421, "421 4.7.0 Try again later", stage="reply"), 3, 480),
        (SendResult(Outcome.THROTTLED, 451, "451 4.7.1 Rate limited", stage="rcpt"), 20, 3600),  # the cap
        # a failure before RCPT TO is not spaced out by the message's throttled tries: the dispatcher's pause takes it
        (SendResult(Outcome.TRANSIENT, None, "Connection refused", stage="connect"), 3, 60),
    ],
)  # fmt: skip
def test_a_message_throttled_time_after_time_waits_longer_each_time(
    result: SendResult, throttled_before: int, longest: float
) -> None:
    status, next_at = after_attempt(result, attempt=1, max_attempts=5, now=NOW, base_seconds=60, cap_seconds=3600,
                                    throttled_before=throttled_before, rng=random.Random(7))  # fmt: skip
    assert status is MessageStatus.RETRY and next_at is not None
    assert longest / 2 <= (next_at - NOW).total_seconds() <= longest


def test_a_message_throttled_time_after_time_is_tried_at_least_hourly_under_the_default_six_hour_cap() -> None:
    # Given the default backoff (60 s doubling up to 6 h), a message the relay "slowed down" 20 times in a row (its
    # limit for everyone, lifted since), and another that failed 9 times for its own reasons
    throttled = SendResult(Outcome.THROTTLED, 421, "421 4.7.0 Too many messages, slow down", stage="reply")
    failed = SendResult(Outcome.TRANSIENT, 451, "451 4.3.0 Mailbox temporarily unavailable", stage="rcpt")
    waits = {
        name: [(after_attempt(result, attempt=attempt, max_attempts=20, now=NOW, base_seconds=60, cap_seconds=6 * 3600,
                              throttled_before=before, rng=random.Random(seed))[1] - NOW).total_seconds()
               for seed in range(20)]
        for name, result, attempt, before in (("throttled", throttled, 1, 20), ("failed", failed, 10, 0))
    }  # fmt: skip
    # Then the throttled one is tried again within the hour (not hours after the relay took mail again), while the
    # failing one waits out the longer backoff
    assert all(THROTTLED_CAP_SECONDS / 2 <= wait <= THROTTLED_CAP_SECONDS for wait in waits["throttled"])
    assert max(waits["failed"]) > THROTTLED_CAP_SECONDS
    # and a server that says when to come back is heeded beyond that hour, up to the backoff's cap
    hinted = SendResult(Outcome.THROTTLED, 421, "421 4.7.0 Try again in 2 hours", stage="reply",
                        retry_after_seconds=7200)
    _, next_at = after_attempt(hinted, attempt=1, max_attempts=20, now=NOW, base_seconds=60, cap_seconds=6 * 3600,
                               throttled_before=20)  # fmt: skip
    assert next_at == NOW + timedelta(hours=2)
