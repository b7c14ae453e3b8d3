"""``plan_sql.read_ahead``: SQLite's planning read runs on a thread of its own, ahead of the inserts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import closing, nullcontext

import pytest

from worker.adapters.plan_sql import read_ahead

WAIT = 10.0  # seconds: how long a test waits for the other thread before it fails


class Source:
    """Numbers produced one by one, recording on which thread, and whether the iterator was closed there."""

    def __init__(self, count: int, *, fail_at: int | None = None) -> None:
        self.count = count
        self.fail_at = fail_at
        self.produced: list[int] = []
        self.threads: set[str] = set()
        self.closed_on: str | None = None
        self.progress = threading.Condition()

    def __call__(self) -> Iterator[int]:
        self.threads.add(threading.current_thread().name)
        try:
            for n in range(self.count):
                if n == self.fail_at:
                    raise LookupError(f"no row {n}")
                with self.progress:
                    self.produced.append(n)
                    self.progress.notify_all()
                yield n
        finally:
            self.closed_on = threading.current_thread().name

    def wait_for(self, produced: int) -> bool:
        with self.progress:
            return self.progress.wait_for(lambda: len(self.produced) >= produced, timeout=WAIT)


def readers() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.endswith("-read")]


def test_every_item_arrives_in_order_from_another_thread() -> None:
    source = Source(50)
    assert list(read_ahead(source, depth=3)) == list(range(50))
    assert source.threads == {f"{threading.current_thread().name}-read"}
    assert source.closed_on == f"{threading.current_thread().name}-read"
    assert readers() == []


def test_the_producer_runs_ahead_while_the_caller_is_busy_but_no_further_than_depth() -> None:
    source = Source(100)
    with closing(read_ahead(source, depth=2)) as items:
        assert next(items) == 0
        # the caller works on item 0 (inserts it); meanwhile the read goes on: two items queued, one in hand
        assert source.wait_for(4), source.produced
        time.sleep(0.2)  # unbounded, the read would have produced all 100 by now
        with source.progress:
            assert source.produced == [0, 1, 2, 3]  # 0 taken, 1 and 2 queued, 3 waiting for room
        assert list(items) == list(range(1, 100))


def test_a_failure_of_the_read_is_raised_in_the_caller_after_the_items_before_it() -> None:
    source = Source(10, fail_at=6)
    got: list[int] = []
    with pytest.raises(LookupError, match="no row 6"):
        for n in read_ahead(source):
            got.append(n)
    assert got == [0, 1, 2, 3, 4, 5]
    assert readers() == []


@pytest.mark.parametrize("how", ["break", "raise"])
def test_a_caller_that_stops_early_stops_the_read_and_waits_for_it(how: str) -> None:
    source = Source(1_000_000)
    expected = pytest.raises(RuntimeError, match="insert failed") if how == "raise" else nullcontext()
    with expected, closing(read_ahead(source, depth=2)) as items:  # closing: as plan_sql.insert holds it
        for n in items:
            if n == 3:
                if how == "raise":
                    raise RuntimeError("insert failed")
                break
    # the iterator was closed on its own thread (a read transaction it opened ended there), and that thread is gone
    assert source.closed_on == f"{threading.current_thread().name}-read"
    assert readers() == []
    assert len(source.produced) < 10

