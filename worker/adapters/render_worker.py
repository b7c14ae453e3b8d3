"""Rendering with a deadline, in a helper process that can be killed.

The Jinja2 sandbox limits what a template may *touch*, not how long it *runs*:
``{% for i in range(10**9) %}`` or a recursive macro would hold a CPU forever.
A thread cannot be stopped from outside in Python (a runaway render in a thread
keeps burning a core until the process exits), so each render goes to a helper
process over a pipe, one JSON line per request and per reply; before its reply the
helper says ``RENDERING`` once it has compiled the templates the request uses, and
the time limit counts from there, as it does in the sender. The helper stops a
render past ``timeout_seconds`` itself (``JinjaTemplates``' watchdog), so the error
names the template's file and line, as a render in ``run`` does; when no reply
arrives ``KILL_GRACE_SECONDS`` after that (one long step of C, which the watchdog
stops only when it returns) the helper is killed, the render fails with a
``TemplateError`` naming the folder, and the next render starts a fresh helper. The helper loads
the same templates folder (with Jinja2's mtime reloading), so edits show up. Its
memory is bounded too: a render that keeps building values is stopped by the
watchdog (``templates.RENDER_MEMORY_BYTES``), or fails with a ``MemoryError``
(``MEMORY_LIMIT_BYTES`` of address space), at its file and line instead of
taking the machine's memory until the deadline.

The child side is ``python -m worker.adapters.render_worker ROOT``. It runs in a
process group of its own: a Ctrl-C at the terminal, or ``timeout``'s signal to the
command's group, reaches the process that started it, which decides when to stop
and stops it (at once when it leaves ``with`` on an exception). In the command's
group, the helper got the same Ctrl-C and printed a traceback below the
command's own line, from its start-up or a render. It ends with the process that
started it, even mid-render, when that one is killed (``_end_with_parent``).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from worker.adapters.templates import JinjaTemplates, StrayText
from worker.domain import Locale, RenderedEmail
from worker.errors import TemplateError

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent.parent)


KILL_GRACE_SECONDS = 1.0
"""How long after ``timeout_seconds`` the helper is killed when it has not stopped the render itself."""
RENDERING = b"rendering\n"
"""What the helper says once it has compiled the templates a request uses, as the render (and its time limit)
starts: a long template's compile (seconds on a loaded machine) was counted as the render's time, and the
helper killed as stuck in a loop."""


class TimeLimitedRenderer:
    """A ``TemplateRenderer`` whose renders are stopped after ``timeout_seconds``."""

    def __init__(self, root: Path, *, timeout_seconds: float, start_timeout_seconds: float = 60.0) -> None:
        self.root = Path(root).resolve()
        self.timeout_seconds = timeout_seconds
        self.start_timeout_seconds = start_timeout_seconds
        self.local = JinjaTemplates(self.root)
        """For discovery and static checks, which cannot run away."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._lines: _Lines | None = None
        """The helper's replies, line by line."""
        self.restarts = 0

    # discovery and static checks run here, in this process
    def campaigns(self) -> list[str]:
        return self.local.campaigns()

    def locales(self, campaign: str) -> list[Locale]:
        return self.local.locales(campaign)

    def lint(self, known: Mapping[str, Iterable[str]], skip: Iterable[str] = ()) -> list[TemplateError]:
        return self.local.lint(known, skip)

    def files(self) -> list[str]:
        return self.local.files()

    def stray_text(self, skip: Iterable[str] = ()) -> list[StrayText]:
        return self.local.stray_text(skip)

    def unescaped_sites(self, campaign: str, locale: str) -> list[tuple[str, int]]:
        return self.local.unescaped_sites(campaign, locale)

    def render(self, campaign: str, locale: Locale, context: Mapping[str, object]) -> RenderedEmail:
        proc = self._helper()
        assert proc.stdin is not None and proc.stdout is not None
        request = {"campaign": campaign, "locale": str(locale), "context": context}
        try:
            proc.stdin.write(json.dumps(request, ensure_ascii=False).encode("utf-8") + b"\n")
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._kill()
            raise TemplateError("the render helper process stopped", template=f"{campaign}/{locale}/") from None
        assert self._lines is not None
        line = self._lines.readline(self.start_timeout_seconds)  # compiling the templates: not the render's time
        if line == RENDERING:
            line = self._lines.readline(self.timeout_seconds + KILL_GRACE_SECONDS)
        elif line is None:
            self._kill()
            raise TemplateError(f"the templates took more than {self.start_timeout_seconds:g} s to compile",
                                template=f"{campaign}/{locale}/")
        if line is None:
            self._kill()
            raise TemplateError(
                f"the render took more than {self.timeout_seconds:g} s and was stopped (a loop that does not end?)",
                template=f"{campaign}/{locale}/",
            )
        if not line:
            self._kill()
            raise TemplateError("the render helper process died", template=f"{campaign}/{locale}/")
        reply = json.loads(line)
        if not reply["ok"]:
            raise TemplateError(reply["error"], template=reply.get("template") or "", line=reply.get("line"))
        return RenderedEmail(
            subject=reply["subject"], html=reply["html"], text=reply["text"], template_version=reply["version"]
        )

    def _helper(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        path = os.pathsep.join(filter(None, [_PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.adapters.render_worker", str(self.root), repr(self.timeout_seconds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, process_group=0,
        )  # fmt: skip
        assert proc.stdout is not None
        lines = _Lines(proc.stdout.fileno())
        try:
            ready = lines.readline(self.start_timeout_seconds)
        except BaseException:  # stopped (Ctrl-C, SIGTERM) while it started: in a group of its own, it would live on
            proc.kill()
            proc.wait()
            raise
        if ready != b"ready\n":
            proc.kill()
            proc.wait()
            raise TemplateError("the render helper process did not start")
        if self._proc is not None:
            self.restarts += 1
        self._proc, self._lines = proc, lines
        return proc

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                if pipe is not None:
                    pipe.close()

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None and self._proc.stdin is not None:
                self._proc.stdin.close()  # the helper exits at end of input
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=5)
            self._kill()
            self._proc = None

    def __enter__(self) -> TimeLimitedRenderer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:  # stopped (Ctrl-C, SIGTERM) or failed: a render under way is not waited for
            self._kill()
            self._proc = None


class _Lines:
    """The lines a helper writes, read from its pipe as they come. Read with ``os.read``, not through a buffered
    stream, whose buffer ``select`` cannot see: two lines that came together (the helper's ``RENDERING`` and a quick
    render's reply) left the second in the buffer, and its wait ran out with the reply already there."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pending = bytearray()

    def readline(self, timeout_seconds: float) -> bytes | None:
        """The next line, or None if none began to arrive within ``timeout_seconds`` (what came of one that did is
        waited for); at end of file what is left, b"" when nothing is."""
        deadline = time.monotonic() + timeout_seconds
        while (end := self._pending.find(b"\n")) < 0:
            if not self._pending:
                with selectors.DefaultSelector() as selector:
                    selector.register(self.fd, selectors.EVENT_READ)
                    if not selector.select(max(0.0, deadline - time.monotonic())):
                        return None
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                rest = bytes(self._pending)
                self._pending.clear()
                return rest
            self._pending += chunk
        line = bytes(self._pending[: end + 1])
        del self._pending[: end + 1]
        return line


MEMORY_LIMIT_BYTES = 1 << 30
"""The address space the helper may use (``RLIMIT_AS``): ~100 MB after start-up, a few MB more per render; a
template that keeps building values (a loop that nests each one in the next) gets a ``MemoryError`` at its
line well before the machine runs out of memory, where the time limit alone would let it take gigabytes."""


def _limit_memory(limit: int) -> None:
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    except (ImportError, ValueError, OSError):  # not on this system: the time limit still holds
        pass


PARENT_WATCH_SECONDS = 0.5
"""How often the helper looks whether the process that started it is still there."""


def _end_with_parent() -> None:
    """Exit when the process that started this one is gone: killed (SIGKILL, the OOM killer), it stopped nothing,
    and a render under way, a loop that never ends, say, went on for its time limit or for ever, with nobody to
    answer. Between renders the end of input says so; mid-render a thread watches the parent process id, which
    becomes another's (init's, a subreaper's) when the parent dies. (``PR_SET_PDEATHSIG`` would not do: it follows
    the *thread* that started the helper, a pool's thread in the daemon.) Where a dead parent's id stays (Windows),
    the watch never fires, and the end of input is all there is."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(PARENT_WATCH_SECONDS)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str]) -> int:
    try:
        return _serve(argv)
    except BrokenPipeError:  # the process that started this one is gone (killed): nobody to answer
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the unwritten rest, flushed at exit
        return 0


def _serve(argv: list[str]) -> int:
    _end_with_parent()
    # the render stops itself at its limit, at its file and line; the parent kills this process a little later
    templates = JinjaTemplates(Path(argv[1]), time_limit=float(argv[2]) if len(argv) > 2 else None)
    _limit_memory(MEMORY_LIMIT_BYTES)
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        request: dict[str, Any] = json.loads(line)
        try:
            with contextlib.suppress(Exception):  # what cannot be loaded, the render reports at its line
                templates.load(request["campaign"], Locale(request["locale"]))
            out.write(RENDERING)  # the time limit starts now, the templates compiled
            out.flush()
            r = templates.render(request["campaign"], Locale(request["locale"]), request["context"])
            reply: dict[str, Any] = {
                "ok": True, "subject": r.subject, "html": r.html, "text": r.text, "version": r.template_version,
            }  # fmt: skip
        except TemplateError as exc:
            reply = {"ok": False, "error": exc.reason, "template": exc.template, "line": exc.line}
        except Exception as exc:  # a bug in a filter, say: report it, keep serving
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "template": "", "line": None}
        out.write(json.dumps(reply, ensure_ascii=False).encode("utf-8") + b"\n")
        out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
