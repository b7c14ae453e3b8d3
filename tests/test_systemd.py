"""The sd_notify adapter against a real AF_UNIX datagram socket standing for systemd's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.daemon_harness import REPO

NOTIFYING = """
import sys
from worker import log
from worker.adapters import systemd
log.configure("debug", "json")
print(systemd.notify("WATCHDOG=1"), systemd.notify("STATUS=sent 3"), flush=True)
"""


def test_a_notify_socket_nobody_reads_drops_the_notification_and_says_so_rather_than_blocking(
    tmp_path: Path,
) -> None:
    # Given systemd's notify socket, its queue full (a manager that stalls: it does not read)
    path = str(tmp_path / "n.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd_end, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:  # fmt: skip
        systemd_end.bind(path)
        filler.connect(path)
        filler.setblocking(False)
        queued = 0
        try:
            while True:
                filler.send(b"STATUS=filling")
                queued += 1
        except BlockingIOError:
            pass
        assert queued > 0
        # When the daemon notifies it (a watchdog ping, a status line)
        proc = subprocess.run([sys.executable, "-c", NOTIFYING], cwd=REPO, env={**os.environ, "NOTIFY_SOCKET": path},
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        # Then each call returns (False: not delivered) instead of waiting for room, the first drop is a warning
        # naming what was dropped, and the next is counted at debug
        assert proc.returncode == 0 and proc.stdout.split() == ["False", "False"], proc.stderr
        events = [json.loads(line) for line in proc.stderr.splitlines()]
        dropped = [e for e in events if e["event"] == "systemd_notify_dropped"]
        assert [(e["level"], e["what"], e["dropped"]) for e in dropped] == [("warning", "WATCHDOG", 1),
                                                                             ("debug", "STATUS", 2)], events
        # And nothing of it reached the socket: what is queued is the filler's
        systemd_end.setblocking(False)
        assert {systemd_end.recv(64) for _ in range(queued)} == {b"STATUS=filling"}
