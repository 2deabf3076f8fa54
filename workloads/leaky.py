"""A leaky handler: every invocation opens a new driver connection (psycopg or PyMySQL, by engine) and
never closes it.

Each invocation leaves PARALLEL_QUERIES more connections open, so an environment's count grows with
every invocation it serves until it is reclaimed (or, in `--reclaim vanish` mode, until the server's idle
timeout). The connections are autocommit, so they sit idle, not inside a transaction; through PgBouncer
(transaction mode) they are idle clients that hold no server connection. They are kept in a module-level
list, as leaked objects usually are (a cache, a global, a closure): without a reference, CPython would
close each one when it is garbage collected, which for a psycopg connection is at once (measured). Pool
settings are ignored: there is no pool.
"""

import contextlib

from workloads._settings import connect_driver, dbapi_sleeper, ignored, response, run_work, settings

SETTINGS = settings()
ignored(SETTINGS, __name__, {name: "no pool" for name in
                             ("POOL_MIN", "POOL_IDLE_SECONDS", "POOL_LIFETIME_SECONDS", "POOL_TIMEOUT_SECONDS")})
#: Every connection this environment opened; none is ever closed.
LEAKED = []
_execute = dbapi_sleeper(SETTINGS)


@contextlib.contextmanager
def _new_connection():
    conn = connect_driver(SETTINGS)
    LEAKED.append(conn)
    yield conn  # and no close()


def handler(event, context):
    """Open new connection(s) for the invocation's work and leave them open."""
    return response(run_work(SETTINGS, _new_connection, _execute))
