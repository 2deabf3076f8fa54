"""psycopg_pool.ConnectionPool created at module level (PostgreSQL only).

`ConnectionPool(conninfo, min_size=POOL_MIN, max_size=POOL_MAX, max_idle=POOL_IDLE_SECONDS,
max_lifetime=POOL_LIFETIME_SECONDS, timeout=POOL_TIMEOUT_SECONDS, open=True)`. Unset values keep
psycopg_pool's defaults: max_idle 600 s, max_lifetime 3600 s, timeout 30 s, and min_size 4 (capped at
POOL_MAX, since the pool refuses min_size > max_size). So out of the box every environment opens
min(4, POOL_MAX) connections as soon as it starts, whether it needs them or not: that is what the library
does by default, and what this workload shows; `--pool-min 0` opens connections only on demand.

The pool's background workers open the min_size connections during init and the first invocation, and
its scheduler closes connections above min_size after max_idle; none of them runs while the environment
is frozen, so an idle, frozen environment keeps everything it had. Through PgBouncer the pool's
connections are made with `prepare_threshold=None`. The module name keeps clear of the `psycopg_pool`
package, so the file can also be given as workloads/psycopg_pool_workload.py:handler.
"""

from psycopg_pool import ConnectionPool

from workloads._settings import (dbapi_sleeper, psycopg_conninfo, psycopg_kwargs, require_engine, response,
                                 run_work, settings)

SETTINGS = settings()
require_engine(SETTINGS, __name__, "postgres",
               instead="a workload that speaks MySQL (workloads.sqlalchemy_pool, workloads.pymysql_single)")
#: psycopg_pool's own min_size default.
LIBRARY_MIN_SIZE = 4

_optional = {"max_idle": SETTINGS.pool_idle_s, "max_lifetime": SETTINGS.pool_lifetime_s,
             "timeout": SETTINGS.pool_timeout_s}
pool = ConnectionPool(
    psycopg_conninfo(SETTINGS),
    min_size=min(LIBRARY_MIN_SIZE, SETTINGS.pool_max) if SETTINGS.pool_min is None else SETTINGS.pool_min,
    max_size=SETTINGS.pool_max,
    kwargs=psycopg_kwargs(SETTINGS),
    open=True,
    name="lambdaemu-workload",
    **{key: value for key, value in _optional.items() if value is not None},
)
_execute = dbapi_sleeper(SETTINGS)


def handler(event, context):
    """Borrow pooled connection(s) (committed and returned at the end) for the invocation's work."""
    return response(run_work(SETTINGS, pool.connection, _execute))
