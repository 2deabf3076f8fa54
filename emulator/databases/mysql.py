"""MySQL providers: `native` (a MariaDB or MySQL server installed on the machine, started by lambdaemu)
and `external` (a server the user runs, given by --db-url).

The started server listens on 127.0.0.1 only, on a free port, with a random password per run, and keeps
its data directory, socket and pid file in a private work directory labelled with the run id. Two
accounts exist:

- `app` (handlers): privileges on database `app` only. It lacks SUPER / CONNECTION ADMIN, like an RDS
  application user, so once `max_connections` sessions are open it gets error 1040 "Too many connections".
- `lambdaemu_admin` (the sampler): every privilege. It connects on a second, administrative port
  (MariaDB `extra_port`, MySQL `admin_port`) whose connections are counted apart from `max_connections`
  and from `Threads_connected`, so sampling never takes a slot from the application. On the main port it
  can still use the one extra connection the server reserves for SUPER / CONNECTION ADMIN holders.

Measured on MariaDB 10.11 (tests/test_mysql_provider.py): with max_connections=10 the app user gets
exactly 10 connections and then error 1040, whether or not the admin is already connected on the extra
port; the admin then still gets one connection on the main port (the reserved slot), and a second one
fails with 1040. An admin connected on the *main* port before the load takes one of the 10 slots.
MariaDB's smallest max_connections is 10 and it lowers the value when the open-files limit is too small;
`start()` refuses to run with a value other than the one asked for.

`wait_timeout` / `interactive_timeout` (from `idle_timeout_s`) is how the server closes the connections
of clients that vanished without closing them (Lambda environments reclaimed in `vanish` mode).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

from ..errors import DatabaseStartError, UsageError
from .base import (ConnectionRow, Database, chown_tree, free_port, log_tail, make_workdir, random_password,
                   remove_workdir, run_as_server_user, server_user, spawn_server, stop_process, wait_ready)

APP_USER = "app"
ADMIN_USER = "lambdaemu_admin"
APP_DB = "app"
DEFAULT_MAX_CONNECTIONS = 151  # the engine's own default (MariaDB and MySQL)
#: Connections allowed on the administrative port: the sampler, plus room for a person or a test.
ADMIN_PORT_CONNECTIONS = 5

# A throwaway server for connection experiments: small memory, no durability, few open files (so a
# modest `ulimit -n` does not make the server lower max_connections). The first two also shape the
# data directory, so initialisation gets them too (a 96 MB redo log per run otherwise).
_INIT_OPTIONS = ("--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M")
_LEAN_OPTIONS = (
    *_INIT_OPTIONS,
    "--innodb-flush-log-at-trx-commit=0",
    "--innodb-doublewrite=0",
    # io_uring/libaio contexts are a limited per-host resource; many servers per host do not need them.
    "--innodb-use-native-aio=0",
    "--performance-schema=OFF",
    "--table-open-cache=64",
    "--table-definition-cache=400",
)

_STATE_OF_COMMAND = {"Query": "active", "Execute": "active"}

# One row per client session. System threads (InnoDB workers, the event scheduler, replication) have no
# "host:port", and neither do Unix-socket sessions, which handlers never use (they reach the server over
# TCP so that the client port can name the environment). A session is inside a transaction when InnoDB
# has a transaction for it: InnoDB starts one at the first access to an InnoDB table (or at START
# TRANSACTION WITH CONSISTENT SNAPSHOT), so a bare BEGIN with no statement yet still counts as idle.
CONNECTIONS_SQL = (
    "SELECT p.COMMAND, p.HOST, t.trx_mysql_thread_id IS NOT NULL "
    "FROM information_schema.PROCESSLIST p "
    "LEFT JOIN information_schema.INNODB_TRX t ON t.trx_mysql_thread_id = p.ID "
    "WHERE p.ID <> CONNECTION_ID() AND p.HOST LIKE '%:%'"
)


def mysql_connections(conn: Any) -> list[ConnectionRow]:
    """Client sessions of a MySQL/MariaDB server as `ConnectionRow`s (shared by every MySQL provider).

    Needs the PROCESS privilege to see other users' sessions."""
    with conn.cursor() as cur:
        cur.execute(CONNECTIONS_SQL)
        rows = cur.fetchall()
    result = []
    for command, host, in_trx in rows:
        if command in _STATE_OF_COMMAND:
            state = _STATE_OF_COMMAND[command]
        elif command == "Sleep":
            state = "idle_in_transaction" if in_trx else "idle"
        else:
            state = "other"
        result.append(ConnectionRow(state, _client_port(host)))
    return result


def mysql_threads_connected(conn: Any) -> int:
    """The server's own count of open client connections (`Threads_connected`). On MariaDB, sessions on
    the extra (administrative) port are not included."""
    with conn.cursor() as cur:
        cur.execute("SHOW GLOBAL STATUS LIKE 'Threads_connected'")
        row = cur.fetchone()
    return int(row[1]) if row else 0


def _client_port(host: str | None) -> int | None:
    # PROCESSLIST.HOST is "127.0.0.1:54321" ("::1:54321" for IPv6): the port follows the last colon.
    _, sep, port = (host or "").rpartition(":")
    return int(port) if sep and port.isdigit() else None


def find_server_binary() -> Path:
    """`mariadbd` or `mysqld` from PATH or /usr/sbin, or a UsageError saying how to get one."""
    for name in ("mariadbd", "mysqld"):
        found = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
        if found:
            return Path(found)
    raise UsageError("--engine mysql --provider native: no mariadbd or mysqld found (looked in PATH and "
                     "/usr/sbin); run scripts/install-system-deps or apt-get install mariadb-server")


class MySQLServer(Database):
    """A MariaDB or MySQL server lambdaemu starts and stops (`native`)."""

    engine = "mysql"
    provider = "native"

    def __init__(self, *, run_id: str, max_connections: int | None = None, idle_timeout_s: float | None = None,
                 server_binary: Path | None = None) -> None:
        super().__init__()
        self.run_id = run_id
        self.requested_max_connections = max_connections or DEFAULT_MAX_CONNECTIONS
        self.idle_timeout_s = idle_timeout_s
        self.server_binary = server_binary or find_server_binary()
        self.user, self.dbname = APP_USER, APP_DB
        self.admin_password = ""
        #: The administrative port (MariaDB extra_port, MySQL admin_port) the sampler connects to.
        self.admin_port = 0
        self.flavour = ""  # "MariaDB" or "MySQL"
        self.workdir: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        """The server's log (stdout and stderr) in its work directory."""
        assert self.workdir is not None
        return self.workdir / "mysqld.log"

    @property
    def socket_path(self) -> Path:
        """The Unix socket, used only to create the accounts right after initialisation."""
        assert self.workdir is not None
        return self.workdir / "mysqld.sock"

    def _start(self) -> None:
        self.version = subprocess.run([str(self.server_binary), "--version"], capture_output=True,
                                      text=True).stdout.strip()
        self.flavour = "MariaDB" if "mariadb" in self.version.lower() else "MySQL"
        self.workdir = make_workdir(self.run_id, "mysql")
        datadir = self.workdir / "data"
        (self.workdir / "tmp").mkdir()
        chown_tree(self.workdir)
        self._initialise(datadir)
        for attempt in range(3):  # a free port can be taken between choosing and binding it
            self.port, self.admin_port = free_port(), free_port()
            self.proc = spawn_server(self._server_argv(datadir), self.log_path)
            try:
                wait_ready(self._check_root, what=self.flavour, timeout_s=60, retry_on=(_pymysql().err.OperationalError,),
                           proc=self.proc, log_path=self.log_path,
                           hint="see the server log above; is the data directory writable by the server user?")
                break
            except DatabaseStartError:
                stop_process(self.proc)
                if attempt == 2 or "already in use" not in log_tail(self.log_path, 20):
                    raise
        self._create_accounts()
        with self.admin_connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT @@max_connections, VERSION()")
            self.max_connections, self.version = cur.fetchone()
            self.max_connections = int(self.max_connections)
        if self.max_connections != self.requested_max_connections:
            if self.max_connections > self.requested_max_connections or self.requested_max_connections > 100_000:
                why = "the value is outside its range (MariaDB: 10 to 100000)"
            else:
                why = "its open-files limit is too small (raise ulimit -n)"
            raise UsageError(f"--max-connections {self.requested_max_connections}: {self.flavour} would run with "
                             f"{self.max_connections} because {why}; choose a value it accepts")
        # Ready means the account handlers use can run a real query over TCP.
        with _pymysql().connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                database=self.dbname, connect_timeout=5) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")

    def _initialise(self, datadir: Path) -> None:
        user = server_user()
        user_name = user.pw_name if user else pwd.getpwuid(os.geteuid()).pw_name
        if self.flavour == "MariaDB":
            install_db = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
            if install_db is None:
                raise UsageError("--engine mysql: mariadb-install-db not found next to mariadbd; "
                                 "run scripts/install-system-deps or apt-get install mariadb-server")
            # normal authentication: root@localhost gets an empty password, replaced in _create_accounts.
            argv = [install_db, "--no-defaults", "--auth-root-authentication-method=normal", "--skip-test-db",
                    f"--datadir={datadir}", f"--user={user_name}", *_INIT_OPTIONS]
        else:
            argv = [str(self.server_binary), "--no-defaults", "--initialize-insecure", f"--datadir={datadir}",
                    f"--user={user_name}", *_INIT_OPTIONS]
        run_as_server_user(argv, log_path=self.log_path, timeout=120)

    def _server_argv(self, datadir: Path) -> list[str]:
        assert self.workdir is not None
        argv = [
            str(self.server_binary), "--no-defaults",  # must come first
            f"--datadir={datadir}", f"--tmpdir={self.workdir / 'tmp'}",
            f"--socket={self.socket_path}", f"--pid-file={self.workdir / 'mysqld.pid'}",
            "--bind-address=127.0.0.1", f"--port={self.port}",
            f"--max-connections={self.requested_max_connections}",
            # Accounts are matched by address; a reverse DNS lookup per connection would only add latency.
            "--skip-name-resolve",
            *_LEAN_OPTIONS,
        ]
        if self.flavour == "MariaDB":
            argv += [f"--extra-port={self.admin_port}", f"--extra-max-connections={ADMIN_PORT_CONNECTIONS}"]
        else:
            # MySQL 8: the administrative interface; the X protocol plugin would bind 33060 for every run.
            argv += ["--admin-address=127.0.0.1", f"--admin-port={self.admin_port}", "--mysqlx=OFF", "--skip-log-bin"]
        if self.idle_timeout_s:
            seconds = max(1, round(self.idle_timeout_s))
            argv += [f"--wait-timeout={seconds}", f"--interactive-timeout={seconds}"]
        return argv

    def _check_root(self) -> None:
        with self._root_connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")

    def _root_connect(self) -> Any:
        # Right after initialisation root@localhost has no password and is reachable only through the
        # socket in the private work directory.
        return _pymysql().connect(unix_socket=str(self.socket_path), user="root", password="", connect_timeout=5,
                                  autocommit=True)

    def _create_accounts(self) -> None:
        self.admin_password = random_password()
        self.password = random_password()
        with self._root_connect() as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {APP_DB}")
            # 127.0.0.1 is where handlers connect from; localhost (the socket) serves a person debugging.
            for host in ("127.0.0.1", "localhost"):
                cur.execute(f"CREATE USER '{APP_USER}'@'{host}' IDENTIFIED BY '{self.password}'")
                # Privileges on its own database only: no SUPER / CONNECTION ADMIN, as for an RDS app user.
                cur.execute(f"GRANT ALL PRIVILEGES ON {APP_DB}.* TO '{APP_USER}'@'{host}'")
                cur.execute(f"CREATE USER '{ADMIN_USER}'@'{host}' IDENTIFIED BY '{self.admin_password}'")
                cur.execute(f"GRANT ALL PRIVILEGES ON *.* TO '{ADMIN_USER}'@'{host}' WITH GRANT OPTION")
            # Initialisation leaves password-less root accounts (127.0.0.1, ::1, the host name): drop
            # them and lock root@localhost with the admin password.
            cur.execute("SELECT User, Host FROM mysql.user WHERE User = 'root' AND Host <> 'localhost'")
            for user, host in cur.fetchall():
                cur.execute(f"DROP USER '{user}'@'{host}'")
            cur.execute(f"ALTER USER 'root'@'localhost' IDENTIFIED BY '{self.admin_password}'")

    def admin_connect(self) -> Any:
        """A PyMySQL autocommit connection as the admin account on the administrative port (not counted
        against max_connections)."""
        return _pymysql().connect(host=self.host, port=self.admin_port, user=ADMIN_USER, password=self.admin_password,
                                  connect_timeout=5, autocommit=True)

    def connections(self, conn: Any) -> list[ConnectionRow]:
        return mysql_connections(conn)

    def threads_connected(self, conn: Any) -> int:
        """`Threads_connected` as the server reports it (main-port sessions only on MariaDB)."""
        return mysql_threads_connected(conn)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "flavour": self.flavour, "idle_timeout_s": self.idle_timeout_s}

    def _stop(self) -> None:
        # SIGTERM is a normal shutdown: the server closes every client connection, frozen or not.
        stop_process(self.proc, signal.SIGTERM, grace_s=20)
        remove_workdir(self.workdir)


class ExternalMySQL(Database):
    """A MySQL/MariaDB server the user runs (`--provider external --db-url mysql://...`): never started or
    stopped. The URL's account is also the sampler's; without the PROCESS privilege it sees only its
    own sessions."""

    engine = "mysql"
    provider = "external"

    def __init__(self, url: str) -> None:
        super().__init__()
        self._url = url
        parts = urllib.parse.urlsplit(url)
        if not parts.scheme.startswith("mysql") and not parts.scheme.startswith("mariadb"):
            from ..config import redact_url

            raise UsageError(f"--db-url: {redact_url(url)!r} is not a MySQL URL; use mysql://user:pw@host:port/db")
        self.host = parts.hostname or "localhost"
        self.port = parts.port or 3306
        self.user = urllib.parse.unquote(parts.username or "")
        self.password = urllib.parse.unquote(parts.password or "")
        self.dbname = urllib.parse.unquote(parts.path.lstrip("/"))

    @property
    def url(self) -> str:
        return self._url

    def _start(self) -> None:
        from ..config import redact_url

        pymysql = _pymysql()
        try:
            with self.admin_connect() as conn, conn.cursor() as cur:
                cur.execute("SELECT @@max_connections, VERSION()")
                max_connections, self.version = cur.fetchone()
                self.max_connections = int(max_connections)
        except pymysql.err.MySQLError as exc:
            reason = exc.args[-1] if exc.args else type(exc).__name__
            raise UsageError(f"--db-url: cannot connect to {redact_url(self._url)} ({reason}); "
                             "check the host, port and credentials, or drop --provider external") from None

    def admin_connect(self) -> Any:
        return _pymysql().connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                  database=self.dbname or None, connect_timeout=5, autocommit=True)

    def connections(self, conn: Any) -> list[ConnectionRow]:
        return mysql_connections(conn)

    def threads_connected(self, conn: Any) -> int:
        """`Threads_connected` as the server reports it."""
        return mysql_threads_connected(conn)

    def _stop(self) -> None:
        pass


def _pymysql() -> Any:
    import pymysql

    return pymysql
