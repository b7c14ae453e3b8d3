"""Servers that misbehave in ways the recording server's behaviours do not cover: replies with bytes that are
not UTF-8, a NUL, no line end; the real Dispatcher and a real ledger (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from tests.sendkit import Shop, make_settings, message_ids
from tests.smtp_server import RecordingServer, _FaultySMTP

BAD, OK = "bad@test.example", "ok@test.example"


class _RawSMTP(_FaultySMTP):
    """Answers RCPT TO or the final dot for ``BAD`` with the owner's raw bytes, as they are."""

    _owner: OddServer

    async def smtp_RCPT(self, arg: str) -> None:  # aiosmtpd's command hook names
        raw = self._owner.raw_rcpt
        if raw is None or BAD not in arg:
            await super().smtp_RCPT(arg)
            return
        self._writer.write(raw)
        await self._writer.drain()

    async def smtp_DATA(self, arg: str) -> None:
        raw = self._owner.raw_dot
        if raw is None or self.envelope is None or BAD not in self.envelope.rcpt_tos:
            await super().smtp_DATA(arg)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        while await self._reader.readuntil(b"\r\n") != b".\r\n":
            pass
        self._writer.write(raw)
        await self._writer.drain()
        self.envelope = self._create_envelope()


class OddServer(RecordingServer):
    """A recording server that can answer ``BAD``'s RCPT TO (``raw_rcpt``) or final dot (``raw_dot``) with
    raw bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.raw_rcpt: bytes | None = None
        self.raw_dot: bytes | None = None

    def _smtp(self, handler: Any, **kwargs: Any) -> SMTP:
        return _RawSMTP(self, handler, tls_context=self._tls_context, **kwargs)


@pytest.fixture(autouse=True)
def link_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")


@pytest.fixture
def server() -> Iterator[OddServer]:
    server = OddServer()
    server.start_in_thread()
    try:
        yield server
    finally:
        server.stop_in_thread()


@pytest.mark.parametrize(
    ("stage", "raw", "status", "code", "words"),
    [
        ("rcpt", b"550 5.1.1 Benutzer \xfcnbekannt\r\n", "failed", 550, "Benutzer \ufffdnbekannt"),
        ("dot", b"554 5.7.1 Inhalt abgelehnt \xff\xfe\r\n", "failed", 554, "Inhalt abgelehnt \ufffd\ufffd"),
        ("dot", b"250 2.0.0 queued as \xe9\x00X1\r\n", "sent", 250, "queued as \ufffd\ufffdX1"),
        ("rcpt", b"452-4.2.2 \xc0ber\r\n452 4.2.2 \x00voll\r\n", "retry", 452, "\ufffdber\n4.2.2 \ufffdvoll"),
    ],
    ids=["550 latin-1 at RCPT", "554 bad bytes after the dot", "250 with a NUL after the dot", "452 multi-line"],
)
def test_a_reply_that_is_not_utf8_or_holds_a_nul_is_recorded_and_the_run_goes_on(
    db_url: str, server: OddServer, stage: str, raw: bytes, status: str, code: int, words: str
) -> None:
    setattr(server, f"raw_{stage}", raw)
    shop = Shop(db_url, make_settings(db_url, server.port, smtp={"timeout_seconds": 1.0}), [BAD, OK])
    try:
        report = shop.cycle()

        bad = shop.row(BAD)
        (attempt,) = shop.attempts(BAD)
        assert (bad.status, bad.last_code, attempt.code) == (status, code, code)
        assert words in attempt.reply
        assert shop.row(OK).status == "sent"
        assert report.dispatched.outcomes["sent"] == 1 + (status == "sent")
        assert all(n == 1 for n in message_ids(server.messages).values())
    finally:
        shop.close()
