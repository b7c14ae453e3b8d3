"""`kembali preview --serve`: a live page of every campaign x language x sample customer.

A stdlib ``http.server`` on 127.0.0.1, a thread per connection (a browser opens
connections it may never use: one server thread would wait on such a socket and
answer nobody else); the page renders one at a time, as the renderer has one helper.
``/`` renders every sample through ``checks.render_all`` (the sender's context
building, renderer and MIME writer) with a ``TimeLimitedRenderer``, so a template
that never finishes shows as an error instead of hanging the page. Each card
shows the subject, the HTML part in an ``<iframe srcdoc>`` (sandboxed: no
scripts) and the text part; a failed render shows its file:line instead. The
page polls ``/version`` (a hash of the template files' names, sizes and mtimes)
and reloads itself when a file changes. Requests whose ``Host`` is not a loopback
name get a 403 (DNS rebinding: see ``loopback_host``).
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from worker.adapters.render_worker import TimeLimitedRenderer
from worker.checks import lint_problems, locate_unescaped, problems_of, render_all, unused_folders
from worker.config import Settings
from worker.errors import ConfigError

EXIT_OK, EXIT_USAGE = 0, 2

FALLBACK_PORT = 8026
"""The preview's port when ``web.port`` has no next one (0: the daemon's is any free port; 65535)."""


def default_port(settings: Settings) -> int:
    """The port after the daemon's ``web.port`` (8026 with the shipped 8025): not the daemon's own, which a
    preview left open would keep ``kembali run`` from listening on (and a running daemon, the preview)."""
    port = settings.web.port
    return port + 1 if 0 < port < 65535 else FALLBACK_PORT

POLL_MS = 500


def templates_version(root: Path) -> str:
    """Changes whenever a file under ``root`` is added, removed or written, also in a folder linked in (a campaign's
    templates kept elsewhere), which the renderer reads through the link; each folder once (a link to a folder
    above it is no endless walk)."""
    digest = hashlib.sha256()
    walked: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        try:
            st = os.stat(folder)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in walked:
            dirs.clear()
            continue
        walked.add((st.st_dev, st.st_ino))
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


_STYLE = """
body{font-family:system-ui,Arial,sans-serif;margin:0;background:#f6f4f0;color:#222}
header{padding:12px 20px;background:#8a4b14;color:#fff}
main{padding:16px 20px}
.card{background:#fff;border:1px solid #e3dccf;border-radius:8px;margin:0 0 20px;padding:12px 16px}
.card h2{font-size:15px;margin:0 0 6px}
.subject{font-weight:bold;margin:6px 0}
.parts{display:flex;gap:16px;flex-wrap:wrap}
iframe{width:620px;height:520px;border:1px solid #ddd;background:#fff}
pre{white-space:pre-wrap;max-width:520px;font-size:12px;background:#faf8f4;padding:8px;margin:0}
.error{background:#fde8e8;border:1px solid #d33;color:#900;padding:8px;font-family:monospace;white-space:pre-wrap}
.warn{background:#fff6d6;border:1px solid #d9a600;padding:6px;font-size:13px;margin:4px 0}
nav a{margin-right:10px}
"""


def render_page(settings: Settings, renderer: TimeLimitedRenderer, version: str) -> str:
    cards: list[str] = []
    nav: list[str] = []
    known: dict[str, set[str]] = {}
    for r in render_all(settings, renderer):
        known.setdefault(r.campaign, set()).update(r.context)
        anchor = f"{r.campaign}-{r.locale}-{r.sample.slug}"
        title = f"{r.campaign} · {r.locale} · {r.sample.label}"
        nav.append(f'<a href="#{anchor}">{html.escape(title)}</a>')
        body: list[str] = []
        problems = locate_unescaped(problems_of(r, settings), renderer)
        if r.error is not None or r.rendered is None:
            where = (problems[0].where + ": ") if problems and problems[0].where else ""
            message = problems[0].message if problems else str(r.error)
            body.append(f'<div class="error template-error">{html.escape(where + message)}</div>')
        else:
            rendered = r.rendered
            body.append(f'<div class="subject">Subject: <span class="subject-text">'
                        f"{html.escape(rendered.subject)}</span></div>")
            for p in problems:
                body.append(f'<div class="warn">{html.escape(str(p))}</div>')
            body.append('<div class="parts">'
                        f'<iframe sandbox title="HTML part" srcdoc="{html.escape(rendered.html, quote=True)}"></iframe>'
                        f'<pre class="text-part">{html.escape(rendered.text)}</pre></div>')
        cards.append(f'<section class="card" id="{anchor}" data-campaign="{r.campaign}" data-locale="{r.locale}" '
                     f'data-sample="{r.sample.slug}"><h2>{html.escape(title)}</h2>{"".join(body)}</section>')
    lint = lint_problems(renderer, known, unused_folders(settings, renderer))
    top = "".join(f'<div class="error lint-error">{html.escape(str(p))}</div>' for p in lint)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Kembali live preview</title><style>{_STYLE}</style></head>
<body data-version="{version}">
<header>Kembali live preview: {html.escape(str(renderer.root))} (reloads when a template changes)</header>
<main>{top}<nav>{" ".join(nav)}</nav>{"".join(cards)}</main>
<script>
const version = document.body.dataset.version;
setInterval(async () => {{
  try {{
    const reply = await fetch('/version', {{cache: 'no-store'}});
    const now = (await reply.json()).version;
    if (now !== version) location.reload();
  }} catch (e) {{}}
}}, {POLL_MS});
</script></body></html>"""


_LOOPBACK_HOST = re.compile(r"(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?", re.IGNORECASE)


def loopback_host(host: str | None) -> bool:
    """Whether a request's Host header names this machine's loopback (no header: not a browser).

    The server listens on 127.0.0.1 only, but a web page the operator opens can still reach it by DNS
    rebinding: its own name re-resolved to 127.0.0.1 makes the preview its same-origin page, readable by its
    scripts. Its Host header still carries that name."""
    return host is None or _LOOPBACK_HOST.fullmatch(host.strip()) is not None


class _Handler(BaseHTTPRequestHandler):
    server: PreviewServer

    def do_GET(self) -> None:  # http.server's hook name
        path = self.path.split("?", 1)[0]
        if not loopback_host(self.headers.get("Host")):
            port = self.server.server_address[1]
            self._send(403, "text/plain; charset=utf-8",
                       f"this live preview answers only to http://127.0.0.1:{port}/ and http://localhost:{port}/\n"
                       .encode())  # fmt: skip
        elif path == "/version":
            self._send(200, "application/json", json.dumps({"version": self.server.version()}).encode())
        elif path == "/":
            try:
                with self.server.rendering:
                    page = render_page(self.server.settings, self.server.renderer, self.server.version())
            except Exception as exc:  # never crash the server: show what broke
                page = f'<div class="error">{html.escape(type(exc).__name__ + ": " + str(exc))}</div>'
            self._send(200, "text/html; charset=utf-8", page.encode("utf-8"))
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found")

    def do_HEAD(self) -> None:  # the GET's answer without its body (``_send`` leaves it out): it was a 501
        self.do_GET()

    def _not_allowed(self) -> None:
        self.send_response(405)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # 405, not http.server's 501

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet: no access log
        return


class PreviewServer(ThreadingHTTPServer):
    def __init__(self, settings: Settings, renderer: TimeLimitedRenderer, port: int) -> None:
        self.settings = settings
        self.renderer = renderer
        self.rendering = threading.Lock()
        """The renderer talks to one helper process over one pipe: one page at a time."""
        super().__init__(("127.0.0.1", port), _Handler)

    def version(self) -> str:
        return templates_version(self.renderer.root)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A browser that reloads while the page renders resets the old connection: nothing to report (the
        default prints a traceback on the terminal for each); anything else is reported as usual."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def serve(settings: Settings, port: int | None) -> int:
    """Serve the live page on ``port`` (None: ``default_port``) until Ctrl-C."""
    if port is None:
        port = default_port(settings)
    folder = settings.resolve(settings.templates.dir)
    if not folder.is_dir():  # else a page of "template not found" cards, one per campaign, language and sample
        raise ConfigError(f"{settings.source}: 'templates.dir' {str(folder)!r} is not a folder")
    with TimeLimitedRenderer(folder, timeout_seconds=settings.checks.render_timeout_seconds) as renderer:
        try:
            server = PreviewServer(settings, renderer, port)
        except OSError as exc:  # ``[Errno 98] Address already in use`` alone named neither the port nor the fix
            why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            print(f"kembali preview --serve: cannot listen on 127.0.0.1:{port} ({why}): give another --port "
                  "(0 picks a free one)", file=sys.stderr)  # fmt: skip
            return EXIT_USAGE
        host, bound = server.server_address[:2]
        try:  # the line too: Ctrl-C or SIGTERM (stopping.Terminated) right after it stops the server as later
            print(f"live preview on http://{host!s}:{bound}/ (templates: {folder}; Ctrl-C to stop)", flush=True)
            server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    print("live preview stopped", file=sys.stderr)
    return EXIT_OK
