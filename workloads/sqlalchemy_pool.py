"""SQLAlchemy QueuePool created at module level: the common Lambda pattern, and lambdaemu's default.

The engine is built in the init phase (module import), so every execution environment has its own pool:
`pool_size=POOL_MAX`, `max_overflow=0` (POOL_MAX is the cap), `pool_timeout=POOL_TIMEOUT_SECONDS`,
`pool_recycle=POOL_LIFETIME_SECONDS`. Connections open on first use and stay open while the environment
is frozen: QueuePool has no minimum size and no idle eviction, so POOL_MIN and POOL_IDLE_SECONDS are
ignored (said in the environment's log). PostgreSQL (psycopg) or MySQL (PyMySQL), also through PgBouncer.
"""

from workloads._settings import (QUEUEPOOL_LACKS, create_sqlalchemy_engine, ignored, queuepool_kwargs, response,
                                 run_work, settings, sqlalchemy_sleeper)

SETTINGS = settings()
ignored(SETTINGS, __name__, QUEUEPOOL_LACKS)
engine = create_sqlalchemy_engine(SETTINGS, **queuepool_kwargs(SETTINGS))
_execute = sqlalchemy_sleeper(SETTINGS)


def handler(event, context):
    """Check out pooled connection(s) and keep them busy for the invocation's work."""
    return response(run_work(SETTINGS, engine.connect, _execute))
