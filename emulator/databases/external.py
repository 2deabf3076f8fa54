"""The `external` provider: a server the user runs (`--provider external --db-url ...`), never started
or stopped by lambdaemu.

Every application connects as the URL's user unless the caller names one for it:
`application_urls={"orders": "postgresql://orders:pw@db:5432/app"}` gives application `orders` an
existing user of the same server (same engine, host, port and database). The URL's user is also the
sampler's; without the privilege to see other users' sessions (PostgreSQL: pg_read_all_stats; MySQL:
PROCESS) it sees only its own. Nothing here reads the server's log, so `refused` is unknown on PostgreSQL.

An unreachable URL is a usage error (one line, the password hidden, exit 2); a server that accepts the
TCP connection and never answers is one too, after the connect deadline.
"""

from __future__ import annotations

import urllib.parse
from typing import Any, Iterable, Mapping

from ..errors import UsageError
from .base import DEFAULT_APPLICATION, Account, ConnectionRow, Database, ServerCounters


def _redact(url: str) -> str:
    from ..config import redact_url

    return redact_url(url)


class External(Database):
    """Base of the external providers: accounts from URLs, checks on attach."""

    provider = "external"
    #: URL schemes of the engine, how messages name it, its default port, and the engine description
    #: whose queries the sampler runs (set by subclasses).
    schemes: tuple[str, ...] = ()
    label = ""
    default_port = 0
    engine_impl: Any = None

    def __init__(self, url: str, *, applications: Iterable[str] = (DEFAULT_APPLICATION,),
                 application_urls: Mapping[str, str] | None = None) -> None:
        super().__init__(applications)
        self._url = self.normalise(url)
        parts = self._parse(self._url, "--db-url")
        self.host, self.port, self.dbname = parts["host"], parts["port"], parts["dbname"]
        application_urls = dict(application_urls or {})
        unknown = sorted(set(application_urls) - set(self.applications))
        if unknown:
            raise UsageError(f"database URLs given for unknown applications {unknown}; applications are "
                             f"{', '.join(self.applications)}")
        self._urls: dict[str, str] = {}
        for app in self.applications:
            app_url = self.normalise(application_urls.get(app, url))
            own = self._parse(app_url, f"the database URL of application {app!r}")
            if (own["host"], own["port"], own["dbname"]) != (self.host, self.port, self.dbname):
                raise UsageError(f"the database URL of application {app!r} ({_redact(app_url)}) names another server "
                                 f"or database than --db-url ({_redact(self._url)}); every application must use the "
                                 "same server and database")
            self._urls[app] = app_url
            self.accounts[app] = Account(app, own["user"], own["password"])

    def _parse(self, url: str, what: str) -> dict[str, Any]:
        parts = urllib.parse.urlsplit(url)
        if not parts.scheme.split("+")[0] in self.schemes:
            raise UsageError(f"{what}: {_redact(url)!r} is not a {self.label} URL; use "
                             f"{self.schemes[0]}://user:pw@host:port/db")
        try:
            port = parts.port or self.default_port
        except ValueError:
            raise UsageError(f"{what}: {_redact(url)!r} has a bad port; use a number from 1 to 65535") from None
        user = urllib.parse.unquote(parts.username or "")
        return {"host": parts.hostname or "localhost", "port": port, "user": user,
                "password": urllib.parse.unquote(parts.password or ""),
                "dbname": urllib.parse.unquote(parts.path.lstrip("/")) or self.default_dbname(user)}

    @staticmethod
    def normalise(url: str) -> str:
        """The URL as handlers get it."""
        return url

    @staticmethod
    def default_dbname(user: str) -> str:
        """The database a URL without one means."""
        return ""

    def url_for(self, application: str | None = None) -> str:
        self.account(application)  # a clear error for an unknown application
        return self._urls[application or self.applications[0]]

    def _start(self) -> None:
        try:
            with self.admin_connect() as conn:
                self.max_connections, self.version = self.engine_impl.facts(conn)
        except self.engine_impl.errors as exc:
            text = str(exc).strip()
            reason = text.splitlines()[-1] if text else type(exc).__name__
            raise UsageError(f"--db-url: cannot connect to {_redact(self._url)} ({reason}); "
                             "check the host, port and credentials, or drop --provider external") from None

    def _stop(self) -> None:
        pass

    def admin_connect(self) -> Any:
        """A connection as the URL's user (the sampler's), with deadlines on connecting and reading."""
        account = self.account()
        return self.engine_impl.connect(host=self.host, port=self.port, user=account.user,
                                        password=account.password, dbname=self.dbname,
                                        application_name="lambdaemu-sampler")

    def connections(self, conn: Any) -> list[ConnectionRow]:
        return self.engine_impl.connections(conn)

    def counters(self, conn: Any) -> ServerCounters:
        return self.engine_impl.counters(conn, None)  # the server's log is not ours to read


class ExternalPostgres(External):
    """A PostgreSQL server the user runs (`--db-url postgresql://...`)."""

    engine = "postgres"
    label = "PostgreSQL"
    schemes = ("postgresql", "postgres")
    default_port = 5432

    def __init__(self, url: str, **kwargs: Any) -> None:
        from .postgres import PostgresEngine

        self.engine_impl = PostgresEngine()
        super().__init__(url, **kwargs)

    @staticmethod
    def normalise(url: str) -> str:
        """Accept SQLAlchemy-style URLs (postgresql+psycopg://) too; libpq wants postgresql://."""
        scheme, sep, rest = url.partition("://")
        return ("postgresql" + sep + rest) if scheme.startswith("postgres") else url

    @staticmethod
    def default_dbname(user: str) -> str:
        return user  # libpq's default


class ExternalMySQL(External):
    """A MySQL/MariaDB server the user runs (`--db-url mysql://...`)."""

    engine = "mysql"
    label = "MySQL"
    schemes = ("mysql", "mariadb")
    default_port = 3306

    def __init__(self, url: str, **kwargs: Any) -> None:
        from .mysql import MySQLEngine

        self.engine_impl = MySQLEngine(flavour="MySQL")
        super().__init__(url, **kwargs)

    def threads_connected(self, conn: Any) -> int:
        """`Threads_connected` as the server reports it."""
        from .mysql import mysql_threads_connected

        return mysql_threads_connected(conn)
