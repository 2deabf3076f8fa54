"""SQLAlchemy with NullPool: connect per invocation, close at its end.

The engine is created at init but holds no connections: each checkout opens a new one and returning it
closes it, so a frozen environment holds nothing and the database sees one connection per invocation in
flight (times PARALLEL_QUERIES), at the price of a connection set-up (TCP, authentication) per
invocation. Pool settings have no meaning here and are ignored. PostgreSQL or MySQL, also through PgBouncer
(where connecting per invocation is cheap and the usual advice).
"""

from sqlalchemy.pool import NullPool

from workloads._settings import create_sqlalchemy_engine, ignored, response, run_work, settings, sqlalchemy_sleeper

SETTINGS = settings()
ignored(SETTINGS, __name__, {name: "NullPool keeps no connections" for name in
                             ("POOL_MIN", "POOL_IDLE_SECONDS", "POOL_LIFETIME_SECONDS", "POOL_TIMEOUT_SECONDS")})
engine = create_sqlalchemy_engine(SETTINGS, poolclass=NullPool)
_execute = sqlalchemy_sleeper(SETTINGS)


def handler(event, context):
    """Open connection(s), do the invocation's work, close them."""
    return response(run_work(SETTINGS, engine.connect, _execute))
