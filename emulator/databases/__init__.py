"""Database providers, one per file: PostgreSQL (`postgres.py`: embedded, native, external).

`create(config, run_id)` picks the provider for a validated `RunConfig` without starting anything;
`Database.start()` starts it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ConnectionRow, Database, ProxyStats

if TYPE_CHECKING:
    from ..config import RunConfig

__all__ = ["ConnectionRow", "Database", "ProxyStats", "create"]


def create(config: "RunConfig", run_id: str) -> Database:
    """The provider for `config` (not started). Raises UsageError if it cannot exist on this machine."""
    from .postgres import ExternalPostgres, PostgresServer

    if config.provider == "external":
        assert config.db_url
        return ExternalPostgres(config.db_url)
    return PostgresServer(provider=config.provider, run_id=run_id, max_connections=config.max_connections,
                          idle_session_timeout_s=config.db_idle_timeout_s)
