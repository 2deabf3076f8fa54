"""The Node.js workloads (workloads/node, real npm packages) in real Node environments against real
servers: connections per environment for sequelize's pool settings, what sequelize-pool does across a
freeze, the node-postgres pool (an ES module) and its callback-handler pitfall, mysql2, serverless-mysql
and the leaky client on MariaDB, and the settings each workload refuses at init."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import new_run_id
from emulator.databases.base import free_port
from emulator.databases.mysql import MySQLServer
from emulator.databases.pgbouncer import PgBouncer
from emulator.errors import classify
from emulator.runtime_api import deadline_ms, error_summary
from runtime_harness import NODE_WORKLOADS, RuntimeEnv

APP = "lambdaemu-env-7"


@pytest.fixture(scope="module", autouse=True)
def node_workloads_installed() -> None:
    # scripts/test runs `npm ci --prefix workloads/node`; without it these tests cannot mean anything.
    assert (NODE_WORKLOADS / "node_modules" / "sequelize").is_dir(), "run: npm ci --prefix workloads/node"


@pytest.fixture(scope="module")
def mysql():
    with MySQLServer(run_id=new_run_id(), max_connections=30) as db:
        yield db


class Held:
    """The server-side connections of one environment, by client port (and, on PostgreSQL, the
    application name node-postgres takes from PGAPPNAME)."""

    def __init__(self, db: Any, env: RuntimeEnv) -> None:
        self.db, self.env = db, env
        self.admin = db.admin_connect()

    def rows(self) -> list:
        try:
            ports = {c.laddr.port for c in psutil.Process(self.env.proc.pid).net_connections(kind="tcp")
                     if c.raddr and c.raddr.port == self.db.port}
        except psutil.NoSuchProcess:
            ports = set()
        return [row for row in self.db.connections(self.admin) if row.client_port in ports]

    def count(self) -> int:
        return len(self.rows())

    def close(self) -> None:
        self.admin.close()


@pytest.fixture
def start(tmp_path: Path):
    """Start a workload environment with the database's variables; returns (env, held)."""
    opened: list[tuple[RuntimeEnv, Held | None]] = []

    def _start(db: Any, spec: str, **variables: Any) -> tuple[RuntimeEnv, Held | None]:
        env_vars = {**db.handler_env(), "PGAPPNAME": APP, "WORK_SECONDS": "0.2",
                    **{k: str(v) for k, v in variables.items()}}
        env = RuntimeEnv(spec, task_root=NODE_WORKLOADS, env=env_vars, log_path=tmp_path / f"env-{len(opened)}.log")
        # Behind PgBouncer, attribution is PgBouncer's (SHOW CLIENTS), not the server's: no Held then.
        held = None if isinstance(db, PgBouncer) else Held(db, env)
        opened.append((env, held))
        assert env.wait_next(timeout_s=30), env.log()
        return env, held

    yield _start
    for env, held in opened:
        env.close()
        if held is not None:
            held.close()


def invoke_watching(env: RuntimeEnv, held: Held | None, timeout_s: float = 30) -> tuple[tuple, int]:
    """Invoke once; return the outcome and the most connections the environment held meanwhile (0
    without a `held`)."""
    env.endpoint.deliver(f"r-{time.monotonic_ns()}", b"{}", deadline_ms(timeout_s))
    before = len(env.listener.events)
    peak = 0

    def done() -> bool:
        nonlocal peak
        if held is not None:
            peak = max(peak, held.count())
        return any(e[0] in ("response", "error", "protocol_error") for e in env.listener.events[before:])

    assert env.run_until(done, timeout_s), env.log()
    outcome = next(e for e in env.listener.events[before:] if e[0] in ("response", "error", "protocol_error"))
    assert outcome[0] == "response", (outcome, env.log())
    assert env.wait_next()
    return outcome, peak


def sessions_started(db: Any) -> int:
    """Sessions ever started in the application database (PostgreSQL's own counter)."""
    with db.admin_connect() as conn:
        return conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", (db.dbname,)).fetchone()[0]


def wait_for(predicate, timeout_s: float, poll_s: float = 0.02) -> float | None:
    """Seconds until `predicate()` held, or None if it did not within `timeout_s`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if predicate():
            return time.monotonic() - t0
        time.sleep(poll_s)
    return None


# --- sequelize ---------------------------------------------------------------------------------------


def test_sequelize_default_pool_opens_a_connection_per_parallel_query(postgres, start):
    sessions_before = sessions_started(postgres)
    env, held = start(postgres, "sequelize_pool.js:handler", QUERIES=5, PARALLEL_QUERIES=5, WORK_SECONDS=0.5)
    outcome, peak = invoke_watching(env, held)
    assert json.loads(outcome[2]) == {"statusCode": 200, "workSeconds": 0.5}
    assert peak == 5  # sequelize's default max is 5
    rows = held.rows()
    assert len(rows) == 5 and {r.application_name for r in rows} == {APP}  # kept idle, named by PGAPPNAME
    # The cold start's first query opened one more connection, outside the pool, for the version check.
    assert sessions_started(postgres) - sessions_before == 6
    sessions_before = sessions_started(postgres)
    _, peak = invoke_watching(env, held)
    assert peak == 5 and sessions_started(postgres) == sessions_before  # warm: the pool's five, reused


def test_sequelize_max_1_serialises_on_one_connection(postgres, start):
    env, held = start(postgres, "sequelize_pool.js:handler", QUERIES=5, PARALLEL_QUERIES=5, WORK_SECONDS=0.5,
                      POOL_MAX=1)
    t0 = time.monotonic()
    _, peak = invoke_watching(env, held)
    assert peak == 1 and held.count() == 1
    assert time.monotonic() - t0 >= 0.5  # the five 0.1 s queries took turns


def test_sequelize_idle_connections_outlast_a_freeze_and_go_on_thaw(postgres, start):
    env, held = start(postgres, "sequelize_pool.js:handler", QUERIES=2, PARALLEL_QUERIES=2,
                      POOL_IDLE_SECONDS=1)  # evict: sequelize's default 1 s
    invoke_watching(env, held)
    assert held.count() == 2

    env.freeze()
    time.sleep(3.0)  # past idle + evict: a running process would have closed both
    assert held.count() == 2
    env.thaw()
    reaped_after = wait_for(lambda: held.count() == 0, 2.0)
    assert reaped_after is not None and reaped_after < 0.5, reaped_after  # the overdue reap runs first

    # Unfrozen, a released connection lives between idle and idle + evict.
    invoke_watching(env, held)
    released = time.monotonic()
    assert held.count() == 2
    gone = wait_for(lambda: held.count() == 0, 4.0)
    assert gone is not None
    lifetime = time.monotonic() - released
    # `released` is taken after the invocation returned, a little after the pool stamped the release:
    # the connection can be seen gone up to that gap before idle (1 s) has passed here.
    assert 0.9 <= lifetime <= 2.5, lifetime


@pytest.mark.slow
def test_sequelize_idle_0_means_30_seconds(postgres, start):
    env, held = start(postgres, "sequelize_pool.js:handler", POOL_IDLE_SECONDS=0, POOL_EVICT_SECONDS=0.5)
    invoke_watching(env, held)
    released = time.monotonic()
    time.sleep(5)
    assert held.count() == 1  # not "close at once": sequelize-pool reads 0 as unset
    assert wait_for(lambda: held.count() == 0, 30) is not None
    assert 29.5 <= time.monotonic() - released <= 31.5


def test_sequelize_settings_are_checked_at_init(postgres, start):
    env, _ = start(postgres, "sequelize_pool.js:handler", POOL_TIMEOUT_SECONDS=5, POOL_ACQUIRE_SECONDS=7)
    (kind, error_type, body), = env.listener.events
    assert kind == "init_error" and error_type == "WorkloadError"
    assert "POOL_TIMEOUT_SECONDS=5 and POOL_ACQUIRE_SECONDS=7" in error_summary(body)[1]
    env, _ = start(postgres, "sequelize_pool.js:handler", QUERIES=2, PARALLEL_QUERIES=3)
    assert error_summary(env.listener.events[0][2])[1].startswith("PARALLEL_QUERIES=3 is more than QUERIES=2")
    env, _ = start(postgres, "sequelize_pool.js:handler", POOL_MAX="two")
    assert error_summary(env.listener.events[0][2])[1] == 'POOL_MAX="two": expected a whole number >= 1'
    assert env.proc.wait(timeout=10) == 129


# --- node-postgres -----------------------------------------------------------------------------------


def test_pg_pool_esm_workload(postgres, start):
    env, held = start(postgres, "pg_pool.mjs:handler", QUERIES=3, PARALLEL_QUERIES=3, POOL_MAX=5)
    _, peak = invoke_watching(env, held)
    assert peak == 3 and {r.application_name for r in held.rows()} == {APP}


def test_pg_callback_handler_waits_for_the_pool_to_go_idle(postgres, start):
    # With callbackWaitsForEmptyEventLoop (Lambda's default) the response waits until the pool has
    # closed its idle client; with the flag off it goes at once and the connection stays.
    waiting, waiting_held = start(postgres, "pg_callback.js:handler", POOL_IDLE_SECONDS=1.5, WORK_SECONDS=0.1)
    t0 = time.monotonic()
    invoke_watching(waiting, waiting_held)
    assert time.monotonic() - t0 >= 1.5 and waiting_held.count() == 0

    prompt, prompt_held = start(postgres, "pg_callback.js:handler", POOL_IDLE_SECONDS=1.5, WORK_SECONDS=0.1,
                                CALLBACK_WAITS_FOR_EMPTY_EVENT_LOOP=0)
    t0 = time.monotonic()
    invoke_watching(prompt, prompt_held)
    assert time.monotonic() - t0 < 1.0 and prompt_held.count() == 1


def test_leaky_grows_by_one_connection_per_invocation(postgres, start):
    env, held = start(postgres, "leaky.js:handler", WORK_SECONDS=0.05)
    counts = []
    for _ in range(3):
        invoke_watching(env, held)
        counts.append(held.count())
    assert counts == [1, 2, 3]


def test_engine_mismatch_is_refused_at_init(postgres, start):
    for spec in ("mysql2_pool.js:handler", "serverless_mysql.js:handler"):
        env, _ = start(postgres, spec)
        (kind, error_type, body), = env.listener.events
        assert error_type == "WorkloadError" and "use --engine mysql" in error_summary(body)[1]


# --- MySQL (MariaDB) ---------------------------------------------------------------------------------


def test_mysql2_pool_opens_a_connection_per_parallel_query(mysql, start):
    env, held = start(mysql, "mysql2_pool.js:handler", QUERIES=3, PARALLEL_QUERIES=3, POOL_MAX=5)
    _, peak = invoke_watching(env, held)
    assert peak == 3 and held.count() == 3  # attributed by client port: no application name on MySQL


def test_mysql2_idle_timeout_needs_max_idle_below_the_limit(mysql, start):
    kept, kept_held = start(mysql, "mysql2_pool.js:handler", POOL_MAX=3, POOL_IDLE_SECONDS=1)
    invoke_watching(kept, kept_held)
    assert "POOL_IDLE_SECONDS=1 has no effect" in kept.log()
    reaped, reaped_held = start(mysql, "mysql2_pool.js:handler", POOL_MAX=3, POOL_IDLE_SECONDS=1, POOL_MAX_IDLE=2)
    invoke_watching(reaped, reaped_held)
    assert wait_for(lambda: reaped_held.count() == 0, 4.0) is not None
    assert kept_held.count() == 1


def test_serverless_mysql_keeps_one_connection(mysql, start):
    env, held = start(mysql, "serverless_mysql.js:handler", QUERIES=2)
    for _ in range(2):
        _, peak = invoke_watching(env, held)
        assert peak == 1
    assert held.count() == 1
    refused, _ = start(mysql, "serverless_mysql.js:handler", QUERIES=2, PARALLEL_QUERIES=2)
    assert "cannot run PARALLEL_QUERIES=2 queries at once" in error_summary(refused.listener.events[0][2])[1]


def test_leaky_on_mysql(mysql, start):
    env, held = start(mysql, "leaky.js:handler", WORK_SECONDS=0.05, QUERIES=2, PARALLEL_QUERIES=2)
    invoke_watching(env, held)
    invoke_watching(env, held)
    assert held.count() == 4


def test_sequelize_on_mysql(mysql, start):
    env, held = start(mysql, "sequelize_pool.js:handler", QUERIES=3, PARALLEL_QUERIES=3)
    _, peak = invoke_watching(env, held)
    assert peak == 3 and held.count() == 3


def test_node_driver_errors_get_the_python_error_kinds(postgres, start):
    # The supervisor classifies a runtime's posted error (its type and message) with the same rules as a
    # Python exception, so runs compare column for column whatever the language.
    def kind(spec: str, **variables: Any) -> str:
        env, _ = start(postgres, spec, **variables)
        outcome = env.invoke({}, function_timeout_s=10)
        assert outcome[0] == "error", (outcome, env.log())
        return classify([outcome[2]], error_summary(outcome[3])[1])

    contention = {"POOL_MAX": 1, "QUERIES": 2, "PARALLEL_QUERIES": 2, "WORK_SECONDS": 1}
    assert kind("sequelize_pool.js:handler", POOL_ACQUIRE_SECONDS=0.2, **contention) == "pool_timeout"
    assert kind("pg_pool.mjs:handler", POOL_TIMEOUT_SECONDS=0.2, **contention) == "pool_timeout"
    closed = f"postgresql://app:x@127.0.0.1:{free_port()}/app"
    assert kind("sequelize_pool.js:handler", DATABASE_URL=closed) == "connection_refused"
    assert kind("pg_pool.mjs:handler", DATABASE_URL=closed) == "connection_refused"


def test_sequelize_and_pg_through_pgbouncer(postgres, start):
    # Transaction pooling: the Node drivers prepare no named statements, so repeated queries work, and
    # PgBouncer sees the environment's pool as its clients.
    with PgBouncer(postgres, new_run_id()) as bouncer:
        for spec in ("sequelize_pool.js:handler", "pg_pool.mjs:handler"):
            env, held = start(bouncer, spec, QUERIES=3, PARALLEL_QUERIES=3, WORK_SECONDS=0.05,
                              DB_PROXY="pgbouncer")
            for _ in range(6):
                invoke_watching(env, held)
            assert bouncer.stats().client_connections == 3
            env.close()
