"""`lambdaemu cleanup` and the janitor: find and remove what runs left behind.

Everything a run starts is labelled with its run id: work directories are
`$TMPDIR/lambdaemu-<run-id>-<kind>-*` holding an `owner.pid` file with the pid of the lambdaemu process
that made them, server processes name their work directory on their command line, and the zygote, the
environments and whatever a handler started (detached or not) carry `LAMBDAEMU_RUN_ID=<run-id>` in their
environment. A directory whose owner is gone is a leftover: its processes are stopped and the directory
removed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Iterator

import psutil

from .databases.base import WORKDIR_PREFIX
from .zygote import RUN_ID_VARIABLE

#: Run statuses that mean "the run was still going"; one whose owner is gone was killed.
UNFINISHED = ("starting", "running")


def owner_alive(workdir: Path) -> bool:
    """Whether the lambdaemu process that created `workdir` is still running."""
    try:
        pid_text, created_text = (workdir / "owner.pid").read_text().split()[:2]
        proc = psutil.Process(int(pid_text))
        created = float(created_text)
    except (psutil.NoSuchProcess, OSError, ValueError):
        return False
    # Guard against pid reuse: the owner must have started before it wrote the file.
    return proc.create_time() <= created + 1


def leftovers(root: Path | None = None, run_id: str | None = None) -> list[Path]:
    """Work directories whose owning run has ended (only those of `run_id` when given)."""
    base = Path(root or tempfile.gettempdir())
    pattern = f"{WORKDIR_PREFIX}{run_id}-*" if run_id else f"{WORKDIR_PREFIX}*"
    return [p for p in sorted(base.glob(pattern)) if p.is_dir() and not owner_alive(p)]


def labelled_processes(run_id: str) -> list[psutil.Process]:
    """Live processes carrying `LAMBDAEMU_RUN_ID=run_id` in their environment."""
    found = []
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "status"]):
        if proc.pid == me or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if proc.environ().get(RUN_ID_VARIABLE) == run_id:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _stop_workdir_processes(workdir: Path) -> Iterator[str]:
    """Stop the servers of a work directory: SIGTERM, a grace period, then SIGKILL."""
    marker = str(workdir)
    procs = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if marker in cmdline:
            procs.append((proc, cmdline))
    for proc, _ in procs:
        try:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs([p for p, _ in procs], timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    for proc, cmdline in procs:
        yield f"stopped {proc.pid} ({cmdline[:80]})"


def mark_killed(run_dir: Path) -> bool:
    """If run.json says the run was still going, mark it `killed` and recompute its summary and chart
    from its files. Returns whether it did."""
    from .results import summarize, write_json

    path = run_dir / "run.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if info.get("status") not in UNFINISHED:
        return False
    info.update(status="killed", error="the lambdaemu process ended without cleaning up (killed)",
                ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json(path, info)
    write_json(run_dir / "summary.json", summarize(run_dir))
    try:
        from .plots import chart

        chart(run_dir)
    except Exception as exc:  # noqa: BLE001 - a chart failure must not hide the rest
        (run_dir / "chart.error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
    return True


def cleanup_run(run_id: str, run_dir: Path | None = None, root: Path | None = None) -> Iterator[str]:
    """Everything one dead run left: its labelled processes, its work directories (and their servers),
    and run.json's status. Yields one line per action."""
    procs = labelled_processes(run_id)
    for proc in procs:
        try:
            proc.kill()  # environments and what they started: nothing to shut down gracefully
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)
    for proc in procs:
        yield f"killed {proc.pid} (run {run_id})"
    for workdir in leftovers(root, run_id):
        yield from _stop_workdir_processes(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        yield f"removed {workdir}"
    if run_dir is not None and mark_killed(run_dir):
        yield f"marked {run_dir} killed"


def cleanup(root: Path | None = None) -> Iterator[str]:
    """Stop the processes of leftover work directories and remove them; yield one line per action."""
    found = False
    for workdir in leftovers(root):
        found = True
        yield from _stop_workdir_processes(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        yield f"removed {workdir}"
    if not found:
        yield "nothing to clean up"
