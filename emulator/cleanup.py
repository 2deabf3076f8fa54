"""`lambdaemu cleanup`: find and remove what runs left behind.

Everything a run starts is labelled with its run id: work directories are
`$TMPDIR/lambdaemu-<run-id>-<kind>-*` holding an `owner.pid` file with the pid of the lambdaemu process
that made them, and server processes name their work directory on their command line. A directory
whose owner is gone is a leftover: its processes are stopped and the directory removed. Environments
and the zygote need no sweep: they die with their parent (PR_SET_PDEATHSIG). Containers carry labels
with the run id and the owner's pid and start time; those of dead runs are removed too.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import psutil

from .databases.base import WORKDIR_PREFIX


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


def leftovers(root: Path | None = None) -> list[Path]:
    """Work directories whose owning run has ended."""
    base = Path(root or tempfile.gettempdir())
    return [p for p in sorted(base.glob(f"{WORKDIR_PREFIX}*")) if p.is_dir() and not owner_alive(p)]


def cleanup(root: Path | None = None, containers: bool = True) -> Iterator[str]:
    """Stop the processes of leftover work directories and remove them, and remove the containers of
    dead runs (when a Docker engine answers); yield one line per action."""
    found = False
    if containers:
        for line in _container_leftovers():
            found = True
            yield line
    for workdir in leftovers(root):
        found = True
        marker = str(workdir)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if marker in cmdline:
                try:
                    proc.kill()
                    proc.wait(5)
                    yield f"killed {proc.info['pid']} ({cmdline[:80]})"
                except (psutil.NoSuchProcess, psutil.TimeoutExpired):
                    pass
        shutil.rmtree(workdir, ignore_errors=True)
        yield f"removed {workdir}"
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
