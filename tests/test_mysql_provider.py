"""The MySQL provider against a real server (MariaDB on Debian): lifecycle, the connection limit the
application user runs into while the sampler's admin account still gets in, connection states, the
idle timeout, the external provider, and the RDS max_connections formula for MySQL."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pymysql
import pytest

from conftest import new_run_id, processes_under
from emulator.databases.base import free_port
from emulator.databases.instances import max_connections_for
from emulator.databases.external import ExternalMySQL
from emulator.databases.mysql import ADMIN_USER, MySQLServer
from emulator.errors import UsageError


def app_connect(db: MySQLServer, **kwargs) -> pymysql.connections.Connection:
    return pymysql.connect(host=db.host, port=db.port, user=db.user, password=db.password, database=db.dbname,
                           connect_timeout=5, **kwargs)


def client_port(conn: pymysql.connections.Connection) -> int:
    """The connection's client port as the server sees it."""
    with conn.cursor() as cur:
        cur.execute("SELECT HOST FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID()")
        return int(cur.fetchone()[0].rpartition(":")[2])


@pytest.fixture(scope="module")
def mysql10():
    """A server with max_connections=10 (MariaDB's smallest accepted value)."""
    with MySQLServer(run_id=new_run_id(), max_connections=10) as db:
        yield db


def test_start_ready_stop_leaves_nothing():
    db = MySQLServer(run_id=new_run_id())
    db.start()
    workdir = db.workdir
    assert workdir is not None and workdir.is_dir()
    assert processes_under(workdir), "no server process names the work directory"
    assert db.engine == "mysql" and db.provider == "native"
    assert db.max_connections == 151  # the engine's own default
    assert db.url == f"mysql://app:{db.password}@127.0.0.1:{db.port}/app"
    assert db.handler_env()["DB_PORT"] == str(db.port)
    with app_connect(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT DATABASE(), CURRENT_USER()")
        assert cur.fetchone() == ("app", "app@127.0.0.1")
    assert "password" not in str(db.describe()).lower()

    db.stop()
    db.stop()  # idempotent
    assert not processes_under(workdir)
    assert not workdir.exists()


def test_app_user_gets_1040_while_admin_still_connects(mysql10):
    db = mysql10
    admin = db.admin_connect()  # on the extra port: takes none of the 10 slots
    apps: list[pymysql.connections.Connection] = []
    try:
        with pytest.raises(pymysql.err.OperationalError) as refused:
            for _ in range(50):
                apps.append(app_connect(db))
        assert refused.value.args[0] == 1040 and "Too many connections" in refused.value.args[1]
        assert len(apps) == 10, "the app user should get exactly max_connections connections"

        # The sampler's connection still works and sees all ten.
        ports = {client_port(c) for c in apps}
        assert ports <= {row.client_port for row in db.connections(admin)}
        assert db.threads_connected(admin) == 10  # extra-port sessions are not counted

        # On the main port the admin gets the one connection MariaDB reserves for SUPER holders...
        def admin_on_main_port():
            return pymysql.connect(host=db.host, port=db.port, user=ADMIN_USER, password=db.admin_password,
                                   connect_timeout=5)

        reserved = admin_on_main_port()
        try:
            with reserved.cursor() as cur:
                cur.execute("SELECT 1")
            # ...and only one.
            with pytest.raises(pymysql.err.OperationalError) as second:
                admin_on_main_port().close()
            assert second.value.args[0] == 1040
        finally:
            reserved.close()

        # Like an RDS application user, `app` holds neither SUPER nor CONNECTION ADMIN.
        with admin.cursor() as cur:
            cur.execute("SELECT PRIVILEGE_TYPE FROM information_schema.USER_PRIVILEGES "
                        "WHERE GRANTEE LIKE %s", ("'app'@%",))
            assert {row[0] for row in cur.fetchall()} == {"USAGE"}
    finally:
        for conn in apps:
            conn.close()
        admin.close()


def test_connections_reports_states(mysql10):
    db = mysql10
    with app_connect(db, autocommit=True) as setup, setup.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS states (id INT PRIMARY KEY) ENGINE=InnoDB")
    idle, in_trx, active = app_connect(db), app_connect(db), app_connect(db)
    admin = db.admin_connect()
    ports = {"idle": client_port(idle), "idle_in_transaction": client_port(in_trx), "active": client_port(active)}
    try:
        with in_trx.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("SELECT COUNT(*) FROM states")  # InnoDB opens the transaction at first table access

        def sleep():
            with active.cursor() as cur:
                cur.execute("SELECT SLEEP(3)")

        sleeper = threading.Thread(target=sleep)
        sleeper.start()
        deadline = time.monotonic() + 2
        while True:
            seen = {row.client_port: row.state for row in db.connections(admin)}
            if seen.get(ports["active"]) == "active" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert {state: seen.get(port) for state, port in ports.items()} == {
            "idle": "idle", "idle_in_transaction": "idle_in_transaction", "active": "active"}
        assert client_port(admin) not in seen  # the sampler's own session is excluded
        sleeper.join()
    finally:
        for conn in (idle, in_trx, active, admin):
            conn.close()


def test_idle_timeout_closes_abandoned_connections():
    with MySQLServer(run_id=new_run_id(), max_connections=10, idle_timeout_s=1) as db:
        abandoned = app_connect(db)
        port = client_port(abandoned)
        admin = db.admin_connect()
        try:
            deadline = time.monotonic() + 5
            while port in {row.client_port for row in db.connections(admin)}:
                assert time.monotonic() < deadline, "wait_timeout did not close the idle connection"
                time.sleep(0.2)
            with pytest.raises(pymysql.err.OperationalError):
                with abandoned.cursor() as cur:
                    cur.execute("SELECT 1")
        finally:
            admin.close()


@pytest.mark.parametrize("value", [5, 9, 100_001, 200_000])
def test_max_connections_outside_mariadbs_range_is_refused_before_anything_starts(server_tmpdir, monkeypatch, value):
    monkeypatch.setenv("TMPDIR", str(server_tmpdir))
    with pytest.raises(UsageError) as err:
        MySQLServer(run_id=new_run_id(), max_connections=value)
    assert str(err.value) == (f"--max-connections {value}: MariaDB accepts 10 to 100000 (the server would silently "
                              "use the nearest of those instead); choose a value in that range")
    assert list(server_tmpdir.iterdir()) == []  # no work directory, no server


def test_max_connections_beyond_the_open_files_limit_is_refused_before_starting(server_tmpdir):
    # With an open-files limit of 2000, MariaDB would lower 1990 to fewer connections (measured: 946).
    # The limit is lowered in a child process: this one keeps its own.
    code = textwrap.dedent("""
        import resource
        from emulator.databases.mysql import MySQLServer
        from emulator.errors import UsageError
        resource.setrlimit(resource.RLIMIT_NOFILE, (2000, 2000))
        try:
            MySQLServer(run_id="open-files", max_connections=1990).start()
        except UsageError as exc:
            print(exc)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "TMPDIR": str(server_tmpdir)})
    assert result.stdout.startswith("--max-connections 1990: this machine's open-files limit (2000) lets MariaDB "
                                    "keep at most about 900 connections"), result.stdout + result.stderr
    assert list(server_tmpdir.iterdir()) == []


def test_external_mysql_attaches_without_starting_anything(mysql10):
    external = ExternalMySQL(mysql10.url).start()
    assert external.max_connections == 10
    assert "MariaDB" in external.version
    assert external.url == mysql10.url
    external.stop()
    with app_connect(mysql10) as conn:  # the server is still there
        conn.ping()


def test_external_mysql_unreachable_names_db_url_without_the_password():
    url = f"mysql://app:sekrit@127.0.0.1:{free_port()}/app"
    with pytest.raises(UsageError) as err:
        ExternalMySQL(url).start()
    message = str(err.value)
    assert message.startswith("--db-url: cannot connect to mysql://app:****@127.0.0.1")
    assert "sekrit" not in message


def test_external_mysql_rejects_other_urls():
    with pytest.raises(UsageError, match="--db-url.*not a MySQL URL"):
        ExternalMySQL("postgresql://a:b@localhost/db")


@pytest.mark.parametrize("instance, expected", [
    ("db.t3.micro", 66),     # reported for 1 GiB classes (db.t2.micro): 66
    ("db.t3.small", 149),    # db.t2.small: 150
    ("db.t4g.medium", 317),  # db.t2.medium: 312
    ("db.m5.large", 651),    # db.t2.large / db.m4.large: 648
    ("db.r6g.large", 1320),  # db.m4.xlarge (16 GiB): 1320
])
def test_rds_mysql_max_connections(instance, expected):
    assert max_connections_for(instance, "mysql") == expected


def test_unknown_instance_class_is_a_usage_error():
    with pytest.raises(UsageError) as err:
        max_connections_for("db.t3.gigantic", "mysql")
    message = str(err.value)
    assert message.startswith("--db-instance 'db.t3.gigantic':")
    assert "db.t3.micro" in message and "\n" not in message
