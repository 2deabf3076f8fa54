"""Settings every workload reads from its environment (set by lambdaemu from the run's flags, or by
hand when a handler runs elsewhere). Only the standard library and SQLAlchemy's URL helper are used."""

from __future__ import annotations

import os


def env_float(name: str, default: float) -> float:
    """A float setting, or `default` when the variable is unset or empty."""
    value = os.environ.get(name, "")
    return float(value) if value.strip() else default


def env_int(name: str, default: int) -> int:
    """An integer setting, or `default` when the variable is unset or empty."""
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def engine_name() -> str:
    """`postgres` or `mysql`, from DB_ENGINE or the scheme of DATABASE_URL."""
    engine = os.environ.get("DB_ENGINE")
    if engine:
        return engine
    return "mysql" if os.environ["DATABASE_URL"].startswith("mysql") else "postgres"


def sqlalchemy_url() -> str:
    """DATABASE_URL with the driver SQLAlchemy should use (psycopg 3 for PostgreSQL, PyMySQL for MySQL)."""
    from sqlalchemy.engine import make_url

    url = make_url(os.environ["DATABASE_URL"])
    driver = "mysql+pymysql" if url.get_backend_name() == "mysql" else "postgresql+psycopg"
    return url.set(drivername=driver).render_as_string(hide_password=False)


def sleep_sql() -> str:
    """A statement that keeps the connection busy for :seconds on the server, in this engine's dialect."""
    return "SELECT SLEEP(%(seconds)s)" if engine_name() == "mysql" else "SELECT pg_sleep(%(seconds)s)"

