"""SQLAlchemy QueuePool created at module level: the common Lambda pattern, and lambdaemu's default.

The engine is built during the init phase (module import), so every execution environment gets its own
pool of `POOL_MAX` connections (`pool_size=POOL_MAX`, `max_overflow=0`), opened lazily and kept open
while the environment is frozen. Each invocation checks out one connection and keeps it busy on the
server for `WORK_SECONDS` (pg_sleep / SLEEP).

Environment: DATABASE_URL, POOL_MAX (default 5), WORK_SECONDS (default 0.3), POOL_TIMEOUT (default 30).
"""

from sqlalchemy import create_engine, text

from workloads._settings import env_float, env_int, sleep_sql, sqlalchemy_url

WORK = env_float("WORK_SECONDS", 0.3)
engine = create_engine(
    sqlalchemy_url(),
    pool_size=env_int("POOL_MAX", 5),
    max_overflow=0,
    pool_timeout=env_float("POOL_TIMEOUT", 30.0),
)
_SLEEP = text(sleep_sql().replace("%(seconds)s", ":seconds"))


def handler(event, context):
    """Check out one pooled connection and keep it busy for WORK_SECONDS."""
    with engine.connect() as conn:
        if WORK > 0:
            conn.execute(_SLEEP, {"seconds": WORK})
        else:
            conn.execute(text("SELECT 1"))
    return {"statusCode": 200}
