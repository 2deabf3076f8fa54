"""`lambdaemu cleanup`: find and remove what runs left behind.

Everything a run starts is labelled with its run id: work directories are
`$TMPDIR/lambdaemu-<run-id>-<kind>-*` holding an `owner.pid` file with the pid of the lambdaemu process
that made them, server processes name their work directory on their command line, and the zygote, the
environments and whatever a handler started (detached or not) carry `LAMBDAEMU_RUN_ID=<run-id>` in their
environment. A directory whose owner is gone is a leftover: its processes are stopped and the directory
removed. Containers carry labels with the run id and the owner's pid and start time; those of
dead runs are removed too. A run's janitor (`janitor.py`) does all of this for its own run as soon as the run is killed;
`lambdaemu cleanup` is for what even the janitor could not do (a machine that went down, say).

Run directories name their owner too (run.json `owner`: pid and process start time). A run whose
run.json still says `starting` or `running` while its owner is gone was killed outright (SIGKILL, a
crash of the machine): it is marked `killed`, with when that was noticed, and its summary.json and
chart.png are recomputed from what the files hold.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import psutil

from .databases.base import WORKDIR_PREFIX
from .processes import identity_alive
from .results import earlier_run, summarize, write_chart, write_json
from .zygote import RUN_ID_VARIABLE

#: run.json statuses of a run that has not ended yet.
UNFINISHED = ("starting", "running")


def owner_alive(workdir: Path) -> bool:
    """Whether the lambdaemu process that created `workdir` is still running."""
    try:
        pid = int((workdir / "owner.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    try:
        proc = psutil.Process(pid)
        created = float((workdir / "owner.pid").read_text().split()[1])
    except (psutil.NoSuchProcess, OSError, ValueError, IndexError):
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


def _stop_workdir(workdir: Path) -> Iterator[str]:
    """Stop the servers of a work directory (SIGTERM, a grace period, then SIGKILL) and remove it."""
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
    shutil.rmtree(workdir, ignore_errors=True)
    yield f"removed {workdir}"


def cleanup_run(run_id: str, run_dir: Path | None = None, root: Path | None = None) -> Iterator[str]:
    """Everything one dead run left: its labelled processes, its work directories (and their servers),
    and, when its run.json still says it was going, its status (`killed`). Yields one line per action."""
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
        yield from _stop_workdir(workdir)
    yield from _container_leftovers()
    if run_dir is not None:
        try:
            info = earlier_run(run_dir)
        except ValueError:
            info = None
        if info and info["status"] in UNFINISHED:
            mark_killed(run_dir)
            yield f"marked {run_dir} killed"


def killed_runs(results_dir: Path) -> list[Path]:
    """Run directories in `results_dir` whose run.json says the run has not ended but whose owner is
    gone. A run.json without an owner (written before owners were recorded) cannot tell: left alone."""
    found = []
    for run_json in sorted(Path(results_dir).glob("*/run.json")):
        try:
            info = earlier_run(run_json.parent)
        except ValueError:
            continue
        if info and info["status"] in UNFINISHED and info.get("owner") and not identity_alive(info["owner"]):
            found.append(run_json.parent)
    return found


def mark_killed(run_dir: Path) -> dict[str, Any]:
    """Mark the run in `run_dir` killed and recompute its summary and chart; returns its run.json."""
    info = json.loads((run_dir / "run.json").read_text())
    # A process killed mid-write leaves at most one partial row at the end of each file.
    for name in ("invocations.csv", "environments.csv", "samples.csv"):
        _drop_partial_row(run_dir / name)
    info.update(status="killed", killed_noticed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                error=f"the lambdaemu process (pid {info['owner']['pid']}) ended without finishing the run "
                      "(killed outright)")
    if "load_start_s" in info:
        # The window arrivals came in, as far as the files show: up to the last arrival or sample.
        last = max(_column_max(run_dir / "invocations.csv", "scheduled_s"), _column_max(run_dir / "samples.csv", "t_s"))
        window = max(0.0, last - info["load_start_s"])
        duration = info.get("config", {}).get("duration_s")
        info["load_window_s"] = round(min(window, duration) if duration else window, 3)
    # run.json last but for the chart: whoever sees it say `killed` finds the summary that goes with it.
    write_json(run_dir / "summary.json", summarize(run_dir, info))
    write_json(run_dir / "run.json", info)
    write_chart(run_dir)
    return info


def _drop_partial_row(path: Path) -> None:
    try:
        with open(path, "rb+") as fh:
            size = fh.seek(0, os.SEEK_END)
            # Rows are one line each (messages are written without newlines) and short: look back 1 MiB.
            fh.seek(max(0, size - (1 << 20)))
            tail = fh.read()
            if tail and not tail.endswith(b"\n"):
                fh.truncate(size - len(tail) + tail.rfind(b"\n") + 1)
    except FileNotFoundError:
        pass


def _column_max(path: Path, column: str) -> float:
    # Streamed: a long run's CSV need not fit in memory.
    best = 0.0
    try:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                try:
                    best = max(best, float(row.get(column) or 0))
                except ValueError:
                    pass
    except FileNotFoundError:
        pass
    return best


def cleanup(root: Path | None = None, results_dir: Path | None = None, containers: bool = True) -> Iterator[str]:
    """Mark runs in `results_dir` killed outright as killed, stop the processes of leftover work
    directories and remove them, and remove the containers of dead runs (when a Docker engine answers);
    yield one line per action."""
    found = False
    if containers:
        for line in _container_leftovers():
            found = True
            yield line
    killed = killed_runs(results_dir) if results_dir is not None else []
    for run_dir in killed:
        found = True
        info = mark_killed(run_dir)
        yield f"marked {run_dir} killed (its lambdaemu process {info['owner']['pid']} is gone); summary recomputed"
    for run_dir in killed:
        yield from cleanup_run(json.loads((run_dir / "run.json").read_text())["run_id"])
    for workdir in leftovers(root):
        found = True
        yield from _stop_workdir(workdir)
    if not found:
        yield "nothing to clean up"


def _container_leftovers() -> list[str]:
    """Remove containers labelled with the run id of a run whose lambdaemu process is gone (the owner
    pid and its start time are labels too). A machine without a Docker engine has none."""
    from .databases.docker import docker_client, remove_leftovers
    from .errors import UsageError

    try:
        client = docker_client()
    except (UsageError, ImportError):
        return []
    return remove_leftovers(client)
