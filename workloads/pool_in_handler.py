"""The pool created inside the handler: a new SQLAlchemy engine (QueuePool) every invocation, never
disposed.

Each invocation builds an engine with the same settings as workloads.sqlalchemy_pool, uses it, and drops
it without `engine.dispose()`, so the connection it opened stays open and the environment's count grows
by PARALLEL_QUERIES per invocation (the pool meant to cap connections caps nothing). The engines are kept
in a module-level list, as something in real code usually keeps them (an event listener, a cache, a
global reassigned per tenant). Dropping every reference does not close them promptly either: an engine
is a web of reference cycles, so its connections close only when the garbage collector's full
collection runs (measured with psycopg: three invocations left three connections, until gc.collect()).
"""

from workloads._settings import (QUEUEPOOL_LACKS, create_sqlalchemy_engine, ignored, queuepool_kwargs, response,
                                 run_work, settings, sqlalchemy_sleeper)

SETTINGS = settings()
ignored(SETTINGS, __name__, QUEUEPOOL_LACKS)
#: Every engine the handler created; none is ever disposed.
ENGINES = []
_execute = sqlalchemy_sleeper(SETTINGS)


def handler(event, context):
    """Build a new pooled engine (the mistake), use it, and leave it with its connection(s) open."""
    engine = create_sqlalchemy_engine(SETTINGS, **queuepool_kwargs(SETTINGS))
    ENGINES.append(engine)
    return response(run_work(SETTINGS, engine.connect, _execute))
