"""The Python API users import (`from emulator import run, sweep, Scenario, RunConfig, load_scenario`):
`run()` does what `lambdaemu run` does and returns a `Result` that reads its run directory: the summary,
the fidelity figures, the thresholds, and the CSV files as rows (or pandas DataFrames when pandas is
installed). `open_run()` gives the same object for a run directory made earlier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator

from .config import RunConfig, by_field
from .runner import RunResult
from .scenario import Scenario, load_scenario


@dataclass(frozen=True)
class Result(RunResult):
    """A run, finished (`run_dir`, `status`, `summary`, `signal`, `error`, `notes`, `exit_code`), with
    readers over its files. Rows are read from the files when asked for, one at a time
    (`invocations()`), so a long run costs no memory until a DataFrame is built."""

    @classmethod
    def of(cls, result: RunResult) -> "Result":
        """The Result of what `runner.run` returned."""
        return cls(**{f.name: getattr(result, f.name) for f in fields(result)})

    @property
    def fidelity(self) -> dict[str, Any]:
        """How far the emulator itself can be trusted for this run (summary.json `fidelity`)."""
        return self.summary.get("fidelity") or {}

    @property
    def warnings(self) -> list[str]:
        """Reasons not to take the figures at face value (summary.json `warnings`)."""
        return list(self.summary.get("warnings") or ())

    @property
    def thresholds(self) -> list[dict[str, Any]]:
        """Each threshold of the run and its outcome (summary.json `thresholds`; empty when none were set)."""
        return list(self.summary.get("thresholds") or ())

    @property
    def config(self) -> dict[str, Any]:
        """The configuration the run recorded in run.json (no password)."""
        return self.run_info.get("config") or {}

    @property
    def run_info(self) -> dict[str, Any]:
        """run.json."""
        return json.loads((self.run_dir / "run.json").read_text())

    def rows(self, name: str) -> Iterator[dict[str, str]]:
        """The rows of one of the run's CSV files (`invocations`, `samples`, `environments`, `connections`,
        `functions`) as dicts of text, one at a time."""
        from .results import iter_csv

        return iter_csv(self.run_dir / f"{name}.csv")

    def invocations(self) -> Iterator[dict[str, str]]:
        """invocations.csv, row by row."""
        return self.rows("invocations")

    def samples(self) -> Iterator[dict[str, str]]:
        """samples.csv, row by row."""
        return self.rows("samples")

    def environments(self) -> Iterator[dict[str, str]]:
        """environments.csv, row by row."""
        return self.rows("environments")

    def connections(self) -> Iterator[dict[str, str]]:
        """connections.csv (connections by application, state and owner state at each sample), row by row."""
        return self.rows("connections")

    def dataframe(self, name: str) -> Any:
        """One of the CSV files as a pandas DataFrame, with numbers as numbers (needs pandas:
        `pip install pandas`)."""
        try:
            import pandas
        except ImportError:
            raise ImportError("DataFrames need pandas: pip install pandas (or use the rows: "
                              f"result.{name}())") from None
        return pandas.read_csv(self.run_dir / f"{name}.csv")

    def invocations_df(self) -> Any:
        """invocations.csv as a pandas DataFrame."""
        return self.dataframe("invocations")

    def samples_df(self) -> Any:
        """samples.csv as a pandas DataFrame."""
        return self.dataframe("samples")

    def environments_df(self) -> Any:
        """environments.csv as a pandas DataFrame."""
        return self.dataframe("environments")

    def connections_df(self) -> Any:
        """connections.csv as a pandas DataFrame."""
        return self.dataframe("connections")


def open_run(run_dir: Path | str) -> Result:
    """The `Result` of a run directory made earlier (its summary.json, recomputed when missing)."""
    from .compare import read_summary

    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    return Result(run_dir=run_dir, status=info.get("status", "?"), summary=summary, error=info.get("error") or "")


def run(target: RunConfig | Scenario | str | Path | None = None, *, display: Any = None, arrivals: Any = None,
        results_root: Path | str = "results", run_id: str | None = None, handle_signals: bool = False,
        force: bool = False, database: Any = None, **settings: Any) -> Result:
    """Run one emulation and return its `Result`. `target` is a `RunConfig`, a `Scenario`, the path of a
    scenario file, or None; `settings` (RunConfig fields, e.g. `rps=50, pool_max=1`, typed or as text)
    build the configuration when `target` is None and override a scenario file's values otherwise.
    `database`: a started provider to use as it is (see `emulator.runner.run`). Raises UsageError, with
    nothing started, for bad input."""
    from .errors import UsageError
    from .runner import run as run_target

    if isinstance(target, (str, Path)):
        target = load_scenario(target, by_field(settings, "run()"))
    elif target is None:
        target = RunConfig(**by_field(settings, "run()"))
    elif settings:
        raise UsageError(f"run(): settings {sorted(settings)} are for run(None, ...) or a scenario path; change a "
                         "RunConfig with config.replace(...)")
    result = run_target(target, display=display, arrivals=arrivals, results_root=results_root, run_id=run_id,
                        handle_signals=handle_signals, force=force, database=database)
    return Result.of(result)

