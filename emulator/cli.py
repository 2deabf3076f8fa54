"""`lambdaemu`: a thin click layer over the Python API (`emulator.runner.run`).

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

from .config import SETTINGS, RunConfig
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
    if caught:
        with open(result.run_dir / "logs" / "lambdaemu.log", "a") as log:
            log.writelines(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
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
