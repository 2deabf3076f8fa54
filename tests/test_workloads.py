"""The workloads against real servers: each handler imported fresh (its init phase) with the settings as
environment variables and called directly, against a real PostgreSQL, a real MariaDB and a real PgBouncer,
counting the connections the server sees it leave behind; then every workload on every engine through
the real runner."""

from __future__ import annotations

import importlib
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
import psycopg_pool
import pymysql
import pytest
import sqlalchemy

from conftest import assert_no_leftovers
from emulator.config import RunConfig
from emulator.databases.base import Database
from emulator.databases.mysql import MySQLServer
from emulator.databases.pgbouncer import PgBouncer
from emulator.databases.postgres import PostgresServer
from emulator.environment import LambdaContext
from emulator.runner import run
from workloads._settings import Settings, WorkloadError, draw_work

#: The handlers' application_name on PostgreSQL, so counts ignore every other client of the shared server.
APPNAME = "lambdaemu-workload-test"

#: Every variable a workload reads; cleared before each import so nothing leaks in from the outside.
SETTING_VARS = ("DATABASE_URL", "DB_ENGINE", "DB_PROXY", "DB_HOST", "DB_PORT", "DB_USER", "DB_PASSWORD", "DB_NAME",
                "PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "PGAPPNAME", "POOL_MAX", "POOL_MIN",
                "POOL_IDLE_SECONDS", "POOL_LIFETIME_SECONDS", "POOL_TIMEOUT_SECONDS", "POOL_PRE_PING",
                "WORK_SECONDS", "WORK_DIST", "QUERIES", "PARALLEL_QUERIES")

WORKLOADS = ("sqlalchemy_pool", "sqlalchemy_nullpool", "psycopg_pool_workload", "pymysql_single",
             "sqlalchemy_pymysql", "leaky", "pool_in_handler")
ENGINES = ("postgres", "mysql", "pgbouncer")
#: Which engines each workload runs on (the README's workload table says the same).
SUPPORTED = {
    "sqlalchemy_pool": ENGINES,
    "sqlalchemy_nullpool": ENGINES,
    "psycopg_pool_workload": ("postgres", "pgbouncer"),
    "pymysql_single": ("mysql",),
    "sqlalchemy_pymysql": ("mysql",),
    "leaky": ENGINES,
    "pool_in_handler": ENGINES,
}
#: Connections a workload holds after its 1st, 2nd and 3rd invocation (one query, one connection each).
HELD_AFTER = {
    "sqlalchemy_pool": (1, 1, 1),  # the pool keeps the one connection it needed
    "sqlalchemy_nullpool": (0, 0, 0),  # closed at the end of every invocation
    # With POOL_MIN=2: min_size connections, plus (usually) one more: the first invocation asks for a
    # connection before the pool's workers have opened min_size, and psycopg_pool grows to serve it.
    "psycopg_pool_workload": ({2, 3}, "same", "same"),
    "pymysql_single": (1, 1, 1),
    "sqlalchemy_pymysql": (1, 1, 1),
    "leaky": (1, 2, 3),  # one more per invocation
    "pool_in_handler": (1, 2, 3),  # one more engine, and its connection, per invocation
}
#: PgBouncer's server_idle_timeout in these tests.
SERVER_IDLE_S = 0.5
UNSUPPORTED = [(w, e) for w in WORKLOADS for e in ENGINES if e not in SUPPORTED[w]]


def settle(count: Callable[[], int], expected: int, timeout_s: float = 5.0) -> int:
    """The count once it reaches `expected` (servers notice closed connections a moment later), or the
    last count after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = count()
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


@dataclass
class Target:
    """An engine as handlers reach it, and how to count what they hold there."""

    name: str
    db: Database
    #: Connections the handlers hold: server sessions, or PgBouncer client connections.
    held: Callable[[], int]
    #: Server sessions behind PgBouncer (None when handlers talk to the server directly).
    servers: Callable[[], int] | None = None

    def env(self) -> dict[str, str]:
        env = self.db.handler_env()
        if self.name == "pgbouncer":
            env["DB_PROXY"] = "pgbouncer"
        if self.db.engine == "postgres":
            env["PGAPPNAME"] = APPNAME
        return env


@pytest.fixture(scope="module")
def pg_target(postgres: PostgresServer) -> Iterator[Target]:
    with postgres.admin_connect() as admin:
        yield Target("postgres", postgres, lambda: sum(
            1 for row in postgres.connections(admin) if row.application_name == APPNAME))


@pytest.fixture(scope="module")
def mysql_target() -> Iterator[Target]:
    with MySQLServer(run_id="tests-wl") as db, db.admin_connect() as admin:
        # One admin session for the whole module: its own session is the one PROCESSLIST query excluded.
        yield Target("mysql", db, lambda: len(db.connections(admin)))


@pytest.fixture(scope="module")
def pgbouncer_target() -> Iterator[Target]:
    # A backend of its own, so every application session on it is one of PgBouncer's server connections;
    # no idle minimum (MaxIdleConnectionsPercent 0) and a short server_idle_timeout, so PgBouncer has only
    # the server connections clients are using or have just used.
    with PostgresServer(provider="embedded", run_id="tests-wl-pgb", max_connections=20) as backend, \
            PgBouncer(backend, "tests-wl-pgb", max_idle_connections_percent=0,
                      server_idle_timeout_s=SERVER_IDLE_S) as bouncer, \
            bouncer.admin_connect() as console, backend.admin_connect() as admin:
        yield Target("pgbouncer", bouncer, lambda: bouncer.stats(console).client_connections,
                     servers=lambda: sum(1 for row in backend.connections(admin)
                                         if row.application_name != "lambdaemu-sampler"))


def engine_target(request: pytest.FixtureRequest, engine: str) -> Target:
    return request.getfixturevalue({"postgres": "pg_target", "mysql": "mysql_target",
                                    "pgbouncer": "pgbouncer_target"}[engine])


def release(module: Any) -> None:
    """Close whatever a workload module holds (engines, pools, connections), as a reclaimed environment would."""
    for value in list(vars(module).values()):
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, sqlalchemy.engine.Engine):
                item.dispose()
            elif isinstance(item, psycopg_pool.ConnectionPool):
                item.close()
            elif isinstance(item, psycopg.Connection):
                item.close()
            elif isinstance(item, pymysql.connections.Connection) and item.open:
                item.close()


@pytest.fixture
def load(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """Import a workload module fresh (its init phase) with a target's variables and `settings`; at the end
    release what it holds and check that its target is back to no held connection."""
    loaded: list[tuple[Any, Target]] = []

    def _load(name: str, target: Target, **settings: Any) -> Any:
        if target.servers is not None:  # start from no server connection left by an earlier test
            assert settle(target.servers, 0, timeout_s=10 * SERVER_IDLE_S) == 0
        for var in SETTING_VARS:
            monkeypatch.delenv(var, raising=False)
        for key, value in {**target.env(), **{k: str(v) for k, v in settings.items()}}.items():
            monkeypatch.setenv(key, value)
        module_name = f"workloads.{name}"
        sys.modules.pop(module_name, None)
        module = importlib.import_module(module_name)
        loaded.append((module, target))
        return module

    yield _load
    for module, target in loaded:
        sys.modules.pop(module.__name__, None)
        release(module)
    for module, target in loaded:
        assert settle(target.held, 0) == 0, f"{module.__name__} left connections on {target.name} after release"


def invoke(module: Any, n: int = 1) -> tuple[dict, float]:
    """Call the handler as an environment does; the response and the time it took."""
    context = LambdaContext(f"req-{n}", "workload-test", None, 3000)
    t0 = time.perf_counter()
    result = module.handler({"n": n}, context)
    return result, time.perf_counter() - t0


# --- handler level ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("workload,engine", [(w, e) for w in WORKLOADS for e in SUPPORTED[w]])
def test_connections_left_behind(workload, engine, load, request):
    """After each invocation an environment holds what its pattern implies; the work time is honoured."""
    target = engine_target(request, engine)
    work = 0.05
    module = load(workload, target, WORK_SECONDS=work, POOL_MIN=2)
    held = None
    for n, expected in enumerate(HELD_AFTER[workload], 1):
        result, elapsed = invoke(module, n)
        assert result == {"statusCode": 200, "workSeconds": work}
        assert elapsed >= work
        if isinstance(expected, set):
            time.sleep(0.3)  # let the pool's workers finish what they started
            held = target.held()
            assert held in expected, f"after invocation {n}"
        elif expected == "same":
            assert settle(target.held, held) == held, f"after invocation {n}"
        else:
            assert settle(target.held, expected) == expected, f"after invocation {n}"
    if target.servers is not None:
        # Transaction pooling: the invocations reached PostgreSQL over one server connection (one
        # transaction at a time needs no more), however many client connections are left open.
        assert target.servers() == 1


def test_pgbouncer_workloads_do_not_prepare_statements(load, pgbouncer_target):
    """Through PgBouncer psycopg connections are made with prepare_threshold=None (PgBouncer 1.18 in
    transaction mode cannot route prepared statements); directly, psycopg's default stays."""
    pooled = load("sqlalchemy_pool", pgbouncer_target, WORK_SECONDS=0)
    with pooled.engine.connect() as conn:
        assert conn.connection.driver_connection.prepare_threshold is None
    leaky = load("leaky", pgbouncer_target, WORK_SECONDS=0)
    invoke(leaky)
    assert leaky.LEAKED[0].prepare_threshold is None
    pool = load("psycopg_pool_workload", pgbouncer_target, WORK_SECONDS=0, POOL_MIN=0)
    with pool.pool.connection() as conn:
        assert conn.prepare_threshold is None
        # Many runs of the same query on one connection: nothing is prepared, so nothing can go missing.
        for _ in range(8):
            conn.execute("SELECT pg_sleep(%(seconds)s)", {"seconds": 0})


def test_psycopg_pool_default_min_size_is_the_librarys(load, pg_target):
    """POOL_MIN unset: psycopg_pool's own min_size (4), capped at POOL_MAX; POOL_MIN=0 opens on demand."""
    module = load("psycopg_pool_workload", pg_target, WORK_SECONDS=0)
    assert (module.pool.min_size, module.pool.max_size) == (4, 5)
    invoke(module)
    time.sleep(0.3)
    assert pg_target.held() in (4, 5)  # 5 when the first invocation came before the pool had its 4
    capped = load("psycopg_pool_workload", pg_target, WORK_SECONDS=0, POOL_MAX=2)
    assert (capped.pool.min_size, capped.pool.max_size) == (2, 2)
    on_demand = load("psycopg_pool_workload", pg_target, WORK_SECONDS=0, POOL_MIN=0, POOL_MAX=3,
                     POOL_IDLE_SECONDS=30, POOL_LIFETIME_SECONDS=120, POOL_TIMEOUT_SECONDS=2)
    pool = on_demand.pool
    assert (pool.min_size, pool.max_size, pool.max_idle, pool.max_lifetime, pool.timeout) == (0, 3, 30, 120, 2)


def test_queuepool_settings_reach_sqlalchemy(load, pg_target, mysql_target, capfd):
    """POOL_* become QueuePool's arguments; the ones QueuePool lacks are named in the environment's log."""
    module = load("sqlalchemy_pool", pg_target, POOL_MAX=3, POOL_TIMEOUT_SECONDS=2, POOL_LIFETIME_SECONDS=60,
                  POOL_IDLE_SECONDS=30)
    pool = module.engine.pool
    assert isinstance(pool, sqlalchemy.pool.QueuePool)
    assert (pool.size(), pool._max_overflow, pool._timeout, pool._recycle, pool._pre_ping) == (3, 0, 2, 60, False)
    err = capfd.readouterr().err
    assert "POOL_IDLE_SECONDS=30 ignored: QueuePool has no idle eviction" in err
    mysql_pool = load("sqlalchemy_pymysql", mysql_target).engine.pool
    assert (mysql_pool.size(), mysql_pool._recycle, mysql_pool._pre_ping) == (5, -1, True)
    nullpool = load("sqlalchemy_nullpool", pg_target)
    assert isinstance(nullpool.engine.pool, sqlalchemy.pool.NullPool)


@pytest.mark.parametrize("engine", ENGINES)
def test_parallel_queries_hold_several_connections(engine, load, request):
    """QUERIES=3 over PARALLEL_QUERIES=3: three connections busy at once, so the work takes a third of
    its total; the pool keeps all three."""
    target = engine_target(request, engine)
    module = load("sqlalchemy_pool", target, POOL_MAX=3, WORK_SECONDS=0.6, QUERIES=3, PARALLEL_QUERIES=3)
    _, elapsed = invoke(module)
    assert 0.2 <= elapsed < 0.5
    assert settle(target.held, 3) == 3


def test_queries_split_the_work(load, pg_target, mysql_target):
    """QUERIES=4 sequential queries on one connection take the whole WORK_SECONDS between them; with
    PARALLEL_QUERIES=2, two connections take half of it."""
    sequential = load("sqlalchemy_nullpool", pg_target, WORK_SECONDS=0.4, QUERIES=4)
    _, elapsed = invoke(sequential)
    assert 0.4 <= elapsed < 0.7
    parallel = load("leaky", mysql_target, WORK_SECONDS=0.4, QUERIES=4, PARALLEL_QUERIES=2)
    _, elapsed = invoke(parallel)
    assert 0.2 <= elapsed < 0.35
    assert settle(mysql_target.held, 2) == 2 and len(parallel.LEAKED) == 2


def test_work_seconds_is_honoured(load, pg_target, mysql_target):
    """The invocation keeps the database busy for WORK_SECONDS (pg_sleep / SLEEP on the server)."""
    for target, workload in ((pg_target, "psycopg_pool_workload"), (mysql_target, "pymysql_single")):
        module = load(workload, target, WORK_SECONDS=0.3, POOL_MIN=0)
        _, elapsed = invoke(module)
        assert 0.3 <= elapsed < 0.6


def test_exp_work_varies(load, pg_target):
    """WORK_DIST=exp: each invocation's work is drawn from an exponential distribution with mean
    WORK_SECONDS, and the handler takes at least that long."""
    module = load("sqlalchemy_pool", pg_target, WORK_SECONDS=0.04, WORK_DIST="exp")
    works, elapsed = [], []
    for n in range(10):
        result, took = invoke(module, n)
        works.append(result["workSeconds"])
        elapsed.append(took)
        assert took >= result["workSeconds"]
    assert len(set(works)) == 10 and max(works) > 2 * min(works)
    assert max(elapsed) > 2 * min(elapsed)


def test_work_distributions():
    """fixed is the mean itself; exp has that mean (10 000 draws, a seeded generator)."""
    base = dict(engine="postgres", proxy=None, database_url="postgresql://x", pool_max=5, pool_min=None,
                pool_idle_s=None, pool_lifetime_s=None, pool_timeout_s=None, pool_pre_ping=None, queries=1,
                parallel_queries=1, work_s=0.3)
    rng = random.Random(7)
    assert draw_work(Settings(**base, work_dist="fixed"), rng) == 0.3
    draws = [draw_work(Settings(**base, work_dist="exp"), rng) for _ in range(10_000)]
    assert 0.28 < sum(draws) / len(draws) < 0.32
    assert draw_work(Settings(**{**base, "work_s": 0.0}, work_dist="exp"), rng) == 0.0


@pytest.mark.parametrize("workload,engine", UNSUPPORTED)
def test_unsupported_engine_fails_at_import(workload, engine, load, request):
    """A workload whose library cannot talk to the engine refuses at init, with an ImportError (so the
    runner ends the run with it) that names the engine and what to use instead."""
    target = engine_target(request, engine)
    with pytest.raises(WorkloadError, match=r"runs on (postgres|mysql) only, not (postgres|mysql) \(DB_ENGINE\): "
                                            r"use --engine (postgres|mysql)") as info:
        load(workload, target)
    assert isinstance(info.value, ImportError)
    assert settle(target.held, 0) == 0


@pytest.mark.parametrize("workload,settings,message", [
    ("sqlalchemy_pool", {"PARALLEL_QUERIES": 3}, r"PARALLEL_QUERIES=3 is more than QUERIES=1: .*--queries 3"),
    ("pymysql_single", {"PARALLEL_QUERIES": 2, "QUERIES": 2}, r"one connection, which cannot run "
                                                             r"PARALLEL_QUERIES=2 queries at once"),
    ("sqlalchemy_nullpool", {"POOL_MAX": "five"}, r"POOL_MAX='five': expected a whole number >= 1"),
    ("leaky", {"WORK_DIST": "gauss"}, r"WORK_DIST='gauss': expected one of fixed, exp"),
    ("psycopg_pool_workload", {"POOL_MIN": 3, "POOL_MAX": 2}, r"POOL_MIN=3 is more than POOL_MAX=2"),
    ("sqlalchemy_pool", {"WORK_SECONDS": "-1"}, r"WORK_SECONDS='-1': expected a number of seconds >= 0"),
])
def test_bad_settings_fail_at_import(workload, settings, message, load, pg_target, mysql_target):
    target = mysql_target if workload == "pymysql_single" else pg_target
    with pytest.raises(WorkloadError, match=message):
        load(workload, target, **settings)


def test_pymysql_single_reconnects_after_the_server_dropped_it(load, mysql_target):
    """ping(reconnect=True): a connection the server closed while the environment was frozen is replaced."""
    module = load("pymysql_single", mysql_target, WORK_SECONDS=0)
    invoke(module)
    first = module.connection.thread_id()
    with mysql_target.db.admin_connect() as admin, admin.cursor() as cur:
        cur.execute(f"KILL {first}")
    invoke(module, 2)
    assert module.connection.thread_id() != first
    assert settle(mysql_target.held, 1) == 1


# --- through the runner -----------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
RUN_ENGINES = {
    "postgres": dict(engine="postgres", provider="embedded", proxy="none"),
    "mysql": dict(engine="mysql", provider="native", proxy="none"),
    "pgbouncer": dict(engine="postgres", provider="embedded", proxy="pgbouncer"),
}


def readme_engines(workload: str) -> list[str]:
    """The engines the README's workload table lists for `workload`."""
    section = (ROOT / "README.md").read_text().split("## Workloads", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        if line.startswith(f"| `{workload}`"):
            return [e.strip() for e in line.split("|")[3].split(",")]
    raise AssertionError(f"README's workload table has no row for {workload}")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_every_workload_on_every_engine(workload, engine, tmp_path):
    """A short real run of each workload on each engine: every invocation ok and connections seen; or,
    where the workload's library cannot talk to the engine, a run that fails fast with the workload's
    message, and the README saying so."""
    assert (engine in readme_engines(workload)) == (engine in SUPPORTED[workload])
    config = RunConfig(handler=f"workloads.{workload}:handler", rps=10, duration_s=2, arrivals="constant",
                       # a sampling interval out of step with the arrivals, so NullPool's brief connections are seen
                       work_s=0.05, init_delay_s=0, sample_interval_s=0.07, seed=1, out=str(tmp_path / "run"),
                       **RUN_ENGINES[engine])
    t0 = time.monotonic()
    result = run(config, handle_signals=False)
    took = time.monotonic() - t0
    run_info = json.loads((result.run_dir / "run.json").read_text())
    assert_no_leftovers(run_info["run_id"])
    summary = json.loads((result.run_dir / "summary.json").read_text())
    if engine in SUPPORTED[workload]:
        assert result.status == "complete", result.error
        assert summary["statuses"] == {"ok": summary["invocations"]} and summary["invocations"] >= 19
        assert summary["peak_connections"] > 0
    else:
        assert result.status == "failed"
        assert f"{workload} runs on" in result.error and "use --engine" in result.error
        assert summary.get("ok", 0) == 0 and took < 20
