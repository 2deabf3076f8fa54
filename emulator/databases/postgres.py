"""PostgreSQL as an engine: settings and their accepted range, users, sampling queries, counters and the
log lines of refusals. `PostgresServer` is a PostgreSQL started by a launcher (`embedded`, `native`,
`docker`); `external.ExternalPostgres` attaches to a server the user runs.

Users: an application user per application (an ordinary role, like an RDS application user, so it runs
into "too many clients" when max_connections minus superuser_reserved_connections are taken) and a
superuser for the sampler, which may use the reserved slots and so keeps sampling while the
application roles are locked out.

What the server shows of connection attempts (measured, tests/test_server_view.py): PostgreSQL 18 lists
a backend that is still authenticating in pg_stat_activity with state 'starting' and no user, so an
attempt about to be refused ("remaining connection slots are reserved") is visible for a moment;
PostgreSQL 15 lists it only once authenticated. Both are state "connecting" here, apart from sessions.
`pg_stat_database.sessions` counts established sessions only; refusals have no counter, so they are
counted from the server log (FATAL lines, logged at the default log_min_messages).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

from ..errors import UsageError
from .base import CONNECT_TIMEOUT_S, DEFAULT_APPLICATION, Account, ConnectionRow, ServerCounters
from .server import ADMIN_USER, APP_DB, Engine, Launcher, Server

APP_USER = DEFAULT_APPLICATION
DEFAULT_MAX_CONNECTIONS = 100  # PostgreSQL's own default
#: PostgreSQL's superuser_reserved_connections default; lambdaemu's servers keep it, and reserved_connections 0.
SUPERUSER_RESERVED_CONNECTIONS = 3
#: The largest max_connections every supported version starts with: PostgreSQL allows fewer than
#: 2^18 - 1 server processes in all, and counts its background workers (autovacuum, worker processes,
#: WAL senders) against that. Measured here: 15 starts with 262121 and refuses 262122; 18 (16
#: autovacuum slots) refuses 262121 and starts with 262107 (in 15 s, shared memory included).
MAX_MAX_CONNECTIONS = 262_107

_STATES = {
    "active": "active",
    "idle": "idle",
    "idle in transaction": "idle_in_transaction",
    "idle in transaction (aborted)": "idle_in_transaction",
    "starting": "connecting",
    "": "connecting",  # a client backend with no state yet has not finished starting
}

# Counted like every other client of the server: background workers are not client connections.
CONNECTIONS_SQL = (
    "SELECT state, client_port, application_name, usename FROM pg_stat_activity "
    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
)
# Sessions established since the statistics were reset (PostgreSQL 14 and later).
SESSIONS_SQL = "SELECT COALESCE(sum(sessions), 0) FROM pg_stat_database"


def pg_connections(conn: Any) -> list[ConnectionRow]:
    """Rows of pg_stat_activity as `ConnectionRow`s (every PostgreSQL provider's view)."""
    with conn.cursor() as cur:
        cur.execute(CONNECTIONS_SQL)
        return [ConnectionRow(_STATES.get(state or "", "other"), port, app or "", user or "")
                for state, port, app, user in cur.fetchall()]


def pg_counters(conn: Any, refused_in_log: int | None) -> ServerCounters:
    """`sessions` summed over databases (None before PostgreSQL 14), refusals as counted from the log."""
    psycopg = _psycopg()
    try:
        with conn.cursor() as cur:
            cur.execute(SESSIONS_SQL)
            sessions = int(cur.fetchone()[0])
    except psycopg.errors.UndefinedColumn:
        sessions = None
    return ServerCounters(sessions_opened=sessions, refused=refused_in_log)


def pg_connect(*, host: str, port: int, user: str, password: str, dbname: str | None = None,
               **kwargs: Any) -> Any:
    """A psycopg connection whose whole start-up (TCP, TLS negotiation, authentication) has a deadline:
    psycopg applies connect_timeout to the handshake, not only to the TCP connect."""
    kwargs.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    kwargs.setdefault("autocommit", True)
    return _psycopg().connect(host=host, port=port, user=user, password=password, dbname=dbname or "postgres",
                              **kwargs)


class PostgresEngine(Engine):
    """PostgreSQL: what lambdaemu sets, creates and reads on any PostgreSQL server it starts."""

    name = "postgres"
    label = "PostgreSQL"
    default_max_connections = DEFAULT_MAX_CONNECTIONS
    user_name_limit = 63
    user_name_limit_source = "NAMEDATALEN - 1 bytes"
    reserved_users = (ADMIN_USER, "postgres", "public", "pgbouncer")
    refusal_log = re.compile(rb"FATAL:\s+(sorry, too many clients already|remaining connection slots are reserved)")

    def accepted_max_connections(self) -> tuple[int, int]:
        return SUPERUSER_RESERVED_CONNECTIONS + 1, MAX_MAX_CONNECTIONS

    def max_connections_reason(self) -> str:
        return (f"it must exceed superuser_reserved_connections ({SUPERUSER_RESERVED_CONNECTIONS}), and with its "
                "background workers stay under 2^18 server processes")

    def user_name(self, application: str) -> str:
        name = super().user_name(application)
        if name.lower().startswith("pg_"):
            raise UsageError(f"application {application!r}: PostgreSQL reserves role names starting with pg_; "
                             "rename the application")
        return name

    def server_options(self, *, listen: str, port: int) -> list[str]:
        """Command-line options of `postgres` (the same for a native server and the postgres image)."""
        settings = {
            "listen_addresses": listen,
            "port": str(port),
            "max_connections": str(self.max_connections),
            # A throwaway server: durability costs time and nothing else here.
            "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
            # Refusals are counted from the FATAL lines on stderr; one line per connection would drown them.
            "logging_collector": "off", "log_connections": "off",
        }
        if self.idle_timeout_s:
            settings["idle_session_timeout"] = f"{int(self.idle_timeout_s * 1000)}ms"
        argv: list[str] = []
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def connect(self, **kwargs: Any) -> Any:
        return pg_connect(**kwargs)

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        return (_psycopg().OperationalError,)

    def bootstrap(self, conn: Any, accounts: Iterable[Account], *, admin_password: str,
                  client_hosts: tuple[str, ...]) -> None:
        # The admin account is the superuser the launcher created (initdb -U, POSTGRES_USER).
        from psycopg import sql

        accounts = list(accounts)
        for account in accounts:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(account.user), sql.Literal(account.password)))
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(APP_DB),
                                                                  sql.Identifier(accounts[0].user)))
        for account in accounts[1:]:
            conn.execute(sql.SQL("GRANT ALL ON DATABASE {} TO {}").format(sql.Identifier(APP_DB),
                                                                         sql.Identifier(account.user)))

    def facts(self, conn: Any) -> tuple[int, str]:
        max_connections = int(conn.execute("SHOW max_connections").fetchone()[0])
        return max_connections, conn.execute("SELECT version()").fetchone()[0].split(" on ")[0]

    def connections(self, conn: Any) -> list[ConnectionRow]:
        return pg_connections(conn)

    def counters(self, conn: Any, refused_in_log: int | None) -> ServerCounters:
        return pg_counters(conn, refused_in_log)

    def terminate_sessions(self, conn: Any, users: Iterable[str]) -> None:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                     "AND pid <> pg_backend_pid() AND usename = ANY(%s)", (list(users),))


class PostgresServer(Server):
    """A PostgreSQL server lambdaemu starts and stops, with the `embedded`, `native` or `docker` launcher."""

    def __init__(self, *, provider: str = "embedded", run_id: str, max_connections: int | None = None,
                 idle_session_timeout_s: float | None = None, bindir: Path | None = None,
                 applications: Iterable[str] = (DEFAULT_APPLICATION,), launcher: Launcher | None = None) -> None:
        from . import launcher_for

        engine = PostgresEngine(max_connections=max_connections, idle_timeout_s=idle_session_timeout_s)
        super().__init__(engine, launcher or launcher_for(provider, "postgres", bindir=bindir), run_id=run_id,
                         applications=applications)


def _psycopg() -> Any:
    import psycopg

    return psycopg

