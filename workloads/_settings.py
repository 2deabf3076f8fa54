"""What every workload shares: its settings (read from environment variables, as a Lambda function reads
its configuration), how to reach the database with each driver, and the invocation's work.

lambdaemu sets these variables from the run's flags; they can as well be set by hand to run a handler
anywhere else. Unset optional pool settings stay `None`, so each library keeps its own default.

| variable | flag | default |
|---|---|---|
| DATABASE_URL, DB_ENGINE | `--engine` | (set by lambdaemu) postgresql://... or mysql://... |
| DB_PROXY | `--proxy` | unset; `pgbouncer`: transaction pooling, no server-side prepared statements |
| POOL_MAX | `--pool-max` | 5 |
| POOL_MIN, POOL_IDLE_SECONDS, POOL_LIFETIME_SECONDS, POOL_TIMEOUT_SECONDS | `--pool-min`, `--pool-idle`, `--pool-lifetime`, `--pool-timeout` | unset: the library's default |
| POOL_PRE_PING | `--env POOL_PRE_PING=1` | the workload's (SQLAlchemy: off; sqlalchemy_pymysql: on) |
| WORK_SECONDS, WORK_DIST | `--work`, `--work-dist` | 0.3, fixed |
| QUERIES, PARALLEL_QUERIES | `--queries`, `--parallel-queries` | 1, 1 |

A workload that cannot run with its settings, or on the engine it was given, raises `WorkloadError`
during init. It is an ImportError on purpose: lambdaemu treats it like a handler that cannot be loaded
and ends the run with its message, instead of failing every cold start.
"""

from __future__ import annotations

import os
import random
import sys
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

ENGINES = ("postgres", "mysql")
WORK_DISTS = ("fixed", "exp")


class WorkloadError(ImportError):
    """A workload cannot run with these settings or on this engine (raised at init; see module doc)."""


@dataclass(frozen=True)
class Settings:
    """One environment's settings, parsed and checked once at init."""

    engine: str  # postgres | mysql
    proxy: str | None  # pgbouncer | None
    database_url: str
    pool_max: int
    pool_min: int | None
    pool_idle_s: float | None
    pool_lifetime_s: float | None
    pool_timeout_s: float | None
    pool_pre_ping: bool | None
    work_s: float
    work_dist: str
    queries: int
    parallel_queries: int

    @property
    def through_pgbouncer(self) -> bool:
        """Connections go to PgBouncer in transaction mode (which PgBouncer 1.18 cannot give prepared statements)."""
        return self.proxy == "pgbouncer" and self.engine == "postgres"


def _raw(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def _number(name: str, kind: type, default: Any, minimum: float) -> Any:
    """A numeric setting (None or `default` when unset), at least `minimum`; a bad value names the variable."""
    raw = _raw(name)
    if raw is None:
        return default
    expected = "a whole number" if kind is int else "a number of seconds"
    try:
        value = float(raw)
        if kind is int:
            if not value.is_integer():
                raise ValueError(raw)
            value = int(value)
    except ValueError:
        raise WorkloadError(f"{name}={raw!r}: expected {expected} >= {minimum:g}") from None
    if value < minimum:
        raise WorkloadError(f"{name}={raw!r}: expected {expected} >= {minimum:g}")
    return value


def _flag(name: str) -> bool | None:
    raw = _raw(name)
    if raw is None:
        return None
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise WorkloadError(f"{name}={raw!r}: expected 1/true/yes/on or 0/false/no/off")


def settings() -> Settings:
    """Read and check the settings from the environment (call it in the init phase, at module level)."""
    url = _raw("DATABASE_URL")
    if url is None:
        raise WorkloadError("DATABASE_URL is not set: run the handler through lambdaemu, or set it to "
                            "postgresql://user:password@host:port/db or mysql://...")
    engine = _raw("DB_ENGINE") or ("mysql" if url.startswith("mysql") else "postgres")
    if engine not in ENGINES:
        raise WorkloadError(f"DB_ENGINE={engine!r}: expected one of {', '.join(ENGINES)}")
    work_dist = _raw("WORK_DIST") or "fixed"
    if work_dist not in WORK_DISTS:
        raise WorkloadError(f"WORK_DIST={work_dist!r}: expected one of {', '.join(WORK_DISTS)}")
    s = Settings(
        engine=engine,
        proxy=_raw("DB_PROXY"),
        database_url=url,
        pool_max=_number("POOL_MAX", int, 5, 1),
        pool_min=_number("POOL_MIN", int, None, 0),
        pool_idle_s=_number("POOL_IDLE_SECONDS", float, None, 0),
        pool_lifetime_s=_number("POOL_LIFETIME_SECONDS", float, None, 0),
        pool_timeout_s=_number("POOL_TIMEOUT_SECONDS", float, None, 0),
        pool_pre_ping=_flag("POOL_PRE_PING"),
        work_s=_number("WORK_SECONDS", float, 0.3, 0),
        work_dist=work_dist,
        queries=_number("QUERIES", int, 1, 1),
        parallel_queries=_number("PARALLEL_QUERIES", int, 1, 1),
    )
    if s.pool_min is not None and s.pool_min > s.pool_max:
        raise WorkloadError(f"POOL_MIN={s.pool_min} is more than POOL_MAX={s.pool_max}: lower --pool-min "
                            "or raise --pool-max")
    if s.parallel_queries > s.queries:
        # Every parallel connection runs at least one query; fewer queries would silently mean fewer
        # connections than asked for.
        raise WorkloadError(f"PARALLEL_QUERIES={s.parallel_queries} is more than QUERIES={s.queries}: each "
                            f"parallel connection needs a query; set --queries {s.parallel_queries} or more")
    return s


def require_engine(s: Settings, workload: str, *engines: str, instead: str) -> None:
    """Refuse, at init, an engine (or proxy) the workload's library cannot talk to."""
    if s.engine not in engines:
        raise WorkloadError(f"{workload} runs on {' or '.join(engines)} only, not {s.engine} (DB_ENGINE): "
                            f"use --engine {engines[0]}, or {instead}")


def ignored(s: Settings, workload: str, names: dict[str, str]) -> None:
    """Say in the environment's log (its CloudWatch stream) which set variables this library has no use for.

    `names` maps a variable to the reason, e.g. {"POOL_IDLE_SECONDS": "QueuePool has no idle eviction"}."""
    for name, why in names.items():
        if _raw(name) is not None:
            print(f"{workload}: {name}={_raw(name)} ignored: {why}", file=sys.stderr, flush=True)


# --- reaching the database -------------------------------------------------------------------------


def sqlalchemy_url(s: Settings) -> str:
    """DATABASE_URL with the driver SQLAlchemy should use: psycopg (3) for PostgreSQL, PyMySQL for MySQL."""
    from sqlalchemy.engine import make_url

    driver = "mysql+pymysql" if s.engine == "mysql" else "postgresql+psycopg"
    return make_url(s.database_url).set(drivername=driver).render_as_string(hide_password=False)


def create_sqlalchemy_engine(s: Settings, **pool_kwargs: Any) -> Any:
    """`create_engine` for these settings; `pool_kwargs` are the workload's own (poolclass, pool_size, ...)."""
    from sqlalchemy import create_engine

    return create_engine(sqlalchemy_url(s), connect_args=psycopg_kwargs(s) if s.engine == "postgres" else {},
                         **pool_kwargs)


def queuepool_kwargs(s: Settings, *, pre_ping: bool = False) -> dict[str, Any]:
    """SQLAlchemy QueuePool arguments: POOL_MAX connections and no overflow (so POOL_MAX is the cap),
    POOL_TIMEOUT_SECONDS → pool_timeout, POOL_LIFETIME_SECONDS → pool_recycle; unset keeps SQLAlchemy's
    default (30 s; -1, never). `pre_ping` is the workload's default for POOL_PRE_PING."""
    kwargs: dict[str, Any] = {"pool_size": s.pool_max, "max_overflow": 0,
                              "pool_pre_ping": pre_ping if s.pool_pre_ping is None else s.pool_pre_ping}
    if s.pool_timeout_s is not None:
        kwargs["pool_timeout"] = s.pool_timeout_s
    if s.pool_lifetime_s is not None:
        kwargs["pool_recycle"] = s.pool_lifetime_s
    return kwargs


#: Why QueuePool ignores the settings it has no counterpart for.
QUEUEPOOL_LACKS = {
    "POOL_MIN": "QueuePool has no minimum size (connections open on first use and stay)",
    "POOL_IDLE_SECONDS": "QueuePool has no idle eviction (an idle connection stays until pool_recycle, "
                         "a failed ping or the environment's end)",
}


def psycopg_conninfo(s: Settings) -> str:
    """DATABASE_URL as libpq takes it (SQLAlchemy-style postgresql+psycopg:// accepted too)."""
    scheme, sep, rest = s.database_url.partition("://")
    return "postgresql" + sep + rest if scheme.startswith("postgres") else s.database_url


def psycopg_kwargs(s: Settings) -> dict[str, Any]:
    """psycopg.connect keyword arguments for these settings. Through PgBouncer (transaction mode) psycopg
    must not prepare statements: by default it prepares a query run 5 times on a connection, and the next
    transaction may get another server connection, where that statement does not exist."""
    return {"prepare_threshold": None} if s.through_pgbouncer else {}


def pymysql_kwargs(s: Settings) -> dict[str, Any]:
    """pymysql.connect keyword arguments from DATABASE_URL (mysql://user:password@host:port/db)."""
    url = urllib.parse.urlsplit(s.database_url)
    return {"host": url.hostname or "127.0.0.1", "port": url.port or 3306,
            "user": urllib.parse.unquote(url.username or ""), "password": urllib.parse.unquote(url.password or ""),
            "database": url.path.lstrip("/") or None}


def connect_driver(s: Settings) -> Any:
    """A new DB-API connection straight from the driver (psycopg or PyMySQL, by engine), in autocommit:
    a finished query leaves the session idle, not idle in a transaction (which through PgBouncer in
    transaction mode would also pin a server connection)."""
    if s.engine == "mysql":
        import pymysql

        return pymysql.connect(**pymysql_kwargs(s), autocommit=True)
    import psycopg

    return psycopg.connect(psycopg_conninfo(s), autocommit=True, **psycopg_kwargs(s))


# --- the invocation's work -------------------------------------------------------------------------


def sleep_sql(s: Settings) -> str:
    """A statement that keeps its connection busy on the server for %(seconds)s, in this engine's dialect."""
    return "SELECT SLEEP(%(seconds)s)" if s.engine == "mysql" else "SELECT pg_sleep(%(seconds)s)"


def dbapi_sleeper(s: Settings) -> Callable[[Any, float], None]:
    """`execute(conn, seconds)` for a DB-API connection (psycopg or PyMySQL: both take pyformat)."""
    sql = sleep_sql(s)

    def execute(conn: Any, seconds: float) -> None:
        with conn.cursor() as cur:
            cur.execute(sql, {"seconds": seconds})
            cur.fetchall()

    return execute


def sqlalchemy_sleeper(s: Settings) -> Callable[[Any, float], None]:
    """`execute(conn, seconds)` for a SQLAlchemy Connection."""
    from sqlalchemy import text

    statement = text(sleep_sql(s).replace("%(seconds)s", ":seconds"))

    def execute(conn: Any, seconds: float) -> None:
        conn.execute(statement, {"seconds": seconds}).fetchall()

    return execute


_rng = random.Random()  # seeded per environment: workload modules are imported after the fork


def draw_work(s: Settings, rng: random.Random = _rng) -> float:
    """This invocation's database time: WORK_SECONDS, or (WORK_DIST=exp) an exponential draw with that mean."""
    if s.work_dist == "exp" and s.work_s > 0:
        return rng.expovariate(1.0 / s.work_s)
    return s.work_s


def run_work(s: Settings, connect: Callable[[], ContextManager[Any]], execute: Callable[[Any, float], None],
             rng: random.Random = _rng) -> float:
    """Do one invocation's work and return its length in seconds.

    The drawn work time is split evenly over QUERIES sleep statements. With PARALLEL_QUERIES = K they are
    dealt out over K threads, each of which takes its own connection from `connect()` (a context manager:
    `engine.connect`, `pool.connection`, ...) and runs its share one after the other, so the environment
    holds up to K connections at once. Every thread has ended when this returns (a frozen environment
    has no work in flight); the first failure is raised.
    """
    total = draw_work(s, rng)
    per_query = total / s.queries
    k = s.parallel_queries

    def one_connection(n: int) -> None:
        with connect() as conn:
            for _ in range(n):
                execute(conn, per_query)

    if k == 1:
        one_connection(s.queries)
        return total
    shares = [s.queries // k + (1 if i < s.queries % k else 0) for i in range(k)]
    with ThreadPoolExecutor(max_workers=k, thread_name_prefix="query") as executor:
        futures = [executor.submit(one_connection, n) for n in shares]
    for future in futures:
        future.result()
    return total


def response(work_s: float) -> dict[str, Any]:
    """What every workload's handler returns."""
    return {"statusCode": 200, "workSeconds": round(work_s, 6)}
