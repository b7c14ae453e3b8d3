"""One worker of the weeks-long story (``tests/test_policy_over_weeks.py``) as a process of its own.

Several of these share one PostgreSQL database, each with its own engine and worker id (its pid), as workers on
several hosts do. Each run comes on stdin as a pickled ``(settings, now)``; the worker makes it on its fake clock
(``one_run``), answering ``"planned"`` on stdout between its planning and its sending and waiting there for
``"send"``, then answers what the run did, or the error's traceback. Before each claim it asks for its turn
(``"claim"``), waits for ``"go"`` and answers ``"claimed"`` once the claim is made: the test has the workers
claim in a fixed order. Its log goes to stderr.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import traceback
from typing import Any

from tests.test_policy_over_weeks import START, Renderer, one_run
from worker.adapters.store import Store
from worker.domain import ClaimedMessage
from worker.testing import FakeClock


def main() -> None:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr  # stdout carries the replies alone
    lock = threading.Lock()  # (the claims come from the store's thread, the rest from the main one)

    def reply(what: object) -> None:
        with lock:
            pickle.dump(what, replies)
            replies.flush()

    def told(expected: str) -> None:
        assert pickle.load(sys.stdin.buffer) == expected  # noqa: S301 (from the test)

    def planned() -> None:
        reply("planned")
        told("send")

    claim = Store.claim

    def claim_in_turn(self: Store, **kwargs: Any) -> list[ClaimedMessage]:
        reply("claim")
        told("go")
        try:
            return claim(self, **kwargs)
        finally:
            reply("claimed")

    Store.claim = claim_in_turn  # type: ignore[method-assign]
    clock = FakeClock(START)
    renderer = Renderer()
    while True:
        try:
            settings, now = pickle.load(sys.stdin.buffer)  # noqa: S301 (from the test)
        except EOFError:
            return
        try:
            reply(one_run(settings, clock, now, renderer, planned=planned))
        except BaseException:
            reply(traceback.format_exc())


if __name__ == "__main__":
    main()
