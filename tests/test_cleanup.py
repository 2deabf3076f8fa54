"""`lambdaemu cleanup` removes what a dead run left behind and leaves live runs alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from emulator.cleanup import cleanup, leftovers


def _workdir(root: Path, run_id: str, owner_pid: int, started: float) -> Path:
    path = root / f"lambdaemu-{run_id}-postgres-abc"
    path.mkdir()
    (path / "owner.pid").write_text(f"{owner_pid} {started:.0f}\n")
    return path


def test_cleanup_kills_processes_of_dead_runs_and_removes_their_directories(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan_dir = _workdir(tmp_path, "20260101-000000-dead", dead.pid, time.time())
    live_dir = _workdir(tmp_path, "20260101-000000-live", os.getpid(), time.time())
    # A "server" still running from the dead run: its command line names the work directory.
    server = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(60)", str(orphan_dir / "data")])
    try:
        assert leftovers(tmp_path) == [orphan_dir]
        lines = list(cleanup(tmp_path, containers=False))
        assert server.wait(10) is not None
        assert any(f"stopped {server.pid}" in line for line in lines)
        assert f"removed {orphan_dir}" in lines
        assert not orphan_dir.exists() and live_dir.exists()
        assert list(cleanup(tmp_path, containers=False)) == ["nothing to clean up"]
    finally:
        if server.poll() is None:
            server.kill()


def test_cleanup_command_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "emulator.cli", "cleanup"], capture_output=True, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == "nothing to clean up"
