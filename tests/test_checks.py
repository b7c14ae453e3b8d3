"""`kembali check`: each kind of broken template is reported with its file and line."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.shop_fixtures import REPO, make_site
from worker import contexts
from worker.adapters.render_worker import TimeLimitedRenderer
from worker.adapters.templates import JinjaTemplates
from worker.checks import Kind, Problem, check_templates, render_all
from worker.config import CheckSettings, Settings, load_settings, settings_from_dict
from worker.domain import Locale
from worker.errors import TemplateError


def _settings(root: Path, **checks: object) -> Settings:
    s = settings_from_dict({"templates": {"dir": str(root)}})
    return dataclasses.replace(s, checks=dataclasses.replace(CheckSettings(), **checks))  # type: ignore[arg-type]


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    import shutil

    root = tmp_path / "templates"
    shutil.copytree(REPO / "templates" / "email", root)
    return root


def _edit(path: str, old: str, new: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        file = root / path
        text = file.read_text(encoding="utf-8")
        assert old in text, (path, old)
        file.write_text(text.replace(old, new, 1), encoding="utf-8")

    return apply


def _write(path: str, text: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        (root / path).write_text(text, encoding="utf-8")

    return apply


def _remove(path: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        (root / path).unlink()

    return apply


def _line_of(root: Path, path: str, needle: str) -> int:
    lines = (root / path).read_text(encoding="utf-8").splitlines()
    return next(i for i, line in enumerate(lines, start=1) if needle in line)


@dataclass(frozen=True)
class Case:
    name: str
    breakage: Callable[[Path], None]
    kind: Kind
    template: str
    needle: str | None = None
    """Text on the line the problem must point at (None: no line expected)."""
    checks: tuple[tuple[str, object], ...] = ()


CASES = [
    Case("a syntax error", _edit("winback/en/body.html", "{% if bought %}", "{% if bought %}{% if %}"),
         Kind.SYNTAX, "winback/en/body.html", "{% if %}"),
    Case("a typo in a variable every sample reaches", _edit("winback/id/body.txt", "{{ shop.base_url }}",
         "{{ shp.base_url }}"), Kind.UNDEFINED, "winback/id/body.txt", "shp.base_url"),
    Case("an undefined variable in a branch no sample takes",
         _edit("winback/en/body.html", "{% endblock %}", "{% if false %}{{ nope }}{% endif %}{% endblock %}"),
         Kind.UNDEFINED, "winback/en/body.html", "{{ nope }}"),
    Case("an undefined variable in the shared layout", _edit("_layout.txt", "{{ unsubscribe_url }}",
         "{{ unsubscribe_link }}"), Kind.UNDEFINED, "_layout.txt", "unsubscribe_link"),
    Case("a missing text part", _remove("winback/en/body.txt"), Kind.MISSING, "winback/en/body.txt"),
    Case("a language missing (its first file is named)", lambda root: shutil.rmtree(root / "winback/en"),
         Kind.MISSING, "winback/en/subject.txt"),
    Case("an empty text part", _write("winback/id/body.txt", "  \n\n"), Kind.TEXT_EMPTY, "winback/id/body.txt"),
    Case("an empty subject", _write("winback/en/subject.txt", "{{ '' }}\n"), Kind.SUBJECT_EMPTY,
         "winback/en/subject.txt"),
    Case("a subject over the limit", lambda root: None, Kind.SUBJECT_TOO_LONG, "winback/id/subject.txt",
         checks=(("subject_max_chars", 20),)),
    Case("HTML over the limit", lambda root: None, Kind.HTML_TOO_BIG, "winback/en/body.html",
         checks=(("html_max_bytes", 2048),)),
    Case("customer data marked safe", _edit("winback/en/body.html", "{{ customer.first_name or \"there\" }}",
         "{{ customer.name | safe }}"), Kind.UNESCAPED, "winback/en/body.html", "{{ customer.name | safe }}"),
    Case("a text partial (not escaped) included in the HTML part: recommended products' names come out raw",
         _edit("winback/en/body.html", '{% include "_products.html" %}', '{% include "_products.txt" %}'),
         Kind.UNESCAPED, "winback/en/body.html", '{% include "_products.txt" %}'),
    Case("a bought product's name marked safe",
         _edit("winback/en/body.html", "{{ bought[0].name }}", "{{ bought[0].name | safe }}"),
         Kind.UNESCAPED, "winback/en/body.html", "{{ bought[0].name | safe }}"),
    Case("a product's name marked safe in a partial the HTML part includes (named there, not in the part)",
         _edit("_products.html", "{{ p.name }}</a>", "{{ p.name|safe }}</a>"),
         Kind.UNESCAPED, "_products.html", "{{ p.name|safe }}"),
    Case("data put out with autoescaping turned off",
         _edit("winback/en/body.html", "{{ bought[0].name }}",
               "{% autoescape false %}{{ bought[0].name }}{% endautoescape %}"),
         Kind.UNESCAPED, "winback/en/body.html", "{% autoescape false %}"),
    Case("no unsubscribe link in the English branch of the text layout",
         _edit("_layout.txt", "{{ unsubscribe_url }}", "(link removed)"), Kind.NO_UNSUBSCRIBE, "winback/en/body.txt"),
    Case("a filter given the wrong type", _edit("winback/en/body.txt", "{{ shop.base_url }}",
         "{{ shop.base_url | money }}"), Kind.RENDER, "winback/en/body.txt", "shop.base_url | money"),
    Case("an undefined variable in a shared partial, in a branch no sample takes",
         _edit("_products.html", "{% endfor %}", "{% endfor %}{% if false %}{{ nope }}{% endif %}"),
         Kind.UNDEFINED, "_products.html", "{{ nope }}"),
    Case("a campaign that does not give its partial a variable",
         _edit("loyalty/en/body.html", "{% set coupon_label %}", "{% set coupon_lable %}"),
         Kind.UNDEFINED, "_coupon.html", "{{ coupon_label }}"),
    Case("a syntax error in a shared partial", _edit("_products.txt", "{% endfor %}", "{% endfor %}{% endif %}"),
         Kind.SYNTAX, "_products.txt", "{% endif %}"),
    Case("a filter that does not exist, in the shared layout",
         _edit("_layout.html", "{{ shop.postal_address }}", "{{ shop.postal_address | idr }}"),
         Kind.SYNTAX, "_layout.html", "shop.postal_address | idr"),
    Case("a test that does not exist (Jinja2 itself finds it only as it renders the condition)",
         _edit("winback/en/body.txt", "{% block content %}", "{% block content %}{% if false is empty %}{% endif %}"),
         Kind.SYNTAX, "winback/en/body.txt", "is empty"),
    Case("a filter that does not exist, in a branch no sample takes (Jinja2 itself defers it to the render)",
         _edit("winback/en/body.txt", "{% endblock %}", "{% if step == 9 %}{{ shop.name | uppercase }}{% endif %}\n"
               "{% endblock %}"), Kind.SYNTAX, "winback/en/body.txt", "| uppercase"),
    Case("a test that does not exist, in a branch no sample takes",
         _edit("winback/id/body.html", "{% endblock %}", "{% if step == 9 %}{% if bought is empty %}{% endif %}"
               "{% endif %}\n{% endblock %}"), Kind.SYNTAX, "winback/id/body.html", "is empty"),
    Case("the second product of an order read where most customers bought one (win-back's usual case)",
         _edit("winback/en/body.txt", "{{ bought[0].url }}", "{{ bought[0].url }} and {{ bought[1].name }}"),
         Kind.UNDEFINED, "winback/en/body.txt", "bought[1].name"),
    Case("a mistake in the loyalty email's spend-milestone branch (every sample had reached an order milestone)",
         _edit("loyalty/id/body.txt", "{{ milestone | money }}", "{{ milestone | money('Rp') }}"),
         Kind.RENDER, "loyalty/id/body.txt", "money('Rp')"),
    Case("a mistake in the birthday email's on-the-day branch (every sample's offer went days before the day)",
         _edit("birthday/en/body.txt", "{% else %}Happy birthday!{% endif %}",
               "{% else %}Happy birthday, {{ birthday | date('long') }}!{% endif %}"),
         Kind.RENDER, "birthday/en/body.txt", "date('long')"),
    Case("a mistake in the new-products email's branch for news in the customer's categories (every sample was "
         "shown the best sellers)",
         _edit("new_products/id/subject.txt", "{{ products[0].name | truncate(40, end=\"…\", leeway=0) }}",
               "{{ products[0].nama | truncate(40, end=\"…\", leeway=0) }}"),
         Kind.UNDEFINED, "new_products/id/subject.txt", "products[0].nama"),
    Case("a '}}' too many: it is printed as text in every email",
         _edit("winback/id/body.html", "{{ shop.name }}. Semoga", "{{ shop.name }}}}. Semoga"),
         Kind.SYNTAX, "winback/id/body.html", "}}}}. Semoga"),
    Case("a '{' missing: the whole tag is printed as text, '{ customer.first_name }}'",
         _edit("winback/en/body.txt", "Hi {{ customer.first_name", "Hi { customer.first_name"),
         Kind.SYNTAX, "winback/en/body.txt", "Hi { customer"),
]  # fmt: skip


def test_the_shipped_templates_have_no_problems() -> None:
    root = REPO / "templates" / "email"
    assert check_templates(_settings(root), JinjaTemplates(root)) == []
    # with the shipped config's three win-back steps, whose folders (winback-reminder/, winback-last/) the one-step
    # default does not send from, so does not check
    settings = load_settings(REPO / "config.toml")
    assert settings.resolve(settings.templates.dir) == root
    assert check_templates(settings, JinjaTemplates(root)) == []


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_each_broken_template_is_reported_with_file_and_line(case: Case, templates: Path) -> None:
    case.breakage(templates)
    problems = check_templates(_settings(templates, **dict(case.checks)), JinjaTemplates(templates))
    matching = [p for p in problems if p.kind is case.kind and p.template == case.template]
    assert matching, "\n".join(map(str, problems))
    if case.needle is not None:
        assert matching[0].line == _line_of(templates, case.template, case.needle)
        assert str(matching[0]).startswith(f"{case.template}:{matching[0].line}: ")


def test_problems_name_the_samples_they_hit(templates: Path) -> None:
    _edit("winback/en/body.html", "{% if bought %}", "{% if bought %}{{ bought[0].nam }}")(templates)
    problems = check_templates(_settings(templates), JinjaTemplates(templates))
    (problem,) = [p for p in problems if p.template == "winback/en/body.html"]
    assert problem.kind is Kind.UNDEFINED and problem.campaign == "winback" and problem.locale == "en"
    assert "noproducts" not in problem.samples and {"siti", "crlf", "long"} <= set(problem.samples)


def test_a_partial_missing_a_variable_is_reported_at_its_line_naming_the_include(templates: Path) -> None:
    # Given one language of one campaign that forgets the link text its product list needs
    _edit("winback/id/body.html", ', link_text = "Lihat produk"', "")(templates)
    problems = check_templates(_settings(templates), JinjaTemplates(templates))
    # Then the check names the partial's line and where it was included from, without rendering
    line = _line_of(templates, "_products.html", "{% if link_text %}")
    include = _line_of(templates, "winback/id/body.html", '{% include "_products.html" %}')
    assert [str(p) for p in problems if not p.samples] == [
        f"_products.html:{line}: undefined variable 'link_text' (included from winback/id/body.html:{include})"
    ]
    # and the renders that reach it fail there, for that campaign and language only
    assert {(p.campaign, p.locale, p.template, p.line) for p in problems if p.samples} == {
        ("winback", "id", "_products.html", line)
    }


def test_a_render_that_never_ends_is_stopped_in_its_helper_process(templates: Path) -> None:
    # Given a template whose loop would run for hours (the sandbox caps one range, not nesting)
    _edit("winback/id/body.txt", "{% block content %}",
          "{% block content %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
          )(templates)  # fmt: skip
    line = _line_of(templates, "winback/id/body.txt", "{% for i in range(100000) %}")
    settings = _settings(templates, render_timeout_seconds=0.3)
    with TimeLimitedRenderer(templates, timeout_seconds=0.3) as renderer:
        problems = check_templates(settings, renderer)
        # Then it is reported once for that language, at the file and line of the loop (as preview and the
        # ledger name it), and the other language still rendered fine
        timeouts = [p for p in problems if p.kind is Kind.TIMEOUT]
        assert [(p.campaign, p.locale, p.template, p.line) for p in timeouts] == [
            ("winback", "id", "winback/id/body.txt", line)
        ]
        assert str(timeouts[0]).startswith(f"winback/id/body.txt:{line}: the render took more than 0.3 s and was "
                                           "stopped"), str(timeouts[0])  # fmt: skip
        assert [p for p in problems if p.locale == "en"] == []


def test_a_long_template_compiled_in_the_helper_is_not_taken_for_a_render_past_its_time_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a body of 1,000 conditional lines: Jinja2 takes ~1 s to compile it (seconds on a loaded machine), ~1 ms
    # to render it; the render's time limit does not count the compile, in the helper as in the sender
    from worker.adapters import render_worker

    body = "".join(f"{{% if name %}}{{{{ name ~ '{i}' }}}}{{% endif %}}\n" for i in range(1000))
    for name, text in {"demo/id/subject.txt": "Halo", "demo/id/body.txt": "Halo", "demo/id/body.html": body}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    monkeypatch.setattr(render_worker, "KILL_GRACE_SECONDS", 0.05)  # (the compile well past limit and grace)
    with TimeLimitedRenderer(tmp_path, timeout_seconds=0.1) as renderer:
        # When the check renders it for the first time (the helper killed it as a render that did not stop, and
        # `kembali check`, the daemon's check and the live preview said "a loop that does not end?")
        html = renderer.render("demo", Locale.ID, {"name": "Siti"}).html
        # Then it renders, in the same helper
        assert html.strip() == "".join(f"Siti{i}" for i in range(1000))
        assert renderer.restarts == 0


def test_a_render_that_keeps_building_memory_fails_at_its_line_in_the_helper(tmp_path: Path) -> None:
    # Given a template that keeps every 1 MB string it builds, nesting each in the next: within a generous time
    # limit it would take 3 GB of the machine's memory
    hog = "{% set ns = namespace(a=[]) %}{% for i in range(3000) %}{% set ns.a = [ns.a, 'x' * 999990 ~ i] %}"
    for name, text in {"demo/id/subject.txt": "Halo", "demo/id/body.txt": "Halo", "demo/id/body.html": "<p>\n"
                       + hog + "{% endfor %}done"}.items():  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    with TimeLimitedRenderer(tmp_path, timeout_seconds=30) as renderer:
        # Then the render is stopped at a bound far below that (the watchdog's, or the helper's address space
        # running out), and says where
        stopped = r"took more than 512 MB of memory and was stopped|ran out of memory"
        with pytest.raises(TemplateError, match=stopped) as info:
            renderer.render("demo", Locale.ID, {})
        assert (info.value.template, info.value.line) == ("demo/id/body.html", 2)
        # and the same helper goes on serving (the memory came back)
        with pytest.raises(TemplateError, match=stopped):
            renderer.render("demo", Locale.ID, {})
        assert renderer.restarts == 0


def test_a_missing_or_mistyped_winback_step_folder_is_reported(templates: Path) -> None:
    # Given three steps: the first one's folder gone, the last one's name mistyped, the middle one fine
    shutil.rmtree(templates / "winback-reminder")
    steps = [{"days": 45, "template": "winback-reminder"}, {"days": 75, "template": "winback"},
             {"days": 120, "template": "winback-lastt"}]  # fmt: skip
    settings = settings_from_dict({"templates": {"dir": str(templates)}, "campaigns": {"winback": {"steps": steps}}})
    problems = check_templates(settings, JinjaTemplates(templates))
    # Then both are reported, in both languages, as sending would fail on them
    missing = sorted((p.campaign, p.locale) for p in problems if p.kind is Kind.MISSING)
    assert missing == [("winback-lastt", "en"), ("winback-lastt", "id"), ("winback-reminder", "en"),
                       ("winback-reminder", "id")]  # fmt: skip
    assert [p for p in problems if p.kind is not Kind.MISSING] == []
    # each naming the setting that names the folder, so that a misspelt name is found in the config, not looked for
    # among the templates (`kembali check` and a daemon refusing to start said "template not found" alone)
    for p in problems:
        step = 2 if p.campaign == "winback-lastt" else 0
        assert p.message == (f"template not found: there is no folder {p.campaign}/ at all, the one "
                             f"'campaigns.winback.steps[{step}].template' names (misspelt?)"), p.message


def test_check_command_exit_codes(tmp_path: Path) -> None:
    site = make_site(tmp_path / "ok")
    done = site.cli("check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no problems found" in done.stdout

    broken = make_site(tmp_path / "broken", copy_templates=True)
    _edit("winback/id/body.html", "{% if bought %}", "{% if bought %}{{ oops(")(broken.folder / "templates")
    done = broken.cli("check")
    assert done.returncode == 1
    assert "syntax: winback/id/body.html:" in done.stdout
    # found by the render and by the scan alike, it is listed and counted once; the count is part of the report,
    # on stdout as "no problems found" is (it went to stderr: `kembali check > report.txt` kept the list, not the count)
    assert done.stdout.count("syntax: ") == 1 and "\n1 problem found\n" in done.stdout, done.stdout + done.stderr
    assert done.stderr == ""
    # --json: one object per problem (with the notes and a summary, each of its type), nothing else on stdout
    done = broken.cli("check", "--json")
    assert done.returncode == 1 and done.stderr == ""
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["kind"] for row in rows if row["type"] == "problem"] == ["syntax"]


def test_the_templates_own_script_tag_is_not_taken_for_data_printed_raw(templates: Path) -> None:
    # Given an email that carries schema.org markup in a script tag of its own (as Gmail reads it), and a comment
    # that names the tag
    _edit("winback/en/body.html", "{% block content %}",
          '{% block content %}<script type="application/ld+json">{"@context": "https://schema.org", '
          '"@type": "Organization", "name": {{ shop.name | tojson }}}</script>\n'
          "<!-- no <SCRIPT> of ours runs in a mail reader -->")(templates)  # fmt: skip
    # When the templates are checked
    problems = check_templates(_settings(templates), JinjaTemplates(templates))
    # Then nothing is reported: it was "customer or product data came out as raw HTML (is `| safe` used on data?)"
    # for every sample, which no data had
    assert problems == [], "\n".join(map(str, problems))


def test_a_postal_address_with_an_apostrophe_or_quotes_passes_the_check(tmp_path: Path) -> None:
    # Given a shop on a street whose name has an apostrophe (Jl. Sa'adah), in a building named in quotes
    address = "Jl. Sa'adah No. 8, Ruko \\\"Kemang\\\", Jakarta Selatan 12730"
    site = make_site(tmp_path / "shop", extra_toml=f'[shop]\npostal_address = "{address}"\n')
    # When the operator checks the shipped templates
    done = site.cli("check")
    # Then there is no problem: every footer prints the address, escaped as HTML escapes it (Sa&#39;adah), which the
    # check did not recognise: "the HTML part lacks the shop's postal address" for every folder, and a daemon that
    # refused to start
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no problems found" in done.stdout
    assert "postal address" not in done.stdout


def test_a_typo_in_a_variable_is_one_problem(tmp_path: Path) -> None:
    # Given a greeting whose variable is mistyped, on a line every sample customer reaches
    site = make_site(tmp_path / "shop", copy_templates=True)
    _edit("winback/id/body.html", "Halo {{ sapaan }},", "Halo {{ sapan }},")(site.folder / "templates")
    line = _line_of(site.folder / "templates", "winback/id/body.html", "{{ sapan }}")
    # When the operator checks the templates
    done = site.cli("check")
    # Then the typo is one problem, named once at its file and line: the renders' "UndefinedError: 'sapan' is
    # undefined" and the scan's "undefined variable 'sapan'" were two, "2 problems found"
    assert done.returncode == 1
    named = [row for row in done.stdout.splitlines() if "sapan" in row]
    assert named == [f"undefined: winback/id/body.html:{line}: UndefinedError: 'sapan' is undefined "
                     "[winback/id, samples: siti, single, noname, long +6]"], done.stdout  # fmt: skip
    assert "\n1 problem found\n" in done.stdout, done.stdout


def test_a_typo_in_a_field_name_is_told_the_field_meant(tmp_path: Path) -> None:
    # Given a greeting that reads a customer's field by a mistyped name
    site = make_site(tmp_path / "shop", copy_templates=True)
    _edit("winback/id/body.html", "Halo {{ sapaan }},", "Halo {{ customer.frist_name }},")(site.folder / "templates")
    line = _line_of(site.folder / "templates", "winback/id/body.html", "frist_name")
    # When the operator checks the templates
    done = site.cli("check")
    # Then the problem names the field meant: it said only "'dict object' has no attribute 'frist_name'", the
    # operator left to find the fields a customer has in templates/email/README.md
    assert done.returncode == 1
    named = [row for row in done.stdout.splitlines() if "frist_name" in row]
    assert named == [f"undefined: winback/id/body.html:{line}: UndefinedError: 'dict object' has no attribute "
                     "'frist_name' (did you mean 'first_name'?) [winback/id, samples: siti, single, noname, long +6]"]


def test_a_mistake_in_the_shared_layout_is_one_problem_naming_the_folders_it_breaks(tmp_path: Path) -> None:
    # Given the text layout every email extends, saved with a stray {% endif %}
    site = make_site(tmp_path / "shop", copy_templates=True, extra_toml="[campaigns.birthday]\nenabled = true\n")
    _edit("_layout.txt", "{{ shop.postal_address }}", "{{ shop.postal_address }}{% endif %}")(site.folder / "templates")
    line = _line_of(site.folder / "templates", "_layout.txt", "{{ shop.postal_address }}{% endif %}")
    # When the operator checks the templates
    done = site.cli("check")
    # Then it is one problem, on one line naming the campaign folders and languages it breaks: it was a line for
    # each of them, "14 problems found" for one mistake
    assert done.returncode == 1
    named = [row for row in done.stdout.splitlines() if "_layout.txt" in row]
    assert len(named) == 1, done.stdout
    assert named[0].startswith(f"syntax: _layout.txt:{line}: syntax error: Encountered unknown tag 'endif'. "
                               "[birthday/id, birthday/en, "), named  # fmt: skip
    assert "feedback/en +6, samples: siti," in named[0], named
    assert "\n1 problem found\n" in done.stdout, done.stdout
    # --json keeps one object per folder and language
    rows = [json.loads(line) for line in site.cli("check", "--json").stdout.splitlines()]
    problems = [row for row in rows if row["type"] == "problem"]
    assert len(problems) > 2 and {row["template"] for row in problems} == {"_layout.txt"}


def test_a_copy_of_a_campaign_folder_that_no_campaign_uses_is_a_note_not_a_problem(tmp_path: Path) -> None:
    # Given the operator's backup of the birthday templates beside them, a folder no campaign sends from
    site = make_site(tmp_path / "shop", copy_templates=True, extra_toml="[campaigns.birthday]\nenabled = true\n")
    shutil.copytree(site.folder / "templates" / "birthday", site.folder / "templates" / "birthday-old")
    # When the operator checks the templates
    done = site.cli("check")
    # Then the check passes, with a note that the folder is not checked and why: it failed with "cannot build the
    # sample context: ValueError: unknown campaign 'birthday-old'" and undefined variables in every file of it,
    # and a daemon refused to start
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no problems found" in done.stdout
    assert "note: birthday-old/ is no campaign's folder, not checked and never sent" in done.stdout, done.stdout
    assert "unknown campaign" not in done.stdout


STEPS_TOML = ("[[campaigns.winback.steps]]\ndays = 45\ntemplate = \"winback-1\"\n\n"
              "[[campaigns.winback.steps]]\ndays = 75\ntemplate = \"winback-2\"\n")


@pytest.mark.parametrize("backup", ["winback-1-old", "winback-old", "winback-2.bak"])
def test_a_copy_of_a_win_back_step_folder_that_no_step_uses_is_a_note_not_a_problem(
    tmp_path: Path, backup: str
) -> None:
    # Given two win-back steps sending from winback-1/ and winback-2/, and beside them the operator's backup of a
    # step's folder, an older version with a mistake in it
    site = make_site(tmp_path / "shop", copy_templates=True, extra_toml=STEPS_TOML)
    root = site.folder / "templates"
    shutil.move(root / "winback-reminder", root / "winback-1")
    shutil.move(root / "winback-last", root / "winback-2")
    shutil.copytree(root / "winback-2", root / backup)
    _edit(f"{backup}/id/body.txt", "{% block content %}", "{% block content %}{{ oops(")(root)
    # When the operator checks the templates, and a daemon checks them as it starts
    done = site.cli("check")
    # Then the check passes with a note naming the backup, as for a copy of another campaign's folder: it was taken
    # for a win-back step's folder (its name starts with "winback"), checked, its mistake reported, and a daemon
    # refused to start over a folder nothing sends from
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no problems found" in done.stdout
    assert f"note: {backup}/ is no campaign's folder, not checked and never sent" in done.stdout, done.stdout
    assert check_templates(site.settings, JinjaTemplates(root)) == []
    assert (contexts.campaign_of(site.settings, backup), contexts.campaign_of(site.settings, "winback-2")) == \
        (backup, "winback")  # fmt: skip
    # and the folders the steps use are checked still: the same mistake in one of them is a problem
    _edit("winback-2/id/body.txt", "{% block content %}", "{% block content %}{{ oops(")(root)
    done = site.cli("check")
    assert done.returncode == 1 and "syntax: winback-2/id/body.txt:" in done.stdout, done.stdout
    assert f"note: {backup}/ is no campaign's folder" in done.stdout, done.stdout


def test_check_names_a_filter_that_does_not_exist_with_its_file_and_line(tmp_path: Path) -> None:
    # Given the layout every email extends, edited with a filter Kembali does not have (`money` is the real one)
    site = make_site(tmp_path / "shop", copy_templates=True)
    _edit("_layout.html", "{{ shop.postal_address }}", "{{ shop.postal_address | idr }}")(site.folder / "templates")
    line = _line_of(site.folder / "templates", "_layout.html", "| idr")
    # When the operator checks the templates
    done = site.cli("check")
    # Then the filter is named at its file and line, once, where `kembali check` ended in a traceback
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"syntax: _layout.html:{line}: syntax error: No filter named 'idr'." in done.stdout, done.stdout
    assert "Traceback" not in done.stderr and done.stderr == "", done.stderr
    assert "\n1 problem found\n" in done.stdout, done.stdout


def test_a_birthday_template_that_prints_the_birthday_as_the_readme_shows_passes_the_check(tmp_path: Path) -> None:
    # Given birthday templates that print the day being celebrated, `{{ birthday | date }}`, as
    # templates/email/README.md says to
    site = make_site(tmp_path / "shop", copy_templates=True, extra_toml="[campaigns.birthday]\nenabled = true\n")
    root = site.folder / "templates"
    _edit("birthday/id/body.txt", "Selamat ulang tahun!", "Selamat ulang tahun ({{ birthday | date }})!")(root)
    _edit("birthday/en/body.html", "Happy birthday!", "Happy birthday ({{ birthday | date }})!")(root)
    # When the operator checks them
    done = site.cli("check")
    # Then they pass (the samples had no birthday: "ValueError: Invalid isoformat string: ''", and a daemon
    # refused the set)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no problems found" in done.stdout


def test_check_says_when_the_shop_is_still_the_example_shop(tmp_path: Path) -> None:
    # Given a config that never set [shop] (the README's "then set [shop]" forgotten): every email would go out
    # from halo@toko-kembali.example, a reserved domain no provider delivers for, over the placeholder postal
    # address, and `kembali check` said "no problems found"
    site = make_site(tmp_path / "unset")
    done = site.cli("check")
    # Then check says so, naming each key, on stdout with its report; the exit code stays 0 (the demo's shop)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "note: still the example shop's" in done.stdout, done.stdout
    for key in ("shop.domain", "shop.from_address", "shop.base_url", "unsubscribe.url", "unsubscribe.mailto",
                "campaigns.feedback.link_url", "shop.postal_address"):
        assert key in done.stdout, key
    done = site.cli("check", "--json")  # a note there too, no problem
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 0 and [row["type"] for row in rows if row["type"] != "note"] == ["summary"], rows
    assert next(row["kind"] for row in rows if row["type"] == "note") == "example_shop", rows

    # Given the shop's own values, there is no note
    own = make_site(tmp_path / "own", extra_toml=(
        '[shop]\ndomain = "tokoku.co.id"\nfrom_address = "halo@tokoku.co.id"\nbase_url = "https://tokoku.co.id"\n'
        'postal_address = "Jl. Malioboro No. 5, Yogyakarta 55213"\n'
        '[unsubscribe]\nurl = "https://tokoku.co.id/unsubscribe"\nmailto = ""\n'
        '[campaigns.feedback]\nlink_url = "https://tokoku.co.id/feedback"\n'))  # fmt: skip
    done = own.cli("check")
    assert done.returncode == 0 and "note: still the example shop" not in done.stdout, done.stdout


def test_check_reports_a_missing_link_secret(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site")
    env = site.env()
    del env["KEMBALI_LINK_SECRET"]
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "worker", "--config", str(site.config), "check"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 1
    assert "config: " in done.stdout and "KEMBALI_LINK_SECRET" in done.stdout


def test_problem_text() -> None:
    p = Problem(Kind.UNDEFINED, "'x' is undefined", "winback/en/body.html", 12, "winback", "en", ("siti", "crlf"))
    assert str(p) == "winback/en/body.html:12: 'x' is undefined [winback/en, samples: siti, crlf]"


@pytest.mark.parametrize(
    ("port", "tls", "hint"),
    [
        (465, "starttls", "'smtp.port' 465 is the implicit-TLS port (SMTPS), where smtp.tls is usually 'tls'"),
        (465, "tls", None),
        (587, "tls", "'smtp.port' 587 usually takes STARTTLS"),
        (587, "starttls", None),
        (2525, "none", None),
    ],
)
def test_check_names_a_tls_mode_unusual_for_the_port(port: int, tls: str, hint: str | None) -> None:
    from worker.commands.checking import check_config

    settings = settings_from_dict({"smtp": {"host": "127.0.0.1", "port": port, "tls": tls}}, base_dir=REPO)
    problems = [str(p) for p in check_config(settings, {"KEMBALI_LINK_SECRET": "k" * 32})]
    if hint is None:
        assert problems == []
    else:
        assert len(problems) == 1 and hint in problems[0], problems


def test_check_names_the_file_and_line_of_a_tls_mode_unusual_for_the_port(tmp_path: Path) -> None:
    from worker.commands.checking import check_config

    # Given port 465 with smtp.tls left at 'none', in a config file
    site = make_site(tmp_path / "shop", smtp_port=465)
    line = site.config.read_text(encoding="utf-8").splitlines().index("port = 465") + 1
    # When check looks at the config
    problems = [str(p) for p in check_config(site.settings, {"KEMBALI_LINK_SECRET": "k" * 32})]
    # Then it names the file and the line, as it names every other config problem: it said 'smtp.port 465 …' alone
    assert problems == [f"{site.config}: line {line}: 'smtp.port' 465 is the implicit-TLS port (SMTPS), where smtp.tls "
                        "is usually 'tls', not 'none': the server waits for TLS while Kembali waits for its greeting"]


def test_check_names_an_event_loop_choice_that_run_would_refuse(tmp_path: Path) -> None:
    # Given the environment's KEMBALI_EVENT_LOOP misspelt, which `run --once` and the daemon refuse (exit code 2)
    site = make_site(tmp_path / "shop")
    env = {**site.env(), "KEMBALI_EVENT_LOOP": "uv-loop"}
    # When the operator checks before running
    done = subprocess.run([sys.executable, "-m", "worker", "--config", str(site.config), "check"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    # Then check names it as a problem, as run will: it said "no problems found" and exit code 0
    assert done.returncode == 1, done.stdout + done.stderr
    assert "config: KEMBALI_EVENT_LOOP must be 'auto', 'asyncio' or 'uvloop', not 'uv-loop'" in done.stdout
    ran = subprocess.run([sys.executable, "-m", "worker", "--config", str(site.config), "run", "--once"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert ran.returncode == 2 and "KEMBALI_EVENT_LOOP must be" in ran.stderr, ran.stderr


def test_each_win_back_step_folder_is_rendered_with_that_steps_coupon_and_number() -> None:
    """`kembali check` and the live preview render a step's folder as the sender does: with the step's own coupon
    and number, and `campaign` "winback". Every folder was rendered as step 1 (the shipped reminder, no coupon), so
    the preview of winback/ and winback-last/ showed no coupon box while every customer's email had one."""
    settings = load_settings(REPO / "config.toml")
    renders = [r for r in render_all(settings, JinjaTemplates(settings.resolve(settings.templates.dir)))
               if r.campaign.startswith("winback") and r.rendered is not None]
    shown = {(r.campaign, r.context["campaign"], r.context["step"], r.context["coupon_code"]) for r in renders}
    assert shown == {("winback-reminder", "winback", 1, ""), ("winback", "winback", 2, "KEMBALI10"),
                     ("winback-last", "winback", 3, "KEMBALI15")}
    for r in renders:
        assert r.rendered is not None
        if r.campaign == "winback-last":
            assert "KEMBALI15" in r.rendered.html and "KEMBALI15" in r.rendered.text


def test_text_outside_any_block_of_a_template_that_extends_a_layout_is_a_note(tmp_path: Path) -> None:
    # Given the operator's edits to a body that extends the layout: a line added after the content block, where
    # Jinja2 drops it (a child template sends only its blocks), and one before the extends, where it comes out
    # ahead of the layout's first line
    site = make_site(tmp_path / "shop", copy_templates=True)
    root = site.folder / "templates"
    body = root / "feedback" / "en" / "body.txt"
    body.write_text(body.read_text(encoding="utf-8") + "P.S. Free shipping this week!\n", encoding="utf-8")
    html = root / "feedback" / "id" / "body.html"
    html.write_text("Promo {{ shop.name }}\n" + html.read_text(encoding="utf-8"), encoding="utf-8")
    # and, in another body, a P.S. set aside outside the blocks and written in the content block (it is sent)
    kept = root / "winback" / "en" / "body.txt"
    kept.write_text(kept.read_text(encoding="utf-8").replace("{% block content %}", "{% set ps %}P.S. Kept{% endset %}"
                    "{% block content %}{{ ps }}", 1), encoding="utf-8")  # fmt: skip
    # When the operator checks the templates
    done = site.cli("check")
    # Then the check still passes (the emails render), with a note at each line saying what becomes of the text:
    # before, nothing said the P.S. never reached a customer
    assert done.returncode == 0, done.stdout + done.stderr
    last = len(body.read_text(encoding="utf-8").splitlines())
    assert (f"note: feedback/en/body.txt:{last}: text outside any {{% block %}} ('P.S. Free shipping this week!') "
            "is never sent: a template that extends a layout sends only its blocks") in done.stdout, done.stdout
    assert ("note: feedback/id/body.html:1: text outside any {% block %} ('Promo {{ … }}') comes before the "
            "layout's first line") in done.stdout, done.stdout
    assert "winback/en/body.txt" not in done.stdout, done.stdout
    # and the shipped templates, whose text is all in blocks, get no such note
    pristine = make_site(tmp_path / "pristine", copy_templates=True).cli("check")
    assert pristine.returncode == 0 and "outside any {% block %}" not in pristine.stdout, pristine.stdout


def test_check_notes_a_birthday_planning_schedule_with_gaps_longer_than_a_birthday_offer_needs(tmp_path: Path) -> None:
    # Given birthdays planned on weekdays only: a pass plans an offer from 26 hours before its window opens, so
    # the offers of Sundays and Mondays are planned late in their window, or never
    site = make_site(tmp_path / "weekdays", extra_toml=(
        '[campaigns.birthday]\nenabled = true\n[schedule]\nplan_cron = { birthday = "0 9 * * mon-fri" }\n'))
    # When the operator checks the config
    done = site.cli("check")
    # Then check says so, naming the key and the gap; the exit code stays 0 (it may be meant)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "note: schedule.plan_cron.birthday '0 9 * * mon-fri' leaves 72 hours between planning passes" in (
        done.stdout), done.stdout
    # Given the daily default, or birthdays off, there is no note
    for name, toml in (("daily", "[campaigns.birthday]\nenabled = true\n"),
                       ("off", '[schedule]\ndefault_plan_cron = "0 9 * * mon-fri"\n')):
        done = make_site(tmp_path / name, extra_toml=toml).cli("check")
        assert done.returncode == 0 and "between planning passes" not in done.stdout, (name, done.stdout)


def test_check_notes_quiet_hours_that_leave_only_the_night_for_sending(tmp_path: Path) -> None:
    # Given quiet hours written the wrong way round, as the hours to send in: 08:00 to 21:00
    site = make_site(tmp_path / "shop", extra_toml='[policy]\nquiet_hours_start = "08:00"\nquiet_hours_end = "21:00"\n')
    # When the operator checks the config
    done = site.cli("check")
    # Then the config is valid (it may be meant), and check says when emails would go out and what was likely meant:
    # nothing said so, and every email waited for the customer's night
    assert done.returncode == 0, done.stdout + done.stderr
    assert ("note: policy.quiet_hours_start '08:00' and quiet_hours_end '21:00' hold every email from 08:00 until "
            "21:00 on the customer's clock: emails go out only from 21:00 to 08:00, at night (quiet hours are when "
            "nothing is sent; for the night, start '21:00' and end '08:00')") in done.stdout, done.stdout
    # Given quiet hours at night, a lunch break, or none, there is no note
    for name, hours in (("night", ("21:00", "08:00")), ("lunch", ("12:00", "13:00")), ("none", ("00:00", "00:00"))):
        toml = f'[policy]\nquiet_hours_start = "{hours[0]}"\nquiet_hours_end = "{hours[1]}"\n'
        done = make_site(tmp_path / name, extra_toml=toml).cli("check")
        assert done.returncode == 0 and "note: policy.quiet_hours" not in done.stdout, (name, done.stdout)


def test_check_notes_a_contact_policy_without_any_frequency_cap(tmp_path: Path) -> None:
    # Given frequency caps emptied (no cap at all)
    site = make_site(tmp_path / "shop", extra_toml="[policy]\nfrequency_caps = []\n")
    # When the operator checks the config
    done = site.cli("check")
    # Then the config is valid (it may be meant), and check says what it means: nothing said so, and a customer due
    # several campaigns got them all the same day
    assert done.returncode == 0, done.stdout + done.stderr
    assert ("note: policy.frequency_caps is [] (no cap): a customer due several campaigns gets each one as soon as it "
            "is due, several the same day (the shipped caps, [[1, 3], [4, 30]]: at most 1 email per 3 days and 4 per "
            "30 days)") in done.stdout, done.stdout
    # Given the shipped caps, there is no note
    done = make_site(tmp_path / "capped", extra_toml="[policy]\nfrequency_caps = [[1, 3], [4, 30]]\n").cli("check")
    assert done.returncode == 0 and "frequency_caps" not in done.stdout, done.stdout


def test_check_notes_an_enabled_campaign_whose_planning_cron_never_runs(tmp_path: Path) -> None:
    # Given win-back planned on 31 February (crontab's way to pause a job), and birthdays off with the same cron
    site = make_site(tmp_path / "shop", extra_toml='[schedule]\nplan_cron = { winback = "0 0 31 2 *", '
                     'birthday = "0 0 31 2 *" }\n')
    # When the operator checks the config
    done = site.cli("check")
    # Then the config is valid (a daemon starts), and check says win-back is never planned and why: nothing said
    # so but a job_scheduled line with an empty next_run
    assert done.returncode == 0, done.stdout + done.stderr
    assert ("note: schedule.plan_cron.winback '0 0 31 2 *' never runs (no month it names (2) has a day 31): winback "
            "is enabled but never planned") in done.stdout, done.stdout
    assert "plan_cron.birthday" not in done.stdout, done.stdout
    # and with birthdays on, one note says so: not a second one about the wait between its planning passes
    site = make_site(tmp_path / "birthdays", extra_toml='[campaigns.birthday]\nenabled = true\n[schedule]\n'
                     'plan_cron = { birthday = "0 0 31 2 *" }\n')
    done = site.cli("check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line for line in done.stdout.splitlines() if "plan_cron.birthday" in line] == [
        "note: schedule.plan_cron.birthday '0 0 31 2 *' never runs (no month it names (2) has a day 31): birthday "
        "is enabled but never planned"], done.stdout


def test_check_json_says_all_the_plain_report_says_each_note_and_a_summary(tmp_path: Path) -> None:
    # Given a config check notes things in (the example shop's values, no frequency cap, a backup folder of
    # templates) and a template with a problem
    site = make_site(tmp_path / "shop", copy_templates=True, extra_toml="[policy]\nfrequency_caps = []\n")
    shutil.copytree(site.folder / "templates" / "winback", site.folder / "templates" / "winback-old")
    _edit("winback/id/body.html", "{% if bought %}", "{% if bought %}{{ oops(")(site.folder / "templates")
    plain = site.cli("check")
    # When the operator's script checks it with --json
    done = site.cli("check", "--json")
    # Then each line is one object with its type; the notes were left out of --json (`check --json` of a shop whose
    # config caps nothing printed nothing at all)
    assert done.returncode == plain.returncode == 1 and done.stderr == "", done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert {row["type"] for row in rows} == {"problem", "note", "summary"}, rows
    # every note of the plain report, word for word, each with its kind
    noted = [line.removeprefix("note: ") for line in plain.stdout.splitlines() if line.startswith("note: ")]
    notes = [row for row in rows if row["type"] == "note"]
    assert [row["message"] for row in notes] == noted, (noted, notes)
    assert [row["kind"] for row in notes][:2] == ["example_shop", "no_frequency_cap"], notes
    assert "winback-old" in [row["template"] for row in notes if row["kind"] == "unused_folder"], notes
    # the problems as before (one object each, their kind)
    assert [row["kind"] for row in rows if row["type"] == "problem"] == ["syntax"], rows
    # and, last, what the plain report says around them
    summary = rows[-1]
    assert summary == {"type": "summary", "config": summary["config"], "templates": summary["templates"],
                       "templates_checked": True, "renders": summary["renders"], "problems": 1,
                       "notes": len(noted)}, summary
    assert f"config: {summary['config']}\ntemplates: {summary['templates']} (about {summary['renders']} sample " \
        "renders" in plain.stdout, plain.stdout


def test_braces_of_css_a_script_or_a_raw_block_are_not_taken_for_a_stray_tag(templates: Path) -> None:
    # Given a layout with a media query (whose rules end in '}}'), a script, and a {% raw %} block
    _edit("_layout.html", "</head>", "<style>@media (max-width:600px){.col{width:100%}}</style>"
          '<script type="application/ld+json">{"@type":"Order","seller":{"name":"{{ shop.name }}"}}</script>'
          "</head>")(templates)
    _edit("winback/en/body.txt", "{% block content %}", "{% block content %}{% raw %}{{ }}{% endraw %}")(templates)
    # When the operator checks the templates, Then none of these is a problem
    problems = check_templates(_settings(templates), JinjaTemplates(templates))
    assert [p for p in problems if p.kind is Kind.SYNTAX] == [], "\n".join(map(str, problems))
    # and a stray '}}' is named with what to do about it
    _edit("winback/id/body.txt", "Tim {{ shop.name }}", "Tim {{ shop.name }}}}")(templates)
    (problem,) = check_templates(_settings(templates), JinjaTemplates(templates))
    assert str(problem).startswith(f"winback/id/body.txt:{_line_of(templates, 'winback/id/body.txt', 'Tim ')}: ")
    assert "'}}' is printed as text" in problem.message, problem.message


@pytest.mark.parametrize(("old", "new", "closing"), [
    ("{% endif %}\n{% if recommendations %}", "\n{% if recommendations %}", "{% endif %}"),  # met {% endblock %}
    ("{% endfor %}", "", "{% endfor %}"),  # in a partial, met the end of the file
])
def test_a_tag_left_open_is_named_at_the_line_it_opens(templates: Path, old: str, new: str, closing: str) -> None:
    # Given a template whose {% if %} (or a partial whose {% for %}) lost its closing tag
    path = "winback/id/body.html" if closing == "{% endif %}" else "_products.txt"
    opening = "{% if bought %}" if closing == "{% endif %}" else "{% for p in items %}"
    _edit(path, old, new)(templates)
    opened = _line_of(templates, path, opening)
    # When the operator checks the templates
    problems = [p for p in check_templates(_settings(templates), JinjaTemplates(templates)) if p.kind is Kind.SYNTAX]
    # Then the problem says where the tag left open is, and how to close it: Jinja2 names only the line where it
    # noticed (the {% endblock %} many lines on, or the end of the file)
    assert problems and all(p.template == path for p in problems), "\n".join(map(str, problems))
    assert f"opened at line {opened}: close it with {closing}" in problems[0].message, problems[0].message


def test_an_end_tag_too_many_is_not_taken_for_one_missing(templates: Path) -> None:
    # Given a body with one {% endif %} too many (Jinja2: "The innermost block that needs to be closed is 'block'")
    _edit("winback/en/body.html", "{% endif %}", "{% endif %}{% endif %}")(templates)
    (problem,) = [p for p in check_templates(_settings(templates), JinjaTemplates(templates)) if p.kind is Kind.SYNTAX]
    # Then the problem says to remove it, not to close the {% block %}, which is closed
    assert "This {% endif %} closes no {% if %}: remove it" in problem.message, problem.message
    assert "close it with {% endblock %}" not in problem.message, problem.message


def test_a_macro_imported_by_a_name_its_file_does_not_have_is_named(templates: Path) -> None:
    # Given a file of macros, and a body importing one of them misspelt, used only in a branch no sample takes
    (templates / "_macros.html").write_text('{% macro button(url, text) %}<a href="{{ url }}">{{ text }}</a>'
                                            "{% endmacro %}\n", encoding="utf-8")
    _edit("winback/en/body.html", "{% block content %}", '{% block content %}{% from "_macros.html" import buton %}'
          '{% if step == 9 %}{{ buton(shop.base_url, "Shop") }}{% endif %}')(templates)
    # When the operator checks the templates
    problems = check_templates(_settings(templates), JinjaTemplates(templates))
    # Then the import is named at its line, with the names the file has: Jinja2 fails only the messages that call it
    line = _line_of(templates, "winback/en/body.html", "import buton")
    assert [str(p) for p in problems] == [f"winback/en/body.html:{line}: undefined variable 'buton': _macros.html has "
                                          "no macro 'buton' (it has: button) [winback/en]"], "\n".join(
        map(str, problems))

    # and one a sample reaches is one problem, not the render's and the scan's
    _edit("winback/en/body.html", "{% if step == 9 %}{{ buton(", "{% if step == 1 %}{{ buton(")(templates)
    (problem,) = check_templates(_settings(templates), JinjaTemplates(templates))
    assert problem.kind is Kind.UNDEFINED and problem.line == line and "'buton'" in problem.message, problem


def test_css_outside_a_style_tag_of_its_file_is_not_taken_for_a_stray_tag(templates: Path) -> None:
    # Given CSS kept in a partial the layout includes inside its <style>, and a body filling a CSS block of the layout
    _edit("_layout.html", "</head>", '<style>{% include "_styles.html" %}{% block css %}{% endblock %}</style>'
          "</head>")(templates)
    (templates / "_styles.html").write_text("@media (max-width:600px){.col{width:100%}}\n", encoding="utf-8")
    _edit("winback/en/body.html", "{% block content %}",
          "{% block css %}@media (max-width:480px){.hero{padding:0}}{% endblock %}{% block content %}")(templates)
    # and a data attribute holding JSON
    _edit("_layout.html", '<body style="', '<body data-track=\'{"a":{"b":1}}\' style="')(templates)
    # When the operator checks the templates, Then none of these is a problem
    problems = check_templates(_settings(templates), JinjaTemplates(templates))
    assert [p for p in problems if p.kind is Kind.SYNTAX] == [], "\n".join(map(str, problems))
    # and a stray tag end beside them is still named: one '{' missing before a tag, and a '%}' whose '{%' lost a '%'
    _edit("winback/en/body.html", "{% block content %}", "{% block content %}{ customer.first_name }}")(templates)
    _edit("winback/id/body.txt", "Tim {{ shop.name }}", "Tim {{ shop.name }}{ if x %}")(templates)
    found = sorted((p.template, p.message.split(":")[1].strip()) for p in check_templates(
        _settings(templates), JinjaTemplates(templates)))  # fmt: skip
    assert found == [("winback/en/body.html", "'}}' is printed as text"),
                     ("winback/id/body.txt", "'%}' is printed as text")], found


def test_a_name_a_file_exports_otherwise_than_by_a_macro_is_imported_without_a_problem(templates: Path) -> None:
    # Given a file of macros whose names are set by a block {% set %} and by a macro inside a top-level {% if %}:
    # Jinja2 exports both
    (templates / "_macros.html").write_text(
        "{% set signature %}<p>Salam</p>{% endset %}\n"
        "{% if true %}{% macro button(url) %}<a href=\"{{ url }}\">Shop</a>{% endmacro %}{% endif %}\n",
        encoding="utf-8")
    _edit("winback/en/body.html", "{% block content %}", '{% block content %}{% from "_macros.html" import '
          "signature, button %}{{ signature }}{{ button(shop.base_url) }}")(templates)
    # When the operator checks the templates, Then nothing is wrong: every message renders
    problems = check_templates(_settings(templates), JinjaTemplates(templates))
    assert problems == [], "\n".join(map(str, problems))


def test_a_tag_left_open_is_named_also_after_a_set_with_a_value(templates: Path) -> None:
    # Given win-back's {% if bought %} that sets a name ({% set x = … %} closes itself) and lost its {% endif %}
    path = "winback/id/body.html"
    _edit(path, "{% if bought %}\n", "{% if bought %}{% set first = bought[0] %}\n")(templates)
    _edit(path, "{% endif %}\n{% if recommendations %}", "\n{% if recommendations %}")(templates)
    opened = _line_of(templates, path, "{% if bought %}")
    # When the operator checks the templates
    problems = [p for p in check_templates(_settings(templates), JinjaTemplates(templates)) if p.kind is Kind.SYNTAX]
    # Then the problem still names the {% if %} left open
    assert problems and problems[0].template == path, "\n".join(map(str, problems))
    assert f"opened at line {opened}: close it with {{% endif %}}" in problems[0].message, problems[0].message


def test_check_away_from_its_ledger_creates_no_database_and_says_when_it_cannot_read_one(tmp_path: Path) -> None:
    import sqlite3

    # Given a config whose SQLite ledger does not exist (checked on a build machine, before the first deploy)
    site = make_site(tmp_path)
    site.config.write_text(site.config.read_text().replace("sqlite:///kembali.db", "sqlite:///nowhere.db"))
    done = site.cli("check")
    # Then check creates no database file and has nothing to say of the ledger; the exit code is the config's
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (tmp_path / "nowhere.db").exists() and "ledger" not in done.stdout, done.stdout
    # Given a file there that is no Kembali ledger (never migrated)
    sqlite3.connect(tmp_path / "nowhere.db").execute("CREATE TABLE other (x)").connection.close()
    done = site.cli("check", "--json")
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    # Then a note says the ledger was not read, and why; still exit 0, no problem
    (note,) = [row for row in rows if row["type"] == "note" and row["kind"] == "ledger_not_read"]
    assert "has no schema" in note["message"], note
    assert done.returncode == 0 and rows[-1]["problems"] == 0, rows


def test_a_problem_found_without_rendering_names_its_campaign_and_language_in_json(tmp_path: Path) -> None:
    # Given a misspelt variable in a branch no sample customer takes, in the English win-back email
    site = make_site(tmp_path / "shop", copy_templates=True)
    _edit("winback/en/body.html", "{% if bought %}",
          '{% if bought %}{% if customer.name == "nobody" %}{{ custmer.name }}{% endif %}')(site.folder / "templates")
    # When a script checks the templates with --json
    done = site.cli("check", "--json")
    # Then the problem's object names the folder and language it breaks, as a render's does (both were empty)
    assert done.returncode == 1, done.stdout + done.stderr
    (problem,) = [row for row in map(json.loads, done.stdout.splitlines()) if row["type"] == "problem"]
    assert problem["template"] == "winback/en/body.html" and "custmer" in problem["message"], problem
    assert (problem["campaign"], problem["locale"]) == ("winback", "en"), problem
