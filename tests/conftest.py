"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.smtp_server import RecordingServer

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
