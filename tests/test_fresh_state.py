"""A server several runs share (a sweep's, the pytest plugin's) is brought back to a fresh state between
runs: every session of the applications' users is ended, on each engine and through the proxy."""

from __future__ import annotations

import contextlib

import psycopg
import pymysql
import pytest

from conftest import new_run_id
from emulator.databases.external import ExternalPostgres
from emulator.databases.mysql import MySQLServer
from emulator.databases.pgbouncer import PgBouncer
from emulator.databases.postgres import PostgresServer
from emulator.errors import UsageError


def connect(db, application: str):
    """A connection as `application`'s user, with a query run on it (so a proxy holds a server connection)."""
    if db.engine == "mysql":
        account = db.account(application)
        conn = pymysql.connect(host=db.host, port=db.port, user=account.user, password=account.password,
                               database=db.dbname, connect_timeout=5, autocommit=True)
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        return conn
    conn = psycopg.connect(db.url_for(application), connect_timeout=5, autocommit=True, prepare_threshold=None)
    conn.execute("SELECT 1")
    return conn


def application_sessions(db) -> int:
    server = getattr(db, "backend", db)
    with server.admin_connect() as conn:
        return sum(1 for row in server.connections(conn) if row.user in ("orders", "billing"))


@pytest.mark.parametrize("kind", ["postgres", "mysql", "pgbouncer"])
def test_clear_sessions_ends_every_application_session(kind):
    with contextlib.ExitStack() as stack:
        if kind == "mysql":
            db = stack.enter_context(MySQLServer(run_id=new_run_id(), applications=("orders", "billing")))
        else:
            db = stack.enter_context(PostgresServer(provider="embedded", run_id=new_run_id(), max_connections=20,
                                                    applications=("orders", "billing")))
            if kind == "pgbouncer":
                db = stack.enter_context(PgBouncer(db, new_run_id(), max_idle_connections_percent=0))
        held = [connect(db, app) for app in ("orders", "orders", "billing")]
        if kind == "pgbouncer":
            # Transaction pooling: the two idle clients of one user share a server connection.
            assert db.stats().client_connections == 3 and application_sessions(db) == 2
        else:
            assert application_sessions(db) == 3
        db.clear_sessions()
        assert application_sessions(db) == 0
        if kind == "pgbouncer":
            assert db.stats().client_connections == 0
        for conn in held:
            with contextlib.suppress(Exception):
                conn.close()
        # The server (and the proxy) take new sessions at once: the next run starts here.
        with contextlib.closing(connect(db, "billing")):
            assert application_sessions(db) == 1


def test_a_server_lambdaemu_did_not_start_is_not_cleared():
    db = ExternalPostgres("postgresql://app:pw@127.0.0.1:1/app")
    with pytest.raises(UsageError, match="does not end sessions on a server it did not start"):
        db.clear_sessions()
