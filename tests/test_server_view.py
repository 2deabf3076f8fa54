"""What the server side says, on real servers: one database user per application, connection attempts
kept apart from sessions, and the cumulative counters of sessions opened and connections refused."""

from __future__ import annotations

import socket
import struct
import time

import psycopg
import pymysql
import pytest

from conftest import new_run_id
from emulator.databases.base import free_port
from emulator.databases.external import ExternalMySQL, ExternalPostgres
from emulator.databases.mysql import MySQLEngine, MySQLServer
from emulator.databases.pgbouncer import PgBouncer
from emulator.databases.postgres import PostgresEngine, PostgresServer
from emulator.errors import UsageError

APPS = ("orders-api", "billing", "reporting_service")


def pg_connect(db, application=None, **kwargs):
    return psycopg.connect(db.url_for(application), connect_timeout=5, **kwargs)


def my_connect(db, application=None):
    account = db.account(application)
    return pymysql.connect(host=db.host, port=db.port, user=account.user, password=account.password,
                           database=db.dbname, connect_timeout=5)


def wait_for(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pg_apps():
    with PostgresServer(provider="native", run_id=new_run_id(), max_connections=12, applications=APPS) as db:
        yield db


@pytest.fixture(scope="module")
def mysql_apps():
    with MySQLServer(run_id=new_run_id(), max_connections=10, applications=APPS) as db:
        yield db


# --- one user per application ----------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["postgres", "mysql"])
def test_every_application_connects_as_its_own_user(request, engine):
    db = request.getfixturevalue("pg_apps" if engine == "postgres" else "mysql_apps")
    assert set(db.accounts) == set(APPS)
    passwords = {db.account(app).password for app in APPS}
    assert len(passwords) == len(APPS)  # a random password each
    connect = pg_connect if engine == "postgres" else my_connect
    conns = {app: connect(db, app) for app in APPS}
    try:
        for app, conn in conns.items():
            env = db.handler_env(app)
            assert env["DB_USER"] == app and env["DB_PASSWORD"] == db.account(app).password
            assert env["DATABASE_URL"] == db.url_for(app) and f"//{app}:" in env["DATABASE_URL"]
            if engine == "postgres":
                assert env["PGUSER"] == app
        with db.admin_connect() as admin:
            rows = [r for r in db.connections(admin) if r.user in APPS]
            assert sorted(r.user for r in rows) == sorted(APPS)
        # The default application is the first one.
        assert db.handler_env()["DB_USER"] == APPS[0] and db.user == APPS[0]
        with pytest.raises(UsageError, match=r"^application 'nobody' has no database user"):
            db.handler_env("nobody")
        assert "password" not in str(db.describe()).lower()
        assert db.describe()["users"] == {app: app for app in APPS}
    finally:
        for conn in conns.values():
            conn.close()


def test_applications_share_the_database_and_can_use_it(pg_apps):
    with pg_connect(pg_apps, "billing", autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS billing")
        conn.execute("CREATE TABLE IF NOT EXISTS billing.t (id int)")
        assert conn.execute("SELECT current_database(), current_user").fetchone() == ("app", "billing")


@pytest.mark.parametrize("engine, application, message", [
    (PostgresEngine, "x" * 64, r"^application 'x{64}': 64 characters, but PostgreSQL user names are at most 63 "
                               r"\(NAMEDATALEN - 1 bytes\); rename the application to 63 characters or fewer$"),
    (PostgresEngine, "pg_reader", r"^application 'pg_reader': PostgreSQL reserves role names starting with pg_"),
    (PostgresEngine, "lambdaemu_admin", r"^application 'lambdaemu_admin': 'lambdaemu_admin' is a user lambdaemu"),
    (PostgresEngine, "orders api", r"^application 'orders api': .* only letters, digits, '-' and '_'"),
    (PostgresEngine, "o'brien", r"^application \"o'brien\": .* only letters, digits"),
    (lambda: MySQLEngine(flavour="MariaDB"), "y" * 81, r"^application 'y{81}': 81 characters, but MariaDB user "
                                                       r"names are at most 80 \(the limit every MariaDB version"),
    (lambda: MySQLEngine(flavour="MySQL"), "z" * 33, r"^application 'z{33}': 33 characters, but MySQL user names "
                                                     r"are at most 32 \(MySQL's user name length\)"),
    (lambda: MySQLEngine(flavour="MariaDB"), "root", r"^application 'root': 'root' is a user"),
])
def test_user_names_the_engine_cannot_create_are_refused_before_anything_starts(engine, application, message):
    with pytest.raises(UsageError, match=message):
        engine().user_name(application)


def test_user_name_limits_are_the_servers_own(server_tmpdir, monkeypatch):
    # The longest names lambdaemu accepts work on a real server. PostgreSQL would truncate a longer one
    # (and so could merge two applications); MariaDB 10.11 would take up to 128, lambdaemu keeps to the 80
    # every version takes.
    monkeypatch.setenv("TMPDIR", str(server_tmpdir))
    with PostgresServer(provider="native", run_id=new_run_id(), max_connections=10,
                        applications=("p" * 63,)) as db, pg_connect(db) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == "p" * 63
    with MySQLServer(run_id=new_run_id(), applications=("m" * 80,)) as db, my_connect(db) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT CURRENT_USER()")
            assert cur.fetchone()[0] == "m" * 80 + "@127.0.0.1"
    with pytest.raises(UsageError, match="at most 80"):
        MySQLServer(run_id=new_run_id(), applications=("m" * 81,))
    assert list(server_tmpdir.iterdir()) == []


def test_external_applications_use_the_urls_users(pg_apps):
    other = pg_apps.url_for("billing")
    db = ExternalPostgres(pg_apps.url, applications=("a", "b"), application_urls={"b": other}).start()
    assert db.account("a").user == APPS[0] and db.account("b").user == "billing"
    assert db.handler_env("b")["DATABASE_URL"] == other
    with pytest.raises(UsageError, match=r"^the database URL of application 'b' .* names another server"):
        ExternalPostgres(pg_apps.url, applications=("a", "b"),
                         application_urls={"b": other.replace(str(pg_apps.port), str(free_port()))})
    with pytest.raises(UsageError, match=r"unknown applications \['c'\]"):
        ExternalPostgres(pg_apps.url, applications=("a",), application_urls={"c": other})
    assert "****" in str(pytest.raises(UsageError, ExternalMySQL, "postgresql://u:secret@h/db").value)


# --- attempts apart from sessions ----------------------------------------------------------------------


def _pg_startup(port: int, user: str) -> socket.socket:
    """A client that sends PostgreSQL's startup packet, reads the authentication request and says no more."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    body = struct.pack("!I", 196608) + f"user\0{user}\0database\0app\0\0".encode()
    sock.sendall(struct.pack("!I", len(body) + 4) + body)
    assert sock.recv(1) == b"R"  # an authentication request: the backend is authenticating us
    return sock


def test_postgres_attempt_still_authenticating_is_connecting_not_a_session():
    # PostgreSQL 18 (the embedded wheel) lists a backend in authentication with state 'starting'.
    with PostgresServer(provider="embedded", run_id=new_run_id(), max_connections=10) as db, \
            db.admin_connect() as admin:
        sock = _pg_startup(db.port, "app")
        try:
            rows = wait_for(lambda: [r for r in db.connections(admin) if r.state == "connecting"])
            assert len(rows) == 1 and rows[0].user == "" and not rows[0].established
            assert rows[0].client_port == sock.getsockname()[1]
        finally:
            sock.close()


def test_mariadb_attempts_are_connecting_not_sessions(mysql_apps):
    db = mysql_apps
    with db.admin_connect() as admin:
        stalled = socket.create_connection(("127.0.0.1", db.port), timeout=5)
        try:
            stalled.recv(100)  # the server's greeting; the handshake is never answered
            rows = wait_for(lambda: [r for r in db.connections(admin) if r.client_port == stalled.getsockname()[1]])
            assert rows and rows[0].state == "connecting" and rows[0].user == ""
        finally:
            stalled.close()


# --- counters ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["postgres", "mysql"])
def test_sessions_opened_counts_each_new_session_exactly(request, engine):
    db = request.getfixturevalue("pg_apps" if engine == "postgres" else "mysql_apps")
    connect = pg_connect if engine == "postgres" else my_connect
    with db.admin_connect() as admin:
        before = db.counters(admin)
        for app in APPS:
            connect(db, app).close()
        connect(db).close()
        after = db.counters(admin)
    assert after.sessions_opened - before.sessions_opened == 4
    assert after.refused == before.refused


@pytest.mark.parametrize("engine", ["postgres", "postgres-embedded", "mysql"])
def test_refused_counts_connections_beyond_the_limit(engine, server_tmpdir, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(server_tmpdir))
    if engine.startswith("postgres"):
        # 12 allowed, 3 kept for superusers. PostgreSQL 15 (native) and 18 (embedded) word the refusal
        # differently; both are counted from the log.
        provider = "embedded" if engine.endswith("embedded") else "native"
        db, connect, error = PostgresServer(provider=provider, run_id=new_run_id(), max_connections=12), \
            pg_connect, psycopg.OperationalError
    else:
        db, connect, error = MySQLServer(run_id=new_run_id(), max_connections=10), my_connect, \
            pymysql.err.OperationalError
    with db, db.admin_connect() as admin:
        before = db.counters(admin)
        held, refused = [], 0
        try:
            for _ in range(15):
                try:
                    held.append(connect(db))
                except error as exc:
                    assert "too many" in str(exc).lower() or "reserved" in str(exc).lower()
                    refused += 1
            assert refused == 15 - len(held) > 0
            after = wait_for(lambda: (c := db.counters(admin)).refused - before.refused == refused and c)
            assert after, db.counters(admin)
            assert after.sessions_opened - before.sessions_opened == len(held)
        finally:
            for conn in held:
                conn.close()


def test_pgbouncer_counts_its_own_refusals(pg_apps):
    with PgBouncer(pg_apps, new_run_id(), max_client_conn=3) as bouncer:
        held = [psycopg.connect(bouncer.url, connect_timeout=5, prepare_threshold=None) for _ in range(3)]
        try:
            assert bouncer.proxy_counters().refused == 0
            for _ in range(2):
                with pytest.raises(psycopg.OperationalError, match="no more connections allowed"):
                    psycopg.connect(bouncer.url, connect_timeout=5)
            assert wait_for(lambda: bouncer.proxy_counters().refused == 2), bouncer.proxy_counters()
            assert bouncer.proxy_counters().sessions_opened is None
        finally:
            for conn in held:
                conn.close()
        # Every application reaches the backend through PgBouncer as its own user.
        for app in APPS:
            with psycopg.connect(bouncer.url_for(app), connect_timeout=5, prepare_threshold=None) as conn:
                assert conn.execute("SELECT current_user").fetchone()[0] == app
