"""A process killed with SIGKILL (a daemon, a `run --once`) cannot remove its private copy of the templates: the next
start removes the copies of processes that are gone, and leaves those of the workers still running alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.sendkit import REPO, make_settings
from worker.app import remove_snapshot, snapshot_templates

HOLD = """
import sys, time
from tests.sendkit import make_settings
from worker.app import snapshot_templates
snapshot = snapshot_templates(make_settings("sqlite:///unused.db", 25))
print(snapshot, flush=True)
time.sleep(600)
"""


def _holder(tmp: Path) -> tuple[subprocess.Popen[str], Path]:
    """A process that took its snapshot (in ``tmp``) and runs on."""
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, "the holder took no snapshot"
    return proc, Path(line)


def test_the_snapshot_of_a_killed_process_is_removed_at_the_next_start_and_a_live_ones_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    killed, dead_copy = _holder(tmp_path)
    alive, live_copy = _holder(tmp_path)
    try:
        # Given a worker killed with SIGKILL (no chance to remove its copy) and another still running
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert (dead_copy / "t").is_dir() and (live_copy / "t").is_dir()
        assert dead_copy.parent == tmp_path

        # When a new process takes its snapshot
        mine = snapshot_templates(make_settings("sqlite:///unused.db", 25))
        try:
            # Then the dead worker's copy is gone (it stayed for ever, ~300 KB a kill), the live one's is whole
            assert not dead_copy.exists()
            assert (live_copy / "t").is_dir() and sorted(p.name for p in (live_copy / "t").iterdir())
            assert (mine / "t").is_dir()
        finally:
            remove_snapshot(mine)
        assert not mine.exists()
    finally:
        for proc in (killed, alive):
            proc.kill()
            proc.wait(timeout=30)
            assert proc.stdout is not None
            proc.stdout.close()


def test_a_folder_of_another_program_or_an_older_kembali_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    older = tmp_path / "kembali-templates-abc123"  # an older version's: no owner to ask whether it runs
    (older / "t").mkdir(parents=True)
    other = tmp_path / "something-else"
    other.mkdir()

    mine = snapshot_templates(make_settings("sqlite:///unused.db", 25))
    remove_snapshot(mine)

    assert (older / "t").is_dir() and other.is_dir()
