"""How a process takes its stop signals: the first stops it gracefully, a second one at once.

A SIGTERM that repeats the first within ``ECHO_SECONDS`` is the same request, not a second one: coreutils'
``timeout`` (cron's usual guard) and some supervisors signal the process and then its whole process group, so
it gets two SIGTERMs microseconds apart, and treating the echo as "now, at once" left rows in flight. A SIGINT
is mostly a person's Ctrl-C: pressed again it forces, however quickly a person can press it; only a SIGINT
within ``INT_ECHO_SECONDS`` of the first is its echo (``timeout -s INT`` signals the process and its group too,
and forcing on that left a run's messages in ``sending``, to become uncertain).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from types import FrameType
from typing import Any, Literal, NoReturn, TypeVar, cast

from worker import launch, log

ECHO_SECONDS = 1.0
INT_ECHO_SECONDS = 0.05
"""Shorter than any person's second Ctrl-C (a held key repeats after a quarter of a second or more)."""
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

Verdict = Literal["stop", "echo", "force"]


class StopSignals:
    """What each stop signal means, given the ones before it."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self.first: signal.Signals | None = None
        self._first_at = 0.0

    def take(self, sig: signal.Signals) -> Verdict:
        """``stop`` (the first: stop gracefully), ``echo`` (the first signal again, from a process-group kill:
        ignore it) or ``force`` (a real second request: exit at once)."""
        now = self._monotonic()
        if self.first is None:
            self.first, self._first_at = sig, now
            return "stop"
        window = ECHO_SECONDS if sig is signal.SIGTERM else INT_ECHO_SECONDS
        if sig is self.first and now - self._first_at < window:
            return "echo"
        return "force"


class StartupStopped(Exception):
    """A stop signal came while the daemon was starting: start-up gave up, leaving nothing behind."""

    def __init__(self, sig: signal.Signals) -> None:
        super().__init__(f"stopped by {sig.name} during start-up")
        self.signal = sig


class StartupSignals:
    """The daemon's signals from the moment ``kembali run`` knows it is one until its event loop takes them over.

    Until then Python's defaults applied: a SIGTERM or SIGHUP killed the process where it stood (no log line,
    a template snapshot left in the temporary folder, exit -15 or -1 where systemd expects 0), a SIGINT raised
    KeyboardInterrupt wherever it landed. Here the first stop signal is logged and noted, and start-up gives up at
    its next ``check()`` (between two renders of the template check, say); a second one forces, as later; a
    SIGHUP is kept, to reload once the daemon is up."""

    def __init__(self, signals: StopSignals | None = None) -> None:
        self.signals = signals or StopSignals()
        self.stop: signal.Signals | None = None
        self.hangup = False
        self.before_forced_exit: list[Callable[[], None]] = []
        """Quick clean-ups a forced exit runs first: what must not outlive the process (template copies)."""
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> StartupSignals:
        for sig in (*STOP_SIGNALS, signal.SIGHUP):
            self._previous[sig] = signal.signal(sig, self._take)
        if launch.early_sigterm():  # one came while Python loaded kembali: the first stop, taken now
            self._take(signal.SIGTERM, None)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def check(self) -> None:
        """Raise StartupStopped if a stop signal has come."""
        if self.stop is not None:
            raise StartupStopped(self.stop)

    def _take(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if sig is signal.SIGHUP:
            self.hangup = True
            return
        verdict = self.signals.take(sig)
        if verdict == "echo":
            return
        if verdict == "force":
            log.event("shutdown_forced", logging.WARNING, signal=sig.name, during="start-up")
            for cleanup in self.before_forced_exit:
                with contextlib.suppress(Exception):
                    cleanup()
            logging.shutdown()
            os._exit(1)
        log.event("shutdown_requested", signal=sig.name, during="start-up")
        self.stop = sig


class Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager, ``timeout``, ``kill``): raised where the command stands, as Ctrl-C raises
    KeyboardInterrupt, so that it unwinds as it does for Ctrl-C (a transaction rolled back, a helper process
    stopped, a file being written removed) and says so, where the default action killed it without a word."""


def stop_signal(exc: KeyboardInterrupt) -> signal.Signals:
    """The signal that ``exc`` stands for: SIGTERM for ``Terminated``, else SIGINT."""
    return signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT


_raised: KeyboardInterrupt | None = None


def raise_stop(stop: type[KeyboardInterrupt]) -> NoReturn:
    """Raise ``stop`` (from a signal handler), noting it for ``take_raised_stop``. A handler runs at the next
    instruction of Python in the main thread, which during an SQLite query is a callback SQLite makes (its progress
    handler, a function of ours in the query): SQLite drops what the callback raised and fails the query instead
    ("interrupted"), and the database adapter, seeing it, raises the stop noted here in its place."""
    global _raised
    _raised = stop()
    raise _raised


def take_raised_stop() -> KeyboardInterrupt | None:
    """The stop ``raise_stop`` raised last, if any since the last call; forgotten here."""
    global _raised
    raised, _raised = _raised, None
    return raised


def _raise_terminated(_signum: int, _frame: FrameType | None) -> None:
    raise_stop(Terminated)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside: SIGTERM raises ``Terminated`` in the main thread (a command whose work has no place to stop at
    gracefully: preview, check, stats…); the handler before it comes back after. Elsewhere than the main thread
    (where no handler can be set), nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if launch.early_sigterm():  # one came while Python loaded kembali: the command stops before it begins
            raise_stop(Terminated)
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def stops_held() -> Iterator[None]:
    """Inside: a SIGINT or SIGTERM waits until the block is done, then stops the command as it would have (its
    handler from before, run once the block ends): for a few steps that must all happen or none, such as a
    preview's two files of one message, an import's batch written and counted. A second stop signal inside does
    not wait (the block takes long: a batch waiting for a lock): the handlers from before take the first and then
    it, at once. The echo of the first (``StopSignals``) is no second one. A signal ignored before stays ignored.
    Elsewhere than the main thread (where no handler can be set), nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = StopSignals()
    held: list[signal.Signals] = []
    previous: dict[signal.Signals, Any] = {}

    def let_go() -> list[signal.Signals]:
        """The handlers from before back in place; the signals held, for them to take."""
        for stop, handler in previous.items():
            signal.signal(stop, handler)
        previous.clear()
        taken = held.copy()
        held.clear()
        return taken

    def hold(signum: int, _frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        verdict = signals.take(sig)
        if verdict == "stop":
            held.append(sig)
        elif verdict == "force":
            for stop in [*let_go(), sig]:
                signal.raise_signal(stop)  # to the handler from before: the first stops the command now

    for stop in STOP_SIGNALS:
        if signal.getsignal(stop) is not signal.SIG_IGN:  # (SIGINT, in a shell's background job)
            previous[stop] = signal.signal(stop, hold)
    try:
        yield
    finally:
        for stop in let_go():
            signal.raise_signal(stop)  # to the handler from before: it stops the command now


T = TypeVar("T")


RECANCEL_SECONDS = 0.5
"""How often ``run_terminable`` cancels its work again until it ends, once a stop signal has come."""


def run_terminable(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` (a short command's, ``send-test``'s), where SIGTERM, as Ctrl-C there, cancels ``main``
    and raises (``Terminated``) once the loop is closed. ``Terminated`` raised by ``sigterm_raises``'s handler
    could land inside a task, whose exception asyncio then logged with its traceback ("Task exception was never
    retrieved"). The SIGTERM handler before it comes back after.

    ``main`` runs as a task of its own, cancelled again every ``RECANCEL_SECONDS`` until it ends: Python 3.11's
    ``asyncio.wait_for``, which aiosmtplib awaits each connection and reply with, drops a cancel that comes as the
    awaited thing completes, so one cancel at the moment the server's connection was made left ``send-test``
    waiting for the greeting until its timeout, to exit 3, "could not be used", and a Ctrl-C as a reply came would
    have let it send."""
    stopped = False

    async def cancelled_by_sigterm() -> T | None:
        nonlocal stopped
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        work = asyncio.ensure_future(main)

        def stop() -> None:
            nonlocal stopped
            if not stopped:
                stopped = True
                task.cancel()

        previous = signal.getsignal(signal.SIGTERM)
        try:
            loop.add_signal_handler(signal.SIGTERM, stop)
        except (ValueError, RuntimeError):  # not the main thread: SIGTERM is left as it is
            return await work
        try:
            await asyncio.wait({work})  # (cancelled, by SIGTERM or asyncio.run's Ctrl-C, it leaves the work running)
            return work.result()
        except asyncio.CancelledError:
            while not work.done():  # cancelled again until it ends: a cancel it dropped (above) is no stop
                work.cancel()
                # (the other stop signal meanwhile, SIGTERM after Ctrl-C or the reverse, is the same stop: let out
                # of this loop, it left the work running and asyncio.run raising CancelledError)
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({work}, timeout=RECANCEL_SECONDS)
            if not work.cancelled():
                work.exception()  # (retrieved: what it ended with is the stop's to tell now, not a log's)
            if not stopped:
                raise  # Ctrl-C: asyncio.run raises KeyboardInterrupt
            return None
        finally:
            loop.remove_signal_handler(signal.SIGTERM)  # (it leaves SIG_DFL)
            signal.signal(signal.SIGTERM, previous)

    result = asyncio.run(cancelled_by_sigterm())
    if stopped:
        raise Terminated
    return cast(T, result)  # None only when stopped
