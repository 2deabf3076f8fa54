"""PgBouncer as the RDS Proxy stand-in, in front of a real PostgreSQL: lifecycle, the server-connection
cap (MaxConnectionsPercent) under many concurrent clients, the borrow timeout, the idle-connection
approximation, the console statistics, and the RDS max_connections formula for PostgreSQL."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import psycopg
import pytest

from conftest import new_run_id, processes_under
from emulator.databases.instances import max_connections_for
from emulator.databases.external import ExternalMySQL
from emulator.databases.pgbouncer import PgBouncer
from emulator.databases.postgres import PostgresServer
from emulator.errors import UsageError, classify, exception_type_names

BACKEND_MAX_CONNECTIONS = 20


def connect(bouncer: PgBouncer) -> psycopg.Connection:
    # Transaction pooling: no server-side prepared statements (PgBouncer 1.18 cannot route them).
    return psycopg.connect(bouncer.url, connect_timeout=5, prepare_threshold=None)


def local_port(conn: psycopg.Connection) -> int:
    sock = socket.socket(fileno=conn.pgconn.socket).dup()
    try:
        return sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture(scope="module")
def backend():
    with PostgresServer(provider="native", run_id=new_run_id(), max_connections=BACKEND_MAX_CONNECTIONS) as db:
        yield db


def backend_app_connections(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'").fetchone()[0]


def test_start_ready_stop_leaves_nothing(backend):
    bouncer = PgBouncer(backend, new_run_id())
    bouncer.start()
    workdir = bouncer.workdir
    assert workdir is not None and processes_under(workdir)
    assert bouncer.engine == "postgres"
    assert bouncer.port != backend.port and bouncer.max_connections == BACKEND_MAX_CONNECTIONS
    assert bouncer.url == f"postgresql://app:{backend.password}@127.0.0.1:{bouncer.port}/app"
    env = bouncer.handler_env()
    assert env["PGPORT"] == env["DB_PORT"] == str(bouncer.port)
    with connect(bouncer) as conn:  # through PgBouncer to the backend
        assert conn.execute("SELECT inet_server_port()").fetchone()[0] == backend.port
    settings = bouncer.describe()["proxy"]["settings"]
    assert settings["max_db_connections"] == {"value": 20, "from": "MaxConnectionsPercent"}
    assert settings["query_wait_timeout"] == {"value": 120.0, "from": "ConnectionBorrowTimeout"}
    assert settings["client_idle_timeout"] == {"value": 1800.0, "from": "IdleClientTimeout"}
    assert settings["min_pool_size"]["value"] == 10  # MaxIdleConnectionsPercent defaults to half of 100
    assert settings["pool_mode"]["value"] == "transaction"

    bouncer.stop()
    bouncer.stop()  # idempotent
    assert not processes_under(workdir)
    assert not workdir.exists()
    with backend.admin_connect() as conn:  # the backend is the caller's: still running
        conn.execute("SELECT 1")


def test_server_connections_stay_under_max_connections_percent(backend):
    clients = 30
    with PgBouncer(backend, new_run_id(), max_connections_percent=50) as bouncer:
        cap = BACKEND_MAX_CONNECTIONS * 50 // 100
        all_connected = threading.Barrier(clients + 1, timeout=20)
        release = threading.Event()
        failures: list[BaseException] = []

        def client():
            try:
                with connect(bouncer) as conn:
                    all_connected.wait()
                    with conn.transaction():
                        conn.execute("SELECT pg_sleep(0.3)")
                    release.wait(20)  # stay connected: the clients outnumber the servers throughout
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                failures.append(exc)
                all_connected.abort()

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        peak_backend = peak_servers = peak_clients = peak_waiting = 0
        with backend.admin_connect() as server_view, bouncer.admin_connect() as console:
            all_connected.wait()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                stats = bouncer.stats(console)
                peak_backend = max(peak_backend, backend_app_connections(server_view))
                peak_servers = max(peak_servers, stats.server_connections)
                peak_clients = max(peak_clients, stats.client_connections)
                peak_waiting = max(peak_waiting, stats.waiting_clients)
                if stats.client_connections == clients and stats.waiting_clients == 0 and peak_waiting:
                    break  # every transaction has been served
                time.sleep(0.03)
            release.set()
        for thread in threads:
            thread.join(20)
        assert not failures, failures[:3]
        assert peak_clients == clients
        assert peak_waiting > 0, "clients never queued: the cap was not exercised"
        assert peak_servers <= cap and peak_backend <= cap, (peak_servers, peak_backend)
        assert peak_servers == cap  # the pool grew to the cap, and no further


def test_borrow_timeout_surfaces_as_query_wait_timeout(backend):
    # 5 % of 20 = one server connection; ConnectionBorrowTimeout 1 s.
    with PgBouncer(backend, new_run_id(), max_connections_percent=5, connection_borrow_timeout_s=1) as bouncer:
        with connect(bouncer) as holder:
            holder.execute("BEGIN")
            holder.execute("SELECT 1")  # holds the only server connection until COMMIT
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError) as err:
                with connect(bouncer) as waiter:
                    waiter.execute("SELECT 1")
            waited = time.monotonic() - started
            holder.execute("COMMIT")
        assert "query_wait_timeout" in str(err.value)
        assert 1 <= waited < 5
        assert classify(exception_type_names(err.value), str(err.value)) == "proxy_wait_timeout"


def test_idle_server_connections_shrink_to_min_pool_size(backend):
    # MaxIdleConnectionsPercent 10 % of 20 → min_pool_size 2; idle servers above it close after 1 s.
    with PgBouncer(backend, new_run_id(), max_connections_percent=50, max_idle_connections_percent=10,
                   server_idle_timeout_s=1) as bouncer:
        conns = [connect(bouncer) for _ in range(8)]
        try:
            for conn in conns:  # eight open transactions hold eight server connections
                conn.execute("BEGIN")
                conn.execute("SELECT 1")
            assert bouncer.stats().server_connections == 8
            for conn in conns:
                conn.execute("COMMIT")
            deadline = time.monotonic() + 6
            while (servers := bouncer.stats().server_connections) > 2:
                assert time.monotonic() < deadline, f"still {servers} server connections"
                time.sleep(0.1)
            time.sleep(1.5)  # and it does not go below min_pool_size
            assert bouncer.stats().server_connections == 2
        finally:
            for conn in conns:
                conn.close()


def test_users_share_the_idle_allowance_and_log_in_with_scram_secrets():
    apps = ("orders", "billing", "reports", "backend")
    with PostgresServer(provider="native", run_id=new_run_id(), max_connections=BACKEND_MAX_CONNECTIONS,
                        applications=apps) as server, \
            PgBouncer(server, new_run_id(), max_idle_connections_percent=50, server_idle_timeout_s=1) as bouncer:
        # 50 % of 20 shared over four users' pools. Whole to each pool (10), two pools at their minimum
        # would hold every connection max_db_connections (20) allows and starve the other two for ever.
        assert bouncer.settings.min_pool_size == 2
        # The auth file holds the server's SCRAM secrets, never a password: PgBouncer then checks a
        # login with two HMACs instead of deriving the key (4096 PBKDF2 rounds) on its single thread.
        auth_file = (bouncer.workdir / "userlist.txt").read_text()
        for app in apps:
            account = bouncer.account(app)
            assert account.password not in auth_file
            assert f'"{account.user}" "SCRAM-SHA-256$4096:' in auth_file
        # One idle client per user (as a frozen environment holds): PgBouncer 1.18 fills the minimum of
        # a pool that has a client, by itself, logging in with the client key the client's login
        # revealed. No query waits for these connections.
        clients = [psycopg.connect(bouncer.url_for(app), connect_timeout=5, prepare_threshold=None, autocommit=True)
                   for app in apps]
        for conn in clients:
            conn.execute("SELECT 1")
        users = [bouncer.account(app).user for app in apps]
        with contextlib.ExitStack() as closing, server.admin_connect() as view:
            for conn in clients:
                closing.enter_context(conn)
            deadline = time.monotonic() + 15
            while (held := dict(view.execute(
                    "SELECT usename, count(*) FROM pg_stat_activity WHERE usename = ANY(%s) GROUP BY usename",
                    (users,)).fetchall())) != {user: 2 for user in users}:
                assert time.monotonic() < deadline, held
                time.sleep(0.1)


def test_stats_report_client_ports(backend):
    # No idle minimum, so PgBouncer opens no server connections on its own while we compare.
    with PgBouncer(backend, new_run_id(), max_idle_connections_percent=0) as bouncer:
        conns = [connect(bouncer) for _ in range(3)]
        try:
            stats = bouncer.stats()
            assert set(stats.client_ports) == {local_port(c) for c in conns}
            assert stats.client_connections == 3 and stats.waiting_clients == 0 and stats.max_wait_ms == 0
            # The sampler's database view is the backend's (sessions of proxies stopped by earlier
            # tests may take a moment to leave it).
            with backend.admin_connect() as server_view:
                deadline = time.monotonic() + 3
                while len(bouncer.connections(server_view)) != stats.server_connections:
                    assert time.monotonic() < deadline, (bouncer.connections(server_view), stats)
                    time.sleep(0.05)
        finally:
            for conn in conns:
                conn.close()


def test_proxy_settings_are_validated(backend):
    with pytest.raises(UsageError, match=r"^MaxConnectionsPercent \(max_connections_percent\) 0: expected"):
        PgBouncer(backend, new_run_id(), max_connections_percent=0)
    with pytest.raises(UsageError, match=r"^MaxIdleConnectionsPercent .* 60: expected 0 to MaxConnectionsPercent \(50\)"):
        PgBouncer(backend, new_run_id(), max_connections_percent=50, max_idle_connections_percent=60)
    with pytest.raises(UsageError, match=r"^--proxy pgbouncer: PgBouncer speaks PostgreSQL, not mysql"):
        PgBouncer(ExternalMySQL("mysql://a:b@127.0.0.1:1/x"), new_run_id())


@pytest.mark.parametrize("instance, expected", [
    ("db.t3.micro", 87),      # reported for 1 GiB classes: ~87
    ("db.t4g.small", 197),    # db.t2.small: 198
    ("db.t3.medium", 418),    # db.t2.medium: 413
    ("db.m6g.large", 860),    # db.t2.large / db.m4.large: 856
    ("db.r5.4xlarge", 5000),  # LEAST(..., 5000)
])
def test_rds_postgres_max_connections(instance, expected):
    assert max_connections_for(instance, "postgres") == expected


def test_unknown_engine_for_instance_formula_is_a_usage_error():
    with pytest.raises(UsageError, match=r"^--engine 'oracle':"):
        max_connections_for("db.t3.micro", "oracle")


def test_a_client_dropped_mid_statement_lets_the_database_hold_more_than_the_cap(backend):
    # Cap 2 (10 % of 20). Two clients each hold a server connection with a long statement; one of them is
    # killed mid-statement (as a timed-out environment is). PgBouncer drops that server connection and
    # serves the next client with a new one at once, while the old backend runs its statement to the
    # end: for that while the database holds 3 connections of the proxy's, one more than the cap.
    import subprocess
    import sys

    bouncer = PgBouncer(backend, new_run_id(), max_connections_percent=10, max_idle_connections_percent=0)
    bouncer.start()
    sleeper = ("import psycopg, sys; c = psycopg.connect(sys.argv[1], prepare_threshold=None, autocommit=True); "
               "c.execute('SELECT pg_sleep(3)')")
    clients = [subprocess.Popen([sys.executable, "-c", sleeper, bouncer.url]) for _ in range(2)]
    try:
        with backend.admin_connect() as admin:
            deadline = time.monotonic() + 10
            while backend_app_connections(admin) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert backend_app_connections(admin) == 2  # the cap is full
            clients[0].kill()  # dropped mid-statement, no goodbye
            clients[0].wait()
            with connect(bouncer) as third:
                third.execute("SELECT 1")
                held = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'").fetchone()[0]
                sleeping = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' "
                                         "AND query LIKE 'SELECT pg_sleep%' AND state = 'active'").fetchone()[0]
        assert held == 3 and sleeping == 2, (held, sleeping)
        assert bouncer.stats().server_connections == 2  # PgBouncer itself never passed its cap
    finally:
        for client in clients:
            client.kill()
            client.wait()
        bouncer.stop()
