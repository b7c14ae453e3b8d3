"""The daemon's small HTTP server: what malformed, oversized and slow requests get."""

from __future__ import annotations

import asyncio

import pytest

from worker.adapters.web import HttpServer, Request, Response


async def _echo(request: Request) -> Response:
    text = f"{request.method} {request.path} {sorted(request.query.items())} {request.body!r}"
    return Response(200, text.encode(), "text/plain")


async def _exchange(raw: bytes, eof: bool, timeout_seconds: float) -> bytes:
    server = HttpServer(_echo, host="127.0.0.1", port=0, timeout_seconds=timeout_seconds)
    port = await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        if eof:
            writer.write_eof()
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await writer.wait_closed()
        return reply
    finally:
        await server.close()


def exchange(raw: bytes, *, eof: bool = True, timeout_seconds: float = 5.0) -> bytes:
    return asyncio.run(_exchange(raw, eof, timeout_seconds))


def test_a_plain_get_and_a_post_with_a_body() -> None:
    reply = exchange(b"GET /unsubscribe?t=abc.def&x= HTTP/1.1\r\nHost: a\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close\r\n" in reply and b"Cache-Control: no-store\r\n" in reply
    assert reply.endswith(b"GET /unsubscribe [('t', ['abc.def']), ('x', [''])] b''")
    reply = exchange(b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 26\r\n\r\nList-Unsubscribe=One-Click")
    assert reply.endswith(b"b'List-Unsubscribe=One-Click'")


def test_head_gets_headers_only() -> None:
    reply = exchange(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"\r\n\r\n")


def test_expect_100_continue() -> None:
    reply = exchange(b"POST /u HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok", eof=False)
    assert reply.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /\r\n\r\n", b"400"),
        (b"GET / HTTP/2.0\r\n\r\n", b"505"),
        (b"GET http://evil/ HTTP/1.1\r\n\r\n", b"400"),
        (b"G@T / HTTP/1.1\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\n folded: header\r\n\r\n", b"400"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"411"),
        (b"POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n", b"400"),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", b"400"),
        (b"POST / HTTP/1.1\r\nContent-Length: 9999999\r\n\r\n", b"413"),
        (b"POST / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", b"400"),
        # more digits than int() converts (4300): the connection was dropped, a raw traceback in the JSON log
        (b"POST / HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", b"413"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", b"431"),
        (b"GET / HTTP/1.1\r\n" + b"X: a\r\n" * 101 + b"\r\n", b"431"),
        # RFC 9112 3.2: a target longer than the server parses is a 414, not a header field too large (431)
        (b"GET /unsubscribe?t=" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n", b"414"),
        (b"GET / HTTP/1.1\r\nHost: a", b"400"),
    ],
    ids=["no version", "HTTP/2", "absolute form", "bad method", "no colon", "obs-fold", "chunked",
         "two lengths", "negative length", "huge body", "superscript length", "5000-digit length", "huge header",
         "too many headers", "huge target", "cut short"],
)
def test_malformed_or_oversized_requests_are_refused(raw: bytes, status: bytes) -> None:
    assert exchange(raw).split(b" ")[1] == status


def test_a_target_that_looks_like_a_network_path_is_just_a_path() -> None:
    # urlsplit read "//[" as an IPv6 host and raised: the connection was dropped with a traceback in the log
    reply = exchange(b"GET //[?t=x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"GET //[ [('t', ['x'])] b''")


def test_bytes_after_a_request_are_no_second_request() -> None:
    # request smuggling: what follows the body Content-Length gives (a second request, pipelined or hidden in a
    # body a proxy read otherwise) is never served; one answer, and the connection closed
    second = b"POST /unsubscribe?t=x HTTP/1.1\r\nContent-Length: 26\r\n\r\nList-Unsubscribe=One-Click"
    reply = exchange(b"POST /feedback HTTP/1.1\r\nContent-Length: 2\r\n\r\nok" + second)
    assert reply.count(b"HTTP/1.1 ") == 1 and reply.endswith(b"POST /feedback [] b'ok'"), reply

def test_a_form_with_too_many_fields_is_an_empty_form_not_a_500() -> None:
    async def form(request: Request) -> Response:
        return Response(200, repr(sorted(request.form())).encode(), "text/plain")

    async def run(body: bytes) -> bytes:
        server = HttpServer(form, host="127.0.0.1", port=0)
        port = await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /feedback?t=x HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        reply = await reader.read()
        writer.close()
        await writer.wait_closed()
        await server.close()
        return reply

    assert asyncio.run(run(b"comment=enak&t=x")).endswith(b"\r\n\r\n['comment', 't']")
    many = b"&".join(b"f%d=1" % i for i in range(60)) + b"&List-Unsubscribe=One-Click"
    assert asyncio.run(run(many)).startswith(b"HTTP/1.1 200 OK\r\n")


def test_a_client_that_sends_too_slowly_gets_408() -> None:
    reply = exchange(b"GET / HTTP/1.1\r\nHost: a\r\n", eof=False, timeout_seconds=0.2)
    assert reply.startswith(b"HTTP/1.1 408")


def test_a_failing_handler_is_a_500_not_a_crash() -> None:
    async def boom(request: Request) -> Response:
        raise RuntimeError("no")

    async def run() -> bytes:
        server = HttpServer(boom, host="127.0.0.1", port=0)
        port = await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        reply = await reader.read()
        writer.close()
        await writer.wait_closed()
        await server.close()
        return reply

    assert asyncio.run(run()).startswith(b"HTTP/1.1 500")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_client_that_resets_the_connection_before_the_answer_leaves_no_traceback(loop: str) -> None:
    """A browser that navigates away, a scanner that gives up: the connection is reset while the page is being
    made. On uvloop (the daemon's loop with the ``fast`` extra) writing the answer raised RuntimeError out of the
    connection's task: a raw multi-line traceback in the JSON log for every such client."""
    import socket
    import struct

    answering = asyncio.Event()
    reset = asyncio.Event()

    async def slow(request: Request) -> Response:
        answering.set()
        await reset.wait()
        await asyncio.sleep(0.05)  # the reset reaches the server
        return Response(200, b"late", "text/plain")

    async def run() -> list[str]:
        unhandled: list[str] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: unhandled.append(context["message"]))
        server = HttpServer(slow, host="127.0.0.1", port=0)
        port = await server.start()
        try:
            for method in ("GET", "HEAD"):
                answering.clear()
                reset.clear()
                client = socket.create_connection(("127.0.0.1", port))
                client.sendall(f"{method} /healthz HTTP/1.1\r\nHost: a\r\n\r\n".encode())
                await asyncio.wait_for(answering.wait(), 5)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close → RST
                client.close()
                reset.set()
                await asyncio.sleep(0.2)
        finally:
            await server.close()
        return unhandled

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            assert runner.run(run()) == []
    else:
        assert asyncio.run(run()) == []


def test_connections_that_send_nothing_make_room_for_a_request_when_the_server_is_full() -> None:
    """Slowloris, or browsers' speculative preconnects: ``max_connections`` sockets that never finish a request
    held every slot until their timeout, and each link click and health probe meanwhile got a 503."""
    release = asyncio.Event()

    async def slow_or_fast(request: Request) -> Response:
        if request.path == "/slow":
            await release.wait()
        return Response(200, request.path.encode(), "text/plain")

    async def get(port: int, path: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        reply = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await writer.wait_closed()
        return reply

    async def run() -> None:
        server = HttpServer(slow_or_fast, host="127.0.0.1", port=0, timeout_seconds=30, max_connections=3,
                            idle_seconds=0.1)
        port = await server.start()
        try:
            # Given three connections that opened and sent nothing, or half a request, for idle_seconds and more
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            idle[1][1].write(b"GET /hea")
            await asyncio.sleep(0.2)
            # When a request comes, it is answered at once: the server cut off the longest-waiting idle socket
            reply = await get(port, "/healthz")
            assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(b"/healthz"), reply
            assert await asyncio.wait_for(idle[0][0].read(), 5) == b""
            # And so are three slow ones, cutting off the other two
            slow = [asyncio.create_task(get(port, "/slow")) for _ in range(3)]
            await asyncio.sleep(0.2)
            assert [await asyncio.wait_for(r.read(), 5) for r, _ in idle[1:]] == [b"", b""]
            # But requests being answered are never cut off: with every slot busy in the handler, it is a 503
            assert (await get(port, "/healthz")).startswith(b"HTTP/1.1 503")
            release.set()
            assert all(r.startswith(b"HTTP/1.1 200 OK") for r in await asyncio.gather(*slow))
            for _, writer in idle:
                writer.close()
        finally:
            await server.close()

    asyncio.run(run())


def test_a_burst_of_requests_past_the_limit_gets_answers_not_resets() -> None:
    """Requests that come at once, more than ``max_connections`` (mailbox providers' one-click POSTs after a big
    send, a scanner fetching every link): each new connection cut off one before it whose request was on its way,
    read in a moment, as if it were an idle socket; most clients got a reset, none a 503 to try again after."""

    async def fast(request: Request) -> Response:
        return Response(200, b"ok", "text/plain")

    async def one(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /unsubscribe?t=x HTTP/1.1\r\nContent-Length: 26\r\n\r\nList-Unsubscribe=One-Click")
            return await asyncio.wait_for(reader.read(), 5)
        except ConnectionError as exc:
            return repr(exc).encode()
        finally:
            writer.close()

    async def run() -> list[bytes]:
        server = HttpServer(fast, host="127.0.0.1", port=0, max_connections=5)
        port = await server.start()
        try:
            return list(await asyncio.gather(*(one(port) for _ in range(40))))
        finally:
            await server.close()

    replies = asyncio.run(run())
    assert {r.split(b"\r\n")[0] for r in replies} <= {b"HTTP/1.1 200 OK", b"HTTP/1.1 503 Service Unavailable"}, replies
    assert any(r.startswith(b"HTTP/1.1 200 OK") for r in replies)


def test_closing_the_server_with_connections_open_leaves_no_traceback() -> None:
    """A stop signal while a browser's idle connection, a half-sent request or a slow page is open: ``close``
    cancels what is left after a moment, and each cancelled connection put a raw traceback ("Exception in
    callback StreamReaderProtocol.connection_made...") in the daemon's JSON log at every stop."""

    async def stuck(request: Request) -> Response:
        await asyncio.sleep(60)
        return Response(200, b"late", "text/plain")

    async def run() -> tuple[list[str], list[bytes]]:
        unhandled: list[str] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: unhandled.append(context["message"]))
        server = HttpServer(stuck, host="127.0.0.1", port=0, timeout_seconds=30)
        port = await server.start()
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        clients[1][1].write(b"GET /hea")
        clients[2][1].write(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.sleep(0.2)
        await server.close()
        await asyncio.sleep(0.1)
        replies = [await asyncio.wait_for(reader.read(), 5) for reader, _ in clients]
        for _, writer in clients:
            writer.close()
        return unhandled, replies

    unhandled, replies = asyncio.run(run())
    assert unhandled == []
    assert replies == [b"", b"", b""]  # each connection closed


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"HEAD / HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", b"431"),
        (b"HEAD / HTTP/1.1\r\nContent-Length: 9999999\r\n\r\n", b"413"),
        (b"HEAD / HTTP/1.1\r\nHost: a\r\nbad header\r\n\r\n", b"400"),
    ],
    ids=["huge header", "huge body", "malformed header"],
)
def test_a_head_refused_gets_the_status_and_headers_and_no_body(raw: bytes, status: bytes) -> None:
    """RFC 9110 9.3.2: the answer to a HEAD has no content. A refused HEAD (a link scanner's, a monitor's) got
    the refusal's text after the headers: bytes a client reads as the start of its next answer."""
    reply = exchange(raw)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == status and b"\r\nContent-Length: " in head
    assert body == b""


def test_a_head_that_times_out_gets_408_with_no_body() -> None:
    reply = exchange(b"HEAD / HTTP/1.1\r\nHost: a\r\n", eof=False, timeout_seconds=0.2)
    assert reply.startswith(b"HTTP/1.1 408") and reply.endswith(b"\r\n\r\n"), reply


def test_an_http_1_0_client_that_sends_expect_gets_no_100_continue() -> None:
    """RFC 9110 10.1.1: a server MUST ignore a 100-continue expectation in an HTTP/1.0 request. An HTTP/1.0 client
    knows no interim answers: the ``100 Continue`` was, to it, the whole answer (a status of 100, no page)."""
    reply = exchange(b"POST /u HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok", eof=False)
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and b"100 Continue" not in reply, reply
