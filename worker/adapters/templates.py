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

The sandbox keeps templates away from Python's internals but bounds neither
time nor size, and every message renders the operator's templates with the
customer's data. So a render is bounded here too: one that runs past
``time_limit`` (``checks.render_timeout_seconds``), or grows the process's
memory by more than ``RENDER_MEMORY_BYTES``, is stopped by an exception
raised in its thread (``_Watchdog``); and a value larger than
``MAX_PART_CHARS`` characters (or items) is refused before it is built, since
one step of C builds it whole, which no time limit stops. Refused that way:
the operators ``*``, ``**``, ``+``, ``%`` and ``~``; the filters that build
more than they are given (``center``, ``indent``, ``replace``, ``format``,
``join``, ``wordwrap``, ``batch`` with a filler, ``slice``, ``sum``,
``urlize``, ``tojson``, ``list``, ``lipsum``); the methods of ``str``,
``bytes`` and ``int`` that do (``ljust``/``rjust``/``center``/``zfill``,
``expandtabs``, ``replace``, ``translate``, ``join``, ``to_bytes``) and
``str.format``'s widths and precisions; printing a list, dict… that would
print too long (``[s] * 1000`` holds 1,000 items but prints ``s`` 1,000 times);
and the text a part, block, macro or ``{% set %}`` block gathers, counted piece
by piece as it comes. Each refusal (a ValueError naming what and the limit)
becomes a ``TemplateError`` naming the file and line, so that one message fails
(``render_error``) and the run goes on. Estimates are lower bounds of the
true size: escaping (up to 5 times longer), ``repr`` and the fixed text a
filter adds (``urlize``'s links) can make a value a few times the limit, never
without bound. Not bounded by size, only by time: a loop's work, and the
items of one ``{{ a }}{{ b }}…`` line inside a ``{% set %}`` block or macro,
which are built together before they are counted (as many as the line has).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import difflib
import encodings
import functools
import hashlib
import itertools
import math
import os
import re
import sys
import threading
import time
import types
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from types import GeneratorType, TracebackType
from typing import Any, NoReturn, cast

import jinja2
import markupsafe
from jinja2 import filters as jfilters
from jinja2 import meta, nodes, pass_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.loaders import split_template_path
from jinja2.parser import Parser
from jinja2.runtime import Context, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.utils import Namespace, generate_lorem_ipsum
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

from worker.core.render import cut_whole, format_date, format_money
from worker.domain import Locale, RenderedEmail
from worker.errors import TemplateError, not_utf8
from worker.money import known as known_currency

PARTS = ("subject.txt", "body.html", "body.txt")
"""The files each campaign has in each locale folder."""

MAX_PART_CHARS = 1_000_000
"""The longest rendered subject, HTML or text part (characters), and the largest value a template's ``*`` or
``**`` may build: ten times the HTML Gmail shows unclipped (``checks.html_max_bytes``), far beyond any real
email; above it the message fails instead of going out."""
DEFAULT_TIME_LIMIT = 2.0
"""Seconds one message's render may take (``checks.render_timeout_seconds``'s default)."""

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_Signature = tuple[tuple[str, int, int], ...]


@pass_context
def _money_filter(ctx: Context, minor: object, currency: str | None = None) -> str:
    if not isinstance(minor, int) or isinstance(minor, bool):
        hint = " (a computed price: `| round | int | money`)" if isinstance(minor, float) else ""
        raise TypeError(f"money expects an integer amount in minor units, not {type(minor).__name__}{hint}")
    if currency is None:
        shop = ctx.get("shop")
        currency = str(shop.get("currency", "IDR")) if isinstance(shop, Mapping) else "IDR"
    elif not isinstance(currency, str) or not known_currency(currency):  # "Rp" printed "RP1"; "" a bare "1"
        raise ValueError(f"money expects an ISO 4217 currency code such as IDR (or none: the shop's), not {currency!r}")
    return format_money(minor, currency, str(ctx.get("locale", "id")))


@pass_context
def _date_filter(ctx: Context, value: object) -> str:
    if isinstance(value, str):
        text = value
        try:  # the whole text, a date or a date and time: its first ten characters took "2027-02-28xyz" as a date
            value = date.fromisoformat(text) if len(text) <= 10 else datetime.fromisoformat(text)
        except ValueError:  # said of the whole text, as written ('November 2' was none of the template's)
            shown = repr(text) if len(text) <= 40 else f"{text[:40]!r}…"
            raise ValueError(f"date expects a date or an ISO date string such as 2027-02-28, not {shown}") from None
    if isinstance(value, datetime):
        value = value.date()
    if not isinstance(value, date):
        raise TypeError(f"date expects a date or an ISO date string, not {type(value).__name__}")
    return format_date(value, str(ctx.get("locale", "id")))


_DICT_ATTRIBUTES = frozenset(dir(dict))


# --- bounds: values a template may build ------------------------------------------------------------------


def _refuse(what: str, size: int, unit: str = "characters") -> NoReturn:
    raise ValueError(_refusal(what, size, unit))


def _refusal(what: str, size: int, unit: str = "characters") -> str:
    return f"{what} would build at least {size:,} {unit}, more than the {MAX_PART_CHARS:,} a template may build"


_CONTAINERS: tuple[type, ...] = (
    list, tuple, set, frozenset, dict, type({}.keys()), type({}.values()), type({}.items()), Namespace,
)  # fmt: skip
"""What prints every value it holds: ``[s] * 1000`` is 1,000 items, but printed it is ``s`` 1,000 times."""
_PLAIN = frozenset({str, Markup, int, float, bool, type(None)})
"""What most values printed are: no container (a set lookup is cheaper than ``isinstance`` on ``_CONTAINERS``)."""


def _str_length(value: object, per_item: int = 0) -> int:
    """A lower bound of ``len(str(value))`` (plus ``per_item`` for each value inside a container), counted no
    further than just past ``MAX_PART_CHARS``: every value visited adds at least one, so the walk is short."""
    if isinstance(value, str | bytes):
        return len(value)
    if not isinstance(value, _CONTAINERS):
        if isinstance(value, int):
            return value.bit_length() * 3 // 10 + 1  # its digits, about (str() refuses beyond 4,300)
        return 0  # a number, a date, an object of the context's: their own str(), short
    total = 0
    stack: list[Any] = [value]
    while stack and total <= MAX_PART_CHARS:
        item = stack.pop()
        total += per_item
        if isinstance(item, str | bytes):
            total += len(item) + 2  # its quotes
        elif isinstance(item, Namespace):
            stack.append(item._Namespace__attrs)  # "<Namespace {...}>"
        elif isinstance(item, dict):
            total += 2 + 4 * len(item)  # {} and ": ", ", " per item
            if total <= MAX_PART_CHARS:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif isinstance(item, _CONTAINERS):
            items = cast(Collection[Any], item)
            total += 2 + 2 * len(items)
            if total <= MAX_PART_CHARS:
                stack.extend(items)
        else:
            total += max(_str_length(item), 1)
    return total


def _check_printable(value: object, what: str) -> None:
    if isinstance(value, _CONTAINERS) and (size := _str_length(value)) > MAX_PART_CHARS:
        _refuse(what, size)


def _text(value: object, what: str) -> str:
    """``value`` as the text a filter works on (refusing a container that would print too long)."""
    if isinstance(value, str):
        return value
    _check_printable(value, what)
    return str(value)


def _take(values: Iterable[Any], what: str) -> list[Any]:
    """The items of ``values``, refused when there are more than ``MAX_PART_CHARS`` (a generator is not run
    further than that)."""
    items = list(itertools.islice(values, MAX_PART_CHARS + 1))
    if len(items) > MAX_PART_CHARS:
        _refuse(what, len(items), "items")
    return items


def _number(spec: str) -> int:
    return int(spec) if len(spec) <= 9 else MAX_PART_CHARS + 1


_PERCENT = re.compile(
    r"%(?:\((?P<key>[^)]*)\))?[-#0 +]*(?P<width>\*|\d+)?(?:\.(?P<precision>\*|\d*))?[hlL]?(?P<kind>.)?", re.S
)


def _percent_length(fmt: str, values: object) -> int:
    """A lower bound of ``len(fmt % values)``: the format's text, plus for each conversion the largest of its
    width, its precision (``*`` takes them from ``values``) and the length of the value it prints."""
    seq = values if isinstance(values, tuple) else (values,)
    mapping = values if isinstance(values, Mapping) else None
    total = len(fmt)
    i = 0
    for m in _PERCENT.finditer(fmt):
        if m["kind"] == "%":
            continue
        total -= len(m[0])
        size = 0
        for spec in (m["width"], m["precision"]):
            if spec == "*":
                star = seq[i] if i < len(seq) else 0
                i += 1
                if isinstance(star, int):
                    size = max(size, abs(star))
            elif spec:
                size = max(size, _number(spec))
        if m["key"] is not None and mapping is not None:
            value = mapping.get(m["key"])
        elif i < len(seq):
            value = seq[i]
            i += 1
        else:
            value = None
        total += max(size, _str_length(value))
    return total


_DIGITS = re.compile(r"\d+")


def _spec_size(spec: str) -> int:
    """The largest number in a ``format()`` spec: its width or its precision (``{:>80}``, ``{:.2f}``)."""
    return max((_number(run) for run in _DIGITS.findall(spec)), default=0) if spec else 0


class _BoundedFormatter(SandboxedFormatter):
    """The sandbox's ``str.format``, refusing a field wider than ``MAX_PART_CHARS`` (``"{:>999999999}"``) and a
    result longer, before building it."""

    _built = 0

    def vformat(self, format_string: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        self._built = sum(len(text) for text, _, _, _ in self.parse(format_string))
        return super().vformat(format_string, args, kwargs)

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion is not None:
            _check_printable(value, "str.format")
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        self._built += max(_spec_size(format_spec), _str_length(value))
        if self._built > MAX_PART_CHARS:
            _refuse("str.format", self._built)
        return super().format_field(value, format_spec)


class _BoundedEscapeFormatter(_BoundedFormatter, SandboxedEscapeFormatter):
    """``Markup.format``, bounded the same way."""


def _pad_size(s: str | bytes, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    width = args[0] if args else kwargs.get("width", 0)
    return max(len(s), width) if isinstance(width, int) else 0


def _expandtabs_size(s: str | bytes, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    size = args[0] if args else kwargs.get("tabsize", 8)
    tab = "\t" if isinstance(s, str) else b"\t"
    return len(s) + s.count(tab) * size if isinstance(size, int) else 0  # type: ignore[arg-type]


def _replace_size(s: Any, old: object, new: object, count: object = -1, new_length: int | None = None) -> int:
    if not isinstance(old, str | bytes) or not isinstance(new, str | bytes):
        return 0
    times = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        times = min(times, count)
    return int(len(s) + times * ((len(new) if new_length is None else new_length) - len(old)))


def _replace_method_size(s: str | bytes, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    return _replace_size(s, *args[:3], **kwargs) if len(args) >= 2 else 0


def _translate_size(s: str | bytes, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    table = args[0] if args else None
    if not isinstance(table, Mapping):
        return len(s)
    longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
    return len(s) * longest


def _to_bytes_size(n: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    length = args[0] if args else kwargs.get("length", 1)
    return length if isinstance(length, int) else 0


_METHOD_SIZES: dict[str, Callable[[Any, tuple[Any, ...], dict[str, Any]], int]] = {
    "center": _pad_size, "ljust": _pad_size, "rjust": _pad_size, "zfill": _pad_size,
    "expandtabs": _expandtabs_size, "replace": _replace_method_size, "translate": _translate_size,
    "to_bytes": _to_bytes_size,
}  # fmt: skip
"""The methods of ``str``, ``bytes`` (and ``Markup``) and ``int`` that build a value larger than they are given,
with how large: checked in ``_Sandbox.call`` (``join`` there too)."""


# the filters that can build a value larger than they are given, checking first; they take the context so that
# Jinja2 never runs them at compile time on constants (`"x"|center(999999)` ten times would be compiled in)


@pass_context
def _center(context: Context, value: Any, width: int = 80) -> str:
    text = _text(value, "the filter center")
    if isinstance(width, int) and width > MAX_PART_CHARS:
        _refuse(f"center({width})", width)
    return jfilters.do_center(text, width)


@pass_context
def _indent(context: Context, s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    text = _text(s, "the filter indent")
    step = width if isinstance(width, int) else len(width) if isinstance(width, str) else 0
    if (size := len(text) + (text.count("\n") + 1) * step) > MAX_PART_CHARS:
        _refuse("the filter indent", size)
    return jfilters.do_indent(s, width, first, blank)


@pass_context
def _replace(context: Context, s: Any, old: Any, new: Any, count: int | None = None) -> str:
    text = _text(s, "the filter replace")
    new_text = _text(new, "the filter replace")
    grown = len(markupsafe.escape(new_text)) if context.eval_ctx.autoescape else len(new_text)
    size = _replace_size(text, _text(old, "the filter replace"), new_text, -1 if count is None else count, grown)
    if size > MAX_PART_CHARS:
        _refuse("the filter replace", size)
    return jfilters.do_replace(context.eval_ctx, s, old, new, count)


@pass_context
def _format(context: Context, value: Any, *args: Any, **kwargs: Any) -> str:
    if (size := _percent_length(_text(value, "the filter format"), kwargs or args)) > MAX_PART_CHARS:
        _refuse("the filter format", size)
    return jfilters.do_format(value, *args, **kwargs)


@pass_context
def _join(context: Context, value: Iterable[Any], d: str = "", attribute: str | int | None = None) -> str:
    """Counts as it goes and stops at the limit, never running a generator further."""
    step = len(_text(d, "the filter join"))
    get = None if attribute is None else jfilters.make_attrgetter(context.environment, attribute)
    items = []
    size = -step
    for item in value:
        item = item if get is None else get(item)
        size += _str_length(item) + step
        items.append(item)
        if size > MAX_PART_CHARS or len(items) > MAX_PART_CHARS:
            _refuse("the filter join", max(size, len(items)))
    return jfilters.sync_do_join(context.eval_ctx, items, d)


@pass_context
def _wordwrap(context: Context, s: Any, width: int = 79, break_long_words: bool = True,
              wrapstring: str | None = None, break_on_hyphens: bool = True) -> str:  # fmt: skip
    text = _text(s, "the filter wordwrap")
    if isinstance(width, int) and width > 0:
        joint = len(context.environment.newline_sequence if wrapstring is None else wrapstring)
        lines = 2 * len(text) // width + text.count("\n") + 1  # a line holds at least half its width, but a word
        if (size := len(text) + lines * joint) > MAX_PART_CHARS:
            _refuse("the filter wordwrap", size)
    return jfilters.do_wordwrap(context.environment, s, width, break_long_words, wrapstring, break_on_hyphens)


@pass_context
def _batch(context: Context, value: Iterable[Any], linecount: int, fill_with: Any = None) -> Iterator[list[Any]]:
    if fill_with is not None and isinstance(linecount, int) and linecount > MAX_PART_CHARS:
        _refuse(f"batch({linecount}) with a filler", linecount, "items")
    return jfilters.do_batch(value, linecount, fill_with)


@pass_context
def _slice(context: Context, value: Collection[Any], slices: int, fill_with: Any = None) -> Iterator[list[Any]]:
    if isinstance(slices, int) and slices > MAX_PART_CHARS:
        _refuse(f"slice({slices})", slices, "lists")
    return jfilters.sync_do_slice(value, slices, fill_with)


@pass_context
def _sum(context: Context, iterable: Iterable[Any], attribute: str | int | None = None, start: Any = 0) -> Any:
    items = _take(iterable, "the filter sum")
    if attribute is not None:
        items = list(map(jfilters.make_attrgetter(context.environment, attribute), items))
    sized = (str, bytes, list, tuple)
    if (size := sum(len(x) for x in (start, *items) if isinstance(x, sized))) > MAX_PART_CHARS:
        _refuse("the filter sum", size, "items")
    return jfilters.sync_do_sum(context.environment, items, None, start)


@pass_context
def _urlize(context: Context, value: Any, trim_url_limit: int | None = None, nofollow: bool = False,
            target: str | None = None, rel: str | None = None,
            extra_schemes: Iterable[str] | None = None) -> str:  # fmt: skip
    text = _text(value, "the filter urlize")
    each = len(_text(target or "", "the filter urlize")) + len(_text(rel or "", "the filter urlize"))
    if (size := len(text) + (text.count(".") + text.count("@")) * each) > MAX_PART_CHARS:  # every link has one
        _refuse("the filter urlize", size)
    return jfilters.do_urlize(context.eval_ctx, value, trim_url_limit, nofollow, target, rel, extra_schemes)


@pass_context
def _tojson(context: Context, value: Any, indent: int | None = None) -> Markup:
    step = indent if isinstance(indent, int) else len(indent) if isinstance(indent, str) else 0
    if (size := step if step > MAX_PART_CHARS else _str_length(value, per_item=step)) > MAX_PART_CHARS:
        _refuse("the filter tojson", size)
    return jfilters.do_tojson(context.eval_ctx, value, indent)


@pass_context
def _list(context: Context, value: Iterable[Any]) -> list[Any]:
    return _take(value, "the filter list")


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    if isinstance(n, int) and isinstance(max, int) and (size := 3 * n * max) > MAX_PART_CHARS:
        _refuse(f"lipsum({n}, max={max})", size)
    return generate_lorem_ipsum(n, html, min, max)


def _printing(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that prints its value (``string``, ``upper``…): refused on a container that prints too long."""
    at = 1 if hasattr(f, "jinja_pass_arg") else 0
    what = f"the filter {name}"

    @functools.wraps(f)  # keeps jinja_pass_arg
    def checked(*args: Any, **kwargs: Any) -> Any:
        if len(args) > at:
            _check_printable(args[at], what)
        return f(*args, **kwargs)

    return checked


@jinja2.pass_environment
def _truncate(env: jinja2.Environment, s: str, length: int = 255, killwords: bool = False, end: str = "...",
              leeway: int | None = None) -> str:  # fmt: skip
    """Jinja2's ``truncate``, whose cut (where a name has no space before it) never falls inside one character a
    reader sees: ``"🇮🇩🇮🇩🇮🇩"|truncate(6, end="…")`` is "🇮🇩🇮🇩…", not the third flag's first letter (a boxed "I")."""
    out: str = jfilters.do_truncate(env, s, length, killwords, end, leeway)
    if out is s or not isinstance(s, str) or not isinstance(end, str):  # short enough, or not text (an undefined)
        return out
    kept = out[: len(out) - len(end)] if end and out.endswith(end) else out
    return cut_whole(s, len(kept)) + end if s.startswith(kept) else out


_PRINTING_FILTERS = ("string", "e", "escape", "forceescape", "safe", "upper", "lower", "title", "capitalize", "trim",
                     "striptags", "wordcount", "urlencode", "truncate", "pprint")  # fmt: skip
_BOUNDED_FILTERS: dict[str, Callable[..., Any]] = {
    "center": _center, "indent": _indent, "replace": _replace, "format": _format, "join": _join,
    "wordwrap": _wordwrap, "batch": _batch, "slice": _slice, "sum": _sum, "urlize": _urlize, "tojson": _tojson,
    "list": _list,
}  # fmt: skip


@pass_context
def _concat(context: Context, operands: tuple[Any, ...]) -> str:
    """``a ~ b``: what Jinja2 compiles it to (``markup_join``, ``str_join``), once the lengths are counted."""
    if (size := sum(map(_str_length, operands))) > MAX_PART_CHARS:
        _refuse("the ~ operator", size)
    out: str = (markup_join if context.eval_ctx.autoescape else str_join)(operands)
    if len(out) > MAX_PART_CHARS:  # escaping made it longer
        _refuse("the ~ operator", len(out))
    return out


_CONCAT_FILTER = "~"
"""The name ``a ~ b`` is compiled to a filter under (no template can write it)."""


class _BoundConcat(NodeTransformer):
    """Turns each ``a ~ b ~ c`` into ``(a, b, c)|~``: ``Concat`` is neither an operator the sandbox intercepts
    nor one Jinja2 refrains from computing at compile time."""

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        self.generic_visit(node)
        operands = nodes.Tuple(node.nodes, "load", lineno=node.lineno)
        return nodes.Filter(operands, _CONCAT_FILTER, [], [], None, None, lineno=node.lineno)


def _finalize(value: Any) -> Any:
    """Every ``{{ … }}`` whose value is not a string or a number (``_CodeGenerator``): a list, a dict… prints
    what it holds (``{{ [s] * 1000 }}``)."""
    if isinstance(value, _CONTAINERS):
        _check_printable(value, f"printing a {type(value).__name__}")
    return value


class _CodeGenerator(CodeGenerator):
    """Jinja2's, calling ``_finalize`` on what a ``{{ … }}`` prints only when it is not of a ``_PLAIN`` type: the
    test is written inline, cheaper than calling a function for every ``{{ … }}``."""

    def _output_child_pre(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
        super()._output_child_pre(node, frame, finalize._replace(src=None))
        self.write("(_printed if (_printed := ")

    def _output_child_post(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
        self.write(").__class__ in environment.plain_types else environment.finalize(_printed))")
        super()._output_child_post(node, frame, finalize._replace(src=None))

    def buffer(self, frame: Frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.new_buffer()")


class _TooLong(ValueError):
    """The rendered text passed ``MAX_PART_CHARS``; ``at``: the template file and line whose output passed it,
    when the pieces came from a template's generator (a part's top level, where no template frame is on the
    traceback: the join runs in Jinja2's ``render``, outside the template's code)."""

    def __init__(self, size: int, at: tuple[str, int] | None) -> None:
        super().__init__(_refusal("the rendered text", size))
        self.at = at


def _too_long(size: int, parts: object = None) -> NoReturn:
    raise _TooLong(size, _generating_at(parts))


def _generating_at(parts: object) -> tuple[str, int] | None:
    """The template (its name under the root) and line a generator of rendered pieces is suspended at: the
    innermost one, following it into a parent template and blocks (``yield from``) and into an include (its
    generator, the local ``gen`` of Jinja2's generated code)."""
    found = None
    while isinstance(parts, GeneratorType) and (frame := parts.gi_frame) is not None:
        template = frame.f_globals.get("__jinja_template__")
        if isinstance(template, jinja2.Template) and template.name:
            found = (template.name, template.get_corresponding_lineno(frame.f_lineno))
        parts = parts.gi_yieldfrom or frame.f_locals.get("gen")
    return found


def _bounded_concat(parts: Iterable[str]) -> str:
    """What a template's pieces are joined with (a part, a block, a macro's or a ``{% set %}`` block's body),
    counted as they come: a loop printing a long value many times stops at the limit, holding no more."""
    size = 0
    pieces = [p for p in parts if (size := size + len(p)) <= MAX_PART_CHARS or _too_long(size, parts)]
    return "".join(pieces)


class _Buffer(list[str]):
    """What a ``{% set %}`` block, a macro or a ``{% call %}`` body is gathered in (``_CodeGenerator.buffer``),
    counting as it fills."""

    size = 0

    def append(self, piece: str) -> None:
        self.size += len(piece)
        if self.size > MAX_PART_CHARS:
            _too_long(self.size)
        super().append(piece)

    def extend(self, pieces: Iterable[str]) -> None:
        for piece in pieces:
            self.append(piece)


def _parsing_line(tb: TracebackType | None) -> int:
    """The line Jinja2's parser had reached when ``tb`` was raised in it (1 if unknown)."""
    line = 1
    while tb is not None:
        parser = tb.tb_frame.f_locals.get("self")
        if isinstance(parser, Parser):
            line = parser.stream.current.lineno
        tb = tb.tb_next
    return line


class _Undefined(jinja2.StrictUndefined):
    """StrictUndefined whose error for a field a dict lacks names the field meant: ``'dict object' has no attribute
    'frist_name' (did you mean 'first_name'?)``. Only the dict's key names are shown, never its values."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        message: str = super()._undefined_message
        owner, name = self._undefined_obj, self._undefined_name
        if not self._undefined_hint and isinstance(owner, Mapping) and isinstance(name, str) and len(name) <= 100:
            close = difflib.get_close_matches(name, [key for key in owner if isinstance(key, str)], n=1)
            if close:
                message += f" (did you mean '{close[0]}'?)"
        return message


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox, refusing values larger than ``MAX_PART_CHARS`` before it builds them (the
    operators, filters and methods that can build them in one step of C, which no time limit stops), with a
    shortcut for what templates mostly do: ``product.name`` on the plain dicts of the context. The sandbox
    tries the attribute first and, on the AttributeError every such lookup raises, the key; for a key that is
    no attribute of ``dict`` the answer is the same item, found without raising (half the cost of rendering a
    product list)."""

    concat = staticmethod(_bounded_concat)
    code_generator_class = _CodeGenerator
    plain_types = _PLAIN
    new_buffer = _Buffer

    def __init__(self, **options: Any) -> None:
        super().__init__(finalize=_finalize, **options)
        self.filters["truncate"] = _truncate
        for name in _PRINTING_FILTERS:
            self.filters[name] = _printing(name, self.filters[name])
        self.filters.update(_BOUNDED_FILTERS)
        self.filters[_CONCAT_FILTER] = _concat
        self.globals["lipsum"] = _lipsum

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        try:
            tree = _BoundConcat().visit(super()._parse(source, name, filename))
        except RecursionError as exc:  # Jinja2's parser recurses once per bracket, tag or operator inside another
            message = "brackets, tags or operators nested too deeply for the parser"
            raise jinja2.TemplateSyntaxError(message, _parsing_line(exc.__traceback__), name, filename) from None
        tree.set_environment(self)
        return tree  # type: ignore[no-any-return]

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                pass
        return super().getattr(obj, attribute)

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """``*``, ``**``, ``+`` and ``%``, refused when the value they would build is larger than
        ``MAX_PART_CHARS``: such a value is built in one step of C that no time limit can stop
        (``"x" * 10**9``, ``9 ** 10**9``, ``"%999999999d" % 1``)."""
        if operator == "+":
            if (isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES)
                    and len(left) + len(right) > MAX_PART_CHARS):  # fmt: skip
                _refuse("the + operator", len(left) + len(right), "characters or items")
            return left + right
        if operator == "%":
            if isinstance(left, str | bytes):
                fmt = left if isinstance(left, str) else left.decode("latin-1")
                if (size := _percent_length(fmt, right)) > MAX_PART_CHARS:
                    _refuse("the % operator", size)
            return left % right
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, _SEQUENCES) and isinstance(times, int) and len(seq) * times > MAX_PART_CHARS:
                    raise ValueError(f"a repetition of {len(seq):,} items {times:,} times is more than the "
                                     f"{MAX_PART_CHARS:,} a template may build")  # fmt: skip
            return left * right
        if (isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1
                and right * math.log10(abs(left)) > MAX_PART_CHARS):  # fmt: skip
            raise ValueError(f"{left} ** {right} has more than the {MAX_PART_CHARS:,} digits a template may build")
        return left**right

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        """Every call a template makes: the methods of ``str``, ``bytes`` and ``int`` that build a larger value
        (``"x".ljust(10**9)``, ``sep.join(…)``, ``(1).to_bytes(10**9)``) are refused beyond the limit."""
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str | bytes | int):
            name = getattr(__obj, "__name__", "")
            if name == "join" and len(args) == 1 and not kwargs and not isinstance(owner, int):
                items = _take(args[0], f"{type(owner).__name__}.join")
                size = sum(map(_str_length, items)) + len(owner) * max(len(items) - 1, 0)
                if size > MAX_PART_CHARS:
                    _refuse(f"{type(owner).__name__}.join", size)
                args = (items,)
            elif (size_of := _METHOD_SIZES.get(name)) is not None:
                size = size_of(owner, args, kwargs)
                if size > MAX_PART_CHARS:
                    _refuse(f"{type(owner).__name__}.{name}", size, "characters" if isinstance(owner, str) else "bytes")
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """Jinja2's own (``str.format`` and ``format_map`` through the sandbox's formatter), with the bounded
        formatter."""
        if not isinstance(value, types.MethodType | types.BuiltinMethodType) or value.__name__ not in (
            "format",
            "format_map",
        ):
            return None
        f_self: Any = value.__self__
        if not isinstance(f_self, str):
            return None
        str_type: type[str] = type(f_self)
        is_format_map = value.__name__ == "format_map"
        formatter: _BoundedFormatter
        if isinstance(f_self, Markup):
            formatter = _BoundedEscapeFormatter(self, escape=f_self.escape)
        else:
            formatter = _BoundedFormatter(self)
        vformat = formatter.vformat

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                kwargs = args[0]
                args = ()
            return str_type(vformat(f_self, args, kwargs))

        return functools.update_wrapper(wrapper, value)


_SEQUENCES = (str, bytes, list, tuple)


class RenderStopped(BaseException):
    """Raised by ``_Watchdog`` in a thread whose render it stops. A ``BaseException``: Jinja2's sandbox swallows
    any ``Exception`` in some lookups (``d['x'] is defined``), which would lose the stop."""


class RenderTimeout(RenderStopped):
    """The render ran past its time limit."""


class RenderOutOfMemory(RenderStopped):
    """The process's memory grew by more than ``RENDER_MEMORY_BYTES`` while the render ran."""


RENDER_MEMORY_BYTES = 512 << 20
"""How much this process's resident memory may grow while one render runs (``_Watchdog``): a hundred times what
the largest email takes (three parts of ``MAX_PART_CHARS``), far less than a machine has. A template that keeps
every value it builds (a loop nesting each 1 MB string in the next) took memory as fast as the machine gave it,
until the time limit (up to 60 s: tens of GB), where the render helper's ``RLIMIT_AS`` bounds it; in the
sender's own process no such limit can be set."""
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _resident_bytes() -> int | None:
    """This process's resident memory, or None where ``/proc`` does not tell it (the time limit still holds)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


class _Watchdog:
    """Stops renders that run too long: a thread of its own (one per process, started with the first bounded
    render) raises ``RenderTimeout`` in a rendering thread past its deadline (``RenderOutOfMemory`` once the
    process's resident memory has grown by more than ``RENDER_MEMORY_BYTES`` since the watchdog first saw the
    render running: measured from its first look, not from the render's start, so that what the process took
    just before, a batch's facts, is not counted), with CPython's ``PyThreadState_SetAsyncExc``. The exception
    lands at the thread's next bytecode boundary (a template's loop is Python bytecode), so a ``{% for %}`` that
    never ends is stopped; one long step of C is stopped only when it returns (hence ``call_binop``). It fires
    only while the thread runs the render's own code (its innermost frame is the template's, or Jinja2's,
    MarkupSafe's or a codec's, ``_RENDER_CODE``), never while it is somewhere else (a garbage collector's
    callback that runs in the thread, say): it lands there or in what that code calls. Should something swallow
    it, it fires again every ``REFIRE_SECONDS`` while the render goes on. It lands inside ``render`` at the
    latest as disarming begins; disarming also takes back one still pending, so none surfaces after."""

    POLL_SECONDS = 0.05
    """How often the watchdog looks (a render is stopped at most this late); arming costs a lock, no wake-up."""
    REFIRE_SECONDS = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: dict[int, list[Any]] = {}
        """thread id -> [deadline (monotonic), when it last fired or None, the folders of the render's code, the
        process's resident memory when the watchdog first saw the render (bytes; None until then, and where it
        cannot be read)]"""
        self._pid: int | None = None
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        """A forked child has none of the parent's threads: a fresh lock (the watchdog may have held it at the
        fork), nothing armed, and a watchdog of its own at its first render."""
        self._lock = threading.Lock()
        self._armed = {}
        self._pid = None

    def arm(self, seconds: float, code: tuple[str, ...]) -> None:
        """Stop this thread's render after ``seconds``, while it runs code from a file under one of the folders
        ``code`` names (the templates', Jinja2's, MarkupSafe's)."""
        ident = threading.get_ident()
        with self._lock:
            self._armed[ident] = [time.monotonic() + seconds, None, code, None]
            if self._pid != os.getpid():  # the first bounded render in this process (or a forked child)
                self._pid = os.getpid()
                threading.Thread(target=self._watch, name="kembali-render-watchdog", daemon=True).start()

    def disarm(self) -> None:
        ident = threading.get_ident()
        with self._lock:
            entry = self._armed.pop(ident, None)
            if entry is not None and entry[1] is not None:
                _async_exc(ident, None)  # fired but maybe not landed (the thread was in C): take it back

    def _watch(self) -> None:
        while True:
            time.sleep(self.POLL_SECONDS)
            now = time.monotonic()
            resident = _resident_bytes() if self._armed else None
            with self._lock:
                due: list[tuple[int, list[Any], type[RenderStopped]]] = []
                for ident, entry in self._armed.items():
                    if entry[3] is None:
                        entry[3] = resident
                    if entry[1] is not None and now - entry[1] < self.REFIRE_SECONDS:
                        continue
                    if entry[0] <= now:
                        due.append((ident, entry, RenderTimeout))
                    elif resident is not None and entry[3] is not None and resident - entry[3] > RENDER_MEMORY_BYTES:
                        due.append((ident, entry, RenderOutOfMemory))
                if not due:
                    continue
                frames = sys._current_frames()
                for ident, entry, stop in due:
                    frame = frames.get(ident)
                    if frame is not None and frame.f_code.co_filename.startswith(entry[2]):
                        entry[1] = now
                        _async_exc(ident, stop)


def _async_exc(ident: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None if exc is None else ctypes.py_object(exc))


_RENDER_CODE = tuple(os.path.dirname(m.__file__ or "") + os.sep for m in (jinja2, markupsafe, encodings))
"""The folders of the code a render runs besides the template's own: with the standard library's codecs written
in Python, which a template can run for long in one call (``s.encode("punycode")`` takes time quadratic in the
letters of ``s``: ~10 s for 10,000 different ones), where the watchdog never fired."""
_WATCHDOG = _Watchdog()


_STRAY = re.compile(r"\}\}|(?<!\d)%\}|[{}]")
"""What closes a tag, met in a file's text (``JinjaTemplates._stray_delimiters``), and the braces it counts: a ``}}``
closing two ``{`` of the text is CSS's or JSON's (a partial of styles, a layout's CSS block, a data attribute), as is
a ``%}`` after a digit (``width:100%}``)."""
_HIDDEN = re.compile(r"<(style|script)\b.*?(?:</\1\s*>|\Z)", re.S | re.I)
"""An HTML part's CSS and scripts, whose braces are their own."""

_REFERENCES = (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)
"""The tags that name another template file."""


class JinjaTemplates:
    """``TemplateRenderer`` over a directory of Jinja2 templates."""

    def __init__(self, root: Path, *, recheck_seconds: float | None = 0.0,
                 time_limit: float | None = DEFAULT_TIME_LIMIT) -> None:  # fmt: skip
        self.root = Path(root).resolve()
        self.recheck_seconds = recheck_seconds
        self.time_limit = time_limit
        """Seconds one message's three parts may take to render (None: no limit)."""
        self._render_code = (str(self.root) + os.sep, *_RENDER_CODE)
        """The folders of the code this renderer's renders run (``_Watchdog.arm``)."""
        self._checked_at: float | None = None
        """When the files were last compared with the cached versions (monotonic), with recheck_seconds > 0."""
        self._env = _Sandbox(
            loader=jinja2.FileSystemLoader(self.root, encoding="utf-8-sig"),  # without the BOM an editor may write
            undefined=_Undefined,
            autoescape=jinja2.select_autoescape(enabled_extensions=("html", "htm"), default_for_string=False),
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            auto_reload=recheck_seconds == 0,  # otherwise _recheck decides when to look
        )
        self._env.filters["money"] = _money_filter
        self._env.filters["date"] = _date_filter
        self._versions: dict[tuple[str, str], tuple[_Signature, str]] = {}
        self._generated: set[tuple[str, int, int]] = set()
        """Files (name, mtime, size) Jinja2's code generator took: a layout is checked once, not per folder."""

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

    def missing_parts(self, campaign: str) -> list[str]:
        """The files of ``PARTS`` a campaign folder lacks in any locale (``winback/en/body.txt``…), in order."""
        return [f"{campaign}/{loc}/{part}" for loc in Locale for part in PARTS
                if not (self.root / campaign / loc / part).is_file()]  # fmt: skip

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

    def _source(self, name: str) -> str:
        """A template file's text: UTF-8, without a byte order mark; else a TemplateError at the first line that
        is not (an editor saving Latin-1 or Windows-1252 made a render fail at the line that included it)."""
        data = self._read(name)
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line, what = not_utf8(exc)
            raise TemplateError(f"{what}: save the file as UTF-8", template=name, line=line) from None

    def _exists(self, name: str) -> bool:
        """Whether the loader finds ``name`` (no ``..``, a file under the root)."""
        try:
            parts = split_template_path(name)
        except jinja2.TemplateNotFound:
            return False
        return self.root.joinpath(*parts).is_file()

    def _files_used(self, campaign: str, locale: str, parts: tuple[str, ...] = PARTS) -> set[str]:
        seen: set[str] = set()
        stack = [f"{campaign}/{locale}/{part}" for part in reversed(parts)]  # popped in order: subject.txt first
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            if not (self.root / name).is_file():
                raise TemplateError("template not found", template=name)
            seen.add(name)
            signature = self._signature([name])  # before the read: a file saved meanwhile is checked again
            source = self._source(name)
            try:
                tree = self._env.parse(source, name, str(self.root / name))
            except jinja2.TemplateSyntaxError as exc:
                message = _syntax_message(exc, self._env, source)
                raise TemplateError(message, template=name, line=exc.lineno) from None
            references = list(tree.find_all(_REFERENCES))
            if not signature or signature[0] not in self._generated:
                if (unknown := _unknown_filter_or_test(self._env, tree)) is not None:  # in an {% if %} too
                    raise TemplateError(f"syntax error: {unknown.message}", template=name, line=unknown.lineno)
                try:  # what the parser lets through and Jinja2's code generator refuses
                    self._env.compile(tree, name, str(self.root / name), raw=True)
                except jinja2.TemplateSyntaxError as exc:
                    raise TemplateError(f"syntax error: {exc.message}", template=name, line=exc.lineno) from None
                self._generated.update(signature)
            for node in references:
                assert isinstance(node, _REFERENCES)
                names = _template_names(node.template)
                if not names:  # a computed name: count every shared file
                    stack += [p.relative_to(self.root).as_posix() for p in self.root.rglob("_*") if p.is_file()]
                    continue
                found = next((n for n in names if self._exists(n)), None)  # Jinja2 takes a list's first one
                if found is not None:
                    stack.append(found)
                elif not getattr(node, "ignore_missing", False):  # else Jinja2 renders nothing in its place
                    raise TemplateError(f"template not found: {' or '.join(names)}", template=name, line=node.lineno)
        return seen

    # --- static checks -----------------------------------------------------

    def unescaped_sites(self, campaign: str, locale: str) -> list[tuple[str, int]]:
        """Where the HTML part of the folder ``campaign/locale`` (body.html and the files it uses) lets a value out
        unescaped: a ``| safe`` on what is not a constant (``{% filter safe %}`` too), ``{% autoescape false %}``,
        an include of a file that is not HTML (a text file is not escaped); (file, line), the part's own first.
        Files that cannot be read or parsed give none (the render names those)."""
        try:
            used = self._files_used(campaign, locale, ("body.html",))
        except TemplateError:
            return []
        found: list[tuple[str, int]] = []
        for name in sorted(used, key=lambda n: (not n.startswith(f"{campaign}/"), n)):
            if not name.endswith(_HTML):
                continue
            try:
                tree = self._env.parse(self._source(name), name, str(self.root / name))
            except (TemplateError, jinja2.TemplateSyntaxError):
                continue
            found += [(name, line) for line in _unescaping_lines(tree)]
        return found

    def files(self) -> list[str]:
        """Every template file under the root (``.html``/``.txt``), relative, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file() and p.suffix in (".html", ".htm", ".txt") and not p.name.startswith(".")
        )

    def stray_text(self, skip: Iterable[str] = ()) -> list[StrayText]:
        """Text a file that extends a layout writes outside any ``{% block %}``: after the ``{% extends %}`` Jinja2
        drops it (a child template sends only its blocks), before it the text comes ahead of the layout's first
        line. Neither is an error (the email renders), so ``kembali check`` notes it. Files of the ``skip``
        folders, and files that do not parse (``lint`` reports those), are left out."""
        skipped = tuple(f"{folder}/" for folder in skip)
        found: list[StrayText] = []
        for name in self.files():
            if skipped and name.startswith(skipped):
                continue
            try:
                tree = self._env.parse(self._source(name), name, str(self.root / name))
            except (TemplateError, jinja2.TemplateSyntaxError):
                continue
            layout = next((i for i, node in enumerate(tree.body) if isinstance(node, nodes.Extends)), None)
            if layout is None:
                continue
            for index, node in enumerate(tree.body):
                for output in _outputs_outside_blocks(node):
                    if (shown := _shown(output)) is not None:
                        found.append(StrayText(name, shown[0], shown[1], before_layout=index < layout))
        return found

    def lint(self, known: Mapping[str, Iterable[str]], skip: Iterable[str] = ()) -> list[TemplateError]:
        """Parse every file: syntax errors, and variables a file reads that its context lacks.

        ``known`` maps a campaign folder to the context keys its templates receive;
        the key ``""`` is for shared files (``_layout.html``…). A variable that is
        read but neither known, set in the template, nor a Jinja2 global is reported
        with the line it is first read on, even in a branch no sample takes.

        A file that another one includes by name (``{% include "_coupon.html" %}``)
        is checked at each place it is included, with what Jinja2 passes it there:
        the including file's variables plus the names that file has set before the
        include (``{% set %}``, ``{% with %}``, the loop variable of an enclosing
        ``{% for %}``); ``without context``, only the Jinja2 globals. A variable it
        lacks is reported at the included file's line, naming where it was included.

        The files of the ``skip`` folders are not checked (folders no campaign sends from).
        """
        problems: list[TemplateError] = []
        lint = _Lint(self, problems)
        skipped = tuple(f"{folder}/" for folder in skip)  # folders no campaign sends from: not checked at all
        files = [name for name in self.files() if not (skipped and name.startswith(skipped))]
        trees = {name: lint.tree(name) for name in files}
        included = {target for name, tree in trees.items() if tree is not None
                    for site in lint.scopes(name, tree).includes for target in site.targets}  # fmt: skip
        for name in files:
            if (tree := trees[name]) is not None:
                problems += self._stray_delimiters(name)
                problems += self._imports_missing(name, tree, lint)
        for name in files:
            tree = trees[name]
            entry = name.count("/") == 2 and name.rsplit("/", 1)[1] in PARTS
            if tree is None or (name in included and not entry):
                continue
            folder = name.split("/", 1)[0] if "/" in name else ""
            allowed = set(known.get(folder, known.get("", ()))) | set(self._env.globals)
            lint.check(name, tree, frozenset(allowed), ())
        return problems + lint.undefined_in_includes()

    def _imports_missing(self, name: str, tree: nodes.Template, lint: _Lint) -> list[TemplateError]:
        """A ``{% from "_macros.html" import buton %}`` whose file has no such macro: Jinja2 fails only the renders
        that call it (those in a branch no sample takes are never found by rendering)."""
        found = []
        for node in tree.find_all(nodes.FromImport):
            target = next((n for n in _template_names(node.template) if self._exists(n)), None)
            source = lint.tree(target) if target is not None else None
            if source is None:
                continue  # not there (reported with the includes), computed, or not parsed (reported)
            exported = sorted(_exported(source.body))
            for imported in node.names:
                wanted = imported if isinstance(imported, str) else imported[0]
                if wanted not in exported:
                    has = f"it has: {', '.join(exported)}" if exported else "it has none"
                    found.append(TemplateError(f"undefined variable '{wanted}': {target} has no macro '{wanted}' "
                                               f"({has})", template=name, line=node.lineno))  # fmt: skip
        return found

    def _stray_delimiters(self, name: str) -> list[TemplateError]:
        """A ``}}`` or ``%}`` in a file's text, where Jinja2 prints it as it is: ``{ customer.name }}`` (a ``{``
        missing) or ``{{ shop.name }}}}``, in every email. Not in a ``{% raw %}`` block, nor, in HTML, inside
        ``<style>`` or ``<script>`` (a media query's rules end in ``}}``), nor where it closes braces the text opened
        (CSS kept in a partial or a block the layout puts in its ``<style>``, JSON in an attribute)."""
        pieces: list[tuple[int, int, str]] = []
        """(offset in ``text``, line, the data) of each piece of text outside tags and raw blocks."""
        text = ""
        raw = False
        for line, kind, value in self._env.lex(self._source(name), name):
            if kind in ("raw_begin", "raw_end"):
                raw = kind == "raw_begin"
            elif kind == "data" and not raw:
                pieces.append((len(text), line, value))
                text += value
                continue
            text += "\0"  # a tag: no '}}' across it
        if name.endswith((".html", ".htm")):
            text = _HIDDEN.sub(lambda m: "\0" * len(m[0]), text)
        found = []
        depth = 0  # the braces the text opened and has not closed
        for m in _STRAY.finditer(text):
            if m[0] == "{" or (m[0] == "}}" and depth >= 2) or m[0] == "}":
                depth = depth + 1 if m[0] == "{" else max(0, depth - len(m[0]))
                continue
            depth = max(0, depth - 1)
            start, line, value = pieces[bisect.bisect_right([p[0] for p in pieces], m.start()) - 1]
            line += value[: m.start() - start].count("\n")
            opening = "{{" if m[0] == "}}" else "{%"
            found.append(TemplateError(
                f"syntax error: '{m[0]}' is printed as text: a '{opening}' missing before it, or one '{m[0]}' "
                f"too many? (to print the characters themselves: {{{{ '{m[0]}' }}}})", template=name, line=line))
        return found

    # --- rendering ---------------------------------------------------------

    def load(self, campaign: str, locale: Locale | str) -> str:
        """Compile every file a render of ``campaign``/``locale`` uses (its parts, and the layouts and partials they
        use) into the cache, and return its version: what ``render`` does before the clock starts, so that a cold
        cache's compile (seconds for a long template on a loaded machine) is not taken for the render's time. A
        file that cannot be loaded is left for the render, which reports it at its line."""
        loc = Locale(locale)
        version = self.template_version(campaign, loc)
        cached = self._versions.get((campaign, str(loc)))
        names = [name for name, _, _ in cached[0]] if cached and cached[0] else []
        for name in names or [f"{campaign}/{loc}/{part}" for part in PARTS]:
            with contextlib.suppress(Exception):  # _render loads it again and reports what is wrong, at its line
                self._env.get_template(name)
        return version

    def render(self, campaign: str, locale: Locale, context: Mapping[str, object]) -> RenderedEmail:
        loc = Locale(locale)
        folder = f"{_check_name(campaign)}/{loc}"
        ctx = dict(context)
        ctx["locale"] = str(loc)
        subject_name = f"{folder}/subject.txt"
        if self.time_limit is None:
            return self._parts(folder, ctx, self.template_version(campaign, loc))
        version = self.load(campaign, loc)  # compiled before the clock starts
        try:
            _WATCHDOG.arm(self.time_limit, self._render_code)
            try:
                return self._parts(folder, ctx, version)
            finally:
                _WATCHDOG.disarm()
        except RenderStopped as exc:  # landed between two parts, or as the render ended (as disarming began)
            _WATCHDOG.disarm()
            raise TemplateError(self._stopped(exc), template=subject_name) from None

    def _parts(self, folder: str, ctx: Mapping[str, object], version: str) -> RenderedEmail:
        subject_name = f"{folder}/subject.txt"
        subject = " ".join(self._render(subject_name, ctx).split())
        if not subject:
            raise TemplateError("the subject is empty", template=subject_name)
        html = self._render(f"{folder}/body.html", ctx)
        text = self._render(f"{folder}/body.txt", ctx)
        return RenderedEmail(subject=subject, html=html, text=text, template_version=version)

    def _stopped(self, stop: RenderStopped) -> str:
        if isinstance(stop, RenderOutOfMemory):
            return (f"the render took more than {RENDER_MEMORY_BYTES >> 20} MB of memory and was stopped (a loop that "
                    "keeps every value it builds?)")
        return f"the render took more than {self.time_limit:g} s and was stopped (a loop that does not end?)"

    def _render(self, name: str, ctx: Mapping[str, object]) -> str:
        try:
            out = self._env.get_template(name).render(ctx)
        except jinja2.TemplateSyntaxError as exc:
            syntax_file = self._relative(exc.filename) or exc.name or name
            raise TemplateError(f"syntax error: {exc.message}", template=syntax_file, line=exc.lineno) from None
        except RenderStopped as exc:
            tb = exc.__traceback__
            try:  # Jinja2 maps its frames to template lines for an Exception only: ask it to, for this one too
                self._env.handle_exception()
            except RenderStopped as mapped:
                tb = mapped.__traceback__
            where, line = self._locate(tb)
            raise TemplateError(self._stopped(exc), template=where or name, line=line) from None
        except Exception as exc:
            where, line = self._locate(exc.__traceback__)
            if isinstance(exc, _TooLong) and exc.at is not None:  # where the template's output passed the limit
                where, line = exc.at
            if isinstance(exc, jinja2.TemplateNotFound):
                message = f"template not found: {exc.name}"
            elif isinstance(exc, _TooLong):
                message = str(exc)
            elif isinstance(exc, MemoryError):
                message = "MemoryError: the render ran out of memory (a loop that keeps every value it builds?)"
            else:
                message = f"{type(exc).__name__}: {exc}"
            raise TemplateError(message, template=where or name, line=line) from None
        if len(out) > MAX_PART_CHARS:
            raise TemplateError(f"the rendered part is {len(out):,} characters long, more than the "
                                f"{MAX_PART_CHARS:,} an email part may have", template=name)  # fmt: skip
        if not out.isascii():
            try:
                out.encode("utf-8")
            except UnicodeEncodeError as exc:  # data never holds one (clean_text): the template's own text does
                line = out.count("\n", 0, exc.start) + 1
                raise TemplateError(
                    f"line {line} of its output holds {out[exc.start]!r}, half of a character (a lone surrogate, as "
                    "JSON escapes an emoji: \\ud83d\\ude0a), which no email can carry: write the character itself",
                    template=name,
                ) from None
        return out

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


# --- the static check ---------------------------------------------------------------


_Site = tuple[str, int]
"""Where a file is included: the including file and line."""


@dataclass(frozen=True)
class StrayText:
    """Text written outside any block by a file that extends a layout (``JinjaTemplates.stray_text``)."""

    template: str
    line: int
    excerpt: str
    """The text, its expressions shown as ``{{ … }}``, whitespace collapsed, cut at 40 characters."""
    before_layout: bool
    """Before the ``{% extends %}``: sent ahead of the layout's first line; after it, never sent."""


def _outputs_outside_blocks(node: nodes.Node) -> Iterator[nodes.Output]:
    """The output nodes under a top-level node of a template, but those of blocks, macros and ``{% set %}`` blocks
    (whose text is written where they are used)."""
    if isinstance(node, nodes.Block | nodes.Macro | nodes.AssignBlock):
        return
    if isinstance(node, nodes.Output):
        yield node
        return
    for child in node.iter_child_nodes():
        yield from _outputs_outside_blocks(child)


def _shown(output: nodes.Output) -> tuple[int, str] | None:
    """(the line the output's first non-blank text or expression is on, an excerpt of it); None when it writes
    only whitespace."""
    parts: list[str] = []
    line: int | None = None
    for child in output.nodes:
        if isinstance(child, nodes.TemplateData):
            text = child.data
            if line is None and text.strip():
                line = child.lineno + text[: len(text) - len(text.lstrip())].count("\n")
            parts.append(text)
        else:
            line = child.lineno if line is None else line
            parts.append("{{ … }}")
    if line is None:
        return None
    excerpt = " ".join("".join(parts).split())
    return line, excerpt if len(excerpt) <= 40 else excerpt[:39] + "…"


class _Lint:
    """One ``JinjaTemplates.lint`` run: parsed files, and what included files lack at each include."""

    def __init__(self, templates: JinjaTemplates, problems: list[TemplateError]) -> None:
        self.templates = templates
        self.problems = problems
        self._trees: dict[str, nodes.Template | None] = {}
        self._scopes: dict[str, _Scopes] = {}
        self._missing: dict[tuple[str, str], tuple[int | None, list[tuple[_Site, ...]]]] = {}
        """(included file, variable) → (the line it is first read on, the include chains that lack it)."""

    def tree(self, name: str) -> nodes.Template | None:
        """The file parsed (once); None after reporting a syntax error."""
        if name not in self._trees:
            source = ""
            try:
                source = self.templates._source(name)
                tree = self.templates._env.parse(source, name, str(self.templates.root / name))
                if (unknown := _unknown_filter_or_test(self.templates._env, tree)) is not None:  # in an {% if %} too
                    raise unknown
                self.scopes(name, tree)  # runs Jinja2's code generator, which refuses what the parser lets through
                self._trees[name] = tree
            except TemplateError as exc:
                self.problems.append(exc)
                self._trees[name] = None
            except jinja2.TemplateSyntaxError as exc:
                message = _syntax_message(exc, self.templates._env, source)
                self.problems.append(TemplateError(message, template=name, line=exc.lineno))
                self._trees[name] = None
        return self._trees[name]

    def scopes(self, name: str, tree: nodes.Template) -> _Scopes:
        if name not in self._scopes:
            self._scopes[name] = _Scopes(tree)
        return self._scopes[name]

    def check(self, name: str, tree: nodes.Template, allowed: frozenset[str], chain: tuple[_Site, ...]) -> None:
        """Report what ``name`` reads beyond ``allowed``, then check the files it includes.

        ``chain``: the include sites that led here, innermost first (empty for a file checked on its own)."""
        scopes = self.scopes(name, tree)
        for var, line in scopes.undefined(allowed):
            if not chain:
                self.problems.append(TemplateError(f"undefined variable '{var}'", template=name, line=line))
            else:
                self._missing.setdefault((name, var), (line, []))[1].append(chain)
        for site in scopes.includes:
            target = next((t for t in site.targets if self.templates._exists(t)), None)
            if target is None:
                if site.targets and not site.ignore_missing:
                    self.problems.append(TemplateError(f"template not found: {' or '.join(site.targets)}",
                                                       template=name, line=site.line))  # fmt: skip
                continue
            if target == name or any(target == outer for outer, _ in chain):
                continue  # an include loop: Jinja2 would recurse until it gives up
            passed = allowed | site.assigned if site.with_context else frozenset()
            included = self.tree(target)
            if included is not None:
                inner = frozenset(self.templates._env.globals) | passed
                self.check(target, included, inner, ((name, site.line), *chain))

    def undefined_in_includes(self) -> list[TemplateError]:
        """One problem per included file and variable it lacks, naming where it was included without it."""
        out = []
        for (name, var), (line, chains) in sorted(self._missing.items()):
            places = sorted({" in ".join(f"{where}:{at}" for where, at in chain) for chain in chains})
            shown = ", ".join(places[:3]) + (f" and {len(places) - 3} more" if len(places) > 3 else "")
            out.append(TemplateError(f"undefined variable '{var}' (included from {shown})", template=name, line=line))
        return out


@dataclass(frozen=True)
class _IncludeSite:
    targets: tuple[str, ...]
    """The template names (the first that exists is used); empty when computed at render time."""
    line: int
    with_context: bool
    ignore_missing: bool
    assigned: frozenset[str]
    """Names the including file has surely set at this point (Jinja2 passes them on, with context)."""


class _Scopes:
    """Which names a template has surely set where, following Jinja2's scoping rules.

    ``{% set %}`` counts from where it stands to the end of its block, loop,
    ``{% with %}``, macro or filter block; a loop's variables (and ``loop`` when the
    loop body itself reads it) and ``{% with %}`` targets count inside; after an
    ``{% if %}``, only what every branch sets; a ``{% block %}`` sees what the
    template set at its top level (and, when ``scoped``, what encloses it).

    Jinja2's own ``meta.find_undeclared_variables`` also lists a name set inside an
    ``{% if %}`` (it would be looked up in the context when the branch is not taken),
    even where nothing reads it unset: ``undefined`` only keeps the names it lists
    that are read somewhere this analysis cannot show them set.
    """

    def __init__(self, tree: nodes.Template) -> None:
        self.undeclared = meta.find_undeclared_variables(tree)
        """What Jinja2 would look up in the context (a superset of what can be missing)."""
        self.includes: list[_IncludeSite] = []
        self.reads: dict[str, int] = {}
        """Names read where the template has not surely set them → the first such line."""
        self._top: set[str] = set()
        self._body(tree.body, self._top)

    def undefined(self, allowed: Iterable[str]) -> list[tuple[str, int | None]]:
        """The variables the template reads that neither ``allowed`` nor the template itself provides."""
        names = self.undeclared - set(allowed)
        return [(var, self.reads[var]) for var in sorted(names) if var in self.reads]

    def _read(self, expr: nodes.Node | None, scope: set[str]) -> None:
        if expr is None:
            return
        for node in (expr, *expr.find_all((nodes.Name, nodes.NSRef))):
            if isinstance(node, nodes.NSRef) or (isinstance(node, nodes.Name) and node.ctx == "load"):
                name = node.name
                if name not in scope and (name not in self.reads or node.lineno < self.reads[name]):
                    self.reads[name] = node.lineno

    def _body(self, statements: Iterable[nodes.Node], scope: set[str]) -> set[str]:
        for node in statements:
            self._statement(node, scope)
        return scope

    def _statement(self, node: nodes.Node, scope: set[str]) -> None:
        if isinstance(node, nodes.Include):
            self._read(node.template, scope)
            self.includes.append(_IncludeSite(_template_names(node.template), node.lineno, node.with_context,
                                              node.ignore_missing, frozenset(scope)))  # fmt: skip
        elif isinstance(node, nodes.Assign):
            self._read(node.node, scope)
            self._store(node.target, scope)
        elif isinstance(node, nodes.AssignBlock):
            self._read(node.filter, scope)
            self._body(node.body, set(scope))
            self._store(node.target, scope)
        elif isinstance(node, nodes.If):
            self._read(node.test, scope)
            branches: list[Iterable[nodes.Node]] = [node.body, *([elif_] for elif_ in node.elif_), node.else_]
            scope |= set.intersection(*(self._body(branch, set(scope)) for branch in branches))
        elif isinstance(node, nodes.For):
            self._read(node.iter, scope)
            inner = scope | _stored(node.target)
            self._read(node.test, inner)
            if node.recursive or any(_reads(n, "loop") for n in node.body):
                inner.add("loop")
            self._body(node.body, inner)
            self._body(node.else_, set(scope))
        elif isinstance(node, nodes.With):
            for value in node.values:
                self._read(value, scope)
            self._body(node.body, scope | {name for target in node.targets for name in _stored(target)})
        elif isinstance(node, (nodes.Macro, nodes.CallBlock)):
            for default in node.defaults:
                self._read(default, scope)
            if isinstance(node, nodes.CallBlock):
                self._read(node.call, scope)
            special = {name for name in ("caller", "varargs", "kwargs") if any(_reads(n, name) for n in node.body)}
            self._body(node.body, scope | {arg.name for arg in node.args} | special)
            if isinstance(node, nodes.Macro):
                scope.add(node.name)
        elif isinstance(node, nodes.Block):
            self._body(node.body, set(scope) if node.scoped else set(self._top))
        elif isinstance(node, (nodes.Import, nodes.FromImport)):
            self._read(node.template, scope)
            if isinstance(node, nodes.Import):
                scope.add(node.target)
            else:
                scope |= {alias if isinstance(alias, str) else alias[1] for alias in node.names}
        else:  # output, filter blocks, {% autoescape %}…: what is set inside stays inside
            inner = set(scope)
            for child in node.iter_child_nodes():
                if isinstance(child, nodes.Stmt):
                    self._statement(child, inner)
                else:
                    self._read(child, scope)

    def _store(self, target: nodes.Node, scope: set[str]) -> None:
        if isinstance(target, nodes.NSRef):
            self._read(target, scope)  # {% set ns.x = … %} needs ns; it sets no name
        else:
            scope |= _stored(target)


_HTML = (".html", ".htm")
"""The files Jinja2 autoescapes (``select_autoescape``)."""


def _unescaping_lines(tree: nodes.Template) -> list[int]:
    """The lines of ``tree`` (an HTML file's) that let a value out unescaped (``JinjaTemplates.unescaped_sites``)."""
    lines = []
    for node in tree.find_all((nodes.Filter, nodes.ScopedEvalContextModifier, nodes.Include)):
        if isinstance(node, nodes.Filter):
            unescaped = node.name == "safe" and not isinstance(node.node, nodes.Const)  # (None: a filter block's)
        elif isinstance(node, nodes.Include):
            names = _template_names(node.template)
            unescaped = bool(names) and not any(name.endswith(_HTML) for name in names)
        else:
            assert isinstance(node, nodes.ScopedEvalContextModifier)
            unescaped = any(option.key == "autoescape" and not (isinstance(option.value, nodes.Const)
                                                                and option.value.value) for option in node.options)
        if unescaped:
            lines.append(node.lineno)
    return sorted(set(lines))


def _template_names(expr: nodes.Expr) -> tuple[str, ...]:
    if isinstance(expr, nodes.Const):
        value = expr.value
        if isinstance(value, str):
            return (value,)
        if isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
            return tuple(value)
    if isinstance(expr, (nodes.Tuple, nodes.List)) and all(
        isinstance(item, nodes.Const) and isinstance(item.value, str) for item in expr.items
    ):
        return tuple(item.value for item in expr.items)  # type: ignore[attr-defined]
    return ()


def _unknown_filter_or_test(env: jinja2.Environment, tree: nodes.Template) -> jinja2.TemplateSyntaxError | None:
    """The first filter or test ``tree`` uses that ``env`` does not have, as Jinja2's code generator words it.

    Jinja2 refuses one when it compiles the template, but not inside an ``{% if %}`` or ``… if … else …``: there it
    fails as the render reaches it, so only the customers that take the branch find it (each message failed).
    A name the template tests for itself (``{% if "markdown" is filter %}``) is left to the render, as Jinja2 does."""
    guarded = {node.node.value for node in tree.find_all(nodes.Test)
               if node.name in ("filter", "test") and isinstance(node.node, nodes.Const)}  # fmt: skip
    for node in tree.find_all((nodes.Filter, nodes.Test)):
        known = env.filters if isinstance(node, nodes.Filter) else env.tests
        if node.name in known or node.name in guarded:
            continue
        kind = "filter" if isinstance(node, nodes.Filter) else "test"
        close = difflib.get_close_matches(node.name, [n for n in known if n.isidentifier()], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return jinja2.TemplateSyntaxError(f"No {kind} named '{node.name}'.{hint}", node.lineno)
    return None


_OPENING_TAGS = frozenset({"if", "for", "block", "macro", "call", "filter", "with", "set", "autoescape", "trans"})
_INNERMOST = re.compile(r"The innermost block that needs to be closed is '(\w+)'\.")


def _syntax_message(exc: jinja2.TemplateSyntaxError, env: jinja2.Environment, source: str) -> str:
    """``syntax error: …`` for ``exc``; for a tag left open, with the line it opens at. Jinja2 names only the line
    where it noticed (a ``{% endblock %}`` many lines on, the end of the file), where nothing is to be fixed."""
    message = f"syntax error: {exc.message}"
    innermost = _INNERMOST.search(exc.message or "")
    if innermost is None:
        return message
    opened: list[tuple[str, int]] = []
    try:
        tokens = list(env.lex(source))
    except jinja2.TemplateSyntaxError:
        return message
    for i, (line, kind, _) in enumerate(tokens):
        if kind != "block_begin":
            continue
        names = [v for _, k, v in tokens[i + 1 : i + 3] if k == "name"]
        tag = names[0] if names else ""
        if tag in _OPENING_TAGS:
            rest = itertools.takewhile(lambda token: token[1] != "block_end", tokens[i + 1 :])
            if tag != "set" or not any((k, v) == ("operator", "=") for _, k, v in rest):  # {% set x = … %} ends itself
                opened.append((tag, line))
        elif tag.startswith("end") and tag[3:] in _OPENING_TAGS:
            if not opened or opened[-1][0] != tag[3:]:  # where Jinja2 stopped
                if all(opener != tag[3:] for opener, _ in opened):  # an end tag too many, not one missing
                    return (f"{message} This {{% {tag} %}} closes no {{% {tag[3:]} %}}: remove it, or add the "
                            f"{{% {tag[3:]} %}} it was meant to close.")
                break  # it closes an outer tag: the one still open inside it is the one to close
            opened.pop()
    if not opened or opened[-1][0] != innermost[1]:
        return message
    tag, line = opened[-1]
    return f"{message} The {{% {tag} %}} opened at line {line}: close it with {{% end{tag} %}} where it should end."


def _exported(body: list[nodes.Node]) -> set[str]:
    """The names a file's top level exports to ``{% from … import %}``, as Jinja2 does: its macros and sets (a block
    ``{% set x %}…{% endset %}`` too), also inside a top-level ``{% if %}``; not a name starting with ``_``."""
    names: set[str] = set()
    for node in body:
        if isinstance(node, nodes.Macro):
            names.add(node.name)
        elif isinstance(node, nodes.Assign | nodes.AssignBlock):
            names |= _stored(node.target)
        elif isinstance(node, nodes.If):
            names |= _exported([*node.body, *node.elif_, *node.else_])  # an elif is an If
    return {name for name in names if not name.startswith("_")}


def _stored(target: nodes.Node) -> set[str]:
    if isinstance(target, nodes.Name):
        return {target.name}
    return {n.name for n in target.find_all(nodes.Name)}  # a tuple of names


def _reads(node: nodes.Node, name: str) -> bool:
    return any(n.name == name and n.ctx == "load" for n in node.find_all(nodes.Name))


def _check_name(campaign: str) -> str:
    if not _NAME.fullmatch(campaign):
        raise TemplateError(f"not a campaign name: {campaign!r}")
    return campaign
