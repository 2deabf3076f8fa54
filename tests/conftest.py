"""Shared fixtures: one real embedded PostgreSQL for the session, and a helper that runs a scenario
through the real runner (real zygote, real environment processes) and reads back the run directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import textwrap
import uuid
from pathlib import Path
from typing import Any, Iterable

import psutil
import pytest

from emulator import load
from emulator.config import RunConfig
from emulator.databases.postgres import PostgresServer
from emulator.results import read_csv
from emulator.runner import run
from emulator.zygote import RUN_ID_VARIABLE

ROOT = Path(__file__).resolve().parent.parent
#: The real command, as a user runs it.
LAMBDAEMU = [sys.executable, "-m", "emulator.cli"]


@pytest.fixture(scope="session")
def postgres() -> Iterable[PostgresServer]:
    """An embedded PostgreSQL server shared by the tests that only need *a* database."""
    with PostgresServer(provider="embedded", run_id="tests", max_connections=60) as db:
        yield db


class Scenario:
    """A finished run: its result, and its CSV files as lists of dicts."""

    def __init__(self, result: Any) -> None:
        self.result = result
        self.dir = result.run_dir
        self.invocations = read_csv(self.dir / "invocations.csv")
        self.environments = read_csv(self.dir / "environments.csv")
        self.samples = read_csv(self.dir / "samples.csv")
        self.summary = json.loads((self.dir / "summary.json").read_text())
        self.run = json.loads((self.dir / "run.json").read_text())

    def statuses(self) -> list[str]:
        return [r["status"] for r in sorted(self.invocations, key=lambda r: int(r["seq"]))]


def write_handler(tmp_path: Path, code: str, name: str = "handler_under_test.py") -> str:
    """Write a handler module and return its --handler spec."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return f"{path}:handler"


@pytest.fixture
def scenario(tmp_path: Path, postgres: PostgresServer):
    """Run `arrivals` (offsets in seconds) through the real runner against the session database."""

    def _run(arrivals: list[float], *, handler: str | None = None, **settings: Any) -> Scenario:
        settings.setdefault("init_delay_s", 0)
        settings.setdefault("sample_interval_s", 0.2)
        # These scenarios count environments and handler calls exactly: no baseline environment first.
        settings.setdefault("baseline", "off")
        if settings.get("provider", "external") == "external":
            settings.update(provider="external", db_url=postgres.url)
        config = RunConfig(out=str(tmp_path / "run"), duration_s=max(arrivals, default=0) + 0.001,
                           handler=handler or "workloads.sqlalchemy_pool:handler", **settings)
        result = run(config, arrivals=load.fixed(arrivals), handle_signals=False)
        scenario = Scenario(result)
        assert_no_leftovers(scenario.run["run_id"])
        return scenario

    return _run


def emulator_processes(run_id: str) -> list[psutil.Process]:
    """The zygote and environments of run `run_id` still alive (labelled in their environment)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "zygote_main" not in cmdline or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if proc.environ().get(RUN_ID_VARIABLE) == run_id:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def assert_no_leftovers(run_id: str) -> None:
    """No environment or zygote process of run `run_id` outlives it."""
    gone, alive = psutil.wait_procs(emulator_processes(run_id), timeout=5)
    assert not alive, f"left running: {[p.pid for p in alive]}"


def new_run_id() -> str:
    """A run id for a test that starts servers itself (their work directories carry it)."""
    return f"test-{uuid.uuid4().hex[:8]}"


def processes_under(path: Path) -> list[psutil.Process]:
    """Live processes whose command line names `path` (a server's work directory)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and str(path) in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


@pytest.fixture
def server_tmpdir() -> Iterable[Path]:
    """A TMPDIR for commands that start servers: as root, servers run as an unprivileged user, who must be
    able to reach their work directory (pytest's own tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="test-servers-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def admin_rows(db: PostgresServer, sql: str) -> list[tuple]:
    """Run a query as the server's superuser."""
    with db.admin_connect() as conn:
        return conn.execute(sql).fetchall()


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    return env


def lambdaemu_servers(run_dir: Path | None = None) -> set[int]:
    """Pids of database servers started by lambdaemu runs (their work directory carries the prefix and
    the run id); only those of the run in `run_dir` when given."""
    marker = "lambdaemu-"
    if run_dir is not None:
        marker += json.loads((run_dir / "run.json").read_text())["run_id"]
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if marker in cmdline and any(s in cmdline for s in ("postgres", "mariadbd", "mysqld", "pgbouncer")):
            found.add(proc.pid)
    return found


def wait_for_status(run_json: Path, status: str, timeout: float = 60) -> None:
    """Wait until run.json says `status`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads(run_json.read_text()).get("status") == status:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"run.json never said {status}")


def lambdaemu(*args: str, cwd: Path, timeout: float = 120, tmpdir: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `lambdaemu` command to completion (with `tmpdir` as its TMPDIR when given)."""
    env = cli_env()
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)  # where any server work directory of this run would be created
    return subprocess.run([*LAMBDAEMU, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def kill_janitor(run_id: str) -> None:
    """Kill the janitor of run `run_id`, as a machine going down with the run would: then only
    `lambdaemu cleanup` is left to clean up after it."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "janitor_main" in cmdline and run_id in cmdline:
            proc.kill()
