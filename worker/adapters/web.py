"""A small, careful HTTP/1.1 server on asyncio streams for the daemon's few endpoints.

One request per connection (``Connection: close``), no chunked bodies, no
pipelining: enough for link clicks, RFC 8058 one-click POSTs from mailbox
providers, health checks and Prometheus scrapes. Limits: the request line and
headers together at most ``max_header_bytes``, a body at most ``max_body_bytes``
(``Content-Length`` only), the whole request read within ``timeout_seconds``,
at most ``max_connections`` at once: when all are taken, a new connection
cuts off the one that has waited longest without sending its whole request,
at least ``IDLE_SECONDS`` (a socket left idle, not a request on its way), or
gets a 503 when there is none. The handler never sees a
malformed request; it gets a ``Request`` and returns a ``Response``.

Routing and pages live above (``worker.links``); this module knows only HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import parse_qs, unquote

from worker import log

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
MAX_HEADERS = 100
MAX_LENGTH_DIGITS = 18
IDLE_SECONDS = 1.0
"""How long a connection must have waited without sending its whole request before a new one may cut it off
(``HttpServer._cut_longest_waiting``): a client's request comes within a round trip of its connection; in a burst,
one whose request was on its way, or read in a moment, was cut off (a reset) for each connection after it."""
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_DIGITS = re.compile(r"[0-9]+")
SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"),
)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    """Percent-decoded path, without the query."""
    query: dict[str, list[str]]
    headers: dict[str, str]
    """Lower-case names; repeated headers joined with ', '."""
    body: bytes = b""

    def arg(self, name: str) -> str | None:
        """The first value of a query parameter."""
        values = self.query.get(name)
        return values[0] if values else None

    def form(self) -> dict[str, list[str]]:
        """An ``application/x-www-form-urlencoded`` body (empty for anything else, and for more than 50 fields)."""
        if not self.headers.get("content-type", "").lower().startswith("application/x-www-form-urlencoded"):
            return {}
        try:
            return parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=50)
        except ValueError:  # too many fields: no form of ours has them
            return {}


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default=())


Handler = Callable[[Request], Awaitable[Response]]


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, why: str) -> None:
        super().__init__(why)
        self.status = status


class HttpServer:
    def __init__(
        self,
        handler: Handler,
        *,
        host: str,
        port: int,
        timeout_seconds: float = 10.0,
        max_connections: int = 100,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_body_bytes: int = MAX_BODY_BYTES,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.timeout_seconds = timeout_seconds
        self.max_connections = max_connections
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.idle_seconds = idle_seconds
        self._server: asyncio.Server | None = None
        self._active = 0
        self._connections: set[asyncio.Task[object]] = set()
        self._reading: dict[asyncio.StreamWriter, float] = {}
        """Connections still sending their request, the longest-waiting first, with when each came (the loop's
        clock)."""

    async def start(self) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=self.max_header_bytes)
        port: int = self._server.sockets[0].getsockname()[1]
        self.port = port
        return port

    async def close(self) -> None:
        """Stop listening; requests under way get a moment to finish, then are cut off."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._connections:
            _, pending = await asyncio.wait(set(self._connections), timeout=2)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)
        self._active += 1
        try:
            if self._active > self.max_connections and not self._cut_longest_waiting():
                await self._write(writer, "GET", _plain(HTTPStatus.SERVICE_UNAVAILABLE, "busy, try again"))
                return
            self._reading[writer] = asyncio.get_running_loop().time()
            seen = _Seen()
            try:
                request = await asyncio.wait_for(self._read(reader, writer, seen), self.timeout_seconds)
            except HttpError as exc:
                await self._write(writer, seen.method, _plain(exc.status, str(exc)))
                return
            except TimeoutError:
                await self._write(writer, seen.method, _plain(HTTPStatus.REQUEST_TIMEOUT, "request timed out"))
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            finally:
                self._reading.pop(writer, None)
            try:
                response = await self.handler(request)
            except Exception as exc:
                log.event("web_handler_failed", logging.ERROR, path=request.path, error=log.error_line(exc))
                response = _plain(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
            log.event("web_request", logging.DEBUG, method=request.method, path=request.path, status=response.status)
            await self._write(writer, request.method, response)
        except (ConnectionError, TimeoutError):
            pass
        except asyncio.CancelledError:  # ``close`` cut it off: Python 3.11's streams log a cancelled one's traceback
            pass
        finally:
            self._active -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)

    def _cut_longest_waiting(self) -> bool:
        """Make room for a new connection by cutting off the one that has waited longest without finishing its
        request, ``idle_seconds`` at least (a slowloris, a browser's unused preconnect); False when there is none,
        every connection being answered or its request on its way. A real client sends its whole request at once:
        idle sockets, not requests, are what fills the slots."""
        writer = next(iter(self._reading), None)
        if writer is None or asyncio.get_running_loop().time() - self._reading[writer] < self.idle_seconds:
            return False
        del self._reading[writer]
        writer.transport.abort()
        return True

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: _Seen) -> Request:
        """The request; ``seen.method`` is its method as soon as its request line is in (a refusal of a HEAD, even
        one whose headers are too large or come too slowly, has no body)."""
        method, target, version = _request_line(await self._line(reader, seen, first=True))
        seen.method = method
        lines: list[bytes] = []
        while line := await self._line(reader, seen, first=False):
            if len(lines) == MAX_HEADERS:
                raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
            lines.append(line)
        headers = _headers(lines)
        if "transfer-encoding" in headers:
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length, not Transfer-Encoding")
        length = _content_length(headers)
        if length > self.max_body_bytes:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
        body = b""
        if length:
            if headers.get("expect", "").lower() == "100-continue" and version == "HTTP/1.1":
                if writer.is_closing():
                    raise ConnectionResetError("the client went away")
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await writer.drain()
            body = await reader.readexactly(length)
        # origin-form only (``_TARGET``): split it here; urlsplit would read ``//[x`` as a broken IPv6 host and raise
        path, _, query_text = target.partition("#")[0].partition("?")
        try:
            query = parse_qs(query_text, keep_blank_values=True, max_num_fields=20)
        except ValueError:
            raise HttpError(HTTPStatus.BAD_REQUEST, "too many query parameters") from None
        return Request(method=method, path=unquote(path), query=query, headers=headers, body=body)

    async def _line(self, reader: asyncio.StreamReader, seen: _Seen, *, first: bool) -> bytes:
        """The next line of the request's head, without its CRLF (empty: the head's end); the request line and the
        headers together at most ``max_header_bytes`` (a request line longer: its target is too long, a 414)."""
        too_large = (HttpError(HTTPStatus.REQUEST_URI_TOO_LONG, "request target too long") if first else
                     HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request headers too large"))  # fmt: skip
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError:
            raise too_large from None
        except asyncio.IncompleteReadError as exc:
            if not first or exc.partial.strip():
                raise HttpError(HTTPStatus.BAD_REQUEST, "incomplete request") from None
            raise
        seen.head_bytes += len(line)
        if seen.head_bytes > self.max_header_bytes:
            raise too_large
        return line[:-2]

    async def _write(self, writer: asyncio.StreamWriter, method: str, response: Response) -> None:
        if writer.is_closing():  # the client reset the connection: uvloop raises RuntimeError on a write to it
            return
        status = HTTPStatus(response.status)
        head = [
            f"HTTP/1.1 {status.value} {status.phrase}",
            f"Date: {formatdate(usegmt=True)}",
            "Server: kembali",
            "Connection: close",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
        ]
        names = {name.lower() for name, _ in response.headers}
        head += [f"{k}: {v}" for k, v in SECURITY_HEADERS if k.lower() not in names]
        head += [f"{k}: {v}" for k, v in response.headers]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if method != "HEAD":
            writer.write(response.body)
        await asyncio.wait_for(writer.drain(), self.timeout_seconds)


@dataclass
class _Seen:
    """What is known of a request while its head is read: what its refusal depends on."""

    method: str = "GET"
    """``GET`` until the request line is read (then its method): a HEAD's answer is sent without its body."""
    head_bytes: int = 0


def _request_line(line: bytes) -> tuple[str, str, str]:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "HTTP/1.1 only")
    if not _TOKEN.fullmatch(method):
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed method")
    if not _TARGET.fullmatch(target):
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed request target")
    return method.decode("ascii"), target.decode("ascii"), version.decode("ascii")


def _headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HttpError(HTTPStatus.BAD_REQUEST, "malformed header line")
        if any(b in value for b in (b"\r", b"\n", b"\0")):
            raise HttpError(HTTPStatus.BAD_REQUEST, "malformed header value")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def _content_length(headers: dict[str, str]) -> int:
    raw = headers.get("content-length")
    if raw is None:
        return 0
    values = {v.strip() for v in raw.split(",")}
    if len(values) != 1 or not _DIGITS.fullmatch(next(iter(values))):  # ASCII digits: "²".isdigit() is True
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed Content-Length")
    digits = next(iter(values)).lstrip("0") or "0"
    if len(digits) > MAX_LENGTH_DIGITS:  # int() refuses more than 4300 digits; no body of ours has 19
        raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
    return int(digits)


def _plain(status: HTTPStatus, text: str) -> Response:
    return Response(status.value, (text + "\n").encode(), "text/plain; charset=utf-8")
