"""Template and config checks: what `kembali check` reports and the live preview shows.

``check_templates(settings, renderer)`` renders every campaign's templates, in
every language, for every sample customer of ``core.samples`` (through the same
context building and MIME writer the sender uses) and returns a ``Problem`` for:
syntax errors and undefined variables (file and line; undefined variables are
also found statically, in branches no sample reaches), a missing file, a text
part that comes out empty, an HTML part over ``checks.html_max_bytes``, a render
stopped after ``checks.render_timeout_seconds`` (when the renderer enforces it:
``adapters.render_worker.TimeLimitedRenderer``), an empty or too long subject,
data that comes out unescaped in HTML (at the line of the `| safe` that lets it out,
``locate_unescaped``), and a missing unsubscribe link or postal
address. An empty list means all is well.
"""

from __future__ import annotations

import dataclasses
import enum
import html
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from worker import contexts, planning
from worker.config import Settings
from worker.core import campaigns as cc
from worker.core import samples
from worker.core.audiences import WINBACK
from worker.core.policy import zone_of
from worker.core.render import TemplateRenderer, build_context, build_message
from worker.domain import ClaimedMessage, Locale, RenderedEmail, SendTimeFacts
from worker.errors import TemplateError
from worker.pipeline import BatchFacts, Composer, enabled_campaigns

SAMPLE_NOW = datetime(2026, 1, 15, 3, 0, tzinfo=UTC)
SAMPLE_LINK_KEY = b"kembali-sample-key-for-checks-only"
"""Signs sample unsubscribe links (samples only; real messages use the key from the environment)."""


class Kind(enum.StrEnum):
    """What is wrong."""

    CONFIG = "config"
    """A setting that cannot work (a secret missing from the environment…)."""
    MISSING = "missing"
    """A template file is missing."""
    SYNTAX = "syntax"
    """A template does not parse."""
    UNDEFINED = "undefined"
    """A template reads a variable its context does not have."""
    RENDER = "render"
    """Rendering failed for another reason (a filter given the wrong type…)."""
    TIMEOUT = "timeout"
    """Rendering took too long and was stopped."""
    TEXT_EMPTY = "text_empty"
    """The plain-text part came out empty."""
    HTML_TOO_BIG = "html_too_big"
    """The HTML part is over ``checks.html_max_bytes``."""
    SUBJECT_EMPTY = "subject_empty"
    """The subject came out empty."""
    SUBJECT_TOO_LONG = "subject_too_long"
    """The subject is over ``checks.subject_max_chars``."""
    UNESCAPED = "unescaped"
    """Data came out as raw HTML (``| safe`` on customer or product data?)."""
    NO_UNSUBSCRIBE = "no_unsubscribe"
    """A part lacks the unsubscribe link."""
    NO_POSTAL_ADDRESS = "no_postal_address"
    """A part lacks the shop's postal address."""
    MESSAGE = "message"
    """The MIME message could not be written."""


@dataclass(frozen=True)
class Problem:
    kind: Kind
    message: str
    template: str = ""
    line: int | None = None
    campaign: str = ""
    locale: str = ""
    samples: tuple[str, ...] = ()
    """The sample customers it happened for (empty: found without rendering)."""

    @property
    def where(self) -> str:
        return self.template + (f":{self.line}" if self.line else "")

    def __str__(self) -> str:
        head = f"{self.where}: {self.message}" if self.where else self.message
        scope = "/".join(p for p in (self.campaign, self.locale) if p)
        if self.samples:
            shown = ", ".join(self.samples[:4]) + (f" +{len(self.samples) - 4}" if len(self.samples) > 4 else "")
            scope = f"{scope}, samples: {shown}" if scope else f"samples: {shown}"
        return f"{head} [{scope}]" if scope else head

    def as_json(self) -> dict[str, object]:
        return {"kind": self.kind.value, "message": self.message, "template": self.template, "line": self.line,
                "campaign": self.campaign, "locale": self.locale, "samples": list(self.samples)}  # fmt: skip


class Lintable(Protocol):
    def lint(self, known: Mapping[str, Iterable[str]], skip: Iterable[str] = ()) -> list[TemplateError]: ...

    def campaigns(self) -> list[str]: ...


class Unescaping(Protocol):
    def unescaped_sites(self, campaign: str, locale: str) -> list[tuple[str, int]]: ...


def locate_unescaped(problems: list[Problem], renderer: object) -> list[Problem]:
    """``problems`` with each ``unescaped`` one (found in the rendered HTML, which says no line) put at the line that
    lets data out: the first ``| safe`` on a value, ``{% autoescape false %}`` or include of a text file the HTML part
    reaches, the others named in its message. One the renderer cannot place (no such line) stays as it was."""
    if not hasattr(renderer, "unescaped_sites"):
        return problems
    finder: Unescaping = renderer
    sites: dict[tuple[str, str], list[tuple[str, int]]] = {}
    out = []
    for p in problems:
        if p.kind is Kind.UNESCAPED and p.line is None:
            key = (p.campaign, p.locale)
            if key not in sites:
                sites[key] = finder.unescaped_sites(*key)
            found = sites[key]
            if found:
                (template, line), others = found[0], found[1:]
                also = f"; also {', '.join(f'{t}:{n}' for t, n in others)}" if others else ""
                p = dataclasses.replace(p, template=template, line=line, message=f"{p.message}{also}")
        out.append(p)
    return out


# --- rendering the samples ---------------------------------------------------------


@dataclass(frozen=True)
class SampleRender:
    campaign: str
    locale: Locale
    sample: samples.Sample
    context: dict[str, object] = field(default_factory=dict)
    rendered: RenderedEmail | None = None
    data: bytes | None = None
    """The MIME message, when it could be built."""
    error: TemplateError | None = None


def _facts(sample: samples.Sample) -> BatchFacts:
    catalogue = samples.catalogue(sample)
    customer = sample.customer
    launched = samples.launched(sample)  # a day ago, after their last order: news for the new-products email
    last_order_at = SAMPLE_NOW - timedelta(days=7) if launched else SAMPLE_NOW
    return BatchFacts(
        customers={customer.id: SendTimeFacts(customer=customer, suppressed=False,
                                              order_count=samples.SAMPLE_ORDER_COUNT,
                                              last_order_at=last_order_at)},
        order_products={samples.SAMPLE_ORDER_ID: samples.bought_by(sample)},
        catalogue=catalogue,
        customer_products={customer.id: samples.bought_by(sample)} if launched else {},
        launches=[cc.Launch(p, SAMPLE_NOW - timedelta(days=1)) for p in launched],
    )  # fmt: skip


def _sample_message(
    folder: str, sample: samples.Sample, settings: Settings, now: datetime = SAMPLE_NOW
) -> ClaimedMessage:
    """A message of the template folder ``folder`` (a win-back step's: that step's, ``contexts.sent_as``)."""
    campaign, step = contexts.sent_as(settings, folder)
    birthday = contexts.birthday_to_show(settings, sample.customer, now)
    if sample.birthday_today:  # the birthday templates' other branch: the offer goes on the day (days_to_birthday 0)
        birthday = cc.local_today(now, zone_of(sample.customer.time_zone, settings.shop.time_zone)).isoformat()
    payload = {**samples.SAMPLE_PAYLOAD, "template": folder, "birthday": birthday}
    spend = planning.loyalty_milestones(settings).spend_minor
    if sample.spend_milestone and spend:  # the loyalty templates' other branch, labelled as planning labels it
        payload["milestone"] = f"spend-{spend[0]}"
    return ClaimedMessage(
        id=0, dedupe_key=f"sample:{folder}:{sample.slug}", campaign=campaign, step=step,
        customer_id=sample.customer.id, email=sample.customer.email,
        message_id=f"<sample-{folder}-{sample.slug}@{settings.shop.domain}>", attempts=0, due_at=SAMPLE_NOW,
        expires_at=SAMPLE_NOW, payload=payload,
    )  # fmt: skip


def composer_for_samples(settings: Settings, renderer: TemplateRenderer) -> Composer:
    return Composer(settings, renderer, SAMPLE_LINK_KEY)


def render_sample(
    composer: Composer, campaign: str, locale: Locale, sample: samples.Sample, now: datetime = SAMPLE_NOW
) -> SampleRender:
    """One sample through the sender's context building, the renderer and the MIME writer."""
    message = _sample_message(campaign, sample, composer.settings, now)
    customer = sample.customer
    unsubscribe = composer.unsubscribe_url(customer)
    try:
        context = build_context(message.campaign, customer, shop=composer.shop, unsubscribe_url=unsubscribe,
                                extra=composer.extra_context(message, _facts(sample)))  # fmt: skip
    except (KeyError, ValueError, TypeError) as exc:
        error = TemplateError(f"cannot build the sample context: {type(exc).__name__}: {exc}")
        return SampleRender(campaign, locale, sample, error=error)
    try:
        rendered = composer.renderer.render(campaign, locale, context)
    except TemplateError as exc:
        return SampleRender(campaign, locale, sample, context, error=exc)
    try:
        data = build_message(
            rendered, to_name=customer.name, to_address=customer.email, shop=composer.shop,
            message_id=message.message_id, date=now, list_unsubscribe_https=unsubscribe,
            list_unsubscribe_mailto=composer.settings.unsubscribe.mailto,
            extra_headers=(("X-Kembali-Campaign", campaign),),
        )  # fmt: skip
    except ValueError as exc:
        return SampleRender(campaign, locale, sample, context, rendered,
                            error=TemplateError(f"cannot build the message: {exc}"))  # fmt: skip
    return SampleRender(campaign, locale, sample, context, rendered, data)


def required_folders(settings: Settings) -> list[str]:
    """The template folders sending will use: each enabled campaign's, and for win-back each step's own
    (``[[campaigns.winback.steps]]``'s ``template``), in place of the campaign's name."""
    folders: list[str] = []
    for campaign in enabled_campaigns(settings):
        if campaign == "winback":
            folders += [step.template for step in settings.campaigns.winback.effective_steps]
        else:
            folders.append(campaign)
    return list(dict.fromkeys(folders))


def folder_setting(settings: Settings, folder: str) -> str:
    """The setting that names a folder sending uses (``required_folders``): the first win-back step's ``template``
    naming it, else ``templates.dir``, where each campaign's folder is looked for by the campaign's name."""
    steps = [step.template for step in settings.campaigns.winback.effective_steps] if WINBACK in \
        enabled_campaigns(settings) else []  # fmt: skip
    if folder in steps and folder != WINBACK:
        return f"campaigns.winback.steps[{steps.index(folder)}].template"
    return "templates.dir"


def _no_folder(settings: Settings, folder: str) -> str:
    """Why a folder sending uses has no file at all: a name misspelt in the config, or templates.dir one level off."""
    key = folder_setting(settings, folder)
    if key == "templates.dir":
        return (f"template not found: there is no folder {folder}/ at all in 'templates.dir' (one level off?"
                f"{folder_meant(settings, folder)})")
    return f"template not found: there is no folder {folder}/ at all, the one '{key}' names (misspelt?)"


def folder_meant(settings: Settings, folder: str) -> str:
    """When templates.dir has no ``folder/``: " FOLDER holds the campaigns' folders: set templates.dir to it" for the
    one next to it that has (its parent, ``templates/email/`` for ``templates/email/winback/``, or one of its own
    folders, ``templates/email/`` for ``templates/``), else ""."""
    root = settings.resolve(settings.templates.dir).resolve()
    try:
        near = [root.parent, *sorted(path for path in root.iterdir() if path.is_dir())]
    except OSError:  # no such folder: said on its own
        return ""
    meant = next((path for path in near if (path / folder).is_dir()), None)
    return f" {meant} holds the campaigns' folders: set templates.dir to it" if meant is not None else ""


def campaigns_to_check(settings: Settings, renderer: object) -> list[str]:
    """The folders sending will use (``required_folders``), and any other campaign folder on disk."""
    found = renderer.campaigns() if hasattr(renderer, "campaigns") else []
    return sorted((set(required_folders(settings)) | set(found)) - set(unused_folders(settings, renderer)))


def unused_folders(settings: Settings, renderer: object) -> list[str]:
    """Folders on disk that no campaign can send from (a copy kept as a backup, ``birthday-old``, ``winback-2.bak``):
    not checked, as there is no campaign's variables to render them with; `kembali check` names them in a note.
    A folder is win-back's only when a step sends from it (``contexts.step_folders``), not for its name: the
    backup ``winback-last-old`` was checked as a step's and could fail the check, and stop a daemon starting."""
    found = set(renderer.campaigns() if hasattr(renderer, "campaigns") else [])
    # and a folder whose name no campaign's can have (``birthday.bak``): never rendered, but the scan read its files
    files: list[str] = renderer.files() if hasattr(renderer, "files") else []
    found |= {path[0] for path in (f.split("/") for f in files)
              if len(path) == 3 and path[1] in {loc.value for loc in Locale} and path[2] == "subject.txt"}  # fmt: skip
    used = set(required_folders(settings)) | contexts.step_folders(settings)  # a step's, even with win-back off
    return sorted(f for f in found if f not in used
                  and (f == WINBACK or contexts.campaign_of(settings, f) not in cc.CAMPAIGNS))  # fmt: skip


def locales_to_check(campaign: str, settings: Settings, renderer: object) -> list[Locale]:
    """Every language for a folder sending will use (a missing one is a problem); what exists otherwise."""
    if campaign in required_folders(settings) or not hasattr(renderer, "locales"):
        return list(Locale)
    present: list[Locale] = renderer.locales(campaign)
    return present


def render_all(settings: Settings, renderer: TemplateRenderer, now: datetime = SAMPLE_NOW) -> Iterator[SampleRender]:
    composer = composer_for_samples(settings, renderer)
    for campaign in campaigns_to_check(settings, renderer):
        for locale in locales_to_check(campaign, settings, renderer):
            for sample in samples.samples(locale):
                result = render_sample(composer, campaign, locale, sample, now)
                yield result
                if result.error is not None and _kind_of(result.error) is Kind.TIMEOUT:
                    break  # the other samples would most likely wait out the deadline too


# --- the checks ---------------------------------------------------------------------


def _kind_of(error: TemplateError) -> Kind:
    text = str(error)
    if "template not found" in text:
        return Kind.MISSING
    if "syntax error" in text:
        return Kind.SYNTAX
    if "UndefinedError" in text or "is undefined" in text or "undefined variable" in text:
        return Kind.UNDEFINED
    if "took more than" in text and "stopped" in text:
        return Kind.TIMEOUT
    if "subject is empty" in text:
        return Kind.SUBJECT_EMPTY
    if "cannot build the message" in text:
        return Kind.MESSAGE
    return Kind.RENDER


_SAMPLE_MARKUP = ("<script>alert(", "<b>tas</b>")
"""The HTML of the sample data (``samples.SCRIPT_NAME``, the products' ``<b>Tas</b>``) as it would come out printed
raw: a template's own tags (a ``<script type="application/ld+json">`` of schema.org markup) are no sign of it."""


def problems_of(r: SampleRender, settings: Settings) -> list[Problem]:
    """What is wrong with one sample render (empty if nothing)."""
    base = {"campaign": r.campaign, "locale": str(r.locale), "samples": (r.sample.slug,)}
    if r.error is not None:
        return [Problem(_kind_of(r.error), r.error.reason, r.error.template, r.error.line, **base)]  # type: ignore[arg-type]
    assert r.rendered is not None
    folder = f"{r.campaign}/{r.locale}"
    out: list[Problem] = []

    def add(kind: Kind, message: str, part: str) -> None:
        out.append(Problem(kind, message, f"{folder}/{part}", None, **base))  # type: ignore[arg-type]

    rendered, limits = r.rendered, settings.checks
    if not rendered.text.strip():
        add(Kind.TEXT_EMPTY, "the plain-text part is empty", "body.txt")
    size = len(rendered.html.encode("utf-8"))
    if size > limits.html_max_bytes:
        add(Kind.HTML_TOO_BIG, f"the HTML part is {size:,} bytes, over checks.html_max_bytes "
            f"({limits.html_max_bytes:,}): Gmail clips it", "body.html")  # fmt: skip
    if len(rendered.subject) > limits.subject_max_chars:
        add(Kind.SUBJECT_TOO_LONG, f"the subject is {len(rendered.subject)} characters, over "
            f"checks.subject_max_chars ({limits.subject_max_chars}): {rendered.subject[:60]!r}…", "subject.txt")
    lowered = rendered.html.lower()
    if any(markup in lowered for markup in _SAMPLE_MARKUP):
        add(Kind.UNESCAPED, "customer or product data came out as raw HTML (is `| safe` used on data?)",
            "body.html")
    # the HTML part as a reader sees its text: autoescaping writes ' and " as &#39; and &#34;, not as html.escape
    shown = html.unescape(rendered.html)
    unsubscribe = str(r.context.get("unsubscribe_url", ""))
    if unsubscribe and unsubscribe not in rendered.text:
        add(Kind.NO_UNSUBSCRIBE, "the plain-text part has no unsubscribe link ({{ unsubscribe_url }})", "body.txt")
    if unsubscribe and unsubscribe not in rendered.html and unsubscribe not in shown:
        add(Kind.NO_UNSUBSCRIBE, "the HTML part has no unsubscribe link ({{ unsubscribe_url }})", "body.html")
    address = settings.shop.postal_address
    if address not in rendered.text:
        add(Kind.NO_POSTAL_ADDRESS, "the plain-text part lacks the shop's postal address", "body.txt")
    if address not in rendered.html and address not in shown:
        add(Kind.NO_POSTAL_ADDRESS, "the HTML part lacks the shop's postal address", "body.html")
    return out


def _merge(problems: Iterable[Problem]) -> list[Problem]:
    """One problem per (kind, place, message, campaign, locale), listing every sample it hit."""
    merged: dict[tuple[object, ...], Problem] = {}
    for p in problems:
        key = (p.kind, p.template, p.line, p.message, p.campaign, p.locale)
        seen = merged.get(key)
        if seen is None:
            merged[key] = p
        elif p.samples and not set(p.samples) <= set(seen.samples):
            merged[key] = Problem(p.kind, p.message, p.template, p.line, p.campaign, p.locale,
                                  seen.samples + tuple(s for s in p.samples if s not in seen.samples))  # fmt: skip
    return list(merged.values())


def lint_problems(renderer: object, known: Mapping[str, set[str]], unused: Iterable[str] = ()) -> list[Problem]:
    """Problems found without rendering (syntax, undefined variables in branches no sample takes).

    ``known``: campaign → the context keys its samples had; shared files get the keys all share. Files in the
    ``unused`` folders (``unused_folders``) are not reported on."""
    if not hasattr(renderer, "lint") or not known:
        return []
    lint: Lintable = renderer  # type: ignore[assignment]
    shared = set.intersection(*known.values())
    return [
        Problem(_kind_of(error), error.reason, error.template, error.line, *_folder_and_locale(error.template, known))
        for error in lint.lint({"": shared, **known}, unused)
    ]


def _folder_and_locale(template: str, known: Mapping[str, set[str]]) -> tuple[str, str]:
    """The campaign folder and language a file such as ``winback/en/body.html`` belongs to, as a render's problem
    names them (``check --json``'s ``campaign`` and ``locale``); ``("", "")`` for a shared file (``_layout.html``)."""
    folder, _, rest = template.partition("/")
    locale = rest.partition("/")[0]
    if folder in known and locale in {each.value for each in Locale}:
        return folder, locale
    return "", ""


def check_templates(settings: Settings, renderer: TemplateRenderer) -> list[Problem]:
    """Every campaign x language x sample customer, rendered and checked; [] when all is well."""
    problems: list[Problem] = []
    known: dict[str, set[str]] = {}
    for r in render_all(settings, renderer):
        problems += problems_of(r, settings)
        if r.context:
            known.setdefault(r.campaign, set()).update(r.context)
    # the scan finds again what a render already reported (a syntax error, say): that one is listed once
    rendered = {_mistake(p) for p in problems}
    unused = unused_folders(settings, renderer)
    unseen = [p for p in lint_problems(renderer, known, unused) if _mistake(p) not in rendered]
    # a folder with no file at all: said with the setting that names it (a step's misspelt template, say)
    absent = {f for f in required_folders(settings) if hasattr(renderer, "locales") and not renderer.locales(f)}
    problems = [dataclasses.replace(p, message=_no_folder(settings, p.campaign))
                if p.kind is Kind.MISSING and p.campaign in absent else p for p in problems]  # fmt: skip
    return _merge(locate_unescaped(problems, renderer) + unseen)


_UNDEFINED_NAME = re.compile(r"^(?:UndefinedError: '([^']*)' is undefined|undefined variable '([^']*)'(?:: .*)?"
                             r"|UndefinedError: .* does not export the requested name '([^']*)')$")


def _mistake(p: Problem) -> tuple[object, ...]:
    """What tells one mistake from another: a render's "UndefinedError: 'sapan' is undefined" and the scan's
    "undefined variable 'sapan'" at the same line are one typo (so are a render's "… does not export the requested
    name 'buton'" and the scan's "undefined variable 'buton': _macros.html has no macro 'buton'")."""
    found = _UNDEFINED_NAME.match(p.message) if p.kind is Kind.UNDEFINED else None
    return (p.kind, p.template, p.line, next(g for g in found.groups() if g is not None) if found else p.message)
