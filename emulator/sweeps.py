"""Sweeps: the same load over every combination of a few settings, each combination (a *point*) run
against a fresh database state, compared in one table and one chart.

A sweep is a base (a one-function configuration, or a scenario file) with *axes*: settings given a list
of values (`pool_max: 1,5`), either `lambdaemu run` options (by RunConfig field or option name) or
scenario keys by path (`functions.api.pool_max`). The cross product of the axes is run point by point,
each point `repeat` times with seeds `seed`, `seed + 1`, ... (the same seeds at every point, so points
differ by their settings, not by their arrivals).

One database server serves every point that runs against the same server: same engine, provider,
max_connections, idle timeout, images, proxy and proxy settings, and the same applications (users). A
point that changes any of these gets a server of its own, started when the sweep reaches it (points
are run grouped by server, in the order they first appear) and stopped before the next one starts.
Between two points on one server, the server is brought back to a fresh state: every session of the
applications' users is ended (with a proxy, PgBouncer's client and server connections are dropped
first) and the next point starts only once the server lists none. The server's cumulative counters
(sessions opened, refusals) are not reset: every run reads them as differences from its own first
sample, taken before its load. What a point's handler wrote into the database stays (the workloads write
nothing). A `--provider external` server is the user's: each point attaches to it as a run does, and
nothing is ended on it.

The sweep directory (`results/<sweep-id>/`, or `out`) holds one run directory per run (`<point>/`, or
`<point>/repeat-<k>/` with repeats), `sweep.json` (the sweep's specification, so `--resume` can rebuild
it, and the status of every run: `pending`, `running`, `complete`, `interrupted`, `failed`), `sweep.csv`
(one row per finished run: the point's values, the seed and the comparison figures of `compare.py`) and
`sweep.png` (a panel per point, same axes). An interrupted sweep (a signal, or its process killed
outright, which leaves `running` in sweep.json) keeps what finished; `resume` runs what did not.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import re
import signal
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import SETTINGS_BY_NAME, RunConfig, by_field, field_of, format_duration
from .errors import LambdaemuError, UsageError
from .scenario import Scenario, load_scenario

#: Options whose value is taken whole: their commas belong to the value.
WHOLE = ("profile", "env_vars")
#: Options that cannot take a list, and why (the error line says it).
NO_LIST = {
    "out": "it names the sweep's own directory (each point gets <sweep dir>/<point>/)",
    "db_url": "a sweep runs against one external server; run a sweep per server",
}
#: The settings that make a server what it is: a point that changes one gets a server of its own.
SERVER_FIELDS = ("engine", "provider", "db_url", "max_connections", "db_instance", "db_idle_timeout_s",
                 "postgres_image", "mysql_image", "pgbouncer_image", "proxy", "proxy_max_connections_percent",
                 "proxy_max_idle_percent", "proxy_borrow_timeout_s", "proxy_idle_client_timeout_s")
MAX_RUNS = 1000


@dataclass(frozen=True)
class Axis:
    """A setting given several values: `key` is a RunConfig field (`pool_idle_s`) or a scenario key path
    (`functions.api.pool_max`); `values` as given (text as typed, or typed values)."""

    key: str
    values: tuple[Any, ...]

    @property
    def label(self) -> str:
        """How points and table columns name it: the option without dashes, or the key path."""
        setting = SETTINGS_BY_NAME.get(self.key)
        return setting.flag[2:].replace("-", "_") if setting else self.key


@dataclass(frozen=True)
class Point:
    """One combination of the axes' values, ready to run."""

    name: str
    dir: str
    values: tuple[tuple[str, str], ...]  # (axis label, value as text)
    target: Scenario

    @property
    def server_key(self) -> tuple | None:
        """What the point's server is; None when it has none of its own to share (external)."""
        run = self.target.run
        if run.provider == "external":
            return None
        return tuple(getattr(run, f) for f in SERVER_FIELDS) + (self.target.applications,)


@dataclass(frozen=True)
class SweepResult:
    """How a sweep ended: its directory, status (`complete`, `interrupted`, `failed`: a point failed),
    every run's entry of sweep.json, the comparison rows of the finished runs, and the runs still missing."""

    sweep_dir: Path
    status: str
    runs: tuple[dict[str, Any], ...]
    rows: tuple[dict[str, Any], ...]
    missing: tuple[str, ...]
    signal: int | None = None
    axes: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        """0 complete, 99 complete with a run whose thresholds failed, 1 when a point failed, 128+signal
        when interrupted."""
        from .thresholds import THRESHOLD_EXIT

        if self.status == "interrupted" and self.signal:
            return 128 + self.signal
        if self.status != "complete":
            return 1
        return THRESHOLD_EXIT if any(r.get("exit_code") == THRESHOLD_EXIT for r in self.runs) else 0


class SweepInterrupted(LambdaemuError):
    """A stop signal arrived between two runs of a sweep."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


# --- the specification ----------------------------------------------------------------------------------


def split_options(raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[Axis]]:
    """Command-line values (RunConfig field → text, None when not given) → the values every point shares
    and the axes (options given a comma list). A bad list is a UsageError naming the option and the value,
    before anything starts."""
    fixed: dict[str, Any] = {}
    axes: list[Axis] = []
    for name, value in raw.items():
        setting = SETTINGS_BY_NAME[name]
        if value is None or (setting.multiple and not value):
            continue
        if name in WHOLE or not isinstance(value, str):
            fixed[name] = value
            continue
        items = value.split(",")
        if len(items) > 1 and name in NO_LIST:
            raise UsageError(f"{setting.flag} {value!r}: {setting.flag} cannot take a list: {NO_LIST[name]}")
        for item in items:
            parse_value(name, item)
        if len(items) == 1:
            fixed[name] = value
        else:
            axes.append(Axis(name, tuple(items)))
    return fixed, axes


def parse_value(name: str, value: Any) -> Any:
    """One value of a setting (text or typed); `none` is "not set" for a setting that may be unset."""
    setting = SETTINGS_BY_NAME[name]
    if isinstance(value, str):
        if not value.strip():
            raise UsageError(f"{setting.flag}: an empty value in the list; give values separated by commas, "
                             "e.g. 1,5")
        if setting.optional and setting.kind != "choice" and value.strip().lower() == "none":
            return None
    return setting.parse(value)


def split_edits(items: Sequence[str]) -> tuple[dict[str, str], list[Axis]]:
    """`--set PATH=V1,V2` items → fixed scenario edits and axes over scenario keys."""
    fixed: dict[str, str] = {}
    axes: list[Axis] = []
    for item in items:
        path, sep, value = item.partition("=")
        if not sep or not path.strip() or not value:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE or KEY=V1,V2, e.g. functions.api.pool_max=1,5")
        values = value.split(",")
        if any(not v.strip() for v in values):
            raise UsageError(f"--set {item!r}: an empty value in the list; give values separated by commas")
        if len(values) == 1:
            fixed[path.strip()] = value
        else:
            axes.append(Axis(path.strip(), tuple(values)))
    return fixed, axes


def _text(key: str, value: Any) -> str:
    """A value as points and tables show it: as typed, or rendered the way a user would type it."""
    if isinstance(value, str):
        return value.strip()
    setting = SETTINGS_BY_NAME.get(key)
    if value is None:
        return "none"
    if setting is not None and setting.kind == "duration":
        return format_duration(float(value))
    return str(value)


def _dir_name(name: str) -> str:
    # A point's directory is its name, with what a path cannot hold replaced.
    name = re.sub(r"[/\x00]", "_", name)
    return name if len(name) <= 200 else f"{name[:180]}-{zlib.crc32(name.encode()):08x}"


@dataclass
class Spec:
    """What a sweep runs, as stored in sweep.json (values as given, so `--resume` rebuilds the same points)."""

    fixed: dict[str, Any]
    axes: list[Axis]
    repeat: int = 1
    seed: int = 0
    scenario: str | None = None
    edits: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The specification for sweep.json, with no password (a URL's is replaced by ****)."""
        from .config import redact_url

        fixed = {k: list(v) if isinstance(v, tuple) else v for k, v in self.fixed.items()}
        if isinstance(fixed.get("db_url"), str):
            fixed["db_url"] = redact_url(fixed["db_url"])
        if "env_vars" in fixed:
            fixed["env_vars"] = [_mask_pair(p) for p in fixed["env_vars"]]
        return {"fixed": fixed, "axes": [{"key": a.key, "values": list(a.values)} for a in self.axes],
                "repeat": self.repeat, "seed": self.seed, "scenario": self.scenario, "edits": self.edits}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], db_url: str | None = None) -> "Spec":
        """Rebuild a specification from sweep.json; `db_url` gives back the URL whose password it lacks."""
        fixed = dict(data.get("fixed") or {})
        if "db_url" in fixed:
            if db_url is None and "****" in str(fixed["db_url"]):
                raise UsageError("--resume: this sweep used --db-url, whose password is not stored; give --db-url "
                                 "again with --resume")
            fixed["db_url"] = db_url or fixed["db_url"]
        if any("****" in str(p) for p in fixed.get("env_vars") or ()):
            raise UsageError("--resume: this sweep's --env values with secrets are not stored; run the sweep again "
                             "with them instead of resuming")
        # JSON has no tuples: a scale rate given as (environments, seconds) comes back as a list.
        fixed = {k: tuple(v) if isinstance(v, list) and SETTINGS_BY_NAME[k].kind == "scale_rate" else v
                 for k, v in fixed.items()}
        return cls(fixed=fixed, axes=[Axis(a["key"], tuple(a["values"])) for a in data.get("axes") or ()],
                   repeat=int(data.get("repeat") or 1), seed=int(data.get("seed") or 0),
                   scenario=data.get("scenario"), edits=dict(data.get("edits") or {}))


def _mask_pair(pair: Any) -> Any:
    text = pair if isinstance(pair, str) else "=".join(pair)
    key, _, value = text.partition("=")
    return f"{key}=****" if re.search(r"PASS|SECRET|TOKEN|KEY", key, re.I) else text


def plan(spec: Spec) -> list[Point]:
    """Every point of the sweep, each validated (settings, combinations, handlers, what each engine
    accepts) before anything starts. Raises UsageError naming the point."""
    from .runner import validate

    for axis in spec.axes:
        if len(set(map(str, axis.values))) != len(axis.values):
            raise UsageError(f"{axis.label}: a value appears twice in {','.join(map(str, axis.values))}; give each "
                             "value once (use --repeat to run a point more than once)")
        if field_of(axis.key) is None and spec.scenario is None:
            raise UsageError(f"--set {axis.key}: scenario keys need --scenario FILE")
        if field_of(axis.key) in NO_LIST:
            raise UsageError(f"{SETTINGS_BY_NAME[axis.key].flag}: cannot take a list: {NO_LIST[axis.key]}")
    if spec.edits and spec.scenario is None:
        raise UsageError("--set changes keys of a scenario file; give --scenario FILE too")
    combinations = list(itertools.product(*[a.values for a in spec.axes]))
    if len(combinations) * spec.repeat > MAX_RUNS:
        raise UsageError(f"the sweep has {len(combinations)} points × {spec.repeat} repeats, more than {MAX_RUNS} "
                         "runs; give fewer values")
    points: list[Point] = []
    dirs: set[str] = set()
    for combination in combinations:
        values = tuple((a.label, _text(a.key, v)) for a, v in zip(spec.axes, combination))
        name = ",".join(f"{k}={v}" for k, v in values) or "base"
        fields = dict(spec.fixed)
        edits = dict(spec.edits)
        for axis, value in zip(spec.axes, combination):
            if field_of(axis.key):
                fields[field_of(axis.key)] = value  # type: ignore[index]
            else:
                edits[axis.key] = value
        try:
            target = _target(fields, edits, spec.scenario)
            validate(target, "plan")
        except UsageError as exc:
            raise UsageError(f"point {name}: {exc}" if spec.axes else str(exc)) from None
        directory = _dir_name(name)
        while directory in dirs:
            directory += "_"
        dirs.add(directory)
        points.append(Point(name=name, dir=directory, values=values, target=target))
    return points


def _target(fields: Mapping[str, Any], edits: Mapping[str, Any], scenario: str | None) -> Scenario:
    if scenario is not None:
        return load_scenario(scenario, {k: v for k, v in fields.items() if not _is_none(k, v)}, edits)
    values = {k: parse_value(k, v) for k, v in fields.items()}
    return Scenario.from_config(RunConfig(**values))


def _is_none(name: str, value: Any) -> bool:
    return value is None or (isinstance(value, str) and SETTINGS_BY_NAME[name].optional
                             and SETTINGS_BY_NAME[name].kind != "choice" and value.strip().lower() == "none")


# --- running --------------------------------------------------------------------------------------------


def new_sweep_id() -> str:
    """`sweep-20261121-104512-3f9c`: sortable by time."""
    from .results import new_run_id

    return f"sweep-{new_run_id()}"


class _State:
    """sweep.json: the specification and every run's status, rewritten (atomically) at every change."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    def save(self) -> None:
        from .results import write_json

        write_json(self.path, self.data)

    def set(self, run: dict[str, Any], **changes: Any) -> None:
        run.update(changes)
        self.data["missing"] = [r["dir"] for r in self.data["runs"] if r["status"] != "complete"]
        self.save()


def sweep(base: RunConfig | str | Path | None = None, axes: Mapping[str, Sequence[Any]] | None = None, *,
          repeat: int = 1, seed: int | None = None, settings: Mapping[str, Any] | None = None,
          edits: Mapping[str, Any] | None = None, results_root: Path | str = "results", out: Path | str | None = None,
          display: Any = None, handle_signals: bool = False) -> SweepResult:
    """Run every combination of `axes` (setting → values; a RunConfig field or option name, or with a
    scenario a key path such as `functions.api.pool_max`) over `base`: a RunConfig, a scenario file, or
    None with `settings` (RunConfig fields or option names → values, shared by every point). Each point
    runs `repeat` times with seeds `seed`, `seed + 1`, ... Writes the sweep directory (see the module
    docstring) under `results_root` (or at `out`) and returns how it ended. Raises UsageError, with
    nothing started, for bad input."""
    fixed: dict[str, Any] = {}
    scenario = None
    if isinstance(base, RunConfig):
        defaults = RunConfig()
        fixed = {f.name: getattr(base, f.name) for f in dataclasses.fields(RunConfig)
                 if getattr(base, f.name) != getattr(defaults, f.name) and f.name != "out"}
        if base.out:
            out = out or base.out
    elif base is not None:
        scenario = str(Path(base).resolve())
    fixed.update(by_field(settings or {}, "settings"))
    axis_list = []
    for key, values in (axes or {}).items():
        name = field_of(key)
        values = tuple(values)
        if name is not None:
            for value in values:
                parse_value(name, value)
        axis_list.append(Axis(name or key, values))
    if not isinstance(repeat, int) or not 1 <= repeat <= 100:
        raise UsageError(f"--repeat {repeat!r}: give a whole number from 1 to 100")
    seed = fixed.pop("seed", None) if seed is None else seed
    if isinstance(seed, str):
        seed = parse_value("seed", seed)
    spec = Spec(fixed=fixed, axes=axis_list, repeat=repeat,
                seed=seed if seed is not None else random.SystemRandom().randrange(2**31),
                scenario=scenario, edits=dict(edits or {}))
    sweep_id = new_sweep_id()
    sweep_dir = Path(out) if out else Path(results_root) / sweep_id
    return _run(spec, sweep_id, sweep_dir, resume=False, display=display, handle_signals=handle_signals)


def resume(sweep_dir: Path | str, *, db_url: str | None = None, display: Any = None,
           handle_signals: bool = False) -> SweepResult:
    """Continue a sweep that was interrupted: the runs sweep.json does not record as complete run again,
    into their own directories. Raises UsageError for a directory that holds no sweep, or one still going."""
    from .processes import identity_alive

    sweep_dir = Path(sweep_dir)
    try:
        data = json.loads((sweep_dir / "sweep.json").read_text())
        spec_data, sweep_id = data["spec"], data["sweep_id"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"--resume: {sweep_dir} holds no sweep (no readable sweep.json); give the directory a "
                         "sweep wrote") from None
    if data.get("status") == "running" and identity_alive(data.get("owner")):
        raise UsageError(f"--resume: the sweep in {sweep_dir} is still going (pid {data['owner']['pid']})")
    spec = Spec.from_json(spec_data, db_url=db_url)
    return _run(spec, sweep_id, sweep_dir, resume=True, display=display, handle_signals=handle_signals)


def _run(spec: Spec, sweep_id: str, sweep_dir: Path, *, resume: bool, display: Any,
         handle_signals: bool) -> SweepResult:
    from .processes import process_identity
    from .results import check_run_dir

    points = plan(spec)
    state_path = sweep_dir / "sweep.json"
    runs = [{"point": p.name, "values": dict(p.values), "repeat": r + 1, "seed": _seed(p, spec, r),
             "dir": p.dir if spec.repeat == 1 else f"{p.dir}/repeat-{r + 1}", "status": "pending"}
            for p in points for r in range(spec.repeat)]
    if resume:
        earlier = {r["dir"]: r for r in json.loads(state_path.read_text()).get("runs", [])}
        for entry in runs:
            if earlier.get(entry["dir"], {}).get("status") == "complete":
                entry.update(earlier[entry["dir"]])
    else:
        if state_path.exists():
            raise UsageError(f"--out: {sweep_dir} already holds a sweep; give a new directory, or --resume "
                             f"{sweep_dir} to continue it")
        check_run_dir(sweep_dir, option="--out" if sweep_dir.name != sweep_id else "--results-dir",
                      given=str(sweep_dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    state = _State(state_path, {"sweep_id": sweep_id, "status": "running", "owner": process_identity(),
                                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                "axes": [a.label for a in spec.axes], "spec": spec.to_json(), "runs": runs,
                                "missing": []})
    state.data["missing"] = [r["dir"] for r in runs if r["status"] != "complete"]
    state.save()
    by_point = {p.name: p for p in points}
    todo = [r for r in runs if r["status"] != "complete"]
    # Points that share a server run one after the other, in the order they first appear.
    order: dict[Any, int] = {}
    for entry in todo:
        key = by_point[entry["point"]].server_key
        order.setdefault(key if key is not None else id(entry), len(order))
    todo.sort(key=lambda e: order[by_point[e["point"]].server_key if by_point[e["point"]].server_key is not None
                                  else id(e)])

    interrupted: int | None = None
    previous_handlers: dict[int, Any] = {}

    received: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        # The first signal unwinds the sweep; any later one only waits for the clean-up it started.
        received.append(signum)
        if len(received) == 1:
            raise SweepInterrupted(signum)

    if handle_signals and threading.current_thread() is threading.main_thread():
        from .runner import STOP_SIGNALS

        for sig in STOP_SIGNALS:
            previous_handlers[sig] = signal.signal(sig, on_signal)
    if display is not None:
        display.begin_sweep(sweep_dir, len(runs), len(runs) - len(todo))
    server = _SharedServer(sweep_id)
    try:
        for entry in todo:
            point = by_point[entry["point"]]
            state.set(entry, status="running")
            if display is not None:
                display.begin_run(entry["point"], entry["repeat"], spec.repeat)
            try:
                db = server.for_point(point, display)
                result = _run_point(point, entry, runs.index(entry), sweep_dir, sweep_id, db, display,
                                    handle_signals)
            except SweepInterrupted:
                raise
            except LambdaemuError as exc:  # this point's server or run failed; the others may not
                state.set(entry, status="failed", error=str(exc), exit_code=2 if isinstance(exc, UsageError) else 1)
                if display is not None:
                    display.end_run(f"failed: {exc}")
                continue
            status = result.status if result.status in ("complete", "interrupted") else "failed"
            state.set(entry, status=status, run_id=result.summary.get("run_id"), exit_code=result.exit_code,
                      **({"error": result.error} if result.error else {}))
            if display is not None:
                display.end_run(status)
            if status == "interrupted":
                interrupted = result.signal or signal.SIGINT
                break
    except (SweepInterrupted, KeyboardInterrupt) as exc:
        interrupted = getattr(exc, "signum", signal.SIGINT)
        for entry in runs:
            if entry["status"] == "running":
                state.set(entry, status="interrupted")
    finally:
        try:
            server.stop()
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            if display is not None:
                display.end_sweep()
    missing = tuple(r["dir"] for r in runs if r["status"] != "complete")
    failed = any(r["status"] == "failed" for r in runs)
    status = "interrupted" if interrupted else ("failed" if failed else "complete")
    state.data.update(status=status, ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), missing=list(missing))
    state.save()
    rows = write_outputs(sweep_dir, state.data)
    return SweepResult(sweep_dir=sweep_dir, status=status, runs=tuple(runs), rows=tuple(rows), missing=missing,
                       signal=interrupted, axes=tuple(a.label for a in spec.axes))


def _seed(point: Point, spec: Spec, repeat: int) -> int:
    own = point.target.run.seed
    return (own if own is not None else spec.seed) + repeat


def _run_point(point: Point, entry: dict[str, Any], index: int, sweep_dir: Path, sweep_id: str, db: Any,
               display: Any, handle_signals: bool) -> Any:
    from .runner import run

    target = point.target
    run_config = target.run.replace(out=str(sweep_dir / entry["dir"]), seed=entry["seed"])
    target = dataclasses.replace(target, run=run_config)
    return run(target if target.source else run_config, display=display, run_id=f"{sweep_id}-{index + 1:03d}",
               handle_signals=handle_signals, force=True, database=db)


class _SharedServer:
    """The database the current group of points shares: started for the first point of a group, cleared
    before each next one, stopped when the group ends (or the sweep does)."""

    def __init__(self, sweep_id: str) -> None:
        self.sweep_id = sweep_id
        self.key: tuple | None = None
        self.db: Any = None
        self.count = 0

    def for_point(self, point: Point, display: Any) -> Any:
        from . import databases

        key = point.server_key
        if key is None:
            self.stop()
            return None
        if self.db is not None and key == self.key:
            self.db.clear_sessions()
            return self.db
        self.stop()
        self.count += 1
        if display is not None:
            display.note(f"starting database {self.count} ({point.target.run.provider})")
        db = databases.create(point.target.run, f"{self.sweep_id}-db{self.count}",
                              applications=point.target.applications)
        self.db, self.key = db, key
        try:
            db.start()
        except BaseException:
            self.db = self.key = None  # start() stopped what it started; the next point tries again
            raise
        return db

    def stop(self) -> None:
        if self.db is not None:
            db, self.db, self.key = self.db, None, None
            db.stop()


def write_outputs(sweep_dir: Path, data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """sweep.csv (one row per finished run) and sweep.png (a panel per point) from the run directories;
    returns the rows."""
    from .compare import figures, read_summary, write_csv
    from .plots import sweep_chart

    axes = list(data.get("axes") or ())
    rows = []
    panels: dict[str, list[Path]] = {}
    for entry in data["runs"]:
        run_dir = sweep_dir / entry["dir"]
        if entry["status"] not in ("complete", "failed") or not (run_dir / "run.json").exists():
            continue
        row: dict[str, Any] = {"point": entry["point"], **entry["values"], "repeat": entry["repeat"],
                               "seed": entry["seed"]}
        row.update(figures(read_summary(run_dir)))
        row["run_dir"] = entry["dir"]
        rows.append(row)
        if entry["status"] == "complete":
            panels.setdefault(entry["point"], []).append(run_dir)
    if rows:
        write_csv(rows, sweep_dir / "sweep.csv", leading=["point", *axes, "repeat", "seed"])
    if panels:
        try:
            sweep_chart(list(panels.items()), sweep_dir / "sweep.png")
        except Exception as exc:  # noqa: BLE001 - a chart must not cost the table
            (sweep_dir / "sweep.error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
    return rows


def point_rows(rows: Sequence[Mapping[str, Any]], axes: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of a sweep by point, with the spread over repeats (see `compare.spread`)."""
    from .compare import spread

    return spread([{k: v for k, v in r.items() if k != "run_dir"} for r in rows], ["point", *axes])

