"""The short-lived commands (preview, check, stats…) stopped part-way by Ctrl-C (SIGINT) or SIGTERM."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest


def test_a_file_of_preview_out_stopped_while_it_is_written_is_removed(tmp_path: Path) -> None:
    # Given a message's file being written into a reader that takes one byte and then the signal comes: the file's
    # temporary name is a FIFO here, so that the write waits there, mid-file, for the test
    from worker.commands.previewing import write_whole

    path = tmp_path / "0001-winback_C-1.eml"
    partial = tmp_path / f".{path.name}.partial"
    os.mkfifo(partial)
    main, done = threading.main_thread().ident, threading.Event()
    assert main is not None

    def reader() -> None:
        with open(partial, "rb") as f:
            assert f.read(1) == b"x"  # the write began; it cannot have ended: a pipe holds less than a megabyte
            signal.pthread_kill(main, signal.SIGINT)
            done.wait(60)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        # When Ctrl-C stops the write
        with pytest.raises(KeyboardInterrupt):
            write_whole(path, b"x" * 2**20)
    finally:
        done.set()
        thread.join()
    # Then nothing of it is left: neither the message's name nor the temporary one
    assert sorted(tmp_path.iterdir()) == []
