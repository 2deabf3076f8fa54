"""One PyMySQL connection per environment, kept across invocations (MySQL only).

The pattern of serverless-mysql and of most hand-written Lambda MySQL code: a module-level connection,
opened by the first invocation (not at init, so a full server shows as the invocation's "Too many
connections" error rather than an init failure) and pinged before every invocation; when the server has
closed it while the environment was frozen (`wait_timeout`, `--db-idle-timeout`), a new one replaces it.
That is what `ping(reconnect=True)` did; PyMySQL 1.2 deprecates the argument in favour of exactly this. One environment holds at most one connection; it is autocommit, so between
invocations the session is idle, not inside a transaction.

One connection cannot run queries in parallel: PARALLEL_QUERIES > 1 is refused at init. There is no pool
to size, time out, recycle or evict, so the POOL_* settings are ignored.
"""

import contextlib

import pymysql

from workloads._settings import (WorkloadError, dbapi_sleeper, ignored, pymysql_kwargs, require_engine, response,
                                 run_work, settings)

SETTINGS = settings()
require_engine(SETTINGS, __name__, "mysql", instead="a workload that speaks PostgreSQL (workloads.sqlalchemy_pool, "
               "workloads.psycopg_pool_workload)")
if SETTINGS.parallel_queries > 1:
    raise WorkloadError(f"{__name__} has one connection, which cannot run PARALLEL_QUERIES="
                        f"{SETTINGS.parallel_queries} queries at once: use --parallel-queries 1, or a pool "
                        "(workloads.sqlalchemy_pymysql)")
ignored(SETTINGS, __name__, {name: "one connection, no pool" for name in
                             ("POOL_MIN", "POOL_IDLE_SECONDS", "POOL_LIFETIME_SECONDS", "POOL_TIMEOUT_SECONDS")})
connection = None
_execute = dbapi_sleeper(SETTINGS)


@contextlib.contextmanager
def _the_connection():
    global connection
    if connection is not None:
        try:
            connection.ping()
        except pymysql.err.Error:  # closed by the server (or the network) while we were frozen
            if connection.open:
                connection.close()
            connection = None
    if connection is None:
        connection = pymysql.connect(**pymysql_kwargs(SETTINGS), autocommit=True)
    yield connection


def handler(event, context):
    """Use the environment's one connection (opened on first use, revived if the server dropped it)."""
    return response(run_work(SETTINGS, _the_connection, _execute))
