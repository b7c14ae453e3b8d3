"""The run's arbiter: what this run decided to send counts against the cap until the ledger shows it, never
twice, and it forgets each send once every batch still to come can see it in the ledger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from worker.contact import Arbiter
from worker.core.policy import CapWindow, ContactPolicy, DeferUntil, SendNow
from worker.domain import ClaimedMessage, CustomerSnapshot, Locale

NOW = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)  # 10:00 in Jakarta, outside quiet hours
TWO_A_DAY = ContactPolicy(caps=(CapWindow(2, 1),), quiet=None)
ONE_A_DAY = ContactPolicy(caps=(CapWindow(1, 1),), quiet=None)
BUDI = CustomerSnapshot(1, "C1", "budi@example.com", "Budi", Locale.ID, "Asia/Jakarta", None, True)


def message(row: int, campaign: str = "winback") -> ClaimedMessage:
    return ClaimedMessage(row, f"{campaign}:C1:{row}", campaign, 1, BUDI.id, BUDI.email, f"<{row}@x>", 0, NOW,
                          NOW + timedelta(days=14), {})  # fmt: skip


def test_a_send_decided_in_this_run_takes_the_slot_until_the_ledger_shows_it() -> None:
    arbiter = Arbiter(ONE_A_DAY)
    assert isinstance(arbiter.decide(message(1), BUDI, [], NOW, facts_seq=0), SendNow)
    # a second batch whose facts were read before that send was committed: the ledger shows nothing yet
    second = arbiter.decide(message(2), BUDI, [], NOW, facts_seq=0)
    assert second == DeferUntil(NOW + timedelta(days=1), "cap")


def test_a_committed_send_the_next_batch_read_is_counted_once_not_twice() -> None:
    # two a day: one sent and committed, then a batch that read the ledger after that commit
    arbiter = Arbiter(TWO_A_DAY)
    assert isinstance(arbiter.decide(message(1), BUDI, [], NOW, facts_seq=0), SendNow)
    arbiter.settled(1, sent=True, seq=1)
    assert isinstance(arbiter.decide(message(2), BUDI, [NOW], NOW, facts_seq=1), SendNow)
    # a third would be one too many: the ledger's send and this run's second both count
    assert arbiter.decide(message(3), BUDI, [NOW], NOW, facts_seq=1) == DeferUntil(NOW + timedelta(days=1), "cap")


def test_a_send_committed_after_the_facts_were_read_still_counts() -> None:
    arbiter = Arbiter(ONE_A_DAY)
    assert isinstance(arbiter.decide(message(1), BUDI, [], NOW, facts_seq=0), SendNow)
    arbiter.settled(1, sent=True, seq=1)
    # this batch's facts were read after commit 0 only: the send is not in them
    assert arbiter.decide(message(2), BUDI, [], NOW, facts_seq=0) == DeferUntil(NOW + timedelta(days=1), "cap")


def test_a_decided_send_that_ended_in_no_email_frees_the_slot() -> None:
    arbiter = Arbiter(ONE_A_DAY)
    assert isinstance(arbiter.decide(message(1), BUDI, [], NOW, facts_seq=0), SendNow)
    arbiter.settled(1, sent=False, seq=1)  # failed, or went back to the queue
    assert isinstance(arbiter.decide(message(2), BUDI, [], NOW, facts_seq=1), SendNow)


def test_memory_holds_only_what_the_ledger_cannot_show_yet() -> None:
    arbiter = Arbiter(ONE_A_DAY)
    customers = [BUDI.__class__(i, f"C{i}", f"c{i}@example.com", "X", Locale.ID, "Asia/Jakarta", None, True)
                 for i in range(1, 1001)]  # fmt: skip
    for batch in range(10):  # ten batches of a hundred customers, each sent and committed before the next
        for c in customers[batch * 100 : (batch + 1) * 100]:
            m = ClaimedMessage(c.id, f"k{c.id}", "winback", 1, c.id, c.email, "<m>", 0, NOW, NOW + timedelta(days=1),
                               {})  # fmt: skip
            assert isinstance(arbiter.decide(m, c, [], NOW, facts_seq=batch), SendNow)
        assert arbiter.remembered() == 100  # this batch's, the earlier ones were forgotten
        for c in customers[batch * 100 : (batch + 1) * 100]:
            arbiter.settled(c.id, sent=True, seq=batch + 1)
        arbiter.forget_visible(batch + 1)
        assert arbiter.remembered() == 0
    assert arbiter.peak == 100
    # preview passes no facts_seq: everything it decided keeps counting
    preview = Arbiter(ONE_A_DAY)
    preview.decide(message(1), BUDI, [], NOW)
    preview.forget_visible(10)
    assert preview.remembered() == 1


def test_news_this_run_decided_to_send_holds_more_news_back_a_week_whatever_the_cap() -> None:
    arbiter = Arbiter(ContactPolicy(caps=(), quiet=None))
    assert isinstance(arbiter.decide(message(1), BUDI, [], NOW, facts_seq=0), SendNow)  # a win-back holds no news
    assert isinstance(arbiter.decide(message(2, "new_products"), BUDI, [], NOW, facts_seq=0), SendNow)
    # another week's news for the mailbox, in a batch that read the ledger before that send was committed: it waits
    # a week (its expiry, 14 days after NOW, comes later: it waits rather than expires)
    later = NOW + timedelta(hours=1)
    assert arbiter.decide(message(3, "new_products"), BUDI, [], later, facts_seq=0) == DeferUntil(
        NOW + timedelta(days=7), "news_week"
    )
    assert isinstance(arbiter.decide(message(4, "feedback"), BUDI, [], later, facts_seq=0), SendNow)
    # the news send went nowhere (failed): it holds nothing back
    arbiter.settled(2, sent=False, seq=1)
    assert isinstance(arbiter.decide(message(3, "new_products"), BUDI, [], later, facts_seq=1), SendNow)
