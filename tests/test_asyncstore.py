"""The store's thread as a stopping daemon meets it: a stop waits a moment for a call under way, not for a
database that does not answer."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from worker.adapters import db
from worker.adapters.store import Store
from worker.asyncstore import STOP_PATIENCE_SECONDS, AsyncStore, CallLeft


def _store(tmp_path: Path) -> AsyncStore:
    return AsyncStore(Store(db.create_engine(f"sqlite:///{tmp_path / 'k.db'}")))


def test_a_call_that_answers_soon_after_the_stop_is_answered(tmp_path: Path) -> None:
    # a claim that took rows as the stop came: its rows must be known (to give them back), not left to lapse
    astore = _store(tmp_path)

    def claim() -> list[int]:
        time.sleep(STOP_PATIENCE_SECONDS / 4)
        return [1, 2]

    async def stopped_during_the_call() -> list[int]:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.01, stop.set)
        return await astore.call_retrying_until(stop, "claim_retried", claim)

    try:
        assert asyncio.run(stopped_during_the_call()) == [1, 2]
        assert not astore.left_running
    finally:
        astore.close()


def test_a_call_that_does_not_answer_is_left_to_its_thread_once_a_stop_comes(tmp_path: Path) -> None:
    # a claim waiting for another program's SQLite write lock (up to 30 s): the stop does not wait for it
    astore = _store(tmp_path)
    release = threading.Event()

    def claim() -> list[int]:
        release.wait(30)
        return [1]

    async def stopped_during_the_call() -> float:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.01, stop.set)
        began = time.monotonic()
        with pytest.raises(CallLeft, match="claim"):
            await astore.call_retrying_until(stop, "claim_retried", claim)
        return time.monotonic() - began

    try:
        waited = asyncio.run(stopped_during_the_call())
        assert astore.left_running and waited < 30
        # and once the call it left ends, nothing is left running: a shutdown much later waits for no database
        release.set()
        astore.close()
        assert not astore.left_running
    finally:
        release.set()
        astore.close()
