"""SQLAlchemy QueuePool over PyMySQL, with SQLAlchemy's advice for MySQL (MySQL only).

Like workloads.sqlalchemy_pool (pool_size=POOL_MAX, max_overflow=0, pool_timeout, no minimum size, no
idle eviction), plus the two settings SQLAlchemy's MySQL documentation recommends against the server
closing idle connections after `wait_timeout` (`--db-idle-timeout`; 8 hours by default), which a frozen
Lambda environment meets easily:

- `pool_pre_ping=True` (on unless POOL_PRE_PING=0): every checkout pings the connection and replaces it
  if the server has closed it, instead of failing the invocation with "MySQL server has gone away";
- `pool_recycle=POOL_LIFETIME_SECONDS`: a connection older than that is replaced at checkout. Set it
  below wait_timeout to replace connections before the server drops them (unset: SQLAlchemy's -1, never).
"""

from workloads._settings import (QUEUEPOOL_LACKS, create_sqlalchemy_engine, ignored, queuepool_kwargs,
                                 require_engine, response, run_work, settings, sqlalchemy_sleeper)

SETTINGS = settings()
require_engine(SETTINGS, __name__, "mysql", instead="workloads.sqlalchemy_pool, which takes either engine")
ignored(SETTINGS, __name__, QUEUEPOOL_LACKS)
engine = create_sqlalchemy_engine(SETTINGS, **queuepool_kwargs(SETTINGS, pre_ping=True))
_execute = sqlalchemy_sleeper(SETTINGS)


def handler(event, context):
    """Check out pooled, pinged connection(s) and keep them busy for the invocation's work."""
    return response(run_work(SETTINGS, engine.connect, _execute))
