"""`run --once` on templates broken on purpose: its summary names the file, line and error of each failure."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests import sendkit
from tests.shop import LINK_KEY, TEMPLATES
from tests.smtp_server import RecordingServer
from worker.cli import main

SEE = "(see `kembali ledger list --status failed`)"


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "templates"
    shutil.copytree(TEMPLATES, root)
    return root


def test_a_template_failing_every_message_is_named_in_the_summary_with_its_line_and_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, smtp_server: RecordingServer,
) -> None:
    # Given the Indonesian win-back body reading a variable its context does not have, on a line of its own
    root = _copy(tmp_path)
    body = root / "winback" / "id" / "body.html"
    text = body.read_text(encoding="utf-8")
    text = text.replace("{% block content %}", "{% block content %}\n{{ coupon.code }}", 1)
    body.write_text(text, encoding="utf-8")
    line = text.splitlines().index("{{ coupon.code }}") + 1

    # When a run finds 3 customers due it
    code, out = _run_once(tmp_path, capsys, monkeypatch, smtp_server, 3, root)

    # Then its summary says which file and line broke, what the error is and how many messages it failed
    assert code == 1 and smtp_server.messages == []
    assert "sent 0 win-back emails, 3 failed:render_error" in out, out
    assert (f"3 messages failed to render: {body} line {line}: UndefinedError: 'coupon' is undefined {SEE}"
            in out), out


def test_many_different_render_errors_show_the_commonest_and_count_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, smtp_server: RecordingServer,
) -> None:
    # Given an Indonesian win-back subject whose error quotes the customer's name (one error per customer), and a
    # body whose error is the same for all (the subject is rendered first: only a customer whose subject renders
    # reaches it; none does)
    root = _copy(tmp_path)
    subject = root / "winback" / "id" / "subject.txt"
    subject.write_text("Halo\n{% if customer.name.endswith('0') %}{{ 1 // 0 }}{% else %}{{ shop[customer.name] }}"
                       "{% endif %}\n", encoding="utf-8")

    # When a run finds 12 customers due it
    code, out = _run_once(tmp_path, capsys, monkeypatch, smtp_server, 12, root)

    # Then the summary shows the commonest error first (customers 0 and 10: a division by zero), two of the
    # per-customer ones, and counts the other messages and errors in one line
    assert code == 1 and smtp_server.messages == []
    failed = [row for row in out if "failed to render" in row]
    assert failed[0] == (f"2 messages failed to render: {subject} line 2: ZeroDivisionError: integer division or "
                         f"modulo by zero {SEE}"), out
    assert all(re.fullmatch(rf"1 message failed to render: {re.escape(str(subject))} line 2: UndefinedError: "
                            rf"'dict object' has no attribute 'Pelanggan \d+' {re.escape(SEE)}", row)
               for row in failed[1:3]), out
    assert failed[3:] == ["and 8 more messages failed to render, with 8 other errors (the log names each)"], out


def _run_once(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
              smtp_server: RecordingServer, customers: int, templates: Path) -> tuple[int, list[str]]:
    """``kembali run --once`` in this process, ``customers`` due a win-back (in Indonesian) rendered from
    ``templates``: its exit code and the lines it printed on stdout (its summary)."""
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)
    url = f"sqlite:///{tmp_path / 'k.db'}"
    sendkit.prepare_database(url, customers)
    raw = sendkit.settings_dict(url, smtp_server.port)
    raw["templates"] = {"dir": str(templates)}
    raw["policy"] = {"quiet_hours_start": "00:00", "quiet_hours_end": "00:00"}
    config = sendkit.write_config(tmp_path / "config.toml", raw)
    capsys.readouterr()
    try:
        code = main(["--config", str(config), "run", "--once"])
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().out.splitlines()
