"""Comparing runs: the figures a team puts side by side (one row per run), their spread over repeats,
and how they are shown (a rich table, a CSV file). `lambdaemu compare`, `lambdaemu sweep` and the HTML
report all use these rows, so the three show the same numbers.

A row is read from a run directory's summary.json (recomputed from the files, streaming, when it is
missing); configuration values that differ between the runs compared lead each row, so a table says
what changed as well as what it did.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import UsageError

#: The comparison figures, in table order (errors.<kind> and throttles.<reason> columns follow `errors`
#: and `throttles` for the kinds that occur).
FIGURES = (
    "status", "peak_connections", "max_connections", "peak_percent", "errors", "throttles", "cold_starts",
    "connections_opened", "latency_p50_ms", "latency_p99_ms", "peak_environments", "ideal_peak_environments",
    "dispatch_lag_p99_ms", "warnings", "thresholds_failed",
)

#: Figures whose spread over repeats is shown (numbers; the rest are shown as they are).
NUMERIC = frozenset(FIGURES) - {"status"}

#: Short headers for the terminal.
HEADERS = {
    "peak_connections": "peak conn", "max_connections": "max", "peak_percent": "% of max",
    "cold_starts": "cold starts", "connections_opened": "opened", "latency_p50_ms": "p50 ms",
    "latency_p99_ms": "p99 ms", "peak_environments": "peak envs", "ideal_peak_environments": "ideal envs",
    "dispatch_lag_p99_ms": "lag p99 ms", "thresholds_failed": "thresholds failed",
}


def figures(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The comparison figures of one run's summary (summary.json fields; README "The run directory")."""
    peak, limit = summary.get("peak_connections"), summary.get("max_connections")
    errors = dict(summary.get("errors") or {})
    throttles = dict(summary.get("throttles") or {})
    fidelity = summary.get("fidelity") or {}
    row: dict[str, Any] = {
        "status": summary.get("status"),
        "peak_connections": peak,
        "max_connections": limit,
        "peak_percent": round(100 * peak / limit, 1) if peak is not None and limit else None,
        "errors": errors.pop("total", 0),
        "throttles": throttles.pop("total", 0),
        "cold_starts": summary.get("cold_starts"),
        "connections_opened": summary.get("connections_opened"),
        "latency_p50_ms": (summary.get("latency_ms") or {}).get("p50"),
        "latency_p99_ms": (summary.get("latency_ms") or {}).get("p99"),
        "peak_environments": summary.get("peak_environments"),
        "ideal_peak_environments": fidelity.get("ideal_peak_environments"),
        "dispatch_lag_p99_ms": (fidelity.get("dispatch_lag_ms") or {}).get("p99"),
        "warnings": len(summary.get("warnings") or ()),
    }
    if summary.get("thresholds"):  # the run had some (--threshold): how many failed
        row["thresholds_failed"] = sum(1 for t in summary["thresholds"] if not t.get("passed"))
    row.update({f"errors.{kind}": n for kind, n in sorted(errors.items())})
    row.update({f"throttles.{reason}": n for reason, n in sorted(throttles.items())})
    return row


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A run's summary.json, recomputed from its files when it is missing. Raises UsageError for a
    directory that is not a run's."""
    if not (run_dir / "run.json").is_file():
        raise UsageError(f"{run_dir}: not a lambdaemu run directory (no run.json); give the directory of a run")
    path = run_dir / "summary.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass  # cut short by a kill: recompute it
    from .results import summarize

    return summarize(run_dir)


def read_config(run_dir: Path) -> dict[str, Any]:
    """The configuration a run recorded in run.json (no password)."""
    return json.loads((run_dir / "run.json").read_text()).get("config") or {}


def differing(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The configuration keys whose values are not the same in every one of `configs` (in the settings
    table's order), leaving out what always differs (the output directory, the seed)."""
    keys: list[str] = []
    for config in configs:
        keys += [k for k in config if k not in keys and k not in ("out", "seed")]
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def run_rows(run_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """One row per run: `run` (its directory's name), the configuration values that differ between the
    runs, then its figures."""
    configs = [read_config(d) for d in run_dirs]
    keys = differing(configs)
    rows = []
    for run_dir, config in zip(run_dirs, configs):
        row: dict[str, Any] = {"run": run_dir.name}
        row.update({k: _text(config.get(k)) for k in keys})
        row.update(figures(read_summary(run_dir)))
        rows.append(row)
    return rows


def labels(run_dirs: Sequence[Path]) -> list[str]:
    """Names for runs in a table or a legend: each directory's name, with its parent's where two share one
    (the repeats of a sweep's point)."""
    names = [d.name for d in run_dirs]
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in run_dirs]


def columns(rows: Iterable[Mapping[str, Any]], leading: Sequence[str] = ()) -> list[str]:
    """Every column of `rows`: `leading` first, then the figures in FIGURES order, each followed by its
    by-kind columns."""
    rows = list(rows)
    seen: list[str] = list(leading)
    for row in rows:
        seen += [k for k in row if k not in seen and k.split(".")[0] not in FIGURES]
    for figure in FIGURES:
        # A figure no row has (thresholds_failed of runs without thresholds) gets no column; an axis of
        # the same name (max_connections) is the same number.
        if figure not in seen and any(figure in row for row in rows):
            seen.append(figure)
        for row in rows:
            seen += [k for k in row if k.startswith(f"{figure}.") and k not in seen]
    return seen


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path, leading: Sequence[str] = ()) -> Path:
    """Write `rows` as CSV with every column (empty where a row has none)."""
    names = columns(rows, leading)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=names, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return path


def spread(rows: Sequence[Mapping[str, Any]], group_by: Sequence[str]) -> list[dict[str, Any]]:
    """Rows grouped by the values of `group_by` (a sweep's point), each number as (median, min, max) over
    the group's rows (repeats), `runs` the group's size. Groups keep the order they first appear in."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in group_by), []).append(row)
    out = []
    for key, members in groups.items():
        merged: dict[str, Any] = dict(zip(group_by, key))
        merged["runs"] = len(members)
        for name in columns(members):
            if name in merged or name in ("run", "seed", "repeat"):
                continue
            values = [m.get(name) for m in members]
            numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if name.split(".")[0] in NUMERIC and numbers:
                merged[name] = (statistics.median(numbers), min(numbers), max(numbers))
            else:
                merged[name] = values[0] if len(set(map(str, values))) == 1 else "/".join(map(str, values))
        out.append(merged)
    return out


def show(value: Any) -> str:
    """A cell as the terminal and the report show it: a (median, min, max) triple as `m (lo–hi)`."""
    if isinstance(value, tuple):
        median, low, high = (_number(v) for v in value)
        return median if low == high else f"{median} ({low}–{high})"
    return "—" if value is None or value == "" else _number(value)


def table(rows: Sequence[Mapping[str, Any]], leading: Sequence[str], title: str, width: int | None = None) -> Any:
    """A rich Table of `rows` (single runs, or `spread` groups), `leading` columns first: a row per run,
    or, when that would not fit in `width` characters, a column per run (a terminal is narrower than a
    table of twenty figures, and a few runs side by side read as well)."""
    from rich.table import Table

    names = columns(rows, leading)
    cells = [[_cell(row, name) for name in names] for row in rows]
    headers = [HEADERS.get(name, name) for name in names]
    needed = sum(max(len(h), *(len(c[i]) for c in cells)) + 3 for i, h in enumerate(headers)) if cells else 0
    out = Table(title=title, title_justify="left")
    if width is not None and needed > width and len(rows) <= 12:
        out.add_column(headers[0], style="bold")
        for row in cells:
            out.add_column(row[0], justify="right", overflow="fold")
        for i, header in enumerate(headers[1:], start=1):
            out.add_row(header, *[row[i] for row in cells])
        return out
    for name, header in zip(names, headers):
        numeric = name.split(".")[0] in NUMERIC or name == "runs"
        out.add_column(header, justify="right" if numeric else "left", overflow="fold")
    for row in cells:
        out.add_row(*row)
    return out


def _cell(row: Mapping[str, Any], name: str) -> str:
    text = show(row.get(name))
    value = row.get(name)
    if name == "peak_percent" and isinstance(value, (int, float, tuple)):
        worst = max(value) if isinstance(value, tuple) else value
        return f"[bold red]{text}[/]" if worst >= 90 else text
    return text


def _number(value: Any) -> str:
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def _text(value: Any) -> Any:
    # Configuration values in a table cell: scalars as they are, anything else as compact JSON.
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value, sort_keys=True)
