"""The local SMTP sink: records, saves .eml files, runs from async or sync code."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

import pytest

from tests.smtp_server import make_message
from worker.adapters.sink import SmtpSink
from worker.adapters.smtp import SmtpTransport
from worker.config import SmtpSettings
from worker.domain import Outcome


def settings(port: int) -> SmtpSettings:
    return SmtpSettings(host="127.0.0.1", port=port, tls="none", timeout_seconds=5.0, pool_size=1)


def test_each_message_is_saved_as_a_numbered_eml_named_after_its_message_id(tmp_path: Path) -> None:
    folder = tmp_path / "outbox"
    messages = [
        make_message(1, message_id="<abc.123@shop.example>"),
        make_message(2, message_id="<../../etc/passwd?x=1 @evil>"),
        make_message(3).replace(b"Message-ID: <msg-3@test.example>\r\n", b""),
    ]

    async def main() -> SmtpSink:
        async with SmtpSink(folder=folder) as sink, SmtpTransport(settings(sink.port)) as transport:
            assert sink.port > 0
            for m in messages:
                assert (await transport.send("shop@test.example", "a@test.example", m)).outcome is Outcome.SENT
        return sink

    sink = asyncio.run(main())

    names = sorted(p.name for p in folder.iterdir())
    assert names == ["0001-abc.123@shop.example.eml", "0002-etc_passwd_x_1_@evil.eml", "0003-no-message-id.eml"]
    assert [(folder / n).read_bytes() for n in names] == messages
    assert [m.path for m in sink.messages] == [folder / n for n in names]
    assert sink.messages[0].mail_from == "shop@test.example"
    assert sink.messages[0].rcpt_tos == ("a@test.example",)


def test_reply_for_refuses_per_recipient_and_stage() -> None:
    replies = {("rcpt", "no@test.example"): "550 5.1.1 No such user", ("data", "late@test.example"): "451 4.3.0 Later"}

    async def main() -> list[tuple[Outcome, int | None]]:
        sink = SmtpSink(reply_for=lambda stage, rcpt: replies.get((stage, rcpt)))
        async with sink, SmtpTransport(settings(sink.port)) as transport:
            results = [
                await transport.send("shop@test.example", rcpt, make_message(i))
                for i, rcpt in enumerate(["no@test.example", "late@test.example", "yes@test.example"])
            ]
        assert [m.rcpt_tos for m in sink.messages] == [("yes@test.example",)]
        return [(r.outcome, r.code) for r in results]

    assert asyncio.run(main()) == [(Outcome.PERMANENT, 550), (Outcome.TRANSIENT, 451), (Outcome.SENT, 250)]


def test_the_sink_runs_in_a_thread_for_sync_callers(tmp_path: Path) -> None:
    sink = SmtpSink(folder=tmp_path)
    port = sink.start_in_thread()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
            client.sendmail("shop@test.example", ["a@test.example"], make_message(1))
    finally:
        sink.stop_in_thread()

    assert port == sink.port
    assert len(sink.messages) == 1
    assert sink.connections == 1
    assert [p.name for p in tmp_path.iterdir()] == ["0001-msg-1@test.example.eml"]


def test_stop_closes_connections_still_open() -> None:
    async def main() -> None:
        sink = SmtpSink()
        await sink.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", sink.port)
        assert (await reader.readline()).startswith(b"220 ")
        await sink.stop()
        assert await reader.read() == b""  # the server hung up
        writer.close()
        await writer.wait_closed()

    asyncio.run(main())


def test_starting_twice_is_an_error() -> None:
    async def main() -> None:
        async with SmtpSink() as sink:
            with pytest.raises(RuntimeError, match="already running"):
                await sink.start()

    asyncio.run(main())
