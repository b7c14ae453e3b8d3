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


CLEAN = """
import sys
from pathlib import Path
from worker.app import remove_stale_snapshots
print(len(remove_stale_snapshots(Path(sys.argv[1]))), flush=True)
"""


def test_another_process_starting_while_a_snapshot_is_made_leaves_it_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given another worker whose start removes stale snapshots at the very moment this one makes its own: after its
    # owner file exists, before this process has locked it (two `run --once` started by the same timer)
    import worker.app as app

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    real_flock = app.fcntl.flock
    removed_by_other: list[str] = []

    def flock_after_the_other_start(fd: int, operation: int) -> None:
        if not removed_by_other:  # the first lock this process takes: its new snapshot's
            env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO)}
            done = subprocess.run([sys.executable, "-c", CLEAN, str(tmp_path)], cwd=REPO, env=env, check=True,
                                  capture_output=True, text=True, timeout=60)  # fmt: skip
            removed_by_other.append(done.stdout.strip())
        real_flock(fd, operation)

    monkeypatch.setattr(app.fcntl, "flock", flock_after_the_other_start)

    # When this process makes its snapshot
    mine = snapshot_templates(make_settings("sqlite:///unused.db", 25))  # it failed: 'cannot copy …'
    try:
        # Then the other start removed nothing, and this process's copy is whole and its own
        assert removed_by_other == ["0"]
        assert sorted(p.name for p in (mine / "t").iterdir()) == sorted(
            p.name for p in (REPO / "templates" / "email").iterdir())  # fmt: skip
        env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO)}
        again = subprocess.run([sys.executable, "-c", CLEAN, str(tmp_path)], cwd=REPO, env=env, check=True,
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert again.stdout.strip() == "0" and (mine / "t").is_dir()  # locked: a live worker's
    finally:
        remove_snapshot(mine)
