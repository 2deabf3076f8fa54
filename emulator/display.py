"""What the terminal shows: live progress while a run goes, and the summary table at the end (rich)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text


class LiveDisplay:
    """Live progress on stderr: elapsed time, arrivals, environments by state, connections, errors."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._live: Live | None = None
        self._started = 0.0
        self._duration = 0.0
        self._phase = ""
        self._line = Text("")

    def start(self, config: Any, run_dir: Path) -> None:
        self._started = time.monotonic()
        self._duration = getattr(config, "duration_s", 0.0)
        self.console.print(f"[bold]lambdaemu run[/] → {run_dir}")
        self._live = Live(self._render(), console=self.console, auto_refresh=False, transient=False)
        self._live.start()

    def phase(self, text: str) -> None:
        self._phase = text
        self._refresh()

    def update(self, supervisor: Any, fleet: Any) -> None:
        """Show the fleet's counters and the sampler's latest connection count."""
        c = fleet.totals()
        shown = fleet.published()
        conn = shown["connections"] if shown["samples"] else "?"
        max_conn = shown["max_connections"] if shown["samples"] else "?"
        self._line = Text.assemble(
            (f"t={supervisor.now():6.1f}s ", "bold"),
            f"invocations {c['invocations']:>7}  ",
            f"envs busy {c['busy']:>4} frozen {c['frozen']:>4} init {c['initialising']:>3}",
            f" vanished {c['vanished']:>3}  " if c["vanished"] else "  ",
            (f"connections {conn}/{max_conn}  ", "cyan"),
            (f"errors {c['errors']}  ", "red" if c["errors"] else ""),
            (f"throttles {c['throttles']}", "yellow" if c["throttles"] else ""),
        )
        self._refresh()

    def _render(self) -> Group:
        return Group(Text(f"[{self._phase}]", style="dim"), self._line)

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render(), refresh=True)

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
            if not self.console.is_terminal:
                self.console.line()  # a log file gets the last progress line ended, like a terminal


def summary_table(summary: dict[str, Any], run_dir: Path) -> Table:
    """The end-of-run table: the few numbers a team compares between runs."""
    table = Table(title=f"lambdaemu {summary.get('run_id')} — {summary.get('status')}", show_header=False,
                  title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value")
    peak, limit = summary.get("peak_connections"), summary.get("max_connections")
    errors = {k: v for k, v in summary.get("errors", {}).items() if k != "total"}
    throttles = {k: v for k, v in summary.get("throttles", {}).items() if k != "total"}
    latency = summary.get("latency_ms", {})
    lag = summary.get("dispatch_lag_ms", {})
    rows = [
        ("rps (target → achieved)", f"{summary.get('target_rps')} → {summary.get('achieved_rps')}"),
        ("invocations (ok)", f"{summary.get('invocations')} ({summary.get('ok')})"),
        ("cold starts", str(summary.get("cold_starts"))),
        ("peak environments (ideal)", f"{summary.get('peak_environments')} "
                                      f"({summary.get('fidelity', {}).get('ideal_peak_environments')})"),
        ("peak connections / max", Text(f"{peak} / {limit}", style="bold red" if limit and peak and
                                        peak >= limit * 0.9 else "")),
        ("errors", Text(", ".join(f"{k} {v}" for k, v in errors.items()) or "none",
                        style="red" if errors else "green")),
        ("refused (server / absorbed by pools)", f"{_dash(summary.get('refused_by_server'))} / "
                                                 f"{summary.get('refused_absorbed_by_libraries', 0)}"),
        ("throttles", ", ".join(f"{k} {v}" for k, v in throttles.items()) or "none"),
        ("latency p50 / p95 / p99 ms", f"{latency.get('p50')} / {latency.get('p95')} / {latency.get('p99')}"),
        ("dispatch lag p99 / max ms", f"{lag.get('p99')} / {lag.get('max')}"),
        ("run directory", str(run_dir)),
    ]
    if "peak_proxy_clients" in summary:
        rows.insert(5, ("proxy clients / servers (peak)",
                        f"{summary['peak_proxy_clients']} / {summary['peak_proxy_servers']}"))
    for key, value in rows:
        table.add_row(key, value)
    return table


def _dash(value: Any) -> str:
    return "—" if value is None else str(value)


class SweepDisplay:
    """A progress bar over a whole sweep on stderr: runs done, the current point and its repeat, and the
    current run's live figures. It is also the `Display` each run of the sweep reports to."""

    def __init__(self, console: Console | None = None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console or Console(stderr=True)
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("{task.fields[live]}"), console=self.console,
                                  transient=False)
        self._task: Any = None
        self._done = 0
        self._point = ""
        self._duration = 0.0
        self._run_started = 0.0

    # -- the sweep ------------------------------------------------------------------------------------
    def begin_sweep(self, sweep_dir: Path, total: int, done: int) -> None:
        """Show the bar: `total` runs, `done` of them finished earlier (a resumed sweep)."""
        self.console.print(f"[bold]lambdaemu sweep[/] → {sweep_dir} ({total} runs{f', {done} done' if done else ''})")
        self._done = done
        self._task = self._progress.add_task("sweep", total=total, completed=done, live="")
        self._progress.start()

    def note(self, text: str) -> None:
        """Say what the sweep does between runs (a server starting)."""
        self._set(live=text)

    def begin_run(self, point: str, repeat: int, repeats: int) -> None:
        """A run of `point` starts."""
        self._point = point + (f" (repeat {repeat}/{repeats})" if repeats > 1 else "")
        self._set(description=self._point, live="")

    def end_run(self, status: str = "complete") -> None:
        """The current run ended with `status` (said aloud unless complete)."""
        self._done += 1
        if status != "complete":
            self._progress.console.print(f"  {self._point}: {status}")
        self._set(completed=self._done, live="")

    def end_sweep(self) -> None:
        """Leave the bar as it ended."""
        self._progress.stop()

    # -- the Display protocol, for each run -------------------------------------------------------------
    def start(self, config: Any, run_dir: Path) -> None:
        """A run's own start (the Display protocol)."""
        self._duration = getattr(config, "duration_s", 0.0)
        self._run_started = time.monotonic()

    def phase(self, text: str) -> None:
        """The run's phase, shown beside the bar."""
        self._set(live=f"[dim]{text}[/]")

    def update(self, supervisor: Any, fleet: Any) -> None:
        """The run's live figures beside the bar, which advances with the run's elapsed share."""
        c = fleet.totals()
        shown = fleet.published()
        conn = f"{shown['connections']}/{shown['max_connections']}" if shown["samples"] else "?"
        part = min(0.99, (time.monotonic() - self._run_started) / self._duration) if self._duration else 0.0
        self._set(completed=self._done + part,
                  live=f"t={supervisor.now():.0f}s invocations {c['invocations']} envs {c['busy'] + c['frozen']} "
                       f"connections {conn} errors {c['errors']}")

    def stop(self) -> None:
        """A run's end: the bar stays for the next run."""

    def _set(self, **fields: Any) -> None:
        if self._task is not None:
            self._progress.update(self._task, **fields)
