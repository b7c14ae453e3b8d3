"""A local SMTP sink on aiosmtpd, for the demo and the tests.

It accepts mail on a loopback port (port 0: the kernel picks one; ``.port`` is
the real one), records every accepted message in ``.messages`` and, when given
a folder, saves each one as ``NNNN-<message-id>.eml``. ``reply_for(stage,
recipient)`` may refuse a recipient at ``"rcpt"`` or a message at ``"data"``
(after the final dot) with any SMTP reply; None accepts. ``implicit_tls``: a
server-side SSL context makes every connection start with a TLS handshake (as
on port 465).

Use it from async code (``async with SmtpSink() as sink``) or from sync code,
where it runs its own event loop in a daemon thread (``start_in_thread()`` /
``stop_in_thread()``). ``messages`` is appended to from the sink's loop; read
it after the sender has finished.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope

ReplyFor = Callable[[str, str], "str | None"]
"""``(stage, recipient) -> reply``: stage is ``"rcpt"`` or ``"data"``; None accepts."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._@+-]+")


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One message the sink accepted."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    path: Path | None = None
    """Where it was saved, when the sink has a folder."""


class SinkHandler:
    """aiosmtpd handler: asks ``sink.reply_for`` and records accepted mail."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    def _reply(self, stage: str, recipient: str) -> str | None:
        reply_for = self.sink.reply_for
        return None if reply_for is None else reply_for(stage, recipient)

    async def handle_RCPT(  # aiosmtpd's hook names
        self, server: SMTP, session: Any, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        reply = self._reply("rcpt", address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Envelope) -> str:
        for recipient in envelope.rcpt_tos:
            reply = self._reply("data", recipient)
            if reply is not None:
                return reply
        received = self.sink.record(envelope)
        return f"250 2.0.0 Ok: queued as {len(self.sink.messages):04d}" + (
            f" {received.path.name}" if received.path else ""
        )


class SmtpSink:
    """An SMTP server that keeps what it receives (see the module docstring)."""

    def __init__(
        self,
        *,
        folder: Path | None = None,
        reply_for: ReplyFor | None = None,
        hostname: str = "kembali-sink",
        handler_factory: Callable[[SmtpSink], SinkHandler] = SinkHandler,
        smtp_class: Callable[..., SMTP] = SMTP,
        implicit_tls: ssl.SSLContext | None = None,
    ) -> None:
        self.folder = folder
        self.reply_for = reply_for
        self.hostname = hostname
        self.messages: list[ReceivedMessage] = []
        self.connections = 0
        """Connections accepted since start."""
        self.port = 0
        self.host = "127.0.0.1"
        self._handler = handler_factory(self)
        self._smtp_class = smtp_class
        self._implicit_tls = implicit_tls
        self._server: asyncio.Server | None = None
        self._live: set[SMTP] = set()
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    # --- recording -----------------------------------------------------------

    def record(self, envelope: Envelope) -> ReceivedMessage:
        """Keep an accepted message (and save it when there is a folder)."""
        data = bytes(envelope.original_content or b"")
        path = None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{len(self.messages) + 1:04d}-{_message_id_slug(data)}.eml"
            path.write_bytes(data)
        received = ReceivedMessage(
            mail_from=str(envelope.mail_from), rcpt_tos=tuple(envelope.rcpt_tos), data=data, path=path
        )
        self.messages.append(received)
        return received

    # --- async life cycle ----------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on ``host:port`` (0: any free port; then read ``.port``)."""
        if self._server is not None:
            raise RuntimeError("the sink is already running")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_connection, host, port, ssl=self._implicit_tls)
        self.host = host
        self.port = self._server.sockets[0].getsockname()[1]

    def _new_connection(self) -> SMTP:
        self.connections += 1
        protocol = self._smtp_class(self._handler, hostname=self.hostname, loop=asyncio.get_running_loop())
        self._live.add(protocol)
        return protocol

    def close_connections(self) -> None:
        """Drop every open client connection (the server keeps listening)."""
        for protocol in list(self._live):
            transport = getattr(protocol, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.close()
        self._live = {p for p in self._live if getattr(p, "transport", None) is not None}

    async def stop(self) -> None:
        """Stop listening and close every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self.close_connections()
        await server.wait_closed()
        # let connection_lost() run for the transports closed above
        for _ in range(3):
            await asyncio.sleep(0)
        self._live.clear()

    async def __aenter__(self) -> SmtpSink:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # --- from sync code ------------------------------------------------------

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0, *, timeout_seconds: float = 10.0) -> int:
        """Run the sink on its own event loop in a daemon thread; return the port."""
        if self._thread is not None:
            raise RuntimeError("the sink is already running in a thread")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="kembali-smtp-sink", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(host, port), loop).result(timeout_seconds)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout_seconds)
            loop.close()
            raise
        self._thread, self._thread_loop = thread, loop
        return self.port

    def stop_in_thread(self, *, timeout_seconds: float = 10.0) -> None:
        """Stop a sink started with ``start_in_thread`` and end its thread."""
        thread, loop = self._thread, self._thread_loop
        if thread is None or loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._stop_and_settle(), loop).result(timeout_seconds)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout_seconds)
            loop.close()
            self._thread = self._thread_loop = None

    async def _stop_and_settle(self) -> None:
        await self.stop()
        current = asyncio.current_task()
        leftovers = [t for t in asyncio.all_tasks() if t is not current]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)


def _message_id_slug(data: bytes) -> str:
    """The Message-ID header made safe for a file name (or ``no-message-id``)."""
    value = BytesHeaderParser().parsebytes(data).get("Message-ID")
    slug = _UNSAFE.sub("_", str(value or "").strip().strip("<>")).strip("._")[:100]
    return slug or "no-message-id"
