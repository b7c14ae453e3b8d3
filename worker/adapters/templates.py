"""The Jinja2 adapter: a sandboxed environment over ``templates/email/``.

Layout on disk: ``<root>/<campaign>/<locale>/{subject.txt,body.html,body.txt}``
plus shared files whose names start with ``_`` (``_layout.html``…). HTML is
autoescaped, text is not; an undefined variable is an error. Every Jinja2 error
becomes a ``TemplateError`` naming the file (relative to the root) and the line.

Templates are reloaded when their files change, so a long-running process picks
up edits without restarting; ``template_version`` hashes the bytes of every file
a campaign/locale uses, so an edit also changes the version recorded on each
message. How often the files are looked at is ``recheck_seconds``: 0 (the
default, for previews) stats them on every render; a sender passes 1.0 (at most
once a second: stat()ing ~10 files per message is a real cost at thousands of
messages a second); None never looks again (the daemon renders a private copy
of the accepted templates that nobody edits). When a check finds a change, every
cached template and version is dropped together, so a message's version always
names the bytes it was rendered from.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from pathlib import Path
from types import TracebackType

import jinja2
from jinja2 import meta, nodes, pass_context
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from worker.core.render import format_date, format_money
from worker.domain import Locale, RenderedEmail
from worker.errors import TemplateError

PARTS = ("subject.txt", "body.html", "body.txt")
"""The files each campaign has in each locale folder."""

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_Signature = tuple[tuple[str, int, int], ...]


@pass_context
def _money_filter(ctx: Context, minor: object, currency: str | None = None) -> str:
    if not isinstance(minor, int) or isinstance(minor, bool):
        raise TypeError(f"money expects an integer amount in minor units, not {type(minor).__name__}")
    if currency is None:
        shop = ctx.get("shop")
        currency = str(shop.get("currency", "IDR")) if isinstance(shop, Mapping) else "IDR"
    return format_money(minor, currency, str(ctx.get("locale", "id")))


@pass_context
def _date_filter(ctx: Context, value: object) -> str:
    if isinstance(value, str):
        value = date.fromisoformat(value[:10])
    if isinstance(value, datetime):
        value = value.date()
    if not isinstance(value, date):
        raise TypeError(f"date expects a date or an ISO date string, not {type(value).__name__}")
    return format_date(value, str(ctx.get("locale", "id")))


class JinjaTemplates:
    """``TemplateRenderer`` over a directory of Jinja2 templates."""

    def __init__(self, root: Path, *, recheck_seconds: float | None = 0.0) -> None:
        self.root = Path(root).resolve()
        self.recheck_seconds = recheck_seconds
        self._checked_at: float | None = None
        """When the files were last compared with the cached versions (monotonic), with recheck_seconds > 0."""
        self._env = ImmutableSandboxedEnvironment(
            loader=jinja2.FileSystemLoader(self.root, encoding="utf-8"),
            undefined=jinja2.StrictUndefined,
            autoescape=jinja2.select_autoescape(enabled_extensions=("html", "htm"), default_for_string=False),
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            auto_reload=recheck_seconds == 0,  # otherwise _recheck decides when to look
        )
        self._env.filters["money"] = _money_filter
        self._env.filters["date"] = _date_filter
        self._versions: dict[tuple[str, str], tuple[_Signature, str]] = {}

    # --- discovery and versions --------------------------------------------

    def campaigns(self) -> list[str]:
        """Campaign folders that hold at least one locale with templates."""
        if not self.root.is_dir():
            return []
        return sorted(
            d.name
            for d in self.root.iterdir()
            if d.is_dir() and _NAME.fullmatch(d.name) and any((d / loc / PARTS[0]).is_file() for loc in Locale)
        )

    def locales(self, campaign: str) -> list[Locale]:
        """The locales a campaign has templates for."""
        return [loc for loc in Locale if (self.root / campaign / loc / PARTS[0]).is_file()]

    def template_version(self, campaign: str, locale: Locale | str) -> str:
        """A short sha256 over every file the campaign/locale uses (its own, layouts, includes)."""
        key = (_check_name(campaign), str(Locale(locale)))
        cached = self._versions.get(key)
        if cached is not None:
            if self.recheck_seconds is None:
                return cached[1]
            if self.recheck_seconds > 0:
                self._recheck(force=False)
                cached = self._versions.get(key)  # None if the check found a change
                if cached is not None:
                    return cached[1]
            elif cached[0] == self._signature(name for name, _, _ in cached[0]):
                return cached[1]
        if self.recheck_seconds:
            self._recheck(force=True)  # so cached templates are not older than the bytes hashed below
        names = self._files_used(*key)
        digest = hashlib.sha256()
        for name in sorted(names):
            data = self._read(name)
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)
        version = digest.hexdigest()[:12]
        self._versions[key] = (self._signature(sorted(names)), version)
        return version

    def _recheck(self, *, force: bool) -> None:
        """With ``recheck_seconds`` > 0: once the interval is up (or when forced), compare every cached
        version's files with the disk; on any change drop all cached templates and versions."""
        now = time.monotonic()
        assert self.recheck_seconds
        if not force and self._checked_at is not None and now - self._checked_at < self.recheck_seconds:
            return
        self._checked_at = now
        if any(sig != self._signature(name for name, _, _ in sig) for sig, _ in self._versions.values()):
            self._versions.clear()
            if self._env.cache is not None:
                self._env.cache.clear()

    def _signature(self, names: Iterable[str]) -> _Signature:
        out = []
        for name in names:
            try:
                st = os.stat(self.root / name)
            except OSError:
                return ()
            out.append((name, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _read(self, name: str) -> bytes:
        try:
            return (self.root / name).read_bytes()
        except OSError as exc:
            raise TemplateError(f"cannot read template: {exc.strerror}", template=name) from None

    def _files_used(self, campaign: str, locale: str) -> set[str]:
        seen: set[str] = set()
        stack = [f"{campaign}/{locale}/{part}" for part in PARTS]
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            if not (self.root / name).is_file():
                raise TemplateError("template not found", template=name)
            seen.add(name)
            source = self._read(name).decode("utf-8", "replace")
            try:
                tree = self._env.parse(source, name, str(self.root / name))
            except jinja2.TemplateSyntaxError as exc:
                raise TemplateError(f"syntax error: {exc.message}", template=name, line=exc.lineno) from None
            for ref in meta.find_referenced_templates(tree):
                if ref is None:  # a computed name: count every shared file
                    stack += [p.relative_to(self.root).as_posix() for p in self.root.rglob("_*") if p.is_file()]
                else:
                    stack.append(ref)
        return seen

    # --- static checks -----------------------------------------------------

    def files(self) -> list[str]:
        """Every template file under the root (``.html``/``.txt``), relative, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file() and p.suffix in (".html", ".htm", ".txt") and not p.name.startswith(".")
        )

    def lint(self, known: Mapping[str, Iterable[str]]) -> list[TemplateError]:
        """Parse every file: syntax errors, and variables a file reads that its context lacks.

        ``known`` maps a campaign folder to the context keys its templates receive;
        the key ``""`` is for shared files (``_layout.html``…). A variable that is
        read but neither known, set in the template, nor a Jinja2 global is reported
        with the line it is first read on, even in a branch no sample takes.
        """
        problems: list[TemplateError] = []
        for name in self.files():
            folder = name.split("/", 1)[0] if "/" in name else ""
            allowed = set(known.get(folder, known.get("", ()))) | set(self._env.globals)
            source = self._read(name).decode("utf-8", "replace")
            try:
                tree = self._env.parse(source, name, str(self.root / name))
            except jinja2.TemplateSyntaxError as exc:
                problems.append(TemplateError(f"syntax error: {exc.message}", template=name, line=exc.lineno))
                continue
            for var in sorted(meta.find_undeclared_variables(tree) - allowed):
                line = next((n.lineno for n in tree.find_all(nodes.Name) if n.name == var and n.ctx == "load"), None)
                problems.append(TemplateError(f"undefined variable '{var}'", template=name, line=line))
        return problems

    # --- rendering ---------------------------------------------------------

    def render(self, campaign: str, locale: Locale, context: Mapping[str, object]) -> RenderedEmail:
        loc = Locale(locale)
        folder = f"{_check_name(campaign)}/{loc}"
        version = self.template_version(campaign, loc)
        ctx = dict(context)
        ctx["locale"] = str(loc)
        subject_name = f"{folder}/subject.txt"
        subject = " ".join(self._render(subject_name, ctx).split())
        if not subject:
            raise TemplateError("the subject is empty", template=subject_name)
        html = self._render(f"{folder}/body.html", ctx)
        text = self._render(f"{folder}/body.txt", ctx)
        return RenderedEmail(subject=subject, html=html, text=text, template_version=version)

    def _render(self, name: str, ctx: Mapping[str, object]) -> str:
        try:
            return self._env.get_template(name).render(ctx)
        except jinja2.TemplateSyntaxError as exc:
            syntax_file = self._relative(exc.filename) or exc.name or name
            raise TemplateError(f"syntax error: {exc.message}", template=syntax_file, line=exc.lineno) from None
        except Exception as exc:
            where, line = self._locate(exc.__traceback__)
            if isinstance(exc, jinja2.TemplateNotFound):
                message = f"template not found: {exc.name}"
            else:
                message = f"{type(exc).__name__}: {exc}"
            raise TemplateError(message, template=where or name, line=line) from None

    def _relative(self, filename: str | None) -> str | None:
        if not filename:
            return None
        try:
            return Path(filename).resolve().relative_to(self.root).as_posix()
        except ValueError:
            return None

    def _locate(self, tb: TracebackType | None) -> tuple[str | None, int | None]:
        """The innermost template frame: Jinja2 rewrites frames to the template's file and line."""
        where: str | None = None
        line: int | None = None
        while tb is not None:
            relative = self._relative(tb.tb_frame.f_code.co_filename)
            if relative is not None:
                where, line = relative, tb.tb_lineno
            tb = tb.tb_next
        return where, line


def _check_name(campaign: str) -> str:
    if not _NAME.fullmatch(campaign):
        raise TemplateError(f"not a campaign name: {campaign!r}")
    return campaign
