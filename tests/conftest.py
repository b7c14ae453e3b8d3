"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.smtp_server import RecordingServer


@pytest.fixture
def smtp_server() -> Iterator[RecordingServer]:
    """A recording SMTP server on 127.0.0.1, port 0, running in a background thread."""
    server = RecordingServer()
    server.start_in_thread()
    try:
        yield server
    finally:
        server.stop_in_thread()
