"""The event loop choice: uvloop when installed, asyncio when told or when it is missing."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from worker import eventloop
from worker.errors import ConfigError

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "uvloop" if HAVE_UVLOOP else "asyncio"),
        ({"KEMBALI_EVENT_LOOP": "auto"}, "uvloop" if HAVE_UVLOOP else "asyncio"),
        ({"KEMBALI_EVENT_LOOP": "asyncio"}, "asyncio"),
        ({"KEMBALI_EVENT_LOOP": " ASYNCIO "}, "asyncio"),
    ],
)
def test_the_loop_is_uvloop_when_installed_unless_told_otherwise(env: dict[str, str], expected: str) -> None:
    assert eventloop.choice(env) == expected


def test_a_misspelt_choice_is_refused_with_the_variable_named() -> None:
    with pytest.raises(ConfigError, match="KEMBALI_EVENT_LOOP must be 'auto', 'asyncio' or 'uvloop'"):
        eventloop.choice({"KEMBALI_EVENT_LOOP": "uv"})


@pytest.mark.parametrize("name", ["asyncio", "uvloop"])
def test_run_runs_the_coroutine_on_the_chosen_loop(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    if name == "uvloop" and not HAVE_UVLOOP:
        pytest.skip("uvloop is not installed")
    monkeypatch.setenv("KEMBALI_EVENT_LOOP", name)

    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert eventloop.run(which()).startswith("uvloop" if name == "uvloop" else "asyncio")
    assert eventloop.describe().startswith(name)
