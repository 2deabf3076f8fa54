"""`lambdaemu`: a thin click layer over the Python API (`emulator.runner.run`, `emulator.sweeps`,
`emulator.compare`, `emulator.report`).

Options are generated from the settings table in config.py, so --help, validation and the README
cannot drift. Values are taken as text and parsed by the settings themselves, so every bad value gets
the same one-line message naming the flag and the fix, and exit status 2.
"""

from __future__ import annotations

import json
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from .config import SETTINGS, SETTINGS_BY_NAME, RunConfig
from .errors import LambdaemuError, UsageError
from .thresholds import failure_line


def _settings_options(func: Any) -> Any:
    for setting in reversed(SETTINGS):
        shown = [f"default: {setting.default_text()}"] if setting.default is not None and not setting.multiple else []
        shown += [f"accepted: {setting.accepted()}"] if setting.accepted() else []
        extra = f" [{'; '.join(shown)}]" if shown else ""
        choices = f" ({'|'.join(setting.choices)})" if setting.choices else ""
        func = click.option(setting.flag, setting.name, type=str, default=None, multiple=setting.multiple,
                            metavar=setting.kind.upper() if not setting.choices else "CHOICE",
                            help=setting.help + choices + extra)(func)
    return func


def _log_warnings(caught: list[warnings.WarningMessage], path: Path) -> None:
    # Library warnings caught during a command go to its results, never to the terminal.
    if caught:
        with open(path, "a") as log:
            log.writelines(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)


def _fail(message: str, code: int) -> None:
    click.echo(f"lambdaemu: error: {message}", err=True)
    sys.exit(code)


class _Commands(click.Group):
    """click turns Ctrl-C into "Aborted!" and exit status 1; lambdaemu's promise is 130 (128 + SIGINT),
    whenever it comes: while validating, starting a database or cleaning up."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("lambdaemu: interrupted", err=True)
            sys.exit(128 + signal.SIGINT)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="lambdaemu")
def main() -> None:
    """Emulate AWS Lambda scaling against a real database and record what the database sees."""


@main.command("run")
@_settings_options
@click.option("--json", "as_json", is_flag=True, help="Print summary.json to stdout (progress stays on stderr).")
@click.option("--results-dir", default="results", show_default=True,
              help="Where run directories are created when --out is not given.")
@click.option("--force", is_flag=True,
              help="Let --out be the directory of an earlier, finished run: its files are removed first.")
@click.option("--scenario", "scenario_path", metavar="FILE",
              help="A TOML scenario: functions and services sharing one account and one database (see Scenarios "
                   "in the README); options given here override its values.")
def run_command(as_json: bool, results_dir: str, force: bool, scenario_path: str | None, **raw: Any) -> None:
    """Start a database, drive open-loop load through emulated Lambda environments, and write a run
    directory (samples, invocations, environments, logs, summary.json, chart.png)."""
    from rich.console import Console

    from .display import LiveDisplay, summary_table
    from .runner import run

    # A library's warning (matplotlib on a chart with nothing to draw, a driver's deprecation) is not
    # for the user's terminal: it goes to the run's logs/, next to the environments' own output.
    with warnings.catch_warnings(record=True) as caught:
        try:
            if results_dir.startswith("--"):
                raise UsageError(f"--results-dir: {results_dir!r} is an option, not a value; give --results-dir "
                                 "a directory")
            if scenario_path is not None:
                if scenario_path.startswith("--"):
                    raise UsageError(f"--scenario: {scenario_path!r} is an option, not a value; give a TOML file")
                from .scenario import load_scenario

                target: Any = load_scenario(scenario_path, raw)
            else:
                target = RunConfig.from_strings(raw)
            result = run(target, display=LiveDisplay(), results_root=results_dir, force=force, handle_signals=True)
        except UsageError as exc:
            _fail(str(exc), 2)
        except LambdaemuError as exc:
            _fail(str(exc), 1)
    _log_warnings(caught, result.run_dir / "logs" / "lambdaemu.log")
    console = Console(stderr=as_json)
    console.print(summary_table(result.summary, result.run_dir))
    if result.error:
        console.print(f"[red]{result.error}[/]")
    for note in result.notes:
        click.echo(f"lambdaemu: {note}", err=True)
    for warning in result.summary.get("warnings", []):
        click.echo(f"lambdaemu: warning: {warning}", err=True)
    for outcome in result.failed_thresholds:
        click.echo(f"lambdaemu: {failure_line(outcome)}", err=True)
    if as_json:
        click.echo(json.dumps(result.summary, indent=2))
    sys.exit(result.exit_code)


@main.command("sweep")
@_settings_options
@click.option("--scenario", "scenario_path", metavar="FILE",
              help="A TOML scenario to sweep over; its keys take lists through --set, its options as in run.")
@click.option("--set", "edits", multiple=True, metavar="KEY=V1,V2",
              help="A scenario key by path and its values, e.g. functions.api.pool_max=1,5 (repeatable; needs "
                   "--scenario).")
@click.option("--repeat", default="1", show_default=True, metavar="N",
              help="Runs per point, with seeds --seed, --seed + 1, ...: the table shows the spread (median, min-max).")
@click.option("--results-dir", default="results", show_default=True,
              help="Where the sweep's directory (<sweep-id>/) is created when --out is not given.")
@click.option("--resume", "resume_dir", metavar="SWEEP_DIR",
              help="Continue an interrupted sweep: run what its sweep.json does not record as complete.")
def sweep_command(scenario_path: str | None, edits: tuple[str, ...], repeat: str, results_dir: str,
                  resume_dir: str | None, **raw: Any) -> None:
    """Run every combination of the options given a comma list (--pool-max 1,5 --pool-idle 100ms,1s), each
    against a fresh database state, and compare them: a table here, sweep.csv, sweep.png and a run
    directory per point under the sweep's directory (--out is the sweep's directory)."""
    from .display import SweepDisplay
    from .sweeps import resume, split_edits, split_options, sweep

    with warnings.catch_warnings(record=True) as caught:
        try:
            if resume_dir is not None:
                given = [SETTINGS_BY_NAME[k].flag for k, v in raw.items() if v and k != "db_url"]
                given += ["--scenario"] * bool(scenario_path) + ["--set"] * bool(edits) + ["--repeat"] * (repeat != "1")
                if given:
                    raise UsageError(f"--resume takes the sweep's settings from its sweep.json; drop {', '.join(given)}")
                result = resume(resume_dir, db_url=raw.get("db_url"), display=SweepDisplay(), handle_signals=True)
            else:
                fixed, axes = split_options(raw)
                fixed_edits, edit_axes = split_edits(edits)
                out = fixed.pop("out", None)
                try:
                    repeats = int(repeat)
                except ValueError:
                    raise UsageError(f"--repeat: {repeat!r} is not valid; give a whole number from 1 to 100") from None
                result = sweep(scenario_path, {a.key: a.values for a in axes + edit_axes}, repeat=repeats,
                               settings=fixed, edits=fixed_edits, results_root=results_dir, out=out,
                               display=SweepDisplay(), handle_signals=True)
        except UsageError as exc:
            _fail(str(exc), 2)
        except LambdaemuError as exc:
            _fail(str(exc), 1)
    _log_warnings(caught, result.sweep_dir / "lambdaemu.log")
    from .compare import read_summary, table
    from .sweeps import point_rows
    from .thresholds import THRESHOLD_EXIT

    console = _wide_console()
    repeated = any(r["repeat"] > 1 for r in result.runs)
    rows = point_rows(result.rows, result.axes) if repeated else [dict(r) for r in result.rows]
    # The point's name says its values; sweep.csv has them (and the seeds, the directories) in columns.
    rows = [{k: v for k, v in r.items() if k not in (*result.axes, "repeat", "seed", "run_dir")} for r in rows]
    leading = ["point", "runs"] if repeated else ["point"]
    if rows:
        console.print(table(rows, leading, f"lambdaemu sweep {result.sweep_dir} — {result.status}"
                                           + (" (median and min–max over repeats)" if repeated else ""),
                            width=console.width))
        click.echo(f"{result.sweep_dir / 'sweep.csv'}, {result.sweep_dir / 'sweep.png'}")
    for entry in result.runs:
        if entry.get("error"):
            click.echo(f"lambdaemu: {entry['dir']}: {entry['error']}", err=True)
        if entry.get("exit_code") == THRESHOLD_EXIT:
            for outcome in read_summary(result.sweep_dir / entry["dir"]).get("thresholds") or ():
                if not outcome["passed"]:
                    click.echo(f"lambdaemu: {entry['dir']}: {failure_line(outcome)}", err=True)
    if result.missing:
        click.echo(f"lambdaemu: sweep {result.status}; missing {len(result.missing)} of {len(result.runs)} runs: "
                   f"{'; '.join(result.missing)}; continue with: lambdaemu sweep --resume {result.sweep_dir}", err=True)
    sys.exit(result.exit_code)


@main.command("compare")
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR...")
@click.option("--csv", "csv_path", metavar="FILE", help="Also write the table as CSV to FILE.")
@click.option("--out", "chart_path", metavar="FILE", help="Write an overlay chart of the runs' connections over "
                                                           "time to FILE (e.g. compare.png).")
def compare_command(run_dirs: tuple[str, ...], csv_path: str | None, chart_path: str | None) -> None:
    """Compare runs made separately: the sweep's table (peak connections against the limit, errors,
    throttles, cold starts, latency, fidelity) and an overlay chart of their connections over time."""
    from .compare import labels, run_rows, table, write_csv

    try:
        dirs = [Path(d) for d in run_dirs]
        rows = run_rows(dirs)
        names = labels(dirs)
        for row, name in zip(rows, names):
            row["run"] = name
        for path, option in ((csv_path, "--csv"), (chart_path, "--out")):
            if path is not None and (Path(path).is_dir() or not Path(path).parent.is_dir()):
                raise UsageError(f"{option}: cannot write {path}; give a file in an existing directory")
    except UsageError as exc:
        _fail(str(exc), 2)
    console = _wide_console()
    console.print(table(rows, ["run"], "lambdaemu compare", width=console.width))
    if csv_path:
        write_csv(rows, Path(csv_path), leading=["run"])
        click.echo(csv_path)
    if chart_path:
        from .plots import overlay_chart

        overlay_chart(dirs, names, Path(chart_path))
        click.echo(chart_path)


def _wide_console() -> Any:
    # A comparison table has many columns: written to a file or a pipe, it is not folded to 80 characters.
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=250)


@main.command("report")
@click.argument("directory", metavar="RUN_DIR|SWEEP_DIR")
@click.option("--out", "out_path", metavar="FILE", help="Where to write the report (default: DIR/report.html).")
def report_command(directory: str, out_path: str | None) -> None:
    """Recompute a run's (or a sweep's) summary and charts from its files and write report.html: one
    self-contained file (charts embedded) that opens without a network."""
    from .report import write_report

    try:
        path = write_report(Path(directory), Path(out_path) if out_path else None)
    except UsageError as exc:
        _fail(str(exc), 2)
    click.echo(str(path))


@main.command("cleanup")
@click.option("--results-dir", default="results", show_default=True,
              help="Where to look for runs whose lambdaemu process was killed outright, to mark them killed.")
def cleanup_command(results_dir: str) -> None:
    """Remove what interrupted runs left behind: servers, environments and work directories labelled
    lambdaemu; mark runs whose process was killed outright as killed and recompute their summary and
    chart (safe to run any time; running runs are left alone)."""
    from .cleanup import cleanup

    for line in cleanup(results_dir=Path(results_dir)):
        click.echo(line)


if __name__ == "__main__":
    main()
