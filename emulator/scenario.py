"""Scenarios: one account, one database, and a list of functions and services, from a TOML file.

A run is an account (its concurrency limit, shared by every function; reserved concurrency carved out
of it) with functions (Lambda: environments spawned on demand, frozen, reclaimed) and services (the EC2
side: a fixed number of long-lived processes, never frozen or reclaimed, each serving its share of the
load concurrently with one pool per process). Every function and service is an application with its
own database user, so the database itself can say who holds the connections.

The command line describes a one-function scenario (`Scenario.from_config`); a file describes the rest
(`load_scenario`). Every key of a file is the name of a `lambdaemu run` option without its dashes
(`pool_max` for `--pool-max`), read through the same settings table, so a value means the same thing in
both places. Options given on the command line override the file: run-level ones (`--duration`), and
per-function ones for every function and service (`--pool-max 1`).

Sections:

- `description` (text): what the scenario shows.
- `[run]`: `duration`, `seed`, `sample_interval`, `baseline`, `env_nice`.
- `[account]`: `concurrency_limit`.
- `[database]`: `engine`, `provider`, `url`, `max_connections` or `instance`, `idle_timeout`, and the
  images of `--provider docker`.
- `[proxy]`: `kind` (`pgbouncer`), `max_connections_percent`, `max_idle_percent`, `borrow_timeout`,
  `idle_client_timeout`.
- `[defaults]`: function keys every function and service starts from.
- `[[functions]]`: `name`, `handler` and any function key (below), and `load`.
- `[[services]]`: `name`, `handler`, `instances`, `concurrency`, the function keys that apply to a
  server process (pool, work, queries, env, timeout, memory), and `load`.

`load` is a profile in the `--profile` text form, a table (`{profile = "ramp", from = 10, to = 200,
over = "60s"}`), or a list of tables (segments in sequence); without one, `rps` and `arrivals` apply.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Mapping

from .config import SETTINGS, SETTINGS_BY_NAME, RunConfig
from .errors import UsageError
from .function import check_reservations

#: Keys of a function: the per-function options of `lambdaemu run`.
FUNCTION_GROUPS = ("function", "lifecycle")
_RUN_KEYS = {"duration": "duration_s", "seed": "seed", "sample_interval": "sample_interval_s",
             "baseline": "baseline", "env_nice": "env_nice"}
_ACCOUNT_KEYS = {"concurrency_limit": "concurrency_limit"}
_DATABASE_KEYS = {"engine": "engine", "provider": "provider", "url": "db_url", "max_connections": "max_connections",
                  "instance": "db_instance", "idle_timeout": "db_idle_timeout_s", "postgres_image": "postgres_image",
                  "mysql_image": "mysql_image", "pgbouncer_image": "pgbouncer_image"}
_PROXY_KEYS = {"kind": "proxy", "max_connections_percent": "proxy_max_connections_percent",
               "max_idle_percent": "proxy_max_idle_percent", "borrow_timeout": "proxy_borrow_timeout_s",
               "idle_client_timeout": "proxy_idle_client_timeout_s"}
_ACCOUNT_FIELDS = set(_ACCOUNT_KEYS.values())


def _key(setting_name: str) -> str:
    return SETTINGS_BY_NAME[setting_name].flag[2:].replace("-", "_")


#: function key → RunConfig field (e.g. pool_max → pool_max, work → work_s, env → env_vars).
_FUNCTION_KEYS = {_key(s.name): s.name for s in SETTINGS
                  if s.group in FUNCTION_GROUPS and s.name not in _ACCOUNT_FIELDS | {"function_name"}}
_FUNCTION_KEYS.update({"rps": "rps", "arrivals": "arrivals"})
#: What a service (a long-lived server process) takes of a function's keys: no Lambda lifecycle.
_SERVICE_KEYS = {k: v for k, v in _FUNCTION_KEYS.items()
                 if SETTINGS_BY_NAME[v].group == "function" or v in ("timeout_s", "memory_mb", "rps", "arrivals")}
#: Names: letters, digits and underscores (they are database user names too), 1 to 32 characters.
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass(frozen=True)
class ServiceConfig:
    """A service: `instances` long-lived processes, each serving up to `concurrency` requests at once,
    with the settings of `config` (its handler, pool, work, environment, timeout, load)."""

    name: str
    instances: int
    concurrency: int
    config: RunConfig


@dataclass(frozen=True)
class Scenario:
    """A validated scenario. `run` holds the run-level settings (account, database, proxy, emulator,
    output); each function is a `RunConfig` whose `function_name` is its name."""

    run: RunConfig
    functions: tuple[RunConfig, ...]
    services: tuple[ServiceConfig, ...] = ()
    description: str = ""
    source: str = ""

    @classmethod
    def from_config(cls, config: RunConfig) -> "Scenario":
        """The one-function scenario a command line describes."""
        return cls(run=config, functions=(config,))

    @property
    def applications(self) -> tuple[str, ...]:
        """Every function's and service's name: each is a database user of its own."""
        return tuple(f.function_name for f in self.functions) + tuple(s.name for s in self.services)

    @property
    def configs(self) -> tuple[RunConfig, ...]:
        """The configuration of every application: the functions', then the services'."""
        return self.functions + tuple(s.config for s in self.services)

    @property
    def duration_s(self) -> float:
        """How long arrivals keep coming: the longest load of any function or service."""
        loads = [f.duration_s for f in self.functions] + [s.config.duration_s for s in self.services]
        return max(loads, default=self.run.duration_s)

    def public_dict(self) -> dict[str, Any]:
        """The scenario as recorded in run.json: no password anywhere."""
        return {"source": self.source, "description": self.description,
                "functions": [f.public_dict() for f in self.functions],
                "services": [{"name": s.name, "instances": s.instances, "concurrency": s.concurrency,
                              "config": s.config.public_dict()} for s in self.services]}


def target_rate(config: RunConfig) -> float:
    """The mean arrival rate a configuration asks for: its profile's over the run, or --rps."""
    if not config.profile:
        return config.rps
    from .load import parse_profile

    profile = parse_profile(config.profile)
    total = profile.total_s(config.duration_s)
    if not total:
        return 0.0
    expected = 0.0
    for segment, length in zip(profile.segments, profile.durations(total)):
        if segment.profile == "replay":
            from .load import read_replay

            expected += len(read_replay(Path(segment.path)))
        else:
            expected += segment.mean_rate(length) * length
    return round(expected / total, 3)


def peak_rate(config: RunConfig) -> float:
    """The highest arrival rate a configuration asks for at any moment: its profile's top (a replay's
    busiest second), or --rps."""
    if not config.profile:
        return config.rps
    from .load import parse_profile, read_replay

    top = 0.0
    for segment in parse_profile(config.profile).segments:
        if segment.profile == "replay":
            times = read_replay(Path(segment.path))
            busiest = max((sum(1 for t in times if s <= t < s + 1) for s in times[:: max(1, len(times) // 200)]),
                          default=0)
            top = max(top, float(busiest))
        else:
            top = max(top, segment.max_rate())
    return top


def first_burst(scenario: "Scenario") -> int:
    """About how many environments the load's first burst of cold starts asks for at once: each
    function's peak rate times how long an invocation holds an environment when it starts cold (its work,
    the runtime's init delay and a quarter second of init), with a quarter more for Poisson bunching,
    within its reserved concurrency and the account; plus provisioned environments and service instances."""
    total = 0
    for f in scenario.functions:
        burst = int(peak_rate(f) * (f.work_s + f.init_delay_s + 0.25) * 1.25) + 1
        if f.reserved_concurrency is not None:
            burst = min(burst, f.reserved_concurrency)
        total += min(burst, scenario.run.concurrency_limit) + f.provisioned
    return total + sum(s.instances for s in scenario.services)


def load_scenario(path: str | Path, overrides: Mapping[str, Any] | None = None,
                  edits: Mapping[str, Any] | None = None) -> Scenario:
    """Read and validate a scenario file; `overrides` are command-line values by RunConfig field (strings
    or typed values; None or absent: not given). `edits` change keys of the file itself before it is read,
    by path (`functions.api.pool_max`, `database.max_connections`, `defaults.work`): a value is a TOML
    value (`5`, `"300ms"`, `true`), or text (`300ms`) when it is not one. Raises UsageError naming the
    file, the key and the fix."""
    path = Path(path)
    where = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--scenario: {where!r} not found; give the path of a TOML scenario file "
                         "(see scenarios/ for examples)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--scenario: {where!r} cannot be read ({exc}); give a readable UTF-8 TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--scenario: {where}: not valid TOML ({exc}); fix the file") from None
    for key, value in (edits or {}).items():
        _edit(data, key, value)
    return _Reader(path, overrides or {}).scenario(data)


#: Sections whose keys `edits` may set directly (`section.key`); functions and services go by name.
_EDIT_SECTIONS = ("run", "account", "database", "proxy", "defaults")


def _edit(data: dict[str, Any], key: str, value: Any) -> None:
    """Set one key of a scenario's data by its path (see `load_scenario`); unknown keys are then refused by
    the reader like any key of the file."""
    parts = key.split(".")
    if isinstance(value, str):
        try:
            value = tomllib.loads(f"value = {value}")["value"]
        except tomllib.TOMLDecodeError:
            pass  # not a TOML value: the text itself, as in `work=300ms`
    if len(parts) == 3 and parts[0] in ("functions", "services"):
        entries = data.get(parts[0]) if isinstance(data.get(parts[0]), list) else []
        named = [e for e in entries if isinstance(e, dict) and e.get("name") == parts[1]]
        if not named:
            names = ", ".join(str(e.get("name")) for e in entries if isinstance(e, dict)) or "none"
            raise UsageError(f"--set {key}: the scenario has no {parts[0][:-1]} named {parts[1]!r} ({parts[0]}: "
                             f"{names}); name one of them")
        named[0][parts[2]] = value
    elif len(parts) == 2 and parts[0] in _EDIT_SECTIONS:
        section = data.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise UsageError(f"--set {key}: [{parts[0]}] is not a table in the scenario; fix the file")
        section[parts[1]] = value
    else:
        raise UsageError(f"--set {key}: not a scenario key path; use SECTION.KEY ({', '.join(_EDIT_SECTIONS)}) or "
                         "functions.NAME.KEY / services.NAME.KEY, e.g. functions.api.pool_max=1,5")


class _Reader:
    def __init__(self, path: Path, overrides: Mapping[str, Any]) -> None:
        self.path = path
        self.base_dir = path.parent
        self.overrides = {k: v for k, v in overrides.items() if v is not None and v != ()}

    def fail(self, where: str, message: str) -> UsageError:
        return UsageError(f"{self.path}: {where}: {message}")

    def _table(self, data: Mapping[str, Any], key: str) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a table ([{key}]), got {type(value).__name__}")
        return value

    def _unknown(self, table: Mapping[str, Any], allowed: Any, where: str) -> None:
        for key in table:
            if key not in allowed:
                near = get_close_matches(key, sorted(allowed), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(sorted(allowed))}"
                raise self.fail(where, f"unknown key {key!r}{hint}")

    def _values(self, table: Mapping[str, Any], keys: Mapping[str, str], where: str) -> dict[str, Any]:
        """Parse every key of `table` through its setting; errors name `where.key`."""
        self._unknown(table, keys, where)
        values: dict[str, Any] = {}
        for key, raw in table.items():
            setting = SETTINGS_BY_NAME[keys[key]]
            if setting.kind == "duration" and isinstance(raw, (int, float)) and not isinstance(raw, bool):
                raise self.fail(f"{where}.{key}", f"{raw!r} has no unit; write it as a duration, e.g. \"{raw}s\"")
            if setting.kind in ("int", "float") and isinstance(raw, str) and setting.kind != "scale_rate":
                raise self.fail(f"{where}.{key}", f"{raw!r} is text; write a number, e.g. {key} = 5")
            if setting.kind == "pairs" and not isinstance(raw, dict):
                raise self.fail(f"{where}.{key}", "expected a table of variables, e.g. env = { LOG_LEVEL = \"debug\" }")
            try:
                values[setting.name] = setting.parse({k: str(v) for k, v in raw.items()}
                                                     if setting.kind == "pairs" else raw)
            except UsageError as exc:
                raise self.fail(f"{where}.{key}", str(exc).removeprefix(f"{setting.flag}: ")) from None
        return values

    def _profile(self, raw: Any, where: str) -> str:
        """A load entry in the text form `RunConfig.profile` takes (checked there too)."""
        from .load import parse_profile, profile_from_table

        if isinstance(raw, str):
            try:
                parse_profile(raw, base_dir=self.base_dir)
            except ValueError as exc:
                raise self.fail(where, str(exc)) from None
            return _absolute_replays(raw, self.base_dir)
        tables = raw if isinstance(raw, list) else [raw]
        parts = []
        for i, table in enumerate(tables):
            if not isinstance(table, dict):
                raise self.fail(where, "expected a profile: text such as \"ramp:10..200/60s\", a table, or a list "
                                       "of tables")
            segment = profile_from_table(table, where=f"{self.path}: {where}[{i}]" if isinstance(raw, list)
                                         else f"{self.path}: {where}", base_dir=self.base_dir)
            parts.append(_segment_text(segment))
        return " + ".join(parts)

    def scenario(self, data: Mapping[str, Any]) -> Scenario:
        self._unknown(data, {"description", "run", "account", "database", "proxy", "defaults", "functions",
                             "services"}, "top level")
        description = data.get("description", "")
        if not isinstance(description, str):
            raise self.fail("description", "expected text")
        run_level: dict[str, Any] = {}
        for section, keys in (("run", _RUN_KEYS), ("account", _ACCOUNT_KEYS), ("database", _DATABASE_KEYS),
                              ("proxy", _PROXY_KEYS)):
            run_level.update(self._values(self._table(data, section), keys, section))
        defaults = self._table(data, "defaults")
        # Command-line values override the file's run-level settings and every function's.
        run_overrides = {k: v for k, v in self.overrides.items() if SETTINGS_BY_NAME[k].group not in FUNCTION_GROUPS
                         or k in _ACCOUNT_FIELDS}
        function_overrides = {k: v for k, v in self.overrides.items() if k not in run_overrides}
        for name, raw in run_overrides.items():
            run_level[name] = SETTINGS_BY_NAME[name].parse(raw)
        try:
            run = RunConfig(**run_level)
        except UsageError as exc:
            raise UsageError(f"{self.path}: {exc}") from None

        functions_data = data.get("functions", [])
        services_data = data.get("services", [])
        if not isinstance(functions_data, list) or not isinstance(services_data, list):
            raise self.fail("functions" if not isinstance(functions_data, list) else "services",
                            "expected an array of tables ([[functions]] / [[services]])")
        if not functions_data and not services_data:
            raise self.fail("functions", "a scenario needs at least one [[functions]] or [[services]] entry")
        names: dict[str, str] = {}
        functions = [self._function(i, entry, defaults, run, function_overrides, names)
                     for i, entry in enumerate(functions_data)]
        services = [self._service(i, entry, defaults, run, function_overrides, names)
                    for i, entry in enumerate(services_data)]
        try:
            check_reservations(run.concurrency_limit, [(f.function_name, f.reserved_concurrency) for f in functions],
                               limit_flag="account.concurrency_limit")
        except UsageError as exc:
            raise UsageError(f"{self.path}: functions: {exc}") from None
        provisioned = sum(f.provisioned for f in functions)
        if provisioned > run.concurrency_limit:
            raise self.fail("functions", f"provisioned concurrency adds up to {provisioned}, above "
                                         f"account.concurrency_limit {run.concurrency_limit}; lower it")
        return Scenario(run=run, functions=tuple(functions), services=tuple(services), description=description,
                        source=str(self.path))

    def _entry(self, index: int, entry: Any, kind: str, names: dict[str, str],
               defaults: Mapping[str, Any]) -> tuple[str, str]:
        if not isinstance(entry, dict):
            raise self.fail(f"{kind}[{index}]", "expected a table")
        name = entry.get("name")
        where = f"{kind}[{index}]"
        if not isinstance(name, str) or not name:
            raise self.fail(where, "needs a name, e.g. name = \"api\"")
        if not _NAME.match(name):
            raise self.fail(f"{where}.name", f"{name!r} cannot be a database user name; use 1 to 32 lowercase "
                                             "letters, digits and underscores, starting with a letter")
        if name in names:
            raise self.fail(f"{kind}.{name}", f"the name {name!r} is already taken by {names[name]}; every function "
                                              "and service needs a name of its own (it is its database user)")
        names[name] = f"{kind}.{name}"
        if "handler" not in entry and "handler" not in defaults and self.overrides.get("handler") is None:
            raise self.fail(f"{kind}.{name}", "needs a handler (its own or one in [defaults]), e.g. "
                                              "handler = \"workloads.sqlalchemy_pool:handler\"")
        return name, f"{kind}.{name}"

    def _config(self, entry: Mapping[str, Any], defaults: Mapping[str, Any], keys: Mapping[str, str], where: str,
                run: RunConfig, overrides: Mapping[str, Any], name: str) -> RunConfig:
        own = {k: v for k, v in entry.items() if k not in ("name", "load", "instances", "concurrency")}
        merged_defaults = {k: v for k, v in defaults.items() if k in keys and k != "load"}
        self._unknown({k: v for k, v in defaults.items() if k != "load"}, _FUNCTION_KEYS, "defaults")
        values = self._values(merged_defaults, keys, "defaults")
        values.update(self._values(own, keys, where))
        for field, raw in overrides.items():
            if field in keys.values():
                values[field] = SETTINGS_BY_NAME[field].parse(raw)
        load = entry.get("load", defaults.get("load"))
        if load is not None:
            values["profile"] = self._profile(load, f"{where}.load")
        base = {f.name: getattr(run, f.name) for f in dataclasses.fields(RunConfig)
                if SETTINGS_BY_NAME[f.name].group not in FUNCTION_GROUPS or f.name in _ACCOUNT_FIELDS}
        base.pop("profile", None)
        if "profile" not in values and "duration_s" not in self.overrides:
            base["duration_s"] = run.duration_s
        try:
            return RunConfig(**{**base, **values, "function_name": name})
        except UsageError as exc:
            raise UsageError(f"{self.path}: {where}: {exc}") from None

    def _function(self, index: int, entry: Any, defaults: Mapping[str, Any], run: RunConfig,
                  overrides: Mapping[str, Any], names: dict[str, str]) -> RunConfig:
        name, where = self._entry(index, entry, "functions", names, defaults)
        return self._config(entry, defaults, _FUNCTION_KEYS, where, run, overrides, name)

    def _service(self, index: int, entry: Any, defaults: Mapping[str, Any], run: RunConfig,
                 overrides: Mapping[str, Any], names: dict[str, str]) -> ServiceConfig:
        name, where = self._entry(index, entry, "services", names, defaults)
        counts = {}
        for key in ("instances", "concurrency"):
            value = entry.get(key, 1)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 10_000:
                raise self.fail(f"{where}.{key}", f"{value!r} is not valid; use a whole number from 1 to 10000")
            counts[key] = value
        config = self._config(entry, {k: v for k, v in defaults.items() if k in _SERVICE_KEYS or k == "load"},
                              {**_SERVICE_KEYS, "handler": "handler"}, where, run, overrides, name)
        return ServiceConfig(name=name, instances=counts["instances"], concurrency=counts["concurrency"], config=config)


def _segment_text(segment: Any) -> str:
    from .config import format_duration

    length = f"/{format_duration(segment.duration_s)}" if segment.duration_s is not None else ""
    if segment.profile in ("constant", "poisson"):
        return f"{segment.profile}:{segment.rate:g}{length}"
    if segment.profile == "ramp":
        return f"ramp:{segment.rate:g}..{segment.rate_to:g}{length}"
    if segment.profile == "step":
        return "step:" + ",".join(f"{format_duration(t)}={r:g}" for t, r in segment.steps) + length
    if segment.profile == "spike":
        return (f"spike:{segment.rate:g},{segment.peak:g}@{format_duration(segment.at_s)}+"
                f"{format_duration(segment.length_s)}{length}")
    return f"replay:{segment.path}"


def _absolute_replays(text: str, base_dir: Path) -> str:
    # A replay file named in a scenario is relative to the scenario's folder, wherever lambdaemu runs.
    def fix(match: re.Match) -> str:
        path = Path(match.group(1).strip())
        return f"replay:{path if path.is_absolute() else base_dir / path}"

    return re.sub(r"replay:([^+]+?)(?=\s\+\s|$)", fix, text)


def scenario_keys_markdown() -> str:
    """The README's table of scenario keys, generated from the settings table (a test keeps them equal)."""

    def default(name: str) -> str:
        setting = SETTINGS_BY_NAME[name]
        text = setting.default_text()
        return text if setting.kind != "duration" or setting.default is None else f'"{text}"'

    def unit(name: str) -> str:
        kind = SETTINGS_BY_NAME[name].kind
        return {"duration": 'a duration text ("300ms", "5s", "10m")', "int": "a whole number",
                "float": "a number", "choice": "one of: " + ", ".join(SETTINGS_BY_NAME[name].choices),
                "text": "text", "pairs": "a table of text values", "scale_rate": 'text "N/DURATION"'}[kind]

    lines = ["| section | key | option | default | value |", "|---|---|---|---|---|"]
    for section, keys in (("[run]", _RUN_KEYS), ("[account]", _ACCOUNT_KEYS), ("[database]", _DATABASE_KEYS),
                          ("[proxy]", _PROXY_KEYS)):
        for key, name in keys.items():
            lines.append(f"| `{section}` | `{key}` | `{SETTINGS_BY_NAME[name].flag}` | {default(name)} | {unit(name)} |")
    for key, name in _FUNCTION_KEYS.items():
        where = "functions, services, defaults" if key in _SERVICE_KEYS else "functions, defaults"
        lines.append(f"| {where} | `{key}` | `{SETTINGS_BY_NAME[name].flag}` | {default(name)} | {unit(name)} |")
    lines += [
        "| functions, services | `name` | | (required) | 1 to 32 lowercase letters, digits and underscores, starting "
        "with a letter: it is also the application's database user |",
        "| functions, services, defaults | `load` | `--profile` | `rps` at `arrivals` | a profile text, a table "
        "(`{profile = \"ramp\", from = 10, to = 200, over = \"60s\"}`), or a list of tables in sequence |",
        "| services | `instances` | | 1 | a whole number of long-lived processes, 1 to 10000 |",
        "| services | `concurrency` | | 1 | requests each instance serves at once (its threads), 1 to 10000 |",
        "| (top level) | `description` | | \"\" | text: what the scenario shows |",
    ]
    return "\n".join(lines)
