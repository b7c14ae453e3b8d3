"""What the project tells an operator matches what it does: the shipped config.toml names every key the loader
takes, the deployment notes list every log event the code emits, and the systemd unit fits the daemon's exit codes
and its stop sequence."""

from __future__ import annotations

import argparse
import ast
import configparser
import contextlib
import dataclasses
import io
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.clikit import run_cli
from worker import config, daemon

REPO = Path(__file__).resolve().parents[1]


def _event_names() -> set[str]:
    """Every event name the package logs with ``log.event("name", …)``."""
    names: set[str] = set()
    for path in (REPO / "worker").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "event"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "log" and node.args
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                names.add(node.args[0].value)
    return names


def test_every_logged_event_is_listed_in_the_deployment_notes() -> None:
    notes = (REPO / "deploy" / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"`([a-z_]+)`", notes))
    names = _event_names()
    assert len(names) > 40  # the scan found the calls
    assert sorted(names - listed) == []


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(REPO / "deploy" / "kembali.service", encoding="utf-8")
    return unit


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)\s*(s|min)?", value.strip())
    assert match, value
    return int(match[1]) * (60 if match[2] == "min" else 1)


def test_the_unit_does_not_restart_a_daemon_that_refused_its_configuration() -> None:
    """Exit code 2 (a bad config.toml, a template that fails the start-up check, a port taken) is not cured by
    starting again: with Restart=on-failure alone systemd started it over every RestartSec, for ever (five starts
    never fit in the default 10 s start limit), filling the journal instead of leaving the unit failed."""
    service = _unit()["Service"]
    assert service["Restart"] == "on-failure"
    prevented = service.get("RestartPreventExitStatus", "").split()
    assert str(daemon.EXIT_USAGE) in prevented


def test_the_units_stop_timeout_outlasts_the_daemons_stop_sequence() -> None:
    """systemd SIGKILLs after TimeoutStopSec: it must cover the grace period, the 2 s for sends cut short, the wait
    for the database to mark rows in flight, and the close, or sends that are finishing are killed unrecorded."""
    service = _unit()["Service"]
    sequence = (config.DaemonSettings.shutdown_grace_seconds + 2 + daemon.ABANDON_SECONDS
                + daemon.STUCK_CLOSE_SECONDS)
    assert _seconds(service["TimeoutStopSec"]) > sequence
    assert service["Type"] == "notify"
    assert service["KillMode"] == "mixed"  # helpers are not sent SIGTERM mid-batch; the main process stops them


def test_the_shipped_configs_stop_advice_names_the_units_timeout_and_the_daemons_stop_sequence() -> None:
    """config.toml's shutdown_grace_seconds says what to raise with it: the unit's TimeoutStopSec as shipped, and the
    margin the stop sequence after the grace period needs."""
    text = " ".join((REPO / "config.toml").read_text(encoding="utf-8").replace("#", " ").split())
    said = re.search(r"TimeoutStopSec too \((\d+) s as shipped\): keep it above this plus (\d+) s", text)
    assert said is not None
    assert _seconds(_unit()["Service"]["TimeoutStopSec"]) == int(said[1])
    assert int(said[2]) > 2 + daemon.ABANDON_SECONDS + daemon.STUCK_CLOSE_SECONDS


def _leaves(cls: type, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        if f.name in ("source", "base_dir"):
            continue
        default: Any = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += _leaves(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def test_the_shipped_config_shows_every_key_the_loader_takes() -> None:
    """config.toml "documents every key with a comment": a key the code reads but the file leaves out is one an
    operator cannot find."""
    raw = tomllib.loads((REPO / "config.toml").read_text(encoding="utf-8"))
    missing = []
    for key in _leaves(config.Settings):
        node: Any = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    assert missing == []


def test_the_readmes_mistyped_key_example_is_what_the_shipped_config_gives(tmp_path: Path) -> None:
    """The README shows the error a mistyped key of the shipped config.toml gets: its line is the file's own."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    example = re.search(r"`config\.toml: line (\d+): unknown key '([a-z_.]+)' \(did you mean '([a-z_.]+)'\?\)`",
                        readme.replace("\n", " "))
    assert example is not None
    wrong, right = example[2].rpartition(".")[2], example[3].rpartition(".")[2]
    lines = (REPO / "config.toml").read_text(encoding="utf-8").splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{right} = "))
    lines[at] = lines[at].replace(right, wrong, 1)
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        config.load_settings(path)
    except config.ConfigError as exc:
        assert str(exc) == f"{path}: {example[0].strip('`').removeprefix('config.toml: ')}"
    else:
        raise AssertionError("the mistyped key was taken")


def test_the_readme_explains_every_ledger_status_skip_reason_and_attempt_outcome() -> None:
    from worker.domain import MessageStatus, Outcome, SkipReason

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Ledger statuses and reasons"):readme.index("## Before you send")]
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE))
    assert {s.value for s in MessageStatus} <= rows
    # capped is never written: a capped message waits for its slot, then expires
    assert {r.value for r in SkipReason if r is not SkipReason.CAPPED} <= rows
    outcomes = section[section.index("Each attempt row has an"):]
    assert [o.value for o in Outcome if f"`{o.value}`" not in outcomes] == []


def _help(command: str) -> str:
    from worker.cli import _parser

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return " ".join((sub.choices[command].description or "").split())


def test_every_command_and_action_says_in_its_help_what_it_does() -> None:
    """``kembali ledger close --help`` showed its options alone: what closing does (failed or sent, and what each
    means for the frequency cap) was in the README only."""
    from worker.cli import _parser

    def commands(parser: argparse.ArgumentParser, prefix: str) -> list[tuple[str, argparse.ArgumentParser]]:
        found = [(prefix, parser)]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += commands(sub, f"{prefix} {name}")
        return found

    silent = [name for name, parser in commands(_parser(), "kembali") if not (parser.description or "").strip()]
    assert silent == [], silent


def test_every_options_help_names_its_value_as_the_usage_line_does() -> None:
    """``kembali ledger list --help`` showed ``--limit LIMIT`` and explained it as "at most N rows": the help's word
    for the value is the one the usage line and the option's row show."""
    from worker.cli import _parser

    def options(parser: argparse.ArgumentParser, prefix: str) -> list[tuple[str, argparse.Action]]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += options(sub, f"{prefix} {name}")
            elif action.option_strings and action.nargs != 0 and not action.choices:
                found.append((f"{prefix} {action.option_strings[-1]}", action))
        return found

    taking = options(_parser(), "kembali")
    shown = {name: str(action.metavar or action.dest.upper()) for name, action in taking}
    placeholders = {*shown.values(), "N"}
    named = {name: placeholders & set(re.findall(r"\b[A-Z]+\b", action.help or "")) for name, action in taking}
    wrong = {name: (shown[name], words) for name, words in named.items() if words and shown[name] not in words}
    assert wrong == {}, wrong


# (argv, the words of its --help naming exit code 3): each command that opens the database
_NEED_THE_DATABASE = [
    (["import", "customers", str(REPO / "examples" / "customers.csv")], "3 when the database cannot be used"),
    (["run", "--once"], "3 when the database cannot be used"),
    (["suppress", "list"], "3 when the database cannot be used"),
    (["preview"], "3 when the database cannot be used"),
    (["send-test", "--campaign", "winback", "--to", "me@shop.example"], "3 when the database"),
    (["stats"], "3 when the database cannot be used"),
    (["insights"], "3 when the database cannot be used"),
    (["ledger", "list"], "3 when the database cannot be used"),
]


@pytest.mark.parametrize(("argv", "said"), _NEED_THE_DATABASE, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_every_command_that_needs_the_database_gives_exit_code_3_in_its_help(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        argv: list[str], said: str) -> None:
    """Each command's --help lists its exit codes; one that stops with 3 on a database it cannot use says so (the
    import's, the ledger's and send-test's did not)."""
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-key-0123456789abcdef")
    path = tmp_path / "config.toml"
    path.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "none.db"}"\n[templates]\n'
                    f'dir = "{REPO / "templates" / "email"}"\n', encoding="utf-8")
    code, printed = run_cli(capsys, "--config", str(path), *argv)
    assert code == 3, printed
    assert "does not exist" in printed
    assert said in _help(argv[0])


def _command_lines(text: str) -> list[str]:
    """Every `kembali …` command line a document shows: in code blocks (after a shell prompt's path or `sudo -u …`),
    indented blocks and inline code."""
    found = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        found += [line.strip() for line in block.splitlines()]
    found += [line.strip() for line in text.splitlines() if line.startswith("    ")]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    found += re.findall(r"`([^`]+)`", prose.replace("\n", " "))
    lines = []
    for line in found:
        line = re.split(r"\s+#", line)[0].strip()
        match = re.search(r"(?:^|\s|/bin/)kembali\s+(?!/)(.*)$", line)
        if match and not line.startswith("kembali:") and match[1].split(" ")[0] != "COMMAND:":
            lines.append(match[1])
    return lines


def _as_argv(line: str) -> list[str] | None:
    """A synopsis (`[--at WHEN]`, `--as failed|sent`) as one command line with every option given, or None for a
    line that is no command (`… | head`, `<(…)`, placeholders)."""
    line = line.replace("(ID... | FILTERS)", "ID").replace("[FILTERS]", "")
    if re.search(r"[<>…(]|\.\.\.|\| ", line):
        return None
    line = re.sub(r"(\S+)\|\S+", r"\1", line.replace("[", "").replace("]", ""))
    return [re.sub(r"^[A-Z][A-Z_]*$", "1", word) for word in shlex.split(line)]  # --limit N: a value


@pytest.mark.parametrize("document", ["README.md", "deploy/README.md", "templates/email/README.md"])
def test_every_command_line_the_documents_show_is_one_kembali_takes(document: str) -> None:
    """A command copied from the documents is taken: no option renamed or removed since they were written."""
    from worker.cli import _parser

    lines = _command_lines((REPO / document).read_text(encoding="utf-8"))
    assert lines
    refused = []
    for line in lines:
        argv = _as_argv(line)
        if argv is None:
            continue
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                _parser().parse_args(argv)
        except SystemExit as exc:
            # a command named in a sentence (`kembali ledger`, `kembali send-test --campaign winback-last`) may leave
            # out what it requires: what it does give must be right
            if exc.code and "arguments are required" not in stderr.getvalue():
                refused.append((line, stderr.getvalue().strip().splitlines()[-1]))
    assert refused == []


# The keys config.toml sets to other than their defaults, each with a comment that says what leaving it out gives
_SHIPPED_NOT_DEFAULT = {
    "shop.postal_address",  # "When missing, a placeholder (…)"
    "campaigns.winback.steps",  # "Without [[campaigns.winback.steps]] below, one step is sent quiet_days after…"
    *(f"campaigns.{name}.holdout_share" for name in ("winback", "birthday", "new_products", "loyalty")),
    *(f"campaigns.{name}.enabled" for name in ("birthday", "feedback", "new_products", "loyalty")),  # "Off when…"
    "policy.quiet_hours_start", "policy.quiet_hours_end",  # "(also what you get when both keys are missing…)"
    "schedule.plan_cron",  # winback's is default_plan_cron's: "Campaigns not listed use default_plan_cron"
}


def _differing(shipped: Any, default: Any, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for f in dataclasses.fields(shipped):
        if f.name in ("source", "base_dir"):
            continue
        ours, theirs = getattr(shipped, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(ours):
            keys |= _differing(ours, theirs, f"{prefix}{f.name}.")
        elif ours != theirs:
            keys.add(prefix + f.name)
    return keys


def test_the_shipped_config_shows_the_defaults_but_where_its_comments_say_otherwise() -> None:
    """config.toml's first line: "a missing key takes the default shown here, unless its comment says otherwise". A
    default changed in the code, or a value changed in the file, without the other is a claim gone false."""
    shipped = config.load_settings(REPO / "config.toml")
    assert _differing(shipped, config.Settings()) == _SHIPPED_NOT_DEFAULT


def test_the_deployment_notes_list_every_metric_family() -> None:
    """deploy/README's /metrics row names what a scrape holds, for dashboards and alerts built from it."""
    from worker.metrics import Metrics

    text = Metrics().render(ledger={}, queue_depth=0, rate_limit_per_second=1.0, rate_burst=1, paused=False, now=0.0)
    families = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.MULTILINE))
    notes = (REPO / "deploy" / "README.md").read_text(encoding="utf-8")
    row = next(line for line in notes.splitlines() if line.startswith("| `/metrics` |"))
    listed = set(re.findall(r"`(kembali_[a-z_]+)", row))
    assert len(families) > 5
    assert sorted(families - listed) == []
    assert sorted(listed - families) == []  # nor one it no longer serves


def test_the_deployment_notes_list_the_debug_only_events_as_such() -> None:
    """deploy/README's "at logging.level = "debug" only:" line names the events an operator sees only at debug: one
    moved to debug and still listed above it would be looked for in vain at info."""
    debug: set[str] = set()
    for path in (REPO / "worker").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "event"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "log" and node.args
                    and isinstance(node.args[0], ast.Constant) and len(node.args) > 1
                    and ast.unparse(node.args[1]) == "logging.DEBUG"):
                debug.add(node.args[0].value)
    notes = (REPO / "deploy" / "README.md").read_text(encoding="utf-8")
    at = notes.index('at `logging.level = "debug"` only:')
    listed = set(re.findall(r"`([a-z_]+)`", notes[at:notes.index("\n\n", at)]))
    assert debug and listed == debug


def test_the_readmes_layout_names_every_module() -> None:
    """README's Layout is where a newcomer looks for a module: one left out of it (fourteen were) is one they do not
    know exists."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout"):readme.index("## License")]
    adapters = layout[layout.index("  adapters/"):layout.index("\n  pipeline.py")]
    named = set(re.findall(r"\b([a-z_]+)\.py\b", layout)) | set(re.findall(r"\b([a-z_]+)\b", adapters))
    modules = {p.stem for p in (REPO / "worker").glob("*.py")}
    modules |= {p.stem for p in (REPO / "worker" / "adapters").glob("*.py")}
    assert sorted(modules - named - {"__init__", "__main__"}) == []


@pytest.mark.parametrize("document", ["README.md", "deploy/README.md"])
def test_the_documents_toml_examples_are_valid_config_and_show_the_defaults(document: str) -> None:
    """A ```toml block of the documents is config an operator copies: every key in it is one the loader takes, and a
    value it shows is the default unless it is an example of a setting (a rate for gmail.com, quiet hours, a cron
    for win-back)."""
    examples = {"policy.quiet_hours_start", "policy.quiet_hours_end", "sending.domains", "schedule.plan_cron"}
    text = (REPO / document).read_text(encoding="utf-8")
    blocks = re.findall(r"^```toml\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    assert blocks
    for block in blocks:
        raw = tomllib.loads(block)
        shown = config.settings_from_dict(raw)  # an unknown key or a bad value raises, naming it
        assert sorted(_differing(shown, config.Settings()) - examples) == [], block


def test_the_readmes_upgrading_advice_names_every_migration_that_builds_an_index() -> None:
    # Building an index locks its table against writes (SHARE on PostgreSQL) until the upgrade commits: the README
    # named 0011, 0013, 0014 and 0018 as the reason to stop the workers, not 0017, whose own docstring says so too
    building = set()
    for path in sorted((REPO / "worker" / "migrations" / "versions").glob("0*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        ups = [node for node in tree.body if not (isinstance(node, ast.FunctionDef) and node.name == "downgrade")]
        if any(isinstance(node, ast.Attribute) and node.attr == "create_index" for up in ups for node in ast.walk(up)):
            building.add(path.name[:4])
    upgrading = " ".join((REPO / "README.md").read_text(encoding="utf-8").split("### Upgrading", 1)[1]
                         .split("\n\n", 2)[:2])
    named = set(re.search(r"stop the workers \(([^)]*)\)", upgrading).group(1).replace(",", " ").split())  # type: ignore[union-attr]
    assert building - {"0001"} <= named, sorted(building - named)


def _first_cells(section: str) -> set[str]:
    """The variables a table of the templates README names in its first column (`a`, `b.c`; several in one cell)."""
    names: set[str] = set()
    for cell in re.findall(r"^\| ([^|]*?) +\|", section, flags=re.MULTILINE):
        names |= set(re.findall(r"`([a-z_][a-z_.]*)`", cell))
    return names


def _dotted(context: dict[str, Any]) -> set[str]:
    """A template context's variables, a table's (``customer``, ``shop``, ``order``) by each of its keys."""
    return {f"{key}.{inner}" for key, value in context.items() if isinstance(value, dict) for inner in value} | {
        key for key, value in context.items() if not isinstance(value, dict)}


def test_the_templates_readme_lists_every_variable_each_campaigns_templates_receive_and_no_other() -> None:
    """The templates README is where an operator writing a template finds its variables: one the templates get and it
    leaves out (new products' ``news``, which the shipped copy uses) is one they cannot know of, and one it lists that
    the templates do not get stops every message that reads it (an undefined variable is an error)."""
    from worker.adapters.templates import JinjaTemplates
    from worker.checks import render_all

    readme = (REPO / "templates" / "email" / "README.md").read_text(encoding="utf-8")
    every = readme[readme.index("## Variables every template receives"):readme.index("### Win-back")]
    listed = {folder: _first_cells(section) for folder, section in re.findall(
        r"^### [^\n]*\(`([a-z_-]+)/`\)\n(.*?)(?=^##)", readme, flags=re.MULTILINE | re.DOTALL)}
    assert set(listed) == {"winback", "birthday", "feedback", "new_products", "loyalty"}
    settings = config.load_settings(REPO / "config.toml")
    received: dict[str, set[str]] = {}
    products: set[str] = set()
    ratings: set[str] = set()
    for result in render_all(settings, JinjaTemplates(REPO / "templates" / "email")):
        assert result.error is None, result.error
        received.setdefault(str(result.context["campaign"]), set()).update(_dotted(result.context))
        for value in result.context.values():
            if isinstance(value, list) and value and "price_minor" in value[0]:
                products |= set(value[0])
        ratings.update(*result.context.get("ratings", []))  # type: ignore[call-overload]
    assert set(received) == set(listed)
    for campaign, names in received.items():
        assert (campaign, sorted(names - _first_cells(every) - listed[campaign])) == (campaign, [])
        assert (campaign, sorted((listed[campaign] | _first_cells(every)) - names)) == (campaign, [])
    shown = re.search(r"A product is `\{([a-z_, ]+)\}`", readme)
    assert shown is not None and set(shown[1].split(", ")) == products
    rating = re.search(r"`ratings` +\| list of `\{([a-z_, ]+)\}`", readme)
    assert rating is not None and set(rating[1].split(", ")) == ratings


def test_every_commented_example_in_the_shipped_config_is_valid_where_it_is_written() -> None:
    """config.toml shows some settings as commented examples (a PostgreSQL URL, per-domain rates): uncommented in
    place, each is one the loader takes, in the table it is written under."""
    lines = (REPO / "config.toml").read_text(encoding="utf-8").splitlines()
    examples = [i for i, line in enumerate(lines) if re.match(r'#\s+("[^"]+"|[a-z_]+)\s*=\s', line)]
    assert len(examples) >= 3
    for i in examples:
        key = re.match(r'#\s+("[^"]+"|[a-z_]+)', lines[i])[1]  # type: ignore[index]
        edited = [*lines[:i], lines[i].lstrip("#").strip()]
        below = lines[i + 1:]
        ends = next((n for n, line in enumerate(below) if line.startswith("[")), len(below))
        edited += [line for line in below[:ends] if not line.startswith(f"{key} =")] + below[ends:]  # the shipped one
        config.settings_from_dict(tomllib.loads("\n".join(edited)))  # an unknown key or a bad value raises, naming it


def test_the_templates_readmes_layout_names_every_shared_file_and_no_other() -> None:
    """"Layout on disk" is where an operator finds the shared layouts and partials their templates may include: a
    shared file left out of it is one they do not know is there, one listed and gone an include that fails."""
    readme = (REPO / "templates" / "email" / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout on disk"):readme.index("<campaign>/<locale>/")]
    listed = set(re.findall(r"^  (_[a-z_]+\.[a-z]+) ", layout, flags=re.MULTILINE))
    shared = {p.name for p in (REPO / "templates" / "email").glob("_*") if p.is_file()}
    assert len(shared) >= 5
    assert listed == shared


def test_run_once_refusing_a_template_that_cannot_be_parsed_is_the_exit_code_its_help_gives(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``run --help`` gave exit code 2 for "a bad config or a template folder missing files": a file that cannot be
    parsed stops it with 2 too, and an operator reading the help for why their cron job exits 2 was not told."""
    import shutil

    from tests.clikit import migrated_config

    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-key-0123456789abcdef")
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates" / "email", templates)
    with (templates / "winback" / "en" / "body.txt").open("a", encoding="utf-8") as body:
        body.write("{% if %}\n")
    path = migrated_config(tmp_path)
    path.write_text(path.read_text(encoding="utf-8") + f'[templates]\ndir = "{templates}"\n', encoding="utf-8")
    code, printed = run_cli(capsys, "--config", str(path), "run", "--once")
    assert code == 2, printed
    assert "winback/en/body.txt" in printed and "syntax error" in printed
    assert "2 for a bad config, or a template folder missing files or using one that cannot be parsed" in _help("run")


# The keys whose config.toml comment gives another range than its first lines' "counts of days at most 3650,
# durations in seconds at most 86400", with the words it gives it in and the largest value it takes
_OTHER_RANGE = {
    "sending.retry_base_seconds": ("retry_max_seconds (at least retry_base_seconds, at most a year: 31536000)",
                                   21600.0),  # at most retry_max_seconds: its default here
    "sending.retry_max_seconds": ("at most a year: 31536000", 31536000.0),
    "checks.render_timeout_seconds": ("At most 60", 60.0),
}


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    *tables, key = dotted.split(".")
    raw: dict[str, Any] = {key: value}
    for table in reversed(tables):
        raw = {table: raw}
    return raw


@pytest.mark.parametrize("key", [key for key in _leaves(config.Settings) if key.endswith(("_days", "_seconds"))])
def test_every_count_of_days_and_seconds_takes_the_range_the_shipped_configs_first_lines_give(key: str) -> None:
    """config.toml's first lines: a value out of its range stops Kembali, "counts of days at most 3650, durations in
    seconds at most 86400, unless the key's comment gives another range": a key that takes more (or refuses its
    bound) is one the file tells an operator wrong about."""
    text = " ".join((REPO / "config.toml").read_text(encoding="utf-8").replace("#", " ").split())
    assert "counts of days at most 3650, durations in seconds at most 86400, unless the key's comment gives" in text
    default = dict(_default_values(config.Settings()))[key]
    said, largest = _OTHER_RANGE.get(key, ("", 3650 if key.endswith("_days") else 86400))
    assert said in text
    past = largest + 1
    config.settings_from_dict(_nested(key, type(default)(largest)))
    named = "sending.retry_max_seconds" if key == "sending.retry_base_seconds" else key  # "at least retry_base_seconds"
    with pytest.raises(config.ConfigError, match=re.escape(f"'{named}'")):
        config.settings_from_dict(_nested(key, type(default)(past)))


def _default_values(settings: Any, prefix: str = "") -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    for f in dataclasses.fields(settings):
        if f.name in ("source", "base_dir"):
            continue
        value = getattr(settings, f.name)
        found += (_default_values(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value)
                  else [(prefix + f.name, value)])
    return found


# (key, the least and the most it takes, the words config.toml's comment says it in)
_RANGES_SAID = [
    ("smtp.pool_size", 1, 100, "one message in flight on each (1 to 100)"),
    ("sending.batch_size", 1, 100_000, "at a time (at most 100000)"),
    ("sending.max_attempts", 1, 100, "marked failed (at most 100)"),
    ("sending.burst", 1, 100_000, "back to back (burst 1 to 100000)"),
    ("sending.domain_burst", 1, 100_000, "not listed below (burst 1 to 100000)"),
    ("sending.in_flight_per_connection", 1, 100, "`uncertain`. 1 to 100"),
    ("sending.pause_after_failures", 0, 100_000, "0 = never (at most 100000)"),
    ("sending.compose_processes", 0, 64, "(slower). At most 64"),
    ("campaigns.winback.recommendations", 0, 100, "How many products to recommend (0 to 100)"),
    ("campaigns.birthday.days_before", 0, 60, "(0 = on the day, at most 60)"),
    ("campaigns.feedback.days_after", 0, 60, "(or after the order was placed) it is sent: 0 to 60"),
    ("campaigns.new_products.max_products", 1, 100, "Products shown per email (1 to 100)"),
    ("checks.subject_max_chars", 10, 200, "are reported (10 to 200"),
    ("web.max_connections", 1, 10_000, "Connections served at once (1 to 10000)"),
]


@pytest.mark.parametrize(("key", "low", "high", "said"), _RANGES_SAID, ids=[r[0] for r in _RANGES_SAID])
def test_a_range_the_shipped_config_gives_is_the_one_the_loader_takes(key: str, low: int, high: int, said: str) -> None:
    text = " ".join((REPO / "config.toml").read_text(encoding="utf-8").replace("#", " ").split())
    assert said in text
    for taken in (low, high):
        config.settings_from_dict(_nested(key, taken))
    for refused in (low - 1, high + 1):
        with pytest.raises(config.ConfigError, match=re.escape(f"'{key}'")):
            config.settings_from_dict(_nested(key, refused))


def test_the_deployment_notes_secrets_file_is_one_systemd_reads_as_shown() -> None:
    """systemd's EnvironmentFile= has no comment after a value: `PGPASSWORD=…  # note` gives the daemon and libpq the
    password with the note in it (systemd issue 12527). The notes' example is copied as it is: every comment on its
    own line."""
    notes = (REPO / "deploy" / "README.md").read_text(encoding="utf-8")
    block = re.search(r"/etc/kembali/secrets\.env`.*?\n\n((?: {7}.*\n|\n)+?)\n?\d\. ", notes, flags=re.DOTALL)
    assert block is not None
    lines = [line.strip() for line in block[1].splitlines() if line.strip()]
    assignments = [line for line in lines if not line.startswith("#")]
    assert {line.split("=", 1)[0] for line in assignments} >= {"KEMBALI_LINK_SECRET", "KEMBALI_SMTP_PASSWORD",
                                                                "PGPASSWORD"}, lines
    assert [line for line in assignments if "#" in line] == []


def test_the_deployment_notes_health_line_is_written_as_the_text_log_writes_it() -> None:
    """The sample `health` line is what an operator greps the journal for: an empty field is written `""` there
    (`relay_throttled=""`, `paused_why=""`), not bare, so `paused_why= database=ok` matched no line."""
    from worker import log

    notes = (REPO / "deploy" / "README.md").read_text(encoding="utf-8")
    (sample,) = [line.strip() for line in notes.splitlines() if line.startswith("    health ")]
    fields = re.findall(r'(\w+)=("[^"]*"|\S*)', sample)
    assert len(fields) > 15, sample
    wrong = [(key, value) for key, value in fields
             if value != log._fmt_value(value[1:-1] if value.startswith('"') else value)]  # fmt: skip
    assert wrong == []
