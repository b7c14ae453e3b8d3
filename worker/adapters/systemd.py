"""sd_notify without a dependency: one datagram to ``$NOTIFY_SOCKET``.

``notify("READY=1")`` tells systemd (``Type=notify``) the daemon is up;
``STOPPING=1``, ``RELOADING=1``, ``STATUS=…`` and ``WATCHDOG=1`` likewise. Without
``NOTIFY_SOCKET`` (not under systemd) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from worker import log

_dropped = 0
"""Notifications dropped, the socket's queue being full (systemd not reading), since the daemon started."""
_warned = False
"""Whether a drop since the last notification delivered was logged as a warning (the next ones are at debug)."""


def notify(*states: str) -> bool:
    """Send ``states`` (``KEY=value`` lines); True if a socket was there to take them. Never waits: it is called
    on the event loop, and a manager that stopped reading would freeze the daemon (SIGTERM included) in a blocking
    send; a notification the socket has no room for is dropped, logged (``systemd_notify_dropped``)."""
    global _dropped, _warned
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or not states:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            sock.connect(address)
            sock.send("\n".join(states).encode())  # a datagram: all of it or nothing
    except BlockingIOError:
        _dropped += 1
        level = logging.DEBUG if _warned else logging.WARNING
        _warned = True
        log.event("systemd_notify_dropped", level, what=",".join(s.partition("=")[0] for s in states),
                  dropped=_dropped)
        return False
    except OSError:
        return False
    _warned = False
    return True


def reloading() -> bool:
    """``RELOADING=1`` with the monotonic timestamp ``Type=notify-reload`` expects."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def watchdog_seconds() -> float | None:
    """How often to send ``WATCHDOG=1`` (half the unit's WatchdogSec), or None when not asked."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
