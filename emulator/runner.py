"""The Python API: `run(config)` does what `lambdaemu run` does and returns where the results are.

Order matters and is the contract of the CLI: validate everything (settings, handler, server binaries,
an external database's reachability) before anything starts; then start the zygote (before any thread),
the database, the sampler; provision; drive the load; and on every exit path stop the environments, the
sampler and the database, and leave run.json saying how the run ended.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

from . import databases, load
from .config import RunConfig
from .errors import LambdaemuError, RunInterrupted
from .events import Events
from .handlers import check_handler
from .results import (RunDirectory, check_run_dir, environment_row, host_info, invocation_row, new_run_id, versions,
                      write_summary_and_chart)
from .sampler import RunStats, Sampler
from .supervisor import Supervisor


@dataclass(frozen=True)
class RunResult:
    """Where a run left its results and how it ended."""

    run_dir: Path
    status: str  # complete | interrupted | failed
    summary: dict[str, Any]
    signal: int | None = None
    error: str = ""

    @property
    def exit_code(self) -> int:
        """0 complete, 1 failed, 128+signal when interrupted (130 for Ctrl-C, 143 for SIGTERM)."""
        if self.status == "complete":
            return 0
        if self.status == "interrupted" and self.signal:
            return 128 + self.signal
        return 1


class Display(Protocol):
    """Live progress shown while a run goes (the CLI's is rich; tests pass none)."""

    def start(self, config: RunConfig, run_dir: Path) -> None: ...
    def phase(self, text: str) -> None: ...
    def update(self, supervisor: Supervisor, stats: RunStats, sampler: Sampler | None) -> None: ...
    def stop(self) -> None: ...


def function_env(config: RunConfig, db: databases.Database) -> dict[str, str]:
    """The function's environment variables: the database, the pool settings, then --env overrides."""
    env = db.handler_env()
    env.update(POOL_MAX=str(config.pool_max), WORK_SECONDS=f"{config.work_s:g}", WORK_DIST=config.work_dist,
               QUERIES=str(config.queries), PARALLEL_QUERIES=str(config.parallel_queries),
               FUNCTION_TIMEOUT_SECONDS=f"{config.timeout_s:g}")
    # Unset pool settings stay unset, so each library keeps its own default.
    optional = {"POOL_MIN": config.pool_min, "POOL_IDLE_SECONDS": config.pool_idle_s,
                "POOL_LIFETIME_SECONDS": config.pool_lifetime_s, "POOL_TIMEOUT_SECONDS": config.pool_timeout_s}
    env.update({key: f"{value:g}" for key, value in optional.items() if value is not None})
    if config.proxy != "none":
        env["DB_PROXY"] = config.proxy
    env.update(dict(config.env_vars))
    return env


def validate(config: RunConfig, run_id: str) -> databases.Database:
    """Everything that can be checked before starting anything; returns the (unstarted) provider."""
    check_handler(config.handler)
    return databases.create(config, run_id)


def run(config: RunConfig, *, display: Display | None = None, arrivals: Iterator[float] | None = None,
        results_root: Path | str = "results", run_id: str | None = None,
        handle_signals: bool = True, force: bool = False) -> RunResult:
    """Run one emulation and write its run directory. Raises UsageError (nothing started) for bad input.

    `force` lets `config.out` be the directory of an earlier, finished run: its files are replaced.

    `arrivals` overrides the schedule from the config (offsets in seconds from the load start), e.g.
    `load.fixed([0, 0.1, 2.0])` for an exact scenario.
    """
    run_id = run_id or new_run_id()
    db = validate(config, run_id)
    run_dir = Path(config.out) if config.out else Path(results_root) / run_id
    check_run_dir(run_dir, option="--out" if config.out else "--results-dir", given=config.out or str(results_root),
                  force=force)
    seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**31)
    if config.provider == "external":
        db.start()  # attaches only: an unreachable --db-url is a usage error, before anything starts
    results = RunDirectory(run_dir, run_id, replace=force)
    results.update(run_id=run_id, status="starting", started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   config=config.public_dict(), seed=seed, versions=versions(), host=host_info())

    events = Events()
    stats = RunStats(events)
    events.invocation_end.add_listener(lambda invocation: results.invocations.write(invocation_row(invocation)))
    events.env_end.add_listener(lambda env: results.environments.write(environment_row(env)))

    supervisor: Supervisor | None = None
    sampler: Sampler | None = None
    in_loop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        # Only record; the loop acts on it. Outside the loop (set-up), unwind through the finally below.
        received.append(signum)
        if supervisor is not None:
            supervisor.request_stop(signum)
        if not in_loop.is_set():
            raise RunInterrupted(signum)

    previous: dict[int, Any] = {}
    old_wakeup = None
    if handle_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)

    status, error, failure = "failed", "", None
    load_window = 0.0
    try:
        if display:
            display.start(config, run_dir)
            display.phase("starting environments' zygote")
        supervisor = Supervisor(config, handler_env={}, logs_dir=results.logs, events=events, run_id=run_id,
                                seed=seed)
        supervisor.start()  # the last fork of this process: no thread exists yet
        if previous:
            old_wakeup = signal.set_wakeup_fd(supervisor.wakeup_fd(), warn_on_full_buffer=False)
        if display:
            display.phase(f"starting database ({config.provider})")
        if config.provider != "external":
            db.start()
        results.update(database=db.describe())
        supervisor.handler_env = function_env(config, db)
        warm_error = supervisor.warm()
        if warm_error:
            results.update(zygote_warm_error=warm_error)
        sampler = Sampler(databases.database_view(db), supervisor, stats, results.samples,
                          interval_s=config.sample_interval_s, proxy=db if config.proxy != "none" else None)
        sampler.start()
        in_loop.set()
        if received:
            raise RunInterrupted(received[0])
        if config.provisioned:
            if display:
                display.phase(f"initialising {config.provisioned} provisioned environments")
            supervisor.provision(config.provisioned)
        if display:
            display.phase("running")
        schedule = arrivals if arrivals is not None else load.schedule(config.arrivals, config.rps, config.duration_s, seed)
        load_start = supervisor.now()
        results.update(status="running", load_start_s=round(load_start, 3))

        def tick() -> None:
            results.flush()
            if display:
                display.update(supervisor, stats, sampler)

        supervisor.run_load(schedule, load_start=load_start, on_tick=tick)
        if supervisor.stop_requested is not None:
            status = "interrupted"
        else:
            status = "complete"
    except RunInterrupted:
        status = "interrupted"
    except LambdaemuError as exc:
        status, error, failure = "failed", str(exc), exc
    except BaseException as exc:
        status, error, failure = "failed", f"{type(exc).__name__}: {exc}", exc
        if isinstance(exc, KeyboardInterrupt):
            status, received = "interrupted", received or [signal.SIGINT]
    finally:
        in_loop.clear()
        if display:
            display.phase("stopping")
        # Late signals during clean-up must not cut it short.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            if sampler is not None:
                sampler.stop()
            if supervisor is not None:
                if "load_start_s" in results.run_info:
                    # The window arrivals came in: a config's schedule ends at --duration (what follows
                    # is the drain); a given schedule, or an interrupted run, ends where it ended.
                    elapsed = supervisor.now() - results.run_info["load_start_s"]
                    load_window = min(elapsed, config.duration_s) if arrivals is None else elapsed
                supervisor.shutdown()
        finally:
            db.stop()
            if old_wakeup is not None:
                signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if display:
                display.stop()
        results.update(status=status, error=error, ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       load_window_s=round(load_window, 3), peak_environments=(
                           supervisor.peak_environments if supervisor else 0),
                       signal=signal.Signals(received[0]).name if received else None)
        results.close()
        summary = write_summary_and_chart(run_dir)
    if failure is not None and not isinstance(failure, (LambdaemuError, KeyboardInterrupt)):
        raise failure
    return RunResult(run_dir=run_dir, status=status, summary=summary,
                     signal=received[0] if received and status == "interrupted" else None, error=error)
