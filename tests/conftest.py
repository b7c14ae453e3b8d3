"""Shared fixtures."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest

from tests.smtp_server import RecordingServer
from worker import log

# The hundreds of `kembali` processes the tests start each compiled Kembali's modules from source again where the
# environment says not to write bytecode (PYTHONDONTWRITEBYTECODE=1 on this machine: ~0.4 s a process, 1.3 s
# against 0.9 s to import the daemon's modules): the first one writes it, and the others read it.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


@pytest.fixture
def smtp_server() -> Iterator[RecordingServer]:
    """A recording SMTP server on 127.0.0.1, port 0, running in a background thread."""
    server = RecordingServer()
    server.start_in_thread()
    try:
        yield server
    finally:
        server.stop_in_thread()


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A command run in the test's process (``cli.main``) configures Kembali's logger as a command does: its own
    handler, no propagation to the root, where pytest's caplog listens. Put back after each test, so that a later
    test's caplog still hears Kembali's events (test_sendtime_recheck after test_preview_agrees heard none)."""
    logger, root = log.LOGGER, logging.getLogger()
    saved = (logger.handlers[:], logger.level, logger.propagate, root.handlers[:], log._libraries, log._chosen_level)
    yield
    logger.handlers[:], logger.level, logger.propagate, root.handlers[:] = saved[:4]
    log._libraries, log._chosen_level = saved[4:]
