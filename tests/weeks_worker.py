"""One worker of the weeks-long story (``tests/test_policy_over_weeks.py``) as a process of its own.

Several of these share one PostgreSQL database, each with its own engine and worker id (its pid), as workers on
several hosts do. Each run comes on stdin as a pickled ``(settings, now)``; the worker makes it on its fake clock
(``one_run``), answering ``"planned"`` on stdout between its planning and its sending and waiting there for
``"send"``, then answers what the run did, or the error's traceback. Its log goes to stderr.
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback

from tests.test_policy_over_weeks import START, one_run
from worker.testing import FakeClock


def main() -> None:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr  # stdout carries the replies alone

    def reply(what: object) -> None:
        pickle.dump(what, replies)
        replies.flush()

    def planned() -> None:
        reply("planned")
        assert pickle.load(sys.stdin.buffer) == "send"  # noqa: S301 (from the test)

    clock = FakeClock(START)
    while True:
        try:
            settings, now = pickle.load(sys.stdin.buffer)  # noqa: S301 (from the test)
        except EOFError:
            return
        try:
            reply(one_run(settings, clock, now, planned=planned))
        except BaseException:
            reply(traceback.format_exc())


if __name__ == "__main__":
    main()
