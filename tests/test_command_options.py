"""Options of the less used commands that must not be accepted and then ignored, and files they must read whole."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.clikit import migrated_config
from tests.clikit import run_cli as kembali
from tests.shop import TEMPLATES


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = migrated_config(tmp_path)
    path.write_text(path.read_text() + f'[templates]\ndir = "{TEMPLATES}"\n', encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("given", "refused"),
    [(["--serve", "--campaign", "winback"], "--campaign"), (["--serve", "--customer", "C-1"], "--customer"),
     (["--serve", "--at", "2027-02-28T10:00+07:00"], "--at"), (["--serve", "--limit", "5"], "--limit"),
     (["--serve", "--json"], "--json"), (["--serve", "--out", "pages"], "--out"), (["--port", "0"], "--port")],
)  # fmt: skip
def test_preview_refuses_an_option_the_chosen_mode_would_ignore(
    config: Path, capsys: pytest.CaptureFixture[str], given: list[str], refused: str
) -> None:
    # `preview --serve --campaign winback` served every campaign, and `preview --port 0` ran the dry run and exited 0:
    # an operator who asked for one campaign's page, or for the live page on a free port, got something else unasked
    with socket.socket() as taken:  # were the option ignored, the page would not be served for ever: port taken
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = ["--port", str(taken.getsockname()[1])] if "--serve" in given else []
        code, out = kembali(capsys, "--config", str(config), "preview", *given, *port)
    assert code == 2 and "Traceback" not in out, out
    assert f"kembali preview: {refused} " in out
    assert "live preview on" not in out


def test_insights_says_where_its_chart_went_when_there_is_nothing_to_recommend(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # with no second purchases it returned before saying so, though the (empty) chart was written all the same
    plot = tmp_path / "gaps.png"
    code, out = kembali(capsys, "--config", str(config), "insights", "--plot", str(plot))
    assert code == 0, out
    assert "no second purchases yet: nothing to recommend" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"chart written to {plot}" in out
