"""The few named exceptions lambdaemu raises, and the stable error kinds recorded in results.

Exceptions say what went wrong in one line, naming the setting and the fix; the CLI turns them into
exit codes (`UsageError` → 2, everything else → 1).

Error kinds are the fixed vocabulary of `invocations.csv` (`error_kind`) and `summary.json` (`errors`):
a driver-specific exception from inside a handler is classified into one of them by `classify`, so a
PostgreSQL run and a MySQL run can be compared column for column.
"""

from __future__ import annotations

import re


class LambdaemuError(Exception):
    """Base class for every error lambdaemu reports to the user."""


class UsageError(LambdaemuError):
    """A bad setting: the message names the setting, the bad value and the fix (exit status 2)."""


class DatabaseStartError(LambdaemuError):
    """A database server (or proxy) could not be started or did not become ready."""


class HandlerLoadError(LambdaemuError):
    """The handler module could not be imported in an environment; the run ends instead of respawning."""


class RunInterrupted(LambdaemuError):
    """Raised out of set-up when SIGINT/SIGTERM arrives before the supervisor loop runs."""

    def __init__(self, signum: int):
        import signal

        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


# --- error kinds -----------------------------------------------------------------------------------

#: Invocation statuses (invocations.csv `status`). `ok` and `throttled` are not errors.
STATUSES = (
    "ok",
    "throttled",
    "handler_error",
    "timeout",
    "crash",
    "init_error",
    "out_of_memory",
)

#: Error kinds (invocations.csv `error_kind`, summary.json `errors`), most specific first.
ERROR_KINDS = (
    "too_many_connections",
    "pool_timeout",
    "proxy_wait_timeout",
    "connection_refused",
    "connection_lost",
    "authentication_failed",
    "database_error",
    "timeout",
    "crash",
    "runtime_error",
    "init_error",
    "out_of_memory",
    "handler_error",
)

# (kind, exception type names, message pattern). The first rule whose type name is in the exception's
# MRO, or whose pattern matches the message, wins. Matching by name keeps this module free of driver
# imports (the zygote imports the drivers; the classifier must not depend on which are installed).
_RULES: tuple[tuple[str, tuple[str, ...], re.Pattern[str] | None], ...] = (
    # PostgreSQL SQLSTATE 53300 "sorry, too many clients already"; "remaining connection slots are
    # reserved"; MySQL/MariaDB error 1040 "Too many connections"; PgBouncer "no more connections allowed".
    (
        "too_many_connections",
        ("TooManyConnections",),
        re.compile(
            r"too many (clients|connections)|remaining connection slots are reserved|"
            r"\b1040\b|no more connections allowed|max_client_conn",
            re.I,
        ),
    ),
    # PgBouncer's query_wait_timeout (the RDS Proxy ConnectionBorrowTimeout stand-in).
    ("proxy_wait_timeout", (), re.compile(r"query_wait_timeout|query wait timeout", re.I)),
    # SQLAlchemy QueuePool "QueuePool limit of size N overflow M reached, connection timed out";
    # psycopg_pool PoolTimeout "couldn't get a connection after N sec"; Node: sequelize's
    # ConnectionAcquireTimeoutError ("Operation timeout"), pg-pool "timeout exceeded when trying to connect".
    (
        "pool_timeout",
        ("PoolTimeout", "SequelizeConnectionAcquireTimeoutError"),
        re.compile(r"QueuePool limit of size|couldn't get a connection after|timeout exceeded when trying to connect",
                   re.I),
    ),
    ("authentication_failed", (), re.compile(r"password authentication failed|Access denied for user", re.I)),
    (
        "connection_refused",
        ("ConnectionRefusedError",),
        re.compile(r"connection refused|Can't connect to MySQL server|\b2003\b|ECONNREFUSED", re.I),
    ),
    (
        "connection_lost",
        (),
        re.compile(
            r"server closed the connection|terminating connection|Lost connection to MySQL|"
            r"\b2013\b|\b2006\b|server has gone away|connection is closed|consuming input failed|"
            r"Connection terminated unexpectedly|ECONNRESET",
            re.I,
        ),
    ),
    ("database_error", ("DatabaseError", "OperationalError", "InterfaceError", "Error"), None),
)


def classify(type_names: list[str] | tuple[str, ...], message: str) -> str:
    """Map an exception (its class and base-class names, and its message) to a stable error kind.

    Anything not recognised as a database problem is a `handler_error`.
    """
    for kind, names, pattern in _RULES:
        if pattern is not None and pattern.search(message or ""):
            return kind
        if names and any(name in names for name in type_names):
            # "Error" alone is too generic to trust unless it comes from a DB-API module.
            if kind == "database_error" and not _looks_like_dbapi(type_names):
                continue
            return kind
    return "handler_error"


def _looks_like_dbapi(type_names: list[str] | tuple[str, ...]) -> bool:
    return any(n in ("DatabaseError", "OperationalError", "InterfaceError", "DBAPIError") for n in type_names)


def exception_type_names(exc: BaseException) -> list[str]:
    """The class names in an exception's MRO, plus those of its causes (SQLAlchemy wraps DB-API errors)."""
    names: list[str] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        names.extend(cls.__name__ for cls in type(cur).__mro__)
        cur = cur.__cause__ or cur.__context__
    return names


# How an invocation is worded when its environment's init passed --init-limit (the summary counts them).
INIT_TIMEOUT_PREFIX = "init phase exceeded "
