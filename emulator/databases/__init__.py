"""Database providers, one per file: PostgreSQL (`postgres.py`: embedded, native, external), MySQL and
MariaDB (`mysql.py`: native, external), PgBouncer as the RDS Proxy stand-in (`pgbouncer.py`), and the
RDS instance presets (`instances.py`).

`create(config, run_id)` picks the provider for a validated `RunConfig` without starting anything (it
raises UsageError when the provider cannot exist on this machine); `Database.start()` starts it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ConnectionRow, Database, ProxyStats

if TYPE_CHECKING:
    from ..config import RunConfig

__all__ = ["ConnectionRow", "Database", "ProxyStats", "create", "database_view"]


def create(config: "RunConfig", run_id: str) -> Database:
    """The provider for `config` (not started), with the proxy in front when one is asked for."""
    from .instances import max_connections_for
    from .mysql import ExternalMySQL, MySQLServer
    from .pgbouncer import PgBouncer
    from .postgres import ExternalPostgres, PostgresServer

    assert config.engine is not None
    max_connections = config.max_connections
    if config.db_instance is not None:
        max_connections = max_connections_for(config.db_instance, config.engine)
    db: Database
    if config.provider == "external":
        assert config.db_url
        db = ExternalMySQL(config.db_url) if config.engine == "mysql" else ExternalPostgres(config.db_url)
    elif config.engine == "mysql":
        db = MySQLServer(run_id=run_id, max_connections=max_connections, idle_timeout_s=config.db_idle_timeout_s)
    else:
        db = PostgresServer(provider=config.provider or "embedded", run_id=run_id, max_connections=max_connections,
                            idle_session_timeout_s=config.db_idle_timeout_s)
    if config.proxy == "pgbouncer":
        db = PgBouncer(db, run_id, max_connections_percent=config.proxy_max_connections_percent,
                       max_idle_connections_percent=config.proxy_max_idle_percent,
                       connection_borrow_timeout_s=config.proxy_borrow_timeout_s,
                       idle_client_timeout_s=config.proxy_idle_client_timeout_s, owns_backend=True)
    return db


def database_view(db: Database) -> Database:
    """The provider whose server the sampler queries: the backend behind a proxy, else `db` itself."""
    return getattr(db, "backend", db)
