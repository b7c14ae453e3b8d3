"""The Jinja2 adapter over templates/email/: the shipped win-back templates and error reporting."""

from __future__ import annotations

import os
import re
import shutil
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from worker.adapters.templates import JinjaTemplates
from worker.core.render import ShopInfo, build_context, product_dict
from worker.domain import CustomerSnapshot, Locale, ProductView
from worker.errors import TemplateError

ROOT = Path(__file__).resolve().parents[1] / "templates" / "email"
SHOP = ShopInfo(
    name="Toko Kembali",
    domain="toko.example",
    from_address="halo@toko.example",
    from_name="Toko Kembali",
    reply_to="",
    postal_address="Jl. Contoh No. 1, Jakarta 10110, Indonesia",
    base_url="https://toko.example",
    currency="IDR",
)
UNSUB = "https://toko.example/unsubscribe?t=abc123"
HOSTILE = "Kopi <script>alert(1)</script>"


def _product(n: int, name: str, price_minor: int) -> dict[str, object]:
    return product_dict(
        ProductView(
            f"P{n}", name, "Kopi", price_minor, "IDR", f"https://toko.example/p/{n}", f"https://toko.example/i/{n}.jpg"
        )
    )


def winback_context(locale: Locale, name: str = "Siti Rahayu") -> dict[str, object]:
    customer = CustomerSnapshot(1, "C1", "siti@example.com", name, locale, "Asia/Jakarta", None, True)
    return build_context(
        "winback",
        customer,
        shop=SHOP,
        unsubscribe_url=UNSUB,
        extra={
            "bought": [_product(1, "Kopi Gayo 250g", 8900000)],
            "recommendations": [
                _product(2, HOSTILE, 9500000),
                _product(3, "French Press", 24900000),
                _product(4, "Gelas Keramik", 4500000),
            ],
            "coupon_code": "KEMBALI10",
            "coupon_percent": 10,
        },
    )


@pytest.mark.parametrize(
    ("locale", "subject"),
    [
        (Locale.ID, "Kak Siti, masih suka Kopi Gayo 250g? Diskon 10% khusus untuk Kakak"),
        (Locale.EN, "Siti, still loving your Kopi Gayo 250g? Here's 10% off, just for you"),
    ],
)
def test_winback_renders_in_both_languages(locale: Locale, subject: str) -> None:
    email = JinjaTemplates(ROOT).render("winback", locale, winback_context(locale))
    assert email.subject == subject
    for part in (email.html, email.text):
        assert "Rp249.000" in part and "Rp95.000" in part and "Rp45.000" in part
        assert "Kopi Gayo 250g" in part
        assert "KEMBALI10" in part and "10%" in part
        assert UNSUB.replace("&", "&amp;") in part or UNSUB in part
        assert SHOP.postal_address in part
        assert "https://toko.example/p/3" in part
    greeting = "Halo Kak Siti," if locale is Locale.ID else "Hi Siti,"
    assert greeting in email.text
    assert f'href="{UNSUB}"' in email.html
    assert f'lang="{locale}"' in email.html
    assert len(email.template_version) == 12


@pytest.mark.parametrize("locale", list(Locale))
def test_hostile_product_name_is_escaped_in_html_only(locale: Locale) -> None:
    email = JinjaTemplates(ROOT).render("winback", locale, winback_context(locale))
    assert "<script>" not in email.html
    assert "Kopi &lt;script&gt;alert(1)&lt;/script&gt;" in email.html
    assert HOSTILE in email.text  # plain text is not HTML: no entities there


@pytest.mark.parametrize(("locale", "subject_start"), [(Locale.ID, "Kakak, masih suka"), (Locale.EN, "Still loving")])
def test_winback_without_a_name(locale: Locale, subject_start: str) -> None:
    email = JinjaTemplates(ROOT).render("winback", locale, winback_context(locale, name=""))
    assert email.subject.startswith(subject_start)


def test_winback_without_coupon_or_products() -> None:
    ctx = winback_context(Locale.ID) | {"coupon_code": "", "bought": [], "recommendations": []}
    email = JinjaTemplates(ROOT).render("winback", Locale.ID, ctx)
    assert email.subject == "Kak Siti, kami kangen!"
    assert "KEMBALI10" not in email.html and "Rp" not in email.text
    preheader = email.html.split('mso-hide:all;">', 1)[1].split("</div>", 1)[0]
    assert preheader == "Sudah lama tidak mampir, kami kangen!"  # not "new products", which it has none of



def test_a_preheader_is_followed_by_invisible_padding_so_the_inbox_preview_shows_it_alone(tmp_path: Path) -> None:
    # An inbox's preview line goes on past the preheader with the email's first text ("Toko Kembali Halo Kak
    # Siti,"): the shipped layout fills it with invisible characters, hidden, and only when there is a preheader
    email = JinjaTemplates(ROOT).render("winback", Locale.ID, winback_context(Locale.ID))
    hidden = re.findall(r'<div style="display:none;[^>]*>(.*?)</div>', email.html)
    assert len(hidden) == 2 and hidden[0].startswith("Pakai kode KEMBALI10"), hidden
    assert hidden[1] == "&#847;&zwnj;&nbsp;" * 90
    assert "&zwnj;" not in email.text
    none = tree(tmp_path, {"_layout.html": (ROOT / "_layout.html").read_text(encoding="utf-8"),
                           "_layout.txt": (ROOT / "_layout.txt").read_text(encoding="utf-8"),
                           "demo/id/subject.txt": "Halo\n",
                           "demo/id/body.html": '{% extends "_layout.html" %}{% block content %}Hi{% endblock %}',
                           "demo/id/body.txt": '{% extends "_layout.txt" %}{% block content %}Hi{% endblock %}'})
    plain = JinjaTemplates(none).render("demo", Locale.ID, winback_context(Locale.ID))
    assert "&zwnj;" not in plain.html and plain.html.count("display:none;") == 1

def test_campaigns_and_locales() -> None:
    templates = JinjaTemplates(ROOT)
    assert "winback" in templates.campaigns()
    assert templates.locales("winback") == [Locale.ID, Locale.EN]


# --- a template tree of our own --------------------------------------------------

LAYOUT_HTML = '<html>\n{% block content %}{% endblock %}\n<a href="{{ unsubscribe_url }}">x</a>\n</html>\n'
LAYOUT_TXT = "{% block content %}{% endblock %}\n{{ unsubscribe_url }}\n"
GOOD = {
    "_layout.html": LAYOUT_HTML,
    "_layout.txt": LAYOUT_TXT,
    "demo/id/subject.txt": "Halo {{ name }}\n",
    "demo/id/body.html": '{% extends "_layout.html" %}\n{% block content %}\n<p>{{ name }}</p>\n{% endblock %}\n',
    "demo/id/body.txt": '{% extends "_layout.txt" %}\n{% block content %}\n{{ name }}\n{% endblock %}\n',
}
CTX = {"name": "Siti", "unsubscribe_url": "https://u.example/x"}


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_own_tree_renders(tmp_path: Path) -> None:
    email = JinjaTemplates(tree(tmp_path, GOOD)).render("demo", Locale.ID, CTX)
    assert email.subject == "Halo Siti"
    assert "<p>Siti</p>" in email.html and "Siti\n" in email.text


@pytest.mark.parametrize(
    ("name", "text", "template", "line"),
    [
        (
            "demo/id/body.html",
            '{% extends "_layout.html" %}\n{% block content %}\n{% if %}\n{% endblock %}\n',
            "demo/id/body.html",
            3,
        ),
        ("demo/id/body.txt", "line one\nline two\n{{ name }\n", "demo/id/body.txt", 3),
        ("_layout.html", "<html>\n\n\n{% block content %}{% endblock %}\n{% endfor %}\n", "_layout.html", 5),
        ("demo/id/subject.txt", "{% for x in %}\n", "demo/id/subject.txt", 1),
        (
            "demo/id/body.html",
            '{% extends "_layout.html" %}\n{% block content %}\n\n{{ nama }}\n{% endblock %}\n',
            "demo/id/body.html",
            4,
        ),
        ("demo/id/body.txt", "a\nb\nc\nd\n{{ name }} {{ shop.name }}\n", "demo/id/body.txt", 5),
        ("_layout.txt", "{% block content %}{% endblock %}\n\n{{ footer_text }}\n", "_layout.txt", 3),
        ("demo/id/body.txt", "\n{{ name.__class__ }}\n", "demo/id/body.txt", 2),
        ("demo/id/body.txt", "\n\n{% set xs = [] %}{{ xs.append(1) }}\n", "demo/id/body.txt", 3),
        ("demo/id/body.txt", "\n{{ name | money }}\n", "demo/id/body.txt", 2),
        ("demo/id/body.txt", "\n\n\n{{ 1 // 0 }}\n", "demo/id/body.txt", 4),
        ("demo/id/body.txt", 'x\n{% include "_nope.txt" %}\n', "demo/id/body.txt", 2),
        ("demo/id/body.txt", '\n{{ 100 | money("Rp") }}\n', "demo/id/body.txt", 2),
    ],
    ids=[
        "syntax-body",
        "syntax-text",
        "syntax-layout",
        "syntax-subject",
        "undefined-html",
        "undefined-nested",
        "undefined-layout",
        "sandbox-dunder",
        "sandbox-mutation",
        "filter-type",
        "zero-division",
        "missing-include",
        "money-currency",
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, name: str, text: str, template: str, line: int) -> None:
    templates = JinjaTemplates(tree(tmp_path, GOOD | {name: text}))
    with pytest.raises(TemplateError) as info:
        templates.render("demo", Locale.ID, CTX)
    assert (info.value.template, info.value.line) == (template, line)
    assert str(info.value).startswith(f"{template}:{line}: ")


@pytest.mark.parametrize(
    "text",
    ["a\nb\n{{ " + "(" * 500 + "1" + ")" * 500 + " }}\n", "a\nb\n" + "{% if 1 %}" * 3000 + "x" + "{% endif %}" * 3000],
    ids=["brackets", "tags"],
)
def test_a_template_nested_too_deeply_for_the_parser_is_a_syntax_error_not_a_crash(tmp_path: Path, text: str) -> None:
    # Jinja2's parser recurses once per level: the RecursionError must become the file's syntax error, both when
    # sending (the version hash parses every file first) and in the lint `kembali check` and the daemon run
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.txt": text}))
    with pytest.raises(TemplateError) as info:
        templates.render("demo", Locale.ID, CTX)
    assert info.value.template == "demo/id/body.txt" and info.value.line == 3
    assert "syntax error: brackets, tags or operators nested too deeply" in str(info.value)
    assert [(p.template, p.line) for p in templates.lint(KNOWN)] == [("demo/id/body.txt", 3)]


def test_missing_include_names_the_including_line(tmp_path: Path) -> None:
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.txt": "x\n{% include name %}\n"}))
    with pytest.raises(TemplateError) as info:
        templates.render("demo", Locale.ID, CTX)
    assert (info.value.template, info.value.line) == ("demo/id/body.txt", 2)
    assert "not found: Siti" in str(info.value)


@pytest.mark.parametrize(
    ("campaign", "locale", "files", "message"),
    [
        ("demo", Locale.EN, GOOD, "not found"),
        ("nope", Locale.ID, GOOD, "not found"),
        ("../demo", Locale.ID, GOOD, "not a campaign name"),
        ("demo", Locale.ID, GOOD | {"demo/id/subject.txt": "{% if false %}x{% endif %} \n \n"}, "subject is empty"),
        ("demo", Locale.ID, {k: v for k, v in GOOD.items() if k != "_layout.txt"}, "not found"),
    ],
)
def test_other_template_errors(
    tmp_path: Path, campaign: str, locale: Locale, files: dict[str, str], message: str
) -> None:
    with pytest.raises(TemplateError, match=message):
        JinjaTemplates(tree(tmp_path, files)).render(campaign, locale, CTX)


def test_subject_is_one_line(tmp_path: Path) -> None:
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/subject.txt": "  Halo\n  {{ name }},\t apa kabar?\r\n"}))
    assert templates.render("demo", Locale.ID, CTX).subject == "Halo Siti, apa kabar?"


def _touch_later(path: Path, text: str) -> None:
    before = path.stat().st_mtime_ns
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))


@pytest.mark.parametrize("edited", ["_layout.html", "_layout.txt", "demo/id/body.html", "demo/id/subject.txt"])
def test_version_changes_when_a_used_file_changes(tmp_path: Path, edited: str) -> None:
    templates = JinjaTemplates(tree(tmp_path, GOOD))
    before = templates.template_version("demo", Locale.ID)
    assert JinjaTemplates(tmp_path).template_version("demo", "id") == before  # stable across instances
    _touch_later(tmp_path / edited, (tmp_path / edited).read_text(encoding="utf-8") + "<!-- edited -->\n")
    after = templates.template_version("demo", Locale.ID)
    assert after != before
    assert templates.render("demo", Locale.ID, CTX).template_version == after


def test_version_ignores_files_the_campaign_does_not_use(tmp_path: Path) -> None:
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"other/id/subject.txt": "x", "_unused.html": "u"}))
    before = templates.template_version("demo", Locale.ID)
    _touch_later(tmp_path / "other/id/subject.txt", "y")
    _touch_later(tmp_path / "_unused.html", "v")
    assert templates.template_version("demo", Locale.ID) == before


def test_version_follows_includes(tmp_path: Path) -> None:
    files = GOOD | {"demo/id/body.txt": '{% include "_footer.txt" %}\n', "_footer.txt": "footer\n"}
    templates = JinjaTemplates(tree(tmp_path, files))
    before = templates.template_version("demo", Locale.ID)
    _touch_later(tmp_path / "_footer.txt", "new footer\n")
    assert templates.template_version("demo", Locale.ID) != before


def test_edits_are_picked_up_without_a_restart(tmp_path: Path) -> None:
    templates = JinjaTemplates(tree(tmp_path, GOOD))
    assert templates.render("demo", Locale.ID, CTX).subject == "Halo Siti"
    _touch_later(tmp_path / "demo/id/subject.txt", "Apa kabar {{ name }}?\n")
    assert templates.render("demo", Locale.ID, CTX).subject == "Apa kabar Siti?"


@pytest.mark.parametrize("recheck_seconds", [None, 3600.0])
def test_a_sender_that_rechecks_rarely_keeps_rendering_what_it_loaded(
    tmp_path: Path, recheck_seconds: float | None
) -> None:
    templates = JinjaTemplates(tree(tmp_path, GOOD), recheck_seconds=recheck_seconds)
    before = templates.render("demo", Locale.ID, CTX)
    _touch_later(tmp_path / "demo/id/subject.txt", "Apa kabar {{ name }}?\n")
    _touch_later(tmp_path / "_layout.html", (tmp_path / "_layout.html").read_text(encoding="utf-8") + "<!-- x -->\n")
    again = templates.render("demo", Locale.ID, CTX)
    assert (again.subject, again.template_version) == (before.subject, before.template_version)
    fresh = JinjaTemplates(tmp_path).render("demo", Locale.ID, CTX)
    assert (fresh.subject, fresh.template_version) != (before.subject, before.template_version)


def test_a_sender_picks_up_edits_at_its_next_check_with_a_matching_version(tmp_path: Path) -> None:
    templates = JinjaTemplates(tree(tmp_path, GOOD), recheck_seconds=1e-9)  # every render is past the interval
    assert templates.render("demo", Locale.ID, CTX).subject == "Halo Siti"
    _touch_later(tmp_path / "demo/id/subject.txt", "Apa kabar {{ name }}?\n")
    _touch_later(tmp_path / "_layout.html", (tmp_path / "_layout.html").read_text(encoding="utf-8") + "<!-- x -->\n")
    after = templates.render("demo", Locale.ID, CTX)
    assert after.subject == "Apa kabar Siti?"
    assert "<!-- x -->" in after.html
    assert after.template_version == JinjaTemplates(tmp_path).template_version("demo", Locale.ID)


def test_shipped_templates_version_is_stable_under_copy(tmp_path: Path) -> None:
    shutil.copytree(ROOT, tmp_path / "email")
    assert JinjaTemplates(tmp_path / "email").template_version("winback", Locale.ID) == JinjaTemplates(
        ROOT
    ).template_version("winback", Locale.ID)


# --- the static check: what an include is given ------------------------------------

KNOWN = {"": {"unsubscribe_url", "locale"}, "demo": {"name", "unsubscribe_url", "locale"}}
"""The context keys the templates receive (`kembali check` passes the lint what its samples had)."""
NEEDS_LABEL = "{#- needs `label` -#}\n{{ label }}!\n"


@pytest.mark.parametrize(
    ("body", "renders"),
    [
        ('{% set label = "Halo" %}\n{% include "_label.txt" %}\n', True),
        ('{% include "_label.txt" %}\n{% set label = "Halo" %}\n', False),
        ('{% for label in ["a", "b"] %}{% include "_label.txt" %}{% endfor %}\n', True),
        ('{% with label = name %}{% include "_label.txt" %}{% endwith %}\n', True),
        ('{% with label = name %}{% endwith %}{% include "_label.txt" %}\n', False),
        ('{% if name %}{% set label = name %}{% include "_label.txt" %}{% endif %}\n', True),
        ('{% if name %}{% set label = name %}{% else %}{% set label = "" %}{% endif %}{% include "_label.txt" %}\n',
         True),
        ('{% for x in [1] %}{% set label = x %}{% endfor %}{% include "_label.txt" %}\n', False),
        ("{% set label %}<b>{{ name }}</b>{% endset %}{% include \"_label.txt\" %}\n", True),
        ('{% set label = name %}{% include "_label.txt" without context %}\n', False),
    ],
    ids=["set-before", "set-after", "loop-variable", "with", "after-with", "set-in-the-same-if",
         "set-in-every-branch", "set-inside-an-earlier-loop", "block-set", "without-context"],
)  # fmt: skip
def test_the_lint_gives_an_include_what_jinja2_gives_it(tmp_path: Path, body: str, renders: bool) -> None:
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.txt": body, "_label.txt": NEEDS_LABEL}))
    problems = templates.lint(KNOWN)
    if renders:
        assert templates.render("demo", Locale.ID, CTX).text
        assert problems == []
    else:
        with pytest.raises(TemplateError) as info:
            templates.render("demo", Locale.ID, CTX)
        assert (info.value.template, info.value.line) == ("_label.txt", 2)
        assert [str(p) for p in problems] == [
            "_label.txt:2: undefined variable 'label' (included from demo/id/body.txt:1)"
        ]


def test_the_lint_reports_an_undefined_variable_in_a_partial_even_in_a_branch_no_render_takes(
    tmp_path: Path,
) -> None:
    files = GOOD | {
        "demo/id/body.html": '{% extends "_layout.html" %}\n{% block content %}\n'
        '{% set items = [name] %}{% include "_list.html" %}\n{% endblock %}\n',
        "_list.html": "<ul>\n{% for i in items %}<li>{{ i }}</li>{% endfor %}\n"
        "{% if false %}{{ nope }}{% endif %}\n</ul>\n",
    }
    templates = JinjaTemplates(tree(tmp_path, files))
    assert "<li>Siti</li>" in templates.render("demo", Locale.ID, CTX).html
    assert [str(p) for p in templates.lint(KNOWN)] == [
        "_list.html:3: undefined variable 'nope' (included from demo/id/body.html:3)"
    ]


def test_an_include_without_context_gets_none_of_the_parents_variables(tmp_path: Path) -> None:
    files = GOOD | {
        "demo/id/body.txt": '{% set greeting = "Halo" %}\n{% include "_hi.txt" without context %}\n',
        "_hi.txt": "{{ greeting }} {{ name }}\n",
    }
    templates = JinjaTemplates(tree(tmp_path, files))
    with pytest.raises(TemplateError, match="'greeting' is undefined"):
        templates.render("demo", Locale.ID, CTX)
    assert [str(p) for p in templates.lint(KNOWN)] == [
        "_hi.txt:1: undefined variable 'greeting' (included from demo/id/body.txt:2)",
        "_hi.txt:1: undefined variable 'name' (included from demo/id/body.txt:2)",
    ]


def test_the_lint_names_every_place_a_partial_lacks_a_variable(tmp_path: Path) -> None:
    files = GOOD | {
        "demo/id/body.txt": '{% set label = "a" %}{% include "_outer.txt" %}\n{% include "_label.txt" %}\n',
        "_outer.txt": 'x\n{% include "_label.txt" %}\n',
        "_label.txt": NEEDS_LABEL,
        "other/id/subject.txt": "x\n",
        "other/id/body.html": '{% include "_label.txt" %}\n',
        "other/id/body.txt": "x\n",
    }
    problems = JinjaTemplates(tree(tmp_path, files)).lint(KNOWN | {"other": KNOWN[""]})
    assert [str(p) for p in problems] == [
        "_label.txt:2: undefined variable 'label' (included from other/id/body.html:1)"
    ]
    files["other/id/body.html"] = '{% set label = "b" %}{% include "_outer.txt" %}\n'
    files["demo/id/body.txt"] = '{% include "_outer.txt" %}\n'
    problems = JinjaTemplates(tree(tmp_path, files)).lint(KNOWN | {"other": KNOWN[""]})
    assert [str(p) for p in problems] == [
        "_label.txt:2: undefined variable 'label' (included from _outer.txt:2 in demo/id/body.txt:1)"
    ]


def test_a_set_inside_an_if_is_not_an_undefined_variable(tmp_path: Path) -> None:
    # Jinja2's own analysis lists `label` here (it is looked up when the branch is not taken)
    body = '{% if name %}{% set label = "Kak " ~ name %}{{ label }}{% endif %}\n'
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.txt": body}))
    assert "Kak Siti" in templates.render("demo", Locale.ID, CTX).text
    assert templates.lint(KNOWN) == []
    # but reading it after the if, where it may be unset, is reported
    body = '{% if name %}{% set label = "Kak " ~ name %}{% endif %}\n\n{{ label }}\n'
    problems = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.txt": body})).lint(KNOWN)
    assert [str(p) for p in problems] == ["demo/id/body.txt:3: undefined variable 'label'"]


def test_the_lint_reports_a_missing_partial_in_a_branch_no_render_takes(tmp_path: Path) -> None:
    body = 'x\n{% if false %}{% include "_gone.txt" %}{% endif %}\n{% include "_gone.txt" ignore missing %}\n'
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.txt": body}))
    assert [str(p) for p in templates.lint(KNOWN)] == ["demo/id/body.txt:2: template not found: _gone.txt"]
    with pytest.raises(TemplateError) as info:  # its version cannot be computed: the render fails, at that line too
        templates.render("demo", Locale.ID, CTX)
    assert str(info.value) == "demo/id/body.txt:2: template not found: _gone.txt"


@pytest.mark.parametrize(
    "include",
    [
        '{% include "_gone.txt" ignore missing %}',
        '{% include ["_gone.txt", "_here.txt"] %}',
        '{% include ["_gone.txt", "_gone2.txt"] ignore missing %}',
    ],
)
def test_an_include_jinja2_renders_without_a_missing_file_renders(tmp_path: Path, include: str) -> None:
    # Given an include that names a missing file Jinja2 does without (`ignore missing`, or a list's next file)
    files = GOOD | {"demo/id/body.txt": f"x\n{include}\n", "_here.txt": "here\n"}
    templates = JinjaTemplates(tree(tmp_path, files))
    # Then `kembali check` finds nothing wrong, and sending renders it (the version could not be computed: every
    # message failed with "_gone.txt: template not found", while check said all was well)
    assert templates.lint(KNOWN) == []
    text = templates.render("demo", Locale.ID, CTX).text
    assert text.startswith("x\n") and ("here" in text) == ("_here.txt" in include)


@pytest.mark.parametrize(
    ("partial", "campaigns"),
    [
        ("_products.html", {"birthday", "new_products", "winback", "winback-reminder"}),
        ("_products.txt", {"birthday", "new_products", "winback", "winback-reminder"}),
        ("_coupon.html", {"birthday", "loyalty", "winback", "winback-last", "winback-reminder"}),
    ],
)
def test_editing_a_shipped_partial_changes_the_version_of_every_campaign_that_includes_it(
    tmp_path: Path, partial: str, campaigns: set[str]
) -> None:
    root = shutil.copytree(ROOT, tmp_path / "email")
    templates = JinjaTemplates(root)

    def versions(t: JinjaTemplates) -> dict[tuple[str, Locale], str]:
        return {(c, loc): t.template_version(c, loc) for c in t.campaigns() for loc in t.locales(c)}

    before = versions(templates)
    assert len(before) == 14  # seven campaigns, two languages
    _touch_later(root / partial, (root / partial).read_text(encoding="utf-8") + "{# edited #}\n")
    after = versions(templates)
    assert {key for key in before if after[key] != before[key]} == {(c, loc) for c in campaigns for loc in Locale}
    assert versions(JinjaTemplates(root)) == after


# --- bounds: a render that never ends, values and parts too large ----------------------------------------------

ENDLESS = "x\n{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}\n"


def test_a_render_that_runs_past_its_time_limit_is_stopped_with_its_file_and_line(tmp_path: Path) -> None:
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.html": ENDLESS}), time_limit=0.3)
    with pytest.raises(TemplateError) as info:
        templates.render("demo", Locale.ID, CTX)
    assert (info.value.template, info.value.line) == ("demo/id/body.html", 2)
    assert "took more than 0.3 s" in str(info.value)
    # the thread goes on: nothing is left pending, and the next render (now fine) works
    time.sleep(0.3)
    sum(range(1_000_000))
    (tmp_path / "demo/id/body.html").write_text("<p>{{ name }}</p>\n")
    assert templates.render("demo", Locale.ID, CTX).html == "<p>Siti</p>\n"


def test_a_render_that_keeps_building_memory_in_this_process_is_stopped_with_its_file_and_line(
    tmp_path: Path,
) -> None:
    # Given a template that keeps every 1 MB string it builds, nesting each in the next, rendered in this process
    # (as `run --once` and the daemon's sending render): within the longest time limit a config may set it would
    # take 1.5 GB here, and tens of GB on a machine that allocates faster, before the time limit stopped it
    hog = "{% set ns = namespace(a=[]) %}{% for i in range(1500) %}{% set ns.a = [ns.a, 'x' * 999990 ~ i] %}"
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.html": "<p>\n" + hog + "{% endfor %}done"}),
                               time_limit=60)  # fmt: skip
    # Then the render is stopped once it has grown the process by far less, naming its file and line
    with pytest.raises(TemplateError) as info:
        templates.render("demo", Locale.ID, CTX)
    assert (info.value.template, info.value.line) == ("demo/id/body.html", 2)
    assert "more than 512 MB of memory" in str(info.value), str(info.value)
    # and the next render (now fine) works
    (tmp_path / "demo/id/body.html").write_text("<p>{{ name }}</p>\n")
    assert templates.render("demo", Locale.ID, CTX).html == "<p>Siti</p>\n"


def test_a_render_spending_its_time_in_a_codec_written_in_python_is_stopped_at_its_time_limit(tmp_path: Path) -> None:
    # Given a template that encodes a text of 10,000 different letters as punycode: the codec is Python code of the
    # standard library, quadratic in the letters, where the stop never fired (it ran its ~10 s to the end, and on
    # 60,000 letters for minutes, holding the sender's event loop all along)
    body = ('x\n{% set s = namespace(v="") %}{% for i in range(1000, 11000) %}{% set s.v = s.v ~ ("%c" % i) %}'
            '{% endfor %}{{ s.v.encode("punycode") | length }}\n')
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.html": body}), time_limit=0.3)
    started = time.monotonic()
    with pytest.raises(TemplateError) as info:
        templates.render("demo", Locale.ID, CTX)
    # Then it is stopped at its time limit, at its file and line
    assert (info.value.template, info.value.line) == ("demo/id/body.html", 2)
    assert "took more than 0.3 s" in str(info.value)
    assert time.monotonic() - started < 5  # (it took ~10 s, far beyond any load's slowing)


def test_compiling_a_long_template_does_not_count_against_the_render_time_limit(tmp_path: Path) -> None:
    # a body of 1,000 conditional lines takes Jinja2 ~0.5 s to compile (on a loaded machine, seconds) and ~1 ms
    # to render: its first render, on a cold cache, is well within a time limit of 0.1 s
    body = "".join(f"{{% if name %}}{{{{ name ~ '{i}' }}}}{{% endif %}}\n" for i in range(1000))
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.html": body}), time_limit=0.1)
    html = templates.render("demo", Locale.ID, CTX).html
    assert html.strip() == "".join(f"Siti{i}" for i in range(1000))


def test_a_stop_that_lands_where_jinja2_swallows_exceptions_still_stops_the_render(tmp_path: Path) -> None:
    # the sandbox's item lookup swallows any Exception (``d['zz'] is defined``): a stop landing there must hold
    body = "{% for a in range(100000) %}{% for b in range(40) %}{{ d['zz'] is defined }}{% endfor %}{% endfor %}"
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.html": body}), time_limit=0.05)
    for _ in range(40):
        with pytest.raises(TemplateError, match=r"took more than 0\.05 s"):
            templates.render("demo", Locale.ID, {**CTX, "d": {}})


def test_renders_in_several_threads_are_each_stopped_alone(tmp_path: Path) -> None:
    files = GOOD | {"demo/id/body.html": "{% if name == 'Loop' %}" + ENDLESS + "{% endif %}<p>{{ name }}</p>\n"}
    templates = JinjaTemplates(tree(tmp_path, files), time_limit=0.5)

    def render(name: str) -> str:
        try:
            return templates.render("demo", Locale.ID, {**CTX, "name": name}).html
        except TemplateError as exc:
            return f"failed: {exc}"

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(render, ["Loop", *(f"N{i}" for i in range(200)), "Loop"]))
    assert [r.startswith("failed: demo/id/body.html:2: the render took more than") for r in results] == (
        [True] + [False] * 200 + [True]
    )
    assert results[1:-1] == [f"<p>N{i}</p>\n" for i in range(200)]


def test_a_stop_that_fires_while_the_thread_is_in_c_lands_when_that_step_ends_and_never_after_disarming() -> None:
    # a deadline that passes inside one long step of C (here a sleep): the exception lands as soon as it returns
    from worker.adapters.templates import _WATCHDOG, RenderTimeout

    _WATCHDOG.arm(0.05, (__file__,))  # this file's code stands for a template's
    try:
        with pytest.raises(RenderTimeout):
            time.sleep(0.4)
    finally:
        _WATCHDOG.disarm()
    assert not _WATCHDOG._armed
    for _ in range(1_000_000):  # bytecode boundaries aplenty: nothing else is pending
        pass
    # a render that ends in time is never stopped afterwards
    _WATCHDOG.arm(0.05, (__file__,))
    _WATCHDOG.disarm()
    time.sleep(0.2)
    assert not _WATCHDOG._armed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{{ 'ab' * n }}", "a repetition of 2 items 10,000,000 times is more than the 1,000,000"),
        ("{{ n * [1] }}", "a repetition of 1 items 10,000,000 times"),
        ("{{ 9 ** n }}", "9 ** 10000000 has more than the 1,000,000 digits"),
    ],
)
def test_a_value_too_large_is_refused_before_it_is_built(tmp_path: Path, text: str, message: str) -> None:
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.txt": "\n" + text}))
    with pytest.raises(TemplateError) as info:
        templates.render("demo", Locale.ID, {**CTX, "n": 10_000_000})
    assert (info.value.template, info.value.line) == ("demo/id/body.txt", 2)
    assert message in str(info.value)
    # the same operators on reasonable values still work
    (tmp_path / "demo/id/body.txt").write_text("{{ '-' * 3 }} {{ 2 ** 10 }} {{ 3 * 4 }}")
    assert templates.render("demo", Locale.ID, CTX).text == "--- 1024 12"


def test_a_rendered_part_longer_than_an_email_part_may_be_fails_before_it_is_joined(tmp_path: Path) -> None:
    body = "{% for i in range(300) %}{{ big }}{% endfor %}"  # 270,000,000 characters, were they joined
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.html": body}))
    tracemalloc.start()
    try:
        with pytest.raises(TemplateError) as info:
            templates.render("demo", Locale.ID, {**CTX, "big": BIG})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.template == "demo/id/body.html"
    assert "the rendered text would build at least" in str(info.value)
    assert "more than the 1,000,000 a template may build" in str(info.value)
    assert peak < 20_000_000


BIG = "ab" * 450_000
"""900,000 characters: a long value a template may hold; a few hundred of them are hundreds of megabytes."""
HOSTILE_BUILDS = [
    ('{{ "x"|center(300000000) }}', "center(300000000) would build at least 300,000,000 characters"),
    ("{{ 'x'|indent(n) }}", "the filter indent would build at least 300,000,001 characters"),
    ('{{ ("a\\n" * 300000)|indent(big) }}', "the filter indent would build at least 270,"),
    ('{{ big|replace("ab", big) }}', "the filter replace would build at least"),
    ('{{ "%300000000d" % 1 }}', "the % operator would build at least 300,000,000 characters"),
    ('{{ "%*d" % (n, 1) }}', "the % operator would build at least 300,000,000 characters"),
    ('{{ "%.300000000f" % 1.0 }}', "the % operator would build at least 300,000,000"),
    ('{{ "%300000000s"|format(1) }}', "the filter format would build at least 300,000,000"),
    ('{{ "{:>300000000}".format(1) }}', "str.format would build at least 300,000,000 characters"),
    ('{{ "{:{}}".format(1, n) }}', "str.format would build at least 300,000,0"),
    ('{{ "{:.300000000f}".format(1.0) }}', "str.format would build at least 300,000,000"),
    ('{{ "x".ljust(n) }}', "str.ljust would build at least 300,000,000 characters"),
    ('{{ "x".zfill(n) }}', "str.zfill would build at least 300,000,000 characters"),
    ('{{ "\\t".expandtabs(n) }}', "str.expandtabs would build at least 300,000,001 characters"),
    ("{{ big.replace('ab', big) }}", "str.replace would build at least"),
    ('{{ "-".join([big] * 300) }}', "str.join would build at least 270,000,299 characters"),
    ('{{ big.encode().center(n)|length }}', "bytes.center would build at least 300,000,000 bytes"),
    ('{{ (1).to_bytes(n, "big")|length }}', "int.to_bytes would build at least 300,000,000 bytes"),
    ('{{ big ~ big }}', "the ~ operator would build at least 1,800,000 characters"),
    ("{{ big" + " ~ big" * 299 + " }}", "the ~ operator would build at least 270,000,000 characters"),
    ("{% set ns = namespace(s=big) %}{% for i in range(9) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "the ~ operator would build at least 1,800,000 characters"),
    ("{% set ns = namespace(s=big) %}{% for i in range(9) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
     "the + operator would build at least 1,800,000 characters"),
    ("{{ [big] * 300 }}", "printing a list would build at least 1,80"),
    ("{% set ns = namespace(s=big) %}{{ {'a': [ns] * 300} }}", "printing a dict would build at least 1,80"),
    ("{{ ([big] * 300)|join }}", "the filter join would build at least 1,800,000 characters"),
    ("{{ ([big] * 300)|string }}", "the filter string would build at least 1,80"),
    ("{{ ([big] * 300)|e }}", "the filter e would build at least 1,80"),
    ("{{ ([big] * 300)|tojson }}", "the filter tojson would build at least 1,80"),
    ("{{ [1, 2]|tojson(indent=n) }}", "the filter tojson would build at least 300,000,000 characters"),
    ("{{ ([[1] * 900000] * 30)|sum(start=[]) }}", "the filter sum would build at least 27,000,000 items"),
    ('{{ ("ab " * 300)|wordwrap(3, wrapstring=big) }}', "the filter wordwrap would build at least"),
    ('{{ [1]|batch(30000000, "x")|list }}', "batch(30000000) with a filler would build at least 30,000,000 items"),
    ("{{ [1]|slice(10000000)|list }}", "slice(10000000) would build at least 10,000,000 lists"),
    ('{{ ("www.a.com " * 300)|urlize(target=big) }}', "the filter urlize would build at least"),
    ("{% set x %}{% for i in range(300) %}{{ big }}{% endfor %}{% endset %}{{ x|length }}",
     "the rendered text would build at least"),
    ("{% macro m() %}{% for i in range(300) %}{{ big }}{% endfor %}{% endmacro %}{{ m()|length }}",
     "the rendered text would build at least"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), HOSTILE_BUILDS, ids=[t for t, _ in HOSTILE_BUILDS])
def test_a_value_larger_than_the_limit_is_refused_before_it_is_built_with_its_file_and_line(
    tmp_path: Path, text: str, message: str
) -> None:
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.txt": "Halo\n\n" + text + "\n"}))
    context = {**CTX, "n": 300_000_000, "big": BIG}
    tracemalloc.start()
    try:
        with pytest.raises(TemplateError) as info:
            templates.render("demo", Locale.ID, context)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (info.value.template, info.value.line) == ("demo/id/body.txt", 3)
    assert message in str(info.value)
    assert "more than the 1,000,000 a template may build" in str(info.value)
    assert peak < 20_000_000, f"{peak:,} bytes at the peak"


@pytest.mark.parametrize(
    ("text", "length"),
    [
        ("{{ (['ab'] * 450000)|join }}", 900_000),
        ("{{ big ~ 'x' * 100000 }}", 1_000_000),
        ("{{ big + 'x' * 100000 }}", 1_000_000),
        ('{{ "x"|center(1000000) }}', 1_000_000),
        ('{{ "x".rjust(1000000) }}', 1_000_000),
        ('{{ "%1000000d" % 7 }}', 1_000_000),
        ('{{ "%s%s" % (big, "x" * 100000) }}', 1_000_000),
        ('{{ "{:>1000000}".format(7) }}', 1_000_000),
        ('{{ "{}{}".format(big, "x" * 100000) }}', 1_000_000),
        ("{{ ('a' * 100000)|replace('a', 'bbbbbbbbbb') }}", 1_000_000),
        ("{{ big|wordwrap(100000) }}", 900_008),
        ("{{ ['ab'] * 1000 }}", 6_000),
        ("{% for i in range(10) %}{{ 'y' * 100000 }}{% endfor %}", 1_000_000),
    ],
)
def test_large_values_up_to_the_limit_still_render(tmp_path: Path, text: str, length: int) -> None:
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.txt": text}))
    assert len(templates.render("demo", Locale.ID, {**CTX, "big": BIG}).text) == length


def test_the_bounded_operators_and_filters_keep_their_meaning(tmp_path: Path) -> None:
    body = (
        '{{ "<" ~ name ~ 1 }} {{ ("<b>"|safe) ~ name }} {{ [1, 2] + [3] }} {{ "%s-%03d" % ("a", 7) }} '
        '{{ "%(x)s" % {"x": name} }} {{ "{}!{:>4}".format(name, 1) }} {{ ["a", "b"]|join(", ") }} '
        '{{ [{"n": "x"}, {"n": "y"}]|join("/", attribute="n") }} {{ "ab"|center(6) }}|{{ "a\nb"|indent(2) }} '
        '{{ "%s=%d"|format("k", 2) }} {{ [[1], [2]]|sum(start=[]) }} {{ [1, 2, 3]|batch(2, 0)|list }} '
        '{{ "-".join(["x", "y"]) }} {{ "ab".replace("b", "c") }} {{ {"a": 1}|tojson }} {{ (1, "x") }}\n'
    )
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.html": body}))
    assert templates.render("demo", Locale.ID, CTX).html == (
        "&lt;Siti1 <b>Siti [1, 2, 3] a-007 Siti Siti!   1 a, b x/y   ab  |a\n  b k=2 [1, 2] [[1, 2], [3, 0]] x-y ac "
        '{"a": 1} (1, &#39;x&#39;)\n'
    )  # fmt: skip


def test_jinja2s_own_bound_on_range_still_holds(tmp_path: Path) -> None:
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.txt": "\n{{ range(10000000)|join }}"}))
    with pytest.raises(TemplateError, match=r"demo/id/body\.txt:2: .*MAX_RANGE \(100000\)"):
        templates.render("demo", Locale.ID, CTX)


@pytest.mark.parametrize(
    ("files", "where"),
    [
        ({"demo/id/body.html": "<p>\n{% for i in range(300) %}\n{{ big }}\n{% endfor %}"}, ("demo/id/body.html", 3)),
        (  # inside an include, inside a block of a parent template
            {
                "demo/_layout.html": "<html>\n{% block content %}{% endblock %}",
                "demo/_loop.html": "\n\n{% for i in range(300) %}{{ big }}{% endfor %}",
                "demo/id/body.html": "{% extends 'demo/_layout.html' %}\n{% block content %}\n"
                "{% include 'demo/_loop.html' %}{% endblock %}",
            },
            ("demo/_loop.html", 3),
        ),
    ],
)
def test_a_rendered_part_over_the_limit_names_the_line_whose_output_passed_it(
    tmp_path: Path, files: dict[str, str], where: tuple[str, int]
) -> None:
    templates = JinjaTemplates(tree(tmp_path, GOOD | files))
    with pytest.raises(TemplateError) as info:
        templates.render("demo", Locale.ID, {**CTX, "big": BIG})
    assert (info.value.template, info.value.line) == where
    assert str(info.value).startswith(f"{where[0]}:{where[1]}: ")
    # the text stops at the second long value: 1.8 million characters, with the few before it
    assert re.fullmatch(r".*:\d+: the rendered text would build at least 1,800,0\d\d characters, more than the "
                        r"1,000,000 a template may build", str(info.value))  # fmt: skip


def test_a_part_over_the_limit_in_a_symlinked_include_names_the_include_by_its_name(tmp_path: Path) -> None:
    # a shared include kept outside the templates' folder, linked in: named as the template names it
    root = tree(tmp_path / "root", GOOD | {"demo/id/body.html": "<p>\n{% include 'demo/_loop.html' %}"})
    shared = tmp_path / "shared.html"
    shared.write_text("\n" * 6 + "{% for i in range(300) %}{{ big }}{% endfor %}")
    (root / "demo/_loop.html").symlink_to(shared)
    with pytest.raises(TemplateError) as info:
        JinjaTemplates(root).render("demo", Locale.ID, {**CTX, "big": BIG})
    assert (info.value.template, info.value.line) == ("demo/_loop.html", 7)


# --- campaigns whose coupon is optional -------------------------------------------


def campaign_context(
    campaign: str, locale: Locale, extra: dict[str, object], name: str = "Siti Rahayu"
) -> dict[str, object]:
    customer = CustomerSnapshot(1, "C1", "siti@example.com", name, locale, "Asia/Jakarta", None, True)
    return build_context(campaign, customer, shop=SHOP, unsubscribe_url=UNSUB, extra=extra)


NO_COUPON = {
    "birthday": {"birthday": "2027-02-28", "days_to_birthday": 0, "coupon_code": "", "coupon_percent": 0,
                 "recommendations": [_product(2, "French Press", 24900000)]},
    "loyalty": {"milestone_kind": "orders", "milestone": 5, "order_count": 5, "coupon_code": "", "coupon_percent": 0},
}  # fmt: skip


@pytest.mark.parametrize("locale", list(Locale))
@pytest.mark.parametrize("campaign", sorted(NO_COUPON))
def test_no_coupon_promises_no_gift(campaign: str, locale: Locale) -> None:
    """A birthday or loyalty campaign configured without a coupon code promises no discount and leaves no
    sentence introducing a coupon box that is not there."""
    email = JinjaTemplates(ROOT).render(campaign, locale, campaign_context(campaign, locale, NO_COUPON[campaign]))
    for part in (email.subject, re.sub(r"<[^>]*>", "", email.html), email.text):  # the words, not the styles
        assert "%" not in part, part
    if campaign == "birthday":
        assert email.subject == ("Selamat ulang tahun, Kak Siti!" if locale is Locale.ID else "Happy birthday, Siti!")
    for dangling in ("hadiah kecil", "small gift", "tanda terima kasih:", "As a thank-you:", "hadiahmu", "gift"):
        assert dangling not in email.html, dangling


def test_a_loyalty_reward_for_a_first_order_milestone_says_one_order_in_english() -> None:
    """``order_milestones = [1, …]`` (a thank-you for the first order) is a valid config: the English email said
    "That's 1 orders with us" and "ordered from … 1 times"."""
    extra = NO_COUPON["loyalty"] | {"milestone": 1, "order_count": 1}
    email = JinjaTemplates(ROOT).render("loyalty", Locale.EN, campaign_context("loyalty", Locale.EN, extra))
    assert email.subject == "Thank you, Siti! That's 1 order with us"
    for part in (email.html, email.text):
        assert "You have now ordered from Toko Kembali once." in part, part
        assert "1 times" not in part and "1 orders" not in part
    six = NO_COUPON["loyalty"] | {"order_count": 6}
    email = JinjaTemplates(ROOT).render("loyalty", Locale.EN, campaign_context("loyalty", Locale.EN, six))
    assert email.subject == "Thank you, Siti! That's 6 orders with us"
    assert "You have now ordered from Toko Kembali 6 times." in email.text


@pytest.mark.parametrize("locale", list(Locale))
def test_winback_reminder_without_recommendations_promises_none(locale: Locale) -> None:
    """The first win-back step for a customer with nothing to recommend says hello and no more: no
    "you might like:" in front of an empty list, in either part or the preheader."""
    ctx = winback_context(locale) | {"coupon_code": "", "recommendations": []}
    email = JinjaTemplates(ROOT).render("winback-reminder", locale, ctx)
    for promise in ("suka", "might like", "would like", "baru", "new", "pilihan", "picks"):
        assert promise not in email.text and promise not in email.html, promise
    with_picks = JinjaTemplates(ROOT).render("winback-reminder", locale, winback_context(locale))
    assert ("suka:" if locale is Locale.ID else "might like:") in with_picks.text
    assert "French Press" in with_picks.text and "French Press" in with_picks.html


LONG_TITLE = "Kain Batik Tulis Solo Motif Sido Mukti Warna Sogan Klasik Ukuran 2,5 Meter Bahan Katun Primisima"


@pytest.mark.parametrize("locale", list(Locale))
@pytest.mark.parametrize("folder", ["winback", "winback-reminder", "new_products"])
def test_a_long_product_title_is_shortened_in_the_subject(folder: str, locale: Locale) -> None:
    """Marketplace-style product titles run to 100 characters: in the subject they are cut at a word, so the
    subject stays under 80 characters and the offer after the product is still read; the body keeps the title."""
    long = _product(9, LONG_TITLE, 45000000)
    ctx = winback_context(locale) | {"bought": [long], "products": [long], "new": True}
    email = JinjaTemplates(ROOT).render(folder, locale, ctx)
    assert len(email.subject) <= 80, email.subject
    assert "Kain Batik Tulis" in email.subject and "…" in email.subject and LONG_TITLE not in email.subject
    if folder == "winback":
        assert email.subject.endswith("khusus untuk Kakak" if locale is Locale.ID else "just for you"), email.subject
    assert LONG_TITLE in email.text and LONG_TITLE in email.html


def test_a_file_saved_with_a_byte_order_mark_renders_without_it(tmp_path: Path) -> None:
    # Given templates saved by an editor that starts UTF-8 files with a BOM (Windows Notepad)
    root = tree(tmp_path, GOOD)
    for name in ("demo/id/subject.txt", "demo/id/body.txt", "_layout.html"):
        (root / name).write_bytes(b"\xef\xbb\xbf" + (root / name).read_bytes())
    email = JinjaTemplates(root).render("demo", Locale.ID, CTX)
    # Then no U+FEFF reaches the subject (an invisible character made it an encoded-word) or the parts
    assert email.subject == "Halo Siti"
    assert "\ufeff" not in email.text and "\ufeff" not in email.html


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
@pytest.mark.parametrize("name", ["demo/id/body.txt", "_layout.txt"])
def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path: Path, name: str, bom: bytes) -> None:
    # Given a file saved in Latin-1 (or Windows-1252), not UTF-8: "Café" on its second line; or one with a
    # byte-order mark as well (the byte named was the one three before the bad one, and so could be the line)
    root = tree(tmp_path, GOOD)
    (root / name).write_bytes(bom + (root / name).read_bytes().replace(b"\n", "\nCaf\xe9\n".encode("latin-1"), 1))
    templates = JinjaTemplates(root)
    with pytest.raises(TemplateError) as info:
        templates.render("demo", Locale.ID, CTX)
    # Then the error names that file and line, and what to do (it named the file including it, or no line)
    assert (info.value.template, info.value.line) == (name, 2)
    assert str(info.value) == f"{name}:2: not UTF-8 text (byte 0xe9): save the file as UTF-8"
    assert [str(p) for p in templates.lint(KNOWN)] == [str(info.value)]


def test_money_of_a_computed_price_says_how_to_make_it_whole(tmp_path: Path) -> None:
    # A template showing a discounted price multiplies it: a float, which money refuses; the error says what to do
    body = "\n{{ (24900000 * 0.9) | money }}\n"
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.txt": body}))
    with pytest.raises(TemplateError) as info:
        templates.render("demo", Locale.ID, CTX)
    assert (info.value.template, info.value.line) == ("demo/id/body.txt", 2)
    assert "not float" in str(info.value) and "| round | int | money" in str(info.value)
    fixed = "\n{{ (24900000 * 0.9) | round | int | money }}\n"
    templates = JinjaTemplates(tree(tmp_path / "fixed", GOOD | {"demo/id/body.txt": fixed}))
    assert "Rp224.100" in templates.render("demo", Locale.ID, CTX).text


@pytest.mark.parametrize("amount", ["10 ** 4000", "-(10 ** 999999)"])
def test_money_of_an_amount_no_price_can_have_is_refused_at_once_saying_why(tmp_path: Path, amount: str) -> None:
    # A template's arithmetic gone wrong (a price raised to a power) gives an amount of thousands of digits: money
    # failed with "InvalidOperation: [<class 'decimal.InvalidOperation'>]", and on a million digits only after
    # 20 s inside Babel and Decimal, which the render's time limit cannot stop
    body = "\n{{ (" + amount + ") | money }}\n"
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.txt": body}), time_limit=2.0)
    with pytest.raises(TemplateError) as info:
        templates.render("demo", Locale.ID, CTX)
    assert (info.value.template, info.value.line) == ("demo/id/body.txt", 2)
    assert "money: an amount of " in str(info.value) and "more than the 1,000 digits" in str(info.value)
    # an amount of a thousand digits still prints, every digit of it
    whole = "\n{{ (10 ** 997) | money }}\n"
    templates = JinjaTemplates(tree(tmp_path / "whole", GOOD | {"demo/id/body.txt": whole}))
    assert templates.render("demo", Locale.ID, CTX).text.strip().replace(".", "") == "Rp1" + "0" * 995


def test_half_a_character_in_the_output_names_the_file(tmp_path: Path) -> None:
    # An emoji pasted as JSON writes it (two escaped halves, "\ud83d\ude0a") makes two lone surrogates: no UTF-8
    # can carry them, and the message failed later as "cannot build the message: 'utf-8' codec can't encode
    # character '\ud83d' in position 1190", naming no file
    body = 'Halo\n{{ "Terima kasih \\ud83d\\ude0a" }}\n'
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.txt": body}))
    with pytest.raises(TemplateError) as info:
        templates.render("demo", Locale.ID, CTX)
    assert info.value.template == "demo/id/body.txt"
    assert "line 2 of its output" in str(info.value) and "lone surrogate" in str(info.value)
    assert str(info.value).startswith("demo/id/body.txt: ")


@pytest.mark.parametrize(
    ("name", "length", "expected"),
    [
        # a name with no space to cut at is cut where one character a reader sees ends, never inside it: not a flag's
        # first letter alone (a boxed "I"), not a family emoji without its last member, not a letter without its accent
        ("🇮🇩🇮🇩🇮🇩🇮🇩", 6, "🇮🇩🇮🇩…"),
        ("Kopi👨\u200d👩\u200d👧Gayo", 8, "Kopi…"),
        ("Cafe\u0301Latte", 5, "Caf…"),
        ("Kopi👍🏽Gayo", 6, "Kopi…"),
        # as Jinja2 cuts them: at a space, or where a name fits
        ("Kopi Gayo 🇮🇩 Aceh", 12, "Kopi Gayo…"),
        ("Kopi🇮🇩", 6, "Kopi🇮🇩"),
        ("Kopi Gayo", 4, "Kop…"),
    ],
)
def test_truncate_never_cuts_inside_what_shows_as_one_character(
    tmp_path: Path, name: str, length: int, expected: str
) -> None:
    body = f'{{{{ name | truncate({length}, end="…", leeway=0) }}}}|{{{{ name | truncate({length}, True, "…", 0) }}}}'
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.txt": body}))
    out = templates.render("demo", Locale.ID, {**CTX, "name": name}).text
    assert out == f"{expected}|{expected}", [hex(ord(c)) for c in out]  # the second cuts words too (killwords)


@pytest.mark.parametrize("locale", list(Locale))
@pytest.mark.parametrize("folder", ["winback", "winback-reminder"])
def test_the_shipped_win_back_templates_show_as_many_recommendations_as_the_config_asks(
        folder: str, locale: Locale) -> None:
    """config.toml's ``campaigns.winback.recommendations`` is "How many products to recommend (0 to 100)": the
    shipped win-back templates cut the list at three, so a shop that asked for four got three, whatever it set."""
    from worker.checks import composer_for_samples, render_sample
    from worker.config import settings_from_dict
    from worker.core import samples

    steps = [{"days": 45, "template": "winback-reminder"},
             {"days": 75, "template": "winback", "coupon_code": "KEMBALI10", "coupon_percent": 10}]
    settings = settings_from_dict({"campaigns": {"winback": {"recommendations": 4, "steps": steps}}})
    composer = composer_for_samples(settings, JinjaTemplates(ROOT))
    result = render_sample(composer, folder, locale, samples.samples(locale)[0])
    assert result.error is None and result.rendered is not None, result.error
    names = [p["name"] for p in result.context["recommendations"]]  # type: ignore[attr-defined]
    assert len(names) == 4
    for name in names:
        assert name in result.rendered.text, name
        assert name.replace("&", "&amp;").replace('"', "&#34;").replace("<", "&lt;").replace(">", "&gt;") in \
            result.rendered.html, name


def test_a_template_signing_with_the_from_name_gets_the_shop_name_when_from_name_is_empty(tmp_path: Path) -> None:
    """config.toml: "an empty from_name uses name", and the From header did; ``{{ shop.from_name }}`` in a template
    (a signature: "Salam, {{ shop.from_name }}") printed nothing."""
    from worker.config import settings_from_dict

    files = {**GOOD, "demo/id/body.txt": "Salam, {{ shop.from_name }}\n"}
    templates = JinjaTemplates(tree(tmp_path, files))
    for from_name, shown in (("", "Batik Sari"), ("Sari dari Batik Sari", "Sari dari Batik Sari")):
        shop = ShopInfo.from_settings(settings_from_dict({"shop": {"name": "Batik Sari", "from_name": from_name}}).shop)
        customer = CustomerSnapshot(1, "C1", "siti@example.com", "Siti", Locale.ID, "Asia/Jakarta", None, True)
        context = build_context("demo", customer, shop=shop, unsubscribe_url=UNSUB, extra={"name": "Siti"})
        assert templates.render("demo", Locale.ID, context).text.strip() == f"Salam, {shown}"


@pytest.mark.parametrize("text", ["22/11/2026", "November 22, 2026", "", "2026-11-22xyz", "2026-11-22 oops"])
def test_date_of_a_text_that_is_no_iso_date_names_the_text_as_given(tmp_path: Path, text: str) -> None:
    # The filter read the first ten characters: "22/11/2026" failed as "Invalid isoformat string: '22/11/2026'", but
    # "November 22, 2026" as "Invalid isoformat string: 'November 2'", a text the template never had; and it took
    # "2026-11-22xyz" as 22 November, whatever followed the date
    body = "\n{{ when | date }}\n"
    templates = JinjaTemplates(tree(tmp_path, GOOD | {"demo/id/body.txt": body}))
    with pytest.raises(TemplateError) as info:
        templates.render("demo", Locale.ID, CTX | {"when": text})
    assert (info.value.template, info.value.line) == ("demo/id/body.txt", 2)
    assert f"date expects a date or an ISO date string such as 2027-02-28, not {text!r}" in str(info.value)
    fine = JinjaTemplates(tree(tmp_path / "fine", GOOD | {"demo/id/body.txt": body}))
    for iso in ("2026-11-22", "2026-11-22T10:00:00+07:00", "2026-11-22 23:30", "2026-11-22T10:00Z"):
        assert fine.render("demo", Locale.ID, CTX | {"when": iso}).text.strip() == "22 November 2026"


def _contrast_on_white(colour: str) -> float:
    """WCAG 2's contrast ratio of ``#rrggbb`` text on white."""
    def channel(c: int) -> float:
        s = c / 255
        return s / 12.92 if s <= 0.04045 else ((s + 0.055) / 1.055) ** 2.4

    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    luminance = 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)
    return 1.05 / (luminance + 0.05)


def test_the_footer_and_its_unsubscribe_link_are_legible_on_the_white_card() -> None:
    # the 12px footer, the unsubscribe link in it, was #888888 on white: 3.5:1, under WCAG AA's 4.5:1 for small text
    layout = (ROOT / "_layout.html").read_text(encoding="utf-8")
    footer = layout[layout.index("font-size:12px"):layout.index("</td>", layout.index("font-size:12px"))]
    colours = re.findall(r"color:(#[0-9a-fA-F]{6})", "font-size:12px" + footer)
    assert len(colours) >= 3, footer  # the footer's text and the unsubscribe link of each language
    for colour in colours:
        assert _contrast_on_white(colour) >= 4.5, colour
