"""The Python API: `run(config)` does what `lambdaemu run` does and returns where the results are.

Order matters and is the contract of the CLI: validate everything (settings, handler, server binaries,
an external database's reachability) before anything starts; then start the janitor, the zygote and the
sampler process (before any thread: they are forks of this process), the database; provision; drive the
load; and on every exit path stop the environments, the sampler and the database, and leave run.json
saying how the run ended.

Signals (when `handle_signals` is true, as the CLI sets it): SIGINT, SIGTERM and SIGHUP only record and
wake the loop. During set-up (a database starting) the first one unwinds the set-up; in the loop it asks
the loop to stop; during the clean-up it is recorded and the clean-up goes on. A second SIGINT or
SIGTERM makes the clean-up fast: environments are killed without a grace period and the last sample and
the chart are skipped (the display says so in one line).
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

from . import databases, load
from .config import FunctionConfig, RunConfig
from .errors import LambdaemuError, RunInterrupted, UsageError
from .events import Events
from .fleet import FleetRecorder, FleetState
from .handlers import check_handler
from .janitor import Janitor
from .loop import Loop
from . import runtimes as runtime_commands
from .runtimes import RuntimeCommand, runtime_family
from .results import (RunDirectory, check_run_dir, environment_row, host_info, invocation_line, new_run_id, versions,
                      write_summary_and_chart)
from .sampler import SamplerConfig, SamplerProcess
from .scenario import Scenario, first_burst, target_rate
from .supervisor import Supervisor
from .thresholds import THRESHOLD_EXIT, parse_threshold
from .zygote import ZygoteClient

#: How often the counters reach the sampler and the display.
PUBLISH_S = 0.1
#: Signals that stop a run (SIGHUP: the terminal went away).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class RunResult:
    """Where a run left its results and how it ended."""

    run_dir: Path
    status: str  # complete | interrupted | failed
    summary: dict[str, Any]
    signal: int | None = None
    error: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def failed_thresholds(self) -> list[dict[str, Any]]:
        """The thresholds that failed, with their measured values."""
        return [t for t in self.summary.get("thresholds", []) if not t["passed"]]

    @property
    def exit_code(self) -> int:
        """0 complete, 99 complete with failed thresholds, 1 failed, 128+signal when interrupted (130 for
        Ctrl-C, 143 for SIGTERM)."""
        if self.status == "complete":
            return THRESHOLD_EXIT if self.failed_thresholds else 0
        if self.status == "interrupted" and self.signal:
            return 128 + self.signal
        return 1


class Display(Protocol):
    """Live progress shown while a run goes (the CLI's is rich; tests pass none)."""

    def start(self, config: RunConfig, run_dir: Path) -> None: ...
    def phase(self, text: str) -> None: ...
    def update(self, supervisor: Supervisor, fleet: FleetState) -> None: ...
    def stop(self) -> None: ...


def function_env(config: RunConfig, db: databases.Database, application: str | None = None) -> dict[str, str]:
    """The function's environment variables: the database (as `application`'s own user, when given),
    the pool settings, then --env overrides."""
    env = db.handler_env(application) if application is not None else db.handler_env()
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


def validate(scenario: Scenario | RunConfig, run_id: str,
             database: databases.Database | None = None) -> databases.Database:
    """Everything that can be checked before starting anything; returns the (unstarted) provider, or
    `database` (already started by the caller) once it is known to have every application's user."""
    if isinstance(scenario, RunConfig):
        scenario = Scenario.from_config(scenario)
    for config in scenario.configs:
        if runtime_family(config.handler, config.runtime) == "python":
            check_handler(config.handler)
        else:
            runtime_command(config)  # checks the file, the runtime and its packages without running them
    for text in scenario.run.thresholds:
        try:
            parse_threshold(text, scenario.applications)
        except ValueError as exc:
            raise UsageError(f"--threshold: {exc}") from None
    if database is not None:
        missing = sorted(set(scenario.applications) - set(database.applications))
        if missing:
            raise UsageError(f"the database given to run() has no user for {', '.join(missing)}; start it with "
                             f"applications={list(scenario.applications)!r}")
        return database
    return databases.create(scenario.run, run_id, applications=scenario.applications)


def runtime_command(config: RunConfig) -> RuntimeCommand:
    """How a function of a Runtime API runtime (Node.js, provided) starts its environments."""
    return runtime_commands.command(config.handler, config.runtime, function_name=config.function_name,
                                    memory_mb=config.memory_mb)


def function_config(config: RunConfig, env_vars: dict[str, str]) -> FunctionConfig:
    """The supervisor's view of one function: a Python handler runs in the zygote's forks; any other
    runtime is a program of its own, started with its Runtime API variables added to the function's."""
    function = FunctionConfig.from_run_config(config, env_vars)
    if runtime_family(config.handler, config.runtime) == "python":
        return function
    command = runtime_command(config)
    return dataclasses.replace(function, env_vars=tuple({**env_vars, **command.variables}.items()),
                               exec_argv=tuple(command.argv), cwd=command.cwd)


def application_seed(seed: int, name: str, index: int) -> int:
    """Each application's own arrival stream: the run's seed for the first (so a one-function run's
    schedule depends on --seed alone), a seed derived from the name for the others."""
    return seed if index == 0 else (seed + zlib.crc32(name.encode())) % 2**31


class _Signals:
    """What signals do in each phase of a run (see the module docstring).

    The order signals arrived in is read from a wakeup pipe that CPython's C-level handler writes each
    signal number to as it is delivered: two signals sent microseconds apart can have their Python handlers
    run nested in either order, and the first one is the one that says why the run ended (Ctrl-C then
    SIGTERM ends 130, not 143)."""

    def __init__(self) -> None:
        self.phase = "setup"  # setup | loop | cleanup
        self.received: list[int] = []
        self._raised = False  # set-up unwinds once, however many signals came
        self.supervisor: Supervisor | None = None
        self.on_fast: Any = None
        self._previous: dict[int, Any] = {}
        self._order_r: int | None = None
        self._order_w: int | None = None
        self._previous_wakeup = -1

    @property
    def fast(self) -> bool:
        """A second stop signal came: clean up without waiting."""
        return len(self.received) >= 2

    def install(self) -> None:
        self._order_r, self._order_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous_wakeup = signal.set_wakeup_fd(self._order_w, warn_on_full_buffer=False)
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._order_w is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            os.close(self._order_r)
            os.close(self._order_w)
            self._order_r = self._order_w = None

    def _arrived(self, signum: int) -> list[int]:
        """The stop signals delivered since the last call, in delivery order: none when an earlier, nested
        handler already took this one from the pipe; the handler's own signal when there is no pipe.

        Signals found in the pipe together arrived before any Python code ran in between, i.e. within
        microseconds, and their bytes can be reversed: CPython's C handler runs with other signals
        unblocked, so a signal sent just after can interrupt it before it writes its own byte. They are
        taken in the order the kernel delivers signals pending at once, lowest number first (Ctrl-C,
        then SIGTERM)."""
        if self._order_r is None:
            return [signum]
        arrived = []
        while True:
            try:
                chunk = os.read(self._order_r, 64)
            except BlockingIOError:
                break
            if not chunk:
                break
            arrived.extend(s for s in chunk if s in STOP_SIGNALS)
        return sorted(arrived)

    def _handle(self, signum: int, frame: Any) -> None:
        for sig in self._arrived(signum):
            self.received.append(sig)
            if self.supervisor is not None:
                self.supervisor.request_stop(sig)
                if len(self.received) >= 2:
                    self.supervisor.hurry()
            if len(self.received) == 2 and self.on_fast is not None:
                self.on_fast()
        if self.phase == "setup" and self.received and not self._raised:
            self._raised = True
            raise RunInterrupted(self.received[0])


def run(target: RunConfig | Scenario, *, display: Display | None = None, arrivals: Iterator[float] | None = None,
        results_root: Path | str = "results", run_id: str | None = None,
        handle_signals: bool = False, force: bool = False,
        database: databases.Database | None = None) -> RunResult:
    """Run one emulation (a `RunConfig`: one function; or a `Scenario`: functions and services sharing
    an account and a database) and write its run directory. Raises UsageError (nothing started) for bad
    input.

    `force` lets `config.out` be the directory of an earlier, finished run: its files are replaced.

    `arrivals` overrides the schedule from the config (offsets in seconds from the load start), e.g.
    `load.fixed([0, 0.1, 2.0])` for an exact scenario. `handle_signals` installs handlers for SIGINT,
    SIGTERM and SIGHUP for the duration of the run (the CLI does; a library caller decides).
    `database`: a provider the caller started (a sweep's, a test session's): the run uses it as it is and
    leaves it running; clearing what an earlier run left on it is the caller's part.
    """
    scenario = target if isinstance(target, Scenario) else Scenario.from_config(target)
    config = scenario.run
    names = scenario.applications
    if arrivals is not None and len(names) != 1:
        raise UsageError("arrivals= gives one schedule: use it with a one-function run, or give each function "
                         "of a scenario its load")
    run_id = run_id or new_run_id()
    run_dir = Path(config.out) if config.out else Path(results_root) / run_id
    check_run_dir(run_dir, option="--out" if config.out else "--results-dir", given=config.out or str(results_root),
                  force=force)
    db = validate(scenario, run_id, database)
    seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**31)
    if config.provider == "external" and database is None:
        db.start()  # attaches only: an unreachable --db-url is a usage error, before anything starts
    results = RunDirectory(run_dir, run_id, replace=force)
    results.update(run_id=run_id, status="starting", started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   config=config.public_dict(), seed=seed, versions=versions(), host=host_info(),
                   targets={c.function_name: target_rate(c) for c in scenario.configs},
                   services=[s.name for s in scenario.services])
    if scenario.source:
        results.update(scenario=scenario.public_dict())

    signals = _Signals()
    if handle_signals and threading.current_thread() is threading.main_thread():
        signals.install()

    events = Events()
    fleet = FleetState(names)
    recorder = FleetRecorder(fleet, events, {name: i for i, name in enumerate(names)})
    events.invocation_end.add_listener(
        lambda invocation: invocation.probe or results.invocations.write_line(invocation_line(invocation)))
    events.env_end.add_listener(lambda env: env.probe or results.environments.write(environment_row(env)))
    loop = Loop()
    janitor = Janitor(run_id, run_dir, results.logs / "janitor.log")
    zygote = ZygoteClient(results.logs, run_id, nice=config.env_nice)
    sampler = SamplerProcess(fleet, results.logs / "sampler.log")
    supervisor: Supervisor | None = None
    status, error, failure = "failed", "", None
    load_window = 0.0
    notes: list[str] = []

    def say_fast() -> None:
        notes.append("stopped fast (second signal): environments killed without a grace period; "
                     "no last sample; chart skipped")
        if display:
            display.phase(notes[-1])

    signals.on_fast = say_fast
    try:
        if display:
            display.start(config, run_dir)
            display.phase("starting environments' zygote")
        janitor.start()
        # Processes of our own, started before any thread exists: they are the last forks of this process.
        zygote.start()
        sampler.start()
        if display:
            display.phase(f"starting database ({config.provider})")
        if config.provider != "external" and database is None:
            db.start()
        results.update(database=db.describe())
        env_vars = {c.function_name: function_env(c, db, c.function_name) for c in scenario.configs}
        warm_error = zygote.warm(env_vars[names[0]])
        if warm_error:
            results.update(zygote_warm_error=warm_error)
        # Fork ahead what the first burst of cold starts will ask for, while nothing else competes for
        # the CPU: in the burst, each cold start then only takes a child that is already there.
        if display:
            display.phase("forking environments' processes ahead of the load")
        results.update(zygote_reserve={"asked": first_burst(scenario),
                                       "forked": zygote.reserve(first_burst(scenario))},
                       environment_priority={"nice": config.env_nice, "session_nice": zygote.session_nice})
        supervisor = Supervisor(
            [function_config(f, env_vars[f.function_name]) for f in scenario.functions]
            + [dataclasses.replace(FunctionConfig.from_run_config(s.config, env_vars[s.name]), instances=s.instances,
                                   concurrency=s.concurrency) for s in scenario.services],
            concurrency_limit=config.concurrency_limit, zygote=zygote, loop=loop, events=events,
            logs_dir=results.logs, run_id=run_id, seed=seed)
        supervisor.start()
        # The wall-clock time of t0, for views aligned on the clock (CloudWatch's 1-minute periods).
        results.update(t0_unix=round(time.time() - supervisor.now(), 3))
        sampling = sampler.begin(SamplerConfig(
            db=databases.database_view(db), proxy=db if config.proxy != "none" else None,
            interval_s=config.sample_interval_s, t0=supervisor.t0, samples_path=str(results.samples_path),
            functions_path=str(results.functions_path), connections_path=str(results.connections_path),
            functions=tuple(names)))
        if not sampling:
            results.update(sampler_error=f"the sampler took no first sample; see {results.logs / 'sampler.log'}")
        signals.supervisor = supervisor
        signals.phase = "loop"
        if signals.received:
            raise RunInterrupted(signals.received[0])
        if config.baseline == "on" and scenario.functions:
            if display:
                display.phase("measuring one environment alone (baseline)")
            results.update(baseline={f.function_name: supervisor.measure_baseline(f.function_name)
                                     for f in scenario.functions})
        provisioned = sum(f.provisioned for f in scenario.functions)
        instances = sum(s.instances for s in scenario.services)
        if provisioned or instances:
            if display:
                display.phase(f"initialising {provisioned} provisioned environments and {instances} service instances")
            supervisor.provision()
        if display:
            display.phase("running")
        load_start = supervisor.now()
        results.update(status="running", load_start_s=round(load_start, 3))
        for index, c in enumerate(scenario.configs):
            schedule = arrivals if arrivals is not None else load.schedule(
                c.arrivals, c.rps, c.duration_s, application_seed(seed, c.function_name, index), c.profile)
            supervisor.add_arrivals(c.function_name, schedule, load_start)

        def tick() -> None:
            results.flush()
            assert supervisor is not None
            supervisor.reap_vanished(fleet.is_released)
            supervisor.enforce_memory()
            if display:
                display.update(supervisor, fleet)

        if signals.received:
            supervisor.request_stop(signals.received[0])

        def publish() -> None:
            recorder.publish()
            loop.call_later(PUBLISH_S, publish)

        publish()
        supervisor.run(on_tick=tick)
        status = "interrupted" if supervisor.stop_requested is not None else "complete"
    except RunInterrupted:
        status = "interrupted"
    except LambdaemuError as exc:
        status, error, failure = "failed", str(exc), exc
    except BaseException as exc:
        status, error, failure = "failed", f"{type(exc).__name__}: {exc}", exc
        if isinstance(exc, KeyboardInterrupt):
            status = "interrupted"
            signals.received.append(signal.SIGINT)
    finally:
        while True:
            # A signal may land before the phase changes (and raise out of set-up code once more): every
            # step below is idempotent, so the clean-up simply starts again.
            try:
                signals.phase = "cleanup"
                if display:
                    display.phase("stopping")
                if supervisor is not None and "load_start_s" in results.run_info:
                    # The window arrivals came in: a config's schedule ends at --duration (what follows
                    # is the drain); a given schedule, or an interrupted run, ends where it ended.
                    elapsed = supervisor.now() - results.run_info["load_start_s"]
                    load_window = min(elapsed, scenario.duration_s) if arrivals is None else elapsed
                recorder.publish()  # the last sample sees every count
                _clean_up(supervisor, zygote, sampler, db if database is None else None, signals)
                break
            except RunInterrupted:
                continue
        if display:
            display.stop()
        results.update(status=status, error=error, ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       load_window_s=round(load_window, 3),
                       peak_environments=supervisor.peak_environments if supervisor else 0,
                       signal=signal.Signals(signals.received[0]).name if signals.received else None)
        results.close()
        summary = write_summary_and_chart(run_dir, chart=not signals.fast)
        fleet.close()
        loop.close()
        janitor.done()
        signals.restore()
    if failure is not None and not isinstance(failure, (LambdaemuError, KeyboardInterrupt)):
        raise failure
    received = signals.received
    return RunResult(run_dir=run_dir, status=status, summary=summary,
                     signal=received[0] if received and status == "interrupted" else None, error=error,
                     notes=tuple(notes))


def _clean_up(supervisor: Supervisor | None, zygote: ZygoteClient, sampler: SamplerProcess,
              db: databases.Database | None, signals: _Signals) -> None:
    """Stop everything the run started, in order; each step is idempotent."""
    try:
        sampler.stop(fast=signals.fast)
        if supervisor is not None:
            supervisor.shutdown(fast=signals.fast)
        zygote.close()
    finally:
        if db is not None:  # None: the caller's database, left running
            db.stop()
